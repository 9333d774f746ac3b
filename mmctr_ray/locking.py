"""One writer per output: a stage holds an exclusive lock on its output while it runs, so a second run pointed
at the same RUN, TUNE or file refuses at once instead of interleaving with the first.

The lock is an OS file lock (``filelock``): it ends with the process that holds it, so a killed run leaves no
stale lock behind. A local output's lock file sits beside it (``.NAME.mmctr.lock``; on a shared filesystem
with POSIX locks it guards every machine that mounts it). A storage URI's lock lives in this machine's cache
(``~/.cache/mmctr/locks``): object stores have no locks, so two machines writing one URI are not stopped. So does
the lock of a local output whose folder this user cannot write beside (``--out /mnt/shared`` with ``/mnt`` the
root's): it then guards this machine only.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import unquote, urlsplit

import filelock

from mmctr_ray import storage
from mmctr_ray.errors import ConfigError, OutputExistsError, first_line


LOCK_SUFFIX = ".mmctr.lock"


def lock_path(target: storage.Location) -> Path:
    """Where the lock file of output ``target`` lives: one file for every spelling of one output (``file:///x``
    and ``/x``, a trailing slash or not, a URI with or without its query, e.g. ``?region=``)."""
    target = storage.normalize(target)
    if storage.is_uri(target) and urlsplit(str(target)).scheme == "file":
        target = unquote(urlsplit(str(target)).path)  # a local folder, as a plain path names it
    if storage.is_uri(target):
        return _cached_lock(str(target).split("?", 1)[0])  # the query: how to reach it, not what it is
    path = Path(target).resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a folder of the path should be, no permission
        raise ConfigError(f"{target}: cannot create the folder it goes in ({first_line(err)})") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):  # OUT itself may be writable where its parent is not
        return _cached_lock(str(path))
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


REPLACED_SUFFIX = ".replaced"  # .NAME.replaced beside RUN: the run a `train --overwrite` replaces, until replaced


def replaced_location(run: storage.Location) -> storage.Location:
    """Where ``train --overwrite`` keeps the run it replaces while the new one has no checkpoint:
    ``.NAME.replaced`` beside RUN (hidden, as RUN's lock file ``.NAME.mmctr.lock`` is; the same lock guards both)."""
    return storage.sibling(run, f".{storage.basename(run)}{REPLACED_SUFFIX}")


def _cached_lock(key: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmctr" / "locks"
    base.mkdir(parents=True, exist_ok=True)
    return base / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.lock"


def entries(folder: storage.Location) -> list[str]:
    """The names in ``folder`` less the lock files of outputs inside it (an OS lock's file outlives its command, by
    design: a failed `train --out D/run` leaves ``D/.run.mmctr.lock``, which does not make D an output)."""
    return [name for name in storage.listdir(folder) if not name.endswith(LOCK_SUFFIX)]


@contextmanager
def output_lock(target: storage.Location) -> Iterator[None]:
    """Hold ``target``'s lock for the block; raise OutputExistsError at once if another process holds it."""
    path = lock_path(target)
    lock = filelock.FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        _creatable(target, path)  # filelock says Timeout for a lock file it cannot create, as for one held
        raise OutputExistsError(f"{target}: in use by another mmctr command (it holds {path}); wait for it to end "
                                f"or choose another output") from None
    except OSError as err:  # a lock file that cannot be created or opened (a read-only filesystem, say)
        raise ConfigError(f"{target}: cannot lock it ({path}: {first_line(err)})") from None
    try:
        yield
    finally:
        lock.release()


def _creatable(target: storage.Location, path: Path) -> None:
    """Raise the one-line ConfigError of a lock file that cannot be created (``synth --out /proc/x`` was "in use by
    another mmctr command"); a file a holder made, or one made and removed at once here, passes."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # a holder's
        return
    except OSError as err:
        raise ConfigError(f"{target}: cannot lock it ({path}: {first_line(err)})") from None
    os.close(fd)
    path.unlink(missing_ok=True)  # not left behind looking held: its holder had just released it


def parquet_columns(path: Path) -> set[str] | None:
    """The column names of the parquet file ``path``, or None when it is not one that can be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return set(pq.read_schema(path).names)
    except (pa.ArrowException, OSError):
        return None


_BEGUN: set[str] = set()  # the outputs this process's command has begun (its config.yaml or settings.json written)


def began(out: storage.Location) -> None:
    """Record that this command has begun writing ``out`` (a run, a search): what a signal then leaves there is
    its own, not the output an --overwrite was to replace (which the command's line would tell to resume)."""
    _BEGUN.add(str(storage.normalize(str(out))))


def begun(out: storage.Location) -> bool:
    return str(storage.normalize(str(out))) in _BEGUN


def not_begun(out: storage.Location) -> None:
    """Record that ``out`` holds again what the command found there (an --overwrite's run put back)."""
    _BEGUN.discard(str(storage.normalize(str(out))))


_ASIDE: dict[str, str] = {}  # run → where this process's `train --overwrite` keeps the run it replaces, for now


def keep_aside(run: storage.Location, aside: storage.Location | None) -> None:
    """Record (``aside``) or forget (None) where the run ``run`` replaces waits: a signal's line names it without
    reading the storage (:func:`mmctr_ray.cli._left_on_disk` reads no URI)."""
    key = str(storage.normalize(str(run)))
    if aside is None:
        _ASIDE.pop(key, None)
    else:
        _ASIDE[key] = str(aside)


def kept_aside(run: storage.Location) -> str | None:
    return _ASIDE.get(str(storage.normalize(str(run))))


def forget_begun() -> None:
    """For the next command in this process."""
    _BEGUN.clear()
    _ASIDE.clear()


# the file that marks a folder as a stage's output; what else it may hold without that file (an attempt killed
# before it wrote it: tune writes search.yaml, then settings.json); whether it may hold nothing else at all; what
# to call it. One table for the CLI's check before Ray starts, each stage's own (a library caller, the pipeline's
# steps) and the pipeline's --overwrite: they said three things in three orders
FOLDER_KINDS = {
    "features": ("features_summary.json", {"config.yaml"}, True, "a features output"),
    "train": ("config.yaml", set(), False, "a run of `mmctr train`"),
    "tune": ("settings.json", {"search.yaml"}, False, "a search of `mmctr tune`")}


def check_folder_kind(stage: str, out: storage.Location, hint: str | None = None, shown: str | None = None) -> None:
    """Raise a one-line OutputExistsError when ``out`` exists and holds what ``stage`` did not write (an input, a
    run given to `features --out`, a user's files): said before "already exists; pass --overwrite", after which
    --overwrite replaced it. A missing or empty folder, or the stage's own output, passes. ``shown``: ``out`` as
    the user spelled it."""
    if not storage.exists(out):
        return
    marker, spare, exclusive, kind = FOLDER_KINDS[stage]
    held = set(entries(out))
    if exclusive and marker in held:  # a hidden leftover of its own (a temporary name a kill left, NFS's .nfs*)
        held = {name for name in held if not name.startswith(".")}
    foreign = sorted(held - {marker} - spare, key=lambda name: (name.startswith("."), name)) \
        if exclusive or marker not in held else []  # a visible file named first, not Ray's hidden marker
    if foreign:
        raise OutputExistsError(f"{shown or out}: not {kind} (it holds {foreign[0]}); " + (
            hint or f"--out takes a new or empty folder or one `mmctr {stage}` wrote, which --overwrite replaces"))


def check_table_output(out: Path, stage: str, kind: str, columns: set[str], overwrite: bool,
                       beside: Iterable[Path] = ()) -> None:
    """One-line errors for the ``--out`` table of ``stage`` (``fuse``, ``embed``), the most telling first: a folder,
    a file that is not .parquet, an existing file that is not ``kind`` (a parquet holding ``columns``), then an
    existing output (the table or a file ``beside`` it) without ``overwrite``.

    ``--overwrite`` replaces the stage's own outputs only: pointed at the data set's item_feature.parquet, or at the
    embeddings given as ``--source``, it replaced them with a fused table (the input gone), and before, the first
    error said "already exists; pass --overwrite" and with it, only then, "must name a .parquet file"."""
    if out.is_dir():
        raise ConfigError(f"{out}: a folder; --out names the .parquet file of {kind}")
    if out.suffix != ".parquet":
        raise ConfigError(f"{out}: --out must name a .parquet file")
    if out.exists() and not columns <= (parquet_columns(out) or set()):
        raise OutputExistsError(f"{out}: not {kind} (a parquet of columns {', '.join(sorted(columns))}); --out takes "
                                f"a new file or one `mmctr {stage}` wrote, which --overwrite replaces")
    existing = [p for p in (out, *beside) if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]}: already exists; pass --overwrite to replace it")
