"""Run locations: local paths and storage URIs through one pyarrow filesystem, checkpoint discovery on it.

``memory://`` (fsspec, in this process only) stands for an object store here; ``file://`` for one that Ray
workers can share (the end-to-end run under a URI is in test_training.py).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from mmctr_ray import storage
from mmctr_ray.checkpoint import (TrainState, best_checkpoint, checkpoint_epoch, epoch_checkpoints, latest_checkpoint,
                                  load_checkpoint, save_checkpoint)
from mmctr_ray.config import load_config
from mmctr_ray.errors import ConfigError, DataError, OutputExistsError
from mmctr_ray.features import FeatureMap
from mmctr_ray.train_driver import run_location


@pytest.fixture
def memory_root():
    root = f"memory://bucket/{uuid.uuid4().hex}"
    yield root
    if storage.exists(root):
        storage.remove_dir(root)


def test_local_paths_stay_paths_and_uris_stay_strings(tmp_path):
    fs, path = storage.resolve(tmp_path / "run")
    assert isinstance(fs, pafs.LocalFileSystem) and path == (tmp_path / "run").as_posix()
    assert storage.join(tmp_path, "run", "a.txt") == tmp_path / "run" / "a.txt"
    assert storage.join(str(tmp_path), "a.txt") == tmp_path / "a.txt"
    uri = (tmp_path / "run").as_uri()
    fs, path = storage.resolve(uri)
    assert isinstance(fs, pafs.LocalFileSystem) and path == (tmp_path / "run").as_posix()
    assert storage.join(uri, "a.txt") == uri + "/a.txt"
    assert storage.join("s3://bucket/run?region=eu-west-1", "ck", "m.pt") == "s3://bucket/run/ck/m.pt?region=eu-west-1"
    assert storage.normalize("gs://bucket/runs/r1/") == "gs://bucket/runs/r1"
    assert storage.normalize("rel") == Path("rel").resolve()
    assert storage.basename("gs://bucket/runs/r1/") == "r1" and storage.basename(tmp_path / "r") == "r"
    assert not storage.is_uri(Path("s3:/bucket")) and storage.is_uri("s3://bucket")
    # an empty host (HDFS's default namenode, memory://): before, urllib wrote `hdfs:/user/me/out`, a relative local
    # path, so the run went to the driver's disk without a word
    assert storage.normalize("hdfs:///user/me/out/") == "hdfs:///user/me/out"
    assert storage.join("hdfs:///user/me/out", "run") == "hdfs:///user/me/out/run"
    assert storage.join("memory:///a?x=1", "b") == "memory:///a/b?x=1" and storage.join("s3://b", "r") == "s3://b/r"


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_read_write_list_copy_and_remove_through_the_filesystem(kind, memory_root, tmp_path):
    root = memory_root if kind == "memory" else (tmp_path / "store").as_uri()
    storage.write_text(storage.join(root, "a", "b.txt"), "hello")  # the folders are created
    assert storage.read_text(storage.join(root, "a", "b.txt")) == "hello"
    assert storage.is_file(storage.join(root, "a", "b.txt")) and not storage.is_file(storage.join(root, "a"))
    assert storage.exists(storage.join(root, "a")) and storage.listdir(root) == ["a"]
    assert storage.listdir(storage.join(root, "missing")) == []
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.bin").write_bytes(b"\x00\x01")
    (src / "sub" / "y.txt").write_text("y")
    storage.upload_dir(src, storage.join(root, "up"))
    assert storage.listdir(storage.join(root, "up")) == ["sub", "x.bin"]
    with storage.local_copy(storage.join(root, "up")) as local:
        assert local != src and (local / "x.bin").read_bytes() == b"\x00\x01"
        assert (local / "sub" / "y.txt").read_text() == "y"
    with storage.local_copy(storage.join(root, "up"), skip=["x.bin"]) as local:  # predict's checkpoint less its
        assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*")) == ["sub", "sub/y.txt"]  # optimizer
    # moved beside itself (train --overwrite keeps the run it replaces so): a rename on a local filesystem, a copy
    # and a delete on an object store
    assert storage.sibling(storage.join(root, "up"), ".up.replaced") == storage.join(root, ".up.replaced")
    storage.move_dir(storage.join(root, "up"), storage.join(root, ".up.replaced"))
    assert not storage.exists(storage.join(root, "up")) and storage.listdir(root) == [".up.replaced", "a"]
    assert storage.read_bytes(storage.join(root, ".up.replaced", "x.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(root, ".up.replaced", "sub", "y.txt")) == "y"
    storage.remove_dir(root)
    assert not storage.exists(root)


def test_unknown_schemes_missing_packages_and_missing_files_are_one_line_errors(memory_root):
    with pytest.raises(ConfigError, match=r"^foo://bucket/run: unsupported storage scheme foo:// \(expected a "
                                          r"local path or a URI: s3://, gs://") as err:
        storage.resolve("foo://bucket/run")
    assert "\n" not in str(err.value)
    if importlib.util.find_spec("adlfs") is None:
        with pytest.raises(ConfigError, match=r"^az://c/run: az:// needs a package that is not installed "
                                              r"\(Install adlfs"):
            storage.resolve("az://c/run")
    with pytest.raises(DataError, match=f"^{memory_root}/nothing.json: missing file$"):
        storage.read_text(storage.join(memory_root, "nothing.json"))
    storage.write_text(memory_root + "/f", "x")
    with pytest.raises(DataError, match="f: is a file; expected a directory"):
        storage.listdir(memory_root + "/f")


def test_a_run_needs_its_own_folder_below_the_storage_root(tmp_path):
    assert run_location((tmp_path / "r").as_uri() + "/") == (tmp_path / "r").as_uri()
    assert run_location(str(tmp_path / "r")) == tmp_path / "r"
    with pytest.raises(ConfigError, match="^file:///: a run needs its own folder below the storage root"):
        run_location("file:///")


def _write_checkpoint(tmp: Path, epoch: int, auc: float, **row: object) -> Path:
    """A checkpoint of ``epoch`` whose every epoch row has ``auc`` (and ``row``'s other fields)."""
    torch.manual_seed(epoch)
    model = torch.nn.Linear(3, 1)
    state = TrainState(epoch=epoch, lr=1e-3,
                       history=[{"epoch": e, "valid_auc": auc, **row} for e in range(1, epoch + 1)])
    fmap = FeatureMap(num_items=5, tag_vocab=6, tags_per_item=2, vector_dim=4, num_users=7)
    directory = tmp / f"checkpoint_epoch_{epoch:03d}"
    directory.mkdir()
    save_checkpoint(directory, model, torch.optim.Adam(model.parameters()), state, load_config(None), fmap,
                    {"item_vector": "given"})
    return directory


def test_a_report_says_when_predict_scores_another_epoch_than_the_best_row(tmp_path):
    """A run stopped after rank 0 wrote epoch 2's row and before its checkpoint was complete: summary.md named
    epoch 2 as the best while `mmctr predict` scored with epoch 1's checkpoint."""
    from mmctr_ray.report import markdown_summary

    rows = [{"epoch": e, "valid_auc": auc, "valid_logloss": 0.5, "train_loss": 0.5, "lr": 1e-3, "epoch_seconds": 1.0}
            for e, auc in ((1, 0.60), (2, 0.70))]
    _write_checkpoint(tmp_path, 1, 0.60)
    second = _write_checkpoint(tmp_path, 2, 0.70)
    assert "not complete" not in markdown_summary(tmp_path, rows)
    (second / "model.pt").write_bytes(b"cut short")
    # no summary.json: the run may still be training (rank 0 writes the row before Ray copies the checkpoint)
    assert ("Epoch 2's checkpoint is not complete in the run (the run is still training, or it stopped while the "
            "checkpoint was copied): `mmctr predict` scores with epoch 1's, the best complete one."
            ) in markdown_summary(tmp_path, rows)
    (tmp_path / "summary.json").write_text(json.dumps({"best_valid_auc": 0.7}))  # the run ended
    assert ("Epoch 2's checkpoint is not complete in the run (it stopped while the checkpoint was copied): "
            "`mmctr predict` scores with epoch 1's, the best complete one.") in markdown_summary(tmp_path, rows)


def test_predict_warns_that_a_run_without_its_summary_is_scored_at_its_best_epoch_so_far(tmp_path, caplog):
    """`mmctr predict --run RUN` on a run still training (or stopped early) scored its best checkpoint so far and
    said nothing: a submission that looked final."""
    from mmctr_ray.predict import warn_unended

    _write_checkpoint(tmp_path, 1, 0.60)
    second = _write_checkpoint(tmp_path, 2, 0.70)
    with caplog.at_level(logging.WARNING, logger="mmctr_ray.predict"):
        warn_unended(tmp_path, best_checkpoint(tmp_path))
        assert [r.getMessage() for r in caplog.records] == [
            f"{tmp_path}: no summary.json: the run is still training, or it stopped before its end (`mmctr train "
            f"--resume` continues it); scoring its best checkpoint so far, checkpoint_epoch_002"]
        caplog.clear()
        warn_unended(second, second)  # --run RUN/checkpoint_epoch_002: the user chose the epoch
        (tmp_path / "summary.json").write_text(json.dumps({"best_valid_auc": 0.7}))  # the run ended
        warn_unended(tmp_path, second)
    assert caplog.records == []


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_a_checkpoint_under_a_uri_is_scored_without_downloading_its_optimizer(kind, memory_root, tmp_path,
                                                                               monkeypatch):
    """predict loads the best checkpoint on the driver and in every actor; each download took optimizer.pt too
    (Adam's state: twice the model, the item embeddings included), which scoring never reads."""
    from mmctr_ray.checkpoint import load_checkpoint

    local = _write_checkpoint(tmp_path, 1, 0.6)
    root = memory_root if kind == "memory" else (tmp_path / "store").as_uri()
    uri = storage.join(root, local.name)
    storage.upload_dir(local, uri)
    downloaded: list[list[str]] = []
    real = storage.download_dir

    def recording(location, local_dir, skip=()):
        real(location, local_dir, skip)
        downloaded.append(sorted(os.listdir(local_dir)))

    monkeypatch.setattr(storage, "download_dir", recording)
    scoring = load_checkpoint(uri, with_optimizer=False)
    assert "optimizer.pt" not in downloaded[-1] and "model.pt" in downloaded[-1]
    assert scoring.optimizer_state is None and scoring.state.epoch == 1
    resuming = load_checkpoint(uri)
    assert "optimizer.pt" in downloaded[-1] and resuming.optimizer_state is not None
    assert all(torch.equal(scoring.model_state[k], resuming.model_state[k]) for k in resuming.model_state)
    storage.write_bytes(storage.join(uri, "model.pt"), b"cut short")  # still judged whole or not, as it is there
    with pytest.raises(DataError, match=r"incomplete checkpoint \(model.pt has 9 bytes, expected \d+\)"):
        load_checkpoint(uri, with_optimizer=False)


def test_tensorboards_staging_folder_goes_even_when_its_upload_fails(memory_root, monkeypatch):
    """A run under a URI writes its TensorBoard events in a local folder uploaded at each epoch and on close; an
    upload that raised on close (storage out of reach) left a mmctr-tensorboard-* folder behind for each attempt."""
    from mmctr_ray.errors import StorageError
    from mmctr_ray.run_log import RunLog

    run_log = RunLog(storage.join(memory_root, "run"), enabled=True)
    staging = Path(run_log._tb_staging)
    assert staging.is_dir()

    def unreachable(*args):
        raise StorageError("memory:///run: storage out of reach")

    monkeypatch.setattr(storage, "upload_dir", unreachable)
    with pytest.raises(StorageError, match="out of reach"):
        run_log.close()
    assert not staging.exists()


def test_a_killed_writers_tensorboard_staging_folder_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """A run under a URI killed by SIGKILL (or ended by os._exit at a SIGTERM) never closed its RunLog: its
    mmctr-tensorboard-* folder stayed in /tmp for good. The next writer removes such folders: this host's, whose
    process is gone and that nothing touched for an hour; not a live process's, a recent one or another host's."""
    import subprocess
    import tempfile
    import time

    from mmctr_ray import run_log

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    host, prefix = run_log._host(), run_log.STAGING_PREFIX
    folders = {name: tmp_path / f"{prefix}{host}-{pid}-x{name}" for name, pid in (
        ("dead_old", gone.pid), ("dead_recent", gone.pid), ("alive_old", os.getppid()))}
    folders["other_host_old"] = tmp_path / f"{prefix}{host}z-{gone.pid}-xo"
    old = time.time() - run_log.STAGING_STALE_S - 60
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "events.out.tfevents.1").write_bytes(b"x")
        if name.endswith("_old"):
            for path in (folder / "events.out.tfevents.1", folder):
                os.utime(path, (old, old))
    assert run_log.remove_abandoned_staging() == [folders["dead_old"].name]
    assert [name for name, folder in folders.items() if folder.exists()] == ["dead_recent", "alive_old",
                                                                             "other_host_old"]


