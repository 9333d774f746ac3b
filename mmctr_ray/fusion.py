"""The fusion strategies (README, "Item embeddings and fusion"): how BERT and CLIP item vectors become one item
vector, with PCA.

======== =====================================================================
strategy item vector
======== =====================================================================
given    item_info's ``item_emb_d128`` as shipped (no PCA)
v1       PCA(text) → ``dims``
v2       PCA(image) → ``dims``
v3       PCA(text ‖ image) → ``dims`` (concatenate the raw vectors, then reduce)
v4       PCA(text) → ``text_dim`` ‖ PCA(image) → ``image_dim`` (reduce each, then concatenate)
======== =====================================================================

PCA is scikit-learn's: an exact ``PCA`` (the eigenvectors of the covariance, so its first k axes are the
k-axis fit) on the whole item matrix when it fits in memory, ``IncrementalPCA`` over streamed batches when it
does not. A fitted fusion is a list of parts, each ``(x - mean) @ components.T``
over its inputs, saved as plain arrays in an npz (no pickle), so the same items transform to the same table.

Missing covers: rows flagged ``image_missing`` get ``image_fill``, the mean image vector of the items that
have a cover, before fitting and transforming; after centering that is the origin of the image PCA space
("no image information").

Example:
    >>> fitted = fit_fusion(FusionConfig("v4", text_dim=64, image_dim=64), batches, n_items=91_717)
    >>> vectors = fitted.transform(ModalityBatch(ids, text, image, missing))  # (B, 128)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple

import numpy as np

from mmctr_ray.config import FusionConfig
from mmctr_ray.errors import ConfigError, DataError

if TYPE_CHECKING:
    from sklearn.decomposition import PCA, IncrementalPCA

# strategy → its parts: (part name, modalities concatenated as input, FusionConfig field giving the width)
PARTS: dict[str, tuple[tuple[str, tuple[str, ...], str], ...]] = {
    "v1": (("text", ("text",), "dims"),),
    "v2": (("image", ("image",), "dims"),),
    "v3": (("joint", ("text", "image"), "dims"),),
    "v4": (("text", ("text",), "text_dim"), ("image", ("image",), "image_dim")),
}


def width_fields(strategy: str) -> set[str]:
    """The FusionConfig width fields ``strategy`` reads (:data:`PARTS`; none for ``given``)."""
    return {field for _, _, field in PARTS.get(strategy, ())}


FULL_PCA_MAX_BYTES = 2 << 30  # ``pca="auto"``: full PCA while the input matrix fits in 2 GiB, else incremental


class ModalityBatch(NamedTuple):
    """Some items' raw vectors: ids (B,), text (B, Dt) or None, image (B, Di) or None, image_missing (B,)."""

    ids: np.ndarray
    text: np.ndarray | None
    image: np.ndarray | None
    image_missing: np.ndarray


@dataclass(frozen=True)
class PCAPart:
    """One fitted PCA: ``(x - mean) @ components.T`` over the concatenation of ``inputs``.

    Attributes:
        name: ``text``, ``image`` or ``joint``.
        inputs: the modalities concatenated as input, in order.
        mean: (D,) per-feature mean.
        components: (K, D) principal axes, largest variance first.
        explained_variance: (K,) variance along each axis.
        explained_variance_ratio: (K,) its share of the total variance.
    """

    name: str
    inputs: tuple[str, ...]
    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) @ self.components.T).astype(np.float32)


