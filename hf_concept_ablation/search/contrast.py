"""Concept contrast without an LLM: which latents tell two small text sets apart.

The user gives two text sets, ``a`` (the concept, e.g. female-themed sentences) and
``b`` (its counterpart, e.g. the same sentences made male). For every latent:

1. each text is reduced to one number, the latent's mean activation over the text's
   counted tokens (not BOS, not padding); ``reduce="max"`` uses the maximum instead,
   which suits latents that fire on a single word;
2. the **contrast score** is the standardised mean difference (Cohen's d)
   ``d = (mean_a - mean_b) / s_pooled``, with
   ``s_pooled = sqrt(((n_a-1) var_a + (n_b-1) var_b) / (n_a+n_b-2))``, floored at
   ``eps * (mean activation over both sets) + 1e-8`` so that a latent that never
   fires scores 0 and a latent with no spread does not divide by zero.

With ``paired=True`` (the sets are aligned mirror images, ``a[i]`` ~ ``b[i]``, as in
`build_gender_concept_texts`), the score is the paired effect size
``d_z = mean(a_i - b_i) / std(a_i - b_i)`` (same floor), which removes the variation
between sentences and is much more sensitive to a word-level concept.

The sign says which set the latent prefers (positive: ``a``). Both signs carry the
concept (a "male" latent and a "female" latent are both gender), so selection uses
``|d|``. With ~30 texts per set, a latent unrelated to the concept has
``|d|`` around 0.25, so the default threshold 1.0 ("large effect") is about 4 standard
errors out.

**Combining with attribution** (`combine_with_attribution`), two documented rules:

* ``"threshold"`` (default): keep the latents of the attribution top ``top_n`` whose
  ``|d| >= min_contrast``, ordered by ``|effect|``. Attribution says the latent matters
  for the task's answer, the contrast says it carries the concept.
* ``"product"``: rank the attribution top ``top_n`` by
  ``(|effect| / max |effect|) * (|d| / max |d|)`` (both normalised to [0, 1] over the
  candidates) and keep those whose ``|d| >= min_contrast``.

Either way at most ``max_selected`` latents are returned. With ``two_sided=False`` only
latents that prefer set ``a`` count (``d >= min_contrast``): use it when ``b`` is not the
concept's mirror image but something to keep, e.g. the intended task in double multiple
choice, whose own latents must not be removed. The same scoring serves any
feature, such as the projections on PCA directions (`contrast_directions`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from sae_lens import SAE

from ..files import write_json_atomic
from .activations import as_text_list, encoders_for, iter_residuals
from .attribution import LatentEffect
from .config import REDUCTIONS, RULES


@dataclass(frozen=True)
class ContrastScore:
    """Contrast of one latent (or direction ``index``) at a layer between text sets a and b."""

    layer: int
    latent: int
    mean_a: float
    mean_b: float
    score: float


@dataclass(frozen=True)
class SelectedLatent:
    """A latent chosen by combining attribution and contrast."""

    layer: int
    latent: int
    effect: float
    contrast: float
    score: float


def cohens_d(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Standardised mean difference of per-text values ``a`` ``[n_a, K]`` and ``b`` ``[n_b, K]`` (see the module doc)."""
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    a, b = a.double(), b.double()
    n_a, n_b = a.shape[0], b.shape[0]
    if n_a < 2 or n_b < 2:
        raise ValueError(f"each text set needs at least 2 texts for a contrast, got {n_a} and {n_b}")
    var = ((n_a - 1) * a.var(dim=0) + (n_b - 1) * b.var(dim=0)) / (n_a + n_b - 2)
    scale = torch.cat([a, b]).abs().mean(dim=0)
    std = torch.maximum(var.sqrt(), eps * scale + 1e-8)
    return ((a.mean(dim=0) - b.mean(dim=0)) / std).float()


