"""What a search leaves for people: ``results.csv``, ``best.yaml`` and PNG plots, all rebuilt from TUNE's files.

Everything here reads the trial folders (``TUNE/trials/<id>.params.json`` and ``<id>/metrics.jsonl``,
``summary.json``, ``config.yaml``) and the Optuna study, so ``mmctr report TUNE`` can rebuild it at any time,
also while a search runs or after one was interrupted.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shlex
import textwrap
from pathlib import Path
from typing import Any

import yaml

from mmctr_ray import storage
from mmctr_ray.config import ExperimentConfig, FusionConfig, TrainConfig, load_config, save_config
from mmctr_ray.errors import ConfigError, DataError, NotStarted, first_line
from mmctr_ray.report import best_epoch, read_metrics
from mmctr_ray.search_space import SearchSpace, load_search

CACHE_DIR = "pca_cache"  # TUNE/pca_cache: the fused tables of the trials (mmctr_ray.pca_cache)
COLUMNS = ("trial", "trial_id", "status", "best_valid_auc", "best_epoch", "epochs", "strategy", "pca_width",
           "valid_auc_se")


def in_this_search(cfg: ExperimentConfig, tune_dir: Path) -> ExperimentConfig:
    """A trial's config with its fused table found in this TUNE's cache.

    Configs name a fused table by its absolute path (training workers change directory; ``mmctr train --config
    best.yaml`` runs from anywhere), so a config saved before the TUNE folder moved, or on a node that mounts it
    elsewhere, names the table under the old folder: the table of that name in ``tune_dir``'s cache is taken
    instead, when the old path is gone and this one exists."""
    if cfg.data.item_vector == "given":
        return cfg
    return _with_table(cfg, table_here(cfg.data.item_vector, tune_dir))


def config_here(cfg: ExperimentConfig, run: storage.Location) -> ExperimentConfig:
    """``cfg`` (a run's saved config) with its fused table where it lies now, when the pipeline OUT or search that
    holds both has moved (:func:`table_of_run`)."""
    return _with_table(cfg, table_of_run(cfg.data.item_vector, run))


def _with_table(cfg: ExperimentConfig, table: str) -> ExperimentConfig:
    return cfg if table == cfg.data.item_vector else dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, item_vector=table))


def table_here(saved: str, tune_dir: Path) -> str:
    """The table of ``saved``'s name in ``tune_dir``'s cache when ``saved`` (a fused table's absolute path) names a
    file of a search's cache and that file is here, else ``saved`` (see :func:`in_this_search`). Here first, even
    where ``saved`` still exists: a search copied elsewhere, and the old one run again, has other tables there
    (the table's identity is still checked against a checkpoint's record)."""
    path = Path(saved)
    here = tune_dir / CACHE_DIR / path.name
    if path.parent.name != CACHE_DIR or not here.is_file():
        return saved
    return str(here.resolve())


def table_of_run(saved: str, run: storage.Location) -> str:
    """``saved``, the fused table a run's config or checkpoint names by its absolute path, or where it lies now when
    the folder that holds both moved: a trial's table in its search's cache (``TUNE/trials/ID``, see
    :func:`in_this_search`), or a pipeline's beside its run (``OUT/run`` and ``OUT/item_emb.parquet``): a moved
    OUT's run could not be predicted, compared or resumed ("/old/OUT/item_emb.parquet: item vector file not found").
    The table's identity is still checked against the checkpoint's record (``check_same_table``)."""
    if saved == "given" or storage.is_uri(run) or storage.is_uri(saved):
        return saved
    from mmctr_ray.pipeline import PUBLISHED

    run_dir, name = Path(run).resolve(), Path(saved).name
    tune_dir = search_of(run_dir)
    if tune_dir is not None:
        return table_here(saved, tune_dir)
    here = run_dir.parent / name  # first, as in a search (table_here)
    if run_dir.name == "run" and name == PUBLISHED["fuse"][0] and here.is_file():  # likewise beside a pipeline's run
        return str(here)
    return saved


def search_of(run_dir: Path) -> Path | None:
    """The TUNE folder a run belongs to (``TUNE/trials/<trial_id>``), or None for a run of `mmctr train`."""
    tune_dir = run_dir.resolve().parent.parent
    return tune_dir if run_dir.resolve().parent.name == "trials" and (tune_dir / "settings.json").is_file() else None


ASHA_RECORDS = "asha.json"  # TUNE/asha.json: ASHA's rung records and the trials it stopped (mmctr_ray.asha)
# the key of a trial's params.json that holds when it first started (Unix seconds): the results' trial order. A copy
# of the search (`cp -r`, a bucket sync) gives every file a new modification time, in no order; files of searches
# before this key are ordered by that time (also seconds, so both kinds sort together)
STARTED = "started_at"


SETTINGS_KEYS: dict[str, tuple[type, ...]] = {"data": (str,), "overrides": (list,), "workers": (int,),
                                              "cpus_per_worker": (int, float), "gpus_per_worker": (int, float),
                                              "source": (str,)}


def read_settings(tune_dir: str | Path, keys: tuple[str, ...] = tuple(SETTINGS_KEYS)) -> dict[str, Any]:
    """A search's ``settings.json``, or a one-line DataError naming it: a file cut short, not an object or without
    the keys a resume and the report read was a JSONDecodeError, AttributeError or KeyError traceback."""
    path = Path(tune_dir) / "settings.json"
    expected = "the settings.json `mmctr tune` writes (start the search again with --overwrite)"
    settings = storage.read_json_object(path, expected)
    for key in keys:  # those the caller reads
        kinds, value = SETTINGS_KEYS[key], settings.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise DataError(f"{path}: {key} is {'missing' if key not in settings else repr(value)}; expected "
                            f"{expected}")
    return settings


def asha_stopped(tdir: Path, fifo: bool = False) -> dict[str, float] | None:
    """The trials ASHA stopped in the search in ``tdir``, each with the epoch it stopped it at; None where that is
    not known: no records (a search older than them) or records without the full list (older, or resumed from older
    ones), or records that cannot be read. ``fifo``: the search has no ASHA (every trial runs to its end), so none
    was stopped."""
    path = tdir / ASHA_RECORDS
    if fifo:
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return dict(saved["stopped"]) if "stopped" in saved and saved.get("stops_complete", True) else None


ENDED = ("completed", "early-stopped", "pruned")  # the trials best.yaml is drawn from while any has a result


def trial_outcome(run: Path, epochs: int, max_epochs: int, stopped: dict[str, float] | None = None) -> str:
    """How a trial stands: a run that returned wrote its ``summary.json``; of the others, those ASHA stopped
    (``stopped``, :func:`asha_stopped`; None: any) were pruned and the rest still run, or ran when the search was
    interrupted (Ctrl-C), and ``--resume`` continues them. A trial ASHA stopped is pruned even where its run ended
    (``summary.json``) before Tune's stop reached it: the study has it PRUNED at the epoch ASHA judged."""
    if (run / NotStarted.FILE).is_file():  # its workers were up after the search's time budget: it did not train
        return "not started"
    if stopped is not None and run.name in stopped and epochs:
        return "pruned"
    if (run / "summary.json").is_file():
        return "completed" if epochs >= max_epochs else "early-stopped"
    if not epochs:
        return "no result"
    return "pruned" if stopped is None or run.name in stopped else "running"


COUNTED = (*ENDED, "error")  # the statuses the counts line always names (the trials that ended)
STATUSES = (*COUNTED, "not started", "running", "no result", "interrupted")


def _trial_rows(tdir: Path, space: SearchSpace, errors: dict[str, str],
                known: list[str] | None = None) -> list[dict[str, Any]]:
    rows, stopped = [], asha_stopped(tdir, fifo=not space.prunes)
    sampled = {p: storage.read_json_object(p, "the trial's parameters `mmctr tune` writes")
               for p in (tdir / "trials").glob("*.params.json")}
    started = sorted(sampled, key=lambda p: (sampled[p].get(STARTED, p.stat().st_mtime), p.name))  # trial order
    for n, params_file in enumerate(started):
        trial_id = params_file.name.removesuffix(".params.json")
        run = params_file.with_name(trial_id)
        history = read_metrics(run, missing_ok=True)
        if stopped and trial_id in stopped:
            # what ASHA and the study judged: the run goes on until Tune's stop reaches it, and a short epoch (a
            # small split, an epoch from the kept shard) can end, and write its row, before that; the last one
            # too, and the run its summary.json (it was then "completed", ranked by an epoch the study never had)
            history = [row for row in history if row["epoch"] <= stopped[trial_id]]
        error = next((msg for name, msg in errors.items() if trial_id in name), None)
        best = best_epoch(history) if history else None
        best = best if best and math.isfinite(best["valid_auc"]) else None  # no finite AUC: no result to rank
        if known is not None and not any(trial_id in name for name in known):
            status = "interrupted"
        else:
            status = "error" if error else trial_outcome(run, len(history), space.max_epochs, stopped)
        fusion = yaml.safe_load((run / "config.yaml").read_text())["fusion"] if (run / "config.yaml").is_file() else {}
        strategy = fusion.get("strategy", "")
        width = _vector_dim(fusion)
        row = {"trial": n, "trial_id": trial_id, "status": status,
               # as the trial reported it: rounded here, then to 4 places where it is said, 0.845649944 was
               # said 0.8457 beside the trial's own 0.8456
               "best_valid_auc": best["valid_auc"] if best else "",
               "best_epoch": best["epoch"] if best else "",
               "epochs": len(history), "strategy": strategy, "pca_width": width,
               "valid_auc_se": best["valid_auc_se"] if best and best.get("valid_auc_se") is not None and
               math.isfinite(best["valid_auc_se"]) else ""}
        params = sampled[params_file]
        row.update({p.key: json.dumps(params[p.key]) if isinstance(params.get(p.key), list) else params.get(p.key, "")
                    for p in space.params})
        rows.append(row)
    return rows


def write_outputs(tdir: Path, space: SearchSpace | None = None, errors: dict[str, str] | None = None,
                  known: list[str] | None = None) -> dict[str, Any]:
    """Write results.csv, best.yaml and plots/ for the search in ``tdir``; return a summary.

    ``errors`` (Tune's error line per failed trial) and ``known`` (every trial Tune's results hold), both by trial
    folder name, are kept in ``tune_results.json``, which a later call without them (``mmctr report TUNE``) reads:
    a failed trial stays "error" there, and a trial folder Tune does not know (started just before the driver
    was killed, after Tune's last saved state; the resumed search drew a new trial instead) is "interrupted"."""
    space = space or load_search(tdir / "search.yaml", read_settings(tdir, ("overrides",))["overrides"],
                                 strict=False)  # the search's own, as it ran
    saved = tdir / "tune_results.json"
    if errors is not None:
        storage.write_text(saved, storage.json_text({"errors": errors, "trials": known}, indent=2) + "\n")
    elif saved.is_file():
        kept = storage.read_json_object(saved, "the tune_results.json `mmctr tune` writes")
        if not isinstance(kept.get("errors"), dict) or not isinstance(kept.get("trials", []), (list, type(None))):
            raise DataError(f"{saved}: not the tune_results.json `mmctr tune` writes (expected an object of errors "
                            f"by trial and a list of trials)")
        errors, known = kept["errors"], None if kept.get("resumed") else kept.get("trials")  # resumed: trials run on
        if kept.get("resumed"):  # and the errored ones run again: one whose run has returned since is no error
            since = saved.stat().st_mtime  # (results.csv said "error" until the resumed search ended)
            returned = [summary.parent.name for summary in (tdir / "trials").glob("*/summary.json")
                        if summary.stat().st_mtime > since]
            errors = {name: msg for name, msg in errors.items() if not any(run in name for run in returned)}
    rows = _trial_rows(tdir, space, errors or {}, known)
    if not rows:
        raise DataError(f"{tdir / 'trials'}: no trial has started yet")
    if (tdir / "plots").is_file():  # before anything is written: a FileExistsError after results.csv and best.yaml
        raise DataError(f"{tdir / 'plots'}: a file; expected the folder `mmctr report` writes the search's plots "
                        f"into (move the file away)")
    fields = [*COLUMNS, *(p.key for p in space.params)]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(tdir / "results.csv", text.getvalue())  # whole or not at all: `report` may run meanwhile
    scored = [r for r in rows if r["best_valid_auc"] != ""]
    summary: dict[str, Any] = {"trials": len(rows), "results": str(tdir / "results.csv"),
                               **{s: sum(r["status"] == s for r in rows)
                                  for s in STATUSES}}
    if scored:  # of the trials that ended, if any did: an errored one (diverged, say) would fail again in `mmctr
        # train`, and a running or interrupted one has not been judged by ASHA to its end
        ended = [r for r in scored if r["status"] in ENDED]
        best = max(ended or scored, key=lambda r: r["best_valid_auc"])
        # the full schedule again (a trial ran at most max_epochs), and never fewer epochs than the trials had
        epochs = max(space.base.get("train", {}).get("epochs", TrainConfig().epochs), space.max_epochs)
        cfg = in_this_search(load_config(tdir / "trials" / best["trial_id"] / "config.yaml",
                                         [f"train.epochs={epochs}"]), tdir)
        save_config(cfg, tdir / "best.yaml")
        summary.update(best_trial=best["trial_id"], best_valid_auc=best["best_valid_auc"],
                       best_valid_auc_se=best.get("valid_auc_se") or None, best_yaml=str(tdir / "best.yaml"))
    summary["plots"] = [str(p) for p in _plots(tdir, rows, space)]
    return summary


def _vector_dim(fusion: dict[str, Any]) -> int | str:
    """The item vector width of a trial's ``fusion`` section; "" without one that reads."""
    try:
        return FusionConfig(**fusion).vector_dim
    except (TypeError, ConfigError):
        return ""


ENDED_SCHEDULE = ("completed", "early-stopped")  # statuses of trials whose AUC is of their whole schedule


def _plots(tdir: Path, rows: list[dict[str, Any]], space: SearchSpace) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = tdir / "plots"
    out.mkdir(exist_ok=True)
    scored = [r for r in rows if r["best_valid_auc"] != ""]
    fig, ax = plt.subplots(figsize=(7, 4))
    for status, marker in (("completed", "o"), ("early-stopped", "s"), ("pruned", "x")):
        pts = [r for r in scored if r["status"] == status]
        ax.scatter([r["trial"] for r in pts], [r["best_valid_auc"] for r in pts], marker=marker, label=status)
    best, running = float("-inf"), []
    for r in scored:
        best = max(best, r["best_valid_auc"])
        running.append(best)
    ax.plot([r["trial"] for r in scored], running, color="gray", lw=1, label="best so far")
    ax.set(xlabel="trial (in start order)", ylabel="best valid AUC", title="valid AUC by trial")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    paths = [_save(fig, out / "auc_by_trial.png")]

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, strategy in enumerate(sorted({r["strategy"] for r in scored})):  # a colour per strategy; a trial that
        # did not end its schedule (pruned, interrupted, failed) has the AUC of the epoch it stopped at, so it is
        # marked as such (a pruned one read as "that width is worse")
        for cut in (False, True):
            pts = [r for r in scored if r["strategy"] == strategy and (r["status"] not in ENDED_SCHEDULE) == cut]
            if pts:
                ax.scatter([r["pca_width"] for r in pts], [r["best_valid_auc"] for r in pts], color=f"C{i}",
                           marker="x" if cut else "o", label=f"{strategy}, stopped early" if cut else strategy)
    ax.set(xscale="log", xlabel="item vector width (PCA dims; given = 128 as shipped)", ylabel="best valid AUC",
           title="valid AUC against PCA size (x: pruned, interrupted or failed: AUC at the epoch it stopped)")
    if scored:  # no trial with a result yet: an empty plot, without matplotlib's warning of an empty legend
        ax.legend(fontsize=8)
    paths.append(_save(fig, out / "auc_vs_pca.png"))

    importances, note = _importances(tdir, space)
    fig, ax = plt.subplots(figsize=(7, 4))
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (Optuna fANOVA)",
               title=f"parameter importance over {note} (unconditional parameters)")
    else:
        ax.text(0.5, 0.5, textwrap.fill(note, 80), ha="center", va="center")  # matplotlib's wrap cut its ends
        ax.set_axis_off()
    fig.tight_layout()
    paths.append(_save(fig, out / "param_importance.png"))
    return paths


MIN_IMPORTANCE_TRIALS = 10  # completed trials before fANOVA's importances are drawn: over 2 (the bound until
# 2026-12-07) its random forest gave three parameters 0.24-0.35 each from a pair of trials (helper-134)


def _importances(tdir: Path, space: SearchSpace) -> tuple[dict[str, float], str]:
    """fANOVA importances of the search's unconditional parameters over its completed trials, and what they are
    over (``"12 completed trials"``); or none, and why not."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    if not (tdir / "optuna.db").is_file():  # load_study would create an empty one
        return {}, f"parameter importance unavailable: {tdir / 'optuna.db'}: missing file"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name="mmctr", storage=f"sqlite:///{tdir}/optuna.db")
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        params = [p.key for p in space.params if not p.when and len({t.params.get(p.key) for t in done}) > 1]
        if len(done) < MIN_IMPORTANCE_TRIALS or not params:
            return {}, (f"parameter importance needs {MIN_IMPORTANCE_TRIALS}+ trials that differ and ran to their "
                        f"end, not pruned ({len(done)} did): fANOVA's forest over fewer ranks noise")
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=space.seed)  # what the plot's label says
        found = optuna.importance.get_param_importances(study, params=params, evaluator=evaluator)
        return found, f"{len(done)} completed trials"
    except (KeyError, ValueError, RuntimeError, SQLAlchemyError) as err:  # e.g. the running search's write lock
        return {}, f"parameter importance unavailable: {first_line(err)}"


def _save(fig: Any, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, written whole by :func:`mmctr_ray.storage.write_bytes` (under a temporary name
    of this process, then renamed): a reader never sees a plot half-written, and `mmctr report TUNE` writing the
    same plot while the search's end does takes neither's file away (a shared temporary name did)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())
    return path


def _short(value: str) -> str:
    """A CSV cell for a markdown table: '–' when inactive, floats to 4 significant digits."""
    if not value:
        return "–"
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value and "e" not in value else f"{number:.4g}"


def top_trials(tdir: str | Path, n: int = 10) -> str:
    """A markdown table of the ``n`` best trials of ``results.csv`` (rebuilt from the trial folders first)."""
    tdir = Path(tdir)
    summary = write_outputs(tdir)
    with open(tdir / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["best_valid_auc"]]
    rows.sort(key=lambda r: float(r["best_valid_auc"]), reverse=True)
    params = [k for k in rows[0] if k not in COLUMNS] if rows else []
    head = ["rank", "trial_id", "status", "best_valid_auc", "± SE", "epochs", *params]
    lines = [f"# Search `{tdir.name}`: {trial_counts(summary)}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows[:n], start=1):
        se = f"{float(r['valid_auc_se']):.4f}" if r.get("valid_auc_se") else "–"
        lines.append("| " + " | ".join([str(i), r["trial_id"], r["status"], f"{float(r['best_valid_auc']):.4f}", se,
                                        r["epochs"], *(_short(r[p]) for p in params)]) + " |")
    if summary.get("best_yaml"):
        lines += ["", f"Best config: `{summary['best_yaml']}`; train it with the full schedule: "
                      f"`{train_best_command(tdir)}`."]
    return "\n".join(lines) + "\n"


def trial_counts(summary: dict[str, Any]) -> str:
    """"N trials (… completed, … early-stopped, … pruned, … errors)" for a :func:`write_outputs` summary, with the
    trials of every other status where there are any (not started: the time budget ended before their workers were
    up; running; no result: no epoch ended yet; interrupted: started after Tune's last saved state), so the parts
    add up to N."""
    rest = "".join(f", {summary[s]} {s}" for s in STATUSES[len(COUNTED):] if summary.get(s))
    return (f"{summary['trials']} trials ({summary['completed']} completed, {summary['early-stopped']} early-stopped, "
            f"{summary['pruned']} pruned, {summary['error']} errors{rest})")


def train_best_command(tdir: str | Path) -> str:
    """``mmctr train --data DATA --out RUN --config TUNE/best.yaml``, with the search's own data folder."""
    settings = Path(tdir) / "settings.json"
    data = json.loads(settings.read_text()).get("data") if settings.is_file() else None
    return shlex.join(["mmctr", "train", "--data", data or "DATA", "--out", "RUN", "--config",
                       str(Path(tdir) / "best.yaml")])
