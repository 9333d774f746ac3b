"""cluster.yaml passes Ray's own launcher-config validation; a misspelled key does not; jobs are thin."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def cluster_cfg():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_is_valid(cluster_cfg):
    _validate(cluster_cfg)
    types = cluster_cfg["available_node_types"]
    assert types[cluster_cfg["head_node_type"]]["resources"]["GPU"] == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())


def test_cluster_setup_installs_torch_then_the_project(cluster_cfg):
    """The Makefile's order on the rayproject/ray:2.60.0 image: torch/torchvision, then the project with extras,
    from the folder the checkout is mounted at; every node starts Ray with token authentication."""
    makefile = (ROOT / "Makefile").read_text()
    torch_pins = next(line.split("=", 1)[1].split() for line in makefile.splitlines() if line.startswith("TORCH "))
    assert cluster_cfg["docker"]["image"].startswith("rayproject/ray:2.60.0-")
    first, second = cluster_cfg["setup_commands"]
    assert all(f'"{pin}"' in first for pin in torch_pins) and "mmctr_ray" not in first
    mount = next(remote for remote, local in cluster_cfg["file_mounts"].items() if local == ".")
    extras = re.search(r"pip install -q -e '\.(\[[a-z,]+\])'", makefile).group(1)  # the Makefile's: [test,viz]
    assert f'-e "{mount.replace("~", "$HOME")}{extras}"' in second
    assert "~/.ray/auth_token" in cluster_cfg["file_mounts"]
    for cmd in (cluster_cfg["head_start_ray_commands"][-1], cluster_cfg["worker_start_ray_commands"][-1]):
        assert cmd.startswith("RAY_AUTH_MODE=token ray start")


@pytest.mark.parametrize("where", ["top", "node_type"])
def test_misspelled_key_fails_validation(cluster_cfg, where):
    import jsonschema

    cfg = copy.deepcopy(cluster_cfg)
    # the misspelling sits beside the right key, so only the unknown key can fail it (not a required one missing)
    if where == "top":
        cfg["max_wrokers"] = cfg["max_workers"]
    else:
        node = cfg["available_node_types"]["gpu_worker"]
        node["resourcez"] = node["resources"]
    _validate(copy.deepcopy(cluster_cfg))  # the file itself is valid
    typo = "max_wrokers" if where == "top" else "resourcez"
    with pytest.raises(jsonschema.ValidationError, match=f"'{typo}' was unexpected"):
        _validate(cfg)


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_job_entrypoints_forward_to_the_cli(job, monkeypatch, capsys):
    """Each job file run as a script (in this process: a fresh interpreter per file took 1.4 s each, and
    test_pipeline_job_on_a_token_auth_head runs jobs/pipeline.py through `ray job submit`)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [str(ROOT / "jobs" / job), "--help"])
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))  # as `python jobs/JOB.py` puts the script's folder first
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(str(ROOT / "jobs" / job), run_name="__main__")
    assert ended.value.code in (0, None)
    assert f"usage: mmctr {job.removesuffix('.py')}" in capsys.readouterr().out


def test_job_specs_are_submit_job_arguments():
    """Each spec is JobSubmissionClient.submit_job's keyword arguments; its entrypoint parses with the CLI."""
    import inspect
    import shlex

    from ray.job_submission import JobSubmissionClient

    from mmctr_ray.cli import build_parser

    allowed = set(inspect.signature(JobSubmissionClient.submit_job).parameters) - {"self"}
    specs = sorted((ROOT / "jobs" / "specs").glob("*.yaml"))
    assert {p.stem for p in specs} >= {"pipeline", "train"}
    for path in specs:
        spec = yaml.safe_load(path.read_text())
        assert set(spec) <= allowed, f"{path.name}: {set(spec) - allowed}"
        words = shlex.split(spec["entrypoint"])
        assert words[0] == "python" and (ROOT / words[1]).is_file(), words[:2]
        stage = Path(words[1]).stem
        build_parser().parse_args([stage, *words[2:]])  # exits (SystemExit) on an unknown flag
        env = spec["runtime_env"]
        assert env["working_dir"] == "."
        assert {".git", ".venv", "outputs"} <= set(env["excludes"])
        assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"


