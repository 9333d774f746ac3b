"""`mmctr tune`: the search space, concurrency from resources, the PCA cache, and a killed-then-resumed search."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from mmctr_ray.checkpoint import best_checkpoint, load_checkpoint
from mmctr_ray.config import FusionConfig, load_config
from mmctr_ray.errors import ConfigError, DataError, OutputExistsError
from mmctr_ray.fuse import run_fuse
from mmctr_ray.pca_cache import cached_fusion, fusion_key
from mmctr_ray.predict import load_model, score_parquet
from mmctr_ray.report import read_metrics
from mmctr_ray.schema import Layout
from mmctr_ray.search_space import SearchSpace, load_search
from mmctr_ray.train_driver import check_inputs
from mmctr_ray.tune_report import asha_stopped, in_this_search, trial_outcome
from mmctr_ray.tuning import (FAULT_ENV, METRIC, _scheduler, check_resources, progress_line, shared_datasets,
                               trial_concurrency, trials_per_node)

ROOT = Path(__file__).parent.parent
SEARCH_CONFIGS = ["configs/search_paper.yaml", "configs/search_tiny.yaml"]


@pytest.mark.parametrize("path", SEARCH_CONFIGS)
def test_shipped_searches_load_and_their_base_trains_as_a_config(path):
    space = load_search(ROOT / path)
    keys = {p.key for p in space.params}
    assert {"fusion.strategy", "fusion.dims", "fusion.text_dim", "fusion.image_dim", "model.attention",
            "model.num_heads", "model.senet", "model.senet_ratio", "model.bilinear", "model.crossnet",
            "model.cross_layers", "model.dnn_units", "train.lr", "train.embedding_l2", "model.dropout",
            "train.batch_size"} <= keys
    assert load_config(ROOT / path).name == Path(path).stem  # `mmctr train --config` skips the search section


def test_define_by_run_samples_each_parameter_only_where_it_applies(tmp_path):
    raw = yaml.safe_load((ROOT / "configs/search_tiny.yaml").read_text())
    (tmp_path / "sorted.yaml").write_text(yaml.safe_dump(raw))  # keys sorted: conditions before their parents
    space = load_search(tmp_path / "sorted.yaml")
    assert [p.key for p in space.params].index("fusion.strategy") < [p.key for p in space.params].index("fusion.dims")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=3))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seen = set()
    for _ in range(60):
        trial = study.ask()
        space.define_by_run(trial)
        p = trial.params
        strategy = p["fusion.strategy"]
        seen.add(strategy)
        assert ("fusion.dims" in p) == (strategy in ("v1", "v2", "v3"))
        assert ("fusion.text_dim" in p) == ("fusion.image_dim" in p) == (strategy == "v4")
        assert ("model.cross_layers" in p) == (p["model.crossnet"] != "off")
        assert ("model.num_heads" in p) == (p["model.attention"] == "multihead")
        cfg = space.trial_config(p)  # every sampled combination is a valid config
        assert cfg.train.epochs == space.max_epochs and isinstance(cfg.model.dnn_units, tuple)
        if strategy == "v4":
            assert (cfg.fusion.text_dim, cfg.fusion.image_dim) == (p["fusion.text_dim"], p["fusion.image_dim"])
        study.tell(trial, 0.5)
    assert seen == {"given", "v1", "v2", "v3", "v4"}


@pytest.mark.parametrize("space, message", [
    ({"model.dropout": {"float": [0.3, 0.1]}}, "float expects [low, high] with low < high"),
    ({"model.dropuot": {"float": [0.0, 0.1]}}, "unknown config key model.dropuot"),
    ({"model.dropout": {"uniform": [0.0, 0.1]}}, "expected a mapping with exactly one of choice, int, float"),
    ({"model.num_heads": {"choice": [1, 2], "when": {"model.attention": ["multihead"]}}},
     "when refers to model.attention, which is not another searched parameter"),
    ({"model.senet": {"choice": [True], "when": {"model.bilinear": ["off"]}},
      "model.bilinear": {"choice": ["off"], "when": {"model.senet": [True]}}}, "form a cycle"),
    ({"model.cross_layers": {"int": [1.5, 4]}}, "int expects integer bounds"),
    ({"model.senet": {"choice": [True], "iff": {}}}, "unknown key iff"),
    ({"train.lr": {"float": [0.0, 0.01], "log": True}}, "log: true expects a positive low bound"),
    ({"train.lr": {"float": [1e-4, 1e-2], "log": True, "step": 1e-4}}, "log and step cannot be combined"),
    ({"model.bilinear": {"choice": [False, "field_all"]}},  # YAML reads an unquoted off as false
     "search.space.model.bilinear: the value False gives no valid config (model.bilinear=False: expected a string)"),
    ({"model.dropout": {"float": [0.0, 1.5]}}, "model.dropout: the value 1.5 gives no valid config"),
    # these failed inside tuner.fit() as tracebacks (after TUNE was written), or were silently never sampled:
    ({"model.cross_layers": {"int": [1, 4], "step": 0.5}}, "step expects a positive integer for an int or float range"),
    ({"train.lr": {"float": [1e-4, 1e-2], "step": 0}}, "step expects a positive number"),
    ({"model.attention": {"choice": ["multihead"]},  # the bounds 1 and 8 divide the width 256, 3 does not
      "model.num_heads": {"int": [1, 8], "when": {"model.attention": ["multihead"]}}},
     "model.num_heads: the value 3 gives no valid config"),
    ({"model.crossnet": {"choice": ["off", "v1"]},
      "model.cross_layers": {"int": [1, 3], "when": {"model.crossnet": ["v2"]}}},
     "model.cross_layers: when model.crossnet is 'v2', a value model.crossnet never takes (choices ['off', 'v1'])"),
    ({"train.epochs": {"int": [2, 5]}}, "every trial trains search.max_epochs epochs"),
    # each value valid alone, not together: trials drawing both errored at their start
    ({"model.embedding_dim": {"choice": [64, 128]}, "model.item_vector_proj": {"choice": [128, 192]}},
     "search.space: model.embedding_dim=128 with model.item_vector_proj=192 gives no valid config "
     "(model.item_vector_proj=192: expected a multiple of model.embedding_dim=128)"),
    ({"train.lr": {"float": [1e-5, 1e-2], "log": True}, "train.min_lr": {"float": [1e-6, 1e-4], "log": True}},
     "train.lr=1e-05 with train.min_lr=0.0001 gives no valid config"),
    ({"model.attention": {"choice": ["din", "multihead"]}, "model.item_vector_proj": {"choice": [128, 192]},
      "model.num_heads": {"choice": [2, 128], "when": {"model.attention": ["multihead"]}}},  # widths 256 and 320
     "model.item_vector_proj=192 with model.num_heads=128 gives no valid config"),
    ({"model.dropout": {"float": [0.0, 0.2]}, "reduction_factor": 1}, "search.reduction_factor=1: expected at least 2"),
    # a float range on an integer key: its integer bounds passed, and every trial drew 2709.95 and errored
    ({"train.batch_size": {"float": [1024, 4096]}},
     "search.space.train.batch_size: the value 1024.0 gives no valid config (train.batch_size=1024.0: expected an "
     "integer)"),
    ({"train.batch_size": {"int": [256, 512], "step": 1024}}, "step 1024 is wider than the range [256, 512]: only "
                                                               "256 could be drawn"),  # silently always 256
    ({1: {"choice": [1, 2]}}, "search.space.1: expected a config key section.name"),  # was an AttributeError
    # an IndexError traceback; the string 'false' sampled lr on a log scale; log on a choice was ignored
    ({"model.attention": {"choice": ["din", "multihead"]},
      "model.num_heads": {"choice": [1, 2], "when": {"model.attention": []}}},
     "when expects a mapping of earlier parameters to non-empty lists of values"),
    ({"train.lr": {"float": [1e-3, 1e-2], "log": "false"}}, "search.space.train.lr: log expects true or false, got "
                                                           "'false'"),
    ({"model.senet_ratio": {"choice": [2, 4], "log": True}}, "log applies to int and float ranges, not to choice"),
])
def test_bad_search_sections_are_one_line_errors(tmp_path, space, message):
    path = tmp_path / "s.yaml"
    settings = {k: space.pop(k) for k in list(space) if isinstance(k, str) and "." not in k}  # search.* settings
    path.write_text(yaml.safe_dump({"name": "s", "search": {"space": space, **settings}}))
    with pytest.raises(ConfigError) as err:
        load_search(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_splits_too_large_for_the_object_store_are_read_by_each_trial(monkeypatch, tmp_path):
    import ray

    # 3.6M + 10k rows of 64-item histories: ~1.9 GiB, over a quarter of a 4 GiB store; nothing is read (no Ray needed)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2, "object_store_memory": 4 * 2**30})
    assert shared_datasets(tmp_path, 64, {"train": 3_600_000, "valid": 10_000}) == {}


@pytest.mark.parametrize("ordered", [True, False])
def test_a_deterministic_searchs_shared_splits_are_kept_in_file_order(monkeypatch, tmp_path, ordered):
    """Read once for every trial, the splits were materialized in the order their read tasks ended, whatever the
    search's train.deterministic; a deterministic one's are read as a deterministic run reads them (split_datasets:
    in file order, their blocks kept in read order) and materialized so."""
    import ray

    import mmctr_ray.train_driver

    class Split:
        def __init__(self, ordered):
            self.ordered = ordered

        def materialize(self):
            return self.ordered

    asked = []

    def split_datasets(data_dir, max_len, ordered):
        asked.append(ordered)
        return {"train": Split(ordered), "valid": Split(ordered)}

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2, "object_store_memory": 4 * 2**30})
    monkeypatch.setattr(mmctr_ray.train_driver, "split_datasets", split_datasets)
    kept = shared_datasets(tmp_path, 16, {"train": 1_000, "valid": 100}, ordered=ordered)
    assert asked == [ordered] and kept == {16: {"train": ordered, "valid": ordered}}


def test_concurrency_is_sized_from_resources():
    # the hang seen in a probe: 3 trials × 2 workers on 4 logical CPUs; here 1 trial at a time fits
    assert trial_concurrency({"CPU": 4}, workers=2, cpus_per_worker=1, gpus_per_worker=0, requested=3) == 1
    assert trial_concurrency({"CPU": 16}, workers=1, cpus_per_worker=1, gpus_per_worker=0) == 15
    assert trial_concurrency({"CPU": 2}, workers=1, cpus_per_worker=1, gpus_per_worker=0) == 1  # a laptop
    # fractional GPUs: four trials share one GPU when each asks for a quarter
    assert trial_concurrency({"CPU": 16, "GPU": 1}, workers=1, cpus_per_worker=1, gpus_per_worker=0.25) == 4
    assert trial_concurrency({"CPU": 16, "GPU": 1}, workers=1, cpus_per_worker=1, gpus_per_worker=0.25,
                             requested=2) == 2
    with pytest.raises(ConfigError, match=r"one trial needs 3 CPUs \(2 workers × 1 CPU, 1 CPU for data loading\); Ray "
                                          r"has 2 CPUs"):
        trial_concurrency({"CPU": 2}, workers=2, cpus_per_worker=1, gpus_per_worker=0)


def test_a_resumed_search_on_fewer_resources_names_its_own_concurrency(caplog):
    """A resume said "--max-concurrent 4: ...; running 2", a flag --resume refuses, while Tune restores its 4."""
    with caplog.at_level("WARNING", logger="mmctr_ray.tuning"):
        assert trial_concurrency({"CPU": 3}, 1, 1, 0, requested=4, resumed=True) == 2
        assert trial_concurrency({"CPU": 3}, 1, 1, 0, requested=4) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "the search's 4 at a time (settings.json): only 2 trials fit in Ray's resources (3 CPUs, 0 GPUs); the others "
        "wait for a trial to end",
        "--max-concurrent 4: only 2 trials fit in Ray's resources (3 CPUs, 0 GPUs); running 2"]



def test_a_resumed_search_sizes_the_local_ray_for_the_trials_it_started_with(tmp_path):
    """`tune --resume` runs its trials with the workers of settings.json, not the command line's defaults: the
    private local Ray is sized for those (ray_env.logical_cpus), else a search started with --workers-per-trial 2
    on 2 cores (3 logical CPUs) could not resume there."""
    from mmctr_ray.tuning import trial_cpus

    assert trial_cpus(tmp_path, False, 2, 1.5) == 3.0
    assert trial_cpus(tmp_path, True, 1, 1.0) == 1.0  # nothing saved yet: the command line's (the resume fails later)
    (tmp_path / "settings.json").write_text(json.dumps({"workers": 2, "cpus_per_worker": 1.0}))
    assert trial_cpus(tmp_path, True, 1, 1.0) == 2.0 and trial_cpus(tmp_path, False, 1, 1.0) == 1.0


def test_trials_that_run_at_once_on_a_node_share_its_cores():
    """Each trial's CPU worker took every core of the node: on 2 cores, two processes of the baseline step with 2
    threads each ran 3,702 samples/s in all, against 6,368 with 1 thread each."""
    assert trials_per_node([2.0], concurrent=1, workers=1, cpus_per_worker=1) == 1  # a laptop: one at a time
    assert trials_per_node([16.0], concurrent=15, workers=1, cpus_per_worker=1) == 15  # one machine: all of them
    assert trials_per_node([16.0], concurrent=2, workers=1, cpus_per_worker=1) == 2
    assert trials_per_node([16.0, 16.0], concurrent=30, workers=1, cpus_per_worker=1) == 16  # what a node holds
    assert trials_per_node([8.0, 32.0], concurrent=30, workers=2, cpus_per_worker=2) == 8  # the largest node
    assert trials_per_node([0.0, 8.0], concurrent=3, workers=1, cpus_per_worker=0.5) == 3
    assert trials_per_node([0.0], concurrent=4, workers=1, cpus_per_worker=1) == 1  # never below one


def test_a_joined_cluster_that_can_grow_takes_the_requested_concurrency(caplog):
    """cluster.yaml starts with no GPU worker: a GPU search on it must start its trials so that their pending
    requests make the autoscaler add nodes, instead of failing on the 0 GPUs Ray reports at start."""
    head_only = {"CPU": 8, "GPU": 0}
    with caplog.at_level("WARNING", logger="mmctr_ray.tuning"):
        assert trial_concurrency({"CPU": 2}, 1, 1, 0, requested=3, elastic=True) == 3
        assert trial_concurrency({"CPU": 3}, 1, 1, 0, requested=4) == 2
        assert trial_concurrency({"CPU": 2}, 1, 1, 0, requested=4) == 1
    assert [r.getMessage() for r in caplog.records] == [  # "1 trials fit" (helper-141)
        "--max-concurrent 3: 1 trial fits in what Ray has now (2 CPUs, 0 GPUs); the rest wait for the autoscaler to "
        "add nodes (on a cluster that cannot grow they wait for good: lower --max-concurrent)",
        "--max-concurrent 4: only 2 trials fit in Ray's resources (3 CPUs, 0 GPUs); running 2",
        "--max-concurrent 4: only 1 trial fits in Ray's resources (2 CPUs, 0 GPUs); running 1"]
    assert trial_concurrency(head_only, 1, 1, 1.0, requested=4, elastic=True) == 4
    assert trial_concurrency({"CPU": 8, "GPU": 1}, 1, 1, 0.5, requested=2, elastic=True) == 2
    with pytest.raises(ConfigError, match="on an autoscaling cluster pass --max-concurrent"):
        trial_concurrency(head_only, 1, 1, 1.0, elastic=True)
    with pytest.raises(ConfigError, match="Ray has 8 CPUs and 0 GPUs$"):  # the private local Ray cannot grow
        trial_concurrency(head_only, 1, 1, 1.0, requested=4)
    assert trial_concurrency({"CPU": 4}, workers=2, cpus_per_worker=1, gpus_per_worker=0, requested=3) == 1


@pytest.mark.parametrize("max_epochs, grace, rf", [(3, 1, 3), (2, 1, 2), (4, 1, 2), (12, 1, 3), (9, 3, 3)])
def test_asha_never_stops_a_trial_at_its_last_epoch_but_still_prunes_earlier(max_epochs, grace, rf, tmp_path):
    """Ray's ASHA puts a rung at max_t when log(max_t / grace) / log(rf) is close to an integer (3 epochs, rf 3:
    rungs 1 and 3), where stopping saves nothing and races the trial's summary (completed or pruned, by chance)."""
    from ray.tune.schedulers import TrialScheduler

    space = SearchSpace(params=(), max_epochs=max_epochs, grace_period=grace, reduction_factor=rf)
    sched = _scheduler(space, tmp_path / "asha.json")
    trials = [SimpleNamespace(trial_id=f"t{i}", config={}) for i in range(8)]
    for t in trials:
        sched.on_trial_add(None, t)
    actions = {}
    for epoch in range(1, max_epochs + 1):
        for i, t in enumerate(trials):  # later trials are worse at every epoch
            actions[t.trial_id, epoch] = sched.on_trial_result(None, t, {"epoch": epoch, METRIC: 1.0 - 0.01 * i})
    assert all(actions[t.trial_id, max_epochs] == TrialScheduler.CONTINUE for t in trials)
    assert TrialScheduler.STOP in {actions[t.trial_id, grace] for t in trials}


def test_a_new_searchs_asha_records_exist_before_any_result_so_its_running_trials_are_not_called_pruned(
        tmp_path, monkeypatch):
    """A search interrupted (Ctrl-C) before a result reached ASHA had no asha.json, which is how a search older than
    the records looks: its running trials were called "pruned" in results.csv and "ended" in the interrupted line,
    and --resume then trained them to the end. The records are written, empty, as the scheduler is created."""
    import mmctr_ray.asha

    monkeypatch.setattr(mmctr_ray.asha, "records_path", None)
    space = SearchSpace(params=(), max_epochs=3, grace_period=1, reduction_factor=2)
    _scheduler(space, tmp_path / "asha.json")
    assert asha_stopped(tmp_path) == {}  # no trial stopped yet, and that is known
    run = tmp_path / "trials" / "t"
    run.mkdir(parents=True)
    assert trial_outcome(run, 2, 3, asha_stopped(tmp_path)) == "running"  # 2 epochs of 3, no summary: it runs


def test_a_search_whose_grace_period_is_its_last_epoch_prunes_nothing(tmp_path):
    from ray.tune.schedulers import FIFOScheduler

    space = SearchSpace(params=(), max_epochs=2, grace_period=2)
    assert isinstance(_scheduler(space, tmp_path / "asha.json"), FIFOScheduler)


