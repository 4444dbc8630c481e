"""The SAE suite shipped for the embedded Gemma 3 270M: loads, fits, and reaches the quality targets.

Quality is measured on ``heldout_sample.jsonl`` beside the suite: texts from the
corpus's held-out split (model samples and task prompts), never used in training.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_concept_ablation.adapter import sae_sources as st
from hf_concept_ablation.adapter.config import ConceptAblationConfig, SAESource
from hf_concept_ablation.adapter.sae_sources import check_sae_fits, load_sae
from hf_concept_ablation.saes import quality as sae_quality

MIN_EXPLAINED_VARIANCE = 0.7
MIN_CE_LOSS_RECOVERED = 0.8
MAX_SUITE_BYTES = 40 * 1024 * 1024


def test_suite_files_are_small_float16_sae_lens_folders():
    total = sum(f.stat().st_size for f in st.SHIPPED_SUITE_DIR.rglob("*") if f.is_file())
    assert total <= MAX_SUITE_BYTES
    assert len(st.SHIPPED_LAYERS) >= 4
    for layer in st.SHIPPED_LAYERS:
        folder = st.shipped_sae_dir(layer)
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["dtype"] == "float16" and cfg["d_in"] == 640
        assert cfg["metadata"]["hook_name"] == f"blocks.{layer}.hook_resid_post"
        assert cfg["metadata"]["model_name"] == "google/gemma-3-270m"
        assert not (folder / "checkpoints").exists()
    assert (st.SHIPPED_SUITE_DIR / "README.md").is_file()


def test_shipped_suite_is_named_like_a_release_so_saved_configs_do_not_hold_install_paths():
    for layer in st.SHIPPED_LAYERS:
        source = st.shipped_sae_source(layer)
        assert (source.release, source.sae_id, source.path) == (st.SHIPPED_RELEASE, f"layer_{layer}", None)
        assert load_sae(source).cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
    config = ConceptAblationConfig(layers=[6], latents={6: [1, 2]}, saes={6: st.shipped_sae_source(6)})
    assert str(st.SHIPPED_SUITE_DIR) not in str(config.to_dict())
    with pytest.raises(ValueError, match="no shipped SAE for layer 17"):
        st.shipped_sae_source(17)
    with pytest.raises(ValueError, match="unknown id 'layer6'"):
        load_sae(SAESource(release=st.SHIPPED_RELEASE, sae_id="layer6"))
    with pytest.raises(ValueError, match="no shipped SAE for layer 5"):
        load_sae(SAESource(release=st.SHIPPED_RELEASE, sae_id="layer_5"))


@pytest.fixture(scope="module")
def gemma():
    from hf_concept_ablation.loading import load_model

    torch.manual_seed(0)
    return load_model("embedded")


@pytest.mark.integration
@pytest.mark.parametrize("layer", st.SHIPPED_LAYERS)
def test_shipped_sae_quality_on_heldout_text(gemma, layer):
    model, tokenizer = gemma
    sae = load_sae(st.shipped_sae_source(layer))
    check_sae_fits(sae, layer=layer, num_layers=model.config.num_hidden_layers,
                   hidden_size=model.config.hidden_size, model_name=model.config.name_or_path)
    lines = (st.SHIPPED_SUITE_DIR / "heldout_sample.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    quality = sae_quality.evaluate_sae(model, tokenizer, sae, layer, texts, max_tokens=1500, ce_max_tokens=400)
    print(f"layer {layer}: {quality}")
    assert quality.explained_variance >= MIN_EXPLAINED_VARIANCE
    assert quality.ce_loss_recovered >= MIN_CE_LOSS_RECOVERED
