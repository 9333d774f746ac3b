"""cluster.yaml passes Ray's own launcher-config validation; a misspelled key does not; jobs are thin."""

from __future__ import annotations

import copy
import subprocess
import sys
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


@pytest.mark.parametrize("where", ["top", "node_type"])
def test_misspelled_key_fails_validation(cluster_cfg, where):
    import jsonschema

    cfg = copy.deepcopy(cluster_cfg)
    if where == "top":
        cfg["max_wrokers"] = cfg.pop("max_workers")
    else:
        node = cfg["available_node_types"]["gpu_worker"]
        node["resourcez"] = node.pop("resources")
    with pytest.raises(jsonschema.ValidationError):
        _validate(cfg)


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_job_entrypoints_forward_to_the_cli(job):
    r = subprocess.run([sys.executable, f"jobs/{job}", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"usage: mmctr {job.removesuffix('.py')}" in r.stdout
