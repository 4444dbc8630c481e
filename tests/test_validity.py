"""The skyline half of the validity rule, from the recorded skylines."""

from __future__ import annotations

import pytest

from hf_concept_ablation.tasks.validity import (
    SKYLINE_MIN,
    check_skyline,
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
