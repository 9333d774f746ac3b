"""`mmctr compare`: runs scored on the same rows, each AUC with its standard error, and the paired DeLong test of
each run against the first.

A valid AUC measured on a few thousand rows moves by about half a point from noise alone (its standard error on
the default synthetic data's 5,000 validation rows is ~0.006), which is the size of most differences between
configs. Two runs scored on the same rows err alike, so the difference of their AUCs is known far better than
either AUC: the paired test (:func:`mmctr_ray.metrics.compare_aucs`) says which differences the split can tell
between these checkpoints. It says nothing of training noise: the same config trained with another seed (or
another row order) scores differently, which only runs of several seeds measure.
Scoring runs in this process, without Ray (the split is read once; each run's model scores it in batches).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mmctr_ray import storage
from mmctr_ray.checkpoint import PREFIX, run_or_checkpoint
from mmctr_ray.config import ExperimentConfig, effective_differences, value_text
from mmctr_ray.errors import ConfigError, DataError
from mmctr_ray.metrics import auc_covariance, compare_groups, every_group_pair, every_pair, paired_rows
from mmctr_ray.report import describe_run
from mmctr_ray.schema import NO_PARTS, Layout, parquet_parts

log = logging.getLogger(__name__)


def _checkpoint(target: str) -> storage.Location:
    """A run's best checkpoint, or ``target`` itself when it is a checkpoint folder (``RUN/checkpoint_epoch_003``)."""
    location = storage.normalize(target)  # a checkpoint folder, whole or cut short, is run_or_checkpoint's to judge
    if not (storage.basename(location).startswith(PREFIX) or storage.is_file(storage.join(location, "config.yaml"))):
        raise DataError(f"{target}: not a run of `mmctr train` (no config.yaml) nor one of its checkpoint folders")
    return run_or_checkpoint(target)


def split_labels(data_dir: str | Path, split: str) -> tuple[Path, Any]:
    """The split's path (a file or a folder of part files) and its labels in row order (the test split's are the
    hidden ones synthetic data keeps, or its own where `mmctr convert` wrote it)."""
    from mmctr_ray.preflight import HIDDEN_LABELS, check_labels, check_split, label_file

    layout = Layout(data_dir)
    path = layout.split(split)
    truth = layout.hidden_test_labels if split == "test" and not layout.labelled_test else path
    files = parquet_parts(truth)
    if truth.is_dir() and not files:
        raise DataError(f"{truth}: {NO_PARTS}")
    if not files:
        raise DataError(f"{truth}: missing file: {split} labels are needed to compare runs"
                        + (" (the real test split has none; compare on valid)" if truth != path else ""))
    check_split(data_dir, split)  # what train and predict check first: ids in range, widths, 0/1 labels (a null or
    if truth != path:  # 0.5 label counted as a click in the AUCs), here before any checkpoint is scored
        for f in files:
            check_labels(label_file(f), f, HIDDEN_LABELS)
    labels = np.concatenate([pq.read_table(f, columns=["label"]).column("label").to_numpy() for f in files])
    parts = parquet_parts(path) if truth != path else []
    rows = sum(pq.read_metadata(f).num_rows for f in parts)
    if parts and rows != len(labels):  # a test split cut or grown since `mmctr synth` wrote it: not its rows' labels
        raise DataError(f"{truth}: {len(labels):,} labels for a test split of {rows:,} rows ({path}); the split is "
                        f"not the one `mmctr synth` wrote: compare on valid")
    positives = int((labels == 1).sum())
    if positives in (0, len(labels)):  # before any checkpoint is loaded and scored
        raise DataError(f"{truth}: the {split} labels hold one class only ({positives:,} clicks of {len(labels):,} "
                        f"rows); an AUC needs clicks and non-clicks")
    return path, labels


def config_differences(configs: list[ExperimentConfig]) -> list[dict[str, dict[str, Any]]]:
    """Per config (a checkpoint's), the keys whose values differ from the first one's, where both take effect
    (:func:`~mmctr_ray.config.effective_differences`): ``{"model.batch_norm": {"value": False, "first": True}}``;
    the first gets ``{}``. The one-line description of a run leaves most keys out (activations, batch norm,
    precision, the schedule's settings), so ablations that differ only there read alike without it."""
    return [{key: {"value": mine, "first": first}
             for key, (first, mine) in effective_differences(configs[0], config).items()} for config in configs]


