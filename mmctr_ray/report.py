"""``mmctr report RUN``: training curves (PNG) and a markdown summary of a run, printed and written to
RUN/report/ (RUN a local path or a storage URI: the files are written through its filesystem)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import posixpath
from pathlib import Path
from typing import Any

from mmctr_ray import storage
from mmctr_ray.config import ExperimentConfig
from mmctr_ray.errors import DataError, OutputExistsError
from mmctr_ray.metrics import se_text
from mmctr_ray.storage import Location


EPOCH_KEYS = ("epoch", "valid_auc")  # what every reader of a run's epochs uses
REPORT_KEYS = ("epoch", "train_loss", "valid_auc", "valid_logloss", "lr", "epoch_seconds")  # a report's table
# the numbers an epoch's row always holds: a null among them is a NaN (storage.json_text), e.g. a one-class AUC
EPOCH_NUMBERS = ("train_loss", "valid_auc", "valid_auc_se", "valid_logloss", "lr", "epoch_seconds")


def read_metrics(run_dir: Location, missing_ok: bool = False, keys: tuple[str, ...] = EPOCH_KEYS
                 ) -> list[dict[str, Any]]:
    """The run's metrics.jsonl rows, one per epoch, each with the numbers ``keys`` (a null among ``EPOCH_NUMBERS``
    read as the NaN it was written for); ``[]`` for a run with no epoch yet when ``missing_ok``."""
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.is_file(path):
        if missing_ok:
            return []
        if not storage.exists(run_dir):
            raise DataError(f"{run_dir}: not found (expected a run directory of `mmctr train`)")
        if storage.is_file(run_dir):
            raise DataError(f"{run_dir}: a file; expected a run directory of `mmctr train`")
        if storage.exists(path):
            raise DataError(f"{path}: a folder; expected the metrics.jsonl file `mmctr train` writes")
        raise DataError(f"{path}: missing file (is {run_dir} a run directory of `mmctr train`?)")
    try:
        text = storage.read_text(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); expected the metrics.jsonl "
                        f"`mmctr train` writes") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # its lineno is within the one line parsed: always 1
            raise DataError(f"{path}: line {number} is not JSON") from None
    rows = [storage.nan_for_null(row, EPOCH_NUMBERS) if isinstance(row, dict) else row for row in rows]
    for i, row in enumerate(rows, start=1):  # a hand-edited or foreign file: one line, not a KeyError later
        if not isinstance(row, dict) or not all(is_number(row.get(k)) for k in keys):
            raise DataError(f"{path}: record {i} is not an epoch's; expected an object with the numbers "
                            f"{', '.join(keys)}")
        other = next((k for k in (*EPOCH_NUMBERS, *SHOWN_NUMBERS) if k in row and row[k] is not None
                      and not is_number(row[k])), None)  # formatted as numbers by the report and the summary
        if other is not None:
            raise DataError(f"{path}: record {i}: {other} is {row[other]!r}; expected a number")
    return rows


SHOWN_NUMBERS = ("valid_rows", "samples_per_s", "steady_seconds", "steps")  # optional, shown where present


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # "epoch": true read as epoch 1


def best_epoch(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch row a run keeps as its best, as training and ``best_checkpoint`` pick it: the highest finite
    validation AUC, the earliest among equals (``max`` alone kept a NaN that came first); the first row when no
    AUC is finite (to show; ``best_checkpoint`` then has none to score with)."""
    finite = [r for r in rows if math.isfinite(r["valid_auc"])]
    return max(finite, key=lambda r: r["valid_auc"]) if finite else rows[0]


