"""validate(): one corruption per test of a copy of the tiny synthetic data set; each must be reported as an
error naming the file, the column, the offending value and what was expected."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmctr_ray.schema import Layout
from mmctr_ray.validate import Problem, validate

TRAIN, VALID, TEST = (f"MicroLens_1M_x1/{s}.parquet" for s in ("train", "valid", "test"))
INFO, FEATURE = "MicroLens_1M_x1/item_info.parquet", "item_feature.parquet"


@pytest.fixture
def data(synth_dir, tmp_path):
    """A private copy of the synthetic data set, free to corrupt."""
    return shutil.copytree(synth_dir, tmp_path / "data")


def n_items(root) -> int:
    return pq.ParquetFile(Layout(root).item_info).metadata.num_rows - 1


def rewrite(path, fn) -> None:
    """Read the parquet file at ``path``, apply ``fn`` (table → table) and write it back."""
    pq.write_table(fn(pq.read_table(path)), path)


def replace(table: pa.Table, name: str, values, type_: pa.DataType | None = None) -> pa.Table:
    """``table`` with column ``name`` replaced by ``values`` (cast to the old type unless ``type_``)."""
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, pa.array(values, type=type_ or table.schema.field(name).type))


def set_cell(name: str, row: int, value, type_: pa.DataType | None = None):
    """A rewrite fn setting one cell (a scalar, or a whole list for list columns)."""
    def fn(table: pa.Table) -> pa.Table:
        values = table[name].to_pylist()
        values[row] = value
        return replace(table, name, values, type_)
    return fn


def set_elem(name: str, row: int, pos: int, value):
    """A rewrite fn setting one element of one list cell."""
    def fn(table: pa.Table) -> pa.Table:
        cell = table[name][row].as_py()
        cell[pos] = value
        return set_cell(name, row, cell)(table)
    return fn


def errors(root, **kw) -> list[Problem]:
    return [p for p in validate(root, **kw) if p.is_error]


def the_error(root, file: str, column: str | None, *needles: str, **kw) -> Problem:
    """The one error about ``file``/``column``; its text must contain every needle."""
    found = [p for p in errors(root, **kw) if p.file == file and p.column == column]
    assert len(found) == 1, [str(p) for p in validate(root, **kw)]
    for needle in needles:
        assert needle in str(found[0]), (needle, str(found[0]))
    return found[0]


def test_synth_output_validates_clean(synth_dir):
    assert validate(synth_dir) == []


def test_missing_images_is_only_a_warning(data):
    lay = Layout(data)
    for item in (7, 3):  # some covers missing (a converted set's): counted, the first named
        lay.image(item).unlink()
    problems = validate(data)
    assert [(p.file, p.is_error) for p in problems] == [("item_images", False)]
    assert str(problems[0]).startswith("warning: item_images: 2 of 200 items have no cover (the first: 3.jpg)")
    # covers that cannot be images passed as OK, and embed counted them corrupt after Ray started (helper-131, F5)
    lay.image(9).write_bytes(b"")
    lay.image(7).mkdir()
    lay.image(3).symlink_to(lay.images_dir / "nowhere.jpg")  # embed finds no file there: missing, not corrupt
    (loop := lay.image(5)).unlink()
    loop.symlink_to(loop)  # one embed cannot read: corrupt
    assert [str(p) for p in validate(data)] == [
        "warning: item_images: 1 of 200 items have no cover (the first: 3.jpg); embed flags them missing, up to "
        "--max-bad-covers (10% by default)",
        "warning: item_images: 3 of 200 covers cannot be images (the first: 5.jpg, unreadable (Too many levels of "
        "symbolic links)); embed flags them corrupt, up to --max-bad-covers (10% by default)"]
    lay.image(7).rmdir()
    lay.image(3).unlink()
    loop.unlink()
    assert [str(p) for p in validate(data)][1] == (
        "warning: item_images: 1 of 200 covers cannot be images (the first: 9.jpg, an empty file); embed flags them "
        "corrupt, up to --max-bad-covers (10% by default)")
    lay.image(9).unlink()
    shutil.rmtree(lay.images_dir)
    problems = validate(data)
    assert [(p.file, p.is_error) for p in problems] == [("item_images", False)]
    assert str(problems[0]).startswith("warning: item_images: no cover images")


@pytest.mark.parametrize("file", [TRAIN, VALID, TEST, INFO, FEATURE])
def test_missing_file(data, file):
    (data / file).unlink()
    the_error(data, file, None, "missing file")


def test_data_directory_not_found(tmp_path):
    assert [str(p) for p in validate(tmp_path / "nope")] == [f"error: {tmp_path / 'nope'}: data directory not found"]


def test_the_dataset_folder_itself_or_a_folder_without_it_is_one_line_naming_the_right_one(data, tmp_path):
    """`--data DATA/MicroLens_1M_x1` (the folder the splits are in) gave five "missing file" lines: one line now
    names the folder to pass; so does every stage's check, which gave `.../MicroLens_1M_x1/MicroLens_1M_x1/...`."""
    from mmctr_ray.errors import DataError
    from mmctr_ray.preflight import check_splits

    inner = data / "MicroLens_1M_x1"
    assert [str(p) for p in validate(inner)] == [
        f"error: {inner}: looks like the MicroLens_1M_x1 folder itself: --data is the folder above it, here {data}"]
    with pytest.raises(DataError, match=rf"^{inner}: looks like the MicroLens_1M_x1 folder itself: --data is the "
                                        rf"folder above it, here {data}$"):  # the reason first, as validate says it
        check_splits(inner, ["train"])
    assert [str(p) for p in validate(tmp_path)] == [
        f"error: {tmp_path}: holds no MicroLens_1M_x1/ folder: --data is the folder that holds MicroLens_1M_x1/ and "
        f"item_feature.parquet"]


@pytest.mark.parametrize("file,column,kind", [(TRAIN, "label", "float"), (TEST, "item_seq", "list<int> of length 100"),
                                              (INFO, "item_emb_d128", "list<float> of length 128"),
                                              (FEATURE, "item_title", "string")])
