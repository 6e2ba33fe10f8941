"""The KV cache types this build offers, one table row each.

A row says which ggml types hold keys and values and whether flash attention is required
(llama.cpp stores V transposed without flash attention, which a quantized V cannot be).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# ggml type ids (ggml/include/ggml.h of the pinned llama.cpp).
GGML_TYPE_F16 = 1
GGML_TYPE_Q4_0 = 2
GGML_TYPE_Q8_0 = 8
GGML_TYPE_Q2_0 = 42
GGML_TYPE_LQ2 = 43  # added by patches/0002: selects the LogQuant cache

# LogQuant policies (native/llama/logquant-cache.h)
POLICY_LOG = 0
POLICY_WINDOW = 1
DEFAULT_WINDOW = 32


@dataclass(frozen=True)
class KVType:
    name: str
    type_k: int
    type_v: int
    bits_per_value: float  # storage including block scales (LogQuant: of its 2-bit tier)
    description: str
    policy: Optional[int] = None  # LogQuant types only: which tokens stay f16

    @property
    def is_logquant(self) -> bool:
        return self.policy is not None

    @property
    def needs_flash_attn(self) -> bool:
        return self.type_v != GGML_TYPE_F16


KV_TYPES: dict[str, KVType] = {
    t.name: t
    for t in (
        KVType("f16", GGML_TYPE_F16, GGML_TYPE_F16, 16.0, "llama.cpp's default f16 cache"),
        KVType("q8_0", GGML_TYPE_Q8_0, GGML_TYPE_Q8_0, 8.5, "llama.cpp q8_0 keys and values"),
        KVType("q4_0", GGML_TYPE_Q4_0, GGML_TYPE_Q4_0, 4.5,
               "llama.cpp q4_0 keys and values (with its Hadamard rotation)"),
        KVType("q2_0", GGML_TYPE_Q2_0, GGML_TYPE_Q2_0, 2.25,
               "llama.cpp's symmetric 2-bit type, a naive 2-bit baseline"),
        KVType("logquant", GGML_TYPE_LQ2, GGML_TYPE_LQ2, 2.5,
               "LogQuant: f16 for the newest W..2W and W log-spaced older tokens, 2-bit for the "
               "rest (keys and values grouped per channel of 128 tokens, keys before RoPE, 3-bit "
               "keys on the half of the layers the weights pick)", POLICY_LOG),
        KVType("q2_window", GGML_TYPE_LQ2, GGML_TYPE_LQ2, 2.5,
               "the same 2-bit tier with only the newest 3W tokens in f16 (the paper's baseline)",
               POLICY_WINDOW),
    )
}

DEFAULT_KV_TYPE = "f16"


def get(name: str) -> KVType:
    try:
        return KV_TYPES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown kv_type {name!r}; valid kv_types: {', '.join(KV_TYPES)}") from None


CODE_BITS = (2, 4, 8)
# keys may also have 3 bits: mixed key widths only (0, 2 or 4 bits per channel at a mean of 3,
# chosen from the weights; there are no 3-bit codes), a 3.0-bits/value point beside 2-bit values
KEY_CODE_BITS = (2, 3, 4, 8)


KEY_GROUPS = (32, 64, 128)
# Tokens per key group: 128 in the default format, 64 as soon as code bits, layer bits, a group or
# a layout of before are asked for (check_bits; the group the measured settings of docs/levers.md have)
DEFAULT_KEY_GROUP = 128
ASKED_KEY_GROUP = 64
# logquant_layer_bits="auto": 3-bit keys for the half of the layers of 2-bit keys whose Q/K weights
# predict the most gain from them (native/llama/logquant-key-widths.cpp)
LAYER_BITS_AUTO = "auto"
KEY_WIDTHS = ("auto", "uniform")
VALUE_GROUPS = ("channel", "token")
SCALE_BITS = (16, 8)  # bits of a block's scale and of its minimum: f16, or 8 relative to per-channel references


@dataclass(frozen=True)
class LogQuantBits:
    """The low-bit tier's format: code bits of every layer and per-layer overrides (the precision
    levers), the key layout knobs of the format study (group size, before/after RoPE), and how
    codes are made and read at no memory cost: fitted scales (fit) and the score correction."""

    key: int = 2
    value: int = 2
    layers: tuple[tuple[int, int, int], ...] = ()  # (layer, key bits, value bits), sorted
    # the default format: key groups of 128, whose quarter bit pays for 3-bit keys on the half of
    # the layers the weights pick (layer bits "auto"), 2.5 bits per value (check_bits)
    layers_auto: bool = True
    key_group: int = DEFAULT_KEY_GROUP
    keys_post_rope: bool = False
    fit: bool = True  # least-squares scales (docs/levers.md); False: min/max, the format before
    score_correction: bool = False
    key_widths: str = "auto"  # 0, b or 2b bits per key channel (b-bit keys) from the weights; or "uniform"
    value_groups: str = "channel"  # a scale per channel of a key group's tokens; or "token" (per token)
    scale_bits: int = 16  # f16 scales and minimums; 8: a byte each (docs/levers.md)

    @property
    def is_default(self) -> bool:
        return self == LogQuantBits()

    def layer_dict(self) -> dict[int, tuple[int, int]]:
        return {il: (k, v) for il, k, v in self.layers}

    def layer_arg(self) -> dict[int, tuple[int, int]] | str:
        """What logquant_layer_bits was: "auto" or the overrides."""
        return LAYER_BITS_AUTO if self.layers_auto else self.layer_dict()

    def as_dict(self) -> dict:
        return {"key_bits": self.key, "value_bits": self.value,
                "layer_bits": (LAYER_BITS_AUTO if self.layers_auto
                               else {str(il): [k, v] for il, k, v in self.layers}),
                "key_group": self.key_group, "keys_post_rope": self.keys_post_rope,
                "fit": self.fit, "score_correction": self.score_correction, "key_widths": self.key_widths,
                "value_groups": self.value_groups, "scale_bits": self.scale_bits}

    def __str__(self) -> str:
        s = f"logquant_key_bits={self.key}, logquant_value_bits={self.value}"
        s += f", logquant_layer_bits={self.layer_arg()!r}" if self.layers or self.layers_auto else ""
        s += f", logquant_key_group={self.key_group}"
        s += ", logquant_keys_post_rope=True" if self.keys_post_rope else ""
        s += ", logquant_fit=False" if not self.fit else ""
        s += ", logquant_score_correction=True" if self.score_correction else ""
        s += f", logquant_key_widths={self.key_widths!r}" if self.key_widths != "auto" else ""
        s += f", logquant_value_groups={self.value_groups!r}" if self.value_groups != "channel" else ""
        s += f", logquant_scale_bits={self.scale_bits}" if self.scale_bits != 16 else ""
        return s


def _check_code_bits(name: str, b: object, allowed: tuple[int, ...] = CODE_BITS) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or b not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {b!r}")
    return b


def check_bits(spec: KVType, key_bits: int | None, value_bits: int | None,
               layer_bits: dict[int, tuple[int, int]] | str | None, key_group: int | None = None,
               keys_post_rope: bool | None = None, fit: bool | None = None,
               score_correction: bool | None = None, key_widths: str | None = None,
               value_groups: str | None = None, scale_bits: int | None = None) -> LogQuantBits | None:
    """The LogQuant format settings, validated; None for a kv_type without a low-bit tier."""
    flags = (("logquant_keys_post_rope", keys_post_rope), ("logquant_fit", fit),
             ("logquant_score_correction", score_correction))
    given = [n for n, v in (("logquant_key_bits", key_bits), ("logquant_value_bits", value_bits),
                            ("logquant_layer_bits", layer_bits), ("logquant_key_group", key_group),
                            *flags, ("logquant_key_widths", key_widths),
                            ("logquant_value_groups", value_groups),
                            ("logquant_scale_bits", scale_bits)) if v is not None]
    if not spec.is_logquant:
        if given:
            raise ValueError(f"{given[0]} applies to the LogQuant kv_types, not to kv_type={spec.name!r}")
        return None
    k = _check_code_bits("logquant_key_bits", 2 if key_bits is None else key_bits, KEY_CODE_BITS)
    v = _check_code_bits("logquant_value_bits", 2 if value_bits is None else value_bits)
    # The default format when none of the code bits, the key group or a layout of before (uniform
    # widths, keys after RoPE, values per token) is asked for; asking for any gives groups of 64
    # and only the layer bits asked for (the settings docs/levers.md measured so)
    preset = (key_bits is None and value_bits is None and layer_bits is None and key_group is None
              and key_widths in (None, "auto") and not keys_post_rope and value_groups in (None, "channel"))
    layers = []
    auto = layer_bits == LAYER_BITS_AUTO or preset
    if auto and k != 2:
        raise ValueError("logquant_layer_bits='auto' gives 3-bit keys to some layers of 2-bit keys; "
                         f"logquant_key_bits is {k}")
    if auto and (key_widths == "uniform" or keys_post_rope):
        raise ValueError("logquant_layer_bits='auto' gives layers 3-bit keys, mixed key widths, which need "
                         "logquant_key_widths='auto' and keys grouped before RoPE")
    if layer_bits is not None and not auto:
        if not isinstance(layer_bits, dict):
            raise ValueError("logquant_layer_bits must be 'auto' or a dict {layer: (key_bits, value_bits)}, "
                             f"got {layer_bits!r}")
        for il, kv in sorted(layer_bits.items(), key=lambda item: str(item[0])):
            if isinstance(il, bool) or not isinstance(il, int) or il < 0:
                raise ValueError(f"logquant_layer_bits: layer must be an integer >= 0, got {il!r}")
            if not isinstance(kv, (tuple, list)) or len(kv) != 2:
                raise ValueError(f"logquant_layer_bits[{il}] must be (key_bits, value_bits), got {kv!r}")
            layers.append((il, _check_code_bits(f"logquant_layer_bits[{il}] key bits", kv[0], KEY_CODE_BITS),
                           _check_code_bits(f"logquant_layer_bits[{il}] value bits", kv[1])))
    g = key_group if key_group is not None else DEFAULT_KEY_GROUP if preset else ASKED_KEY_GROUP
    if isinstance(g, bool) or g not in KEY_GROUPS:
        raise ValueError(f"logquant_key_group must be one of {', '.join(map(str, KEY_GROUPS))}, got {g!r}")
    for name, flag in flags:
        if flag is not None and not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if key_widths is not None and key_widths not in KEY_WIDTHS:
        raise ValueError(f"logquant_key_widths must be one of {', '.join(map(repr, KEY_WIDTHS))}, "
                         f"got {key_widths!r}")
    if key_widths == "auto" and keys_post_rope:
        raise ValueError("logquant_key_widths='auto' needs keys grouped before RoPE "
                         "(not logquant_keys_post_rope)")
    if value_groups is not None and value_groups not in VALUE_GROUPS:
        raise ValueError(f"logquant_value_groups must be one of {', '.join(map(repr, VALUE_GROUPS))}, "
                         f"got {value_groups!r}")
    if scale_bits is not None and (isinstance(scale_bits, bool) or scale_bits not in SCALE_BITS):
        raise ValueError(f"logquant_scale_bits must be one of {', '.join(map(str, SCALE_BITS))}, got {scale_bits!r}")
    if scale_bits == 8 and keys_post_rope:
        raise ValueError("logquant_scale_bits=8 needs keys grouped before RoPE (not logquant_keys_post_rope): "
                         "a key channel's reference holds only before RoPE")
    # keys grouped after RoPE have no pairs to widen: uniform widths there by default
    kw = key_widths or ("uniform" if keys_post_rope else "auto")
    if kw == "uniform" and 3 in [k] + [row[1] for row in layers]:
        raise ValueError("3-bit keys are mixed key widths (0, 2 or 4 bits per channel, a mean of 3): "
                         "they need logquant_key_widths='auto' and keys grouped before RoPE")
    return LogQuantBits(k, v, tuple(sorted(layers)), auto, g, bool(keys_post_rope), fit is not False,
                        bool(score_correction), kw, value_groups or "channel", scale_bits or 16)


def parse_layer_bits(text: str) -> dict[int, tuple[int, int]]:
    """"0:8:8,5:4:2" (layer:key_bits:value_bits, the LOGQUANT_LAYER_BITS syntax) -> a dict."""
    out: dict[int, tuple[int, int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        fields = part.split(":")
        if len(fields) != 3 or not all(f.strip().isdigit() for f in fields):
            raise ValueError(f"layer bits {part!r}: expected layer:key_bits:value_bits, e.g. 0:8:8")
        il, k, v = (int(f) for f in fields)
        out[il] = (k, v)
    return out


def layer_bits_text(layer_bits: dict[int, tuple[int, int]] | str | None) -> str:
    if layer_bits == LAYER_BITS_AUTO:
        return LAYER_BITS_AUTO
    return ",".join(f"{il}:{k}:{v}" for il, (k, v) in sorted((layer_bits or {}).items()))


def parse_variant(name: str) -> tuple[str, dict]:
    """A kv_type with LogQuant precision levers, as the bench and CLI name them ->
    (kv_type, Llama keyword arguments). "logquant+k4" (4-bit keys), "logquant+v4",
    "logquant+k4v4", "logquant+L0:8:8" (layer 0 with 8-bit keys and values), "logquant+Lauto"
    (3-bit keys for the half of the layers the weights pick, logquant_layer_bits="auto"), and the key layouts
    of the format study: "+g32", "+g128" (tokens per key group), "+postrope"; the code levers
    "+minmax" (min/max scales instead of the default least-squares fit; "+fit" says the default),
    "+bc" (score correction), "+uniform" (every key channel 2 bits, logquant_key_widths="uniform";
    "+kw" says the default, mixed widths); "+vtok" (values grouped per token,
    logquant_value_groups="token"; "+vch" says the default, per channel); "+s8" (8-bit scales and
    minimums, logquant_scale_bits=8; "+s16" says the default); "+w64" (the window W);
    and for any type "+norot" (llama.cpp's Hadamard rotation off) and "+swa" (a sliding-window
    model's window layers cached at their window size, swa_full=False, as the LogQuant types do;
    llama-cpp-python defaults to full size); modifiers combine:
    "logquant+k4+L0:8:8+L1:4:4". A plain kv_type gives no arguments. (No commas: the bench
    takes comma-separated lists of these.)"""
    base, *mods = name.split("+")
    spec = get(base)
    kw: dict = {}
    layers: dict[int, tuple[int, int]] = {}
    for m in mods:
        if m == "Lauto":
            kw["logquant_layer_bits"] = LAYER_BITS_AUTO
            continue
        if m[:1] == "L":
            if "," in m:
                raise ValueError(f"{name!r}: one layer per L modifier (L0:8:8+L1:4:4)")
            layers.update(parse_layer_bits(m[1:]))
            continue
        k, _, v = m.partition("v")
        if m == "norot":
            kw["attn_rotation"] = False
        elif m == "swa":  # sliding-window layers cached at their window size, as LogQuant does
            kw["swa_full"] = False
        elif m == "postrope":
            kw["logquant_keys_post_rope"] = True
        elif m in ("fit", "minmax"):
            kw["logquant_fit"] = m == "fit"
        elif m == "bc":
            kw["logquant_score_correction"] = True
        elif m in ("kw", "uniform"):  # mixed key widths (the default) or uniform ones
            kw["logquant_key_widths"] = "auto" if m == "kw" else "uniform"
        elif m in ("vch", "vtok"):  # values grouped per channel (the default) or per token
            kw["logquant_value_groups"] = "channel" if m == "vch" else "token"
        elif m in ("s8", "s16"):  # bits of a block's scale and minimum
            kw["logquant_scale_bits"] = int(m[1:])
        elif m[:1] == "g" and m[1:].isdigit():
            kw["logquant_key_group"] = int(m[1:])
        elif m[:1] == "w" and m[1:].isdigit() and spec.is_logquant:
            kw["logquant_window"] = int(m[1:])
        elif m[:1] == "v":
            kw["logquant_value_bits"] = int(v) if v.isdigit() else v
        elif k[:1] == "k" and k[1:].isdigit() and (not v or v.isdigit()):
            kw["logquant_key_bits"] = int(k[1:])
            if v:
                kw["logquant_value_bits"] = int(v)
        else:
            raise ValueError(f"{name!r}: unknown modifier {m!r} (use k<bits>, v<bits>, k<bits>v<bits>, "
                             "L<layer>:<key bits>:<value bits>)")
    if layers:
        if kw.get("logquant_layer_bits") == LAYER_BITS_AUTO:
            raise ValueError(f"{name!r}: +Lauto picks the layers itself; drop the L<layer> modifiers")
        kw["logquant_layer_bits"] = layers
    bits_of_kwargs(spec, kw)
    return base, kw


def bits_of_kwargs(spec: KVType, kw: dict) -> LogQuantBits | None:
    """check_bits on Llama keyword arguments (those parse_variant gives)."""
    names = ("key_bits", "value_bits", "layer_bits", "key_group", "keys_post_rope", "fit", "score_correction",
             "key_widths", "value_groups", "scale_bits")
    return check_bits(spec, *(kw.get("logquant_" + n) for n in names))
