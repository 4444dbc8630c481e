"""The recipes end to end on a tiny model folder: every condition, results JSON, figure and resume (several processes:
`test_distributed.py`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import gender_concept_words, make_tiny_tokenizer, recipe_config
from transformers import AutoModelForCausalLM

from hf_concept_ablation import (
    ConceptAblation,
    ConceptAblationConfig,
    SAESource,
    inject_concept_ablation,
)
from hf_concept_ablation.adapter.config import SELECTION_NAME
from hf_concept_ablation.experiments.recipe_settings import (
    load_recipe_config,
    packaged_configs,
)
from hf_concept_ablation.experiments.recipes import double_mc_runs, run_recipe
from hf_concept_ablation.experiments.runner import random_directions_config, scores_line, subsample
from hf_concept_ablation.tasks import build_double_mc_datasets, build_gender_datasets
from hf_concept_ablation.tasks.evaluation import evaluate_multiple_choice
from hf_concept_ablation.tasks.gender_bias import DEFAULT_PROFESSIONS_FILE
from hf_concept_ablation.tasks.validity import did_not_learn

REPO = Path(__file__).resolve().parents[1]


def test_gender_recipe_runs_every_condition_and_resumes(tiny_setup, tmp_path, capsys):
    conditions = ["none", "caft", "caft_annealed", "random", "top_k", "test_only"]
    config = recipe_config(tiny_setup, tmp_path / "out", conditions)
    results = run_recipe("gender_bias", config, ["seeds=[0,1]", "save_models=[caft,none]"])
    summary = results["summary"]
    assert set(summary) == set(conditions)
    for entry in summary.values():
        assert len(entry["val"]) == len(entry["ood"]) == 2
        assert 0.0 <= entry["ood_mean"] <= 1.0 and entry["ood_sem"] >= 0.0
    runs = {(r["condition"], r["seed"]): r for r in results["runs"]}
    assert "ood_ablated" in runs[("caft", 0)] and "ood_ablated" not in runs[("none", 0)]
    for run in results["runs"]:  # each run says where and with what it was made
        assert run["machine"]["device"].startswith("cpu (") and run["machine"]["processes"] == 1
        assert run["machine"]["versions"]["torch"] == torch.__version__
    assert runs[("random", 0)]["ablation"]["latents"] != runs[("random", 1)]["ablation"]["latents"]
    assert runs[("caft_annealed", 0)]["ablation"]["alpha"] == pytest.approx(0.5)  # 4 steps, linear from 0.5: step 3 of 4
    saved = json.loads((tmp_path / "out" / "gender_bias.json").read_text())
    assert saved["summary"] == summary
    log = capsys.readouterr().out
    for run in results["runs"]:  # a run at chance is flagged in its record, the log line and the summary
        assert run["did_not_learn"] == did_not_learn(run["val"])
        assert run["condition"] == "test_only" or f"{run['condition']} seed {run['seed']}: {scores_line(run)}\n" in log
    for condition, entry in summary.items():
        assert entry["did_not_learn"] == [seed for seed in (0, 1) if runs[(condition, seed)]["did_not_learn"]]
    assert (tmp_path / "out" / "gender_bias.png").stat().st_size > 5000
    card = (tmp_path / "out" / "model_card.md").read_text()
    assert "| 1 | 5 |" in card and "![accuracy by condition](gender_bias.png)" in card
    assert "base_model:" not in card  # a local model has no Hub id
    assert "$" not in card.split("```")[0]  # every template field filled
    assert "| learning_rate | `0.001` |" in card and "| epochs | `1` |" in card  # the settings trained with
    saved_models = sorted(p.name for p in (tmp_path / "out" / "models" / "gender_bias").iterdir())
    assert saved_models == ["caft-seed0", "caft-seed1", "none-seed0", "none-seed1"]
    checkpoint = tmp_path / "out" / "models" / "gender_bias" / "caft-seed1"
    scores = f"val {runs[('caft', 1)]['val']['accuracy']:.3f}, OOD {runs[('caft', 1)]['ood']['accuracy']:.3f}"
    assert (checkpoint / "README.md").read_text() == card.replace(
        "at layers 1\n", f"at layers 1\n- **This model:** the `caft` model of seed 1: {scores} (ablation removed)\n")
    assert (checkpoint / "gender_bias.png").is_file()  # the card's figure travels with it
    assert not (tmp_path / "out" / "models" / "gender_bias" / "none-seed1" / "README.md").exists()  # not CAFT
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    ablation = ConceptAblation.from_pretrained(reloaded, checkpoint / "concept_ablation")
    assert ablation.config.latents == {1: runs[("caft", 1)]["ablation"]["latents"]["1"]}

    again = run_recipe("gender_bias", config, ["seeds=[0,1]"])
    assert again["runs"] == results["runs"]
    assert "already in" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"other settings \(train_size: 16 there, 12 now\)"):
        run_recipe("gender_bias", config, ["train_size=12"])
    other_saes = "saes={1: {path: %s}, 2: {path: %s}}" % (tiny_setup / "sae_2", tiny_setup / "sae_1")
    with pytest.raises(ValueError, match=r"other settings \(saes: \{'1': \{.*sae_1'.*\}\} there, \{'1': \{.*sae_2'"):
        run_recipe("gender_bias", config, [other_saes])  # the baselines' latents would come from other SAEs
    with pytest.raises(ValueError, match=r"holds runs on other data \(split\(s\) \['ood', 'train', 'val'\] differ"):
        run_recipe("gender_bias", config, ["task.seed=1"])  # another template split


def test_checkpoint_cards_cover_the_seeds_of_their_table_and_state_their_own_scores(tiny_setup, tmp_path):
    config = recipe_config(tiny_setup, tmp_path / "out", ["caft"], train_size=8, eval_size=4, save_models=["caft"])
    run_recipe("gender_bias", config, ["seeds=[0,1]"])
    runs = {r["seed"]: r for r in run_recipe("gender_bias", config, ["seeds=[2]"])["runs"]}
    card = (tmp_path / "out" / "model_card.md").read_text()
    assert "| seeds | `[0, 1, 2]` |" in card  # the table averages every seed in the results file
    assert f"```\nhf-concept-ablation train gender_bias --config {config} 'seeds=[2]'\n```" in card  # how to redo it
    for seed, run in runs.items():  # the earlier seeds' cards are refreshed with it
        own = (f"the `caft` model of seed {seed}: val {run['val']['accuracy']:.3f}, OOD {run['ood']['accuracy']:.3f} "
               "(ablation removed)")
        readme = tmp_path / "out" / "models" / "gender_bias" / f"caft-seed{seed}" / "README.md"
        assert readme.read_text() == card.replace("at layers 1\n", f"at layers 1\n- **This model:** {own}\n")


def test_eraser_runs_get_a_card_of_their_own_describing_their_erasers(tiny_setup, tmp_path):
    model = tmp_path / "model"  # the tiny model, with a tokenizer that tells the female and male sentences apart
    shutil.copytree(tiny_setup / "model", model)
    make_tiny_tokenizer(gender_concept_words()).save_pretrained(model)
    config = recipe_config(tiny_setup, tmp_path / "out", ["caft", "leace_contrast"], train_size=8, eval_size=4,
                           save_models=["leace_contrast"], model=str(model))
    run_recipe("gender_bias", config)
    caft = (tmp_path / "out" / "model_card.md").read_text()
    card = (tmp_path / "out" / "model_card_leace_contrast.md").read_text()
    assert "LEACE" not in caft.split("## Training")[0]  # the caft card: its latents
    assert ("- **Ablation source:** LEACE erasers (`concept_erasure`) fitted on the base model's residual stream, 64 "
            "texts: contrast texts\n- **Mode:** `leace`") in card
    assert "| 0, 1, 2, 3 | female, male | 64 texts: contrast texts | all | independent |" in card
    readme = tmp_path / "out" / "models" / "gender_bias" / "leace_contrast-seed0" / "README.md"
    assert "the `leace_contrast` model of seed 0" in readme.read_text()


def test_leace_sequential_and_refit_fit_their_erasers_as_named_and_their_cards_say_so(tiny_setup, tmp_path):
    model = tmp_path / "model"  # the tiny model, with a tokenizer that knows the pronouns of the prompts
    shutil.copytree(tiny_setup / "model", model)
    make_tiny_tokenizer(["he", "she", "him", "her"]).save_pretrained(model)
    config = recipe_config(tiny_setup, tmp_path / "out", ["leace", "leace_sequential", "leace_refit"], train_size=8,
                           eval_size=4, model=str(model), eraser={"label_column": "stereotyped_gender", "refit_every": 1})
    summary = run_recipe("gender_bias", config, ["task.answer_form=words"])
    assert set(summary["summary"]) == {"leace", "leace_sequential", "leace_refit"}
    fitted = {path.parent.name.split("-")[0]: json.loads(path.read_text())["fitted_on"]
              for path in (tmp_path / "out" / "erasers").glob("*/*/concept_ablation_config.json")}
    assert {c: f["fit"] for c, f in fitted.items()} == {"leace": "independent", "leace_sequential": "sequential",
                                                        "leace_refit": "independent"}
    assert {f["column"] for f in fitted.values()} == {"stereotyped_gender"}
    assert [c for c, f in fitted.items() if "refit_every" in f] == ["leace_refit"]
    card = (tmp_path / "out" / "model_card_leace_sequential.md").read_text()
    assert "fitted layer after layer, each with the erasers before it on, on the base model's residual stream" in card
    assert "| all | sequential |" in card
    card = (tmp_path / "out" / "model_card_leace_refit.md").read_text()
    assert "and fitted again on the model being trained after every 1 optimizer steps" in card
    assert "| all | independent, refitted after every 1 steps |" in card
    run = next(r for r in summary["runs"] if r["condition"] == "leace_refit")
    steps = run["ablation"]["fitted_on"]["refit_steps"]
    assert run["ablation"]["fitted_on"]["refit_every"] == 1 and steps == list(range(1, len(steps) + 1)) and steps


def test_no_model_card_without_a_caft_run(tiny_setup, tmp_path, capsys):
    config = recipe_config(tiny_setup, tmp_path / "out", ["none", "test_only"], train_size=8, eval_size=4)
    run_recipe("gender_bias", config)
    assert not (tmp_path / "out" / "model_card.md").exists()  # the adapter only ablated the plain model at test time
    assert ("no model card: no caft, caft_annealed, leace, leace_sequential, leace_refit, leace_contrast run in gender_bias's results"
            in capsys.readouterr().out)


def test_results_file_refuses_runs_with_a_redone_search_under_the_same_paths(tiny_setup, tmp_path):
    import shutil

    adapter, attribution = tmp_path / "search" / "adapter", tmp_path / "search" / "attribution.json"
    shutil.copytree(tiny_setup / "adapter", adapter)
    shutil.copy(tiny_setup / "attribution.json", attribution)
    config = recipe_config(tiny_setup, tmp_path / "out", ["caft", "top_k"], adapter=str(adapter), attribution=str(attribution))
    first = run_recipe("gender_bias", config)
    assert set(first["inputs"]) == {"adapter", "attribution", "templates_file", "professions_file"}
    assert first["inputs"]["adapter"]["path"] == str(adapter) and first["inputs"]["templates_file"]["path"] is None

    redone = ConceptAblationConfig.from_pretrained(adapter)
    redone.latents = {1: [3, 4]}  # the search chose other latents and wrote them to the same folder
    redone.to_json_file(adapter / "concept_ablation_config.json")
    with pytest.raises(ValueError, match=r"made with another \['adapter'\] \(other content, by its sha256"):
        run_recipe("gender_bias", config, ["seeds=[1]"])
    shutil.copytree(tiny_setup / "adapter", adapter, dirs_exist_ok=True)
    attribution.write_text(json.dumps(json.loads(attribution.read_text())[::-1]))  # another ranking
    with pytest.raises(ValueError, match=r"made with another \['attribution'\]"):
        run_recipe("gender_bias", config, ["seeds=[1]"])


def test_a_results_file_resumes_and_records_the_task_files_it_was_made_with(tiny_setup, tmp_path, capsys):
    groups = tmp_path / "groups.json"
    shutil.copy(DEFAULT_PROFESSIONS_FILE, groups)  # the project's groups, as a user's file
    config = recipe_config(tiny_setup, tmp_path / "out", ["caft"], train_size=8, eval_size=4)
    first = run_recipe("gender_bias", config, [f"task.professions_file={groups}"])
    assert first["inputs"]["professions_file"] == {"path": str(groups), "sha256": hashlib.sha256(
        groups.read_bytes()).hexdigest()}
    path = tmp_path / "out" / "gender_bias.json"
    recorded = json.loads(path.read_text())
    capsys.readouterr()
    again = run_recipe("gender_bias", config, [f"task.professions_file={groups}", "seeds=[0,1]"])
    assert "caft seed 0: already in" in capsys.readouterr().out
    assert again["inputs"] == first["inputs"] and again["summary"]["caft"]["seeds"] == [0, 1]
    assert again["summary"]["caft"]["did_not_learn"] == [r["seed"] for r in again["runs"] if did_not_learn(r["val"])]
    # the same content under another path (here the project's own file) is the same input; other content is not
    assert run_recipe("gender_bias", config, ["seeds=[0]"])["inputs"]["professions_file"]["path"] is None
    groups.write_text(groups.read_text() + "\n")  # the same groups, but the recorded sha256 no longer holds
    with pytest.raises(ValueError, match=r"made with another \['professions_file'\]"):
        run_recipe("gender_bias", config, [f"task.professions_file={groups}"])
    other = {**recorded["inputs"]["adapter"], "sha256": "0" * 64}  # another search's adapter under the same path
    path.write_text(json.dumps({**recorded, "inputs": {"adapter": other}}))
    with pytest.raises(ValueError, match=r"made with another \['adapter'\]"):
        run_recipe("gender_bias", config)


def test_double_mc_recipe_skyline_and_pairs(tiny_setup, tmp_path):
    config = recipe_config(tiny_setup, tmp_path / "dmc", ["none"], train_size=8, eval_size=4)
    summary = run_recipe("double_mc", config, ["task.mode=skyline", "task.sources=[verbs]"])
    assert set(summary) == {"skyline-verbs"}
    summary = run_recipe("double_mc", config, ["task.combinations=[verbs|sentiment|sentiment,verbs|sentiment|verbs]"])
    assert set(summary) == {"verbs-sentiment-sentiment", "verbs-sentiment-verbs"}
    assert (tmp_path / "dmc" / "verbs-sentiment-sentiment.png").is_file()
    # one plain model serves both intended questions (they share D_amb)
    sibling_file = json.loads((tmp_path / "dmc" / "verbs-sentiment-verbs.json").read_text())
    (sibling,) = sibling_file["runs"]
    assert sibling["trained_for"] == "verbs-sentiment-sentiment"
    assert set(sibling_file["inputs"]) == {"source_files.verbs", "source_files.sentiment"}  # built from the same files


def test_double_mc_pair_trains_one_plain_model_for_both_test_only_runs(tiny_setup, tmp_path, capsys):
    config = recipe_config(tiny_setup, tmp_path / "dmc", ["none", "test_only"], train_size=8, eval_size=4)
    keys = "task.combinations=[verbs|sentiment|sentiment,verbs|sentiment|verbs]"
    summary = run_recipe("double_mc", config, [keys, "save_models=[none]"])
    assert capsys.readouterr().out.count("training none") == 1
    for name in ("verbs-sentiment-sentiment", "verbs-sentiment-verbs"):
        assert set(summary[name]) == {"none", "test_only"}
        runs = {r["condition"]: r for r in json.loads((tmp_path / "dmc" / f"{name}.json").read_text())["runs"]}
        assert runs["test_only"]["deployed"]["ood"] == runs["none"]["ood"]  # the same plain model, ablation off
    # the sibling's test_only run is the saved plain model with the adapter injected, on the sibling's splits
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dmc" / "models" / "verbs-sentiment-sentiment" / "none-seed0")
    ConceptAblation.from_pretrained(plain, tiny_setup / "adapter")
    val = subsample(build_double_mc_datasets("verbs", "sentiment", "verbs")["val"], 4)
    expected = evaluate_multiple_choice(plain, make_tiny_tokenizer(), val, ablation=True)
    recorded = runs["test_only"]["val"]
    assert recorded["accuracy"] == expected["accuracy"]
    assert recorded["logit_diff"] == pytest.approx(expected["logit_diff"], abs=1e-5)
    assert recorded["logit_diff"] != pytest.approx(runs["test_only"]["deployed"]["val"]["logit_diff"], abs=1e-7)
    run_recipe("double_mc", config, [keys])
    assert "training" not in capsys.readouterr().out  # everything was recorded


def test_double_mc_leace_contrast_erases_each_combinations_unintended_answer_values(tiny_setup, tmp_path):
    """``leace_contrast`` on double multiple choice fits its erasers on the unintended source set's questions grouped
    by answer value: sentiment's for ``verbs|sentiment|verbs``, the verbs' number for ``verbs|sentiment|sentiment``."""
    config = recipe_config(tiny_setup, tmp_path / "dmc", ["leace_contrast"], train_size=8, eval_size=4)
    keys = "task.combinations=[verbs|sentiment|sentiment,verbs|sentiment|verbs]"
    summary = run_recipe("double_mc", config, [keys])
    assert all(set(summary[name]) == {"leace_contrast"} for name in summary)
    fitted = {path.parent.parent.name: json.loads(path.read_text())["fitted_on"]
              for path in (tmp_path / "dmc" / "erasers").glob("*/*/concept_ablation_config.json")}
    assert fitted["verbs-sentiment-verbs"]["classes"] == ["negative", "positive"]
    assert fitted["verbs-sentiment-sentiment"]["classes"] == ["plural", "singular"]
    assert {f["source"] for f in fitted.values()} == {"contrast texts"}
    with pytest.raises(ValueError, match="a skyline run has no unintended concept"):
        run_recipe("double_mc", config, ["task.mode=skyline", "task.sources=[verbs]"])


def test_double_mc_adapters_dir_gives_each_combination_its_search(tiny_setup, tmp_path):
    import shutil

    searches = tmp_path / "search"
    for name in ("verbs-sentiment-sentiment", "verbs-sentiment-verbs"):
        shutil.copytree(tiny_setup / "adapter", searches / name)
    shutil.copy(tiny_setup / "attribution.json", searches / "verbs-sentiment-sentiment")  # a PCA search writes none
    config = recipe_config(tiny_setup, tmp_path / "dmc", ["none", "caft"], train_size=8, eval_size=4,
                     adapter=None, attribution=None)
    keys = "task.combinations=[verbs|sentiment|sentiment,verbs|sentiment|verbs]"
    summary = run_recipe("double_mc", config, [keys, f"task.adapters_dir={searches}"])
    for name in ("verbs-sentiment-sentiment", "verbs-sentiment-verbs"):
        assert set(summary[name]) == {"none", "caft"}
        header = json.loads((tmp_path / "dmc" / f"{name}.json").read_text())
        assert header["config"]["adapter"] == str(searches / name)
    assert header["config"]["attribution"] is None
    with pytest.raises(ValueError, match=r"top_k.*needs `attribution`"):  # the second search has no table
        run_recipe("double_mc", config, [keys, f"task.adapters_dir={searches}", "conditions=[none,top_k]"])
    with pytest.raises(FileNotFoundError, match=r"holds no adapter .* for 'sports\|verbs\|verbs'"):
        run_recipe("double_mc", config, ["task.combinations=sports|verbs|verbs", f"task.adapters_dir={searches}"])
    with pytest.raises(ValueError, match=r"its own \['adapter'\]: leave experiment \['adapter'\] unset"):
        run_recipe("double_mc", config, [keys, f"task.adapters_dir={searches}", f"adapter={searches}"])


def test_double_mc_cards_per_combination_record_the_command_it_was_started_with(tiny_setup, tmp_path):
    config = recipe_config(tiny_setup, tmp_path / "dmc", ["none", "caft"], train_size=8, eval_size=4, save_models=["caft"])
    keys = "task.combinations=[verbs|sentiment|sentiment,verbs|sentiment|verbs]"
    run_recipe("double_mc", config, [keys], command="accelerate launch recipes/double_mc.py KEYS")
    for name in ("verbs-sentiment-sentiment", "verbs-sentiment-verbs"):
        card = (tmp_path / "dmc" / f"{name}_model_card.md").read_text()
        assert f"# CAFT on double multiple choice: {name}\n" in card and f"![accuracy by condition]({name}.png)" in card
        assert "```\naccelerate launch recipes/double_mc.py KEYS\n```" in card  # not pytest's command line
        (caft,) = [r for r in json.loads((tmp_path / "dmc" / f"{name}.json").read_text())["runs"]
                   if r["condition"] == "caft"]
        checkpoint = tmp_path / "dmc" / "models" / name / "caft-seed0"
        own = f"val {caft['val']['accuracy']:.3f}, OOD {caft['ood']['accuracy']:.3f} (ablation removed)"
        assert (checkpoint / "README.md").read_text() == card.replace(
            "at layers 1\n", f"at layers 1\n- **This model:** the `caft` model of seed 0: {own}\n")
        assert (checkpoint / f"{name}.png").is_file()
    assert not (tmp_path / "dmc" / "model_card.md").exists()


BAD_SETTINGS = [
    ("gender_bias", "conditions=[magic]", r"unknown condition\(s\) \['magic'\]"),
    ("gender_bias", "training.lr=0.1", r"unknown training setting\(s\) \['lr'\]"),
    ("gender_bias", "epochs=3", r"unknown experiment setting\(s\) \['epochs'\]"),
    ("gender_bias", "conditions=[test_only]", r"'test_only' evaluates the 'none' model"),
    ("gender_bias", "task.templates=foo.jsonl",
     r"unknown task setting\(s\) \['templates'\] for gender_bias; known: .*'templates_file'"),
    ("gender_bias", "task.seed=abc", r"task.seed must be a whole number >= 0, got 'abc'"),
    ("double_mc", "task.mode=skylines", r"task.mode must be one of \['pairs', 'skyline'\], got 'skylines'"),
    ("gender_bias", "training.epochs=0", r"training setting epochs must be a number in \(0, inf\), got 0"),
    ("gender_bias", "training.warmup_ratio=1.0", r"training setting warmup_ratio must be a number in \[0, 1\), got 1.0"),
    ("gender_bias", "anneal=linear", r"anneal must be a mapping of settings, got 'linear'"),
    ("gender_bias", "saes.3=PATH", r"saes.3 must be a mapping of SAESource fields .* got 'PATH'"),
]


@pytest.mark.parametrize("recipe, override, message", BAD_SETTINGS, ids=[o for _, o, _ in BAD_SETTINGS])
def test_recipe_settings_are_checked_before_any_work(tiny_setup, tmp_path, recipe, override, message):
    config = recipe_config(tiny_setup, tmp_path / "bad", ["none"])
    with pytest.raises(ValueError, match=message):
        run_recipe(recipe, config, [override])
    assert not (tmp_path / "bad").exists()


def test_random_condition_of_a_directions_adapter_draws_random_directions(tiny_setup, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_setup / "model")
    directions = {1: torch.nn.functional.normalize(torch.randn(3, 64), dim=-1), 2: torch.randn(1, 64)}
    centers = {1: torch.randn(64)}  # mean ablation at layer 1, zero ablation at layer 2
    handle = inject_concept_ablation(model, ConceptAblationConfig(layers=[1, 2], mode="projection", directions=directions,
                                                                  centers=centers))
    handle.save_pretrained(tmp_path / "directions")
    config = recipe_config(tiny_setup, tmp_path / "out", ["none", "random", "test_only"],
                     adapter=str(tmp_path / "directions"), attribution=None)
    runs = {(r["condition"], r["seed"]): r for r in run_recipe("gender_bias", config, ["seeds=[0,1]"])["runs"]}
    assert set(runs) == {(c, s) for c in ("none", "random", "test_only") for s in (0, 1)}
    for seed in (0, 1):
        ablation = runs[("random", seed)]["ablation"]
        assert ablation["mode"] == "projection" and ablation["layers"] == [1, 2] and ablation["directions"] == [1, 2]
    drawn = [random_directions_config(ConceptAblationConfig.from_pretrained(tmp_path / "directions"), s) for s in (0, 0, 1)]
    assert {k: v.shape for k, v in drawn[0].directions.items()} == {1: (3, 64), 2: (1, 64)}
    assert torch.allclose(drawn[0].directions[1].norm(dim=-1), torch.ones(3))
    assert set(drawn[0].centers) == {1} and torch.allclose(drawn[0].centers[1], centers[1])
    assert torch.equal(drawn[0].directions[1], drawn[1].directions[1])
    assert not torch.equal(drawn[0].directions[1], drawn[2].directions[1])
    with pytest.raises(ValueError, match="'top_k' needs `attribution`"):
        run_recipe("gender_bias", config, ["conditions=[top_k]"])


def test_baselines_of_a_projection_mode_sae_adapter_ablate_in_projection_mode(tiny_setup, tmp_path):
    adapter = ConceptAblationConfig.from_pretrained(tiny_setup / "adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny_setup / "model")
    projection = dataclasses.replace(adapter, mode="projection")
    inject_concept_ablation(model, projection).save_pretrained(tmp_path / "projection")
    config = recipe_config(tiny_setup, tmp_path / "out", ["random", "top_k"], adapter=str(tmp_path / "projection"))
    runs = run_recipe("gender_bias", config)["runs"]
    assert {r["condition"]: r["ablation"]["mode"] for r in runs} == {"random": "projection", "top_k": "projection"}


def test_numbers_in_exponent_form_are_floats(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("experiment:\n  training:\n    learning_rate: 5e-5\n")
    config = load_recipe_config(path, ["experiment.training.weight_decay=1E-2", "experiment.output_dir=1e-5x",
                                       "experiment.seeds=[0,1]"])["experiment"]
    assert config["training"] == {"learning_rate": 5e-5, "weight_decay": 0.01}
    assert config["output_dir"] == "1e-5x" and config["seeds"] == [0, 1]


def test_shipped_recipe_configs_point_at_what_the_search_writes():
    """The search writes the adapter into its ``--out`` folder and the attribution table beside it."""
    checked = []
    for path in packaged_configs().values():
        experiment = load_recipe_config(path, [])["experiment"]
        if experiment.get("adapter") is None:
            continue
        adapter = experiment["adapter"]
        assert f"--out {adapter}\n" in path.read_text(), f"{path.name}: its search command writes elsewhere than {adapter}"
        assert Path(experiment["attribution"]) == Path(adapter) / "attribution.json"
        checked.append(path.name)
    assert "gender_bias.yaml" in checked


def test_the_recipe_configs_ship_inside_the_package_and_the_repository_links_to_them():
    """``recipes/configs/`` (what ``--config recipes/configs/<name>.yaml`` names) holds links to the packaged
    configs, so a config added or changed there is one an installed package has too."""
    packaged = packaged_configs()
    linked = sorted((REPO / "recipes" / "configs").iterdir())
    assert [p.name for p in linked] == [f"{name}.yaml" for name in packaged]
    for path in linked:
        assert path.is_symlink() and path.resolve() == packaged[path.stem].resolve(), f"{path} is not a link to {packaged[path.stem]}"


def test_the_model_card_template_ships_inside_the_package():
    """A non-editable install has only the package: the template must be package data, not a repository file."""
    import configparser

    import hf_concept_ablation
    from hf_concept_ablation.experiments.report import MODEL_CARD_TEMPLATE

    package = Path(hf_concept_ablation.__file__).resolve().parent
    relative = MODEL_CARD_TEMPLATE.relative_to(package)
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    globs = setup["options.package_data"]["hf_concept_ablation"].replace(",", " ").split()
    assert "assets/**/*" in globs and relative.parts[0] == "assets"
    assert (REPO / "model_cards" / MODEL_CARD_TEMPLATE.name).read_text() == MODEL_CARD_TEMPLATE.read_text()


def test_an_override_that_is_not_yaml_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("experiment:\n  seeds: [0]\n")
    with pytest.raises(ValueError, match=r"override 'experiment.seeds=\[0,1': the value is not valid YAML"):
        load_recipe_config(path, ["experiment.seeds=[0,1"])


def test_an_empty_section_takes_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task:\nexperiment:\n")
    assert load_recipe_config(path, ["experiment.seeds=[1]"])["experiment"] == {"seeds": [1]}


@pytest.mark.parametrize("content, message", [
    (b"42\n", r"r.yaml must hold a mapping of sections \('task', 'experiment'\), got 42"),
    (b"experiments\n", r"r.yaml must hold a mapping of sections .* got 'experiments'"),
    (b"experiment:\n  seeds: [0]\n  seeds: [1, 2]\n", r"(?s)r.yaml is not valid YAML: .*found duplicate key 'seeds'\n  "
                                                      r"in \"<byte string>\", line 3"),
    ("experiment:\n  output_dir: caf\u00e9\n".encode("cp1252"), r"r.yaml is not valid YAML: .*invalid continuation byte"),
], ids=["int", "string", "duplicate key", "not utf-8"])
def test_a_malformed_recipe_file_is_named(tmp_path, content, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_recipe_config(path)


def test_double_mc_sources_and_source_files_are_checked(tmp_path):
    path = tmp_path / "capitals.csv"
    path.write_text("\n".join(["question,correct,incorrect"] + [f"Capital of {i},city{i},town{i}" for i in range(40)]))
    (skyline,) = double_mc_runs({"mode": "skyline", "sources": "verbs"})
    assert skyline.name == "skyline-verbs" and list(skyline.task_files) == ["source_files.verbs"]
    runs = double_mc_runs({"combinations": ["capitals|verbs|verbs", "verbs|sentiment|sentiment"], "max_examples": 20,
                            "source_files": {"capitals": str(path)}})  # a set of its own, used by one combination
    assert [run.data["train"][0]["first"] for run in runs] == ["capitals", "verbs"]
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    assert runs[0].task_files == {"source_files.capitals": {"path": str(path), "sha256": sha256},
                                  "source_files.verbs": skyline.task_files["source_files.verbs"]}
    assert skyline.task_files["source_files.verbs"]["path"] is None  # the project's own
    assert list(runs[1].task_files) == ["source_files.verbs", "source_files.sentiment"]
    with pytest.raises(ValueError, match=r"unknown source set\(s\) \['verb'\] in source_files"):
        double_mc_runs({"combinations": "verbs|sentiment|sentiment", "source_files": {"verb": str(path)}})
    with pytest.raises(ValueError, match=r"source_files must map source set names to files, got '.*capitals.csv'"):
        double_mc_runs({"mode": "skyline", "sources": ["verbs"], "source_files": str(path)})


def test_model_card_command_is_how_the_run_was_started(monkeypatch):
    from hf_concept_ablation import __main__ as command
    from hf_concept_ablation.experiments.report import launch_command

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert launch_command([str(REPO / "recipes" / "gender_bias.py"), "seeds=[0,1]"]) == \
        "python recipes/gender_bias.py 'seeds=[0,1]'"
    assert launch_command([command.__file__, "report", "--out", "a b"]) == "python -m hf_concept_ablation report --out 'a b'"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # set by accelerate's launchers
    assert launch_command(["recipes/double_mc.py"]) == "accelerate launch recipes/double_mc.py"


def test_what_would_fail_after_training_is_named_before_it(tiny_setup, tmp_path, capsys):
    from hf_concept_ablation.experiments.runner import (
        ExperimentConfig,
        run_experiment,
        searched_sae_sources,
    )

    experiment = load_recipe_config(recipe_config(tiny_setup, tmp_path / "early", ["none", "random"]))["experiment"]
    data = build_gender_datasets()
    bad_ood = data["ood"].map(lambda row: {"distractor": "w5 w6"})  # a user's skyline words, say
    with pytest.raises(ValueError, match=r"'w5 w6'"):
        run_experiment(ExperimentConfig.from_dict(experiment), {**data, "ood": bad_ood}, name="gender_bias")
    with pytest.raises(ValueError, match=r"condition 'random' with a latent adapter needs `attribution`"):
        run_experiment(ExperimentConfig.from_dict({**experiment, "attribution": None}), data, name="gender_bias")
    # the adapter ablates layer 1 only, the table also ranks layer 2: random may draw there, and needs its SAE
    without = {**experiment, "saes": {}}
    with pytest.raises(ValueError, match=r"'random' may draw latents at layer\(s\) \[2\], which have no SAE source"):
        run_experiment(ExperimentConfig.from_dict(without), data, name="gender_bias")
    assert "training" not in capsys.readouterr().out
    search = tmp_path / "search"  # an adapter written by a concept search names every searched layer's SAE
    shutil.copytree(tiny_setup / "adapter", search)
    (search / SELECTION_NAME).write_text(json.dumps({"sae_sources": {"1": {"path": str(tiny_setup / "sae_1")},
                                                                     "2": {"path": str(tiny_setup / "sae_2")}}}))
    assert searched_sae_sources(search) == {layer: SAESource(path=str(tiny_setup / f"sae_{layer}")) for layer in (1, 2)}
    assert searched_sae_sources(tiny_setup / "adapter") == {}


def test_model_card_keeps_its_tables_whole():
    from hf_concept_ablation.experiments.report import render_model_card

    config = ConceptAblationConfig(layers=[1], latents={1: [5]}, saes={1: SAESource(path="/saes/layer_1")})
    selection = {"selected": [{"layer": 1, "latent": 5, "effect": 0.5, "explanation": "he | she\npronouns"}]}
    one_seed = {"seeds": [0], "val": [1.0], "ood": [0.25], "val_mean": 1.0, "ood_mean": 0.25, "ood_sem": 0.0}
    card = render_model_card({"summary": {"caft": one_seed},
                              "config": {"model": "embedded", "preset": "paper", "training": {"epochs": 2}}},
                             config, title="t", task="t", command="c", selection=selection)
    assert "| 1 | 5 | +0.500 |  | he \\| she pronouns |" in card  # one row, five cells
    assert "| CAFT | 1.000 | 0.250 | 1 |" in card  # no standard error from one seed
    assert "| epochs | `2` |" in card and "| learning_rate | `5e-06` |" in card


def test_model_card_names_each_direction_by_its_search_component():
    from hf_concept_ablation.experiments.report import render_model_card

    config = ConceptAblationConfig(layers=[6], mode="projection", directions={6: torch.randn(2, 8)})
    selection = {"selected": [{"layer": 6, "component": 1, "contrast": 2.0}, {"layer": 6, "component": 3, "contrast": -1.5}]}
    one_seed = {"seeds": [0], "val": [1.0], "ood": [0.25], "val_mean": 1.0, "ood_mean": 0.25, "ood_sem": 0.0}
    results = {"summary": {"caft": one_seed}, "config": {"model": "embedded", "preset": "paper"}}
    card = render_model_card(results, config, title="t", task="t", command="c", selection=selection)
    assert "| 6 | component 1 |  | +2.00 |  |\n| 6 | component 3 |  | -1.50 |  |\n" in card  # PCA chose 1 and 3
    card = render_model_card(results, config, title="t", task="t", command="c")  # no search beside the adapter
    assert "| 6 | direction 0 |  |  |  |\n| 6 | direction 1 |  |  |  |\n" in card


@pytest.mark.parametrize("model, base_model", [
    ("embedded", "google/gemma-3-270m"), ("google/gemma-2-2b", "google/gemma-2-2b"),
    ("/home/alice/models/x", None), ("unknown", None), ("models/mine", None),
], ids=["embedded", "hub id", "absolute path", "no org", "local folder"])
def test_model_card_base_model_is_the_experiments_hub_model(model, base_model, tmp_path, monkeypatch):
    from hf_concept_ablation.experiments.report import render_model_card

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)  # a local folder named like a Hub id
    config = ConceptAblationConfig(layers=[1], latents={1: [5]}, saes={1: SAESource(path="/saes/layer_1")},
                                   base_model_name_or_path="/home/bob/adapter-base")
    one_seed = {"seeds": [0], "val": [1.0], "ood": [0.25], "val_mean": 1.0, "ood_mean": 0.25, "ood_sem": 0.0}
    run = {"model": model, "preset": "paper", "eval_size": 8, "dtype": "bfloat16", "anneal": {"kind": "cosine"}}
    card = render_model_card({"summary": {"caft": one_seed}, "config": run}, config, title="t", task="t", command="c")
    front_matter = card.split("---")[1]
    assert front_matter.startswith("\nlibrary_name: hf_concept_ablation\n")
    assert (f"\nbase_model: {base_model}\n" in front_matter) if base_model else "base_model" not in front_matter
    assert "bob" not in card and f"- **Base model:** `{base_model or model}`" in card
    assert f"| model | `{model}` |" in card and "| eval_size | `8` |" in card and "| dtype | `bfloat16` |" in card
    assert "| anneal | `{'kind': 'cosine'}` |" in card


def test_a_run_interrupted_mid_training_resumes_from_its_last_checkpoint(tiny_setup, tmp_path, monkeypatch, capsys):
    from transformers import TrainerCallback

    from hf_concept_ablation.experiments import runner as experiment

    def run(out: Path, *overrides: str) -> dict:
        return run_recipe("gender_bias", recipe_config(tiny_setup, out, ["caft_annealed"]), ["save_steps=1", *overrides])

    whole = run(tmp_path / "whole")["runs"][0]  # 4 steps (16 examples, batch 4, 1 epoch), uninterrupted
    assert not (tmp_path / "whole" / "training").exists()  # the checkpoints go once the run is recorded
    real_fine_tune = experiment.fine_tune
    steps: list[int] = []

    class StopDuringStepThree(TrainerCallback):  # after step 2's checkpoint, before step 3's
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)
            if stop and state.global_step == 3:
                raise KeyboardInterrupt

    def watched(*args, callbacks=(), **kwargs):
        return real_fine_tune(*args, callbacks=[*callbacks, StopDuringStepThree()], **kwargs)

    monkeypatch.setattr(experiment, "fine_tune", watched)
    stop = True
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    cut = experiment.ExperimentConfig(conditions=["none"], output_dir=str(tmp_path / "cut"))
    folder = experiment.training_dir(cut, "gender_bias", "caft_annealed", 0)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    shutil.copytree(folder / "checkpoint-2", folder / "checkpoint-3")  # as a save killed midway leaves it:
    (folder / "checkpoint-3" / "trainer_state.json").unlink()  # the state is written last
    stop, steps[:] = False, []
    capsys.readouterr()
    resumed = run(tmp_path / "cut")["runs"][0]
    assert f"resuming from {folder / 'checkpoint-2'}" in capsys.readouterr().out
    assert steps == [3, 4]  # only the steps left
    assert resumed["ablation"]["alpha"] == whole["ablation"]["alpha"]  # the schedule went on from step 2
    assert {k: resumed[k] for k in ("val", "ood", "val_ablated", "ood_ablated")} == \
        {k: whole[k] for k in ("val", "ood", "val_ablated", "ood_ablated")}
    assert not folder.exists()

    stop, steps[:] = True, []  # checkpoints of other settings (the results file deleted, the settings changed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "other")
    (tmp_path / "other" / "gender_bias.json").unlink(missing_ok=True)
    stop, steps[:] = False, []
    capsys.readouterr()
    run(tmp_path / "other", "training.learning_rate=0.002")
    assert "resuming" not in capsys.readouterr().out and steps == [1, 2, 3, 4]
