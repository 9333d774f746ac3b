"""``mmctr tune``: a Ray Tune search whose trials are ``mmctr train`` runs, sampled by Optuna, pruned by ASHA.

The Train V2 pattern: each trial is a Tune *function* that builds the trial's config from the sampled
parameters (:mod:`mmctr_ray.search_space`), takes the trial's fused item table from a cache shared by all
trials (:mod:`mmctr_ray.pca_cache`), and calls the same driver as ``mmctr train`` with a trial-specific run
directory; the run's per-epoch metrics reach Tune through ``TuneReportCallback``, so ASHA can stop it.

TUNE holds::

    search.yaml        the YAML the search was started with       settings.json   data, workers, GPUs, source
    optuna.db          the Optuna study (SQLite; `optuna-dashboard sqlite:///TUNE/optuna.db`)
    tune/              Tune's experiment state (what --resume restores)
    asha.json          ASHA's rung records (Tune does not save its scheduler; --resume reads them back)
    pca_cache/         one exact fit per (strategy, source), as wide as the space's widest size; the fused table
                       of each sampled size, sliced from it
    trials/<trial_id>/ each trial's run directory (config.yaml, metrics.jsonl, checkpoints), and beside it
    trials/<trial_id>.params.json   the parameters Optuna sampled for it, and when it first started
    results.csv, best.yaml, plots/      written by :mod:`mmctr_ray.tune_report` when the search ends

The train and valid splits are read once per search into Ray's object store when they fit a quarter of it
(:func:`shared_datasets`), so trials skip Ray Data's listing and reading.

Concurrency comes from the resources Ray reports: a trial holds its workers' CPUs and GPUs (its driver, which
mostly waits, reserves ``TRIAL_DRIVER_CPU``), and ``DATA_CPU_RESERVE`` CPUs stay free for the Ray Data tasks
that feed the workers, so trials never wait on each other for CPUs they cannot get.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmctr_ray import storage
from mmctr_ray.config import FUSION_WIDTHS, ExperimentConfig, load_config
from mmctr_ray.errors import ConfigError, DataError, Interrupted, NotStarted, OutputExistsError, find_user_error
from mmctr_ray.features import has_placeholder_embeddings
from mmctr_ray.locking import began, check_folder_kind, entries
from mmctr_ray.fuse import source_file, yaml_string
from mmctr_ray.metrics import se_text
from mmctr_ray.preflight import (batch_split_note, check_batch_norm_rows, check_batch_size, check_splits,
                                 check_valid_labels)
from mmctr_ray.ray_env import DATA_CPU_RESERVE, check_gpu_split, private_local_ray, sigterm_flag
from mmctr_ray.schema import SPLITS
from mmctr_ray.search_space import SearchSpace, load_search
from mmctr_ray.tune_report import read_settings

log = logging.getLogger(__name__)
# the trial function builds the trial's config and then waits on its TorchTrainer: it reserves no CPU (a laptop's
# 2 CPUs then fit one trial); concurrency is capped by trial_concurrency, so unreserved drivers cannot pile up
TRIAL_DRIVER_CPU = 0.0
TRIAL_DRIVER_MEMORY = 256 * 2**20  # Tune needs some resource in a trial's bundle; memory is one that blocks no CPU
STUDY_NAME = "mmctr"
METRIC = "best_valid_auc"  # what Optuna and ASHA compare: the trial's best epoch so far, the one it would keep
tune_dir_now: str | None = None  # set by run_tuning: this process's TUNE (Tune restores callbacks with older paths)
FAULT_ENV = "MMCTR_FAULT_TUNE_EXIT_AFTER_TRIALS"  # tests: the driver exits hard after N finished trials


def trial_concurrency(resources: dict[str, float], workers: int, cpus_per_worker: float, gpus_per_worker: float,
                      requested: int | None = None, elastic: bool = False, resumed: bool = False) -> int:
    """How many trials fit at once in ``resources`` (Ray's cluster resources); at most ``requested`` (``--max-
    concurrent``, or with ``resumed`` the concurrency the search began with, which Tune restores).

    ``elastic``: Ray is a cluster this process joined, which may grow (``cluster.yaml`` starts with no GPU
    worker): an explicit ``requested`` is then trusted beyond what fits now, since the trials' pending resource
    requests are what makes the autoscaler add nodes. The private local Ray cannot grow, so there the fit caps it
    (trials beyond it would wait for CPUs that never come)."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    per_trial_cpu = TRIAL_DRIVER_CPU + workers * cpus_per_worker
    by_cpu = math.floor((cpus - DATA_CPU_RESERVE) / per_trial_cpu + 1e-9)
    by_gpu = math.floor(gpus / (workers * gpus_per_worker) + 1e-9) if gpus_per_worker else by_cpu
    fits = max(min(by_cpu, by_gpu), 0)
    asked = f"the search's {requested} at a time (settings.json)" if resumed else f"--max-concurrent {requested}"
    if elastic and requested is not None and requested > fits:
        log.warning("%s: %s in what Ray has now (%g CPUs, %g GPUs); the rest wait for the autoscaler to add nodes "
                    "(on a cluster that cannot grow they wait for good%s)", asked, _trials_fit(fits), cpus, gpus,
                    "" if resumed else ": lower --max-concurrent")
        return requested
    if fits < 1:
        need = f"{per_trial_cpu + DATA_CPU_RESERVE:g} CPUs" + (f" and {workers * gpus_per_worker:g} GPUs"
                                                               if gpus_per_worker else "")
        hint = "; on an autoscaling cluster pass --max-concurrent to start the trials anyway" if elastic else ""
        raise ConfigError(f"one trial needs {need} ({workers} workers × {cpus_per_worker:g} CPU, "
                          f"{DATA_CPU_RESERVE:g} CPU for data loading); Ray has {cpus:g} CPUs and {gpus:g} GPUs{hint}")
    if requested is not None and requested < fits:
        return requested
    if requested is not None and requested > fits and resumed:  # Tune starts them all; the rest wait for resources
        log.warning("%s: only %s in Ray's resources (%g CPUs, %g GPUs); the others wait for a trial to end", asked,
                    _trials_fit(fits), cpus, gpus)
    elif requested is not None and requested > fits:
        log.warning("%s: only %s in Ray's resources (%g CPUs, %g GPUs); running %d", asked, _trials_fit(fits), cpus,
                    gpus, fits)
    return fits


def _trials_fit(count: int) -> str:
    return f"{count} trial{' fits' if count == 1 else 's fit'}"


def trials_per_node(node_cpus: list[float], concurrent: int, workers: int, cpus_per_worker: float) -> int:
    """How many of ``concurrent`` trials may run their CPU workers on one node (``node_cpus``: each live node's
    logical CPUs): what the largest node holds, at most ``concurrent``. On one machine that is every concurrent
    trial; on a cluster an upper bound (Ray packs a node before it spreads). Each CPU worker takes its share of
    the node's cores as torch threads: concurrent trials that each took every core ran 2 trials × 2 threads on 2
    cores at 3,702 samples/s in all against 6,368 with one thread each."""
    per_trial = workers * cpus_per_worker
    fits = max((math.floor(c / per_trial + 1e-9) for c in node_cpus), default=1) if per_trial > 0 else concurrent
    return max(1, min(concurrent, fits))


def _node_cpus() -> list[float]:
    """The logical CPUs of each live node of the Ray this process joined."""
    import ray

    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]


