"""Training on Ray Train: run directory, exact metrics, schedule, resume, fault recovery, prediction."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mmctr_ray.checkpoint import TrainState, best_checkpoint, epoch_checkpoints, load_checkpoint
from mmctr_ray.config import load_config, save_config
from mmctr_ray.errors import ConfigError, DataError, OutputExistsError
from mmctr_ray.host_malloc import LEGACY, glibc_tunables
from mmctr_ray.predict import load_model, run_predict, score_parquet
from mmctr_ray.ray_env import node_cores
from mmctr_ray.schema import Layout
from mmctr_ray.train_driver import (FAULT_ENV, POLL_INTERVAL_ENV, POLL_INTERVAL_S, _data_config, _ingest_options,
                                    check_worker_resources, resume_config, run_training, warn_unscaled_vectors)
from mmctr_ray.training import embedding_l2, update_schedule

CONFIGS = Path(__file__).parent.parent / "configs"


def tiny_cfg(*sets: str):
    return load_config(CONFIGS / "tiny.yaml", ["train.batch_size=256", "train.shuffle_buffer=0", *sets])


def test_task1_admits_the_baseline_with_its_five_free_hyperparameters_and_names_every_other_departure(tmp_path):
    """Task 1 ranks item embeddings through the challenge baseline's DIN with all but five hyperparameters fixed;
    `predict --task Task1` names where a run departs from it."""
    from mmctr_ray.predict import task1_departures, write_submission

    assert task1_departures(load_config(CONFIGS / "baseline.yaml"), 128) == []
    free = ["train.lr=0.01", "train.batch_size=1024", "train.embedding_l2=1e-7", "train.weight_decay=1e-5",
            "model.dropout=0.2", "model.item_vector_rms=0.4",  # the five, and the vectors' own scale
            "train.epochs=3", "train.precision=bf16", "train.seed=7", "model.num_heads=8",  # how it runs; off modules
            "model.senet_ratio=4", "model.cross_layers=5"]
    # a CrossNet of no layer is none (the model builds none): no departure (helper-135)
    assert task1_departures(load_config(CONFIGS / "baseline.yaml", ["model.crossnet=v2", "model.cross_layers=0"]),
                            128) == []
    assert task1_departures(load_config(CONFIGS / "baseline.yaml", free), 128) == []
    assert task1_departures(load_config(CONFIGS / "paper.yaml"), 128) == [
        "model.attention multihead (fixed: din)", "model.bilinear field_interaction (fixed: off)",
        "model.crossnet v2 (fixed: off)", "model.senet true (fixed: false)"]
    fixed = ["data.max_len=32", "model.dnn_units=[256, 128]", "train.patience=2", "train.optimizer=adamw",
             "model.use_user_id=true"]
    assert task1_departures(load_config(CONFIGS / "baseline.yaml", fixed), 64) == [
        "data.max_len 32 (fixed: 64)", "model.dnn_units [256, 128] (fixed: [1024, 512, 256])",
        "model.use_user_id true (fixed: false)", "train.optimizer adamw (fixed: adam)", "train.patience 2 (fixed: 3)",
        "item vectors 64 wide (fixed: 128, as item_emb_d128)"]
    # a module's own knobs count where both have it on: turned on, the module is the departure
    assert task1_departures(load_config(CONFIGS / "baseline.yaml", ["model.senet=true", "model.senet_ratio=4",
                                                                    "model.attention_units=[64]"]), 128) == [
        "model.attention_units [64] (fixed: [512, 256])", "model.senet true (fixed: false)"]
    widths = {s: load_config(None, [f"fusion.strategy={s}", "fusion.dims=96", "fusion.text_dim=32"]).fusion.vector_dim
              for s in ("given", "v1", "v3", "v4")}  # the width a pipeline's config gives, before its fuse step
    assert widths == {"given": 128, "v1": 96, "v3": 96, "v4": 32 + 64}
    with pytest.raises(ValueError, match="'Task3': expected one of Task2, Task1, Task1&2"):
        write_submission(np.array([0.5]), tmp_path / "s.zip", "Task3")  # the CLI's --task choices, for callers
    assert not (tmp_path / "s.zip").exists()


def test_the_summary_says_whether_early_stopping_or_the_last_epoch_ended_the_run():
    """`train --resume --set train.epochs=6` ended at epoch 5 of 6, and nothing said the patience had (helper-134)."""
    from mmctr_ray.train_driver import stop_reason

    t = load_config(None, ["train.epochs=6", "train.patience=2"]).train
    assert stop_reason({"epoch": 5, "bad_epochs": 2}, t) == ("early stop: 2 epochs without a better valid AUC, "
                                                             "train.patience=2")
    assert stop_reason({"epoch": 6, "bad_epochs": 1}, t) == "train.epochs=6 reached"
    assert stop_reason({"epoch": 3, "bad_epochs": 1}, t) is None  # a search's scheduler ended it, or a signal


def test_schedule_decays_on_plateau_with_a_floor_and_stops_after_patience():
    cfg = load_config(None, ["train.lr=1e-3", "train.min_lr=5e-5", "train.patience=3"]).train
    state = TrainState(lr=cfg.lr)
    decisions = []
    for epoch, auc in enumerate([0.70, 0.72, 0.71, 0.72, 0.73, 0.70, 0.70, 0.70], start=1):
        state.epoch = epoch
        decisions.append((update_schedule(state, auc, cfg), round(state.lr, 8), state.bad_epochs))
    assert decisions == [(False, 1e-3, 0), (False, 1e-3, 0), (False, 1e-4, 1), (False, 5e-5, 2), (False, 5e-5, 0),
                         (False, 5e-5, 1), (False, 5e-5, 2), (True, 5e-5, 3)]
    assert state.best_epoch == 5 and state.best_auc == 0.73


def modules_loaded(code: str, package: str, *argv: str) -> list[str]:
    """The modules of ``package`` that a fresh interpreter holds after running ``code`` (``sys.argv[1:]``: ``argv``)."""
    import subprocess
    import sys

    listing = f"\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == {package!r})))"
    r = subprocess.run([sys.executable, "-c", code + listing, *argv], capture_output=True, text=True, timeout=120,
                       cwd=CONFIGS.parent)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_the_modules_a_training_worker_or_a_trial_imports_leave_scikit_learn_unloaded():
    """Each training worker and each trial is a fresh process that imports these modules; scikit-learn, which only
    fits PCA and scores the synthetic oracle, took 1.3 s of that start on 2 cores (a search starts one per trial)."""
    modules = "mmctr_ray.training, mmctr_ray.train_driver, mmctr_ray.tuning, mmctr_ray.fuse, mmctr_ray.predict"
    assert modules_loaded(f"import {modules}", "sklearn") == []


def test_a_batch_that_does_not_split_over_the_workers_is_said_before_ray_starts(synth_dir, tmp_path, caplog):
    from mmctr_ray.preflight import batch_split_note
    from mmctr_ray.train_driver import run_training

    assert batch_split_note(8192, 1) is None and batch_split_note(8192, 4) is None
    assert batch_split_note(8192, 3) == ("train.batch_size=8,192 does not split evenly over 3 workers: each steps on "
                                         "2,730 rows, 8,190 a step (train.batch_size=8,190 or 8,193 splits evenly)")

    class Stop(Exception):
        pass

    def start_ray():
        raise Stop

    for workers, said in [(3, True), (2, False)]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="mmctr_ray.train_driver"), pytest.raises(Stop):
            run_training(synth_dir, tmp_path / f"run{workers}", tiny_cfg("train.batch_size=256"), workers=workers,
                         start_ray=start_ray)
        lines = [r.getMessage() for r in caplog.records if "does not split evenly" in r.getMessage()]
        assert lines == ([batch_split_note(256, 3)] if said else [])


def test_a_resumed_optimizer_keeps_its_moments_but_takes_this_runs_settings(synth_dir, tmp_path):
    import dataclasses

    from mmctr_ray.checkpoint import save_checkpoint
    from mmctr_ray.features import build_feature_map, load_item_table
    from mmctr_ray.model import DINModel
    from mmctr_ray.training import load_into, make_optimizer

    cfg = tiny_cfg()
    table = load_item_table(synth_dir)
    fmap = build_feature_map(synth_dir, table)
    model = DINModel(cfg.model, fmap, **table.to_torch())
    optimizer = make_optimizer(model, cfg.train, torch.device("cpu"))
    model({"item_id": torch.tensor([1, 2]), "item_seq": torch.tensor([[0, 3], [4, 5]]),
           "likes_level": torch.tensor([1, 2]), "views_level": torch.tensor([3, 4])}).sum().backward()
    optimizer.step()
    state = TrainState(epoch=2, lr=cfg.train.lr * 0.1, best_auc=0.7, best_epoch=1, bad_epochs=1, history=[])
    save_checkpoint(tmp_path, model, optimizer, state, cfg, fmap, table.source)

    same = make_optimizer(model, cfg.train, torch.device("cpu"))
    assert load_into(model, same, tmp_path, cfg.train).lr == cfg.train.lr * 0.1  # the schedule's rate stays
    # `--resume --set train.lr=` the run's own rate: the resume point's checkpoint (epoch 2) goes back to it (it
    # stayed at the decayed rate, without a word); a worker restarted later in that run loads a later one
    assert load_into(model, same, tmp_path, cfg.train, lr_at=2).lr == cfg.train.lr
    assert load_into(model, same, tmp_path, cfg.train, lr_at=1).lr == cfg.train.lr * 0.1
    # `--resume --set train.min_lr=` above the schedule's rate continues at the floor (it trained an epoch below
    # it, and then a "decay" raised the rate to it); a floor below the rate leaves it
    floor = dataclasses.replace(cfg.train, min_lr=cfg.train.lr * 0.5)
    assert load_into(model, same, tmp_path, floor).lr == cfg.train.lr * 0.5
    assert load_into(model, same, tmp_path, dataclasses.replace(cfg.train, min_lr=1e-9)).lr == cfg.train.lr * 0.1
    moments = same.state_dict()["state"]
    assert moments and all(int(v["step"]) == 1 for v in moments.values())

    adamw = dataclasses.replace(cfg.train, optimizer="adamw", lr=3e-4)
    switched = make_optimizer(model, adamw, torch.device("cpu"))
    resumed = load_into(model, switched, tmp_path, adamw)
    assert switched.param_groups[0]["weight_decay"] == 0.0  # AdamW's own 0.01 was applied without a word
    decayed = make_optimizer(model, dataclasses.replace(adamw, weight_decay=0.05), torch.device("cpu"))
    assert decayed.param_groups[0]["weight_decay"] == 0.05
    assert make_optimizer(model, dataclasses.replace(cfg.train, weight_decay=0.05),
                          torch.device("cpu")).param_groups[0]["weight_decay"] == 0.05
    assert resumed.lr == 3e-4 and resumed.epoch == 2  # an explicit new train.lr wins over the schedule's
    # a run moved to CUDA resumes into a fused optimizer: its "step" tensors go where the parameters are, in fp32
    # (torch left a CPU run's on the CPU, which the fused CUDA kernel refuses; here, on the CPU, the move is
    # in place and the loaded fused optimizer steps)
    fused = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr, fused=True)
    load_into(model, fused, tmp_path, cfg.train)
    steps = [s["step"] for s in fused.state.values()]
    assert steps and all(t.dtype == torch.float32 and t.device == torch.device("cpu") for t in steps)
    fused.step()
    assert all(int(s["step"]) == 2 for s in fused.state.values())


@pytest.mark.parametrize("sets, lr_set", [(["train.epochs=9"], False), (["train.lr=1e-3", "train.epochs=9"], True),
                                          (["train.lr = 1e-3"], True)])
def test_a_resume_given_train_lr_tells_the_workers_so(tmp_path, monkeypatch, sets, lr_set):
    """What `mmctr train --resume` hands the run: whether train.lr was given (its workers then continue at it, the
    run's own rate too: see the test above); a fresh run never says so."""
    import mmctr_ray.train_driver
    from mmctr_ray.cli import main

    seen = {}
    monkeypatch.setattr(mmctr_ray.train_driver, "resume_config", lambda run, overrides: tiny_cfg())
    monkeypatch.setattr(mmctr_ray.train_driver, "run_training", lambda *a, **kw: seen.update(kw) or {
        "best_valid_auc": 0.7, "best_valid_logloss": 0.5, "best_epoch": 1, "epochs": 1, "best_checkpoint": "c"})
    argv = ["train", "--data", "D", "--out", str(tmp_path / "run")]
    assert main([*argv, "--resume", *(a for s in sets for a in ("--set", s))]) == 0
    assert seen["lr_set"] is lr_set
    assert main([*argv, "--overwrite", "--set", "train.lr=1e-3"]) == 0 and seen["lr_set"] is False


def test_embedding_l2_is_half_the_squared_norm_of_the_tables_only():
    a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.full((4,), 2.0))
    assert embedding_l2([a, b], 0.1).item() == pytest.approx(0.1 / 2 * (6 + 16))


