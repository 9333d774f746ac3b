"""The `mmctr` command line: help for every stage, exit codes, one-line user errors, outputs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mmctr_ray.cli import build_parser, main, pipeline_actor_gpus
from mmctr_ray.errors import ConfigError, OutputExistsError
from mmctr_ray.schema import Layout

STAGES = ["synth", "convert", "validate", "features", "embed", "fuse", "train", "tune", "predict", "report", "compare",
          "pipeline", "demo"]
ROOT = Path(__file__).parent.parent
CLIP_TINY = str(ROOT / "tests" / "assets" / "clip-tiny.json")


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmctr_ray.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_top_level_help_lists_every_stage():
    r = run_cli("--help")
    assert r.returncode == 0
    listed = re.findall(r"^ {4}(\w+) ", r.stdout, re.M)  # each stage's own entry, not a word in another's text
    assert sorted(listed) == sorted(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help(stage, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([stage, "--help"])
    assert exc.value.code == 0
    assert f"usage: mmctr {stage}" in capsys.readouterr().out


def test_verbose_may_follow_the_stage_as_a_ray_jobs_entry_point_puts_it():
    """jobs/*.py call main(["STAGE", *argv]): `python jobs/pipeline.py -v ...` was "unrecognized arguments: -v"."""
    parse = build_parser().parse_args
    assert parse(["pipeline", "--out", "o", "-v"]).verbose and parse(["-v", "pipeline", "--out", "o"]).verbose
    assert parse(["pipeline", "--out", "o"]).verbose is False


def test_synth_flags_reach_the_data(tmp_path):
    out = tmp_path / "d"
    rc = main(["synth", "--out", str(out), "--users", "50", "--items", "40", "--train-rows", "300",
               "--valid-rows", "60", "--test-rows", "70", "--tags", "50", "--topics", "4", "--images", "0",
               "--seed", "3"])
    assert rc == 0
    lay = Layout(out)
    assert [pq.ParquetFile(lay.split(s)).metadata.num_rows for s in ("train", "valid", "test")] == [300, 60, 70]
    assert pq.ParquetFile(lay.item_info).metadata.num_rows == 41
    assert not lay.images_dir.exists()
    manifest = json.loads(lay.synth_manifest.read_text())
    assert manifest["spec"]["seed"] == 3 and manifest["spec"]["users"] == 50


def test_a_folder_holding_only_lock_files_is_not_an_existing_output(tmp_path, capsys):
    """A failed `mmctr train --out D/run` leaves its lock file in D (by design: an OS lock ends with its process):
    `synth --out D` then said "D: already exists"."""
    out = tmp_path / "d"
    out.mkdir()
    (out / ".run.mmctr.lock").write_text("")
    small = ["--users", "50", "--items", "40", "--train-rows", "300", "--valid-rows", "60", "--test-rows", "70",
             "--tags", "50", "--topics", "4", "--images", "0"]
    assert main(["synth", "--out", str(out), *small]) == 0
    from mmctr_ray.config import load_config
    from mmctr_ray.train_driver import _check_run_dir
    from mmctr_ray.tuning import _prepare

    for folder in (tmp_path / "r", tmp_path / "t"):  # the stages' own checks too
        folder.mkdir()
        (folder / ".run.mmctr.lock").write_text("")
    _check_run_dir(str(tmp_path / "r"), load_config("configs/tiny.yaml"), resume=False, overwrite=False)
    _prepare(tmp_path / "t", Path("configs/search_tiny.yaml"), {"data": str(out), "overrides": []}, resume=False,
             overwrite=False)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    assert main(["synth", "--out", str(tmp_path / "e"), *small]) == 2
    assert capsys.readouterr().err.strip().endswith("e: already exists; pass --overwrite to replace it")


def test_an_output_another_command_writes_is_said_in_use_before_already_exists(tmp_path, capsys):
    """A second `mmctr train --out RUN` beside a running one said "already exists; pass --resume ...", and that
    --resume then "in use by another mmctr command": the telling error came second."""
    from mmctr_ray.locking import output_lock

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: running\n")  # what a run in progress has written
    with output_lock(run):  # the running command
        for extra in ([], ["--resume"]):
            assert main(["train", "--data", str(tmp_path), "--out", str(run), *extra]) == 2
            assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
                f"{run}: in use by another mmctr command (it holds {tmp_path / '.run.mmctr.lock'}); wait for it to "
                f"end or choose another output")
    assert main(["train", "--data", str(tmp_path), "--out", str(run)]) == 2  # ended: its output is there
    assert capsys.readouterr().err.strip().endswith(
        f"{run}: already exists; pass --resume to continue it or --overwrite to replace it")
    assert (run / "config.yaml").read_text() == "name: running\n"


def test_flags_are_not_abbreviated_and_report_top_is_positive(tmp_path, capsys):
    """`--conf c.yaml` was taken as --config, and stayed in the `--resume` command an interrupted run printed
    (which drops --config by name), so that command failed; `report --top -2` listed all trials but two."""
    with pytest.raises(SystemExit) as err:
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--conf", "c.yaml"])
    assert err.value.code == 2 and "unrecognized arguments: --conf c.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), "--top", "-2"])
    assert "argument --top: expected a value above 0, got -2" in capsys.readouterr().err
    for value in ("nan", "inf"):  # nan passed every bound: a search's deadline of nan s, then every trial crashed
        with pytest.raises(SystemExit):
            main(["tune", "--data", str(tmp_path), "--out", str(tmp_path / "t"), "--config", "c.yaml",
                  "--time-budget-s", value])
        assert f"argument --time-budget-s: expected a finite number, got {value}" in capsys.readouterr().err
    for stage in ("predict", "embed", "pipeline"):  # Ray refused 1.5 in the actors, after it started; 2 left one
        for gpus in ("1.5", "2"):  # of an actor's two GPUs idle (the model runs on one device)
            with pytest.raises(SystemExit):
                main([stage, "--gpus-per-actor", gpus])
            assert (f"argument --gpus-per-actor: an actor runs its model on one GPU: expected at most 1 (a share such "
                    f"as 0.5 puts several actors on one GPU; --actors adds GPUs), got {gpus}") in \
                capsys.readouterr().err
    from mmctr_ray.ray_env import check_actors
    for gpus in (1.5, 2.0):  # the library's check (embed_items, score_split) says the flag's rule, not "whole GPUs"
        with pytest.raises(ConfigError, match=f"--gpus-per-actor {gpus:g}: an actor runs its model on one GPU: "
                                              "expected at most 1"):
            check_actors(1, gpus)
    # the pipeline's actors default to --gpus-per-worker, which may be above 1: one GPU an actor, as the flag allows
    assert [pipeline_actor_gpus(w, None) for w in (0.0, 0.5, 1.0, 2.0)] == [0.0, 0.5, 1.0, 1.0]
    assert pipeline_actor_gpus(2.0, 0.25) == 0.25


def test_preset_1m_has_the_real_sizes():
    from mmctr_ray.cli import _spec_from_args

    args = build_parser().parse_args(["synth", "--out", "x", "--preset", "1m"])
    spec = _spec_from_args(args)
    assert (spec.users, spec.items, spec.train_rows, spec.valid_rows, spec.test_rows, spec.tags) == \
        (1_000_000, 91_717, 3_600_000, 10_000, 379_142, 11_740)
    args = build_parser().parse_args(["synth", "--out", "x", "--preset", "1m", "--train-rows", "10"])
    assert _spec_from_args(args).train_rows == 10


def test_validate_exit_codes(synth_dir, tmp_path):
    r = run_cli("validate", str(synth_dir))
    assert r.returncode == 0 and "OK (0 errors" in r.stdout
    r = run_cli("validate", str(tmp_path / "missing"))
    assert r.returncode == 1
    assert "error: " in r.stdout and "data directory not found" in r.stdout


def test_validate_and_report_take_their_input_as_the_other_stages_spell_it(synth_dir, tmp_path, capsys):
    """`mmctr validate --data DIR` and `mmctr report --run RUN` (train, predict and the rest spell them so) were
    "unrecognized arguments"; the positional form stays, both forms naming one input are fine, two are refused."""
    assert main(["validate", "--data", str(synth_dir)]) == 0
    assert main(["validate", str(synth_dir), "--data", str(synth_dir)]) == 0
    assert main(["validate", f"{synth_dir}/", "--data", os.path.relpath(synth_dir)]) == 0  # one folder, two ways
    assert capsys.readouterr().out.count("OK (0 errors") == 3
    assert main(["validate", "--data", str(tmp_path / "missing")]) == 1  # the option's value is what is checked
    assert "data directory not found" in capsys.readouterr().out
    for argv, message in [(["validate"], "mmctr validate: error: DATA is missing: mmctr validate DATA, or mmctr "
                                         "validate --data DATA"),
                          (["validate", str(synth_dir), "--data", str(tmp_path)],
                           f"mmctr validate: error: DATA given twice, as {synth_dir} and as --data {tmp_path}: give "
                           "one"),
                          (["report"], "mmctr report: error: RUN is missing: mmctr report RUN, or mmctr report --run "
                                       "RUN")]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err.splitlines()[-1]
    # report takes several runs (into --out): --run and RUN naming two are two runs, the --run one first
    assert main(["report", "a", "--run", "b"]) == 2
    assert capsys.readouterr().err.strip().endswith("2 runs: --out DIR names the folder for their curves.png and "
                                                    "summary.md")
    assert main(["report", "--run", str(tmp_path / "norun")]) == 2  # reached the report: the run is what is missing
    assert f"mmctr report: error: {tmp_path / 'norun'}: not found" in capsys.readouterr().err


def test_validate_counts_its_problems_in_words_that_agree(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 1  # a folder without MicroLens_1M_x1/: one error
    assert capsys.readouterr().out.strip().endswith(f"{tmp_path}: INVALID (1 error, 0 warnings)")  # was "1 errors"


def test_a_flag_the_stage_does_not_know_is_refused_by_that_stage(capsys):
    """`mmctr predict ... --fusion F` (a flag of train) and `--set train.epochs 3` were refused by the top-level
    parser: `usage: mmctr [-h] [-v] STAGE ...`, no flag of the stage, and `mmctr: error:`."""
    for argv, line in ((["predict", "--run", "R", "--data", "D", "--out", "s.zip", "--fusion", "F"],
                        "mmctr predict: error: unrecognized arguments: --fusion F"),
                       (["train", "--data", "D", "--out", "R", "--set", "train.epochs", "3"],
                        "mmctr train: error: unrecognized arguments: 3; --set takes KEY=VALUE as one argument "
                        "(--set train.epochs=3)")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.strip().splitlines()[-1] == line
        assert err.startswith(f"usage: mmctr {argv[0]} ")


def test_train_fusion_and_a_set_of_the_keys_it_sets_are_refused_together(synth_dir, tmp_path, capsys, monkeypatch):
    """`--fusion F --set fusion.text_dim=30` trained on F's 8+12 table with 30 in config.yaml, and `--set
    data.item_vector=given` dropped F without a word: --set is applied after --fusion's keys. The values F sets are
    no clash (`mmctr pipeline` passes its --set fusion.* beside the table it fused with them)."""
    import mmctr_ray.train_driver
    from mmctr_ray.config import load_config
    from mmctr_ray.fuse import run_fuse

    table = tmp_path / "t.parquet"
    run_fuse(synth_dir, table, load_config("configs/tiny.yaml", ["fusion.text_dim=8"]).fusion,
             progress=lambda m: None)
    trained = []

    def run_training(data, run, cfg, **kwargs):
        trained.append(cfg)
        raise ConfigError("stopped before training")

    monkeypatch.setattr(mmctr_ray.train_driver, "run_training", run_training)
    base = ["train", "--data", str(synth_dir), "--out", str(tmp_path / "run"), "--config", "configs/tiny.yaml",
            "--fusion", str(table), "--set", "train.epochs=1"]
    for key in ("fusion.text_dim=30", "data.item_vector=given", "fusion.strategy=v1"):
        code = main([*base, "--set", key])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err == (f"mmctr train: error: --set {key}: --fusion {table} sets data.item_vector and "
                                     "fusion.* from the table's own .fusion.json, so the config says what the item "
                                     "vectors are; drop one of the two (another fusion: `mmctr fuse` it, then "
                                     "--fusion that table)")
    assert not trained and not (tmp_path / "run").exists()
    assert main([*base, "--set", "fusion.strategy=v4", "--set", "fusion.text_dim=30"]) == 2  # the one that changes
    assert capsys.readouterr().err.strip().startswith("mmctr train: error: --set fusion.text_dim=30: --fusion ")
    assert main([*base, "--set", "fusion.text_dim=8", "--set", "fusion.strategy=v4"]) == 2  # F's own values
    assert capsys.readouterr().err.strip().endswith("stopped before training")
    assert trained[0].fusion.text_dim == 8 and trained[0].data.item_vector == str(table.resolve())
    # `mmctr features` takes --fusion too, as train does (helper-134: it took `--set data.item_vector=` only)
    import mmctr_ray.cli as cli
    import mmctr_ray.feature_summary

    monkeypatch.setattr(cli, "_start_ray", lambda *a, **k: None)
    monkeypatch.setattr(mmctr_ray.feature_summary, "summarize_features",
                        lambda data, cfg: trained.append(cfg) or (_ for _ in ()).throw(ConfigError("summarized")))
    features = ["features", "--data", str(synth_dir), "--config", "configs/tiny.yaml", "--fusion", str(table)]
    assert main([*features, "--set", "fusion.text_dim=30"]) == 2
    assert capsys.readouterr().err.strip().startswith("mmctr features: error: --set fusion.text_dim=30: --fusion ")
    assert main(features) == 2 and capsys.readouterr().err.strip().endswith("summarized")
    assert trained[-1].fusion.text_dim == 8 and trained[-1].data.item_vector == str(table.resolve())


def test_a_pipeline_set_of_fusion_keys_trains_on_the_table_it_fused(synth_dir, tmp_path, monkeypatch):
    """README's `pipeline ... --set fusion.strategy=v4`: the train step gets the fused table (--fusion) and the
    command's --set beside it, with the same values; train's check against a --set that contradicts --fusion
    refused it there, after fuse and features (the review of 6d57dc9)."""
    import ray

    import mmctr_ray.cli as cli
    import mmctr_ray.ray_env as ray_env
    import mmctr_ray.train_driver

    monkeypatch.setattr(cli, "_start_ray", lambda *a, **k: None)
    monkeypatch.setattr(ray_env, "private_local_ray", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    for name in ("cmd_validate", "cmd_features", "cmd_predict", "cmd_report"):
        monkeypatch.setattr(cli, name, lambda args: 0)
    trained = []

    def run_training(data, run, cfg, **kwargs):
        trained.append(cfg)
        Path(run).mkdir(parents=True, exist_ok=True)
        summary = {"best_valid_auc": 0.5, "best_valid_logloss": 0.6, "best_epoch": 1, "epochs": 1,
                   "best_checkpoint": f"{run}/checkpoint_epoch_001"}
        (Path(run) / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(mmctr_ray.train_driver, "run_training", run_training)
    out = tmp_path / "out"
    assert main(["pipeline", "--data", str(synth_dir), "--out", str(out), "--config", "configs/tiny.yaml",
                 "--set", "fusion.text_dim=16", "--set", "train.epochs=1"]) == 0
    fused = json.loads((out / "item_emb.fusion.json").read_text())
    assert fused["text_dim"] == 16 and trained[0].fusion.text_dim == 16
    assert trained[0].data.item_vector == str((out / "item_emb.parquet").resolve())


def test_a_pipeline_refuses_a_set_of_the_item_vector_before_it_starts(tmp_path, capsys):
    """The pipeline trains on the table its fuse step writes: `--set data.item_vector=...` was refused by train's
    --fusion check only after fuse and features."""
    assert main(["pipeline", "--out", str(tmp_path / "out"), "--set", "data.item_vector=given"]) == 2
    assert capsys.readouterr().err.strip() == ("mmctr pipeline: error: --set data.item_vector: the pipeline trains on "
                                               "the table its fuse step writes, of the config's fusion section "
                                               "(fusion.strategy=given for item_emb_d128 as shipped)")
    assert not (tmp_path / "out").exists()


def test_user_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dnn_unit: [8]\n")
    r = run_cli("features", "--data", str(tmp_path), "--config", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "mmctr features: error:" in r.stderr and "model.dnn_unit" in r.stderr
    r = run_cli("synth", "--out", str(tmp_path / "s"), "--items", "0")
    assert r.returncode == 2 and "--items must be in 1..1,099,511,627,776, got 0" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv", [["synth", "--overwrite"], ["convert", "--raw", "R", "--overwrite"],
                                  ["pipeline", "--overwrite"], ["train", "--data", "D", "--overwrite"],
                                  ["tune", "--data", "D", "--resume"], ["features", "--data", "D"]])
def test_a_file_named_as_an_output_folder_is_one_line_even_with_overwrite(tmp_path, capsys, argv):
    """synth --overwrite into a file was a NotADirectoryError traceback, pipeline --overwrite a FileExistsError."""
    out = tmp_path / "afile"
    out.write_text("kept")
    assert main([*argv, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"mmctr {argv[0]}: error: {out}: a file; expected a folder for the "
                                               f"outputs of {argv[0]} (--out)")
    assert out.read_text() == "kept" and sorted(tmp_path.iterdir()) == [out]


def test_a_too_small_object_store_is_refused_before_anything_is_written(synth_dir, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(synth_dir), "--out", str(run), "--object-store-mib", "50"])
    assert exit_info.value.code == 2
    assert "--object-store-mib: expected an integer >= 100 (MiB), got '50'" in capsys.readouterr().err
    assert not run.exists() and not list(tmp_path.iterdir())
    args = build_parser().parse_args(["train", "--data", "D", "--out", "R", "--object-store-mib", "512"])
    assert args.object_store_mib == 512


@pytest.mark.parametrize("rows, expected", [("-3", "a value above 0, got -3"), ("0", "a value above 0, got 0"),
                                             ("1.5", "an integer, got '1.5'")])
def test_validate_takes_a_positive_count_of_test_rows(synth_dir, rows, expected, capsys):
    """`validate --expect-test-rows -3` read the data and reported "a submission needs -3 (as requested)"."""
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(synth_dir), "--expect-test-rows", rows])
    assert exit_info.value.code == 2
    assert f"argument --expect-test-rows: expected {expected}" in capsys.readouterr().err


def test_a_search_whose_every_trial_failed_exits_1(tmp_path, monkeypatch, caplog):
    """It logged "no trial reported a valid AUC" and exited 0: a cluster job saw success."""
    import mmctr_ray.cli as cli
    import mmctr_ray.tuning as tuning

    summary = {"trials": 3, "completed": 0, "early-stopped": 0, "pruned": 0, "error": 3,
               "results": str(tmp_path / "results.csv")}
    monkeypatch.setattr(tuning, "check_inputs", lambda *a, **k: {})
    monkeypatch.setattr(tuning, "run_tuning", lambda *a, **k: summary)
    monkeypatch.setattr(cli, "_start_ray", lambda *a, **k: None)
    with caplog.at_level("ERROR", logger="mmctr"):
        assert main(["tune", "--data", str(tmp_path), "--out", str(tmp_path / "t"), "--config", "c.yaml"]) == 1
    assert "3 trials (0 completed, 0 early-stopped, 0 pruned, 3 errors); no trial reported a valid AUC" in caplog.text
    # every trial failed after an epoch or more (out of memory at epoch 2): best.yaml is written, but the search
    # failed (it exited 0)
    summary.update(best_yaml=str(tmp_path / "best.yaml"), best_valid_auc=0.81, best_trial="t1")
    caplog.clear()
    with caplog.at_level("ERROR", logger="mmctr"):
        assert main(["tune", "--data", str(tmp_path), "--out", str(tmp_path / "t"), "--config", "c.yaml"]) == 1
    assert ("3 trials (0 completed, 0 early-stopped, 0 pruned, 3 errors); every trial failed: the best valid AUC "
            "0.8100 (trial t1) is of an epoch before its error") in caplog.text
    summary.update(pruned=1, error=2)
    assert main(["tune", "--data", str(tmp_path), "--out", str(tmp_path / "t"), "--config", "c.yaml"]) == 0


def test_the_time_budget_counts_from_the_commands_start(tmp_path, monkeypatch):
    """--time-budget-s counted from after Ray's start and the reading of the splits into the object store
    (minutes on MicroLens-1M): a 1-hour budget started trials past the hour."""
    import time

    import mmctr_ray.cli as cli
    import mmctr_ray.tuning as tuning

    seen = {}
    monkeypatch.setattr(tuning, "check_inputs", lambda *a, **k: seen.setdefault("checked", time.time()))
    monkeypatch.setattr(tuning, "run_tuning", lambda *a, **k: seen.update(k) or {"best_yaml": None, **{
        s: 0 for s in ("trials", "completed", "early-stopped", "pruned", "error")}, "results": "r.csv"})
    monkeypatch.setattr(cli, "_start_ray", lambda *a, **k: time.sleep(0.05))
    before = time.time()
    main(["tune", "--data", str(tmp_path), "--out", str(tmp_path / "t"), "--config", "c.yaml", "--time-budget-s", "60"])
    assert before <= seen["started"] <= seen["checked"] and seen["time_budget_s"] == 60
    assert tuning.budget_spent({"deadline": 100.0}, now=100.0) and not tuning.budget_spent({"deadline": 100.0}, now=99)
    assert not tuning.budget_spent({})  # no budget, or a search from before settings.json kept its deadline


def test_a_uri_given_to_a_local_path_flag_is_a_usage_error_not_a_local_folder(tmp_path, capsys, monkeypatch):
    """`predict --out s3://b/sub.zip` wrote the submission to the local folder `s3:/b/sub.zip` and exited 0
    (``type=Path`` collapses `//`). Every flag that takes a local path only now refuses a URI by name."""
    from mmctr_ray.cli import _local_path

    monkeypatch.chdir(tmp_path)
    local_only = [(name, action.option_strings[0] if action.option_strings else action.dest)
                  for name, sub in build_parser()._subparsers._group_actions[0].choices.items()
                  for action in sub._actions if action.type is _local_path]
    assert ("predict", "--out") in local_only and ("tune", "--out") in local_only and len(local_only) >= 15
    assert ("train", "--out") not in local_only and ("predict", "--run") not in local_only  # these take URIs
    for stage, flag in [("predict", "--out"), ("train", "--data"), ("compare", "--json")]:
        argv = {"predict": ["predict", "--run", "r", "--data", "d", "--out", "o.zip"],
                "train": ["train", "--data", "d", "--out", "r"],
                "compare": ["compare", "r", "--data", "d", "--json", "f.json"]}[stage]
        argv[argv.index(flag) + 1] = "s3://bucket/x"
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"mmctr {stage}: error: argument {flag}: s3://bucket/x: expected a local path"), err
    assert not list(tmp_path.iterdir())  # no s3:/ folder
    assert _local_path("runs/a") == Path("runs/a")


def test_unusable_run_uris_are_one_line_errors_before_ray_starts(synth_dir):
    r = run_cli("train", "--data", str(synth_dir), "--out", "foo://bucket/run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("mmctr train: error: foo://bucket/run: unsupported storage scheme foo:// (expected "
                                "a local path or a URI: s3://, gs://, abfs://, hdfs://, file://, or a scheme of an "
                                "installed fsspec package)")
    r = run_cli("report", "file:///nonexistent/run")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "file:///nonexistent/run: not found (expected a run directory of `mmctr train`)" in r.stderr


def test_report_refuses_a_uri_fragment_as_every_stage_does(tmp_path, capsys):
    """pyarrow drops a URI's '#...': `report 'file:///x/r#2'` read and wrote file:///x/r, another run."""
    (tmp_path / "r").mkdir()
    uri = f"{tmp_path.as_uri()}/r#2"
    assert main(["report", uri]) == 2
    assert capsys.readouterr().err.strip() == (f"mmctr report: error: {uri}: '#' starts a URI fragment, which storage "
                                               "drops; write it as %23")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_predict_says_first_that_the_submission_must_be_a_zip(tmp_path, capsys, overwrite):
    """An existing `--out x.csv` was "already exists; pass --overwrite", and with --overwrite "must be a .zip"."""
    out = tmp_path / "submission.csv"
    out.write_text("ID,Task2\n")
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(tmp_path), "--out", str(out),
                 *overwrite]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mmctr predict: error: {out}: the submission must be a .zip file")
    assert out.read_text() == "ID,Task2\n"


def test_predict_on_a_split_of_one_class_says_why_it_has_no_auc(tmp_path, monkeypatch, caplog):
    """`predict --split valid` on a split of clicks only printed "valid AUC nan" (exit 0): the submission is
    written, and the line now says the AUC is undefined and why, with the logloss that is defined."""
    import mmctr_ray.cli as cli
    import mmctr_ray.predict as predict
    from mmctr_ray.metrics import evaluate_logits

    def run_predict(run, data, out, split, task, **kwargs):
        return {"submission": str(out), "rows": 4, "split": split, "task": task, "checkpoint": "ck",
                "metrics": evaluate_logits(labels, np.array([0.5, -1.0, 2.0, 0.0]))}

    monkeypatch.setattr(predict, "check_inputs", lambda *a, **k: 4)
    monkeypatch.setattr(predict, "run_predict", run_predict)
    monkeypatch.setattr(cli, "_start_ray", lambda *a, **k: None)
    argv = ["predict", "--run", "r", "--data", str(tmp_path), "--out", str(tmp_path / "s.zip"), "--split", "valid"]
    for labels, expected in ((np.ones(4), "; no valid AUC: its labels hold one class only (4 clicks of 4 rows); "
                                          "valid logloss 0.6519"),
                             (np.array([1.0, 0.0, 1.0, 0.0]), "; valid AUC 1.0000 ± 0.0000")):
        caplog.clear()
        with caplog.at_level("INFO", logger="mmctr"):
            assert main(argv) == 0
        said = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("wrote "))
        assert said.startswith(f"wrote {tmp_path / 's.zip'} (Task2): 4 rows from ck{expected}"), said
        assert "nan" not in said


def test_predict_passes_batch_rows_to_the_scoring_and_none_without_it(synth_dir, tmp_path, monkeypatch, capsys):
    """`--batch-rows` reaches the scoring (a scorer's memory grows with its batch: 3.0 GiB at the baseline's 16,384
    rows against 1.3 GiB at 4,096 on the CPU, 379,142 test rows); without it None, which score_split takes as the
    run's train.eval_batch_size."""
    import mmctr_ray.cli as cli
    import mmctr_ray.predict as predict

    rows = pq.ParquetFile(Layout(synth_dir).split("test")).metadata.num_rows
    asked = []

    def score_split(run, data, split, actors, gpus_per_actor, batch_size=None):
        asked.append(batch_size)
        return np.zeros(rows, np.float32), np.zeros(rows, np.float32), "ck"

    monkeypatch.setattr(predict, "check_inputs", lambda *a, **k: rows)
    monkeypatch.setattr(predict, "score_split", score_split)
    monkeypatch.setattr(cli, "_start_ray", lambda *a, **k: None)
    argv = ["predict", "--run", "r", "--data", str(synth_dir), "--out", str(tmp_path / "s.zip")]
    assert main([*argv, "--batch-rows", "4096"]) == 0 and main([*argv, "--overwrite"]) == 0
    assert asked == [4096, None]  # None: score_split takes the checkpoint's train.eval_batch_size
    with pytest.raises(SystemExit) as ended:
        main([*argv, "--overwrite", "--batch-rows", "0"])
    assert ended.value.code == 2 and asked == [4096, None]
    assert "argument --batch-rows: expected a value above 0, got 0" in capsys.readouterr().err


def test_synth_refuses_to_overwrite(synth_dir, tmp_path):
    out = tmp_path / "d"
    assert main(["synth", "--out", str(out), "--items", "30", "--users", "20", "--train-rows", "50",
                 "--valid-rows", "20", "--test-rows", "20", "--tags", "200", "--topics", "4", "--images", "0"]) == 0
    r = run_cli("synth", "--out", str(out), "--images", "0")
    assert r.returncode == 2 and "--overwrite" in r.stderr


@pytest.mark.slow
def test_features_writes_summary_and_resolved_config(synth_dir, tmp_path):
    out = tmp_path / "feat"
    r = run_cli("features", "--data", str(synth_dir), "--config", "configs/tiny.yaml", "--set", "data.max_len=8",
                "--out", str(out), "--num-cpus", "2")
    assert r.returncode == 0, r.stderr
    assert "item table: 200 items" in r.stdout
    summary = json.loads((out / "features_summary.json").read_text())
    assert summary["max_len"] == 8
    assert summary["splits"]["train"]["rows"] == 3_000
    assert summary["splits"]["train"]["columns"]["item_seq"] == "int64[8]"
    assert summary["splits"]["train"]["history_len"]["max"] == 8
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["max_len"] == 8 and saved["name"] == "tiny"
    again = ["features", "--data", str(synth_dir), "--config", "configs/tiny.yaml", "--set", "data.max_len=6",
             "--out", str(out), "--num-cpus", "2"]
    r = run_cli(*again)  # refused before Ray starts, the files kept; features had no --overwrite to suggest
    assert r.returncode == 2 and r.stderr.strip().endswith(f"{out}: already exists; pass --overwrite to replace it")
    assert json.loads((out / "features_summary.json").read_text())["max_len"] == 8
    r = run_cli(*again, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "features_summary.json").read_text())["max_len"] == 6
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["max_len"] == 6


@pytest.mark.slow
def test_pipeline_with_embed_runs_every_stage_on_converted_data(tmp_path):
    """With --embed the pipeline runs every stage, the route for converted and larger data sets. That route
    crashed once (its embed step lacked a setting `mmctr embed` reads), and on converted data it always failed:
    the features step loaded the config's shipped vectors, zero placeholders there. The pipeline without --data
    (synth first, shipped vectors, as `make demo` runs it) is the cluster job of test_cluster.py."""
    data, out = tmp_path / "data", tmp_path / "demo"
    assert main(["synth", "--out", str(data), "--users", "200", "--items", "100", "--train-rows", "2000",
                 "--valid-rows", "300", "--test-rows", "300", "--tags", "100", "--topics", "5", "--images", "8"]) == 0
    (data / "convert.json").write_text(json.dumps({"placeholder_embeddings": True}))  # as `mmctr convert` marks it
    r = run_cli("pipeline", "--data", str(data), "--out", str(out), "--embed", "--image-model",
                "tests/assets/clip-tiny.json", "--config", "configs/tiny.yaml", "--num-cpus", "2",
                timeout=540)  # every stage on 2 cores: 236 s on a slow day; pytest's own limit is 600 s
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK (0 errors, 0 warnings)" in r.stdout
    features = json.loads((out / "features" / "features_summary.json").read_text())
    assert features["splits"]["valid"]["rows"] == 300
    assert features["item_table"]["source"]["file"] == str((out / "item_emb.parquet").resolve())  # what it trains on
    embedded = json.loads((out / "item_raw_emb.embed.json").read_text())
    assert embedded["items"] == 100 and embedded["pooling"] == "mean"  # the offline MiniLM's own pooling
    assert json.loads((out / "item_emb.fusion.json").read_text())["source"].endswith("item_raw_emb.parquet")
    # the train step took the fused table as `mmctr train --fusion` does: config and checkpoints record it
    saved = yaml.safe_load((out / "run" / "config.yaml").read_text())
    assert Path(saved["data"]["item_vector"]) == (out / "item_emb.parquet").resolve()
    assert saved["fusion"]["strategy"] == "v4" and saved["fusion"]["text_dim"] == 32
    source = json.loads((out / "run" / "checkpoint_epoch_001" / "item_source.json").read_text())
    assert source["dim"] == 64 and Path(source["fusion"]["source"]) == (out / "item_raw_emb.parquet").resolve()
    assert (out / "submission.zip").is_file() and (out / "run" / "report" / "curves.png").is_file()
    assert "pipeline: valid AUC" in r.stdout and "oracle" in r.stdout
    assert "pipeline done" in r.stderr
    # a local OUT holds everything, moved too: its run named the fused table under the old OUT, and could not be
    # predicted, compared or resumed ("/old/OUT/item_emb.parquet: item vector file not found")
    from mmctr_ray.checkpoint import best_checkpoint
    from mmctr_ray.predict import load_model
    from mmctr_ray.train_driver import _check_run_dir, resume_config

    moved = tmp_path / "moved"
    shutil.move(out, moved)
    assert load_model(best_checkpoint(moved / "run"), data).experiment_cfg.fusion.strategy == "v4"
    cfg = resume_config(str(moved / "run"))
    assert cfg.data.item_vector == str(moved / "item_emb.parquet")
    _check_run_dir(str(moved / "run"), cfg, resume=True, overwrite=False)  # the resume's own check: the same table
    (moved / "item_emb.parquet").rename(moved / "elsewhere.parquet")  # not there: the saved path, as before
    assert resume_config(str(moved / "run")).data.item_vector == str((out / "item_emb.parquet").resolve())


def test_pipeline_holds_the_test_split_to_expect_test_rows(synth_dir, tmp_path):
    """A subsample of the real data (its 91,717 items, fewer test rows) stopped at the pipeline's validate, held to
    the challenge's 379,142 rows, with no way to say how many it has: `mmctr validate` took --expect-test-rows,
    `mmctr pipeline` did not."""
    rows = pq.ParquetFile(Layout(synth_dir).split("test")).metadata.num_rows
    r = run_cli("pipeline", "--data", str(synth_dir), "--out", str(tmp_path / "out"), "--expect-test-rows",
                str(rows + 1))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"has {rows:,} rows; a submission needs {rows + 1:,} (as requested)" in r.stdout
    assert not (tmp_path / "out" / "run").exists()  # before Ray and every step after validate


def test_pipeline_refuses_before_any_stage_runs(tmp_path):
    """A non-empty OUT needs --resume or --overwrite; a URI OUT needs --work (the run refers to files there)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    r = run_cli("pipeline", "--out", str(out), "--data", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith(f"{out}: not empty; pass --resume to continue the pipeline there or --overwrite "
                                     "to replace its outputs")
    r = run_cli("pipeline", "--out", f"file://{tmp_path}/uri_out")
    assert r.returncode == 2 and "OUT is a URI, so pass --work DIR" in r.stderr
    # --work the folder of a file:// OUT: its lock is OUT's, which main() holds (refused as "in use" by itself)
    r = run_cli("pipeline", "--out", f"file://{tmp_path}/uri_out/", "--work", str(tmp_path / "uri_out"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        f"{tmp_path / 'uri_out'}: --work is OUT's own folder (file://{tmp_path}/uri_out); pass --out "
        f"{tmp_path / 'uri_out'} (a local OUT, which the stages write into), or another --work")
    assert not (tmp_path / "uri_out").exists()
    # a URI OUT's --work holding another pipeline's fused table: it was replaced under that pipeline's run
    work = tmp_path / "work"
    work.mkdir()
    (work / "item_emb.parquet").write_bytes(b"another pipeline's table")
    r = run_cli("pipeline", "--out", f"file://{tmp_path}/uri_out", "--work", str(work))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        f"{work}: --work holds item_emb.parquet of an earlier pipeline (whose run refers to its fused table); pass "
        f"--resume to continue it, --overwrite to replace them, or another --work")
    assert (work / "item_emb.parquet").read_bytes() == b"another pipeline's table"
    (work / "item_emb.parquet").unlink()  # what a first attempt that failed before fuse leaves: its run again works
    (work / "data").mkdir()
    (work / "item_raw_emb.parquet.parts").mkdir()
    from mmctr_ray.pipeline import check_work

    check_work(f"file://{tmp_path}/uri_out", work, resume=False, overwrite=False)
    # the --work of a pipeline of another OUT: the refusal suggested --overwrite, which replaced the fused table that
    # OUT's run was trained on (its predict and compare then refused it as "rewritten since")
    from mmctr_ray.pipeline import WORK_OWNER, claim_work

    claim_work(f"file://{tmp_path}/first", work)
    (work / "item_emb.parquet").write_bytes(b"the first pipeline's table")
    check_work(f"file://{tmp_path}/uri_out", work, resume=False, overwrite=True)  # a claim whose OUT has no run
    (tmp_path / "first" / "run").mkdir(parents=True)  # (it failed before training) is no one's to keep
    (tmp_path / "first" / "run" / "config.yaml").write_text("{}")
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(OutputExistsError, match=rf"^{re.escape(str(work))}: --work of the pipeline whose OUT is "
                                                    rf"file://{re.escape(str(tmp_path))}/first \(pipeline.out there; "
                                                    r"its run refers to the fused table here, which this one would "
                                                    r"replace\); pass another --work$"):
            check_work(f"file://{tmp_path}/uri_out", work, resume=resume, overwrite=overwrite)
    check_work(f"file://{tmp_path}/first/", work, resume=True, overwrite=False)  # its own OUT, however spelt
    assert (work / WORK_OWNER).read_text() == f"file://{tmp_path}/first\n"
    # --embed under a config that trains on the shipped vectors (the default's fusion.strategy given): embed's hours
    # of encoding were thrown away without a word
    r = run_cli("pipeline", "--out", str(tmp_path / "embed_out"), "--embed")
    assert r.returncode == 2 and "--embed: the config's fusion.strategy is given" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "embed_out").exists()


def test_pipeline_on_local_data_tells_its_problems_before_ray_starts(tmp_path):
    """The pipeline validated `--data` as its first step after Ray had started: a wrong folder waited for a local
    Ray (seconds, and its start-up lines) before its one-line reason."""
    (tmp_path / "empty").mkdir()
    r = run_cli("pipeline", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "empty"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"error: {tmp_path / 'empty'}: holds no MicroLens_1M_x1/ folder" in r.stdout
    assert "pipeline stopped: validate exited 1" in r.stderr
    assert "started a local Ray" not in r.stderr and "== pipeline: fuse" not in r.stderr
    assert not [p.name for p in (tmp_path / "out").iterdir() if not p.name.endswith(".mmctr.lock")]


def test_pipeline_overwrite_drops_the_replaced_runs_outputs_first(tmp_path):
    """`--overwrite` replaced the run but kept its submission.zip: a new attempt that failed before predict left
    the old submission beside the new run, looking like its own. And it left the run and the features summary until
    their steps: `--resume` of an attempt killed before training continued the replaced run (on data synthesized
    anew with other `--train-rows`: no item changed, so no check refused it) and kept the old summary."""
    from mmctr_ray.pipeline import drop_replaced

    local, work, uri_out = tmp_path / "local", tmp_path / "work", tmp_path / "uri_out"
    for folder in (local, work, uri_out):
        folder.mkdir()
        (folder / "submission.zip").write_bytes(b"the replaced run's")
        (folder / "item_emb.parquet").write_bytes(b"kept: its step rewrites it")
        (folder / "item_raw_emb.parquet").write_bytes(b"kept by an attempt with --embed: embed rewrites it")
        for name in ("run/checkpoint_epoch_001/model.pt", "run/config.yaml", "features/features_summary.json"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("the replaced attempt's")
    drop_replaced(local, local)
    drop_replaced(f"file://{uri_out}", work)
    for folder in (local, work, uri_out):
        assert sorted(p.name for p in folder.iterdir()) == ["item_emb.parquet", "item_raw_emb.parquet"]
    (local / "item_raw_emb.embed.json").write_text("{}")
    drop_replaced(local, local, embed=False)  # no embed step rewrites them: they went with the replaced attempt
    assert [p.name for p in local.iterdir()] == ["item_emb.parquet"]


def test_pipeline_overwrite_replaces_only_what_a_pipeline_wrote(tmp_path, capsys):
    """`demo --out ~/proj --overwrite` replaced real MicroLens files kept in ~/proj/data with synthetic data (the
    synth step overwrote a folder without synth.json), and removed a ~/proj/run or ~/proj/features of anything.
    Refused before anything is touched; a pipeline's own outputs are still replaced."""
    out = tmp_path / "proj"
    real = out / "data" / "MicroLens_1M_x1" / "train.parquet"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"the user's real data")
    assert main(["demo", "--out", str(out), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mmctr demo: error: {out / 'data'}: data `mmctr synth` did not write (no synth.json), which --overwrite "
        f"would replace with synthetic data: pass --data {out / 'data'} to use it, or another --out")
    (out / "data" / "synth.json").write_text("{}")  # a pipeline's synthetic data: replaced as before
    (out / "run").mkdir()
    (out / "run" / "notes.txt").write_text("mine")
    assert main(["pipeline", "--out", str(out), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mmctr pipeline: error: {out / 'run'}: not a run of `mmctr train` (it holds notes.txt); --overwrite "
        f"replaces a pipeline's outputs only: move it away, or pass another --out")
    assert real.read_bytes() == b"the user's real data" and (out / "run" / "notes.txt").is_file()
    from mmctr_ray.pipeline import check_replaceable

    (out / "run" / "config.yaml").write_text("{}")
    (out / "features").mkdir()
    (out / "features" / "features_summary.json").write_text("{}")
    check_replaceable(str(out), out, synthesizes=True)  # all of them a pipeline's: nothing refused
    (out / "features" / ".features_summary.json.partial-12-ab").write_text("")  # a kill's leftover: its own
    check_replaceable(str(out), out, synthesizes=True)
    (out / "features" / "mine.txt").write_text("mine")  # a features output holds its two files only
    with pytest.raises(OutputExistsError, match=r"features: not a features output \(it holds mine.txt\); --overwrite "
                                                r"replaces a pipeline's outputs only"):
        check_replaceable(str(out), out, synthesizes=True)
    (out / "features" / "mine.txt").unlink()
    (out / "data" / "synth.json").unlink()
    check_replaceable(str(out), out, synthesizes=False)  # --data given: OUT/data is not synthesized into


def test_a_relative_output_in_a_ray_job_is_refused(tmp_path, capsys, monkeypatch):
    """A Ray job runs in its copy of the working_dir, which Ray deletes with its session: `python jobs/train.py
    --out R20` trained there, and the resubmitted `--resume` found nothing to resume."""
    package = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_57144ade06c1aaf2"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    assert main(["train", "--data", str(tmp_path), "--out", "R20"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mmctr train: error: --out R20: a relative path in a Ray job, which lands in the job's copy of its "
        f"working_dir ({package}), deleted with Ray's session; give an absolute path every node reaches, or a "
        f"storage URI")
    assert main(["pipeline", "--data", str(tmp_path), "--out", "file:///x/p", "--work", "w"]) == 2
    assert "error: --work w: a relative path in a Ray job" in capsys.readouterr().err
    assert not (package / "R20").exists()
    monkeypatch.chdir(tmp_path)  # elsewhere a relative --out is the user's: refused here only for a missing DATA
    main(["train", "--data", str(tmp_path / "none"), "--out", "R20"])
    assert "a relative path in a Ray job" not in capsys.readouterr().err


def test_a_work_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    """`--work /mnt/shared/work/p1` on a mount still the root's (a cluster without cluster.yaml's chown), or
    below a file: a PermissionError or NotADirectoryError traceback."""
    (tmp_path / "afile").write_text("")
    assert main(["pipeline", "--out", f"file://{tmp_path}/uri_out", "--work", str(tmp_path / "afile" / "w")]) == 2
    assert capsys.readouterr().err.strip() == (f"mmctr pipeline: error: {tmp_path / 'afile' / 'w'}: cannot create the "
                                               f"folder (Not a directory); --work must be a folder this user can write")


def test_a_pipeline_that_synthesizes_its_data_forgets_the_uri_its_data_was_a_copy_of(tmp_path, monkeypatch):
    """`--overwrite` without --data after an attempt on a --data URI synthesizes WORK/data anew: its data.source
    (which says WORK/data is that URI's copy) goes first, or a later --resume would be refused as "ran on --data"."""
    import mmctr_ray.cli as cli
    import mmctr_ray.train_driver
    from mmctr_ray import pipeline, ray_env

    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "x.parquet").write_bytes(b"the copy of the URI")
    (out / pipeline.DATA_SOURCE).write_text("s3://bucket/real\n")
    monkeypatch.setattr(cli, "_start_ray", lambda *a, **k: None)
    monkeypatch.setattr(mmctr_ray.train_driver, "check_local_workers", lambda *a: None)
    monkeypatch.setattr(ray_env, "check_actors", lambda *a: None)
    synthesized = []
    monkeypatch.setattr(cli, "cmd_synth", lambda args: synthesized.append(
        (args.out, (out / pipeline.DATA_SOURCE).exists())) or 1)  # the steps stop there
    assert main(["pipeline", "--out", str(out), "--overwrite"]) == 1
    assert synthesized == [(out / "data", False)]


def test_a_resumed_pipeline_publishes_what_a_kill_cut_from_a_uri_outs_upload(tmp_path):
    """A stage --resume skips (its output kept in --work) was never uploaded again: a kill during its upload left
    OUT without it, or with a cut copy, for good."""
    from mmctr_ray.pipeline import publish

    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    for name in ("item_emb.parquet", "item_emb.pca.npz", "item_emb.fusion.json"):
        (work / name).write_bytes(name.encode() * 10)
    (out / "item_emb.parquet").write_bytes(b"cut")  # the upload the kill stopped
    (out / "item_emb.fusion.json").write_bytes(b"item_emb.fusion.json" * 10)  # whole: not sent again
    os.utime(out / "item_emb.fusion.json", ns=(0, 0))
    publish("fuse", work, f"file://{out}", missing_only=True)
    assert all((out / n).read_bytes() == (work / n).read_bytes() for n in ("item_emb.parquet", "item_emb.pca.npz"))
    assert (out / "item_emb.fusion.json").stat().st_mtime_ns == 0
    (work / "features").mkdir()  # a folder: a kill between its files left one of two
    for name in ("features_summary.json", "config.yaml"):
        (work / "features" / name).write_text(name)
    (out / "features").mkdir()
    (out / "features" / "config.yaml").write_text("config.yaml")
    publish("features", work, f"file://{out}", missing_only=True)
    assert sorted(p.name for p in (out / "features").iterdir()) == ["config.yaml", "features_summary.json"]
    # fused again as `given` (--overwrite), which writes no PCA: the earlier fit's stayed in OUT beside the new table
    (work / "item_emb.pca.npz").unlink()
    publish("fuse", work, f"file://{out}")
    assert not (out / "item_emb.pca.npz").exists() and (out / "item_emb.parquet").is_file()


def test_a_resume_without_embed_does_not_publish_an_embed_attempts_embeddings(tmp_path, monkeypatch):
    """An attempt with --embed killed before fuse, resumed without it (allowed: nothing fused yet), uploaded that
    attempt's item_raw_emb.parquet to the URI OUT as if the run had used it."""
    import dataclasses

    import mmctr_ray.cli as cli
    import mmctr_ray.train_driver
    from mmctr_ray import ray_env
    from mmctr_ray.data.synthetic import SynthSpec

    work, out = tmp_path / "work", tmp_path / "out"
    (work / "data").mkdir(parents=True)
    out.mkdir()
    (work / "data" / "synth.json").write_text(json.dumps({"spec": dataclasses.asdict(SynthSpec())}))
    (work / "item_raw_emb.parquet").write_bytes(b"the --embed attempt's")
    monkeypatch.setattr(cli, "_start_ray", lambda *a, **k: None)
    monkeypatch.setattr(mmctr_ray.train_driver, "check_local_workers", lambda *a: None)
    monkeypatch.setattr(ray_env, "check_actors", lambda *a: None)
    monkeypatch.setattr(cli, "cmd_validate", lambda args: 1)  # the steps stop at the first
    assert main(["pipeline", "--out", f"file://{out}", "--work", str(work), "--resume"]) == 1
    assert not (out / "item_raw_emb.parquet").exists()


def test_pipeline_refuses_workers_a_local_ray_cannot_feed_before_its_first_step(tmp_path, capsys, monkeypatch):
    """The worker check runs once Ray is up, before synth and the other steps ahead of training (which take hours
    at full scale with --embed), not only when the train step starts."""
    import ray

    import mmctr_ray.cli as cli
    import mmctr_ray.ray_env as ray_env

    monkeypatch.setattr(cli, "_start_ray", lambda *a, **k: None)  # a 2-CPU local Ray (--num-cpus 2), as if started
    monkeypatch.setattr(ray_env, "private_local_ray", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--workers", "2"]) == 2
    assert capsys.readouterr().err.strip().endswith("need 3 CPUs; this local Ray has 2: lower --workers (or "
                                                    "--cpus-per-worker), or give it 3 logical CPUs with --num-cpus "
                                                    "3 (the workers then share cores)")
    assert not Layout(out / "data").item_info.exists()  # no step ran
    assert main(["demo", "--out", str(tmp_path / "out2"), "--actors", "2"]) == 2  # predict's (and embed's) actors
    assert "2 actors × 1 CPU and 1 CPU for reading the data need 3 CPUs" in capsys.readouterr().err
    assert not Layout(tmp_path / "out2" / "data").item_info.exists()


def test_on_a_small_machine_the_local_ray_gives_the_reads_a_logical_cpu_beside_the_pool(synth_dir, tmp_path,
                                                                                        monkeypatch, caplog):
    """One training worker on a 1-core machine (or two on 2 cores) takes every CPU Ray counts, and the Ray Data
    reads that feed it would wait for good: without --num-cpus the private local Ray gets one more logical CPU. A
    pool larger than the machine, or an explicit --num-cpus, is left to the pool check's one-line error."""
    import ray
    from ray._private import utils as ray_utils

    import mmctr_ray.ray_env as ray_env

    # cores, pool CPUs -> logical CPUs (None: Ray's own count)
    cases = {(1, 1.0): 2, (2, 2.0): 3, (2, 1.0): None, (1, 0.0): None, (2, 3.0): None, (4, 3.5): 5, (8, 8.0): 9}
    assert {case: ray_env.logical_cpus(*case) for case in cases} == cases

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_env, "_loopback_only", lambda: None)
    monkeypatch.setattr(ray_env, "_token_auth_on", lambda: None)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # init_ray leaves a set value alone
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_utils, "get_num_cpus", lambda *a, **k: 1)

    def init(**kw):  # what the private local Ray would be started with; the command then stops
        started.append(kw["num_cpus"])
        raise ray_env.ConfigError("stopped before Ray started")

    monkeypatch.setattr(ray, "init", init)
    caplog.set_level("INFO", logger="mmctr_ray.ray_env")
    train = ["train", "--data", str(synth_dir), "--out", str(tmp_path / "run"), "--config", "configs/tiny.yaml"]
    for argv, logical in [(train, 2), ([*train, "--num-cpus", "1"], 1),
                          (["demo", "--out", str(tmp_path / "demo")], 2)]:
        assert main(argv) == 2 and started.pop() == logical, argv
    assert "this machine has 1 CPU and the workers or actors take 1: the local Ray gets 2 logical CPUs" in caplog.text
    monkeypatch.setattr(ray_utils, "get_num_cpus", lambda *a, **k: 2)
    for argv, logical in [([*train, "--workers", "2"], 3), ([*train, "--workers", "3"], None),
                          (["demo", "--out", str(tmp_path / "demo"), "--actors", "2"], 3),
                          (["demo", "--out", str(tmp_path / "demo"), "--actors", "2", "--gpus-per-actor", "1"], None)]:
        assert main(argv) == 2 and started.pop() == logical, argv


def test_a_ctrl_c_while_ray_starts_is_held_until_it_has_started_and_a_second_is_not(synth_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    """A KeyboardInterrupt inside ray.init left a half-started Ray whose teardown at exit segfaulted: SIGINT 2-7 s
    into `mmctr train` on 2 cores, 2 of 30 tries (exit -11 after the "interrupted" line); 0 of 40 with the hold
    (2026-12-07). The first Ctrl-C waits until the Ray has started and is registered for the command's stop_ray;
    a second is raised at once; an error of the start is not hidden by a held Ctrl-C."""
    import ray
    from ray._private import utils as ray_utils

    import mmctr_ray.ray_env as ray_env

    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python runs the handler between bytecodes of the main thread

    @contextlib.contextmanager
    def no_ctrl_c_escapes(what):  # a KeyboardInterrupt that escaped would end the whole pytest session
        try:
            yield
        except KeyboardInterrupt:
            pytest.fail(f"a Ctrl-C escaped: {what}")

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    done = []
    with pytest.raises(KeyboardInterrupt):
        with ray_env.ctrl_c_held("the local Ray"):
            with no_ctrl_c_escapes("the first Ctrl-C is held"):
                ctrl_c()
            done.append("started")  # the rest of the start ran
    assert done == ["started"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert capsys.readouterr().err == ("Ctrl-C: stopping once the local Ray has started (a few seconds; Ctrl-C again "
                                       "to stop at once)\n")
    with pytest.raises(KeyboardInterrupt):
        with ray_env.ctrl_c_held("the local Ray"):
            with no_ctrl_c_escapes("the first Ctrl-C is held"):
                ctrl_c()
            ctrl_c()  # the second: at once
            done.append("not reached")
    assert done == ["started"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with no_ctrl_c_escapes("an error of the start is raised, not the held Ctrl-C"):
        with pytest.raises(ConfigError, match="the start failed"):
            with ray_env.ctrl_c_held("the local Ray"):
                ctrl_c()
                raise ConfigError("the start failed")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(sys, "stderr", None)  # a stderr that cannot be written to: the hold raises nothing
        with ray_env.ctrl_c_held("the local Ray"):
            with no_ctrl_c_escapes("the hold wrote to a stderr that is gone"):
                ctrl_c()
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append("theirs"))  # another handler: left to it
    try:
        with no_ctrl_c_escapes("another handler is left alone"):
            with ray_env.ctrl_c_held("the local Ray"):
                ctrl_c()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert caught == ["theirs"]
    # the private Ray's start runs under the hold, registration included: the held Ctrl-C comes once the Ray is
    # the command's to stop (stop_ray shuts down what _PRIVATE names)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_env, "_loopback_only", lambda: None)
    monkeypatch.setattr(ray_env, "_token_auth_on", lambda: None)
    for name in ("_keep_python_sigterm", "drop_benign_ray_lines", "quiet_worker_count_warning"):
        monkeypatch.setattr(ray_env, name, lambda: None)
    for name in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_USAGE_STATS_ENABLED", "RAY_COLOR_PREFIX"):
        monkeypatch.setenv(name, "0")  # init_ray leaves a set value alone
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_utils, "get_num_cpus", lambda *a, **k: 2)
    private = {**ray_env._PRIVATE, "at_exit": True}  # this test's own: no atexit hook for a Ray that is not there
    monkeypatch.setattr(ray_env, "_PRIVATE", private)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="127.0.0.1:1"))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    monkeypatch.setattr(ray, "init", lambda **kw: ctrl_c())
    with pytest.raises(KeyboardInterrupt):
        ray_env.init_ray(num_cpus=2)
    assert private["started"] is True and private["gcs"] == "127.0.0.1:1"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    held_in_init = []

    def init(**kw):
        held_in_init.append(signal.getsignal(signal.SIGINT) is not signal.default_int_handler)
        raise ray_env.ConfigError("stopped before Ray started")

    monkeypatch.setattr(ray, "init", init)
    assert main(["train", "--data", str(synth_dir), "--out", str(tmp_path / "run"), "--config",
                 "configs/tiny.yaml"]) == 2
    assert held_in_init == [True] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C (KeyboardInterrupt, or a stage's Interrupted saying what it keeps) is no traceback: one line and the
    shell's status for it, with how to continue where the command can."""
    import mmctr_ray.cli as cli
    from mmctr_ray.errors import Interrupted

    def stop(error):
        def command(args):
            raise error
        return command

    train = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", "configs/tiny.yaml"]
    tune = ["tune", "--data", str(tmp_path), "--out", str(tmp_path / "tune"), "--config", "search.yaml"]
    for name, argv, error, line in [
            ("cmd_report", ["report", str(tmp_path)], KeyboardInterrupt(), "mmctr report: interrupted"),
            ("cmd_train", train, KeyboardInterrupt(), "mmctr train: interrupted: nothing written yet; run the same "
                                                      "command again"),  # before the stage said what it keeps
            ("cmd_train", [*train, "--workers", "2", "--set", "train.epochs=9", "--set", "model.dropout=0.2",
                           "--set", "train.lr = 3e-4"],  # on --resume, train.lr resets the decayed rate: dropped
             Interrupted("RUN keeps the checkpoints of epochs 1–2"),  # --resume takes no --config nor model.*
             f"mmctr train: interrupted: RUN keeps the checkpoints of epochs 1–2; continue with `mmctr train --data "
             f"{tmp_path} --out {tmp_path / 'run'} --workers 2 --set train.epochs=9 --resume`"),
            ("cmd_train", train, Interrupted("RUN keeps the checkpoint of epoch 1", signal.SIGTERM),  # a scheduler's
             f"mmctr train: terminated: RUN keeps the checkpoint of epoch 1; continue with `mmctr train --data "
             f"{tmp_path} --out {tmp_path / 'run'} --resume`"),
            ("cmd_tune", [*tune, "--num-samples", "8", "--num-cpus=3"], Interrupted("1 trial ended"),
             f"mmctr tune: interrupted: 1 trial ended; continue with `mmctr tune --data {tmp_path} --out "
             f"{tmp_path / 'tune'} --num-cpus=3 --resume`"),
            ("cmd_pipeline", ["demo", "--out", str(tmp_path / "my demo"), "--embed", "--set",
                              "train.epochs=3"], KeyboardInterrupt(),
             f"mmctr demo: interrupted; continue with `mmctr demo --out '{tmp_path / 'my demo'}' --embed --set "
             f"train.epochs=3 --resume`"),
            ("cmd_pipeline", ["demo", "--out", str(tmp_path / "my demo"), "--overwrite"], KeyboardInterrupt(),
             "mmctr demo: interrupted; run the same command again"),  # before its run began: --resume would
            # continue the attempt it replaces
            ("cmd_embed", ["embed", "--data", str(tmp_path), "--out", str(tmp_path / "e.parquet")], KeyboardInterrupt(),
             "mmctr embed: interrupted; run the same command again to continue from the shards "
             "already encoded")]:
        monkeypatch.setattr(cli, name, stop(error))
        assert main(argv) == 128 + getattr(error, "signum", signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM
        assert capsys.readouterr().err.strip() == line
    # ended before the stage said what it keeps (while Ray started, or the splits were read): what --out holds says
    # how to go on; it was a bare "terminated", and a search stopped before its first trial cannot be resumed
    def wrote(names, error=KeyboardInterrupt()):  # the stage's first files, then the signal
        def command(args):
            from mmctr_ray.locking import began

            for name in names:
                (Path(args.out) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(args.out) / name).write_text("{}")
            if names:  # as train's _prepare_run_dir and tune's _prepare record the output they began
                began(args.out)
            raise error
        return command

    for name, argv, names, line in [
            ("cmd_train", train, ["config.yaml"], f"mmctr train: interrupted: {tmp_path / 'run'} holds no checkpoint "
             f"yet; continue with `mmctr train --data {tmp_path} --out {tmp_path / 'run'} --resume`"),
            ("cmd_train", [*train, "--overwrite"], [], "mmctr train: interrupted; run the same command again"),
            ("cmd_tune", tune, ["search.yaml", "settings.json"], f"mmctr tune: interrupted: no trial had started; "
             f"start it again with `mmctr tune --data {tmp_path} --out {tmp_path / 'tune'} --config search.yaml "
             f"--overwrite`"),
            ("cmd_tune", [*tune, "--overwrite"], ["settings.json", "tune/x"], f"mmctr tune: interrupted: the "
             f"search's state is saved "
             f"as it goes (every 2 s); continue with `mmctr tune --data {tmp_path} --out {tmp_path / 'tune'} "
             f"--resume`")]:
        monkeypatch.setattr(cli, name, wrote(names))
        assert main(argv) == 130
        assert capsys.readouterr().err.strip() == line
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(tmp_path / "tune")
    with monkeypatch.context() as job:  # a Ray job's entrypoint, jobs/train.py: main(["train", *its arguments])
        job.setattr(sys, "argv", ["jobs/train.py", *train[1:]])
        job.setattr(cli, "cmd_train", stop(Interrupted("RUN keeps the checkpoint of epoch 1")))
        assert main(train) == 130
        assert capsys.readouterr().err.strip() == (f"mmctr train: interrupted: RUN keeps the checkpoint of epoch 1; "
                                                   f"continue with `python jobs/train.py --data {tmp_path} --out "
                                                   f"{tmp_path / 'run'} --resume`")  # it said `mmctr train ...`
    import mmctr_ray.ray_env as ray_env

    def terminated(code):  # what the SIGTERM handler init_ray installs does: record it, then Ray's sys.exit(15)
        def command(args):
            ray_env._PRIVATE["sigterm"] = True
            raise SystemExit(code)
        return command

    embed = ["embed", "--data", str(tmp_path), "--out", str(tmp_path / "e.parquet")]
    monkeypatch.setattr(cli, "cmd_embed", stop(SystemExit(15)))  # not a SIGTERM: sys.exit(15) of some code
    with pytest.raises(SystemExit) as exit_:
        main(embed)
    assert exit_.value.code == 15
    for code in (15, 1):  # Ray's driver handler exits 15; a ray.get re-raises it as SystemExit(1)
        monkeypatch.setattr(cli, "cmd_embed", terminated(code))
        assert main(embed) == 143
        assert capsys.readouterr().err.strip() == ("mmctr embed: terminated; run the same command again to "
                                                   "continue from the shards already encoded")
    monkeypatch.setattr(cli, "cmd_pipeline", terminated(15))
    assert main(["pipeline", "--data", str(tmp_path), "--out", str(tmp_path / "p")]) == 143
    assert capsys.readouterr().err.strip() == (f"mmctr pipeline: terminated; continue with `mmctr pipeline --data "
                                               f"{tmp_path} --out {tmp_path / 'p'} --resume`")
    monkeypatch.setattr(cli, "cmd_embed", stop(SystemExit(15)))  # the next command in this process: not SIGTERM'd
    with pytest.raises(SystemExit) as exit_:
        main(embed)
    assert exit_.value.code == 15
    import ray

    shut = []  # the Ray the command started goes down before the line (its actors' last logs come first) ...
    monkeypatch.setattr(ray, "shutdown", lambda **kwargs: shut.append(1))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="127.0.0.1:1"))
    monkeypatch.setitem(ray_env._PRIVATE, "gcs", "127.0.0.1:1")
    assert main(["report", str(tmp_path)]) == 130 and shut == [1]
    assert main(["report", str(tmp_path)]) == 130 and shut == [1]  # ... and a Ray it did not start stays up:
    monkeypatch.setitem(ray_env._PRIVATE, "gcs", "127.0.0.1:2")  # one started after it shut its own down
    assert main(["report", str(tmp_path)]) == 130 and shut == [1]


def test_a_signal_names_the_run_an_overwrite_keeps_aside(tmp_path, capsys, monkeypatch):
    """A Ctrl-C or SIGTERM of `train --overwrite` before the new run's first checkpoint (here before training, where
    the stage's own line is not said) leaves the earlier run in .NAME.replaced: the command's line says so, which it
    did not (the run looked lost); once RUN has a checkpoint, it does not, the earlier run being replaced."""
    import mmctr_ray.cli as cli
    import mmctr_ray.ray_env as ray_env
    from mmctr_ray.config import load_config
    from mmctr_ray.train_driver import _prepare_run_dir, run_location

    run = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path), "--out", str(run), "--overwrite"]

    def prepared_then(error, checkpointed=False):
        def command(args):
            _prepare_run_dir(run_location(str(args.out)), load_config(), resume=False, overwrite=True)
            if checkpointed:
                (run / "checkpoint_epoch_001").mkdir()
            if isinstance(error, SystemExit):
                ray_env._PRIVATE["sigterm"] = True  # as Ray's SIGTERM handler, recorded by init_ray's
            raise error
        return command

    aside = tmp_path / ".run.replaced"
    for error, code, said in [(KeyboardInterrupt(), 130, "interrupted"), (SystemExit(15), 143, "terminated")]:
        shutil.rmtree(aside, ignore_errors=True)
        run.mkdir(exist_ok=True)
        (run / "config.yaml").write_text("name: earlier\n")
        (run / "checkpoint_epoch_001").mkdir(exist_ok=True)  # a run with a checkpoint: set aside, not deleted
        monkeypatch.setattr(cli, "cmd_train", prepared_then(error))
        assert main(argv) == code
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"mmctr train: {said}: {run} holds no checkpoint yet; the run --overwrite was to replace is kept in "
            f"{aside}; continue with `mmctr train --data {tmp_path} --out {run} --resume`")
        assert (aside / "config.yaml").read_text() == "name: earlier\n"
    uri = f"file://{run}"  # a URI RUN (file:// here, for s3:// and the rest) is not read: the record is
    monkeypatch.setattr(cli, "cmd_train", prepared_then(KeyboardInterrupt()))
    shutil.rmtree(aside)
    (run / "config.yaml").write_text("name: earlier\n")
    assert main(["train", "--data", str(tmp_path), "--out", uri, "--overwrite"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mmctr train: interrupted; the run --overwrite was to replace waits in file://{aside} until {uri} has a "
        f"checkpoint; continue with `mmctr train --data {tmp_path} --out {uri} --resume`")
    import mmctr_ray.checkpoint as checkpoint

    monkeypatch.setattr(cli, "cmd_train", prepared_then(KeyboardInterrupt(), checkpointed=True))
    monkeypatch.setattr(checkpoint, "epoch_checkpoints", lambda r: sorted(Path(r).glob("checkpoint_epoch_*")))
    shutil.rmtree(aside)
    (run / "config.yaml").write_text("name: earlier\n")
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mmctr train: interrupted: {run} keeps the checkpoint of epoch 1; continue with `mmctr train --data "
        f"{tmp_path} --out {run} --resume`")


STUCK_STAGE = """
import os, signal, sys, threading, time
from pathlib import Path
import mmctr_ray.cli as cli
import mmctr_ray.ray_env as ray_env

how, end_s = sys.argv[1], float(sys.argv[2])
ray_env.SIGTERM_END_S = end_s

def train(args):  # what init_ray leaves: Ray's driver handler (sys.exit(15)), with init_ray's record of a SIGTERM
    Path(args.out).mkdir()
    (Path(args.out) / "config.yaml").write_text("{}")
    ended = {"exits": lambda *a: sys.exit(15), "ignores": lambda *a: None}.get(how)
    signal.signal(signal.SIGTERM, ended or (lambda *a: sys.exit(15)))
    if ended:
        ray_env._keep_python_sigterm()
    else:  # a main thread in one of Ray's C++ waits on a GCS the same SIGTERM ended: no Python handler runs;
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # as here, where the signal reaches only the
        # watchdog's thread (started before) and the main thread's sleep is not interrupted
    threading.Thread(target=ready_when_asleep, daemon=True).start()
    threading.Thread(target=lines_after_it, daemon=True).start()
    time.sleep(120)
    print("not ended", flush=True)

def lines_after_it():  # as Ray's C++ core worker writes to stderr after the raylet's end, past any Python filter
    while True:
        time.sleep(0.05)
        if ray_env._PRIVATE.get("said"):
            os.write(2, b"core_worker.cc:609: Attempting to recover 3 lost objects by resubmitting their tasks\\n")

def ready_when_asleep():  # "ready" once the main thread has slept a while: in its sleep (a signal that came while
    tid, asleep = threading.main_thread().native_id, 0  # it was still running Python would run its handler)
    while asleep < 5:
        time.sleep(0.05)
        state = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        asleep = asleep + 1 if state == "S" else 0
    print("ready", flush=True)

cli.cmd_train = train
sys.exit(cli.main(["train", "--data", sys.argv[3], "--out", sys.argv[4]]))
"""


@pytest.mark.parametrize("how", ["stuck", "ignores", "exits"])
def test_a_sigterm_says_the_commands_line_at_once_and_ends_it_even_when_the_main_thread_cannot(tmp_path, how):
    """A SIGTERM to the whole process group (GNU timeout, Slurm, systemd) also ends the local Ray's raylet and GCS,
    and the driver exited 1 from Ray's C++ with no line: within a fraction of a second (the core worker, on the
    raylet's end) or after 60 s in a wait on the GCS that runs no Python handler (`mmctr tune` under `timeout`: 4
    of 34 tries). The watchdog thread says the line at once, then ends the command: at SIGTERM_HANDLER_S when the
    main thread has run no handler, at SIGTERM_END_S when it has but the command goes on; a command whose handler
    ends it says its line once, and it is the last."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", STUCK_STAGE, how, "3", str(tmp_path), str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        if how == "stuck":  # as Ray's C++ ends the driver soon after its raylet: the line must be out by then
            time.sleep(1.0)
            proc.kill()
        out, err = proc.communicate(timeout=60)  # well before the stage's sleep of 120 s ends
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == (-signal.SIGKILL if how == "stuck" else 143) and "not ended" not in out, (
        proc.returncode, err[-2000:])
    line = (f"mmctr train: terminated: {run} holds no checkpoint yet; continue with `mmctr train --data {tmp_path} "
            f"--out {run} --resume`")
    assert [x for x in err.splitlines() if x.startswith("mmctr train:")] == [line], err[-2000:]
    assert err.strip().splitlines()[-1] == line


def test_a_sigterm_before_ray_starts_is_the_commands_line_too(tmp_path):
    """Before Ray installs its SIGTERM handler (synth, validate and fuse start none; every stage checks its input
    first), SIGTERM's default ended the process at once: 143 and no line, and synth's staging folder stayed."""
    code = ("import sys, time\nimport mmctr_ray.cli as cli\n"
            "def validate(args):\n    print('ready', flush=True)\n    time.sleep(60)\n    print('not ended')\n"
            "cli.cmd_validate = validate\nsys.exit(cli.main(['validate', sys.argv[1]]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143 and "not ended" not in out, (proc.returncode, err[-2000:])
    assert err.strip().splitlines() == ["mmctr validate: terminated"]


def test_pipeline_resume_refuses_a_config_that_is_not_what_out_keeps(tmp_path, capsys):
    """--resume reuses OUT's run (its own config) or, before training started, its fused table: asking for a
    different config or fusion is a one-line error before Ray starts, not silently ignored or mixed."""
    from mmctr_ray.config import load_config

    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)
    base = ["pipeline", "--out", str(out), "--resume", "--config", "configs/tiny.yaml"]
    # before training started: a fused table kept from an attempt with tiny.yaml's fusion (v4, 32 + 32) from the
    # shipped vectors
    pq.write_table(pa.table({"item_id": [0], "item_emb": [[0.0]]}), out / "item_emb.parquet")
    (out / "item_emb.fusion.json").write_text(json.dumps({"strategy": "v4", "dims": 128, "text_dim": 32,
                                                          "image_dim": 32, "source": "/d/item_feature.parquet"}))
    capsys.readouterr()
    assert main([*base, "--set", "fusion.text_dim=64"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"{out / 'item_emb.parquet'}: kept from the earlier attempt with fusion.text_dim=32, this command asks 64; "
        f"--resume reuses it: pass the --config and --embed it started with, or --overwrite to start again")
    assert main([*base, "--embed"]) == 2
    assert "fused from the shipped vectors, this command asks --embed" in capsys.readouterr().err
    from mmctr_ray import pipeline

    pipeline.check_resume(str(out), out, load_config("configs/tiny.yaml"), embed=False)  # what OUT keeps
    # once the run exists, its config.yaml is what continues: another model is refused, --set train.* is not
    cfg = load_config("configs/tiny.yaml", [f"data.item_vector={out / 'item_emb.parquet'}"])
    (out / "run" / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main([*base, "--set", "model.dropout=0.3"]) == 2
    assert f"{out / 'run' / 'config.yaml'}: model.dropout is {cfg.model.dropout!r}, this command asks 0.3; " \
           f"--resume continues the run with its own config" in capsys.readouterr().err
    pipeline.check_resume(str(out), out, load_config("configs/tiny.yaml", ["train.epochs=9", "train.lr=1e-4"]),
                          embed=False)  # the same run, more epochs at another lr: train --resume takes them
    assert main([*base, "--embed"]) == 2  # the run exists: the kept table still says how it was fused
    assert "fused from the shipped vectors, this command asks --embed" in capsys.readouterr().err
    # the data it synthesized and the embeddings it made are reused too: other size flags or models are refused
    import dataclasses

    from mmctr_ray.data.synthetic import SynthSpec

    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    (other / "data" / "synth.json").write_text(json.dumps({"spec": dataclasses.asdict(SynthSpec(train_rows=999))}))
    (other / "item_raw_emb.embed.json").write_text(json.dumps({"text_model": "/models/bert", "image_model": "RN50"}))
    synth = dataclasses.asdict(SynthSpec())  # what the default flags ask: --preset small
    with pytest.raises(ConfigError, match=r"data: synthesized with train_rows=999, this command asks 200000; "
                                          r"--resume reuses it: pass the size flags"):
        pipeline.check_resume(str(other), other, load_config(None), embed=False, synth=synth)
    pipeline.check_resume(str(other), other, load_config(None), False, synth={**synth, "train_rows": 999})
    with pytest.raises(ConfigError, match=r"embedded with --image-model RN50, this command asks ViT-B-32; "):
        pipeline.check_resume(str(other), other, load_config(None), embed=True,
                              models={"text_model": "/models/bert", "image_model": "ViT-B-32"})
    # an attempt on --data, resumed without it: refused before a new data set is synthesized beside its run
    (out / "item_emb.fusion.json").write_text(json.dumps({"strategy": "v4", "dims": 128, "text_dim": 32,
                                                          "image_dim": 32, "data": "/d", "source": "shipped"}))
    assert main(base) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"{out}: the earlier attempt ran on --data /d; pass it again with --resume (without --data the pipeline "
        f"synthesizes a data set)")
    assert not (out / "data").exists()
    # resumed with another --data: its fused table (and run) are of /d's items; they trained on without a word
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(out / 'item_emb.parquet'))}: kept from the earlier "
                                          rf"attempt on --data /d, this command asks {re.escape(str(tmp_path))}; "
                                          r"--resume reuses it and the run: pass the --data it started with"):
        pipeline.check_resume(str(out), out, load_config("configs/tiny.yaml"), False, data=str(tmp_path))
    pipeline.check_resume(str(out), out, load_config("configs/tiny.yaml"), False, data="/d")  # the same: resumes
    # ... or with a --data URI: its copy would be WORK/data, where /d's table and run are not from
    with pytest.raises(ConfigError, match=r"kept from the earlier attempt on --data /d, this command asks "
                                          r"s3://bucket/real; "):
        pipeline.check_resume(str(out), out, load_config("configs/tiny.yaml"), False, data="s3://bucket/real")
    # an attempt that synthesized its data, resumed with a --data URI: WORK/data was reused as its "copy"
    (other / "item_raw_emb.embed.json").unlink()
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(other / 'data'))}: synthesized by the earlier attempt "
                                          r"\(it ran without --data\), not a copy of s3://bucket/real; resume "
                                          r"without --data, or pass --overwrite to download s3://bucket/real instead"):
        pipeline.check_resume(str(other), other, load_config(None), False, data="s3://bucket/real")
    # an attempt on a --data URI (its copy in WORK/data), resumed without --data: the synth step refused it after
    # Ray started, advising --overwrite (which would delete the download)
    (other / pipeline.DATA_SOURCE).write_text("s3://bucket/real\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(other))}: the earlier attempt ran on --data "
                                          r"s3://bucket/real; pass it again with --resume"):
        pipeline.check_resume(str(other), other, load_config(None), False, synth={**synth, "train_rows": 999})
    pipeline.check_resume(str(other), other, load_config(None), False, data="s3://bucket/real")  # its copy


def test_pipeline_resume_takes_the_train_settings_of_its_config_and_knows_its_embeddings(tmp_path, caplog):
    """A continued run took the train.* of --set only: `--resume --config b.yaml` (b: more epochs) ended at the old
    count with "nothing to train". And embed keeps its image model with absolute paths, which a relative
    --image-model never equalled: `--resume --embed` was refused for the command it started with."""
    from mmctr_ray import pipeline
    from mmctr_ray.config import load_config

    run = tmp_path / "out" / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(load_config("configs/tiny.yaml").to_dict()))
    asked = load_config("configs/tiny.yaml", ["train.epochs=20", "train.lr=1e-4", "model.dropout=0.5"])
    with caplog.at_level("INFO", logger="mmctr_ray.pipeline"):
        changes = pipeline.train_changes(run, asked)
    assert changes == ["train.epochs=20", "train.lr=0.0001"]  # train.* only: check_resume refuses the others
    assert "--resume: train.epochs 20, the run had 2" in caplog.text  # tiny.yaml: 2 epochs
    resumed = load_config(run / "config.yaml", changes)
    assert resumed.train == asked.train and resumed.model == load_config("configs/tiny.yaml").model
    assert pipeline.train_changes(run, load_config("configs/tiny.yaml")) == []

    out = tmp_path / "emb"
    text = tmp_path / "bert"
    text.mkdir()
    (text / "config.json").write_text("{}")
    out.mkdir()
    (out / "item_raw_emb.embed.json").write_text(json.dumps({"text_model": str(text), "image_model": CLIP_TINY}))
    (out / "item_emb.parquet").write_bytes(b"")
    (out / "item_emb.fusion.json").write_text(json.dumps({"strategy": "v4", "dims": 128, "text_dim": 32,
                                                          "image_dim": 32, "source": "/d/item_feature.parquet"}))
    r = run_cli("pipeline", "--out", str(out), "--resume", "--embed", "--text-model", str(text), "--image-model",
                "tests/assets/clip-tiny.json", "--config", "configs/tiny.yaml")  # relative, as typed in ROOT
    assert r.returncode == 2 and "embedded with" not in r.stderr, r.stderr  # the embeddings pass; the table not:
    assert "fused from the shipped vectors, this command asks --embed" in r.stderr


def test_pipeline_resume_summarises_the_data_again_when_its_data_settings_changed(synth_dir, tmp_path, monkeypatch,
                                                                                  caplog):
    """An attempt killed after features and before training: --resume kept features/ whatever data.* the command
    asked (the run's config, which pins them, did not exist yet), so OUT described other settings than its run."""
    import ray

    import mmctr_ray.cli as cli
    import mmctr_ray.ray_env as ray_env
    from mmctr_ray.config import load_config, save_config
    from mmctr_ray.fuse import fusion_overrides, run_fuse

    monkeypatch.setattr(cli, "_start_ray", lambda *a, **k: None)
    monkeypatch.setattr(ray_env, "private_local_ray", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    ran, trained = [], []
    predicted, report = [], cli.cmd_report
    for name in ("cmd_validate", "cmd_features", "cmd_train", "cmd_predict"):
        monkeypatch.setattr(cli, name, lambda args, name=name: ran.append(name.removeprefix("cmd_")) or (
            trained.append(args) if name == "cmd_train" else None) or (
            predicted.append(args) if name == "cmd_predict" else None) or 0)
    # the real report, with the arguments the pipeline gives it (a Namespace of its own: helper-135 found report's
    # new flags missing from it, an AttributeError at every pipeline's and demo's last step)
    monkeypatch.setattr(cli, "cmd_report", lambda args: ran.append("report") or report(args))
    out = tmp_path / "out"
    tiny = load_config("configs/tiny.yaml")
    fused = out / "item_emb.parquet"
    out.mkdir()
    run_fuse(synth_dir, fused, tiny.fusion, progress=lambda m: None)  # as the killed attempt fused it
    (out / "features").mkdir()
    save_config(load_config("configs/tiny.yaml", fusion_overrides(fused)), out / "features" / "config.yaml")
    (out / "features" / "features_summary.json").write_text("{}")
    (out / "run").mkdir()  # the final line reads the run's summary (train is not run here)
    (out / "run" / "summary.json").write_text(json.dumps({"best_valid_auc": 0.5, "best_epoch": 1}))
    (out / "run" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "valid_auc": 0.5, "valid_logloss": 0.7,
                                                           "train_loss": 0.7, "lr": 1e-3, "epoch_seconds": 1.0}) + "\n")
    base = ["pipeline", "--data", str(synth_dir), "--out", str(out), "--resume", "--config", "configs/tiny.yaml"]
    assert main(base) == 0 and ran == ["validate", "train", "predict", "report"]  # the same data.*: kept
    assert predicted[-1].task == "Task2"  # the submission's column: predict's default, and its --task passed on
    assert not any(r.getMessage().startswith("--task") for r in caplog.records)
    assert main([*base, "--task", "Task1&2"]) == 0 and predicted[-1].task == "Task1&2"
    warned = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("--task"))  # before training
    assert warned.startswith("--task Task1&2: Task 1 scores item embeddings") and "the config departs from it: " \
        "data.max_len 16 (fixed: 64); model.attention multihead" in warned and "will be written at the end" in warned
    ran.clear()
    assert main([*base, "--set", "data.max_len=8"]) == 0 and ran == ["validate", "features", "train", "predict",
                                                                       "report"]
    # a run to continue: "the same command again with --resume" keeps the rate the schedule reached (its own
    # --set train.lr, passed on, set the rate the run continues at); a train.lr the run did not have is a change
    save_config(load_config("configs/tiny.yaml", [*fusion_overrides(fused), "data.max_len=8"]), out / "run" /
                "config.yaml")
    for lr, passed in ((tiny.train.lr, []), (1e-5, ["train.lr=1e-05"])):
        trained.clear()
        assert main([*base, "--set", "data.max_len=8", "--set", f"train.lr={lr}"]) == 0
        assert trained[0].resume and [o for o in trained[0].overrides if o.startswith("train.lr")] == passed


def test_a_pipeline_refuses_a_fusion_wider_than_the_vectors_before_ray_starts(synth_dir, tmp_path, monkeypatch,
                                                                            capsys):
    """`--set fusion.text_dim=2000` was refused at the fuse step, after validate and Ray's start (~15 s)."""
    import mmctr_ray.cli as cli

    def start_ray(*args, **kwargs):
        raise AssertionError("Ray started before the fusion's widths were checked")

    monkeypatch.setattr(cli, "_start_ray", start_ray)
    code = main(["pipeline", "--data", str(synth_dir), "--out", str(tmp_path / "out"), "--config",
                 "configs/tiny.yaml", "--set", "fusion.text_dim=2000"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and re.fullmatch(r"mmctr pipeline: error: fusion\.text_dim=2000: expected at most min\(items − 1, "
                                      r"input width\) = min\(\d+, 768\) for the text PCA", err), err


def test_a_pipeline_resume_embeds_again_where_a_kill_left_the_table_without_its_record(synth_dir, tmp_path,
                                                                                         monkeypatch):
    """`mmctr embed` writes its record (.embed.json) after the table: a kill between the two left a table that
    --resume kept, whatever --text-model the command gave (the models are checked against the record). Now the step
    runs again, over the table, and reassembles it from the shards it keeps until the record is written."""
    import ray

    import mmctr_ray.cli as cli
    import mmctr_ray.ray_env as ray_env

    monkeypatch.setattr(cli, "_start_ray", lambda *a, **k: None)
    monkeypatch.setattr(ray_env, "private_local_ray", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    from mmctr_ray.config import load_config
    from mmctr_ray.fuse import run_fuse

    calls = {}
    for name in ("cmd_validate", "cmd_embed", "cmd_features", "cmd_train", "cmd_predict", "cmd_report"):
        monkeypatch.setattr(cli, name, lambda *a, name=name, **k: calls.setdefault(name, a) and 0)
    monkeypatch.setattr(cli, "_fuse_step", lambda args, data, fused, source: run_fuse(  # a table the steps after
        data, fused, load_config("configs/tiny.yaml").fusion, progress=lambda m: None) and 0)  # it read, not the
    # one asked
    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)  # the final line reads the run's summary (train is not run here)
    (out / "run" / "summary.json").write_text(json.dumps({"best_valid_auc": 0.5, "best_epoch": 1}))
    (out / "item_raw_emb.parquet").write_bytes(b"PAR1")  # the table, its record cut off by the kill
    text = tmp_path / "bert"
    text.mkdir()
    (text / "config.json").write_text("{}")
    argv = ["pipeline", "--data", str(synth_dir), "--out", str(out), "--resume", "--config", "configs/tiny.yaml",
            "--embed", "--text-model", str(text), "--image-model", CLIP_TINY]
    assert main(argv) == 0
    assert "cmd_embed" in calls and calls["cmd_embed"][0].overwrite  # over the table it left
    calls.clear()
    for name in ("item_emb.parquet", "item_emb.pca.npz", "item_emb.fusion.json"):  # fused from the shipped
        (out / name).unlink(missing_ok=True)  # vectors here: --resume --embed would refuse it
    (out / "item_raw_emb.embed.json").write_text(json.dumps({"text_model": str(text.resolve()),
                                                            "image_model": CLIP_TINY}))
    assert main(argv) == 0 and "cmd_embed" not in calls  # whole: kept


@pytest.mark.parametrize("stage", ["train", "tune", "pipeline", "demo"])
def test_resume_and_overwrite_together_are_refused_by_the_parser(stage, tmp_path, capsys):
    """Before, --resume silently won (or, in the pipeline, each step took the flag it read first)."""
    with pytest.raises(SystemExit) as exit_:
        main([stage, "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--resume", "--overwrite"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith("argument --overwrite: not allowed with argument --resume")
    assert not (tmp_path / "o").exists()


def test_rays_line_prefixes_are_plain_in_a_log_file_and_coloured_on_a_terminal(monkeypatch):
    import sys

    from mmctr_ray.ray_env import plain_log_prefixes

    monkeypatch.setenv("RAY_COLOR_PREFIX", "x")  # recorded as it was (unset too), so what the function sets below
    monkeypatch.delenv("RAY_COLOR_PREFIX")  # is undone after the test: its "0" stayed for the rest of the session
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    plain_log_prefixes()
    assert "RAY_COLOR_PREFIX" not in os.environ  # a terminal: Ray's colours
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)  # `mmctr train ... 2> train.log`
    plain_log_prefixes()
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")  # the user's own choice stays
    plain_log_prefixes()
    assert os.environ["RAY_COLOR_PREFIX"] == "1"