def test_missing_column(data, file, column, kind):
    rewrite(data / file, lambda t: t.drop_columns([column]))
    the_error(data, file, column, "missing column", kind)


@pytest.mark.parametrize("file,column,type_,shown,expected", [
    (TRAIN, "item_id", pa.string(), "has type string", "expected integer"),
    (VALID, "item_seq", pa.list_(pa.string()), "has type list<element: string>", "expected list<int> of length 100"),
    (TRAIN, "label", pa.string(), "has type string", "expected float"),
    (INFO, "item_tags", pa.list_(pa.float32()), "has type list<element: float>", "expected list<int> of length 5"),
])
def test_wrong_dtype(data, file, column, type_, shown, expected):
    rewrite(data / file, lambda t: replace(t, column, t[column].cast(type_), type_))
    the_error(data, file, column, shown, expected)


def test_integer_and_float_widths_are_accepted(data):
    rewrite(data / TRAIN, lambda t: replace(t, "user_id", t["user_id"].cast(pa.int32()), pa.int32()))
    rewrite(data / TRAIN, lambda t: replace(t, "label", t["label"].cast(pa.float32()), pa.float32()))
    assert validate(data) == []


@pytest.mark.parametrize("file", [VALID, INFO, FEATURE])
def test_empty_file(data, file):
    rewrite(data / file, lambda t: t.slice(0, 0))
    the_error(data, file, None, "empty file: 0 rows")