def _trial_config(space: SearchSpace, params: dict[str, Any], tune_dir: Path, data_dir: Path,
                  source: str) -> ExperimentConfig:
    from mmctr_ray.pca_cache import cached_fusion
    from mmctr_ray.tune_report import CACHE_DIR

    cfg = space.trial_config(params)
    if cfg.fusion.strategy == "given":  # a sampled "given" is the shipped vector; the base's strategy, its table
        vector = "given" if "fusion.strategy" in params else cfg.data.item_vector
    elif not _fits_in_trial(params, cfg):  # the base's fused table (e.g. a best.yaml), fused as this trial asks
        vector = cfg.data.item_vector
    else:
        table, fitted = cached_fusion(tune_dir / CACHE_DIR, data_dir, cfg.fusion, source, seed=cfg.train.seed,
                                      axes=space.fusion_axes())
        log.info("fusion %s: %s (%s)", cfg.fusion.strategy, table.name, "written" if fitted else "from the cache")
        vector = str(table)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, item_vector=vector))


def _fits_in_trial(sampled: Iterable[str], cfg: ExperimentConfig) -> bool:
    """Whether a trial with ``cfg`` (a v1..v4 strategy) that sampled the keys ``sampled`` fuses its table from
    ``--source``: when it sampled a ``fusion.*`` key, or its base config names no fused table
    (``data.item_vector: given``). Otherwise it trains on the base config's table, which was fused with the same
    settings (before, a search reusing best.yaml refitted it, from whatever ``--source`` this search was given)."""
    return any(k.startswith("fusion.") for k in sampled) or cfg.data.item_vector == "given"


SHARED_DATA_FRACTION = 0.25  # splits read once per search when they take at most this share of the object store


def shared_datasets(data_dir: Path, max_len: int, rows: dict[str, int], ordered: bool = False
                    ) -> dict[int, dict[str, Any]]:
    """The train and valid splits read once for the whole search and kept in Ray's object store, so a trial
    starts training without Ray Data's listing, read and conversion tasks (5–9 s of a ~20 s tiny trial on 2 CPUs):
    ``{max_len: {"train": ds, "valid": ds}}``, or ``{}`` when they would take more than SHARED_DATA_FRACTION of
    the store (trials then read the files themselves, as ``mmctr train`` does). Trials whose config asks for
    another ``data.max_len`` read the files too. ``ordered`` (the search's ``train.deterministic``): read and kept
    in file order, as a deterministic run reads them (:func:`mmctr_ray.train_driver.split_datasets`)."""
    import ray

    from mmctr_ray.train_driver import split_datasets

    need = (rows["train"] + rows["valid"]) * (max_len * 8 + 5 * 8)  # item_seq + 4 ids (int64) + label
    store = float(ray.cluster_resources().get("object_store_memory", 0))
    if need > SHARED_DATA_FRACTION * store:
        log.info("trials read the splits themselves: ~%.0f MiB is over %.0f%% of the object store (%.0f MiB)",
                 need / 2**20, 100 * SHARED_DATA_FRACTION, store / 2**20)
        return {}
    shared = {split: ds.materialize() for split, ds in split_datasets(data_dir, max_len, ordered).items()}
    log.info("splits read once for every trial: ~%.0f MiB in the object store", need / 2**20)
    return {max_len: shared}


def run_trial(config: dict[str, Any], space: SearchSpace, tune_dir: str, data_dir: str,
              settings: dict[str, Any], datasets: dict[int, dict[str, Any]] | None = None,
              sharing: int = 1, verbose: bool = False) -> None:
    """The Tune function trainable: one ``mmctr train`` run in ``TUNE/trials/<trial_id>``, its CPU workers sharing
    their node's cores with those of ``sharing`` trials in all (:func:`trials_per_node`); ``verbose`` (``mmctr tune
    -v``, not kept for a resume) shows Ray Train's and Ray Data's own lines of the run, as ``mmctr train -v`` does."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mmctr_ray.checkpoint import BEGAN, DIVERGED, checkpoint_epoch, latest_checkpoint
    from mmctr_ray.config import save_config
    from mmctr_ray.report import epoch_report, read_metrics
    from mmctr_ray.train_driver import run_training
    from mmctr_ray.tune_report import STARTED, in_this_search

    tdir, data = Path(tune_dir), Path(data_dir)
    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = tdir / "trials" / trial_id
    history = read_metrics(run_dir, missing_ok=True)
    resume = (run_dir / "config.yaml").is_file() and any(run_dir.glob("checkpoint_epoch_*"))
    if resume and not (run_dir / "summary.json").is_file():  # rank 0 writes an epoch's row before Ray copies its
        latest = latest_checkpoint(run_dir)  # checkpoint: a kill between the two left a row the run trains again
        history = [row for row in history if row["epoch"] <= ((checkpoint_epoch(latest) or 0) if latest else 0)]
    if resume or (run_dir / "summary.json").is_file():
        # a trial the driver had started before it was restarted: Tune hears its epochs again (no retraining), as
        # the run reported them
        for row in history:
            ray.tune.report(epoch_report(row, history))
        if (run_dir / "summary.json").is_file():
            return
    if (run_dir / DIVERGED).is_file():  # an errored trial that --resume retries: at its lr it would diverge again
        raise ConfigError(f"{run_dir}: {(run_dir / DIVERGED).read_text().strip()}")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    params = run_dir.with_suffix(".params.json")
    if not params.is_file():  # written once, when the trial first starts (its time orders the results table), and
        # before its config: a failing trial has its row
        storage.write_text(params, storage.json_text({**config, STARTED: round(time.time(), 6)}, indent=2) + "\n")
    if resume:  # it continues as it started, on its own fused table: a source rewritten since gives new trials
        saved = load_config(run_dir / "config.yaml")  # new fits, not this one (its checkpoints learnt the old)
        cfg = in_this_search(saved, tdir)
        if cfg != saved:  # TUNE has moved: the run continues on the table here
            save_config(cfg, run_dir / "config.yaml")
    else:
        cfg = _trial_config(space, config, tdir, data, settings["source"])
    # no trial starts after the time budget: one whose workers come later (on a cluster, trials beyond what fits
    # wait for resources) ends without training, unless it began in time (a resumed search's unfinished trial,
    # which starts again from its first epoch if it had no checkpoint: RUN is then emptied, and marked again)
    deadline = settings.get("deadline")
    start_by = math.inf if deadline is not None and (run_dir / BEGAN).is_file() else deadline
    try:
        run_training(data, str(run_dir), cfg, workers=settings["workers"],
                     gpus_per_worker=settings["gpus_per_worker"], cpus_per_worker=settings["cpus_per_worker"],
                     resume=resume, overwrite=not resume, callbacks=[TuneReportCallback()],
                     datasets=(datasets or {}).get(cfg.data.max_len), runs_per_node=sharing, verbose=verbose,
                     start_by=start_by)
    except NotStarted:  # a trial without a result: the driver's progress line and results.csv say why
        return


def progress_line(trials: list[Any], trial: Any, outcome: str, total: int, elapsed: float, ended_here: int,
                  budget_left: float | None = None) -> str:
    """One line for the log when ``trial`` ends: its result, the best so far and the search's pace (the time left
    assumes the pace of the trials this driver saw end; with a time budget, also the time until the last start)."""
    result = trial.last_result or {}
    scored = [(auc, t.trial_id) for t in trials  # a NaN or -inf AUC ranks nothing (a NaN first in line stayed max's)
              if (auc := (t.last_result or {}).get(METRIC)) is not None and math.isfinite(auc)]
    ended = sum(t is trial or t.status in ("TERMINATED", "ERROR") for t in trials)
    running = sum(t is not trial and t.status == "RUNNING" for t in trials)
    last = result.get("epoch", "?")
    at = result.get("best_epoch") or last  # none before 2026-12-03, or before a finite AUC
    auc = (f"best valid AUC {result[METRIC]:.4f}{se_text(result.get('best_valid_auc_se'))} at epoch {at}"
           f"{f' of {last}' if at != last else ''}") if METRIC in result else (
        "its workers were up after the time budget" if outcome == "not started" else "no epoch")
    top = max(scored, default=None)
    best = f"best so far {top[0]:.4f} ({top[1]})" if top else "no result yet"
    pace = elapsed / ended_here if ended_here else float("nan")
    left = f"~{(total - ended) * pace / 60:.1f} min left"
    if ended >= total and not running:  # the last trial: "~0.0 min left" said it less plainly
        left = "every trial ended"
    elif budget_left is not None and budget_left <= 0:
        left = "time budget spent: no new trial starts"
    elif budget_left is not None:  # no trial starts after the budget; the last ones take about one trial's time
        left = f"~{min((total - ended) * pace, budget_left + pace) / 60:.1f} min left, new trials for " \
               f"{budget_left / 60:.1f} more min"
    drawn = drawn_fusion(getattr(trial, "config", None) or {})
    return (f"trial {trial.trial_id}{f' ({drawn})' if drawn else ''} {outcome}: {auc}; {best}; {ended}/{total} "
            f"ended, {running} running; {elapsed / 60:.1f} min, {left}")


def drawn_fusion(params: dict[str, Any]) -> str:
    """The item vectors a trial drew, for its progress line: ``v4 32+32``, ``v1 18``, ``given``; "" for a search
    that draws no ``fusion.*`` key (every trial has the base config's)."""
    widths = "+".join(str(params[f"fusion.{w}"]) for w in FUSION_WIDTHS if f"fusion.{w}" in params)
    return " ".join(str(part) for part in (params.get("fusion.strategy"), widths) if part)


class _Progress:
    """A Tune callback on the driver: one log line per ended trial (:func:`progress_line`), so a search can be
    watched without Tune's status tables. ``setup`` runs again when a search resumes, so the pace restarts there."""

    def __new__(cls, tune_dir: Path, max_epochs: int, deadline: float | None = None):  # built lazily: importing
        # this module stays light
        from ray.tune import Callback

        from mmctr_ray.tune_report import asha_stopped, trial_outcome

        class Progress(Callback):
            def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None,
                      **info: Any) -> None:
                self.total = total_num_samples or num_samples or 0
                self.t0, self.ended_here = time.monotonic(), 0

            def _log(self, trials: list, trial: Any, outcome: str | None = None) -> None:
                self.ended_here += 1
                epochs = int((trial.last_result or {}).get("epoch") or 0)
                from mmctr_ray import tuning  # read at call time: a callback restored from an older TUNE path

                base = Path(tuning.tune_dir_now or tune_dir)
                outcome = outcome or trial_outcome(base / "trials" / trial.trial_id, epochs, max_epochs,
                                                   asha_stopped(base))
                log.info("%s", progress_line(trials, trial, outcome, max(self.total, len(trials)),
                                             time.monotonic() - self.t0, self.ended_here,
                                             None if deadline is None else deadline - time.time()))

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                _retried_completed(trial.trial_id, trial.last_result)
                self._log(trials, trial)

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                _retried_completed(trial.trial_id, None, error=True)
                self._log(trials, trial, "failed")

        return Progress()


