"""The ``hf-concept-ablation`` command (also ``python -m hf_concept_ablation``), the package's only command line.

Subcommands, each with ``--help``: ``demo``, ``search``, ``train`` (a recipe), ``reproduce`` (the study), ``report``,
``corpus`` and ``train-sae``. They parse their arguments before importing torch (``--help`` answers at once), call the
package's Python functions, and end on a user error (a bad setting, a missing file) with one line naming it and a
non-zero exit code; ``--debug`` shows the traceback instead. The recipe scripts ``recipes/<recipe>.py`` run `train`
through `run_recipe_script`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import experiments, saes, search
from ._common import HelpFormatter, parse_overrides, run_command

PROG = "hf-concept-ablation"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line with every subcommand."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, allow_abbrev=False,
                                     description="Concept ablation fine-tuning (CAFT) for Hugging Face models.",
                                     epilog=f"`{prog} COMMAND --help` lists a command's settings and their defaults.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    experiments.add_demo(commands)
    search.add_search(commands)
    experiments.add_train(commands)
    experiments.add_reproduce(commands)
    experiments.add_report(commands)
    saes.add_corpus(commands)
    saes.add_train_sae(commands)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: the process's arguments); the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_overrides(build_parser(), argv)
    args.argv = argv
    return run_command(args.run, args, f"{PROG} {args.command}")


def run_recipe_script(recipe: str, script: str, argv: Sequence[str] | None = None) -> int:
    """The recipe script `script` (``recipes/<recipe>.py``): ``hf-concept-ablation train <recipe>`` with the script's
    name in its usage and errors, and the script's command line (under ``accelerate launch`` where it started so) in
    its model cards; the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = Path(script).name
    return experiments.run_train_script(recipe, script, argv, prog)
