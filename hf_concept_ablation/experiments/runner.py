"""One CAFT experiment: train every condition for every seed on one task and evaluate it.

Conditions (the paper's Figure 2):

* ``none``: plain fine-tuning.
* ``caft``: fine-tuning with the chosen concepts ablated (a saved adapter).
* ``caft_annealed``: the same, with the strength annealed toward 0 by `AblationScheduleCallback` (the strength is
  set before each step, so the last step trains at the schedule's value one step before the end, ~2/N).
* ``random``: as many latents as ``caft`` has, drawn at random from the attribution top 100;
  when ``caft`` removes directions (projection mode, e.g. PCA or concept directions), as many
  random unit directions at the same layers instead (a random subspace of the same size).
* ``top_k``: the same number of latents, the top ones by attribution.
* ``test_only``: the ``none`` model evaluated with the ``caft`` ablation applied at test time.

Every trained model is evaluated on ``val`` and ``ood`` with the ablation removed (the
deployed model; ``test_only`` records its scores with the ablation applied, by definition) and, where
there is one, kept; a run whose validation accuracy is at chance is flagged as one that did not learn the task
(`hf_concept_ablation.tasks.validity.did_not_learn`). Results are appended to a JSON file after
each run (written atomically), so an interrupted experiment resumes where it stopped. The file records what the runs
were made from (``inputs``: the adapter, the attribution table and the task files, each by its path and sha256).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import datasets
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from .. import __version__
from ..adapter.callbacks import AblationSchedule, AblationScheduleCallback
from ..adapter.config import (
    CONFIG_NAME,
    SELECTION_NAME,
    WEIGHTS_NAME,
    ConceptAblationConfig,
    SAESource,
    sae_source,
)
from ..adapter.model import (
    ConceptAblation,
    get_concept_ablation,
    inject_concept_ablation,
)
from ..checks import check_float_dtype, check_number, dataclass_from_settings
from ..files import atomic_dir, files_sha256, read_json, write_json_atomic
from ..loading import device_name, load_model, load_tokenizer
from ..resumable import check_settings, resume_folder
from ..search.attribution import LatentEffect, load_attribution
from ..search.leace import (
    POSITIONS,
    leace_config,
    one_hot_labels,
    random_eraser_config,
    texts_sha256,
)
from ..search.leace_refit import LeaceRefitCallback
from ..tasks import answer_strings, check_single_token
from ..tasks.evaluation import evaluate_multiple_choice
from ..tasks.validity import chance_p_value, did_not_learn
from .training import (
    DEFAULT_PRESET,
    PRESETS,
    fine_tune,
    fsdp_launch,
    prepare_model_for_training,
    process_state,
    shards_itself,
    training_arguments,
)

CONDITIONS = ("none", "caft", "caft_annealed", "random", "top_k", "test_only", "leace", "leace_sequential",
              "leace_refit", "leace_contrast", "random_eraser")
TRAINED_CONDITIONS = tuple(c for c in CONDITIONS if c != "test_only")  #: (``test_only`` evaluates ``none``'s model)
#: conditions that fine-tune through a LEACE eraser fitted on the base model (`EraserSettings`)
ERASER_CONDITIONS = ("leace", "leace_sequential", "leace_refit", "leace_contrast", "random_eraser")
#: eraser conditions fitted on the training prompts labeled by ``EraserSettings.label_column``
LABELED_ERASER_CONDITIONS = ("leace", "leace_sequential", "leace_refit")
#: conditions that read the concept search's output (``adapter``, ``attribution``)
ADAPTER_CONDITIONS = ("caft", "caft_annealed", "random", "top_k", "test_only")


@dataclass
class EraserSettings:
    """How the eraser conditions fit their erasers (`hf_concept_ablation.search.leace`) on the base model.

    Args:
        label_column: the training split's column naming the unintended attribute, whose values ``leace`` erases
            (gender task: ``gender``, the profession group's stereotyped gender on the training data).
        positions: ``all`` counted positions of each prompt (not BOS or padding) or only the ``last``.
        layers: decoder layers to erase at; None: every one.
        refit_every: ``leace_refit`` fits its erasers again on the model being trained after every this many
            optimizer steps (`LeaceRefitCallback`).
    """

    label_column: str | None = None
    positions: str = "all"
    layers: list[int] | None = None
    refit_every: int = 12

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"eraser.positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.layers is not None and (not isinstance(self.layers, list) or not self.layers):
            raise ValueError(f"eraser.layers must be a non-empty list of decoder layers or null, got {self.layers!r}")
        if isinstance(self.refit_every, bool) or not isinstance(self.refit_every, int) or self.refit_every < 1:
            raise ValueError(f"eraser.refit_every must be a positive whole number of steps, got {self.refit_every!r}")


@dataclass
class ExperimentConfig:
    """Everything one experiment needs; loaded from a recipe's YAML with command-line overrides.

    Args:
        model: model spec (``"embedded"``, a Hub id, or a folder).
        seeds: training seeds.
        conditions: subset of `CONDITIONS`.
        preset: name in `training.PRESETS`; ``training`` overrides its fields.
        adapter: folder of the saved `ConceptAblation` used by ``caft`` (and as the
            latent count and SAE sources of ``random`` / ``top_k``); set to None when no condition of
            `ADAPTER_CONDITIONS` is run.
        attribution: attribution table JSON (for ``random`` / ``top_k``); None when `adapter` is.
        saes: SAE source per layer (`SAESource` fields) for the latents of ``random`` /
            ``top_k``; layers missing here fall back to the ``caft`` adapter's sources.
        anneal: the `AblationSchedule` fields of ``caft_annealed``.
        eraser: the `EraserSettings` fields of ``leace``, ``leace_contrast`` and ``random_eraser``.
        train_size, eval_size: subsample the splits (None: all).
        eval_batch_size: batch size of evaluation.
        output_dir: where results and figures go.
        dtype: model dtype name.
        save_models: conditions whose trained models are saved (every seed), in
            ``<output_dir>/models/<name>/<condition>-seed<seed>/`` (``save_pretrained`` of the
            model and tokenizer, plus the ablation in ``concept_ablation/`` where there is one).
        save_steps: 0, or a Trainer checkpoint every this many optimizer steps in `training_dir` (the last one
            kept), from which an interrupted run resumes; removed once the run is recorded. Worth it where a
            run takes long (a GPU study of a large model); each checkpoint holds the model and optimizer state.
    """

    model: str = "embedded"
    seeds: list[int] = field(default_factory=lambda: [0])
    conditions: list[str] = field(default_factory=lambda: ["none", "caft", "test_only"])
    preset: str = DEFAULT_PRESET
    training: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None
    attribution: str | None = None
    saes: dict[int, dict[str, Any]] = field(default_factory=dict)
    anneal: dict[str, Any] = field(default_factory=lambda: {"kind": "linear", "start": 0.5, "end": 1.0})
    eraser: dict[str, Any] = field(default_factory=dict)
    train_size: int | None = None
    eval_size: int | None = None
    eval_batch_size: int = 32
    output_dir: str = "outputs/experiment"
    dtype: str = "float32"
    save_models: list[str] = field(default_factory=list)
    save_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("seeds", "conditions", "save_models"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ValueError(f"{name} must be a list, got {getattr(self, name)!r} (e.g. {name}=[...])")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")
        for seed in self.seeds:
            check_number(seed, "seed", 0, 2**32 - 1, integer=True)  # the range transformers' set_seed takes
        for name in ("train_size", "eval_size", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer{'' if name == 'eval_batch_size' else ' or null'}, "
                                 f"got {value!r}")
        check_float_dtype(self.dtype)
        check_number(self.save_steps, "save_steps", 0, integer=True)
        bad = [c for c in [*self.conditions, *self.save_models] if c not in CONDITIONS]
        if bad:
            raise ValueError(f"unknown condition(s) {bad}; choose from {CONDITIONS}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        for name in ("training", "anneal", "saes", "eraser"):
            if not isinstance(getattr(self, name), Mapping):
                raise ValueError(f"{name} must be a mapping of settings, got {getattr(self, name)!r} "
                                 f"(e.g. {name}.KEY=VALUE)")
        PRESETS[self.preset].replace(**self.training)  # names unknown or bad training settings
        dataclass_from_settings(AblationSchedule, self.anneal, "anneal setting")
        eraser = dataclass_from_settings(EraserSettings, self.eraser, "eraser setting")
        labeled = [c for c in LABELED_ERASER_CONDITIONS if c in self.conditions]
        if labeled and not eraser.label_column:
            raise ValueError(f"condition {labeled[0]!r} needs eraser.label_column: the training data's column "
                             "naming the unintended attribute (gender task: eraser.label_column=stereotyped_gender)")
        for layer, source in self.saes.items():
            if not str(layer).isdigit():
                raise ValueError(f"saes: {layer!r} is not a decoder layer index")
            sae_source(layer, source)
        needs_adapter = set(ADAPTER_CONDITIONS) & set(self.conditions)
        if needs_adapter and not self.adapter:
            raise ValueError(f"condition(s) {sorted(needs_adapter)} need `adapter` (a saved concept ablation folder)")
        if not needs_adapter:  # nothing reads the concept search's output: it is neither required nor recorded
            self.adapter = self.attribution = None
        if "top_k" in self.conditions and not self.attribution:
            raise ValueError("condition 'top_k' needs `attribution` (an attribution table JSON)")
        if "test_only" in self.conditions and "none" not in self.conditions:
            raise ValueError("condition 'test_only' evaluates the 'none' model: add 'none' to conditions")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Build from a mapping; unknown keys raise an error naming them."""
        return dataclass_from_settings(cls, data, "experiment setting")


def subsample(data: datasets.Dataset, size: int | None, seed: int = 0) -> datasets.Dataset:
    """A seeded random subset of `size` rows (all rows if None or larger)."""
    if size is None or size >= len(data):
        return data
    return data.shuffle(seed=seed).select(range(size))


def _adapter_latent_count(config: ConceptAblationConfig) -> int:
    return sum(len(v) for v in config.latents.values()) + sum(len(v) for v in config.directions.values())


def latent_pool(condition: str, table: list[LatentEffect], count: int) -> list[LatentEffect]:
    """The attribution rows `condition` takes its `count` latents from: the first `count` (``top_k``) or the top 100
    (``random``)."""
    return table[:min(count, 100)] if condition == "top_k" else table[:100]


def latents_for_condition(condition: str, table: list[LatentEffect], count: int, seed: int) -> dict[int, list[int]]:
    """``top_k``: the first `count` rows of the attribution table; ``random``: `count` drawn from its top 100."""
    if count > len(table[:100]):
        raise ValueError(f"{condition}: needs {count} latents but the attribution table has {len(table[:100])}")
    pool = latent_pool(condition, table, count)
    rows = pool if condition == "top_k" else random.Random(seed).sample(pool, count)
    chosen: dict[int, list[int]] = {}
    for row in rows:
        chosen.setdefault(row.layer, []).append(row.latent)
    return chosen


class ResultsFile:
    """The experiment's JSON results, rewritten atomically after every run."""

    #: settings that must match for runs to be mixed in one file (those of `OPTIONAL_SETTINGS` only where both set one)
    SAME_SETTINGS = ("model", "preset", "training", "train_size", "eval_size", "dtype", "anneal", "adapter", "saes",
                     "eraser")
    #: the adapter, the SAE sources of the ``random``/``top_k`` latents (which a recipe may leave to the adapter), and
    #: the eraser settings (which only the eraser conditions use, so a file may gain them with those conditions)
    OPTIONAL_SETTINGS = ("adapter", "saes", "eraser")
    #: settings that grow with each invocation: the file records every seed and condition it was run with
    ACCUMULATED_SETTINGS = ("seeds", "conditions")
    #: header keys holding content hashes (`data_fingerprint`: a hash per split; `inputs_record`: a ``path`` and
    #: ``sha256`` per input); a hash the file and the new header both have must match (what a difference means is
    #: given); a path may differ (a file moved or named otherwise holds the same content)
    FINGERPRINTS = {
        "data": "on other data (split(s) {changed} differ: another task setting, such as answer_form, seed or "
                "max_examples?)",
        "inputs": "made with another {changed} (other content, by its sha256: was the concept search redone, or a "
                  "task file edited?)",
    }

    def __init__(self, path: Path, header: dict[str, Any], machine: Mapping[str, Any] | None = None) -> None:
        """`machine` (`machine_record`) is stamped on every run added, so a file mixing machines says which ran
        what."""
        self.path = path
        self.machine = dict(machine) if machine else None
        header = json.loads(json.dumps(header, default=str))  # as it is saved (e.g. layer keys as strings)
        self.data = read_json(path) if path.exists() else {**header, "runs": []}
        if not isinstance(self.data.get("runs"), list) or not isinstance(self.data.get("config", {}), dict):
            raise ValueError(f"{path} is not a results file (it needs a 'runs' list and a 'config' object)")
        old, new = self.data.get("config", {}), header["config"]
        compared = [k for k in self.SAME_SETTINGS
                    if k in old and (k not in self.OPTIONAL_SETTINGS or old[k] and new.get(k))]
        check_settings({k: old[k] for k in compared}, {k: new.get(k) for k in compared}, where=path, what="runs",
                       advice="use another output_dir or delete the file")
        self.data["config"] = {**new, **{k: new.get(k) or old.get(k) for k in self.OPTIONAL_SETTINGS},
                               **{k: list(dict.fromkeys([*old.get(k, []), *new.get(k, [])]))
                                  for k in self.ACCUMULATED_SETTINGS if k in old or k in new}}
        for key, what in self.FINGERPRINTS.items():
            old_hashes, new_hashes = self.data.get(key) or {}, header.get(key) or {}
            changed = sorted(k for k in old_hashes.keys() & new_hashes.keys()
                             if _content_hash(old_hashes[k]) != _content_hash(new_hashes[k]))
            if changed:
                raise ValueError(f"{path} holds runs {what.format(changed=changed)}; "
                                 "use another output_dir or delete the file")
            if old_hashes or new_hashes:
                self.data[key] = {**old_hashes, **new_hashes}

    def done(self, condition: str, seed: int) -> bool:
        """Whether the file holds the run of (`condition`, `seed`)."""
        return any(r["condition"] == condition and r["seed"] == seed for r in self.data["runs"])

    def add(self, run: dict[str, Any]) -> dict[str, Any]:
        """Append a finished run (with this file's `machine`, and ``did_not_learn`` and ``val_p_chance``: whether its
        validation accuracy is at chance, `did_not_learn`), refresh the summary and rewrite the file atomically;
        return the run as recorded."""
        run = {**run, "did_not_learn": did_not_learn(run["val"]), "val_p_chance": chance_p_value(run["val"]),
               **({"machine": self.machine} if self.machine else {})}
        self.data["runs"].append(run)
        self.data["summary"] = summarize(self.data["runs"])
        write_json_atomic(self.path, self.data, indent=2)
        return run


def _content_hash(record: Any) -> Any:
    """The content hash of a fingerprint entry: an `inputs_record` entry's ``sha256``, or the entry itself (a split's
    hash)."""
    return record["sha256"] if isinstance(record, Mapping) else record


def machine_record(device: torch.device | str, num_processes: int = 1) -> dict[str, Any]:
    """Where and with what a run was made: the device (`device_name`), the number of processes and the versions of
    torch, transformers and this package (runs at the same settings on other machines differ by float rounding)."""
    return {"device": device_name(device), "processes": num_processes,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "hf_concept_ablation": __version__}}


