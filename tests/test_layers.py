"""Unit tests for every layer in mmctr_ray/layers: shapes, padding, gradients, golden values, references, errors.

Parameters and inputs come from ``pattern`` (a sine wave in float64 cast to float32), never from torch's RNG,
so the golden values hold on any torch version and machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mmctr_ray.layers.attention import DINAttention, MultiHeadTargetAttention, make_attention
from mmctr_ray.layers.cross import CrossNet
from mmctr_ray.layers import dropout as dropout_module
from mmctr_ray.layers.dropout import Dropout
from mmctr_ray.layers.embedding import ItemEmbedding, SideEmbedding
from mmctr_ray.layers.interaction import BilinearInteraction, SENet
from mmctr_ray.layers.mlp import MLP, Dice, activation
from mmctr_ray.layers.packing import pack

B, L, F, D = 3, 5, 4, 8


def pattern(shape: tuple[int, ...], k: float, scale: float = 0.5) -> torch.Tensor:
    """A fixed, RNG-free tensor: ``sin(0.37·i + k) · scale`` over the flattened index i."""
    n = math.prod(shape)
    return (torch.sin(torch.arange(n, dtype=torch.float64) * 0.37 + k) * scale).reshape(shape).float()


def fill_deterministic(module: nn.Module, scale: float = 0.5) -> nn.Module:
    """Overwrite every parameter (the k-th in ``named_parameters`` order) with ``pattern(shape, k)``."""
    with torch.no_grad():
        for k, (_, param) in enumerate(module.named_parameters()):
            param.copy_(pattern(tuple(param.shape), k, scale))
    return module


TARGET = pattern((B, D), 10)
HISTORY = pattern((B, L, D), 11)
# row 0 all real, row 1 left-padded, row 2 all padding
MASK = torch.tensor([[True] * 5, [False, False, True, True, True], [False] * 5])
FIELDS = pattern((B, F, D), 12) + 0.3  # a positive shift so SENet's ReLU gates open


def item_table() -> dict[str, torch.Tensor]:
    """7 rows (row 0 = padding), 5 left-padded tags from a vocabulary of 10, 6-wide frozen vectors."""
    tags = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 3, 4], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0],
                         [0, 0, 0, 0, 9], [0, 0, 7, 8, 9], [0, 0, 0, 2, 2]])
    vectors = pattern((7, 6), 13)
    vectors[0] = 0
    return {"item_tags": tags, "item_vectors": vectors}


def item_embedding(use_tags: bool = True) -> ItemEmbedding:
    return ItemEmbedding(**item_table(), tag_vocab=10, dim=4, proj_dim=4, use_tags=use_tags)


ITEM_IDS = torch.tensor([[0, 0, 1, 2, 3], [0, 4, 5, 6, 1], [2, 3, 4, 5, 6]])
SIDE_INPUTS = (torch.tensor([0, 3, 9]), torch.tensor([1, 5, 2]), torch.tensor([0, 4, 2]))


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    inputs: tuple
    shape: tuple[int, ...]
    train_grads: bool = True  # backward in training mode (False: eval mode, see the case)


ATTENTION_ARGS = (TARGET, HISTORY, MASK)
CASES = {
    "mlp": Case(lambda: MLP(6, (5, 4), act="prelu", out_dim=2), (pattern((B, 6), 20),), (B, 2)),
    # a Linear bias right before a training-mode BatchNorm has exactly zero gradient (the batch mean cancels it)
    "mlp_bn_dice": Case(lambda: MLP(6, (5, 4), act="dice", batch_norm=True), (pattern((B, 6), 21),), (B, 4),
                        train_grads=False),
    "dice": Case(lambda: Dice(6), (pattern((B, 6), 22, scale=2.0),), (B, 6)),
    "din_relu": Case(lambda: DINAttention(D, (6, 4)), ATTENTION_ARGS, (B, D)),
    "din_dice": Case(lambda: DINAttention(D, (6, 4), act="dice"), ATTENTION_ARGS, (B, D)),
    "multihead_1": Case(lambda: MultiHeadTargetAttention(D, num_heads=1), ATTENTION_ARGS, (B, D)),
    "multihead_2": Case(lambda: MultiHeadTargetAttention(D, num_heads=2), ATTENTION_ARGS, (B, D)),
    "item_embedding": Case(item_embedding, (ITEM_IDS,), (B, L, 4 + 4 + 4)),
    "item_embedding_no_tags": Case(lambda: item_embedding(use_tags=False), (ITEM_IDS,), (B, L, 4 + 4)),
    "side_embedding": Case(lambda: SideEmbedding(D, num_users=5), SIDE_INPUTS, (B, 3, D)),
    "side_embedding_no_user": Case(lambda: SideEmbedding(D), SIDE_INPUTS[:2], (B, 2, D)),
    "senet": Case(lambda: SENet(F, ratio=2), (FIELDS,), (B, F, D)),
    "bilinear_field_all": Case(lambda: BilinearInteraction(F, D, "field_all"), (FIELDS,), (B, 6, D)),
    "bilinear_field_each": Case(lambda: BilinearInteraction(F, D, "field_each"), (FIELDS,), (B, 6, D)),
    "bilinear_field_interaction": Case(lambda: BilinearInteraction(F, D, "field_interaction"), (FIELDS,),
                                       (B, 6, D)),
    "crossnet_v1": Case(lambda: CrossNet(D, 2, "v1"), (pattern((B, D), 23),), (B, D)),
    "crossnet_v2": Case(lambda: CrossNet(D, 2, "v2"), (pattern((B, D), 23),), (B, D)),
}

# (first four output values, sum, sum weighted by pattern), computed once with fill_deterministic in eval mode
GOLDEN = {
    "mlp": ([0.43048394, 1.2420975, 0.41672876, 1.2070429], 4.7217069, 1.9201536),
    "mlp_bn_dice": ([0.29712164, 0.27299094, 0.25377324, 0.14792643], 2.912715, 0.24541394),
    "dice": ([-0.0087729646, -0.32951194, -0.64315528, -0.94678593], 4.54776, -4.5010595),
    "din_relu": ([-0.90202069, -1.0096669, -0.98065948, -0.81892449], -2.316669, -2.4432511),
    "din_dice": ([0.50172466, 0.53246421, 0.49113715, 0.38333708], 0.95462632, 1.2000245),
    "multihead_1": ([-0.12182152, 0.16608948, -0.20489562, 0.23696351], 0.06511566, -0.047691539),
    "multihead_2": ([-0.19838551, 0.2137334, -0.2220526, 0.2230695], -0.008866325, -0.046061069),
    "item_embedding": ([0, 0.18080771, 0.33714396, 0.44784933], 7.5617104, -2.5591013),
    "item_embedding_no_tags": ([0, 0.18080771, 0.33714396, 0.44784933], 6.0595551, 1.1105088),
    "side_embedding": ([0, 0.18080771, 0.33714396, 0.44784933], 0.83060503, -0.027944833),
    "side_embedding_no_user": ([0, 0.18080771, 0.33714396, 0.44784933], -0.78698248, 1.5588868),
    "senet": ([0.012180499, 0.077754639, 0.14840002, 0.21455513], 6.875133, 1.1148891),
    "bilinear_field_all": ([0.11190908, 0.070638098, 0.029490232, 0.0043147001], 3.0553236, -0.36098328),
    "bilinear_field_each": ([0.11190908, 0.070638098, 0.029490232, 0.0043147006], -0.22420509, -0.085988164),
    "bilinear_field_interaction": ([0.11190908, 0.070638098, 0.029490232, 0.0043147006], 3.031599, 0.082148485),
    "crossnet_v1": ([0.31814244, -0.004776001, -0.32704806, -0.60505563], -1.7454169, -5.6943145),
    "crossnet_v2": ([0.069959015, -1.3587391, 0.20227236, -0.71568668], -1.147, -2.3285687),
}


def run_case(name: str, train: bool = False) -> torch.Tensor:
    case = CASES[name]
    module = fill_deterministic(case.build()).train(train)
    return module(*case.inputs)


@pytest.mark.parametrize("name", CASES)
def test_output_shape(name):
    assert run_case(name).shape == CASES[name].shape


@pytest.mark.parametrize("name", CASES)
def test_golden_values(name):
    with torch.no_grad():
        out = run_case(name).flatten()
    head, total, weighted = GOLDEN[name]
    torch.testing.assert_close(out[:4], torch.tensor(head), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sum(), torch.tensor(total), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((out * pattern(tuple(out.shape), 7)).sum(), torch.tensor(weighted), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_gradients_reach_every_parameter(name):
    case = CASES[name]
    module = fill_deterministic(case.build()).train(case.train_grads)
    out = module(*case.inputs)
    (out * pattern(tuple(out.shape), 99)).sum().backward()  # a weighted sum: no cancellation by symmetry
    for pname, param in module.named_parameters():
        assert param.requires_grad
        assert param.grad is not None, pname
        assert param.grad.abs().sum() > 0, pname  # padding rows of embeddings may be zero, not the whole tensor


# --- attention: padding ---------------------------------------------------------------------------------------

ATTENTIONS = ["din_relu", "din_dice", "multihead_1", "multihead_2"]


def attention(name: str, train: bool) -> nn.Module:
    return fill_deterministic(CASES[name].build()).train(train)


def garbage() -> torch.Tensor:
    """Large finite random values for padded history positions (seeded: a failure reproduces)."""
    return torch.randn(B, L, D, generator=torch.Generator().manual_seed(0)) * 10


# training mode included: DINAttention runs its MLP (and a dice activation's batch statistics) on real positions
INVARIANT_MODES = [(name, train) for name in ATTENTIONS for train in (False, True)]


@pytest.mark.parametrize("name, train", INVARIANT_MODES)
def test_attention_ignores_padded_history(name, train):
    module = attention(name, train)
    dirty = torch.where(MASK.unsqueeze(-1), HISTORY, garbage())
    assert not torch.equal(dirty, HISTORY)
    torch.testing.assert_close(module(TARGET, dirty, MASK), module(TARGET, HISTORY, MASK), rtol=0, atol=0)


@pytest.mark.parametrize("name", ATTENTIONS)
@pytest.mark.parametrize("train", [False, True])
def test_attention_all_padding_pools_to_exact_zeros(name, train):
    module = attention(name, train)
    out = module(TARGET, garbage(), torch.zeros(B, L, dtype=torch.bool))
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros(B, D))


@pytest.mark.parametrize("name", ATTENTIONS)
def test_attention_trains_on_a_batch_with_a_single_real_history_position(name):
    module = attention(name, True)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[1, 2] = True  # the whole batch has one real position: a dice's BatchNorm sees one row
    out = module(TARGET, HISTORY, mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and out[1].abs().sum() > 0
    assert torch.equal(out[0], torch.zeros(D)) and torch.equal(out[2], torch.zeros(D))


def test_dice_on_one_row_in_training_uses_the_running_statistics():
    module = Dice(6).train()
    module.alpha.data.fill_(0.25)
    x = torch.randn(1, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(module(x), module.eval()(x))  # the same normalisation as at inference


def test_attention_padded_row_is_zero_among_real_rows():
    for name in ATTENTIONS:
        out = attention(name, False)(*ATTENTION_ARGS)
        assert torch.equal(out[2], torch.zeros(D)), name
        assert out[:2].abs().sum() > 0, name


# --- attention: references ------------------------------------------------------------------------------------

def multihead_reference(module: MultiHeadTargetAttention, target, history, mask) -> torch.Tensor:
    """Loops over rows, heads and real positions, using the module's weight matrices."""
    wq, wk, wv, wo = module.q.weight, module.k.weight, module.v.weight, module.out.weight
    dh = module.head_dim
    rows = []
    for b in range(target.shape[0]):
        real = [j for j in range(history.shape[1]) if mask[b, j]]
        heads = []
        for h in range(module.num_heads):
            part = slice(h * dh, (h + 1) * dh)
            q = wq[part] @ target[b]
            scores = torch.stack([q @ (wk[part] @ history[b, j]) / math.sqrt(dh) for j in real]) if real else None
            pooled = torch.zeros(dh)
            if real:
                weights = torch.softmax(scores, dim=0)
                for w, j in zip(weights, real, strict=True):
                    pooled = pooled + w * (wv[part] @ history[b, j])
            heads.append(pooled)
        rows.append(wo @ torch.cat(heads))
    return torch.stack(rows)