# --- a Ray head of our own, with token authentication, for `ray job submit` -------------------------------------

RAY_CLI = str(Path(sys.executable).parent / "ray")
TINY_DATA = ["--users", "200", "--items", "100", "--train-rows", "2000", "--valid-rows", "300", "--test-rows", "300",
             "--tags", "100", "--topics", "5", "--images", "8"]


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalHead:
    """``ray start --head --block`` in a process group of its own, with token authentication.

    Everything is this head's alone: its ports (GCS, dashboard, dashboard agent, client server), its temp dir
    (a short path under /tmp: Ray's socket paths must stay under 108 bytes) and its token file, given through
    RAY_AUTH_TOKEN_PATH (never ~/.ray/auth_token, which other Rays on this machine may use). ``stop`` ends only
    this head: SIGTERM to the blocking ``ray start``, whose handler stops the processes it started (GCS,
    raylet, dashboard, ...; they also die with it through PR_SET_PDEATHSIG); then SIGKILL to its process group
    if it lingers; then any process left whose command line or working directory lies in this head's temp dir
    (workers and job drivers carry it). `ray stop` would end every Ray on the machine.
    """

    def __init__(self, num_cpus: int = 2) -> None:
        import secrets
        import tempfile

        self.root = Path(tempfile.mkdtemp(prefix="mmray-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        token_path = self.root / "auth_token"
        token_path.write_text(self.token)
        token_path.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "PYTHONPATH")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), RAY_USAGE_STATS_ENABLED="0",
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM: stop at once, no drain wait
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
        self.env = env  # PYTHONPATH dropped: the job must import mmctr_ray from its uploaded working_dir
        gcs, self.dashboard_port, agent, client = _free_ports(4)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = self.root / "head.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [RAY_CLI, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={self.dashboard_port}",
                 "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
                 f"--ray-client-server-port={client}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                 f"--temp-dir={self.root / 'ray'}", "--include-dashboard=true", "--disable-usage-stats"],
                env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _get(self, path: str, token: str | None):
        import urllib.request

        request = urllib.request.Request(self.address + path,
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        return urllib.request.urlopen(request, timeout=10)

    def http_status(self, path: str, token: str | None) -> int:
        import urllib.error

        try:
            with self._get(path, token) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    def get_json(self, path: str) -> dict:
        with self._get(path, self.token) as response:
            return json.loads(response.read())

    def wait_job(self, submission_id: str, timeout: float) -> str:
        """The job's final status (SUCCEEDED, FAILED, STOPPED), polled through the authenticated jobs API."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.get_json(f"/api/jobs/{submission_id}")["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(2)
        return "TIMEOUT"

    def wait_ready(self, timeout: float = 120) -> None:
        import time
        import urllib.error

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ray start exited {self.proc.returncode}:\n{self.tail()}"
            try:
                if self.http_status("/api/jobs/", self.token) == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise AssertionError(f"the head's job API did not come up in {timeout:.0f}s:\n{self.tail()}")

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY_CLI, *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def stop(self) -> None:
        import shutil
        import signal

        import psutil

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group is this head's alone (start_new_session)
        self.proc.wait(timeout=10)
        root = str(self.root)
        for proc in psutil.process_iter(["pid", "cmdline", "cwd", "uids"]):
            try:
                mine = proc.info["uids"] and proc.info["uids"].real == os.getuid()
                if mine and (root in " ".join(proc.info["cmdline"] or []) or (proc.info["cwd"] or "").startswith(root)):
                    proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    head = LocalHead(num_cpus=2)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


@pytest.mark.slow
def test_pipeline_job_on_a_token_auth_head(ray_head, tmp_path):
    """`ray job submit --working-dir .` of jobs/pipeline.py (tiny config, synthetic data, OUT a file:// URI)."""
    import time
    import zipfile

    assert ray_head.http_status("/api/jobs/", None) == 401  # token authentication is on: no token, no API
    assert ray_head.http_status("/api/jobs/", "0" * 64) == 403  # a wrong token is refused
    spec = yaml.safe_load((ROOT / "jobs" / "specs" / "pipeline.yaml").read_text())
    runtime_env = {k: v for k, v in spec["runtime_env"].items() if k != "working_dir"}  # --working-dir . below
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    out, work, sid = tmp_path / "out", tmp_path / "work", f"mmctr-test-{os.getpid()}-{time.time_ns()}"
    r = ray_head.ray("job", "submit", f"--address={ray_head.address}", "--working-dir", ".", "--runtime-env",
                     str(tmp_path / "runtime_env.yaml"), "--submission-id", sid, "--no-wait", "--",
                     "python", "jobs/pipeline.py", "--out", f"file://{out}", "--work", str(work),
                     "--config", "configs/tiny.yaml", *TINY_DATA)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    status = ray_head.wait_job(sid, timeout=480)
    logs = ray_head.get_json(f"/api/jobs/{sid}/logs")["logs"]
    assert status == "SUCCEEDED", logs[-4000:]
    # the job ran this checkout's code, from the working_dir Ray unpacked under the head's temp dir
    origin = next(line for line in logs.splitlines() if "pipeline: mmctr_ray from" in line)
    assert str(ray_head.root) in origin and "working_dir_files" in origin, origin
    package = Path(origin.rsplit(" from ", 1)[1]).parent
    assert (package / "jobs" / "pipeline.py").is_file() and not (package / ".git").exists()
    assert sum(f.stat().st_size for f in package.rglob("*") if f.is_file()) < 100 * 2**20
    # outputs under the file:// OUT: run, report, fused table, features summary, submission
    summary = json.loads((out / "run" / "summary.json").read_text())
    epochs = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["epochs"] == 2 and summary["best_valid_auc"] == max(e["valid_auc"] for e in epochs)
    assert [len(e["worker_peak_rss_mib"]) for e in epochs] == [1, 1] and epochs[0]["worker_peak_rss_mib"][0] > 100
    assert (out / "run" / "report" / "curves.png").is_file() and (out / "run" / "checkpoint_epoch_002").is_dir()
    assert (out / "item_emb.parquet").is_file() and (out / "features" / "features_summary.json").is_file()
    with zipfile.ZipFile(out / "submission.zip") as z:
        lines = z.read("prediction.csv").decode().splitlines()
    assert lines[0] == "ID,Task2" and len(lines) == 301 and lines[1].startswith("0,")
    assert "pipeline: valid AUC" in logs and not (out / "data").exists()  # the data stays in --work
    # on a cluster it joined, the run may wait for its workers: Ray Train's lines say what it asked for and when they
    # started (quiet on the private local Ray, sized for the run: test_ctrl_c_ends_a_run_with_one_line_...)
    assert "Requesting resources" in logs and "Started training worker group of size 1" in logs


def test_kuberay_rayjob_runs_the_pipeline_job():
    """k8s/rayjob.yaml: the fields KubeRay reads, consistent with jobs/, the Dockerfile and Ray 2.60.0."""
    import shlex

    from mmctr_ray.cli import build_parser

    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text().splitlines()
    base = next(line.split()[1] for line in dockerfile if line.startswith("FROM "))
    project = next(line.split()[-1] for line in dockerfile if line.startswith("COPY ")) + "/"  # in the image
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "python" and words[1] == project + "jobs/pipeline.py" and (ROOT / "jobs/pipeline.py").is_file()
    config = words[words.index("--config") + 1]
    assert config.startswith(project) and (ROOT / config.removeprefix(project)).is_file()
    build_parser().parse_args(["pipeline", *words[2:]])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["authOptions"]["mode"] == "token"
    assert base.startswith(f"rayproject/ray:{cluster['rayVersion']}-")
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    (group,) = cluster["workerGroupSpecs"]
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    worker = group["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    for container in (head, worker):
        assert container["image"].rsplit(":", 1)[1] == base.split(":", 1)[1]  # tag = Ray's image tag
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/mnt/shared"}
    gpus = float(words[words.index("--gpus-per-worker") + 1])
    assert gpus * int(words[words.index("--workers") + 1]) <= group["maxReplicas"] * int(
        worker["resources"]["limits"]["nvidia.com/gpu"])


@pytest.mark.slow
def test_without_an_address_a_cluster_started_on_this_machine_is_not_joined():
    """`ray start` leaves its address in /tmp/ray/ray_current_cluster and ray.init() without an address joins it:
    the command then sized its pools against that cluster's resources and passed it settings a cluster refuses.
    A dashboard (HTTP) address in RAY_ADDRESS, as Ray's job docs have users export, is one line, not a traceback."""
    code = """
import functools
import ray._private.services as services
from mmctr_ray.errors import ConfigError
from mmctr_ray.ray_env import init_ray
from mmctr_ray.ray_env import private_local_ray
try:
    init_ray(address="http://127.0.0.1:8265", num_cpus=2)
except ConfigError as err:
    print("ERROR", err)
services.find_bootstrap_address = lambda temp_dir=None: "192.0.2.1:6379"  # as a `ray start` here would leave it
services.find_gcs_addresses = functools.lru_cache(lambda: ["192.0.2.1:6379"])  # ray.init clears its cache
init_ray(address="local", num_cpus=1)  # Ray's word for a new Ray of its own: the private one, with its checks
import ray
print("GCS", ray.get_runtime_context().gcs_address, ray.cluster_resources()["CPU"], private_local_ray())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    said = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("ERROR", "GCS")))
    assert said["ERROR"] == ("Ray address 'http://127.0.0.1:8265' (--address or RAY_ADDRESS): an http(s) address is "
                             "a dashboard's, for `ray job submit`; a command joins a cluster at its GCS address "
                             "(HOST:6379, or `auto` on one of its nodes)"), said["ERROR"]  # Ray's was cut short
    gcs, cpus, private = said["GCS"].split()
    assert not gcs.startswith("192.0.2.1") and float(cpus) == 1.0  # a Ray of its own, with the CPUs it asked for
    assert private == "True"
    # a flag that sizes the private Ray, given while an address is in effect: said, not dropped without a word
    assert "--num-cpus: for the private local Ray only; joining the Ray at http://127.0.0.1:8265 (--address), whose " \
        "resources are its own" in r.stderr



def test_a_joined_clusters_workers_name_it_unless_the_job_sets_its_own_hook(monkeypatch):
    """With another Ray on a node, Ray Train's placement-group cleaner in a joined cluster logged "Found multiple
    active Ray instances" every 1.5 s (7 lines in a 1-epoch run; none with the hook, tried by hand on two heads)."""
    import ray

    from mmctr_ray import ray_env

    calls = []

    def init(**kwargs):
        calls.append(kwargs.get("runtime_env"))
        if len(calls) == 1 and conflict:
            raise ValueError("Failed to merge the Job's runtime env ... worker_process_setup_hook ... conflicts")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    for conflict, seen in ((False, [{"worker_process_setup_hook": "mmctr_ray.ray_env.joined_worker_setup"}]),
                           (True, [{"worker_process_setup_hook": "mmctr_ray.ray_env.joined_worker_setup"}, None])):
        calls.clear()
        ray_env._join("127.0.0.1:6399")
        assert calls == seen
    import importlib

    module, name = ray_env.JOIN_SETUP_HOOK.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is ray_env.joined_worker_setup  # a worker imports it


def test_a_joined_clusters_workers_drop_ray_trains_advice_on_a_resumed_runs_snapshot(monkeypatch, caplog):
    """Every `mmctr train --resume` on a cluster printed Ray Train's "A run snapshot was found ... configure a new,
    unique `RunConfig(name)` or delete the existing folder": not how a run of mmctr is resumed or replaced."""
    import logging

    from mmctr_ray import ray_env

    monkeypatch.setattr(ray_env, "pin_ray_address", lambda: None)  # a worker's: no Ray here
    ray_env.joined_worker_setup()
    snapshot = logging.getLogger(ray_env.SNAPSHOT_LOGGER)
    with caplog.at_level(logging.INFO, logger=ray_env.SNAPSHOT_LOGGER):
        snapshot.info("A run snapshot was found in storage folder at: '/x/run'\nThis snapshot contains ...")
        snapshot.info("Another line of the checkpoint manager")
    assert [r.getMessage() for r in caplog.records] == ["Another line of the checkpoint manager"]


def test_a_join_the_cluster_refuses_names_the_token(monkeypatch):
    """A join without the cluster's token (the README's clusters use token auth), or with another, ended after ~20 s
    of Ray's "Unauthenticated ... InvalidAuthToken" warnings in "Failed to connect to Ray cluster at ...", which
    named no token."""
    import ray

    import mmctr_ray.ray_env as ray_env
    from mmctr_ray.errors import ConfigError

    def refused(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:6399.\nmore")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setattr(ray_env, "check_reachable", lambda address: None)  # its port answers
    monkeypatch.setattr(ray_env, "_PRIVATE", {})  # a private Ray of this process (another test's) is left as it is
    monkeypatch.setattr(ray_env, "_forget_private_env", lambda: None)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(ConfigError, match=r"^Ray address '127.0.0.1:6399' \(--address or RAY_ADDRESS\): Failed to "
                                          r"connect to Ray cluster at 192.0.2.2:6399.; if the cluster uses token "
                                          r"auth, set RAY_AUTH_MODE=token and its token \(~/.ray/auth_token, "):
        ray_env.init_ray(address="127.0.0.1:6399")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ConfigError, match=r"6399.; with RAY_AUTH_MODE=token: check that this token .* is the "
                                          r"cluster's$"):
        ray_env.init_ray(address="127.0.0.1:6399")


def test_joining_an_address_where_nothing_answers_fails_at_once_as_one_line():
    """Ray's own join retried an address where nothing listens (a cluster that is down, a wrong port) for many
    minutes, printing "Failed to connect to GCS" every 40 s, then raised a traceback. Now: one line, at once, and
    no Ray joined or started (a fresh interpreter: init_ray changes its process's environment)."""
    import socket

    from mmctr_ray import ray_env

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
    code = f"""
import ray
from mmctr_ray.errors import ConfigError
from mmctr_ray.ray_env import init_ray
for address in ("127.0.0.1:{port}", "localhost:6379x"):
    try:
        init_ray(address=address)
    except ConfigError as err:
        print("ERROR", err)
print("INITIALIZED", ray.is_initialized())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert time.monotonic() - started < 30  # a refused connection: at once, not after Ray's retries
    said = [line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith("ERROR ")]
    assert len(said) == 2 and "INITIALIZED False" in r.stdout, r.stdout
    from ray._private.services import canonicalize_bootstrap_address

    gcs = canonicalize_bootstrap_address(f"127.0.0.1:{port}")  # this node's IP: said beside the address asked
    where = re.escape(gcs if gcs == f"127.0.0.1:{port}" else f"{gcs}, where Ray takes 127.0.0.1:{port}")
    assert re.fullmatch(rf"Ray address '127\.0\.0\.1:{port}' \(--address or RAY_ADDRESS\): nothing answers at "
                        rf"{where} \(.*refused.*\); is the cluster up \(`ray status --address {re.escape(gcs)}` on "
                        rf"its head\)\?", said[0]), said[0]
    assert said[1] == "Ray address 'localhost:6379x' (--address or RAY_ADDRESS): port '6379x' is not a number " \
        "(expected host:port)"
    assert "Failed to connect to GCS" not in r.stderr
    with socket.socket() as s:  # something listening there: the probe lets the join go on, to Ray's own checks
        s.bind(("0.0.0.0", 0))
        s.listen()
        ray_env.check_reachable(f"127.0.0.1:{s.getsockname()[1]}")
    ray_env.check_reachable("ray://192.0.2.1:10001")  # Ray Client: left to Ray

STRAGGLER = """
import os, subprocess, sys
import ray
from mmctr_ray.ray_env import init_ray, stop_ray
os.environ["RAY_kill_child_processes_on_worker_exit"] = "0"  # Ray's worker kills its children as it exits
init_ray(num_cpus=1)
# a process named as Ray's workers are that does not end with the Ray (the deadlocked worker cannot be had on
# demand): a worker's child, in the raylet's tree as the workers are, in a session of its own (in the worker's,
# Ray's shutdown ended it before stop_ray looked)
spawn = lambda: subprocess.Popen(["bash", "-c", "exec -a 'ray::Straggler' sleep 300"], start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
straggler = ray.get(ray.remote(spawn).remote())
# a `ray::` process of another Ray (one a child of this process started): this process's descendant, not the raylet's
other = subprocess.Popen(["bash", "-c", "exec -a 'ray::Other' sleep 300"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
print(straggler, other.pid, flush=True)
if sys.argv[1] == "stop_ray":
    stop_ray(grace_s=2)
"""  # otherwise the script ends here, as a command that ended normally


def _ended(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("how, grace", [("stop_ray", 2), ("exit", 5)])
def test_a_worker_process_that_outlives_the_local_rays_shutdown_is_killed_with_a_warning(how, grace):
    """Ray 2.60's core worker can deadlock in its own exit; such a `ray::TrainController` outlived a CI run,
    reparented to init. `stop_ray` kills a private Ray's `ray::` processes still running after its shutdown, and
    runs as the process exits too (it ran on Ctrl-C and SIGTERM only: a command that ended normally, or with an
    error, left Ray's own shutdown at exit to it, which leaves them). The real workers, gone by then, are left alone
    (no other warning), and so is a `ray::` process outside the private Ray's raylet (every `ray::` descendant of the
    process was killed, another Ray's a child had started too)."""
    r = subprocess.run([sys.executable, "-c", STRAGGLER, how], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    pids = [int(word) for word in r.stdout.split() if word.isdigit()]
    try:
        assert r.returncode == 0 and len(pids) == 2, r.stderr[-2000:]
        pid, other = pids
        deadline = time.monotonic() + 10
        while not _ended(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _ended(pid) and not _ended(other)  # the raylet's straggler ended; the other still runs
    finally:
        for left in pids:
            with contextlib.suppress(OSError):
                os.kill(left, signal.SIGKILL)
    warned = [line for line in r.stderr.splitlines() if "outlived" in line]
    assert warned == [f"a worker process of the local Ray outlived its shutdown by {grace} s (pid {pid}, "
                      f"ray::Straggler 300): killed"], r.stderr[-2000:]


def test_a_worker_that_exited_is_not_waited_for_or_killed_while_it_waits_to_be_reaped(caplog):
    """A Ray worker that exited stays a zombie until its parent reaps it: the raylet, or init once the raylet is
    gone, and a container's first process may never do it. psutil.wait_procs counts a zombie that is not this
    process's child as running: every command's exit waited the whole grace and warned of a worker it "killed"."""
    import psutil

    from mmctr_ray import ray_env

    # a child that exited under a parent that never reaps it: a zombie that is not this process's child, as a worker
    # under the raylet is. (A shell's `true & exec sleep 300` was one only when `true` outlived the exec; under load
    # the shell reaped it first and no zombie came.)
    never_reaps = "import os, time\nif os.fork() == 0:\n    os._exit(0)\ntime.sleep(300)"
    parent = subprocess.Popen([sys.executable, "-c", never_reaps])
    running = subprocess.Popen(["sleep", "300"])
    try:
        deadline = time.monotonic() + 10
        while not (children := psutil.Process(parent.pid).children()) or children[0].status() != \
                psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, children
            time.sleep(0.05)
        zombie = children[0]
        t0 = time.monotonic()
        ray_env._end_stragglers([zombie], grace_s=60)
        assert time.monotonic() - t0 < 30  # not the whole grace
        assert not [r for r in caplog.records if "outlived" in r.getMessage()]
        ray_env._end_stragglers([zombie, psutil.Process(running.pid)], grace_s=0.5)
        assert running.wait(timeout=10) == -signal.SIGKILL
        warned = [r.getMessage() for r in caplog.records if "outlived" in r.getMessage()]
        assert len(warned) == 1 and f"(pid {running.pid}, sleep 300)" in warned[0], warned
    finally:
        for proc in (running, parent):  # the zombie goes with its parent
            proc.kill()
            proc.wait()


def test_the_shutdown_at_exit_waits_for_the_workers_last_lines_as_rays_own_does(monkeypatch):
    """Ray's shutdown at exit waits half a second for the workers' last log lines to reach the driver; ours runs
    before it, and with a plain ray.shutdown() Ray's found nothing left to wait for."""
    import ray

    from mmctr_ray import ray_env

    calls = []

    class Context:
        gcs_address = "127.0.0.1:1"

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    monkeypatch.setattr(ray, "shutdown", lambda **kwargs: calls.append(kwargs))
    for stop in (ray_env._stop_at_exit, ray_env.stop_ray):
        monkeypatch.setitem(ray_env._PRIVATE, "gcs", Context.gcs_address)
        monkeypatch.setitem(ray_env._PRIVATE, "started", False)  # a joined Ray: no workers of ours to look for
        stop()
    assert calls == [{"_exiting_interpreter": True}, {"_exiting_interpreter": False}]


@pytest.mark.parametrize("before, since, again", [("disabled", None, False), (None, "disabled", False),
                                                  (None, "disabled", True)],
                         ids=["the environment's", "set after the private Ray", "set between two private Rays"])
def test_a_cluster_joined_after_a_private_ray_gets_the_environment_the_private_one_changed_back(monkeypatch, before,
                                                                                                since, again):
    """The private Ray keeps its servers on loopback (Ray's cluster switch off) and token authentication on, through
    this process's environment. A cluster joined later in the same process (a notebook's second command) was
    joined with both: the driver on 127.0.0.1, which the cluster's nodes cannot reach, and the private Ray's
    authentication mode instead of the cluster's. What the user set since (for the cluster, before joining it) is
    the user's: it was put back to the value from before the first private Ray."""
    import ray
    from ray._private import ray_constants
    from ray._raylet import Config

    from mmctr_ray import ray_env
    from mmctr_ray.errors import ConfigError

    switch = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    monkeypatch.delenv(switch, raising=False)
    if before is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", before)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setitem(ray_env._PRIVATE, "env_before", {})
    ray_env._loopback_only()  # what init_ray does before it starts the private Ray
    ray_env._token_auth_on()
    assert (os.environ.get(switch), os.environ["RAY_AUTH_MODE"], ray_constants.ENABLE_RAY_CLUSTER) == ("0", "token",
                                                                                                      False)
    if since is not None:
        monkeypatch.setenv("RAY_AUTH_MODE", since)
    if again:  # another command on a private Ray
        ray_env._loopback_only()
        ray_env._token_auth_on()
    seen = {}

    def join(address, **kwargs):  # the environment the join starts from; no cluster answers at this address
        seen.update(env=os.environ.get(switch), auth=os.environ.get("RAY_AUTH_MODE"),
                    clusters=ray_constants.ENABLE_RAY_CLUSTER)
        raise ConnectionError(f"no Ray at {address}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_env, "check_reachable", lambda address: None)  # the join itself is what is looked at
    monkeypatch.setattr(ray, "init", join)
    try:
        with pytest.raises(ConfigError, match=r"^Ray address '192.0.2.1:6379' \(--address or RAY_ADDRESS\): no Ray "
                                              r"at 192.0.2.1:6379$"):
            ray_env.init_ray(address="192.0.2.1:6379")
    finally:
        monkeypatch.undo()
        Config.initialize("")  # Ray's cached config, from this process's environment again
    assert seen == {"env": None, "auth": "disabled", "clusters": True}
