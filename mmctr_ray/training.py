"""Training: pure step functions and the Ray Train per-worker loop (the driver is :mod:`train_driver`).

The schedule is the challenge baseline's: validation after every epoch; learning rate ×``lr_decay`` after a
non-improving epoch (floor ``min_lr``); stop after ``patience`` non-improving epochs; every epoch writes a
checkpoint and prediction uses the best one. Validation is exact: rank 0 scores the whole validation split
with the unwrapped model and computes AUC and logloss over all rows, then broadcasts them so every rank takes
the same schedule decision.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from mmctr_ray import storage
from mmctr_ray.checkpoint import (BEGAN, DIVERGED, PREFIX, TrainState, checkpoint_epoch, latest_checkpoint,
                                  load_checkpoint, save_checkpoint)
from mmctr_ray.config import ExperimentConfig, TrainConfig, from_dict, worker_batch
from mmctr_ray.errors import NotStarted
from mmctr_ray.features import FeatureMap, load_item_table
from mmctr_ray.metrics import evaluate_logits
from mmctr_ray.model import DINModel
from mmctr_ray.report import epoch_report
from mmctr_ray.ray_env import cpu_threads, quiet_ray_data, quiet_ray_train
from mmctr_ray.resident import MIB, ResidentShard, ShardRecorder, resident_budget
from mmctr_ray.run_log import RunLog
from mmctr_ray.store_pages import release_store_pages


log = logging.getLogger(__name__)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam or AdamW over every trainable parameter, with ``train.weight_decay`` (0 unless set: AdamW's own default
    of 0.01 was applied without a word), fused kernels on CUDA."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    extra = {"fused": True} if device.type == "cuda" else {}
    return cls([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)


def embedding_l2(tables: list[nn.Parameter], weight: float) -> torch.Tensor:
    """``weight/2 · Σ ||W||²`` over the embedding tables only (FuxiCTR's embedding regularizer)."""
    return weight / 2 * sum(w.square().sum() for w in tables)


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether ``train.precision`` asks for bf16 autocast on ``device`` (``auto``: on CUDA only)."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``train.precision`` asks for it (:func:`uses_bf16`), else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(cfg, device) else contextlib.nullcontext()


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               tables: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """One optimisation step; returns the (detached) data loss."""
    with autocast(cfg, device):
        logits = model(batch)
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["label"].float())
    total = loss + embedding_l2(tables, cfg.embedding_l2) if cfg.embedding_l2 else loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def logits_of(model: nn.Module, inputs: dict[str, torch.Tensor], cfg: TrainConfig) -> np.ndarray:
    """The model's fp32 logits for one batch, computed in ``cfg``'s precision: what AUC ranks (probabilities in
    fp32 and clipped into (0, 1) tie every logit beyond ±16, and close ones near 0 or 1)."""
    with autocast(cfg, next(model.parameters()).device):
        logits = model(inputs)
    return logits.float().cpu().numpy()


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], cfg: TrainConfig
            ) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits) over every batch (already on the model's device), in iteration order."""
    was_training = model.training
    model.eval()
    labels, logits = [], []
    for batch in batches:
        logits.append(logits_of(model, batch, cfg))
        labels.append(batch["label"].cpu().numpy())
    model.train(was_training)
    if not logits:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(labels), np.concatenate(logits)


def update_schedule(state: TrainState, auc: float, cfg: TrainConfig) -> bool:
    """Apply one epoch's validation AUC to the schedule; return True when training should stop."""
    if auc > state.best_auc:
        state.best_auc, state.best_epoch, state.bad_epochs = auc, state.epoch, 0
        return False
    state.bad_epochs += 1
    state.lr = max(state.lr * cfg.lr_decay, cfg.min_lr)
    return state.bad_epochs >= cfg.patience


def _broadcast(obj: Any) -> Any:
    """Rank 0's object on every rank (a no-op without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _late_start(run_dir: str, start_by: float) -> str | None:
    """On rank 0, as a run that must begin by ``start_by`` (wall-clock seconds since the epoch: a search's time
    budget) starts from no checkpoint: why it must not train, kept in RUN for the driver (:class:`NotStarted`), or
    None, with the start kept in RUN (:data:`BEGAN`): a run that began in time trains to its end, also where a
    worker died before its first checkpoint and the restart comes after the deadline."""
    began = storage.join(run_dir, BEGAN)
    if storage.is_file(began):
        return None
    now = time.time()
    if now < start_by:
        storage.write_text(began, f"{now:.3f}\n")
        return None
    message = (f"not started: its workers were up {now - start_by:.0f} s after the search's time budget ended "
               f"(at {time.strftime('%H:%M:%S', time.localtime(start_by))}), and no trial starts after it")
    storage.write_text(storage.join(run_dir, NotStarted.FILE), message + "\n")
    return message


def _gather(obj: Any) -> list[Any]:
    """Every rank's object, in rank order (``[obj]`` without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    box: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(box, obj)
    return box


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


class MemoryPeaks:
    """Peaks of this process's resident memory by kind, sampled from /proc/self/status (Linux; empty elsewhere):
    ``rss`` the whole resident set, ``anon`` memory the process allocated itself, ``shmem`` the shared pages it
    maps (Ray's object store: blocks read zero-copy), which RSS counts too although no process owns them alone.
    The training loop samples just before it releases the store's pages (:mod:`store_pages`), so ``rss`` holds
    the highest level between two releases even where the kernel's high-water mark (ru_maxrss) misses it."""

    FIELDS = {"VmRSS:": "rss", "RssAnon:": "anon", "RssShmem:": "shmem"}

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}

    def sample(self) -> None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    key = self.FIELDS.get(line.split(":", 1)[0] + ":")
                    if key:
                        mib = int(line.split()[1]) / 1024
                        self.peaks[key] = max(self.peaks.get(key, 0.0), mib)
        except OSError:
            pass


