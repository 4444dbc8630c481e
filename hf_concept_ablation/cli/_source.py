"""Settings of modules the command line does not import before it has parsed its arguments (they import torch):
read from their source with `ast`, so that ``--help`` lists every setting and its default in a fraction of a
second. ``tests/test_cli.py`` checks what is read here against the imported modules."""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Setting:
    """One field of a settings dataclass: its name, default (`NO_DEFAULT` where it has none), type and help (the
    first sentence of its entry in the class docstring's ``Args:``)."""

    name: str
    default: Any
    type: str
    help: str


NO_DEFAULT = object()


@functools.cache
def _tree(module: str) -> ast.Module:
    """The syntax tree of the package's module `module` (``experiments.runner``)."""
    return ast.parse((PACKAGE / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))


def constant(module: str, name: str) -> Any:
    """The value of the module-level constant `name` of `module` (a literal, or a name it imports from a sibling
    module); a dict of calls (``{"paper": TrainingPreset(), ...}``) reads as its keys."""
    for node in _tree(module).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return _value(node.value, module)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return _value(node.value, module)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and any(a.name == name for a in node.names):
            return constant(f"{module.rsplit('.', 1)[0]}.{node.module}" if "." in module else node.module, name)
    raise LookupError(f"no constant {name} in hf_concept_ablation.{module}")


def _value(node: ast.expr | None, module: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Name):
        return constant(module, node.id)
    if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):
        return {k.value: None for k in node.keys}
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "field":
        options = {k.arg: k.value for k in node.keywords}
        if "default" in options:
            return _value(options["default"], module)
        factory = options.get("default_factory")
        if isinstance(factory, ast.Lambda):
            return _value(factory.body, module)
        if isinstance(factory, ast.Name) and factory.id in ("dict", "list"):
            return {"dict": {}, "list": []}[factory.id]
    raise ValueError(f"hf_concept_ablation.{module}: cannot read {ast.unparse(node)} without importing the module")


def dataclass_settings(module: str, cls: str) -> list[Setting]:
    """The fields of dataclass `cls` in `module`, in order."""
    node = next((n for n in _tree(module).body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if node is None:
        raise LookupError(f"no class {cls} in hf_concept_ablation.{module}")
    helps = _args_section(ast.get_docstring(node) or "")
    return [Setting(n.target.id, NO_DEFAULT if n.value is None else _value(n.value, module), ast.unparse(n.annotation),
                    helps.get(n.target.id, ""))
            for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]


def _args_section(docstring: str) -> dict[str, str]:
    """Name -> first sentence of each entry of a Google-style ``Args:`` section (``a, b: text`` names both)."""
    lines = docstring.split("Args:", 1)[1].splitlines() if "Args:" in docstring else []
    entries: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in lines:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        match = re.match(r"([\w, ]+):\s+(.*)", line.strip()) if depth == indent else None
        if match:
            names = [n.strip() for n in match.group(1).split(",")]
            for name in names:
                entries[name] = match.group(2)
        else:
            for name in names:
                entries[name] += " " + line.strip()
    return {name: first_sentence(text) for name, text in entries.items()}


def first_sentence(text: str) -> str:
    """The first sentence of a docstring text, with its reStructuredText markup (``x``, `x`) left out."""
    text = re.sub(r"``([^`]*)``|`([^`]*)`", lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
    return re.split(r"(?<=[^.][.;])\s", text.strip(), maxsplit=1)[0].rstrip(".;")


def function_defaults(module: str, function: str) -> dict[str, Any]:
    """The defaults of the parameters of `function` in `module` that have one."""
    node = next((n for n in _tree(module).body if isinstance(n, ast.FunctionDef) and n.name == function), None)
    if node is None:
        raise LookupError(f"no function {function} in hf_concept_ablation.{module}")
    positional = node.args.posonlyargs + node.args.args
    pairs = list(zip(positional[len(positional) - len(node.args.defaults):], node.args.defaults))
    pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
    return {arg.arg: _value(default, module) for arg, default in pairs}