def compare_runs(targets: list[str], data_dir: str | Path, split: str = "valid", device: str = "cpu",
                 progress: Any = None, groups: list[tuple[str, list[str]]] = (), pairs: str = "first"
                 ) -> dict[str, Any]:
    """Score ``split`` of ``data_dir`` with each target's checkpoint on ``device``; return the split, its rows and
    positives, and per target its checkpoint, epoch, :func:`compare_aucs`'s row (the first target is the
    reference) and the config keys it sets unlike the first (:func:`config_differences`). Each run's
    ``train.precision`` decides on ``device``, as in its validation there (``auto``: fp32 on the CPU, bf16 on
    CUDA).

    ``groups``: ``(name, runs)`` of runs of one config trained with other seeds (scored after ``targets``, each
    run once): the result's ``groups`` holds :func:`~mmctr_ray.metrics.compare_groups`' row of each, the first
    group the reference; a group whose runs differ in more than ``train.seed`` is said in a warning.

    ``pairs="all"``: also every pair of the ``targets`` (``pairs``: :func:`~mmctr_ray.metrics.every_pair`'s rows,
    named by run) and of the groups (``group_pairs``), where there are two or more, each p adjusted over its
    table's pairs (Holm)."""
    from mmctr_ray.predict import check_finite, load_model, score_parquet

    check_groups(groups)
    given = list(dict.fromkeys(targets))  # a run given twice is scored once
    check_pairs(pairs, given, len(groups))
    named = [run for _, runs in groups for run in runs]
    targets = list(dict.fromkeys([*given, *named]))
    if len(targets) < 1:
        raise DataError("compare: no run given")
    path, labels = split_labels(data_dir, split)
    checkpoints = [_checkpoint(target) for target in targets]  # every target checked before any is scored
    scores, described, configs = [], [], []
    for checkpoint in checkpoints:
        model = load_model(checkpoint, data_dir, device)
        cfg = model.experiment_cfg  # rows a step as in the run's validation; AUC ranks the logits
        logits = score_parquet(model, path, cfg.data.max_len, batch_rows=cfg.train.eval_batch_size, logits=True)
        if len(logits) != len(labels):
            raise DataError(f"{path}: {len(logits)} rows scored but {len(labels)} labels")
        check_finite(logits, checkpoint, path)
        scores.append(logits)
        described.append(describe_run(cfg, model.item_source))
        configs.append(cfg)
        if progress is not None:
            progress(f"scored {split} with {checkpoint}")
    aucs, cov = auc_covariance(labels, scores)
    rows = paired_rows(aucs, cov)
    runs = []
    for target, checkpoint, trained, row, differs in zip(targets, checkpoints, described, rows,
                                                         config_differences(configs)):
        state = json.loads(storage.read_text(storage.join(checkpoint, "state.json")))
        runs.append({"run": target, "checkpoint": str(checkpoint), "epoch": state["epoch"], "trained": trained, **row,
                     "config_vs_first": differs})
    result = {"data": str(data_dir), "split": split, "rows": int(len(labels)), "positives": int(labels.sum()),
              "runs": runs}
    if groups:
        index = {target: i for i, target in enumerate(targets)}
        members = [[index[run] for run in runs] for _, runs in groups]
        for (name, runs), at in zip(groups, members):
            _warn_mixed_group(name, runs, [configs[i] for i in at])
        result["groups"] = [{"group": name, "members": runs, **row} for (name, runs), row in
                            zip(groups, compare_groups(aucs, cov, members))]
    if pairs == "all" and len(given) >= 2:  # the RUNs given, not the groups' runs: those pair as groups
        result["pairs"] = named_pairs(every_pair(aucs, cov, len(given)), given, "run")
    if pairs == "all" and len(groups) >= 2:
        result["group_pairs"] = named_pairs(every_group_pair(aucs, cov, members), [n for n, _ in groups], "group")
    return result


