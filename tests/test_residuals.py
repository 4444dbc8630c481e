"""`residual_stream`: the decoder layers' outputs in one forward pass that stops after the deepest; and
`decoder_layer_calls`: the layers' calls, recorded once and run again layer by layer."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_LAYERS, make_tiny_model

from hf_concept_ablation.adapter.layer import layer_hidden, with_layer_hidden
from hf_concept_ablation.adapter.model import find_decoder_layers
from hf_concept_ablation.adapter.residuals import decoder_layer_calls, residual_stream


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_residual_stream_equals_hidden_states_and_stops_after_the_deepest_layer(family):
    model = make_tiny_model(family)
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    ran = []
    _, layers = find_decoder_layers(model)
    hooks_before = [len(layer._forward_hooks) for layer in layers]
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    captured = residual_stream(model, ids, mask, [2, 0])
    for handle in handles:
        handle.remove()
    assert sorted(captured) == [0, 2] and ran == [0, 1, 2]  # layer 3 never ran
    for layer, acts in captured.items():
        assert not acts.requires_grad
        if layer + 1 < NUM_LAYERS:  # the last entry of hidden_states is after the final norm
            torch.testing.assert_close(acts, hidden[layer + 1])
    assert [len(layer._forward_hooks) for layer in layers] == hooks_before  # nothing left behind


def test_residual_stream_names_a_layer_that_does_not_exist():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 100, (1, 5))
    with pytest.raises(ValueError, match=rf"layer\(s\) \[{NUM_LAYERS}\] do not exist: the model has {NUM_LAYERS}"):
        residual_stream(model, ids, None, [1, NUM_LAYERS])
    with pytest.raises(ValueError, match="no layers given"):
        residual_stream(model, ids, None, [])


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "llama", "gpt2"])
def test_recorded_layer_calls_run_layer_by_layer_give_what_a_hooked_forward_pass_gives(family):
    """Each layer run on the edited output of the one before equals a forward pass with the edit hooked in (padding
    included, so the attention mask travels with the recorded calls); the recording pass stops before `last` runs."""
    model = make_tiny_model(family)
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    _, layers = find_decoder_layers(model)

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        return hidden * torch.linspace(0.5, 1.5, hidden.shape[-1])

    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    calls = decoder_layer_calls(model, ids, mask, NUM_LAYERS - 1)
    for handle in handles:
        handle.remove()
    assert len(calls) == NUM_LAYERS and ran == list(range(NUM_LAYERS - 1))
    hooks = [layer.register_forward_hook(lambda m, a, o: with_layer_hidden(o, edit(layer_hidden(o)))) for layer in layers]
    expected = residual_stream(model, ids, mask, range(NUM_LAYERS))
    for handle in hooks:
        handle.remove()
    hidden = calls[0].hidden
    with torch.no_grad():
        for index, call in enumerate(calls):
            hidden = edit(call.run(layers[index], hidden))
            torch.testing.assert_close(hidden, expected[index])
