"""Releasing the object store's pages from a reader's resident set: the mapping parser, the real madvise, and
that a Ray worker advises the store's main mapping and never a fallback file's (which Ray may unmap at any time)."""

from __future__ import annotations

import mmap
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from mmctr_ray import store_pages
from mmctr_ray.store_pages import _mapped_file, main_store_mapping, release_store_pages, store_directories

MAPS = """\
55d0c0000000-55d0c0021000 r--p 00000000 fd:01 1234      /usr/bin/python3.12
7f40a1400000-7f40b4000000 rw-s 00000000 00:1a 99        /dev/shm/plasmaqObe8E (deleted)
7f40b4000000-7f40b4100000 rw-p 00000000 00:1a 98        /dev/shm/plasmaPrivate
7f40b5000000-7f40b5200000 rw-s 00000000 fd:01 77        /tmp/ray/session_1/plasma_fallback_3
7f40b6000000-7f40b6200000 rw-s 00000000 00:1a 97        /dev/shm/other-shared-file
7f40b7000000-7f40b7001000 rw-p 00000000 00:00 0
"""


def test_only_shared_object_store_mappings_are_taken():
    taken = [mapping[:2] for mapping in map(_mapped_file, MAPS.splitlines()) if mapping]
    assert taken == [(0x7F40A1400000, 0x7F40B4000000), (0x7F40B5000000, 0x7F40B5200000)]


def test_the_main_mapping_is_the_one_in_the_plasma_directory():
    main = (0x7F40A1400000, 0x7F40B4000000)
    assert main_store_mapping(MAPS, "/dev/shm", "/tmp/ray/session_1") == main
    assert main_store_mapping(MAPS, "/dev/shm/", "/tmp/ray/session_1/") == main  # the folders as a user spells them
    assert main_store_mapping(MAPS, "/tmp", "/tmp/ray/session_1") is None  # the store not mapped yet
    # an object larger than the store, in a fallback file of about the store's size: still not the main mapping
    big = MAPS + "7f40c0000000-7f40d2c00000 rw-s 00000000 fd:01 78        /tmp/ray/session_1/plasmaAbCdEf\n"
    assert main_store_mapping(big, "/dev/shm", "/tmp/ray/session_1") == main
    assert main_store_mapping(MAPS, "/dev/shm", "/dev/shm") is None  # one folder for both: never guess
    two = MAPS + "7f40c0000000-7f40d2c00000 rw-s 00000000 00:1a 91        /dev/shm/plasmaOther\n"
    assert main_store_mapping(two, "/dev/shm", "/tmp/ray/session_1") is None  # two stores in one folder


def test_the_store_folders_come_from_the_raylet_that_started_the_worker(tmp_path, monkeypatch):
    proc = tmp_path / "proc"
    (proc / "7").mkdir(parents=True)
    (proc / "7" / "cmdline").write_bytes(b"/venv/ray/core/src/ray/raylet/raylet\0--raylet_socket_name=/s\0"
                                         b"--plasma_directory=/dev/shm\0--fallback_directory=/tmp/ray/session_9\0")
    (proc / "8").mkdir()
    (proc / "8" / "cmdline").write_bytes(b"/usr/bin/python3\0-m\0pytest\0")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(str(path).replace("/proc", str(proc), 1),
                                                                         *a, **k))
    assert store_directories(7) == ("/dev/shm", "/tmp/ray/session_9")
    assert store_directories(8) is None  # not started by a raylet: nothing is released
    assert store_directories(9) is None  # gone, or not readable


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/dev/shm").is_dir(), reason="Linux tmpfs")
def test_release_unmaps_the_pages_and_keeps_their_contents(monkeypatch):
    folder = Path("/dev/shm") / f"mmctr-test-{uuid.uuid4().hex}"  # its own folder: no other store's file in it
    folder.mkdir()
    path = folder / "plasmaTest"
    size = 32 << 20
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        view = np.frombuffer(buf, dtype=np.int64)
        view[:] = np.arange(len(view))  # touch every page
        before = _status("RssShmem:")
        monkeypatch.setattr(store_pages, "_release", None)
        assert release_store_pages((str(folder), "/nonexistent/fallback")) == size
        after = _status("RssShmem:")
        assert before - after >= (size >> 10) * 0.9, (before, after)  # KiB: the 32 MiB left this process's RSS
        assert np.array_equal(view, np.arange(len(view)))  # the contents are still there when read again
        assert _status("RssShmem:") - after >= (size >> 10) * 0.9  # ...faulted back in by that read
        del view
        buf.close()
    finally:
        os.close(fd)
        path.unlink()
        folder.rmdir()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc maps")
def test_a_ray_worker_advises_the_main_mapping_and_leaves_fallback_files_alone():
    """A 100 MiB store with spilling off: the third 40 MiB object goes to a fallback file. The worker reads all
    three; the release must take the main mapping's pages only, and the fallback object must keep its pages."""
    import ray

    store = 100 << 20
    ray.init(address="local", num_cpus=1, object_store_memory=store, include_dashboard=False,
             _system_config={"automatic_object_spilling_enabled": False})
    try:
        refs = [ray.put(np.full(40 << 20, i + 1, dtype=np.uint8)) for i in range(3)]

        @ray.remote
        def read_and_release(refs):
            def resident():  # KiB resident per object-store mapping, from /proc/self/smaps
                sizes, mapping = {}, None
                with open("/proc/self/smaps") as f:
                    for line in f:
                        head = line.split()
                        if "-" in head[0] and len(head) >= 6 and head[1][3:4] == "s" and "plasma" in head[5]:
                            start, end = (int(x, 16) for x in head[0].split("-"))
                            mapping = end - start
                        elif "-" in head[0] and not head[0].endswith(":"):
                            mapping = None
                        elif head[0] == "Rss:" and mapping is not None:
                            sizes[mapping] = int(head[1])
                return sizes

            arrays = [ray.get(r) for r in refs]
            assert [int(a[:: 1 << 12].sum()) for a in arrays] == [(i + 1) * ((40 << 20) >> 12) for i in range(3)]
            before = resident()
            released = release_store_pages()
            after = resident()
            intact = [bool((a[:: 1 << 12] == i + 1).all()) for i, a in enumerate(arrays)]
            return released, before, after, intact

        released, before, after, intact = ray.get(read_and_release.remote(refs))
    finally:
        ray.shutdown()
    assert len(before) == 2, before  # {mapping size: resident KiB}: the main mapping and one fallback file
    main, fallback = max(before), min(before)
    assert fallback < store <= main
    assert released == main  # the main mapping, whole, and nothing else
    assert intact == [True, True, True]
    assert before[main] >= (80 << 10) * 0.9 and after[main] <= (1 << 10), (before, after)  # two objects, released
    assert before[fallback] >= (40 << 10) * 0.9 and after[fallback] == before[fallback], (before, after)
