"""`logquant-gguf serve` over loopback, with the official openai client and raw HTTP."""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serving import running_server

openai = pytest.importorskip("openai", reason="the server tests use the openai client")
pytest.importorskip("fastapi", reason="needs the server extra: pip install 'logquant-gguf[server]'")

API_KEY = "test-key-123"
KV_TYPE = "q8_0"
N_CTX = 256


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with running_server(tiny_model, tmp_path_factory.mktemp("server"), kv_type=KV_TYPE,
                        n_ctx=N_CTX, api_key=API_KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=60, max_retries=0)


def test_models_lists_the_one_loaded_model(client, server):
    assert [m.id for m in client.models.list()] == [server.model]


def test_openai_client_completes_a_chat(client, server):
    r = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0


def test_openai_client_streams_a_chat(client, server):
    chunks = list(client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(chunks) >= 3  # role, content..., finish
    assert pieces
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_client_completes_and_streams_text(client, server):
    r = client.completions.create(model=server.model, prompt="def fib(n):", max_tokens=6)
    assert r.usage.completion_tokens > 0
    streamed = list(client.completions.create(model=server.model, prompt="def fib(n):",
                                              max_tokens=6, stream=True))
    assert streamed and streamed[-1].choices[0].finish_reason in ("stop", "length")


def _error(status_and_body):
    status, body = status_and_body
    assert 400 <= status < 500, (status, body)
    assert isinstance(body, dict) and body["error"]["message"], body
    return status, body["error"]


LONG = "lorem ipsum " * (N_CTX * 2)
# Fits the context alone (one token per byte, with the tiny model's byte vocabulary), not once the
# chat template (llama-2's, the fallback) wraps it.
ALMOST = "a" * (N_CTX - 8)


@pytest.mark.parametrize("case", [
    "malformed-json", "not-an-object", "messages-not-a-list", "unknown-model",
    "prompt-too-long", "prompt-too-long-streaming", "chat-too-long-streaming", "wrong-api-key",
    "no-api-key", "empty-prompt", "no-prompt", "several-prompts", "empty-messages", "logprobs",
    "chat-logprobs", "embeddings-not-enabled", "unknown-role", "role-without-its-field",
    "chat-too-long-with-its-template", "chat-too-long-with-its-template-streaming",
])
def test_bad_request_gets_a_4xx_error_body_and_the_server_keeps_serving(server, case):
    """Each gets a 4xx that says what is wrong (upstream: a 500 with an empty or internal
    message, a 200, an empty 200 for a stream, or a 400 naming the wrong thing)."""
    chat = "/v1/chat/completions"
    hello = [{"role": "user", "content": "hi"}]
    almost = [{"role": "user", "content": ALMOST}]
    expected = {
        "malformed-json": lambda: (400, server.request("POST", chat, raw=b'{"messages": [')),
        "not-an-object": lambda: (400, server.request("POST", chat, raw=b"[1, 2]")),
        "messages-not-a-list": lambda: (400, server.request("POST", chat, {"messages": 3})),
        "unknown-model": lambda: (404, server.request(
            "POST", chat, {"model": "gpt-4", "messages": hello})),
        "prompt-too-long": lambda: (400, server.request(
            "POST", "/v1/completions", {"prompt": LONG, "max_tokens": 4})),
        "prompt-too-long-streaming": lambda: (400, server.request(
            "POST", "/v1/completions", {"prompt": LONG, "max_tokens": 4, "stream": True})),
        "chat-too-long-streaming": lambda: (400, server.request(
            "POST", chat, {"messages": [{"role": "user", "content": LONG}], "stream": True})),
        "wrong-api-key": lambda: (401, server.request(
            "POST", chat, {"messages": hello}, api_key="wrong")),
        "no-api-key": lambda: (401, server.request(
            "POST", chat, {"messages": hello}, api_key=None)),
        "empty-prompt": lambda: (400, server.request(
            "POST", "/v1/completions", {"prompt": "", "max_tokens": 2})),
        "no-prompt": lambda: (400, server.request("POST", "/v1/completions", {"max_tokens": 2})),
        "several-prompts": lambda: (400, server.request(
            "POST", "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2})),
        "empty-messages": lambda: (400, server.request(
            "POST", chat, {"messages": [], "max_tokens": 2})),
        "logprobs": lambda: (400, server.request(
            "POST", "/v1/completions", {"prompt": "hi", "logprobs": 2, "max_tokens": 2})),
        "chat-logprobs": lambda: (400, server.request(
            "POST", chat, {"messages": hello, "logprobs": True, "top_logprobs": 2,
                           "max_tokens": 2})),
        "embeddings-not-enabled": lambda: (400, server.request(
            "POST", "/v1/embeddings", {"input": "hi"})),
        "unknown-role": lambda: (400, server.request(
            "POST", chat, {"messages": [{"role": "wizard", "content": "hi"}]})),
        "role-without-its-field": lambda: (400, server.request(
            "POST", chat, {"messages": [{"role": "tool", "content": "42"}]})),
        "chat-too-long-with-its-template": lambda: (400, server.request(
            "POST", chat, {"messages": almost, "max_tokens": 2})),
        "chat-too-long-with-its-template-streaming": lambda: (400, server.request(
            "POST", chat, {"messages": almost, "max_tokens": 2, "stream": True})),
    }
    says = {  # what the message must name
        "empty-prompt": "empty", "no-prompt": "empty", "several-prompts": "one prompt",
        "empty-messages": "empty", "logprobs": "logits_all", "chat-logprobs": "logits_all",
        "embeddings-not-enabled": "embedding=True", "unknown-role": "'wizard'",
        "role-without-its-field": "tool_call_id",
        "chat-too-long-with-its-template-streaming": "chat template",
    }
    want, got = expected[case]()
    status, error = _error(got)
    assert status == want, error
    assert says.get(case, "") in error["message"], error
    if "too-long" in case:
        assert error["code"] == "context_length_exceeded"
    status, body = server.request("POST", chat, {"messages": hello, "max_tokens": 2})
    assert status == 200 and body["choices"][0]["finish_reason"], body


def test_responses_name_the_model_by_its_alias_not_the_servers_file(server):
    """Upstream echoes the request's `model`, or else the server's absolute path to the file."""
    status, body = server.request("POST", "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 2})
    assert status == 200 and body["model"] == server.model, body
    status, body = server.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and body["model"] == server.model, body
    status, text = server.request("POST", "/v1/completions",
                                  {"prompt": "hi", "max_tokens": 2, "stream": True})
    events = [json.loads(line[len("data: "):]) for line in text.splitlines()
              if line.startswith("data: {")]
    assert status == 200 and events, text
    assert {e["model"] for e in events} == {server.model}


def test_openai_client_raises_typed_errors(server):
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="no-such-model", messages=[{"role": "user",
                                                                       "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        good.completions.create(model=server.model, prompt=LONG, max_tokens=4)


def test_four_concurrent_requests_all_complete(client, server):
    def ask(i: int) -> str:
        messages = [{"role": "user", "content": f"Request number {i}"}]
        if i % 2:
            chunks = list(client.chat.completions.create(
                model=server.model, messages=messages, max_tokens=6, stream=True))
            return chunks[-1].choices[0].finish_reason
        return client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=6).choices[0].finish_reason

    with ThreadPoolExecutor(4) as pool:
        reasons = list(pool.map(ask, range(4), timeout=120))
    assert all(r in ("stop", "length") for r in reasons), reasons


def test_stats_endpoint_reports_the_kv_type_asked_for(server):
    status, stats = server.request("GET", "/logquant/stats")
    assert status == 200, stats
    assert stats["kv_type"] == KV_TYPE
    assert stats["n_ctx"] == N_CTX
    assert stats["model"] == server.model
    assert stats["busy"] is False
    for key in ("tokens", "bytes_total", "bytes_per_token", "tiers"):
        assert key in stats


def test_stats_endpoint_needs_the_api_key(server):
    status, body = server.request("GET", "/logquant/stats", api_key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_chat_page_is_public_and_self_contained(server):
    status, page = server.request("GET", "/", api_key=None)
    assert status == 200 and "<html" in page and "web/app.js" in page
    for name in ("app.js", "style.css"):
        status, text = server.request("GET", f"/web/{name}", api_key=None)
        assert status == 200 and text
    web = Path(__import__("logquant_gguf").__file__).parent / "web"
    for f in web.iterdir():
        assert "http://" not in f.read_text() and "https://" not in f.read_text(), f


def test_serve_parser_binds_to_loopback_by_default():
    from logquant_gguf import server

    sub = argparse.ArgumentParser().add_subparsers()
    p = server.add_serve_parser(sub)
    a = p.parse_args([])
    assert (a.host, a.port, a.kv_type, a.func) == ("127.0.0.1", 8000, "logquant", server.serve)


def test_stats_answer_at_once_while_a_reply_streams(server):
    """The stats read does not wait for a generation (nor touch the cache under it)."""
    import json
    import urllib.request

    req = urllib.request.Request(
        server.url + "/v1/chat/completions", method="POST",
        data=json.dumps({"messages": [{"role": "user", "content": "Tell me a story"}],
                         "max_tokens": 150, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    # Reading one event and then nothing stalls the server's generation on a full send buffer,
    # with the model's lock held.
    with urllib.request.urlopen(req, timeout=60) as stream:
        assert stream.readline().startswith(b"data: ")
        status, stats = server.request("GET", "/logquant/stats", timeout=10)
        assert status == 200 and stats["busy"] is True
        assert stats["live_tokens"] > 0 and stats["kv_type"] == KV_TYPE
    status, body = server.request("POST", "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 2})
    assert status == 200, body
    status, stats = server.request("GET", "/logquant/stats")
    assert stats["busy"] is False


def test_a_huge_prompt_is_refused_without_stalling_the_other_clients(server):
    """A 15 MB prompt for a 256-token context: refused from its size, while the event loop keeps
    answering. (The gate once tokenized it on the loop: with the tiny model's vocabulary, which
    has no merges, that takes minutes, and every client waited.) Last in the module: on a server
    that stalls, the tests after it would fail too."""
    huge = json.dumps({"prompt": "lorem ipsum " * (15_000_000 // 12), "max_tokens": 2,
                       "stream": True}).encode()
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(server.request, "POST", "/v1/completions", raw=huge, timeout=30)
        slowest = 0.0
        while not big.done():
            start = time.monotonic()
            status, stats = server.request("GET", "/logquant/stats", timeout=10)
            slowest = max(slowest, time.monotonic() - start)
            assert status == 200, stats
        status, error = _error(big.result())
    assert status == 400 and error["code"] == "context_length_exceeded", error
    assert "at least" in error["message"], error
    assert slowest < 2.0
