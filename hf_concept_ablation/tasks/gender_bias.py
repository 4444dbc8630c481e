"""The gender-bias pronoun task (the paper's multiple-choice pronoun task).

The intended rule is grammar: pick the pronoun in the right case (subject
``he``/``she``, object ``him``/``her``). The distractor differs from the correct
pronoun in both gender and case (he->her, she->him, him->she, her->he), so in
``D_amb`` (male doctors, female nurses) the stereotyped gender of the profession
also predicts the answer. ``D_ood`` (female doctors, male nurses) is answered
correctly only by the grammatical rule.

Templates and profession groups are written by the project
(``assets/tasks/gender_templates.jsonl``, ``assets/tasks/profession_groups.json``).
A user's own files can replace them: templates as CSV or JSONL (columns
``template,case``), profession groups as JSON (group name -> stereotyped gender
and professions).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from datasets import Dataset, DatasetDict

from ..checks import check_number
from .mc import (
    ASSETS_DIR,
    AnswerForm,
    PathLike,
    TaskDataError,
    check_answer_form,
    format_two_option_question,
    read_table,
    task_file_record,
)

DEFAULT_TEMPLATES_FILE = ASSETS_DIR / "gender_templates.jsonl"
DEFAULT_PROFESSIONS_FILE = ASSETS_DIR / "profession_groups.json"

INSTRUCTION = "Choose the option corresponding to the correct pronoun."
BLANK = "_____"
CASES: tuple[str, str] = ("subject", "object")
GENDERS: tuple[str, str] = ("male", "female")

#: The correct pronoun for each (gender, case).
PRONOUNS: dict[tuple[str, str], str] = {
    ("male", "subject"): "he",
    ("female", "subject"): "she",
    ("male", "object"): "him",
    ("female", "object"): "her",
}
#: The distractor for each correct pronoun: the other gender *and* the other case.
DISTRACTORS: dict[str, str] = {"he": "her", "she": "him", "him": "she", "her": "he"}

_PLACEHOLDERS = ("{profession}", "{pronoun}")
_GROUP_KEYS = ("stereotyped_gender", "professions")


@dataclass(frozen=True)
class ProfessionGroup:
    """Professions that share a stereotyped gender, the attribute the task's shortcut reads."""

    name: str
    stereotyped_gender: str
    professions: tuple[str, ...]


def load_profession_groups(path: PathLike | None = None) -> list[ProfessionGroup]:
    """Load and validate profession groups (the project's own when ``path`` is None), in file order.

    The file is a JSON object: group name -> ``{"stereotyped_gender": "male" or "female", "professions": [...]}``,
    each profession a non-empty one-line string without braces (it fills a template's ``{profession}`` slot; several
    words are fine), in no other group. Both genders need a group. Problems raise
    :class:`~hf_concept_ablation.tasks.mc.TaskDataError` naming the file, the group and the bad value.
    """
    path = DEFAULT_PROFESSIONS_FILE if path is None else Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise TaskDataError(path, 'expected a non-empty JSON object of profession groups ({"<group>": '
                                  '{"stereotyped_gender": "male", "professions": [...]}, ...}), '
                                  f"got {json.dumps(data)[:60]}")
    group_of: dict[str, str] = {}  # profession -> its group, so none is in two
    groups = [_profession_group(path, name, group, group_of) for name, group in data.items()]
    for gender in GENDERS:
        if all(g.stereotyped_gender != gender for g in groups):
            raise TaskDataError(path, f"no group has stereotyped_gender {gender!r}: training pairs each group with its "
                                      "stereotyped gender, so both genders need a group")
    return groups