def data_fingerprint(splits: Mapping[str, datasets.Dataset]) -> dict[str, str]:
    """A short hash of each split's prompts and answers, so that runs on other data are never mixed in one file."""
    return {name: _sha256(json.dumps([list(d["prompt"]), list(d["answer"])]).encode()) for name, d in splits.items()}


def _search_files(config: ExperimentConfig) -> dict[str, tuple[str, list[Path]]]:
    """The adapter folder and attribution table `config` names, as given, with the files they are read from."""
    files = {"adapter": (config.adapter, [Path(config.adapter) / CONFIG_NAME, Path(config.adapter) / WEIGHTS_NAME])
             if config.adapter else None,
             "attribution": (config.attribution, [Path(config.attribution)]) if config.attribution else None}
    return {name: given for name, given in files.items() if given}


def inputs_record(config: ExperimentConfig) -> dict[str, dict[str, str]]:
    """The ``inputs`` a results file records of the adapter and the attribution table `config` names, each by its
    ``path`` as given and the ``sha256`` of its content (the adapter's: of its config and weights, `files_sha256`),
    so that runs made with another concept search's output under the same path are never mixed in one file."""
    return {name: {"path": given, "sha256": files_sha256(paths)}
            for name, (given, paths) in _search_files(config).items()}


def scores_line(run: Mapping[str, Any]) -> str:
    """A recorded run's validation and OOD accuracy for the log, flagged where it did not learn the task."""
    flag = f"; did not learn the task (val at chance, p = {run['val_p_chance']:.2g})" if run["did_not_learn"] else ""
    return f"val {run['val']['accuracy']:.3f}, ood {run['ood']['accuracy']:.3f}{flag}"


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:16]


