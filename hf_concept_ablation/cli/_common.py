"""What the subcommands share: the help layout, ``--debug``, how values are shown and parsed, and how a user error
ends a command (one line, no traceback)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import textwrap
from typing import Any, Callable, Iterable, Sequence

import yaml

#: errors that a user's settings, files or machine cause: one line, no traceback (unless ``--debug``)
USER_ERRORS = (ValueError, OSError, ImportError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's layout with the option column narrower, so that an option and its help share a line."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=min(shutil.get_terminal_size().columns, 120) - 2)


def filled(text: str) -> str:
    """`text` with its plain paragraphs filled to the help's width (lists and indented lines left as they are), its
    reStructuredText literals (``x``) as plain text."""
    width = min(shutil.get_terminal_size().columns, 120) - 2
    paragraphs = text.replace("``", "").strip().split("\n\n")
    return "\n\n".join(p if re.search(r"^(\s|\d+\.)", p, re.M) else textwrap.fill(" ".join(p.split()), width)
                       for p in paragraphs)


def debug_parent() -> argparse.ArgumentParser:
    """The ``--debug`` option every subcommand takes (after its name; the main parser takes it before)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the traceback instead of one line")
    return parent


def subcommand(commands: argparse._SubParsersAction, name: str, summary: str, description: str,
               run: Callable[[argparse.Namespace], int], **options: Any) -> argparse.ArgumentParser:
    """Add subcommand `name`, which `run` carries out on the parsed arguments (returning the exit code)."""
    parser = commands.add_parser(name, help=summary, description=filled(description), parents=[debug_parent()],
                                 formatter_class=HelpFormatter, allow_abbrev=False, **options)
    parser.set_defaults(run=run)
    return parser


def shown(value: Any) -> str:
    """A setting's value as it is written on the command line or in a YAML file (``[0, 1]``, ``null``)."""
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def settings_table(rows: Iterable[tuple[str, str, str]], width: int | None = None) -> str:
    """``name  value  help`` lines of settings, the help wrapped in its column (and after a long value, on the next
    line)."""
    rows = list(rows)
    width = width or min(shutil.get_terminal_size().columns, 120) - 2
    name_width = max(len(name) for name, _, _ in rows) + 2
    value_width = min(max(len(value) for _, value, _ in rows), 20) + 2
    lines = []
    for name, value, help in rows:
        head = f"  {name:<{name_width}}{value:<{value_width}}"
        if len(head) > 2 + name_width + value_width:  # a long value: its help on the next line
            lines.append(head.rstrip())
            head = " " * (2 + name_width + value_width)
        lines += textwrap.wrap(help, width, initial_indent=head, subsequent_indent=" " * len(head)) or [head.rstrip()]
    return "\n".join(lines)


def first_clause(text: str) -> str:
    """`text` up to its first parenthesis, semicolon or full stop (for a one-line help)."""
    return re.split(r" \(|; |\. ", text, maxsplit=1)[0]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def boolean(text: str) -> bool:
    """argparse type: ``true``/``false`` (also yes/no, 1/0)."""
    lowered = text.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str) -> int:
    """``run(args)``; a user error (`USER_ERRORS`) or an interruption ends it with one line on stderr and a non-zero
    exit code, with the traceback only under ``--debug``."""
    debug = getattr(args, "debug", False)
    try:
        return run(args)
    except BrokenPipeError:  # the reader of the output went away (``| head``): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"{prog}: error: {err or type(err).__name__}", file=sys.stderr)
        return 1


def parse_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv`, whose ``key=value`` overrides (a recipe's ``overrides``) may come before and after the options."""
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args