@pytest.mark.parametrize("damage", ["garbage", "half", "pages"])
def test_corrupt_parquet(data, damage):
    path = data / TRAIN
    raw = path.read_bytes()
    if damage == "garbage":
        raw = b"this is not parquet" * 100
    elif damage == "half":
        raw = raw[: len(raw) // 2]
    else:  # scramble the data pages, keep the footer: the file opens, then fails to decode
        noise = np.random.default_rng(0).integers(0, 256, len(raw) // 2, dtype=np.uint8).tobytes()
        raw = raw[:100] + noise + raw[100 + len(noise):]
    path.write_bytes(raw)
    the_error(data, TRAIN, None, "not a readable parquet file")
    assert [p.file for p in errors(data)] == [TRAIN]


@pytest.mark.parametrize("column,value,expected", [("item_id", "too_big", "item ids in 1.."),
                                                   ("item_id", 0, "item ids in 1.."),
                                                   ("user_id", -5, "non-negative ids"),
                                                   ("likes_level", 10, "levels in 0..9"),
                                                   ("views_level", -1, "levels in 0..9")])
def test_split_scalar_out_of_range(data, column, value, expected):
    value = n_items(data) + 1 if value == "too_big" else value
    rewrite(data / VALID, set_cell(column, 7, value))
    the_error(data, VALID, column, f"1 value not {expected}", f"first {value} at row 7")


def test_unsigned_user_ids_past_int64_are_refused(data):
    """user_id stored as uint64 with a value past 2^63 - 1 passed validate and features: every stage's int64 read
    turns it negative (helper-131, F8). Unsigned ids within int64 pass."""
    ids = pq.read_table(data / VALID).column("user_id").to_pylist()
    rewrite(data / VALID, lambda t: replace(t, "user_id", ids, pa.uint64()))
    assert errors(data) == []
    rewrite(data / VALID, set_cell("user_id", 7, 2**63, pa.uint64()))
    the_error(data, VALID, "user_id", "1 value not ids of at most 9,223,372,036,854,775,807 (int64)",
              f"first {2**63} at row 7")
    from mmctr_ray.errors import DataError
    from mmctr_ray.preflight import check_split

    with pytest.raises(DataError, match=r"valid.parquet: column user_id: values span \d+\.\.9223372036854775808, "
                                        r"expected non-negative ids of at most 9,223,372,036,854,775,807 \(int64\)"):
        check_split(data, "valid")  # train's, tune's and predict's checks before Ray (helper-133)


@pytest.mark.parametrize("value", ["too_big", -3])
def test_item_seq_id_out_of_range(data, value):
    value = n_items(data) + 5 if value == "too_big" else value
    rewrite(data / TRAIN, set_elem("item_seq", 1234, -1, value))  # 1234: a row past the first row group
    the_error(data, TRAIN, "item_seq", f"item ids in 0..{n_items(data)} (0 = padding)", f"first {value} at row 1234")


def test_item_seq_of_wrong_length(data):
    rewrite(data / VALID, lambda t: set_cell("item_seq", 3, t["item_seq"][3].as_py()[1:])(t))
    the_error(data, VALID, "item_seq", "lists of length 100; first a list of 99 at row 3")  # was "first 99"


def test_item_seq_not_left_padded(data):
    seq = pq.read_table(data / VALID)["item_seq"][5].as_py()
    start = next(i for i, v in enumerate(seq) if v)
    assert start < 99  # a history of at least two items
    rewrite(data / VALID, set_elem("item_seq", 5, -1, 0))  # a 0 after the first real item
    shown = seq[start:-1] + [0]  # the history up to its gap, its last 12 ids at most, as is (it was quoted whole)
    shown = ("[…, " if len(shown) > 12 else "[") + ", ".join(map(str, shown[-12:])) + "]"
    the_error(data, VALID, "item_seq", "left-padded", f"; first history {shown} at row 5")
    rewrite(data / VALID, lambda t: set_cell("item_seq", 5, [7, 8, 9] + [0] * 97)(t))  # right-padded
    the_error(data, VALID, "item_seq", "; first history [7, 8, 9, 0, …] at row 5")
    # beside a row of the wrong width in the same batch: both said in one run (the padding check skipped the
    # batch, so its error came only on the run after the width was fixed), a null inside a list too
    rewrite(data / VALID, lambda t: set_cell("item_seq", 2, [4, 5])(t))
    rewrite(data / VALID, lambda t: set_cell("item_seq", 3, [None] + [6] * 99)(t))
    said = [str(p) for p in errors(data) if p.file == VALID and p.column == "item_seq"]
    assert len(said) == 3, said
    assert any("lists of length 100" in e and "at row 2" in e for e in said)
    assert any("not non-null" in e and "at row 3" in e for e in said)
    assert any("left-padded" in e and "first history [7, 8, 9, 0, …] at row 5" in e for e in said)


@pytest.mark.parametrize("placeholder", [lambda n: np.full(n, -1.0), lambda n: pa.nulls(n, pa.float64())],
                         ids=["-1", "null"])
def test_label_placeholder_in_test_is_fine(data, placeholder):
    rewrite(data / TEST, lambda t: replace(t, "label", placeholder(t.num_rows)))
    assert validate(data) == []


@pytest.mark.parametrize("value", [0.5, 2.0])
def test_label_not_binary_in_train(data, value):
    rewrite(data / TRAIN, set_cell("label", 11, value))
    the_error(data, TRAIN, "label", "1 value not 0 or 1", f"first {value!r} at row 11")


def test_a_valid_split_of_one_class_is_an_error_as_training_refuses_it(data):
    """validate said OK, and `mmctr train` refused the split only after the pipeline's embed and fuse had run."""
    rewrite(data / VALID, lambda t: replace(t, "label", [0.0] * t.num_rows))
    the_error(data, VALID, "label", "label 0 in all", "expected clicks (1) and non-clicks (0)")
    rewrite(data / TRAIN, lambda t: replace(t, "label", [1.0] * t.num_rows))  # training labels: any mix is fine
    assert [p.file for p in errors(data)] == [VALID]


def test_an_item_seq_of_fixed_size_lists_is_checked_as_a_list(data):
    """A history column stored as fixed_size_list (and without column statistics) passed validate, then training's
    preflight failed with pyarrow's "no kernel for min_max on fixed_size_list" traceback."""
    from mmctr_ray.errors import DataError
    from mmctr_ray.preflight import check_split

    table = pq.read_table(data / TRAIN)
    fixed = table.set_column(table.schema.get_field_index("item_seq"), "item_seq",
                             table["item_seq"].cast(pa.list_(pa.int64(), 100)))
    pq.write_table(fixed, data / TRAIN, write_statistics=False)
    assert check_split(data, "train") == table.num_rows and errors(data) == []
    seqs = table["item_seq"].to_pylist()  # and its values are read: an id past the items is still found
    seqs[0][-1] = n_items(data) + 5
    bad = fixed.set_column(fixed.schema.get_field_index("item_seq"), "item_seq",
                           pa.array(seqs, pa.list_(pa.int64(), 100)))
    pq.write_table(bad, data / TRAIN, write_statistics=False)
    with pytest.raises(DataError, match=rf"column item_seq: values span 0\.\.{n_items(data) + 5}, expected item ids"):
        check_split(data, "train")
    the_error(data, TRAIN, "item_seq", str(n_items(data) + 5))


def test_the_checks_before_ray_read_every_page_of_a_split_and_name_the_row(data, monkeypatch):
    """What the footers let through reached the workers, after Ray had started (and `train --overwrite` had set RUN
    aside): histories of 99 and 101 ids in one row group (the footer's count adds up) and a gap in a history's
    padding were one line without the row; a page that does not decode in a later row group ~500 lines of Ray
    Data's and Ray Train's tracebacks. The scan reads in batches (SCAN_ROWS, small here): rows count across them."""
    from mmctr_ray import preflight
    from mmctr_ray.errors import DataError

    monkeypatch.setattr(preflight, "SCAN_ROWS", 16)
    path = data / TRAIN
    table = pq.read_table(path)
    seqs = table["item_seq"].to_pylist()
    i = table.schema.get_field_index("item_seq")

    def write(rows, **kwargs):
        pq.write_table(table.set_column(i, "item_seq", pa.array(rows, table.schema.field(i).type)), path, **kwargs)

    write([s[1:] if r == 37 else [0, *s] if r == 38 else s for r, s in enumerate(seqs)])
    with pytest.raises(DataError, match=rf"^{path}: column item_seq: row 37 holds 99 ids, expected fixed-width "
                                        rf"histories of 100 ids, left-padded with 0; run `mmctr validate {data}` "
                                        rf"for the rows$"):
        preflight.check_split(data, "train")
    write([[0] * 97 + [7, 0, 9] if r == 41 else s for r, s in enumerate(seqs)])
    with pytest.raises(DataError, match=rf"^{path}: column item_seq: row 41 holds a padding 0 after an item id "
                                        r"\(\[7, 0, …\]\); expected left-padded histories, all 0s before the "
                                        rf"history, most recent last; run `mmctr validate {data}` for the rows$"):
        preflight.check_split(data, "train")
    write(seqs, row_group_size=50)
    assert preflight.check_split(data, "train") == table.num_rows
    preflight._SCANNED.clear()  # the damaged copy has the same size, and may have the same modification time
    raw = bytearray(path.read_bytes())
    column = pq.ParquetFile(path).metadata.row_group(3).column(i)
    start = column.dictionary_page_offset or column.data_page_offset
    raw[start + 8:start + column.total_compressed_size - 8] = bytes(column.total_compressed_size - 16)
    path.write_bytes(bytes(raw))
    assert pq.ParquetFile(path).metadata.num_rows == table.num_rows  # the footer reads
    with pytest.raises(DataError, match=rf"^{path}: its data cannot be decoded \(.+\): a damaged file; `mmctr "
                                        rf"validate` checks every file$"):
        preflight.check_split(data, "train")
    assert preflight.check_split(data, "train", scan=False) == table.num_rows  # a search's trial: footers only
    test = data / TEST  # placeholder labels, not checked, but read: predict's actors read them
    tt = pq.read_table(test)
    pq.write_table(tt, test, row_group_size=50)
    raw = bytearray(test.read_bytes())
    column = pq.ParquetFile(test).metadata.row_group(1).column(tt.schema.get_field_index("label"))
    start = column.dictionary_page_offset or column.data_page_offset
    raw[start + 4:start + column.total_compressed_size] = b"\xff" * (column.total_compressed_size - 4)
    test.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"^{test}: its data cannot be decoded"):
        preflight.check_split(data, "test")


def test_a_split_is_scanned_once_a_process_while_its_files_are_unchanged(data, monkeypatch):
    """`mmctr predict` checks before Ray and run_predict again; tune's CLI and run_tuning; a pipeline's features,
    train and predict steps one after another: each read every page again (~3 s a 3.6M-row split)."""
    from mmctr_ray import preflight

    scanned = []
    monkeypatch.setattr(preflight, "_SCANNED", set())
    monkeypatch.setattr(preflight, "scan_part", lambda pf, path, labels, hint: scanned.append((path.name, labels)))
    preflight.check_splits(data, ["train", "valid", "test"])
    preflight.check_split(data, "valid")
    assert scanned == [("train.parquet", True), ("valid.parquet", True), ("test.parquet", False)]
    table = pq.read_table(data / TRAIN)
    pq.write_table(table.slice(0, table.num_rows - 1), data / TRAIN)  # rewritten: scanned again
    preflight.check_split(data, "train")
    assert scanned[3:] == [("train.parquet", True)]


def test_item_info_rows_out_of_order(data):
    def swap(t):
        order = list(range(t.num_rows))
        order[3], order[4] = 4, 3
        return t.take(order)
    rewrite(data / INFO, swap)
    the_error(data, INFO, "item_id", "2 values not equal to the row index", "first 4 at row 3")


@pytest.mark.parametrize("column,value,shown", [("item_tags", [0, 0, 0, 0, 7], "found 7"),
                                                ("item_emb_d128", [0.0] * 127 + [0.25], "found 0.25")])
def test_item_info_padding_row_not_zero(data, column, value, shown):
    rewrite(data / INFO, set_cell(column, 0, value))
    the_error(data, INFO, column, "row 0 must be the all-zero padding item", shown)


@pytest.mark.parametrize("file", [INFO, FEATURE])
def test_item_tags_wrong_length(data, file):
    rewrite(data / file, set_cell("item_tags", 9, [1, 2, 3]))
    the_error(data, file, "item_tags", "lists of length 5", "first a list of 3 at row 9")


def test_tag_ids_that_are_not_a_dense_vocabulary_are_a_warning(data):
    """Valid layout, but `mmctr train` refuses the tag table they size unless model.use_tags=false."""
    rewrite(data / INFO, set_elem("item_tags", 9, 4, 10**12))
    problems = validate(data)
    assert [(p.file, p.column, p.is_error) for p in problems] == [(INFO, "item_tags", False)], problems
    assert str(problems[0]).startswith(f"warning: {INFO}: column item_tags: largest tag id 1,000,000,000,000 for ")
    assert "`mmctr train` refuses its 1,000,000,000,001-row tag table unless model.use_tags=false" in str(problems[0])
    rewrite(data / INFO, set_elem("item_tags", 9, 4, 2**20 - 1))  # a table at the bound: built, no warning
    assert validate(data) == []


@pytest.mark.parametrize("file,column", [(INFO, "item_emb_d128"), (FEATURE, "txt_emb_BERT"),
                                         (FEATURE, "img_emb_CLIPRN50")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_embedding_not_finite(data, file, column, value):
    rewrite(data / file, set_elem(column, 6, 17, value))
    the_error(data, file, column, "finite floats (NaN/inf found)", f"first {value!r} at row 6")


@pytest.mark.parametrize("file,column,width", [(INFO, "item_emb_d128", 128), (FEATURE, "txt_emb_BERT", 768),
                                               (FEATURE, "img_emb_CLIPRN50", 1024)])
def test_embedding_wrong_width(data, file, column, width):
    rewrite(data / file, set_cell(column, 2, [0.5] * (width - 1)))
    the_error(data, file, column, f"lists of length {width}", f"first a list of {width - 1} at row 2")


def test_item_info_of_only_the_padding_row(data):
    """Before: no error of its own, and the splits' ids went unchecked (a range of 1..0 read as "no range")."""
    rewrite(data / INFO, lambda t: t.slice(0, 1))
    the_error(data, INFO, None, "holds only the padding row 0, expected the items 1..N after it")
    assert [str(p) for p in errors(data)] == [f"error: {INFO}: holds only the padding row 0, expected the items "
                                              f"1..N after it"]


def test_item_info_without_its_padding_row_is_one_error(data):
    """Items 1..N from row 0 (a table written from item_feature, the padding row left out) gave 11 errors for one
    cause: row 0 of each column, every id off its row, and every split's and item_feature's id N out of range."""
    rewrite(data / INFO, lambda t: t.slice(1))
    n = n_items(data) + 1  # the rows now: items 1..N
    assert [str(p) for p in errors(data)] == [f"error: {INFO}: column item_id: rows hold items 1..{n:,} with no "
                                              f"padding row before them; expected row 0 = the all-zero padding item, "
                                              f"then item i at row i"]


def test_item_feature_duplicate_ids(data):
    rewrite(data / FEATURE, lambda t: pa.concat_tables([t, t.slice(41, 1)]))
    the_error(data, FEATURE, "item_id", "1 duplicate item ids; first 42")


def test_item_feature_id_outside_items(data):
    n = n_items(data)
    rewrite(data / FEATURE, set_cell("item_id", n - 1, n + 3))  # item n is renamed n + 3: out of range, n missing
    problems = [str(p) for p in errors(data) if p.file == FEATURE and p.column == "item_id"]
    assert len(problems) == 2, problems
    assert f"1 item ids outside 1..{n} (item_info rows); first {n + 3}" in problems[0]
    assert f"1 of item_info's items 1..{n} have no row; first {n}" in problems[1]


def test_item_feature_missing_item(data):
    rewrite(data / FEATURE, lambda t: t.filter(pa.compute.not_equal(t["item_id"], 57)))
    the_error(data, FEATURE, "item_id", f"1 of item_info's items 1..{n_items(data)} have no row; first 57")


@pytest.mark.parametrize("column,value", [("likes_level", 10), ("views_level", -2)])
def test_item_feature_levels_out_of_range(data, column, value):
    rewrite(data / FEATURE, set_cell(column, 8, value))
    the_error(data, FEATURE, column, "1 value not levels in 0..9", f"first {value} at row 8")


@pytest.mark.parametrize("file,column", [(TRAIN, "user_id"), (TRAIN, "label"), (VALID, "item_seq"),
                                         (FEATURE, "item_title"), (INFO, "item_tags")])
def test_null_value(data, file, column):
    rewrite(data / file, set_cell(column, 13, None))
    found = [str(p) for p in errors(data) if p.file == file and p.column == column]
    assert any("1 value not non-null (null found); first None at row 13" in p for p in found), found
    assert not [p for p in found if "lists of length" in p], found  # a null list is the null check's (it was also
    # "1 value not lists of length 100; first nan at row 13")


def test_null_item_ids_in_item_feature_are_listed_not_a_traceback(data):
    """Two null ids made the duplicate check convert NaN to int (ValueError)."""
    rewrite(data / FEATURE, lambda t: set_cell("item_id", 14, None)(set_cell("item_id", 13, None)(t)))
    found = [str(p) for p in errors(data) if p.file == FEATURE and p.column == "item_id"]
    assert any("2 values not non-null (null found); first None at row 13" in p for p in found), found
    assert any("have no row; first 14" in p for p in found), found  # the items those rows held


def test_an_item_info_whose_first_row_group_is_empty_validates(data):
    """The padding check read row 0 of row group 0, which a writer may leave empty (IndexError)."""
    def write_after_an_empty_group(table: pa.Table) -> None:
        with pq.ParquetWriter(data / INFO, table.schema) as writer:
            writer.write_table(table.slice(0, 0))
            writer.write_table(table)
        assert pq.ParquetFile(data / INFO).metadata.row_group(0).num_rows == 0

    table = pq.read_table(data / INFO)
    write_after_an_empty_group(table)
    assert not [p for p in errors(data) if p.file == INFO]
    write_after_an_empty_group(set_cell("item_emb_d128", 0, [0.5] * 128)(table))
    the_error(data, INFO, "item_emb_d128", "row 0 must be the all-zero padding item; found 0.5")


@pytest.mark.parametrize("file,column", [(VALID, "item_seq"), (FEATURE, "item_tags")])
def test_null_inside_a_list(data, file, column):
    rewrite(data / file, set_elem(column, 4, -1, None))
    the_error(data, file, column, "1 value not non-null (null found); first None at row 4")


def test_test_rows_as_requested(data):
    the_error(data, TEST, None, "has 400 rows; a submission needs 399 (as requested)", expect_test_rows=399)
    assert errors(data, expect_test_rows=400) == []


def test_test_rows_per_synth_manifest(data):
    expected = json.loads(Layout(data).synth_manifest.read_text())["spec"]["test_rows"]
    rewrite(data / TEST, lambda t: t.slice(0, t.num_rows - 10))
    the_error(data, TEST, None, f"has {expected - 10:,} rows; a submission needs {expected:,} (per synth.json)")


def test_every_problem_is_one_line(data):
    shutil.rmtree(Layout(data).images_dir)
    (data / VALID).write_bytes(b"PAR1\n\nnot\nparquet\nPAR1")
    rewrite(data / TRAIN, set_cell("label", 0, 0.5))
    rewrite(data / TRAIN, set_elem("item_seq", 0, -1, 0))
    rewrite(data / INFO, set_elem("item_emb_d128", 3, 0, float("nan")))
    rewrite(data / FEATURE, lambda t: t.drop_columns(["item_title"]))
    problems = validate(data, expect_test_rows=1)
    assert len(problems) >= 7, [str(p) for p in problems]
    for p in problems:
        text = str(p)
        assert "\n" not in text and "\r" not in text, text
        assert text.startswith("error: " if p.is_error else "warning: "), text
        assert text.split(": ", 2)[1] == p.file, text


def test_a_split_held_as_a_folder_of_parts_validates_and_preflights_like_one_file(data, synth_dir, split_into_parts):
    """Spark, Ray Data and `mmctr convert --split-layout parts` write a split as a folder of part files: validate
    and the stages' preflight read every part (an empty part, `_SUCCESS` and hidden files are fine), count the rows
    over all of them, and name the part a problem is in."""
    from mmctr_ray.errors import DataError
    from mmctr_ray.features import max_user_id
    from mmctr_ray.preflight import check_splits, check_valid_labels

    single = check_splits(synth_dir, ("train", "valid", "test"))
    parts = {split: split_into_parts(data, split, 3) for split in ("train", "valid", "test")}
    assert [p.name for p in Layout(data).split_files("valid")] == [p.name for p in parts["valid"]]
    assert validate(data) == []
    assert check_splits(data, ("train", "valid", "test")) == single
    check_valid_labels(data)
    assert max_user_id(data) == max_user_id(synth_dir)
    the_error(data, "MicroLens_1M_x1/test.parquet", None, f"has {single['test']:,} rows; a submission needs "
              f"{single['test'] + 1:,}", expect_test_rows=single["test"] + 1)
    bad = parts["valid"][1]  # a value out of range in the second part: the problem names that part
    rewrite(bad, set_cell("likes_level", 2, 12))
    the_error(data, str(bad.relative_to(data)), "likes_level", "1 value not levels in 0..9", "first 12 at row 2")
    with pytest.raises(DataError, match=r"valid.parquet/part-00001.parquet: column likes_level: values span 0\.\.12, "):
        check_splits(data, ("valid",))
    for part in parts["train"]:  # a folder without parts: one line, from validate and from a stage
        part.unlink()
    the_error(data, TRAIN, None, "a folder without part files (*.parquet)")
    with pytest.raises(DataError, match=r"train.parquet: a folder without part files"):
        check_splits(data, ("train",))
    rewrite(parts["test"][0], lambda t: t.slice(0, 0))
    rewrite(parts["test"][1], lambda t: t.slice(0, 0))
    with pytest.raises(DataError, match=r"test.parquet: empty split: 0 rows in its 3 part files"):
        check_splits(data, ("test",))


def test_the_real_items_without_synth_json_need_the_real_test_rows(data, monkeypatch):
    """A data set of MicroLens_1M_x1's item count that synth did not write is held to the challenge's test split:
    a submission of fewer rows would be refused by the leaderboard."""
    import mmctr_ray.validate as validate_module

    monkeypatch.setattr(validate_module, "REAL_NUM_ITEMS", n_items(data))
    Layout(data).synth_manifest.unlink()
    rows = pq.ParquetFile(Layout(data).split("test")).metadata.num_rows
    the_error(data, "MicroLens_1M_x1/test.parquet", None, f"has {rows:,} rows; a submission needs 379,142 (for a "
              f"MicroLens_1M_x1 submission)")


def _rewritten(synth_dir, tmp_path, split, column, row, value, **write):
    from mmctr_ray.schema import Layout

    data = tmp_path / "d"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("item_images"))
    path = Layout(data).split(split)
    table = pq.read_table(path)
    values = table.column(column).to_numpy().copy()
    values[row] = value
    i = table.schema.get_field_index(column)
    pq.write_table(table.set_column(i, column, pa.array(values, table.schema.field(i).type)), path, **write)
    return data, path


def test_the_checks_before_ray_refuse_the_padding_item_as_a_target_and_read_every_row_group(synth_dir, tmp_path):
    """train's and predict's checks from the footers: a mutation that let item id 0 (the all-zero padding item) be a
    target passed, and so did one that read the last row group's minimum only (a negative user id in the first of
    several row groups went through)."""
    from mmctr_ray.errors import DataError
    from mmctr_ray.preflight import check_split

    data, _ = _rewritten(synth_dir, tmp_path / "zero", "valid", "item_id", 0, 0)
    with pytest.raises(DataError, match=r"item_id: values span 0\.\."):
        check_split(data, "valid")
    data, path = _rewritten(synth_dir, tmp_path / "groups", "train", "user_id", 0, -3, row_group_size=500)
    assert pq.ParquetFile(path).metadata.num_row_groups > 1
    with pytest.raises(DataError, match=r"user_id: values span -3\.\."):
        check_split(data, "train")


def test_a_batch_is_checked_against_the_rows_every_worker_gets():
    """Each of 2 workers steps on batch // 2 rows of its half of the split: batch 400 on 300 rows gives each 150 rows
    and no step (a mutation that left the workers out passed, and the run validated an untrained model)."""
    from mmctr_ray.errors import ConfigError
    from mmctr_ray.preflight import check_batch_size

    check_batch_size(100, 100, 2)  # 2 x 50: one step
    with pytest.raises(ConfigError, match="exceeds the 300 rows"):
        check_batch_size(400, 300, 2)


def test_a_column_name_stored_twice_is_one_error_in_validate_and_before_ray(data):
    """A parquet file holding a column name twice was a KeyError traceback in validate, the checks before Ray
    and fuse."""
    from mmctr_ray.errors import DataError
    from mmctr_ray.fuse import ItemSource
    from mmctr_ray.preflight import check_split

    rewrite(data / TRAIN, lambda t: t.append_column("label", t.column("label")))
    rewrite(data / FEATURE, lambda t: t.append_column("txt_emb_BERT", t.column("txt_emb_BERT")))
    the_error(data, TRAIN, "label", "2 columns of that name, expected one")
    the_error(data, FEATURE, "txt_emb_BERT", "2 columns of that name, expected one")
    with pytest.raises(DataError, match=r"train.parquet: column label: 2 columns of that name, expected one$"):
        check_split(data, "train")
    with pytest.raises(DataError, match=r"item_feature.parquet: column txt_emb_BERT: 2 columns of that name"):
        ItemSource(data, "shipped", "v4")


def test_float64_vectors_beyond_float32_are_refused_and_float16_ones_read(data):
    """1e300 in a float64 column: validate said OK and the stages' float32 cast made it inf (fuse's `given` table
    kept it); float16 vectors validated, then every stage failed comparing the footer's raw-bytes statistics."""
    from mmctr_ray.errors import DataError
    from mmctr_ray.features import load_item_table
    from mmctr_ray.preflight import num_items

    as64 = lambda t: replace(t, "item_emb_d128", t["item_emb_d128"].to_pylist(), pa.list_(pa.float64()))  # noqa: E731
    rewrite(data / INFO, lambda t: set_elem("item_emb_d128", 4, 9, 1e300)(as64(t)))
    the_error(data, INFO, "item_emb_d128", "1 value not within float32's range", "first 1e+300 at row 4")
    with pytest.raises(DataError, match=r"item_emb_d128: values span .*\.\.1e\+300, expected vectors of numbers "
                                        r"within float32's range"):
        num_items(data)
    rewrite(data / INFO, set_elem("item_emb_d128", 4, 9, 0.5))
    rewrite(data / INFO, lambda t: replace(t, "item_emb_d128", t["item_emb_d128"].to_pylist(),
                                           pa.list_(pa.float16())))
    assert errors(data) == []
    assert num_items(data) == n_items(data)
    table = load_item_table(data, "given")
    assert table.vectors.dtype == np.float32 and table.vectors.flags.writeable and np.isfinite(table.vectors).all()


def test_damaged_json_beside_the_data_is_named_by_validate_and_the_stages(data):
    """A convert.json cut short was a JSONDecodeError traceback in fuse, features and train while validate said OK;
    a synth.json cut short skipped the test split's row count without a word."""
    from mmctr_ray.errors import DataError
    from mmctr_ray.features import has_placeholder_embeddings

    (data / "convert.json").write_text('{"placeholder_embeddings": tru')
    the_error(data, "convert.json", None, "not valid JSON (Expecting value", "expected the convert.json `mmctr "
                                                                             "convert` writes")
    with pytest.raises(DataError, match=r"convert.json: not valid JSON \(.*\); expected the convert.json"):
        has_placeholder_embeddings(data)
    (data / "convert.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"convert.json: holds a JSON list; expected the convert.json `mmctr "
                                        r"convert` writes, a JSON object$"):
        has_placeholder_embeddings(data)
    (data / "convert.json").unlink()
    Layout(data).synth_manifest.write_text('{"spec": ')
    assert [str(p) for p in validate(data)] == [
        "warning: synth.json: unreadable (expected the synth.json `mmctr synth` writes, with spec.test_rows): the "
        "test split's row count is not checked"]


def test_a_file_or_a_folder_where_the_other_is_expected_is_said_as_such(data):
    assert [str(p) for p in validate(data / "synth.json")] == [
        f"error: {data / 'synth.json'}: a file; expected the data directory"]
    path = data / INFO
    table = pq.read_table(path)
    path.unlink()
    path.mkdir()
    pq.write_table(table, path / "part-0.parquet")
    the_error(data, INFO, None, "a folder; expected one parquet file (only the splits may be folders of parts)")


def test_a_folder_among_a_splits_parts_is_refused_not_skipped(data, split_into_parts):
    """valid.parquet/part-1.parquet/x.parquet: its rows were left out of every stage, and validate said OK."""
    from mmctr_ray.errors import DataError
    from mmctr_ray.preflight import check_split

    split_into_parts(data, "valid", 2)
    part = sorted((data / VALID).iterdir())[-1]
    part.rename(data / "x.parquet")
    part.mkdir()
    (data / "x.parquet").rename(part / "x.parquet")
    with pytest.raises(DataError, match=rf"^{part}: a folder among the split's part files; expected \*\.parquet files "
                                        r"only \(its rows would not be read\)"):
        check_split(data, "valid")
    assert [str(p) for p in validate(data) if p.is_error] == [  # one problem among the others: exit 1, as documented
        f"error: {part.relative_to(data)}: a folder among the split's part files; expected *.parquet files only (its "
        f"rows would not be read): put its files in valid.parquet itself"]
    # a partition folder (`sub/part-1.parquet`, Spark's partitionBy) and a part that is not .parquet were skipped
    # without a word: half the validation split went missing, and validate said OK (helper-131, F1)
    hive = data / VALID / "day=1"
    part.rename(hive)
    with pytest.raises(DataError, match=rf"^{re.escape(str(hive))}: a folder among the split's part files"):
        check_split(data, "valid")
    (hive / "x.parquet").rename(data / VALID / "part-9.txt")
    hive.rmdir()
    (data / VALID / "_SUCCESS").write_text("")  # a writer's marker: skipped, as pyarrow's datasets skip it
    (data / VALID / ".part-0.parquet.crc").write_text("")
    with pytest.raises(DataError, match=rf"^{re.escape(str(data / VALID / 'part-9.txt'))}: not named \*\.parquet, "
                                        r"among the split's part files \(its rows would not be read\): rename it to "
                                        r"\*\.parquet if it holds rows of the split, else move it out of the folder"):
        check_split(data, "valid")
    assert any("part-9.txt: not named *.parquet" in str(p) for p in validate(data))
    (data / VALID / "part-9.txt").rename(data / VALID / "part-9.parquet")
    check_split(data, "valid")


def test_a_null_history_is_said_as_a_null_before_the_width_check(synth_dir, tmp_path):
    """A null item_seq counts as one value in the footer: the width check ran first and said "39,901 ids in 400
    rows", which sent the user looking for a short history."""
    from mmctr_ray.errors import DataError
    from mmctr_ray.preflight import check_split

    data = shutil.copytree(synth_dir, tmp_path / "d", ignore=shutil.ignore_patterns("item_images"))
    rewrite(Layout(data).split("test"), set_cell("item_seq", 7, None))
    with pytest.raises(DataError, match=r"test.parquet: column item_seq: 1 null values, expected item ids in 0\.\."):
        check_split(data, "test")

def test_integer_labels_are_read_as_their_floats(data):
    """The README: labels may be stored as integers 0/1, as a pandas or Spark export writes them."""
    rewrite(data / TRAIN, lambda t: replace(t, "label", t["label"].cast(pa.int64()), pa.int64()))
    assert validate(data) == []
    rewrite(data / TRAIN, set_cell("label", 11, 2))
    the_error(data, TRAIN, "label", "1 value not 0 or 1", "first 2 at row 11")


def test_the_row_of_an_offender_counts_the_batches_before_it(data, monkeypatch):
    """validate streams a file in batches (~40k rows of a real split): the row it names is the file's, not the
    batch's."""
    import mmctr_ray.validate as validate_module

    monkeypatch.setattr(validate_module, "BATCH_BYTES", 1)  # the smallest batches: 256 rows, row 1234 in the fifth
    rewrite(data / TRAIN, set_cell("likes_level", 1234, 11))
    the_error(data, TRAIN, "likes_level", "1 value not levels in 0..9", "first 11 at row 1234")


def test_user_id_zero_is_a_valid_id(data):
    rewrite(data / VALID, set_cell("user_id", 7, 0))
    assert errors(data) == []


def test_an_item_seq_id_one_past_the_items_is_refused(data):
    n = n_items(data)
    rewrite(data / TRAIN, set_elem("item_seq", 1234, -1, n + 1))
    the_error(data, TRAIN, "item_seq", f"1 value not item ids in 0..{n} (0 = padding)", f"first {n + 1} at row 1234")


def test_a_history_with_a_null_is_said_as_a_null_only(data):
    """A null read as a number (-9223372036854775808) then padding: one error, the null's, with no id that is not
    in the file."""
    rewrite(data / VALID, set_cell("item_seq", 4, [None] + [0] * 98 + [5]))
    assert [str(p) for p in errors(data) if p.column == "item_seq"] == [
        f"error: {VALID}: column item_seq: 1 value not non-null (null found); first None at row 4"]


def test_item_feature_level_minus_one_is_refused(data):
    rewrite(data / FEATURE, set_cell("views_level", 8, -1))
    the_error(data, FEATURE, "views_level", "1 value not levels in 0..9", "first -1 at row 8")


@pytest.mark.parametrize("file", [INFO, FEATURE])
def test_a_negative_tag_id_is_refused(data, file):
    rewrite(data / file, set_elem("item_tags", 9, 0, -1))
    the_error(data, file, "item_tags", "1 value not non-negative tag ids", "first -1 at row 9")


def test_a_split_folder_of_empty_parts_is_an_empty_split(data, split_into_parts):
    """What the stages' check says (test_a_split_held_as_a_folder_of_parts_...), validate says too."""
    for part in split_into_parts(data, "train", 3):
        rewrite(part, lambda t: t.slice(0, 0))
    the_error(data, TRAIN, None, "empty split: 0 rows in its 3 part files")


def test_other_item_counts_without_synth_json_are_not_held_to_the_real_test_rows(data, monkeypatch):
    import mmctr_ray.validate as validate_module

    Layout(data).synth_manifest.unlink()
    for real in (n_items(data) - 1, n_items(data) + 1):  # more items than MicroLens_1M_x1 (a larger split), and fewer
        monkeypatch.setattr(validate_module, "REAL_NUM_ITEMS", real)
        assert errors(data) == []


def test_the_last_items_cover_is_checked(data):
    n = n_items(data)
    Layout(data).image(n).unlink()
    assert [str(p) for p in validate(data)] == [
        f"warning: item_images: 1 of {n:,} items have no cover (the first: {n}.jpg); embed flags them missing, up to "
        f"--max-bad-covers (10% by default)"]


def test_a_damaged_convert_json_is_said_once_of_the_file(data):
    (data / "convert.json").write_text('{"placeholder_embeddings": tru')
    said = str(the_error(data, "convert.json", None))
    assert said.startswith("error: convert.json: not valid JSON (Expecting value"), said  # the path named once


def test_a_damaged_synth_json_is_no_warning_where_the_test_rows_are_requested(data):
    """--expect-test-rows checks the count synth.json would have given: nothing is left unchecked."""
    rows = pq.ParquetFile(Layout(data).split("test")).metadata.num_rows
    Layout(data).synth_manifest.write_text('{"spec": ')
    assert validate(data, expect_test_rows=rows) == []


def test_item_feature_id_zero_is_outside_the_items(data):
    n = n_items(data)
    assert pq.read_table(data / FEATURE)["item_id"][0].as_py() == 1
    rewrite(data / FEATURE, set_cell("item_id", 0, 0))  # item 1 renamed 0, the padding id
    assert [str(p) for p in errors(data) if p.file == FEATURE] == [
        f"error: {FEATURE}: column item_id: 1 item ids outside 1..{n} (item_info rows); first 0",
        f"error: {FEATURE}: column item_id: 1 of item_info's items 1..{n} have no row; first 1"]


def test_large_string_and_large_list_columns_validate(data):
    """polars (and pyarrow's large types) write strings and lists as large_string / large_list: the stages read them."""
    rewrite(data / FEATURE, lambda t: replace(t, "item_title", t["item_title"].cast(pa.large_string()),
                                              pa.large_string()))
    rewrite(data / VALID, lambda t: replace(t, "item_seq", t["item_seq"].cast(pa.large_list(pa.int64())),
                                            pa.large_list(pa.int64())))
    assert validate(data) == []


def test_parts_numbered_without_padding_are_listed_in_number_order(data, split_into_parts):
    """pyarrow and Dask write part-2 ... part-10 unpadded: part-10 follows part-9, not part-1 (the row order)."""
    parts = split_into_parts(data, "valid", 12, padded=False)
    assert [p.name for p in Layout(data).split_files("valid")] == [f"part-{i}.parquet" for i in range(12)] == \
        [p.name for p in parts]
    assert validate(data) == []


def test_a_part_named_in_capitals_is_refused(data, split_into_parts):
    """The README: part-3.PARQUET is refused by name, as part-3.txt is."""
    parts = split_into_parts(data, "valid", 2)
    parts[-1].rename(parts[-1].with_suffix(".PARQUET"))
    said = [str(p) for p in errors(data)]
    assert len(said) == 1 and said[0].startswith(f"error: {VALID}/part-00001.PARQUET: not named *.parquet"), said


def test_an_empty_dataset_folder_given_as_the_data_is_said_as_such(tmp_path):
    inner = tmp_path / "MicroLens_1M_x1"
    inner.mkdir()
    assert [str(p) for p in validate(inner)] == [
        f"error: {inner}: looks like the MicroLens_1M_x1 folder itself: --data is the folder above it, here {tmp_path}"]


def test_a_null_is_said_once_by_the_null_check_without_a_nan_the_file_does_not_hold(data):
    """A null label, a null inside a vector, a null item id of item_info and a null padding row: each was said twice,
    the second time as a NaN ("not 0 or 1; first nan", "not finite floats", "row 0 must be the all-zero padding
    item; found nan") the file does not hold."""
    def null_in(name, row, pos=None):
        def change(t):
            values = t[name].to_pylist()
            if pos is None:
                values[row] = None
            else:
                values[row][pos] = None
            return replace(t, name, pa.array(values, t.schema.field(name).type))
        return change

    rewrite(data / TRAIN, null_in("label", 13))
    rewrite(data / INFO, null_in("item_emb_d128", 6, 17))
    rewrite(data / INFO, null_in("item_tags", 0))
    rewrite(data / INFO, null_in("item_id", 9))
    assert sorted(str(p) for p in errors(data)) == sorted([
        f"error: {TRAIN}: column label: 1 value not non-null (null found); first None at row 13",
        f"error: {INFO}: column item_emb_d128: 1 value not non-null (null found); first None at row 6",
        f"error: {INFO}: column item_tags: 1 value not non-null (null found); first None at row 0",
        f"error: {INFO}: column item_id: 1 value not non-null (null found); first None at row 9"])


def test_a_damaged_convert_json_under_a_path_with_a_colon_is_said_whole(synth_dir, tmp_path):
    """The message was cut at the first ': ' of the path ("convert.json: y/D/convert.json: not valid JSON")."""
    data = shutil.copytree(synth_dir, tmp_path / "x: y" / "D", ignore=shutil.ignore_patterns("item_images"))
    (data / "convert.json").write_text('{"placeholder_embeddings": tru')
    said = [str(p) for p in validate(data) if p.file == "convert.json"]
    assert len(said) == 1 and said[0].startswith("error: convert.json: not valid JSON (Expecting value"), said
