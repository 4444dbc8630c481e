"""PCA directions: a planted direction is recovered (in plain data, in a model, and in a model difference)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import HIDDEN, make_tiny_model, make_tiny_tokenizer

from hf_concept_ablation import (
    ConceptAblation,
    find_decoder_layers,
    inject_concept_ablation,
)
from hf_concept_ablation.search.activations import iter_residuals
from hf_concept_ablation.search.pca import (
    concept_directions,
    contrast_pca,
    directions_config,
    load_pca,
    pca,
    pca_directions,
    save_pca,
    select_directions,
)


def _unit(d, seed):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _texts(n=24, seed=0, extra=None):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [f"w{rng.randrange(6, 100)}" for _ in range(rng.randrange(4, 12))]
        if extra:
            words.insert(rng.randrange(len(words)), extra)
        out.append(" ".join(words))
    return out


def test_pca_recovers_a_planted_direction_in_synthetic_data():
    gen = torch.Generator().manual_seed(0)
    planted = _unit(32, 1)
    x = 0.3 * torch.randn(2000, 32, generator=gen) + 5.0 * torch.randn(2000, 1, generator=gen) * planted + 3.0
    components, variance, ratio, mean = pca(x, 4)
    assert components.shape == (4, 32)
    assert abs(float(components[0] @ planted)) > 0.99
    assert torch.allclose(components @ components.T, torch.eye(4), atol=1e-5)
    assert variance[0] > 10 * variance[1] and ratio[0] > 0.8
    assert torch.allclose(mean, x.mean(0), atol=1e-4)
    # sign convention: the largest absolute projection is positive
    proj = (x - mean) @ components[0]
    assert proj[proj.abs().argmax()] > 0
    with pytest.raises(ValueError, match="PCA needs"):
        pca(x[:1], 2)


def test_difference_pca_recovers_a_direction_added_by_the_other_model(tmp_path):
    model, tokenizer = make_tiny_model("gemma2"), make_tiny_tokenizer()
    other = copy.deepcopy(model)
    planted = _unit(HIDDEN, 7)
    _, layers = find_decoder_layers(other)

    def add_planted(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        coef = 3.0 * torch.randn(hidden.shape[:2], generator=torch.Generator().manual_seed(hidden.shape[1]))
        hidden = hidden + coef[..., None] * planted
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    layers[2].register_forward_hook(add_planted)
    results = pca_directions(model, tokenizer, _texts(), [2], n_components=3, other_model=other, progress=False)
    result = results[2]
    assert abs(float(result.components[0] @ planted)) > 0.99
    assert result.explained_variance_ratio[0] > 0.9
    assert len(result.top_examples[0]) == 5 and len(result.bottom_examples[0]) == 5
    top = result.top_examples[0][0]
    assert top.value == pytest.approx(max(top.acts)) and top.value >= result.bottom_examples[0][0].value


def test_components_are_selectable_by_contrast_and_index_and_ablate_in_projection_mode(tmp_path):
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()
    texts = _texts(30, seed=1) + _texts(30, seed=2, extra="w120")
    results = pca_directions(model, tokenizer, texts, [1, 3], n_components=6, n_examples=2, progress=False)
    assert set(results) == {1, 3} and results[1].components.shape == (6, HIDDEN)
    assert results[1].top_examples[0][0].kind == "top" and results[1].bottom_examples[0][0].kind == "bottom"

    contrast = contrast_pca(model, tokenizer, _texts(12, seed=3, extra="w120"), _texts(12, seed=3), results)
    assert len(contrast) == 12 and abs(contrast[0].score) >= abs(contrast[-1].score)
    chosen = select_directions(results, contrast=contrast, min_contrast=0.0, max_selected=3)
    assert sum(map(len, chosen.values())) == 3
    best = contrast[0]
    assert best.latent in chosen[best.layer]
    assert select_directions(results, indices={3: [2, 0]}) == {3: [0, 2]}
    with pytest.raises(ValueError, match="out of range"):
        select_directions(results, indices={3: [6]})
    with pytest.raises(ValueError, match="either indices or contrast"):
        select_directions(results)

    config = directions_config(results, {3: [0, 2]}, description="test")
    assert config.mode == "projection" and config.layers == [3]
    handle = inject_concept_ablation(model, config)
    handle.save_pretrained(tmp_path / "adapter")
    handle.remove()
    loaded = ConceptAblation.from_pretrained(model, tmp_path / "adapter")
    q = loaded.layers[3].Q.double()
    basis = results[3].components[[0, 2]]
    # the saved projection spans exactly the chosen components
    assert torch.allclose(q @ (q.T @ basis.T.double()), basis.T.double(), atol=1e-5)
    loaded.remove()

    weights, sidecar = save_pca(results, tmp_path / "pca")
    again = load_pca(weights)
    assert torch.equal(again[1].components, results[1].components)
    assert sidecar.is_file()


def _mean_vectors(model, tokenizer, texts, layer):
    rows = []
    for batch in iter_residuals(model, tokenizer, texts, [layer], progress=False):
        keep = batch.keep[..., None].float()
        rows.append((batch.hidden[layer] * keep).sum(1) / keep.sum(1))
    return torch.cat(rows).double()


def test_concept_directions_are_the_pca_of_paired_differences_pointing_from_b_to_a():
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer()
    b = _texts(16, seed=4)
    a = [text.replace(text.split()[0], "w120", 1) for text in b]  # a mirrors b with one word swapped
    results = concept_directions(model, tokenizer, a, b, [1, 2], n_components=3, paired=True)
    assert set(results) == {1, 2}
    diffs = _mean_vectors(model, tokenizer, a, 2) - _mean_vectors(model, tokenizer, b, 2)
    expected, _, ratio, _ = pca(diffs, 3, center=False)
    got = results[2].components.double()
    assert got.shape == (3, HIDDEN)
    assert torch.allclose(got.abs(), expected.double().abs(), atol=1e-4)
    assert torch.all(got @ diffs.mean(0) > 0)  # oriented from b to a
    assert torch.allclose(results[2].explained_variance_ratio, ratio, atol=1e-5)

    unpaired = concept_directions(model, tokenizer, a, b[:10], [2])
    mean_diff = _mean_vectors(model, tokenizer, a, 2).mean(0) - _mean_vectors(model, tokenizer, b[:10], 2).mean(0)
    assert torch.allclose(unpaired[2].components[0].double(), mean_diff / mean_diff.norm(), atol=1e-5)
    with pytest.raises(ValueError, match="n_components=2"):
        concept_directions(model, tokenizer, a, b, [2], n_components=2)
    with pytest.raises(ValueError, match="equal counts"):
        concept_directions(model, tokenizer, a, b[:10], [2], paired=True)


def test_pca_gives_no_components_beyond_the_rank_of_its_data():
    from hf_concept_ablation.search.pca import pca

    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="3 rows of rank 2 give only 2 of the 6 components"):
        components, variances, _, _ = pca(x, 6)  # centred: 3 points span a plane
    assert components.shape == (2, 16) and bool((variances > 1e-3).all())
    with pytest.raises(ValueError, match="the 4 rows are all the same point"):
        pca(torch.ones(4, 16), 2)
