"""Config: every shipped YAML loads; unknown keys and bad values fail by name; overrides; round-trip."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from mmctr_ray.config import ExperimentConfig, apply_override, from_dict, load_config, read_yaml, save_config
from mmctr_ray.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    assert {"baseline.yaml", "paper.yaml", "tiny.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    saved = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(saved) == cfg


def test_baseline_is_the_challenge_din():
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("baseline.yaml")])
    m, t = cfg.model, cfg.train
    assert (m.embedding_dim, m.item_vector_proj, m.item_dim) == (64, 128, 256)
    assert m.attention == "din" and m.attention_units == (512, 256)
    assert m.dnn_units == (1024, 512, 256) and m.batch_norm and m.dropout == 0.1
    assert (m.senet, m.bilinear, m.crossnet) == (False, "off", "off")
    assert m.embedding_init_std == 1e-4
    assert (t.lr, t.batch_size, t.embedding_l2, t.grad_clip, t.patience, t.lr_decay, t.min_lr) == \
        (1e-3, 8192, 1e-6, 10.0, 3, 0.1, 1e-6)
    assert cfg.data.max_len == 64 and cfg.data.item_vector == "given"


def test_paper_turns_every_module_on():
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("paper.yaml")])
    assert cfg.model.attention == "multihead" and cfg.model.senet
    assert cfg.model.bilinear != "off" and cfg.model.crossnet != "off"
    assert cfg.fusion.strategy == "v4"


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("model:\n  dnn_unit: [8]\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key model.dnn_unit \(did you mean "
                                          r"model.dnn_units\?\)"):
        load_config(p)


def test_unknown_section_is_named(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key trian"):
        load_config(p)


@pytest.mark.parametrize("override,match", [
    ("train.lr=-0.1", "train.lr=-0.1: expected a learning rate > 0"),
    ("model.num_heads=0", "model.num_heads=0: expected a positive integer"),
    ("model.attention=gru", "model.attention='gru': expected one of din, multihead"),
    ("model.dnn_units=[64, 0]", "model.dnn_units=[64, 0]: expected a non-empty list of positive integers"),
    ("train.batch_size=1.5", "train.batch_size=1.5: expected an integer"),
    ("model.senet=yes please", "model.senet='yes please': expected true or false"),
    ("data.max_len=101", "data.max_len=101: expected an integer in 1..100"),
    ("model.dropout=1.0", "model.dropout=1.0: expected a value in [0, 1)"),
    ("fusion.strategy=v5", "fusion.strategy='v5': expected one of given, v1, v2, v3, v4"),
    ("train", "expected section.key=value"),
    # values that crashed or diverged training later: numpy's SeedSequence refuses a negative seed
    ("train.seed=-1", "train.seed=-1: expected an integer in 0..4294967295"),
    ("train.seed=4294967296", "train.seed=4294967296: expected an integer in 0..4294967295"),
    ("train.lr=.inf", "train.lr=inf: expected a finite number"),
    ("model.item_vector_rms=.inf", "model.item_vector_rms=inf: expected a finite number"),
])
def test_impossible_values_fail_by_name(override, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        load_config(None, [override])


def test_multihead_heads_must_divide_item_width():
    with pytest.raises(ConfigError, match="model.num_heads=3: expected a divisor of the item representation width"):
        load_config(None, ["model.attention=multihead", "model.num_heads=3"])


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.lr=3e-4", "model.dnn_units=[64, 32]", "model.senet=true",
                             "data.item_vector=/tmp/item_emb.parquet", "name=x"])
    assert cfg.train.lr == 3e-4 and cfg.model.dnn_units == (64, 32) and cfg.model.senet is True
    assert cfg.data.item_vector == "/tmp/item_emb.parquet" and cfg.name == "x"


def test_override_beats_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.01\n")
    assert load_config(p, ["train.lr=0.5"]).train.lr == 0.5
    assert load_config(p).train.lr == 0.01


def test_invalid_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("model:\n  dnn_units: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line \d"):
        load_config(p)


def test_not_a_mapping_and_missing_file(tmp_path, monkeypatch):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="nope.yaml: config file not found$"):
        load_config(tmp_path / "nope.yaml")
    monkeypatch.chdir(tmp_path)  # a relative path says where it was looked for (a Ray job's folder, say)
    with pytest.raises(ConfigError, match=rf"^configs/nope.yaml: config file not found \(relative to "
                                          rf"{re.escape(str(tmp_path))}\)$"):
        load_config("configs/nope.yaml")


def test_yaml_is_safe_loaded(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


def test_config_is_frozen_and_to_dict_is_plain():
    cfg = from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    plain = cfg.to_dict()
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert from_dict(plain) == cfg


def test_apply_override_refuses_to_descend_into_a_value():
    raw = {"train": {"lr": 0.1}}
    with pytest.raises(ConfigError, match="lr is not a section"):
        apply_override(raw, "train.lr.x=1")


def test_exponent_without_dot_is_a_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-3\n  embedding_l2: 0\n")
    cfg = load_config(p)
    assert cfg.train.lr == 1e-3 and cfg.train.embedding_l2 == 0.0
    with pytest.raises(ConfigError, match="train.lr='fast': expected a finite number"):
        load_config(None, ["train.lr=fast"])


def test_on_off_yes_no_stay_strings(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  bilinear: off\n  crossnet: off\n  senet: true\n")
    cfg = load_config(p, ["model.attention=din"])
    assert cfg.model.bilinear == "off" and cfg.model.crossnet == "off" and cfg.model.senet is True
    assert load_config(None, ["model.bilinear=off"]).model.bilinear == "off"
    with pytest.raises(ConfigError, match="model.senet='yes': expected true or false"):
        load_config(None, ["model.senet=yes"])



def test_a_repeated_key_is_an_error_not_a_silent_replacement(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  lr: 0.01\n  epochs: 5\nmodel:\n  dropout: 0.2\ntrain:\n  batch_size: 1024\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}: invalid YAML at line 6: duplicate key 'train'")):
        load_config(p)
    p.write_text("train:\n  lr: 0.01\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="at line 3: duplicate key 'lr'"):
        load_config(p)


def test_integers_read_as_yaml_1_2_writes_them():
    """YAML 1.1 (PyYAML) reads 010 as 8 (octal) and 1:30 as 90 (base 60)."""
    cfg = load_config(None, ["train.seed=010", "train.epochs=0x10", "train.patience=0o3"])
    assert (cfg.train.seed, cfg.train.epochs, cfg.train.patience) == (10, 16, 3)
    with pytest.raises(ConfigError, match=re.escape("train.epochs='1:30': expected an integer")):
        load_config(None, ["train.epochs=1:30"])
    assert load_config(None, ["train.batch_size=16_384"]).train.batch_size == 16384  # as PyYAML read it before


def test_merge_keys_still_merge_and_an_unhashable_key_is_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base: &b\n  lr: 0.1\n  epochs: 2\ntrain:\n  <<: *b\n  epochs: 3\n")
    assert read_yaml(p)["train"] == {"lr": 0.1, "epochs": 3}
    p.write_text("[1, 2]: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}: invalid YAML at line 1: found unhashable key")):
        read_yaml(p)


@pytest.mark.parametrize("name", ["1e3", "2E-5", "0o17", "0x1F", "010", "true", "off", "yes", "null", "1:30",
                                  "1_000", "0b1", "2001-01-01"])
def test_a_saved_config_loads_back_equal_whatever_its_strings_look_like(tmp_path, name):
    """A name or path that reads as a number (``1e3``) was written unquoted and refused on reload: every
    checkpoint's config.yaml of that run could not be read by predict, --resume or compare."""
    cfg = load_config(None, [f"name='{name}'", f"data.item_vector='{name}'"])
    assert cfg.name == name
    assert load_config(save_config(cfg, tmp_path / "c.yaml")) == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text()) == cfg.to_dict()  # plain YAML 1.1 too (bilinear: 'off')


