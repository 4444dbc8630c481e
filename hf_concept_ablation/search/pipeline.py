"""The whole concept search for a task, in one call or one command: attribution + selection -> a saved adapter.

``hf-concept-ablation search --task gender_bias --out runs/gender_latents``, or in Python
``run_search(SearchConfig(task="gender_bias", out="runs/gender_latents"))`` (`hf_concept_ablation.search.config`).

SAE latents (``source="sae"``, the default):

1. **attribution** of every latent of the chosen layers' SAEs on ``D_amb`` (the task's
   ``train`` split), top 100 by |effect| (`hf_concept_ablation.search.attribution`);
2. **contrast** score (Cohen's d) of those latents between the task's two concept text
   sets (`task_data` says which; `hf_concept_ablation.search.contrast`);
3. **activation cache** of those latents over the concept texts and task prompts, and,
   when an LLM is configured, **explanations** with simulation and relevance scores and
   an **embedding filter** against the task's query (e.g. "gender");
4. **selection** (``select_by``): ``"contrast"`` keeps the attribution top-N latents whose
   ``|d| >= min_contrast`` (rule ``"threshold"``, or ``"product"``, see
   `combine_with_attribution`); ``"explanation"`` keeps those whose explanation's
   embedding similarity to the query is ``>= min_similarity`` (and LLM relevance
   ``>= min_relevance`` when scored); ``"union"`` keeps both. At most ``max_selected``,
   ordered by |attribution|. ``"erasure"`` (the label-free route, `select_until_erased`) takes the
   attribution ranking's first latents, more and more of them, until a probe of the concept texts
   is at chance + 0.05 at every searched layer, at most ``max_selected`` (a failure to erase, said
   as one); ``selection.json``'s ``erasure_curve`` holds the probe accuracy per count and layer, and
   the dashboard draws it;
5. **outputs** in ``out``: ``attribution.csv``/``.json``, ``contrast.json``,
   ``activation_cache.safetensors``/``.json``, ``explanations.jsonl`` (with an explainer: each
   explanation as soon as it is made, so a search run again after an endpoint failure asks only
   for the missing ones), ``dashboard.html`` (the automatic choice
   pre-ticked), ``selection.json`` (the report: latents chosen, with scores and
   explanations, and every setting), and the chosen latents as a saved adapter
   (``concept_ablation_config.json`` + ``concept_ablation.safetensors``), so ``out`` loads
   with ``ConceptAblation.from_pretrained(model, out)``. A search writes them first to
   ``.<name>.partial`` beside ``out`` (`partial_dir`) and moves them into ``out`` only when it is
   finished, so a search interrupted at any step leaves the one finished in ``out`` as it was;
   run again, it resumes what it had left there (the activation cache's progress, the explanations);
6. **erasure check** of the saved adapter (`hf_concept_ablation.search.erasure`): how well a
   linear probe still tells the two concept text sets apart at each ablated layer with the
   ablation on, against the same probe with it off (``selection.json``'s ``erasure``; also
   printed). A concept that stays decodable is still there for fine-tuning to use.

PCA directions (``source="pca"``): principal components of the layers' activations on
``D_amb`` prompts, ranked by the same contrast score, the chosen ones written as a
projection-mode adapter, with ``pca.safetensors``/``.json`` (components, top and bottom
examples) and ``selection.json``; ``select_by="erasure"`` takes components in |contrast| order
until the probe is at chance, as for latents.

Concept directions (``source="concept"``): per layer (default: every layer but the last),
the top components of the differences between the task's two concept text sets
(`hf_concept_ablation.search.pca.concept_directions`; for the paired gender sentences, the
"female minus male" direction and the next ones), all written as a projection adapter.

Task contrasts: for ``gender_bias`` the paired female/male sentences of
`build_gender_concept_texts` (query "gender"). For double multiple choice
(``double_mc:<first>|<second>|<intended>``) the concept to remove is the *unintended*
question type, so set ``a`` is the unintended source set's questions (blanks filled with
the correct answer) and set ``b`` the intended source set's, and the contrast is
one-sided (``TaskData.two_sided=False``): a latent is chosen only if it fires more on the
unintended task (``d >= min_contrast``), so latents needed by both tasks, or preferring
the intended one, are never removed. That is ``contrast="topic"``. With ``contrast="value"``
the concept is what the unintended question's *answer* says (`answer_value`: positive or
negative sentiment, the pronoun's gender, the verb's number, the sport): the unintended
source set's questions are grouped by that value and the contrast is two-sided, between the
two groups, or for more groups (sports) each group against the rest, a latent scoring its
largest ``|d|`` over those contrasts (`more_contrasts`; SAE source only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
from sae_lens import SAE

from ..adapter.config import (
    CONFIG_NAME,
    SELECTION_NAME,
    WEIGHTS_NAME,
    ConceptAblationConfig,
    SAESource,
)
from ..adapter.model import find_decoder_layers, inject_concept_ablation
from ..adapter.sae_sources import (
    SHIPPED_LAYERS,
    check_saes_fit_model,
    shipped_sae_source,
)
from ..files import atomic_dir, files_fingerprint, read_json, write_json_atomic
from ..resumable import check_settings
from .attribution import attribute_latents, save_attribution
from .cache import build_activation_cache
from .config import (
    CONTRASTS,
    DirectionSelection,
    LatentSelection,
    SearchConfig,
)
from .contrast import (
    combine_with_attribution,
    save_contrast,
    strongest_contrast_latents,
)
from .dashboard import config_from_selection, render_dashboard
from .erasure import ErasureCurve, concept_decodability, describe_decodability, select_until_erased
from .explain import (
    ChatClient,
    EmbeddingFilter,
    ExplanationLog,
    LatentExplanation,
    explain_latents,
)
from .pca import (
    concept_directions,
    contrast_pca,
    directions_config,
    mean_activations,
    pca_directions,
    save_pca,
    select_directions,
)

Item = TypeVar("Item")
ERASURE_TEXTS = 128  #: concept texts per set in the erasure check of a saved adapter
MIN_ERASURE_TEXTS = 10  #: ... and the fewest per set it needs (5-fold cross-validation)
SEARCH_ARGS_NAME = "search_args.json"  #: the settings of the search in a folder (`SearchConfig.record`)
EXPLANATIONS_NAME = "explanations.jsonl"  #: explanations as they are made; a search run again reuses them
#: the activation cache's progress, kept until the search is finished (a search that fails after the cache is built
#: makes it again from there, without a forward pass) and never moved into its folder
CACHE_PROGRESS_NAME = "activation_cache.progress"
#: what a search takes out of its folder before it moves its own files in (it may not write them all again)
_TAKEN_OUT = (SELECTION_NAME, SEARCH_ARGS_NAME, CONFIG_NAME, WEIGHTS_NAME)
#: What each double multiple-choice source set is about (the embedding/relevance query).
SOURCE_QUERIES: dict[str, str] = {
    "verbs": "subject-verb agreement, singular or plural verbs",
    "pronouns": "pronouns and grammatical gender",
    "sentiment": "positive or negative sentiment",
    "sports": "sports and athletes",
}


@dataclass
class TaskData:
    """What the search needs from a task: D_amb, the two concept text sets, a query, a text corpus."""

    name: str
    train: Any  # datasets.Dataset with prompt/answer/distractor
    concept_a: list[str]
    concept_b: list[str]
    query: str
    description: str = ""
    two_sided: bool = True  #: both signs of the contrast carry the concept (False: only latents preferring a)
    paired: bool = False  #: concept_a[i] mirrors concept_b[i] (paired effect size)
    #: further (a, b) text sets; a latent's contrast is its largest |d| over all of them
    more_contrasts: list[tuple[list[str], list[str]]] = field(default_factory=list)


def task_data(task: str, seed: int = 0, answer_form: str = "letters", contrast: str = "topic",
              templates_file: str | os.PathLike | None = None,
              source_files: Mapping[str, str | os.PathLike] | None = None,
              professions_file: str | os.PathLike | None = None) -> TaskData:
    """`TaskData` for ``"gender_bias"`` or ``"double_mc:<first>|<second>|<intended>"`` (see the module doc).

    `answer_form` is that of the training prompts (``"words"`` exists for gender only);
    `contrast` (double multiple choice) is ``"topic"`` or ``"value"``. The user's data, as the recipes take it:
    `templates_file` and `professions_file` (gender: sentence templates and profession groups, for the training
    prompts; the contrast texts stay the project's female/male sentences) and `source_files` (double multiple
    choice: source set name -> question file, for the training prompts and the contrast texts alike).
    """
    from ..tasks import (
        build_double_mc_datasets,
        build_gender_concept_texts,
        build_gender_datasets,
        load_source_set,
        question_text,
        value_concept_texts,
    )

    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    if contrast != "topic" and not task.startswith("double_mc:"):
        raise ValueError(f"contrast={contrast!r} is for double multiple choice tasks, not {task!r}")
    for name, given in (("templates_file", templates_file), ("professions_file", professions_file)):
        if given is not None and task not in ("gender_bias", "gender"):
            raise ValueError(f"{name} is for the gender task, not {task!r}")
    if source_files and not task.startswith("double_mc:"):
        raise ValueError(f"source_files are for double multiple choice tasks, not {task!r}")

    if task in ("gender_bias", "gender"):
        concept = build_gender_concept_texts()
        train = build_gender_datasets(seed=seed, answer_form=answer_form, templates_file=templates_file,
                                      professions_file=professions_file)["train"]
        return TaskData("gender_bias", train, list(concept.female), list(concept.male), "gender",
                        "contrast: paired female-themed vs male-themed sentences (build_gender_concept_texts)",
                        paired=True)
    if task.startswith("double_mc:"):
        from ..tasks import parse_combination_key

        first, second, intended = parse_combination_key(task.split(":", 1)[1])
        unintended = second if intended == first else first
        data = build_double_mc_datasets(first, second, intended, seed=seed, answer_form=answer_form,
                                        source_files=source_files)
        if contrast == "value":
            return _value_task_data(task, data["train"], unintended, value_concept_texts(unintended, source_files))
        a = [question_text(q) for q in load_source_set(unintended, source_files)]
        b = [question_text(q) for q in load_source_set(intended, source_files)]
        return TaskData(task, data["train"], a, b, SOURCE_QUERIES.get(unintended, unintended),
                        f"contrast: unintended '{unintended}' questions vs intended '{intended}' questions",
                        two_sided=False)
    raise ValueError(f"unknown task {task!r}: use 'gender_bias' or 'double_mc:<first>|<second>|<intended>'")


def _value_task_data(name: str, train: Any, source: str, groups: Mapping[str, list[str]]) -> TaskData:
    """The ``contrast="value"`` `TaskData`: `source`'s question texts grouped by answer value (`value_concept_texts`)."""
    values = list(groups)
    if len(values) == 2:
        contrasts = [(groups[values[0]], groups[values[1]])]
    else:
        contrasts = [(groups[v], [t for w in values if w != v for t in groups[w]]) for v in values]
    how = " vs ".join(values) if len(values) == 2 else f"each of {', '.join(values)} vs the rest"
    return TaskData(name, train, *contrasts[0], SOURCE_QUERIES.get(source, source),
                    f"contrast: the unintended '{source}' question's answer value, {how}",
                    more_contrasts=contrasts[1:])


