"""What `mmctr report` and `mmctr compare` read before they write: a run's epochs, a search folder, the labels."""

from __future__ import annotations

import csv
import json
import re
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmctr_ray.cli import main
from mmctr_ray.errors import ConfigError, DataError
from mmctr_ray.report import best_epoch, markdown_summary, read_metrics
from mmctr_ray.schema import Layout

ROOT = Path(__file__).parent.parent


def epoch(e: int, auc: float) -> dict:
    return {"epoch": e, "valid_auc": auc, "valid_logloss": 0.5, "train_loss": 0.5, "lr": 1e-3, "epoch_seconds": 1.0}


def test_a_nan_auc_is_never_the_best_epoch_as_training_never_keeps_it(tmp_path):
    """max() kept a NaN that came first: the report called epoch 1 (AUC nan) the best, where training and
    best_checkpoint (which compare with >) keep epoch 3."""
    rows = [epoch(1, math.nan), epoch(2, 0.70), epoch(3, 0.72), epoch(4, 0.72)]
    assert best_epoch(rows)["epoch"] == 3  # the earliest among equals, as training keeps it
    assert "Best validation AUC **0.7200** (logloss 0.5000) at epoch 3 of the 4 trained so far; the run has no " \
        "summary.json: it is still training, or it stopped before its end (`mmctr train --resume` continues it)." \
        in markdown_summary(tmp_path, rows)
    (tmp_path / "config.yaml").write_text("train:\n  epochs: 30\n")
    assert "at epoch 3 of the 4 trained so far (train.epochs 30); the run has no summary.json" in \
        markdown_summary(tmp_path, rows)  # a run stopped at epoch 4 of 30 read as a finished one
    (tmp_path / "summary.json").write_text('{"best_valid_auc": 0.72}\n')  # the run ended (early stop, say)
    assert "Best validation AUC **0.7200** (logloss 0.5000) at epoch 3 of 4.\n" in markdown_summary(tmp_path, rows)
    for name in ("config.yaml", "summary.json"):
        (tmp_path / name).unlink()
    assert best_epoch([epoch(1, math.nan)])["epoch"] == 1  # none finite: the report still has a row to show
    tuned = markdown_summary(tmp_path, [{**epoch(1, 0.7), "lr": 3.7e-4}, {**epoch(2, 0.7), "lr": 3.7e-5}])
    assert "| 0.5000 | 0.00037 |" in tuned and "| 0.5000 | 3.7e-05 |" in tuned  # a tuned lr as set (.0e: 4e-04)


def test_a_nan_auc_is_written_as_null_and_the_report_still_picks_the_best_finite_epoch(tmp_path, strict_json,
                                                                                        caplog):
    """metrics.jsonl held the bare token NaN for the AUC of a one-class validation split: Python read it back, but
    it is not JSON (jq, JavaScript and dashboards refused the file). It is null now, read back as NaN."""
    from types import SimpleNamespace

    from mmctr_ray.run_log import RunLog

    rows = [{**epoch(1, math.nan), "valid_auc_se": math.nan, "samples_per_s": None},
            {**epoch(2, 0.70), "valid_auc_se": 0.01, "samples_per_s": 100.0},
            {**epoch(3, 0.72), "valid_auc_se": math.inf, "samples_per_s": 100.0}]
    with RunLog(str(tmp_path), enabled=True) as run_log:
        run_log.epoch_end(SimpleNamespace(history=rows, best_auc=0.72, best_epoch=3))
    assert "NaN or Inf found" not in caplog.text  # tensorboardX's nameless line for each non-finite scalar
    written = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["valid_auc"], r["valid_auc_se"]) for r in written] == [(None, None), (0.70, 0.01), (0.72, None)]
    back = read_metrics(tmp_path, keys=("epoch", "valid_auc", "valid_auc_se"))
    assert math.isnan(back[0]["valid_auc"]) and math.isnan(back[0]["valid_auc_se"]) and back[0]["samples_per_s"] is None
    assert best_epoch(back)["epoch"] == 3
    assert main(["report", str(tmp_path)]) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "Best validation AUC **0.7200** (logloss 0.5000) at epoch 3 of the 3 trained so far;" in summary
    assert "| 1 | 0.5000 | nan | 0.5000 |" in summary  # the epoch without an AUC, as before


def test_compare_names_the_config_keys_each_run_sets_unlike_the_first():
    """`mmctr compare` across ablations: runs that differ in batch norm, an activation or the precision had the same
    one-line description, so its table could not tell them apart."""
    from mmctr_ray.compare import config_differences, markdown
    from mmctr_ray.config import load_config

    first = load_config(ROOT / "configs/tiny.yaml", ["model.dnn_units=[32, 16]"])
    nobn = load_config(ROOT / "configs/tiny.yaml", ["model.batch_norm=false", "model.dnn_units=[32, 8]"])
    assert config_differences([first, nobn, first]) == [
        {}, {"model.batch_norm": {"value": False, "first": True}, "model.dnn_units": {"value": [32, 8],
                                                                                     "first": [32, 16]}}, {}]
    # keys that do nothing in one of the two are no difference (helper-134: v3 against v4 listed fusion.dims, which
    # v4 never reads); the key that turns them off is
    v4 = load_config(ROOT / "configs/tiny.yaml", ["data.item_vector=/t/v4.parquet", "model.dnn_units=[32, 16]"])
    v3 = load_config(ROOT / "configs/tiny.yaml", ["fusion.strategy=v3", "fusion.dims=64",
                                                  "data.item_vector=/t/v3.parquet", "model.dnn_units=[32, 16]"])
    plain = load_config(ROOT / "configs/tiny.yaml", ["model.senet=false", "model.senet_ratio=4", "model.crossnet=off",
                                                     "model.use_history=false", "model.attention_dropout=0.3"])
    assert config_differences([v4, v3])[1] == {"data.item_vector": {"value": "/t/v3.parquet", "first": "/t/v4.parquet"},
                                               "fusion.strategy": {"value": "v3", "first": "v4"}}
    # a run on the shipped vectors (data.item_vector: given) fused nothing: its strategy is `given` whatever its
    # fusion section says, where compare listed a `given` run's tiny.yaml `fusion.strategy v4` against a v1 run's
    # as `v1 (v4)`
    assert first.fusion.strategy == "v4" and first.data.item_vector == "given"
    v1 = load_config(ROOT / "configs/tiny.yaml", ["fusion.strategy=v1", "data.item_vector=/t/v1.parquet",
                                                  "model.dnn_units=[32, 16]"])
    assert config_differences([first, v1])[1] == {"data.item_vector": {"value": "/t/v1.parquet", "first": "given"},
                                                  "fusion.strategy": {"value": "v1", "first": "given"}}
    assert config_differences([first, load_config(ROOT / "configs/tiny.yaml", [
        "fusion.strategy=v2", "fusion.dims=8", "model.dnn_units=[32, 16]"])])[1] == {}
    assert config_differences([first, plain])[1] == {
        "model.crossnet": {"value": "off", "first": "v2"}, "model.senet": {"value": False, "first": True},
        "model.use_history": {"value": False, "first": True}}
    runs = [{"run": name, "epoch": 1, "auc": 0.7, "se": 0.01, "diff": 0.0, "diff_se": 0.0, "p": 1.0,
             "config_vs_first": differs} for name, differs in zip("abc", config_differences([first, nobn, first]))]
    text = markdown({"split": "valid", "data": "D", "rows": 10, "positives": 3, "runs": runs})
    # the p-value is of these checkpoints, not of their configs (helper-134: read as the configs', it called two
    # trainings of one config different)
    assert "They hold these checkpoints fixed: another train.seed of the same config moves its AUC too" in text
    assert text.endswith("Config keys unlike the first run's (its value in brackets):\n"
                         "- b: model.batch_norm false (true), model.dnn_units [32, 8] ([32, 16])\n"
                         "- c: the same config\n")