def test_a_resumed_trial_tells_tune_only_the_epochs_its_checkpoints_hold(tmp_path, monkeypatch):
    """Rank 0 writes an epoch's metrics.jsonl row before Ray Train copies that epoch's checkpoint into RUN: a search
    killed between the two left a row for an epoch the resumed trial trains again, and reports then. Tune hears the
    epochs before it from the replay, that one from the training: each once."""
    import ray.tune
    import ray.tune.integration.ray_train

    import mmctr_ray.train_driver
    from mmctr_ray.checkpoint import TrainState, save_checkpoint
    from mmctr_ray.config import save_config
    from mmctr_ray.features import FeatureMap
    from mmctr_ray.tuning import run_trial

    trial = tmp_path / "trials" / "t1"
    (trial / "checkpoint_epoch_001").mkdir(parents=True)
    cfg = load_config(None)
    save_config(cfg, trial / "config.yaml")
    rows = [{"epoch": e, "valid_auc": 0.6 + e / 100, "valid_auc_se": 0.01} for e in (1, 2)]
    (trial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmap = FeatureMap(num_items=5, tag_vocab=6, tags_per_item=2, vector_dim=4, num_users=0)
    save_checkpoint(trial / "checkpoint_epoch_001", torch.nn.Linear(3, 1), None,
                    TrainState(epoch=1, lr=1e-3, history=rows[:1]), cfg, fmap, {"item_vector": "given"})
    heard, runs = [], []
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(ray.tune, "report", lambda metrics, **_: heard.append(metrics["epoch"]))
    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback", lambda: None)
    monkeypatch.setattr(mmctr_ray.train_driver, "run_training",
                        lambda *a, **kw: runs.append((kw["resume"], kw["runs_per_node"], kw["verbose"])))
    settings = {"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1, "source": None}
    run_trial({}, SearchSpace(params=()), str(tmp_path), str(tmp_path / "data"), settings, sharing=3, verbose=True)
    assert heard == [1]  # epoch 2 is trained again (from epoch 1's checkpoint) and reported then
    assert runs == [(True, 3, True)]  # its CPU workers share their node's cores with the other trials there; and
    # `mmctr tune -v` shows the run's Ray Train and Ray Data lines, as `mmctr train -v` does


def test_a_finished_trials_replay_tells_tune_what_its_run_reported(tmp_path, monkeypatch):
    """A resumed search replays a finished trial's epochs: its best epoch so far is the earliest among equals, and NaN
    before a finite AUC, as the run reported them (the replay had its own loop: a mutation that kept the latest
    among equals passed, and it said -inf where the run had said NaN)."""
    import ray.tune

    from mmctr_ray.report import epoch_report
    from mmctr_ray.tuning import run_trial

    trial = tmp_path / "trials" / "t1"
    trial.mkdir(parents=True)
    rows = [{"epoch": 1, "valid_auc": math.nan, "worker_peak_rss_mib": [1.0]},
            *({"epoch": e, "valid_auc": 0.7, "valid_auc_se": 0.01 * e} for e in (2, 3))]
    (trial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (trial / "summary.json").write_text("{}")
    heard = []
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(ray.tune, "report", lambda metrics, **_: heard.append(metrics))
    settings = {"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1, "source": None}
    run_trial({}, SearchSpace(params=()), str(tmp_path), str(tmp_path / "data"), settings)
    assert [(m["epoch"], m["best_epoch"], m["best_valid_auc_se"]) for m in heard] == [(1, None, None), (2, 2, 0.02),
                                                                                      (3, 2, 0.02)]
    assert math.isnan(heard[0][METRIC]) and [m[METRIC] for m in heard[1:]] == [0.7, 0.7]
    assert heard[1:] == [epoch_report(r, rows) for r in rows[1:]] and "worker_peak_rss_mib" not in heard[0]


@pytest.mark.parametrize("verbose", [False, True])
def test_tune_v_reaches_every_trials_run(synth_dir, tmp_path, monkeypatch, verbose):
    """`mmctr tune -v` left each trial's run at the quiet level: Ray Train's lines (resources asked, worker group
    started) stayed hidden where a search that waits for its workers needs them most."""
    import ray
    import ray.tune

    import mmctr_ray.cli
    import mmctr_ray.tuning

    class Stop(Exception):
        pass

    def trainable_of(fn, **kwargs):  # where run_tuning builds the trial's function: its arguments, then stop
        raise Stop(kwargs)

    forwarded = {}
    monkeypatch.setattr(mmctr_ray.tuning, "run_tuning",
                        lambda *a, **kw: forwarded.update(kw) or dict.fromkeys(
                            ("trials", "completed", "early-stopped", "pruned", "error", "results"), 0))
    monkeypatch.setattr(mmctr_ray.tuning, "check_inputs", lambda *a, **k: None)
    monkeypatch.setattr(mmctr_ray.cli, "_start_ray", lambda *a, **k: None)
    mmctr_ray.cli.main(["tune", "--data", str(synth_dir), "--out", str(tmp_path / "t"), "--config", "c.yaml",
                        *(["-v"] if verbose else [])])
    assert forwarded["verbose"] is verbose
    monkeypatch.undo()

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(mmctr_ray.tuning, "_node_cpus", lambda: [4.0])
    monkeypatch.setattr(mmctr_ray.tuning, "shared_datasets", lambda *a, **k: {})
    monkeypatch.setattr(ray.tune, "with_parameters", trainable_of)
    with pytest.raises(Stop) as stop:
        mmctr_ray.tuning.run_tuning(synth_dir, tmp_path / "tune", ROOT / "configs/search_tiny.yaml",
                                    verbose=verbose)
    assert stop.value.args[0]["verbose"] is verbose


def test_asha_prunes_a_resumed_search_against_the_trials_before_the_kill(tmp_path, monkeypatch):
    """Tune restores the scheduler as it was created (empty rungs): the records come back from asha.json."""
    import pickle

    import mmctr_ray.asha
    from ray.tune.schedulers import TrialScheduler

    CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
    monkeypatch.setattr(mmctr_ray.asha, "records_path", None)
    space = SearchSpace(params=(), max_epochs=3, grace_period=1, reduction_factor=2)
    records = tmp_path / "asha.json"
    created = pickle.dumps(_scheduler(space, records))  # what Tuner pickles into tuner.pkl at the start
    before = pickle.loads(created)
    trials = [SimpleNamespace(trial_id=f"t{i}", config={}) for i in range(4)]
    for i, t in enumerate(trials):
        before.on_trial_add(None, t)
        assert before.on_trial_result(None, t, {"epoch": 1, METRIC: 0.80 + 0.01 * i}) == CONTINUE
    weak = SimpleNamespace(trial_id="weak", config={})
    before.on_trial_add(None, weak)
    assert before.on_trial_result(None, weak, {"epoch": 1, METRIC: 0.70}) == STOP
    # the driver dies before Tune saved the stop; --resume unpickles the scheduler of the start and re-adds the
    # unfinished trials, whose epoch 1 reaches it again
    after = pickle.loads(created)
    late, resumed = SimpleNamespace(trial_id="t4", config={}), trials[3]
    for t in (resumed, weak, late):
        after.on_trial_add(None, t)
    assert after.on_trial_result(None, resumed, {"epoch": 1, METRIC: 0.83}) == CONTINUE  # judged once
    assert after.on_trial_result(None, weak, {"epoch": 1, METRIC: 0.70}) == STOP  # the same decision again
    assert after.on_trial_result(None, late, {"epoch": 1, METRIC: 0.79}) == STOP  # below the cutoff
    fresh = pickle.loads(created)  # what the resumed search had before: no records, so no cutoff
    records.unlink()
    fresh.on_trial_add(None, late)
    assert fresh.on_trial_result(None, late, {"epoch": 1, METRIC: 0.79}) == CONTINUE
    saved = json.loads(records.read_text())
    assert {t for _, recorded in saved["brackets"][0] for t in recorded} == {"t4"}  # its own, written as it goes
    moved = tmp_path / "moved"
    moved.mkdir()
    monkeypatch.setattr(mmctr_ray.asha, "records_path", str(moved / "asha.json"))  # mmctr tune names the file
    (moved / "asha.json").write_text(json.dumps({"brackets": [[[1, {"a": 0.9, "b": 0.91}]]], "stopped": {}}))
    elsewhere = pickle.loads(created)  # reads the file mmctr tune names, not the pickled path
    elsewhere.on_trial_add(None, late)
    assert elsewhere.on_trial_result(None, late, {"epoch": 1, METRIC: 0.85}) == STOP  # below a and b only
    rungs = dict((m, rec) for m, rec in json.loads((moved / "asha.json").read_text())["brackets"][0])
    assert set(rungs[1]) == {"a", "b", "t4"}
    assert json.loads((moved / "asha.json").read_text())["stops_complete"]
    # records of a version that kept no list of stops: the stops after the resume are not all of them, so the
    # list is marked incomplete for results.csv (tune_report.asha_stopped), now and in every later save
    (moved / "asha.json").write_text(json.dumps({"brackets": [[[1, {"a": 0.9}]]]}))
    older = pickle.loads(created)
    older.on_trial_add(None, late)
    older.on_trial_result(None, late, {"epoch": 1, METRIC: 0.95})
    assert json.loads((moved / "asha.json").read_text())["stops_complete"] is False
    monkeypatch.setattr(mmctr_ray.asha, "records_path", str(tmp_path / "gone" / "asha.json"))
    unwritable = pickle.loads(created)
    unwritable.on_trial_add(None, late)
    assert unwritable.on_trial_result(None, late, {"epoch": 1, METRIC: 0.85}) == CONTINUE  # a warning, no crash


@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's "invalid value encountered", printed by Ray's cutoff
def test_asha_records_a_result_without_a_finite_auc_as_null_and_reads_it_back_as_the_lowest(tmp_path, monkeypatch,
                                                                                          strict_json):
    """A trial without a finite AUC reports NaN (a resumed search's replay said -inf until 2026-12-07): asha.json
    held the bare tokens (not JSON); it is null now, read back as -inf, the lowest value ASHA's cutoff counts (a
    None there would fail it)."""
    import pickle

    import mmctr_ray.asha

    monkeypatch.setattr(mmctr_ray.asha, "records_path", None)
    space = SearchSpace(params=(), max_epochs=3, grace_period=1, reduction_factor=2)
    records = tmp_path / "asha.json"
    created = pickle.dumps(_scheduler(space, records))
    before = pickle.loads(created)
    for trial_id, auc in (("good", 0.80), ("none", float("-inf"))):
        trial = SimpleNamespace(trial_id=trial_id, config={})
        before.on_trial_add(None, trial)
        before.on_trial_result(None, trial, {"epoch": 1, METRIC: auc})
    assert strict_json(records.read_text())["brackets"][0][-1] == [1, {"good": 0.80, "none": None}]
    after = pickle.loads(created)
    after._load()
    assert dict(after._brackets[0]._rungs)[1] == {"good": 0.80, "none": float("-inf")}
    for auc in (0.79, 0.81):  # a later trial: the resumed search decides as the one that was never stopped
        late = SimpleNamespace(trial_id=f"late{auc}", config={})
        decisions = []
        for scheduler in (before, after):
            scheduler.on_trial_add(None, late)
            decisions.append(scheduler.on_trial_result(None, late, {"epoch": 1, METRIC: auc}))
        assert decisions[0] == decisions[1], (auc, decisions)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_asha_cuts_as_ray_over_finite_values_and_counts_minus_inf_as_the_lowest():
    """Ray's cutoff interpolates with numpy, which over -inf gave NaN (and a RuntimeWarning on the console). The
    cutoff now is Ray's over finite values, and where a rung holds -inf its limit as the lowest value falls."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    from mmctr_ray.asha import ResumableASHA

    inf = float("-inf")
    for rf in (2, 3, 4):
        ours = ResumableASHA("unused.json", metric=METRIC, mode="max", time_attr="epoch", max_t=4,
                             grace_period=1, reduction_factor=rf)._brackets[0]
        rays = _Bracket(1, 4, rf, 0)
        for recorded in ([0.5, 0.6], [0.7, 0.55, 0.6, 0.71, 0.52], [0.6, float("nan"), 0.7], [0.61]):
            expected = rays.cutoff(dict(enumerate(recorded)))
            assert ours.cutoff(dict(enumerate(recorded))) == pytest.approx(expected, abs=0), (rf, recorded)
        assert ours.cutoff({}) is None and ours.cutoff({"a": float("nan")}) is None  # nothing to cut against
    median = ResumableASHA("unused.json", metric=METRIC, mode="max", time_attr="epoch", max_t=4, grace_period=1,
                           reduction_factor=2)._brackets[0]
    assert median.cutoff({"a": inf, "b": 0.6}) == inf  # between -inf and 0.6: what a falling 0.6 - x tends to
    assert median.cutoff({"a": inf, "b": inf, "c": 0.7}) == inf
    assert median.cutoff({"a": inf, "b": 0.55, "c": 0.6, "d": 0.7}) == pytest.approx(0.575)  # above the -inf: Ray's
    assert median.cutoff({"a": inf, "b": float("nan"), "c": 0.6, "d": 0.7}) == pytest.approx(0.6)


@pytest.mark.parametrize("workers, gpus, message", [
    (2, 0.5, "--gpus-per-trial 0.5 over 2 workers gives each 0.25 GPU: with 2+ DDP workers each needs whole GPUs"),
    (2, 3.0, "gives each 1.5 GPU"),
    (1, 1.5, "--gpus-per-trial 1.5: above 1 GPU a worker needs a whole number of GPUs"),
])
def test_gpu_shares_that_ray_or_nccl_would_refuse_are_one_line_errors(workers, gpus, message):
    with pytest.raises(ConfigError) as err:
        check_resources(workers, gpus)
    assert message in str(err.value)
    for ok in [(1, 0.25), (1, 1.0), (2, 2.0), (2, 0.0), (1, 2.0)]:
        check_resources(*ok)


def test_no_trial_starts_after_the_time_budget_and_the_study_is_not_asked(tmp_path):
    import time

    from ray.tune.search import Searcher

    from mmctr_ray.tuning import _searcher

    space = load_search(ROOT / "configs/search_tiny.yaml")
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    searcher = _searcher()(space=space.define_by_run, metric=METRIC, mode="max", seed=0, study_name="s",
                           storage=storage)
    searcher.deadline = time.time() + 3600
    assert "fusion.strategy" in searcher.suggest("a")  # within the budget: Optuna samples a trial
    searcher.deadline = time.time() - 1
    assert searcher.suggest("b") == Searcher.FINISHED
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 1  # no trial asked past the budget


def test_a_searchs_own_search_yaml_is_read_as_it_ran(tmp_path):
    """The checks of what trials can draw came after some searches began: `mmctr report TUNE` and `--resume` read
    TUNE/search.yaml without them (a new search is checked)."""
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "search": {"space": {"train.epochs": {"int": [2, 5]}}}}))
    with pytest.raises(ConfigError, match="every trial trains search.max_epochs epochs"):
        load_search(path)
    assert [p.key for p in load_search(path, strict=False).params] == ["train.epochs"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(resume=True, time_budget_s=60.0), "drop --num-samples, --max-concurrent and --time-budget-s"),
    (dict(time_budget_s=0.0), "--time-budget-s must be > 0, got 0"),
])
def test_a_time_budget_on_resume_or_not_above_zero_is_refused(tmp_path, kwargs, message):
    from mmctr_ray.tuning import check_inputs

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_inputs(tmp_path, ROOT / "configs/search_tiny.yaml", **kwargs)


def test_a_search_says_once_when_its_batch_sizes_do_not_split_over_a_trials_workers(synth_dir, caplog):
    from mmctr_ray.preflight import batch_split_note
    from mmctr_ray.tuning import check_inputs

    for workers, said in [(3, [batch_split_note(256, 3) + " (and 1 more of the space's batch sizes)"]), (2, [])]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="mmctr_ray.tuning"):
            check_inputs(synth_dir, ROOT / "configs/search_tiny.yaml", workers=workers)  # train.batch_size 256|512
        assert [r.getMessage() for r in caplog.records if "split evenly" in r.getMessage()] == said


def test_a_search_that_ended_before_its_first_trial_says_how_to_start_again(tmp_path):
    """A data error or Ctrl-C while the splits were read left settings.json without tune/: a rerun said "already
    holds a search; pass --resume", and --resume "nothing to resume (no settings.json and tune/ ...)"."""
    from mmctr_ray.tuning import _prepare

    out = tmp_path / "tune"
    settings = {"data": str(tmp_path / "data"), "overrides": []}
    _prepare(out, ROOT / "configs/search_tiny.yaml", settings, resume=False, overwrite=False)  # then it failed
    with pytest.raises(OutputExistsError, match=rf"^{re.escape(str(out))}: holds a search that ended before its "
                                                r"first trial \(settings.json but no tune/\); pass --overwrite"):
        _prepare(out, ROOT / "configs/search_tiny.yaml", settings, resume=False, overwrite=False)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(out))}: nothing to resume: the search ended before its "
                                          r"first trial .*; start it again with --overwrite$"):
        _prepare(out, None, settings, resume=True, overwrite=False)
    assert _prepare(out, ROOT / "configs/search_tiny.yaml", settings, resume=False, overwrite=True)["data"] == \
        settings["data"]
    (out / "tune").mkdir()  # a search that began: the usual answers
    with pytest.raises(OutputExistsError, match="already holds a search; pass --resume to continue it"):
        _prepare(out, ROOT / "configs/search_tiny.yaml", settings, resume=False, overwrite=False)


def test_a_trial_asha_stopped_is_pruned_in_the_study(tmp_path, monkeypatch):
    """OptunaSearch told a trial that ASHA stopped after epoch 1 COMPLETE with its epoch-1 AUC: optuna-dashboard
    called it complete, and the importances mixed 1-epoch AUCs with full-schedule ones. It is PRUNED now, with its
    last reported value as Optuna keeps for a pruned trial; a trial that ran to its end stays COMPLETE."""
    import optuna

    import mmctr_ray.asha
    from mmctr_ray.tuning import METRIC, _searcher

    space = load_search(ROOT / "configs/search_tiny.yaml")
    url = f"sqlite:///{tmp_path}/optuna.db"
    searcher = _searcher()(space=space.define_by_run, metric=METRIC, mode="max", seed=1, study_name="s",
                           storage=optuna.storages.RDBStorage(url))
    records = tmp_path / "asha.json"  # as ResumableASHA wrote it on the stop, before Tune ended the trial
    records.write_text(json.dumps({"brackets": [], "stopped": {"cut": 2.0}}))
    monkeypatch.setattr(mmctr_ray.asha, "records_path", str(records))
    for trial_id, epochs, stopped_at in (("cut", 2, 2), ("ran", 2, None)):
        assert searcher.suggest(trial_id)
        for epoch in range(1, epochs + 1):
            if epoch != stopped_at:  # Tune gives the searcher no result of the epoch the scheduler stops at
                searcher.on_trial_result(trial_id, {METRIC: 0.6 + epoch / 100, "training_iteration": epoch})
        searcher.on_trial_complete(trial_id, {METRIC: 0.6 + epochs / 100, "training_iteration": epochs})
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert [(t.state.name, t.value) for t in trials] == [("PRUNED", 0.62), ("COMPLETE", 0.62)]
    assert trials[0].intermediate_values == {1: 0.61, 2: 0.62}  # the stopping epoch's too
    from mmctr_ray.asha import ResumableASHA
    from ray.tune.schedulers import TrialScheduler

    records.unlink()  # a new search's scheduler writes the records the searcher reads, as it decides
    asha = ResumableASHA(tmp_path / "unused.json", metric=METRIC, mode="max", time_attr="epoch", max_t=2,
                         grace_period=1, reduction_factor=2, stop_last_trials=False)
    decisions = []
    for trial_id, auc in (("a", 0.7), ("b", 0.6)):  # b reaches the rung below a's cutoff: stopped
        trial = SimpleNamespace(trial_id=trial_id, config={}, evaluated_params={})
        asha.on_trial_add(None, trial)
        decisions.append(asha.on_trial_result(None, trial, {"epoch": 1, METRIC: auc}))
    assert decisions == [TrialScheduler.CONTINUE, TrialScheduler.STOP]
    assert mmctr_ray.asha.stops_recorded() == {"b": 1.0}  # where the searcher looks
    monkeypatch.setattr(mmctr_ray.asha, "records_path", None)
    assert mmctr_ray.asha.stops_recorded() == {}  # no search in this process


def test_an_empty_existing_out_folder_is_used_as_it_is(tmp_path):
    from mmctr_ray.tuning import _prepare

    out = tmp_path / "tune"
    out.mkdir()  # e.g. made by hand, or a mount point; before, mkdir raised FileExistsError
    settings = {"data": str(tmp_path / "data"), "overrides": []}
    saved = _prepare(out, ROOT / "configs/search_tiny.yaml", settings, resume=False, overwrite=False)
    assert saved == {**settings, "search_sha256": hashlib.sha256((out / "search.yaml").read_bytes()).hexdigest()}
    assert (out / "search.yaml").is_file() and json.loads((out / "settings.json").read_text()) == saved


def test_a_resume_refuses_an_edited_space(tmp_path):
    """A resumed search samples the space it began with (Tune restores its searcher): an edited TUNE/search.yaml
    changed only the base config of new trials and the results' columns, without a word."""
    from mmctr_ray.tuning import _prepare

    out = tmp_path / "tune"
    settings = {"data": str(tmp_path / "data"), "overrides": []}
    _prepare(out, ROOT / "configs/search_tiny.yaml", settings, resume=False, overwrite=False)
    (out / "tune").mkdir()  # the search began
    assert _prepare(out, None, settings, resume=True, overwrite=False)["data"] == settings["data"]
    text = (out / "search.yaml").read_text()
    (out / "search.yaml").write_text(text.replace("model.dropout: {float: [0.0, 0.3]}", "model.dropout: {float: "
                                                                                         "[0.0, 0.5]}"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(out / 'search.yaml'))}: changed since the search began; "
                                          r"a resumed search draws from the space it began with"):
        _prepare(out, None, settings, resume=True, overwrite=False)
    (out / "search.yaml").write_text(text)  # restored: it resumes
    assert _prepare(out, None, settings, resume=True, overwrite=False)["data"] == settings["data"]


