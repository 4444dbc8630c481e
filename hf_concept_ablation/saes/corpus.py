"""An offline text corpus for training SAEs, made on this machine with no download.

Three sources, each recorded in every record's ``source`` field:

``model``
    Text sampled from the model itself (temperature 1, no top-k/top-p) after
    short, diverse seed prompts (:data:`SEED_PROMPTS`: news, stories, science,
    code, dialogue, instructions, recipes, ...). Sampling is slow on a CPU
    (about 45 new tokens/s on one core for Gemma 3 270M, whose 262k-token
    vocabulary dominates the cost), so the samples are written to a cache file
    batch by batch and made only once; an interrupted run continues.
``tasks``
    The project's task prompts (gender pronoun prompts and a few double
    multiple-choice combinations) from :mod:`hf_concept_ablation.tasks`, if that
    package is importable; skipped silently otherwise.
``docstrings``
    Docstrings of the Python standard library, read from the source files with
    :mod:`ast` (nothing is imported), in sorted file order. The standard library
    is under the PSF license; test suites, ``idlelib`` and ``lib2to3`` are left out.

Every record is ``{"text": ..., "source": ..., "split": "train" | "heldout"}``.
The split is a pure function of the text (:func:`split_of`), so held-out text
never reaches training, whatever the order or subset used. The corpus lives in
the package cache (:func:`hf_concept_ablation.loading.cache_dir`), not in the
repository; :func:`build_corpus` writes a ``*.recipe.json`` beside it with
the seed, settings and counts, which is all that is needed to rebuild it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..files import atomic_path, write_json_atomic
from ..loading import cache_dir

#: Short seed prompts for sampling from the model: many genres and registers.
SEED_PROMPTS: tuple[str, ...] = (
    # news
    "BREAKING: The city council voted on Tuesday to",
    "The stock market closed lower today after",
    "Officials confirmed that the storm had",
    "In an interview with reporters, the minister said",
    "The local football club announced that",
    "Police are asking for help finding",
    # stories
    "Once upon a time, in a small village by the sea,",
    "She opened the letter and",
    "The old man looked at the boy and said,",
    "It was raining when the train finally",
    "My grandmother used to tell me",
    "The dragon landed on the hill and",
    "He had never seen a room like this before.",
    # science and nature
    "Photosynthesis is the process by which",
    "The human heart has four chambers:",
    "In a recent study, scientists found that",
    "Black holes form when",
    "The mitochondria is",
    "Honey bees communicate by",
    "Climate change affects ocean currents because",
    # history, geography, society
    "The Roman Empire was",
    "Paris is the capital of France and",
    "During the industrial revolution,",
    "The history of the city begins",
    "Democracy is a form of government in which",
    # code
    "def fibonacci(n):\n",
    "import numpy as np\n\n",
    "# Python program to sort a list\n",
    "function handleClick(event) {\n",
    "SELECT name, age FROM users WHERE",
    "<html>\n<head>\n<title>",
    "public class Main {\n    public static void main(String[] args) {\n",
    "To install the package, run",
    # dialogue
    "Q: What is the best way to learn a language?\nA:",
    '"Where are you going?" she asked.\n"',
    "Customer: Hi, I ordered a pair of shoes last week and\nAgent:",
    "Interviewer: Tell me about yourself.\nCandidate:",
    "Teacher: Who can tell me what a noun is?\nStudent:",
    # instructions, how-to, recipes
    "How to change a flat tire:\n1.",
    "Ingredients:\n- 2 cups flour\n-",
    "Step 1: Preheat the oven to",
    "Here are five tips for better sleep:",
    "To reset your password, follow these steps:",
    # reviews, opinions, ads, forums
    "I bought this vacuum cleaner last month and",
    "Review: The movie starts slowly, but",
    "Posted by user123: Has anyone else noticed that",
    "For sale: a used bicycle in good condition,",
    "Dear Sir or Madam,\n\nI am writing to",
    # people, jobs, everyday life (pronouns and roles appear naturally)
    "The nurse walked into the room and",
    "My brother works as an engineer and",
    "The teacher asked her students to",
    "The doctor told him that",
    "Our new neighbors moved in yesterday. They",
    "The chef tasted the soup and",
    # maths, lists, misc
    "Let x be a real number such that",
    "Chapter 1\n\n",
    "Table of contents:\n1. Introduction\n2.",
    "Wikipedia is a free online encyclopedia",
    "The following is a list of",
    "Question: Which of the following is a mammal?\nA.",
)

_SKIP_STDLIB_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
                      "turtledemo", "ensurepip", "pydoc_data"}


@dataclass
class CorpusRecipe:
    """Everything needed to rebuild the corpus (also saved as JSON beside it).

    Args:
        model: model spec the samples come from (``"embedded"`` or a Hub id/folder).
        seed: seed of the sampling and of the held-out split.
        n_model_samples: how many texts to sample from the model.
        max_new_tokens: new tokens per sampled text.
        temperature: sampling temperature (no top-k or top-p filtering).
        sample_batch_size: texts sampled together.
        include_tasks: add the project's task prompts if the tasks package exists.
        include_docstrings: add the standard library's docstrings.
        min_docstring_chars: shorter docstrings are skipped.
        heldout_every: one text in this many (by hash) is held out of training.
    """

    model: str = "embedded"
    seed: int = 0
    n_model_samples: int = 256
    max_new_tokens: int = 96
    temperature: float = 1.0
    sample_batch_size: int = 64
    include_tasks: bool = True
    include_docstrings: bool = True
    min_docstring_chars: int = 120
    heldout_every: int = 20

    def key(self) -> str:
        """A short stable hash naming the files made with this recipe."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


