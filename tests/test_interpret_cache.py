"""The activation cache: right contexts, BOS/padding never counted, atomic safetensors + JSON round trip."""

from __future__ import annotations

import contextlib
import copy
import json
import random

import datasets
import pytest
import torch
from conftest import make_sae, make_tiny_model, make_tiny_tokenizer

from hf_concept_ablation.adapter.model import find_decoder_layers
from hf_concept_ablation.search.activations import iter_residuals
from hf_concept_ablation.search.cache import (
    PAD_TOKEN,
    PROGRESS_NAME,
    ActivationCache,
    build_activation_cache,
)


def _texts(n=40, seed=0):
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(6, 128)}" for _ in range(rng.randrange(2, 25))) for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer()
    saes = {1: make_sae("jumprelu", layer=1, seed=1), 3: make_sae("topk", layer=3, seed=3)}
    texts = _texts()
    cache = build_activation_cache(model, tokenizer, texts, saes, top_k=4, n_quantiles=3, per_quantile=1,
                                   window=(5, 2), progress=False)
    return model, tokenizer, saes, texts, cache


def _brute_force(model, tokenizer, texts, sae, layer, latent):
    """Per text: (max activation over counted tokens, position), from the SAE's full encoder."""
    out = []
    for batch in iter_residuals(model, tokenizer, texts, [layer], batch_size=1, progress=False):
        acts = sae.encode(batch.hidden[layer])[0, :, latent] * batch.keep[0]
        out.append((float(acts.max()), int(acts.argmax())))
    return out


def test_top_contexts_are_the_texts_with_highest_max_activation(setup):
    model, tokenizer, saes, texts, cache = setup
    for layer, latent in [(1, 5), (1, 200), (3, 17)]:
        truth = _brute_force(model, tokenizer, texts, saes[layer], layer, latent)
        expected = sorted((v for v, _ in truth if v > 0), reverse=True)[:4]
        top = cache.examples(layer, latent, "top")
        assert [e.value for e in top] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        for e in top:
            assert e.acts[e.center] == pytest.approx(e.value, rel=1e-4, abs=1e-5)
            assert e.value == pytest.approx(max(e.acts), rel=1e-4, abs=1e-5)
            value, pos = truth[e.doc]
            assert e.value == pytest.approx(value, rel=1e-4, abs=1e-5)
            ids = tokenizer(texts[e.doc])["input_ids"]
            assert e.tokens[e.center] == tokenizer.decode([ids[pos]])  # centred on the max-activating token
            assert e.tokens[:e.center] == [tokenizer.decode([i]) for i in ids[max(1, pos - 5):pos]]  # BOS left out


def test_windows_exclude_bos_and_padding(setup):
    _, tokenizer, _, _, cache = setup
    tokens = cache.tensors["example_tokens"]
    assert not torch.isin(tokens, torch.tensor([tokenizer.bos_token_id, tokenizer.pad_token_id])).any()
    # a window holds at most before + 1 + after tokens, centred on the max token
    assert tokens.shape[1] == 8
    assert int((cache.tensors["example_center"] <= 5).all())
    assert (cache.tensors["example_acts"][tokens == PAD_TOKEN] == 0).all()


def test_quantile_samples_are_below_the_top_contexts(setup):
    _, _, _, _, cache = setup
    checked = 0
    for layer, latent in cache.latents[:60]:
        top = cache.examples(layer, latent, "top")
        quantiles = cache.examples(layer, latent, "quantiles")
        if quantiles:
            checked += 1
            assert len(top) == 4
            assert max(q.value for q in quantiles) <= min(t.value for t in top) + 1e-4
            assert {q.kind for q in quantiles} <= {"q1", "q2", "q3"}
    assert checked > 10


def test_statistics_describe_the_corpus(setup):
    _, _, _, _, cache = setup
    stats = cache.stats(1, 5)
    top = cache.examples(1, 5, "top")
    assert stats["max_activation"] == pytest.approx(top[0].value, rel=1e-4)
    assert 0 < stats["frequency"] <= 1
    assert cache.info["n_texts"] == 40 and cache.info["layers"] == [1, 3]


