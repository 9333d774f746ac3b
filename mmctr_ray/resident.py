"""A training worker's shard kept on its device after the first epoch (``train.resident``).

The first epoch streams the shard from Ray Data as always and, when the shard fits the budget, copies each batch
into device memory as it goes. Every later epoch draws its batches from those tensors: a fresh uniform
permutation of the whole shard per epoch (a better shuffle than Ray Data's local buffer), gathered with
``index_select`` on the device, with no reading, decoding or host-to-device copy. That is the data path of the
"plain loop" `benchmarks/train_throughput.py` compares against. The rows are the same ones: the shard Ray Train
gave this rank in the first epoch, every row of it, including the remainder the first epoch's full batches left
out.

Why by hand: Ray Data re-executes the read and the batching every epoch (``materialize()`` caches blocks in the
object store, which still pays the per-batch conversion and copy); no library keeps a rank's shard as device
tensors across epochs.

Streaming stays the only path when the shard would not fit the budget (:func:`resident_budget`); the first
batch's size per row times the shard's expected rows decides before anything is kept, so a large split never
grows the worker's memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

MIB = 1 << 20
CPU_AUTO_MIB = 256  # auto's budget on CPU workers


V1_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as 2**63 - 1 rounded down to pages


def _stat(group: Path, keys: tuple[str, ...]) -> int:
    """The sum of ``keys`` in ``group``'s memory.stat (0 for a key it lacks, or without the file)."""
    try:
        fields = dict(line.split()[:2] for line in (group / "memory.stat").read_text().splitlines() if " " in line)
    except OSError:
        return 0
    return sum(int(fields.get(key, 0)) for key in keys)


