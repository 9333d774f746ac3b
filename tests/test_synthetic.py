"""`mmctr synth`: the exact layout, dtypes, padding conventions, determinism and the planted click model."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from mmctr_ray.data.synthetic import SynthSpec, World, rng_for
from mmctr_ray.data.writer import STAGING, write_synthetic
from mmctr_ray.errors import ConfigError, OutputExistsError
from mmctr_ray.schema import CLIP_DIM, BERT_DIM, GIVEN_EMB_DIM, SEQ_LEN, SPLITS, TAGS_LEN, Layout
from mmctr_ray.validate import validate


def _digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_files(synth_dir, tiny_spec):
    lay = Layout(synth_dir)
    for split in SPLITS:
        assert lay.split(split).is_file()
    assert lay.item_info.is_file() and lay.item_feature.is_file() and lay.oracle.is_file()
    images = sorted(p.name for p in lay.images_dir.iterdir())
    assert len(images) == tiny_spec.items
    assert images[:3] == ["1.jpg", "10.jpg", "100.jpg"]
    assert not (synth_dir / STAGING).exists()


def test_split_schema_and_padding(synth_dir, tiny_spec):
    t = pq.read_table(Layout(synth_dir).split("train"))
    assert t.schema.names == ["user_id", "item_seq", "item_id", "likes_level", "views_level", "label"]
    assert t.schema.field("item_seq").type == pa.list_(pa.int64())
    assert t.schema.field("label").type == pa.float64()
    assert t.num_rows == tiny_spec.train_rows
    seq = np.stack(t.column("item_seq").to_numpy(zero_copy_only=False))
    assert seq.shape == (tiny_spec.train_rows, SEQ_LEN)
    real = seq > 0
    # left-padded: once a real item appears, every later position is real (most recent last)
    assert not (real[:, :-1] & ~real[:, 1:]).any()
    assert real[:, -1].all()
    assert seq.max() <= tiny_spec.items and seq.min() == 0
    lengths = real.sum(axis=1)
    assert lengths.min() >= 3 and lengths.max() <= SEQ_LEN
    item = t.column("item_id").to_numpy()
    assert item.min() >= 1 and item.max() <= tiny_spec.items
    assert set(np.unique(t.column("label").to_numpy())) == {0.0, 1.0}


def test_levels_match_item_feature(synth_dir):
    lay = Layout(synth_dir)
    t = pq.read_table(lay.split("valid"))
    feat = pq.read_table(lay.item_feature).to_pandas().set_index("item_id")
    items = t.column("item_id").to_numpy()
    np.testing.assert_array_equal(t.column("likes_level").to_numpy(), feat.loc[items, "likes_level"].to_numpy())
    np.testing.assert_array_equal(t.column("views_level").to_numpy(), feat.loc[items, "views_level"].to_numpy())
    assert feat["likes_level"].between(0, 9).all() and feat["views_level"].between(0, 9).all()


def test_item_info_row_index_and_padding_row(synth_dir, tiny_spec):
    info = pq.read_table(Layout(synth_dir).item_info)
    assert info.num_rows == tiny_spec.items + 1
    np.testing.assert_array_equal(info.column("item_id").to_numpy(), np.arange(tiny_spec.items + 1))
    tags = np.stack(info.column("item_tags").to_numpy(zero_copy_only=False))
    emb = np.stack(info.column("item_emb_d128").to_numpy(zero_copy_only=False))
    assert tags.shape == (tiny_spec.items + 1, TAGS_LEN) and emb.shape == (tiny_spec.items + 1, GIVEN_EMB_DIM)
    assert info.schema.field("item_emb_d128").type == pa.list_(pa.float32())
    assert not tags[0].any() and not emb[0].any()
    real = tags[1:] > 0
    assert real.any(axis=1).all() and not (real[:, :-1] & ~real[:, 1:]).any()  # 1..5 tags, left-padded
    assert tags.max() <= tiny_spec.tags


def test_item_feature_columns(synth_dir, tiny_spec):
    feat = pq.read_table(Layout(synth_dir).item_feature)
    assert feat.schema.names == ["item_id", "item_title", "item_tags", "likes_level", "views_level",
                                 "txt_emb_BERT", "img_emb_CLIPRN50"]
    np.testing.assert_array_equal(feat.column("item_id").to_numpy(), np.arange(1, tiny_spec.items + 1))
    titles = feat.column("item_title").to_pylist()
    assert all(len(t.split()) >= 3 and t[0].isupper() for t in titles)
    assert len(set(titles)) > tiny_spec.items // 2
    for name, dim in (("txt_emb_BERT", BERT_DIM), ("img_emb_CLIPRN50", CLIP_DIM)):
        v = np.stack(feat.column(name).to_numpy(zero_copy_only=False))
        assert v.shape == (tiny_spec.items, dim) and np.isfinite(v).all()


def test_test_split_label_is_placeholder_and_truth_kept(synth_dir, tiny_spec):
    lay = Layout(synth_dir)
    test = pq.read_table(lay.split("test"))
    assert (test.column("label").to_numpy() == 0).all()
    truth = pq.read_table(lay.hidden_test_labels)
    assert truth.num_rows == tiny_spec.test_rows
    np.testing.assert_array_equal(truth.column("ID").to_numpy(), np.arange(tiny_spec.test_rows))
    oracle = json.loads(lay.oracle.read_text())
    auc = roc_auc_score(truth.column("label").to_numpy(), truth.column("prob").to_numpy())
    assert oracle["test"]["oracle_auc"] == pytest.approx(auc)


def planted_logit(world: World, table: pa.Table) -> np.ndarray:
    """The planted click logit of written rows, recomputed from the rows alone (user, history, target) with the
    model documented in mmctr_ray/data/synthetic.py: independent of the streams the writer drew them from."""
    from mmctr_ray.data import synthetic as syn

    users = table.column("user_id").to_numpy() - 1
    target = table.column("item_id").to_numpy()
    seq = np.stack(table.column("item_seq").to_numpy(zero_copy_only=False))
    real = seq > 0
    age = np.broadcast_to(SEQ_LEN - 1 - np.arange(SEQ_LEN), seq.shape)  # 0 = the most recent slot
    w = np.where(real, syn.RECENCY_DECAY ** age, 0.0)
    sims = np.einsum("nd,nld->nl", world.content[target], world.content[seq]) * real
    cf = np.einsum("nd,nld->nl", world.cf[target], world.cf[seq]) * real
    lengths = real.sum(1)
    return (world.bias + syn.USER_BIAS_STD * world.user_bias[users] + syn.W_PREF * sims.sum(1) / lengths
            + syn.W_CF * cf.sum(1) / np.sqrt(lengths) + syn.W_HIST * (w * sims).sum(1) / w.sum(1)
            + syn.W_POP * world.pop[target])


def test_covers_rendered_a_few_at_a_time_are_the_same_bytes(tiny_spec, monkeypatch):
    """A chunk's covers were rendered at once as float64 arrays of (8,192, S, S, 3): ~30 GB at 224 px (measured on 200
    covers: 729 MiB at once, 32 MiB a batch at a time). Rendered COVER_PIXELS at a time, from the chunk's one
    noise stream in item order, the bytes are those of one batch."""
    import mmctr_ray.data.modalities as modalities

    render = modalities.ItemRenderer(World(tiny_spec))
    ids = np.arange(1, 41)
    whole = render.covers(ids, 3, 24)  # 40 covers of 24 px fit one batch
    monkeypatch.setattr(modalities, "COVER_PIXELS", 24 * 24 * 3)  # 3 covers a batch, the last of one
    assert render.covers(ids, 3, 24) == whole and len(set(whole)) == 40


def test_the_oracle_is_the_auc_of_the_planted_probabilities_of_the_rows_as_written(synth_dir, tiny_spec):
    """oracle.json's valid and test AUCs, recomputed from the written rows and labels (not from the arrays the
    writer kept): a row written apart from its label or probability would show here."""
    world, lay = World(tiny_spec), Layout(synth_dir)
    oracle = json.loads(lay.oracle.read_text())
    valid, test = pq.read_table(lay.split("valid")), pq.read_table(lay.split("test"))
    truth = pq.read_table(lay.hidden_test_labels)
    p_valid = 1 / (1 + np.exp(-planted_logit(world, valid)))
    p_test = 1 / (1 + np.exp(-planted_logit(world, test)))
    np.testing.assert_allclose(p_test, truth.column("prob").to_numpy(), rtol=1e-9)
    assert oracle["valid"]["oracle_auc"] == pytest.approx(roc_auc_score(valid.column("label").to_numpy(), p_valid))
    assert oracle["test"]["oracle_auc"] == pytest.approx(roc_auc_score(truth.column("label").to_numpy(), p_test))
    assert 0.6 < oracle["valid"]["oracle_auc"] < 0.99  # the labels follow the probabilities, not a coin
    assert (oracle["valid"]["rows"], oracle["test"]["rows"]) == (valid.num_rows, test.num_rows)


def test_the_oracle_is_shown_for_the_rows_it_is_of(synth_dir, tmp_path):
    """A split cut or grown since synth wrote it has no oracle AUC (oracle.json's is of other rows): `mmctr train`'s
    summary and `mmctr predict` printed it beside an AUC of the rows there are."""
    lay = Layout(synth_dir)
    oracle = json.loads(lay.oracle.read_text())
    rows = oracle["valid"]["rows"]
    assert lay.oracle_auc("valid", rows) == oracle["valid"]["oracle_auc"]
    assert lay.oracle_auc("valid", rows - 1) is None and lay.oracle_auc("test", oracle["test"]["rows"] + 1) is None
    assert lay.oracle_auc("valid", None) == oracle["valid"]["oracle_auc"]  # a run that recorded no row count
    assert Layout(tmp_path).oracle_auc("valid", rows) is None  # no oracle.json: not synthetic data
    older = Layout(tmp_path)  # an oracle.json written before it recorded rows: taken as it is
    older.oracle.write_text(json.dumps({s: {"oracle_auc": 0.8} for s in ("valid", "test")}))
    assert older.oracle_auc("valid", 7) == 0.8
    for edited in ('{"valid": {"oracle_auc": 0.8', '["valid"]', '{"valid": {"oracle_auc": "high"}}'):
        older.oracle.write_text(edited)  # by hand: read at the end of a run, it failed the run there (a traceback)
        assert older.oracle_auc("valid", 7) is None


def test_synth_output_validates_clean(synth_dir):
    assert [str(p) for p in validate(synth_dir)] == []


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path, tiny_spec):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_synthetic(a, tiny_spec, progress=lambda m: None)
    write_synthetic(b, tiny_spec, progress=lambda m: None)
    write_synthetic(c, SynthSpec(**{**tiny_spec.__dict__, "seed": tiny_spec.seed + 1}), progress=lambda m: None)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db
    assert da.keys() == dc.keys()
    assert da[f"{Layout(a).split('train').relative_to(a)}"] != dc[f"{Layout(c).split('train').relative_to(c)}"]


def test_chunk_size_does_not_leak_into_row_count(tmp_path, tiny_spec):
    spec = SynthSpec(**{**tiny_spec.__dict__, "train_rows": 2_345, "chunk_rows": 1_000, "image_size": 0})
    write_synthetic(tmp_path, spec, progress=lambda m: None)
    assert pq.ParquetFile(Layout(tmp_path).split("train")).metadata.num_rows == 2_345
    assert not Layout(tmp_path).images_dir.exists()


def test_existing_output_needs_overwrite(tmp_path, tiny_spec):
    spec = SynthSpec(**{**tiny_spec.__dict__, "image_size": 0})
    write_synthetic(tmp_path, spec, progress=lambda m: None)
    before = Layout(tmp_path).split("train").read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_synthetic(tmp_path, spec, progress=lambda m: None)
    assert Layout(tmp_path).split("train").read_bytes() == before
    write_synthetic(tmp_path, spec, overwrite=True, progress=lambda m: None)


def test_an_interrupted_overwrite_leaves_no_completion_marker_and_the_new_one_lands_last(tmp_path, tiny_spec,
                                                                                        monkeypatch):
    import mmctr_ray.data.writer as writer

    spec = SynthSpec(**{**tiny_spec.__dict__, "image_size": 0})
    write_synthetic(tmp_path, spec, progress=lambda m: None)
    moved, real_replace = [], writer.os.replace

    def replace(src, dst):
        if len(moved) == 1:
            raise OSError("disk gone")
        moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        write_synthetic(tmp_path, SynthSpec(**{**spec.__dict__, "seed": 12}), overwrite=True, progress=lambda m: None)
    assert not Layout(tmp_path).synth_manifest.exists()  # half old, half new data must not look complete
    monkeypatch.setattr(writer.os, "replace", lambda src, dst: (moved.append(dst), real_replace(src, dst)))
    moved.clear()
    write_synthetic(tmp_path, spec, overwrite=True, progress=lambda m: None)
    assert moved[-1] == Layout(tmp_path).synth_manifest and len(moved) >= 4


def test_an_interrupted_synth_leaves_nothing_and_blocks_no_rerun(tmp_path, tiny_spec, monkeypatch, capsys):
    """Ctrl-C during generation left OUT/.mmctr-synth.partial, and the next `mmctr synth --out OUT` was refused
    ("already exists; pass --overwrite") though nothing had been published. A process killed outright still
    leaves it: the command does not count it as an output."""
    import mmctr_ray.data.writer as writer
    from mmctr_ray.cli import main

    spec = SynthSpec(**{**tiny_spec.__dict__, "image_size": 0})
    real = writer._write_split

    def interrupted(world, stage, split, *args):
        if split == "valid":
            raise KeyboardInterrupt
        return real(world, stage, split, *args)

    monkeypatch.setattr(writer, "_write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(tmp_path / "out", spec, progress=lambda m: None)
    assert not (tmp_path / "out").exists()  # nor the empty OUT it made
    monkeypatch.setattr(writer, "_write_split", real)
    (tmp_path / "out" / STAGING / "MicroLens_1M_x1").mkdir(parents=True)  # what a SIGKILL leaves
    assert main(["synth", "--out", str(tmp_path / "out"), "--users", "50", "--items", "40", "--train-rows", "300",
                 "--valid-rows", "60", "--test-rows", "70", "--tags", "50", "--topics", "4", "--images", "0"]) == 0
    assert Layout(tmp_path / "out").synth_manifest.is_file() and not (tmp_path / "out" / STAGING).exists()
    # sizes past the machine's memory: numpy's traceback, and an empty OUT left behind (helper-131, F7); the
    # allocation's MemoryError stands in (a real one of terabytes may be granted lazily, then OOM-killed)
    def too_large(spec):
        raise MemoryError(f"Unable to allocate 8.00 TiB for an array with shape ({spec.items},) and data type "
                          f"float64")  # numpy's _ArrayMemoryError is a MemoryError

    monkeypatch.setattr(writer, "World", too_large)
    capsys.readouterr()
    assert main(["synth", "--out", str(tmp_path / "huge"), "--items", str(2**40), "--topics", "4", "--tags", "50",
                 "--images", "0"]) == 2
    assert capsys.readouterr().err.startswith("mmctr synth: error: synth: not enough memory for --users 5,000, "
                                              "--items 1,099,511,627,776, ")  # and the sizes after, and numpy's words
    assert not (tmp_path / "huge").exists()


@pytest.mark.parametrize("field,value,match", [("items", 0, "--items"), ("tags", 3, "--tags"),
                                               ("image_size", -1, "--images"),
                                               ("topics", 0, r"--topics must be in 1\.\.--items \(2000\), got 0$"),
                                               ("items", 1, r"--topics must be in 1\.\.--items \(1\), got 24 \(the "
                                                            r"default\): pass --topics too$"),  # synth --items 1
                                               ("seed", -1, "--seed"),
                                               ("users", 10**20, r"--users must be in 1\.\.1,099,511,627,776, got "
                                                                 r"100,000,000,000,000,000,000$"),  # an OverflowError
                                               ("image_size", 100_000, r"--images must be in 0\.\.4096 pixels "),
                                               ("chunk_rows", 21_474_837, r"--chunk-rows must be at most 21,474,836 ")])
def test_bad_spec_names_the_flag(field, value, match):
    with pytest.raises(ConfigError, match=match):
        SynthSpec(**{field: value})


@pytest.fixture(scope="module")
def world_rows():
    world = World(SynthSpec(users=3_000, items=1_500, seed=5))
    rng = rng_for(5, 77)
    rows = world.sample_rows(rng, 40_000)
    rows["label"] = (rng.random(40_000) < rows["prob"]).astype(float)
    return world, rows


def test_history_lengths_and_positive_rate_like_the_real_data(world_rows):
    _, rows = world_rows
    lengths = (rows["item_seq"] > 0).sum(axis=1)
    assert lengths.min() == 3 and lengths.max() <= 100
    assert 5 <= np.median(lengths) <= 7
    assert 7 <= lengths.mean() <= 9.5
    assert 0.22 <= rows["label"].mean() <= 0.28


def test_planted_model_rewards_history_and_content(world_rows):
    """The oracle beats any score that leaves out a history term; history similarity alone carries signal."""
    world, rows = world_rows
    y, seq, target = rows["label"], rows["item_seq"], rows["item_id"]
    real = seq > 0
    lengths = real.sum(1)
    sims = np.einsum("bld,bd->bl", world.content[seq], world.content[target]) * real
    cf = (np.einsum("bld,bd->bl", world.cf[seq], world.cf[target]) * real).sum(1) / np.sqrt(lengths)
    oracle = roc_auc_score(y, rows["prob"])
    assert 0.85 < oracle < 0.93
    assert oracle - roc_auc_score(y, rows["logit"] - 1.0 * cf) > 0.004  # the id-only collaborative term
    assert oracle - roc_auc_score(y, world.pop[target]) > 0.15
    assert roc_auc_score(y, sims.sum(1) / lengths) > 0.65  # target–history content similarity
    # what a model without a user-id field can reach: everything but the user's propensity
    no_user = rows["logit"] - 0.3 * world.user_bias[rows["user"]]
    assert oracle - roc_auc_score(y, no_user) < 0.01


def test_modalities_carry_complementary_content(synth_dir, tiny_spec):
    """Text reads c_a, image reads c_b: each predicts its own part of the content better than the other."""
    from mmctr_ray.data.synthetic import K_A

    world = World(tiny_spec)  # the world synth_dir was written from
    feat = pq.read_table(Layout(synth_dir).item_feature)
    c = world.content[1:]
    r2 = {}  # share of the embedding's variance explained by each content part (8 regressors, 200 items)
    for name in ("txt_emb_BERT", "img_emb_CLIPRN50"):
        x = np.stack(feat.column(name).to_numpy(zero_copy_only=False)).astype(float)
        x = x - x.mean(0)
        for part, cols in (("a", slice(0, K_A)), ("b", slice(K_A, None))):
            z = c[:, cols] - c[:, cols].mean(0)
            coef, *_ = np.linalg.lstsq(z, x, rcond=None)
            r2[name, part] = 1 - ((x - z @ coef) ** 2).sum() / (x**2).sum()
    assert r2["txt_emb_BERT", "a"] > r2["img_emb_CLIPRN50", "a"]
    assert r2["img_emb_CLIPRN50", "b"] > r2["txt_emb_BERT", "b"]


def test_synthetic_levels_are_deciles_from_0_to_9():
    """likes_level and views_level span 0..9 as the real data's (a mutation whose levels never reached 9 passed)."""
    from mmctr_ray.data.synthetic import deciles

    assert deciles(np.arange(100.0)).tolist() == np.repeat(np.arange(10), 10).tolist()


def test_an_overwrite_removes_what_it_does_not_replace_and_only_unlinks_a_symlink(tmp_path, tiny_spec):
    """`synth --images 0` over a synth with covers: the old covers must go (embed would encode them as this data's);
    an entry that is a symlink (covers kept elsewhere) is unlinked, its target left alone (rmtree refused it).
    Only the slow convert test checked the first before."""
    out, spec = tmp_path / "out", SynthSpec(**{**tiny_spec.__dict__, "image_size": 0})
    write_synthetic(out, tiny_spec, progress=lambda m: None)
    assert Layout(out).images_dir.is_dir()
    write_synthetic(out, spec, overwrite=True, progress=lambda m: None)
    assert not Layout(out).images_dir.exists() and Layout(out).synth_manifest.is_file()
    shared = tmp_path / "shared-covers"
    shared.mkdir()
    (shared / "1.jpg").write_bytes(b"kept")
    Layout(out).images_dir.symlink_to(shared)
    write_synthetic(out, spec, overwrite=True, progress=lambda m: None)
    assert not Layout(out).images_dir.exists() and (shared / "1.jpg").read_bytes() == b"kept"


def test_an_interrupted_synth_keeps_an_out_folder_it_did_not_make(tmp_path, tiny_spec, monkeypatch):
    """Only an OUT the run made itself is removed when it fails: an empty folder made beforehand (a mount point, a
    folder the user prepared) stays."""
    import mmctr_ray.data.writer as writer

    def interrupted(*args):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(writer, "_write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(out, SynthSpec(**{**tiny_spec.__dict__, "image_size": 0}), progress=lambda m: None)
    assert out.is_dir() and not any(out.iterdir())


def test_the_manifest_describes_the_rows_written(synth_dir):
    """synth.json's history lengths (min, lower median, mean, max over every split) and positive rates, recomputed
    from the files (the test split's labels from the hidden truth)."""
    lay = Layout(synth_dir)
    manifest = json.loads(lay.synth_manifest.read_text())
    lengths = np.concatenate([(np.stack(pq.read_table(lay.split(s)).column("item_seq").to_numpy(zero_copy_only=False))
                               > 0).sum(axis=1) for s in SPLITS])
    ordered = np.sort(lengths)
    assert manifest["history_length"] == {"min": int(ordered[0]), "median": int(ordered[-(-len(ordered) // 2) - 1]),
                                          "mean": pytest.approx(float(lengths.mean())), "max": int(ordered[-1])}
    labels = {s: pq.read_table(lay.split(s)).column("label").to_numpy() for s in ("train", "valid")}
    labels["test"] = pq.read_table(lay.hidden_test_labels).column("label").to_numpy()
    for split, y in labels.items():
        assert manifest["splits"][split]["positive_rate"] == pytest.approx(y.mean()), split


def test_each_modality_is_a_noisy_reading_with_noise_of_its_own_chunk(tiny_spec):
    """A modality reads the latent vector through a projection plus isotropic noise: without the noise its vectors
    span only the latent's K_A + K_B + N_NUISANCE directions; the noise of item chunks is drawn from each chunk's
    own stream (the same stream for every chunk repeated the noise every ITEM_CHUNK items)."""
    from mmctr_ray.data.modalities import IMAGE, TEXT, ItemRenderer
    from mmctr_ray.data.synthetic import K_A, K_B, N_NUISANCE

    render, ids = ItemRenderer(World(tiny_spec)), np.arange(1, tiny_spec.items + 1)
    for m in (TEXT, IMAGE):
        x = render.embeddings(m, ids, 0).astype(np.float64)
        s = np.linalg.svd(x - x.mean(0), compute_uv=False)
        assert s[K_A + K_B + N_NUISANCE] > 0.1 * s[0], m.name
        assert not np.allclose(render.embeddings(m, ids, 1), x, atol=1e-3), m.name


def test_covers_show_colours_of_c_b_and_brightness_of_c_a(tiny_spec):
    """Covers read c_b strongly (background and stripe colours) and c_a weakly (brightness), as the module says:
    only the shipped embeddings' content was checked. The cover noise is the same stream both times."""
    import io

    from PIL import Image

    from mmctr_ray.data.modalities import ItemRenderer
    from mmctr_ray.data.synthetic import K_A

    world = World(tiny_spec)
    render, ids = ItemRenderer(world), np.arange(1, 21)

    def covers():
        return np.stack([np.asarray(Image.open(io.BytesIO(b)), dtype=float) for b in render.covers(ids, 0, 32)])

    base = covers()
    world.content[ids, K_A] = 10.0  # c_b's first coordinate: the background's red at its brightest
    red = covers()
    gain = red[..., 0].mean(axis=(1, 2)) - base[..., 0].mean(axis=(1, 2))
    assert (gain > 5).all() and abs(red[..., 1].mean() - base[..., 1].mean()) < 1
    world.content[ids, 0] = -10.0  # c_a's first coordinate: the darkest
    dark = covers()
    assert (dark.mean(axis=(1, 2, 3)) < 0.98 * red.mean(axis=(1, 2, 3))).all()


def test_covers_are_jpeg_files_as_the_challenge_ships_them(synth_dir, tiny_spec):
    lay = Layout(synth_dir)
    assert all(lay.image(i).read_bytes()[:3] == b"\xff\xd8\xff" for i in range(1, tiny_spec.items + 1))
