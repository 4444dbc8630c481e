"""Shared command line of the recipes: a YAML config plus ``key=value`` overrides.

``python recipes/gender_bias.py --config my.yaml seeds=[0,1,2] training.learning_rate=1e-5``.
Values are parsed as YAML (numbers, lists, null); dotted keys reach into sections.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import yaml

from ..checks import check_names


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


def parse_recipe_args(description: str, default_config: Path, argv: Sequence[str] | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse ``--config`` and overrides; return the task settings and the experiment settings (checked by
    `ExperimentConfig.from_dict` once the recipe has added what it derives per run, e.g. each combination's adapter)."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=description)
    parser.add_argument("--config", default=str(default_config), help="recipe YAML (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0,1] experiment.train_size=64")
    args = parser.parse_args(argv)
    overrides = [o if o.split("=", 1)[0].split(".")[0] in ("task", "experiment") else f"experiment.{o}"
                 for o in args.overrides]
    config = load_recipe_config(args.config, overrides)
    for section in ("task", "experiment"):
        if not isinstance(config.get(section) or {}, dict):
            raise ValueError(f"{args.config}: section {section!r} must be a mapping, got {config[section]!r}")
    return dict(config.get("task") or {}), dict(config.get("experiment") or {})


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
