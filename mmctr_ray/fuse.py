"""``mmctr fuse``: raw item vectors → one fused item table, with the fitted PCA and a summary beside it.

Reads the text and image vectors of every item, either the shipped ``item_feature.parquet`` columns
(``txt_emb_BERT``, ``img_emb_CLIPRN50``) or a file written by ``mmctr embed`` (``txt_emb``, ``img_emb``,
``image_missing``), fits the strategy's PCA (:mod:`mmctr_ray.fusion`) and writes, for ``--out X.parquet``::

    X.parquet         item_id (0..N; row 0 = padding, all zeros), item_emb list<float32> (D)
    X.pca.npz         the fitted parts: mean, components, explained variance (plain arrays, no pickle)
    X.fusion.json     strategy, widths, source, item count, explained variance, missing covers, seconds

All three are written under temporary names and renamed when complete (the parquet last), so a file that
looks finished is finished. Training reads ``X.parquet`` through ``--fusion X.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from mmctr_ray import storage
from mmctr_ray.config import FUSION_WIDTHS, FusionConfig
from mmctr_ray.data.writer import list_array
from mmctr_ray.errors import ConfigError, DataError
from mmctr_ray.features import (FUSED_VECTOR_COLUMN, finite_float32, has_placeholder_embeddings, items_fingerprint,
                                iter_parquet, list_matrix, open_parquet, read_parquet, titles_fingerprint)
from mmctr_ray.fusion import (PARTS, FittedFusion, ModalityBatch, check_width, fit_fusion, input_widths,
                              modalities_needed, width_fields)
from mmctr_ray.locking import check_table_output
from mmctr_ray.schema import PAD_ID, Layout

log = logging.getLogger(__name__)

# (text column, image column, missing-cover flag column or None) of each source kind
SHIPPED_COLUMNS = ("txt_emb_BERT", "img_emb_CLIPRN50", None)
EMBED_COLUMNS = ("txt_emb", "img_emb", "image_missing")


def sidecars(out: Path) -> dict[str, Path]:
    """The files ``mmctr fuse --out X.parquet`` writes."""
    stem = out.with_suffix("") if out.suffix == ".parquet" else out
    return {"table": out, "pca": Path(f"{stem}.pca.npz"), "summary": Path(f"{stem}.fusion.json")}


def source_file(data_dir: str | Path, source: str) -> Path:
    """The file that holds the raw vectors of ``source``: item_feature.parquet for ``shipped``, else ``source``."""
    if storage.is_uri(source):  # Path would make s3://b/x the local s3:/b/x, "missing file"
        raise ConfigError(f"--source {source}: expected 'shipped' or a local parquet file written by `mmctr embed` "
                          f"(storage URIs are not read here)")
    return Layout(data_dir).item_feature if source == "shipped" else Path(source)


def _check_embedded_for(path: Path, lay: Layout) -> None:
    """An embed output (``X.embed.json`` beside it records the items it encoded) must be of this data's items:
    other data of as many items (another synth seed, an item_feature written again) passed the id checks."""
    kept = _embed_record(path).get("titles")  # None: no record to compare
    if kept is None or not lay.item_feature.is_file() or not {"item_id", "item_title"} <= set(
            pq.read_schema(lay.item_feature).names):
        return
    now = titles_fingerprint(read_parquet(lay.item_feature, columns=["item_id", "item_title"]))
    if kept != now:
        raise DataError(f"{path}: embedded from other items than {lay.item_feature} holds now (their ids and titles "
                        f"differ: another data set, or one written again since); run `mmctr embed --data "
                        f"{lay.root}` for this data")


def _embed_record(path: Path) -> dict[str, Any]:
    """The ``X.embed.json`` `mmctr embed` wrote beside its output ``path``, or {}: none (an embed from before it
    was kept, a file made otherwise) or unreadable."""
    sidecar = Path(f"{path.with_suffix('')}.embed.json")
    try:
        record = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _say_random_image_weights(path: Path, strategy: str) -> None:
    """A warning when ``path``'s ``X.embed.json`` says its image vectors came from random weights (`mmctr embed`
    without ``--image-model ARCH:WEIGHTS``, the default): a fit on them is a fit on noise that only looks like
    CLIP's."""
    model = _embed_record(path).get("image_model")
    if isinstance(model, str) and model and not model.partition(":")[2]:
        log.warning("%s: its image vectors come from %s with random weights (`mmctr embed` was given no "
                    "--image-model %s:WEIGHTS), so %s fits their PCA on vectors that carry no image content",
                    path, model, model, strategy)


