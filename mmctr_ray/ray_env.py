"""Starting or joining Ray, in one place (the CLI and jobs call it; library code never does)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

from mmctr_ray.errors import ConfigError, first_line

log = logging.getLogger(__name__)

MIN_OBJECT_STORE_MIB = 100  # a smaller store leaves Ray Data too little room to stream blocks


PROGRESS_BARS_OFF_KEY = "ray_data_progress_manager_disabled"


def quiet_ray_data(verbose: bool = False) -> None:
    """Ray Data logs every operator's progress at INFO when stderr is not a terminal: keep that for -v.

    Our stages report their own progress (rows, rows/s) instead.
    """
    if not verbose:
        import ray.data
        from ray.util.debug import log_once

        ctx = ray.data.DataContext.get_current()  # travels with each dataset, to a split coordinator's process too
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False  # "Starting execution of Dataset ...", "Execution plan of ...", per run
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Ray Data warns once per process that the bars are off ("Progress bars disabled. To enable, ..."): we turn
        # them off on purpose, so take its once-only key first (Ray 2.60's name; another name only brings it back)
        log_once(PROGRESS_BARS_OFF_KEY)
        hide_ray_data_lines()


def quiet_ray_train(verbose: bool = False) -> None:
    """In a Train worker: Ray Train logs two INFO lines per epoch (the checkpoint's path, then the whole report);
    keep them for -v. The run's own epoch line says what happened."""
    if not verbose:
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        try:  # Ray 2.60 names the logger of the report line by its module's file path, outside "ray.train"
            from ray.train.v2._internal.execution import context
        except ImportError:
            return
        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def node_cores() -> int:
    """The cores this process may run on: Ray's count of the node's CPUs (a container's CPU quota, a Kubernetes
    ``limits: {cpu: N}``, and its cpuset included, as :func:`init_ray` counts them), fewer where this process's CPU
    affinity (``taskset``) says so. ``os.cpu_count()`` counts the host's cores in a container: a pod limited to 8
    CPUs on a 96-core node would run 96 torch threads on 8 cores' worth of time."""
    from ray._private.utils import get_num_cpus  # Ray's own (private) count, as init_ray's

    cores = int(get_num_cpus(override_docker_cpu_warning=True))
    with contextlib.suppress(AttributeError, OSError):  # no sched_getaffinity off Linux
        cores = min(cores, len(os.sched_getaffinity(0)))
    return max(1, cores)


def cpu_threads(sharers: int) -> int:
    """Torch threads for one of ``sharers`` CPU processes on a node: its share of the node's cores
    (:func:`node_cores`). Ray starts a worker or actor with one thread per logical CPU it asked for
    (``OMP_NUM_THREADS``), one core of the node's."""
    return max(1, node_cores() // sharers)


def actor_device(use_gpu: bool) -> str:
    """The device of a Ray actor: ``cuda`` only when Ray gave it a GPU. Ray 2.60 leaves a node's GPUs visible to
    actors that asked for none, so ``torch.cuda.is_available()`` alone would put them on cuda:0 uncounted. An actor
    given a GPU that torch cannot use (a CPU-only torch, no driver) says so and runs on the CPU."""
    import torch

    if use_gpu and not torch.cuda.is_available():
        log.warning("this actor was given a GPU, but torch %s sees no CUDA device: it runs on the CPU (slower, and on "
                    "CPUs its GPU request did not reserve)", torch.__version__)
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def _loopback_only() -> None:
    """Make the private local Ray's node address 127.0.0.1, so every server it starts listens on loopback only.

    On Linux Ray replaces a loopback node address by the machine's routable one (its servers then accept
    connections from the network); the switch Ray keeps for macOS and Windows, where clusters are off,
    keeps loopback. Child processes (raylet, GCS, workers) inherit the variable.
    """
    from ray._private import ray_constants

    _remember_env(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time by ray._private.services


def _token_auth_on() -> None:
    """Keep Ray's token authentication on for the private local Ray, even if the environment disabled it."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        log.warning("RAY_AUTH_MODE=%s ignored: the local Ray mmctr starts always uses token authentication", mode)
    _remember_env("RAY_AUTH_MODE", "token")
    _enable_token_auth()  # sets RAY_AUTH_MODE=token for this process and its children, as ray.init would


def _remember_env(name: str, ours: str) -> None:
    """Keep the value ``name`` has before the private Ray's set-up sets it to ``ours`` (None: unset). A value other
    than ours since the last set-up (the user's) replaces what was kept."""
    kept = _PRIVATE.setdefault("env_before", {})
    now = os.environ.get(name)
    if name not in kept or now != kept[name][1]:
        kept[name] = (now, ours)


def _forget_private_env() -> None:
    """Put back what :func:`_loopback_only` and :func:`_token_auth_on` changed for a private Ray this process ran
    before: a cluster joined later needs the driver's routable address and the cluster's own authentication mode.
    A variable set since to something other than the private Ray's value is the user's, and stays."""
    before = _PRIVATE.pop("env_before", None)
    if not before:
        return
    from ray._private import ray_constants
    from ray._raylet import Config

    for name, (value, ours) in before.items():
        if os.environ.get(name) != ours:
            continue
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR,
                                                              not ray_constants.IS_WINDOWS_OR_OSX)
    Config.initialize("")  # Ray's cached config reads RAY_AUTH_MODE again


def pin_ray_address() -> None:
    """Runs in every worker of the private local Ray: name its own cluster in ``RAY_ADDRESS``.

    Ray Train's placement-group cleaner (and any state-API call in a worker) finds "the" local Ray by listing
    the machine's GCS processes, and fails with "Found multiple active Ray instances" when another Ray runs on
    the same machine (another user's, a second mmctr run, a test suite): the cleaner then takes the run's
    resources away mid-training. With RAY_ADDRESS set, no search happens.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


# Ray Train 2.60's controller asks Ray Data's AutoscalingCoordinator actor for the run's resources when it starts,
# with a 5 s limit; on a busy machine that actor is still starting, and the controller logs a WARNING with a ~20-line
# traceback it calls "safe to ignore" (and one like it when cancelling the request fails: the request expires on its
# own). On the private local Ray no autoscaler serves the request. Demoted to DEBUG: for a ``ray.train`` logger in a
# process where Ray Train set up its logging (its default: the controller and the workers), that is off the console
# at every Ray Train log level (-v is INFO) and still in Ray Train's own log files (``logs/train/`` of the Ray
# session), which record every level.
TRAIN_REQUEST_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
REQUEST_FAILED = re.compile(r"^Failed to (send|cancel) resource request for ")

# Ray Data's console lines hidden unless -v, by logger: the "✔️ Dataset ... execution finished in N seconds" line each
# run of a dataset logs at INFO (a 2-worker run's split coordinator, once per epoch and split); the once-per-process
# hint that progress bars are off (quiet_ray_data turns them off on purpose); and the two ERROR lines of a map task
# whose own code raised, before the error itself (for bad input, the one line naming the file, column and value):
# "... Dataset execution will now abort. To ignore this exception and continue, set DataContext.max_errored_blocks"
# (which would train on without the rows) and "Exception occurred in user code, with the abbreviated stack trace
# below" (which the console does not get). Ray Data's own ``hide`` attribute keeps them off its console handler and in
# its log file (ray-data.log); a record that carries a traceback (Ray Data's own errors) is never hidden. Hidden in
# the processes that run mmctr's code (:func:`quiet_ray_data`) and in every worker of the private local Ray (the
# split coordinator of a 2-worker run among them).
RAY_DATA_HIDDEN = {
    "ray.data._internal.execution.streaming_executor": re.compile(r"Dataset \S+ execution finished in "),
    "ray.data._internal.progress": re.compile(r"^Progress bars disabled\."),
    "ray.data._internal.execution.streaming_executor_state": re.compile(
        r'^An exception was raised from a task of operator "[^"]*"\. Dataset execution will now abort\.'),
    "ray.data.exceptions": re.compile(r"^Exception occurred in user code, with the abbreviated stack trace below\."),
}

# Ray Train logs a worker's exception as "Error in training function:" and its ~40-line traceback. For bad input a
# worker met (a DataError, which the command reports as one line naming the file, column and value) that traceback
# says nothing more: the private Ray's workers demote it to DEBUG unless -v (Ray Train's log file keeps it). The
# DataError is raised in a Ray Data task, so the traceback ends in the errors that wrap it ("The above exception was
# the direct cause of ..."); one that goes on "During handling of the above exception" after it is another error
# (a bug met while handling bad input) and prints.
TRAIN_ERROR_LOGGER = "ray.train.v2._internal.util"
BAD_INPUT_TRACEBACK = re.compile(r"^Error in training function:\n(?s:.*)\bmmctr_ray\.errors\.DataError: "
                                 r"(?!(?s:.*)^During handling of the above exception)", re.MULTILINE)
# A worker whose peer died (a restart's cause, which the controller's one line names) fails beside it in the next
# collective: gloo's "Connection reset by peer" (or closed), NCCL's "remote process exiting"; its own ~30-line
# traceback said nothing more, and printed at every restart. Demoted the same way, when that error is the last one
# (no later traceback, no error met while handling it).
PEER_CUT_TRACEBACK = re.compile(
    r"^Error in training function:\n(?s:.*)(gloo/transport\S*\] [^\n]*Connection (reset|closed) by peer|remote "
    r"process exit)(?!(?s:.*)^(Traceback|During handling of the above exception))", re.MULTILINE)

# Ray Train's placement-group cleaner (on in `mmctr tune`: see init_ray) warns "Detected that the Ray Train controller
# actor (...) is dead. Cleaning up placement group ..." whenever a trial's controller ends before its group was
# removed: its designed path each time ASHA stops a trial. Its process has no Ray Train log configuration (its lines
# go to Ray's own handler at every level), so the private Ray's workers drop that line; its other warnings stay.
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
PG_CLEANED = re.compile(r"^Detected that the Ray Train controller actor \(\S+\) is dead\. Cleaning up placement group")


class _Matching(logging.Filter):
    """What a logger does with its records whose message matches ``pattern``: ``debug`` demotes those at WARNING or
    above to DEBUG, ``hide`` marks those without a traceback with Ray Data's ``hide`` (its console handler's filter),
    ``drop`` drops them. Other records pass as they are."""

    def __init__(self, pattern: re.Pattern, action: str) -> None:
        super().__init__()
        if action not in ("debug", "hide", "drop"):
            raise ValueError(f"unknown log filter action {action!r}")
        self.pattern, self.action = pattern, action

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not fit its format: a logger filter's error would raise
            return True    # at the logging call in Ray's code; the handler reports it as a logging error instead
        if not self.pattern.search(message):
            return True
        if self.action == "drop":
            return False
        if self.action == "hide":
            if not record.exc_info:  # a traceback stays
                record.hide = True
        elif record.levelno >= logging.WARNING:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def _add_filter(name: str, pattern: re.Pattern, action: str) -> None:
    """Give logger ``name`` a :class:`_Matching` filter, once (a hook may run again in a process)."""
    target = logging.getLogger(name)
    if not any(isinstance(f, _Matching) and (f.pattern, f.action) == (pattern, action) for f in target.filters):
        target.addFilter(_Matching(pattern, action))


# Ray Train's controller, at every `mmctr train --resume`: "A run snapshot was found ... please configure a new,
# unique `RunConfig(name)` or delete the existing folder", advice that is not mmctr's (the command's --resume and
# --overwrite are); shown on a joined cluster, where Ray Train logs at INFO
SNAPSHOT_LOGGER = "ray.train.v2._internal.execution.checkpoint.checkpoint_manager"
SNAPSHOT_FOUND = re.compile(r"^A run snapshot was found in storage folder")


def joined_worker_setup() -> None:
    """The ``worker_process_setup_hook`` of a joined cluster's workers: :func:`pin_ray_address`, and Ray Train's
    run-snapshot advice dropped (:data:`SNAPSHOT_FOUND`)."""
    pin_ray_address()
    _add_filter(SNAPSHOT_LOGGER, SNAPSHOT_FOUND, "drop")


def private_worker_setup_verbose() -> None:
    """The ``worker_process_setup_hook`` of the private local Ray with -v: :func:`pin_ray_address`, Ray Train's
    warnings that a resource request to the autoscaling coordinator failed demoted to DEBUG
    (:data:`REQUEST_FAILED`): this Ray has no autoscaler for the request to reach; and the placement-group
    cleaner's line for a trial's ended controller dropped (:data:`PG_CLEANED`). Neither imports Ray Train or Ray Data
    (each worker runs it as it starts). A cluster the command joins keeps both lines."""
    joined_worker_setup()  # pin_ray_address, and Ray Train's run-snapshot advice dropped
    _add_filter(TRAIN_REQUEST_LOGGER, REQUEST_FAILED, "debug")
    _add_filter(PG_CLEANER_LOGGER, PG_CLEANED, "drop")


def private_worker_setup() -> None:
    """The same, :data:`RAY_DATA_HIDDEN` off the console, and the worker's traceback of bad input and of a peer's
    death demoted (:data:`BAD_INPUT_TRACEBACK`, :data:`PEER_CUT_TRACEBACK`): the hook without -v."""
    private_worker_setup_verbose()
    _add_filter(TRAIN_ERROR_LOGGER, BAD_INPUT_TRACEBACK, "debug")
    _add_filter(TRAIN_ERROR_LOGGER, PEER_CUT_TRACEBACK, "debug")
    hide_ray_data_lines()


def hide_ray_data_lines() -> None:
    """:data:`RAY_DATA_HIDDEN` off this process's console (Ray Data's log file keeps them)."""
    for name, pattern in RAY_DATA_HIDDEN.items():
        _add_filter(name, pattern, "hide")


_PRIVATE = {"started": False}
DATA_CPU_RESERVE = 1.0  # CPUs left beside a pool of training workers or actors for the Ray Data tasks that feed it
WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def check_pool(resources: dict[str, float], count: int, cpus_each: float, gpus_each: float, noun: str,
               lower: str, lower_gpus: str, cluster: bool = False) -> None:
    """Raise a one-line ConfigError when a pool of ``count`` members (``noun``: workers, actors) of ``cpus_each``
    CPUs and ``gpus_each`` GPUs, plus DATA_CPU_RESERVE CPU for the Ray Data tasks that feed it, does not fit in a
    fixed ``resources``: it would wait for good (Ray Data only warns that the job "may hang forever"). A GPU
    fraction is placed within one GPU. ``lower``/``lower_gpus``: the flags to lower, named in the message.
    ``cluster``: ``resources`` are what a cluster this process joined has now (the message says so; the caller
    warns with it)."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    need = count * cpus_each + DATA_CPU_RESERVE
    noun = noun[:-1] if count == 1 and noun.endswith("s") else noun  # "1 worker", "2 workers"
    where, now = ("the cluster", " now") if cluster else ("this local Ray", "")
    waits = ": it waits" if count == 1 else ": they wait"

    def then(flags: str, who: str = waits) -> str:  # a local Ray: lower the flags; a cluster may grow: wait
        return (f"{who} for the autoscaler to add nodes (on a cluster that cannot grow, for good: lower {flags})"
                if cluster else f": lower {flags}")

    if cpus + 1e-9 < need:
        more = "" if cluster else (f", or give it {math.ceil(need)} logical CPUs with --num-cpus {math.ceil(need)} "
                                   f"(the {noun} then share{'s' if count == 1 else ''} cores)")
        raise ConfigError(f"{count} {noun} × {cpus_each:g} CPU and {DATA_CPU_RESERVE:g} CPU for reading the data "
                          f"need {need:g} CPUs; {where} has {cpus:g}{now}{then(lower)}{more}")
    if gpus_each and gpus + 1e-9 < count * gpus_each:
        total = count * gpus_each
        raise ConfigError(f"{count} {noun} × {gpus_each:g} GPU need {total:g} GPU{'' if total == 1 else 's'}; "
                          f"{where} has {gpus:g}{now}{then(lower_gpus)}")
    if 0 < gpus_each < 1 and count > (fit := math.floor(gpus + 1e-9) * math.floor(1 / gpus_each + 1e-9)):
        raise ConfigError(f"{count} {noun} × {gpus_each:g} GPU: Ray places a fraction within one GPU, so {fit} fit on "
                          f"{where}'s {gpus:g} GPUs{now}{then(lower_gpus, '; the rest wait')}")


def check_gpu_split(workers: int, gpus_each: float, flag: str, given: float | None = None) -> None:
    """Raise a one-line ConfigError when DDP workers of ``gpus_each`` GPUs each cannot train together: two or more
    workers need whole GPUs each (Ray packs fractions onto one GPU, where two NCCL ranks fail with "Duplicate GPU
    detected", after the run's retries), and above one GPU a worker needs a whole number. ``flag``: the option
    that set it, whose value ``given`` (``gpus_each`` unless the flag splits a total between the workers)."""
    given = gpus_each if given is None else given
    split = f" over {workers} workers gives each {gpus_each:g} GPU" if given != gpus_each else ""
    if workers > 1 and gpus_each and (gpus_each < 1 or gpus_each != int(gpus_each)):
        raise ConfigError(f"{flag} {given:g}{split}: with 2+ DDP workers each needs whole GPUs (Ray places "
                          f"fractions on one GPU, where two NCCL ranks fail); use 1 worker for a share of a GPU")
    if gpus_each > 1 and gpus_each != int(gpus_each):
        raise ConfigError(f"{flag} {given:g}{split}: above 1 GPU a worker needs a whole number of GPUs")


def check_local_pool(count: int, cpus_each: float, gpus_each: float, noun: str, lower: str,
                     lower_gpus: str) -> None:
    """:func:`check_pool` against the private local Ray's resources (one machine: what it has now is all it will
    have). On a cluster this process's command joined, which an autoscaler may grow, the same check against what the
    cluster has now is a warning: a pool it cannot hold waits for new nodes, and on a cluster that cannot grow it
    waited for good without a word (`train` printed Ray Train's startup-timeout tracebacks every minute, `predict`
    nothing; helper-141). Not in a Tune trial (an actor), whose search checked what fits before it began."""
    import ray

    if private_local_ray():
        check_pool(ray.cluster_resources(), count, cpus_each, gpus_each, noun, lower, lower_gpus)
    elif ray.is_initialized() and ray.get_runtime_context().get_actor_id() is None:
        try:
            check_pool(ray.cluster_resources(), count, cpus_each, gpus_each, noun, lower, lower_gpus, cluster=True)
        except ConfigError as err:
            log.warning("%s", err)


def check_actors(actors: int, gpus_per_actor: float, cpus_per_actor: float = 1.0, cpus_flag: bool = False) -> None:
    """:func:`check_local_pool` for a Ray Data actor pool (GPU actors take no CPU); ``cpus_flag``: the command
    has ``--cpus-per-actor``."""
    if gpus_per_actor > 1:  # the CLI's ACTOR_GPUS rule, for library callers: a second GPU would sit idle
        raise ConfigError(f"--gpus-per-actor {gpus_per_actor:g}: an actor runs its model on one GPU: expected at "
                          "most 1 (a share such as 0.5 puts several actors on one GPU; --actors adds GPUs)")
    lower = "--actors (or --cpus-per-actor)" if cpus_flag and not gpus_per_actor else "--actors"
    check_local_pool(actors, 0.0 if gpus_per_actor else cpus_per_actor, gpus_per_actor, "actors", lower,
                     "--actors or --gpus-per-actor")


def logical_cpus(cores: float, pool_cpus: float) -> int | None:
    """The logical CPUs to give a private local Ray whose size the user did not set (``--num-cpus``): ``None`` (Ray
    counts the machine's ``cores``) unless the command's pool of workers or actors (``pool_cpus``) fits in the cores
    but leaves fewer than DATA_CPU_RESERVE for the Ray Data reads that feed it; then the pool plus the reserve, so the
    reads share cores with the pool (on a 1-core machine, one training worker) instead of waiting for good. A pool
    larger than the machine is left to :func:`check_pool`'s error: the user asked for more than there is."""
    need = pool_cpus + DATA_CPU_RESERVE
    if cores + 1e-9 >= need or pool_cpus > cores + 1e-9:
        return None
    return math.ceil(need - 1e-9)


def private_local_ray() -> bool:
    """Whether this process started the Ray it uses (:func:`init_ray` without an address): one machine, fixed
    resources. False on a cluster it joined, which an autoscaler may grow, also when the process shut its private
    Ray down and then called ``ray.init(address=...)`` itself (the running Ray is not the one it started)."""
    if not _PRIVATE["started"]:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address == _PRIVATE.get("gcs")


def torch_trainer() -> type:
    """Ray Train's ``TorchTrainer`` with two changes where this Ray allows them (Ray 2.60 does; elsewhere its own
    defaults):

    * its process group is set up from the workers (:class:`mmctr_ray.torch_backend.WorkerTorchConfig`), so the
      run's controller does not import torch: ~2.8 s and ~500 MB less per run and per Tune trial; and it is built as
      Train V2 builds ``TorchTrainer`` (a ``DataParallelTrainer`` with that backend) without ``TorchTrainer``'s
      package, which imports torch: the process that builds it, a run's driver or a search's trial, does not;
    * on the private local Ray (:func:`private_local_ray`) it runs without Train V2's placement-group cleaner.

    The cleaner is a detached actor, one per run, that removes the run's placement group when the run's controller
    dies while the Ray job goes on (a placement group an actor makes otherwise lasts as long as the job). A Tune
    trial needs it: the scheduler stops a trial by killing its actor while the search's driver goes on, and without
    the cleaner that trial's CPUs stay taken. So does a run started from a process that outlives it (a notebook). On
    the private local Ray the command's own process is the job: a controller that dies fails the run, the command
    exits and its Ray goes with every placement group. There the cleaner cost one more process per run (~3.5 s of
    CPU, importing Ray Train), the controller waited for it before starting the workers and again at the end, and
    it needed the dashboard's state API. A warm 1-epoch run of the tests' data took 11.0-14.4 s without it against
    14.7-17.4 s with it (2 cores, 2026-12-01)."""
    from mmctr_ray import torch_backend

    worker_side = torch_backend.available()
    cleaner: type | None = None
    if private_local_ray():
        try:
            from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
            cleaner = PlacementGroupCleanerCallback
        except ImportError:  # another Ray than the one tested (2.60): its own defaults
            pass
    if worker_side:  # TorchTrainer is Train V2's DataParallelTrainer with TorchConfig for its backend, and its package
        # imports torch: with WorkerTorchConfig the trainer is that DataParallelTrainer, so the process that builds
        # it (a run's driver, a search's trial) imports no torch
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer as base
    else:
        from ray.train.torch import TorchTrainer as base

        if cleaner is None:
            return base

    class MmctrTorchTrainer(base):
        def __init__(self, *args: Any, scaling_config: Any = None, torch_config: Any = None, **kwargs: Any) -> None:
            if not worker_side:
                super().__init__(*args, scaling_config=scaling_config, torch_config=torch_config, **kwargs)
                return
            if torch_config is None:  # gloo on the CPU, NCCL on GPUs, as TorchTrainer chooses
                use_gpu = bool(scaling_config and scaling_config.use_gpu)
                torch_config = torch_backend.WorkerTorchConfig(backend="nccl" if use_gpu else "gloo")
            super().__init__(*args, scaling_config=scaling_config, backend_config=torch_config, **kwargs)

        def _create_default_callbacks(self) -> list:
            return [cb for cb in super()._create_default_callbacks() if cleaner is None or not isinstance(cb, cleaner)]

    return MmctrTorchTrainer


def _keep_python_sigterm() -> None:
    """``ray.init`` sets a Python SIGTERM handler in the driver (``sys.exit(15)``), then its core worker puts a
    crash handler of its own in front of it at the C level: a SIGTERM (a scheduler's preemption, ``timeout``) then
    printed a stack dump and could abort the process (seen in ``mmctr tune``: exit -6). Installing Ray's Python
    handler again puts it back in front, so SIGTERM ends the command as ``SystemExit(15)``, which the stages turn
    into one line (:func:`sigterm_received` tells it apart from other exits). Main thread only (elsewhere no
    handler can be set)."""
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler) and threading.current_thread() is threading.main_thread() and not getattr(
            handler, "records_sigterm", False):
        def on_sigterm(signum: int, frame: Any) -> None:
            _PRIVATE["sigterm"] = True  # what ends the command is then a SIGTERM, whatever SystemExit's code says
            handler(signum, frame)

        on_sigterm.records_sigterm = True  # type: ignore[attr-defined]
        signal.signal(signal.SIGTERM, on_sigterm)


