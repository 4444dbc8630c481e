"""Step-time and peak-memory overhead of concept ablation against plain fine-tuning.

Modes: ``latent`` (exact sparse), ``projection``, and ``naive`` (full SAE encode, zero,
decode, plus error term at every hooked layer), each as a ratio to plain fine-tuning; and
``attribution`` (equation 1 over all hooked layers' SAEs) as a ratio to a plain forward
and backward pass over the same prompts. Ratios are measured in the same run:

* step time: all modes run in one process, interleaved round by round, their order shuffled
  each round (so none always runs first or after the same one), ``--steps`` timed steps per mode and
  round, so a change in machine load hits every mode alike; the ratio is of medians over all
  timed steps;
* peak memory: each mode runs a few steps in its own subprocess; the ratio is of the
  processes' peak resident memory during those steps (sampled).

  On a GPU both come from ``max_memory_allocated`` in the timing process itself (each
  mode's objects are freed before the next is measured), which saves a model load per mode.

On a CPU the step times are taken with two settings that keep work which is not the ablation's
out of them (``--default-cpu`` leaves both as they are; docs/benchmarks.md):

* glibc's allocator keeps freed memory in the heap (``MALLOC_MMAP_MAX_=0``,
  ``MALLOC_TRIM_THRESHOLD_``): by default every block over 32 MB (the gradients, the optimizer's
  temporaries) is mapped from the kernel and unmapped again each step, and the page faults of
  mapping it anew made a step of the embedded model take 4.6-12 s instead of 2.6-3.3 s;
* subnormal floats are flushed to zero (`torch.set_flush_denormal`, before any import may start
  torch's worker threads, as the mode is per thread): subnormal
  arithmetic (AdamW's square roots and divisions of second moments that underflow, among others)
  cost up to 4.6x in one mode's profile and not in another's, depending on the exact values.

Peak memory is measured with the default allocator, as a user's process has it.

Random sae-lens JumpReLU SAEs stand in for trained ones (cost does not depend on the
weights). Usage: ``python benchmarks/ablation_overhead.py [--widths 16384 65536 262144]
[--modes latent projection] [--layers all] [--model gemma-2-2b-shape --device cuda] ...``
(``--layers all`` hooks every decoder layer; only the baselines the modes need are run);
records are merged into ``benchmarks/ablation_overhead.json`` (same device/model/width/mode/layers
records are replaced).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_concept_ablation import (
    ConceptAblationConfig,
    find_decoder_layers,
    inject_concept_ablation,
)
from hf_concept_ablation.adapter.layer import (
    full_sae_ablation,
    layer_hidden,
    with_layer_hidden,
)
from hf_concept_ablation.experiments.training import DEFAULT_PRESET, PRESETS, prepare_model_for_training
from hf_concept_ablation.files import write_json_atomic
from hf_concept_ablation.loading import (
    base_model_id,
    device_name,
    load_model,
    resolve_model_path,
)

RESULTS = Path(__file__).with_name("ablation_overhead.json")
#: glibc malloc settings that keep freed memory in the heap instead of unmapping it (see the module doc)
KEEP_HEAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
#: marks a process started with the CPU settings (`restart_with_cpu_settings`)
CPU_SETTINGS_MARK = "HF_CONCEPT_ABLATION_BENCH_CPU_SETTINGS"
#: how that process starts: subnormals flushed to zero before any import may start torch's CPU worker threads (the
#: floating-point mode is per thread)
_LAUNCHER = ("import os, runpy, sys, torch; torch.set_flush_denormal(True); sys.argv = sys.argv[1:]; "
             "sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0]))); "
             "runpy.run_path(sys.argv[0], run_name='__main__')")


def restart_with_cpu_settings() -> None:
    """Run this script again in a process with the CPU settings of the module doc, unless this is that process."""
    if os.environ.get(CPU_SETTINGS_MARK) != "1":
        os.execve(sys.executable, [sys.executable, "-c", _LAUNCHER, *sys.argv],
                  {**os.environ, **KEEP_HEAP, CPU_SETTINGS_MARK: "1"})


NUM_LATENTS = 10
#: ``--model`` names of randomly initialised models with a public model's shape (the embedded
#: model's tokenizer; vocabulary padded to its size). Cost does not depend on the weights.
SHAPES = {
    "gemma-2-2b-shape": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                             num_key_value_heads=4, head_dim=256, vocab_size=262144),
}


def default_preset(spec: str) -> str:
    """The training preset a benchmark of `spec` trains with: the paper's full fine-tuning for a `SHAPES` model,
    else the recipes' default (for the embedded model: its embeddings frozen)."""
    return "paper" if spec in SHAPES else DEFAULT_PRESET