def test_a_resume_that_cannot_go_on_is_said_before_ray_starts(synth_dir, tmp_path, monkeypatch, capsys):
    """`mmctr tune --resume` of an edited search.yaml, or with another --data, started Ray and read the splits, ~10 s
    on 2 cores, before it said so."""
    import mmctr_ray.cli as cli
    from mmctr_ray.tuning import _prepare

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(cli, "_start_ray", no_ray)
    out = tmp_path / "tune"
    _prepare(out, ROOT / "configs/search_tiny.yaml", {"data": str(Path(synth_dir).resolve()), "overrides": [],
                                                      "workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0,
                                                      "source": "shipped"}, resume=False, overwrite=False)
    (out / "tune").mkdir()  # the search began
    (out / "search.yaml").write_text((out / "search.yaml").read_text().replace("{float: [0.0, 0.3]}",
                                                                               "{float: [0.0, 0.5]}"))
    assert cli.main(["tune", "--data", str(synth_dir), "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mmctr tune: error: {out / 'search.yaml'}: changed since the search began; a resumed search draws from the "
        f"space it began with (Tune restores its sampler), so the edit would reach only the base config of its new "
        f"trials: restore the file, or start a new search from it (another --out)")
    (out / "search.yaml").write_bytes((ROOT / "configs/search_tiny.yaml").read_bytes())
    other = tmp_path / "other"
    shutil.copytree(synth_dir, other)
    assert cli.main(["tune", "--data", str(other), "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err.strip() == (f"mmctr tune: error: {out}: the search ran on "
                                               f"{Path(synth_dir).resolve()}; resume it with that --data")
    with pytest.raises(AssertionError, match="Ray started"):  # a resume that can go on gets as far as Ray
        cli.main(["tune", "--data", str(synth_dir), "--out", str(out), "--resume"])


def test_an_errored_trial_run_again_by_resume_reaches_the_study(tmp_path):
    """The study keeps an errored trial as FAIL and OptunaSearch dropped every result of its second run under the
    same trial id ("already finished"): TPE and the importances never saw it, though results.csv said completed."""
    import optuna

    from mmctr_ray.tuning import METRIC, _searcher

    from ray.tune.search import ConcurrencyLimiter

    from mmctr_ray.tuning import _Progress

    space = load_search(ROOT / "configs/search_tiny.yaml")
    (tmp_path / "trials").mkdir()
    for limited in (False, True):  # Tune wraps it in a ConcurrencyLimiter whenever max_concurrent_trials is set
        url = f"sqlite:///{tmp_path}/optuna-{limited}.db"
        searcher = _searcher()(space=space.define_by_run, metric=METRIC, mode="max", seed=1, study_name="s",
                               storage=optuna.storages.RDBStorage(url))
        tune_side = ConcurrencyLimiter(searcher, max_concurrent=2) if limited else searcher
        progress = _Progress(tmp_path, space.max_epochs)  # the driver's callback, as Tune calls it
        progress.setup(total_num_samples=2)
        assert tune_side.suggest("t1")
        tune_side.on_trial_complete("t1", error=True)  # the first run errored (the limiter forgets t1)
        progress.on_trial_error(0, [], SimpleNamespace(trial_id="t1", last_result={}, status="ERROR"))
        for epoch, auc in ((1, 0.61), (2, 0.64)):  # --resume runs it again under the same id
            tune_side.on_trial_result("t1", {METRIC: auc, "training_iteration": epoch})
        last = {METRIC: 0.64, "training_iteration": 2, "epoch": 2}
        tune_side.on_trial_complete("t1", last)  # dropped by the limiter: t1 is not live there any more
        trial = SimpleNamespace(trial_id="t1", last_result=last, status="TERMINATED")
        progress.on_trial_complete(0, [trial], trial)
        trials = optuna.load_study(study_name="s", storage=url).get_trials()
        assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"], limited  # once, by one path or the other
        assert trials[1].value == 0.64 and trials[1].intermediate_values == {1: 0.61, 2: 0.64}
        assert trials[1].params == trials[0].params and trials[1].user_attrs["retry_of_trial"] == 0
        # the driver stopped after the study took the retry and before Tune saved a searcher that knew it: --resume
        # runs t1 once more; the study keeps one copy (two counted its configuration twice in TPE and importances)
        for epoch, auc in ((1, 0.61), (2, 0.64)):
            searcher.on_trial_result("t1", {METRIC: auc, "training_iteration": epoch})
        searcher.on_trial_complete("t1", last)
        assert [t.state.name for t in optuna.load_study(study_name="s", storage=url).get_trials()] == [
            "FAIL", "COMPLETE"], limited
        assert tune_side.suggest("t2")  # a trial that did not fail before is told as OptunaSearch tells it
        tune_side.on_trial_complete("t2", {METRIC: 0.7})
        assert [t.state.name for t in optuna.load_study(study_name="s", storage=url).get_trials()] == [
            "FAIL", "COMPLETE", "COMPLETE"]


def test_a_trial_pruned_just_before_a_kill_is_pruned_again_on_resume_without_an_error(tmp_path, monkeypatch):
    """ASHA stopped a trial and the study recorded it PRUNED; the driver died before Tune saved its state, so the
    restored Tune still had it running. --resume replays its epochs and ASHA stops it again: the restored searcher's
    report of the stopping epoch to the finished study trial raised UpdateFinishedTrialError, which Tune took as
    the trial's error (results.csv "error"), and every later --resume ran it into the same error."""
    from ray import cloudpickle

    import mmctr_ray.asha
    from mmctr_ray.tuning import METRIC, _searcher

    space = load_search(ROOT / "configs/search_tiny.yaml")
    url = f"sqlite:///{tmp_path}/optuna.db"
    first = _searcher()(space=space.define_by_run, metric=METRIC, mode="max", seed=1, study_name="s",
                        storage=optuna.storages.RDBStorage(url))
    assert first.suggest("t1")
    first.on_trial_result("t1", {METRIC: 0.61, "training_iteration": 1})
    saved = cloudpickle.dumps(first)  # Tune's last saved state: t1 running
    records = tmp_path / "asha.json"
    records.write_text(json.dumps({"brackets": [], "stopped": {"t1": 2.0}}))
    monkeypatch.setattr(mmctr_ray.asha, "records_path", str(records))
    stopped = {METRIC: 0.62, "training_iteration": 2}  # Tune gives a searcher no result of the epoch ASHA stops at
    first.on_trial_complete("t1", stopped)  # ASHA stopped it at epoch 2; then the driver was killed
    restored = cloudpickle.loads(saved)
    restored.on_trial_complete("t1", stopped)  # --resume: the trial replays its epochs, ASHA stops it again
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert [(t.state.name, t.value) for t in trials] == [("PRUNED", 0.62)]


RESTORED_SEARCHER = """
import json, sys
from pathlib import Path
from types import SimpleNamespace

import logging

import optuna
from ray import cloudpickle

from mmctr_ray.tuning import METRIC, _Progress

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
tune_side = cloudpickle.loads(Path(sys.argv[1]).read_bytes())
progress = _Progress(Path(sys.argv[2]), 2)
progress.setup(total_num_samples=2)
final = float(sys.argv[4])
for epoch, auc in ((1, 0.61), (2, final)):
    tune_side.on_trial_result("t1", {METRIC: auc, "training_iteration": epoch})
last = {METRIC: final, "training_iteration": 2, "epoch": 2}
tune_side.on_trial_complete("t1", last)
trial = SimpleNamespace(trial_id="t1", last_result=last, status="TERMINATED")
progress.on_trial_complete(0, [trial], trial)
print(json.dumps([t.state.name for t in optuna.load_study(study_name="s", storage=sys.argv[3]).get_trials()]))
"""


@pytest.mark.parametrize("final, states, said", [
    ("0.64", ["FAIL", "COMPLETE"], "completed now; told to the study as a new trial with the same parameters "
                                   "(COMPLETE)"),
    ("nan", ["FAIL", "FAIL"], "ended without a finite AUC now; told to the study as a new trial with the same "
                              "parameters (FAIL)")])  # the log said "completed now" for the FAIL too
def test_a_retried_trial_reaches_the_study_from_a_searcher_that_resume_restored(tmp_path, final, states, said):
    """What --resume does: Tune pickles the searcher (in its ConcurrencyLimiter) in one driver and restores it in the
    next. The searcher's class is defined in a function, so cloudpickle saves it by value with a copy of the module
    globals it names: the retried trial's handover went into that copy, the progress callback read the module's
    own (empty) dict, and the study kept only the FAIL."""
    from ray import cloudpickle
    from ray.tune.search import ConcurrencyLimiter

    from mmctr_ray.tuning import METRIC, _searcher

    space = load_search(ROOT / "configs/search_tiny.yaml")
    (tmp_path / "trials").mkdir()
    url = f"sqlite:///{tmp_path}/optuna.db"
    tune_side = ConcurrencyLimiter(_searcher()(space=space.define_by_run, metric=METRIC, mode="max", seed=1,
                                               study_name="s", storage=optuna.storages.RDBStorage(url)),
                                   max_concurrent=2)
    assert tune_side.suggest("t1")
    tune_side.on_trial_complete("t1", error=True)
    (tmp_path / "searcher.pkl").write_bytes(cloudpickle.dumps(tune_side))  # the first driver's saved state
    resumed = subprocess.run([sys.executable, "-c", RESTORED_SEARCHER, str(tmp_path / "searcher.pkl"),
                              str(tmp_path), url, final], capture_output=True, text=True, timeout=120, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # a NaN: Optuna refused it, a ValueError out of Tune
    assert json.loads(resumed.stdout.splitlines()[-1]) == states
    assert f"mmctr_ray.tuning: trial t1: failed before the restart and {said}" in resumed.stderr


def test_a_resume_says_which_of_the_command_lines_settings_it_does_not_use(tmp_path, caplog):
    from mmctr_ray.tuning import _prepare

    out = tmp_path / "tune"
    started = {"data": "D", "overrides": [], "workers": 2, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0,
               "source": "shipped"}
    saved = _prepare(out, ROOT / "configs/search_tiny.yaml", started, resume=False, overwrite=False)
    (out / "tune").mkdir()
    with caplog.at_level("WARNING", logger="mmctr_ray.tuning"):
        assert _prepare(out, None, {**started, "workers": 3}, resume=True, overwrite=False) == saved
    assert "continues the search with the settings it started with (--workers-per-trial 2)" in caplog.text
    caplog.clear()
    _prepare(out, None, started, resume=True, overwrite=False)
    assert "settings it started with" not in caplog.text
    # README's `mmctr tune --data DATA --out TUNE --resume` gives none of them: the flags' defaults say nothing
    from mmctr_ray.cli import build_parser
    from mmctr_ray.tuning import RESUME_DEFAULTS

    args = build_parser().parse_args(["tune", "--data", "D", "--out", str(out), "--resume"])
    assert RESUME_DEFAULTS == {"workers": args.workers_per_trial, "cpus_per_worker": args.cpus_per_worker,
                               "gpus_per_worker": args.gpus_per_trial / args.workers_per_trial, "source": args.source}
    _prepare(out, None, {**started, **RESUME_DEFAULTS}, resume=True, overwrite=False)
    assert "settings it started with" not in caplog.text


def test_a_base_item_table_is_kept_unless_the_search_picks_the_strategy(tmp_path):
    from mmctr_ray.tuning import _trial_config

    raw = yaml.safe_load((ROOT / "configs/search_tiny.yaml").read_text())
    raw.setdefault("data", {})["item_vector"] = str(tmp_path / "my_fused.parquet")
    raw["fusion"] = {"strategy": "given"}  # a table fused by hand; only model settings searched
    strategy_searched = dict(raw["search"]["space"])
    raw["search"]["space"] = {"model.dropout": {"float": [0.0, 0.2]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    cfg = _trial_config(load_search(tmp_path / "s.yaml"), {"model.dropout": 0.1}, tmp_path, tmp_path, "shipped")
    assert cfg.data.item_vector == str(tmp_path / "my_fused.parquet")  # before: silently "given"
    assert "fusion.strategy" in strategy_searched
    raw["search"]["space"] = strategy_searched
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    cfg = _trial_config(load_search(tmp_path / "s.yaml"), {"fusion.strategy": "given"}, tmp_path, tmp_path, "shipped")
    assert cfg.data.item_vector == "given"  # a searched "given" is the shipped vector


def test_a_base_table_named_relative_is_the_one_beside_the_command_in_every_trial(synth_dir, tmp_path,
                                                                                  monkeypatch):
    """A search YAML naming its fused table relatively (`data.item_vector: fused/v3.parquet`, as `mmctr train
    --config` reads it, from the current directory) failed in every trial: Tune runs each in its own folder. The
    search now records the table's absolute path among its overrides (settings.json, so --resume reads it from
    anywhere); a table that is not there is one line before Ray starts."""
    import ray
    import ray.tune

    import mmctr_ray.tuning
    from mmctr_ray.tuning import _trial_config, check_inputs

    class Stop(Exception):
        pass

    raw = yaml.safe_load((ROOT / "configs/search_tiny.yaml").read_text())
    raw["data"]["item_vector"] = "fused/v3.parquet"
    raw["fusion"] = {"strategy": "v3", "dims": 16}
    raw["search"]["space"] = {"model.dropout": {"float": [0.0, 0.2]},  # a fusion key only some trials sample
                              "model.crossnet": {"choice": ["v1", "off"]},
                              "fusion.dims": {"choice": [8, 16], "when": {"model.crossnet": ["v1"]}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^fused/v3.parquet: missing file \(data.item_vector of s.yaml: the fused item "
                                        r"table its trials train on unless they sample a fusion.\* setting\)$"):
        check_inputs(synth_dir, "s.yaml")
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "v3.parquet").write_bytes(b"a table")
    check_inputs(synth_dir, "s.yaml")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(mmctr_ray.tuning, "_node_cpus", lambda: [4.0])
    monkeypatch.setattr(mmctr_ray.tuning, "shared_datasets", lambda *a, **k: {})
    monkeypatch.setattr(ray.tune, "with_parameters", lambda fn, **kw: (_ for _ in ()).throw(Stop(kw)))
    with pytest.raises(Stop) as stop:
        mmctr_ray.tuning.run_tuning(synth_dir, tmp_path / "tune", "s.yaml")
    trial = stop.value.args[0]
    table = str(tmp_path / "fused" / "v3.parquet")
    assert json.loads((tmp_path / "tune" / "settings.json").read_text())["overrides"] == [
        f'data.item_vector="{table}"']
    monkeypatch.chdir(tmp_path / "tune")  # where a trial runs, as far as the path goes
    cfg = _trial_config(trial["space"], {"model.dropout": 0.1, "model.crossnet": "off"}, tmp_path / "tune",
                        synth_dir, "shipped")
    assert cfg.data.item_vector == table

    raw["search"]["space"]["fusion.dims"].pop("when")  # every trial fuses its own: the base table is never read
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "fused" / "v3.parquet").unlink()
    monkeypatch.chdir(tmp_path)
    check_inputs(synth_dir, "s.yaml")


def test_a_pca_size_wider_than_the_raw_vectors_allow_is_refused_before_the_search(synth_dir, tmp_path):
    """A PCA part is at most min(items − 1, input width) wide: every draw above it (fusion.dims up to 1500 over v1's
    768-wide BERT text) was an errored trial, which TPE learns nothing from. The searched bound and the base's size a
    strategy uses unsampled are checked against the source's widths, before the search."""
    from mmctr_ray.tuning import check_inputs

    raw = yaml.safe_load((ROOT / "configs/search_tiny.yaml").read_text())
    raw["search"]["space"] = {"fusion.strategy": {"choice": ["given", "v1", "v4"]},
                              "fusion.dims": {"int": [8, 256], "when": {"fusion.strategy": ["v1"]}},
                              "fusion.text_dim": {"int": [8, 64], "when": {"fusion.strategy": ["v4"]}}}
    item_feature = synth_dir / "item_feature.parquet"
    search = tmp_path / "s.yaml"
    search.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"^search.space.fusion.dims: 256 is wider than the v1 text PCA can be: at "
                                          rf"most min\(items − 1, input width\) = min\(199, 768\) = 199 for the raw "
                                          rf"vectors of {re.escape(str(item_feature))}$"):
        check_inputs(synth_dir, search)
    raw["search"]["space"]["fusion.dims"]["int"] = [8, 199]
    raw["fusion"]["image_dim"] = 300  # v4's image part is not searched: every v4 trial takes the base's
    search.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"^fusion.image_dim: 300 is wider than the v4 image PCA can be: at most "
                                          r"min\(items − 1, input width\) = min\(199, 1024\) = 199 for the raw"):
        check_inputs(synth_dir, search)
    raw["fusion"]["image_dim"] = 199
    raw["fusion"]["dims"] = 900  # a size no trial uses unsampled (v1 always samples it): not checked
    search.write_text(yaml.safe_dump(raw))
    check_inputs(synth_dir, search)


def test_overwrite_restarts_a_search_from_its_own_space(tmp_path):
    """`mmctr tune --config TUNE/search.yaml --out TUNE --overwrite` emptied TUNE before it copied the file it had
    just removed: a FileNotFoundError traceback, the old search gone and no new one."""
    from mmctr_ray.tuning import _prepare

    out = tmp_path / "tune"
    settings = {"data": "D", "overrides": [], "workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0,
                "source": "shipped"}
    _prepare(out, ROOT / "configs/search_tiny.yaml", settings, resume=False, overwrite=False)
    (out / "tune").mkdir()
    (out / "trials").mkdir()
    again = _prepare(out, out / "search.yaml", settings, resume=False, overwrite=True)
    assert (out / "search.yaml").read_bytes() == (ROOT / "configs/search_tiny.yaml").read_bytes()
    assert not (out / "trials").exists() and again["search_sha256"]
    # a base table inside TUNE (a best.yaml's, in TUNE/pca_cache) would go with it: every trial then failed
    raw = yaml.safe_load((ROOT / "configs/search_tiny.yaml").read_text())
    raw["data"]["item_vector"] = str(out / "pca_cache" / "v3.parquet")
    raw["fusion"] = {"strategy": "v3", "dims": 16}
    raw["search"]["space"] = {"model.dropout": {"float": [0.0, 0.2]}}
    (tmp_path / "best.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"v3.parquet: the base config's fused table \(data.item_vector\) lies in "
                                          rf"{out}, which --overwrite empties first"):
        _prepare(out, tmp_path / "best.yaml", settings, resume=False, overwrite=True)
    assert (out / "search.yaml").is_file()  # refused before anything went


def test_a_folder_that_is_not_a_search_is_said_so_first_and_one_killed_before_its_settings_restarts(tmp_path):
    """_prepare (a library caller's, the pipeline's) said "already holds a search; pass --resume ... or --overwrite"
    of a folder of a user's files, and only with --overwrite that it was not a search; and a search killed between
    its search.yaml and settings.json was "already holds a search", "nothing to resume", then "not a search (no
    settings.json)" with --overwrite: no command started it again."""
    from mmctr_ray.tuning import _prepare

    settings = {"data": "D", "overrides": [], "workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0,
                "source": "shipped"}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=rf"^{re.escape(str(mine))}: not a search of `mmctr tune` \(it "
                                                    rf"holds notes.txt\); --out takes a new or empty folder"):
            _prepare(mine, ROOT / "configs/search_tiny.yaml", settings, resume=False, overwrite=overwrite)
        assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "search.yaml").write_text("an attempt's, before settings.json")
    with pytest.raises(OutputExistsError, match="already holds a search; pass --resume to continue it"):
        _prepare(killed, ROOT / "configs/search_tiny.yaml", settings, resume=False, overwrite=False)
    assert _prepare(killed, ROOT / "configs/search_tiny.yaml", settings, resume=False, overwrite=True)["data"] == "D"
    assert (killed / "search.yaml").read_bytes() == (ROOT / "configs/search_tiny.yaml").read_bytes()


@pytest.mark.parametrize("text, said", [
    ('{"data": "D", "over', r"not valid JSON \(Unterminated string.*\); expected the settings.json `mmctr tune` "
                           r"writes \(start the search again with --overwrite\)$"),
    ("[1]", r"holds a JSON list; expected the settings.json `mmctr tune` writes .*, a JSON object$"),
    ("{}", r"data is missing; expected the settings.json `mmctr tune` writes"),
    ('{"data": "D", "overrides": "train.lr=0.1"}', r"overrides is 'train.lr=0.1'; expected")])
def test_a_damaged_settings_json_is_one_line_for_resume_and_report(tmp_path, text, said):
    """A search's settings.json cut short, a list or without its keys: `tune --resume` and `report TUNE` ended in a
    JSONDecodeError, AttributeError or KeyError traceback."""
    from mmctr_ray.tuning import check_resumable, trial_cpus

    (tmp_path / "tune").mkdir()
    (tmp_path / "settings.json").write_text(text)
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'settings.json'))}: {said}"):
        check_resumable(tmp_path, "D")
    (tmp_path / "settings.json").write_text('{"data": "D", "overrides": [], "workers": true}')
    with pytest.raises(DataError, match=r"settings.json: workers is True; expected"):  # a KeyError, or True CPUs
        trial_cpus(tmp_path, True, 1, 1.0)