def _step_gradients(embedding_l2: float, grad_clip: float, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The gradients one train_step hands its optimizer, for a table and a linear layer (the same start each call)."""
    from mmctr_ray.training import train_step

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(10, 4)
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, batch):
            return self.linear(self.table(batch["item_id"])).squeeze(-1)

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            self.seen = {name: p.grad.clone() for name, p in model.named_parameters()}
            return super().step(closure)

    torch.manual_seed(3)
    model = Toy()
    with torch.no_grad():
        model.linear.weight.mul_(scale)
    optimizer = Recording(model.parameters(), lr=0.1)
    batch = {"item_id": torch.tensor([1, 2, 2, 5]), "label": torch.tensor([1.0, 0.0, 1.0, 0.0])}
    cfg = tiny_cfg(f"train.embedding_l2={embedding_l2}", f"train.grad_clip={grad_clip}").train
    train_step(model, batch, optimizer, [model.table.weight], cfg, torch.device("cpu"))
    return optimizer.seen


def test_a_training_step_puts_the_l2_on_the_tables_only_and_clips_the_whole_gradient():
    """train_step with its real tables and settings: mutations that put the L2 on every parameter, or clipped at
    100 times train.grad_clip, passed every test (the L2 helper and the table list were tested, not the step)."""
    plain, with_l2 = _step_gradients(0.0, 0.0), _step_gradients(0.5, 0.0)
    torch.manual_seed(3)
    start = torch.nn.Embedding(10, 4).weight.detach()  # the table as Toy builds it
    torch.testing.assert_close(with_l2["table.weight"], plain["table.weight"] + 0.5 * start)
    for name in ("linear.weight", "linear.bias"):
        torch.testing.assert_close(with_l2[name], plain[name])
    wild = _step_gradients(0.0, 0.0, scale=1e4)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in wild.values()]))
    assert norm > 100
    clipped = _step_gradients(0.0, 10.0, scale=1e4)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped.values()]))
    assert total.item() == pytest.approx(10.0, rel=1e-4)
    for name, grad in clipped.items():  # one factor for all: the direction is kept
        torch.testing.assert_close(grad, wild[name] * (10.0 / norm))


@pytest.fixture(scope="module")
def ray_local():
    """The private local Ray `mmctr train` starts (loopback, token auth, no dashboard, no preemption watcher, runs
    without the placement-group cleaner), with 4 CPUs; the environment it set for itself is put back after."""
    from mmctr_ray.ray_env import init_ray, stop_ray

    environ = dict(os.environ)
    init_ray(num_cpus=4)
    yield
    stop_ray()
    os.environ.clear()
    os.environ.update(environ)


def two_worker_cfg():
    # train.resident=on: epoch 2 trains from the shards the workers kept on their device (CPU here), in the order
    # read (train.shuffle_buffer=0); deterministic, with dropout masks drawn per rank and epoch: a restarted run
    # repeats it (test_killed_workers_restart_the_group_from_the_last_checkpoint)
    return tiny_cfg("train.epochs=2", "train.resident=on", "train.deterministic=true", "model.dropout=0.2")


@pytest.fixture(scope="module")
def two_worker_run(ray_local, synth_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "two"
    summary = run_training(synth_dir, str(run), two_worker_cfg(), workers=2)
    return run, summary


@pytest.mark.slow
def test_cpu_workers_start_with_the_malloc_tunables_unless_the_config_says_no(ray_local, synth_dir, tmp_path,
                                                                              monkeypatch):
    """glibc reads GLIBC_TUNABLES when a process starts: the driver hands it to Ray Train's workers (what the
    tunables do in a worker's thread: tests/test_host_malloc.py)."""
    from mmctr_ray import train_driver

    class Built(Exception):
        pass

    def trainer(*args, **kwargs):
        raise Built(kwargs["run_config"].worker_runtime_env)

    monkeypatch.setattr(train_driver, "torch_trainer", lambda: trainer)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")
    for var in LEGACY.values():  # the machine's own would change what the workers get
        monkeypatch.delenv(var, raising=False)
    for keep, want in ((True, {"GLIBC_TUNABLES": glibc_tunables("glibc.malloc.tcache_count=0")}), (False, {})):
        with pytest.raises(Built) as built:
            run_training(synth_dir, str(tmp_path / str(keep)), tiny_cfg(f"train.keep_freed_memory={keep}"))
        assert built.value.args[0]["env_vars"].get("GLIBC_TUNABLES") == want.get("GLIBC_TUNABLES")


def test_a_nodes_cores_are_what_its_container_and_the_process_affinity_allow(monkeypatch):
    """os.cpu_count() counts the host's cores in a container: the CPUs Ray counts (its quota and cpuset), fewer
    where the process's affinity says so, never none."""
    from ray._private import utils as ray_utils

    from mmctr_ray.ray_env import cpu_threads

    monkeypatch.setattr(ray_utils, "get_num_cpus", lambda **_: 8)  # a pod's limits: {cpu: 8} on a larger host
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    assert node_cores() == 8 and cpu_threads(3) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # taskset -c 0,1
    assert node_cores() == 2 and cpu_threads(4) == 1
    monkeypatch.setattr(ray_utils, "get_num_cpus", lambda **_: 0)  # a quota under one CPU, truncated
    assert node_cores() == 1


@pytest.mark.slow
def test_a_cpu_worker_shares_its_nodes_cores_with_the_runs_that_run_beside_it(plain_run, synth_dir, tmp_path):
    """Ray starts a worker with one torch thread per logical CPU it asked for: the worker takes its share of the
    node's cores instead, with the other runs' workers there too (`mmctr tune`'s concurrent trials)."""
    assert [r["worker_threads"] for r in plain_run[1]] == [[node_cores()]] * 2  # alone on the node
    run = tmp_path / "run"
    run_training(synth_dir, str(run), tiny_cfg("train.epochs=1"), runs_per_node=2)
    assert _metrics(run)[0]["worker_threads"] == [max(1, node_cores() // 2)]
    assert _metrics(run)[0]["resident_rows"] is None  # one epoch: no copy of the shard kept, no later epoch reads it


@pytest.mark.slow
def test_cpu_scoring_actors_share_the_nodes_cores_and_keep_freed_memory_as_the_run_says(ray_local, synth_dir,
                                                                                        monkeypatch):
    """Ray starts an actor that asked for 1 CPU with one torch thread (OMP_NUM_THREADS=1): `mmctr predict` scored
    on one core of the node's; and its actors get the run's malloc tunables as its training workers did."""
    import ray.data

    import mmctr_ray.predict as predict

    class Mapped(Exception):
        pass

    original = ray.data.Dataset.map_batches

    def map_batches(self, fn, **kwargs):
        if fn is not predict.Scorer:  # read_split's own conversion
            return original(self, fn, **kwargs)
        raise Mapped(kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", map_batches)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for var in LEGACY.values():  # the machine's own would change what the workers get
        monkeypatch.delenv(var, raising=False)
    for keep in (True, False):
        with pytest.raises(Mapped) as mapped:
            predict._score("ckpt", synth_dir, "test", 8, actors=1, gpus_per_actor=0.0, batch_size=256,
                           keep_freed_memory=keep)
        kwargs = mapped.value.args[0]
        assert kwargs["fn_constructor_kwargs"]["sharers"] == 1  # the pool's actors
        assert kwargs.get("runtime_env") == ({"env_vars": {"GLIBC_TUNABLES": glibc_tunables(None)}} if keep else None)
    # the actor counts the cores of the node it runs on (its constructor, here in this process)
    monkeypatch.setattr(predict, "load_model", lambda *args: None)
    threads = torch.get_num_threads()
    try:
        for sharers in (1, 2):
            torch.set_num_threads(1)  # as Ray starts the actor
            predict.Scorer("ckpt", str(synth_dir), sharers=sharers)
            assert torch.get_num_threads() == max(1, node_cores() // sharers)
    finally:
        torch.set_num_threads(threads)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_run_directory_holds_config_metrics_checkpoints_and_summary(two_worker_run, synth_dir):
    run, summary = two_worker_run
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["resident"] for r in rows] == [False, True]  # streamed from Ray Data, then from the kept shard
    train_rows = pq.ParquetFile(Layout(synth_dir).split("train")).metadata.num_rows
    assert rows[0]["resident_rows"] == train_rows // 2  # rank 0 kept its whole half, the last short batch included
    assert [r["steps"] for r in rows] == [train_rows // 256] * 2
    assert {"train_loss", "valid_auc", "valid_logloss", "lr", "samples_per_s", "epoch_seconds"} <= set(rows[0])
    assert rows[0]["worker_threads"] == [max(1, node_cores() // 2)] * 2  # the two workers share the node's cores
    assert load_config(run / "config.yaml").train.epochs == 2
    assert [p.name for p in epoch_checkpoints(run)] == ["checkpoint_epoch_001", "checkpoint_epoch_002"]
    # what `tensorboard --logdir RUN` shows (tensorboard comes with `make setup`): each epoch's valid AUC
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    board = EventMultiplexer().AddRunsFromDirectory(str(run)).Reload()
    assert list(board.Runs()) == ["tensorboard"]
    shown = [(e.value, e.step) for e in board.Scalars("tensorboard", "epoch/valid_auc")]
    assert shown == [(pytest.approx(r["valid_auc"]), r["epoch"] * r["steps"]) for r in rows]  # at epoch ends
    assert json.loads((run / "summary.json").read_text())["best_checkpoint"] == summary["best_checkpoint"]
    assert summary["oracle_valid_auc"] == json.loads(Layout(synth_dir).oracle.read_text())["valid"]["oracle_auc"]
    ck = load_checkpoint(best_checkpoint(run))
    assert ck.optimizer_state is not None and ck.cfg == load_config(run / "config.yaml")
    assert ck.item_source["item_vector"] == "given" and ck.fmap.num_items == 200


@pytest.mark.slow
def test_valid_auc_is_exact_over_the_whole_split_with_two_workers(two_worker_run, synth_dir, tiny_spec):
    run, _ = two_worker_run
    for ck in epoch_checkpoints(run):
        model = load_model(ck, synth_dir)
        valid = Layout(synth_dir).split("valid")
        logits = score_parquet(model, valid, max_len=load_config(run / "config.yaml").data.max_len, logits=True)
        labels = pq.read_table(valid).column("label").to_numpy()
        assert len(logits) == tiny_spec.valid_rows
        reported = json.loads((ck / "state.json").read_text())["history"][-1]["valid_auc"]
        assert reported == pytest.approx(roc_auc_score(labels, logits), abs=1e-6)


@pytest.mark.slow
def test_existing_run_is_never_overwritten_silently(two_worker_run, synth_dir):
    run, _ = two_worker_run
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(OutputExistsError, match="--resume .* --overwrite"):
        run_training(synth_dir, str(run), tiny_cfg())
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_predict_writes_the_submission_in_test_row_order(two_worker_run, synth_dir, tiny_spec, tmp_path,
                                                         split_into_parts, monkeypatch, caplog):
    run, _ = two_worker_run
    out = tmp_path / "sub.zip"
    summary = run_predict(run, synth_dir, out)
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == ["prediction.csv"]
        text = zf.read("prediction.csv").decode()
    assert text.splitlines()[0] == "ID,Task2"
    table = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1)
    assert table.shape == (tiny_spec.test_rows, 2)
    np.testing.assert_array_equal(table[:, 0], np.arange(tiny_spec.test_rows))
    assert (table[:, 1] > 0).all() and (table[:, 1] < 1).all()
    model = load_model(best_checkpoint(run), synth_dir)
    expected = score_parquet(model, Layout(synth_dir).split("test"), load_config(run / "config.yaml").data.max_len)
    np.testing.assert_allclose(table[:, 1], expected, atol=2e-6)  # same rows, same order
    assert summary["rows"] == tiny_spec.test_rows and 0.5 < summary["metrics"]["auc"] <= 1
    with pytest.raises(OutputExistsError):
        run_predict(run, synth_dir, out)
    named = run_predict(best_checkpoint(run), synth_dir, tmp_path / "named.zip")  # --run RUN/checkpoint_epoch_NNN
    with zipfile.ZipFile(tmp_path / "named.zip") as zf:
        assert zf.read("prediction.csv").decode() == text and named["checkpoint"] == str(best_checkpoint(run))
    # the test split as a folder of part files: the same submission, rows in the parts' order, also where the
    # split is large enough for Ray Data's default reader (V2), which reads out of file order (tests/test_features.py)
    import shutil

    import mmctr_ray.features as features

    parted = shutil.copytree(synth_dir, tmp_path / "parted", ignore=shutil.ignore_patterns("item_images"))
    split_into_parts(parted, "test", 12, padded=False)  # part-2 before part-10, as their writer numbered them
    monkeypatch.setattr(features, "V1_MAX_ROWS", 0)
    monkeypatch.setenv("RAY_DATA_PARQUET_BIN_PACKING_BYTES", str(4 << 10))  # V2's read units: a row group each
    again = run_predict(run, parted, tmp_path / "parted.zip")
    with zipfile.ZipFile(tmp_path / "parted.zip") as zf:
        assert zf.read("prediction.csv").decode() == text
    assert again["rows"] == tiny_spec.test_rows and again["metrics"]["auc"] == summary["metrics"]["auc"]
    # `mmctr predict` where oracle.json has no oracle AUC for the split (null: a split of one class)
    from mmctr_ray.cli import main

    oracle = json.loads(Layout(parted).oracle.read_text())
    Layout(parted).oracle.write_text(json.dumps({**oracle, "test": {**oracle["test"], "oracle_auc": None}}))
    with caplog.at_level("INFO", logger="mmctr"):
        assert main(["predict", "--run", str(run), "--data", str(parted), "--out", str(tmp_path / "null.zip")]) == 0
    said = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("wrote "))
    assert f"test AUC {summary['metrics']['auc']:.4f}" in said and "oracle" not in said, said
    # the submission for the item-embedding track: its column, and the warning that this run's tiny model is not
    # the one Task 1 fixes, said before Ray starts (the rows are the same)
    import mmctr_ray.cli as cli

    caplog.clear()
    start_ray = cli._start_ray
    monkeypatch.setattr(cli, "_start_ray", lambda *a, **k: logging.getLogger("test").info("Ray starts") or start_ray(
        *a, **k))
    with caplog.at_level("INFO"):
        assert main(["predict", "--run", str(run), "--data", str(synth_dir), "--out", str(tmp_path / "t1.zip"),
                     "--task", "Task1"]) == 0
    with zipfile.ZipFile(tmp_path / "t1.zip") as zf:
        assert zf.read("prediction.csv").decode() == text.replace("ID,Task2\n", "ID,Task1\n", 1)
    said = [r.getMessage() for r in caplog.records]
    warned = next(i for i, m in enumerate(said) if m.startswith("--task Task1: "))
    assert "model.embedding_dim 8 (fixed: 64)" in said[warned] and "no Task 1 entry" in said[warned]
    assert warned < said.index("Ray starts")
    assert any(m.startswith(f"wrote {tmp_path / 't1.zip'} (Task1): ") for m in said)


@pytest.mark.slow
def test_scores_come_back_in_row_order_from_actors_that_finish_out_of_order(two_worker_run, synth_dir, tmp_path,
                                                                             monkeypatch):
    """IDs are row positions, so the scores must come back in the split's row order. With one actor and a test
    split of one block they did whatever Ray Data's `preserve_order` said, and the submission test above could not
    tell. Here two actors score a split of several parts, and the actor that gets the first batch holds it until the
    other actor has scored a batch of its own (a barrier, not a fixed sleep, which a loaded machine outlasts): the
    other actor's parts are done first, and without `preserve_order` they came back first."""
    import shutil

    import mmctr_ray.predict as predict

    run, _ = two_worker_run
    max_len = load_config(run / "config.yaml").data.max_len
    expected = score_parquet(load_model(best_checkpoint(run), synth_dir), Layout(synth_dir).split("test"), max_len,
                             logits=True)
    parted = shutil.copytree(synth_dir, tmp_path / "parted", ignore=shutil.ignore_patterns("item_images"))
    path = Layout(parted).split("test")
    table = pq.read_table(path)
    path.unlink()
    path.mkdir()
    bounds = [*range(0, table.num_rows, 50), table.num_rows]
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(table.slice(lo, hi - lo), path / f"part-{i:05d}.parquet")
    first = table.column("user_id").to_numpy()[:4], table.column("item_id").to_numpy()[:4]
    marks = tmp_path / "marks"
    marks.mkdir()

    class SlowOverTheFirstBatch(predict.Scorer):  # a local class: Ray pickles it whole for its actors
        def __call__(self, batch):
            (marks / f"scored-by-{os.getpid()}").touch()
            if np.array_equal(batch["user_id"], first[0]) and np.array_equal(batch["item_id"], first[1]):
                (marks / "slowed").touch()
                mine, deadline = f"scored-by-{os.getpid()}", time.monotonic() + 120
                while time.monotonic() < deadline and all(p.name == mine for p in marks.glob("scored-by-*")):
                    time.sleep(0.05)  # (past the deadline the assertion below says the other actor never scored)
                time.sleep(0.5)  # and its batch is on its way back before this one
            return super().__call__(batch)

    monkeypatch.setattr(predict, "Scorer", SlowOverTheFirstBatch)
    logits, _, _ = predict.score_split(run, parted, "test", actors=2, batch_size=4)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert (marks / "slowed").exists() and len(list(marks.glob("scored-by-*"))) == 2  # the case it is meant to be


def test_predict_on_a_test_split_cut_since_synth_writes_the_submission_without_a_test_auc(synth_dir, tmp_path,
                                                                                          monkeypatch, caplog):
    """The hidden test labels of synthetic data no longer matched a test split cut since: predict ended in an
    IndexError traceback (exit 1) after writing the zip. The submission scores the split as it is; the AUC against
    labels of other rows is not computed, and a warning says why."""
    import shutil

    import mmctr_ray.predict

    data = shutil.copytree(synth_dir, tmp_path / "cut", ignore=shutil.ignore_patterns("item_images"))
    test = Layout(data).split("test")
    pq.write_table(pq.read_table(test).slice(0, 399), test)  # 400 rows as synth wrote it
    scored = []

    def score_split(run_dir, data_dir, split, actors, gpus_per_actor, batch_size):  # the scores of the rows there are
        rows = pq.read_metadata(Layout(data_dir).split(split)).num_rows
        scored.append((rows, "no test AUC" in caplog.text))  # warned before the split is scored (hours on a large one)
        return np.linspace(-2, 2, rows), np.zeros(rows), tmp_path / "run" / "checkpoint_epoch_001"

    monkeypatch.setattr(mmctr_ray.predict, "score_split", score_split)
    with caplog.at_level("WARNING", logger="mmctr_ray.predict"):
        summary = run_predict(tmp_path / "run", data, tmp_path / "sub.zip")
    assert scored == [(399, True)] and summary["rows"] == 399
    assert "metrics" not in summary and "oracle_auc" not in summary
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        assert len(zf.read("prediction.csv").decode().splitlines()) == 400  # the header and the 399 rows
    assert f"{Layout(data).hidden_test_labels}: 400 labels for a test split of 399 rows: no test AUC" in caplog.text
    summary = run_predict(tmp_path / "run", synth_dir, tmp_path / "whole.zip")  # the split as written: its AUC
    assert summary["oracle_auc"] == json.loads(Layout(synth_dir).oracle.read_text())["test"]["oracle_auc"]
    assert summary["metrics"]["auc"] == pytest.approx(roc_auc_score(
        pq.read_table(Layout(synth_dir).hidden_test_labels).column("label").to_numpy(), np.linspace(-2, 2, 400)))


def test_predict_on_converted_data_scores_the_test_split_against_its_own_labels(synth_dir, tmp_path, monkeypatch):
    """`mmctr convert` keeps the test split's true labels (the user's held-out set), but predict looked for them only
    where `mmctr synth` keeps hidden ones, so a converted test split never had a test AUC."""
    import shutil

    import mmctr_ray.predict

    data = shutil.copytree(synth_dir, tmp_path / "converted", ignore=shutil.ignore_patterns("item_images"))
    lay = Layout(data)
    labels = pq.read_table(lay.hidden_test_labels, columns=["label"]).column("label").to_numpy()
    test = pq.read_table(lay.split("test"))  # as convert writes it: the true labels in the split
    pq.write_table(test.set_column(test.schema.get_field_index("label"), "label", pa.array(labels)), lay.split("test"))
    shutil.rmtree(lay.hidden_test_labels.parent)
    for path in (lay.oracle, lay.synth_manifest):
        path.unlink()
    lay.convert_manifest.write_text(json.dumps({"placeholder_embeddings": True}))
    monkeypatch.setattr(mmctr_ray.predict, "score_split", lambda run_dir, data_dir, split, actors, gpus, batch: (
        np.linspace(-2, 2, len(labels)), labels, tmp_path / "run" / "checkpoint_epoch_001"))
    summary = run_predict(tmp_path / "run", data, tmp_path / "sub.zip")
    assert summary["metrics"]["auc"] == pytest.approx(roc_auc_score(labels, np.linspace(-2, 2, len(labels))))
    assert "oracle_auc" not in summary
    pq.write_table(test.set_column(test.schema.get_field_index("label"), "label",
                                   pa.array(np.r_[labels[:-1], 0.5])), lay.split("test"))
    with pytest.raises(DataError, match=rf"^{lay.split('test')}: column label: row {len(labels) - 1} holds 0.5, "):
        run_predict(tmp_path / "run", data, tmp_path / "bad.zip")  # checked as the other splits' labels are
    assert not (tmp_path / "bad.zip").exists()


def plain_cfg(*sets: str):
    """The deterministic config of :func:`plain_run`, with dropout and a local shuffle buffer, so that the seeding of
    the masks and of the shuffle counts too."""
    return tiny_cfg("train.epochs=2", "train.patience=3", "train.deterministic=true", "model.dropout=0.2",
                    "train.shuffle_buffer=1000", *sets)


@pytest.fixture(scope="module")
def plain_run(ray_local, synth_dir, tmp_path_factory):
    """One worker, two epochs, never interrupted: the reference for resume and recovery."""
    run = tmp_path_factory.mktemp("runs") / "plain"
    run_training(synth_dir, str(run), plain_cfg())
    return run, _metrics(run)


def recording_reports(path: Path):
    """A Ray Train callback that appends the epoch of every report Ray Train takes to ``path`` (it runs on Train's
    controller, where a Tune trial's reports go on to Tune)."""
    import ray.train

    class Reports(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(f"{metrics[0]['epoch']}\n")

    return Reports()


SAME_RUN = ("epoch", "train_loss", "valid_auc", "valid_auc_se", "valid_logloss", "lr", "steps")


def assert_repeats(run: Path, plain_run) -> None:
    """``run`` repeats the first epochs of the uninterrupted ``plain_run`` bit for bit: metrics and weights."""
    (reference, reference_rows), rows, mine = plain_run, _metrics(run), epoch_checkpoints(run)
    assert rows and len(mine) == len(rows) <= len(reference_rows)
    same = [[{k: r[k] for k in SAME_RUN} for r in rs] for rs in (rows, reference_rows[:len(rows)])]
    assert same[0] == same[1]
    for path, theirs in zip(mine, epoch_checkpoints(reference)):
        a, b = load_checkpoint(path), load_checkpoint(theirs)
        assert [k for k in a.model_state if not torch.equal(a.model_state[k], b.model_state[k])] == [], path
        moments = [(x, y) for x, y in zip(a.optimizer_state["state"].values(), b.optimizer_state["state"].values())]
        assert len(moments) == len(a.optimizer_state["state"]) == len(b.optimizer_state["state"]) > 0
        assert all(torch.equal(x[k], y[k]) for x, y in moments for k in x), path


def test_ingest_options_are_ray_trains_defaults_without_its_deprecation_warning():
    import warnings

    from ray.train import DataConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        options = _ingest_options(tiny_cfg())
    assert not [w for w in caught if "exclude_resources" in str(w.message)]
    assert options == DataConfig.default_ingest_options() and not options.preserve_order
    assert _ingest_options(tiny_cfg("train.deterministic=true")).preserve_order


def test_a_deterministic_run_reads_its_splits_in_file_order_whatever_their_size(synth_dir, monkeypatch):
    """The configs said `deterministic: true` reads in file order, but a split over V1_MAX_ROWS went to Ray Data's
    V2 reader, which reorders a large file's row groups even with preserve_order (predict's reason for
    ``ordered``). Here every split counts as large; a deterministic run's reads must still be V1's, and keep their
    blocks in read order (the datasets' own preserve_order, which a search's shared splits materialize with)."""
    import ray.data

    from mmctr_ray import features
    from mmctr_ray.train_driver import split_datasets

    class Read:  # what read_split chains on the read, without running it (no Ray needed)
        def __init__(self):
            self.context = ray.data.DataContext.get_current().copy()

        def select_columns(self, columns):
            return self

        def map_batches(self, *args, **kwargs):
            return self

    v2_at_read = []

    def read_parquet(paths, **kwargs):
        v2_at_read.append(ray.data.DataContext.get_current().use_datasource_v2)
        return Read()

    monkeypatch.setattr(features, "V1_MAX_ROWS", 0)
    monkeypatch.setattr(ray.data, "read_parquet", read_parquet)
    monkeypatch.setattr(ray.data.DataContext.get_current(), "use_datasource_v2", True)
    ordered, unordered = split_datasets(synth_dir, 16, ordered=True), split_datasets(synth_dir, 16, ordered=False)
    assert v2_at_read == [False, False, True, True] and set(ordered) == {"train", "valid"}
    assert [ds.context.execution_options.preserve_order for ds in (*ordered.values(), *unordered.values())] == [
        True, True, False, False]


def test_ray_datas_progress_bar_notice_is_taken_before_it_prints():
    from ray.util.debug import log_once

    from mmctr_ray.ray_env import PROGRESS_BARS_OFF_KEY, quiet_ray_data

    quiet_ray_data(verbose=False)
    assert log_once(PROGRESS_BARS_OFF_KEY) is False  # Ray Data's own log_once() call now says "already logged"
    # and no "Starting execution of Dataset ..." / "Execution plan of ..." pair per epoch from a 2-worker run's split
    # coordinator, which runs with the dataset's DataContext (seen in `mmctr train --workers 2` before 2026-12-02)
    import ray.data

    assert ray.data.DataContext.get_current().print_on_execution_start is False


def test_ray_trains_per_epoch_lines_are_quiet_unless_verbose():
    import logging

    from ray.train.v2._internal.execution import context

    from mmctr_ray.ray_env import quiet_ray_train

    loggers = [logging.getLogger("ray.train.v2._internal.execution.storage"), logging.getLogger(context.__file__)]
    saved = [(lg, lg.level) for lg in (logging.getLogger("ray.train"), loggers[1])]
    try:
        for lg, _ in saved:
            lg.setLevel(logging.INFO)  # as in a Train worker
        quiet_ray_train(verbose=True)
        assert [lg.isEnabledFor(logging.INFO) for lg in loggers] == [True, True]
        quiet_ray_train(verbose=False)  # the checkpoint line and the report line
        assert [lg.isEnabledFor(logging.INFO) for lg in loggers] == [False, False]
        assert all(lg.isEnabledFor(logging.WARNING) for lg in loggers)
    finally:
        for lg, level in saved:
            lg.setLevel(level)


@pytest.mark.slow
def test_runs_on_the_private_local_ray_start_no_placement_group_cleaner_and_no_preemption_watcher(plain_run):
    """Each was one more process per run, on the path to the workers' start; neither has work on one machine whose
    Ray ends with the command (`torch_trainer`). The actors Ray's GCS knows of, dead ones included."""
    from ray._private import state

    actors = {a["ActorClassName"] for a in state.actors().values()}
    assert {"TrainController", "RayTrainWorker"} <= actors
    assert not actors & {"PlacementGroupCleaner", "PreemptionWatcher"}, actors


def test_only_a_run_on_the_private_local_ray_drops_the_placement_group_cleaner(monkeypatch):
    """A Tune trial (which its scheduler stops by killing it while the search goes on) and a run on a Ray the caller
    started keep it: without it a placement group whose controller died stays until the job ends."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from mmctr_ray import ray_env

    for private in (True, False):
        monkeypatch.setattr(ray_env, "private_local_ray", lambda: private)
        trainer = ray_env.torch_trainer()(lambda: None, scaling_config=ScalingConfig(num_workers=1))
        assert isinstance(trainer, DataParallelTrainer)  # TorchTrainer's base, as TorchTrainer is in Train V2
        callbacks = trainer._create_default_callbacks()
        assert any(isinstance(cb, PlacementGroupCleanerCallback) for cb in callbacks) is not private
        assert len(callbacks) == len(DataParallelTrainer._create_default_callbacks(trainer)) - private


def test_the_process_that_builds_a_runs_trainer_imports_no_torch(tmp_path):
    """A run's driver and each trial of a search build the trainer and read checkpoints' state; they imported torch
    for that (TorchTrainer's package, the training module for its worker function, the checkpoint module): ~1.2 s
    and ~470 MB of resident memory a process. The trainer is what TorchTrainer builds: Train V2's DataParallelTrainer
    with a torch backend, here WorkerTorchConfig, gloo on the CPU and NCCL on GPUs."""
    probe = """
import sys
from ray.train import ScalingConfig
from mmctr_ray import ray_env, torch_backend, train_driver, tuning  # noqa: F401
from mmctr_ray.checkpoint import read_state
assert torch_backend.available()
for gpu in (False, True):  # the backend each gets: the controller test below
    ray_env.torch_trainer()(train_driver.train_in_worker, scaling_config=ScalingConfig(num_workers=2, use_gpu=gpu))
assert read_state(sys.argv[1])["lr"] == 1e-3
"""
    state = tmp_path / "checkpoint_epoch_001"
    state.mkdir()
    (state / "state.json").write_text(json.dumps(TrainState(lr=1e-3).to_json()))  # what a resume reads first
    assert modules_loaded(probe, "torch", str(state)) == []


def test_a_runs_controller_gets_a_backend_and_callbacks_that_need_no_torch(tmp_path):
    """Every run's controller, a process of its own, unpickles the trainer's backend config and its callbacks. Ray's
    `TorchConfig` lives in a module that imports torch, so each controller imported torch for it alone (~2.8 s and
    ~500 MB a run, 2026-12-01); `torch_backend.WorkerTorchConfig` sets the process group up from the workers. What
    `run_training` hands the controller is unpickled here in a fresh process, which must not import torch."""
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig

    from mmctr_ray import ray_env, torch_backend
    from mmctr_ray.train_driver import _worker_failures

    for use_gpu, backend in ((True, "nccl"), (False, "gloo")):
        trainer = ray_env.torch_trainer()(torch_backend.train_in_worker,  # what run_training passes
                                          train_loop_config={"cfg": tiny_cfg().to_dict()},
                                          scaling_config=ScalingConfig(num_workers=2, use_gpu=use_gpu),
                                          run_config=RunConfig(callbacks=[_worker_failures(2)]))
        assert isinstance(trainer.backend_config, torch_backend.WorkerTorchConfig)
        assert trainer.backend_config.backend == backend
    payload = tmp_path / "controller.pkl"
    payload.write_bytes(cloudpickle.dumps((trainer.train_run_context, trainer._create_default_callbacks())))
    assert modules_loaded("import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())", "torch",
                          str(payload)) == []


@pytest.mark.slow
def test_one_worker_reads_the_whole_split_itself(plain_run, synth_dir):
    _, rows = plain_run
    train_rows = pq.ParquetFile(Layout(synth_dir).split("train")).metadata.num_rows
    assert [r["steps"] for r in rows] == [train_rows // 256] * 2  # every full batch of the split (none twice)
    cfg = tiny_cfg()
    assert _data_config(cfg, 1)._datasets_to_split == []  # no streaming_split, no coordinator actor to start
    assert _data_config(cfg, 2)._datasets_to_split == ["train"]
    # run_training sets Ray Train's poll interval where the user did not: the end of training is seen in ~0.5 s
    assert os.environ[POLL_INTERVAL_ENV] == POLL_INTERVAL_S


@pytest.mark.slow
def test_resume_continues_from_the_latest_checkpoint(plain_run, synth_dir, tmp_path):
    run, before = tmp_path / "run", plain_run[1]
    shutil.copytree(plain_run[0], run)  # the module's run stays as it was, 2 epochs, for the tests after this one
    with pytest.raises(ConfigError, match="only train"):
        run_training(synth_dir, str(run), tiny_cfg("train.epochs=3", "model.dropout=0.5"), resume=True)
    run_training(synth_dir, str(run), resume_config(str(run), ["train.epochs=3"]), resume=True)
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[:2] == before
    assert load_checkpoint(epoch_checkpoints(run)[-1]).state.epoch == 3


@pytest.mark.slow
def test_a_deterministic_run_resumed_repeats_the_uninterrupted_run_bit_for_bit(plain_run, synth_dir, tmp_path):
    """Stopped after epoch 1 and resumed, a deterministic run ends where the one never stopped ends: the same data
    order (file order, the local shuffle seeded per epoch), the same dropout masks (seeded per epoch), the same
    gradients (no parallel atomic adds on the CPU: see test_model.py)."""
    run, heard = tmp_path / "resumed", tmp_path / "reports.txt"
    run_training(synth_dir, str(run), plain_cfg("train.epochs=1"), callbacks=[recording_reports(heard)])
    run_training(synth_dir, str(run), resume_config(str(run), ["train.epochs=2"]), resume=True,
                 callbacks=[recording_reports(heard)])
    assert [(r["epoch"], r["resumed_from_epoch"]) for r in _metrics(run)] == [(1, 0), (2, 1)]
    assert heard.read_text().split() == ["1", "2"]  # the resumed run does not report epoch 1 again
    assert_repeats(run, plain_run)


def test_the_driver_puts_back_the_sigint_handler_ray_train_leaves_and_tells_sigterm_apart():
    """Ray Train installs its own SIGINT handler in trainer.fit() and leaves it: a pipeline's later steps ignored
    Ctrl-C twice and exited 0 on the third. Ray's driver turns SIGTERM into SystemExit too, which is not Ctrl-C."""
    import signal

    from mmctr_ray.train_driver import _driver_signals

    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def rays_sigterm(signum, frame):  # what ray.init installs in the driver
        raise SystemExit(signum)

    signal.signal(signal.SIGTERM, rays_sigterm)
    try:
        with _driver_signals() as seen:
            signal.signal(signal.SIGINT, lambda *a: None)  # Ray Train's, for the run
        assert signal.getsignal(signal.SIGINT) is before_int and signal.getsignal(signal.SIGTERM) is rays_sigterm
        assert not seen["sigterm"]
        with pytest.raises(SystemExit) as exit_info:
            with _driver_signals() as seen:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):  # the handler runs between bytecodes
                    pass
        assert exit_info.value.code == signal.SIGTERM and seen["sigterm"]
        assert signal.getsignal(signal.SIGTERM) is rays_sigterm
    finally:
        signal.signal(signal.SIGINT, before_int)
        signal.signal(signal.SIGTERM, before_term)


def test_the_raylets_worker_count_warning_is_not_printed_on_the_private_local_ray_only(monkeypatch):
    from ray._private import worker as ray_worker

    import mmctr_ray.ray_env as ray_env

    printed = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data))
    assert ray_env.quiet_worker_count_warning() and ray_env.quiet_worker_count_warning()  # wrapped once
    warning = ("WARNING: 8 PYTHON worker processes have been started on node: 9bb7b679e5a31b499b1c4a0484bfd533ef32425e"
               "383e7a735d1e2495 with address: 127.0.0.1, which is 4x the maximum expected startup concurrency (2). "
               "This could be a result of using a large number of actors, tasks blocked in ray.get() calls, or tasks "
               "with fractional CPU requests (e.g., num_cpus=0.1) allowing high concurrency. See https://github.com/"
               "ray-project/ray/issues/3644 for some discussion of workarounds.")  # Ray 2.60's, as its driver's
    other = "WARNING: the node is running low on memory"  # listen_error_messages passes it to print_to_stdstream
    emit = lambda lines, pid="raylet": ray_worker.print_to_stdstream(  # noqa: E731
        {"lines": lines, "pid": pid, "is_err": False}, ignore_prefix=False)
    monkeypatch.setattr(ray_env, "private_local_ray", lambda: True)
    emit([warning])
    emit([warning, other])
    emit([other])
    emit([warning], pid=1234)  # a worker's own line that quotes it
    assert [d["lines"] for d in printed] == [[other], [other], [warning]]
    printed.clear()
    monkeypatch.setattr(ray_env, "private_local_ray", lambda: False)  # a cluster: Ray's own advice may apply there
    emit([warning])
    assert [d["lines"] for d in printed] == [[warning]]


def test_rays_benign_kill_actor_error_is_not_printed_and_every_other_line_is(monkeypatch):
    from ray._private import ray_logging

    from mmctr_ray.ray_env import RAY_LOG_HANDLER, drop_benign_ray_lines

    # a dispatcher of the test's own: this module's Ray may be up, and its log thread emits to Ray's
    dispatcher = ray_logging.WorkerStandardStreamDispatcher()
    monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", dispatcher)

    benign = ("[2026-11-30 10:52:25,747 E 706 706] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor "
              "611e54fb296365b2e401457f01000000, return status: Invalid: KillActor RPC failed for actor "
              "611e54fb296365b2e401457f01000000: RpcError: RPC error: Socket closed rpc_code: 14")
    real = "[2026-11-30 10:52:25,800 E 706 706] (gcs_server) gcs_actor_manager.cc:99: Actor died: out of memory"
    printed = []
    dispatcher.add_handler("other", lambda data: None)
    dispatcher.add_handler(RAY_LOG_HANDLER, printed.append)
    assert drop_benign_ray_lines() and drop_benign_ray_lines()  # the second call wraps nothing twice
    assert [name for name, _ in dispatcher.handlers] == ["other", RAY_LOG_HANDLER]
    later = ("[2025-11-11 18:59:30,227 E 201623 201623] (gcs_server) gcs_actor_manager.cc:1773: Failed to kill actor "
             "94ae464171c220ccbf858e4401000000, return status: Invalid: KillActor RPC failed for actor "
             "94ae464171c220ccbf858e4401000000: RpcError: RPC Error message: Socket closed; RPC Error details:  "
             "rpc_code: 14")  # the wording of another call site (ray-project/ray#58544)
    dispatcher.emit({"pid": "gcs_server", "is_err": True, "lines": [benign, later]})  # nothing left: nothing printed
    dispatcher.emit({"pid": "gcs_server", "is_err": True, "lines": [benign, real]})
    dispatcher.emit({"pid": 4242, "is_err": True, "lines": [benign]})  # a worker's line is its own business
    assert printed == [{"pid": "gcs_server", "is_err": True, "lines": [real]},
                       {"pid": 4242, "is_err": True, "lines": [benign]}]
    dispatcher.remove_handler(RAY_LOG_HANDLER)  # a Ray that prints no logs (log_to_driver=False)
    assert not drop_benign_ray_lines()


def test_early_batches_fetch_the_first_batch_before_iteration_and_yield_every_batch_once():
    """A worker starts its first epoch's stream before it builds the model (`EarlyBatches`): the first batch is
    read meanwhile, then iteration yields it and the rest unchanged; a failed read raises at iteration, and a
    stream that is not wanted (a resumed run that had stopped early) is closed."""
    import threading

    from mmctr_ray.training import EarlyBatches

    fetched, closed = threading.Event(), []

    def source(n, fail=False):
        try:
            for i in range(n):
                if fail:
                    raise DataError("train.parquet: bad row")
                fetched.set()
                yield i
        finally:
            closed.append(n)

    early = EarlyBatches(source(5))
    assert fetched.wait(10)  # read without anyone iterating
    assert list(early) == [0, 1, 2, 3, 4] and closed == [5]
    assert list(EarlyBatches(source(0))) == []
    failed = EarlyBatches(source(3, fail=True))
    with pytest.raises(DataError, match="bad row"):
        list(failed)
    closed.clear()
    unwanted = EarlyBatches(source(7))
    unwanted.close()
    assert closed == [7]


def test_the_progress_line_times_the_steps_its_clock_saw(tmp_path, caplog, monkeypatch):
    """The clock starts at step 2 (step 1 waits for the data pipeline), so at step 3 it has seen 2 steps: the ETA
    divided by 3 and came out a third short (half, on the first line of an epoch, at step 2)."""
    from types import SimpleNamespace

    import mmctr_ray.run_log
    from mmctr_ray.run_log import RunLog

    progress = RunLog(str(tmp_path), enabled=True)
    # a clock of its own: the real one, read again inside, moved the rate to 255 after 4 ms of delay
    monkeypatch.setattr(mmctr_ray.run_log, "time", SimpleNamespace(perf_counter=lambda: 102.0, time=time.time))
    with caplog.at_level("INFO", logger="mmctr.train"):
        progress.progress(1, 3, 10, 2 * 256, 100.0, torch.tensor(1.5))  # 2 steps in 2 s
    assert "epoch 1 step 3/10 loss 0.5000 256 samples/s ETA 7s" in caplog.text  # 7 steps left at 1 s each


@pytest.mark.slow
def test_resume_takes_a_complete_checkpoint_ray_train_had_not_registered(plain_run, synth_dir, monkeypatch):
    """Ctrl-C can stop a run after a worker wrote its epoch's checkpoint and before Ray Train registered it: --resume
    then continued from the registered, older one (the Ctrl-C line had named the newer). The newer of the two is
    taken; after a worker restart within a run, the registered one stays the newer."""
    import ray.train

    from mmctr_ray.training import _restore, _resume_point, make_optimizer

    run = plain_run[0]
    first, second = (str(run / f"checkpoint_epoch_{e:03d}") for e in (1, 2))
    model = load_model(first, synth_dir)
    cfg = model.experiment_cfg
    optimizer = make_optimizer(model, cfg.train, torch.device("cpu"))
    for registered, on_disk, epoch in [(first, second, 2), (second, first, 2), (first, first, 1), (first, None, 1),
                                       (None, second, 2)]:
        monkeypatch.setattr(ray.train, "get_checkpoint",
                            lambda r=registered: r and ray.train.Checkpoint.from_directory(r))
        assert _restore(model, optimizer, on_disk, cfg.train).epoch == epoch, (registered, on_disk)
        assert _resume_point(on_disk)[1] == epoch  # what the worker streams before it loads the checkpoint


@pytest.mark.slow
def test_killed_workers_restart_the_group_from_the_last_checkpoint(two_worker_run, synth_dir, tmp_path, monkeypatch):
    """DDP over two workers, killed twice: rank 0 right after it reported epoch 1 (before Ray Train's controller
    could poll it and take that report), then rank 1 mid-way through epoch 2 while rank 0 waits for it in the
    gradient all-reduce (a node lost on a cluster). Each time Ray Train ends the group and starts a new one, both
    ranks take the checkpoint of epoch 1, whether Ray Train had registered it or not, and stream the epoch they
    resume in; the run ends as the same run uninterrupted (whose epoch 2 trained from the kept shards) did, bit for
    bit. (One worker killed and resumed with a shuffle buffer: the deterministic resume test.)"""
    run, heard = tmp_path / "f", tmp_path / "reports.txt"
    mid_epoch_2 = 3_000 // 256 + 3  # a step is a batch of both ranks: 256 rows
    faults = {tmp_path / "killed_after_report": "r0/report1", tmp_path / "killed": f"r1/{mid_epoch_2}"}
    monkeypatch.setenv(FAULT_ENV, ",".join(f"{at}:{marker}" for marker, at in faults.items()))
    summary = run_training(synth_dir, str(run), two_worker_cfg(), workers=2, max_failures=len(faults),
                           callbacks=[recording_reports(heard)])
    assert [marker.read_text() for marker in faults] == ["killed\n"] * len(faults)
    assert summary["epochs"] == 2
    # the restarted workers took the checkpoint written after epoch 1, whether Ray Train had registered it or not
    # (a report reaches the controller at its next poll of the worker, every 0.25 s: before, a worker killed soon
    # after its report restarted from the epoch before, here from scratch) ...
    assert [(r["epoch"], r["resumed_from_epoch"], r["resident"]) for r in _metrics(run)] == [(1, 0, False),
                                                                                            (2, 1, False)]
    # ... Ray Train (so a Tune trial) heard every epoch once: a report left unheard is made again after the restart,
    # with its checkpoint, so that the second restart finds it registered and does not make it a third time
    assert heard.read_text().split() == ["1", "2"]
    assert_repeats(run, (two_worker_run[0], _metrics(two_worker_run[0])))



def test_a_failed_worker_is_one_line_that_says_why_and_whether_the_run_restarts(caplog):
    """Ray Train reports a restart as an INFO block of ~40 lines (shown with -v, or on a joined cluster): the run says
    it in one line, from the controller, naming the rank whose process died (not a survivor cut off in a collective)
    and what Ray says of it; bad input still ends the run without a line, and a preemption is left to Ray Train."""
    import logging

    from ray.exceptions import ActorDiedError
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from mmctr_ray.train_driver import _worker_failures

    exit_detail = ("The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
                   "detail: Worker unexpectedly exits with a connection error code 2")
    died = ActorDiedError()
    died.error_msg = (f"The actor died unexpectedly before finishing this task.\n\tpid: 5066\n{exit_detail}. End of "
                      "file. There are some potential root causes.")
    dead = WorkerHealthCheckFailedError("A worker health check failed.", died)
    survivor = RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500")
    callback = _worker_failures(max_failures=2)
    with caplog.at_level(logging.WARNING, logger="mmctr_ray.train_driver"):
        for _ in range(3):
            callback.after_exception(None, {0: survivor, 1: dead})
        with pytest.raises(ControllerError):  # bad rows: no retry, and the driver says it as the run's one line
            callback.after_exception(None, {0: DataError("train.parquet: bad row")})
        preempted = ActorDiedError()
        preempted._preempted = True  # as Ray sets it from the death cause of a node reclaimed
        _worker_failures(max_failures=2).after_exception(None, {0: WorkerHealthCheckFailedError("lost", preempted)})
        _worker_failures(max_failures=-1).after_exception(None, {0: survivor})
        _worker_failures(max_failures=1).after_exception(None, {1: survivor, 0: survivor})
    assert str(dead).count("\n") > 1  # what Ray Train's line printed whole
    reason = f"rank 1 failed (WorkerHealthCheckFailedError: {exit_detail}); "
    cut_off = "rank 0 failed (RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:29500); "
    assert [r.getMessage() for r in caplog.records] == [
        reason + "the workers restart from the run's last checkpoint (restart 1 of at most 2)",
        reason + "the workers restart from the run's last checkpoint (restart 2 of at most 2)",
        reason + "the run ends: it restarts at most 2 times",
        cut_off + "the workers restart from the run's last checkpoint (restart 1)",
        cut_off + "the workers restart from the run's last checkpoint (restart 1 of at most 1)"]


def test_a_run_whose_workers_die_past_its_restarts_ends_in_one_line(tmp_path, monkeypatch):
    """The callback's line said "the run ends: it restarts at most 2 times", and then the command printed Ray
    Train's whole TrainingFailedError traceback, as for a bug. A worker's process that died (killed for memory, a
    node lost) once more than the run restarts is one line saying what died and what RUN keeps; bad input a worker
    met stays its own line, and a worker's own error (a bug) keeps its traceback."""
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from mmctr_ray.errors import WorkersFailed
    from mmctr_ray.train_driver import _run_ended

    died = ActorDiedError()
    died.error_msg = ("The actor died unexpectedly before finishing this task.\n\tpid: 5066\nThe actor is dead because "
                      "its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker "
                      "unexpectedly exits with a connection error code 2. End of file.")
    dead = WorkerHealthCheckFailedError("A worker health check failed.", died)
    survivor = RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500")
    ended = _run_ended(WorkerGroupError("Training failed.", {0: survivor, 1: dead}), tmp_path / "run", 2)
    assert isinstance(ended, WorkersFailed) and str(ended) == (
        f"{tmp_path / 'run'}: a worker's process died (The actor is dead because its worker process has died. Worker "
        f"exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2) and "
        f"the run, restarted 2 times, ends; {tmp_path / 'run'} holds no checkpoint yet")
    import mmctr_ray.checkpoint

    monkeypatch.setattr(mmctr_ray.checkpoint, "epoch_checkpoints", lambda run: [
        Path(run) / "checkpoint_epoch_001", Path(run) / "checkpoint_epoch_002"])
    assert str(_run_ended(WorkerGroupError("Training failed.", {1: dead}), tmp_path / "run", 1)).endswith(
        f"and the run, restarted once, ends; {tmp_path / 'run'} keeps the checkpoints of epochs 1–2: --resume "
        f"continues from the last")
    bad = _run_ended(WorkerGroupError("Training failed.", {0: DataError("train.parquet: bad row")}), tmp_path, 2)
    assert isinstance(bad, DataError) and str(bad) == "train.parquet: bad row"
    assert _run_ended(WorkerGroupError("Training failed.", {0: survivor}), tmp_path, 2) is None


@pytest.mark.slow
def test_a_timed_out_resource_request_is_no_warning_on_the_local_ray(ray_local):
    """On a busy machine each run's controller printed Ray Train's "Failed to send resource request ... safe to
    ignore" WARNING with a ~20-line traceback: on the private local Ray no autoscaler serves that request. Its
    workers (the controller among them) demote it to DEBUG, kept in Ray Train's log file; a process without the
    private Ray's setup (a cluster's) still warns."""
    import logging

    import ray
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client

    from mmctr_ray.ray_env import TRAIN_REQUEST_LOGGER

    def timed_out_request() -> list:
        """Ray Train's own code path when its controller's request to the AutoscalingCoordinator fails: the records
        its logger passes on, as (level, message, shown on the console at Ray Train's WARNING level, at INFO)."""
        from types import SimpleNamespace

        from ray.train import ScalingConfig
        from ray.train.v2._internal.logging.logging import TrainLogLevelFilter

        def timed_out(**kwargs):
            raise TimeoutError("Get timed out: some object(s) not ready")

        seen = []
        keep = logging.Handler()
        keep.emit = seen.append
        client.logger.addHandler(keep)
        try:
            requests = client.TrainAutoscalingCoordinatorClient("train-test")
            requests.__dict__["_autoscaling_coordinator"] = SimpleNamespace(
                request_resources=SimpleNamespace(remote=timed_out))
            requests.send_resource_request(ScalingConfig(num_workers=1), 1)
        finally:
            client.logger.removeHandler(keep)
        return [(r.levelno, r.getMessage(), TrainLogLevelFilter("WARNING").filter(r),
                 TrainLogLevelFilter("INFO").filter(r)) for r in seen]

    assert client.logger.name == TRAIN_REQUEST_LOGGER  # the logger Ray 2.60 warns on
    in_worker = ray.get(ray.remote(num_cpus=0)(timed_out_request).remote())  # a worker of the private Ray
    assert [(level, shown, verbose) for level, _, shown, verbose in in_worker] == [(logging.DEBUG, False, False)]
    assert in_worker[0][1].startswith("Failed to send resource request for train-test.")
    here = timed_out_request()  # the test's process: no setup hook ran here
    assert [(level, shown) for level, _, shown, _ in here] == [(logging.WARNING, True)]


@pytest.mark.slow
def test_a_workers_traceback_of_bad_input_stays_off_the_console_of_the_local_ray(ray_local):
    """A row a worker refused (a DataError, which `mmctr train` reports in one line naming the file and column)
    also printed Ray Train's "Error in training function:" with a ~40-line traceback from the worker. The private
    Ray's workers demote that one to DEBUG (Ray Train's log file keeps it), wrapped in Ray Data's error as a worker
    meets it too; any other error's traceback prints, a bug met while handling bad input included. So does a
    survivor's, cut off in a collective by a peer's death: the restart's one line names the dead rank (its ~30-line
    traceback printed at every restart of a two-worker run)."""
    import ray

    def tracebacks() -> list:
        """Ray Train's own report of a training function's error, for bad input and for another error: the levels
        its logger passes on."""
        import logging

        from ray.train.v2._internal import util

        from ray.exceptions import UserCodeException

        from mmctr_ray.errors import DataError

        def bad_input():
            raise DataError("train.parquet: column item_seq: a history ...")

        def wrapped():  # as a worker meets it: raised in a Ray Data task, whose error wraps it
            try:
                bad_input()
            except DataError as e:
                raise UserCodeException("UDF failed to process a data block.") from e

        def a_bug():
            raise RuntimeError("a bug")

        def a_bug_while_handling_bad_input():
            try:
                bad_input()
            except DataError:
                a_bug()

        def peer_gone():  # a survivor's collective, cut off by its peer's death (a restart follows)
            raise RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                               "[127.0.0.1]:7305: Connection reset by peer. This is typically caused by a remote "
                               "worker hanging or crashing.")

        def a_bug_while_handling_a_peers_death():
            try:
                peer_gone()
            except RuntimeError:
                a_bug()

        seen = []
        keep = logging.Handler()
        keep.emit = seen.append
        util.logger.addHandler(keep)
        try:
            for raises in (bad_input, wrapped, a_bug, a_bug_while_handling_bad_input, peer_gone,
                           a_bug_while_handling_a_peers_death):
                try:
                    raises()
                except Exception as e:
                    util.construct_user_exception_with_traceback(e)
        finally:
            util.logger.removeHandler(keep)
        return [(r.levelname, r.getMessage().splitlines()[-1]) for r in seen]

    from mmctr_ray.ray_env import TRAIN_ERROR_LOGGER
    from ray.train.v2._internal import util

    assert util.logger.name == TRAIN_ERROR_LOGGER
    assert ray.get(ray.remote(num_cpus=0)(tracebacks).remote()) == [
        ("DEBUG", "mmctr_ray.errors.DataError: train.parquet: column item_seq: a history ..."),
        ("DEBUG", "ray.exceptions.UserCodeException: UDF failed to process a data block."),
        ("ERROR", "RuntimeError: a bug"), ("ERROR", "RuntimeError: a bug"),
        ("DEBUG", "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                  "[127.0.0.1]:7305: Connection reset by peer. This is typically caused by a remote worker hanging "
                  "or crashing."),
        ("ERROR", "RuntimeError: a bug")]
    assert [level for level, _ in tracebacks()] == ["ERROR"] * 6  # no setup hook in the test's process


@pytest.mark.slow
def test_the_cleaners_line_for_a_trials_ended_controller_is_dropped_on_the_local_ray(ray_local):
    """In `mmctr tune` Ray Train's placement-group cleaner warned "Detected that the Ray Train controller actor (...)
    is dead. Cleaning up placement group ..." after every trial ASHA stopped: its designed path. The private Ray's
    workers drop that line; the cleaner still removes the group, and a process without that setup still warns."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from mmctr_ray.ray_env import PG_CLEANER_LOGGER

    def clean(group) -> list:
        """Ray Train's cleaner on a group whose controller is gone: the messages its logger passes on."""
        import logging

        from ray.train.v2._internal.execution.controller import placement_group_cleaner as cleaner

        seen = []
        keep = logging.Handler()
        keep.emit = seen.append
        cleaner.logger.addHandler(keep)
        try:
            cleaner.PlacementGroupCleaner("ffffffffffffffffffffffff01000000", 1.0, 1.0, None)._cleanup_placement_group(
                group)
        finally:
            cleaner.logger.removeHandler(keep)
        return [(r.levelname, r.getMessage()) for r in seen]

    groups = [placement_group([{"CPU": 0.1}]) for _ in range(2)]
    ray.get([g.ready() for g in groups])
    assert ray.get(ray.remote(num_cpus=0)(clean).remote(groups[0])) == []  # a worker of the private Ray
    assert placement_group_table(groups[0])["state"] == "REMOVED"  # cleaned all the same
    said = clean(groups[1])  # the test's process: no setup hook ran here
    assert [level for level, _ in said] == ["WARNING"] and said[0][1].startswith(
        "Detected that the Ray Train controller actor (ffffffffffffffffffffffff01000000) is dead. Cleaning up ")
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    assert placement_group_cleaner.logger.name == PG_CLEANER_LOGGER


@pytest.mark.slow
def test_ray_datas_lines_for_each_run_of_a_dataset_stay_off_the_console_of_the_local_rays_workers(ray_local):
    """A 2-worker run's split coordinator printed "✔️ Dataset train_.. execution finished in N seconds" per epoch and
    split, and Ray Data's hint that progress bars are off (off on purpose); a map task that met bad input printed
    two ERROR lines before the error's own line ("... will now abort. To ignore this exception and continue, set
    DataContext.max_errored_blocks"). The private Ray's workers hide them from the console as Ray Data's own ``hide``
    does (its log file keeps them); its other lines still print."""
    import logging

    import ray

    def run_a_dataset() -> list:
        import ray.data
        from ray.data._internal.logging import HiddenRecordFilter

        seen = []
        keep = logging.Handler(logging.INFO)
        keep.emit = seen.append
        logging.getLogger("ray.data").addHandler(keep)  # where the records of Ray Data's modules go
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            ray.data.range(4, override_num_blocks=1).materialize()
            logging.getLogger("ray.data._internal.execution.streaming_executor").info("another line")

            def bad_input(batch):
                from mmctr_ray.errors import DataError

                raise DataError("train.parquet: column item_seq: a history ...")

            try:
                ray.data.range(4, override_num_blocks=1).map_batches(bad_input).materialize()
            except Exception as e:
                assert "train.parquet: column item_seq: a history ..." in str(e)
            else:
                raise AssertionError("the map task raised nothing")
        finally:
            logging.getLogger("ray.data").removeHandler(keep)
        return [(r.getMessage(), HiddenRecordFilter().filter(r)) for r in seen]

    fresh = {"env_vars": {"MMCTR_TEST_FRESH_WORKER": "1"}}  # a process of its own: Ray Data's hint is once a process
    lines = dict(ray.get(ray.remote(num_cpus=0, runtime_env=fresh)(run_a_dataset).remote()))
    finished = [line for line in lines if "execution finished in" in line]
    hint = [line for line in lines if line.startswith("Progress bars disabled")]
    abort = [line for line in lines if "Dataset execution will now abort" in line]
    user_code = [line for line in lines if line.startswith("Exception occurred in user code")]
    assert len(finished) == 1 and len(hint) == 1 and len(abort) == 1 and len(user_code) == 1, lines
    assert not any(lines[line] for line in [*finished, *hint, *abort, *user_code])  # off the console
    assert lines["another line"]  # the rest prints


def test_ray_datas_lines_of_bad_input_stay_off_the_console_of_the_commands_process():
    """The same lines where a command's own process runs Ray Data (`mmctr predict` reads the test split there):
    hidden unless -v, but a record that carries a traceback (Ray Data's own errors) prints."""
    import logging
    import sys

    from ray.data._internal.logging import HiddenRecordFilter

    from mmctr_ray.ray_env import quiet_ray_data

    quiet_ray_data(verbose=False)
    logger = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
    abort = 'An exception was raised from a task of operator "MapBatches(f)". Dataset execution will now abort.'
    try:
        raise RuntimeError("Ray Data's own error")
    except RuntimeError:
        with_traceback = sys.exc_info()
    seen = []
    keep = logging.Handler()
    keep.emit = seen.append
    logger.addHandler(keep)
    try:
        logger.error(abort)
        logger.error(abort, exc_info=with_traceback)
        logger.error("another line")
    finally:
        logger.removeHandler(keep)
    assert [HiddenRecordFilter().filter(r) for r in seen] == [False, True, True]


def test_an_epochs_report_carries_the_best_epoch_up_to_it():
    """Tune's line for an ended trial named the last epoch beside the best epoch's AUC."""
    from mmctr_ray.report import epoch_report as _reported

    history = [{"epoch": e, "valid_auc": auc, "valid_auc_se": 0.01 * e, "worker_rows": [1, 2]}
               for e, auc in ((1, 0.80), (2, 0.82), (3, 0.81), (4, 0.82))]
    assert _reported(history[2], history) == {"epoch": 3, "valid_auc": 0.81, "valid_auc_se": 0.03,
                                              "best_valid_auc": 0.82, "best_valid_auc_se": 0.02, "best_epoch": 2}
    assert _reported(history[3], history)["best_epoch"] == 2  # the earliest among equals, as the schedule keeps
    assert _reported(history[0], history)["best_epoch"] == 1  # epochs after the row's do not count
    history[0]["valid_auc"] = float("nan")  # no best at NaN: it stayed the best, since nothing compares greater
    assert _reported(history[2], history)["best_epoch"] == 2
    first = _reported(history[0], history)
    assert math.isnan(first["best_valid_auc"]) and first["best_epoch"] is None and first["best_valid_auc_se"] is None


def test_a_log_filter_passes_a_record_whose_arguments_do_not_fit_its_message():
    """A filter that raised on such a record would raise at the logging call in Ray's code (a logger's filters run
    unguarded); it passes it on, and the handler reports the formatting error as logging does."""
    import logging

    from mmctr_ray.ray_env import PG_CLEANED, _Matching

    record = logging.LogRecord("ray.x", logging.WARNING, __file__, 1, "%d items", ("many",), None)
    for action in ("debug", "hide", "drop"):
        assert _Matching(PG_CLEANED, action).filter(record) is True
    with pytest.raises(TypeError):
        record.getMessage()
    with pytest.raises(ValueError, match="unknown log filter action 'quiet'"):
        _Matching(PG_CLEANED, "quiet")


@pytest.mark.slow
def test_the_process_group_of_a_group_with_a_dead_worker_ends_without_an_error(ray_local):
    """Before a restart Ray Train shuts the old group's process group down; the dead worker's call raised its
    ActorDiedError, which Ray Train logged with a traceback ("Graceful shutdown of backend failed") in every
    restart. Now the wait ends there, without waiting for a survivor (whose shutdown may wait on the dead peer);
    a worker's own error still comes through."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from mmctr_ray.torch_backend import end_group

    @ray.remote(num_cpus=0)
    class Worker:
        def shutdown(self, fail: bool = False, stuck: bool = False) -> None:
            if stuck:
                import time

                time.sleep(300)
            if fail:
                raise ValueError("gloo: cannot end")

    dead, stuck = Worker.remote(), Worker.remote()
    ray.get([dead.shutdown.remote(), stuck.shutdown.remote()])
    ray.kill(dead)
    # Ray Train shuts the group down once it knows a worker died; so does this test. Calling the killed actor
    # before Ray knew it dead raced: once in a clean clone the stuck worker's call was done first. ray.kill is
    # asynchronous too: a call made just after it was once served (another clean clone), so the test calls again
    # until one fails as a dead actor's does
    deadline = time.monotonic() + 120
    while True:
        died = dead.shutdown.remote()
        try:
            ray.get(died, timeout=120)
        except RayActorError:
            break
        assert time.monotonic() < deadline, "Ray never told the killed actor dead"
        time.sleep(0.1)
    waiting = stuck.shutdown.remote(stuck=True)
    end_group([waiting, died], timeout=600)
    assert ray.wait([waiting], timeout=0)[1] == [waiting]  # ended without waiting for the stuck one
    ray.kill(stuck)
    end_group([Worker.remote().shutdown.remote()], timeout=60)
    with pytest.raises(RayTaskError, match="gloo: cannot end"):
        end_group([Worker.remote().shutdown.remote(fail=True)], timeout=60)


@pytest.mark.slow
def test_ctrl_c_ends_a_run_with_one_line_that_says_what_is_kept(synth_dir, tmp_path):
    """Ctrl-C in a terminal: SIGINT to the command's process group. Ray Train aborts the run and Ray ends the
    driver's wait with SystemExit(1); before, the command exited 1 without a word. Now: exit 130, one line naming
    the checkpoints RUN keeps and how to continue (`--resume`, which test_resume_continues_from_the_latest_checkpoint
    covers), and no summary.json to make the run look finished."""
    import signal
    import subprocess
    import sys
    import time

    run, log = tmp_path / "run", tmp_path / "log"
    argv = [sys.executable, "-m", "mmctr_ray.cli", "train", "--data", str(synth_dir), "--out", str(run), "--config",
            str(CONFIGS / "tiny.yaml"), "--set", "train.epochs=200",
            "--set", "train.patience=200"]  # far from done when Ctrl-C comes
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        # complete in RUN: files.json says so only with every file at its size (Ray copies the files in parallel)
        deadline = time.time() + 240
        while proc.poll() is None and not epoch_checkpoints(run) and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    lines = [line for line in log.read_text().splitlines() if line.startswith("mmctr train:")]
    assert len(lines) == 1 and re.fullmatch(
        rf"mmctr train: interrupted: {re.escape(str(run))} keeps the checkpoints? of epochs? 1(–\d+)?; continue with "
        rf"`mmctr train --data {re.escape(str(synth_dir))} --out {re.escape(str(run))} --set train.epochs=200 --set "
        r"train.patience=200 --resume`", lines[0]), lines  # the command line without --config, which RUN keeps
    assert "Received SIGINT. Gracefully aborting the training run" in log.read_text()  # said at once, by Ray Train
    # Ray Train's INFO lines (resources asked, the worker group started) only with -v
    assert "Requesting resources" not in log.read_text() and "training worker group" not in log.read_text()
    last = int(re.search(r"epochs? (?:1–)?(\d+);", lines[0]).group(1))
    assert [Path(c).name for c in epoch_checkpoints(run)][-1] == f"checkpoint_epoch_{last:03d}"
    assert not (run / "summary.json").exists()


def _rows_only_a_worker_refuses(synth_dir: Path, data: Path, monkeypatch) -> Path:
    """A copy of the data whose train split has histories of 99 and 101 ids in one row group: the footer's value
    count still adds up (rows × 100), and with the driver's page scan left out (as in a search's trial, or for a
    file rewritten after the checks) a worker meets them; the split's path."""
    from mmctr_ray import preflight

    monkeypatch.setattr(preflight, "scan_part", lambda *args: None)  # the driver's alone: workers are processes
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("item_images"))
    path = Layout(data).split("train")
    table = pq.read_table(path)
    seqs = table.column("item_seq").to_pylist()
    seqs[0], seqs[1] = seqs[0][1:], [0, *seqs[1]]
    i = table.schema.get_field_index("item_seq")
    pq.write_table(table.set_column(i, "item_seq", pa.array(seqs, type=table.schema.field(i).type)), path)
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_bad_rows_a_worker_meets_end_the_run_at_once_as_one_line(ray_local, synth_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    path = _rows_only_a_worker_refuses(synth_dir, data, monkeypatch)
    with pytest.raises(DataError) as err:
        run_training(data, str(tmp_path / "run"), tiny_cfg("train.epochs=1"), max_failures=2)
    message = str(err.value)
    assert message.startswith(f"{path}: column item_seq: ") and "\n" not in message
    # a batch Ray Data read: its rows' place in the file is not known there, and `mmctr validate` names it
    assert "lists of one length expected; a row has 101 values where another of its batch has 99 (run `mmctr " \
        "validate` for the file and row)" in message
    # one attempt, not three: every retry would meet the same row (rank 0 opens one TensorBoard file per attempt)
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_an_overwrite_whose_workers_refuse_the_data_leaves_the_run_it_was_to_replace(plain_run, synth_dir, tmp_path,
                                                                                       monkeypatch):
    """`train --overwrite` deleted RUN before Ray Train started; rows a worker refused then ended the new run at
    once, and the earlier run was gone for a command that trained nothing. It is kept aside until the new run has
    a checkpoint, and put back byte for byte, which the one line says; a run that completes replaces it."""
    path = _rows_only_a_worker_refuses(synth_dir, tmp_path / "data", monkeypatch)
    run = shutil.copytree(plain_run[0], tmp_path / "run")
    before = _files(run)
    with pytest.raises(DataError) as err:
        run_training(tmp_path / "data", str(run), tiny_cfg("train.epochs=1"), overwrite=True)
    assert str(err.value).startswith(f"{path}: column item_seq: lists of one length expected")
    assert str(err.value).endswith(f"; {run} holds again the run --overwrite was to replace (this command kept no "
                                   f"checkpoint)")
    assert _files(run) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".mmctr.lock")) == ["data", "run"]
    monkeypatch.undo()
    summary = run_training(synth_dir, str(run), tiny_cfg("train.epochs=1"), overwrite=True)  # on good data: replaced
    assert summary["epochs"] == 1 and len(epoch_checkpoints(run)) == 1 and (run / "summary.json").is_file()
    assert summary["stop_reason"] == "train.epochs=1 reached"  # why the run ended, beside its best epoch
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".mmctr.lock")) == ["data", "run"]