@pytest.mark.parametrize("heads", [1, 2])
def test_multihead_matches_loop_reference(heads):
    module = fill_deterministic(MultiHeadTargetAttention(D, num_heads=heads)).eval()
    with torch.no_grad():
        torch.testing.assert_close(module(*ATTENTION_ARGS), multihead_reference(module, *ATTENTION_ARGS),
                                   rtol=1e-5, atol=1e-6)


def multihead_padded(module: MultiHeadTargetAttention, target, history, mask) -> torch.Tensor:
    """The padded computation over all L positions: masked softmax, weights × mask (the pre-packing module)."""
    (b, length, d), h, dh = history.shape, module.num_heads, module.head_dim
    q = module.q(target).view(b, h, dh)
    k, v = module.k(history).view(b, length, h, dh), module.v(history).view(b, length, h, dh)
    scores = torch.einsum("bhe,blhe->bhl", q, k) / math.sqrt(dh)  # (B, H, L)
    real = mask.unsqueeze(1)
    scores = scores.masked_fill(~real, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1) * real.to(scores.dtype)
    return module.out(torch.einsum("bhl,blhe->bhe", module.drop(weights), v).reshape(b, d))


def test_pack_keeps_real_positions_row_major():
    values = torch.arange(B * L).view(B, L)
    packed, rows = pack(values, MASK)
    assert torch.equal(packed, torch.tensor([0, 1, 2, 3, 4, 7, 8, 9]))
    assert torch.equal(rows, torch.tensor([0, 0, 0, 0, 0, 1, 1, 1]))
    vectors, _ = pack(HISTORY, MASK)
    assert torch.equal(vectors, HISTORY[MASK])