def test_a_fused_base_table_is_refitted_only_when_the_trial_samples_fusion(tmp_path, monkeypatch):
    """best.yaml reused as a search's base (fusion v3, its fused table) for a search of model settings: every
    trial refitted v3 from this search's --source (another source: other vectors than the base's), and on
    converted data with --source shipped each trial failed at its start, which the up-front check missed."""
    import mmctr_ray.pca_cache
    from mmctr_ray.tuning import _refuse_placeholders, _trial_config

    fits = []
    monkeypatch.setattr(mmctr_ray.pca_cache, "cached_fusion", lambda cache, data, fusion, source, seed, axes: (
        fits.append((fusion.strategy, fusion.dims, source)) or (tmp_path / "fit.parquet", True)))
    raw = yaml.safe_load((ROOT / "configs/search_tiny.yaml").read_text())
    raw["data"]["item_vector"] = str(tmp_path / "best_fused.parquet")
    raw["fusion"] = {"strategy": "v3", "dims": 16}
    for space, params, table in (({"model.dropout": {"float": [0.0, 0.2]}}, {"model.dropout": 0.1}, "best_fused"),
                                 ({"fusion.dims": {"int": [8, 32]}}, {"fusion.dims": 8}, "fit")):
        raw["search"]["space"] = space
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
        cfg = _trial_config(load_search(tmp_path / "s.yaml"), params, tmp_path, tmp_path, "raw.parquet")
        assert cfg.data.item_vector == str(tmp_path / f"{table}.parquet")
    assert fits == [("v3", 8, "raw.parquet")]  # the dims sampled: a fit; the model settings alone: none

    (tmp_path / "convert.json").write_text(json.dumps({"placeholder_embeddings": True}))
    _refuse_placeholders(tmp_path, load_search(tmp_path / "s.yaml"), "raw.parquet")  # fits from raw: fine
    with pytest.raises(ConfigError, match="which trials of fusion.strategy v3 with --source shipped"):
        _refuse_placeholders(tmp_path, load_search(tmp_path / "s.yaml"), "shipped")  # fits from the zeros
    raw["search"]["space"] = {"model.dropout": {"float": [0.0, 0.2]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    _refuse_placeholders(tmp_path, load_search(tmp_path / "s.yaml"), "shipped")  # the base table: no vector read


def test_a_pruned_trial_counts_the_epochs_asha_judged_not_one_its_run_ended_before_the_stop_reached_it(tmp_path):
    """Tune's stop reaches a trial's run a moment after ASHA's decision: an epoch that short (a small split, an epoch
    from the kept shard) ended and wrote its row first, and results.csv then called the trial pruned with that later
    epoch as its best, where the log, ASHA's records and the study had the epoch ASHA stopped it at."""
    from mmctr_ray.config import save_config
    from mmctr_ray.tune_report import write_outputs

    tdir = tmp_path / "tune"
    tdir.mkdir()
    (tdir / "search.yaml").write_text((ROOT / "configs/search_tiny.yaml").read_text())
    (tdir / "settings.json").write_text(json.dumps({"overrides": []}))
    aucs = {"won": [0.70, 0.72], "cut": [0.52, 0.54]}  # max_epochs 2; "cut" stopped at epoch 1, then ran epoch 2
    for trial, values in aucs.items():
        (tdir / "trials" / trial).mkdir(parents=True)
        (tdir / "trials" / f"{trial}.params.json").write_text(json.dumps({"train.lr": 1e-3}))
        save_config(load_config(ROOT / "configs/tiny.yaml"), tdir / "trials" / trial / "config.yaml")
        (tdir / "trials" / trial / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": e, "valid_auc": auc, "valid_auc_se": 0.02}) + "\n" for e, auc in enumerate(values, 1)))
    (tdir / "trials" / "won" / "summary.json").write_text("{}")
    (tdir / "asha.json").write_text(json.dumps({"brackets": [], "stopped": {"cut": 1.0}}))
    summary = write_outputs(tdir)
    assert summary["pruned"] == 1 and summary["completed"] == 1
    with open(tdir / "results.csv", newline="") as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert (rows["cut"]["status"], rows["cut"]["best_valid_auc"], rows["cut"]["best_epoch"], rows["cut"]["epochs"]) \
        == ("pruned", "0.52", "1", "1")
    assert (rows["won"]["best_valid_auc"], rows["won"]["epochs"]) == ("0.72", "2")  # a completed trial: every epoch
    # the stop reached the run after its last epoch, and it wrote its summary.json: still pruned at epoch 1 (it was
    # "completed" at 0.54, and with a better epoch 2 it would have been best.yaml's trial, against the study's PRUNED)
    (tdir / "trials" / "cut" / "summary.json").write_text("{}")
    (tdir / "trials" / "cut" / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "valid_auc": auc, "valid_auc_se": 0.02}) + "\n" for e, auc in [(1, 0.52), (2, 0.90)]))
    summary = write_outputs(tdir)
    assert summary["pruned"] == 1 and summary["completed"] == 1 and summary["best_trial"] == "won"
    with open(tdir / "results.csv", newline="") as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert (rows["cut"]["status"], rows["cut"]["best_valid_auc"], rows["cut"]["epochs"]) == ("pruned", "0.52", "1")


def test_report_keeps_a_failed_trials_error_status(tmp_path):
    """`mmctr report TUNE` rebuilds the tables without Tune's results: the errors and the trials the search saw
    come from tune_results.json (before, a trial that failed at epoch 1 was listed as pruned, and a folder Tune
    never knew, started just before a killed driver's last saved state, as pruned too)."""
    from mmctr_ray.config import save_config
    from mmctr_ray.tune_report import write_outputs

    tdir = tmp_path / "tune"
    (tdir / "trials" / "aaa").mkdir(parents=True)
    (tdir / "trials" / "bbb").mkdir()
    (tdir / "search.yaml").write_text((ROOT / "configs/search_tiny.yaml").read_text().replace(
        "max_epochs: 2", "max_epochs: 4"))  # trials of 4 epochs, a base of 2
    (tdir / "settings.json").write_text(json.dumps({"overrides": []}))
    space = load_search(tdir / "search.yaml")
    (tdir / "trials" / "ccc").mkdir()
    for trial in ("aaa", "bbb", "ccc"):
        (tdir / "trials" / f"{trial}.params.json").write_text(json.dumps({"train.lr": 1e-3}))
        save_config(load_config(ROOT / "configs/tiny.yaml"), tdir / "trials" / trial / "config.yaml")
        (tdir / "trials" / trial / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "valid_auc": 0.6}) + "\n")
    (tdir / "trials" / "aaa" / "summary.json").write_text("{}")
    errors = {"run_trial_bbb_00001": "RuntimeError: worker died"}
    known = ["run_trial_aaa_00000", "run_trial_bbb_00001"]
    assert write_outputs(tdir, space, errors, known)["error"] == 1
    assert load_config(tdir / "best.yaml").train.epochs == 4  # as many as the trials had (was the base's 2)
    again = write_outputs(tdir)  # as `mmctr report TUNE` calls it
    assert again["error"] == 1 and again["completed"] + again["early-stopped"] == 1 and again["interrupted"] == 1
    with open(tdir / "results.csv", newline="") as f:
        status = {r["trial_id"]: r["status"] for r in csv.DictReader(f)}
    assert status["bbb"] == "error" and status["ccc"] == "interrupted"
    # best.yaml is the best trial that ended (a diverged one's config diverges again under `mmctr train`); an
    # errored or interrupted one only where no trial ended with a result
    for trial, auc in (("bbb", 0.9), ("ccc", 0.95)):
        (tdir / "trials" / trial / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "valid_auc": auc}) + "\n")
    assert write_outputs(tdir)["best_trial"] == "aaa"
    (tdir / "trials" / "aaa" / "metrics.jsonl").unlink()
    assert write_outputs(tdir)["best_trial"] == "ccc"
    # a --resume drops that record until the resumed search ends: ccc, a trial it runs again, was "interrupted"
    # in a report made meanwhile
    from mmctr_ray.tuning import _prepare

    (tdir / "tune").mkdir()
    (tdir / "settings.json").write_text(json.dumps({"overrides": [], "data": "D"}))
    _prepare(tdir, None, {"overrides": [], "data": "D"}, resume=True, overwrite=False)
    assert json.loads((tdir / "tune_results.json").read_text())["resumed"] is True
    again = write_outputs(tdir)
    assert again["interrupted"] == 0 and again["error"] == 1  # the errors stay: the file may be all that has them
    # ... but not for a trial the resumed search ran again and that has returned since (it stayed "error", out of
    # best.yaml however good, until the resumed search ended)
    os.utime(tdir / "tune_results.json", (time.time() - 10, time.time() - 10))
    (tdir / "trials" / "bbb" / "summary.json").write_text("{}")
    again = write_outputs(tdir)
    with open(tdir / "results.csv", newline="") as f:
        status = {r["trial_id"]: r["status"] for r in csv.DictReader(f)}
    assert again["error"] == 0 and status["bbb"] == "early-stopped"  # 1 epoch of 4, returned: ranked again
    assert not list(tdir.glob(".*partial*")) and not list((tdir / "plots").glob(".*partial*"))


def test_an_ended_trial_is_one_line_with_the_best_so_far_and_the_time_left(tmp_path):
    def trial(trial_id, status, auc=None, epoch=None):
        return SimpleNamespace(trial_id=trial_id, status=status,
                               last_result={"best_valid_auc": auc, "epoch": epoch} if auc is not None else {})

    trials = [trial("a", "TERMINATED", 0.80, 3), trial("b", "RUNNING", 0.75, 1), trial("c", "RUNNING", 0.70, 2),
              trial("d", "PENDING")]
    line = progress_line(trials, trials[1], "pruned", total=8, elapsed=120.0, ended_here=2)
    assert line == ("trial b pruned: best valid AUC 0.7500 at epoch 1; best so far 0.8000 (a); 2/8 ended, "
                    "1 running; 2.0 min, ~6.0 min left")  # 6 trials left at 60 s per trial ended here
    assert progress_line(trials, trials[1], "pruned", 8, 120.0, 2, budget_left=90.0).endswith(
        "2.0 min, ~2.5 min left, new trials for 1.5 more min")  # --time-budget-s: the last start + one trial
    assert progress_line(trials, trials[1], "pruned", 8, 120.0, 2, budget_left=-3.0).endswith(
        "1 running; 2.0 min, time budget spent: no new trial starts")
    diverged = [trial("n", "TERMINATED", math.nan, 1), trial("m", "TERMINATED", -math.inf, 1), *trials]
    assert "; best so far 0.8000 (a); " in progress_line(diverged, trials[1], "pruned", 8, 120.0, 2)  # was: nan (n)
    failed = trial("e", "RUNNING")
    assert progress_line([failed], failed, "failed", 1, 5.0, 1).endswith("failed: no epoch; no result yet; 1/1 ended, "
                                                                          "0 running; 0.1 min, every trial ended")
    trials[0].last_result["best_valid_auc_se"] = 0.0123  # the best epoch's standard error, as training reports it
    assert progress_line(trials, trials[0], "completed", 8, 120.0, 2).startswith(
        "trial a completed: best valid AUC 0.8000 ± 0.0123 at epoch 3; best so far 0.8000 (a); ")
    trials[0].last_result["best_epoch"] = 2  # the best epoch before the last: named as the best (it named the last)
    assert progress_line(trials, trials[0], "completed", 8, 120.0, 2).startswith(
        "trial a completed: best valid AUC 0.8000 ± 0.0123 at epoch 2 of 3; best so far 0.8000 (a); ")
    # the item vectors the trial drew, where the search draws them (helper-134: only results.csv named them)
    for params, said in (({"fusion.strategy": "v4", "fusion.text_dim": 32, "fusion.image_dim": 16}, "(v4 32+16) "),
                         ({"fusion.strategy": "v1", "fusion.dims": 18, "train.lr": 0.01}, "(v1 18) "),
                         ({"fusion.strategy": "given"}, "(given) "), ({"fusion.dims": 64}, "(64) ")):
        trials[0].config = params
        assert progress_line(trials, trials[0], "completed", 8, 120.0, 2).startswith(f"trial a {said}completed: ")
    trials[0].config = {"train.lr": 0.01}
    assert progress_line(trials, trials[0], "completed", 8, 120.0, 2).startswith("trial a completed: ")
    run = tmp_path / "trials" / "t"
    run.mkdir(parents=True)
    assert [trial_outcome(run, 0, 3), trial_outcome(run, 1, 3)] == ["no result", "pruned"]  # records without stops
    # a trial with epochs and no summary: pruned if ASHA stopped it, else it runs (or ran when Ctrl-C came, and
    # --resume continues it); before, every such trial was called pruned
    assert asha_stopped(tmp_path, fifo=True) == {}  # no ASHA: nothing stopped
    assert asha_stopped(tmp_path) is None  # ASHA without records: a search older than them, stops unknown
    (tmp_path / "asha.json").write_text(json.dumps({"brackets": [], "stopped": {"u": 1.0}}))
    assert trial_outcome(run, 1, 3, asha_stopped(tmp_path)) == "running"
    (tmp_path / "asha.json").write_text(json.dumps({"brackets": [], "stopped": {"t": 1.0}}))
    assert trial_outcome(run, 1, 3, asha_stopped(tmp_path)) == "pruned"
    for unknown in ({"brackets": []},  # records of a version without the list
                    {"brackets": [], "stopped": {}, "stops_complete": False}):  # resumed from such records
        (tmp_path / "asha.json").write_text(json.dumps(unknown))
        assert asha_stopped(tmp_path) is None and trial_outcome(run, 1, 3, None) == "pruned"
    (tmp_path / "asha.json").write_text('{"brackets": [')  # cut short: stops unknown, no traceback
    assert asha_stopped(tmp_path) is None
    (run / "summary.json").write_text("{}")
    assert [trial_outcome(run, 2, 3), trial_outcome(run, 3, 3)] == ["early-stopped", "completed"]


