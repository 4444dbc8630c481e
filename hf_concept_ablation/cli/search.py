"""``hf-concept-ablation search``: the whole concept search for a task -> a saved adapter
(`hf_concept_ablation.search.pipeline.run_search`, settings `hf_concept_ablation.search.config.SearchConfig`)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from typing import Any

from ..search import config as search_config
from ..search.config import SearchConfig
from ._common import positive_int, shown, subcommand
from ._source import constant

DESCRIPTION = """\
The whole concept search for a task into --out: attribution of the SAEs' latents (or PCA directions), contrast of
the task's two concept text sets, selection (optionally with LLM explanations), then a loadable adapter, a
dashboard, selection.json and an erasure check. Exit code 2: nothing selected. See docs/finding_concepts.md."""


def _defaults() -> dict[str, Any]:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            for f in dataclasses.fields(SearchConfig)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def _assignment(what: str, example: str, key: type = str):
    def parse(text: str) -> tuple[Any, str]:
        try:
            name, value = search_config.parse_assignment(text, what, example)
            return key(name), value
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {example}, got {text!r}") from None
    return parse


layer_assignment = _assignment("--sae", "LAYER=PATH with a layer number", int)  #: argparse type of ``--sae``


def _pca_indices(text: str) -> dict[int, list[int]]:
    try:
        return search_config.parse_pca_indices(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("pca_indices ").removeprefix("pca_indices: ")) from None


def add_search_options(parser: argparse.ArgumentParser, task_and_out: bool = True) -> None:
    """The options of a search, with the `SearchConfig` field names as destinations; only those given end up in the
    namespace (the defaults are `SearchConfig`'s, shown in the help)."""
    defaults = _defaults()

    def option(group: Any, flag: str, help: str, dest: str | None = None, **kwargs: Any) -> None:
        dest = dest or flag[2:].replace("-", "_")
        default = defaults.get(dest)
        if kwargs.get("choices"):
            help = f"{'|'.join(kwargs['choices'])}: {help}"
        if default is not None and not isinstance(default, bool) and default not in ({}, []):
            help += f" ({shown(default)})"
        group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=help, **kwargs)

    what = parser.add_argument_group("task, model and SAEs")
    if task_and_out:
        what.add_argument("--task", required=True, help="gender_bias, or double_mc:FIRST|SECOND|INTENDED")
        what.add_argument("--out", required=True, metavar="DIR", help="output folder: a loadable adapter")
    option(what, "--model", "'embedded', a Hub id or a local folder")
    option(what, "--seed", "task data seed", type=int)
    option(what, "--answer-form", "of the task prompts (words: gender only)", choices=search_config.ANSWER_FORMS,
           metavar="FORM")
    option(what, "--contrast", "double MC: the unintended question's topic or its answers",
           choices=search_config.CONTRASTS, metavar="KIND")
    option(what, "--templates-file", "gender: your sentence templates", metavar="FILE")
    option(what, "--professions-file", "gender: your profession groups (JSON)", metavar="FILE")
    option(what, "--source-file", "double MC: your questions for a source set", dest="source_files",
           type=_assignment("--source-file", "SET=PATH (e.g. verbs=my_verbs.jsonl)"), action="append",
           metavar="SET=PATH")
    shipped = " ".join(map(str, constant("adapter.sae_sources", "SHIPPED_LAYERS")))
    option(what, "--source", "SAE latents or PCA directions", choices=search_config.SOURCES, metavar="SOURCE")
    option(what, "--layers", f"decoder layers (default: {shipped}; concept: all but the last)", type=int, nargs="+",
           metavar="L")
    option(what, "--sae", "an SAE folder for a layer (repeatable)", dest="saes", action="append",
           type=layer_assignment, metavar="LAYER=PATH")
    option(what, "--sae-release", "sae-lens release for every layer", metavar="NAME")
    option(what, "--sae-id-template", "its SAE ids, e.g. 'layer_{layer}/width_16k/canonical'", metavar="ID")
    option(what, "--no-check-model-name", "accept SAEs trained on another model", dest="check_model_name",
           action="store_false")
    option(what, "--batch-size", "texts per forward pass", type=positive_int, metavar="N")
    option(what, "--device", "auto: cuda when a GPU is visible, else cpu", metavar="DEVICE")
    option(what, "--threads", "torch CPU threads", type=positive_int, metavar="N")
    select = parser.add_argument_group("selection")
    option(select, "--top", "latents kept from attribution", type=positive_int, metavar="N")
    option(select, "--max-examples", "task examples for attribution (default: all)", type=positive_int, metavar="N")
    option(select, "--rule", "contrast and attribution", choices=search_config.RULES, metavar="RULE")
    option(select, "--min-contrast", "|Cohen's d| needed", type=float, metavar="D")
    option(select, "--max-selected", "at most this many chosen", type=positive_int, metavar="N")
    option(select, "--reduce", "per text, for the contrast", choices=search_config.REDUCTIONS, metavar="HOW")
    option(select, "--select-by", "default: contrast; union with an explainer", choices=search_config.SELECT_BY,
           metavar="HOW")
    explain = parser.add_argument_group("explanations (optional)")
    option(explain, "--llm-base-url", "an OpenAI-compatible endpoint", metavar="URL")
    option(explain, "--llm-model", "the model at the endpoint", metavar="NAME")
    option(explain, "--llm-api-key-env", "variable holding the key", metavar="NAME")
    option(explain, "--local-explainer", "explain with the model itself (weak)", action="store_true")
    option(explain, "--query", "the concept to look for (default: the task's)", metavar="TEXT")
    option(explain, "--embedding-model", "sentence-transformers model for --query", metavar="NAME")
    option(explain, "--min-similarity", "embedding similarity needed", type=float, metavar="S")
    option(explain, "--min-relevance", "LLM relevance needed", type=float, metavar="R")
    option(explain, "--explain-top", "latents explained", type=positive_int, metavar="N")
    pca = parser.add_argument_group("directions (--source pca or concept)")
    option(pca, "--pca-components", f"per layer (default: pca {search_config.PCA_COMPONENTS}, concept "
           f"{search_config.CONCEPT_COMPONENTS})", type=positive_int, metavar="N")
    option(pca, "--pca-texts", "task prompts the PCA reads", type=positive_int, metavar="N")
    option(pca, "--pca-indices", "choose by index, e.g. '6:0,2;9:1'", type=_pca_indices, metavar="L:I,J")
    option(pca, "--ablation", "set to the prompts' mean, or to 0", choices=search_config.ABLATIONS, metavar="HOW")


def search_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `SearchConfig` settings among parsed search options (those given)."""
    names = {f.name for f in dataclasses.fields(SearchConfig)}
    settings = {k: v for k, v in vars(args).items() if k in names}
    for name in ("saes", "source_files"):  # (repeated NAME=PATH options)
        if name in settings:
            settings[name] = dict(settings[name])
    return settings


def parse_search_options(text: str) -> dict[str, Any]:
    """The search settings of a string of search options (``"--sae 6=PATH --layers 6"``); a bad one ends the
    command with the parser's message."""
    parser = argparse.ArgumentParser(prog="--search-args", add_help=False, allow_abbrev=False)
    add_search_options(parser, task_and_out=False)
    return search_settings(parser.parse_args(shlex.split(text)))


def add_search(commands: argparse._SubParsersAction) -> None:
    parser = subcommand(commands, "search", "concept search for a task -> a saved adapter", DESCRIPTION, run,
                        usage="%(prog)s --task TASK --out DIR [options]")
    add_search_options(parser)


def run(args: argparse.Namespace) -> int:
    from ..search.pipeline import print_search_result, run_search

    result = run_search(SearchConfig(**search_settings(args)))
    print_search_result(result)
    return 0 if result.config is not None else 2
