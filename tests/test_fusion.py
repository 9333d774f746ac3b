"""`mmctr fuse`: the strategies against scikit-learn, the written files, reproducibility and bad input."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.decomposition import PCA

from mmctr_ray.cli import main
from mmctr_ray.config import FusionConfig
from mmctr_ray.data.writer import list_array
from mmctr_ray.errors import ConfigError, DataError, OutputExistsError
from mmctr_ray.features import list_matrix, load_item_table
from mmctr_ray.fuse import ItemSource, load_fitted, run_fuse, sidecars
from mmctr_ray.fusion import ModalityBatch, fit_fusion
from mmctr_ray.schema import Layout

CFG = {"v1": FusionConfig("v1", dims=12), "v2": FusionConfig("v2", dims=12), "v3": FusionConfig("v3", dims=12),
       "v4": FusionConfig("v4", text_dim=10, image_dim=6)}


def shipped(synth_dir):
    t = pq.read_table(Layout(synth_dir).item_feature)
    return (t.column("item_id").to_numpy(), list_matrix(t.column("txt_emb_BERT"), "t").astype(np.float32),
            list_matrix(t.column("img_emb_CLIPRN50"), "i").astype(np.float32))


def fused(path):
    t = pq.read_table(path)
    return t.column("item_id").to_numpy(), list_matrix(t.column("item_emb"), "f")


def exact_pca(k, x):
    """scikit-learn's PCA by a float64 SVD: the exact fit (its default picks a randomized SVD for wide inputs, which
    was off by up to 0.4 on v3's 1,792 columns of 100 items)."""
    return PCA(k, svd_solver="full").fit_transform(x.astype(np.float64))


def sklearn_reference(strategy, text, image):
    if strategy == "v1":
        return exact_pca(12, text)
    if strategy == "v2":
        return exact_pca(12, image)
    if strategy == "v3":
        return exact_pca(12, np.concatenate([text, image], axis=1))
    return np.concatenate([exact_pca(10, text), exact_pca(6, image)], axis=1)


@pytest.mark.parametrize("strategy", ["v1", "v2", "v3", "v4"])
def test_strategies_equal_scikit_learn_and_write_the_documented_files(synth_dir, tmp_path, strategy):
    out = tmp_path / "item_emb.parquet"
    summary = run_fuse(synth_dir, out, CFG[strategy], pca="full", progress=lambda m: None)
    ids, text, image = shipped(synth_dir)
    got_ids, table = fused(out)
    np.testing.assert_array_equal(got_ids, np.arange(len(ids) + 1))
    assert (table[0] == 0).all(), "row 0 is the padding item"
    np.testing.assert_allclose(table[ids], sklearn_reference(strategy, text, image), atol=2e-4)
    files = sidecars(out)
    assert files["pca"].is_file() and json.loads(files["summary"].read_text()) == summary
    assert summary["dim"] == table.shape[1] == (16 if strategy == "v4" else 12)
    assert summary["pca"] == "full" == summary["pca_fit"] == load_fitted(out).method  # the fit made, recorded
    with np.load(files["pca"], allow_pickle=False) as z:  # plain arrays only: loads without pickle
        assert {"strategy", "parts", "method"} <= set(z.files)
        assert all(f"{p}.components" in z.files for p in z["parts"])


def test_transforming_the_same_items_again_reproduces_the_table(synth_dir, tmp_path):
    out = tmp_path / "v4.parquet"
    run_fuse(synth_dir, out, CFG["v4"], progress=lambda m: None)
    fitted = load_fitted(out)
    again = np.concatenate([fitted.transform(b)
                            for b in ItemSource(synth_dir, "shipped", "v4", batch_rows=37).batches()])
    np.testing.assert_allclose(again, fused(out)[1][1:], atol=1e-5)


