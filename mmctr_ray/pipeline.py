"""Where `mmctr pipeline` (and `mmctr demo`) put things: OUT, a local work folder, what each stage publishes.

OUT is a local path or a storage URI (:mod:`mmctr_ray.storage`). The run goes straight to ``OUT/run`` (Ray Train
writes URIs itself). The stages whose code reads and writes local files (synth, a downloaded ``--data``,
features, embed, fuse, predict) work in a local folder: OUT itself when OUT is local; else ``--work``, and each
stage's outputs are copied up to OUT when the stage ends. ``--work`` must outlive the job (on a multi-node
cluster: a path every node mounts): the training workers read the data and the fused table from it, and the
run records the fused table by its path there, for ``predict`` and ``--resume``. The data is an input and is
never copied up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from mmctr_ray import storage
from mmctr_ray.config import ExperimentConfig, differences, load_config
from mmctr_ray.errors import ConfigError, DataError, OutputExistsError
from mmctr_ray.locking import check_folder_kind, entries

log = logging.getLogger(__name__)

# what each stage leaves in the work folder and OUT receives (names relative to both)
PUBLISHED = {
    "features": ["features"],
    "embed": ["item_raw_emb.parquet", "item_raw_emb.embed.json"],
    "fuse": ["item_emb.parquet", "item_emb.pca.npz", "item_emb.fusion.json"],
    "predict": ["submission.zip"],
}


def embeddings_kept(work: Path) -> bool:
    """Whether an earlier attempt's embeddings are whole, the table and its record: `mmctr embed` writes the record
    after the table, so a kill between the two left a table whose models no check could name (a --resume with
    another --text-model kept it without a word). Without the record, the step runs again and reassembles the
    table from the shards, which it keeps until the record is written."""
    return all((work / name).is_file() for name in PUBLISHED["embed"])


def check_out(out: storage.Location, resume: bool, overwrite: bool) -> None:
    """A non-empty OUT is used only when asked: ``resume`` continues it, ``overwrite`` replaces its outputs."""
    if resume or overwrite or not storage.exists(out):
        return
    if entries(out):  # OUT/run's lock file is in OUT
        raise OutputExistsError(f"{out}: not empty; pass --resume to continue the pipeline there or --overwrite "
                                f"to replace its outputs")


WORK_OWNER = "pipeline.out"  # in a URI OUT's --work: that OUT, whose run refers to the fused table there


def check_work(out: storage.Location, work: Path, resume: bool, overwrite: bool) -> None:
    """With a URI OUT, ``--work`` holds what the run refers to (the data, the fused table): another pipeline's
    outputs there are used only when asked, as OUT's are (a second OUT with the same --work silently replaced the
    fused table the first run had trained on); those of a pipeline of another OUT, not at all: its --overwrite,
    which the refusal suggested, broke that OUT's run ("rewritten since ... was trained on it")."""
    if not storage.is_uri(out):
        return
    owner = (work / WORK_OWNER).read_text().strip() if (work / WORK_OWNER).is_file() else None
    if owner is not None and _same_out(owner) != _same_out(out) and storage.is_file(
            storage.join(owner, "run", "config.yaml")):  # a claim whose OUT has no run (it failed early) passes on
        raise OutputExistsError(f"{work}: --work of the pipeline whose OUT is {owner} ({WORK_OWNER} there; its run "
                                f"refers to the fused table here, which this one would replace); pass another --work")
    if resume or overwrite:
        return
    # what the steps write over without asking (the data and the embeddings refuse by themselves): the fused table,
    # which an earlier pipeline's run refers to, the features summary and the submission
    names = [*PUBLISHED["fuse"], *PUBLISHED["features"], *PUBLISHED["predict"]]
    kept = [name for name in names if (work / name).exists()]
    if kept:
        raise OutputExistsError(f"{work}: --work holds {', '.join(kept)} of an earlier pipeline (whose run refers to "
                                f"its fused table); pass --resume to continue it, --overwrite to replace them, or "
                                f"another --work")


def _same_out(out: storage.Location) -> str:
    """One OUT however it is spelt (a trailing slash, a URI's query: how to reach it, not what it is)."""
    return str(storage.normalize(str(out))).split("?", 1)[0]


def claim_work(out: storage.Location, work: Path) -> None:
    """Record in a URI OUT's ``--work`` that OUT's run refers to what it holds (:func:`check_work`)."""
    if storage.is_uri(out):
        work.mkdir(parents=True, exist_ok=True)
        storage.write_text(work / WORK_OWNER, f"{out}\n")


