"""`concept_decodability`: does an ablation leave a concept linearly decodable? (tiny random model)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import HIDDEN, make_tiny_model, make_tiny_tokenizer

from hf_concept_ablation import ConceptAblationConfig, inject_concept_ablation
from hf_concept_ablation.search.erasure import concept_decodability, probe_accuracy


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
