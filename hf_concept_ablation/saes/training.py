"""Train sae-lens SAEs on the residual stream of any transformers causal LM, fully offline.

The whole pipeline (:func:`train_saes`, also ``hf-concept-ablation train-sae``) has three steps, each usable alone:

1. :func:`~hf_concept_ablation.saes.activation_store.cache_activations` stores the residual stream
   of a text corpus after every requested layer (``activation_store``);
2. :func:`train_sae` trains one sae-lens SAE (TopK or JumpReLU) on one layer's
   cached activations with sae-lens's own `SAETrainer` (no wandb, no
   TransformerLens), with a tqdm progress bar and checkpoints; rerunning after
   an interruption continues from the last checkpoint. Inputs are scaled to
   an average norm of ``sqrt(d_in)`` during training and the scale is folded
   into the weights at the end, so the saved SAE takes raw activations.
   The result is saved in sae-lens format (``cfg.json`` +
   ``sae_weights.safetensors``, float16 by default) with ``hook_name`` and
   ``model_name`` in its metadata;
3. :func:`~hf_concept_ablation.saes.quality.evaluate_sae` measures explained variance, L0 and
   cross-entropy loss recovered on held-out text (``sae_quality``).

The suite shipped with the package (`hf_concept_ablation.adapter.sae_sources.SHIPPED_RELEASE`, found by
`hf_concept_ablation.adapter.sae_sources.shipped_sae_source`) was made with this module; see ``docs/saes.md``.

Command line: ``hf-concept-ablation train-sae --help`` (and ``hf-concept-ablation corpus`` for the corpus alone).
"""

from __future__ import annotations

import math
import os
import random
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..checks import check_number
from ..files import read_json, write_json_atomic
from ..loading import resolve_device
from ..resumable import resume_folder
from .activation_store import (
    ShuffledBatches,
    cache_activations,
    load_cached_activations,
)
from .quality import SAEQuality, evaluate_sae

if TYPE_CHECKING:
    from sae_lens import SAE

def hook_name(layer: int) -> str:
    """sae-lens hook name of the residual stream after decoder layer ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


# --------------------------------------------------------------------------- training


ARCHITECTURES = ("topk", "jumprelu")
SAVE_DTYPES = ("float16", "bfloat16", "float32")


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
        device: where the model and the SAE run (``"auto"``: ``"cuda"`` when a GPU is visible, else ``"cpu"``).
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
    device: str = "auto"

    def __post_init__(self) -> None:
        """Check every setting before any work (a folder records the settings of its first run, so a bad value found
        later would also lock out the corrected run)."""
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name, low, high, options in (
            ("d_sae", 1, math.inf, {"integer": True}),
            *([("k", 1, self.d_sae, {"integer": True})] if self.architecture == "topk" else []),
            ("batch_size", 1, math.inf, {"integer": True}), ("training_tokens", self.batch_size, math.inf, {"integer": True}),
            ("lr", 0, math.inf, {"low_open": True}), ("l0_coefficient", 0, math.inf, {}),
            ("jumprelu_init_threshold", 0, math.inf, {"low_open": True}),
            ("lr_warm_up_steps", 0, math.inf, {"integer": True}), ("lr_decay_fraction", 0, 1, {}),
            ("dead_feature_window", 1, math.inf, {"integer": True}), ("n_checkpoints", 0, math.inf, {"integer": True}),
            ("seed", 0, 2**32 - 1, {"integer": True}),
        ):
            check_number(getattr(self, name), f"SAE training setting {name}", low, high, **options)
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"SAE training setting save_dtype must be one of {SAVE_DTYPES}, got {self.save_dtype!r}")
        self.device = resolve_device(self.device)


def _make_training_sae(cfg: SAETrainingConfig, d_in: int, layer: int, model_name: str | None):
    from sae_lens import (
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name=hook_name(layer), model_name=model_name)
    common = dict(d_in=d_in, d_sae=cfg.d_sae, dtype="float32", device=cfg.device, metadata=metadata,
                  normalize_activations="expected_average_only_in")
    torch.manual_seed(cfg.seed + layer)
    if cfg.architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, **common))
    return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(  # the one other architecture SAETrainingConfig admits
        l0_coefficient=cfg.l0_coefficient, jumprelu_init_threshold=cfg.jumprelu_init_threshold, **common))


def _latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    from sae_lens.constants import TRAINER_STATE_FILENAME

    done = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / TRAINER_STATE_FILENAME).exists()]
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
    record_settings(out, cfg)  # checkpoints (or an SAE) of other settings are refused, not resumed
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


SETTINGS_NAME = "sae_training_config.json"  #: the settings an SAE (or its checkpoints) was trained with
#: settings that do not change what is learned
_IRRELEVANT_SETTINGS = ("device", "n_checkpoints")


def record_settings(folder: Path, cfg: SAETrainingConfig) -> None:
    """Record `cfg` in ``folder/sae_training_config.json``, or refuse a folder recording other settings
    (`resumable.resume_folder`: work of other settings is never resumed or reused)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _IRRELEVANT_SETTINGS}
    resume_folder(folder, settings, record=SETTINGS_NAME, what="SAE training")


