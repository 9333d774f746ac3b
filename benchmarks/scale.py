"""Scale: `mmctr synth` + one training epoch at 1×, 4× and 16× the default train rows (run by hand).

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py [--base-rows 200000] [--factors 1 4 16]
        [--config configs/baseline.yaml] [--workers 1] [--num-cpus N] [--object-store-mib MIB]
        [--set train.batch_size=4096]

Every size runs in fresh processes: `mmctr synth` (wall time; its memory is benchmarks/synth_memory.py's), then
`mmctr train` for one epoch on a private local Ray started by that process, so no Ray worker is reused across
sizes. The training workers record their own peak RSS (the larger of getrusage's high-water mark and VmRSS
sampled every 16 steps, just before the worker drops the object-store pages it has read) in metrics.jsonl
(``worker_peak_rss_mib``, one value per rank); the table shows the largest. Time per row: the epoch's steady
rate as the worker measures it (1 / samples_per_s: reading, batching and the step; start-up and validation
excluded), and the whole epoch (epoch_seconds / the rows of its full batches, which adds the wait for the first
batch). Use a base size
of the default (200k rows) or more for a verdict: a split of a few dozen batches is mostly start-up. Only the
train split grows; users, items, valid and test stay at the synth defaults. The targets, from 1× to the
largest size: time per row within 1.2×, worker peak RSS within +20% (training memory must not grow with the
number of rows: the local shuffle buffer, ``train.shuffle_buffer`` rows, bounds it, so the base size should
already fill that buffer).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmctr_ray.config import load_config
from mmctr_ray.data.synthetic import SynthSpec

TIME_LIMIT, RSS_LIMIT = 1.2, 1.2


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mmctr_ray.cli", *cmd], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd[:1])} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def one_size(rows: int, args: argparse.Namespace, work: Path) -> dict:
    data, run_dir = work / f"data_{rows}", work / f"run_{rows}"
    synth_s = run(["synth", "--out", str(data), "--train-rows", str(rows), "--images", "0"])
    extra = ["--num-cpus", str(args.num_cpus)] if args.num_cpus else []
    extra += ["--object-store-mib", str(args.object_store_mib)] if args.object_store_mib else []
    for override in ["train.epochs=1", "train.patience=100", *args.overrides]:
        extra += ["--set", override]
    train_s = run(["train", "--data", str(data), "--out", str(run_dir), "--config", str(args.config),
                   "--workers", str(args.workers), *extra])
    (epoch,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = epoch["steps"] * load_config(run_dir / "config.yaml").train.batch_size  # full batches only
    shutil.rmtree(data)
    shutil.rmtree(run_dir)
    return {"rows": rows, "synth_s": synth_s,
            "train_s": train_s, "us_per_row": 1e6 / epoch["samples_per_s"],
            "epoch_us_per_row": 1e6 * epoch["epoch_seconds"] / trained,
            "worker_rss_mib": max(epoch["worker_peak_rss_mib"]),
            "worker_anon_mib": max(epoch.get("worker_peak_anon_mib", [float("nan")])),
            "worker_shmem_mib": max(epoch.get("worker_peak_shmem_mib", [float("nan")]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-rows", type=int, default=SynthSpec().train_rows, help="1× (default: synth's default)")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--config", type=Path, default=Path("configs/baseline.yaml"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of each local Ray")
    ap.add_argument("--object-store-mib", type=int, default=None,
                    help="object store of each local Ray (default: Ray's, 30%% of RAM)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scale_bench_", dir=args.workdir))
    print(f"{'factor':>6} {'train rows':>11} {'synth s':>8} {'synth µs/row':>12} {'train s':>8} "
          f"{'train µs/row':>12} {'epoch µs/row':>12} {'worker peak RSS MiB':>19} {'of it: anon':>11} "
          f"{'shmem':>6}", flush=True)
    results = []
    for factor in sorted(args.factors):
        r = one_size(args.base_rows * factor, args, work)
        results.append(r)
        print(f"{factor:>5}× {r['rows']:>11,} {r['synth_s']:>8.1f} {1e6 * r['synth_s'] / r['rows']:>12.1f} "
              f"{r['train_s']:>8.1f} {r['us_per_row']:>12.1f} "
              f"{r['epoch_us_per_row']:>12.1f} {r['worker_rss_mib']:>19.0f} {r['worker_anon_mib']:>11.0f} "
              f"{r['worker_shmem_mib']:>6.0f}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    first, last = results[0], results[-1]
    time_ratio = last["us_per_row"] / first["us_per_row"]
    synth_ratio = (last["synth_s"] / last["rows"]) / (first["synth_s"] / first["rows"])
    rss_ratio = last["worker_rss_mib"] / first["worker_rss_mib"]
    anon_ratio = last["worker_anon_mib"] / first["worker_anon_mib"]
    print(f"{last['rows'] // first['rows']}× the rows: time per row ×{time_ratio:.2f} (target ≤ {TIME_LIMIT}: "
          f"{'met' if time_ratio <= TIME_LIMIT else 'NOT met'}), worker peak RSS ×{rss_ratio:.2f} (target ≤ "
          f"{RSS_LIMIT}: {'met' if rss_ratio <= RSS_LIMIT else 'NOT met'}), of it the worker's own (anonymous) "
          f"memory ×{anon_ratio:.2f}; synth time per row ×{synth_ratio:.2f}")


if __name__ == "__main__":
    main()