def test_a_checkpoint_state_training_did_not_write_or_without_a_finite_auc_is_one_line(tmp_path):
    """A state.json that is not JSON (edited by hand, same size) was a JSONDecodeError traceback from `mmctr predict`
    and `mmctr report`; checkpoints whose AUCs are all NaN were "no checkpoint found" beside the checkpoints."""
    import math

    from mmctr_ray.report import markdown_summary

    _write_checkpoint(tmp_path, 1, math.nan)
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}: no checkpoint with a finite validation AUC "
                                        r"among 1 \(the model diverged"):
        best_checkpoint(tmp_path)
    second = _write_checkpoint(tmp_path, 2, 0.7)
    assert best_checkpoint(tmp_path) == second
    _write_checkpoint(tmp_path, 3, 0.7)  # the earliest among equals, the epoch the report and summary.json name: a
    assert best_checkpoint(tmp_path) == second  # mutation that took the latest passed, so predict scored another
    state = second / "state.json"
    state.write_text("[" + state.read_text()[1:])  # the size files.json records: a whole checkpoint, garbled
    with pytest.raises(DataError, match=rf"^{re.escape(str(state))}: not the state.json `mmctr train` writes \("):
        best_checkpoint(tmp_path)
    rows = [{"epoch": 2, "valid_auc": 0.7, "valid_logloss": 0.5, "train_loss": 0.5, "lr": 1e-3, "epoch_seconds": 1.0}]
    assert "Best validation AUC **0.7000**" in markdown_summary(tmp_path, rows)  # the report is still written


