"""CAFT on double multiple choice: answer the intended question, ignore the other one.

Run: ``accelerate launch recipes/double_mc.py [--config recipes/configs/double_mc.yaml] [key=value ...]``.

Task settings (``task:`` section):
  mode: ``pairs`` (train the experiment's conditions on each combination) or ``skyline``
      (plain fine-tuning on each source set alone, the paper's Table 1; its ``ood`` entry
      holds the held-out test questions).
  combinations: list of keys like ``verbs|sentiment|sentiment`` or ``all`` (the 24).
  sources: source sets for ``skyline`` mode (a list, or one name).
  adapters_dir: folder with one sub-folder per combination (key with ``|`` -> ``-``) holding
      the ``caft`` adapter and, for latent adapters, ``attribution.json``, as written by the
      directions search; instead of the experiment's ``adapter`` and ``attribution``.
  answer_form, max_examples, seed, source_files: passed to the dataset builders (``source_files`` maps source
      set names to files; each run's builder gets the entries of the sets it builds).
Writes one results JSON, PNG and model card (``<name>_model_card.md``, where it ran ``caft`` or ``caft_annealed``)
per combination (or source), and ``double_mc_summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import datasets

from hf_concept_ablation.adapter.config import CONFIG_NAME
from hf_concept_ablation.experiments.recipe_settings import (
    check_task_settings,
    parse_recipe_args,
)
from hf_concept_ablation.experiments.report import markdown_table, report_recipe_run
from hf_concept_ablation.experiments.runner import ExperimentConfig, run_experiment
from hf_concept_ablation.experiments.training import process_state
from hf_concept_ablation.files import write_json_atomic
from hf_concept_ablation.tasks import (
    ALL_COMBINATIONS,
    SOURCE_SETS,
    build_double_mc_datasets,
    build_skyline_datasets,
    check_source_files,
    combination_key,
    file_name,
    parse_combination_key,
)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "double_mc.yaml"
BUILDER_KEYS = ("answer_form", "max_examples", "seed", "source_files")
MODES = ("pairs", "skyline")


def _runs(task: dict) -> list[tuple[str, datasets.DatasetDict, dict]]:
    """(name, data, per-run experiment changes) for every combination or skyline source."""
    builder_args = {k: task[k] for k in BUILDER_KEYS
                    if k in task and k != "source_files" and not (k == "max_examples" and task.get("mode") == "skyline")}
    files = task.get("source_files")
    if task.get("mode", "pairs") == "skyline":
        sources = task.get("sources") or list(SOURCE_SETS)
        sources = [sources] if isinstance(sources, str) else sources
        check_source_files(files, sources)
        runs = []
        for source in sources:
            split = build_skyline_datasets(source, **builder_args, source_files=_files_of(files, [source]))
            runs.append((f"skyline-{source}", datasets.DatasetDict(train=split["train"], val=split["val"], ood=split["test"]), {}))
        return runs
    keys = task.get("combinations", "all")
    keys = [combination_key(*c) for c in ALL_COMBINATIONS] if keys == "all" else [keys] if isinstance(keys, str) else keys
    combinations = [(key, parse_combination_key(key)) for key in keys]
    check_source_files(files, {name for _, sets in combinations for name in sets})
    return [(file_name(key), build_double_mc_datasets(*sets, **builder_args, source_files=_files_of(files, sets)),
             _search_outputs(Path(task["adapters_dir"]), key) if task.get("adapters_dir") else {})
            for key, sets in combinations]


def _files_of(source_files: dict | None, names: Sequence[str]) -> dict | None:
    """The entries of ``task.source_files`` for the source sets one run builds (another run's own set is unknown to
    its builder)."""
    return None if source_files is None else {name: source_files[name] for name in names if name in source_files}


def _search_outputs(adapters_dir: Path, key: str) -> dict[str, str]:
    """The experiment's ``adapter`` (and ``attribution``, where the search wrote one) for a combination."""
    folder = adapters_dir / file_name(key)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"task.adapters_dir: {folder} holds no adapter ({CONFIG_NAME}) for {key!r}; run "
                                f"`python -m hf_concept_ablation.search.pipeline --task \"double_mc:{key}\" --out {folder}`")
    attribution = folder / "attribution.json"
    return {"adapter": str(folder), **({"attribution": str(attribution)} if attribution.is_file() else {})}


def _later_pair_mates(runs: list[tuple[str, datasets.DatasetDict, dict]]) -> dict[str, dict[str, datasets.DatasetDict]]:
    """For each combination, the later ones of the same (first, second) pair: they share its training set."""
    def pair(data: datasets.DatasetDict) -> tuple[str, str] | None:
        row = data["train"][0]
        return (row["first"], row["second"]) if "first" in row else None  # skyline data has no pair

    mates: dict[str, dict[str, datasets.DatasetDict]] = {}
    for i, (name, data, _) in enumerate(runs):
        mates[name] = {other: other_data for other, other_data, _ in runs[i + 1:]
                       if pair(data) is not None and pair(other_data) == pair(data)}
    return mates


def _card_task(name: str) -> str:
    """The task of run `name` (a combination, or a skyline source), as its model card states it."""
    if name.startswith("skyline-"):
        return f"answer the `{name.removeprefix('skyline-')}` questions (skyline: that source set alone)"
    return (f"answer the intended question of two in one prompt, ignore the other one (`{name}`: first, second and "
            "intended question set)")


def main(argv: list[str] | None = None, command: str | None = None) -> dict:
    """Run the recipe with `argv` (the process's arguments where None); `command`: how it was started, for the
    model card (default: this script with `argv`)."""
    task, experiment = parse_recipe_args(__doc__, DEFAULT_CONFIG, argv)
    check_task_settings(task, "double_mc", ("mode", "combinations", "sources", "adapters_dir", *BUILDER_KEYS),
                        choices={"mode": MODES})
    both = [k for k in ("adapter", "attribution") if task.get("adapters_dir") and experiment.get(k)]
    if both:
        raise ValueError(f"task.adapters_dir gives each combination its own {both}: leave experiment {both} unset")
    runs = _runs(task)
    if not runs:
        raise ValueError("nothing to run: task.combinations (or task.sources for skyline mode) is empty")
    run_configs = {name: ExperimentConfig.from_dict({**experiment, **changes}) for name, _, changes in runs}
    output_dir = Path(run_configs[runs[0][0]].output_dir)
    mates = _later_pair_mates(runs)
    summary = {}
    for name, data, _ in runs:
        adapters = {mate: run_configs[mate].adapter for mate in mates[name] if run_configs[mate].adapter}
        results = run_experiment(run_configs[name], data, name=name, siblings=mates[name], sibling_adapters=adapters)
        summary[name] = results["summary"]
        if process_state().is_main_process:
            report_recipe_run(results, run_configs[name], script=__file__, argv=argv, command=command, plot_title=name,
                              card_title=f"CAFT on double multiple choice: {name}", task=_card_task(name),
                              card_name=f"{name}_model_card.md")
            print(f"## {name}\n{markdown_table(results['summary'])}")
    if process_state().is_main_process:
        path = output_dir / "double_mc_summary.json"
        write_json_atomic(path, summary, indent=2)
        print(f"summary: {path}")
    return summary


if __name__ == "__main__":
    main()