def load_bench_model(spec: str, device: str | None, tokenizer_path: str | None = None, preset: str | None = None
                     ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model to benchmark, in training mode with the parameters `preset` trains (default: `default_preset`):
    a `load_model` spec, or a name in `SHAPES` (random weights, built on `device`, with the tokenizer at
    `tokenizer_path`, by default the embedded model's)."""
    if spec not in SHAPES:
        model, tokenizer = load_model(spec, device=device)
    else:
        from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or resolve_model_path("embedded"))
        with torch.device(device or "cpu"):
            model = Gemma2ForCausalLM(Gemma2Config(**SHAPES[spec]))
        model.config.name_or_path = spec
    return prepare_model_for_training(model.train(), PRESETS[preset or default_preset(spec)]), tokenizer


def random_sae(d_in: int, width: int, seed: int, device: torch.device) -> JumpReLUSAE:
    """A JumpReLU SAE with random weights of the given width, made on `device`.

    Built on the meta device and filled here: sae-lens's own initialisation would be
    overwritten anyway, and at 262k width it costs more than the step being timed.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=width, device="meta")).to_empty(device=device).to(device)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, width, generator=gen, device=device) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(width, d_in, generator=gen, device=device) / width**0.5)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(0.5)
    return sae


def random_saes(model: PreTrainedModel, width: int, layers: list[int]) -> dict[int, JumpReLUSAE]:
    """One seeded random SAE of `width` per layer, on the model's device."""
    d_model = model.config.get_text_config().hidden_size
    return {layer: random_sae(d_model, width, seed=layer, device=model.device) for layer in layers}


def attach(model: PreTrainedModel, mode: str, width: int, layers: list[int],
           saes: dict[int, JumpReLUSAE] | None = None) -> Callable[[], object]:
    """Attach one benchmark mode to `model` (with `saes`, or new random ones); returns a function that detaches it."""
    if mode == "plain":
        return lambda: None
    saes = saes or random_saes(model, width, layers)
    latents = list(range(0, width, width // NUM_LATENTS))[:NUM_LATENTS]
    if mode == "naive":
        _, decoder_layers = find_decoder_layers(model)

        def hook_for(sae):
            def hook(_module, _args, output):
                return with_layer_hidden(output, full_sae_ablation(sae, latents, layer_hidden(output)))

            return hook

        handles = [decoder_layers[l].register_forward_hook(hook_for(saes[l]), prepend=True) for l in layers]
        return lambda: [h.remove() for h in handles]
    config = ConceptAblationConfig(layers=layers, latents={l: latents for l in layers}, mode=mode, skip_token_ids=[])
    ablation = inject_concept_ablation(model, config, saes=saes)
    del saes
    return ablation.remove


def make_batch(vocab: int, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed random-token batch; the label is the last token (the loss is taken at the last position)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, seq), generator=gen).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, -1]}


