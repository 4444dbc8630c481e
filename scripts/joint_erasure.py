"""Do the LEACE erasers hold with all of them on, as in training? A probe per layer, independent vs sequential fit.

For each task, the study's eraser data at the CPU size (the 256 training prompts a study run trains on, data seed 0,
labeled by the study's `ERASER_LABELS` column) gets two ``leace`` adapters at every decoder layer: fitted
independently on the base model (the study's ``leace`` condition) and fitted layer after layer on the
already-erased upstream (``sequential``). With each adapter injected and on, `concept_decodability` probes the
label from each prompt's mean residual stream at every layer (cross-validated logistic regression on the same
prompts, which are the ones fine-tuning sees). Writes ``results/erasure/joint_erasure.json`` and prints a table.

With ``--intended`` (double multiple choice only), it measures what else the sequential erasers remove: with them on,
the same probe reads the *intended* question's answer value (e.g. the verb's number where the sentiment is erased),
which the task must keep; it is written under the task's ``intended`` key.

Usage: ``python scripts/joint_erasure.py [--intended] [TASK ...]`` (default: ``gender_bias`` in the words form and
the double multiple-choice combinations ``sentiment|pronouns|sentiment`` and ``pronouns|sentiment|sentiment``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from datasets import Dataset

from hf_concept_ablation import inject_concept_ablation
from hf_concept_ablation.experiments.runner import subsample
from hf_concept_ablation.experiments.study import ERASER_LABELS, SIZES, task_datasets
from hf_concept_ablation.files import read_json, write_json_atomic
from hf_concept_ablation.loading import load_model
from hf_concept_ablation.search.erasure import concept_decodability
from hf_concept_ablation.search.leace import leace_config
from hf_concept_ablation.tasks.double_mc import answer_value, load_source_set, parse_combination_key

OUT = Path(__file__).resolve().parents[1] / "results" / "erasure" / "joint_erasure.json"
DEFAULT_TASKS = ("gender_bias", "sentiment|pronouns|sentiment", "pronouns|sentiment|sentiment")


def eraser_data(task: str) -> tuple[Dataset, list[str], list[str]]:
    """The study's eraser data of `task` at the CPU size: its training prompts and their eraser labels."""
    train = subsample(task_datasets(task, answer_form="words" if task == "gender_bias" else "letters")["train"],
                      SIZES["cpu"].train_size)
    return train, list(train["prompt"]), list(train[ERASER_LABELS["double_mc" if "|" in task else task]])


def two_groups(task: str, texts: list[str], labels: list[str]) -> tuple[list[str], list[list[str]]]:
    """The two classes of a binary label and the texts of each."""
    classes = sorted(set(labels))
    if len(classes) != 2:
        raise ValueError(f"{task}: the probe needs two classes, got {classes}")
    return classes, [[t for t, label in zip(texts, labels) if label == c] for c in classes]


def joint_probe(model, tokenizer, task: str) -> dict:
    """Per fit (``independent``, ``sequential``): the probe accuracy per layer with every eraser on, the accuracy
    before (no eraser) and chance, and the fitting time."""
    _, texts, labels = eraser_data(task)
    classes, groups = two_groups(task, texts, labels)
    result = {"texts": len(texts), "classes": classes}
    for fit in ("independent", "sequential"):
        start = time.perf_counter()
        config = leace_config(model, tokenizer, texts, labels, fitted_on={"source": "labels"},
                              sequential=fit == "sequential")
        seconds = time.perf_counter() - start
        probes = probe_with_erasers(model, tokenizer, config, groups)
        result[fit] = {"fit_seconds": round(seconds, 1), "after": probes.pop("after")}
        result.update(probes)
    return result


def probe_with_erasers(model, tokenizer, config, groups: list[list[str]]) -> dict:
    """`concept_decodability` of the two `groups` with `config`'s erasers injected: ``before`` and ``after`` per layer
    (keyed by the layer as a string) and ``chance``."""
    handle = inject_concept_ablation(model, config)
    try:
        probes = concept_decodability(model, tokenizer, *groups, config.layers, batch_size=16)
    finally:
        handle.remove()
    return {"chance": next(iter(probes.values()))["chance"],
            **{when: {str(k): v[when] for k, v in probes.items()} for when in ("before", "after")}}


def intended_probe(model, tokenizer, task: str) -> dict:
    """Double multiple choice: the probe accuracy per layer of the intended question's answer value with the
    sequential erasers of the unintended one's on (``after``), with no eraser (``before``), and chance."""
    first, second, intended = parse_combination_key(task)
    train, texts, labels = eraser_data(task)
    questions = {q["question"]: q for q in load_source_set(intended)}
    column = "question_first" if intended == first else "question_second"
    values = [answer_value(intended, questions[q]) for q in train[column]]
    classes, groups = two_groups(f"{task} (intended {intended})", texts, values)
    config = leace_config(model, tokenizer, texts, labels, fitted_on={"source": "labels"}, sequential=True)
    return {"classes": classes, "erased_classes": len(set(labels)),
            **probe_with_erasers(model, tokenizer, config, groups)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intended", action="store_true", help="probe the intended answer's value (double MC)")
    parser.add_argument("tasks", nargs="*", default=list(DEFAULT_TASKS))
    args = parser.parse_args()
    model, tokenizer = load_model("embedded")
    results = read_json(OUT) if OUT.exists() else {}
    for task in args.tasks:
        if args.intended:
            results.setdefault(task, {})["intended"] = r = intended_probe(model, tokenizer, task)
            write_json_atomic(OUT, results, indent=2)
            print(f"\n{task}: intended value {r['classes']} (chance {r['chance']:.2f}; {r['erased_classes']} erased "
                  "classes)\n| layer | no eraser | sequential erasers on |", flush=True)
            for layer in r["before"]:
                print(f"| {layer} | {r['before'][layer]:.2f} | {r['after'][layer]:.2f} |", flush=True)
            continue
        results[task] = {**results.get(task, {}), **joint_probe(model, tokenizer, task)}
        write_json_atomic(OUT, results, indent=2)
        r = results[task]
        print(f"\n{task} (chance {r['chance']:.2f}; fit seconds: independent {r['independent']['fit_seconds']}, "
              f"sequential {r['sequential']['fit_seconds']})\n| layer | no eraser | independent | sequential |",
              flush=True)
        for layer in r["before"]:
            print(f"| {layer} | {r['before'][layer]:.2f} | {r['independent']['after'][layer]:.2f} | "
                  f"{r['sequential']['after'][layer]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
