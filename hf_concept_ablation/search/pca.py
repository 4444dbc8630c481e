"""PCA directions: principal components of residual-stream activations, an alternative to SAE latents.

`pca_directions` runs a model over texts and, per layer, takes the principal components
of the outputs at every counted token (not BOS, not padding). With ``other_model`` it
instead takes the components of the *difference* ``other - model`` at each token (for
example fine-tuned minus base), the later version of the method. Each component comes
with its top and bottom examples (token windows where the projection is highest and
lowest). Components are unit vectors ``[n, d_model]``; `select_directions` picks some by
index or by contrast score with two text sets (exactly like latents, see
`hf_concept_ablation.search.contrast`), and `directions_config` turns them into a
``ConceptAblationConfig(mode="projection", directions=...)``.

Sign convention: a component's sign is arbitrary; it is fixed so that the largest
absolute projection over the data is positive.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..adapter.config import ConceptAblationConfig
from ..files import atomic_path, file_stem, write_json_atomic
from .activations import as_text_list, iter_residuals
from .cache import ContextExample, window_bounds
from .contrast import ContrastScore, contrast_directions, per_text_values


@dataclass
class PCAResult:
    """Principal components of one layer.

    Attributes:
        layer: decoder layer index.
        components: unit directions ``[n, d_model]``, by explained variance descending.
        explained_variance: variance along each component ``[n]``.
        explained_variance_ratio: share of the total variance ``[n]``.
        mean: the mean subtracted before the decomposition ``[d_model]`` (zeros if not centred).
        top_examples, bottom_examples: per component, windows of highest / lowest projection.
        n_tokens: number of token vectors used.
    """

    layer: int
    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor
    mean: torch.Tensor
    top_examples: list[list[ContextExample]] = field(default_factory=list)
    bottom_examples: list[list[ContextExample]] = field(default_factory=list)
    n_tokens: int = 0


def pca(x: torch.Tensor, n_components: int, center: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of rows ``x`` ``[N, d]``: (components ``[n, d]``, variances ``[n]``, variance ratios ``[n]``, mean ``[d]``).

    Computed from the ``d x d`` second-moment matrix in float64 (``eigh``). Without
    centring, the "variance" is the mean squared projection (uncentred PCA).
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs a matrix [N >= 2, d], got shape {tuple(x.shape)}")
    x = x.double()
    mean = x.mean(dim=0) if center else torch.zeros(x.shape[1], dtype=torch.float64)
    xc = x - mean
    cov = xc.T @ xc / (x.shape[0] - (1 if center else 0))
    values, vectors = torch.linalg.eigh(cov)
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    rank = int((values > values[0] * 1e-9).sum()) if values[0] > 0 else 0
    n = min(int(n_components), x.shape[1], rank)
    if n == 0:
        raise ValueError(f"PCA: the {x.shape[0]} rows are all the same point: there is no direction of variance")
    if n < int(n_components):
        warnings.warn(f"PCA: {x.shape[0]} rows of rank {rank} give only {n} of the {n_components} components asked "
                      "for (the others would be arbitrary directions of zero variance)", stacklevel=2)
    components = vectors[:, :n].T.contiguous()
    proj = xc @ components.T
    flip = proj.gather(0, proj.abs().argmax(dim=0, keepdim=True)).sign().flatten()
    components = components * torch.where(flip == 0, 1.0, flip)[:, None]
    total = values.sum().clamp(min=1e-12)
    return components.float(), values[:n].float(), (values[:n] / total).float(), mean.float()


def _window(ids: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, pos: int, window: tuple[int, int],
            tokenizer: Any, doc: int, kind: str) -> ContextExample:
    start, stop = window_bounds(keep, pos, *window)
    token_ids = ids[start:stop].tolist()
    return ContextExample(
        tokens=[tokenizer.decode([i]) for i in token_ids],
        token_ids=token_ids,
        acts=(values[start:stop] * keep[start:stop]).tolist(),
        center=pos - start,
        value=float(values[pos]),
        doc=doc,
        kind=kind,
    )


def pca_directions(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Any,
    layers: Sequence[int],
    *,
    n_components: int = 10,
    other_model: torch.nn.Module | None = None,
    center: bool | None = None,
    n_examples: int = 5,
    window: tuple[int, int] = (12, 4),
    max_length: int = 128,
    max_tokens: int = 200_000,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, PCAResult]:
    """Principal components per layer of `model`'s activations over `texts` (or of ``other_model - model``).

    Args:
        texts: a list of strings or a `datasets.Dataset` with a ``text`` column.
        other_model: a second model with the same tokenizer and shape (e.g. fine-tuned);
            if given, the PCA is of the per-token differences ``other - model``.
        center: subtract the mean first; default True for activations, False for
            differences (their mean is itself the main direction of change).
        n_examples: top and bottom examples kept per component.
        max_tokens: at most this many token vectors are used (the first ones).
    """
    texts = as_text_list(texts)
    layers = sorted({int(layer) for layer in layers})
    center = (other_model is None) if center is None else center
    vectors: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    where: list[tuple[int, int]] = []  # (doc, position) of each stored token vector
    docs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    count = 0
    base_iter = iter_residuals(model, tokenizer, texts, layers, batch_size=batch_size, max_length=max_length,
                               desc="pca: activations", progress=progress)
    other_iter = (iter_residuals(other_model, tokenizer, texts, layers, batch_size=batch_size, max_length=max_length,
                                 desc="pca: other model", progress=False) if other_model is not None else None)
    for batch in base_iter:
        other = next(other_iter) if other_iter is not None else None
        keep = batch.keep
        rows, cols = keep.nonzero(as_tuple=True)
        take = min(len(rows), max_tokens - count)
        rows, cols = rows[:take], cols[:take]
        for layer in layers:
            h = batch.hidden[layer]
            if other is not None:
                h = other.hidden[layer] - h
            vectors[layer].append(h[rows, cols])
        for r, c in zip(rows.tolist(), cols.tolist()):
            doc = int(batch.doc_ids[r])
            where.append((doc, c))
            docs.setdefault(doc, (batch.input_ids[r], keep[r]))
        count += take
        if count >= max_tokens:
            break
    if count < 2:
        raise ValueError(f"only {count} counted tokens in the texts: too few for PCA")
    by_doc: dict[int, tuple[list[int], list[int]]] = {}
    for t, (doc, pos) in enumerate(where):
        by_doc.setdefault(doc, ([], []))
        by_doc[doc][0].append(t)
        by_doc[doc][1].append(pos)
    doc_rows = {doc: (torch.tensor(r), torch.tensor(p)) for doc, (r, p) in by_doc.items()}
    results = {}
    for layer in layers:
        x = torch.cat(vectors[layer])
        components, variance, ratio, mean = pca(x, n_components, center=center)
        proj = (x - mean) @ components.T  # [N, n]
        result = PCAResult(layer, components, variance, ratio, mean, n_tokens=x.shape[0])
        for j in range(components.shape[0]):
            tops, bottoms = [], []
            for kind, store, order in (("top", tops, proj[:, j].argsort(descending=True)),
                                       ("bottom", bottoms, proj[:, j].argsort())):
                seen: set[int] = set()
                for t in order.tolist():
                    doc, pos = where[t]
                    if doc in seen:
                        continue
                    seen.add(doc)
                    ids, keep = docs[doc]
                    rows_of_doc, positions = doc_rows[doc]
                    values = torch.zeros(len(ids))
                    values[positions] = proj[rows_of_doc, j]
                    store.append(_window(ids, values, keep, pos, window, tokenizer, doc, kind))
                    if len(store) >= n_examples:
                        break
            result.top_examples.append(tops)
            result.bottom_examples.append(bottoms)
        results[layer] = result
    return results


def mean_activations(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Any,
    layers: Sequence[int],
    *,
    batch_size: int = 8,
    max_length: int = 128,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Per layer, the mean output ``[d_model]`` over every counted token (not BOS, not padding) of `texts`."""
    layers = sorted({int(layer) for layer in layers})
    sums = {layer: None for layer in layers}
    count = 0
    for batch in iter_residuals(model, tokenizer, as_text_list(texts), layers, batch_size=batch_size,
                                max_length=max_length, desc="mean activations", progress=progress):
        for layer in layers:
            total = batch.hidden[layer][batch.keep].double().sum(dim=0)
            sums[layer] = total if sums[layer] is None else sums[layer] + total
        count += int(batch.keep.sum())
    if count == 0:
        raise ValueError("no counted tokens in the texts: cannot take a mean activation")
    return {layer: (total / count).float() for layer, total in sums.items()}


