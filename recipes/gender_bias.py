"""CAFT on the gender-bias task: learn pronoun grammar, not the profession's stereotyped gender.

Run: ``accelerate launch recipes/gender_bias.py [--config recipes/configs/gender_bias.yaml] [key=value ...]``
(or plain ``python``). Writes ``<output_dir>/gender_bias.json`` and ``gender_bias.png``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from hf_concept_ablation.experiments.recipe_settings import (
    check_task_settings,
    parse_recipe_args,
)
from hf_concept_ablation.experiments.report import markdown_table, report_recipe_run
from hf_concept_ablation.experiments.runner import ExperimentConfig, run_experiment
from hf_concept_ablation.experiments.training import process_state
from hf_concept_ablation.tasks import build_gender_concept_texts, build_gender_datasets

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "gender_bias.yaml"


def main(argv: list[str] | None = None, command: str | None = None) -> dict:
    """Run the recipe with `argv` (the process's arguments where None); `command`: how it was started, for the
    model card (default: this script with `argv`)."""
    task, experiment = parse_recipe_args(__doc__, DEFAULT_CONFIG, argv)
    check_task_settings(task, "gender_bias", list(inspect.signature(build_gender_datasets).parameters))
    config = ExperimentConfig.from_dict(experiment)
    data = build_gender_datasets(**task)
    results = run_experiment(config, data, name="gender_bias", concept_texts=build_gender_concept_texts()._asdict())
    if process_state().is_main_process:
        figure = report_recipe_run(results, config, script=__file__, argv=argv, command=command, plot_title="Gender bias",
                                   card_title="Gemma fine-tuned with CAFT on gender-bias data",
                                   task="choose the grammatical pronoun (subject vs object case), not the "
                                        "profession's stereotyped gender")
        print(markdown_table(results["summary"]))
        print(f"results: {Path(config.output_dir) / 'gender_bias.json'}\nfigure: {figure}")
    return results


if __name__ == "__main__":
    main()
