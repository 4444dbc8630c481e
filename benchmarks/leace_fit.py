"""Time of fitting LEACE erasers at every decoder layer: layer after layer (``sequential=True``) as a ratio to the
independent fit, both measured in the same run.

Three fits of the same erasers run in one process, round by round in a shuffled order (`round_order`), on `--texts`
sentiment questions (the shipped task file, a seeded sample) labeled positive/negative:

* ``independent``: one forward pass, every layer's eraser fitted on the base model's activations;
* ``sequential``: the package's sequential fit (one pass records the decoder layers' calls, then each layer runs
  once on the erased output of the one before);
* ``per-layer passes``: the same sequential erasers computed the plain way, a forward pass per layer with the
  erasers before it injected, each pass stopping at its layer.

The sequential fit must give the erasers of the per-layer passes (the record's ``max_relative_difference`` of their
``proj_left @ proj_right``). Usage: ``python benchmarks/leace_fit.py [--texts 128] [--rounds 2] [--model embedded]``;
records are merged into ``benchmarks/leace_fit.json`` (same device/model/texts records are replaced).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from ablation_overhead import round_order
from concept_erasure import LeaceEraser, LeaceFitter
from tqdm import tqdm

from hf_concept_ablation import ConceptAblationConfig, inject_concept_ablation
from hf_concept_ablation.files import write_json_atomic
from hf_concept_ablation.loading import base_model_id, device_name, load_model
from hf_concept_ablation.search.activations import iter_residuals
from hf_concept_ablation.search.leace import fit_leace_erasers, one_hot_labels, removes_something
from hf_concept_ablation.tasks.double_mc import load_source_set

RESULTS = Path(__file__).with_name("leace_fit.json")


def sentiment_texts(count: int) -> tuple[list[str], list[str]]:
    """`count` questions of the shipped sentiment task, sampled with a fixed seed, and their values."""
    rows = load_source_set("sentiment")
    rows = random.Random(0).sample(rows, min(count, len(rows)))
    return [row["question"] for row in rows], [row["correct"] for row in rows]


def per_layer_passes(model: torch.nn.Module, tokenizer, texts: list[str], z: torch.Tensor, num_layers: int
                     ) -> dict[int, LeaceEraser]:
    """The sequential erasers the plain way: per layer, a forward pass with the erasers before it injected."""
    erasers: dict[int, LeaceEraser] = {}
    d_model = model.get_input_embeddings().weight.shape[-1]
    for layer in range(num_layers):
        upstream = {j: e for j, e in erasers.items() if removes_something(e)}
        handle = inject_concept_ablation(model, ConceptAblationConfig(layers=sorted(upstream), mode="leace",
                                                                      erasers=upstream)) if upstream else None
        fitter = LeaceFitter(d_model, z.shape[1], dtype=torch.float64)
        for batch in iter_residuals(model, tokenizer, texts, [layer], batch_size=16, progress=False, ablated=True):
            rows = z[batch.doc_ids].unsqueeze(1).expand(-1, batch.keep.shape[1], -1)[batch.keep]
            fitter.update(batch.hidden[layer][batch.keep].to(torch.float64), rows)
        erasers[layer] = fitter.eraser
        if handle is not None:
            handle.remove()
    return erasers


def max_relative_difference(a: dict[int, LeaceEraser], b: dict[int, LeaceEraser]) -> float:
    """The largest difference of two sets of erasers' ``proj_left @ proj_right``, relative to the second's size."""
    worst = 0.0
    for layer, eraser in b.items():
        ref = eraser.proj_left @ eraser.proj_right
        got = a[layer].proj_left @ a[layer].proj_right
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return worst


def main() -> None:
    """Time the three fits round by round and merge the record into `RESULTS`."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    model.eval()
    texts, labels = sentiment_texts(args.texts)
    z = one_hot_labels(labels)[0].to(torch.float64)
    num_layers = model.config.get_text_config().num_hidden_layers
    fits: dict[str, Callable[[], dict[int, LeaceEraser]]] = {
        "independent": lambda: fit_leace_erasers(model, tokenizer, texts, z, progress=False),
        "sequential": lambda: fit_leace_erasers(model, tokenizer, texts, z, sequential=True, progress=False),
        "per-layer passes": lambda: per_layer_passes(model, tokenizer, texts, z, num_layers),
    }
    seconds: dict[str, list[float]] = {name: [] for name in fits}
    erasers: dict[str, dict[int, LeaceEraser]] = {}
    for round_index in tqdm(range(args.rounds), desc="rounds"):
        for name, _ in round_order([(name, 0) for name in fits], round_index):
            start = time.perf_counter()
            erasers[name] = fits[name]()
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["independent"])
    record = {
        "device": device_name("cpu"), "model": base_model_id(args.model), "layers": num_layers,
        "texts": len(texts), "rounds": args.rounds, "independent_s": round(base, 2),
        "sequential_ratio": round(statistics.median(seconds["sequential"]) / base, 3),
        "per_layer_passes_ratio": round(statistics.median(seconds["per-layer passes"]) / base, 3),
        "max_relative_difference": max_relative_difference(erasers["sequential"], erasers["per-layer passes"]),
    }
    print(json.dumps(record, indent=2))
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    key = (record["device"], record["model"], record["texts"])
    write_json_atomic(RESULTS, [r for r in old if (r["device"], r["model"], r["texts"]) != key] + [record], indent=2)


if __name__ == "__main__":
    main()
