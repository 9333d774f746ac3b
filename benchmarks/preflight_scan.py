"""The page scan `mmctr train` runs on its driver before Ray starts (``preflight.scan_part``): seconds and peak
memory for one split of the challenge's size. Run by hand.

    PYTHONPATH=. .venv/bin/python benchmarks/preflight_scan.py [--rows 3600000] [--real-mean 8] [--repeats 3]

Writes a split in the challenge layout (histories of 100 ids, left-padded, a geometric number of real ids with
mean ``--real-mean``: MicroLens' histories average ~8; row groups of 131,072 rows) to a temporary folder, then
times ``scan_part`` over it (labels too, as for train and valid) and reports this process's peak RSS (the split is
written by another).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmctr_ray.preflight import scan_part
from mmctr_ray.schema import SEQ_LEN

def write_split(path: Path, rows: int, real_mean: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, 1 << 20):  # in chunks: the ids of 3.6M full histories are 2.9 GB at once
        n = min(1 << 20, rows - start)
        real = np.minimum(rng.geometric(1 / real_mean, size=n), SEQ_LEN)
        ids = rng.integers(1, 91_000, size=(n, SEQ_LEN))
        ids[np.arange(SEQ_LEN)[None, :] < (SEQ_LEN - real)[:, None]] = 0
        seq = pa.ListArray.from_arrays(pa.array(np.arange(0, n * SEQ_LEN + 1, SEQ_LEN, dtype=np.int32)),
                                       pa.array(ids.ravel()))
        table = pa.table({"user_id": rng.integers(1, 1_000_000, n), "item_seq": seq,
                          "item_id": rng.integers(1, 91_000, n), "likes_level": rng.integers(0, 10, n),
                          "views_level": rng.integers(0, 10, n),
                          "label": rng.integers(0, 2, n).astype(np.float32)})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=1 << 17)
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=3_600_000)
    ap.add_argument("--real-mean", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mmctr-scan-") as tmp:
        path = Path(tmp) / "train.parquet"
        t0 = time.perf_counter()
        # written by another process: this one's peak RSS is then the scan's (and the imports')
        writer = multiprocessing.get_context("spawn").Process(target=write_split,
                                                              args=(path, args.rows, args.real_mean))
        writer.start()
        writer.join()
        print(f"wrote {args.rows:,} rows ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            scan_part(pq.ParquetFile(path), path, True, "")
            seconds.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"scan_part: {', '.join(f'{s:.2f}' for s in seconds)} s (median {np.median(seconds):.2f} s, "
          f"{args.rows / np.median(seconds) / 1e6:.2f}M rows/s); peak RSS {peak:.0f} MiB ({before:.0f} MiB "
          f"before the scan)")

if __name__ == "__main__":
    main()