def _worker_row(memory: MemoryPeaks) -> dict[str, list[float]]:
    """Per-rank figures for metrics.jsonl: ``worker_threads`` (torch's), ``worker_peak_rss_mib`` (the larger of
    getrusage's and the sampled peak) and, where /proc tells, ``worker_peak_anon_mib`` and
    ``worker_peak_shmem_mib``."""
    memory.sample()
    ranks = _gather({**memory.peaks, "rss": max(peak_rss_mib(), memory.peaks.get("rss", 0.0)),
                     "threads": torch.get_num_threads()})
    return {"worker_threads": [r.pop("threads") for r in ranks],
            **{f"worker_peak_{k}_mib": [round(r[k], 1) for r in ranks] for k in ranks[0]}}


def _resume_point(resume_from: str | None) -> tuple[Any, int]:
    """Where this attempt resumes and the epoch that checkpoint holds: Ray Train's registered checkpoint (after a
    worker restart, in this run), or ``resume_from``, or ``(None, 0)`` for a fresh start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()  # the latest Ray Train registered: after a worker restart, in this run
    # ``resume_from`` is the latest complete one in RUN, which is newer when the last run was stopped (Ctrl-C), or
    # this run's worker died, after a worker wrote its checkpoint and before Ray Train registered it (the
    # controller learns of a report at its next poll of the worker: a worker killed soon after its report
    # restarted from the epoch before, or from scratch)
    newer = resume_from and ckpt and (checkpoint_epoch(resume_from) or 0) > (checkpoint_epoch(ckpt.path) or 0)
    if ckpt and not newer:
        return ckpt, checkpoint_epoch(ckpt.path) or 0
    return (resume_from, checkpoint_epoch(resume_from) or 0) if resume_from else (None, 0)


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, resume_from: str | None,
             cfg: TrainConfig, lr_at: int | None = None, verbose: bool = True) -> TrainState | None:
    """Load :func:`_resume_point`'s checkpoint into ``model`` and ``optimizer``; its state, or None (a fresh start).
    ``lr_at``, ``verbose``: :func:`load_into`'s."""
    source, _ = _resume_point(resume_from)
    context = source.as_directory() if hasattr(source, "as_directory") else contextlib.nullcontext(source)
    with context as directory:
        return None if directory is None else load_into(model, optimizer, directory, cfg, lr_at, verbose,
                                                        shown=_checkpoint_name(source))