def default_sae_sources(layers: Sequence[int]) -> dict[int, SAESource]:
    """The shipped SAEs of the embedded Gemma 3 270M for `layers`."""
    return {int(layer): shipped_sae_source(int(layer)) for layer in layers}


@dataclass
class SearchResult:
    """What a search chose and wrote."""

    out_dir: Path
    config: ConceptAblationConfig | None
    selected: list[dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)


def search_finished(out: str | os.PathLike) -> bool:
    """Whether a search in `out` ran to the end: ``selection.json`` is written last, after the adapter
    and its erasure check (an adapter alone may be left by an interrupted search)."""
    return (Path(out) / SELECTION_NAME).is_file()


def partial_dir(out_dir: str | os.PathLike) -> Path:
    """The folder a search into `out_dir` writes to until it is finished: ``.<name>.partial`` beside `out_dir`."""
    out = Path(out_dir).resolve()
    return out.with_name(f".{out.name}.partial")


def _start_search(out_dir: str | os.PathLike) -> Path:
    """The `partial_dir` of `out_dir`, which `_finish_search` moves into `out_dir`. It keeps what a search into
    `out_dir` interrupted before left there (its activation cache progress and explanation log are resumed), but for
    what this one may not write again (an adapter, when this one selects nothing; a finished mark and recorded
    options); a new one starts with the explanation log of the search finished in `out_dir`."""
    work = partial_dir(out_dir)
    if not work.is_dir():
        with atomic_dir(work) as tmp:
            finished_log = Path(out_dir) / EXPLANATIONS_NAME
            if finished_log.is_file():
                shutil.copyfile(finished_log, tmp / EXPLANATIONS_NAME)
    for name in _TAKEN_OUT:
        (work / name).unlink(missing_ok=True)
    return work


