"""Search throughput of `mmctr tune`: trials per hour and per-trial start-up overhead (run by hand).

    .venv/bin/python benchmarks/tune_throughput.py [--config configs/search_tiny.yaml] [--num-samples 12]
        [--data DIR | --train-rows 20000 --items 1000 --users 2000] [--gpus-per-trial 0.25] [--num-cpus N]
        [--time-budget-s S]

Runs the search on local Ray and prints: wall time, trials per hour, trials at a time, and per trial the
start-up overhead, estimated from Tune's own report times as (time to the first epoch's report) minus (the
median time between later reports): the cost of starting the trial's TorchTrainer, its worker, the Ray Data
pipeline and the model, which a trial pays before it trains. With --time-budget-s no trial starts after S
seconds and the running ones finish (`mmctr tune --time-budget-s`): trials per hour counts every trial that
ran, over the whole wall time, their tail included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from mmctr_ray.data.synthetic import SynthSpec
from mmctr_ray.data.writer import write_synthetic
from mmctr_ray.ray_env import init_ray
from mmctr_ray.schema import Layout
from mmctr_ray.tuning import run_tuning


def trial_overheads(tune_dir: Path) -> list[float]:
    """Per trial with 2+ reports: first report interval minus the median later interval (seconds)."""
    out = []
    for result in (tune_dir / "tune").glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        iters = [r["time_this_iter_s"] for r in rows if "time_this_iter_s" in r]
        if len(iters) >= 2:
            out.append(iters[0] - statistics.median(iters[1:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/search_tiny.yaml"))
    ap.add_argument("--num-samples", type=int, default=12)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--train-rows", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=1_000)
    ap.add_argument("--users", type=int, default=2_000)
    ap.add_argument("--gpus-per-trial", type=float, default=0.0)
    ap.add_argument("--max-concurrent", type=int)
    ap.add_argument("--num-cpus", type=int)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--time-budget-s", type=float, help="start no trial after this many seconds")
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="tune-bench-"))
    data = args.data
    if data is None:
        data = work / "data"
        if not Layout(data).item_info.is_file():
            write_synthetic(data, SynthSpec(users=args.users, items=args.items, train_rows=args.train_rows,
                                            valid_rows=2_000, test_rows=2_000, image_size=0), progress=lambda m: None)
    init_ray(num_cpus=args.num_cpus, dashboard=True)  # Train V2's placement-group cleaner needs the state API
    t0 = time.perf_counter()
    summary = run_tuning(data, work / "tune", args.config, num_samples=args.num_samples,
                         max_concurrent=args.max_concurrent, gpus_per_trial=args.gpus_per_trial, overwrite=True,
                         time_budget_s=args.time_budget_s)
    wall = time.perf_counter() - t0
    overheads = trial_overheads(work / "tune")
    import ray

    print(f"\ntune throughput: {args.config}, {summary['trials']} trials on {data} ({ray.cluster_resources()})")
    print(f"wall {wall:.0f} s; {summary['trials'] / wall * 3600:.1f} trials per hour; "
          f"{summary['completed']} completed, {summary['early-stopped']} early-stopped, {summary['pruned']} pruned, "
          f"{summary['error']} errors; best valid AUC {summary.get('best_valid_auc')}")
    if overheads:
        print(f"per-trial start-up overhead (first report minus a later epoch; only the {len(overheads)} trials "
              f"with 2+ epochs, not those stopped after one): "
              f"median {statistics.median(overheads):.1f} s, min {min(overheads):.1f} s, max {max(overheads):.1f} s")


if __name__ == "__main__":
    main()
