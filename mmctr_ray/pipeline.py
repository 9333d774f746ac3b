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

import logging
from pathlib import Path

from mmctr_ray import storage
from mmctr_ray.errors import ConfigError, DataError, OutputExistsError

log = logging.getLogger(__name__)

# what each stage leaves in the work folder and OUT receives (names relative to both)
PUBLISHED = {
    "features": ["features"],
    "embed": ["item_raw_emb.parquet", "item_raw_emb.embed.json"],
    "fuse": ["item_emb.parquet", "item_emb.pca.npz", "item_emb.fusion.json"],
    "predict": ["submission.zip"],
}


def check_out(out: storage.Location, resume: bool, overwrite: bool) -> None:
    """A non-empty OUT is used only when asked: ``resume`` continues it, ``overwrite`` replaces its outputs."""
    if not (resume or overwrite) and storage.exists(out) and storage.listdir(out):
        raise OutputExistsError(f"{out}: not empty; pass --resume to continue the pipeline there or --overwrite "
                                f"to replace its outputs")


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
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def publish(stage: str, work: Path, out: storage.Location) -> None:
    """Copy ``stage``'s outputs from the work folder up to a URI OUT (nothing to do when OUT is local)."""
    if not storage.is_uri(out):
        return
    for name in PUBLISHED.get(stage, []):
        local = work / name
        if local.is_dir():
            storage.upload_dir(local, storage.join(out, name))
        elif local.is_file():
            storage.write_bytes(storage.join(out, name), local.read_bytes())


def local_data(data: str, work: Path, resume: bool) -> Path:
    """``--data`` as a local folder: itself, or a URI downloaded into ``work/data`` (kept there on ``resume``)."""
    if not storage.is_uri(data):
        return Path(data).resolve()
    local = work / "data"
    if resume and local.is_dir() and any(local.iterdir()):
        log.info("%s: reusing the copy in %s", data, local)
        return local
    if not storage.exists(data):
        raise DataError(f"{data}: data directory not found")
    log.info("downloading %s to %s", data, local)
    storage.download_dir(data, local)
    return local