def test_the_pca_cache_fits_a_key_once(synth_dir, tmp_path):
    cfg = FusionConfig("v4", text_dim=6, image_dim=5)
    table, fitted = cached_fusion(tmp_path, synth_dir, cfg)
    stamp = table.stat().st_mtime_ns
    again, refitted = cached_fusion(tmp_path, synth_dir, cfg)
    assert fitted and not refitted and again == table and table.stat().st_mtime_ns == stamp
    other, fitted_other = cached_fusion(tmp_path, synth_dir, FusionConfig("v4", text_dim=6, image_dim=7))
    assert fitted_other and other != table
    assert re.fullmatch(r"v1-d8-shipped-[0-9a-f]{10}", fusion_key(FusionConfig("v1", dims=8), synth_dir))


def test_vectors_rewritten_during_a_search_are_fitted_again(synth_dir, tmp_path):
    """The cache names a source by its file's size and modification time: a table of the old vectors is never
    served for new ones (a source replaced mid-search, or before its --resume)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("item_images"))
    cfg = FusionConfig("v1", dims=5)
    before, _ = cached_fusion(tmp_path / "cache", data, cfg)
    path = Layout(data).item_feature
    items = pq.read_table(path)
    i = items.schema.get_field_index("txt_emb_BERT")
    text = np.stack(items.column(i).to_numpy(zero_copy_only=False))
    rng = np.random.default_rng(0)
    new = text + 3.0 * rng.standard_normal(text.shape).astype(np.float32)  # other vectors, same shape
    pq.write_table(items.set_column(i, "txt_emb_BERT", pa.array(list(new), type=items.schema.field(i).type)), path)
    after, refitted = cached_fusion(tmp_path / "cache", data, cfg)
    assert refitted and after != before
    reference = tmp_path / "ref.parquet"
    run_fuse(data, reference, cfg, overwrite=True, progress=lambda m: None)

    def table(p):
        return np.stack(pq.read_table(p).column("item_emb").to_numpy(zero_copy_only=False))

    np.testing.assert_allclose(table(after), table(reference), atol=1e-4)
    assert np.abs(table(after) - table(before)).max() > 0.1


def test_every_size_of_a_strategy_is_sliced_from_one_exact_fit(synth_dir, tmp_path, monkeypatch):
    """The first trial of a strategy fits it at full width; other sizes take columns of that fit, equal to what
    `mmctr fuse` writes for them, and read the source no more."""
    import pyarrow.parquet as pq

    import mmctr_ray.fuse

    fits = []
    real = mmctr_ray.fuse.fit_fusion
    monkeypatch.setattr(mmctr_ray.fuse, "fit_fusion", lambda cfg, *a, **k: fits.append(cfg) or real(cfg, *a, **k))
    monkeypatch.setattr(mmctr_ray.fuse.ItemSource, "batches", _counted(mmctr_ray.fuse.ItemSource.batches, reads := []))

    def table(path):
        return np.stack(pq.read_table(path).column("item_emb").to_numpy(zero_copy_only=False))

    basis_reads = []
    for cfg in (FusionConfig("v4", text_dim=6, image_dim=5), FusionConfig("v4", text_dim=9, image_dim=3),
                FusionConfig("v1", dims=7), FusionConfig("v2", dims=4)):  # v2 is v4's image part; v1 its own
        path, wrote = cached_fusion(tmp_path / "cache", synth_dir, cfg)
        assert wrote
        n_fits, n_reads = len(fits), len(reads)
        basis_reads.append(n_reads)
        reference = run_fuse(synth_dir, tmp_path / "ref.parquet", cfg, overwrite=True, progress=lambda m: None)
        np.testing.assert_allclose(table(path), table(tmp_path / "ref.parquet"), atol=1e-4)
        summary = json.loads(path.with_name(path.stem + ".fusion.json").read_text())
        for key in ("strategy", "dim", "image_missing", "source_rows", "pca_fit"):
            assert summary[key] == reference[key], key
        widths = ("text_dim", "image_dim") if cfg.strategy == "v4" else ("dims",)  # the strategy's own only
        assert {k: v for k, v in summary.items() if k in ("dims", "text_dim", "image_dim")} == {
            k: v for k, v in reference.items() if k in ("dims", "text_dim", "image_dim")} == {
            k: getattr(cfg, k) for k in widths}
        assert summary["explained_variance_ratio"] == pytest.approx(reference["explained_variance_ratio"], abs=1e-5)
        del fits[n_fits:], reads[n_reads:]  # the reference's own fit and reads
    assert [f.strategy for f in fits] == ["v4", "v1"] and fits[0].text_dim > 9  # at full width, once each
    assert basis_reads[1] == basis_reads[0] > 0 and basis_reads[3] == basis_reads[2]  # sliced: no source read


def test_a_basis_cut_to_the_widest_searched_size_serves_every_size_up_to_it(synth_dir, tiny_spec, tmp_path,
                                                                            monkeypatch):
    """With ``axes`` (the search's widest size) the basis keeps that many axes of each part: sizes up to it are
    sliced from it and equal `mmctr fuse` of that size; a wider size (which no trial of the search asks for: a
    fallback) is fitted on its own, also equal to `mmctr fuse`; a full-width basis left by an older search serves
    every size."""
    import pyarrow.parquet as pq

    import mmctr_ray.fuse

    fits = []
    real = mmctr_ray.fuse.fit_fusion
    monkeypatch.setattr(mmctr_ray.fuse, "fit_fusion", lambda cfg, *a, **k: fits.append(cfg) or real(cfg, *a, **k))

    def table(path):
        return np.stack(pq.read_table(path).column("item_emb").to_numpy(zero_copy_only=False))

    cache = tmp_path / "cache"
    for cfg in (FusionConfig("v4", text_dim=6, image_dim=3), FusionConfig("v2", dims=8),
                FusionConfig("v4", text_dim=8, image_dim=8), FusionConfig("v4", text_dim=9, image_dim=2)):
        path, wrote = cached_fusion(cache, synth_dir, cfg, axes=8)
        assert wrote
        n_fits = len(fits)
        run_fuse(synth_dir, tmp_path / "ref.parquet", cfg, overwrite=True, progress=lambda m: None)
        np.testing.assert_allclose(table(path), table(tmp_path / "ref.parquet"), atol=1e-4)
        del fits[n_fits:]  # the reference's own fit
    # one basis of 8 + 8 axes for the first three sizes; text_dim 9 is over it: that size alone, at its width
    assert [(f.text_dim, f.image_dim) for f in fits] == [(8, 8), (9, 2)]
    [basis] = cache.glob("basis-v4-a8-*.npy")
    assert np.load(basis, mmap_mode="r").shape == (16, tiny_spec.items + 1)  # 8 + 8 axes × items and padding
    fits.clear()  # a narrower search on the same cache (another search's, copied in) reuses the wider basis
    path, wrote = cached_fusion(cache, synth_dir, FusionConfig("v4", text_dim=5, image_dim=4), axes=6)
    assert wrote and fits == [] and not list(cache.glob("basis-v4-a6-*"))
    # a full-width basis of an older search in the same cache is used instead of cutting a new one
    fits.clear()
    old = tmp_path / "old"
    cached_fusion(old, synth_dir, FusionConfig("v1", dims=4))
    path, _ = cached_fusion(old, synth_dir, FusionConfig("v1", dims=20), axes=8)
    assert len(fits) == 1 and not list(old.glob("basis-v1-a8-*")) and table(path).shape[1] == 20


def test_the_search_cache_keeps_as_many_axes_as_the_widest_size_the_space_can_sample(tmp_path):
    """The widest searched size, and a base size only where some trial uses it unsampled."""
    spec = {"fusion": {"strategy": "v4", "text_dim": 16, "image_dim": 16},
            "search": {"space": {"fusion.strategy": {"choice": ["v1", "v4"]},
                                 "fusion.dims": {"int": [8, 48], "when": {"fusion.strategy": ["v1"]}},
                                 "fusion.image_dim": {"choice": [8, 24]}}}}
    path = tmp_path / "s.yaml"

    def axes() -> int:
        path.write_text(yaml.safe_dump(spec))
        return load_search(path).fusion_axes()

    assert axes() == 48  # the base's fusion.dims (128 by default) is read by no trial: every v1 trial samples it
    spec["search"]["space"]["fusion.strategy"]["choice"].append("v3")
    assert axes() == 128  # v3 trials read the base's dims
    spec["fusion"]["text_dim"] = 200
    assert axes() == 200  # text_dim is not searched: v4 trials read the base's
    spec["search"]["space"]["fusion.strategy"]["choice"] = ["given", "v1"]
    assert axes() == 48  # no v4 or v3 trial: neither text_dim nor the base's dims is read
    spec["search"]["space"]["fusion.strategy"]["when"] = {"model.crossnet": ["v1"]}
    spec["search"]["space"] = {"model.crossnet": {"choice": ["off", "v1"]}, **spec["search"]["space"]}
    assert axes() == 200  # a conditional strategy: trials that do not sample it keep the base's v4
    assert load_search(ROOT / "configs/search_paper.yaml").fusion_axes() == 256


def _counted(method, calls: list):
    def wrapper(self, *args, **kwargs):
        calls.append(1)
        return method(self, *args, **kwargs)
    return wrapper


def _ask_cache(args):
    cache, data = args
    return cached_fusion(cache, data, FusionConfig("v3", dims=9))[1]


def test_concurrent_trials_asking_for_one_key_fit_it_once(synth_dir, tmp_path):
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        fitted = pool.map(_ask_cache, [(str(tmp_path), str(synth_dir))] * 3)
    assert sorted(fitted) == [False, False, True]


def run_tune(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mmctr_ray.cli", "tune", *args], capture_output=True, text=True,
                          timeout=540, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.mark.slow
def test_a_killed_search_resumes_without_losing_or_repeating_trials(synth_dir, tmp_path):
    search = tmp_path / "search.yaml"
    raw = yaml.safe_load((ROOT / "configs/search_tiny.yaml").read_text())
    raw["search"].update(num_samples=2, max_epochs=1)  # both at once: one ends, the other runs on
    search.write_text(yaml.safe_dump(raw))
    tune_dir = tmp_path / "tune"
    common = ["--data", str(synth_dir), "--out", str(tune_dir), "--num-cpus", "4"]
    first = run_tune(*common, "--config", str(search), env={FAULT_ENV: "1"})
    assert first.returncode == 75, first.stderr[-3000:]
    ended = (r"trial \w+ \((given|v[123] \d+|v4 \d+\+\d+)\) (completed|early-stopped|pruned): best valid AUC "
             r"0\.\d{4} ± 0\.\d{4} at epoch 1; "
             r"best so far 0\.\d{4} \(\w+\); ")
    assert re.search(ended + r"1/2 ended", first.stderr), first.stderr[-3000:]  # progress, one line a trial
    for table in ("Configuration for experiment", "View detailed results", "tensorboard --logdir"):  # Tune's own
        assert table not in first.stdout + first.stderr  # console output (verbose=0 or not): the lines above say it
    assert "A new study created" not in first.stderr  # Optuna's own line, with -v only
    assert "maximum expected startup concurrency" not in first.stdout + first.stderr  # the raylet's, on 2 cores
    assert (tune_dir / "optuna.db").is_file() and (tune_dir / "tune").is_dir()
    # the trials that ended before the kill (summary.json written); the other one may have written its epoch's row
    # without its checkpoint (a slower machine reaches that window): it trains that epoch again, as it should
    before = {p.parent.name: p.stat().st_mtime_ns for p in (tune_dir / "trials").glob("*/metrics.jsonl")
              if (p.parent / "summary.json").is_file()}
    assert before, "at least one trial ended before the driver died"

    # 3 trials fit in 4 CPUs; the search has 2: its 2 at a time share the cores, and the resumed part keeps that
    assert json.loads((tune_dir / "settings.json").read_text())["concurrency"] == 2

    second = run_tune(*common, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(its own trial count and concurrency, 2 at a time)" in second.stderr
    study = optuna.load_study(study_name="mmctr", storage=f"sqlite:///{tune_dir}/optuna.db")
    assert not study.get_trials(states=[optuna.trial.TrialState.RUNNING])  # none left running in the dashboard
    assert re.search(ended + r"2/2 ended, 0 running", second.stderr), second.stderr[-3000:]
    assert re.search(r"2 trials \(\d completed, \d early-stopped, \d pruned, 0 errors\); best valid AUC 0\.\d{4} ± "
                     r"0\.\d{4} \(trial \w+\); .*; train the best with the full schedule: " + re.escape(
                         f"`mmctr train --data {synth_dir} --out RUN --config {tune_dir}/best.yaml`"), second.stderr)
    with open(tune_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and len({r["trial_id"] for r in rows}) == 2, "every trial once: none lost, none repeated"
    assert all(r["status"] in ("completed", "early-stopped", "pruned") and r["best_valid_auc"] for r in rows)
    after = {p.parent.name: p.stat().st_mtime_ns for p in (tune_dir / "trials").glob("*/metrics.jsonl")}
    assert all(after[t] == stamp for t, stamp in before.items()), "trials ended before the kill are not retrained"
    for trial in (tune_dir / "trials").glob("*/metrics.jsonl"):  # and a retrained epoch replaces its row
        assert [row["epoch"] for row in read_metrics(trial.parent)] == [1], trial
    study = optuna.load_study(study_name="mmctr", storage=f"sqlite:///{tune_dir}/optuna.db")
    assert len(study.trials) == 2
    for name in ("auc_by_trial.png", "param_importance.png", "auc_vs_pca.png"):
        assert (tune_dir / "plots" / name).read_bytes()[:4] == b"\x89PNG"

    assert all(float(r["valid_auc_se"]) > 0 for r in rows)  # each best AUC with its standard error

    best = yaml.safe_load((tune_dir / "best.yaml").read_text())
    best_row = max(rows, key=lambda r: float(r["best_valid_auc"]))
    assert best["fusion"]["strategy"] == best_row["fusion.strategy"] and best["train"]["epochs"] == 2
    moved = tmp_path / "moved"  # the search's folder moves (or is mounted elsewhere): configs name tables by path
    shutil.move(tune_dir, moved)
    report = subprocess.run([sys.executable, "-m", "mmctr_ray.cli", "report", str(moved), "--top", "2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert report.returncode == 0 and f"| 1 | {best_row['trial_id']} |" in report.stdout
    assert f"train it with the full schedule: `mmctr train --data {synth_dir} --out RUN --config {moved}/best.yaml`" \
        in report.stdout
    # best.yaml is what `mmctr train --config` reads: the best trial's own config at the full schedule, its table
    # in the moved cache, inputs that check out; each trial's checkpoint scores the validation split at the AUC
    # the search reported, its table found in the moved cache too
    best_cfg = load_config(moved / "best.yaml")
    trial = moved / "trials" / best_row["trial_id"]
    assert best_cfg == in_this_search(load_config(trial / "config.yaml", ["train.epochs=2"]), moved)
    assert best_cfg.data.item_vector == "given" or best_cfg.data.item_vector.startswith(f"{moved}/pca_cache/")
    _, fmap = check_inputs(synth_dir, best_cfg)
    assert load_checkpoint(best_checkpoint(trial), with_optimizer=False).fmap == fmap
    fused = [r for r in rows if r["fusion.strategy"] != "given"]
    assert fused, "the seeded sampler drew a fused table for at least one of the 2 trials"
    valid = Layout(synth_dir).split("valid")
    labels = pq.read_table(valid, columns=["label"]).column("label").to_numpy()
    for row in {r["trial_id"]: r for r in (best_row, fused[0])}.values():
        model = load_model(best_checkpoint(moved / "trials" / row["trial_id"]), synth_dir)
        logits = score_parquet(model, valid, model.experiment_cfg.data.max_len, logits=True)
        assert roc_auc_score(labels, logits) == pytest.approx(float(row["best_valid_auc"]), abs=1e-5)


def test_ctrl_c_during_a_search_is_told_apart_from_its_end():
    """`Tuner.fit()` returns after Ctrl-C as it does after the last trial (it saves the search's state first), and
    `mmctr tune` then closed the running trials in the study as failed, so their results were lost on --resume
    ("Cannot tell a FAIL trial"), and it exited 0. `_CtrlC` tells the two apart by what Tune's own SIGINT handler
    does on the first Ctrl-C: it puts back the handler it found. This pins that behaviour of Tune's handler."""
    import signal

    from ray.tune import tune as tune_module

    from mmctr_ray.tuning import _CtrlC

    before, usr1 = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    try:
        watch = _CtrlC()
        tune_module._setup_signal_catching()  # what Tuner.fit() installs for the search
        assert not watch.pressed()  # the search ended by itself
        assert signal.getsignal(signal.SIGINT) is before
        watch = _CtrlC()
        stop = tune_module._setup_signal_catching()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: Tune's handler takes it (else the marker's KeyboardInterrupt)
        assert stop.is_set() and watch.pressed()
        assert signal.getsignal(signal.SIGINT) is before
        from mmctr_ray.tuning import _no_tuner_restore_hint  # Tune's own advice after Ctrl-C, not a way for mmctr

        assert tune_module.logger.name == "ray.tune.tune"  # the logger run_tuning filters
        record = lambda msg: logging.LogRecord("ray.tune.tune", logging.WARNING, "", 0, msg, (), None)  # noqa: E731
        assert not _no_tuner_restore_hint(record("Experiment has been interrupted, but the most recent state was "
                                                 "saved.\nResume experiment with: Tuner.restore(path=...)"))
        assert _no_tuner_restore_hint(record("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run."))
        # Tune's result table warned, after Ctrl-C and again on --resume, of a trial stopped before its first epoch
        # ("Failed to fetch metrics for 1 trial(s): ... FileNotFoundError"): results.csv counts it (helper-132)
        from ray.tune.analysis import experiment_analysis

        from mmctr_ray.tuning import ANALYSIS_LOGGER, _no_missing_metrics

        assert experiment_analysis.logger.name == ANALYSIS_LOGGER
        assert not _no_missing_metrics(record("Failed to fetch metrics for 1 trial(s):\n- run_trial_e09fcc4e: "
                                              "FileNotFoundError('...')"))
        assert _no_missing_metrics(record("Could not find best trial. Did you pass the correct `metric` parameter?"))
        assert _no_missing_metrics(record("Failed to fetch metrics for 2 trial(s):\n- run_trial_1: FileNotFoundError("
                                          "'...')\n- run_trial_2: JSONDecodeError('Expecting value')"))  # damaged: kept
    finally:
        signal.signal(signal.SIGINT, before)
        signal.signal(signal.SIGUSR1, usr1)


def test_a_resumed_search_replays_its_trials_epochs_to_optuna_without_warnings(monkeypatch):
    """On --resume the trials a search had started replay their epochs (run_trial), and Optuna warned for each
    intermediate value already in the study, and for each trial the study had already closed ("Cannot tell a
    COMPLETE trial"), though the study keeps its first, same result. A lost result ("FAIL") still shows."""
    import warnings

    from ray.tune.search.optuna import optuna_search

    from mmctr_ray.tuning import OPTUNA_SEARCH_LOGGER, _quiet_replay

    assert optuna_search.logger.name == OPTUNA_SEARCH_LOGGER  # the logger _quiet_replay filters
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.report(0.7, step=1)
    log, said = logging.getLogger(OPTUNA_SEARCH_LOGGER), []

    class Said(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    monkeypatch.setattr(log, "handlers", [Said()])  # what the logger passes on, past its filters
    monkeypatch.setattr(log, "propagate", False)
    monkeypatch.setattr(log, "level", logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _quiet_replay():
            trial.report(0.7, step=1)  # the replayed epoch
            log.warning("Cannot tell a COMPLETE trial.")
            log.warning("Cannot tell a PRUNED trial.")
            log.warning("Cannot tell a FAIL trial.")
        assert not [w for w in caught if "already reported" in str(w.message)]
        assert said == ["Cannot tell a FAIL trial."]
        trial.report(0.7, step=1)  # outside a search, Optuna's warning is as it was
        log.warning("Cannot tell a COMPLETE trial.")
    assert [str(w.message) for w in caught] == ["The reported value is ignored because this `step=1` is already "
                                                "reported."]
    assert said == ["Cannot tell a FAIL trial.", "Cannot tell a COMPLETE trial."]


def test_after_ctrl_c_the_running_trials_stay_running_for_resume(tmp_path):
    """What run_tuning does once Tuner.fit() returned: after Ctrl-C the trial still running keeps its RUNNING
    study trial (--resume continues it and tells the study its result; closing it as failed lost that result),
    results.csv calls it running, not pruned, and Interrupted says what ended. After a search that ended, a study
    trial still RUNNING is an orphan and is closed."""
    from mmctr_ray.errors import Interrupted
    from mmctr_ray.tuning import STUDY_NAME, end_of_search

    space = load_search(ROOT / "configs/search_tiny.yaml")
    trials = tmp_path / "trials"
    for trial_id, epochs, done in (("a", 2, True), ("b", 1, False)):  # a ended; b ran one epoch of two
        (trials / trial_id).mkdir(parents=True)
        (trials / f"{trial_id}.params.json").write_text("{}")
        shutil.copy(ROOT / "configs/tiny.yaml", trials / trial_id / "config.yaml")
        (trials / trial_id / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": e, "valid_auc": 0.7 + e / 100, "valid_auc_se": 0.01}) + "\n"
            for e in range(1, epochs + 1)))
        if done:
            (trials / trial_id / "summary.json").write_text("{}")
    (tmp_path / "asha.json").write_text(json.dumps({"brackets": [], "stopped": {}}))
    study = optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize")
    study.tell(study.ask(), 0.72)
    study.ask()  # b's, running
    results = [SimpleNamespace(path=str(trials / t), error=None) for t in ("a", "b")]
    with pytest.raises(Interrupted, match=rf"^1 trial ended \({tmp_path}/results.csv and best.yaml hold them so "
                                          r"far\), 1 started and not ended \(--resume continues them\)$"):
        end_of_search(tmp_path, space, results, interrupted=True)
    states = lambda: [t.state.name for t in optuna.load_study(  # noqa: E731
        study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path}/optuna.db").trials]
    assert states() == ["COMPLETE", "RUNNING"]
    with open(tmp_path / "results.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["completed", "running"]
    end_of_search(tmp_path, space, results, interrupted=False)  # the search ended: a RUNNING study trial is an orphan
    assert states() == ["COMPLETE", "FAIL"]


def test_a_budget_spent_before_the_first_trial_says_so(tmp_path):
    """A --time-budget-s shorter than Ray's start and the reading of the splits: no trial started, and the search
    ended with "TUNE/trials: no trial has started yet", which did not say why."""
    from mmctr_ray.tuning import STUDY_NAME, end_of_search

    space = load_search(ROOT / "configs/search_tiny.yaml")
    optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path}/optuna.db")
    (tmp_path / "settings.json").write_text(json.dumps({"overrides": [], "deadline": 1.0}))
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: the time budget ran out before the first trial started "):
        end_of_search(tmp_path, space, [], interrupted=False)
    ran = [SimpleNamespace(path=str(tmp_path / "tune" / "run_trial_a"), error=RuntimeError("no such module"))]
    with pytest.raises(DataError, match="no trial has started yet"):  # trials ran (and failed early): not the budget
        end_of_search(tmp_path, space, ran, interrupted=False)
    (tmp_path / "settings.json").write_text(json.dumps({"overrides": []}))  # no budget: not the reason
    with pytest.raises(DataError, match="no trial has started yet"):
        end_of_search(tmp_path, space, [], interrupted=False)


def test_a_failed_trials_line_says_what_failed():
    """tune_results.json kept the first line of Tune's error: Ray's "ray::ImplicitFunc.train() (pid=...)" header;
    and an error without a message ended the search in an IndexError after every trial had run."""
    from ray.exceptions import RayTaskError

    from mmctr_ray.tuning import trial_error_line

    remote = RuntimeError("ray::ImplicitFunc.train() (pid=7, ip=127.0.0.1)\n  File \"x.py\", line 1\n"
                          "mmctr_ray.errors.ConfigError: model.num_heads=3: expected a divisor of 16")
    assert trial_error_line(remote) == "ConfigError: model.num_heads=3: expected a divisor of 16"
    wrapped = RayTaskError("train", "ray::ImplicitFunc.train() (pid=7)\n  File ...", MemoryError("out of memory"))
    assert str(wrapped).splitlines()[0].startswith("ray::ImplicitFunc.train()")  # what the line was
    assert trial_error_line(wrapped) == "MemoryError: out of memory"
    assert trial_error_line(RuntimeError("")) == "RuntimeError"


def test_a_trial_that_diverged_is_not_trained_again_when_the_search_resumes(tmp_path, monkeypatch):
    """--resume retries errored trials from their checkpoint, at the same lr: it would diverge again."""
    import ray.tune

    from mmctr_ray.tuning import run_trial

    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    trial = tmp_path / "trials" / "t1"
    trial.mkdir(parents=True)
    (trial / "diverged.txt").write_text("training diverged: train loss nan in epoch 2 (lr 0.003); ...\n")
    with pytest.raises(ConfigError, match=r"t1: training diverged: train loss nan in epoch 2 \(lr 0.003\)"):
        run_trial({}, load_search(ROOT / "configs/search_tiny.yaml"), str(tmp_path), str(tmp_path / "data"), {})


def test_an_interrupted_trial_resumes_on_its_own_config_and_table(tmp_path, monkeypatch):
    """Its checkpoints learnt the table it started with: a cache key changed since (vectors rewritten before the
    --resume) gives new trials new fits, but this one continues as it started instead of failing the resume check."""
    import ray.tune
    import ray.tune.integration.ray_train

    import mmctr_ray.train_driver
    import mmctr_ray.tuning
    from mmctr_ray.config import save_config

    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(ray.tune, "report", lambda metrics: None)
    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback", lambda: None)
    trial = tmp_path / "trials" / "t1"
    (trial / "checkpoint_epoch_001").mkdir(parents=True)
    started = load_config(ROOT / "configs/tiny.yaml", ["data.item_vector=/old/cache/v4-t8-i8-shipped-0.parquet"])
    save_config(started, trial / "config.yaml")

    def rebuilt(*args):
        raise AssertionError("an interrupted trial's config is not rebuilt from the search")

    seen = {}
    monkeypatch.setattr(mmctr_ray.tuning, "_trial_config", rebuilt)
    monkeypatch.setattr(mmctr_ray.train_driver, "run_training", lambda data, run, cfg, **kw: seen.update(cfg=cfg, **kw))
    settings = {"source": "shipped", "workers": 1, "gpus_per_worker": 0.0, "cpus_per_worker": 1.0}
    mmctr_ray.tuning.run_trial({}, load_search(ROOT / "configs/search_tiny.yaml"), str(tmp_path),
                               str(tmp_path / "data"), settings)
    assert seen["cfg"] == started and seen["resume"] is True


def test_a_runs_table_is_taken_where_the_run_is_now_even_where_the_old_one_is_still_there(tmp_path):
    """`mv OUT OUT.bak`, the pipeline run again into OUT, then `predict --run OUT.bak/run`: the old path named the new
    OUT's table ("rewritten since ... was trained on it") though OUT.bak's own was beside the run. Likewise for a
    search's trial and its cache."""
    from mmctr_ray.tune_report import table_of_run

    old, moved = tmp_path / "OUT", tmp_path / "OUT.bak"
    for out in (old, moved):
        (out / "run").mkdir(parents=True)
        (out / "item_emb.parquet").write_bytes(b"a table")
    assert table_of_run(str(old / "item_emb.parquet"), moved / "run") == str(moved / "item_emb.parquet")
    assert table_of_run(str(old / "other.parquet"), moved / "run") == str(old / "other.parquet")  # not a pipeline's
    assert table_of_run("given", moved / "run") == "given"
    for tune in (tmp_path / "T", tmp_path / "T.copy"):
        (tune / "trials" / "t1").mkdir(parents=True)
        (tune / "settings.json").write_text("{}")
        (tune / "pca_cache").mkdir()
        (tune / "pca_cache" / "v3-16.parquet").write_bytes(b"a table")
    assert table_of_run(str(tmp_path / "T" / "pca_cache" / "v3-16.parquet"), tmp_path / "T.copy" / "trials" / "t1") \
        == str((tmp_path / "T.copy" / "pca_cache" / "v3-16.parquet").resolve())


def test_a_moved_search_finds_its_tables_in_its_own_cache(tmp_path, monkeypatch):
    """Trial configs name their fused table by absolute path: after TUNE moved (or is mounted elsewhere), an
    interrupted trial resumes on the table of that name in this TUNE's cache, and best.yaml names that one."""
    import ray.tune
    import ray.tune.integration.ray_train

    import mmctr_ray.train_driver
    import mmctr_ray.tuning
    from mmctr_ray.config import save_config
    from mmctr_ray.tune_report import write_outputs

    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(ray.tune, "report", lambda metrics: None)
    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback", lambda: None)
    tune_dir = tmp_path / "moved"
    trial = tune_dir / "trials" / "t1"
    (trial / "checkpoint_epoch_001").mkdir(parents=True)
    name = "v4-t8-i8-shipped-0123456789.parquet"
    (tune_dir / "pca_cache").mkdir()
    (tune_dir / "pca_cache" / name).write_bytes(b"")
    started = load_config(ROOT / "configs/tiny.yaml", [f"data.item_vector={tmp_path / 'tune' / 'pca_cache' / name}"])
    save_config(started, trial / "config.yaml")
    seen = {}
    monkeypatch.setattr(mmctr_ray.train_driver, "run_training", lambda data, run, cfg, **kw: seen.update(cfg=cfg, **kw))
    settings = {"source": "shipped", "workers": 1, "gpus_per_worker": 0.0, "cpus_per_worker": 1.0}
    space = load_search(ROOT / "configs/search_tiny.yaml")
    mmctr_ray.tuning.run_trial({}, space, str(tune_dir), str(tmp_path / "data"), settings)
    here = str((tune_dir / "pca_cache" / name).resolve())
    assert seen["cfg"].data.item_vector == here and seen["resume"] is True
    assert seen["cfg"].model == started.model and seen["cfg"].fusion == started.fusion
    assert load_config(trial / "config.yaml") == seen["cfg"]  # the run's resume check compares against this file

    (trial / "config.yaml").write_text((trial / "config.yaml").read_text().replace(here, started.data.item_vector))
    (trial / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "valid_auc": 0.7}) + "\n")
    (tune_dir / "trials" / "t1.params.json").write_text("{}")
    (tune_dir / "settings.json").write_text(json.dumps({"overrides": []}))
    (tune_dir / "search.yaml").write_text((ROOT / "configs/search_tiny.yaml").read_text())
    monkeypatch.setattr("mmctr_ray.tune_report._plots", lambda *args: [])
    write_outputs(tune_dir, space)
    assert load_config(tune_dir / "best.yaml").data.item_vector == here
    old = Path(started.data.item_vector)  # a table still where the config says: the search's own comes first (a
    old.parent.mkdir(parents=True)  # search copied elsewhere, and the old one run again, has other tables there)
    old.write_bytes(b"")
    assert in_this_search(load_config(trial / "config.yaml"), tune_dir).data.item_vector == here
    old.unlink()

    # best.yaml written before the move (no `mmctr report` since): `mmctr train --config TUNE/best.yaml` said "item
    # vector file not found" of the old path; the CLI's config takes the table of that name in this TUNE's cache
    from mmctr_ray.cli import _config

    (tune_dir / "best.yaml").write_text((tune_dir / "best.yaml").read_text().replace(here, str(old)))
    assert load_config(tune_dir / "best.yaml").data.item_vector == str(old)
    args = SimpleNamespace(config=str(tune_dir / "best.yaml"), overrides=["train.epochs=2"])
    assert _config(args).data.item_vector == here and _config(args).train.epochs == 2
    save_config(load_config(tune_dir / "best.yaml"), tmp_path / "elsewhere.yaml")  # a config outside a search
    assert _config(SimpleNamespace(config=str(tmp_path / "elsewhere.yaml"), overrides=[])).data.item_vector == \
        str(old)  # left as it is: train then names the missing file


def test_a_restored_search_opens_the_study_in_its_own_folder(tmp_path, monkeypatch):
    """Tune pickles the searcher with its Optuna storage, which reconnects to the URL it was pickled with: a moved
    TUNE reopened the old optuna.db ("unable to open database file")."""
    import pickle
    import shutil

    import mmctr_ray.study
    from mmctr_ray.study import StudyStorage, sqlite_url

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    study = optuna.create_study(study_name="mmctr", storage=StudyStorage(sqlite_url(old)))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    pickled = pickle.dumps(study)
    shutil.move(old, new)
    monkeypatch.setattr(mmctr_ray.study, "url", sqlite_url(new))
    restored = pickle.loads(pickled)
    assert len(restored.trials) == 2 and not old.exists()
    restored.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    assert len(optuna.load_study(study_name="mmctr", storage=sqlite_url(new)).trials) == 3


def test_a_restored_progress_callback_reads_this_searchs_trials(tmp_path, monkeypatch, caplog):
    """Tune restores its callbacks from its pickled state, with the TUNE path of the search's start: after a move the
    progress line called every finished trial of the resumed search pruned (no summary.json at the old path)."""
    import cloudpickle

    import mmctr_ray.tuning as tuning

    restored = cloudpickle.loads(cloudpickle.dumps(tuning._Progress(tmp_path / "old", max_epochs=2)))
    new = tmp_path / "new"
    (new / "trials" / "t1").mkdir(parents=True)
    (new / "trials" / "t1" / "summary.json").write_text("{}")
    monkeypatch.setattr(tuning, "tune_dir_now", str(new))
    restored.setup(total_num_samples=1)
    trial = SimpleNamespace(trial_id="t1", last_result={"epoch": 2, METRIC: 0.8}, status="TERMINATED")
    with caplog.at_level("INFO", logger="mmctr_ray.tuning"):
        restored.on_trial_complete(0, [trial], trial)
    assert "trial t1 completed: best valid AUC 0.8000 at epoch 2" in caplog.text


def test_set_reaches_the_search_sections_own_keys(tmp_path):
    """`tune --set search.max_epochs=1` was refused with "unknown config key search", for a file with a search:."""
    space = load_search(ROOT / "configs/search_tiny.yaml", ["search.max_epochs=1", "search.grace_period=1",
                                                            "search.num_samples=3", "train.lr=0.01"])
    assert (space.max_epochs, space.num_samples, space.base["train"]["lr"]) == (1, 3, 0.01)
    assert space.startup_trials == 10  # Optuna's TPE default: a search of 10 trials or fewer is a random search
    assert load_search(ROOT / "configs/search_tiny.yaml", ["search.startup_trials=2"]).startup_trials == 2
    # a mistake of --set is said to be one, with the key it resembles (it blamed the file and listed every key,
    # or named no one)
    with pytest.raises(ConfigError,
                       match=r"^--set: unknown key search.num_sample \(did you mean search.num_samples\?\)$"):
        load_search(ROOT / "configs/search_tiny.yaml", ["search.num_sample=3"])
    with pytest.raises(ConfigError,
                       match=r"^--set: unknown config key model.dnn_unit \(did you mean model.dnn_units\?"):
        load_search(ROOT / "configs/search_tiny.yaml", ["model.dnn_unit=[8]"])
    for sets, message in ((["search.max_epochs=0"], "search.max_epochs=0: expected a positive integer"),
                          (["search.seed=-1"], "search.seed=-1: expected a non-negative integer"),  # 0 is one
                          (["search.startup_trials=0"], "search.startup_trials=0: expected a positive integer"),
                          (["search.grace_period=99"], "search.grace_period=99: expected at most search.max_epochs=2"),
                          (["search.reduction_factor=1"], "search.reduction_factor=1: expected at least 2"),
                          # a valid base that makes a value the file's space draws invalid: --set's mistake too
                          (["train.min_lr=0.002", "train.lr=0.002"],
                           "search.space.train.lr: the value 0.001 gives no valid config")):
        with pytest.raises(ConfigError, match=rf"^--set: {re.escape(message)}"):
            load_search(ROOT / "configs/search_tiny.yaml", sets)
    raw = yaml.safe_load((ROOT / "configs/search_tiny.yaml").read_text())  # the file's own mistakes stay the file's
    raw["search"]["max_epoch"], raw["model"]["dnn_unit"] = 2, [8]
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: unknown key search.max_epoch \(did you mean "
                                          r"search.max_epochs\?\)$"):
        load_search(bad)
    del raw["search"]["max_epoch"]
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: unknown config key model.dnn_unit"):
        load_search(bad, ["train.lr=0.01"])
    del raw["model"]["dnn_unit"]
    raw["search"]["reduction_factor"], raw["search"]["grace_period"] = 1, 3
    bad.write_text(yaml.safe_dump(raw))
    for sets, message in ((["train.lr=0.01"], "search.reduction_factor=1: expected at least 2"),
                          (["search.reduction_factor=2", "search.max_epochs=2"],
                           "search.grace_period=3: expected at most search.max_epochs=2")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: {re.escape(message)}"):
            load_search(bad, sets)
    with pytest.raises(ConfigError, match=r"^--set search.space.model.dropout=1: the search space is set in the YAML"):
        load_search(ROOT / "configs/search_tiny.yaml", ["search.space.model.dropout=1"])


def test_a_trial_whose_workers_come_after_the_time_budget_ends_without_a_result(tmp_path, monkeypatch):
    """A trial's function takes no CPU, so on a cluster every trial up to --max-concurrent starts at once and its
    workers wait there for resources: those that came after the time budget trained after it, to their end (a
    2-CPU head, --max-concurrent 3, --time-budget-s 40: all 3 trained, the last from 39 s after the deadline). The
    trial hands the deadline to its run, whose workers end at their start (NotStarted) unless the trial began in
    time before a restart; the trial then ends without a result."""
    import ray.tune
    import ray.tune.integration.ray_train

    import mmctr_ray.train_driver
    import mmctr_ray.tuning
    from mmctr_ray.errors import NotStarted
    from mmctr_ray.training import BEGAN
    from mmctr_ray.tuning import run_trial

    starts, heard = [], []

    def late(*args, **kwargs):
        starts.append(kwargs["start_by"])
        raise NotStarted("not started: its workers were up 9 s after the search's time budget ended")

    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(ray.tune, "report", lambda metrics, **_: heard.append(metrics))
    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback", lambda: None)
    monkeypatch.setattr(mmctr_ray.tuning, "_trial_config", lambda *a: load_config(None))
    monkeypatch.setattr(mmctr_ray.train_driver, "run_training", late)
    settings = {"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1, "source": "shipped", "deadline": 100.0}
    run_trial({}, SearchSpace(params=()), str(tmp_path), str(tmp_path / "data"), settings)  # returns: no error
    assert starts == [100.0] and heard == []
    (tmp_path / "trials" / "t1").mkdir(parents=True, exist_ok=True)
    (tmp_path / "trials" / "t1" / BEGAN).write_text("99.0\n")  # it began in time, then the search was stopped
    run_trial({}, SearchSpace(params=()), str(tmp_path), str(tmp_path / "data"), settings)
    assert starts[-1] == math.inf  # a resumed search's unfinished trial trains on (from its first epoch)
    run_trial({}, SearchSpace(params=()), str(tmp_path), str(tmp_path / "data"), {**settings, "deadline": None})
    assert starts[-1] is None and heard == []  # no budget


def test_a_trial_that_did_not_start_is_a_failed_trial_of_the_study_that_says_why(tmp_path, monkeypatch):
    """OptunaSearch tells a trial that reported nothing PRUNED without a value, which TPE ranks below every trial
    that ran: a configuration the budget left untried would count as a bad one."""
    import mmctr_ray.tuning
    from mmctr_ray.errors import NotStarted
    from mmctr_ray.tuning import _searcher

    space = load_search(ROOT / "configs/search_tiny.yaml")
    url = f"sqlite:///{tmp_path}/optuna.db"
    searcher = _searcher()(space=space.define_by_run, metric=METRIC, mode="max", seed=0, study_name="s",
                           storage=optuna.storages.RDBStorage(url))
    monkeypatch.setattr(mmctr_ray.tuning, "tune_dir_now", str(tmp_path))
    assert searcher.suggest("late") and searcher.suggest("quiet")
    (tmp_path / "trials" / "late").mkdir(parents=True)
    why = "not started: its workers were up 9 s after the search's time budget ended (at 12:00:00)"
    (tmp_path / "trials" / "late" / NotStarted.FILE).write_text(why + "\n")
    for trial_id in ("late", "quiet"):  # what Tune hands over for a trial function that reported nothing
        searcher.on_trial_complete(trial_id, {"trial_id": trial_id, "done": True})
    late, quiet = optuna.load_study(study_name="s", storage=url).get_trials()
    assert late.state.name == "FAIL" and late.user_attrs["not_started"] == why
    assert quiet.state.name == "PRUNED" and "not_started" not in quiet.user_attrs  # as OptunaSearch tells it


def test_trials_that_did_not_start_are_listed_and_counted_as_such(tmp_path):
    from mmctr_ray.config import save_config
    from mmctr_ray.errors import NotStarted
    from mmctr_ray.tune_report import trial_counts, write_outputs
    from mmctr_ray.tuning import STUDY_NAME, end_of_search

    tdir = tmp_path / "tune"
    (tdir / "search.yaml").parent.mkdir()
    optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{tdir}/optuna.db")
    (tdir / "search.yaml").write_text((ROOT / "configs/search_tiny.yaml").read_text())
    (tdir / "settings.json").write_text(json.dumps({"overrides": [], "deadline": 1.0}))
    space = load_search(tdir / "search.yaml")
    for trial in ("aaa", "bbb"):
        (tdir / "trials" / trial).mkdir(parents=True)
        (tdir / "trials" / f"{trial}.params.json").write_text(json.dumps({"train.lr": 1e-3}))
        save_config(load_config(ROOT / "configs/tiny.yaml"), tdir / "trials" / trial / "config.yaml")
    (tdir / "trials" / "bbb" / NotStarted.FILE).write_text("not started: its workers were up 3 s after ...\n")
    known = [SimpleNamespace(path=f"/x/run_trial_{t}_0000{n}", error=None) for n, t in enumerate(("aaa", "bbb"))]
    # no trial began: the search says why, as when the budget ended before Ray had started (not a table of none)
    (tdir / "trials" / "aaa" / NotStarted.FILE).write_text("not started: its workers were up 1 s after ...\n")
    with pytest.raises(ConfigError, match=rf"^{tdir}: the time budget ran out before the first trial started "):
        end_of_search(tdir, space, known, interrupted=False)
    (tdir / "trials" / "aaa" / NotStarted.FILE).unlink()
    (tdir / "trials" / "aaa" / "metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "valid_auc": 0.6 + e / 100}) + "\n" for e in (1, 2)))
    (tdir / "trials" / "aaa" / "summary.json").write_text("{}")
    summary = end_of_search(tdir, space, known, interrupted=False)
    with open(tdir / "results.csv", newline="") as f:
        status = {r["trial_id"]: (r["status"], r["best_valid_auc"]) for r in csv.DictReader(f)}
    assert status == {"aaa": ("completed", "0.62"), "bbb": ("not started", "")}
    assert summary["not started"] == 1 and summary["best_trial"] == "aaa"
    assert trial_counts(summary) == "2 trials (1 completed, 0 early-stopped, 0 pruned, 0 errors, 1 not started)"
    assert write_outputs(tdir)["not started"] == 1  # `mmctr report TUNE`, from the folders alone


def test_a_search_checks_the_id_tables_its_trials_can_build_at_the_widest_embedding_they_can_draw(tmp_path,
                                                                                                   monkeypatch):
    """The tables' cost was given at the base config's embedding_dim, and a base use_user_id=true counted even
    where every trial draws it false."""
    import mmctr_ray.features
    from mmctr_ray.tuning import _check_id_tables, batch_sizes

    checked = []
    monkeypatch.setattr(mmctr_ray.features, "check_data_id_tables", lambda data, *flags: checked.append(flags))

    def search(space, **model):
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({"model": model, "search": {"space": space}}))
        return load_search(tmp_path / "s.yaml")

    _check_id_tables("D", search({"model.embedding_dim": {"choice": [16, 128]}}))
    assert checked[-1] == (True, False, 128)  # use_tags, use_user_id (the defaults: on, off), the widest dim
    attention = {"model.attention": {"choice": ["din", "multihead"]}}
    _check_id_tables("D", search({**attention, "model.embedding_dim": {"choice": [4, 8],
                                                                        "when": {"model.attention": ["din"]}}}))
    assert checked[-1] == (True, False, 64)  # a multihead trial keeps the base's 64
    _check_id_tables("D", search({"model.use_user_id": {"choice": [False]}}, use_user_id=True))
    assert checked[-1] == (True, False, 64)  # every trial draws it off
    _check_id_tables("D", search({"model.use_user_id": {"choice": [False, True]}, "model.use_tags": {
        "choice": [False], "when": {"model.use_user_id": [True]}}}))
    assert checked[-1] == (True, True, 64)  # a trial that draws use_user_id=false keeps the base's tags
    assert sorted(batch_sizes(search({"train.batch_size": {"choice": [256, 1024]}}))) == [256, 1024]
    assert sorted(batch_sizes(search({**attention, "train.batch_size": {
        "choice": [256], "when": {"model.attention": ["din"]}}}))) == [256, load_config(None).train.batch_size]


def test_the_search_cache_knows_a_source_rewritten_at_its_size_and_records_a_tables_own_widths(synth_dir, tmp_path):
    """A source rewritten in place at the same byte count (another embed) gets new fits (a mutation that dropped the
    modification time from the key passed), and a table cut from a wider basis records only its own widths (v2 of
    v4's basis said text_dim and image_dim too)."""
    from mmctr_ray.fuse import read_fusion_summary
    from mmctr_ray.pca_cache import _source_key

    source = tmp_path / "raw.parquet"
    source.write_bytes(b"x" * 100)
    before = _source_key(synth_dir, str(source))
    source.write_bytes(b"y" * 100)
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _source_key(synth_dir, str(source)) != before
    table, _ = cached_fusion(tmp_path / "cache", synth_dir, FusionConfig("v2", dims=4), axes=8)
    summary = read_fusion_summary(str(table))
    assert summary["dims"] == 4 and "text_dim" not in summary and "image_dim" not in summary


def test_search_space_conditions_ranges_and_log_scales_reach_the_trials(tmp_path):
    """A parameter of two conditions is sampled when both hold (not either), the top of a small int range is checked
    at load (num_heads 3 of a 3-wide vector passed, and its trials failed), and an int range's log scale reaches
    Optuna: each was a surviving mutation."""
    from mmctr_ray.search_space import Param

    p = Param("model.cross_layers", "int", (1, 4), when=(("model.crossnet", ("v2",)), ("model.senet", (True,))))
    assert p.active({"model.crossnet": "v2", "model.senet": True})
    assert not p.active({"model.crossnet": "v2", "model.senet": False})
    path = tmp_path / "s.yaml"
    path.write_text("model:\n  attention: multihead\nsearch:\n  space:\n    model.num_heads: {int: [1, 3]}\n")
    with pytest.raises(ConfigError, match="num_heads"):
        load_search(path)

    class Trial:
        def suggest_int(self, name, low, high, log=False, step=1):
            self.log = log
            return low

    trial = Trial()
    Param("train.batch_size", "int", (64, 4096), log=True).suggest(trial)
    assert trial.log is True


# what a hand mutation audit of the search (helper-126, 76 mutants) found untested: each test fails on its mutant
def _epoch(e: int, auc: float) -> dict:
    return {"epoch": e, "valid_auc": auc, "valid_logloss": 0.5, "train_loss": 0.5, "lr": 1e-3, "epoch_seconds": 1.0}


def _search(tmp_path: Path, trials: dict[str, tuple[list[str], list[float]]], settings: dict | None = None,
            ended: bool = True) -> Path:
    """A search folder of the tiny search: each trial ``id: (config overrides, its epochs' AUCs)``, started in the
    order given; ``ended``: each run wrote its summary.json."""
    from mmctr_ray.config import load_config, save_config
    from mmctr_ray.tune_report import STARTED

    tdir = tmp_path / "tune"
    (tdir / "trials").mkdir(parents=True)
    (tdir / "search.yaml").write_text((ROOT / "configs/search_tiny.yaml").read_text())
    (tdir / "settings.json").write_text(json.dumps({"overrides": [], **(settings or {})}))
    for n, (trial, (overrides, aucs)) in enumerate(trials.items()):
        run = tdir / "trials" / trial
        run.mkdir()
        (tdir / "trials" / f"{trial}.params.json").write_text(json.dumps({"train.lr": 1e-3, STARTED: 1000.0 + n}))
        save_config(load_config(ROOT / "configs/tiny.yaml", overrides), run / "config.yaml")
        (run / "metrics.jsonl").write_text("".join(json.dumps(_epoch(e, a)) + "\n" for e, a in enumerate(aucs, 1)))
        if ended:
            (run / "summary.json").write_text("{}")
    return tdir


def _results(tdir: Path) -> dict[str, dict[str, str]]:
    with open(tdir / "results.csv", newline="") as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


def test_results_give_each_strategys_item_vector_width(tmp_path):
    """results.csv's pca_width (the x axis of auc_vs_pca.png): the shipped 128 for given, text + image for v4, dims
    for v1..v3."""
    from mmctr_ray.tune_report import write_outputs

    tdir = _search(tmp_path, {"g": (["fusion.strategy=given"], [0.7, 0.7]),
                              "v4": (["fusion.strategy=v4", "fusion.text_dim=16", "fusion.image_dim=8"], [0.7, 0.7]),
                              "v1": (["fusion.strategy=v1", "fusion.dims=12"], [0.7, 0.7])})
    write_outputs(tdir)
    widths = {trial: (r["strategy"], r["pca_width"]) for trial, r in _results(tdir).items()}
    assert widths == {"g": ("given", "128"), "v4": ("v4", "24"), "v1": ("v1", "12")}


def test_best_yaml_keeps_the_base_configs_longer_schedule(tmp_path):
    """best.yaml trains the full schedule: the base config's train.epochs where it is above search.max_epochs (the
    trials stopped at max_epochs), not max_epochs."""
    from mmctr_ray.config import load_config
    from mmctr_ray.tune_report import write_outputs

    tdir = _search(tmp_path, {"a": ([], [0.7, 0.72])}, settings={"overrides": ["train.epochs=7"]})
    summary = write_outputs(tdir)
    assert summary["best_trial"] == "a"
    assert load_config(tdir / "best.yaml").train.epochs == 7  # search_tiny's max_epochs is 2


def test_report_top_lists_the_n_best_trials_best_first(tmp_path):
    """`mmctr report TUNE --top N`: the N trials of the highest best AUC, ranked from the best."""
    from mmctr_ray.tune_report import top_trials

    tdir = _search(tmp_path, {"low": ([], [0.6, 0.61]), "high": ([], [0.8, 0.79]), "mid": ([], [0.7, 0.71])})
    table = top_trials(tdir, n=2)
    ranks = [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| ") and "rank" not in line]
    assert ranks == [["| 1", "high"], ["| 2", "mid"]]
    assert "low" not in table


def test_the_trial_count_line_names_the_running_trials(tmp_path):
    """A report of a search still running says how many of its trials run."""
    from mmctr_ray.tune_report import trial_counts, write_outputs

    tdir = _search(tmp_path, {"done": ([], [0.7, 0.71]), "busy": ([], [0.7])}, ended=False)
    (tdir / "trials" / "done" / "summary.json").write_text("{}")
    (tdir / "asha.json").write_text(json.dumps({"brackets": [], "stopped": {}, "stops_complete": True}))
    summary = write_outputs(tdir)
    assert summary["running"] == 1
    assert trial_counts(summary) == "2 trials (1 completed, 0 early-stopped, 0 pruned, 0 errors, 1 running)"


def test_the_train_best_command_names_the_searchs_data(tmp_path):
    """The command the report suggests trains on the search's own data folder (settings.json), DATA without one."""
    from mmctr_ray.tune_report import train_best_command

    (tmp_path / "settings.json").write_text(json.dumps({"data": "/srv/my data"}))
    assert train_best_command(tmp_path) == f"mmctr train --data '/srv/my data' --out RUN --config {tmp_path}/best.yaml"
    assert train_best_command(tmp_path / "none").split()[3] == "DATA"


def test_a_table_outside_a_search_cache_is_kept_even_where_the_cache_has_one_of_its_name(tmp_path):
    """Only a table of a search's cache (a folder named pca_cache) is looked for in this search's cache: a base
    config's own table of the same file name is another table."""
    from mmctr_ray.tune_report import CACHE_DIR, table_here

    tdir = tmp_path / "tune"
    (tdir / CACHE_DIR).mkdir(parents=True)
    (tdir / CACHE_DIR / "item_emb.parquet").write_bytes(b"x")
    own = tmp_path / "mine" / "item_emb.parquet"
    assert table_here(str(own), tdir) == str(own)
    moved = f"/old/tune/{CACHE_DIR}/item_emb.parquet"  # a cached table of the search before it moved: found here
    assert table_here(moved, tdir) == str((tdir / CACHE_DIR / "item_emb.parquet").resolve())


def test_a_resumed_trial_keeps_the_start_time_that_orders_the_results(tmp_path, monkeypatch):
    """A trial's params.json (its parameters and when it first started: the results' trial order) is written once:
    the trial run again by --resume keeps it as it was."""
    from types import SimpleNamespace

    import ray.tune
    import ray.tune.integration.ray_train

    import mmctr_ray.train_driver
    from mmctr_ray.config import load_config, save_config
    from mmctr_ray.search_space import load_search
    from mmctr_ray.tune_report import STARTED
    from mmctr_ray.tuning import run_trial

    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(ray.tune, "report", lambda metrics: None)
    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback", lambda: None)
    monkeypatch.setattr(mmctr_ray.train_driver, "run_training", lambda *a, **kw: None)
    trial = tmp_path / "trials" / "t1"
    (trial / "checkpoint_epoch_001").mkdir(parents=True)
    save_config(load_config(ROOT / "configs/tiny.yaml"), trial / "config.yaml")
    params = tmp_path / "trials" / "t1.params.json"
    kept = json.dumps({"train.lr": 0.002, STARTED: 1000.5})
    params.write_text(kept)
    settings = {"source": "shipped", "workers": 1, "gpus_per_worker": 0.0, "cpus_per_worker": 1.0}
    run_trial({"train.lr": 0.002}, load_search(ROOT / "configs/search_tiny.yaml"), str(tmp_path),
              str(tmp_path / "data"), settings)
    assert params.read_text() == kept


def _space(tmp_path: Path, space: str, **search) -> Path:
    """search_tiny.yaml with its search section's space replaced by ``space`` (and other ``search`` keys set)."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs/search_tiny.yaml").read_text())
    raw["search"] = {**raw["search"], "space": yaml.safe_load(space), **search}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_search_whose_largest_batch_exceeds_the_training_split_is_refused_before_ray(synth_dir, tmp_path):
    """check_inputs checks the largest batch a trial can draw against the training split (3,000 rows here), the
    smallest against model.batch_norm's two rows per worker."""
    from mmctr_ray.errors import ConfigError
    from mmctr_ray.tuning import check_inputs

    big = _space(tmp_path, "{train.batch_size: {choice: [256, 4096]}}")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(big))}: train.batch_size=4,096 exceeds the 3,000 rows "
                                          r"of the training split.* \(the largest train.batch_size a trial of this "
                                          r"search can have, from its base config or search.space\)$"):
        check_inputs(synth_dir, big)
    small = _space(tmp_path, "{train.batch_size: {choice: [3, 256]}}")
    with pytest.raises(ConfigError, match=r"train.batch_size=3 over 2 workers gives each worker a batch of 1 row.* "
                                          r"\(the smallest train.batch_size a trial"):
        check_inputs(synth_dir, small, workers=2)


def test_a_searched_item_table_that_does_not_exist_is_refused_before_ray(synth_dir, tmp_path):
    """A choice of data.item_vector naming a missing table passed every check; each trial that drew it failed."""
    from mmctr_ray.tuning import check_inputs

    space = _space(tmp_path, "{data.item_vector: {choice: [given, %s]}}" % (tmp_path / "nope.parquet"))
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'nope.parquet'))}: missing file \(a value of "
                                        r"search.space.data.item_vector in .*: a fused item table, or given\)$"):
        check_inputs(synth_dir, space)


