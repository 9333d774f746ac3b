"""`mmctr convert`: raw MicroLens files written here → the challenge layout, checked row by row against a plain
reference implementation (ids, strict-past histories, splits, negatives), determinism, and bad raw input."""

from __future__ import annotations

import io
import json
import shutil
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmctr_ray.config import FusionConfig
from mmctr_ray.convert.items import levels
from mmctr_ray.convert.pipeline import STAGING, _DistinctIds, bucket_keys, run_convert
from mmctr_ray.convert.raw import RawSpec
from mmctr_ray.convert.rows import RowSpec
from mmctr_ray.data.writer import write_synthetic
from mmctr_ray.errors import ConfigError, DataError, OutputExistsError
from mmctr_ray.schema import SEQ_LEN, SPLITS, Layout
from mmctr_ray.validate import validate

ROOT = Path(__file__).parent.parent
K = 3  # negatives per positive (the default)
FAST = {"shuffle": "sort", "partitions": 3}  # no aggregator actors to start: seconds on a 2-core box

pytestmark = pytest.mark.slow


def make_raw(root: Path, seed: int = 0, users: int = 120, items: int = 300) -> pd.DataFrame:
    """MicroLens-style raw files in ``root``; returns the interactions (raw ids) the pairs file holds.

    Raw ids are sparse and the files unsorted; timestamps tie now and then; one (user, item) repeats later;
    one user has 130 interactions (history truncation); some users have 1 or 2.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    item_ids = 1000 + 7 * rng.permutation(items)
    titles = pd.DataFrame({"item": item_ids, "title": [f'Title {i}, with "quotes"' for i in item_ids]})
    titles.to_csv(root / "MicroLens-tiny_title_en.csv", index=False)
    lv = pd.DataFrame({"item": item_ids, "likes": rng.integers(0, 50, items), "views": rng.integers(0, 5000, items)})
    lv.to_csv(root / "MicroLens-tiny_likes_and_views.txt", sep="\t", header=False, index=False)
    pd.DataFrame({"item": item_ids[:20], "tags": ["cats|pets" if i % 2 else "food" for i in range(20)]}).to_csv(
        root / "MicroLens-tiny_tags.csv", index=False)
    (root / "MicroLens-tiny_covers").mkdir()
    for i in item_ids[:5]:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (int(i) % 255, 0, 0)).save(buf, format="JPEG")
        (root / "MicroLens-tiny_covers" / f"{i}.jpg").write_bytes(buf.getvalue())
    weights = 1.0 / np.arange(1, items + 1)  # popular and unpopular items
    rows = []
    for u in range(users):
        n = 130 if u == 0 else int(rng.integers(1, 14))
        chosen = rng.choice(items - 40, size=n, replace=False, p=weights[:-40] / weights[:-40].sum())  # 40 unused
        ts = 1_600_000_000_000 + np.sort(rng.integers(0, 40, n)) * 1000  # ties
        rows += [(500 + 11 * u, int(item_ids[c]), int(t)) for c, t in zip(chosen, ts)]
    again = next(r for r in rows if r[0] == 500 + 11 * 5)
    rows.append((again[0], again[1], 1_700_000_000_000))  # a repeat: only the first occurrence counts
    pairs = pd.DataFrame(rows, columns=["user", "item", "timestamp"]).sample(frac=1.0, random_state=seed)
    pairs.to_csv(root / "MicroLens-tiny_pairs.csv", index=False)
    return pairs


def reference(pairs: pd.DataFrame) -> dict[tuple[int, int], tuple[str, tuple[int, ...]]]:
    """(raw user, raw item) of every positive row → (split, history of raw items), computed the plain way."""
    df = pairs.sort_values(["user", "item", "timestamp"]).drop_duplicates(["user", "item"], keep="first")
    out = {}
    for user, g in df.sort_values(["user", "timestamp", "item"]).groupby("user"):
        items, ts, n = g["item"].tolist(), g["timestamp"].tolist(), len(g)
        for p in range(n):
            hist = [items[j] for j in range(p) if ts[j] < ts[p]][-SEQ_LEN:]
            if hist:
                split = "test" if n >= 3 and p == n - 1 else "valid" if n >= 3 and p == n - 2 else "train"
                out[(user, items[p])] = (split, tuple(hist))
    return out


def read_rows(out: Path) -> pd.DataFrame:
    """Every row of the three splits with ids mapped back to raw ones."""
    users = pq.read_table(out / "mapping" / "users.parquet").to_pandas().set_index("user_id")["raw_user"]
    item_raw = np.r_[0, pq.read_table(out / "mapping" / "items.parquet").column("raw_item").to_numpy()]
    frames = []
    for split in SPLITS:
        df = pq.read_table(Layout(out).split(split)).to_pandas()
        df["split"] = split
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df["raw_user"] = users.loc[df["user_id"]].to_numpy()
    df["raw_item"] = item_raw[df["item_id"]]
    df["hist"] = [tuple(item_raw[s[s > 0]].tolist()) for s in df["item_seq"]]
    return df


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from mmctr_ray.ray_env import quiet_ray_data

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    quiet_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def converted(ray_local, tmp_path_factory):
    base = tmp_path_factory.mktemp("convert")
    pairs = make_raw(base / "raw")
    manifest = run_convert(RawSpec(base / "raw"), base / "out", RowSpec(), progress=lambda m: None, **FAST)
    return base, pairs, manifest


def test_output_validates_and_manifest(converted):
    base, pairs, manifest = converted
    out = base / "out"
    problems = validate(out)  # valid; the raw covers of a few items only: counted in one warning
    assert [(p.file, p.is_error) for p in problems] == [("item_images", False)]
    assert problems[0].message.startswith(f"{manifest['covers_missing']} of {manifest['items']} items have no "
                                          f"cover")
    assert not (out / STAGING).exists()
    on_disk = json.loads((out / "convert.json").read_text())
    assert on_disk["interactions"] == len(pairs) and on_disk["users"] == pairs["user"].nunique()
    assert on_disk["items"] == 300 and on_disk["covers"] == 5
    assert on_disk["placeholder_embeddings"] == ["item_emb_d128", "txt_emb_BERT", "img_emb_CLIPRN50"]


def test_id_mappings_round_trip(converted):
    base, pairs, _ = converted
    out = base / "out"
    titles = pd.read_csv(base / "raw" / "MicroLens-tiny_title_en.csv")
    items = pq.read_table(out / "mapping" / "items.parquet").to_pandas()
    assert items["item_id"].tolist() == list(range(1, 301))
    assert items["raw_item"].tolist() == sorted(titles["item"])
    feat = pq.read_table(Layout(out).item_feature, columns=["item_id", "item_title"]).to_pandas()
    by_raw = titles.set_index("item")["title"]
    assert feat["item_title"].tolist() == by_raw.loc[items["raw_item"]].tolist()
    users = pq.read_table(out / "mapping" / "users.parquet").to_pandas()
    assert users["user_id"].tolist() == list(range(1, len(users) + 1))
    assert users["raw_user"].tolist() == sorted(pairs["user"].unique())
    info = pq.read_table(Layout(out).item_info).to_pandas()
    assert info["item_id"].tolist() == list(range(301)) and not np.stack(info["item_emb_d128"]).any()
    tags = pq.read_table(out / "mapping" / "tags.parquet").to_pandas()
    assert tags["tag"].tolist() == ["cats", "food", "pets"]  # by item count, ties by name
    first = items.index[items["raw_item"] == titles["item"][0]][0] + 1  # raw tags "food" (row 0)
    assert info["item_tags"][first].tolist() == [0, 0, 0, 0, 2]


def test_every_positive_matches_the_reference(converted):
    """Splits, histories (strictly earlier, last 100, left-padded), de-duplication and no-history events."""
    base, pairs, _ = converted
    rows = read_rows(base / "out")
    pos = rows[rows["label"] == 1]
    got = {(u, i): (s, h) for u, i, s, h in zip(pos["raw_user"], pos["raw_item"], pos["split"], pos["hist"])}
    assert len(got) == len(pos)  # one positive per (user, item)
    assert got == reference(pairs)
    seq = np.stack(rows["item_seq"])
    assert seq.shape[1] == SEQ_LEN and seq[:, -1].all()  # left-padded, most recent last
    assert max(len(h) for h in rows["hist"]) == SEQ_LEN  # the 130-interaction user is truncated


def test_no_history_holds_the_target_or_a_later_item(converted):
    base, pairs, _ = converted
    rows = read_rows(base / "out")
    first_ts = pairs.groupby(["user", "item"])["timestamp"].min().to_dict()
    for u, i, label, hist in zip(rows["raw_user"], rows["raw_item"], rows["label"], rows["hist"]):
        assert i not in hist
        if label == 1:
            assert all(first_ts[(u, h)] < first_ts[(u, i)] for h in hist)


def test_split_sizes_and_negative_ratio(converted):
    base, pairs, manifest = converted
    ref = reference(pairs)
    for split in SPLITS:
        n_pos = sum(s == split for s, _ in ref.values())
        assert manifest["splits"][split] == {"rows": n_pos * (1 + K), "positives": n_pos}
        assert pq.ParquetFile(Layout(base / "out").split(split)).metadata.num_rows == n_pos * (1 + K)
    counts = pairs.groupby("user")["item"].nunique()
    assert manifest["splits"]["test"]["positives"] == int((counts >= 3).sum())  # users with < 3: train only


def test_negatives_are_unseen_distinct_and_popularity_weighted(converted):
    base, pairs, _ = converted
    rows = read_rows(base / "out")
    seen = set(zip(pairs["user"], pairs["item"]))
    neg = rows[rows["label"] == 0]
    assert not any((u, i) in seen for u, i in zip(neg["raw_user"], neg["raw_item"]))
    # a positive and its K negatives share a history (positives with tied timestamps share one too)
    for _, g in rows.groupby(["split", "raw_user", "hist"]):
        assert len(g) == (1 + K) * g["label"].sum()
        if g["label"].sum() == 1:
            assert g["raw_item"].nunique() == 1 + K  # distinct negatives, none equal to the positive
    popularity = pairs["item"].value_counts()
    drawn = neg["raw_item"].value_counts()
    assert set(drawn.index) <= set(popularity.index)  # never-clicked items have weight 0
    both = pd.concat([popularity, drawn], axis=1).fillna(0)
    assert both.corr(method="spearman").iloc[0, 1] > 0.5


def test_levels_are_deciles_of_likes_and_views(converted):
    base, _, _ = converted
    out = base / "out"
    lv = pd.read_csv(base / "raw" / "MicroLens-tiny_likes_and_views.txt", sep="\t", names=["item", "likes", "views"])
    lv = lv.set_index("item").sort_index()
    feat = pq.read_table(Layout(out).item_feature).to_pandas()
    assert feat["likes_level"].tolist() == levels(lv["likes"].to_numpy()).tolist()
    assert feat["views_level"].tolist() == levels(lv["views"].to_numpy()).tolist()
    train = pq.read_table(Layout(out).split("train")).to_pandas()
    assert (feat["likes_level"].to_numpy()[train["item_id"] - 1] == train["likes_level"]).all()
    assert levels(np.array([0, 0, 0, 5])).tolist() == [0, 0, 0, 7]  # ties share a level


def _digests(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "convert.json"}


def test_same_seed_same_bytes_and_other_partitions_same_rows(converted, tmp_path):
    base, _, _ = converted
    run_convert(RawSpec(base / "raw"), tmp_path / "again", RowSpec(), progress=lambda m: None, **FAST)
    assert _digests(tmp_path / "again") == _digests(base / "out")
    run_convert(RawSpec(base / "raw"), tmp_path / "p2", RowSpec(), shuffle="sort", partitions=2,
                progress=lambda m: None)
    cols = ["split", "raw_user", "raw_item", "label", "hist"]
    a = read_rows(base / "out")[cols].sort_values(cols).reset_index(drop=True)
    b = read_rows(tmp_path / "p2")[cols].sort_values(cols).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_convert(RawSpec(base / "raw"), tmp_path / "p2", RowSpec(), progress=lambda m: None, **FAST)


@pytest.mark.parametrize("partitions", [2, 3, 8, 16, 64, 470, 1000, 4096])
def test_bucket_keys_send_each_user_bucket_to_a_shuffle_partition_of_its_own(partitions):
    """Ray's hash shuffle hashes the group key again: the plain keys 0..P-1 shared partitions (P=8: four buckets
    in one partition, four partitions empty). The keys are checked with the function the shuffle calls."""
    from ray.data._internal.arrow_ops.transform_pyarrow import hash_partition

    keys = bucket_keys(partitions)
    assert sorted(keys % partitions) == list(range(partitions))  # _bucket_rows reads the bucket as key % P
    parts = hash_partition(pa.table({"bucket": keys}), hash_cols=["bucket"], num_partitions=partitions)
    assert len(parts) == partitions and {t.num_rows for t in parts.values()} == {1}


def test_split_layout_parts_with_the_default_hash_shuffle_writes_the_same_rows_in_the_same_order(converted, tmp_path,
                                                                                                monkeypatch):
    """--split-layout parts: every split is a folder of one part file per user bucket, written by the bucket tasks;
    read in name order they hold the file layout's rows in its order, and the result validates. With the default
    hash shuffle (the other tests use the sort shuffle: no aggregator actors to start), which groups by the keys of
    :func:`bucket_keys`: the part files are named by user bucket (0..P-1), not by the group key."""
    import mmctr_ray.convert.pipeline as pipeline

    asked = []
    monkeypatch.setattr(pipeline, "bucket_keys", lambda p: asked.append(p) or bucket_keys(p))
    base, _, manifest = converted
    out = tmp_path / "parts"
    parted = run_convert(RawSpec(base / "raw"), out, RowSpec(), progress=lambda m: None, split_layout="parts",
                         partitions=FAST["partitions"])
    assert parted["shuffle"] == "hash" and asked == [FAST["partitions"]]
    assert [p.is_error for p in validate(out)] == [False]  # the covers warning of the file layout's output
    assert parted["split_layout"] == "parts" and parted["splits"] == manifest["splits"]
    names = {f"part-{b:05d}.parquet" for b in range(FAST["partitions"])}
    for split in SPLITS:
        files = Layout(out).split_files(split)
        assert Layout(out).split(split).is_dir() and 1 < len(files) and {f.name for f in files} <= names, split
        rows = pa.concat_tables([pq.read_table(f) for f in files])
        assert rows.equals(pq.read_table(Layout(base / "out").split(split))), split
    with pytest.raises(ConfigError, match="--split-layout must be one of file, parts"):
        run_convert(RawSpec(base / "raw"), tmp_path / "x", RowSpec(), split_layout="folder")


def test_overwrite_leaves_nothing_of_another_producers_output(converted, tmp_path, tiny_spec):
    """convert over a synth output: no stale oracle, test truth, synth.json or covers (embed would encode the
    old covers under the new ids; predict would score against the old labels); synth over a convert output: no
    stale convert.json or id mapping."""
    base, _, _ = converted
    out, lay = tmp_path / "data", Layout(tmp_path / "data")
    write_synthetic(out, tiny_spec, progress=lambda m: None)
    assert lay.images_dir.is_dir() and lay.hidden_test_labels.is_file()
    raw = tmp_path / "raw"
    shutil.copytree(base / "raw", raw)
    shutil.rmtree(raw / "MicroLens-tiny_covers")
    run_convert(RawSpec(raw), out, RowSpec(), overwrite=True, progress=lambda m: None, **FAST)
    gone = [lay.oracle, lay.synth_manifest, lay.hidden_test_labels.parent, lay.images_dir]
    assert [p.name for p in gone if p.exists()] == []
    assert lay.convert_manifest.is_file() and lay.mapping_dir.is_dir()
    assert [str(p) for p in validate(out) if p.is_error] == []  # test rows are no longer checked against synth.json
    write_synthetic(out, tiny_spec, overwrite=True, progress=lambda m: None)
    assert not lay.convert_manifest.exists() and not lay.mapping_dir.exists()
    assert lay.oracle.is_file() and lay.images_dir.is_dir() and validate(out) == []


def test_time_split_and_sequences_tsv(ray_local, tmp_path):
    raw = tmp_path / "raw"
    pairs = make_raw(raw, seed=3, users=40)
    cut_valid, cut_test = 1_600_000_020_000, 1_600_000_030_000
    spec = RowSpec(split="time", valid_from=cut_valid, test_from=cut_test, negatives=2, seed=9)
    run_convert(RawSpec(raw), tmp_path / "time", spec, progress=lambda m: None, **FAST)
    rows = read_rows(tmp_path / "time")
    first_ts = pairs.groupby(["user", "item"])["timestamp"].min()
    pos = rows[rows["label"] == 1]
    ts = pd.Series(first_ts.loc[list(zip(pos["raw_user"], pos["raw_item"]))].to_numpy(), index=pos["split"].to_numpy())
    assert (ts["train"] < cut_valid).all() and (ts["test"] >= cut_test).all()
    assert ((ts["valid"] >= cut_valid) & (ts["valid"] < cut_test)).all()
    assert len(rows) == 3 * len(pos)

    # the same users as chronological sequences (user<TAB>item item ...): the position is the time
    seq = pairs.sort_values(["user", "item", "timestamp"]).drop_duplicates(["user", "item"])
    seq = seq.sort_values(["user", "timestamp", "item"]).assign(ts=lambda d: d.groupby("user").cumcount())
    lines = seq.groupby("user")["item"].apply(lambda s: " ".join(map(str, s)))
    tsv = raw / "MicroLens-tiny_pairs.tsv"
    tsv.write_text("".join(f"{u}\t{items}\n" for u, items in lines.items()))
    run_convert(RawSpec(raw, pairs=tsv.name), tmp_path / "tsv", RowSpec(), progress=lambda m: None, **FAST)
    rows = read_rows(tmp_path / "tsv")
    pos = rows[rows["label"] == 1]
    got = {(u, i): (s, h) for u, i, s, h in zip(pos["raw_user"], pos["raw_item"], pos["split"], pos["hist"])}
    assert got == reference(seq.drop(columns="timestamp").rename(columns={"ts": "timestamp"}))
    with pytest.raises(ConfigError, match=r"pairs.tsv: user<TAB>items sequences have no timestamps for --split time"):
        run_convert(RawSpec(raw, pairs=tsv.name), tmp_path / "tsv-time", spec, progress=lambda m: None, **FAST)
    assert not (tmp_path / "tsv-time").exists()
    # a user on a second line: their positions restarted at 0 there, and the two lines' items were histories of
    # each other as ties (nothing said); now one line naming both (line numbers as an editor shows them)
    text = tsv.read_text().splitlines()
    user, items = text[0].split("\t")
    tsv.write_text("\n".join([*text[:5], "", f"{user}\t{items}", *text[5:]]) + "\n")
    with pytest.raises(DataError) as err:
        run_convert(RawSpec(raw, pairs=tsv.name), tmp_path / "tsv-twice", RowSpec(), progress=lambda m: None, **FAST)
    assert str(err.value) == (f"{tsv}: line 7: user {user} again (first on line 1); expected one line per user "
                              f"holding all of their items in time order")
    assert not (tmp_path / "tsv-twice").exists()  # nothing left that looks like an output, nor the OUT it made


def _corrupt(raw: Path, case: str) -> None:
    path = raw / "MicroLens-tiny_pairs.csv"
    lines = path.read_text().splitlines()
    if case == "missing column":
        lines[0] = "user,item,time"
    elif case == "non-numeric timestamp":
        lines[7] = lines[7].rsplit(",", 1)[0] + ",yesterday"
    elif case == "extra field":
        lines[4] += ",7"
    elif case == "empty file":
        path.write_bytes(b"")
        return
    elif case == "a byte that is not UTF-8":  # Ray Data's read of the block failed: a 165-line traceback
        path.write_bytes("\n".join(lines[:7]).encode() + b"\n" + lines[7].encode() + b"\xe9\n"
                         + "\n".join(lines[8:]).encode() + b"\n")
        return
    else:  # an item with no title row
        lines[9] = f"{lines[9].split(',')[0]},999999,1600000000000"
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("case, message", [
    ("missing column", "MicroLens-tiny_pairs.csv: missing column 'timestamp' (header: user,item,time"),
    ("non-numeric timestamp", "MicroLens-tiny_pairs.csv: line 8: column timestamp: 'yesterday' is not an integer"),
    ("unknown item", "1 interaction with 1 item not in MicroLens-tiny_title_en.csv (first: item 999999)"),
    ("extra field", ["MicroLens-tiny_pairs.csv: line 5: '", ",7' does not have the fields user,item,timestamp"]),
    ("empty file", "MicroLens-tiny_pairs.csv: empty file (0 bytes); expected a header line naming user, item, "
                   "timestamp, then the rows"),
    ("a byte that is not UTF-8", ["MicroLens-tiny_pairs.csv: line 8: byte 0xe9 at position ", " is not UTF-8; "
                                  "expected UTF-8 text"]),
])
def test_bad_raw_input_is_one_line_and_leaves_nothing(ray_local, tmp_path, case, message):
    make_raw(tmp_path / "raw", users=30)
    _corrupt(tmp_path / "raw", case)
    with pytest.raises(DataError) as err:
        run_convert(RawSpec(tmp_path / "raw"), tmp_path / "out", RowSpec(), progress=lambda m: None, **FAST)
    assert all(part in str(err.value) for part in ([message] if isinstance(message, str) else message))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nor an empty OUT, made to stage into (it was left behind)


def test_cli_bad_raw_input_exits_2_with_one_line(tmp_path):
    make_raw(tmp_path / "raw", users=30)
    _corrupt(tmp_path / "raw", "non-numeric timestamp")
    r = subprocess.run([sys.executable, "-m", "mmctr_ray.cli", "convert", "--raw", str(tmp_path / "raw"), "--out",
                        str(tmp_path / "out"), "--shuffle", "sort", "--num-cpus", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    expected = (f"mmctr convert: error: {tmp_path / 'raw' / 'MicroLens-tiny_pairs.csv'}: line 8: column timestamp: "
                f"'yesterday' is not an integer timestamp (ms) of at most 18 digits (1 bad line)")
    assert errors == [expected]
    assert not (tmp_path / "out").exists()  # nor an empty OUT, made to stage into (it was left behind)


def test_an_item_twice_in_likes_views_or_tags_is_refused_and_a_missing_file_is_said(tmp_path, caplog):
    """Two disagreeing rows of an item in the likes/views file: the later won without a word (and moved 9 other
    items' likes/views deciles); in the tags file it replaced the earlier row's tags; without a likes/views or tags
    file every item got level 0 or no tags, said only by convert.json's counts (helper-131, F4). The same values
    twice (an empty cell is 0), and rows of items not in the titles file, pass; an item's tag rows are merged."""
    from mmctr_ray.convert.raw import locate, read_items

    raw = tmp_path / "raw"
    make_raw(raw, users=30)
    lv = next(raw.glob("*likes_and_views.txt"))
    lines = lv.read_text().splitlines()
    item, likes, views = lines[3].split("\t")
    lv.write_text("\n".join([*lines, lines[3], "77\t1\t2", "77\t3\t4"]) + "\n")  # 77: not in the catalogue
    read_items(RawSpec(raw), locate(RawSpec(raw)))
    lv.write_text("\n".join([*lines, f"{item}\t0\t0"]) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(lv))}: item {item} appears twice, with likes, views "
                                        rf"\({likes}, {views}\) and \(0, 0\); expected one row per item$"):
        read_items(RawSpec(raw), locate(RawSpec(raw)))
    zero = next(line for line in lines if line.split("\t")[1] == "0")
    lv.write_text("\n".join([*lines, zero.replace("\t0\t", "\t\t", 1)]) + "\n")  # empty likes: 0, as it is used
    read_items(RawSpec(raw), locate(RawSpec(raw)))
    lv.write_text("\n".join(lines) + "\n")
    tags = next(raw.glob("*tags*.csv"))
    first, said = tags.read_text().splitlines()[1].split(",", 1)
    tags.write_text(tags.read_text() + f"{first},other|{said.split('|')[0]}\n")
    items = read_items(RawSpec(raw), locate(RawSpec(raw)))
    merged = items.tags[int(np.searchsorted(items.raw_ids, int(first)))]
    assert merged == [*said.split("|"), "other", said.split("|")[0]]  # tag_matrix keeps each tag once, in order
    tags.unlink()
    from mmctr_ray.convert.items import copy_covers

    covers = next(raw.glob("*covers"))
    with caplog.at_level("WARNING", logger="mmctr_ray.convert.items"):  # 5 covers of 300 items: only counted
        raw_ids = read_items(RawSpec(raw), locate(RawSpec(raw))).raw_ids
        assert copy_covers(covers, Layout(tmp_path / "out"), raw_ids)["covers_missing"] == 295
    assert f"{covers}: no cover for 295 of the 300 items (first: " in caplog.text
    shutil.rmtree(covers)
    lv.rename(raw / "likes.tsv")  # not a MicroLens name
    with caplog.at_level("WARNING", logger="mmctr_ray.convert.raw"):
        items = read_items(RawSpec(raw), locate(RawSpec(raw)))
    assert not items.likes.any() and not any(items.tags)
    assert f"{raw}: no likes/views file (looked for *likes_and_views.txt, *likes*views*.txt; pass --likes-views): " \
           "every item's likes_level and views_level are 0" in caplog.text
    assert f"{raw}: no tags file (looked for *tags*.csv; pass --tags): no item has tags" in caplog.text
    assert f"{raw}: no covers folder (looked for *covers; pass --covers): no item has a cover" in caplog.text