class ItemSource:
    """Streams the raw vectors of a source file batch by batch, checking them on the way."""

    def __init__(self, data_dir: Path, source: str, strategy: str, batch_rows: int = 16_384) -> None:
        lay = Layout(data_dir)
        self.path = source_file(data_dir, source)
        if not self.path.is_file():
            raise DataError(f"{self.path}: missing file (--source is 'shipped' or a parquet written by `mmctr embed`)")
        self.text_col, self.image_col, self.missing_col = SHIPPED_COLUMNS if source == "shipped" else EMBED_COLUMNS
        need = modalities_needed(strategy)
        self.columns = ["item_id"] + [c for c, m in ((self.text_col, "text"), (self.image_col, "image")) if m in need]
        if self.missing_col and "image" in need:
            self.columns.append(self.missing_col)
        opened = open_parquet(self.path, "the raw item vectors (--source is 'shipped' or a parquet written by "
                                         "`mmctr embed`)")
        for col in self.columns:
            if col not in opened.schema_arrow.names:
                raise DataError(f"{self.path}: missing column {col} (expected {', '.join(self.columns)})")
            if opened.schema_arrow.names.count(col) > 1:
                raise DataError(f"{self.path}: column {col}: {opened.schema_arrow.names.count(col)} columns of that "
                                f"name, expected one")
        id_type = opened.schema_arrow.field("item_id").type
        if not pa.types.is_integer(id_type):
            raise DataError(f"{self.path}: column item_id: type {id_type}; expected integer item ids 1..N")
        self.num_items = _num_items(lay)
        if source != "shipped":
            _check_embedded_for(self.path, lay)
            if "image" in need:
                _say_random_image_weights(self.path, strategy)
        self.num_rows = opened.metadata.num_rows
        if not self.num_rows:
            raise DataError(f"{self.path}: empty file: 0 rows, expected the items' raw vectors")
        if 2 * self.num_rows < self.num_items:  # an embed of other data with ids in range, its .embed.json left
            # behind: 97% zero vectors; refused here for fuse, and for a search before Ray (its trials fuse)
            raise DataError(f"{self.path}: vectors of {self.num_rows:,} of the {self.num_items:,} items of "
                            f"item_info, so {self.num_items - self.num_rows:,} would get zero vectors; expected "
                            f"vectors of at least half the items (a source of other data, or one cut short? `mmctr "
                            f"embed --data {data_dir}` encodes every item)")
        self.batch_rows = batch_rows
        self.widths: dict[str, int] = {}

    def batches(self, batch_rows: int | None = None) -> Iterator[ModalityBatch]:
        seen = np.zeros(self.num_items + 1, dtype=bool)
        row0 = 0
        for rb in iter_parquet(self.path, batch_size=batch_rows or self.batch_rows, columns=self.columns):
            column = rb.column("item_id")
            if column.null_count:
                row = row0 + pc.index(pc.is_null(column), True).as_py()
                raise DataError(f"{self.path}: column item_id: null at row {row}; expected item ids "
                                f"1..{self.num_items}")
            ids = column.to_numpy().astype(np.int64)
            bad = np.flatnonzero((ids < 1) | (ids > self.num_items))
            if len(bad):
                raise DataError(f"{self.path}: column item_id: value {ids[bad[0]]} at row {row0 + bad[0]} outside "
                                f"1..{self.num_items} (the items of item_info)")
            dup = np.flatnonzero(seen[ids] | _repeats(ids))
            if len(dup):
                raise DataError(f"{self.path}: column item_id: duplicate item id {ids[dup[0]]} at row {row0 + dup[0]}")
            seen[ids] = True
            mats = {col: self._matrix(rb, col, row0, ids) for col in (self.text_col, self.image_col)
                    if col in self.columns}
            missing = (rb.column(self.missing_col).to_numpy(zero_copy_only=False).astype(bool)
                       if self.missing_col in self.columns else np.zeros(len(ids), dtype=bool))
            yield ModalityBatch(ids, mats.get(self.text_col), mats.get(self.image_col), missing)
            row0 += len(ids)

    def input_widths(self) -> dict[str, int]:
        """Each modality's vector width (0 for one not read), from the file's first rows only: what a width check
        before a fit needs (the fit itself checks every row's width as it reads)."""
        return input_widths(next(iter(self.batches(batch_rows=64))))

    def _matrix(self, rb: pa.RecordBatch, col: str, row0: int, ids: np.ndarray) -> np.ndarray:
        mat = list_matrix(rb.column(col), f"{self.path}: column {col}", row0)
        width = self.widths.setdefault(col, mat.shape[1])
        if mat.shape[1] != width:
            raise DataError(f"{self.path}: column {col}: vectors of width {mat.shape[1]} from row {row0}; earlier rows "
                            f"have {width} (one width per column expected)")
        return finite_float32(mat, f"{self.path}: column {col}", ids, row0)