def forget_sigterm() -> None:
    """Clear what :func:`sigterm_received` says (a command starting in a process where an earlier one met SIGTERM),
    and what :func:`sigterm_watchdog` kept off the console after that command's line (until the process's end)."""
    _PRIVATE.pop("sigterm", None)
    if _PRIVATE.pop("said", False):
        logging.disable(logging.NOTSET)


def sigterm_received() -> bool:
    """Whether a SIGTERM reached the handler :func:`init_ray` installed (so the ``SystemExit`` ending the command
    is a scheduler's preemption or ``timeout``, which ``mmctr`` turns into one line)."""
    return bool(_PRIVATE.get("sigterm"))


# how long the main thread may take to run its SIGTERM handler (Ray's get and wait check for signals every few
# hundred ms), and to end the command after it
SIGTERM_HANDLER_S, SIGTERM_END_S = 5.0, 25.0


@contextlib.contextmanager
def sigterm_watchdog(say: Callable[[], int]) -> Iterator[None]:
    """On SIGTERM, ``say()`` the command's last line at once (it returns the exit status), keep Ray's lines and the
    log's off the console after it, and end the process with that status if the main thread has not run its
    handler within SIGTERM_HANDLER_S, or has not ended the command within SIGTERM_END_S.

    A SIGTERM to the whole process group (GNU ``timeout``, ``kill -- -PGID``; Slurm and systemd end every process
    of a job) also ends the local Ray's raylet and GCS. The driver then exited from Ray's C++ with status 1 and no
    line, either within a fraction of a second (its core worker, on the raylet's end, while the splits were read)
    or after 60 s inside a wait on the GCS that checks no signals ("Failed to connect to GCS within 60 seconds",
    as trials started); a scheduler's kill after its grace (30 s in Slurm and Kubernetes) came first. Python's
    C-level handler writes the signal's number to the wakeup fd at once, whatever the main thread is doing: this
    thread reads it there. Main thread only (elsewhere no wakeup fd can be set); a no-op where something else
    holds the wakeup fd (an asyncio loop)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _sigterm_before_ray():
        yield from _watch(say)


@contextlib.contextmanager
def _sigterm_before_ray() -> Iterator[None]:
    """Until Ray installs its SIGTERM handler (a stage that starts none: synth, validate, fuse; the checks before
    Ray), one that ends the command as Ray's does, recorded: SIGTERM's default ended the process at once, 143 and
    no line, and wrote nothing to the wakeup fd. Ray's own replaces it when Ray starts; put back after."""
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return

    def ended(signum: int, frame: Any) -> None:
        _PRIVATE["sigterm"] = True
        sys.exit(signum)

    ended.records_sigterm = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, ended)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is ended:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _watch(say: Callable[[], int]) -> Iterator[None]:
    """:func:`sigterm_watchdog`'s thread around the command (a generator its context manager yields from)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    before = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    if before != -1:  # someone else's: theirs stays
        signal.set_wakeup_fd(before)
        os.close(read_fd)
        os.close(write_fd)
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                got = os.read(read_fd, 64)
            except OSError:
                return
            if not got:
                return  # the command ended: its write end is closed
            if signal.SIGTERM not in got or done.is_set():
                continue  # SIGINT and the others: the main thread's, as before
            start = time.monotonic()
            _PRIVATE["said"] = True  # Ray's processes' lines stay off the console from the line on
            logging.disable(logging.CRITICAL)  # and so do the log's (print is neither): the line is the last
            try:
                status = _say_last(say)
            except BaseException:  # a closed stderr (`| tee` ended by the same scancel), storage out of reach: the
                status = 128 + signal.SIGTERM  # end below must come whatever the line met
            while not done.is_set() and not sigterm_received() and time.monotonic() - start < SIGTERM_HANDLER_S:
                time.sleep(0.05)
            if not sigterm_received() or not done.wait(max(0.0, SIGTERM_END_S - (time.monotonic() - start))):
                if not done.is_set():
                    _flush_std()
                    os._exit(status)
            return

    thread = threading.Thread(target=watch, name="mmctr-sigterm-watchdog", daemon=True)
    try:
        thread.start()
        yield
    finally:
        done.set()
        if signal.set_wakeup_fd(-1) != write_fd:  # set meanwhile by someone else (an asyncio loop): theirs
            signal.set_wakeup_fd(-1)
        os.close(write_fd)
        thread.join(timeout=1.0)
        if not thread.is_alive():
            os.close(read_fd)


def _flush_std() -> None:
    """Flush sys.stdout and sys.stderr, whatever they meet (a closed pipe)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()


