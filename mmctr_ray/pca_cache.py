"""Fused item tables shared by the trials of a search: each strategy is fitted once per source, each size is
sliced from that fit.

PCA is exact here (the eigenvectors of the covariance, :func:`mmctr_ray.fusion.fit_fusion`), so the first k axes
of a wider fit are the k-axis fit: the first trial that needs a strategy fits it as wide as the search may ask
(``axes``: the largest PCA size its space can sample; every part at full width without it) and keeps the
projection of every item on those axes (``CACHE/basis-<strategy>-a<axes>-<source>.npz`` and ``.npy``; v2 uses
v4's, whose image part it is); a trial that samples any size up to that takes the table's columns from it
(``CACHE/<key>.parquet``, with the same ``.pca.npz`` and ``.fusion.json`` as `mmctr fuse` of that size writes)
without reading the source again. A basis at least as wide already in the cache serves instead (a full-width one
of an older search, a wider one after the space was narrowed before a --resume); a size wider than the basis
(only a caller with a fixed ``axes`` asks for one) is fitted on its own. Keeping only the searched axes matters
at MicroLens size: a full-width v4 or v3 basis holds every item's projection on 1,792 axes (657 MB for 91,717
items), where a search up to 256 per part reads at most 512.

A source is named by the path, size and modification time of its file and of
item_info: rewritten vectors get new fits. A source too large for an exact fit in memory (``pca: auto`` picks
the incremental fit there) is fitted per size instead.

Each step holds a file lock on its name, so concurrent trials asking for the same basis or table wait and then
read the finished file instead of fitting again. Every file is written under a temporary name and renamed, the
table last, so a file that exists is complete. The lock is an OS file lock (``filelock``): it serialises
processes on one machine and on shared file systems that support locking (NFS v4).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from mmctr_ray.config import FUSION_WIDTHS, FusionConfig
from mmctr_ray.fuse import (ItemSource, fuse_items, fusion_fields, run_fuse, source_file, write_files,
                             write_fused)
from mmctr_ray.fusion import FULL_PCA_MAX_BYTES, PARTS, FittedFusion, input_bytes, part_limits
from mmctr_ray.schema import Layout
from mmctr_ray.storage import json_text


def fusion_key(cfg: FusionConfig, data_dir: str | Path, source: str = "shipped") -> str:
    """The cache key of a table: the strategy, the widths it uses, and the version of the raw vectors."""
    return _table_key(cfg, _source_key(data_dir, source))


def _table_key(cfg: FusionConfig, source: str) -> str:
    sizes = f"t{cfg.text_dim}-i{cfg.image_dim}" if cfg.strategy == "v4" else f"d{cfg.dims}"
    return f"{cfg.strategy}-{sizes}-{source}"


def _source_key(data_dir: str | Path, source: str) -> str:
    """``shipped-<hash>`` or ``file-<hash>``: the hash of the path, size and modification time of the vectors'
    file and of item_info (whose rows are the table's rows), so a source rewritten during a search, or before
    its --resume, gets new fits instead of the tables of the old vectors."""
    files = [source_file(data_dir, source), Layout(data_dir).item_info]
    stamp = [(str(f.resolve()), *((st.st_size, st.st_mtime_ns) if (st := _stat(f)) else ())) for f in files]
    digest = hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:10]
    return f"{'shipped' if source == 'shipped' else 'file'}-{digest}"


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:  # a missing file: the fit that follows names it
        return None


def cached_fusion(cache_dir: str | Path, data_dir: str | Path, cfg: FusionConfig, source: str = "shipped",
                  seed: int = 0, axes: int | None = None) -> tuple[Path, bool]:
    """(path of the fused table for ``cfg``, whether this call wrote it); ``given`` needs no table.

    Args:
        axes: the most axes of each PCA part any call on this cache asks for (the search space's widest size);
            the basis keeps that many. None keeps every axis.
    """
    if cfg.strategy == "given":
        raise ValueError("the given strategy uses item_info's vectors directly: no fused table to cache")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    version = _source_key(data_dir, source)  # once: the table and its basis name the same version of the source
    key = _table_key(cfg, version)
    table = cache / f"{key}.parquet"
    if table.is_file():
        return table, False
    with FileLock(str(cache / f"{key}.lock")):
        if table.is_file():  # written by another trial while this one waited
            return table, False
        t0 = time.perf_counter()
        stem = _basis_stem(cache, BASIS[cfg.strategy], version, axes)
        basis = _basis(stem, data_dir, BASIS[cfg.strategy], source, seed, axes)
        if basis is None or not _covers(basis[0], cfg):
            # too large for an exact fit in memory, or wider than the basis: this size on its own
            run_fuse(data_dir, table, cfg, source=source, seed=seed, overwrite=True, progress=lambda msg: None)
            return table, True
        full, projected, summary = basis
        fitted, columns = full.select(cfg)
        summary = {**{k: v for k, v in summary.items() if k not in FUSION_WIDTHS}, **fusion_fields(cfg),
                   "basis": f"{stem}.npz"}  # the size's own widths, not its basis's
        if fitted.image_fill is None:  # v1 reads no cover flags
            summary["image_missing"] = 0
        vectors = np.ascontiguousarray(projected[columns].T)  # the kept axes' rows only are read from disk
        write_fused(table, vectors, fitted, summary, t0, progress=lambda m: None)
        return table, True


BASIS = {"v1": "v1", "v2": "v4", "v3": "v3", "v4": "v4"}  # v4's image part is v2's fit (v1 reads no covers)


def _basis_stem(cache: Path, strategy: str, version: str, axes: int | None) -> Path:
    """The basis's file stem: ``basis-<strategy>-<source>`` at full width, ``basis-<strategy>-a<axes>-<source>``
    cut to ``axes``. A basis already in the cache that is at least as wide serves instead (the narrowest such):
    a full-width one of a search started before the cut, or a wider cut one when the space was narrowed before a
    --resume. A space widened before a --resume gets a new, wider basis (one more fit)."""
    full = cache / f"basis-{strategy}-{version}"
    if axes is None or full.with_suffix(".json").is_file():
        return full
    wider = []
    for done in cache.glob(f"basis-{strategy}-a*-{version}.json"):  # a finished fit: its summary is written last
        width = done.name[len(f"basis-{strategy}-a"):-len(f"-{version}.json")]
        if width.isdigit() and int(width) >= axes:
            wider.append((int(width), done.with_suffix("")))
    return min(wider)[1] if wider else cache / f"basis-{strategy}-a{axes}-{version}"


def _covers(fitted: FittedFusion, cfg: FusionConfig) -> bool:
    """Whether every part ``cfg`` takes from the basis ``fitted`` has at least the axes ``cfg`` asks for."""
    width = {p.name: p.components.shape[0] for p in fitted.parts}
    return all(getattr(cfg, field) <= width.get(name, 0) for name, _, field in PARTS[cfg.strategy])


def _basis(stem: Path, data_dir: str | Path, strategy: str, source: str, seed: int,
           axes: int | None = None) -> tuple[FittedFusion, np.ndarray, dict[str, Any]] | None:
    """The exact fit of ``strategy`` over ``source`` with each part's first ``axes`` axes (all without it; files
    ``stem``.npz, .npy, .json), every item's projection on them (memory mapped, one row per axis) and the fit's
    summary fields; fitted by the first caller. None when the source is too large for it."""
    paths = {"fit": stem.with_suffix(".npz"), "projected": stem.with_suffix(".npy"),
             "summary": stem.with_suffix(".json")}
    with FileLock(str(stem.with_suffix(".lock"))):
        if not paths["summary"].is_file():
            widths = _full_widths(data_dir, strategy, source)
            if widths is None:
                return None
            if axes is not None:
                widths = {field: min(width, axes) for field, width in widths.items()}
            full = FusionConfig(strategy, dims=widths.get("dims", 1), text_dim=widths.get("text_dim", 1),
                                image_dim=widths.get("image_dim", 1))
            projected, fitted, summary = fuse_items(data_dir, full, source, pca="full", seed=seed,
                                                    progress=lambda msg: None)
            by_axis = np.ascontiguousarray(projected.T)  # (axes, items): a size reads its axes' rows alone
            del projected
            write_files([(paths["fit"], fitted.save), (paths["projected"], lambda p: _save_npy(p, by_axis)),
                         (paths["summary"], lambda p: p.write_text(json_text(summary, indent=2) + "\n"))])
    summary = json.loads(paths["summary"].read_text())
    return FittedFusion.load(paths["fit"]), np.load(paths["projected"], mmap_mode="r", allow_pickle=False), summary


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # an open file: np.save would add .npy to a temporary name
        np.save(f, array)


def _full_widths(data_dir: str | Path, strategy: str, source: str) -> dict[str, int] | None:
    """Each part's full width (``min(items − 1, input width)``), keyed by its FusionConfig field; None when the
    input matrix is over what an exact fit holds in memory."""
    src = ItemSource(Path(data_dir), source, strategy)
    widths = src.input_widths()
    if input_bytes(strategy, src.num_rows, widths) > FULL_PCA_MAX_BYTES:
        return None
    return part_limits(strategy, src.num_rows, widths)