def concept_directions(
    model: torch.nn.Module,
    tokenizer: Any,
    texts_a: Any,
    texts_b: Any,
    layers: Sequence[int],
    *,
    n_components: int = 1,
    paired: bool = False,
    batch_size: int = 8,
    max_length: int = 128,
) -> dict[int, PCAResult]:
    """Directions that separate two concept text sets, per layer (e.g. female- vs male-themed sentences).

    Each text is reduced to its mean residual vector over the counted tokens. Paired sets
    (``texts_a[i]`` mirrors ``texts_b[i]``): the uncentred PCA of the differences
    ``a_i - b_i``, so component 0 is close to the mean difference and the next ones carry
    the rest of the concept's variation. Unpaired sets: the difference of the two sets' means
    (one direction; `n_components` must be 1). Every component points from b to a.
    """
    texts_a, texts_b = as_text_list(texts_a), as_text_list(texts_b)
    layers = sorted({int(layer) for layer in layers})
    if not paired and n_components != 1:
        raise ValueError(f"unpaired concept texts give one direction per layer (their mean difference), "
                         f"not n_components={n_components}")

    def featurize(hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.cat([hidden[layer] for layer in layers], dim=-1)

    a, b = (per_text_values(model, tokenizer, texts, layers, featurize, "mean", batch_size, max_length, desc)
            for texts, desc in ((texts_a, "concept a"), (texts_b, "concept b")))
    results = {}
    for k, layer in enumerate(layers):
        width = a.shape[1] // len(layers)
        a_l, b_l = a[:, k * width:(k + 1) * width], b[:, k * width:(k + 1) * width]
        if paired:
            if a_l.shape != b_l.shape:
                raise ValueError(f"paired concept texts need equal counts, got {a_l.shape[0]} and {b_l.shape[0]}")
            diffs = a_l - b_l
        else:
            diffs = (a_l.mean(dim=0) - b_l.mean(dim=0))[None]
        if not bool(diffs.abs().max() > 0):
            raise ValueError(f"layer {layer}: the two concept text sets give the same activations, so there is no "
                             "direction between them (does the tokenizer tell their words apart?)")
        if paired:
            components, variance, ratio, _ = pca(diffs, n_components, center=False)
        else:
            components = diffs / diffs.norm().clamp(min=1e-12)
            variance, ratio = diffs.norm()[None] ** 2, torch.ones(1)
        mean_diff = diffs.mean(dim=0)
        components = components * torch.where(components @ mean_diff < 0, -1.0, 1.0)[:, None]
        results[layer] = PCAResult(layer, components, variance, ratio, torch.zeros(a_l.shape[1]),
                                   n_tokens=a_l.shape[0] + b_l.shape[0])
    return results


def select_directions(
    results: Mapping[int, PCAResult],
    *,
    indices: Mapping[int, Sequence[int]] | None = None,
    contrast: Sequence[ContrastScore] | None = None,
    min_contrast: float = 1.0,
    max_selected: int | None = 10,
) -> dict[int, list[int]]:
    """Choose components: by `indices` (layer -> component indices), or by ``|contrast| >= min_contrast``.

    With `contrast` (from `contrast_pca`), components are taken by ``|d|`` descending,
    at most `max_selected` in all. Returns layer -> chosen component indices.
    """
    if (indices is None) == (contrast is None):
        raise ValueError("give either indices or contrast scores to select directions")
    chosen: dict[int, list[int]] = {}
    if indices is not None:
        for layer, ids in indices.items():
            if layer not in results:
                raise ValueError(f"no PCA result for layer {layer}; layers: {sorted(results)}")
            n = results[layer].components.shape[0]
            bad = [i for i in ids if not 0 <= i < n]
            if bad:
                raise ValueError(f"layer {layer}: component index(es) {bad} out of range (0..{n - 1})")
            if ids:
                chosen[int(layer)] = sorted({int(i) for i in ids})
        return chosen
    ranked = sorted((c for c in contrast if abs(c.score) >= min_contrast), key=lambda c: abs(c.score), reverse=True)
    for c in ranked[:max_selected] if max_selected is not None else ranked:
        chosen.setdefault(c.layer, []).append(c.latent)
    return {layer: sorted(ids) for layer, ids in sorted(chosen.items())}


def contrast_pca(
    model: torch.nn.Module, tokenizer: Any, texts_a: Any, texts_b: Any, results: Mapping[int, PCAResult], **kwargs: Any
) -> list[ContrastScore]:
    """Contrast scores (Cohen's d) of every component's projection between two text sets; ``latent`` = index."""
    return contrast_directions(
        model, tokenizer, texts_a, texts_b,
        {layer: r.components for layer, r in results.items()},
        center={layer: r.mean for layer, r in results.items()}, **kwargs,
    )


def directions_config(
    results: Mapping[int, PCAResult],
    chosen: Mapping[int, Sequence[int]],
    *,
    centers: Mapping[int, torch.Tensor] | None = None,
    base_model_name_or_path: str | None = None,
    description: str = "",
) -> ConceptAblationConfig:
    """A projection-mode `ConceptAblationConfig` removing the chosen components.

    `centers` (layer -> ``[d_model]``, e.g. from `mean_activations`) makes it a mean ablation.
    """
    if not chosen:
        raise ValueError("no directions chosen")
    directions = {int(layer): results[layer].components[list(ids)].clone() for layer, ids in chosen.items()}
    return ConceptAblationConfig(
        layers=sorted(directions), mode="projection", directions=directions,
        centers={layer: centers[layer].clone() for layer in directions} if centers else {},
        base_model_name_or_path=base_model_name_or_path, description=description,
    )


def save_pca(results: Mapping[int, PCAResult], path: str | os.PathLike) -> tuple[Path, Path]:
    """Write components/means/variances as ``<stem>.safetensors`` and examples as ``<stem>.json`` (atomically)."""
    stem = file_stem(path)
    tensors = {}
    for layer, r in results.items():
        tensors[f"layers.{layer}.components"] = r.components.contiguous()
        tensors[f"layers.{layer}.mean"] = r.mean.contiguous()
        tensors[f"layers.{layer}.explained_variance"] = r.explained_variance.contiguous()
        tensors[f"layers.{layer}.explained_variance_ratio"] = r.explained_variance_ratio.contiguous()
    weights, sidecar = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp))
    meta = {
        str(layer): {
            "n_tokens": r.n_tokens,
            "explained_variance_ratio": [round(float(v), 6) for v in r.explained_variance_ratio],
            "top_examples": [[e.to_dict() for e in ex] for ex in r.top_examples],
            "bottom_examples": [[e.to_dict() for e in ex] for ex in r.bottom_examples],
        }
        for layer, r in results.items()
    }
    write_json_atomic(sidecar, meta)
    return weights, sidecar


def load_pca(path: str | os.PathLike) -> dict[int, PCAResult]:
    """Read components written by `save_pca` (examples are not restored)."""
    stem = file_stem(path)
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    layers = sorted({int(k.split(".")[1]) for k in tensors})
    return {
        layer: PCAResult(
            layer,
            tensors[f"layers.{layer}.components"],
            tensors[f"layers.{layer}.explained_variance"],
            tensors[f"layers.{layer}.explained_variance_ratio"],
            tensors[f"layers.{layer}.mean"],
        )
        for layer in layers
    }