def test_a_fused_table_records_its_items_and_vectors_and_serves_a_copy_of_its_data(synth_dir, tmp_path):
    """``.fusion.json`` names the items it was fused from (a hash of item_info's tags and vectors) and its own
    vectors: other data is refused (tests/reliability), a copy of the same data in another folder is not."""
    import shutil

    out = tmp_path / "v1.parquet"
    summary = run_fuse(synth_dir, out, CFG["v1"], progress=lambda m: None)
    assert len(summary["items"]) == len(summary["table"]) == 16
    copy = tmp_path / "copy"
    shutil.copytree(synth_dir, copy)
    table = load_item_table(copy, str(out))
    assert table.source["fusion"]["items"] == summary["items"] and table.source["fusion"]["data"] != str(copy)
    again = run_fuse(copy, tmp_path / "again.parquet", CFG["v1"], progress=lambda m: None)
    assert (again["items"], again["table"]) == (summary["items"], summary["table"])  # one fit, one table
    other = run_fuse(synth_dir, tmp_path / "v3.parquet", CFG["v3"], progress=lambda m: None)
    assert other["items"] == summary["items"] and other["table"] != summary["table"]


def test_incremental_pca_streams_chunks_and_matches_full_pca(synth_dir):
    ids, text, _ = shipped(synth_dir)

    def batches(rows=30):
        for s in range(0, len(ids), rows):
            yield ModalityBatch(ids[s:s + rows], text[s:s + rows], None, np.zeros(len(ids[s:s + rows]), bool))

    cfg = FusionConfig("v1", dims=8)
    full = fit_fusion(cfg, batches, len(ids), pca="full")
    inc = fit_fusion(cfg, batches, len(ids), pca="incremental", chunk_rows=64)
    assert (full.method, inc.method, fit_fusion(cfg, batches, len(ids)).method) == ("full", "incremental", "full")
    assert full.select(FusionConfig("v1", dims=4))[0].method == "full"  # a slice of an exact fit is exact
    # the same variance is captured, and the subspaces agree (cosines of principal angles near 1)
    assert inc.parts[0].explained_variance_ratio.sum() == pytest.approx(
        full.parts[0].explained_variance_ratio.sum(), rel=0.03)
    cosines = np.linalg.svd(inc.parts[0].components @ full.parts[0].components.T, compute_uv=False)
    assert cosines.min() > 0.8


@pytest.mark.parametrize("pca", ["full", "incremental"])
def test_vectors_without_variance_or_a_single_item_are_one_line_errors(pca):
    """Every item's text vector the same (every title empty, say): the fit gave every item a zero vector without a
    word (NaN explained-variance ratios; an incremental fit over several chunks, variance at rounding level and
    ratios of 1e21). One item: numpy's LinAlgError (full) or NaN ratios (incremental)."""
    n = 100
    rng = np.random.default_rng(0)
    same = np.tile(rng.standard_normal(16).astype(np.float32) * 3 + 1, (n, 1))
    image = rng.standard_normal((n, 8)).astype(np.float32)

    def batches(text, image, n=n, rows=10):
        return lambda: (ModalityBatch(np.arange(s + 1, min(s + rows, n) + 1), text[s:s + rows][:n - s],
                                      image[s:s + rows][:n - s], np.zeros(min(rows, n - s), dtype=bool))
                        for s in range(0, n, rows))

    kw = {"pca": pca, "chunk_rows": 16}  # incremental: several partial fits
    with pytest.raises(DataError, match=r"^emb.parquet: every item's text vector is the same \(no variance\), so the "
                                        r"text PCA would give every item a zero vector; expected vectors that differ"):
        fit_fusion(FusionConfig("v4", text_dim=4, image_dim=4), batches(same, image), n, where="emb.parquet", **kw)
    fitted = fit_fusion(FusionConfig("v3", dims=4), batches(same, image), n, **kw)  # text ‖ image still varies
    assert np.isfinite(fitted.parts[0].explained_variance_ratio).all()
    with pytest.raises(DataError, match=r"^emb.parquet: vectors of 1 item; a PCA needs at least 2$"):
        fit_fusion(FusionConfig("v1", dims=1), batches(image, image, 1), 1, where="emb.parquet", **kw)


