"""The gender-bias pronoun task: templates, splits, composition and user files."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import pytest

from hf_concept_ablation.tasks import (
    DISTRACTORS,
    PROFESSION_GROUPS,
    PRONOUNS,
    TaskDataError,
    build_gender_concept_texts,
    build_gender_datasets,
    gender_task_files,
    load_gender_templates,
    load_profession_groups,
)

PROMPT_RE = re.compile(
    r"Choose the option corresponding to the correct pronoun\.\n"
    r"Question: (?P<sentence>[^\n]*_____[^\n]*)\n"
    r"A\) (?P<a>he|she|him|her)\n"
    r"B\) (?P<b>he|she|him|her)\n"
    r"Answer:"
)


@pytest.fixture(scope="module")
def data():
    return build_gender_datasets(seed=0)


@pytest.fixture(scope="module")
def templates():
    return load_gender_templates()


def test_project_templates_are_many_distinct_and_half_each_case(templates):
    assert len(templates) >= 300
    assert len({t.template for t in templates}) == len(templates)
    counts = Counter(t.case for t in templates)
    assert counts["subject"] == counts["object"] == len(templates) // 2
    for t in templates:
        assert t.template.count("{profession}") == 1 and t.template.count("{pronoun}") == 1


def test_distractor_differs_in_gender_and_case():
    assert DISTRACTORS == {"he": "her", "she": "him", "him": "she", "her": "he"}
    gender_of = {pronoun: gender for (gender, _), pronoun in PRONOUNS.items()}
    case_of = {pronoun: case for (_, case), pronoun in PRONOUNS.items()}
    for correct, wrong in DISTRACTORS.items():
        assert gender_of[correct] != gender_of[wrong] and case_of[correct] != case_of[wrong]


def test_splits_are_by_template_within_each_case(data, templates):
    train_ids, val_ids, ood_ids = (set(data[s]["template_id"]) for s in ("train", "val", "ood"))
    assert not train_ids & val_ids
    assert val_ids == ood_ids
    assert train_ids | val_ids == {t.template_id for t in templates}
    case_of = {t.template_id: t.case for t in templates}
    for case in ("subject", "object"):
        n_train = sum(case_of[i] == case for i in train_ids)
        n_held = sum(case_of[i] == case for i in val_ids)
        assert abs(n_held / (n_train + n_held) - 0.2) < 0.01


def test_gender_composition_of_each_split(data):
    doctors, nurses = set(PROFESSION_GROUPS["doctor"]), set(PROFESSION_GROUPS["nurse"])
    expected = {"train": {"doctor": "male", "nurse": "female"}, "val": {"doctor": "male", "nurse": "female"},
                "ood": {"doctor": "female", "nurse": "male"}}
    for split, rule in expected.items():
        rows = data[split].to_list()
        for row in rows:
            assert row["profession"] in (doctors if row["profession_group"] == "doctor" else nurses)
            assert row["gender"] == rule[row["profession_group"]]
            assert row["pronoun"] == PRONOUNS[(row["gender"], row["case"])]
        assert Counter(r["profession_group"] for r in rows) == {"doctor": len(rows) // 2, "nurse": len(rows) // 2}
        assert set(r["profession"] for r in rows) == doctors | nurses


def test_skyline_trains_on_every_group_with_both_genders(data):
    skyline = build_gender_datasets(seed=0, skyline=True)
    rows = skyline["train"].to_list()
    assert Counter((r["profession_group"], r["gender"]) for r in rows) == {
        (g, s): len(rows) // 4 for g in ("doctor", "nurse") for s in ("male", "female")}
    assert {r["template_id"] for r in rows} == set(data["train"]["template_id"])
    assert skyline["val"]["prompt"] == data["val"]["prompt"] and skyline["ood"]["prompt"] == data["ood"]["prompt"]


def test_prompt_format_and_targets_are_exact(data):
    for split in data:
        for row in data[split]:
            match = PROMPT_RE.fullmatch(row["prompt"])
            assert match, row["prompt"]
            options = (match["a"], match["b"])
            assert options[row["answer_index"]] == row["pronoun"]
            assert options[1 - row["answer_index"]] == DISTRACTORS[row["pronoun"]]
            assert row["answer"] == (" A", " B")[row["answer_index"]]
            assert row["distractor"] == (" B", " A")[row["answer_index"]]
            assert row["profession"] in match["sentence"] and "{" not in match["sentence"]
            assert match["sentence"][0].isupper()


def test_answer_letters_are_roughly_balanced(data):
    for split in data:
        share_a = data[split]["answer"].count(" A") / data[split].num_rows
        assert 0.4 < share_a < 0.6, (split, share_a)


def test_words_form_targets_the_pronoun(data):
    words = build_gender_datasets(seed=0, answer_form="words")
    for split in words:
        assert words[split]["template_id"] == data[split]["template_id"]
        for row in words[split]:
            assert row["answer"] == " " + row["pronoun"] and row["distractor"] == " " + DISTRACTORS[row["pronoun"]]
            assert row["prompt"].endswith(f"\nOptions: {row['pronoun']}, {DISTRACTORS[row['pronoun']]}\nAnswer:") or \
                row["prompt"].endswith(f"\nOptions: {DISTRACTORS[row['pronoun']]}, {row['pronoun']}\nAnswer:")


def test_builder_is_deterministic_per_seed(data):
    assert build_gender_datasets(seed=0)["train"]["prompt"] == data["train"]["prompt"]
    assert set(build_gender_datasets(seed=1)["val"]["template_id"]) != set(data["val"]["template_id"])


def test_user_templates_file_is_used(tmp_path):
    path = tmp_path / "mine.csv"
    lines = ["template,case"]
    for i in range(5):
        lines.append(f'"The {{profession}} said, ""{i}"", and {{pronoun}} left.",subject')
        lines.append(f"We thanked the {{profession}} and paid {{pronoun}} {i} dollars.,Object")
    path.write_text("\n".join(lines) + "\n")
    data = build_gender_datasets(templates_file=path, val_fraction=0.4)
    assert data["train"].num_rows == 2 * 6 and data["val"].num_rows == data["ood"].num_rows == 2 * 4
    assert set(data["train"]["case"]) == {"subject", "object"}


BAD_TEMPLATES = [
    ("missing_pronoun.csv", "template,case\nThe {profession} left.,subject\n", 2, "missing placeholder {pronoun}"),
    ("missing_profession.jsonl", '{"template": "The {pronoun} left.", "case": "subject"}\n', 1,
     "missing placeholder {profession}"),
    ("twice.csv", "template,case\nThe {profession} saw {pronoun} and {pronoun},object\n", 2,
     "2 occurrences of placeholder {pronoun}"),
    ("bad_case.csv", "template,case\nThe {profession} said {pronoun} left.,subject\n"
     "We paid the {profession} and {pronoun},possessive\n", 3, "invalid case 'possessive'"),
    ("stray.jsonl", '{"template": "The {profession} said {pronoun} met {name}.", "case": "subject"}\n', 1,
     "unknown placeholder {name}"),
    ("capital.csv", "template,case\nThe {profession} said {pronoun} met the {Profession}.,subject\n", 2,
     "unknown placeholder {Profession}"),
    ("brace.csv", "template,case\nThe {profession} said {pronoun} left :-}.,subject\n", 2, "stray brace"),
    ("duplicate.csv", "template,case\nThe {profession} said {pronoun} left.,subject\n"
     "The {profession} said {pronoun} left.,subject\n", 3, "duplicate template (first seen on line 2)"),
    ("no_case.csv", "template\nThe {profession} said {pronoun} left.\n", 1, "missing column(s) case"),
    ("empty_case.jsonl", '{"template": "The {profession} said {pronoun} left.", "case": ""}\n', 1,
     "empty value in column 'case'"),
    ("bad.jsonl", '{"template": "The {profession} said {pronoun} left.", "case": "subject"\n', 1, "invalid JSON"),
    ("empty.jsonl", "", None, "file is empty"),
]


def test_too_few_templates_to_split_is_an_error(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("template,case\nThe {profession} said {pronoun} left.,subject\n")
    with pytest.raises(ValueError, match="too few"):
        build_gender_datasets(templates_file=path)


def test_missing_templates_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        build_gender_datasets(templates_file=tmp_path / "absent.jsonl")


MY_GROUPS = {
    "pilot": {"stereotyped_gender": "male", "professions": ["pilot", "airline captain"]},
    "dancer": {"stereotyped_gender": "Female", "professions": ["dancer"]},
    "engineer": {"stereotyped_gender": "male", "professions": ["engineer", "mechanic"]},
}


def test_user_profession_groups_file_is_used(tmp_path, data):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps(MY_GROUPS))
    mine = build_gender_datasets(professions_file=path)
    assert [g.name for g in load_profession_groups(path)] == ["pilot", "dancer", "engineer"]
    stereotyped = {"pilot": "male", "dancer": "female", "engineer": "male"}
    for split in mine:
        rows = mine[split].to_list()
        assert Counter(r["profession_group"] for r in rows) == {g: len(rows) // 3 for g in MY_GROUPS}  # each template
        assert {r["template_id"] for r in rows} == set(data[split]["template_id"])
        for row in rows:
            assert row["profession"] in MY_GROUPS[row["profession_group"]]["professions"]
            assert row["stereotyped_gender"] == stereotyped[row["profession_group"]]
            assert (row["gender"] == row["stereotyped_gender"]) == (split != "ood")  # ood breaks the stereotype
    skyline = build_gender_datasets(professions_file=path, skyline=True)["train"]
    assert Counter((r["profession_group"], r["gender"]) for r in skyline) == {
        (g, s): skyline.num_rows // 6 for g in MY_GROUPS for s in ("male", "female")}


def test_task_files_are_recorded_by_path_as_given_and_sha256(tmp_path):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps(MY_GROUPS))
    builtin = gender_task_files()
    assert {name: record["path"] for name, record in builtin.items()} == {"templates_file": None,
                                                                          "professions_file": None}
    mine = gender_task_files(professions_file=str(path))
    assert mine == {"templates_file": builtin["templates_file"],
                    "professions_file": {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}
    with pytest.raises(FileNotFoundError, match="absent.json"):
        gender_task_files(professions_file=tmp_path / "absent.json")


def _groups(**changes):
    return json.dumps({**MY_GROUPS, **changes})


BAD_GROUPS = [
    ("syntax.json", '{"pilot": {"stereotyped_gender": "male", "professions": ["pilot"]},\n}', 2, "invalid JSON"),
    ("list.json", '[["pilot", "male"]]', None, "expected a non-empty JSON object of profession groups"),
    ("empty_object.json", "{}", None, "expected a non-empty JSON object of profession groups"),
    ("empty_group.json", _groups(dancer={"stereotyped_gender": "female", "professions": []}), None,
     "group 'dancer' is empty"),
    ("gender.json", _groups(dancer={"stereotyped_gender": "woman", "professions": ["dancer"]}), None,
     "group 'dancer': unknown stereotyped_gender 'woman' (expected 'male' or 'female')"),
    ("one_gender.json", _groups(dancer={"stereotyped_gender": "male", "professions": ["dancer"]}), None,
     "no group has stereotyped_gender 'female'"),
    ("not_string.json", _groups(pilot={"stereotyped_gender": "male", "professions": ["pilot", 7]}), None,
     "group 'pilot': every profession must be a non-empty string, got 7"),
    ("blank.json", _groups(pilot={"stereotyped_gender": "male", "professions": [" "]}), None,
     "group 'pilot': every profession must be a non-empty string, got ' '"),
    ("brace.json", _groups(pilot={"stereotyped_gender": "male", "professions": ["{profession} pilot"]}), None,
     "group 'pilot': profession '{profession} pilot' must be one line without braces"),
    ("twice.json", _groups(pilot={"stereotyped_gender": "male", "professions": ["pilot", "pilot "]}), None,
     "group 'pilot': profession 'pilot' is listed twice"),
    ("two_groups.json", _groups(engineer={"stereotyped_gender": "male", "professions": ["engineer", "dancer"]}), None,
     "group 'engineer': profession 'dancer' is also in group 'dancer'"),
    ("keys.json", _groups(pilot={"gender": "male", "professions": ["pilot"]}), None,
     "group 'pilot': missing key(s) ['stereotyped_gender'], unknown key(s) ['gender']"),
    ("not_list.json", _groups(pilot={"stereotyped_gender": "male", "professions": "pilot"}), None,
     "group 'pilot': professions must be a list of strings, got 'pilot'"),
    ("repeated.json", '{"pilot": {"stereotyped_gender": "male", "professions": ["pilot"]},\n'
     ' "pilot": {"stereotyped_gender": "female", "professions": ["nurse"]}}', None, "key(s) ['pilot'] given twice"),
]


BAD_FILES = [("templates_file", *bad) for bad in BAD_TEMPLATES] + [("professions_file", *bad) for bad in BAD_GROUPS]


@pytest.mark.parametrize(("setting", "name", "content", "line", "problem"), BAD_FILES, ids=[b[1] for b in BAD_FILES])
def test_malformed_task_file_error_names_file_line_and_problem(tmp_path, setting, name, content, line, problem):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TaskDataError) as info:
        build_gender_datasets(**{setting: path})
    message = str(info.value)
    assert message.startswith(str(path)) and problem in message  # (a profession group file: the group and value)
    if line is not None:
        assert f"line {line}:" in message


def test_concept_texts_are_paired_female_and_male_lists():
    texts = build_gender_concept_texts()
    female, male = texts
    assert len(female) == len(male) >= 20
    assert len(set(female)) == len(female) and not set(female) & set(male)
    assert all(isinstance(t, str) and t for t in female + male)
