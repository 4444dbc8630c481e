"""``hf-concept-ablation corpus`` (the offline SAE training corpus) and ``train-sae`` (SAEs for a model without
public ones), `hf_concept_ablation.saes`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import boolean, first_clause, positive_int, shown, subcommand
from ._source import Setting, constant, dataclass_settings, function_defaults

TYPES = {"int": int, "float": float, "str": str, "bool": boolean}
METAVARS = {int: "N", float: "X", str: "NAME", boolean: "BOOL"}


def _add_settings(group: Any, settings: list[Setting], skip: tuple[str, ...] = ()) -> list[str]:
    """An option per dataclass field (``--n-model-samples``), given only when used; the field names."""
    names = []
    for s in settings:
        if s.name in skip:
            continue
        kind = TYPES[s.type.split("|")[0].strip()]
        group.add_argument("--" + s.name.replace("_", "-"), dest=s.name, type=kind, default=argparse.SUPPRESS,
                           metavar=METAVARS[kind], help=f"{first_clause(s.help)} ({shown(s.default)})")
        names.append(s.name)
    return names


def add_corpus(commands: argparse._SubParsersAction) -> None:
    parser = subcommand(commands, "corpus", "build the offline text corpus for training SAEs",
                        "Build the offline SAE training corpus: text sampled from the model, the project's task "
                        "prompts and the standard library's docstrings, each record with a train/heldout split. "
                        "Made once; an interrupted run continues. See docs/saes.md.", run_corpus,
                        usage="%(prog)s [options]")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: the package's cache)")
    parser.set_defaults(recipe_fields=_add_settings(parser.add_argument_group("corpus recipe"),
                                                    dataclass_settings("saes.corpus", "CorpusRecipe")))


def run_corpus(args: argparse.Namespace) -> int:
    from ..saes.corpus import CorpusRecipe, build_corpus

    recipe = CorpusRecipe(**{k: getattr(args, k) for k in args.recipe_fields if hasattr(args, k)})
    print(build_corpus(recipe, args.out))
    return 0


def add_train_sae(commands: argparse._SubParsersAction) -> None:
    parser = subcommand(commands, "train-sae", "train SAEs on a model's residual stream, offline",
                        "Train sae-lens SAEs on a causal LM's residual stream, offline (no wandb, no Hub): cache "
                        "activations once for all layers, train one SAE per layer with resumable checkpoints, and "
                        "report explained variance, L0 and CE loss recovered on held-out text (quality.json). See "
                        "docs/saes.md.", run_train_sae, usage="%(prog)s --out DIR [options]")
    defaults = function_defaults("saes.training", "train_saes")
    run = parser.add_argument_group("what and where")
    run.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder: layer_<L>/ per SAE, "
                     "quality.json")
    run.add_argument("--model", default="embedded", help="'embedded', a Hub id or a local folder (%(default)s)")
    shipped = constant("adapter.sae_sources", "SHIPPED_LAYERS")
    run.add_argument("--layers", type=int, nargs="+", default=list(shipped), metavar="L",
                     help=f"decoder layers ({' '.join(map(str, shipped))})")
    run.add_argument("--corpus", type=Path, metavar="FILE", help="corpus JSONL (default: build the default corpus)")
    run.add_argument("--activations", type=Path, metavar="DIR", help="activation cache (default: <out>/activations)")

    def option(flag: str, help: str, **kwargs: Any) -> None:
        name = flag[2:].replace("-", "_")
        default = f" ({shown(defaults[name])})" if defaults[name] is not None else ""
        run.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help + default, **kwargs)

    option("--max-corpus-tokens", "tokens of activations to cache", type=positive_int, metavar="N")
    option("--context-size", "tokens per context", type=positive_int, metavar="N")
    option("--eval-tokens", "held-out tokens for the quality report", type=positive_int, metavar="N")
    option("--eval-ce-tokens", "held-out tokens for CE loss recovered (default: --eval-tokens)",
           type=positive_int, metavar="N")
    option("--threads", "torch CPU threads", type=positive_int, metavar="N")
    option("--jobs", "layers trained at once, in worker processes", type=positive_int, metavar="N")
    parser.set_defaults(sae_fields=_add_settings(parser.add_argument_group("SAE training"),
                                                 dataclass_settings("saes.training", "SAETrainingConfig"),
                                                 skip=("model_name",)))


def run_train_sae(args: argparse.Namespace) -> int:
    from ..saes.training import SAETrainingConfig, train_saes

    config = SAETrainingConfig(**{k: getattr(args, k) for k in args.sae_fields if hasattr(args, k)})
    options = {k: getattr(args, k) for k in ("max_corpus_tokens", "context_size", "eval_tokens", "eval_ce_tokens",
                                              "threads", "jobs") if hasattr(args, k)}
    train_saes(args.model, args.layers, args.out, config, corpus=args.corpus, activations=args.activations, **options)
    return 0
