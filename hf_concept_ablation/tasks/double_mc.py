"""The double multiple-choice task: two questions, two answers per option.

A prompt shows two questions from two source sets and two options, each option
answering both questions::

    Question: <qa> | <qb>
    A. <x>, <y>
    B. <z>, <w>
    Answer:

In ``D_amb`` (``train``) and ``D_val`` (``val``) one option holds both correct
answers, so answering either question gives the right letter. In ``D_ood``
(``ood``) each option holds one correct and one wrong answer; the target is the
option right for the *intended* question.

The four source sets (``verbs``, ``pronouns``, ``sentiment``, ``sports``) are
written by the project (``assets/tasks/<name>.jsonl``); a user's own file with
columns ``question,correct,incorrect`` can replace one or add a new name.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from ..checks import check_names
from .mc import (
    ASSETS_DIR,
    AnswerForm,
    PathLike,
    check_answer_form,
    format_two_option_question,
    load_source_file,
    task_file_record,
)

SOURCE_SETS: tuple[str, ...] = ("verbs", "pronouns", "sentiment", "sports")
#: The 24 ordered (first, second, intended) triples over the project's source sets.
ALL_COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(
    (first, second, intended)
    for first, second in itertools.permutations(SOURCE_SETS, 2)
    for intended in (first, second)
)
DEFAULT_SPLITS: tuple[float, float, float] = (0.7, 0.15, 0.15)
DOUBLE_MC_SPLITS: tuple[str, str, str] = ("train", "val", "ood")
SKYLINE_SPLITS: tuple[str, str, str] = ("train", "val", "test")
KEY_SEPARATOR = "|"


def combination_key(first: str, second: str, intended: str) -> str:
    """``"verbs|sentiment|sentiment"`` for (first, second, intended)."""
    return KEY_SEPARATOR.join((first, second, intended))


def file_name(key: str) -> str:
    """A file-system friendly name for a task or combination key (``|`` -> ``-``)."""
    return key.replace(KEY_SEPARATOR, "-")


def parse_combination_key(key: str) -> tuple[str, str, str]:
    """Inverse of :func:`combination_key`."""
    parts = tuple(key.split(KEY_SEPARATOR))
    if len(parts) != 3:
        raise ValueError(f"a combination key has the form 'first|second|intended', got {key!r}")
    return parts  # type: ignore[return-value]


def source_set_path(name: str) -> Path:
    """Path of one of the project's own source sets."""
    if name not in SOURCE_SETS:
        raise ValueError(f"unknown source set {name!r}; the project's own are {SOURCE_SETS}")
    return ASSETS_DIR / f"{name}.jsonl"


def check_source_files(source_files: Any, used: Iterable[str]) -> None:
    """Refuse `source_files` unless it is None or maps source set names to files, each name one of the project's own
    sets or of `used` (the sets being built): a misspelt name would leave the built-in questions in use unnoticed."""
    if source_files is None:
        return
    if not isinstance(source_files, Mapping):
        raise ValueError(f"source_files must map source set names to files, got {source_files!r}")
    check_names(source_files, {*SOURCE_SETS, *used}, "source set", " in source_files")


def load_source_set(name: str, source_files: Mapping[str, PathLike] | None = None) -> list[dict[str, str]]:
    """Questions of a source set: the user's file when ``source_files`` names one, else the project's."""
    if source_files and name in source_files:
        return load_source_file(source_files[name])
    if name not in SOURCE_SETS:
        raise ValueError(f"unknown source set {name!r}: use one of {SOURCE_SETS} or give its file in source_files")
    return load_source_file(source_set_path(name))


def double_mc_task_files(names: Iterable[str],
                         source_files: Mapping[str, PathLike] | None = None) -> dict[str, dict[str, str | None]]:
    """The files of the source sets `names` (the user's where `source_files` names one, else the project's), as a
    results file records them (`~hf_concept_ablation.tasks.mc.task_file_record`), by setting
    (``source_files.<name>``)."""
    given = source_files or {}
    return {f"source_files.{name}": task_file_record(given.get(name), ASSETS_DIR / f"{name}.jsonl")
            for name in dict.fromkeys(names)}


_SINGULAR_VERBS = frozenset({"is", "was", "has"})
_FEMALE_PRONOUNS = frozenset({"she", "her", "hers", "herself"})
_MALE_PRONOUNS = frozenset({"he", "him", "his", "himself"})


