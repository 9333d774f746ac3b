"""``mmctr embed``: item titles and covers → text and image vectors, as a Ray Data pipeline.

Stages::

    item rows (item_id, item_title)                     read on the driver, sorted by item_id
      → prepare   CPU tasks: decode + resize covers (uint8), tokenize titles (fixed width)
      → encode    actor pool (ActorPoolStrategy): TextEncoder + ImageEncoder, loaded once per actor;
                  num_gpus per actor may be fractional (several actors share a GPU); CPU without GPUs
      → shards    the driver groups rows into shards of consecutive item ids and writes each when complete

Output (``--out X.parquet``): one row per item, ordered by item_id whatever the scheduling::

    item_id int64 | txt_emb list<float32> (H) | img_emb list<float32> (E) | image_missing bool |
    image_status int8 (0 ok, 1 missing file, 2 undecodable; the vector of a missing cover is all zeros) |
    title_cut bool (the title had more tokens than --max-length, special tokens included)

plus ``X.embed.json`` (models, widths, counts, seconds, items/s). Shards are written to ``X.parquet.parts/``
as they complete; an interrupted run re-run with the same settings skips the shards already there, and the
final file is assembled (under a temporary name, then renamed) only when every shard exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmctr_ray.config import PRECISIONS
from mmctr_ray.data.writer import list_array
from mmctr_ray.embed.image import (CORRUPT, MISSING, OK, check_image_model, decode_covers, image_size,
                                  parse_image_model, preprocessing)
from mmctr_ray.embed.text import (check_max_length, check_model_dir, check_text_model, load_tokenizer,
                                  resolve_normalize, resolve_pooling, titles_cut, tokenize)
from mmctr_ray.errors import ConfigError, DataError, OutputExistsError, first_line
from mmctr_ray.features import open_parquet, titles_fingerprint
from mmctr_ray.host_malloc import actor_options
from mmctr_ray.locking import check_table_output
from mmctr_ray.ray_env import check_actors, cpu_threads
from mmctr_ray.schema import Layout
from mmctr_ray.storage import json_text, partial_path, write_text

log = logging.getLogger(__name__)
MAX_BAD_COVERS = 0.1  # default share of items whose cover may be missing or corrupt
FAULT_ENV = "MMCTR_FAULT_EMBED_EXIT_AFTER_SHARDS"  # tests: the driver exits hard after writing N shards


@dataclass(frozen=True)
class EmbedSettings:
    """What makes two runs' shards interchangeable (saved in the parts folder; a resume must match)."""

    text_model: str
    image_model: str
    pooling: str = "cls"
    max_length: int = 32
    seed: int = 0
    shard_items: int = 4_096
    data: str = ""  # fingerprint of the items embedded (ids, titles, cover folder): shards of other data never mix
    models: str = ""  # fingerprint of the model files (names, sizes, times): shards of a model since replaced neither
    normalize: bool = False  # text vectors scaled to unit length (the model's own Normalize module, --pooling auto)
    precision: str = "fp32"  # bf16: autocast on the actors' GPUs (shards of both would mix in one table)
    image_preprocess: str = ""  # the covers' resize and normalisation (image.preprocessing), as JSON


def prepare_batch(batch: dict[str, np.ndarray], images_dir: str, size: int, text_model: str,
                  max_length: int, resize_mode: str = "shortest",
                  interpolation: str = "bicubic") -> dict[str, np.ndarray]:
    """CPU stage: covers → uint8 pixels and status; titles → fixed-width token ids, and which titles they cut."""
    pixels, status = decode_covers(batch["item_id"], images_dir, size, resize_mode, interpolation)
    titles = ["" if t is None else str(t) for t in batch["item_title"]]
    return {"item_id": batch["item_id"], "pixels": pixels, "image_status": status,
            "title_cut": titles_cut(titles, text_model, max_length), **tokenize(titles, text_model, max_length)}