def _mean_sem(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, (var / len(values)) ** 0.5


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per condition: per-seed val and OOD accuracy (``report.MEASURED``), their means and OOD standard error, and the
    seeds whose model did not learn the task (``did_not_learn``: val accuracy at chance, `did_not_learn`)."""
    summary: dict[str, dict[str, Any]] = {}
    for condition in CONDITIONS:
        rows = sorted((r for r in runs if r["condition"] == condition), key=lambda r: r["seed"])
        if not rows:
            continue
        val = [r["val"]["accuracy"] for r in rows]
        ood = [r["ood"]["accuracy"] for r in rows]
        ood_mean, ood_sem = _mean_sem(ood)
        entry = {"seeds": [r["seed"] for r in rows], "val": val, "ood": ood,
                 "val_mean": _mean_sem(val)[0], "ood_mean": ood_mean, "ood_sem": ood_sem,
                 "did_not_learn": [r["seed"] for r in rows if did_not_learn(r["val"])]}
        if all("ood_ablated" in r for r in rows):
            entry["ood_ablated"] = [r["ood_ablated"]["accuracy"] for r in rows]
            entry["val_ablated"] = [r["val_ablated"]["accuracy"] for r in rows]
        summary[condition] = entry
    return summary


def _evaluate(model, tokenizer, splits: dict[str, datasets.Dataset], batch_size: int, ablated: bool) -> dict:
    """Every split's scores with the ablation off and, where `ablated`, on; every process of the run calls it and
    scores its share of the questions (`evaluate_multiple_choice` with ``distributed=True``)."""
    out = {}
    for name, data in splits.items():
        out[name] = evaluate_multiple_choice(model, tokenizer, data, batch_size=batch_size, ablation=False,
                                             desc=f"eval {name}", distributed=True)
        if ablated:
            out[f"{name}_ablated"] = evaluate_multiple_choice(model, tokenizer, data, batch_size=batch_size,
                                                              ablation=True, desc=f"eval {name} (ablated)",
                                                              distributed=True)
    return out


def _test_only_run(model: nn.Module, tokenizer: Any, adapter: str | os.PathLike, evals: dict[str, datasets.Dataset],
                   batch_size: int, seed: int) -> dict[str, Any]:
    """The ``test_only`` run of a plain model: evaluated with `adapter`'s ablation on, which is then removed."""
    handle = ConceptAblation.from_pretrained(model, adapter)
    try:
        scores = _evaluate(model, tokenizer, evals, batch_size, ablated=True)
    finally:
        handle.remove()
    return {"condition": "test_only", "seed": seed, "val": scores["val_ablated"], "ood": scores["ood_ablated"],
            "deployed": {k: scores[k] for k in ("val", "ood")}}


def searched_sae_sources(adapter: str | os.PathLike) -> dict[int, SAESource]:
    """The SAE source of every layer the concept search that wrote `adapter` attributed (its ``selection.json``):
    ``random`` and ``top_k`` may draw latents at any of them, also where the adapter ablates nothing. Empty for an
    adapter that no search wrote."""
    selection = Path(adapter) / SELECTION_NAME
    if not selection.is_file():
        return {}
    return {int(k): sae_source(k, v) for k, v in read_json(selection).get("sae_sources", {}).items()}


def check_launch(config: ExperimentConfig, state: PartialState) -> None:
    """Refuse a launch the recipes cannot run, naming why: FSDP1 (`fsdp_launch`), DeepSpeed ZeRO stage 3, and
    ``save_steps`` where `fine_tune` shards the model itself (`shards_itself`: FSDP on CPU processes)."""
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ValueError("DeepSpeed ZeRO stage 3 is not supported by the recipes: evaluating and saving a ZeRO-3 "
                         "partitioned model is untested (the recipes run a group of CPU processes without DeepSpeed); "
                         "launch with FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`), which shards the same "
                         "things, DDP, or DeepSpeed ZeRO stage 1 or 2")
    if fsdp_launch() and shards_itself(state) and config.save_steps:
        raise ValueError(f"save_steps={config.save_steps}: FSDP on CPU processes keeps no checkpoints to resume from "
                         "(the recipes shard the model themselves there, and the Trainer saves no optimizer state of "
                         "such a model); set save_steps=0, or launch on accelerators, where accelerate's FSDP saves "
                         "them")


def run_experiment(
    config: ExperimentConfig,
    data: datasets.DatasetDict,
    *,
    name: str,
    results_path: Path | None = None,
    siblings: Mapping[str, datasets.DatasetDict] | None = None,
    sibling_adapters: Mapping[str, str | os.PathLike] | None = None,
    concept_texts: Mapping[str, Sequence[str]] | None = None,
    task_files: Mapping[str, Mapping[str, str | None]] | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every (seed, condition) not yet in the results file; return the results data.

    `siblings` are other tasks with the same training set (e.g. the other intended question
    of a double multiple-choice pair): each ``none`` model is also evaluated on their splits
    and recorded in their results files (``<output_dir>/<sibling>.json``), so it is trained once;
    with ``test_only`` among the conditions, a sibling named in `sibling_adapters` also gets its
    ``test_only`` run from that model, evaluated with the sibling's own adapter. `concept_texts` (class name ->
    texts, e.g. female and male sentences) are what ``leace_contrast`` fits its erasers on. `task_files` (setting
    name -> ``path`` and ``sha256``, e.g. `hf_concept_ablation.tasks.gender_task_files`) are the files `data` was
    built from, recorded in the results file's ``inputs`` (and the siblings', built from the same files).
    """
    state = process_state()
    check_launch(config, state)
    out_dir = Path(config.output_dir)
    header = {"config": dataclasses.asdict(config)}
    train = subsample(data["train"], config.train_size)
    evals = {split: subsample(data[split], config.eval_size) for split in ("val", "ood")}
    train_fingerprint = data_fingerprint({"train": train})  # shared with the siblings, whose training set is the same
    machine = machine_record(state.device, state.num_processes)
    results = ResultsFile(results_path or out_dir / f"{name}.json",
                          {"name": name, **header, "data": {**train_fingerprint, **data_fingerprint(evals)},
                           "inputs": {**inputs_record(config), **(task_files or {})}},
                          machine=machine)
    plain_header = {"config": {**header["config"], "adapter": None, "attribution": None}}  # `none` uses no adapter
    run_settings = json.loads(json.dumps({  # what a checkpoint must have been made with to be resumed
        **{k: header["config"].get(k) for k in ResultsFile.SAME_SETTINGS},
        "data": results.data.get("data"), "inputs": results.data.get("inputs")}, default=str))
    sibling_evals = {n: {split: subsample(d[split], config.eval_size) for split in ("val", "ood")}
                     for n, d in (siblings or {}).items()}
    sibling_files = {n: ResultsFile(out_dir / f"{n}.json",
                                    {"name": n, **plain_header,
                                     "data": {**train_fingerprint, **data_fingerprint(sibling_evals[n])},
                                     "inputs": dict(task_files or {})},
                                    machine=machine)
                     for n in siblings or {}}
    sibling_adapters = dict(sibling_adapters or {})
    unknown = sorted(set(sibling_adapters) - set(sibling_files))
    if unknown:
        raise ValueError(f"sibling_adapters names {unknown}, which are not among the siblings {sorted(sibling_files)}")
    for n, d in (siblings or {}).items():
        other = subsample(d["train"], config.train_size)
        if other["prompt"] != train["prompt"] or other["answer"] != train["answer"]:
            raise ValueError(f"sibling task {n!r} does not have the same training set as {name!r}")
    preset = PRESETS[config.preset].replace(**config.training)
    table = load_attribution(config.attribution) if config.attribution else None
    caft_config = ConceptAblationConfig.from_pretrained(config.adapter) if config.adapter else None
    # what would otherwise fail after a training run: answers of any split that are not one token, latents to draw
    check_single_token(load_tokenizer(config.model), answer_strings({"train": train, **evals, **{
        f"{n}_{split}": d for n, splits in sibling_evals.items() for split, d in splits.items()}}))
    sae_sources = {**(searched_sae_sources(config.adapter) if config.adapter else {}),
                   **(caft_config.saes if caft_config else {}),
                   **{int(k): sae_source(k, v) for k, v in config.saes.items()}}
    for condition in sorted({"random", "top_k"} & set(config.conditions)):
        if not caft_config.directions:
            if table is None:
                raise ValueError(f"condition {condition!r} with a latent adapter needs `attribution` "
                                 "(an attribution table JSON)")
            count = _adapter_latent_count(caft_config)
            latents_for_condition(condition, table, count, seed=0)
            unknown = sorted({row.layer for row in latent_pool(condition, table, count)} - set(sae_sources))
            if unknown:
                raise ValueError(f"condition {condition!r} may draw latents at layer(s) {unknown}, which have no SAE "
                                 f"source: set `saes` in the experiment config (known: {sorted(sae_sources)})")
    eraser = EraserSettings(**config.eraser)
    if eraser.label_column and {*LABELED_ERASER_CONDITIONS, "random_eraser"} & set(config.conditions):
        if eraser.label_column not in train.column_names:
            raise ValueError(f"eraser.label_column {eraser.label_column!r} is not a column of the training data; "
                             f"columns: {train.column_names}")
        one_hot_labels(train[eraser.label_column])  # at least two values
    if "leace_contrast" in config.conditions and not concept_texts:
        raise ValueError("condition 'leace_contrast' needs contrast texts of the concept, which this task does not "
                         "give (a skyline run has no unintended concept)")
    for seed in config.seeds:
        for condition in [c for c in config.conditions if c in TRAINED_CONDITIONS]:
            test_only_now = condition == "none" and "test_only" in config.conditions
            needs_test_only = test_only_now and not results.done("test_only", seed)
            pending_siblings = [n for n, f in sibling_files.items() if condition == "none" and not f.done("none", seed)]
            sibling_test_only = [n for n in sibling_adapters if test_only_now and not sibling_files[n].done("test_only", seed)]
            if results.done(condition, seed) and not needs_test_only and not pending_siblings and not sibling_test_only:
                progress(f"[{name}] {condition} seed {seed}: already in {results.path}, skipped")
                if state.is_main_process and config.save_steps:  # left by a run stopped just after it was recorded
                    _remove_training_dir(training_dir(config, name, condition, seed))
                continue
            reasons = (["test_only"] if needs_test_only or sibling_test_only else []) + pending_siblings
            why = f" again, for {', '.join(reasons)}" if results.done(condition, seed) else ""
            processes = f", {state.num_processes} processes" if state.num_processes > 1 else ""
            progress(f"[{name}] training {condition}{why}, seed {seed} ({len(train)} examples{processes})")
            torch.manual_seed(seed)
            model, tokenizer = load_model(config.model, dtype=getattr(torch, config.dtype))
            callbacks = []
            if condition in ("caft", "caft_annealed"):
                ConceptAblation.from_pretrained(model, config.adapter)
                schedule = AblationSchedule(**config.anneal) if condition == "caft_annealed" else AblationSchedule()
                callbacks.append(AblationScheduleCallback(schedule))
            elif condition == "random" and caft_config.directions:
                inject_concept_ablation(model, random_directions_config(caft_config, seed))
                callbacks.append(AblationScheduleCallback())
            elif condition in ERASER_CONDITIONS:
                folder = eraser_adapter(model, tokenizer, out_dir / "erasers" / name, condition, eraser, train,
                                        concept_texts or {}, seed, state)
                ConceptAblation.from_pretrained(model, folder)
                callbacks.append(AblationScheduleCallback())
                if condition == "leace_refit":
                    callbacks.append(LeaceRefitCallback(tokenizer, train["prompt"], train[eraser.label_column],
                                                        eraser.refit_every, positions=eraser.positions))
            elif condition in ("random", "top_k"):
                latents = latents_for_condition(condition, table, _adapter_latent_count(caft_config), seed)
                inject_concept_ablation(model, _latent_config(latents, sae_sources, model, mode=caft_config.mode))
                callbacks.append(AblationScheduleCallback())
            model = prepare_model_for_training(model, preset)
            with _training_folder(config, name, condition, seed, run_settings, state) as (folder, resume_from):
                checkpoints = {"save_strategy": "steps", "save_steps": config.save_steps,
                               "save_total_limit": 1} if config.save_steps else {}
                args = training_arguments(preset, str(folder), seed=seed, num_processes=state.num_processes,
                                          **checkpoints)
                if resume_from:
                    progress(f"[{name}] {condition} seed {seed}: resuming from {resume_from}")
                fine_tune(model, tokenizer, train, args, callbacks=callbacks, resume_from_checkpoint=resume_from)
            # every process evaluates its share of the questions (a sharded model needs them all); the main one records
            if not results.done(condition, seed):
                handle = get_concept_ablation(model)
                run = {"condition": condition, "seed": seed,
                       **_evaluate(model, tokenizer, evals, config.eval_batch_size, ablated=handle is not None)}
                if handle is not None:
                    run["ablation"] = handle.config.to_dict()
                if condition in config.save_models:  # before the run is recorded, so a crash here redoes both
                    save_checkpoint(model, tokenizer, checkpoint_dir(config, name, condition, seed))
                if state.is_main_process:
                    progress(f"[{name}] {condition} seed {seed}: {scores_line(results.add(run))}")
            for sibling in pending_siblings:
                run = {"condition": condition, "seed": seed, "trained_for": name,
                       **_evaluate(model, tokenizer, sibling_evals[sibling], config.eval_batch_size, ablated=False)}
                if state.is_main_process:
                    progress(f"[{sibling}] {condition} seed {seed} (the model of {name}): "
                             f"{scores_line(sibling_files[sibling].add(run))}")
            for sibling in sibling_test_only:
                run = _test_only_run(model, tokenizer, sibling_adapters[sibling], sibling_evals[sibling],
                                     config.eval_batch_size, seed)
                if state.is_main_process:
                    sibling_files[sibling].add(run)
            if needs_test_only:
                run = _test_only_run(model, tokenizer, config.adapter, evals, config.eval_batch_size, seed)
                if state.is_main_process:
                    results.add(run)
            state.wait_for_everyone()
            if state.is_main_process and config.save_steps:
                _remove_training_dir(training_dir(config, name, condition, seed))
    return results.data


#: what a run's checkpoints were made with (in its `training_dir`): they are resumed only by a run of the same
RUN_SETTINGS_NAME = "run_settings.json"


def training_dir(config: ExperimentConfig, name: str, condition: str, seed: int) -> Path:
    """Where the Trainer of (`name`, `condition`, `seed`) keeps its checkpoints when ``config.save_steps`` asks for
    them."""
    return Path(config.output_dir) / "training" / name / f"{condition}-seed{seed}"


def _remove_training_dir(folder: Path) -> None:
    """Remove a recorded run's checkpoints, and the ``training/<name>`` folders above them once they are empty."""
    shutil.rmtree(folder, ignore_errors=True)
    for parent in (folder.parent, folder.parent.parent):
        try:
            parent.rmdir()
        except OSError:  # another run's checkpoints are still there
            return


