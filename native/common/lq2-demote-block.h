// lq2-demote-block.h: the per-thread work of the GPU demotion (GGML_OP_LQ2_DEMOTE), for C, CUDA and
// Metal. The kernels (native/cuda/lq2-demote.cu, native/metal/lq2-demote.metal) call one function
// per thread; the host check (tests/native/lq2_ops_check.cpp) calls the same functions for every
// thread index on the CPU op's own tensors and compares with the CPU op byte for byte.
//
// Demotion, in three launches, each needing what the one before wrote:
//   rows    block i, thread ith of nth: list row i's value blocks ith, ith + nth, ... quantized, and
//           its key row's RoPE pairs / plain channels ith, ith + nth, ... un-rotated into row i of
//           a scratch buffer (not into staging: a staging row freed by a group that closes in this
//           list may be handed to a group opened later in the same list, which the CPU, going row
//           by row, handles and parallel blocks would not). Values grouped per channel are not
//           coded here: they go to the scratch row after the keys, as f32;
//   groups  block i: when row i ends its group's run (as the CPU forward decides), thread ith
//           requantizes channels ith, ith + nth, ... of the group from the group's earlier tokens
//           (in staging, from earlier steps) and the run's scratch rows: the key channels (with
//           mixed widths each its own width, at its offset), then per-channel values' channels;
//   stage   block i: when row i ends a run that leaves its group open, the run's rows go to the
//           group's staging row for the steps to come (keys, then per-channel values, as the CPU
//           lays a staging row out: G * nk halves, then G * nv).
// Staging holds f16: a value is f16 before demotion and a pre-RoPE key rounded to f16 is off by
// 2^-11 of itself, far inside a 2-bit step; f32 cost as much per sequence as 256 f16 tokens at
// G = 128. Every token of a group is quantized from its f16-rounded staged values (lq2_f16_round),
// the run's own rows too, as the CPU does, which stages a row before it requantizes.
// The arithmetic is lq2-format.h's (lq2_quantize_block, lq2_unrotate_pair), which the CPU runs too.
// RoPE angles: in double as on the CPU (C, CUDA); Metal has no double and takes each pair's
// frequency split in two floats (rope_freq, lq2_rope_cos_sin_f32), within 1e-6 of the double.
#pragma once

#include "lq2-format.h"
#include "lq2-op-params.h"

