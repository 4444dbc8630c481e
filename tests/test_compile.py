"""The hooks under `torch.compile`: same outputs and gradients as eager, and a strength change does not recompile.

The ``aot_eager`` backend runs the real Dynamo capture and AOT autograd (what any backend
sees) without generating C++ code, so the test stays fast on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HIDDEN, make_sae, make_tiny_model
from torch._dynamo.testing import CompileCounterWithBackend

from hf_concept_ablation import ConceptAblationConfig, inject_concept_ablation

INPUT = torch.tensor([[2, 11, 25, 37, 48, 59, 61, 70], [2, 90, 14, 33, 47, 52, 8, 9]])


def _loss(model) -> torch.Tensor:
    return model(input_ids=INPUT).logits[:, -1].float().logsumexp(-1).mean()


@pytest.mark.parametrize("mode", ["latent", "projection"])
def test_compiled_model_matches_eager_and_strength_changes_do_not_recompile(mode):
    torch._dynamo.reset()
    model = make_tiny_model("llama")
    centers = {1: torch.randn(HIDDEN)} if mode == "projection" else {}
    config = ConceptAblationConfig(layers=[1, 2], latents={1: [3, 9, 40], 2: [5, 77]}, mode=mode, centers=centers)
    ablation = inject_concept_ablation(model, config, saes={layer: make_sae("jumprelu", seed=layer) for layer in (1, 2)})
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)

    for alpha in (1.0, 0.5, 0.0):
        ablation.set_strength(alpha)
        model.zero_grad()
        eager = _loss(model)
        eager.backward()
        eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        loss = _loss(compiled)
        loss.backward()
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
        compiled_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert compiled_grads.keys() == eager_grads.keys() and eager_grads  # every gradient, none dropped
        for name, want in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], want, rtol=1e-4, atol=1e-5, msg=name)
    assert counter.frame_count == 1  # alpha lives in a buffer updated in place: one graph for every strength
    with ablation.disabled():
        with torch.no_grad():
            torch.testing.assert_close(compiled(input_ids=INPUT).logits, model(input_ids=INPUT).logits)
