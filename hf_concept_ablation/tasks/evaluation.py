"""Evaluate a model on a multiple-choice dataset (``prompt``, ``answer``, ``distractor`` columns).

Accuracy is computed through `evaluate` with `MultipleChoiceAccuracy`:
``accuracy`` is the paper's (argmax over the full vocabulary equals the answer token),
``pair_accuracy`` is restricted to the two options (answer logit above distractor logit).
"""

from __future__ import annotations

import contextlib
from typing import Any

import datasets
import evaluate
import torch
from tqdm.auto import tqdm

from ..adapter.model import get_concept_ablation
from .mc import check_single_token


class MultipleChoiceAccuracy(evaluate.Metric):
    """Accuracy over the full vocabulary and restricted to the two options."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.__doc__,
            citation="",
            inputs_description=(
                "predictions: argmax token id over the vocabulary; references: answer token id; "
                "pair_correct: 1 if the answer's logit exceeds the distractor's"
            ),
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "pair_correct": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, pair_correct) -> dict[str, float]:
        n = len(references)
        if n == 0:
            raise ValueError("cannot compute accuracy on an empty dataset")
        hits = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": hits / n, "pair_accuracy": sum(pair_correct) / n}


def first_token_ids(tokenizer: Any, strings: list[str]) -> torch.Tensor:
    """Token id of each answer string, which must be exactly one token (checked, naming any that is not)."""
    unique = sorted(set(strings))
    check_single_token(tokenizer, unique)
    ids = {s: tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in unique}
    return torch.tensor([ids[s] for s in strings], dtype=torch.long)


def answer_gap(logits: torch.Tensor, answers: torch.Tensor, distractors: torch.Tensor) -> torch.Tensor:
    """``[batch]`` logit of each answer minus that of its distractor, from last-position logits ``[batch, vocab]``."""
    return (logits.gather(1, answers[:, None]) - logits.gather(1, distractors[:, None]))[:, 0]


def encode_prompts(tokenizer: Any, prompts: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-padded batch encoding, so the last position is every prompt's last token; ``position_ids`` count from
    each prompt's first real token, so models with absolute positions (GPT-2) see a prompt the same in any batch."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate_multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: datasets.Dataset,
    *,
    batch_size: int = 32,
    ablation: bool | None = None,
    desc: str = "evaluating",
) -> dict[str, float]:
    """Accuracy, pair accuracy and mean logit difference (answer - distractor) on `dataset`.

    `ablation`: ``None`` leaves an injected ablation as it is, ``False`` disables it for
    the evaluation (deployment), ``True`` requires it to be present and enabled.
    """
    if len(dataset) == 0:
        raise ValueError(f"{desc}: the dataset is empty, there is nothing to evaluate")
    handle = get_concept_ablation(model)
    if ablation and handle is None:
        raise ValueError("evaluation with ablation=True, but the model has no concept ablation injected")
    answers = first_token_ids(tokenizer, dataset["answer"])
    distractors = first_token_ids(tokenizer, dataset["distractor"])
    metric = MultipleChoiceAccuracy(keep_in_memory=True)
    gaps = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    context = contextlib.nullcontext() if handle is None or ablation is None else handle.enabled_as(ablation)
    try:
        with context:
            for start in tqdm(range(0, len(dataset), batch_size), desc=desc, leave=False):
                prompts = dataset["prompt"][start : start + batch_size]
                batch = encode_prompts(tokenizer, prompts, device)
                logits = model(**batch, logits_to_keep=1).logits[:, -1].float()
                a = answers[start : start + batch_size].to(device)
                d = distractors[start : start + batch_size].to(device)
                gap = answer_gap(logits, a, d)
                metric.add_batch(predictions=logits.argmax(-1).tolist(), references=a.tolist(), pair_correct=(gap > 0).long().tolist())
                gaps.append(gap.cpu())
    finally:
        model.train(was_training)
    result = metric.compute()
    result["logit_diff"] = float(torch.cat(gaps).mean())
    result["n"] = len(dataset)
    return result
