"""SAE training on a tiny random model: activation store, training, resume, quality measures."""

from __future__ import annotations

import json
import os
import platform
import shutil

import pytest
import torch
from conftest import HIDDEN, make_tiny_model
from sae_lens import TopKSAE, TopKSAEConfig
from safetensors.torch import load_file

from hf_concept_ablation.adapter.config import SAESource
from hf_concept_ablation.adapter.sae_sources import check_sae_fits, load_sae
from hf_concept_ablation.saes import activation_store
from hf_concept_ablation.saes import quality as sae_quality
from hf_concept_ablation.saes import training as st


class CharTokenizer:
    """A minimal tokenizer: one token per character (ids 3..122), BOS 2, padding 0."""

    bos_token_id = 2
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}


TEXTS = [f"text number {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 4) for i in range(60)]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama"), CharTokenizer()


def _cache(tiny, folder, max_tokens=3000, **kwargs):
    model, tok = tiny
    return activation_store.cache_activations(model, tok, TEXTS, [1, 2], folder, max_tokens=max_tokens, context_size=32,
                                shard_tokens=500, group_texts=8, **kwargs)


def test_cached_activations_match_hidden_states_and_skip_bos_and_padding(tiny, tmp_path):
    model, tok = tiny
    cache = _cache(tiny, tmp_path / "acts", max_tokens=10**6)
    acts = activation_store.load_cached_activations(cache, 1)
    assert acts.dtype == torch.float16 and acts.shape[1] == HIDDEN
    chunks = list(activation_store.tokenize_chunks(tok, TEXTS, 32))
    assert all(c[0] == tok.bos_token_id and len(c) <= 32 for c in chunks)
    assert len(acts) == sum(len(c) - 1 for c in chunks)  # every token but BOS, no padding
    # the first chunk of the first group (sorted by length) matches hidden_states[L + 1]
    group = sorted(activation_store.tokenize_chunks(tok, TEXTS[:8], 32), key=len)
    ids = torch.tensor([group[0]])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0, 1:]
    torch.testing.assert_close(acts[: len(hidden)].float(), hidden, atol=1e-2, rtol=1e-2)


def test_activation_cache_respects_budget_and_resumes_after_an_interruption(tiny, tmp_path, monkeypatch):
    real = activation_store.residual_stream
    calls = {"n": 0, "stop_after": None}

    def counted(*args, **kwargs):  # the real pass, counted (and interrupted where asked)
        calls["n"] += 1
        if calls["stop_after"] is not None and calls["n"] > calls["stop_after"]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(activation_store, "residual_stream", counted)
    full = _cache(tiny, tmp_path / "full")
    full_passes = calls["n"]
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["complete"] and manifest["tokens"] == 3000 and len(manifest["shards"]) > 1

    calls.update(n=0, stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        _cache(tiny, tmp_path / "part")
    partial = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert not partial["complete"] and 0 < partial["tokens"] < 3000
    calls.update(n=0, stop_after=None)
    _cache(tiny, tmp_path / "part")
    assert 0 < calls["n"] < full_passes  # it went on from the saved shards instead of starting over
    assert json.loads((tmp_path / "part" / "manifest.json").read_text())["tokens"] == 3000
    torch.testing.assert_close(activation_store.load_cached_activations(tmp_path / "part", 2), activation_store.load_cached_activations(full, 2))
    with pytest.raises(ValueError, match=r"part holds activations made with other settings \(max_tokens: 3000 there, "
                                         r"2000 now\); use another folder"):
        _cache(tiny, tmp_path / "part", max_tokens=2000)


def _train(acts, folder, **overrides):
    settings = dict(d_sae=128, k=8, training_tokens=256 * 12, batch_size=256, n_checkpoints=3, lr=3e-3,
                    lr_warm_up_steps=2, model_name="tiny/llama")
    return st.train_sae(acts, 1, folder, st.SAETrainingConfig(**{**settings, **overrides}))


def test_train_sae_saves_a_loadable_float16_sae_lens_folder(tiny, tmp_path):
    acts = activation_store.load_cached_activations(_cache(tiny, tmp_path / "acts"), 1)
    _train(acts, tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / st.SETTINGS_NAME).read_text())["d_sae"] == 128  # what it was trained with
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["dtype"] == "float16" and cfg["architecture"] == "topk" and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["metadata"]["model_name"] == "tiny/llama"
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert all(w.dtype == torch.float16 for w in weights.values())
    sae = load_sae(SAESource(path=str(tmp_path / "sae")))
    check_sae_fits(sae, layer=1, num_layers=4, hidden_size=HIDDEN, model_name="tiny/llama")
    with pytest.raises(ValueError, match="layer 1"):
        check_sae_fits(sae, layer=2, num_layers=4, hidden_size=HIDDEN)
    # the input scale used in training is folded in: the SAE reconstructs raw activations
    x = acts[:1000].float()
    ev = sae_quality.explained_variance(x, sae.decode(sae.encode(x)).detach())
    print("EV", ev)
    assert ev > 0.1


