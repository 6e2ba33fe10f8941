"""8-bit scales and minimums (logquant_scale_bits=8): each block's header is two bytes relative to
per-channel references computed from the model's K/V weights, a quarter of a bit per value less
at key groups of 64. The state records the references; the prefill path reads the same blocks as
the fused op; a real model's logits stay as close to f16's; bad settings are refused."""

from __future__ import annotations

import numpy as np
import pytest
from test_levers import kl_to, run_logits
from test_logquant import G64, load, saved_state_continues, tokens
from test_value_groups import fuzz_state_module, older_state_continues

from logquant_gguf import Llama, _capi, kv_types
from logquant_gguf.bench.env import run_tool, tool_env, tool_path
from logquant_gguf.llama import llama_cpp  # the llama_cpp bound to our build


def test_8bit_scales_take_a_quarter_bit_less_and_keep_the_state(tiny_model):
    """2.25 bits per value instead of 2.5 (keys and per-channel values, G = 64); a saved state,
    open groups included, continues bit for bit; a state of the other header kind is refused,
    by the Python check and, below it, by the cache itself."""
    bits = {}
    for sb in (16, 8):
        llm = load(tiny_model, logquant_scale_bits=sb, **G64)
        assert llm.logquant_bits.scale_bits == sb
        llm.eval(tokens(llm, 300, seed=4))
        stats = llm.kv_stats()
        bits[sb] = stats["bits_per_value"]
        assert stats["tiers"]["q2"]["tokens"] > 0
        llm.close()
    assert bits == {16: 2.5, 8: 2.25}

    state = saved_state_continues(tiny_model, n_more=40, logquant_scale_bits=8, **G64)
    with pytest.raises(ValueError, match="logquant_scale_bits=8"):
        load(tiny_model, **G64).load_state(state)
    for sb, st in ((16, state), (8, None)):
        if st is None:
            src = load(tiny_model, **G64)
            src.eval(tokens(src, 150))
            st = src.save_state()
            src.close()
        dst = load(tiny_model, logquant_scale_bits=sb, **G64)
        with pytest.raises(RuntimeError):
            Llama.__mro__[1].load_state(dst, st)
        dst.close()


@pytest.mark.parametrize("kw,bits", [
    ({"logquant_key_bits": 3, "logquant_key_group": 32, "logquant_scale_bits": 8}, 3.0),  # the 3.0-bit point
    ({"logquant_key_bits": 4, "logquant_key_group": 32}, 4.0),
    ({"logquant_key_bits": 4, "logquant_value_bits": 4, "logquant_key_group": 32,
      "logquant_scale_bits": 8}, 4.5),
    ({"logquant_key_bits": 8, "logquant_key_group": 128, "logquant_scale_bits": 8}, (8.125 + 2.125) / 2),
])
def test_wider_codes_in_groups_of_32_and_128(tiny_model, kw, bits):
    """3-, 4- and 8-bit keys come in every key group (32, 64, 128 tokens), so that 8-bit scales
    and smaller groups make the points between the bit budgets: b + (16 or 32) / G bits per key,
    and per value with values grouped per channel. Each runs, and its state continues bit for bit."""
    llm = load(tiny_model, **kw)
    assert llm.kv_stats()["bits_per_value"] == pytest.approx(bits)
    llm.close()
    saved_state_continues(tiny_model, n_more=40, **kw)


def test_states_of_the_version_before_load_with_f16_scales(tiny_model):
    """A state written before 8-bit scales (version 5: no references field) loads into a cache of
    f16 scales and continues as its source did; a cache of 8-bit scales refuses it."""
    old = older_state_continues(tiny_model, fuzz_state_module().LQ_MAGIC_V5, 1, **G64)  # that version's default
    s8 = load(tiny_model, logquant_scale_bits=8, **G64)
    with pytest.raises(RuntimeError):
        Llama.__mro__[1].load_state(s8, old)
    s8.close()


def test_prefill_path_reads_8bit_scales(tiny_model):
    """The prefill path (both tiers dequantized to f16, then flash attention) and the fused op read
    the same 2-byte headers: they differ by about as much as with f16 headers (f16 rounding, which
    this random model's sharp attention amplifies), and less than the logits of 8-bit and of f16
    headers differ (a misread block, a header size or a reference off, would differ more)."""
    probe = load(tiny_model)
    seq = tokens(probe, 300, seed=23)
    probe.close()
    fused, diff = {}, {}
    for sb in (16, 8):
        fused[sb], fa = (run_logits(tiny_model, seq, logquant_prefill_fa_min=m, logquant_scale_bits=sb)[100:]
                         for m in (0, 32))
        diff[sb] = float(np.abs(fa - fused[sb]).mean())
    kinds = float(np.abs(fused[8] - fused[16]).mean())
    print(f"mean |logit diff| prefill vs fused: f16 scales {diff[16]:.4f}, 8-bit {diff[8]:.4f}; "
          f"8-bit vs f16 scales {kinds:.4f}")
    assert diff[8] < 2 * diff[16] + 1e-3 and diff[8] < kinds


