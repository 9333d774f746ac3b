"""What rank 0 tells the user while a run trains: progress lines, metrics.jsonl, TensorBoard events."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mmctr_ray import storage
from mmctr_ray.metrics import se_text

log = logging.getLogger("mmctr.train")
PROGRESS_EVERY_S = 10.0
_WRITERS = itertools.count()  # event files this process opened
STAGING_PREFIX = "mmctr-tensorboard-"  # then "HOST-PID-" and tempfile's random part
STAGING_STALE_S = 3600.0  # a dead writer's staging folder untouched this long is removed by the next writer


def _ensure_handler() -> None:
    """Ray workers start with an unconfigured root logger: give this one a handler once."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _host() -> str:
    return os.uname().nodename.replace("-", "_") or "host"


def remove_abandoned_staging(now: float | None = None) -> list[str]:
    """Remove the TensorBoard staging folders (:class:`RunLog` of a URI run) whose writer is gone: a rank 0 worker
    Ray ended (Ctrl-C aborts the run's workers), a process killed by SIGKILL, or one that ended through ``os._exit``
    at a SIGTERM never ran its ``close``. Only folders named for
    this host whose process no longer exists and that nothing touched for ``STAGING_STALE_S`` are taken (a shared
    /tmp of another machine or container is left alone); the names removed are returned."""
    now = time.time() if now is None else now
    removed, mine = [], f"{STAGING_PREFIX}{_host()}-"
    for folder in Path(tempfile.gettempdir()).glob(f"{mine}*-*"):
        pid = folder.name[len(mine):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            touched = max([folder.stat().st_mtime, *(f.stat().st_mtime for f in folder.iterdir())])
        except OSError:  # another writer's sweep took it first
            continue
        if now - touched >= STAGING_STALE_S:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


class EventFile:
    """A TensorBoard event file whose events are on disk when :meth:`flush` returns.

    tensorboardX's ``SummaryWriter`` hands events to a thread that writes them out every ``flush_secs``, and its
    ``flush()`` does not wait for that queue: a training worker ended within those seconds of an epoch's end (Ray
    ends a pruned trial's, an interrupted run's) lost the epoch's points for good, and a URI run's upload at the end
    of each epoch missed its newest one. This writes each event synchronously (a few per epoch and one pair per
    progress line) with tensorboardX's own event-file writer and scalar summaries. It opens with TensorBoard's
    purge event at ``purge_step``: the points an earlier writer drew from that step on are hidden.
    """

    def __init__(self, logdir: str, purge_step: int, filename_suffix: str) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar

        self._event, self._scalar = Event, scalar
        os.makedirs(logdir, exist_ok=True)
        self._writer = EventsWriter(os.path.join(logdir, "events"), filename_suffix)  # with the file_version event
        self._writer.write_event(Event(wall_time=time.time(), step=purge_step,
                                       session_log=SessionLog(status=SessionLog.START)))
        self._writer.flush()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.write_event(self._event(wall_time=time.time(), step=step, summary=self._scalar(tag, float(value))))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class RunLog:
    """Progress and per-epoch records of one run (does nothing unless ``enabled``, i.e. on rank 0).

    ``RUN/metrics.jsonl`` holds one JSON object per epoch (rewritten whole each epoch, so it also works on
    object stores); ``RUN/tensorboard/`` holds event files: written there live when RUN is a local path; for a
    URI, written to a local temporary folder and uploaded at the end of every epoch (TensorBoard writes local
    files only).

    Every scalar is logged at a global step: the optimizer steps trained so far, counted from the epochs of
    ``history`` (the rows of the checkpoint this attempt continues from: each holds the steps its epoch took, so
    a run resumed with another batch size or data keeps counting where it was) plus the current epoch's
    (``epoch/*`` at the last step of its epoch). Every attempt opens its event file with TensorBoard's purge step
    just past the checkpoint's last step (step 1 when it starts from none): the points an earlier attempt wrote
    for the epochs done again (``--resume``, or a restart after a worker died, before the first checkpoint too)
    are hidden, not drawn twice.
    """

    def __init__(self, run_dir: str, enabled: bool, steps_per_epoch: int = 1,
                 history: list[dict[str, Any]] | None = None) -> None:
        self.enabled = enabled
        self.steps_per_epoch = steps_per_epoch  # an epoch's steps where a row does not say (older checkpoints)
        self._done = sum(self._steps(row) for row in history or [])  # global step at the end of the last epoch
        self._last = 0.0
        self._tb = None
        self._tb_staging: str | None = None  # local folder uploaded to RUN/tensorboard when RUN is a URI
        if not enabled:
            return
        _ensure_handler()
        # tensorboardX warns "NaN or Inf found in input tensor." for each non-finite scalar, with no name: a bare
        # line before the run's own (a diverged run's error, a row's null AUC); the value is still written
        logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

        self.run_dir = storage.normalize(run_dir)
        if storage.is_uri(self.run_dir):
            remove_abandoned_staging()
            self._tb_staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_host()}-{os.getpid()}-")
        # the file's name holds the second it was opened (tensorboardX opens it "wb"): a second writer in the same
        # second would empty the first's file without the process id and a count
        self._tb = EventFile(self._tb_staging or str(storage.join(self.run_dir, "tensorboard")),
                             purge_step=self._done + 1, filename_suffix=f".{os.getpid()}.{next(_WRITERS)}")

    def progress(self, epoch: int, step: int, steps: int, rows: int, t0: float, loss_sum: torch.Tensor) -> None:
        """Log epoch, step, samples/s and ETA every PROGRESS_EVERY_S seconds."""
        if not self.enabled or step < 2 or time.perf_counter() - self._last < PROGRESS_EVERY_S:
            return  # step 1 only measures the wait for the data pipeline
        self._last = time.perf_counter()
        elapsed = self._last - t0
        rate = rows / elapsed if elapsed > 0 else 0.0
        eta = (steps - step) * elapsed / (step - 1) if step < steps else 0.0  # t0 is step 2's start: step-1 timed
        loss = float(loss_sum) / step
        log.info("epoch %d step %d/%d loss %.4f %.0f samples/s ETA %.0fs", epoch, step, steps, loss, rate, eta)
        if self._tb is not None:
            self._tb.add_scalar("train/loss", loss, self._done + step)
            self._tb.add_scalar("train/samples_per_s", rate, self._done + step)
            self._tb.flush()

    def epoch_end(self, state: Any) -> None:
        """Record the epoch just ended (``state.history[-1]``): log line, metrics.jsonl, TensorBoard."""
        if not self.enabled:
            return
        row = state.history[-1]
        self._done += self._steps(row)
        text = "".join(storage.json_text(r) + "\n" for r in state.history)  # a NaN AUC as null: strict JSON
        storage.write_text(storage.join(self.run_dir, "metrics.jsonl"), text)
        rate = row["samples_per_s"] or 0.0
        log.info("epoch %d: train loss %.4f, valid AUC %.4f%s, logloss %.4f, lr %.1e, %.0f samples/s "
                 "(best AUC %.4f at epoch %d)", row["epoch"], row["train_loss"], row["valid_auc"],
                 se_text(row.get("valid_auc_se")), row["valid_logloss"], row["lr"], rate, state.best_auc,
                 state.best_epoch)
        if self._tb is not None:
            for key in ("train_loss", "valid_auc", "valid_auc_se", "valid_logloss", "lr", "samples_per_s"):
                if row.get(key) is not None:
                    self._tb.add_scalar(f"epoch/{key}", row[key], self._done)
            self._tb.flush()
            self._upload_tensorboard()

    def _steps(self, row: dict[str, Any]) -> int:
        return int(row.get("steps") or self.steps_per_epoch)

    def _upload_tensorboard(self) -> None:
        if self._tb_staging is not None:
            storage.upload_dir(self._tb_staging, storage.join(self.run_dir, "tensorboard"))

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        """Close on success and on a failed attempt too (TensorBoard's staging folder is uploaded and removed);
        when an error is on its way out, a failure to close does not replace it."""
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        try:
            if self._tb is not None:
                self._tb.close()
                self._upload_tensorboard()
        finally:  # an upload that failed (storage out of reach) left a mmctr-tensorboard-* folder for each attempt
            if self._tb_staging is not None:
                shutil.rmtree(self._tb_staging, ignore_errors=True)