def test_given_copies_item_emb_d128(synth_dir, tmp_path):
    out = tmp_path / "given.parquet"
    run_fuse(synth_dir, out, FusionConfig("given"), progress=lambda m: None)
    np.testing.assert_array_equal(fused(out)[1], load_item_table(synth_dir).vectors)
    assert not sidecars(out)["pca"].exists()


def embed_like_source(synth_dir, path, missing_rows=(0, 5)):
    ids, text, image = shipped(synth_dir)
    flags = np.zeros(len(ids), dtype=bool)
    flags[list(missing_rows)] = True
    image = image.copy()
    image[flags] = 0.0
    pq.write_table(pa.table({"item_id": pa.array(ids), "txt_emb": list_array(text, pa.float32()),
                             "img_emb": list_array(image, pa.float32()), "image_missing": pa.array(flags)}), path)
    return ids, image, flags


def test_items_without_a_cover_get_the_mean_image_vector(synth_dir, tmp_path):
    src = tmp_path / "raw.parquet"
    ids, image, flags = embed_like_source(synth_dir, src)
    out = tmp_path / "v2.parquet"
    summary = run_fuse(synth_dir, out, CFG["v2"], source=str(src), progress=lambda m: None)
    assert summary["image_missing"] == 2
    fitted = load_fitted(out)
    np.testing.assert_allclose(fitted.image_fill, image[~flags].mean(axis=0), atol=1e-5)
    table = fused(out)[1]
    # the mean vector sits at the origin of the image PCA space: "no image information"
    np.testing.assert_allclose(table[ids[flags]], 0.0, atol=1e-4)


def test_fuse_refuses_an_embed_output_of_other_items(synth_dir, tmp_path):
    """`mmctr embed` of one data set fused into another of as many items (another seed, or the data written again
    since) passed every id check and trained on vectors of other items."""
    from mmctr_ray.features import titles_fingerprint

    src = tmp_path / "raw.parquet"
    embed_like_source(synth_dir, src)
    items = pq.read_table(Layout(synth_dir).item_feature, columns=["item_id", "item_title"])
    sidecar = tmp_path / "raw.embed.json"
    sidecar.write_text(json.dumps({"titles": titles_fingerprint(items)}))  # as embed records it
    run_fuse(synth_dir, tmp_path / "ok.parquet", CFG["v2"], source=str(src), progress=lambda m: None)
    assert titles_fingerprint(items.take(np.arange(items.num_rows)[::-1])) == titles_fingerprint(items)  # id order
    titles = ["x" + str(t) for t in items.column("item_title").to_pylist()]
    renamed = items.set_column(1, "item_title", pa.array(titles))
    sidecar.write_text(json.dumps({"titles": titles_fingerprint(renamed)}))  # another data set's items
    with pytest.raises(DataError, match=rf"^{re.escape(str(src))}: embedded from other items than "
                                        rf"{re.escape(str(Layout(synth_dir).item_feature))} holds now"):
        run_fuse(synth_dir, tmp_path / "bad.parquet", CFG["v2"], source=str(src), progress=lambda m: None)
    assert not (tmp_path / "bad.parquet").exists()
    sidecar.write_text("{}")  # an embed from before it recorded them: nothing to compare
    run_fuse(synth_dir, tmp_path / "old.parquet", CFG["v2"], source=str(src), progress=lambda m: None)


def test_fusing_image_vectors_of_random_weights_is_said(synth_dir, tmp_path, caplog):
    """`mmctr embed` without --image-model ARCH:WEIGHTS (its default) encodes covers with a randomly initialised
    tower; fuse fitted v2/v3/v4 on those vectors without a word."""
    src = tmp_path / "raw.parquet"
    embed_like_source(synth_dir, src)
    sidecar = tmp_path / "raw.embed.json"
    for model, warned in (("RN50", True), (f"RN50:{tmp_path / 'rn50.pt'}", False)):
        sidecar.write_text(json.dumps({"image_model": model}))
        for strategy in ("v1", "v2"):
            caplog.clear()
            with caplog.at_level("WARNING"):
                run_fuse(synth_dir, tmp_path / f"{strategy}.parquet", CFG[strategy], source=str(src),
                         progress=lambda m: None, overwrite=True)
            said = [r.getMessage() for r in caplog.records if "random weights" in r.getMessage()]
            assert said == ([f"{src}: its image vectors come from RN50 with random weights (`mmctr embed` was given "
                             f"no --image-model RN50:WEIGHTS), so v2 fits their PCA on vectors that carry no image "
                             f"content"] if warned and strategy == "v2" else []), (model, strategy)


