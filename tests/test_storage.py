"""Run locations: local paths and storage URIs through one pyarrow filesystem.

``memory://`` (fsspec, in this process only) stands for an object store here; ``file://`` for one that Ray
workers can share (the end-to-end run under a URI is in test_training.py).
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from mmctr_ray import storage
from mmctr_ray.errors import ConfigError, DataError


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
