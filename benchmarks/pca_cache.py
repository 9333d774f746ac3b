"""Time and disk of a search's PCA cache: the fused tables of several sizes, with the basis kept at every axis
or cut to the search's widest size (by hand).

    PYTHONPATH=. .venv/bin/python benchmarks/pca_cache.py --data DATA [--source shipped|FILE] [--axes 256]
        [--modes full,cut]

``DATA`` is a `mmctr synth` output, or a `mmctr convert` output with ``--source`` its `mmctr embed` file;
MicroLens size is
``mmctr synth --out DATA --items 91717 --train-rows 20000 --valid-rows 2000 --test-rows 2000 --images 8``
(the splits do not matter here, the item count does). For each mode the script asks a fresh cache (in a temporary
folder) for the same sequence of tables, as the trials of a search would, and prints the seconds of each, the
total, and the cache's size on disk at the end. ``full`` keeps every axis of each fit (what a search did before
2026-11-30), ``cut`` keeps ``--axes`` (what `mmctr tune` passes: the space's widest size, 256 in
``configs/search_paper.yaml``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mmctr_ray.config import FusionConfig
from mmctr_ray.pca_cache import cached_fusion

# the sizes a search might sample, in the order its trials ask for them: each strategy's first fit, then slices
SIZES = [FusionConfig("v4", text_dim=64, image_dim=64), FusionConfig("v1", dims=128), FusionConfig("v3", dims=32),
         FusionConfig("v4", text_dim=256, image_dim=16), FusionConfig("v2", dims=64), FusionConfig("v3", dims=256),
         FusionConfig("v1", dims=16)]


def label(cfg: FusionConfig) -> str:
    return f"v4 {cfg.text_dim}+{cfg.image_dim}" if cfg.strategy == "v4" else f"{cfg.strategy} {cfg.dims}"


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="data directory (challenge layout) with 768/1024-d vectors")
    parser.add_argument("--source", default="shipped", metavar="shipped|FILE",
                        help="raw vectors: item_feature's (shipped, default) or a file of `mmctr embed`")
    parser.add_argument("--axes", type=int, default=256, help="axes kept by the cut mode (default 256)")
    parser.add_argument("--modes", default="full,cut", help="full, cut or both (default full,cut)")
    parser.add_argument("--tmp", default=None, help="folder for the caches (default: the system's temporary one)")
    args = parser.parse_args()
    rows = {}
    for mode in args.modes.split(","):
        axes = None if mode == "full" else args.axes
        with tempfile.TemporaryDirectory(dir=args.tmp, prefix=f"pca-cache-{mode}-") as tmp:
            cache = Path(tmp)
            start = time.perf_counter()
            for cfg in SIZES:
                t0 = time.perf_counter()
                _, wrote = cached_fusion(cache, args.data, cfg, source=args.source, axes=axes)
                rows.setdefault(label(cfg), {})[mode] = time.perf_counter() - t0
                print(f"{mode}: {label(cfg)}: {rows[label(cfg)][mode]:.1f} s", flush=True)
            rows.setdefault("total", {})[mode] = time.perf_counter() - start
            rows.setdefault("cache on disk (MB)", {})[mode] = disk_bytes(cache) / 1e6
    modes = args.modes.split(",")
    print(f"\n| table | {' | '.join(f'{m} (s)' if m == 'full' else f'{m} to {args.axes} (s)' for m in modes)} |")
    print(f"|---|{'---:|' * len(modes)}")
    for name, by_mode in rows.items():
        print(f"| {name} | {' | '.join(f'{by_mode[m]:.1f}' for m in modes)} |")


if __name__ == "__main__":
    main()