def test_training_reads_the_fused_table_and_records_its_fusion(synth_dir, tmp_path):
    out = tmp_path / "v4.parquet"
    run_fuse(synth_dir, out, CFG["v4"], progress=lambda m: None)
    table = load_item_table(synth_dir, str(out))
    assert table.vector_dim == 16 and table.source["fusion"]["strategy"] == "v4"
    # `--fusion TABLE` as a config: the path whole, whatever YAML would make of it (` #` a comment, `: ` a mapping)
    from mmctr_ray.config import load_config
    from mmctr_ray.fuse import fusion_overrides

    odd = tmp_path / "exp #3" / "a: b 😀" / "v4.parquet"
    odd.parent.mkdir(parents=True)
    for name in ("v4.parquet", "v4.fusion.json"):
        shutil.copy(out.with_name(name), odd.with_name(name))
    cfg = load_config(None, fusion_overrides(odd))
    assert cfg.data.item_vector == str(odd.resolve()) and cfg.fusion.strategy == "v4"


def test_a_table_fused_from_other_data_is_named_as_such(synth_dir, tmp_path):
    """Fused from more items than the data has: the read failed first, on an item id out of range."""
    out = tmp_path / "v1.parquet"
    run_fuse(synth_dir, out, CFG["v1"], progress=lambda m: None)
    data = tmp_path / "fewer"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("item_images"))
    info = pq.read_table(Layout(data).item_info)
    pq.write_table(info.slice(0, info.num_rows - 5), Layout(data).item_info)
    items = info.num_rows - 1
    with pytest.raises(DataError) as err:
        load_item_table(data, str(out))
    assert str(err.value) == (f"{out}: fused from the items of {synth_dir} ({items:,} items), not those of {data} "
                              f"({items - 5:,} items): fuse again with --data {data}")


def corrupt_feature(synth_dir, tmp_path, edit):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("item_images"))
    lay = Layout(data)
    t = pq.read_table(lay.item_feature)
    pq.write_table(edit(t), lay.item_feature)
    return data


def _set(t, name, values):
    return t.set_column(t.schema.get_field_index(name), name, values)


def test_bad_sources_are_one_line_errors(synth_dir, tmp_path):
    def nan_vector(t):
        text = list_matrix(t.column("txt_emb_BERT"), "t").astype(np.float32)
        text[3, 7] = np.nan
        return _set(t, "txt_emb_BERT", list_array(text, pa.float32()))

    cases = [
        (lambda t: t.drop_columns(["img_emb_CLIPRN50"]), "missing column img_emb_CLIPRN50"),
        (nan_vector, "column txt_emb_BERT: NaN/inf in the vector of item 4 (row 3)"),
        (lambda t: _set(t, "item_id", pa.array(np.r_[1, 1, t.column("item_id").to_numpy()[2:]])),
         "column item_id: duplicate item id 1 at row 1"),
        (lambda t: _set(t, "item_id", pa.array(np.r_[t.column("item_id").to_numpy()[:-1], 10_000])),
         "column item_id: value 10000 at row 199 outside 1..200"),
        (lambda t: _set(t, "item_id", pa.array([None if i == 5 else v for i, v in
                                                 enumerate(t.column("item_id").to_pylist())], pa.int64())),
         "column item_id: null at row 5; expected item ids 1..200"),  # before: a pyarrow traceback
        (lambda t: _set(t, "item_id", t.column("item_id").cast(pa.float64())),
         "column item_id: type double; expected integer item ids 1..N"),  # before: 1.5 read as item 1
    ]
    for i, (edit, expected) in enumerate(cases):
        data = corrupt_feature(synth_dir, tmp_path / str(i), edit)
        with pytest.raises(DataError) as err:
            run_fuse(data, tmp_path / f"out{i}.parquet", CFG["v4"], progress=lambda m: None)
        assert expected in str(err.value) and "\n" not in str(err.value)
        assert str(Layout(data).item_feature) in str(err.value)
        assert not (tmp_path / f"out{i}.parquet").exists(), "no output after a failed fuse"