def answer_value(source: str, question: Mapping[str, str]) -> str:
    """What a question's correct answer says, as far as a shortcut can use it: the verb's number
    (``singular``/``plural``) for ``verbs``, the pronoun's gender for ``pronouns``, and the answer
    itself for ``sentiment``, ``sports`` and any other source set."""
    correct, incorrect = question["correct"].strip().lower(), question["incorrect"].strip().lower()
    if source == "verbs":
        singular = correct in _SINGULAR_VERBS or (correct.endswith("s") and not incorrect.endswith("s"))
        return "singular" if singular else "plural"
    if source == "pronouns" and correct in _FEMALE_PRONOUNS | _MALE_PRONOUNS:
        return "female" if correct in _FEMALE_PRONOUNS else "male"
    return correct


def question_text(question: Mapping[str, str]) -> str:
    """A source-set question as plain text: its ``___`` blank filled with the correct answer (a statement), or the
    question as written."""
    text = question["question"]
    return text.replace("___", question["correct"]) if "___" in text else text


def value_concept_texts(source: str, source_files: Mapping[str, PathLike] | None = None) -> dict[str, list[str]]:
    """The texts of `source`'s questions grouped by `answer_value` (value -> texts, values sorted): the contrast
    texts of that source set's concept, which a value contrast and a ``leace_contrast`` eraser are fitted on. Raises
    if the set has fewer than two values."""
    groups: dict[str, list[str]] = {}
    for question in load_source_set(source, source_files):
        groups.setdefault(answer_value(source, question), []).append(question_text(question))
    if len(groups) < 2:
        raise ValueError(f"a value contrast needs at least two answer values in {source!r}, found {sorted(groups)}")
    return {value: groups[value] for value in sorted(groups)}


def unintended_concept_texts(data: DatasetDict,
                             source_files: Mapping[str, PathLike] | None = None) -> dict[str, list[str]] | None:
    """The contrast texts of a combination's unintended concept (`value_concept_texts` of the source set whose
    question is not the intended one), which ``leace_contrast`` fits its erasers on; None for skyline data (one
    question per prompt, no unintended concept)."""
    row = data["train"][0]
    if "intended" not in row:
        return None
    return value_concept_texts(row["second"] if row["intended"] == row["first"] else row["first"], source_files)


def split_questions(
    questions: Sequence[dict[str, str]],
    splits: Sequence[float] = DEFAULT_SPLITS,
    seed: int = 0,
    name: str = "",
) -> tuple[list[dict[str, str]], ...]:
    """Shuffle and cut a source set's questions into three disjoint parts.

    The shuffle depends only on ``seed`` and ``name``, so a source set is split
    the same way in every pair it joins and in its skyline.
    """
    if len(splits) != 3 or any(f <= 0 for f in splits) or abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three positive fractions summing to 1, got {tuple(splits)}")
    order = list(range(len(questions)))
    random.Random(f"split:{seed}:{name}").shuffle(order)
    n_train = round(len(order) * splits[0])
    n_val = round(len(order) * splits[1])
    cuts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    if any(not part for part in cuts):
        raise ValueError(f"source set {name!r} has {len(questions)} questions, too few to split {tuple(splits)}")
    return tuple([questions[i] for i in sorted(part)] for part in cuts)


def _pair_indices(n_a: int, n_b: int, n: int, rng: random.Random) -> list[tuple[int, int]]:
    """``n`` distinct (i, j) pairs using every index about equally often."""
    n = min(n, n_a * n_b)
    if 2 * n >= n_a * n_b:
        return rng.sample(list(itertools.product(range(n_a), range(n_b))), n)
    pairs: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    queue_a: list[int] = []
    queue_b: list[int] = []
    while len(pairs) < n:
        queue_a = queue_a or rng.sample(range(n_a), n_a)
        queue_b = queue_b or rng.sample(range(n_b), n_b)
        pair = (queue_a.pop(), queue_b.pop())
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return pairs


def make_double_mc_example(
    qa: dict[str, str], qb: dict[str, str], ambiguous: bool, intended_is_first: bool, rng: random.Random
) -> dict[str, object]:
    """One double-question prompt row (letters form).

    ``ambiguous``: one option holds both correct answers (D_amb, D_val);
    otherwise each option holds one correct answer (D_ood) and the target is
    the option right for the intended question.
    """
    if ambiguous:
        correct = f"{qa['correct']}, {qb['correct']}"
        wrong = f"{qa['incorrect']}, {qb['incorrect']}"
    else:
        right_for_first = f"{qa['correct']}, {qb['incorrect']}"
        right_for_second = f"{qa['incorrect']}, {qb['correct']}"
        correct, wrong = (
            (right_for_first, right_for_second) if intended_is_first else (right_for_second, right_for_first)
        )
    stem = f"Question: {qa['question']} {KEY_SEPARATOR} {qb['question']}"
    return format_two_option_question(stem, correct, wrong, rng, answer_form="letters", letter_sep=".")