def test_pairs_all_names_each_pair_later_minus_earlier_and_counts_the_pairs_holm_adjusted_over():
    """`compare --pairs all`'s tables: pair (i, j) is named j minus i for three or more runs or groups, a pair with
    no p (groups whose runs repeat each other) shows "–" and is not one of the pairs Holm counts."""
    from mmctr_ray.compare import markdown, named_pairs
    from mmctr_ray.metrics import holm

    rows = [{"i": i, "j": j, "diff": 0.01 * (j - i), "diff_se": 0.004, "p": p}
            for (i, j), p in zip([(0, 1), (0, 2), (1, 2)], [0.01, float("nan"), 0.02])]
    for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adjusted
    named = named_pairs(rows, ["given", "v1", "v4"], "group")
    assert [(g["group"], g["minus"]) for g in named] == [("v1", "given"), ("v4", "given"), ("v4", "v1")]
    assert all("i" not in g and "j" not in g for g in named) and "i" in rows[0]  # the rows given are kept as they are
    for g in named:
        g["diff_se_rows"] = 0.002
    runs = [{"run": r, "epoch": 1, "auc": 0.7, "se": 0.01, "diff": 0.0, "diff_se": 0.0, "p": 1.0} for r in "ab"]
    text = markdown({"split": "valid", "data": "D", "rows": 10, "positives": 3, "runs": runs, "group_pairs": named,
                     "pairs": named_pairs(rows[:1], ["a", "b"], "run")})
    assert "p Holm is p adjusted for testing the 2 pairs with a p (of 3) together" in text
    assert "| v4 | given | +0.0200 | 0.0040 | – | – | 0.0020 |" in text
    assert "| v4 | v1 | +0.0100 | 0.0040 | 0.02 | 0.02 | 0.0020 |" in text  # Holm over 2: 0.01×2, max(0.02×1, 0.02)
    assert "Every pair of runs (1): " in text and "testing the 1 pair together" in text
    assert "| b | a | +0.0100 | 0.0040 | 0.01 | 0.02 |" in text  # the rows' own p_holm (adjusted over the 3)


def _stub_scoring(monkeypatch, labels: np.ndarray, scores: dict[str, np.ndarray], seeds: dict[str, int]) -> list:
    """`compare_runs` without checkpoints: each run name scores ``scores[name]`` with a tiny.yaml of its seed;
    returns the list of names scored, in order."""
    import types

    import mmctr_ray.compare as compare
    import mmctr_ray.predict as predict
    from mmctr_ray.config import load_config

    scored = []
    configs = {name: load_config(ROOT / "configs/tiny.yaml", [f"train.seed={seeds[name]}"]) for name in scores}
    monkeypatch.setattr(compare, "split_labels", lambda data_dir, split: (Path("valid.parquet"), labels))
    monkeypatch.setattr(compare, "_checkpoint", lambda target: target)
    monkeypatch.setattr(compare, "describe_run", lambda cfg, source: "")
    monkeypatch.setattr(compare.storage, "read_text", lambda path: json.dumps({"epoch": 2}))
    monkeypatch.setattr(compare.storage, "join", lambda *parts: parts[0])
    monkeypatch.setattr(predict, "load_model", lambda checkpoint, data_dir, device: types.SimpleNamespace(
        experiment_cfg=configs[checkpoint], item_source=None, name=checkpoint))
    monkeypatch.setattr(predict, "score_parquet", lambda model, *args, **kwargs: scored.append(model.name)
                        or scores[model.name])
    monkeypatch.setattr(predict, "check_finite", lambda *args: None)
    return scored