def _checkpoint_name(source: Any) -> str:
    """A resume point as the log names it: Ray Train's checkpoint by its place in storage (``as_directory`` gives a
    temporary copy of a remote one), with the storage's scheme where it has one (``s3://...``)."""
    if not hasattr(source, "path"):
        return str(source)
    filesystem = getattr(source, "filesystem", None)
    wrapped = getattr(getattr(filesystem, "handler", None), "fs", None)  # an fsspec one (abfs://, memory://, ...)
    if wrapped is not None and hasattr(wrapped, "unstrip_protocol"):
        return wrapped.unstrip_protocol(source.path)
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}.get(getattr(filesystem, "type_name", "local"))
    return f"{scheme}://{source.path}" if scheme else source.path


class EarlyBatches:
    """``batches`` with its first item fetched from construction on, in a thread of its own: the Ray Data pipeline
    starts while the caller builds its model and optimizer.

    A training worker's first batch of a fresh Ray came 3.3 s after the set-up, which itself took ~2.4 s, nearly all
    of it the first ``torch.optim`` call importing ``torch._dynamo`` (2-core VM, 2026-12-01). Iterating yields the
    first item (raising what fetching it raised) and then the rest; :meth:`close` ends a stream that is not
    wanted after all."""

    _END = object()

    def __init__(self, batches: Iterator[Any]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._batches = batches
        pool = ThreadPoolExecutor(1, thread_name_prefix="mmctr-first-batch")
        self._first = pool.submit(next, batches, self._END)
        pool.shutdown(wait=False)

    def __iter__(self) -> Iterator[Any]:
        first = self._first.result()
        if first is not self._END:
            yield first
            yield from self._batches

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the stream is dropped: what reading it raised no longer matters
            self._first.result()
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()


def _report_unheard(history: list[dict[str, Any]] | None, heard: int, rank: int) -> None:
    """Report again the epochs after ``heard`` that the restored checkpoint has done: a worker that died after
    writing an epoch's checkpoint and before Ray Train's controller took its report (at its next poll) left that
    report unheard, and a Tune trial (``mmctr tune``) learns of its epochs from these reports. The last of them
    carries its checkpoint, already in RUN (not copied again), so that Ray Train registers it: a second restart
    then finds it registered and says nothing twice."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    unheard = [row for row in history or [] if row["epoch"] > heard]
    for row in unheard:
        checkpoint = None
        if rank == 0 and row is unheard[-1]:
            where = ray.train.get_context().get_storage()  # Ray Train's own filesystem and path of RUN
            checkpoint = Checkpoint(f"{where.experiment_fs_path}/{PREFIX}{row['epoch']:03d}",
                                    filesystem=where.storage_filesystem)
        ray.train.report(epoch_report(row, history), checkpoint=checkpoint,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def load_into(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path,
              cfg: TrainConfig, lr_at: int | None = None, verbose: bool = True, shown: str | None = None
              ) -> TrainState:
    """Load a checkpoint's model and optimizer state; return its training state.

    The optimizer keeps the checkpoint's moments but this run's settings (``optimizer.load_state_dict`` would also
    bring back the saved ones: a run resumed with another optimizer, or moved from CPU to CUDA, silently kept the
    old weight decay or kernels). The learning rate stays the schedule's (``state.lr``) unless this run's
    ``train.lr`` differs from the checkpoint's, or the checkpoint is of epoch ``lr_at`` (where a ``--resume`` given
    ``--set train.lr=...`` continues, the run's own rate too: it stayed at the decayed one): the run continues at
    ``train.lr``. A rate below this run's ``train.min_lr`` (a resume that raised the floor) continues at the floor
    (it trained an epoch below it, until a "decay" raised it there). A worker restarted later in the run takes its
    checkpoint's schedule. ``verbose``: say so in the log (rank 0), naming the checkpoint ``shown`` (default:
    ``directory``)."""
    loaded = load_checkpoint(directory)
    model.load_state_dict(loaded.model_state)
    if loaded.optimizer_state is not None:
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(loaded.optimizer_state)
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
            if group.get("fused") or group.get("capturable"):  # torch placed "step" by the *saved* group's policy:
                for p in group["params"]:  # a CPU run's stays a CPU tensor, which the fused CUDA kernel refuses
                    state = optimizer.state.get(p, {})
                    if torch.is_tensor(state.get("step")):
                        state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
    state = loaded.state
    if cfg.lr != loaded.cfg.train.lr or (lr_at is not None and state.epoch == lr_at and state.lr != cfg.lr):
        if verbose:
            log.info("train.lr is %g in this run and %g in the checkpoint: continuing at %g (the schedule was at %g)",
                     cfg.lr, loaded.cfg.train.lr, cfg.lr, state.lr)
        state.lr = cfg.lr
    if state.lr < cfg.min_lr:  # a resume that raised the floor above the schedule's rate continues at the floor
        if verbose:
            log.info("train.min_lr is %g in this run: continuing at %g (the schedule was at %g)", cfg.min_lr,
                     cfg.min_lr, state.lr)
        state.lr = cfg.min_lr
    if verbose:
        log.info("resumed from %s (epoch %d done)", shown or directory, state.epoch)
    return state


def _maybe_fault(faults: list[dict[str, Any]] | None, rank: int, **where: int) -> None:
    """Fault injection for the recovery tests: kill this worker process, once per fault, when it is the fault's
    ``rank``, at a given ``step`` or right after its ``report`` of a given epoch (``where`` says which of the two
    this call is)."""
    for fault in faults or []:
        if fault["rank"] == rank and all(fault.get(k) == v for k, v in where.items()) \
                and not Path(fault["marker"]).exists():
            Path(fault["marker"]).write_text("killed\n")
            os._exit(1)


def _streamed_batches(shard: Any, per_worker: int, device: torch.device, cfg: TrainConfig, epoch: int,
                      recorder: ShardRecorder, rank: int = 0) -> Iterable[dict[str, torch.Tensor]]:
    """One epoch of full batches from this rank's Ray Data shard, each handed to ``recorder`` on the way; while
    it records, the last partial batch is read too (kept, not trained on), so the kept shard lacks no row."""
    batches = shard.iter_torch_batches(
        batch_size=per_worker, device=device, drop_last=not recorder.enabled, prefetch_batches=2,
        local_shuffle_buffer_size=cfg.shuffle_buffer or None, local_shuffle_seed=shuffle_seed(cfg.seed, rank, epoch))
    for batch in _recorded(batches, recorder):
        if len(batch["label"]) == per_worker:
            yield batch


def _recorded(batches: Iterable[dict[str, torch.Tensor]],
              recorder: ShardRecorder) -> Iterable[dict[str, torch.Tensor]]:
    """``batches`` unchanged, each handed to ``recorder`` first."""
    for batch in batches:
        recorder.add(batch)
        yield batch


def _releasing(batches: Iterable[dict[str, torch.Tensor]], memory: MemoryPeaks,
               every: int = 16) -> Iterable[dict[str, torch.Tensor]]:
    """``batches`` unchanged; after the first and every ``every``-th after it, once its consumer is done with it,
    the memory peaks are sampled and the object store's pages this process mapped are released
    (ray-project/ray#65544): the training loop's batches and the validation split's (read zero-copy each epoch
    where it is not kept: it stayed mapped until the next epoch's first step, and in the peaks)."""
    for i, batch in enumerate(batches):
        yield batch
        if i % every == 0:
            memory.sample()
            release_store_pages()


def _keep_shard(recorder: ShardRecorder, per_worker: int, rank: int) -> tuple[ResidentShard | None, int]:
    """After a streamed epoch: the shard every later epoch trains from, and its steps per epoch (the same on
    every rank, or DDP would wait forever), or (None, 0) when any rank could not keep its shard."""
    shard = recorder.finish()
    steps = min(_gather(shard.steps(per_worker) if shard is not None else 0))
    if steps == 0:
        if rank == 0:
            why = recorder.reason if shard is None else "a rank kept no shard, or one smaller than a batch"
            log.info("streaming the training split every epoch: %s", why)
        return None, 0
    if rank == 0:
        log.info("keeping the training shard on %s for the next epochs: %d rows, %.0f MiB",
                 shard.columns["label"].device, shard.rows, shard.nbytes / MIB)
    return shard, steps


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA step returns before its kernels end): a clock read after it
    times the work, not its launch. Nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed torch's generators (the dropout masks) for one rank's epoch from ``(seed, rank, epoch)`` alone.

    Each rank of several draws its own masks (one stream for all gave every rank the same masks on its different
    rows), and an epoch draws the same masks however the run got there: a run resumed with ``--resume`` or
    restarted after a worker died starts the epoch where an uninterrupted run does, so in a deterministic run it
    repeats that run bit for bit. The model is built from ``seed`` before this (the same initial weights on every
    rank)."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, np.uint64)[0] >> 1))


