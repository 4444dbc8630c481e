"""Bad input gets an error that names the bad value."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_sae, make_tiny_model
from safetensors.torch import save_file

from hf_concept_ablation import (
    ConceptAblation,
    ConceptAblationConfig,
    SAESource,
    inject_concept_ablation,
)
from hf_concept_ablation.adapter.callbacks import AblationSchedule
from hf_concept_ablation.adapter.config import CONFIG_NAME, WEIGHTS_NAME
from hf_concept_ablation.adapter.sae_sources import load_sae
from hf_concept_ablation.experiments.training import PRESETS
from hf_concept_ablation.tasks import build_gender_datasets


def _inject(model, layers=(1,), latents=(1, 2), sae=None, **kwargs):
    config = ConceptAblationConfig(layers=list(layers), latents={l: list(latents) for l in layers}, **kwargs)
    return inject_concept_ablation(model, config, saes={l: sae or make_sae("jumprelu") for l in layers})


def test_missing_layer_is_named():
    with pytest.raises(ValueError, match=r"layer 7 does not exist: the model has 4 decoder layers"):
        _inject(make_tiny_model("gemma3"), layers=(7,))


def test_out_of_range_latent_is_named():
    with pytest.raises(ValueError, match=r"latent id\(s\) \[256, 9999\] out of range .* d_sae=256"):
        _inject(make_tiny_model("llama"), latents=(3, 256, 9999))


def test_sae_width_mismatch_is_named():
    with pytest.raises(ValueError, match=r"d_in=32, but the model's hidden size is 64"):
        _inject(make_tiny_model("gemma2"), sae=make_sae("jumprelu", d_in=32))


def test_sae_trained_on_another_layer_is_refused():
    with pytest.raises(ValueError, match=r"trained on layer 3 \(blocks.3.hook_resid_post\), not layer 1"):
        _inject(make_tiny_model("llama"), sae=make_sae("jumprelu", layer=3))


def test_sae_for_another_model_is_refused():
    sae = make_sae("jumprelu")
    sae.cfg.metadata.model_name = "gemma-2-2b"
    with pytest.raises(ValueError, match=r"trained on model 'gemma-2-2b', not 'google/gemma-3-270m'"):
        _inject(make_tiny_model("llama"), sae=sae, base_model_name_or_path="google/gemma-3-270m")
    _inject(make_tiny_model("llama"), sae=sae, base_model_name_or_path="google/gemma-3-270m", check_model_name=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[1], latents={1: [1]}, mode="zero"), r"mode must be one of .* got 'zero'"),
        (dict(layers=[1], latents={1: [1]}, alpha=1.5), r"alpha must be a number in \[0, 1\], got 1.5"),
        (dict(layers=[1], latents={2: [1]}), r"latents names layer\(s\) \[2\] that are not in layers=\[1\]"),
        (dict(layers=[1], latents={1: []}), r"layer 1: latents list is empty"),
        (dict(layers=[1], latents={1: [-4]}), r"layer 1: negative latent id -4"),
        (dict(layers=[1]), r"layer 1: give either latents or directions \(got neither\)"),
        (dict(layers=[]), r"layers is empty"),
        (dict(layers=[1], latents=[3]), r"latents must map each layer to its value, got \[3\]"),
        (dict(layers=[1], latents={1: 3}), r"latents of layer 1 must be a list of latent ids, got 3"),
        (dict(layers=[1], latents={1: [3.7]}), r"latent id of layer 1 must be an integer, got 3.7"),
        (dict(layers="12", latents={12: [3]}), r"layers must be a list of decoder layer indices, got '12'"),
        (dict(layers=[1], latents={1: [3]}, dtype="bfloat"), r"dtype must be the name of a floating-point torch dtype "
                                                             r".* got 'bfloat'"),
        (dict(layers=[1], latents={1: [3]}, dtype="int64"), r"floating-point torch dtype .* got 'int64'"),
        (dict(layers=[1], latents={1: [3]}, dtype="bool"), r"floating-point torch dtype .* got 'bool'"),
        (dict(layers=[1], latents={1: [3]}, alpha="x"), r"alpha must be a number in \[0, 1\], got 'x'"),
        (dict(layers=[1], latents={1: [3]}, skip_token_ids="ab"),
         r"skip_token_ids must be a list of token ids \(or null\), got 'ab'"),
        (dict(layers=[1], latents={1: [3]}, skip_token_ids=[2, 1.5]),
         r"a token id of skip_token_ids must be an integer in \[0, inf\), got 1.5"),
        (dict(layers=[1], latents={1: [3]}, skip_token_ids=[-1]), r"token id of skip_token_ids .* got -1"),
        (dict(layers=[1], latents={1: [3]}, saes={1: "some/path"}),
         r"saes.1 must be a mapping of SAESource fields .* got 'some/path'"),
        (dict(layers=[1], latents={1: [3]}, saes={1: {"pth": "x"}}), r"unknown saes.1 setting\(s\) \['pth'\]"),
    ],
)
def test_invalid_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConceptAblationConfig(**kwargs)


def _saved_adapter(tmp_path):
    _inject(make_tiny_model("llama")).save_pretrained(tmp_path)
    return tmp_path


def test_config_file_that_is_not_json_is_named(tmp_path):
    folder = _saved_adapter(tmp_path)
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME} is not valid JSON"):
        ConceptAblation.from_pretrained(make_tiny_model("llama"), folder)


def test_config_file_with_unknown_fields_is_named(tmp_path):
    folder = _saved_adapter(tmp_path)
    data = json.loads((folder / CONFIG_NAME).read_text())
    data["ablate_harder"] = True
    (folder / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['ablate_harder'\]"):
        ConceptAblation.from_pretrained(make_tiny_model("llama"), folder)


def test_adapter_for_another_hidden_size_is_refused(tmp_path):
    folder = _saved_adapter(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=16))
    with pytest.raises(ValueError, match=r"layer 1: the ablation has d_model=64, the model's hidden size is 32"):
        ConceptAblation.from_pretrained(other, folder)


def test_adapter_folder_missing_weights_is_named(tmp_path):
    folder = _saved_adapter(tmp_path)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=rf"no {WEIGHTS_NAME}"):
        ConceptAblation.from_pretrained(make_tiny_model("llama"), folder)


def test_missing_adapter_folder_is_named_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"adapter folder outputs/no_such_adapter does not exist"):
        ConceptAblation.from_pretrained(make_tiny_model("llama"), "outputs/no_such_adapter")


def test_adapter_not_on_the_hub_is_named(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=rf"me/missing: no folder {tmp_path}/me/missing, and no adapter from the "
                                                r"Hub \(LocalEntryNotFoundError: "):
        ConceptAblation.from_pretrained(make_tiny_model("llama"), "me/missing")


def test_adapter_weights_for_layers_the_config_does_not_name_are_refused(tmp_path):
    _inject(make_tiny_model("llama"), layers=(1, 2)).save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    data["layers"], data["latents"] = [1], {"1": data["latents"]["1"]}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"holds layer\(s\) \[2\] that concept_ablation_config.json does not name"):
        ConceptAblation.from_pretrained(make_tiny_model("llama"), tmp_path)


def test_sae_folder_with_missing_files_is_named(tmp_path):
    make_sae("jumprelu").save_model(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"is missing \['sae_weights.safetensors'\]"):
        load_sae(SAESource(path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_sae(SAESource(path=str(tmp_path / "nowhere")))


def test_raw_params_missing_a_tensor_is_named(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((64, 8), np.float32), W_dec=np.zeros((8, 64), np.float32))
    with pytest.raises(ValueError, match=r"missing parameter\(s\) \['b_enc', 'b_dec', 'threshold'\]"):
        load_sae(SAESource(path=str(tmp_path)))


def test_sae_source_needs_a_release_and_id_or_a_path():
    with pytest.raises(ValueError, match="needs both release and sae_id"):
        SAESource(release="gemma-scope-2b-pt-res-canonical")
    with pytest.raises(ValueError, match="not both"):
        SAESource(release="r", sae_id="i", path="/tmp")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(conditions="caft"), r"conditions must be a list, got 'caft'"),
        (dict(seeds=0), r"seeds must be a list, got 0"),
        (dict(seeds=[]), r"seeds must be a non-empty list of integers, got \[\]"),
        (dict(seeds=["a"]), r"seeds must be a non-empty list of integers, got \['a'\]"),
        (dict(eval_batch_size=0), r"eval_batch_size must be a positive integer, got 0"),
        (dict(train_size=-5), r"train_size must be a positive integer or null, got -5"),
        (dict(dtype="foo"), r"dtype must be the name of a floating-point torch dtype .* got 'foo'"),
        (dict(dtype="nn"), r"floating-point torch dtype .* got 'nn'"),
        (dict(dtype="int64"), r"floating-point torch dtype .* got 'int64'"),
        (dict(seeds=[0, -1]), r"seed must be an integer in \[0, 4294967295\], got -1"),
        (dict(seeds=[2**32]), r"seed must be an integer in \[0, 4294967295\], got 4294967296"),
        (dict(saes={3: {"pth": "x"}}), r"unknown saes.3 setting\(s\) \['pth'\]"),
        (dict(conditions=["leace_sequential"]), r"condition 'leace_sequential' needs eraser.label_column"),
        (dict(conditions=["leace_refit"]), r"condition 'leace_refit' needs eraser.label_column"),
        (dict(conditions=["leace_refit"], eraser={"label_column": "g", "refit_every": 0}),
         r"eraser.refit_every must be a positive whole number of steps, got 0"),
    ],
)
def test_invalid_experiment_settings_are_named_before_any_model_loads(kwargs, message):
    from hf_concept_ablation.experiments.runner import ExperimentConfig

    with pytest.raises(ValueError, match=message):
        ExperimentConfig(conditions=kwargs.pop("conditions", ["none"]), **kwargs)


def test_an_experiment_without_search_conditions_neither_needs_nor_records_the_search_output():
    from hf_concept_ablation.experiments.runner import ExperimentConfig, inputs_record

    unused = ExperimentConfig(conditions=["none", "leace"], adapter="no/such/search", attribution="no/such.json",
                              eraser={"label_column": "stereotyped_gender"})
    assert unused.adapter is None and unused.attribution is None and inputs_record(unused) == {}
    used = ExperimentConfig(conditions=["none", "caft"], adapter="no/such/search")
    assert used.adapter == "no/such/search"


@pytest.mark.parametrize("fill, message", [(0.0, "directions are all zero"), (float("nan"), "directions hold NaN or infinite values")])
def test_directions_that_span_nothing_are_named(fill, message):
    config = ConceptAblationConfig(layers=[1], mode="projection", directions={1: torch.full((2, 64), fill)})
    with pytest.raises(ValueError, match=rf"layer 1: {message}"):
        inject_concept_ablation(make_tiny_model("llama"), config)


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_a_center_that_is_not_finite_is_named(fill):
    center = torch.zeros(64)
    center[5] = fill
    config = ConceptAblationConfig(layers=[1], mode="projection", directions={1: torch.randn(2, 64)}, centers={1: center})
    with pytest.raises(ValueError, match=r"layer 1: center values hold NaN or infinite values"):
        inject_concept_ablation(make_tiny_model("llama"), config)


def test_a_saved_mean_ablation_with_a_bad_or_missing_center_is_refused(tmp_path):
    from safetensors.torch import save_file

    from hf_concept_ablation.adapter.config import read_weights

    model = make_tiny_model("llama")
    config = ConceptAblationConfig(layers=[1], mode="projection", directions={1: torch.randn(2, 64)},
                                   centers={1: torch.randn(64)})
    inject_concept_ablation(model, config).save_pretrained(tmp_path)
    tensors, metadata = read_weights(tmp_path / WEIGHTS_NAME)
    save_file({**tensors, "layers.1.center": torch.full((64,), float("nan"))}, str(tmp_path / WEIGHTS_NAME),
              metadata=metadata)
    with pytest.raises(ValueError, match=r"layer 1 is not a valid ablation \(center values hold NaN"):
        ConceptAblation.from_pretrained(make_tiny_model("llama"), tmp_path)
    save_file({k: v for k, v in tensors.items() if k != "layers.1.center"}, str(tmp_path / WEIGHTS_NAME),
              metadata=metadata)  # mean ablation would silently become zero ablation
    with pytest.raises(ValueError, match=r"lists centers for layer\(s\) \[1\] but .* holds none for them"):
        ConceptAblation.from_pretrained(make_tiny_model("llama"), tmp_path)


def test_numbers_of_numpy_and_torch_are_numbers():
    import numpy as np

    handle = inject_concept_ablation(make_tiny_model("llama"), ConceptAblationConfig(
        layers=[1], mode="projection", directions={1: torch.randn(1, 64)}, skip_token_ids=torch.tensor([0, 2])))
    assert handle.config.skip_token_ids == [0, 2]
    for strength in (np.float32(0.25), torch.tensor(0.5), np.float64(0.75)):
        handle.set_strength(strength)
        assert handle.strength == pytest.approx(float(strength))
    with pytest.raises(ValueError, match="must be a number in"):
        handle.set_strength(np.bool_(True))
    assert ConceptAblationConfig(layers=[1], latents={1: [0]}, skip_token_ids={3, 1}).skip_token_ids == [1, 3]


def _rewrite_weights(folder, tensors=None, metadata=None):
    """Save the adapter's weights file again with some tensors and header entries changed."""
    from safetensors.torch import save_file

    from hf_concept_ablation.adapter.config import read_weights

    old_tensors, old_metadata = read_weights(folder / WEIGHTS_NAME)
    save_file({**old_tensors, **(tensors or {})}, str(folder / WEIGHTS_NAME), metadata={**old_metadata, **(metadata or {})})