@pytest.mark.parametrize("name,said", [
    ("model.pt", r"not a readable torch.save file \(.+\): damaged, or not written by `mmctr train`"),
    ("feature_map.json", r"not valid JSON \(.+\); expected the feature_map.json `mmctr train` writes"),
    ("item_source.json", r"not valid JSON \(.+\); expected the item_source.json `mmctr train` writes"),
    ("state.json", r"not the state.json `mmctr train` writes \(.+\)"),
    ("config.yaml", r"invalid YAML: unacceptable character #x0000: special characters are not allowed")])
def test_a_checkpoint_file_damaged_at_its_recorded_size_is_one_line(tmp_path, name, said, memory_root):
    """Bytes garbled in place (files.json's sizes still hold): torch's RuntimeError or a JSONDecodeError traceback.
    A checkpoint under a URI is named by its URI, not by the temporary folder it was downloaded to."""
    directory = _write_checkpoint(tmp_path, 1, 0.6)
    path = directory / name
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2] + bytes(len(raw) - len(raw) // 2))  # a zip's central directory: at its end
    from mmctr_ray.errors import UserError

    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: {said}$"):  # config.yaml's: a ConfigError
        load_checkpoint(directory)
    uri = storage.join(memory_root, directory.name)
    storage.upload_dir(directory, uri)
    with pytest.raises(UserError, match=rf"^{re.escape(storage.join(uri, name))}: {said}$"):
        load_checkpoint(uri)


def test_predict_overwrite_replaces_a_submission_not_any_zip(tmp_path):
    """--overwrite replaced a zip holding anything with prediction.csv (docs/reliability.md: an output of another
    kind is refused, with --overwrite or not)."""
    import zipfile

    from mmctr_ray.predict import check_output, write_submission

    out = tmp_path / "sub.zip"
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("thesis/chapter1.tex", "months of work")
    with pytest.raises(OutputExistsError, match=rf"^{out}: not a submission of `mmctr predict` \(holds "
                                                r"thesis/chapter1.tex; expected prediction.csv alone\): not replaced, "
                                                r"even with --overwrite; choose another --out$"):
        check_output(out, overwrite=True)
    out.write_bytes(b"not a zip")
    with pytest.raises(OutputExistsError, match=r"\(not a readable zip; expected prediction.csv alone\)"):
        check_output(out, overwrite=True)
    out.unlink()
    write_submission(np.array([0.25, 0.5]), out)
    assert check_output(out, overwrite=True) == out


def test_a_fragment_in_a_run_uri_is_refused_rather_than_dropped():
    """pyarrow resolves file:///tmp/r#1 to /tmp/r: a run (and --overwrite) would act on another folder."""
    with pytest.raises(ConfigError, match=r"^s3://b/exp#3: '#' starts a URI fragment, which storage drops"):
        run_location("s3://b/exp#3")
    assert storage.normalize("s3://b/exp%233/") == "s3://b/exp%233"


def test_epoch_1000_sorts_after_999_and_local_writes_replace_whole(tmp_path):
    for epoch in (999, 1000, 101):
        _write_checkpoint(tmp_path, epoch, 0.5 + epoch / 10_000)
    assert [Path(p).name for p in epoch_checkpoints(tmp_path)] == [
        "checkpoint_epoch_101", "checkpoint_epoch_999", "checkpoint_epoch_1000"]
    storage.write_text(tmp_path / "metrics.jsonl", "a\n")
    storage.write_text(tmp_path / "metrics.jsonl", "b\n")  # renamed over the old file: never seen half-written
    assert (tmp_path / "metrics.jsonl").read_text() == "b\n" and not list(tmp_path.glob(".metrics.jsonl.partial*"))


def test_two_writers_of_one_file_in_one_process_each_replace_it_whole(tmp_path):
    """Temporary names carried the process id only: a second writer of the same file in the process (a thread) wrote
    into the first one's temporary file and renamed it away, so the first one's rename failed (FileNotFoundError)."""
    target = tmp_path / "summary.json"
    with storage._replacing(target) as first:
        first.write_text("first")
        storage.write_text(target, "second")  # begins and ends while the first is being written
        assert target.read_text() == "second" and first.read_text() == "first"
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert storage.partial_path(target) != storage.partial_path(target)
    assert storage.partial_path(target).name.startswith(".summary.json.partial-")


def test_the_epoch_in_a_checkpoint_uri_ignores_its_query(monkeypatch):
    """A run on ``s3://b/run?region=x`` names its checkpoints ``s3://b/run/checkpoint_epoch_003?region=x``: the epoch
    read None, so a resume missed a checkpoint written after Ray Train's registered one and trained that epoch again."""
    import types

    import ray.train

    from mmctr_ray.training import _resume_point

    newer = "s3://b/run/checkpoint_epoch_003?region=eu-west-1"
    assert checkpoint_epoch(newer) == 3 and checkpoint_epoch("s3://b/run/checkpoint_epoch_003/?region=x") == 3
    assert checkpoint_epoch(Path("/r/checkpoint_epoch_012/")) == 12 and checkpoint_epoch("/r/metrics.jsonl") is None
    registered = types.SimpleNamespace(path="b/run/checkpoint_epoch_002")  # Ray's path: inside its filesystem
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: registered)
    assert _resume_point(newer) == (newer, 3)
    assert _resume_point("s3://b/run/checkpoint_epoch_001?region=x") == (registered, 2)