class _SilentTrialProgress:
    """Tune's console reporter of trial results (the older one, which :func:`_tune_env` picks) in place of the one
    Tune adds, printing nothing: at ``verbose=0`` Tune's own still printed ``Trial run_trial_<id> completed. Last
    result: `` for a trial that ended without a result (one whose workers came after the time budget,
    :class:`NotStarted`), past its verbosity (Ray 2.60). :class:`_Progress` says what each trial did."""

    def __new__(cls):  # built lazily so importing this module does not import Ray Tune
        from ray.tune.progress_reporter import TrialProgressCallback

        class Silent(TrialProgressCallback):  # Tune adds none of its own beside one of this class
            def on_trial_result(self, *args: Any, **kwargs: Any) -> None:
                pass

            def on_trial_error(self, *args: Any, **kwargs: Any) -> None:
                pass

            def on_trial_complete(self, *args: Any, **kwargs: Any) -> None:
                pass

        return Silent()


class _ExitAfterTrials:
    """Test hook: a Tune callback that ends the driver process abruptly after ``$MMCTR_FAULT_TUNE_EXIT_AFTER_TRIALS``
    finished trials."""

    def __new__(cls):  # built lazily so importing this module does not import Ray Tune
        from ray.tune import Callback

        class ExitAfter(Callback):
            def __init__(self) -> None:
                self.done = 0

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                self.done += 1
                # read again now: Tune restores its callbacks on --resume, where the variable is unset
                if self.done >= int(os.environ.get(FAULT_ENV, "0") or 0) > 0:
                    os._exit(75)

        return ExitAfter()


_RETRYING: dict[str, Any] = {}  # trial id → the searcher collecting a retried errored trial's results


def _retried_completed(trial_id: str, result: dict | None, error: bool = False) -> None:
    """The end of a trial (from the driver's progress callback): a retried errored trial's reaches its searcher
    here, since Tune's ConcurrencyLimiter drops it (nothing happens when the searcher was told already)."""
    searcher = _RETRYING.get(trial_id)
    if searcher is not None:
        searcher.on_trial_complete(trial_id, result, error)


def not_started(trial_id: str) -> str | None:
    """Why a trial of the search this process runs did not train (:class:`NotStarted`), else None."""
    if tune_dir_now is None:
        return None
    path = Path(tune_dir_now) / "trials" / trial_id / NotStarted.FILE
    return path.read_text().strip() if path.is_file() else None


def startup_text(trials: int, startup: int, concurrent: int = 1) -> str:
    """What TPE does with a search of ``trials`` trials, ``concurrent`` at a time: it draws at random until
    ``startup`` trials have ended (completed or pruned; Optuna counts no failed or running one), so with several at a
    time up to ``startup + concurrent - 1`` start at random."""
    random = startup + concurrent - 1
    what = (f"TPE draws at random until {startup} trials have ended (search.startup_trials, completed or pruned)"
            + (f"; with {concurrent} at a time, up to {random} start before that" if concurrent > 1 else ""))
    if trials <= startup:
        return f"{what}: all {trials} of this search are random draws, a random search"
    if trials <= random:
        return f"{what}: this search of {trials} may be all random draws"
    return f"{what}, then models the results"