def test_train_sae_resumes_from_the_last_checkpoint(tiny, tmp_path, capsys):
    acts = activation_store.load_cached_activations(_cache(tiny, tmp_path / "acts"), 1)
    whole = _train(acts, tmp_path / "whole")
    # an "interrupted" run: keep only the first checkpoint, no final SAE
    _train(acts, tmp_path / "resumed")
    ckpts = sorted((tmp_path / "resumed" / "checkpoints").iterdir(), key=lambda p: int(p.name))
    assert len(ckpts) == 3
    for p in ckpts[1:]:
        shutil.rmtree(p)
    for name in ("cfg.json", "sae_weights.safetensors"):
        (tmp_path / "resumed" / name).unlink()
    with pytest.raises(ValueError, match=r"resumed holds SAE training made with other settings \(k: 8 there, 4 now\)"):
        _train(acts, tmp_path / "resumed", k=4)  # would have mixed two runs' settings
    capsys.readouterr()
    resumed = _train(acts, tmp_path / "resumed")
    assert f"layer 1: resuming from {ckpts[0]}" in capsys.readouterr().err  # not trained again from the start
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, atol=1e-4, rtol=1e-3)


def _identity_topk_sae(d: int) -> TopKSAE:
    """A TopK SAE that reconstructs its input exactly: latents are the positive and negative parts."""
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_explained_variance_known_cases():
    x = torch.randn(100, 8)
    assert sae_quality.explained_variance(x, x) == pytest.approx(1.0)
    assert sae_quality.explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-9)
    assert sae_quality.explained_variance(x, x.mean(0) + 0.5 * (x - x.mean(0))) == pytest.approx(0.75)


def test_evaluate_sae_perfect_and_zero_reconstructions(tiny):
    model, tok = tiny
    perfect = sae_quality.evaluate_sae(model, tok, _identity_topk_sae(HIDDEN), 1, TEXTS[:8], context_size=32)
    assert perfect.explained_variance == pytest.approx(1.0, abs=1e-5)
    assert perfect.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert perfect.ce_zero != pytest.approx(perfect.ce_clean)
    assert 0 < perfect.l0 <= HIDDEN and perfect.n_tokens > 0
    # an SAE whose reconstruction is always zero recovers nothing
    zero = _identity_topk_sae(HIDDEN)
    with torch.no_grad():
        zero.W_dec.zero_()
    nothing = sae_quality.evaluate_sae(model, tok, zero, 1, TEXTS[:8], context_size=32)
    assert nothing.ce_loss_recovered == pytest.approx(0.0, abs=1e-5)
    assert nothing.explained_variance < 0
    with pytest.raises(ValueError, match="ce_max_tokens must be at least 1"):
        sae_quality.evaluate_sae(model, tok, zero, 1, TEXTS[:8], context_size=32, ce_max_tokens=0)