def test_8bit_scales_stay_as_close_to_f16_on_qwen(real_model):
    """Measured end to end in docs/levers.md; here a short check as the value-grouping one: 1600
    tokens of code in ubatches of 64, KL of the last 400 tokens' logits against f16's, with f16
    and with 8-bit scales (the study: no measurable cost)."""
    from logquant_gguf.bench import corpus

    probe = Llama(str(real_model), n_ctx=256, verbose=False)
    seq, _ = corpus.token_stream(lambda s: probe.tokenize(s.encode(), add_bos=False), "code", 1600)
    probe.close()
    kw = {"n_ctx": 2048, "n_batch": 64, "n_ubatch": 64, "flash_attn": True, "logquant_window": 32}
    ref = run_logits(real_model, seq, "f16", n_ctx=2048, flash_attn=True)[1200:]
    f16_scales = kl_to(ref, run_logits(real_model, seq, **kw)[1200:])
    s8 = kl_to(ref, run_logits(real_model, seq, logquant_scale_bits=8, **kw)[1200:])
    print(f"KL f16 scales {f16_scales:.4f}, 8-bit scales {s8:.4f}")
    assert s8 < 1.25 * f16_scales


@pytest.mark.parametrize("kw,match", [
    ({"logquant_scale_bits": 4}, "logquant_scale_bits must be one of 16, 8"),
    ({"logquant_scale_bits": True}, "logquant_scale_bits must be one of"),
    ({"logquant_scale_bits": 8, "logquant_keys_post_rope": True}, "needs keys grouped before RoPE"),
    ({"kv_type": "q8_0", "logquant_scale_bits": 8}, "logquant_scale_bits applies to the LogQuant"),
])
def test_bad_scale_bits_are_refused(tiny_model, kw, match):
    with pytest.raises(ValueError, match=match):
        load(tiny_model, **kw)


def test_scale_bits_names():
    assert kv_types.parse_variant("logquant+s8") == ("logquant", {"logquant_scale_bits": 8})
    assert kv_types.parse_variant("logquant+k3+s8") == (
        "logquant", {"logquant_key_bits": 3, "logquant_scale_bits": 8})
    assert tool_env("logquant")["LOGQUANT_SCALE_BITS"] == "16"
    assert tool_env("logquant+s8")["LOGQUANT_SCALE_BITS"] == "8"
    assert "logquant_scale_bits=8" in str(kv_types.LogQuantBits(scale_bits=8))
    assert "scale_bits" not in str(kv_types.LogQuantBits())


@pytest.mark.skipif(tool_path("llama-perplexity") is None, reason="this build has no llama-perplexity")
def test_tools_take_scale_bits(tiny_model, tmp_path):
    """llama.cpp's tools select 8-bit scales with LOGQUANT_SCALE_BITS (the cache says so in the log,
    which the tool shows with -v); the cache itself refuses them with keys grouped after RoPE and
    the tool fails saying why. (Before patch 0016 llama.cpp's logger could drop every line of a
    tool that failed early, llama.cpp issue 22142: CI once saw an empty stdout and stderr.)"""
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x * 3 + 1\n" * 150)
    cmd = [str(tool_path("llama-perplexity")), "-m", str(tiny_model), "-f", str(text), "-c", "256",
           "-b", "256", "--chunks", "1", "-ctk", "lq2", "-ctv", "lq2", "-fa", "on", "-t", "2", "-v"]
    env = {**tool_env("logquant+s8"), "LOGQUANT_WINDOW": "8"}
    p = run_tool(cmd, env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-2000:]
    assert "8-bit scales and minimums" in out, out[-2000:]
    for _ in range(3):  # the lines were lost at random (a race with the log's worker thread)
        p = run_tool(cmd, {**env, "LOGQUANT_KEYS_POST_ROPE": "1", "LOGQUANT_KEY_WIDTHS": "uniform"})
        out = p.stdout + p.stderr
        assert p.returncode != 0 and "8-bit scales are relative to each key channel" in out, out[-2000:]


def test_cache_itself_refuses_scale_bits_after_rope(tiny_model):
    """Below the Python check (a caller of the C API, llama.cpp's tools): the cache refuses 8-bit
    scales with keys grouped after RoPE, and says why."""
    spec = kv_types.KV_TYPES["logquant"]
    _capi.set_logquant_params(8, spec.policy)
    _capi.set_logquant_bits(kv_types.LogQuantBits(keys_post_rope=True, key_widths="uniform", scale_bits=8))
    _capi.take_refusal()
    try:
        with pytest.raises(ValueError):
            llama_cpp.Llama(str(tiny_model), type_k=spec.type_k, type_v=spec.type_v, flash_attn=True,
                            n_ctx=256, verbose=False)
        assert "8-bit scales are relative to each key channel" in _capi.take_refusal()
    finally:
        _capi.set_logquant_bits(kv_types.LogQuantBits())
