"""The adapter on tiny Gemma 2, Gemma 3, Llama and GPT-2 models: inject, control, save, reload, compose."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HIDDEN, HubAtTheBoundary, make_sae, make_tiny_model
from peft import LoraConfig, PeftModel, get_peft_model

from hf_concept_ablation import (
    ConceptAblation,
    ConceptAblationConfig,
    get_concept_ablation,
    inject_concept_ablation,
)
from hf_concept_ablation.adapter.config import CONFIG_NAME, WEIGHTS_NAME

LATENTS = [1, 7, 30, 64, 100]
INPUT = torch.tensor([[2, 11, 25, 37, 48, 59, 61, 70], [2, 90, 14, 33, 47, 52, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


def _config(mode: str = "latent", **kwargs) -> ConceptAblationConfig:
    return ConceptAblationConfig(layers=[1, 2], latents={1: LATENTS, 2: LATENTS}, mode=mode, **kwargs)


def _saes():
    return {layer: make_sae("standard", seed=layer) for layer in (1, 2)}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT, attention_mask=MASK).logits


@pytest.mark.parametrize("mode", ["latent", "projection"])
def test_inject_changes_output_and_disable_remove_restore_it(family, mode):
    model = make_tiny_model(family)
    plain = _logits(model)
    ablation = inject_concept_ablation(model, _config(mode), saes=_saes())
    ablated = _logits(model)
    assert not torch.allclose(ablated, plain, atol=1e-4)
    with ablation.disabled():
        torch.testing.assert_close(_logits(model), plain)
    ablation.set_strength(0.0)
    torch.testing.assert_close(_logits(model), plain)
    ablation.set_strength(1.0)
    torch.testing.assert_close(_logits(model), ablated)
    ablation.remove()
    torch.testing.assert_close(_logits(model), plain)
    assert get_concept_ablation(model) is None
    assert not any("concept_ablation" in name for name, _ in model.named_modules())


def test_save_and_reload_gives_identical_logits_without_the_sae(family, tmp_path):
    model = make_tiny_model(family)
    ablation = inject_concept_ablation(model, _config(), saes=_saes())
    ablated = _logits(model)
    ablation.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["latents"] == {"1": LATENTS, "2": LATENTS}

    fresh = make_tiny_model(family)
    reloaded = ConceptAblation.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), ablated, rtol=0, atol=0)
    assert reloaded.config.latents == ablation.config.latents


def test_push_to_hub_uploads_a_loadable_adapter_with_its_model_card(tmp_path, monkeypatch):
    import huggingface_hub

    model = make_tiny_model("gemma3")
    ablation = inject_concept_ablation(model, _config(), saes=_saes())
    ablated = _logits(model)
    hub = HubAtTheBoundary(tmp_path / "hub")
    tokens = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: tokens.append(token) or hub)
    card = "---\nbase_model: google/gemma-3-270m\n---\n# A CAFT adapter\n"
    url = ablation.push_to_hub("me/caft-adapter", private=True, commit_message="first", model_card=card)
    assert url.endswith("/commit/" + "0" * 39 + "1")
    assert hub.repos == [("me/caft-adapter", True, True)]
    assert hub.commits == [("me/caft-adapter", "main", "first", sorted(["README.md", CONFIG_NAME, WEIGHTS_NAME]))]
    assert tokens == [None]  # the environment's token, never one of ours

    hub.read_back(monkeypatch)
    fresh = make_tiny_model("gemma3")
    pulled = ConceptAblation.from_pretrained(fresh, "me/caft-adapter")  # by repo id, through hf_hub_download
    torch.testing.assert_close(_logits(fresh), ablated, rtol=0, atol=0)
    assert pulled.config.latents == ablation.config.latents
    snapshot = next((tmp_path / "hub" / "models--me--caft-adapter" / "snapshots").iterdir())
    assert (snapshot / "README.md").read_text() == card


def test_push_to_a_branch_and_subfolder_loads_back_from_there(tmp_path, monkeypatch):
    import huggingface_hub

    model = make_tiny_model("gemma3")
    ablation = inject_concept_ablation(model, _config(), saes=_saes())
    ablated = _logits(model)
    hub = HubAtTheBoundary(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: hub)
    ablation.push_to_hub("me/caft", revision="v1", subfolder="caft/layer1")
    assert hub.commits[0][:2] == ("me/caft", "v1")
    assert sorted(hub.commits[0][3]) == sorted([f"caft/layer1/{CONFIG_NAME}", f"caft/layer1/{WEIGHTS_NAME}"])

    hub.read_back(monkeypatch)
    fresh = make_tiny_model("gemma3")
    ConceptAblation.from_pretrained(fresh, "me/caft", subfolder="caft/layer1", revision="v1")
    torch.testing.assert_close(_logits(fresh), ablated, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=r"me/caft \(subfolder 'caft'\): no folder .*me/caft, and no adapter"):
        ConceptAblation.from_pretrained(make_tiny_model("gemma3"), "me/caft", subfolder="caft", revision="v1")
    hub.branches.add(("me/caft", "refs/pr/1"))  # an open pull request
    ablation.push_to_hub("me/caft", revision="refs/pr/1")
    assert hub.commits[-1][:2] == ("me/caft", "refs/pr/1")
    local = tmp_path / "local"
    ablation.save_pretrained(local / "concept_ablation")
    ConceptAblation.from_pretrained(make_tiny_model("gemma3"), local, subfolder="concept_ablation")


def test_a_card_is_pushed_with_the_images_it_shows(tmp_path, monkeypatch):
    import huggingface_hub

    ablation = inject_concept_ablation(make_tiny_model("gemma3"), _config(), saes=_saes())
    hub = HubAtTheBoundary(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: hub)
    card = "# CAFT\n![accuracy by condition](gender_bias.png)\n![badge](https://example.org/b.svg)\n"
    with pytest.raises(ValueError, match=r"the model card shows \['gender_bias.png'\], which card_files does not hold"):
        ablation.push_to_hub("me/caft", model_card=card)
    assert hub.repos == hub.commits == []  # refused before anything was uploaded
    figure = tmp_path / "gender_bias.png"
    figure.write_bytes(b"\x89PNG figure")
    ablation.push_to_hub("me/caft", model_card=card, card_files=[figure])
    assert hub.commits[0][3] == sorted(["README.md", "gender_bias.png", CONFIG_NAME, WEIGHTS_NAME])


def test_an_interrupted_save_over_another_adapter_is_refused_not_mixed(tmp_path, monkeypatch):
    inject_concept_ablation(make_tiny_model("llama"), _config(), saes=_saes()).save_pretrained(tmp_path, "old card")
    other = inject_concept_ablation(make_tiny_model("llama"), ConceptAblationConfig(
        layers=[1, 2], latents={1: [2, 8, 31, 65, 101], 2: LATENTS}), saes=_saes())  # as many latents: same shapes

    def crash(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(ConceptAblationConfig, "to_json_file", crash)  # stopped between the two files
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(tmp_path, model_card="new card")
    assert not (tmp_path / "README.md").exists()  # the old card no longer describes what is there
    with pytest.raises(FileNotFoundError, match=f"has no {CONFIG_NAME}: not a saved concept ablation adapter"):
        ConceptAblation.from_pretrained(make_tiny_model("llama"), tmp_path)
    monkeypatch.undo()
    other.save_pretrained(tmp_path, model_card="new card")
    assert ConceptAblation.from_pretrained(make_tiny_model("llama"), tmp_path).config.latents == other.config.latents


def test_base_model_state_dict_is_untouched(family):
    model = make_tiny_model(family)
    keys = set(model.state_dict())
    inject_concept_ablation(model, _config(), saes=_saes())
    assert set(model.state_dict()) == keys


def test_output_hidden_states_record_the_ablated_stream():
    model = make_tiny_model("gemma3")
    ablation = inject_concept_ablation(model, _config(), saes=_saes())
    with torch.no_grad():
        ablated = model(input_ids=INPUT, attention_mask=MASK, output_hidden_states=True).hidden_states
        with ablation.disabled():
            plain = model(input_ids=INPUT, attention_mask=MASK, output_hidden_states=True).hidden_states
    torch.testing.assert_close(ablated[1], plain[1])  # layer 0 output is not ablated
    assert not torch.allclose(ablated[2][:, 1:], plain[2][:, 1:])  # layer 1 output is


def test_bos_and_padding_positions_are_left_alone():
    model = make_tiny_model("llama")
    ablation = inject_concept_ablation(model, _config(), saes=_saes())
    captured = {}
    model.model.layers[1].register_forward_hook(lambda m, a, o: captured.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=INPUT, attention_mask=MASK)
        ablated = captured["x"].clone()
        with ablation.disabled():
            model(input_ids=INPUT, attention_mask=MASK)
    plain = captured["x"]
    torch.testing.assert_close(ablated[:, 0], plain[:, 0])  # BOS
    torch.testing.assert_close(ablated[1, 6:], plain[1, 6:])  # padding
    assert (ablated[:, 1:6] - plain[:, 1:6]).abs().max() > 1e-3


def test_inputs_embeds_without_input_ids_warns_that_bos_and_padding_are_ablated():
    model = make_tiny_model("llama")
    inject_concept_ablation(model, _config(), saes=_saes())
    with torch.no_grad(), pytest.warns(UserWarning, match="without input_ids .* are ablated like every other position"):
        model(inputs_embeds=model.get_input_embeddings()(INPUT), attention_mask=MASK)


def test_a_deep_copy_has_its_own_ablation():
    import copy

    model = make_tiny_model("gemma3")
    original = inject_concept_ablation(model, _config(), saes=_saes())
    ablated = _logits(model)
    with original.disabled():
        plain = _logits(model)
    twin = copy.deepcopy(model)
    copied = get_concept_ablation(twin)
    assert copied is not original and copied.layers[1] is twin.model.layers[1].concept_ablation
    torch.testing.assert_close(_logits(twin), ablated, rtol=0, atol=0)
    copied.disable()
    torch.testing.assert_close(_logits(twin), plain, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model), ablated, rtol=0, atol=0)  # the original's ablation is untouched
    copied.enable()
    original.disable()
    torch.testing.assert_close(_logits(twin), ablated, rtol=0, atol=0)  # ... and the copy's is its own
    copied.remove()
    assert get_concept_ablation(twin) is None and get_concept_ablation(model) is original


def test_injection_leaves_the_callers_config_alone_and_places_modules_with_their_layers():
    model = make_tiny_model("llama")
    model.model.layers[2].to("meta")  # as if device_map had put this layer on another device
    config = _config()
    ablation = inject_concept_ablation(model, config, saes=_saes())
    ablation.set_strength(0.25)
    assert (config.alpha, config.base_model_name_or_path) == (1.0, None)
    assert ablation.config.alpha == 0.25
    devices = {i: {t.device.type for t in m.buffers()} for i, m in ablation.layers.items()}
    assert devices == {1: {"cpu"}, 2: {"meta"}}


def test_generation_with_kv_cache_matches_full_forward():
    model = make_tiny_model("gemma3")
    inject_concept_ablation(model, _config(), saes=_saes())
    prompt = INPUT[:1, :5]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        logits = model(generated[:, :-1]).logits
    assert torch.equal(logits[0, 4:].argmax(-1), generated[0, 5:])


@pytest.mark.parametrize("order", ["lora_first", "ablation_first"])
def test_composes_with_a_real_peft_lora(family, order, tmp_path):
    targets = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = make_tiny_model(family)
    if order == "lora_first":
        model = get_peft_model(model, lora)
        ablation = inject_concept_ablation(model, _config(), saes=_saes())
    else:
        ablation = inject_concept_ablation(model, _config(), saes=_saes())
        model = get_peft_model(model, lora)
    assert isinstance(model, PeftModel)
    assert get_concept_ablation(model) is ablation
    assert model.get_nb_trainable_parameters()[0] > 0
    assert all("concept_ablation" not in n for n, p in model.named_parameters() if p.requires_grad)
    both = _logits(model)
    with ablation.disabled():
        lora_only = _logits(model)
    assert not torch.allclose(both, lora_only, atol=1e-4)

    model.save_pretrained(tmp_path)
    ablation.save_pretrained(tmp_path)
    fresh = PeftModel.from_pretrained(make_tiny_model(family), tmp_path)
    ConceptAblation.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), both)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool):
        model = make_tiny_model("gemma3").train()
        inject_concept_ablation(model, _config(), saes=_saes())
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        loss = model(input_ids=INPUT, attention_mask=MASK, labels=INPUT).loss
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_bf16_model_gets_bf16_buffers_and_runs_backward():
    model = make_tiny_model("gemma2", dtype=torch.bfloat16).train()
    ablation = inject_concept_ablation(model, _config(), saes=_saes())
    assert all(b.dtype == torch.bfloat16 for b in ablation.layers[1].buffers())
    loss = model(input_ids=INPUT, attention_mask=MASK, labels=INPUT).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.embed_tokens.weight.grad is not None


def test_explicit_directions_in_projection_mode(tmp_path):
    model = make_tiny_model("llama")
    directions = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0))
    config = ConceptAblationConfig(layers=[2], mode="projection", directions={2: directions})
    ablation = inject_concept_ablation(model, config)
    ablated = _logits(model)
    ablation.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["directions"] == [2]
    fresh = make_tiny_model("llama")
    ConceptAblation.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), ablated)
    # the saved config alone re-creates the same ablation (directions stored as an orthonormal basis)
    again = make_tiny_model("llama")
    inject_concept_ablation(again, ConceptAblationConfig.from_pretrained(tmp_path))
    torch.testing.assert_close(_logits(again), ablated)


def test_mean_ablation_centers_are_saved_and_reloaded(tmp_path):
    model = make_tiny_model("llama")
    directions = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(0))
    centers = {1: torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1)) * 3}
    config = ConceptAblationConfig(layers=[1, 2], mode="projection", directions={1: directions, 2: directions},
                                   centers=centers)
    ablation = inject_concept_ablation(model, config)
    ablated = _logits(model)
    ablation.remove()
    inject_concept_ablation(model, ConceptAblationConfig(layers=[1, 2], mode="projection",
                                                         directions={1: directions, 2: directions}))
    assert not torch.allclose(_logits(model), ablated)  # the center matters
    ablation.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["centers"] == [1]
    fresh = make_tiny_model("llama")
    reloaded = ConceptAblation.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), ablated)
    torch.testing.assert_close(reloaded.config.centers[1], centers[1])
    again = make_tiny_model("llama")
    inject_concept_ablation(again, ConceptAblationConfig.from_pretrained(tmp_path))
    torch.testing.assert_close(_logits(again), ablated)


def test_centers_need_projection_mode_and_their_layers():
    with pytest.raises(ValueError, match="centers apply to mode='projection' only"):
        ConceptAblationConfig(layers=[1], latents={1: [0]}, centers={1: torch.zeros(HIDDEN)})
    with pytest.raises(ValueError, match=r"centers names layer\(s\) \[3\]"):
        ConceptAblationConfig(layers=[1], mode="projection", directions={1: torch.ones(1, HIDDEN)},
                              centers={3: torch.zeros(HIDDEN)})


def test_second_injection_is_refused():
    model = make_tiny_model("llama")
    inject_concept_ablation(model, _config(), saes=_saes())
    with pytest.raises(ValueError, match="already has a concept ablation"):
        inject_concept_ablation(model, _config(), saes=_saes())