def test_save_and_load_round_trip_atomically(setup, tmp_path):
    _, _, _, _, cache = setup
    weights, sidecar = cache.save(tmp_path / "sub" / "cache")
    assert weights.name == "cache.safetensors" and sidecar.name == "cache.json"
    assert not list(tmp_path.rglob("*.tmp"))
    loaded = ActivationCache.load(sidecar)
    assert loaded.latents == cache.latents
    assert loaded.examples(1, 5, "all") == cache.examples(1, 5, "all")
    assert loaded.examples(1, 5)[0].tokens[0].startswith("w")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ActivationCache.load(tmp_path / "missing")


def test_chosen_latents_match_the_full_cache_and_dataset_input_works(setup):
    model, tokenizer, saes, texts, cache = setup
    data = datasets.Dataset.from_dict({"text": texts})
    sub = build_activation_cache(model, tokenizer, data, saes, [(3, 17), (1, 5)], top_k=4, n_quantiles=0,
                                 window=(5, 2), progress=False)
    assert sub.latents == [(1, 5), (3, 17)]
    for key in sub.latents:
        assert [e.doc for e in sub.examples(*key)] == [e.doc for e in cache.examples(*key)]
    with pytest.raises(KeyError, match="not in this cache"):
        sub.examples(1, 6)
    with pytest.raises(ValueError, match="has no SAE"):
        build_activation_cache(model, tokenizer, texts, saes, [(2, 0)], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        build_activation_cache(model, tokenizer, texts, saes, [(1, 10_000)], progress=False)


def test_reading_activations_leaves_the_model_as_it_was(setup):
    model, tokenizer, _, texts, _ = setup
    model.train()
    batches = iter_residuals(model, tokenizer, texts, [1, 2], batch_size=4, progress=False)
    first = next(batches)  # stop early: nothing may leak into the caller
    assert set(first.hidden) == {1, 2} and first.hidden[1].shape[:2] == first.input_ids.shape
    assert torch.is_grad_enabled() and model.training
    assert all(not m._forward_hooks for m in model.modules())
    model.eval()


class _Interrupted(KeyboardInterrupt):
    """The user stops a build (Ctrl-C)."""


@contextlib.contextmanager
def _forward_passes(model, stop_after: int | None = None):
    """Count the model's forward passes (through its first decoder layer) in a list; with `stop_after`, the next one
    is interrupted."""
    passes = []

    def hook(module, args, output):
        if stop_after is not None and len(passes) == stop_after:
            raise _Interrupted(f"stopped after {stop_after} forward passes")
        passes.append(1)

    handle = find_decoder_layers(model)[1][0].register_forward_hook(hook)
    try:
        yield passes
    finally:
        handle.remove()


def _assert_same_cache(cache, expected):
    assert cache.latents == expected.latents and cache.vocab == expected.vocab and cache.info == expected.info
    assert cache.tensors.keys() == expected.tensors.keys()
    for name, tensor in expected.tensors.items():
        assert cache.tensors[name].dtype == tensor.dtype and torch.equal(cache.tensors[name], tensor), name


BUILD = dict(top_k=4, n_quantiles=3, per_quantile=1, window=(5, 2), batch_size=4, progress=False)


def test_an_interrupted_build_continues_where_it_stopped_to_the_same_cache(setup, tmp_path):
    model, tokenizer, saes, texts, _ = setup
    with _forward_passes(model) as passes:
        expected = build_activation_cache(model, tokenizer, texts, saes, **BUILD)
    scan = len(texts) // BUILD["batch_size"]  # 10 batches, then as many as the texts with a chosen window need
    assert len(passes) > scan
    checkpoint = tmp_path / "progress"
    # stopped in the scan (after 7 batches, 6 of them saved), then in the windows (2 batches in, both saved)
    for stop_after, done in ((7, 6), (scan - 6 + 2, scan + 2)):
        with _forward_passes(model, stop_after), pytest.raises(_Interrupted):
            build_activation_cache(model, tokenizer, texts, saes, checkpoint=checkpoint, checkpoint_every=2, **BUILD)
        shards = json.loads((checkpoint / PROGRESS_NAME).read_text())["passes"]
        assert sum(s[-1]["batches"] for s in shards.values()) == done
    with _forward_passes(model) as resumed:
        cache = build_activation_cache(model, tokenizer, texts, saes, checkpoint=checkpoint, checkpoint_every=2,
                                       **BUILD)
    assert len(resumed) == len(passes) - scan - 2  # only the windows not cut yet
    _assert_same_cache(cache, expected)
    assert not checkpoint.exists()  # the progress goes once the cache is built


def _retokenized(change: str):
    """The tiny tokenizer with the same class, vocabulary and special tokens, tokenizing otherwise."""
    from tokenizers import normalizers, processors

    tokenizer = make_tiny_tokenizer()
    if change == "no BOS":
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    else:  # "w12" reads "w22", ...
        tokenizer.backend_tokenizer.normalizer = normalizers.Replace("w1", "w2")
    return tokenizer


def test_a_finished_builds_kept_progress_gives_the_cache_again_without_a_forward_pass(setup, tmp_path):
    model, tokenizer, saes, texts, _ = setup
    checkpoint = tmp_path / "progress"
    expected = build_activation_cache(model, tokenizer, texts, saes, checkpoint=checkpoint, keep_checkpoint=True,
                                      **BUILD)
    assert (checkpoint / PROGRESS_NAME).is_file()
    with _forward_passes(model) as again:
        cache = build_activation_cache(model, tokenizer, texts, saes, checkpoint=checkpoint, **BUILD)
    assert again == [] and not checkpoint.exists()
    _assert_same_cache(cache, expected)


@pytest.mark.parametrize("change", ["corpus", "saes", "latents", "model", "no BOS", "normalizer"])
def test_progress_saved_for_other_inputs_is_not_reused(setup, tmp_path, change):
    model, tokenizer, saes, texts, _ = setup
    other = {"model": model, "tokenizer": tokenizer, "texts": texts, "saes": saes, "latents": None, **BUILD}
    if change in ("no BOS", "normalizer"):
        other["tokenizer"] = _retokenized(change)
        assert other["tokenizer"].get_vocab() == tokenizer.get_vocab()
        assert other["tokenizer"](texts).input_ids != tokenizer(texts).input_ids
    elif change == "corpus":
        other["texts"] = texts[:-1] + ["w7 w8 w9"]
    elif change == "saes":
        other["saes"] = {1: make_sae("jumprelu", layer=1, seed=5), 3: saes[3]}
    elif change == "latents":
        other["latents"] = [(1, i) for i in range(256)]
    else:
        other["model"] = copy.deepcopy(model)
        with torch.no_grad():
            find_decoder_layers(other["model"])[1][0].mlp.down_proj.weight.mul_(1.01)
    with _forward_passes(other["model"]) as passes:
        expected = build_activation_cache(**other)
    checkpoint = tmp_path / "progress"
    with _forward_passes(model, stop_after=7), pytest.raises(_Interrupted):
        build_activation_cache(model, tokenizer, texts, saes, checkpoint=checkpoint, checkpoint_every=2, **BUILD)
    with _forward_passes(other["model"]) as again:
        cache = build_activation_cache(checkpoint=checkpoint, checkpoint_every=2, **other)
    assert len(again) == len(passes)  # all made afresh
    _assert_same_cache(cache, expected)


def test_a_checkpoint_folder_must_be_the_builds_own(setup, tmp_path):
    model, tokenizer, saes, texts, _ = setup
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not a cache build's progress \(notes.txt\)"):
        build_activation_cache(model, tokenizer, texts, saes, checkpoint=tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="checkpoint_every must be at least 1 batch, got 0"):
        build_activation_cache(model, tokenizer, texts, saes, checkpoint_every=0, progress=False)
