"""The recipes' settings: a YAML config (sections ``task`` and ``experiment``) plus ``key=value`` overrides.

``hf-concept-ablation train gender_bias --config my.yaml seeds=[0,1,2] training.learning_rate=1e-5``.
Values are parsed as YAML (numbers, lists, null); dotted keys reach into sections; a key outside ``task.`` is an
experiment setting. The recipes (`RECIPES`) and their configs ship with the package (``assets/recipes``).

Light on purpose (no torch): the command line's ``--help`` reads the recipes from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import yaml


@dataclass(frozen=True)
class Recipe:
    """What a recipe is: its one-line description, what it writes, and its ``task:`` settings (name -> the recipe's
    default and a short help; a recipe config may set another value)."""

    description: str
    writes: str
    task_settings: Mapping[str, tuple[Any, str]]


RECIPES = {
    "gender_bias": Recipe(
        "CAFT on the gender-bias task: learn pronoun grammar, not the profession's stereotyped gender.",
        "<output_dir>/gender_bias.json, gender_bias.png and model_card.md",
        {"seed": (0, "template split seed"),
         "val_fraction": (0.2, "share of the templates held out for val and ood"),
         "templates_file": (None, "your sentence templates (CSV/JSONL, docs/tasks.md)"),
         "answer_form": ("letters", "letters (A/B) or words (the pronouns)"),
         "skyline": (False, "train on every profession group with both genders (the skyline)"),
         "professions_file": (None, "your profession groups (JSON, docs/tasks.md)")}),
    "double_mc": Recipe(
        "CAFT on double multiple choice: answer the intended question, ignore the other one.",
        "per combination (or source) <output_dir>/<name>.json, .png and <name>_model_card.md; double_mc_summary.json",
        {"mode": ("pairs", "pairs (the conditions on each combination) or skyline (plain FT on each source set)"),
         "combinations": ("all", "keys like verbs|sentiment|sentiment, or all (the 24)"),
         "sources": (["verbs", "pronouns", "sentiment", "sports"], "the source sets of skyline mode"),
         "adapters_dir": (None, "a search folder per combination (verbs-sentiment-verbs), instead of adapter"),
         "answer_form": ("letters", "letters (A/B) or words"),
         "max_examples": (2000, "questions per combination (pairs mode)"),
         "seed": (0, "question split seed"),
         "source_files": (None, "your questions per source set (CSV/JSONL, docs/tasks.md)")}),
}


def packaged_configs() -> dict[str, Path]:
    """The recipe configs shipped with the package, by name (``gender_bias_quick`` for ``gender_bias_quick.yaml``)."""
    folder = resources.files("hf_concept_ablation") / "assets" / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")}


def config_path(config: str | Path) -> Path:
    """A recipe config given as a YAML file or as the name of a packaged one (`packaged_configs`)."""
    path = Path(config)
    if path.is_file():
        return path
    packaged = packaged_configs()
    if str(config) in packaged:
        return packaged[str(config)]
    raise FileNotFoundError(f"recipe config {config} does not exist (packaged configs: {', '.join(packaged)})")


def apply_override(config: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; a malformed one raises an error naming it."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} is not of the form key=value")
    key, raw = assignment.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = config
    for part in parents:
        if node.get(part) is None:  # also an empty section (``experiment:`` with nothing under it)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: {part!r} is not a section")
    try:
        node[leaf] = yaml.load(raw, Loader=RecipeLoader)
    except yaml.YAMLError as err:
        raise ValueError(f"override {assignment!r}: the value is not valid YAML ({err.problem or err})") from err


class RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also reads ``5e-5`` and ``1E3`` as floats (YAML 1.1 wants a dot), and refuses a key given
    twice in one mapping (which YAML would let the last one win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *base``: a key it brings in may be given again
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the SafeLoader names an unhashable key itself
            if key in seen:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$|^[-+]?[0-9][0-9_]*\.[0-9_]*$|^[-+]?\.[0-9_]+$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_recipe_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe YAML (sections ``task`` and ``experiment``) and apply overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe config {path} does not exist")
    try:
        config = yaml.load(path.read_bytes(), Loader=RecipeLoader)  # bytes: a file that is not UTF-8 is a YAMLError
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of sections ('task', 'experiment'), got {config!r:.80}")
    for assignment in overrides:
        apply_override(config, assignment)
    unknown = sorted(set(config) - {"task", "experiment"})
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; expected 'task' and 'experiment'")
    return config


def recipe_settings(config: str | Path, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The task settings and the experiment settings of recipe `config` (a file or a packaged name, `config_path`)
    with `overrides` (``key=value``; a key outside ``task.`` and ``experiment.`` is an experiment setting). The
    experiment settings are checked by `ExperimentConfig.from_dict` once the recipe has added what it derives per
    run (e.g. each combination's adapter)."""
    path = config_path(config)
    overrides = [o if o.split("=", 1)[0].split(".")[0] in ("task", "experiment") else f"experiment.{o}"
                 for o in overrides]
    settings = load_recipe_config(path, overrides)
    for section in ("task", "experiment"):
        if not isinstance(settings.get(section) or {}, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping, got {settings[section]!r}")
    return dict(settings.get("task") or {}), dict(settings.get("experiment") or {})
