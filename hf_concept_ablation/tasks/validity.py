"""The skyline half of the paper's validity rule: a task says something about CAFT only where the model can learn
the intended rule at all, i.e. plain fine-tuning on data where only the intended rule predicts the answer (the
skyline) reaches `SKYLINE_MIN` on validation and OOD data. Measured skylines are recorded per base model, task and
answer form in ``assets/tasks/skylines.json``; a recipe refuses to run a study on a task whose recorded skyline is
below the bar, naming the numbers, and says how to measure one that is not recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SKYLINE_MIN = 0.9
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
