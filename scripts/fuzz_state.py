#!/usr/bin/env python3
"""Fuzzes LogQuant saved states: a corrupt state must be refused or load into a consistent cache,
and must never crash the process.

Real states are made first (tiny random-weight models from tests/tiny_model.py, and with --real the
default Qwen model): one sequence with a partial open 2-bit group, one with several groups, several
sequences in a unified cache and with a stream per sequence (seq_rm, seq_cp). Then each job loads
one mutated copy of a state (llama_state_set_data, or Llama.load_state) into the context:

  truncate   the state cut at a random length (often inside the LogQuant section)
  flip       random bytes xor'ed (anywhere, or in the LogQuant / llama.cpp bookkeeping)
  set        one count or index of the state (LogQuant section: n_slots, slot positions, slot
             sequence ids, group_fill, open groups, layers; llama.cpp's cells) set to a big,
             negative or off-by-one value
  semantic   the LogQuant section parsed, edited (group_fill past the group, an open group shared
             by two sequences or already full, a slot with no sequence, ...) and written back with
             consistent framing, so the reader gets past its length checks
  extend     bytes appended
  seq        a sequence's own state (llama_state_seq_set_data), made from the context's cells,
             possibly cut or flipped: whatever happens, the other sequences must stay intact

and checks: a refused load (return value != size, or an exception) leaves the cache empty or as
it was; an accepted one passes the invariants of the LogQuant bookkeeping (re-saved and parsed);
afterwards the context still decodes (finite logits). The jobs run in worker processes: a crash
(signal, sanitizer abort) is recorded with the mutation that caused it, and a fresh worker goes on.
At the end of each scenario the correct state is loaded again and must give its reference logits.

  python scripts/fuzz_state.py [--n 1200] [--seed 0] [--real] [--out result.json]
  python scripts/fuzz_state.py --cases all --out cases.json     # the named regression cases
  python scripts/fuzz_state.py --only 17                         # replay job 17 in this process

Exit status: 0 when nothing crashed and no check failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LQ_MAGIC = 0x4C513207     # logquant_cache's state section, version 7 (widths tag, value grouping, refs tag, f16 staging)
LQ_MAGIC_V6 = 0x4C513206  # version 6 (f32 staging), which the cache still reads
LQ_MAGIC_V4 = 0x4C513204  # version 4 (no value grouping: per token), which the cache still reads
LQ_MAGIC_V5 = 0x4C513205  # version 5 (no refs tag: f16 headers), which the cache still reads
SEQ_MAGIC = 0xAF143CD8    # llama_context's magic of a sequence's state
KEY_BITS = (2, 3, 4, 8)  # 3: mixed widths at a mean of 3 (a group's bytes as for 3-bit codes)
CELL_LAYOUT_TAG = 0x4C51324C  # where the f16 cells were (logquant_cell_layout), ahead of the streams
GGML_TYPE_F16 = 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
WINDOW = 8                # small, so that short sequences reach the 2-bit tier


def f16_to_f32_bytes(b: bytes) -> bytes:
    """Little-endian f16 values as f32 ones (exact): staging as states before version 7 hold it."""
    n = len(b) // 2
    return struct.pack(f"<{n}f", *struct.unpack(f"<{n}e", b[:2 * n]))


# ---------------------------------------------------------------------------------------------
# the state's layout (llama.cpp 0.3.36's llama_kv_cache::state_write, then logquant_cache's)


class Truncated(ValueError):
    pass


@dataclass
class Field:
    name: str
    off: int
    fmt: str      # struct code: i int32, I uint32, q int64, Q uint64
    value: int

    @property
    def size(self) -> int:
        return struct.calcsize("<" + self.fmt)


@dataclass
class LQLayer:
    il: int
    kb: int
    vb: int
    wtag: int  # hash of the layer's mixed key widths, 0 for uniform ones
    vpc: int   # 1: values grouped per channel (by key group), 0: per token (by slot)
    rtag: int  # hash of the layer's header references (8-bit scales), 0 for f16 headers
    k2: bytes
    v2: bytes
    staging: list[bytes]


@dataclass
class LQSection:
    magic: int
    window: int
    policy: int
    group: int
    rope_dims: int
    slot_pos: list[int]
    slot_ids: list[list[int]]
    group_fill: list[int]
    open: list[list[int]]          # [sequence, group]
    layers: list[LQLayer]

    def n_grp(self) -> int:
        return -(-len(self.slot_pos) // self.group) if self.group > 0 else 0

    def serialize(self) -> bytes:
        n, n_grp = len(self.slot_pos), self.n_grp()
        out = [struct.pack("<I4i", self.magic, self.window, self.policy, self.group, self.rope_dims),
               struct.pack("<q", n), struct.pack(f"<{n}i", *self.slot_pos)]
        for ids in self.slot_ids:
            out.append(struct.pack(f"<i{len(ids)}i", len(ids), *ids))
        out.append(struct.pack(f"<{n_grp}i", *(self.group_fill + [0] * n_grp)[:n_grp]))
        out.append(struct.pack("<i", len(self.open)))
        for s, g in self.open:
            out.append(struct.pack("<qq", s, g))
        out.append(struct.pack("<I", len(self.layers)))
        for ly in self.layers:
            out.append(struct.pack("<3iI", ly.il, ly.kb, ly.vb, ly.wtag))
            if self.magic != LQ_MAGIC_V4:
                out.append(struct.pack("<i", ly.vpc))
            if self.magic in (LQ_MAGIC, LQ_MAGIC_V6):
                out.append(struct.pack("<I", ly.rtag))
            out += [ly.k2, ly.v2]
            # staging: f16 since version 7, f32 before (the same values, widened)
            out += ly.staging if self.magic == LQ_MAGIC else [f16_to_f32_bytes(b) for b in ly.staging]
        return b"".join(out)

    def q2_positions(self, n_seq: int) -> list[tuple[int, ...]]:
        per = [[] for _ in range(n_seq)]
        for pos, ids in zip(self.slot_pos, self.slot_ids):
            for s in ids:
                if pos >= 0 and 0 <= s < n_seq:
                    per[s].append(pos)
        return [tuple(sorted(p)) for p in per]


@dataclass
class Layout:
    size: int
    fields: dict[str, Field] = field(default_factory=dict)
    data: list[tuple[str, int, int]] = field(default_factory=list)   # tensor bytes: (name, start, end)
    streams: list[dict] = field(default_factory=list)
    n_embd_k: list[int] = field(default_factory=list)                # per llama.cpp layer
    n_embd_v: list[int] = field(default_factory=list)
    lq: LQSection | None = None
    lq_start: int = 0
    lq_end: int = 0

    def lq_fields(self) -> list[Field]:
        return [f for f in self.fields.values() if f.name.startswith("lq.")]

    def kv_fields(self) -> list[Field]:
        return [f for f in self.fields.values() if f.name.startswith("kv.")]

    def in_data(self, off: int) -> bool:
        return any(a <= off < b for _, a, b in self.data)

    def region(self, off: int) -> str:
        for f in self.fields.values():
            if f.off <= off < f.off + f.size:
                return f.name
        for name, a, b in self.data:
            if a <= off < b:
                return name
        return "?"

    def f16_positions(self, n_seq: int) -> list[set[int]]:
        per = [set() for _ in range(n_seq)]
        for st in self.streams:
            for pos, ids in st["cells"]:
                for s in ids:
                    if 0 <= s < n_seq:
                        per[s].add(pos)
        return per


class _Reader:
    def __init__(self, buf: bytes, lay: Layout):
        self.buf, self.off, self.lay = buf, 0, lay

    def num(self, name: str, fmt: str) -> int:
        size = struct.calcsize("<" + fmt)
        if self.off + size > len(self.buf):
            raise Truncated(f"state ends inside {name}")
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.off)
        self.lay.fields[name] = Field(name, self.off, fmt, v)
        self.off += size
        return v

    def blob(self, name: str, n: int) -> bytes:
        if n < 0 or self.off + n > len(self.buf):
            raise Truncated(f"state ends inside {name}")
        b = self.buf[self.off:self.off + n]
        if n:
            self.lay.data.append((name, self.off, self.off + n))
        self.off += n
        return b


def lq_sizes(lay: Layout, il: int, group: int, kb: int, vb: int, s8: bool = False) -> tuple[int, int, int, int, int]:
    """(bytes per key group, bytes per value row (per token), bytes per value group (per channel),
    key channels, value channels) of a LogQuant layer; s8: 2-byte block headers (8-bit scales),
    which values grouped per token do not take."""
    nek, nev = lay.n_embd_k[il], lay.n_embd_v[il]
    hdr = 2 if s8 else 4
    return (nek * (hdr + group * kb // 8), (nev // 64) * (4 + 64 * vb // 8), nev * (hdr + group * vb // 8),
            nek, nev)


def lq_value_bytes(n: int, n_grp: int, vpc: int, vrb: int, vgb: int) -> int:
    """Bytes of a layer's values in a state of n slots in n_grp groups."""
    return n_grp * vgb if vpc else n * vrb


