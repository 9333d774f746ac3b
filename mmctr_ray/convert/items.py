"""Item-level outputs of ``mmctr convert``, built on the driver (at most ~1.14M items): levels, tags, the item
tables, covers and the id mappings.

The embedding columns the layout requires (``item_emb_d128``, ``txt_emb_BERT``, ``img_emb_CLIPRN50``) are
written as **all-zero placeholders** (raw MicroLens ships no vectors); ``convert.json`` says so, ``mmctr fuse``
refuses them as a source, and ``mmctr embed`` + ``mmctr fuse --source`` produce the real item vectors.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmctr_ray.convert.raw import RawItems
from mmctr_ray.data.writer import ITEM_FEATURE_SCHEMA, ITEM_INFO_SCHEMA, list_array
from mmctr_ray.schema import BERT_DIM, CLIP_DIM, GIVEN_EMB_DIM, LEVELS, TAGS_LEN, Layout

log = logging.getLogger(__name__)

ITEM_CHUNK = 8_192


def levels(values: np.ndarray) -> np.ndarray:
    """Levels 0..LEVELS-1 by decile: level = floor(10 · (number of items with a smaller value) / N).

    Equal values share a level (many items have 0 likes: they all get level 0).
    """
    ranks = np.searchsorted(np.sort(values), values, side="left")
    return (ranks * LEVELS // max(len(values), 1)).astype(np.int64)


def tag_matrix(tags: list[list[str]]) -> tuple[np.ndarray, list[str]]:
    """(N+1, TAGS_LEN) tag ids left-padded with 0 (an item's first TAGS_LEN tags), and the vocabulary.

    Tag ids 1..T in order of decreasing item count, ties by name; ``vocab[id - 1]`` is the tag's text.
    """
    counts = Counter(t for item_tags in tags for t in dict.fromkeys(item_tags))
    vocab = sorted(counts, key=lambda t: (-counts[t], t))
    ids = {t: i + 1 for i, t in enumerate(vocab)}
    out = np.zeros((len(tags) + 1, TAGS_LEN), dtype=np.int64)
    for row, item_tags in enumerate(tags, start=1):
        kept = [ids[t] for t in dict.fromkeys(item_tags)][:TAGS_LEN]
        if kept:
            out[row, TAGS_LEN - len(kept):] = kept
    return out, vocab


def write_item_tables(stage: Layout, items: RawItems, tags: np.ndarray, likes: np.ndarray,
                      views: np.ndarray) -> None:
    """item_info (row 0 = padding) and item_feature (items 1..N), in chunks; embeddings are zero placeholders."""
    n = len(items.raw_ids)
    stage.dataset_dir.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(stage.item_info, ITEM_INFO_SCHEMA) as info, \
            pq.ParquetWriter(stage.item_feature, ITEM_FEATURE_SCHEMA) as feat:
        info.write_table(_info_chunk(np.zeros(1, np.int64), tags))  # the all-zero padding item
        for lo in range(1, n + 1, ITEM_CHUNK):
            ids = np.arange(lo, min(lo + ITEM_CHUNK, n + 1), dtype=np.int64)
            info.write_table(_info_chunk(ids, tags))
            feat.write_table(pa.table({
                "item_id": ids, "item_title": pa.array([items.titles[i - 1] for i in ids], pa.string()),
                "item_tags": list_array(tags[ids], pa.int64()), "likes_level": likes[ids], "views_level": views[ids],
                "txt_emb_BERT": list_array(np.zeros((len(ids), BERT_DIM), np.float32), pa.float32()),
                "img_emb_CLIPRN50": list_array(np.zeros((len(ids), CLIP_DIM), np.float32), pa.float32()),
            }, schema=ITEM_FEATURE_SCHEMA))


def _info_chunk(ids: np.ndarray, tags: np.ndarray) -> pa.Table:
    return pa.table({"item_id": ids, "item_tags": list_array(tags[ids], pa.int64()),
                     "item_emb_d128": list_array(np.zeros((len(ids), GIVEN_EMB_DIM), np.float32), pa.float32())},
                    schema=ITEM_INFO_SCHEMA)


def copy_covers(covers: Path | None, stage: Layout, raw_ids: np.ndarray) -> dict[str, int]:
    """``covers/{raw}.jpg`` → ``item_images/{item_id}.jpg`` (hard links where the filesystem allows)."""
    if covers is None:
        return {"covers": 0, "covers_missing": len(raw_ids)}
    stage.images_dir.mkdir(parents=True, exist_ok=True)
    found, first_absent = 0, None
    for dense, raw in enumerate(raw_ids.tolist(), start=1):
        src = covers / f"{raw}.jpg"
        if not src.is_file():
            first_absent = first_absent or src.name
            continue
        dst = stage.image(dense)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        found += 1
    if first_absent:  # only convert.json's count said so; `mmctr validate` warns of the copy, embed may refuse it
        log.warning("%s: no cover for %d of the %d items (first: %s): `mmctr embed` counts them missing", covers,
                    len(raw_ids) - found, len(raw_ids), first_absent)
    return {"covers": found, "covers_missing": len(raw_ids) - found}


def write_mappings(root: Path, item_raw: np.ndarray, users: np.ndarray, vocab: list[str]) -> None:
    """``mapping/items.parquet`` (item_id, raw_item), ``users.parquet`` (user_id, raw_user), ``tags.parquet``."""
    out = Layout(root).mapping_dir
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"item_id": np.arange(1, len(item_raw) + 1, dtype=np.int64), "raw_item": item_raw}),
                   out / "items.parquet")
    pq.write_table(pa.table({"user_id": np.arange(1, len(users) + 1, dtype=np.int64), "raw_user": users}),
                   out / "users.parquet")
    pq.write_table(pa.table({"tag_id": np.arange(1, len(vocab) + 1, dtype=np.int64),
                             "tag": pa.array(vocab, pa.string())}), out / "tags.parquet")
