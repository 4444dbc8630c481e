"""Train sae-lens SAEs on the residual stream of any transformers causal LM, fully offline.

Three steps, each usable alone:

1. :func:`cache_activations` runs the model once over a text corpus and stores
   the residual stream after every requested decoder layer (the output of
   layer ``L``, i.e. ``hidden_states[L + 1]``, sae-lens hook
   ``blocks.{L}.hook_resid_post``) as float16 safetensors shards. BOS and
   padding positions are left out (BOS has a huge norm and would wreck
   training). The forward pass stops after the deepest requested layer.
   Resumable: finished shards are kept and their texts are skipped.
2. :func:`train_sae` trains one sae-lens SAE (TopK or JumpReLU) on one layer's
   cached activations with sae-lens's own `SAETrainer` (no wandb, no
   TransformerLens), with a tqdm progress bar and checkpoints; rerunning after
   an interruption continues from the last checkpoint. Inputs are scaled to
   an average norm of ``sqrt(d_in)`` during training and the scale is folded
   into the weights at the end, so the saved SAE takes raw activations.
   The result is saved in sae-lens format (``cfg.json`` +
   ``sae_weights.safetensors``, float16 by default) with ``hook_name`` and
   ``model_name`` in its metadata.
3. :func:`evaluate_sae` measures quality on held-out text:

   - explained variance: ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``
     over all (non-BOS, non-padding) tokens, ``mean`` the mean activation of
     those tokens;
   - L0: the mean number of non-zero latents per token;
   - cross-entropy loss recovered: ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``,
     where ``CE_clean`` is the model's next-token loss, ``CE_sae`` the loss with
     the layer's output replaced by the SAE reconstruction, and ``CE_zero`` the
     loss with the layer's output replaced by zeros, in each case at non-BOS,
     non-padding positions only. The loss is the token mean over every
     position whose target is a real token.

The suite shipped with the package (:data:`SHIPPED_LAYERS`, found by
:func:`shipped_sae_source`) was made with this module; see ``docs/saes.md``.

CLI: ``python -m hf_concept_ablation.sae_training --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .config import SAESource
from .layer import keep_positions, layer_hidden, special_token_ids, with_layer_hidden
from .model import find_decoder_layers

if TYPE_CHECKING:
    from sae_lens import SAE

# --------------------------------------------------------------------------- the shipped suite

#: Model the shipped suite was trained on (recorded in each SAE's metadata).
SHIPPED_MODEL_NAME = "google/gemma-3-270m"
#: Decoder layers of the embedded Gemma 3 270M (18 layers) with a shipped SAE.
SHIPPED_LAYERS: tuple[int, ...] = (3, 6, 9, 12)
SHIPPED_SUITE_DIR = Path(__file__).parent / "assets" / "saes" / "gemma-3-270m"


def shipped_sae_dir(layer: int) -> Path:
    """Folder of the shipped SAE for a layer of the embedded Gemma 3 270M."""
    if layer not in SHIPPED_LAYERS:
        raise ValueError(f"no shipped SAE for layer {layer}; shipped layers: {SHIPPED_LAYERS}")
    return SHIPPED_SUITE_DIR / f"layer_{layer}"


def shipped_sae_source(layer: int) -> SAESource:
    """`SAESource` of the shipped SAE for a layer (see :data:`SHIPPED_LAYERS`)."""
    return SAESource(path=str(shipped_sae_dir(layer)))


def hook_name(layer: int) -> str:
    """sae-lens hook name of the residual stream after decoder layer ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


# --------------------------------------------------------------------------- model plumbing


class _StopForward(Exception):
    pass


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