def parse_state(buf: bytes, dims: Layout | None = None) -> Layout:
    """The layout of a whole-context state of a (non-SWA) LogQuant context; raises on a state
    that does not parse. The key/value widths of the layers come from the state's f16 cells, or
    from `dims` (another state of the same context) when it has none."""
    lay = Layout(size=len(buf))
    if dims is not None:
        lay.n_embd_k, lay.n_embd_v = list(dims.n_embd_k), list(dims.n_embd_v)
    r = _Reader(buf, lay)
    n = r.num("kv.arch_len", "I")
    r.blob("kv.arch", n)
    if r.off + 4 <= len(buf) and struct.unpack_from("<I", buf, r.off)[0] == CELL_LAYOUT_TAG:
        r.num("kv.layout_tag", "I")
        for s in range(r.num("kv.layout_n_stream", "I")):
            r.num(f"kv.layout_head[{s}]", "I")
            k = r.num(f"kv.layout_n[{s}]", "I")
            if k > 1 << 20:
                raise Truncated("cell layout with too many cells")
            for i in range(k):
                r.num(f"kv.layout_idx[{s}][{i}]", "I")
    n_stream = r.num("kv.n_stream", "I")
    for s in range(n_stream):
        cc = r.num(f"kv.cell_count[{s}]", "I")
        st = {"cells": [], "layers": [], "v_trans": 0}
        lay.streams.append(st)
        if cc == 0:
            continue
        for i in range(cc):
            pos = r.num(f"kv.cell_pos[{s}][{i}]", "i")
            ns = r.num(f"kv.cell_nseq[{s}][{i}]", "I")
            if ns > 4096:
                raise Truncated("cell with too many sequences")
            st["cells"].append((pos, [r.num(f"kv.cell_seq[{s}][{i}][{j}]", "i") for j in range(ns)]))
        st["v_trans"] = r.num(f"kv.v_trans[{s}]", "I")
        nl = r.num(f"kv.n_layer[{s}]", "I")
        if st["v_trans"]:
            raise ValueError("transposed V: not a LogQuant state (it needs flash attention)")
        for li in range(nl):
            kt = r.num(f"kv.k_type[{s}][{li}]", "i")
            kr = r.num(f"kv.k_row[{s}][{li}]", "Q")
            st["layers"].append({"k_type": kt, "k_row": kr, "k_off": r.off})
            r.blob(f"kv.k[{s}][{li}]", cc * kr)
        for li in range(nl):
            vt = r.num(f"kv.v_type[{s}][{li}]", "i")
            vr = r.num(f"kv.v_row[{s}][{li}]", "Q")
            st["layers"][li].update(v_type=vt, v_row=vr, v_off=r.off)
            r.blob(f"kv.v[{s}][{li}]", cc * vr)
        if not lay.n_embd_k:
            if any(ly["k_type"] != GGML_TYPE_F16 or ly["v_type"] != GGML_TYPE_F16 for ly in st["layers"]):
                raise ValueError("the f16 tier is not f16")
            lay.n_embd_k = [ly["k_row"] // 2 for ly in st["layers"]]
            lay.n_embd_v = [ly["v_row"] // 2 for ly in st["layers"]]
    if not lay.n_embd_k:
        raise ValueError("no cells in the state: cannot size the LogQuant layers")

    lay.lq_start = r.off
    magic = r.num("lq.magic", "I")
    w, pol, g, rd = (r.num(f"lq.{k}", "i") for k in ("window", "policy", "group", "rope_dims"))
    if magic != LQ_MAGIC or g <= 0:
        raise ValueError(f"no LogQuant section of version 7 where expected (magic {magic:#x}, group {g}): "
                         "the state layout changed, update parse_state")
    n = r.num("lq.n_slots", "q")
    if not 0 <= n <= len(buf):
        raise Truncated("n_slots")
    slot_pos = [r.num(f"lq.slot_pos[{i}]", "i") for i in range(n)]
    slot_ids = []
    for i in range(n):
        k = r.num(f"lq.slot_nids[{i}]", "i")
        if not 0 <= k <= 4096:
            raise Truncated("slot sequence count")
        slot_ids.append([r.num(f"lq.slot_id[{i}][{j}]", "i") for j in range(k)])
    n_grp = -(-n // g)
    fills = [r.num(f"lq.group_fill[{k}]", "i") for k in range(n_grp)]
    n_open = r.num("lq.n_open", "i")
    if not 0 <= n_open <= 4096:
        raise Truncated("n_open")
    opens = [[r.num(f"lq.open_seq[{k}]", "q"), r.num(f"lq.open_grp[{k}]", "q")] for k in range(n_open)]
    n_layers = r.num("lq.n_layers", "I")
    layers = []
    for li in range(n_layers):
        il, kb, vb = (r.num(f"lq.{k}[{li}]", "i") for k in ("il", "kbits", "vbits"))
        wtag = r.num(f"lq.wtag[{li}]", "I")
        vpc = r.num(f"lq.vpc[{li}]", "i")
        rtag = r.num(f"lq.rtag[{li}]", "I")
        if not 0 <= il < len(lay.n_embd_k) or kb not in KEY_BITS or vb not in (2, 4, 8) or vpc not in (0, 1):
            raise ValueError(f"LogQuant layer {li}: il {il}, bits {kb}/{vb}, value grouping {vpc}")
        kgb, vrb, vgb, nek, nev = lq_sizes(lay, il, g, kb, vb, rtag != 0)
        k2 = r.blob(f"lq.k2[{li}]", n_grp * kgb)
        v2 = r.blob(f"lq.v2[{li}]", lq_value_bytes(n, n_grp, vpc, vrb, vgb)) if n_grp * kgb > 0 else b""
        staging = []
        for k, (_, grp) in enumerate(opens):
            f = fills[grp] if 0 <= grp < n_grp else -1
            if f < 0:
                raise Truncated("staging of a bad open group")
            # the open group's keys, then (per-channel values) its values
            staging.append(r.blob(f"lq.staging[{li}][{k}]", f * (nek + (nev if vpc else 0)) * 2))
        layers.append(LQLayer(il, kb, vb, wtag, vpc, rtag, k2, v2, staging))
    lay.lq_end = r.off
    lay.lq = LQSection(magic, w, pol, g, rd, slot_pos, slot_ids, fills, opens, layers)
    if r.off != len(buf):
        raise ValueError(f"{len(buf) - r.off} bytes after the LogQuant section")
    return lay


def reframe(sec: LQSection, lay: Layout) -> None:
    """After an edit: the lengths that follow from the counts (group_fill entries, tensor bytes,
    staging rows), so that the reader gets to the values themselves."""
    n, n_grp = len(sec.slot_pos), sec.n_grp()
    sec.slot_ids = (sec.slot_ids + [[] for _ in range(n)])[:n]
    sec.group_fill = (sec.group_fill + [0] * n_grp)[:n_grp]

    def fit(b: bytes, size: int) -> bytes:
        return b[:size] + bytes(max(0, size - len(b)))

    for ly in sec.layers:
        il = ly.il if 0 <= ly.il < len(lay.n_embd_k) else 0
        kb = ly.kb if ly.kb in KEY_BITS else 2
        vb = ly.vb if ly.vb in (2, 4, 8) else 2
        vpc = ly.vpc if ly.vpc in (0, 1) else 0
        kgb, vrb, vgb, nek, nev = lq_sizes(lay, il, sec.group, kb, vb, ly.rtag != 0)
        ly.k2 = fit(ly.k2, n_grp * kgb)
        ly.v2 = fit(ly.v2, lq_value_bytes(n, n_grp, vpc, vrb, vgb)) if n_grp * kgb > 0 else b""
        staging = []
        for k, (_, grp) in enumerate(sec.open):
            f = sec.group_fill[grp] if 0 <= grp < n_grp else 0
            old = ly.staging[k] if k < len(ly.staging) else b""
            row = (nek + (nev if vpc else 0)) * 2
            staging.append(fit(old, f * row) if 0 <= f <= 8 * sec.group else old)
        ly.staging = staging


def check_invariants(lay: Layout, base: Layout, n_seq: int) -> list[str]:
    """What a LogQuant cache's bookkeeping must satisfy (read back from a state it saved)."""
    bad: list[str] = []
    sec, ref = lay.lq, base.lq
    head = lambda s: (s.magic, s.window, s.policy, s.group, s.rope_dims)  # noqa: E731
    if head(sec) != head(ref):
        bad.append(f"header {head(sec)} != {head(ref)}")
    def layer_heads(s):
        return [(ly.il, ly.kb, ly.vb, ly.wtag, ly.vpc, ly.rtag) for ly in s.layers]
    if layer_heads(sec) != layer_heads(ref):
        bad.append("layers differ from the saved ones")
    G, n, n_grp = sec.group, len(sec.slot_pos), sec.n_grp()
    for i, (pos, ids) in enumerate(zip(sec.slot_pos, sec.slot_ids)):
        if len(set(ids)) != len(ids) or any(not 0 <= s < n_seq for s in ids):
            bad.append(f"slot {i}: sequence ids {ids}")
        if pos >= 0 and not ids:
            bad.append(f"slot {i}: position {pos} held by no sequence")
    for g in range(n_grp):
        f = sec.group_fill[g]
        if not 0 <= f <= G:
            bad.append(f"group {g}: fill {f} outside [0, {G}]")
            continue
        live = [g * G + i for i in range(f, G) if g * G + i < n and sec.slot_pos[g * G + i] >= 0]
        if live:
            bad.append(f"group {g}: fill {f} but slot {live[0]} is in use")
    if n > 0 and (sec.group_fill[-1] <= 0 or n != (n_grp - 1) * G + sec.group_fill[-1]):
        bad.append(f"n_slots {n} does not end the last group (fill {sec.group_fill[-1]})")
    seqs = [s for s, _ in sec.open]
    grps = [g for _, g in sec.open]
    if len(set(seqs)) != len(seqs) or len(set(grps)) != len(grps):
        bad.append(f"open groups {sec.open}: a sequence or a group twice")
    for s, g in sec.open:
        if not 0 <= s < n_seq or not 0 <= g < n_grp:
            bad.append(f"open group {g} of sequence {s}: out of range")
        elif not 0 < sec.group_fill[g] < G:
            bad.append(f"open group {g} of sequence {s}: fill {sec.group_fill[g]}")
    f16 = lay.f16_positions(n_seq)
    for s, q2 in enumerate(sec.q2_positions(n_seq)):
        if len(set(q2)) != len(q2):
            bad.append(f"sequence {s}: a 2-bit position twice")
        both = f16[s].intersection(q2)
        if both:
            bad.append(f"sequence {s}: position {min(both)} in both tiers")
    return bad[:12]


# ---------------------------------------------------------------------------------------------
# mutations: a spec (JSON, concrete) is drawn at random, then applied deterministically


def wrap(value: int, fmt: str) -> int:
    bits = 8 * struct.calcsize("<" + fmt)
    value &= (1 << bits) - 1
    if fmt.islower() and value >= 1 << (bits - 1):
        value -= 1 << bits
    return value


def apply_spec(spec: dict, buf: bytes, lay: Layout | None) -> bytes:
    kind = spec["kind"]
    if kind == "none":
        return buf
    if kind == "truncate":
        return buf[:spec["len"]]
    if kind == "extend":
        return buf + bytes([spec["byte"]]) * spec["n"]
    if kind == "flip":
        b = bytearray(buf)
        for off, x in spec["bytes"]:
            b[off] ^= x
        return bytes(b)
    if kind == "set":
        f = lay.fields[spec["field"]]
        b = bytearray(buf)
        struct.pack_into("<" + f.fmt, b, f.off, wrap(spec["value"], f.fmt))
        return bytes(b)
    if kind == "semantic":
        sec = parse_state(buf, dims=lay).lq   # a fresh copy to edit
        edit_section(sec, spec)
        reframe(sec, lay)
        return buf[:lay.lq_start] + sec.serialize() + buf[lay.lq_end:]
    raise ValueError(f"unknown mutation {kind}")


def edit_section(sec: LQSection, spec: dict) -> None:
    op = spec["op"]
    if op == "fill":
        sec.group_fill[spec["group"]] = spec["value"]
    elif op == "n_slots":
        d = spec["delta"]
        if d < 0:
            del sec.slot_pos[d:], sec.slot_ids[d:]
        for j in range(max(d, 0)):
            seq = spec.get("seq")
            sec.slot_pos.append(-1 if seq is None else spec["pos0"] + j)
            sec.slot_ids.append([] if seq is None else [seq])
    elif op == "open_set":
        entry = [spec["seq"], spec["group"]]
        if spec["index"] < len(sec.open):
            sec.open[spec["index"]] = entry
        else:
            sec.open.append(entry)
    elif op == "open_del":
        del sec.open[spec["index"]]
        for ly in sec.layers:
            del ly.staging[spec["index"]]
    elif op == "slot":
        i = spec["slot"]
        if spec.get("pos") is not None:
            sec.slot_pos[i] = spec["pos"]
        if spec.get("ids") is not None:
            sec.slot_ids[i] = list(spec["ids"])
    elif op == "shift_seq":
        for i, ids in enumerate(sec.slot_ids):
            if spec["seq"] in ids and sec.slot_pos[i] >= 0:
                sec.slot_pos[i] = wrap(sec.slot_pos[i] + spec["delta"], "i")
    elif op == "swap_slots":
        a, b = spec["a"], spec["b"]
        sec.slot_pos[a], sec.slot_pos[b] = sec.slot_pos[b], sec.slot_pos[a]
        sec.slot_ids[a], sec.slot_ids[b] = sec.slot_ids[b], sec.slot_ids[a]
    elif op == "layer":
        ly = sec.layers[spec["layer"]]
        ly.il, ly.kb, ly.vb = spec["il"], spec["kb"], spec["vb"]
    else:
        raise ValueError(f"unknown edit {op}")


# how often each family of fields is targeted by `set`
SET_WEIGHTS = {
    "lq.group_fill": 6, "lq.open_grp": 5, "lq.open_seq": 4, "lq.n_open": 3, "lq.n_slots": 4,
    "lq.slot_nids": 3, "lq.slot_id": 4, "lq.slot_pos": 3, "lq.n_layers": 1, "lq.il": 1, "lq.kbits": 1,
    "lq.vbits": 1, "lq.wtag": 0.5, "lq.vpc": 0.5, "lq.rtag": 0.5,
    "lq.window": 0.3, "lq.policy": 0.3, "lq.group": 0.5, "lq.rope_dims": 0.3, "lq.magic": 0.2,
    "kv.cell_pos": 2, "kv.cell_seq": 2, "kv.cell_nseq": 1, "kv.cell_count": 1, "kv.n_stream": 0.5,
    "kv.n_layer": 0.3, "kv.k_row": 0.3, "kv.v_row": 0.3, "kv.k_type": 0.2, "kv.arch_len": 0.2,
    "kv.layout_idx": 2, "kv.layout_head": 1, "kv.layout_n": 1, "kv.layout_n_stream": 0.3,
    "kv.layout_tag": 0.2,
}


class Gen:
    """Draws mutation specs for one scenario's base state."""

    def __init__(self, lay: Layout, n_seq: int, n_groups: int):
        self.lay, self.n_seq, self.n_groups = lay, n_seq, n_groups
        self.sec = lay.lq
        self.families: dict[str, list[Field]] = {}
        for f in lay.fields.values():
            fam = f.name.split("[")[0]
            if fam in SET_WEIGHTS:
                self.families.setdefault(fam, []).append(f)
        self.lq_bytes = [o for f in lay.lq_fields() for o in range(f.off, f.off + f.size)]
        self.kv_bytes = [o for f in lay.kv_fields() for o in range(f.off, f.off + f.size)]

    def specials(self, rng: random.Random, f: Field) -> int:
        G, S, NG, v = self.sec.group, self.n_seq, self.n_groups, f.value
        c = [0, 1, -1, v - 1, v + 1, v + 2, v - 2, 2 * v, G - 1, G, G + 1, 2 * G, S - 1, S, S + 1, NG - 1, NG,
             NG + 1, NG * G, NG * G + 1, 1 << 15, 1 << 16, 1 << 24, I32_MAX, I32_MIN,
             rng.randrange(I32_MIN, I32_MAX)]
        if f.size == 8:
            c += [1 << 32, 1 << 40, 2**62, -(2**63), -(1 << 32)]
        c = [x for x in c if wrap(x, f.fmt) != v] or [v ^ 1]
        return rng.choice(c)

    def random(self, rng: random.Random) -> dict:
        u = rng.random()
        if u < 0.13:
            return self.truncate(rng)
        if u < 0.31:
            return self.flip(rng)
        if u < 0.60:
            return self.set(rng)
        if u < 0.87:
            return self.semantic(rng)
        if u < 0.89:
            return {"kind": "extend", "n": rng.choice([1, 4, 64]), "byte": rng.randrange(256)}
        if self.n_seq > 1:
            return self.seq(rng)
        return self.semantic(rng)

    def truncate(self, rng: random.Random) -> dict:
        lay, u = self.lay, rng.random()
        if u < 0.3:
            n = rng.randrange(0, lay.size)
        elif u < 0.7:
            n = rng.randrange(lay.lq_start, lay.size)
        else:
            f = rng.choice(lay.lq_fields())
            n = f.off + rng.choice([0, f.size - 1])
        return {"kind": "truncate", "len": n, "at": self.lay.region(min(n, lay.size - 1))}

    def flip(self, rng: random.Random) -> dict:
        out = []
        for _ in range(rng.choice([1, 1, 1, 2, 3, 4, 8])):
            u = rng.random()
            off = (rng.randrange(self.lay.size) if u < 0.4 else
                   rng.choice(self.lq_bytes) if u < 0.75 else rng.choice(self.kv_bytes))
            out.append([off, rng.choice([0x01, 0x80, 0xFF, rng.randrange(1, 256)])])
        return {"kind": "flip", "bytes": out, "at": sorted({self.lay.region(o) for o, _ in out})}

    def set(self, rng: random.Random) -> dict:
        fams = list(self.families)
        fam = rng.choices(fams, weights=[SET_WEIGHTS[f] for f in fams])[0]
        f = rng.choice(self.families[fam])
        return {"kind": "set", "field": f.name, "old": f.value, "value": self.specials(rng, f)}

    def semantic(self, rng: random.Random) -> dict:
        sec, G, S = self.sec, self.sec.group, self.n_seq
        n, n_grp = len(sec.slot_pos), sec.n_grp()
        f16 = self.lay.f16_positions(S)
        q2 = sec.q2_positions(S)
        live = [i for i, p in enumerate(sec.slot_pos) if p >= 0]
        open_g = [g for _, g in sec.open]
        full_g = [g for g in range(n_grp) if sec.group_fill[g] == G]
        ops = ["fill", "n_slots", "slot", "slot", "shift_seq", "open_set", "swap_slots", "layer"]
        if sec.open:
            ops += ["fill", "open_set", "open_del"]
        op = rng.choice(ops)
        if op == "fill" and n_grp:
            g = rng.choice(open_g) if open_g and rng.random() < 0.6 else rng.randrange(n_grp)
            v = sec.group_fill[g]
            value = rng.choice([G, G + 1, G + rng.randrange(1, G), 2 * G, 4 * G, 0, -1, v - 1, v + 1, G - 1])
            return {"kind": "semantic", "op": "fill", "group": g, "value": value, "old": v}
        if op == "n_slots":
            d = rng.choice([1, G, -1, -(n % G or G), rng.randrange(1, G)])
            d = max(d, -n)
            s = rng.choice([None, None] + list(range(S)))
            top = max([p for p in sec.slot_pos if p >= 0], default=0)
            return {"kind": "semantic", "op": "n_slots", "delta": d, "seq": s, "pos0": top + 1000}
        if op == "open_set":
            k = rng.randrange(len(sec.open) + 1)
            free = [s for s in range(S) if s not in [o[0] for o in sec.open]]
            seq = rng.choice([o[0] for o in sec.open] + free + [S, -1] if sec.open else free + [S, -1])
            cands = open_g + full_g + [n_grp, n_grp - 1, -1, 0]
            return {"kind": "semantic", "op": "open_set", "index": k, "seq": seq, "group": rng.choice(cands)}
        if op == "open_del":
            return {"kind": "semantic", "op": "open_del", "index": rng.randrange(len(sec.open))}
        if op == "slot" and n:
            i = rng.choice(live) if live and rng.random() < 0.8 else rng.randrange(n)
            ids = sec.slot_ids[i]
            s = ids[0] if ids else 0
            same = [p for p in q2[s] if p != sec.slot_pos[i]]
            pos = rng.choice([None, None, -1, -2, I32_MAX, sec.slot_pos[i] + 1]
                             + ([rng.choice(same)] if same else [])
                             + ([rng.choice(sorted(f16[s]))] if f16[s] else []))
            new_ids = rng.choice([None, [], [s, s], [S], [-1], [1000], [(s + 1) % S], list(range(S)) + [s]])
            if pos is None and new_ids is None:
                new_ids = []
            return {"kind": "semantic", "op": "slot", "slot": i, "pos": pos, "ids": new_ids,
                    "old": [sec.slot_pos[i], ids]}
        if op == "shift_seq":
            s = rng.choice([s for s in range(S) if q2[s]] or [0])
            return {"kind": "semantic", "op": "shift_seq", "seq": s,
                    "delta": rng.choice([1, -1, 10000, -10000, I32_MAX])}
        if op == "swap_slots" and len(live) >= 2:
            a, b = rng.sample(live, 2)
            return {"kind": "semantic", "op": "swap_slots", "a": a, "b": b}
        if op == "layer" and sec.layers:
            k = rng.randrange(len(sec.layers))
            ly = sec.layers[k]
            other = sec.layers[(k + 1) % len(sec.layers)].il
            il, kb, vb = rng.choice([(other, ly.kb, ly.vb), (ly.il, 4, ly.vb), (ly.il, ly.kb, 8),
                                     (ly.il, 3, ly.vb)])
            return {"kind": "semantic", "op": "layer", "layer": k, "il": il, "kb": kb, "vb": vb}
        return self.set(rng)

    def seq(self, rng: random.Random) -> dict:
        have = [s for s in range(self.n_seq)
                if any(s in ids for st in self.lay.streams for _, ids in st["cells"])]
        src = rng.choice(have)
        dest = rng.choice([src, src, rng.randrange(self.n_seq)])
        spec = {"kind": "seq", "src": src, "dest": dest, "lq": rng.random() < 0.7, "then": None}
        u = rng.random()
        if u < 0.3:
            spec["then"] = {"kind": "truncate_frac", "frac": rng.random()}
        elif u < 0.6:
            spec["then"] = {"kind": "flip_frac", "bytes": [[rng.random(), rng.randrange(1, 256)]
                                                           for _ in range(rng.choice([1, 2, 4]))]}
        return spec


def seq_state(lay: Layout, base: bytes, src: int, with_lq: bool) -> bytes:
    """A sequence's own state as llama_state_seq_get_data writes it (its cells, their K/V rows),
    made from a whole-context state; with_lq appends the context's LogQuant section."""
    out = [struct.pack("<IiI", SEQ_MAGIC, src, len(lay.streams))]
    for st in lay.streams:
        idx = [j for j, (_, ids) in enumerate(st["cells"]) if src in ids]
        out.append(struct.pack("<I", len(idx)))
        if not idx:
            continue
        for j in idx:
            out.append(struct.pack("<iIi", st["cells"][j][0], 1, src))
        out.append(struct.pack("<II", 0, len(st["layers"])))
        for key in ("k", "v"):
            for ly in st["layers"]:
                row, off = ly[f"{key}_row"], ly[f"{key}_off"]
                out.append(struct.pack("<iQ", ly[f"{key}_type"], row))
                out += [base[off + j * row:off + (j + 1) * row] for j in idx]
    if with_lq:
        out.append(base[lay.lq_start:lay.lq_end])
    return b"".join(out)


def apply_then(then: dict | None, buf: bytes) -> bytes:
    if not then:
        return buf
    if then["kind"] == "truncate_frac":
        return buf[:int(then["frac"] * len(buf))]
    b = bytearray(buf)
    for frac, x in then["bytes"]:
        b[min(int(frac * len(b)), len(b) - 1)] ^= x
    return bytes(b)


# ---------------------------------------------------------------------------------------------
# scenarios: contexts and the states they save

SCENARIOS: dict[str, dict] = {
    # one sequence, 100 tokens: a full 2-bit group and a partial open one; Llama's own API
    "tiny-one-open": {"model": "tiny", "n_seq": 1, "unified": True, "steps": [("eval", 60), ("eval", 40)]},
    # one sequence, several groups, the open one grown token by token
    "tiny-one-groups": {"model": "tiny", "n_seq": 1, "unified": True,
                        "steps": [("eval", 128), ("eval", 100)] + [("eval", 1)] * 10},
    # four sequences sharing one stream: interleaved groups, a freed sequence, a copy (shared slots);
    # groups of 64, so that these lengths close some (the default format's 128 would not)
    "tiny-unified": {"model": "tiny", "n_seq": 4, "unified": True, "levers": {"logquant_key_group": 64},
                     "steps": [("decode", {0: 64, 1: 40, 2: 50}), ("decode", {0: 64, 1: 40, 2: 50})]
                     + [("decode", {0: 1, 1: 1})] * 4
                     + [("rm", 2, -1, -1), ("cp", 0, 3), ("decode", {3: 12, 1: 12}), ("decode", {2: 10})]},
    # one sequence with 8-bit scales (2-byte block headers, the refs tag of version 6)
    "tiny-s8": {"model": "tiny", "n_seq": 1, "unified": True, "levers": {"logquant_scale_bits": 8},
                "steps": [("eval", 128), ("eval", 70)] + [("eval", 1)] * 5},
    # three sequences, a stream each; a cross-stream copy
    "tiny-streams": {"model": "tiny", "n_seq": 3, "unified": False,
                     "steps": [("decode", {0: 60, 1: 60}), ("decode", {0: 50, 1: 50})]
                     + [("decode", {0: 1, 1: 1})] * 3 + [("cp", 0, 2), ("decode", {2: 2, 1: 1})]},
    # the real model (--real): two sequences, both layouts
    "qwen-unified": {"model": "qwen", "n_seq": 2, "unified": True,
                     "steps": [("decode", {0: 100, 1: 80}), ("decode", {0: 60, 1: 30})]
                     + [("decode", {0: 1, 1: 1})] * 3},
    "qwen-streams": {"model": "qwen", "n_seq": 2, "unified": False,
                     "steps": [("decode", {0: 90, 1: 90}), ("decode", {0: 40, 1: 40})]
                     + [("decode", {0: 1, 1: 1})] * 3},
}
TINY = [k for k, v in SCENARIOS.items() if v["model"] == "tiny"]
REAL = [k for k, v in SCENARIOS.items() if v["model"] == "qwen"]


_LOG_CB = None


def install_log(llama_cpp) -> None:
    """llama.cpp's errors (why a state was refused) to stderr, which is the worker log."""
    global _LOG_CB
    if _LOG_CB is None:
        def log(level, text, _user):
            if level in (3, 4) and text:  # ggml_log_level WARN, ERROR (this ggml: DEBUG 1 ... CONT 5)
                os.write(2, text)

        _LOG_CB = llama_cpp.llama_log_callback(log)
    llama_cpp.llama_log_set(_LOG_CB, None)


class Scenario:
    def __init__(self, name: str, model_path: str, threads: int):
        from logquant_gguf import Llama, _capi
        from logquant_gguf.llama import llama_cpp

        self.name, self.cfg = name, SCENARIOS[name]
        self.lc, self.capi = llama_cpp, _capi
        self.n_seq = self.cfg["n_seq"]
        self.llm = Llama(model_path, kv_type="logquant", logquant_window=WINDOW,
                         n_ctx=512 if self.cfg["model"] == "qwen" else 1024, n_seq_max=self.n_seq,
                         kv_unified=self.cfg["unified"], n_batch=256, n_ubatch=128,
                         flash_attn=True, verbose=False, n_threads=threads, n_threads_batch=threads,
                         logits_all=False, seed=0, **self.cfg.get("levers", {}))
        self.ctx = self.llm._ctx.ctx
        install_log(llama_cpp)
        self.ctx_ptr = ctypes.cast(self.ctx, ctypes.c_void_p).value
        self.n_vocab = self.llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(512, 0, self.n_seq)
        rng = random.Random(name)
        self.toks = lambda n: [rng.randrange(3, min(self.n_vocab, 3000)) for _ in range(n)]  # noqa: E731
        ends = [0] * self.n_seq
        for step in self.cfg["steps"]:
            if step[0] == "eval":
                self.llm.eval(self.toks(step[1]))
                ends[0] = self.llm.n_tokens
            elif step[0] == "decode":
                parts = {}
                for s, k in step[1].items():
                    parts[s] = (ends[s], self.toks(k))
                    ends[s] += k
                rc, _ = self.decode(parts)
                assert rc == 0, f"{name}: setup decode failed ({rc})"
            elif step[0] == "rm":
                assert llama_cpp.llama_memory_seq_rm(self.mem, step[1], step[2], step[3])
                ends[step[1]] = 0
            elif step[0] == "cp":
                llama_cpp.llama_memory_seq_cp(self.mem, step[1], step[2], -1, -1)
                ends[step[2]] = ends[step[1]]
        if self.n_seq == 1:
            self.py_state = self.llm.save_state()
            self.base = bytes(self.py_state.llama_state)
        else:
            self.py_state = None
            self.base = self.get_state()
        self.layout = parse_state(self.base)
        st = self.capi.kv_stats(self.ctx_ptr)["logquant"]
        sec = self.layout.lq
        sizes = [(ly.vpc, lq_sizes(self.layout, ly.il, sec.group, ly.kb, ly.vb, ly.rtag != 0)) for ly in sec.layers]
        per_group = sum(kgb + (vgb if vpc else sec.group * vrb) for vpc, (kgb, vrb, vgb, _, _) in sizes)
        self.n_groups = st["bytes_q2"] // per_group if per_group else 0
        self.gen = Gen(self.layout, self.n_seq, self.n_groups)
        # the reference: the base state loaded, then one decode step of every sequence
        assert self.set_state(self.base) == len(self.base), f"{name}: the base state does not load"
        self.base_snap = self.snapshot()
        self.base_invariants = check_invariants(self.layout, self.layout, self.n_seq)
        self.ref_logits = self.continue_all(self.base_snap)[1]
        assert self.set_state(self.base) == len(self.base)

    # -- llama.cpp calls
    @property
    def mem(self):
        return self.lc.llama_get_memory(self.ctx)

    def decode(self, parts: dict[int, tuple[int, list[int]]]) -> tuple[int, dict[int, list[float]]]:
        b, n, last = self.batch, 0, {}
        for s, (p0, toks) in parts.items():
            for i, t in enumerate(toks):
                b.token[n], b.pos[n], b.n_seq_id[n] = t, p0 + i, 1
                b.seq_id[n][0] = s
                b.logits[n] = i == len(toks) - 1
                n += 1
            last[s] = n - 1
        b.n_tokens = n
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            return rc, {}
        out = {}
        for s, i in last.items():
            p = self.lc.llama_get_logits_ith(self.ctx, i)
            out[s] = (np.ctypeslib.as_array(p, shape=(self.n_vocab,)).astype(np.float64) if p
                      else np.array([np.nan]))
        return rc, out

    def set_state(self, data: bytes) -> int:
        arr = (ctypes.c_uint8 * max(len(data), 1)).from_buffer_copy(data or b"\0")
        return self.lc.llama_state_set_data(self.ctx, arr, len(data))

    def get_state(self) -> bytes:
        n = self.lc.llama_state_get_size(self.ctx)
        if n == 0:
            return b""
        arr = (ctypes.c_uint8 * n)()
        got = self.lc.llama_state_get_data(self.ctx, arr, n)
        return ctypes.string_at(arr, got)

    def snapshot(self) -> dict:
        mem = self.lc.llama_get_memory(self.ctx)
        seqs = [[self.lc.llama_memory_seq_pos_min(mem, s), self.lc.llama_memory_seq_pos_max(mem, s),
                 self.capi.f16_positions(self.ctx_ptr, s)] for s in range(self.n_seq)]
        st = self.capi.kv_stats(self.ctx_ptr)["logquant"]
        saved = self.get_state()
        try:
            lay = parse_state(saved, dims=self.layout)
            q2 = [list(p) for p in lay.lq.q2_positions(self.n_seq)]
        except ValueError as e:
            lay, q2 = None, f"re-saved state does not parse: {e}"
        return {"seqs": seqs, "n_f16": st["n_f16"], "n_q2": st["n_q2"], "q2": q2, "_lay": lay,
                "_saved_len": len(saved)}

    @staticmethod
    def public(snap: dict) -> dict:
        return {k: v for k, v in snap.items() if not k.startswith("_")}

    def is_empty(self, snap: dict) -> bool:
        return (all(s[1] == -1 for s in snap["seqs"]) and snap["n_f16"] == 0 and snap["n_q2"] == 0
                and isinstance(snap["q2"], list) and not any(snap["q2"]))

    def same(self, a: dict, b: dict, seqs=None) -> bool:
        seqs = range(self.n_seq) if seqs is None else seqs
        if not isinstance(a["q2"], list) or not isinstance(b["q2"], list):
            return False
        return all(a["seqs"][s] == b["seqs"][s] and a["q2"][s] == b["q2"][s] for s in seqs)

    def continue_all(self, snap: dict) -> tuple[int, dict]:
        """Two more tokens for every sequence that has some (or a fresh start for sequence 0)."""
        parts = {}
        for s in range(self.n_seq):
            pmax = snap["seqs"][s][1]
            if pmax >= 0 and pmax < I32_MAX - 8:
                parts[s] = (pmax + 1, [5 + s, 7 + s])
        if not parts and all(x[1] == -1 for x in snap["seqs"]):
            parts = {0: (0, [5, 7, 9])}
        if not parts:
            return 0, {}
        return self.decode(parts)

    # -- one job
    def attempt(self, spec: dict) -> dict:
        res: dict = {"fail": [], "warn": []}
        if self.set_state(self.base) != len(self.base):
            res["fail"].append("base_reload_failed: the correct state no longer loads")
            return res
        before = self.snapshot()
        if not self.same(before, self.base_snap):
            res["fail"].append("base_reload_differs: the correct state loads as another cache")
        if spec["kind"] == "seq":
            return self.attempt_seq(spec, before, res)

        data = apply_spec(spec, self.base, self.layout)
        res["changed"] = data != self.base
        if spec.get("py") and self.py_state is not None:
            from llama_cpp import LlamaState

            s = self.py_state
            try:
                self.llm.load_state(LlamaState(s.input_ids, s.scores, s.n_tokens, data, len(data), s.seed))
                accepted = True
            except (RuntimeError, ValueError) as e:
                accepted, res["exception"] = False, f"{type(e).__name__}: {e}"
        else:
            rc = self.set_state(data)
            accepted, res["rc"] = rc == len(data), rc
        after = self.snapshot()
        res["outcome"] = "accepted" if accepted else "refused"
        if not accepted:
            if not (self.is_empty(after) or self.same(after, before)):
                res["fail"].append("refused_dirty: the cache is neither empty nor as before")
                res["after"] = self.public(after)
        else:
            if after["_lay"] is None:
                res["fail"].append(f"inconsistent: {after['q2']}")
            else:
                bad = [b for b in check_invariants(after["_lay"], self.layout, self.n_seq)
                       if b not in self.base_invariants]
                if bad:
                    res["fail"].append("inconsistent: " + "; ".join(bad))
            bad = self.range_problems(after)
            if bad:
                res["fail"].append("inconsistent: " + "; ".join(bad))
            if spec["kind"] == "none" and not self.same(after, before):
                res["fail"].append("the unchanged state loads as another cache")
        self.check_usable(after, res, data_only=spec["kind"] == "flip" and all(
            self.layout.in_data(o) for o, _ in spec["bytes"]))
        return res

    def attempt_seq(self, spec: dict, before: dict, res: dict) -> dict:
        data = apply_then(spec["then"], seq_state(self.layout, self.base, spec["src"], spec["lq"]))
        arr = (ctypes.c_uint8 * max(len(data), 1)).from_buffer_copy(data or b"\0")
        rc = self.lc.llama_state_seq_set_data(self.ctx, arr, len(data), spec["dest"])
        res["rc"], res["outcome"] = rc, "accepted" if rc == len(data) else "refused"
        after = self.snapshot()
        others = [s for s in range(self.n_seq) if s != spec["dest"]]
        if not self.same(after, before, others):
            lost = [s for s in others if not isinstance(after["q2"], list)
                    or after["seqs"][s] != before["seqs"][s] or after["q2"][s] != before["q2"][s]]
            res["fail"].append(f"seq_restore_hurt_others: sequences {lost} changed by a restore of "
                               f"sequence {spec['dest']}")
            res["before"] = {s: before["seqs"][s][:2] for s in lost}
            res["after"] = {s: after["seqs"][s][:2] for s in lost}
        if after["_lay"] is None:
            res["fail"].append(f"inconsistent: {after['q2']}")
        else:
            bad = [b for b in check_invariants(after["_lay"], self.layout, self.n_seq)
                   if b not in self.base_invariants]
            if bad:
                res["fail"].append("inconsistent: " + "; ".join(bad))
        self.check_usable(after, res, data_only=False)
        return res

    def range_problems(self, snap: dict) -> list[str]:
        """llama_memory_seq_pos_min/max against the positions the re-saved state holds."""
        lay = snap["_lay"]
        if lay is None:
            return []
        f16 = lay.f16_positions(self.n_seq)
        out = []
        for s, (pmin, pmax, _) in enumerate(snap["seqs"]):
            held = f16[s].union(snap["q2"][s])
            want = (min(held), max(held)) if held else (-1, -1)
            if (pmin, pmax) != want:
                out.append(f"sequence {s}: seq_pos_min/max {pmin}, {pmax} but the cache holds "
                           f"{want[0]}..{want[1]}")
        return out

    def check_usable(self, after: dict, res: dict, data_only: bool) -> None:
        rc, logits = self.continue_all(after)
        finite = all(np.isfinite(v).all() for v in logits.values())
        if rc != 0:
            res["warn"].append(f"continuation decode returned {rc}")
        elif not finite:
            (res["warn"] if data_only else res["fail"]).append(
                "non-finite logits after a load" + (" (tensor bytes flipped)" if data_only else ""))
        if rc != 0 or not finite:
            # whatever the state did, the context must work again from an empty cache
            self.lc.llama_memory_clear(self.mem, True)
            rc2, logits2 = self.decode({0: (0, [5, 7, 9])})
            if rc2 != 0 or not np.isfinite(logits2.get(0, np.array([np.nan]))).all():
                res["fail"].append(f"context_broken: a fresh decode after clearing returned {rc2}")

    def final_check(self) -> dict:
        """The correct state again, after all the jobs: it loads, holds what it held, and gives
        its reference logits."""
        out = {"scenario": self.name, "fail": []}
        if self.set_state(self.base) != len(self.base):
            out["fail"].append("the correct state no longer loads")
            return out
        snap = self.snapshot()
        if not self.same(snap, self.base_snap):
            out["fail"].append("the correct state loads as another cache")
        rc, logits = self.continue_all(snap)
        if rc != 0:
            out["fail"].append(f"decode after the correct state returned {rc}")
        else:
            err = max((float(np.abs(logits[s] - self.ref_logits[s]).max()) for s in logits), default=0.0)
            out["max_logit_diff"] = err
            if err > 1e-4:
                out["fail"].append(f"logits differ from the reference by {err}")
        return out

    def info(self) -> dict:
        sec = self.layout.lq
        return {"state_bytes": len(self.base), "lq_section_bytes": self.layout.lq_end - self.layout.lq_start,
                "n_slots": len(sec.slot_pos), "group": sec.group, "groups": sec.n_grp(),
                "group_fill": sec.group_fill, "open": sec.open, "n_layers": len(sec.layers),
                "n_groups_capacity": self.n_groups, "n_seq": self.n_seq, "unified": self.cfg["unified"],
                "seq_pos": [s[:2] for s in self.base_snap["seqs"]], "n_f16": self.base_snap["n_f16"],
                "n_q2": self.base_snap["n_q2"], "base_invariants": self.base_invariants}

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.llm.close()


# ---------------------------------------------------------------------------------------------
# named regression cases: (scenario, spec builder, what must happen)


def _open_group(sc: Scenario) -> int:
    assert sc.layout.lq.open, f"{sc.name}: no open group in the base state"
    return sc.layout.lq.open[0][1]


def _full_group(sc: Scenario) -> int:
    sec = sc.layout.lq
    return next(g for g in range(sec.n_grp()) if sec.group_fill[g] == sec.group)


def _live_slot(sc: Scenario, seq: int = 0) -> int:
    sec = sc.layout.lq
    return next(i for i, (p, ids) in enumerate(zip(sec.slot_pos, sec.slot_ids)) if p >= 0 and seq in ids)


def _mid_cell(sc: Scenario) -> int:
    """The offset of the sequence id of the middle cell of stream 0."""
    cells = sc.layout.streams[0]["cells"]
    return sc.layout.fields[f"kv.cell_seq[0][{len(cells) // 2}][0]"].off


def _seq_with_cells(sc: Scenario, not_seq: int = -1) -> int:
    return next(s for s in range(sc.n_seq) if s != not_seq and sc.base_snap["seqs"][s][1] >= 0)


CASES: dict[str, tuple[str, object, str]] = {
    # group_fill
    "fill_over_open": ("tiny-one-open", lambda sc: {
        "kind": "semantic", "op": "fill", "group": _open_group(sc), "value": sc.layout.lq.group + 8,
        "py": True}, "refused"),
    "fill_full_open": ("tiny-one-open", lambda sc: {
        "kind": "semantic", "op": "fill", "group": _open_group(sc), "value": sc.layout.lq.group}, "refused"),
    "fill_over_closed": ("tiny-unified", lambda sc: {
        "kind": "semantic", "op": "fill", "group": _full_group(sc), "value": 2 * sc.layout.lq.group},
        "refused"),
    "fill_negative": ("tiny-unified", lambda sc: {
        "kind": "semantic", "op": "fill", "group": _full_group(sc), "value": -1}, "refused"),
    "fill_zero_open": ("tiny-unified", lambda sc: {
        "kind": "semantic", "op": "fill", "group": _open_group(sc), "value": 0}, "refused"),
    # n_slots
    "n_slots_past_fill": ("tiny-one-groups", lambda sc: {
        "kind": "semantic", "op": "n_slots", "delta": 1, "seq": None, "pos0": 0}, "refused"),
    "n_slots_group_past_fill": ("tiny-one-groups", lambda sc: {
        "kind": "semantic", "op": "n_slots", "delta": sc.layout.lq.group, "seq": 0, "pos0": 5000}, "refused"),
    "n_slots_huge": ("tiny-one-open", lambda sc: {
        "kind": "set", "field": "lq.n_slots", "value": 1 << 40, "py": True}, "refused"),
    # open groups
    "open_group_shared": ("tiny-streams", lambda sc: {
        "kind": "semantic", "op": "open_set", "index": 1, "seq": sc.layout.lq.open[1][0],
        "group": sc.layout.lq.open[0][1]}, "refused"),
    "open_group_full": ("tiny-unified", lambda sc: {
        "kind": "semantic", "op": "open_set", "index": 0, "seq": sc.layout.lq.open[0][0],
        "group": _full_group(sc)}, "refused"),
    "open_group_last_full": ("tiny-one-groups", lambda sc: {
        "kind": "semantic", "op": "fill", "group": _open_group(sc), "value": sc.layout.lq.group}, "refused"),
    "open_seq_twice": ("tiny-unified", lambda sc: {
        "kind": "semantic", "op": "open_set", "index": len(sc.layout.lq.open), "seq": sc.layout.lq.open[0][0],
        "group": _full_group(sc)}, "refused"),
    "open_seq_out_of_range": ("tiny-unified", lambda sc: {
        "kind": "set", "field": "lq.open_seq[0]", "value": sc.n_seq}, "refused"),
    # slot sequence ids
    "slot_seq_out_of_range": ("tiny-unified", lambda sc: {
        "kind": "semantic", "op": "slot", "slot": _live_slot(sc), "ids": [sc.n_seq]}, "refused"),
    "slot_seq_twice": ("tiny-unified", lambda sc: {
        "kind": "semantic", "op": "slot", "slot": _live_slot(sc), "ids": [0, 0]}, "refused"),
    "slot_seq_count_over": ("tiny-streams", lambda sc: {
        "kind": "set", "field": f"lq.slot_nids[{_live_slot(sc)}]", "value": sc.n_seq + 1}, "refused"),
    "slot_no_sequence": ("tiny-unified", lambda sc: {
        "kind": "semantic", "op": "slot", "slot": _live_slot(sc), "ids": []}, "refused_or_consistent"),
    "slot_sequence_no_position": ("tiny-unified", lambda sc: {
        "kind": "semantic", "op": "slot", "slot": _live_slot(sc), "pos": -1}, "refused_or_consistent"),
    "slot_position_twice": ("tiny-one-groups", lambda sc: {
        "kind": "semantic", "op": "slot", "slot": _live_slot(sc) + 1,
        "pos": sc.layout.lq.slot_pos[_live_slot(sc)]}, "refused_or_consistent"),
    # a sequence's own state: whatever it gives, the other sequences stay
    "seq_restore_unified": ("tiny-unified", lambda sc: {
        "kind": "seq", "src": 1, "dest": 1, "lq": True, "then": None}, "others_intact"),
    "seq_restore_unified_no_lq": ("tiny-unified", lambda sc: {
        "kind": "seq", "src": 1, "dest": 1, "lq": False, "then": None}, "others_intact"),
    "seq_restore_streams": ("tiny-streams", lambda sc: {
        "kind": "seq", "src": 1, "dest": 1, "lq": True, "then": None}, "others_intact"),
    "seq_restore_truncated": ("tiny-unified", lambda sc: {
        "kind": "seq", "src": 0, "dest": 0, "lq": True, "then": {"kind": "truncate_frac", "frac": 0.5}},
        "others_intact"),
    # controls: the state as saved loads; a cut inside the section is refused
    "valid_unified": ("tiny-unified", lambda sc: {"kind": "none"}, "accepted"),
    "valid_streams": ("tiny-streams", lambda sc: {"kind": "none"}, "accepted"),
    "truncated_staging": ("tiny-one-open", lambda sc: {
        "kind": "truncate", "len": sc.layout.size - 3, "py": True}, "refused"),
    # cut inside llama.cpp's own cell list (state_read_meta throws before the LogQuant section)
    "truncated_cell_list": ("tiny-unified", lambda sc: {
        "kind": "truncate", "len": _mid_cell(sc) + 2}, "refused"),
}


def verdict(case_expect: str, res: dict) -> list[str]:
    """Why a case's result does not meet its expectation (empty: it does)."""
    out = list(res.get("fail", []))
    oc = res.get("outcome")
    if oc in ("crash", "hang"):
        return out or [oc]
    if case_expect == "refused" and oc != "refused":
        out.append(f"expected refused, got {oc}")
    if case_expect == "accepted" and oc != "accepted":
        out.append(f"expected accepted, got {oc}")
    return out


# ---------------------------------------------------------------------------------------------
# jobs, workers, the parent


def build_jobs(args) -> list[dict]:
    if args.cases:
        names = list(CASES) if args.cases == "all" else args.cases.split(",")
        jobs = [{"i": k, "scenario": CASES[n][0], "case": n} for k, n in enumerate(names)]
        return sorted(jobs, key=lambda j: (list(SCENARIOS).index(j["scenario"]), j["i"]))
    scen = [s.strip() for s in args.scenarios.split(",")] if args.scenarios else list(TINY)
    if args.real:
        scen += [s for s in REAL if s not in scen]
    tiny = [s for s in scen if SCENARIOS[s]["model"] == "tiny"]
    real = [s for s in scen if SCENARIOS[s]["model"] != "tiny"]
    jobs, i = [], 0
    for group, total in ((tiny, args.n), (real, args.real_n)):
        for k, s in enumerate(group):
            share = total * (k + 1) // len(group) - total * k // len(group)
            for m in range(share):
                # the first job of a scenario loads the state unchanged: a check of the harness
                jobs.append({"i": i, "scenario": s, **({"first": True} if m == 0 else {})})
                i += 1
    return jobs


def job_spec(job: dict, sc: Scenario, seed: int) -> dict:
    if "case" in job:
        return CASES[job["case"]][1](sc)
    rng = random.Random(f"{seed}:{job['scenario']}:{job['i']}")
    spec = {"kind": "none"} if job.get("first") else sc.gen.random(rng)
    if sc.n_seq == 1 and spec["kind"] != "none" and rng.random() < 0.25:
        spec["py"] = True   # through Llama.load_state (a RuntimeError on refusal)
    return spec


def model_path(kind: str, tmp: Path) -> str:
    if kind == "tiny":
        p = tmp / "tiny-fuzz.gguf"
        if not p.exists():
            sys.path.insert(0, str(REPO / "tests"))
            from tiny_model import write_tiny_llama

            write_tiny_llama(p, seed=7)
        return str(p)
    from logquant_gguf import models

    return str(models.default_model_path())


def worker_main(args) -> int:
    proto = os.fdopen(args.proto_fd, "w", buffering=1) if args.proto_fd >= 0 else sys.stdout

    def emit(**kw):
        proto.write(json.dumps(kw) + "\n")
        proto.flush()

    # the package under test: the source tree (its native libs built into it), or the scratch
    # copy of an instrumented build (scripts/asan_fuzz.sh)
    sys.path.insert(0, str(Path(args.package_root).resolve()))
    import logquant_gguf
    from logquant_gguf import _capi, _runtime

    if args.expect_lib and _runtime.LIB_DIR.resolve() != Path(args.expect_lib).resolve():
        emit(ev="fatal", error=f"logquant_gguf loads {_runtime.LIB_DIR}, not {args.expect_lib}")
        return 3
    jobs = json.loads(Path(args.jobs_file).read_text())[args.skip:]
    if args.only is not None:
        jobs = [j for j in jobs if j["i"] == args.only]
    tmp = Path(args.tmp)
    emit(ev="hello", lib=str(_runtime.LIB_DIR), package=str(Path(logquant_gguf.__file__).parent),
         build=_capi.build_info())
    sc = None
    for k, job in enumerate(jobs):
        if sc is None or sc.name != job["scenario"]:
            if sc is not None:
                sc.close()
            print(f"##fuzz setup {job['scenario']}", file=sys.stderr, flush=True)
            emit(ev="setup", scenario=job["scenario"], i=job["i"])
            sc = Scenario(job["scenario"], model_path(SCENARIOS[job["scenario"]]["model"], tmp), args.threads)
            emit(ev="ready", scenario=sc.name, info=sc.info())
        try:
            spec = job_spec(job, sc, args.seed)
        except Exception as e:  # a case that does not fit its scenario's state: a harness error
            spec = {"kind": "error", "error": f"{type(e).__name__}: {e}"}
        emit(ev="begin", i=job["i"], spec=spec)
        print(f"##fuzz {'alone' if args.only is not None else 'job'} {job['i']}", file=sys.stderr, flush=True)
        if spec["kind"] == "error":
            res = {"outcome": "error", "fail": [f"harness_error: {spec['error']}"], "warn": []}
        else:
            try:
                res = sc.attempt(spec)
            except Exception:  # our own bug, or an API that raised: not a verdict on the cache
                res = {"outcome": "error", "fail": ["harness_error: " + traceback.format_exc(limit=4)[-600:]],
                       "warn": []}
        sys.stderr.flush()
        emit(ev="end", i=job["i"], res=res)
        last_of_scenario = k + 1 == len(jobs) or jobs[k + 1]["scenario"] != sc.name
        if last_of_scenario:
            print(f"##fuzz final {sc.name}", file=sys.stderr, flush=True)
            emit(ev="final", **sc.final_check())
    if sc is not None:
        sc.close()
    emit(ev="bye")
    return 0


REPORT_RE = re.compile(r"ERROR: AddressSanitizer|SUMMARY: |runtime error:|GGML_ASSERT|Segmentation fault|"
                       r"terminate called|what\(\):|^\s*#\d+ +0x|Aborted|double free|corrupted|"
                       r"malloc\(\)|free\(\)|AddressSanitizer|READ of size|WRITE of size|is located")
GDB_NOISE = re.compile(r"^\[Thread|^\[New Thread|^\[Inferior|^Using host|^warning: |^To enable|"
                       r"^To completely|^For more information|^line to your|^\s+add-auto-load|"
                       r"^\s+set auto-load|^\d+\s|^\s*$|No such file|^#\d+ ")


def log_segments(text: str) -> dict[str, dict[str, list[str]]]:
    """The worker log split at the markers: per job, the sanitizer/crash lines and llama.cpp's
    own messages (why a state was refused)."""
    segs: dict[str, dict[str, list[str]]] = {}
    key = "start"
    for line in text.splitlines():
        if line.startswith("##fuzz "):
            parts = line.split()
            key = f"{parts[1]} {parts[2]}"
            continue
        seg = segs.setdefault(key, {"report": [], "log": []})
        if REPORT_RE.search(line):
            if len(seg["report"]) < 60:
                seg["report"].append(line.rstrip()[:300])
        elif not GDB_NOISE.search(line) and len(seg["log"]) < 20:
            seg["log"].append(line.strip()[:300])
    return segs


def run_parent(args) -> int:
    t0 = time.time()
    jobs = build_jobs(args)
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-state-"))
    jobs_file = tmp / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    for m in {SCENARIOS[j["scenario"]]["model"] for j in jobs}:
        if m == "tiny":
            model_path("tiny", tmp)
    log_path = Path(args.worker_log) if args.worker_log else tmp / "worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_start = log_path.stat().st_size if log_path.exists() else 0
    results: dict[int, dict] = {}
    specs: dict[int, dict] = {}
    finals, infos = [], {}
    done = 0
    asan = "asan" in os.environ.get("LD_PRELOAD", "")
    restarts = 0
    state = {"current": None, "scenario": None, "deadline": 0.0, "fatal": None, "hello": None}

    def limit():
        if not asan and args.mem_limit_gb > 0:
            import resource

            lim = int(args.mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    def run_worker(extra: list[str], on_end) -> tuple[int, bool]:
        """One worker process over the jobs it is given; returns (exit status, hung)."""
        r_fd, w_fd = os.pipe()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--jobs-file", str(jobs_file),
               "--proto-fd", str(w_fd), "--seed", str(args.seed), "--tmp", str(tmp),
               "--threads", str(args.threads), "--package-root", args.package_root, *extra]
        if args.expect_lib:
            cmd += ["--expect-lib", args.expect_lib]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, pass_fds=(w_fd,), preexec_fn=limit,
                                    cwd=str(REPO))
        os.close(w_fd)
        state.update(current=None, scenario=None, deadline=time.time() + args.setup_timeout)
        buf, hung = b"", False
        with os.fdopen(r_fd, "rb", buffering=0) as pipe:
            while True:
                ready, _, _ = select.select([pipe], [], [], max(0.0, state["deadline"] - time.time()))
                if not ready:
                    hung = True
                    proc.kill()
                    break
                chunk = pipe.read(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    ev = json.loads(line)
                    kind = ev["ev"]
                    if kind == "hello":
                        state["hello"] = state["hello"] or ev
                    elif kind == "fatal":
                        state["fatal"] = ev["error"]
                    elif kind == "setup":
                        state.update(scenario=ev["scenario"], current=None,
                                     deadline=time.time() + args.setup_timeout)
                    elif kind == "ready":
                        infos[ev["scenario"]] = ev["info"]
                        state["deadline"] = time.time() + args.timeout
                    elif kind == "begin":
                        state.update(current=ev["i"], deadline=time.time() + args.timeout)
                        specs.setdefault(ev["i"], ev["spec"])
                    elif kind == "end":
                        state.update(current=None, deadline=time.time() + args.timeout)
                        on_end(ev)
                    elif kind == "final":
                        if "--only" not in extra:
                            finals.append(ev)
                        state["deadline"] = time.time() + args.setup_timeout
        return proc.wait(), hung

    def on_end(ev):
        nonlocal done
        results[ev["i"]] = ev["res"]
        done += 1
        if args.progress and done % args.progress == 0:
            print(f"  {done}/{len(jobs)} jobs, {time.time() - t0:.0f} s", flush=True)

    while done < len(jobs) and state["fatal"] is None:
        rc, hung = run_worker(["--skip", str(done)], on_end)
        if state["fatal"] is not None or done >= len(jobs):
            break
        # the worker died (or hung): blame the job it was on, or the scenario's setup
        sig = -rc if rc < 0 else None
        outcome = "hang" if hung else "crash"
        if state["current"] is not None:
            results[state["current"]] = {"outcome": outcome, "exit": rc, "signal": sig, "fail": [outcome],
                                         "warn": []}
            done += 1
        else:
            # setup crashed: every job of that scenario is lost
            lost = [j for j in jobs[done:] if j["scenario"] == (state["scenario"] or jobs[done]["scenario"])]
            for j in lost:
                results[j["i"]] = {"outcome": "setup_" + outcome, "exit": rc, "signal": sig,
                                   "fail": [f"scenario setup {outcome}"], "warn": []}
            done += len(lost)
        restarts += 1
        n_crashed = sum(r.get("outcome") in ("crash", "hang") for r in results.values())
        if args.max_crashes and n_crashed >= args.max_crashes:
            for j in jobs[done:]:
                results[j["i"]] = {"outcome": "skipped", "fail": [], "warn": []}
            done = len(jobs)
            break

    # A crash may be the late effect of an earlier job's memory corruption in the same worker:
    # replay the crashed jobs one at a time in fresh workers.
    crashed = [i for i in sorted(results) if results[i].get("outcome") in ("crash", "hang")]
    for i in crashed[:args.confirm]:
        got: dict = {}
        rc, hung = run_worker(["--only", str(i)], lambda ev, got=got: got.update(ev["res"]))
        if got:
            results[i]["alone"] = got.get("outcome")
        else:
            results[i]["alone"] = "hang" if hung else "crash" if rc != 0 else "no result"
    hello, fatal = state["hello"], state["fatal"]

    # sanitizer reports, refusal reasons: from the worker log
    text = log_path.read_bytes()[log_start:].decode("utf-8", "replace")
    segs = log_segments(text)
    by_i = {j["i"]: j for j in jobs}
    for i, res in results.items():
        seg = segs.get(f"job {i}", {"report": [], "log": []})
        if seg["log"] and res.get("outcome") not in ("crash", "hang"):
            res["reason"] = " | ".join(seg["log"][-3:])
        if seg["report"]:
            res["report"] = seg["report"][:40]
            if any("runtime error:" in ln for ln in seg["report"]):
                first = next(ln for ln in seg["report"] if "runtime error:" in ln)
                res.setdefault("warn", []).append("UBSan: " + first.split("runtime error:")[1][:120])
    summary = summarize(jobs, results, specs, finals, infos, segs, args)
    summary["elapsed_s"] = round(time.time() - t0, 1)
    summary["worker_restarts"] = restarts
    if fatal:
        summary["fatal"] = fatal
    out = {"summary": summary, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
           "build": hello and hello.get("build"), "lib": hello and hello.get("lib"),
           "scenarios": infos, "finals": finals,
           "crashes": [dict(index=i, scenario=by_i[i]["scenario"], case=by_i[i].get("case"),
                            mutation=specs.get(i),
                            **{k: results[i].get(k) for k in ("outcome", "signal", "exit", "alone",
                                                                "report")},
                            alone_report=segs.get(f"alone {i}", {}).get("report", [])[:40])
                       for i in sorted(results) if results[i].get("outcome") in ("crash", "hang")]}
    jobs_out = []
    for j in jobs:
        res = results.get(j["i"], {"outcome": "missing", "fail": ["no result"], "warn": []})
        row = {"i": j["i"], "scenario": j["scenario"], **({"case": j["case"]} if "case" in j else {}),
               "spec": specs.get(j["i"]), **res}
        if "case" in j:
            row["expect"] = CASES[j["case"]][2]
            row["problems"] = verdict(row["expect"], res)
        if args.all_jobs or "case" in j or res.get("fail") or res.get("warn"):
            jobs_out.append(row)
    for row in jobs_out:
        if row.get("outcome") in ("crash", "hang"):
            row.pop("report", None)  # in "crashes"
        elif row.get("report"):
            row["report"] = row["report"][:20]
    out["jobs"] = jobs_out
    print_summary(out)
    shutil.rmtree(tmp, ignore_errors=True)  # the tiny model, the job list, the default worker log
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"written {args.out}")
    bad = summary["crashed"] + summary["hung"] + summary["failed"] + summary.get("final_failed", 0)
    if args.cases:
        bad += sum(1 for r in jobs_out if r.get("problems"))
    return 1 if bad or fatal else 0


def summarize(jobs, results, specs, finals, infos, segs, args) -> dict:
    outcomes: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    by_scen: dict[str, dict[str, int]] = {}
    fails: dict[str, int] = {}
    warns: dict[str, int] = {}
    for j in jobs:
        r = results.get(j["i"], {"outcome": "missing"})
        oc = r.get("outcome", "missing")
        outcomes[oc] = outcomes.get(oc, 0) + 1
        kind = (specs.get(j["i"]) or {}).get("kind", "?")
        if kind == "semantic":
            kind += ":" + specs[j["i"]]["op"]
        by_kind.setdefault(kind, {}).setdefault(oc, 0)
        by_kind[kind][oc] += 1
        by_scen.setdefault(j["scenario"], {}).setdefault(oc, 0)
        by_scen[j["scenario"]][oc] += 1
        for f in r.get("fail", []):
            key = f.split(":")[0]
            fails[key] = fails.get(key, 0) + 1
        for w in r.get("warn", []):
            key = w.split(":")[0] if w.startswith("UBSan") else re.sub(r"-?\d+", "N", w)[:60]
            warns[key] = warns.get(key, 0) + 1
    crashed = outcomes.get("crash", 0) + outcomes.get("setup_crash", 0)
    hung = outcomes.get("hang", 0) + outcomes.get("setup_hang", 0)
    failed = sum(1 for r in results.values() if r.get("fail") and r.get("outcome") not in
                 ("crash", "hang", "setup_crash", "setup_hang"))
    asan = sum(1 for seg in segs.values() for ln in seg["report"] if "ERROR: AddressSanitizer" in ln)
    ubsan = sum(1 for seg in segs.values() for ln in seg["report"] if "runtime error:" in ln)
    alone = [r["alone"] for r in results.values() if r.get("outcome") in ("crash", "hang") and "alone" in r]
    return {"jobs": len(jobs), "refused": outcomes.get("refused", 0), "accepted": outcomes.get("accepted", 0),
            "crashed": crashed, "hung": hung, "crashes_replayed_alone": len(alone),
            "crashes_reproduced_alone": sum(a in ("crash", "hang") for a in alone), "failed": failed,
            "outcomes": outcomes, "failures": fails, "warnings": warns, "asan_reports": asan,
            "ubsan_reports": ubsan, "final_failed": sum(1 for f in finals if f.get("fail")),
            "by_kind": by_kind, "by_scenario": by_scen}


def print_summary(out: dict) -> None:
    s = out["summary"]
    print(f"state fuzz: {s['jobs']} jobs: {s['refused']} refused, {s['accepted']} accepted, "
          f"{s['crashed']} crashed, {s['hung']} hung, {s['failed']} failed checks "
          f"({s.get('elapsed_s', 0)} s, lib {out.get('lib')})")
    if s.get("fatal"):
        print(f"  fatal: {s['fatal']}")
    for k, v in sorted(s["failures"].items(), key=lambda kv: -kv[1]):
        print(f"  failure {k}: {v}")
    for k, v in sorted(s["warnings"].items(), key=lambda kv: -kv[1])[:10]:
        print(f"  warning {k}: {v}")
    if s["crashed"] or s["hung"]:
        print(f"  crashes replayed alone: {s['crashes_replayed_alone']}, "
              f"reproduced: {s['crashes_reproduced_alone']}")
    if s["asan_reports"] or s["ubsan_reports"]:
        print(f"  sanitizer reports: ASan {s['asan_reports']}, UBSan {s['ubsan_reports']}")
    for f in out["finals"]:
        print(f"  final {f['scenario']}: {'ok' if not f['fail'] else f['fail']}"
              f" (logit diff {f.get('max_logit_diff')})")
    for c in out["crashes"][:15]:
        rep = next((ln for ln in (c.get("report") or [])
                    if any(w in ln for w in ("ERROR", "SUMMARY", "GGML", "free", "malloc"))), "")
        print(f"  {c['outcome']} job {c['index']} {c['scenario']} signal {c.get('signal')} "
              f"(alone: {c.get('alone')}): "
              f"{json.dumps(c['mutation'])[:200]} {rep.strip()[:200]}")
    for r in out["jobs"]:
        if r.get("problems"):
            print(f"  case {r['case']}: {r['problems']} (outcome {r.get('outcome')}, "
                  f"reason {r.get('reason')})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1200, help="mutations on the tiny models' states")
    ap.add_argument("--real", action="store_true", help="also the default Qwen model's states")
    ap.add_argument("--real-n", type=int, default=200, help="mutations on the Qwen states (with --real)")
    ap.add_argument("--scenarios", default="", help=f"comma-separated, of {', '.join(SCENARIOS)}")
    ap.add_argument("--cases", default="", help=f"named regression cases ('all', or of {', '.join(CASES)})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads (1: robust on a loaded machine)")
    ap.add_argument("--timeout", type=float, default=120,
                    help="seconds a job may take before it counts as a hang")
    ap.add_argument("--setup-timeout", type=float, default=900)
    ap.add_argument("--mem-limit-gb", type=float, default=8,
                    help="address-space limit of a worker (not under ASan)")
    ap.add_argument("--confirm", type=int, default=40,
                    help="replay up to this many crashed jobs alone, each in a fresh worker")
    ap.add_argument("--max-crashes", type=int, default=0, help="stop after this many crashes (0: never)")
    ap.add_argument("--out", help="write the result as JSON")
    ap.add_argument("--all-jobs", action="store_true",
                    help="every job in the JSON (default: those with a failed check or a warning)")
    ap.add_argument("--worker-log", help="where the workers' stdout/stderr go (default: a temporary file)")
    ap.add_argument("--package-root", default=os.environ.get("LOGQUANT_FUZZ_PACKAGE_ROOT", str(REPO)),
                    help="the folder holding the logquant_gguf package to test "
                         "(default: $LOGQUANT_FUZZ_PACKAGE_ROOT, else this checkout)")
    ap.add_argument("--expect-lib", help="refuse to run unless logquant_gguf loads its libraries from here")
    ap.add_argument("--progress", type=int, default=0, help="print progress every N jobs")
    ap.add_argument("--only", type=int, help="run job I in this process (reproduce a crash under a debugger)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jobs-file", help=argparse.SUPPRESS)
    ap.add_argument("--skip", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--proto-fd", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)
    if args.only is not None:
        tmp = Path(tempfile.mkdtemp(prefix="fuzz-state-"))
        jobs_file = tmp / "jobs.json"
        jobs_file.write_text(json.dumps(build_jobs(args)))
        args.jobs_file, args.tmp, args.skip = str(jobs_file), str(tmp), 0
        try:
            return worker_main(args)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