def test_a_byte_order_mark_before_the_header_is_not_part_of_the_first_name(tmp_path):
    from mmctr_ray.convert.raw import _require_columns

    path = tmp_path / "pairs.csv"
    path.write_bytes("\ufeffuser,item,timestamp\n1,2,3\n".encode("utf-8"))
    _require_columns(path, ["user", "item", "timestamp"], "--user-col")


def test_raw_files_that_cannot_be_read_as_headed_text_are_one_line_errors(tmp_path):
    """Before Ray: a titles file not UTF-8 in its first 8 KiB, or a folder given as a file, were tracebacks."""
    from mmctr_ray.convert.raw import _require_columns, locate

    raw = tmp_path / "raw"
    make_raw(raw, users=30)
    titles = next(raw.glob("*title*"))
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"item,caf\xe9\n10,x\n")
    with pytest.raises(DataError) as err:
        _require_columns(path, ["item", "title"], "--title-col")
    assert str(err.value) == f"{path}: line 1: byte 0xe9 at position 8 is not UTF-8; expected UTF-8 text"
    path.write_bytes(b"item,title\n10,caf\xe9\n")  # after the header: Arrow reads the file and says where
    _require_columns(path, ["item", "title"], "--title-col")
    with pytest.raises(DataError) as err:
        locate(RawSpec(raw, titles=str(raw / "covers-or-any-folder")))
    assert str(err.value).endswith("covers-or-any-folder: not found (--titles)")
    (raw / "a_folder").mkdir()
    with pytest.raises(DataError) as err:
        locate(RawSpec(raw, titles="a_folder"))
    assert str(err.value) == f"{raw / 'a_folder'}: a folder; expected a file (--titles)"
    # `--raw R --titles R/x.csv` looked for R/R/x.csv only ("R/R/x.csv: not found"): every other path flag is
    # relative to the current folder; a name inside --raw still comes first (helper-131, F9)
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert locate(RawSpec(Path("raw"), titles=f"raw/{titles.name}")).titles == titles.resolve()
        assert locate(RawSpec(Path("raw"), titles=titles.name)).titles == Path("raw") / titles.name
        with pytest.raises(DataError) as err:
            locate(RawSpec(Path("raw"), titles="raw/nope.csv"))
        assert str(err.value) == "raw/raw/nope.csv: not found (--titles; nor raw/nope.csv in the current folder)"
    finally:
        os.chdir(here)
    with pytest.raises(ConfigError, match=r"^convert: --tag-sep is empty; expected the separator"):
        RawSpec(raw, tag_sep="")  # str.split("") was a traceback, after OUT was made (helper-131, F6)
    with pytest.raises(DataError) as err:
        locate(RawSpec(raw, covers=titles.name))
    assert str(err.value) == f"{titles}: a file; expected the covers folder (--covers)"