def test_compare_scores_each_run_once_tests_each_against_the_first_and_pairs_the_runs_given(monkeypatch):
    """`compare_runs` on scores it is handed (helper-140's mutation audit found it tested only by a slow test of
    three trained runs): a run named twice is scored and paired once, the RUNs given come first (the first is the
    reference, also with groups), `--pairs all` pairs the RUNs given among themselves (two are enough) and the groups
    as groups, and the header counts the clicks."""
    from mmctr_ray.compare import compare_runs
    from mmctr_ray.metrics import compare_aucs, compare_groups, auc_covariance

    rng = np.random.default_rng(7)
    labels = (rng.random(600) < 0.28).astype(np.int64)
    names = ["X", "Y", "A1", "A2", "B1", "B2"]
    scores = {n: labels + rng.normal(scale=s, size=600) for n, s in zip(names, (0.8, 0.9, 0.6, 0.65, 1.0, 1.1))}
    scored = _stub_scoring(monkeypatch, labels, scores, dict(zip(names, range(6))))
    got = compare_runs(["X", "X", "Y"], "D", pairs="all")
    assert scored == ["X", "Y"] and [r["run"] for r in got["runs"]] == ["X", "Y"]
    assert (got["rows"], got["positives"]) == (600, int(labels.sum())) and 0 < labels.mean() < 0.5
    assert [(p["run"], p["minus"]) for p in got["pairs"]] == [("Y", "X")]
    alone = compare_aucs(labels, [scores["X"], scores["Y"]])[1]
    assert got["runs"][1]["diff"] == pytest.approx(alone["diff"]) and got["pairs"][0]["p"] == pytest.approx(alone["p"])
    scored.clear()
    got = compare_runs(["X"], "D", groups=[("A", ["A1", "A2"]), ("B", ["B1", "B2"])], pairs="all")
    assert scored == ["X", "A1", "A2", "B1", "B2"] and got["runs"][0]["run"] == "X" and got["runs"][0]["diff"] == 0
    assert "pairs" not in got and [(g["group"], g["minus"]) for g in got["group_pairs"]] == [("B", "A")]
    aucs, cov = auc_covariance(labels, [scores[n] for n in names[2:]])
    b = compare_groups(aucs, cov, [[0, 1], [2, 3]])[1]
    assert got["groups"][1]["diff"] == pytest.approx(b["diff"]) and got["group_pairs"][0]["p"] == pytest.approx(b["p"])
    assert compare_runs(["X", "Y"], "D").keys() == {"data", "split", "rows", "positives", "runs"}  # --pairs first


def test_compare_tables_format_each_figure_and_mark_undefined_ones():
    """The runs and groups tables' columns, and "–" where a figure is undefined (a class of one row has no standard
    error: the tables printed "nan")."""
    from mmctr_ray.compare import _p_text, markdown

    nan = float("nan")
    runs = [{"run": "X", "epoch": 3, "auc": 0.71234, "se": 0.01234, "diff": 0.0, "diff_se": 0.0, "p": 1.0},
            {"run": "Y", "epoch": 2, "auc": 0.72714, "se": 0.0119, "diff": 0.0148, "diff_se": 0.02187, "p": 0.01234},
            {"run": "Z", "epoch": 1, "auc": 0.4, "se": nan, "diff": -0.31234, "diff_se": nan, "p": nan}]
    groups = [{"group": "A", "runs": 2, "mean": 0.7154, "sd": 0.0022, "diff": nan, "diff_se": nan, "p": nan,
               "diff_se_rows": nan},
              {"group": "B", "runs": 3, "mean": 0.7533, "sd": 0.0031, "diff": 0.0379, "diff_se": 0.0027,
               "p": 0.00123, "diff_se_rows": 0.0116}]
    text = markdown({"split": "valid", "data": "D", "rows": 5000, "positives": 1234, "runs": runs, "groups": groups})
    assert text.startswith("valid split of D: 5,000 rows, 1,234 positives. ")
    assert "| X | 3 | 0.7123 | 0.0123 | – | – | – |" in text
    assert "| Y | 2 | 0.7271 | 0.0119 | +0.0148 | 0.0219 | 0.012 |" in text
    assert "| Z | 1 | 0.4000 | – | -0.3123 | – | – |" in text
    assert "| A | 2 | 0.7154 | 0.0022 | – | – | – | – |" in text
    assert "| B | 3 | 0.7533 | 0.0031 | +0.0379 | 0.0027 | 0.0012 | 0.0116 |" in text
    assert "nan" not in text and _p_text(0.01234) == "0.012" and _p_text(nan) == "–"


def test_only_what_compare_writes_counts_as_a_comparison_to_overwrite(tmp_path):
    from mmctr_ray.compare import is_comparison

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data": "D", "split": "valid", "rows": 1, "positives": 1, "runs": []}))
    assert is_comparison(path)
    path.write_text(json.dumps({"data": "D", "split": "valid", "note": "mine"}))  # another tool's JSON
    assert not is_comparison(path)
    path.write_text("[1, 2]")
    assert not is_comparison(path)