def test_a_config_that_is_not_utf8_text_is_one_line(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"{p}: not UTF-8 text (byte 9: invalid continuation byte); "
                                                    "expected a YAML config")):
        load_config(p)
    p.write_text("name: a\x07b\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value) == f"{p}: invalid YAML: unacceptable character #x0007: special characters are not allowed"


def test_a_mistake_in_a_set_is_blamed_on_the_set_not_on_the_file(tmp_path):
    """A typo in --set was reported as the config file's ("tiny.yaml: unknown config key ..."): users searched it."""
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  max_len: 32\n")
    with pytest.raises(ConfigError, match=re.escape("--set: unknown config key data.max_lenn (did you mean "
                                                    "data.max_len?)")):
        load_config(p, ["data.max_lenn=32"])
    with pytest.raises(ConfigError, match=re.escape("--set: train.epochs='abc': expected an integer")):
        load_config(None, ["train.epochs=abc"])
    p.write_text("data:\n  max_lenn: 32\n")  # the file's own mistake stays the file's, with or without --set
    with pytest.raises(ConfigError, match=re.escape(f"{p}: unknown config key data.max_lenn")):
        load_config(p, ["train.epochs=3"])


@pytest.mark.parametrize("override,match", [
    ("data.item_vector=''", "data.item_vector='': expected 'given' or a parquet path"),
    ("fusion.dims=0", "fusion.dims=0: expected a positive integer"),
    ("model.embedding_init_std=0", "model.embedding_init_std=0.0: expected > 0"),
    ("model.dnn_units=[]", "model.dnn_units=[]: expected a non-empty list of positive integers"),
    ("train=5", "train=5: expected a mapping of keys"),
    ("model.dnn_units=5", "model.dnn_units=5: expected a list"),
    ("train.epochs=true", "train.epochs=True: expected an integer"),
    ("train.lr=true", "train.lr=True: expected a finite number"),
])
def test_more_impossible_values_fail_by_name(override, match):
    with pytest.raises(ConfigError, match="^--set: " + re.escape(match) + "$"):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["data.max_len=100", "model.cross_layers=16", "train.lr_decay=1",
                                      "train.min_lr=0.001", "train.grad_clip=0", "train.shuffle_buffer=0"])
