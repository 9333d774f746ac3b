"""Where a run lives: a local path or a storage URI, read and written through one ``pyarrow.fs`` filesystem.

A *location* is a local path (a ``Path``, or a string without a scheme) or a URI string such as
``s3://bucket/runs/r1``, ``gs://bucket/r1``, ``abfs://container@account.dfs.core.windows.net/r1``,
``hdfs://namenode/r1`` or ``file:///abs/r1``. URIs are resolved like Ray Train resolves
``RunConfig(storage_path=...)``: ``pyarrow.fs.FileSystem.from_uri`` first, then, for a scheme pyarrow does not
know, fsspec (whose scheme needs its own package, e.g. ``adlfs`` for ``az://``).

Local locations stay ``Path`` objects and URIs stay strings (``Path`` would collapse ``s3://`` into ``s3:/``):
``join`` keeps the kind it is given, so local runs look exactly as they did before URIs were accepted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from mmctr_ray.errors import ConfigError, DataError, StorageError, UserError, first_line

Location = str | Path
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
SCHEMES_HINT = "s3://, gs://, abfs://, hdfs://, file://, or a scheme of an installed fsspec package"


def is_uri(location: Location) -> bool:
    return isinstance(location, str) and bool(_SCHEME.match(location))


def normalize(location: Location) -> Location:
    """A local path made absolute (a ``Path``), or a URI without a trailing slash (a string)."""
    if not is_uri(location):
        return Path(location).resolve()
    parts = urlsplit(str(location))
    if parts.fragment or str(location).endswith("#"):  # pyarrow drops '#...': the run would land elsewhere
        raise ConfigError(f"{location}: '#' starts a URI fragment, which storage drops; write it as %23")
    return _unsplit(parts._replace(path=parts.path.rstrip("/") or parts.path[:1]))


def _unsplit(parts: SplitResult) -> str:
    """``urlunsplit`` that keeps ``//`` whatever the scheme: it writes ``hdfs:///a`` (the default namenode's /a)
    as ``hdfs:/a``, which is no URI any more but a relative local path, for every scheme outside urllib's list."""
    path = parts.path if not parts.netloc or not parts.path or parts.path.startswith("/") else "/" + parts.path
    return f"{parts.scheme}://{parts.netloc}{path}" + (f"?{parts.query}" if parts.query else "")


