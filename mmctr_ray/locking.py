"""One writer per output: a stage holds an exclusive lock on its output while it runs, so a second run pointed
at the same RUN, TUNE or file refuses at once instead of interleaving with the first.

The lock is an OS file lock (``filelock``): it ends with the process that holds it, so a killed run leaves no
stale lock behind. A local output's lock file sits beside it (``.NAME.mmctr.lock``; on a shared filesystem
with POSIX locks it guards every machine that mounts it). A storage URI's lock lives in this machine's cache
(``~/.cache/mmctr/locks``): object stores have no locks, so two machines writing one URI are not stopped.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
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
        key = hashlib.sha256(str(target).split("?", 1)[0].encode()).hexdigest()[:24]  # the query: how to reach it
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmctr" / "locks"
        base.mkdir(parents=True, exist_ok=True)
        return base / f"{key}.lock"
    path = Path(target).resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a folder of the path should be, no permission
        raise ConfigError(f"{target}: cannot create the folder it goes in ({first_line(err)})") from None
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


@contextmanager
def output_lock(target: storage.Location) -> Iterator[None]:
    """Hold ``target``'s lock for the block; raise OutputExistsError at once if another process holds it."""
    path = lock_path(target)
    lock = filelock.FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise OutputExistsError(f"{target}: in use by another mmctr command (it holds {path}); wait for it to end "
                                f"or choose another output") from None
    try:
        yield
    finally:
        lock.release()
