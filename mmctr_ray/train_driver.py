"""``mmctr train``: the driver that builds a Ray Train ``TorchTrainer`` and writes the run directory.

RUN (a local path, on a cluster one on shared storage such as NFS, or a storage URI such as ``s3://bucket/run``:
see :mod:`mmctr_ray.storage`) receives ``config.yaml`` (resolved), ``feature_map.json``, ``metrics.jsonl`` (one
line per epoch), ``tensorboard/``, ``checkpoint_epoch_NNN/`` (one per epoch) and ``summary.json`` (best epoch and
its checkpoint) at the end. RUN is Ray Train's experiment folder (``RunConfig(storage_path=parent of RUN,
name=last part of RUN)``), so the checkpoints Ray persists land beside the files written here; Ray adds its own
bookkeeping files (``checkpoint_manager_snapshot.json``, ``.validate_storage_marker``).
An existing RUN is never overwritten without ``overwrite``, which keeps the run it replaces beside RUN until the
new run has kept a checkpoint (:func:`_prepare_run_dir`); ``resume`` continues it from its latest checkpoint with its
own saved config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import posixpath
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from mmctr_ray import storage
from mmctr_ray.checkpoint import (DIVERGED, best_checkpoint, checkpoint_epoch, kept_checkpoints,
                                  latest_checkpoint, read_state)
from mmctr_ray.config import ExperimentConfig, TrainConfig, load_config, save_config
from mmctr_ray.errors import (ConfigError, DataError, Interrupted, NotStarted, OutputExistsError, StorageError,
                              UserError, WorkersFailed, dead_worker, find_cause, find_user_error,
                              first_line, worker_failure_reason)
from mmctr_ray.features import (FeatureMap, build_feature_map, check_id_tables, check_same_table, load_item_table,
                                read_split)
from mmctr_ray.host_malloc import worker_env
from mmctr_ray.locking import (began, check_folder_kind, entries, keep_aside, not_begun,
                               replaced_location)
from mmctr_ray.preflight import (batch_split_note, check_batch_norm_rows, check_batch_size, check_splits,
                                 check_valid_labels)
from mmctr_ray.ray_env import (check_gpu_split, check_local_pool, check_pool, private_local_ray, sigterm_flag,
                               torch_trainer)
from mmctr_ray.report import best_epoch, describe_run
from mmctr_ray.schema import SPLITS, Layout
from mmctr_ray.torch_backend import train_in_worker

log = logging.getLogger(__name__)
FAULT_ENV = "MMCTR_FAULT_KILL_AT_STEP"  # "STEP:MARKER_FILE": recovery tests kill rank 0 once at STEP, or right after
# it reported epoch E with "reportE:MARKER_FILE"; "rR/..." kills rank R instead; several, comma-separated, each once
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and needs about two
# polls to notice that training ended, so every run paid ~4.5 s after its last epoch (measured on a 20k-row run:
# 4.3 s at 2 s, 1.3 s at 0.5 s, 0.55 s at 0.25 s). A poll is one small actor call per worker. A value the user sets
# in the environment wins; the driver's environment reaches the controller and the workers.
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = "0.25"


def run_location(run_dir: str | Path) -> storage.Location:
    """RUN as an absolute local path or a URI whose filesystem resolves; it needs a parent folder, since Ray
    Train writes into ``storage_path/name``."""
    run = storage.normalize(run_dir)
    _, path = storage.resolve(run)
    if not posixpath.basename(path) or posixpath.dirname(path) in ("", path):
        raise ConfigError(f"{run_dir}: a run needs its own folder below the storage root (e.g. s3://bucket/runs/r1)")
    return run


def _absolute_item_vector(cfg: ExperimentConfig) -> ExperimentConfig:
    """Workers change directory: a fused item-vector file is recorded by its absolute path."""
    if cfg.data.item_vector == "given":
        return cfg
    data = dataclasses.replace(cfg.data, item_vector=str(Path(cfg.data.item_vector).resolve()))
    return dataclasses.replace(cfg, data=data)


def _check_run_dir(run: storage.Location, cfg: ExperimentConfig, resume: bool, overwrite: bool) -> None:
    """Raise a one-line error unless RUN can take this run (a resumable run, an empty or missing folder, or a run
    to replace with ``overwrite``); writes nothing."""
    config_path = storage.join(run, "config.yaml")
    if resume:
        if not storage.is_file(config_path):
            raise ConfigError(f"{run}: nothing to resume (no config.yaml of an earlier `mmctr train`)")
        from mmctr_ray.tune_report import config_here  # a moved pipeline OUT's or search's table, where it is now

        saved = config_here(load_config(config_path), run)
        for section in ("data", "fusion", "model"):
            was, now = getattr(saved, section).__dict__, getattr(cfg, section).__dict__
            key = next((k for k in was if was[k] != now[k]), None)
            if key is not None:
                raise ConfigError(f"{run}: --resume with {section}.{key}={now[key]!r} where the run's config.yaml "
                                  f"has {was[key]!r}; only train.* may change when resuming")
    else:
        check_folder_kind("train", run)  # what is not a run is said as such first, --overwrite or not
        if entries(run) and not overwrite:
            raise OutputExistsError(f"{run}: already holds a run; pass --resume to continue it or --overwrite "
                                    f"to replace it")


def stop_reason(state: dict[str, Any], train: TrainConfig) -> str | None:
    """Why the schedule ended a run after its latest checkpoint (its ``state.json``, with the ``train`` section it
    was trained with): early stop or the last epoch; None where neither ended it (a search's scheduler did, or a
    run stopped before its end)."""
    epoch, bad = state["epoch"], state["bad_epochs"]
    if bad >= train.patience:
        return (f"early stop: {bad} epoch{'s' * (bad != 1)} without a better valid AUC, "
                f"train.patience={train.patience}")
    if epoch >= train.epochs:
        return f"train.epochs={train.epochs} reached"
    return None


def _nothing_to_train(run: storage.Location, cfg: ExperimentConfig) -> str | None:
    """Why a ``--resume`` of ``run`` with ``cfg`` would train no epoch (it has trained ``train.epochs``, or stopped
    early at ``train.patience``), or None: said before Ray starts, instead of a Ray Train run that trains nothing."""
    latest = latest_checkpoint(run)
    if latest is None:
        return None
    state = read_state(latest)
    t, epoch, bad = cfg.train, state["epoch"], state["bad_epochs"]
    if epoch >= t.epochs:
        return (f"it has trained {epoch} epoch{'s' * (epoch != 1)}, and train.epochs={t.epochs}; pass --set "
                f"train.epochs=N with N above {epoch} to train more")
    if bad >= t.patience:
        return (f"after epoch {epoch} it has had {bad} epoch{'s' * (bad != 1)} without a better valid AUC, and "
                f"train.patience={t.patience} (early stop); pass a larger --set train.patience=N to train more")
    return None


def _prepare_run_dir(run: storage.Location, cfg: ExperimentConfig, resume: bool, overwrite: bool,
                     keep_replaced: bool = True) -> storage.Location | None:
    """Make RUN ready for this attempt; return where the run an ``overwrite`` replaces waits (None when there was
    none, or ``keep_replaced`` is off: it is deleted at once, as a search's trial folders are); with ``resume``,
    where an interrupted ``overwrite`` of RUN left it, if it did.

    A run is replaced only once its successor has kept a checkpoint (:func:`_end_replacing`): bad input a worker met
    (rows the checks before Ray did not read), a first epoch that diverged or workers that died ended the new run
    after RUN had been deleted, so a good run was lost to a command that trained nothing. An ``overwrite`` after one
    that ended before its first checkpoint keeps the run that one set aside, not the checkpointless attempt."""
    _check_run_dir(run, cfg, resume, overwrite)
    aside = replaced_location(run) if keep_replaced and (resume or overwrite) else None  # a plain train's: not its
    moved = False
    if resume:
        # this attempt decides anew; until it ends, the run is not complete
        for name in (DIVERGED, NotStarted.FILE, "summary.json"):
            storage.remove_file(storage.join(run, name))
        if aside is not None and not storage.exists(aside):  # else: an --overwrite interrupted before it kept a
            aside = None  # checkpoint, continued: it replaces the earlier run once it keeps one
    elif not storage.listdir(run):
        aside = aside if aside is not None and storage.exists(aside) else None
    elif aside is None:
        storage.empty_dir(run)
    elif storage.exists(aside) and latest_checkpoint(run) is None:  # RUN: an attempt that kept no checkpoint
        log.info("%s: replacing an attempt that kept no checkpoint; the run an earlier --overwrite set aside stays "
                 "in %s until this one has kept a checkpoint", run, aside)
        storage.empty_dir(run)
    else:
        _drop_replaced(run)  # the run that replaced it has a checkpoint (a killed --overwrite, resumed)
        log.info("%s: the run it holds waits in %s until this one has kept a checkpoint", run, aside)
        aside, moved = _set_aside(run, aside), True
    keep_aside(run, aside)
    try:
        storage.make_dir(run)
        save_config(cfg, storage.join(run, "config.yaml"))
    except BaseException as err:  # before Ray Train's try: the run set aside goes back as after a failed attempt
        if moved and aside is not None:
            _end_replacing(run, aside, err)
        raise
    began(run)  # a signal from here on leaves this command's run (cli._left_on_disk)
    return aside


def _drop_replaced(run: storage.Location) -> None:
    """Delete, with a warning, the run an earlier ``--overwrite`` of RUN kept aside, if there is one: called where
    RUN holds a checkpoint, so the run that replaced it is what RUN keeps."""
    aside = replaced_location(run)
    if storage.exists(aside):
        log.warning("%s: deleting the run an earlier `--overwrite` of %s kept there (the run that replaced it has a "
                    "checkpoint)", aside, run)
        storage.remove_dir(aside)


def _set_aside(run: storage.Location, aside: storage.Location) -> storage.Location | None:
    """Move RUN to ``aside``; return it, or None where a local RUN cannot be renamed (a mount point, a folder whose
    parent this user cannot write): then RUN's files are deleted, with a warning, as --overwrite did before. On an
    object store the move is a copy, then a delete: a copy that fails leaves RUN as it was (the partial copy is
    deleted) and a delete that fails leaves the copy whole; either way the error is the command's, and a warning
    names the copy."""
    if storage.local_path(run) is None:
        try:
            storage.copy_dir(run, aside)
        except BaseException:
            with contextlib.suppress(Exception):
                storage.remove_dir(aside)
            raise
        try:
            storage.empty_dir(run)
        except BaseException:
            log.warning("%s: the run it held is copied whole to %s, and only part of it deleted", run, aside)
            raise
        return aside
    try:
        storage.move_dir(run, aside)
    except OSError as err:
        log.warning("%s: cannot keep the run it holds in %s (%s): its files are deleted now, as --overwrite did "
                    "before 2026-12-07", run, aside, first_line(err))
        storage.empty_dir(run)
        return None
    return aside


def _end_replacing(run: storage.Location, aside: storage.Location, err: BaseException | None,
                   put_back: bool = True) -> None:
    """After an attempt of an ``overwrite`` ended (``err``: how it failed, None when it completed), the run it
    replaces (in ``aside``) is deleted once the new one holds a checkpoint (which --resume continues from). Failed
    before, it is put back in RUN, no worker writing to RUN any more, and the error's line says so; not ``put_back``
    (a ``resume`` of the new run), or ended by a signal (Ctrl-C, SIGTERM: the workers of an interrupted training may
    still be copying a checkpoint into RUN), it stays in ``aside``, and the line says where (:class:`Interrupted`'s
    here, a signal's before training in :func:`mmctr_ray.cli._left_on_disk`)."""
    try:
        if err is None or latest_checkpoint(run) is not None:
            storage.remove_dir(aside)
            keep_aside(run, None)
            return
        if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: the command's line names it
            return
        if put_back and not isinstance(err, Interrupted):
            storage.remove_dir(run)
            storage.move_dir(aside, run)
            keep_aside(run, None)
            not_begun(run)  # what RUN holds is no longer this command's (cli._left_on_disk)
            said = f"{run} holds again the run --overwrite was to replace (this command kept no checkpoint)"
        else:
            said = f"the run --overwrite was to replace is kept in {aside}"
    except Exception as failed:  # noqa: BLE001 (the attempt's own error is the one to report)
        log.warning("%s: the run --overwrite was to replace is in %s (%s)", run, aside, first_line(failed))
        return
    own = isinstance(err, (UserError, Interrupted)) and type(err).__module__ == UserError.__module__  # not Ray's
    if own and len(err.args) in (1, 2) and isinstance(err.args[0], str):  # wrapper of one, whose line is another's
        err.args = (f"{err.args[0]}; {said}", *err.args[1:])
    else:
        log.warning("%s", said)


WORKER_FLAGS = ("workers", "--workers (or --cpus-per-worker)", "--workers or --gpus-per-worker")  # for messages


def check_worker_resources(resources: dict[str, float], workers: int, cpus_per_worker: float,
                           gpus_per_worker: float) -> None:
    """Raise a one-line ConfigError when a private local Ray (fixed resources: ``resources``) cannot hold the
    workers and still run the Ray Data tasks that feed them (:func:`mmctr_ray.ray_env.check_pool`)."""
    check_pool(resources, workers, cpus_per_worker, gpus_per_worker, *WORKER_FLAGS)


def check_local_workers(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """:func:`check_worker_resources` against the private local Ray, if that is the Ray in use."""
    check_local_pool(workers, cpus_per_worker, gpus_per_worker, *WORKER_FLAGS)


def _check_feature_map(run: storage.Location, fmap: FeatureMap) -> None:
    """On resume, the data must give the vocabularies the run was built with."""
    path = storage.join(run, "feature_map.json")
    if not storage.is_file(path):
        return
    saved = FeatureMap.from_json(path)
    for key, value in fmap.__dict__.items():
        if getattr(saved, key) != value:
            raise ConfigError(f"{path}: the run was built with {key}={getattr(saved, key)} but --data gives "
                              f"{value}; resume with the data the run started on")


def _fault_from_env() -> list[dict[str, Any]]:
    faults = []
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        where, marker = spec.split(":", 1)
        rank, _, where = where.rpartition("/")
        fault = {"rank": int(rank.removeprefix("r") or 0), "marker": marker}
        if where.startswith("report"):
            faults.append({**fault, "report": int(where.removeprefix("report"))})
        else:
            faults.append({**fault, "step": int(where)})
    return faults


def split_datasets(data_dir: str | Path, max_len: int, ordered: bool) -> dict[str, Any]:
    """The train and valid splits as a run reads them (:func:`read_split`). ``ordered`` (``train.deterministic``):
    in file order whatever a split's size, so the seed alone fixes the data order; otherwise a split over
    :data:`~mmctr_ray.features.V1_MAX_ROWS` rows goes to Ray Data's V2 reader, which packs its row groups into read
    units by size and so reads them out of file order even with ``preserve_order``."""
    return {split: read_split(data_dir, split, max_len, ordered=ordered) for split in ("train", "valid")}


def _ingest_options(cfg: ExperimentConfig) -> Any:
    """Ray Train's default ingest options (carried over from the driver's DataContext), in file order when the run
    asks to be deterministic. Built here rather than by ``DataConfig.default_ingest_options()``, which passes the
    deprecated ``exclude_resources`` and so printed a RayDeprecationWarning in every run and every trial (Ray 2.60);
    a non-zero ``exclude_resources`` a user set is still carried over."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    excluded = current.exclude_resources
    return ExecutionOptions(resource_limits=current.resource_limits,
                            exclude_resources=None if excluded.is_zero() else excluded,
                            preserve_order=current.preserve_order or cfg.train.deterministic,
                            verbose_progress=current.verbose_progress, label_selector=current.label_selector)


def _data_config(cfg: ExperimentConfig, workers: int) -> Any:
    """Workers split the training split between them; one worker reads the whole split itself, which needs no
    ``streaming_split`` and so no SplitCoordinator actor to start (~2 s of every run and every trial)."""
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=["train"] if workers > 1 else [], execution_options=_ingest_options(cfg))


def check_inputs(data_dir: str | Path, cfg: ExperimentConfig, resume: bool = False,
                 latest: storage.Location | None = None, scan: bool = True) -> tuple[dict[str, int], FeatureMap]:
    """Check the splits (footers, and with ``scan`` every page: :func:`mmctr_ray.preflight.scan_part`) and build
    the item table and feature map, all on the driver and without Ray; return the splits' row counts and the
    feature map. Raises a one-line DataError on bad input. A ``resume`` continues with the run's own item vectors,
    so a mismatch its start warned about is not warned about again; they must still be the vectors it trained on
    (those of ``latest``, the run's newest checkpoint)."""
    rows = check_splits(data_dir, SPLITS, scan)  # test too: its users and items size the embedding tables
    check_valid_labels(data_dir)
    table = load_item_table(data_dir, cfg.data.item_vector)
    if resume and latest is not None:
        check_same_table(json.loads(storage.read_text(storage.join(latest, "item_source.json"))), table.source,
                         str(latest))
    warn_unscaled_vectors(cfg, table.vectors)
    if not resume:
        warn_fusion_mismatch(cfg, table.source)
    log.info("training %s", describe_run(cfg, table.source))
    fmap = build_feature_map(data_dir, table)
    if not resume:  # a resumed run has built its tables: they are what it trained, whatever their size
        check_id_tables(data_dir, table.tags, fmap.num_users, cfg.model.use_tags, cfg.model.use_user_id,
                        cfg.model.embedding_dim, sum(rows.values()))
    return rows, fmap


UNSCALED_RMS_WARN = 0.8  # 2x the paper configs' model.item_vector_rms: past it the cross terms grow steeply


def warn_unscaled_vectors(cfg: ExperimentConfig, vectors: Any) -> None:
    """Warn when large item vectors meet CrossNet or bilinear interaction unscaled: those modules raise the vectors'
    scale to a power (a search trial on an unscaled v4 table of RMS 1.7 started with logits of std 4.5e4)."""
    m = cfg.model
    if m.item_vector_rms or (m.crossnet == "off" and m.bilinear == "off"):
        return
    import torch  # here, where a run's driver needs it: only for a config that may warn

    from mmctr_ray.layers.embedding import root_mean_square

    rms = float(root_mean_square(torch.as_tensor(vectors)))  # the measure the model scales by
    if rms > UNSCALED_RMS_WARN:
        log.warning("item vectors of RMS %.2f (%s) go unscaled into %s, which raise their scale to a power: set "
                    "model.item_vector_rms (the paper configs use 0.4)", rms, cfg.data.item_vector,
                    " and ".join(x for x, on in (("CrossNet", m.crossnet != "off"),
                                                 ("bilinear interaction", m.bilinear != "off")) if on))


def _fusion_text(fusion: dict[str, Any], keys: tuple[str, ...] | None = None) -> str:
    """``v4 64+64``, ``v3 16``, ``given``: a fusion strategy with the widths it uses (of those in ``keys``)."""
    from mmctr_ray.fusion import PARTS

    fields = [f for _, _, f in PARTS.get(fusion.get("strategy"), ()) if keys is None or f in keys]
    return " ".join([str(fusion.get("strategy")), *(["+".join(str(fusion[f]) for f in fields)] if fields else [])])


def warn_fusion_mismatch(cfg: ExperimentConfig, source: dict[str, Any]) -> None:
    """Warn when the config's ``fusion`` section names other item vectors than the run trains on: the model trains on
    ``data.item_vector`` (``configs/paper.yaml`` says v4, yet without ``--fusion`` it trains on ``item_emb_d128``),
    and the run's config would say a fusion it was not trained on."""
    from mmctr_ray.fusion import PARTS

    said = dataclasses.asdict(cfg.fusion)
    if source["item_vector"] == "given":
        if said["strategy"] != "given":
            widths = " ".join(f"--{f.replace('_', '-')} {said[f]}" for _, _, f in PARTS[said["strategy"]])
            log.warning("fusion.strategy is %s but data.item_vector is 'given': this run trains on item_info's "
                        "item_emb_d128 as shipped, not on %s vectors; for those, write the table with `mmctr fuse "
                        "--data DATA --strategy %s %s --out FILE` and train with --fusion FILE (`mmctr pipeline` fuses "
                        "first)",
                        said["strategy"], said["strategy"], said["strategy"], widths)
        return
    made = source.get("fusion") or {}
    if made.get("strategy") and _fusion_text(made, tuple(made)) != _fusion_text(said, tuple(made)):
        log.warning("%s holds %s vectors (its .fusion.json) but the config's fusion section says %s: the run trains "
                    "on the table; pass it with --fusion FILE so the run's config records its fusion",
                    source["file"], _fusion_text(made, tuple(made)), _fusion_text(said))


def resume_config(run_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The config a resumed run continues with: the config its latest checkpoint was trained with (RUN's own
    config.yaml when it has none) plus ``overrides`` (train.* only). Not RUN's config.yaml alone: an attempt that
    was killed before it kept an epoch has left its own ``train.*`` there (a diverging learning rate, say), which
    the next ``--resume`` would take with its ``--set``."""
    run = run_location(run_dir)
    config_path = storage.join(run, "config.yaml")
    if not storage.is_file(config_path):
        raise ConfigError(f"{run_dir}: nothing to resume (no config.yaml of an earlier `mmctr train`)")
    latest = latest_checkpoint(run)
    from mmctr_ray.tune_report import config_here  # a moved pipeline OUT's or search's table, where it is now

    return config_here(load_config(storage.join(latest, "config.yaml") if latest is not None else config_path,
                                   overrides), run)


def run_training(data_dir: str | Path, run_dir: str | Path, cfg: ExperimentConfig, workers: int = 1,
                 gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, resume: bool = False,
                 overwrite: bool = False, max_failures: int = 2, verbose: bool = False,
                 callbacks: list[Any] | None = None, start_ray: Callable[[], None] | None = None,
                 datasets: dict[str, Any] | None = None, runs_per_node: int = 1,
                 lr_set: bool = False, start_by: float | None = None) -> dict[str, Any]:
    """Train ``cfg`` on ``data_dir`` into ``run_dir`` (a local path or a storage URI) with ``workers`` DDP
    workers; return the summary.

    ``start_ray`` is called once the inputs and RUN are checked, before anything needs Ray: the CLI starts its
    private Ray there, so bad input fails without waiting for a cluster and is checked only once.

    With ``resume`` the run continues from its latest checkpoint; ``cfg`` may differ from the saved config only
    in its train section (e.g. more epochs). ``callbacks`` go to the trainer's ``RunConfig`` (``mmctr tune``
    passes Tune's ``TuneReportCallback`` so each epoch's metrics reach the scheduler). ``datasets`` (``train`` and
    ``valid``, as :func:`read_split` builds them, e.g. materialized once for many runs: ``mmctr tune``) replaces
    reading the splits from ``data_dir``. ``runs_per_node``: how many runs' CPU workers may share a node at once
    (``mmctr tune``'s concurrent trials); each CPU worker takes its share of the node's cores as torch threads.
    ``lr_set``: a resume given ``train.lr`` (``--set``) continues at that rate even where it is the run's own, which
    the schedule had lowered (:func:`mmctr_ray.training.load_into`). ``start_by`` (wall-clock seconds since the
    epoch; ``mmctr tune``'s time budget): a run that would start from no checkpoint once it has passed does not train.

    Raises:
        OutputExistsError: ``run_dir`` holds a run and neither ``resume`` nor ``overwrite`` was given.
        DataError: a split or the item table cannot be read.
        ConfigError: ``run_dir`` is a URI whose storage cannot be opened, a resume that changes more than
            ``train.*``, more workers than a private local Ray can hold and feed (:func:`check_local_workers`),
            or GPU shares DDP cannot train on (:func:`mmctr_ray.ray_env.check_gpu_split`).
        NotStarted: the workers were up only after ``start_by``, with no checkpoint to continue from.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError

    check_gpu_split(workers, gpus_per_worker, "--gpus-per-worker")
    data_dir = Path(data_dir).resolve()
    run = run_location(run_dir)
    cfg = _absolute_item_vector(cfg)
    _check_run_dir(run, cfg, resume, overwrite)  # first: a refused resume said "training ..." before it said why
    latest = latest_checkpoint(run) if resume else None  # where a resume continues (the driver writes none)
    # bad input fails here, before RUN is touched; a search's trials read the footers only: the search scanned
    rows, fmap = check_inputs(data_dir, cfg, resume, latest, scan=not callbacks)
    check_batch_size(cfg.train.batch_size, rows["train"], workers)
    check_batch_norm_rows(cfg.train.batch_size, workers, cfg.model.batch_norm)
    if (uneven := batch_split_note(cfg.train.batch_size, workers)) and not callbacks:  # (a search says it once)
        log.warning(uneven)
    if resume:  # the data the run started on: checked before Ray starts and RUN is touched (before, a refused
        _check_feature_map(run, fmap)  # resume had already dropped summary.json and saved its config.yaml)
    ended = _nothing_to_train(run, cfg) if resume and not callbacks else None  # (a Tune trial, with callbacks,
    if ended:  # is left to Ray Train and run_trial, as before)
        log.warning("%s: nothing to train: %s", run, ended)
        _drop_replaced(run)  # RUN has checkpoints: what an --overwrite replaced, it has
        storage.remove_file(storage.join(run, DIVERGED))  # a summary of RUN as it is now, and its config.yaml the one
        storage.write_text(storage.join(run, "config.yaml"),  # its latest checkpoint trained with, not this command's
                           storage.read_text(storage.join(latest, "config.yaml")))  # (train.epochs=1 after 4 epochs
        return _summary(run, data_dir, 0.0)  # would misstate it), nor a killed attempt's; this command trained none
    if start_ray is not None:
        start_ray()
    check_local_workers(workers, cpus_per_worker, gpus_per_worker)  # one machine: what Ray has now is all it gets
    before = storage.read_text(storage.join(run, "config.yaml")) if resume else None  # RUN's, before this attempt
    aside = _prepare_run_dir(run, cfg, resume, overwrite, keep_replaced=not callbacks)
    try:
        fmap.to_json(storage.join(run, "feature_map.json"))
        loop_config = {"cfg": cfg.to_dict(), "data_dir": str(data_dir), "run_dir": str(run),
                       "feature_map": fmap.__dict__, "train_rows": rows["train"], "valid_rows": rows["valid"],
                       "gpus_per_worker": gpus_per_worker, "start_epoch": checkpoint_epoch(latest) if latest else 0,
                       "fault": _fault_from_env(), "verbose": verbose, "runs_per_node": runs_per_node,
                       "lr_set": lr_set, "start_by": start_by}
        os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)
        fs, fs_path = storage.resolve(run)  # Ray Train writes checkpoints to storage_path/name = RUN
        trainer = torch_trainer()(  # on the private local Ray, without the placement-group cleaner
            train_in_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=gpus_per_worker > 0,
                resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}),
            run_config=RunConfig(name=posixpath.basename(fs_path), storage_path=posixpath.dirname(fs_path),
                                 storage_filesystem=fs, failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=None),
                                 callbacks=[_worker_failures(max_failures), *(callbacks or [])],
                                 logging_config=LoggingConfig(log_level=_train_log_level(verbose, bool(callbacks))),
                                 worker_runtime_env={"env_vars": worker_env(cfg.train.keep_freed_memory,
                                                                            gpus_per_worker > 0)}),
            datasets=datasets or split_datasets(data_dir, cfg.data.max_len, cfg.train.deterministic),
            dataset_config=_data_config(cfg, workers),
        )
        t0 = time.perf_counter()
        try:
            with _driver_signals() as terminated:
                trainer.fit()
        except SystemExit:  # Ray Train's own Ctrl-C handler aborts the run, Ray's SIGTERM handler exits: both end
            # the wait for the run this way
            if not _in_driver_main_thread():
                raise  # a Ray worker told to exit (a Tune trial stopped by its scheduler): Ray's own way out
            signum = signal.SIGTERM if terminated["sigterm"] else signal.SIGINT
            raise Interrupted(kept_checkpoints(run), signum) from None
        except TrainingFailedError as err:
            ended = _run_ended(err, run, max_failures)
            if ended is None:
                raise  # a worker's own error (a bug): its traceback
            raise ended from None  # one line, not the workers' tracebacks
        late = storage.join(run, NotStarted.FILE)
        if storage.is_file(late):  # the workers ended at their start: a search's time budget had ended
            raise NotStarted(storage.read_text(late).strip())
        diverged = storage.join(run, DIVERGED)
        if storage.is_file(diverged):  # the workers ended the run themselves: no summary; earlier checkpoints stay
            raise ConfigError(f"{run}: {storage.read_text(diverged).strip()}")
        summary = _summary(run, data_dir, time.perf_counter() - t0)
    except BaseException as err:  # (a Ctrl-C before the workers start is a KeyboardInterrupt)
        if before is not None and not callbacks and isinstance(err, Exception) and not isinstance(err, Interrupted):
            _put_back_config(run, latest, before)  # a Tune trial's RUN is run_trial's to read back as it is
        if aside is not None:
            _end_replacing(run, aside, err, put_back=not resume)
        raise
    if aside is not None:
        _end_replacing(run, aside, None)
    return summary


def _put_back_config(run: storage.Location, started_from: storage.Location | None, text: str) -> None:
    """After a ``--resume`` that failed or diverged before it kept an epoch: RUN's config.yaml as it was (``text``),
    as the run is where it was (the next ``--resume`` continues from the latest checkpoint's own config either way:
    :func:`resume_config`). Not after an interrupt, whose workers may still be copying a checkpoint. The attempt's
    own error is the one to report: a failure here is a warning."""
    def epoch(checkpoint: storage.Location | None) -> int:
        return (checkpoint_epoch(checkpoint) or 0) if checkpoint is not None else 0

    try:
        if epoch(latest_checkpoint(run)) == epoch(started_from):
            storage.write_text(storage.join(run, "config.yaml"), text)
    except Exception as err:  # noqa: BLE001
        log.warning("%s: could not put its config.yaml back: %s", run, err)


SIGINT_LOGGER = "ray.train.v2.api.data_parallel_trainer"  # Ray Train's Ctrl-C handler logs here (Ray 2.60)


@contextlib.contextmanager
def _driver_signals() -> Iterator[dict[str, bool]]:
    """Around ``trainer.fit()``. Ray Train installs its own SIGINT handler for the run (Ctrl-C aborts it) and leaves
    it installed: the later steps of a pipeline would then ignore Ctrl-C twice and exit 0 on the third, so the
    handler before is put back. The yielded ``sigterm`` flag (:func:`mmctr_ray.ray_env.sigterm_flag`) tells a
    SIGTERM's SystemExit from Ctrl-C's. Only in the main thread (elsewhere no handler can be set)."""
    with sigterm_flag() as state:
        if threading.current_thread() is not threading.main_thread():
            yield state
            return
        sigint = signal.getsignal(signal.SIGINT)
        said = logging.getLogger(SIGINT_LOGGER)  # its handler's "Received SIGINT. Gracefully aborting ..." at once,
        level, said.level = said.level, logging.INFO  # not 10 s of silence before the command's own line
        try:
            yield state
        finally:  # None: a handler not set from Python
            said.setLevel(level)
            signal.signal(signal.SIGINT, signal.SIG_DFL if sigint is None else sigint)


def _in_driver_main_thread() -> bool:
    """Whether this is the main thread of the driver (the process a user started), where Ctrl-C lands."""
    import ray

    return (threading.current_thread() is threading.main_thread()
            and ray._private.worker.global_worker.mode == ray.SCRIPT_MODE)


def _train_log_level(verbose: bool, trial: bool) -> str:
    """The level of Ray Train's own console lines for a run: its INFO lines (the resources asked, each worker group
    started, its failure policy's ~40-line report of a restart) with -v, and on a cluster this command joined, where
    the run may wait for its resources and those lines say what it asked for and when its workers started. Not on
    the private local Ray, sized for the run before it started (:func:`check_local_workers`), nor in a search's
    trials, sized to fit the cluster: there the run's own lines say what happened."""
    return "INFO" if verbose or not (private_local_ray() or trial) else "WARNING"


def _worker_failures(max_failures: int) -> Any:
    """A Ray Train callback for a worker's failure: it ends the run, with no retry, when the worker failed on bad
    input, and otherwise says in one line which rank failed, why, and that the run restarts from its last checkpoint
    (or ends, its restarts spent).

    ``FailureConfig`` restarts a run whose worker raised anything, which is right for a dead process but not for
    a bad row or file that one rank met while streaming: every retry would meet it again after reloading the last
    checkpoint. The controller calls ``after_exception`` when it sees a worker's error, before its failure policy
    decides; a ``ControllerError`` raised there is not retryable (Ray retries only worker-group start-up failures
    of the controller) and the controller shuts every rank down, those waiting in a collective included. Ray Train's
    own report of the decision is an INFO block of ~40 lines, shown with -v or on a joined cluster only
    (:func:`_train_log_level`).
    """
    from ray.train import ControllerError, UserCallback

    # what this class uses comes from modules the controller can import without torch (no train_driver function)
    class WorkerFailures(UserCallback):
        def __init__(self) -> None:
            self.failures = 0  # this run's, over its restarts: the controller keeps one callback for the run

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            for err in worker_exceptions.values():
                cause = find_user_error(err)
                if cause is not None and not isinstance(cause, StorageError):  # storage: FailureConfig retries
                    raise ControllerError(cause)
            dead = {rank: dead_worker(err) for rank, err in worker_exceptions.items()}
            if any(getattr(err, "preempted", False) for err in dead.values()):  # a node reclaimed: Ray Train counts
                return  # it apart (max_preemption_failures), waits the preemption out and says so itself
            self.failures += 1  # as Ray Train's failure policy counts a worker group's failures
            # the rank whose process died, if one did: the others then fail beside it (a collective cut off)
            rank = min((r for r, err in dead.items() if err is not None), default=min(worker_exceptions))
            err = worker_exceptions[rank]
            limit = "" if max_failures < 0 else f" of at most {max_failures}"  # -1: no limit (FailureConfig)
            then = (f"the workers restart from the run's last checkpoint (restart {self.failures}{limit})"
                    if max_failures < 0 or self.failures <= max_failures else
                    "the run ends: it restarts at most " + (f"{max_failures} times" if max_failures != 1 else "once"))
            log.warning("rank %d failed (%s: %s); %s", rank, type(err).__name__, worker_failure_reason(err), then)

    return WorkerFailures()


def _run_ended(err: BaseException, run: storage.Location, max_failures: int) -> UserError | None:
    """One line for a run Ray Train ended with ``err``: bad input a worker met, or a worker whose process died
    once more than the run restarts (its last failure, what the run keeps); None for a worker's own error."""
    cause = find_user_error(err)
    if cause is not None:
        return DataError(str(cause))
    died = find_cause(err, lambda e: dead_worker(e) is not None)
    if died is None:
        return None
    restarts = {0: "not restarted (none asked)", 1: "restarted once"}.get(max_failures,
                                                                        f"restarted {max_failures} times")
    return WorkersFailed(f"{run}: a worker's process died ({worker_failure_reason(died)}) and the run, "
                         f"{restarts}, ends; {kept_checkpoints(run, ': --resume continues from the last')}")


def steady_rate(history: list[dict[str, Any]]) -> float | None:
    """The run's steady samples/s: the rows its epochs' steady clocks counted over their seconds summed (rows =
    rate × steady_seconds; an epoch row written before steady_seconds was kept counts its steps but the first, as
    if of the others' batch size). The mean of the epochs' rates, which it was, overstated a run of a slow streamed
    epoch and fast epochs from the kept shard (3k, then 10k × 7: 9.1k for 7.7k)."""
    timed = [(r.get("steady_seconds"), r["samples_per_s"], max(int(r.get("steps") or 2) - 1, 1))
             for r in history if r.get("samples_per_s")]
    if not timed:
        return None
    if all(seconds for seconds, _, _ in timed):
        return sum(seconds * rate for seconds, rate, _ in timed) / sum(seconds for seconds, _, _ in timed)
    return sum(steps for _, _, steps in timed) / sum(steps / rate for _, rate, steps in timed)


def _summary(run_dir: storage.Location, data_dir: Path, seconds: float) -> dict[str, Any]:
    best, latest = best_checkpoint(run_dir), latest_checkpoint(run_dir)
    state = read_state(latest)
    history = state["history"]
    best_row = best_epoch(history)
    oracle = Layout(data_dir).oracle_auc("valid", best_row.get("valid_rows"))  # rows None: older runs kept none
    summary = {"run_dir": str(run_dir), "data": str(data_dir), "epochs": len(history),
               "best_epoch": best_row["epoch"], "best_valid_auc": best_row["valid_auc"],
               "best_valid_auc_se": best_row.get("valid_auc_se"),
               "best_valid_logloss": best_row["valid_logloss"], "best_checkpoint": str(best),
               "stop_reason": stop_reason(state, load_config(storage.join(latest, "config.yaml")).train),
               "oracle_valid_auc": oracle, "mean_samples_per_s": steady_rate(history),
               # this command's seconds (a --resume's only), and the epochs' over every attempt
               "wall_seconds": seconds, "epoch_seconds": sum(r.get("epoch_seconds") or 0.0 for r in history)}
    storage.write_text(storage.join(run_dir, "summary.json"), storage.json_text(summary, indent=2) + "\n")
    return summary


SUMMARY_NUMBERS = ("best_valid_auc", "best_valid_auc_se", "best_valid_logloss", "wall_seconds")


def read_summary(run_dir: storage.Location) -> dict[str, Any]:
    """RUN/summary.json, a null among :data:`SUMMARY_NUMBERS` read as the NaN it was written for (no epoch had a
    finite AUC: :func:`storage.json_text`)."""
    return storage.nan_for_null(json.loads(storage.read_text(storage.join(run_dir, "summary.json"))),
                                SUMMARY_NUMBERS)
