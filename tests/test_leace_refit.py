"""`LeaceRefitCallback`: the erasers fitted again on the model being trained hold on its activations, in a real
`Trainer` run at the steps asked for, and a run resumed from a checkpoint trains as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
import datasets
from conftest import StopAt, covariance_with_label, make_tiny_model, make_tiny_tokenizer
from transformers import TrainerCallback

from hf_concept_ablation import ConceptAblation, get_concept_ablation, inject_concept_ablation
from hf_concept_ablation.adapter.callbacks import ADAPTER_SUBDIR, AblationScheduleCallback
from hf_concept_ablation.experiments.training import PRESETS, fine_tune, training_arguments
from hf_concept_ablation.search.leace import leace_config
from hf_concept_ablation.search.leace_refit import LeaceRefitCallback


def _labeled_rows(n: int = 16) -> list[dict[str, str]]:
    """Training rows whose label is carried by one word among random ones (w10: female, w11: male)."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        label = "female" if i % 2 else "male"
        words = [f"w{int(w)}" for w in torch.randint(20, 120, (5,), generator=gen)]
        words.insert(int(torch.randint(0, 5, (1,), generator=gen)), "w10" if label == "female" else "w11")
        answer, distractor = (" A", " B") if i % 4 < 2 else (" B", " A")
        rows.append({"prompt": " ".join(words), "answer": answer, "distractor": distractor, "gender": label})
    return rows


def _with_erasers(texts, labels):
    model = make_tiny_model("gemma3")
    inject_concept_ablation(model, leace_config(model, make_tiny_tokenizer(), texts, labels, layers=[0, 2],
                                                fitted_on={"source": "labels", "column": "gender"}, progress=False))
    return model


def test_refitted_erasers_hold_on_weights_that_moved_where_the_first_ones_do_not():
    rows = _labeled_rows()
    texts, labels = [r["prompt"] for r in rows], [r["gender"] for r in rows]
    model = _with_erasers(texts, labels)
    with torch.no_grad():  # what training does to the weights the erasers were fitted on
        for parameter in model.model.layers[0].parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    stale, scale = covariance_with_label(model, texts, labels, 0, ablated=True)
    assert stale > 1e-3 * scale
    callback = LeaceRefitCallback(make_tiny_tokenizer(), texts, labels, every_steps=5, sequential=True)
    callback.refit(model, step=5)  # sequential: so that they hold all on together
    for layer in (0, 2):
        cov, scale = covariance_with_label(model, texts, labels, layer, ablated=True)
        assert cov < 1e-5 * scale, layer
    fitted_on = get_concept_ablation(model).config.fitted_on
    assert fitted_on["refit_every"] == 5 and fitted_on["refit_steps"] == [5] and fitted_on["column"] == "gender"


class _RecordErasers(TrainerCallback):
    """The erasers in use at each step's end (after any refit), by step."""

    def __init__(self):
        self.erasers = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.erasers[state.global_step] = {i: (m.proj_left @ m.proj_right).clone()
                                           for i, m in get_concept_ablation(model).layers.items()}


def _train(model, rows, folder, callbacks, resume=None, **options):
    preset = PRESETS["paper"].replace(learning_rate=1e-3, batch_size=4, epochs=2, warmup_ratio=0.0)
    args = training_arguments(preset, str(folder), seed=3, disable_tqdm=True, logging_steps=100, **options)
    refit = LeaceRefitCallback(make_tiny_tokenizer(), [r["prompt"] for r in rows], [r["gender"] for r in rows],
                               every_steps=3)
    fine_tune(model, make_tiny_tokenizer(), datasets.Dataset.from_list(rows), args,
              callbacks=[refit, AblationScheduleCallback(), *callbacks], resume_from_checkpoint=resume)


def test_a_trainer_run_refits_at_the_steps_asked_for_and_resumes_as_an_uninterrupted_one(tmp_path):
    rows = _labeled_rows()
    texts, labels = [r["prompt"] for r in rows], [r["gender"] for r in rows]
    full, record = _with_erasers(texts, labels), _RecordErasers()
    first = {i: (m.proj_left @ m.proj_right).clone() for i, m in get_concept_ablation(full).layers.items()}
    _train(full, rows, tmp_path / "full", [record])
    # 16 rows / batch 4 * 2 epochs = 8 steps: refits after steps 3 and 6, not after the last
    assert get_concept_ablation(full).config.fitted_on["refit_steps"] == [3, 6]
    changed = [step for step in range(1, 9) if any(not torch.equal(record.erasers[step][i], (
        record.erasers[step - 1] if step > 1 else first)[i]) for i in first)]
    assert changed == [3, 6]

    part = _with_erasers(texts, labels)
    _train(part, rows, tmp_path / "part", [StopAt(4)], save_strategy="steps", save_steps=100)
    checkpoint = tmp_path / "part" / "checkpoint-4"
    saved = ConceptAblation.from_pretrained(make_tiny_model("gemma3"), checkpoint / ADAPTER_SUBDIR)
    assert saved.config.fitted_on["refit_steps"] == [3]
    for i, module in saved.layers.items():
        torch.testing.assert_close(module.proj_left @ module.proj_right, record.erasers[4][i])

    resumed = _with_erasers(texts, labels)  # the first erasers, as a recipe injects them before resuming
    _train(resumed, rows, tmp_path / "part", [], resume=str(checkpoint))
    handle = get_concept_ablation(resumed)
    assert handle.config.fitted_on["refit_steps"] == [3, 6]
    for i, module in handle.layers.items():
        torch.testing.assert_close(module.proj_left @ module.proj_right, record.erasers[8][i], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_settings_and_a_model_without_erasers_are_named():
    rows = _labeled_rows(4)
    texts, labels = [r["prompt"] for r in rows], [r["gender"] for r in rows]
    for every in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"every_steps must be a positive whole number of steps, got {every!r}"):
            LeaceRefitCallback(make_tiny_tokenizer(), texts, labels, every_steps=every)
    with pytest.raises(ValueError, match="got 3 labels for 4 texts"):
        LeaceRefitCallback(make_tiny_tokenizer(), texts, labels[:3], every_steps=2)
    with pytest.raises(ValueError, match="positions must be one of"):
        LeaceRefitCallback(make_tiny_tokenizer(), texts, labels, every_steps=2, positions="first")
    with pytest.raises(ValueError, match="needs an injected concept ablation of mode='leace'"):
        LeaceRefitCallback(make_tiny_tokenizer(), texts, labels, every_steps=2).refit(make_tiny_model("gemma3"), 2)
