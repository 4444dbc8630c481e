"""How good an SAE is on held-out text (:func:`evaluate_sae`).

- explained variance: ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over all (non-BOS,
  non-padding) tokens, ``mean`` the mean activation of those tokens;
- L0: the mean number of non-zero latents per token;
- cross-entropy loss recovered: ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``, where
  ``CE_clean`` is the model's next-token loss, ``CE_sae`` the loss with the layer's output
  replaced by the SAE reconstruction, and ``CE_zero`` the loss with the layer's output replaced
  by zeros, in each case at non-BOS, non-padding positions only. The loss is the token mean over
  every position whose target is a real token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..adapter.layer import layer_hidden, special_token_ids, with_layer_hidden
from ..adapter.model import find_decoder_layers
from ..adapter.residuals import residual_stream
from .activation_store import keep_mask, pad_batch, tokenize_chunks


@dataclass
class SAEQuality:
    """Quality of one SAE on held-out text (see the module docstring for the definitions)."""

    layer: int
    explained_variance: float
    l0: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_loss_recovered: float
    n_tokens: int
    dead_latents: int = 0
    extra: dict = field(default_factory=dict)


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the rows (tokens) of ``x``."""
    x, x_hat = x.double(), x_hat.double()
    return 1.0 - ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()


def _ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, tokenizer: Any) -> tuple[float, int]:
    targets = ids[:, 1:].clone()
    valid = mask[:, 1:].bool()
    for special in special_token_ids(tokenizer):
        valid &= targets != special
    targets[~valid] = -100
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss.item(), int(valid.sum())


@torch.no_grad()
def evaluate_sae(
    model: nn.Module,
    tokenizer: Any,
    sae: Any,
    layer: int,
    texts: Sequence[str],
    context_size: int = 128,
    batch_size: int = 4,
    max_tokens: int | None = None,
    ce_max_tokens: int | None = None,
) -> SAEQuality:
    """Explained variance, L0 and CE loss recovered of ``sae`` at ``layer`` on ``texts``.

    Explained variance and L0 use up to ``max_tokens`` tokens (a forward pass that
    stops at ``layer``); the three cross-entropy passes, which need the full
    vocabulary's logits and dominate the cost, use up to ``ce_max_tokens``
    (default: ``max_tokens``).
    """
    model.eval()
    sae = sae.eval()
    sae_dtype = next(sae.parameters()).dtype
    device = next(model.parameters()).device
    sae.to(device)
    block = find_decoder_layers(model)[1][layer]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chunks = list(tokenize_chunks(tokenizer, texts, context_size))
    state: dict[str, Any] = {"mode": "clean", "keep": None}
    xs, x_hats, l0s = [], [], []
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)

    def hook(module, args, output):
        if state["mode"] == "clean":
            return None
        hidden = layer_hidden(output)
        keep = state["keep"].unsqueeze(-1)
        if state["mode"] == "zero":
            new = torch.where(keep, torch.zeros_like(hidden), hidden)
        else:
            x = hidden[state["keep"]]
            feats = sae.encode(x.to(sae_dtype))
            x_hat = sae.decode(feats).to(hidden.dtype)
            xs.append(x.float().cpu())
            x_hats.append(x_hat.float().cpu())
            l0s.append((feats != 0).sum(-1).float().cpu())
            fired.logical_or_((feats != 0).any(0).cpu())
            new = hidden.clone()
            new[state["keep"]] = x_hat
        return with_layer_hidden(output, new)

    if ce_max_tokens is not None and ce_max_tokens < 1:
        raise ValueError(f"ce_max_tokens must be at least 1 (or None: as many as max_tokens), got {ce_max_tokens}")
    ce_max_tokens = max_tokens if ce_max_tokens is None else ce_max_tokens
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_targets = 0
    n_tokens = 0
    ce_tokens = 0
    handle = block.register_forward_hook(hook)
    try:
        for b in range(0, len(chunks), batch_size):
            if max_tokens is not None and n_tokens >= max_tokens:
                break
            ids, mask = pad_batch(chunks[b : b + batch_size], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            state["keep"] = keep_mask(ids, mask, tokenizer)
            n_tokens += int(state["keep"].sum())
            if ce_max_tokens is not None and ce_tokens >= ce_max_tokens:
                state["mode"] = "sae"  # reconstruction statistics only: stop after the layer
                residual_stream(model, ids, mask, [layer])
                continue
            ce_tokens += int(state["keep"].sum())
            for mode in ("clean", "sae", "zero"):
                state["mode"] = mode
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                loss, n = _ce(logits, ids, mask, tokenizer)
                totals[mode] += loss
            n_targets += n
    finally:
        handle.remove()
    ce = {mode: total / max(n_targets, 1) for mode, total in totals.items()}
    x, x_hat = torch.cat(xs), torch.cat(x_hats)
    return SAEQuality(
        layer=layer,
        explained_variance=explained_variance(x, x_hat),
        l0=torch.cat(l0s).mean().item(),
        ce_clean=ce["clean"], ce_sae=ce["sae"], ce_zero=ce["zero"],
        ce_loss_recovered=((ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]) if ce["zero"] != ce["clean"]
                           else float("nan")),  # zero ablation costs nothing: nothing to recover
        n_tokens=n_tokens,
        dead_latents=int((~fired).sum()),
        extra={"ce_tokens": ce_tokens},
    )