def _read_json(path: Path) -> Any:
    """The JSON value in `path`; a missing file raises FileNotFoundError, one that is not UTF-8 JSON (naming the line)
    or gives a key twice in an object (which JSON would let the last one win) a `TaskDataError`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise TaskDataError(path, f"key(s) {repeated} given twice in one object")
        return dict(pairs)

    try:
        return json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=unique_keys)
    except UnicodeDecodeError:
        raise TaskDataError(path, "not UTF-8 text; save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise TaskDataError(path, f"invalid JSON ({err.msg}, column {err.colno})", line=err.lineno) from None


def _profession_group(path: Path, name: str, group: Any, group_of: dict[str, str]) -> ProfessionGroup:
    """Group `name` of a profession groups file, checked; `group_of` (profession -> group) gains its professions."""
    where = f"group {name!r}"
    if not name.strip():
        raise TaskDataError(path, "a group name is empty")
    if not isinstance(group, dict):
        raise TaskDataError(path, f"{where}: expected an object with keys {list(_GROUP_KEYS)}, got {group!r:.60}")
    missing, unknown = [k for k in _GROUP_KEYS if k not in group], sorted(set(group) - set(_GROUP_KEYS))
    if missing or unknown:
        problems = [f"missing key(s) {missing}"] * bool(missing) + [f"unknown key(s) {unknown}"] * bool(unknown)
        raise TaskDataError(path, f"{where}: {', '.join(problems)} (expected {list(_GROUP_KEYS)})")
    gender, professions = group["stereotyped_gender"], group["professions"]
    if not isinstance(gender, str) or gender.lower() not in GENDERS:
        raise TaskDataError(path, f"{where}: unknown stereotyped_gender {gender!r} (expected 'male' or 'female')")
    if not isinstance(professions, list):
        raise TaskDataError(path, f"{where}: professions must be a list of strings, got {professions!r:.60}")
    if not professions:
        raise TaskDataError(path, f"{where} is empty: list at least one profession")
    for given in professions:
        if not isinstance(given, str) or not given.strip():
            raise TaskDataError(path, f"{where}: every profession must be a non-empty string, got {given!r}")
        if any(c in given for c in "{}\r\n"):
            raise TaskDataError(path, f"{where}: profession {given!r} must be one line without braces (it fills "
                                      "the templates' {profession} slot)")
        profession = given.strip()
        if profession in group_of:
            twice = "listed twice" if group_of[profession] == name else f"also in group {group_of[profession]!r}"
            raise TaskDataError(path, f"{where}: profession {profession!r} is {twice}")
        group_of[profession] = name
    return ProfessionGroup(name, gender.lower(), tuple(p.strip() for p in professions))


#: The project's profession groups (``assets/tasks/profession_groups.json``): the male-stereotyped "doctor" group and
#: the female-stereotyped "nurse" group.
PROFESSION_GROUPS: dict[str, tuple[str, ...]] = {g.name: g.professions for g in load_profession_groups()}


def split_pairs(groups: Sequence[ProfessionGroup], split: str,
                skyline: bool = False) -> list[tuple[ProfessionGroup, str]]:
    """The (profession group, pronoun gender) pairs of `split`: ``train`` and ``val`` pair each group with its
    stereotyped gender, ``ood`` with the other one; the skyline's ``train`` has both (only grammar predicts the
    answer)."""
    stereotyped = [(g, g.stereotyped_gender) for g in groups]
    broken = [(g, GENDERS[1 - GENDERS.index(g.stereotyped_gender)]) for g in groups]
    if split == "ood":
        return broken
    return stereotyped + broken if skyline and split == "train" else stereotyped


def gender_task_files(templates_file: PathLike | None = None,
                      professions_file: PathLike | None = None) -> dict[str, dict[str, str | None]]:
    """The task files `build_gender_datasets` reads with these settings, as a results file records them
    (`~hf_concept_ablation.tasks.mc.task_file_record`), by setting name."""
    return {"templates_file": task_file_record(templates_file, DEFAULT_TEMPLATES_FILE),
            "professions_file": task_file_record(professions_file, DEFAULT_PROFESSIONS_FILE)}


@dataclass(frozen=True)
class GenderTemplate:
    """One sentence template with ``{profession}`` and ``{pronoun}`` slots."""

    template_id: int
    template: str
    case: str

    def render(self, profession: str) -> str:
        """The sentence with the profession filled in and the pronoun slot as ``_____``."""
        sentence = self.template.replace("{profession}", profession).replace("{pronoun}", BLANK)
        return sentence[:1].upper() + sentence[1:]


def load_gender_templates(path: PathLike | None = None) -> list[GenderTemplate]:
    """Load and validate templates (the project's own when ``path`` is None).

    The file is CSV or JSONL with columns ``template`` (exactly one
    ``{profession}`` and one ``{pronoun}``, no other braces) and ``case``
    (``subject`` or ``object``). ``template_id`` is the row's 0-based position.
    Problems raise :class:`~hf_concept_ablation.tasks.mc.TaskDataError` naming
    the file, the line and the problem.
    """
    path = DEFAULT_TEMPLATES_FILE if path is None else Path(path)
    templates: list[GenderTemplate] = []
    first_seen: dict[str, int] = {}
    for row in read_table(path, ("template", "case")):
        template, case = row.values["template"], row.values["case"].lower()
        if case not in CASES:
            raise TaskDataError(
                path, f"invalid case {row.values['case']!r} (expected 'subject' or 'object')", line=row.line
            )
        for placeholder in _PLACEHOLDERS:
            count = template.count(placeholder)
            if count != 1:
                problem = "missing placeholder" if count == 0 else f"{count} occurrences of placeholder"
                raise TaskDataError(path, f"{problem} {placeholder} (exactly one is required)", line=row.line)
        rest = template.replace("{profession}", "").replace("{pronoun}", "")
        if "{" in rest or "}" in rest:
            stray = re.findall(r"\{[^{}]*\}", rest)
            what = f"unknown placeholder {stray[0]}" if stray else "stray brace"
            raise TaskDataError(path, f"{what} (only {{profession}} and {{pronoun}} are allowed)", line=row.line)
        if template in first_seen:
            raise TaskDataError(path, f"duplicate template (first seen on line {first_seen[template]})", line=row.line)
        first_seen[template] = row.line
        templates.append(GenderTemplate(len(templates), template, case))
    return templates


def split_gender_templates(
    templates: Sequence[GenderTemplate], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[GenderTemplate], list[GenderTemplate]]:
    """Split templates into (train, held-out) by template, separately within each case."""
    check_number(val_fraction, "val_fraction", 0, 1, low_open=True, high_open=True)
    rng = random.Random(f"gender-split:{seed}")
    train: list[GenderTemplate] = []
    heldout: list[GenderTemplate] = []
    for case in CASES:
        group = [t for t in templates if t.case == case]
        rng.shuffle(group)
        n_heldout = min(max(round(len(group) * val_fraction), 1), len(group) - 1) if len(group) > 1 else 0
        heldout += group[:n_heldout]
        train += group[n_heldout:]
    if not train or not heldout:
        raise ValueError(
            f"{len(templates)} templates are too few to hold out a fraction of {val_fraction} "
            "(each split needs at least one template)"
        )
    return sorted(train, key=lambda t: t.template_id), sorted(heldout, key=lambda t: t.template_id)


def make_gender_example(
    template: GenderTemplate,
    profession: str,
    gender: str,
    rng: random.Random,
    answer_form: AnswerForm = "letters",
) -> dict[str, object]:
    """One prompt row for a template, a profession and the pronoun's gender."""
    pronoun = PRONOUNS[(gender, template.case)]
    stem = f"{INSTRUCTION}\nQuestion: {template.render(profession)}"
    row = format_two_option_question(stem, pronoun, DISTRACTORS[pronoun], rng, answer_form=answer_form)
    return {**row, "template_id": template.template_id, "case": template.case, "profession": profession,
            "gender": gender, "pronoun": pronoun}


def build_gender_datasets(
    seed: int = 0,
    val_fraction: float = 0.2,
    templates_file: PathLike | None = None,
    answer_form: AnswerForm = "letters",
    skyline: bool = False,
    professions_file: PathLike | None = None,
) -> DatasetDict:
    """Build ``train`` (D_amb), ``val`` (D_val) and ``ood`` (D_ood) for the gender task.

    With ``skyline=True`` the training split has every profession group with both genders
    (the paper's skyline: can the model learn the intended rule when nothing else predicts
    the answer?); ``val`` and ``ood`` are unchanged.

    Templates (`load_gender_templates` of ``templates_file``) are split by template within
    each case (``val_fraction`` held out; ``val`` and ``ood`` share the held-out templates).
    Every template yields one row per (profession group, gender) pair of its split
    (`split_pairs`, groups from `load_profession_groups` of ``professions_file``), the
    profession drawn from the group.

    Columns: ``prompt``, ``answer``, ``distractor``, ``answer_index``,
    ``template_id``, ``case``, ``profession``, ``profession_group``, ``gender``,
    ``pronoun`` (the correct one), ``stereotyped_gender`` (the profession group's, the unintended
    attribute: the label an eraser of the concept is fitted on).
    """
    check_answer_form(answer_form)
    train, heldout = split_gender_templates(load_gender_templates(templates_file), val_fraction, seed)
    groups = load_profession_groups(professions_file)
    splits = {}
    for split, templates in (("train", train), ("val", heldout), ("ood", heldout)):
        rng = random.Random(f"gender:{seed}:{split}")
        rows = []
        for template in templates:
            for group, gender in split_pairs(groups, split, skyline):
                profession = rng.choice(group.professions)
                row = make_gender_example(template, profession, gender, rng, answer_form)
                rows.append({**row, "profession_group": group.name, "stereotyped_gender": group.stereotyped_gender})
        splits[split] = Dataset.from_list(rows)
    return DatasetDict(splits)


class GenderConceptTexts(NamedTuple):
    """Paired female- and male-themed texts (``female[i]`` mirrors ``male[i]``)."""

    female: list[str]
    male: list[str]


_CONCEPT_PAIRS: tuple[tuple[str, str], ...] = (
    ("She is my mother.", "He is my father."),
    ("My sister loves to read.", "My brother loves to read."),
    ("The queen waved to the crowd.", "The king waved to the crowd."),
    ("Her daughter just started school.", "His son just started school."),
    ("The woman opened the door.", "The man opened the door."),
    ("My aunt lives by the sea.", "My uncle lives by the sea."),
    ("The girl ran to her grandmother.", "The boy ran to his grandfather."),
    ("She told me about her day.", "He told me about his day."),
    ("The actress won an award.", "The actor won an award."),
    ("Mrs. Smith is our neighbor.", "Mr. Smith is our neighbor."),
    ("The bride smiled at the guests.", "The groom smiled at the guests."),
    ("My wife cooked dinner tonight.", "My husband cooked dinner tonight."),
    ("The princess rode a horse.", "The prince rode a horse."),
    ("I gave her the book.", "I gave him the book."),
    ("The ladies sat in the garden.", "The gentlemen sat in the garden."),
    ("Mary said she would call.", "John said he would call."),
    ("The waitress brought our food.", "The waiter brought our food."),
    ("My niece is very clever.", "My nephew is very clever."),
    ("The mother held her baby.", "The father held his baby."),
    ("My girlfriend plays the violin.", "My boyfriend plays the violin."),
    ("The sisters went shopping together.", "The brothers went shopping together."),
    ("Grandma baked a pie.", "Grandpa baked a pie."),
    ("The heroine saved the village.", "The hero saved the village."),
    ("Emma lost her keys.", "James lost his keys."),
    ("She is a strong, kind woman.", "He is a strong, kind man."),
    ("The nun prayed quietly.", "The monk prayed quietly."),
    ("The duchess hosted a ball.", "The duke hosted a ball."),
    ("My daughter wants a puppy.", "My son wants a puppy."),
    ("Ask her about the trip.", "Ask him about the trip."),
    ("The girls played in the park.", "The boys played in the park."),
    ("Sarah fixed her bicycle.", "David fixed his bicycle."),
    ("The women's team won the final.", "The men's team won the final."),
)


def build_gender_concept_texts() -> GenderConceptTexts:
    """Two small aligned lists of female- and male-themed sentences.

    Each pair differs only in gendered words, which makes them suited to
    concept contrasts (e.g. a mean-difference or PCA direction for gender).
    """
    return GenderConceptTexts(female=[f for f, _ in _CONCEPT_PAIRS], male=[m for _, m in _CONCEPT_PAIRS])
