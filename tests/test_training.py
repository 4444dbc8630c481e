"""Training with the stock Trainer, the ablation schedule callback, and resume from checkpoint."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    HubAtTheBoundary,
    StopAt,
    make_sae,
    make_tiny_mc_dataset,
    make_tiny_model,
    make_tiny_tokenizer,
)
from transformers import TrainerCallback

from hf_concept_ablation import (
    ConceptAblation,
    ConceptAblationConfig,
    get_concept_ablation,
    inject_concept_ablation,
)
from hf_concept_ablation.adapter.callbacks import (
    ADAPTER_SUBDIR,
    AblationSchedule,
    AblationScheduleCallback,
)
from hf_concept_ablation.experiments.training import (
    PRESETS,
    fine_tune,
    prepare_model_for_training,
    training_arguments,
)
from hf_concept_ablation.tasks.evaluation import evaluate_multiple_choice


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (AblationSchedule("constant"), [1.0, 1.0, 1.0, 1.0, 1.0]),
        (AblationSchedule("linear"), [1.0, 0.75, 0.5, 0.25, 0.0]),
        (AblationSchedule("linear", start=0.5, end=1.0), [1.0, 1.0, 1.0, 0.5, 0.0]),
        (AblationSchedule("cosine"), [1.0, 0.8535534, 0.5, 0.1464466, 0.0]),
        (AblationSchedule("step", start=0.5), [1.0, 1.0, 0.0, 0.0, 0.0]),
        (AblationSchedule("linear", alpha_start=0.0, alpha_end=1.0), [0.0, 0.25, 0.5, 0.75, 1.0]),
    ],
)
def test_schedule_values(schedule, expected):
    assert [schedule(p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)] == pytest.approx(expected)


def test_bad_schedule_is_named():
    with pytest.raises(ValueError, match=r"schedule must be one of .* got 'exponential'"):
        AblationSchedule("exponential")
    with pytest.raises(ValueError, match=r"start=0.8, end=0.2"):
        AblationSchedule("linear", start=0.8, end=0.2)


class _RecordStrength(TrainerCallback):
    def __init__(self):
        self.strengths = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.strengths.append(get_concept_ablation(model).strength)


class _RecordSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _setup():
    model = make_tiny_model("gemma3")
    sae = make_sae("standard", seed=1)
    inject_concept_ablation(model, ConceptAblationConfig(layers=[1], latents={1: [1, 2, 3, 50]}), saes={1: sae})
    return model


def _args(tmp_path, **overrides):
    preset = PRESETS["paper"].replace(learning_rate=1e-3, batch_size=4, epochs=2, warmup_ratio=0.0)
    return training_arguments(preset, str(tmp_path), seed=3, disable_tqdm=True, logging_steps=100, **overrides)


def test_trainer_learns_and_callback_anneals_the_strength(tmp_path):
    tokenizer, data = make_tiny_tokenizer(), make_tiny_mc_dataset(16)
    model = _setup()
    before = evaluate_multiple_choice(model, tokenizer, data)["logit_diff"]
    recorder = _RecordStrength()
    fine_tune(model, tokenizer, data, _args(tmp_path),
              callbacks=[AblationScheduleCallback(AblationSchedule("linear")), recorder])
    after = evaluate_multiple_choice(model, tokenizer, data)
    assert after["logit_diff"] > before + 0.5  # it learned the training answers
    # 16 examples / batch 4 * 2 epochs = 8 steps; strength set at step begin from global_step / 8
    assert recorder.strengths == pytest.approx([1 - s / 8 for s in range(8)])


def test_interrupted_and_resumed_training_matches_uninterrupted(tmp_path):
    tokenizer, data = make_tiny_tokenizer(), make_tiny_mc_dataset(16)
    schedule = AblationSchedule("cosine", start=0.25)

    full = _setup()
    fine_tune(full, tokenizer, data, _args(tmp_path / "full"), callbacks=[AblationScheduleCallback(schedule)])

    part = _setup()
    fine_tune(part, tokenizer, data, _args(tmp_path / "part", save_strategy="steps", save_steps=100),
              callbacks=[AblationScheduleCallback(schedule), StopAt(3)])
    checkpoint = tmp_path / "part" / "checkpoint-3"
    assert (checkpoint / ADAPTER_SUBDIR / "concept_ablation_config.json").is_file()

    resumed = make_tiny_model("gemma3")
    ConceptAblation.from_pretrained(resumed, checkpoint / ADAPTER_SUBDIR)
    steps = _RecordSteps()
    fine_tune(resumed, tokenizer, data, _args(tmp_path / "part"), callbacks=[AblationScheduleCallback(schedule), steps],
              resume_from_checkpoint=str(checkpoint))
    assert steps.steps == [3, 4, 5, 6, 7]  # only the steps after the checkpoint ran
    assert get_concept_ablation(resumed).strength == pytest.approx(get_concept_ablation(full).strength)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_the_trainers_own_hub_push_carries_the_adapter(tmp_path, monkeypatch):
    import transformers.trainer

    hub = HubAtTheBoundary(tmp_path / "hub")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    tokenizer, data = make_tiny_tokenizer(), make_tiny_mc_dataset(16)
    model = _setup()
    schedule = AblationScheduleCallback(AblationSchedule("linear"))
    trainer = fine_tune(model, tokenizer, data, _args(tmp_path / "run", push_to_hub=True, hub_model_id="me/caft-run",
                                                      save_strategy="steps", save_steps=4),
                        callbacks=[schedule])
    pushed_during_training = [files for *_, files in hub.commits]
    assert len(pushed_during_training) == 2  # one push per checkpoint (steps 4 and 8)
    assert all(f"{ADAPTER_SUBDIR}/concept_ablation_config.json" in files for files in pushed_during_training)
    trainer.push_to_hub(commit_message="end of training")
    assert hub.commits[-1][2] == "end of training"
    assert {"model.safetensors", f"{ADAPTER_SUBDIR}/concept_ablation.safetensors"} <= set(hub.commits[-1][3])

    hub.read_back(monkeypatch)
    pulled = make_tiny_model("gemma3")
    pulled.load_state_dict(model.state_dict())
    ConceptAblation.from_pretrained(pulled, "me/caft-run", subfolder=ADAPTER_SUBDIR)
    assert get_concept_ablation(pulled).strength == pytest.approx(get_concept_ablation(model).strength)
    batch = tokenizer(["a b c"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(pulled(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_lora_preset_trains_only_adapters(tmp_path):
    tokenizer, data = make_tiny_tokenizer(), make_tiny_mc_dataset(8)
    model = prepare_model_for_training(_setup(), PRESETS["paper"].replace(lora_rank=4, freeze_embeddings=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fine_tune(model, tokenizer, data, _args(tmp_path))
    assert get_concept_ablation(model) is not None
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in before if "lora_" not in n)  # the base stays frozen
    assert any(not torch.equal(after[n], before[n]) for n in trainable)  # the adapters learned


def test_multi_token_answers_are_refused(tmp_path):
    data = make_tiny_mc_dataset(4).map(lambda r: {"answer": " A B"})
    with pytest.raises(ValueError, match="A B"):
        fine_tune(_setup(), make_tiny_tokenizer(), data, _args(tmp_path))


def test_an_evaluation_that_fails_leaves_the_model_in_training_mode_and_the_ablation_as_it_was():
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer()
    handle = inject_concept_ablation(model, ConceptAblationConfig(layers=[1], latents={1: [3]}),
                                     saes={1: make_sae("standard", seed=1)})
    model.train()

    def fail(*_):
        raise RuntimeError("out of memory in the second batch")

    model.model.layers[0].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate_multiple_choice(model, tokenizer, make_tiny_mc_dataset(8), batch_size=4, ablation=False)
    assert model.training and handle.enabled