def test_a_source_of_some_items_only_is_said_to_be(synth_dir, tmp_path, caplog):
    """Fewer rows than items: the PCA is fitted on those and the rest get zero vectors; only the summary said so."""
    src = tmp_path / "raw.parquet"
    embed_like_source(synth_dir, src)
    pq.write_table(pq.read_table(src).slice(0, 190), src)
    with caplog.at_level("WARNING", logger="mmctr_ray.fuse"):
        summary = run_fuse(synth_dir, tmp_path / "v2.parquet", CFG["v2"], source=str(src), progress=lambda m: None)
    assert f"{src}: vectors of 190 of the 200 items of item_info: the PCA is fitted on those" in caplog.text
    assert summary["items_without_vectors"] == 10 and (fused(tmp_path / "v2.parquet")[1][191:] == 0).all()
    # fewer than half: 40 vectors of another data set's items for 1,500 items passed, 97% of them zeros (its
    # .embed.json, which says whose items it holds, left behind; helper-131 F2): refused, nothing written
    pq.write_table(pq.read_table(src).slice(0, 99), src)
    with pytest.raises(DataError, match=rf"^{re.escape(str(src))}: vectors of 99 of the 200 items of item_info, so "
                                        r"101 would get zero vectors; expected vectors of at least half the items"):
        run_fuse(synth_dir, tmp_path / "few.parquet", CFG["v2"], source=str(src), progress=lambda m: None)
    assert not list(tmp_path.glob("few*"))
    from mmctr_ray.tuning import check_inputs  # a search whose trials fuse from it: refused before Ray (each
    # trial that fused failed after Ray had started)

    yaml_path = tmp_path / "s.yaml"
    yaml_path.write_text(Path("configs/search_tiny.yaml").read_text())
    with pytest.raises(DataError, match=r"vectors of 99 of the 200 items of item_info"):
        check_inputs(synth_dir, yaml_path, source=str(src))
    embed_like_source(synth_dir, src)
    pq.write_table(pq.read_table(src).slice(0, 100), src)  # half: fitted, with the warning
    assert run_fuse(synth_dir, tmp_path / "half.parquet", CFG["v2"], source=str(src),
                    progress=lambda m: None)["items_without_vectors"] == 100


def test_a_short_vector_is_named_by_its_row_in_the_file(synth_dir, tmp_path):
    """The row was counted within the batch being read (16,384 rows): file row 20,000 was called row 3,616."""
    def short_vector(t):
        text = t.column("txt_emb_BERT").to_pylist()
        text[150] = text[150][:-1]
        return _set(t, "txt_emb_BERT", pa.array(text, t.schema.field("txt_emb_BERT").type))

    data = corrupt_feature(synth_dir, tmp_path, short_vector)
    with pytest.raises(DataError, match=r"column txt_emb_BERT: lists of one length expected; row 150 has 767, row 148 "
                                        r"has 768"):
        list(ItemSource(data, "shipped", "v4", batch_rows=37).batches())  # row 150 is the 3rd of the 5th batch


