"""How close to the oracle can a model class get on the synthetic world? Ceilings from the planted terms (by hand).

    PYTHONPATH=. .venv/bin/python benchmarks/quality_ceiling.py --data DATA     # a `mmctr synth` output
    PYTHONPATH=. .venv/bin/python benchmarks/quality_ceiling.py --data DATA --vectors v4.parquet  # + a fused table
    PYTHONPATH=. .venv/bin/python benchmarks/quality_ceiling.py [--rows 200000] [--seed 2025]   # fresh rows

The oracle AUC in ``oracle.json`` scores the true click probabilities, which use terms no DIN-family model here can
see: the user's propensity ``b_u`` (no user-id field in the baseline), the recency weights of ``hsim`` (the DIN
attention has no position input: it sees the history as a set), and the collaborative factors ``v_i`` that only
item ids reveal (learnable only from clicks). This script rebuilds the world of a synthetic data set from its
``synth.json`` (or draws fresh rows from the default world), computes each planted term of every row from the
**true** latent content, fits a logistic regression on the train rows with the terms a model class could compute
at best, and prints its AUC on the valid rows, the ones ``mmctr train`` is scored on. Each
figure is a reference point for that class, not a strict bound: it takes the content similarity of every item pair
as known exactly, which a model must instead learn from noisy vectors, tags and 200k clicks, but a model may also
compute other functions of what it sees than these planted summaries (without a term, the best predictor is not in
general linear in the others), the decoding of the content from the vectors is linear, and the histories are read
whole (100 slots, where the baseline keeps 64). For ``item_emb_d128`` (and, with
``--vectors``, a `mmctr fuse` table) two more classes: tags + the content the vectors reveal, and the same + the
item-id factors, which a model with an item-id embedding can learn from clicks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mmctr_ray.data.synthetic import RECENCY_DECAY, SynthSpec, World, rng_for
from mmctr_ray.features import load_item_table
from mmctr_ray.schema import Layout


def decoded_content(world: World, vectors: np.ndarray) -> np.ndarray:
    """Unit content vectors as well as ``vectors`` (rows = item ids, 0 = padding) reveal them: the least-squares
    linear decoding of the true content, fitted on every item (a model learns from far less, though not only
    linearly)."""
    x = np.c_[vectors[1:], np.ones(len(vectors) - 1)]
    coef, *_ = np.linalg.lstsq(x, world.content[1:], rcond=None)
    out = np.zeros_like(world.content)
    out[1:] = x @ coef
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)


def planted_terms(world: World, rows: dict[str, np.ndarray],
                  given: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per row: content affinity (mean cosine), recency-weighted similarity, its position-free summaries, the
    collaborative term, the target's popularity, the topic-level versions (what tags alone reveal) and, with
    ``given`` (decoded content), the position-free summaries as the shipped vector reveals them."""
    seq, target = rows["item_seq"], rows["item_id"]
    mask = seq > 0
    length = mask.sum(1)
    if given is not None:
        gsims = np.einsum("nd,nkd->nk", given[target], given[seq]) * mask
    sims = np.einsum("nd,nkd->nk", world.content[target], world.content[seq]) * mask
    age = (seq.shape[1] - 1 - np.arange(seq.shape[1]))[None, :]
    recency = RECENCY_DECAY ** age * mask
    centre = np.zeros((len(world.content), world.topic_centres.shape[1]))
    centre[1:] = world.topic_centres[world.item_topic]
    topic_sims = np.einsum("nd,nkd->nk", centre[target], centre[seq]) * mask
    return {
        "affinity": sims.sum(1) / length,
        "hsim": (recency * sims).sum(1) / recency.sum(1),
        "max_sim": np.where(mask, sims, -np.inf).max(1),
        "sum_sim": sims.sum(1),
        "length": length.astype(float),
        "cf": (np.einsum("nd,nkd->nk", world.cf[target], world.cf[seq]) * mask).sum(1) / np.sqrt(length),
        "pop": world.pop[target],
        "topic_affinity": topic_sims.sum(1) / length,
        "topic_max": np.where(mask, topic_sims, -np.inf).max(1),
        **({} if given is None else {"given_affinity": gsims.sum(1) / length, "given_sum": gsims.sum(1),
                                     "given_max": np.where(mask, gsims, -np.inf).max(1)}),
    }


