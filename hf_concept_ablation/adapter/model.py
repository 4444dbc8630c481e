"""Inject, control, save and load concept ablation in a Hugging Face causal LM.

The ablation is a forward hook on each chosen decoder layer (registered with
``prepend=True`` so ``output_hidden_states`` records the ablated value). The model
stays a `PreTrainedModel` (or `PeftModel`), so the stock `Trainer`, its
checkpoints, gradient checkpointing and a real PEFT LoRA applied before or after
all keep working. `ConceptAblation` is the handle, in the spirit of a PEFT model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from sae_lens import SAE
from safetensors.torch import save_file
from torch import nn

from ..files import atomic_path, write_text_atomic
from ..loading import check_layer_exists, text_config
from .config import (
    CONFIG_NAME,
    ERASER_TENSORS,
    WEIGHTS_NAME,
    ConceptAblationConfig,
    read_weights,
)
from .layer import (
    ConceptAblationLayer,
    keep_positions,
    layer_hidden,
    special_token_ids,
    with_layer_hidden,
)
from .sae_sources import check_sae_fits, load_sae

_HANDLE_ATTR = "_concept_ablation"
_MODULE_NAME = "concept_ablation"


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """Return ``(decoder stack, its list of decoder layers)`` for Gemma 2/3, Llama-style and GPT-2-style models.

    Works through wrappers (PEFT, DDP, FSDP) by searching for the ``nn.ModuleList``
    whose length is the config's number of hidden layers.
    """
    num_layers = text_config(model).num_hidden_layers
    candidates = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == num_layers and child_name in ("layers", "h", "blocks"):
                candidates.append((name.count("."), name, module, child))
    if not candidates:
        raise ValueError(
            f"could not find the decoder layers of {type(model).__name__}: no ModuleList named "
            f"'layers', 'h' or 'blocks' with {num_layers} entries"
        )
    _, _, stack, layers = min(candidates, key=lambda c: (c[0], len(c[1])))
    return stack, layers


class _PositionMask:
    """Which positions of the current batch may be ablated; set by a pre-hook on the decoder stack."""

    def __init__(self, skip_token_ids: list[int]) -> None:
        self.skip_token_ids = skip_token_ids
        self.keep: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None and self.skip_token_ids:
            warnings.warn("the decoder stack was called without input_ids (with inputs_embeds, e.g. by a multimodal "
                          "wrapper): BOS and padding positions cannot be told apart and are ablated like every other "
                          "position", stacklevel=2)
        self.keep = None if input_ids is None else keep_positions(input_ids, kwargs.get("attention_mask"), self.skip_token_ids)

    def for_shape(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.keep is None or self.keep.shape != hidden.shape[:2]:
            return None
        return self.keep.to(hidden.device)  # a layer may sit on another device (device_map="auto")


class ConceptAblation:
    """Handle on the concept ablation injected into a model.

    Create it with `inject_concept_ablation` or `ConceptAblation.from_pretrained`;
    find it again from any wrapper of the model with `get_concept_ablation`.
    """

    def __init__(self, model: nn.Module, config: ConceptAblationConfig, layers: Mapping[int, ConceptAblationLayer]):
        self.config = config
        self.layers = dict(layers)
        self.enabled = True
        stack, decoder_layers = find_decoder_layers(model)
        if getattr(stack, _HANDLE_ATTR, None) is not None:
            raise ValueError("this model already has a concept ablation; call .remove() on it first")
        skip = config.skip_token_ids if config.skip_token_ids is not None else special_token_ids(text_config(model))
        self._mask = _PositionMask(list(skip))
        self._stack = stack
        default_device = next(model.parameters()).device
        self._handles = [stack.register_forward_pre_hook(self._mask.capture, with_kwargs=True)]
        for index, module in self.layers.items():
            decoder_layer = decoder_layers[index]
            module.to(device=next(decoder_layer.parameters(), torch.empty(0, device=default_device)).device)
            decoder_layer.add_module(_MODULE_NAME, module)
            # a partial of a bound method, not a closure: `copy.deepcopy(model)` then gives the copy hooks bound to
            # its own copies of this handle and module
            hook = functools.partial(self._ablate, module)
            self._handles.append(decoder_layer.register_forward_hook(hook, prepend=True))
        setattr(stack, _HANDLE_ATTR, self)
        self.set_strength(config.alpha)

    def _ablate(self, module: ConceptAblationLayer, _layer: nn.Module, _args: tuple, output: Any) -> Any:
        if not self.enabled:
            return None
        hidden = layer_hidden(output)
        return with_layer_hidden(output, module(hidden, self._mask.for_shape(hidden)))

    # -- control ---------------------------------------------------------------------------------
    def enable(self) -> None:
        """Turn the ablation on."""
        self.enabled = True

    def disable(self) -> None:
        """Turn the ablation off (hooks stay registered and cost nothing)."""
        self.enabled = False

    @contextlib.contextmanager
    def enabled_as(self, enabled: bool) -> Iterator[None]:
        """Context manager: run with the ablation on or off, then restore the previous state."""
        previous = self.enabled
        self.enabled = enabled
        try:
            yield
        finally:
            self.enabled = previous

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: run without ablation (the deployment view), then restore the previous state."""
        return self.enabled_as(False)

    @property
    def strength(self) -> float:
        """Current strength alpha (the same at every layer)."""
        return float(next(iter(self.layers.values())).alpha)

    def set_strength(self, alpha: float) -> None:
        """Set the strength alpha in [0, 1] at every ablated layer."""
        for module in self.layers.values():
            module.set_alpha(alpha)
        self.config.alpha = float(alpha)

    def set_erasers(self, erasers: Mapping[int, Any]) -> None:
        """Replace the erasers of ``leace`` layers in place (e.g. refitted on the model being trained): per layer a
        ``concept_erasure.LeaceEraser`` or a mapping of its tensors (`ERASER_TENSORS`). The modules keep their device,
        dtype and strength; the config holds the new tensors, so `save_pretrained` saves what is in use."""
        for index, eraser in erasers.items():
            module = self.layers.get(index)
            if module is None or module.kind != "leace":
                raise ValueError(f"layer {index} has no LEACE eraser to replace; the leace layers are "
                                 f"{sorted(i for i, m in self.layers.items() if m.kind == 'leace')}")
            tensors = {name: eraser[name] if isinstance(eraser, Mapping) else getattr(eraser, name)
                       for name in ERASER_TENSORS}
            fresh = _eraser_layer(index, tensors, module.d_model)
            for name, tensor in fresh.state_tensors().items():
                current = getattr(module, name)
                if current.shape == tensor.shape:
                    current.copy_(tensor)  # in place: a compiled graph or a DDP-wrapped model keeps working
                else:  # another rank
                    module.register_buffer(name, tensor.to(current.device, current.dtype), persistent=False)
            self.config.erasers[index] = {name: t.detach().cpu() for name, t in tensors.items()}

    def remove(self) -> None:
        """Remove every hook and module; the model is left exactly as before injection."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self.layers.values():
            for parent in self._stack.modules():
                if getattr(parent, "_modules", {}).get(_MODULE_NAME) is module:
                    del parent._modules[_MODULE_NAME]
        setattr(self._stack, _HANDLE_ATTR, None)

    # -- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, model_card: str | None = None,
                        card_files: Sequence[str | os.PathLike] = ()) -> None:
        """Write ``concept_ablation.safetensors`` and ``concept_ablation_config.json`` (each atomically), and
        `model_card` (markdown, e.g. from `report.render_model_card`) as ``README.md`` with the files it shows
        (`card_files`, e.g. its figure) beside it. The config (and a card being replaced) is removed first and
        written last, so an interrupted save never leaves the new weights under the old config: such a folder is
        refused as having no config."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in [directory / CONFIG_NAME] + ([directory / "README.md"] if model_card is not None else []):
            stale.unlink(missing_ok=True)
        self.save_weights(directory)
        self.config.to_json_file(directory / CONFIG_NAME)
        for file in map(Path, card_files):
            if file.resolve() != (directory / file.name).resolve():
                shutil.copyfile(file, directory / file.name)
        if model_card is not None:
            write_text_atomic(directory / "README.md", model_card)

    def save_weights(self, save_directory: str | os.PathLike) -> None:
        """Write only ``concept_ablation.safetensors`` (atomically), e.g. beside the config it was made from."""
        tensors, metadata = {}, {}
        for index, module in self.layers.items():
            for name, tensor in module.state_tensors().items():
                tensors[f"layers.{index}.{name}"] = tensor.detach().cpu().contiguous()
            metadata[f"layers.{index}"] = module.metadata()
        with atomic_path(Path(save_directory) / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def push_to_hub(self, repo_id: str, *, private: bool = False, commit_message: str = "Upload concept ablation",
                    model_card: str | None = None, card_files: Sequence[str | os.PathLike] = (),
                    token: str | None = None, revision: str | None = None, subfolder: str | None = None) -> str:
        """Upload the adapter files (and a model card with the files it shows, `card_files`) to a Hub model repo,
        into `subfolder` on branch `revision` (made if missing) if given; `token` defaults to the environment's
        (``HF_TOKEN`` or the saved login). A card showing a local image that `card_files` does not hold is refused
        before anything is uploaded."""
        from huggingface_hub import HfApi

        if model_card is not None:
            missing = sorted(set(card_images(model_card)) - {Path(f).name for f in card_files})
            if missing:
                raise ValueError(f"the model card shows {missing}, which card_files does not hold: pass them, or the "
                                 "card's images are broken on the Hub")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and not revision.startswith("refs/pr/"):  # (a pull request's ref exists already)
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, model_card=model_card, card_files=card_files)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, path_in_repo=subfolder,
                                     commit_message=commit_message, revision=revision)
        return str(info)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path_or_repo_id: str | os.PathLike, *, subfolder: str | None = None,
                        revision: str | None = None, token: str | None = None,
                        cache_dir: str | os.PathLike | None = None) -> ConceptAblation:
        """Load a saved adapter (a local folder, or a Hub repo id at `revision`; in its `subfolder` if given, e.g.
        ``concept_ablation`` of a `Trainer` push) and inject it into `model`; no SAE is needed. `token` and
        `cache_dir` are passed to ``hf_hub_download``."""
        directory = _resolve_adapter_dir(path_or_repo_id, subfolder, revision=revision, token=token,
                                         cache_dir=cache_dir)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        data = ConceptAblationConfig.read_json(directory / CONFIG_NAME)
        tensors, metadata = read_weights(weights)
        no_center = [i for i in data.get("centers", []) if f"layers.{i}.center" not in tensors]
        if no_center:  # (a center is left out only by adapters of zero ablation saved before centers existed)
            raise ValueError(f"{CONFIG_NAME} lists centers for layer(s) {no_center} but {weights} holds none for them: "
                             "the two files are from different adapters")
        layers: dict[int, ConceptAblationLayer] = {}
        for key, meta in metadata.items():
            if not re.fullmatch(r"layers\.\d+", key):
                continue  # other header entries, e.g. {"format": "pt"} of a file saved again by other tools
            index = int(key.split(".")[1])
            prefix = f"layers.{index}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                layers[index] = ConceptAblationLayer.from_state(**json.loads(meta), tensors=state)
            except (TypeError, ValueError) as err:  # metadata that is not JSON, an unknown key, tensors that misfit
                raise ValueError(f"{weights}: layer {index} is not a valid ablation ({err})") from err
        explicit = {i: m.Q.T for i, m in layers.items() if i in set(data.get("directions", []))}
        centers = {i: m.center for i, m in layers.items() if i in set(data.get("centers", []))}
        erasers = {i: {name: getattr(m, name) for name in ERASER_TENSORS} for i, m in layers.items()
                   if i in set(data.get("erasers", [])) and m.kind == "leace"}
        config = ConceptAblationConfig.from_dict(data, directions=explicit, centers=centers, erasers=erasers)
        missing = sorted(set(config.layers) - set(layers))
        if missing:
            raise ValueError(f"{weights} has no tensors for layer(s) {missing} named in {CONFIG_NAME}")
        extra = sorted(set(layers) - set(config.layers))
        if extra:
            raise ValueError(f"{weights} holds layer(s) {extra} that {CONFIG_NAME} does not name (layers "
                             f"{config.layers}): the two files are from different adapters")
        _check_weights_match_config(layers, config, weights)
        _check_layers_fit(model, layers)
        return cls(model, config, _cast_like_model(model, layers, config))


