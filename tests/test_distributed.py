"""Several processes (a gloo group on the CPU): distributed evaluation, and the gender recipe under DDP and FSDP2
gives what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, make_sae, make_tiny_mc_dataset, make_tiny_model, make_tiny_tokenizer, recipe_config
from peft import PeftModel
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from hf_concept_ablation import ConceptAblationConfig, inject_concept_ablation
from hf_concept_ablation.experiments.recipes import run_recipe
from hf_concept_ablation.experiments.runner import subsample
from hf_concept_ablation.tasks import build_gender_datasets
from hf_concept_ablation.tasks.evaluation import evaluate_multiple_choice, process_share

REPO = Path(__file__).resolve().parents[1]
SIZES = (13, 1)  # questions: more than a batch per process with one left over, and fewer than the processes


def _ablated_model() -> torch.nn.Module:
    model = make_tiny_model("gemma3")
    inject_concept_ablation(model, ConceptAblationConfig(layers=[1], latents={1: [3, 5, 7]}),
                            saes={1: make_sae("jumprelu", seed=1, layer=1)})
    return model


def _scores(model: torch.nn.Module, distributed: bool) -> list[dict]:
    return [evaluate_multiple_choice(model, make_tiny_tokenizer(), make_tiny_mc_dataset(n), batch_size=4,
                                     ablation=ablation, distributed=distributed)
            for n in SIZES for ablation in (False, True)]


def _evaluation_worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        replicated = _scores(_ablated_model(), distributed=True)
        sharded = _ablated_model()
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        results[rank] = {"replicated": replicated, "sharded": _scores(sharded, distributed=True),
                         "share": process_share(13, distributed=True)}
    finally:
        dist.destroy_process_group()


def test_two_processes_evaluate_as_one():
    alone = _scores(_ablated_model(), distributed=False)
    assert _scores(_ablated_model(), distributed=True) == alone  # no process group: one process scores everything
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_evaluation_worker, args=(free_port(), results), nprocs=2, join=True)
        results = dict(results)
    # contiguous blocks of equal length, the shorter one padded with a repeat, so a sharded model runs alike on both
    assert [results[rank]["share"] for rank in (0, 1)] == [(list(range(7)), 2), ([7, 8, 9, 10, 11, 12, 12], 2)]
    for rank in (0, 1):
        for how in ("replicated", "sharded"):
            for got, expected in zip(results[rank][how], alone, strict=True):
                assert [got[k] for k in ("accuracy", "pair_accuracy", "n")] == \
                       [expected[k] for k in ("accuracy", "pair_accuracy", "n")], (rank, how)
                assert got["logit_diff"] == pytest.approx(expected["logit_diff"], abs=1e-5)


def _launch(config: Path, *launcher: str) -> tuple[dict, str]:
    """Run the gender recipe on two CPU processes under `accelerate launch` with `launcher`'s options (accelerate's
    ``--cpu`` starts a single process unless given an MPI hostfile, so the group is started like a GPU one)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "recipes" / "gender_bias.py"), "--config", str(config)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((config.with_suffix("") / "gender_bias.json").read_text()), done.stdout


LAUNCHERS = {"ddp": ["--multi_gpu"], "fsdp": ["--use_fsdp", "--fsdp_version", "2"]}


@pytest.fixture(scope="module")
def one_process(tiny_setup, tmp_path_factory):
    """The gender recipe's results on one process (in this one), per LoRA rank (0: full fine-tuning), run once."""
    runs = {}

    def results(lora: int) -> dict:
        if lora not in runs:
            out = tmp_path_factory.mktemp("one") / "out"
            runs[lora] = run_recipe("gender_bias", recipe_config(tiny_setup, out, ["caft"], **_settings(lora)))
        return runs[lora]

    return results


def _settings(lora: int) -> dict:
    return {"save_models": ["caft"], "training": {"learning_rate": 1e-3, "batch_size": 4, "epochs": 1,
                                                  "warmup_ratio": 0.0, "lora_rank": lora}}


@pytest.mark.parametrize(("how", "lora"), [("ddp", 0), ("fsdp", 0), ("fsdp", 4)], ids=["ddp", "fsdp", "fsdp-lora"])
def test_two_processes_train_and_evaluate_as_one(tiny_setup, one_process, tmp_path, how, lora):
    """The same val/OOD scores as one process, with the ablation removed and kept; the saved model (under FSDP,
    gathered from the shards) loads without FSDP and scores what was recorded."""
    one = one_process(lora)
    two, log = _launch(recipe_config(tiny_setup, tmp_path / "two", ["caft"], **_settings(lora)), *LAUNCHERS[how])
    assert log.count("[gender_bias] training caft, seed 0 (16 examples, 2 processes)") == 2  # one group of two ran
    (a,), (b,) = one["runs"], two["runs"]
    assert (a["condition"], a["seed"], b["condition"], b["seed"], b["machine"]["processes"]) == ("caft", 0, "caft", 0, 2)
    for split in ("val", "ood", "val_ablated", "ood_ablated"):
        assert (a[split]["accuracy"], a[split]["pair_accuracy"]) == (b[split]["accuracy"], b[split]["pair_accuracy"])
        assert a[split]["logit_diff"] == pytest.approx(b[split]["logit_diff"], abs=1e-4), split
    saved = tmp_path / "two" / "models" / "gender_bias" / "caft-seed0"
    model = AutoModelForCausalLM.from_pretrained(tiny_setup / "model" if lora else saved)
    if lora:
        model = PeftModel.from_pretrained(model, saved)
    val = subsample(build_gender_datasets(seed=0)["val"], 8)  # as the recipe subsamples it
    scores = evaluate_multiple_choice(model, make_tiny_tokenizer(), val)
    assert (scores["accuracy"], scores["pair_accuracy"]) == (b["val"]["accuracy"], b["val"]["pair_accuracy"])
    assert scores["logit_diff"] == pytest.approx(b["val"]["logit_diff"], abs=1e-4)


@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_erasers_refitted_during_training_on_two_processes_train_as_on_one(tiny_setup, tmp_path, how):
    """``leace_refit`` under DDP/FSDP2: every process refits after every step (the main process's erasers
    broadcast), and the scores are one process's."""
    settings = {**_settings(0), "eraser": {"label_column": "stereotyped_gender", "refit_every": 1}}
    (a,) = run_recipe("gender_bias", recipe_config(tiny_setup, tmp_path / "one", ["leace_refit"], **settings))["runs"]
    two, _ = _launch(recipe_config(tiny_setup, tmp_path / "two", ["leace_refit"], **settings), *LAUNCHERS[how])
    (b,) = two["runs"]
    assert a["ablation"]["fitted_on"]["refit_steps"] == b["ablation"]["fitted_on"]["refit_steps"] == [1, 2, 3]
    for split in ("val", "ood", "val_ablated", "ood_ablated"):
        assert (a[split]["accuracy"], a[split]["pair_accuracy"]) == (b[split]["accuracy"], b[split]["pair_accuracy"])
        assert a[split]["logit_diff"] == pytest.approx(b[split]["logit_diff"], abs=1e-4), split
