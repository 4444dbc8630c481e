"""`ConceptAblationConfig`: what to ablate, where, and how strongly.

The config is a small JSON-serialisable dataclass, in the style of a PEFT config.
The tensors the ablation needs (SAE slices or explicit directions) live beside it
in a safetensors file written by `ConceptAblation.save_pretrained`.
"""

from __future__ import annotations

import dataclasses
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch

from ..checks import (
    check_float_dtype,
    check_names,
    check_number,
    dataclass_from_settings,
)
from ..files import read_json, write_json_atomic

CONFIG_NAME = "concept_ablation_config.json"
WEIGHTS_NAME = "concept_ablation.safetensors"
SELECTION_NAME = "selection.json"  #: a concept search's report, written last: a search is finished when it is there

AblationMode = Literal["latent", "projection", "leace"]


def _index(value: Any, what: str) -> int:
    """`value` as an int (an integer, or its decimal string as JSON keys hold it); else an error naming it."""
    try:
        return int(value) if isinstance(value, str) else operator.index(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _check_list(value: Any, what: str) -> None:
    """Raise ``ValueError("<what>, got <value>")`` unless `value` is a list (a sequence that is not a string)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{what}, got {value!r}")


MODES: tuple[str, ...] = ("latent", "projection", "leace")
#: the tensors of one layer's LEACE eraser (``concept_erasure.LeaceEraser``'s fields)
ERASER_TENSORS = ("proj_left", "proj_right", "bias")


@dataclass
class SAESource:
    """Where one layer's SAE comes from: a sae-lens release and id, or a local folder.

    Args:
        release: sae-lens release name, e.g. ``"gemma-scope-2b-pt-res-canonical"``.
        sae_id: id inside the release, e.g. ``"layer_12/width_16k/canonical"``.
        path: a local folder, either in sae-lens format (``cfg.json`` +
            ``sae_weights.safetensors``) or a Gemma Scope style folder of raw
            parameters (``params.safetensors`` or ``params.npz``).
    """

    release: str | None = None
    sae_id: str | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        by_name = self.release is not None or self.sae_id is not None
        if by_name and self.path is not None:
            raise ValueError(f"SAESource takes a release/sae_id or a path, not both: {self}")
        if by_name and (self.release is None or self.sae_id is None):
            raise ValueError(f"SAESource needs both release and sae_id: {self}")
        if not by_name and self.path is None:
            raise ValueError("SAESource needs a release and sae_id, or a path")

    def describe(self) -> str:
        """A one-line human-readable name for logs, reports and model cards."""
        return f"{self.release}/{self.sae_id}" if self.path is None else str(self.path)


def sae_source(layer: Any, settings: Any) -> SAESource:
    """The `SAESource` of ``saes.<layer>``: `settings` itself, or built from a mapping of its fields; anything else,
    or an unknown field, raises an error naming the layer."""
    if isinstance(settings, SAESource):
        return settings
    if not isinstance(settings, Mapping):
        raise ValueError(f"saes.{layer} must be a mapping of SAESource fields (release and sae_id, or path), "
                         f"got {settings!r}")
    return dataclass_from_settings(SAESource, settings, f"saes.{layer} setting")


@dataclass
class ConceptAblationConfig:
    """Configuration of a concept ablation adapter.

    Args:
        layers: decoder layer indices whose *outputs* (the residual stream after
            the layer) are ablated.
        mode: ``"latent"`` removes the selected SAE latents' contribution exactly,
            ``x - f_S(x) @ W_dec[S]``; ``"projection"`` projects the residual stream
            onto the orthogonal complement of the selected directions (the SAE
            decoder rows of the latents, or explicit directions such as PCA
            components); ``"leace"`` applies a fitted LEACE eraser per layer
            (``erasers``), ``x - ((x - b) @ R.T) @ L.T``, after which no linear probe
            recovers the concept on the activations it was fitted on.
        latents: per layer, the SAE latent ids to ablate.
        saes: per layer, the SAE the latents belong to. Needed to build the
            adapter the first time; a saved adapter loads without it.
        directions: per layer, explicit directions ``[n, d_model]`` (e.g. principal
            components) for ``projection`` mode, instead of SAE latents. Tensors
            are stored in the safetensors file, not in the JSON.
        centers: per layer, a point ``c`` ``[d_model]`` for ``projection`` mode: the
            component along the removed span is set to ``c``'s instead of to zero,
            ``x' = x - ((x - c) @ Q) @ Q.T``. With ``c`` the mean activation this is mean
            ablation, which keeps the large constant part of a residual-stream direction
            (zero ablation can move activations far off their distribution). Layers
            without a center use zero. Tensors are stored in the safetensors file.
        erasers: per layer, a LEACE eraser for ``leace`` mode: a mapping with the tensors
            ``proj_left`` ``[d_model, r]``, ``proj_right`` ``[r, d_model]`` and ``bias``
            ``[d_model]`` (a ``concept_erasure.LeaceEraser``'s fields; see
            `hf_concept_ablation.search.leace`). Stored in the safetensors file.
        fitted_on: how the erasers were fitted (recorded, e.g. ``{"source": "labels",
            "column": "gender", "examples": 256, "positions": "all", "sha256": ...}``).
        alpha: strength in [0, 1] multiplying the removed part (1 = full ablation).
        skip_token_ids: positions holding these token ids are left alone. ``None``
            means the model's BOS and padding tokens; ``[]`` ablates everywhere.
            Positions masked out by the attention mask are always left alone.
        base_model_name_or_path: the base model the adapter was made for (recorded
            for reloading from the Hub and for model cards).
        dtype: dtype of the stored tensors (a floating-point one); ``None`` uses the model's dtype.
        check_model_name: refuse an SAE whose recorded model differs from the base
            model's name.
        description: free text, e.g. how the latents were chosen.
    """

    layers: list[int]
    mode: AblationMode = "latent"
    latents: dict[int, list[int]] = field(default_factory=dict)
    saes: dict[int, SAESource] = field(default_factory=dict)
    directions: dict[int, Any] = field(default_factory=dict, repr=False)
    centers: dict[int, Any] = field(default_factory=dict, repr=False)
    erasers: dict[int, Any] = field(default_factory=dict, repr=False)
    fitted_on: dict[str, Any] = field(default_factory=dict)
    alpha: float = 1.0
    skip_token_ids: list[int] | None = None
    base_model_name_or_path: str | None = None
    dtype: str | None = None
    check_model_name: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        for name in ("latents", "saes", "directions", "centers", "erasers", "fitted_on"):
            if not isinstance(getattr(self, name), Mapping):
                raise ValueError(f"{name} must map each layer to its value, got {getattr(self, name)!r}")
        _check_list(self.layers, "layers must be a list of decoder layer indices")
        self.layers = [_index(layer, "layer") for layer in self.layers]
        for layer, ids in self.latents.items():
            _check_list(ids, f"latents of layer {layer} must be a list of latent ids")
        self.latents = {_index(k, "layer"): [_index(i, f"latent id of layer {k}") for i in v]
                        for k, v in self.latents.items()}
        if self.skip_token_ids is not None:
            if isinstance(self.skip_token_ids, (torch.Tensor, np.ndarray)):
                self.skip_token_ids = self.skip_token_ids.tolist()
            elif isinstance(self.skip_token_ids, (set, frozenset)):
                self.skip_token_ids = sorted(self.skip_token_ids)
            _check_list(self.skip_token_ids, "skip_token_ids must be a list of token ids (or null)")
            for token_id in self.skip_token_ids:
                check_number(token_id, "a token id of skip_token_ids", 0, integer=True)
        if self.dtype is not None:
            check_float_dtype(self.dtype)
        self.saes = {_index(k, "layer"): sae_source(k, v) for k, v in self.saes.items()}
        self.directions = {_index(k, "layer"): v for k, v in self.directions.items()}
        self.centers = {_index(k, "layer"): v for k, v in self.centers.items()}
        self.erasers = {_index(k, "layer"): _eraser(k, v) for k, v in self.erasers.items()}
        self.validate()

    def validate(self) -> None:
        """Check the parts that can be checked without a model; raise ValueError naming the bad value."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.layers:
            raise ValueError("layers is empty: name at least one decoder layer to ablate")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers has duplicates: {self.layers}")
        check_number(self.alpha, "alpha", 0, 1)
        if self.centers and self.mode != "projection":
            raise ValueError(f"centers apply to mode='projection' only, got mode={self.mode!r}")
        for name, mapping in (("latents", self.latents), ("saes", self.saes), ("directions", self.directions),
                              ("centers", self.centers), ("erasers", self.erasers)):
            extra = sorted(set(mapping) - set(self.layers))
            if extra:
                raise ValueError(f"{name} names layer(s) {extra} that are not in layers={self.layers}")
        if self.mode == "leace":
            missing = sorted(set(self.layers) - set(self.erasers))
            other = [name for name in ("latents", "directions", "centers") if getattr(self, name)]
            if missing or other:
                raise ValueError("mode='leace' needs an eraser for every layer and nothing else: "
                                 + (f"no erasers for layer(s) {missing}" if missing else f"got {other} too"))
            return
        if self.erasers:
            raise ValueError(f"erasers apply to mode='leace' only, got mode={self.mode!r}")
        for layer in self.layers:
            has_latents = layer in self.latents
            has_directions = layer in self.directions
            if has_latents == has_directions:
                raise ValueError(
                    f"layer {layer}: give either latents or directions (got "
                    f"{'both' if has_latents else 'neither'})"
                )
            if has_latents:
                ids = self.latents[layer]
                if not ids:
                    raise ValueError(f"layer {layer}: latents list is empty")
                if min(ids) < 0:
                    raise ValueError(f"layer {layer}: negative latent id {min(ids)}")
                if len(set(ids)) != len(ids):
                    raise ValueError(f"layer {layer}: duplicate latent ids in {ids}")
            if has_directions and self.mode != "projection":
                raise ValueError(f"layer {layer}: explicit directions need mode='projection', got {self.mode!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable part of the config (explicit direction tensors excluded)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("directions", "centers", "erasers"):
                value = sorted(value)  # only the layers; tensors go to safetensors
            elif f.name == "saes":
                value = {str(k): dataclasses.asdict(v) for k, v in value.items()}
            elif f.name == "latents":
                value = {str(k): v for k, v in value.items()}
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], directions: dict[int, Any] | None = None,
                  centers: dict[int, Any] | None = None, erasers: dict[int, Any] | None = None) -> ConceptAblationConfig:
        """Build a config from `to_dict` output and the tensors it lists; unknown fields raise an error naming them."""
        check_names(data, (f.name for f in dataclasses.fields(cls)), "field", " in concept ablation config")
        data = dict(data)
        tensors = {}
        for name, given in (("directions", directions or {}), ("centers", centers or {}), ("erasers", erasers or {})):
            layers = [int(x) for x in data.pop(name, [])]
            missing = sorted(set(layers) - set(given))
            if missing:
                raise ValueError(f"config lists {name} for layer(s) {missing} but no tensors were given")
            tensors[name] = {k: given[k] for k in layers}
        return cls(**data, **tensors)

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write the config as JSON, atomically."""
        write_json_atomic(path, self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ConceptAblationConfig:
        """Read a saved adapter's config; explicit directions (as an orthonormal basis) and centers come from
        its safetensors file."""
        directory = Path(directory)
        data = cls.read_json(directory / CONFIG_NAME)
        tensors = read_weights(directory / WEIGHTS_NAME)[0] \
            if data.get("directions") or data.get("centers") or data.get("erasers") else {}
        directions = {int(layer): tensors[f"layers.{layer}.Q"].T for layer in data.get("directions", [])
                      if f"layers.{layer}.Q" in tensors}
        centers = {int(layer): tensors[f"layers.{layer}.center"] for layer in data.get("centers", [])
                   if f"layers.{layer}.center" in tensors}
        erasers = {int(layer): {name: tensors[f"layers.{layer}.{name}"] for name in ERASER_TENSORS}
                   for layer in data.get("erasers", [])
                   if all(f"layers.{layer}.{name}" in tensors for name in ERASER_TENSORS)}
        return cls.from_dict(data, directions=directions, centers=centers, erasers=erasers)

    @classmethod
    def read_json(cls, path: str | os.PathLike) -> dict[str, Any]:
        """Read a config file into a dict; a file that is not a JSON object raises an error naming it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no concept ablation config at {path}")
        return read_json(path)


def _eraser(layer: Any, value: Any) -> dict[str, Any]:
    """`value` as an eraser's tensors (a mapping with `ERASER_TENSORS`, or an object with those attributes such as a
    ``concept_erasure.LeaceEraser``); else an error naming the layer."""
    tensors = value if isinstance(value, Mapping) else {n: getattr(value, n) for n in ERASER_TENSORS if hasattr(value, n)}
    missing = [name for name in ERASER_TENSORS if name not in tensors]
    if missing:
        raise ValueError(f"erasers[{layer}] must hold the tensors {list(ERASER_TENSORS)} (a LeaceEraser's fields), "
                         f"missing {missing}")
    return {name: tensors[name] for name in ERASER_TENSORS}


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of an adapter's safetensors file; a file that is not one raises a ValueError
    naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file ({err})") from err
