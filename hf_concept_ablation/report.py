"""Figures and tables from experiment results (the paper's Figure 2 kind)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONDITION_LABELS = {
    "none": "plain FT",
    "caft": "CAFT",
    "caft_annealed": "CAFT (annealed)",
    "random": "random latents",
    "top_k": "top-k attribution",
    "test_only": "test-time ablation",
}


def plot_accuracy(summary: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str) -> Path:
    """Bars of mean validation and OOD accuracy per condition (ablation removed), OOD standard error, seed dots."""
    conditions = [c for c in CONDITION_LABELS if c in summary]
    if not conditions:
        raise ValueError(f"nothing to plot: the summary has no known condition ({sorted(summary)})")
    fig, ax = plt.subplots(figsize=(1.6 * len(conditions) + 2, 3.6))
    width = 0.38
    for i, condition in enumerate(conditions):
        entry = summary[condition]
        ax.bar(i - width / 2, entry["val_mean"], width, color="#9db4d0", label="validation" if i == 0 else None)
        ax.bar(i + width / 2, entry["ood_mean"], width, yerr=entry["ood_sem"], capsize=3, color="#d0704a",
               label="OOD" if i == 0 else None)
        ax.scatter([i + width / 2] * len(entry["ood"]), entry["ood"], color="black", s=10, zorder=3)
    ax.set_xticks(range(len(conditions)), [CONDITION_LABELS[c] for c in conditions], rotation=15)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("accuracy (no ablation at test)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def markdown_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table: condition, validation mean, OOD mean +- standard error, seeds."""
    lines = ["| condition | val | OOD | seeds |", "|---|---|---|---|"]
    for condition, label in CONDITION_LABELS.items():
        if condition in summary:
            e = summary[condition]
            lines.append(f"| {label} | {e['val_mean']:.3f} | {e['ood_mean']:.3f} ± {e['ood_sem']:.3f} | {len(e['ood'])} |")
    return "\n".join(lines)
