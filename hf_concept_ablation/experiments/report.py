"""Figures and tables from experiment results (the paper's Figure 2 kind)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
from pathlib import Path
from string import Template
from typing import Any, Callable, Mapping, Sequence

import matplotlib
from huggingface_hub.utils import HFValidationError, validate_repo_id

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..adapter.config import CONFIG_NAME, ConceptAblationConfig  # noqa: E402
from ..files import atomic_path, write_text_atomic  # noqa: E402
from ..loading import base_model_id  # noqa: E402
from .runner import checkpoint_dir  # noqa: E402
from .training import PRESETS  # noqa: E402

CONDITION_LABELS = {
    "none": "plain FT",
    "caft": "CAFT",
    "caft_annealed": "CAFT (annealed)",
    "random": "random latents",
    "top_k": "top-k attribution",
    "test_only": "test-time ablation",
    "leace": "LEACE (labels)",
    "leace_sequential": "LEACE (labels, sequential)",
    "leace_refit": "LEACE (labels, refitted)",
    "leace_contrast": "LEACE (contrast texts)",
    "random_eraser": "random eraser",
}
#: How every accuracy is measured: the deployed model, except the condition defined by ablating at test time.
MEASURED = "ablation removed; test-time ablation: applied"


def plot_accuracy(summary: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str) -> Path:
    """Bars of mean validation and OOD accuracy per condition (`MEASURED`), OOD standard error, seed dots."""
    conditions = [c for c in CONDITION_LABELS if c in summary]
    if not conditions:
        raise ValueError(f"nothing to plot: the summary has no known condition ({sorted(summary)})")
    fig, ax = plt.subplots(figsize=(1.6 * len(conditions) + 2, 3.6))
    width = 0.38
    for i, condition in enumerate(conditions):
        entry = summary[condition]
        val = ax.bar(i - width / 2, entry["val_mean"], width, color="#9db4d0", label="validation" if i == 0 else None)
        ood = ax.bar(i + width / 2, entry["ood_mean"], width, yerr=entry["ood_sem"], capsize=3, color="#d0704a",
                     label="OOD" if i == 0 else None)
        for bars in (val, ood):  # the value on every bar, so a zero is seen as one
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.scatter([i + width / 2] * len(entry["ood"]), entry["ood"], color="black", s=10, zorder=3)
    ax.set_xticks(range(len(conditions)), [CONDITION_LABELS[c] for c in conditions], rotation=15)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylabel(f"accuracy\n({MEASURED})", fontsize=8)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_overview(per_combination: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | os.PathLike) -> Path:
    """OOD accuracy (mean, standard error) of every condition on every double multiple-choice combination."""
    keys = [k for k, s in per_combination.items() if s]
    conditions = [c for c in CONDITION_LABELS if any(c in per_combination[k] for k in keys)]
    if not conditions:
        raise ValueError("nothing to plot: no combination has results")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(keys) + 2), 3.8), layout="constrained")
    width = 0.8 / len(conditions)
    for j, condition in enumerate(conditions):
        xs = [i for i, k in enumerate(keys) if condition in per_combination[k]]
        entries = [per_combination[keys[i]][condition] for i in xs]
        ax.bar([x - 0.4 + width * (j + 0.5) for x in xs], [e["ood_mean"] for e in entries], width,
               yerr=[e["ood_sem"] for e in entries], capsize=2, label=CONDITION_LABELS[condition])
    ax.set_xticks(range(len(keys)), [k.replace("|", "\n") for k in keys], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("OOD accuracy on the intended question")
    ax.set_title(f"Double multiple choice ({MEASURED})")
    fig.legend(fontsize=7, loc="outside right upper")  # beside the bars, not over them
    return _save_figure(fig, path)


def _save_figure(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=130)
    finally:
        plt.close(fig)
    return path


def seeds_cell(entry: Mapping[str, Any]) -> str:
    """How many seeds a summary `entry` (of one condition) averages, naming those whose model did not learn the task
    (``did_not_learn``; a summary written before it was recorded names none)."""
    unlearned = entry.get("did_not_learn", [])
    which = f"seed{'s' if len(unlearned) > 1 else ''} {', '.join(map(str, unlearned))}"
    return f"{len(entry['ood'])}" + (f"; {which}: val at chance, did not learn the task" if unlearned else "")


def markdown_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table: condition, validation mean, OOD mean +- standard error, seeds (`seeds_cell`)."""
    lines = ["| condition | val | OOD | seeds |", "|---|---|---|---|"]
    for condition, label in CONDITION_LABELS.items():
        if condition in summary:
            e = summary[condition]
            spread = f" ± {e['ood_sem']:.3f}" if len(e["ood"]) > 1 else ""  # one seed has no standard error
            lines.append(f"| {label} | {e['val_mean']:.3f} | {e['ood_mean']:.3f}{spread} | {seeds_cell(e)} |")
    return "\n".join(lines)


