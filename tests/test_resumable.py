"""The one rule of resumable work: same settings resume, other settings are refused (or, for a cache, recomputed)."""

from __future__ import annotations

import json
import os

import pytest

from hf_concept_ablation import files
from hf_concept_ablation.resumable import OtherSettingsError, check_settings, resume_folder, setting_differences


def test_same_settings_resume_the_work_and_its_record(tmp_path):
    folder = tmp_path / "work"
    assert resume_folder(folder, {"lr": 0.1, "k": 8}, record="settings.json", what="training") is None
    (folder / "step-1").write_text("done")
    record = json.loads((folder / "settings.json").read_text())
    assert record == {"lr": 0.1, "k": 8}
    files.write_json_atomic(folder / "settings.json", {**record, "steps": 1})  # the step records its progress
    assert resume_folder(folder, {"lr": 0.1, "k": 8}, record="settings.json", what="training") == {**record, "steps": 1}
    assert (folder / "step-1").read_text() == "done"


def test_other_settings_are_refused_naming_each_setting_and_its_two_values(tmp_path):
    folder = tmp_path / "work"
    resume_folder(folder, {"lr": 0.1, "k": 8, "seed": 0}, record="settings.json", what="training")
    with pytest.raises(OtherSettingsError, match=r"work holds training made with other settings \(lr: 0.1 there, 0.2 "
                                                 r"now, k: 8 there, 4 now\); use another output folder or delete it"):
        resume_folder(folder, {"lr": 0.2, "k": 4, "seed": 0}, record="settings.json", what="training")
    with pytest.raises(ValueError, match=r"\(new: None there, 1 now\); start again"):  # a setting added since
        check_settings({"lr": 0.1}, {"lr": 0.1, "new": 1}, where=folder, what="runs", advice="start again")
    assert json.loads((folder / "settings.json").read_text())["lr"] == 0.1  # the record is left as it was
    assert setting_differences({"lr": 0.1, "gone": 1}, {"lr": 0.1}) == {}  # a setting no longer used does not count


def test_a_cache_of_other_settings_or_without_a_record_is_recomputed(tmp_path):
    folder = tmp_path / "cache"
    resume_folder(folder, {"inputs": "a"}, record="progress.json", what="a cache", recompute=True)
    (folder / "shard").write_text("of a")
    assert resume_folder(folder, {"inputs": "b"}, record="progress.json", what="a cache", recompute=True) is None
    assert sorted(os.listdir(folder)) == ["progress.json"]
    (folder / "progress.json").unlink()
    (folder / "shard").write_text("of what?")
    assert resume_folder(folder, {"inputs": "b"}, record="progress.json", what="a cache", recompute=True) is None
    assert sorted(os.listdir(folder)) == ["progress.json"]


def test_a_crash_while_writing_the_record_leaves_none_and_the_next_run_starts_afresh(tmp_path, monkeypatch):
    folder = tmp_path / "work"

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        resume_folder(folder, {"k": 8}, record="settings.json", what="training")
    assert os.listdir(folder) == []  # neither a half-written record nor its temporary file
    monkeypatch.undo()
    assert resume_folder(folder, {"k": 4}, record="settings.json", what="training") is None
    assert json.loads((folder / "settings.json").read_text()) == {"k": 4}