def test_weights_saved_again_with_a_format_header_still_load(tmp_path):
    folder = _saved_adapter(tmp_path)
    _rewrite_weights(folder, metadata={"format": "pt"})
    assert ConceptAblation.from_pretrained(make_tiny_model("llama"), folder).config.latents == {1: [1, 2]}


@pytest.mark.parametrize("change, message", [
    (dict(mode="projection"), r"layer 1 holds a 'jumprelu' ablation but concept_ablation_config.json says "
                              r"mode='projection'"),
    (dict(latents={"1": [1, 2, 3]}), r"layer 1 holds 2 directions but concept_ablation_config.json names 3 latents"),
])
def test_config_and_weights_of_different_adapters_are_refused(tmp_path, change, message):
    folder = _saved_adapter(tmp_path)
    data = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**data, **change}))
    with pytest.raises(ValueError, match=message):
        ConceptAblation.from_pretrained(make_tiny_model("llama"), folder)


def test_evaluating_or_caching_nothing_is_named(tmp_path):
    import datasets
    from conftest import make_tiny_tokenizer

    from hf_concept_ablation.saes.activation_store import cache_activations
    from hf_concept_ablation.tasks.evaluation import evaluate_multiple_choice

    empty = datasets.Dataset.from_dict({"prompt": [], "answer": [], "distractor": []})
    with pytest.raises(ValueError, match="eval ood: the dataset is empty"):
        evaluate_multiple_choice(make_tiny_model("llama"), make_tiny_tokenizer(), empty, desc="eval ood")
    with pytest.raises(ValueError, match="no texts to cache activations of"):
        cache_activations(make_tiny_model("llama"), make_tiny_tokenizer(), [], [1], tmp_path / "acts", max_tokens=100)
    assert not (tmp_path / "acts").exists()


