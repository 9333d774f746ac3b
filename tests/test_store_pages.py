"""Releasing the object store's pages from a reader's resident set: the mapping parser and the real madvise."""

from __future__ import annotations

import mmap
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from mmctr_ray.store_pages import release_store_pages, store_mappings

MAPS = """\
55d0c0000000-55d0c0021000 r--p 00000000 fd:01 1234      /usr/bin/python3.12
7f40a1400000-7f40b4000000 rw-s 00000000 00:1a 99        /dev/shm/plasmaqObe8E (deleted)
7f40b4000000-7f40b4100000 rw-p 00000000 00:1a 98        /dev/shm/plasmaPrivate
7f40b5000000-7f40b5200000 rw-s 00000000 fd:01 77        /tmp/ray/session_1/plasma_fallback_3
7f40b6000000-7f40b6200000 rw-s 00000000 00:1a 97        /dev/shm/other-shared-file
7f40b7000000-7f40b7001000 rw-p 00000000 00:00 0
"""


def test_only_shared_object_store_mappings_are_taken():
    assert store_mappings(MAPS) == [(0x7F40A1400000, 0x7F40B4000000), (0x7F40B5000000, 0x7F40B5200000)]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/dev/shm").is_dir(), reason="Linux tmpfs")
def test_release_unmaps_the_pages_and_keeps_their_contents():
    path = Path("/dev/shm") / f"plasma-test-{uuid.uuid4().hex}"
    size = 32 << 20
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        view = np.frombuffer(buf, dtype=np.int64)
        view[:] = np.arange(len(view))  # touch every page
        before = _status("RssShmem:")
        assert release_store_pages() >= size
        after = _status("RssShmem:")
        assert before - after >= (size >> 10) * 0.9, (before, after)  # KiB: the 32 MiB left this process's RSS
        assert np.array_equal(view, np.arange(len(view)))  # the contents are still there when read again
        assert _status("RssShmem:") - after >= (size >> 10) * 0.9  # ...faulted back in by that read
        del view
        buf.close()
    finally:
        os.close(fd)
        path.unlink()
