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

With a ``checkpoint`` folder, both passes save their progress there every ``checkpoint_every``
batches (safetensors shards and a JSON manifest with a hash of the build's inputs), so a build
interrupted and run again with the same inputs continues where it stopped, to the same cache bit
for bit (a finished build's progress, kept with ``keep_checkpoint``, gives it again without a
forward pass); progress made with other inputs is deleted, not reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file

from ..files import atomic_path, file_stem, write_json_atomic
from ..resumable import resume_folder
from .activations import (
    ResidualBatch,
    as_text_list,
    encoders_for,
    iter_residuals,
    token_batches,
)

TOP = 0  #: example kind code of a top-activating context; quantile bins are 1..n_quantiles (1 = lowest)
PAD_TOKEN = -1  #: token id filling windows shorter than the cache's window width
PROGRESS_NAME = "progress.json"  #: the manifest of a cache build's saved progress (`build_activation_cache`)
_PROGRESS_FILE = re.compile(r"progress\.json|(scan|windows)_\d{5}\.safetensors|\..*\.tmp(\.json|\.safetensors)")
_SPARSE = ("doc", "latent", "value", "pos")  #: what the scan keeps of each text where a latent fires
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


class _Progress:
    """The saved progress of a cache build in a folder of its own (`build_activation_cache`'s `checkpoint`): per
    pass, safetensors shards of what its batches found, in order, and ``progress.json`` naming them with the number
    of batches done and a fingerprint of the build's inputs. Progress saved for other inputs is deleted, not reused
    (a cache: `resumable.resume_folder` with ``recompute``). Without a folder, nothing is saved or resumed."""

    def __init__(self, folder: str | os.PathLike | None, inputs: str, every: int) -> None:
        if every < 1:
            raise ValueError(f"checkpoint_every must be at least 1 batch, got {every}")
        self.folder, self.every = (None if folder is None else Path(folder)), every
        self.manifest: dict[str, Any] = {"inputs": inputs, "passes": {}}
        if self.folder is None:
            return
        if self.folder.is_dir():
            foreign = sorted(p.name for p in self.folder.iterdir() if not _PROGRESS_FILE.fullmatch(p.name))
            if foreign:
                raise ValueError(f"checkpoint folder {self.folder} holds files that are not a cache build's "
                                 f"progress ({', '.join(foreign[:5])}); give a folder of its own")
        earlier = resume_folder(self.folder, {"inputs": inputs}, record=PROGRESS_NAME, what="cache build progress",
                                recompute=True)
        self.manifest.update(earlier or {})

    def resumed(self, stage: str) -> tuple[int, list[dict[str, torch.Tensor]]]:
        """The batches of pass `stage` an earlier build did, and the shards of what they found, in order."""
        shards = self.manifest["passes"].get(stage, [])
        if not shards:
            return 0, []
        return shards[-1]["batches"], [load_file(str(self.folder / s["file"])) for s in shards]

    def due(self, batches: int, total: int) -> bool:
        """Whether to save after `batches` of the pass's `total` batches: every `every` batches, and at its end."""
        return self.folder is not None and (batches % self.every == 0 or batches == total)

    def save(self, stage: str, batches: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Record `batches` of pass `stage` done, with `tensors`: what they found since the last save."""
        shards = self.manifest["passes"].setdefault(stage, [])
        name = f"{stage}_{len(shards):05d}.safetensors"
        with atomic_path(self.folder / name) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        shards.append({"file": name, "batches": batches})
        write_json_atomic(self.folder / PROGRESS_NAME, self.manifest)

    def remove(self) -> None:
        """Delete the saved progress (the cache is built)."""
        if self.folder is not None:
            shutil.rmtree(self.folder)


def _update_digest(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Feed `tensor` (with its name, dtype and shape) to `digest`."""
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())


def _inputs_fingerprint(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str],
                        saes: Mapping[int, SAE], order: Sequence[tuple[int, int]], settings: Mapping[str, Any]) -> str:
    """A hash of everything a cache build's passes depend on: the model's weights and device, the texts as the
    model reads them (each batch's token ids, attention mask and counted positions, from the tokenizer as it is
    now: its normalizer, pre-tokenizer and special tokens included), the SAEs (weights and settings), the latents
    and the build's settings (``batch_size`` and ``max_length`` among them)."""
    digest = hashlib.sha256()
    for _, batch, keep in token_batches(tokenizer, texts, settings["batch_size"], settings["max_length"]):
        for name, tensor in (*batch.items(), ("keep", keep)):
            _update_digest(digest, name, tensor)
    described = {
        "latents": [list(key) for key in order], "settings": dict(settings),
        "device": next(model.parameters()).device.type,
        "saes": {str(layer): sae.cfg.to_dict() for layer, sae in saes.items()},
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for module in (model, *saes.values()):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            _update_digest(digest, name, tensor)
    return digest.hexdigest()[:16]


def _latent_batches(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], encoders: Mapping[int, Any],
                    done: int, batch_size: int, max_length: int, desc: str, progress: bool
                    ) -> Iterator[tuple[int, ResidualBatch, torch.Tensor]]:
    """The batches of `texts` after the first `done`: the number of batches done with each, the batch (its
    ``doc_ids`` counted in `texts`) and its latents' activations ``[batch, seq, K]`` (0 at BOS and padding)."""
    batches = iter_residuals(model, tokenizer, texts[done * batch_size:], list(encoders), batch_size=batch_size,
                             max_length=max_length, desc=desc, progress=progress)
    for b, batch in enumerate(batches, start=done + 1):
        acts = torch.cat([enc(batch.hidden[layer]) for layer, enc in encoders.items()], dim=-1)
        batch.doc_ids += done * batch_size
        yield b, batch, acts * batch.keep.unsqueeze(-1)