@pytest.mark.parametrize("kind", ["path", "file://"])
def test_a_failed_write_keeps_the_earlier_file_also_under_a_file_uri(tmp_path, monkeypatch, kind):
    """A file:// run (how NFS is named) went through pyarrow's output stream, which truncates the file first: a
    full disk mid-write lost metrics.jsonl, and a reader could see it half-written."""
    where = tmp_path / "metrics.jsonl" if kind == "path" else f"file://{tmp_path}/metrics.jsonl"
    storage.write_text(where, "epoch 1\n")
    real = Path.write_bytes

    def disk_full(self, data):
        real(self, data[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space"):
        storage.write_text(where, "epoch 1\nepoch 2\n")
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == "epoch 1\n" and [p.name for p in tmp_path.iterdir()] == [
        "metrics.jsonl"]


def test_checkpoint_discovery_and_loading_through_a_filesystem(memory_root, tmp_path, caplog):
    run = f"{memory_root}/run"
    for epoch, auc in ((1, 0.60), (2, 0.70), (3, 0.65)):
        storage.upload_dir(_write_checkpoint(tmp_path, epoch, auc), f"{run}/checkpoint_epoch_{epoch:03d}")
    storage.write_text(f"{run}/checkpoint_epoch_004/model.pt", "cut short while copied")  # incomplete: skipped
    storage.write_text(f"{run}/metrics.jsonl", "{}\n")
    with caplog.at_level("WARNING", logger="mmctr_ray.checkpoint"):
        found = epoch_checkpoints(run)
        assert latest_checkpoint(run) == found[-1] and latest_checkpoint(f"{memory_root}/none") is None
    assert found == [f"{run}/checkpoint_epoch_{e:03d}" for e in (1, 2, 3)]
    assert caplog.text.count("checkpoint_epoch_004: skipped, incomplete") == 1  # once (a resume looks 3 times)
    assert best_checkpoint(run) == f"{run}/checkpoint_epoch_002"
    loaded = load_checkpoint(best_checkpoint(run))
    local = torch.load(tmp_path / "checkpoint_epoch_002" / "model.pt", weights_only=True)
    assert loaded.path == f"{run}/checkpoint_epoch_002" and loaded.state.epoch == 2
    assert all(torch.equal(loaded.model_state[k], local[k]) for k in local)
    assert loaded.optimizer_state is not None and loaded.fmap.num_users == 7
    with pytest.raises(DataError, match=f"^{run}/checkpoint_epoch_004/state.json: missing checkpoint file"):
        load_checkpoint(f"{run}/checkpoint_epoch_004")
    with pytest.raises(DataError, match=f"^{memory_root}/none: not found; no checkpoint found"):
        best_checkpoint(f"{memory_root}/none")
    from mmctr_ray.checkpoint import kept_checkpoints

    assert kept_checkpoints(run) == f"{run} keeps the checkpoints of epochs 1–3"  # 4, cut short, is not kept
    storage.remove_dir(f"{run}/checkpoint_epoch_002")
    assert kept_checkpoints(run) == f"{run} keeps the checkpoints of epochs 1, 3"  # it said "1–3"
    # a run whose every checkpoint was cut short said "no checkpoint found (expected checkpoint_epoch_*/ ...)"
    for epochs, said in (((4,), r" \(epoch 4\) was cut short"), ((1, 2, 3), r"s \(epochs 1–3\) were cut short"),
                         ((1, 3), r"s \(epochs 1, 3\) were cut short")):
        cut = f"{memory_root}/cut{len(epochs)}{epochs[-1]}"
        for epoch in epochs:
            storage.write_text(f"{cut}/checkpoint_epoch_{epoch:03d}/model.pt", "cut short while copied")
        with pytest.raises(DataError, match=f"^{cut}: no whole checkpoint: its {len(epochs)} checkpoint folder{said} "
                                            r"while copied \(the warnings above say what each lacks\)"):
            best_checkpoint(cut)


def test_json_text_writes_what_is_not_finite_as_null_and_the_rest_as_json_dumps_does(strict_json):
    import math

    import numpy as np

    data = {"auc": math.nan, "rows": [1, 0.5, (math.inf, -math.inf)], "se": np.float64("nan"), "name": "r1",
            "none": None, "nested": {"p": np.float64(0.25)}}
    text = storage.json_text(data, indent=2)
    assert strict_json(text) == {"auc": None, "rows": [1, 0.5, [None, None]], "se": None, "name": "r1", "none": None,
                                 "nested": {"p": 0.25}}
    finite = {"a": [1, 2.5, {"b": "c"}], "d": None}
    assert storage.json_text(finite, indent=2) == json.dumps(finite, indent=2)
    assert storage.json_text(finite) == json.dumps(finite)
    assert storage.nan_for_null({"a": None, "b": None, "c": 1.0}, ("a", "c", "missing")) == {
        "a": pytest.approx(math.nan, nan_ok=True), "b": None, "c": 1.0}


def test_nan_and_minus_inf_of_a_run_are_written_as_null_and_read_back(tmp_path, strict_json):
    """state.json held NaN (the AUC of a one-class split, the standard error with one row of a class) and -Infinity
    (best_auc before any finite AUC), and summary.json NaN: not JSON. They are null now, and every reader gets its
    number back: a resumed schedule starts from -inf again (a NaN best would never be beaten), best_checkpoint
    compares a NaN AUC as before, and the summary's standard error is NaN again."""
    import math

    from mmctr_ray.train_driver import _summary, read_summary

    row = {"valid_auc_se": math.nan, "valid_logloss": 0.69, "train_loss": 0.7, "samples_per_s": None}
    run = tmp_path / "run"
    run.mkdir()
    first = _write_checkpoint(run, 1, math.nan, **row)
    state = strict_json((first / "state.json").read_text())
    assert state["best_auc"] is None and state["history"][0]["valid_auc"] is None
    loaded = load_checkpoint(first).state
    assert loaded.best_auc == -math.inf and math.isnan(loaded.history[0]["valid_auc"])
    assert math.isnan(loaded.history[0]["valid_auc_se"]) and loaded.history[0]["samples_per_s"] is None
    second = _write_checkpoint(run, 2, 0.6, **row)
    assert best_checkpoint(run) == second  # a finite AUC beats the NaN
    summary = _summary(run, tmp_path / "no-data", 5.0)
    assert strict_json((run / "summary.json").read_text())["best_valid_auc_se"] is None
    back = read_summary(run)
    assert math.isnan(back["best_valid_auc_se"]) and back["best_valid_auc"] == summary["best_valid_auc"] == 0.6
    assert back["oracle_valid_auc"] is None and back["mean_samples_per_s"] is None  # None where nothing was measured


def test_local_runs_keep_their_paths(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write_checkpoint(run, 1, 0.6)
    (run / "tensorboard").mkdir()
    assert epoch_checkpoints(run) == [run / "checkpoint_epoch_001"]
    assert best_checkpoint(str(run)) == run / "checkpoint_epoch_001"
    assert json.loads((best_checkpoint(run) / "state.json").read_text())["epoch"] == 1


def test_a_checkpoint_with_every_file_but_one_cut_short_is_not_complete(memory_root, tmp_path, caplog):
    """A kill while Ray copies a checkpoint into RUN can leave every name with a short file: the sizes in
    files.json (written last) tell, so resume and predict use the epoch before, and loading it names the file."""
    run = f"{memory_root}/run"
    for epoch, auc in ((1, 0.60), (2, 0.70)):
        storage.upload_dir(_write_checkpoint(tmp_path, epoch, auc), f"{run}/checkpoint_epoch_{epoch:03d}")
    whole = storage.read_bytes(f"{run}/checkpoint_epoch_002/model.pt")
    storage.write_bytes(f"{run}/checkpoint_epoch_002/model.pt", whole[: len(whole) // 2])
    with caplog.at_level("WARNING"):
        assert epoch_checkpoints(run) == [f"{run}/checkpoint_epoch_001"]
        assert latest_checkpoint(run) == f"{run}/checkpoint_epoch_001"  # where a restarted worker resumes
    assert f"model.pt has {len(whole) // 2} bytes, expected {len(whole)}" in caplog.text
    assert best_checkpoint(run) == f"{run}/checkpoint_epoch_001"  # not the better epoch 2, which is broken
    with pytest.raises(DataError, match=f"^{run}/checkpoint_epoch_002: incomplete checkpoint \\(model.pt has "):
        load_checkpoint(f"{run}/checkpoint_epoch_002")
    storage.write_text(f"{run}/checkpoint_epoch_001/files.json", '{"model.pt": 1')  # the manifest itself cut
    assert epoch_checkpoints(run) == [] and latest_checkpoint(run) is None


def test_every_spelling_of_one_output_takes_one_lock(tmp_path, monkeypatch):
    """Before, `--out file:///x/run` and `--out /x/run/` locked different files and could write one run at once."""
    from mmctr_ray.locking import lock_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "runs" / "r 1"
    spellings = [run, str(run) + "/", run.as_uri(), run.as_uri() + "/"]
    assert len({lock_path(s) for s in spellings}) == 1 and lock_path(run).parent == run.parent
    assert lock_path("s3://b/runs/r1/") == lock_path("s3://b/runs/r1") != lock_path("s3://b/runs/r2")
    assert lock_path("s3://b/runs/r1?region=us-west-2") == lock_path("s3://b/runs/r1")  # one run, however reached


def test_an_output_whose_folder_cannot_be_written_beside_is_locked_in_the_cache(tmp_path, monkeypatch):
    """`--out /mnt/shared` with /mnt the root's: the lock file beside it raised a PermissionError traceback (or, where
    the open failed otherwise, "in use by another mmctr command"). A lock file that cannot be opened at all is one
    line naming it."""
    import os

    import filelock

    from mmctr_ray.errors import ConfigError
    from mmctr_ray.locking import lock_path, output_lock

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shared = tmp_path / "mnt" / "shared"
    shared.mkdir(parents=True)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and Path(p) != shared.parent)  # root passes all
    held = lock_path(shared)
    assert held.parent == tmp_path / "cache" / "mmctr" / "locks" and lock_path(str(shared) + "/") == held
    with output_lock(shared):
        assert held.is_file()
    monkeypatch.setattr(filelock.FileLock, "acquire", lambda self, *a, **k: (_ for _ in ()).throw(
        OSError(30, "Read-only file system")))
    with pytest.raises(ConfigError, match=r"shared: cannot lock it \(.*\.lock: \[Errno 30\] Read-only file system\)$"):
        with output_lock(shared):
            pass
    # a lock file that cannot be created, where filelock says Timeout as if another command held it (`synth --out
    # /proc/nope` was "in use by another mmctr command"; helper-131): the creation's own error
    monkeypatch.undo()
    monkeypatch.setattr(filelock.FileLock, "acquire", lambda self, *a, **k: (_ for _ in ()).throw(
        filelock.Timeout(self.lock_file)))
    gone = tmp_path / "gone" / "out"
    monkeypatch.setattr("mmctr_ray.locking.lock_path", lambda target: tmp_path / "nowhere" / ".out.mmctr.lock")
    with pytest.raises(ConfigError, match=r"out: cannot lock it \(.*nowhere/\.out\.mmctr\.lock: \[Errno 2\] No such "):
        with output_lock(gone):
            pass
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / ".out.mmctr.lock").touch()  # a holder's file: in use, as before
    with pytest.raises(OutputExistsError, match=r"out: in use by another mmctr command"):
        with output_lock(gone):
            pass


def test_a_checkpoint_whose_manifest_was_not_copied_yet_is_not_complete(tmp_path):
    """Ray copies a checkpoint's files in parallel: every other file can land, short, before files.json."""
    from mmctr_ray.checkpoint import incomplete

    directory = _write_checkpoint(tmp_path, 1, 0.6)
    assert incomplete(directory) is None
    (directory / "files.json").unlink()
    assert incomplete(directory) == "files.json missing"  # state.json says the manifest was written
    state = json.loads((directory / "state.json").read_text())
    (directory / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "files.json"}))
    assert incomplete(directory) is None  # a checkpoint from before the manifest: judged by presence
    (directory / "state.json").write_text('{"epoch": 1, "lr"')
    assert incomplete(directory) == "state.json unreadable"


def test_a_cut_download_of_the_data_is_fetched_again_and_a_kept_copy_is_not_replaced_unasked(tmp_path, monkeypatch):
    """`pipeline --data URI` downloads into WORK/data; a download cut short was reused by --resume as the data."""
    from mmctr_ray import pipeline
    from mmctr_ray.errors import OutputExistsError

    source = tmp_path / "bucket" / "data"
    (source / "MicroLens_1M_x1").mkdir(parents=True)
    for name in ("train.parquet", "valid.parquet", "test.parquet"):
        (source / "MicroLens_1M_x1" / name).write_text(name)
    work, uri = tmp_path / "work", source.as_uri()
    real = storage.download_dir

    def cut(location, local_dir):
        Path(local_dir, "MicroLens_1M_x1").mkdir(parents=True)
        Path(local_dir, "MicroLens_1M_x1", "train.parquet").write_text("tra")
        raise OSError("connection reset")

    monkeypatch.setattr(storage, "download_dir", cut)
    with pytest.raises(OSError, match="connection reset"):
        pipeline.local_data(uri, work, resume=False)
    assert not (work / "data").exists()  # nothing that looks like the data set
    monkeypatch.setattr(storage, "download_dir", real)
    local = pipeline.local_data(uri, work, resume=True)
    assert local == work / "data" and not (work / "data.partial").exists()
    assert sorted(p.name for p in (local / "MicroLens_1M_x1").iterdir()) == ["test.parquet", "train.parquet",
                                                                              "valid.parquet"]
    assert (local / "MicroLens_1M_x1" / "train.parquet").read_text() == "train.parquet"
    (local / "MicroLens_1M_x1" / "valid.parquet").write_text("edited")
    assert pipeline.local_data(uri, work, resume=True) == local  # the kept copy, as it is
    assert (local / "MicroLens_1M_x1" / "valid.parquet").read_text() == "edited"
    with pytest.raises(OutputExistsError, match=f"^{local}: not empty; pass --resume .* or --overwrite"):
        pipeline.local_data(uri, work, resume=False)
    assert (local / "MicroLens_1M_x1" / "valid.parquet").read_text() == "edited"
    pipeline.local_data(uri, work, resume=False, overwrite=True)
    assert (local / "MicroLens_1M_x1" / "valid.parquet").read_text() == "valid.parquet"
    assert (work / "data.source").read_text() == uri + "\n"
    other = tmp_path / "bucket" / "other"
    other.mkdir()
    with pytest.raises(OutputExistsError, match=f"^{local}: the copy of {uri}, not of {other.as_uri()}; "):
        pipeline.check_data_copy(other.as_uri(), work, resume=True, overwrite=False)  # before Ray starts
    pipeline.check_data_copy(uri + "/", work, resume=True, overwrite=False)  # the same folder, spelt with a slash
    from mmctr_ray.errors import DataError

    with pytest.raises(DataError, match=f"^{other.as_uri()}: no files to download"):
        pipeline.local_data(other.as_uri(), work, resume=False, overwrite=True)
    assert not (work / "data.partial").exists()  # and the copy it would have replaced is still there
    assert (local / "MicroLens_1M_x1" / "valid.parquet").read_text() == "valid.parquet"


def test_an_interrupted_write_keeps_the_earlier_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    """Ctrl-C (or a full disk) while a file or a submission zip is written: the earlier file stays whole and no
    half-written temporary file is left beside it (`predict` left `submission.zip.partial`)."""
    import os
    import zipfile

    import numpy as np

    from mmctr_ray.predict import write_submission

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    target, zipped = tmp_path / "summary.json", tmp_path / "submission.zip"
    storage.write_text(target, "earlier")
    write_submission(np.array([0.25, 0.75]), zipped)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            storage.write_text(target, "later")
    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "writestr", interrupted)
        with pytest.raises(KeyboardInterrupt):
            write_submission(np.array([0.5, 0.5, 0.5]), zipped)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.zip", "summary.json"]
    assert target.read_text() == "earlier"
    with zipfile.ZipFile(zipped) as zf:
        assert zf.read("prediction.csv").decode().splitlines() == ["ID,Task2", "0,0.25000000", "1,0.75000000"]