def _one_trial_search(tmp_path: Path, trial: str, rows: list[dict]) -> Path:
    """A search folder of one trial of the tiny search that wrote ``rows`` as its metrics.jsonl."""
    from mmctr_ray.config import load_config, save_config

    tdir = tmp_path / "tune"
    (tdir / "trials" / trial).mkdir(parents=True)
    (tdir / "search.yaml").write_text((ROOT / "configs/search_tiny.yaml").read_text())
    (tdir / "settings.json").write_text(json.dumps({"overrides": []}))
    (tdir / "trials" / f"{trial}.params.json").write_text(json.dumps({"train.lr": 1e-3}))
    save_config(load_config(ROOT / "configs/tiny.yaml"), tdir / "trials" / trial / "config.yaml")
    (tdir / "trials" / trial / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tdir


def test_the_searchs_best_auc_is_the_trials_own_not_rounded_twice(tmp_path):
    """results.csv held each best AUC rounded to 6 places, which `mmctr tune`'s last line and `mmctr report`'s
    table then rounded to 4: a trial's 0.845649944, said 0.8456 by the trial, was 0.8457 there (its SE too). Its
    best epoch, not its last (a mutation that ranked trials by their last epoch passed: every AUC rose)."""
    from mmctr_ray.tune_report import top_trials, write_outputs

    rows = [{**epoch(e, auc), "valid_auc_se": 0.00664995} for e, auc in ((1, 0.8), (2, 0.845649944), (3, 0.83))]
    tdir = _one_trial_search(tmp_path, "t1", rows)
    (tdir / "trials" / "t1" / "summary.json").write_text("{}")
    summary = write_outputs(tdir)
    assert (f"{summary['best_valid_auc']:.4f}", f"{summary['best_valid_auc_se']:.4f}") == ("0.8456", "0.0066")
    assert "| 1 | t1 | completed | 0.8456 | 0.0066 | 3 |" in top_trials(tdir)  # 3 epochs trained
    with open(tdir / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert (row["best_valid_auc"], row["best_epoch"], row["epochs"]) == ("0.845649944", "2", "3")


def test_a_search_folder_the_report_cannot_use_is_one_line_and_nothing_is_rewritten(tmp_path, capsys):
    """tune_results.json or a trial's params.json cut short or of another shape: JSONDecodeError and TypeError
    tracebacks; plots/ a file: a FileExistsError after results.csv and best.yaml had been rewritten."""
    tdir = _one_trial_search(tmp_path, "t1", [epoch(1, 0.7)])
    results = tdir / "tune_results.json"
    params = tdir / "trials" / "t1.params.json"
    for path, text, said in [
            (results, "{x", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
                            "(char 1)); expected the tune_results.json `mmctr tune` writes"),
            (results, "[1]", "holds a JSON list; expected the tune_results.json `mmctr tune` writes, a JSON object"),
            (results, '{"errors": [1]}', "not the tune_results.json `mmctr tune` writes (expected an object of "
                                        "errors by trial and a list of trials)"),
            (params, "{bad", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
                             "(char 1)); expected the trial's parameters `mmctr tune` writes")]:
        good = path.read_text() if path.is_file() else None
        path.write_text(text)
        assert main(["report", str(tdir)]) == 2
        assert capsys.readouterr().err.strip() == f"mmctr report: error: {path}: {said}"
        path.unlink() if good is None else path.write_text(good)
    (tdir / "plots").write_text("x")
    assert main(["report", str(tdir)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"mmctr report: error: {tdir / 'plots'}: a file; expected the "
                                                      f"folder `mmctr report` writes the search's plots into")
    assert not (tdir / "results.csv").exists() and not (tdir / "best.yaml").exists()


def test_a_search_trial_without_a_finite_auc_has_no_result_to_rank(tmp_path):
    """A search whose every trial scored NaN wrote best.yaml for one of them and ended as a success."""
    from mmctr_ray.tune_report import write_outputs

    tdir = _one_trial_search(tmp_path, "aaa", [epoch(1, math.nan)])
    summary = write_outputs(tdir)
    assert "best_trial" not in summary and not (tdir / "best.yaml").exists()


def test_two_processes_writing_one_plot_leave_it_whole(tmp_path, monkeypatch):
    """`mmctr report TUNE` may write a search's plots while the search's end does: both wrote through one temporary
    name, so one moved the other's file into place and the other's replace failed (a traceback after the search)."""
    import itertools
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmctr_ray import tune_report

    pids = itertools.count(1)
    monkeypatch.setattr(os, "getpid", lambda: next(pids))
    path = tmp_path / "auc_by_trial.png"
    mine, theirs = plt.figure(), plt.figure()
    replace = os.replace

    def interleaved(src, dst):  # the other process writes the plot between this one's write and its replace
        monkeypatch.setattr(os, "replace", replace)
        tune_report._save(theirs, path)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", interleaved)
    tune_report._save(mine, path)
    assert path.read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_searchs_trials_keep_their_start_order_when_the_folder_is_copied(tmp_path):
    """results.csv numbered the trials by their params.json's modification time, which a copy of the search
    (`cp -r`, a bucket sync) resets in no order. The time a trial started is kept in params.json; a search of an
    older version (no such key) still orders by modification time, and both kinds sort together."""
    import csv
    import os

    from mmctr_ray.config import load_config, save_config
    from mmctr_ray.tune_report import STARTED, write_outputs

    tdir = tmp_path / "tune"
    (tdir / "trials").mkdir(parents=True)
    (tdir / "search.yaml").write_text((ROOT / "configs/search_tiny.yaml").read_text())
    (tdir / "settings.json").write_text(json.dumps({"overrides": []}))
    # started c, old (no key: its file's time), a, b; the copy's modification times say b, a, old, c
    for trial, started, mtime in (("c", 1000.5, 4000), ("old", None, 1500), ("a", 2000.25, 3000), ("b", 2000.75, 900)):
        (tdir / "trials" / trial).mkdir()
        params = {"train.lr": 1e-3, **({STARTED: started} if started else {})}
        (tdir / "trials" / f"{trial}.params.json").write_text(json.dumps(params))
        os.utime(tdir / "trials" / f"{trial}.params.json", (mtime, mtime))
        save_config(load_config(ROOT / "configs/tiny.yaml"), tdir / "trials" / trial / "config.yaml")
        (tdir / "trials" / trial / "metrics.jsonl").write_text(json.dumps(epoch(1, 0.7)) + "\n")
    write_outputs(tdir)
    with open(tdir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["trial"], r["trial_id"]) for r in rows] == [("0", "c"), ("1", "old"), ("2", "a"), ("3", "b")]
    assert STARTED not in rows[0] and rows[0]["train.lr"] == "0.001"  # the time is no search parameter


@pytest.mark.parametrize("line, expected", [
    ("[1, 2]", "record 2 is not an epoch's; expected an object with the numbers epoch, train_loss, valid_auc, "
               "valid_logloss, lr, epoch_seconds"),
    ('{"epoch": 2}', "record 2 is not an epoch's"),
    ('{"epoch": 2, "valid_a', "line 2 is not JSON"),  # a line cut short: it said line 1 (JSON's own line count)
    ('{"epoch": 2, "valid_auc": "0.7", "valid_logloss": 0.5, "train_loss": 0.5, "lr": 0.001, "epoch_seconds": 1}',
     "record 2 is not an epoch's"),
    # "at epoch True of 2"; the numbers the summary formats were a ValueError or TypeError traceback
    ('{"epoch": true, "valid_auc": 0.7, "valid_logloss": 0.5, "train_loss": 0.5, "lr": 0.001, "epoch_seconds": 1}',
     "record 2 is not an epoch's"),
    ('{"epoch": 2, "valid_auc": 0.7, "valid_logloss": 0.5, "train_loss": 0.5, "lr": 0.001, "epoch_seconds": 1, '
     '"valid_rows": "100"}', "record 2: valid_rows is '100'; expected a number"),
    ('{"epoch": 2, "valid_auc": 0.7, "valid_logloss": 0.5, "train_loss": 0.5, "lr": 0.001, "epoch_seconds": 1, '
     '"valid_auc_se": "0.01"}', "record 2: valid_auc_se is '0.01'; expected a number"),
    ('{"epoch": 2, "valid_auc": 0.7, "valid_logloss": 0.5, "train_loss": 0.5, "lr": 0.001, "epoch_seconds": 1, '
     '"samples_per_s": "fast"}', "record 2: samples_per_s is 'fast'; expected a number"),
])
def test_a_metrics_file_that_is_not_a_runs_is_one_line(tmp_path, capsys, line, expected):
    """Before: a TypeError or KeyError traceback out of the report's table."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps(epoch(1, 0.6)) + "\n" + line + "\n")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmctr report: error: {tmp_path / 'metrics.jsonl'}: {expected}") and "\n" not in err
    assert not (tmp_path / "report").exists()
    if line.startswith('{"epoch": 2') and "is not an epoch's" in expected:  # the readers that need only the epoch
        # and its AUC read what they need
        with pytest.raises(DataError, match="record 2 is not an epoch's; expected an object with the numbers epoch, "
                                            "valid_auc$"):
            read_metrics(tmp_path)


def test_a_run_folder_the_report_cannot_use_is_one_line(tmp_path, capsys):
    """metrics.jsonl not UTF-8, a folder, RUN a file, and RUN/report a file: UnicodeDecodeError and FileExistsError
    tracebacks, or "metrics.jsonl: missing file" of a file given as RUN."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b"\xff\xfe\x00garbage\n")
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"mmctr report: error: {metrics}: not UTF-8 text (byte 0: invalid "
                                               f"start byte); expected the metrics.jsonl `mmctr train` writes")
    metrics.write_text(json.dumps(epoch(1, 0.6)) + "\n")
    (tmp_path / "report").write_text("x")
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"mmctr report: error: {tmp_path / 'report'}: a file; expected "
                                                      f"the folder `mmctr report` writes")
    assert (tmp_path / "report").read_text() == "x"
    assert main(["report", str(metrics)]) == 2
    assert capsys.readouterr().err.strip() == (f"mmctr report: error: {metrics}: a file; expected a run directory "
                                               f"of `mmctr train`")
    metrics.unlink()
    metrics.mkdir()
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"mmctr report: error: {metrics}: a folder; expected the "
                                               f"metrics.jsonl file `mmctr train` writes")