def test_header_less_titles_and_tags_as_microlens_100k_ships_them_are_read_to_the_line_end(tmp_path, caplog):
    """MicroLens-100k_title_en.csv and tags_to_summary.csv have no header line, and a title runs from the first
    comma to the line's end, commas unquoted: convert refused the real files ("missing column 'item' (header:
    1,A cat, a dog...)"), and a CSV reader would have split such a title."""
    from mmctr_ray.convert.raw import locate, read_items

    raw = tmp_path / "raw"
    make_raw(raw, users=30)
    files = locate(RawSpec(raw))
    headed = read_items(RawSpec(raw), files)
    titles = pd.read_csv(files.titles)
    tags = pd.read_csv(files.tags)
    files.titles.write_text("".join(f"{i},{t}\n" for i, t in zip(titles["item"], titles["title"])))  # unquoted
    files.tags.write_text("".join(f'{i},"{t}"\n' for i, t in zip(tags["item"], tags["tags"])))  # quoted as CSV does
    assert files.titles.read_text().startswith(f'{titles["item"][0]},Title {titles["item"][0]}, with "quotes"\n')
    bare = read_items(RawSpec(raw), locate(RawSpec(raw)))  # no header: --item-col/--title-col do not apply
    np.testing.assert_array_equal(bare.raw_ids, headed.raw_ids)
    assert bare.titles == headed.titles and bare.tags == headed.tags
    assert any(", with" in t for t in bare.titles)
    (raw / "other_tags.csv").write_text("1,x\n")  # two files of the tags name: the one read is said
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert locate(RawSpec(raw)).tags == files.tags
        assert locate(RawSpec(raw)).tags == files.tags  # located again (the CLI's checks, then the conversion)
    assert [r.getMessage() for r in caplog.records] == [  # said once: it was said twice
        f"{raw}: 2 files match *tags*.csv (MicroLens-tiny_tags.csv, other_tags.csv); reading MicroLens-tiny_tags.csv: "
        f"pass --tags to read another"]
    files.titles.write_text(files.titles.read_text() + "12x,A title\n")
    with pytest.raises(DataError) as err:
        read_items(RawSpec(raw), files)
    assert str(err.value) == (f"{files.titles}: column item (the first field; no header line): '12x' at data row "
                              f"{len(titles) + 1} is not an integer of at most 18 digits")


