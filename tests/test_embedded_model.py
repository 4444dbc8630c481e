"""Integration: the real embedded Gemma 3 270M with the adapter: load, inject, forward, save, reload."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sae

from hf_concept_ablation import (
    ConceptAblation,
    ConceptAblationConfig,
    inject_concept_ablation,
)
from hf_concept_ablation.loading import EMBEDDED_BASE_MODEL_ID, load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded():
    return load_model("embedded")


def _last_logits(model, batch):
    with torch.no_grad():
        return model(**batch, logits_to_keep=1).logits[:, -1]


def test_embedded_model_is_gemma3_270m(embedded):
    model, tokenizer = embedded
    assert model.config.hidden_size == 640 and model.config.num_hidden_layers == 18
    assert model.config.name_or_path == EMBEDDED_BASE_MODEL_ID
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    assert tokenizer.decode(_last_logits(model, batch).argmax(-1)).strip() == "the"


def test_inject_forward_save_reload_identical_logits(embedded, tmp_path):
    model, tokenizer = embedded
    batch = tokenizer(["She is a doctor and he is a nurse.", "The kids near the bike"], return_tensors="pt", padding=True)
    plain = _last_logits(model, batch)
    saes = {layer: make_sae("jumprelu", d_in=640, d_sae=1024, seed=layer) for layer in (3, 9)}
    config = ConceptAblationConfig(layers=[3, 9], latents={3: [1, 2, 3], 9: [10, 500, 1000]})
    ablation = inject_concept_ablation(model, config, saes=saes)
    try:
        assert ablation.config.base_model_name_or_path == EMBEDDED_BASE_MODEL_ID
        ablated = _last_logits(model, batch)
        assert (ablated - plain).abs().max() > 1e-3
        ablation.save_pretrained(tmp_path)
    finally:
        ablation.remove()
    torch.testing.assert_close(_last_logits(model, batch), plain)

    fresh, _ = load_model("embedded")
    ConceptAblation.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(_last_logits(fresh, batch), ablated, rtol=0, atol=0)


def test_a_gguf_named_by_the_environment_is_used_and_a_missing_one_is_named(tmp_path, monkeypatch):
    from hf_concept_ablation.loading import embedded_gguf_path, embedded_model_dir

    monkeypatch.setenv("HF_CONCEPT_ABLATION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_CONCEPT_ABLATION_GGUF", str(tmp_path / "nowhere.gguf"))
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        embedded_model_dir()
    copy = tmp_path / "model.gguf"
    copy.write_bytes(b"GGUF")
    monkeypatch.setenv("HF_CONCEPT_ABLATION_GGUF", str(copy))
    assert embedded_gguf_path() == copy


def test_processes_of_one_launch_build_the_cache_once(tmp_path, monkeypatch):
    """Ranks that start together on a fresh machine wait for the first one's copy instead of replacing it
    while it is read (three processes, the real dequantization, about a minute, into an empty cache)."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("HF_CONCEPT_ABLATION_CACHE", str(tmp_path / "cache"))
    rank = "from hf_concept_ablation.loading import embedded_model_dir; print('found', embedded_model_dir())"
    ranks = [subprocess.Popen([sys.executable, "-c", rank], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(3)]
    outputs = [r.communicate(timeout=900)[0] for r in ranks]
    assert all(r.returncode == 0 for r in ranks), outputs
    assert all(f"found {tmp_path / 'cache' / 'gemma-3-270m'}" in out for out in outputs)
    assert sum(out.count("dequantizing") for out in outputs) == 1
    model, _ = load_model("embedded")
    assert model.config.name_or_path == EMBEDDED_BASE_MODEL_ID