def random_attention_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """6 rows of 7: full, all padding, full, and random left-padded lengths (seeded)."""
    g = torch.Generator().manual_seed(5)
    b, length = 6, 7
    lengths = torch.tensor([length, 0, length, 1, 3, 5])
    mask = torch.arange(length)[None, :] >= (length - lengths)[:, None]
    return torch.randn(b, D, generator=g), torch.randn(b, length, D, generator=g), mask


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("train, dropout", [(True, 0.0), (False, 0.5)])  # eval: dropout is the identity
def test_multihead_packed_equals_padded_with_gradients(heads, train, dropout):
    module = fill_deterministic(MultiHeadTargetAttention(D, num_heads=heads, dropout=dropout)).train(train)
    target, history, mask = random_attention_inputs()
    weight = pattern((target.shape[0], D), 98)
    results = []
    for compute in (lambda t, h: module(t, h, mask),  # packs, then forward_packed
                    lambda t, h: module.forward_packed(t, *pack(h, mask)),
                    lambda t, h: multihead_padded(module, t, h, mask)):
        module.zero_grad()
        t, h = target.clone().requires_grad_(), history.clone().requires_grad_()
        out = compute(t, h)
        (out * weight).sum().backward()
        results.append((out, t.grad, h.grad, *(p.grad for p in module.parameters())))
    assert torch.equal(results[0][0][1], torch.zeros(D))  # the all-padding row
    for got in results[:2]:
        for a, b in zip(got, results[2], strict=True):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ["relu", "prelu", "gelu", "dice"])