def _finish_search(work: Path, out_dir: str | os.PathLike) -> None:
    """Move the finished search in `work` into `out_dir`: delete the activation cache's progress, take out what the
    search there wrote that this one may not have written again, then move each file in, ``selection.json`` (the
    finished mark) first out and last in, so `out_dir` never holds a finished search made of two."""
    if (work / CACHE_PROGRESS_NAME).is_dir():
        shutil.rmtree(work / CACHE_PROGRESS_NAME)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _TAKEN_OUT:
        (out / name).unlink(missing_ok=True)
    for path in sorted(work.iterdir(), key=lambda p: p.name == SELECTION_NAME):
        os.replace(path, out / path.name)
    work.rmdir()


def recorded_search(out_dir: str | os.PathLike) -> SearchConfig | None:
    """The settings of the search recorded in `out_dir` (``search_args.json``), None where there is no record."""
    record = Path(out_dir) / SEARCH_ARGS_NAME
    if not record.is_file():
        return None
    try:
        return SearchConfig.from_record(read_json(record))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{record} is not a record of search settings ({err}); delete the folder to search again") \
            from None


def run_search_once(config: SearchConfig) -> bool:
    """Run the search `config` asks for (`run_search`), or reuse the finished one in its folder; whether it made an
    adapter. The folder records the settings (``search_args.json``, credentials left out); a folder holding a search
    made with other settings is refused, naming them."""
    out = Path(config.out)
    now, earlier = config.compared(), recorded_search(out)  # (refuses a key given as the key's variable name)
    if earlier is not None:
        check_settings(earlier.compared(), now, where=out, what="a search",
                       advice="use another output folder or delete this one")
    if not search_finished(out):
        print_search_result(run_search(config))
    elif not (out / CONFIG_NAME).is_file() and read_json(out / SELECTION_NAME).get("adapter"):
        raise FileNotFoundError(f"{out}: {SELECTION_NAME} names an adapter but its {CONFIG_NAME} is missing; restore "
                                "it (e.g. with git) or delete the folder to search again")
    elif (out / CONFIG_NAME).is_file() and not (out / WEIGHTS_NAME).is_file():
        restore_adapter_weights(out, config.model, device=config.device)
    if not (out / SEARCH_ARGS_NAME).is_file():  # a search finished by `find_concept_latents` itself records none
        write_json_atomic(out / SEARCH_ARGS_NAME, config.record(), default=str)
    return (out / CONFIG_NAME).is_file()


