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
import sys
from pathlib import Path
from typing import Sequence

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
QUICK_CONFIG = REPO_RECIPES / "configs" / "gender_bias_quick.yaml"


def run_demo(output_dir: Path, threads: int | None = None) -> dict:
    """Search for the gender concept, then run the quick gender recipe with the adapter found."""
    from . import directions

    search_dir = output_dir / "search"
    if not directions.search_finished(search_dir):
        print(f"== 1/2 concept search -> {search_dir}", flush=True)
        args = ["--task", "gender_bias", "--out", str(search_dir), "--max-examples", "64", "--batch-size", "16",
                "--min-contrast", "0.5"]
        if threads:
            args += ["--threads", str(threads)]
        directions.main(args)
    else:
        print(f"== 1/2 concept search: reusing {search_dir}", flush=True)
    print("== 2/2 fine-tuning: plain and CAFT", flush=True)
    sys.path.insert(0, str(REPO_RECIPES))
    import gender_bias  # the recipe, from the source tree

    return gender_bias.main([
        "--config", str(QUICK_CONFIG),
        f"adapter={search_dir}", f"attribution={search_dir / 'attribution.json'}",
        f"output_dir={output_dir}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-concept-ablation", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the whole pipeline on the embedded model, quick size")
    demo.add_argument("--output-dir", default="outputs/demo", type=Path)
    demo.add_argument("--threads", type=int, help="torch CPU threads for the search")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if not QUICK_CONFIG.is_file():
            parser.error(f"the demo runs from a source checkout; {QUICK_CONFIG} not found")
        run_demo(args.output_dir, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
