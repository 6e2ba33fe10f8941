"""Mixed key widths (logquant_key_widths="auto", the default): each key channel of a 2-bit-key
layer gets 0, 2 or 4 bits, a mean of 2, chosen from the model's Q/K weights. The widths follow an independent
numpy prediction from the GGUF; the tier keeps its bytes; the state records them; a real model's
logits come closer to f16's; bad settings are refused. 3-bit keys (logquant_key_bits=3) are the
same allocation at a mean of 3 (0, 2 or 4 bits per channel): 3.0 bits per value with 2-bit values."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize
from test_levers import kl_to, run_logits
from test_logquant import load, saved_state_continues, tokens
from tiny_model import write_tiny_llama, write_tiny_rope_model

from logquant_gguf import Llama, kv_types
from logquant_gguf.bench.env import run_tool, tool_env, tool_path

GAUSS_MSE = {0: 1.0, 2: 0.1188, 4: 0.01154, 8: 9.0e-5}  # a unit Gaussian's coding error at b bits


@functools.lru_cache(maxsize=None)
def gguf_tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(str(path)).tensors}


@functools.lru_cache(maxsize=None)
def gguf_tensor(path, name: str) -> np.ndarray | None:
    t = gguf_tensors(path).get(name)
    if t is None:
        return None
    return dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
        tuple(int(x) for x in reversed(t.shape)))


def unit_weights(path, il: int, n_head: int, n_head_kv: int, D: int, neox: bool,
                 n_dims: int) -> tuple[list[tuple[int, int]], list[list[float]]]:
    """The RoPE pairs (channel, channel) of a head and, per kv head, each pair's weight: query
    energy x key variance predicted from the GGUF's weights (docs/levers.md)."""
    def w(name):
        return gguf_tensor(path, f"blk.{il}.{name}")

    gamma, bq = w("attn_norm.weight"), w("attn_q.bias")
    eq = ((w("attn_q.weight") * gamma) ** 2).sum(1) + (0 if bq is None else bq ** 2)
    ek = ((w("attn_k.weight") * gamma) ** 2).sum(1)
    for e, norm in ((eq, w("attn_q_norm.weight")), (ek, w("attn_k_norm.weight"))):  # (copies: eq, ek are new)
        if norm is not None:
            h = e.reshape(-1, D)
            h[:] = norm ** 2 * h / h.mean(1, keepdims=True)
    half = n_dims // 2
    units = [(u, u + half) if neox else (2 * u, 2 * u + 1) for u in range(half)]
    gq = n_head // n_head_kv
    weights = []
    for hk in range(n_head_kv):
        qe = eq.reshape(n_head_kv, gq, D)[hk].mean(0)
        weights.append([(qe[a] + qe[b_]) * (ek[hk * D + a] + ek[hk * D + b_]) for a, b_ in units])
    return units, weights


