"""One group of users' interactions → training rows: split, history, negatives. Pure numpy, no Ray.

Every user's events arrive together (the pipeline groups by user). Within a user:

* events are ordered by (timestamp, item); a repeated (user, item) pair keeps its first occurrence only, so a
  target never appears in its own history;
* the history of an event is the user's items with a **strictly earlier** timestamp (ties are neither earlier
  nor later), the last ``SEQ_LEN`` of them, left-padded with 0, most recent last;
* the split is per-user leave-last-out (the last event is test, the one before valid, the rest train; a user
  with fewer than 3 events is train only) or a global time cut (``ts >= test_from`` test, ``>= valid_from``
  valid);
* events with fewer than ``min_history`` earlier items give no row (their items still enter later histories);
* each positive gets ``negatives`` rows sharing its history: items drawn by popularity, never an item the user
  interacted with (at any time) and never twice for one positive (rejection sampling; after MAX_ATTEMPTS
  rejections, one exact popularity draw over the user's unseen items). The draw for (user, position, slot,
  attempt) is a hash of those numbers and the seed, so the result does not depend on how users were grouped,
  on block boundaries or on parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmctr_ray.errors import ConfigError, DataError
from mmctr_ray.schema import SEQ_LEN

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_CODES = {"train": TRAIN, "valid": VALID, "test": TEST}
MAX_ATTEMPTS = 32  # rejection draws per negative slot before an exact draw over the user's unseen items


@dataclass(frozen=True)
class RowSpec:
    """How events become rows.

    Attributes:
        negatives: sampled negatives per positive (k >= 1).
        seed: seed of the negative draws and of the row order within a chunk (>= 0).
        split: ``last`` (per-user leave-last-out) or ``time`` (global cut at ``valid_from`` / ``test_from``).
        valid_from, test_from: timestamps (raw units, ms for pairs) of the time cut.
        min_history: an event needs at least this many earlier items to become a row.
    """

    negatives: int = 3
    seed: int = 2025
    split: str = "last"
    valid_from: int | None = None
    test_from: int | None = None
    min_history: int = 1

    def __post_init__(self) -> None:
        if self.negatives < 1:  # raw interactions are clicks only: without sampled non-clicks no split can rank
            raise ConfigError(f"convert: --negatives must be >= 1 (every row would be a click, and validation AUC "
                              f"needs non-clicks), got {self.negatives}")
        if self.seed < 0:
            raise ConfigError(f"convert: --seed must be >= 0, got {self.seed}")
        if not 0 <= self.min_history <= SEQ_LEN:
            raise ConfigError(f"convert: --min-history must be in 0..{SEQ_LEN}, got {self.min_history}")
        if self.split not in ("last", "time"):
            raise ConfigError(f"convert: --split must be 'last' or 'time', got {self.split!r}")
        if self.split == "time" and (self.valid_from is None or self.test_from is None
                                     or self.valid_from >= self.test_from):
            raise ConfigError("convert: --split time needs --valid-from < --test-from (timestamps; equal ones leave "
                              "the valid split empty)")
        if self.split == "last" and (self.valid_from is not None or self.test_from is not None):
            raise ConfigError("convert: --valid-from/--test-from cut --split time only; with --split last (the "
                              "default) they would be ignored: add --split time, or drop them")


@dataclass(frozen=True)
class Lookups:
    """Item- and user-level arrays every group reads (broadcast once through the object store)."""

    users: np.ndarray  # (U,) sorted raw user ids: dense user id = position + 1
    item_raw: np.ndarray  # (N,) sorted raw item ids: dense item id = position + 1
    item_cum: np.ndarray  # (N,) cumulative negative-sampling weight of items 1..N
    likes_level: np.ndarray  # (N+1,) levels 0..9 by item id (0 = padding)
    views_level: np.ndarray


_U64 = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def hash_u64(seed: int, raw_user: np.ndarray, *more: np.ndarray | int) -> np.ndarray:
    """A uint64 hash of (seed, raw user, more...) per element."""
    h = _mix(np.asarray(raw_user, dtype=np.int64).view(np.uint64) ^ _mix(_U64(seed)))
    for m in more:
        h = _mix(h ^ (_U64(m) if isinstance(m, int) else np.asarray(m, dtype=np.int64).view(np.uint64)))
    return h


def uniform(seed: int, raw_user: np.ndarray, position: np.ndarray, slot: int, attempt: int) -> np.ndarray:
    """Uniform [0, 1) draws, one per element, fixed by (seed, raw user, position, slot, attempt)."""
    h = hash_u64(seed, raw_user, position, (slot << 16) | attempt)
    return (h >> _U64(11)).astype(np.float64) * 2.0 ** -53


def sort_events(user: np.ndarray, raw_user: np.ndarray, item: np.ndarray,
                ts: np.ndarray) -> tuple[np.ndarray, ...]:
    """Events ordered by (user, ts, item) with repeated (user, item) pairs reduced to their first occurrence."""
    order = np.lexsort((ts, item, user))
    u, i = user[order], item[order]
    first = np.r_[True, (u[1:] != u[:-1]) | (i[1:] != i[:-1])]
    order = order[first]
    order = order[np.lexsort((item[order], ts[order], user[order]))]
    return user[order], raw_user[order], item[order], ts[order]


def _in_sorted(sorted_keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    i = np.searchsorted(sorted_keys, q).clip(0, max(len(sorted_keys) - 1, 0))
    return sorted_keys[i] == q if len(sorted_keys) else np.zeros(len(q), dtype=bool)


def build_rows(user: np.ndarray, raw_user: np.ndarray, item: np.ndarray, ts: np.ndarray, spec: RowSpec,
               lk: Lookups) -> dict[str, np.ndarray]:
    """Rows of whole users' events (sorted by :func:`sort_events`): positives, each followed by its negatives.

    Returns columns ``user_id``, ``item_seq`` (R, SEQ_LEN), ``item_id``, ``likes_level``, ``views_level``,
    ``label`` (float64) and ``split`` (int8 codes TRAIN/VALID/TEST).
    """
    n = len(item)
    new_user = np.r_[True, user[1:] != user[:-1]]
    first = np.flatnonzero(new_user)
    which = np.cumsum(new_user) - 1
    start = first[which]  # index of the user's first event
    length = np.diff(np.r_[first, n])[which]
    pos = np.arange(n) - start
    new_tie = new_user | np.r_[True, ts[1:] != ts[:-1]]
    tie = np.flatnonzero(new_tie)[np.cumsum(new_tie) - 1]  # first event with the same (user, ts)
    if spec.split == "last":
        back = length - 1 - pos
        split = np.where(length >= 3, np.select([back == 0, back == 1], [TEST, VALID], TRAIN), TRAIN)
    else:
        split = np.select([ts >= spec.test_from, ts >= spec.valid_from], [TEST, VALID], TRAIN)
    rows = np.flatnonzero(np.minimum(tie - start, SEQ_LEN) >= spec.min_history)
    idx = tie[rows, None] - SEQ_LEN + np.arange(SEQ_LEN)  # (P, SEQ_LEN) event indices, most recent last
    seq = np.where(idx >= start[rows, None], item[idx.clip(0)], 0)
    k = spec.negatives
    negs = sample_negatives(user, raw_user, item, pos, rows, spec, lk)  # (P, k)
    target = np.column_stack([item[rows], negs]).ravel()
    out = {
        "user_id": np.repeat(user[rows], k + 1), "item_seq": np.repeat(seq, k + 1, axis=0), "item_id": target,
        "likes_level": lk.likes_level[target], "views_level": lk.views_level[target],
        "label": np.tile(np.r_[1.0, np.zeros(k)], len(rows)),
        "split": np.repeat(split[rows], k + 1).astype(np.int8),
    }
    if len(rows):  # mix users within the chunk (training reads in file order through a local shuffle buffer)
        perm = np.random.default_rng([spec.seed, int(hash_u64(spec.seed, raw_user[:1])[0])]).permutation(len(target))
        out = {name: col[perm] for name, col in out.items()}
    return out


def sample_negatives(user: np.ndarray, raw_user: np.ndarray, item: np.ndarray, pos: np.ndarray, rows: np.ndarray,
                     spec: RowSpec, lk: Lookups) -> np.ndarray:
    """(len(rows), k) negative items for the positives ``rows``: by popularity, outside the user's items."""
    n_items = len(lk.item_raw)
    space = n_items + 1
    owned = np.sort(user * space + item)  # every (user, item) of these users
    base = user[rows] * space
    out = np.zeros((len(rows), spec.negatives), dtype=np.int64)
    total = lk.item_cum[-1]
    for slot in range(spec.negatives):
        todo = np.arange(len(rows))
        for attempt in range(MAX_ATTEMPTS):
            if not len(todo):
                break
            r = rows[todo]
            x = uniform(spec.seed, raw_user[r], pos[r], slot, attempt) * total
            cand = (np.searchsorted(lk.item_cum, x, side="right") + 1).clip(1, n_items)
            bad = _in_sorted(owned, base[todo] + cand) | (out[todo, :slot] == cand[:, None]).any(axis=1)
            out[todo[~bad], slot] = cand[~bad]
            todo = todo[bad]
        for t in todo:  # rare: the user's items hold most of the popularity mass
            out[t, slot] = _exact_draw(owned, base[t], out[t, :slot], lk.item_cum, spec, raw_user[rows[t]],
                                       pos[rows[t]], slot)
    return out


