"""``mmctr predict``: score a split with Ray Data and write the challenge submission.

The submission is a zip holding ``prediction.csv`` with header ``ID,Task2``: ``ID`` is the row's position in
the split (0..N-1, in file order) and ``Task2`` its predicted click probability, clipped into (0, 1). The column
names the challenge track the submission enters (:data:`TASKS`): ``Task2`` (CTR models), ``Task1`` (item
embeddings, scored through a downstream model the challenge fixes: :func:`task1_departures`) or ``Task1&2``. Scoring
runs in a pool of actors (the model is loaded once per actor from the run's best checkpoint, downloaded first
when the run is a storage URI; the item table is rebuilt from the data directory); the split is read by Ray
Data's V1 Parquet reader whatever its size (``read_split(ordered=True)``: V2 reads a large split out of row order)
and ``preserve_order`` keeps its rows in file order. The run may be a local path or a storage URI; data and
submission are local paths.
"""

from __future__ import annotations

import io
import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmctr_ray import storage
from mmctr_ray.checkpoint import PREFIX, load_checkpoint, run_or_checkpoint
from mmctr_ray.config import ExperimentConfig, effective_differences, value_text
from mmctr_ray.errors import ConfigError, DataError, OutputExistsError
from mmctr_ray.features import MODEL_INPUTS, check_same_table, load_item_table, max_user_id, read_split, to_model_batch
from mmctr_ray.host_malloc import actor_options
from mmctr_ray.metrics import evaluate_logits, to_probabilities
from mmctr_ray.model import DINModel
from mmctr_ray.preflight import check_split
from mmctr_ray.ray_env import actor_device, check_actors, cpu_threads
from mmctr_ray.schema import GIVEN_EMB_DIM, TASKS, Layout, parquet_parts
from mmctr_ray.storage import Location
from mmctr_ray.training import logits_of

log = logging.getLogger(__name__)

# The challenge's tracks (schema.TASKS) are the submission's column. The organisers' own baseline wrote Task1:
# Task 1 ranks item embeddings by the click predictions of a downstream model it fixes.
# What Task 1 lets an entry tune in that fixed model, the challenge baseline's DIN (configs/baseline.yaml, this
# project's defaults), besides the item vectors themselves: FuxiCTR's embedding_regularizer, net_regularizer,
# net_dropout, learning_rate and batch_size, as this project names them. The vectors are the entry: their scale
# (model.item_vector_rms) is theirs; their width is the fixed model's input, item_emb_d128's.
TASK1_FREE = ("train.embedding_l2", "train.weight_decay", "model.dropout", "train.lr", "train.batch_size",
              "model.item_vector_rms")
TASK1_TRAIN = ("optimizer", "lr_decay", "min_lr", "patience", "grad_clip")  # the fixed schedule; the rest of train
# (precision, shuffle buffer, epochs, seed, ...) is how a run is carried out, not the model


def task1_departures(cfg: ExperimentConfig, vector_dim: int) -> list[str]:
    """Where a run's model departs from the one Task 1 fixes (the challenge baseline's DIN, with the history length
    and schedule of its config), beyond :data:`TASK1_FREE` and keys without effect in either (a module's knobs
    where it is off: :func:`~mmctr_ray.config.inert_keys`): ``["model.senet true (fixed: false)", ...]``; empty
    for a run Task 1 admits. ``vector_dim``: the width of the item vectors the run was trained on."""
    fixed = {"data.max_len", *(f"train.{k}" for k in TASK1_TRAIN)}
    out = [f"{key} {value_text(ran)} (fixed: {value_text(base)})"
           for key, (ran, base) in effective_differences(cfg, ExperimentConfig()).items()
           if (key in fixed or key.startswith("model.")) and key not in TASK1_FREE]
    if vector_dim != GIVEN_EMB_DIM:
        out.append(f"item vectors {vector_dim} wide (fixed: {GIVEN_EMB_DIM}, as item_emb_d128)")
    return out


def warn_task1(cfg: ExperimentConfig, vector_dim: int, task: str, what: str, written: str) -> None:
    """Warn when a submission for Task 1 (``Task1``, ``Task1&2``) comes from a model Task 1 does not admit (``cfg``
    and ``vector_dim``, of ``what``): the file is written all the same (``written``: when; a trial of another
    model is the user's to make), but it is no Task 1 entry."""
    if task == "Task2":
        return
    found = task1_departures(cfg, vector_dim)
    if found:
        log.warning("--task %s: Task 1 scores item embeddings through a downstream model the challenge fixes (the "
                    "baseline DIN, configs/baseline.yaml; free: %s), and %s departs from it: %s; the submission %s, "
                    "but it is no Task 1 entry (--task Task2 enters the CTR-model track)", task,
                    ", ".join(TASK1_FREE), what, "; ".join(found), written)


