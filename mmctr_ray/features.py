"""From the challenge layout to model inputs: the item table and the splits as Ray Datasets.

* The **item table** is small (92k items × ~300 numbers for MicroLens-1M, 1.1M items for the full MicroLens),
  so it is built once and kept resident on each worker's device; the model gathers target and history items
  from it by id. Row ``i`` is item ``i``; row 0 is the padding item (all zeros).
* The **splits** stream through Ray Data. Each row becomes fixed-width numpy columns: ``item_seq`` is cut to
  the ``max_len`` most recent items (B, L) as an int64 tensor column, so no per-row Python runs on the hot
  path; the history mask is ``item_seq > 0``.

Example:
    >>> table = load_item_table("DATA")                      # given item_emb_d128 vectors
    >>> ds = read_split("DATA", "train", max_len=64)          # ray.data.Dataset
    >>> batch = next(ds.iter_batches(batch_size=4, batch_format="numpy"))
    >>> batch["item_seq"].shape
    (4, 64)
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmctr_ray import storage
from mmctr_ray.errors import DataError, find_cause, first_line  # DataError re-exported
from mmctr_ray.schema import NO_PARTS, PAD_ID, SPLITS, Layout, history_around_gap, padding_gaps

SPLIT_FEATURES = ("user_id", "item_id", "likes_level", "views_level", "label")
MODEL_INPUTS = ("item_id", "item_seq", "likes_level", "views_level", "user_id")  # what DINModel reads
FUSED_VECTOR_COLUMN = "item_emb"  # column of an item_emb.parquet written by `mmctr fuse`


def list_matrix(col: pa.ChunkedArray | pa.Array, where: str, row0: int | None = 0) -> np.ndarray:
    """A list column whose lists all have one length → (rows, width) numpy matrix (no per-row Python). ``row0``:
    the file row of the column's first (a batch's), for the message; None where it is not known (a batch that Ray
    Data read)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    kind = col.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) or not (
            pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
        raise DataError(f"{where}: a list of numbers per row expected; the column is {kind}")  # a traceback from
        # numpy ("setting an array element with a sequence") for a list of lists
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        at = "a row of its batch" if row0 is None else f"row {row0 + row}"
        raise DataError(f"{where}: {at} is null; a list of numbers per row expected")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        row = int(np.flatnonzero(lengths != lengths[0])[0])
        if row0 is None:
            raise DataError(f"{where}: lists of one length expected; a row has {lengths[row]} values where another "
                            f"of its batch has {lengths[0]} (run `mmctr validate` for the file and row)")
        raise DataError(f"{where}: lists of one length expected; row {row0 + row} has {lengths[row]}, row {row0} "
                        f"has {lengths[0]}")  # the rows named: no "run `mmctr validate`", which never reads a fused
        # table or an embedded source
    width = int(lengths[0]) if len(lengths) else 0
    return pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(len(lengths), width)


def finite_float32(mat: np.ndarray, where: str, items: np.ndarray | None = None, row0: int | None = None
                   ) -> np.ndarray:
    """``mat`` (one item vector a row) as float32; a one-line DataError naming the first item (``items[row]``, else
    the row) whose vector holds NaN/inf, or a value float32 cannot hold (a float64 such as 1e300, which the cast
    made inf, with numpy's overflow warning and no error, in a table that looked complete)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = mat.astype(np.float32, copy=False)
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if len(bad):
        row = int(bad[0])
        item = row if items is None else items[row]
        at = "" if row0 is None else f" (row {row0 + row})"
        values = mat[row][~np.isfinite(out[row])]
        what = ("NaN/inf" if not np.isfinite(values).all() else
                f"{float(values[0]):g}, beyond float32's range,")
        raise DataError(f"{where}: {what} in the vector of item {item}{at}; expected finite floats")
    return out


@dataclass(frozen=True)
class ItemTable:
    """Everything the model knows about items, indexed by item id (row 0 = padding).

    Attributes:
        tags: (N+1, T) int64 tag ids, left-padded with 0.
        vectors: (N+1, V) float32 frozen multimodal item vectors.
        source: where ``vectors`` came from (saved with checkpoints).
    """

    tags: np.ndarray
    vectors: np.ndarray
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        """N: the largest item id (rows = N + 1)."""
        return self.tags.shape[0] - 1

    @property
    def tag_vocab(self) -> int:
        """Size of the tag embedding table: largest tag id + 1 (0 = padding)."""
        return int(self.tags.max()) + 1

    @property
    def vector_dim(self) -> int:
        return self.vectors.shape[1]

    def to_torch(self, device: Any = "cpu") -> dict[str, Any]:
        """The table as tensors on ``device``: ``item_tags`` (N+1, T) long, ``item_vectors`` (N+1, V) float
        (the keyword arguments of :class:`mmctr_ray.model.DINModel`)."""
        import torch

        return {"item_tags": torch.as_tensor(self.tags, device=device),
                "item_vectors": torch.as_tensor(self.vectors, device=device)}


def open_parquet(path: str | Path, expected: str) -> pq.ParquetFile:
    """``path`` opened as parquet, or a one-line DataError naming it (a half-copied file, a JSON sidecar given by
    mistake): pyarrow's own error is a traceback about magic bytes."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({first_line(err)}); expected {expected}") from None


def _undecodable(path: str | Path, err: BaseException) -> DataError:
    return DataError(f"{path}: its data cannot be decoded ({first_line(err)}): a damaged file; `mmctr validate` "
                     f"checks every file")


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """``pq.read_table``, with a file whose footer reads while its pages do not decode (damaged bytes behind an
    intact footer: the checks before Ray pass it) as a one-line DataError naming it, not pyarrow's OSError."""
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise _undecodable(path, err) from None


def iter_parquet(path: str | Path, parquet_file: pq.ParquetFile | None = None,
                 **kwargs: Any) -> Iterator[pa.RecordBatch]:
    """``ParquetFile(path).iter_batches(**kwargs)`` (of ``parquet_file`` when given: ``path`` opened), a batch that
    cannot be decoded a one-line DataError, as in :func:`read_parquet`."""
    batches = (parquet_file or pq.ParquetFile(path)).iter_batches(**kwargs)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise _undecodable(path, err) from None
        yield batch


def _read_fused(path: Path, num_items: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: item vector file not found (data.item_vector must be 'given' or a parquet "
                        f"written by `mmctr fuse`)")
    open_parquet(path, "a fused item table written by `mmctr fuse`")
    table = read_parquet(path)
    for name in ("item_id", FUSED_VECTOR_COLUMN):
        if name not in table.column_names:
            raise DataError(f"{path}: missing column {name} (expected item_id and {FUSED_VECTOR_COLUMN})")
    column = table.column("item_id")  # a table made by hand (data.item_vector=FILE): an IndexError for float or
    if not pa.types.is_integer(column.type) or column.null_count:  # null ids, and the later of two rows won
        raise DataError(f"{path}: column item_id: " + (f"type {column.type}" if column.null_count == 0 else
                        f"{column.null_count:,} nulls") + "; expected integer item ids, each once")
    ids = column.to_numpy()
    vecs = list_matrix(table.column(FUSED_VECTOR_COLUMN), f"{path}: column {FUSED_VECTOR_COLUMN}")
    bad = (ids < 0) | (ids > num_items)
    if bad.any():
        raise DataError(f"{path}: column item_id: value {int(ids[bad][0])} outside 0..{num_items} (item_info rows)")
    seen, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        first = int(np.flatnonzero(counts > 1)[0])
        raise DataError(f"{path}: column item_id: item {int(seen[first])} in {int(counts[first])} rows; expected each "
                        f"item once")
    out = np.zeros((num_items + 1, vecs.shape[1]), dtype=np.float32)
    out[ids] = vecs
    out[PAD_ID] = 0.0
    return out


def items_fingerprint(info: pa.Table, where: str) -> str:
    """What identifies a data set's items: a hash of item_info's ``item_tags`` and ``item_emb_d128``, which a fused
    table records (``items`` in its ``.fusion.json``) so that it is never used with the items of other data."""
    digest = hashlib.sha256()
    for name in ("item_tags", "item_emb_d128"):
        matrix = list_matrix(info.column(name), f"{where}: column {name}")
        with np.errstate(over="ignore"):  # a float64 beyond float32 (refused where the vectors are read): no warning
            digest.update(np.ascontiguousarray(matrix, dtype=np.int64 if name == "item_tags" else np.float32).data)
    return digest.hexdigest()[:16]


def titles_fingerprint(items: pa.Table) -> str:
    """What `mmctr embed` encoded: a hash of item_feature's ``item_id`` and ``item_title`` in id order, which its
    ``.embed.json`` records (``titles``) so that `mmctr fuse` never fits the vectors of other items."""
    ids = items.column("item_id").to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    titles = items.column("item_title").to_pylist()
    digest = hashlib.sha256(ids[order].tobytes())
    for i in order:
        digest.update(b"\0" + ("" if titles[i] is None else str(titles[i])).encode())
    return digest.hexdigest()[:16]


def check_fused_for(path: str | Path, summary: dict[str, Any] | None, data_dir: str | Path, info: pa.Table) -> None:
    """A one-line DataError when the fused table at ``path`` was fused from the items of other data than
    ``data_dir``'s (whose item_info is ``info``): its vectors would go to other items, or to none (zeros)."""
    if not summary or "num_items" not in summary:
        return  # not written by `mmctr fuse`: nothing to compare with
    items, kept = info.num_rows - 1, summary.get("items")  # a table fused before the hash was kept: counts only
    same = summary["num_items"] == items and (not kept or kept == items_fingerprint(info, str(path)))
    if not same:
        theirs = f"{summary['num_items']:,} items" + ("" if summary["num_items"] != items else ", other tags/vectors")
        raise DataError(f"{path}: fused from the items of {summary.get('data', 'other data')} ({theirs}), not those "
                        f"of {data_dir} ({items:,} items): fuse again with --data {data_dir}")


def check_same_table(saved: dict[str, Any], now: dict[str, Any], where: str) -> None:
    """A one-line DataError when the item vectors a checkpoint was trained on (``saved``, its item_source.json) are
    not the ones now (``now``): a fused table rewritten since, or, for item_info's own vectors (``given``), the items
    of other data or an item_info rewritten since (:func:`items_fingerprint`; checkpoints from before it was kept are
    not compared). The model would meet other vectors and tags than it learnt, for the same item ids."""
    if saved.get("item_vector") == "given" == now.get("item_vector") and saved.get("items") and \
            saved["items"] != now.get("items"):
        raise DataError(f"{now.get('file')}: its items (item_tags, item_emb_d128) are not those {where} was trained "
                        f"on: other data, or item_info rewritten since; use the data the run was trained on, or "
                        f"train again")
    then = (saved.get("fusion") or {}).get("table")
    if then and then != (now.get("fusion") or {}).get("table"):
        raise DataError(f"{now.get('file')}: rewritten since {where} was trained on it (a new `mmctr fuse` into the "
                        f"same file): its vectors are not the ones the model learnt; use the table it was trained on, "
                        f"or train again")


def has_placeholder_embeddings(data_dir: str | Path) -> bool:
    """True for data written by ``mmctr convert``: its shipped embedding columns are all-zero placeholders."""
    manifest = Path(data_dir) / "convert.json"
    return manifest.is_file() and bool(storage.read_json_object(manifest, "the convert.json `mmctr convert` writes")
                                       .get("placeholder_embeddings"))


def refuse_placeholders(data_dir: str | Path, item_vector: str) -> None:
    """A one-line DataError when ``item_vector`` is ``given`` and item_info's vectors are the zero placeholders
    `mmctr convert` writes; before Ray starts in each stage (features said it after, and named train's flag)."""
    if item_vector == "given" and has_placeholder_embeddings(data_dir):
        raise DataError(f"{Layout(data_dir).item_info}: column item_emb_d128: zero placeholders written by `mmctr "
                        f"convert`; expected real item vectors: run `mmctr embed` and `mmctr fuse`, then give the "
                        f"fused table (`--fusion FILE` to train, `--set data.item_vector=FILE` elsewhere)")


def load_item_table(data_dir: str | Path, item_vector: str = "given") -> ItemTable:
    """Build the item table from ``item_info.parquet`` and the chosen item vectors.

    Args:
        data_dir: the data directory (challenge layout).
        item_vector: ``given`` for item_info's ``item_emb_d128``, or the path of a fused
            ``item_emb.parquet`` (columns ``item_id``, ``item_emb``; items it lacks get zeros).

    Raises:
        DataError: naming the file, column and value when the table cannot be built.
    """
    from mmctr_ray.preflight import num_items

    lay = Layout(data_dir)
    num_items(data_dir)  # its columns, types, nulls and tag ids, from the footer: one line, not a worker's traceback
    info = read_parquet(lay.item_info, columns=["item_id", "item_tags", "item_emb_d128"])
    ids = info.column("item_id").to_numpy()
    if (ids != np.arange(len(ids))).any():
        row = int(np.flatnonzero(ids != np.arange(len(ids)))[0])
        raise DataError(f"{lay.item_info}: column item_id: row {row} holds {int(ids[row])}; item_info rows must "
                        f"be in item_id order from 0 (padding)")
    tags = list_matrix(info.column("item_tags"), f"{lay.item_info}: column item_tags").astype(np.int64)
    if item_vector == "given":
        refuse_placeholders(data_dir, item_vector)
        vectors = np.require(finite_float32(list_matrix(info.column("item_emb_d128"), f"{lay.item_info}: column "
                                                        f"item_emb_d128"), f"{lay.item_info}: column item_emb_d128"),
                             requirements="W")  # arrow's float32 buffer is read-only: torch warned, shared it
        source = {"item_vector": "given", "file": str(lay.item_info), "column": "item_emb_d128",
                  "items": items_fingerprint(info, str(lay.item_info))}
    else:
        from mmctr_ray.fuse import read_fusion_summary

        fusion = read_fusion_summary(item_vector)
        check_fused_for(item_vector, fusion, data_dir, info)  # first: a table of more items fails in the read as
        vectors = _read_fused(Path(item_vector), len(ids) - 1)  # an id out of range, not as what it is
        source = {"item_vector": "fused", "file": str(Path(item_vector).resolve()), "column": FUSED_VECTOR_COLUMN,
                  "fusion": fusion}
    vectors = finite_float32(vectors, f"{source['file']}: column {source['column']}")
    source["dim"] = int(vectors.shape[1])
    return ItemTable(tags=tags, vectors=vectors, source=source)


@dataclass(frozen=True)
class FeatureMap:
    """Vocabulary sizes and widths the model is built for; saved as ``feature_map.json`` with every run.

    Attributes:
        num_items: N (item ids 1..N, 0 = padding).
        tag_vocab: tag embedding rows (largest tag id + 1).
        tags_per_item: T, stored width of ``item_tags``.
        vector_dim: V, width of the frozen item vector.
        num_users: user embedding rows (largest user id + 1 over all splits).
    """

    num_items: int
    tag_vocab: int
    tags_per_item: int
    vector_dim: int
    num_users: int

    def to_json(self, path: storage.Location) -> None:
        storage.write_text(path, storage.json_text(asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: storage.Location, shown: storage.Location | None = None) -> FeatureMap:
        """The map in ``path``; errors name it as ``shown`` (a checkpoint's URI, for its downloaded copy)."""
        shown = path if shown is None else shown
        raw = storage.read_json_object(path, "the feature_map.json `mmctr train` writes", shown)
        names = {f.name for f in fields(cls)}
        if set(raw) != names:
            raise DataError(f"{shown}: feature map keys {sorted(raw)} differ from the expected {sorted(names)}")
        return cls(**raw)


def largest_user_ids(data_dir: str | Path) -> list[tuple[int, Path]]:
    """(largest ``user_id``, file) of each split file that holds a user id (from the parquet column statistics
    where they exist)."""
    from mmctr_ray.preflight import value_range

    lay = Layout(data_dir)
    seen = [(value_range(pq.ParquetFile(part), "user_id", part), part)
            for split in SPLITS for part in lay.split_files(split)]
    return [(int(r[1]), part) for r, part in seen if r is not None]


def max_user_id(data_dir: str | Path) -> int:
    """Largest ``user_id`` over the three splits."""
    return max((largest for largest, _ in largest_user_ids(data_dir)), default=0)


def build_feature_map(data_dir: str | Path, table: ItemTable) -> FeatureMap:
    """The feature map of ``data_dir`` with item table ``table``."""
    return FeatureMap(num_items=table.num_items, tag_vocab=table.tag_vocab, tags_per_item=int(table.tags.shape[1]),
                      vector_dim=table.vector_dim, num_users=max_user_id(data_dir) + 1)


# An embedding table keyed by raw id holds a row for every id up to the largest. Up to SPARSE_TABLE_ROWS rows
# (256 MiB of weights at embedding_dim 64) any table is built; past it, one with more than SPARSE_TABLE_FACTOR rows
# per id the data can hold is refused before Ray starts: hashed or unmapped ids. (A tag id of 10**12 was a
# worker's allocation error of 32 TB, after Ray started, run twice more by FailureConfig; a user id of 5 * 10**7
# in the tiny test data trained, with 6 GB of user table and Adam state for a few hundred users.)
SPARSE_TABLE_ROWS = 1 << 20
SPARSE_TABLE_FACTOR = 16
TRAIN_BYTES_PER_WEIGHT = 16  # fp32 weight, its gradient and Adam's two moments


def _table_cost(rows: int, dim: int) -> str:
    return f"{rows:,} rows, {rows * dim * TRAIN_BYTES_PER_WEIGHT / 2**30:,.1f} GiB to train at embedding_dim {dim}"


def sparse_tags(tags: np.ndarray) -> tuple[int, int] | None:
    """(largest tag id, distinct tags) when a tag table sized by ``tags`` would be refused (see
    ``SPARSE_TABLE_ROWS``), else None."""
    if tags.size == 0 or int(tags.max()) + 1 <= SPARSE_TABLE_ROWS:
        return None
    distinct = int(np.count_nonzero(np.unique(tags)))  # less the padding 0
    return (int(tags.max()), distinct) if int(tags.max()) + 1 > SPARSE_TABLE_FACTOR * max(distinct, 1) else None


def check_id_tables(data_dir: str | Path, tags: np.ndarray, num_users: int, use_tags: bool, use_user_id: bool,
                    dim: int, split_rows: int) -> None:
    """A one-line DataError, on the driver before Ray starts, when the tag or user embedding table the model would
    build is mostly rows no id uses (see ``SPARSE_TABLE_ROWS``): the ids are not a dense vocabulary. ``tags``: the
    item table's (item_info's) tag ids, compared with their distinct count; ``num_users``: the user table's rows
    (:func:`max_user_id` + 1), checked only with ``model.use_user_id``, against ``split_rows``, the rows of all
    splits, which bound the distinct users from above."""
    lay = Layout(data_dir)
    if use_tags and (sparse := sparse_tags(tags)) is not None:
        raise DataError(f"{lay.item_info}: column item_tags: largest tag id {sparse[0]:,} for {sparse[1]:,} distinct "
                        f"tags asks a tag embedding table of {_table_cost(sparse[0] + 1, dim)}; expected dense tag "
                        f"ids 1..T (0 = padding), as `mmctr convert` writes: map the tags to 1..T, or set "
                        f"model.use_tags=false")
    if use_user_id and num_users > SPARSE_TABLE_ROWS and num_users > SPARSE_TABLE_FACTOR * split_rows:
        where = max(largest_user_ids(data_dir), default=(0, lay.dataset_dir))[1]  # the file of the largest
        raise DataError(f"{where}: column user_id: largest user id {num_users - 1:,} for at most "
                        f"{split_rows:,} users (the rows of all splits) asks a user embedding table of "
                        f"{_table_cost(num_users, dim)}; expected dense user ids 0..U: map the users to 0..U, "
                        f"or set model.use_user_id=false")


def check_data_id_tables(data_dir: str | Path, use_tags: bool, use_user_id: bool, dim: int) -> None:
    """:func:`check_id_tables` from ``data_dir``'s files alone (item_info's tags, the splits' footers), for the
    commands that check before a training run builds its item table: `tune` and `pipeline`."""
    lay = Layout(data_dir)
    tags = np.zeros((0, 0), np.int64)
    if use_tags:
        tags = list_matrix(read_parquet(lay.item_info, columns=["item_tags"]).column("item_tags"),
                           f"{lay.item_info}: column item_tags")
    num_users = rows = 0  # the splits' footers are read for the user table only
    if use_user_id:
        num_users = max_user_id(data_dir) + 1
        rows = sum(pq.ParquetFile(part).metadata.num_rows for split in SPLITS for part in lay.split_files(split))
    check_id_tables(data_dir, tags, num_users, use_tags, use_user_id, dim, rows)


def history_window(seq: np.ndarray, max_len: int) -> np.ndarray:
    """Keep the ``max_len`` most recent items of left-padded (B, W) histories → (B, L) contiguous."""
    if max_len > seq.shape[1]:
        pad = np.zeros((seq.shape[0], max_len - seq.shape[1]), dtype=seq.dtype)
        return np.ascontiguousarray(np.concatenate([pad, seq], axis=1))
    return np.ascontiguousarray(seq[:, seq.shape[1] - max_len:])


def history_mask(seq: Any) -> Any:
    """Real (non-padding) history positions: ``seq > 0``; works on numpy arrays and torch tensors."""
    return seq > PAD_ID


def to_model_batch(batch: pa.Table, max_len: int, source: str = "split", row0: int | None = None
                   ) -> dict[str, np.ndarray]:
    """One Arrow batch of a split (the file or folder ``source``; ``row0``: the file row of its first, where known)
    → fixed-width numpy columns (ids int64, label float32)."""
    out = {name: batch.column(name).to_numpy().astype(np.int64, copy=False)
           for name in SPLIT_FEATURES if name != "label"}
    # the test split's label is a placeholder, possibly null: nulls become 0
    out["label"] = pc.fill_null(batch.column("label"), 0).to_numpy().astype(np.float32, copy=False)
    seq = list_matrix(batch.column("item_seq"), f"{source}: column item_seq", row0).astype(np.int64, copy=False)
    check_left_padded(seq, f"{source}: column item_seq")
    out["item_seq"] = history_window(seq, max_len)
    return out


def check_left_padded(seq: np.ndarray, where: str) -> None:
    """A one-line DataError when a (B, W) history holds a padding 0 after an item id: right-padded, or a gap, which
    the layout does not allow (`mmctr validate` reports it, with the row in the file). The whole stored width is
    checked, as validate checks it, not only the last ``max_len`` slots the model reads as the most recent clicks: a
    right-padded row there would train and score on an empty or cut history without a word. ~0.4 ms for
    8192 × 100 ids (2-core VM), in the Ray Data tasks that feed the workers."""
    gaps = padding_gaps(seq)
    if gaps.any():
        shown = history_around_gap(seq[int(np.flatnonzero(gaps)[0])])
        raise DataError(f"{where}: a history with a padding 0 after an item id ({shown}); expected left-padded "
                        f"lists, all 0s before the history, most recent last (run `mmctr validate` for the row)")


# Ray Data's Parquet reader (V2, Ray 2.60's default) lists every read's files on a pool of footer-reading actors it
# starts and kills per read (32 by default, each a new worker process): 1.3-3 s before the first row on the 2-core
# test machine, for a 300-row split too, and once an epoch for a split read every epoch. The older reader (V1)
# reads a few files' footers where the read is planned: 0.10-0.15 s. V1 reads each file in one task, though, where
# V2 spreads a file's row groups over tasks (and a cluster's nodes): V1 reads a split up to V1_MAX_ROWS, V2 anything
# larger, or of more files than V1_MAX_FILES, unless the caller needs file order (read_split's ``ordered``).
#
# V1 by default cuts each read task's output into ~200 blocks (Ray Data's minimum read parallelism;
# "ReadParquet->SplitBlocks(163)" for a 200k-row file), and a split read cannot fuse with what follows: the blocks
# of 1,226 rows went through the object store one by one. With one block list per file (``override_num_blocks``),
# `benchmarks/data_path.py` (200k rows, 2 cores) streams 0.73-0.90M rows/s against 0.27-0.36M split, and
# `mmctr predict`, whose reads share the node's CPUs with the scoring actor, scores 9,300-11,700 rows/s against
# 5,200-6,000 (the split read of 200k rows took ~20 s there). V2 plans its own read units and keeps its default.
V1_MAX_ROWS = 500_000
V1_MAX_FILES = 64


def small_split(parts: list[Path]) -> bool:
    """Whether ``parts`` hold at most :data:`V1_MAX_ROWS` rows in at most :data:`V1_MAX_FILES` files (rows from
    the footers)."""
    if len(parts) > V1_MAX_FILES:
        return False
    rows = 0
    for part in parts:
        try:
            rows += pq.read_metadata(part).num_rows
        except (OSError, pa.ArrowException) as err:  # callers that did not validate the data first
            raise DataError(f"{part}: not a readable parquet file ({err})") from None
        if rows > V1_MAX_ROWS:
            return False
    return True


def read_split(data_dir: str | Path, split: str, max_len: int = 64, batch_rows: int = 16_384,
               ordered: bool = False) -> Any:
    """The split as a Ray Dataset of model-ready rows (Ray must be initialised by the caller); a split held as a
    folder is read from its part files, in their order. A small split (:func:`small_split`) is read by Ray Data's
    V1 Parquet reader, one task and one stream of blocks per file, a larger one by its default (V2).

    ``ordered``: the caller needs the rows in file order: the split is read by V1 whatever its size, and the
    dataset (and those derived from it, which share its context) keeps Ray Data's ``preserve_order``. V2 packs
    row groups into read units first-fit by size, and flushes a large file's later row groups ahead of the rest
    (Ray 2.60's ``OnlineBinPacker``), so ``preserve_order`` keeps the order of its read units, not of the rows: a
    test split over 128 MiB of row groups came back out of order.

    Columns: ``user_id``, ``item_id``, ``likes_level``, ``views_level`` (int64), ``label`` (float32) and
    ``item_seq`` (int64 tensor column of shape (max_len,), most recent item last, 0 = padding).
    """
    import ray.data

    path = Layout(data_dir).split(split)
    parts = Layout(data_dir).split_files(split)
    if not parts:
        raise DataError(f"{path}: missing file" if not path.exists() else f"{path}: {NO_PARTS}")
    ctx = ray.data.DataContext.get_current()
    v2 = ctx.use_datasource_v2
    # read by read_parquet alone, when it is called; process-wide meanwhile (no other thread reads here)
    ctx.use_datasource_v2 = v2 and not ordered and not small_split(parts)
    try:
        ds = ray.data.read_parquet([str(p.resolve()) for p in parts],
                                   override_num_blocks=len(parts) if not ctx.use_datasource_v2 else None)
    except Exception as err:  # Ray Data samples the first rows: pages that do not decode behind an intact footer
        damaged = find_cause(err, lambda e: isinstance(e, (OSError, pa.ArrowException)) and not isinstance(
            getattr(e, "cause", None), BaseException))  # pyarrow's own, not Ray's RayTaskError(OSError) around it
        if damaged is None:
            raise
        raise DataError(f"{path}: its data cannot be decoded ({first_line(damaged)}): a damaged file; `mmctr "
                        f"validate {data_dir}` names it") from None
    finally:
        ctx.use_datasource_v2 = v2
    ds = ds.select_columns([*SPLIT_FEATURES, "item_seq"])
    ds = ds.map_batches(to_model_batch, batch_format="pyarrow", batch_size=batch_rows, zero_copy_batch=True,
                        fn_kwargs={"max_len": max_len, "source": str(path)})
    if ordered:  # this dataset's own context: blocks in read order, not in the order their tasks end
        ds.context.execution_options.preserve_order = True
    return ds
