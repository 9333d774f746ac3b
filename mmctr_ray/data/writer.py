"""Write a synthetic world to disk in the exact challenge layout, in chunks, atomically.

Everything is written under a staging folder inside ``out`` and moved into place only when complete, so an
interrupted run never leaves files that look finished; existing data is replaced only with ``overwrite``.
Memory is bounded by ``spec.chunk_rows`` rows and a fixed item chunk, whatever the train split's size; the valid
and test splits also keep each row's probability and label (16 bytes a row) for the oracle's AUC.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmctr_ray.data.modalities import GIVEN, IMAGE, TEXT, ItemRenderer
from mmctr_ray.data.synthetic import SynthSpec, World, rng_for
from mmctr_ray.errors import OutputExistsError  # re-exported
from mmctr_ray.schema import DATASET_NAME, SEQ_LEN, SPLITS, SYNTH_STAGING, Layout
from mmctr_ray.storage import json_text

log = logging.getLogger(__name__)

ITEM_CHUNK = 8_192
STAGING = SYNTH_STAGING
SPLIT_STREAM = {"train": 10, "valid": 11, "test": 12}
GENERATOR_VERSION = 2


def list_array(mat: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """(n, w) matrix → list<value_type> array of n lists of width w, without per-row Python."""
    n, w = mat.shape
    offsets = pa.array(np.arange(0, n * w + 1, w, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(mat.ravel(), type=value_type))


SPLIT_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("item_seq", pa.list_(pa.int64())), ("item_id", pa.int64()),
    ("likes_level", pa.int64()), ("views_level", pa.int64()), ("label", pa.float64()),
])
ITEM_INFO_SCHEMA = pa.schema([
    ("item_id", pa.int64()), ("item_tags", pa.list_(pa.int64())), ("item_emb_d128", pa.list_(pa.float32())),
])
ITEM_FEATURE_SCHEMA = pa.schema([
    ("item_id", pa.int64()), ("item_title", pa.string()), ("item_tags", pa.list_(pa.int64())),
    ("likes_level", pa.int64()), ("views_level", pa.int64()),
    ("txt_emb_BERT", pa.list_(pa.float32())), ("img_emb_CLIPRN50", pa.list_(pa.float32())),
])


def _write_items(world: World, render: ItemRenderer, stage: Layout, image_size: int) -> None:
    n = world.spec.items
    tags = world.item_tags(rng_for(world.spec.seed, 4))
    if image_size:
        stage.images_dir.mkdir(parents=True)
    info = pq.ParquetWriter(stage.item_info, ITEM_INFO_SCHEMA)
    feat = pq.ParquetWriter(stage.item_feature, ITEM_FEATURE_SCHEMA)
    with info, feat:
        pad = {"item_id": pa.array([0], pa.int64()), "item_tags": list_array(np.zeros((1, 5), np.int64), pa.int64()),
               "item_emb_d128": list_array(np.zeros((1, GIVEN.dim), np.float32), pa.float32())}
        info.write_table(pa.table(pad, schema=ITEM_INFO_SCHEMA))  # row 0: the all-zero padding item
        for chunk, lo in enumerate(range(1, n + 1, ITEM_CHUNK)):
            ids = np.arange(lo, min(lo + ITEM_CHUNK, n + 1), dtype=np.int64)
            item_tags = list_array(tags[ids], pa.int64())
            info.write_table(pa.table({
                "item_id": ids, "item_tags": item_tags,
                "item_emb_d128": list_array(render.embeddings(GIVEN, ids, chunk), pa.float32()),
            }, schema=ITEM_INFO_SCHEMA))
            feat.write_table(pa.table({
                "item_id": ids, "item_title": render.titles(ids, chunk), "item_tags": item_tags,
                "likes_level": world.likes_level[ids], "views_level": world.views_level[ids],
                "txt_emb_BERT": list_array(render.embeddings(TEXT, ids, chunk), pa.float32()),
                "img_emb_CLIPRN50": list_array(render.embeddings(IMAGE, ids, chunk), pa.float32()),
            }, schema=ITEM_FEATURE_SCHEMA))
            if image_size:
                for i, jpg in zip(ids, render.covers(ids, chunk, image_size), strict=True):
                    stage.image(int(i)).write_bytes(jpg)


def _write_split(world: World, stage: Layout, split: str, rows: int, length_hist: np.ndarray) -> dict:
    """Write one split; return its label statistics (and oracle AUC for valid/test)."""
    spec = world.spec
    probs, labels, positives = [], [], 0
    with pq.ParquetWriter(stage.split(split), SPLIT_SCHEMA) as writer:
        for chunk, lo in enumerate(range(0, rows, spec.chunk_rows)):
            n = min(spec.chunk_rows, rows - lo)
            rng = rng_for(spec.seed, SPLIT_STREAM[split], chunk)
            r = world.sample_rows(rng, n)
            label = (rng.random(n) < r["prob"]).astype(np.float64)
            positives += int(label.sum())
            length_hist += np.bincount((r["item_seq"] > 0).sum(axis=1), minlength=SEQ_LEN + 1)
            if split != "train":
                probs.append(r["prob"])
                labels.append(label)
            target = r["item_id"]
            writer.write_table(pa.table({
                "user_id": r["user"] + 1, "item_seq": list_array(r["item_seq"], pa.int64()), "item_id": target,
                "likes_level": world.likes_level[target], "views_level": world.views_level[target],
                # the real test split ships a placeholder label; the truth goes to synthetic_truth/
                "label": np.zeros(n) if split == "test" else label,
            }, schema=SPLIT_SCHEMA))
    stats = {"rows": rows, "positive_rate": positives / rows}
    if split != "train":
        from sklearn.metrics import log_loss, roc_auc_score  # here: importing it costs every worker a second

        p, y = np.concatenate(probs), np.concatenate(labels)
        stats["oracle_auc"] = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None
        stats["oracle_logloss"] = float(log_loss(y, p, labels=[0, 1]))
        if split == "test":
            stage.hidden_test_labels.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"ID": np.arange(rows, dtype=np.int64), "label": y, "prob": p}),
                           stage.hidden_test_labels)
    return stats


def _length_stats(hist: np.ndarray) -> dict:
    lengths = np.arange(len(hist))
    cum = np.cumsum(hist)
    total = int(cum[-1])
    return {"min": int(lengths[hist > 0].min()), "median": int(np.searchsorted(cum, total / 2)),
            "mean": float((hist * lengths).sum() / total), "max": int(lengths[hist > 0].max())}


def _publish(stage_root: Path, out: Path) -> None:
    """Move the staged entries into ``out`` (the caller checked ``overwrite``), so that an interruption at any
    point leaves no completion marker next to a mix of old and new entries: the old markers go first, then every
    entry of an older output the new one does not replace (another producer's oracle, test truth, covers or id
    mapping would otherwise survive and be read as this data's), then the new entries, and the new marker last."""
    staged, lay = Layout(stage_root), Layout(out)
    markers = [m.name for m in staged.manifests if m.exists()]
    for old in [*lay.manifests, *(p for p in lay.produced if not (stage_root / p.name).exists())]:
        _remove(old)
    for entry in sorted(stage_root.iterdir(), key=lambda e: e.name in markers):
        _remove(out / entry.name)
        os.replace(entry, out / entry.name)
    stage_root.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def existing_outputs(out: Path) -> list[str]:
    """Names of the entries of an earlier synth or convert output in ``out`` (what a new one would replace)."""
    return [p.name for p in Layout(out).produced if p.exists()]


def write_synthetic(out: str | Path, spec: SynthSpec, overwrite: bool = False,
                    progress: Callable[[str], None] = log.info) -> dict:
    """Generate ``spec`` into ``out`` (the challenge layout) and return the manifest written to synth.json."""
    out = Path(out)
    found = existing_outputs(out)
    if found and not overwrite:
        raise OutputExistsError(f"{out}: already holds {', '.join(found)}; pass --overwrite to replace it")
    with staged(out, STAGING) as stage_root:
        manifest = _generate(Layout(stage_root), spec, progress)
        _publish(stage_root, out)
    return manifest


@contextlib.contextmanager
def staged(out: Path, name: str) -> Iterator[Path]:
    """The folder ``out/name`` a writer builds its output in before :func:`_publish` moves it into ``out``: what an
    interrupted run left there is removed first; on any failure in the block (Ctrl-C, a full disk, bad input) it
    is removed, and so is ``out`` itself when this call made it and it is empty (it was left, to look like a
    start). What was published stays."""
    stage_root = out / name
    if stage_root.exists():
        shutil.rmtree(stage_root)  # leftovers of an interrupted run, never published
    made = not out.exists()
    try:
        yield stage_root
    except BaseException:
        shutil.rmtree(stage_root, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _generate(stage: Layout, spec: SynthSpec, progress: Callable[[str], None]) -> dict:
    """Write every file of ``spec`` into the staging layout ``stage``; return the manifest (written last)."""
    stage.dataset_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    world = World(spec)
    progress(f"world: {spec.users:,} users, {spec.items:,} items, {spec.topics} topics (b0={world.bias:.3f})")
    _write_items(world, ItemRenderer(world), stage, spec.image_size)
    progress(f"items: item_info, item_feature{', covers' if spec.image_size else ''} "
             f"({time.perf_counter() - t0:.1f}s)")
    length_hist = np.zeros(SEQ_LEN + 1, dtype=np.int64)
    splits = {}
    for split in SPLITS:
        splits[split] = _write_split(world, stage, split, getattr(spec, f"{split}_rows"), length_hist)
        progress(f"{split}: {splits[split]['rows']:,} rows, positive rate {splits[split]['positive_rate']:.3f}"
                 f" ({time.perf_counter() - t0:.1f}s)")
    oracle = {s: {k: v for k, v in splits[s].items() if k.startswith("oracle") or k == "rows"}  # rows: whose AUC
              for s in ("valid", "test")}
    stage.oracle.write_text(json_text(oracle, indent=2) + "\n")
    manifest = {"generator": "mmctr_ray.data.synthetic", "version": GENERATOR_VERSION, "dataset": DATASET_NAME,
                "spec": asdict(spec), "bias": world.bias, "splits": splits,
                "history_length": _length_stats(length_hist), "images": bool(spec.image_size)}
    stage.synth_manifest.write_text(json_text(manifest, indent=2) + "\n")  # written last: marks completion
    return manifest
