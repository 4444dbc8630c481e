"""The residual stream after chosen decoder layers, captured in one forward pass that stops early; and the calls
of the decoder layers, recorded once so that one layer can be run again on another input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .layer import layer_hidden
from .model import find_decoder_layers


class _StopForward(Exception):
    """Raised by the hook of the deepest layer so the rest of the model is skipped."""


def _checked_layers(model: nn.Module, layers: Sequence[int]) -> tuple[list[int], nn.ModuleList]:
    _, decoder_layers = find_decoder_layers(model)
    layers = sorted({int(layer) for layer in layers})
    if not layers:
        raise ValueError("no layers given")
    bad = [layer for layer in layers if not 0 <= layer < len(decoder_layers)]
    if bad:
        raise ValueError(f"layer(s) {bad} do not exist: the model has {len(decoder_layers)} decoder layers")
    return layers, decoder_layers


@torch.no_grad()
def residual_stream(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The output of each decoder layer in `layers`, ``{layer: [batch, seq, d_model]}`` in the model's dtype.

    Hooks see whatever the model computes (an injected concept ablation included); the forward
    pass stops after the deepest requested layer, so no logits are computed.
    """
    layers, decoder_layers = _checked_layers(model, layers)
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(_module, _args, output):
            captured[layer] = layer_hidden(output).detach()
            if layer == layers[-1]:
                raise _StopForward

        return hook

    _run_until_stopped(model, input_ids, attention_mask,
                       [decoder_layers[layer].register_forward_hook(capture(layer)) for layer in layers])
    return captured


def _run_until_stopped(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       handles: list[Any]) -> None:
    """One forward pass, ended by a hook raising `_StopForward`; the hooks' `handles` are removed whatever happens."""
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LayerCall:
    """How the model called one decoder layer: its input hidden state and every other argument (attention mask,
    position embeddings, ...), as given."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        """The input hidden state ``[batch, seq, d_model]``."""
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The output hidden state of `layer` called as recorded, but on `hidden`."""
        if self.args:
            output = layer(hidden, *self.args[1:], **self.kwargs)
        else:
            output = layer(**{**self.kwargs, "hidden_states": hidden})
        return layer_hidden(output)


@torch.no_grad()
def decoder_layer_calls(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        last: int) -> list[LayerCall]:
    """The calls of decoder layers ``0..last``, recorded in one forward pass that stops before layer `last` runs.

    Running layer after layer with `LayerCall.run`, each on the (possibly edited) output of the one before, gives
    what a forward pass with that edit hooked in gives, at the cost of one pass (the other arguments do not depend on
    the hidden state).
    """
    (last,), decoder_layers = _checked_layers(model, [last])
    calls: list[LayerCall] = []

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(LayerCall(tuple(args), dict(kwargs)))
        if len(calls) == last + 1:
            raise _StopForward

    _run_until_stopped(model, input_ids, attention_mask,
                       [decoder_layers[i].register_forward_pre_hook(record, with_kwargs=True) for i in range(last + 1)])
    if len(calls) != last + 1:
        raise RuntimeError(f"the forward pass called {len(calls)} of decoder layers 0..{last}: the model does not run "
                           "its decoder layers once each, in order")
    return calls
