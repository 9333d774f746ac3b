"""`mmctr pipeline`'s own logic, without Ray (its steps stubbed): what it refuses before a step runs, which steps a
--resume or an --overwrite runs again, the command an ended pipeline prints, what it publishes. Most of these came
from a hand mutation audit (helper-127): each fails on the mutant it was written for."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmctr_ray import pipeline, storage
from mmctr_ray.config import load_config
from mmctr_ray.errors import ConfigError, OutputExistsError


# helpers


def _stub_steps(monkeypatch, stop_at: str = "report", fuse_writes: bool = False) -> list[str]:
    """The pipeline's steps recorded instead of run (no Ray); ``stop_at`` exits 1, which ends the pipeline there."""
    import mmctr_ray.cli as cli
    import mmctr_ray.ray_env as ray_env
    import mmctr_ray.train_driver as train_driver

    monkeypatch.setattr(cli, "_start_ray", lambda *a, **k: None)
    monkeypatch.setattr(train_driver, "check_local_workers", lambda *a: None)
    monkeypatch.setattr(ray_env, "check_actors", lambda *a: None)
    ran: list[str] = []
    for step in ("synth", "validate", "embed", "features", "train", "predict", "report"):
        monkeypatch.setattr(cli, f"cmd_{step}",
                            lambda args, step=step: ran.append(step) or (1 if step == stop_at else 0))

    def fuse(args, data, out, source):
        ran.append("fuse")
        if fuse_writes:
            _fused_table(out)
        return 1 if stop_at == "fuse" else 0

    monkeypatch.setattr(cli, "_fuse_step", fuse)
    return ran


def _fused_table(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"item_id": pa.array([0, 1], pa.int64()),
                             "item_emb": pa.array([[0.0, 0.0], [1.0, 2.0]], pa.list_(pa.float32()))}), path)


# mmctr_ray/pipeline.py


def test_check_out_ignores_the_lock_files_a_failed_attempt_left_in_out(tmp_path):
    """(P2) OUT holding only OUT/.run.mmctr.lock (a pipeline that failed at validate) is not "not empty"."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".run.mmctr.lock").write_text("")
    pipeline.check_out(out, resume=False, overwrite=False)
    (out / "x").write_text("")
    with pytest.raises(OutputExistsError, match="not empty"):
        pipeline.check_out(out, resume=False, overwrite=False)


def test_check_work_refuses_a_kept_submission_without_resume_or_overwrite(tmp_path):
    """(P6) the submission a step would write over is one of the outputs --work refuses to replace unasked."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "submission.zip").write_bytes(b"an earlier pipeline's")
    with pytest.raises(OutputExistsError, match=r"--work holds submission.zip of an earlier pipeline"):
        pipeline.check_work(f"file://{tmp_path}/o", work, resume=False, overwrite=False)
    pipeline.check_work(f"file://{tmp_path}/o", work, resume=True, overwrite=False)


def test_check_work_knows_its_own_out_spelt_with_a_query(tmp_path):
    """(P7) an OUT claimed as file://.../first?region=x is the same OUT as file://.../first: not another's."""
    work = tmp_path / "work"
    pipeline.claim_work(f"file://{tmp_path}/first?region=x", work)
    (tmp_path / "first" / "run").mkdir(parents=True)
    (tmp_path / "first" / "run" / "config.yaml").write_text("{}")
    pipeline.check_work(f"file://{tmp_path}/first", work, resume=True, overwrite=False)
    with pytest.raises(OutputExistsError, match="--work of the pipeline whose OUT is"):
        pipeline.check_work(f"file://{tmp_path}/second", work, resume=True, overwrite=False)


