"""SAE sources: a local sae-lens folder and Gemma Scope style raw parameter folders load into the adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_sae, make_tiny_model
from safetensors.torch import save_file

from hf_concept_ablation import (
    ConceptAblationConfig,
    SAESource,
    inject_concept_ablation,
)
from hf_concept_ablation.adapter.sae_sources import load_sae

RAW = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def _same_weights(a, b):
    for name in RAW:
        torch.testing.assert_close(getattr(a, name), getattr(b, name))


def test_local_sae_lens_folder_round_trip(tmp_path):
    sae = make_sae("jumprelu", layer=2)
    sae.save_model(tmp_path / "layer_2")
    loaded = load_sae(SAESource(path=str(tmp_path / "layer_2")))
    assert loaded.cfg.architecture() == "jumprelu"
    assert loaded.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    _same_weights(loaded, sae)


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_gemma_scope_raw_params_folder(tmp_path, fmt):
    sae = make_sae("jumprelu")
    folder = tmp_path / "layer_1" / "width_256" / "average_l0_20"
    folder.mkdir(parents=True)
    # Gemma Scope names the weights in lower case ("w_enc") in params.npz
    tensors = {name.lower() if name.startswith("W") else name: getattr(sae, name).detach() for name in RAW}
    if fmt == "npz":
        np.savez(folder / "params.npz", **{k: v.numpy() for k, v in tensors.items()})
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "params.safetensors"))
    loaded = load_sae(SAESource(path=str(folder)))
    assert loaded.cfg.apply_b_dec_to_input is False
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    _same_weights(loaded, sae)

    model = make_tiny_model("gemma2")
    config = ConceptAblationConfig(layers=[1], latents={1: [0, 5]}, saes={1: SAESource(path=str(folder))})
    ablation = inject_concept_ablation(model, config)
    assert ablation.layers[1].kind == "jumprelu"


def test_unsupported_architecture_is_named(tmp_path):
    from sae_lens import GatedSAE, GatedSAEConfig

    GatedSAE(GatedSAEConfig(d_in=64, d_sae=32)).save_model(tmp_path)
    with pytest.raises(ValueError, match=r"architecture 'gated'; supported"):
        load_sae(SAESource(path=str(tmp_path)))