def _searcher() -> type:
    """OptunaSearch that tolerates a trial the SQLite study already finished (after the driver is killed, Tune's
    restored state can lag the study by the last trials, which then report again), and that starts no trial
    after its ``deadline`` (wall-clock seconds since the epoch, or None): Optuna's ``timeout`` semantics, where
    running trials finish and are kept. The deadline is saved with the searcher, so a resumed search keeps it."""
    import optuna
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class ResumableOptunaSearch(OptunaSearch):
        """An errored trial is told to the study as FAIL, which Optuna never reopens; ``--resume`` runs it again
        (``resume_errored``) under the same trial id, whose results OptunaSearch then drops ("already finished"):
        the study kept FAIL, so TPE and the importances never saw a trial that results.csv lists as completed,
        maybe the best. Its results are collected here instead and added to the study, on completion, as a new
        trial with the same parameters (the FAIL one stays: it did fail once). Tune's ``ConcurrencyLimiter``, which
        wraps this searcher whenever ``max_concurrent_trials`` is set, forgot the trial when it errored and drops
        its second completion, so the driver's progress callback hands that over (:func:`_retried_completed`)."""

        deadline: float | None = None

        def suggest(self, trial_id: str) -> dict | str | None:
            if self.deadline is not None and time.time() >= self.deadline:  # Tune asks no more after FINISHED
                log.info("time budget spent: no new trial starts; the running ones finish")
                return Searcher.FINISHED
            return super().suggest(trial_id)

        def _failed_before(self, trial_id: str) -> optuna.trial.FrozenTrial | None:
            """The study's trial of ``trial_id`` when it was told FAIL (an errored trial run again), else None."""
            if trial_id not in self._completed_trials or trial_id not in self._ot_trials:
                return None
            frozen = self._ot_study._storage.get_trial(self._ot_trials[trial_id]._trial_id)
            return frozen if frozen.state == optuna.trial.TrialState.FAIL else None

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.metric not in result:  # the last result of a trial that did not start, made by Tune (_tune_env)
                return
            if self._failed_before(trial_id) is not None:
                retried = self.__dict__.setdefault("retried", {})  # pickled with the searcher: kept on --resume
                retried.setdefault(trial_id, {})[int(result["training_iteration"])] = float(result[self.metric])
                # for the progress callback (this process's searcher, restored by Tune). The module's dict, looked up
                # now: Tune pickles this class by value, with a copy of the globals it names, so a searcher restored
                # by --resume wrote into that copy and the callback never found it
                from mmctr_ray import tuning

                tuning._RETRYING[trial_id] = self
                return
            try:
                super().on_trial_result(trial_id, result)
            except optuna.exceptions.UpdateFinishedTrialError:
                log.info("trial %s: finished in the study before the restart; its new results are not re-told",
                         trial_id)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            failed = self._failed_before(trial_id)
            values = self.__dict__.get("retried", {}).pop(trial_id, None)
            from mmctr_ray import tuning
            from mmctr_ray.asha import stops_recorded

            tuning._RETRYING.pop(trial_id, None)
            why = tuning.not_started(trial_id) if not error and self.metric not in (result or {}) else None
            if why is not None and failed is None and trial_id in self._ot_trials:  # FAIL (OptunaSearch would tell
                # a trial without a value PRUNED, which TPE ranks below every trial that ran): samplers and the
                # importances leave it out, and its user attribute says why
                self._ot_trials[trial_id].set_user_attr("not_started", why)
                return super().on_trial_complete(trial_id, result, error=True)

            pruned = not error and trial_id in stops_recorded()
            if failed is None and pruned:  # OptunaSearch tells a trial with a result COMPLETE, a stopped one too.
                # Tune gives the searcher no result of the epoch a scheduler stops at: reported here, it is the last
                # intermediate value, which Optuna takes as a PRUNED trial's value (told without one)
                value, step = (result or {}).get(self.metric), (result or {}).get("training_iteration")
                if value is not None and step is not None and trial_id in self._ot_trials:
                    try:
                        self._ot_trials[trial_id].report(float(value), int(step))
                    except optuna.exceptions.UpdateFinishedTrialError:  # pruned in the study just before the
                        # driver was killed, and stopped again on --resume: Tune took the error as the trial's,
                        # and each later --resume ran it again into the same error
                        log.info("trial %s: pruned in the study before the restart", trial_id)
                        self._completed_trials.add(trial_id)
                        return None
                result = {k: v for k, v in (result or {}).items() if k != self.metric}
            if failed is None or error or values is None:  # not a retry, a retry that failed again, or told already
                return None if failed is not None else super().on_trial_complete(trial_id, result, error)
            value = (result or {}).get(self.metric)
            if value is not None and not math.isfinite(value):  # no AUC to tell: Optuna refuses a NaN value (it
                value = None  # raised here, and the search with it); a FAIL, as OptunaSearch tells a live one
            if any(t.user_attrs.get("ray_trial_id") == trial_id for t in self._ot_study.get_trials(deepcopy=False)):
                # told already: the driver was stopped after add_trial and before Tune saved the searcher that
                # knew it, and --resume ran the trial again; a second copy would count the configuration twice
                log.info("trial %s: its retry is in the study already; not told again", trial_id)
                return None
            states = optuna.trial.TrialState
            state = states.PRUNED if pruned else states.COMPLETE if value is not None else states.FAIL
            self._ot_study.add_trial(optuna.trial.create_trial(
                params=failed.params, distributions=failed.distributions, value=value, state=state,
                intermediate_values=values, user_attrs={"retry_of_trial": failed.number, "ray_trial_id": trial_id}))
            ended = {states.PRUNED: "was pruned", states.COMPLETE: "completed",
                     states.FAIL: "ended without a finite AUC"}[state]
            log.info("trial %s: failed before the restart and %s now; told to the study as a new trial with the same "
                     "parameters (%s)", trial_id, ended, state.name)

    return ResumableOptunaSearch


def _scheduler(space: SearchSpace, records: Path) -> Any:
    """ASHA with every rung before the last epoch: a trial that survives them ends by returning (summary written,
    trainer released), never by a stop at its final epoch, which saves nothing and would race its summary. ASHA
    puts rungs at grace_period · reduction_factor^k up to max_t, so max_t is the epoch before the last (rungs at
    max_t itself do not stop trials with ``stop_last_trials=False``). With no epoch before the last to cut at,
    trials run to the end (Tune's FIFO scheduler). ASHA's rung records are kept in ``records`` for --resume
    (:mod:`mmctr_ray.asha`)."""
    from ray.tune.schedulers import FIFOScheduler

    from mmctr_ray.asha import ResumableASHA

    if not space.prunes:
        return FIFOScheduler()
    asha = ResumableASHA(records, metric=METRIC, mode="max", time_attr="epoch", max_t=space.max_epochs - 1,
                         grace_period=space.grace_period, reduction_factor=space.reduction_factor,
                         stop_last_trials=False)
    # empty records from the start (a new search): TUNE without asha.json is then a search older than the records,
    # whose stops are unknown (tune_report.asha_stopped). Written at the first result only, a search interrupted
    # before that called its running trials "pruned" and counted them as ended
    asha.save_records()
    return asha