def _save_sae(sae: Any, out: Path, dtype: str) -> None:
    """Save an inference SAE in sae-lens format with its weights (and recorded dtype) in ``dtype``."""
    out.mkdir(parents=True, exist_ok=True)
    sae = sae.to(dtype=getattr(torch, dtype))
    sae.cfg.dtype = dtype
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        sae.save_model(tmp)
        # moved in one by one, cfg.json last: it marks the layer done (`train_saes` skips layers that have it)
        for name in sorted(os.listdir(tmp), key=lambda name: name == "cfg.json"):
            os.replace(Path(tmp) / name, out / name)


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

    ``corpus`` is a corpus JSONL (:mod:`hf_concept_ablation.saes.corpus`; default: build
    the default corpus) whose ``train`` split feeds training and whose
    ``heldout`` split feeds evaluation (``eval_tokens`` tokens). ``activations`` is the activation cache
    folder (default ``<out_dir>/activations``); an existing complete cache is
    used as is. ``jobs`` > 1 trains that many layers at once in worker processes
    (sharing ``threads``). Adds the results to ``<out_dir>/quality.json``.
    """
    from sae_lens import SAE

    from ..loading import base_model_id, load_model
    from . import corpus as corpus_mod

    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(model_spec, device=cfg.device)
    cfg.model_name = cfg.model_name or base_model_id(model_spec)
    corpus_path = Path(corpus) if corpus is not None else corpus_mod.build_corpus(
        corpus_mod.CorpusRecipe(model=model_spec), model_and_tokenizer=(model, tokenizer))
    cache = Path(activations) if activations is not None else out / "activations"
    texts = list(corpus_mod.iter_texts(corpus_path, "train", seed=cfg.seed))
    cache_activations(model, tokenizer, texts, layers, cache, max_corpus_tokens, context_size)  # a finished one: kept
    heldout = [r["text"] for r in corpus_mod.read_corpus(corpus_path, "heldout")]
    random.Random(cfg.seed).shuffle(heldout)
    done = [layer for layer in layers if (out / f"layer_{layer}" / "cfg.json").exists()]
    for layer in done:
        if (out / f"layer_{layer}" / SETTINGS_NAME).is_file():  # (SAEs trained before settings were recorded: kept)
            record_settings(out / f"layer_{layer}", cfg)
    todo = [layer for layer in layers if layer not in done]
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
        sae = SAE.load_from_disk(layer_dir, device="cpu", dtype="float32")
        results[layer] = evaluate_sae(model, tokenizer, sae, layer, heldout, context_size, max_tokens=eval_tokens,
                                      ce_max_tokens=eval_ce_tokens) if heldout else None
        if results[layer] is not None:
            q = results[layer]
            print(f"[sae_training] layer {layer}: EV {q.explained_variance:.3f}  L0 {q.l0:.1f}  "
                  f"CE recovered {q.ce_loss_recovered:.3f}  (clean {q.ce_clean:.3f}, sae {q.ce_sae:.3f}, "
                  f"zero {q.ce_zero:.3f}; {q.n_tokens} tokens)", file=sys.stderr)
    report_path = out / "quality.json"
    quality = read_json(report_path).get("quality", {}) if report_path.exists() else {}
    quality.update({str(k): (asdict(v) if v else None) for k, v in results.items()})
    report = {
        "model": cfg.model_name, "corpus": str(corpus_path), "config": asdict(cfg),
        "activation_tokens": read_json(cache / "manifest.json")["tokens"],
        "quality": quality,
    }
    write_json_atomic(report_path, report, indent=2)
    return results
