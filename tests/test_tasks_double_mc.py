"""Double multiple choice: source sets, combinations, splits, option composition, skylines."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from hf_concept_ablation.tasks import (
    ALL_COMBINATIONS,
    SOURCE_SETS,
    TaskDataError,
    build_double_mc_datasets,
    build_skyline_datasets,
    combination_key,
    load_source_set,
    parse_combination_key,
)

PROMPT_RE = re.compile(
    r"Question: (?P<qa>[^\n|]+) \| (?P<qb>[^\n|]+)\n"
    r"A\. (?P<a1>[^,\n]+), (?P<a2>[^,\n]+)\n"
    r"B\. (?P<b1>[^,\n]+), (?P<b2>[^,\n]+)\n"
    r"Answer:"
)
EXPECTED_ANSWERS = {
    "verbs": {"is", "are", "was", "were", "has", "have", "seems", "seem", "looks", "look", "needs", "need"},
    "pronouns": {"he", "she", "him", "her"},
    "sentiment": {"positive", "negative"},
    "sports": {"basketball", "soccer", "tennis", "golf", "baseball", "boxing", "swimming"},
}


@pytest.fixture(scope="module")
def sources():
    return {name: load_source_set(name) for name in SOURCE_SETS}


@pytest.fixture(scope="module")
def lookup(sources):
    return {name: {q["question"]: q for q in questions} for name, questions in sources.items()}


@pytest.fixture(scope="module")
def data():
    return build_double_mc_datasets("verbs", "sentiment", "sentiment", seed=0)


@pytest.mark.parametrize("name", SOURCE_SETS)
def test_source_sets_have_500_distinct_questions_with_a_small_answer_set(sources, name):
    questions = sources[name]
    assert len(questions) >= 500
    assert len({q["question"] for q in questions}) == len(questions)
    for q in questions:
        assert q["correct"] != q["incorrect"]
        assert {q["correct"], q["incorrect"]} <= EXPECTED_ANSWERS[name]
        assert "|" not in q["question"] and "\n" not in q["question"]
    counts = Counter(q["correct"] for q in questions)
    assert max(counts.values()) < 2 * min(counts.values())  # no answer dominates


def test_pronoun_and_verb_options_differ_only_in_gender_or_number(sources):
    pairs = {frozenset((q["correct"], q["incorrect"])) for q in sources["pronouns"]}
    assert pairs == {frozenset(("he", "she")), frozenset(("him", "her"))}
    verb_pairs = {frozenset((q["correct"], q["incorrect"])) for q in sources["verbs"]}
    assert len(verb_pairs) == 6


def test_all_combinations_are_the_24_ordered_triples():
    assert len(ALL_COMBINATIONS) == len(set(ALL_COMBINATIONS)) == 24
    for first, second, intended in ALL_COMBINATIONS:
        assert first != second and intended in (first, second)
        assert parse_combination_key(combination_key(first, second, intended)) == (first, second, intended)
    assert combination_key("verbs", "sentiment", "sentiment") == "verbs|sentiment|sentiment"
    with pytest.raises(ValueError):
        parse_combination_key("verbs|sentiment")


def test_split_sizes_follow_max_examples_and_fractions(data):
    assert [data[s].num_rows for s in ("train", "val", "ood")] == [1400, 300, 300]
    small = build_double_mc_datasets("pronouns", "sports", "sports", max_examples=100)
    assert [small[s].num_rows for s in ("train", "val", "ood")] == [70, 15, 15]
    for split in small:
        pairs = list(zip(small[split]["question_first"], small[split]["question_second"]))
        assert len(set(pairs)) == len(pairs)


def test_no_question_is_shared_across_splits(data):
    for column in ("question_first", "question_second"):
        train, val, ood = (set(data[s][column]) for s in ("train", "val", "ood"))
        assert not train & val and not train & ood and not val & ood


def _options(row):
    match = PROMPT_RE.fullmatch(row["prompt"])
    assert match, row["prompt"]
    return match, ((match["a1"], match["a2"]), (match["b1"], match["b2"]))


def test_ambiguous_splits_put_both_correct_answers_in_one_option(data, lookup):
    for split in ("train", "val"):
        for row in data[split]:
            match, options = _options(row)
            qa, qb = lookup["verbs"][match["qa"]], lookup["sentiment"][match["qb"]]
            assert options[row["answer_index"]] == (qa["correct"], qb["correct"])
            assert options[1 - row["answer_index"]] == (qa["incorrect"], qb["incorrect"])
            assert row["answer"] == (" A", " B")[row["answer_index"]]
            assert row["distractor"] == (" B", " A")[row["answer_index"]]


@pytest.mark.parametrize("intended", ["verbs", "sentiment"])
def test_ood_options_each_hold_one_correct_answer_and_target_the_intended_one(lookup, intended):
    data = build_double_mc_datasets("verbs", "sentiment", intended, seed=0, max_examples=400)
    position = 0 if intended == "verbs" else 1
    for row in data["ood"]:
        match, options = _options(row)
        qa, qb = lookup["verbs"][match["qa"]], lookup["sentiment"][match["qb"]]
        right_for_first, right_for_second = (qa["correct"], qb["incorrect"]), (qa["incorrect"], qb["correct"])
        assert set(options) == {right_for_first, right_for_second}
        chosen = options[row["answer_index"]]
        assert chosen == (right_for_first, right_for_second)[position]
        assert chosen[position] == (qa, qb)[position]["correct"]
        assert row["answer"] == (" A", " B")[row["answer_index"]] and row["distractor"] != row["answer"]


def test_answer_letters_are_roughly_balanced(data):
    for split in data:
        share_a = data[split]["answer"].count(" A") / data[split].num_rows
        assert 0.42 < share_a < 0.58, (split, share_a)


def test_metadata_columns_and_determinism(data):
    row = data["train"][0]
    assert (row["first"], row["second"], row["intended"]) == ("verbs", "sentiment", "sentiment")
    again = build_double_mc_datasets("verbs", "sentiment", "sentiment", seed=0)
    assert again["ood"]["prompt"] == data["ood"]["prompt"]
    other = build_double_mc_datasets("verbs", "sentiment", "sentiment", seed=1)
    assert set(other["train"]["question_first"]) != set(data["train"]["question_first"])


def test_both_intended_questions_share_the_ambiguous_splits(data):
    other = build_double_mc_datasets("verbs", "sentiment", "verbs", seed=0)
    for split in ("train", "val"):
        assert other[split]["prompt"] == data[split]["prompt"]
        assert other[split]["answer"] == data[split]["answer"]
    assert other["ood"]["answer"] != data["ood"]["answer"]


def test_every_combination_builds(sources):
    for first, second, intended in ALL_COMBINATIONS:
        data = build_double_mc_datasets(first, second, intended, max_examples=40)
        assert set(data) == {"train", "val", "ood"}
        assert data["ood"][0]["intended"] == intended


@pytest.mark.parametrize("answer_form", ["letters", "words"])
def test_skyline_uses_the_same_question_split(data, answer_form):
    skyline = build_skyline_datasets("sentiment", seed=0, answer_form=answer_form)
    assert set(skyline) == {"train", "val", "test"}
    for sky, dmc in (("train", "train"), ("val", "val"), ("test", "ood")):
        assert set(data[dmc]["question_second"]) <= set(skyline[sky]["question"])
    assert sum(skyline[s].num_rows for s in skyline) == len(load_source_set("sentiment"))
    for row in skyline["train"]:
        first, second = (
            (row["correct"], row["incorrect"]) if row["answer_index"] == 0 else (row["incorrect"], row["correct"])
        )
        if answer_form == "letters":
            assert row["prompt"] == f"Question: {row['question']}\nA. {first}\nB. {second}\nAnswer:"
            assert row["answer"] == (" A", " B")[row["answer_index"]]
        else:
            assert row["prompt"] == f"Question: {row['question']}\nOptions: {first}, {second}\nAnswer:"
            assert (row["answer"], row["distractor"]) == (" " + row["correct"], " " + row["incorrect"])


def test_user_source_file_replaces_or_adds_a_source_set(tmp_path):
    path = tmp_path / "capitals.csv"
    rows = ["question,correct,incorrect"] + [f"Capital of country {i},city{i},town{i}" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    replaced = build_double_mc_datasets("verbs", "sports", "verbs", max_examples=60, source_files={"sports": path})
    assert all(q.startswith("Capital of country") for q in replaced["train"]["question_second"])
    added = build_double_mc_datasets("capitals", "verbs", "capitals", max_examples=60,
                                     source_files={"capitals": str(path)})
    assert added["ood"][0]["first"] == "capitals"
    skyline = build_skyline_datasets("capitals", answer_form="words", source_files={"capitals": path})
    assert sum(skyline[s].num_rows for s in skyline) == 40


def test_malformed_user_source_file_error_names_file_line_and_problem(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "q0", "correct": "a", "incorrect": "b"}\n{"question": "q1", "correct": "a"}\n')
    with pytest.raises(TaskDataError, match=r"broken\.jsonl, line 2: missing column 'incorrect'"):
        build_double_mc_datasets("verbs", "mine", "mine", source_files={"mine": path})


def test_source_files_must_map_known_source_sets_to_files(tmp_path):
    path = tmp_path / "mine.jsonl"
    with pytest.raises(ValueError, match=r"unknown source set\(s\) \['verb'\] in source_files; known: \['pronouns', "
                                         r"'sentiment', 'sports', 'verbs'\]"):
        build_double_mc_datasets("verbs", "sentiment", "sentiment", source_files={"verb": path})
    with pytest.raises(ValueError, match=r"unknown source set\(s\) \['capitals'\] .* known: .*'verbs'"):
        build_skyline_datasets("verbs", source_files={"capitals": path})
    with pytest.raises(ValueError, match=r"source_files must map source set names to files, got '.*mine.jsonl'"):
        build_double_mc_datasets("verbs", "sentiment", "sentiment", source_files=str(path))


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="different"):
        build_double_mc_datasets("verbs", "verbs", "verbs")
    with pytest.raises(ValueError, match="intended"):
        build_double_mc_datasets("verbs", "sports", "sentiment")
    with pytest.raises(ValueError, match="letters"):
        build_double_mc_datasets("verbs", "sports", "sports", answer_form="words")
    with pytest.raises(ValueError, match="unknown source set"):
        build_double_mc_datasets("verbs", "chess", "chess")
    with pytest.raises(ValueError, match="splits"):
        build_double_mc_datasets("verbs", "sports", "sports", splits=(0.8, 0.1, 0.2))
