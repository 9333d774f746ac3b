"""A synthetic MicroLens world with a planted click model whose oracle AUC is known.

The public MicroLens download is broken, so tests and the demo run on data written by this module in
exactly the challenge layout (see :mod:`mmctr_ray.schema`). The point of the planted model is that the
method's levers can be measured: a model that reads the history and the multimodal item vectors must be
able to beat one that does not, and no model can beat the oracle in expectation (on a finite split a model
close to it may score above it by chance).

The world (all drawn from one seed):

* Items. Each item ``i`` has a topic ``z_i`` (topic sizes are Zipf-like), a unit **content** vector
  ``c_i = [c_a ‖ c_b]`` (8 + 8 dims) near its topic's centre (spread ``CONTENT_NOISE``), a
  **collaborative** factor ``v_i`` (8 dims) that only the item id reveals, and a **popularity** ``pop_i``
  (standard normal). ``likes_level`` and ``views_level`` are deciles (0..9) of two independent noisy readings
  of ``pop_i``; tags come from a block of the tag vocabulary owned by the topic; titles mix topic words and
  common words.
* Content is never shipped as such, only through noisy projections:
  ``txt_emb_BERT`` (768) sees ``c_a`` strongly and ``c_b`` weakly, ``img_emb_CLIPRN50`` (1024) and the cover
  image see ``c_b`` strongly and ``c_a`` weakly, ``item_emb_d128`` sees both through heavier noise. Each also
  carries nuisance directions of comparable variance that do not affect clicks. So text and image are
  complementary (the V4 strategy's premise) and the given 128-d vector is the weakest reading.
* Users. User ``u`` has three favourite topics with weights 0.55/0.25/0.12 (0.08 left for any topic), a
  click propensity ``b_u ~ N(0, 1)`` and an activity weight (log-normal) that decides how many rows are hers.

A row (one impression) draws a user by activity, a **current intent** topic from her mixture, and a history
length ``L = clip(3 + round(exp(N(ln 3, 1))), 3, 100)`` (median 6, mean ~8, max 100, like the real data).
History slots are drawn by topic (the intent topic with probability 0.6 in the three most recent slots, 0.2
before; otherwise her mixture), then by popularity within the topic. The target is an item of the intent
topic with probability 0.5, otherwise any item by popularity. The click probability reads the user's tastes
through what she clicked before (her history), as a CTR model must::

    logit = b0 + 0.3·b_u + 3.0·affinity + 5.0·hsim + 1.0·cf + 0.4·pop_t
    affinity = mean_j cos(c_t, c_hj)                               user–item content affinity
    hsim     = Σ_j 0.7^age_j · cos(c_t, c_hj) / Σ_j 0.7^age_j        short-term interest (age 0 = most recent)
    cf       = Σ_j (v_t · v_hj) / sqrt(L)                          collaborative affinity (item ids only)

with ``b0`` solved (by bisection on a calibration sample) so that about 25% of rows are positives. The label is
a Bernoulli draw of ``sigmoid(logit)``; the AUC of those true probabilities is the oracle written to
``oracle.json``. Only ``b_u`` is out of reach of a model without a user-id field. Contents sit close to their
topic centre (spread 0.2 per dimension), so the topic, which the tags reveal, carries most of the content
similarity and the multimodal vectors add the rest. Measured on 40k rows of the default world: oracle AUC
0.891; the true logit without ``b_u`` 0.888 (the best a model without user ids can do), without ``cf`` 0.883;
the same terms computed from topics alone (what tags give) 0.837; the target's popularity alone 0.574. A model
that sees the history as a set, as the DIN attention does, cannot weigh it by recency, and one that reads the
content through ``item_emb_d128`` sees it through noise: ``benchmarks/quality_ceiling.py`` gives the ceiling of
each such class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmctr_ray.errors import ConfigError
from mmctr_ray.schema import LEVELS, SEQ_LEN, TAGS_LEN

MAX_LIST_VALUES = 2**31 - 1  # ids one Arrow list array can hold (int32 offsets)

K_A = 8  # content dims seen mainly by text
K_B = 8  # content dims seen mainly by image
K_CF = 8  # collaborative dims (id only)
N_NUISANCE = 8  # per-modality nuisance dims
TOPIC_MIX = np.array([0.55, 0.25, 0.12])  # rest (0.08) is uniform over topics
RECENT_SLOTS = 3
INTENT_P_RECENT, INTENT_P_OLD = 0.6, 0.2
RECENCY_DECAY = 0.7
W_PREF, W_CF, W_HIST, W_POP = 3.0, 1.0, 5.0, 0.4
USER_BIAS_STD = 0.3
CONTENT_NOISE = 0.2  # per-dimension spread of an item's content around its topic centre
TARGET_POSITIVE_RATE = 0.25


MAX_COUNT = 2**40  # users, items or rows: beyond any machine's memory, and within numpy's int64
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class SynthSpec:
    """Sizes and seed of a synthetic data set (defaults: small, runs in seconds).

    Attributes:
        users: number of users (ids 1..users).
        items: number of items N (ids 1..N; 0 is padding).
        train_rows, valid_rows, test_rows: split sizes.
        tags: tag vocabulary size (tag ids 1..tags).
        topics: number of latent topics.
        image_size: side of the square JPEG covers in pixels; 0 writes no covers.
        seed: the one seed everything is drawn from.
        chunk_rows: rows generated and written at a time (bounds memory); also part of what the data is, as the
            seed: each chunk draws from its own random stream, so another value draws other rows.
    """

    users: int = 5_000
    items: int = 2_000
    train_rows: int = 200_000
    valid_rows: int = 5_000
    test_rows: int = 5_000
    tags: int = 600
    topics: int = 24
    image_size: int = 32
    seed: int = 2025
    chunk_rows: int = 100_000

    def __post_init__(self) -> None:
        for name in ("users", "items", "train_rows", "valid_rows", "test_rows", "chunk_rows"):
            if not 1 <= getattr(self, name) <= MAX_COUNT:  # 1e20 was numpy's OverflowError traceback
                raise ConfigError(f"synth: --{name.replace('_', '-')} must be in 1..{MAX_COUNT:,}, got "
                                  f"{getattr(self, name):,}")
        if self.chunk_rows * SEQ_LEN > MAX_LIST_VALUES:  # a chunk's histories are one Arrow list array: past
            # its int32 offsets the write failed ("Negative offsets") after the chunk was generated
            raise ConfigError(f"synth: --chunk-rows must be at most {MAX_LIST_VALUES // SEQ_LEN:,} (a chunk's "
                              f"{SEQ_LEN} history ids per row fill one Arrow list), got {self.chunk_rows:,}")
        if not 1 <= self.topics <= self.items:
            raise ConfigError(f"synth: --topics must be in 1..--items ({self.items}), got {self.topics}"
                              + (" (the default): pass --topics too" if self.topics == SynthSpec.topics else ""))
        if self.tags < 5 * self.topics:
            raise ConfigError(f"synth: --tags must be >= 5 per topic ({5 * self.topics}), got {self.tags}")
        if not 0 <= self.image_size <= MAX_IMAGE_SIZE:  # 100,000 px asked numpy for 149 GiB: a traceback
            raise ConfigError(f"synth: --images must be in 0..{MAX_IMAGE_SIZE} pixels (a cover's side; CLIP reads "
                              f"224), got {self.image_size:,}")
        if self.seed < 0:
            raise ConfigError(f"synth: --seed must be >= 0, got {self.seed}")


PRESETS: dict[str, dict[str, int]] = {
    "small": {},
    # the row counts of the challenge's MicroLens_1M_x1
    "1m": dict(users=1_000_000, items=91_717, train_rows=3_600_000, valid_rows=10_000, test_rows=379_142,
               tags=11_740, topics=64),
}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def deciles(x: np.ndarray) -> np.ndarray:
    """Levels 0..9: the decile of each value within ``x``."""
    ranks = np.argsort(np.argsort(x, kind="stable"), kind="stable")
    return (ranks * LEVELS // len(x)).astype(np.int64)


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator for one named stream of the world (same seed → same draws)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


class World:
    """Every latent quantity of one synthetic data set; rows are drawn from it chunk by chunk."""

    def __init__(self, spec: SynthSpec) -> None:
        self.spec = spec
        rng = rng_for(spec.seed, 1)
        n, t = spec.items, spec.topics
        self.topic_centres = _unit(rng.standard_normal((t, K_A + K_B)))
        topic_p = 1.0 / np.arange(1, t + 1) ** 0.8
        topic_p /= topic_p.sum()
        # every topic gets at least one item; the rest by the Zipf-like sizes
        topic = np.concatenate([np.arange(t), rng.choice(t, size=n - t, p=topic_p)])
        self.item_topic = np.sort(topic)  # items of one topic are contiguous ids
        # index 0 = padding item: zero content, never sampled
        self.content = np.zeros((n + 1, K_A + K_B))
        spread = CONTENT_NOISE * rng.standard_normal((n, K_A + K_B))
        self.content[1:] = _unit(self.topic_centres[self.item_topic] + spread)
        self.cf = np.zeros((n + 1, K_CF))
        self.cf[1:] = rng.standard_normal((n, K_CF)) / np.sqrt(K_CF)
        self.pop = np.zeros(n + 1)
        self.pop[1:] = rng.standard_normal(n)
        self.likes_level = np.zeros(n + 1, dtype=np.int64)
        self.views_level = np.zeros(n + 1, dtype=np.int64)
        self.likes_level[1:] = deciles(self.pop[1:] + 0.5 * rng.standard_normal(n))
        self.views_level[1:] = deciles(self.pop[1:] + 0.5 * rng.standard_normal(n))
        weight = np.exp(1.2 * self.pop[1:])
        self.topic_start = np.searchsorted(self.item_topic, np.arange(t + 1))  # item offsets (0-based)
        self.cum_weight = np.concatenate([[0.0], np.cumsum(weight)])  # over items 1..n
        self._make_users(rng_for(spec.seed, 2), topic_p)
        self.bias = 0.0
        self.bias = self._calibrate_bias()

    def _make_users(self, rng: np.random.Generator, topic_p: np.ndarray) -> None:
        u, t = self.spec.users, self.spec.topics
        self.user_topics = np.stack([rng.choice(t, size=u, p=topic_p) for _ in range(3)], axis=1)
        self.user_bias = rng.standard_normal(u)
        activity = np.exp(0.8 * rng.standard_normal(u))
        self.user_cum = np.cumsum(activity) / activity.sum()

    def _items_by_popularity(self, rng: np.random.Generator, topics: np.ndarray | None, size: int) -> np.ndarray:
        """Item ids (1..N) drawn by popularity, within the given topics (or among all items)."""
        if topics is None:
            lo, hi = np.zeros(size), np.full(size, self.cum_weight[-1])
        else:
            lo = self.cum_weight[self.topic_start[topics]]
            hi = self.cum_weight[self.topic_start[topics + 1]]
        x = lo + rng.random(size) * (hi - lo)
        idx = np.searchsorted(self.cum_weight, x, side="right")  # 1..n
        return np.clip(idx, 1, self.spec.items).astype(np.int64)

    def _mixture_topics(self, rng: np.random.Generator, users: np.ndarray) -> np.ndarray:
        r = rng.random(len(users))
        which = np.searchsorted(np.cumsum(TOPIC_MIX), r, side="right")  # 0..3; 3 = uniform
        anyt = rng.integers(0, self.spec.topics, size=len(users))
        fav = self.user_topics[users, np.minimum(which, 2)]
        return np.where(which == 3, anyt, fav)

    def sample_rows(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """Draw ``n`` impressions: user (0-based), history matrix (n, 100), target, true click probability."""
        users = np.searchsorted(self.user_cum, rng.random(n), side="right").clip(0, self.spec.users - 1)
        intent = self._mixture_topics(rng, users)
        lengths = np.clip(3 + np.rint(np.exp(np.log(3.0) + rng.standard_normal(n))), 3, SEQ_LEN).astype(np.int64)
        # flat layout of the real history slots: row r owns lengths[r] consecutive entries, oldest first
        row = np.repeat(np.arange(n), lengths)
        starts = np.cumsum(lengths) - lengths
        age = (lengths[row] - 1) - (np.arange(len(row)) - starts[row])  # 0 = most recent
        p_intent = np.where(age < RECENT_SLOTS, INTENT_P_RECENT, INTENT_P_OLD)
        slot_topic = np.where(rng.random(len(row)) < p_intent, intent[row], self._mixture_topics(rng, users[row]))
        hist = self._items_by_popularity(rng, slot_topic, len(row))
        target = np.where(rng.random(n) < 0.5, self._items_by_popularity(rng, intent, n),
                          self._items_by_popularity(rng, None, n))
        seq = np.zeros((n, SEQ_LEN), dtype=np.int64)
        seq[row, SEQ_LEN - 1 - age] = hist  # left-padded, most recent last
        w = RECENCY_DECAY ** age
        sims = np.einsum("kd,kd->k", self.content[target[row]], self.content[hist])
        hsim = np.bincount(row, weights=w * sims, minlength=n) / np.bincount(row, weights=w, minlength=n)
        affinity = np.bincount(row, weights=sims, minlength=n) / lengths
        cf = np.bincount(row, weights=np.einsum("kd,kd->k", self.cf[target[row]], self.cf[hist]),
                         minlength=n) / np.sqrt(lengths)
        logit = (self.bias + USER_BIAS_STD * self.user_bias[users] + W_PREF * affinity + W_CF * cf
                 + W_HIST * hsim + W_POP * self.pop[target])
        prob = 1.0 / (1.0 + np.exp(-logit))
        return {"user": users, "item_seq": seq, "item_id": target, "logit": logit, "prob": prob}

    def _calibrate_bias(self, n: int = 20_000) -> float:
        """``b0`` such that the mean click probability is TARGET_POSITIVE_RATE (bisection, fixed sample)."""
        base = self.sample_rows(rng_for(self.spec.seed, 3), n)["logit"] - self.bias
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            rate = np.mean(1.0 / (1.0 + np.exp(-(base + mid))))
            lo, hi = (mid, hi) if rate < TARGET_POSITIVE_RATE else (lo, mid)
        return (lo + hi) / 2

    def item_tags(self, rng: np.random.Generator) -> np.ndarray:
        """(N+1, 5) tag ids, left-padded with 0: 1..5 distinct tags from the topic's block of the vocabulary."""
        n, t = self.spec.items, self.spec.topics
        block = self.spec.tags // t
        start = 1 + self.item_topic * block
        offset = rng.integers(0, block, size=n)
        stride = rng.integers(1, max(1, (block - 1) // (TAGS_LEN - 1)) + 1, size=n)  # 4·stride < block: distinct
        tags = start[:, None] + (offset[:, None] + np.arange(TAGS_LEN)[None, :] * stride[:, None]) % block
        count = rng.choice(np.arange(1, TAGS_LEN + 1), size=n, p=[0.15, 0.25, 0.25, 0.2, 0.15])
        tags[np.arange(TAGS_LEN)[None, :] < (TAGS_LEN - count)[:, None]] = 0
        out = np.zeros((n + 1, TAGS_LEN), dtype=np.int64)
        out[1:] = tags
        return out