def epoch_report(row: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """What Tune hears of the epoch of ``row`` (``ray.train.report`` in a run, which Tune's callback passes on, and
    the replay of a resumed search's trial): its scalars (metrics.jsonl keeps the per-worker lists; Ray's report
    takes scalars) and the best epoch up to it, with its AUC (the earliest among equals, as the schedule keeps it;
    NaN and no epoch before a finite AUC)."""
    best = None
    for r in history:  # a NaN AUC is no best (it would stay the best: nothing compares greater), as the schedule
        if r["epoch"] <= row["epoch"] and math.isfinite(r["valid_auc"]) and (  # skips it
                best is None or r["valid_auc"] > best["valid_auc"]):
            best = r
    if best is None:  # no finite AUC yet
        best = {"valid_auc": float("nan"), "epoch": None}
    scalars = {k: v for k, v in row.items() if not k.startswith("worker_")}
    return {**scalars, "best_valid_auc": best["valid_auc"], "best_valid_auc_se": best.get("valid_auc_se"),
            "best_epoch": best["epoch"]}


def describe_item_vector(source: dict[str, Any], rms: float = 0.0) -> str:
    """What a run's frozen item vector is, from its checkpoint's ``item_source.json``: ``item_emb_d128 as shipped
    (given)`` or the fusion its table came from (``v4 = PCA(text) 64 ‖ PCA(image) 64 of item_feature.parquet``)."""
    if source.get("item_vector") == "given":
        text = f"{source.get('column', 'item_emb_d128')} as shipped (given)"
    else:
        fusion = source.get("fusion") or {}
        strategy, what = fusion.get("strategy"), _fused_what(fusion)
        if what:
            origin = posixpath.basename(str(fusion.get("source", ""))) or "?"
            text = f"{strategy} = {what} of {origin} ({posixpath.basename(str(source.get('file')))})"
        else:  # a table not written by `mmctr fuse` (no .fusion.json)
            text = f"{source.get('file')} ({source.get('dim')} dims)"
    return text + (f", scaled to RMS {rms:g}" if rms else "")


def _fused_what(fusion: dict[str, Any]) -> str | None:
    """``PCA(text) 64 ‖ PCA(image) 64`` for a table's fusion summary (a width it does not record is left out)."""
    from mmctr_ray.fusion import PARTS

    strategy = fusion.get("strategy")
    if strategy == "given":
        return str(fusion.get("column", "item_emb_d128"))
    if strategy not in PARTS:
        return None
    inputs = {"text": "text", "image": "image", "joint": "text ‖ image"}
    return " ‖ ".join(f"PCA({inputs[name]})" + (f" {fusion[field]}" if fusion.get(field) else "")
                      for name, _, field in PARTS[strategy])


def describe_model(cfg: ExperimentConfig) -> str:
    """The model a config builds, in one line: its attention, interaction modules and DNN head."""
    m, parts = cfg.model, []
    if not m.use_history:
        parts.append("no history (model.use_history=false)")
    elif m.attention == "multihead":
        parts.append(f"multi-head target attention ({m.num_heads} heads) over the last {cfg.data.max_len} clicks")
    else:
        parts.append(f"DIN attention {list(m.attention_units)} over the last {cfg.data.max_len} clicks")
    if m.senet:
        parts.append(f"SENet (ratio {m.senet_ratio})")
    if m.bilinear != "off":
        parts.append(f"bilinear interaction ({m.bilinear})")
    if m.crossnet != "off" and m.cross_layers:  # 0 layers build no CrossNet (model.Head): it said "(0 layers)"
        parts.append(f"CrossNet {m.crossnet} ({m.cross_layers} layer{'s' * (m.cross_layers != 1)})")
    parts.append(f"DNN {list(m.dnn_units)}")
    fields = ["item id", *(["tags"] if m.use_tags else []), *(["user id"] if m.use_user_id else [])]
    return ", ".join(parts) + f"; embeddings of {m.embedding_dim} ({', '.join(fields)})"


def describe_run(cfg: ExperimentConfig, source: dict[str, Any] | None) -> str:
    """``config `NAME`: <model>; item vector <what>`` (the item vector from the checkpoint's ``item_source.json``
    when there is one, else from the config)."""
    if source is None:
        source = ({"item_vector": "given"} if cfg.data.item_vector == "given"
                  else {"item_vector": "fused", "file": cfg.data.item_vector, "dim": "?"})
    t = cfg.train
    return (f"config `{cfg.name}`: {describe_model(cfg)}; item vector "
            f"{describe_item_vector(source, cfg.model.item_vector_rms)}; batch {t.batch_size}, {t.optimizer} lr "
            f"{t.lr:g}, dropout {cfg.model.dropout:g}, embedding L2 {t.embedding_l2:g}"
            + (f", weight decay {t.weight_decay:g}" if t.weight_decay else ""))


def run_description(run_dir: Location) -> str | None:
    """:func:`describe_run` of a run's best checkpoint in RUN as it is now: its own ``config.yaml`` (a resume with
    other ``train.*`` rewrites RUN's, which the best epoch may not have trained with) and item source; RUN's
    ``config.yaml`` where the checkpoint has none readable; None when neither is readable."""
    from mmctr_ray.checkpoint import best_checkpoint
    from mmctr_ray.config import load_config
    from mmctr_ray.errors import ConfigError

    best = None
    with contextlib.suppress(DataError, OSError):
        best = best_checkpoint(run_dir)
    for where in ([best] if best is not None else []) + [run_dir]:
        try:
            cfg = load_config(storage.join(where, "config.yaml"))
        except (ConfigError, OSError):
            continue
        return describe_run(cfg, item_source(best) if best is not None else None)
    return None


def item_source(checkpoint: Location) -> dict[str, Any] | None:
    """A checkpoint's ``item_source.json`` (what its item vectors were built from), or None when unreadable."""
    path = storage.join(checkpoint, "item_source.json")
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads(storage.read_text(path)) if storage.is_file(path) else None
    return None


Rows = list[dict[str, Any]]  # a run's epochs (metrics.jsonl)


def plot_curves(runs: Rows | dict[str, Rows]) -> bytes:
    """Valid AUC, valid logloss and train loss per epoch, side by side, as a PNG (:func:`curves_figure`)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(runs)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()


def curves_figure(runs: Rows | dict[str, Rows]) -> Any:
    """The figure :func:`plot_curves` draws (a matplotlib ``Figure``; close it with ``plt.close``): one run's rows,
    its best epoch marked; or ``{label: rows}`` of several runs, a line each, each best epoch a star, a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    several = isinstance(runs, dict)
    series = runs if several else {"": runs}
    epochs = sorted({r["epoch"] for run in series.values() for r in run})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("valid_auc", "valid_logloss", "train_loss"),
                              ("validation AUC", "validation logloss", "training loss"), strict=True):
        for i, (label, run) in enumerate(series.items()):
            ax.plot([r["epoch"] for r in run], [r[key] for r in run], marker="o", color=f"C{i}",
                    label=label or None)
            if several and key == "valid_auc":
                best = best_epoch(run)
                ax.plot([best["epoch"]], [best["valid_auc"]], marker="*", markersize=14, color=f"C{i}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if len(epochs) <= 12:  # MaxNLocator's integer ticks give way to 0.95, 0.96, ... with one epoch in view
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if several:
        axes[0].legend(fontsize=8)
    else:
        axes[0].axvline(best_epoch(runs)["epoch"], color="grey", linestyle="--", linewidth=1)
    fig.tight_layout()
    return fig


def _summary_value(run_dir: Location, key: str) -> tuple[bool, Any]:
    """(whether the run has its ``summary.json``, which training writes when the run ends; the value it records
    under ``key``, None if none).

    Raises:
        ValueError, AttributeError: a file training did not write (cut: not JSON; edited by hand: not an object).
    """
    path = storage.join(run_dir, "summary.json")
    if not storage.is_file(path):
        return False, None
    return True, json.loads(storage.read_text(path)).get(key)


def _oracle_auc(run_dir: Location) -> float | None:
    """The oracle AUC the run's ``summary.json`` records; None without one (a run still training, data not from
    `mmctr synth`), and, with a warning, for a file training did not write (cut, edited by hand): the report of
    the epochs is still written (it was a JSONDecodeError traceback and no report)."""
    try:
        _, oracle = _summary_value(run_dir, "oracle_valid_auc")
        if oracle is not None and (isinstance(oracle, bool) or not isinstance(oracle, (int, float))):
            raise ValueError(f"oracle_valid_auc {oracle!r} is not a number")
    except (ValueError, AttributeError) as err:
        logging.getLogger(__name__).warning("%s: not the summary.json `mmctr train` writes (%s): no oracle AUC in "
                                            "the report", storage.join(run_dir, "summary.json"), err)
        return None
    return float(oracle) if oracle is not None and math.isfinite(oracle) else None


def _unended(run_dir: Location) -> str:
    """What the best epoch's line adds for a run without its summary.json (a run writes it when it ends): the
    epochs its config.yaml asks for, and why there may be no more (a run stopped at epoch 2 of 30 read "at epoch 2
    of 2", as a finished one)."""
    from mmctr_ray.config import load_config
    from mmctr_ray.errors import ConfigError
    from mmctr_ray.tune_report import search_of

    try:  # RUN's own config.yaml: a resume rewrites it with the epochs asked for now
        planned = f" (train.epochs {load_config(storage.join(run_dir, 'config.yaml')).train.epochs})"
    except (ConfigError, OSError):  # none that reads, as run_description: the report says less, and still comes
        planned = ""

    if not storage.is_uri(run_dir) and search_of(Path(run_dir)) is not None:
        return f"{planned}; the trial has no summary.json: its search stopped it early (ASHA), or it is still training."
    return (f"{planned}; the run has no summary.json: it is still training, or it stopped before its end "
            f"(`mmctr train --resume` continues it).")


def markdown_summary(run_dir: Location, rows: list[dict[str, Any]]) -> str:
    best = best_epoch(rows)
    oracle = _oracle_auc(run_dir)
    se = best.get("valid_auc_se")
    described = run_description(run_dir)
    ended = storage.is_file(storage.join(run_dir, "summary.json"))  # written when the run ends
    of = f"of {len(rows)}." if ended else f"of the {len(rows)} trained so far{_unended(run_dir)}"
    lines = [f"# Run `{storage.basename(run_dir)}`", "", *([f"Trained: {described}.", ""] if described else []),
             f"Best validation AUC **{best['valid_auc']:.4f}**{se_text(se)} (logloss {best['valid_logloss']:.4f}) "
             f"at epoch {best['epoch']} {of}"]
    scored = _scored_epoch(run_dir)
    if scored is not None and scored != best["epoch"]:  # rank 0 writes an epoch's row before Ray copies its checkpoint
        # a run still training is between the two as well: it writes summary.json when it ends
        why = ("it stopped while the checkpoint was copied" if storage.is_file(storage.join(run_dir, "summary.json"))
               else "the run is still training, or it stopped while the checkpoint was copied")
        lines.append(f"Epoch {best['epoch']}'s checkpoint is not complete in the run ({why}): `mmctr predict` scores "
                     f"with epoch {scored}'s, the best complete one.")
    if se is not None and math.isfinite(se):
        rows_text = f"{best['valid_rows']:,} " if best.get("valid_rows") else ""
        lines.append(f"± is the AUC's standard error over the {rows_text}validation rows (DeLong). Two independent "
                     f"AUCs of this precision would need to differ by about {2 * math.sqrt(2) * se:.4f} to be told "
                     f"apart; runs scored on the same rows err alike, so `mmctr compare` (the paired test) tells "
                     f"smaller differences apart.")
    if oracle is not None:
        lines.append(f"Oracle AUC of the synthetic data: {oracle:.4f} (gap {oracle - best['valid_auc']:.4f}).")
    lines += ["", "| epoch | train loss | valid AUC | valid logloss | lr | samples/s | seconds |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rate = f"{r['samples_per_s']:,.0f}" if r.get("samples_per_s") else "-"
        lines.append(f"| {r['epoch']} | {r['train_loss']:.4f} | {r['valid_auc']:.4f} | {r['valid_logloss']:.4f} | "
                     f"{r['lr']:.2g} | {rate} | {r['epoch_seconds']:.1f} |")
    lines += ["", "![training curves](curves.png)", ""]
    return "\n".join(lines)


def _scored_epoch(run_dir: Location) -> int | None:
    """The epoch of the checkpoint ``mmctr predict`` scores with (the best complete one); None without one."""
    from mmctr_ray.checkpoint import best_checkpoint, checkpoint_epoch

    try:
        return checkpoint_epoch(best_checkpoint(run_dir))
    except DataError:
        return None


def write_report(run_dir: Location) -> dict[str, Location]:
    """Write RUN/report/{curves.png, summary.md}; return their locations (``Path`` for a local run). Both are made
    before either is written, and the summary, which links the curves, is written last: a failure leaves no new
    summary beside old curves."""
    run_dir = storage.normalize(run_dir)  # the run's name for the title (`report .`); a URI fragment is refused
    rows = read_metrics(run_dir, keys=REPORT_KEYS)
    if not rows:
        raise DataError(f"{storage.join(run_dir, 'metrics.jsonl')}: no epoch recorded yet")
    paths = {"curves": storage.join(run_dir, "report", "curves.png"),
             "summary": storage.join(run_dir, "report", "summary.md")}
    curves, summary = plot_curves(rows), markdown_summary(run_dir, rows)
    if storage.is_file(storage.join(run_dir, "report")):  # a FileExistsError traceback from the write below
        raise DataError(f"{storage.join(run_dir, 'report')}: a file; expected the folder `mmctr report` writes "
                        f"curves.png and summary.md into (move the file away)")
    storage.write_bytes(paths["curves"], curves)
    storage.write_text(paths["summary"], summary)
    return paths


def write_runs_report(runs: list[Location], out: Path, overwrite: bool = False) -> dict[str, Path]:
    """Several runs side by side: ``out/curves.png`` (a line per run, each best epoch a star) and ``out/summary.md``
    (a row per run: what it trained, its best epoch, AUC ± standard error and logloss, its epochs and why it
    stopped); return their paths. The runs are read only; each keeps its own ``report/``. Their AUCs are each
    run's own validation, on its own data: ``mmctr compare`` scores runs of one data set on the same rows."""
    twice = next((run for i, run in enumerate(runs) if str(run) in map(str, runs[:i])), None)
    if twice is not None:
        raise DataError(f"{twice}: given twice; name each run once")
    named = {str(run): read_metrics(storage.normalize(run), keys=REPORT_KEYS) for run in runs}
    for run, rows in named.items():
        if not rows:
            raise DataError(f"{storage.join(run, 'metrics.jsonl')}: no epoch recorded yet")
    paths = {"curves": out / "curves.png", "summary": out / "summary.md"}
    if out.is_file() or any(p.is_file() for p in out.parents):
        raise DataError(f"{out}: a file, or below one; --out names the folder the comparison is written into")
    there = [p.name for p in paths.values() if p.exists()]
    if there and not overwrite:
        raise OutputExistsError(f"{out}: already holds {' and '.join(there)}; pass --overwrite to replace them")
    lines = [f"# {len(runs)} runs", "", "| run | trained | best epoch | valid AUC | ± | logloss | epochs | ended |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for run, rows in named.items():
        best, location = best_epoch(rows), storage.normalize(run)
        try:
            summarised, reason = _summary_value(location, "stop_reason")
            ended = (reason or "ended") if summarised else "still training, or stopped before its end"
        except (ValueError, AttributeError):
            ended = "ended (summary.json unreadable)"
        se = best.get("valid_auc_se")
        lines.append(f"| {run} | {run_description(location) or '?'} | {best['epoch']} | {best['valid_auc']:.4f} | "
                     f"{f'{se:.4f}' if se is not None and math.isfinite(se) else '–'} | {best['valid_logloss']:.4f} | "
                     f"{len(rows)} | {ended} |")
    lines += ["", "Each AUC is its run's own validation: `mmctr compare` scores runs of one data set on the same rows, "
              "with the paired test.", "", "![training curves](curves.png)", ""]
    curves = plot_curves(named)
    out.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(paths["curves"], curves)
    storage.write_text(paths["summary"], "\n".join(lines))
    return paths

