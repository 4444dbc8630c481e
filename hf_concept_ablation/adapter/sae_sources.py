"""Every SAE source behind one loader, and the checks that an SAE fits a model.

Sources (see `SAESource`): a sae-lens release and id (downloaded through sae-lens's
own registry and converters), the package's own suite for the embedded model
(release `SHIPPED_RELEASE`, ids ``layer_<L>``), a local sae-lens folder (``cfg.json`` +
``sae_weights.safetensors``), or a Gemma Scope style folder of raw parameters
(``params.safetensors`` or ``params.npz``, read with ``allow_pickle=False``).
All of them come back as `sae_lens.SAE` objects.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..loading import check_layer_exists, text_config
from .config import SAESource

SAE_LENS_FILES = ("cfg.json", "sae_weights.safetensors")
RAW_PARAM_FILES = ("params.safetensors", "params.npz")
RAW_PARAM_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
#: Architectures whose latents can be ablated exactly from their own encoder columns.
PER_LATENT_ARCHITECTURES = ("standard", "jumprelu")
#: Architectures where a latent's activation depends on all others (the full encoder is needed).
TOPK_ARCHITECTURES = ("topk",)
SUPPORTED_ARCHITECTURES = PER_LATENT_ARCHITECTURES + TOPK_ARCHITECTURES

#: Release name of the SAE suite shipped with the package for the embedded Gemma 3 270M (made with
#: `hf_concept_ablation.saes.training`; see ``docs/saes.md``); its ids are ``layer_<L>``. Configs name it
#: like a sae-lens release, so a saved adapter does not depend on where the package is installed.
SHIPPED_RELEASE = "hf-concept-ablation/gemma-3-270m-res"
#: Decoder layers of the embedded Gemma 3 270M (18 layers) with a shipped SAE.
SHIPPED_LAYERS: tuple[int, ...] = (3, 6, 9, 12)
SHIPPED_SUITE_DIR = Path(__file__).resolve().parent.parent / "assets" / "saes" / "gemma-3-270m"


def shipped_sae_dir(layer: int) -> Path:
    """Folder of the shipped SAE for a layer of the embedded Gemma 3 270M."""
    if layer not in SHIPPED_LAYERS:
        raise ValueError(f"no shipped SAE for layer {layer}; shipped layers: {SHIPPED_LAYERS}")
    return SHIPPED_SUITE_DIR / f"layer_{layer}"


def shipped_sae_source(layer: int) -> SAESource:
    """`SAESource` of the shipped SAE for a layer (see `SHIPPED_LAYERS`)."""
    shipped_sae_dir(layer)  # an error naming the layer if there is none
    return SAESource(release=SHIPPED_RELEASE, sae_id=f"layer_{layer}")


def _shipped_sae_dir_of(sae_id: str) -> Path:
    match = re.fullmatch(r"layer_(\d+)", sae_id)
    if not match:
        raise ValueError(f"unknown id {sae_id!r} in release {SHIPPED_RELEASE!r}; ids: "
                         f"{[f'layer_{layer}' for layer in SHIPPED_LAYERS]}")
    return shipped_sae_dir(int(match.group(1)))


def load_sae(source: SAESource, device: str | torch.device = "cpu", dtype: str = "float32") -> SAE:
    """Load the SAE a `SAESource` names, as a sae-lens `SAE` in eval mode."""
    if source.release == SHIPPED_RELEASE:
        sae = _load_local(_shipped_sae_dir_of(source.sae_id), device=str(device), dtype=dtype)
    elif source.path is None:
        sae = SAE.from_pretrained(source.release, source.sae_id, device=str(device), dtype=dtype)
    else:
        sae = _load_local(Path(source.path), device=str(device), dtype=dtype)
    architecture = sae.cfg.architecture()
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"SAE {source.describe()} has architecture {architecture!r}; supported: {SUPPORTED_ARCHITECTURES}"
        )
    if sae.cfg.normalize_activations not in (None, "none"):
        raise ValueError(
            f"SAE {source.describe()} normalizes its inputs ({sae.cfg.normalize_activations!r}); fold the "
            "normalization into the weights first (sae-lens: fold_activation_norm_scaling_factor)"
        )
    return sae.eval()


def _load_local(path: Path, device: str, dtype: str) -> SAE:
    if not path.is_dir():
        raise FileNotFoundError(f"SAE folder {path} does not exist")
    if any((path / name).exists() for name in SAE_LENS_FILES):
        missing = [name for name in SAE_LENS_FILES if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"SAE folder {path} is missing {missing} (a sae-lens folder needs {SAE_LENS_FILES})")
        try:
            return SAE.load_from_disk(path, device=device, dtype=dtype)
        except (SafetensorError, ValueError, TypeError, KeyError, RuntimeError) as err:
            raise ValueError(f"SAE folder {path} does not load as a sae-lens SAE {SAE_LENS_FILES} "
                             f"({type(err).__name__}: {err})") from err
    for name in RAW_PARAM_FILES:
        if (path / name).is_file():
            return _load_raw_params(path / name, device=device, dtype=dtype)
    raise FileNotFoundError(
        f"SAE folder {path} has neither sae-lens files {SAE_LENS_FILES} nor raw parameters {RAW_PARAM_FILES}"
    )


def _load_raw_params(file: Path, device: str, dtype: str) -> SAE:
    """A Gemma Scope style JumpReLU SAE from raw parameters (no ``cfg.json``)."""
    try:
        if file.suffix == ".npz":
            with np.load(file, allow_pickle=False) as data:
                params = {key: torch.from_numpy(np.asarray(data[key], dtype=np.float32)) for key in data.files}
        else:
            params = load_file(str(file))
    except (SafetensorError, ValueError, TypeError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{file} is not a readable parameter file ({type(err).__name__}: {err})") from err
    params = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in params.items()}
    missing = [key for key in RAW_PARAM_KEYS if key not in params]
    if missing:
        raise ValueError(f"{file} is missing parameter(s) {missing}; a Gemma Scope SAE needs {RAW_PARAM_KEYS}")
    if params["W_enc"].ndim != 2:
        raise ValueError(f"{file}: W_enc has shape {list(params['W_enc'].shape)}, expected [d_in, d_sae]")
    d_in, d_sae = params["W_enc"].shape
    expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for key, shape in expected.items():
        if tuple(params[key].shape) != shape:
            raise ValueError(f"{file}: {key} has shape {list(params[key].shape)}, expected {list(shape)} "
                             f"(W_enc is [d_in={d_in}, d_sae={d_sae}])")
    match = re.search(r"layer_(\d+)", str(file.parent))
    metadata = SAEMetadata(hook_name=f"blocks.{match.group(1)}.hook_resid_post") if match else SAEMetadata()
    cfg = JumpReLUSAEConfig(
        d_in=d_in, d_sae=d_sae, dtype=dtype, device=device, apply_b_dec_to_input=False, metadata=metadata
    )
    sae = JumpReLUSAE(cfg)
    sae.load_state_dict({key: params[key] for key in RAW_PARAM_KEYS})
    return sae.to(device=device, dtype=getattr(torch, dtype))


def sae_layer(sae: SAE) -> int | None:
    """The residual-stream layer an SAE was trained on, read from its hook name, if recorded."""
    hook_name = sae.cfg.metadata.hook_name
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook_name or "")
    return int(match.group(1)) if match else None


def _normalized_model_name(name: str) -> str:
    """The model's own name: the last part of a Hub id or folder, or ``<name>`` of a Hub cache snapshot folder
    (``.../models--<org>--<name>/snapshots/<revision>``)."""
    cached = re.search(r"models--[^/]+--([^/]+)/snapshots/[^/]+/?$", name)
    return (cached.group(1) if cached else name.rstrip("/").split("/")[-1]).lower()


def check_sae_fits(
    sae: SAE,
    *,
    layer: int,
    num_layers: int,
    hidden_size: int,
    latents: Sequence[int] = (),
    model_name: str | None = None,
    source: str = "SAE",
) -> None:
    """Raise a ValueError naming the bad value if an SAE cannot be used at `layer` of a model."""
    check_layer_exists(layer, num_layers)
    if sae.cfg.d_in != hidden_size:
        raise ValueError(f"{source} has input size d_in={sae.cfg.d_in}, but the model's hidden size is {hidden_size}")
    trained_layer = sae_layer(sae)
    if trained_layer is not None and trained_layer != layer:
        raise ValueError(f"{source} was trained on layer {trained_layer} ({sae.cfg.metadata.hook_name}), not layer {layer}")
    bad = [i for i in latents if not 0 <= i < sae.cfg.d_sae]
    if bad:
        raise ValueError(f"latent id(s) {bad} out of range for {source} of width d_sae={sae.cfg.d_sae}")
    sae_model = sae.cfg.metadata.model_name
    if model_name and sae_model and _normalized_model_name(sae_model) != _normalized_model_name(model_name):
        raise ValueError(
            f"{source} was trained on model {sae_model!r}, not {model_name!r} "
            "(pass check_model_name=False to the config, or --no-check-model-name to the search, to use it anyway)"
        )


def check_saes_fit_model(model: torch.nn.Module, saes: Mapping[int, SAE],
                         latents: Mapping[int, Sequence[int]] | None = None, check_model_name: bool = False) -> None:
    """`check_sae_fits` for each layer's SAE against `model`'s config (layer count, hidden size, and with
    `check_model_name` its ``name_or_path``), before any pass over data: a misfit is named at once, not as a shape
    error deep in torch or a refused adapter minutes later."""
    config = text_config(model)
    model_name = getattr(model.config, "name_or_path", None) if check_model_name else None
    for layer, sae in saes.items():
        check_sae_fits(sae, layer=int(layer), num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                       latents=(latents or {}).get(layer, ()), model_name=model_name,
                       source=f"the SAE given for layer {layer}")
