// lq2-dequant-block.h: the per-thread work of the prefill path's dequantization
// (GGML_OP_LQ2_DEQUANT) on a GPU: both tiers laid out in f16 for the backend's own flash
// attention. Written for C, CUDA and Metal (the pointers carry their address space); the CUDA and
// Metal kernels call one function per thread, and the host check (tests/native/lq2_ops_check.cpp)
// calls them for every index on the CPU op's own tensors.
#pragma once

#include "lq2-format.h"

#if defined(__cplusplus) && !defined(__METAL_VERSION__)
extern "C" {
#endif

// The scalars of GGML_OP_LQ2_DEQUANT (one constant buffer for Metal). The result is both tiers in
// one f16 tensor [D, n_head_kv, n_slots + n_kv, 2]: keys, then values dst_nb3 bytes further.
struct lq2_dequant_geom {
    int64_t k_group_bytes, rope_table_nb1;
    int64_t v2_stride;                 // bytes per value row (per token) or value group (per channel)
    int64_t k_nb2, v_nb2;              // f16 tier views [D, n_head_kv, n_kv, 1]
    int64_t n_kv, n_slots, dst_nb3;
    int32_t D, n_head_kv, G, k_bits, v_bits;
    int32_t rope_mode, rope_n_dims;    // as lq2_rope_params
    int32_t v_per_channel;             // values grouped per channel (lq2-op-params.h)
    int32_t k_widths;                  // 1: the args' k_widths give each key channel's width
    int32_t s8;                        // 1: 8-bit block headers from the args' refs (lq2-format.h)
};

#define LQ2_DQ_MAX_D 512 // head size: a thread holds one token's key of one kv head

// The op: its tensors' pointers and the scalars (lq2_dequant_args_of fills them; the Metal kernel
// from its buffers).
struct lq2_dequant_args {
    const LQ2_DEV uint8_t * k2;
    const LQ2_DEV uint8_t * v2;
    const LQ2_DEV char    * rope_table; // 0 when rope_n_dims is 0
    const LQ2_DEV char    * k;
    const LQ2_DEV char    * v;
    LQ2_DEV lq2_half      * dst;
    const LQ2_DEV int8_t  * k_widths; // I8 [n_head_kv * D] when g.k_widths, else unused
    const LQ2_DEV float   * refs;     // F32 [2, channels] when g.s8 (lq2-op-params.h), else unused
    struct lq2_dequant_geom g;
};

// The shapes the kernels take (given a table when the keys are pre-RoPE). Values grouped per
// channel take the key block types (as the CPU cache decides per layer).
LQ2_INLINE int lq2_dequant_shape_ok(int D, int G, int k_bits, int k_widths, int v_bits, int v_per_channel,
                                    int rope_mode, int n_dims, int64_t n_slots) {
    return lq2_key_bits_ok(G, k_bits, k_widths) &&
           (v_per_channel ? lq2_key_type_b(G, v_bits) >= 0 : lq2_value_type(v_bits) >= 0) && D % LQ2_QK_V == 0 &&
           D <= LQ2_DQ_MAX_D && n_slots % G == 0 && n_dims >= 0 && n_dims <= D && n_dims % 2 == 0 &&
           (rope_mode == 0 || rope_mode == 2);
}

// Keys: token t of group g, kv head hk: dequantized, re-rotated with the group's table rows, f16.
// The channels are read in order first, so that mixed widths' block offsets are a running sum.
LQ2_INLINE void lq2_dequant_key(const LQ2_TH struct lq2_dequant_args * a, int64_t g, int hk, int t) {
    const int D = a->g.D, G = a->g.G, nd = a->g.rope_n_dims, half = nd / 2, s8 = a->g.s8;
    const int kbs = LQ2_BLOCK_BYTES_H(G, a->g.k_bits, s8);
    const LQ2_DEV float * krefs = s8 ? a->refs + (int64_t) 2 * hk * D : 0;
    const LQ2_DEV uint8_t * kg = a->k2 + g * a->g.k_group_bytes + (int64_t) hk * D * kbs;
    const LQ2_DEV int8_t * kw = a->g.k_widths ? a->k_widths + (int64_t) hk * D : 0;
    const LQ2_DEV lq2_half * cs = (const LQ2_DEV lq2_half *) (a->rope_table ? a->rope_table + g * a->g.rope_table_nb1 : a->rope_table);
    LQ2_DEV lq2_half * row = a->dst + ((g * G + t) * a->g.n_head_kv + hk) * D;
    float x[LQ2_DQ_MAX_D];
    for (int c = 0, off = 0; c < D; ++c) {
        const int b = kw ? (int) kw[c] : a->g.k_bits;
        x[c] = lq2_block_value(kg + off, G, b, t, lq2_ref_at(krefs, c));
        off += LQ2_BLOCK_BYTES_H(G, b, s8);
    }
    for (int i = 0; i < half; ++i) {
        const int ca = a->g.rope_mode == 2 ? i : 2 * i, cb = a->g.rope_mode == 2 ? i + half : 2 * i + 1;
        const float x0 = x[ca];
        const float x1 = x[cb];
        const float ct = lq2_fp16_to_fp32(cs[2 * i * G + t]), st = lq2_fp16_to_fp32(cs[2 * i * G + G + t]);
        row[ca] = lq2_fp32_to_fp16(LQ2_FMA(x0, ct, -(x1 * st)));
        row[cb] = lq2_fp32_to_fp16(LQ2_FMA(x0, st, x1 * ct));
    }
    for (int c = nd; c < D; ++c) {
        row[c] = lq2_fp32_to_fp16(x[c]);
    }
}

// Values: element e of the 2-bit rows (slot e / nv, channel e % nv over all kv heads), f16: from
// the slot's row of blocks, or (per channel) code s % G of channel c's block in group s / G.
LQ2_INLINE void lq2_dequant_value(const LQ2_TH struct lq2_dequant_args * a, int64_t e) {
    const int64_t nv = (int64_t) a->g.D * a->g.n_head_kv, s = e / nv, c = e % nv;
    LQ2_DEV lq2_half * vout = (LQ2_DEV lq2_half *) ((LQ2_DEV char *) a->dst + a->g.dst_nb3);
    float x;
    if (a->g.v_per_channel) {
        const int G = a->g.G;
        const LQ2_DEV uint8_t * b = a->v2 + (s / G) * a->g.v2_stride + c * LQ2_BLOCK_BYTES_H(G, a->g.v_bits, a->g.s8);
        x = lq2_block_value(b, G, a->g.v_bits, (int) (s % G), lq2_ref_at(a->g.s8 ? a->refs : 0, nv + c)); // after the keys'
    } else {
        const LQ2_DEV uint8_t * b = a->v2 + s * a->g.v2_stride + (c / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, a->g.v_bits);
        x = lq2_block_value(b, LQ2_QK_V, a->g.v_bits, (int) (c % LQ2_QK_V), lq2_ref_at(0, 0));
    }
    vout[s * nv + c] = lq2_fp32_to_fp16(x);
}

// The f16 tier's cell j, element w of its keys or values (which = 0, 1): the rows after the slots.
LQ2_INLINE void lq2_dequant_copy(const LQ2_TH struct lq2_dequant_args * a, int which, int64_t j, int64_t w) {
    const int64_t nv = (int64_t) a->g.D * a->g.n_head_kv;
    const LQ2_DEV lq2_half * src = (const LQ2_DEV lq2_half *) ((which ? a->v : a->k) + j * (which ? a->g.v_nb2 : a->g.k_nb2));
    LQ2_DEV lq2_half * out = (LQ2_DEV lq2_half *) ((LQ2_DEV char *) a->dst + which * a->g.dst_nb3) + (a->g.n_slots + j) * nv;
    out[w] = src[w];
}

#if defined(__cplusplus) && !defined(__METAL_VERSION__)
}
#endif
