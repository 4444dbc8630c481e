"""Where a fine-tuning step's time goes, by operator, in plain and ablated modes (`torch.profiler`).

Runs the benchmark's step (`ablation_overhead.make_step`: the embedded model, a random-token
batch, AdamW with lr 0) in each mode, the modes interleaved over rounds in the benchmark's shuffled
order (`ablation_overhead.round_order`, so no mode always runs first), profiles two steps per
mode and round, and prints each mode's self CPU time per step beside plain fine-tuning's, with
the operators whose time differs most. Also times the ablation module alone (forward and
backward of one decoder layer's output), which is the ablation's own arithmetic.

Usage: ``python benchmarks/profile_step.py [--modes latent projection] [--layers all] [--default-cpu]``
(the CPU settings of ``ablation_overhead.py`` apply: freed memory kept in the heap, subnormals
flushed to zero, unless ``--default-cpu``).
"""

from __future__ import annotations

import argparse
import collections
import resource
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ablation_overhead import (
    NUM_LATENTS,
    load_bench_model,
    make_step,
    parse_layers,
    random_sae,
    restart_with_cpu_settings,
    round_order,
)

from hf_concept_ablation.adapter.layer import ConceptAblationLayer
from hf_concept_ablation.experiments.training import DEFAULT_PRESET, PRESETS

FAULTS = "minor page faults"


def operator_times(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace,
                   modes: list[str]) -> dict[str, collections.Counter]:
    """Self CPU time (microseconds) per operator and step of each mode, over `args.rounds` rounds in a shuffled
    order (`round_order`); the key ``"minor page faults"`` counts the process's minor page faults per step instead."""
    totals = {mode: collections.Counter() for mode in modes}
    for round_index in range(args.rounds):
        for mode, _ in round_order([(mode, args.width) for mode in modes], round_index):
            step, detach = make_step(model, tokenizer, mode, args.width, args)
            step()  # untimed: allocates the optimizer state
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(2):
                    step()
            totals[mode][FAULTS] += (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (2 * args.rounds)
            for event in prof.key_averages():
                totals[mode][event.key] += event.self_cpu_time_total / (2 * args.rounds)
            detach()
    return totals


def module_time(mode: str, width: int, batch: int, seq: int, d_model: int = 640, repeats: int = 200) -> float:
    """Median seconds of one ablation module's forward and backward on a ``[batch, seq, d_model]`` tensor."""
    sae = random_sae(d_model, width, seed=0, device=torch.device("cpu"))
    layer = ConceptAblationLayer.from_sae(sae, list(range(0, width, width // NUM_LATENTS))[:NUM_LATENTS], mode)
    x = torch.randn(batch, seq, d_model, requires_grad=True)
    keep, grad = torch.ones(batch, seq, dtype=torch.bool), torch.randn(batch, seq, d_model)
    times = []
    for _ in range(repeats + 20):
        start = time.perf_counter()
        layer(x, keep).backward(grad)
        times.append(time.perf_counter() - start)
        x.grad = None
    return statistics.median(times[20:])


def main() -> None:
    """Print each mode's operator times against plain fine-tuning's, and the ablation module's own time."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=["latent", "projection"], default=["latent", "projection"])
    parser.add_argument("--layers", nargs="+", default=["3", "7", "11", "15"])
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="operators listed per mode")
    parser.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                        help="the training preset whose trainable parameters are trained")
    parser.add_argument("--default-cpu", action="store_true")
    args = parser.parse_args()
    if not args.default_cpu:
        restart_with_cpu_settings()
    model, tokenizer = load_bench_model("embedded", "cpu", preset=args.preset)
    args.layers = parse_layers(args.layers, model)
    totals = operator_times(model, tokenizer, args, ["plain", *args.modes])
    faults = {mode: totals[mode].pop(FAULTS) for mode in totals}
    plain = totals["plain"]
    print(f"plain: {sum(plain.values()) / 1e6:.3f} s self CPU time per step, {faults['plain']:.0f} minor page faults")
    for mode in args.modes:
        ops = totals[mode]
        total, alone = sum(ops.values()), module_time(mode, args.width, args.batch, args.seq)
        print(f"\n{mode}: {total / 1e6:.3f} s per step, x{total / sum(plain.values()):.3f} plain's; the module alone "
              f"(forward + backward of one layer): {alone * 1e3:.2f} ms, x {len(args.layers)} layers; "
              f"{faults[mode]:.0f} minor page faults per step")
        for key in sorted(set(ops) | set(plain), key=lambda k: abs(ops[k] - plain[k]), reverse=True)[:args.top]:
            print(f"  {key:<48} {plain[key] / 1e3:9.1f} ms -> {ops[key] / 1e3:9.1f} ms")


if __name__ == "__main__":
    main()
