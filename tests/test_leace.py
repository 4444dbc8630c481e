"""The LEACE eraser as an ablation mode: exact to concept_erasure's eraser, fitted per layer, saved and reloaded
without the fitting data, composed with LoRA and the annealing callback, and its random control."""

from __future__ import annotations

import json

import pytest
import torch
from concept_erasure import LeaceEraser, LeaceFitter
from conftest import HIDDEN, NUM_LAYERS, covariance_with_label, make_tiny_model, make_tiny_tokenizer
from peft import LoraConfig, PeftModel, get_peft_model

from hf_concept_ablation import (
    ConceptAblation,
    ConceptAblationConfig,
    get_concept_ablation,
    inject_concept_ablation,
)
from hf_concept_ablation.adapter.callbacks import AblationSchedule
from hf_concept_ablation.adapter.config import CONFIG_NAME
from hf_concept_ablation.adapter.layer import ConceptAblationLayer
from hf_concept_ablation.search.leace import (
    leace_config,
    one_hot_labels,
    random_eraser_config,
)

INPUT = torch.tensor([[2, 11, 25, 37, 48, 59, 61, 70], [2, 90, 14, 33, 47, 52, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


def _labeled_texts(n: int = 48) -> tuple[list[str], list[str]]:
    """Texts whose label is carried by one word among random ones, so a probe on the residual stream finds it."""
    gen = torch.Generator().manual_seed(0)
    texts, labels = [], []
    for i in range(n):
        label = "female" if i % 2 else "male"
        words = [f"w{int(w)}" for w in torch.randint(20, 120, (6,), generator=gen)]
        words.insert(int(torch.randint(0, 6, (1,), generator=gen)), "w10" if label == "female" else "w11")
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT, attention_mask=MASK).logits


def _fitted(model, layers=None):
    texts, labels = _labeled_texts()
    config = leace_config(model, make_tiny_tokenizer(), texts, labels, fitted_on={"source": "labels",
                          "column": "gender"}, layers=layers, progress=False)
    return config, texts, labels


def test_the_layer_is_exact_to_the_librarys_eraser():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, HIDDEN, generator=gen, dtype=torch.float64)
    z = (x[:, 3] + 0.5 * x[:, 7] + 0.3 * torch.randn(500, generator=gen, dtype=torch.float64) > 0).double()
    for fitter in (LeaceFitter.fit(x, z), LeaceFitter.fit(x, one_hot_labels(z.long().tolist())[0].double())):
        eraser = fitter.eraser
        layer = ConceptAblationLayer.from_eraser(eraser.proj_left, eraser.proj_right, eraser.bias, dtype=torch.float64)
        torch.testing.assert_close(layer(x), eraser(x), rtol=0, atol=1e-10)
        assert layer.num_directions == 1  # the library's zero-padded factors are stored at their rank
        layer.set_alpha(0.0)
        torch.testing.assert_close(layer(x), x)


def test_fitted_erasers_leave_no_linear_trace_of_the_concept_at_any_layer(family):
    """LEACE's guarantee, per layer, on the activations each eraser was fitted on (the base model's): no covariance
    with the label is left; in the model, so at the first erased layer."""
    model = make_tiny_model(family)
    config, texts, labels = _fitted(model)
    assert config.mode == "leace" and config.layers == list(range(NUM_LAYERS))
    assert config.fitted_on["classes"] == ["female", "male"] and config.fitted_on["column"] == "gender"
    assert config.fitted_on["texts"] == len(texts) and config.fitted_on["positions"] == "all"
    handle = inject_concept_ablation(model, config)
    before, _ = covariance_with_label(model, texts, labels, 0)
    assert before > 1e-3  # there is something to erase
    for layer, module in handle.layers.items():
        module = module.double()
        after, scale = covariance_with_label(model, texts, labels, layer, eraser=module)
        assert after < 1e-6 * scale, layer  # (the stored tensors are float32)
    after, scale = covariance_with_label(model, texts, labels, 0, ablated=True)
    assert after < 1e-5 * scale


def test_sequential_erasers_hold_jointly_where_independent_ones_do_not(family):
    """With every eraser on, as in training: erasers fitted layer after layer on the already-erased upstream leave no
    covariance with the label at any layer; erasers fitted independently on the base model leave it from the second
    erased layer on (each was fitted on activations its upstream erasers have changed)."""
    model = make_tiny_model(family)
    texts, labels = _labeled_texts()
    left = {}
    for sequential in (False, True):
        config = leace_config(model, make_tiny_tokenizer(), texts, labels, fitted_on={"source": "labels"},
                              sequential=sequential, progress=False)
        assert config.fitted_on["fit"] == ("sequential" if sequential else "independent")
        handle = inject_concept_ablation(model, config)
        left[sequential] = [covariance_with_label(model, texts, labels, layer, ablated=True)
                            for layer in range(NUM_LAYERS)]
        again = leace_config(model, make_tiny_tokenizer(), texts, labels, fitted_on={}, sequential=sequential,
                             progress=False)  # the injected ablation is off while fitting: the same erasers
        for layer, eraser in config.erasers.items():
            torch.testing.assert_close(again.erasers[layer]["proj_left"] @ again.erasers[layer]["proj_right"],
                                       eraser["proj_left"] @ eraser["proj_right"], rtol=0, atol=0)
        assert handle.enabled
        handle.remove()
    assert all(cov < 1e-5 * scale for cov, scale in left[True])
    assert all(cov > 1e-3 * scale for cov, scale in left[False][1:])


def test_sequential_erasers_of_some_layers_hold_jointly_with_the_layers_between_them_run_as_they_are():
    model = make_tiny_model("gemma3")
    texts, labels = _labeled_texts()
    config = leace_config(model, make_tiny_tokenizer(), texts, labels, layers=[1, 3], fitted_on={"source": "labels"},
                          sequential=True, progress=False)
    assert config.layers == [1, 3]
    handle = inject_concept_ablation(model, config)
    for layer in (1, 3):
        cov, scale = covariance_with_label(model, texts, labels, layer, ablated=True)
        assert cov < 1e-5 * scale, layer
    handle.remove()


def test_saved_erasers_reload_without_the_fitting_data_with_identical_logits(family, tmp_path):
    model = make_tiny_model(family)
    config, _, _ = _fitted(model, layers=[0, 2])
    handle = inject_concept_ablation(model, config)
    ablated = _logits(model)
    handle.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["mode"] == "leace" and saved["erasers"] == [0, 2] and saved["fitted_on"]["source"] == "labels"
    fresh = make_tiny_model(family)
    reloaded = ConceptAblation.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), ablated, rtol=0, atol=0)
    assert reloaded.config.fitted_on == handle.config.fitted_on
    assert ConceptAblationConfig.from_pretrained(tmp_path).erasers.keys() == {0, 2}


