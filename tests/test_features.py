"""Features: the item table, history truncation/padding/mask, and the splits as Ray Datasets."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmctr_ray.data.writer import list_array
from mmctr_ray.errors import DataError
from mmctr_ray.features import (FUSED_VECTOR_COLUMN, SPARSE_TABLE_FACTOR, SPARSE_TABLE_ROWS, check_id_tables,
                                history_mask, history_window, list_matrix, load_item_table, read_split, to_model_batch)
from mmctr_ray.schema import Layout


def test_history_window_keeps_most_recent():
    seq = np.array([[0, 0, 0, 1, 2, 3], [0, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    out = history_window(seq, 4)
    np.testing.assert_array_equal(out, [[0, 1, 2, 3], [5, 6, 7, 8], [11, 12, 13, 14]])
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(history_mask(out), out > 0)
    np.testing.assert_array_equal(history_mask(out).sum(1), [3, 4, 4])


def test_history_window_wider_than_stored_left_pads():
    seq = np.array([[0, 1, 2]])
    np.testing.assert_array_equal(history_window(seq, 5), [[0, 0, 0, 1, 2]])


def test_history_mask_on_torch():
    import torch

    seq = torch.tensor([[0, 0, 3], [1, 2, 3]])
    assert history_mask(seq).tolist() == [[False, False, True], [True, True, True]]


def test_to_model_batch_dtypes_and_truncation():
    seq = np.zeros((3, 100), dtype=np.int64)
    seq[0, -2:] = [7, 8]
    seq[1, -70:] = np.arange(1, 71)
    seq[2, -100:] = np.arange(1, 101)
    batch = pa.table({"user_id": pa.array([1, 2, 3], pa.int32()), "item_seq": list_array(seq, pa.int64()),
                      "item_id": [4, 5, 6], "likes_level": [0, 1, 9], "views_level": [9, 1, 0],
                      "label": pa.array([1.0, 0.0, 1.0], pa.float64())})
    out = to_model_batch(batch, max_len=64)
    assert out["item_seq"].shape == (3, 64) and out["item_seq"].dtype == np.int64
    assert out["user_id"].dtype == np.int64 and out["label"].dtype == np.float32
    np.testing.assert_array_equal(out["item_seq"][0, -2:], [7, 8])
    assert out["item_seq"][0, :-2].sum() == 0
    np.testing.assert_array_equal(out["item_seq"][1], np.arange(7, 71))  # the 64 most recent of 70
    np.testing.assert_array_equal(out["item_seq"][2], np.arange(37, 101))
    np.testing.assert_array_equal(history_mask(out["item_seq"]).sum(1), [2, 64, 64])
    short = batch.set_column(1, "item_seq", pa.array([list(r) for r in seq[:2]] + [list(seq[2, 1:])]))
    with pytest.raises(DataError, match=r"^p.parquet: column item_seq: lists of one length expected; row 12 has 99, "
                                        r"row 10 has 100$"):  # the rows named: validate would add nothing
        to_model_batch(short, max_len=64, source="p.parquet", row0=10)  # a batch from file row 10 (predict's)
    with pytest.raises(DataError, match=r"; a row has 99 values where another of its batch has 100 \(run `mmctr "
                                        r"validate` for the file and row\)$"):
        to_model_batch(short, max_len=64, source="train.parquet")  # a batch Ray Data read: its file row unknown


@pytest.mark.parametrize("history, shown", [
    ([85, 85, 85] + [0] * 97, "[85, 85, 85, 0, …]"),  # right-padded: the last 64 slots are all 0
    ([0] * 90 + [4, 5, 0, 6] + [7] * 6, "[4, 5, 0, …]"),  # a gap inside the history
    ([0] * 70 + list(range(1, 21)) + [0] * 10, "[…, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 0, …]"),
    ([0] * 97 + [3, 4, 0], "[3, 4, 0]"),
])
def test_a_history_that_is_not_left_padded_is_one_line_not_a_silently_empty_history(history, shown):
    """`train` read a right-padded row as an empty history (its last slots) without a word, while `mmctr validate`
    reports it and the README said a worker meeting such a row ends the run."""
    good = [0] * 98 + [1, 2]
    batch = pa.table({"user_id": [1, 2], "item_seq": pa.array([good, history], pa.list_(pa.int64())),
                      "item_id": [4, 5], "likes_level": [0, 1], "views_level": [1, 0], "label": [1.0, 0.0]})
    with pytest.raises(DataError) as err:
        to_model_batch(batch, max_len=64, source="train.parquet")
    assert str(err.value) == (f"train.parquet: column item_seq: a history with a padding 0 after an item id ({shown}); "
                              "expected left-padded lists, all 0s before the history, most recent last (run `mmctr "
                              "validate` for the row)")
    assert to_model_batch(batch.slice(0, 1), max_len=64)["item_seq"].shape == (1, 64)  # the left-padded row passes


def test_list_matrix_rejects_ragged_lists():
    arr = pa.array([[1, 2, 3], [1, 2]], pa.list_(pa.int64()))
    with pytest.raises(DataError, match="row 1 has 2"):
        list_matrix(arr, "x.parquet: column item_seq")


def test_id_tables_are_built_up_to_the_bound_and_past_it_when_dense_enough(synth_dir):
    """Only an id table past SPARSE_TABLE_ROWS with more than SPARSE_TABLE_FACTOR rows per possible id is refused:
    a small sparse one (a subsample's tags) and a large dense one are built."""
    distinct = SPARSE_TABLE_ROWS // SPARSE_TABLE_FACTOR + 1  # tag ids 1..distinct-1 and the largest
    small = np.zeros((3, 5), np.int64)
    small[1:, -1] = [1, SPARSE_TABLE_ROWS - 1]  # 2 tags, the table at the bound: built
    check_id_tables(synth_dir, small, 1, use_tags=True, use_user_id=False, dim=8, split_rows=10)
    dense = np.zeros((distinct + 1, 5), np.int64)
    dense[1:, -1] = np.r_[1:distinct, SPARSE_TABLE_ROWS]  # one row past the bound, 16 rows per tag: built
    check_id_tables(synth_dir, dense, 1, use_tags=True, use_user_id=False, dim=8, split_rows=10)
    dense[-1, -1] += SPARSE_TABLE_FACTOR  # now more than 16 rows per tag
    with pytest.raises(DataError, match=f"largest tag id {SPARSE_TABLE_ROWS + SPARSE_TABLE_FACTOR:,} for "
                                        f"{distinct:,} distinct tags"):
        check_id_tables(synth_dir, dense, 1, use_tags=True, use_user_id=False, dim=8, split_rows=10)
    check_id_tables(synth_dir, dense, 1, use_tags=False, use_user_id=False, dim=8, split_rows=10)
    users = SPARSE_TABLE_FACTOR * 100_000 + 1  # rows > 2**20 and > 16 per split row: refused only with the field
    check_id_tables(synth_dir, small, users, use_tags=True, use_user_id=False, dim=8, split_rows=100_000)
    check_id_tables(synth_dir, small, users - 1, use_tags=True, use_user_id=True, dim=8,
                    split_rows=100_000)
    with pytest.raises(DataError, match=r"column user_id: largest user id 1,600,000 for at most 100,000 users"):
        check_id_tables(synth_dir, small, users, use_tags=True, use_user_id=True, dim=8,
                        split_rows=100_000)


def test_item_table_from_given_vectors(synth_dir, tiny_spec):
    table = load_item_table(synth_dir)
    n = tiny_spec.items
    assert table.num_items == n
    assert table.tags.shape == (n + 1, 5) and table.tags.dtype == np.int64
    assert table.vectors.shape == (n + 1, 128) and table.vectors.dtype == np.float32
    assert not table.tags[0].any() and not table.vectors[0].any()
    info = pq.read_table(Layout(synth_dir).item_info)
    np.testing.assert_array_equal(table.vectors[17], np.array(info.column("item_emb_d128")[17].as_py(), np.float32))
    assert table.tag_vocab == int(table.tags.max()) + 1
    assert table.source["item_vector"] == "given" and table.source["dim"] == 128
    t = table.to_torch()
    assert tuple(t["item_vectors"].shape) == (n + 1, 128) and str(t["item_tags"].dtype) == "torch.int64"


def test_a_checkpoint_on_item_infos_own_vectors_is_refused_on_the_items_of_other_data(synth_dir, tmp_path):
    """A run trained on `given` was scored (predict, compare) or resumed on data with other items of the same
    count without a word: the model met other tags and vectors than it learnt, for the same ids."""
    import shutil

    from mmctr_ray.features import check_same_table

    trained = load_item_table(synth_dir).source
    other = shutil.copytree(synth_dir, tmp_path / "other", ignore=shutil.ignore_patterns("item_images"))
    info = pq.read_table(Layout(other).item_info)
    vectors = list_matrix(info.column("item_emb_d128"), "x") * 1.5
    i = info.schema.get_field_index("item_emb_d128")
    pq.write_table(info.set_column(i, "item_emb_d128", list_array(vectors, info.schema.field(i).type.value_type)),
                   Layout(other).item_info)
    check_same_table(trained, load_item_table(synth_dir).source, "ck")  # the same data: the same items
    with pytest.raises(DataError) as err:
        check_same_table(trained, load_item_table(other).source, "run/checkpoint_epoch_002")
    assert str(err.value) == (f"{Layout(other).item_info}: its items (item_tags, item_emb_d128) are not those "
                              "run/checkpoint_epoch_002 was trained on: other data, or item_info rewritten since; "
                              "use the data the run was trained on, or train again")
    check_same_table({k: v for k, v in trained.items() if k != "items"}, load_item_table(other).source, "ck")  # a
    # checkpoint from before the fingerprint was kept: not compared


def test_item_table_from_fused_file_scatters_by_item_id(synth_dir, tiny_spec, tmp_path):
    n = tiny_spec.items
    ids = np.arange(n, 0, -1)  # reverse order: must be placed by item_id, not position
    vecs = np.stack([ids, -ids], axis=1).astype(np.float32)
    path = tmp_path / "item_emb.parquet"
    pq.write_table(pa.table({"item_id": ids, FUSED_VECTOR_COLUMN: list_array(vecs, pa.float32())}), path)
    table = load_item_table(synth_dir, str(path))
    assert table.vectors.shape == (n + 1, 2)
    np.testing.assert_array_equal(table.vectors[5], [5, -5])
    assert not table.vectors[0].any()
    assert table.source["item_vector"] == "fused"


def test_item_table_errors_name_file_and_column(synth_dir, tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path}: holds no MicroLens_1M_x1/ folder"):  # the folder typed
        load_item_table(tmp_path)
    (tmp_path / "MicroLens_1M_x1").mkdir()
    with pytest.raises(DataError, match=f"^{tmp_path}/MicroLens_1M_x1/item_info.parquet: missing file$"):
        load_item_table(tmp_path)
    bad = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"item_id": [1], "vec": [[1.0]]}), bad)
    with pytest.raises(DataError, match="emb.parquet: missing column item_emb"):
        load_item_table(synth_dir, str(bad))
    pq.write_table(pa.table({"item_id": [10**6], FUSED_VECTOR_COLUMN: [[1.0]]}), bad)
    with pytest.raises(DataError, match=r"column item_id: value 1000000 outside"):
        load_item_table(synth_dir, str(bad))
    with pytest.raises(DataError, match="not found"):
        load_item_table(synth_dir, str(tmp_path / "nope.parquet"))
    # a table made by hand: float or null ids were an IndexError traceback, string ids a TypeError, and of two rows
    # of one item the later won without a word
    for ids, said in (([1.0, 2.0], "column item_id: type double; expected integer item ids, each once"),
                      ([1, None], "column item_id: 1 nulls; expected integer item ids, each once"),
                      (["1", "2"], "column item_id: type string; expected integer item ids, each once"),
                      ([3, 1, 3, 3], "column item_id: item 3 in 3 rows; expected each item once")):
        pq.write_table(pa.table({"item_id": ids, FUSED_VECTOR_COLUMN: [[1.0]] * len(ids)}), bad)
        with pytest.raises(DataError, match=rf"^{bad}: {said}$"):
            load_item_table(synth_dir, str(bad))
    pq.write_table(pa.table({"item_id": [1, 2], FUSED_VECTOR_COLUMN: [[1.0], [2.0, 3.0]]}), bad)
    with pytest.raises(DataError, match=rf"^{bad}: column item_emb: lists of one length expected; row 1 has 2, row 0 "
                                        r"has 1$"):  # it said "run `mmctr validate`", which never reads this table
        load_item_table(synth_dir, str(bad))
    pq.write_table(pa.table({"item_id": [1, 2], FUSED_VECTOR_COLUMN: [[1.0], [2.0]]}), bad)
    (tmp_path / "emb.fusion.json").write_text('{"strategy": "v4", ')  # cut short: a JSONDecodeError traceback
    with pytest.raises(DataError, match=rf"^{tmp_path}/emb.fusion.json: not valid JSON \(.+\); expected the "
                                        r"\.fusion\.json `mmctr fuse` writes beside its table$"):
        load_item_table(synth_dir, str(bad))


