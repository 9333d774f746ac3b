"""Keeping freed memory in a CPU training worker: the tunables, and what they do to a thread's large blocks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmctr_ray.config import from_dict
from mmctr_ray.host_malloc import ENV, LEGACY, TUNABLES, glibc_tunables, worker_env

# Ray Train V2 runs the training function in a thread: the cycles run in one too. Each allocates, writes and frees
# a 64 MiB tensor, larger than a thread arena's heap (64 MiB at most) and than glibc's mmap threshold (at most
# 32 MiB on its own): by default every cycle maps fresh pages and faults each one in (16,384 of 4 KiB). With the
# tunables the heap serves them; it takes a few cycles (~13 here) to hold enough free space that a 64-byte
# aligned block fits again, after which the cycles fault nothing in.
CYCLES = """
import resource, threading
import torch

def cycle():
    block = torch.ones(64 * 2**20 // 4)
    del block

def faults(out):
    for _ in range(32):
        cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        cycle()
    out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)

out = []
thread = threading.Thread(target=faults, args=(out,))
thread.start()
thread.join()
print(out[0])
"""


def _faults(env: dict[str, str]) -> int:
    environ = {k: v for k, v in os.environ.items() if k != ENV and k not in LEGACY.values()}  # glibc's defaults
    return int(subprocess.run([sys.executable, "-c", CYCLES], env={**environ, **env}, capture_output=True,
                              text=True, check=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_worker_thread_reuses_a_freed_block_without_faulting_its_pages_in_again():
    default = _faults({})
    kept = _faults(worker_env(True, False, {}))
    assert kept < 256, (default, kept)  # the heap kept the blocks: nothing to fault in
    # 64 MiB of 4 KiB pages, each faulted in again; with transparent huge pages always on, 2 MiB pages: 32 faults
    assert default >= (32 * 0.9 if _huge_pages_always() else 16_384 * 0.9), default
    assert kept * 8 < default, (default, kept)  # (with 2 MiB pages the bound above alone would pass any kept)


def _huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def test_the_tunables_add_to_what_the_environment_sets_and_keep_its_values():
    assert glibc_tunables(None) == ":".join(f"{k}={v}" for k, v in TUNABLES.items())
    mine = glibc_tunables("glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0")
    items = mine.split(":")
    assert items[:2] == ["glibc.malloc.arena_max=4", "glibc.malloc.tcache_count=0"]  # the user's, first and kept
    assert sorted(items[2:]) == sorted(f"{k}={v}" for k, v in TUNABLES.items() if k != "glibc.malloc.arena_max")


def test_only_cpu_workers_get_them_and_only_when_asked():
    assert worker_env(True, False, {ENV: "glibc.malloc.tcache_count=0"}) == {
        ENV: glibc_tunables("glibc.malloc.tcache_count=0")}
    assert worker_env(True, True, {}) == {}
    # the older variable for a setting keeps its value, written into the tunables: a cluster's raylets start the
    # workers with the runtime environment only, where MALLOC_ARENA_MAX alone would not reach them
    assert worker_env(True, False, {"MALLOC_ARENA_MAX": "4", "MALLOC_TRIM_THRESHOLD_": "0"}) == {
        ENV: f"glibc.malloc.arena_max=4:glibc.malloc.mmap_threshold={TUNABLES['glibc.malloc.mmap_threshold']}"
             ":glibc.malloc.trim_threshold=0"}
    # one glibc ignores (not a whole number) leaves the setting at glibc's default, as it would have; the
    # driver's GLIBC_TUNABLES still comes first
    assert worker_env(True, False, {ENV: "glibc.malloc.trim_threshold=7", "MALLOC_ARENA_MAX": "two",
                                    "MALLOC_TRIM_THRESHOLD_": "0"}) == {
        ENV: f"glibc.malloc.trim_threshold=7:glibc.malloc.mmap_threshold={TUNABLES['glibc.malloc.mmap_threshold']}"}
    assert worker_env(False, False, {}) == {}
    assert from_dict({}).train.keep_freed_memory is True
    assert from_dict({"train": {"keep_freed_memory": False}}).train.keep_freed_memory is False
