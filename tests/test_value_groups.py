"""Values grouped per channel (logquant_value_groups="channel", the default): each channel of a key
group's G tokens has its own scale and minimum, as the keys have, instead of each token's 64
channels sharing one. The tier keeps its bits per value; the state records the grouping; the
prefill path reads the same values as the fused op; a real model's logits come closer to f16's;
bad settings are refused."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from test_levers import kl_to, run_logits
from test_logquant import G64, last_logits, load, saved_state_continues, tokens

from logquant_gguf import Llama, kv_types
from logquant_gguf.bench.env import run_tool, tool_env, tool_path


def test_value_groups_keep_the_bits_and_the_state(tiny_model):
    """Same bits per value either way (groups of 64 and 2-bit keys on every layer, the format
    these figures are for: per-token values leave the default format, test_layer_bits_auto.py;
    the staging of open groups grows by their f16 values);
    a saved state, open groups included, continues as the context it was saved from; a state of
    per-token values is refused by a per-channel cache and the other way round."""
    bits = {}
    for vg in ("token", "channel"):
        llm = load(tiny_model, logquant_value_groups=vg, **G64)
        assert llm.logquant_bits.value_groups == vg
        llm.eval(tokens(llm, 300, seed=4))
        stats = llm.kv_stats()
        bits[vg] = stats["bits_per_value"]
        assert stats["tiers"]["q2"]["tokens"] > 0
        llm.close()
    assert bits["channel"] == bits["token"] == 2.5

    state = saved_state_continues(tiny_model, n_more=40, **G64)  # W = 8: the last 2-bit group is open
    with pytest.raises(ValueError, match="logquant_value_groups='token'"):
        load(tiny_model, logquant_value_groups="token", **G64).load_state(state)
    # below the Python check, the cache itself refuses a state whose values it would misread
    for vg, st in (("token", state), ("channel", None)):
        if st is None:
            src = load(tiny_model, logquant_value_groups="token", **G64)
            src.eval(tokens(src, 150))
            st = src.save_state()
            src.close()
        dst = load(tiny_model, logquant_value_groups=vg, **G64)
        with pytest.raises(RuntimeError):
            Llama.__mro__[1].load_state(dst, st)
        dst.close()


def fuzz_state_module():
    path = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_state.py"
    spec = importlib.util.spec_from_file_location("fuzz_state", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_state", mod)  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def older_state_continues(tiny_model, magic: int, fields_dropped: int, n_tokens: int = 150,
                          open_group: bool = False, **kw):
    """A state saved by a cache of these settings, rewritten as the older section version magic
    (whose layers lack fields_dropped int32 fields, and stage in f32): it loads into such a cache
    and continues as its source did. open_group: the state must hold staged rows (an open group).
    Returns it, for the caches that must refuse it."""
    fs = fuzz_state_module()
    src = load(tiny_model, **kw)
    src.eval(tokens(src, n_tokens))
    state = src.save_state()
    more = tokens(src, 40, seed=9)
    src.eval(more)
    expected = last_logits(src)
    src.close()
    buf = bytes(state.llama_state)
    lay = fs.parse_state(buf)
    assert lay.lq.magic == fs.LQ_MAGIC
    vpc = int(kw.get("logquant_value_groups") != "token")
    assert {(ly.vpc, ly.rtag) for ly in lay.lq.layers} == {(vpc, 0)}
    lay.lq.magic = magic
    old = copy.copy(state)
    old.llama_state = buf[:lay.lq_start] + lay.lq.serialize() + buf[lay.lq_end:]
    old.llama_state_size = len(old.llama_state)
    staged = sum(len(b) for ly in lay.lq.layers for b in ly.staging)  # f16 now, f32 before version 7
    assert staged > 0 or not open_group
    assert old.llama_state_size == len(buf) - 4 * fields_dropped * len(lay.lq.layers) + staged
    dst = load(tiny_model, **kw)
    dst.load_state(old)
    dst.eval(more)
    np.testing.assert_array_equal(last_logits(dst), expected)
    dst.close()
    return old


def test_states_with_f32_staging_load_and_continue(tiny_model):
    """A state of version 6, whose open groups were staged in f32, loads into the default cache
    (f16 staging) and continues bit for bit as its source did: the staged values were f16 or are
    rounded so when staged now. 200 tokens leave a group open, so the rewrite has staging to widen."""
    older_state_continues(tiny_model, fuzz_state_module().LQ_MAGIC_V6, 0, n_tokens=200, open_group=True)


def test_states_of_the_version_before_load_as_per_token_values(tiny_model):
    """A state written before value grouping (version 4: no grouping field, values per token, and
    no references field) loads into a per-token cache and continues as its source did; a
    per-channel cache refuses it."""
    old = older_state_continues(tiny_model, fuzz_state_module().LQ_MAGIC_V4, 2, logquant_value_groups="token")
    per_channel = load(tiny_model, **G64)
    with pytest.raises(RuntimeError):
        Llama.__mro__[1].load_state(per_channel, old)
    per_channel.close()


def test_prefill_path_reads_per_channel_values(tiny_model):
    """The prefill path (both tiers dequantized to f16, then flash attention) and the fused op
    read the same per-channel values: they differ by f16 rounding (which this random model's sharp
    attention amplifies about as much with per-token values), far less than the two value
    groupings differ from each other (a misread layout would differ at least that much)."""
    probe = load(tiny_model)
    seq = tokens(probe, 300, seed=23)
    probe.close()
    fused, fa = (run_logits(tiny_model, seq, logquant_prefill_fa_min=m)[100:] for m in (0, 32))
    per_token = run_logits(tiny_model, seq, logquant_value_groups="token", logquant_prefill_fa_min=0)[100:]
    paths, groupings = np.abs(fa - fused).mean(), np.abs(per_token - fused).mean()
    print(f"mean |logit diff|: prefill vs fused {paths:.3f}, per token vs per channel {groupings:.3f}")
    assert paths < 0.25 * groupings


def test_per_channel_values_come_closer_to_f16_on_qwen(real_model):
    """Measured end to end in docs/levers.md; here a short check: 1600 tokens of code in ubatches
    of 64 (so that most of what the last 400 tokens see is 2-bit, as in decoding), KL of their
    logits against f16's."""
    from logquant_gguf.bench import corpus

    probe = Llama(str(real_model), n_ctx=256, verbose=False)
    seq, _ = corpus.token_stream(lambda s: probe.tokenize(s.encode(), add_bos=False), "code", 1600)
    probe.close()
    kw = {"n_ctx": 2048, "n_batch": 64, "n_ubatch": 64, "flash_attn": True, "logquant_window": 32}
    ref = run_logits(real_model, seq, "f16", n_ctx=2048, flash_attn=True)[1200:]
    per_token = kl_to(ref, run_logits(real_model, seq, logquant_value_groups="token", **kw)[1200:])
    per_channel = kl_to(ref, run_logits(real_model, seq, **kw)[1200:])
    print(f"KL per token {per_token:.4f}, per channel {per_channel:.4f}")
    assert per_channel < 0.85 * per_token


