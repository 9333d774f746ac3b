"""Drop Ray object-store pages this process has read from its resident set (Linux; a no-op elsewhere).

A training worker reads its blocks zero-copy: it maps the object store's shared memory (``/dev/shm/plasma…``)
and touches the pages of every block it consumes. The store hands freed space out again at fresh addresses, and
the kernel keeps every page a process has touched in its page table until the process unmaps it, so the
worker's RSS grows by the whole split it has streamed (up to the store's size, 30% of RAM by default) although
it holds only a few blocks at a time (ray-project/ray#65544; Ray's own madvise fix, PR #62854, was closed
unmerged). Measured on the 2-core machine: ``RssShmem`` 109 MiB at 200k rows, 1,591 MiB at 3.2M.

``madvise(MADV_DONTNEED)`` on a ``MAP_SHARED`` mapping only removes the pages from *this* process's page
table: the store keeps their contents, nothing is freed or copied, and a block still in use faults its pages
back in when it is next read (a minor fault). So calling :func:`release_store_pages` between batches changes
what the process holds mapped, not what any reader sees. No library offers this (Ray reads the mapping in C++
and exposes no release for readers), hence the few lines of ``ctypes`` here.

Only the store's main mapping is advised. When the store is full Ray puts an object in a file of its own in the
fallback directory and unmaps it as soon as the object is released, from any of the process's threads; an
address read from ``/proc/self/maps`` may then be reused by a private mapping (a tensor's memory) before the
``madvise`` reaches it, and ``MADV_DONTNEED`` on private memory zeroes it. The main mapping stays for the
process's life; it is told apart by its size, the node's object-store capacity (which Ray maps whole), and a
fallback mapping never keeps pages after its object is gone, so leaving those alone costs no memory.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

MADV_DONTNEED = 4  # Linux <asm-generic/mman-common.h>


def store_mappings(maps: str) -> list[tuple[int, int]]:
    """(start, end) of every shared mapping of an object-store file in a ``/proc/<pid>/maps`` text.

    Ray's plasma store maps a file named ``plasma…`` (in ``/dev/shm``, or the fallback directory when the store
    is full); only shared (``s``) mappings are taken: private ones would lose their contents."""
    ranges = []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[1][3:4] != "s":
            continue
        name = parts[5].removesuffix(" (deleted)").rsplit("/", 1)[-1]
        if name.startswith("plasma"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


CAPACITY_SLACK = 1 << 20  # the main mapping is the capacity rounded up to pages plus Ray's gap: measured 7.8 KiB


def main_store_mapping(maps: str, capacity: int) -> tuple[int, int] | None:
    """The object store's main mapping in a ``/proc/<pid>/maps`` text: the one shared ``plasma…`` mapping whose
    size is the store's ``capacity`` in bytes (up to :data:`CAPACITY_SLACK` more). None when there is none, or
    when more than one fits (a fallback file of that very size: which is which cannot be told, so neither)."""
    fits = [(start, end) for start, end in store_mappings(maps) if 0 <= end - start - capacity <= CAPACITY_SLACK]
    return fits[0] if len(fits) == 1 else None


def node_store_capacity() -> int | None:
    """This node's object-store capacity in bytes, as Ray reports it; None outside Ray or when it cannot tell."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        node = ray.get_runtime_context().get_node_id()
        found = [n["Resources"].get("object_store_memory") for n in ray.nodes() if n.get("NodeID") == node]
    except Exception as e:  # noqa: BLE001 - keeping the pages is always safe: say why, once
        log.warning("cannot tell this node's object-store capacity (%s); keeping the store's pages", e)
        return None
    return int(found[0]) if found and found[0] else None


class _Releaser:
    def __init__(self, capacity: int | None) -> None:
        self.madvise = None
        self.capacity = capacity
        if sys.platform.startswith("linux") and capacity:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                libc.madvise.restype = ctypes.c_int
                self.madvise = libc.madvise
            except (OSError, AttributeError) as e:  # no libc madvise: keep the pages, say so once
                log.warning("cannot release object-store pages from this process's RSS: %s", e)

    def __call__(self) -> int:
        if self.madvise is None:
            return 0
        try:
            with open("/proc/self/maps") as f:
                found = main_store_mapping(f.read(), self.capacity)
        except OSError:
            return 0
        if found is None:  # not mapped yet (nothing read from the store so far), or not told apart
            return 0
        start, end = found
        if self.madvise(start, end - start, MADV_DONTNEED) != 0:
            log.warning("madvise(MADV_DONTNEED) on the object store mapping failed: errno %d; keeping its pages",
                        ctypes.get_errno())
            self.madvise = None
            return 0
        return end - start


_release = None


def release_store_pages(capacity: int | None = None) -> int:
    """Unmap the object store's main mapping from this process's page table; returns the bytes advised.

    ``capacity``: the store's size in bytes; by default this node's, asked of Ray on the first call (outside
    Ray nothing is released). The first call fixes it for the process."""
    global _release
    if _release is None:
        _release = _Releaser(capacity if capacity is not None else node_store_capacity())
    return _release()