def test_item_files_of_other_ids_or_that_leave_items_out_are_said(tmp_path, caplog):
    """A likes/views file of another id space (0-based ids, another release) gave every item level 0, and its rows
    were dropped, with only a count in convert.json; now a warning names the file, the rows and the items."""
    from mmctr_ray.convert.raw import locate, read_items

    raw = tmp_path / "raw"
    make_raw(raw, users=30)
    files = locate(RawSpec(raw))
    with caplog.at_level("WARNING"):
        read_items(RawSpec(raw), files)
    assert [r.getMessage() for r in caplog.records] == [  # the tags file covers 20 of the 300 items
        f"{files.tags}: 280 of the 300 items have no row here: no tags"]
    lines = files.likes_views.read_text().splitlines()
    files.likes_views.write_text("".join(f"{int(line.split(chr(9))[0]) - 1000}\t1\t2\n" for line in lines[:10]))
    caplog.clear()
    with caplog.at_level("WARNING"):
        items = read_items(RawSpec(raw), files)
    assert items.no_likes_views == 300 and not items.likes.any()
    first = int(lines[0].split("\t")[0]) - 1000
    assert [r.getMessage() for r in caplog.records][:2] == [
        f"{files.likes_views}: 10 of 10 rows are of items not in the titles file (first: item {first}): ignored",
        f"{files.likes_views}: 300 of the 300 items have no row here: likes/views levels 0"]


