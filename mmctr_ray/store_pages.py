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
process's life (the plasma client never unmaps it), and a fallback mapping keeps no pages after its object is
gone, so leaving those alone costs no memory. The two are told apart by the folder of their file: the raylet,
which starts every Ray worker process and so is its parent, names both on its command line
(``--plasma_directory``, ``--fallback_directory``). Its size would not do: the store is the requested capacity
rounded to the allocator's granularity (128 KiB, or 1 GiB with huge pages), or less where ``/dev/shm`` is short,
and an object larger than the store goes to a fallback file of about that size.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

MADV_DONTNEED = 4  # Linux <asm-generic/mman-common.h>


def _mapped_file(line: str) -> tuple[int, int, str] | None:
    """(start, end, file) of a shared mapping of a ``plasma…`` file in one ``/proc/<pid>/maps`` line: Ray's plasma
    store maps files named so, the main one in its plasma directory and, when the store is full, one per object in
    its fallback directory."""
    parts = line.split(maxsplit=5)
    if len(parts) < 6 or parts[1][3:4] != "s":  # private mappings would lose their contents
        return None
    path = parts[5].removesuffix(" (deleted)")
    if not path.rsplit("/", 1)[-1].startswith("plasma"):
        return None
    start, end = (int(x, 16) for x in parts[0].split("-"))
    return start, end, path


def main_store_mapping(maps: str, plasma_dir: str, fallback_dir: str) -> tuple[int, int] | None:
    """The object store's main mapping in a ``/proc/<pid>/maps`` text: the shared ``plasma…`` mapping whose file
    lies in ``plasma_dir``. None when there is none yet, when the two folders are one (which file is which
    cannot be told then), or when more than one file fits (not what Ray does: never guess)."""
    plasma, fallback = os.path.realpath(plasma_dir), os.path.realpath(fallback_dir)
    if plasma == fallback:
        return None
    fits = {(start, end) for start, end, path in filter(None, map(_mapped_file, maps.splitlines()))
            if os.path.dirname(path) == plasma}
    return fits.pop() if len(fits) == 1 else None


def store_directories(pid: int | None = None) -> tuple[str, str] | None:
    """(plasma directory, fallback directory) of the raylet that started this Ray worker process (its parent, or
    ``pid``), read from the raylet's command line; None when the parent is no raylet or cannot be read."""
    try:
        with open(f"/proc/{pid or os.getppid()}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not argv or not os.path.basename(argv[0]).startswith("raylet"):
        return None
    flags = dict(a.removeprefix("--").split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
    dirs = flags.get("plasma_directory"), flags.get("fallback_directory")
    return (dirs[0], dirs[1]) if all(dirs) else None


class _Releaser:
    def __init__(self, dirs: tuple[str, str] | None) -> None:
        self.madvise, self.dirs = None, dirs
        if not sys.platform.startswith("linux"):
            return
        if dirs is None:
            log.info("object-store pages stay in this process's RSS: its parent is not a raylet whose command line "
                     "names the store's folders")
            return
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
                found = main_store_mapping(f.read(), *self.dirs)
        except OSError:
            return 0
        if found is None:  # nothing read from the store so far, or not told apart
            return 0
        start, end = found
        if self.madvise(start, end - start, MADV_DONTNEED) != 0:
            log.warning("madvise(MADV_DONTNEED) on the object store mapping failed: errno %d; keeping its pages",
                        ctypes.get_errno())
            self.madvise = None
            return 0
        return end - start


_release = None


def release_store_pages(dirs: tuple[str, str] | None = None) -> int:
    """Unmap the object store's main mapping from this process's page table; returns the bytes advised.

    ``dirs``: the store's (plasma, fallback) folders; by default those the raylet that started this worker
    process names (:func:`store_directories`; a process that is no Ray worker releases nothing). The first
    call fixes them for the process."""
    global _release
    if _release is None:
        _release = _Releaser(dirs if dirs is not None else store_directories())
    return _release()
