"""The precision levers of the LogQuant cache: code bits of keys and values (2, 4, 8), for every
layer or per layer. Tiny random-weight models: bytes, quality order, state, bad settings."""

from __future__ import annotations

import numpy as np
import pytest
from test_logquant import W, last_logits, load, tokens

from logquant_gguf import kv_types
from logquant_gguf.bench.env import tool_env

N = 300  # tokens: most of them in the low-bit tier (the f16 tier holds at most 3W = 24)


def run_logits(path, seq, kv_type="logquant", **kw) -> np.ndarray:
    llm = load(path, kv_type, **kw)
    llm.eval(seq)
    out = np.array(llm.scores[: len(seq)], dtype=np.float64)
    llm.close()
    return out


def kl_to(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean KL(ref || got) of the next-token distributions over the rows past the f16 tier."""
    def logp(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    r, g = logp(ref[3 * W:]), logp(got[3 * W:])
    return float((np.exp(r) * (r - g)).sum(-1).mean())


def test_more_bits_give_logits_closer_to_f16(tiny_model):
    """Each lever must buy quality: 4-bit keys beat 2-bit, 4/4 beats 4-bit keys alone, 8/8 beats
    4/4 by far and beats llama.cpp's q8_0 at the same 8.5 bits per value. (This random model's
    attention is sharp: every cache's KL is large here, q8_0's included.)"""
    probe = load(tiny_model, "f16")
    seq = tokens(probe, N, seed=11)
    probe.close()
    ref = run_logits(tiny_model, seq, "f16")
    kl = {name: kl_to(ref, run_logits(tiny_model, seq, **kw)) for name, kw in {
        "2/2": {},
        "k4": {"logquant_key_bits": 4},
        "4/4": {"logquant_key_bits": 4, "logquant_value_bits": 4},
        "8/8": {"logquant_key_bits": 8, "logquant_value_bits": 8},
        "L0 8/8": {"logquant_layer_bits": {0: (8, 8)}},
    }.items()}
    kl["q8_0"] = kl_to(ref, run_logits(tiny_model, seq, "q8_0"))
    print({k: f"{v:.2e}" for k, v in kl.items()})
    assert kl["k4"] < kl["2/2"]
    assert kl["4/4"] < kl["k4"]
    assert kl["8/8"] < kl["4/4"] / 10
    assert kl["L0 8/8"] < kl["2/2"]  # one of two layers near-lossless: a partial gain
    assert kl["8/8"] < kl["q8_0"]


def test_low_bit_tier_bytes_follow_the_code_bits(tiny_model):
    """Per token the tier stores, per key or value of 64 codes, 4 bytes of scale/min plus 8*b:
    20 bytes at 2 bits, 68 at 8 bits. A layer override changes only that layer's share."""
    def q2_bytes(**kw) -> int:
        llm = load(tiny_model, **kw)
        q2 = llm.kv_stats()["tiers"]["q2"]
        llm.close()
        # host memory, the staging and the cos/sin table do not depend on the bits
        return q2["bytes"] - q2["host_bytes"] - q2["aux_bytes"]
    base = q2_bytes(logquant_key_bits=2)  # 2-bit keys everywhere, groups of 64 (not the default format)
    assert q2_bytes(logquant_key_bits=8, logquant_value_bits=8) == pytest.approx(base * 68 / 20, rel=1e-6)
    assert q2_bytes(logquant_key_bits=4) == pytest.approx(base * (36 + 20) / 40, rel=1e-6)
    # the tiny model has 2 layers of equal size: only layer 1's half grows, by 68 / 20
    assert q2_bytes(logquant_layer_bits={1: (8, 8)}) == pytest.approx(base * (1 + 68 / 20) / 2, rel=1e-6)


@pytest.mark.parametrize("kw,ratio", [({"logquant_key_group": 32}, (3.0 + 3.0) / 5.0),
                                      ({"logquant_key_group": 128}, (2.25 + 2.25) / 5.0),
                                      ({"logquant_key_group": 32, "logquant_value_groups": "token"},
                                       (3.0 + 2.5) / 5.0),
                                      ({"logquant_keys_post_rope": True}, 1.0)])