def water_fill(weight: list[float], b: int) -> tuple[list[int], float]:
    """Each unit's level (0, 1, 2: 0, step, 2 step bits) for a mean of b bits, and the predicted
    error left."""
    step = 4 if b == 4 else 2  # widths 0, step, 2 step (3-bit keys: 0, 2, 4)
    mse = [GAUSS_MSE[0], GAUSS_MSE[step], GAUSS_MSE[2 * step]]
    level = [0] * len(weight)
    for _ in range(len(weight) * b // step):  # steps of `step` bits to a mean of b
        gains = [weight[u] * (mse[lv] - mse[lv + 1]) if lv < 2 else -1.0 for u, lv in enumerate(level)]
        level[int(np.argmax(gains))] += 1
    return level, sum(wt * mse[lv] for wt, lv in zip(weight, level))


def predicted_widths(path, il: int, n_head: int, n_head_kv: int, D: int, neox: bool, n_dims: int,
                     b: int = 2) -> list[int]:
    """The allocation of docs/levers.md from the GGUF's weights, written from its description."""
    units, weights = unit_weights(path, il, n_head, n_head_kv, D, neox, n_dims)
    out = np.full((n_head_kv, D), b)
    out[:, n_dims::2], out[:, n_dims + 1::2] = (2, 4) if b == 3 else (b, b)  # past a partial RoPE
    step = 4 if b == 4 else 2
    for hk in range(n_head_kv):
        level, _ = water_fill(weights[hk], b)
        for (a, bb), lv in zip(units, level):
            out[hk, a] = out[hk, bb] = step * lv
    return out.reshape(-1).tolist()


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """A tiny llama whose Q/K channels differ in scale (as real models' do)."""
    return write_tiny_llama(tmp_path_factory.mktemp("kw") / "uneven.gguf", channel_spread=1.0, seed=5)


@pytest.fixture(scope="module")
def neox_partial(tmp_path_factory):
    """stablelm: NEOX RoPE over the first 32 of 64 channels per head."""
    return write_tiny_rope_model(tmp_path_factory.mktemp("kw") / "neox-partial.gguf", rope="neox",
                                 rope_dims=32, channel_spread=1.0, seed=3)


def check_widths(llm: Llama, path, n_head: int, n_head_kv: int, D: int, neox: bool, n_dims: int, mixed: bool,
                 b: int = 2):
    for il in range(llm.n_layer()):
        got, want = llm.key_widths(il), predicted_widths(path, il, n_head, n_head_kv, D, neox, n_dims, b)
        if not mixed:  # channels that matter alike keep b bits: the layer stays uniform
            assert got == [] and set(want) == {b}, il
            continue
        assert got == want, il
        per_head = np.array(got).reshape(n_head_kv, D)
        assert set(got) <= ({0, 2, 4} if b == 3 else {0, b, 2 * b}) and (per_head.mean(1) == b).all()
        if b != 3:
            assert set(got) == {0, b, 2 * b}
            assert (per_head[:, n_dims:] == b).all()  # past a partial RoPE: uniform


def test_widths_follow_the_weights_tiny(tiny_model, uneven, neox_partial):
    for path, neox, n_dims, mixed in ((tiny_model, False, 64, False), (uneven, False, 64, True),
                                      (neox_partial, True, 32, True)):
        llm = load(path, logquant_key_widths="auto", logquant_key_group=64)  # 2-bit keys on every layer
        check_widths(llm, path, 4, 2, 64, neox=neox, n_dims=n_dims, mixed=mixed)
        llm.close()
    llm = load(uneven)  # the default
    assert llm.key_widths(0) == llm.key_widths(0) != []
    llm.close()
    llm = load(uneven, logquant_key_widths="uniform")
    assert llm.key_widths(0) == []
    llm.close()


def test_widths_follow_repacked_weights(tmp_path):
    """Q4_0 Q/K weights, which the CPU backend repacks for its kernels (CPU_REPACK: no read-back):
    the cache reads them through the backend's own matrix product and gets the widths the GGUF's
    weights give, for 2- and 3-bit keys (before: uniform widths, with a warning)."""
    import gguf

    path = write_tiny_llama(tmp_path / "q4_0.gguf", channel_spread=1.0, seed=5,
                            qk_quant=gguf.GGMLQuantizationType.Q4_0)
    for b in (2, 3):
        llm = load(path, logquant_key_bits=b)
        check_widths(llm, path, 4, 2, 64, neox=False, n_dims=64, mixed=True, b=b)
        llm.close()


def test_widths_follow_the_weights_qwen(real_model):
    """Qwen2.5: Q5_0 weights, query biases, NEOX over the whole head of 64, 14 over 2 heads. The
    default gives half of the layers 3-bit keys (layer bits "auto", test_layer_bits_auto.py):
    each layer's widths are the allocation at its own mean."""
    llm = Llama(str(real_model), kv_type="logquant", n_ctx=512, verbose=False)
    bits = llm.layer_bits()
    assert sorted(k for k, _ in bits.values()) == [2] * 12 + [3] * 12
    for il, (kb, _) in bits.items():
        assert llm.key_widths(il) == predicted_widths(real_model, il, 14, 2, 64, True, 64, kb), il
    llm.close()
    # 4-bit keys: 0, 4 or 8 bits, a mean of 4; 8-bit keys stay uniform
    llm = Llama(str(real_model), kv_type="logquant", n_ctx=512, verbose=False, logquant_key_bits=4,
                logquant_layer_bits={0: (8, 2)})
    n_mixed = 0
    for il in range(1, llm.n_layer()):
        want = predicted_widths(real_model, il, 14, 2, 64, True, 64, 4)
        assert llm.key_widths(il) == ([] if set(want) == {4} else want), il
        n_mixed += set(want) == {0, 4, 8}
    assert llm.key_widths(0) == []
    llm.close()
    print(f"{n_mixed} of 23 layers with 4-bit keys have mixed widths")
    # 3-bit keys: 0, 2 or 4 bits at a mean of 3
    llm = Llama(str(real_model), kv_type="logquant", n_ctx=512, verbose=False, logquant_key_bits=3)
    for il in (0, 5, 23):
        assert llm.key_widths(il) == predicted_widths(real_model, il, 14, 2, 64, True, 64, 3), il
    llm.close()


def test_mixed_widths_keep_the_bytes_and_the_state(uneven):
    """Same tier bytes as uniform widths; a saved state continues as the context it was saved
    from; a state of uniform widths is refused by a mixed cache and the other way round."""
    tiny_model = uneven
    seq = None
    sizes = {}
    for kw in ("uniform", "auto"):
        llm = load(tiny_model, logquant_key_widths=kw, logquant_key_group=64)
        seq = seq or tokens(llm, 300, seed=4)
        llm.eval(seq)
        sizes[kw] = llm.kv_stats()["tiers"]["q2"]["bytes"] - (llm.n_layer() * 128 if kw == "auto" else 0)
        llm.close()
    assert sizes["auto"] == sizes["uniform"]  # the same tier, plus 128 bytes of widths per layer

    state = saved_state_continues(tiny_model, logquant_key_group=64)
    with pytest.raises(ValueError, match="logquant_key_widths='uniform'"):
        load(tiny_model, logquant_key_widths="uniform").load_state(state)
    # below the Python check, the cache itself refuses a state whose keys it would misread
    uniform = load(tiny_model, logquant_key_widths="uniform")
    with pytest.raises(RuntimeError):
        Llama.__mro__[1].load_state(uniform, state)
    uniform.close()


def test_mixed_widths_come_closer_to_f16_on_qwen(real_model):
    """Measured end to end in docs/levers.md; here a short check: 1600 tokens of code, KL of the
    logits of the last 400 against f16's (uniform 0.130, mixed 0.086 when written; 0.063 with
    values per channel, and 3-bit keys at 3.0 bits 0.032)."""
    from logquant_gguf.bench import corpus

    probe = Llama(str(real_model), n_ctx=256, verbose=False)
    seq, _ = corpus.token_stream(lambda s: probe.tokenize(s.encode(), add_bos=False), "code", 1600)
    probe.close()
    kw = {"n_ctx": 2048, "flash_attn": True, "logquant_window": 32}
    ref = run_logits(real_model, seq, "f16", n_ctx=2048, flash_attn=True)[1200:]
    uniform = kl_to(ref, run_logits(real_model, seq, logquant_key_widths="uniform", **kw)[1200:])
    mixed = kl_to(ref, run_logits(real_model, seq, **kw)[1200:])
    k3 = kl_to(ref, run_logits(real_model, seq, logquant_key_bits=3, **kw)[1200:])
    print(f"KL uniform {uniform:.4f}, mixed {mixed:.4f}, 3-bit keys {k3:.4f}")
    assert mixed < 0.85 * uniform
    assert k3 < 0.85 * mixed


@pytest.mark.parametrize("kw,match", [
    ({"logquant_key_widths": "mixed"}, "logquant_key_widths must be one of 'auto', 'uniform'"),
    ({"logquant_key_widths": True}, "logquant_key_widths must be one of"),
    ({"logquant_key_widths": "auto", "logquant_keys_post_rope": True}, "needs keys grouped before RoPE"),
])
def test_bad_key_widths_are_refused(tiny_model, kw, match):
    with pytest.raises(ValueError, match=match):
        load(tiny_model, **kw)


def test_key_widths_names():
    assert kv_types.parse_variant("logquant+kw") == ("logquant", {"logquant_key_widths": "auto"})
    assert kv_types.parse_variant("logquant+uniform") == ("logquant", {"logquant_key_widths": "uniform"})
    assert tool_env("logquant")["LOGQUANT_KEY_WIDTHS"] == "auto"
    assert tool_env("logquant+uniform")["LOGQUANT_KEY_WIDTHS"] == "uniform"
    assert tool_env("logquant+postrope")["LOGQUANT_KEY_WIDTHS"] == "uniform"
    post = kv_types.check_bits(kv_types.get("logquant"), None, None, None, keys_post_rope=True)
    assert post.key_widths == "uniform"
    with pytest.raises(ValueError, match="logquant_key_widths applies to the LogQuant kv_types"):
        kv_types.check_bits(kv_types.get("f16"), None, None, None, key_widths="auto")


@pytest.mark.skipif(tool_path("llama-perplexity") is None, reason="this build has no llama-perplexity")
def test_tools_take_mixed_widths(uneven, tmp_path):
    """llama.cpp's tools first size a context on a model whose weights are not loaded (a memory
    estimate): the widths then fall back to uniform instead of reading unallocated weights, and
    the real context gets mixed ones (LOGQUANT_KEY_WIDTHS, the default) or uniform ones."""
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x\n" * 200)
    cmd = [str(tool_path("llama-perplexity")), "-m", str(uneven), "-f", str(text), "-c", "128", "-b", "128",
           "--chunks", "1", "-ctk", "lq2", "-ctv", "lq2", "-fa", "on", "-t", "2"]
    ppl = {}
    for kw in ("auto", "uniform"):
        p = run_tool(cmd, {**tool_env("logquant"), "LOGQUANT_WINDOW": "8", "LOGQUANT_KEY_WIDTHS": kw})
        assert p.returncode == 0, (p.stdout + p.stderr)[-2000:]
        ppl[kw] = p.stdout + p.stderr
    assert "tensor not allocated" not in ppl["auto"]


def test_three_bit_keys_follow_the_weights(uneven, neox_partial):
    """logquant_key_bits=3: 0, 2 or 4 bits per channel at a mean of exactly 3 per kv head (past a
    partial RoPE alternately 2 and 4), as the numpy prediction; 3.0 bits per value with 2-bit
    values; a saved state continues."""
    for path, neox, n_dims in ((uneven, False, 64), (neox_partial, True, 32)):
        llm = load(path, logquant_key_bits=3)
        for il in range(llm.n_layer()):
            got = llm.key_widths(il)
            assert got == predicted_widths(path, il, 4, 2, 64, neox, n_dims, 3), il
            per_head = np.array(got).reshape(2, 64)
            assert set(got) <= {0, 2, 4} and (per_head.mean(1) == 3).all()
        llm.eval(tokens(llm, 300, seed=4))
        assert llm.kv_stats()["bits_per_value"] == pytest.approx(3.0, abs=0.02)
        llm.close()
    state = saved_state_continues(uneven, logquant_key_bits=3)
    with pytest.raises(ValueError, match="logquant_key_bits=3"):  # a state of 3-bit keys is theirs alone
        load(uneven).load_state(state)


@pytest.mark.parametrize("kw,match", [
    ({"logquant_key_bits": 3, "logquant_key_widths": "uniform"}, "3-bit keys are mixed key widths"),
    ({"logquant_key_bits": 3, "logquant_keys_post_rope": True}, "3-bit keys are mixed key widths"),
    ({"logquant_layer_bits": {1: (3, 2)}, "logquant_key_widths": "uniform"},
     "3-bit keys are mixed key widths"),
    ({"logquant_value_bits": 3}, "logquant_value_bits must be one of 2, 4, 8"),
    ({"logquant_key_bits": 5}, "logquant_key_bits must be one of 2, 3, 4, 8"),
])
def test_bad_three_bit_keys_are_refused(tiny_model, kw, match):
    with pytest.raises(ValueError, match=match):
        load(tiny_model, **kw)


@pytest.mark.skipif(tool_path("llama-perplexity") is None, reason="this build has no llama-perplexity")
def test_tools_take_three_bit_keys(uneven, tmp_path):
    """Through llama.cpp's tool: LOGQUANT_KEY_BITS=3 runs (its first, unloaded sizing context
    takes the widths by RoPE frequency, the same bytes); with uniform widths the cache itself
    refuses and the tool fails saying why (patch 0016: llama.cpp's logger writes what it holds
    at exit, llama.cpp issue 22142)."""
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x\n" * 200)
    cmd = [str(tool_path("llama-perplexity")), "-m", str(uneven), "-f", str(text), "-c", "128", "-b", "128",
           "--chunks", "1", "-ctk", "lq2", "-ctv", "lq2", "-fa", "on", "-t", "2"]
    env = {**tool_env("logquant"), "LOGQUANT_WINDOW": "8", "LOGQUANT_KEY_BITS": "3"}
    p = run_tool(cmd + ["-v"], env)  # (-v: the cache's log line)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-2000:]
    assert "bits K 3 V 2" in out, out[-2000:]  # written at the context's creation, long before the exit
    p = run_tool(cmd, {**env, "LOGQUANT_KEY_WIDTHS": "uniform"})
    assert p.returncode != 0 and "3-bit keys are mixed key widths" in p.stdout + p.stderr, p.stderr[-2000:]
