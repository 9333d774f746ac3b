"""Peak memory and speed of `mmctr synth` as the train split grows (run by hand).

    .venv/bin/python benchmarks/synth_memory.py --train-rows 1000000 10000000 [--preset 1m]

Each size runs `mmctr synth` in a fresh process and reads that process's peak RSS (getrusage of the
child), so the figures are the generator's own, not this script's. The issue's target: 10M train rows need
no more than ~2 GB RSS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(train_rows: int, preset: str, images: int, workdir: Path) -> tuple[float, float]:
    """Seconds and peak RSS (GiB) of one `mmctr synth` process: its own rusage (``wait4``), where getrusage's
    RUSAGE_CHILDREN would give the largest peak of every child so far."""
    out = workdir / f"synth_{train_rows}"
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "mmctr_ray.cli", "synth", "--out", str(out), "--preset", preset,
                              "--train-rows", str(train_rows), "--images", str(images)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"mmctr synth --train-rows {train_rows} exited {child.returncode}")
    shutil.rmtree(out)
    return seconds, usage.ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--images", type=int, default=0, help="cover size (0: none; covers do not scale with rows)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="synth_bench_", dir=args.workdir))
    print(f"{'train rows':>12} {'seconds':>8} {'rows/s':>10} {'peak RSS GiB':>13}")
    for rows in sorted(args.train_rows):
        seconds, gib = run_once(rows, args.preset, args.images, workdir)
        print(f"{rows:>12,} {seconds:>8.1f} {rows / seconds:>10,.0f} {gib:>13.2f}", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