def _repeats(ids: np.ndarray) -> np.ndarray:
    """True at the second and later occurrences of an id within ``ids``."""
    _, first = np.unique(ids, return_index=True)
    out = np.ones(len(ids), dtype=bool)
    out[first] = False
    return out


def _item_info(lay: Layout) -> pq.ParquetFile:
    if not lay.item_info.is_file():
        raise DataError(lay.missing(lay.item_info))
    return open_parquet(lay.item_info, "item_info.parquet of the challenge layout")


def _num_items(lay: Layout) -> int:
    return _item_info(lay).metadata.num_rows - 1


def _given_table(lay: Layout, info: pa.Table) -> np.ndarray:
    """item_info's ``item_emb_d128`` (``info``: the columns fuse_items read from it) as the table, row 0 zeros."""
    where = f"{lay.item_info}: column item_emb_d128"  # a NaN went into a table that looked complete
    table = np.require(finite_float32(list_matrix(info.column("item_emb_d128"), where), where),
                       requirements="W")  # arrow's float32 buffer is read-only
    table[PAD_ID] = 0.0
    return table


def write_files(files: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write each ``(path, write)`` through ``write`` to a hidden temporary name beside ``path``, then rename them
    in order, so the last one's presence means the rest is there; on a failure no temporary file stays."""
    tmps: list[tuple[Path, Path]] = []
    try:
        for path, write in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmps.append((storage.partial_path(path), path))
            write(tmps[-1][0])
        for tmp, path in tmps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)


def _refuse_placeholders(data_dir: Path, strategy: str, source: str) -> None:
    """Data written by ``mmctr convert`` ships all-zero embedding columns: fusing them would train on nothing."""
    shipped = strategy == "given" or source == "shipped"
    if shipped and has_placeholder_embeddings(data_dir):
        raise ConfigError(f"{data_dir}: converted by `mmctr convert`, its shipped embedding columns are zero "
                          f"placeholders; run `mmctr embed --data {data_dir} --out item_raw_emb.parquet` and fuse "
                          f"v1..v4 with --source item_raw_emb.parquet")


