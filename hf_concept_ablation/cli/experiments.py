"""``hf-concept-ablation demo``, ``train`` (a recipe, also the scripts ``recipes/<recipe>.py``), ``reproduce`` (the
study) and ``report`` (its report from the runs on disk)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from ..experiments import demo
from ..experiments.recipe_settings import RECIPES, load_recipe_config, packaged_configs
from ._common import (
    HelpFormatter,
    debug_parent,
    filled,
    first_clause,
    parse_overrides,
    run_command,
    settings_table,
    shown,
    subcommand,
)
from ._source import NO_DEFAULT, constant, dataclass_settings
from .search import parse_search_options

#: the experiment settings that hold further settings, and the dataclass whose fields they take
NESTED_SETTINGS = {"training": ("experiments.training", "TrainingPreset"),
                   "anneal": ("adapter.callbacks", "AblationSchedule"),
                   "eraser": ("experiments.runner", "EraserSettings")}


def how_started(argv: Sequence[str]) -> str:
    """The command line of this process as a user would retype it (for model cards): ``hf-concept-ablation ...``,
    or ``python -m hf_concept_ablation ...`` (``accelerate launch -m ...``) where it was started so."""
    if sys.argv and Path(sys.argv[0]).resolve() == Path(__file__).resolve().parent.parent / "__main__.py":
        from ..experiments.report import launch_command

        return launch_command([sys.argv[0], *argv])
    return shlex.join(["hf-concept-ablation", *argv])


# ------------------------------------------------------------------------------------------------------------ demo


def add_demo(commands: argparse._SubParsersAction) -> None:
    parser = subcommand(commands, "demo", "plain fine-tuning vs CAFT with a LEACE eraser vs its random control, quick "
                        "size", demo.__doc__, run_demo, usage="%(prog)s [options]")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output folder (default: outputs/demo, or outputs/demo-<model folder name>)")
    parser.add_argument("--model", default="embedded", help="'embedded', a Hub id or a local folder (%(default)s)")


def run_demo(args: argparse.Namespace) -> int:
    demo.run_demo(args.out or demo.default_output_dir(args.model), model=args.model, command=how_started(args.argv))
    return 0


# ----------------------------------------------------------------------------------------------------------- train


def add_train(commands: argparse._SubParsersAction) -> None:
    parser = subcommand(commands, "train", "run a recipe: plain fine-tuning, CAFT and the controls, on a task",
                        "Run a recipe (a YAML config plus key=value settings). Several processes: accelerate launch "
                        "recipes/<recipe>.py, which takes the same arguments. See docs/recipes.md.", None)
    recipes = parser.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    for name, recipe in RECIPES.items():
        sub = recipes.add_parser(name, help=recipe.description, parents=[debug_parent()], allow_abbrev=False,
                                 formatter_class=HelpFormatter)
        recipe_arguments(sub, name)
        sub.set_defaults(run=run_train)


def recipe_arguments(parser: argparse.ArgumentParser, recipe: str) -> None:
    """The arguments of a recipe, and its help: the description and every setting with its default."""
    parser.description = filled(f"{RECIPES[recipe].description} It writes {RECIPES[recipe].writes}.")
    parser.epilog = recipe_settings_help(recipe)
    parser.add_argument("--config", metavar="FILE", help="recipe YAML, or the name of a packaged one: "
                        f"{', '.join(n for n in packaged_configs() if n.startswith(recipe))} (default: {recipe})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="settings (YAML values), e.g. seeds=[0,1] training.learning_rate=1e-5 task.seed=1")


def recipe_settings_help(recipe: str) -> str:
    """Every setting of `recipe`: its task settings, the experiment's (`ExperimentConfig`), and what the nested ones
    take, each with its value in the recipe's packaged config, else its default."""
    config = load_recipe_config(packaged_configs()[recipe])
    task, experiment = config.get("task") or {}, config.get("experiment") or {}
    choices = {"conditions": constant("experiments.runner", "CONDITIONS"),
               "preset": sorted(constant("experiments.training", "PRESETS"))}
    rows = [(f"task.{name}", shown(task.get(name, default)), help)
            for name, (default, help) in RECIPES[recipe].task_settings.items()]
    for s in dataclass_settings("experiments.runner", "ExperimentConfig"):
        help = f"of {', '.join(choices[s.name])}" if s.name in choices else first_clause(s.help)
        if s.name in NESTED_SETTINGS:
            help = f"{s.name}.KEY=VALUE, KEY of {', '.join(f.name for f in dataclass_settings(*NESTED_SETTINGS[s.name]))}"
        rows.append((s.name, shown(experiment.get(s.name, None if s.default is NO_DEFAULT else s.default)), help))
    return (f"settings (value: in the packaged {recipe}.yaml, else the default; `experiment.` may be left out; every "
            "setting: docs/recipes.md):\n" + settings_table(rows))


def run_train(args: argparse.Namespace) -> int:
    from ..experiments.recipes import run_recipe

    run_recipe(args.recipe, args.config, args.overrides, command=how_started(args.argv))
    return 0


