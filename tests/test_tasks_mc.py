"""The shared multiple-choice form, source-file loading and the single-token check."""

from __future__ import annotations

import json
import random

import pytest

from hf_concept_ablation.tasks import (
    TaskDataError,
    answer_strings,
    check_single_token,
    format_two_option_question,
    load_source_file,
)


def test_letters_form_formats_prompt_and_targets_exactly():
    rng = random.Random(0)
    rows = [format_two_option_question("Question: 2 + 2?", "4", "5", rng) for _ in range(20)]
    for row in rows:
        first, second = ("4", "5") if row["answer_index"] == 0 else ("5", "4")
        assert row["prompt"] == f"Question: 2 + 2?\nA) {first}\nB) {second}\nAnswer:"
        assert row["answer"] == (" A" if row["answer_index"] == 0 else " B")
        assert {row["answer"], row["distractor"]} == {" A", " B"}
    assert {row["answer_index"] for row in rows} == {0, 1}


def test_letter_separator_is_configurable():
    row = format_two_option_question("Question: q", "x", "y", random.Random(1), letter_sep=".")
    assert "\nA. " in row["prompt"] and "\nB. " in row["prompt"]


def test_words_form_targets_the_option_word_itself():
    row = format_two_option_question("Question: Is it?", "yes", "no", random.Random(0), answer_form="words")
    options = "yes, no" if row["answer_index"] == 0 else "no, yes"
    assert row["prompt"] == f"Question: Is it?\nOptions: {options}\nAnswer:"
    assert (row["answer"], row["distractor"]) == (" yes", " no")


def test_placement_is_balanced_and_identical_across_answer_forms():
    rng_letters, rng_words = random.Random(7), random.Random(7)
    letters = [format_two_option_question("q", "a", "b", rng_letters)["answer_index"] for _ in range(2000)]
    words = [
        format_two_option_question("q", "a", "b", rng_words, answer_form="words")["answer_index"] for _ in range(2000)
    ]
    assert letters == words
    assert 0.45 < sum(letters) / len(letters) < 0.55


def test_bad_answer_form_and_equal_options_are_rejected():
    with pytest.raises(ValueError, match="answer_form"):
        format_two_option_question("q", "a", "b", random.Random(0), answer_form="numbers")
    with pytest.raises(ValueError, match="differ"):
        format_two_option_question("q", "a", "a", random.Random(0))


def test_load_source_file_reads_csv_and_jsonl(tmp_path):
    csv_file = tmp_path / "set.csv"
    csv_file.write_text(
        "\ufeffquestion,correct,incorrect,notes\n"
        '"Hello, world", greeting ,farewell,extra\n'
        "\n"
        "Bye,farewell,greeting,\n",
        encoding="utf-8",
    )
    jsonl_file = tmp_path / "set.jsonl"
    jsonl_file.write_text(
        json.dumps({"question": "Hello, world", "correct": "greeting", "incorrect": "farewell", "id": 3})
        + "\n\n"
        + json.dumps({"question": "Bye", "correct": "farewell", "incorrect": "greeting"})
        + "\n"
    )
    expected = [
        {"question": "Hello, world", "correct": "greeting", "incorrect": "farewell"},
        {"question": "Bye", "correct": "farewell", "incorrect": "greeting"},
    ]
    assert load_source_file(csv_file) == expected
    assert load_source_file(str(jsonl_file)) == expected


GOOD = {"question": "q0", "correct": "yes", "incorrect": "no"}