def test_key_layouts_of_the_format_study(tiny_model, kw, ratio):
    """The format study's key layouts run end to end; their storage follows 2 + 32/G bits per key,
    and per value too when values are grouped per channel, as the keys (the default), or 2.5 bits
    per value grouped per token (per value, scales included: the tier's slot count rounds up to
    whole groups, so compare per value, not totals)."""
    base = load(tiny_model)
    base_bits = base.kv_stats()["bits_per_value"]
    assert base_bits == pytest.approx(2.5)
    seq = tokens(base, 200, seed=4)
    base.eval(seq)
    base_logits = last_logits(base)
    base.close()
    llm = load(tiny_model, **kw)
    assert llm.kv_stats()["bits_per_value"] == pytest.approx(base_bits * ratio, rel=1e-6)
    # host memory per 2-bit slot, counted in the tier's bytes: bookkeeping only (position 4,
    # sequences 8, sorted position 4 bytes); the cos/sin table has no host copy
    q2 = llm.kv_stats()["tiers"]["q2"]
    per_slot = 16
    slots = (1024, 1024 + 512 + 2 * 128)  # the context, plus one ubatch and two groups at most
    assert slots[0] * per_slot * 0.75 <= q2["host_bytes"] <= slots[1] * per_slot
    # and the 2-bit tensors hold whole groups of those slots at exactly that storage per value
    # (2 layers x 2 KV heads x (64 + 64) values per token on the tiny model)
    n_slots = (q2["bytes"] - q2["host_bytes"] - q2["aux_bytes"]) * 8 / (llm.kv_stats()["bits_per_value"] * 512)
    group = kw.get("logquant_key_group", 64)
    assert n_slots == int(n_slots) and n_slots % group == 0 and slots[0] <= n_slots <= slots[1]
    # beside the stores, in the KV buffers: per layer one f16 staging row of G x 128 key values
    # and as many values when they are grouped per channel (one sequence: one partial group at a
    # time), and one f16 cos/sin table of head_dim values per slot for pre-RoPE keys, shared by
    # the layers
    table = 0 if kw.get("logquant_keys_post_rope") else n_slots * 64 * 2
    staged = 128 * (1 if kw.get("logquant_value_groups") == "token" else 2)
    assert q2["aux_bytes"] == 2 * group * staged * 2 + table
    llm.eval(seq)
    logits = last_logits(llm)
    assert np.isfinite(logits).all()
    assert not np.array_equal(logits, base_logits)  # another format: other roundings
    state = llm.save_state()
    with pytest.raises(ValueError, match="logquant_key"):
        load(tiny_model).load_state(state)


def test_kv_stats_report_the_bits(tiny_model):
    llm = load(tiny_model, logquant_layer_bits={0: (8, 8)})
    st = llm.kv_stats()
    assert st["logquant_bits"] == {"key_bits": 2, "value_bits": 2, "layer_bits": {"0": [8, 8]},
                                   "key_group": 64, "keys_post_rope": False, "fit": True,
                                   "score_correction": False, "key_widths": "auto", "value_groups": "channel",
                                   "scale_bits": 16}
    assert st["bits_per_value"] == pytest.approx((8.5 + 2.5) / 2)  # 2 layers: one at 8.5, one at 2.5


def test_state_round_trip_with_levers(tiny_model):
    kw = {"logquant_key_bits": 4, "logquant_layer_bits": {1: (8, 4)}}
    llm = load(tiny_model, **kw)
    llm.eval(tokens(llm, 150))
    state = llm.save_state()
    more = tokens(llm, 20, seed=9)
    llm.eval(more)
    expected = last_logits(llm)
    other = load(tiny_model, **kw)
    other.load_state(state)
    other.eval(more)
    np.testing.assert_array_equal(last_logits(other), expected)
    with pytest.raises(ValueError, match="logquant_key_bits=4"):
        load(tiny_model).load_state(state)


@pytest.mark.parametrize("kw,match", [
    ({"logquant_key_bits": 6}, "logquant_key_bits must be one of 2, 3, 4, 8"),
    ({"logquant_value_bits": 16}, "logquant_value_bits must be one of"),
    ({"logquant_key_bits": True}, "logquant_key_bits must be one of"),
    ({"logquant_layer_bits": [(0, 8, 8)]}, "must be .auto. or a dict"),
    ({"logquant_layer_bits": {-1: (8, 8)}}, "layer must be an integer >= 0"),
    ({"logquant_layer_bits": {0: 8}}, r"must be \(key_bits, value_bits\)"),
    ({"logquant_layer_bits": {0: (8, 3)}}, "value bits must be one of"),
    ({"logquant_layer_bits": {2: (8, 8)}}, r"names layer\(s\) \[2\], but this model has 2 layers"),
    ({"logquant_key_group": 48}, "logquant_key_group must be one of 32, 64, 128"),
    ({"logquant_keys_post_rope": 1}, "must be True or False"),
    ({"logquant_fit": "yes"}, "logquant_fit must be True or False"),
    ({"logquant_score_correction": 1}, "logquant_score_correction must be True or False"),
])
def test_bad_bits_are_refused(tiny_model, kw, match):
    with pytest.raises(ValueError, match=match):
        load(tiny_model, **kw)
    load(tiny_model).close()  # and nothing is left behind: the next context is a default one