# settings.json's values of the flags a resumed search takes from its start, when the flags are not given
RESUME_DEFAULTS = {"workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0, "source": "shipped"}


def check_resumable(tune_dir: str | Path, data_dir: str | Path) -> dict[str, Any]:
    """The settings.json of the search in ``tune_dir`` that a ``--resume`` on ``data_dir`` continues, or a one-line
    ConfigError: read before Ray starts (an edited search.yaml, another --data were said after Ray's start)."""
    tune_dir, data = Path(tune_dir).resolve(), {str(data_dir), str(Path(data_dir).resolve())}  # as given, or resolved
    saved = tune_dir / "settings.json"
    if saved.is_file() and not (tune_dir / "tune").is_dir():  # it ended before Tune began (reading the splits)
        raise ConfigError(f"{tune_dir}: nothing to resume: the search ended before its first trial (settings.json "
                          f"but no tune/); start it again with --overwrite")
    if not saved.is_file() or not (tune_dir / "tune").is_dir():
        raise ConfigError(f"{tune_dir}: nothing to resume (no settings.json and tune/ of an earlier `mmctr tune`)")
    old = read_settings(tune_dir, ("data", "overrides"))  # the flags' values: RESUME_DEFAULTS where a search lacks them
    _check_search_unchanged(tune_dir, old)
    if old["data"] not in data:
        raise ConfigError(f"{tune_dir}: the search ran on {old['data']}; resume it with that --data")
    return old


def _prepare(tune_dir: Path, search_yaml: Path | None, settings: dict[str, Any], resume: bool, overwrite: bool) -> dict:
    saved = tune_dir / "settings.json"
    if resume:
        old = check_resumable(tune_dir, settings["data"])
        flags = {"workers": "--workers-per-trial", "cpus_per_worker": "--cpus-per-worker",
                 "gpus_per_worker": "--gpus-per-trial / workers", "source": "--source"}
        # a flag at its default was most likely not given (the README's resume command gives none of them): a
        # search started with --workers-per-trial 2 and resumed without it was warned about it every time
        differ = [f"{flag} {old[key]}" for key, flag in flags.items()
                  if key in old and old[key] != settings[key] != RESUME_DEFAULTS[key]]
        if differ:
            log.warning("--resume continues the search with the settings it started with (%s), not this command "
                        "line's", ", ".join(differ))
        # Tune's errors and trial list as the earlier part ended: `mmctr report TUNE` during the resumed search read
        # every trial started since as "interrupted"; marked as resumed, its trial list is not used until the
        # search's end writes the file again (its errors are kept: the file may be all that records them)
        results = tune_dir / "tune_results.json"
        if results.is_file():
            storage.write_text(results, storage.json_text({**json.loads(results.read_text()), "resumed": True},
                                                          indent=2) + "\n")
        return old
    assert search_yaml is not None
    space = load_search(search_yaml, settings["overrides"])  # a bad search section fails before anything is written
    table = _base_table(space)
    if overwrite and table is not None and table.resolve().is_relative_to(tune_dir.resolve()):
        raise ConfigError(f"{table}: the base config's fused table (data.item_vector) lies in {tune_dir}, which "
                          f"--overwrite empties first; copy it out of there, or search into another --out")
    text = search_yaml.read_bytes()  # before --overwrite empties TUNE: it may be the search's own TUNE/search.yaml
    check_folder_kind("tune", tune_dir)  # what is not a search is said as such first, --overwrite or not
    if tune_dir.exists() and entries(tune_dir):  # lock files of outputs inside it aside
        if not overwrite and saved.is_file() and not (tune_dir / "tune").is_dir():
            raise OutputExistsError(f"{tune_dir}: holds a search that ended before its first trial (settings.json but "
                                    f"no tune/); pass --overwrite to start it again")
        if not overwrite:
            raise OutputExistsError(f"{tune_dir}: already holds a search; pass --resume to continue it or --overwrite "
                                    f"to replace it")
        shutil.rmtree(tune_dir)
    tune_dir.mkdir(parents=True, exist_ok=True)
    (tune_dir / "search.yaml").write_bytes(text)
    settings = {**settings, "search_sha256": _sha256(tune_dir / "search.yaml")}
    saved.write_text(storage.json_text(settings, indent=2) + "\n")
    began(tune_dir)  # a signal from here on leaves this command's search (cli._left_on_disk)
    return settings


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_search_unchanged(tune_dir: Path, settings: dict[str, Any]) -> None:
    """A resumed search draws from the space it began with (Tune restores its searcher, sampler and all): an edited
    ``TUNE/search.yaml`` would change the base config of its new trials only, and the results' columns."""
    path = tune_dir / "search.yaml"
    if settings.get("search_sha256") and path.is_file() and _sha256(path) != settings["search_sha256"]:
        raise ConfigError(f"{path}: changed since the search began; a resumed search draws from the space it began "
                          f"with (Tune restores its sampler), so the edit would reach only the base config of its "
                          f"new trials: restore the file, or start a new search from it (another --out)")


def trial_cpus(tune_dir: str | Path, resume: bool, workers: int, cpus_per_worker: float) -> float:
    """The CPUs one trial's training workers take: on ``resume``, those of the search as it started (its
    ``settings.json``), which the resumed search runs with whatever the command line says."""
    saved = Path(tune_dir) / "settings.json"
    if resume and saved.is_file():
        settings = read_settings(tune_dir, ("workers", "cpus_per_worker"))
        workers, cpus_per_worker = settings["workers"], settings["cpus_per_worker"]
    return TRIAL_DRIVER_CPU + workers * cpus_per_worker


def check_inputs(data_dir: str | Path, search_yaml: str | Path | None, overrides: list[str] = (),
                 resume: bool = False, workers: int = 1, source: str = "shipped", gpus_per_trial: float = 0.0,
                 num_samples: int | None = None, max_concurrent: int | None = None,
                 time_budget_s: float | None = None) -> tuple[dict[str, int], SearchSpace | None]:
    """Raise a one-line error, before Ray starts and before TUNE is touched, if the search cannot run: its
    YAML (search section and the experiment config under it), the data's splits, the raw vectors' file or the
    trial's resources; return the splits' rows and the search space read (None on ``resume``)."""
    check_resources(workers, gpus_per_trial)
    if resume and (num_samples is not None or max_concurrent is not None or time_budget_s is not None):
        raise ConfigError("--resume continues TUNE with the trial count, concurrency and time budget it started "
                          "with (Tune restores its own settings): drop --num-samples, --max-concurrent and "
                          "--time-budget-s")
    if time_budget_s is not None and time_budget_s <= 0:
        raise ConfigError(f"--time-budget-s must be > 0, got {time_budget_s:g}")
    if source != "shipped" and not source_file(data_dir, source).is_file():  # a URI: one line naming it
        raise DataError(f"{source}: missing file (--source is 'shipped' or a parquet written by `mmctr embed`)")
    if resume and search_yaml is not None:
        raise ConfigError("--resume continues TUNE with its own search.yaml: drop --config")
    if resume and overrides:  # they were dropped without a word: the search keeps the overrides it started with
        raise ConfigError("--resume continues TUNE with its own search.yaml and the --set values it started with "
                          "(settings.json): drop --set")
    if not resume and search_yaml is None:
        raise ConfigError("--config is required: an experiment YAML with a search: section")
    space = load_search(Path(search_yaml), list(overrides)) if search_yaml is not None else None
    table = _base_table(space) if space is not None else None
    if table is not None and not table.is_file():  # every trial that trains on it failed, one by one
        raise DataError(f"{table}: missing file (data.item_vector of {search_yaml}: the fused item table its trials "
                        f"train on unless they sample a fusion.* setting)")
    searched = next((p for p in space.params if p.key == "data.item_vector"), None) if space is not None else None
    missing = [v for v in (searched.values if searched is not None and searched.kind == "choice" else ())
               if v != "given" and not Path(str(v)).is_file()]
    if missing:  # passed every check, then each trial that drew it failed at its start
        raise DataError(f"{missing[0]}: missing file (a value of search.space.data.item_vector in {search_yaml}: a "
                        f"fused item table, or given)")
    rows = check_splits(data_dir, SPLITS)
    check_valid_labels(data_dir)
    if space is not None:  # the largest batch any trial can draw must fit the training split
        sizes = batch_sizes(space)
        checks = ((lambda: check_batch_size(max(sizes), rows["train"], workers), "the largest"),
                  (lambda: check_batch_norm_rows(min(sizes), workers, _can_be_on(space, "model.batch_norm")),
                   "the smallest"))
        for check, drawn in checks:  # named as the search's: the size may be one only its space draws
            try:
                check()
            except ConfigError as err:
                raise ConfigError(f"{search_yaml}: {err} ({drawn} train.batch_size a trial of this search can "
                                  f"have, from its base config or search.space)") from None
        uneven = [note for size in sorted(set(sizes)) if (note := batch_split_note(size, workers))]
        if uneven:
            log.warning("%s%s", uneven[0], f" (and {len(uneven) - 1} more of the space's batch sizes)"
                        if len(uneven) > 1 else "")
        _refuse_placeholders(data_dir, space, source)
        _check_fused_sizes(data_dir, space, source)
        _check_id_tables(data_dir, space)
    return rows, space


def _check_fused_sizes(data_dir: str | Path, space: SearchSpace, source: str) -> None:
    """A PCA size a trial can draw must fit its part: at most min(items − 1, input width) of the raw vectors (768 for
    the shipped BERT text, 384 for MiniLM's); every larger draw otherwise failed as an errored trial, which TPE
    learns nothing from. Read from the source's first rows."""
    from mmctr_ray.fuse import ItemSource
    from mmctr_ray.fusion import PARTS, part_limits

    sizes = space.fused_sizes()
    if not sizes:
        return
    needed = {m for strategy in sizes for _, inputs, _ in PARTS[strategy] for m in inputs}
    src = ItemSource(Path(data_dir), source, "v3" if needed == {"text", "image"} else
                     "v1" if needed == {"text"} else "v2")
    widths = src.input_widths()
    for strategy, by_size in sizes.items():
        limits = part_limits(strategy, src.num_rows, widths)
        for name, inputs, size in PARTS[strategy]:
            limit = limits[size]
            for value, where in by_size[size]:
                if value > limit:
                    raise ConfigError(f"{where}: {value} is wider than the {strategy} {name} PCA can be: at most "
                                      f"min(items − 1, input width) = min({src.num_rows - 1}, "
                                      f"{' + '.join(str(widths[m]) for m in inputs)}) = {limit} for the raw vectors "
                                      f"of {src.path}")


def _base_table(space: SearchSpace) -> Path | None:
    """The fused table the search's base config names (``data.item_vector``) when some trial may train on it
    (:func:`_trial_config`): one that does not sample ``fusion.strategy`` where the base's strategy is ``given``,
    or no ``fusion.*`` key at all where it is v1..v4; None when it names no table, or every trial samples so.
    Relative to the directory the search was started in, as ``mmctr train --config`` reads it."""
    base = space.trial_config({})
    always = {p.key for p in space.params if not p.when}  # sampled by every trial
    fuses = "fusion.strategy" in always if base.fusion.strategy == "given" else any(
        k.startswith("fusion.") for k in always)
    return None if base.data.item_vector == "given" or fuses else Path(base.data.item_vector)


def _refuse_placeholders(data_dir: str | Path, space: SearchSpace, source: str) -> None:
    """Data written by ``mmctr convert`` holds zero placeholder vectors: a trial fusing the shipped ones (``--source
    shipped``) or training on ``given`` fails at its start, so a search made only of such trials ended with every
    trial errored (and exit 0)."""
    if not has_placeholder_embeddings(data_dir):
        return
    base = space.trial_config({})
    picked = next((p for p in space.params if p.key == "fusion.strategy"), None)
    strategies = set(picked.values) if picked is not None else set()
    if picked is None or picked.when:  # trials that do not sample it: the base's strategy, fused from --source
        others = [p.key for p in space.params if p.key != "fusion.strategy"]  # what such a trial may sample
        if (_fits_in_trial(others, base) if base.fusion.strategy != "given" else base.data.item_vector == "given"):
            strategies.add(base.fusion.strategy)
    if strategies and (source == "shipped" or "given" in strategies):
        raise ConfigError(f"{data_dir}: converted by `mmctr convert`, its shipped embedding columns are zero "
                          f"placeholders, which trials of fusion.strategy {', '.join(sorted(strategies))} with "
                          f"--source {source} would train on: run `mmctr embed --data {data_dir} --out "
                          f"item_raw_emb.parquet`, then search v1..v4 with --source item_raw_emb.parquet")


def check_resources(workers: int, gpus_per_trial: float) -> None:
    """A trial's GPUs must split into workers Ray and NCCL accept: a share of one GPU for a single worker, whole
    GPUs each for two or more (two DDP ranks on one GPU fail in NCCL with "Duplicate GPU detected")."""
    if workers < 1:
        raise ConfigError(f"--workers-per-trial must be >= 1, got {workers}")
    if gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial must be >= 0, got {gpus_per_trial:g}")
    check_gpu_split(workers, gpus_per_trial / workers, "--gpus-per-trial", gpus_per_trial)


def _values(space: SearchSpace, key: str) -> list[Any]:
    """The values of ``key`` (``SECTION.NAME``) a trial of ``space`` can train with (a searched range as its two
    ends): the searched ones, and the base config's where the search may leave it (a conditional search, or none)."""
    section, name = key.split(".", 1)
    base = [getattr(getattr(space.trial_config({}), section), name)]
    searched = [p for p in space.params if p.key == key]
    if not searched:
        return base
    return [*searched[0].values, *(base if searched[0].when else [])]


def _can_be_on(space: SearchSpace, key: str) -> bool:
    """Whether a trial of ``space`` can train with the boolean ``key`` on."""
    return any(v is True for v in _values(space, key))


def _check_id_tables(data_dir: str | Path, space: SearchSpace) -> None:
    """The tag and user tables a trial can build must be dense enough (:func:`features.check_id_tables`, which each
    trial's run checks again): a search whose trials can turn on ``model.use_user_id`` over sparse user ids failed
    trial by trial, as errored trials TPE learns nothing from. The tables' cost is given at the largest
    ``model.embedding_dim`` a trial can draw."""
    from mmctr_ray.features import check_data_id_tables

    check_data_id_tables(data_dir, _can_be_on(space, "model.use_tags"), _can_be_on(space, "model.use_user_id"),
                         int(max(_values(space, "model.embedding_dim"))))


def batch_sizes(space: SearchSpace) -> list[int]:
    """The ``train.batch_size`` values a trial of ``space`` can use (:func:`_values`)."""
    return [int(v) for v in _values(space, "train.batch_size")]


def budget_spent(settings: dict[str, Any], now: float | None = None) -> bool:
    """Whether a search's time budget (its ``deadline`` in settings.json; none before 2026-12-03) has passed: Tune
    runs a resumed search's errored trials again whatever its searcher says, so the resume must not ask it to."""
    deadline = settings.get("deadline")
    return deadline is not None and (time.time() if now is None else now) >= deadline


def run_tuning(data_dir: str | Path, tune_dir: str | Path, search_yaml: str | Path | None, overrides: list[str] = (),
               num_samples: int | None = None, max_concurrent: int | None = None, gpus_per_trial: float = 0.0,
               workers: int = 1, cpus_per_worker: float = 1.0, source: str = "shipped", resume: bool = False,
               overwrite: bool = False, time_budget_s: float | None = None, verbose: bool = False,
               started: float | None = None) -> dict[str, Any]:
    """Run (or with ``resume`` continue) the search declared in ``search_yaml``; return the outputs' summary.
    With ``time_budget_s``, no trial starts once that many seconds have passed since ``started`` (wall-clock
    seconds since the epoch: when the command began, so Ray's start and the reading of the splits count; default
    now); the running ones finish, and a ``resume`` after that runs no errored trial again. With ``verbose`` each
    trial's run shows Ray Train's and Ray Data's own lines (:func:`run_trial`)."""
    import ray
    from ray import tune

    from mmctr_ray.tune_report import ASHA_RECORDS

    data, tdir = Path(data_dir).resolve(), Path(tune_dir).resolve()
    source = source if source == "shipped" else str(Path(source).resolve())  # trials run in their own folders
    settings = {"data": str(data), "workers": workers, "cpus_per_worker": cpus_per_worker,
                "gpus_per_worker": gpus_per_trial / workers, "source": source, "overrides": list(overrides)}
    if time_budget_s and not resume:  # kept in settings.json too: a resume after it runs no errored trial again
        settings["deadline"] = (time.time() if started is None else started) + time_budget_s
    rows, asked = check_inputs(data, search_yaml, overrides, resume, workers, source, gpus_per_trial, num_samples,
                               max_concurrent, time_budget_s)
    elastic = not private_local_ray()
    if asked is not None:  # a new search: one that cannot fit fails before anything is written; Tune never runs
        # more trials at once than the search has, so the cores of the rest are shared out too. settings.json
        # keeps the count for --resume
        fits = trial_concurrency(ray.cluster_resources(), workers, cpus_per_worker, settings["gpus_per_worker"],
                                 max_concurrent, elastic)
        settings["concurrency"] = min(fits, num_samples or asked.num_samples)
        table = _base_table(asked)
        if table is not None and not table.is_absolute():  # trials run in their own folders (Tune changes into
            # them), where it named another file; kept in settings.json, so a resume reads it from anywhere
            settings["overrides"].append(f"data.item_vector={yaml_string(str(table.resolve()))}")
    settings = _prepare(tdir, Path(search_yaml) if search_yaml else None, settings, resume, overwrite)
    # a new search's was checked as check_inputs and _prepare read it; a resumed search's is read as it began
    space = load_search(tdir / "search.yaml", settings["overrides"], strict=False)
    if resume:  # its own concurrency, which Tune restores: the thread share follows it (before: what fits now, so 2
        # trials of 16 CPUs got a 15th each; and a GPU search on an autoscaling cluster with no GPU node up yet could
        # not resume at all). A search from before the count was kept: what fits now, as then
        k = trial_concurrency(ray.cluster_resources(), settings["workers"], settings["cpus_per_worker"],
                              settings["gpus_per_worker"], settings.get("concurrency"), elastic, resumed=True)
    else:
        k = settings["concurrency"]
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # save the experiment state often: cheap, and resumable
    base = space.trial_config({})
    datasets = shared_datasets(data, base.data.max_len, rows, ordered=base.train.deterministic)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, space=space, tune_dir=str(tdir), data_dir=str(data), settings=settings,
                             datasets=datasets, sharing=trials_per_node(_node_cpus(), k, settings["workers"],
                                                                        settings["cpus_per_worker"]),
                             verbose=verbose),
        {"CPU": TRIAL_DRIVER_CPU, "memory": TRIAL_DRIVER_MEMORY})
    fault = int(os.environ.get(FAULT_ENV, "0"))
    deadline = settings.get("deadline") if not resume else None
    callbacks = [_Progress(tdir, space.max_epochs, deadline), _SilentTrialProgress(),
                 *([_ExitAfterTrials()] if fault else [])]
    run_config = tune.RunConfig(name="tune", storage_path=str(tdir), callbacks=callbacks, verbose=0)
    import mmctr_ray.asha
    import mmctr_ray.study

    study_url = mmctr_ray.study.sqlite_url(tdir)

    mmctr_ray.asha.records_path = str(tdir / ASHA_RECORDS)  # the restored scheduler may hold an older TUNE path
    mmctr_ray.study.url = study_url  # and the restored searcher an older optuna.db
    global tune_dir_now
    tune_dir_now = str(tdir)  # and the restored progress callback an older TUNE
    if resume:
        log.info("resuming the search in %s (its own trial count and concurrency, %d at a time)", tdir, k)
        spent = budget_spent(settings)
        if spent:
            log.info("its time budget is spent: no trial starts, errored ones included; the unfinished ones finish")
        tuner = tune.Tuner.restore(str(tdir / "tune"), trainable=trainable, resume_errored=not spent)
    else:
        import optuna

        if not logging.getLogger().isEnabledFor(logging.DEBUG):  # Optuna's own "[I ...] A new study created in RDB
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # with name: mmctr" line, in a format of its own,
            # with -v only: the next line says more
        sampler = optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=space.startup_trials)
        searcher = _searcher()(space=space.define_by_run, metric=METRIC, mode="max", sampler=sampler,
                                study_name=STUDY_NAME,
                                storage=mmctr_ray.study.StudyStorage(study_url))
        searcher.deadline = deadline
        scheduler = _scheduler(space, tdir / ASHA_RECORDS)
        n = num_samples or space.num_samples
        log.info("searching %d trials, %d at a time%s (Ray: %s)", n, k,
                 f", none started after {time_budget_s:g} s" if time_budget_s else "", ray.cluster_resources())
        log.info(startup_text(n, space.startup_trials, k))
        tuner = tune.Tuner(trainable, run_config=run_config,
                           tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=n,
                                                       max_concurrent_trials=k))
    watch, tune_log, analysis_log = _CtrlC(), logging.getLogger("ray.tune.tune"), logging.getLogger(ANALYSIS_LOGGER)
    tune_log.addFilter(_no_tuner_restore_hint)
    analysis_log.addFilter(_no_missing_metrics)
    try:
        with sigterm_flag() as seen, _quiet_replay(), _tune_env():
            results = tuner.fit()
    except SystemExit:  # SIGTERM: Ray's driver handler exits; Tune saved the search's state as it went
        if not seen["sigterm"]:
            raise
        raise Interrupted("the search's state is saved as it goes (every 2 s)", signal.SIGTERM) from None
    finally:  # this search's paths served what Tune restored; a later search in this process sets its own
        mmctr_ray.asha.records_path = mmctr_ray.study.url = tune_dir_now = None
        interrupted = watch.pressed()
        tune_log.removeFilter(_no_tuner_restore_hint)
        analysis_log.removeFilter(_no_missing_metrics)
    return end_of_search(tdir, space, results, interrupted)


