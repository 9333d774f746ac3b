"""Training throughput: `mmctr train` (Ray Train + Ray Data, 1 worker) against a plain PyTorch loop (run by hand).

    .venv/bin/python benchmarks/train_throughput.py [--data DIR | --train-rows 200000 --items 20000]
        [--config configs/baseline.yaml] [--batch 8192] [--gpu] [--epochs 1] [--no-after] [--repeats 1]
        [--set k=v]

Both sides train the same model (default: the challenge baseline) on the same training split with the same
batch size; the plain loop holds the whole split in memory as tensors on the device (the ceiling: no data
pipeline at all). Both are measured the same two ways, each as rows trained over seconds summed over the epochs:

* **steady**: from each epoch's second step on (the rate `mmctr train` logs: its first step waits for Ray Data's
  pipeline to fill, the plain loop's for nothing much);
* **whole epoch**: every step of every epoch, the first included (validation and start-up excluded on both
  sides): what an epoch costs. Start-up is the plain loop's read of the split into tensors and, since 2026-12-01,
  the part of Ray Data's first fetch that a worker's set-up overlaps (``training.EarlyBatches``): the worker's
  first-epoch clock starts after its model is built, and the wait for the first batch that remains is in it.

Neither side takes a warm-up step: each pays its process's first steps in its first epoch. On the 2-core VM the
first step of a process faults in ~1.9 GB of fresh activation memory (~490k page faults, the kernel zeroing the
pages in half of its samples) and took 4.4-5.0 s against ~1.7 s later (2026-12-01); a plain loop warmed up first
(as this benchmark did until then) left that cost out of its own whole-epoch rate but not out of the Ray side's.

The plain loop runs before and after the Ray run and counts both (``--no-after``: before only): this machine's
speed drifts by 10% or more within an hour, and a ceiling from one side only would carry that drift into the
ratio. The local Ray is shut down (its raylet, GCS and idle workers ended) before the loop after it: until
2026-12-05 that loop shared the 2 cores with them and was slower than the one before in 16 of 19 runs, which
lowered the ceiling and raised the ratio. Prints both sides, both ratios, and with more than one epoch each
epoch's rates: the first streams from Ray Data; with ``train.resident`` (by default on CUDA, and on the CPU up to
256 MiB) the later ones train from the shard the worker kept. Last, each epoch of `mmctr train` as measured, and
scaled to MicroLens_1M_x1's 3.6M training rows.

The plain loop runs in a process of its own started with the environment a training worker gets: on the CPU
the malloc tunables of ``train.keep_freed_memory`` (on by default; ``--set train.keep_freed_memory=false``
measures both sides with the allocator as it is).

``--repeats N`` alternates the two N times (plain, Ray, plain, Ray, ..., plain), judges each Ray run against the
plain loops on either side of it, and ends with the median of the N ratios and their range. On the 2-core VM one
run's ratio moved by ±0.09 between runs of the same code (2026-12-05; even the kept-shard epochs, identical work on
both sides, ran 0.85-1.03 of the plain loop): a single run cannot decide a 0.9 target there, a median over five can.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from mmctr_ray.config import load_config
from mmctr_ray.data.synthetic import SynthSpec
from mmctr_ray.data.writer import write_synthetic
from mmctr_ray.features import build_feature_map, load_item_table, to_model_batch
from mmctr_ray.host_malloc import in_worker_process
from mmctr_ray.model import DINModel
from mmctr_ray.schema import Layout
from mmctr_ray.training import make_optimizer, train_step


def plain_loop(data: Path, cfg, device: torch.device, epochs: int) -> list[dict[str, float]]:
    """Per epoch of a single-process loop over the split held on ``device``: rows and seconds, whole and steady
    (from the second step on)."""
    from mmctr_ray.ray_env import cpu_threads

    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(1))  # as a lone training worker on this node sets its own
    torch.manual_seed(cfg.train.seed)
    table = load_item_table(data, cfg.data.item_vector)
    model = DINModel(cfg.model, build_feature_map(data, table), **table.to_torch(device)).to(device)
    optimizer = make_optimizer(model, cfg.train, device)
    tables = model.embedding_tables()
    cols = to_model_batch(pq.read_table(Layout(data).split("train")), cfg.data.max_len)
    tensors = {k: torch.as_tensor(v, device=device) for k, v in cols.items()}
    rows = len(tensors["label"])
    bs = cfg.train.batch_size
    out = []
    for _ in range(epochs):
        sync(device)
        start = time.perf_counter()
        order = torch.randperm(rows, device=device)
        steps = 0
        for lo in range(0, rows - bs + 1, bs):
            if steps == 1:  # the steady clock starts at the second step, as the worker's does
                sync(device)
                second = time.perf_counter()
            idx = order[lo:lo + bs]
            train_step(model, {k: v[idx] for k, v in tensors.items()}, optimizer, tables, cfg.train, device)
            steps += 1
        sync(device)
        end = time.perf_counter()
        out.append({"rows": steps * bs, "seconds": end - start, "steady_rows": (steps - 1) * bs,
                    "steady_seconds": end - second})
    return out


def plain_loop_process(data: Path, cfg, device: torch.device, epochs: int) -> list[dict[str, float]]:
    """:func:`plain_loop` in a new process started with the environment a training worker on ``device`` gets."""
    return in_worker_process(plain_loop, (data, cfg, device, epochs), cfg.train.keep_freed_memory,
                             device.type == "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(epochs: list[dict[str, float]], steady: bool) -> float:
    """Rows over seconds, summed over the epochs (not a mean of per-epoch rates)."""
    key = "steady_" if steady else ""
    return sum(e[f"{key}rows"] for e in epochs) / sum(e[f"{key}seconds"] for e in epochs)


def ray_train(data: Path, cfg, gpu: bool, run: Path, num_cpus: int | None) -> tuple[list[dict], dict]:
    """Per epoch of `mmctr train` (1 worker), from its metrics.jsonl: rows and seconds, whole and steady. The local
    Ray is shut down before it returns, its processes ended: the plain loop after it gets the machine Ray's had."""
    from mmctr_ray.ray_env import init_ray, stop_ray
    from mmctr_ray.train_driver import run_training

    init_ray(num_cpus=num_cpus)  # as `mmctr train`: runs on it drop the placement-group cleaner
    try:
        summary = run_training(data, str(run), cfg, workers=1, gpus_per_worker=1.0 if gpu else 0.0)
    finally:
        stop_ray()
    epochs = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        epochs.append({"rows": r["steps"] * cfg.train.batch_size, "seconds": r["epoch_seconds"],
                       "steady_rows": (r["steps"] - 1) * cfg.train.batch_size,
                       "steady_seconds": r["steady_seconds"] or float("nan"),  # the worker's own clock
                       "resident": r.get("resident", False)})
    return epochs, summary


