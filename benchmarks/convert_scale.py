"""Does `mmctr convert` scale? Time per interaction and driver peak RSS at 1×, 4× and 16× the raw data (by hand).

    .venv/bin/python benchmarks/convert_scale.py --base-interactions 2000000            # 2M, 8M, 32M
    .venv/bin/python benchmarks/convert_scale.py --base-interactions 50000 --shuffle sort --num-cpus 2   # smoke
    .venv/bin/python benchmarks/convert_scale.py --base-interactions 500000 --split-layout parts         # part files
    RAY_ADDRESS=auto .venv/bin/python benchmarks/convert_scale.py --base-interactions 50000000           # cluster

Writes synthetic raw MicroLens files per scale (``user,item,timestamp`` pairs, titles, likes/views; users grow
with the interactions, ~10 interactions each; items fixed) and converts each in a fresh child process, which
times the conversion alone (Ray already started) and reports its own peak RSS (``getrusage(RUSAGE_SELF)``: the
driver, not Ray's workers). Targets (issue 9): time per interaction at 4× and 16× within 1.2× of 1×, and driver
peak RSS within +20% of 1×. Small bases are dominated by fixed start-up costs (Ray Data operators, shuffle
actors), which favours the larger scales; use a base of millions of interactions for a meaningful ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

CHUNK = 1_000_000  # interactions generated and written at a time


def write_raw(root: Path, interactions: int, items: int, seed: int) -> None:
    """MicroLens-style raw files: Zipf-like item popularity, log-normal user activity, timestamps over a year."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    ids = np.arange(1, items + 1)
    pacsv.write_csv(pa.table({"item": ids, "title": [f"video {i} title" for i in ids]}), root / "bench_title_en.csv")
    likes = rng.lognormal(3, 2, items).astype(np.int64)
    lv = "".join(f"{i}\t{a}\t{a * 10 + b}\n" for i, a, b in zip(ids, likes, rng.integers(0, 100, items)))
    (root / "bench_likes_and_views.txt").write_text(lv)
    users = max(1, interactions // 10)
    activity = np.cumsum(rng.lognormal(0, 1, users))
    pop = np.cumsum(1.0 / np.arange(1, items + 1) ** 0.9)
    opts = pacsv.WriteOptions(include_header=True)
    with pacsv.CSVWriter(root / "bench_pairs.csv", pa.schema([("user", pa.int64()), ("item", pa.int64()),
                                                               ("timestamp", pa.int64())]), write_options=opts) as w:
        for lo in range(0, interactions, CHUNK):
            n = min(CHUNK, interactions - lo)
            user = np.searchsorted(activity, rng.random(n) * activity[-1]) + 1
            item = np.searchsorted(pop, rng.random(n) * pop[-1]) + 1
            ts = 1_600_000_000_000 + rng.integers(0, 365 * 86_400_000, n)
            w.write_table(pa.table({"user": user, "item": item, "timestamp": ts}))


class _MemorySampler(threading.Thread):
    """Peak of this process's RSS parts (/proc/self/status, Linux): RssAnon is private memory; RssShmem counts
    object-store pages the driver mapped while reading blocks (Ray's shared memory, bounded by the store)."""

    def __init__(self, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.every, self.peak, self.done = every, {"RssAnon": 0, "RssShmem": 0}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]) // 1024)  # kB → MiB


def child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: convert and print a JSON line of seconds, rows and this process's peak memory."""
    from mmctr_ray.convert.pipeline import run_convert
    from mmctr_ray.convert.raw import RawSpec
    from mmctr_ray.convert.rows import RowSpec
    from mmctr_ray.ray_env import init_ray

    init_ray(args.address, args.num_cpus)
    sampler = _MemorySampler()
    sampler.start()
    t0 = time.perf_counter()
    m = run_convert(RawSpec(Path(args.raw)), args.out, RowSpec(negatives=args.negatives), partitions=args.partitions,
                    shuffle=args.shuffle, progress=lambda msg: None, split_layout=args.split_layout)
    seconds = time.perf_counter() - t0
    sampler.done.set()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB (Linux)
    rows = sum(s["rows"] for s in m["splits"].values())
    print(json.dumps({"seconds": seconds, "interactions": m["interactions"], "rows": rows, "peak_mib": peak,
                      "anon_mib": sampler.peak["RssAnon"], "shmem_mib": sampler.peak["RssShmem"],
                      "partitions": m["partitions"]}))


def run_scale(scale: int, args: argparse.Namespace, workdir: Path) -> dict:
    raw, out = workdir / f"raw_{scale}x", workdir / f"out_{scale}x"
    write_raw(raw, args.base_interactions * scale, args.items, args.seed)
    cmd = [sys.executable, __file__, "--child", "--raw", str(raw), "--out", str(out), "--negatives",
           str(args.negatives), "--shuffle", args.shuffle, "--split-layout", args.split_layout]
    for flag in ("num_cpus", "partitions", "address"):
        if getattr(args, flag) is not None:
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        sys.exit(f"conversion at {scale}x failed:\n{r.stderr[-3000:]}")
    shutil.rmtree(raw)
    shutil.rmtree(out)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-interactions", type=int, default=2_000_000, help="interactions at 1x (default 2M)")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--items", type=int, default=20_000, help="catalogue size, the same at every scale")
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--shuffle", choices=["hash", "sort"], default="hash")
    ap.add_argument("--partitions", type=int, help="default: convert's own (from the raw size)")
    ap.add_argument("--split-layout", choices=["file", "parts"], default="file", help="convert's --split-layout")
    ap.add_argument("--num-cpus", type=int, help="logical CPUs of the private local Ray")
    ap.add_argument("--address", help="Ray cluster to join (a shared path must then hold --workdir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--raw", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    workdir = Path(tempfile.mkdtemp(prefix="convert_bench_", dir=args.workdir))
    print(f"{'scale':>5} {'interactions':>13} {'rows':>12} {'parts':>5} {'seconds':>8} {'us/inter.':>9} "
          f"{'vs 1x':>6} {'driver MiB':>10} {'vs 1x':>6} {'private':>7} {'vs 1x':>6} {'shm':>5}", flush=True)
    base = None
    for scale in sorted(args.scales):
        r = run_scale(scale, args, workdir)
        per = r["seconds"] / r["interactions"] * 1e6
        base = base or (per, r["peak_mib"], r["anon_mib"])
        print(f"{scale:>4}x {r['interactions']:>13,} {r['rows']:>12,} {r['partitions']:>5} {r['seconds']:>8.1f} "
              f"{per:>9.2f} {per / base[0]:>6.2f} {r['peak_mib']:>10.0f} {r['peak_mib'] / base[1]:>6.2f} "
              f"{r['anon_mib']:>7} {r['anon_mib'] / base[2]:>6.2f} {r['shmem_mib']:>5}", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    print("targets: time per interaction within 1.2x of 1x; driver peak RSS within +20% of 1x")


if __name__ == "__main__":
    main()