def named_pairs(rows: list[dict[str, Any]], names: list[str], what: str) -> list[dict[str, Any]]:
    """Rows of :func:`~mmctr_ray.metrics.every_pair` (indices ``i`` before ``j``) named: ``{what: names[j],
    "minus": names[i], ...}`` (the difference is j's minus i's)."""
    out = []
    for row in rows:
        row = dict(row)
        i, j = row.pop("i"), row.pop("j")
        out.append({what: names[j], "minus": names[i], **row})
    return out


PAIRS = ("first", "all")


def check_pairs(pairs: str, runs: list[str], groups: int) -> None:
    """``--pairs all`` needs two runs (the RUNs given, each counted once) or two groups to pair."""
    if pairs not in PAIRS:
        raise ConfigError(f"compare: --pairs {pairs}: expected one of {', '.join(PAIRS)}")
    count = len(set(runs))
    if pairs == "all" and count < 2 and groups < 2:
        raise ConfigError(f"compare --pairs all: {count} run{'s' * (count != 1)} and {groups} "
                          f"group{'s' * (groups != 1)} given; it needs 2 or more runs (RUN RUN ...) or 2 or more "
                          f"groups (--group ...) to pair")


def check_groups(groups: list[tuple[str, list[str]]]) -> None:
    """A group needs 2+ runs (its spread over seeds), a name of its own, and a run belongs to one group."""
    seen: dict[str, str] = {}
    for name, runs in groups:
        if "/" in name or (Path(name) / "config.yaml").is_file():  # `--group RUNS/a RUNS/b` named the group RUNS/a
            raise ConfigError(f"compare: --group {name} ...: the first word after --group is the group's name, and "
                              f"{name} is a path to a run; write --group NAME RUN RUN ...")
        if len(runs) < 2:
            raise ConfigError(f"compare: --group {name} names {len(runs)} run; a group is one config trained with "
                              f"several seeds, 2 or more runs (its spread over seeds is what its test measures)")
        for run in runs:
            if seen.setdefault(run, name) != name or runs.count(run) > 1:
                raise ConfigError(f"compare: {run} is in --group {seen[run]} and --group {name}"
                                  if seen[run] != name else f"compare: --group {name} names {run} twice")
    names = [name for name, _ in groups]
    if len(set(names)) != len(names):
        raise ConfigError(f"compare: two groups are named {next(n for n in names if names.count(n) > 1)}")


def _warn_mixed_group(name: str, runs: list[str], configs: list[ExperimentConfig]) -> None:
    """Warn when a group's runs differ in a config key other than ``train.seed`` (its spread is not only the
    seeds'), or two share a seed (they repeat each other, bit for bit where deterministic: no seeds' spread)."""
    for run, cfg in zip(runs[1:], configs[1:]):
        other = sorted(set(effective_differences(configs[0], cfg)) - {"train.seed"})
        if other:
            log.warning("--group %s: %s differs from %s in %s, not in train.seed alone: the group's spread is not "
                        "only its seeds'", name, run, runs[0], ", ".join(other))
    seeds: dict[int, str] = {}
    for run, cfg in zip(runs, configs):
        if seeds.setdefault(cfg.train.seed, run) != run:
            log.warning("--group %s: %s and %s were both trained with train.seed %d: they measure no spread over "
                        "seeds between them (a group is one config trained with other seeds)", name,
                        seeds[cfg.train.seed], run, cfg.train.seed)


