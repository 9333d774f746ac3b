"""The paper's fusion comparison on synthetic data: valid AUC of one model for given, v1, v2, v3, v4 (by hand).

    .venv/bin/python benchmarks/fusion_table.py [--data DIR] [--config configs/baseline.yaml] [--epochs 4]
        [--dims 128] [--text-dim 64 --image-dim 64] [--strategies given,v1,v2,v3,v4] [--gpus-per-worker 0]
        [--set model.item_vector_rms=0.4 ...]

Without ``--data`` it writes the default ``mmctr synth`` data (200k training rows, no covers) to a temporary
folder. For each strategy it runs ``mmctr fuse`` on the shipped vectors (txt_emb_BERT, img_emb_CLIPRN50) and
``mmctr train`` with the same config and seed, then prints one table: strategy, vector width, explained
variance, best valid AUC and its epoch, and the oracle AUC of the data. ``--epochs`` caps the schedule (early
stopping still applies); runs stay under ``--out`` for ``mmctr report``. Last it prints ``mmctr compare`` of the
runs (the first strategy is the reference): each AUC's standard error and the paired test of each difference.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from mmctr_ray.compare import compare_runs, markdown
from mmctr_ray.config import FusionConfig, load_config
from mmctr_ray.data.synthetic import SynthSpec
from mmctr_ray.data.writer import write_synthetic
from mmctr_ray.fuse import fusion_overrides, run_fuse
from mmctr_ray.ray_env import init_ray
from mmctr_ray.schema import Layout
from mmctr_ray.train_driver import run_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="data directory (default: fresh default synth data)")
    ap.add_argument("--out", type=Path, help="folder for the fused tables and runs (default: a temporary one)")
    ap.add_argument("--config", type=Path, default=Path("configs/baseline.yaml"))
    ap.add_argument("--epochs", type=int, default=4, help="at most this many epochs per run")
    ap.add_argument("--dims", type=int, default=128, help="width of v1, v2, v3")
    ap.add_argument("--text-dim", type=int, default=64, help="text part of v4")
    ap.add_argument("--image-dim", type=int, default=64, help="image part of v4")
    ap.add_argument("--strategies", default="given,v1,v2,v3,v4")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    ap.add_argument("--num-cpus", type=int)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (e.g. model.item_vector_rms=0.4: every table at one scale)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = args.out or Path(tempfile.mkdtemp(prefix="fusion-table-"))
    data = args.data
    if data is None:
        data = out / "data"
        if not Layout(data).item_info.is_file():
            write_synthetic(data, SynthSpec(image_size=0), progress=lambda m: None)
    oracle = json.loads(Layout(data).oracle.read_text())["valid"]["oracle_auc"] if Layout(data).oracle.is_file() \
        else float("nan")
    init_ray(num_cpus=args.num_cpus)  # as `mmctr train`: runs on it drop the placement-group cleaner
    rows = []
    for strategy in args.strategies.split(","):
        fcfg = FusionConfig(strategy, dims=args.dims, text_dim=args.text_dim, image_dim=args.image_dim)
        table = out / f"{strategy}.parquet"
        fsum = run_fuse(data, table, fcfg, overwrite=True)
        cfg = load_config(args.config, [f"train.epochs={args.epochs}", *args.overrides, *fusion_overrides(table)])
        t0 = time.perf_counter()
        summary = run_training(data, str(out / f"run_{strategy}"), cfg, gpus_per_worker=args.gpus_per_worker,
                               overwrite=True)
        evr = fsum.get("explained_variance_ratio") or {}
        rows.append((strategy, fsum["dim"], " ".join(f"{k} {v:.3f}" for k, v in evr.items()) or "-",
                     summary["best_valid_auc"], summary["best_epoch"], summary["epochs"], time.perf_counter() - t0))
        print_table(rows, oracle, args)
    print()
    print(markdown(compare_runs([str(out / f"run_{row[0]}") for row in rows], data)), end="")
    print(f"runs and fused tables under {out}")


def print_table(rows, oracle: float, args) -> None:
    sets = "".join(f" --set {o}" for o in args.overrides)
    print(f"\nfusion comparison: config {args.config}{sets}, at most {args.epochs} epochs; oracle valid AUC "
          f"{oracle:.4f}")
    print(f"{'strategy':<9}{'dim':>5}  {'explained variance':<24}{'valid AUC':>10}{'gap':>8}{'epoch':>7}{'s':>7}")
    for s, dim, evr, auc, best, epochs, secs in rows:
        print(f"{s:<9}{dim:>5}  {evr:<24}{auc:>10.4f}{oracle - auc:>8.4f}{f'{best}/{epochs}':>7}{secs:>7.0f}")


if __name__ == "__main__":
    main()