def build_double_mc_datasets(
    first: str,
    second: str,
    intended: str,
    seed: int = 0,
    max_examples: int = 2000,
    splits: Sequence[float] = DEFAULT_SPLITS,
    answer_form: AnswerForm = "letters",
    source_files: Mapping[str, PathLike] | None = None,
) -> DatasetDict:
    """Build ``train`` (D_amb), ``val`` (D_val) and ``ood`` (D_ood) for one combination.

    Each source set's questions are split by ``splits`` first (no question is in
    two splits); each split then pairs its first-set and second-set questions
    into about ``max_examples * fraction`` distinct prompts. Only the letters
    form is defined (use :func:`build_skyline_datasets` for the words form).

    Columns: ``prompt``, ``answer``, ``distractor``, ``answer_index``,
    ``first``, ``second``, ``intended``, ``question_first``, ``question_second``,
    ``correct_first``, ``correct_second``, ``unintended_value`` (what the unintended question's correct answer
    says, `answer_value`: the label an eraser of the unintended concept is fitted on).
    """
    check_answer_form(answer_form)
    if answer_form != "letters":
        raise ValueError(
            "the double multiple-choice task is defined only for answer_form='letters' "
            "(use build_skyline_datasets for the words form)"
        )
    if first == second:
        raise ValueError(f"first and second must be different source sets, both are {first!r}")
    if intended not in (first, second):
        raise ValueError(f"intended must be {first!r} or {second!r}, got {intended!r}")
    if max_examples < 1:
        raise ValueError(f"max_examples must be positive, got {max_examples}")
    if KEY_SEPARATOR in first or KEY_SEPARATOR in second:
        raise ValueError(f"source set names must not contain {KEY_SEPARATOR!r}")
    check_source_files(source_files, (first, second))
    parts_a = split_questions(load_source_set(first, source_files), splits, seed, first)
    parts_b = split_questions(load_source_set(second, source_files), splits, seed, second)
    result = {}
    for split, fraction, a, b in zip(DOUBLE_MC_SPLITS, splits, parts_a, parts_b):
        # The ambiguous splits do not depend on the intended question, so (first, second, first)
        # and (first, second, second) share D_amb and D_val: one plain run serves both.
        key = combination_key(first, second, intended) if split == "ood" else f"{first}{KEY_SEPARATOR}{second}"
        rng = random.Random(f"double_mc:{seed}:{key}:{split}")
        rows = []
        for i, j in _pair_indices(len(a), len(b), max(1, round(max_examples * fraction)), rng):
            row = make_double_mc_example(a[i], b[j], split != "ood", intended == first, rng)
            unintended_source, unintended = (second, b[j]) if intended == first else (first, a[i])
            rows.append({**row, "first": first, "second": second, "intended": intended,
                         "question_first": a[i]["question"], "question_second": b[j]["question"],
                         "correct_first": a[i]["correct"], "correct_second": b[j]["correct"],
                         "unintended_value": answer_value(unintended_source, unintended)})
        result[split] = Dataset.from_list(rows)
    return DatasetDict(result)


def build_skyline_datasets(
    source: str,
    seed: int = 0,
    answer_form: AnswerForm = "letters",
    splits: Sequence[float] = DEFAULT_SPLITS,
    source_files: Mapping[str, PathLike] | None = None,
) -> DatasetDict:
    """Single-question multiple choice on one source set: ``train``, ``val``, ``test``.

    Uses the same question split as :func:`build_double_mc_datasets` (same
    ``seed``), one row per question. Letters: ``Question: <q>\\nA. <x>\\nB. <y>\\nAnswer:``
    with target ``" A"``/``" B"``; words: ``Question: <q>\\nOptions: <x>, <y>\\nAnswer:``
    with the correct word (leading space) as target.

    Columns: ``prompt``, ``answer``, ``distractor``, ``answer_index``,
    ``source``, ``question``, ``correct``, ``incorrect``.
    """
    check_answer_form(answer_form)
    check_source_files(source_files, (source,))
    parts = split_questions(load_source_set(source, source_files), splits, seed, source)
    result = {}
    for split, questions in zip(SKYLINE_SPLITS, parts):
        rng = random.Random(f"skyline:{seed}:{source}:{split}")
        rows = []
        for q in questions:
            row = format_two_option_question(
                f"Question: {q['question']}", q["correct"], q["incorrect"], rng, answer_form=answer_form, letter_sep="."
            )
            rows.append({**row, "source": source, **q})
        result[split] = Dataset.from_list(rows)
    return DatasetDict(result)
