"""Shared fixtures: a tiny synthetic data set in the challenge layout, written once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mmctr_ray.data.synthetic import SynthSpec  # noqa: E402
from mmctr_ray.data.writer import write_synthetic  # noqa: E402

TINY_SPEC = SynthSpec(users=300, items=200, train_rows=3_000, valid_rows=500, test_rows=400, tags=100,
                      topics=8, image_size=16, seed=11, chunk_rows=1_000)


@pytest.fixture(scope="session")
def tiny_spec() -> SynthSpec:
    return TINY_SPEC


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A read-only-by-convention tiny data set; copy it before corrupting it."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, TINY_SPEC, progress=lambda msg: None)
    return out
