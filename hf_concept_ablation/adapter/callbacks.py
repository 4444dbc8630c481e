"""`AblationScheduleCallback`: control the ablation strength during `Trainer` training.

The strength is a pure function of training progress (``state.global_step /
state.max_steps``), recomputed at every step on every rank, so it is exact after
``resume_from_checkpoint`` and identical across DDP/FSDP processes. It is written into a
tensor buffer with ``fill_``, which ``torch.compile`` does not recompile for.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import extract_model_from_parallel
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checks import check_number
from .model import ConceptAblation, get_concept_ablation

SCHEDULES = ("constant", "linear", "cosine", "step")
ADAPTER_SUBDIR = "concept_ablation"


@dataclass
class AblationSchedule:
    """Strength as a function of training progress ``p`` in [0, 1].

    Before ``start`` the strength is ``alpha_start``; after ``end`` it is ``alpha_end``;
    in between it moves from one to the other by ``kind``: ``linear``, ``cosine``
    (half-cosine), ``step`` (jumps at ``start``), or ``constant`` (always ``alpha_start``).
    The default anneals nothing: full ablation throughout.
    """

    kind: str = "constant"
    start: float = 0.0
    end: float = 1.0
    alpha_start: float = 1.0
    alpha_end: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.kind!r}")
        for name in ("start", "end", "alpha_start", "alpha_end"):
            check_number(getattr(self, name), f"schedule {name}", 0, 1)
        if self.start > self.end:
            raise ValueError(f"need start <= end, got start={self.start}, end={self.end}")

    def __call__(self, progress: float) -> float:
        if self.kind == "constant" or progress < self.start:
            return self.alpha_start
        if self.kind == "step" or progress >= self.end:
            return self.alpha_end
        t = (progress - self.start) / (self.end - self.start)
        if self.kind == "cosine":
            t = 0.5 * (1.0 - math.cos(math.pi * t))
        return self.alpha_start + (self.alpha_end - self.alpha_start) * t


class AblationScheduleCallback(TrainerCallback):
    """Set the injected ablation's strength from an `AblationSchedule` at every step.

    Also saves the ablation adapter into every checkpoint folder (``checkpoint-N/
    concept_ablation/``) so a checkpoint carries what it was trained with, and into
    ``output_dir/concept_ablation/`` before each of the Trainer's Hub uploads (``push_to_hub=True`` or
    ``trainer.push_to_hub()``), so the pushed repo carries it too; load it with
    ``ConceptAblation.from_pretrained(model, repo_id, subfolder="concept_ablation")``.
    """

    def __init__(self, schedule: AblationSchedule | None = None) -> None:
        self.schedule = schedule or AblationSchedule()

    @staticmethod
    def _ablation(model) -> ConceptAblation:
        ablation = get_concept_ablation(extract_model_from_parallel(model))
        if ablation is None:
            raise ValueError("AblationScheduleCallback: the model being trained has no concept ablation injected")
        return ablation

    def _apply(self, state: TrainerState, model) -> None:
        progress = state.global_step / state.max_steps if state.max_steps else 0.0
        self._ablation(model).set_strength(self.schedule(progress))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Set the strength for the first step (also after ``resume_from_checkpoint``)."""
        self._apply(state, kwargs["model"])

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Set the strength from the steps done so far (step k of N trains at schedule(k / N))."""
        self._apply(state, kwargs["model"])

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Save the adapter (with its current strength) into the checkpoint the Trainer just wrote."""
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / ADAPTER_SUBDIR
            if folder.parent.is_dir():
                self._ablation(kwargs["model"]).save_pretrained(os.fspath(folder))

    def on_push_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Save the adapter into ``output_dir/concept_ablation/``, which the Trainer's upload of `output_dir` takes."""
        if state.is_world_process_zero:
            self._ablation(kwargs["model"]).save_pretrained(Path(args.output_dir) / ADAPTER_SUBDIR)