@pytest.mark.slow
def test_report_writes_curves_and_a_markdown_table(two_worker_run, tmp_path):
    from mmctr_ray.errors import DataError
    from mmctr_ray.report import write_report

    run, summary = two_worker_run
    paths = write_report(run)
    assert paths["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["summary"].read_text()
    assert f"{summary['best_valid_auc']:.4f}" in text and text.count("\n| ") == 1 + 2  # header + 2 epochs
    se = summary["best_valid_auc_se"]  # DeLong's, over the 500 validation rows (test_metrics.py checks the method)
    assert 0 < se < 0.1 and f"**{summary['best_valid_auc']:.4f}** ± {se:.4f}" in text and "over the 500 valid" in text
    assert "Trained: config `tiny`: multi-head target attention (2 heads) over the last 16 clicks" in text
    assert "; item vector item_emb_d128 as shipped (given), scaled to RMS 0.4; batch 256," in text  # item_source.json
    with pytest.raises(DataError, match="metrics.jsonl: missing file"):
        write_report(tmp_path)
    # RUN's config.yaml after a resume that asked another lr and whose driver was killed (kill -9) before its first
    # checkpoint: the best epoch trained with its checkpoint's config, which the report describes
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    lr = load_config(best_checkpoint(run) / "config.yaml").train.lr
    save_config(load_config(copy / "config.yaml", ["train.lr=0.5"]), copy / "config.yaml")
    assert f", adam lr {lr:g}, " in write_report(copy)["summary"].read_text() and lr != 0.5


@pytest.mark.slow
def test_compare_scores_runs_on_the_same_rows_with_the_paired_test(two_worker_run, plain_run, synth_dir, tiny_spec,
                                                                   tmp_path, capsys, split_into_parts, monkeypatch):
    import shutil

    from mmctr_ray.cli import main

    (two, summary), (plain, _) = two_worker_run, plain_run
    out = tmp_path / "compare.json"
    first = plain / "checkpoint_epoch_001"  # a checkpoint folder names itself; a run, its best checkpoint
    args = ["compare", "--data", str(synth_dir), str(two), str(first), "--json", str(out)]
    capsys.readouterr()
    assert main(args) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["split"] == "valid" and result["rows"] == tiny_spec.valid_rows
    ref, other = result["runs"]
    assert ref["checkpoint"] == str(best_checkpoint(two)) and ref["epoch"] == summary["best_epoch"]
    assert ref["auc"] == pytest.approx(summary["best_valid_auc"], abs=1e-6)  # the AUC the run reported
    assert other["epoch"] == 1 and other["auc"] == pytest.approx(_metrics(plain)[0]["valid_auc"], abs=1e-6)
    assert other["diff"] == pytest.approx(other["auc"] - ref["auc"]) and 0 < other["diff_se"] < 0.1
    assert 0 < ref["se"] < 0.05 and ref["diff"] == 0
    assert f"| {two} | {ref['epoch']} | {ref['auc']:.4f} | {ref['se']:.4f} | – | – | – |" in text
    assert f"| {first} | 1 | {other['auc']:.4f} | {other['se']:.4f} | {other['diff']:+.4f} |" in text
    assert f"\n- {two}: config `tiny`: multi-head" in text and f"\n- {first}: config `tiny`: " in text
    assert ref["trained"].endswith("batch 256, adam lr 0.001, dropout 0.2, embedding L2 1e-06")
    # the two describe alike; what tells them apart is in their configs: plain_cfg against two_worker_cfg
    assert ref["config_vs_first"] == {} and other["config_vs_first"] == {
        "train.patience": {"value": 3, "first": 1}, "train.resident": {"value": "auto", "first": "on"},
        "train.shuffle_buffer": {"value": 1000, "first": 0}}
    assert (f"Config keys unlike the first run's (its value in brackets):\n- {first}: train.patience 3 (1), "
            "train.resident auto (on), train.shuffle_buffer 1000 (0)\n") in text
    assert main(args) == 2  # the JSON file is kept
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["compare", "--data", str(synth_dir), str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{tmp_path}: not a run of `mmctr train` (no config.yaml) nor "
                                                    f"one of its checkpoint folders")
    import mmctr_ray.predict

    def scored(*args, **kwargs):
        raise AssertionError("a run was scored before every target was checked")

    with monkeypatch.context() as patch:  # a bad second target is refused before the first is scored
        patch.setattr(mmctr_ray.predict, "load_model", scored)
        assert main(["compare", "--data", str(synth_dir), str(two), str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{tmp_path}: not a run of `mmctr train` (no config.yaml) nor "
                                                    f"one of its checkpoint folders")
    cut = tmp_path / "cut" / "checkpoint_epoch_001"
    shutil.copytree(first, cut)
    (cut / "model.pt").unlink()
    assert main(["compare", "--data", str(synth_dir), str(cut)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{cut}: not a whole checkpoint (model.pt missing)")
    assert main(["compare", "--data", str(synth_dir), two.as_uri(), "--json", str(tmp_path / "uri.json")]) == 0
    assert json.loads((tmp_path / "uri.json").read_text())["runs"][0]["auc"] == pytest.approx(ref["auc"], abs=1e-6)
    parted = shutil.copytree(synth_dir, tmp_path / "parted", ignore=shutil.ignore_patterns("item_images"))
    split_into_parts(parted, "valid", 3)  # the valid split as part files: the same rows, the same AUC
    assert main(["compare", "--data", str(parted), str(two), "--json", str(tmp_path / "parted.json")]) == 0
    parted_run = json.loads((tmp_path / "parted.json").read_text())["runs"][0]
    assert parted_run["auc"] == pytest.approx(ref["auc"], abs=1e-6) and parted_run["se"] == pytest.approx(ref["se"])
    # groups: runs of one config with other seeds, summarised and tested against the first group (here each run's
    # epoch checkpoints stand in for seeds); a run in a group and among the RUNs is scored once
    a, b = epoch_checkpoints(two), epoch_checkpoints(plain)
    assert len(a) >= 2 and len(b) >= 2
    grouped = ["compare", "--data", str(synth_dir), str(a[0]), "--group", "two", *map(str, a), "--group", "plain",
               *map(str, b), "--json", str(tmp_path / "groups.json")]
    assert main(grouped) == 0
    text, result = capsys.readouterr().out, json.loads((tmp_path / "groups.json").read_text())
    assert [r["run"] for r in result["runs"]] == list(map(str, [*a, *b]))
    auc = {r["run"]: r["auc"] for r in result["runs"]}
    first, second = result["groups"]
    assert first["group"] == "two" and first["members"] == list(map(str, a)) and first["runs"] == len(a)
    assert first["mean"] == pytest.approx(np.mean([auc[str(c)] for c in a]))
    assert second["sd"] == pytest.approx(np.std([auc[str(c)] for c in b], ddof=1))
    from scipy.stats import ttest_ind

    welch = ttest_ind([auc[str(c)] for c in b], [auc[str(c)] for c in a], equal_var=False)
    assert second["p"] == pytest.approx(welch.pvalue)
    assert second["diff"] == pytest.approx(second["mean"] - first["mean"])
    assert 0 < second["diff_se_rows"] < 0.05
    assert f"| plain | {len(b)} | {second['mean']:.4f} | {second['sd']:.4f} | {second['diff']:+.4f} |" in text
    assert "Welch's test over the runs' AUCs (training noise, these rows held fixed)" in text
    assert "Every pair" not in text and "pairs" not in result  # --pairs first, the default
    # --pairs all: every pair of the RUNs given (not of the groups' runs, which pair as groups), each what the
    # paired test of those two alone gives, and every pair of groups, each p also adjusted over its table (Holm)
    runs = [str(b[0]), *map(str, a)]
    assert main(["compare", "--data", str(synth_dir), *runs, "--group", "two", *map(str, a), "--group", "plain",
                 *map(str, b), "--pairs", "all", "--json", str(tmp_path / "pairs.json")]) == 0
    text, every = capsys.readouterr().out, json.loads((tmp_path / "pairs.json").read_text())
    assert [(p["minus"], p["run"]) for p in every["pairs"]] == [(x, y) for i, x in enumerate(runs)
                                                               for y in runs[i + 1:]]
    auc = {r["run"]: r["auc"] for r in every["runs"]}
    assert all(p["diff"] == pytest.approx(auc[p["run"]] - auc[p["minus"]]) and p["p_holm"] >= p["p"]
               for p in every["pairs"])
    last = every["pairs"][-1]  # a pair without the first run, against `compare` of those two alone
    assert main(["compare", "--data", str(synth_dir), last["minus"], last["run"], "--json", str(tmp_path / "one.json")
                 ]) == 0
    alone = json.loads((tmp_path / "one.json").read_text())["runs"][1]
    assert (last["diff_se"], last["p"]) == pytest.approx((alone["diff_se"], alone["p"]))
    assert f"Every pair of runs ({len(every['pairs'])}): " in text
    assert f"| {last['run']} | {last['minus']} | {last['diff']:+.4f} | {last['diff_se']:.4f} |" in text
    (group_pair,) = every["group_pairs"]  # one pair of groups: nothing to adjust; the groups table's own figures
    assert (group_pair["group"], group_pair["minus"]) == ("plain", "two") and group_pair["p_holm"] == group_pair["p"]
    assert {k: group_pair[k] for k in ("diff", "diff_se", "p", "diff_se_rows")} == pytest.approx(
        {k: second[k] for k in ("diff", "diff_se", "p", "diff_se_rows")})
    assert f"| plain | two | {second['diff']:+.4f} | {second['diff_se']:.4f} |" in text
    assert main(["compare", "--data", str(synth_dir), "--group", "one", str(a[0])]) == 2
    assert capsys.readouterr().err.strip().endswith("--group one names 1 run; a group is one config trained with "
                                                    "several seeds, 2 or more runs (its spread over seeds is what its "
                                                    "test measures)")


def test_more_workers_than_a_local_ray_can_feed_is_a_one_line_error_before_run_is_written(synth_dir, tmp_path,
                                                                                          monkeypatch):
    """`mmctr train --workers 2` on a 2-core machine: the workers took both CPUs, Ray Data's reads never ran and the
    run waited for good. A private local Ray cannot grow, so the driver refuses such a run once Ray is up, before
    RUN is written; on a cluster it joined (which may grow) it is a warning (the next test)."""
    import ray

    import mmctr_ray.ray_env as ray_env

    check_worker_resources({"CPU": 2.0}, workers=1, cpus_per_worker=1, gpus_per_worker=0)  # the demo's: fits
    with pytest.raises(ConfigError, match=r"^1 worker × 1 CPU and 1 CPU for reading the data need 2 CPUs; this "
                                          r"local Ray has 1: "):  # `--num-cpus 1`
        check_worker_resources({"CPU": 1.0}, workers=1, cpus_per_worker=1, gpus_per_worker=0)
    with pytest.raises(ConfigError, match=r"^2 workers × 1 CPU and 1 CPU for reading the data need 3 CPUs; this "
                                          r"local Ray has 2: lower --workers .* --num-cpus 3 "):
        check_worker_resources({"CPU": 2.0}, workers=2, cpus_per_worker=1, gpus_per_worker=0)
    with pytest.raises(ConfigError, match=r"^2 workers × 1 GPU need 2 GPUs; this local Ray has 1"):
        check_worker_resources({"CPU": 8.0, "GPU": 1.0}, workers=2, cpus_per_worker=1, gpus_per_worker=1)
    check_worker_resources({"CPU": 8.0, "GPU": 2.0}, workers=4, cpus_per_worker=1, gpus_per_worker=0.5)
    with pytest.raises(ConfigError, match=r"^3 workers × 0.6 GPU: Ray places a fraction within one GPU, so 2 fit"):
        check_worker_resources({"CPU": 8.0, "GPU": 2.0}, workers=3, cpus_per_worker=1, gpus_per_worker=0.6)
    started = []
    monkeypatch.setattr(ray_env, "private_local_ray", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="need 3 CPUs; this local Ray has 2"):
        run_training(synth_dir, str(run), tiny_cfg(), workers=2, start_ray=lambda: started.append(1))
    assert started == [1] and not run.exists()  # checked once Ray was up; nothing written
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"not a run of `mmctr train` \(it holds notes.txt\)"):  # RUN is
        # still checked before Ray
        run_training(synth_dir, str(run), tiny_cfg(), workers=2, start_ray=lambda: started.append(2))
    assert started == [1]


def test_a_pool_a_joined_cluster_cannot_hold_now_is_a_warning_that_it_waits_for_nodes(monkeypatch, caplog):
    """On a cluster the command joined (which an autoscaler may grow) the same check warns instead: `train --workers
    3` and `predict --actors 2` on a 2-CPU cluster that cannot grow waited for good, train printing Ray Train's
    startup-timeout tracebacks every minute and predict nothing (helper-141). Not in a Tune trial (an actor)."""
    import types

    import ray

    import mmctr_ray.ray_env as ray_env
    from mmctr_ray.train_driver import check_local_workers

    actor = [None]
    monkeypatch.setattr(ray_env, "private_local_ray", lambda: False)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_actor_id=lambda: actor[0]))
    with caplog.at_level("WARNING", logger="mmctr_ray.ray_env"):
        check_local_workers(1, 1.0, 0.0)  # fits: nothing said
        assert not caplog.records
        check_local_workers(3, 1.0, 0.0)
        ray_env.check_actors(2, 0.0)
        ray_env.check_actors(1, 0.5)
    assert [r.getMessage() for r in caplog.records] == [
        "3 workers × 1 CPU and 1 CPU for reading the data need 4 CPUs; the cluster has 2 now: they wait for the "
        "autoscaler to add nodes (on a cluster that cannot grow, for good: lower --workers (or --cpus-per-worker))",
        "2 actors × 1 CPU and 1 CPU for reading the data need 3 CPUs; the cluster has 2 now: they wait for the "
        "autoscaler to add nodes (on a cluster that cannot grow, for good: lower --actors)",
        "1 actor × 0.5 GPU need 0.5 GPUs; the cluster has 0 now: it waits for the autoscaler to add nodes (on a "
        "cluster that cannot grow, for good: lower --actors or --gpus-per-actor)"]
    caplog.clear()
    actor[0] = "a1b2"  # a search's trial: its search checked what fits
    with caplog.at_level("WARNING", logger="mmctr_ray.ray_env"):
        check_local_workers(3, 1.0, 0.0)
    assert not caplog.records


@pytest.mark.slow
def test_scoring_actors_a_local_ray_cannot_feed_are_a_one_line_error(plain_run, synth_dir, tmp_path, monkeypatch):
    """`mmctr predict --actors 2` on a 2-core machine waited for good (two actors, no CPU for the reads)."""
    import ray

    import mmctr_ray.ray_env as ray_env

    run, _ = plain_run
    monkeypatch.setattr(ray_env, "private_local_ray", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"^2 actors × 1 CPU and 1 CPU for reading the data need 3 CPUs; this local "
                                          r"Ray has 2: lower --actors, or give it 3 logical CPUs with --num-cpus 3"):
        run_predict(run, synth_dir, tmp_path / "sub.zip", actors=2)
    assert not (tmp_path / "sub.zip").exists()


def test_an_unsupported_storage_scheme_is_a_one_line_error(synth_dir):
    with pytest.raises(ConfigError, match="^foo://bucket/run: unsupported storage scheme foo://"):
        run_training(synth_dir, "foo://bucket/run", tiny_cfg())


@pytest.mark.slow
def test_a_run_under_a_storage_uri_trains_resumes_predicts_and_reports(ray_local, synth_dir, tiny_spec, tmp_path):
    from mmctr_ray.cli import main

    store = tmp_path / "store"  # file:// resolves to pyarrow's LocalFileSystem: every access goes through it
    uri = store.as_uri() + "/runs/r1"
    run = store / "runs" / "r1"
    train = ["train", "--data", str(synth_dir), "--out", uri]
    assert main([*train, "--config", str(CONFIGS / "tiny.yaml"), "--set", "train.batch_size=256",
                 "--set", "train.shuffle_buffer=0", "--set", "train.epochs=2"]) == 0
    first = _metrics(run)
    assert main([*train, "--resume", "--set", "train.epochs=3", "--set", "train.patience=5"]) == 0
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[:2] == first
    assert [p.name for p in epoch_checkpoints(run)] == [f"checkpoint_epoch_00{e}" for e in (1, 2, 3)]
    assert epoch_checkpoints(uri)[-1] == f"{uri}/checkpoint_epoch_003"
    assert load_config(run / "config.yaml").train.epochs == 3 and (run / "feature_map.json").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run_dir"] == uri and summary["epochs"] == 3
    assert summary["best_checkpoint"].startswith(f"{uri}/checkpoint_epoch_00")
    assert main(["predict", "--run", uri, "--data", str(synth_dir), "--out", str(tmp_path / "sub.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        assert len(zf.read("prediction.csv").decode().splitlines()) == 1 + tiny_spec.test_rows
    assert main(["report", uri]) == 0
    assert (run / "report" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "report" / "summary.md").read_text().count("\n| ") == 1 + 3
    assert main(["report", uri + "-missing"]) == 2


def test_a_resume_from_remote_storage_is_named_by_its_uri_not_its_temporary_copy():
    """A restarted worker loads Ray Train's checkpoint through ``as_directory``, a temporary copy for remote storage:
    the log said "resumed from /tmp/tmpXXXX" for a run in s3://."""
    import fsspec
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from mmctr_ray.training import _checkpoint_name

    remote = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    assert _checkpoint_name(Checkpoint("bucket/run/checkpoint_epoch_002", remote)) == \
        "memory://bucket/run/checkpoint_epoch_002"
    s3 = pafs.S3FileSystem(anonymous=True, region="us-east-1")  # built without a request
    assert _checkpoint_name(Checkpoint("b/run/checkpoint_epoch_002", s3)) == "s3://b/run/checkpoint_epoch_002"
    assert _checkpoint_name(Checkpoint("/runs/r/checkpoint_epoch_002")) == "/runs/r/checkpoint_epoch_002"
    assert _checkpoint_name("s3://b/run/checkpoint_epoch_001") == "s3://b/run/checkpoint_epoch_001"  # RUN's own
    gcs = pafs.GcsFileSystem(anonymous=True)
    assert _checkpoint_name(Checkpoint("b/run/checkpoint_epoch_002", gcs)) == "gs://b/run/checkpoint_epoch_002"
    from fsspec.implementations.memory import MemoryFileSystem

    class Azure(MemoryFileSystem):  # a protocol of several names, as adlfs's: pyarrow's type_name is a tuple's repr
        protocol = ("abfs", "az")

    azure = pafs.PyFileSystem(pafs.FSSpecHandler(Azure()))
    assert _checkpoint_name(Checkpoint("c/run/checkpoint_epoch_002", azure)) == "abfs://c/run/checkpoint_epoch_002"


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(synth_dir, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not a run of `mmctr train`"):
        run_training(synth_dir, str(tmp_path), tiny_cfg(), overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def _earlier_run(run: Path) -> dict[str, bytes]:
    """A run's files as `mmctr train` leaves them (a config, metrics, one checkpoint); what they hold."""
    (run / "checkpoint_epoch_001").mkdir(parents=True)
    (run / "checkpoint_epoch_001" / "model.pt").write_bytes(b"weights")
    (run / "config.yaml").write_text("name: earlier\n")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return _files(run)


def test_an_overwrite_keeps_the_run_it_replaces_beside_run_until_the_new_run_ends(tmp_path):
    from mmctr_ray.train_driver import _end_replacing, _prepare_run_dir

    run = tmp_path / "run"
    before = _earlier_run(run)
    aside = _prepare_run_dir(run, tiny_cfg(), resume=False, overwrite=True)
    assert aside == tmp_path / ".run.replaced" and _files(aside) == before
    assert [p.name for p in run.iterdir()] == ["config.yaml"] and "earlier" not in (run / "config.yaml").read_text()
    _end_replacing(run, aside, None)  # it completed
    assert not aside.exists() and (run / "config.yaml").is_file()
    run2 = tmp_path / "trial"
    _earlier_run(run2)  # a search's trial folder: deleted at once, as before
    assert _prepare_run_dir(run2, tiny_cfg(), resume=False, overwrite=True, keep_replaced=False) is None
    assert [p.name for p in run2.iterdir()] == ["config.yaml"] and not (tmp_path / ".trial.replaced").exists()


def test_an_overwrite_that_kept_no_checkpoint_puts_the_run_it_was_to_replace_back(tmp_path):
    """Ended by bad input a worker met: RUN holds again what it held, the attempt's own files gone, and the error's
    line says so. Ended by a signal before training (a Ctrl-C's KeyboardInterrupt, SIGTERM's SystemExit), the run
    stays aside and the command's line names it (tests/test_cli.py)."""
    from mmctr_ray.locking import begun
    from mmctr_ray.train_driver import _end_replacing, _prepare_run_dir

    run = tmp_path / "run"
    before = _earlier_run(run)
    for signalled in (KeyboardInterrupt(), SystemExit(15)):
        aside = _prepare_run_dir(run, tiny_cfg(), resume=False, overwrite=True)
        _end_replacing(run, aside, signalled)
        assert _files(aside) == before and [p.name for p in run.iterdir()] == ["config.yaml"]
    (run / "tensorboard").mkdir()  # the next --overwrite: the attempt before kept no checkpoint, so the run it
    (run / "tensorboard" / "events").write_bytes(b"attempt")  # set aside is still the one to keep
    aside = _prepare_run_dir(run, tiny_cfg(), resume=False, overwrite=True)
    assert _files(aside) == before and [p.name for p in run.iterdir()] == ["config.yaml"]
    (run / "tensorboard").mkdir()
    assert begun(run)
    error = DataError("d/train.parquet: column item_seq: ...")
    _end_replacing(run, aside, error)
    assert _files(run) == before and not aside.exists() and not begun(run)  # a signal's line: not this command's
    assert str(error) == (f"d/train.parquet: column item_seq: ...; {run} holds again the run --overwrite was to "
                          f"replace (this command kept no checkpoint)")


def test_an_overwrite_replaces_the_run_once_the_new_one_has_a_checkpoint_and_keeps_it_aside_on_an_interrupt(
        tmp_path, monkeypatch):
    """Interrupted during training before its first checkpoint, the workers may still be copying one into RUN: the
    earlier run stays aside, and the interrupt's line says where; a --resume of the new run keeps it there until the
    new run has a checkpoint. Once it has one (failed after, or resumed), the earlier one is deleted, the error left
    as it was."""
    from mmctr_ray import train_driver
    from mmctr_ray.errors import Interrupted

    run = tmp_path / "run"
    _earlier_run(run)
    aside = train_driver._prepare_run_dir(run, tiny_cfg(), resume=False, overwrite=True)
    interrupted = Interrupted(f"{run} holds no checkpoint yet", 15)
    train_driver._end_replacing(run, aside, interrupted)
    assert str(interrupted) == f"{run} holds no checkpoint yet; the run --overwrite was to replace is kept in {aside}"
    assert interrupted.signum == 15 and (aside / "config.yaml").read_text() == "name: earlier\n"
    assert [p.name for p in run.iterdir()] == ["config.yaml"]
    # the --resume the interrupt's line gives: the earlier run stays aside until the resumed run keeps a checkpoint
    assert train_driver._prepare_run_dir(run, tiny_cfg(), resume=True, overwrite=False) == aside
    failed = DataError("valid.parquet: ...")
    train_driver._end_replacing(run, aside, failed, put_back=False)
    assert str(failed) == f"valid.parquet: ...; the run --overwrite was to replace is kept in {aside}"
    assert (aside / "config.yaml").read_text() == "name: earlier\n"
    assert [p.name for p in run.iterdir()] == ["config.yaml"]
    monkeypatch.setattr(train_driver, "latest_checkpoint", lambda r: run / "checkpoint_epoch_001")
    for put_back in (False, True):
        failed = DataError("valid.parquet: ...")
        train_driver._end_replacing(run, aside, failed, put_back=put_back)
        assert not aside.exists() and str(failed) == "valid.parquet: ..." and (run / "config.yaml").is_file()
        aside.mkdir()


def test_a_run_left_aside_is_deleted_with_a_warning_once_the_run_in_run_has_a_checkpoint(tmp_path, caplog,
                                                                                          monkeypatch):
    """A killed --overwrite, then resumed to a checkpoint elsewhere (or by hand) left its predecessor beside RUN: the
    next --overwrite of RUN keeps RUN's run aside, deletes the older one, and says so."""
    from mmctr_ray import train_driver

    run = tmp_path / "run"
    (tmp_path / ".run.replaced").mkdir()
    (tmp_path / ".run.replaced" / "config.yaml").write_text("name: oldest\n")
    before = _earlier_run(run)
    monkeypatch.setattr(train_driver, "latest_checkpoint", lambda r: run / "checkpoint_epoch_001")
    aside = train_driver._prepare_run_dir(run, tiny_cfg(), resume=False, overwrite=True)
    assert _files(aside) == before
    assert (f"{aside}: deleting the run an earlier `--overwrite` of {run} kept there (the run that replaced it has "
            f"a checkpoint)") in caplog.text


def test_an_overwrite_where_the_run_cannot_be_kept_aside_deletes_it_with_a_warning(tmp_path, caplog, monkeypatch):
    """A RUN that cannot be renamed beside itself (a mount point; a folder whose parent this user cannot write):
    --overwrite works as it did before, with a warning, not an OSError traceback."""
    from mmctr_ray import storage
    from mmctr_ray.train_driver import _prepare_run_dir

    def refused(source, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(storage, "move_dir", refused)
    monkeypatch.setattr(storage, "remove_dir", refused)  # RUN itself cannot go either: its files are deleted
    run = tmp_path / "run"
    _earlier_run(run)
    assert _prepare_run_dir(run, tiny_cfg(), resume=False, overwrite=True) is None
    assert [p.name for p in run.iterdir()] == ["config.yaml"] and "earlier" not in (run / "config.yaml").read_text()
    assert f"{run}: cannot keep the run it holds in {tmp_path / '.run.replaced'} ([Errno 13] Permission denied)" \
        in caplog.text


def test_a_plain_train_leaves_a_run_set_aside_alone_and_a_failure_after_the_move_puts_it_back(tmp_path,
                                                                                                monkeypatch):
    """Only an --overwrite (or a --resume of one) takes the run kept in .NAME.replaced as the one it replaces: a
    plain train into an emptied RUN deleted it once it completed. RUN's config.yaml not written after the move (a
    full disk, a storage error) left the earlier run hidden, named by nothing."""
    from mmctr_ray import train_driver
    from mmctr_ray.errors import StorageError

    run = tmp_path / "run"
    aside = tmp_path / ".run.replaced"
    aside.mkdir()
    (aside / "config.yaml").write_text("name: earlier\n")
    assert train_driver._prepare_run_dir(run, tiny_cfg(), resume=False, overwrite=False) is None
    assert (aside / "config.yaml").read_text() == "name: earlier\n"
    shutil.rmtree(run)
    shutil.rmtree(aside)
    before = _earlier_run(run)

    def full(cfg, path):
        raise StorageError(f"{path}: cannot access this storage (disk full)")

    monkeypatch.setattr(train_driver, "save_config", full)
    with pytest.raises(StorageError) as err:
        train_driver._prepare_run_dir(run, tiny_cfg(), resume=False, overwrite=True)
    assert str(err.value) == (f"{run / 'config.yaml'}: cannot access this storage (disk full); {run} holds again "
                              f"the run --overwrite was to replace (this command kept no checkpoint)")
    assert _files(run) == before and not aside.exists()


def test_an_object_store_run_whose_copy_fails_is_left_as_it_was(tmp_path, monkeypatch):
    """On an object store the set-aside is a copy: one that failed (a throttled request) was taken for a RUN that
    cannot be renamed, and RUN was deleted, the partial copy left unnamed."""
    from mmctr_ray import storage
    from mmctr_ray.errors import StorageError
    from mmctr_ray.train_driver import _prepare_run_dir

    root = f"memory://bucket/{tmp_path.name}"
    run = f"{root}/run"
    storage.write_text(f"{run}/config.yaml", "name: earlier\n")
    storage.write_text(f"{run}/checkpoint_epoch_001/model.pt", "weights")

    def cut_short(source, target):
        storage.write_text(f"{target}/config.yaml", "name: earlier\n")
        raise StorageError(f"{source}: cannot access this storage (SlowDown)")

    monkeypatch.setattr(storage, "copy_dir", cut_short)
    with pytest.raises(StorageError, match="SlowDown"):
        _prepare_run_dir(run, tiny_cfg(), resume=False, overwrite=True)
    assert storage.read_text(f"{run}/config.yaml") == "name: earlier\n"
    assert storage.read_text(f"{run}/checkpoint_epoch_001/model.pt") == "weights"
    assert storage.listdir(root) == ["run"]  # no partial copy
    storage.remove_dir(root)


def test_a_uri_run_is_never_overwritten_silently_either(synth_dir, tmp_path):
    uri = tmp_path.as_uri()
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match=f"^{uri}: not a run of `mmctr train` \\(it holds precious.txt\\)"):
        run_training(synth_dir, uri, tiny_cfg(), overwrite=True)
    (tmp_path / "config.yaml").write_text("name: earlier\n")
    with pytest.raises(OutputExistsError, match=f"^{uri}: already holds a run; pass --resume"):
        run_training(synth_dir, uri, tiny_cfg())
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match=f"^{uri}/none: nothing to resume"):
        resume_config(f"{uri}/none")


@pytest.mark.slow
def test_a_diverged_run_ends_at_once_with_one_line_and_keeps_its_earlier_checkpoints(plain_run, synth_dir,
                                                                                       tmp_path, capsys):
    """A non-finite loss ends every worker together (not three attempts from the last checkpoint, each
    diverging again, then scikit-learn's "Input contains NaN" from a worker); no summary is written, the
    earlier epochs' checkpoints stay for a resume at a lower learning rate, which clears the verdict."""
    import shutil

    from mmctr_ray.cli import main

    run = tmp_path / "run"
    shutil.copytree(plain_run[0], run)  # a finished run of 2 epochs
    done = len(_metrics(run))
    assert done == 2
    train = ["train", "--data", str(synth_dir), "--out", str(run)]
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main([*train, "--resume", "--set", f"train.epochs={done + 1}", "--set", "train.lr=1e6",
                 "--set", "train.grad_clip=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"mmctr train: error: {run}: training diverged: train loss nan in epoch {done + 1} "
                   f"(lr 1e+06); the checkpoints of epochs 1-{done} are kept: lower train.lr or set train.grad_clip "
                   f"(`mmctr train --data {synth_dir} --out {run} --resume --set train.lr=...` continues from the "
                   f"last)"), err
    assert [r["epoch"] for r in _metrics(run)] == list(range(1, done + 1)) and not (run / "summary.json").exists()
    assert [p.name for p in epoch_checkpoints(run)] == [f"checkpoint_epoch_00{e}" for e in range(1, done + 1)]
    # the attempt kept no epoch: RUN's config.yaml is the latest checkpoint's again, so a resume that sets only
    # train.lr does not take lr 1e6's train.grad_clip=0 and train.epochs with it
    assert (run / "config.yaml").read_text() == before
    from mmctr_ray.train_driver import _prepare_run_dir, resume_config

    (run / "summary.json").write_text("{}")  # as an earlier attempt would have left it
    _prepare_run_dir(str(run), resume_config(str(run), ["train.lr=1e-3"]), resume=True, overwrite=False)
    assert not (run / "diverged.txt").exists() and not (run / "summary.json").exists()  # the resume decides anew


def test_a_run_must_begin_by_its_start_by_unless_it_began_in_time_before_a_restart(tmp_path):
    """Rank 0's decision as a run of a search's trial starts from no checkpoint (``mmctr tune --time-budget-s``)."""
    from mmctr_ray.errors import NotStarted
    from mmctr_ray.training import BEGAN, _late_start

    run = str(tmp_path)
    assert _late_start(run, time.time() + 60) is None and (tmp_path / BEGAN).is_file()  # in time: it trains
    assert _late_start(run, time.time() - 60) is None  # a restart after a worker died, past the deadline: trains on
    assert not (tmp_path / NotStarted.FILE).exists()
    (tmp_path / BEGAN).unlink()
    why = _late_start(run, time.time() - 60)
    assert re.fullmatch(r"not started: its workers were up 6[01] s after the search's time budget ended \(at "
                        r"\d\d:\d\d:\d\d\), and no trial starts after it", why), why
    assert (tmp_path / NotStarted.FILE).read_text() == why + "\n" and not (tmp_path / BEGAN).exists()


@pytest.mark.slow
def test_a_search_whose_trials_workers_all_came_after_its_budget_ends_saying_so(ray_local, synth_dir, tmp_path,
                                                                                 monkeypatch, caplog, capsys):
    """`mmctr tune --time-budget-s` through Tune's own loop, with ASHA (here, on this module's Ray): a trial drawn
    in time whose workers were up after the budget (the searcher draws past it) ends at their start without a
    result; with 2 workers rank 0 decides for both (they may read the clock on either side of the deadline). Tune
    makes the last result of such a trial itself, without the metric, and its check of results refused it: the
    search ended in a ValueError."""
    import logging

    import optuna

    import mmctr_ray.tuning

    drawing = mmctr_ray.tuning._searcher

    def drawn_before_the_deadline():
        class DrawnInTime(drawing()):
            def suggest(self, trial_id):
                deadline, self.deadline = self.deadline, None
                try:
                    return super().suggest(trial_id)
                finally:
                    self.deadline = deadline

        return DrawnInTime

    monkeypatch.setattr(mmctr_ray.tuning, "_searcher", drawn_before_the_deadline)
    with caplog.at_level(logging.INFO, logger="mmctr_ray.tuning"), pytest.raises(
            ConfigError, match=r"the time budget ran out before the first trial started \(Ray's start, the reading "
                               r"of the splits and the wait for the trials' workers count\)"):
        mmctr_ray.tuning.run_tuning(synth_dir, tmp_path / "tune", CONFIGS / "search_tiny.yaml", num_samples=1,
                                    workers=2, time_budget_s=1.0, started=time.time() - 60)
    trial, = (p for p in (tmp_path / "tune" / "trials").iterdir() if p.is_dir())
    assert (trial / "not_started.txt").read_text().startswith("not started: its workers were up ")
    assert not epoch_checkpoints(trial) and not (trial / "metrics.jsonl").exists()
    assert not (trial / "began.txt").exists() and not (trial / "summary.json").exists()
    assert re.search(rf"trial {trial.name} \([^)]+\) not started: its workers were up after the time budget; no result "
                     rf"yet", caplog.text), caplog.text  # (the item vectors it drew in brackets)
    study = optuna.load_study(study_name="mmctr", storage=f"sqlite:///{tmp_path}/tune/optuna.db")
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert study.trials[0].user_attrs["not_started"] == (trial / "not_started.txt").read_text().strip()
    # Tune's own reporter printed "Trial run_trial_<id> completed. Last result: " for it at verbose=0 (helper-138)
    assert "Last result" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_resume_continues_with_its_latest_checkpoints_config_whatever_an_attempt_left(plain_run, tmp_path,
                                                                                          caplog):
    """An attempt killed (kill -9) before it kept an epoch leaves its own train.* in RUN's config.yaml: the next
    --resume takes the latest checkpoint's config and only its own --set. After a failure that ends the driver's
    wait, RUN's config.yaml is put back too, unless the attempt kept an epoch."""
    import shutil

    from mmctr_ray.train_driver import _put_back_config, resume_config

    run = tmp_path / "run"
    shutil.copytree(plain_run[0], run)
    kept = (run / "config.yaml").read_text()
    lr = load_config(run / "config.yaml").train.lr
    save_config(load_config(run / "config.yaml", ["train.lr=0.5", "train.grad_clip=0"]), run / "config.yaml")
    cfg = resume_config(str(run), ["train.grad_clip=3"])
    assert (cfg.train.lr, cfg.train.grad_clip) == (lr, 3) and lr != 0.5
    latest = epoch_checkpoints(run)[-1]
    _put_back_config(run, latest, kept)
    assert (run / "config.yaml").read_text() == kept
    attempt = (run / "config.yaml").read_text().replace(f"lr: {lr}", "lr: 0.5")
    (run / "config.yaml").write_text(attempt)
    _put_back_config(run, epoch_checkpoints(run)[-2], kept)  # the attempt kept an epoch: its config stays
    assert (run / "config.yaml").read_text() == attempt
    (tmp_path / "a-file").write_text("")
    with caplog.at_level("WARNING", logger="mmctr_ray.train_driver"):
        _put_back_config(tmp_path / "a-file" / "run", None, kept)  # never raises over the attempt's own error
    assert "a-file/run: could not put its config.yaml back" in caplog.text
    for checkpoint in epoch_checkpoints(run):  # its 2 epochs
        shutil.rmtree(checkpoint)
    assert resume_config(str(run)).train.lr == 0.5  # no checkpoint: RUN's own


def test_large_unscaled_vectors_into_cross_or_bilinear_modules_are_warned_about(caplog):
    vectors = np.zeros((101, 8), np.float32)
    vectors[1:] = 1.7  # the RMS of a small v4 table of the tiny search
    with caplog.at_level("WARNING", logger="mmctr_ray.train_driver"):
        warn_unscaled_vectors(tiny_cfg("model.crossnet=v1", "model.bilinear=off", "model.item_vector_rms=0"), vectors)
        assert "item vectors of RMS 1.70 (given) go unscaled into CrossNet, which raise" in caplog.text
        caplog.clear()
        warn_unscaled_vectors(tiny_cfg("model.crossnet=v1", "model.item_vector_rms=0.4"), vectors)
        warn_unscaled_vectors(tiny_cfg("model.crossnet=off", "model.bilinear=off", "model.item_vector_rms=0"), vectors)
        shipped_size = vectors * 0.3
        warn_unscaled_vectors(tiny_cfg("model.crossnet=off", "model.bilinear=field_all", "model.item_vector_rms=0"),
                              shipped_size)
        assert caplog.text == ""


def test_a_fusion_section_the_item_vectors_do_not_match_is_warned_about_and_runs_say_what_they_train(caplog,
                                                                                                   synth_dir):
    """`mmctr train --config configs/paper.yaml` without --fusion trained on item_emb_d128 while its config said v4,
    without a word; the run's config, report and `mmctr compare` then read as a v4 run."""
    from mmctr_ray.report import describe_run
    from mmctr_ray.train_driver import warn_fusion_mismatch

    given = {"item_vector": "given", "file": "D/item_info.parquet", "column": "item_emb_d128", "dim": 128}
    v3 = {"item_vector": "fused", "file": "/t/v3.parquet", "column": "item_emb", "dim": 16,
          "fusion": {"strategy": "v3", "dims": 16, "text_dim": 64, "image_dim": 64, "source": "D/item_feature.parquet"}}
    with caplog.at_level("WARNING", logger="mmctr_ray.train_driver"):
        warn_fusion_mismatch(tiny_cfg(), given)  # tiny.yaml, like paper.yaml, says v4 and item_vector: given
        assert ("fusion.strategy is v4 but data.item_vector is 'given': this run trains on item_info's item_emb_d128 "
                "as shipped, not on v4 vectors; for those, write the table with `mmctr fuse --data DATA --strategy v4 "
                "--text-dim 32 --image-dim 32 --out FILE` and train with --fusion FILE") in caplog.text
        caplog.clear()
        from mmctr_ray.train_driver import check_inputs

        check_inputs(synth_dir, tiny_cfg(), resume=True)  # --resume takes no --fusion: its start warned already
        assert "fusion.strategy is v4" not in caplog.text
        check_inputs(synth_dir, tiny_cfg())
        assert "fusion.strategy is v4 but data.item_vector is 'given'" in caplog.text
        caplog.clear()
        warn_fusion_mismatch(tiny_cfg(), v3)
        assert ("/t/v3.parquet holds v3 16 vectors (its .fusion.json) but the config's fusion section says v4 32+32: "
                "the run trains on the table") in caplog.text
        caplog.clear()
        warn_fusion_mismatch(tiny_cfg("fusion.strategy=v3", "fusion.dims=32"), v3)  # another width
        assert "holds v3 16 vectors (its .fusion.json) but the config's fusion section says v3 32" in caplog.text
        caplog.clear()
        warn_fusion_mismatch(load_config(CONFIGS / "baseline.yaml"), given)
        warn_fusion_mismatch(tiny_cfg("fusion.strategy=v3", "fusion.dims=16"), v3)  # what --fusion sets
        warn_fusion_mismatch(tiny_cfg(), {**v3, "fusion": None})  # a table of the user's own: nothing to compare
        bare = {**v3, "fusion": {"strategy": "v4"}}  # a .fusion.json that records no width: only the strategy counts
        warn_fusion_mismatch(tiny_cfg(), bare)
        assert caplog.text == ""

    assert describe_run(load_config(CONFIGS / "baseline.yaml"), given) == (
        "config `baseline`: DIN attention [512, 256] over the last 64 clicks, DNN [1024, 512, 256]; embeddings of 64 "
        "(item id, tags); item vector item_emb_d128 as shipped (given); batch 8192, adam lr 0.001, dropout 0.1, "
        "embedding L2 1e-06")
    v4 = {**v3, "file": "/t/item_emb.parquet",
          "fusion": {"strategy": "v4", "text_dim": 64, "image_dim": 64, "source": "/d/item_feature.parquet"}}
    assert describe_run(load_config(CONFIGS / "paper.yaml"), v4).startswith(
        "config `paper`: multi-head target attention (4 heads) over the last 64 clicks, SENet (ratio 3), bilinear "
        "interaction (field_interaction), CrossNet v2 (3 layers), DNN [1024, 512, 256]; embeddings of 64 (item id, "
        "tags); item vector v4 = PCA(text) 64 ‖ PCA(image) 64 of item_feature.parquet (item_emb.parquet), scaled to "
        "RMS 0.4; batch ")
    assert "; item vector v4 = PCA(text) ‖ PCA(image) of ? (v3.parquet), scaled" in describe_run(tiny_cfg(), bare)
    shipped = {**v3, "fusion": {"strategy": "given", "column": "item_emb_d128", "source": "D/item_info.parquet"}}
    assert "; item vector given = item_emb_d128 of item_info.parquet (v3.parquet), scaled" in describe_run(tiny_cfg(),
                                                                                                           shipped)
    ablation = describe_run(tiny_cfg("model.use_history=false", "model.use_user_id=true"), None)
    assert ablation.startswith("config `tiny`: no history (model.use_history=false), SENet") and "(item id, tags, " \
        "user id)" in ablation and "item vector item_emb_d128 as shipped (given)" in ablation  # from the config
    assert "CrossNet" not in describe_run(tiny_cfg("model.cross_layers=0"), None)  # no CrossNet is built
    assert "CrossNet v1 (1 layer), DNN" in describe_run(tiny_cfg("model.crossnet=v1", "model.cross_layers=1"), None)


def test_a_resume_with_nothing_to_train_says_so_before_ray_starts(tmp_path, monkeypatch):
    """`mmctr train --resume` of a run that had trained all its epochs, or stopped early, started Ray and Ray Train
    (~16 s on 2 CPUs), trained nothing and said nothing of it."""
    import mmctr_ray.train_driver as driver

    last = tmp_path / "checkpoint_epoch_004"
    last.mkdir()
    monkeypatch.setattr(driver, "latest_checkpoint", lambda run: last)
    for epoch, bad, sets, why in [
            (4, 0, ["train.epochs=4"], "it has trained 4 epochs, and train.epochs=4; pass --set train.epochs=N with "
                                       "N above 4 to train more"),
            (1, 0, ["train.epochs=1"], "it has trained 1 epoch, and train.epochs=1; pass --set train.epochs=N with "
                                       "N above 1 to train more"),
            (4, 2, ["train.epochs=9", "train.patience=2"], "after epoch 4 it has had 2 epochs without a better valid "
             "AUC, and train.patience=2 (early stop); pass a larger --set train.patience=N to train more"),
            (4, 2, ["train.epochs=9", "train.patience=3"], None),
            (4, 0, ["train.epochs=5"], None)]:
        (last / "state.json").write_text(json.dumps({"epoch": epoch, "lr": 1e-3, "best_auc": 0.7, "best_epoch": 1,
                                                      "bad_epochs": bad, "history": []}))
        assert driver._nothing_to_train(tmp_path, tiny_cfg(*sets)) == why
    monkeypatch.setattr(driver, "latest_checkpoint", lambda run: None)
    assert driver._nothing_to_train(tmp_path, tiny_cfg()) is None  # no checkpoint yet: train from the start


@pytest.mark.slow
def test_resuming_a_run_that_has_trained_its_epochs_starts_no_ray(two_worker_run, synth_dir, tmp_path, caplog):
    import shutil

    from mmctr_ray.errors import ConfigError

    run, summary = two_worker_run
    moved = shutil.copytree(run, tmp_path / "moved")  # a copy: the fixture's run stays as other tests read it
    (moved / "summary.json").unlink()  # e.g. a run ended by Ctrl-C after its last epoch

    def no_ray():
        raise AssertionError("Ray started for a run with nothing to train")

    with caplog.at_level("WARNING", logger="mmctr_ray.train_driver"):
        again = run_training(synth_dir, str(moved), two_worker_cfg(), resume=True, start_ray=no_ray)
    assert f"{moved}: nothing to train: it has trained 2 epochs, and train.epochs=2" in caplog.text
    assert again == json.loads((moved / "summary.json").read_text())  # a summary of RUN where it is now
    assert again["best_checkpoint"] == str(moved / Path(summary["best_checkpoint"]).name)
    assert again["best_valid_auc"] == summary["best_valid_auc"] and again["epochs"] == 2
    # this command trained nothing; the epochs' seconds are every attempt's (it kept the last summary's wall time,
    # which was the last attempt's alone where that was a --resume)
    assert again["wall_seconds"] == 0.0 and again["epoch_seconds"] == summary["epoch_seconds"] > 0
    assert summary["epoch_seconds"] == pytest.approx(sum(
        json.loads(line)["epoch_seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()))
    saved = (moved / "config.yaml").read_text()
    run_training(synth_dir, str(moved), tiny_cfg("train.epochs=1", "train.resident=on", "train.deterministic=true",
                                                "model.dropout=0.2"), resume=True, start_ray=no_ray)
    assert (moved / "config.yaml").read_text() == saved  # still the config it trained 2 epochs with
    assert saved == (epoch_checkpoints(moved)[-1] / "config.yaml").read_text()
    save_config(load_config(moved / "config.yaml", ["train.epochs=8"]), moved / "config.yaml")  # as a killed
    run_training(synth_dir, str(moved), two_worker_cfg(), resume=True, start_ray=no_ray)  # `--set train.epochs=8`
    assert (moved / "config.yaml").read_text() == saved  # the summary's run is the checkpoint's, not that attempt's
    other = shutil.copytree(synth_dir, tmp_path / "other", ignore=shutil.ignore_patterns("item_images"))
    info = pq.read_table(other / "MicroLens_1M_x1" / "item_info.parquet")  # one more item: other vocabularies
    extra = info.slice(info.num_rows - 1).set_column(0, "item_id", pa.array([info.num_rows], pa.int64()))
    pq.write_table(pa.concat_tables([info, extra]), other / "MicroLens_1M_x1" / "item_info.parquet")
    with pytest.raises(DataError, match=r"item_info.parquet: its items \(item_tags, item_emb_d128\) are not those "):
        run_training(other, str(moved), two_worker_cfg(), resume=True, start_ray=no_ray)  # as any resume
    users = shutil.copytree(synth_dir, tmp_path / "users", ignore=shutil.ignore_patterns("item_images"))
    test = users / "MicroLens_1M_x1" / "test.parquet"  # the same items, one more user: another user vocabulary
    table = pq.read_table(test)
    ids = table.column("user_id").to_numpy().copy()
    ids[0] = ids.max() + 1000
    pq.write_table(table.set_column(table.schema.get_field_index("user_id"), "user_id",
                                    pa.array(ids, table.schema.field("user_id").type)), test)
    with pytest.raises(ConfigError, match="num_users=.* resume with the data the run started on"):
        run_training(users, str(moved), two_worker_cfg(), resume=True, start_ray=no_ray)


def test_each_rank_and_epoch_draws_its_own_dropout_masks_from_the_same_initial_weights():
    """As a worker starts each epoch (begin_epoch): a mutation that seeded every epoch as epoch 1 passed the
    deterministic-resume tests, whose two runs repeated the same wrong masks."""
    from mmctr_ray.checkpoint import TrainState
    from mmctr_ray.layers.dropout import Dropout
    from mmctr_ray.training import begin_epoch, seed_epoch

    def masks(rank, epoch, drawn_before=0):
        torch.manual_seed(7)
        layer = torch.nn.Linear(8, 8)  # the model, built before the epoch's seeding
        optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
        torch.rand(drawn_before)  # what earlier epochs drew, in a run that was never stopped
        assert begin_epoch(optimizer, TrainState(epoch=epoch - 1, lr=1e-3), 7, rank) == epoch
        return layer.weight.detach().clone(), Dropout(0.5).train()(torch.ones(64))  # dropout: torch's generator

    (w0, m0), (w1, m1), (w_next, m_next) = masks(0, 1), masks(1, 1), masks(0, 2)
    assert torch.equal(w0, w1) and torch.equal(w0, w_next)  # the same initial weights everywhere
    assert not torch.equal(m0, m1) and not torch.equal(m0, m_next)  # two ranks, two epochs: other masks
    assert torch.equal(masks(0, 2, drawn_before=1000)[1], m_next)  # epoch 2 draws the same, however it was reached
    seed_epoch(8, 0, 1)
    assert not torch.equal(Dropout(0.5).train()(torch.ones(64)), m1)  # seed 8's rank 0 is not seed 7's rank 1


def test_the_optimizer_steps_at_the_rate_the_schedule_reports():
    """Each epoch begins by giving the optimizer the schedule's rate: a mutation that left it out passed every test
    (no run of theirs had a non-improving epoch), while metrics.jsonl reported rates the optimizer never took."""
    from mmctr_ray.checkpoint import TrainState
    from mmctr_ray.training import begin_epoch, update_schedule

    cfg = tiny_cfg("train.lr=0.001", "train.patience=3").train
    layer = torch.nn.Linear(4, 1)
    optimizer = torch.optim.Adam(layer.parameters(), lr=cfg.lr)
    state, taken = TrainState(lr=cfg.lr), []
    for auc in (0.70, 0.72, 0.71, 0.69):  # two non-improving epochs after the second
        begin_epoch(optimizer, state, 7, 0)
        taken.append(optimizer.param_groups[0]["lr"])
        state.epoch += 1
        update_schedule(state, auc, cfg)
    assert taken == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4])
    begin_epoch(optimizer, state, 7, 0)
    assert optimizer.param_groups[0]["lr"] == state.lr == pytest.approx(1e-5)


def test_an_epochs_train_loss_is_the_mean_over_every_ranks_steps(monkeypatch):
    """Rank 0's sum of step losses is all-reduced (summed over the ranks) and divided by the ranks and the steps: a
    mutation that dropped the division by the ranks passed every test (a 2-worker run's loss was 1.18, not 0.59)."""
    from mmctr_ray.training import mean_epoch_loss

    other_rank = torch.tensor(6.0)  # rank 1's sum over its 10 steps

    def all_reduce(tensor):
        tensor += other_rank

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    assert mean_epoch_loss(torch.tensor(5.0), 10, 2) == pytest.approx(0.55)
    assert mean_epoch_loss(torch.tensor(5.0), 10, 1) == pytest.approx(0.5)  # one worker: no collective


def test_a_runs_samples_per_s_is_its_rows_over_its_seconds_not_a_mean_of_its_epochs_rates():
    """summary.json's mean_samples_per_s was the mean of the epochs' rates: a slow streamed epoch then seven fast ones
    from the kept shard (3k, then 10k) gave 9.1k samples/s for 7.7k."""
    from mmctr_ray.train_driver import steady_rate

    history = [{"steps": 25, "samples_per_s": 3_000.0, "steady_seconds": 8.0},
               *[{"steps": 25, "samples_per_s": 10_000.0, "steady_seconds": 2.4}] * 7]
    assert steady_rate(history) == pytest.approx((24_000 + 7 * 24_000) / (8.0 + 7 * 2.4))  # 7,742
    # a run resumed at half the batch: as many rows in twice the steps (the steps alone weighed them 1:2)
    halved = [{"steps": 11, "samples_per_s": 1_000.0, "steady_seconds": 10.0},
              {"steps": 21, "samples_per_s": 2_000.0, "steady_seconds": 5.0}]
    assert steady_rate(halved) == pytest.approx(20_000 / 15.0)  # 1,333, not the 1,500 of the mean or of the steps
    # epoch rows written before steady_seconds was kept: weighed by their steady steps
    older = [{"steps": 11, "samples_per_s": 1_000.0}, {"steps": 41, "samples_per_s": 2_000.0}]
    assert steady_rate(older) == pytest.approx(50 / (10 / 1_000 + 40 / 2_000))
    assert steady_rate([{"steps": 1, "samples_per_s": None}]) is None  # one-step epochs time no steady rate


def test_releasing_passes_every_batch_on_and_releases_the_store_pages_every_16(monkeypatch):
    """What the validation pass now reads through (rank 0 reads the split zero-copy from the object store each
    epoch it is not kept; only the training loop released those pages, so the split stayed in the worker's RSS,
    and in its reported peaks, until the next epoch's first step)."""
    import mmctr_ray.training as training

    released, sampled = [], []

    class Peaks:
        def sample(self):
            sampled.append(len(seen))

    monkeypatch.setattr(training, "release_store_pages", lambda: released.append(len(seen)))
    seen = []
    for batch in training._releasing(({"i": i} for i in range(40)), Peaks()):
        seen.append(batch["i"])
    assert seen == list(range(40))  # every batch, in order
    assert released == sampled == [1, 17, 33]  # after the 1st, 17th and 33rd: 16 batches at most stay mapped


def test_each_rank_shuffles_its_rows_by_its_own_permutation_each_epoch():
    """Ray Data's local shuffle and the kept shard were both seeded with seed + epoch: every rank put its rows in the
    same order, so one global step took the rows at the same places of every shard, epoch after epoch."""
    from mmctr_ray.resident import ResidentShard
    from mmctr_ray.training import TrainConfig, _streamed_batches, kept_batches, shuffle_seed

    seeds = {(rank, epoch): shuffle_seed(7, rank, epoch) for rank in range(4) for epoch in range(1, 4)}
    assert len(set(seeds.values())) == len(seeds) and all(0 <= s < 2**32 for s in seeds.values())
    assert shuffle_seed(7, 1, 2) == seeds[1, 2] != shuffle_seed(8, 1, 2)  # a function of (seed, rank, epoch) alone
    shard = ResidentShard({"label": torch.arange(64.0)})  # the same rows on two ranks: each its own order
    orders = [torch.cat([b["label"] for b in kept_batches(shard, 16, 4, TrainConfig(seed=7), rank, 1)])
              for rank in (0, 1)]
    assert not torch.equal(orders[0], orders[1]) and torch.equal(orders[0].sort().values, torch.arange(64.0))
    again = torch.cat([b["label"] for b in kept_batches(shard, 16, 4, TrainConfig(seed=7), 1, 1)])
    assert torch.equal(again, orders[1])  # a resumed or restarted epoch repeats its order
    read_order = kept_batches(shard, 16, 4, TrainConfig(seed=7, shuffle_buffer=0), 1, 1)
    assert torch.equal(torch.cat([b["label"] for b in read_order]), torch.arange(64.0))

    class Shard:  # what the worker's Ray Data shard is asked
        def iter_torch_batches(self, **kwargs):
            self.kwargs = kwargs
            return iter(())

    class Recorder:
        enabled = False

    for rank in (0, 1):
        ray_shard = Shard()
        list(_streamed_batches(ray_shard, 16, torch.device("cpu"), TrainConfig(seed=7), 2, Recorder(), rank))
        assert ray_shard.kwargs["local_shuffle_seed"] == seeds[rank, 2]


def test_a_resume_on_other_data_is_refused_before_ray_and_leaves_the_run_as_it_was(synth_dir, tmp_path):
    """The vocabularies were compared after Ray had started and after RUN was prepared: the refused resume had
    already removed the finished run's summary.json and saved its config.yaml with train settings that never ran
    (which the next resume then took, resetting the learning rate the schedule had decayed)."""
    import dataclasses

    from mmctr_ray.config import save_config
    from mmctr_ray.features import build_feature_map, load_item_table
    from mmctr_ray.train_driver import run_training

    cfg = load_config(CONFIGS / "tiny.yaml")
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    fmap = build_feature_map(synth_dir, load_item_table(synth_dir, cfg.data.item_vector))
    dataclasses.replace(fmap, num_users=fmap.num_users + 1).to_json(run / "feature_map.json")  # other users
    (run / "summary.json").write_text('{"best_valid_auc": 0.7}')
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    resumed = load_config(run / "config.yaml", ["train.epochs=9", "train.lr=5e-4"])
    with pytest.raises(ConfigError, match=rf"feature_map.json: the run was built with num_users={fmap.num_users + 1} "
                                          rf"but --data gives {fmap.num_users}; resume with the data the run "
                                          rf"started on$"):
        run_training(synth_dir, run, resumed, resume=True, start_ray=lambda: pytest.fail("Ray started"))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("precision, cpu, cuda", [("auto", False, True), ("bf16", True, True), ("fp32", False, False)])
def test_train_precision_chooses_bf16_per_device(precision, cpu, cuda):
    """`auto`: bf16 autocast on CUDA only; `bf16` on the CPU too; `fp32` never (no GPU needed: the choice only)."""
    from mmctr_ray.training import uses_bf16

    cfg = tiny_cfg(f"train.precision={precision}").train
    assert (uses_bf16(cfg, torch.device("cpu")), uses_bf16(cfg, torch.device("cuda"))) == (cpu, cuda)


def test_train_precision_fp16_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"train.precision='fp16': expected one of auto, fp32, bf16"):
        tiny_cfg("train.precision=fp16")


def test_non_finite_scores_are_refused_and_nothing_is_written():
    from mmctr_ray.predict import check_finite

    check_finite(np.array([0.1, -3.0], dtype=np.float32), "ck", "test.parquet")
    with pytest.raises(DataError, match=r"^ck: 2 non-finite predictions on test.parquet \(a diverged checkpoint, "
                                        r"or bf16 overflow on a GPU: score on the CPU\); nothing written$"):
        check_finite(np.array([0.1, np.nan, np.inf], dtype=np.float32), "ck", "test.parquet")


def _tensorboard_events(folder: Path) -> list[list[tuple[str, int, float]]]:
    """Per event file (in the order written): (tag or 'START', step, value) of each scalar and session start.
    TFRecord framing: length (8 bytes), its CRC (4), the Event proto, its CRC (4)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    files = []
    for path in folder.glob("events.out.tfevents.*"):
        data, at, events, began = path.read_bytes(), 0, [], None
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            began = event.wall_time if began is None else began
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                events.append(("START", event.step, 0.0))
            events += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
        files.append((began, events))
    # by the first event's time (microseconds): the names hold whole seconds and the writer's pid, and files written
    # milliseconds apart can share a modification time
    return [events for _, events in sorted(files, key=lambda f: f[0])]


def test_a_resumed_attempt_hides_the_tensorboard_points_of_the_epochs_it_trains_again(tmp_path, monkeypatch):
    """An attempt that continues after epoch 1 (--resume, or a restart after a worker died) wrote epoch 2's points
    again beside the first attempt's: TensorBoard drew both. Every point has a global step now, and the new
    event file starts with TensorBoard's purge step just past epoch 1 (its last step, 10)."""
    from types import SimpleNamespace

    from mmctr_ray.run_log import RunLog

    def epoch(log: RunLog, n: int, auc: float) -> None:
        log.progress(n, 5, 10, 512, 100.0, torch.tensor(2.0))
        log.epoch_end(SimpleNamespace(history=[{"epoch": n, "train_loss": 0.5, "valid_auc": auc, "valid_logloss": 0.4,
                                                "lr": 1e-3, "samples_per_s": 100.0}], best_auc=auc, best_epoch=n))

    monkeypatch.setattr("mmctr_ray.run_log.PROGRESS_EVERY_S", 0.0)
    first = RunLog(str(tmp_path), enabled=True, steps_per_epoch=10)
    epoch(first, 1, 0.6)
    epoch(first, 2, 0.7)  # then the attempt dies before epoch 2's checkpoint
    first.close()
    second = RunLog(str(tmp_path), enabled=True, steps_per_epoch=10, history=[{"epoch": 1}])
    epoch(second, 2, 0.75)
    second.close()
    old, new = _tensorboard_events(tmp_path / "tensorboard")
    auc = lambda events: [(s, v) for t, s, v in events if t == "epoch/valid_auc"]  # noqa: E731
    assert auc(old) == [(10, pytest.approx(0.6)), (20, pytest.approx(0.7))]
    assert [(t, s) for t, s, _ in new if t in ("START", "train/loss")] == [("START", 11), ("train/loss", 15)]
    assert auc(new) == [(20, pytest.approx(0.75))]  # epoch 2 again, past the purge step: the 0.7 at 20 is hidden


def test_an_epochs_tensorboard_points_are_on_disk_when_the_worker_is_ended_right_after_it(tmp_path):
    """tensorboardX's writer queued events for a thread that wrote them out every 10 s, and its flush() did not wait
    for them: a worker Ray ended within those seconds (a trial ASHA pruned at that epoch, a run interrupted after
    it) lost the epoch's points for good. Here a process ends by os._exit just after its second epoch."""
    import subprocess
    import sys

    code = f"""
import os, torch
from types import SimpleNamespace
from mmctr_ray.run_log import RunLog
log = RunLog({str(tmp_path)!r}, enabled=True, steps_per_epoch=10)
rows = []
for n, auc in ((1, 0.6), (2, 0.7)):
    rows.append({{"epoch": n, "train_loss": 0.5, "valid_auc": auc, "valid_logloss": 0.4, "lr": 1e-3,
                 "samples_per_s": 100.0}})
    log.epoch_end(SimpleNamespace(history=rows, best_auc=auc, best_epoch=n))
os._exit(0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    (events,) = _tensorboard_events(tmp_path / "tensorboard")
    assert [(s, round(v, 4)) for t, s, v in events if t == "epoch/valid_auc"] == [(10, 0.6), (20, 0.7)]
    assert [(t, s) for t, s, _ in events if t == "START"] == [("START", 1)]


def test_tensorboard_steps_count_the_steps_each_epoch_took(tmp_path, monkeypatch):
    """The global step was epoch x the current attempt's steps per epoch. A run resumed with another batch size (24
    steps an epoch, then 195) drew its new epochs over the old ones, and its purge step hid a range of the wrong
    epochs; an attempt restarted before the first checkpoint had no purge step at all, so epoch 1's points were
    drawn twice. The steps each epoch took are counted now, and every attempt purges past its checkpoint."""
    from types import SimpleNamespace

    from mmctr_ray.run_log import RunLog

    monkeypatch.setattr("mmctr_ray.run_log.PROGRESS_EVERY_S", 0.0)
    rows: list[dict] = []

    def epoch(log: RunLog, n: int, steps: int, auc: float) -> None:
        log.progress(n, steps // 2, steps, 512, 100.0, torch.tensor(2.0))
        rows.append({"epoch": n, "train_loss": 0.5, "valid_auc": auc, "valid_logloss": 0.4, "lr": 1e-3,
                     "samples_per_s": 100.0, "steps": steps})
        log.epoch_end(SimpleNamespace(history=rows, best_auc=auc, best_epoch=n))

    killed = RunLog(str(tmp_path), enabled=True, steps_per_epoch=24)
    killed.progress(1, 12, 24, 512, 100.0, torch.tensor(2.0))  # then its worker died, before any checkpoint
    killed.close()
    first = RunLog(str(tmp_path), enabled=True, steps_per_epoch=24)  # the restart, from no checkpoint
    epoch(first, 1, 24, 0.6)
    epoch(first, 2, 24, 0.7)
    first.close()
    resumed = RunLog(str(tmp_path), enabled=True, steps_per_epoch=195, history=list(rows))  # --resume, batch / 8
    epoch(resumed, 3, 195, 0.8)
    resumed.close()
    files = _tensorboard_events(tmp_path / "tensorboard")
    assert [[(t, s) for t, s, _ in events if t in ("START", "train/loss")] for events in files] == [
        [("START", 1), ("train/loss", 12)], [("START", 1), ("train/loss", 12), ("train/loss", 36)],
        [("START", 49), ("train/loss", 48 + 97)]]  # the killed attempt's point at 12 is hidden by the restart's
    assert [(s, round(v, 4)) for events in files for t, s, v in events if t == "epoch/valid_auc"] == [
        (24, 0.6), (48, 0.7), (48 + 195, 0.8)]


def test_probabilities_of_extreme_logits_stay_inside_0_1_without_a_warning():
    import warnings

    from mmctr_ray.metrics import to_probabilities

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "overflow encountered in exp" at a logit below -709
        probs = to_probabilities(np.array([-1000.0, -20.0, 0.0, 20.0, 1000.0]))
    assert probs[0] == probs[1] == 1e-7 and probs[2] == 0.5 and probs[3] == probs[4] == 1 - 1e-7


def test_peak_rss_is_mib_on_linux_and_on_macos(monkeypatch):
    """getrusage's ru_maxrss is KiB on Linux and bytes on macOS (a laptop's worker reported 1024× its memory)."""
    import resource
    import sys
    from types import SimpleNamespace

    from mmctr_ray.training import peak_rss_mib

    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=300 * 2**20))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert peak_rss_mib() == 300.0
    monkeypatch.setattr(sys, "platform", "linux")
    assert peak_rss_mib() == 300.0 * 1024


@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_is_one_line_too(ray_local, synth_dir, tmp_path, monkeypatch):
    """Ctrl-C while the workers start (no checkpoint yet) ended in an IndexError traceback, exit status 1."""
    import signal

    from mmctr_ray import train_driver
    from mmctr_ray.errors import Interrupted

    class Aborted:  # Ray Train's SIGINT handler aborts the run: trainer.fit() ends in SystemExit
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            raise SystemExit(1)

    monkeypatch.setattr(train_driver, "torch_trainer", lambda: Aborted)
    monkeypatch.setattr(train_driver, "_in_driver_main_thread", lambda: True)
    run = tmp_path / "run"
    with pytest.raises(Interrupted) as stopped:
        run_training(synth_dir, str(run), tiny_cfg())
    assert str(stopped.value) == f"{run} holds no checkpoint yet" and stopped.value.signum == signal.SIGINT


def test_a_resume_that_changes_more_than_train_names_the_key(tmp_path, synth_dir, caplog):
    """Only train.* may change on --resume; the refusal said "a different model section" without the key, and it
    came after the line that describes the run ("training config `tiny`: ... dropout 0.33"), as if it trained."""
    from mmctr_ray.config import save_config
    from mmctr_ray.errors import ConfigError
    from mmctr_ray.train_driver import _check_run_dir

    save_config(tiny_cfg(), tmp_path / "config.yaml")
    _check_run_dir(tmp_path, tiny_cfg("train.epochs=9", "train.lr=0.01"), resume=True, overwrite=False)
    dropout = tiny_cfg().model.dropout
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: --resume with model.dropout=0.33 where the run's "
                                                    f"config.yaml has {dropout!r}; only train.* may change")):
        _check_run_dir(tmp_path, tiny_cfg("model.dropout=0.33"), resume=True, overwrite=False)
    with caplog.at_level("INFO", logger="mmctr_ray"), pytest.raises(ConfigError, match="only train.* may change"):
        run_training(synth_dir, str(tmp_path), tiny_cfg("model.dropout=0.33"), resume=True)
    assert not [r for r in caplog.records if r.getMessage().startswith("training ")]  # nothing said of a run


# found untested by a hand mutation audit (helper-126): each test fails on its mutant
def test_a_runs_rate_mixes_epochs_with_and_without_their_steady_seconds():
    """A run resumed across the version that began keeping steady_seconds has epochs of both kinds: its rate is
    counted by steps over them all, not an error."""
    from mmctr_ray.train_driver import steady_rate

    rate = steady_rate([{"samples_per_s": 100.0, "steady_seconds": 2.0, "steps": 3},
                        {"samples_per_s": 300.0, "steps": 3}])
    assert rate == pytest.approx(4 / (2 / 100 + 2 / 300))


def test_a_resume_that_changes_the_fusion_section_names_the_key(tmp_path):
    """Only train.* may change on --resume: a fusion width is refused like a model key."""
    from mmctr_ray.config import load_config, save_config
    from mmctr_ray.errors import ConfigError
    from mmctr_ray.train_driver import _check_run_dir

    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("configs/tiny.yaml"), run / "config.yaml")
    _check_run_dir(str(run), load_config("configs/tiny.yaml", ["train.epochs=5"]), True, False)
    with pytest.raises(ConfigError, match=r"--resume with fusion.text_dim=16 where the run's config.yaml has 32"):
        _check_run_dir(str(run), load_config("configs/tiny.yaml", ["fusion.text_dim=16"]), True, False)

def test_the_progress_line_and_tensorboard_carry_every_figure_under_its_own_tag(tmp_path, caplog, monkeypatch):
    """No line at step 1 (it only waits for the data pipeline: its ETA would divide by the 0 steps timed); then the
    progress line's figures, and TensorBoard's tags and values, each its own (mutation audit: the samples/s tag
    renamed or given the loss, epoch/valid_logloss dropped, a 0.0 scalar skipped, the epoch line's best AUC the
    epoch's own, and a line at step 1 all passed)."""
    from types import SimpleNamespace

    import mmctr_ray.run_log
    from mmctr_ray.run_log import RunLog

    monkeypatch.setattr(mmctr_ray.run_log, "PROGRESS_EVERY_S", 0.0)
    log = RunLog(str(tmp_path), enabled=True, steps_per_epoch=10)
    monkeypatch.setattr(mmctr_ray.run_log, "time", SimpleNamespace(perf_counter=lambda: 104.0, time=time.time))
    rows = [{"epoch": 1, "train_loss": 0.52, "valid_auc": 0.75, "valid_auc_se": 0.01, "valid_logloss": 0.46,
             "lr": 1e-3, "samples_per_s": 300.0, "steps": 10},
            {"epoch": 2, "train_loss": 0.48, "valid_auc": 0.70, "valid_auc_se": 0.0, "valid_logloss": 0.44,
             "lr": 1e-4, "samples_per_s": 250.0, "steps": 10}]
    with caplog.at_level("INFO", logger="mmctr.train"):
        log.progress(1, 1, 10, 256, 100.0, torch.tensor(0.9))  # step 1: nothing, and no ZeroDivisionError
        assert caplog.records == []
        log.progress(1, 5, 10, 4 * 256, 100.0, torch.tensor(2.5))  # 4 steps timed in 4 s, 5 left
        log.epoch_end(SimpleNamespace(history=rows[:1], best_auc=0.75, best_epoch=1))
        log.epoch_end(SimpleNamespace(history=rows, best_auc=0.75, best_epoch=1))
    log.close()
    said = [r.getMessage() for r in caplog.records]
    assert said[0] == "epoch 1 step 5/10 loss 0.5000 256 samples/s ETA 5s"
    assert said[2] == ("epoch 2: train loss 0.4800, valid AUC 0.7000 ± 0.0000, logloss 0.4400, lr 1.0e-04, "
                       "250 samples/s (best AUC 0.7500 at epoch 1)")
    (events,) = _tensorboard_events(tmp_path / "tensorboard")
    assert [(t, s, round(v, 4)) for t, s, v in events if t.startswith("train/")] == [
        ("train/loss", 5, 0.5), ("train/samples_per_s", 5, 256.0)]
    assert [(t, s, round(v, 4)) for t, s, v in events if t.startswith("epoch/") and s == 20] == [
        ("epoch/train_loss", 20, 0.48), ("epoch/valid_auc", 20, 0.7), ("epoch/valid_auc_se", 20, 0.0),
        ("epoch/valid_logloss", 20, 0.44), ("epoch/lr", 20, 0.0001), ("epoch/samples_per_s", 20, 250.0)]


def test_the_submission_holds_every_rows_probability_in_row_order_under_the_tasks_column(synth_dir, tmp_path,
                                                                                         monkeypatch):
    """run_predict's zip, from the scores it is handed: prediction.csv alone, header ID,<--task>, IDs 0..N-1 in the
    split's row order, each the logit's probability, strictly inside (0, 1) even for extreme logits, into a folder it
    creates (mutation audit: the logits written as they are, the header always Task2, and no mkdir all passed the
    fast tests)."""
    import mmctr_ray.predict
    from mmctr_ray.metrics import to_probabilities

    rows = pq.read_metadata(Layout(synth_dir).split("valid")).num_rows
    logits = np.linspace(-40.0, 40.0, rows).astype(np.float32)
    labels = pq.read_table(Layout(synth_dir).split("valid"), columns=["label"]).column("label").to_numpy()
    monkeypatch.setattr(mmctr_ray.predict, "score_split", lambda run_dir, data_dir, split, actors, gpus, batch: (
        logits, labels, tmp_path / "run" / "checkpoint_epoch_001"))
    out = tmp_path / "new" / "folder" / "sub.zip"
    summary = run_predict(tmp_path / "run", synth_dir, out, split="valid", task="Task1&2")
    assert summary["rows"] == rows and summary["task"] == "Task1&2"
    assert summary["metrics"]["auc"] == pytest.approx(roc_auc_score(labels, logits))
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == ["prediction.csv"]
        lines = zf.read("prediction.csv").decode().splitlines()
    assert lines[0] == "ID,Task1&2" and len(lines) == 1 + rows
    ids, probs = zip(*(line.split(",") for line in lines[1:]))
    assert list(ids) == [str(i) for i in range(rows)]
    probs = np.array(probs, dtype=float)
    assert np.all((probs > 0) & (probs < 1)) and np.all(np.diff(probs) >= 0)
    np.testing.assert_allclose(probs, to_probabilities(logits), atol=1e-8)
    assert not list(out.parent.glob("*.partial"))


@pytest.mark.parametrize("scored, said", [
    (lambda n: np.zeros(n - 1, np.float32), r"^valid: scored {m} rows but the split has {n}; nothing written$"),
    (lambda n: np.r_[np.zeros(n - 1, np.float32), np.nan], r": 1 non-finite predictions on the valid split "),
])
def test_a_scoring_that_lost_rows_or_diverged_writes_no_submission(synth_dir, tmp_path, monkeypatch, scored, said):
    """Scores of fewer rows than the split, or NaN among them, are refused before the zip is written (mutation
    audit: both checks removed passed; check_finite was tested alone, not that run_predict calls it)."""
    import mmctr_ray.predict

    n = pq.read_metadata(Layout(synth_dir).split("valid")).num_rows
    logits = scored(n)
    monkeypatch.setattr(mmctr_ray.predict, "score_split", lambda run_dir, data_dir, split, actors, gpus, batch: (
        logits, np.zeros(len(logits)), tmp_path / "run" / "checkpoint_epoch_001"))
    with pytest.raises(DataError, match=said.format(m=len(logits), n=n)):
        run_predict(tmp_path / "run", synth_dir, tmp_path / "sub.zip", split="valid")
    assert not (tmp_path / "sub.zip").exists()


def test_the_scoring_actor_hands_back_logits_not_probabilities(monkeypatch):
    """Scorer's batches are the fp32 logits AUC ranks and run_predict turns into probabilities once (mutation audit:
    the actor returning probabilities passed every fast test; the submission would hold sigmoid(sigmoid(x)))."""
    from types import SimpleNamespace

    import mmctr_ray.predict
    from mmctr_ray.predict import Scorer

    logits = np.array([-3.0, 0.0, 5.0], np.float32)
    monkeypatch.setattr(mmctr_ray.predict, "logits_of", lambda model, inputs, train: logits)
    scorer = Scorer.__new__(Scorer)  # no checkpoint: the model is not called
    scorer.device, scorer.model = "cpu", SimpleNamespace(experiment_cfg=SimpleNamespace(train=None))
    out = scorer({"item_id": np.array([1, 2, 3]), "label": np.array([0.0, 1.0, 0.0])})
    assert out["logit"].tolist() == logits.tolist() and out["label"].tolist() == [0.0, 1.0, 0.0]


def test_predict_gives_the_oracle_auc_only_beside_a_test_auc(synth_dir, tmp_path, monkeypatch):
    """Synthetic data whose hidden test labels are gone (oracle.json kept): no test AUC, so no oracle AUC either (it
    is "beside the AUC it is for"; mutation audit: dropping that condition passed)."""
    import mmctr_ray.predict

    data = shutil.copytree(synth_dir, tmp_path / "data", ignore=shutil.ignore_patterns("item_images"))
    Layout(data).hidden_test_labels.unlink()
    rows = pq.read_metadata(Layout(data).split("test")).num_rows
    assert Layout(data).oracle_auc("test", rows) is not None
    monkeypatch.setattr(mmctr_ray.predict, "score_split", lambda run_dir, data_dir, split, actors, gpus, batch: (
        np.linspace(-2, 2, rows), np.zeros(rows), tmp_path / "run" / "checkpoint_epoch_001"))
    summary = run_predict(tmp_path / "run", data, tmp_path / "sub.zip")
    assert summary["rows"] == rows and "metrics" not in summary and "oracle_auc" not in summary