@pytest.mark.parametrize("kw,match", [
    ({"logquant_value_groups": "row"}, "logquant_value_groups must be one of 'channel', 'token'"),
    ({"logquant_value_groups": 1}, "logquant_value_groups must be one of"),
    ({"kv_type": "q8_0", "logquant_value_groups": "token"}, "logquant_value_groups applies to the LogQuant"),
])
def test_bad_value_groups_are_refused(tiny_model, kw, match):
    with pytest.raises(ValueError, match=match):
        load(tiny_model, **kw)


def test_value_groups_names():
    assert kv_types.parse_variant("logquant+vtok") == ("logquant", {"logquant_value_groups": "token"})
    assert kv_types.parse_variant("logquant+vch+v4") == (
        "logquant", {"logquant_value_groups": "channel", "logquant_value_bits": 4})
    assert tool_env("logquant")["LOGQUANT_VALUE_GROUPS"] == "channel"
    assert tool_env("logquant+vtok")["LOGQUANT_VALUE_GROUPS"] == "token"
    assert "logquant_value_groups='token'" in str(kv_types.LogQuantBits(value_groups="token"))


@pytest.mark.skipif(tool_path("llama-perplexity") is None, reason="this build has no llama-perplexity")
def test_tools_take_value_groups(tiny_model, tmp_path):
    """llama.cpp's tools select the grouping with LOGQUANT_VALUE_GROUPS (the cache says which it
    made in the log, which the tool shows with -v)."""
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x * 3 + 1\n" * 150)
    cmd = [str(tool_path("llama-perplexity")), "-m", str(tiny_model), "-f", str(text), "-c", "256",
           "-b", "256", "--chunks", "1", "-ctk", "lq2", "-ctv", "lq2", "-fa", "on", "-t", "2", "-v"]
    for vg in ("channel", "token"):
        p = run_tool(cmd, {**tool_env("logquant"), "LOGQUANT_WINDOW": "8", "LOGQUANT_VALUE_GROUPS": vg})
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-2000:]
        assert f"values grouped per {vg}" in out, out[-2000:]