def test_options_are_checked():
    with pytest.raises(ConfigError, match="--valid-from < --test-from"):
        RowSpec(split="time", valid_from=5)
    with pytest.raises(ConfigError, match="equal ones leave the valid split empty"):  # refused after the whole job
        RowSpec(split="time", valid_from=5, test_from=5)
    with pytest.raises(ConfigError, match="--valid-from/--test-from cut --split time only; with --split last"):
        RowSpec(test_from=5)  # ignored without a word
    for negatives in (-1, 0):  # 0: every row a click, which train refuses only after the whole conversion
        with pytest.raises(ConfigError, match=f"--negatives must be >= 1 .*, got {negatives}"):
            RowSpec(negatives=negatives)


def test_more_negatives_than_any_user_can_be_given_are_refused_before_the_ray_work(tmp_path):
    """`--negatives 100` over 80 items failed in a Ray task ("no negative is left for slot 80") with Ray's lines
    after it (helper-131): as many negatives as the catalogue's items are refused first, and nothing is written."""
    make_raw(tmp_path / "raw", users=20)
    with pytest.raises(ConfigError, match=r"^convert: --negatives 300 exceeds the 299 items a user of one "
                                          r"interaction has not touched \(MicroLens-tiny_title_en.csv holds 300 "
                                          r"items\)"):
        run_convert(RawSpec(tmp_path / "raw"), tmp_path / "out", RowSpec(negatives=300), progress=lambda m: None,
                    **FAST)
    assert not (tmp_path / "out").exists()  # nor an empty OUT, made to stage into (it was left behind)


def test_a_user_too_heavy_for_the_negatives_is_one_line_naming_the_file_not_a_failed_ray_task(tmp_path):
    """A user who clicked 298 of 300 items cannot be given 3 negatives per click. Only the bucket task that builds
    that user's rows can tell; it raised there, and Ray Data logged ~220 lines of tracebacks before the command's
    line (helper-131, F11). The task now hands the error to the driver, which says it once, naming the file."""
    raw = tmp_path / "raw"
    make_raw(raw, users=20)
    titles = pd.read_csv(raw / "MicroLens-tiny_title_en.csv")
    pairs = raw / "MicroLens-tiny_pairs.csv"
    heavy = pd.DataFrame({"user": 9999, "item": titles["item"][:298], "timestamp": 1_600_000_000_000 + np.arange(298)})
    pd.concat([pd.read_csv(pairs), heavy]).to_csv(pairs, index=False)
    said = (f"{pairs}: user 9999 interacted with 298 of the 300 items, which leaves 2 to draw --negatives 3 "
            f"non-clicks per click from; lower --negatives to at most 2 or leave this user out")
    with pytest.raises(DataError, match=f"^{re.escape(said)}$"):
        run_convert(RawSpec(raw), tmp_path / "out", RowSpec(negatives=3), progress=lambda m: None, **FAST)
    assert not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, "-m", "mmctr_ray.cli", "convert", "--raw", str(raw), "--out",
                        str(tmp_path / "out"), "--shuffle", "sort", "--num-cpus", "2", "--split-layout", "parts",
                        "--negatives", "3"], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if "error" in line.lower()] == [f"mmctr convert: error: {said}"]
    assert not (tmp_path / "out").exists()
    # two negatives fit: the same user's rows are built, each click with two items the user never touched
    run_convert(RawSpec(raw), tmp_path / "out", RowSpec(negatives=2), progress=lambda m: None, **FAST)
    assert [str(p) for p in validate(tmp_path / "out") if p.is_error] == []


def test_fuse_refuses_the_placeholder_vectors(converted, tmp_path):
    from mmctr_ray.fuse import run_fuse

    base, _, _ = converted
    for strategy in ("given", "v1"):
        with pytest.raises(ConfigError, match="zero placeholders; run `mmctr embed"):
            run_fuse(base / "out", tmp_path / "emb.parquet", FusionConfig(strategy))
    from mmctr_ray.errors import DataError
    from mmctr_ray.features import load_item_table

    with pytest.raises(DataError, match="item_emb_d128: zero placeholders written by `mmctr convert`"):
        load_item_table(base / "out")  # train and predict with the shipped vectors refuse too


