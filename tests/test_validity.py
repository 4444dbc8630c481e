"""The validity rule: the recorded skylines, and runs that did not learn their task."""

from __future__ import annotations

import pytest

from hf_concept_ablation.tasks.validity import (
    CHANCE_ALPHA,
    SKYLINE_MIN,
    chance_p_value,
    check_skyline,
    did_not_learn,
    recorded_skyline,
)


def test_the_embedded_models_letters_form_is_refused_naming_its_skyline_and_the_valid_form():
    with pytest.raises(ValueError, match=r"letters form is not a valid task.*val 0\.61 / OOD 0\.64.*answer_form=words"):
        check_skyline("google/gemma-3-270m", "gender_bias", "letters")
    assert "skyline val 1.00 / OOD 1.00" in check_skyline("google/gemma-3-270m", "gender_bias", "words")
    assert min(recorded_skyline("google/gemma-3-270m", "gender_bias", "words").values()) >= SKYLINE_MIN


def test_an_unmeasured_task_is_not_refused_but_says_how_to_measure_it():
    assert recorded_skyline("google/gemma-2-2b", "gender_bias", "letters") is None
    assert "task.skyline=true" in check_skyline("google/gemma-2-2b", "gender_bias", "letters")


def test_a_run_not_clearly_above_chance_did_not_learn_the_task():
    from scipy.stats import binomtest

    for n, hits in ((8, 8), (8, 7), (8, 6), (100, 55), (100, 60), (144, 82), (150, 0)):
        scores = {"accuracy": hits / n, "n": n}
        p = binomtest(hits, n, 0.5, alternative="greater").pvalue
        assert chance_p_value(scores) == pytest.approx(p)
        assert did_not_learn(scores) == (p >= CHANCE_ALPHA)
    assert not did_not_learn({"accuracy": 7 / 8, "n": 8}) and did_not_learn({"accuracy": 6 / 8, "n": 8})
    assert did_not_learn({"accuracy": 0.0, "n": 150})  # below chance (argmax over the vocabulary) as well


def test_runs_at_chance_are_flagged_in_the_record_the_summary_the_log_and_the_tables(tmp_path):
    from hf_concept_ablation.experiments.report import markdown_table
    from hf_concept_ablation.experiments.runner import ResultsFile, scores_line
    from hf_concept_ablation.experiments.study import results_markdown

    results = ResultsFile(tmp_path / "r.json", {"config": {}})
    recorded = [results.add({"condition": "none", "seed": seed, "val": {"accuracy": val, "n": 8},
                             "ood": {"accuracy": 0.25, "n": 8}}) for seed, val in ((0, 1.0), (1, 0.75), (2, 0.5))]
    assert [r["did_not_learn"] for r in recorded] == [False, True, True]
    assert recorded[0]["val_p_chance"] == 1 / 256
    assert scores_line(recorded[0]) == "val 1.000, ood 0.250"
    assert scores_line(recorded[1]) == "val 0.750, ood 0.250; did not learn the task (val at chance, p = 0.14)"
    summary = results.data["summary"]
    assert summary["none"]["did_not_learn"] == [1, 2]
    assert "| plain FT | 0.750 | 0.250 ± 0.000 | 3; seeds 1, 2: val at chance, did not learn the task |" in \
        markdown_table(summary)
    report = results_markdown({"gender_bias": summary}, {}, "x")
    assert "(3; seeds 1, 2: val at chance, did not learn the task) †" in report
    earlier = {k: v for k, v in summary["none"].items() if k != "did_not_learn"}  # a summary from before the flag
    assert markdown_table({"none": earlier}).endswith("| 3 |")