def load_model(checkpoint_dir: Location, data_dir: str | Path, device: str = "cpu") -> DINModel:
    """The checkpoint's model over the item table rebuilt from ``data_dir``, in eval mode; its
    ``experiment_cfg`` attribute holds the checkpoint's config (history length, validation precision).

    Raises:
        DataError: the data's items or vectors do not match what the checkpoint was trained on.
    """
    ck = load_checkpoint(checkpoint_dir, with_optimizer=False)
    source = ck.item_source
    vector = source["file"] if source.get("item_vector") == "fused" else "given"
    if vector != "given" and not storage.is_uri(checkpoint_dir):  # a trial's search or a pipeline's OUT moved
        from mmctr_ray.tune_report import table_of_run

        vector = table_of_run(vector, Path(checkpoint_dir).parent)
    table = load_item_table(data_dir, vector)
    found = {"num_items": table.num_items, "tag_vocab": table.tag_vocab}
    for key, value in found.items():
        expected = getattr(ck.fmap, key)
        if value > expected or (key != "tag_vocab" and value != expected):
            raise DataError(f"{checkpoint_dir}: checkpoint was trained with {key}={expected} but {data_dir} has "
                            f"{value} (a checkpoint of other data)")
    # the same sizes: are they the same items? And a fused table rewritten since (at another width too) is named as
    # such, before its width is compared: that said "DATA has 16", of a data set that had not changed
    check_same_table(source, table.source, str(checkpoint_dir))
    if table.vector_dim != ck.fmap.vector_dim:
        raise DataError(f"{checkpoint_dir}: checkpoint was trained with item vectors of width {ck.fmap.vector_dim} "
                        f"but {vector if vector != 'given' else data_dir} has {table.vector_dim} (another fusion)")
    if ck.cfg.model.use_user_id and (largest := max_user_id(data_dir)) >= ck.fmap.num_users:
        raise DataError(f"{data_dir}: column user_id: values up to {largest}, but the checkpoint's user embedding "
                        f"has ids 0..{ck.fmap.num_users - 1} (model.use_user_id; a checkpoint of other data)")
    model = DINModel(ck.cfg.model, ck.fmap, **table.to_torch(device))
    model.load_state_dict(ck.model_state)
    model.experiment_cfg = ck.cfg  # its max_len and the precision it was validated in
    model.item_source = source  # what its item vectors were built from (item_source.json)
    return model.to(device).eval()


def model_inputs(cols: dict[str, np.ndarray], device: str | torch.device) -> dict[str, torch.Tensor]:
    """The model's input columns as tensors on ``device`` (Ray and pyarrow hand read-only arrays: copied then)."""
    return {k: torch.as_tensor(np.require(cols[k], requirements="W"), device=device)
            for k in MODEL_INPUTS if k in cols}


@torch.no_grad()
def score_parquet(model: DINModel, path: str | Path, max_len: int, batch_rows: int = 16_384,
                  logits: bool = False) -> np.ndarray:
    """Probabilities (or with ``logits``, the fp32 logits, what AUC ranks) for every row of a split (a file, or a
    folder of part files), in row order, in this process (no Ray).

    The in-process scorer of `mmctr compare`, and the tests' reference for the Ray Data path.
    """
    device = next(model.parameters()).device
    out = []
    for part in parquet_parts(path):
        row0 = 0
        for batch in pq.ParquetFile(part).iter_batches(batch_size=batch_rows):
            cols = to_model_batch(pa.Table.from_batches([batch]), max_len, source=str(part), row0=row0)
            row0 += batch.num_rows
            out.append(logits_of(model, model_inputs(cols, device), model.experiment_cfg.train))
    scores = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
    return scores if logits else to_probabilities(scores)