def test_features_refuses_the_placeholder_vectors_before_ray_with_its_own_flag(converted, monkeypatch, capsys):
    """`mmctr features` on converted data started Ray, then named `--fusion FILE`, a flag features does not have."""
    import mmctr_ray.cli as cli

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(cli, "_start_ray", no_ray)
    base, _, _ = converted
    assert cli.main(["features", "--data", str(base / "out")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "item_emb_d128: zero placeholders written by `mmctr convert`; expected real item vectors: run `mmctr embed` "
        "and `mmctr fuse`, then give the fused table (`--fusion FILE` to train, `--set data.item_vector=FILE` "
        "elsewhere)")


def test_user_ids_merged_from_streamed_block_counts_are_the_sorted_distinct_ids():
    """The driver merges each block's distinct users as they stream in (folding pending arrays into the merged
    set once they outgrow it); the result must be exactly the sorted distinct ids, across merges."""
    rng = np.random.default_rng(3)
    blocks = [np.unique(rng.integers(0, 3_000_000, size=n)) for n in (10, 700_000, 500_000, 1_300_000, 5, 0)]
    users = _DistinctIds()
    for b in blocks:
        users.add(b)
    assert users.merged.size > 0  # at least one merge happened before the end
    np.testing.assert_array_equal(users.sorted(), np.unique(np.concatenate(blocks)))


def test_a_signed_id_is_read_as_its_number():
    """`+5` matched the integer pattern but Arrow's cast refused it: an ArrowInvalid from a Ray task, with neither
    file nor line, where the value is simply 5."""
    from mmctr_ray.convert.raw import LineFormat, parse

    fmt = LineFormat(False, 1, ("user", "item", "timestamp"), 0, 1, 2)
    table, bad = parse(pa.table({"line": ["+5,12,1700000000000", "-3,+7,+1"]}), fmt)
    assert bad is None and table.to_pydict() == {"user": [5, -3], "item": [12, 7], "ts": [1700000000000, 1]}
    fmt = LineFormat(True, 0, ("user", "items"), 0, 1, -1)
    table, bad = parse(pa.table({"line": ["+5\t+1 2"]}), fmt)
    assert bad is None and table.to_pydict() == {"user": [5, 5], "item": [1, 2], "ts": [0, 1]}


def test_a_bad_line_is_numbered_as_an_editor_shows_it_empty_lines_included(tmp_path):
    from types import SimpleNamespace

    from mmctr_ray.convert.raw import LineFormat, first_bad_line

    path = tmp_path / "pairs.csv"
    path.write_text("user,item,timestamp\n1,2,3\n\n4,5,6\n\n7,8,yesterday\n")  # Arrow skips lines 3 and 5
    fmt = LineFormat(False, 1, ("user", "item", "timestamp"), 0, 1, 2)
    assert first_bad_line(fmt, SimpleNamespace(pairs=path)) == (
        f"{path}: line 6: column timestamp: 'yesterday' is not an integer timestamp (ms) of at most 18 digits")
    path.write_text("user,item,timestamp\n1,2,3\n99999999999999999999,5,6\n")  # an integer past int64: it was "not
    assert first_bad_line(fmt, SimpleNamespace(pairs=path)) == (  # an integer id"
        f"{path}: line 3: column user: '99999999999999999999' is not an integer id of at most 18 digits")


def test_a_quoted_field_with_commas_is_csv_not_a_bad_line():
    """Each line was split on every comma: `5,10,1,"a,b"` (valid CSV: an extra column quoted as CSV quotes it) was
    a bad line that stopped the conversion."""
    import pyarrow as pa

    from mmctr_ray.convert.raw import LineFormat, parse

    fmt = LineFormat(False, 1, ("user", "item", "timestamp", "note"), 0, 1, 2)
    lines = ['5,10,1,"a,b"', '"6","11","2","x, y, z"', "7,12,3,plain", '8,13,"4,5",c', '9,14,5,"unclosed,d']
    table, bad = parse(pa.table({"line": pa.array(lines)}), fmt)
    assert table.column("user").to_pylist() == [5, 6, 7]
    assert table.column("ts").to_pylist() == [1, 2, 3]
    assert bad is not None and bad.count == 2 and bad.value == '8,13,"4,5",c'  # a timestamp "4,5" is no integer


def test_the_item_files_read_signed_ids_as_the_interactions_do_and_name_a_bad_value(tmp_path):
    """The titles, likes/views and tags files were parsed by Arrow: `+5` was refused (the interactions file takes
    it as 5), and a bad value was Arrow's "CSV conversion error to int64" without its row."""
    from mmctr_ray.convert.raw import locate, read_items

    raw = tmp_path / "raw"
    make_raw(raw, users=30)
    files = locate(RawSpec(raw))
    plain = read_items(RawSpec(raw), files)
    for path, sep in ((files.titles, ","), (files.likes_views, "\t"), (files.tags, ",")):
        lines = path.read_text().splitlines()
        body = 1 if sep == "," else 0  # the likes/views file has no header
        path.write_text("\n".join(lines[:body] + [f'+{line}' if i % 2 else f' "{line.split(sep)[0]}"{sep}'
                                                  + sep.join(line.split(sep)[1:])
                                                  for i, line in enumerate(lines[body:])]) + "\n")
    signed = read_items(RawSpec(raw), files)  # the likes/views file's first line: `"id"`, then `+id`, header-less
    np.testing.assert_array_equal(signed.raw_ids, plain.raw_ids)
    np.testing.assert_array_equal(signed.likes, plain.likes)
    np.testing.assert_array_equal(signed.views, plain.views)
    assert signed.titles == plain.titles and signed.tags == plain.tags
    lines = files.likes_views.read_text().splitlines()
    files.likes_views.write_text("\n".join(lines[:3] + ["1007\tmany\t5"] + lines[3:]) + "\n")
    with pytest.raises(DataError) as err:
        read_items(RawSpec(raw), files)
    assert str(err.value) == (f"{files.likes_views}: column likes: 'many' at data row 4 is not an integer of at "
                              f"most 18 digits")
    # Arrow's own errors named no line: a byte that is not UTF-8 ("CSV conversion error to string: invalid UTF8
    # data"), a row of the wrong field count ("Expected 3 columns, got 2: 10\t5")
    files.likes_views.write_text("\n".join(lines[:3] + ["1007\t5"] + lines[3:]) + "\n")
    with pytest.raises(DataError) as err:
        read_items(RawSpec(raw), files)
    assert str(err.value) == f"{files.likes_views}: line 4: '1007\\t5' has 2 fields; expected 3"
    files.likes_views.write_text("\n".join(lines) + "\n")
    titles = files.titles.read_bytes().splitlines()
    files.titles.write_bytes(b"\n".join([*titles[:5], titles[5] + b" caf\xe9", *titles[6:]]) + b"\n")
    with pytest.raises(DataError) as err:
        read_items(RawSpec(raw), files)
    assert str(err.value) == (f"{files.titles}: line 6: byte 0xe9 at position {len(titles[5]) + 4} is not UTF-8; "
                              f"expected UTF-8 text")
    files.titles.write_bytes(b"\n".join(titles) + b"\n")
    files.likes_views.write_text("\n".join(lines) + "\n")
    files.titles.write_text(files.titles.read_text() + ",untitled\n")  # an empty id: said as before
    with pytest.raises(DataError) as err:
        read_items(RawSpec(raw), files)
    assert str(err.value) == f"{files.titles}: column item: empty value at data row 301; expected an integer id"
    files.titles.write_text("item,title\n")  # a header alone: no items, as before (no values: all() was null)
    with pytest.raises(DataError) as err:
        read_items(RawSpec(raw), files)
    assert str(err.value) == f"{files.titles}: no items"
    files.titles.write_text("item,title\n1000000000000000000,x\n")  # past the 18 digits ids may have
    with pytest.raises(DataError) as err:
        read_items(RawSpec(raw), files)
    assert str(err.value) == (f"{files.titles}: column item: '1000000000000000000' at data row 1 is not an integer "
                              f"of at most 18 digits")
    from mmctr_ray.convert.raw import has_header

    (tmp_path / "seq.tsv").write_text("+5\t1 2\n")  # a header-less first line, signed: it was taken for a header
    (tmp_path / "named.tsv").write_text("user\titems\n5\t1 2\n")
    assert not has_header(tmp_path / "seq.tsv") and has_header(tmp_path / "named.tsv")


def test_an_item_keeps_its_first_tags_with_ids_by_decreasing_count():
    """The first TAGS_LEN of an item's tags, left-padded; tag ids by how many items carry the tag (a mutation that
    kept the last five, and one that numbered the rarest first, passed: the test items carried at most two tags, all
    equally common)."""
    from mmctr_ray.convert.items import tag_matrix

    mat, vocab = tag_matrix([["a", "b", "c", "d", "e", "f", "g"]])
    assert [vocab[i - 1] for i in mat[1]] == ["a", "b", "c", "d", "e"]
    _, vocab = tag_matrix([["rare", "common"], ["common"], ["common", "mid"], ["mid"]])
    assert vocab == ["common", "mid", "rare"]


# --- helper-146 mutation audit: behaviour no test above pinned (all but the last run without Ray) ----------

def _one_user_lookups(n_items: int, popularity):
    """Lookups of one user (raw id 7) over items 1..n_items (raw ids 100..), levels that differ between likes and
    views, and the given popularity."""
    from mmctr_ray.convert.rows import Lookups

    ids = np.arange(1, n_items + 1)
    return Lookups(np.array([7], np.int64), 100 + ids.astype(np.int64), np.cumsum(np.asarray(popularity, float)),
                   np.r_[0, ids % 10], np.r_[0, (3 * ids + 1) % 10])


def _one_user_rows(items, spec, lk):
    from mmctr_ray.convert.rows import build_rows, sort_events

    items = np.asarray(items, np.int64)
    events = sort_events(np.ones(len(items), np.int64), np.full(len(items), 7, np.int64), items,
                         np.arange(len(items), dtype=np.int64))
    return build_rows(*events, spec, lk)


def test_every_row_carries_its_own_items_likes_and_views_levels():
    """A mutation that filled views_level from the likes levels passed: only likes_level was compared."""
    lk = _one_user_lookups(40, np.ones(40))
    rows = _one_user_rows([3, 9, 14, 22, 30], RowSpec(), lk)
    assert len(rows["item_id"]) == 4 * (1 + K)
    np.testing.assert_array_equal(rows["likes_level"], lk.likes_level[rows["item_id"]])
    np.testing.assert_array_equal(rows["views_level"], lk.views_level[rows["item_id"]])
    assert (rows["likes_level"] != rows["views_level"]).any()


def test_negatives_are_drawn_per_position_and_the_exact_draw_keeps_them_distinct_and_weighted():
    """The draw is seeded by (seed, user, position): a mutation that dropped the position gave every click of a
    user the same negatives and passed. When the user's items hold nearly all of the popularity (the exact draw
    after MAX_ATTEMPTS rejections), a mutation that let a later slot repeat an earlier slot's item passed, and so did
    one that drew uniformly instead of by popularity."""
    lk = _one_user_lookups(60, np.ones(60))
    rows = _one_user_rows(np.arange(1, 21), RowSpec(negatives=3, seed=1), lk)
    negs = {tuple(sorted(rows["item_id"][(rows["split"] == s) & (rows["label"] == 0)])) for s in (1, 2)}
    assert len(negs) == 2  # valid and test clicks (positions 18, 19) have their own negatives

    touched = np.arange(1, 31)  # 30 of 33 items, with nearly all the popularity: rejection sampling gives up
    pop = np.r_[np.full(30, 1e9), 1000.0, 1.0, 1.0]
    rows = _one_user_rows(touched, RowSpec(negatives=2, seed=3), _one_user_lookups(33, pop))
    table = pd.DataFrame({"seq": [tuple(s) for s in rows["item_seq"]], "item": rows["item_id"],
                          "label": rows["label"]})
    for _, g in table.groupby("seq"):  # a click and its negatives share the history
        assert len(g) == 3 and g["item"].nunique() == 3 and set(g["item"][g["label"] == 0]) <= {31, 32, 33}
    drawn = table["item"][table["label"] == 0]
    assert (drawn == 31).sum() == len(drawn) // 2  # item 31 holds 1000/1002 of the weight left: in every pair


def test_min_history_zero_gives_the_first_click_a_row_with_an_empty_history():
    lk = _one_user_lookups(40, np.ones(40))
    rows = _one_user_rows([3, 9, 14], RowSpec(min_history=0), lk)
    pos = rows["label"] == 1
    assert sorted(rows["item_id"][pos]) == [3, 9, 14]
    first = rows["item_seq"][pos][rows["item_id"][pos] == 3][0]
    assert not first.any()
    assert len(_one_user_rows([3, 9, 14], RowSpec(min_history=2), lk)["label"]) == 1 + K  # only the third click


def test_rows_of_a_chunk_mix_users():
    """Rows are permuted within a chunk (training reads files in order through a local shuffle buffer): a mutation
    that left them grouped by user passed."""
    from mmctr_ray.convert.rows import build_rows, sort_events

    lk = _one_user_lookups(60, np.ones(60))
    lk = type(lk)(np.array([7, 8], np.int64), lk.item_raw, lk.item_cum, lk.likes_level, lk.views_level)
    user = np.r_[np.ones(6, np.int64), np.full(6, 2, np.int64)]
    raw = np.where(user == 1, 7, 8).astype(np.int64)
    items = np.r_[np.arange(1, 7), np.arange(11, 17)].astype(np.int64)
    rows = build_rows(*sort_events(user, raw, items, np.r_[np.arange(6), np.arange(6)].astype(np.int64)),
                      RowSpec(), lk)
    ids = rows["user_id"]
    assert len(ids) == 10 * (1 + K) and (np.diff(ids) != 0).sum() > 1  # not one block per user


def test_a_title_row_twice_and_a_headed_tags_file_without_the_tag_column_are_refused(tmp_path):
    from mmctr_ray.convert.raw import locate, read_items

    raw = tmp_path / "raw"
    make_raw(raw, users=30)
    files = locate(RawSpec(raw))
    lines = files.titles.read_text().splitlines()
    item = lines[7].split(",")[0]
    files.titles.write_text("\n".join([*lines, f"{item},Another title"]) + "\n")
    with pytest.raises(DataError) as err:
        read_items(RawSpec(raw), files)
    assert str(err.value) == (f"{files.titles}: column item: item {item} appears twice; expected one title per "
                              f"item")
    files.tags.write_text("item,labels\n1000,a\n")
    with pytest.raises(DataError) as err:
        locate(RawSpec(raw))
    assert str(err.value).startswith(f"{files.tags}: missing column 'tags' (header: item,labels; set "
                                     f"--item-col/--tag-col)")


def test_likes_views_header_repeats_and_a_conflict_in_views_alone(tmp_path, caplog):
    """A likes/views file with a header line is read as without it; the same row twice leaves no item without a
    row (the count was len(rows), not the distinct items); two rows differing in views only are refused."""
    from mmctr_ray.convert.raw import locate, read_items

    raw = tmp_path / "raw"
    make_raw(raw, users=30)
    files = locate(RawSpec(raw))
    plain = read_items(RawSpec(raw), files)
    lines = files.likes_views.read_text().splitlines()
    files.likes_views.write_text("\n".join(["item\tlikes\tviews", *lines, lines[0]]) + "\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmctr_ray.convert.raw"):
        headed = read_items(RawSpec(raw), files)
    np.testing.assert_array_equal(headed.likes, plain.likes)
    np.testing.assert_array_equal(headed.views, plain.views)
    assert headed.no_likes_views == 0
    assert not [r for r in caplog.records if str(files.likes_views) in r.getMessage()]
    item, likes, views = lines[0].split("\t")
    files.likes_views.write_text("\n".join([*lines, f"{item}\t{likes}\t{int(views) + 1}"]) + "\n")
    with pytest.raises(DataError, match=rf"item {item} appears twice, with likes, views \({likes}, {views}\) and "
                                        rf"\({likes}, {int(views) + 1}\)"):
        read_items(RawSpec(raw), files)


def test_tags_are_split_on_tag_sep_empty_ones_dropped_and_quotes_undoubled(tmp_path):
    """Header-less titles and tags quoted as CSV quotes them: a doubled quote inside is one quote."""
    from mmctr_ray.convert.raw import locate, read_items

    raw = tmp_path / "raw"
    make_raw(raw, users=30)
    files = locate(RawSpec(raw))
    ids = read_items(RawSpec(raw), files).raw_ids
    a, b = int(ids[0]), int(ids[1])
    files.tags.write_text(f'{a},"say ""hi""||  x |"\n{b},p;q\n')
    files.titles.write_text(files.titles.read_text().replace("item,title\n", "", 1).replace(
        f'{a},"Title {a}, with ""quotes"""', f'{a},"A ""quoted"" title"').replace(
        f'{b},"Title {b}, with ""quotes"""', f'{b},"Frozen" review, part 2'))
    items = read_items(RawSpec(raw), locate(RawSpec(raw)))
    assert items.tags[0] == ['say "hi"', "x"] and items.tags[1] == ["p;q"]
    assert items.titles[:2] == ['A "quoted" title', '"Frozen" review, part 2']  # the second is not quoted as CSV
    items = read_items(RawSpec(raw, tag_sep=";"), locate(RawSpec(raw)))
    assert items.tags[0] == ['say "hi"||  x |'] and items.tags[1] == ["p", "q"]


def test_tag_ids_count_items_not_repeats_and_a_row_holds_a_tag_once():
    from mmctr_ray.convert.items import tag_matrix

    mat, vocab = tag_matrix([["a", "a", "a", "b"], ["b"]])
    assert vocab == ["b", "a"]  # b on two items, a on one (three times)
    assert mat[1].tolist() == [0, 0, 0, 2, 1] and mat[2].tolist() == [0, 0, 0, 0, 1]


def test_a_sequences_file_with_a_header_line_skips_it_and_double_spaces_are_not_items(tmp_path):
    from mmctr_ray.convert.raw import line_format, locate, parse

    raw = tmp_path / "raw"
    make_raw(raw, users=30)
    (raw / "MicroLens-tiny_pairs.csv").unlink()
    tsv = raw / "MicroLens-tiny_pairs.tsv"
    tsv.write_text("user\titems\n5\t1 2\n")
    assert line_format(RawSpec(raw), locate(RawSpec(raw))).skip_rows == 1
    tsv.write_text("5\t1 2\n")
    fmt = line_format(RawSpec(raw), locate(RawSpec(raw)))
    assert fmt.skip_rows == 0
    table, bad = parse(pa.table({"line": ["5\t1  2 ", "6\t 3"]}), fmt)
    assert bad is None and table.to_pydict() == {"user": [5, 5, 6], "item": [1, 2, 3], "ts": [0, 2, 0]}
    tsv.rename(raw / "MicroLens-tiny_pairs.TSV")  # given by --pairs: the suffix in any case
    assert locate(RawSpec(raw, pairs="MicroLens-tiny_pairs.TSV")).sequences


def test_covers_are_copied_under_the_dense_id_of_their_raw_id(tmp_path):
    from mmctr_ray.convert.items import copy_covers

    covers = tmp_path / "covers"
    covers.mkdir()
    for raw, colour in ((10, 50), (30, 150)):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (colour, 0, 0)).save(buf, format="JPEG")
        (covers / f"{raw}.jpg").write_bytes(buf.getvalue())
    lay = Layout(tmp_path / "out")
    assert copy_covers(covers, lay, np.array([10, 20, 30])) == {"covers": 2, "covers_missing": 1}
    assert lay.image(1).read_bytes() == (covers / "10.jpg").read_bytes()
    assert lay.image(3).read_bytes() == (covers / "30.jpg").read_bytes()
    assert not lay.image(2).exists()