def begin_epoch(optimizer: torch.optim.Optimizer, state: TrainState, seed: int, rank: int) -> int:
    """Start the epoch after ``state.epoch`` and return its number: the optimizer takes the schedule's rate
    (``state.lr``, lowered after non-improving epochs; the rate metrics.jsonl reports is the one it steps with),
    and torch's generators this rank's seed for the epoch (:func:`seed_epoch`)."""
    for group in optimizer.param_groups:
        group["lr"] = state.lr
    epoch = state.epoch + 1
    seed_epoch(seed, rank, epoch)  # after the model: the same initial weights on every rank
    return epoch


def mean_epoch_loss(loss_sum: torch.Tensor, steps: int, world: int) -> float:
    """The epoch's train loss from this rank's sum of step losses: the mean over every rank's steps, not rank 0's
    alone (one all-reduce per epoch, with ``world`` > 1), the same figure on every rank."""
    if world > 1:
        torch.distributed.all_reduce(loss_sum)
        loss_sum = loss_sum / world
    return float(loss_sum) / max(steps, 1)


def shuffle_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one rank's shuffle in one epoch (Ray Data's local shuffle buffer, or the kept shard's order), from
    ``(seed, rank, epoch)`` as :func:`seed_epoch`'s: with ``seed + epoch`` every rank shuffled its rows by the same
    permutation, so one global step took the rows at the same places of every shard, epoch after epoch."""
    return int(np.random.SeedSequence([seed, rank, epoch, 1]).generate_state(1)[0])


def kept_batches(shard: ResidentShard, per_worker: int, steps: int, cfg: TrainConfig, rank: int,
                 epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of ``steps`` batches from a rank's kept shard: in this rank's own permutation of the epoch
    (:func:`shuffle_seed`), or in read order with ``shuffle_buffer: 0``."""
    return shard.batches(per_worker, steps, shuffle_seed(cfg.seed, rank, epoch) if cfg.shuffle_buffer else None)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: ``config`` holds the resolved config, paths and the feature map."""
    import ray.train
    import ray.train.torch

    quiet_ray_data(config.get("verbose", False))
    quiet_ray_train(config.get("verbose", False))
    cfg: ExperimentConfig = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # Ray sets 1 thread per logical CPU requested: share this node's cores instead, with
        # this run's other workers there and, in a search, the other trials' (`runs_per_node`)
        torch.set_num_threads(cpu_threads(ctx.get_local_world_size() * config.get("runs_per_node", 1)))
    # the newest complete checkpoint in RUN (which starts empty unless resumed), as rank 0 sees it: every rank
    # starts from the same one even where a shared file system shows a new file to some nodes later than others
    latest = _broadcast(str(latest_checkpoint(config["run_dir"]) or "") if rank == 0 else None) or None
    if config.get("start_by") is not None and not latest:  # a search's trial, whose workers may have waited for
        # resources past its time budget (on a cluster, trials beyond what fits wait for the autoscaler): rank 0
        # decides for every rank, as they may read the clock on either side of the deadline
        if _broadcast(_late_start(config["run_dir"], config["start_by"]) if rank == 0 else None):
            return  # the driver raises NotStarted; the search's progress line says it
    per_worker = worker_batch(cfg.train.batch_size, world)
    steps_per_epoch = max(1, config["train_rows"] // (per_worker * world))
    budget = resident_budget(cfg.train.resident, cfg.train.resident_max_mib, device, cfg.train.deterministic,
                             config.get("gpus_per_worker") or 1.0,
                             ctx.get_local_world_size() * config.get("runs_per_node", 1))

    def stream(epoch: int, keep_budget: int) -> tuple[ShardRecorder, Iterator[dict[str, torch.Tensor]]]:
        """Epoch ``epoch`` streamed from this rank's shard, recorded for keeping within ``keep_budget`` bytes,
        unless it is the schedule's last epoch (no later epoch would train from the copy: a one-epoch run)."""
        keep_budget = keep_budget if epoch < cfg.train.epochs else 0
        recorder = ShardRecorder(keep_budget, -(-config["train_rows"] // world))
        return recorder, _streamed_batches(ray.train.get_dataset_shard("train"), per_worker, device, cfg.train,
                                           epoch, recorder, rank)

    first_epoch = _resume_point(latest)[1] + 1
    early = None  # the first epoch of this attempt starts streaming now, while the model is built (EarlyBatches)
    if first_epoch <= cfg.train.epochs:
        early_recorder, early_batches = stream(first_epoch, budget)
        early = (first_epoch, early_recorder, EarlyBatches(early_batches))
    torch.manual_seed(cfg.train.seed)  # the stream's thread draws nothing from torch's generators
    table = load_item_table(config["data_dir"], cfg.data.item_vector)
    fmap = FeatureMap(**config["feature_map"])
    model = DINModel(cfg.model, fmap, **table.to_torch(device)).to(device)
    optimizer = make_optimizer(model, cfg.train, device)
    state = _restore(model, optimizer, latest, cfg.train, config.get("start_epoch") if config.get("lr_set") else None,
                     verbose=rank == 0) or TrainState(lr=cfg.train.lr)
    resumed_from = state.epoch  # 0: a fresh start
    registered = ray.train.get_checkpoint()  # the same on every rank
    _report_unheard(state.history, max(config.get("start_epoch", 0),
                                       (checkpoint_epoch(registered.path) or 0) if registered else 0), rank)
    tables = model.embedding_tables()
    if world > 1:  # the item table is the same on every rank: keep DDP from broadcasting it every step
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, ["item_embedding.item_tags", "item_embedding.item_vectors"])
    ddp = ray.train.torch.prepare_model(model) if world > 1 else model
    run_log = RunLog(config["run_dir"], enabled=rank == 0, steps_per_epoch=steps_per_epoch, history=state.history)
    stop = state.bad_epochs >= cfg.train.patience  # a resumed run that had already stopped early stays stopped
    if early is not None and (stop or early[0] != state.epoch + 1):  # no epoch to train, or not that one
        early[2].close()
        early = None
    memory = MemoryPeaks()
    if rank == 0 and cfg.train.resident == "on" and cfg.train.deterministic and cfg.train.shuffle_buffer:
        log.warning("train.resident=on in a deterministic run: a restarted worker streams the epoch it resumes in, "
                    "so its order differs from an uninterrupted run's, which shuffles the kept shard (auto keeps "
                    "nothing in deterministic runs; with train.shuffle_buffer=0 both keep the read order)")
    shard: ResidentShard | None = None
    resident_steps, keep_tried = 0, False
    valid_kept: ResidentShard | None = None
    with run_log:  # closed on a failed attempt too
        while state.epoch < cfg.train.epochs and not stop:
            epoch = begin_epoch(optimizer, state, cfg.train.seed, rank)
            recorder = None
            if early is not None and early[0] == epoch:  # the stream started during the set-up
                _, recorder, batches = early
                early = None
            elif shard is None:  # keep it while streaming, the first time only (a shard not kept stays streamed)
                recorder, batches = stream(epoch, 0 if keep_tried else budget)
            else:
                batches = kept_batches(shard, per_worker, resident_steps, cfg.train, rank, epoch)
            resident = recorder is None
            start = time.perf_counter()
            t0, rows, step, loss_sum = start, 0, 0, torch.zeros((), device=device)
            # ~16 batches of store pages at most stay mapped (ray-project/ray#65544), as in the validation pass
            for step, batch in enumerate(_releasing(batches, memory), start=1):
                loss_sum += train_step(ddp, batch, optimizer, tables, cfg.train, device)
                rows += len(batch["label"]) * world
                _maybe_fault(config.get("fault"), rank, step=(epoch - 1) * steps_per_epoch + step)
                run_log.progress(epoch, step, resident_steps if resident else steps_per_epoch, rows, t0, loss_sum)
                if step == 1:  # the steady rate: from the end of the first step (which waits for the pipeline),
                    _synchronize(device)  # the second batch's fetch included; its GPU work done first
                    t0, rows = time.perf_counter(), 0
            _synchronize(device)  # the last step's GPU work inside the epoch's time
            seconds = time.perf_counter() - t0
            epoch_seconds = time.perf_counter() - start
            train_loss = mean_epoch_loss(loss_sum, step, world)
            if recorder is not None and not keep_tried and epoch < cfg.train.epochs:
                shard, resident_steps = _keep_shard(recorder, per_worker, rank)
                keep_tried = True
            diverged = None if math.isfinite(train_loss) else f"train loss {train_loss} in epoch {epoch}"
            metrics = None
            if rank == 0 and diverged is None:
                if valid_kept is not None:
                    labels, logits = predict(model, valid_kept.in_order(cfg.train.eval_batch_size), cfg.train)
                else:  # read it; keep it in read order when the training shard was kept and the budget's rest allows
                    valid_recorder = ShardRecorder(budget - shard.nbytes if shard else 0, config["valid_rows"])
                    valid = ray.train.get_dataset_shard("valid").iter_torch_batches(
                        batch_size=cfg.train.eval_batch_size, device=device)
                    labels, logits = predict(model, _recorded(_releasing(valid, memory), valid_recorder), cfg.train)
                    valid_kept = valid_recorder.finish()
                bad = int((~np.isfinite(logits)).sum())
                metrics = {"diverged": f"{bad:,} non-finite predictions on the valid split after epoch {epoch}"} \
                    if bad else evaluate_logits(labels, logits)
            metrics = _broadcast(metrics)
            diverged = diverged or (metrics or {}).get("diverged")
            if diverged:  # every rank ends here, together, and the driver raises: a retry would diverge again
                fix = "lower train.lr" + ("" if cfg.train.grad_clip else " or set train.grad_clip")
                if "predictions" in diverged and uses_bf16(cfg.train, device):
                    fix += " or set train.precision=fp32 (the train loss was finite: bf16 inference overflowed)"
                again = shlex.join(["mmctr", "train", "--data", config["data_dir"], "--out", config["run_dir"],
                                    "--resume", "--set", "train.lr=..."])
                message = f"training diverged: {diverged} (lr {state.lr:g}); " + (
                    f"the checkpoints of epochs 1-{state.epoch} are kept: {fix} (`{again}` continues from the "
                    f"last)" if state.epoch else f"{fix} and start again")
                if rank == 0:
                    log.error(message)
                    storage.write_text(storage.join(config["run_dir"], DIVERGED), message + "\n")
                return
            state.epoch = epoch
            row = {"epoch": epoch, "train_loss": train_loss, "valid_auc": metrics["auc"],
                   "valid_auc_se": metrics["auc_se"], "valid_logloss": metrics["logloss"],
                   "valid_rows": metrics["rows"], "lr": state.lr,
                   "samples_per_s": rows / seconds if seconds > 0 and step > 1 else None,
                   "steady_seconds": seconds if step > 1 else None, "epoch_seconds": epoch_seconds, "steps": step,
                   "resident": resident,
                   "resident_rows": shard.rows if shard is not None else None, "resumed_from_epoch": resumed_from,
                   **_worker_row(memory)}
            stop = update_schedule(state, metrics["auc"], cfg.train)
            state.history = [*(state.history or []), row]
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    save_checkpoint(Path(tmp), model, optimizer, state, cfg, fmap, table.source)
                    run_log.epoch_end(state)
                checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
                ray.train.report(epoch_report(row, state.history), checkpoint=checkpoint,
                                 checkpoint_dir_name=f"{PREFIX}{epoch:03d}")
            _maybe_fault(config.get("fault"), rank, report=epoch)
