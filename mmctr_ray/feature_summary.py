"""``mmctr features``: build the item table and stream every split through Ray Data once, and report.

The report is what a user checks before training: item table size and source, and per split the rows,
positive rate, real history lengths after truncation to ``max_len`` and how many rows fill all ``max_len`` slots
(those truncated and those exactly that long: the batches hold the history already cut, so the two are one count).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from mmctr_ray.config import ExperimentConfig
from mmctr_ray.features import history_mask, load_item_table, read_split
from mmctr_ray.schema import SPLITS


def _split_stats(data_dir: Path, split: str, max_len: int) -> dict[str, Any]:
    ds = read_split(data_dir, split, max_len=max_len)
    rows = positives = full = 0
    length_hist = np.zeros(max_len + 1, dtype=np.int64)
    shapes: dict[str, str] = {}
    t0 = time.perf_counter()
    for batch in ds.iter_batches(batch_size=65_536, batch_format="numpy"):
        n = len(batch["label"])
        lengths = history_mask(batch["item_seq"]).sum(axis=1)
        length_hist += np.bincount(lengths, minlength=max_len + 1)
        full += int((lengths == max_len).sum())
        if split != "test":  # the test split's labels are placeholders: null (read as 0) or NaN
            positives += int(batch["label"].sum())
        rows += n
        if not shapes:
            shapes = {k: f"{v.dtype}{list(v.shape[1:])}" for k, v in batch.items()}
    seconds = time.perf_counter() - t0
    cum = np.cumsum(length_hist)
    stats = {
        "rows": rows,
        "columns": shapes,
        "history_len": {"mean": float((length_hist * np.arange(max_len + 1)).sum() / max(rows, 1)),
                        "median": int(np.searchsorted(cum, rows / 2)),
                        "max": int(np.flatnonzero(length_hist)[-1]) if rows else 0},
        "rows_at_max_len": full,
        "rows_per_s": rows / seconds if seconds > 0 else None,
    }
    if split != "test":
        stats["positive_rate"] = positives / max(rows, 1)
    return stats


def summarize_features(data_dir: str | Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """The features report for ``data_dir`` under ``cfg`` (Ray must be initialised)."""
    data_dir = Path(data_dir)
    table = load_item_table(data_dir, cfg.data.item_vector)
    return {
        "data": str(data_dir.resolve()),
        "max_len": cfg.data.max_len,
        "item_table": {"items": table.num_items, "tag_vocab": table.tag_vocab,
                       "tags_per_item": int(table.tags.shape[1]), "vector_dim": table.vector_dim,
                       "source": table.source,
                       "bytes": int(table.tags.nbytes + table.vectors.nbytes)},
        "splits": {split: _split_stats(data_dir, split, cfg.data.max_len) for split in SPLITS},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable table of :func:`summarize_features`'s report."""
    it = summary["item_table"]
    lines = [f"item table: {it['items']:,} items (+ padding row 0), tag vocab {it['tag_vocab']:,}, "
             f"vector dim {it['vector_dim']} from {it['source']['item_vector']} "
             f"({it['bytes'] / 2**20:.1f} MiB resident per worker)",
             f"{'split':<6} {'rows':>11} {'pos rate':>8} {'hist mean':>9} {'median':>6} {'max':>4} "
             f"{'at max_len=' + str(summary['max_len']):>15} {'rows/s':>10}"]
    for split, s in summary["splits"].items():
        pos = f"{s['positive_rate']:.3f}" if "positive_rate" in s else "-"
        rate = f"{s['rows_per_s']:,.0f}" if s["rows_per_s"] else "-"
        h = s["history_len"]
        lines.append(f"{split:<6} {s['rows']:>11,} {pos:>8} {h['mean']:>9.2f} {h['median']:>6} {h['max']:>4} "
                     f"{s['rows_at_max_len']:>15,} {rate:>10}")
    cols = summary["splits"]["train"]["columns"]
    lines.append("model inputs: " + ", ".join(f"{k} {v}" for k, v in cols.items()))
    return "\n".join(lines)
