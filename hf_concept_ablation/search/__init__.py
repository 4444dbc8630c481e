"""Finding the concept to ablate: activation cache, dashboard, automated interpretation, contrast.

- :mod:`.cache`: top-activating and quantile-sampled contexts of latents over a corpus.
- :mod:`.dashboard`: a single-file HTML page to choose latents by hand; exports a config.
- :mod:`.explain`: LLM explanations (OpenAI-compatible endpoint or local model),
  simulation and relevance scoring, embedding filter.
- :mod:`.contrast`: rank latents by how they tell two text sets apart; combine with attribution.
- :mod:`.erasure`: does an ablation erase the concept? Linear probes with the ablation off and on.

PCA directions live in :mod:`hf_concept_ablation.search.pca`, the whole search in
:mod:`hf_concept_ablation.search.pipeline`. See ``docs/finding_concepts.md``.
"""

from .cache import ActivationCache, ContextExample, build_activation_cache
from .contrast import (
    ContrastScore,
    SelectedLatent,
    cohens_d,
    combine_with_attribution,
    contrast_directions,
    contrast_latents,
    paired_d,
    save_contrast,
    strongest_contrast_latents,
)
from .dashboard import (
    config_from_selection,
    neuronpedia_url,
    render_dashboard,
    save_selection_config,
)
from .erasure import concept_decodability, describe_decodability, probe_accuracy
from .explain import (
    EmbeddingFilter,
    LatentExplanation,
    OpenAIChat,
    TransformersChat,
    explain_examples,
    explain_latents,
    relevance_score,
    simulation_score,
)

__all__ = [
    "ActivationCache",
    "ContextExample",
    "ContrastScore",
    "EmbeddingFilter",
    "LatentExplanation",
    "OpenAIChat",
    "SelectedLatent",
    "TransformersChat",
    "build_activation_cache",
    "cohens_d",
    "combine_with_attribution",
    "concept_decodability",
    "config_from_selection",
    "contrast_directions",
    "contrast_latents",
    "describe_decodability",
    "strongest_contrast_latents",
    "explain_examples",
    "explain_latents",
    "neuronpedia_url",
    "paired_d",
    "probe_accuracy",
    "relevance_score",
    "render_dashboard",
    "save_contrast",
    "save_selection_config",
    "simulation_score",
]
