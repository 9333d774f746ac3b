"""Security defaults: the private local Ray listens on loopback only, keeps token authentication on and starts
no dashboard unless asked; checkpoints, arrays and YAML load without executing anything; no shell runs."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

PACKAGE = Path(__file__).parents[2] / "mmctr_ray"

# Runs in its own process (the test session may hold another Ray): start the CLI's local Ray, then report
# every listening socket of this process and its children, the auth mode, the dashboard URL, and what the jobs
# API (job submission runs code on the cluster) answers to no token, a wrong token and Ray's token.
PROBE = r"""
import json, sys, urllib.error, urllib.request
import psutil
from mmctr_ray.ray_env import init_ray

init_ray(num_cpus=1, dashboard=sys.argv[1] == "1")
import ray
import ray._private.worker as worker
from ray._private.authentication.authentication_utils import is_token_auth_enabled

@ray.remote
def one():
    return 1

assert ray.get(one.remote()) == 1
me = psutil.Process()
listens, unread = [], []
for proc in [me, *me.children(recursive=True)]:
    try:
        listens += [[proc.name(), c.laddr.ip, c.laddr.port] for c in proc.net_connections("inet")
                    if c.status == psutil.CONN_LISTEN]
    except psutil.NoSuchProcess:  # ended between the listing and the read
        pass
    except psutil.Error as err:  # a process whose sockets could not be read is a process not checked
        unread.append(repr(err))
webui = worker._global_node.address_info.get("webui_url") or ""