def test_the_width_checks_before_a_fit_read_the_sources_first_rows_only(synth_dir, monkeypatch):
    """pipeline's and tune's checks and the search cache's exact-fit choice need two widths: they read 64 rows, not
    a fit's 16,384-row batch (up to ~100 MB of lists for the shipped 768 + 1024 vectors)."""
    from mmctr_ray import pca_cache
    from mmctr_ray.fuse import check_widths

    sizes = []
    iter_batches = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, batch_size=65536, **kw: sizes.append(batch_size) or iter_batches(self, batch_size,
                                                                                                       **kw))
    assert ItemSource(synth_dir, "shipped", "v4").input_widths() == {"text": 768, "image": 1024}
    assert ItemSource(synth_dir, "shipped", "v1").input_widths() == {"text": 768, "image": 0}
    check_widths(synth_dir, CFG["v4"])
    assert pca_cache._full_widths(synth_dir, "v4", "shipped") == {"text_dim": 199, "image_dim": 199}
    assert sizes == [64] * 4


def test_widths_beyond_the_data_and_existing_outputs_are_refused(synth_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"fusion.dims=300: expected at most min\(items − 1, input width\) = "
                                          r"min\(199"):
        run_fuse(synth_dir, tmp_path / "a.parquet", FusionConfig("v1", dims=300), progress=lambda m: None)
    with pytest.raises(ConfigError, match=r"fusion.dims=200: expected at most .* = min\(199, 768\)"):  # its last
        # column was dead (spread 1e-7): 200 centred items span 199 axes (helper-131, F10)
        run_fuse(synth_dir, tmp_path / "a.parquet", FusionConfig("v1", dims=200), progress=lambda m: None)
    out = tmp_path / "b.parquet"
    run_fuse(synth_dir, out, CFG["v1"], progress=lambda m: None)
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        run_fuse(synth_dir, out, CFG["v2"], progress=lambda m: None)
    assert out.read_bytes() == before, "a refused run leaves the earlier output alone"


def test_cli_fuse_flags(synth_dir, tmp_path, capsys):
    out = tmp_path / "v4.parquet"
    rc = main(["fuse", "--data", str(synth_dir), "--strategy", "v4", "--text-dim", "5", "--image-dim", "7",
               "--out", str(out)])
    assert rc == 0 and fused(out)[1].shape == (201, 12)
    rc = main(["fuse", "--data", str(synth_dir), "--strategy", "v4", "--dims", "5", "--out",
               str(tmp_path / "x.parquet")])
    assert rc == 2
    assert "--dims sets the width of v1, v2, v3; v4 takes --text-dim and --image-dim" in capsys.readouterr().err
    for flags in (["--dims", "32"], ["--source", str(out)], ["--pca", "full"]):  # a 128-wide copy, without a word
        rc = main(["fuse", "--data", str(synth_dir), "--strategy", "given", *flags, "--out",
                   str(tmp_path / "g.parquet")])
        assert rc == 2 and capsys.readouterr().err.strip().endswith(
            f"{flags[0]}: --strategy given copies item_info's item_emb_d128 as shipped (no PCA, 128 wide); the PCA "
            f"strategies v1..v4 take {flags[0]}")
    assert not (tmp_path / "g.parquet").exists()


def test_the_exact_fit_stays_exact_on_vectors_far_from_centred():
    """BERT's and CLIP's vectors are not centred: a float32 covariance of them cancels digits unless centred first."""
    from mmctr_ray.fusion import ModalityBatch, fit_fusion

    rng = np.random.default_rng(0)
    n = 5000
    text = (rng.standard_normal((n, 64)) * np.linspace(1, 0.01, 64) + 5).astype(np.float32)
    batch = ModalityBatch(np.arange(1, n + 1), text, None, np.zeros(n, dtype=bool))
    fitted = fit_fusion(FusionConfig("v1", dims=16), lambda: iter([batch]), n, pca="full")
    np.testing.assert_allclose(fitted.transform(batch), exact_pca(16, text), atol=1e-3)


@pytest.mark.parametrize("value,said", [(float("nan"), "NaN/inf in the vector of item 3"),
                                        (1e300, "1e+300, beyond float32's range, in the vector of item 3")])