def _tags(t: pa.Table, row: int, tags: list) -> pa.Table:
    values = t.column("item_tags").to_pylist()
    values[row] = tags
    return t.set_column(t.schema.get_field_index("item_tags"), "item_tags", pa.array(values, pa.list_(pa.int64())))


def _null_at(t: pa.Table, column: str, row: int) -> pa.Table:
    values = t.column(column).to_pylist()
    values[row] = None
    return t.set_column(t.schema.get_field_index(column), column, pa.array(values, t.schema.field(column).type))


@pytest.mark.parametrize("change, error", [
    (lambda t: _tags(t, 3, [0, 0, 0, 1, -2]), r"column item_tags: values span -2\.\.\d+, expected tag ids >= 0 \(0 = "
                                              r"padding\); run `mmctr validate "),
    (lambda t: _tags(t, 3, [0, 0, 0, 1, None]), r"column item_tags: 1 null values, expected tag ids >= 0"),
    (lambda t: _null_at(t, "item_emb_d128", 3), r"column item_emb_d128: 1 null values, expected vectors of numbers"),
    (lambda t: _null_at(t, "item_id", 3), r"column item_id: 1 null values, expected item ids 0\.\.200 in row order"),
    (lambda t: t.set_column(1, "item_tags", pa.array([[float(x) for x in r] for r in t.column(1).to_pylist()])),
     r"column item_tags: has type list<element: double>, expected list<int> of length 5$"),
    (lambda t: t.drop(["item_emb_d128"]), r"column item_emb_d128: missing column \(expected list<float> of length "
                                          r"128\)$"),
])
def test_a_bad_item_info_is_one_line_before_the_item_table_is_built(synth_dir, tmp_path, change, error):
    """Only item_info's item_id was checked before Ray: a negative tag was an IndexError in each worker's tag lookup
    (a device assert on CUDA), a null tag a huge negative id, float tags cut to integers, a null id a ValueError, a
    null vector a "row 3 has nan" and a missing column an ArrowInvalid traceback. The driver's preflight
    (num_items, which train, predict and compare run before Ray) and the table's build say it in one line."""
    from mmctr_ray.preflight import num_items

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    info = Layout(data).item_info
    assert pq.read_table(info).column_names[1] == "item_tags"
    pq.write_table(change(pq.read_table(info)), info)
    for build in (num_items, load_item_table):
        with pytest.raises(DataError, match=f"^{info}: {error}"):
            build(data)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_read_split_as_ray_dataset(ray_local, synth_dir, tiny_spec):
    ds = read_split(synth_dir, "valid", max_len=16, batch_rows=128)
    rows = 0
    raw = pq.read_table(Layout(synth_dir).split("valid"))
    raw_ids = raw.column("item_id").to_numpy()
    seen_ids = []
    for batch in ds.iter_batches(batch_size=100, batch_format="numpy"):
        assert set(batch) == {"user_id", "item_id", "likes_level", "views_level", "label", "item_seq"}
        assert batch["item_seq"].shape[1:] == (16,) and batch["item_seq"].dtype == np.int64
        assert batch["label"].dtype == np.float32
        seen_ids.append(batch["item_id"])
        rows += len(batch["label"])
    assert rows == tiny_spec.valid_rows
    np.testing.assert_array_equal(np.sort(np.concatenate(seen_ids)), np.sort(raw_ids))


