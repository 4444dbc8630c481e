"""The whole concept search writes a report, a dashboard and a loadable adapter (tiny model, random SAEs)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from conftest import (
    HIDDEN,
    gender_concept_words,
    make_sae,
    make_tiny_mc_dataset,
    make_tiny_model,
    make_tiny_tokenizer,
)
from test_interpret_cache import _forward_passes
from test_interpret_contrast import PLANTED, _planted_sae, _sets

from hf_concept_ablation import ConceptAblation, cli
from hf_concept_ablation.adapter.model import find_decoder_layers
from hf_concept_ablation.cli.search import search_settings
from hf_concept_ablation.files import files_fingerprint
from hf_concept_ablation.search.activations import iter_residuals
from hf_concept_ablation.search.cache import PROGRESS_NAME
from hf_concept_ablation.search.config import (
    CONCEPT_COMPONENTS,
    PCA_COMPONENTS,
    DirectionSelection,
    LatentSelection,
    SearchConfig,
)
from hf_concept_ablation.search.erasure import concept_decodability
from hf_concept_ablation.search.explain import (
    EmbeddingFilter,
    ExplainerError,
    TransformersChat,
)
from hf_concept_ablation.search.pca import mean_activations
from hf_concept_ablation.search.pipeline import (
    CACHE_PROGRESS_NAME,
    ERASURE_TEXTS,
    SEARCH_ARGS_NAME,
    TaskData,
    find_concept_latents,
    find_pca_directions,
    partial_dir,
    search_finished,
    task_data,
)
from hf_concept_ablation.tasks import answer_value


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()
    texts_a, texts_b = _sets(seed=0)
    task = TaskData("tiny", make_tiny_mc_dataset(12), texts_a, texts_b, "the words w50 and w51", "planted words")
    saes = {1: make_sae("jumprelu", layer=1, seed=2), 2: _planted_sae(model, tokenizer, 2)}
    return model, tokenizer, task, saes


def test_latent_search_selects_the_planted_latent_and_writes_a_loadable_adapter(tiny, tmp_path):
    model, tokenizer, task, saes = tiny
    result = find_concept_latents(model, tokenizer, task, saes, tmp_path, LatentSelection(top=512, max_selected=5),
                                  progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"attribution.csv", "attribution.json", "contrast.json", "activation_cache.safetensors",
            "activation_cache.json", "dashboard.html", "selection.json", "concept_ablation_config.json",
            "concept_ablation.safetensors"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    report = json.loads((tmp_path / "selection.json").read_text())
    chosen = [(s["layer"], s["latent"]) for s in report["selected"]]
    assert (2, PLANTED) in chosen and len(chosen) <= 5
    assert all(abs(s["contrast"]) >= 1.0 and s["by"] == ["contrast"] for s in report["selected"])
    effects = [abs(s["effect"]) for s in report["selected"]]
    assert effects == sorted(effects, reverse=True)
    assert result.config.latents == {layer: sorted(i for l, i in chosen if l == layer) for layer in {l for l, _ in chosen}}
    # the erasure check probes the concept texts at every ablated layer, with the ablation off and on
    assert set(report["erasure"]) == {str(l) for l, _ in chosen}
    for scores in report["erasure"].values():
        assert scores["chance"] == 0.5 and 0.0 <= scores["after"] <= 1.0 and 0.0 <= scores["before"] <= 1.0
    # the dashboard opens with the automatic choice ticked
    page = (tmp_path / "dashboard.html").read_text()
    assert f'data-layer="2" data-latent="{PLANTED}" checked' in page
    # the folder is an adapter: it loads without SAEs and ablates the chosen latents
    handle = ConceptAblation.from_pretrained(model, tmp_path)
    assert sorted(handle.layers) == sorted({l for l, _ in chosen})
    # the erasure check is the probe run on the concept texts with this very adapter in place
    direct = concept_decodability(model, tokenizer, task.concept_a[:ERASURE_TEXTS], task.concept_b[:ERASURE_TEXTS],
                                  sorted(handle.layers))
    assert report["erasure"] == {str(l): {k: round(v, 3) for k, v in sc.items()} for l, sc in direct.items()}
    ids = torch.tensor([[2, 50, 7, 51, 9]])
    with handle.disabled():
        base = model(input_ids=ids, output_hidden_states=True).hidden_states[3]
    ablated = model(input_ids=ids, output_hidden_states=True).hidden_states[3]
    handle.remove()
    assert not torch.allclose(base, ablated)


def test_a_search_run_again_into_its_folder_leaves_nothing_of_the_first(tiny, tmp_path):
    model, tokenizer, task, saes = tiny
    find_concept_latents(model, tokenizer, task, saes, tmp_path, LatentSelection(top=512, max_selected=5),
                         progress=False)
    (tmp_path / SEARCH_ARGS_NAME).write_text("[]")  # as `run_search_once` records the first search's options
    again = find_concept_latents(model, tokenizer, task, saes, tmp_path, LatentSelection(top=512, min_contrast=1e9),
                                 progress=False)
    assert again.config is None and json.loads((tmp_path / "selection.json").read_text())["adapter"] is None
    assert not (tmp_path / "concept_ablation_config.json").exists()  # the first search's adapter is gone
    assert not (tmp_path / "concept_ablation.safetensors").exists() and not (tmp_path / SEARCH_ARGS_NAME).exists()
    with pytest.raises(FileNotFoundError, match="has no concept_ablation_config.json"):
        ConceptAblation.from_pretrained(model, tmp_path)


def test_a_search_that_fails_before_its_results_leaves_the_finished_one_in_its_folder(tiny, tmp_path, monkeypatch):
    model, tokenizer, task, saes = tiny
    find_pca_directions(model, tokenizer, task, [1, 2], tmp_path / "pca", DirectionSelection(n_components=4,
                        indices={1: [0, 1]}), progress=False)
    finished = {p.name: p.read_bytes() for p in (tmp_path / "pca").iterdir()}
    with pytest.raises(ValueError, match=r"layer 1: component index\(es\) \[7\] out of range"):
        find_pca_directions(model, tokenizer, task, [1, 2], tmp_path / "pca", DirectionSelection(n_components=4,
                            indices={1: [7]}), progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "pca").iterdir()} == finished
    find_concept_latents(model, tokenizer, task, saes, tmp_path / "sae", LatentSelection(top=512, max_selected=5),
                         progress=False)
    finished = {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the user stops the search again while it caches contexts

    monkeypatch.setattr("hf_concept_ablation.search.pipeline.build_activation_cache", interrupted)
    with pytest.raises(KeyboardInterrupt):
        find_concept_latents(model, tokenizer, task, saes, tmp_path / "sae", LatentSelection(top=512, max_selected=3),
                             progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()} == finished


def test_search_with_an_explainer_reports_explanations(tiny, tmp_path):
    model, tokenizer, task, saes = tiny
    result = find_concept_latents(
        model, tokenizer, task, saes, tmp_path,
        LatentSelection(top=20, explain_top=2, n_simulate=1, min_similarity=-1.0, select_by="explanation"),
        explainer=TransformersChat(model, tokenizer, max_new_tokens=6), embedding_filter=EmbeddingFilter(), progress=False)
    report = result.report
    assert report["explainer"]["backend"] == "transformers"
    assert len(report["explanations"]) == 2
    assert all(-1 <= e["similarity"] <= 1 for e in report["explanations"])
    assert len(result.selected) == 2
    assert all(s["by"][-1] == "explanation" and s["explanation"] for s in result.selected)
    with pytest.raises(ValueError, match="needs an explainer"):
        find_concept_latents(model, tokenizer, task, saes, tmp_path, LatentSelection(select_by="union"))

    def search(**options):  # again into the same folder: the explanations are reused from explanations.jsonl
        explainer = TransformersChat(model, tokenizer, max_new_tokens=6)
        explainer.chat = None  # asked for nothing: every explanation is in the log already
        selection = LatentSelection(top=20, explain_top=2, n_simulate=1, **options)
        return find_concept_latents(model, tokenizer, task, saes, tmp_path, selection,
                                    explainer=explainer, embedding_filter=EmbeddingFilter(), progress=False)

    similarity = {(e["layer"], e["latent"]): e["similarity"] for e in report["explanations"]}
    high, low = sorted(similarity, key=similarity.get, reverse=True)
    if similarity[high] > similarity[low]:  # a threshold between the two keeps only the more similar one
        between = search(select_by="explanation", min_similarity=(similarity[high] + similarity[low]) / 2)
        assert [(s["layer"], s["latent"]) for s in between.selected] == [high]
    assert search(select_by="explanation", min_similarity=-1.0, min_relevance=11).config is None  # out of 0-10
    contrast_only = search(select_by="contrast", min_contrast=0.0, max_selected=5)
    union = search(select_by="union", min_contrast=0.0, min_similarity=2.0, max_selected=5)  # none by explanation
    def keys(result):
        return [(s["layer"], s["latent"]) for s in result.selected]

    assert keys(union) == keys(contrast_only) and keys(union)
    contrast = {(s["layer"], s["latent"]): abs(s["contrast"])
                for s in search(select_by="contrast", min_contrast=0.0, max_selected=20).selected}
    above = max(contrast[high], contrast[low]) + 1e-6  # a contrast threshold the two explained latents miss
    by_contrast = set(keys(search(select_by="contrast", min_contrast=above, max_selected=20)))
    both = search(select_by="union", min_contrast=above, min_similarity=-1.0, max_selected=20)
    assert {high, low}.isdisjoint(by_contrast) and set(keys(both)) == by_contrast | {high, low}


class _FailingChat(TransformersChat):
    """The local explainer, as an endpoint that answers `answers` chats and then fails (the server went away)."""

    def __init__(self, model, tokenizer, answers: int) -> None:
        super().__init__(model, tokenizer, max_new_tokens=6)
        self.answers, self.asked = answers, 0

    def chat(self, messages, **kwargs):
        self.asked += 1
        if self.asked > self.answers:
            raise ExplainerError(f"the endpoint went away after {self.answers} answers")
        return super().chat(messages, **kwargs)


def test_a_search_interrupted_while_it_explains_leaves_the_finished_one_and_resumes(tiny, tmp_path, monkeypatch):
    model, tokenizer, task, saes = tiny
    out = tmp_path / "search"
    cache_batches = []

    def counted(*args, **kwargs):  # the activation cache's batches (forward passes)
        for batch in iter_residuals(*args, **kwargs):
            cache_batches.append(1)
            yield batch

    monkeypatch.setattr("hf_concept_ablation.search.cache.iter_residuals", counted)

    def search(task, explainer):
        cache_batches.clear()
        selection = LatentSelection(top=20, explain_top=2, n_simulate=1, min_contrast=0.0, max_selected=3)
        return find_concept_latents(model, tokenizer, task, saes, out, selection,
                                    explainer=explainer, embedding_filter=EmbeddingFilter(), progress=False)

    search(task, TransformersChat(model, tokenizer, max_new_tokens=6))
    finished = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"selection.json", "explanations.jsonl", "concept_ablation.safetensors"} <= set(finished)
    assert sorted(p.name for p in out.iterdir()) == sorted(finished)  # (no cache progress)
    other = dataclasses.replace(task, query="another concept")  # a new search: its explanations are made afresh
    broken = _FailingChat(model, tokenizer, answers=3)  # one latent's explanation, simulation and relevance
    with pytest.raises(ExplainerError, match="went away"):
        search(other, broken)
    built = len(cache_batches)
    assert built > 0 and (partial_dir(out) / CACHE_PROGRESS_NAME / PROGRESS_NAME).is_file()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == finished  # the finished search, as it was
    assert search_finished(out)
    ConceptAblation.from_pretrained(model, out).remove()
    cache = (partial_dir(out) / "activation_cache.safetensors").read_bytes()
    # run again, the search makes its cache from the progress without a batch, asks only for the explanation the
    # failure cut off, then takes the folder's place, leaving the progress behind
    again = _FailingChat(model, tokenizer, answers=3)
    result = search(other, again)
    assert cache_batches == [] and (out / "activation_cache.safetensors").read_bytes() == cache
    assert again.asked == 3 and len(result.report["explanations"]) == 2 and not partial_dir(out).exists()
    assert not (out / CACHE_PROGRESS_NAME).exists() and all(p.is_file() for p in out.iterdir())
    log = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    assert log[0]["query"] == "another concept" and len(log) == 3
    assert json.loads((out / "selection.json").read_text())["query"] == "another concept"
    ConceptAblation.from_pretrained(model, out).remove()


def test_a_search_interrupted_while_it_caches_contexts_continues_the_cache(tiny, tmp_path):
    model, tokenizer, task, saes = tiny
    out = tmp_path / "search"
    progress = partial_dir(out) / CACHE_PROGRESS_NAME / PROGRESS_NAME

    def stop_once_progress_is_saved(module, args, output):  # the user stops the search mid-cache (Ctrl-C)
        if progress.is_file() and json.loads(progress.read_text()).get("passes"):
            raise KeyboardInterrupt

    def search(folder):
        return find_concept_latents(model, tokenizer, task, saes, folder, LatentSelection(top=20), progress=False)

    handle = find_decoder_layers(model)[1][0].register_forward_hook(stop_once_progress_is_saved)
    try:
        with pytest.raises(KeyboardInterrupt):
            search(out)
    finally:
        handle.remove()
    assert not out.exists() and json.loads(progress.read_text())["passes"]["scan"]
    with _forward_passes(model) as resumed:
        search(out)
    assert not partial_dir(out).exists()
    with _forward_passes(model) as uninterrupted:
        search(tmp_path / "uninterrupted")
    assert len(resumed) < len(uninterrupted)  # the corpus was not scanned again
    files = [f"activation_cache.{suffix}" for suffix in ("safetensors", "json")]
    assert files_fingerprint([out / f for f in files]) == files_fingerprint([tmp_path / "uninterrupted" / f for f in files])


def test_pca_search_writes_a_projection_adapter(tiny, tmp_path):
    model, tokenizer, task, _ = tiny
    result = find_pca_directions(model, tokenizer, task, [1, 2], tmp_path, DirectionSelection(n_components=4,
                                 min_contrast=0.0, max_selected=2), progress=False)
    assert result.config.mode == "projection"
    assert sum(len(v) for v in result.config.directions.values()) == 2
    assert (tmp_path / "pca.safetensors").is_file() and (tmp_path / "pca.json").is_file()
    assert len(result.selected) == 2 and result.selected[0]["top_examples"]
    handle = ConceptAblation.from_pretrained(model, tmp_path)
    assert handle.config.mode == "projection"
    handle.remove()
    # mean ablation by default: each layer's center is the mean activation over the task prompts
    means = mean_activations(model, tokenizer, list(task.train["prompt"][:256]), [1, 2], progress=False)
    for layer, center in result.config.centers.items():
        torch.testing.assert_close(center, means[layer], rtol=1e-4, atol=1e-4)
    zero = find_pca_directions(model, tokenizer, task, [1, 2], tmp_path / "zero", DirectionSelection(n_components=4,
                               min_contrast=0.0, max_selected=2, ablation="zero"), progress=False)
    assert zero.config.centers == {} and zero.report["settings"]["ablation"] == "zero"


def test_erasure_driven_selection_takes_a_prefix_of_the_ranking_and_records_its_curve(tiny, tmp_path):
    model, tokenizer, task, saes = tiny
    result = find_concept_latents(model, tokenizer, task, saes, tmp_path, LatentSelection(top=512, max_selected=4,
                                  select_by="erasure"), progress=False)
    report = json.loads((tmp_path / "selection.json").read_text())
    curve = report["erasure_curve"]
    ranking = [(r["layer"], r["latent"]) for r in json.loads((tmp_path / "attribution.json").read_text())]
    chosen = [(s["layer"], s["latent"]) for s in report["selected"]]
    assert chosen == ranking[:len(chosen)] and all(s["by"] == ["erasure"] for s in report["selected"])
    assert curve["counts"][0] == 0 and curve["budget"] == 4 and set(curve["accuracy"][0]) == {"1", "2"}
    assert len(chosen) == (curve["erased_at"] or 4) and report["settings"]["select_by"] == "erasure"
    if curve["erased_at"] is None:  # a failure to erase is said as one
        assert "FAILED to erase" in report["note"] and "FAILED to erase" in result.config.description
    assert '<figure class="curve"><svg' in (tmp_path / "dashboard.html").read_text()

    # directions: with every component of the residual stream on offer, erasure is reached, at the fewest that do
    pca = find_pca_directions(model, tokenizer, task, [1], tmp_path / "pca", DirectionSelection(n_components=HIDDEN,
                              max_selected=HIDDEN, select_by="erasure", ablation="zero"), progress=False)
    curve = pca.report["erasure_curve"]
    assert curve["erased_at"] == sum(len(v) for v in pca.config.directions.values()) and pca.report["note"] is None
    assert curve["accuracy"][-1]["1"] <= curve["target"] < curve["accuracy"][0]["1"]
    with pytest.raises(ValueError, match="leave indices"):
        find_pca_directions(model, tokenizer, task, [1], tmp_path / "bad", DirectionSelection(indices={1: [0]},
                            select_by="erasure"))
    with pytest.raises(ValueError, match=r"leave indices \(a search's pca_indices\) unset"):
        SearchConfig(task="gender_bias", out=str(tmp_path), source="pca", select_by="erasure", pca_indices={1: [0]})


@pytest.mark.parametrize("make, message", [
    (lambda: LatentSelection(rule="sum"), r"rule must be one of \['threshold', 'product'\], got 'sum'"),
    (lambda: LatentSelection(n_cache_texts=0), r"n_cache_texts must be a positive integer, got 0"),
    (lambda: LatentSelection(select_by="vibes"), r"select_by must be one of .* got 'vibes'"),
    (lambda: DirectionSelection(basis="texts"), r"basis must be one of \['prompts', 'concept'\], got 'texts'"),
    (lambda: DirectionSelection(select_by="union"), r"select_by must be one of \['contrast', 'erasure'\], got 'union'"),
    (lambda: DirectionSelection(indices={1: [0]}, select_by="erasure"), r"leave indices"),
    (lambda: SearchConfig(task="gender_bias", out="o", reduce="median"), r"reduce must be one of .* got 'median'"),
])
def test_selection_settings_refuse_a_bad_value_naming_it(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_search_config_hands_its_settings_to_the_latent_and_direction_searches():
    config = SearchConfig(task="gender_bias", out="o", top=7, max_selected=3, select_by="erasure", batch_size=4)
    assert config.latent_selection() == LatentSelection(top=7, max_selected=3, select_by="erasure", batch_size=4)
    assert SearchConfig(task="gender_bias", out="o").latent_selection() == LatentSelection()  # one set of defaults
    concept = SearchConfig(task="gender_bias", out="o", source="concept", pca_indices={3: [0]}, ablation="zero")
    assert concept.direction_selection() == DirectionSelection(
        basis="concept", n_components=CONCEPT_COMPONENTS, indices={3: [0]}, ablation="zero", max_selected=20)
    assert SearchConfig(task="gender_bias", out="o", source="pca").direction_selection().n_components == PCA_COMPONENTS


def test_task_contrasts():
    gender = task_data("gender_bias")
    assert gender.query == "gender" and len(gender.concept_a) == len(gender.concept_b) >= 20
    assert {"prompt", "answer", "distractor"} <= set(gender.train.column_names)
    double = task_data("double_mc:verbs|sentiment|sentiment")
    assert "subject-verb" in double.query  # the unintended question type is the concept to remove
    assert "unintended 'verbs'" in double.description and not double.two_sided and gender.two_sided
    assert all("___" not in t for t in double.concept_a + double.concept_b)
    with pytest.raises(ValueError, match="unknown task"):
        task_data("nope")


def test_value_contrast_groups_the_unintended_questions_by_what_their_answer_says():
    sentiment = task_data("double_mc:verbs|sentiment|verbs", contrast="value")
    assert sentiment.two_sided and not sentiment.more_contrasts
    assert "'sentiment' question's answer value, negative vs positive" in sentiment.description
    assert "sentiment" in sentiment.query and min(len(sentiment.concept_a), len(sentiment.concept_b)) >= 100
    verbs = task_data("double_mc:verbs|sentiment|sentiment", contrast="value")
    assert "plural vs singular" in verbs.description
    pronouns = task_data("double_mc:pronouns|verbs|verbs", contrast="value")
    assert "female vs male" in pronouns.description and all("___" not in t for t in pronouns.concept_a)
    sports = task_data("double_mc:sports|verbs|verbs", contrast="value")
    contrasts = [(sports.concept_a, sports.concept_b), *sports.more_contrasts]
    assert len(contrasts) == 7  # one sport against the six others, for each sport
    assert all(sorted(a + b) == sorted(sports.concept_a + sports.concept_b) for a, b in contrasts)
    with pytest.raises(ValueError, match="for double multiple choice"):
        task_data("gender_bias", contrast="value")
    with pytest.raises(ValueError, match="contrast must be one of"):
        task_data("double_mc:verbs|sentiment|verbs", contrast="colour")


@pytest.mark.parametrize(("source", "question", "value"), [
    ("verbs", {"correct": "is", "incorrect": "are"}, "singular"),
    ("verbs", {"correct": "were", "incorrect": "was"}, "plural"),
    ("verbs", {"correct": "looks", "incorrect": "look"}, "singular"),
    ("verbs", {"correct": "need", "incorrect": "needs"}, "plural"),
    ("pronouns", {"correct": "him", "incorrect": "her"}, "male"),
    ("pronouns", {"correct": "She", "incorrect": "he"}, "female"),
    ("sentiment", {"correct": "negative", "incorrect": "positive"}, "negative"),
    ("sports", {"correct": "golf", "incorrect": "boxing"}, "golf"),
])
def test_answer_value(source, question, value):
    assert answer_value(source, question) == value


def test_search_scores_each_latent_by_its_strongest_contrast(tiny, tmp_path):
    model, tokenizer, task, saes = tiny
    half = len(task.concept_b) // 2
    # the first contrast carries no concept (two halves of the same set); the planted one comes second
    split = TaskData("tiny", task.train, task.concept_b[:half], task.concept_b[half:], task.query, "two contrasts",
                     more_contrasts=[(task.concept_a, task.concept_b)])
    plain = find_concept_latents(model, tokenizer, task, saes, tmp_path / "one", LatentSelection(top=512,
                                 max_selected=5), progress=False)
    both = find_concept_latents(model, tokenizer, split, saes, tmp_path / "two", LatentSelection(top=512,
                                max_selected=5), progress=False)
    planted = {(s["layer"], s["latent"]): s["contrast"] for s in plain.selected}[(2, PLANTED)]
    assert {(s["layer"], s["latent"]): s["contrast"] for s in both.selected}[(2, PLANTED)] == planted
    assert plain.report["erasure"] and both.report["erasure"] is None  # 8 texts per set: too few to probe
    with pytest.raises(ValueError, match="SAE latents only"):
        find_pca_directions(model, tokenizer, split, [1], tmp_path / "pca", progress=False)


def test_command_line_on_a_local_model_folder(tmp_path, capsys):
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer(gender_concept_words())
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    search = ["search", "--task", "gender_bias", "--model", str(tmp_path / "model")]
    code = cli.main([*search, "--source", "pca", "--layers", "1", "--pca-components", "3", "--pca-texts", "16",
                     "--pca-indices", "1:0,2", "--out", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr()
    printed = json.loads(out.out)
    assert printed["n_selected"] == 2
    assert "erasure check (probe accuracy on the concept texts, ablation off -> on; chance 0.50): layer 1 " in out.err
    config = json.loads((tmp_path / "out" / "concept_ablation_config.json").read_text())
    assert config["mode"] == "projection" and config["directions"] == [1]
    recorded = json.loads((tmp_path / "out" / SEARCH_ARGS_NAME).read_text())  # the settings, by name
    assert recorded["source"] == "pca" and recorded["pca_indices"] == {"1": [0, 2]} and recorded["pca_texts"] == 16
    assert cli.main([*search, "--layers", "1", "--out", str(tmp_path / "x")]) == 1  # SAE latents of a model without SAEs
    assert capsys.readouterr().err == (f"hf-concept-ablation search: error: no SAE for layer(s) [1] of {tmp_path / 'model'}"
                                       ": give saes (--sae LAYER=PATH) or sae_release (--sae-release)\n")
    assert not (tmp_path / "x").exists()
    assert cli.main([*search, "--source", "concept", "--out", str(tmp_path / "concept")]) == 0
    config = json.loads((tmp_path / "concept" / "concept_ablation_config.json").read_text())
    assert config["mode"] == "projection" and config["directions"] == [0, 1, 2]  # every layer but the last
    selection = json.loads((tmp_path / "concept" / "selection.json").read_text())
    assert selection["source"] == "concept" and len(selection["selected"]) == 3 * 2
    make_tiny_tokenizer().save_pretrained(tmp_path / "model")  # one that reads every gender word as unknown
    capsys.readouterr()
    assert cli.main([*search, "--source", "concept", "--out", str(tmp_path / "blind")]) == 1
    assert "layer 0: the two concept text sets give the same activations" in capsys.readouterr().err
    with pytest.raises(ValueError, match="layer 0: the two concept text sets give the same activations"):
        cli.main([*search, "--source", "concept", "--out", str(tmp_path / "blind"), "--debug"])  # the traceback


@pytest.mark.parametrize(
    "option, message",
    [
        (["--pca-indices", "6:0;9"], r"argument --pca-indices: layer 9 names no component in '6:0;9'"),
        (["--pca-indices", "6:a"], r"argument --pca-indices: takes LAYER:I,J;LAYER:K .* got '6:a'"),
        (["--sae", "x=/saes/l6"], r"argument --sae: takes LAYER=PATH with a layer number, got 'x=/saes/l6'"),
        (["--sae", "6"], r"argument --sae: takes LAYER=PATH with a layer number, got '6'"),
        (["--batch-size", "0"], r"argument --batch-size: expected a positive integer, got '0'"),
        (["--batch-size", "many"], r"argument --batch-size: expected a positive integer, got 'many'"),
        (["--source-file", "capitals.csv"], r"argument --source-file: takes SET=PATH .* got 'capitals.csv'"),
        (["--source", "pcaa"], r"argument --source: invalid choice: 'pcaa'"),
    ],
)
def test_malformed_options_are_named_before_the_model_loads(option, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["search", "--task", "gender_bias", "--model", "/no/such/model", "--out", "/tmp/unused", *option])
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_sae_of_another_model_is_refused_before_the_search_and_accepted_when_asked(tmp_path):
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()
    model.config.name_or_path = "/hub/models--google--gemma-3-270m/snapshots/0123abcd"  # a Hub cache snapshot
    texts_a, texts_b = _sets(seed=0)
    task = TaskData("tiny", make_tiny_mc_dataset(12), texts_a, texts_b, "the words w50 and w51", "planted words")
    sae = _planted_sae(model, tokenizer, 2)
    sae.cfg.metadata.model_name = "google/gemma-3-270m"
    find_concept_latents(model, tokenizer, task, {2: sae}, tmp_path / "same", LatentSelection(top=64, max_selected=2,
                         min_contrast=0.0), progress=False)  # the snapshot folder is that model
    sae.cfg.metadata.model_name = "google/gemma-2-2b"
    with pytest.raises(ValueError, match=r"trained on model 'google/gemma-2-2b'.*--no-check-model-name"):
        find_concept_latents(model, tokenizer, task, {2: sae}, tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()  # refused before any work
    result = find_concept_latents(model, tokenizer, task, {2: sae}, tmp_path / "other", LatentSelection(top=64,
                                  max_selected=2, min_contrast=0.0), progress=False, check_model_name=False)
    assert result.config.check_model_name is False
    ConceptAblation.from_pretrained(model, tmp_path / "other").remove()


def test_the_search_takes_the_users_data_as_the_recipes_do(tmp_path):
    questions = tmp_path / "capitals.csv"
    questions.write_text("\n".join(["question,correct,incorrect"] +
                                   [f"Capital of country {i}?,city{i},town{i}" for i in range(40)]) + "\n")
    task = task_data("double_mc:verbs|capitals|verbs", source_files={"capitals": questions})
    assert all(q.startswith("Capital of country") for q in task.train["question_second"])
    assert task.concept_a and all(text.startswith("Capital of country") for text in task.concept_a)  # unintended
    templates = tmp_path / "mine.csv"
    templates.write_text("template,case\n" + "".join(f"We thanked the {{profession}} and paid {{pronoun}} {i} dollars.,"
                                                       "object\n" for i in range(6)))
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"pilot": {"stereotyped_gender": "male", "professions": ["pilot"]},
                                  "dancer": {"stereotyped_gender": "female", "professions": ["dancer"]}}))
    gender = task_data("gender_bias", templates_file=templates, professions_file=groups)
    assert all("dollars" in prompt for prompt in gender.train["prompt"])
    assert set(gender.train["profession"]) == {"pilot", "dancer"}
    with pytest.raises(ValueError, match=r"unknown source set\(s\) \['capital'\]"):
        task_data("double_mc:verbs|sports|verbs", source_files={"capital": questions})
    with pytest.raises(ValueError, match="templates_file is for the gender task"):
        task_data("double_mc:verbs|sports|verbs", templates_file=templates)
    with pytest.raises(ValueError, match="professions_file is for the gender task"):
        task_data("double_mc:verbs|sports|verbs", professions_file=groups)
    args = cli.build_parser().parse_args(["search", "--task", "t", "--out", "o", "--source-file", f"capitals={questions}",
                                          "--source-file", "sports=s.jsonl", "--templates-file", str(templates),
                                          "--professions-file", str(groups)])
    config = SearchConfig(**search_settings(args))
    assert config.source_files == {"capitals": str(questions), "sports": "s.jsonl"}
    assert config.templates_file == str(templates) and config.professions_file == str(groups)
