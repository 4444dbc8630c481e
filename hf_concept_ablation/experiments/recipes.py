"""The recipes: CAFT on the gender-bias task and on double multiple choice, from their settings to results, figures
and model cards.

Run by ``hf-concept-ablation train <recipe> [--config FILE] [key=value ...]``, by the scripts
``recipes/<recipe>.py`` (under ``accelerate launch`` for several processes), or in Python with `run_recipe`.
Their settings and packaged configs: `hf_concept_ablation.experiments.recipe_settings`; every setting, its default
and the override syntax: ``docs/recipes.md``.

Double multiple choice, task settings (``task:`` section):
  mode: ``pairs`` (train the experiment's conditions on each combination) or ``skyline``
      (plain fine-tuning on each source set alone, the paper's Table 1; its ``ood`` entry
      holds the held-out test questions).
  combinations: list of keys like ``verbs|sentiment|sentiment`` or ``all`` (the 24).
  sources: source sets for ``skyline`` mode (a list, or one name).
  adapters_dir: folder with one sub-folder per combination (key with ``|`` -> ``-``) holding
      the ``caft`` adapter and, for latent adapters, ``attribution.json``, as written by the
      concept search; instead of the experiment's ``adapter`` and ``attribution``.
  answer_form, max_examples, seed, source_files: passed to the dataset builders (``source_files`` maps source
      set names to files; each run's builder gets the entries of the sets it builds).
It writes one results JSON, PNG and model card (``<name>_model_card.md``, where it ran ``caft`` or
``caft_annealed``) per combination (or source), and ``double_mc_summary.json``.
"""

from __future__ import annotations

import inspect
import shlex
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import datasets

from ..adapter.config import CONFIG_NAME
from ..checks import check_names
from ..files import write_json_atomic
from ..loading import base_model_id
from ..tasks import (
    ALL_COMBINATIONS,
    SOURCE_SETS,
    build_double_mc_datasets,
    build_gender_concept_texts,
    build_gender_datasets,
    build_skyline_datasets,
    check_source_files,
    combination_key,
    double_mc_task_files,
    file_name,
    gender_task_files,
    parse_combination_key,
    unintended_concept_texts,
)
from ..tasks.validity import check_skyline
from .recipe_settings import RECIPES, recipe_settings
from .report import markdown_table, report_recipe_run
from .runner import ExperimentConfig, run_experiment
from .training import process_state

DOUBLE_MC_BUILDER_KEYS = ("answer_form", "max_examples", "seed", "source_files")
DOUBLE_MC_MODES = ("pairs", "skyline")


def run_recipe(name: str, config: str | Path | None = None, overrides: Sequence[str] = (), *,
               command: str | None = None) -> dict:
    """Run recipe `name` (`RECIPES`) with `config` (a YAML file or a packaged config's name; default: the packaged
    config named like the recipe) and ``key=value`` `overrides`; return its results (``double_mc``: the summary of
    every run). `command`: how it was started, for the model card (default: the ``hf-concept-ablation train``
    command line that does the same)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    task, experiment = recipe_settings(name if config is None else config, overrides)
    if command is None:
        command = shlex.join(["hf-concept-ablation", "train", name, *(["--config", str(config)] if config else []),
                              *overrides])
    return {"gender_bias": gender_bias, "double_mc": double_mc}[name](task, experiment, command=command)


def check_task_settings(task: Mapping[str, Any], recipe: str, known: Sequence[str],
                        choices: Mapping[str, Sequence[str]] | None = None) -> None:
    """Refuse ``task:`` settings the recipe does not know, a value outside its `choices`, and a ``seed`` or
    ``max_examples`` that is not a whole number, naming each (a typo must not start days of other runs)."""
    check_names(task, known, "task setting", f" for {recipe}")
    for key, allowed in (choices or {}).items():
        if key in task and task[key] not in allowed:
            raise ValueError(f"task.{key} must be one of {list(allowed)}, got {task[key]!r}")
    for key in ("seed", "max_examples"):
        value = task.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"task.{key} must be a whole number >= 0, got {value!r}")


def check_search_outputs(config: ExperimentConfig, search_task: str) -> None:
    """Name a missing ``adapter`` folder or ``attribution`` table before any work, and how to make them."""
    if config.adapter and not Path(config.adapter).is_dir():
        raise FileNotFoundError(f"adapter {config.adapter}: no such folder; make it with `hf-concept-ablation search "
                                f"--task {shlex.quote(search_task)} --out {shlex.quote(config.adapter)}`, or set "
                                "adapter=FOLDER")
    if config.attribution and not Path(config.attribution).is_file():
        raise FileNotFoundError(f"attribution {config.attribution}: no such file (the concept search writes "
                                "attribution.json into its folder); set attribution=FILE, or null")


def gender_bias(task: dict[str, Any], experiment: dict[str, Any], *, command: str) -> dict:
    """The gender-bias recipe with its ``task:`` and ``experiment:`` settings; the experiment's results."""
    check_task_settings(task, "gender_bias", list(inspect.signature(build_gender_datasets).parameters))
    config = ExperimentConfig.from_dict(experiment)
    check_search_outputs(config, "gender_bias")
    if not task.get("skyline"):  # (a skyline run measures what this checks)
        print(check_skyline(base_model_id(config.model), "gender_bias", task.get("answer_form", "letters")), flush=True)
    data = build_gender_datasets(**task)
    results = run_experiment(config, data, name="gender_bias", concept_texts=build_gender_concept_texts()._asdict(),
                             task_files=gender_task_files(task.get("templates_file"), task.get("professions_file")))
    if process_state().is_main_process:
        figure = report_recipe_run(results, config, command=command, plot_title="Gender bias",
                                   card_title="Gemma fine-tuned with CAFT on gender-bias data",
                                   task="choose the grammatical pronoun (subject vs object case), not the "
                                        "profession's stereotyped gender")
        print(markdown_table(results["summary"]))
        print(f"results: {Path(config.output_dir) / 'gender_bias.json'}\nfigure: {figure}")
    return results


