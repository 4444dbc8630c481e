"""Sampling the SAE corpus from a model resumes after an interruption, also one that cut a line in half."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_model, make_tiny_tokenizer

from hf_concept_ablation.saes.corpus import iter_texts, read_corpus, sample_from_model

PROMPTS = ("w6 w7", "w8 w9 w10", "w11")


def _sample(path, n_samples=6):
    return sample_from_model(make_tiny_model("gemma3"), make_tiny_tokenizer(), path, n_samples=n_samples,
                             max_new_tokens=4, batch_size=2, prompts=PROMPTS)


def test_sampling_resumes_after_a_torn_last_line(tmp_path):
    whole = _sample(tmp_path / "whole.jsonl")
    assert len(whole) == 6
    torn = tmp_path / "torn.jsonl"
    lines = (tmp_path / "whole.jsonl").read_text().splitlines()
    kept = ['{"text": "first kept"}', '{"text": "second kept"}']  # the first batch, marked so a redo would show
    torn.write_text("\n".join([*kept, lines[2]]) + "\n" + lines[3][:10])  # stopped while writing the second batch
    resumed = _sample(torn)
    assert resumed == ["first kept", "second kept", *whole[2:]]  # batch 1 kept; only batches 2-3 sampled again
    assert [json.loads(line)["text"] for line in torn.read_text().splitlines()] == resumed


def test_a_malformed_line_before_the_last_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "w6"}\nnot json\n{"text": "w7"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not a JSON object"):
        _sample(path)


def test_sampling_leaves_the_callers_tokenizer_as_it_was(tmp_path):
    tokenizer = make_tiny_tokenizer()
    tokenizer.padding_side = "right"
    sample_from_model(make_tiny_model("gemma3"), tokenizer, tmp_path / "s.jsonl", n_samples=2, max_new_tokens=2,
                      batch_size=2, prompts=PROMPTS)
    assert tokenizer.padding_side == "right"


def test_a_corpus_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a", "split": "train"}\n{"text": "b", "spl')
    with pytest.raises(ValueError, match=r"corpus.jsonl, line 2: not a JSON record"):
        read_corpus(path)


@pytest.mark.parametrize("record", [["a", "b"], {"text": "w6 w7"}, {"txt": "w6 w7", "split": "train"},
                                    {"text": "w6 w7", "split": "test"}])
def test_a_corpus_record_without_text_and_split_is_named(tmp_path, record):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"text": "w8", "split": "train"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"mine.jsonl, line 2: a corpus record is a JSON object with a 'text' string "
                                         r"and a 'split' of \('train', 'heldout'\), got "):
        list(iter_texts(path))