#: the values of a corpus record's ``split`` (see `split_of`)
SPLITS: tuple[str, ...] = ("train", "heldout")


def split_of(text: str, heldout_every: int = 20) -> str:
    """``"heldout"`` for one text in ``heldout_every`` (by SHA-1 of the text), else ``"train"``."""
    digest = int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16)
    return "heldout" if digest % heldout_every == 0 else "train"


def corpus_dir() -> Path:
    """Where corpora and their recipes are kept: ``<cache_dir()>/corpus``."""
    return cache_dir() / "corpus"


# --------------------------------------------------------------------------- sources


def stdlib_docstrings(min_chars: int = 120) -> list[str]:
    """Module, class and function docstrings of the standard library, read with `ast` (no import)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    seen: set[str] = set()
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root).parts
        if any(part in _SKIP_STDLIB_PARTS or part.startswith("test_") for part in rel):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                texts.append(doc.strip())
    return texts


def task_prompts() -> list[str]:
    """Prompts of the project's tasks (all splits), or ``[]`` if `hf_concept_ablation.tasks` is missing."""
    try:
        from ..tasks.gender_bias import build_gender_datasets
    except ImportError:
        return []
    prompts: list[str] = []
    seen: set[str] = set()

    def add(rows: Iterable[str]) -> None:
        for p in rows:
            if p not in seen:
                seen.add(p)
                prompts.append(p)

    try:
        for split in build_gender_datasets().values():
            add(split["prompt"])
    except Exception as err:  # a task under construction must not break the corpus
        print(f"[corpus] gender prompts skipped: {err}", file=sys.stderr)
    try:
        from ..tasks.double_mc import build_double_mc_datasets

        combos = [("pronouns", "sports", "pronouns"), ("sentiment", "verbs", "verbs"), ("sports", "sentiment", "sentiment")]
        for first, second, intended in combos:
            for split in build_double_mc_datasets(first, second, intended, max_examples=300).values():
                add(split["prompt"])
    except Exception as err:
        print(f"[corpus] double multiple-choice prompts skipped: {err}", file=sys.stderr)
    return prompts


def _samples_written(out_file: Path) -> list[str]:
    """The texts an earlier (maybe interrupted) sampling run appended to `out_file`; a last line cut off
    mid-write is dropped, any other malformed line is an error naming it."""
    if not out_file.exists():
        return []
    lines = out_file.read_text().splitlines()
    texts = []
    for number, line in enumerate(lines, 1):
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            if number == len(lines):
                break  # torn by an interruption: that batch is sampled again
            raise ValueError(f"{out_file}:{number} is not a JSON object with a 'text' field: {line[:80]!r}") from err
    return texts


