"""run_chat driven by scripted input: history, commands, saving, end of input."""

from __future__ import annotations

import io
import json

import pytest

from logquant_gguf import Llama
from logquant_gguf.terminal_chat import run_chat

SYSTEM = "You are terse."


@pytest.fixture(scope="module")
def llm(tiny_model):
    model = Llama(str(tiny_model), kv_type="q8_0", n_ctx=256, n_threads=1, verbose=False)
    yield model
    model.close()


def chat(llm, script: str, **kwargs):
    out = io.StringIO()
    history = run_chat(llm, system_prompt=SYSTEM, max_tokens=6, temperature=0.0,
                       stream_out=out, stdin=io.StringIO(script), **kwargs)
    return history, out.getvalue()


def roles(history):
    return [m["role"] for m in history]


def test_messages_build_the_history_and_end_of_input_ends_the_chat(llm):
    history, out = chat(llm, "hello there\nand again\n")
    assert roles(history) == ["system", "user", "assistant", "user", "assistant"]
    assert history[0]["content"] == SYSTEM
    assert [m["content"] for m in history if m["role"] == "user"] == ["hello there", "and again"]
    assert out.count("assistant> ") == 2
    assert out.rstrip().endswith("you>")  # the last prompt, then end of input


def test_a_model_without_a_chat_template_is_named_in_the_banner(llm):
    """The tiny model's GGUF has no template, as a base model's (Gemma 3 270M): llama-cpp-python
    falls back to its "llama-2" format, which the chat says instead of printing empty replies."""
    _, out = chat(llm, "")
    assert "has no chat template (a base model?)" in out and "'llama-2'" in out


def test_the_chat_function_warns_about_the_fallback_format(llm):
    from logquant_gguf import chat as chat_fn

    with pytest.warns(UserWarning, match="has no chat template"):
        list(chat_fn([{"role": "user", "content": "hi"}], llm=llm, max_tokens=2))


def test_streamed_text_is_what_the_history_keeps(llm):
    history, out = chat(llm, "hi\n")
    reply = history[-1]["content"]
    assert ("assistant> " + reply) in out


def test_stats_shows_the_kv_cache(llm):
    _, out = chat(llm, "hi\n/stats\n")
    stats = llm.kv_stats()
    assert "kv_type q8_0" in out
    assert f"of {stats['n_ctx']} tokens" in out


def test_save_writes_the_conversation_as_json(llm, tmp_path):
    path = tmp_path / "talk.json"
    history, out = chat(llm, f"first question\n/save {path}\nsecond question\n")
    saved = json.loads(path.read_text())
    assert saved["kv_type"] == "q8_0"
    assert saved["messages"] == history[:3]  # what had been said when /save ran
    assert roles(saved["messages"]) == ["system", "user", "assistant"]
    assert f"saved 3 messages to {path}" in out


def test_reset_forgets_everything_but_the_system_prompt(llm):
    history, out = chat(llm, "remember this\n/reset\nnew topic\n")
    assert "(conversation reset)" in out
    assert roles(history) == ["system", "user", "assistant"]
    assert history[1]["content"] == "new topic"


def test_quit_stops_reading(llm):
    history, _ = chat(llm, "/quit\nnever sent\n")
    assert history == [{"role": "system", "content": SYSTEM}]


def test_help_and_unknown_commands_answer_without_touching_history(llm):
    history, out = chat(llm, "/help\n/bogus\n/save\n")
    assert "/save FILE" in out and "unknown command /bogus" in out and "usage: /save FILE" in out
    assert history == [{"role": "system", "content": SYSTEM}]


def test_a_message_longer_than_the_context_is_refused_and_the_chat_goes_on(llm):
    history, out = chat(llm, "word " * 400 + "\nshort one\n")
    assert "exceed context window" in out
    assert [m["content"] for m in history if m["role"] == "user"] == ["short one"]
