"""Shared fixtures: a tiny synthetic data set in the challenge layout, written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mmctr_ray.data.synthetic import SynthSpec  # noqa: E402
from mmctr_ray.data.writer import write_synthetic  # noqa: E402

TINY_SPEC = SynthSpec(users=300, items=200, train_rows=3_000, valid_rows=500, test_rows=400, tags=100,
                      topics=8, image_size=16, seed=11, chunk_rows=1_000)


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _in_the_repository():
    """Tests name the shipped configs as a user in the repository does (``configs/tiny.yaml``): run from any folder
    (``pytest /path/to/tests/...``), they found none. First of every fixture; a test's own ``monkeypatch.chdir``
    comes back here."""
    os.chdir(REPO)


@pytest.fixture(scope="session")
def tiny_spec() -> SynthSpec:
    return TINY_SPEC


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A read-only-by-convention tiny data set; copy it before corrupting it."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, TINY_SPEC, progress=lambda msg: None)
    return out


@pytest.fixture(scope="session")
def strict_json():
    """``strict_json(text)``: ``json.loads`` that refuses ``NaN``/``Infinity``, as jq and JavaScript do."""
    import json

    def refuse(token: str):
        raise ValueError(f"{token} is not JSON")

    return lambda text: json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="session")
def split_into_parts():
    """``split_into_parts(data_dir, split, parts)``: see :func:`_split_into_parts`."""
    return _split_into_parts


def _split_into_parts(data_dir, split: str, parts: int, padded: bool = True) -> list:
    """Turn ``split`` of ``data_dir`` into a folder of that name holding ``parts`` part files (row order kept, the
    last part empty), beside files that are not parts (a ``_SUCCESS`` marker, a checksum, a hidden partial
    ``.parquet`` and an ``_``-prefixed metadata file, none of them a readable split); return the part paths.
    ``padded``: ``part-00002.parquet`` (Spark, Ray Data), else ``part-2.parquet`` (pyarrow, Dask)."""
    import numpy as np
    import pyarrow.parquet as pq

    from mmctr_ray.schema import Layout

    path = Layout(data_dir).split(split)
    table = pq.read_table(path)
    path.unlink()
    path.mkdir()
    bounds = np.linspace(0, table.num_rows, parts, dtype=int).tolist() + [table.num_rows]
    out = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        out.append(path / (f"part-{i:05d}.parquet" if padded else f"part-{i}.parquet"))
        pq.write_table(table.slice(lo, hi - lo), out[-1], row_group_size=128)
    (path / "_SUCCESS").write_text("")
    (path / ".part-00000.parquet.crc").write_bytes(b"\x00")
    (path / ".part-00009.parquet").write_bytes(b"partial")  # hidden: a writer's temporary file, not a part
    (path / "_common_metadata.parquet").write_bytes(b"PAR1")
    return out