@dataclass(frozen=True)
class FittedFusion:
    """A strategy with its fitted parts; ``transform`` maps raw vectors to fused ones."""

    strategy: str
    parts: tuple[PCAPart, ...]
    image_fill: np.ndarray | None  # (Di,) mean image vector given to items without a usable cover
    method: str = ""  # the fit fit_fusion made: "full" (exact: a narrower fit is a slice) or "incremental"; "" unknown

    @property
    def dim(self) -> int:
        return sum(p.components.shape[0] for p in self.parts)

    def transform(self, batch: ModalityBatch) -> np.ndarray:
        """(B, dim) float32 fused vectors of ``batch``."""
        raw = _filled(batch, self.image_fill)
        return np.concatenate([p.transform(_concat(raw, p.inputs)) for p in self.parts], axis=1)

    def select(self, cfg: FusionConfig) -> tuple[FittedFusion, np.ndarray]:
        """The fit of ``cfg`` taken from this wider one, and which columns of this fit's fused vectors it keeps
        (its transform is those columns): each of ``cfg``'s parts is this fit's part of that name cut to its first
        axes, which for an exact (``full``) fit is the fit of that width. A v4 fit holds v1's and v2's parts."""
        starts = dict(zip((p.name for p in self.parts),
                          np.cumsum([0] + [p.components.shape[0] for p in self.parts])[:-1]))
        parts, columns = [], []
        for name, _, field in PARTS[cfg.strategy]:
            p, k = next((p for p in self.parts if p.name == name), None), getattr(cfg, field)
            if p is None:
                raise ValueError(f"{cfg.strategy}'s {name} part is not in this {self.strategy} fit")
            if k > p.components.shape[0]:
                raise ConfigError(f"fusion.{field}={k}: expected at most min(items − 1, input width) = "
                                  f"{p.components.shape[0]} for the {name} PCA")
            parts.append(PCAPart(p.name, p.inputs, p.mean, p.components[:k], p.explained_variance[:k],
                                 p.explained_variance_ratio[:k]))
            columns.append(np.arange(starts[name], starts[name] + k))
        fill = self.image_fill if "image" in modalities_needed(cfg.strategy) else None
        return FittedFusion(cfg.strategy, tuple(parts), fill, self.method), np.concatenate(columns)

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {"strategy": np.array(self.strategy),
                                         "parts": np.array([p.name for p in self.parts])}
        if self.image_fill is not None:
            arrays["image_fill"] = self.image_fill
        if self.method:
            arrays["method"] = np.array(self.method)
        for p in self.parts:
            arrays[f"{p.name}.inputs"] = np.array(p.inputs)
            for field in ("mean", "components", "explained_variance", "explained_variance_ratio"):
                arrays[f"{p.name}.{field}"] = getattr(p, field)
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> FittedFusion:
        with np.load(path, allow_pickle=False) as z:
            parts = tuple(PCAPart(str(name), tuple(str(s) for s in z[f"{name}.inputs"]),
                                  *(z[f"{name}.{f}"] for f in ("mean", "components", "explained_variance",
                                                                 "explained_variance_ratio")))
                          for name in z["parts"])
            fill = z["image_fill"] if "image_fill" in z.files else None
            return cls(str(z["strategy"]), parts, fill, str(z["method"]) if "method" in z.files else "")


def input_widths(batch: ModalityBatch) -> dict[str, int]:
    """Each modality's vector width in ``batch`` (0 for one it does not carry)."""
    return {"text": 0 if batch.text is None else batch.text.shape[1],
            "image": 0 if batch.image is None else batch.image.shape[1]}


def part_limits(strategy: str, n_items: int, widths: dict[str, int]) -> dict[str, int]:
    """The widest PCA each of ``strategy``'s parts can have over ``n_items`` items of these input ``widths``
    (:func:`input_widths`): min(items − 1, input width), keyed by the part's FusionConfig size field (centred data
    of N items spans N − 1 axes at most: an N-th component is noise of no variance)."""
    return {field: pca_limit(n_items, sum(widths[m] for m in inputs)) for _, inputs, field in PARTS[strategy]}


def pca_limit(n_items: int, in_dim: int) -> int:
    """The widest PCA of ``n_items`` vectors of ``in_dim`` values: min(items − 1, input width)."""
    return min(n_items - 1, in_dim)


def input_bytes(strategy: str, n_items: int, widths: dict[str, int]) -> int:
    """The float32 input matrices of ``strategy``'s parts over ``n_items`` items: ``pca="auto"`` fits them whole
    (exact) up to ``FULL_PCA_MAX_BYTES``."""
    return 4 * n_items * sum(widths[m] for _, inputs, _ in PARTS[strategy] for m in inputs)


def modalities_needed(strategy: str) -> set[str]:
    return {m for _, inputs, _ in PARTS[strategy] for m in inputs}


def _concat(raw: dict[str, np.ndarray], inputs: tuple[str, ...]) -> np.ndarray:
    return raw[inputs[0]] if len(inputs) == 1 else np.concatenate([raw[m] for m in inputs], axis=1)