def test_storage_that_cannot_be_reached_is_one_line_and_a_run_retries_it(monkeypatch):
    """An S3 endpoint nobody listens on (as no credentials, access denied or a missing bucket): pyarrow's OSError
    became a traceback from the first look at RUN. Training workers still retry it (FailureConfig), where every
    other user error ends the run at once."""
    from ray.train import ControllerError

    from mmctr_ray.errors import DataError, StorageError
    from mmctr_ray.train_driver import _worker_failures

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    uri = "s3://bucket/runs/r1?endpoint_override=127.0.0.1:9&scheme=http"
    with pytest.raises(StorageError, match=re.escape(f"{uri}: cannot access this storage (When getting information "
                                                     f"for key 'runs/r1' in bucket 'bucket': AWS Error")):
        storage.is_file(uri)
    callback = _worker_failures(max_failures=2)
    callback.after_exception(None, {0: StorageError("s3://b/r: cannot access this storage (network)")})
    with pytest.raises(ControllerError):
        callback.after_exception(None, {0: DataError("train.parquet: bad row")})


@pytest.mark.parametrize("where", ["memory", "file"])
def test_a_published_file_is_copied_in_pieces_and_whole(tmp_path, monkeypatch, where):
    """publish read each file whole into memory (Path.read_bytes) to write it to a URI OUT: the raw embeddings of
    the full MicroLens are ~8 GB. upload_file streams it; a local destination still appears whole (renamed)."""
    from mmctr_ray.pipeline import publish

    work = tmp_path / "work"
    work.mkdir()
    data = os.urandom(3_000_000)
    (work / "item_emb.parquet").write_bytes(data)
    out = f"memory://bucket-{uuid.uuid4().hex}/out" if where == "memory" else (tmp_path / "out").as_uri()
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} read whole"))
    publish("fuse", work, out)
    monkeypatch.undo()
    assert storage.read_bytes(storage.join(out, "item_emb.parquet")) == data
    if where == "file":
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["item_emb.parquet"]  # no partial left