def run_train_script(recipe: str, script: str, argv: Sequence[str], prog: str) -> int:
    """``recipes/<recipe>.py``: `recipe` with the arguments `argv`; the exit code."""
    parser = argparse.ArgumentParser(prog=prog, parents=[debug_parent()], allow_abbrev=False,
                                     formatter_class=HelpFormatter)
    recipe_arguments(parser, recipe)
    args = parse_overrides(parser, argv)

    def run(args: argparse.Namespace) -> int:
        from ..experiments.recipes import run_recipe
        from ..experiments.report import launch_command

        run_recipe(recipe, args.config, args.overrides, command=launch_command([script, *argv]))
        return 0

    return run_command(run, args, prog)


# ------------------------------------------------------------------------------------------------ reproduce, report


def add_reproduce(commands: argparse._SubParsersAction) -> None:
    study = "experiments.study"
    conditions = constant("experiments.runner", "CONDITIONS")
    presets = sorted(constant("experiments.training", "PRESETS"))
    parser = subcommand(
        commands, "reproduce", "the paper's experiments, resumable (the whole study)",
        "The paper's experiments on gender bias and double multiple choice: concept searches, a validity scan, every "
        "condition x seed, then the report (summary.json, figures, README.md). Everything on disk is reused, so an "
        "interrupted run continues where it stopped. Sizes: full (all data; for a GPU), cpu (256 examples, 3 epochs, "
        "150 questions per split); auto picks full when CUDA is available.", run_reproduce,
        usage="%(prog)s [options]")
    parser.add_argument("--out", type=Path, default=Path("results"), metavar="DIR",
                        help="results folder: search/, runs/, validity.json, summary.json, figures/ (%(default)s)")
    parser.add_argument("--size", choices=("auto", *constant(study, "SIZES")), default="auto", metavar="SIZE",
                        help="%(choices)s (%(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], metavar="S",
                        help="training seeds; the first also seeds the validity scan (0 1 2 3 4)")
    parser.add_argument("--tasks", nargs="+", choices=constant(study, "TASKS"), default=list(constant(study, "TASKS")),
                        metavar="TASK", help="%(choices)s (both)")
    parser.add_argument("--combinations", nargs="+", metavar="KEY",
                        help="double MC keys like verbs|sentiment|sentiment (default: all 24)")
    parser.add_argument("--conditions", nargs="+", choices=conditions, default=list(constant(study, "STUDY_CONDITIONS")),
                        metavar="C", help=f"of {', '.join(conditions)} (default: "
                        f"{' '.join(constant(study, 'STUDY_CONDITIONS'))}); test_only needs none")
    parser.add_argument("--model", default="embedded", help="'embedded', a Hub id or a local folder (%(default)s)")
    parser.add_argument("--preset", choices=presets, default=constant("experiments.training", "DEFAULT_PRESET"),
                        metavar="NAME", help="training preset: gemma3-270m for the embedded model on a CPU, paper for the paper's "
                             "full fine-tuning (%(default)s)")
    parser.add_argument("--search-args", default="", metavar="OPTIONS",
                        help="further options of every concept search, e.g. '--sae 6=PATH --layers 6'")
    parser.add_argument("--gender-source", choices=constant(study, "GENDER_SOURCES"), default="sae", metavar="SOURCE",
                        help="where the gender concept comes from: %(choices)s (%(default)s)")
    parser.add_argument("--gender-answer-form", choices=("letters", "words"), default="words", metavar="FORM",
                        help="the gender prompts' answers: %(choices)s (%(default)s)")
    _readme_option(parser)
    parser.add_argument("--scan-only", action="store_true",
                        help="only the validity scan of the double multiple-choice combinations (validity.json)")


def _readme_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--readme", type=Path, metavar="FILE",
                        help="page whose results table is updated (default: the repository's docs/results.md, for its results/)")


def run_reproduce(args: argparse.Namespace) -> int:
    from ..experiments import study

    search = parse_search_options(args.search_args)
    size = study.size_named(args.size)
    combinations = study.check_combinations(args.combinations)
    readme = args.readme or study.default_readme(args.out)
    if args.scan_only:
        validity = study.scan_validity(combinations, args.out, size, args.seeds[0], args.model, args.preset)
        print(study.validity_markdown({key: validity[key] for key in combinations}))
        return 0
    study.reproduce(args.out, size, args.seeds, args.tasks, combinations, args.conditions, args.model, search, readme,
                    args.gender_source, args.gender_answer_form, args.preset)
    return 0


def add_report(commands: argparse._SubParsersAction) -> None:
    parser = subcommand(commands, "report", "the study's report from every run on disk",
                        "Rebuild summary.json, the figures and README.md of a study's results folder from every run "
                        "on disk (all tasks and seeds), and the results table of the repository README.", run_report)
    parser.add_argument("--out", type=Path, default=Path("results"), metavar="DIR",
                        help="the study's results folder (%(default)s)")
    _readme_option(parser)


def run_report(args: argparse.Namespace) -> int:
    from ..experiments import study

    if not (args.out / "runs").is_dir():
        raise FileNotFoundError(f"{args.out} holds no runs/ folder: give the results folder of a study (--out)")
    print(study.report_from_disk(args.out, args.readme or study.default_readme(args.out)))
    return 0
