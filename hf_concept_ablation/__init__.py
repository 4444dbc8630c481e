"""Concept ablation fine-tuning (CAFT) for Hugging Face models.

The package, bottom to top (each part imports only the parts below it):

- foundation: `files` (atomic writes), `resumable` (resuming work only with its settings), `checks` (setting
  checks), `loading` (models and tokenizers);
- `adapter`: the PEFT-style ablation (config, layer, model, callbacks, SAE sources) and `tasks`: the data;
- `saes`: training SAEs for a model without public ones;
- `search`: finding the concept (attribution, contrast, PCA, explanations, erasure check, selection);
- `experiments`: fine-tuning, evaluation against baselines, report, the study;
- `cli`: the ``hf-concept-ablation`` command.

Public names are imported on first use, so ``hf-concept-ablation --help`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AblationSchedule": "adapter.callbacks",
    "AblationScheduleCallback": "adapter.callbacks",
    "ConceptAblation": "adapter.model",
    "ConceptAblationConfig": "adapter.config",
    "ConceptAblationLayer": "adapter.layer",
    "SAESource": "adapter.config",
    "find_decoder_layers": "adapter.model",
    "get_concept_ablation": "adapter.model",
    "inject_concept_ablation": "adapter.model",
    "load_model": "loading",
    "load_tokenizer": "loading",
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