@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "state.json", "config.yaml", "feature_map.json",
                                  "item_source.json"])
@pytest.mark.parametrize("change", ["cut", "grown"])
def test_a_checkpoint_file_of_another_size_than_its_manifest_says_is_not_complete(tmp_path, name, change):
    """files.json records every file of the checkpoint, item_source.json too, and a size either way off tells."""
    from mmctr_ray.checkpoint import incomplete

    directory = _write_checkpoint(tmp_path, 1, 0.6)
    path = directory / name
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2] if change == "cut" else raw + b"\n")
    assert incomplete(directory) == f"{name} has {path.stat().st_size} bytes, expected {len(raw)}"
    assert epoch_checkpoints(tmp_path) == []


@pytest.mark.parametrize("change", [{"history": None}, {"history": 5}, {"history": [{"epoch": 1}]},
                                    {"history": [{"epoch": 1, "valid_auc": "0.6"}]}, {"epoch": None},
                                    {"bad_epochs": 1.5}, {"lr": True}, {"best_auc": "0.6"}, "epoch", "bad_epochs"])
def test_a_state_that_is_not_the_schedules_is_one_line_wherever_it_is_read(tmp_path, change):
    """A history that is not a list, a row without a numeric valid_auc, a schedule number missing or not a number:
    state.json at the size files.json records was a TypeError or KeyError traceback in read_state, in
    best_checkpoint (a string AUC compared with -inf) or in load_checkpoint (``{"history": []}``: KeyError 'epoch')."""
    from mmctr_ray.checkpoint import incomplete, read_state

    directory = _write_checkpoint(tmp_path, 1, 0.6)
    path = directory / "state.json"
    state = json.loads(path.read_text())
    state = {k: v for k, v in state.items() if k != change} if isinstance(change, str) else {**state, **change}
    text = json.dumps(state)
    path.write_text(text + " " * (json.loads((directory / "files.json").read_text())["state.json"] - len(text)))
    assert incomplete(directory) is None  # the size its manifest records: only reading it tells
    said = (r"state.json: not the state.json `mmctr train` writes \(expected an object of the schedule's epoch, "
            r"lr, best_auc, best_epoch, bad_epochs and a history that is a list of epoch rows with a valid_auc\)$")
    for read in (read_state, load_checkpoint, lambda d: best_checkpoint(d.parent)):
        with pytest.raises(DataError, match=said):
            read(directory)