def report(ray: list[dict], before: list[dict], after: list[dict], summary: dict) -> tuple[float, float]:
    """Print one Ray run against the plain loops beside it; its (steady, whole-epoch) ratios."""
    plain = before + after  # the ceiling, from both sides of the Ray run: a machine whose speed drifts moves both
    print(f"{'':36}{'steady':>12}{'whole epoch':>14}")
    for name, epochs in (("plain PyTorch loop (data resident)", plain), ("mmctr train (Ray Train + Ray Data)", ray)):
        print(f"{name + ':':36}{rate(epochs, True):>12,.0f}{rate(epochs, False):>14,.0f}")
    if after:
        print(f"  plain loop before / after Ray: steady {rate(before, True):,.0f} / {rate(after, True):,.0f}, "
              f"whole epoch {rate(before, False):,.0f} / {rate(after, False):,.0f}")
    ratios = rate(ray, True) / rate(plain, True), rate(ray, False) / rate(plain, False)
    print(f"{'ratio Ray / plain:':36}{ratios[0]:>12.3f}{ratios[1]:>14.3f}")
    if len(ray) > 1:
        per_epoch = [[b, *([a] if after else [])] for b, a in zip(before, after or before)]
        for e, (mine, base) in enumerate(zip(ray, per_epoch), start=1):
            steady, whole = rate([mine], True) / rate(base, True), rate([mine], False) / rate(base, False)
            print(f"epoch {e} ({'resident' if mine['resident'] else 'streamed'}): Ray {rate([mine], True):,.0f} / "
                  f"{rate([mine], False):,.0f}, plain {rate(base, True):,.0f} / {rate(base, False):,.0f}, "
                  f"ratio {steady:.3f} / {whole:.3f} (steady / whole epoch)")
        kept = [(m, b) for m, b in zip(ray, per_epoch) if m["resident"]]
        if kept:
            mine, base = [m for m, _ in kept], [x for _, b in kept for x in b]
            print(f"{'epochs from the kept shard:':36}{rate(mine, True):>12,.0f}{rate(mine, False):>14,.0f}"
                  f"  ratio {rate(mine, True) / rate(base, True):.3f} / {rate(mine, False) / rate(base, False):.3f}")
    print(f"best valid AUC over {summary['epochs']} epoch(s): {summary['best_valid_auc']:.4f} (epoch "
          f"{summary['best_epoch']}); "
          f"wall {summary['wall_seconds']:.0f}s")
    # measured, each epoch of mmctr train as it ran (its first streamed, the others from the kept shard where
    # train.resident kept one), and at that epoch's whole-epoch rate for the 3.6M rows of MicroLens_1M_x1's train split
    print("mmctr train epochs (training, validation excluded): " + "; ".join(
        f"{e} {'resident' if m['resident'] else 'streamed'} {m['seconds']:.1f}s for {m['rows']:,} rows "
        f"(3.6M rows: {3.6e6 * m['seconds'] / m['rows']:,.1f}s)" for e, m in enumerate(ray, start=1)))
    return ratios