def status(headers):
    request = urllib.request.Request(f"http://{webui}/api/jobs/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


statuses = {}
if webui:
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    statuses = {"none": status({}), "wrong": status({"Authorization": "Bearer not-the-token"}),
                "ray's": status(get_auth_headers_if_auth_enabled({}))}
from mmctr_ray.ray_env import drop_benign_ray_lines

print("PROBE" + json.dumps({"token_auth": is_token_auth_enabled(), "listens": listens, "unread": unread,
                            "gcs": worker._global_node.address_info["gcs_address"], "webui": webui,
                            "jobs_api": statuses, "benign_filter": drop_benign_ray_lines()}))
"""


def _probe(dashboard: bool, env_auth: str | None) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    if env_auth:
        env["RAY_AUTH_MODE"] = env_auth
    r = subprocess.run([sys.executable, "-c", PROBE, "1" if dashboard else "0"], capture_output=True, text=True,
                       timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("PROBE"))
    return json.loads(line.removeprefix("PROBE"))


def _loopback(ip: str) -> bool:
    return ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.mark.slow
def test_the_local_ray_listens_on_loopback_only_with_token_auth():
    # with the dashboard asked for, so that its servers are checked too; RAY_AUTH_MODE=disabled in the
    # environment must not switch authentication off for the CLI's own Ray
    got = _probe(dashboard=True, env_auth="disabled")
    assert got["unread"] == []
    ports = {s[2] for s in got["listens"]}  # the probe sees Ray's own servers: the GCS and the dashboard
    assert int(got["gcs"].rsplit(":", 1)[1]) in ports and int(got["webui"].rsplit(":", 1)[1]) in ports
    assert [s for s in got["listens"] if not _loopback(s[1])] == []
    assert got["token_auth"] is True
    assert got["jobs_api"] == {"none": 401, "wrong": 403, "ray's": 200}
    assert got["webui"].startswith("127.0.0.1:")
    # not security: this real Ray (2.60) still names its log printer as drop_benign_ray_lines expects
    assert got["benign_filter"] is True


@pytest.mark.slow
def test_sigterm_ends_the_driver_as_rays_own_handler_says_without_a_crash_dump():
    """ray.init sets a Python SIGTERM handler (SystemExit(15)), then its core worker puts a crash handler in front:
    a SIGTERM (a scheduler's preemption) printed a stack dump and could abort the process (`mmctr tune`: exit -6).
    init_ray puts Ray's Python handler back in front, and records the SIGTERM, so `mmctr` can turn it into one line
    (test_cli.py::test_ctrl_c_is_one_line_and_exit_130 reads the record)."""
    code = ("import os, signal, time\nfrom mmctr_ray.ray_env import init_ray, sigterm_received\n"
            "init_ray(num_cpus=1)\nprint('before', sigterm_received())\ntry:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n    print('not ended')\n"
            "except SystemExit:\n    print('after', sigterm_received(), flush=True)\n    raise\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 15 and "not ended" not in r.stdout, (r.returncode, r.stderr[-2000:])
    assert "before False" in r.stdout and "after True" in r.stdout  # what `mmctr` reads to say "terminated"
    assert "SIGTERM received" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("flag", [False, True])
def test_the_dashboard_starts_only_when_asked(monkeypatch, flag):
    import ray

    from mmctr_ray.ray_env import init_ray

    seen = {}
    up = {"now": False, "gcs": "127.0.0.1:6379"}
    monkeypatch.setattr(ray, "is_initialized", lambda: up["now"])
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address=up["gcs"]))
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for var in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.setenv(var, "")  # restored after the test: init_ray sets them for the Ray it starts
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    init_ray(num_cpus=1, dashboard=flag)
    assert seen["include_dashboard"] is flag and seen["dashboard_host"] == "127.0.0.1"
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"  # no preemption on one machine: no watcher
    from mmctr_ray.ray_env import private_local_ray

    up["now"] = True
    assert private_local_ray()
    up["gcs"] = "10.0.0.5:6379"  # shut down, then `ray.init(address=...)` by hand: not the Ray this process started
    assert not private_local_ray()
    up["now"] = False
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(joined=kw))
    init_ray(address="ray://head:10001")  # later, the same process joins a cluster (spot nodes can go)
    assert seen["joined"]["address"] == "ray://head:10001" and not private_local_ray()
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ  # the private Ray's setting is not the cluster's


def _calls(name: str):
    """(file, call node) for every call of ``name`` (e.g. ``torch.load``) in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                yield path.relative_to(PACKAGE.parent), node


def _keyword(node: ast.Call, name: str):
    return next((ast.literal_eval(k.value) for k in node.keywords if k.arg == name), None)


def test_checkpoints_and_arrays_load_without_unpickling():
    loads = list(_calls("torch.load"))
    assert loads, "torch.load is no longer called: update this test to the new loader"
    assert [str(p) for p, n in loads if _keyword(n, "weights_only") is not True] == []
    assert [str(p) for p, n in _calls("np.load") if _keyword(n, "allow_pickle") is not False] == []
    assert list(_calls("pickle.load")) == [] and list(_calls("pickle.loads")) == []


def test_yaml_is_safe_loaded_and_no_shell_runs():
    import importlib

    import yaml

    for path, node in _calls("yaml.load"):  # allowed with a SafeLoader subclass
        module = importlib.import_module(".".join(path.with_suffix("").parts))
        loader = next(ast.unparse(k.value) for k in node.keywords if k.arg == "Loader")
        assert issubclass(getattr(module, loader), yaml.SafeLoader), f"{path}: yaml.load with {loader}"
    assert list(_calls("yaml.unsafe_load")) == [] and list(_calls("yaml.full_load")) == []
    assert list(_calls("yaml.load")) or list(_calls("yaml.safe_load")), "no YAML loading found: update this test"
    assert [str(p) for name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput")
            for p, _ in _calls(name)] == []
    shells = [str(p) for name in ("subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
                                  "subprocess.check_output") for p, n in _calls(name) if _keyword(n, "shell")]
    assert shells == []


class _RunsCode:
    """A pickled object that, when unpickled, creates a marker file: what a tampered checkpoint could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path):
    import torch

    from mmctr_ray.checkpoint import FILES, MANIFEST, TrainState, load_checkpoint, save_checkpoint
    from mmctr_ray.config import load_config
    from mmctr_ray.errors import DataError
    from mmctr_ray.features import FeatureMap

    ck = tmp_path / "checkpoint_epoch_001"
    ck.mkdir()
    model = torch.nn.Linear(3, 1)
    save_checkpoint(ck, model, None, TrainState(epoch=1, lr=1e-3), load_config(None),
                    FeatureMap(num_items=5, tag_vocab=6, tags_per_item=2, vector_dim=4, num_users=7), {})
    assert set(load_checkpoint(ck).model_state) == {"weight", "bias"}  # the untampered checkpoint loads
    marker = tmp_path / "code-ran"
    torch.save({"weight": _RunsCode(marker)}, ck / "model.pt")
    sizes = {f: (ck / f).stat().st_size for f in FILES if (ck / f).is_file()}  # a whole copy, by its manifest
    (ck / MANIFEST).write_text(json.dumps(sizes))
    with pytest.raises(DataError, match=r"checkpoint_epoch_001/model\.pt: not a state dict of tensors; refused "
                                        r"without running it \(.*GLOBAL os\.makedirs"):
        load_checkpoint(ck)
    assert not marker.exists()


def test_a_fusion_fit_holding_an_object_array_is_refused_without_running_it(tmp_path):
    import numpy as np

    from mmctr_ray.fusion import FittedFusion

    marker = tmp_path / "code-ran"
    path = tmp_path / "fit.npz"
    np.savez(path, strategy=np.array("v1"), parts=np.array([_RunsCode(marker)], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        FittedFusion.load(path)
    assert not marker.exists()