@pytest.mark.parametrize("manifest, state", [("[]", None), ('{"model.pt": "many"}', None), (None, "[1]")])
def test_a_manifest_or_state_that_is_json_but_not_an_object_is_unreadable_not_a_traceback(tmp_path, manifest,
                                                                                          state):
    """files.json ``[]``, or (without a manifest) state.json ``[1]``, was an AttributeError traceback from
    incomplete() in epoch_checkpoints, so in `mmctr report`, `predict` and `train --resume`."""
    from mmctr_ray.checkpoint import incomplete

    directory = _write_checkpoint(tmp_path, 1, 0.6)
    if manifest is None:
        (directory / "files.json").unlink()
    else:
        (directory / "files.json").write_text(manifest)
    if state is not None:
        (directory / "state.json").write_text(state)
    name = "files.json" if manifest is not None else "state.json"
    assert incomplete(directory) == f"{name} unreadable"
    assert epoch_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None


def test_a_checkpoint_from_before_the_manifest_needs_no_optimizer(tmp_path):
    """A checkpoint written without an optimizer (and without files.json) is whole by the presence of the rest."""
    from mmctr_ray.checkpoint import incomplete

    directory = _write_checkpoint(tmp_path, 1, 0.6)
    (directory / "files.json").unlink()
    state = json.loads((directory / "state.json").read_text())
    (directory / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "files.json"}))
    (directory / "optimizer.pt").unlink()
    assert incomplete(directory) is None and load_checkpoint(directory).optimizer_state is None
    assert epoch_checkpoints(tmp_path) == [directory]


def test_an_error_about_a_downloaded_checkpoint_file_names_it_before_its_uris_query(tmp_path):
    """A checkpoint under a URI with a query is named as storage.join names its files: the query after the name."""
    directory = _write_checkpoint(tmp_path, 1, 0.6)
    state = directory / "state.json"
    state.write_bytes(b"[" + state.read_bytes()[1:])  # at the size files.json records
    uri = directory.as_uri() + "?x=1"  # pyarrow's file:// leaves the query out of the path
    with pytest.raises(DataError, match=rf"^{re.escape(directory.as_uri())}/state\.json\?x=1: not the state.json "):
        load_checkpoint(uri)


