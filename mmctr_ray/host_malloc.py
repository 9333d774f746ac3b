"""Keep the memory a CPU training worker frees for its next step (glibc's malloc tunables).

A CPU training step allocates and frees the same large activations every step: at batch 8192 the baseline's
attention MLP, run once per real history position, holds 100+ MiB per layer. glibc's ``malloc`` serves a block
over its mmap threshold (128 KiB, raised on the fly to at most 32 MiB) with ``mmap`` and hands it back with
``munmap`` when it is freed, and trims the top of its heap whenever more than its trim threshold is free there.
Every step then faults in fresh pages, 4 KiB at a time, each zeroed by the kernel first: on the 2-core machine
the plain training loop spent 29% of its CPU time in the kernel (13.6–15.2 s of system time against 35–39 s of
user time over 12 steps).

Ray Train V2 runs the training function in a thread of the worker process, and glibc gives each new thread its
own arena: heaps of at most 64 MiB, so a larger block is mmapped there whatever the thresholds say. Hence three
settings, given to the worker processes as ``GLIBC_TUNABLES`` (glibc reads it when a process starts, so it goes
into the workers' runtime environment; ``mallopt`` from inside the worker would come too late for the arena):

* ``arena_max=1``: every thread allocates from the main heap, which has no size limit;
* ``mmap_threshold`` and ``trim_threshold`` at 2 GiB: blocks come from the heap and freed ones stay there for the
  next step.

In a thread, as the worker trains, 12 steps of the baseline ran at 5,659 samples/s with 0.1 s of system time
against 4,203 and 10.5 s with the thresholds alone (``mallopt``). ``benchmarks/train_throughput.py`` (200k rows,
3 epochs, 2026-11-30): ``mmctr train`` 4,497 against 3,044 samples/s with ``train.keep_freed_memory: false``.
The heap keeps its high-water mark: the worker's peak RSS was 3,334 against 2,662 MiB in those two runs
(+25%), and it levels off: 3,550 MiB after epoch 1 and 3,558 from epoch 2 to epoch 8 of a 192-step
``mmctr train`` (freed blocks are reused, not leaked). The numbers a step computes do not change: both runs
reached the same valid AUC at every epoch (0.6460, 0.7742, 0.8173).

No Python library sets these (PyTorch's CPU allocator is plain ``malloc``; jemalloc or
tcmalloc would need ``LD_PRELOAD`` and a system package).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

ENV = "GLIBC_TUNABLES"
KEEP = 2**31 - 1  # bytes: above any one block a training step allocates
TUNABLES = {"glibc.malloc.arena_max": "1", "glibc.malloc.mmap_threshold": str(KEEP),
            "glibc.malloc.trim_threshold": str(KEEP)}

LEGACY = {"glibc.malloc.arena_max": "MALLOC_ARENA_MAX", "glibc.malloc.mmap_threshold": "MALLOC_MMAP_THRESHOLD_",
          "glibc.malloc.trim_threshold": "MALLOC_TRIM_THRESHOLD_"}  # glibc's older variables for the same settings


def glibc_tunables(existing: str | None, environ: Mapping[str, str] | None = None) -> str:
    """``GLIBC_TUNABLES`` with the settings that keep freed memory added to ``existing`` (a ``name=value:…``
    list). A setting ``existing`` already names keeps its value there; one that ``environ`` sets by its older
    variable (``MALLOC_ARENA_MAX``, ...) is written in with that variable's value: the user chose it, glibc would
    read both (the later in the environment wins), and on a cluster the variable itself does not reach the
    workers, which other nodes' raylets start with the runtime environment only. A value glibc would ignore (not
    a whole number) leaves the setting out, as glibc would have."""
    items = [item for item in (existing or "").split(":") if item]
    named = {item.split("=", 1)[0] for item in items}
    added = []
    for name, value in TUNABLES.items():
        if name in named:
            continue
        legacy = (environ or {}).get(LEGACY[name])
        if legacy is None:
            added.append(f"{name}={value}")
        elif legacy.strip().isdigit():
            added.append(f"{name}={legacy.strip()}")
    return ":".join([*items, *added])


def worker_env(keep: bool, gpu: bool, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Environment variables for the training workers: the tunables for CPU workers when ``keep``
    (``train.keep_freed_memory``), on top of the driver's ``GLIBC_TUNABLES`` and ``MALLOC_*`` in ``environ`` (this
    process's environment: a private Ray's workers inherit it, a cluster's get only what this returns); none on GPU
    workers, whose steps allocate on the device.

    Ray gives the tasks a worker starts the worker's runtime environment, so the Ray Data tasks a CPU worker runs
    itself get these tunables too (checked with Ray 2.60): rank 0's reads of the valid split, and with one worker
    the training split's reads and batching. Every throughput and memory figure since 2026-11-30 was measured so;
    what they cost or gain there on their own was not measured."""
    return {ENV: glibc_tunables(environ.get(ENV), environ)} if keep and not gpu else {}


def actor_options(keep: bool, gpu: bool, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``map_batches`` options that start Ray Data's CPU actors (and tasks) with :func:`worker_env` and ``env``: a
    ``runtime_env`` when there is something to set, else none."""
    env = {**worker_env(keep, gpu), **(env or {})}
    return {"runtime_env": {"env_vars": env}} if env else {}


def in_worker_process(fn: Callable[..., Any], args: tuple, keep: bool, gpu: bool) -> Any:
    """``fn(*args)`` in a new (spawned) process started with :func:`worker_env`, as a worker's (the benchmarks'
    plain side): glibc reads ``GLIBC_TUNABLES`` when a process starts, so setting it here would come too late."""
    import multiprocessing
    from unittest import mock

    with mock.patch.dict(os.environ, worker_env(keep, gpu)):  # ours is put back once the process has started
        pool = multiprocessing.get_context("spawn").Pool(1)
    with pool:
        return pool.apply(fn, args)