def _resolve_adapter_dir(path_or_repo_id: str | os.PathLike, subfolder: str | None = None,
                         **hub_options: Any) -> Path:
    """The local folder holding the adapter files: `path_or_repo_id` (/ `subfolder`) on disk, else downloaded."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: not a saved concept ablation adapter")
        return folder
    if path.exists() or str(path_or_repo_id).count("/") != 1:
        raise FileNotFoundError(f"{path_or_repo_id} is neither an adapter folder nor a Hub repo id 'org/name'")
    if path.parent.is_dir():
        raise FileNotFoundError(f"adapter folder {path} does not exist (its parent folder {path.parent} does, so it "
                                "is not taken for a Hub repo id)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    where = f"{path_or_repo_id}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    try:
        config_file = hf_hub_download(str(path_or_repo_id), CONFIG_NAME, subfolder=subfolder, **hub_options)
        hf_hub_download(str(path_or_repo_id), WEIGHTS_NAME, subfolder=subfolder, **hub_options)
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        local = f"no folder {Path.cwd() / path}" if not path.is_absolute() else "no such local folder"
        raise FileNotFoundError(f"{where}: {local}, and no adapter from the Hub "
                                f"({type(err).__name__}: {str(err).splitlines()[0]})") from err
    return Path(config_file).parent


def card_images(card: str) -> list[str]:
    """The local files a markdown model card shows as images (``![alt](name.png)``; not URLs)."""
    return [target for target in re.findall(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)", card)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE)]


def _check_weights_match_config(layers: Mapping[int, ConceptAblationLayer], config: ConceptAblationConfig,
                                weights: Path) -> None:
    """Refuse weights whose kind, size or (where they are stored, in topk ablations) latent ids per layer are not what
    the config says (files of different adapters)."""
    for index, module in sorted(layers.items()):
        if _mode_of_kind(module.kind) != config.mode:
            raise ValueError(f"{weights}: layer {index} holds a {module.kind!r} ablation but {CONFIG_NAME} says "
                             f"mode={config.mode!r}: the two files are from different adapters")
        latents = config.latents.get(index)
        if latents is not None and (module.num_directions > len(latents) if module.kind == "projection"
                                    else module.num_directions != len(latents)):
            raise ValueError(f"{weights}: layer {index} holds {module.num_directions} directions but {CONFIG_NAME} "
                             f"names {len(latents)} latents: the two files are from different adapters")
        ids = getattr(module, "latent_ids", None)  # kept by topk ablations only
        if latents is not None and ids is not None and ids.tolist() != latents:
            raise ValueError(f"{weights}: layer {index} holds latents {ids.tolist()} but {CONFIG_NAME} names "
                             f"{latents}: the two files are from different adapters")


def _mode_of_kind(kind: str) -> str:
    """The config mode that makes an ablation module of `kind`."""
    return kind if kind in ("projection", "leace") else "latent"


def _check_layers_fit(model: nn.Module, layers: Mapping[int, ConceptAblationLayer]) -> None:
    language = text_config(model)
    for index, module in layers.items():
        check_layer_exists(index, language.num_hidden_layers)
        if module.d_model != language.hidden_size:
            raise ValueError(
                f"layer {index}: the ablation has d_model={module.d_model}, the model's hidden size is "
                f"{language.hidden_size}"
            )


def _cast_like_model(
    model: nn.Module, layers: dict[int, ConceptAblationLayer], config: ConceptAblationConfig
) -> dict[int, ConceptAblationLayer]:
    dtype = getattr(torch, config.dtype) if config.dtype else next(model.parameters()).dtype
    for module in layers.values():
        module.to(dtype=dtype)
    return layers


def inject_concept_ablation(
    model: nn.Module, config: ConceptAblationConfig, saes: Mapping[int, SAE] | None = None
) -> ConceptAblation:
    """Inject the ablation a config describes into `model` (optionally wrapped by PEFT) and return its handle.

    SAEs named in ``config.saes`` are loaded unless given in `saes` (layer -> sae-lens
    SAE); each is checked against the model (hidden size, layer, latent range, model
    name). Only the slices the ablation needs are kept.
    """
    language = text_config(model)
    config = copy.copy(config)  # the handle's strength and base model name are its own, not the caller's config's
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model.config, "name_or_path", None) or None
    saes = dict(saes or {})
    layers: dict[int, ConceptAblationLayer] = {}
    for index in config.layers:
        check_layer_exists(index, language.num_hidden_layers)
        if index in config.erasers:
            layers[index] = _eraser_layer(index, config.erasers[index], language.hidden_size)
            continue
        if index in config.directions:
            directions = torch.as_tensor(config.directions[index], dtype=torch.float32)
            if directions.ndim != 2 or directions.shape[-1] != language.hidden_size:
                raise ValueError(
                    f"layer {index}: directions have shape {tuple(directions.shape)}, expected "
                    f"[n, {language.hidden_size}]"
                )
            try:
                layers[index] = ConceptAblationLayer.from_directions(directions, center=_center(config, index))
            except ValueError as err:
                raise ValueError(f"layer {index}: {err}") from err
            continue
        if index not in saes and index not in config.saes:
            raise ValueError(f"layer {index}: no SAE given (config.saes has none for it and saes= has none)")
        source = config.saes[index].describe() if index in config.saes else f"the SAE given for layer {index}"
        sae = saes[index] if index in saes else load_sae(config.saes[index])
        check_sae_fits(
            sae,
            layer=index,
            num_layers=language.num_hidden_layers,
            hidden_size=language.hidden_size,
            latents=config.latents[index],
            model_name=config.base_model_name_or_path if config.check_model_name else None,
            source=source,
        )
        layers[index] = ConceptAblationLayer.from_sae(sae, config.latents[index], config.mode,
                                                      center=_center(config, index))
    return ConceptAblation(model, config, _cast_like_model(model, layers, config))


def _eraser_layer(index: int, eraser: Mapping[str, Any], hidden_size: int) -> ConceptAblationLayer:
    """The ``leace`` layer of `eraser` (its tensors, `ERASER_TENSORS`) at decoder layer `index`; an error naming the
    layer if the eraser is not one or does not fit a residual stream of `hidden_size`."""
    tensors = {name: None if t is None else torch.as_tensor(t) for name, t in eraser.items()}
    try:
        layer = ConceptAblationLayer.from_eraser(**tensors)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"layer {index}: {err}") from err
    if layer.d_model != hidden_size:
        raise ValueError(f"layer {index}: the eraser has d_model={layer.d_model}, the model's hidden size is "
                         f"{hidden_size}")
    return layer


def _center(config: ConceptAblationConfig, index: int) -> torch.Tensor | None:
    return torch.as_tensor(config.centers[index], dtype=torch.float32) if index in config.centers else None


def get_concept_ablation(model: nn.Module) -> ConceptAblation | None:
    """The `ConceptAblation` injected into `model` or any module inside it (through PEFT/DDP/FSDP wrappers)."""
    for module in model.modules():
        handle = getattr(module, _HANDLE_ATTR, None)
        if handle is not None:
            return handle
    return None