class Scorer:
    """Ray Data callable class: loads the model once, then maps batches to logits (fp32)."""

    def __init__(self, checkpoint_dir: str, data_dir: str, use_gpu: bool = False, sharers: int = 1) -> None:
        self.device = actor_device(use_gpu)
        if self.device == "cpu":  # Ray sets one thread per logical CPU the actor asked for: share the cores of the
            torch.set_num_threads(cpu_threads(sharers))  # node it runs on with the pool's other actors
        self.model = load_model(checkpoint_dir, data_dir, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits = logits_of(self.model, model_inputs(batch, self.device), self.model.experiment_cfg.train)
        return {"logit": logits, "label": batch["label"]}


def score_split(run_dir: Location, data_dir: str | Path, split: str = "test", actors: int = 1,
                gpus_per_actor: float = 0.0, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray, Location]:
    """(logits, labels, checkpoint used) for every row of ``split``, in file order; ``batch_size`` rows a step
    (default: the run's ``train.eval_batch_size``, as in its validation)."""
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch rows {batch_size}: expected a positive number of rows a step")
    checkpoint = run_or_checkpoint(run_dir)  # absolute: actors may not share this directory
    cfg = load_model(checkpoint, data_dir).experiment_cfg  # fails here, as one line, if the data does not fit
    return _score(checkpoint, data_dir, split, cfg.data.max_len, actors, gpus_per_actor,
                  cfg.train.eval_batch_size if batch_size is None else batch_size, cfg.train.keep_freed_memory)


def _score(checkpoint: Location, data_dir: str | Path, split: str, max_len: int, actors: int, gpus_per_actor: float,
           batch_size: int, keep_freed_memory: bool) -> tuple[np.ndarray, np.ndarray, Location]:
    from ray.data import ActorPoolStrategy

    check_actors(actors, gpus_per_actor)  # a pool the local Ray cannot hold beside the reads would wait for good
    # Ray Data's advice, as a UserWarning with its source line, when the pool has more actors than a small split has
    # blocks ("configure override_num_blocks earlier in the pipeline"): the split is scored all the same
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
    ds = read_split(data_dir, split, max_len=max_len, batch_rows=batch_size, ordered=True)  # IDs: row order (the
    # scoring dataset shares its context, preserve_order with it)
    scored = ds.map_batches(Scorer, fn_constructor_kwargs={"checkpoint_dir": str(checkpoint),
                                                           "data_dir": str(Path(data_dir).resolve()),
                                                           "use_gpu": gpus_per_actor > 0, "sharers": actors},
                            batch_size=batch_size, batch_format="numpy", num_gpus=gpus_per_actor,
                            num_cpus=0 if gpus_per_actor else 1, compute=ActorPoolStrategy(size=actors),
                            **actor_options(keep_freed_memory, gpus_per_actor > 0))  # as the run's workers
    logits, labels = [], []
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        logits.append(batch["logit"])
        labels.append(batch["label"])
    return np.concatenate(logits), np.concatenate(labels), checkpoint


def write_submission(probs: np.ndarray, out: Path, column: str = "Task2") -> None:
    """Zip with prediction.csv (``ID,<column>``; ``column`` one of :data:`TASKS`), written under a temporary name
    then renamed."""
    if column not in TASKS:
        raise ValueError(f"submission column {column!r}: expected one of {', '.join(TASKS)}")
    text = io.StringIO()
    text.write(f"ID,{column}\n")
    np.savetxt(text, np.column_stack([np.arange(len(probs)), probs]), fmt=["%d", "%.8f"], delimiter=",")
    partial = out.with_name(out.name + ".partial")
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("prediction.csv", text.getvalue())
        partial.replace(out)
    except BaseException:  # Ctrl-C or a full disk while zipping: no half-written zip is left beside OUT
        partial.unlink(missing_ok=True)
        raise


def check_finite(scores: np.ndarray, checkpoint: Location, rows: str | Path) -> None:
    """Refuse scores that are not numbers (clipping into (0, 1) leaves NaN as it is), naming the checkpoint."""
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise DataError(f"{checkpoint}: {bad:,} non-finite predictions on {rows} (a diverged checkpoint, or bf16 "
                        f"overflow on a GPU: score on the CPU); nothing written")


def check_output(out: str | Path, overwrite: bool = False) -> Path:
    """The submission path, or a one-line error: a zip already there (without ``overwrite``), or not a zip."""
    out = Path(out)
    if out.is_dir():  # --overwrite replaces a submission, not a folder (the rename would fail after scoring)
        raise DataError(f"{out}: a folder; expected the submission's .zip file")
    if out.suffix != ".zip":
        raise DataError(f"{out}: the submission must be a .zip file")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists; pass --overwrite to replace it")
    if out.exists():  # --overwrite replaces a submission, not any zip (docs/reliability.md: another kind is refused)
        try:
            with zipfile.ZipFile(out) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            names = None
        if names != ["prediction.csv"]:
            held = "not a readable zip" if names is None else f"holds {', '.join(names[:3]) or 'nothing'}" + (
                ", ..." if len(names) > 3 else "")
            raise OutputExistsError(f"{out}: not a submission of `mmctr predict` ({held}; expected prediction.csv "
                                    f"alone): not replaced, even with --overwrite; choose another --out")
    return out


def check_inputs(run_dir: Location, data_dir: str | Path, split: str = "test", out: str | Path | None = None,
                 overwrite: bool = False, task: str = "Task2") -> int:
    """Raise a one-line error if ``split`` of ``data_dir`` cannot be scored by the run's best checkpoint, or the
    submission ``out`` cannot be written, without Ray (and warn of a run that is no ``task`` entry:
    :func:`warn_task1`); return the split's row count."""
    if out is not None:
        check_output(out, overwrite)
    rows = check_split(data_dir, split)
    layout = Layout(data_dir)
    if split == "test" and not layout.labelled_test and layout.hidden_test_labels.is_file():
        from mmctr_ray.preflight import label_file  # read after Ray started, for the test AUC: checked before

        label_file(layout.hidden_test_labels)
    checkpoint = run_or_checkpoint(run_dir)
    model = load_model(checkpoint, data_dir)
    warn_task1(model.experiment_cfg, model.item_embedding.proj.in_features, task, str(checkpoint), "is written")
    warn_unended(run_dir, checkpoint)
    return rows


def warn_unended(run_dir: Location, checkpoint: Location) -> None:
    """Warn when RUN has no ``summary.json`` (a run writes it when it ends): its best checkpoint *so far* is
    scored, which a run still training or stopped early may better later. Nothing for a checkpoint named itself."""
    location = storage.normalize(run_dir)
    if storage.basename(location).startswith(PREFIX) or storage.is_file(storage.join(location, "summary.json")):
        return
    log.warning("%s: no summary.json: the run is still training, or it stopped before its end (`mmctr train "
                "--resume` continues it); scoring its best checkpoint so far, %s", run_dir,
                storage.basename(checkpoint))


def hidden_test_labels(data_dir: str | Path, rows: int) -> np.ndarray | None:
    """The labels the test split hides, where synthetic data keeps them (``synthetic_truth/test_labels.parquet``), for
    a test split of ``rows`` rows; None without that file, and with a warning when it holds another count of labels
    (a test split cut or grown since `mmctr synth` wrote it: the labels no longer belong to its rows, so no test AUC;
    the submission itself scores the split as it is). A split replaced by as many other rows is not detected."""
    from mmctr_ray.features import read_parquet
    from mmctr_ray.preflight import label_file

    truth = Layout(data_dir).hidden_test_labels
    if not truth.is_file():
        return None
    label_file(truth)
    labels = read_parquet(truth, ["label"]).column("label").to_numpy()
    if len(labels) != rows:
        log.warning("%s: %d labels for a test split of %d rows: no test AUC (the split is not the one `mmctr synth` "
                    "wrote; `mmctr validate` says what differs)", truth, len(labels), rows)
        return None
    return labels


def run_predict(run_dir: Location, data_dir: str | Path, out: str | Path, split: str = "test",
                actors: int = 1, gpus_per_actor: float = 0.0, overwrite: bool = False,
                task: str = "Task2", batch_rows: int | None = None) -> dict[str, Any]:
    """Score ``split`` and write the submission zip ``out`` (its column ``task``, one of :data:`TASKS`); return a
    summary (AUC when labels are known). ``batch_rows``: rows an actor scores a step (default: the run's
    ``train.eval_batch_size``)."""
    out = check_output(out, overwrite)
    expected = check_split(data_dir, split)  # the labels of a converted test split too: they are true ones
    own = split != "test" or Layout(data_dir).labelled_test
    truth = None if own else hidden_test_labels(data_dir, expected)  # its warning before the scoring
    logits, labels, checkpoint = score_split(run_dir, data_dir, split, actors, gpus_per_actor, batch_rows)
    if len(logits) != expected:
        raise DataError(f"{split}: scored {len(logits)} rows but the split has {expected}; nothing written")
    check_finite(logits, checkpoint, f"the {split} split")
    probs = to_probabilities(logits)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_submission(probs, out, task)
    summary: dict[str, Any] = {"submission": str(out), "rows": len(probs), "split": split, "task": task,
                               "checkpoint": str(checkpoint)}
    if own:
        summary["metrics"] = evaluate_logits(labels, logits)
    elif truth is not None:
        summary["metrics"] = evaluate_logits(truth, logits)
    oracle = Layout(data_dir).oracle_auc(split, len(probs)) if split in ("valid", "test") else None
    if oracle is not None and "metrics" in summary:  # beside the AUC it is for
        summary["oracle_auc"] = oracle
    return summary
