"""The DIN family: the baseline's exact size, every module combination, padding invariance, gradients."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmctr_ray.config import load_config
from mmctr_ray.features import FeatureMap, history_mask
from mmctr_ray.layers.attention import DINAttention
from mmctr_ray.model import DINModel

CONFIGS = Path(__file__).parent.parent / "configs"
N_ITEMS, TAG_VOCAB, VEC_DIM, N_USERS = 50, 30, 12, 20


def item_table(seed: int = 0, vec_dim: int = VEC_DIM) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tags = torch.randint(1, TAG_VOCAB, (N_ITEMS + 1, 5), generator=g)
    tags[:, :2] = 0  # left padding of tags
    tags[0] = 0
    vectors = torch.randn(N_ITEMS + 1, vec_dim, generator=g)
    vectors[0] = 0
    return {"item_tags": tags, "item_vectors": vectors}


FMAP = FeatureMap(num_items=N_ITEMS, tag_vocab=TAG_VOCAB, tags_per_item=5, vector_dim=VEC_DIM, num_users=N_USERS)


def batch(b: int = 6, length: int = 8, seed: int = 1, user: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (b, length), generator=g)
    lengths = torch.tensor([1, 2, 3, length, 0, length // 2][:b] + [3] * max(0, b - 6))
    seq[torch.arange(length)[None, :] < (length - lengths)[:, None]] = 0  # left-padded
    out = {"item_id": torch.randint(1, N_ITEMS + 1, (b,), generator=g), "item_seq": seq,
           "likes_level": torch.randint(0, 10, (b,), generator=g),
           "views_level": torch.randint(0, 10, (b,), generator=g)}
    if user:
        out["user_id"] = torch.randint(1, N_USERS, (b,), generator=g)
    return out


def tiny_model(**overrides) -> DINModel:
    sets = [f"model.{k}={v}" for k, v in overrides.items()]
    cfg = load_config(CONFIGS / "tiny.yaml", sets)
    torch.manual_seed(0)
    return DINModel(cfg.model, FMAP, **item_table())


def test_baseline_parameter_count_matches_the_architecture():
    cfg = load_config(CONFIGS / "baseline.yaml")
    n, t, v = 91_717, 11_740, 128
    fmap = FeatureMap(num_items=n, tag_vocab=t, tags_per_item=5, vector_dim=v, num_users=1_000_001)
    table = {"item_tags": torch.zeros(n + 1, 5, dtype=torch.long), "item_vectors": torch.zeros(n + 1, v)}
    model = DINModel(cfg.model, fmap, **table)
    d, item = 64, 64 + 64 + 128
    embeddings = (n + 1) * d + t * d + 2 * 10 * d  # item id, tags, likes, views (no user id)
    projection = v * 128  # Linear(128→128), no bias
    attention = (4 * item * 512 + 512) + (512 * 256 + 256) + (256 + 1)  # MLP [512, 256] → 1
    dnn_in = 2 * d + 2 * item  # likes ‖ views ‖ target ‖ pooled history = 640
    dnn = sum(i * o + o + 2 * o for i, o in [(dnn_in, 1024), (1024, 512), (512, 256)]) + (256 + 1)  # +BN γ, β
    expected = embeddings + projection + attention + dnn
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    assert model.num_fields * d == dnn_in


def test_baseline_modules_are_the_challenge_din():
    cfg = load_config(CONFIGS / "baseline.yaml")
    model = DINModel(cfg.model, FMAP, **item_table(vec_dim=VEC_DIM))
    assert type(model.sequence).__name__ == "DINAttention"
    assert model.interaction.senet is None and model.interaction.bilinear_raw is None and model.head.cross is None
    kinds = [type(m).__name__ for m in model.head.dnn.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 3
    assert all(m.p == 0.1 for m in model.head.dnn.net if isinstance(m, torch.nn.Dropout))
    assert model.item_embedding.proj.bias is None
    # embeddings start as normal(0, 1e-4); padding rows are zero
    w = model.item_embedding.id_emb.weight
    assert w[0].abs().sum() == 0 and 0.5e-4 < w[1:].std().item() < 2e-4


def test_paper_config_builds_every_module():
    cfg = load_config(CONFIGS / "paper.yaml")
    model = DINModel(cfg.model, FMAP, **item_table())
    assert type(model.sequence).__name__ == "MultiHeadTargetAttention"
    assert model.interaction.senet is not None and model.interaction.bilinear_se is not None
    assert model.head.cross is not None and model.head.cross.version == "v2"


def test_fibinets_second_bilinear_branch_takes_the_senet_weighted_fields():
    """base ‖ bilinear(fields) ‖ bilinear(SENet(fields)), FiBiNET's two branches: a mutation that fed the raw fields
    to the second branch too passed every test (the model built and trained, one branch fewer than it says)."""
    from mmctr_ray.model import Interaction

    torch.manual_seed(0)
    interaction = Interaction(5, 4, senet=True, ratio=2, bilinear="field_all")
    for p in interaction.parameters():  # away from the near-identity start, where weighting barely moves the pairs
        torch.nn.init.normal_(p, std=1.0)
    fields = torch.randn(3, 5, 4)
    weighted = interaction.senet(fields)
    assert not torch.allclose(weighted, fields, atol=1e-3)
    base, features = interaction(fields)
    torch.testing.assert_close(base, weighted.flatten(1))
    torch.testing.assert_close(features, torch.cat([weighted.flatten(1), interaction.bilinear_raw(fields).flatten(1),
                                                    interaction.bilinear_se(weighted).flatten(1)], dim=1))


def test_every_dropout_of_the_paper_model_is_the_cpu_one():
    from mmctr_ray.layers.dropout import Dropout

    model = DINModel(load_config(CONFIGS / "paper.yaml").model, FMAP, **item_table())
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(type(m) is Dropout for m in drops)


class AtomicAdds(TorchDispatchMode):
    """Records the ops that accumulate with parallel atomic adds on the CPU, whose order (and so the float sum)
    changes from run to run when another thread is busy: ``index_put`` with ``accumulate`` (the backward of
    advanced indexing) and ``put_`` with ``accumulate``. Seen: two identical deterministic runs of tiny.yaml (the
    paper model's twin) parted at step 13 in the id-embedding gradients, from the bilinear pairs gathered by
    advanced indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        if ("index_put" in name or name.startswith("put")) and (
                kwargs.get("accumulate") or (len(args) > 3 and args[3] is True)):
            self.seen.append(str(func))
        return func(*args, **kwargs)


COMBOS = list(itertools.product(["din", "multihead"], [False, True],
                                ["off", "field_all", "field_each", "field_interaction"], ["off", "v1", "v2"]))


@pytest.mark.parametrize("attention,senet,bilinear,crossnet", COMBOS,
                         ids=["-".join(map(str, c)) for c in COMBOS])
def test_every_module_combination_trains_a_step(attention, senet, bilinear, crossnet):
    model = tiny_model(attention=attention, senet=str(senet).lower(), bilinear=bilinear, crossnet=crossnet)
    model.train()
    with AtomicAdds() as atomic:
        logits = model(batch())
        assert logits.shape == (6,) and torch.isfinite(logits).all()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0, 1, 0, 1, 0]))
        loss.backward()
    assert atomic.seen == []  # every gather's backward is an index_add (serial per index): runs repeat bit for bit
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    assert torch.isfinite(model(batch())).all()


