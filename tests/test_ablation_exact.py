"""Latent mode equals full SAE encode -> zero latents -> decode + error term, for outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sae, make_tiny_model

from hf_concept_ablation import ConceptAblationConfig, inject_concept_ablation
from hf_concept_ablation.adapter.layer import (
    full_sae_ablation,
    layer_hidden,
    with_layer_hidden,
)
from hf_concept_ablation.adapter.model import find_decoder_layers

LATENTS = [3, 17, 40, 99, 128, 200]
LAYERS = [1, 2]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _full_sae_hook(sae, latents):
    """Reference: the naive ablation with a full sae-lens SAE and a non-detached error term."""

    def hook(_module, _args, output):
        return with_layer_hidden(output, full_sae_ablation(sae, latents, layer_hidden(output)))

    return hook


def _run(model, input_ids, inputs_embeds_grad: bool = True):
    model.zero_grad()
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(inputs_embeds_grad)
    logits = model(inputs_embeds=embeds).logits
    loss = (logits.float() ** 2).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), embeds.grad.detach(), grads


@pytest.mark.parametrize("architecture", ["jumprelu", "standard", "topk"])
def test_latent_mode_matches_full_sae_ablation(architecture):
    model = make_tiny_model("llama")
    saes = {layer: make_sae(architecture, seed=layer, layer=layer) for layer in LAYERS}
    input_ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(1))

    # The selected latents really fire on these inputs (otherwise the test could not fail).
    _, decoder_layers = find_decoder_layers(model)
    with torch.no_grad():
        hidden = model(input_ids, output_hidden_states=True).hidden_states
    for layer in LAYERS:
        acts = saes[layer].encode(hidden[layer + 1])[..., LATENTS]
        assert (acts > 0).float().mean() > 0.05

    handles = [decoder_layers[layer].register_forward_hook(_full_sae_hook(saes[layer], LATENTS)) for layer in LAYERS]
    ref_logits, ref_input_grad, ref_grads = _run(model, input_ids)
    for handle in handles:
        handle.remove()

    config = ConceptAblationConfig(layers=LAYERS, latents={layer: LATENTS for layer in LAYERS}, skip_token_ids=[])
    ablation = inject_concept_ablation(model, config, saes=saes)
    logits, input_grad, grads = _run(model, input_ids)

    with ablation.disabled():
        plain_logits, _, _ = _run(model, input_ids)
    assert _rel_err(plain_logits, ref_logits) > 1e-3, "the ablation must change the output"

    assert _rel_err(logits, ref_logits) < 1e-5
    assert _rel_err(input_grad, ref_input_grad) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert _rel_err(grad, ref_grads[name]) < 1e-5, name


def test_latent_mode_keeps_only_the_slices_it_needs():
    model = make_tiny_model("gemma2")
    sae = make_sae("jumprelu", d_sae=4096, layer=1)
    ablation = inject_concept_ablation(
        model, ConceptAblationConfig(layers=[1], latents={1: [5, 6]}), saes={1: sae}
    )
    module = ablation.layers[1]
    assert module.W_enc.shape == (64, 2) and module.W_dec.shape == (2, 64)
    assert not any(p is b for p in model.parameters() for b in module.buffers())
    assert all(not b.requires_grad for b in module.buffers())
