"""Finding the concept to ablate: activation cache, dashboard, automated interpretation, contrast.

- :mod:`.cache`: top-activating and quantile-sampled contexts of latents over a corpus.
- :mod:`.dashboard`: a single-file HTML page to choose latents by hand; exports a config.
- :mod:`.explain`: LLM explanations (OpenAI-compatible endpoint or local model),
  simulation and relevance scoring, embedding filter.
- :mod:`.contrast`: rank latents by how they tell two text sets apart; combine with attribution.
- :mod:`.erasure`: does an ablation erase the concept? Linear probes with the ablation off and on.

PCA directions live in :mod:`hf_concept_ablation.search.pca`, the whole search in
:mod:`hf_concept_ablation.search.pipeline`, its settings in :mod:`hf_concept_ablation.search.config`. See
``docs/finding_concepts.md``. Names are imported on first use (the command line reads the settings without torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ActivationCache": "cache",
    "ContextExample": "cache",
    "ContrastScore": "contrast",
    "DirectionSelection": "config",
    "EmbeddingFilter": "explain",
    "LatentExplanation": "explain",
    "LatentSelection": "config",
    "OpenAIChat": "explain",
    "SelectedLatent": "contrast",
    "TransformersChat": "explain",
    "build_activation_cache": "cache",
    "cohens_d": "contrast",
    "combine_with_attribution": "contrast",
    "concept_decodability": "erasure",
    "config_from_selection": "dashboard",
    "contrast_directions": "contrast",
    "contrast_latents": "contrast",
    "describe_decodability": "erasure",
    "explain_examples": "explain",
    "explain_latents": "explain",
    "neuronpedia_url": "dashboard",
    "paired_d": "contrast",
    "probe_accuracy": "erasure",
    "relevance_score": "explain",
    "render_dashboard": "dashboard",
    "save_contrast": "contrast",
    "save_selection_config": "dashboard",
    "simulation_score": "explain",
    "strongest_contrast_latents": "contrast",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
