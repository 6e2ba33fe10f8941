// lq2-attn-block.h: the per-thread work of the GPU decode attention over LogQuant's two tiers.
//
// One thread block (CUDA) / threadgroup (Metal) of LQ2_AB_THREADS threads computes one part of
// one query token's attention for the query heads of ONE kv head: a share of the f16 tier's cells
// and of the 2-bit key groups (the same shares as the CPU op's parts), leaving unnormalized rows
// and the online-softmax state (M, S) that a combine step merges, as lq2_attn_merge does on the
// CPU. lq2_ab_step (at the end) is the block's whole program, step by step; the kernels
// (native/cuda/lq2-attn.cu, native/metal/lq2-attn.metal) call it with a barrier after each step.
// The host tests run the same steps for every thread index in several thread orders
// (tests/native/lq2_attn_block_host.c) and compare with the CPU (lq2_attn_partial, the CPU op).
// Written once for C, CUDA and Metal: the address-space macros (lq2-format.h) are empty outside
// Metal.
//
// A chunk is up to LQ2_AB_CHUNK f16 tokens or one 2-bit key group (G <= LQ2_AB_CHUNK tokens);
// per chunk, between barriers:
//   1. score   thread t < n: token t's raw dot products with every query head of the kv head,
//              finished as ggml's flash attention does (scale, softcap, + slope * mask). A 2-bit
//              key is dequantized and re-rotated in registers: thread t reads byte
//              LQ2_CODE_BYTE_B(t) of each channel's block, both channels of a RoPE pair at once,
//              and the group's cos/sin rows (f16, the cache's table) at index t. With mixed key
//              widths each channel's block has its own width and offset, which the block's load
//              step put in shared memory (the blocks' offsets are a prefix sum over the channels).
//              A 2-bit group first has a header step: thread c converts channel c's scale and
//              minimum to f32 in shared memory, once for all G tokens (and with the score
//              correction, threads jj < gq then compute each head's correction).
//   2. max     every thread: simdgroup w (LQ2_AB_SIMD lanes) reduces the chunk's scores of query
//              heads w, w + LQ2_AB_N_SIMD, ... with a simd max; its lane 0 sets the head's new
//              running max and the factor alpha that rescales the head's sums.
//   3. weight  thread t < n: exp(score - M) for every head (0 for masked tokens).
//   4. fold    thread i: channels i, i + T, ... of every head's running output: rescaled by alpha,
//              plus the chunk's weighted values (2-bit values dequantized per (token, channel):
//              from a token's row of blocks, or with values grouped per channel from channel i's
//              block of the group, where code t is token t's); the simdgroups also sum the
//              weights, as in step 2, and lane 0 updates the head's S.
// Nothing a thread writes in a phase is read by another thread in the same phase.
#pragma once

#include "lq2-format.h"

#if defined(__METAL_VERSION__)
#    define LQ2_EXPF(x)  metal::precise::exp(x)
#    define LQ2_TANHF(x) metal::precise::tanh(x)
#    define LQ2_POWF(x, y) metal::precise::pow(x, y)
#    define LQ2_LOG2F(x) metal::precise::log2(x)
#else
#    define LQ2_EXPF(x)  expf(x)
#    define LQ2_TANHF(x) tanhf(x)
#    define LQ2_POWF(x, y) powf(x, y)
#    define LQ2_LOG2F(x) log2f(x)
#    if !defined(__CUDACC__)
#        include <math.h>
#    endif
#endif