def test_bits_on_a_llama_cpp_type_are_refused(tiny_model):
    with pytest.raises(ValueError, match="logquant_key_bits applies to the LogQuant kv_types"):
        load(tiny_model, "q8_0", logquant_key_bits=4)


@pytest.mark.parametrize("name,want", [
    ("logquant", ("logquant", {})),
    ("logquant+k4", ("logquant", {"logquant_key_bits": 4})),
    ("logquant+k3", ("logquant", {"logquant_key_bits": 3})),
    ("q2_window+k4v8", ("q2_window", {"logquant_key_bits": 4, "logquant_value_bits": 8})),
    ("logquant+v4", ("logquant", {"logquant_value_bits": 4})),
    ("logquant+g128+postrope", ("logquant", {"logquant_key_group": 128, "logquant_keys_post_rope": True})),
    ("q2_0+norot", ("q2_0", {"attn_rotation": False})),
    ("f16+swa", ("f16", {"swa_full": False})),
    ("logquant+k4+L0:8:8+L3:4:2", ("logquant", {"logquant_key_bits": 4,
                                             "logquant_layer_bits": {0: (8, 8), 3: (4, 2)}})),
    ("logquant+minmax+bc", ("logquant", {"logquant_fit": False, "logquant_score_correction": True})),
    ("logquant+fit", ("logquant", {"logquant_fit": True})),
    ("q2_window+w64+k4", ("q2_window", {"logquant_window": 64, "logquant_key_bits": 4})),
])
def test_variant_names(name, want):
    assert kv_types.parse_variant(name) == want


@pytest.mark.parametrize("name", ["logquant+k5", "logquant+k3+uniform", "logquant+x", "f16+k4",
                                  "logquant+L0:8", "nope+k4",
                                  "logquant+L0:8:8,1:8:8",
                                  "logquant+g48", "logquant+k3+g48", "q8_0+w64", "logquant+s4"])
def test_bad_variant_names(name):
    with pytest.raises(ValueError):
        kv_types.parse_variant(name)


def test_code_settings_reach_the_cache_and_fit_is_closer(tiny_model):
    """The code levers at no memory cost: least-squares scales (the default) give logits closer
    to f16 than min/max scales over the 2-bit tier, at the same bytes; the score correction is
    applied (it changes the logits) and is off by default; the env variables the tools use
    name the same settings."""
    probe = load(tiny_model, "f16")
    seq = tokens(probe, N, seed=5)
    probe.close()
    ref = run_logits(tiny_model, seq, "f16")
    default = run_logits(tiny_model, seq)
    fit = run_logits(tiny_model, seq, logquant_fit=True)
    minmax = run_logits(tiny_model, seq, logquant_fit=False)
    corrected = run_logits(tiny_model, seq, logquant_score_correction=True)
    assert np.array_equal(default, fit)
    assert not np.array_equal(fit, minmax) and not np.array_equal(default, corrected)
    kl_fit, kl_minmax = kl_to(ref, fit), kl_to(ref, minmax)
    print(f"KL fit {kl_fit:.3e}, min/max {kl_minmax:.3e}, corrected {kl_to(ref, corrected):.3e}")
    assert kl_fit < kl_minmax
    sizes = []
    for fit_on in (True, False):
        llm = load(tiny_model, logquant_fit=fit_on)
        llm.eval(seq)
        sizes.append(llm.kv_stats()["tiers"]["q2"]["bytes"])
        llm.close()
    assert sizes[0] == sizes[1]
    assert tool_env("logquant")["LOGQUANT_FIT"] == "1"
    assert tool_env("logquant+minmax+bc")["LOGQUANT_FIT"] == "0"
    assert tool_env("logquant+minmax+bc")["LOGQUANT_SCORE_CORRECTION"] == "1"


def test_rotation_off_changes_a_quantized_cache_only(tiny_model):
    """attn_rotation=False (llama.cpp's LLAMA_ATTN_ROT_DISABLE) reaches the q4_0 cache, and the
    environment is left as it was."""
    import os
    seq = None
    out = {}
    for kv, rot in (("q4_0", True), ("q4_0", False), ("f16", True), ("f16", False)):
        llm = load(tiny_model, kv, attn_rotation=rot)
        seq = seq or tokens(llm, 80, seed=5)
        llm.eval(seq)
        out[kv, rot] = last_logits(llm)
        llm.close()
    assert "LLAMA_ATTN_ROT_DISABLE" not in os.environ
    assert not np.array_equal(out["q4_0", True], out["q4_0", False])
    np.testing.assert_array_equal(out["f16", True], out["f16", False])
