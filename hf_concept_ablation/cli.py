"""Command line: ``hf-concept-ablation demo`` (what ``make demo`` runs).

The demo is the whole CAFT pipeline on the embedded Gemma 3 270M, at a size that runs
on two CPU cores in about a quarter of an hour:

1. concept search on the gender-bias task (attribution of the shipped SAEs' latents,
   contrast with female/male sentences, selection) -> a saved adapter, and its erasure check;
2. plain fine-tuning and CAFT with that adapter (the gender recipe's quick preset),
   evaluated on validation and OOD data with the ablation removed;
3. a results JSON, a figure and a table.

Finished steps are kept, so a second run only redoes what is missing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
QUICK_CONFIG = REPO_RECIPES / "configs" / "gender_bias_quick.yaml"


def run_demo(output_dir: Path, threads: int | None = None, model: str = "embedded",
             search_args: Sequence[str] = (), command: str | None = None) -> dict:
    """Search for the gender concept, then run the quick gender recipe with the adapter found.

    `model`: the embedded default, a Hub id or a local folder (another model needs its SAEs in
    `search_args`, e.g. ``["--sae", "6=PATH"]``; later options override the demo's own). `command`: how the
    demo was started, for the model card (default: the recipe call this makes)."""
    from .search import pipeline as directions

    search_dir = output_dir / "search"
    args = ["--task", "gender_bias", "--out", str(search_dir), "--model", model, "--max-examples", "64",
            "--batch-size", "16", "--min-contrast", "0.5", *(["--threads", str(threads)] if threads else []),
            *search_args]
    finished = directions.search_finished(search_dir)
    print(f"== 1/2 concept search: reusing {search_dir}" if finished else f"== 1/2 concept search -> {search_dir}",
          flush=True)
    if not directions.run_search_once(args, search_dir):
        raise SystemExit(f"the concept search selected nothing: see {search_dir / 'selection.json'}")
    print("== 2/2 fine-tuning: plain and CAFT", flush=True)
    sys.path.insert(0, str(REPO_RECIPES))
    import gender_bias  # the recipe, from the source tree

    return gender_bias.main([
        "--config", str(QUICK_CONFIG),
        f"adapter={search_dir}", f"attribution={search_dir / 'attribution.json'}",
        f"output_dir={output_dir}", f"model={model}",
    ], command=command)


def default_output_dir(model: str) -> Path:
    """The demo's output folder for `model`: each model its own, since a results folder refuses another model's runs."""
    return Path("outputs/demo") if model == "embedded" else Path(f"outputs/demo-{Path(model).name}")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``hf-concept-ablation`` command line; the exit code."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="hf-concept-ablation", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the whole pipeline on the embedded model, quick size")
    demo.add_argument("--output-dir", type=Path,
                      help="default: outputs/demo, or outputs/demo-<model folder name> for another model")
    demo.add_argument("--threads", type=int, help="torch CPU threads for the search")
    demo.add_argument("--model", default="embedded", help="'embedded', a Hub id or a local model folder")
    demo.add_argument("--sae", action="append", default=[], metavar="LAYER=PATH",
                      help="an SAE folder for a layer (needed for a model other than the embedded one)")
    demo.add_argument("--layers", type=int, nargs="+", help="layers to search (default: the shipped SAEs' layers)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if not QUICK_CONFIG.is_file():
            parser.error(f"the demo runs from a source checkout; {QUICK_CONFIG} not found")
        search_args = [f"--sae={s}" for s in args.sae] + (["--layers", *map(str, args.layers)] if args.layers else [])
        run_demo(args.output_dir or default_output_dir(args.model), args.threads, model=args.model,
                 search_args=search_args, command=shlex.join(["hf-concept-ablation", *argv]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