def test_din_split_first_layer_equals_concatenation(act):
    module = fill_deterministic(DINAttention(D, (6, 4), act=act)).train()  # dropout 0: train mode is deterministic
    t = TARGET.unsqueeze(1).expand(-1, L, -1)
    concat = torch.cat([t, HISTORY, t - HISTORY, t * HISTORY], dim=-1)  # (B, L, 4D)
    hidden = module.first_act(module.first(concat[MASK]))  # the real positions only, (n, U)
    scores = torch.zeros(B, L).masked_scatter(MASK, module.rest(hidden).squeeze(-1))
    naive = (scores.unsqueeze(-1) * HISTORY).sum(1)
    torch.testing.assert_close(module(*ATTENTION_ARGS), naive, rtol=1e-5, atol=1e-5)


# --- embeddings -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_tags", [True, False])
def test_item_padding_id_maps_to_zeros(use_tags):
    module = item_embedding(use_tags)  # default init: nn.Embedding zeroes the padding_idx row
    out = module(torch.tensor([[0, 0, 1], [0, 2, 3]]))
    assert torch.equal(out[0, :2], torch.zeros(2, module.out_dim))
    assert torch.equal(out[1, 0], torch.zeros(module.out_dim))
    assert out[0, 2].abs().sum() > 0


