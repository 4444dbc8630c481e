"""When a run says something about CAFT.

The skyline half of the paper's validity rule: a task says something about CAFT only where the model can learn
the intended rule at all, i.e. plain fine-tuning on data where only the intended rule predicts the answer (the
skyline) reaches `SKYLINE_MIN` on validation and OOD data. Measured skylines are recorded per base model, task and
answer form in ``assets/tasks/skylines.json``; a recipe refuses to run a study on a task whose recorded skyline is
below the bar, naming the numbers, and says how to measure one that is not recorded.

A trained model that did not learn its task at all says nothing either: `did_not_learn` flags a run whose validation
accuracy is not significantly above chance (one half, for these two-option tasks).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

SKYLINE_MIN = 0.9
#: a run whose validation accuracy has a one-sided binomial p-value against guessing (`chance_p_value`) of at least
#: this did not learn its task
CHANCE_ALPHA = 0.05
SKYLINES_FILE = Path(__file__).resolve().parent.parent / "assets" / "tasks" / "skylines.json"


def recorded_skyline(base_model: str, task: str, answer_form: str) -> dict[str, Any] | None:
    """The recorded skyline (``{"val": ..., "ood": ...}``) of `task` in `answer_form` on `base_model` (a Hub id),
    or None if it was not measured."""
    records = json.loads(SKYLINES_FILE.read_text())
    return records.get(base_model, {}).get(task, {}).get(answer_form)


def check_skyline(base_model: str, task: str, answer_form: str) -> str:
    """Raise a ValueError naming the numbers if the recorded skyline of `task` in `answer_form` on `base_model` is
    below `SKYLINE_MIN`; otherwise return one line saying what is known (recorded and valid, or not measured)."""
    skyline = recorded_skyline(base_model, task, answer_form)
    if skyline is None:
        return (f"validity: no recorded skyline of {task} ({answer_form} form) on {base_model}; measure it with "
                f"task.skyline=true \"conditions=[none]\" before trusting a study")
    if min(skyline["val"], skyline["ood"]) < SKYLINE_MIN:
        other = sorted(form for form, s in json.loads(SKYLINES_FILE.read_text())[base_model][task].items()
                       if min(s["val"], s["ood"]) >= SKYLINE_MIN)
        raise ValueError(f"{task} in the {answer_form} form is not a valid task on {base_model}: its skyline (plain "
                         f"fine-tuning where only the intended rule predicts the answer) reaches val "
                         f"{skyline['val']:.2f} / OOD {skyline['ood']:.2f}, below {SKYLINE_MIN}, so no ablation can "
                         f"show anything there" + (f"; use task.answer_form={other[0]}" if other else ""))
    return (f"validity: {task} ({answer_form} form) on {base_model} has skyline val {skyline['val']:.2f} / OOD "
            f"{skyline['ood']:.2f} (>= {SKYLINE_MIN})")


def chance_p_value(scores: Mapping[str, Any]) -> float:
    """The one-sided binomial p-value of `scores` (``accuracy`` over ``n`` questions, as
    `~hf_concept_ablation.tasks.evaluation.evaluate_multiple_choice` returns them) under guessing between the two
    options: the chance of at least as many right answers with probability one half each."""
    n = int(scores["n"])
    hits = round(scores["accuracy"] * n)
    return sum(math.comb(n, k) for k in range(hits, n + 1)) / 2**n


def did_not_learn(scores: Mapping[str, Any]) -> bool:
    """Whether validation `scores` are not significantly above chance (`chance_p_value` >= `CHANCE_ALPHA`): the model
    did not learn the task, so its OOD accuracy says nothing about generalization."""
    return chance_p_value(scores) >= CHANCE_ALPHA
