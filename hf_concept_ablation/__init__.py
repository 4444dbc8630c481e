"""Concept ablation fine-tuning (CAFT) for Hugging Face models."""

from .config import ConceptAblationConfig, SAESource
from .layer import ConceptAblationLayer
from .model import ConceptAblation, find_decoder_layers, get_concept_ablation, inject_concept_ablation

__all__ = [
    "ConceptAblation",
    "ConceptAblationConfig",
    "ConceptAblationLayer",
    "SAESource",
    "find_decoder_layers",
    "get_concept_ablation",
    "inject_concept_ablation",
]
__version__ = "0.1.0"
