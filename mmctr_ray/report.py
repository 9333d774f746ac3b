"""``mmctr report RUN``: training curves (PNG) and a markdown summary of a run, printed and written to RUN."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmctr_ray.errors import DataError


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: missing file (is {run_dir} a run directory of `mmctr train`?)")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno} is not JSON") from None


def plot_curves(rows: list[dict[str, Any]], out: Path) -> Path:
    """Valid AUC, valid logloss and train loss per epoch, side by side."""
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
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def markdown_summary(run_dir: Path, rows: list[dict[str, Any]]) -> str:
    best = max(rows, key=lambda r: r["valid_auc"])
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    lines = [f"# Run `{run_dir.name}`", "",
             f"Best validation AUC **{best['valid_auc']:.4f}** (logloss {best['valid_logloss']:.4f}) at epoch "
             f"{best['epoch']} of {len(rows)}."]
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


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write RUN/report/{curves.png, summary.md}; return their paths."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise DataError(f"{run_dir / 'metrics.jsonl'}: no epoch recorded yet")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    md = out / "summary.md"
    md.write_text(markdown_summary(run_dir, rows))
    return {"curves": plot_curves(rows, out / "curves.png"), "summary": md}
