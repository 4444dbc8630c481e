"""Atomic writes: a crash mid-write leaves the previous file or folder, never a partial one."""

from __future__ import annotations

import pytest

from hf_concept_ablation.files import atomic_dir, atomic_path


def test_atomic_dir_replaces_the_folder_only_when_the_writer_finishes(tmp_path):
    target = tmp_path / "models" / "caft-seed0"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_text("old")
        assert not target.exists()  # nothing appears before the writer is done
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]

    with pytest.raises(RuntimeError, match="killed mid-save"):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
            raise RuntimeError("killed mid-save")
    assert (target / "config.json").read_text() == "{}" and (target / "model.safetensors").read_text() == "old"

    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
    assert [p.name for p in target.iterdir()] == ["config.json"]  # the old folder's files are gone
    assert sorted(p.name for p in target.parent.iterdir()) == ["caft-seed0"]  # no temporary folders left


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise ValueError
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