def summarize(ratios: list[tuple[float, float]]) -> str:
    """The median and range of the repeats' (steady, whole-epoch) ratios, as printed."""
    parts = []
    for i, name in enumerate(("steady", "whole epoch")):
        xs = [r[i] for r in ratios]
        parts.append(f"{name} {statistics.median(xs):.3f} (range {min(xs):.3f}-{max(xs):.3f})")
    return f"median ratio Ray / plain over {len(ratios)} repeats: " + ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="existing data directory (default: generate one)")
    ap.add_argument("--train-rows", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--config", type=Path, default=Path("configs/baseline.yaml"))
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--gpu", action="store_true", help="train on CUDA (plain loop and the Ray worker)")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--no-after", action="store_true",
                    help="run the plain loop before the Ray run only (default: before and after, both counted)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="alternate plain loop and Ray run this many times; report the median ratio (default 1)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    work = Path(tempfile.mkdtemp(prefix="train_bench_"))
    data = args.data
    if data is None:
        data = work / "data"
        write_synthetic(data, SynthSpec(users=max(1000, args.train_rows // 20), items=args.items,
                                        train_rows=args.train_rows, valid_rows=10_000, test_rows=1_000,
                                        tags=max(600, args.items // 8), topics=64, image_size=0),
                        progress=lambda m: None)
    cfg = load_config(args.config, [f"train.batch_size={args.batch}", f"train.epochs={args.epochs}",
                                    "train.patience=100", *args.overrides])
    device = torch.device("cuda" if args.gpu else "cpu")
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in Layout(data).split_files("train"))
    print(f"device {device}, model {cfg.name}, batch {cfg.train.batch_size}, "
          f"{rows:,} train rows, {args.epochs} epoch(s); samples/s = rows / seconds over the epochs", flush=True)
    ratios = []
    before = plain_loop_process(data, cfg, device, args.epochs)
    for i in range(args.repeats):
        ray, summary = ray_train(data, cfg, args.gpu, work / f"run{i}", args.num_cpus)
        # with --no-after the next repeat's plain loop still runs (it is that repeat's "before"); the last has none
        last = i == args.repeats - 1
        after = [] if args.no_after and last else plain_loop_process(data, cfg, device, args.epochs)
        if args.repeats > 1:
            print(f"repeat {i + 1} of {args.repeats}")
        ratios.append(report(ray, before, [] if args.no_after else after, summary))
        before = after
        print(flush=True)
    if args.repeats > 1:
        print(summarize(ratios))


if __name__ == "__main__":
    main()
