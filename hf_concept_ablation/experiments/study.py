"""``make reproduce`` (``hf-concept-ablation reproduce``): the paper's experiments (gender bias and double multiple
choice), resumable.

For each task, in order:

1. **concept search** (`hf_concept_ablation.search.pipeline`): attribution of the SAE latents on
   ``D_amb``, contrast selection, a saved adapter in ``<out>/search/<task>/``;
2. **validity scan** (double multiple choice only): plain fine-tuning with the first seed on
   every requested combination; a combination is kept only when that run learned the
   ambiguous task (validation accuracy at least `MIN_PLAIN_VAL`) and its OOD accuracy on the
   intended question is at most `MAX_PLAIN_OOD` (``<out>/validity.json``; the verdict is
   recomputed from the stored accuracies, so it follows these constants);
3. **experiment**: every condition x seed (`hf_concept_ablation.experiments.runner.run_experiment`),
   one results file per task in ``<out>/runs/`` (the scan's plain runs are reused; ``test_only``
   needs the plain model itself, which the scan does not keep, so for it the first seed's plain
   model is trained again with the same seed; the two intended questions of a pair share each
   plain model and its test-time ablations).
   Every plain model is also evaluated on its pair's dropped combination, so validity is judged
   again on plain fine-tuning's accuracies averaged over all seeds (`plain_verdicts`): a
   combination the scan's seed dropped but the mean admits is studied too, and the report's
   means keep only the combinations valid by the mean;
4. **report**: ``<out>/summary.json``, figures in ``<out>/figures/``, ``<out>/README.md`` and
   the results table of the repository's results page, ``docs/results.md`` (between
   ``<!-- results:start -->`` and ``<!-- results:end -->``).

Sizes: ``full`` (all data, the preset's epochs; meant for a GPU) and ``cpu`` (256 training
examples, 3 epochs, 150 evaluation questions per split, searches on 64 prompts).
Size ``auto`` picks ``full`` when CUDA is available (`size_named`). Everything already on disk is
reused, so an interrupted run (or a run with more seeds) continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets

from ..files import read_json, write_json_atomic, write_text_atomic
from ..resumable import check_settings
from ..tasks import (
    ALL_COMBINATIONS,
    build_double_mc_datasets,
    build_gender_concept_texts,
    build_gender_datasets,
    combination_key,
    double_mc_task_files,
    file_name,
    gender_task_files,
    parse_combination_key,
    unintended_concept_texts,
)
from .report import CONDITION_LABELS, MEASURED, plot_accuracy, plot_overview, seeds_cell, table_cell
from .runner import CONDITIONS, ERASER_CONDITIONS, ExperimentConfig, run_experiment
from .training import DEFAULT_PRESET, process_state

MAX_PLAIN_OOD = 0.9  #: a combination where plain fine-tuning exceeds this OOD accuracy is dropped
MIN_PLAIN_VAL = 0.9  #: ... and one where it does not reach this validation accuracy (it measures nothing)
#: Issue 6's targets, anchored on the paper's Gemma 2 2B numbers (`targets_markdown`).
GENDER_MIN_OOD, GENDER_MIN_VAL = 0.76, 0.98  #: gender bias: CAFT's mean OOD and validation accuracy
MIN_SHARE_BEATING_PLAIN, DOUBLE_MC_MIN_OOD = 0.75, 0.64  #: double MC: CAFT over plain FT, CAFT's mean OOD
RANDOM_MARGIN = 0.10  #: random latents' mean OOD must be at least this much below CAFT's
README_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")
TASKS = ("gender_bias", "double_mc")
#: the erasure study's results in a study folder (the packaged ``gender_bias_erasure`` recipe config writes it),
#: reported beside the study's tasks as "gender bias, erasure study"
ERASURE_STUDY = Path("erasure") / "gender_bias.json"
#: the erasure study's targets: the best eraser condition's mean OOD and val, and the margin of its random control
ERASER_MIN_OOD, ERASER_MIN_VAL, RANDOM_ERASER_MARGIN = 0.90, 0.95, 0.5
#: the eraser conditions whose best is judged against the targets (`random_eraser` is their control)
JUDGED_ERASERS = tuple(c for c in ERASER_CONDITIONS if c != "random_eraser")
CLAIM_SEEDS = 5  #: seeds of every combination a double-MC eraser target needs before it can be met
REPO_ROOT = Path(__file__).resolve().parents[2]
#: the repository's results page: a run into the repository's own ``results/`` rewrites its table (`update_readme`)
RESULTS_DOC = REPO_ROOT / "docs" / "results.md"
GENDER_SOURCES = ("sae", "pca", "concept")  #: where the gender concept may come from (the search's ``source``)
#: the conditions a study runs by default: all of them, the paper's (Figure 2) and the LEACE eraser conditions
STUDY_CONDITIONS = CONDITIONS
#: per task, the training split's column naming the unintended attribute, which ``leace`` erases
ERASER_LABELS = {"gender_bias": "stereotyped_gender", "double_mc": "unintended_value"}


@dataclass(frozen=True)
class ReproduceSize:
    """How big the runs are.

    Attributes:
        train_size, eval_size: subsample sizes (None: all rows).
        epochs: training epochs (None: the preset's).
        search_examples: ``D_amb`` prompts used for attribution (None: all).
        min_contrast: |Cohen's d| a latent needs to be selected.
        training: further `TrainingPreset` overrides (e.g. a learning rate).
    """

    train_size: int | None
    eval_size: int | None
    epochs: float | None
    search_examples: int | None
    min_contrast: float
    training: Mapping[str, Any] = field(default_factory=dict)


SIZES = {
    "full": ReproduceSize(train_size=None, eval_size=None, epochs=None, search_examples=None, min_contrast=0.5),
    "cpu": ReproduceSize(train_size=256, eval_size=150, epochs=3, search_examples=64, min_contrast=0.5),
}


def size_named(name: str) -> ReproduceSize:
    """The `SIZES` entry `name`; ``auto``: ``full`` when CUDA is available, else ``cpu``."""
    if name == "auto":
        import torch

        name = "full" if torch.cuda.is_available() else "cpu"
    if name not in SIZES:
        raise ValueError(f"size must be one of {['auto', *SIZES]}, got {name!r}")
    return SIZES[name]


def check_combinations(keys: Sequence[str] | None) -> list[str]:
    """`keys` (None: all 24 combinations), each checked to be a double multiple-choice combination key."""
    every = [combination_key(*c) for c in ALL_COMBINATIONS]
    bad = [k for k in keys or () if k not in every]
    if bad:
        raise ValueError(f"unknown combination(s) {bad}: use keys like verbs|sentiment|sentiment")
    return list(keys) if keys else every


def default_readme(out: Path) -> Path | None:
    """The page whose results table a study in `out` updates: the repository's `RESULTS_DOC` for its ``results/``
    folder."""
    return RESULTS_DOC if Path(out).resolve() == REPO_ROOT / "results" else None


def concept_search(task: str, out_dir: Path, size: ReproduceSize, model: str = "embedded",
                   search: Mapping[str, Any] | None = None) -> Path:
    """Run (or reuse) the automatic concept search for `task`; return the adapter folder.

    The folder records the search's settings (``search_args.json``); reusing it with other
    settings (another answer form, source or contrast) is refused, naming the folder.

    `search` holds further `SearchConfig` settings (e.g. ``{"saes": {6: PATH}}``), which take precedence over
    the study's own.
    """
    from ..search import pipeline
    from ..search.config import SearchConfig

    settings = {"model": model, "batch_size": 16, "min_contrast": size.min_contrast,
                **({"max_examples": size.search_examples} if size.search_examples else {}), **(search or {})}
    if not pipeline.run_search_once(SearchConfig(task=task, out=str(out_dir), **settings)):
        raise ValueError(f"the concept search for {task} selected nothing (see {out_dir / 'selection.json'}): lower "
                         "min_contrast, or delete the folder to search again with other settings")
    return out_dir


def experiment_config(size: ReproduceSize, seeds: Sequence[int], conditions: Sequence[str], output_dir: Path,
                      adapter: Path | None = None, model: str = "embedded", preset: str = DEFAULT_PRESET,
                      task: str = "gender_bias") -> ExperimentConfig:
    """The `ExperimentConfig` of one `task` (``gender_bias`` or ``double_mc``) at `size` with the training `preset`;
    ``top_k`` is left out when the adapter has no attribution table; the eraser conditions erase the task's
    `ERASER_LABELS` column at every position of every decoder layer."""
    attribution = adapter / "attribution.json" if adapter else None
    if attribution is not None and not attribution.is_file():
        attribution = None
        conditions = [c for c in conditions if c != "top_k"]
    return ExperimentConfig(
        model=model, seeds=list(seeds), conditions=list(conditions), preset=preset,
        training={**({"epochs": size.epochs} if size.epochs else {}), **size.training},
        adapter=str(adapter) if adapter else None,
        attribution=str(attribution) if attribution else None,
        train_size=size.train_size, eval_size=size.eval_size, output_dir=str(output_dir),
        eraser={"label_column": ERASER_LABELS[task], "positions": "all"} if set(ERASER_CONDITIONS) & set(conditions)
        else {},
    )


def task_datasets(task: str, seed: int = 0, answer_form: str = "letters") -> datasets.DatasetDict:
    """The splits of ``gender_bias`` (in `answer_form`) or of a double multiple-choice combination key."""
    if task == "gender_bias":
        return build_gender_datasets(seed=seed, answer_form=answer_form)
    return build_double_mc_datasets(*parse_combination_key(task), seed=seed)


def task_files(task: str) -> dict[str, dict[str, str | None]]:
    """The project's files `task_datasets` builds `task` from, as a results file records them."""
    return gender_task_files() if task == "gender_bias" else double_mc_task_files(parse_combination_key(task)[:2])


def by_pair(keys: Sequence[str]) -> list[list[str]]:
    """`keys` grouped by their (first, second) question pair, which shares one training set; in order."""
    pairs: dict[tuple[str, str], list[str]] = {}
    for key in keys:
        pairs.setdefault(parse_combination_key(key)[:2], []).append(key)
    return list(pairs.values())


def scan_validity(keys: Sequence[str], out: Path, size: ReproduceSize, seed: int, model: str = "embedded",
                  preset: str = DEFAULT_PRESET) -> dict[str, dict[str, Any]]:
    """Plain fine-tuning with `seed` on each combination not scanned yet; write and return ``validity.json``'s content.

    The two intended questions of a (first, second) pair share their training set, so each
    pair is trained once and evaluated on both combinations' splits. Validity belongs to the
    combination: an entry scanned with another seed is kept (it records its seed), so a later
    run of more seeds (``--seeds 1``) does not scan again; one of another model, size or preset is refused.
    """
    path = out / "validity.json"
    validity = read_validity(path)
    settings = {"model": model, "size": dataclasses.asdict(size), "preset": preset}

    def recorded(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: entry.get(k) for k in settings}

    for key in keys:
        if key in validity:
            check_settings(recorded(validity[key]), settings, where=path, what=f"a scan of {key}",
                           advice="use another --out (e.g. results-full) or delete it")
    config = experiment_config(size, [seed], ["none"], out / "runs", model=model, preset=preset)
    for first_key, *other_keys in by_pair([key for key in keys if key not in validity]):
        run_experiment(config, task_datasets(first_key), name=file_name(first_key),
                       siblings={file_name(k): task_datasets(k) for k in other_keys}, task_files=task_files(first_key))
        for key in (first_key, *other_keys):
            none = read_json(out / "runs" / f"{file_name(key)}.json")["summary"]["none"]
            index = none["seeds"].index(seed)
            validity[key] = judge({"seed": seed, **settings, "val": none["val"][index], "ood": none["ood"][index]})
        if process_state().is_main_process:
            write_json_atomic(path, validity)
    return validity


def judge(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A validity entry with its verdict: ``learned`` (val >= `MIN_PLAIN_VAL`) and ``valid``."""
    learned = at_least(entry["val"], MIN_PLAIN_VAL)
    return {**entry, "learned": learned, "valid": learned and entry["ood"] <= MAX_PLAIN_OOD}


def read_validity(path: Path) -> dict[str, dict[str, Any]]:
    """``validity.json`` with every verdict recomputed from its accuracies (empty if there is none)."""
    return {key: judge(entry) for key, entry in read_json(path).items()} if path.is_file() else {}


def plain_verdicts(out: Path, validity: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each scanned combination judged on plain fine-tuning's val / OOD averaged over all its seeds in
    ``<out>/runs/`` (``seeds`` lists them); the scan's entry where no runs file has plain results."""
    verdicts: dict[str, dict[str, Any]] = {}
    for key, entry in validity.items():
        path = out / "runs" / f"{file_name(key)}.json"
        plain = read_json(path).get("summary", {}).get("none") if path.is_file() else None
        verdicts[key] = (judge({**entry, "val": plain["val_mean"], "ood": plain["ood_mean"], "seeds": plain["seeds"]})
                         if plain else {**entry, "seeds": [entry["seed"]]})
    return verdicts


def studied_combinations(keys: Sequence[str], validity: Mapping[str, Mapping[str, Any]],
                         verdicts: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The `keys` that get every condition: valid by the scan's seed or by the mean of the plain seeds
    (the report's means keep only the latter, `valid_by_plain_mean`)."""
    return [k for k in keys if k in validity and (validity[k]["valid"] or verdicts[k]["valid"])]


def collect_summary(out: Path, tasks: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """``summary.json``: task -> (combination ->) condition -> per-seed ``val``/``ood`` and means."""
    def read(name: str) -> dict[str, Any]:
        path = out / "runs" / f"{file_name(name)}.json"
        return read_json(path).get("summary", {}) if path.is_file() else {}

    summary: dict[str, Any] = {}
    if "gender_bias" in tasks:
        summary["gender_bias"] = read("gender_bias")
    if "double_mc" in tasks:
        summary["double_mc"] = {key: read(key) for key in tasks["double_mc"]}
    erasure = out / ERASURE_STUDY
    if erasure.is_file():
        summary["gender_bias_erasure"] = read_json(erasure).get("summary", {})
    return summary


def valid_by_plain_mean(per_combination: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The combinations that still pass the validity rule with plain fine-tuning's accuracies averaged over
    all its seeds (the scan judges the first seed only, and at the CPU size plain fine-tuning can follow
    either rule depending on the seed)."""
    return {key: s for key, s in per_combination.items()
            if "none" not in s or judge({"val": s["none"]["val_mean"], "ood": s["none"]["ood_mean"]})["valid"]}


def at_least(value: float, threshold: float) -> bool:
    """`value` >= `threshold` up to float rounding: a mean of accuracies that is 0.9 exactly, such as that of 0.86,
    0.96, 0.9, 0.8733... and 0.9066..., sums to 0.8999999999999998."""
    return value >= threshold or math.isclose(value, threshold, rel_tol=1e-9)


def beats_plain(val: float, ood: float, plain: Mapping[str, Any]) -> bool:
    """Whether a condition's mean `val` and `ood` beat plain fine-tuning's summary `plain`: a higher OOD accuracy
    with the task learned (val at least `MIN_PLAIN_VAL`)."""
    return ood > plain["ood_mean"] and at_least(val, MIN_PLAIN_VAL)


def double_mc_means(per_combination: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per condition: mean OOD accuracy over combinations and the share where it beats ``none``: a higher
    OOD accuracy *and* the task learned (val >= `MIN_PLAIN_VAL`; a model that learned nothing answers
    OOD questions at chance, which is no generalization)."""
    means: dict[str, dict[str, float]] = {}
    for condition in CONDITIONS:
        rows = [s for s in per_combination.values() if condition in s]
        if not rows:
            continue
        entry = {"ood_mean": sum(s[condition]["ood_mean"] for s in rows) / len(rows), "n": len(rows)}
        paired = [s for s in rows if "none" in s]
        if condition != "none" and paired:
            entry["beats_none"] = sum(beats_plain(s[condition]["val_mean"], s[condition]["ood_mean"], s["none"])
                                      for s in paired) / len(paired)
        means[condition] = entry
    return means


def targets_markdown(summary: Mapping[str, Any]) -> str:
    """The targets against the measured numbers, one table row each (those the summary can judge; else empty)."""
    rows = []
    gender = summary.get("gender_bias") or {}
    means = double_mc_means(valid_by_plain_mean(summary.get("double_mc") or {}))
    if "caft" in gender:
        c = gender["caft"]
        rows.append((f"gender bias: CAFT OOD >= {GENDER_MIN_OOD} with val >= {GENDER_MIN_VAL}",
                     f"OOD {c['ood_mean']:.2f}, val {c['val_mean']:.2f} ({_seeds(len(c['ood']))})",
                     at_least(c["ood_mean"], GENDER_MIN_OOD) and at_least(c["val_mean"], GENDER_MIN_VAL)))
    if "beats_none" in means.get("caft", {}):
        c = means["caft"]
        rows.append((f"double MC: CAFT beats plain FT on >= {MIN_SHARE_BEATING_PLAIN:.0%} of the valid combinations",
                     f"{c['beats_none']:.0%} of {c['n']}", at_least(c["beats_none"], MIN_SHARE_BEATING_PLAIN)))
        rows.append((f"double MC: CAFT's mean OOD >= {DOUBLE_MC_MIN_OOD}",
                     f"{c['ood_mean']:.2f} (plain FT {means['none']['ood_mean']:.2f})",
                     at_least(c["ood_mean"], DOUBLE_MC_MIN_OOD)))
    rows += _eraser_target_rows(summary.get("gender_bias_erasure") or {})
    rows += _double_mc_eraser_rows(valid_by_plain_mean(summary.get("double_mc") or {}), means)
    for task, per_condition in (("gender bias", gender), ("double MC", means)):
        if "caft" in per_condition and "random" in per_condition:
            caft, random = per_condition["caft"]["ood_mean"], per_condition["random"]["ood_mean"]
            rows.append((f"{task}: random latents' mean OOD at least {RANDOM_MARGIN} below CAFT's",
                         f"random {random:.2f}, CAFT {caft:.2f}", random <= caft - RANDOM_MARGIN))
    if not rows:
        return ""
    head = "| target (the paper's Gemma 2 2B numbers; the erasure study's own) | measured | met |"
    return "\n".join([head, "|---|---|---|",
                      *(f"| {target} | {measured} | {'yes' if met else '**no**'} |" for target, measured, met in rows)])


def _eraser_target_rows(study: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """The erasure study's targets (`ERASER_MIN_OOD`, `ERASER_MIN_VAL`, `RANDOM_ERASER_MARGIN`) for its best eraser
    condition by mean OOD among those with val >= `ERASER_MIN_VAL` (else the best by OOD)."""
    erasers = {c: study[c] for c in JUDGED_ERASERS if c in study}
    if not erasers:
        return []
    learned = {c: s for c, s in erasers.items() if at_least(s["val_mean"], ERASER_MIN_VAL)} or erasers
    best = max(learned, key=lambda c: learned[c]["ood_mean"])
    b = erasers[best]
    rows = [(f"gender bias, erasure study: the best eraser's OOD >= {ERASER_MIN_OOD} with val >= {ERASER_MIN_VAL}",
             f"{CONDITION_LABELS[best]}: OOD {b['ood_mean']:.2f}, val {b['val_mean']:.2f} ({_seeds(len(b['ood']))})",
             at_least(b["ood_mean"], ERASER_MIN_OOD) and at_least(b["val_mean"], ERASER_MIN_VAL))]
    if "random_eraser" in study:
        random = study["random_eraser"]["ood_mean"]
        rows.append((f"gender bias, erasure study: random eraser's mean OOD at least {RANDOM_ERASER_MARGIN} below the "
                     "best eraser's", f"random {random:.2f}, {CONDITION_LABELS[best]} {b['ood_mean']:.2f}",
                     random <= b["ood_mean"] - RANDOM_ERASER_MARGIN))
    return rows


def _double_mc_eraser_rows(valid: Mapping[str, Mapping[str, Any]],
                            means: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, bool]]:
    """The double-MC erasure target (`MIN_SHARE_BEATING_PLAIN`), measured for every judged eraser condition, largest
    share first, each with how far its missing seeds could still take it; met once one condition has `CLAIM_SEEDS`
    seeds on every valid combination and beats plain fine-tuning on enough of them."""
    judged = sorted((c for c in JUDGED_ERASERS if "beats_none" in means.get(c, {})),
                    key=lambda c: -means[c]["beats_none"])
    if not judged:
        return []
    measured, met = [], False
    for condition in judged:
        m = means[condition]
        fewest = min(len(s[condition]["ood"]) for s in valid.values() if condition in s)
        complete = m["n"] == len(valid) and fewest >= CLAIM_SEEDS
        met = met or (complete and at_least(m["beats_none"], MIN_SHARE_BEATING_PLAIN))
        reachable = "" if complete else (f"; at most {reachable_share(valid, condition):.0%} "
                                         "whatever its missing seeds give")
        measured.append(f"{CONDITION_LABELS[condition]}: {m['beats_none']:.0%} of {m['n']} of {len(valid)} "
                        f"(fewest seeds: {fewest}{reachable})")
    return [(f"double MC, erasure study: the best eraser beats plain FT on >= {MIN_SHARE_BEATING_PLAIN:.0%} of the "
             f"valid combinations ({CLAIM_SEEDS} seeds each)", "; ".join(measured), met)]


def reachable_share(valid: Mapping[str, Mapping[str, Any]], condition: str) -> float:
    """The largest share of the valid combinations on which `condition` can still beat plain fine-tuning once it has
    `CLAIM_SEEDS` seeds on each: every missing seed counted at val and OOD 1.0 (a combination without runs counts
    as a win). Below `MIN_SHARE_BEATING_PLAIN`, no further seed of `condition` can make it meet the target."""
    def can_beat(s: Mapping[str, Any]) -> bool:
        if condition not in s:
            return True
        runs, missing = s[condition], max(CLAIM_SEEDS - len(s[condition]["ood"]), 0)
        best_val = (sum(runs["val"]) + missing) / (len(runs["val"]) + missing)
        best_ood = (sum(runs["ood"]) + missing) / (len(runs["ood"]) + missing)
        return beats_plain(best_val, best_ood, s["none"])

    paired = [s for s in valid.values() if "none" in s]
    return sum(map(can_beat, paired)) / len(paired) if paired else 0.0


def results_markdown(summary: Mapping[str, Any], verdicts: Mapping[str, Any], command: str) -> str:
    """The results table (validation / OOD accuracy, `report.MEASURED`) for the README; `verdicts`
    (`plain_verdicts`) name the scanned combinations left out of it."""
    conditions = [c for c in CONDITION_LABELS if any(c in s for s in _task_summaries(summary))]
    head = "| task | " + " | ".join(CONDITION_LABELS[c] for c in conditions) + " |"
    lines = [f"Made by `{command}` (from the runs on disk)."]
    targets = targets_markdown(summary)
    if targets:
        lines += ["", targets]
    lines += ["", f"Per task and condition: val / OOD accuracy ({MEASURED}), mean over seeds (± standard error "
              "of OOD; number of seeds in brackets).", "", head, "|---" * (len(conditions) + 1) + "|"]
    for name, s in _named_summaries(summary):
        cells = [f"{s[c]['val_mean']:.2f} / {s[c]['ood_mean']:.2f} ± {s[c]['ood_sem']:.2f} ({seeds_cell(s[c])})"
                 + (" †" if s[c]["val_mean"] < MIN_PLAIN_VAL else "") if c in s else "" for c in conditions]
        lines.append(f"| {table_cell(name)} | " + " | ".join(cells) + " |")
    lines += ["", f"† val < {MIN_PLAIN_VAL}: the model did not learn the task, so its OOD accuracy is near chance, "
              "not generalization."]
    if summary.get("double_mc"):
        valid = valid_by_plain_mean(summary["double_mc"])
        means = double_mc_means(valid)
        lines += ["", "Double multiple choice, mean OOD accuracy over the valid combinations run so far "
                  "(how many in brackets; the share where it beats plain fine-tuning on the same combinations with val >= "
                  f"{MIN_PLAIN_VAL}): "
                  + ", ".join(f"{CONDITION_LABELS[c]} {m['ood_mean']:.2f} ({m['n']}"
                              + (f"; beats plain on {m['beats_none']:.0%}" if "beats_none" in m else "") + ")"
                              for c, m in means.items()) + "."]
        left_out = {key: s["none"] for key, s in summary["double_mc"].items() if key not in valid}
        if left_out:
            lines += ["", "Left out of these means (studied, but not valid with plain fine-tuning's val / OOD "
                      "averaged over its seeds): " + ", ".join(
                          f"`{k}` ({p['val_mean']:.2f} / {p['ood_mean']:.2f}, {len(p['ood'])} seeds)"
                          for k, p in left_out.items()) + "."]
    dropped = {k: v for k, v in verdicts.items() if k not in (summary.get("double_mc") or {})}
    shortcut_free = sorted(k for k, v in dropped.items() if v["learned"])
    if shortcut_free:
        lines += ["", f"Dropped (plain fine-tuning already reaches OOD > {MAX_PLAIN_OOD}): "
                  + ", ".join(f"`{k}` ({dropped[k]['ood']:.2f}{_seed_count(dropped[k])})" for k in shortcut_free) + "."]
    unlearned = sorted(k for k, v in dropped.items() if not v["learned"])
    if unlearned:
        lines += ["", f"Dropped (plain fine-tuning did not learn the task, val < {MIN_PLAIN_VAL}): "
                  + ", ".join(f"`{k}` (val {dropped[k]['val']:.2f}{_seed_count(dropped[k])})" for k in unlearned) + "."]
    return "\n".join(lines)


def machines_markdown(out: Path) -> str:
    """Which machines made the runs in ``<out>/runs`` (their ``machine`` record), and how many runs each made."""
    counts: dict[str, int] = {}
    for path in sorted((out / "runs").glob("*.json")):
        for run in read_json(path).get("runs", []):
            device = (run.get("machine") or {}).get("device", "not recorded (runs made before runs named their machine)")
            counts[device] = counts.get(device, 0) + 1
    return ("Runs by machine (same protocol and size; machines differ by float rounding): "
            + ", ".join(f"{device}: {n}" for device, n in sorted(counts.items())) + ".") if counts else ""


def validity_markdown(validity: Mapping[str, Mapping[str, Any]]) -> str:
    """The validity scan as a table: plain fine-tuning's val and OOD accuracy per combination, and the verdict."""
    lines = ["| combination (first \\| second \\| intended) | plain val | plain OOD (intended) | verdict |",
             "|---|---|---|---|"]
    for key, v in validity.items():
        verdict = "valid" if v["valid"] else "dropped: not learned" if not v["learned"] else "dropped: no shortcut"
        lines.append(f"| {table_cell(f'`{key}`')} | {v['val']:.2f} | {v['ood']:.2f} | {verdict} |")
    return "\n".join(lines)


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _seed_count(verdict: Mapping[str, Any]) -> str:
    """", N seeds" for a verdict on the mean of several seeds, else nothing."""
    return f", {_seeds(len(verdict['seeds']))}" if len(verdict.get("seeds", ())) > 1 else ""


def _named_summaries(summary: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    named = [("gender bias", summary["gender_bias"])] if summary.get("gender_bias") else []
    named += [("gender bias erasure study", summary["gender_bias_erasure"])] if summary.get("gender_bias_erasure") else []
    named += [(f"`{key}`", s) for key, s in (summary.get("double_mc") or {}).items() if s]
    return named


def _task_summaries(summary: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [s for _, s in _named_summaries(summary)]


def update_readme(readme: Path, table: str) -> bool:
    """Replace the text between the results markers of `readme` (a markdown page, e.g. `RESULTS_DOC`) with `table`;
    False if there are no markers."""
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        return False
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    write_text_atomic(readme, f"{before}{start}\n{table}\n{end}{after}")
    return True


def write_report(out: Path, summary: Mapping[str, Any], validity: Mapping[str, Any], command: str,
                 readme: Path | None) -> str:
    """Write summary.json, the figures and README.md in `out` (and the results table of the page `readme`)."""
    write_json_atomic(out / "summary.json", summary)
    for name, s in _named_summaries(summary):
        plot_accuracy(s, out / "figures" / f"{file_name(name.strip('`')).replace(' ', '_')}.png", name.strip("`"))
    if summary.get("double_mc"):
        plot_overview(summary["double_mc"], out / "figures" / "double_mc_overview.png")
    machines = machines_markdown(out)
    table = results_markdown(summary, plain_verdicts(out, validity), command) + (f"\n\n{machines}" if machines else "")
    scan = f"\n\n## Validity scan (seed {next(iter(validity.values()))['seed']})\n\n{validity_markdown(validity)}" if validity else ""
    write_text_atomic(out / "README.md", f"# Results\n\n{table}{scan}\n\nFigures: `figures/`. Raw runs: `runs/`.\n")
    if readme is not None and readme.is_file():
        update_readme(readme, table)
    return table


def reproduce(out: Path, size: ReproduceSize, seeds: Sequence[int], tasks: Sequence[str],
              combinations: Sequence[str], conditions: Sequence[str], model: str = "embedded",
              search: Mapping[str, Any] | None = None, readme: Path | None = None, gender_source: str = "sae",
              gender_answer_form: str = "words", preset: str = DEFAULT_PRESET) -> dict[str, Any]:
    """Run every step of the module doc for `tasks`, `combinations` and `seeds`; return the summary, which (like
    the report it writes) covers every run in `out`, also those of tasks and seeds this call did not name.

    `search` holds further settings of every concept search (`concept_search`); `gender_source` is the gender
    search's ``source`` (`GENDER_SOURCES`) and `gender_answer_form` its prompts' answer form (``letters`` or
    ``words``); `preset` names the training preset.
    """
    if "test_only" in conditions and "none" not in conditions:
        raise ValueError("condition test_only evaluates the plain (none) model: add none to the conditions")
    state = process_state()
    if "gender_bias" in tasks:
        gender = {**(search or {}), "source": gender_source, "answer_form": gender_answer_form}
        adapter = concept_search("gender_bias", out / "search" / "gender_bias", size, model, gender)
        run_experiment(experiment_config(size, seeds, conditions, out / "runs", adapter, model, preset),
                       task_datasets("gender_bias", answer_form=gender_answer_form), name="gender_bias",
                       concept_texts=build_gender_concept_texts()._asdict(), task_files=task_files("gender_bias"))
    if "double_mc" in tasks:
        validity = scan_validity(combinations, out, size, seeds[0], model, preset)
        studied: list[str] = []
        # plain runs of a pair judge its dropped combination again, which may admit it: study until nothing is new
        while pending := [k for k in studied_combinations(combinations, validity, plain_verdicts(out, validity))
                          if k not in studied]:
            studied += pending
            for first_key, *other_keys in by_pair(pending):  # a pair's plain model is trained once, as in the scan
                adapters = {key: concept_search(f"double_mc:{key}", out / "search" / file_name(key), size, model,
                                                search) for key in (first_key, *other_keys)}
                pair = parse_combination_key(first_key)[:2]
                unstudied = [k for k in combinations if parse_combination_key(k)[:2] == pair and k not in studied]
                for key in (first_key, *other_keys):
                    siblings = [*other_keys, *unstudied] if key == first_key else []
                    data = task_datasets(key)
                    run_experiment(experiment_config(size, seeds, conditions, out / "runs", adapters[key], model,
                                                     preset, "double_mc"),
                                   data, name=file_name(key), concept_texts=unintended_concept_texts(data),
                                   siblings={file_name(k): task_datasets(k) for k in siblings},
                                   sibling_adapters={file_name(k): adapters[k] for k in siblings if k in adapters},
                                   task_files=task_files(key))
    if state.is_main_process:
        report_from_disk(out, readme)
    state.wait_for_everyone()
    return summary_from_disk(out)[0]


def summary_from_disk(out: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The summary of every run in `out` (every task with runs, every combination the scan or the plain mean
    admits, every seed), and the validity scan: the same whatever part of the study the last call ran."""
    validity = read_validity(out / "validity.json")
    everything = [combination_key(*c) for c in ALL_COMBINATIONS]
    tasks = {"double_mc": studied_combinations(everything, validity, plain_verdicts(out, validity))}
    if (out / "runs" / f"{file_name('gender_bias')}.json").is_file():
        tasks["gender_bias"] = ["gender_bias"]
    return collect_summary(out, {task: keys for task, keys in tasks.items() if keys}), validity


def report_from_disk(out: Path, readme: Path | None) -> str:
    """Write summary.json, the figures, `out`/README.md (and `readme`'s table) from every run in `out`."""
    summary, validity = summary_from_disk(out)
    return write_report(out, summary, validity, f"hf-concept-ablation report --out {out}", readme)
