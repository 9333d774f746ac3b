"""``mmctr report RUN``: training curves (PNG) and a markdown summary of a run, printed and written to
RUN/report/ (RUN a local path or a storage URI: the files are written through its filesystem)."""

from __future__ import annotations

import io
import json
import math
from typing import Any

from mmctr_ray import storage
from mmctr_ray.errors import DataError
from mmctr_ray.metrics import se_text
from mmctr_ray.storage import Location


def read_metrics(run_dir: Location, missing_ok: bool = False) -> list[dict[str, Any]]:
    """The run's metrics.jsonl rows, one per epoch; ``[]`` for a run with no epoch yet when ``missing_ok``."""
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.is_file(path):
        if missing_ok:
            return []
        raise DataError(f"{path}: missing file (is {run_dir} a run directory of `mmctr train`?)")
    try:
        return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno} is not JSON") from None


def plot_curves(rows: list[dict[str, Any]]) -> bytes:
    """Valid AUC, valid logloss and train loss per epoch, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("valid_auc", "valid_logloss", "train_loss"),
                              ("validation AUC", "validation logloss", "training loss"), strict=True):
        ax.plot(epochs, [r[key] for r in rows], marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    best = max(rows, key=lambda r: r["valid_auc"])
    axes[0].axvline(best["epoch"], color="grey", linestyle="--", linewidth=1)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()


def markdown_summary(run_dir: Location, rows: list[dict[str, Any]]) -> str:
    best = max(rows, key=lambda r: r["valid_auc"])
    summary_path = storage.join(run_dir, "summary.json")
    summary = json.loads(storage.read_text(summary_path)) if storage.is_file(summary_path) else {}
    se = best.get("valid_auc_se")
    lines = [f"# Run `{storage.basename(run_dir)}`", "",
             f"Best validation AUC **{best['valid_auc']:.4f}**{se_text(se)} (logloss {best['valid_logloss']:.4f}) "
             f"at epoch {best['epoch']} of {len(rows)}."]
    if se is not None and math.isfinite(se):
        rows_text = f"{best['valid_rows']:,} " if best.get("valid_rows") else ""
        lines.append(f"± is the AUC's standard error over the {rows_text}validation rows (DeLong). Two independent "
                     f"AUCs of this precision would need to differ by about {2 * math.sqrt(2) * se:.4f} to be told "
                     f"apart; runs scored on the same rows err alike, so `mmctr compare` (the paired test) tells "
                     f"smaller differences apart.")
    if summary.get("oracle_valid_auc"):
        lines.append(f"Oracle AUC of the synthetic data: {summary['oracle_valid_auc']:.4f} "
                     f"(gap {summary['oracle_valid_auc'] - best['valid_auc']:.4f}).")
    lines += ["", "| epoch | train loss | valid AUC | valid logloss | lr | samples/s | seconds |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rate = f"{r['samples_per_s']:,.0f}" if r.get("samples_per_s") else "-"
        lines.append(f"| {r['epoch']} | {r['train_loss']:.4f} | {r['valid_auc']:.4f} | {r['valid_logloss']:.4f} | "
                     f"{r['lr']:.0e} | {rate} | {r['epoch_seconds']:.1f} |")
    lines += ["", "![training curves](curves.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: Location) -> dict[str, Location]:
    """Write RUN/report/{curves.png, summary.md}; return their locations (``Path`` for a local run)."""
    rows = read_metrics(run_dir)
    if not rows:
        raise DataError(f"{storage.join(run_dir, 'metrics.jsonl')}: no epoch recorded yet")
    paths = {"curves": storage.join(run_dir, "report", "curves.png"),
             "summary": storage.join(run_dir, "report", "summary.md")}
    storage.write_text(paths["summary"], markdown_summary(run_dir, rows))
    storage.write_bytes(paths["curves"], plot_curves(rows))
    return paths