@pytest.mark.parametrize("order", ["lora_first", "ablation_first"])
def test_composes_with_a_real_peft_lora_and_anneals(order, tmp_path):
    model = make_tiny_model("gemma3")
    config, _, _ = _fitted(model)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    if order == "lora_first":
        model = get_peft_model(model, lora)
        handle = inject_concept_ablation(model, config)
    else:
        handle = inject_concept_ablation(model, config)
        model = get_peft_model(model, lora)
    assert get_concept_ablation(model) is handle
    assert all("concept_ablation" not in n for n, p in model.named_parameters() if p.requires_grad)
    both = _logits(model)
    schedule = AblationSchedule(kind="linear", start=0.0, end=1.0)
    handle.set_strength(schedule(1.0))
    with handle.disabled():
        lora_only = _logits(model)
    assert not torch.allclose(both, lora_only, atol=1e-4)
    torch.testing.assert_close(_logits(model), lora_only)  # annealed off: the deployed model needs no hooks
    handle.set_strength(1.0)
    model.save_pretrained(tmp_path)
    handle.save_pretrained(tmp_path)
    fresh = PeftModel.from_pretrained(make_tiny_model("gemma3"), tmp_path)
    ConceptAblation.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), both)


def test_the_random_eraser_has_the_rank_and_not_the_direction_of_the_concept_eraser():
    model = make_tiny_model("llama")
    concept, texts, _ = _fitted(model, layers=[1])
    controls = [random_eraser_config(model, make_tiny_tokenizer(), texts, rank=1, seed=s, layers=[1], progress=False)
                for s in (0, 1)]
    layers = [inject_concept_ablation(model, c).layers[1] for c in [concept]]
    get_concept_ablation(model).remove()
    for control in controls:
        handle = inject_concept_ablation(model, control)
        layers.append(handle.layers[1])
        handle.remove()
    assert [m.num_directions for m in layers] == [1, 1, 1]
    directions = [torch.nn.functional.normalize(m.proj_right[0], dim=0) for m in layers]
    assert abs(float(directions[0] @ directions[1])) < 0.9 and abs(float(directions[1] @ directions[2])) < 0.9
    assert controls[0].fitted_on["source"] == "random labels" and controls[0].fitted_on["seed"] == 0