@pytest.fixture(params=["v1", "v2"])
def reader(request, monkeypatch):
    """Each of Ray Data's two Parquet readers read_split chooses between: the tiny splits here are small (V1);
    with no row allowed to V1, V2 reads them as it reads a large split."""
    import mmctr_ray.features as features

    if request.param == "v2":
        monkeypatch.setattr(features, "V1_MAX_ROWS", 0)
    return request.param


def _operators(ds) -> list[str]:
    ops, todo = [], [ds._logical_plan.dag]
    while todo:
        op = todo.pop()
        ops.append(type(op).__name__)
        todo += op.input_dependencies
    return ops


@pytest.mark.slow
def test_a_small_split_is_read_without_the_footer_actors_of_ray_datas_default_reader(ray_local, synth_dir,
                                                                                      monkeypatch, tmp_path):
    """Ray 2.60's default Parquet reader (V2) starts a pool of footer-reading actors per read: over a second for
    any split; V1 plans a few files where it is called. A split over V1_MAX_ROWS, or of more files than
    V1_MAX_FILES, goes to V2, whose parallel read units and faster stream pay for its start there."""
    import mmctr_ray.features as features

    ctx = ray_local.data.DataContext.get_current()
    if not ctx.use_datasource_v2:
        pytest.skip("RAY_DATA_USE_DATASOURCE_V2=0 in this environment: every read is V1")
    assert "Read" in _operators(read_split(synth_dir, "valid")) and ctx.use_datasource_v2  # V1's operator
    monkeypatch.setattr(features, "V1_MAX_ROWS", 499)  # the valid split has 500 rows
    assert "ListFiles" in _operators(read_split(synth_dir, "valid")) and ctx.use_datasource_v2
    monkeypatch.setattr(features, "V1_MAX_ROWS", 500)
    assert "ListFiles" not in _operators(read_split(synth_dir, "valid"))
    monkeypatch.setattr(features, "V1_MAX_FILES", 0)
    assert "ListFiles" in _operators(read_split(synth_dir, "valid"))
    bad = tmp_path  # a caller that skipped validation: the file named, not Arrow's words
    (bad / "MicroLens_1M_x1").mkdir(parents=True, exist_ok=True)
    (bad / "MicroLens_1M_x1" / "valid.parquet").write_bytes(b"not parquet")
    monkeypatch.setattr(features, "V1_MAX_FILES", 64)
    with pytest.raises(DataError, match=r"^.*valid\.parquet: not a readable parquet file \("):
        read_split(bad, "valid")
    ctx.use_datasource_v2 = False  # a user who turned V2 off keeps it off
    try:
        monkeypatch.setattr(features, "V1_MAX_ROWS", 0)
        assert "ListFiles" not in _operators(read_split(synth_dir, "valid")) and not ctx.use_datasource_v2
    finally:
        ctx.use_datasource_v2 = True