def _filled(batch: ModalityBatch, image_fill: np.ndarray | None) -> dict[str, np.ndarray]:
    raw = {"text": batch.text, "image": batch.image}
    if batch.image is not None and image_fill is not None and batch.image_missing.any():
        image = batch.image.copy()
        image[batch.image_missing] = image_fill
        raw["image"] = image
    return raw


def _image_fill(batches: Iterable[ModalityBatch]) -> np.ndarray:
    """Mean image vector over items with a usable cover (one pass over ``batches``)."""
    total, count = None, 0
    for b in batches:
        kept = b.image[~b.image_missing].astype(np.float64)
        total = kept.sum(axis=0) if total is None else total + kept.sum(axis=0)
        count += len(kept)
    if not count:
        raise ConfigError("no item has a usable cover image: image strategies (v2, v3, v4) need some")
    return (total / count).astype(np.float32)


def check_width(cfg: FusionConfig, name: str, width_field: str, n_items: int, in_dim: int) -> int:
    """``cfg``'s width of its part ``name``, refused in one line when over min(items − 1, input width) (the last
    column of a PCA as wide as the items was dead: its spread 1e-7)."""
    k = getattr(cfg, width_field)
    if k > pca_limit(n_items, in_dim):
        raise ConfigError(f"fusion.{width_field}={k}: expected at most min(items − 1, input width) = "
                          f"min({n_items - 1}, {in_dim}) for the {name} PCA")
    return k


def _check_spread(name: str, inputs: tuple[str, ...], lo: np.ndarray, hi: np.ndarray, where: str) -> None:
    """A one-line DataError when every item's input vector is the same (empty titles, say): each item's projection
    is then 0, and the table would carry no content without a word. Told by the inputs' range (``lo``, ``hi``: the
    columns' minima and maxima), not by the fit's variance, which an incremental fit over several chunks leaves at
    rounding level (5e-10), with ratios far above 1."""
    if not (hi > lo).any():
        raise DataError(f"{where}: every item's {' ‖ '.join(inputs)} vector is the same (no variance), so the {name} "
                        f"PCA would give every item a zero vector; expected vectors that differ between items")


def _check_scale(name: str, inputs: tuple[str, ...], lo: np.ndarray, hi: np.ndarray, rows: int, where: str,
                 est: PCA | IncrementalPCA | None = None) -> None:
    """A one-line DataError for inputs of a scale whose float32 sums of squares overflow (a value of 1e30 among
    BERT's), or a fit (``est``) that overflowed or holds what float32, the saved fit's type, cannot: the fit went
    on with a warning, and the table was all NaN, or finite with a 1e30 vector, written with exit 0."""
    scale = float(max(np.abs(lo).max(), np.abs(hi).max()))
    fits = scale * scale * rows <= float(np.finfo(np.float32).max)
    if fits and est is not None:
        with np.errstate(over="ignore"):
            kept = est.components_.astype(np.float32), est.explained_variance_.astype(np.float32)
        fits = all(np.isfinite(a).all() for a in kept)
    if not fits:
        of = f" ({' ‖ '.join(inputs)})" if inputs != (name,) else ""
        raise DataError(f"{where}: the {name} PCA{of} cannot be fitted in float32: its input values reach "
                        f"{scale:.3g}; expected vectors of an embedding's scale")


def _part(name: str, inputs: tuple[str, ...], est: PCA | IncrementalPCA) -> PCAPart:
    return PCAPart(name, inputs, est.mean_.astype(np.float32), est.components_.astype(np.float32),
                   est.explained_variance_.astype(np.float32), est.explained_variance_ratio_.astype(np.float32))