def resolve(location: Location) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a location.

    Raises:
        ConfigError: an unknown scheme, a scheme whose package is missing, or a storage that cannot be opened.
    """
    if not is_uri(location):
        return pafs.LocalFileSystem(), Path(location).resolve().as_posix()
    uri = str(location)
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as err:
        if "Unrecognized filesystem type" not in str(err):
            raise ConfigError(f"{uri}: {first_line(err)}") from None
    except OSError as err:  # e.g. hdfs:// without a JVM, or no credentials
        raise ConfigError(f"{uri}: cannot open this storage ({first_line(err)})") from None
    return _fsspec(uri)


def _fsspec(uri: str) -> tuple[pafs.FileSystem, str]:
    import fsspec

    scheme = uri.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as err:  # fsspec knows the scheme, its package is not installed
        raise ConfigError(f"{uri}: {scheme}:// needs a package that is not installed ({first_line(err)})") from None
    except ValueError:
        raise ConfigError(f"{uri}: unsupported storage scheme {scheme}:// (expected a local path or a URI: "
                          f"{SCHEMES_HINT})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


@contextlib.contextmanager
def _reaching(location: Location) -> Iterator[None]:
    """Turn a storage URI's access failure (credentials, permissions, a missing bucket, the network: pyarrow raises
    OSError with the service's message) into a one-line StorageError naming the location. A missing file stays
    FileNotFoundError (callers decide what it means); local paths keep their own errors."""
    try:
        yield
    except (FileNotFoundError, UserError):
        raise
    except OSError as err:
        if not is_uri(location) or err.errno is not None:  # errno: this machine's side of a copy (a full disk)
            raise
        raise StorageError(f"{location}: cannot access this storage ({first_line(err)})") from None


def join(location: Location, *names: str) -> Location:
    """``location/name/...``, a ``Path`` for a local location and a URI string (query kept) for a URI."""
    if not is_uri(location):
        return Path(location).joinpath(*names)
    parts = urlsplit(str(location))
    return _unsplit(parts._replace(path=posixpath.join(parts.path, *names)))


def basename(location: Location) -> str:
    if not is_uri(location):
        return Path(location).name
    return posixpath.basename(urlsplit(str(location)).path.rstrip("/"))


def _type(location: Location) -> pafs.FileType:
    fs, path = resolve(location)
    with _reaching(location):
        return fs.get_file_info(path).type


def exists(location: Location) -> bool:
    return _type(location) != pafs.FileType.NotFound


def is_file(location: Location) -> bool:
    return _type(location) == pafs.FileType.File


def listdir(location: Location) -> list[str]:
    """Sorted names in a folder; ``[]`` when it does not exist."""
    fs, path = resolve(location)
    with _reaching(location):
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise DataError(f"{location}: is a file; expected a directory")
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(info.path.rstrip("/")) for info in infos)


def file_sizes(location: Location) -> dict[str, int]:
    """``{name: bytes}`` of the files directly in a folder (one listing, also on object stores); ``{}`` when it
    does not exist."""
    fs, path = resolve(location)
    with _reaching(location):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {posixpath.basename(i.path.rstrip("/")): i.size for i in infos if i.type == pafs.FileType.File}


def read_bytes(location: Location) -> bytes:
    fs, path = resolve(location)
    try:
        with _reaching(location), fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{location}: missing file") from None


def read_text(location: Location) -> str:
    return read_bytes(location).decode()


def read_json_object(location: Location, expected: str, shown: Location | None = None) -> dict[str, Any]:
    """The JSON object in ``location``, or a one-line DataError naming it (as ``shown``, e.g. the URI a local copy
    was downloaded from) and ``expected`` (what writes it): a file cut short, edited by hand or not UTF-8 was a
    JSONDecodeError traceback, a list an AttributeError."""
    shown = location if shown is None else shown
    try:
        value = json.loads(read_text(location))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{shown}: not valid JSON ({first_line(err)}); expected {expected}") from None
    if not isinstance(value, dict):
        raise DataError(f"{shown}: holds a JSON {type(value).__name__}; expected {expected}, a JSON object")
    return value


def _local_target(location: Location) -> tuple[Any, str, Path | None]:
    """``(fs, path in fs, local Path)`` of a place to write: the local Path of a local path or a ``file://`` URI
    (pyarrow's output stream would truncate that file first), else None with the URI's file system."""
    if not is_uri(location):
        return None, "", Path(location)
    fs, fs_path = resolve(location)
    return fs, fs_path, Path(fs_path) if isinstance(fs, pafs.LocalFileSystem) else None


def local_path(location: Location) -> Path | None:
    """The local path a location names (a path, or a ``file://`` URI), else None."""
    return _local_target(location)[2]


def partial_path(path: Path) -> Path:
    """A hidden temporary name beside ``path`` that no other writer uses: the process id alone was shared by two
    writers of one file in one process (threads: Ray Train runs the training function in one) and by processes of
    other hosts on shared storage, which then wrote into one temporary file and renamed it from under each other."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` (its folder created first) to write, renamed over ``path`` when the block
    ends: a reader never sees it half-written, and on a failure (Ctrl-C, a full disk) the earlier file stays and no
    partial one is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(location: Location, data: bytes) -> None:
    """Write a whole file (its folder is created first) in one piece: an object store puts it whole; a local file
    (a path or a ``file://`` URI) is written under a temporary name and renamed (:func:`_replacing`). (``hdfs://``
    and fsspec file systems are written in place.)"""
    fs, fs_path, local = _local_target(location)
    if local is not None:
        with _replacing(local) as tmp:
            tmp.write_bytes(data)
        return
    with _reaching(location):
        fs.create_dir(posixpath.dirname(fs_path), recursive=True)
        with fs.open_output_stream(fs_path) as f:
            f.write(data)


def write_text(location: Location, text: str) -> None:
    write_bytes(location, text.encode())


def upload_file(local: str | Path, location: Location) -> None:
    """Copy a local file to ``location`` streamed, in pieces (:func:`write_bytes` holds the whole file in memory:
    the raw embeddings of the full MicroLens are ~8 GB), whole as :func:`write_bytes` writes it: under a
    temporary name and renamed where ``location`` is local, an object store's put otherwise."""
    fs, fs_path, target = _local_target(location)
    if target is not None:
        with _replacing(target) as tmp:
            shutil.copyfile(local, tmp)
        return
    with _reaching(location):
        fs.create_dir(posixpath.dirname(fs_path), recursive=True)
        pafs.copy_files(Path(local).resolve().as_posix(), fs_path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)


def json_text(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON, every float that is not finite written as ``null`` (JSON's convention): ``json.dumps``
    writes the bare tokens ``NaN``/``Infinity`` (an AUC over one class is NaN), which Python reads back but jq,
    JavaScript, Go and most dashboards refuse. Readers turn a ``null`` where a number belongs back into a NaN
    (:func:`nan_for_null`)."""
    return json.dumps(_finite_or_null(obj), indent=indent, allow_nan=False)  # allow_nan: nothing slipped through


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):  # NumPy's float64 too
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_null(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(value) for value in obj]
    return obj


def nan_for_null(record: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``record`` with NaN for a ``null`` at each of ``keys``, numbers it always holds: how :func:`json_text` wrote a
    NaN (a key the record lacks stays absent)."""
    return {**record, **{key: math.nan for key in keys if key in record and record[key] is None}}


def make_dir(location: Location) -> None:
    fs, path = resolve(location)
    with _reaching(location):
        fs.create_dir(path, recursive=True)


def remove_file(location: Location) -> None:
    """Delete a file; nothing to do when it does not exist."""
    if is_file(location):
        fs, path = resolve(location)
        with _reaching(location):
            fs.delete_file(path)


def remove_dir(location: Location) -> None:
    fs, path = resolve(location)
    with _reaching(location):
        fs.delete_dir(path)


def sibling(location: Location, name: str) -> Location:
    """``name`` in the folder that holds ``location`` (of the same kind: a ``Path``, or a URI keeping its query)."""
    if not is_uri(location):
        return Path(location).resolve().parent / name
    parts = urlsplit(str(location))
    return _unsplit(parts._replace(path=posixpath.join(posixpath.dirname(parts.path.rstrip("/")), name)))


def move_dir(source: Location, target: Location) -> None:
    """Move the folder ``source`` to ``target`` (which must not exist) on one storage: a rename on a local or
    mounted filesystem; elsewhere a copy, then a delete of ``source`` (an object store has no folders to rename:
    pyarrow's S3 and GCS filesystems move single objects only)."""
    here = local_path(source)
    if here is not None:
        here.rename(local_path(target) or Path(target))
        return
    copy_dir(source, target)
    remove_dir(source)


def copy_dir(source: Location, target: Location) -> None:
    """Copy every file under the folder ``source`` to ``target``, on one storage."""
    fs, path = resolve(source)
    _, target_path = resolve(target)
    with _reaching(source):
        pafs.copy_files(path, target_path, source_filesystem=fs, destination_filesystem=fs)


def empty_dir(location: Location) -> None:
    """Delete everything in the folder ``location``, which stays (a mount point, or a folder whose parent this user
    cannot write, cannot itself be deleted)."""
    fs, path = resolve(location)
    with _reaching(location):
        fs.delete_dir_contents(path, missing_dir_ok=True)


def upload_dir(local_dir: str | Path, location: Location) -> None:
    """Copy every file under the local folder to ``location`` (files already there and not local are kept)."""
    fs, path = resolve(location)
    with _reaching(location):
        fs.create_dir(path, recursive=True)
        pafs.copy_files(Path(local_dir).resolve().as_posix(), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)


def download_dir(location: Location, local_dir: str | Path, skip: Iterable[str] = ()) -> None:
    """Copy every file under ``location`` into the local folder (nothing when ``location`` does not exist), but
    those whose path below ``location`` is in ``skip``."""
    fs, path = resolve(location)
    local, skip = Path(local_dir).resolve(), set(skip)
    with _reaching(location):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        if not skip:
            pafs.copy_files(path, local.as_posix(), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            return
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            name = posixpath.relpath(info.path, path)
            if info.type != pafs.FileType.File or name in skip:
                continue
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, (local / name).as_posix(), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())


@contextlib.contextmanager
def local_copy(location: Location, skip: Iterable[str] = ()) -> Iterator[Path]:
    """A local folder holding ``location``'s files: the folder itself when local, else a temporary download of
    those not in ``skip`` (their paths below ``location``)."""
    if not is_uri(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="mmctr-") as tmp:
        download_dir(location, tmp, skip)
        yield Path(tmp)