@contextlib.contextmanager
def _training_folder(config: ExperimentConfig, name: str, condition: str, seed: int, settings: Mapping[str, Any],
                     state: Any) -> Iterator[tuple[Path, str | None]]:
    """The Trainer's output folder and the checkpoint to resume from: with ``config.save_steps``, `training_dir` and
    its last complete checkpoint (one cut short while being written has no ``trainer_state.json``), the folder
    emptied first if it holds checkpoints of other `settings` (made before the results file was changed or
    deleted); else a temporary folder (removed at the end) and None."""
    if not config.save_steps:
        with tempfile.TemporaryDirectory() as scratch:
            yield Path(scratch), None
        return
    folder = training_dir(config, name, condition, seed)
    if state.is_main_process:
        resume_folder(folder, settings, record=RUN_SETTINGS_NAME, what="checkpoints", recompute=True)
    state.wait_for_everyone()
    complete = {int(step): p for p in folder.glob("checkpoint-*")
                if (step := p.name.removeprefix("checkpoint-")).isdigit() and (p / "trainer_state.json").is_file()}
    yield folder, str(complete[max(complete)]) if complete else None


def eraser_adapter(model: nn.Module, tokenizer: Any, folder: Path, condition: str, settings: EraserSettings,
                   train: datasets.Dataset, concept_texts: Mapping[str, Sequence[str]], seed: int, state: Any) -> Path:
    """The saved eraser adapter of an eraser `condition` (``leace``: fitted on the training prompts labeled by
    ``settings.label_column``, each layer on the base model; ``leace_sequential``: the same, layer after layer with
    the erasers before it on; ``leace_refit``: as ``leace``, its ``fitted_on`` naming ``refit_every`` (the refits
    are `LeaceRefitCallback`'s); ``leace_contrast``: on `concept_texts`; ``random_eraser``: on the training prompts
    with random labels, seeded by `seed`, of the rank ``leace`` has), fitted on `model` (the base model) by the main
    process into a subfolder of `folder` named by what it is fitted on, unless one is there."""
    texts, labels = list(train["prompt"]), list(train[settings.label_column]) if settings.label_column else []
    if condition == "leace_contrast":
        texts = [t for ts in concept_texts.values() for t in ts]
        labels = [c for c, ts in concept_texts.items() for _ in ts]
    rank = len(set(labels)) - 1 if condition != "leace_contrast" and labels else 1
    fit_settings = {k: v for k, v in dataclasses.asdict(settings).items()  # the refits come later
                    if k != "refit_every" or condition == "leace_refit"}
    key = {"condition": condition, "settings": fit_settings, "data": texts_sha256(texts, labels),
           **({"seed": seed, "rank": rank} if condition == "random_eraser" else {})}
    target = folder / f"{condition}{f'-seed{seed}' if condition == 'random_eraser' else ''}-" \
                      f"{_sha256(json.dumps(key, sort_keys=True).encode())[:12]}"
    if state.is_main_process and not (target / CONFIG_NAME).is_file():
        common = {"layers": settings.layers, "positions": settings.positions}
        if condition == "random_eraser":
            adapter = random_eraser_config(model, tokenizer, texts, rank, seed, **common)
        else:
            source = {"source": "labels", "column": settings.label_column} \
                if condition in LABELED_ERASER_CONDITIONS else {"source": "contrast texts"}
            if condition == "leace_refit":
                source["refit_every"] = settings.refit_every
            adapter = leace_config(model, tokenizer, texts, labels, fitted_on=source,
                                   sequential=condition == "leace_sequential", **common)
        handle = inject_concept_ablation(model, adapter)
        with atomic_dir(target) as tmp:
            handle.save_pretrained(tmp)
        handle.remove()
    state.wait_for_everyone()
    return target