CLASSES = [  # (what the model class can compute, the terms it gets)
    ("every term but the user's propensity (exact content, positions, item-id factors)",
     ["affinity", "hsim", "cf", "pop"]),
    ("no positions (history as a set: DIN), item-id factors learnt exactly",
     ["affinity", "max_sim", "sum_sim", "length", "cf", "pop"]),
    ("no positions, no item-id factors (content and popularity only)",
     ["affinity", "max_sim", "sum_sim", "length", "pop"]),
    ("topic level only (tags), no positions, no item-id factors",
     ["topic_affinity", "topic_max", "length", "pop"]),
]
GIVEN_COLUMNS = ["topic_affinity", "topic_max", "given_affinity", "given_max", "given_sum", "length", "pop"]


def read_rows(data: Path, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    table = pq.read_table(Layout(data).split(split), columns=["item_seq", "item_id", "label"])
    seq = np.asarray(table.column("item_seq").combine_chunks().flatten()).reshape(table.num_rows, -1)
    return ({"item_seq": seq, "item_id": table.column("item_id").to_numpy()},
            table.column("label").to_numpy().astype(int))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a `mmctr synth` output: fit on its train rows, score its valid rows")
    ap.add_argument("--vectors", type=Path, help="with --data: a `mmctr fuse` table (item_id, item_emb) to judge too")
    ap.add_argument("--rows", type=int, default=200_000, help="without --data: rows drawn; half fit, half score")
    ap.add_argument("--seed", type=int, default=SynthSpec().seed, help="without --data: the world's seed")
    args = ap.parse_args()
    if args.data:
        meta = json.loads((args.data / "synth.json").read_text())
        world = World(SynthSpec(**meta["spec"]))
        (fit_rows, fit_y), (score_rows, score_y) = read_rows(args.data, "train"), read_rows(args.data, "valid")
        oracle = json.loads((args.data / "oracle.json").read_text())["valid"]["oracle_auc"]
        readings = {"item_emb_d128": load_item_table(args.data).vectors}
        if args.vectors:
            readings[args.vectors.name] = load_item_table(args.data, str(args.vectors)).vectors
        print(f"{args.data}: fit on {len(fit_y):,} train rows, AUC on {len(score_y):,} valid rows")
    else:
        world = World(SynthSpec(seed=args.seed))
        rows = world.sample_rows(rng_for(args.seed, 99), args.rows)  # a stream synth never uses
        labels = (rng_for(args.seed, 98).random(args.rows) < rows["prob"]).astype(int)
        half = args.rows // 2
        fit_rows, fit_y = {k: v[:half] for k, v in rows.items()}, labels[:half]
        score_rows, score_y = {k: v[half:] for k, v in rows.items()}, labels[half:]
        oracle = roc_auc_score(score_y, score_rows["prob"])
        readings = {}
        print(f"{args.rows:,} fresh rows of the default world (seed {args.seed}); AUC on the {len(score_y):,} held out")
    print(f"{'oracle (true probabilities)':<104} {oracle:.4f}")
    terms = {None: (planted_terms(world, fit_rows), planted_terms(world, score_rows))}  # per reading, computed once
    for reading, vectors in readings.items():
        given = decoded_content(world, vectors)
        terms[reading] = (planted_terms(world, fit_rows, given), planted_terms(world, score_rows, given))
    classes = [(name, cols, None) for name, cols in CLASSES]
    for reading in readings:
        classes += [(f"topics (tags) + content as {reading} reveals it (linear decoding), no positions, no id factors",
                     GIVEN_COLUMNS, reading),
                    ("  the same + item-id factors learnt exactly (what id embeddings add at best besides content)",
                     GIVEN_COLUMNS + ["cf"], reading)]
    for name, cols, reading in classes:
        fit_terms, score_terms = terms[reading]
        model = LogisticRegression(max_iter=2000).fit(np.column_stack([fit_terms[c] for c in cols]), fit_y)
        auc = roc_auc_score(score_y, model.decision_function(np.column_stack([score_terms[c] for c in cols])))
        print(f"{name:<104} {auc:.4f} ({auc - oracle:+.4f})")


if __name__ == "__main__":
    main()