def _say_last(say: Callable[[], int]) -> int:
    """``say()`` the SIGTERM line as this process's last output: stdout and stderr point at /dev/null first, and the
    line goes to a copy of the real stderr. Ray's core worker (C++) writes to stderr itself as the raylet the same
    SIGTERM ended goes ("Attempting to recover N lost objects"), past every Python filter, and Ray's log monitor
    flushed its deduplicated worker lines at exit: either came after the line (3 of 10 group SIGTERMs in a
    walkthrough). Where the descriptors cannot be copied, the line goes where stderr goes, as before."""
    _flush_std()
    real, line_to = sys.stderr, None
    try:
        line_to = open(os.dup(2), "w", encoding=getattr(real, "encoding", None) or "utf-8",  # noqa: SIM115
                       errors="backslashreplace")
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        sys.stderr = line_to
    except OSError:
        pass
    try:
        return say()
    finally:
        sys.stderr = real  # whose descriptor is /dev/null's now
        if line_to is not None:
            with contextlib.suppress(BaseException):
                line_to.flush()


@contextlib.contextmanager
def sigterm_flag() -> Iterator[dict[str, bool]]:
    """Yield ``{"sigterm": False}``, set to True if SIGTERM comes meanwhile; the handler in place still runs (Ray's
    driver handler exits with SystemExit, which Ray may re-raise as ``SystemExit(1)`` out of a ``ray.get``: the
    flag, not the exit code, tells a SIGTERM from Ctrl-C). Main thread only (elsewhere no handler can be set)."""
    state = {"sigterm": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    before = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        state["sigterm"] = _PRIVATE["sigterm"] = True  # sigterm_watchdog: the main thread has run its handler
        if callable(before):
            before(signum, frame)
        elif before != signal.SIG_IGN:  # the default: end the process as SIGTERM does
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)  # None: not set from Python