def test_report_of_a_search_before_its_first_trial_says_so(tmp_path, capsys):
    """A search folder before trials/ exists was read as a run: "metrics.jsonl: missing file (is it a run
    directory of `mmctr train`?)"."""
    (tmp_path / "search.yaml").write_text((ROOT / "configs/search_tiny.yaml").read_text())
    (tmp_path / "settings.json").write_text(json.dumps({"overrides": []}))
    (tmp_path / "trials").mkdir()  # as _trial_rows finds it empty; without it, the same line
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"mmctr report: error: {tmp_path / 'trials'}: no trial has started yet"
    (tmp_path / "trials").rmdir()
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"mmctr report: error: {tmp_path / 'trials'}: no trial has started yet"


def test_damaged_hidden_test_labels_are_one_line_for_compare_and_predict_before_ray(synth_dir, tmp_path, capsys):
    """synthetic_truth/test_labels.parquet not parquet, or without a label column: pyarrow's traceback, in
    predict after Ray had started (it reads them for the test AUC), in compare before it scored."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmctr_ray.predict import check_inputs

    data = shutil.copytree(synth_dir, tmp_path / "data", ignore=shutil.ignore_patterns("item_images"))
    truth = Layout(data).hidden_test_labels
    for write, said in [(lambda: truth.write_text("garbage"), "not a readable parquet file ("),
                        (lambda: pq.write_table(pa.table({"lbl": [0, 1]}), truth), "no label column (it has lbl)")]:
        write()
        with pytest.raises(DataError, match=rf"^{re.escape(str(truth))}: {re.escape(said)}.*expected the hidden "
                                            r"test labels `mmctr synth` wrote: synthesize the data again$"):
            check_inputs(tmp_path / "no-run", data, "test")  # before the run is read, and Ray started
        assert main(["compare", str(tmp_path / "no-run"), "--data", str(data), "--split", "test"]) == 2
        assert f"{truth}: {said}" in capsys.readouterr().err


def test_compare_refuses_bad_or_one_class_labels_and_a_json_folder_before_scoring(synth_dir, tmp_path, capsys,
                                                                                  monkeypatch, caplog):
    """Each ended in a traceback after every run was scored (hours on a large split), or, for a label that is not
    0 or 1, in AUCs that counted it as a click; compare now checks the split as train and predict do."""
    import shutil

    import mmctr_ray.compare as compare

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("item_images"))
    lay = Layout(data)

    def relabel(path, labels):
        table = pq.read_table(path)
        pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels)), path)

    valid = pq.read_table(lay.split("valid"), columns=["label"]).column(0).to_numpy()
    n = len(valid)
    relabel(lay.split("valid"), np.r_[valid[:-1], 0.5])
    with pytest.raises(DataError) as err:
        compare.split_labels(data, "valid")
    assert str(err.value) == (f"{lay.split('valid')}: column label: row {n - 1:,} holds 0.5, expected labels 0 or 1; "
                              f"run `mmctr validate {data}` for the rows")
    for clicks in (0, 1):  # either class alone
        relabel(lay.split("valid"), np.full(n, clicks))
        with pytest.raises(DataError) as err:
            compare.split_labels(data, "valid")
        assert str(err.value) == (f"{lay.split('valid')}: the valid labels hold one class only ({clicks * n:,} clicks "
                                  f"of {n:,} rows); an AUC needs clicks and non-clicks")
    # synthetic data's hidden test labels for a test split cut since: "N rows scored but M labels" after the first
    # run was scored, naming the split
    test = pq.read_table(lay.split("test"))
    truth = pq.read_table(lay.hidden_test_labels)
    pq.write_table(test.slice(0, len(test) - 1), lay.split("test"))
    with pytest.raises(DataError) as err:
        compare.split_labels(data, "test")
    assert str(err.value) == (f"{lay.hidden_test_labels}: {len(test):,} labels for a test split of {len(test) - 1:,} "
                              f"rows ({lay.split('test')}); the split is not the one `mmctr synth` wrote: compare on "
                              f"valid")
    pq.write_table(test, lay.split("test"))
    assert compare.split_labels(data, "test")[1].tolist() == truth.column("label").to_numpy().tolist()
    labels = truth.column("label").to_numpy().astype(float)
    labels[3] = np.nan
    pq.write_table(truth.set_column(truth.schema.get_field_index("label"), "label", pa.array(labels)),
                   lay.hidden_test_labels)
    with pytest.raises(DataError, match=r"test_labels.parquet: column label: row 3 holds nan, expected labels 0 or 1"):
        compare.split_labels(data, "test")
    # data of `mmctr convert`: the test split keeps its true labels (compare said "missing file" for the hidden ones)
    relabel(lay.split("test"), truth.column("label").to_numpy())
    shutil.rmtree(lay.hidden_test_labels.parent)
    lay.convert_manifest.write_text("{}")
    assert compare.split_labels(data, "test")[1].tolist() == truth.column("label").to_numpy().tolist()
    monkeypatch.setattr(compare, "compare_runs", lambda *a, **k: pytest.fail("scored before the check"))
    (tmp_path / "out.json").mkdir()
    assert main(["compare", "r1", "r2", "--data", str(tmp_path), "--json", str(tmp_path / "out.json"),
                 "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == (f"mmctr compare: error: {tmp_path / 'out.json'}: --json names a "
                                               f"file to write; it is a folder or lies below a file")
    assert main(["compare", "--data", str(tmp_path)]) == 2  # RUN became optional beside --group: not both absent
    assert capsys.readouterr().err.strip() == ("mmctr compare: error: compare: no run given: name runs (RUN ...) or "
                                               "groups of them (--group NAME RUN RUN ...)")
    assert main(["compare", "--data", str(tmp_path), "--group", "A"]) == 2  # a group's own message, not "no run"
    assert capsys.readouterr().err.strip().endswith("compare: --group A names 0 run; a group is one config trained "
                                                    "with several seeds, 2 or more runs (its spread over seeds is "
                                                    "what its test measures)")
    assert main(["compare", "r1", "r1", "--data", str(tmp_path), "--group", "A", "r2", "r3", "--pairs", "all"]) == 2
    assert capsys.readouterr().err.strip() == ("mmctr compare: error: compare --pairs all: 1 run and 1 group given; it "
                                               "needs 2 or more runs (RUN RUN ...) or 2 or more groups (--group ...) "
                                               "to pair")  # a run named twice is one run
    from mmctr_ray.compare import check_groups, _warn_mixed_group

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    for groups, said in (([(str(run), ["r1", "r2"])], f"compare: --group {run} ...: the first word after --group is "
                                                       f"the group's name, and {run} is a path to a run; write --group "
                                                       f"NAME RUN RUN ..."),  # the name forgotten
                         ([("a", ["r1", "r2"]), ("b", ["r2", "r3"])], "compare: r2 is in --group a and --group b"),
                         ([("a", ["r1", "r1"])], "compare: --group a names r1 twice"),
                         ([("a", ["r1", "r2"]), ("a", ["r3", "r4"])], "compare: two groups are named a"),
                         ([("results/v4", ["r1", "r2"])], "compare: --group results/v4 ...: the first word after "
                                                           "--group is the group's name, and results/v4 is a path to "
                                                           "a run; write --group NAME RUN RUN ..."),  # no run there
                         ([("a", ["r1"])], "compare: --group a names 1 run; a group is one config trained with several "
                                           "seeds, 2 or more runs (its spread over seeds is what its test measures)")):
        with pytest.raises(ConfigError, match=f"^{re.escape(said)}$"):
            check_groups(groups)
    from mmctr_ray.compare import check_pairs

    check_pairs("all", ["r1", "r2"], 0)  # two runs, or two groups, are enough to pair
    check_pairs("all", [], 2)
    check_pairs("first", ["r1"], 0)
    with pytest.raises(ConfigError, match=r"^compare: --pairs every: expected one of first, all$"):
        check_pairs("every", ["r1", "r2"], 0)
    # a group is one config with other seeds: other keys, or a seed twice, are said (its spread is not the seeds')
    from mmctr_ray.config import load_config

    tiny = [load_config(ROOT / "configs/tiny.yaml", [f"train.seed={s}"]) for s in (1, 2, 3)]
    with caplog.at_level("WARNING", logger="mmctr_ray.compare"):
        _warn_mixed_group("v4", ["s1", "s2", "s3"], tiny)
        assert not caplog.records  # seeds alone
        _warn_mixed_group("v4", ["s1", "s2", "x"], [*tiny[:2], load_config(ROOT / "configs/tiny.yaml", [
            "train.seed=1", "model.senet=false", "model.senet_ratio=4"])])
    assert [r.getMessage() for r in caplog.records] == [
        "--group v4: x differs from s1 in model.senet, not in train.seed alone: the group's spread is not only its "
        "seeds'",
        "--group v4: s1 and x were both trained with train.seed 1: they measure no spread over seeds between them (a "
        "group is one config trained with other seeds)"]


def test_a_report_is_written_beside_a_summary_json_training_did_not_write(tmp_path, caplog):
    """The oracle line read summary.json unguarded: a cut or hand-edited file was a JSONDecodeError traceback (a
    list an AttributeError) and no report at all. The epochs' report is written, with a warning naming the file."""
    rows = [epoch(1, 0.70), epoch(2, 0.72)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"oracle_valid_auc": 0.8907}))
    report = markdown_summary(tmp_path, read_metrics(tmp_path))
    assert "Oracle AUC of the synthetic data: 0.8907 (gap 0.1707)." in report
    for garbled in ('{"oracle_valid_auc": 0.89', "[0.8907]", '{"oracle_valid_auc": true}',
                    '{"oracle_valid_auc": "0.9"}', '{"oracle_valid_auc": null}'):
        (tmp_path / "summary.json").write_text(garbled)
        caplog.clear()
        assert main(["report", str(tmp_path)]) == 0, garbled
        summary = (tmp_path / "report" / "summary.md").read_text()
        assert "Best validation AUC **0.7200**" in summary and "Oracle AUC" not in summary
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warned) == (0 if "null" in garbled else 1), garbled
        assert all(w.startswith(f"{tmp_path / 'summary.json'}: not the summary.json `mmctr train` writes (")
                   and w.endswith("): no oracle AUC in the report") for w in warned)


