"""The training shard kept on the worker's device after the first epoch (mmctr_ray.resident)."""

from __future__ import annotations

import pytest
import torch

from mmctr_ray.config import ConfigError, load_config
from mmctr_ray import resident
from mmctr_ray.resident import (CPU_AUTO_MIB, MIB, ResidentShard, ShardRecorder, host_available_bytes,
                                 resident_budget)


def stream(rows: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """Batches the way Ray Data hands them out: full ones, then the remainder; row r carries id r."""
    ids = torch.arange(rows)
    return [{"item_id": ids[lo:lo + batch], "item_seq": ids[lo:lo + batch, None].repeat(1, 4),
             "label": (ids[lo:lo + batch] % 2).float()} for lo in range(0, rows, batch)]


def test_recorder_keeps_every_row_including_the_remainder():
    recorder = ShardRecorder(budget=1 << 30, expected_rows=103)
    for b in stream(103, 10):
        recorder.add(b)
    shard = recorder.finish()
    assert shard is not None and shard.rows == 103
    assert torch.equal(shard.columns["item_id"], torch.arange(103))
    assert torch.equal(shard.columns["item_seq"][:, 0], torch.arange(103))
    assert shard.nbytes == 103 * (8 + 4 * 8 + 4)


def test_recorder_copies_cpu_batches():  # Ray Data's CPU batches may be views of object-store blocks
    batch = stream(8, 8)[0]
    recorder = ShardRecorder(budget=1 << 30, expected_rows=8)
    recorder.add(batch)
    batch["item_id"].fill_(-1)
    assert torch.equal(recorder.finish().columns["item_id"], torch.arange(8))


def test_recorder_keeps_nothing_when_the_shard_exceeds_the_budget():
    per_row = 8 + 4 * 8 + 4
    recorder = ShardRecorder(budget=1000 * per_row - 1, expected_rows=1000)
    for b in stream(1000, 100):
        recorder.add(b)
    assert not recorder.enabled and recorder.columns is None  # decided at the first batch: nothing was collected
    assert recorder.finish() is None and "exceeds the budget" in recorder.reason
    fits = ShardRecorder(budget=1000 * per_row, expected_rows=1000)
    for b in stream(1000, 100):
        fits.add(b)
    assert fits.finish().rows == 1000


def test_recorder_gives_up_on_more_rows_than_expected():
    recorder = ShardRecorder(budget=1 << 30, expected_rows=95)
    for b in stream(103, 10):
        recorder.add(b)
    assert recorder.finish() is None and "more than the 95 rows expected" in recorder.reason


def test_recorder_off_and_empty_shards():
    off = ShardRecorder(budget=0, expected_rows=10)
    off.add(stream(10, 10)[0])
    assert off.finish() is None and off.reason == "train.resident is off"
    empty = ShardRecorder(budget=1 << 20, expected_rows=10)
    assert empty.finish() is None and "no rows" in empty.reason


def test_resident_batches_are_a_fresh_permutation_each_epoch():
    shard = ResidentShard({k: torch.cat([b[k] for b in stream(1000, 64)]) for k in ("item_id", "item_seq", "label")})
    steps = shard.steps(64)
    assert steps == 15
    epochs = [list(shard.batches(64, steps, seed)) for seed in (1, 2, 1)]
    for batches in epochs:
        assert len(batches) == steps and all(len(b["label"]) == 64 for b in batches)
        seen = torch.cat([b["item_id"] for b in batches])
        assert len(set(seen.tolist())) == steps * 64  # no row twice in an epoch
        for b in batches:  # every column gathered with the same rows
            assert torch.equal(b["item_seq"][:, 3], b["item_id"])
            assert torch.equal(b["label"], (b["item_id"] % 2).float())
    ids = [torch.cat([b["item_id"] for b in batches]) for batches in epochs]
    assert torch.equal(ids[0], ids[2]) and not torch.equal(ids[0], ids[1])  # the seed fixes the order
    assert not torch.equal(ids[0][:64], torch.arange(64))  # shuffled, not read order
    with pytest.raises(ValueError, match="need more than the shard's 1000 rows"):
        next(shard.batches(64, 16, 0))


def test_read_order_without_a_seed_and_in_order_for_validation():
    shard = ResidentShard({k: torch.cat([b[k] for b in stream(100, 64)]) for k in ("item_id", "item_seq", "label")})
    assert [b["item_id"].tolist() for b in shard.batches(30, 3, seed=None)] == [
        list(range(0, 30)), list(range(30, 60)), list(range(60, 90))]  # train.shuffle_buffer: 0 keeps read order
    assert [len(b["label"]) for b in shard.in_order(40)] == [40, 40, 20]
    assert torch.equal(torch.cat([b["item_id"] for b in shard.in_order(40)]), torch.arange(100))


def test_cuda_budget_is_half_the_free_memory_and_of_the_worker_share(monkeypatch):
    gib = 1 << 30
    free = {"now": 10 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["now"], 80 * gib))
    cuda = torch.device("cuda", 0)
    assert resident_budget("auto", 8192, cuda) == 5 * gib  # half of what is free
    free["now"] = 60 * gib
    assert resident_budget("auto", 8192, cuda) == 8 * gib  # train.resident_max_mib
    assert resident_budget("auto", 8192, cuda, gpu_fraction=0.1) == 4 * gib  # half of a 0.1 share of 80 GiB
    assert resident_budget("auto", 8192, cuda, deterministic=True) == 0


