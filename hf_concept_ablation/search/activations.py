"""Residual-stream activations of a model over texts, and SAE latent activations from them.

Shared by the activation cache, the concept contrast and the PCA directions. Texts are
tokenized with the model's tokenizer (right padding, truncated to ``max_length``); the
positions holding BOS or padding tokens, or masked out, are never counted. The forward
pass stops right after the deepest requested layer (no logits are computed), and any
injected concept ablation is disabled, so activations are the base model's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from sae_lens import SAE
from tqdm.auto import tqdm

from ..adapter.layer import ConceptAblationLayer, keep_positions, special_token_ids
from ..adapter.model import get_concept_ablation
from ..adapter.residuals import residual_stream
from ..adapter.sae_sources import PER_LATENT_ARCHITECTURES, check_saes_fit_model


@dataclass
class ResidualBatch:
    """One batch of residual-stream outputs.

    Attributes:
        doc_ids: index of each row's text in the corpus, ``[batch]``.
        input_ids: token ids ``[batch, seq]`` (right padded).
        keep: ``[batch, seq]`` bool, true at positions that count (not BOS, not padding).
        hidden: layer -> float32 output of that decoder layer ``[batch, seq, d_model]``.
    """

    doc_ids: torch.Tensor
    input_ids: torch.Tensor
    keep: torch.Tensor
    hidden: dict[int, torch.Tensor]


def as_text_list(texts: Any, column: str = "text") -> list[str]:
    """A list of strings from a list/tuple of strings or a `datasets.Dataset` with a `column` column."""
    if hasattr(texts, "column_names"):
        if column not in texts.column_names:
            raise ValueError(f"the dataset has no {column!r} column; columns: {texts.column_names}")
        texts = texts[column]
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    if not texts:
        raise ValueError("no texts given")
    return texts


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded, truncated batch encoding (special tokens such as BOS added as the tokenizer does)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the EOS token)")
    return tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length, padding_side="right"
    )


def token_batches(tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int
                  ) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor]]:
    """`texts` batch by batch as `iter_residuals` gives them to the model: the index of the batch's first text, its
    encoding (`tokenize`) and the positions that count ``[batch, seq]`` (`keep_positions`)."""
    skip = special_token_ids(tokenizer)
    for start in range(0, len(texts), batch_size):
        batch = tokenize(tokenizer, texts[start : start + batch_size], max_length)
        yield start, batch, keep_positions(batch["input_ids"], batch["attention_mask"], skip)


def iter_residuals(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 8,
    max_length: int = 128,
    desc: str = "activations",
    progress: bool = True,
    ablated: bool = False,
) -> Iterator[ResidualBatch]:
    """Yield the outputs of decoder `layers` for `texts`, batch by batch, without gradients (`ablated`: with the
    model's concept ablation kept on, instead of the base model's activations)."""
    layers = sorted({int(layer) for layer in layers})
    device = next(model.parameters()).device
    ablation = get_concept_ablation(model)
    batches = token_batches(tokenizer, texts, batch_size, max_length)
    for start, batch, keep in tqdm(batches, total=-(-len(texts) // batch_size), desc=desc, leave=False,
                                   disable=not progress):
        input_ids = batch["input_ids"]
        # eval mode and the disabled ablation last only for this forward pass,
        # so nothing leaks into the caller's code between batches or if it stops early
        was_training = model.training
        model.eval()
        try:
            with ablation.disabled() if ablation is not None and not ablated else contextlib.nullcontext():
                captured = residual_stream(model, input_ids.to(device), batch["attention_mask"].to(device), layers)
        finally:
            model.train(was_training)
        doc_ids = torch.arange(start, start + input_ids.shape[0])
        yield ResidualBatch(doc_ids, input_ids, keep, {k: v.float().cpu() for k, v in captured.items()})


class LatentEncoder:
    """Activations of chosen latents of one SAE (or all of them), exact for every supported architecture.

    For ReLU/JumpReLU SAEs and a chosen subset, only the subset's encoder columns are
    used (the same code as the ablation's ``f_S``); otherwise the SAE's full encoder.
    """

    def __init__(self, sae: SAE, latents: Sequence[int] | None = None) -> None:
        self.sae = sae
        self.latents = None if latents is None else [int(i) for i in latents]
        self._sliced = None
        if self.latents is not None:
            bad = [i for i in self.latents if not 0 <= i < sae.cfg.d_sae]
            if bad:
                raise ValueError(f"latent id(s) {bad} out of range for an SAE of width {sae.cfg.d_sae}")
            if sae.cfg.architecture() in PER_LATENT_ARCHITECTURES:
                self._sliced = ConceptAblationLayer.from_sae(sae, self.latents, "latent").to(sae.W_dec.device)

    @property
    def width(self) -> int:
        """Number of latents this encoder returns."""
        return self.sae.cfg.d_sae if self.latents is None else len(self.latents)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Activations ``[..., width]`` (float32) of residual vectors ``x`` ``[..., d_model]``."""
        device = self.sae.W_dec.device
        if self._sliced is not None:
            return self._sliced.latent_activations(x.to(device, torch.float32)).float()
        acts = self.sae.encode(x.to(device, self.sae.W_dec.dtype)).float()
        return acts if self.latents is None else acts[..., self.latents]


def encoders_for(
    model: torch.nn.Module, saes: Mapping[int, SAE], latents: Sequence[tuple[int, int]] | None
) -> tuple[dict[int, LatentEncoder], list[tuple[int, int]]]:
    """Per-layer encoders for the chosen (layer, latent) pairs (all latents of every SAE if None), each SAE checked
    against `model` first (`check_saes_fit_model`).

    Returns the encoders and the flat list of (layer, latent) in the order of the
    concatenated encoder outputs (layers ascending).
    """
    if not saes:
        raise ValueError("no SAEs given (a mapping layer -> sae-lens SAE)")
    if latents is None:
        chosen = {layer: None for layer in sorted(saes)}
    else:
        chosen: dict[int, list[int] | None] = {}
        for layer, latent in latents:
            if layer not in saes:
                raise ValueError(f"latent ({layer}, {latent}) names layer {layer}, which has no SAE; SAEs: {sorted(saes)}")
            chosen.setdefault(int(layer), [])
            if int(latent) not in chosen[int(layer)]:
                chosen[int(layer)].append(int(latent))
        chosen = dict(sorted(chosen.items()))
        if not chosen:
            raise ValueError("no latents chosen")
    check_saes_fit_model(model, {layer: saes[layer] for layer in chosen},
                         {layer: ids for layer, ids in chosen.items() if ids is not None})
    encoders = {layer: LatentEncoder(saes[layer], ids) for layer, ids in chosen.items()}
    order = [
        (layer, latent)
        for layer, encoder in encoders.items()
        for latent in (encoder.latents if encoder.latents is not None else range(encoder.width))
    ]
    return encoders, order