def same_data(saved: Path, asked: ExperimentConfig) -> bool:
    """Whether the config a step saved (``features/config.yaml``) has the data section ``asked`` has."""
    return saved.is_file() and load_config(saved).data == asked.data


def train_changes(run: storage.Location, asked: ExperimentConfig) -> list[str]:
    """``train.KEY=VALUE`` for each training setting ``asked`` that the run's config.yaml does not hold (logged):
    what a continued run takes from the command, as `mmctr train --resume --set train.KEY=VALUE` would."""
    from mmctr_ray.train_driver import resume_config

    kept = dataclasses.asdict(resume_config(str(run)).train)
    changes = {k: v for k, v in dataclasses.asdict(asked.train).items() if kept[k] != v}
    for key, value in changes.items():
        log.info("--resume: train.%s %s, the run had %s", key, value, kept[key])
    return [f"train.{key}={json.dumps(value)}" for key, value in changes.items()]


def check_replaceable(out: storage.Location, work: Path, synthesizes: bool) -> None:
    """``--overwrite`` replaces a pipeline's outputs only, refused before anything is removed: ``OUT/run`` and
    ``OUT/features`` must be what `mmctr train` and `mmctr features` write (their config.yaml), and, when the
    command synthesizes its data (no ``--data``), ``OUT/data`` what `mmctr synth` wrote (its synth.json). They were
    removed or replaced whatever they held: a user's real MicroLens files kept in ``OUT/data`` became synthetic."""
    for stage, name in (("train", "run"), ("features", PUBLISHED["features"][0])):
        for location in {storage.join(out, name), work / name}:
            check_folder_kind(stage, location, hint="--overwrite replaces a pipeline's outputs only: move it away, "
                                                    "or pass another --out")
    from mmctr_ray.schema import Layout

    data = work / "data"  # a pipeline's copy of a --data URI (its DATA_SOURCE record) is the pipeline's too
    if synthesizes and data.is_dir() and entries(data) and not Layout(data).synth_manifest.is_file() and not (
            work / DATA_SOURCE).is_file():
        raise OutputExistsError(f"{data}: data `mmctr synth` did not write (no synth.json), which --overwrite would "
                                f"replace with synthetic data: pass --data {data} to use it, or another --out")


def drop_replaced(out: storage.Location, work: Path, embed: bool = True) -> None:
    """On ``--overwrite``, before any step, what of the earlier attempt no step of this one may take as its own:
    its run (``OUT/run``) and features summary, which a ``--resume`` of this attempt killed before it trained
    continued as they were (the run of the replaced data: ``--train-rows`` changes no item, so nothing refused
    it), and its submission, which stayed beside a new run that failed before predict; without ``embed``, its
    embeddings, which no step rewrites. The data, embeddings and fused table stay for their steps, which check
    and rewrite them (embed's shards of the same settings are reused)."""
    names = [*PUBLISHED["predict"], *([] if embed else PUBLISHED["embed"])]
    for location in {loc for name in names for loc in (storage.join(out, name), work / name)}:
        if storage.is_file(location):
            storage.remove_file(location)
            log.info("%s: removed (of the attempt --overwrite replaces)", location)
    for name in ("run", *PUBLISHED["features"]):
        for location in {storage.join(out, name), work / name}:
            if storage.exists(location):
                storage.remove_dir(location)
                log.info("%s: removed (of the attempt --overwrite replaces)", location)


def work_dir(out: storage.Location, work: Path | None) -> Path:
    """The local folder the file-based stages write: OUT when local, else ``work`` (required then)."""
    if not storage.is_uri(out):
        folder = Path(out)
    elif work is None:
        raise ConfigError(f"{out}: OUT is a URI, so pass --work DIR: a local folder (on a multi-node cluster one "
                          f"every node mounts) for the data, the fused table the run refers to, and the other "
                          f"file-based outputs before they are copied to OUT")
    else:
        folder = Path(work).resolve()
        local = storage.local_path(out)
        if local is not None and local.resolve() == folder:  # the lock it takes is OUT's, held: "in use", of itself
            raise ConfigError(f"{work}: --work is OUT's own folder ({out}); pass --out {folder} (a local OUT, which "
                              f"the stages write into), or another --work")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a shared mount still the root's, a path below a file: a traceback before
        flag = "--work" if storage.is_uri(out) else "--out"
        raise ConfigError(f"{folder}: cannot create the folder ({err.strerror or err}); {flag} must be a folder this "
                          f"user can write") from None
    return folder