def paired_d(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Paired effect size ``mean(a - b) / std(a - b)`` of aligned per-text values ``[n, K]`` (see the module doc)."""
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    if a.shape != b.shape:
        raise ValueError(f"a paired contrast needs aligned text sets of equal size, got {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] < 2:
        raise ValueError(f"a paired contrast needs at least 2 pairs, got {a.shape[0]}")
    diff = a.double() - b.double()
    scale = torch.cat([a, b]).double().abs().mean(dim=0)
    std = torch.maximum(diff.std(dim=0), eps * scale + 1e-8)
    return (diff.mean(dim=0) / std).float()


def _per_text(values: torch.Tensor, keep: torch.Tensor, reduce: str) -> torch.Tensor:
    """Reduce ``[batch, seq, K]`` to ``[batch, K]`` over the counted positions."""
    mask = keep.unsqueeze(-1)
    if reduce == "mean":
        return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return values.masked_fill(~mask, float("-inf")).max(dim=1).values.nan_to_num(0.0, neginf=0.0)


def per_text_values(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], layers: Sequence[int],
                    featurize: Any, reduce: str = "mean", batch_size: int = 8, max_length: int = 128,
                    desc: str = "activations", ablated: bool = False) -> torch.Tensor:
    """``featurize(hidden)`` (layer -> ``[batch, seq, d]`` to ``[batch, seq, K]``) reduced per text: ``[n_texts, K]``
    (`ablated`: with the model's concept ablation on)."""
    rows = []
    for batch in iter_residuals(model, tokenizer, texts, layers, batch_size=batch_size, max_length=max_length,
                                desc=desc, progress=False, ablated=ablated):
        rows.append(_per_text(featurize(batch.hidden), batch.keep, reduce))
    return torch.cat(rows)


def contrast_latents(
    model: torch.nn.Module,
    tokenizer: Any,
    texts_a: Any,
    texts_b: Any,
    saes: Mapping[int, SAE],
    latents: Sequence[tuple[int, int]] | None = None,
    *,
    reduce: str = "mean",
    paired: bool = False,
    batch_size: int = 8,
    max_length: int = 128,
) -> list[ContrastScore]:
    """Contrast scores (Cohen's d, or paired d_z, see the module doc) of latents between two text sets, by ``|d|`` descending.

    `latents`: (layer, latent) pairs to score; ``None`` scores every latent of every SAE.
    """
    return strongest_contrast_latents(model, tokenizer, [(texts_a, texts_b)], saes, latents, reduce=reduce,
                                      paired=paired, batch_size=batch_size, max_length=max_length)


def strongest_contrast_latents(
    model: torch.nn.Module,
    tokenizer: Any,
    contrasts: Sequence[tuple[Any, Any]],
    saes: Mapping[int, SAE],
    latents: Sequence[tuple[int, int]] | None = None,
    *,
    reduce: str = "mean",
    paired: bool = False,
    batch_size: int = 8,
    max_length: int = 128,
) -> list[ContrastScore]:
    """Each latent's score with the largest ``|d|`` over several ``(a, b)`` text-set pairs, by ``|d|`` descending.

    Every distinct text runs through the model once, however many pairs it is in (one-vs-rest
    contrasts reuse the same texts).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if not contrasts:
        raise ValueError("strongest_contrast_latents needs at least one (a, b) pair of text sets")
    pairs = [(as_text_list(a), as_text_list(b)) for a, b in contrasts]
    texts = list(dict.fromkeys(t for a, b in pairs for t in (*a, *b)))
    row_of = {text: i for i, text in enumerate(texts)}
    encoders, order = encoders_for(model, saes, latents)

    def featurize(hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.cat([enc(hidden[layer]) for layer, enc in encoders.items()], dim=-1)

    values = per_text_values(model, tokenizer, texts, list(encoders), featurize, reduce, batch_size, max_length,
                             "contrast")
    best: dict[tuple[int, int], ContrastScore] = {}
    for a, b in pairs:
        rows = _scores(order, values[[row_of[t] for t in a]], values[[row_of[t] for t in b]], paired)
        for row in rows:
            key = (row.layer, row.latent)
            if key not in best or abs(row.score) > abs(best[key].score):
                best[key] = row
    return sorted(best.values(), key=lambda r: abs(r.score), reverse=True)


def contrast_directions(
    model: torch.nn.Module,
    tokenizer: Any,
    texts_a: Any,
    texts_b: Any,
    directions: Mapping[int, torch.Tensor],
    *,
    center: Mapping[int, torch.Tensor] | None = None,
    reduce: str = "mean",
    paired: bool = False,
    batch_size: int = 8,
    max_length: int = 128,
) -> list[ContrastScore]:
    """Contrast scores of projections on directions (layer -> ``[n, d_model]``); ``latent`` is the row index.

    `center` (layer -> ``[d_model]``, e.g. a PCA mean) is subtracted before projecting.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    texts_a, texts_b = as_text_list(texts_a), as_text_list(texts_b)
    layers = sorted(directions)
    dirs = {layer: torch.as_tensor(directions[layer], dtype=torch.float32) for layer in layers}
    means = {layer: torch.as_tensor(center[layer], dtype=torch.float32) if center and layer in center else 0.0
             for layer in layers}
    order = [(layer, i) for layer in layers for i in range(dirs[layer].shape[0])]

    def featurize(hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.cat([(hidden[layer] - means[layer]) @ dirs[layer].T for layer in layers], dim=-1)

    a = per_text_values(model, tokenizer, texts_a, layers, featurize, reduce, batch_size, max_length, "contrast a")
    b = per_text_values(model, tokenizer, texts_b, layers, featurize, reduce, batch_size, max_length, "contrast b")
    return _scores(order, a, b, paired)


def _scores(order: list[tuple[int, int]], a: torch.Tensor, b: torch.Tensor, paired: bool = False) -> list[ContrastScore]:
    d = paired_d(a, b) if paired else cohens_d(a, b)
    mean_a, mean_b = a.mean(dim=0), b.mean(dim=0)
    rows = [
        ContrastScore(layer, latent, float(mean_a[k]), float(mean_b[k]), float(d[k]))
        for k, (layer, latent) in enumerate(order)
    ]
    rows.sort(key=lambda r: abs(r.score), reverse=True)
    return rows


def combine_with_attribution(
    attribution: Sequence[LatentEffect],
    contrast: Sequence[ContrastScore] | Mapping[tuple[int, int], float],
    *,
    rule: str = "threshold",
    top_n: int = 100,
    min_contrast: float = 1.0,
    max_selected: int | None = 20,
    two_sided: bool = True,
) -> list[SelectedLatent]:
    """Select latents that matter for the task *and* carry the concept (rules in the module doc)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not isinstance(contrast, Mapping):
        contrast = {(c.layer, c.latent): c.score for c in contrast}
    candidates = sorted(attribution, key=lambda r: abs(r.effect), reverse=True)[:top_n]
    missing = [(r.layer, r.latent) for r in candidates if (r.layer, r.latent) not in contrast]
    if missing:
        raise ValueError(f"no contrast score for attributed latent(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
    if not candidates:
        return []
    max_effect = max(abs(r.effect) for r in candidates) or 1.0
    max_contrast = max(abs(contrast[(r.layer, r.latent)]) for r in candidates) or 1.0
    chosen = []
    for r in candidates:
        c = float(contrast[(r.layer, r.latent)])
        if (abs(c) if two_sided else c) < min_contrast:
            continue
        score = abs(r.effect) if rule == "threshold" else (abs(r.effect) / max_effect) * (abs(c) / max_contrast)
        chosen.append(SelectedLatent(r.layer, r.latent, r.effect, c, float(score)))
    chosen.sort(key=lambda s: s.score, reverse=True)
    return chosen[:max_selected] if max_selected is not None else chosen


def save_contrast(rows: Sequence[ContrastScore], path: str | os.PathLike) -> Path:
    """Write contrast scores as JSON (atomically)."""
    return write_json_atomic(path, [asdict(r) for r in rows])
