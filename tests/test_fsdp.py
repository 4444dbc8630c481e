"""FSDP2 (``fully_shard``) on two CPU processes (gloo): the ablation's hooks and buffers survive sharding.

Every decoder layer and the whole model are sharded, as accelerate's FSDP2 plugin does with a
transformer auto-wrap policy; logits and every parameter's gradient must match the unsharded model.
The recipes under FSDP on several processes: `test_distributed.py`; here, the launches they refuse.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate.utils import DistributedType
from conftest import free_port, make_sae, make_tiny_model, make_tiny_tokenizer
from torch.distributed.fsdp import fully_shard

from hf_concept_ablation import (
    ConceptAblationConfig,
    get_concept_ablation,
    inject_concept_ablation,
)
from hf_concept_ablation.experiments.runner import ExperimentConfig, check_launch, run_experiment
from hf_concept_ablation.experiments.training import shard_model


def _ablated_model(mode: str) -> torch.nn.Module:
    model = make_tiny_model("gemma3").train()
    if mode == "latent":
        config = ConceptAblationConfig(layers=[1, 2], latents={1: [3, 5], 2: [7]})
        inject_concept_ablation(model, config, saes={1: make_sae("jumprelu", seed=1, layer=1),
                                                     2: make_sae("standard", seed=2, layer=2)})
    else:
        directions = {1: torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(1))}
        inject_concept_ablation(model, ConceptAblationConfig(layers=[1], mode="projection", directions=directions))
    return model


def _batch() -> dict[str, torch.Tensor]:
    return make_tiny_tokenizer()(["w1 w2 w3 w4 w9", "w5 w6 w7"], return_tensors="pt", padding=True)


def _loss(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(**_batch()).logits
    return logits, logits.float().pow(2).mean()


def _worker(rank: int, port: int, mode: str, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _ablated_model(mode)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        logits, loss = _loss(model)
        loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            results.update(logits=logits.detach(), grads=grads,
                           enabled=get_concept_ablation(model).config.layers)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["latent", "projection"])
def test_fully_sharded_ablated_model_matches_the_unsharded_one(mode):
    reference = _ablated_model(mode)
    logits, loss = _loss(reference)
    loss.backward()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(free_port(), mode, results), nprocs=2, join=True)
        sharded = dict(results)
    handle = get_concept_ablation(reference)
    assert sharded["enabled"] == handle.config.layers
    torch.testing.assert_close(sharded["logits"], logits.detach(), rtol=1e-5, atol=1e-5)
    handle.disable()
    assert not torch.allclose(reference(**_batch()).logits, logits)  # the ablation acts
    for name, param in reference.named_parameters():
        torch.testing.assert_close(sharded["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("env", "message"), [
    ({"ACCELERATE_USE_FSDP": "true"}, r"FSDP version 1 \(FSDP_VERSION=1\): the recipes run FSDP2 only; .*--fsdp_version 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, r"FSDP version 1 .*FSDP2 only"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
     r"DeepSpeed ZeRO stage 3 is not supported by the recipes: .*untested \(the recipes run a group of CPU processes "
     r"without DeepSpeed\); launch with FSDP2"),
])
def test_recipes_refuse_a_launch_they_cannot_run(monkeypatch, tmp_path, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        run_experiment(ExperimentConfig(conditions=["none"], output_dir=str(tmp_path)), {}, name="gender_bias")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_fsdp_on_cpu_processes_refuses_checkpoints_it_cannot_resume(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    state = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)  # a group of CPU processes, as launched
    with pytest.raises(ValueError, match=r"save_steps=5: FSDP on CPU processes keeps no checkpoints .*save_steps=0"):
        check_launch(ExperimentConfig(conditions=["none"], output_dir=str(tmp_path), save_steps=5), state)
    check_launch(ExperimentConfig(conditions=["none"], output_dir=str(tmp_path)), state)
    check_launch(ExperimentConfig(conditions=["none"], output_dir=str(tmp_path), save_steps=5),
                 SimpleNamespace(distributed_type=DistributedType.FSDP))  # accelerate's FSDP saves them


def test_sharding_needs_the_models_decoder_layer_class():
    with pytest.raises(ValueError, match="Linear names no _no_split_modules"):
        shard_model(torch.nn.Linear(2, 2))
