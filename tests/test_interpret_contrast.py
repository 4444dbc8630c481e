"""Concept contrast: a planted latent that fires on one text set ranks first; combination rules."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_sae, make_tiny_model, make_tiny_tokenizer

from hf_concept_ablation.search.activations import iter_residuals
from hf_concept_ablation.search.attribution import LatentEffect
from hf_concept_ablation.search.contrast import (
    cohens_d,
    combine_with_attribution,
    contrast_latents,
    paired_d,
    strongest_contrast_latents,
)

PLANTED = 123
CONCEPT_WORDS = ["w50", "w51"]


def _sets(seed=0):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(6, 128) if f"w{i}" not in CONCEPT_WORDS]
    a, b = [], []
    for _ in range(16):
        base = [rng.choice(words) for _ in range(rng.randrange(4, 10))]
        b.append(" ".join(base))
        base.insert(rng.randrange(len(base)), rng.choice(CONCEPT_WORDS))
        a.append(" ".join(base))
    return a, b


def _planted_sae(model, tokenizer, layer):
    """A ReLU SAE whose latent PLANTED reads the direction separating the concept words from the rest."""
    texts_a, _ = _sets(seed=1)
    concept_ids = torch.tensor(tokenizer.convert_tokens_to_ids(CONCEPT_WORDS))
    on, off = [], []
    for batch in iter_residuals(model, tokenizer, texts_a, [layer], progress=False):
        h, is_concept = batch.hidden[layer], torch.isin(batch.input_ids, concept_ids)
        on.append(h[is_concept & batch.keep])
        off.append(h[~is_concept & batch.keep])
    on, off = torch.cat(on), torch.cat(off)
    direction = on.mean(0) - off.mean(0)
    direction = direction / direction.norm()
    sae = make_sae("standard", layer=layer, seed=5)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc[:, PLANTED] = 5 * direction
        sae.b_enc[PLANTED] = -5 * torch.quantile(off @ direction, 0.95)
    return sae


def test_planted_concept_latent_ranks_first():
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()
    saes = {2: _planted_sae(model, tokenizer, 2), 1: make_sae("jumprelu", layer=1, seed=2)}
    texts_a, texts_b = _sets(seed=0)
    scores = contrast_latents(model, tokenizer, texts_a, texts_b, saes)
    assert len(scores) == 2 * 256
    best = scores[0]
    assert (best.layer, best.latent) == (2, PLANTED)
    assert best.score > 1.0 and best.mean_a > best.mean_b
    # the same latent scored on its own gives the same number; "max" reduction agrees on the winner
    alone = contrast_latents(model, tokenizer, texts_a, texts_b, saes, [(2, PLANTED)])
    assert alone[0].score == pytest.approx(best.score, rel=1e-4)
    by_max = contrast_latents(model, tokenizer, texts_a, texts_b, saes, reduce="max")
    assert (by_max[0].layer, by_max[0].latent) == (2, PLANTED)
    # swapping the sets flips the sign
    flipped = contrast_latents(model, tokenizer, texts_b, texts_a, saes, [(2, PLANTED)])
    assert flipped[0].score == pytest.approx(-best.score, rel=1e-4)


def test_cohens_d_is_finite_for_dead_and_constant_latents():
    a = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 4.0], [0.0, 1.0, 3.0]])
    b = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    d = cohens_d(a, b)
    assert torch.isfinite(d).all()
    assert d[0] == 0.0 and d[1] > 100 and d[2] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2"):
        cohens_d(a[:1], b)


def test_combination_rules():
    attribution = [LatentEffect(3, 1, 0.9), LatentEffect(3, 2, -0.5), LatentEffect(6, 7, 0.3), LatentEffect(6, 8, 0.1)]
    contrast = {(3, 1): 0.2, (3, 2): -3.0, (6, 7): 1.5, (6, 8): 4.0}
    chosen = combine_with_attribution(attribution, contrast, rule="threshold", min_contrast=1.0)
    assert [(s.layer, s.latent) for s in chosen] == [(3, 2), (6, 7), (6, 8)]  # by |effect|
    product = combine_with_attribution(attribution, contrast, rule="product", min_contrast=1.0)
    # (3,2): 0.5/0.9*3/4 = 0.417; (6,8): 0.1/0.9*1 = 0.111; (6,7): 0.3/0.9*1.5/4 = 0.125
    assert [(s.layer, s.latent) for s in product] == [(3, 2), (6, 7), (6, 8)]
    assert product[0].score == pytest.approx(0.5 / 0.9 * 3 / 4)
    assert combine_with_attribution(attribution, contrast, top_n=2, min_contrast=1.0)[0].latent == 2
    assert len(combine_with_attribution(attribution, contrast, min_contrast=1.0, max_selected=1)) == 1
    with pytest.raises(ValueError, match="no contrast score"):
        combine_with_attribution(attribution, {(3, 1): 1.0})
    with pytest.raises(ValueError, match="rule must be"):
        combine_with_attribution(attribution, contrast, rule="vote")


def test_strongest_contrast_runs_each_text_once_and_keeps_the_largest_score():
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()
    saes = {2: _planted_sae(model, tokenizer, 2)}
    texts_a, texts_b = _sets(seed=0)
    half = len(texts_b) // 2
    contrasts = [(texts_b[:half], texts_b[half:]), (texts_a, texts_b), (texts_b, texts_a)]
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    try:
        merged = strongest_contrast_latents(model, tokenizer, contrasts, saes, batch_size=4)
    finally:
        handle.remove()
    assert sum(seen) == len(set(texts_a + texts_b))  # every distinct text once, not once per contrast
    separate = [{(r.layer, r.latent): r.score for r in contrast_latents(model, tokenizer, a, b, saes)}
                for a, b in contrasts]
    assert len(merged) == 256 and [abs(r.score) for r in merged] == sorted((abs(r.score) for r in merged), reverse=True)
    for row in merged:
        strongest = max((scores[(row.layer, row.latent)] for scores in separate), key=abs)
        assert abs(row.score) == pytest.approx(abs(strongest), rel=1e-4, abs=1e-6)
    assert (merged[0].layer, merged[0].latent) == (2, PLANTED) and merged[0].score > 1.0
    with pytest.raises(ValueError, match="at least one"):
        strongest_contrast_latents(model, tokenizer, [], saes)


def test_one_sided_contrast_keeps_only_latents_preferring_the_concept_set():
    attribution = [LatentEffect(3, 1, 0.9), LatentEffect(3, 2, -0.5), LatentEffect(6, 7, 0.3)]
    contrast = {(3, 1): -2.0, (3, 2): 1.5, (6, 7): 0.5}
    assert [s.latent for s in combine_with_attribution(attribution, contrast)] == [1, 2]
    assert [s.latent for s in combine_with_attribution(attribution, contrast, two_sided=False)] == [2]


def test_paired_contrast_removes_between_sentence_variation():
    gen = torch.Generator().manual_seed(0)
    sentence = 5 * torch.randn(30, 1, generator=gen)  # large variation between sentences
    a = sentence + 1.0 + 0.1 * torch.randn(30, 1, generator=gen)
    b = sentence + 0.1 * torch.randn(30, 1, generator=gen)
    assert abs(float(cohens_d(a, b))) < 0.5  # unpaired: drowned by the sentences
    assert float(paired_d(a, b)) > 5  # paired: the concept's shift stands out
    with pytest.raises(ValueError, match="equal size"):
        paired_d(a, b[:-1])


def test_saes_that_do_not_fit_the_model_are_named_before_any_text_runs():
    from hf_concept_ablation.search.cache import build_activation_cache

    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer()
    a, b = _sets()
    with pytest.raises(ValueError, match=r"the SAE given for layer 1 has input size d_in=32, but the model's hidden "
                                         r"size is 64"):
        contrast_latents(model, tokenizer, a, b, {1: make_sae("standard", d_in=32)})
    with pytest.raises(ValueError, match=r"the SAE given for layer 1 was trained on layer 2"):
        build_activation_cache(model, tokenizer, a, {1: make_sae("standard", layer=2)}, [(1, 0)])
    with pytest.raises(ValueError, match=r"latent id\(s\) \[999\] out of range for the SAE given for layer 1"):
        build_activation_cache(model, tokenizer, a, {1: make_sae("standard", layer=1)}, [(1, 999)])
    with pytest.raises(ValueError, match=r"layer 9 does not exist"):
        contrast_latents(model, tokenizer, a, b, {9: make_sae("standard")})
