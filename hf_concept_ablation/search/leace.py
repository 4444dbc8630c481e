"""LEACE erasers of a concept at every decoder layer, fitted with ``concept_erasure.LeaceFitter``.

Two sources of the concept, both label-based at heart:

- labeled examples: texts (e.g. a task's training prompts) with a label naming the unintended attribute
  (gender task: the profession group's stereotyped gender; double MC: the unintended answer's value);
- contrast texts: two sets of texts that differ in the concept (e.g. female and male sentences), labeled
  by their set; they need no task labels.

Every counted position of a text (not BOS, not padding; or only its last one) is one sample, labeled
with its text's label; classes are one-hot encoded, so a binary concept gives a rank-1 eraser per layer.
The erasers are fitted on the model's own activations (any injected ablation is off while they are fitted), each
layer independently, or ``sequential``: layer after layer, each on the activations with the erasers before it
applied, as they are in use (the layer-wise scrubbing of ``concept_erasure.ConceptScrubber``, for any
decoder), so that with every eraser on no linear trace of the concept is left at any layer.
`random_eraser_config` is the control: the same fit with labels drawn at random, so it removes a random
direction of the same rank, measured in the same (whitened) geometry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any, Literal, Sequence

import torch
from concept_erasure import LeaceEraser, LeaceFitter
from tqdm.auto import tqdm

from ..adapter.config import ConceptAblationConfig
from ..adapter.layer import ConceptAblationLayer
from ..adapter.model import find_decoder_layers, get_concept_ablation
from ..adapter.residuals import decoder_layer_calls
from .activations import as_text_list, iter_residuals, token_batches

Positions = Literal["all", "last"]
POSITIONS: tuple[str, ...] = ("all", "last")


def one_hot_labels(labels: Sequence[Any]) -> tuple[torch.Tensor, list[str]]:
    """``[n, k]`` one-hot rows of `labels` and the sorted class names; fewer than 2 classes is an error."""
    names = sorted({str(label) for label in labels})
    if len(names) < 2:
        raise ValueError(f"the concept labels must take at least 2 values to erase anything, got {names}")
    index = {name: i for i, name in enumerate(names)}
    z = torch.zeros(len(labels), len(names))
    z[torch.arange(len(labels)), torch.tensor([index[str(label)] for label in labels])] = 1.0
    return z, names


def _positions_mask(keep: torch.Tensor, positions: str) -> torch.Tensor:
    if positions == "all":
        return keep
    last = keep.long().cumsum(-1).argmax(-1)  # the last counted position of each row
    mask = torch.zeros_like(keep)
    mask[torch.arange(keep.shape[0]), last] = keep.any(-1)
    return mask


def fit_leace_erasers(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    z: torch.Tensor,
    layers: Sequence[int] | None = None,
    *,
    positions: Positions = "all",
    sequential: bool = False,
    batch_size: int = 16,
    max_length: int = 128,
    progress: bool = True,
) -> dict[int, LeaceEraser]:
    """One ``concept_erasure.LeaceEraser`` per decoder layer (default: every one), fitted on the residual-stream
    output at `positions` of `texts`, each position labeled with its text's row of `z` ``[n_texts, k]``: on the base
    model's activations in one pass, or `sequential`: layer after layer, with the erasers fitted so far applied as an
    injected ablation applies them (one forward pass records the decoder layers' calls; then each layer runs once)."""
    texts = as_text_list(texts)
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    z = torch.as_tensor(z, dtype=torch.float64)
    z = z[:, None] if z.ndim == 1 else z
    if z.shape[0] != len(texts):
        raise ValueError(f"got {z.shape[0]} label rows for {len(texts)} texts")
    _, decoder_layers = find_decoder_layers(model)
    layers = list(range(len(decoder_layers))) if layers is None else sorted({int(layer) for layer in layers})
    common = {"positions": positions, "batch_size": batch_size, "max_length": max_length}
    if not sequential:
        return _fit(model, tokenizer, texts, z, layers, progress=progress, **common)
    ablation = get_concept_ablation(model)
    with ablation.disabled() if ablation is not None else contextlib.nullcontext():
        return _fit_sequential(model, tokenizer, texts, z, layers, progress=progress, **common)


def _update(fitter: LeaceFitter, hidden: torch.Tensor, keep: torch.Tensor, doc_ids: torch.Tensor, z: torch.Tensor,
            positions: str) -> None:
    """Add the counted `positions` of one batch of a layer's output, each labeled with its text's row of `z`."""
    mask = _positions_mask(keep.cpu(), positions)
    fitter.update(hidden.cpu()[mask].to(torch.float64), z[doc_ids].unsqueeze(1).expand(-1, mask.shape[1], -1)[mask])


def _fit(model: torch.nn.Module, tokenizer: Any, texts: list[str], z: torch.Tensor, layers: list[int], *,
         positions: str, batch_size: int, max_length: int, progress: bool) -> dict[int, LeaceEraser]:
    """The erasers of `layers`, fitted on the base model's activations in one pass over `texts`."""
    d_model = model.get_input_embeddings().weight.shape[-1]
    fitters = {layer: LeaceFitter(d_model, z.shape[1], dtype=torch.float64) for layer in layers}
    for batch in iter_residuals(model, tokenizer, texts, layers, batch_size=batch_size, max_length=max_length,
                                desc="fitting LEACE erasers", progress=progress):
        for layer, fitter in fitters.items():
            _update(fitter, batch.hidden[layer], batch.keep, batch.doc_ids, z, positions)
    return {layer: fitter.eraser for layer, fitter in fitters.items()}


@torch.no_grad()
def _fit_sequential(model: torch.nn.Module, tokenizer: Any, texts: list[str], z: torch.Tensor, layers: list[int], *,
                    positions: str, batch_size: int, max_length: int, progress: bool) -> dict[int, LeaceEraser]:
    """The erasers of `layers`, each fitted on its layer's output with the erasers before it applied, as the injected
    ablation applies them (at the counted positions, in the model's dtype). The decoder layers' calls are recorded in
    one forward pass; then each layer runs once, on the erased output of the one before."""
    _, decoder_layers = find_decoder_layers(model)
    d_model = model.get_input_embeddings().weight.shape[-1]
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        batches = [(torch.arange(start, start + batch["input_ids"].shape[0]), keep.to(parameter.device),
                    decoder_layer_calls(model, batch["input_ids"].to(parameter.device),
                                        batch["attention_mask"].to(parameter.device), layers[-1]))
                   for start, batch, keep in token_batches(tokenizer, texts, batch_size, max_length)]
        hidden = [calls[0].hidden for _, _, calls in batches]
        erasers: dict[int, LeaceEraser] = {}
        for index in tqdm(range(layers[-1] + 1), desc="fitting LEACE erasers layer by layer", disable=not progress):
            hidden = [calls[index].run(decoder_layers[index], h) for h, (_, _, calls) in zip(hidden, batches)]
            if index not in layers:
                continue
            fitter = LeaceFitter(d_model, z.shape[1], dtype=torch.float64)
            for h, (doc_ids, keep, _) in zip(hidden, batches):
                _update(fitter, h, keep, doc_ids, z, positions)
            erasers[index] = fitter.eraser
            if removes_something(erasers[index]):
                module = ConceptAblationLayer.from_eraser(erasers[index].proj_left, erasers[index].proj_right,
                                                          erasers[index].bias).to(parameter.device, parameter.dtype)
                hidden = [module(h, keep) for h, (_, keep, _) in zip(hidden, batches)]
    finally:
        model.train(was_training)
    return erasers


def removes_something(eraser: LeaceEraser) -> bool:
    """Whether `eraser` is not the identity (the library returns the identity where the labels covary with the
    activations too weakly: its whitened cross-covariance is under ``svd_tol``)."""
    return bool((eraser.proj_left @ eraser.proj_right).abs().max() > 0)


def texts_sha256(texts: Sequence[str], labels: Sequence[Any]) -> str:
    """A fingerprint of the fitting data (texts and their labels, in order)."""
    return hashlib.sha256(json.dumps([list(texts), [str(label) for label in labels]]).encode()).hexdigest()


def leace_config(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[Any],
    *,
    fitted_on: dict[str, Any],
    layers: Sequence[int] | None = None,
    positions: Positions = "all",
    sequential: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> ConceptAblationConfig:
    """A ``leace`` adapter config erasing the concept that `labels` name from `texts`' activations at every layer in
    `layers` (default: all), fitted as `fit_leace_erasers` does (`sequential`: layer after layer). `fitted_on`
    describes the source (e.g. ``{"source": "labels", "column": "gender"}``); the class names, counts, positions,
    fit and a fingerprint of the data are added to it."""
    texts = as_text_list(texts)
    z, classes = one_hot_labels(labels)
    erasers = fit_leace_erasers(model, tokenizer, texts, z, layers, positions=positions, sequential=sequential,
                                batch_size=batch_size, progress=progress)
    record = {**fitted_on, "classes": classes, "texts": len(texts), "positions": positions,
              "fit": "sequential" if sequential else "independent", "sha256": texts_sha256(texts, labels)}
    return _erasers_config(model, erasers, record, f"LEACE eraser of {classes} ({fitted_on.get('source', '?')})")


def random_eraser_config(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    rank: int,
    seed: int,
    *,
    layers: Sequence[int] | None = None,
    positions: Positions = "all",
    batch_size: int = 16,
    progress: bool = True,
) -> ConceptAblationConfig:
    """The control of `leace_config`: erasers fitted on the same `texts` with `rank` + 1 classes drawn at random per
    text (seeded), so each layer's eraser has rank `rank` and removes a direction unrelated to any concept."""
    texts = as_text_list(texts)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, rank + 1, (len(texts),), generator=generator).tolist()
    z, _ = one_hot_labels(labels)
    erasers = fit_leace_erasers(model, tokenizer, texts, z, layers, positions=positions, batch_size=batch_size,
                                progress=progress)
    record = {"source": "random labels", "seed": seed, "rank": rank, "texts": len(texts), "positions": positions,
              "sha256": texts_sha256(texts, labels)}
    return _erasers_config(model, erasers, record, f"random eraser of rank {rank}, seed {seed}")


def _erasers_config(model: torch.nn.Module, erasers: dict[int, Any], fitted_on: dict[str, Any],
                    description: str) -> ConceptAblationConfig:
    """The ``leace`` config of the fitted `erasers`, leaving out layers where the labels covary too weakly with the
    activations for the library to erase anything (its whitened cross-covariance is under ``svd_tol``, so the eraser
    is the identity; listed in ``fitted_on["nothing_to_erase"]``)."""
    empty = [layer for layer, e in erasers.items() if not removes_something(e)]
    if len(empty) == len(erasers):
        raise ValueError(f"nothing to erase: the labels do not covary with the activations at any of layers "
                         f"{sorted(erasers)} (do the texts of the classes differ in their tokens?)")
    erasers = {layer: e for layer, e in erasers.items() if layer not in empty}
    fitted_on = {**fitted_on, **({"nothing_to_erase": sorted(empty)} if empty else {})}
    return ConceptAblationConfig(layers=sorted(erasers), mode="leace", erasers=erasers, fitted_on=fitted_on,
                                 base_model_name_or_path=getattr(model.config, "name_or_path", None) or None,
                                 description=description)