def run_fuse(data_dir: str | Path, out: str | Path, cfg: FusionConfig, source: str = "shipped", pca: str = "auto",
             seed: int = 0, overwrite: bool = False, progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Fit ``cfg`` on the items of ``data_dir`` and write the fused table, the PCA npz and the summary.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is not set.
        DataError: a source file or column is missing or holds bad values (named in the message).
    """
    out = Path(out)
    check_out(out, overwrite)
    t0 = time.perf_counter()
    table, fitted, summary = fuse_items(data_dir, cfg, source, pca, seed, progress)
    return write_fused(out, table, fitted, summary, t0, progress)


def check_out(out: Path, overwrite: bool) -> None:
    """``out`` must name a parquet file whose outputs are absent, or a fused table (with the files beside it)
    replaceable with ``overwrite``: nothing else, not an input (:func:`mmctr_ray.locking.check_table_output`)."""
    check_table_output(out, "fuse", "a fused item table", {"item_id", FUSED_VECTOR_COLUMN}, overwrite,
                       [p for key, p in sidecars(out).items() if key != "table"])


def fuse_items(data_dir: str | Path, cfg: FusionConfig, source: str = "shipped", pca: str = "auto", seed: int = 0,
               progress: Callable[[str], None] = log.info) -> tuple[np.ndarray, FittedFusion | None, dict[str, Any]]:
    """(the fused table, row = item id, row 0 and items without vectors zero; its fit, None for ``given``; the
    summary's fields) of ``cfg`` over the items of ``data_dir``."""
    data_dir = Path(data_dir)
    lay = Layout(data_dir)
    _refuse_placeholders(data_dir, cfg.strategy, source)
    info_file = _item_info(lay)
    n = info_file.metadata.num_rows - 1
    for name in ("item_tags", "item_emb_d128"):  # the items' fingerprint, which the fused table records
        if name not in info_file.schema_arrow.names:
            raise DataError(f"{lay.item_info}: missing column {name} (expected item_id, item_tags and item_emb_d128)")
    info = read_parquet(lay.item_info, columns=["item_tags", "item_emb_d128"])
    summary: dict[str, Any] = {**fusion_fields(cfg),
                               "data": str(data_dir.resolve()), "num_items": n,
                               "items": items_fingerprint(info, str(lay.item_info))}
    if cfg.strategy == "given":
        summary.update(source=str(lay.item_info), column="item_emb_d128")
        return _given_table(lay, info), None, summary
    src = ItemSource(data_dir, source, cfg.strategy)
    if src.num_rows < n:  # the ids were checked: fewer rows are a subset of the items
        log.warning("%s: vectors of %d of the %d items of item_info: the PCA is fitted on those, and the other %d "
                    "items get zero vectors (items_without_vectors in the summary)", src.path, src.num_rows, n,
                    n - src.num_rows)
    progress(f"fuse: fitting {cfg.strategy} PCA on {src.num_rows} items of {src.path}")
    fitted = fit_fusion(cfg, src.batches, src.num_rows, pca=pca, where=str(src.path))
    table = np.zeros((n + 1, fitted.dim), dtype=np.float32)
    missing = 0
    for b in src.batches():  # finite: fit_fusion refused values whose scale float32 cannot hold, and NaN/inf
        table[b.ids] = fitted.transform(b)
        missing += int(b.image_missing.sum())
    summary.update(source=str(src.path.resolve()), source_rows=src.num_rows, pca=pca, pca_fit=fitted.method, seed=seed,
                   items_without_vectors=n - src.num_rows, image_missing=missing)
    return table, fitted, summary


def write_fused(out: Path, table: np.ndarray, fitted: FittedFusion | None, summary: dict[str, Any], t0: float,
                progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Write ``table`` (with ``fitted``'s npz and the summary, completed here) as ``out``; the table last."""
    paths = sidecars(out)
    if fitted is not None:
        summary["explained_variance_ratio"] = {p.name: round(float(p.explained_variance_ratio.sum()), 6)
                                               for p in fitted.parts}
    summary.update(dim=int(table.shape[1]), seconds=round(time.perf_counter() - t0, 3),
                   table=hashlib.sha256(np.ascontiguousarray(table, dtype=np.float32).data).hexdigest()[:16])
    ids = pa.array(np.arange(len(table), dtype=np.int64))
    write_files([*([(paths["pca"], fitted.save)] if fitted is not None else []),
                 (paths["summary"], lambda p: p.write_text(storage.json_text(summary, indent=2) + "\n")),
                 (out, lambda p: pq.write_table(  # the table last: its presence means the rest is there
                     pa.table({"item_id": ids, FUSED_VECTOR_COLUMN: list_array(table, pa.float32())}), p))])
    if fitted is None and paths["pca"].exists():
        paths["pca"].unlink()  # an earlier fit's PCA does not describe a 'given' table
    progress(f"fuse: wrote {out} ({len(table)} rows × {table.shape[1]}) in {summary['seconds']:.1f} s")
    return summary


def read_fusion_summary(table_path: str | Path) -> dict[str, Any] | None:
    """The ``X.fusion.json`` beside a fused table, or None when the table did not come from ``mmctr fuse``."""
    path = sidecars(Path(table_path))["summary"]
    return storage.read_json_object(path, "the .fusion.json `mmctr fuse` writes beside its table") if path.is_file() \
        else None


def yaml_string(text: str) -> str:
    """``text`` as one double-quoted YAML scalar: --set values are read as YAML, where " #" starts a comment and
    ": " a mapping (a run folder `exp #3` trained on the table at `.../exp`). PyYAML's own quoting, not JSON's:
    PyYAML reads a JSON surrogate pair (an emoji) as two lone surrogates."""
    return yaml.safe_dump(text, default_style='"', allow_unicode=True, width=float("inf")).removesuffix(
        "\n...\n").rstrip("\n")


def fusion_fields(cfg: FusionConfig) -> dict[str, Any]:
    """The strategy and the widths it uses, as a table's ``.fusion.json`` records them (a v4 table said "dims": 128,
    the unused default, beside its text_dim and image_dim)."""
    widths = width_fields(cfg.strategy)
    return {"strategy": cfg.strategy, **{k: v for k, v in asdict(cfg).items() if k in widths}}


def check_widths(data_dir: str | Path, cfg: FusionConfig, source: str = "shipped") -> None:
    """The fit's own width check (each part at most min(items − 1, input width)), from the source's first rows, for a
    command that fuses after other steps: `mmctr pipeline` said a too wide ``fusion.*`` at its fuse step only, once
    Ray had started. Nothing for ``given``."""
    if cfg.strategy not in PARTS:
        return
    src = ItemSource(Path(data_dir), source, cfg.strategy)
    widths = src.input_widths()
    for name, inputs, field in PARTS[cfg.strategy]:
        check_width(cfg, name, field, src.num_rows, sum(widths[m] for m in inputs))


def fusion_overrides(table_path: str | Path) -> list[str]:
    """Config overrides that train on a fused table: ``data.item_vector`` = the table, ``fusion.*`` from its
    ``.fusion.json`` (so the run's config says which fusion it was trained on)."""
    table = Path(table_path)
    expected = "a fused item table written by `mmctr fuse` (item_id, item_emb)"
    if not table.exists():
        raise ConfigError(f"{table}: missing file; --fusion needs {expected}")
    if not table.is_file() or "item_emb" not in open_parquet(table, expected).schema_arrow.names:
        raise ConfigError(f"{table}: --fusion needs {expected}")
    out = [f"data.item_vector={yaml_string(str(table.resolve()))}"]
    summary = read_fusion_summary(table)
    if summary:
        out += [f"fusion.{k}={summary[k]}" for k in ("strategy", *FUSION_WIDTHS) if k in summary]
    return out


def load_fitted(table_path: str | Path) -> FittedFusion:
    """The PCA fitted for a fused table (``X.pca.npz``)."""
    path = sidecars(Path(table_path))["pca"]
    if not path.is_file():
        raise DataError(f"{path}: missing file (written by `mmctr fuse` for strategies v1..v4)")
    return FittedFusion.load(path)