def test_a_layer_where_the_labels_do_not_covary_with_the_activations_is_left_out_and_recorded():
    """Fitted on prompts the tiny tokenizer reads as unknown words, one seed's random labels covary with layer 0's
    activations too weakly for concept_erasure (whitened singular value 0.0017, under its svd_tol 0.01): that layer
    gets no eraser (it would be the identity) and the config says so."""
    from conftest import gender_concept_words

    from hf_concept_ablation.experiments.runner import subsample
    from hf_concept_ablation.tasks import build_double_mc_datasets

    texts = list(subsample(build_double_mc_datasets("sentiment", "verbs", "verbs")["train"], 16)["prompt"])
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer(gender_concept_words())
    config = random_eraser_config(model, tokenizer, texts, rank=1, seed=0, progress=False)
    assert config.layers == [1, 2, 3] and config.fitted_on["nothing_to_erase"] == [0]
    inject_concept_ablation(model, config).remove()  # the kept erasers apply
    with pytest.raises(ValueError, match=r"nothing to erase: the labels do not covary with the activations at any of "
                                         r"layers \[0\]"):
        random_eraser_config(model, tokenizer, texts, rank=1, seed=0, layers=[0], progress=False)


def test_bad_eraser_input_is_named():
    with pytest.raises(ValueError, match=r"at least 2 values.*\['male'\]"):
        one_hot_labels(["male", "male"])
    with pytest.raises(ValueError, match=r"erasers\[3\].*missing \['bias'\]"):
        ConceptAblationConfig(layers=[3], mode="leace", erasers={3: {"proj_left": 1, "proj_right": 1}})
    with pytest.raises(ValueError, match=r"no erasers for layer\(s\) \[4\]"):
        ConceptAblationConfig(layers=[3, 4], mode="leace", erasers={3: LeaceEraser(torch.ones(8, 1), torch.ones(1, 8),
                                                                                  None)})
    with pytest.raises(ValueError, match="erasers apply to mode='leace' only"):
        ConceptAblationConfig(layers=[3], latents={3: [1]}, erasers={3: LeaceEraser(torch.ones(8, 1),
                                                                                    torch.ones(1, 8), None)})
    model = make_tiny_model("llama")
    wrong = ConceptAblationConfig(layers=[1], mode="leace", erasers={1: LeaceEraser(torch.ones(8, 1) / 8,
                                                                                    torch.ones(1, 8), None)})
    with pytest.raises(ValueError, match=f"layer 1: the eraser has d_model=8, the model's hidden size is {HIDDEN}"):
        inject_concept_ablation(model, wrong)
