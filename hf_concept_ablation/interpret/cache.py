"""Activation cache: top-activating contexts of SAE latents over a text corpus.

For each chosen latent (or every latent of every SAE), `build_activation_cache` keeps

* the ``top_k`` texts where the latent's maximum activation is highest, and
* ``per_quantile`` random texts from each of ``n_quantiles`` equal-count bins of the
  remaining texts where the latent fires (Anthropic-style "activation quantiles"),

each as a token window around the max-activating token with per-token activations.
BOS and padding positions are never counted. It runs two passes: the first over the
whole corpus records per-text maxima (sparse), the second re-runs only the chosen
texts to cut the windows. The result is stored as one safetensors file (token ids,
activations, indices) and a JSON sidecar (settings, token strings), written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE

from ..files import atomic_path, file_stem, write_json_atomic
from .activations import as_text_list, encoders_for, iter_residuals

TOP = 0  #: example kind code of a top-activating context; quantile bins are 1..n_quantiles (1 = lowest)
PAD_TOKEN = -1  #: token id filling windows shorter than the cache's window width
_TENSORS = (
    "latent_layer", "latent_id", "max_activation", "mean_activation", "frequency",
    "example_latent", "example_kind", "example_doc", "example_pos", "example_center", "example_value",
    "example_tokens", "example_acts",
)


@dataclass(frozen=True)
class ContextExample:
    """One context window of a latent (or a direction).

    Attributes:
        tokens: token strings of the window (as the tokenizer decodes each alone).
        token_ids: token ids of the window.
        acts: activation at each token (0 at BOS/padding).
        center: index in the window of the max-activating token.
        value: activation at ``center``.
        doc: index of the text in the corpus.
        kind: ``"top"`` or ``"q<i>"`` (quantile bin i, 1 = lowest).
    """

    tokens: list[str]
    token_ids: list[int]
    acts: list[float]
    center: int
    value: float
    doc: int
    kind: str = "top"

    def text(self) -> str:
        """The window as plain text."""
        return "".join(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "acts": [round(a, 4) for a in self.acts], "center": self.center,
                "value": round(self.value, 4), "doc": self.doc, "kind": self.kind}


@dataclass
class ActivationCache:
    """Top-activating and quantile-sampled contexts for a set of latents (see the module doc).

    Tensors are indexed by latent ``k`` (position in `latents`) or by example ``e``.
    """

    latents: list[tuple[int, int]]
    tensors: dict[str, torch.Tensor]
    vocab: dict[int, str]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.latents = [(int(a), int(b)) for a, b in self.latents]
        self._index = {key: k for k, key in enumerate(self.latents)}

    def __contains__(self, key: tuple[int, int]) -> bool:
        return (int(key[0]), int(key[1])) in self._index

    def _k(self, layer: int, latent: int) -> int:
        try:
            return self._index[(int(layer), int(latent))]
        except KeyError:
            raise KeyError(f"latent ({layer}, {latent}) is not in this cache ({len(self.latents)} latents)") from None

    def stats(self, layer: int, latent: int) -> dict[str, float]:
        """Max activation, mean activation and firing frequency over the corpus's counted tokens."""
        k = self._k(layer, latent)
        return {name: float(self.tensors[name][k]) for name in ("max_activation", "mean_activation", "frequency")}

    def examples(self, layer: int, latent: int, kind: str = "top") -> list[ContextExample]:
        """Context windows of a latent: ``kind`` is ``"top"`` (highest first), ``"quantiles"`` or ``"all"``."""
        if kind not in ("top", "quantiles", "all"):
            raise ValueError(f"kind must be 'top', 'quantiles' or 'all', got {kind!r}")
        k = self._k(layer, latent)
        t = self.tensors
        rows = (t["example_latent"] == k).nonzero().flatten().tolist()
        if kind == "top":
            rows = [e for e in rows if int(t["example_kind"][e]) == TOP]
        elif kind == "quantiles":
            rows = [e for e in rows if int(t["example_kind"][e]) != TOP]
        rows.sort(key=lambda e: (-int(t["example_kind"][e] == TOP), -int(t["example_kind"][e]), -float(t["example_value"][e])))
        out = []
        for e in rows:
            ids = [i for i in t["example_tokens"][e].tolist() if i != PAD_TOKEN]
            kind_code = int(t["example_kind"][e])
            out.append(ContextExample(
                tokens=[self.vocab.get(i, f"<{i}>") for i in ids],
                token_ids=ids,
                acts=t["example_acts"][e, : len(ids)].tolist(),
                center=int(t["example_center"][e]),
                value=float(t["example_value"][e]),
                doc=int(t["example_doc"][e]),
                kind="top" if kind_code == TOP else f"q{kind_code}",
            ))
        return out

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; returns both paths."""
        stem = file_stem(path)
        weights, sidecar = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        with atomic_path(weights) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp), metadata={"format": "activation_cache"})
        meta = {"info": self.info, "latents": self.latents, "vocab": {str(k): v for k, v in self.vocab.items()}}
        write_json_atomic(sidecar, meta)
        return weights, sidecar

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActivationCache:
        """Read a cache written by `save` (give the stem or either file)."""
        stem = file_stem(path)
        weights, sidecar = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        for file in (weights, sidecar):
            if not file.is_file():
                raise FileNotFoundError(f"activation cache file {file} does not exist")
        meta = json.loads(sidecar.read_text())
        tensors = load_file(str(weights))
        missing = [name for name in _TENSORS if name not in tensors]
        if missing:
            raise ValueError(f"{weights} is not an activation cache: missing tensors {missing}")
        return cls(
            latents=[tuple(x) for x in meta["latents"]],
            tensors=tensors,
            vocab={int(k): v for k, v in meta["vocab"].items()},
            info=meta.get("info", {}),
        )


def window_bounds(keep: torch.Tensor, pos: int, before: int, after: int) -> tuple[int, int]:
    """``(start, stop)`` of the window around position `pos`: up to `before` / `after` tokens on each side, within
    the positions `keep` (``[seq]`` bool) marks (no BOS or padding)."""
    kept = keep.nonzero().flatten()
    return max(int(kept.min()), pos - before), min(int(kept.max()), pos + after) + 1


def _select_examples(
    doc: np.ndarray, lat: np.ndarray, val: np.ndarray, pos: np.ndarray, n_latents: int,
    top_k: int, n_quantiles: int, per_quantile: int, seed: int,
) -> list[tuple[int, int, int, int]]:
    """(latent k, kind, doc, pos) of every example to cut, from the sparse per-text maxima."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((-val, lat))
    doc, lat, val, pos = doc[order], lat[order], val[order], pos[order]
    bounds = np.searchsorted(lat, np.arange(n_latents + 1))
    chosen = []
    for k in range(n_latents):
        lo, hi = bounds[k], bounds[k + 1]
        if lo == hi:
            continue
        top_end = min(lo + top_k, hi)
        chosen += [(k, TOP, int(doc[i]), int(pos[i])) for i in range(lo, top_end)]
        rest = np.arange(top_end, hi)[::-1]  # ascending activation
        if n_quantiles > 0 and per_quantile > 0 and len(rest):
            for q, part in enumerate(np.array_split(rest, n_quantiles), start=1):
                if len(part):
                    for i in rng.choice(part, size=min(per_quantile, len(part)), replace=False):
                        chosen.append((k, q, int(doc[i]), int(pos[i])))
    return chosen