def trial_error_line(err: BaseException) -> str:
    """One line for a failed trial (tune_results.json): the user error behind it (bad input, a config the trial
    drew), else the innermost error Ray wraps, by type and first line. Tune's error's own first line is Ray's
    ``ray::ImplicitFunc.train() (pid=…)`` header, and an error without a message has no line at all."""
    user = find_user_error(err)
    inner: BaseException = user if user is not None else err
    while user is None and isinstance(getattr(inner, "cause", None), BaseException):
        inner = inner.cause  # type: ignore[attr-defined]
    text = str(inner).strip()
    return f"{type(inner).__name__}: {text.splitlines()[0]}" if text else type(inner).__name__


def end_of_search(tdir: Path, space: SearchSpace, results: Any, interrupted: bool) -> dict[str, Any]:
    """Write the search's outputs once ``Tuner.fit()`` returned ``results``; return the summary. After Ctrl-C
    (``interrupted``) they are written too, as what the search has so far, and Interrupted says so."""
    from mmctr_ray.tune_report import COUNTED, write_outputs

    errors = {Path(r.path).name: trial_error_line(r.error) for r in results if r.error}
    known = [Path(r.path).name for r in results]
    if not interrupted:
        _close_orphans(tdir)  # after Ctrl-C the trials still running are not orphans: --resume resumes them
        saved = tdir / "settings.json"
        began = [p for p in (tdir / "trials").glob("*.params.json")  # trials whose workers were up in time
                 if not (p.with_name(p.name.removesuffix(".params.json")) / NotStarted.FILE).is_file()]
        if not began and not errors and saved.is_file() and budget_spent(json.loads(saved.read_text())):
            # rather than "no trial has started yet", or a table of trials that did not start
            raise ConfigError(f"{tdir}: the time budget ran out before the first trial started (Ray's start, the "
                              f"reading of the splits and the wait for the trials' workers count); start the search "
                              f"again with --overwrite and a larger --time-budget-s")
        return write_outputs(tdir, space, errors, known)
    try:  # what the search has so far, said to be so
        summary = write_outputs(tdir, space, errors, known)
    except DataError:  # no trial folder yet
        raise Interrupted("no trial had started") from None
    ended = sum(summary[s] for s in COUNTED)
    lost = summary["interrupted"]  # started after Tune's last saved state: --resume draws new trials instead
    running = f"{summary['trials'] - ended - lost} started and not ended (--resume continues them)" + (
        f", {lost} interrupted before Tune saved them (--resume starts new trials instead)" if lost else "")
    kept = f"{summary['results']}{' and best.yaml' if summary.get('best_yaml') else ''} hold them so far"
    raise Interrupted(f"{ended} trial{'' if ended == 1 else 's'} ended ({kept}), {running}" if ended
                      else f"no trial ended, {running}")


