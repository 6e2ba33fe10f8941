"""Layer bits "auto" and the default format: key groups of 128, whose quarter bit pays for 3-bit
keys on the half of the layers of 2-bit keys whose Q/K weights predict the most gain from them
(native/llama/logquant-key-widths.cpp). The layers follow an independent numpy prediction from the
GGUF; the default is 2.5 bits per value; asking for other bits leaves the default format; bad
combinations are refused; the state records the choice; llama.cpp's tools pick the same layers."""

from __future__ import annotations

import pytest
from test_key_widths import unit_weights, water_fill
from test_logquant import load, saved_state_continues
from tiny_model import write_tiny_llama

from logquant_gguf import Llama, kv_types
from logquant_gguf.bench.env import run_tool, tool_env, tool_path


def predicted_gain(path, il: int, n_head: int, n_head_kv: int, D: int, neox: bool) -> float:
    """What 3-bit keys buy in layer il: the water-filling's error at a mean of 2 bits minus that
    at 3, summed over the kv heads (docs/levers.md), from the GGUF's weights."""
    _, weights = unit_weights(path, il, n_head, n_head_kv, D, neox, D)
    return sum(water_fill(w, 2)[1] - water_fill(w, 3)[1] for w in weights)


def predicted_layers(path, layers, n_head, n_head_kv, D, neox) -> list[int]:
    gains = {il: predicted_gain(path, il, n_head, n_head_kv, D, neox) for il in layers}
    ranked = sorted(layers, key=lambda il: -gains[il])
    picked, rest = ranked[: len(layers) // 2], ranked[len(layers) // 2:]
    # the prediction must separate the halves, or this test could pass by accident
    assert min(gains[il] for il in picked) > 1.01 * max(gains[il] for il in rest), gains
    return sorted(picked)


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    """A tiny llama of six layers whose Q/K channels differ in scale, layer by layer."""
    return write_tiny_llama(tmp_path_factory.mktemp("auto") / "six.gguf", n_layer=6, channel_spread=1.0, seed=7)


def three_bit_layers(llm: Llama) -> list[int]:
    return sorted(il for il, (k, _) in llm.layer_bits().items() if k == 3)


def test_default_format_picks_the_predicted_layers(six_layers):
    llm = load(six_layers)
    assert llm.logquant_bits.layers_auto and llm.logquant_bits.key_group == 128
    want = predicted_layers(six_layers, range(6), 4, 2, 64, neox=False)
    assert three_bit_layers(llm) == want
    assert all(v == 2 for _, v in llm.layer_bits().values())
    # 3 layers at 3.25 bits per key and 3 at 2.25 (groups of 128), values 2.25: 2.5 bits per value
    assert llm.kv_stats()["bits_per_value"] == pytest.approx(2.5)
    llm.close()
    # the explicit spelling is the same format, and the default key widths keep it
    for kw in ({"logquant_layer_bits": "auto", "logquant_key_group": 128}, {"logquant_key_widths": "auto"},
               {"logquant_value_groups": "channel", "logquant_scale_bits": 16}):
        same = load(six_layers, **kw)
        assert same.logquant_bits == kv_types.LogQuantBits() and three_bit_layers(same) == want, kw
        same.close()


def test_asking_for_bits_leaves_the_default_format(six_layers):
    """Code bits, layer bits, a key group or the key layout asked for: groups of 64 and only the
    layers asked for (the format the measured settings of docs/levers.md have)."""
    for kw, layers3 in (({"logquant_key_bits": 2}, []), ({"logquant_layer_bits": {1: (3, 2)}}, [1]),
                        ({"logquant_key_group": 64}, []), ({"logquant_key_widths": "uniform"}, []),
                        ({"logquant_value_bits": 4}, [])):
        llm = load(six_layers, **kw)
        assert not llm.logquant_bits.layers_auto and three_bit_layers(llm) == layers3, kw
        assert llm.logquant_bits.key_group == 64, kw
        llm.close()
    # "auto" with a group asked for: both
    llm = load(six_layers, logquant_layer_bits="auto", logquant_key_group=64)
    assert three_bit_layers(llm) == predicted_layers(six_layers, range(6), 4, 2, 64, neox=False)
    assert llm.kv_stats()["bits_per_value"] == pytest.approx((3.0 + 2.5) / 2)  # keys 2.5 and 3.5, values 2.5
    llm.close()


def test_auto_is_refused_where_it_cannot_apply(six_layers):
    with pytest.raises(ValueError, match="logquant_key_bits is 4"):
        load(six_layers, logquant_layer_bits="auto", logquant_key_bits=4)
    with pytest.raises(ValueError, match="mixed key widths"):
        load(six_layers, logquant_layer_bits="auto", logquant_key_widths="uniform")
    with pytest.raises(ValueError, match="mixed key widths"):
        load(six_layers, logquant_layer_bits="auto", logquant_keys_post_rope=True)
    with pytest.raises(ValueError, match="'auto' or a dict"):
        load(six_layers, logquant_layer_bits="all")
    with pytest.raises(ValueError, match="Lauto picks the layers"):
        kv_types.parse_variant("logquant+Lauto+L0:8:8")
    assert kv_types.parse_variant("logquant+Lauto+g64") == (
        "logquant", {"logquant_layer_bits": "auto", "logquant_key_group": 64})


def test_state_records_the_layers(six_layers):
    """A default context's state continues as the context it was saved from, and a context of
    other layer bits refuses it."""
    state = saved_state_continues(six_layers)
    with pytest.raises(ValueError, match="logquant_layer_bits|logquant_key_group"):
        load(six_layers, logquant_key_group=64).load_state(state)


@pytest.mark.skipif(tool_path("llama-perplexity") is None, reason="this build has no llama-perplexity")
def test_llama_cpp_tools_pick_the_same_layers(six_layers, tmp_path):
    """llama.cpp's tools: LOGQUANT_* as the bench sets them for the default, and no env at all
    (the C++ defaults are the default format), both log the predicted layers."""
    want = " ".join(str(il) for il in predicted_layers(six_layers, range(6), 4, 2, 64, neox=False))
    env = tool_env("logquant")
    assert env["LOGQUANT_LAYER_BITS"] == "auto" and env["LOGQUANT_KEY_GROUP"] == "128"
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x\n" * 200)
    cmd = [str(tool_path("llama-perplexity")), "-m", str(six_layers), "-f", str(text), "-c", "128", "-b", "128",
           "--chunks", "1", "-ctk", "lq2", "-ctv", "lq2", "-fa", "on", "-v"]  # -v: the library's info lines
    line = f"3-bit keys for layer(s) {want}\n"
    for e in (env, {}):
        out = next((p for p in (run_tool(cmd, e) for _ in range(8)) if line in p.stdout + p.stderr), None)
        assert out is not None, e  # the pinned llama.cpp's logger loses lines in some runs: a few tries


def test_command_line_takes_auto(capsys):
    import argparse

    from logquant_gguf import _args

    p = argparse.ArgumentParser()
    _args.add_model_args(p)
    assert _args.model_kwargs(p.parse_args(["--layer-bits", "auto"]))["logquant_layer_bits"] == "auto"
    assert _args.model_kwargs(p.parse_args(["--layer-bits", "0:8:8"]))["logquant_layer_bits"] == {0: (8, 8)}
    with pytest.raises(SystemExit):
        p.parse_args(["--layer-bits", "automatic"])
    assert "expected layer:key_bits:value_bits" in capsys.readouterr().err