def fit_fusion(cfg: FusionConfig, batches: Callable[[], Iterator[ModalityBatch]], n_items: int,
               pca: str = "auto", chunk_rows: int = 16_384, where: str = "the item vectors"
               ) -> FittedFusion:
    """Fit ``cfg.strategy``'s PCA parts on the items that ``batches()`` yields (it may be called several times).

    Args:
        where: the source, for messages.
        pca: ``full`` (scikit-learn ``PCA`` on the whole matrix), ``incremental`` (``IncrementalPCA`` over
            chunks of ``chunk_rows``; memory bounded by the chunk) or ``auto`` (full up to 2 GiB of input).
    """
    if cfg.strategy not in PARTS:
        raise ConfigError(f"fusion.strategy={cfg.strategy!r}: no PCA to fit (expected one of {', '.join(PARTS)})")
    if n_items < 2:  # one item: numpy's "Eigenvalues did not converge", or NaN ratios from the incremental fit
        raise DataError(f"{where}: vectors of {n_items} item{'s' * (n_items != 1)}; a PCA needs at least 2")
    # here, not at the top: scikit-learn takes over a second to import, and every process that applies a fitted
    # fusion (each training worker, each trial) imports this module without fitting anything
    from sklearn.decomposition import PCA, IncrementalPCA

    needs_image = "image" in modalities_needed(cfg.strategy)
    widths = input_widths(next(iter(batches())))
    specs = [(name, inputs, check_width(cfg, name, wf, n_items, sum(widths[m] for m in inputs)))
             for name, inputs, wf in PARTS[cfg.strategy]]
    if pca == "auto":
        pca = "full" if input_bytes(cfg.strategy, n_items, widths) <= FULL_PCA_MAX_BYTES else "incremental"
    if pca == "full":  # one read of the source: the fill and the fit both use the batches held in memory
        loaded = list(batches())
        fill = _image_fill(loaded) if needs_image else None
        raws = [_filled(b, fill) for b in loaded]
        parts = []
        for name, inputs, k in specs:
            x = np.concatenate([_concat(r, inputs) for r in raws], axis=0).astype(np.float32, copy=False)
            lo, hi = x.min(axis=0), x.max(axis=0)
            _check_spread(name, inputs, lo, hi, where)
            _check_scale(name, inputs, lo, hi, len(x), where)
            # exact (the eigenvectors of the covariance): the first k axes of a wider fit are this fit's axes,
            # so a search can fit each strategy once, as wide as it may ask, and slice every size from it (pca_cache).
            # Centred first, the mean in float64: a float32 covariance of uncentred vectors (BERT's and CLIP's are
            # not centred) cancels digits (an offset of 5 on 20k x 256 put the axes 0.25 off a float64 SVD)
            mean = x.mean(axis=0, dtype=np.float64)
            x -= mean.astype(np.float32)
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, in one line
                est = PCA(n_components=k, svd_solver="covariance_eigh").fit(x)
            _check_scale(name, inputs, lo, hi, len(x), where, est)
            est.mean_ = est.mean_ + mean
            parts.append(_part(name, inputs, est))
        return FittedFusion(cfg.strategy, tuple(parts), fill, "full")
    if pca != "incremental":
        raise ConfigError(f"pca={pca!r}: expected auto, full or incremental")
    fill = _image_fill(batches()) if needs_image else None
    ests = [IncrementalPCA(n_components=k) for _, _, k in specs]
    ranges: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(specs)
    for chunk in _chunks(batches, fill, max(chunk_rows, *(k for _, _, k in specs))):
        for j, (est, (_, inputs, _)) in enumerate(zip(ests, specs)):
            x = _concat(chunk, inputs)
            lo, hi = x.min(axis=0), x.max(axis=0)
            ranges[j] = (lo, hi) if ranges[j] is None else (np.minimum(ranges[j][0], lo), np.maximum(ranges[j][1], hi))
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # refused below: 0/0 ratios, overflow
                est.partial_fit(x)
    for (name, inputs, _), (lo, hi), est in zip(specs, ranges, ests):
        _check_spread(name, inputs, lo, hi, where)
        _check_scale(name, inputs, lo, hi, n_items, where, est)
    return FittedFusion(cfg.strategy, tuple(_part(n, i, e) for (n, i, _), e in zip(specs, ests)), fill, "incremental")


def _chunks(batches: Callable[[], Iterator[ModalityBatch]], fill: np.ndarray | None,
            rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Re-chunk filled batches into chunks of ``rows`` rows; the remainder joins the last full chunk (each
    ``partial_fit`` needs at least as many rows as components)."""
    buffer: list[dict[str, np.ndarray]] = []
    held: dict[str, np.ndarray] | None = None
    count = 0
    for b in batches():
        buffer.append({k: v for k, v in _filled(b, fill).items() if v is not None})
        count += len(b.ids)
        if count >= rows:
            if held is not None:
                yield held
            held, buffer, count = _stack(buffer), [], 0
    if buffer:
        held = _stack(([held] if held is not None else []) + buffer)
    if held is not None:
        yield held


def _stack(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