def table_cell(text: Any) -> str:
    """`text` safe inside a Markdown table cell: pipes escaped (also inside code spans), line breaks as spaces."""
    return " ".join(str(text).split()).replace("|", "\\|")


#: conditions trained with the adapter the card describes: their saved checkpoints get it as README.md
CARD_CONDITIONS = ("caft", "caft_annealed")
#: conditions trained through a fitted eraser (`hf_concept_ablation.search.leace`): each gets a card of its own,
#: ``<card name>_<condition>.md``, describing its erasers
ERASER_CARD_CONDITIONS = ("leace", "leace_sequential", "leace_refit", "leace_contrast")
#: packaged with the library; the repository's `model_cards/` links to it
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "assets" / "model_cards" / "caft_model_card.md"


def _ablated_rows(config: ConceptAblationConfig, selection: Mapping[str, Any] | None,
                  layer: int) -> list[tuple[str, Mapping[str, Any]]]:
    """The name and the search's `selection` entry of each latent or direction ablated at `layer`. The search lists a
    layer's components in the order of the adapter's direction rows; without one entry per row (no search, or an
    adapter changed since) directions are named by row only."""
    selected = [s for s in (selection or {}).get("selected", []) if s["layer"] == layer]
    if config.latents.get(layer):
        by_latent = {s["latent"]: s for s in selected if "latent" in s}
        return [(str(i), by_latent.get(i, {})) for i in config.latents[layer]]
    rows = len(config.directions.get(layer, []))
    components = [s for s in selected if "component" in s]
    if len(components) == rows:
        return [(f"component {s['component']}", s) for s in components]
    return [(f"direction {i}", {}) for i in range(rows)]


def _erasers_table(config: ConceptAblationConfig) -> str:
    fit = config.fitted_on
    skipped = f" (nothing to erase at {fit['nothing_to_erase']})" if fit.get("nothing_to_erase") else ""
    refits = f", refitted after every {fit['refit_every']} steps" if "refit_every" in fit else ""
    return "\n".join(["| layers | erased classes | fitted on | positions | fit |", "|---|---|---|---|---|",
                      f"| {', '.join(map(str, config.layers))}{skipped} | {table_cell(', '.join(fit.get('classes', [])))} "
                      f"| {table_cell(_fitting_data(fit))} | {fit.get('positions', '')} "
                      f"| {fit.get('fit', 'independent')}{refits} |"])


def _fitting_data(fitted_on: Mapping[str, Any]) -> str:
    """What an eraser was fitted on, in words (its ``fitted_on`` record)."""
    texts = f"{fitted_on['texts']} texts" if "texts" in fitted_on else "texts"
    if fitted_on.get("source") == "labels":
        return f"{texts} labeled by the column `{fitted_on.get('column')}`"
    return f"{texts}: {fitted_on.get('source', 'unrecorded')}"


def _latents_table(config: ConceptAblationConfig, selection: Mapping[str, Any] | None) -> str:
    lines = ["| layer | latent / direction | attribution | contrast | explanation |", "|---|---|---|---|---|"]
    for layer in config.layers:
        for name, d in _ablated_rows(config, selection, layer):
            effect = f"{d['effect']:+.3f}" if "effect" in d else ""
            contrast = f"{d['contrast']:+.2f}" if "contrast" in d else ""
            lines.append(f"| {layer} | {name} | {effect} | {contrast} | {table_cell(d.get('explanation', ''))} |")
    return "\n".join(lines)


def hub_repo_id(model: str) -> str | None:
    """The Hub repo id (``org/name``) of an experiment's `model` (the embedded one's is its source, `base_model_id`);
    None for a local folder or anything else the Hub would refuse as a card's ``base_model``."""
    repo_id = base_model_id(model)
    if repo_id.count("/") != 1 or Path(repo_id).exists():
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id