#if defined(__cplusplus) && !defined(__METAL_VERSION__)
extern "C" {
#endif

// The scalars of the op (one constant buffer for Metal).
struct lq2_demote_geom {
    int64_t k_group_bytes; // key groups: n_head_kv * D blocks each
    int64_t v2_stride;     // value rows, one per slot; per-channel values: groups, nv blocks each
    int64_t staging_nb1;   // staging rows: f16 keys of the open groups, [G * nk] each (then [G * nv]
                           // values when they are grouped per channel)
    int64_t k_nb1, v_nb1;  // f16 rows of the f16 tier
    int64_t n_rows;        // rows of the demotion list [LQ2_DEMOTE_COLS, n_rows]
    int64_t nk, nv;        // key / value row lengths (all kv heads)
    int32_t n_head_kv, G, k_bits, v_bits, fit;
    int32_t v_per_channel; // values grouped per channel (lq2-op-params.h)
    int32_t k_widths;      // 1: the args' k_widths give each key channel's width (lq2-format.h)
    int32_t s8;            // 1: 8-bit block headers from the args' refs (lq2-format.h), else f16
    struct lq2_rope_params rope; // n_dims 0: keys are stored as they come
};

// GGML_OP_LQ2_DEMOTE: its tensors' pointers and the scalars (lq2_demote_args_of fills them; the
// Metal kernel from its buffers).
struct lq2_demote_args {
    LQ2_DEV uint8_t       * k2;
    LQ2_DEV uint8_t       * v2;
    LQ2_DEV char          * staging;
    const LQ2_DEV char    * k;
    const LQ2_DEV char    * v;
    const LQ2_DEV int32_t * rows;
    LQ2_DEV float         * scratch;   // n_rows * lq2_demote_channels floats (CUDA's form)
    const LQ2_CONST float * rope_freq; // Metal: pair i's frequency as [2 i], [2 i + 1]
    const LQ2_DEV int8_t  * k_widths;  // I8 [nk] when g.k_widths, else unused
    const LQ2_DEV float   * refs;      // F32 [2, lq2_demote_channels] when g.s8, else unused
    struct lq2_demote_geom  g;
};

LQ2_INLINE int lq2_demote_supported(const LQ2_TH struct lq2_demote_args * a) {
    // any key group size and width the block code handles, as the CPU forward does
    return (a->g.G == 32 || a->g.G == 64 || a->g.G == 128) &&
           (LQ2_BITS_VALID(a->g.k_bits) || (a->g.k_bits == 3 && a->g.k_widths)) && LQ2_BITS_VALID(a->g.v_bits) &&
           a->g.nv % LQ2_QK_V == 0 && a->g.n_head_kv > 0 && a->g.nk % a->g.n_head_kv == 0 && a->g.rope.n_dims % 2 == 0 &&
           a->g.rope.n_dims <= a->g.nk / a->g.n_head_kv && (a->g.rope.mode == 0 || a->g.rope.mode == 2);
}

// Channels of a token that wait for their group (in a scratch row, in staging) and that the
// group requantizes: its nk key channels, then (per-channel values) its nv value channels.
LQ2_INLINE int64_t lq2_demote_channels(const LQ2_TH struct lq2_demote_args * a) {
    return a->g.nk + (a->g.v_per_channel ? a->g.nv : 0);
}

// Where channel c of a group's token t is in its staging row (the CPU's layout): keys [G][nk],
// then per-channel values [G][nv].
LQ2_INLINE int64_t lq2_demote_stage_at(const LQ2_TH struct lq2_demote_args * a, int64_t t, int64_t c) {
    return c < a->g.nk ? t * a->g.nk + c : a->g.G * a->g.nk + t * a->g.nv + (c - a->g.nk);
}

LQ2_INLINE int32_t lq2_demote_col(const LQ2_TH struct lq2_demote_args * a, int64_t i, int col) {
    return a->rows[i * LQ2_DEMOTE_COLS + col];
}

// List row i's f16 value row in the f16 tier.
LQ2_INLINE const LQ2_DEV lq2_half * lq2_demote_vrow(const LQ2_TH struct lq2_demote_args * a, int64_t i) {
    return (const LQ2_DEV lq2_half *) (a->v + lq2_demote_col(a, i, LQ2_DEMOTE_ROW) * a->g.v_nb1);
}

// Channel c (< lq2_demote_channels) of the group holding `slot`, requantized from n_tok
// values at x with stride sx: key channel c (mixed widths: its width, at its offset in its kv
// head's blocks, which take the bytes of uniform codes), or value channel c - nk.
LQ2_VALUES_TEMPLATE LQ2_INLINE void lq2_demote_channel(const LQ2_TH struct lq2_demote_args * a, int64_t slot, int64_t c,
                                                       LQ2_VALUES_PTR x, int64_t sx, int n_tok) {
    const int G = a->g.G, s8 = a->g.s8;
    const struct lq2_pair ref = lq2_ref_at(s8 ? a->refs : 0, c); // channels in lq2_demote_channels' order
    if (c < a->g.nk) {
        const int64_t D = a->g.nk / a->g.n_head_kv, h = c / D, e = c % D;
        const int kbs = LQ2_BLOCK_BYTES_H(G, a->g.k_bits, s8);
        const LQ2_DEV int8_t * w = a->g.k_widths ? a->k_widths + h * D : 0;
        const int64_t off = h * D * kbs + (w ? lq2_widths_offset(w, (int) e, G, s8) : e * kbs);
        lq2_quantize_block(x, sx, n_tok, G, w ? (int) w[e] : a->g.k_bits, a->g.fit, ref,
                           a->k2 + (slot / G) * a->g.k_group_bytes + off);
    } else {
        lq2_quantize_block(x, sx, n_tok, G, a->g.v_bits, a->g.fit, ref,
                           a->v2 + (slot / G) * a->g.v2_stride + (c - a->g.nk) * LQ2_BLOCK_BYTES_H(G, a->g.v_bits, s8));
    }
}

// List row i's value blocks ith, ith + nth, ... quantized into its slot's value row (values
// grouped per token; per-channel values wait for their group).
LQ2_INLINE void lq2_demote_values(const LQ2_TH struct lq2_demote_args * a, int64_t i, int ith, int nth) {
    const int64_t slot = lq2_demote_col(a, i, LQ2_DEMOTE_SLOT);
    if (slot < 0 || a->g.v_per_channel) {
        return; // padding, or values coded with their group
    }
    const LQ2_DEV lq2_half * vsrc = lq2_demote_vrow(a, i);
    const int vbs = LQ2_BLOCK_BYTES_B(LQ2_QK_V, a->g.v_bits);
    for (int64_t b = ith; b < a->g.nv / LQ2_QK_V; b += nth) {
        float x[LQ2_QK_V];
        for (int j = 0; j < LQ2_QK_V; ++j) {
            x[j] = lq2_fp16_to_fp32(vsrc[b * LQ2_QK_V + j]);
        }
        lq2_quantize_block(x, 1, LQ2_QK_V, LQ2_QK_V, a->g.v_bits, a->g.fit, lq2_ref_at(0, 0),
                           a->v2 + slot * a->g.v2_stride + b * vbs);
    }
}

// Key element w of list row i (kv head w / D; w % D < n_dims / 2: that RoPE pair, >= n_dims: a
// plain channel, else nothing) un-rotated: the channels it gives (0, 1 or 2) in u.n, at the row's
// indices u.c[] with values u.x[].
struct lq2_demote_elems {
    int     n;
    int64_t c[2];
    float   x[2];
};

LQ2_INLINE struct lq2_demote_elems lq2_demote_key_elems(const LQ2_TH struct lq2_demote_args * a, int64_t i, int64_t w) {
    const LQ2_DEV lq2_half * ksrc = (const LQ2_DEV lq2_half *) (a->k + lq2_demote_col(a, i, LQ2_DEMOTE_ROW) * a->g.k_nb1);
    const int64_t D = a->g.nk / a->g.n_head_kv, h = w / D, e = w % D;
    const int nd = a->g.rope.n_dims, half = nd / 2;
    struct lq2_demote_elems u;
    u.n = 0;
    if (e >= nd) {
        u.n    = 1;
        u.c[0] = h * D + e;
        u.x[0] = lq2_fp16_to_fp32(ksrc[h * D + e]);
    } else if (e < half) {
        const int ip = (int) e;
        const int ca = a->g.rope.mode == 2 ? ip : 2 * ip, cb = a->g.rope.mode == 2 ? ip + half : 2 * ip + 1;
        const int32_t pos = lq2_demote_col(a, i, LQ2_DEMOTE_POS);
#if defined(__METAL_VERSION__)
        const struct lq2_pair cs = lq2_rope_cos_sin_f32(pos, a->rope_freq[2 * ip], a->rope_freq[2 * ip + 1]);
#else
        const double th = (double) pos * lq2_rope_freq(ip, nd, a->g.rope.freq_base, a->g.rope.freq_scale);
        struct lq2_pair cs;
        cs.a = (float) cos(th);
        cs.b = (float) sin(th);
#endif
        const struct lq2_pair p = lq2_unrotate_pair(lq2_fp16_to_fp32(ksrc[h * D + ca]), lq2_fp16_to_fp32(ksrc[h * D + cb]),
                                                    cs.a, cs.b, a->g.rope.attn_factor);
        u.n    = 2;
        u.c[0] = h * D + ca;
        u.x[0] = p.a;
        u.c[1] = h * D + cb;
        u.x[1] = p.b;
    }
    return u;
}

// The same into un, the row's nk floats (a scratch row).
LQ2_INLINE void lq2_demote_key(const LQ2_TH struct lq2_demote_args * a, int64_t i, int64_t w, LQ2_DEV float * un) {
    const struct lq2_demote_elems u = lq2_demote_key_elems(a, i, w);
    for (int j = 0; j < u.n; ++j) {
        un[u.c[j]] = u.x[j];
    }
}

// The same into a staging row's nk halves.
LQ2_INLINE void lq2_demote_key_f16(const LQ2_TH struct lq2_demote_args * a, int64_t i, int64_t w, LQ2_DEV lq2_half * un) {
    const struct lq2_demote_elems u = lq2_demote_key_elems(a, i, w);
    for (int j = 0; j < u.n; ++j) {
        un[u.c[j]] = lq2_fp32_to_fp16(u.x[j]);
    }
}

// Value element w of list row i as f32 into un (the per-channel values' part of a scratch row).
LQ2_INLINE void lq2_demote_value_f32(const LQ2_TH struct lq2_demote_args * a, int64_t i, int64_t w, LQ2_DEV float * un) {
    const LQ2_DEV lq2_half * vsrc = lq2_demote_vrow(a, i);
    un[w] = lq2_fp16_to_fp32(vsrc[w]);
}

// The same as it is into a staging row (f16 already: a copy).
LQ2_INLINE void lq2_demote_value_f16(const LQ2_TH struct lq2_demote_args * a, int64_t i, int64_t w, LQ2_DEV lq2_half * un) {
    const LQ2_DEV lq2_half * vsrc = lq2_demote_vrow(a, i);
    un[w] = vsrc[w];
}

// Launch 1, list row i, thread ith of nth: values, and the keys into the row's scratch row (and
// per-channel values after them).
LQ2_INLINE void lq2_demote_row(const LQ2_TH struct lq2_demote_args * a, int64_t i, int ith, int nth) {
    if (lq2_demote_col(a, i, LQ2_DEMOTE_SLOT) < 0) {
        return;
    }
    lq2_demote_values(a, i, ith, nth);
    LQ2_DEV float * row = a->scratch + i * lq2_demote_channels(a);
    for (int64_t w = ith; w < a->g.nk; w += nth) {
        lq2_demote_key(a, i, w, row);
    }
    for (int64_t w = ith; a->g.v_per_channel && w < a->g.nv; w += nth) {
        lq2_demote_value_f32(a, i, w, row + a->g.nk);
    }
}

// The run of list rows (same group, adjacent in the list) that row i ends: its first row, or -1
// when row i does not end one (padding, or the next row continues the group).
LQ2_INLINE int64_t lq2_demote_run_start(const LQ2_TH struct lq2_demote_args * a, int64_t i) {
    const int64_t slot = lq2_demote_col(a, i, LQ2_DEMOTE_SLOT);
    if (slot < 0) {
        return -1;
    }
    const int64_t next = i + 1 < a->g.n_rows ? lq2_demote_col(a, i + 1, LQ2_DEMOTE_SLOT) : -1;
    const int last_of_group = slot % a->g.G == a->g.G - 1;
    const int last_of_run   = next < 0 || next / a->g.G != slot / a->g.G;
    if (!last_of_group && !last_of_run) {
        return -1;
    }
    int64_t r0 = i;
    while (r0 > 0 && lq2_demote_col(a, r0 - 1, LQ2_DEMOTE_SLOT) >= 0 &&
           lq2_demote_col(a, r0 - 1, LQ2_DEMOTE_SLOT) / a->g.G == slot / a->g.G) {
        --r0;
    }
    return r0;
}

// Launch 2, list row i, thread ith of nth: the group requantized when row i ends its run. The
// group's values as the CPU's staging holds them at that point: its rows from earlier steps, and
// this run's rows.
LQ2_INLINE void lq2_demote_group(const LQ2_TH struct lq2_demote_args * a, int64_t i, int ith, int nth) {
    const int64_t r0 = lq2_demote_run_start(a, i);
    if (r0 < 0) {
        return;
    }
    const int64_t slot = lq2_demote_col(a, i, LQ2_DEMOTE_SLOT);
    const int n_tok = (int) (slot % a->g.G) + 1;
    const LQ2_DEV lq2_half * stage = (const LQ2_DEV lq2_half *) (a->staging + lq2_demote_col(a, i, LQ2_DEMOTE_STAGE) * a->g.staging_nb1);
    const int64_t sr = lq2_demote_channels(a);
    for (int64_t c = ith; c < sr; c += nth) {
        float x[128]; // G <= 128
        for (int t = 0; t < n_tok; ++t) {
            x[t] = lq2_fp16_to_fp32(stage[lq2_demote_stage_at(a, t, c)]);
        }
        for (int64_t j = r0; j <= i; ++j) { // the run's rows, as staging would hold them
            x[lq2_demote_col(a, j, LQ2_DEMOTE_SLOT) % a->g.G] = lq2_f16_round(a->scratch[j * sr + c]);
        }
        lq2_demote_channel(a, slot, c, x, 1, n_tok);
    }
}

// Launch 3, list row i, thread ith of nth: when row i ends a run that leaves its group open, the
// run's un-rotated keys go to the group's staging row.
LQ2_INLINE void lq2_demote_stage(const LQ2_TH struct lq2_demote_args * a, int64_t i, int ith, int nth) {
    const int64_t r0 = lq2_demote_run_start(a, i);
    if (r0 < 0 || lq2_demote_col(a, i, LQ2_DEMOTE_SLOT) % a->g.G == a->g.G - 1) {
        return; // no run ends here, or the group is full: its staging row is free now
    }
    LQ2_DEV lq2_half * stage = (LQ2_DEV lq2_half *) (a->staging + lq2_demote_col(a, i, LQ2_DEMOTE_STAGE) * a->g.staging_nb1);
    const int64_t sr = lq2_demote_channels(a);
    for (int64_t w = ith; w < (i - r0 + 1) * sr; w += nth) {
        const int64_t j = r0 + w / sr, c = w % sr;
        stage[lq2_demote_stage_at(a, lq2_demote_col(a, j, LQ2_DEMOTE_SLOT) % a->g.G, c)] = lq2_fp32_to_fp16(a->scratch[j * sr + c]);
    }
}

// ---- the one-threadgroup form (Metal: no scratch buffer): after the values (lq2_demote_values,
// a threadgroup per row), ONE threadgroup walks the list's runs in order, as the CPU forward does:
// step 2 r un-rotates run r's keys into its group's staging row, step 2 r + 1 requantizes the
// group from staging, with a device-memory barrier after each step. Returns 0 past the last step.
LQ2_INLINE int lq2_demote_seq_step(const LQ2_TH struct lq2_demote_args * a, int step, int ith, int nth) {
    // the (step / 2)-th row that ends a run
    int64_t i1 = -1;
    for (int64_t i = 0, r = 0; i < a->g.n_rows; ++i) {
        const int64_t slot = lq2_demote_col(a, i, LQ2_DEMOTE_SLOT);
        if (slot < 0) {
            continue;
        }
        const int64_t next = i + 1 < a->g.n_rows ? lq2_demote_col(a, i + 1, LQ2_DEMOTE_SLOT) : -1;
        if (slot % a->g.G == a->g.G - 1 || next < 0 || next / a->g.G != slot / a->g.G) {
            if (r++ == step / 2) {
                i1 = i;
                break;
            }
        }
    }
    if (i1 < 0) {
        return 0;
    }
    const int64_t slot = lq2_demote_col(a, i1, LQ2_DEMOTE_SLOT);
    LQ2_DEV lq2_half * stage = (LQ2_DEV lq2_half *) (a->staging + lq2_demote_col(a, i1, LQ2_DEMOTE_STAGE) * a->g.staging_nb1);
    if (step % 2 == 0) {
        const int64_t i0 = lq2_demote_run_start(a, i1), sr = lq2_demote_channels(a);
        for (int64_t w = ith; w < (i1 - i0 + 1) * sr; w += nth) {
            const int64_t j = i0 + w / sr, c = w % sr, t = lq2_demote_col(a, j, LQ2_DEMOTE_SLOT) % a->g.G;
            if (c < a->g.nk) {
                lq2_demote_key_f16(a, j, c, stage + lq2_demote_stage_at(a, t, 0));
            } else {
                lq2_demote_value_f16(a, j, c - a->g.nk, stage + lq2_demote_stage_at(a, t, a->g.nk));
            }
        }
    } else {
        const int n_tok = (int) (slot % a->g.G) + 1;
        for (int64_t c = ith; c < lq2_demote_channels(a); c += nth) {
            float x[128]; // G <= 128
            const int64_t at = lq2_demote_stage_at(a, 0, c), st = c < a->g.nk ? a->g.nk : a->g.nv;
            for (int t = 0; t < n_tok; ++t) {
                x[t] = lq2_fp16_to_fp32(stage[at + t * st]);
            }
            lq2_demote_channel(a, slot, c, x, 1, n_tok);
        }
    }
    return 1;
}

#if defined(__cplusplus) && !defined(__METAL_VERSION__)
}
#endif
