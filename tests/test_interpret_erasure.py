"""`concept_decodability`: does an ablation leave a concept linearly decodable? (tiny random model)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import HIDDEN, make_tiny_model, make_tiny_tokenizer

from hf_concept_ablation import (
    ConceptAblationConfig,
    get_concept_ablation,
    inject_concept_ablation,
)
from hf_concept_ablation.search.erasure import (
    concept_decodability,
    probe_accuracy,
    select_until_erased,
)


def test_probe_accuracy_reads_a_separable_label_and_not_a_random_one():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    x = torch.randn(200, 16, generator=gen)
    separable = x + 6.0 * labels[:, None] * torch.nn.functional.one_hot(torch.tensor(3), 16)
    assert probe_accuracy(separable, labels) > 0.95
    shuffled = labels[torch.randperm(200, generator=gen)]
    assert 0.3 < probe_accuracy(x, shuffled) < 0.7
    with pytest.raises(ValueError, match="need two classes"):
        probe_accuracy(x, torch.zeros(200, dtype=torch.long))


def _texts(words: range, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.choice(words)}" for _ in range(6)) for _ in range(n)]


def test_an_ablation_that_removes_everything_leaves_nothing_to_decode_and_the_model_as_it_was():
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer()
    texts_a, texts_b = _texts(range(6, 10), 40, 0), _texts(range(60, 64), 40, 1)  # two small disjoint vocabularies
    with pytest.raises(ValueError, match="no concept ablation injected"):
        concept_decodability(model, tokenizer, texts_a, texts_b, [1])
    everything = ConceptAblationConfig(layers=[1], mode="projection", directions={1: torch.eye(HIDDEN)})
    handle = inject_concept_ablation(model, everything)
    result = concept_decodability(model, tokenizer, texts_a, texts_b, [1])
    assert result[1]["before"] > 0.9 and result[1]["chance"] == 0.5
    assert result[1]["after"] == pytest.approx(0.5, abs=0.1)  # every direction removed: chance
    assert handle.enabled and handle.strength == 1.0  # the ablation is on again afterwards


def test_erasure_driven_selection_takes_the_fewest_ranked_items_that_erase_or_reports_a_failure():
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer()
    texts_a, texts_b = _texts(range(6, 10), 40, 0), _texts(range(60, 64), 40, 1)
    ranked = list(torch.eye(HIDDEN))  # the residual stream's coordinates: all of them erase everything

    def make_config(items):
        return ConceptAblationConfig(layers=[1], mode="projection", directions={1: torch.stack(list(items))})

    chosen, curve = select_until_erased(model, tokenizer, ranked, make_config, texts_a, texts_b, [1], budget=HIDDEN)
    assert curve.erased_at == len(chosen) and curve.target == 0.55
    points = dict(zip(curve.counts, curve.accuracy))
    assert points[0][1] > 0.9 and points[curve.erased_at][1] <= curve.target
    assert points[curve.erased_at - 1][1] > curve.target  # the bisection measured one fewer, which did not erase
    assert get_concept_ablation(model) is None  # every tried ablation was removed again
    assert "bring every probed layer" in curve.describe()

    chosen, failed = select_until_erased(model, tokenizer, ranked, make_config, texts_a, texts_b, [1], budget=2)
    assert failed.erased_at is None and len(chosen) == 2 and failed.counts == [0, 1, 2]
    assert "FAILED to erase" in failed.describe() and failed.to_dict()["accuracy"][0]["1"] > 0.9