def check_resume(out: storage.Location, work: Path, cfg: ExperimentConfig, embed: bool,
                 synth: dict[str, Any] | None = None, models: dict[str, str] | None = None,
                 data: str | None = None) -> None:
    """On ``--resume``, what OUT keeps must be what this command would make, since it is reused as it is: the
    synthesized data (``synth``: the spec this command's size flags give, without ``--data``), the embeddings
    (``models``: the text and image models ``--embed`` would load), the fused table (its fusion and source, and the
    data it was fused for: a local ``data``; a URI's copy is checked by :func:`check_data_copy`) and the
    run (continued with its own config.yaml; only ``train.*`` may change, as for ``mmctr train --resume``). A
    difference is a one-line error, before Ray starts, instead of being ignored (the data, the embeddings, the
    run) or mixed with the kept table (a new run on an old table)."""
    from mmctr_ray.fuse import read_fusion_summary
    from mmctr_ray.fusion import PARTS
    from mmctr_ray.schema import Layout
    from mmctr_ray.train_driver import resume_config

    run = storage.join(out, "run")
    manifest, source = Layout(work / "data").synth_manifest, work / DATA_SOURCE
    if synth is not None and source.is_file():  # WORK/data is the copy of an earlier attempt's --data URI (whose
        # synth.json, if it has one, is not this command's to compare): the synth step would refuse it after Ray
        raise ConfigError(f"{out}: the earlier attempt ran on --data {source.read_text().strip()}; pass it again with "
                          f"--resume (without --data the pipeline synthesizes a data set)")
    if data and storage.is_uri(data) and manifest.is_file() and not source.is_file():
        raise ConfigError(f"{work / 'data'}: synthesized by the earlier attempt (it ran without --data), not a copy "
                          f"of {data}; resume without --data, or pass --overwrite to download {data} instead")
    if synth is not None and manifest.is_file():  # --preset 1m after an interrupted --preset small trained on small
        kept = json.loads(manifest.read_text())["spec"]
        diff = {k: (kept.get(k), v) for k, v in synth.items() if kept.get(k) != v}
        if diff:
            key, (was, now) = next(iter(diff.items()))
            raise ConfigError(f"{work / 'data'}: synthesized with {key}={was!r}, this command asks {now!r}; --resume "
                              f"reuses it: pass the size flags (--preset, --train-rows, --seed, ...) it started with, "
                              f"or --overwrite to start again")
    embedded = work / "item_raw_emb.embed.json"
    if models is not None and embedded.is_file():
        kept = json.loads(embedded.read_text())
        for key, flag in (("text_model", "--text-model"), ("image_model", "--image-model")):
            if kept.get(key) != models[key]:
                raise ConfigError(f"{embedded}: embedded with {flag} {kept.get(key)}, this command asks {models[key]}; "
                                  f"--resume reuses the embeddings: pass the {flag} it started with, or --overwrite "
                                  f"to start again")
    again = "pass the --config and --embed it started with, or --overwrite to start again"
    fused = work / "item_emb.parquet"
    summary = read_fusion_summary(fused) if fused.is_file() else None
    used = (summary or {}).get("data")
    if synth is not None and not manifest.is_file() and used and Path(used) != (work / "data").resolve():
        # without --data the pipeline synthesizes data: here it would make a new data set beside the old one's run
        raise ConfigError(f"{out}: the earlier attempt ran on --data {used}; pass it again with --resume (without "
                          f"--data the pipeline synthesizes a data set)")
    # where this command's data is: a URI's copy is WORK/data, whose source check_data_copy compares
    here = ((work / "data").resolve() if storage.is_uri(data) else Path(data).resolve()) if data else None
    if here is not None and used and Path(used) != here:  # a local --data X, then another X or a URI
        copied = source.is_file() and Path(used) == (work / "data").resolve()  # the earlier --data was a URI
        was = source.read_text().strip() if copied else used
        raise ConfigError(f"{fused}: kept from the earlier attempt on --data {was}, this command asks {data}; "
                          f"--resume reuses it and the run: pass the --data it started with, or --overwrite to start "
                          f"again")
    if summary is not None:
        fields = [field for _, _, field in PARTS.get(cfg.fusion.strategy, ())]  # the widths the strategy uses
        for key in ("strategy", *fields):
            if summary.get(key) != getattr(cfg.fusion, key):
                raise ConfigError(f"{fused}: kept from the earlier attempt with fusion.{key}={summary.get(key)!r}, "
                                  f"this command asks {getattr(cfg.fusion, key)!r}; --resume reuses it: {again}")
        embedded = Path(str(summary.get("source", ""))).name == "item_raw_emb.parquet"
        if cfg.fusion.strategy != "given" and embedded != embed:
            raise ConfigError(f"{fused}: kept from the earlier attempt, fused from "
                              f"{'embedded' if embedded else 'the shipped'} vectors, this command asks "
                              f"{'--embed' if embed else 'the shipped ones'}; --resume reuses it: {again}")
    if storage.is_file(storage.join(run, "config.yaml")):  # train --resume takes train.* changes; nothing else
        kept, want = resume_config(run).to_dict(), cfg.to_dict()
        for c in (kept, want):
            c["data"].pop("item_vector")  # the run's is the fused table's path
            c.pop("train")
        diff = differences(kept, want)
        if diff:
            key, (was, now) = next(iter(diff.items()))
            raise ConfigError(f"{storage.join(run, 'config.yaml')}: {key} is {was!r}, this command asks {now!r}; "
                              f"--resume continues the run with its own config: {again}")