class Encoder:
    """Ray Data callable class: both encoders, loaded once per actor, on its GPU when it has one."""

    def __init__(self, settings: dict[str, Any], sharers: int, use_gpu: bool = False) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        from mmctr_ray.embed.image import ImageEncoder
        from mmctr_ray.embed.text import TextEncoder
        from mmctr_ray.ray_env import actor_device

        hf_logging.disable_progress_bar()
        device = actor_device(use_gpu)
        if device == "cpu":  # the cores of the node it runs on, shared with the pool's other actors
            torch.set_num_threads(cpu_threads(sharers))
        s = EmbedSettings(**settings)
        self.text = TextEncoder(s.text_model, s.pooling, device, s.normalize, bf16=s.precision == "bf16")
        self.image = ImageEncoder(s.image_model, device, s.seed, bf16=s.precision == "bf16")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["image_status"] == OK
        img = np.zeros((len(ok), self.image.dim), dtype=np.float32)
        if ok.any():
            img[ok] = self.image.encode(batch["pixels"][ok])
        return {"item_id": batch["item_id"], "txt_emb": self.text.encode(batch["input_ids"], batch["attention_mask"]),
                "img_emb": img, "image_status": batch["image_status"], "title_cut": batch["title_cut"]}


def _shard_table(parts: list[dict[str, np.ndarray]]) -> pa.Table:
    cols = {k: np.concatenate([p[k] for p in parts])
            for k in ("item_id", "txt_emb", "img_emb", "image_status", "title_cut")}
    order = np.argsort(cols["item_id"], kind="stable")
    return pa.table({"item_id": pa.array(cols["item_id"][order].astype(np.int64)),
                     "txt_emb": list_array(cols["txt_emb"][order].astype(np.float32), pa.float32()),
                     "img_emb": list_array(cols["img_emb"][order].astype(np.float32), pa.float32()),
                     "image_missing": pa.array(cols["image_status"][order] != OK),
                     "image_status": pa.array(cols["image_status"][order].astype(np.int8)),
                     "title_cut": pa.array(cols["title_cut"][order].astype(bool))})


def _saved_settings(meta: Path) -> dict[str, Any] | None:
    """The settings a parts folder's shards were made with; None when unreadable (written in place and cut short
    by a kill before that write became atomic, or edited by hand): other settings, which --overwrite replaces."""
    try:
        return json.loads(meta.read_text())
    except ValueError:
        return None


def _settings_difference(saved: dict[str, Any] | None, now: dict[str, Any]) -> tuple[str, bool]:
    """What differs between a parts folder's settings and this run's, for the refusal: the first setting that
    does, or that another version of `mmctr embed` made the folder; and whether a re-run with the folder's
    settings could continue it (not another version's: no command line gives its settings)."""
    if not isinstance(saved, dict):  # no command line matches settings nobody can read
        return ": unreadable", False
    missing = [k for k in now if k not in saved]
    if missing:  # its shards lack what this version writes (title_cut): no command line continues them
        return f": made by an earlier version of `mmctr embed`, which did not record {missing[0]}", False
    unknown = [k for k in saved if k not in now]
    if unknown:
        return f": made by another version of `mmctr embed`, which records {unknown[0]}", False
    key = next((k for k in now if saved[k] != now[k]), None)
    if key in ("data", "models"):
        return f": {'the items or covers' if key == 'data' else 'the model files'} changed since", True
    return (f": {key} {saved[key]!r} there, {now[key]!r} now" if key else ""), True