def host_available_bytes(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory this process can still take: ``MemAvailable`` of ``/proc/meminfo``, and at most what the memory
    limits of its cgroup leave (a container's limit, which a container's ``/proc/meminfo`` does not show): in
    cgroup v2 those of its group and every group above it, in v1 its group's hierarchical limit. The page cache
    a group holds counts as free, as ``MemAvailable`` counts it (the kernel reclaims it before it fails an
    allocation), so usage is ``memory.current`` (v1: ``memory.usage_in_bytes``) less the group's file pages.
    None where none of these can be read (not Linux)."""
    found = []
    try:
        found += [int(line.split()[1]) * 1024 for line in (proc / "meminfo").read_text().splitlines()
                  if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        lines = (proc / "self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    own = next((line[3:].strip() for line in lines if line.startswith("0::")), "/")  # v2: "0::/path"
    folder = (cgroup_root / own.lstrip("/")).resolve()
    for group in [folder, *folder.parents]:
        try:
            limit = (group / "memory.max").read_text().strip()
            if limit != "max":
                used = int((group / "memory.current").read_text()) - _stat(group, ("inactive_file", "active_file"))
                found.append(max(int(limit) - used, 0))
        except (OSError, ValueError):
            pass
        if group == cgroup_root.resolve():
            break
    v1 = next((line.split(":", 2)[2].strip() for line in lines
               if line.count(":") >= 2 and "memory" in line.split(":", 2)[1].split(",")), None)  # "4:memory:/path"
    # inside a container the v1 mount is its own group, whatever path the host's view gives it
    for group in ([cgroup_root / "memory" / v1.lstrip("/"), cgroup_root / "memory"] if v1 is not None else []):
        try:
            limit = _stat(group, ("hierarchical_memory_limit",)) or int((group / "memory.limit_in_bytes").read_text())
            if limit < V1_NO_LIMIT:
                used = int((group / "memory.usage_in_bytes").read_text()) - _stat(
                    group, ("total_inactive_file", "total_active_file"))
                found.append(max(limit - used, 0))
            break
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def resident_budget(mode: str, max_mib: int, device: torch.device, deterministic: bool = False,
                    gpu_fraction: float = 1.0, host_share: int = 1) -> int:
    """Bytes this worker may keep on ``device`` (0: stream every epoch).

    ``auto``: on CUDA up to ``max_mib`` (a streamed batch costs about as much as a model step there); on CPU up
    to CPU_AUTO_MIB only (a step takes seconds, so keeping a large shard buys nothing, while Ray Data's start of
    ~3 s per epoch dominates the epochs of a small split); never in a ``deterministic`` run, whose order must not
    depend on whether a restarted worker still holds its shard. ``on``: up to ``max_mib`` on any device.
    On CUDA the budget is also at most half the device memory free now, and half of this worker's share of the
    device (``gpu_fraction`` of its memory: workers or trials given fractions of one GPU share it). On CPU it is
    also at most half the host memory available now (:func:`host_available_bytes`), split between the
    ``host_share`` training processes of this node: a shard kept there is the process's own memory."""
    if mode == "off" or (mode == "auto" and deterministic):
        return 0
    budget = max_mib * MIB
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 2, int(total * min(gpu_fraction, 1.0)) // 2)
    else:
        if mode == "auto":
            budget = min(budget, CPU_AUTO_MIB * MIB)
        available = host_available_bytes()
        if available is not None:
            budget = min(budget, available // 2 // max(host_share, 1))
    return budget


def batch_bytes(batch: dict[str, torch.Tensor]) -> int:
    return sum(t.element_size() * t.numel() for t in batch.values())


class ShardRecorder:
    """Copies the first epoch's batches into columns allocated once, at the first batch, for ``expected_rows``
    rows (no list of parts and no concatenation: the peak is the shard itself), when they fit in ``budget``."""

    def __init__(self, budget: int, expected_rows: int) -> None:
        self.budget, self.expected_rows = budget, expected_rows
        self.enabled = budget > 0
        self.reason = "train.resident is off" if not self.enabled else ""
        self.columns: dict[str, torch.Tensor] | None = None
        self.rows = 0

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        rows = len(batch["label"])
        if self.columns is None:  # decide once, from the first batch: a shard that does not fit is never collected
            need = batch_bytes(batch) // max(rows, 1) * self.expected_rows
            if need > self.budget:
                self.enabled = False
                self.reason = f"the shard (~{need / MIB:,.0f} MiB) exceeds the budget of {self.budget / MIB:,.0f} MiB"
                return
            self.columns = {k: v.new_empty((self.expected_rows, *v.shape[1:])) for k, v in batch.items()}
        if self.rows + rows > self.expected_rows:
            self.enabled, self.columns = False, None
            self.reason = f"the shard holds more than the {self.expected_rows:,} rows expected"
            return
        for key, column in self.columns.items():  # a copy: on CPU Ray Data's batches may be object-store views
            column[self.rows:self.rows + rows].copy_(batch[key])
        self.rows += rows

    def finish(self) -> ResidentShard | None:
        """The collected shard, or None (with ``reason`` saying why) when it was not kept."""
        if not self.enabled or not self.rows:
            self.reason = self.reason or "the first epoch yielded no rows"
            self.columns = None
            return None
        columns, self.columns = {k: v[:self.rows] for k, v in self.columns.items()}, None
        return ResidentShard(columns)


class ResidentShard:
    """A rank's training rows as device tensors, served as shuffled full batches."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns
        self.rows = len(columns["label"])
        self.nbytes = batch_bytes(columns)

    def steps(self, batch_size: int) -> int:
        return self.rows // batch_size

    def batches(self, batch_size: int, steps: int, seed: int | None) -> Iterator[dict[str, torch.Tensor]]:
        """``steps`` batches of ``batch_size`` rows under the permutation ``seed`` fixes (no row twice); in the
        kept order when ``seed`` is None (``train.shuffle_buffer: 0``, read order)."""
        if steps * batch_size > self.rows:
            raise ValueError(f"{steps} batches of {batch_size} rows need more than the shard's {self.rows} rows")
        if seed is None:
            for step in range(steps):
                yield {k: v[step * batch_size:(step + 1) * batch_size] for k, v in self.columns.items()}
            return
        generator = torch.Generator().manual_seed(seed)
        device = self.columns["label"].device
        order = torch.randperm(self.rows, generator=generator).to(device)
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            yield {k: v.index_select(0, idx) for k, v in self.columns.items()}

    def in_order(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every row in the kept order, ``batch_size`` at a time (the last batch may be short): for validation."""
        for lo in range(0, self.rows, batch_size):
            yield {k: v[lo:lo + batch_size] for k, v in self.columns.items()}