def test_negative_sampling_weights_count_every_interaction_line_a_repeated_pair_too():
    """Popularity is the number of lines of each item (README), merged over blocks, pinned here without Ray (the
    tests above see it only through the interaction total and a Spearman correlation)."""
    from types import SimpleNamespace

    from mmctr_ray.convert.pipeline import _interaction_stats
    from mmctr_ray.convert.raw import LineFormat, RawItems

    class Blocks:  # map_batches / iter_batches of a Ray Dataset, over in-memory blocks: no Ray
        def __init__(self, blocks):
            self.blocks = blocks

        def map_batches(self, fn, batch_format, fn_kwargs):
            return Blocks([fn(b, **fn_kwargs) for b in self.blocks])

        def iter_batches(self, **kwargs):
            yield from self.blocks

    fmt = LineFormat(False, 1, ("user", "item", "timestamp"), 0, 1, 2)
    items = RawItems(np.array([10, 20, 30]), ["a", "b", "c"], np.zeros(3, np.int64), np.zeros(3, np.int64), 0,
                     [[], [], []])
    blocks = Blocks([pa.table({"line": ["1,10,5", "2,10,6", "1,10,9", "3,20,1"]}), pa.table({"line": ["4,10,2"]})])
    files = SimpleNamespace(pairs=Path("p.csv"), titles=Path("t.csv"), sequences=False)
    users, popularity, total = _interaction_stats(blocks, fmt, items, files)
    assert users.tolist() == [1, 2, 3, 4] and popularity.tolist() == [4, 1, 0] and total == 5