def test_a_checkpoint_gives_back_the_whole_schedule_state_it_was_saved_with(tmp_path):
    """bad_epochs is the early stop's count: a resume that lost it trained `patience` more epochs."""
    state = TrainState(epoch=4, lr=1e-4, best_auc=0.7, best_epoch=2, bad_epochs=2,
                       history=[{"epoch": e, "valid_auc": 0.7} for e in range(1, 5)])
    directory = tmp_path / "checkpoint_epoch_004"
    directory.mkdir()
    save_checkpoint(directory, torch.nn.Linear(3, 1), None, state, load_config(None),
                    FeatureMap(num_items=5, tag_vocab=6, tags_per_item=2, vector_dim=4, num_users=7), {})
    assert load_checkpoint(directory).state == state


def test_a_local_checkpoint_loaded_for_scoring_leaves_its_optimizer_unread(tmp_path):
    directory = _write_checkpoint(tmp_path, 1, 0.6)
    assert load_checkpoint(directory).optimizer_state is not None
    assert load_checkpoint(directory, with_optimizer=False).optimizer_state is None


def test_a_folder_named_like_a_checkpoint_without_an_epoch_number_is_not_one(tmp_path):
    first = _write_checkpoint(tmp_path, 1, 0.6)
    (tmp_path / "checkpoint_epoch_best").mkdir()  # a user's copy of the best one
    assert checkpoint_epoch(tmp_path / "checkpoint_epoch_best") is None
    assert epoch_checkpoints(tmp_path) == [first] and latest_checkpoint(tmp_path) == first


def test_the_best_checkpoint_is_judged_by_the_auc_of_its_own_epoch(tmp_path):
    """Each checkpoint's history holds every epoch up to its own: its last row is its AUC."""
    aucs = [0.60, 0.70, 0.65]
    for epoch in (1, 2, 3):
        directory = tmp_path / f"checkpoint_epoch_{epoch:03d}"
        directory.mkdir()
        history = [{"epoch": e, "valid_auc": aucs[e - 1]} for e in range(1, epoch + 1)]
        save_checkpoint(directory, torch.nn.Linear(3, 1), None, TrainState(epoch=epoch, lr=1e-3, history=history),
                        load_config(None), FeatureMap(num_items=5, tag_vocab=6, tags_per_item=2, vector_dim=4,
                                                      num_users=7), {})
    assert best_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch_002"


def test_a_checkpoint_named_for_scoring_must_be_whole_and_is_made_absolute(tmp_path, monkeypatch):
    from mmctr_ray.checkpoint import run_or_checkpoint

    run = tmp_path.resolve()
    monkeypatch.chdir(run)
    _write_checkpoint(run, 1, 0.6)
    second = _write_checkpoint(run, 2, 0.7)
    assert run_or_checkpoint("checkpoint_epoch_001") == run / "checkpoint_epoch_001"  # actors run elsewhere
    assert run_or_checkpoint(".") == second
    (second / "model.pt").write_bytes(b"cut short")
    with pytest.raises(DataError, match=r"^checkpoint_epoch_002: not a whole checkpoint \(model.pt has 9 bytes, "
                                        r"expected \d+\)$"):
        run_or_checkpoint("checkpoint_epoch_002")
    with pytest.raises(DataError, match=r"^checkpoint_epoch_009: not a whole checkpoint \(not found\)$"):
        run_or_checkpoint("checkpoint_epoch_009")


def test_uris_that_storage_would_misplace_or_cannot_open_are_one_line(monkeypatch):
    with pytest.raises(ConfigError, match=r"^s3://b/exp#: '#' starts a URI fragment"):  # pyarrow drops a bare '#'
        storage.normalize("s3://b/exp#")
    with pytest.raises(ConfigError, match=r"^s3://b/r\?bogus=1: Unexpected query parameter in S3 URI: 'bogus'$"):
        storage.resolve("s3://b/r?bogus=1")  # pyarrow's own word, not fsspec's "needs a package"
    import types

    def no_jvm(uri):
        raise OSError("Unable to load libjvm")

    monkeypatch.setattr(pafs, "FileSystem", types.SimpleNamespace(from_uri=no_jvm))
    with pytest.raises(ConfigError, match=r"^hdfs://nn/r: cannot open this storage \(Unable to load libjvm\)$"):
        storage.resolve("hdfs://nn/r")


def test_this_machines_side_of_a_copy_failing_is_not_blamed_on_the_storage(memory_root, tmp_path, monkeypatch):
    """A full local disk while a checkpoint downloads is the disk's OSError, not "cannot access this storage"
    (a StorageError, which training workers retry)."""
    from mmctr_ray.errors import StorageError

    storage.write_text(storage.join(memory_root, "a.txt"), "x")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pafs, "copy_files", disk_full)
    with pytest.raises(OSError, match="No space left on device") as err:
        storage.download_dir(memory_root, tmp_path / "copy")
    assert not isinstance(err.value, StorageError)


def test_uri_joins_and_siblings_of_a_folder_spelt_with_a_trailing_slash():
    assert storage.join("s3://b/run/", "checkpoint_epoch_001") == "s3://b/run/checkpoint_epoch_001"
    assert storage.sibling("s3://b/runs/r1/", ".r1.replaced") == "s3://b/runs/.r1.replaced"  # not inside r1


def test_a_json_file_that_holds_no_object_is_one_line(tmp_path):
    path = tmp_path / "item_source.json"
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match=r"^s3://b/r/item_source.json: holds a JSON list; expected the item_source"
                                        r".json `mmctr train` writes, a JSON object$"):
        storage.read_json_object(path, "the item_source.json `mmctr train` writes", "s3://b/r/item_source.json")

def test_predict_overwrite_refuses_a_zip_that_holds_more_than_a_submission(tmp_path):
    """A zip holding prediction.csv beside other files is no submission of `mmctr predict` (which writes
    prediction.csv alone): --overwrite keeps it (mutation audit: "prediction.csv among the names" passed)."""
    import zipfile

    from mmctr_ray.predict import check_output

    out = tmp_path / "sub.zip"
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("prediction.csv", "ID,Task2\n0,0.5\n")
        zf.writestr("notes/model_card.md", "weeks of notes")
    with pytest.raises(OutputExistsError, match=r"\(holds prediction.csv, notes/model_card.md; expected "
                                                r"prediction.csv alone\): not replaced, even with --overwrite"):
        check_output(out, overwrite=True)
    with zipfile.ZipFile(out) as zf:
        assert zf.read("notes/model_card.md") == b"weeks of notes"