def _no_tuner_restore_hint(record: logging.LogRecord) -> bool:
    """A filter for Tune's log: after Ctrl-C Tune says "Resume experiment with: Tuner.restore(path=...,
    trainable=...)", which is not how a search of mmctr resumes; the command's own last line says how. Its "Stop
    signal received ... Press CTRL+C ... to skip" stays: it says how to cut short the last save it waits for."""
    return not record.getMessage().startswith("Experiment has been interrupted")


ANALYSIS_LOGGER = "ray.tune.analysis.experiment_analysis"


def _no_missing_metrics(record: logging.LogRecord) -> bool:
    """A filter for the log of Tune's result table: a trial stopped (Ctrl-C, a kill) before its first epoch has no
    results file, and Tune warns "Failed to fetch metrics for 1 trial(s)" with a FileNotFoundError, after Ctrl-C
    and again on ``--resume``. The search's own outputs (results.csv) count such a trial as it is. A warning
    that lists any other failure (a results file damaged or unreadable) stays whole."""
    first, *failures = record.getMessage().splitlines()
    return not (first.startswith("Failed to fetch metrics for") and failures
                and all(": FileNotFoundError(" in line for line in failures))


REPLAY_NOISE = re.compile(r"Cannot tell a (COMPLETE|PRUNED) trial")
OPTUNA_SEARCH_LOGGER = "ray.tune.search.optuna.optuna_search"