def stop_ray(grace_s: float = 5.0, *, exiting: bool = False) -> None:
    """Shut down the private local Ray :func:`init_ray` started, or leave the cluster it joined, as at exit; a Ray
    this process had before (a notebook's, a test's) is left alone.

    A private Ray's worker processes still running ``grace_s`` after its shutdown are killed, with a warning: Ray
    2.60's core worker can deadlock in its own exit (``~CoreWorkerProcessImpl`` → the pubsub publisher's destructor
    → ``pthread_cond_signal`` under a lock it holds; seen in a ``ray::TrainController`` whose actor handle was
    dropped), and such a process outlived the command, reparented to init, for good. ``exiting``: the process is
    exiting (Ray's shutdown then waits a moment for the workers' last log lines to reach the driver, as its own
    shutdown at exit would)."""
    gcs = _PRIVATE.pop("gcs", None)
    if gcs is not None:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().gcs_address == gcs:  # still the one it started or joined
            workers = _ray_workers() if _PRIVATE["started"] else []
            ray.shutdown(_exiting_interpreter=exiting)
            _PRIVATE["started"] = False
            _end_stragglers(workers, grace_s)


def _stop_at_exit() -> None:
    """:func:`stop_ray` as the process exits (a command that ended normally, or with an error): Ray's own shutdown at
    exit leaves a worker deadlocked in its exit running for good; a Ray already stopped is not touched."""
    with contextlib.suppress(Exception):
        stop_ray(exiting=True)