#if defined(__cplusplus) && !defined(__METAL_VERSION__)
extern "C" {
#endif

#define LQ2_AB_THREADS 128 // threads per block
#define LQ2_AB_CHUNK   128 // f16 tokens per chunk (one per thread); 2-bit chunks are one key group
#define LQ2_AB_SIMD    32  // lanes of a simdgroup (Apple GPUs) / warp (NVIDIA)
#define LQ2_AB_N_SIMD  (LQ2_AB_THREADS / LQ2_AB_SIMD)
#define LQ2_AB_MAX_GQ  8   // query heads per kv head
#define LQ2_AB_MAX_D   512 // head size
#define LQ2_AB_MAX_R   (LQ2_AB_MAX_D / LQ2_AB_THREADS) // channels per thread and head
#define LQ2_AB_ACC     (LQ2_AB_MAX_GQ * LQ2_AB_MAX_R)  // a thread's running-output registers

// What one block needs to know besides its pointers (plain values: a kernel argument).
struct lq2_ab_shape {
    int32_t D;        // head size, a multiple of 64, <= LQ2_AB_MAX_D
    int32_t gq;       // query heads per kv head, <= LQ2_AB_MAX_GQ
    int32_t n_head;   // query heads in all (ALiBi slopes depend on it)
    int32_t hk;       // this block's kv head: query heads hk * gq .. hk * gq + gq - 1
    float   scale;
    float   softcap;  // 0: off
    float   max_bias; // ALiBi, 0: off
    int32_t G;        // 2-bit tier: tokens per key group, code bits
    int32_t k_bits;
    int32_t v_bits;
    int32_t rope_mode;   // LQ2_ROPE_NORMAL (0) or LQ2_ROPE_NEOX (2), as lq2-rope.h
    int32_t rope_n_dims; // 0: keys stored post-RoPE (no table)
    float   rope_attn_factor;
    int32_t score_correction;
    int32_t v_per_channel; // values grouped per channel (lq2-op-params.h), else per token
    int32_t k_widths;      // 1: channel c's key width is the args' k_widths[hk * D + c], else k_bits
    int32_t s8;            // 1: 8-bit block headers from the args' refs (lq2-format.h), else f16
};

// The block's shared memory.
struct lq2_ab_shared {
    float q[LQ2_AB_MAX_GQ * LQ2_AB_MAX_D]; // the query heads, [jj][D]
    float s[LQ2_AB_MAX_GQ * LQ2_AB_CHUNK]; // scores of the chunk, then their weights, [jj][t]
    float M[LQ2_AB_MAX_GQ];                // running max, sum, the chunk's rescale factor
    float S[LQ2_AB_MAX_GQ];
    float alpha[LQ2_AB_MAX_GQ];
    float slope[LQ2_AB_MAX_GQ];            // ALiBi slope (1 without max_bias)
    float corr[LQ2_AB_MAX_GQ];             // score correction of the current 2-bit group
    int32_t kw[LQ2_AB_MAX_D];              // this kv head's key width per channel, and the byte
    int32_t koff[LQ2_AB_MAX_D];            // offset of its block in the head's part of a group
    float kd[LQ2_AB_MAX_D];                // the current 2-bit group's scale and minimum per
    float km[LQ2_AB_MAX_D];                // channel, as f32
};

LQ2_INLINE int lq2_ab_channels_per_thread(int D) {
    return (D + LQ2_AB_THREADS - 1) / LQ2_AB_THREADS;
}

// The shapes the kernels take; anything else stays on the CPU (supports_op says no). Values
// grouped per channel take the key block types (as the CPU cache decides per layer).
LQ2_INLINE int lq2_ab_supported(int D, int gq, int G, int k_bits, int k_widths, int v_bits, int v_per_channel,
                                int rope_mode, int n_dims) {
    return D > 0 && D % LQ2_QK_V == 0 && D <= LQ2_AB_MAX_D && gq >= 1 && gq <= LQ2_AB_MAX_GQ &&
           G <= LQ2_AB_CHUNK && lq2_key_bits_ok(G, k_bits, k_widths) &&
           (v_per_channel ? lq2_key_type_b(G, v_bits) >= 0 : lq2_value_type(v_bits) >= 0) &&
           (rope_mode == 0 || rope_mode == 2) && n_dims >= 0 && n_dims <= D && n_dims % 2 == 0;
}

// ALiBi slope of query head h, as ggml defines it (heads past the largest power of two get odd
// powers of m1); lq2-attn.c's make_head_ctx computes the same.
LQ2_INLINE float lq2_ab_slope(float max_bias, int n_head, int h) {
    if (!(max_bias > 0.0f)) {
        return 1.0f;
    }
    const int   n2 = 1 << (int) LQ2_FLOOR(LQ2_LOG2F((float) n_head));
    const float m0 = LQ2_POWF(2.0f, -max_bias / (float) n2);
    const float m1 = LQ2_POWF(2.0f, -(max_bias / 2.0f) / (float) n2);
    return h < n2 ? LQ2_POWF(m0, (float) (h + 1)) : LQ2_POWF(m1, (float) (2 * (h - n2) + 1));
}

// A raw dot product -> the score flash attention folds.
LQ2_INLINE float lq2_ab_finish(const LQ2_TH struct lq2_ab_shape * sh, float dot, float slope, float mask) {
    if (mask == -INFINITY) {
        return -INFINITY; // whatever the key: an unused slot's bytes may be anything
    }
    float v;
    if (sh->softcap != 0.0f) {
        v = sh->softcap * LQ2_TANHF(dot * (sh->scale / sh->softcap));
    } else {
        v = dot * sh->scale;
    }
    return v + slope * mask;
}

// ---- phase 0 of the block: the query heads into shared memory, the softmax state reset, the
// key blocks' widths and offsets. q: query head hk * gq at q, head jj at q + jj * q_head_stride
// (floats). kw: this kv head's D key widths (mixed widths, lq2-format.h), or 0: every channel
// k_bits. acc: the thread's running-output registers (LQ2_AB_ACC floats).
LQ2_INLINE void lq2_ab_begin(int ith, const LQ2_TH struct lq2_ab_shape * sh, const LQ2_DEV float * q,
                             int64_t q_head_stride, const LQ2_DEV int8_t * kw, LQ2_TG struct lq2_ab_shared * sm,
                             LQ2_TH float * acc) {
    for (int i = ith; i < sh->gq * sh->D; i += LQ2_AB_THREADS) {
        sm->q[i] = q[(int64_t) (i / sh->D) * q_head_stride + i % sh->D];
    }
    for (int c = ith; c < sh->D; c += LQ2_AB_THREADS) { // O(D) per channel, once per block
        sm->kw[c]   = kw ? (int32_t) kw[c] : sh->k_bits;
        sm->koff[c] = kw ? (int32_t) lq2_widths_offset(kw, c, sh->G, sh->s8) : c * LQ2_BLOCK_BYTES_H(sh->G, sh->k_bits, sh->s8);
    }
    if (ith < sh->gq) {
        sm->M[ith]     = -INFINITY;
        sm->S[ith]     = 0.0f;
        sm->alpha[ith] = 1.0f;
        sm->slope[ith] = lq2_ab_slope(sh->max_bias, sh->n_head, sh->hk * sh->gq + ith);
        sm->corr[ith]  = 0.0f;
    }
    for (int r = 0; r < LQ2_AB_ACC; ++r) {
        acc[r] = 0.0f;
    }
}

// ---- phase 1, f16 tier: thread t scores its token; k: the token's key row of this kv head (f16,
// post-RoPE), mask: its kq_mask entry.
LQ2_INLINE void lq2_ab_score_f16(int t, const LQ2_TH struct lq2_ab_shape * sh, const LQ2_DEV lq2_half * k,
                                 float mask, LQ2_TG struct lq2_ab_shared * sm) {
    float dot[LQ2_AB_MAX_GQ];
    for (int jj = 0; jj < sh->gq; ++jj) {
        dot[jj] = 0.0f;
    }
    for (int c = 0; c < sh->D; ++c) {
        const float kc = lq2_fp16_to_fp32(k[c]);
        for (int jj = 0; jj < sh->gq; ++jj) {
            dot[jj] = LQ2_FMA(sm->q[jj * sh->D + c], kc, dot[jj]);
        }
    }
    for (int jj = 0; jj < sh->gq; ++jj) {
        sm->s[jj * LQ2_AB_CHUNK + t] = lq2_ab_finish(sh, dot[jj], sm->slope[jj], mask);
    }
}

// ---- phase 0a, 2-bit tier: thread ith converts the scale and minimum of channels ith, ith + T,
// ... of the group's key blocks (kg: this kv head's first) to f32, for every token's score.
// krefs: this kv head's key channel references (8-bit headers), or 0. A 0-bit channel's scale
// is 0 whatever its header says (the score correction leaves it out).
LQ2_INLINE void lq2_ab_headers(int ith, const LQ2_TH struct lq2_ab_shape * sh, const LQ2_DEV uint8_t * kg,
                               const LQ2_DEV float * krefs, LQ2_TG struct lq2_ab_shared * sm) {
    for (int c = ith; c < sh->D; c += LQ2_AB_THREADS) {
        const struct lq2_pair dm = lq2_block_dm(kg + sm->koff[c], lq2_ref_at(krefs, c));
        sm->kd[c] = sm->kw[c] ? dm.a : 0.0f;
        sm->km[c] = dm.b;
    }
}

// ---- phase 0b, 2-bit tier with score correction: thread jj < gq computes its head's correction
// for the group (lq2-format.h; lq2-attn.c's correct_scores computes the same) from the scales
// phase 0a converted.
LQ2_INLINE void lq2_ab_correction(int jj, const LQ2_TH struct lq2_ab_shape * sh, LQ2_TG struct lq2_ab_shared * sm) {
    const int   nd   = sh->rope_n_dims, half = nd / 2;
    const float af2  = sh->rope_attn_factor * sh->rope_attn_factor;
    const LQ2_TG float * q = sm->q + jj * sh->D;
    float v = 0.0f; // a 0-bit channel's d is 0: its error is not a code's, left out (as on the CPU)
    for (int i = 0; i < half; ++i) {
        const int a = sh->rope_mode == 2 ? i : 2 * i;
        const int b = sh->rope_mode == 2 ? i + half : 2 * i + 1;
        const float va = lq2_code_noise_var(sm->kd[a]) * af2;
        const float vb = lq2_code_noise_var(sm->kd[b]) * af2;
        v += 0.5f * (q[a] * q[a] + q[b] * q[b]) * (va + vb);
    }
    for (int c = nd; c < sh->D; ++c) {
        v += q[c] * q[c] * lq2_code_noise_var(sm->kd[c]);
    }
    sm->corr[jj] = sh->score_correction ? lq2_score_correction(v, sh->scale) : 0.0f;
}

// ---- phase 1, 2-bit tier: thread t < n scores token t of the group: its key dequantized from
// each channel's block (with the scales phase 0a converted) and re-rotated with the group's
// cos/sin rows cs (pair i: G cosines, then G sines; unused when rope_n_dims is 0). mask: the
// token's entry of the 2-bit mask.
LQ2_INLINE void lq2_ab_score_q2(int t, const LQ2_TH struct lq2_ab_shape * sh, const LQ2_DEV uint8_t * kg,
                                const LQ2_DEV lq2_half * cs, float mask, LQ2_TG struct lq2_ab_shared * sm) {
    const int G = sh->G, nd = sh->rope_n_dims, half = nd / 2, D = sh->D, hdr = LQ2_HDR_BYTES(sh->s8);
    float dot[LQ2_AB_MAX_GQ];
    for (int jj = 0; jj < sh->gq; ++jj) {
        dot[jj] = 0.0f;
    }
    for (int i = 0; i < half; ++i) { // a RoPE pair: both channels in this thread's registers
        const int a = sh->rope_mode == 2 ? i : 2 * i;
        const int b = sh->rope_mode == 2 ? i + half : 2 * i + 1;
        const float x0 = lq2_code_value(kg + sm->koff[a], hdr, G, sm->kw[a], t, sm->kd[a], sm->km[a]);
        const float x1 = lq2_code_value(kg + sm->koff[b], hdr, G, sm->kw[b], t, sm->kd[b], sm->km[b]);
        const float ct = lq2_fp16_to_fp32(cs[2 * i * G + t]), st = lq2_fp16_to_fp32(cs[2 * i * G + G + t]);
        const float ka = x0 * ct - x1 * st, kb2 = x0 * st + x1 * ct;
        for (int jj = 0; jj < sh->gq; ++jj) {
            dot[jj] = LQ2_FMA(sm->q[jj * D + a], ka, dot[jj]);
            dot[jj] = LQ2_FMA(sm->q[jj * D + b], kb2, dot[jj]);
        }
    }
    for (int c = nd; c < D; ++c) { // channels RoPE leaves alone (all of them when keys are post-RoPE)
        const float kc = lq2_code_value(kg + sm->koff[c], hdr, G, sm->kw[c], t, sm->kd[c], sm->km[c]);
        for (int jj = 0; jj < sh->gq; ++jj) {
            dot[jj] = LQ2_FMA(sm->q[jj * D + c], kc, dot[jj]);
        }
    }
    for (int jj = 0; jj < sh->gq; ++jj) {
        sm->s[jj * LQ2_AB_CHUNK + t] = lq2_ab_finish(sh, dot[jj] - sm->corr[jj], sm->slope[jj], mask);
    }
}

// ---- reductions over a chunk by simdgroups (Metal) / warps (CUDA) of LQ2_AB_SIMD lanes: the
// simdgroup w = ith / LQ2_AB_SIMD takes heads w, w + LQ2_AB_N_SIMD, ...; lane l reads entries
// l, l + LQ2_AB_SIMD, ... of the head's n scores (or weights), and the lanes' partials are merged
// with simd_max / simd_sum (Metal) or an xor butterfly of shuffles (CUDA), with no barrier. The
// host build (the tests) computes every lane's partial and merges them in the CUDA butterfly's
// order, so it gets the value each lane gets; Metal's simd_sum order is its own.
LQ2_INLINE float lq2_ab_max_lane(int lane, int jj, int n, const LQ2_TG struct lq2_ab_shared * sm) {
    float mx = -INFINITY;
    for (int t = lane; t < n; t += LQ2_AB_SIMD) {
        const float v = sm->s[jj * LQ2_AB_CHUNK + t];
        mx = v > mx ? v : mx; // a NaN score is ignored here, as on the CPU
    }
    return mx;
}

LQ2_INLINE float lq2_ab_sum_lane(int lane, int jj, int n, const LQ2_TG struct lq2_ab_shared * sm) {
    float s = 0.0f;
    for (int t = lane; t < n; t += LQ2_AB_SIMD) {
        s += sm->s[jj * LQ2_AB_CHUNK + t];
    }
    return s;
}

// The max (is_sum 0) or sum (1) over head jj's n entries, as every lane of the simdgroup gets it.
LQ2_INLINE float lq2_ab_simd_reduce(int lane, int jj, int n, int is_sum, const LQ2_TG struct lq2_ab_shared * sm) {
#if defined(__METAL_VERSION__)
    return is_sum ? metal::simd_sum(lq2_ab_sum_lane(lane, jj, n, sm)) : metal::simd_max(lq2_ab_max_lane(lane, jj, n, sm));
#elif defined(__CUDACC__) && defined(__CUDA_ARCH__)
    float v = is_sum ? lq2_ab_sum_lane(lane, jj, n, sm) : lq2_ab_max_lane(lane, jj, n, sm);
    for (int o = LQ2_AB_SIMD / 2; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(0xffffffffu, v, o, LQ2_AB_SIMD);
        v = is_sum ? v + w : (w > v ? w : v);
    }
    return v;
#else
    (void) lane;
    float v[LQ2_AB_SIMD], w[LQ2_AB_SIMD];
    for (int l = 0; l < LQ2_AB_SIMD; ++l) {
        v[l] = is_sum ? lq2_ab_sum_lane(l, jj, n, sm) : lq2_ab_max_lane(l, jj, n, sm);
    }
    for (int o = LQ2_AB_SIMD / 2; o > 0; o >>= 1) {
        for (int l = 0; l < LQ2_AB_SIMD; ++l) {
            w[l] = is_sum ? v[l] + v[l ^ o] : (v[l ^ o] > v[l] ? v[l ^ o] : v[l]);
        }
        for (int l = 0; l < LQ2_AB_SIMD; ++l) {
            v[l] = w[l];
        }
    }
    return v[0];
#endif
}

// ---- phase 2: every thread; lane 0 of a head's simdgroup sets the head's new running max and the
// factor alpha that rescales its sums.
LQ2_INLINE void lq2_ab_max(int ith, int n, const LQ2_TH struct lq2_ab_shape * sh, LQ2_TG struct lq2_ab_shared * sm) {
    const int lane = ith % LQ2_AB_SIMD;
    for (int jj = ith / LQ2_AB_SIMD; jj < sh->gq; jj += LQ2_AB_N_SIMD) { // uniform in a simdgroup
        const float mx = lq2_ab_simd_reduce(lane, jj, n, 0, sm);
        if (lane != 0) {
            continue;
        }
        const float M = sm->M[jj];
        if (mx > M) {
            sm->alpha[jj] = M == -INFINITY ? 0.0f : LQ2_EXPF(M - mx); // nothing summed yet: any factor
            sm->M[jj]     = mx;
        } else {
            sm->alpha[jj] = 1.0f;
        }
    }
}

// ---- phase 3: thread t < n turns its token's scores into weights.
LQ2_INLINE void lq2_ab_weight(int t, const LQ2_TH struct lq2_ab_shape * sh, LQ2_TG struct lq2_ab_shared * sm) {
    for (int jj = 0; jj < sh->gq; ++jj) {
        const float v = sm->s[jj * LQ2_AB_CHUNK + t];
        sm->s[jj * LQ2_AB_CHUNK + t] = v == -INFINITY ? 0.0f : LQ2_EXPF(v - sm->M[jj]);
    }
}

// Every thread in phase 4: lane 0 of a head's simdgroup updates its running sum.
LQ2_INLINE void lq2_ab_sum(int ith, int n, const LQ2_TH struct lq2_ab_shape * sh, LQ2_TG struct lq2_ab_shared * sm) {
    const int lane = ith % LQ2_AB_SIMD;
    for (int jj = ith / LQ2_AB_SIMD; jj < sh->gq; jj += LQ2_AB_N_SIMD) { // uniform in a simdgroup
        const float s = lq2_ab_simd_reduce(lane, jj, n, 1, sm);
        if (lane == 0) {
            sm->S[jj] = LQ2_FMA(sm->S[jj], sm->alpha[jj], s);
        }
    }
}

// How phase 4 reads the chunk's values.
enum lq2_ab_values {
    LQ2_AB_V_F16       = 0, // f16 rows, one per token, nb_v bytes apart
    LQ2_AB_V_PER_TOKEN = 1, // rows of 2-bit value blocks (64 channels of one token each), nb_v apart
    LQ2_AB_V_PER_CHAN  = 2, // one block per channel (G tokens each), consecutive; nb_v unused
};

// ---- phase 4: thread i folds channels i, i + T, ... of the chunk's n value rows into every head's
// running output: rescaled by alpha, plus the chunk's weighted values. v: this kv head's values
// of the chunk (token 0's row, or channel 0's block), read as `form` says (enum lq2_ab_values),
// each 2-bit value dequantized where it is used; vrefs: this kv head's value channel references
// (per-channel values with 8-bit headers), or 0. Every thread also takes part in the sum of the
// weights (lq2_ab_sum).
LQ2_INLINE void lq2_ab_fold(int ith, const LQ2_TH struct lq2_ab_shape * sh, const LQ2_DEV uint8_t * v,
                            int64_t nb_v, int n, int form, const LQ2_DEV float * vrefs, LQ2_TG struct lq2_ab_shared * sm,
                            LQ2_TH float * acc) {
    const int R = lq2_ab_channels_per_thread(sh->D), vbs = LQ2_BLOCK_BYTES_B(LQ2_QK_V, sh->v_bits);
    const int cbs = LQ2_BLOCK_BYTES_H(sh->G, sh->v_bits, sh->s8); // a channel's block (per-channel values)
    for (int r = 0; r < R; ++r) {
        const int c = ith + r * LQ2_AB_THREADS;
        if (c >= sh->D) {
            break;
        }
        float o[LQ2_AB_MAX_GQ];
        for (int jj = 0; jj < sh->gq; ++jj) {
            o[jj] = acc[jj * LQ2_AB_MAX_R + r] * sm->alpha[jj];
        }
        // per-channel values: channel c's block holds all n tokens; its scale and minimum once
        const LQ2_DEV uint8_t * cblk = v + c * cbs;
        const struct lq2_pair none = lq2_ref_at(0, 0); // values per token: f16 headers
        const struct lq2_pair cdm = form == LQ2_AB_V_PER_CHAN ? lq2_block_dm(cblk, lq2_ref_at(vrefs, c)) : none;
        for (int t = 0; t < n; ++t) {
            const LQ2_DEV uint8_t * row = v + t * nb_v;
            const float vc = form == LQ2_AB_V_PER_CHAN
                                 ? lq2_code_value(cblk, LQ2_HDR_BYTES(sh->s8), sh->G, sh->v_bits, t, cdm.a, cdm.b)
                           : form == LQ2_AB_V_PER_TOKEN ? lq2_block_value(row + (c / LQ2_QK_V) * vbs, LQ2_QK_V,
                                                                          sh->v_bits, c % LQ2_QK_V, none)
                                                        : lq2_fp16_to_fp32(((const LQ2_DEV lq2_half *) row)[c]);
            for (int jj = 0; jj < sh->gq; ++jj) { // a masked token adds nothing, whatever its value
                const float w = sm->s[jj * LQ2_AB_CHUNK + t];
                o[jj] = w != 0.0f ? LQ2_FMA(w, vc, o[jj]) : o[jj];
            }
        }
        for (int jj = 0; jj < sh->gq; ++jj) {
            acc[jj * LQ2_AB_MAX_R + r] = o[jj];
        }
    }
    lq2_ab_sum(ith, n, sh, sm);
}

// ---- last phase: the part's rows, unnormalized, and (M, S), as lq2_attn_merge reads them: head
// jj's row at out + jj * (D + 2): D floats, then M, then S.
LQ2_INLINE void lq2_ab_store(int ith, const LQ2_TH struct lq2_ab_shape * sh, const LQ2_TG struct lq2_ab_shared * sm,
                             const LQ2_TH float * acc, LQ2_DEV float * out) {
    const int D = sh->D, R = lq2_ab_channels_per_thread(D);
    for (int r = 0; r < R; ++r) {
        const int c = ith + r * LQ2_AB_THREADS;
        for (int jj = 0; c < D && jj < sh->gq; ++jj) {
            out[jj * (D + 2) + c] = acc[jj * LQ2_AB_MAX_R + r];
        }
    }
    if (ith < sh->gq) {
        out[ith * (D + 2) + D]     = sm->M[ith];
        out[ith * (D + 2) + D + 1] = sm->S[ith];
    }
}

// ---- the combine step (its own kernel, one thread per channel): channel c of one head's result
// from n_part parts part_stride floats apart (lq2_attn_merge's rule: parts whose tokens were all
// masked are left out; zero when every part was).
LQ2_INLINE float lq2_ab_combine(int c, int D, int n_part, const LQ2_DEV float * parts, int64_t part_stride) {
    float M = -INFINITY;
    for (int i = 0; i < n_part; ++i) {
        const LQ2_DEV float * pi = parts + i * part_stride;
        if (pi[D + 1] > 0.0f && pi[D] > M) {
            M = pi[D];
        }
    }
    float S = 0.0f, o = 0.0f;
    for (int i = 0; i < n_part; ++i) {
        const LQ2_DEV float * pi = parts + i * part_stride;
        if (!(pi[D + 1] > 0.0f)) {
            continue;
        }
        const float w = LQ2_EXPF(pi[D] - M);
        S = LQ2_FMA(pi[D + 1], w, S);
        o = LQ2_FMA(w, pi[c], o);
    }
    return S > 0.0f ? o / S : 0.0f;
}

// ---- the block's whole program, for every backend

// The tensors of GGML_OP_LQ2_ATTN (lq2-op-params.h) as pointers and byte strides; filled from the
// op by lq2_attn_args_of (native/ggml/lq2-op-args.h) for the CUDA glue and the host tests, and by
// the Metal kernel from its buffers (a struct of device pointers in the thread's own memory).
// The scalars (a Metal kernel takes them as one constant buffer, as ggml-metal's kargs).
struct lq2_attn_geom {
    int64_t q_nb1, q_nb2;              // q: F32 [D, n_head, n_tokens]
    int64_t k_nb2, k_nb3;              // k, v: F16 [D, n_head_kv, n_kv, n_stream]
    int64_t v_nb2, v_nb3;
    int64_t n_kv;
    int64_t mask_nb1;                  // kq_mask: a row per token (the streams' rows contiguous)
    int64_t kg_bytes, v2_stride;       // the 2-bit stores: bytes per key group, and per value row
                                       // (per token) or value group (per channel)
    int64_t mask2_nb1;                 // F16 [n_slots, >= n_tokens]
    int64_t rope_nb1;                  // F16 table rows per group
    int64_t n_slots;                   // a multiple of G (unused slots: -inf in mask2)
    int64_t n_tokens, n_tps;           // query tokens, tokens per stream
    int64_t dst_nb1, dst_nb2;          // F32 [D, n_head, n_tokens]
    int32_t mask_f16;
    int32_t n_head_kv;
    int32_t n_part;                    // parts each (token, kv head) is split into
    int32_t unused;
    struct lq2_ab_shape shape;         // hk: set per block
};

// The op: its tensors' pointers and the scalars.
struct lq2_attn_args {
    const LQ2_DEV char * q;
    const LQ2_DEV char * k;
    const LQ2_DEV char * v;
    const LQ2_DEV char * mask;
    const LQ2_DEV char * k2;
    const LQ2_DEV char * v2;
    const LQ2_DEV char * mask2;
    const LQ2_DEV char * rope;  // 0: keys stored post-RoPE
    LQ2_DEV float      * parts; // [n_part][n_tokens][n_head][D + 2]
    LQ2_DEV char       * dst;
    const LQ2_DEV int8_t * k_widths; // I8 [n_head_kv * D] when shape.k_widths, else unused
    const LQ2_DEV float  * refs;     // F32 [2, channels] when shape.s8 (lq2-op-params.h), else unused
    struct lq2_attn_geom g;
};

LQ2_INLINE float lq2_ab_mask_at(const LQ2_DEV char * row, int f16, int64_t j) {
    return f16 ? lq2_fp16_to_fp32(((const LQ2_DEV lq2_half *) row)[j]) : ((const LQ2_DEV float *) row)[j];
}

// Step `step` of block (part, kv head sh->hk, token tok) for thread ith: the work between two
// barriers. Step 0 loads the query; then 4 steps per f16 chunk (score, max, weight, fold), 5 per
// 2-bit group (headers first; 6 with the score correction); then the store. Returns 0 past the
// last step. The kernel is: for (s = 0; lq2_ab_step(..., s, ...); ++s) barrier(); every thread
// takes the same steps, so the barriers are uniform.
LQ2_INLINE int lq2_ab_step(const LQ2_TH struct lq2_attn_args * a, const LQ2_TH struct lq2_ab_shape * sh, int part,
                           int64_t tok, int step, int ith, LQ2_TG struct lq2_ab_shared * sm, LQ2_TH float * acc) {
    const int D = sh->D, gq = sh->gq, G = sh->G, hk = sh->hk;
    if (step == 0) {
        const LQ2_DEV float * q = (const LQ2_DEV float *) (a->q + tok * a->g.q_nb2 + (int64_t) hk * gq * a->g.q_nb1);
        lq2_ab_begin(ith, sh, q, a->g.q_nb1 / 4, sh->k_widths ? a->k_widths + (int64_t) hk * D : 0, sm, acc);
        return 1;
    }
    int64_t s = step - 1;
    // this part's share of the f16 cells and of the 2-bit groups (the CPU op's shares)
    const int64_t a0 = a->g.n_kv * part / a->g.n_part, a1 = a->g.n_kv * (part + 1) / a->g.n_part;
    const int64_t n_fc = (a1 - a0 + LQ2_AB_CHUNK - 1) / LQ2_AB_CHUNK;
    if (s < 4 * n_fc) {
        const int64_t t0 = a0 + (s / 4) * LQ2_AB_CHUNK;
        const int n = (int) (a1 - t0 < LQ2_AB_CHUNK ? a1 - t0 : LQ2_AB_CHUNK);
        const int64_t stream = tok / a->g.n_tps;
        const LQ2_DEV char * kbase = a->k + stream * a->g.k_nb3 + (int64_t) hk * D * 2;
        const LQ2_DEV char * vbase = a->v + stream * a->g.v_nb3 + (int64_t) hk * D * 2;
        switch (s % 4) {
            case 0:
                if (ith < n) {
                    lq2_ab_score_f16(ith, sh, (const LQ2_DEV lq2_half *) (kbase + (t0 + ith) * a->g.k_nb2),
                                     lq2_ab_mask_at(a->mask + tok * a->g.mask_nb1, a->g.mask_f16, t0 + ith), sm);
                }
                break;
            case 1: lq2_ab_max(ith, n, sh, sm); break;
            case 2: if (ith < n) lq2_ab_weight(ith, sh, sm); break;
            default:
                lq2_ab_fold(ith, sh, (const LQ2_DEV uint8_t *) (vbase + t0 * a->g.v_nb2), a->g.v_nb2, n, LQ2_AB_V_F16, 0,
                            sm, acc);
                break;
        }
        return 1;
    }
    s -= 4 * n_fc;
    const int64_t ng = a->g.n_slots / G, g0 = ng * part / a->g.n_part, g1 = ng * (part + 1) / a->g.n_part;
    // per group: headers, (correction,) score, max, weight, fold
    const int per_group = sh->score_correction ? 6 : 5;
    if (s < per_group * (g1 - g0)) {
        const int64_t g = g0 + s / per_group;
        const int in_group = (int) (s % per_group);
        const int phase = in_group == 0 ? -1 : in_group - (sh->score_correction ? 1 : 0);
        const int kbs = LQ2_BLOCK_BYTES_H(G, sh->k_bits, sh->s8);
        const LQ2_DEV uint8_t * kg = (const LQ2_DEV uint8_t *) (a->k2 + g * a->g.kg_bytes + (int64_t) hk * D * kbs);
        const LQ2_DEV float * krefs = sh->s8 ? a->refs + (int64_t) 2 * hk * D : 0;
        const LQ2_DEV float * vrefs = sh->s8 ? a->refs + (int64_t) 2 * (a->g.n_head_kv + hk) * D : 0; // after the keys'
        switch (phase) {
            case -1: lq2_ab_headers(ith, sh, kg, krefs, sm); break;
            case 0: if (ith < gq) lq2_ab_correction(ith, sh, sm); break;
            case 1:
                if (ith < G) {
                    const LQ2_DEV lq2_half * cs = (const LQ2_DEV lq2_half *) (a->rope ? a->rope + g * a->g.rope_nb1 : a->rope);
                    const LQ2_DEV lq2_half * m2 = (const LQ2_DEV lq2_half *) (a->mask2 + tok * a->g.mask2_nb1);
                    lq2_ab_score_q2(ith, sh, kg, cs, lq2_fp16_to_fp32(m2[g * G + ith]), sm);
                }
                break;
            case 2: lq2_ab_max(ith, G, sh, sm); break;
            case 3: if (ith < G) lq2_ab_weight(ith, sh, sm); break;
            default:
                if (sh->v_per_channel) { // the group's blocks, D per kv head
                    const int64_t vhead = (int64_t) D * LQ2_BLOCK_BYTES_H(G, sh->v_bits, sh->s8);
                    lq2_ab_fold(ith, sh, (const LQ2_DEV uint8_t *) (a->v2 + g * a->g.v2_stride + hk * vhead), 0, G,
                                LQ2_AB_V_PER_CHAN, vrefs, sm, acc);
                } else { // the group's G rows
                    const int64_t vhead = (int64_t) (D / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, sh->v_bits);
                    lq2_ab_fold(ith, sh, (const LQ2_DEV uint8_t *) (a->v2 + g * G * a->g.v2_stride + hk * vhead),
                                a->g.v2_stride, G, LQ2_AB_V_PER_TOKEN, 0, sm, acc);
                }
                break;
        }
        return 1;
    }
    if (s == per_group * (g1 - g0)) {
        const int64_t n_head = (int64_t) gq * a->g.n_head_kv;
        lq2_ab_store(ith, sh, sm, acc, a->parts + (((int64_t) part * a->g.n_tokens + tok) * n_head + (int64_t) hk * gq) * (D + 2));
        return 1;
    }
    return 0;
}

// The block's shape: the op's, for kv head hk (d, gq > 0: those as constants, which a specialised
// kernel passes so that the loops unroll).
LQ2_INLINE struct lq2_ab_shape lq2_ab_block_shape(const LQ2_TH struct lq2_attn_args * a, int hk, int d, int gq) {
    struct lq2_ab_shape sh = a->g.shape;
    sh.hk = hk;
    if (d > 0) {
        sh.D  = d;
        sh.gq = gq;
    }
    return sh;
}

// The combine step for query head h of token tok, channel c: the normalized output.
LQ2_INLINE void lq2_ab_combine_at(const LQ2_TH struct lq2_attn_args * a, int h, int64_t tok, int c) {
    const int D = a->g.shape.D;
    const int64_t n_head = (int64_t) a->g.shape.gq * a->g.n_head_kv;
    const LQ2_DEV float * row = a->parts + (tok * n_head + h) * (D + 2);
    LQ2_DEV float * out = (LQ2_DEV float *) (a->dst + tok * a->g.dst_nb2 + h * a->g.dst_nb1);
    out[c] = lq2_ab_combine(c, D, a->g.n_part, row, a->g.n_tokens * n_head * (D + 2));
}


#if defined(__cplusplus) && !defined(__METAL_VERSION__)
}
#endif