def render_model_card(
    results: Mapping[str, Any],
    config: ConceptAblationConfig,
    *,
    title: str,
    task: str,
    command: str,
    selection: Mapping[str, Any] | None = None,
    figure: str | None = None,
    checkpoint: str = "",
    template: str | os.PathLike = MODEL_CARD_TEMPLATE,
) -> str:
    """Fill the model card template from an experiment's results and the adapter's config; `checkpoint` says which
    of the experiment's models the card sits beside (empty for the experiment's own card). The base model is the
    experiment's ``model``, named in the front matter only where it is a Hub repo id (`hub_repo_id`); the ``seeds``
    setting is those of the results table (every run in the results file, whichever invocation made it)."""
    if config.mode == "leace":
        how = " layer after layer, each with the erasers before it on," if config.fitted_on.get("fit") == "sequential" \
            else ""
        refits = f", and fitted again on the model being trained after every {config.fitted_on['refit_every']} " \
                 "optimizer steps" if "refit_every" in config.fitted_on else ""
        source = f"LEACE erasers (`concept_erasure`) fitted{how} on the base model's residual stream, " \
                 f"{_fitting_data(config.fitted_on)}{refits}"
    else:
        sources = sorted({s.describe() for s in config.saes.values()}) or ["explicit directions (e.g. PCA)"]
        source = ", ".join(f"`{s}`" for s in sources)
    run = results["config"]
    settings = {"preset": run.get("preset")}
    if run.get("preset") in PRESETS:  # the settings the runs trained with: the preset with the run's changes
        settings.update(dataclasses.asdict(PRESETS[run["preset"]].replace(**run.get("training", {}))))
    settings.update({k: run[k] for k in ("model", "train_size", "eval_size", "dtype", "anneal") if k in run})
    settings["seeds"] = sorted({seed for entry in results["summary"].values() for seed in entry["seeds"]})
    training_rows = ["| setting | value |", "|---|---|"] + [
        f"| {k} | `{table_cell(v)}` |" for k, v in settings.items() if v is not None
    ]
    return Template(Path(template).read_text()).substitute(
        title=title,
        base_model=base_model_id(run["model"]),
        base_model_metadata=f"base_model: {repo_id}\n" if (repo_id := hub_repo_id(run["model"])) else "",
        task=task,
        sae_source=source,
        mode=config.mode,
        layers=", ".join(map(str, config.layers)),
        latents_table=_erasers_table(config) if config.mode == "leace" else _latents_table(config, selection),
        training_table="\n".join(training_rows),
        results_table=markdown_table(results["summary"]),
        figure=f"![accuracy by condition]({figure})" if figure else "",
        checkpoint=f"\n- **This model:** {checkpoint}" if checkpoint else "",
        command=command,
    )


def launch_command(argv: Sequence[str]) -> str:
    """The command line `argv` (a script and its arguments) as a user would retype it: ``accelerate launch`` where
    accelerate's launcher started this process (it sets ``ACCELERATE_MIXED_PRECISION``), else ``python`` (``-m`` for a
    package's module)."""
    argv = list(argv)
    script = Path(argv[0]) if argv else Path("-")
    if script.name == "__main__.py" or script.suffix == ".py" and (script.parent / "__init__.py").is_file():
        module = script.parent if script.name == "__main__.py" else script.with_suffix("")
        root = module
        while (root.parent / "__init__.py").is_file():
            root = root.parent
        argv[0] = "-m " + ".".join(module.relative_to(root.parent).parts)
    elif script.is_absolute() and script.is_relative_to(Path.cwd()):
        argv[0] = str(script.relative_to(Path.cwd()))
    launcher = "accelerate launch" if "ACCELERATE_MIXED_PRECISION" in os.environ else "python"
    return " ".join([launcher, argv[0], *(shlex.quote(a) for a in argv[1:])])