def test_item_tags_pool_over_real_tags_only():
    module = fill_deterministic(item_embedding())
    tags = module.tag_emb.weight
    pooled = module(torch.tensor([1, 2, 6]))[:, 4:8]  # tags part: after the 4-wide id embedding
    torch.testing.assert_close(pooled[0], (tags[3] + tags[4]) / 2)  # tags [0, 0, 0, 3, 4]
    torch.testing.assert_close(pooled[1], tags[1:6].mean(0))  # tags [1, 2, 3, 4, 5]
    torch.testing.assert_close(pooled[2], tags[2])  # tags [0, 0, 0, 2, 2]


def test_item_padding_rows_never_reach_real_items():
    module = fill_deterministic(item_embedding())
    ids = torch.tensor([1, 2, 4, 5])
    before = module(ids)
    with torch.no_grad():
        module.tag_emb.weight[0] = 1e3  # garbage in the padding tag row
        module.id_emb.weight[0] = -1e3  # and in the padding item row
    torch.testing.assert_close(module(ids), before, rtol=0, atol=0)


def test_item_without_tags_pools_to_finite_zeros():
    out = fill_deterministic(item_embedding())(torch.tensor([3]))  # a real item whose tags are all padding
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 4:8], torch.zeros(4))


def test_side_embedding_fields_are_the_tables_rows():
    module = fill_deterministic(SideEmbedding(D, num_users=5))
    likes, views, users = SIDE_INPUTS
    out = module(likes, views, users)
    assert torch.equal(out[:, 0], module.likes.weight[likes])
    assert torch.equal(out[:, 1], module.views.weight[views])
    assert torch.equal(out[:, 2], module.user.weight[users])
    assert module.num_fields == 3 and SideEmbedding(D).num_fields == 2


# --- interactions and crosses ---------------------------------------------------------------------------------

def test_senet_reweights_each_field_by_its_gate():
    module = fill_deterministic(SENet(F, ratio=2))
    w1, w2 = module.excite[0].weight, module.excite[2].weight
    out = module(FIELDS)
    for b in range(B):
        gate = torch.relu(w2 @ torch.relu(w1 @ FIELDS[b].mean(-1)))
        assert (gate > 0).any()
        torch.testing.assert_close(out[b], FIELDS[b] * gate.unsqueeze(-1))


def test_no_senet_field_starts_with_a_gate_stuck_at_zero():
    """W2's rows start non-negative: an all-negative row gates its field to 0 for every input (the bottleneck is a
    ReLU's output) and passes no gradient, so the field stayed off for the run (10 fields, ratio 3: in 75% of
    seeds). Each field's gate must open for some input, in the layer alone and after the model's re-init."""
    from mmctr_ray.config import ModelConfig
    from mmctr_ray.features import FeatureMap
    from mmctr_ray.model import DINModel

    fmap = FeatureMap(num_items=5, tag_vocab=4, tags_per_item=2, vector_dim=8, num_users=3)
    for seed in range(20):
        torch.manual_seed(seed)
        senet = DINModel(ModelConfig(embedding_dim=4, item_vector_proj=8, senet=True, senet_ratio=3, num_heads=2),
                         fmap, torch.zeros(6, 2, dtype=torch.long), torch.randn(6, 8)).interaction.senet
        for module in (senet, SENet(10, ratio=3)):
            z = torch.rand(256, module.excite[0].in_features) * 2 - 1  # squeezed fields of either sign
            gates = module.excite(z)
            assert (gates > 0).any(dim=0).all(), (seed, gates.amax(dim=0))


