"""ctypes view of the native core's C API (mirrors the headers in native/cpu and native/common)."""
from __future__ import annotations

import ctypes

import numpy as np


class AttnParams(ctypes.Structure):
    _fields_ = [("head_dim", ctypes.c_int32), ("n_head", ctypes.c_int32),
                ("n_head_kv", ctypes.c_int32), ("scale", ctypes.c_float),
                ("softcap", ctypes.c_float), ("max_bias", ctypes.c_float)]


class RopeParams(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_int32), ("n_dims", ctypes.c_int32),
                ("freq_base", ctypes.c_float), ("freq_scale", ctypes.c_float),
                ("attn_factor", ctypes.c_float)]


class TierF16(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("k", ctypes.c_void_p), ("nb_k", ctypes.c_size_t),
                ("v", ctypes.c_void_p), ("nb_v", ctypes.c_size_t), ("mask", ctypes.c_void_p)]


class TierQ2(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("G", ctypes.c_int32), ("k_bits", ctypes.c_int32),
                ("v_bits", ctypes.c_int32), ("k", ctypes.c_void_p),
                ("nb_kg", ctypes.c_size_t), ("v", ctypes.c_void_p), ("nb_v", ctypes.c_size_t),
                ("pos", ctypes.c_void_p), ("rope", RopeParams), ("rope_table", ctypes.c_void_p),
                ("mask", ctypes.c_void_p), ("score_correction", ctypes.c_int32),
                ("k_widths", ctypes.c_void_p), ("v_per_channel", ctypes.c_int32),
                ("refs", ctypes.c_void_p)]


class AbShape(ctypes.Structure):  # lq2-attn-block.h
    _fields_ = [("D", ctypes.c_int32), ("gq", ctypes.c_int32), ("n_head", ctypes.c_int32),
                ("hk", ctypes.c_int32), ("scale", ctypes.c_float), ("softcap", ctypes.c_float),
                ("max_bias", ctypes.c_float), ("G", ctypes.c_int32), ("k_bits", ctypes.c_int32),
                ("v_bits", ctypes.c_int32), ("rope_mode", ctypes.c_int32), ("rope_n_dims", ctypes.c_int32),
                ("rope_attn_factor", ctypes.c_float), ("score_correction", ctypes.c_int32),
                ("v_per_channel", ctypes.c_int32), ("k_widths", ctypes.c_int32), ("s8", ctypes.c_int32)]


class AttnGeom(ctypes.Structure):  # lq2-attn-block.h: the scalars of GGML_OP_LQ2_ATTN
    _fields_ = [(n, ctypes.c_int64) for n in (
                    "q_nb1", "q_nb2", "k_nb2", "k_nb3", "v_nb2", "v_nb3", "n_kv", "mask_nb1", "kg_bytes",
                    "v2_stride", "mask2_nb1", "rope_nb1", "n_slots", "n_tokens", "n_tps", "dst_nb1",
                    "dst_nb2")] + \
               [(n, ctypes.c_int32) for n in ("mask_f16", "n_head_kv", "n_part", "unused")] + \
               [("shape", AbShape)]


class AttnArgs(ctypes.Structure):  # lq2-attn-block.h: the op's pointers and its scalars
    _fields_ = [(n, ctypes.c_void_p)
                for n in ("q", "k", "v", "mask", "k2", "v2", "mask2", "rope", "parts", "dst", "k_widths", "refs")] + \
               [("g", AttnGeom)]


F32P = np.ctypeslib.ndpointer(np.float32, flags="C")
VOIDP = ctypes.c_void_p
I64 = ctypes.c_int64
INT = ctypes.c_int


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    sig = {
        "lq2_cpu_has_avx2": ([], ctypes.c_int),
        "lq2_type_traits_check": ([], ctypes.c_int),
        "lq2_quantize_v_row": ([F32P, VOIDP, I64, INT, INT], None),
        "lq2_quantize_v_row_ref": ([F32P, VOIDP, I64, INT, INT], None),
        "lq2_dequantize_v_row": ([VOIDP, F32P, I64, INT], None),
        "lq2_dequantize_v_row_ref": ([VOIDP, F32P, I64, INT], None),
        # key groups: the references (8-bit headers) before the output, None for f16 headers
        "lq2_quantize_k_group": ([F32P, I64, INT, INT, INT, INT, INT, VOIDP, VOIDP], None),
        "lq2_quantize_k_group_ref": ([F32P, I64, INT, INT, INT, INT, INT, VOIDP, VOIDP], None),
        "lq2_dequantize_k_group": ([VOIDP, INT, INT, INT, INT, VOIDP, F32P, I64], None),
        "lq2_dequantize_k_group_cm": ([VOIDP, INT, INT, INT, VOIDP, F32P], None),
        "lq2_dequantize_k_group_cm_ref": ([VOIDP, INT, INT, INT, VOIDP, F32P], None),
        "lq2_quantize_k_group_w": ([F32P, I64, INT, INT, INT, VOIDP, INT, VOIDP, VOIDP], None),
        "lq2_dequantize_k_group_cm_w": ([VOIDP, INT, INT, VOIDP, VOIDP, F32P], None),
        "lq2_dequantize_k_group_cm_w_ref": ([VOIDP, INT, INT, VOIDP, VOIDP, F32P], None),
        "logquant_policy_n_full": ([I64, ctypes.c_int32], I64),
        "logquant_policy_full_indices": ([I64, ctypes.c_int32, VOIDP], I64),
        "logquant_policy_transition": ([VOIDP, I64, VOIDP, I64, ctypes.c_int32,
                                        VOIDP, VOIDP, VOIDP, VOIDP], ctypes.c_int),
        "lq2_rope_rows": ([ctypes.POINTER(RopeParams), F32P, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int32, ctypes.c_int], None),
        "lq2_rope_table_size": ([ctypes.POINTER(RopeParams), I64, ctypes.c_int], ctypes.c_size_t),
        "lq2_rope_table": ([ctypes.POINTER(RopeParams), VOIDP, I64, ctypes.c_int, VOIDP], None),
        "lq2_attn_work_size": ([ctypes.POINTER(AttnParams), ctypes.c_int, ctypes.c_int], ctypes.c_size_t),
    }
    attn = [ctypes.POINTER(AttnParams), F32P, ctypes.POINTER(TierF16), ctypes.POINTER(TierQ2),
            F32P, ctypes.c_int, ctypes.c_int, VOIDP]
    sig["lq2_attn_heads"] = (attn, ctypes.c_int)
    sig["lq2_attn_heads_ref"] = (attn, ctypes.c_int)
    sig["lq2_attn_partial"] = ([ctypes.POINTER(AttnParams), F32P, ctypes.POINTER(TierF16),
                                ctypes.POINTER(TierQ2), INT, INT, F32P, F32P, F32P, VOIDP], ctypes.c_int)
    sig["lq2_attn_merge"] = ([INT, INT, F32P, ctypes.c_size_t, F32P], None)
    # the GPU decode attention's program run on the host (lq2_attn_block_host.c)
    sig["lq2_ab_emulate"] = ([ctypes.POINTER(AttnArgs), INT], ctypes.c_int)
    sig["lq2_ab_args_size"] = ([], ctypes.c_size_t)
    sig["lq2_test_rope_cos_sin_f32"] = ([ctypes.c_int32, ctypes.c_float, ctypes.c_float, F32P], None)
    for name, (args, res) in sig.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = args, res
    return lib


def ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data