@pytest.mark.slow
def test_a_small_split_is_read_one_task_and_one_stream_of_blocks_per_file(ray_local, synth_dir, tmp_path,
                                                                          split_into_parts):
    """V1 cuts a read task's output into ~200 blocks by default ("ReadParquet->SplitBlocks(n)"): tiny blocks
    through the object store one by one, 2.5x slower to stream and 2x slower to score in ``mmctr predict``."""
    import shutil

    data = shutil.copytree(synth_dir, tmp_path / "data", ignore=shutil.ignore_patterns("item_images"))
    split_into_parts(data, "test", 3)
    for split, files in (("train", 1), ("test", 3)):
        ds = read_split(data, split)
        assert "ListFiles" not in _operators(ds)  # V1
        ds = ds.materialize()
        stats = ds.stats()
        assert "SplitBlocks" not in stats, stats
        assert f"ReadParquet: {files} tasks executed" in stats, stats
        assert ds.count() == pq.ParquetDataset(Layout(data).split_files(split)).read().num_rows


@pytest.mark.slow
def test_read_split_rows_match_source_exactly(ray_local, synth_dir, reader):
    """Every source row arrives once with its 32 most recent items (order-free: Ray may reorder blocks)."""
    raw = pq.read_table(Layout(synth_dir).split("test"))
    seq = np.stack(raw.column("item_seq").to_numpy(zero_copy_only=False))[:, -32:]
    key = raw.column("user_id").to_numpy() * 10**6 + raw.column("item_id").to_numpy()
    ds = read_split(synth_dir, "test", max_len=32)
    assert ("ListFiles" in _operators(ds)) == (reader == "v2")
    batch = {k: [] for k in ("user_id", "item_id", "item_seq")}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in batch:
            batch[k].append(b[k])
    out = {k: np.concatenate(v) for k, v in batch.items()}
    got_key = out["user_id"] * 10**6 + out["item_id"]
    order, got_order = np.lexsort((seq.sum(1), key)), np.lexsort((out["item_seq"].sum(1), got_key))
    np.testing.assert_array_equal(out["item_seq"][got_order], seq[order])