class DoubleMCRun(NamedTuple):
    """One experiment of the double multiple-choice recipe: a combination, or a skyline source."""

    name: str
    data: datasets.DatasetDict
    #: experiment settings of this run only (its search's ``adapter`` and ``attribution``)
    changes: dict[str, str]
    #: the source set files `data` was built from (`double_mc_task_files`)
    task_files: dict[str, dict[str, str | None]]


def double_mc_runs(task: dict) -> list[DoubleMCRun]:
    """Every combination or skyline source of the ``task:`` settings."""
    builder_args = {k: task[k] for k in DOUBLE_MC_BUILDER_KEYS
                    if k in task and k != "source_files" and not (k == "max_examples" and task.get("mode") == "skyline")}
    files = task.get("source_files")
    if task.get("mode", "pairs") == "skyline":
        sources = task.get("sources") or list(SOURCE_SETS)
        sources = [sources] if isinstance(sources, str) else sources
        check_source_files(files, sources)
        runs = []
        for source in sources:
            split = build_skyline_datasets(source, **builder_args, source_files=_files_of(files, [source]))
            runs.append(DoubleMCRun(f"skyline-{source}", datasets.DatasetDict(train=split["train"], val=split["val"],
                                                                              ood=split["test"]),
                                    {}, double_mc_task_files([source], files)))
        return runs
    keys = task.get("combinations", "all")
    keys = [combination_key(*c) for c in ALL_COMBINATIONS] if keys == "all" else [keys] if isinstance(keys, str) else keys
    combinations = [(key, parse_combination_key(key)) for key in keys]
    check_source_files(files, {name for _, sets in combinations for name in sets})
    return [DoubleMCRun(file_name(key),
                        build_double_mc_datasets(*sets, **builder_args, source_files=_files_of(files, sets)),
                        _search_outputs(Path(task["adapters_dir"]), key) if task.get("adapters_dir") else {},
                        double_mc_task_files(sets[:2], files))
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
                                f"`hf-concept-ablation search --task \"double_mc:{key}\" --out {folder}`")
    attribution = folder / "attribution.json"
    return {"adapter": str(folder), **({"attribution": str(attribution)} if attribution.is_file() else {})}


def _later_pair_mates(runs: list[DoubleMCRun]) -> dict[str, dict[str, datasets.DatasetDict]]:
    """For each combination, the later ones of the same (first, second) pair: they share its training set."""
    def pair(data: datasets.DatasetDict) -> tuple[str, str] | None:
        row = data["train"][0]
        return (row["first"], row["second"]) if "first" in row else None  # skyline data has no pair

    mates: dict[str, dict[str, datasets.DatasetDict]] = {}
    for i, run in enumerate(runs):
        mates[run.name] = {other.name: other.data for other in runs[i + 1:]
                           if pair(run.data) is not None and pair(other.data) == pair(run.data)}
    return mates


def _card_task(name: str) -> str:
    """The task of run `name` (a combination, or a skyline source), as its model card states it."""
    if name.startswith("skyline-"):
        return f"answer the `{name.removeprefix('skyline-')}` questions (skyline: that source set alone)"
    return (f"answer the intended question of two in one prompt, ignore the other one (`{name}`: first, second and "
            "intended question set)")


def double_mc(task: dict[str, Any], experiment: dict[str, Any], *, command: str) -> dict:
    """The double multiple-choice recipe with its ``task:`` (module doc) and ``experiment:`` settings; the summary of
    every run."""
    check_task_settings(task, "double_mc", ("mode", "combinations", "sources", "adapters_dir", *DOUBLE_MC_BUILDER_KEYS),
                        choices={"mode": DOUBLE_MC_MODES})
    both = [k for k in ("adapter", "attribution") if task.get("adapters_dir") and experiment.get(k)]
    if both:
        raise ValueError(f"task.adapters_dir gives each combination its own {both}: leave experiment {both} unset")
    runs = double_mc_runs(task)
    if not runs:
        raise ValueError("nothing to run: task.combinations (or task.sources for skyline mode) is empty")
    run_configs = {run.name: ExperimentConfig.from_dict({**experiment, **run.changes}) for run in runs}
    for name in run_configs:
        key = "<first>|<second>|<intended>" if name.startswith("skyline-") else name.replace("-", "|")
        check_search_outputs(run_configs[name], f"double_mc:{key}")
    output_dir = Path(run_configs[runs[0].name].output_dir)
    mates = _later_pair_mates(runs)
    summary = {}
    for name, data, _, task_files in runs:
        adapters = {mate: run_configs[mate].adapter for mate in mates[name] if run_configs[mate].adapter}
        texts = unintended_concept_texts(data, task.get("source_files")) \
            if "leace_contrast" in run_configs[name].conditions else None
        results = run_experiment(run_configs[name], data, name=name, siblings=mates[name], sibling_adapters=adapters,
                                 concept_texts=texts, task_files=task_files)
        summary[name] = results["summary"]
        if process_state().is_main_process:
            report_recipe_run(results, run_configs[name], command=command, plot_title=name,
                              card_title=f"CAFT on double multiple choice: {name}", task=_card_task(name),
                              card_name=f"{name}_model_card.md")
            print(f"## {name}\n{markdown_table(results['summary'])}")
    if process_state().is_main_process:
        path = output_dir / "double_mc_summary.json"
        write_json_atomic(path, summary, indent=2)
        print(f"summary: {path}")
    return summary