def _jsonl(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


MALFORMED = [
    # (file name, content, expected line number or None, problem substring)
    ("empty.csv", "", None, "file is empty"),
    ("blank.jsonl", "\n  \n", None, "file is empty"),
    ("header_only.csv", "question,correct,incorrect\n", None, "no data rows"),
    ("no_column.csv", "question,correct\nq,yes\n", 1, "missing column(s) incorrect"),
    ("no_column.jsonl", _jsonl(GOOD, {"question": "q1", "correct": "yes"}), 2, "missing column 'incorrect'"),
    ("empty_cell.csv", "question,correct,incorrect\nq0,yes,no\nq1,,no\n", 3, "empty value in column 'correct'"),
    ("empty_cell.jsonl", _jsonl(GOOD, GOOD | {"question": "q1", "incorrect": "  "}), 2,
     "empty value in column 'incorrect'"),
    ("bad_json.jsonl", _jsonl(GOOD, GOOD | {"question": "q1"}, '{"question": "q2", '), 3, "invalid JSON"),
    ("not_object.jsonl", _jsonl(GOOD, ["q1", "yes", "no"]), 2, "expected a JSON object"),
    ("not_string.jsonl", _jsonl(GOOD | {"correct": 5}), 1, "column 'correct' must be a string"),
    ("same.csv", "question,correct,incorrect\nq0,yes,no\nq1,yes,yes\n", 3,
     "correct and incorrect answers are identical"),
    ("same.jsonl", _jsonl(GOOD, GOOD | {"question": "q1", "incorrect": "yes"}), 2,
     "correct and incorrect answers are identical"),
    ("fields.csv", "question,correct,incorrect\nq0,yes,no\nq1,yes\n", 3, "expected 3 fields, found 2"),
    ("duplicate.csv", "question,correct,incorrect\nq0,yes,no\nq1,yes,no\nq0,no,yes\n", 4,
     "duplicate question (first seen on line 2)"),
    ("multiline.csv", 'question,correct,incorrect\n"a\nlong question",yes,no\nq1,yes,no\nq2,"ye\ns",no\n', 5,
     "must be a single line"),
    ("data.txt", "question,correct,incorrect\nq,yes,no\n", None, "unsupported file extension '.txt'"),
    ("two_correct.csv", "question,correct,incorrect,correct\nq0,yes,no,maybe\n", 1,
     "column(s) correct appear more than once in the header"),
    ("huge_field.csv", "question,correct,incorrect\nq0,yes,no\n" + "q" * 200_000 + ",yes,no\n", 3,
     "not valid CSV (field larger than field limit"),
]


@pytest.mark.parametrize(("name", "content", "line", "problem"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_source_file_error_names_file_line_and_problem(tmp_path, name, content, line, problem):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_source_file(path)
    message = str(info.value)
    assert isinstance(info.value, TaskDataError)
    assert name in message and problem in message
    if line is not None:
        assert f"line {line}:" in message
        assert info.value.line == line


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "windows.csv"
    path.write_bytes("question,correct,incorrect\nq0,yes,no\nq1 caf\u00e9,yes,no\n".encode("cp1252"))
    with pytest.raises(TaskDataError, match=r"windows.csv, line 3: not UTF-8 text \(byte 0xe9\)"):
        load_source_file(path)


def test_missing_source_file_raises_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        load_source_file(tmp_path / "nowhere.csv")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "A": 1, "B": 2, "he": 3, "her": 4, "nursing": 5, "assistant": 6}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def test_check_single_token_accepts_single_tokens(tiny_tokenizer):
    check_single_token(tiny_tokenizer, [" A", " B", " he", " her"])


def test_check_single_token_names_every_offending_string(tiny_tokenizer):
    with pytest.raises(ValueError) as info:
        check_single_token(tiny_tokenizer, [" A", " nursing assistant", " he", "A B"])
    message = str(info.value)
    assert "' nursing assistant'" in message and "'A B'" in message
    assert "' A'" not in message and "2 are not" in message


def test_answer_strings_collects_answers_and_distractors():
    from datasets import Dataset, DatasetDict

    train = Dataset.from_list([{"answer": " A", "distractor": " B"}, {"answer": " B", "distractor": " A"}])
    ood = Dataset.from_list([{"answer": " he", "distractor": " her"}])
    assert sorted(answer_strings(DatasetDict(train=train, ood=ood))) == [" A", " B", " he", " her"]
    assert sorted(answer_strings(train)) == [" A", " B"]