def build_activation_cache(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Any,
    saes: Mapping[int, SAE],
    latents: Sequence[tuple[int, int]] | None = None,
    *,
    top_k: int = 10,
    n_quantiles: int = 5,
    per_quantile: int = 2,
    window: tuple[int, int] = (12, 4),
    max_length: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> ActivationCache:
    """Cache top-activating and quantile-sampled contexts of latents over `texts`.

    Args:
        texts: a list of strings or a `datasets.Dataset` with a ``text`` column.
        saes: layer -> sae-lens SAE trained on that decoder layer's output.
        latents: (layer, latent) pairs to cache; ``None`` caches every latent of every SAE.
        top_k: top-activating texts per latent (one window per text, around its max token).
        n_quantiles, per_quantile: random samples per equal-count bin of the other firing texts.
        window: tokens kept (before, after) the max-activating token.
        max_length: texts are truncated to this many tokens.
    """
    texts = as_text_list(texts)
    encoders, order = encoders_for(model, saes, latents)
    n_latents = len(order)
    before, after = (int(window[0]), int(window[1]))
    if before < 0 or after < 0:
        raise ValueError(f"window must be two non-negative token counts, got {window}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")

    # pass 1: per-text maxima (kept sparse), firing counts and sums
    docs, lats, vals, poss = [], [], [], []
    fired = torch.zeros(n_latents, dtype=torch.float64)
    total = torch.zeros(n_latents, dtype=torch.float64)
    max_act = torch.zeros(n_latents)
    n_tokens = 0
    for batch in iter_residuals(model, tokenizer, texts, list(encoders), batch_size=batch_size,
                                max_length=max_length, desc="cache: scan", progress=progress):
        acts = torch.cat([enc(batch.hidden[layer]) for layer, enc in encoders.items()], dim=-1)
        acts = acts * batch.keep.unsqueeze(-1)
        n_tokens += int(batch.keep.sum())
        fired += (acts > 0).sum(dim=(0, 1)).double()
        total += acts.sum(dim=(0, 1)).double()
        doc_max, doc_pos = acts.max(dim=1)  # [batch, K]
        max_act = torch.maximum(max_act, doc_max.max(dim=0).values)
        b, k = (doc_max > 0).nonzero(as_tuple=True)
        docs.append(batch.doc_ids[b].numpy())
        lats.append(k.numpy())
        vals.append(doc_max[b, k].numpy())
        poss.append(doc_pos[b, k].numpy())
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    chosen = _select_examples(cat(docs, np.int64), cat(lats, np.int64), cat(vals, np.float32), cat(poss, np.int64),
                              n_latents, top_k, n_quantiles, per_quantile, seed)

    # pass 2: cut the windows from the chosen texts only
    width = before + after + 1
    n_ex = len(chosen)
    ex_tokens = torch.full((n_ex, width), PAD_TOKEN, dtype=torch.long)
    ex_acts = torch.zeros((n_ex, width))
    ex_center = torch.zeros(n_ex, dtype=torch.long)
    ex_value = torch.zeros(n_ex)
    by_doc: dict[int, list[int]] = {}
    for e, (_, _, d, _) in enumerate(chosen):
        by_doc.setdefault(d, []).append(e)
    needed = sorted(by_doc)
    if needed:
        sub_texts = [texts[d] for d in needed]
        for batch in iter_residuals(model, tokenizer, sub_texts, list(encoders), batch_size=batch_size,
                                    max_length=max_length, desc="cache: contexts", progress=progress):
            acts = torch.cat([enc(batch.hidden[layer]) for layer, enc in encoders.items()], dim=-1)
            acts = acts * batch.keep.unsqueeze(-1)
            for row, sub_doc in enumerate(batch.doc_ids.tolist()):
                for e in by_doc[needed[sub_doc]]:
                    k, _, _, pos = chosen[e]
                    start, stop = window_bounds(batch.keep[row], pos, before, after)
                    ex_tokens[e, : stop - start] = batch.input_ids[row, start:stop]
                    ex_acts[e, : stop - start] = acts[row, start:stop, k]
                    ex_center[e] = pos - start
                    ex_value[e] = acts[row, pos, k]
    used = sorted({int(i) for i in ex_tokens.unique().tolist() if i != PAD_TOKEN})
    vocab = {i: tokenizer.decode([i]) for i in used}
    tensors = {
        "latent_layer": torch.tensor([layer for layer, _ in order], dtype=torch.long),
        "latent_id": torch.tensor([latent for _, latent in order], dtype=torch.long),
        "max_activation": max_act,
        "mean_activation": (total / max(n_tokens, 1)).float(),
        "frequency": (fired / max(n_tokens, 1)).float(),
        "example_latent": torch.tensor([c[0] for c in chosen], dtype=torch.long),
        "example_kind": torch.tensor([c[1] for c in chosen], dtype=torch.long),
        "example_doc": torch.tensor([c[2] for c in chosen], dtype=torch.long),
        "example_pos": torch.tensor([c[3] for c in chosen], dtype=torch.long),
        "example_center": ex_center,
        "example_value": ex_value,
        "example_tokens": ex_tokens,
        "example_acts": ex_acts,
    }
    info = {
        "model": getattr(getattr(model, "config", None), "name_or_path", None),
        "n_texts": len(texts), "n_tokens": n_tokens, "top_k": top_k, "n_quantiles": n_quantiles,
        "per_quantile": per_quantile, "window": [before, after], "max_length": max_length, "seed": seed,
        "layers": sorted(encoders),
    }
    return ActivationCache(latents=order, tensors=tensors, vocab=vocab, info=info)