@pytest.mark.parametrize("epochs, ticks", [([1], [1.0]), ([1, 2, 3], [1.0, 2.0, 3.0]), ([3, 4], [3.0, 4.0])])
def test_the_curves_tick_whole_epochs_even_for_one_epoch(epochs, ticks):
    """MaxNLocator(integer=True) gives way when fewer than two whole numbers are in view: a one-epoch run (epochs=1,
    or stopped after epoch 1) drew its axis as 0.945, 0.960, ... 1.065."""
    import matplotlib.pyplot as plt

    from mmctr_ray.report import curves_figure

    fig = curves_figure([epoch(e, 0.7) for e in epochs])
    try:
        assert [list(ax.get_xticks()) for ax in fig.axes] == [ticks] * 3
    finally:
        plt.close(fig)
    many = curves_figure([epoch(e, 0.7) for e in range(1, 41)])  # more epochs: whole numbers, not one tick each
    try:
        shown = [t for t in many.axes[0].get_xticks() if 1 <= t <= 40]
        assert 2 <= len(shown) < 20 and all(float(t).is_integer() for t in shown), shown
    finally:
        plt.close(many)


def test_a_report_names_its_run_as_given_by_dot_and_writes_its_summary_last(tmp_path, monkeypatch):
    """`cd RUN && mmctr report .` titled the summary "# Run ``" (the name of '.'); and summary.md was written before
    the curves were drawn, so a failure to draw or write them left a new summary beside the old curves."""
    from mmctr_ray import report

    run = tmp_path / "baseline_run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(epoch(e, 0.7 + e / 100)) + "\n" for e in (1, 2)))
    monkeypatch.chdir(run)
    assert main(["report", "."]) == 0
    summary = (run / "report" / "summary.md").read_text()
    assert summary.startswith("# Run `baseline_run`\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps(epoch(e, 0.7 + e / 100)) + "\n" for e in (1, 2, 3)))

    def fail(rows):
        raise RuntimeError("the figure could not be drawn")

    monkeypatch.setattr(report, "plot_curves", fail)
    with pytest.raises(RuntimeError, match="^the figure could not be drawn$"):
        report.write_report(".")
    assert (run / "report" / "summary.md").read_text() == summary  # the earlier summary, still beside its curves


def test_parameter_importance_needs_ten_completed_trials_and_says_how_many_it_is_over(tmp_path):
    """fANOVA's importances were drawn from 2 completed trials (three parameters at 0.24-0.35 from a pair: helper-134),
    without saying over how many."""
    import optuna
    from optuna.distributions import FloatDistribution

    from mmctr_ray.search_space import load_search
    from mmctr_ray.tune_report import MIN_IMPORTANCE_TRIALS, _importances

    space = load_search(ROOT / "configs/search_tiny.yaml")
    study = optuna.create_study(study_name="mmctr", storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize")
    dist = {"train.lr": FloatDistribution(1e-3, 1e-2, log=True), "model.dropout": FloatDistribution(0.0, 0.3)}
    rng = np.random.default_rng(0)

    def add(n: int) -> None:  # the AUC follows the learning rate alone
        for lr, dropout in zip(10 ** rng.uniform(-3, -2, n), rng.uniform(0, 0.3, n)):
            study.add_trial(optuna.trial.create_trial(params={"train.lr": lr, "model.dropout": dropout},
                                                      distributions=dist, value=0.7 + 10 * lr))

    add(MIN_IMPORTANCE_TRIALS - 1)
    assert _importances(tmp_path, space) == ({}, "parameter importance needs 10+ trials that differ and ran to their "
                                                 "end, not pruned (9 did): fANOVA's forest over fewer ranks noise")
    add(1)
    found, over = _importances(tmp_path, space)
    assert over == "10 completed trials" and set(found) == {"train.lr", "model.dropout"}
    assert found["train.lr"] > 0.9 > found["model.dropout"]


def test_report_of_several_runs_draws_a_line_per_run_and_tables_each_runs_best(tmp_path, capsys):
    """`mmctr report RUN_A RUN_B` was refused (helper-134): comparing fusion strategies meant opening each run's
    report. Several runs get one curves.png (a line per run) and one summary.md (a row per run) in --out."""
    from mmctr_ray.config import load_config, save_config

    runs = []
    for name, aucs, summary in (("v3", (0.70, 0.72), {"stop_reason": "train.epochs=2 reached"}),
                                ("v4", (0.71, 0.74, 0.73), None)):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(epoch(e, a)) + "\n" for e, a in enumerate(aucs, 1)))
        save_config(load_config(ROOT / "configs/tiny.yaml", [f"fusion.strategy={name}"]), run / "config.yaml")
        if summary:
            (run / "summary.json").write_text(json.dumps(summary))
        runs.append(str(run))
    out = tmp_path / "cmp"
    assert main(["report", *runs, "--out", str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert capsys.readouterr().out == text + "\n"  # printed as written
    assert f"| {runs[0]} | config `tiny`: " in text
    assert " | 2 | 0.7200 | – | 0.5000 | 2 | train.epochs=2 reached |" in text
    assert " | 2 | 0.7400 | – | 0.5000 | 3 | still training, or stopped before its end |" in text
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (Path(runs[0]) / "report").exists()  # the runs are read only
    assert main(["report", *runs, "--out", str(out)]) == 2  # an earlier comparison is kept without --overwrite
    assert capsys.readouterr().err.strip().endswith(f"{out}: already holds curves.png and summary.md; pass "
                                                    "--overwrite to replace them")
    assert main(["report", *runs, "--out", str(out), "--overwrite"]) == 0
    assert main(["report", "--run", runs[0], runs[1], "--out", str(out), "--overwrite"]) == 0  # --run: the first
    assert f"| {runs[0]} | " in (out / "summary.md").read_text()
    capsys.readouterr()
    search = tmp_path / "tune"
    search.mkdir()
    (search / "settings.json").write_text("{}")
    for argv, said in ((["report", *runs], "2 runs: --out DIR names the folder for their curves.png and summary.md"),
                       (["report", runs[0], "--out", str(out)],
                        "--out/--overwrite: for several runs; one run's report goes into RUN/report/"),
                       (["report", runs[0], runs[0], "--out", str(out)], f"{runs[0]}: given twice; name each run once"),
                       (["report", str(search), runs[0], "--out", str(out)],
                        f"{search}: a search; `mmctr report` takes one search, or runs of `mmctr train` (a search's "
                        f"trials are runs: TUNE/trials/ID)")):
        assert main(argv) == 2 and capsys.readouterr().err.strip().endswith(said)

def _figures_rows() -> list[dict]:
    """Three epochs whose every figure differs, so a figure of the wrong epoch or column shows."""
    figures = [(1, 0.61, 0.70, 0.52, 1e-3, 12.34, 12345.6, 0.01, 4000),
               (2, 0.55, 0.74, 0.47, 1e-3, 11.0, 23456.0, 0.0125, 5000),
               (3, 0.50, 0.73, 0.49, 1e-4, 9.96, None, 0.02, 6000)]
    keys = ("epoch", "train_loss", "valid_auc", "valid_logloss", "lr", "epoch_seconds", "samples_per_s", "valid_auc_se",
            "valid_rows")
    return [dict(zip(keys, row)) for row in figures]


def test_the_summary_states_the_best_epochs_own_figures_and_a_table_row_per_epoch_in_its_columns(tmp_path):
    """The summary's best-epoch line and table: every figure of the right epoch, in the right column, formatted as
    the header says (mutation audit: the best line's logloss of the last epoch, the DeLong precision without its
    2√2, the rows of another epoch, train loss and logloss swapped, samples/s without its thousands separator, seconds
    without their decimal all passed: every test row had the same 0.5 losses and 1.0 s)."""
    rows = _figures_rows()
    (tmp_path / "summary.json").write_text(json.dumps({"best_valid_auc": 0.74}))  # the run ended
    text = markdown_summary(tmp_path, rows)
    assert "Best validation AUC **0.7400** ± 0.0125 (logloss 0.4700) at epoch 2 of 3.\n" in text
    assert ("± is the AUC's standard error over the 5,000 validation rows (DeLong). Two independent AUCs of this "
            "precision would need to differ by about 0.0354 to be told apart") in text  # 2·√2·0.0125
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| epoch")]
    assert table == ["| 1 | 0.6100 | 0.7000 | 0.5200 | 0.001 | 12,346 | 12.3 |",
                     "| 2 | 0.5500 | 0.7400 | 0.4700 | 0.001 | 23,456 | 11.0 |",
                     "| 3 | 0.5000 | 0.7300 | 0.4900 | 0.0001 | - | 10.0 |"]
    assert "| epoch | train loss | valid AUC | valid logloss | lr | samples/s | seconds |" in text


def test_a_run_without_a_finite_auc_shows_its_first_epoch_and_blank_lines_are_skipped(tmp_path):
    """best_epoch's fallback is the first row (as its docstring and training's state say), not any row; a blank line
    in metrics.jsonl (a hand-edited file, an editor's trailing newline) is no record."""
    assert best_epoch([epoch(1, math.nan), epoch(2, math.nan), epoch(3, math.nan)])["epoch"] == 1
    text = json.dumps(epoch(1, 0.6)) + "\n\n   \n" + json.dumps(epoch(2, 0.7)) + "\n\n"
    (tmp_path / "metrics.jsonl").write_text(text)
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]


def test_the_curves_draw_each_panels_own_figure_and_mark_the_best_epoch():
    """The PNG's data (mutation audit: every panel drawing the AUC, the titles swapped, the best-epoch line or the
    several runs' stars at the last epoch all passed; only the x ticks were tested)."""
    import matplotlib.pyplot as plt

    from mmctr_ray.report import curves_figure

    rows = _figures_rows()
    fig = curves_figure(rows)
    try:
        assert [ax.get_title() for ax in fig.axes] == ["validation AUC", "validation logloss", "training loss"]
        for ax, key in zip(fig.axes, ("valid_auc", "valid_logloss", "train_loss")):
            assert list(ax.lines[0].get_xdata()) == [1, 2, 3]
            assert list(ax.lines[0].get_ydata()) == [r[key] for r in rows], key
        assert list(fig.axes[0].lines[-1].get_xdata()) == [2, 2]  # the dashed line at the best epoch, not the last
    finally:
        plt.close(fig)
    other = [{**r, "valid_auc": auc} for r, auc in zip(rows, (0.75, 0.71, 0.72))]
    fig = curves_figure({"a": rows, "b": other})
    try:
        stars = [(list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].lines
                 if line.get_marker() == "*"]
        assert stars == [([2], [0.74]), ([1], [0.75])]  # each run's best epoch, not its last
        assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a", "b"]
    finally:
        plt.close(fig)


def test_report_of_several_runs_tables_each_runs_best_epochs_se_and_logloss(tmp_path):
    """The comparison's ± and logloss columns are the best epoch's (mutation audit: "–" for every ±, or the last
    epoch's logloss, passed: the several-runs test had no standard error and one logloss)."""
    from mmctr_ray.report import write_runs_report

    runs = []
    for name, rows in (("a", _figures_rows()), ("b", [{**epoch(1, 0.71), "valid_auc_se": math.nan}])):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows).replace("NaN", "null"))
        runs.append(str(run))
    text = write_runs_report(runs, tmp_path / "cmp")["summary"].read_text()
    assert f"| {runs[0]} | ? | 2 | 0.7400 | 0.0125 | 0.4700 | 3 | still training, or stopped before its end |" in text
    assert f"| {runs[1]} | ? | 1 | 0.7100 | – | 0.5000 | 1 | still training, or stopped before its end |" in text


