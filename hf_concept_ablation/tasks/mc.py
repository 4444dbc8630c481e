"""The shared two-option multiple-choice form used by every task.

Every task dataset is a :class:`datasets.Dataset` whose rows hold at least

- ``prompt``: the full prompt, ending with ``"Answer:"`` (no trailing space);
- ``answer``: the continuation whose first token is scored (``" A"``/``" B"`` in
  the letters form, the correct option's word with a leading space in the words
  form);
- ``distractor``: the other option's continuation;
- ``answer_index``: 0 when the correct option is shown first, 1 otherwise;

plus task metadata columns. This module also reads users' source files
(CSV or JSONL) and checks that answer strings are single tokens.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from ..files import files_sha256

AnswerForm = Literal["letters", "words"]
ANSWER_FORMS: tuple[str, ...] = ("letters", "words")
LETTERS: tuple[str, str] = ("A", "B")
SOURCE_COLUMNS: tuple[str, ...] = ("question", "correct", "incorrect")
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".csv", ".jsonl")

PathLike = Union[str, Path]

#: Folder of the project's own task data files.
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "tasks"


class TaskDataError(ValueError):
    """A malformed task data file: the message names the file, the line and the problem."""

    def __init__(self, path: PathLike, problem: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {problem}")


def check_answer_form(answer_form: str) -> None:
    """Raise ``ValueError`` unless ``answer_form`` is ``"letters"`` or ``"words"``."""
    if answer_form not in ANSWER_FORMS:
        raise ValueError(f"answer_form must be one of {ANSWER_FORMS}, got {answer_form!r}")


def format_two_option_question(
    stem: str,
    correct: str,
    incorrect: str,
    rng: random.Random,
    *,
    answer_form: AnswerForm = "letters",
    letter_sep: str = ")",
) -> dict[str, Any]:
    """Format a two-option question with the correct option at a random place.

    ``stem`` is the text shown before the options (no trailing newline). One draw
    from ``rng`` decides whether the correct option comes first, in both forms.

    - letters: ``"<stem>\\nA<sep> <opt>\\nB<sep> <opt>\\nAnswer:"``; answer ``" A"``
      or ``" B"``, distractor the other letter.
    - words: ``"<stem>\\nOptions: <opt>, <opt>\\nAnswer:"``; answer ``" <correct>"``,
      distractor ``" <incorrect>"``.

    Returns a dict with ``prompt``, ``answer``, ``distractor`` and ``answer_index``.
    """
    check_answer_form(answer_form)
    if correct == incorrect:
        raise ValueError(f"the two options must differ, both are {correct!r}")
    answer_index = 0 if rng.random() < 0.5 else 1
    options = [correct, incorrect] if answer_index == 0 else [incorrect, correct]
    if answer_form == "letters":
        lines = [f"{letter}{letter_sep} {option}" for letter, option in zip(LETTERS, options)]
        answer, distractor = f" {LETTERS[answer_index]}", f" {LETTERS[1 - answer_index]}"
    else:
        lines = [f"Options: {options[0]}, {options[1]}"]
        answer, distractor = f" {correct}", f" {incorrect}"
    prompt = "\n".join([stem, *lines, "Answer:"])
    return {"prompt": prompt, "answer": answer, "distractor": distractor, "answer_index": answer_index}


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class TableRow:
    """One data row of a task file: its 1-based line number and its string cells."""

    line: int
    values: dict[str, str]


def read_table(path: PathLike, required_columns: Sequence[str]) -> list[TableRow]:
    """Read a CSV (header row) or JSONL (one object per line) file.

    Every row must have a non-empty string in each of ``required_columns``
    (values are stripped; other columns are ignored). Line numbers are 1-based
    physical lines (in a CSV the header is line 1). Raises ``FileNotFoundError``
    for a missing file and :class:`TaskDataError` (a ``ValueError``) for a
    malformed one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise TaskDataError(
            path, f"unsupported file extension {path.suffix!r}; use one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise TaskDataError(path, f"not UTF-8 text (byte {err.object[err.start]:#04x}); save the file as UTF-8",
                            line=line) from None
    if not text.strip():
        raise TaskDataError(path, "file is empty")
    rows = _read_csv(path, text, required_columns) if suffix == ".csv" else _read_jsonl(path, text, required_columns)
    if not rows:
        raise TaskDataError(path, "file contains no data rows")
    return rows


def _read_csv(path: Path, text: str, required: Sequence[str]) -> list[TableRow]:
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        return _csv_rows(path, reader, required)
    except csv.Error as err:  # e.g. a field over the csv module's size limit
        raise TaskDataError(path, f"not valid CSV ({err})", line=reader.line_num) from None


def _csv_rows(path: Path, reader: Any, required: Sequence[str]) -> list[TableRow]:
    header = [name.strip() for name in next(reader)]
    repeated = sorted({name for name in header if name and header.count(name) > 1})
    if repeated:
        raise TaskDataError(path, f"column(s) {', '.join(repeated)} appear more than once in the header", line=1)
    missing = [name for name in required if name not in header]
    if missing:
        raise TaskDataError(
            path, f"missing column(s) {', '.join(missing)} in the header (expected {','.join(required)})", line=1
        )
    rows, line = [], reader.line_num + 1
    for cells in reader:
        if cells and any(cell.strip() for cell in cells):
            if len(cells) != len(header):
                raise TaskDataError(path, f"expected {len(header)} fields, found {len(cells)}", line=line)
            record = dict(zip(header, cells))
            rows.append(TableRow(line, _required_cells(path, line, record, required)))
        line = reader.line_num + 1
    return rows


def _read_jsonl(path: Path, text: str, required: Sequence[str]) -> list[TableRow]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise TaskDataError(path, f"invalid JSON ({err.msg})", line=line) from None
        if not isinstance(record, dict):
            raise TaskDataError(path, f"expected a JSON object, got {type(record).__name__}", line=line)
        rows.append(TableRow(line, _required_cells(path, line, record, required)))
    return rows


def _required_cells(path: Path, line: int, record: dict[str, Any], required: Sequence[str]) -> dict[str, str]:
    values = {}
    for name in required:
        if name not in record:
            raise TaskDataError(path, f"missing column {name!r}", line=line)
        value = record[name]
        if not isinstance(value, str):
            raise TaskDataError(path, f"column {name!r} must be a string, got {type(value).__name__}", line=line)
        if not value.strip():
            raise TaskDataError(path, f"empty value in column {name!r}", line=line)
        values[name] = value.strip()
    return values


def load_source_file(path: PathLike) -> list[dict[str, str]]:
    """Load a multiple-choice source set: columns ``question,correct,incorrect``.

    CSV (with a header row) or JSONL. Each question appears once; ``correct`` and
    ``incorrect`` differ and are single-line. Returns one dict per question with
    exactly those three keys, in file order. Malformed files raise
    :class:`TaskDataError` naming the file, the line and the problem.
    """
    questions: list[dict[str, str]] = []
    first_seen: dict[str, int] = {}
    for row in read_table(path, SOURCE_COLUMNS):
        values = row.values
        for name in ("correct", "incorrect"):
            if "\n" in values[name] or "\r" in values[name]:
                raise TaskDataError(path, f"column {name!r} must be a single line", line=row.line)
        if values["correct"] == values["incorrect"]:
            raise TaskDataError(
                path, f"correct and incorrect answers are identical ({values['correct']!r})", line=row.line
            )
        if values["question"] in first_seen:
            raise TaskDataError(
                path, f"duplicate question (first seen on line {first_seen[values['question']]})", line=row.line
            )
        first_seen[values["question"]] = row.line
        questions.append(dict(values))
    return questions


def task_file_record(given: PathLike | None, default: Path) -> dict[str, str | None]:
    """What a results file records of a task file a dataset was built from: ``path``, the file as given (None: the
    project's own, `default`), and ``sha256``, of the bytes read (what ``sha256sum`` prints)."""
    path = default if given is None else Path(given)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return {"path": None if given is None else str(given), "sha256": files_sha256([path])}


# --------------------------------------------------------------------------- tokens


def answer_strings(data: Any) -> list[str]:
    """All distinct ``answer`` and ``distractor`` strings of a Dataset or DatasetDict."""
    parts = list(data.values()) if isinstance(data, Mapping) else [data]
    seen: dict[str, None] = {}
    for part in parts:
        for column in ("answer", "distractor"):
            seen.update(dict.fromkeys(part[column]))
    return list(seen)


def check_single_token(tokenizer: Any, strings: Iterable[str]) -> None:
    """Raise ``ValueError`` naming every string that is not exactly one token.

    ``tokenizer`` is a Hugging Face tokenizer; strings are encoded without
    special tokens, exactly as they are appended to the prompt (e.g. ``" A"``).
    """
    bad = {}
    for text in dict.fromkeys(strings):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            bad[text] = tokenizer.convert_ids_to_tokens(ids)
    if bad:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        details = "; ".join(f"{text!r} -> {tokens}" for text, tokens in bad.items())
        raise ValueError(
            f"answer strings must be exactly one token under tokenizer {name!r}, "
            f"but {len(bad)} are not: {details}"
        )