class ShardStore:
    """``X.parquet.parts/``: settings.json and one ``shard_NNNNN.parquet`` per completed shard."""

    def __init__(self, out: Path, settings: EmbedSettings, overwrite: bool) -> None:
        self.dir, self.settings = out.with_name(out.name + ".parts"), settings
        meta = self.dir / "settings.json"
        saved = _saved_settings(meta) if meta.is_file() else None
        same = saved == asdict(settings)
        if self.dir.exists() and overwrite and not same:
            shutil.rmtree(self.dir)  # shards of other settings; those of these settings are these vectors: kept, so
            # that an --overwrite interrupted (the earlier OUT still there) continues with the same command
        elif meta.is_file() and not same:
            detail, resumable = _settings_difference(saved, asdict(settings))
            raise OutputExistsError(
                f"{self.dir}: holds shards of a run with other settings ({meta}{detail}); " + (
                    "re-run with those settings to resume, or pass --overwrite to start again" if resumable else
                    "pass --overwrite to start again"))

    def open(self) -> None:
        """Create the folder with its settings, once encoding starts (a run refused before it leaves none)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / ".settings.json.partial"  # a kill while writing leaves the old file, or this one
        tmp.write_text(json_text(asdict(self.settings), indent=2) + "\n")
        os.replace(tmp, self.dir / "settings.json")

    def path(self, shard: int) -> Path:
        return self.dir / f"shard_{shard:05d}.parquet"

    def done(self, shard: int) -> bool:
        """Whether the shard is written, its footer readable: one cut short or damaged since (a full disk, a copy)
        is deleted with a warning and encoded again (it failed every run in the end's assembly)."""
        path = self.path(shard)
        if not path.is_file():
            return False
        try:
            pq.read_metadata(path)
        except pa.ArrowInvalid as err:  # its bytes: no footer, a footer cut short
            log.warning("%s: not a readable parquet file (%s): deleted, its items are encoded again", path,
                        first_line(err))
            path.unlink()
            return False
        except OSError as err:  # the file system's (no permission, an I/O error): the shard is kept
            raise DataError(f"{path}: cannot be read ({first_line(err)})") from None
        return True

    def write(self, shard: int, table: pa.Table) -> None:
        tmp = self.dir / f".shard_{shard:05d}.partial"
        pq.write_table(table, tmp)
        os.replace(tmp, self.path(shard))


def _models_fingerprint(text_dir: str, image_model: str) -> str:
    """What the encoders were loaded from: the name, size and modification time of every file of the text model's
    folder and of the image weights (random weights: the architecture name alone, already in the settings)."""
    files = sorted(p for p in Path(text_dir).rglob("*") if p.is_file())
    _, config, weights = parse_image_model(image_model)  # a model-config JSON is read as a file too
    digest = hashlib.sha1()
    for path in [*files, *(p for p in (config, weights) if p is not None)]:
        info = path.stat()
        digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _cover_stats(items: pa.Table, lay: Layout) -> list[tuple[int, int] | None]:
    """(size, modification time) of each item's cover, None where it is missing: one stat per cover."""
    out: list[tuple[int, int] | None] = []
    for item in items.column("item_id").to_pylist():
        try:
            found = lay.image(item).stat()
        except OSError:  # missing (or unreadable: decoding will say so)
            out.append(None)
            continue
        out.append((found.st_size, found.st_mtime_ns) if stat.S_ISREG(found.st_mode) else None)
    return out


def _fingerprint(items: pa.Table, lay: Layout, covers: list[tuple[int, int] | None]) -> str:
    """What the shards were computed from: the item ids, their titles, the cover folder and each cover's size and
    time (covers fixed in place after an interrupted run are encoded again, with --overwrite too)."""
    digest = hashlib.sha1(items.column("item_id").to_numpy().tobytes())
    for title in items.column("item_title").to_pylist():
        digest.update(b"\0" + ("" if title is None else str(title)).encode())
    digest.update(str(lay.images_dir.resolve()).encode())
    digest.update(repr(covers).encode())
    return digest.hexdigest()[:16]


def resolve_precision(precision: str, gpus_per_actor: float) -> str:
    """``--precision`` → ``bf16`` or ``fp32`` (``auto``: bf16 on GPU actors, fp32 on CPU ones)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not gpus_per_actor:
        raise ConfigError("--precision bf16 needs GPU actors (--gpus-per-actor); the CPU actors encode in fp32")
    return precision if precision != "auto" else "bf16" if gpus_per_actor else "fp32"


def resolved_image_model(image_model: str) -> str:
    """``ARCH[:WEIGHTS]`` with absolute paths (the model-config JSON, the weights), as the shards' settings keep it
    and the actors, whose working directory may be another, load it."""
    arch, config, weights = parse_image_model(image_model)
    return f"{config or arch}{f':{weights}' if weights else ''}"


def _read_items(lay: Layout) -> pa.Table:
    if not lay.item_feature.is_file():
        raise DataError(lay.missing(lay.item_feature) if lay.not_a_data_dir() else
                        f"{lay.item_feature}: missing file (embed reads item_id and item_title from it)")
    names = open_parquet(lay.item_feature, "item_feature.parquet of the challenge layout").schema_arrow.names
    if "item_title" not in names or "item_id" not in names:
        raise DataError(f"{lay.item_feature}: missing column {'item_id' if 'item_id' not in names else 'item_title'}"
                        f" (embed reads item_id and item_title)")
    table = pq.read_table(lay.item_feature, columns=["item_id", "item_title"])
    column = table.column("item_id")
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise DataError(f"{lay.item_feature}: column item_id: null at row {row}; expected unique item ids 1..N")
    if not pa.types.is_integer(column.type):
        raise DataError(f"{lay.item_feature}: column item_id: type {column.type}; expected integer item ids 1..N")
    titles = table.column("item_title")
    if not (pa.types.is_string(titles.type) or pa.types.is_large_string(titles.type) or pa.types.is_null(titles.type)):
        # binary titles were encoded as the text "b'...'" without a word (or failed, after encoding, with Arrow's
        # "Invalid UTF8 payload" traceback), as validate names the column
        raise DataError(f"{lay.item_feature}: column item_title: type {titles.type}; expected UTF-8 text (string), "
                        f"as `mmctr validate` says: cast it to string where the file is made")
    table = table.set_column(0, "item_id", column.cast(pa.int64())).sort_by("item_id")
    ids = table.column("item_id").to_numpy()
    if len(ids) and (ids[0] < 1 or (np.diff(ids) == 0).any()):
        bad = ids[0] if ids[0] < 1 else ids[1:][np.diff(ids) == 0][0]
        raise DataError(f"{lay.item_feature}: column item_id: value {bad} is {'below 1' if bad < 1 else 'repeated'}"
                        f"; expected unique item ids 1..N")
    return table


class _Progress:
    """A progress line every ``every_s`` seconds. Its rate, and the ETA from it, are counted from the first result
    on, once there is a second: before it the actors start and load their models (tens of seconds), which
    made the first lines' ETA several times too long."""

    def __init__(self, total: int, progress: Callable[[str], None], every_s: float = 10.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.progress, self.every_s, self.clock = total, progress, every_s, clock
        self.t0 = self.last = clock()
        self.done = self.first_rows = 0
        self.first: float | None = None

    def add(self, rows: int) -> None:
        self.done += rows
        now = self.clock()
        if self.first is None:
            self.first = now - self.t0  # actors started, models loaded, the first block encoded
            self.first_rows = self.done
        if now - self.last >= self.every_s:
            self.last = now
            steady = now - self.t0 - self.first
            rate = ((self.done - self.first_rows) / steady if self.done > self.first_rows and steady > 0
                    else self.done / max(now - self.t0, 1e-9))
            self.progress(f"embed: {self.done}/{self.total} items, {rate:.1f} items/s, "
                          f"ETA {(self.total - self.done) / max(rate, 1e-9):.0f} s")


EMBED_COLUMNS = {"item_id", "txt_emb", "img_emb", "image_status"}  # of the table `mmctr embed` writes


def check_out(out: Path, overwrite: bool) -> None:
    """``out`` must name a parquet file that is absent, or an embeddings table of `mmctr embed` to replace with
    ``overwrite``: never an input (the data set's item_feature.parquet, which it read before it replaced it)."""
    check_table_output(out, "embed", "an embeddings table", EMBED_COLUMNS, overwrite)


def run_embed(data_dir: str | Path, out: str | Path, text_model: str | Path, image_model: str, pooling: str = "auto",
              gpus_per_actor: float = 0.0, actors: int = 1, batch_size: int = 64, max_length: int = 32,
              shard_items: int = 4_096, seed: int = 0, cpus_per_actor: float = 1.0, overwrite: bool = False,
              max_bad_covers: float = MAX_BAD_COVERS, progress: Callable[[str], None] = log.info,
              start_ray: Callable[[], None] | None = None, keep_freed_memory: bool = True,
              precision: str = "auto") -> dict[str, Any]:
    """Embed every item of ``data_dir`` into ``out``; return the summary (also written as ``X.embed.json``).

    ``start_ray`` is called once the inputs are checked and only when a shard is left to encode (with
    ``overwrite``, before the earlier run's shards are removed): the CLI starts its private Ray there, so bad input
    fails at once and a finished embed resumes without Ray.

    Items whose cover is missing or corrupt get a zero image vector and a status; more of them than the share
    ``max_bad_covers`` is an error (a wrong cover folder, a broken download): missing files are counted before
    any encoding, corrupt ones when the shards are assembled (the shards stay, so a re-run with a higher limit
    encodes nothing again).

    ``precision``: ``bf16`` (autocast on the actors' GPUs), ``fp32``, or ``auto`` (bf16 on GPU actors, else fp32); it
    is one of the shards' settings, so a re-run on other devices does not mix bf16 and fp32 vectors in one table.

    ``keep_freed_memory`` (``--no-keep-freed-memory`` turns it off) starts CPU actors and their decode tasks with
    the malloc tunables of :mod:`mmctr_ray.host_malloc`, as training's ``train.keep_freed_memory``.
    """
    out, lay = Path(out).resolve(), Layout(Path(data_dir).resolve())
    check_out(out, overwrite)
    text_dir = str(check_model_dir(text_model))
    normalize = resolve_normalize(text_dir, pooling)
    pooling = resolve_pooling(text_dir, pooling)
    for name, value, low in (("--actors", actors, 1), ("--batch-size", batch_size, 1), ("--max-length", max_length, 2),
                             ("--shard-items", shard_items, 1)):
        if value < low:
            raise ConfigError(f"{name}={value}: expected an integer >= {low}")
    check_max_length(text_dir, max_length)
    precision = resolve_precision(precision, gpus_per_actor)
    check_image_model(image_model)  # weights that do not fit the architecture fail here, as one line
    image_model = resolved_image_model(image_model)  # one spelling: RN50:w.pt and RN50:./w.pt resume alike
    load_tokenizer(text_dir)  # a broken tokenizer fails here, as one line, not inside a task
    check_text_model(text_dir, pooling)  # so do weights cut short: loaded once here, not in each actor
    if not 0 <= max_bad_covers <= 1:
        raise ConfigError(f"--max-bad-covers={max_bad_covers}: expected a share in [0, 1]")
    items = _read_items(lay)
    if not items.num_rows:
        raise DataError(f"{lay.item_feature}: no items to embed")
    covers = _cover_stats(items, lay)
    settings = EmbedSettings(text_dir, image_model, pooling, max_length, seed, shard_items,
                             _fingerprint(items, lay, covers),
                             _models_fingerprint(text_dir, image_model), normalize, precision,
                             json.dumps(preprocessing(image_model, warn=True), sort_keys=True))
    absent = [i for i, cover in zip(items.column("item_id").to_pylist(), covers) if cover is None]
    _check_bad_covers(len(absent), len(items), max_bad_covers, "missing", lay.image(absent[0]) if absent else None)

    def ray_ready() -> None:  # Ray up, and an actor pool it can hold beside the decode tasks (else it waits for good)
        if start_ray is not None:
            start_ray()
        check_actors(actors, gpus_per_actor, cpus_per_actor, cpus_flag=True)

    if overwrite:  # the shards of an earlier run go next: refuse such a pool before that
        ray_ready()
    store = ShardStore(out, settings, overwrite)
    n = len(items)
    n_shards = -(-n // shard_items)
    pending = [s for s in range(n_shards) if not store.done(s)]
    if len(pending) < n_shards:
        progress(f"embed: resuming; {n_shards - len(pending)} of {n_shards} shards already in {store.dir}")
    t0 = time.perf_counter()
    timing: dict[str, Any] = {"encoded": 0}
    if pending:
        if not overwrite:  # with it, checked above
            ray_ready()
        store.open()
        timing = _encode_shards(items, pending, store, settings, lay, gpus_per_actor, actors, batch_size,
                                cpus_per_actor, progress,
                                actor_options(keep_freed_memory, gpus_per_actor > 0, OFFLINE_ENV))
    seconds = time.perf_counter() - t0
    summary = _assemble(out, store, n_shards, settings, items, seconds, timing, lay, max_bad_covers)
    progress(f"embed: wrote {out}: {n} items ({summary['image_missing']} without a usable cover) in {seconds:.1f} s")
    return summary


# The models load from local paths only; in the processes that load them, the Hugging Face libraries are told so
# too, so that nothing a model's files name (a remote tokenizer, a hub text tower) is looked up on the hub.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _encode_shards(items: pa.Table, pending: list[int], store: ShardStore, s: EmbedSettings, lay: Layout,
                   gpus_per_actor: float, actors: int, batch_size: int, cpus_per_actor: float,
                   progress: Callable[[str], None], options: dict[str, Any]) -> dict[str, Any]:
    """Run the pipeline over the ``pending`` shards, writing each as it completes; return rows and timings.
    ``options``: :func:`actor_options` (with :data:`OFFLINE_ENV`) of the decode tasks and the encoder actors (the
    same on both, or Ray Data would not fuse the decoding into the actors)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    block = max(batch_size, 256)
    slices = [items.slice(start, min(s.shard_items, items.num_rows - start))
              for start in (p * s.shard_items for p in pending)]
    blocks = [t.slice(i, block) for t in slices for i in range(0, t.num_rows, block)]
    ds = ray.data.from_arrow(blocks).map_batches(
        prepare_batch, batch_format="numpy", batch_size=None, num_cpus=1, **options,
        fn_kwargs={"images_dir": str(lay.images_dir), "size": image_size(s.image_model),
                   "text_model": s.text_model, "max_length": s.max_length,
                   **{k: v for k, v in json.loads(s.image_preprocess).items()
                      if k in ("resize_mode", "interpolation")}})  # as the shards' settings record it
    ds = ds.map_batches(Encoder, fn_constructor_kwargs={"settings": asdict(s), "sharers": actors,
                                                        "use_gpu": gpus_per_actor > 0},
                        batch_size=batch_size, batch_format="numpy", num_gpus=gpus_per_actor,
                        num_cpus=0 if gpus_per_actor else cpus_per_actor, compute=ActorPoolStrategy(size=actors),
                        **options)
    expected = {p: t.num_rows for p, t in zip(pending, slices)}
    first_ids = np.array([t.column("item_id")[0].as_py() for t in slices])
    buffers: dict[int, list[dict[str, np.ndarray]]] = {p: [] for p in pending}
    counts = dict.fromkeys(pending, 0)
    fault = int(os.environ.get(FAULT_ENV, "0"))
    meter, written = _Progress(sum(expected.values()), progress), 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        which = np.searchsorted(first_ids, batch["item_id"], side="right") - 1
        for k in np.unique(which):
            shard = pending[k]
            rows = which == k
            buffers[shard].append({c: v[rows] for c, v in batch.items()})
            counts[shard] += int(rows.sum())
            if counts[shard] == expected[shard]:
                store.write(shard, _shard_table(buffers.pop(shard)))
                written += 1
                if fault and written >= fault:
                    os._exit(75)  # a hard stop, as a killed driver would: no clean-up, no final file
        meter.add(len(batch["item_id"]))
    return {"encoded": meter.done, "first_result_seconds": round(meter.first or 0.0, 3)}


def _check_bad_covers(bad: int, total: int, limit: float, what: str, first: Path | None) -> None:
    if bad > limit * total:
        raise DataError(f"{first}: {bad:,} of {total:,} covers {what} (this one first); expected at most "
                        f"--max-bad-covers={limit:g} of them (check the cover folder, or raise the limit)")


def _assemble(out: Path, store: ShardStore, n_shards: int, s: EmbedSettings, items: pa.Table, seconds: float,
              timing: dict[str, Any], lay: Layout, max_bad_covers: float) -> dict[str, Any]:
    ids, n = items.column("item_id").to_numpy(), items.num_rows
    missing = [p for p in range(n_shards) if not store.path(p).is_file()]  # each read below, damage named there
    if missing:
        raise DataError(f"{store.path(missing[0])}: shard missing after the pipeline finished")
    tmp = partial_path(out)
    counts = {"image_missing": 0, "cover_file_missing": 0, "cover_corrupt": 0, "titles_cut": 0}
    first_corrupt = None
    writer = None
    try:
        for p in range(n_shards):
            try:
                table = pq.read_table(store.path(p))
            except (pa.ArrowException, OSError) as err:  # a footer that reads, pages that do not
                raise DataError(f"{store.path(p)}: its data cannot be decoded ({first_line(err)}): a damaged shard; "
                                f"delete it and run the same command again, which encodes its items again") from None
            expected = ids[p * s.shard_items:(p + 1) * s.shard_items]
            if not np.array_equal(table.column("item_id").to_numpy(), expected):
                raise DataError(f"{store.path(p)}: holds {table.num_rows:,} vectors that are not items "
                                f"{expected[0]}..{expected[-1]} of {lay.item_feature} (a shard of other data, or one "
                                f"written twice); delete {store.dir} to embed again")
            status = table.column("image_status").to_numpy()
            counts["image_missing"] += int((status != OK).sum())
            counts["cover_file_missing"] += int((status == MISSING).sum())
            counts["cover_corrupt"] += int((status == CORRUPT).sum())
            counts["titles_cut"] += int(pc.sum(table.column("title_cut")).as_py() or 0)
            if first_corrupt is None and (status == CORRUPT).any():
                first_corrupt = lay.image(int(table.column("item_id")[int(np.argmax(status == CORRUPT))].as_py()))
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        dims = {"text_dim": len(table.column("txt_emb")[0]), "image_dim": len(table.column("img_emb")[0])}
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    try:
        # too many missing files failed before encoding: past the limit now means corrupt ones among them
        _check_bad_covers(counts["image_missing"], n, max_bad_covers, "missing or corrupt", first_corrupt)
    except DataError:
        os.unlink(tmp)
        raise
    if counts["titles_cut"]:
        log.warning("%s of %s titles have more than --max-length %d tokens: their text vectors are of the first %d "
                    "(OUT's title_cut column names them)", f"{counts['titles_cut']:,}", f"{n:,}", s.max_length,
                    s.max_length)
    text = pc.utf8_trim_whitespace(pc.fill_null(items.column("item_title").cast(pa.string()), ""))
    counts["titles_empty"] = int(pc.sum(pc.equal(text, "")).as_py() or 0)
    if counts["titles_empty"]:  # unlike a missing cover, nothing marks them in OUT: they are said here
        first = items.column("item_id")[int(np.argmax(pc.equal(text, "").to_numpy(zero_copy_only=False)))]
        log.warning("%s of %s items have no title (null or blank; first: item %s): each gets the same text vector, "
                    "the model's vector of an empty text", f"{counts['titles_empty']:,}", f"{n:,}", first)
    encoded = timing.pop("encoded")
    summary = {**asdict(s), **dims, "items": n, "titles": titles_fingerprint(items), **counts,
               "encoded_now": encoded, "seconds": round(seconds, 3),
               "items_per_s": round(encoded / seconds, 2) if seconds > 0 and encoded else None, **timing}
    # the table first, then its record (whole, under a temporary name): a kill between them leaves the new vectors
    # beside the old record, which `fuse` refuses for other data; the other way round, the old vectors of other
    # items beside a record of these passed fuse's check
    os.replace(tmp, out)
    write_text(f"{out.with_suffix('')}.embed.json", json_text(summary, indent=2) + "\n")
    shutil.rmtree(store.dir)
    return summary