def _scan(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], encoders: Mapping[int, Any], n_latents: int,
          saved: _Progress, batch_size: int, max_length: int, progress: bool) -> dict[str, torch.Tensor]:
    """Pass 1: every text's maximum of each latent and its position (kept sparse: ``doc``, ``latent``, ``value``,
    ``pos``, where it fires), and over all counted tokens each latent's firing count, sum and maximum and the number
    of tokens; resumed from and saved to `saved`."""
    done, shards = saved.resumed("scan")
    found: dict[str, list[torch.Tensor]] = {key: [s[key] for s in shards] for key in _SPARSE}
    totals = {k: v for k, v in shards[-1].items() if k not in _SPARSE} if shards else {
        "fired": torch.zeros(n_latents, dtype=torch.float64), "total": torch.zeros(n_latents, dtype=torch.float64),
        "max_activation": torch.zeros(n_latents), "n_tokens": torch.tensor(0)}
    unsaved, n_batches = len(shards), -(-len(texts) // batch_size)
    for b, batch, acts in _latent_batches(model, tokenizer, texts, encoders, done, batch_size, max_length,
                                          "cache: scan", progress):
        totals["n_tokens"] += int(batch.keep.sum())
        totals["fired"] += (acts > 0).sum(dim=(0, 1)).double()
        totals["total"] += acts.sum(dim=(0, 1)).double()
        doc_max, doc_pos = acts.max(dim=1)  # [batch, K]
        totals["max_activation"] = torch.maximum(totals["max_activation"], doc_max.max(dim=0).values)
        row, k = (doc_max > 0).nonzero(as_tuple=True)
        for key, values in zip(_SPARSE, (batch.doc_ids[row], k, doc_max[row, k], doc_pos[row, k])):
            found[key].append(values)
        if saved.due(b, n_batches):
            saved.save("scan", b, {**{key: torch.cat(found[key][unsaved:]) for key in _SPARSE}, **totals})
            unsaved = len(found["doc"])
    return {**{key: torch.cat(found[key]) for key in _SPARSE}, **totals}


def _cut_windows(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], encoders: Mapping[int, Any],
                 chosen: Sequence[tuple[int, int, int, int]], before: int, after: int, saved: _Progress,
                 batch_size: int, max_length: int, progress: bool) -> dict[str, torch.Tensor]:
    """Pass 2: the window of each `chosen` example (latent k, kind, doc, pos), from the texts it needs only:
    ``example_tokens``, ``example_acts``, ``example_center``, ``example_value``; resumed from and saved to `saved`."""
    n_ex, width = len(chosen), before + after + 1
    windows = {"example_tokens": torch.full((n_ex, width), PAD_TOKEN, dtype=torch.long),
               "example_acts": torch.zeros((n_ex, width)), "example_center": torch.zeros(n_ex, dtype=torch.long),
               "example_value": torch.zeros(n_ex)}
    by_doc: dict[int, list[int]] = {}
    for e, (_, _, d, _) in enumerate(chosen):
        by_doc.setdefault(d, []).append(e)
    needed = sorted(by_doc)
    done, shards = saved.resumed("windows")
    for shard in shards:
        for key, values in windows.items():
            values[shard["example"]] = shard[key]
    cut: list[int] = []  # examples cut since the last save
    n_batches = -(-len(needed) // batch_size)
    for b, batch, acts in _latent_batches(model, tokenizer, [texts[d] for d in needed], encoders, done, batch_size,
                                          max_length, "cache: contexts", progress):
        for row, sub_doc in enumerate(batch.doc_ids.tolist()):
            for e in by_doc[needed[sub_doc]]:
                k, _, _, pos = chosen[e]
                start, stop = window_bounds(batch.keep[row], pos, before, after)
                windows["example_tokens"][e, : stop - start] = batch.input_ids[row, start:stop]
                windows["example_acts"][e, : stop - start] = acts[row, start:stop, k]
                windows["example_center"][e] = pos - start
                windows["example_value"][e] = acts[row, pos, k]
                cut.append(e)
        if saved.due(b, n_batches):
            rows = torch.tensor(cut, dtype=torch.long)
            saved.save("windows", b, {"example": rows, **{key: values[rows] for key, values in windows.items()}})
            cut = []
    return windows


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
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    keep_checkpoint: bool = False,
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
        checkpoint: a folder of its own where the build saves its progress every `checkpoint_every` batches of each
            pass (safetensors and JSON, atomically). Run again with the same inputs (model, texts as the tokenizer
            encodes them, SAEs, latents and settings), the build continues where it stopped, and its cache is the
            one a build never interrupted makes; with other inputs it starts afresh. The folder is deleted once the
            cache is built, unless `keep_checkpoint` (for a caller that may be interrupted after the build: run again,
            the build makes the same cache from the folder without a forward pass; the caller deletes it).
    """
    texts = as_text_list(texts)
    encoders, order = encoders_for(model, saes, latents)
    n_latents = len(order)
    before, after = (int(window[0]), int(window[1]))
    if before < 0 or after < 0:
        raise ValueError(f"window must be two non-negative token counts, got {window}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    settings = {"top_k": top_k, "n_quantiles": n_quantiles, "per_quantile": per_quantile, "window": [before, after],
                "max_length": max_length, "seed": seed}
    used_saes = {layer: saes[layer] for layer in encoders}
    inputs = "" if checkpoint is None else _inputs_fingerprint(model, tokenizer, texts, used_saes, order,
                                                               {**settings, "batch_size": batch_size})
    saved = _Progress(checkpoint, inputs, checkpoint_every)

    found = _scan(model, tokenizer, texts, encoders, n_latents, saved, batch_size, max_length, progress)
    chosen = _select_examples(*(found[key].numpy() for key in _SPARSE), n_latents, top_k, n_quantiles,
                              per_quantile, seed)
    windows = _cut_windows(model, tokenizer, texts, encoders, chosen, before, after, saved, batch_size, max_length,
                           progress)
    used = sorted({int(i) for i in windows["example_tokens"].unique().tolist() if i != PAD_TOKEN})
    vocab = {i: tokenizer.decode([i]) for i in used}
    n_tokens = int(found["n_tokens"])
    tensors = {
        "latent_layer": torch.tensor([layer for layer, _ in order], dtype=torch.long),
        "latent_id": torch.tensor([latent for _, latent in order], dtype=torch.long),
        "max_activation": found["max_activation"],
        "mean_activation": (found["total"] / max(n_tokens, 1)).float(),
        "frequency": (found["fired"] / max(n_tokens, 1)).float(),
        "example_latent": torch.tensor([c[0] for c in chosen], dtype=torch.long),
        "example_kind": torch.tensor([c[1] for c in chosen], dtype=torch.long),
        "example_doc": torch.tensor([c[2] for c in chosen], dtype=torch.long),
        "example_pos": torch.tensor([c[3] for c in chosen], dtype=torch.long),
        **windows,
    }
    info = {
        "model": getattr(getattr(model, "config", None), "name_or_path", None),
        "n_texts": len(texts), "n_tokens": n_tokens, **settings, "layers": sorted(encoders),
    }
    if not keep_checkpoint:
        saved.remove()
    return ActivationCache(latents=order, tensors=tensors, vocab=vocab, info=info)