def restore_adapter_weights(out_dir: str | os.PathLike, model_spec: str, device: str = "auto") -> None:
    """Write the weights of the finished search's adapter in `out_dir` again from its config, which names the SAEs
    and latents (a clone of a study whose large weight files are not committed). An adapter with explicit directions
    (PCA) is refused: they are stored only in the weights file."""
    from ..loading import load_model, resolve_device

    out = Path(out_dir)
    data = ConceptAblationConfig.read_json(out / CONFIG_NAME)
    if data.get("directions") or data.get("centers"):
        raise FileNotFoundError(f"{out} has {CONFIG_NAME} but no {WEIGHTS_NAME}, and the directions of layer(s) "
                                f"{data.get('directions')} are stored only there: delete the folder to search again")
    model, _ = load_model(model_spec, device=resolve_device(device))
    print(f"{out}: writing {WEIGHTS_NAME} again from {CONFIG_NAME} (the SAEs it names)", flush=True)
    inject_concept_ablation(model, ConceptAblationConfig.from_dict(data)).save_weights(out)  # the config stays


def _save_adapter(model, tokenizer: Any, config: ConceptAblationConfig, out: Path, task: TaskData,
                  saes: Mapping[int, SAE] | None = None, batch_size: int = 8) -> dict[str, dict[str, float]] | None:
    """Save the adapter in `out`; return its erasure check on the task's concept texts (`concept_decodability`
    at the ablated layers, at most `ERASURE_TEXTS` texts of each set; None with fewer than `MIN_ERASURE_TEXTS`)."""
    handle = inject_concept_ablation(model, config, saes=saes)
    try:
        handle.save_pretrained(out)
        if min(len(task.concept_a), len(task.concept_b)) < MIN_ERASURE_TEXTS:
            return None
        decodability = concept_decodability(model, tokenizer, task.concept_a[:ERASURE_TEXTS],
                                            task.concept_b[:ERASURE_TEXTS], config.layers, batch_size=batch_size)
    finally:
        handle.remove()
    return {str(layer): {k: round(v, 3) for k, v in scores.items()} for layer, scores in decodability.items()}


