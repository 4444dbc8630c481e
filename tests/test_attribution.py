"""Attribution (equation 1) agrees with exact zero-ablation effects on a tiny model."""

from __future__ import annotations

import pytest
from conftest import (
    make_sae,
    make_tiny_mc_dataset,
    make_tiny_model,
    make_tiny_tokenizer,
)
from scipy.stats import spearmanr

from hf_concept_ablation import ConceptAblationConfig, inject_concept_ablation
from hf_concept_ablation.search.attribution import (
    attribute_latents,
    load_attribution,
    save_attribution,
)


def _exact_effect(model, tokenizer, dataset, layer, sae, latent):
    """Metric change when the latent is zero-ablated (exactly, via the adapter), averaged over examples."""
    from hf_concept_ablation.tasks.evaluation import evaluate_multiple_choice

    base = evaluate_multiple_choice(model, tokenizer, dataset)["logit_diff"]
    config = ConceptAblationConfig(layers=[layer], latents={layer: [latent]}, skip_token_ids=None)
    ablation = inject_concept_ablation(model, config, saes={layer: sae})
    try:
        ablated = evaluate_multiple_choice(model, tokenizer, dataset)["logit_diff"]
    finally:
        ablation.remove()
    return base - ablated


def test_attribution_ranks_like_exact_zero_ablation(tmp_path):
    model = make_tiny_model("llama")
    tokenizer = make_tiny_tokenizer()
    dataset = make_tiny_mc_dataset()
    saes = {1: make_sae("standard", d_sae=64, seed=1), 2: make_sae("standard", d_sae=64, seed=2)}
    for sae in saes.values():  # small latent contributions, where a first-order estimate should hold
        sae.W_dec.data *= 0.1
    rows = attribute_latents(model, tokenizer, dataset, saes, batch_size=5, top=None)
    assert len(rows) == 128
    assert abs(rows[0].effect) >= abs(rows[-1].effect)
    top = rows[:20]
    exact = [_exact_effect(model, tokenizer, dataset, r.layer, saes[r.layer], r.latent) for r in top]
    rho = spearmanr([r.effect for r in top], exact).statistic
    assert rho >= 0.9, rho

    csv_path, json_path = save_attribution(top, tmp_path / "attribution")
    assert csv_path.read_text().splitlines()[0] == "rank,layer,latent,effect"
    assert load_attribution(json_path) == top


def test_attribution_rejects_a_dataset_without_the_metric_column():
    with pytest.raises(ValueError, match=r"needs a 'text' column"):
        attribute_latents(make_tiny_model("llama"), make_tiny_tokenizer(), make_tiny_mc_dataset(), {}, metric="loss")


def test_attribution_checks_each_sae_against_the_model_before_it_starts():
    model, tokenizer, data = make_tiny_model("gemma3"), make_tiny_tokenizer(), make_tiny_mc_dataset()
    with pytest.raises(ValueError, match=r"layer 9 does not exist: the model has 4 decoder layers"):
        attribute_latents(model, tokenizer, data, {9: make_sae("jumprelu")})
    with pytest.raises(ValueError, match=r"the SAE given for layer 1 has input size d_in=32, but the model's hidden size is 64"):
        attribute_latents(model, tokenizer, data, {1: make_sae("jumprelu", d_in=32)})
    with pytest.raises(ValueError, match=r"trained on layer 3 .*, not layer 1"):
        attribute_latents(model, tokenizer, data, {1: make_sae("jumprelu", layer=3)})