def test_weights_of_other_latents_are_refused_where_the_file_records_them(tmp_path):
    _inject(make_tiny_model("llama"), latents=(5, 6), sae=make_sae("topk")).save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**data, "latents": {"1": [0, 1]}}))  # as an interrupted save leaves it
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: layer 1 holds latents \[5, 6\] but {CONFIG_NAME} names "
                                         r"\[0, 1\]: the two files are from different adapters"):
        ConceptAblation.from_pretrained(make_tiny_model("llama"), tmp_path)


def test_a_saved_config_with_a_bad_sae_source_names_the_layer(tmp_path):
    folder = _saved_adapter(tmp_path)
    data = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**data, "saes": {"1": {"pth": "x"}}}))
    with pytest.raises(ValueError, match=r"unknown saes.1 setting\(s\) \['pth'\]"):
        ConceptAblation.from_pretrained(make_tiny_model("llama"), folder)


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / WEIGHTS_NAME).write_bytes(b"garbage"),
     rf"{WEIGHTS_NAME} is not a safetensors file \(.*header too small\)"),
    (lambda folder: _rewrite_weights(folder, metadata={"layers.1": "not json"}),
     rf"{WEIGHTS_NAME}: layer 1 is not a valid ablation \(Expecting value"),
    (lambda folder: _rewrite_weights(folder, metadata={"layers.1": json.dumps({"kind": "jumprelu", "k": None, "x": 1})}),
     rf"{WEIGHTS_NAME}: layer 1 is not a valid ablation \(.*unexpected keyword argument 'x'"),
    (lambda folder: _rewrite_weights(folder, tensors={"layers.1.W_enc": torch.zeros(64, 1)}),
     rf"{WEIGHTS_NAME}: layer 1 is not a valid ablation \(jumprelu ablation tensor b_enc has shape \[2\], "
     r"expected \[n=1\]\)"),
    (lambda folder: _rewrite_weights(folder, tensors={"layers.1.W_dec": torch.zeros(3, 64)}),
     r"tensor W_dec has shape \[3, 64\], expected \[n=2, d_model=64\]"),
], ids=["garbage", "metadata not json", "metadata key", "W_enc of 1 latent", "W_dec of 3 latents"])
def test_malformed_adapter_weights_are_named_with_the_file(tmp_path, damage, message):
    folder = _saved_adapter(tmp_path)
    damage(folder)
    with pytest.raises(ValueError, match=message):
        ConceptAblation.from_pretrained(make_tiny_model("llama"), folder)


