"""Fused item tables shared by the trials of a search: each (strategy, sizes, source) is fitted once.

Trials that sample the same fusion ask :func:`cached_fusion` for it; the first one fits the PCA (``mmctr fuse``
into ``CACHE/<key>.parquet``) while holding a file lock on the key, so a concurrent trial asking for the same
key waits and then reads the finished table instead of fitting again. ``run_fuse`` writes the table last and
atomically, so a table that exists is complete. The lock is an OS file lock (``filelock``): it serialises
processes on one machine and on shared file systems that support locking (NFS v4).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from filelock import FileLock

from mmctr_ray.config import FusionConfig
from mmctr_ray.fuse import run_fuse


def fusion_key(cfg: FusionConfig, source: str = "shipped") -> str:
    """The cache key: the strategy, the widths it uses, and the source of the raw vectors."""
    sizes = f"t{cfg.text_dim}-i{cfg.image_dim}" if cfg.strategy == "v4" else f"d{cfg.dims}"
    src = "shipped" if source == "shipped" else hashlib.sha1(str(Path(source).resolve()).encode()).hexdigest()[:10]
    return f"{cfg.strategy}-{sizes}-{src}"


def cached_fusion(cache_dir: str | Path, data_dir: str | Path, cfg: FusionConfig, source: str = "shipped",
                  seed: int = 0) -> tuple[Path, bool]:
    """(path of the fused table for ``cfg``, whether this call fitted it); ``given`` needs no table."""
    if cfg.strategy == "given":
        raise ValueError("the given strategy uses item_info's vectors directly: no fused table to cache")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = fusion_key(cfg, source)
    table = cache / f"{key}.parquet"
    if table.is_file():
        return table, False
    with FileLock(str(cache / f"{key}.lock")):
        if table.is_file():  # fitted by another trial while this one waited
            return table, False
        run_fuse(data_dir, table, cfg, source=source, seed=seed, overwrite=True, progress=lambda msg: None)
        return table, True
