"""``mmctr train``: the driver that builds a Ray Train ``TorchTrainer`` and writes the run directory.

RUN (a local path or a storage URI such as ``s3://bucket/runs/x``) receives ``config.yaml`` (resolved),
``feature_map.json``, ``metrics.jsonl`` (one line per epoch), ``tensorboard/`` (local runs),
``checkpoint_epoch_NNN/`` (one per epoch) and ``summary.json`` (best epoch and its checkpoint) at the end.
An existing RUN is never overwritten without ``overwrite``; ``resume`` continues it from its latest checkpoint
with its own saved config.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mmctr_ray.checkpoint import best_checkpoint, epoch_checkpoints
from mmctr_ray.config import ExperimentConfig, load_config, save_config
from mmctr_ray.errors import ConfigError, DataError, OutputExistsError
from mmctr_ray.features import build_feature_map, load_item_table, read_split
from mmctr_ray.schema import Layout
from mmctr_ray.training import train_loop_per_worker

log = logging.getLogger(__name__)
FAULT_ENV = "MMCTR_FAULT_KILL_AT_STEP"  # "STEP:MARKER_FILE": recovery tests kill rank 0 once at STEP


def _local_run_dir(run_dir: str) -> Path | None:
    return None if "://" in run_dir else Path(run_dir).resolve()


def _prepare_run_dir(run_dir: str, cfg: ExperimentConfig, resume: bool, overwrite: bool) -> ExperimentConfig:
    local = _local_run_dir(run_dir)
    if local is None:  # object store: Ray manages it; resume/refusal by its own rules
        return cfg
    started = local.exists() and any(local.iterdir())
    if resume:
        if not (local / "config.yaml").is_file():
            raise ConfigError(f"{local}: nothing to resume (no config.yaml of an earlier `mmctr train`)")
        saved = load_config(local / "config.yaml")
        for section in ("data", "fusion", "model"):
            if getattr(saved, section) != getattr(cfg, section):
                raise ConfigError(f"{local}: --resume with a different {section} section than the run's "
                                  f"config.yaml; only train.* may change when resuming")
        save_config(cfg, local / "config.yaml")
        return cfg
    if started:
        if not overwrite:
            raise OutputExistsError(f"{local}: already holds a run; pass --resume to continue it or --overwrite "
                                    f"to replace it")
        shutil.rmtree(local)
    local.mkdir(parents=True, exist_ok=True)
    save_config(cfg, local / "config.yaml")
    return cfg


def _fault_from_env() -> dict[str, Any] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    step, marker = spec.split(":", 1)
    return {"step": int(step), "marker": marker}


def resume_config(run_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The config a resumed run continues with: its saved config.yaml plus ``overrides`` (train.* only)."""
    local = _local_run_dir(run_dir)
    if local is None or not (local / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: nothing to resume (no config.yaml of an earlier `mmctr train`)")
    return load_config(local / "config.yaml", overrides)


def run_training(data_dir: str | Path, run_dir: str, cfg: ExperimentConfig, workers: int = 1,
                 gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, resume: bool = False,
                 overwrite: bool = False, max_failures: int = 2, verbose: bool = False) -> dict[str, Any]:
    """Train ``cfg`` on ``data_dir`` into ``run_dir`` with ``workers`` DDP workers; return the summary.

    With ``resume`` the run continues from its latest checkpoint; ``cfg`` may differ from the saved config only
    in its train section (e.g. more epochs).

    Raises:
        OutputExistsError: ``run_dir`` holds a run and neither ``resume`` nor ``overwrite`` was given.
        DataError: a split or the item table cannot be read.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data_dir = Path(data_dir).resolve()
    lay = Layout(data_dir)
    for path in (lay.split("train"), lay.split("valid"), lay.item_info):
        if not path.is_file():
            raise DataError(f"{path}: missing file (run `mmctr validate {data_dir}`)")
    cfg = _prepare_run_dir(run_dir, cfg, resume, overwrite)
    table = load_item_table(data_dir, cfg.data.item_vector)
    fmap = build_feature_map(data_dir, table)
    local = _local_run_dir(run_dir)
    if local is not None:
        fmap.to_json(local / "feature_map.json")
    latest = epoch_checkpoints(local)[-1] if resume and local is not None and epoch_checkpoints(local) else None
    loop_config = {"cfg": cfg.to_dict(), "data_dir": str(data_dir), "run_dir": str(local or run_dir),
                   "feature_map": fmap.__dict__, "train_rows": pq.ParquetFile(lay.split("train")).metadata.num_rows,
                   "resume_from": str(latest) if latest else None, "fault": _fault_from_env(), "verbose": verbose}
    storage, name = (str(local.parent), local.name) if local else run_dir.rstrip("/").rsplit("/", 1)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker={"CPU": cpus_per_worker,
                                                           **({"GPU": gpus_per_worker} if gpus_per_worker else {})}),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
        datasets={"train": read_split(data_dir, "train", cfg.data.max_len),
                  "valid": read_split(data_dir, "valid", cfg.data.max_len)},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    t0 = time.perf_counter()
    trainer.fit()
    summary = _summary(local, data_dir, time.perf_counter() - t0) if local else {"run_dir": run_dir}
    return summary


def _summary(run_dir: Path, data_dir: Path, seconds: float) -> dict[str, Any]:
    best = best_checkpoint(run_dir)
    history = json.loads((epoch_checkpoints(run_dir)[-1] / "state.json").read_text())["history"]
    best_row = max(history, key=lambda r: r["valid_auc"])
    oracle_path = Layout(data_dir).oracle
    oracle = json.loads(oracle_path.read_text())["valid"].get("oracle_auc") if oracle_path.is_file() else None
    rates = [r["samples_per_s"] for r in history if r.get("samples_per_s")]
    summary = {"run_dir": str(run_dir), "data": str(data_dir), "epochs": len(history),
               "best_epoch": best_row["epoch"], "best_valid_auc": best_row["valid_auc"],
               "best_valid_logloss": best_row["valid_logloss"], "best_checkpoint": str(best),
               "oracle_valid_auc": oracle, "mean_samples_per_s": sum(rates) / len(rates) if rates else None,
               "wall_seconds": seconds}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
