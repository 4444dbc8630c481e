"""The main job (`make demo` = `hf-concept-ablation demo`) end to end on a tiny model folder with sae-lens SAE folders."""

from __future__ import annotations

import json

from conftest import make_sae, make_tiny_model, make_tiny_tokenizer

from hf_concept_ablation import ConceptAblationConfig, cli
from hf_concept_ablation.experiments import demo


def test_demo_searches_then_compares_plain_and_caft_and_resumes(tmp_path, capsys):
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    search = {"layers": [1, 2], "min_contrast": 0.0, "saes": {}}  # a random model's latents barely separate the texts
    for layer in (1, 2):
        make_sae("standard", d_sae=128, seed=layer, layer=layer).save_model(tmp_path / f"sae_{layer}")
        search["saes"][layer] = str(tmp_path / f"sae_{layer}")
    out = tmp_path / "demo"
    results = demo.run_demo(out, model=str(tmp_path / "model"), search=search)

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
    # the recipe call made, as a command line that makes it again
    assert f"hf-concept-ablation train gender_bias --config gender_bias_quick adapter={out / 'search'}" in \
        (out / "model_card.md").read_text()

    again = demo.run_demo(out, model=str(tmp_path / "model"), search=search,
                          command="hf-concept-ablation demo --model my-model")
    assert again["runs"] == results["runs"]
    assert "hf-concept-ablation demo --model my-model" in (out / "model_card.md").read_text()  # as it was started
    printed = capsys.readouterr().out
    assert "== 1/2 concept search: reusing" in printed and "already in" in printed
    # without its SAEs and layers: another search, refused in one line naming what differs
    assert cli.main(["demo", "--out", str(out), "--model", str(tmp_path / "model")]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"hf-concept-ablation demo: error: {out / 'search'} holds a search made with other "
                            "settings") and "'min_contrast': (0.0, 0.5)" in error and error.count("\n") == 1
    assert json.loads((out / "gender_bias.json").read_text())["runs"] == results["runs"]


def test_each_model_gets_its_own_demo_folder():
    assert str(demo.default_output_dir("embedded")) == "outputs/demo"
    assert str(demo.default_output_dir("google/gemma-2-2b")) == "outputs/demo-gemma-2-2b"
    assert str(demo.default_output_dir("/models/my-gemma/")) == "outputs/demo-my-gemma"