def test_host_memory_is_what_meminfo_and_every_cgroup_limit_above_leave(tmp_path):
    gib = 1 << 30
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {32 * gib >> 10} kB\nMemAvailable: {10 * gib >> 10} kB\n")
    (proc / "self/cgroup").write_text("0::/kubepods/pod1/ray\n")
    pod, own = root / "kubepods/pod1", root / "kubepods/pod1/ray"
    own.mkdir(parents=True)
    for group, limit, current in [(root / "kubepods", "max", 9 * gib), (pod, 4 * gib, 1 * gib), (own, "max", gib)]:
        (group / "memory.max").write_text(f"{limit}\n")
        (group / "memory.current").write_text(f"{current}\n")
    assert host_available_bytes(proc, root) == 3 * gib  # the pod's limit, two levels up, leaves 3 of the 10 GiB
    (pod / "memory.current").write_text(f"{4 * gib}\n")  # at its limit, but half of it the page cache of files read
    (pod / "memory.stat").write_text(f"anon {2 * gib}\nfile {2 * gib}\nactive_file {gib}\ninactive_file {gib}\n")
    assert host_available_bytes(proc, root) == 2 * gib  # the cache counts as free, as MemAvailable counts it
    (pod / "memory.max").write_text("max\n")
    assert host_available_bytes(proc, root) == 10 * gib  # no limit: what the machine has available
    (pod / "memory.max").write_text(f"{gib}\n")
    assert host_available_bytes(proc, root) == 0  # over its limit already: nothing left, never negative
    assert host_available_bytes(tmp_path / "none", tmp_path / "none") is None  # nothing readable: no cap


def test_host_memory_under_a_cgroup_v1_limit(tmp_path):
    """cgroup v1 (and hybrid hosts, whose /proc/self/cgroup also has a "0::/" line): the memory controller's own
    hierarchy, its hierarchical limit, and the group's path as the host names it or the container's own mount."""
    gib = 1 << 30
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemAvailable: {10 * gib >> 10} kB\n")
    (proc / "self/cgroup").write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    mount = root / "memory"  # inside the container: its own group is the mount, /docker/abc is the host's path
    mount.mkdir(parents=True)
    (mount / "memory.limit_in_bytes").write_text(f"{9223372036854771712}\n")
    (mount / "memory.usage_in_bytes").write_text(f"{3 * gib}\n")
    (mount / "memory.stat").write_text(f"hierarchical_memory_limit {6 * gib}\ntotal_active_file {gib}\n"
                                       f"total_inactive_file {0}\n")
    assert host_available_bytes(proc, root) == 4 * gib  # 6 GiB limit (a parent's), 3 used less 1 of file cache
    host_view = mount / "docker/abc"  # on the host the group's own folder is found first
    host_view.mkdir(parents=True)
    (host_view / "memory.limit_in_bytes").write_text(f"{2 * gib}\n")
    (host_view / "memory.usage_in_bytes").write_text(f"{gib}\n")
    (host_view / "memory.stat").write_text("total_active_file 0\n")
    assert host_available_bytes(proc, root) == gib
    (host_view / "memory.limit_in_bytes").write_text(f"{9223372036854771712}\n")
    assert host_available_bytes(proc, root) == 10 * gib  # no limit: MemAvailable