def test_check_replaceable_guards_the_work_folder_of_a_uri_out(tmp_path):
    """(P10) with a URI OUT, WORK/features and WORK/run are removed by --overwrite too: a user's folder there is
    refused before anything is removed."""
    work = tmp_path / "work"
    (work / "features").mkdir(parents=True)
    (work / "features" / "mine.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"not a features output \(it holds mine.txt\)"):
        pipeline.check_replaceable(f"file://{tmp_path}/uri_out", work, synthesizes=False)


def test_check_resume_refuses_embeddings_of_another_text_model(tmp_path):
    """(P13) the text model is compared as the image model is."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "item_raw_emb.embed.json").write_text(json.dumps({"text_model": "/models/bert", "image_model": "RN50"}))
    with pytest.raises(ConfigError, match=r"embedded with --text-model /models/bert, this command asks /models/other"):
        pipeline.check_resume(str(out), out, load_config(None), embed=True,
                              models={"text_model": "/models/other", "image_model": "RN50"})
    pipeline.check_resume(str(out), out, load_config(None), embed=True,
                          models={"text_model": "/models/bert", "image_model": "RN50"})


def test_check_resume_of_a_synthesized_attempt_does_not_take_its_data_for_a_data_flag(tmp_path):
    """(P14) an OUT whose data the pipeline synthesized (synth.json there) and whose table records another path for
    it (OUT moved since) is resumed without --data: it is no attempt "on --data"."""
    from mmctr_ray.data.synthetic import SynthSpec

    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    spec = dataclasses.asdict(SynthSpec())
    (out / "data" / "synth.json").write_text(json.dumps({"spec": spec}))
    (out / "item_emb.parquet").write_bytes(b"")
    (out / "item_emb.fusion.json").write_text(json.dumps({"strategy": "given", "data": "/moved/from/out/data",
                                                          "source": "/moved/from/out/data/item_info.parquet"}))
    pipeline.check_resume(str(out), out, load_config(None), embed=False, synth=spec)


def test_check_resume_names_the_local_data_the_table_was_fused_from(tmp_path):
    """(P15) WORK/data.source left by an older attempt on a URI, the table fused from a local --data /d since: the
    refusal of --data /e names /d, the --data to pass, not the URI."""
    out = tmp_path / "out"
    out.mkdir()
    (out / pipeline.DATA_SOURCE).write_text("s3://bucket/real\n")
    (out / "item_emb.parquet").write_bytes(b"")
    (out / "item_emb.fusion.json").write_text(json.dumps({"strategy": "given", "data": "/d",
                                                          "source": "/d/item_info.parquet"}))
    with pytest.raises(ConfigError, match=r"kept from the earlier attempt on --data /d, this command asks /e;"):
        pipeline.check_resume(str(out), out, load_config(None), embed=False, data="/e")


def test_a_plain_publish_uploads_a_folder_even_when_out_holds_files_of_its_sizes(tmp_path):
    """(P18) a stage that ran publishes what it wrote: files of the same size in OUT are not taken for its own."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "features").mkdir(parents=True)
    (out / "features").mkdir(parents=True)
    for name in ("config.yaml", "features_summary.json"):
        (work / "features" / name).write_text("new!")
        (out / "features" / name).write_text("old!")
    pipeline.publish("features", work, f"file://{out}")
    assert all((out / "features" / n).read_text() == "new!" for n in ("config.yaml", "features_summary.json"))


def test_a_resume_downloads_a_data_uri_again_into_an_empty_copy(tmp_path):
    """(P20) an empty WORK/data (created, nothing arrived) is no copy to reuse: --resume downloads the URI."""
    source = tmp_path / "bucket" / "data"
    (source / "MicroLens_1M_x1").mkdir(parents=True)
    (source / "MicroLens_1M_x1" / "train.parquet").write_text("train")
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    local = pipeline.local_data(source.as_uri(), work, resume=True)
    assert (local / "MicroLens_1M_x1" / "train.parquet").read_text() == "train"
    assert (work / pipeline.DATA_SOURCE).read_text().strip() == source.as_uri()


# mmctr_ray/cli.py: the pipeline's steps


def test_an_overwrite_synthesizes_again_over_an_earlier_pipelines_data(tmp_path, monkeypatch):
    """(C1) only --resume reuses OUT/data as synthesized: --overwrite (other size flags, say) synthesizes anew."""
    from mmctr_ray.cli import main

    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "synth.json").write_text(json.dumps({"spec": {}}))
    ran = _stub_steps(monkeypatch, stop_at="synth")
    monkeypatch.setattr("mmctr_ray.cli.cmd_validate", lambda args: ran.append("validate") or 1)
    assert main(["demo", "--out", str(out), "--overwrite", "--train-rows", "999"]) == 1
    assert ran == ["synth"]