def _ray_workers() -> list[Any]:
    """The Ray worker processes (``ray::...``) of the private Ray: the descendants of its raylet, which this process
    started (its child). A ``ray::`` process of another Ray, one a child of this process started, is not taken."""
    import psutil

    workers = []
    for raylet in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if raylet.name() == "raylet":
                workers += [proc for proc in raylet.children(recursive=True) if _is_ray_worker(proc)]
    return workers


def _is_ray_worker(proc: Any) -> bool:
    import psutil

    with contextlib.suppress(psutil.Error):
        return proc.name().startswith("ray::") or (proc.cmdline()[:1] or [""])[0].startswith("ray::")
    return False


def _running(proc: Any) -> bool:
    import psutil

    with contextlib.suppress(psutil.Error):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # is_running: not a reused pid
    return False


def _end_stragglers(workers: list[Any], grace_s: float) -> None:
    """Kill the ``workers`` still running ``grace_s`` after their Ray's shutdown (see :func:`stop_ray`)."""
    import psutil

    deadline = time.monotonic() + grace_s
    alive = [proc for proc in workers if _running(proc)]
    while alive and time.monotonic() < deadline:  # not psutil.wait_procs: a worker that exited stays a zombie
        time.sleep(0.05)  # until its parent (the raylet, or init) reaps it, and wait_procs counts that as running
        alive = [proc for proc in alive if _running(proc)]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            name = " ".join(proc.cmdline()) or proc.name()
            proc.kill()
            log.warning("a worker process of the local Ray outlived its shutdown by %.0f s (pid %d, %s): killed",
                        grace_s, proc.pid, name)