def _pair_lines(result: dict[str, Any]) -> list[str]:
    """The tables of ``--pairs all``: every pair of runs, then of groups, the later one's AUC minus the earlier's."""
    lines = []
    for rows, what, test, rows_se in ((result.get("pairs"), "run", "AUC minus the other's, ± and p from the paired "
                                       "test", False),
                                      (result.get("group_pairs"), "group", "mean AUC minus the other's, ± and p from "
                                       "Welch's test over their runs' AUCs", True)):
        if not rows:
            continue
        lines += ["", f"Every pair of {what}s ({len(rows)}): the {what}'s {test}; p Holm is p adjusted for testing "
                  f"{_tested(rows)} together (read it against the level you would use for one)"
                  + ("; ± rows is DeLong's for the difference." if rows_se else "."), "",
                  f"| {what} | minus | difference | ± | p | p Holm |" + (" ± rows |" if rows_se else ""),
                  "|---|---|---:|---:|---:|---:|" + ("---:|" if rows_se else "")]
        lines += [f"| {r[what]} | {r['minus']} | {_figure(r['diff'], '+.4f')} | {_figure(r['diff_se'])} | "
                  f"{_p_text(r['p'])} | {_p_text(r['p_holm'])} |" + (f" {_figure(r['diff_se_rows'])} |" if rows_se
                                                                      else "") for r in rows]
    return lines


def _tested(rows: list[dict[str, Any]]) -> str:
    """How many pairs Holm's adjustment counted: those with a p (runs of no spread have none)."""
    defined = sum(not math.isnan(r["p"]) for r in rows)
    return f"the {defined} pair{'s' * (defined != 1)}" + (f" with a p (of {len(rows)})" if defined < len(rows) else "")


def _p_text(p: float) -> str:
    """A p-value for a table; "–" where it is undefined (runs with no spread, a class of one row)."""
    return _figure(p, ".2g")


def _figure(value: float, spec: str = ".4f") -> str:
    """A figure for a table; "–" where it is undefined (a standard error of a class of one row, a test of runs with
    no spread), as a p-value's, where the tables printed "nan"."""
    return "–" if math.isnan(value) else format(value, spec)


def is_comparison(path: Path) -> bool:
    """Whether ``path`` holds what ``mmctr compare --json`` writes (:func:`compare_runs`' result)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(found, dict) and {"data", "split", "rows", "positives", "runs"} <= found.keys()


def markdown(result: dict[str, Any]) -> str:
    """The comparison as a markdown table, with a line on how to read it."""
    lines = [f"{result['split']} split of {result['data']}: {result['rows']:,} rows, {result['positives']:,} "
             f"positives. ± is the standard error (DeLong); the difference to the first run and its p-value come "
             f"from the paired test on the same rows. They hold these checkpoints fixed: another train.seed of the "
             f"same config moves its AUC too, by an amount only runs of a few seeds measure.", "",
             "| run | epoch | AUC | ± | vs first | ± | p |", "|---|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(result["runs"]):
        versus = ["–", "–", "–"] if i == 0 else [_figure(r["diff"], "+.4f"), _figure(r["diff_se"]), _p_text(r["p"])]
        lines.append(f"| {r['run']} | {r['epoch']} | {r['auc']:.4f} | {_figure(r['se'])} | " + " | ".join(versus)
                     + " |")
    if result.get("groups"):
        lines += ["", "Groups (one config, several seeds): mean and sd of their AUCs. The difference to the first "
                  "group, ± and p come from Welch's test over the runs' AUCs (training noise, these rows held fixed); "
                  "± rows is DeLong's for that difference of means (the rows' noise, these models held fixed).", "",
                  "| group | runs | mean AUC | sd | vs first | ± | p | ± rows |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for i, g in enumerate(result["groups"]):
            versus = ["–"] * 4 if i == 0 else [_figure(g["diff"], "+.4f"), _figure(g["diff_se"]), _p_text(g["p"]),
                                               _figure(g["diff_se_rows"])]
            lines.append(f"| {g['group']} | {g['runs']} | {g['mean']:.4f} | {_figure(g['sd'])} | "
                         + " | ".join(versus) + " |")
    lines += _pair_lines(result)
    trained = [f"- {r['run']}: {r['trained']}" for r in result["runs"] if r.get("trained")]
    lines += ["", "What each run trained:", *trained] if trained else []
    later = [r for r in result["runs"][1:] if "config_vs_first" in r]
    if later:
        lines += ["", "Config keys unlike the first run's (its value in brackets):"]
        lines += [f"- {r['run']}: " + (", ".join(f"{key} {value_text(d['value'])} ({value_text(d['first'])})"
                                                  for key, d in r["config_vs_first"].items()) or "the same config")
                  for r in later]
    return "\n".join(lines) + "\n"