@pytest.mark.slow
def test_read_split_missing_file(ray_local, tmp_path):
    with pytest.raises(DataError, match="train.parquet: missing file"):
        read_split(tmp_path, "train")


def test_null_placeholder_labels_become_zero():
    seq = np.ones((2, 100), dtype=np.int64)
    batch = pa.table({"user_id": [1, 2], "item_seq": list_array(seq, pa.int64()), "item_id": [4, 5],
                      "likes_level": [0, 1], "views_level": [2, 3], "label": pa.nulls(2, pa.float64())})
    np.testing.assert_array_equal(to_model_batch(batch, max_len=4)["label"], [0.0, 0.0])


@pytest.mark.slow
def test_the_features_summary_reads_nan_placeholder_labels_in_test(ray_local, synth_dir, tmp_path):
    """validate and the stages accept NaN as the test split's placeholder label; the features summary summed the
    test labels too and stopped with `cannot convert float NaN to integer` after validate had passed."""
    import shutil

    from mmctr_ray.feature_summary import _split_stats

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("item_images"))
    test = pq.read_table(Layout(data).split("test"))
    labels = pa.array(np.full(test.num_rows, np.nan))
    pq.write_table(test.set_column(test.schema.get_field_index("label"), "label", labels), Layout(data).split("test"))
    stats = _split_stats(data, "test", 16)
    assert stats["rows"] == test.num_rows and "positive_rate" not in stats
    valid = _split_stats(data, "valid", 16)
    labels = pq.read_table(Layout(data).split("valid"), columns=["label"]).column("label").to_numpy()
    assert valid["positive_rate"] == pytest.approx(labels.mean())


