"""Ray Train's torch process group, set up from inside the workers so that a run's controller never imports torch.

Ray Train's ``TorchConfig`` is defined in a module that imports torch at its top, and every run's controller (an
actor of its own, in a process of its own) unpickles the trainer's backend config to start the workers' process
group with it. So each controller imported torch for that alone: ~2.8 s of a warm 1-epoch run of the tests' data
on the 2-core VM, and ~500 MB of the controller's resident memory (2026-12-01).

:class:`WorkerTorchConfig` is a ``BackendConfig`` (Ray Train's DeveloperAPI for training backends) whose controller
side needs Ray alone: it asks rank 0 for an address and a free port, and calls Ray Train's own functions for the
environment, the process group and its teardown (``ray.train.torch.config``) in the workers, which import torch
anyway. What the workers get is what ``TorchConfig`` gives them: ``MASTER_ADDR``/``MASTER_PORT``, ``RANK`` and the
other variables of ``torchrun``, gloo on the CPU, NCCL on GPUs, and the worker's CUDA device made current around
the training function. :func:`available` says whether this Ray has those functions (Ray 2.60 does); where it
does not, :func:`mmctr_ray.ray_env.torch_trainer` keeps ``TorchConfig``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ray
from ray.train.backend import Backend, BackendConfig

log = logging.getLogger(__name__)

RAY_WORKER_FUNCTIONS = ("_set_torch_distributed_env_vars", "_setup_torch_process_group", "_shutdown_torch",
                        "TorchConfigContextManager")


def available() -> bool:
    """Whether this Ray has the worker-side functions :class:`WorkerTorchConfig` calls, and Train V2 (Ray 2.60 has
    both). ``ray.train.torch.config`` is read as source, not imported: importing it imports torch, which a run's
    driver and a search's trial process need nowhere else (~1.2 s and ~470 MB of resident memory a process)."""
    import ast

    import ray.train

    try:
        from ray.train._internal.utils import get_address_and_port  # noqa: F401
        from ray.train.v2._internal.constants import is_v2_enabled
        from ray.train.v2._internal.util import TrainingFramework  # noqa: F401

        tree = ast.parse((Path(ray.train.__file__).parent / "torch" / "config.py").read_text())
    except (ImportError, OSError, SyntaxError):
        return False
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    return is_v2_enabled() and all(name in defined for name in RAY_WORKER_FUNCTIONS)


def train_in_worker(config: dict[str, Any]) -> None:
    """The training function Ray Train runs in each worker: :func:`mmctr_ray.training.train_loop_per_worker`, named
    here so that the process that builds the trainer (a run's driver, a search's trial) need not import it, and
    torch with it; the worker imports both as it starts."""
    from mmctr_ray.training import train_loop_per_worker

    train_loop_per_worker(config)


# In the workers (each imports torch there, through Ray Train's module):

def _load_torch() -> None:
    import ray.train.torch.config  # noqa: F401  (torch with it: ~2.8 s on the 2-core VM)


def _environment(addr: str, port: int) -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    _set_torch_distributed_env_vars()  # RANK, WORLD_SIZE, LOCAL_RANK, ... as torchrun sets them


def _process_group(**kwargs: Any) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def _shutdown(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


@contextlib.contextmanager
def _worker_device() -> Iterator[None]:
    """Around the training function: the worker's CUDA device made current (nothing on the CPU)."""
    from ray.train.torch.config import TorchConfigContextManager

    with TorchConfigContextManager():
        yield


# In the controller (Ray only):

class _WorkerTorchBackend(Backend):
    share_cuda_visible_devices = True  # as Ray's torch backend: a node's GPU workers see each other's devices

    def on_start(self, worker_group: Any, backend_config: WorkerTorchConfig) -> None:
        from ray.train._internal.utils import get_address_and_port

        # torch first: rank 0 binds the free port it names below when the process group starts, and a port named
        # before a ~3 s import was taken by then in one run of five (EADDRINUSE: Ray's own processes bind ports)
        worker_group.execute(_load_torch)
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_environment, addr=addr, port=port)
        ray.get([worker_group.execute_single_async(rank, _process_group, backend=backend_config.backend,
                                                   world_rank=rank, world_size=len(worker_group),
                                                   init_method="env://", timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group: Any, backend_config: WorkerTorchConfig) -> None:
        from ray._private.ray_constants import env_integer
        from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S as DEFAULT
        from ray.train.constants import TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S as TIMEOUT_ENV

        futures = worker_group.execute_async(_shutdown, destroy_process_group=len(worker_group) > 1)
        timeout = env_integer(TIMEOUT_ENV, DEFAULT)
        end_group(futures, timeout)


def end_group(futures: list, timeout: float) -> None:
    """Wait for the workers' process-group shutdown, up to ``timeout`` seconds. Once a worker turns out dead (the
    failure that has the group shut down before a restart), the wait ends without an error: the group goes with its
    actors, and a survivor's shutdown may wait on the dead peer. Ray's own backend raised the dead worker's
    ``ActorDiedError``, which Ray Train logged with a traceback ("Graceful shutdown of backend failed") in every
    restart. Another error a worker's shutdown raises still comes through."""
    import time

    from ray.exceptions import RayActorError

    pending, deadline = list(futures), time.monotonic() + timeout
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            log.warning("the workers' torch process group did not shut down within %g s", timeout)
            return
        try:
            ray.get(done[0])
        except RayActorError:
            return


@dataclass
class WorkerTorchConfig(BackendConfig):
    """Ray Train's torch backend (``TorchConfig``'s ``env://`` set-up) without torch in the controller.

    ``backend``: ``gloo`` (CPU workers) or ``nccl`` (GPU workers); ``timeout_s``: of the process group's
    collectives, as ``TorchConfig``'s."""

    backend: str = "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type:
        return _WorkerTorchBackend

    @property
    def train_func_context(self) -> Any:
        return _worker_device

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}
