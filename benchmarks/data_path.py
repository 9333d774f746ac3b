"""The training data path alone, no model: rows/s a worker can be fed, streamed from Ray Data or from the shard
kept on its device (``train.resident``). Run by hand.

    PYTHONPATH=. .venv/bin/python benchmarks/data_path.py --data DIR [--batch 8192] [--epochs 3] [--gpu]
        [--shuffle-buffer 65536] [--num-cpus N]

Streamed: the training loop's own ``_streamed_batches`` (``iter_torch_batches`` on the train split read by
``read_split``, local shuffle buffer, prefetch 2, onto the device, full batches only), every batch touched on
the device (a sum) so a lazy copy is paid for; the first epoch also keeps the shard, as training does.
Resident: ``ResidentShard.batches`` over the rows the first streamed epoch kept. The
figure that matters is the time per batch against the model step's (``benchmarks/model_step.py``): where the
path takes a large share of the step, it bounds the training rate.
"""

from __future__ import annotations

import argparse
import time

import pyarrow.parquet as pq
import torch

from mmctr_ray.config import TrainConfig
from mmctr_ray.features import read_split
from mmctr_ray.ray_env import init_ray
from mmctr_ray.resident import MIB, ShardRecorder
from mmctr_ray.schema import Layout
from mmctr_ray.training import _streamed_batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--shuffle-buffer", type=int, default=65_536)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--num-cpus", type=int, default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    init_ray(num_cpus=args.num_cpus)
    ds = read_split(args.data, "train")
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in Layout(args.data).split_files("train"))  # footers only
    recorder = ShardRecorder(budget=1 << 40, expected_rows=rows)
    cfg = TrainConfig(batch_size=args.batch, shuffle_buffer=args.shuffle_buffer)
    sink = torch.zeros((), device=device)

    def timed(batches) -> tuple[float, int]:
        nonlocal sink
        t0, rows, n = time.perf_counter(), 0, 0
        for n, batch in enumerate(batches, start=1):
            sink = sink + batch["item_seq"][:, -1].sum()
            if n == 1:  # from the second batch on, as the training loop measures
                t0, rows = time.perf_counter(), 0
            else:
                rows += len(batch["label"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return rows / (time.perf_counter() - t0), n

    for epoch in range(1, args.epochs + 1):
        keep = recorder if epoch == 1 else ShardRecorder(0, rows)  # later epochs: full batches only, nothing kept
        rate, n = timed(_streamed_batches(ds, args.batch, device, cfg, epoch, keep))
        print(f"streamed, epoch {epoch}: {rate:>12,.0f} rows/s  {args.batch / rate * 1e3:8.2f} ms/batch  ({n} batches)",
              flush=True)
    shard = recorder.finish()
    for epoch in range(1, args.epochs + 1):
        rate, n = timed(shard.batches(args.batch, shard.steps(args.batch), seed=epoch))
        print(f"resident, epoch {epoch}: {rate:>12,.0f} rows/s  {args.batch / rate * 1e3:8.2f} ms/batch  ({n} batches)",
              flush=True)
    print(f"device {device}; {shard.rows:,} rows kept, {shard.nbytes / MIB:,.0f} MiB")


if __name__ == "__main__":
    main()