def test_given_refuses_vectors_that_are_not_finite_float32_and_keeps_the_table_it_was_to_replace(synth_dir, tmp_path,
                                                                                               value, said):
    """--strategy given wrote NaN, and a float64 1e300 cast to inf, into a table that looked complete (exit 0), and
    --overwrite put it in place of a good one."""
    out = tmp_path / "given.parquet"
    run_fuse(synth_dir, out, FusionConfig("given"), progress=lambda m: None)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    data = shutil.copytree(synth_dir, tmp_path / "data", ignore=shutil.ignore_patterns("item_images"))
    info = Layout(data).item_info
    table = pq.read_table(info)
    vectors = list_matrix(table.column("item_emb_d128"), "t").astype(np.float64)
    vectors[3, 5] = value
    pq.write_table(_set(table, "item_emb_d128", list_array(vectors, pa.float64())), info)
    with pytest.raises(DataError, match=rf"^{info}: column item_emb_d128: {re.escape(said)}; expected finite floats$"):
        run_fuse(data, out, FusionConfig("given"), overwrite=True, progress=lambda m: None)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "data"} == before
    with pytest.raises(DataError, match=r"item_emb_d128: .*(NaN/inf|\.\.1e\+300)"):  # so does the item table (1e300:
        load_item_table(data, "given")  # its check before Ray, from the footer's statistics)


def test_a_source_whose_pages_do_not_decode_is_one_line(synth_dir, tmp_path):
    """Bytes damaged behind an intact footer: the footer opens, the read was pyarrow's OSError traceback."""
    data = shutil.copytree(synth_dir, tmp_path / "data", ignore=shutil.ignore_patterns("item_images"))
    path = Layout(data).item_feature
    raw = bytearray(path.read_bytes())
    raw[200:3000] = bytes(2800)
    path.write_bytes(bytes(raw))
    pq.ParquetFile(path)  # the footer still reads
    with pytest.raises(DataError, match=rf"^{path}: its data cannot be decoded \(.+\): a damaged file; `mmctr "
                                        r"validate` checks every file$"):
        run_fuse(data, tmp_path / "v4.parquet", CFG["v4"], progress=lambda m: None)
    assert not (tmp_path / "v4.parquet").exists()


