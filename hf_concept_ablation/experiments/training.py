"""Fine-tuning on multiple-choice data with the stock `Trainer`.

The loss is the cross-entropy of the last position's logits against the answer token
(``' A'`` / ``' B'``, or the option word itself), as in the CAFT paper. Presets hold the
paper's hyper-parameters and a preset tuned for the embedded Gemma 3 270M on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import datasets
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import DistributedType, parse_flag_from_env
from torch import nn
from torch.distributed.fsdp import fully_shard
from transformers import SchedulerType, Trainer, TrainerCallback, TrainingArguments

from ..checks import check_names, check_number
from ..tasks.evaluation import encode_prompts, first_token_ids


@dataclass
class TrainingPreset:
    """Hyper-parameters of one fine-tuning run.

    Args:
        learning_rate: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        adam_beta1, adam_beta2: AdamW betas.
        lr_scheduler_type: transformers scheduler name.
        warmup_ratio: share of steps for the linear warm-up.
        batch_size: examples per optimizer step (over all processes).
        epochs: passes over the training set.
        max_grad_norm: gradient clipping.
        freeze_embeddings: keep the (tied) embedding matrix fixed; a large share of a
            small Gemma's parameters, so freezing it makes CPU steps much cheaper.
        lora_rank: if > 0, train a PEFT LoRA of this rank instead of all weights.
    """

    learning_rate: float = 5e-6
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.5
    batch_size: int = 16
    epochs: float = 5.0
    max_grad_norm: float = 1.0
    freeze_embeddings: bool = False
    lora_rank: int = 0

    def __post_init__(self) -> None:
        def number(name: str, low: float, high: float = math.inf, **options: bool) -> None:
            check_number(getattr(self, name), f"training setting {name}", low, high, **options)

        number("learning_rate", 0, low_open=True)
        number("weight_decay", 0)
        number("adam_beta1", 0, 1, high_open=True)
        number("adam_beta2", 0, 1, high_open=True)
        number("warmup_ratio", 0, 1, high_open=True)
        number("batch_size", 1, integer=True)
        number("epochs", 0, low_open=True)
        number("max_grad_norm", 0, low_open=True)
        number("lora_rank", 0, integer=True)
        schedulers = [scheduler.value for scheduler in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise ValueError(f"training setting lr_scheduler_type must be one of {schedulers}, "
                             f"got {self.lr_scheduler_type!r}")
        if not isinstance(self.freeze_embeddings, bool):
            raise ValueError(f"training setting freeze_embeddings must be true or false, got {self.freeze_embeddings!r}")

    def replace(self, **overrides: Any) -> TrainingPreset:
        """A copy with some fields changed; unknown names raise an error naming them."""
        check_names(overrides, (f.name for f in dataclasses.fields(self)), "training setting")
        return dataclasses.replace(self, **overrides)


#: The preset of an experiment that names none.
DEFAULT_PRESET = "gemma3-270m"
PRESETS: dict[str, TrainingPreset] = {
    # The paper's full fine-tuning setting (Gemma 2 2B, GPU).
    "paper": TrainingPreset(),
    # Tuned for the embedded Gemma 3 270M on CPU: higher lr, frozen embeddings.
    "gemma3-270m": TrainingPreset(learning_rate=2e-5, warmup_ratio=0.1, epochs=4.0, freeze_embeddings=True),
}


class LastTokenCollator:
    """Tokenize prompts (left-padded) and attach the answer token id as the label."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = encode_prompts(self.tokenizer, [row["prompt"] for row in rows])
        batch["labels"] = first_token_ids(self.tokenizer, [row["answer"] for row in rows])
        return batch


class LastTokenTrainer(Trainer):
    """A `Trainer` whose loss is cross-entropy of the last position's logits against the answer token.

    The loss is the mean over the local batch; the Trainer divides by gradient
    accumulation steps and DDP averages over processes, which gives the global mean.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Our labels are one token per row, not a shifted sequence: keep the Trainer
        # from counting "items" the causal-LM way and rescaling the loss by them.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Cross-entropy of the answer token at the last position (the paper's loss)."""
        labels = inputs.pop("labels")
        outputs = model(**inputs, logits_to_keep=1)
        loss = nn.functional.cross_entropy(outputs.logits[:, -1].float(), labels)
        return (loss, outputs) if return_outputs else loss


