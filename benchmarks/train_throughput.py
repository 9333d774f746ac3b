"""Training throughput: `mmctr train` (Ray Train + Ray Data, 1 worker) against a plain PyTorch loop (run by hand).

    .venv/bin/python benchmarks/train_throughput.py [--data DIR | --train-rows 200000 --items 20000]
        [--config configs/baseline.yaml] [--batch 8192] [--gpu] [--epochs 1]

Both sides train the same model (default: the challenge baseline) on the same training split with the same
batch size; the plain loop holds the whole split in memory as tensors on the device (the ceiling: no data
pipeline at all). `mmctr train`'s figure is the samples/s of its training epochs as the worker measures them
(reading, batching and the optimisation step; validation and start-up excluded). Prints both and the ratio,
and with more than one epoch each epoch's rate: the first streams from Ray Data; with ``train.resident`` (on
CUDA by default, ``--set train.resident=on`` on CPU) the later ones train from the shard the worker kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from mmctr_ray.config import load_config
from mmctr_ray.data.synthetic import SynthSpec
from mmctr_ray.data.writer import write_synthetic
from mmctr_ray.features import build_feature_map, load_item_table, to_model_batch
from mmctr_ray.model import DINModel
from mmctr_ray.schema import Layout
from mmctr_ray.training import make_optimizer, train_step


def plain_loop(data: Path, cfg, device: torch.device, epochs: int) -> float:
    """samples/s of a single-process loop over the split held on ``device``."""
    torch.manual_seed(cfg.train.seed)
    table = load_item_table(data, cfg.data.item_vector)
    model = DINModel(cfg.model, build_feature_map(data, table), **table.to_torch(device)).to(device)
    optimizer = make_optimizer(model, cfg.train, device)
    tables = model.embedding_tables()
    cols = to_model_batch(pq.read_table(Layout(data).split("train")), cfg.data.max_len)
    tensors = {k: torch.as_tensor(v, device=device) for k, v in cols.items()}
    rows = len(tensors["label"])
    bs = cfg.train.batch_size
    train_step(model, {k: v[:bs] for k, v in tensors.items()}, optimizer, tables, cfg.train, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, seen = time.perf_counter(), 0
    for _ in range(epochs):
        order = torch.randperm(rows, device=device)
        for lo in range(0, rows - bs + 1, bs):
            idx = order[lo:lo + bs]
            train_step(model, {k: v[idx] for k, v in tensors.items()}, optimizer, tables, cfg.train, device)
            seen += bs
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def ray_train(data: Path, cfg, gpu: bool, epochs: int, workdir: Path, num_cpus: int | None) -> tuple[float, dict]:
    from mmctr_ray.ray_env import init_ray
    from mmctr_ray.train_driver import run_training

    init_ray(num_cpus=num_cpus, dashboard=True)  # Train V2's placement-group cleaner needs the state API
    summary = run_training(data, str(workdir / "run"), cfg, workers=1, gpus_per_worker=1.0 if gpu else 0.0)
    rows = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    summary["epoch_rates"] = [r["samples_per_s"] for r in rows]
    summary["resident"] = [r.get("resident", False) for r in rows]
    return float(np.mean(summary["epoch_rates"])), summary


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
    args = ap.parse_args()
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
    plain = plain_loop(data, cfg, device, args.epochs)
    ray_rate, summary = ray_train(data, cfg, args.gpu, args.epochs, work, args.num_cpus)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in Layout(data).split_files("train"))
    print(f"device {device}, {torch.get_num_threads()} threads, model {cfg.name}, batch {args.batch}, "
          f"{rows:,} train rows, {args.epochs} epoch(s)")
    print(f"plain PyTorch loop (data resident): {plain:>12,.0f} samples/s")
    print(f"mmctr train (Ray Train + Ray Data): {ray_rate:>12,.0f} samples/s")
    print(f"ratio Ray / plain:                  {ray_rate / plain:>12.3f}")
    if len(summary["epoch_rates"]) > 1:
        print("mmctr train by epoch:", ", ".join(f"{r:,.0f} ({'resident' if k else 'streamed'})"
                                               for r, k in zip(summary["epoch_rates"], summary["resident"])))
        kept = [r for r, k in zip(summary["epoch_rates"], summary["resident"]) if k]
        if kept:
            print(f"epochs from the kept shard:         {np.mean(kept):>12,.0f} samples/s, "
                  f"ratio {np.mean(kept) / plain:.3f}")
    print(f"valid AUC after {summary['epochs']} epoch(s): {summary['best_valid_auc']:.4f}; "
          f"wall {summary['wall_seconds']:.0f}s; epoch of 3.6M rows at this rate: {3.6e6 / ray_rate:,.0f}s")


if __name__ == "__main__":
    main()
