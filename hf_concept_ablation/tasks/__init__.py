"""Task data for concept ablation fine-tuning, written by the project.

- :mod:`.mc`: the shared two-option multiple-choice form and file loading.
- :mod:`.gender_bias`: the pronoun task with a gender shortcut.
- :mod:`.double_mc`: double multiple choice over four source sets, and skylines.

Every builder returns a :class:`datasets.DatasetDict` whose rows have
``prompt``, ``answer`` and ``distractor`` (see :mod:`.mc`). See ``docs/tasks.md``.
"""

from .double_mc import (
    ALL_COMBINATIONS,
    SOURCE_SETS,
    answer_value,
    build_double_mc_datasets,
    build_skyline_datasets,
    check_source_files,
    combination_key,
    double_mc_task_files,
    file_name,
    load_source_set,
    parse_combination_key,
    question_text,
    split_questions,
    unintended_concept_texts,
    value_concept_texts,
)
from .gender_bias import (
    DISTRACTORS,
    PROFESSION_GROUPS,
    PRONOUNS,
    GenderConceptTexts,
    GenderTemplate,
    ProfessionGroup,
    build_gender_concept_texts,
    build_gender_datasets,
    gender_task_files,
    load_gender_templates,
    load_profession_groups,
    split_gender_templates,
)
from .mc import (
    ANSWER_FORMS,
    AnswerForm,
    TaskDataError,
    answer_strings,
    check_single_token,
    format_two_option_question,
    load_source_file,
    read_table,
)

__all__ = [
    "ALL_COMBINATIONS",
    "ANSWER_FORMS",
    "DISTRACTORS",
    "PROFESSION_GROUPS",
    "PRONOUNS",
    "SOURCE_SETS",
    "AnswerForm",
    "GenderConceptTexts",
    "GenderTemplate",
    "ProfessionGroup",
    "TaskDataError",
    "answer_strings",
    "answer_value",
    "build_double_mc_datasets",
    "build_gender_concept_texts",
    "build_gender_datasets",
    "build_skyline_datasets",
    "check_source_files",
    "check_single_token",
    "combination_key",
    "double_mc_task_files",
    "file_name",
    "format_two_option_question",
    "gender_task_files",
    "load_gender_templates",
    "load_profession_groups",
    "load_source_file",
    "load_source_set",
    "parse_combination_key",
    "question_text",
    "read_table",
    "split_gender_templates",
    "split_questions",
    "unintended_concept_texts",
    "value_concept_texts",
]
