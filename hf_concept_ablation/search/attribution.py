"""Attribution of SAE latents to a metric (the CAFT paper's equation 1).

For every latent ``i`` of every hooked layer,
``E_i = mean over examples of sum over positions t (not BOS, not padding) of
(grad_x m . W_dec[i]) * f_i(x_t)``, where ``x`` is the layer's output and ``m`` is
the metric: the logit difference between the answer and the distractor at the last
position (multiple-choice data), or minus the language-modelling loss (free-form text).
One forward and one backward pass per batch serve all layers; the SAEs are not in the graph.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets
import torch
from sae_lens import SAE
from tqdm.auto import tqdm

from ..adapter.layer import keep_positions, layer_hidden, special_token_ids
from ..adapter.model import find_decoder_layers, get_concept_ablation
from ..adapter.sae_sources import check_saes_fit_model
from ..files import atomic_path, write_json_atomic
from ..tasks.evaluation import answer_gap, encode_prompts, first_token_ids

METRICS = ("logit_diff", "loss")


@dataclass(frozen=True)
class LatentEffect:
    """One row of an attribution table."""

    layer: int
    latent: int
    effect: float


def _metric(model, batch: dict[str, torch.Tensor], metric: str, answers=None, distractors=None) -> torch.Tensor:
    if metric == "logit_diff":
        logits = model(**batch, logits_to_keep=1).logits[:, -1].float()
        return answer_gap(logits, answers, distractors).sum()
    logits = model(**batch).logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return -torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")


def attribute_latents(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: datasets.Dataset,
    saes: Mapping[int, SAE],
    *,
    metric: str = "logit_diff",
    batch_size: int = 8,
    top: int | None = 100,
) -> list[LatentEffect]:
    """Rank the latents of `saes` (layer -> SAE on that layer's output) by |effect| on the metric.

    `dataset` has ``prompt``, ``answer``, ``distractor`` columns for ``logit_diff``, or a
    ``text`` column for ``loss``. Returns the `top` latents over all layers (all if None),
    sign kept. Any injected concept ablation is disabled while attributing.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    column = "prompt" if metric == "logit_diff" else "text"
    if column not in dataset.column_names:
        raise ValueError(f"metric {metric!r} needs a {column!r} column; dataset has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("cannot attribute on an empty dataset")
    check_saes_fit_model(model, saes)  # before minutes of attribution, not at the end
    _, decoder_layers = find_decoder_layers(model)
    skip_ids = special_token_ids(tokenizer)
    answers = first_token_ids(tokenizer, dataset["answer"]) if metric == "logit_diff" else None
    distractors = first_token_ids(tokenizer, dataset["distractor"]) if metric == "logit_diff" else None
    device = next(model.parameters()).device
    totals = {layer: torch.zeros(sae.cfg.d_sae, dtype=torch.float64) for layer, sae in saes.items()}
    outputs: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(_module, _args, output):
            hidden = layer_hidden(output)
            if not hidden.requires_grad:  # a frozen model: the gradient starts here
                hidden.requires_grad_()
            hidden.retain_grad()
            outputs[layer] = hidden

        return hook

    handles = [decoder_layers[layer].register_forward_hook(capture(layer)) for layer in saes]
    ablation = get_concept_ablation(model)
    was_training = model.training
    model.eval()
    try:
        with ablation.disabled() if ablation is not None else contextlib.nullcontext():
            for start in tqdm(range(0, len(dataset), batch_size), desc="attribution", leave=False):
                batch = encode_prompts(tokenizer, dataset[column][start : start + batch_size], device)
                a = answers[start : start + batch_size].to(device) if answers is not None else None
                d = distractors[start : start + batch_size].to(device) if distractors is not None else None
                model.zero_grad(set_to_none=True)
                _metric(model, batch, metric, a, d).backward()
                keep = keep_positions(batch["input_ids"], batch["attention_mask"], skip_ids).unsqueeze(-1)
                with torch.no_grad():
                    for layer, sae in saes.items():
                        x, grad = outputs[layer].detach(), outputs[layer].grad
                        sae_dtype = sae.W_dec.dtype
                        acts = sae.encode(x.to(sae_dtype))
                        grad_dec = grad.to(sae_dtype) @ sae.W_dec.T
                        totals[layer] += ((grad_dec * acts) * keep).sum(dim=(0, 1)).double().cpu()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return _ranked(totals, len(dataset), top)


def _ranked(totals: Mapping[int, torch.Tensor], count: int, top: int | None) -> list[LatentEffect]:
    """The latents of `totals` (layer -> summed effects) by descending |mean effect|, ties in layer
    then latent order; sorted in torch so that only the returned rows become Python objects."""
    layers = list(totals)
    if not layers:
        return []
    effects = torch.cat([totals[layer] for layer in layers]) / count
    order = torch.sort(effects.abs(), descending=True, stable=True).indices
    if top is not None:
        order = order[:top]
    starts = torch.tensor([0] + [totals[layer].numel() for layer in layers]).cumsum(0)
    positions = (torch.searchsorted(starts, order, right=True) - 1).tolist()
    starts_list, values = starts.tolist(), effects[order].tolist()
    return [LatentEffect(layers[p], i - starts_list[p], v) for i, p, v in zip(order.tolist(), positions, values)]


def save_attribution(rows: Sequence[LatentEffect], path_stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write the table as ``<stem>.csv`` and ``<stem>.json`` (atomically); returns both paths."""
    stem = Path(path_stem)
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["rank", "layer", "latent", "effect"])
        writer.writeheader()
        for rank, row in enumerate(rows, 1):
            writer.writerow({"rank": rank, **asdict(row)})
    write_json_atomic(json_path, [asdict(r) for r in rows])
    return csv_path, json_path


def load_attribution(path: str | os.PathLike) -> list[LatentEffect]:
    """Read a table written by `save_attribution` (the JSON file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return [LatentEffect(int(r["layer"]), int(r["latent"]), float(r["effect"])) for r in data]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not an attribution table written by save_attribution: {err}") from err
