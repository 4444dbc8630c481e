"""The main job (`make demo` = `hf-concept-ablation demo`) end to end on a tiny model folder."""

from __future__ import annotations

import json

from conftest import make_tiny_model, make_tiny_tokenizer

from hf_concept_ablation import cli
from hf_concept_ablation.experiments import demo


def test_demo_compares_plain_leace_and_its_random_control_and_resumes(tmp_path, capsys):
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer(["he", "she", "him", "her"])
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "demo"
    results = demo.run_demo(out, model=str(tmp_path / "model"))

    printed = capsys.readouterr().out
    assert printed.index("== 1/3 plain fine-tuning") < printed.index("== 2/3 fine-tuning through LEACE erasers") \
        < printed.index("== 3/3 the control: fine-tuning through a random eraser")
    assert {r["condition"] for r in results["runs"]} == {"none", "leace", "random_eraser"}
    runs = {r["condition"]: r for r in results["runs"]}
    assert runs["leace"]["ablation"]["mode"] == "leace" and runs["leace"]["ablation"]["layers"] == [0, 1, 2, 3]
    assert runs["leace"]["ablation"]["fitted_on"]["column"] == "stereotyped_gender"
    assert runs["random_eraser"]["ablation"]["fitted_on"]["source"] == "random labels"
    assert "ood_ablated" in runs["leace"] and "ood_ablated" not in runs["none"]
    assert "method: LEACE concept erasure" in printed
    assert all(f"  {name:<13}  val " in printed for name in ("plain", "LEACE", "random eraser"))
    saved = json.loads((out / "gender_bias.json").read_text())
    assert saved["config"]["model"] == str(tmp_path / "model") and saved["summary"] == results["summary"]
    assert (out / "gender_bias.png").is_file()
    assert f"model card: {out / 'model_card_leace.md'}" in printed
    assert "labeled by the column `stereotyped_gender`" in (out / "model_card_leace.md").read_text()

    assert cli.main(["demo", "--out", str(out), "--model", str(tmp_path / "model")]) == 0
    assert "already in" in capsys.readouterr().out
    assert json.loads((out / "gender_bias.json").read_text())["runs"] == results["runs"]


def test_each_model_gets_its_own_demo_folder():
    assert str(demo.default_output_dir("embedded")) == "outputs/demo"
    assert str(demo.default_output_dir("google/gemma-2-2b")) == "outputs/demo-gemma-2-2b"
    assert str(demo.default_output_dir("/models/my-gemma/")) == "outputs/demo-my-gemma"
