"""The DIN family: embedding → sequence → interaction → head, returning logits.

One class covers the challenge baseline (DIN attention, DNN head) and the winner's model (multi-head target
attention, SENet, bilinear interaction, CrossNet); each module is switched by :class:`ModelConfig`.

Fields. The flat feature vector is ``side fields ‖ target item ‖ pooled history``: likes (D) ‖ views (D) ‖
[user (D)] ‖ target (R) ‖ pooled (R), with R = the item representation width (id D ‖ tags D ‖ projection P).
Cut into D-wide pieces it is F = 2 [+1] + 2·R/D fields of width D, which SENet and bilinear interaction
read. For the baseline (D = 64, R = 256) that is 640 numbers = 10 fields.

History. Only the n real history positions (``item_seq`` > 0) are attended over, packed with the row each came
from (real histories average ~8 items in a width of 64, so padding would dominate the cost), and each distinct
history item of the batch is embedded (and projected by the attention) once, however often it recurs.
"""

from __future__ import annotations

import torch
from torch import nn

from mmctr_ray.config import ModelConfig
from mmctr_ray.features import FeatureMap, history_mask
from mmctr_ray.layers.attention import make_attention
from mmctr_ray.layers.cross import CrossNet
from mmctr_ray.layers.embedding import ItemEmbedding, SideEmbedding
from mmctr_ray.layers.interaction import BilinearInteraction, SENet
from mmctr_ray.layers.mlp import MLP
from mmctr_ray.layers.packing import pack


class Interaction(nn.Module):
    """SENet re-weighting and bilinear pairs over the fields.

    Returns ``base`` (the SENet-weighted fields, or the fields, flattened) and ``features`` for the DNN:
    ``base ‖ bilinear(fields) [‖ bilinear(SENet fields)]`` (FiBiNET feeds both bilinear outputs forward).

    Shape:
        (B, F, D) → base (B, F·D), features (B, out_dim)
    """

    def __init__(self, num_fields: int, dim: int, senet: bool, ratio: int, bilinear: str) -> None:
        super().__init__()
        self.senet = SENet(num_fields, ratio) if senet else None
        on = bilinear != "off"
        self.bilinear_raw = BilinearInteraction(num_fields, dim, bilinear) if on else None
        self.bilinear_se = BilinearInteraction(num_fields, dim, bilinear) if on and senet else None
        pairs = num_fields * (num_fields - 1) // 2
        self.base_dim = num_fields * dim
        self.out_dim = self.base_dim + pairs * dim * ((self.bilinear_raw is not None) + (self.bilinear_se is not None))

    def forward(self, fields: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weighted = self.senet(fields) if self.senet is not None else fields
        parts = [weighted.flatten(1)]
        if self.bilinear_raw is not None:
            parts.append(self.bilinear_raw(fields).flatten(1))
        if self.bilinear_se is not None:
            parts.append(self.bilinear_se(weighted).flatten(1))
        return parts[0], torch.cat(parts, dim=1)


class Head(nn.Module):
    """DNN over the features, in parallel with an optional CrossNet over the base; a Linear gives the logit.

    Shape:
        base (B, X0), features (B, X) → logits (B,)
    """

    def __init__(self, base_dim: int, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        use_cross = cfg.crossnet != "off" and cfg.cross_layers > 0
        self.cross = CrossNet(base_dim, cfg.cross_layers, cfg.crossnet) if use_cross else None
        self.dnn = MLP(in_dim, cfg.dnn_units, act=cfg.dnn_activation, batch_norm=cfg.batch_norm,
                       dropout=cfg.dropout)
        self.logit = nn.Linear(self.dnn.out_dim + (base_dim if use_cross else 0), 1)

    def forward(self, base: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h = self.dnn(features)
        if self.cross is not None:
            h = torch.cat([self.cross(base), h], dim=1)
        with torch.autocast(h.device.type, enabled=False):  # an fp32 logit: bf16 has ~1,400 distinct values
            return self.logit(h.float()).squeeze(-1)  # over 10k rows, whose ties blur the AUC


class DINModel(nn.Module):
    """Deep Interest Network with switchable sequence and interaction modules.

    Args:
        cfg: the model section of the experiment config.
        fmap: vocabulary sizes (items, tags, users) and the item vector width.
        item_tags: (N+1, T) long, the item table's tags (row = item id).
        item_vectors: (N+1, V) float, the item table's frozen vectors.

    Shape:
        batch: ``item_id`` (B,), ``item_seq`` (B, L), ``likes_level`` (B,), ``views_level`` (B,),
        ``user_id`` (B,) when ``use_user_id`` → logits (B,)

    Example:
        >>> model = DINModel(cfg.model, fmap, **table.to_torch())   # doctest: +SKIP
        >>> logits = model(batch)                                     # (B,)
    """

    def __init__(self, cfg: ModelConfig, fmap: FeatureMap, item_tags: torch.Tensor,
                 item_vectors: torch.Tensor) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.cfg = cfg
        self.item_embedding = ItemEmbedding(item_tags, item_vectors, fmap.tag_vocab, d, cfg.item_vector_proj,
                                            cfg.use_tags, cfg.item_vector_rms)
        self.side_embedding = SideEmbedding(d, fmap.num_users if cfg.use_user_id else 0)
        item_dim = self.item_embedding.out_dim
        self.sequence = make_attention(cfg.attention, item_dim, cfg.attention_units, cfg.attention_activation,
                                       cfg.num_heads, cfg.attention_dropout) if cfg.use_history else None
        self.num_fields = self.side_embedding.num_fields + 2 * item_dim // d
        self.interaction = Interaction(self.num_fields, d, cfg.senet, cfg.senet_ratio, cfg.bilinear)
        self.head = Head(self.interaction.base_dim, self.interaction.out_dim, cfg)
        self._init_weights(cfg.embedding_init_std)

    def _init_weights(self, std: float) -> None:
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.interaction.senet is not None:
            self.interaction.senet.open_gates()  # no field starts with a gate stuck at 0

    def embedding_tables(self) -> list[nn.Parameter]:
        """The embedding tables (the only parameters the embedding L2 penalty applies to)."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Embedding)]

    def pool_history(self, target: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """The sequence module over the real history positions of ``seq`` (B, L) → (B, R)."""
        if self.sequence is None:  # the history ablation: no attention parameters at all (DDP needs none unused)
            return torch.zeros_like(target)
        ids, rows = pack(seq, history_mask(seq))  # (n,) real history ids and their rows: padding is skipped
        items, inverse = torch.unique(ids, return_inverse=True)  # (u,) distinct history items, (n,) positions
        history = self.item_embedding(items)  # (u, R): each distinct item once
        return self.sequence.forward_packed(target, history, rows, inverse)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        target = self.item_embedding(batch["item_id"])  # (B, R)
        side = self.side_embedding(batch["likes_level"], batch["views_level"], batch.get("user_id"))  # (B, S, D)
        pooled = self.pool_history(target, batch["item_seq"])  # (B, R)
        b, d = target.shape[0], self.cfg.embedding_dim
        fields = torch.cat([side, target.view(b, -1, d), pooled.view(b, -1, d)], dim=1)  # (B, F, D)
        base, features = self.interaction(fields)
        return self.head(base, features)
