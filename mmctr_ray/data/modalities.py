"""What a synthetic item shows of its hidden content: shipped embeddings, a title and a cover image.

See :mod:`mmctr_ray.data.synthetic` for the world. Each modality reads a latent vector
``s = [a·c_a ‖ b·c_b ‖ nuisance]`` through a fixed random projection plus isotropic noise; the nuisance
directions (std 0.35, larger than a content coordinate's ~0.25) do not affect clicks, so a PCA that keeps too
few components keeps mostly nuisance.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mmctr_ray.data.synthetic import K_A, K_B, N_NUISANCE, World, rng_for
from mmctr_ray.schema import BERT_DIM, CLIP_DIM, GIVEN_EMB_DIM

NUISANCE_STD = 0.35
COVER_PIXELS = 1 << 20  # covers rendered at once, in pixels: float64 arrays of (covers, S, S, 3), ~25 MB each


@dataclass(frozen=True)
class Modality:
    """One noisy reading of content: weights on (c_a, c_b), output width, noise std, stream id."""

    name: str
    w_a: float
    w_b: float
    dim: int
    noise: float
    stream: int


TEXT = Modality("txt_emb_BERT", 1.0, 0.25, BERT_DIM, 1.0, 20)
IMAGE = Modality("img_emb_CLIPRN50", 0.25, 1.0, CLIP_DIM, 1.0, 21)
GIVEN = Modality("item_emb_d128", 0.6, 0.6, GIVEN_EMB_DIM, 1.5, 22)
MODALITIES = (TEXT, IMAGE, GIVEN)

_ADJ = ("quiet red tiny golden wild urban cozy rapid lazy bright dark funny epic gentle frozen sunny "
        "secret hidden lucky crazy vintage modern classic silent brave happy simple magic rainy").split()
_NOUN = ("cat dog kitchen guitar street forest beach city coffee recipe dance song game car bike garden "
         "river mountain puppy robot camera painting market train festival ocean night morning sky desert "
         "bakery library piano soccer basketball yoga makeup fashion sneaker phone laptop movie drama comedy "
         "travel hiking camping fishing noodle pizza sushi cake tea flower tree bird horse snow rain storm "
         "school office party wedding baby family friend teacher chef artist singer dancer farmer").split()
_FILLER = "the a of my in with at and for on to from".split()
_TAIL = ("vlog challenge tutorial review tips moments highlights story diary guide compilation "
         "reaction unboxing live part").split()


class ItemRenderer:
    """Draws the observable side of items from a :class:`World`, chunk by chunk, deterministically."""

    def __init__(self, world: World) -> None:
        self.world = world
        seed = world.spec.seed
        k = K_A + K_B + N_NUISANCE
        self._proj = {m.name: rng_for(seed, m.stream).standard_normal((k, m.dim)) / np.sqrt(k) for m in MODALITIES}
        self._mean = {m.name: 0.1 * rng_for(seed, m.stream, 1).standard_normal(m.dim) for m in MODALITIES}
        rng = rng_for(seed, 23)
        self._topic_words = [rng.choice(len(_NOUN) + len(_ADJ), size=10, replace=False)
                             for _ in range(world.spec.topics)]

    def embeddings(self, m: Modality, ids: np.ndarray, chunk: int) -> np.ndarray:
        """(len(ids), m.dim) float32 vectors for item ids ``ids`` (all >= 1)."""
        rng = rng_for(self.world.spec.seed, m.stream, 2, chunk)
        c = self.world.content[ids]
        nuisance = NUISANCE_STD * rng.standard_normal((len(ids), N_NUISANCE))
        s = np.concatenate([m.w_a * c[:, :K_A], m.w_b * c[:, K_A:], nuisance], axis=1)
        noise = m.noise * rng.standard_normal((len(ids), m.dim)) / np.sqrt(K_A + K_B + N_NUISANCE)
        return (s @ self._proj[m.name] + noise + self._mean[m.name]).astype(np.float32)

    def titles(self, ids: np.ndarray, chunk: int) -> list[str]:
        """English-like titles: topic words carry content; fillers and tails carry none."""
        rng = rng_for(self.world.spec.seed, 24, chunk)
        vocab = _NOUN + _ADJ
        out = []
        for i in ids:
            words = self._topic_words[self.world.item_topic[i - 1]]
            picks = [vocab[j] for j in rng.choice(words, size=rng.integers(2, 5))]
            if rng.random() < 0.5:
                picks.insert(int(rng.integers(1, len(picks) + 1)), str(rng.choice(_FILLER)))
            picks.append(str(rng.choice(_TAIL)))
            out.append(" ".join(picks).capitalize())
        return out

    def covers(self, ids: np.ndarray, chunk: int, size: int) -> list[bytes]:
        """JPEG bytes of square covers: colours and stripes read c_b strongly, brightness reads c_a weakly.
        Rendered :data:`COVER_PIXELS` at a time (a chunk of 8,192 covers at 224 px took ~30 GB at once); the
        noise is drawn from the chunk's stream in item order either way, so the bytes do not depend on it."""
        rng = rng_for(self.world.spec.seed, 25, chunk)
        yy, xx = np.mgrid[0:size, 0:size] / max(size, 1)
        out = []
        step = max(1, COVER_PIXELS // max(size * size, 1))
        for lo in range(0, len(ids), step):
            c = self.world.content[ids[lo:lo + step]] * 4.0  # coordinates ~N(0, 1)
            cb, ca = c[:, K_A:], c[:, :K_A]
            bg = 255 / (1 + np.exp(-cb[:, 0:3]))  # (m, 3)
            fg = 255 / (1 + np.exp(-cb[:, 5:8]))
            theta = np.pi / (1 + np.exp(-cb[:, 3]))
            freq = 1.5 + 4.5 / (1 + np.exp(-cb[:, 4]))
            phase = xx[None] * np.cos(theta)[:, None, None] + yy[None] * np.sin(theta)[:, None, None]
            stripe = (np.sin(2 * np.pi * freq[:, None, None] * phase) > 0)[..., None]  # (m, S, S, 1)
            img = np.where(stripe, fg[:, None, None, :], bg[:, None, None, :])
            img = img * (0.85 + 0.15 / (1 + np.exp(-ca[:, 0])))[:, None, None, None]
            img = img + 8.0 * rng.standard_normal(img.shape)
            for p in np.clip(np.rint(img), 0, 255).astype(np.uint8):
                buf = io.BytesIO()
                Image.fromarray(p).save(buf, format="JPEG", quality=85)
                out.append(buf.getvalue())
        return out