# Lines Ray's own processes log at error level for what is its normal path. The GCS kills an actor by an RPC the
# dying worker never answers, and logs the closed socket as a failure (Ray's developers call the failing RPC the
# success path: ray-project/ray#53412, and demoted the log at another call site in #58544); Ray 2.60 still forwards
# it to the driver, once or twice in every `mmctr train` after a Ray Data stage.
BENIGN_RAY_LINES = {
    "gcs_server": re.compile(r"Failed to kill actor \w+, return status: .*KillActor RPC failed.*Socket closed"),
}
RAY_LOG_HANDLER = "ray_print_logs"  # the name Ray 2.60 gives the handler that prints its processes' lines


def drop_benign_ray_lines() -> bool:
    """Keep :data:`BENIGN_RAY_LINES` out of what Ray prints from its processes' logs; every other line, those of
    the same processes included, still prints. Return whether the filter is in place (False where this Ray prints
    no logs, or names its printing handler otherwise: then nothing changes)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    printers = [h for name, h in dispatcher.handlers if name == RAY_LOG_HANDLER]
    if len(printers) != 1:
        return False
    if getattr(printers[0], "drops_benign_lines", False):
        return True

    def print_logs(data: dict, _print=printers[0]) -> None:
        if _PRIVATE.get("said"):  # a SIGTERM's line is out (sigterm_watchdog): it stays the last
            return
        benign = BENIGN_RAY_LINES.get(data.get("pid"))
        if benign is not None:
            lines = [line for line in data.get("lines", []) if not benign.search(line)]
            if not lines:
                return
            data = {**data, "lines": lines}
        _print(data)

    print_logs.drops_benign_lines = True
    # one assignment, as Ray's remove_handler makes: no line is emitted between two printers, and Ray's shutdown
    # removes the filter by the name it gave its printer
    with getattr(dispatcher, "_lock", None) or contextlib.nullcontext():
        dispatcher.handlers = [(name, print_logs if h is printers[0] else h) for name, h in dispatcher.handlers]
    return True


# The raylet's warning each time the worker processes it started reach another multiple of the machine's cores
# ("(raylet) WARNING: 8 PYTHON worker processes have been started on node: ... which is 4x the maximum expected
# startup concurrency (2). This could be a result of ...", ray-project/ray#3644; no setting turns it off,
# ray-project/ray#63800). On the private local Ray the processes are this project's own layout: a search starts a
# Tune process, a Train controller and a worker for every trial, and Ray Data its tasks, so every `mmctr tune` on a
# small machine printed it, with advice that does not apply. On a cluster it joined the warning still prints.
WORKER_COUNT_WARNING = re.compile(r"PYTHON worker processes have been started on node: .* maximum expected startup "
                                  r"concurrency")


def quiet_worker_count_warning() -> bool:
    """Keep :data:`WORKER_COUNT_WARNING` off the console while the Ray in use is the private local one (checked as
    each warning comes: a process may join a cluster later). Ray prints the raylet's warnings from a thread of the
    driver through ``ray._private.worker.print_to_stdstream``; this wraps it. Return whether the wrapper is in place
    (False where this Ray has no such function: then nothing changes)."""
    from ray._private import worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None:
        return False
    if getattr(printer, "quiets_worker_count", False):
        return True

    def print_to_stdstream(data: dict, *args: Any, _print=printer, **kwargs: Any) -> None:
        if data.get("pid") == "raylet" and private_local_ray():  # the raylet's lines here are its rare warnings
            lines = [line for line in data.get("lines", []) if not WORKER_COUNT_WARNING.search(line)]
            if not lines:
                return
            data = {**data, "lines": lines}
        _print(data, *args, **kwargs)

    print_to_stdstream.quiets_worker_count = True
    ray_worker.print_to_stdstream = print_to_stdstream
    return True


def plain_log_prefixes() -> None:
    """Ray colours the ``(RayTrainWorker pid=…)`` prefix of every line its processes print on the driver: escape
    codes in a log redirected to a file. Off (``RAY_COLOR_PREFIX=0``, which Ray reads as it prints) unless both
    streams are a terminal, and unless the user set it."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