@pytest.mark.slow
def test_read_split_of_a_folder_of_parts_keeps_the_row_order(ray_local, synth_dir, tmp_path, split_into_parts,
                                                             reader, monkeypatch):
    """A split held as part files is read part by part in name order: with Ray Data's preserve_order (what
    predict sets) and ``ordered`` (what predict asks for) the rows come in the order of the single file they were
    cut from, whichever reader a split of its size gets. V2 packs row groups into read units first-fit and flushes
    the small ones last, so without ``ordered`` its rows come out of file order once the row groups outgrow one
    read unit (128 MiB by default; 4 KiB here, where a part's first row group of 128 rows takes ~6 KB): a
    submission's IDs, which are row positions, would name other rows' predictions."""
    import shutil

    monkeypatch.setenv("RAY_DATA_PARQUET_BIN_PACKING_BYTES", str(4 << 10))  # read by read_parquet when called
    data = shutil.copytree(synth_dir, tmp_path / "data", ignore=shutil.ignore_patterns("item_images"))
    expected = pq.read_table(Layout(synth_dir).split("test"))
    split_into_parts(data, "test", 4)
    ctx = ray_local.data.DataContext.get_current()
    keep, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        for ordered in (True, False):
            ds = read_split(data, "test", max_len=8, batch_rows=64, ordered=ordered)
            v2 = "ListFiles" in _operators(ds)
            assert v2 == (reader == "v2" and not ordered)
            batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
            got = {k: np.concatenate([b[k] for b in batches]) for k in ("user_id", "item_id", "item_seq")}
            key = got["user_id"] * 10**6 + got["item_id"]
            want = expected.column("user_id").to_numpy() * 10**6 + expected.column("item_id").to_numpy()
            if v2:  # every row once, out of order: what ``ordered`` is for (if V2 ever keeps the order, say so)
                np.testing.assert_array_equal(np.sort(key), np.sort(want))
                assert not np.array_equal(key, want), "V2 kept the row order: predict no longer needs V1"
                continue
            np.testing.assert_array_equal(got["user_id"], expected.column("user_id").to_numpy())
            np.testing.assert_array_equal(got["item_id"], expected.column("item_id").to_numpy())
            seq = np.stack(expected.column("item_seq").to_numpy(zero_copy_only=False))[:, -8:]
            np.testing.assert_array_equal(got["item_seq"], seq)
    finally:
        ctx.execution_options.preserve_order = keep


@pytest.mark.slow
def test_parts_may_store_columns_at_other_widths(ray_local, synth_dir, tmp_path, split_into_parts):
    """One part of int32/float32 columns beside parts of int64/float64, and one of integer labels (0/1 as a
    pandas or Spark export may store them): validate, the stages' preflight and the reader (which normalises per
    batch) take them as one split."""
    import shutil

    from mmctr_ray.preflight import check_splits
    from mmctr_ray.validate import validate

    single = check_splits(synth_dir, ("train",))
    data = shutil.copytree(synth_dir, tmp_path / "data")  # covers too: validate warns without them
    parts = split_into_parts(data, "train", 4)  # the last one empty
    for part, widths in ((parts[1], {"user_id": pa.int32(), "item_id": pa.int32(), "likes_level": pa.int8(),
                                     "label": pa.float32(), "item_seq": pa.list_(pa.int32())}),
                         (parts[0], {"label": pa.float64()}), (parts[2], {"label": pa.int8()})):
        table = pq.read_table(part)
        pq.write_table(table.cast(pa.schema([pa.field(f.name, widths.get(f.name, f.type)) for f in table.schema])),
                       part)
    assert pq.ParquetFile(parts[1]).schema_arrow.field("user_id").type == pa.int32()
    assert pq.ParquetFile(parts[2]).schema_arrow.field("label").type == pa.int8()
    assert validate(data) == []
    assert check_splits(data, ("train",)) == single
    batches = list(read_split(data, "train", max_len=8, batch_rows=4096).iter_batches(batch_format="numpy"))
    assert {(k, str(v.dtype)) for b in batches for k, v in b.items()} == {
        ("user_id", "int64"), ("item_id", "int64"), ("likes_level", "int64"), ("views_level", "int64"),
        ("label", "float32"), ("item_seq", "int64")}
    want = pq.read_table(Layout(synth_dir).split("train"))
    got = np.concatenate([b["user_id"] for b in batches])
    assert sorted(got.tolist()) == sorted(want.column("user_id").to_pylist())
    labels = np.concatenate([b["label"] for b in batches])
    assert labels.sum() == want.column("label").to_numpy().sum() and set(np.unique(labels)) == {0.0, 1.0}