def train_step(model: PreTrainedModel, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    """One fine-tuning step with the CAFT loss (cross-entropy at the last position)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1).logits
    loss = torch.nn.functional.cross_entropy(logits[:, -1].float(), batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


ATTRIBUTION_MODES = ("forward_backward", "attribution")
UNHOOKED = ("plain", "forward_backward")  #: modes that use no SAE
BASELINE = {"latent": "plain", "projection": "plain", "naive": "plain", "attribution": "forward_backward"}


def make_step(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, mode: str, width: int,
              args: argparse.Namespace, saes: dict[int, JumpReLUSAE] | None = None) -> tuple[Callable[[], object], Callable[[], object]]:
    """A zero-argument function running one step of `mode`, and a function undoing its set-up.

    Fine-tuning modes run a CAFT training step on a random-token batch; ``forward_backward``
    and ``attribution`` run `attribute_latents` on real gender prompts, without and with SAEs.
    """
    device = next(model.parameters()).device
    if mode in ATTRIBUTION_MODES:
        from hf_concept_ablation.search.attribution import attribute_latents
        from hf_concept_ablation.tasks import build_gender_datasets

        data = build_gender_datasets()["train"].select(range(args.batch))
        saes = (saes or random_saes(model, width, args.layers)) if mode == "attribution" else {}
        return (lambda: attribute_latents(model, tokenizer, data, saes, batch_size=args.batch)), (lambda: None)
    detach = attach(model, mode, width, args.layers, saes)
    batch = make_batch(model.config.get_text_config().vocab_size, args.batch, args.seq, device)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=0.0, weight_decay=0.0)  # real step cost; weights stay put
    return (lambda: train_step(model, optimizer, batch)), detach


def round_order(configs: list[tuple[str, int]], round_index: int) -> list[tuple[str, int]]:
    """The modes of one round: `configs` shuffled, seeded by the round's index (so no mode always runs first, or
    after the same one)."""
    order = list(configs)
    random.Random(round_index).shuffle(order)
    return order


def time_modes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace,
               configs: list[tuple[str, int]]) -> dict[tuple[str, int], float]:
    """Median step time of each (mode, width) over ``args.steps`` timed steps per round, the modes interleaved
    round by round in this process in a shuffled order (`round_order`).

    Each width's random SAEs are built once, before the rounds, and kept (at 262k they are
    gigabytes; a run that built them each round gave latent mode 0.54x, against 1.10x and 1.12x
    otherwise). Each round attaches the mode, runs one untimed step (it allocates the optimizer
    state), then times the next ones.
    """
    device = next(model.parameters()).device
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    saes = {w: random_saes(model, w, args.layers) for w in sorted({w for m, w in configs if m not in UNHOOKED})}
    for round_index in tqdm(range(args.warmup + args.rounds), desc="timing rounds"):
        for mode, width in round_order(configs, round_index):
            step, detach = make_step(model, tokenizer, mode, width, args, saes.get(width))
            step()  # untimed: the first step allocates the optimizer state
            _sync(device)
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                _sync(device)
                if round_index >= args.warmup:
                    times[(mode, width)].append(time.perf_counter() - start)
            detach()
            del step, detach  # free this mode's optimizer state before the next one is built
    return {c: statistics.median(v) for c, v in times.items()}


def cuda_peak_memory(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace,
                     mode: str, width: int) -> float | str:
    """Peak GPU memory (bytes) of two steps of one mode in this process (model weights included), or
    "out of memory"."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    detach = None
    try:
        step, detach = make_step(model, tokenizer, mode, width, args)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())
    except torch.OutOfMemoryError:
        return "out of memory"
    finally:
        if detach is not None:
            detach()  # also after running out of memory, so the next mode starts clean