def _raw_params(**changes):
    params = {"W_enc": np.zeros((64, 8)), "W_dec": np.zeros((8, 64)), "b_enc": np.zeros(8), "b_dec": np.zeros(64),
              "threshold": np.zeros(8)}
    return {key: np.asarray(value, np.float32) for key, value in {**params, **changes}.items()}


def _sae_lens_folder(folder, file, content):
    make_sae("jumprelu").save_model(folder)
    (folder / file).write_bytes(content)


@pytest.mark.parametrize("write, message", [
    (lambda folder: _sae_lens_folder(folder, "cfg.json", b"{not json"),
     r"SAE folder .* does not load as a sae-lens SAE \('cfg.json', 'sae_weights.safetensors'\) \(JSONDecodeError: "),
    (lambda folder: _sae_lens_folder(folder, "sae_weights.safetensors", b"xx"),
     r"SAE folder .* does not load as a sae-lens SAE .*\(SafetensorError: .*header too small\)"),
    (lambda folder: save_file({k: torch.from_numpy(v) for k, v in _raw_params(W_enc=np.zeros(64)).items()},
                              str(folder / "params.safetensors")),
     r"params.safetensors: W_enc has shape \[64\], expected \[d_in, d_sae\]"),
    (lambda folder: np.savez(folder / "params.npz", **_raw_params(threshold=np.zeros(5))),
     r"params.npz: threshold has shape \[5\], expected \[8\] \(W_enc is \[d_in=64, d_sae=8\]\)"),
    (lambda folder: np.savez(folder / "params.npz", **_raw_params(), junk=np.array([object()], dtype=object)),
     r"params.npz is not a readable parameter file \(ValueError: Object arrays cannot be loaded"),
    (lambda folder: (folder / "params.safetensors").write_bytes(b"xx"),
     r"params.safetensors is not a readable parameter file \(SafetensorError: "),
], ids=["cfg.json", "sae_weights", "1-D W_enc", "threshold", "npz object array", "raw garbage"])
def test_malformed_sae_files_are_named(tmp_path, write, message):
    write(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_sae(SAESource(path=str(tmp_path)))


@pytest.mark.parametrize("call, message", [
    (lambda: AblationSchedule("linear", start="abc"), r"schedule start must be a number in \[0, 1\], got 'abc'"),
    (lambda: AblationSchedule("linear", alpha_end=None), r"schedule alpha_end must be a number in \[0, 1\], got None"),
    (lambda: _inject(make_tiny_model("llama")).set_strength("0.5"),
     r"ablation strength must be a number in \[0, 1\], got '0.5'"),
    (lambda: build_gender_datasets(val_fraction="0.2"), r"val_fraction must be a number in \(0, 1\), got '0.2'"),
    (lambda: PRESETS["paper"].replace(lr_scheduler_type="linar"),
     r"training setting lr_scheduler_type must be one of \['linear', 'cosine', .*\], got 'linar'"),
    (lambda: PRESETS["paper"].replace(lr_scheduler_type=5), r"lr_scheduler_type must be one of .* got 5"),
], ids=["anneal start", "anneal alpha_end", "strength", "val_fraction", "scheduler typo", "scheduler number"])
def test_a_setting_of_the_wrong_kind_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
