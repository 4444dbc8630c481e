"""Loading by Hub name: Gemma 2 2B and a Gemma Scope SAE named by sae-lens release and id.

The Hub is not reachable here, so the test lays out a Hugging Face cache folder exactly as a
download would (``models--<org>--<name>/refs/main`` + ``snapshots/<sha>/...``) and runs the
real by-name code paths (transformers' and sae-lens's loaders, ``hf_hub_download``) in a
fresh process with ``HF_HUB_OFFLINE=1`` pointed at it. The model is a tiny random Gemma 2
with Gemma 2 2B's hidden size (2304); the SAE has Gemma Scope's 16k width and file format.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_tokenizer
from transformers import Gemma2Config, Gemma2ForCausalLM

SHA = "0123456789abcdef0123456789abcdef01234567"
RELEASE, SAE_ID = "gemma-scope-2b-pt-res-canonical", "layer_1/width_16k/canonical"
SAE_REPO, SAE_FOLDER = "google/gemma-scope-2b-pt-res", "layer_1/width_16k/average_l0_102"
D_MODEL, D_SAE = 2304, 16384
LATENTS = [7, 9000, 16383]


def _snapshot(hub: Path, repo_id: str) -> Path:
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SHA)
    return repo / "snapshots" / SHA


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    hub = tmp_path_factory.mktemp("hf_cache") / "hub"
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=128, hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=64, bos_token_id=2, pad_token_id=0,
        eos_token_id=1))
    model.save_pretrained(_snapshot(hub, "google/gemma-2-2b"))
    make_tiny_tokenizer().save_pretrained(_snapshot(hub, "google/gemma-2-2b"))
    rng = np.random.default_rng(0)
    b_enc = np.full(D_SAE, -1.0, dtype=np.float32)
    b_enc[LATENTS] = 0.5  # the chosen latents fire on most positions
    params = {
        "w_enc": rng.standard_normal((D_MODEL, D_SAE), dtype=np.float32) / np.float32(D_MODEL**0.5),
        "w_dec": rng.standard_normal((D_SAE, D_MODEL), dtype=np.float32) / np.float32(D_SAE**0.5),
        "b_enc": b_enc,
        "b_dec": rng.standard_normal(D_MODEL, dtype=np.float32) * np.float32(0.1),
        "threshold": np.full(D_SAE, 0.05, dtype=np.float32),
    }
    folder = _snapshot(hub, SAE_REPO) / SAE_FOLDER
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params)
    return hub


SCRIPT = textwrap.dedent(f"""
    import json, sys
    import torch
    from hf_concept_ablation import ConceptAblation, ConceptAblationConfig, SAESource, inject_concept_ablation
    from hf_concept_ablation.loading import load_model
    from hf_concept_ablation.adapter.sae_sources import load_sae

    source = SAESource(release="{RELEASE}", sae_id="{SAE_ID}")
    model, tokenizer = load_model("google/gemma-2-2b")
    batch = tokenizer(["w6 w7 w8 w9 w10", "w11 w12 w13 w14 w15"], return_tensors="pt")
    with torch.no_grad():
        clean = model(**batch, output_hidden_states=True).hidden_states[2]
        config = ConceptAblationConfig(layers=[1], latents={{1: {LATENTS}}}, saes={{1: source}})
        ablation = inject_concept_ablation(model, config)
        ablated = model(**batch, output_hidden_states=True).hidden_states[2]
        sae = load_sae(source)
        pre = clean @ sae.W_enc[:, {LATENTS}] + sae.b_enc[{LATENTS}]
        acts = torch.relu(pre) * (pre > sae.threshold[{LATENTS}])
        expected = clean - acts @ sae.W_dec[{LATENTS}]
        ablation.save_pretrained(sys.argv[1])
        other, _ = load_model("google/gemma-2-2b")
        ConceptAblation.from_pretrained(other, sys.argv[1])
        reloaded = other(**batch, output_hidden_states=True).hidden_states[2]
    print(json.dumps({{
        "sae_model": sae.cfg.metadata.model_name, "d_sae": sae.cfg.d_sae, "hook": sae.cfg.metadata.hook_name,
        "base": model.config.name_or_path, "firing": float((acts[:, 1:] > 0).float().mean()),
        "error": float((ablated[:, 1:] - expected[:, 1:]).abs().max()),
        "bos_untouched": float((ablated[:, 0] - clean[:, 0]).abs().max()),
        "removed": float((clean[:, 1:] - ablated[:, 1:]).norm(dim=-1).mean()),
        "reload_error": float((reloaded - ablated).abs().max()),
    }}))
""")


def test_gemma_2_2b_and_gemma_scope_load_by_name_from_a_hub_cache(hub, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "adapter")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["sae_model"], result["d_sae"], result["hook"]) == ("gemma-2-2b", D_SAE, "blocks.1.hook_resid_post")
    assert result["base"] == "google/gemma-2-2b"
    assert result["firing"] > 0.2 and result["removed"] > 0.1
    assert result["error"] < 1e-4 and result["bos_untouched"] == 0.0
    assert result["reload_error"] < 1e-5

    saved = json.loads((tmp_path / "adapter" / "concept_ablation_config.json").read_text())
    assert saved["saes"]["1"] == {"release": RELEASE, "sae_id": SAE_ID, "path": None}
    assert saved["base_model_name_or_path"] == "google/gemma-2-2b"
