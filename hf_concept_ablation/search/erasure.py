"""Does an ablation erase the concept? A linear probe of two text sets with the ablation off and on.

CAFT can only stop fine-tuning from using a concept that the ablation removes. If a linear probe
still tells the concept's two text sets apart (say positive from negative sentences) from the
residual stream after the ablated layer with the ablation on, the concept is still there, and
fine-tuning is free to learn the shortcut through it. `concept_decodability` measures that
before fine-tuning: per layer, the cross-validated accuracy of an L2-regularised logistic
regression on each text's mean residual stream (BOS and padding left out), with the model's
injected ablation off (``before``) and on (``after``). Chance is the larger set's share.

`select_until_erased` turns the check into a selection rule (the label-free route): take the
search's ranked latents or components in order, more and more of them, until the probe falls
to chance + a tolerance at every probed layer, or a budget is spent (a failure to erase, which
it reports as one). Its `ErasureCurve` (count -> probe accuracy per layer) goes into the
search's ``selection.json`` and its dashboard.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch

from ..adapter.config import ConceptAblationConfig
from ..adapter.model import get_concept_ablation, inject_concept_ablation
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
    for when, ablated in (("before", False), ("after", True)):
        scores = _layer_probes(model, tokenizer, texts, labels, layers, ablated=ablated, batch_size=batch_size,
                               max_length=max_length, desc=f"erasure check ({when})")
        for layer in layers:
            accuracy[layer][when] = scores[layer]
    chance = max(len(texts_a), len(texts_b)) / len(texts)
    return {layer: {**accuracy[layer], "chance": chance} for layer in layers}


def _layer_probes(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], labels: torch.Tensor,
                  layers: Sequence[int], *, ablated: bool, batch_size: int = 8, max_length: int = 128,
                  desc: str = "erasure check") -> dict[int, float]:
    """Per layer: `probe_accuracy` of `labels` from each text's mean residual stream (ablation on if `ablated`)."""
    def all_layers(hidden: dict[int, torch.Tensor]) -> torch.Tensor:  # [batch, seq, len(layers) * d_model]
        return torch.cat([hidden[layer] for layer in layers], dim=-1)

    features = per_text_values(model, tokenizer, texts, layers, all_layers, batch_size=batch_size,
                               max_length=max_length, desc=desc, ablated=ablated)
    return {layer: probe_accuracy(per_layer, labels) for layer, per_layer in zip(layers, features.chunk(len(layers), -1))}


Item = TypeVar("Item")


@dataclass
class ErasureCurve:
    """Probe accuracy on the concept texts as more of the ranked items are ablated.

    Attributes:
        counts: how many of the ranked items were ablated at each point (0: none).
        accuracy: per point, layer -> probe accuracy with those items ablated.
        chance: the larger text set's share; target: chance + the tolerance.
        erased_at: the fewest items whose ablation brings every layer to the target, or None when the budget
            was spent without it (a failure to erase).
        budget: the most items tried.
    """

    counts: list[int]
    accuracy: list[dict[int, float]]
    chance: float
    target: float
    erased_at: int | None
    budget: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form (layer keys as strings, accuracies rounded)."""
        data = asdict(self)
        data["accuracy"] = [{str(k): round(v, 3) for k, v in point.items()} for point in self.accuracy]
        return data

    def describe(self) -> str:
        """One line: where the concept was erased, or that it was not within the budget."""
        last = self.accuracy[-1]
        worst = max(last, key=last.get)
        if self.erased_at is not None:
            return (f"erasure-driven selection: {self.erased_at} ablated bring every probed layer to <= "
                    f"{self.target:.2f} (chance {self.chance:.2f})")
        return (f"erasure-driven selection FAILED to erase: with all {self.counts[-1]} of the budget ablated, the probe "
                f"still reads {last[worst]:.2f} at layer {worst} (target <= {self.target:.2f}, chance {self.chance:.2f})")


def select_until_erased(
    model: torch.nn.Module,
    tokenizer: Any,
    ranked: Sequence[Item],
    make_config: Callable[[Sequence[Item]], ConceptAblationConfig],
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    layers: Sequence[int],
    *,
    budget: int = 100,
    tolerance: float = 0.05,
    batch_size: int = 8,
    max_length: int = 128,
    saes: Mapping[int, Any] | None = None,
) -> tuple[list[Item], ErasureCurve]:
    """Ablate the first 1, 2, 4, ... of `ranked` (latents or components, in the search's order; at most `budget`)
    until a probe tells `texts_a` from `texts_b` at no better than chance + `tolerance` at every one of `layers`;
    then narrow down (bisection) to the fewest that do. Returns those items (all `budget` of them, on a failure to
    erase) and the curve. `make_config` builds the adapter config of a prefix of `ranked` (`saes`: passed to the
    injection, e.g. the search's loaded SAEs)."""
    if get_concept_ablation(model) is not None:
        raise ValueError("the model already carries a concept ablation: remove it before the erasure-driven selection")
    budget = min(budget, len(ranked))
    if budget < 1:
        raise ValueError("nothing to select from: the ranking is empty or the budget is 0")
    layers = sorted(set(layers))
    texts = [*texts_a, *texts_b]
    labels = torch.tensor([0] * len(texts_a) + [1] * len(texts_b))
    chance = max(len(texts_a), len(texts_b)) / len(texts)
    target = chance + tolerance
    points: dict[int, dict[int, float]] = {0: _layer_probes(model, tokenizer, texts, labels, layers, ablated=False,
                                                            batch_size=batch_size, max_length=max_length)}

    def measure(count: int) -> bool:
        if count not in points:
            handle = inject_concept_ablation(model, make_config(ranked[:count]), saes=saes)
            try:
                points[count] = _layer_probes(model, tokenizer, texts, labels, layers, ablated=True,
                                              batch_size=batch_size, max_length=max_length,
                                              desc=f"erasure check ({count} ablated)")
            finally:
                handle.remove()
        return all(accuracy <= target for accuracy in points[count].values())

    low, count = 0, 1
    while not measure(count):
        if count == budget:
            curve = ErasureCurve(sorted(points), [points[c] for c in sorted(points)], chance, target, None, budget)
            return list(ranked[:budget]), curve
        low, count = count, min(2 * count, budget)
    high = count
    while high - low > 1:  # the fewest that erase, between the last count that did not and the first that did
        middle = (low + high) // 2
        low, high = (low, middle) if measure(middle) else (middle, high)
    curve = ErasureCurve(sorted(points), [points[c] for c in sorted(points)], chance, target, high, budget)
    return list(ranked[:high]), curve


def describe_decodability(decodability: Mapping[Any, Mapping[str, float]]) -> str:
    """One line: each layer's probe accuracy before -> after the ablation, and chance."""
    chance = next(iter(decodability.values()))["chance"] if decodability else 0.5
    return ("erasure check (probe accuracy on the concept texts, ablation off -> on; chance "
            f"{chance:.2f}): " + ", ".join(f"layer {layer} {v['before']:.2f} -> {v['after']:.2f}"
                                          for layer, v in decodability.items()))
