"""The demo (``make demo`` = ``hf-concept-ablation demo``): CAFT that steers generalization, on the embedded Gemma 3
270M at a size that runs on two CPU cores in about a quarter of an hour. The gender-bias task (words form, the form
the model can learn): fine-tuning data where the grammatical pronoun and the profession's stereotyped gender always
agree, and OOD data where they disagree.

1. plain fine-tuning: the model learns the stereotype;
2. fine-tuning through LEACE erasers of the stereotyped gender at every decoder layer (fitted on the training
   prompts, removed again for evaluation): the model learns the grammar;
3. the control: a random eraser of the same rank, so the effect is told from "any erasure".

Then a results JSON, a figure, a model card of the LEACE runs and a one-screen summary. Finished runs are kept, so
a second run only redoes what is missing. The recipe behind it: ``hf-concept-ablation train gender_bias --config
gender_bias_quick``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

QUICK_CONFIG = "gender_bias_quick"  #: the packaged recipe config the demo trains with
#: the demo's stages: condition, what it is
STAGES = (("none", "plain fine-tuning"),
          ("leace", "fine-tuning through LEACE erasers of the stereotyped gender at every decoder layer"),
          ("random_eraser", "the control: fine-tuning through a random eraser of the same rank"))
SHORT_NAMES = {"none": "plain", "leace": "LEACE", "random_eraser": "random eraser"}
METHOD = ("LEACE concept erasure (concept_erasure.LeaceFitter) of the profession group's stereotyped gender, fitted "
          "on the base model's residual stream over the training prompts, at every decoder layer, during "
          "fine-tuning only")


def run_demo(out: str | Path, model: str = "embedded", command: str | None = None) -> dict[str, Any]:
    """Run the demo's stages into `out` (`model`: the embedded default, a Hub id or a local folder; no SAE is needed)
    and print its summary; return the recipe's results. `command`: how the demo was started, for the results."""
    from .recipes import run_recipe

    results: dict[str, Any] = {}
    for number, (condition, what) in enumerate(STAGES, start=1):
        print(f"== {number}/{len(STAGES)} {what}", flush=True)
        results = run_recipe("gender_bias", QUICK_CONFIG, [f"output_dir={out}", f"model={model}",
                                                           f"conditions=[{condition}]"], command=command)
    print(summary(results["summary"], Path(out)))
    return results


def summary(by_condition: dict[str, Any], out: Path) -> str:
    """The demo's closing lines: the method, and each stage's validation and OOD accuracy (eraser removed)."""
    lines = ["", f"method: {METHOD}",
             "accuracy with the eraser removed at test (OOD: only the grammatical rule answers right):"]
    for condition, label in SHORT_NAMES.items():
        if condition in by_condition:
            entry = by_condition[condition]
            lines.append(f"  {label:<13}  val {entry['val_mean']:.2f}  OOD {entry['ood_mean']:.2f}")
    card = out / "model_card_leace.md"
    lines.append(f"results: {out / 'gender_bias.json'}  figure: {out / 'gender_bias.png'}"
                 + (f"  model card: {card}" if card.is_file() else ""))
    return "\n".join(lines)


def default_output_dir(model: str) -> Path:
    """The demo's output folder for `model`: each model its own, since a results folder refuses another model's runs."""
    return Path("outputs/demo") if model == "embedded" else Path(f"outputs/demo-{Path(model).name}")