def _no_replay_noise(record: logging.LogRecord) -> bool:
    """A filter for OptunaSearch's log: a trial the search had started before it was stopped replays its epochs on
    ``--resume`` (:func:`run_trial`), and one the study had already closed as complete or pruned (it ended in the
    seconds before a kill, before Tune saved its state) is told again, which Optuna refuses with a warning. The
    study keeps its first, same result. "Cannot tell a FAIL trial" (a result that would be lost) still shows."""
    return not REPLAY_NOISE.match(record.getMessage())


@contextlib.contextmanager
def _quiet_replay() -> Any:
    """While a search runs: no warnings for what a resumed trial's replayed epochs tell Optuna again (each epoch's
    intermediate value, already in the study: "The reported value is ignored because this `step=1` is already
    reported"; a closed trial's end: :func:`_no_replay_noise`)."""
    search_log = logging.getLogger(OPTUNA_SEARCH_LOGGER)
    search_log.addFilter(_no_replay_noise)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"The reported value is ignored because this `step=\d+` is already "
                                              r"reported", UserWarning)
            yield
    finally:
        search_log.removeFilter(_no_replay_noise)


NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"  # Ray's switch between Tune's two console reporters (default "1": the new one)
STRICT_METRIC_ENV = "TUNE_DISABLE_STRICT_METRIC_CHECKING"  # "1": Tune takes a result without the searched metric


@contextlib.contextmanager
def _tune_env() -> Any:
    """While a search runs, two of Tune's settings (read by the driver as results come), put back after:

    * Tune's console output off. Its newer reporter prints a table of the searcher and scheduler, the experiment's
      folder and a TensorBoard hint (naming Ray's session folder, not the search's) at ``verbose=0`` too; the older
      one, which ``RAY_AIR_NEW_OUTPUT=0`` picks as Tune starts, prints nothing at ``verbose=0``. :class:`_Progress`
      says what the search does, one line a trial, and where its results are.
    * Tune's check that every result holds the searched metric. When a trial function returns without reporting,
      Tune makes its last result itself, which the check exempts only for a trial without a config (the config's
      flattened keys count as metrics): a trial that did not start (:class:`NotStarted`) ended the whole search in
      a ValueError. Every trial that trains reports the metric with each epoch (``TuneReportCallback``); ASHA and
      the searcher pass over a result without it.
    """
    before = {key: os.environ.get(key) for key in (NEW_OUTPUT_ENV, STRICT_METRIC_ENV)}
    os.environ.update({NEW_OUTPUT_ENV: "0", STRICT_METRIC_ENV: "1"})
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _CtrlC:
    """Whether Ctrl-C ended ``Tuner.fit()``, which returns as if the search were done. Tune (2.60) installs its own
    SIGINT handler for the search and, on the first Ctrl-C, saves the search's state and puts back the handler it
    found: a marker handler installed before ``fit`` is therefore back in place exactly when Ctrl-C was pressed (or
    SIGUSR1, which Tune takes the same way). Only in the main thread (elsewhere neither can install a handler), and
    not when ``TUNE_DISABLE_SIGINT_HANDLER`` keeps Tune's handler out (Ctrl-C is then a KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.before = self.marker = None
        if (threading.current_thread() is threading.main_thread()
                and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))):
            self.before = signal.getsignal(signal.SIGINT)

            def marker(signum: int, frame: Any) -> None:  # a second Ctrl-C: what was there before
                if callable(self.before):
                    self.before(signum, frame)
                elif self.before != signal.SIG_IGN:
                    raise KeyboardInterrupt

            self.marker = marker
            signal.signal(signal.SIGINT, marker)

    def pressed(self) -> bool:
        if self.marker is None:
            return False
        pressed = signal.getsignal(signal.SIGINT) is self.marker
        signal.signal(signal.SIGINT, signal.SIG_DFL if self.before is None else self.before)  # None: not set in Python
        return pressed


def _close_orphans(tdir: Path) -> None:
    """Once the search has ended no trial runs, but the study still shows RUNNING the trials Optuna was asked
    for after Tune's last saved state when the driver was killed (the resumed searcher never tells them): mark
    them FAIL, so optuna-dashboard and the sampler see them as ended."""
    import optuna

    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tdir}/optuna.db")
    for trial in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        log.info("study trial %d: started before the driver was killed and never resumed; marked failed",
                 trial.number)