def test_levels_are_deciles_over_the_catalogue_items_alone(ray_local, tmp_path):
    """Levels rank the N catalogue items only, not the padding row 0 (a mutation that ranked an extra 0 with them
    passed: over the 300 items of make_raw the two agree everywhere; over 301 distinct counts they do not)."""
    raw = tmp_path / "raw"
    make_raw(raw, users=30)
    titles = next(raw.glob("*title_en.csv"))
    titles.write_text(titles.read_text() + "5,One more item\n")
    ids = sorted(pd.read_csv(titles)["item"])
    likes = np.arange(1, len(ids) + 1)  # distinct and positive
    next(raw.glob("*likes_and_views.txt")).write_text("".join(f"{i}\t{n}\t{2 * n}\n" for i, n in zip(ids, likes)))
    run_convert(RawSpec(raw), tmp_path / "out", RowSpec(), progress=lambda m: None, **FAST)
    feat = pq.read_table(Layout(tmp_path / "out").item_feature).to_pandas()
    assert feat["likes_level"].tolist() == levels(likes).tolist()
    assert feat["views_level"].tolist() == levels(2 * likes).tolist()


def test_a_header_less_title_between_quotes_it_does_not_double_keeps_them(tmp_path):
    """Only a text quoted as CSV quotes it (every quote inside doubled) is unquoted: `"Frozen" vs "Tangled"` lost
    its outer quotes without a word."""
    from mmctr_ray.convert.raw import locate, read_items

    raw = tmp_path / "raw"
    make_raw(raw, users=30)
    files = locate(RawSpec(raw))
    ids = read_items(RawSpec(raw), files).raw_ids
    a, b = int(ids[0]), int(ids[1])
    lines = files.titles.read_text().splitlines()[1:]  # header-less, as MicroLens-100K ships its titles
    rest = [line for line in lines if line.split(",")[0] not in (str(a), str(b))]
    files.titles.write_text("\n".join([f'{a},"Frozen" vs "Tangled"', f'{b},"Up ""the"" film"', *rest]) + "\n")
    assert read_items(RawSpec(raw), locate(RawSpec(raw))).titles[:2] == ['"Frozen" vs "Tangled"', 'Up "the" film']