@pytest.mark.parametrize("kind", ["field_all", "field_each", "field_interaction"])
def test_bilinear_maps_start_as_a_linear_layer_of_their_width_would(kind):
    """Each (D, D) map gets xavier for D -> D (std 1/sqrt(D)), as FiBiNET's per-field Linear layers do; xavier on
    the whole (count, D, D) tensor started them 6-7 times smaller at D=64, by a factor that depended on the type."""
    torch.manual_seed(0)
    weight = BilinearInteraction(10, 64, kind).weight.detach()
    for w in weight:
        assert abs(float(w.std()) - 64 ** -0.5) < 0.012


def test_cross_layers_start_as_fuxictrs_do():
    """v1's vector per layer is FuxiCTR's Linear(X, 1) under xavier_normal, std sqrt(2 / (X + 1)) (it started at
    1/sqrt(X), ~0.7 of that, helper-139); v2's matrices are xavier for X -> X, std 1/sqrt(X); biases start at 0."""
    torch.manual_seed(0)
    dim = 640  # the paper model's ten fields of 64
    v1, v2 = CrossNet(dim, 3, "v1"), CrossNet(dim, 2, "v2")
    for w in v1.weights:
        assert abs(float(w.detach().std()) / (2 / (dim + 1)) ** 0.5 - 1) < 0.1
    for w in v2.weights:
        assert abs(float(w.detach().std()) * dim ** 0.5 - 1) < 0.02
    assert all(not b.any() for b in [*v1.biases, *v2.biases])


def test_prelu_slopes_start_at_fuxictrs_value():
    """FuxiCTR builds PReLU with init=0.1 (torch's default, which this MLP had, is 0.25)."""
    mlp = MLP(6, (5, 4), act="prelu")
    slopes = [m.weight for m in mlp.modules() if isinstance(m, nn.PReLU)]
    assert len(slopes) == 2 and all(torch.equal(w, torch.full_like(w, 0.1)) for w in slopes)


@pytest.mark.parametrize("kind", ["field_all", "field_each", "field_interaction"])
def test_bilinear_matches_loop_reference(kind):
    module = fill_deterministic(BilinearInteraction(F, D, kind))
    pairs = [(i, j) for i in range(F) for j in range(i + 1, F)]  # triu order
    expected = []
    for p, (i, j) in enumerate(pairs):
        w = module.weight[{"field_all": 0, "field_each": i, "field_interaction": p}[kind]]
        expected.append((FIELDS[:, i] @ w) * FIELDS[:, j])
    torch.testing.assert_close(module(FIELDS), torch.stack(expected, dim=1))
    assert module.num_pairs == len(pairs)


def crossnet_reference(module: CrossNet, x0: torch.Tensor) -> torch.Tensor:
    rows = []
    for row in x0:
        x = row
        for w, b in zip(module.weights, module.biases, strict=True):
            if module.version == "v1":
                x = row * sum(x[k] * w[k] for k in range(len(w))) + b + x  # x0 · (x ⋅ w) + b + x
            else:
                x = row * (torch.stack([w[r] @ x for r in range(len(w))]) + b) + x  # x0 ⊙ (W x + b) + x
        rows.append(x)
    return torch.stack(rows)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_crossnet_matches_loop_reference(version):
    module = fill_deterministic(CrossNet(D, 3, version))
    x0 = pattern((B, D), 23)
    torch.testing.assert_close(module(x0), crossnet_reference(module, x0))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_crossnet_without_layers_returns_input(version):
    x0 = pattern((B, D), 23)
    module = CrossNet(D, 0, version)
    assert torch.equal(module(x0), x0)
    assert not list(module.parameters())