def peak_memory_of(args: argparse.Namespace, mode: str, width: int) -> float | str:
    """Peak memory (bytes) of a subprocess running a few steps of one mode, or why it failed
    (e.g. killed for lack of memory: a result too, recorded instead of a ratio)."""
    cmd = [sys.executable, __file__, "--_memory-probe", mode, str(width), "--model", args.model,
           "--batch", str(args.batch), "--seq", str(args.seq), "--layers", *map(str, args.layers), "--preset", args.preset]
    if args.device:
        cmd += ["--device", args.device]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    env = {k: v for k, v in os.environ.items() if k not in (*KEEP_HEAP, CPU_SETTINGS_MARK)}  # as a user's process
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        killed = done.returncode == -9 or "out of memory" in done.stderr.lower()
        return "out of memory" if killed else f"failed (exit {done.returncode}): {done.stderr.strip()[-200:]}"
    return float(done.stdout.strip().splitlines()[-1])


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 5 ms."""

    def __enter__(self) -> PeakRSS:
        import threading

        import psutil

        self.peak, self._stop = 0, threading.Event()
        process = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory_probe(args: argparse.Namespace, mode: str, width: int) -> None:
    """Print the peak resident memory of two steps of one mode (run in its own process)."""
    model, tokenizer = load_bench_model(args.model, args.device, args.tokenizer, args.preset)
    args.layers = parse_layers(args.layers, model)
    step, _ = make_step(model, tokenizer, mode, width, args)
    with PeakRSS() as rss:
        for _ in range(2):
            step()
    print(rss.peak)


def memory_ratio(peak: float | str, baseline: float | str) -> float | str:
    """``peak / baseline``, or why there is none (the run, or its baseline, failed or ran out of memory)."""
    if not isinstance(peak, float):
        return peak
    if not isinstance(baseline, float):
        return f"baseline {baseline}"
    return round(peak / baseline, 4)


def record_key(record: dict) -> tuple:
    """What makes two records the same measurement: device, model, SAE width, mode and hooked layers."""
    return (record["device"], record["model"], record["sae_width"], record["mode"], tuple(record.get("layers", ())))


def merge_records(new: list[dict]) -> None:
    """Replace records with the same `record_key`; write atomically."""
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    keys = {record_key(r) for r in new}
    kept = [r for r in old if record_key(r) not in keys]
    write_json_atomic(RESULTS, kept + new, indent=2)


def parse_layers(values: list[str], model: PreTrainedModel) -> list[int]:
    """The hooked layers: the given indices, or every decoder layer for ``all``."""
    if values == ["all"]:
        return list(range(model.config.get_text_config().num_hidden_layers))
    return [int(v) for v in values]


def main() -> None:
    """Time every (mode, width), measure its peak memory, and merge the ratios into the results file."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help=f"a model spec, or one of {sorted(SHAPES)}")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for the shape models (default: the embedded model's)")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="the training preset whose trainable parameters are trained (default: paper for a shape "
                             f"model, else {DEFAULT_PRESET}, the recipes' default, which freezes the embeddings)")
    parser.add_argument("--widths", type=int, nargs="+", default=[16384, 65536, 262144])
    parser.add_argument("--modes", nargs="+", choices=list(BASELINE), default=list(BASELINE))
    parser.add_argument("--layers", nargs="+", default=["3", "7", "11", "15"],
                        help="the hooked layers' indices, or 'all' (every decoder layer)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--default-cpu", action="store_true",
                        help="on a CPU, leave glibc's allocator and subnormal floats as they are (default: keep freed "
                             "memory in the heap, flush subnormals to zero)")
    parser.add_argument("--_memory-probe", nargs=2, metavar=("MODE", "WIDTH"), dest="memory_probe")
    args = parser.parse_args()
    args.preset = args.preset or default_preset(args.model)
    on_cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    if on_cpu and not args.default_cpu and not args.memory_probe:
        restart_with_cpu_settings()
    if args.memory_probe:
        memory_probe(args, args.memory_probe[0], int(args.memory_probe[1]))
        return
    configs = [(base, 0) for base in UNHOOKED if base in {BASELINE[m] for m in args.modes}]
    configs += [(m, w) for w in args.widths for m in args.modes]
    model, tokenizer = load_bench_model(args.model, args.device, args.tokenizer, args.preset)
    args.layers = parse_layers(args.layers, model)
    step = time_modes(model, tokenizer, args, configs)
    if next(model.parameters()).device.type == "cuda":
        memory = {c: cuda_peak_memory(model, tokenizer, args, *c) for c in tqdm(configs, desc="peak memory")}
    else:
        del model
        gc.collect()
        memory = {c: peak_memory_of(args, *c) for c in tqdm(configs, desc="peak memory")}
    records = []
    for mode, width in configs:
        if mode not in BASELINE:
            continue
        base = (BASELINE[mode], 0)
        records.append({
            "device": device_name(args.device or "cpu"),
            "model": args.model if args.model in SHAPES else base_model_id(args.model),
            "sae_width": width,
            "mode": mode,
            "baseline": BASELINE[mode],
            "layers": args.layers,
            "preset": args.preset,
            "batch": f"{args.batch}x{args.seq}" if mode not in ATTRIBUTION_MODES else f"{args.batch} gender prompts",
            "step_time_ratio": round(step[(mode, width)] / step[base], 4),
            "peak_memory_ratio": memory_ratio(memory[(mode, width)], memory[base]),
            "baseline_step_s": round(step[base], 4),
            **({"cpu_settings": "default" if args.default_cpu else "heap kept, subnormals flushed"}
               if on_cpu else {}),
        })
    merge_records(records)
    for r in records:
        print(f"{r['mode']:>10} width {r['sae_width']:>6}: step x{r['step_time_ratio']:.3f}  memory x{r['peak_memory_ratio']}")


if __name__ == "__main__":
    main()