# found untested by a hand mutation audit (helper-126): each test fails on its mutant
def test_an_item_id_repeated_in_a_later_batch_of_the_source_is_refused(synth_dir, tmp_path):
    """The duplicate check spans batches: an id met again in a later batch is refused as one within a batch is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmctr_ray.errors import DataError
    from mmctr_ray.fuse import ItemSource

    source = tmp_path / "raw.parquet"
    ids = [*range(1, 101), 1]  # half the 200 items at least: a source of fewer is refused as it opens
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()),
                             "txt_emb": [[float(i), 1.0, 2.0] for i in range(len(ids))]}), source)
    src = ItemSource(synth_dir, str(source), "v1", batch_rows=64)
    with pytest.raises(DataError, match=r"column item_id: duplicate item id 1 at row 100"):
        list(src.batches())


def test_fusing_converted_data_from_its_shipped_columns_is_refused_for_every_strategy(tmp_path):
    """`mmctr fuse` on data `mmctr convert` wrote: the shipped columns are zeros, so v1..v4 from --source shipped are
    refused as given is; an embedded source is what they fit instead."""
    from mmctr_ray.errors import ConfigError
    from mmctr_ray.fuse import _refuse_placeholders

    (tmp_path / "convert.json").write_text(json.dumps({"placeholder_embeddings": True}))
    for strategy, source in (("v1", "shipped"), ("v4", "shipped"), ("given", "raw.parquet")):
        with pytest.raises(ConfigError, match="zero placeholders"):
            _refuse_placeholders(tmp_path, strategy, source)
    _refuse_placeholders(tmp_path, "v3", "raw.parquet")


def test_a_given_table_written_over_a_fitted_one_leaves_no_pca_beside_it(tmp_path):
    """`mmctr fuse --strategy given --overwrite` over an earlier v1..v4 table: that fit's X.pca.npz, which does not
    describe the given table, goes (`mmctr predict` and the pipeline read it as the table's fit)."""
    import time

    import numpy as np

    from mmctr_ray.fuse import sidecars, write_fused

    out = tmp_path / "item_emb.parquet"
    sidecars(out)["pca"].write_bytes(b"an earlier fit")
    write_fused(out, np.zeros((3, 4), dtype=np.float32), None, {"strategy": "given"}, time.perf_counter(),
                progress=lambda msg: None)
    assert out.is_file() and sidecars(out)["summary"].is_file() and not sidecars(out)["pca"].exists()


# found untested by a hand mutation audit (helper-127): each test fails on its mutant
def test_the_given_table_zeroes_the_padding_row_whatever_item_info_holds(synth_dir, tmp_path):
    """(F3) row 0 of the table is the padding item: zeros, even where item_info's row 0 holds a vector."""
    from mmctr_ray.fuse import fuse_items

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    path = Layout(data).item_info
    info = pq.read_table(path)
    emb = info.column("item_emb_d128").to_pylist()
    emb[0] = [1.0] * len(emb[1])
    info = info.set_column(info.schema.get_field_index("item_emb_d128"), "item_emb_d128",
                           pa.array(emb, pa.list_(pa.float32())))
    pq.write_table(info, path)
    table, fitted, summary = fuse_items(data, FusionConfig("given"), progress=lambda m: None)
    assert fitted is None and not table[0].any() and table[1:].any()


def test_a_source_of_every_item_is_not_said_to_be_a_subset(synth_dir, tmp_path, caplog):
    """(F6) the "vectors of N of the M items" warning is for fewer rows than items only."""
    from mmctr_ray.fuse import run_fuse

    with caplog.at_level(logging.WARNING, logger="mmctr_ray.fuse"):
        summary = run_fuse(synth_dir, tmp_path / "v1.parquet", FusionConfig("v1", dims=4), progress=lambda m: None)
    assert summary["items_without_vectors"] == 0
    assert "vectors of" not in caplog.text


def test_a_table_output_that_is_a_folder_is_said_to_be_one(tmp_path):
    """(L1) the most telling error first: a folder named x.parquet is "a folder", not "not a fused item table"."""
    from mmctr_ray.fuse import check_out

    (tmp_path / "x.parquet").mkdir()
    with pytest.raises(ConfigError, match=r"x.parquet: a folder; --out names the .parquet file of a fused item table"):
        check_out(tmp_path / "x.parquet", overwrite=True)


def test_a_table_output_whose_sidecar_exists_needs_overwrite(tmp_path):
    """(L2) X.fusion.json (or X.pca.npz) left without X.parquet is an existing output too."""
    from mmctr_ray.fuse import check_out

    (tmp_path / "x.fusion.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=r"x.fusion.json: already exists; pass --overwrite"):
        check_out(tmp_path / "x.parquet", overwrite=False)
    check_out(tmp_path / "x.parquet", overwrite=True)


def test_overwrite_never_replaces_a_parquet_that_holds_only_some_of_the_tables_columns(synth_dir, tmp_path):
    """(L3) item_info.parquet has item_id but no item_emb: not a fused table, even with --overwrite."""
    from mmctr_ray.fuse import check_out

    out = tmp_path / "item_info.parquet"
    shutil.copy(Layout(synth_dir).item_info, out)
    with pytest.raises(OutputExistsError, match=r"not a fused item table"):
        check_out(out, overwrite=True)


def test_the_narrowest_basis_wide_enough_serves(synth_dir, tmp_path):
    """(K2) of the cut bases in the cache that are wide enough, the narrowest serves (fewest axes read)."""
    from mmctr_ray.pca_cache import cached_fusion
    from mmctr_ray.fuse import read_fusion_summary

    cache = tmp_path / "cache"
    cached_fusion(cache, synth_dir, FusionConfig("v1", dims=4), axes=8)
    cached_fusion(cache, synth_dir, FusionConfig("v1", dims=12), axes=16)
    assert len(list(cache.glob("basis-v1-a*.json"))) == 2
    table, wrote = cached_fusion(cache, synth_dir, FusionConfig("v1", dims=5), axes=8)
    assert wrote and Path(read_fusion_summary(table)["basis"]).name.startswith("basis-v1-a8-")