def test_attribution_lists_every_latent_once_sorted_and_top_is_a_prefix():
    model, tokenizer, dataset = make_tiny_model("llama"), make_tiny_tokenizer(), make_tiny_mc_dataset()
    saes = {2: make_sae("standard", d_sae=48, seed=2), 1: make_sae("standard", d_sae=64, seed=1)}
    rows = attribute_latents(model, tokenizer, dataset, saes, batch_size=5, top=None)
    assert sorted((r.layer, r.latent) for r in rows) == [(1, i) for i in range(64)] + [(2, i) for i in range(48)]
    magnitudes = [abs(r.effect) for r in rows]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert attribute_latents(model, tokenizer, dataset, saes, batch_size=5, top=7) == rows[:7]
    assert attribute_latents(model, tokenizer, dataset, {}, batch_size=5) == []  # a plain forward and backward


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_evaluation_and_attribution_do_not_depend_on_the_batch_size(family):
    """Left padding shifts absolute positions (GPT-2) unless position ids count from each prompt's first token."""
    from hf_concept_ablation.tasks.evaluation import evaluate_multiple_choice

    model, tokenizer, dataset = make_tiny_model(family), make_tiny_tokenizer(), make_tiny_mc_dataset()
    saes = {1: make_sae("standard", d_sae=64, seed=1)}
    one = evaluate_multiple_choice(model, tokenizer, dataset, batch_size=1)["logit_diff"]
    assert evaluate_multiple_choice(model, tokenizer, dataset, batch_size=12)["logit_diff"] == pytest.approx(one, abs=1e-5)
    single = attribute_latents(model, tokenizer, dataset, saes, batch_size=1, top=None)
    batched = attribute_latents(model, tokenizer, dataset, saes, batch_size=12, top=None)
    assert [(r.layer, r.latent) for r in batched[:10]] == [(r.layer, r.latent) for r in single[:10]]
    assert [r.effect for r in batched] == pytest.approx([r.effect for r in single], abs=1e-5)


def test_attribution_of_a_frozen_model_equals_that_of_a_trainable_one():
    model, tokenizer, dataset = make_tiny_model("gemma3"), make_tiny_tokenizer(), make_tiny_mc_dataset()
    saes = {1: make_sae("standard", d_sae=64, seed=1), 2: make_sae("standard", d_sae=64, seed=2)}
    trainable = attribute_latents(model, tokenizer, dataset, saes, batch_size=4, top=None)
    model.requires_grad_(False)
    assert attribute_latents(model, tokenizer, dataset, saes, batch_size=4, top=None) == trainable


def test_evaluation_equals_its_definition_computed_prompt_by_prompt():
    """accuracy: argmax over the vocabulary is the answer; pair accuracy: answer beats distractor; logit_diff: mean
    answer-minus-distractor logit at the last token; each from one unpadded forward per prompt."""
    import torch

    from hf_concept_ablation.tasks.evaluation import evaluate_multiple_choice

    model, tokenizer, dataset = make_tiny_model("gpt2"), make_tiny_tokenizer(), make_tiny_mc_dataset(12)
    hits, pair, gaps = 0, 0, []
    with torch.no_grad():
        for row in dataset:
            logits = model(**tokenizer(row["prompt"], return_tensors="pt")).logits[0, -1]
            answer, distractor = (tokenizer(s, add_special_tokens=False)["input_ids"][0]
                                  for s in (row["answer"], row["distractor"]))
            hits += int(logits.argmax()) == answer
            pair += bool(logits[answer] > logits[distractor])
            gaps.append(float(logits[answer] - logits[distractor]))
    result = evaluate_multiple_choice(model, tokenizer, dataset, batch_size=5)
    assert result["accuracy"] == hits / 12 and result["pair_accuracy"] == pair / 12 and result["n"] == 12
    assert result["logit_diff"] == pytest.approx(sum(gaps) / 12, abs=1e-5)
    assert 0 < pair < 12  # the checks above can tell right from wrong here


def test_loss_attribution_does_not_depend_on_the_batch_size_and_ignores_an_injected_ablation():
    import datasets

    model, tokenizer = make_tiny_model("gpt2"), make_tiny_tokenizer()
    texts = datasets.Dataset.from_dict({"text": [row["prompt"] for row in make_tiny_mc_dataset(10)]})
    saes = {1: make_sae("standard", d_sae=64, seed=1), 2: make_sae("standard", d_sae=64, seed=2)}
    single = attribute_latents(model, tokenizer, texts, saes, metric="loss", batch_size=1, top=None)
    batched = attribute_latents(model, tokenizer, texts, saes, metric="loss", batch_size=10, top=None)
    assert [r.effect for r in batched] == pytest.approx([r.effect for r in single], abs=1e-5)
    ablation = inject_concept_ablation(model, ConceptAblationConfig(layers=[1], latents={1: [1, 2, 3]}),
                                       saes={1: saes[1]})
    assert attribute_latents(model, tokenizer, texts, saes, metric="loss", batch_size=10, top=None) == batched
    assert ablation.enabled  # and it is on again afterwards