# --- constructor validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("build, message", [
    (lambda: MultiHeadTargetAttention(10, num_heads=3), "dim 10 is not divisible by num_heads 3"),
    (lambda: MultiHeadTargetAttention(8, num_heads=0), "num_heads 0"),
    (lambda: DINAttention(8, units=()), "at least one hidden layer"),
    (lambda: make_attention("transformer", 8, (4,), "relu", 2, 0.0), "'transformer'"),
    (lambda: BilinearInteraction(4, 8, kind="x"), "unknown bilinear type 'x'"),
    (lambda: BilinearInteraction(1, 8), "at least 2 fields, got 1"),
    (lambda: CrossNet(8, 2, version="v3"), "unknown CrossNet version 'v3'"),
    (lambda: activation("swish", 4), "unknown activation 'swish'"),
    (lambda: MLP(4, (3,), act="swish"), "'swish'"),
])
def test_bad_arguments_raise_value_error_naming_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("name", ["din_relu", "din_dice", "multihead_2"])
def test_distinct_items_with_inverse_equal_per_position_history(name):
    """Giving the u distinct history items plus the inverse map is the same function as n positions."""
    module = fill_deterministic(CASES[name].build()).train()
    g = torch.Generator().manual_seed(3)
    items = torch.randn(4, D, generator=g)  # u = 4 distinct items
    inverse = torch.tensor([0, 1, 1, 3, 0, 2, 2, 2, 1])  # n = 9 positions
    rows = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    target = torch.randn(B, D, generator=g)
    torch.manual_seed(0)
    shared = module.forward_packed(target, items, rows, inverse)
    torch.manual_seed(0)
    spread = module.forward_packed(target, items[inverse], rows)
    torch.testing.assert_close(shared, spread, rtol=1e-5, atol=1e-6)


@pytest.fixture
def own_draws(monkeypatch):
    """The module's own mask, on any processor (on Intel with MKL it would be ``nn.Dropout``'s)."""
    monkeypatch.setattr(dropout_module, "TORCH_DRAWS_FAST", False)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_cpu_dropout_keeps_each_element_with_its_probability_and_the_expectation(p, own_draws):
    """The mask draws four 16-bit values from each 64-bit word: every lane must be uniform (a word drawn over
    [0, 2^63) alone, ``random_()``'s default, would keep every fourth element always for p < 0.5)."""
    torch.manual_seed(0)
    module = Dropout(p).train()
    x = torch.ones(4000, 64, requires_grad=True)
    y = module(x)
    keep = round((1 - p) * 65536) / 65536
    assert abs(keep - (1 - p)) < 8e-6
    kept = y != 0
    for lane in range(4):  # the lanes of one word: about 64,000 elements each; 5 standard errors
        rate = kept.reshape(-1, 4)[:, lane].float().mean().item()
        assert abs(rate - keep) < 5 * math.sqrt(keep * (1 - keep) / 64_000), (lane, rate)
    assert torch.equal(torch.unique(y), torch.tensor([0.0, 1 / keep]))  # kept elements scaled by 1/keep
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the same mask and scale
    torch.manual_seed(0)
    assert torch.equal(Dropout(p).train()(torch.ones(4000, 64)), y.detach())  # torch's generator: repeatable
    assert not torch.equal(Dropout(p).train()(torch.ones(4000, 64)), y.detach())  # and the next mask is another


def test_cpu_dropout_is_the_identity_in_eval_and_at_zero_and_drops_all_at_one(own_draws):
    x = pattern((7, 5), 3)
    assert torch.equal(Dropout(0.5).eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    for p in (1e-6, 1 - 1e-6):  # rounds to keeping all or nothing: nn.Dropout's own draw, as p asks
        torch.manual_seed(2)
        expected = nn.functional.dropout(torch.ones(50_000), p)
        torch.manual_seed(2)
        assert torch.equal(Dropout(p).train()(torch.ones(50_000)), expected)
    torch.manual_seed(1)
    odd = Dropout(0.5).train()(torch.ones(3, 7, 5, dtype=torch.bfloat16))  # 105 elements: not whole words
    assert odd.shape == (3, 7, 5) and odd.dtype == torch.bfloat16 and set(odd.unique().tolist()) == {0.0, 2.0}


def test_where_torch_draws_fast_itself_the_dropout_is_torchs(monkeypatch):
    monkeypatch.setattr(dropout_module, "TORCH_DRAWS_FAST", True)  # MKL on an Intel processor
    torch.manual_seed(3)
    expected = nn.functional.dropout(torch.ones(1000), 0.3)
    torch.manual_seed(3)
    assert torch.equal(Dropout(0.3).train()(torch.ones(1000)), expected)


def test_every_dropout_in_the_layers_is_the_cpu_one():  # the whole model's: test_model.py
    din = DINAttention(D, (6, 4), dropout=0.1)
    assert [type(m) for m in din.modules() if isinstance(m, nn.Dropout)] == [Dropout, Dropout]