def test_a_report_whose_curves_cannot_be_written_leaves_no_new_summary(tmp_path, monkeypatch):
    """write_report writes the summary, which links the curves, last: a failure to write curves.png (a full disk,
    storage out of reach) leaves no summary.md (mutation audit: the two writes swapped passed; the earlier test fails
    the drawing, before either write)."""
    from mmctr_ray import report, storage

    (tmp_path / "metrics.jsonl").write_text(json.dumps(epoch(1, 0.7)) + "\n")

    write_bytes = storage.write_bytes

    def full(location, data):  # curves.png cannot be written; summary.md (write_text, through write_bytes) can
        if str(location).endswith(".png"):
            raise OSError(28, "No space left on device")
        write_bytes(location, data)

    monkeypatch.setattr(storage, "write_bytes", full)
    with pytest.raises(OSError, match="No space left on device"):
        report.write_report(tmp_path)
    assert not (tmp_path / "report" / "summary.md").exists()


def test_a_run_whose_metrics_hold_no_epoch_is_one_line_alone_or_beside_another(tmp_path, capsys):
    """An empty metrics.jsonl (or one of blank lines) was an IndexError traceback out of best_epoch without the
    check (mutation audit: removing it passed)."""
    empty, other = tmp_path / "empty", tmp_path / "other"
    for run, text in ((empty, "\n"), (other, json.dumps(epoch(1, 0.7)) + "\n")):
        run.mkdir()
        (run / "metrics.jsonl").write_text(text)
    for argv in (["report", str(empty)], ["report", str(other), str(empty), "--out", str(tmp_path / "cmp")]):
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == (f"mmctr report: error: {empty / 'metrics.jsonl'}: no epoch "
                                                   f"recorded yet")
    assert not (empty / "report").exists() and not (tmp_path / "cmp").exists()