def process_state() -> PartialState:
    """The run's `accelerate` process state, set up as the Trainer sets up its own: without an accelerator, processes
    started together (``accelerate launch --multi_gpu --num_processes 2`` on a CPU-only machine, or ``torchrun``)
    form one gloo group instead of each running alone."""
    return PartialState(cpu=not torch.accelerator.is_available())


def fsdp_launch() -> bool:
    """Whether the run was launched with FSDP (``accelerate launch --use_fsdp``). Only FSDP2 (``--fsdp_version 2``)
    is accepted: FSDP1 wraps the model in a module that flattens its parameters, which the recipes' evaluation and
    saving of the trained model cannot read."""
    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(f"FSDP version {version} (FSDP_VERSION={version}): the recipes run FSDP2 only; launch with "
                         "`accelerate launch --use_fsdp --fsdp_version 2` (or fsdp_version: 2 in the accelerate config)")
    return True


def shards_itself(state: PartialState) -> bool:
    """Whether `fine_tune` shards the model itself (`shard_model`): an FSDP launch (`fsdp_launch`) of CPU processes,
    to which accelerate applies no FSDP (it does on accelerators only)."""
    return state.distributed_type == DistributedType.MULTI_CPU and fsdp_launch()


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 over the default process group as accelerate's FSDP2 plugin applies it by default: ``fully_shard`` on
    every block the model names in ``_no_split_modules`` (its decoder layers), then on the whole model (in place).
    The model is marked as sharded already, so the `Trainer` neither wraps it in DDP nor shards it again."""
    if not hasattr(transformers.PreTrainedModel, "is_distributed_loading_by_transformers"):
        raise RuntimeError(f"transformers {transformers.__version__}: its Trainer cannot train a model sharded before "
                           "it, as FSDP on CPU processes needs; upgrade transformers, or launch on accelerators")
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no _no_split_modules (its decoder layer class), which FSDP "
                         "shards one by one")
    for module in [m for m in model.modules() if type(m).__name__ in blocks]:
        fully_shard(module)
    fully_shard(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's transformers model
    base._is_distributed_loading_by_transformers = True  # the Trainer's mark of a model that shards itself
    return model


def training_arguments(preset: TrainingPreset, output_dir: str, seed: int, num_processes: int = 1,
                       **overrides: Any) -> TrainingArguments:
    """`TrainingArguments` for a preset; the per-device batch is the preset's batch split over processes."""
    if preset.batch_size % num_processes:
        raise ValueError(f"batch_size {preset.batch_size} is not divisible by {num_processes} processes")
    settings = dict(
        output_dir=output_dir,
        seed=seed,
        data_seed=seed,
        learning_rate=preset.learning_rate,
        weight_decay=preset.weight_decay,
        adam_beta1=preset.adam_beta1,
        adam_beta2=preset.adam_beta2,
        lr_scheduler_type=preset.lr_scheduler_type,
        warmup_steps=preset.warmup_ratio,
        per_device_train_batch_size=preset.batch_size // num_processes,
        num_train_epochs=preset.epochs,
        max_grad_norm=preset.max_grad_norm,
        optim="adamw_torch",
        remove_unused_columns=False,
        report_to="none",
        logging_steps=5,
        save_strategy="no",
        disable_tqdm=False,
        use_cpu=not torch.accelerator.is_available(),  # so that CPU processes launched together train as one (DDP)
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def prepare_model_for_training(model: nn.Module, preset: TrainingPreset) -> nn.Module:
    """Apply the preset's freezing and LoRA choices; returns the model to train (a PeftModel for LoRA)."""
    if preset.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if preset.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=preset.lora_rank, lora_alpha=2 * preset.lora_rank, target_modules="all-linear")
        model = get_peft_model(model, lora)
    return model


def fine_tune(
    model: nn.Module,
    tokenizer: Any,
    train_dataset: datasets.Dataset,
    args: TrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
    resume_from_checkpoint: str | bool | None = None,
) -> LastTokenTrainer:
    """Fine-tune `model` on `train_dataset` (``prompt``/``answer`` columns) and return the trainer. Under FSDP2 the
    model is sharded in place (by accelerate, or by `shard_model` on CPU processes) and stays so."""
    if len(train_dataset) == 0:
        raise ValueError("the training set is empty")
    first_token_ids(tokenizer, sorted(set(train_dataset["answer"])))  # fail early on multi-token answers
    if shards_itself(process_state()):
        shard_model(model)
    trainer = LastTokenTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=LastTokenCollator(tokenizer),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer
