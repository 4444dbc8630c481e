"""Does ablating SAE latents erase the unintended concept on double multiple choice? A table of the erasure-driven
searches' probes, one row per combination.

The searches (the study's CPU search settings, latents added until the erasure check's probe falls to chance + 0.05
at every searched layer, or a budget of 100):

    hf-concept-ablation search --task "double_mc:KEY" --out results/search-erasure/NAME --max-examples 64 \\
        --min-contrast 0.5 --contrast value --select-by erasure --max-selected 100 --batch-size 16

Usage: ``python scripts/sae_erasure_table.py [results/search-erasure]`` prints the markdown table.
"""
import json
import sys
from pathlib import Path


def probe_range(accuracies: dict[str, float]) -> str:
    """The lowest and highest probe accuracy over the searched layers."""
    low, high = min(accuracies.values()), max(accuracies.values())
    return f"{low:.2f}" if low == high else f"{low:.2f}-{high:.2f}"


def table(folder: Path) -> str:
    """One row per search folder under `folder`: probe before, with the whole selection ablated, and where it erased."""
    rows = ["| combination | latents ablated | probe before | probe after | erased |", "|---|---|---|---|---|"]
    for selection_file in sorted(folder.glob("*/selection.json")):
        selection = json.loads(selection_file.read_text())
        erasure, curve = selection["erasure"], selection["erasure_curve"]
        before = {layer: probe["before"] for layer, probe in erasure.items()}
        after = {layer: probe["after"] for layer, probe in erasure.items()}
        erased = "no" if curve["erased_at"] is None else f"at {curve['erased_at']} latents"
        key = selection["task"].removeprefix("double_mc:").replace("|", "\\|")
        rows.append(f"| `{key}` | {len(selection['selected'])} | {probe_range(before)} | {probe_range(after)} "
                    f"| {erased} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "results/search-erasure")))