def test_a_searched_item_table_that_a_drawn_fusion_key_would_replace_is_refused(tmp_path):
    """A trial that drew data.item_vector=T.parquet and a fusion.* key trained on the table it fused (or, with
    fusion.strategy given, on the shipped vector), and T went unused without a word; when conditions that keep
    them apart, or a drawn `given` (a trial that fuses), are accepted."""
    from mmctr_ray.errors import ConfigError
    from mmctr_ray.search_space import load_search

    table = tmp_path / "t.parquet"
    for space, clash in (("{data.item_vector: {choice: [given, %s]}, fusion.text_dim: {int: [8, 16]}}",
                          "fusion.text_dim"),
                         ("{fusion.strategy: {choice: [given, v1]}, data.item_vector: {choice: [%s, given]}}",
                          "fusion.strategy"),
                         ("{fusion.strategy: {choice: [v1, v4]}, data.item_vector: {choice: [%s, given], "
                          "when: {fusion.strategy: [v4]}}}", "fusion.strategy")):
        with pytest.raises(ConfigError, match=rf"search.space: data.item_vector='{re.escape(str(table))}' with "
                                              rf"{clash}: a trial that draws a fusion.\* key trains on the table it "
                                              r"fuses, not on the one it drew"):
            load_search(_space(tmp_path, space % table))
    for space in ("{data.item_vector: {choice: [given, %s]}, fusion.text_dim: {int: [8, 16], "
                  "when: {data.item_vector: [given]}}}",
                  "{train.batch_size: {choice: [256, 512]}, data.item_vector: {choice: [%s], when: "
                  "{train.batch_size: [256]}}, fusion.text_dim: {int: [8, 16], when: {train.batch_size: [512]}}}"):
        assert load_search(_space(tmp_path, space % table)).params