def _select_until_erased(model, tokenizer: Any, task: TaskData, ranked: Sequence[Item],
                         make_config: Callable[[Sequence[Item]], ConceptAblationConfig], layers: Sequence[int],
                         budget: int, *, saes: Mapping[int, SAE] | None = None, batch_size: int = 8
                         ) -> tuple[list[Item], ErasureCurve]:
    """`select_until_erased` on the task's concept texts (at most `ERASURE_TEXTS` of each set), probed at `layers`;
    refused with fewer than `MIN_ERASURE_TEXTS` texts in a set."""
    if min(len(task.concept_a), len(task.concept_b)) < MIN_ERASURE_TEXTS:
        raise ValueError(f"select_by='erasure' needs at least {MIN_ERASURE_TEXTS} concept texts in each set; "
                         f"{task.name} has {len(task.concept_a)} and {len(task.concept_b)}")
    chosen, curve = select_until_erased(model, tokenizer, ranked, make_config, task.concept_a[:ERASURE_TEXTS],
                                        task.concept_b[:ERASURE_TEXTS], layers, budget=budget, saes=saes,
                                        batch_size=batch_size)
    print(curve.describe(), file=sys.stderr, flush=True)
    return chosen, curve


def _selection_note(chosen: Sequence[Any] | Mapping[Any, Any], curve: ErasureCurve | None, empty: str) -> str | None:
    """``selection.json``'s note: why nothing was chosen, or that the erasure-driven selection failed to erase."""
    if not chosen:
        return empty
    return curve.describe() if curve is not None and curve.erased_at is None else None


