"""The unified embedding layer: one item representation shared by the target and every history position.

An item's representation is ``id embedding ‖ masked mean of its tag embeddings ‖ W·(frozen item vector)``
(D + D + P wide; the tags part is dropped when ``use_tags`` is off). The item table (tags and frozen vectors,
row = item id, row 0 = padding) lives in non-persistent buffers on the module's device, so a batch needs
only ids; the padding item maps to an all-zero representation. Side fields (likes level, views level,
optionally user id) are D-wide embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from mmctr_ray.schema import LEVELS, PAD_ID


def root_mean_square(vectors: torch.Tensor) -> torch.Tensor:
    """Root mean square of the frozen vectors over the real items (row 0 is padding) and every dimension; 1 for an
    all-zero table."""
    rms = vectors[1:].double().square().mean().sqrt().float()
    return rms if rms > 0 else torch.ones(())


class ItemEmbedding(nn.Module):
    """Item id → representation, gathering tags and the frozen vector from the resident item table.

    Args:
        item_tags: (N+1, T) long tag ids, 0 = padding.
        item_vectors: (N+1, V) float frozen multimodal vectors (row 0 zeros).
        tag_vocab: tag embedding rows (largest tag id + 1).
        dim: D, width of id and tag embeddings.
        proj_dim: P, width of the trainable projection of the frozen vector (Linear V→P, no bias).
        use_tags: include the pooled tags part.
        vector_rms: 0 feeds the vectors as given; above 0, they are scaled by one fixed factor so that their root
            mean square over the real items and dimensions is this (recomputed from the same table wherever the
            model is built: training workers, prediction).

    Shape:
        ids (...) long → (..., D + D·use_tags + P)
    """

    def __init__(self, item_tags: torch.Tensor, item_vectors: torch.Tensor, tag_vocab: int, dim: int,
                 proj_dim: int, use_tags: bool = True, vector_rms: float = 0.0) -> None:
        super().__init__()
        num_rows = item_tags.shape[0]
        vectors = item_vectors.float()
        if vector_rms > 0:
            vectors = vectors * (vector_rms / root_mean_square(vectors))
        self.register_buffer("item_tags", item_tags.long(), persistent=False)
        self.register_buffer("item_vectors", vectors, persistent=False)
        self.id_emb = nn.Embedding(num_rows, dim, padding_idx=PAD_ID)
        self.tag_emb = nn.Embedding(tag_vocab, dim, padding_idx=PAD_ID) if use_tags else None
        self.proj = nn.Linear(item_vectors.shape[1], proj_dim, bias=False)
        self.out_dim = dim * (2 if use_tags else 1) + proj_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        parts = [self.id_emb(ids)]
        if self.tag_emb is not None:
            tags = self.item_tags[ids]  # (..., T)
            real = (tags != PAD_ID).unsqueeze(-1).to(parts[0].dtype)
            pooled = (self.tag_emb(tags) * real).sum(-2) / real.sum(-2).clamp(min=1.0)
            parts.append(pooled)
        parts.append(self.proj(self.item_vectors[ids]))
        return torch.cat(parts, dim=-1)


class SideEmbedding(nn.Module):
    """Scalar categorical side features → one D-wide field each.

    Args:
        dim: D.
        num_users: user embedding rows (0 disables the user field).

    Shape:
        likes (B,), views (B,), users (B,) long → (B, F_side, D)
    """

    def __init__(self, dim: int, num_users: int = 0) -> None:
        super().__init__()
        self.likes = nn.Embedding(LEVELS, dim)
        self.views = nn.Embedding(LEVELS, dim)
        self.user = nn.Embedding(num_users, dim) if num_users else None
        self.num_fields = 2 + (1 if num_users else 0)

    def forward(self, likes: torch.Tensor, views: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        fields = [self.likes(likes), self.views(views)]
        if self.user is not None:
            fields.append(self.user(users))
        return torch.stack(fields, dim=1)