def test_a_pca_size_one_above_its_limit_is_refused_and_one_at_it_passes(synth_dir, tmp_path):
    """The tiny data's 200 items limit each PCA part to 199 axes (centred, they span no more): a searched bound of
    200 is refused, 199 passes."""
    from mmctr_ray.errors import ConfigError
    from mmctr_ray.tuning import check_inputs

    space = "{fusion.strategy: {choice: [given, v1]}, fusion.dims: {int: [8, %d], when: {fusion.strategy: [v1]}}}"
    with pytest.raises(ConfigError, match=r"search.space.fusion.dims: 200 is wider than the v1 text PCA can be"):
        check_inputs(synth_dir, _space(tmp_path, space % 200))
    check_inputs(synth_dir, _space(tmp_path, space % 199))


def test_a_search_that_can_draw_given_on_converted_data_is_refused_whatever_its_source(tmp_path):
    """On data `mmctr convert` wrote, a trial of fusion.strategy given trains on item_info's zero placeholders
    whatever --source says: a search that can draw it is refused; one of v1..v4 from an embedded source is not."""
    from mmctr_ray.errors import ConfigError
    from mmctr_ray.search_space import load_search
    from mmctr_ray.tuning import _refuse_placeholders

    (tmp_path / "convert.json").write_text(json.dumps({"placeholder_embeddings": True}))
    given = load_search(_space(tmp_path, "{fusion.strategy: {choice: [given, v1]}}"))
    with pytest.raises(ConfigError, match=r"trials of fusion.strategy given, v1 with --source raw.parquet"):
        _refuse_placeholders(tmp_path, given, "raw.parquet")
    fused = load_search(_space(tmp_path, "{fusion.strategy: {choice: [v1, v4]}}"))
    _refuse_placeholders(tmp_path, fused, "raw.parquet")


