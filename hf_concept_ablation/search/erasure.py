"""Does an ablation erase the concept? A linear probe of two text sets with the ablation off and on.

CAFT can only stop fine-tuning from using a concept that the ablation removes. If a linear probe
still tells the concept's two text sets apart (say positive from negative sentences) from the
residual stream after the ablated layer with the ablation on, the concept is still there, and
fine-tuning is free to learn the shortcut through it. `concept_decodability` measures that
before fine-tuning: per layer, the cross-validated accuracy of an L2-regularised logistic
regression on each text's mean residual stream (BOS and padding left out), with the model's
injected ablation off (``before``) and on (``after``). Chance is the larger set's share.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..adapter.model import get_concept_ablation
from .contrast import per_text_values


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, folds: int = 5, l2: float = 1e-2,
                   seed: int = 0) -> float:
    """Cross-validated accuracy of a logistic-regression probe of `labels` (0/1, ``[n]``) from `features` ``[n, d]``.

    Each fold's probe is fitted (full-batch L-BFGS) on the other folds' rows, standardised with
    their mean and spread, and scored on its own rows; the accuracy is over all rows.
    """
    x, y = features.double(), labels.double()
    if len(x) != len(y) or len(y) < folds or len(set(y.tolist())) != 2:
        raise ValueError(f"need two classes and at least {folds} rows with one label each (got {len(x)} rows, "
                         f"{len(y)} labels, classes {sorted(set(y.tolist()))})")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    correct = 0
    for held in order.chunk(folds):
        fit = torch.ones(len(y), dtype=torch.bool)
        fit[held] = False
        mean, std = x[fit].mean(0), x[fit].std(0).clamp(min=1e-6)
        weights = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")
        xs = torch.cat([(x[fit] - mean) / std, torch.ones(int(fit.sum()), 1, dtype=torch.float64)], dim=1)

        def loss() -> torch.Tensor:
            optimizer.zero_grad()
            value = torch.nn.functional.binary_cross_entropy_with_logits(xs @ weights, y[fit])
            value = value + l2 * weights[:-1].pow(2).sum()
            value.backward()
            return value

        optimizer.step(loss)
        held_x = torch.cat([(x[held] - mean) / std, torch.ones(len(held), 1, dtype=torch.float64)], dim=1)
        correct += int(((held_x @ weights.detach() > 0).double() == y[held]).sum())
    return correct / len(y)


def concept_decodability(model: torch.nn.Module, tokenizer: Any, texts_a: Sequence[str], texts_b: Sequence[str],
                         layers: Sequence[int], *, batch_size: int = 8, max_length: int = 128
                         ) -> dict[int, dict[str, float]]:
    """Per layer: probe accuracy telling `texts_a` from `texts_b` with the model's concept ablation off
    (``before``) and on (``after``), and ``chance``. The model must carry an injected ablation."""
    if get_concept_ablation(model) is None:
        raise ValueError("the model has no concept ablation injected: nothing to check")
    layers = sorted(set(layers))
    texts = [*texts_a, *texts_b]
    labels = torch.tensor([0] * len(texts_a) + [1] * len(texts_b))
    accuracy: dict[int, dict[str, float]] = {layer: {} for layer in layers}

    def all_layers(hidden: dict[int, torch.Tensor]) -> torch.Tensor:  # [batch, seq, len(layers) * d_model]
        return torch.cat([hidden[layer] for layer in layers], dim=-1)

    for when, ablated in (("before", False), ("after", True)):
        features = per_text_values(model, tokenizer, texts, layers, all_layers, batch_size=batch_size,
                                   max_length=max_length, desc=f"erasure check ({when})", ablated=ablated)
        for layer, per_layer in zip(layers, features.chunk(len(layers), dim=-1)):
            accuracy[layer][when] = probe_accuracy(per_layer, labels)
    chance = max(len(texts_a), len(texts_b)) / len(texts)
    return {layer: {**accuracy[layer], "chance": chance} for layer in layers}


def describe_decodability(decodability: Mapping[Any, Mapping[str, float]]) -> str:
    """One line: each layer's probe accuracy before -> after the ablation, and chance."""
    chance = next(iter(decodability.values()))["chance"] if decodability else 0.5
    return ("erasure check (probe accuracy on the concept texts, ablation off -> on; chance "
            f"{chance:.2f}): " + ", ".join(f"layer {layer} {v['before']:.2f} -> {v['after']:.2f}"
                                          for layer, v in decodability.items()))