def find_concept_latents(
    model: torch.nn.Module,
    tokenizer: Any,
    task: TaskData,
    saes: Mapping[int, SAE],
    out_dir: str | os.PathLike,
    selection: LatentSelection | None = None,
    *,
    sae_sources: Mapping[int, SAESource] | None = None,
    explainer: ChatClient | None = None,
    embedding_filter: EmbeddingFilter | None = None,
    progress: bool = True,
    check_model_name: bool = True,
) -> SearchResult:
    """Run the SAE-latent search of the module doc with the settings of `selection` (default: `LatentSelection()`)
    and write its outputs to `out_dir`.

    `explainer` and `embedding_filter`: explain the attribution top and filter the explanations against the task's
    query. `check_model_name`: refuse SAEs whose recorded model is not `model` (checked first, with their fit), and
    record the choice in the saved adapter's config."""
    settings = selection or LatentSelection()
    select_by = settings.select_by or ("union" if explainer is not None else "contrast")
    if select_by in ("explanation", "union") and explainer is None:
        raise ValueError(f"select_by={select_by!r} needs an explainer (an LLM endpoint or local model)")
    top, rule, min_contrast, max_selected = settings.top, settings.rule, settings.min_contrast, settings.max_selected
    batch_size = settings.batch_size
    check_saes_fit_model(model, saes, check_model_name=check_model_name)
    sae_sources = dict(sae_sources or {})
    timings: dict[str, float] = {}
    start = time.time()
    train = (task.train if settings.max_examples is None else
             task.train.select(range(min(settings.max_examples, len(task.train)))))
    rows = attribute_latents(model, tokenizer, train, saes, metric="logit_diff", batch_size=batch_size, top=top)
    timings["attribution_s"] = time.time() - start

    start = time.time()
    keys = [(r.layer, r.latent) for r in rows]
    contrast = strongest_contrast_latents(model, tokenizer, [(task.concept_a, task.concept_b), *task.more_contrasts],
                                          saes, keys, reduce=settings.reduce, paired=task.paired, batch_size=batch_size)
    contrast_map = {(c.layer, c.latent): c.score for c in contrast}
    timings["contrast_s"] = time.time() - start

    out, work = Path(out_dir), _start_search(out_dir)
    start = time.time()
    corpus = task.concept_a + task.concept_b + list(task.train["prompt"][:settings.n_cache_texts])
    cache = build_activation_cache(model, tokenizer, corpus, saes, keys, batch_size=batch_size, progress=progress,
                                   checkpoint=work / CACHE_PROGRESS_NAME, keep_checkpoint=True)
    timings["cache_s"] = time.time() - start
    save_attribution(rows, work / "attribution")
    save_contrast(contrast, work / "contrast.json")
    cache_files = cache.save(work / "activation_cache")

    explanations: list[LatentExplanation] = []
    if explainer is not None:
        start = time.time()
        recorded = {"explainer": explainer.describe(), "query": task.query, "n_simulate": settings.n_simulate}
        log = ExplanationLog(work / EXPLANATIONS_NAME, {**recorded, "cache": files_fingerprint(cache_files)})
        explanations = explain_latents(explainer, cache, keys[:settings.explain_top], query=task.query,
                                       n_simulate=settings.n_simulate, embedding_filter=embedding_filter, log=log)
        timings["explain_s"] = time.time() - start
    explained = {(e.layer, e.latent): e for e in explanations}

    by_contrast = combine_with_attribution(rows, contrast_map, rule=rule, top_n=top, min_contrast=min_contrast,
                                           max_selected=None, two_sided=task.two_sided)
    by_explanation = [
        (r.layer, r.latent) for r in rows
        if (e := explained.get((r.layer, r.latent))) is not None
        and (e.similarity is None or e.similarity >= settings.min_similarity)
        and (settings.min_relevance is None or (e.relevance is not None and e.relevance >= settings.min_relevance))
        and (e.similarity is not None or settings.min_relevance is not None)
    ]
    chosen_keys: list[tuple[int, int]] = []
    curve = None
    if select_by == "erasure":
        chosen_keys, curve = _select_until_erased(
            model, tokenizer, task, keys, lambda prefix: config_from_selection(prefix, sae_sources,
                                                                               check_model_name=check_model_name),
            sorted(saes), max_selected, saes=saes, batch_size=batch_size)
    if select_by in ("contrast", "union"):
        chosen_keys += [(s.layer, s.latent) for s in by_contrast]
    if select_by in ("explanation", "union"):
        chosen_keys += [k for k in by_explanation if k not in chosen_keys]
    effect = {(r.layer, r.latent): r.effect for r in rows}
    if rule == "threshold" or select_by not in ("contrast", "erasure"):
        chosen_keys.sort(key=lambda k: abs(effect[k]), reverse=True)
    chosen_keys = chosen_keys[:max_selected]
    contrast_chosen = {(s.layer, s.latent) for s in by_contrast}
    selected = []
    for layer, latent in chosen_keys:
        e = explained.get((layer, latent))
        selected.append({
            "layer": layer, "latent": latent, "effect": effect[(layer, latent)],
            "contrast": contrast_map[(layer, latent)],
            "rank": keys.index((layer, latent)) + 1,
            "by": ["erasure"] if curve is not None else
                  [name for name, ok in (("contrast", (layer, latent) in contrast_chosen),
                                         ("explanation", (layer, latent) in by_explanation)) if ok],
            **({k: v for k, v in e.to_dict().items() if k not in ("layer", "latent")} if e else {}),
        })

    render_dashboard(rows, work / "dashboard.html", cache=cache, explanations=explanations, contrast=contrast,
                     sae_sources=sae_sources, preselected=chosen_keys,
                     base_model_name_or_path=getattr(model.config, "name_or_path", None),
                     title=f"Concept ablation: {task.name}", max_latents=top, erasure_curve=curve)
    config, erasure = None, None
    if chosen_keys:
        description = (f"{task.name}: {len(chosen_keys)} latents chosen automatically (select_by={select_by}, "
                       + (f"{curve.describe()}" if curve is not None else f"rule={rule}, min_contrast={min_contrast}")
                       + f") from the attribution top {top}")
        config = config_from_selection(chosen_keys, sae_sources,
                                       base_model_name_or_path=getattr(model.config, "name_or_path", None),
                                       description=description, check_model_name=check_model_name)
        erasure = _save_adapter(model, tokenizer, config, work, task, saes, batch_size)
    report = {
        "task": task.name, "source": "sae", "contrast_texts": task.description, "query": task.query,
        "two_sided_contrast": task.two_sided, "paired_contrast": task.paired,
        "layers": sorted(saes), "saes": {str(k): v.describe() for k, v in sae_sources.items()},
        "sae_sources": {str(k): dataclasses.asdict(v) for k, v in sae_sources.items()},
        "n_attribution_examples": len(train), "settings": {
            **dataclasses.asdict(settings), "select_by": select_by,
            **({} if explainer else {"explain_top": None, "n_simulate": None, "min_similarity": None}),
        },
        "explainer": explainer.describe() if explainer is not None else None,
        "selected": selected,
        "erasure": erasure,
        "erasure_curve": curve.to_dict() if curve is not None else None,
        "explanations": [e.to_dict() for e in explanations],
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "adapter": str(out) if config else None,
        "note": _selection_note(chosen_keys, curve, "no latent passed the selection; lower min_contrast or inspect "
                                                    "dashboard.html"),
    }
    write_json_atomic(work / SELECTION_NAME, report, default=str)
    _finish_search(work, out)
    return SearchResult(out, config, selected, report)