def test_a_right_padded_history_of_one_item_is_a_padding_gap():
    """[7, 0, ..., 0]: a mutation of padding_gaps that left out the first slot passed, and validate and the workers'
    check then took the row as left-padded (the model would read its last slots: an empty history)."""
    from mmctr_ray.errors import DataError
    from mmctr_ray.features import check_left_padded
    from mmctr_ray.schema import padding_gaps

    row = np.array([[7] + [0] * 99])
    assert padding_gaps(row).tolist() == [True] and padding_gaps(np.array([[0] * 99 + [7]])).tolist() == [False]
    with pytest.raises(DataError, match="padding 0 after an item id"):
        check_left_padded(row, "x")


def test_the_user_table_holds_a_row_for_the_largest_user_id(synth_dir):
    """feature_map.json's num_users is the largest id + 1 (a mutation without the + 1 passed: with
    model.use_user_id the largest id would index past the table)."""
    from mmctr_ray.features import build_feature_map, load_item_table, max_user_id

    assert build_feature_map(synth_dir, load_item_table(synth_dir)).num_users == max_user_id(synth_dir) + 1


def test_a_split_whose_pages_do_not_decode_is_one_line_naming_it(synth_dir, monkeypatch):
    """Ray Data samples a split's first rows when the dataset is made, on the driver: bytes damaged behind an intact
    footer (the checks before Ray pass it) arrived as Ray's RayTaskError(OSError), a traceback of 88 lines."""
    import ray.data

    from mmctr_ray.features import read_split

    inner = OSError("Couldn't deserialize thrift: TProtocolException: Invalid data\nDeserializing page header failed.")
    wrapped = OSError("ray::_fetch_parquet_file_info() (pid=1, ip=127.0.0.1)\nTraceback (most recent call last):")
    wrapped.cause = inner  # as Ray's RayTaskError(OSError) carries it

    def failing(*args, **kwargs):
        raise wrapped

    monkeypatch.setattr(ray.data, "read_parquet", failing)
    path = Layout(synth_dir).split("train")
    with pytest.raises(DataError, match=rf"^{path}: its data cannot be decoded \(Couldn't deserialize thrift: "
                                        rf"TProtocolException: Invalid data\): a damaged file; `mmctr validate "
                                        rf"{synth_dir}` names it$"):
        read_split(synth_dir, "train")
    monkeypatch.setattr(ray.data, "read_parquet", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="^other$"):  # anything else is not taken for a damaged file
        read_split(synth_dir, "train")


def test_a_history_of_exactly_the_shown_ids_is_shown_whole():
    """12 ids up to the gap: all shown, no "…" for ids left out (there are none)."""
    from mmctr_ray.features import check_left_padded

    with pytest.raises(DataError) as err:
        check_left_padded(np.array([[0] * 88 + list(range(1, 12)) + [0]]), "x")
    assert "([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0]);" in str(err.value), str(err.value)


def test_a_missing_split_holds_no_part_and_no_user(synth_dir, tmp_path):
    """parquet_parts: empty for a missing split (a data set without its test split), so the user table is sized from
    the splits there are, not a FileNotFoundError."""
    from mmctr_ray.features import max_user_id
    from mmctr_ray.schema import parquet_parts

    data = shutil.copytree(synth_dir, tmp_path / "d", ignore=shutil.ignore_patterns("item_images"))
    test = Layout(data).split("test")
    test.unlink()
    assert parquet_parts(test) == [] and Layout(data).split_files("test") == []
    largest = max(pq.read_table(Layout(data).split(s), columns=["user_id"])["user_id"].to_numpy().max()
                  for s in ("train", "valid"))
    assert max_user_id(data) == largest


