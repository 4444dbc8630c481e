"""Atomic writes: a crash mid-write leaves the previous file or folder, never a partial one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hf_concept_ablation.files import (
    atomic_dir,
    atomic_path,
    files_fingerprint,
    files_sha256,
    read_json,
)


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


def test_a_safetensors_file_saved_again_has_the_same_fingerprint(tmp_path):
    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    metadata = {f"layers.{i}": "{}" for i in (3, 6, 9, 12, 15, 18)}
    fingerprints, headers = set(), set()
    for i in range(6):  # safetensors lists the metadata in another order each time it is saved
        path = tmp_path / f"{i}.safetensors"
        save_file(tensors, str(path), metadata=dict(reversed(metadata.items())) if i % 2 else metadata)
        headers.add(path.read_bytes()[:200])
        fingerprints.add(files_fingerprint([path]))
    assert len(headers) > 1 and len(fingerprints) == 1
    save_file({**tensors, "b": torch.arange(3.0) + 1}, str(tmp_path / "other.safetensors"), metadata=metadata)
    assert files_fingerprint([tmp_path / "other.safetensors"]) not in fingerprints
    (tmp_path / "bad.safetensors").write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00nope")
    with pytest.raises(ValueError, match="bad.safetensors is not a safetensors file"):
        files_fingerprint([tmp_path / "bad.safetensors"])


def test_a_damaged_state_file_is_named(tmp_path):
    from hf_concept_ablation.experiments import study as reproduce
    from hf_concept_ablation.experiments.runner import ResultsFile

    path = tmp_path / "gender_bias.json"
    for text, message in (('{"runs": [', r"gender_bias.json is not valid JSON"),
                          ("[]", r"gender_bias.json must hold a JSON object, got list"),
                          ('{"config": {}}', r"gender_bias.json is not a results file \(it needs a 'runs' list")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            ResultsFile(path, {"config": {}})
    (tmp_path / "validity.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"validity.json is not valid JSON"):
        reproduce.read_validity(tmp_path / "validity.json")
    (tmp_path / "args.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match=r"args.json must hold a JSON array, got dict"):
        read_json(tmp_path / "args.json", list)


def test_a_results_file_records_its_inputs_by_sha256_and_refuses_other_content(tmp_path):
    from hf_concept_ablation.adapter.config import CONFIG_NAME, WEIGHTS_NAME
    from hf_concept_ablation.experiments.runner import (
        ExperimentConfig,
        ResultsFile,
        inputs_record,
    )

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / CONFIG_NAME).write_text("{}")
    save_file({"w": torch.ones(2)}, str(adapter / WEIGHTS_NAME), metadata={"layers.1": "{}", "layers.2": "{}"})
    files = [adapter / CONFIG_NAME, adapter / WEIGHTS_NAME]
    config = ExperimentConfig(adapter=str(adapter))
    assert inputs_record(config) == {"adapter": {"path": str(adapter), "sha256": files_sha256(files)}}
    header = {"config": {}, "inputs": inputs_record(config)}
    path = tmp_path / "results.json"
    ResultsFile(path, header).add({"condition": "none", "seed": 0, "val": {"accuracy": 1.0, "n": 8},
                                   "ood": {"accuracy": 0.0, "n": 8}})
    assert json.loads(path.read_text())["inputs"] == header["inputs"]
    moved = {"config": {}, "inputs": {"adapter": {"path": "elsewhere", "sha256": files_sha256(files)}}}
    assert ResultsFile(path, moved).done("none", 0)  # the same content under another path is the same input
    save_file({"w": torch.zeros(2)}, str(adapter / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"holds runs made with another \['adapter'\] \(other content, by its sha256"):
        ResultsFile(path, {"config": {}, "inputs": inputs_record(config)})


def test_a_results_file_records_every_seed_and_condition_it_was_run_with(tmp_path):
    from hf_concept_ablation.experiments.runner import ResultsFile

    path = tmp_path / "results.json"
    run = {"val": {"accuracy": 1.0, "n": 8}, "ood": {"accuracy": 0.0, "n": 8}}
    ResultsFile(path, {"config": {"seeds": [0, 1], "conditions": ["none", "caft"]}}).add(
        {"condition": "none", "seed": 0, **run})
    ResultsFile(path, {"config": {"seeds": [1, 2], "conditions": ["leace"]}}).add({"condition": "leace", "seed": 2,
                                                                                   **run})
    config = json.loads(path.read_text())["config"]
    assert config["seeds"] == [0, 1, 2] and config["conditions"] == ["none", "caft", "leace"]