def _by_layer(keys: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """(layer, component) pairs -> layer -> sorted components."""
    chosen: dict[int, list[int]] = {}
    for layer, i in keys:
        chosen.setdefault(layer, []).append(i)
    return {layer: sorted(ids) for layer, ids in sorted(chosen.items())}


def find_pca_directions(
    model: torch.nn.Module,
    tokenizer: Any,
    task: TaskData,
    layers: Sequence[int],
    out_dir: str | os.PathLike,
    selection: DirectionSelection | None = None,
    *,
    progress: bool = True,
) -> SearchResult:
    """Directions saved as a projection adapter, from one of two bases (`selection`, default
    `DirectionSelection()`).

    ``basis="prompts"``: PCA of activations on D_amb prompts, components chosen by contrast
    (or `indices`). ``basis="concept"``: `concept_directions` of the task's two concept text
    sets (`n_components` per layer), all of them chosen unless `indices` says otherwise.
    ``ablation="mean"`` sets the removed components to their mean over the D_amb prompts
    (mean ablation); ``"zero"`` removes them outright. ``select_by="erasure"``: components in |contrast| order, more
    and more of them, until the concept texts' probe is at chance (at most `max_selected`; `select_until_erased`).
    """
    settings = selection or DirectionSelection()
    basis, n_components, indices, select_by = settings.basis, settings.n_components, settings.indices, settings.select_by
    min_contrast, max_selected, batch_size = settings.min_contrast, settings.max_selected, settings.batch_size
    if task.more_contrasts:
        raise ValueError(f"{task.name}: a contrast of more than two text sets ({task.description}) works with SAE "
                         "latents only")
    prompts = list(task.train["prompt"][: settings.n_texts or len(task.train)])
    start = time.time()
    if basis == "prompts":
        results = pca_directions(model, tokenizer, prompts, layers, n_components=n_components, batch_size=batch_size,
                                 progress=progress)
    else:
        results = concept_directions(model, tokenizer, task.concept_a, task.concept_b, layers,
                                     n_components=n_components if task.paired else 1, paired=task.paired,
                                     batch_size=batch_size)
        if select_by == "contrast":
            indices = indices or {layer: list(range(r.components.shape[0])) for layer, r in results.items()}
    if indices is not None:  # bad indices are refused before the contrast is computed
        select_directions(results, indices=indices)
    contrast = contrast_pca(model, tokenizer, task.concept_a, task.concept_b, results, reduce=settings.reduce,
                            paired=task.paired, batch_size=batch_size)
    out, work = Path(out_dir), _start_search(out_dir)
    save_pca(results, work / "pca")
    save_contrast(contrast, work / "contrast.json")
    centers: dict[int, torch.Tensor] | None = None
    if settings.ablation == "mean":
        centers = ({layer: r.mean for layer, r in results.items()} if basis == "prompts" else
                   mean_activations(model, tokenizer, prompts, list(results), batch_size=batch_size, progress=progress))
    curve = None
    if select_by == "erasure":
        ranked = [(c.layer, c.latent) for c in sorted(contrast, key=lambda c: abs(c.score), reverse=True)]

        def prefix_config(prefix: Sequence[tuple[int, int]]) -> ConceptAblationConfig:
            return directions_config(results, _by_layer(prefix), centers=centers)

        picked, curve = _select_until_erased(model, tokenizer, task, ranked, prefix_config, sorted(results),
                                             max_selected, batch_size=batch_size)
        chosen = _by_layer(picked)
    elif indices is not None:
        chosen = select_directions(results, indices=indices)
    else:
        chosen = select_directions(results, contrast=contrast, min_contrast=min_contrast, max_selected=max_selected)
    score = {(c.layer, c.latent): c.score for c in contrast}
    selected = [
        {"layer": layer, "component": i, "contrast": score[(layer, i)],
         "explained_variance_ratio": float(results[layer].explained_variance_ratio[i]),
         "top_examples": [e.text() for e in results[layer].top_examples[i][:3]] if results[layer].top_examples else [],
         "bottom_examples": ([e.text() for e in results[layer].bottom_examples[i][:3]]
                             if results[layer].bottom_examples else [])}
        for layer, ids in chosen.items() for i in ids
    ]
    config, erasure = None, None
    if chosen:
        how = (curve.describe() if curve is not None else f"indices {dict(indices)}" if indices is not None
               else f"|contrast| >= {min_contrast}")
        kind = "PCA" if basis == "prompts" else "concept"
        config = directions_config(results, chosen, centers=centers,
                                   base_model_name_or_path=getattr(model.config, "name_or_path", None),
                                   description=f"{task.name}: {sum(map(len, chosen.values()))} {kind} directions "
                                               f"({how}, {settings.ablation} ablation)")
        erasure = _save_adapter(model, tokenizer, config, work, task, batch_size=batch_size)
    report = {
        "task": task.name, "source": "pca" if basis == "prompts" else "concept", "contrast_texts": task.description, "paired_contrast": task.paired,
        "layers": sorted(results),
        "n_texts": len(prompts), "settings": {
            **dataclasses.asdict(settings),
            "indices": {str(k): list(v) for k, v in indices.items()} if indices else None},
        "selected": selected, "erasure": erasure, "erasure_curve": curve.to_dict() if curve is not None else None,
        "timings": {"total_s": round(time.time() - start, 1)},
        "adapter": str(out) if config else None,
        "note": _selection_note(chosen, curve, "no component passed the selection; lower min_contrast or pick indices"),
    }
    write_json_atomic(work / SELECTION_NAME, report, default=str)
    _finish_search(work, out)
    return SearchResult(out, config, selected, report)


# ------------------------------------------------------------------------------------------- the whole search


def run_search(config: SearchConfig) -> SearchResult:
    """Load the model, the task and the SAEs `config` names, run the search of its ``source`` into ``config.out``
    and record its settings there (``search_args.json``)."""
    from ..adapter.sae_sources import load_sae
    from ..loading import load_model, resolve_device, resolve_model_path

    record = config.record()  # a key given as the key's variable name is refused before any work
    if config.threads:
        torch.set_num_threads(config.threads)
    task = task_data(config.task, seed=config.seed, answer_form=config.answer_form, contrast=config.contrast,
                     templates_file=config.templates_file, source_files=config.source_files or None,
                     professions_file=config.professions_file)
    if config.query:
        task.query = config.query
    if config.model != "embedded":
        resolve_model_path(config.model)  # a folder that does not exist is named before anything else
    if config.source == "sae" and config.model != "embedded":
        missing = [layer for layer in config.layers or SHIPPED_LAYERS if layer not in config.saes]
        if missing and not config.sae_release:
            raise ValueError(f"no SAE for layer(s) {missing} of {config.model}: give saes (--sae LAYER=PATH) or "
                             "sae_release (--sae-release)")
    model, tokenizer = load_model(config.model, device=resolve_device(config.device))
    layers = config.layers or list(SHIPPED_LAYERS)
    if config.source == "concept" and not config.layers:
        layers = list(range(len(find_decoder_layers(model)[1]) - 1))
    if config.source in ("pca", "concept"):
        result = find_pca_directions(model, tokenizer, task, layers, config.out, config.direction_selection())
    else:
        sources = {layer: SAESource(path=path) for layer, path in config.saes.items()}
        if config.sae_release:
            for layer in layers:
                sources.setdefault(layer, SAESource(release=config.sae_release,
                                                    sae_id=config.sae_id_template.format(layer=layer)))
        sources.update(default_sae_sources([layer for layer in layers if layer not in sources]))
        device = next(model.parameters()).device
        saes = {layer: load_sae(sources[layer], device=device) for layer in layers}
        explainer = None
        if config.llm_base_url or config.llm_model:
            from .explain import OpenAIChat

            explainer = OpenAIChat(config.llm_model or "default", base_url=config.llm_base_url,
                                   api_key_env=config.llm_api_key_env)
        elif config.local_explainer:
            from .explain import TransformersChat

            explainer = TransformersChat(model, tokenizer)
        embedding = EmbeddingFilter(config.embedding_model) if explainer is not None else None
        result = find_concept_latents(model, tokenizer, task, saes, config.out, config.latent_selection(),
                                      sae_sources=sources, explainer=explainer, embedding_filter=embedding,
                                      check_model_name=config.check_model_name)
    write_json_atomic(Path(config.out) / SEARCH_ARGS_NAME, record, default=str)
    return result


def print_search_result(result: SearchResult) -> None:
    """What a search found: the chosen latents or directions (stdout, JSON), and its erasure check, or why it chose
    nothing (stderr)."""
    print(json.dumps({"out": str(result.out_dir), "n_selected": len(result.selected),
                      "selected": result.selected[:50]}, indent=1, default=str))
    if result.config is None:
        print(result.report.get("note"), file=sys.stderr)
        return
    erasure = result.report["erasure"]
    if result.report.get("erasure_curve"):
        print(ErasureCurve(**result.report["erasure_curve"]).describe(), file=sys.stderr)
    print(describe_decodability(erasure) if erasure else
          f"erasure check skipped: fewer than {MIN_ERASURE_TEXTS} concept texts in a set", file=sys.stderr)