def random_directions_config(config: ConceptAblationConfig, seed: int) -> ConceptAblationConfig:
    """As many random unit directions per layer as `config` removes there (seeded), in projection mode
    with the same centers (mean or zero ablation alike)."""
    generator = torch.Generator().manual_seed(seed)
    directions = {layer: torch.nn.functional.normalize(torch.randn(d.shape, generator=generator), dim=-1)
                  for layer, d in sorted(config.directions.items())}
    return ConceptAblationConfig(layers=sorted(directions), mode="projection", directions=directions,
                                 centers={layer: c for layer, c in config.centers.items() if layer in directions},
                                 base_model_name_or_path=config.base_model_name_or_path,
                                 description=f"random directions, seed {seed}")


def checkpoint_dir(config: ExperimentConfig, name: str, condition: str, seed: int) -> Path:
    """Where `run_experiment` saves the model of (`name`, `condition`, `seed`) when asked to."""
    return Path(config.output_dir) / "models" / name / f"{condition}-seed{seed}"


def save_checkpoint(model: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
    """Save a fine-tuned model and tokenizer (and its concept ablation, if any, in ``concept_ablation/``); the folder
    appears only once everything is written. Every process of the run calls it: the main process writes, and a
    sharded (FSDP2) model's full state dict is first gathered onto it, so the folder loads without FSDP."""
    sharded = any(isinstance(module, FSDPModule) for module in model.modules())
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
        if sharded else None
    if process_state().is_main_process:
        with atomic_dir(directory) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            handle = get_concept_ablation(model)
            if handle is not None:
                handle.save_pretrained(tmp / "concept_ablation")
    process_state().wait_for_everyone()


def _latent_config(latents: dict[int, list[int]], sources: dict[int, SAESource], model,
                   mode: str = "latent") -> ConceptAblationConfig:
    missing = sorted(set(latents) - set(sources))
    if missing:
        raise ValueError(f"no SAE source for layer(s) {missing}: set `saes` in the experiment config (known: {sorted(sources)})")
    return ConceptAblationConfig(layers=sorted(latents), latents=latents, saes={l: sources[l] for l in latents},
                                 mode=mode, base_model_name_or_path=model.config.name_or_path)