JOIN_SETUP_HOOK = "mmctr_ray.ray_env.joined_worker_setup"


def _join(address: str) -> None:
    """``ray.init`` of the cluster at ``address``, its workers given :func:`joined_worker_setup` as their setup hook.
    Its :func:`pin_ray_address`: with another Ray on a node (a private one of another mmctr command, a second
    ``ray start``), Ray Train's placement-group cleaner logged "Found multiple active Ray instances ... Connecting
    to latest cluster" every 1.5 s of a run, and would follow whichever cluster started last. Ray merges this with
    a job's own runtime_env; where that sets a setup hook of its own (a conflict Ray refuses), the join goes on
    without this one."""
    import ray

    try:
        ray.init(address=address, logging_level=logging.WARNING,
                 runtime_env={"worker_process_setup_hook": JOIN_SETUP_HOOK})
    except ValueError as err:
        if "worker_process_setup_hook" not in str(err) or ray.is_initialized():
            raise
        ray.init(address=address, logging_level=logging.WARNING)


def _auth_hint(err: BaseException) -> str:
    """What to check when a GCS that answers refused the join: a cluster with token auth (the README's) refuses a
    client without its token, or with another, only after ~20 s of Ray's "Unauthenticated ... InvalidAuthToken"
    warnings, and Ray's last word named no token."""
    if "Failed to connect to Ray cluster" not in str(err):
        return ""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return ("; if the cluster uses token auth, set RAY_AUTH_MODE=token and its token (~/.ray/auth_token, "
                "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)")
    return "; with RAY_AUTH_MODE=token: check that this token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or " \
           "RAY_AUTH_TOKEN) is the cluster's"


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A ConnectionError, at once, when nothing takes a connection at the GCS address ``address`` leads to (a
    ``host:port``, or ``auto``: the cluster a ``ray start`` on this machine recorded). Ray's own join retried such an
    address for many minutes, printing "Failed to connect to GCS" every 40 s, and then raised a traceback (a cluster
    that is down, a typo in the port). An ``http(s)://`` address (the dashboard's, which ``ray job submit``
    takes) is a ValueError; Ray Client (``ray://``) and other schemes are left to Ray."""
    import socket

    from ray._private import services

    if address.startswith(("http://", "https://")):  # Ray's own error was cut at "To fix this, either:"
        raise ValueError("an http(s) address is a dashboard's, for `ray job submit`; a command joins a cluster at "
                         "its GCS address (HOST:6379, or `auto` on one of its nodes)")
    if "://" in address:
        return
    gcs = services.canonicalize_bootstrap_address(address)  # as ray.init resolves it (localhost: this node's IP)
    if gcs is None:
        return
    host, _, port = gcs.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"port {port!r} is not a number (expected host:port)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        why = "no answer within %g s" % timeout_s if isinstance(err, TimeoutError) else first_line(err)
        # Ray takes localhost and 127.0.0.1 to this node's IP: said, since the line names the address asked
        where = gcs if gcs == address else f"{gcs}, where Ray takes {address}"
        raise ConnectionError(f"nothing answers at {where} ({why}); is the cluster up (`ray status --address "
                              f"{gcs}` on its head)?") from None


@contextlib.contextmanager
def ctrl_c_held(what: str) -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that comes while ``what`` starts until it has started, then raise it: a
    KeyboardInterrupt inside ``ray.init`` left a Ray half started, whose teardown at exit segfaulted in 2 of 30
    tries (SIGINT 2-7 s into `mmctr train` on 2 cores, the command's own "interrupted" line already printed) and
    whose agents outlived the command by ~60 s. A second Ctrl-C is raised at once, as before; an error of the start
    is raised, not the held Ctrl-C. Only in the main thread, where Python's own handler is the one set (a handler of
    Tune's or Train's is left to do its work). Not for joining a cluster: that starts no process, and a join that
    fails can retry for many seconds."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if held:
            raise KeyboardInterrupt
        held.append(signum)
        try:  # never raise into the start: a stderr whose reader the same Ctrl-C ended (`| tee`), or one this thread
            sys.stderr.write(f"Ctrl-C: stopping once {what} has started (a few seconds; Ctrl-C again to stop at "
                             f"once)\n")  # was writing to when the signal came (a reentrant call), or none
            sys.stderr.flush()
        except Exception:
            pass

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:  # a second Ctrl-C between here and the restore would skip it: blocked meanwhile, then raised
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            if signal.getsignal(signal.SIGINT) is hold:  # not replaced meanwhile (by what started)
                signal.signal(signal.SIGINT, signal.default_int_handler)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if held:
        raise KeyboardInterrupt


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False,
             dashboard: bool = False, object_store_mib: int | None = None, pool_cpus: float = 0.0) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a private local Ray.

    The private local Ray listens on loopback only, uses token authentication (a token Ray keeps in
    ``~/.ray/auth_token``), has ``num_cpus`` logical CPUs when given (else the machine's, raised by
    :func:`logical_cpus` where the command's pool of ``pool_cpus`` CPUs would leave none for its reads), starts the
    dashboard (on 127.0.0.1) only when ``dashboard`` is set, and an object store of ``object_store_mib`` MiB when
    given (Ray's default: 30% of RAM; the store keeps the shared memory it has once used until Ray stops, and every
    process that read an object keeps its pages in its RSS, so this bounds both). ``mmctr tune`` sets
    ``dashboard``: its trials keep Train V2's placement-group cleaner (:func:`torch_trainer`), which asks the
    dashboard's state API whether the run's controller lives, and without an answer takes the run's placement group
    away mid-training (seen with Ray 2.60). A cluster's own settings are the cluster's.
    """
    import ray

    quiet_ray_data(verbose)
    plain_log_prefixes()
    if ray.is_initialized():  # a Ray this process had (a notebook's, a test's): its SIGTERM recorded as ours is
        _keep_python_sigterm()
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address == "local":  # Ray's own word for a new Ray of this process's own: the private one, with its checks
        address = None
    if address:
        given = [flag for flag, value in (("--num-cpus", num_cpus), ("--object-store-mib", object_store_mib))
                 if value is not None]
        if given:
            log.warning("%s: for the private local Ray only; joining the Ray at %s (%s), whose resources are its "
                        "own", ", ".join(given), address, "--address" if address != os.environ.get("RAY_ADDRESS")
                        else "RAY_ADDRESS")
        # a private Ray this process ran before (tests, notebooks) set these for itself, not for a cluster
        _PRIVATE["started"] = False
        if _PRIVATE.pop("watcher_off", False):
            os.environ.pop(WATCHER_ENV, None)
        _forget_private_env()
        try:
            check_reachable(address)
            _join(address)
        except (ValueError, ConnectionError) as err:  # an HTTP (dashboard) address, no Ray at "auto", a bad form
            raise ConfigError(f"Ray address {address!r} (--address or RAY_ADDRESS): {first_line(err)}"
                              f"{_auth_hint(err)}") from None
        except RuntimeError as err:  # a port that answers but is no Ray's GCS: Ray gives up after its retries
            if "GCS" not in str(err):
                raise
            raise ConfigError(f"Ray address {address!r} (--address or RAY_ADDRESS): no Ray's GCS answers there "
                              f"({first_line(err)})") from None
        _keep_python_sigterm()
        drop_benign_ray_lines()
        _PRIVATE["gcs"] = ray.get_runtime_context().gcs_address  # for stop_ray; not private: "started" stays False
        log.info("joined Ray at %s: %s", address, ray.cluster_resources())
        return
    _loopback_only()
    _token_auth_on()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a private Ray reports nothing to the network
    # One machine loses no node to preemption; Train's watcher is one more actor per run, and its creation logged an
    # error-level restart warning (core_worker.cc) in every run and trial. Processes of this Ray inherit the setting.
    if WATCHER_ENV not in os.environ:
        os.environ[WATCHER_ENV] = "0"
        _PRIVATE["watcher_off"] = True
    if object_store_mib is not None and object_store_mib < MIN_OBJECT_STORE_MIB:
        raise ConfigError(f"--object-store-mib must be >= {MIN_OBJECT_STORE_MIB} (MiB), got {object_store_mib}")
    if num_cpus is None:
        from ray._private.utils import get_num_cpus  # what Ray itself counts (cgroup limits included)

        cores = get_num_cpus(override_docker_cpu_warning=True)  # Ray warns once itself, when it starts
        num_cpus = logical_cpus(cores, pool_cpus)
        if num_cpus is not None:
            log.info("this machine has %g CPU%s and the workers or actors take %g: the local Ray gets %d logical CPUs "
                     "so the Ray Data reads that feed them share cores (--num-cpus sets another count)", cores,
                     "" if cores == 1 else "s", pool_cpus, num_cpus)
    # "local": a new Ray of its own, never the cluster a `ray start` on this machine left in /tmp/ray, which
    # ray.init() without an address joins (its resources are not this command's to size, nor its own to stop)
    setup = private_worker_setup_verbose if verbose else private_worker_setup
    with ctrl_c_held("the local Ray"):  # a Ctrl-C inside ray.init left a half-started Ray that segfaulted at exit
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 object_store_memory=object_store_mib * 2**20 if object_store_mib else None,
                 logging_level=logging.WARNING, runtime_env={"worker_process_setup_hook": setup})
        _keep_python_sigterm()
        drop_benign_ray_lines()
        quiet_worker_count_warning()
        _PRIVATE["started"], _PRIVATE["gcs"] = True, ray.get_runtime_context().gcs_address
        if not _PRIVATE.get("at_exit"):  # before Ray's own shutdown at exit (atexit runs the last registered first)
            atexit.register(_stop_at_exit)
            _PRIVATE["at_exit"] = True
    log.info("started a local Ray%s: %s", " with its dashboard on 127.0.0.1" if dashboard else "",
             ray.cluster_resources())