def test_cpu_budget_is_at_most_half_the_host_memory_split_between_its_workers(monkeypatch):
    cpu, gib = torch.device("cpu"), 1 << 30
    monkeypatch.setattr(resident, "host_available_bytes", lambda: 6 * gib)
    assert resident_budget("on", 8192, cpu) == 3 * gib  # not 8 GiB: half of the 6 available
    assert resident_budget("on", 8192, cpu, host_share=3) == gib  # three training processes on this node
    assert resident_budget("on", 1024, cpu, host_share=3) == gib  # train.resident_max_mib below the cap
    assert resident_budget("auto", 8192, cpu) == CPU_AUTO_MIB * MIB  # auto's own cap is lower
    assert resident_budget("auto", 8192, cpu, host_share=24) == 128 * MIB  # 6 GiB / 2 / 24 is lower still
    monkeypatch.setattr(resident, "host_available_bytes", lambda: None)  # not Linux: the configured budget
    assert resident_budget("on", 8192, cpu) == 8192 * MIB


def test_budget_by_mode_and_device(monkeypatch):
    monkeypatch.setattr(resident, "host_available_bytes", lambda: None)  # this machine's free memory aside
    cpu = torch.device("cpu")
    assert resident_budget("off", 1024, cpu) == 0
    assert resident_budget("auto", 1024, cpu) == CPU_AUTO_MIB * MIB  # small shards only on CPU
    assert resident_budget("auto", 100, cpu) == 100 * MIB
    assert resident_budget("auto", 1024, cpu, deterministic=True) == 0
    assert resident_budget("on", 1024, cpu) == resident_budget("on", 1024, cpu, deterministic=True) == 1024 * MIB


def test_config_checks_the_resident_keys():
    assert load_config("configs/tiny.yaml", ["train.resident=off"]).train.resident == "off"
    with pytest.raises(ConfigError, match=r"train.resident='yes': expected one of auto, on, off"):
        load_config("configs/tiny.yaml", ["train.resident=yes"])
    with pytest.raises(ConfigError, match=r"train\.resident_max_mib=-1: expected >= 0 MiB"):
        load_config("configs/tiny.yaml", ["train.resident_max_mib=-1"])


def test_a_kept_shard_holds_the_rows_it_got_and_every_rank_steps_as_the_smallest(monkeypatch):
    """Ray's equal split can give a rank fewer rows than expected_rows (a ceiling): a mutation that kept the
    uninitialised rest passed; and one that let every rank step as the largest kept shard (the smaller rank then
    fails after Ray started)."""
    import mmctr_ray.training as training
    from mmctr_ray.resident import ShardRecorder

    recorder = ShardRecorder(budget=1 << 20, expected_rows=10)
    recorder.add({"label": torch.ones(9), "item_id": torch.arange(9)})
    shard = recorder.finish()
    assert shard.rows == 9 and len(shard.columns["item_id"]) == 9
    recorder = ShardRecorder(budget=1 << 20, expected_rows=50)
    recorder.add({"label": torch.ones(50), "item_id": torch.arange(50)})
    monkeypatch.setattr(training, "_gather", lambda obj: [obj, 2])  # the other rank holds 2 batches
    assert training._keep_shard(recorder, 10, rank=1)[1] == 2