def test_the_bounds_of_each_range_are_values_it_takes(override):
    key, value = override.split("=")
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [override]), section), name) == float(value)


def test_a_float_key_given_an_integer_is_saved_as_a_float(tmp_path):
    cfg = load_config(None, ["train.embedding_l2=0", "train.lr=1"])
    assert type(cfg.train.embedding_l2) is float and type(cfg.train.lr) is float
    assert "  embedding_l2: 0.0\n" in save_config(cfg, tmp_path / "c.yaml").read_text()


def test_an_empty_set_value_is_the_empty_string_and_an_empty_file_the_defaults(tmp_path):
    assert load_config(None, ["name="]).name == ""
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert read_yaml(p) == {} and load_config(p) == load_config(None)


def test_a_saved_config_keeps_the_declared_order_of_its_keys(tmp_path):
    text = save_config(load_config(None), tmp_path / "c.yaml").read_text()
    assert list(yaml.safe_load(text)) == ["name", "data", "fusion", "model", "train"]
    assert list(yaml.safe_load(text)["train"])[:3] == ["batch_size", "eval_batch_size", "epochs"]


def test_crossnet_without_cross_layers_is_no_difference_and_a_batch_is_at_least_a_row():
    from mmctr_ray.config import effective_differences, worker_batch

    a = load_config(None, ["model.crossnet=v1", "model.cross_layers=0"])
    b = load_config(None, ["model.crossnet=v2", "model.cross_layers=0"])
    assert effective_differences(a, b) == {}  # the model builds no CrossNet in either
    assert worker_batch(3, 4) == 1 and worker_batch(8192, 3) == 2730


@pytest.mark.parametrize("text", ["1:30.0", "1_0.5"])
def test_yaml_1_1_float_forms_are_not_numbers(text):
    """YAML 1.2 floats only, as for integers: PyYAML's 1.1 resolver read 1:30.0 as 90.0 (sexagesimal) and 1_0.5 as
    10.5, while 1:30 was refused as no integer."""
    from mmctr_ray.config import _Loader

    with pytest.raises(ConfigError, match=rf"^--set: train.grad_clip='?{re.escape(text)}'?: expected a "):
        load_config(None, [f"train.grad_clip={text}"])
    assert yaml.load(f"a: {text}", Loader=_Loader) == {"a": text}  # a string, as the 1.2 core schema reads it