def _pad_batch(chunks: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    return ids, mask


def _keep_mask(ids: torch.Tensor, mask: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """True at real tokens that are neither BOS nor padding (and never at position 0)."""
    keep = keep_positions(ids, mask, special_token_ids(tokenizer))
    keep[:, 0] = False
    return keep


@torch.no_grad()
def residual_activations(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Residual stream after each layer in ``layers``: ``{layer: [batch, seq, d_model]}``.

    The forward pass is stopped after the deepest requested layer.
    """
    blocks = find_decoder_layers(model)[1]
    captured: dict[int, torch.Tensor] = {}
    last = max(layers)

    def make_hook(layer: int):
        def hook(module, args, output):
            captured[layer] = layer_hidden(output).detach()
            if layer == last:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


# --------------------------------------------------------------------------- activation cache


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    settings = {"layers": list(layers), "context_size": context_size, "max_tokens": max_tokens,
                "n_texts": len(texts), "dtype": str(dtype).removeprefix("torch.")}
    manifest: dict[str, Any] = {"settings": settings, "shards": [], "texts_done": 0, "tokens": 0, "complete": False}
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old["settings"] != settings:
            raise ValueError(f"{out} holds activations made with other settings {old['settings']}; use another folder")
        manifest = old
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
        save_file({f"layer_{layer}": torch.cat(buffers[layer]).contiguous() for layer in layers}, str(out / name))
        manifest["shards"].append({"file": name, "tokens": buffered})
        manifest["tokens"] += buffered
        manifest["texts_done"] = texts_done
        manifest_path.write_text(json.dumps(manifest, indent=2))
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
            ids, mask = _pad_batch(chunks[b : b + batch_size], pad_id)
            acts = residual_activations(model, ids.to(device), mask.to(device), layers)
            keep = _keep_mask(ids, mask, tokenizer)
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
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return out


def load_cached_activations(cache: str | os.PathLike, layer: int, max_tokens: int | None = None) -> torch.Tensor:
    """All cached activations of one layer, ``[n_tokens, d_model]`` in the stored dtype.

    Tokens with a non-finite value are dropped with a warning: deep layers of
    some models (Gemma) have rare activations beyond float16's range (65504),
    which a float16 cache stores as ``inf``.
    """
    cache = Path(cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    parts = [load_file(str(cache / s["file"]))[f"layer_{layer}"] for s in manifest["shards"]]
    acts = torch.cat(parts)
    acts = acts[:max_tokens] if max_tokens is not None else acts
    finite = torch.isfinite(acts).all(dim=-1)
    if not finite.all():
        n_bad = int((~finite).sum())
        print(f"[sae_training] layer {layer}: dropping {n_bad} of {len(acts)} cached tokens with values out of "
              f"{acts.dtype} range", file=sys.stderr)
        acts = acts[finite]
    return acts


class ShuffledBatches:
    """Endless float32 batches from an activation tensor: a fresh seeded permutation every epoch.

    ``start_sample`` skips the samples already used, so a resumed run sees the same data.
    """

    def __init__(self, acts: torch.Tensor, batch_size: int, seed: int = 0, start_sample: int = 0) -> None:
        self.acts, self.batch_size, self.seed = acts, batch_size, seed
        self.position = start_sample
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


# --------------------------------------------------------------------------- training


@dataclass
class SAETrainingConfig:
    """How to train one SAE per layer.

    Args:
        architecture: ``"topk"`` or ``"jumprelu"``.
        d_sae: number of latents.
        k: active latents per token (TopK).
        l0_coefficient: sparsity coefficient (JumpReLU).
        jumprelu_init_threshold: initial threshold (JumpReLU).
        training_tokens: activations seen per SAE (epochs over the cache as needed).
        batch_size: activations per optimizer step.
        lr: Adam learning rate (after a linear warm-up, constant, then linear decay).
        lr_warm_up_steps: warm-up steps.
        lr_decay_fraction: share of the steps at the end over which the rate decays to ``lr / 10``.
        dead_feature_window: steps without firing after which a latent counts as dead
            (TopK trains dead latents with the auxiliary loss).
        n_checkpoints: checkpoints written during training (resume points).
        seed: seed of the initialisation and of the data order.
        save_dtype: dtype of the saved weights (``"float16"``, ``"bfloat16"`` or ``"float32"``).
        model_name: model id recorded in the SAE metadata.
        device: where the SAE trains (``"cpu"``, ``"cuda"``...).
    """

    architecture: str = "topk"
    d_sae: int = 2048
    k: int = 64
    l0_coefficient: float = 2.0
    jumprelu_init_threshold: float = 0.01
    training_tokens: int = 614_400
    batch_size: int = 1024
    lr: float = 3e-3
    lr_warm_up_steps: int = 20
    lr_decay_fraction: float = 0.2
    dead_feature_window: int = 200
    n_checkpoints: int = 10
    seed: int = 0
    save_dtype: str = "float16"
    model_name: str | None = None
    device: str = "cpu"


def _make_training_sae(cfg: SAETrainingConfig, d_in: int, layer: int, model_name: str | None):
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name=hook_name(layer), model_name=model_name)
    common = dict(d_in=d_in, d_sae=cfg.d_sae, dtype="float32", device=cfg.device, metadata=metadata,
                  normalize_activations="expected_average_only_in")
    torch.manual_seed(cfg.seed + layer)
    if cfg.architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, **common))
    if cfg.architecture == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
            l0_coefficient=cfg.l0_coefficient, jumprelu_init_threshold=cfg.jumprelu_init_threshold, **common))
    raise ValueError(f"architecture must be 'topk' or 'jumprelu', got {cfg.architecture!r}")


def _latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / "training_state.pt").exists()]
    return max(done, key=lambda p: int(p.name)) if done else None


def train_sae(
    acts: torch.Tensor,
    layer: int,
    out_dir: str | os.PathLike,
    cfg: SAETrainingConfig,
    checkpoint_dir: str | os.PathLike | None = None,
) -> SAE:
    """Train one SAE on ``acts`` (``[n, d_in]``, raw activations of ``layer``); save it to ``out_dir``.

    Checkpoints go to ``checkpoint_dir`` (default ``<out_dir>/checkpoints``); if
    one exists, training continues from the latest. Returns the inference SAE
    (float32, as saved but before the cast to ``cfg.save_dtype``).
    """
    from sae_lens import SAE, LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    out = Path(out_dir)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else out / "checkpoints"
    total = cfg.training_tokens - cfg.training_tokens % cfg.batch_size
    steps = total // cfg.batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total, train_batch_size_samples=cfg.batch_size, lr=cfg.lr, lr_end=cfg.lr / 10,
        lr_warm_up_steps=min(cfg.lr_warm_up_steps, steps // 10), lr_decay_steps=int(steps * cfg.lr_decay_fraction),
        dead_feature_window=cfg.dead_feature_window, feature_sampling_window=max(1, min(steps, 500)),
        n_checkpoints=cfg.n_checkpoints, checkpoint_path=str(ckpt_root),
        logger=LoggingConfig(log_to_wandb=False), device=cfg.device,
    )
    sae = _make_training_sae(cfg, acts.shape[1], layer, cfg.model_name)
    latest = _latest_checkpoint(ckpt_root)
    if latest is not None:
        loaded = type(sae).load_from_disk(latest, device=cfg.device)
        sae.load_state_dict(loaded.state_dict())
        print(f"[sae_training] layer {layer}: resuming from {latest}", file=sys.stderr)
    data = ShuffledBatches(acts, cfg.batch_size, seed=cfg.seed + layer)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=data)
    if latest is not None:
        trainer.load_trainer_state(latest)
        data.position = trainer.n_training_samples
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
    else:
        # Scale inputs to an average norm of sqrt(d_in); start the decoder bias at the mean input.
        sample = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(cfg.seed))[:65536]].float()
        scale = math.sqrt(acts.shape[1]) / sample.norm(dim=-1).mean().item()
        trainer.activation_scaler.scaling_factor = scale
        with torch.no_grad():
            sae.b_dec.copy_((sample.mean(0) * scale).to(sae.b_dec.device))
    trainer.fit()  # folds the input scale into the weights at the end
    tmp = out / "_inference"
    sae.save_inference_model(tmp)  # folds TopK decoder norms; an inference-format config
    final = SAE.load_from_disk(tmp, device="cpu", dtype="float32")
    _save_sae(final, out, cfg.save_dtype)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return final


def _save_sae(sae: Any, out: Path, dtype: str) -> None:
    """Save an inference SAE in sae-lens format with its weights (and recorded dtype) in ``dtype``."""
    out.mkdir(parents=True, exist_ok=True)
    sae = sae.to(dtype=getattr(torch, dtype))
    sae.cfg.dtype = dtype
    sae.save_model(out)


# --------------------------------------------------------------------------- evaluation


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
            ids, mask = _pad_batch(chunks[b : b + batch_size], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            state["keep"] = _keep_mask(ids, mask, tokenizer)
            n_tokens += int(state["keep"].sum())
            if ce_max_tokens is not None and ce_tokens >= ce_max_tokens:
                state["mode"] = "sae"  # reconstruction statistics only: stop after the layer
                residual_activations(model, ids, mask, [layer])
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
        ce_loss_recovered=(ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
        n_tokens=n_tokens,
        dead_latents=int((~fired).sum()),
        extra={"ce_tokens": ce_tokens},
    )


# --------------------------------------------------------------------------- the whole pipeline


def _train_layer_from_cache(cache: Any, layer: int, layer_dir: Any, cfg: dict, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    acts = load_cached_activations(cache, layer)
    train_sae(acts, layer, layer_dir, SAETrainingConfig(**cfg))


def train_saes(
    model_spec: str,
    layers: Sequence[int],
    out_dir: str | os.PathLike,
    cfg: SAETrainingConfig,
    corpus: str | os.PathLike | None = None,
    activations: str | os.PathLike | None = None,
    max_corpus_tokens: int = 300_000,
    context_size: int = 128,
    eval_tokens: int = 4096,
    eval_ce_tokens: int | None = None,
    threads: int | None = None,
    jobs: int = 1,
) -> dict[int, SAEQuality | None]:
    """Cache activations (if needed), train one SAE per layer into ``<out_dir>/layer_{L}``, evaluate each.

    ``corpus`` is a corpus JSONL (:mod:`hf_concept_ablation.corpus`; default: build
    the default corpus) whose ``train`` split feeds training and whose
    ``heldout`` split feeds evaluation (``eval_tokens`` tokens). ``activations`` is the activation cache
    folder (default ``<out_dir>/activations``); an existing complete cache is
    used as is. ``jobs`` > 1 trains that many layers at once in worker processes
    (sharing ``threads``). Adds the results to ``<out_dir>/quality.json``.
    """
    from . import corpus as corpus_mod
    from .models import base_model_id, load_model

    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(model_spec)
    cfg.model_name = cfg.model_name or base_model_id(model_spec)
    corpus_path = Path(corpus) if corpus is not None else corpus_mod.build_corpus(model_and_tokenizer=(model, tokenizer))
    cache = Path(activations) if activations is not None else out / "activations"
    if not ((cache / "manifest.json").exists() and json.loads((cache / "manifest.json").read_text())["complete"]):
        texts = list(corpus_mod.iter_texts(corpus_path, "train", seed=cfg.seed))
        cache_activations(model, tokenizer, texts, layers, cache, max_corpus_tokens, context_size)
    heldout = [r["text"] for r in corpus_mod.read_corpus(corpus_path, "heldout")]
    random.Random(cfg.seed).shuffle(heldout)
    todo = [layer for layer in layers if not (out / f"layer_{layer}" / "cfg.json").exists()]
    if jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        per_job = max(1, (threads or torch.get_num_threads()) // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_train_layer_from_cache, str(cache), layer, str(out / f"layer_{layer}"),
                                   asdict(cfg), per_job) for layer in todo]
            for future in futures:
                future.result()
    else:
        for layer in todo:
            _train_layer_from_cache(cache, layer, out / f"layer_{layer}", asdict(cfg), None)
    results: dict[int, SAEQuality | None] = {}
    for layer in layers:
        layer_dir = out / f"layer_{layer}"
        from sae_lens import SAE

        sae = SAE.load_from_disk(layer_dir, device="cpu", dtype="float32")
        results[layer] = evaluate_sae(model, tokenizer, sae, layer, heldout, context_size, max_tokens=eval_tokens,
                                      ce_max_tokens=eval_ce_tokens) if heldout else None
        if results[layer] is not None:
            q = results[layer]
            print(f"[sae_training] layer {layer}: EV {q.explained_variance:.3f}  L0 {q.l0:.1f}  "
                  f"CE recovered {q.ce_loss_recovered:.3f}  (clean {q.ce_clean:.3f}, sae {q.ce_sae:.3f}, "
                  f"zero {q.ce_zero:.3f}; {q.n_tokens} tokens)", file=sys.stderr)
    report_path = out / "quality.json"
    quality = json.loads(report_path.read_text())["quality"] if report_path.exists() else {}
    quality.update({str(k): (asdict(v) if v else None) for k, v in results.items()})
    report = {
        "model": cfg.model_name, "corpus": str(corpus_path), "config": asdict(cfg),
        "activation_tokens": json.loads((cache / "manifest.json").read_text())["tokens"],
        "quality": quality,
    }
    report_path.write_text(json.dumps(report, indent=2))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hf_concept_ablation.sae_training",
        description="Train sae-lens SAEs on a causal LM's residual stream, offline (no wandb, no Hub). "
        "Caches activations once for all layers, trains one SAE per layer with resumable checkpoints, "
        "and reports explained variance, L0 and CE loss recovered on held-out text.",
    )
    parser.add_argument("--model", default="embedded", help="'embedded' (Gemma 3 270M), a Hub id or a local folder")
    parser.add_argument("--layers", type=int, nargs="+", default=list(SHIPPED_LAYERS), help="decoder layers")
    parser.add_argument("--out", type=Path, required=True, help="output folder: layer_{L}/ per SAE, quality.json")
    parser.add_argument("--corpus", type=Path, default=None, help="corpus JSONL (default: build the default corpus)")
    parser.add_argument("--activations", type=Path, default=None, help="activation cache folder (default <out>/activations)")
    parser.add_argument("--max-corpus-tokens", type=int, default=300_000, help="tokens of activations to cache")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for the quality report")
    parser.add_argument("--eval-ce-tokens", type=int, default=None,
                        help="held-out tokens for CE loss recovered (default: --eval-tokens; the costly part)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--jobs", type=int, default=1, help="layers trained at once, in worker processes")
    defaults = SAETrainingConfig()
    for name, value in asdict(defaults).items():
        if name == "model_name":
            continue
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    cfg = SAETrainingConfig(**{k: args.pop(k) for k in asdict(defaults) if k in args})
    train_saes(
        args["model"], args["layers"], args["out"], cfg, corpus=args["corpus"], activations=args["activations"],
        max_corpus_tokens=args["max_corpus_tokens"], context_size=args["context_size"],
        eval_tokens=args["eval_tokens"], eval_ce_tokens=args["eval_ce_tokens"], threads=args["threads"], jobs=args["jobs"],
    )


if __name__ == "__main__":
    main()