def test_an_overwrite_fuses_again_over_a_kept_table(synth_dir, tmp_path, monkeypatch):
    """(C2) only --resume keeps OUT's fused table: --overwrite (another fusion, say) fuses anew."""
    from mmctr_ray.cli import main

    out = tmp_path / "out"
    _fused_table(out / "item_emb.parquet")
    ran = _stub_steps(monkeypatch)
    assert main(["pipeline", "--data", str(synth_dir), "--out", str(out), "--overwrite", "--config",
                 "configs/tiny.yaml"]) == 1
    assert ran == ["validate", "fuse", "features", "train", "predict", "report"]


def test_a_batch_larger_than_the_training_split_is_refused_before_fuse_and_features(synth_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    """train refused it after the fuse and features steps had run (embed's too, hours at full scale; helper-131)."""
    from mmctr_ray.cli import main

    ran = _stub_steps(monkeypatch)
    base = ["pipeline", "--data", str(synth_dir), "--out", str(tmp_path / "out"), "--config", "configs/tiny.yaml"]
    assert main([*base, "--set", "train.batch_size=4096"]) == 2 and ran == ["validate"]
    assert capsys.readouterr().err.strip().endswith("train.batch_size=4,096 exceeds the 3,000 rows of the training "
                                                    "split: not one full batch to train on; lower train.batch_size")
    ran.clear()
    assert main([*base, "--overwrite", "--set", "train.batch_size=3", "--workers", "2"]) == 2 and ran == ["validate"]
    assert "model.batch_norm needs at least 2" in capsys.readouterr().err


def test_a_resume_that_embeds_again_fuses_again(synth_dir, tmp_path, monkeypatch):
    """An --overwrite without --embed that stopped before its fuse step drops an earlier attempt's embeddings and
    their record and keeps its fused table; a --resume --embed with another text model then embedded anew, skipped
    fuse (the table was there) and trained on the table fused from the first model's vectors, without a word."""
    from mmctr_ray.cli import main

    out = tmp_path / "out"
    bert_a, bert_b = tmp_path / "bertA", tmp_path / "bertB"
    for model in (bert_a, bert_b):
        model.mkdir()
        (model / "config.json").write_text("{}")
    _fused_table(out / "item_emb.parquet")  # attempt A: --embed --text-model bertA, fused from its embeddings
    (out / "item_emb.fusion.json").write_text(json.dumps({"strategy": "v4", "text_dim": 32, "image_dim": 32,
                                                          "source": str(out / "item_raw_emb.parquet")}))
    (out / "item_raw_emb.parquet").write_bytes(b"PAR1")
    (out / "item_raw_emb.embed.json").write_text(json.dumps({"text_model": str(bert_a),
                                                             "image_model": "tests/assets/clip-tiny.json"}))
    base = ["pipeline", "--data", str(synth_dir), "--out", str(out), "--config", "configs/tiny.yaml"]
    ran = _stub_steps(monkeypatch, stop_at="fuse")
    assert main([*base, "--overwrite"]) == 1 and ran == ["validate", "fuse"]  # attempt B, ended at its fuse step
    assert (out / "item_emb.parquet").is_file() and not (out / "item_raw_emb.embed.json").exists()
    ran = _stub_steps(monkeypatch)
    assert main([*base, "--resume", "--embed", "--text-model", str(bert_b), "--image-model",
                 "tests/assets/clip-tiny.json"]) == 1  # the stubbed report's exit
    assert ran == ["validate", "embed", "fuse", "features", "train", "predict", "report"]


def test_a_resume_whose_fused_table_is_gone_fuses_and_summarises_again(synth_dir, tmp_path, monkeypatch):
    """(C3) a kept features summary is reused only beside the table it describes: without the table, fuse runs
    and features after it (its summary was of the table that is gone)."""
    from mmctr_ray.cli import main
    from mmctr_ray.config import save_config

    out = tmp_path / "out"
    (out / "features").mkdir(parents=True)
    save_config(load_config("configs/tiny.yaml"), out / "features" / "config.yaml")
    (out / "features" / "features_summary.json").write_text("{}")
    ran = _stub_steps(monkeypatch, fuse_writes=True)
    assert main(["pipeline", "--data", str(synth_dir), "--out", str(out), "--resume", "--config",
                 "configs/tiny.yaml"]) == 1
    assert ran == ["validate", "fuse", "features", "train", "predict", "report"]


def test_a_pipeline_on_a_uri_out_claims_its_work_folder(tmp_path, monkeypatch):
    """(C7) --work records the URI OUT whose run refers to it (pipeline.out), before the first step."""
    from mmctr_ray.cli import main

    out, work = tmp_path / "out", tmp_path / "work"
    ran = _stub_steps(monkeypatch, stop_at="synth")
    assert main(["demo", "--out", f"file://{out}", "--work", str(work)]) == 1
    assert ran == ["synth"]
    assert (work / pipeline.WORK_OWNER).read_text() == f"file://{out}\n"


# mmctr_ray/cli.py: how to continue


def test_the_resume_line_of_a_pipeline_drops_overwrite(tmp_path):
    """(C9) `--resume --overwrite` is refused by the parser: the printed command must not carry both."""
    from mmctr_ray.cli import _resume_argv

    for command in ("pipeline", "demo"):
        assert _resume_argv(["--out", "O", "--overwrite", "--embed"], command) == ["--out", "O", "--embed",
                                                                                   "--resume"]


def test_the_resume_line_has_resume_once(tmp_path):
    """(C10) a command that already had --resume is printed with it once."""
    from mmctr_ray.cli import _resume_argv

    assert _resume_argv(["--out", "O", "--resume", "--workers", "2"], "pipeline") == ["--out", "O", "--workers",
                                                                                     "2", "--resume"]


def test_the_resume_line_knows_a_switch_takes_no_value(tmp_path):
    """(C11) a switch (--overwrite) followed by a dropped flag with a value: both go, the value too."""
    from mmctr_ray.cli import _resume_argv

    assert _resume_argv(["--data", "D", "--out", "R", "--overwrite", "--config", "c.yaml", "-v"], "train") == [
        "--data", "D", "--out", "R", "-v", "--resume"]


def _args(argv):
    from mmctr_ray.cli import _parse, build_parser

    return _parse(build_parser(), argv)


def test_an_ended_overwrite_of_a_uri_out_whose_run_began_is_continued_not_restarted(tmp_path):
    """(C13) the --overwrite of a URI OUT ended after its run began: "run the same command again" would replace that
    run; --resume continues it."""
    from mmctr_ray.cli import _left_on_disk
    from mmctr_ray.locking import began, forget_begun

    argv = ["pipeline", "--out", f"file://{tmp_path}/o", "--work", str(tmp_path / "w"), "--overwrite"]
    args = _args(argv)
    try:
        assert _left_on_disk(args, argv) == ("", "run the same command again")  # before its run began
        began(storage.join(storage.normalize(str(args.out)), "run"))
        kept, how = _left_on_disk(args, argv)
        assert how == (f"continue with `mmctr pipeline --out file://{tmp_path}/o --work {tmp_path / 'w'} "
                       f"--resume`")
    finally:
        forget_begun()


def test_an_ended_pipeline_says_what_its_run_keeps(tmp_path):
    """(C14) a pipeline's run is OUT/run: a signal after it began says what it keeps, as train's does."""
    from mmctr_ray.checkpoint import kept_checkpoints
    from mmctr_ray.cli import _left_on_disk

    out = tmp_path / "o"
    (out / "run").mkdir(parents=True)
    (out / "run" / "config.yaml").write_text("{}")
    argv = ["pipeline", "--out", str(out)]
    kept, how = _left_on_disk(_args(argv), argv)
    assert kept == f": {kept_checkpoints(out / 'run')}" and how.endswith("--resume`")


# mmctr_ray/cli.py: what the train and predict steps get


def _record_training(monkeypatch) -> list:
    """train_driver.run_training recorded (the real cmd_train runs up to it)."""
    import mmctr_ray.train_driver as train_driver

    trained = []

    def run_training(data, run, cfg, **kwargs):
        trained.append((cfg, kwargs))
        Path(run).mkdir(parents=True, exist_ok=True)
        summary = {"best_valid_auc": 0.5, "best_valid_logloss": 0.6, "best_epoch": 1, "epochs": 1,
                   "best_checkpoint": f"{run}/checkpoint_epoch_001"}
        (Path(run) / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(train_driver, "run_training", run_training)
    return trained


def test_a_fresh_pipeline_trains_at_the_train_lr_it_was_given(synth_dir, tmp_path, monkeypatch):
    """(C16) only a continued run leaves the command's train.lr out (the schedule's decayed rate): a new run starts
    at the --set train.lr asked."""
    import mmctr_ray.cli as cli
    from mmctr_ray.cli import main

    ran = _stub_steps(monkeypatch)
    monkeypatch.setattr(cli, "_fuse_step", _real_fuse_step)
    monkeypatch.setattr(cli, "cmd_train", _real_cmd_train)
    trained = _record_training(monkeypatch)
    assert main(["pipeline", "--data", str(synth_dir), "--out", str(tmp_path / "out"), "--config",
                 "configs/tiny.yaml", "--set", "train.lr=1e-05"]) == 1  # report (stubbed) stops it
    assert ran == ["validate", "features", "predict", "report"]  # fuse and train: the real ones
    assert trained[0][0].train.lr == 1e-05


def test_a_continued_run_is_trained_without_config_or_fusion(synth_dir, tmp_path, monkeypatch):
    """(C17, C18) train --resume refuses --config and --fusion (the run keeps its own): the pipeline's continued
    run passes neither, or its --resume failed at the train step."""
    import mmctr_ray.cli as cli
    from mmctr_ray.cli import main
    from mmctr_ray.config import save_config
    from mmctr_ray.fuse import fusion_overrides, run_fuse

    out = tmp_path / "out"
    out.mkdir()
    fused = out / "item_emb.parquet"
    run_fuse(synth_dir, fused, load_config("configs/tiny.yaml").fusion, progress=lambda m: None)
    (out / "features").mkdir()
    save_config(load_config("configs/tiny.yaml", fusion_overrides(fused)), out / "features" / "config.yaml")
    (out / "features" / "features_summary.json").write_text("{}")
    (out / "run").mkdir()
    save_config(load_config("configs/tiny.yaml", fusion_overrides(fused)), out / "run" / "config.yaml")
    ran = _stub_steps(monkeypatch)
    monkeypatch.setattr(cli, "cmd_train", _real_cmd_train)
    trained = _record_training(monkeypatch)
    assert main(["pipeline", "--data", str(synth_dir), "--out", str(out), "--resume", "--config",
                 "configs/tiny.yaml"]) == 1  # report (stubbed) stops it
    assert ran == ["validate", "predict", "report"] and trained and trained[0][1]["resume"]


def test_predict_runs_again_over_the_submission_on_resume(synth_dir, tmp_path, monkeypatch):
    """(C19) predict runs again on --resume (the run trained on): it replaces the submission an earlier attempt
    left, as it does without --resume or --overwrite."""
    import mmctr_ray.cli as cli
    from mmctr_ray.cli import main

    predicted = []
    ran = _stub_steps(monkeypatch)
    monkeypatch.setattr(cli, "cmd_predict", lambda args: predicted.append(args) or 0)
    out = tmp_path / "out"
    _fused_table(out / "item_emb.parquet")  # what the attempt --resume continues left, its submission too
    (out / "submission.zip").write_bytes(b"the earlier attempt's")
    assert main(["pipeline", "--data", str(synth_dir), "--out", str(out), "--resume", "--config",
                 "configs/tiny.yaml"]) == 1  # report (stubbed) stops it
    assert ran == ["validate", "features", "train", "report"]
    assert predicted[0].overwrite and predicted[0].out == out.resolve() / "submission.zip"
    assert predicted[0].batch_rows is None  # the run's train.eval_batch_size; --batch-rows reaches predict's step:
    assert main(["pipeline", "--data", str(synth_dir), "--out", str(out), "--resume", "--config", "configs/tiny.yaml",
                 "--batch-rows", "4096"]) == 1
    assert predicted[1].batch_rows == 4096


import mmctr_ray.cli as _cli  # noqa: E402  the real step functions, before a test stubs them

_real_cmd_train = _cli.cmd_train
_real_fuse_step = _cli._fuse_step
