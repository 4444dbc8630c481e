"""The adapter: what to ablate (config), the ablation modules (layer), injecting, saving and loading them (model),
the SAE sources they slice, the residual-stream reader, and the training callback that anneals them.

The bottom of the package: it imports only the package's foundation (`files`, `checks`, `loading`).
"""

from .callbacks import AblationSchedule, AblationScheduleCallback
from .config import ConceptAblationConfig, SAESource
from .layer import ConceptAblationLayer
from .model import (
    ConceptAblation,
    find_decoder_layers,
    get_concept_ablation,
    inject_concept_ablation,
)

__all__ = [
    "AblationSchedule",
    "AblationScheduleCallback",
    "ConceptAblation",
    "ConceptAblationConfig",
    "ConceptAblationLayer",
    "SAESource",
    "find_decoder_layers",
    "get_concept_ablation",
    "inject_concept_ablation",
]