def _exact_draw(owned: np.ndarray, base: int, taken: np.ndarray, item_cum: np.ndarray, spec: RowSpec,
                raw_user: int, position: int, slot: int) -> int:
    """One popularity-weighted draw restricted to the items the user never touched (uniform if none is popular).

    Raises:
        DataError: the user touched so many items that fewer than ``spec.negatives`` are left (the conversion's
            bucket task hands it to the driver, which says it as one line naming the interactions file).
    """
    n_items = len(item_cum)
    lo, hi = np.searchsorted(owned, [base + 1, base + n_items + 1])
    touched = owned[lo:hi] - base  # distinct: sort_events keeps one event per (user, item)
    allowed = np.setdiff1d(np.arange(1, n_items + 1), np.r_[touched, taken])
    if not len(allowed):
        left = n_items - len(touched)
        raise DataError(f"user {raw_user} interacted with {len(touched):,} of the {n_items:,} items, which leaves "
                        f"{left:,} to draw --negatives {spec.negatives} non-clicks per click from; lower --negatives"
                        + (f" to at most {left}" if left else "") + " or leave this user out")
    weight = np.diff(np.r_[0.0, item_cum])[allowed - 1]
    cum = np.cumsum(weight if weight.sum() > 0 else np.ones(len(allowed)))
    u = uniform(spec.seed, np.array([raw_user]), np.array([position]), slot, MAX_ATTEMPTS)[0]
    return int(allowed[min(int(np.searchsorted(cum, u * cum[-1], side="right")), len(allowed) - 1)])