def publish(stage: str, work: Path, out: storage.Location, missing_only: bool = False) -> None:
    """Copy ``stage``'s outputs from the work folder up to a URI OUT (nothing to do when OUT is local); with
    ``missing_only``, those OUT lacks (a file of another size counts as lacking): a stage that a ``--resume``
    skips, whose upload a kill may have cut, is published again."""
    if not storage.is_uri(out):
        return
    def whole(local: Path, there: dict[str, int]) -> bool:  # OUT holds it at its size (a folder: every file)
        files = [p for p in local.iterdir() if p.is_file()] if local.is_dir() else [local]
        return all(there.get(p.name) == p.stat().st_size for p in files)

    sizes = storage.file_sizes(out) if missing_only else {}
    for name in PUBLISHED.get(stage, []):
        local = work / name
        if not local.exists():  # the stage did not write it this time (a `given` fuse writes no PCA): an earlier
            there = storage.join(out, name)  # attempt's in OUT would describe another table
            if storage.is_file(there):
                storage.remove_file(there)
                log.info("%s: removed (%s wrote none this time)", there, stage)
            continue
        if missing_only and whole(local, storage.file_sizes(storage.join(out, name)) if local.is_dir() else sizes):
            continue  # (a plain publish lists nothing on OUT)
        if local.is_dir():
            storage.upload_dir(local, storage.join(out, name))
        else:
            storage.upload_file(local, storage.join(out, name))  # streamed: not the whole file in memory


DATA_SOURCE = "data.source"  # beside WORK/data: the URI it is a whole copy of


def check_data_copy(data: str | None, work: Path, resume: bool, overwrite: bool) -> None:
    """Before Ray starts: the local copy of a ``--data`` URI (``WORK/data``) that holds files is reused on ``resume``
    only when it is a whole copy of this URI, replaced on ``overwrite``, and refused otherwise."""
    local = work / "data"
    if not data or not storage.is_uri(data) or overwrite or not (local.is_dir() and any(local.iterdir())):
        return
    if not resume:
        raise OutputExistsError(f"{local}: not empty; pass --resume to use it as the copy of {data} or --overwrite "
                                f"to download it again")
    marker = work / DATA_SOURCE
    recorded = marker.read_text().strip() if marker.is_file() else None
    if recorded is not None and storage.normalize(recorded) != storage.normalize(data):  # s3://b/D/ is s3://b/D
        raise OutputExistsError(f"{local}: the copy of {recorded}, not of {data}; pass the --data it started with, "
                                f"or --overwrite to download {data} instead")


def local_data(data: str, work: Path, resume: bool, overwrite: bool = False) -> Path:
    """``--data`` as a local folder: itself, or a URI downloaded into ``work/data`` (see :func:`check_data_copy`).

    The download goes to ``work/data.partial`` and takes its name only when every file arrived, so a cut download
    is never reused as if it were the data set: ``--resume`` downloads it again. ``work/data.source`` records the
    URI of the copy."""
    if not storage.is_uri(data):
        return Path(data).resolve()
    check_data_copy(data, work, resume, overwrite)
    local, partial, marker = work / "data", work / "data.partial", work / DATA_SOURCE
    if resume and local.is_dir() and any(local.iterdir()):
        if not marker.is_file():
            log.warning("%s: reused as the copy of %s without %s to confirm it (a copy made before it was "
                        "recorded)", local, data, marker)
        log.info("%s: reusing the copy in %s", data, local)
        return local
    if not storage.exists(data):
        raise DataError(f"{data}: data directory not found")
    if partial.exists():  # a cut download
        shutil.rmtree(partial)
    log.info("downloading %s to %s", data, local)
    storage.download_dir(data, partial)
    if not (partial.is_dir() and any(partial.iterdir())):
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"{data}: no files to download (expected the challenge layout under it)")
    if local.exists():  # the copy --overwrite replaces, once the new one is whole
        shutil.rmtree(local)
    marker.write_text(data + "\n")
    partial.rename(local)
    return local
