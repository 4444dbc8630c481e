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
import torch.distributed as dist
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


def process_share(count: int, distributed: bool) -> tuple[list[int], int]:
    """The indices of `count` items this process scores, and how many processes share them: with `distributed` and
    an initialized default process group, one contiguous block per rank, every block padded to the same length with a
    repeat of an index (so every process runs as many batches, as a sharded model needs); else every index and 1."""
    if not (distributed and dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(range(count)), 1
    world, rank = dist.get_world_size(), dist.get_rank()
    per = -(-count // world)
    share = list(range(rank * per, min((rank + 1) * per, count)))
    return share + [share[-1] if share else 0] * (per - len(share)), world


def gather_rows(rows: dict[int, Any], processes: int) -> dict[int, Any]:
    """Every process's `rows` (index -> result) merged, when `processes` > 1 (every process of the default group must
    call it); a padding repeat of an index collapses into one entry."""
    if processes == 1:
        return rows
    shares: list[dict[int, Any] | None] = [None] * processes
    dist.all_gather_object(shares, rows)
    return {index: row for share in shares for index, row in share.items()}


@torch.no_grad()
def evaluate_multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: datasets.Dataset,
    *,
    batch_size: int = 32,
    ablation: bool | None = None,
    desc: str = "evaluating",
    distributed: bool = False,
) -> dict[str, float]:
    """Accuracy, pair accuracy and mean logit difference (answer - distractor) on `dataset`.

    `ablation`: ``None`` leaves an injected ablation as it is, ``False`` disables it for
    the evaluation (deployment), ``True`` requires it to be present and enabled.
    `distributed`: every process of the default process group calls this alike; each scores its share of the
    questions (`process_share`) and the per-question results are gathered, so every process returns what one
    process scoring all of them would (to float rounding of the logit difference). Needed for a sharded (FSDP)
    model, whose forward passes every process takes part in.
    """
    if len(dataset) == 0:
        raise ValueError(f"{desc}: the dataset is empty, there is nothing to evaluate")
    handle = get_concept_ablation(model)
    if ablation and handle is None:
        raise ValueError("evaluation with ablation=True, but the model has no concept ablation injected")
    answers = first_token_ids(tokenizer, dataset["answer"])
    distractors = first_token_ids(tokenizer, dataset["distractor"])
    share, processes = process_share(len(dataset), distributed)
    prompts = dataset["prompt"]
    rows: dict[int, tuple[int, int, float]] = {}  # index -> (prediction, pair correct, logit difference)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    context = contextlib.nullcontext() if handle is None or ablation is None else handle.enabled_as(ablation)
    try:
        with context:
            for start in tqdm(range(0, len(share), batch_size), desc=desc, leave=False,
                              disable=processes > 1 and dist.get_rank() > 0):  # one bar for the group
                indices = share[start : start + batch_size]
                batch = encode_prompts(tokenizer, [prompts[i] for i in indices], device)
                logits = model(**batch, logits_to_keep=1).logits[:, -1].float()
                gap = answer_gap(logits, answers[indices].to(device), distractors[indices].to(device))
                rows.update(zip(indices, zip(logits.argmax(-1).tolist(), (gap > 0).long().tolist(), gap.tolist())))
    finally:
        model.train(was_training)
    rows = gather_rows(rows, processes)
    predictions, pair_correct, gaps = zip(*(rows[i] for i in range(len(dataset))))
    metric = MultipleChoiceAccuracy(keep_in_memory=True)
    result = metric.compute(predictions=list(predictions), references=answers.tolist(), pair_correct=list(pair_correct))
    result["logit_diff"] = float(torch.tensor(gaps).mean())
    result["n"] = len(dataset)
    return result