def write_run_model_card(results: Mapping[str, Any], experiment: Any, *, title: str, task: str, command: str,
                         figure: Path | None = None, card_name: str = "model_card.md",
                         progress: Callable[[str], None] = print) -> Path | None:
    """Write the model cards of an experiment's results beside them: `card_name` for the runs trained with its
    ``caft`` adapter (`CARD_CONDITIONS`), ``<card_name stem>_<condition>.md`` for each eraser condition's runs
    (`ERASER_CARD_CONDITIONS`, describing the condition's erasers); and each as ``README.md`` (with the figure, and
    the model's own scores) in the saved checkpoints of its runs, those of earlier invocations too, since the results
    table they share has changed. Cards do not describe the plain or baseline models: without such runs, say so
    with `progress`. Returns the first card's path (None: no card)."""
    cards: list[tuple[tuple[str, ...], Path, str]] = []
    if experiment.adapter and any(condition in results["summary"] for condition in CARD_CONDITIONS):
        cards.append((CARD_CONDITIONS, Path(experiment.adapter), card_name))
    for condition in ERASER_CARD_CONDITIONS:
        folder = _eraser_folder(results, experiment, condition)
        if folder is not None:
            cards.append(((condition,), folder, f"{Path(card_name).stem}_{condition}.md"))
    if not cards:
        progress(f"no model card: no {', '.join((*CARD_CONDITIONS, *ERASER_CARD_CONDITIONS))} run in "
                 f"{results['name']}'s results")
        return None
    figure = figure if figure is not None and figure.is_file() else None
    paths = [_write_card(results, experiment, conditions, adapter, name, title=title, task=task, command=command,
                         figure=figure) for conditions, adapter, name in cards]
    return paths[0]


def _eraser_folder(results: Mapping[str, Any], experiment: Any, condition: str) -> Path | None:
    """The saved eraser adapter the `condition` runs of `results` trained through (matched by its fitting data's
    fingerprint among ``<output_dir>/erasers/<name>/<condition>-*``); None without such runs or folder."""
    fits = {(r.get("ablation") or {}).get("fitted_on", {}).get("sha256") for r in results["runs"]
            if r["condition"] == condition}
    for folder in sorted((Path(experiment.output_dir) / "erasers" / results["name"]).glob(f"{condition}-*")):
        config_file = folder / CONFIG_NAME
        if config_file.is_file() and json.loads(config_file.read_text()).get("fitted_on", {}).get("sha256") in fits:
            return folder
    return None


def _write_card(results: Mapping[str, Any], experiment: Any, conditions: Sequence[str], adapter: Path, card_name: str,
                *, title: str, task: str, command: str, figure: Path | None) -> Path:
    """One card (`write_run_model_card`): of the `conditions` runs, trained with `adapter`."""
    config = ConceptAblationConfig.from_pretrained(adapter)
    selection = json.loads((adapter / "selection.json").read_text()) if (adapter / "selection.json").is_file() else None

    def card(checkpoint: str = "") -> str:
        return render_model_card(results, config, title=title, task=task, selection=selection,
                                 command=command, figure=figure.name if figure else None,
                                 checkpoint=checkpoint)

    path = write_text_atomic(Path(experiment.output_dir) / card_name, card())
    for run in results["runs"]:
        folder = checkpoint_dir(experiment, results["name"], run["condition"], run["seed"])
        if run["condition"] in conditions and folder.is_dir():
            if figure:
                shutil.copyfile(figure, folder / figure.name)
            write_text_atomic(folder / "README.md", card(_checkpoint_line(run)))
    return path


def _checkpoint_line(run: Mapping[str, Any]) -> str:
    """Which model a checkpoint's card sits beside, with its own scores."""
    return (f"the `{run['condition']}` model of seed {run['seed']}: val {run['val']['accuracy']:.3f}, "
            f"OOD {run['ood']['accuracy']:.3f} (ablation removed)")


def report_recipe_run(results: Mapping[str, Any], experiment: Any, *, command: str, plot_title: str, card_title: str,
                      task: str, card_name: str = "model_card.md") -> Path:
    """What a recipe writes after one experiment: its figure ``<output_dir>/<name>.png`` (`plot_accuracy`) and its
    model card (`write_run_model_card`), whose command is `command` (how the recipe was started); returns the
    figure's path."""
    figure = plot_accuracy(results["summary"], Path(experiment.output_dir) / f"{results['name']}.png", plot_title)
    write_run_model_card(results, experiment, title=card_title, task=task, command=command, figure=figure,
                         card_name=card_name)
    return figure