def test_command_line_help(capsys):
    from hf_concept_ablation import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train-sae", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--layers" in out and "--architecture" in out and "--activations" in out and "--jobs" in out
    assert "--d-sae N " in out and "number of latents (2048)" in out and "--model-name" not in out


def test_train_saes_trains_every_layer_in_worker_processes_on_the_train_split_only(tmp_path):
    import random

    from conftest import make_tiny_tokenizer

    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    make_tiny_tokenizer().save_pretrained(tmp_path / "model")
    rng = random.Random(0)
    train = [" ".join(f"w{rng.randrange(6, 70)}" for _ in range(rng.randrange(5, 20))) for _ in range(80)]
    heldout = [" ".join(f"w{rng.randrange(70, 128)}" for _ in range(12)) for _ in range(10)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "source": "test", "split": s}) + "\n"
                              for texts, s in ((train, "train"), (heldout, "heldout")) for t in texts))
    cfg = st.SAETrainingConfig(d_sae=64, k=4, training_tokens=256 * 4, batch_size=256, n_checkpoints=1,
                               lr_warm_up_steps=1, model_name="tiny/llama")
    quality = st.train_saes(str(tmp_path / "model"), [1, 2], tmp_path / "out", cfg, corpus=corpus,
                            max_corpus_tokens=10_000, context_size=32, eval_tokens=100, threads=2, jobs=2)
    manifest = json.loads((tmp_path / "out" / "activations" / "manifest.json").read_text())
    assert manifest["tokens"] == sum(len(t.split()) for t in train)  # every train token, no held-out one
    report = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert set(report["quality"]) == {"1", "2"} and all(quality[layer].n_tokens > 0 for layer in (1, 2))
    for layer in (1, 2):
        sae = load_sae(SAESource(path=str(tmp_path / "out" / f"layer_{layer}")))
        check_sae_fits(sae, layer=layer, num_layers=4, hidden_size=HIDDEN, model_name="tiny/llama")


def test_the_device_defaults_to_the_gpu_when_one_is_visible(monkeypatch):
    from hf_concept_ablation.loading import resolve_device
    from hf_concept_ablation.search.config import SearchConfig

    assert SearchConfig(task="gender_bias", out="x").device == "auto"
    assert st.SAETrainingConfig().device == resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert st.SAETrainingConfig().device == resolve_device(None) == "cuda"
    assert st.SAETrainingConfig(device="cpu").device == resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("settings, message", [
    ({"d_sae": 16, "k": 64}, r"setting k must be an integer in \[1, 16\], got 64"),
    ({"architecture": "jumprelu", "d_sae": 16, "lr": -1}, r"setting lr must be"),  # (k applies to topk only)
    ({"batch_size": 512, "training_tokens": 256}, r"setting training_tokens must be an integer in \[512, inf\), got 256"),
    ({"save_dtype": "float61"}, r"save_dtype must be one of \('float16', 'bfloat16', 'float32'\), got 'float61'"),
    ({"architecture": "relu"}, r"architecture must be one of \('topk', 'jumprelu'\), got 'relu'"),
    ({"lr": 0}, r"setting lr must be a number in \(0, inf\), got 0"),
    ({"lr_decay_fraction": "0.2"}, r"lr_decay_fraction must be a number in \[0, 1\], got '0.2'"),
])
def test_bad_sae_training_settings_are_named_before_any_work(settings, message):
    """Refused when the settings are made, so no folder records them and locks out the corrected run."""
    with pytest.raises(ValueError, match=message):
        st.SAETrainingConfig(**settings)


def test_results_name_the_gpu_or_the_cpu_they_ran_on(monkeypatch):
    from hf_concept_ablation.loading import device_name

    assert device_name("cpu") == f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    assert device_name(torch.device("meta")) == "meta"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU {torch.device(device).index}")
    assert device_name("cuda:1") == "GPU 1" and device_name(None).startswith("GPU")