def test_ctrl_c_counts_an_errored_trial_as_ended(tmp_path):
    """After Ctrl-C, Interrupted says how many trials ended: an errored one ended (it is not "started and not
    ended", which --resume would continue)."""
    from types import SimpleNamespace

    from mmctr_ray.errors import Interrupted
    from mmctr_ray.search_space import load_search
    from mmctr_ray.tuning import end_of_search

    space = load_search(ROOT / "configs/search_tiny.yaml")
    trials = tmp_path / "trials"
    for trial_id, epochs, done in (("a", 2, True), ("b", 1, False), ("c", 1, False)):
        (trials / trial_id).mkdir(parents=True)
        (trials / f"{trial_id}.params.json").write_text("{}")
        (trials / trial_id / "config.yaml").write_text((ROOT / "configs/tiny.yaml").read_text())
        (trials / trial_id / "metrics.jsonl").write_text("".join(
            json.dumps(_epoch(e, 0.7 + e / 100)) + "\n" for e in range(1, epochs + 1)))
        if done:
            (trials / trial_id / "summary.json").write_text("{}")
    (tmp_path / "asha.json").write_text(json.dumps({"brackets": [], "stopped": {}}))
    results = [SimpleNamespace(path=str(trials / "a"), error=None),
               SimpleNamespace(path=str(trials / "b"), error=RuntimeError("out of memory")),
               SimpleNamespace(path=str(trials / "c"), error=None)]
    with pytest.raises(Interrupted, match=r"^2 trials ended \(.*\), 1 started and not ended \(--resume continues"):
        end_of_search(tmp_path, space, results, interrupted=True)


def test_a_search_of_fewer_trials_than_fit_shares_the_cores_among_those_only(synth_dir, tmp_path, monkeypatch):
    """Tune never runs more trials at once than the search has: a 1-trial search on 8 CPUs runs 1 at a time
    (settings.json), and its CPU workers take the node's cores as one trial's, not as 1 of 7."""
    import ray
    import ray.tune

    import mmctr_ray.tuning

    class Stop(Exception):
        pass

    def trainable_of(fn, **kwargs):
        raise Stop(kwargs)

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(mmctr_ray.tuning, "_node_cpus", lambda: [8.0])
    monkeypatch.setattr(mmctr_ray.tuning, "shared_datasets", lambda *a, **k: {})
    monkeypatch.setattr(ray.tune, "with_parameters", trainable_of)
    with pytest.raises(Stop) as stop:
        mmctr_ray.tuning.run_tuning(synth_dir, tmp_path / "tune", ROOT / "configs/search_tiny.yaml", num_samples=1)
    assert stop.value.args[0]["sharing"] == 1
    assert json.loads((tmp_path / "tune" / "settings.json").read_text())["concurrency"] == 1


def test_the_sampler_draws_search_startup_trials_at_random_and_the_search_says_so(synth_dir, tmp_path, monkeypatch,
                                                                                   caplog):
    """Optuna's TPE draws its first 10 trials at random: `search_tiny.yaml`'s 6 trials were a random search, said
    nowhere (helper-134). `search.startup_trials` sets the count, and the driver says what the search will be."""
    import ray
    import ray.tune

    import mmctr_ray.tuning

    class Stop(Exception):
        pass

    def tuner(*args, **kwargs):  # where the search would start: the searcher it was given, then stop
        raise Stop(kwargs["tune_config"].search_alg)

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(mmctr_ray.tuning, "_node_cpus", lambda: [8.0])
    monkeypatch.setattr(mmctr_ray.tuning, "shared_datasets", lambda *a, **k: {})
    monkeypatch.setattr(ray.tune, "with_parameters", lambda fn, **kwargs: fn)
    monkeypatch.setattr(ray.tune, "Tuner", tuner)
    for sets, startup, said in (([], 10, "TPE draws at random until 10 trials have ended (search.startup_trials, "
                                          "completed or pruned); with 6 at a time, up to 15 start before that: all 6 "
                                          "of this search are random draws, a random search"),
                                (["search.startup_trials=2", "search.num_samples=20"], 2,
                                 "TPE draws at random until 2 trials have ended (search.startup_trials, completed or "
                                 "pruned); with 7 at a time, up to 8 start before that, then models the results")):
        caplog.clear()
        with caplog.at_level("INFO", logger="mmctr_ray.tuning"), pytest.raises(Stop) as stop:
            mmctr_ray.tuning.run_tuning(synth_dir, tmp_path / f"tune{startup}", ROOT / "configs/search_tiny.yaml",
                                        overrides=sets)
        assert stop.value.args[0]._sampler._n_startup_trials == startup
        assert said in [r.getMessage() for r in caplog.records]
    from mmctr_ray.tuning import startup_text  # trials that start before the first ones end are drawn at random too

    assert startup_text(12, 10, 4) == ("TPE draws at random until 10 trials have ended (search.startup_trials, "
                                       "completed or pruned); with 4 at a time, up to 13 start before that: this "
                                       "search of 12 may be all random draws")
    assert startup_text(20, 10, 4).endswith("up to 13 start before that, then models the results")


def test_a_search_resumes_with_its_data_given_as_a_relative_path(tmp_path, monkeypatch):
    """settings.json keeps the data folder resolved; `--resume --data data` from its parent is that folder."""
    from mmctr_ray.errors import ConfigError
    from mmctr_ray.tuning import check_resumable

    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "tune"
    (out / "tune").mkdir(parents=True)
    (out / "settings.json").write_text(json.dumps({"data": str(data.resolve()), "overrides": []}))
    monkeypatch.chdir(tmp_path)
    assert check_resumable("tune", "data")["data"] == str(data.resolve())
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match=r"the search ran on .*/data; resume it with that --data"):
        check_resumable("tune", "other")


def test_range_bounds_steps_conditions_and_a_seed_of_zero_at_their_limits(tmp_path):
    """The search section's checks at their edges: a range needs low < high (equal bounds refused); a step as wide
    as the range passes (it draws both bounds); a `when` value at the low end of its parent's range is one the
    parent takes; search.seed may be 0."""
    from mmctr_ray.errors import ConfigError
    from mmctr_ray.search_space import load_search

    with pytest.raises(ConfigError, match=r"search.space.model.cross_layers: int expects \[low, high\] with low < "
                                          r"high, got \[3, 3\]"):
        load_search(_space(tmp_path, "{model.cross_layers: {int: [3, 3]}}"))
    stepped = load_search(_space(tmp_path, "{model.cross_layers: {int: [1, 3], step: 2}}"))
    assert stepped.params[0].step == 2
    low_when = load_search(_space(tmp_path, "{model.cross_layers: {int: [1, 4]}, "
                                            "model.dropout: {float: [0.0, 0.3], when: {model.cross_layers: [1]}}}"))
    assert low_when.params[1].when == (("model.cross_layers", (1,)),)
    assert load_search(_space(tmp_path, "{model.dropout: {float: [0.0, 0.3]}}", seed=0)).seed == 0


def test_asha_restored_from_a_pickle_without_its_list_of_stops_says_its_stops_are_incomplete():
    """A scheduler pickled by a version that kept no list of stops does not know the stops made before: its
    records say so (stops_complete false), and the report then calls no trial pruned from them."""
    from mmctr_ray.asha import ResumableASHA

    made = ResumableASHA("unused.json", metric="best_valid_auc", mode="max", time_attr="epoch", max_t=2,
                         grace_period=1, reduction_factor=2)
    state = {k: v for k, v in made.__getstate__().items() if k not in ("_stopped", "_stops_complete",
                                                                          "_save_failed")}
    old = ResumableASHA.__new__(ResumableASHA)
    old.__setstate__(state)
    assert old._stopped == {} and old._stops_complete is False
    again = ResumableASHA.__new__(ResumableASHA)
    again.__setstate__(made.__getstate__())
    assert again._stops_complete is True

def test_report_top_tables_each_trials_parameters_in_its_columns_and_skips_trials_without_a_result(tmp_path,
                                                                                                   monkeypatch):
    """`mmctr report TUNE`'s table: its header's columns in order, each trial's sampled parameters (4 significant
    digits, "–" where inactive), the status counts each in its place; results.csv and the plot's "best so far" line
    in start order; and a trial without a result yet (a search still running) is left out of the ranking, not a
    ValueError (mutation audit: parameter columns dropped, 2 digits, "± SE" after "epochs", the pruned and
    early-stopped counts swapped, results.csv sorted by AUC, the best-so-far line not a running maximum, and a table
    of every row of results.csv all passed)."""
    from mmctr_ray import tune_report
    from mmctr_ray.tune_report import STARTED, top_trials

    tdir = _search(tmp_path, {"mid": ([], [0.70, 0.71]), "hi": ([], [0.80, 0.78]), "es": ([], [0.60]),
                              "pr": ([], [0.65]), "pr2": ([], [0.62])})
    for trial in ("pr", "pr2"):  # ASHA stopped them after epoch 1
        (tdir / "trials" / trial / "summary.json").unlink()
    (tdir / "asha.json").write_text(json.dumps({"brackets": [], "stopped": {"pr": 1.0, "pr2": 1.0}}))
    params = {"mid": {"fusion.strategy": "v1", "fusion.dims": 12, "train.lr": 0.0012345678,
                      "model.dnn_units": [32, 16]},
              "hi": {"fusion.strategy": "v4", "fusion.text_dim": 16, "fusion.image_dim": 8, "train.lr": 0.00456789,
                     "model.dnn_units": [16]}}
    for trial, sampled in params.items():
        path = tdir / "trials" / f"{trial}.params.json"
        path.write_text(json.dumps({**sampled, STARTED: json.loads(path.read_text())[STARTED]}))
    drawn = {}
    save = tune_report._save

    def recording(fig, path):
        drawn[path.name] = {line.get_label(): list(line.get_ydata()) for ax in fig.axes for line in ax.lines}
        return save(fig, path)

    monkeypatch.setattr(tune_report, "_save", recording)
    table = top_trials(tdir, n=3)
    lines = table.splitlines()
    assert table.count("\n| ") == 1 + 3  # the header and --top 3 trials
    assert lines[0] == "# Search `tune`: 5 trials (2 completed, 1 early-stopped, 2 pruned, 0 errors)"
    head = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert head[:9] == ["rank", "trial_id", "status", "best_valid_auc", "± SE", "epochs", "fusion.strategy",
                        "fusion.dims", "fusion.text_dim"] and head[-1] == "train.batch_size"
    cells = {line.split(" | ")[1]: dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
             for line in lines[4:7]}
    assert [c["rank"] for c in cells.values()] == ["1", "2", "3"] and list(cells) == ["hi", "mid", "pr"]
    assert {k: cells["mid"][k] for k in ("fusion.strategy", "fusion.dims", "fusion.text_dim", "train.lr",
                                         "model.dnn_units", "epochs")} == {
        "fusion.strategy": "v1", "fusion.dims": "12", "fusion.text_dim": "–", "train.lr": "0.001235",
        "model.dnn_units": "[32, 16]", "epochs": "2"}
    assert (cells["hi"]["fusion.text_dim"], cells["hi"]["train.lr"], cells["pr"]["status"]) == ("16", "0.004568",
                                                                                                 "pruned")
    with open(tdir / "results.csv", newline="") as f:
        assert [r["trial_id"] for r in csv.DictReader(f)] == ["mid", "hi", "es", "pr", "pr2"]  # start order
    assert drawn["auc_by_trial.png"]["best so far"] == [0.71, 0.80, 0.80, 0.80, 0.80]
    run = tdir / "trials" / "busy"  # started, no epoch yet
    run.mkdir()
    (tdir / "trials" / "busy.params.json").write_text(json.dumps({"train.lr": 1e-3, STARTED: 2000.0}))
    table = top_trials(tdir, n=10)
    assert "busy" not in table and table.count("\n| ") == 1 + 5  # the header and the 5 trials with a result


def test_the_counts_line_counts_every_trial_the_table_lists(tmp_path):
    """A trial started without an epoch yet (no result), or started after Tune's last saved state (interrupted): the
    header said "2 trials (1 completed, 0 early-stopped, 0 pruned, 0 errors)", parts that did not add up to 2."""
    from mmctr_ray.tune_report import STARTED, top_trials

    tdir = _search(tmp_path, {"done": ([], [0.70, 0.71])})
    (tdir / "trials" / "busy").mkdir()
    (tdir / "trials" / "busy.params.json").write_text(json.dumps({"train.lr": 1e-3, STARTED: 2000.0}))
    assert top_trials(tdir).splitlines()[0].endswith(
        "2 trials (1 completed, 0 early-stopped, 0 pruned, 0 errors, 1 no result)")
    (tdir / "tune_results.json").write_text(json.dumps({"errors": {}, "trials": ["run_trial_done_00000"]}))
    (tdir / "trials" / "busy" / "metrics.jsonl").write_text(json.dumps(_epoch(1, 0.6)) + "\n")
    table = top_trials(tdir)
    assert table.splitlines()[0].endswith("2 trials (1 completed, 0 early-stopped, 0 pruned, 0 errors, 1 interrupted)")
    assert any(line.startswith("| 2 | busy | interrupted |") for line in table.splitlines()), table