def sample_from_model(
    model: Any,
    tokenizer: Any,
    out_file: Path,
    n_samples: int,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    prompts: tuple[str, ...] = SEED_PROMPTS,
) -> list[str]:
    """Sample ``n_samples`` texts (seed prompt + continuation) and append them to ``out_file`` (JSONL).

    Resumable: texts already in ``out_file`` are kept and only the rest are sampled.
    Batch ``b`` uses seed ``seed + b`` and prompts drawn with ``random.Random(seed)``.
    """
    import torch
    from tqdm.auto import tqdm

    done = _samples_written(out_file)
    rng = random.Random(seed)
    chosen = [rng.choice(prompts) for _ in range(n_samples)]
    model.eval()
    n_batches = (n_samples + batch_size - 1) // batch_size
    first_batch = len(done) // batch_size
    done = done[: first_batch * batch_size]  # a partial batch is redone
    with atomic_path(out_file) as tmp, tmp.open("w") as f:
        for text in done:
            f.write(json.dumps({"text": text}) + "\n")
    start = time.time()
    n_new = 0
    for b in tqdm(range(first_batch, n_batches), desc="sampling from the model", initial=first_batch, total=n_batches):
        batch_prompts = chosen[b * batch_size : (b + 1) * batch_size]
        enc = tokenizer(batch_prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        torch.manual_seed(seed + b)
        with torch.no_grad():
            out = model.generate(
                **enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        n_new += out.shape[0] * max_new_tokens
        with out_file.open("a") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
        done.extend(texts)
    if n_new:
        print(f"[corpus] sampled {n_new} new tokens at {n_new / (time.time() - start):.0f} tokens/s", file=sys.stderr)
    return done


# --------------------------------------------------------------------------- the corpus


def build_corpus(recipe: CorpusRecipe | None = None, out_dir: Path | None = None, model_and_tokenizer: Any = None) -> Path:
    """Make (or find) the corpus for a recipe; return the path of its JSONL file.

    The file is ``<out_dir>/corpus-<recipe.key()>.jsonl`` (default ``out_dir``:
    :func:`corpus_dir`), beside ``corpus-<key>.recipe.json`` with the recipe and
    per-source counts. Sampled text is cached in ``model-samples-<key>.jsonl``.
    """
    recipe = recipe or CorpusRecipe()
    out_dir = Path(out_dir) if out_dir is not None else corpus_dir()
    key = recipe.key()
    path = out_dir / f"corpus-{key}.jsonl"
    if path.exists() and (out_dir / f"corpus-{key}.recipe.json").exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, str]] = []
    if recipe.n_model_samples > 0:
        if model_and_tokenizer is None:
            from ..loading import load_model

            model_and_tokenizer = load_model(recipe.model)
        model, tokenizer = model_and_tokenizer
        samples = sample_from_model(
            model, tokenizer, out_dir / f"model-samples-{key}.jsonl", recipe.n_model_samples,
            recipe.max_new_tokens, recipe.temperature, recipe.sample_batch_size, recipe.seed,
        )
        records += [{"text": t, "source": "model"} for t in samples]
    if recipe.include_tasks:
        records += [{"text": t, "source": "tasks"} for t in task_prompts()]
    if recipe.include_docstrings:
        records += [{"text": t, "source": "docstrings"} for t in stdlib_docstrings(recipe.min_docstring_chars)]
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        r["split"] = split_of(r["text"], recipe.heldout_every)
        c = counts.setdefault(r["source"], {"texts": 0, "chars": 0, "heldout_texts": 0})
        c["texts"] += 1
        c["chars"] += len(r["text"])
        c["heldout_texts"] += r["split"] == "heldout"
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    meta = {"recipe": asdict(recipe), "key": key, "counts": counts, "python": sys.version.split()[0],
            "seed_prompts": len(SEED_PROMPTS)}
    write_json_atomic(out_dir / f"corpus-{key}.recipe.json", meta, indent=2)
    return path


def read_corpus(path: Path | str, split: str | None = None, sources: Iterable[str] | None = None) -> list[dict[str, str]]:
    """Records of a corpus file, optionally only one split (``"train"``/``"heldout"``) and some sources."""
    wanted = set(sources) if sources is not None else None
    out = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not a JSON record ({err.msg}); rebuild the corpus") from None
        if not (isinstance(r, dict) and isinstance(r.get("text"), str) and r.get("split") in SPLITS):
            raise ValueError(f"{path}, line {number}: a corpus record is a JSON object with a 'text' string and a "
                             f"'split' of {SPLITS}, got {line[:80]!r}")
        if (split is None or r.get("split") == split) and (wanted is None or r.get("source") in wanted):
            out.append(r)
    return out


def iter_texts(path: Path | str, split: str = "train", seed: int = 0) -> Iterator[str]:
    """Texts of one split in a seeded shuffled order (so a token budget draws from every source)."""
    records = read_corpus(path, split)
    random.Random(seed).shuffle(records)
    for r in records:
        yield r["text"]
