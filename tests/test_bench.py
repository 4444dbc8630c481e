"""The overhead benchmark's machinery runs every mode and writes its records (numbers are not checked here)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_model, make_tiny_tokenizer

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "ablation_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ablation_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_fine_tuning_mode_times_a_step_and_detaches(bench):
    model, tokenizer = make_tiny_model("llama").train(), make_tiny_tokenizer()
    args = argparse.Namespace(batch=2, seq=8, layers=[1, 2], rounds=2, warmup=1, steps=2)
    configs = [("plain", 0), ("latent", 64), ("projection", 64), ("naive", 64)]
    times = bench.time_modes(model, tokenizer, args, configs)
    assert set(times) == set(configs) and all(t > 0 for t in times.values())
    hooks = [h for layer in model.model.layers for h in (layer._forward_hooks, layer._forward_pre_hooks)]
    assert not any(hooks)  # every mode removed what it attached


def test_the_modes_run_in_another_order_each_round(bench):
    configs = [("plain", 0), ("latent", 64), ("projection", 64), ("naive", 64)]
    orders = [bench.round_order(configs, r) for r in range(8)]
    assert all(sorted(order) == sorted(configs) for order in orders)
    assert orders == [bench.round_order(configs, r) for r in range(8)]  # seeded: the same rounds again
    assert len({order[0] for order in orders}) > 1
    assert len({order[order.index(("projection", 64)) - 1] for order in orders if order[0] != ("projection", 64)}) > 1


def test_records_replace_those_of_the_same_device_model_width_and_mode(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "records.json")
    record = {"device": "cpu", "model": "m", "sae_width": 16, "mode": "latent", "step_time_ratio": 1.0}
    other = {**record, "mode": "naive"}
    bench.merge_records([record, other])
    bench.merge_records([{**record, "step_time_ratio": 2.0}])
    saved = json.loads((tmp_path / "records.json").read_text())
    assert sorted((r["mode"], r["step_time_ratio"]) for r in saved) == [("latent", 2.0), ("naive", 1.0)]


def test_records_of_other_hooked_layers_are_kept(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "records.json")
    record = {"device": "cpu", "model": "m", "sae_width": 16, "mode": "latent", "layers": [1, 2], "step_time_ratio": 1.0}
    bench.merge_records([record])
    bench.merge_records([{**record, "layers": [0, 1, 2, 3], "step_time_ratio": 2.0}])
    saved = json.loads((tmp_path / "records.json").read_text())
    assert sorted((r["layers"], r["step_time_ratio"]) for r in saved) == [([0, 1, 2, 3], 2.0), ([1, 2], 1.0)]


def test_all_layers_means_every_decoder_layer(bench):
    model = make_tiny_model("llama")
    assert bench.parse_layers(["all"], model) == list(range(model.config.num_hidden_layers))
    assert bench.parse_layers(["2", "0"], model) == [2, 0]


def test_random_sae_is_a_working_sae_lens_sae_with_seeded_weights(bench):
    import torch

    sae = bench.random_sae(16, 64, seed=3, device=torch.device("cpu"))
    again = bench.random_sae(16, 64, seed=3, device=torch.device("cpu"))
    assert sae.device == torch.device("cpu") and sae.cfg.device == "cpu"
    assert torch.equal(sae.W_enc, again.W_enc) and torch.equal(sae.W_dec, again.W_dec)
    assert not sae.b_enc.any() and not sae.b_dec.any() and torch.all(sae.threshold == 0.5)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ sae.W_enc) * (x @ sae.W_enc > 0.5))


def test_a_baseline_that_ran_out_of_memory_gives_no_ratio(bench):
    assert bench.memory_ratio(3.0, 2.0) == 1.5
    assert bench.memory_ratio("out of memory", 2.0) == "out of memory"
    assert bench.memory_ratio(3.0, "out of memory") == "baseline out of memory"


def test_the_profile_lists_operator_times_per_mode_and_the_module_alone():
    spec = importlib.util.spec_from_file_location("profile_step", BENCH.with_name("profile_step.py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    model, tokenizer = make_tiny_model("llama").train(), make_tiny_tokenizer()
    args = argparse.Namespace(batch=2, seq=8, layers=[1, 2], rounds=1, width=64)
    totals = module.operator_times(model, tokenizer, args, ["plain", "projection"])
    assert set(totals) == {"plain", "projection"} and all(sum(t.values()) > 0 for t in totals.values())
    assert totals["projection"]["aten::mm"] > 0  # the ablation's products are among the operators
    assert module.FAULTS in totals["plain"]
    assert module.module_time("latent", 64, 2, 8, d_model=16, repeats=3) > 0


def test_the_cpu_settings_launcher_runs_a_script_that_imports_its_neighbours(bench, tmp_path):
    import subprocess

    (tmp_path / "neighbour.py").write_text("VALUE = 'found'\n")
    (tmp_path / "script.py").write_text(
        "import sys, torch\nfrom neighbour import VALUE\n"
        "x = torch.tensor([1e-40]) * 1.0\nprint(VALUE, sys.argv[1:], float(x[0]) == 0.0)\n")
    done = subprocess.run([sys.executable, "-c", bench._LAUNCHER, str(tmp_path / "script.py"), "--flag"],
                          capture_output=True, text=True, cwd="/", check=True)
    assert done.stdout.split() == ["found", "['--flag']", "True"]  # subnormals flushed to zero


def test_the_embedded_model_trains_what_the_recipes_default_preset_trains(bench):
    model, _ = bench.load_bench_model("embedded", "cpu")
    assert bench.default_preset("embedded") == "gemma3-270m" and bench.default_preset("gemma-2-2b-shape") == "paper"
    assert model.training and not model.get_input_embeddings().weight.requires_grad  # the preset freezes them
    assert any(p.requires_grad for p in model.parameters())


def test_the_sequential_leace_fit_gives_the_erasers_of_a_forward_pass_per_layer(monkeypatch):
    """The fit benchmark's plain computation (a pass per layer, the erasers before it injected) is what the package's
    sequential fit (recorded layer calls, each layer run once) must equal."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("leace_fit", BENCH.with_name("leace_fit.py"))
    leace_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(leace_bench)
    texts, labels = leace_bench.sentiment_texts(24)
    assert sorted(set(labels)) == ["negative", "positive"]
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer()
    z = leace_bench.one_hot_labels(labels)[0].double()
    sequential = leace_bench.fit_leace_erasers(model, tokenizer, texts, z, sequential=True, progress=False)
    plain = leace_bench.per_layer_passes(model, tokenizer, texts, z, len(sequential))
    assert leace_bench.max_relative_difference(sequential, plain) < 1e-6
    independent = leace_bench.fit_leace_erasers(model, tokenizer, texts, z, progress=False)
    assert leace_bench.max_relative_difference(independent, plain) > 1e-3  # the check can tell the fits apart
