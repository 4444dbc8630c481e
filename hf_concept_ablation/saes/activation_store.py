"""Residual-stream activations of a text corpus on disk, the training data of the SAEs.

:func:`cache_activations` runs the model once over a corpus and stores the residual stream
after every requested decoder layer (the output of layer ``L``, i.e. ``hidden_states[L + 1]``,
sae-lens hook ``blocks.{L}.hook_resid_post``) as float16 safetensors shards. BOS and padding
positions are left out (BOS has a huge norm and would wreck training). The forward pass stops
after the deepest requested layer. Resumable: finished shards are kept and their texts are
skipped. :func:`load_cached_activations` reads one layer back and :class:`ShuffledBatches`
serves it in seeded shuffled batches.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..adapter.layer import keep_positions, special_token_ids
from ..adapter.residuals import residual_stream
from ..files import atomic_path, read_json, write_json_atomic
from ..resumable import check_settings


def tokenize_chunks(tokenizer: Any, texts: Iterable[str], context_size: int) -> Iterator[list[int]]:
    """Token ids of each text, cut into pieces of at most ``context_size`` tokens, each starting with BOS."""
    bos = tokenizer.bos_token_id
    body = context_size - (1 if bos is not None else 0)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            piece = ids[start : start + body]
            if len(piece) >= 2:
                yield ([bos] if bos is not None else []) + piece


def pad_batch(chunks: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of `chunks` right-padded with `pad_id` to the longest, and their attention mask."""
    width = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    return ids, mask


def keep_mask(ids: torch.Tensor, mask: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """True at real tokens that are neither BOS nor padding (and never at position 0)."""
    keep = keep_positions(ids, mask, special_token_ids(tokenizer))
    keep[:, 0] = False
    return keep


def cache_activations(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    out_dir: str | os.PathLike,
    max_tokens: int,
    context_size: int = 128,
    batch_size: int = 16,
    shard_tokens: int = 32768,
    dtype: torch.dtype = torch.float16,
    group_texts: int = 64,
) -> Path:
    """Store the residual stream at ``layers`` for up to ``max_tokens`` kept tokens of ``texts``.

    Writes ``shard_00000.safetensors``, ... (one tensor ``layer_{L}`` of shape
    ``[n_tokens, d_model]`` per layer) and ``manifest.json``. Rerunning with the
    same arguments continues after the last finished shard. Texts are read in
    groups of ``group_texts`` whose chunks are sorted by length (little padding);
    a shard is written once ``shard_tokens`` are buffered, at a group boundary.
    """
    if not texts:
        raise ValueError(f"no texts to cache activations of (for {out_dir})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    settings = {"layers": list(layers), "context_size": context_size, "max_tokens": max_tokens,
                "n_texts": len(texts), "dtype": str(dtype).removeprefix("torch.")}
    manifest: dict[str, Any] = {"settings": settings, "shards": [], "texts_done": 0, "tokens": 0, "complete": False}
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        check_settings(manifest["settings"], settings, where=out, what="activations", advice="use another folder")
    if manifest["complete"]:
        return out
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    buffers: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    buffered = 0
    bar = tqdm(total=max_tokens, initial=manifest["tokens"], desc="caching activations", unit="tok")

    def flush(texts_done: int) -> None:
        nonlocal buffered
        if buffered == 0:
            return
        name = f"shard_{len(manifest['shards']):05d}.safetensors"
        with atomic_path(out / name) as tmp:
            save_file({f"layer_{layer}": torch.cat(buffers[layer]).contiguous() for layer in layers}, str(tmp))
        manifest["shards"].append({"file": name, "tokens": buffered})
        manifest["tokens"] += buffered
        manifest["texts_done"] = texts_done
        write_json_atomic(manifest_path, manifest, indent=2)
        for layer in layers:
            buffers[layer].clear()
        buffered = 0

    group_size = group_texts
    i = manifest["texts_done"]
    while i < len(texts) and manifest["tokens"] + buffered < max_tokens:
        group = texts[i : i + group_size]
        chunks = sorted(tokenize_chunks(tokenizer, group, context_size), key=len)
        for b in range(0, len(chunks), batch_size):
            room = max_tokens - manifest["tokens"] - buffered
            if room <= 0:
                break
            ids, mask = pad_batch(chunks[b : b + batch_size], pad_id)
            acts = residual_stream(model, ids.to(device), mask.to(device), layers)
            keep = keep_mask(ids, mask, tokenizer)
            for layer in layers:
                buffers[layer].append(acts[layer][keep.to(device)][:room].to(dtype).cpu())
            n = min(int(keep.sum()), room)
            buffered += n
            bar.update(n)
        i += len(group)
        if buffered >= shard_tokens or manifest["tokens"] + buffered >= max_tokens or i >= len(texts):
            flush(i)
    flush(i)
    bar.close()
    manifest["complete"] = True
    write_json_atomic(manifest_path, manifest, indent=2)
    return out


def load_cached_activations(cache: str | os.PathLike, layer: int, max_tokens: int | None = None) -> torch.Tensor:
    """All cached activations of one layer, ``[n_tokens, d_model]`` in the stored dtype.

    Tokens with a non-finite value are dropped with a warning: deep layers of
    some models (Gemma) have rare activations beyond float16's range (65504),
    which a float16 cache stores as ``inf``.
    """
    cache = Path(cache)
    manifest = read_json(cache / "manifest.json")
    parts = [load_file(str(cache / s["file"]))[f"layer_{layer}"] for s in manifest["shards"]]
    acts = torch.cat(parts)
    acts = acts[:max_tokens] if max_tokens is not None else acts
    finite = torch.isfinite(acts).all(dim=-1)
    if not finite.all():
        n_bad = int((~finite).sum())
        print(f"[activation_store] layer {layer}: dropping {n_bad} of {len(acts)} cached tokens with values out of "
              f"{acts.dtype} range", file=sys.stderr)
        acts = acts[finite]
    return acts


class ShuffledBatches:
    """Endless float32 batches from an activation tensor: a fresh seeded permutation every epoch.

    ``position`` counts the samples drawn so far; a resumed run sets it to the samples its checkpoint had
    used, so it sees the same data as an uninterrupted one.
    """

    def __init__(self, acts: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.acts, self.batch_size, self.seed = acts, batch_size, seed
        self.position = 0
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.acts), generator=gen)
        return self._perm

    def __iter__(self) -> "ShuffledBatches":
        return self

    def __next__(self) -> torch.Tensor:
        n = len(self.acts)
        idx = []
        while len(idx) < self.batch_size:
            epoch, offset = divmod(self.position, n)
            take = min(self.batch_size - len(idx), n - offset)
            idx.append(self._perm_for(epoch)[offset : offset + take])
            self.position += take
            if sum(len(t) for t in idx) >= self.batch_size:
                break
        return self.acts[torch.cat(idx)].float()