def test_list_matrix_names_the_file_row_of_a_null_list_and_refuses_lists_of_lists():
    with pytest.raises(DataError, match=r"^x.parquet: column item_seq: row 11 is null; a list of numbers per row "
                                        r"expected$"):
        list_matrix(pa.array([[1, 2], None], pa.list_(pa.int64())), "x.parquet: column item_seq", row0=10)
    with pytest.raises(DataError, match=r"^x.parquet: column item_emb: a list of numbers per row expected; the "
                                        r"column is list<"):
        list_matrix(pa.array([[[1.0], [2.0]]], pa.list_(pa.list_(pa.float64()))), "x.parquet: column item_emb")


def test_a_fused_table_of_other_ids_or_an_item_twice_is_refused_and_its_padding_row_is_zero(synth_dir, tmp_path):
    bad = tmp_path / "emb.parquet"
    for ids, said in (([-1, 1], r"column item_id: value -1 outside 0\.\.200 \(item_info rows\)"),
                      ([3, 1, 3], r"column item_id: item 3 in 2 rows; expected each item once")):
        pq.write_table(pa.table({"item_id": ids, FUSED_VECTOR_COLUMN: [[float(i)] for i in range(len(ids))]}), bad)
        with pytest.raises(DataError, match=rf"^{bad}: {said}$"):
            load_item_table(synth_dir, str(bad))
    pq.write_table(pa.table({"item_id": [0, 1], FUSED_VECTOR_COLUMN: [[5.0], [7.0]]}), bad)  # a row for the padding id
    table = load_item_table(synth_dir, str(bad))
    assert table.vectors[0].tolist() == [0.0] and table.vectors[1].tolist() == [7.0]


def test_a_fused_table_of_another_item_count_is_refused_by_its_summary(synth_dir, tmp_path):
    """A table fused before `.fusion.json` kept the items' hash is compared by its item count alone."""
    from mmctr_ray.features import check_fused_for

    info = pq.read_table(Layout(synth_dir).item_info)
    check_fused_for(tmp_path / "emb.parquet", {"num_items": info.num_rows - 1}, synth_dir, info)
    with pytest.raises(DataError, match=rf"^{tmp_path}/emb.parquet: fused from the items of other data \(150 items\), "
                                        rf"not those of {synth_dir} \(200 items\): fuse again with --data "):
        check_fused_for(tmp_path / "emb.parquet", {"num_items": 150}, synth_dir, info)


def test_only_item_infos_own_vectors_are_refused_as_placeholders(synth_dir, tmp_path):
    """convert.json's placeholder_embeddings: `given` is refused, a fused table is what the user is told to use; a
    convert.json without the flag is no placeholder."""
    from mmctr_ray.features import has_placeholder_embeddings, refuse_placeholders

    data = shutil.copytree(synth_dir, tmp_path / "d", ignore=shutil.ignore_patterns("item_images"))
    (data / "convert.json").write_text('{"placeholder_embeddings": true}')
    with pytest.raises(DataError, match=r"column item_emb_d128: zero placeholders written by `mmctr convert`"):
        refuse_placeholders(data, "given")
    refuse_placeholders(data, str(tmp_path / "item_emb.parquet"))  # the fused table: fine
    (data / "convert.json").write_text("{}")
    assert not has_placeholder_embeddings(data)
    refuse_placeholders(data, "given")


def test_an_id_table_of_exactly_the_factor_rows_per_tag_is_built(synth_dir):
    """SPARSE_TABLE_FACTOR rows per tag is within the bound: refused only past it."""
    distinct = SPARSE_TABLE_ROWS // SPARSE_TABLE_FACTOR + 1
    tags = np.zeros((distinct + 1, 5), np.int64)
    tags[1:, -1] = np.r_[1:distinct, SPARSE_TABLE_FACTOR * distinct - 1]  # largest + 1 == 16 x distinct
    check_id_tables(synth_dir, tags, 1, use_tags=True, use_user_id=False, dim=8, split_rows=10)


def test_read_split_of_a_missing_split_is_said_before_ray_is_needed(tmp_path):
    """The slow test_read_split_missing_file's check, in the fast suite: nothing of Ray runs before it."""
    with pytest.raises(DataError, match=r"train.parquet: missing file$"):
        read_split(tmp_path, "train")


def test_a_feature_map_missing_a_key_is_one_line(tmp_path):
    from mmctr_ray.features import FeatureMap

    path = tmp_path / "feature_map.json"
    path.write_text('{"num_items": 3, "tag_vocab": 4, "tags_per_item": 5, "vector_dim": 8}')  # no num_users
    with pytest.raises(DataError, match=rf"^{path}: feature map keys \['num_items', 'tag_vocab', 'tags_per_item', "
                                        r"'vector_dim'\] differ from the expected \["):
        FeatureMap.from_json(path)
