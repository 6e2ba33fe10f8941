"""The default real model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M), greedy."""

from __future__ import annotations

from logquant_gguf import Llama, generate


def test_default_model_generates_the_same_text_twice(real_model):
    llm = Llama(str(real_model), n_ctx=512, n_threads=2, verbose=False)
    prompt = "def fibonacci(n):\n"
    first = "".join(generate(prompt, llm=llm, max_tokens=16))
    second = "".join(generate(prompt, llm=llm, max_tokens=16))
    assert first == second
    assert "fibonacci" in first or "return" in first or "if" in first, first


def test_default_model_chats(real_model):
    llm = Llama(str(real_model), n_ctx=512, n_threads=2, verbose=False, kv_type="q8_0")
    out = llm.create_chat_completion(
        [{"role": "user", "content": "What is 2 + 3? Answer with one number."}],
        max_tokens=8, temperature=0)
    assert "5" in out["choices"][0]["message"]["content"]
