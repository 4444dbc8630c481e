"""The main job (`make demo` = `hf-concept-ablation demo`) end to end on a tiny model folder with sae-lens SAE folders."""

from __future__ import annotations

import json

import pytest
from conftest import make_sae, make_tiny_model, make_tiny_tokenizer

from hf_concept_ablation import ConceptAblationConfig, cli


def test_demo_searches_then_compares_plain_and_caft_and_resumes(tmp_path, capsys):
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    search_args = ["--layers", "1", "2", "--min-contrast", "0.0"]  # a random model's latents barely separate the texts
    for layer in (1, 2):
        make_sae("standard", d_sae=128, seed=layer, layer=layer).save_model(tmp_path / f"sae_{layer}")
        search_args += ["--sae", f"{layer}={tmp_path / f'sae_{layer}'}"]
    out = tmp_path / "demo"
    results = cli.run_demo(out, model=str(tmp_path / "model"), search_args=search_args)

    assert "== 1/2 concept search ->" in capsys.readouterr().out
    selection = json.loads((out / "search" / "selection.json").read_text())
    adapter = ConceptAblationConfig.from_pretrained(out / "search")
    assert selection["selected"] and adapter.layers and set(adapter.layers) <= {1, 2}
    assert {r["condition"] for r in results["runs"]} == {"none", "caft", "test_only"}
    caft = next(r for r in results["runs"] if r["condition"] == "caft")
    assert caft["ablation"]["latents"] == {str(k): v for k, v in adapter.latents.items()}
    saved = json.loads((out / "gender_bias.json").read_text())
    assert saved["config"]["model"] == str(tmp_path / "model") and saved["summary"] == results["summary"]
    assert (out / "gender_bias.png").is_file() and (out / "model_card.md").is_file()

    assert "python recipes/gender_bias.py --config" in (out / "model_card.md").read_text()  # the recipe call made

    again = cli.run_demo(out, model=str(tmp_path / "model"), search_args=search_args,
                         command="hf-concept-ablation demo --model my-model")
    assert again["runs"] == results["runs"]
    assert "hf-concept-ablation demo --model my-model" in (out / "model_card.md").read_text()  # as it was started
    printed = capsys.readouterr().out
    assert "== 1/2 concept search: reusing" in printed and "already in" in printed
    with pytest.raises(ValueError, match=f"{out / 'search'} holds a search made with other options"):
        cli.main(["demo", "--output-dir", str(out), "--model", str(tmp_path / "model")])  # without its SAEs and layers
    assert json.loads((out / "gender_bias.json").read_text())["runs"] == results["runs"]


def test_each_model_gets_its_own_demo_folder():
    assert str(cli.default_output_dir("embedded")) == "outputs/demo"
    assert str(cli.default_output_dir("google/gemma-2-2b")) == "outputs/demo-gemma-2-2b"
    assert str(cli.default_output_dir("/models/my-gemma/")) == "outputs/demo-my-gemma"