def noisy_padding_item(model: DINModel) -> None:
    """Give the padding item (id 0) a large non-zero representation: it is all zeros by construction, so without
    this a padded position that leaked into DIN's sum (no softmax) would add nothing and go unseen."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for table in (model.item_embedding.id_emb.weight, model.item_embedding.item_vectors):
            table[0] = torch.randn(table.shape[1], generator=g) * 3


@pytest.mark.parametrize("attention", ["din", "multihead"])
def test_wider_left_padding_never_changes_the_output(attention):
    model = tiny_model(attention=attention).eval()
    noisy_padding_item(model)
    assert model.item_embedding(torch.tensor([0])).abs().sum() > 1  # the padding item is not zeros here
    short = batch(length=8)
    wide = dict(short, item_seq=torch.cat([torch.zeros(6, 24, dtype=torch.long), short["item_seq"]], dim=1))
    torch.testing.assert_close(model(wide), model(short), rtol=1e-5, atol=1e-6)


def padded_attention(module: torch.nn.Module, target: torch.Tensor, history: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """Target attention computed over all L positions, padding included, then masked, written independently of
    the packed modules: DIN's MLP over the built concatenation [t, h, t-h, t*h], scores × mask, no softmax;
    multi-head through torch's scaled_dot_product_attention with the mask (an all-padding row pools to zeros)."""
    if isinstance(module, DINAttention):
        t = target.unsqueeze(1).expand_as(history)
        concat = torch.cat([t, history, t - history, t * history], dim=-1)  # (B, L, 4D)
        scores = module.rest(module.first_act(module.first(concat)))  # (B, L, 1), every position
        return (scores * mask.unsqueeze(-1) * history).sum(1)
    (b, length, d), h = history.shape, module.num_heads
    q = module.q(target).view(b, h, 1, d // h)
    k, v = (proj(history).view(b, length, h, d // h).transpose(1, 2) for proj in (module.k, module.v))
    pooled = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    pooled = torch.nan_to_num(pooled) * mask.any(1)[:, None, None, None]  # SDPA over no position: NaN
    return module.out(pooled.reshape(b, d))


def padded_forward(model: DINModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model with every history position embedded, padding included (as a large non-zero item), and the
    attention computed over every position, then masked."""
    seq = batch["item_seq"]
    target = model.item_embedding(batch["item_id"])  # (B, R)
    history = model.item_embedding(seq)  # (B, L, R)
    side = model.side_embedding(batch["likes_level"], batch["views_level"], batch.get("user_id"))
    pooled = padded_attention(model.sequence, target, history, history_mask(seq))
    b, d = target.shape[0], model.cfg.embedding_dim
    fields = torch.cat([side, target.view(b, -1, d), pooled.view(b, -1, d)], dim=1)
    return model.head(*model.interaction(fields))


@pytest.mark.parametrize("attention", ["din", "multihead"])
def test_packed_history_equals_embedding_every_position(attention):
    model = tiny_model(attention=attention, use_user_id="true").eval()
    with torch.no_grad():
        for p in model.parameters():  # weights large enough that the history matters (init std is 1e-4)
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    noisy_padding_item(model)
    b = batch(b=16, length=10, seed=4)
    logits = model(b)
    assert logits.std() > 1e-3
    torch.testing.assert_close(logits, padded_forward(model, b), rtol=1e-5, atol=1e-5)


def test_all_padding_history_gives_finite_output():
    model = tiny_model().eval()
    b = batch()
    b["item_seq"] = torch.zeros_like(b["item_seq"])
    assert torch.isfinite(model(b)).all()


def test_gradients_reach_every_trainable_parameter():
    model = tiny_model(use_user_id="true", attention="multihead", dnn_activation="dice")
    model.train()
    logits = model(batch(b=16, seed=3))
    logits.square().mean().backward()  # a loss whose gradient has no reason to vanish anywhere
    dead = [name for name, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert dead == []


def test_item_table_is_frozen_and_not_in_the_state_dict():
    model = tiny_model()
    names = set(model.state_dict())
    assert not any("item_vectors" in k or "item_tags" in k for k in names)
    assert not any(p is model.item_embedding.item_vectors for p in model.parameters())


def test_embedding_tables_are_exactly_the_embedding_weights():
    model = tiny_model(use_user_id="true")
    tables = model.embedding_tables()
    expected = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    assert {id(t) for t in tables} == expected and len(tables) == 5  # item id, tags, likes, views, user


def test_user_id_field_only_when_configured():
    assert tiny_model().num_fields + 1 == tiny_model(use_user_id="true").num_fields
    without = tiny_model().eval()
    b = batch(user=False)
    assert without(b).shape == (6,)


def test_history_ablation_ignores_the_history():
    model = tiny_model(use_history="false").eval()
    b = batch()
    other = dict(b, item_seq=torch.randint(1, N_ITEMS + 1, b["item_seq"].shape))
    torch.testing.assert_close(model(b), model(other))
    assert not torch.equal(tiny_model().eval()(b), tiny_model().eval()(other))


def test_logits_under_bf16_autocast_are_fp32_so_scores_do_not_tie():
    """A bf16 logit takes ~1,400 distinct values over 10k rows: ties that blur the validation AUC."""
    model = tiny_model().eval()
    rows = batch(b=2048, length=8, seed=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(rows)
    assert logits.dtype == torch.float32
    assert len(torch.unique(logits)) > 0.99 * 2048


def test_scaled_item_vectors_make_the_model_blind_to_the_tables_scale():
    """PCA tables come 2.5-5x the shipped vector's scale; the multiplicative modules raise it to a power (a search
    trial on an unscaled v4 table started with logits of standard deviation 4.5e4)."""
    loud = {"crossnet": "v1", "cross_layers": 2, "bilinear": "field_interaction", "senet": "true"}
    table = item_table()
    b = batch(b=64, seed=5)

    def logits(scale: float, rms: float) -> torch.Tensor:
        sets = [f"model.{k}={v}" for k, v in {**loud, "item_vector_rms": rms}.items()]
        cfg = load_config(CONFIGS / "tiny.yaml", sets)
        torch.manual_seed(0)
        model = DINModel(cfg.model, FMAP, table["item_tags"], table["item_vectors"] * scale).eval()
        vectors = model.item_embedding.item_vectors
        assert not vectors[0].any()  # the padding row stays zero
        if rms:
            assert vectors[1:].square().mean().sqrt().item() == pytest.approx(rms, rel=1e-5)
        else:  # 0: the vectors as given
            assert torch.equal(vectors, table["item_vectors"] * scale)
        with torch.no_grad():
            return model(b)

    torch.testing.assert_close(logits(1.0, 0.4), logits(5.0, 0.4), rtol=1e-4, atol=1e-5)
    assert logits(5.0, 0.0).std() > 100 * logits(5.0, 0.4).std()  # as given, the scale reaches the logits


def test_the_baseline_feeds_the_shipped_vector_unscaled_and_the_paper_configs_scale_theirs():
    assert load_config(CONFIGS / "baseline.yaml").model.item_vector_rms == 0 == load_config().model.item_vector_rms
    for name in ("paper.yaml", "tiny.yaml", "search_paper.yaml", "search_tiny.yaml"):
        assert load_config(CONFIGS / name).model.item_vector_rms == pytest.approx(0.4), name
