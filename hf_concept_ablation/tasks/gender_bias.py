"""The gender-bias pronoun task (the paper's multiple-choice pronoun task).

The intended rule is grammar: pick the pronoun in the right case (subject
``he``/``she``, object ``him``/``her``). The distractor differs from the correct
pronoun in both gender and case (he->her, she->him, him->she, her->he), so in
``D_amb`` (male doctors, female nurses) the stereotyped gender of the profession
also predicts the answer. ``D_ood`` (female doctors, male nurses) is answered
correctly only by the grammatical rule.

Templates are written by the project (``assets/tasks/gender_templates.jsonl``).
A user's own file (CSV or JSONL, columns ``template,case``) can replace them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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
)

DEFAULT_TEMPLATES_FILE = ASSETS_DIR / "gender_templates.jsonl"

INSTRUCTION = "Choose the option corresponding to the correct pronoun."
BLANK = "_____"
CASES: tuple[str, str] = ("subject", "object")

#: The correct pronoun for each (gender, case).
PRONOUNS: dict[tuple[str, str], str] = {
    ("male", "subject"): "he",
    ("female", "subject"): "she",
    ("male", "object"): "him",
    ("female", "object"): "her",
}
#: The distractor for each correct pronoun: the other gender *and* the other case.
DISTRACTORS: dict[str, str] = {"he": "her", "she": "him", "him": "she", "her": "he"}

#: Profession groups: the male-stereotyped "doctor" group and the female-stereotyped "nurse" group.
PROFESSION_GROUPS: dict[str, tuple[str, ...]] = {
    "doctor": ("doctor", "surgeon", "physician"),
    "nurse": ("nurse", "midwife", "nursing assistant"),
}
#: Which (profession group, gender) pairs each split holds.
SPLIT_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("doctor", "male"), ("nurse", "female")),
    "val": (("doctor", "male"), ("nurse", "female")),
    "ood": (("doctor", "female"), ("nurse", "male")),
}
#: the training rule of the skyline: every (group, gender) pair, so only grammar predicts the answer
SKYLINE_TRAIN_RULE = SPLIT_RULES["train"] + SPLIT_RULES["ood"]
#: each profession group's stereotyped gender: the spurious rule the training split (`SPLIT_RULES`) follows
STEREOTYPED_GENDER: dict[str, str] = dict(SPLIT_RULES["train"])

_PLACEHOLDERS = ("{profession}", "{pronoun}")


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
) -> DatasetDict:
    """Build ``train`` (D_amb), ``val`` (D_val) and ``ood`` (D_ood) for the gender task.

    With ``skyline=True`` the training split has every profession group with both genders
    (:data:`SKYLINE_TRAIN_RULE`, the paper's skyline: can the model learn the intended rule
    when nothing else predicts the answer?); ``val`` and ``ood`` are unchanged.

    Templates are split by template within each case (``val_fraction`` held out;
    ``val`` and ``ood`` share the held-out templates). Every template yields one
    row per (profession group, gender) pair of its split's rule
    (:data:`SPLIT_RULES`), the profession drawn from the group.

    Columns: ``prompt``, ``answer``, ``distractor``, ``answer_index``,
    ``template_id``, ``case``, ``profession``, ``profession_group``, ``gender``,
    ``pronoun`` (the correct one), ``stereotyped_gender`` (the profession group's, the unintended
    attribute: the label an eraser of the concept is fitted on).
    """
    check_answer_form(answer_form)
    train, heldout = split_gender_templates(load_gender_templates(templates_file), val_fraction, seed)
    splits = {}
    for split, templates in (("train", train), ("val", heldout), ("ood", heldout)):
        rng = random.Random(f"gender:{seed}:{split}")
        rows = []
        for template in templates:
            for group, gender in (SKYLINE_TRAIN_RULE if skyline and split == "train" else SPLIT_RULES[split]):
                profession = rng.choice(PROFESSION_GROUPS[group])
                row = make_gender_example(template, profession, gender, rng, answer_form)
                rows.append({**row, "profession_group": group, "stereotyped_gender": STEREOTYPED_GENDER[group]})
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
