"""`LeaceRefitCallback`: fit the injected LEACE erasers again, on the model being trained, every N steps.

Erasers fitted on the base model erase the concept from the base model's activations; fine-tuning moves the
activations, and the model may come to carry the concept where the erasers no longer look. Every `every_steps`
optimizer steps this callback fits the erasers again with the same texts and labels on the current weights (the
ablation off while fitting, as the first fit had it) and writes them into the injected ablation in place, so the
optimizer, a compiled graph and DDP keep working. Every process fits on all the texts (a sharded model needs every
process in each forward pass); the main process's erasers are then broadcast, so all processes train with the same.
The adapter's ``fitted_on`` records ``refit_every`` and the steps refitted at. After
``resume_from_checkpoint`` the erasers the checkpoint was saved with (``checkpoint-N/concept_ablation``, written by
`AblationScheduleCallback`) are loaded, so a resumed run trains as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..adapter.callbacks import ADAPTER_SUBDIR
from ..adapter.config import ERASER_TENSORS, ConceptAblationConfig
from ..adapter.model import ConceptAblation, get_concept_ablation
from .activations import as_text_list
from .leace import POSITIONS, fit_leace_erasers, one_hot_labels, removes_something


class LeaceRefitCallback(TrainerCallback):
    """Refit the injected ``leace`` ablation's erasers on the model being trained every `every_steps` steps.

    Args:
        tokenizer: the model's tokenizer.
        texts: the fitting texts (e.g. the training prompts), labeled by `labels` (the unintended attribute).
        labels: one label per text, at least two values.
        every_steps: refit after every this many optimizer steps (not after the last one).
        sequential: fit layer after layer, each with the erasers before it on (see `fit_leace_erasers`).
        positions: ``all`` counted positions of each text or only the ``last``.
        batch_size: texts per forward pass while fitting.
        progress: show a progress bar while fitting.
    """

    def __init__(self, tokenizer: Any, texts: Sequence[str], labels: Sequence[Any], every_steps: int, *,
                 sequential: bool = False, positions: str = "all", batch_size: int = 16,
                 progress: bool = False) -> None:
        if isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 1:
            raise ValueError(f"every_steps must be a positive whole number of steps, got {every_steps!r}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.texts = as_text_list(texts)
        if len(labels) != len(self.texts):
            raise ValueError(f"got {len(labels)} labels for {len(self.texts)} texts")
        self.z, _ = one_hot_labels(labels)
        self.tokenizer = tokenizer
        self.every_steps = every_steps
        self.options = {"sequential": sequential, "positions": positions, "batch_size": batch_size,
                        "progress": progress}

    @staticmethod
    def _ablation(model: torch.nn.Module) -> ConceptAblation:
        ablation = get_concept_ablation(model)
        if ablation is None or any(module.kind != "leace" for module in ablation.layers.values()):
            raise ValueError("LeaceRefitCallback: the model being trained needs an injected concept ablation of "
                             "mode='leace' (erasers at every ablated layer)")
        return ablation

    def refit(self, model: torch.nn.Module, step: int) -> None:
        """Fit the erasers on `model` as it is now and put them in place of the injected ones (layers where the
        labels no longer covary with the activations keep their eraser)."""
        model = extract_model_from_parallel(model)
        ablation = self._ablation(model)
        erasers = fit_leace_erasers(model, self.tokenizer, self.texts, self.z, sorted(ablation.layers),
                                    **self.options)
        ablation.set_erasers({layer: eraser for layer, eraser in erasers.items() if removes_something(eraser)})
        _broadcast_from_main(ablation)
        fitted_on = ablation.config.fitted_on
        fitted_on["refit_every"] = self.every_steps
        fitted_on["refit_steps"] = [*fitted_on.get("refit_steps", []), step]

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        """Check the model; on resuming, load the erasers the checkpoint was saved with."""
        ablation = self._ablation(extract_model_from_parallel(kwargs["model"]))
        saved = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / ADAPTER_SUBDIR
        if state.global_step > 0 and saved.is_dir():
            config = ConceptAblationConfig.from_pretrained(saved)
            ablation.set_erasers(config.erasers)
            ablation.config.fitted_on = dict(config.fitted_on)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """Refit after every `every_steps` steps, except after the last."""
        if state.global_step % self.every_steps == 0 and state.global_step < state.max_steps:
            self.refit(kwargs["model"], state.global_step)


def _broadcast_from_main(ablation: ConceptAblation) -> None:
    """Make every process's erasers the main process's (they fit on the same data, but need not round alike)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    for index, module in sorted(ablation.layers.items()):
        for name in ERASER_TENSORS:
            torch.distributed.broadcast(getattr(module, name), src=0)
        ablation.config.erasers[index] = {name: getattr(module, name).detach().cpu().clone()
                                          for name in ERASER_TENSORS}
