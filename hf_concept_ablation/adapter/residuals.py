"""The residual stream after chosen decoder layers, captured in one forward pass that stops early."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .layer import layer_hidden
from .model import find_decoder_layers


class _StopForward(Exception):
    """Raised by the hook of the deepest layer so the rest of the model is skipped."""


@torch.no_grad()
def residual_stream(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The output of each decoder layer in `layers`, ``{layer: [batch, seq, d_model]}`` in the model's dtype.

    Hooks see whatever the model computes (an injected concept ablation included); the forward
    pass stops after the deepest requested layer, so no logits are computed.
    """
    _, decoder_layers = find_decoder_layers(model)
    layers = sorted({int(layer) for layer in layers})
    if not layers:
        raise ValueError("no layers given")
    bad = [layer for layer in layers if not 0 <= layer < len(decoder_layers)]
    if bad:
        raise ValueError(f"layer(s) {bad} do not exist: the model has {len(decoder_layers)} decoder layers")
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(_module, _args, output):
            captured[layer] = layer_hidden(output).detach()
            if layer == layers[-1]:
                raise _StopForward

        return hook

    handles = [decoder_layers[layer].register_forward_hook(capture(layer)) for layer in layers]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured
