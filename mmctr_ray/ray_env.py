"""Starting or joining Ray, in one place (the CLI and jobs call it; library code never does)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def quiet_ray_data(verbose: bool = False) -> None:
    """Ray Data logs every operator's progress at INFO when stderr is not a terminal: keep that for -v.

    Our stages report their own progress (rows, rows/s) instead.
    """
    if not verbose:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a private local Ray.

    The local Ray binds its dashboard to 127.0.0.1 and has ``num_cpus`` logical CPUs when given.
    """
    import ray

    quiet_ray_data(verbose)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        log.info("joined Ray at %s: %s", address, ray.cluster_resources())
        return
    # the dashboard (loopback only) serves the state API that Ray Train's placement-group cleaner and Tune's
    # trial clean-up query; without it they retry and warn in a loop
    ray.init(num_cpus=num_cpus, include_dashboard=None, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    log.info("started a local Ray: %s", ray.cluster_resources())
