"""`make reproduce` end to end on a tiny model: search, validity scan, every condition, summary, figures, README."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import (
    gender_concept_words,
    make_sae,
    make_tiny_model,
    make_tiny_tokenizer,
)
from safetensors.torch import load_file

from hf_concept_ablation import ConceptAblationConfig, cli
from hf_concept_ablation.adapter import model as model_module
from hf_concept_ablation.adapter.config import CONFIG_NAME, WEIGHTS_NAME
from hf_concept_ablation.experiments import study as reproduce
from hf_concept_ablation.files import write_json_atomic
from hf_concept_ablation.search import pipeline as directions
from hf_concept_ablation.search.config import SearchConfig

CONDITIONS = reproduce.STUDY_CONDITIONS  # the paper's, which a study runs by default
KEYS = ["verbs|sentiment|sentiment", "sentiment|verbs|verbs", "verbs|sentiment|verbs"]  # the first and last: one pair


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_reproduce")
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer(gender_concept_words())
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    search = {"layers": [1, 2], "saes": {}}
    for layer in (1, 2):
        make_sae("standard", d_sae=128, seed=layer, layer=layer).save_model(root / f"sae_{layer}")
        search["saes"][layer] = str(root / f"sae_{layer}")
    return root, search


def test_reproduce_writes_summary_figures_and_readme_table(tiny_folders, tmp_path, monkeypatch, capsys):
    root, search = tiny_folders
    monkeypatch.setattr(reproduce, "MIN_PLAIN_VAL", 1e-9)  # one epoch of a tiny random model learns little
    monkeypatch.setattr(reproduce, "MAX_PLAIN_OOD", 1.0)  # ... so keep every combination it scans
    size = reproduce.ReproduceSize(train_size=16, eval_size=8, epochs=1, search_examples=16, min_contrast=0.0,
                                   training={"learning_rate": 1e-3, "batch_size": 4, "warmup_ratio": 0.0})
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{reproduce.README_MARKERS[0]}\nold table\n{reproduce.README_MARKERS[1]}\n\nmore\n")
    out = tmp_path / "results"
    out.mkdir()
    dropped = "pronouns|verbs|pronouns"  # scanned before, by the same settings: learned nothing (and no pair here)
    stamp = {"seed": 0, "model": str(root / "model"), "size": dataclasses.asdict(size), "preset": "gemma3-270m"}
    (out / "validity.json").write_text(json.dumps({dropped: {**stamp, "val": 0.0, "ood": 0.5}}))
    summary = reproduce.reproduce(out, size, [0, 1], reproduce.TASKS, [*KEYS, dropped], CONDITIONS,
                                  model=str(root / "model"), search=search, readme=readme)

    validity = json.loads((out / "validity.json").read_text())
    assert set(validity) == {*KEYS, dropped} and not validity.pop(dropped)["valid"]
    assert not (out / "search" / reproduce.file_name(dropped)).exists()
    for entry in validity.values():
        assert entry["learned"] == (entry["val"] >= reproduce.MIN_PLAIN_VAL) and entry["seed"] == 0
        assert entry["valid"] == (entry["learned"] and entry["ood"] <= reproduce.MAX_PLAIN_OOD)
    valid = [k for k in KEYS if validity[k]["valid"]]
    assert valid == KEYS, validity

    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary and set(saved) == {"gender_bias", "double_mc"}
    assert set(saved["double_mc"]) == set(valid)
    for per_condition in [saved["gender_bias"], *saved["double_mc"].values()]:
        assert set(per_condition) == set(CONDITIONS)
        for entry in per_condition.values():
            assert len(entry["val"]) == len(entry["ood"]) == 2
            assert entry["ood_mean"] == pytest.approx(sum(entry["ood"]) / 2) and entry["ood_sem"] >= 0
    # the scan's plain run is reused as seed 0 of `none`, not trained again
    for key in valid:
        runs = json.loads((out / "runs" / f"{reproduce.file_name(key)}.json").read_text())["runs"]
        assert sum(r["condition"] == "none" and r["seed"] == 0 for r in runs) == 1
        assert saved["double_mc"][key]["none"]["ood"][0] == validity[key]["ood"]
    # the pair's second intended question got every plain model, and its test-time ablations, from the first's
    mate = json.loads((out / "runs" / "verbs-sentiment-verbs.json").read_text())["runs"]
    plain = [r for r in mate if r["condition"] in ("none", "test_only")]
    assert len(plain) == 4 and all(r.get("trained_for") == "verbs-sentiment-sentiment" for r in plain
                                   if r["condition"] == "none")
    assert capsys.readouterr().out.count("[verbs-sentiment-verbs] training none") == 0

    assert (out / "figures" / "gender_bias.png").stat().st_size > 5000
    assert (out / "figures" / "double_mc_overview.png").stat().st_size > 5000
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Title") and text.endswith("more\n")
    assert "did not learn the task, val < 1e-09): `pronouns|verbs|pronouns` (val 0.00)" in text
    assert "| gender bias |" in text and f"hf-concept-ablation report --out {out}" in text
    assert (out / "README.md").read_text().count("| gender bias |") == 1

    again = reproduce.reproduce(out, size, [0, 1], reproduce.TASKS, KEYS, CONDITIONS, model=str(root / "model"),
                                search=search, readme=readme)
    assert again == summary  # everything reused
    table = text[text.index(reproduce.README_MARKERS[0]):]
    part = reproduce.reproduce(out, size, [1], ["gender_bias"], [], ["none"], model=str(root / "model"),
                               search=search, readme=readme)
    assert part == summary  # a run of one task and seed reports every run on disk ...
    assert readme.read_text().endswith(table) and "| `verbs\\|sentiment\\|verbs` |" in table  # ... the table too


def test_results_table_names_dropped_combinations_and_double_mc_means():
    entry = lambda ood: {"val": [1.0], "ood": [ood], "val_mean": 1.0, "ood_mean": ood, "ood_sem": 0.0}  # noqa: E731
    summary = {"gender_bias": {"none": entry(0.1), "caft": entry(0.8)},
               "double_mc": {"a|b|b": {"none": entry(0.2), "caft": entry(0.6)},
                             "b|a|a": {"none": entry(0.4), "caft": entry(0.3)}}}
    validity = {k: reproduce.judge({"val": val, "ood": ood})
                for k, val, ood in (("a|b|b", 1.0, 0.2), ("b|a|a", 0.95, 0.4), ("c|a|a", 1.0, 0.97), ("a|c|c", 0.6, 0.3))}
    validity["a|d|d"] = reproduce.judge({"val": 1.0, "ood": 0.95, "seeds": [0, 1, 2]})
    assert [v["valid"] for v in validity.values()] == [True, True, False, False, False]
    table = reproduce.results_markdown(summary, validity, "cmd")
    assert "OOD > 0.9): `a|d|d` (0.95, 3 seeds), `c|a|a` (0.97)." in table
    assert "did not learn the task, val < 0.9): `a|c|c` (val 0.60)." in table
    scan = reproduce.validity_markdown(validity)
    assert "| `a\\|b\\|b` | 1.00 | 0.20 | valid |" in scan
    assert "| `c\\|a\\|a` | 1.00 | 0.97 | dropped: no shortcut |" in scan
    assert "| `a\\|c\\|c` | 0.60 | 0.30 | dropped: not learned |" in scan
    assert "| `a\\|b\\|b` | 1.00 / 0.20" in table
    assert "CAFT 0.45 (2; beats plain on 50%)" in table and "plain FT 0.30 (2)" in table
    assert "| gender bias: CAFT OOD >= 0.76 with val >= 0.98 | OOD 0.80, val 1.00 (1 seed) | yes |" in table
    assert "| double MC: CAFT beats plain FT on >= 75% of the valid combinations | 50% of 2 | **no** |" in table
    assert "| double MC: CAFT's mean OOD >= 0.64 | 0.45 (plain FT 0.30) | **no** |" in table
    assert "random latents' mean OOD" not in table  # no random runs yet: not judged
    broken = {"val": [0.5], "ood": [0.55], "val_mean": 0.5, "ood_mean": 0.55, "ood_sem": 0.0}
    summary["double_mc"]["a|b|b"]["random"] = broken  # learned nothing: chance OOD beats no one
    table = reproduce.results_markdown(summary, validity, "cmd")
    assert "0.50 / 0.55 ± 0.00 (1) †" in table and "random latents 0.55 (1; beats plain on 0%)" in table
    assert "| double MC: random latents' mean OOD at least 0.1 below CAFT's | random 0.55, CAFT 0.45 | **no** |" in table
    summary["gender_bias"]["random"] = entry(0.6)
    table = reproduce.results_markdown(summary, validity, "cmd")
    assert "| gender bias: random latents' mean OOD at least 0.1 below CAFT's | random 0.60, CAFT 0.80 | yes |" in table
    assert "| gender bias | 1.00 / 0.10 ± 0.00 (1) | 1.00 / 0.80 ± 0.00 (1) |" in table
    flipped = {"val": [1.0, 1.0], "ood": [0.85, 1.0], "val_mean": 1.0, "ood_mean": 0.925, "ood_sem": 0.075}
    summary["double_mc"]["b|a|a"]["none"] = flipped  # valid by its first seed, not by the mean of both
    table = reproduce.results_markdown(summary, validity, "cmd")
    assert "CAFT 0.60 (1; beats plain on 100%)" in table and "plain FT 0.20 (1)" in table
    assert "averaged over its seeds): `b|a|a` (1.00 / 0.93, 2 seeds)." in table


def test_a_dropped_combination_is_judged_again_on_the_plain_mean_and_studied_when_it_passes(tiny_folders, tmp_path,
                                                                                          monkeypatch, capsys):
    root, search = tiny_folders
    monkeypatch.setattr(reproduce, "MIN_PLAIN_VAL", 1e-9)
    monkeypatch.setattr(reproduce, "MAX_PLAIN_OOD", 1.0)
    size = reproduce.ReproduceSize(train_size=8, eval_size=4, epochs=1, search_examples=8, min_contrast=0.0,
                                   training={"learning_rate": 1e-3, "batch_size": 4, "warmup_ratio": 0.0})
    out = tmp_path / "results"
    out.mkdir()
    kept, dropped = "verbs|sentiment|verbs", "verbs|sentiment|sentiment"  # one pair: one training set
    stamp = {"seed": 0, "model": str(root / "model"), "size": dataclasses.asdict(size), "preset": "gemma3-270m"}
    (out / "validity.json").write_text(json.dumps({dropped: {**stamp, "val": 0.0, "ood": 0.5}}))  # the scan's verdict
    summary = reproduce.reproduce(out, size, [0, 1], ["double_mc"], [kept, dropped], ["none", "caft"],
                                  model=str(root / "model"), search=search, readme=None)

    assert not reproduce.read_validity(out / "validity.json")[dropped]["valid"]  # the scan's record is kept
    verdict = reproduce.plain_verdicts(out, reproduce.read_validity(out / "validity.json"))[dropped]
    assert verdict["valid"] and verdict["seeds"] == [0, 1] and verdict["val"] > 0  # the mean of the pair's plain models
    assert set(summary["double_mc"]) == {kept, dropped}  # so it is studied, with every condition and seed
    runs = json.loads((out / "runs" / f"{reproduce.file_name(dropped)}.json").read_text())["runs"]
    assert sorted((r["condition"], r["seed"]) for r in runs) == [("caft", 0), ("caft", 1), ("none", 0), ("none", 1)]
    assert all(r["trained_for"] == reproduce.file_name(kept) for r in runs if r["condition"] == "none")
    assert (out / "search" / reproduce.file_name(dropped) / "concept_ablation_config.json").is_file()
    kept_runs = json.loads((out / "runs" / f"{reproduce.file_name(kept)}.json").read_text())["runs"]
    assert sum(r["condition"] == "none" and r["seed"] == 0 for r in kept_runs) == 1
    assert "Dropped" not in (out / "README.md").read_text()
    # the scan's plain model of seed 0 is trained again only to score the dropped combination, and says so
    assert f"[{reproduce.file_name(kept)}] training none again, for {reproduce.file_name(dropped)}, seed 0" in capsys.readouterr().out


def test_reproduce_with_concept_directions_for_gender(tiny_folders, tmp_path):
    root, search = tiny_folders
    size = reproduce.ReproduceSize(train_size=8, eval_size=4, epochs=1, search_examples=8, min_contrast=0.0,
                                   training={"learning_rate": 1e-3, "batch_size": 4, "warmup_ratio": 0.0})
    summary = reproduce.reproduce(tmp_path / "r", size, [0], ["gender_bias"], [], CONDITIONS, model=str(root / "model"),
                                  search={"layers": [1, 2]}, gender_source="concept",
                                  gender_answer_form="words")
    assert set(summary) == {"gender_bias"}
    assert set(summary["gender_bias"]) == set(CONDITIONS) - {"top_k"}  # no attribution table for top-k
    selection = json.loads((tmp_path / "r" / "search" / "gender_bias" / "selection.json").read_text())
    assert selection["source"] == "concept" and len(selection["selected"]) == 2 * 2
    runs = json.loads((tmp_path / "r" / "runs" / "gender_bias.json").read_text())
    assert runs["runs"][0]["val"]["n"] == 4


def test_validity_scan_trains_each_pair_once_for_both_intended_questions(tiny_folders, tmp_path, capsys):
    root, _ = tiny_folders
    size = reproduce.ReproduceSize(train_size=8, eval_size=4, epochs=1, search_examples=8, min_contrast=0.0,
                                   training={"learning_rate": 1e-3, "batch_size": 4, "warmup_ratio": 0.0})
    keys = ["verbs|sentiment|verbs", "verbs|sentiment|sentiment"]
    validity = reproduce.scan_validity(keys, tmp_path, size, seed=0, model=str(root / "model"))
    assert set(validity) == set(keys)
    assert capsys.readouterr().out.count("training none") == 1
    sibling = json.loads((tmp_path / "runs" / "verbs-sentiment-sentiment.json").read_text())
    (run,) = sibling["runs"]
    assert run["trained_for"] == "verbs-sentiment-verbs" and run["ood"]["n"] == 4
    assert validity["verbs|sentiment|sentiment"]["ood"] == run["ood"]["accuracy"]
    first = json.loads((tmp_path / "runs" / "verbs-sentiment-verbs.json").read_text())
    assert first["runs"][0]["val"] == run["val"]  # same model, same D_val
    again = reproduce.scan_validity(keys, tmp_path, size, seed=1, model=str(root / "model"))
    assert again == validity and "training none" not in capsys.readouterr().out  # kept: validity is per combination
    other_size = reproduce.ReproduceSize(**{**vars(size), "train_size": 12})
    with pytest.raises(ValueError, match=r"validity.json holds a scan of verbs\|sentiment\|\w+ made with other "
                       r"settings \(size: \{.*'train_size': 8.*\} there, \{.*'train_size': 12.*\} now\)"):
        reproduce.scan_validity(keys, tmp_path, other_size, seed=0, model=str(root / "model"))
    assert validity["verbs|sentiment|verbs"]["preset"] == "gemma3-270m"
    with pytest.raises(ValueError, match=r"other settings \(preset: 'gemma3-270m' there, 'paper' now\)"):
        reproduce.scan_validity(keys, tmp_path, size, seed=0, model=str(root / "model"), preset="paper")


def test_report_only_rebuilds_the_report_from_the_runs_on_disk_and_says_so(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    summary = {"none": {"val": [1.0, 1.0], "ood": [0.0, 0.2], "val_mean": 1.0, "ood_mean": 0.1, "ood_sem": 0.1}}
    machine = {"device": "NVIDIA H100 80GB HBM3", "processes": 1}
    (runs / "gender_bias.json").write_text(json.dumps({"summary": summary, "runs": [
        {"condition": "none", "seed": 0, "machine": machine}, {"condition": "none", "seed": 1, "machine": machine}]}))
    (runs / "sports-verbs-verbs.json").write_text(json.dumps({"runs": [{"condition": "none", "seed": 0}]}))
    readme = tmp_path / "repository_README.md"
    readme.write_text("intro\n<!-- results:start -->\nOLD TABLE\n<!-- results:end -->\nrest\n")
    results_page = reproduce.RESULTS_DOC.read_text()
    assert cli.main(["report", "--out", str(tmp_path)]) == 0
    assert reproduce.RESULTS_DOC.read_text() == results_page  # another results folder: its own README only
    assert cli.main(["report", "--out", str(tmp_path), "--readme", str(readme)]) == 0
    assert json.loads((tmp_path / "summary.json").read_text()) == {"gender_bias": summary}
    text = readme.read_text()
    assert "OLD TABLE" not in text and text.startswith("intro") and text.endswith("rest\n")
    assert f"`hf-concept-ablation report --out {tmp_path}` (from the runs on disk)" in text
    assert "| gender bias | 1.00 / 0.10 ± 0.10 (2) |" in text
    assert ("Runs by machine (same protocol and size; machines differ by float rounding): NVIDIA H100 80GB HBM3: 2, "
            "not recorded (runs made before runs named their machine): 1.") in text
    assert (tmp_path / "figures" / "gender_bias.png").is_file()


def test_the_report_includes_the_erasure_study_and_judges_its_targets(tmp_path):
    """``<out>/erasure/gender_bias.json`` (the erasure recipe's results) joins the summary, the table, the figures and
    the targets: the best eraser that learned the task (val >= 0.95) against 0.90 OOD, its random control 0.5 below."""
    def entry(val, ood):
        return {"val": [val] * 5, "ood": [ood] * 5, "val_mean": val, "ood_mean": ood, "ood_sem": 0.0}

    study = {"none": entry(1.0, 0.02), "leace": entry(1.0, 0.94), "leace_contrast": entry(0.85, 0.97),
             "random_eraser": entry(1.0, 0.01)}
    (tmp_path / "runs").mkdir()  # a study folder, with no runs of its own yet
    (tmp_path / "erasure").mkdir()
    (tmp_path / "erasure" / "gender_bias.json").write_text(json.dumps({"summary": study, "runs": []}))
    readme = tmp_path / "page.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    assert cli.main(["report", "--out", str(tmp_path), "--readme", str(readme)]) == 0
    assert json.loads((tmp_path / "summary.json").read_text()) == {"gender_bias_erasure": study}
    text = readme.read_text()
    assert "| gender bias erasure study | 1.00 / 0.02 ± 0.00 (5) |" in text
    # leace_contrast reads higher OOD but did not learn the task (val 0.85): the best eraser is leace
    assert "| LEACE (labels): OOD 0.94, val 1.00 (5 seeds) | yes |" in text
    assert "| random 0.01, LEACE (labels) 0.94 | yes |" in text
    assert (tmp_path / "figures" / "gender_bias_erasure_study.png").is_file()


def test_the_double_mc_eraser_target_is_met_only_with_five_seeds_on_every_valid_combination():
    def entry(val, ood, seeds):
        return {"val": [val] * seeds, "ood": [ood] * seeds, "val_mean": val, "ood_mean": ood, "ood_sem": 0.0}

    def summary(seeds):
        plain = entry(1.0, 0.2, 5)
        return {"double_mc": {
            "a|b|a": {"none": plain, "leace": entry(1.0, 0.9, seeds), "leace_sequential": entry(1.0, 0.1, seeds)},
            "a|b|b": {"none": plain, "leace": entry(1.0, 0.8, seeds), "leace_sequential": entry(1.0, 0.9, seeds)},
            "b|a|b": {"none": plain, "leace": entry(1.0, 0.7, seeds)},
            "b|a|a": {"none": entry(1.0, 0.95, 5)},  # not valid: plain fine-tuning already generalizes
        }}

    row = "| double MC, erasure study: the best eraser beats plain FT on >= 75% of the valid combinations (5 seeds each) "
    assert row + ("| LEACE (labels): 100% of 3 of 3 (fewest seeds: 1; at most 100% whatever its missing seeds give); "
                  "LEACE (labels, sequential): 50% of 2 of 3 (fewest seeds: 1; at most 100% whatever its missing seeds "
                  "give) | **no** |") in reproduce.targets_markdown(summary(1))
    # every eraser is measured, largest share first; the sequential one, on 2 of 3, can no longer win on a|b|a
    assert row + ("| LEACE (labels): 100% of 3 of 3 (fewest seeds: 5); LEACE (labels, sequential): 50% of 2 of 3 "
                  "(fewest seeds: 5; at most 67% whatever its missing seeds give) | yes |") in reproduce.targets_markdown(
                      summary(5))
    partial = summary(5)
    del partial["double_mc"]["b|a|b"]["leace"]  # leace on 2 of the 3 valid combinations
    assert "| LEACE (labels): 100% of 2 of 3 (fewest seeds: 5; at most 100% whatever" in reproduce.targets_markdown(partial)


def test_a_mean_validation_accuracy_of_exactly_the_threshold_counts_as_learned_whatever_float_rounding_does():
    plain = {"ood_mean": 0.5}
    vals = [0.86, 0.96, 0.9, 131 / 150, 136 / 150]  # 675 of 750 questions: 0.9 exactly, 0.8999999999999998 in floats
    assert sum(vals) / len(vals) < 0.9
    assert reproduce.beats_plain(sum(vals) / len(vals), 0.6, plain)
    assert not reproduce.beats_plain(674 / 750, 0.6, plain)  # one question fewer
    assert not reproduce.beats_plain(1.0, 0.5, plain)  # OOD must be above plain's
    assert reproduce.judge({"val": sum(vals) / len(vals), "ood": 0.2})["learned"]  # the validity rule alike


def test_the_reachable_share_counts_missing_seeds_as_perfect_and_settles_what_no_seed_can_change():
    def entry(vals, oods):
        return {"val": vals, "ood": oods, "val_mean": sum(vals) / len(vals), "ood_mean": sum(oods) / len(oods)}

    plain = entry([1.0] * 5, [0.8] * 5)
    valid = {
        "lost": {"none": plain, "leace": entry([0.5, 0.5], [0.5, 0.5])},  # val at most 4/5 = 0.8 < 0.9
        "open": {"none": plain, "leace": entry([1.0], [0.3])},  # OOD at most 4.3/5 = 0.86 > 0.8
        "low": {"none": plain, "leace": entry([1.0, 1.0], [0.0, 0.0])},  # OOD at most 3/5 = 0.6 <= 0.8
        "done": {"none": plain, "leace": entry([1.0] * 5, [0.9] * 5)},
        "unrun": {"none": plain},
    }
    assert reproduce.reachable_share(valid, "leace") == 3 / 5
    assert reproduce.reachable_share(valid, "random_eraser") == 1.0


def test_a_study_takes_the_training_preset_of_its_model(tmp_path):
    adapter = tmp_path / "search"
    adapter.mkdir()
    (adapter / "attribution.json").write_text("[]")
    config = reproduce.experiment_config(reproduce.SIZES["cpu"], [0], ["none", "top_k"], tmp_path / "runs", adapter)
    assert config.preset == "gemma3-270m" and config.conditions == ["none", "top_k"]
    assert reproduce.experiment_config(reproduce.SIZES["cpu"], [0], ["none"], tmp_path, preset="paper").preset == "paper"
    assert cli.build_parser().parse_args(["reproduce", "--preset", "paper"]).preset == "paper"
    (adapter / "attribution.json").unlink()
    assert reproduce.experiment_config(reproduce.SIZES["cpu"], [0], ["none", "top_k"], tmp_path, adapter).conditions == ["none"]


def test_a_search_folder_is_not_reused_with_other_options(tmp_path):
    out = tmp_path / "search"
    out.mkdir()
    (out / "concept_ablation_config.json").write_text("{}")  # a finished search: adapter, then selection.json
    (out / "concept_ablation.safetensors").write_text("")
    (out / "selection.json").write_text("{}")
    size = reproduce.SIZES["cpu"]
    assert reproduce.concept_search("gender_bias", out, size, search={"source": "sae"}) == out
    recorded = json.loads((out / "search_args.json").read_text())
    assert recorded["source"] == "sae" and recorded["min_contrast"] == size.min_contrast and "threads" not in recorded
    assert reproduce.concept_search("gender_bias", out, size) == out  # the same settings (sae is the default)
    with pytest.raises(ValueError, match=r"other settings \(source: 'sae' there, 'concept' now\)"):
        reproduce.concept_search("gender_bias", out, size, search={"source": "concept"})


def test_a_search_folder_is_reused_with_its_recorded_settings_and_refused_with_others(tmp_path):
    out = tmp_path / "results" / "search" / "gender_bias"
    out.mkdir(parents=True)
    (out / "selection.json").write_text("{}")  # a finished search that selected nothing
    recorded = SearchConfig(task="gender_bias", out="results/search/gender_bias", batch_size=16, min_contrast=0.5,
                            max_examples=64, saes={6: "/saes/l6"}, layers=[6, 9], check_model_name=False)
    (out / "search_args.json").write_text(json.dumps(recorded.record()))
    assert directions.recorded_search(out) == recorded
    now = dataclasses.replace(recorded, out=str(out), threads=2)  # the folder moved; threads do not count
    assert directions.run_search_once(now) is False  # reused: it made no adapter
    with pytest.raises(ValueError, match=r"\(max_examples: 64 there, 32 now\)"):
        directions.run_search_once(dataclasses.replace(now, max_examples=32))
    (out / "search_args.json").write_text('["--task", "gender_bias"]')
    with pytest.raises(ValueError, match="search_args.json must hold a JSON object, got list"):
        directions.run_search_once(now)
    (out / "search_args.json").write_text('{"task": "gender_bias", "out": "o", "colour": "red"}')
    with pytest.raises(ValueError, match="search_args.json is not a record of search settings .*colour"):
        directions.run_search_once(now)


def test_an_interrupted_search_is_run_again(tiny_folders, tmp_path):
    """An adapter without ``selection.json`` is what a search stopped during its erasure check leaves."""
    root, search = tiny_folders
    out = tmp_path / "search"
    out.mkdir()
    (out / "concept_ablation_config.json").write_text("{}")
    size = reproduce.ReproduceSize(train_size=16, eval_size=8, epochs=1, search_examples=16, min_contrast=0.0)
    reproduce.concept_search("gender_bias", out, size, model=str(root / "model"), search=search)
    assert json.loads((out / "selection.json").read_text())["selected"]
    assert ConceptAblationConfig.from_pretrained(out).latents


def test_test_only_without_none_is_refused_before_anything_runs(tmp_path, capsys):
    assert cli.main(["reproduce", "--out", str(tmp_path), "--conditions", "test_only", "--tasks", "double_mc"]) == 1
    assert capsys.readouterr().err == ("hf-concept-ablation reproduce: error: condition test_only evaluates the plain "
                                       "(none) model: add none to the conditions\n")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("url, public", [
    ("https://me:SECRET@host:8443/v1?api_key=SECRET2", "https://host:8443/v1"),
    ("http://u:SECRET3@127.0.0.1:8000/v1#SECRET4", "http://127.0.0.1:8000/v1"),
    ("u:SECRET5@127.0.0.1:9/v1", "//127.0.0.1:9/v1"),
])
def test_recorded_search_settings_hold_no_explainer_credentials(url, public):
    config = SearchConfig(task="gender_bias", out="o", llm_base_url=url, llm_model="m")
    assert config.record()["llm_base_url"] == public and "SECRET" not in json.dumps(config.record())
    assert config.llm_base_url == url  # the search itself gets the URL as given


def test_a_key_given_for_the_key_variable_name_is_refused_not_recorded(tmp_path):
    config = SearchConfig(task="gender_bias", out=str(tmp_path / "out"), llm_model="m", llm_api_key_env="sk-SECRET")
    with pytest.raises(ValueError, match="takes the NAME of the environment variable") as info:
        directions.run_search_once(config)  # refused before the search starts
    assert "SECRET" not in str(info.value) and not (tmp_path / "out").exists()
    assert SearchConfig(task="t", out="o", llm_api_key_env="MY_KEY").record()["llm_api_key_env"] == "MY_KEY"


def test_abbreviated_options_are_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["search", "--task", "gender_bias", "--out", "x", "--llm-base", "http://h/v1"])
    assert "unrecognized arguments: --llm-base" in capsys.readouterr().err


def test_summary_means_and_standard_error_are_those_of_the_seeds():
    from hf_concept_ablation.experiments.runner import summarize

    runs = [{"condition": "caft", "seed": s, "val": {"accuracy": v, "n": 10}, "ood": {"accuracy": o, "n": 10}}
            for s, v, o in [(2, 1.0, 0.9), (0, 0.9, 0.2), (1, 0.8, 0.4)]]
    entry = summarize(runs)["caft"]
    assert entry["seeds"] == [0, 1, 2] and entry["ood"] == [0.2, 0.4, 0.9] and entry["val"] == [0.9, 0.8, 1.0]
    assert entry["val_mean"] == pytest.approx(0.9) and entry["ood_mean"] == pytest.approx(0.5)
    assert entry["ood_sem"] == pytest.approx((((0.3 ** 2 + 0.1 ** 2 + 0.4 ** 2) / 2) / 3) ** 0.5)  # std (n-1) / sqrt(n)
    assert entry["did_not_learn"] == [1]  # 8 of 10 right is not clearly above chance (p = 0.055)


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_search_is_reused_only_with_the_settings_it_was_made_with(tiny_folders, tmp_path, monkeypatch):
    root, search = tiny_folders
    out = tmp_path / "search"
    config = SearchConfig(task="gender_bias", out=str(out), model=str(root / "model"), **search, max_examples=8,
                          min_contrast=0.0, threads=2)
    assert directions.run_search_once(config)
    finished = (out / "selection.json").stat().st_mtime_ns
    recorded = json.loads((out / directions.SEARCH_ARGS_NAME).read_text())
    assert SearchConfig.from_record(recorded) == dataclasses.replace(config, threads=None)  # no thread count
    assert directions.run_search_once(dataclasses.replace(config, threads=1))  # the same search, reused
    assert (out / "selection.json").stat().st_mtime_ns == finished
    with pytest.raises(ValueError, match=r"holds a search made with other settings \(max_examples: 8 there, 4 now\)"):
        directions.run_search_once(dataclasses.replace(config, max_examples=4))
    weights = load_file(str(out / WEIGHTS_NAME))
    (out / WEIGHTS_NAME).unlink()  # as a clone of a study leaves it (the weight files are not committed)
    with monkeypatch.context() as patch:
        patch.setattr(model_module, "save_file", _disk_full)
        with pytest.raises(OSError, match="No space left"):
            directions.run_search_once(config)  # the rebuild fails: the config it rebuilds from stays
    assert directions.run_search_once(config)
    assert (out / "selection.json").stat().st_mtime_ns == finished  # not searched again: the weights are rebuilt
    restored = load_file(str(out / WEIGHTS_NAME))
    assert restored.keys() == weights.keys() and all(torch.equal(restored[k], weights[k]) for k in weights)
    (out / CONFIG_NAME).rename(tmp_path / CONFIG_NAME)
    with pytest.raises(FileNotFoundError, match=f"selection.json names an adapter but its {CONFIG_NAME} is missing"):
        directions.run_search_once(config)
    (tmp_path / CONFIG_NAME).rename(out / CONFIG_NAME)
    (out / "selection.json").unlink()  # as a run interrupted in an earlier version left it: run again
    assert directions.run_search_once(config) and (out / "selection.json").stat().st_mtime_ns != finished


def test_adapter_weights_of_explicit_directions_cannot_be_rebuilt(tmp_path):
    config = ConceptAblationConfig(layers=[1], directions={1: torch.eye(4)[:1]}, mode="projection")
    write_json_atomic(tmp_path / CONFIG_NAME, config.to_dict())
    with pytest.raises(FileNotFoundError, match=r"directions of layer\(s\) \[1\] are stored only there"):
        directions.restore_adapter_weights(tmp_path, "unused")


def test_a_report_of_the_repositorys_own_results_rewrites_the_table_of_docs_results_md(monkeypatch):
    written = []
    monkeypatch.setattr(reproduce, "report_from_disk", lambda out, readme: written.append((out, readme)) or "")
    assert cli.main(["report", "--out", str(reproduce.REPO_ROOT / "results")]) == 0
    assert written == [(reproduce.REPO_ROOT / "results", reproduce.RESULTS_DOC)]
    assert reproduce.RESULTS_DOC == reproduce.REPO_ROOT / "docs" / "results.md"
    page = reproduce.RESULTS_DOC.read_text()
    assert page.count(reproduce.README_MARKERS[0]) == page.count(reproduce.README_MARKERS[1]) == 1
    assert reproduce.README_MARKERS[0] not in (reproduce.REPO_ROOT / "README.md").read_text()  # the README links it
