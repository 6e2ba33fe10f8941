// lq2-attn.h: attention of one query token over LogQuant's two tiers in ONE pass.
//
// Tier A holds full-precision f16 keys (post-RoPE) and values; tier B holds 2-bit keys (pre-RoPE,
// grouped per channel across G tokens, re-rotated here at each token's position) and 2-bit values
// (per token). Both feed one online softmax, so the result equals softmax attention over the
// union of the tokens: ggml's flash attention has no log-sum-exp output, so two separate calls
// could not be merged exactly.
//
// Semantics follow ggml_flash_attn_ext for one query row: score = dot(q, k) * scale; with softcap
// score = softcap * tanh(score / softcap); then score += slope(h) * mask[t] (ALiBi slope, 1 without
// max_bias). Output [n_head][head_dim] f32, rows normalized; a row with every token masked (or no
// tokens) is all zeros.
#pragma once

#include "../common/lq2-format.h"
#include "lq2-rope.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LQ2_ATTN_MAX_D 512

struct lq2_attn_params {
    int32_t head_dim;  // D, multiple of 64 (value groups), <= LQ2_ATTN_MAX_D
    int32_t n_head;    // query heads
    int32_t n_head_kv; // kv heads; query head h reads kv head h / (n_head / n_head_kv)
    float   scale;
    float   softcap;   // 0: off
    float   max_bias;  // ALiBi, 0: off
};

// Full-precision tier: token t, kv head h: keys at (char *) k + t * nb_k + h * D * 2 (f16, post-RoPE),
// values likewise with nb_v. mask: n floats (0 / -inf, or ALiBi distances), NULL = all visible.
struct lq2_tier_f16 {
    int64_t          n;
    const lq2_half * k;
    size_t           nb_k;
    const lq2_half * v;
    size_t           nb_v;
    const float    * mask;
};

// Low-bit tier: n tokens in groups of G (the last group may be partial); codes of k_bits / v_bits
// bits (2, 4, 8: the tier of one layer has one key and one value width).
// keys: group g at (char *) k + g * nb_kg: n_head_kv * D key blocks of G codes, channel c of kv
//       head h is block h * D + c (pre-RoPE).
// values: per token (v_per_channel 0): token t at (char *) v + t * nb_v: n_head_kv * D / 64 value
//       blocks; per channel (1): group g at (char *) v + g * nb_v: n_head_kv * D blocks of G codes
//       laid out as the keys' (no RoPE).
// pos: n positions (for RoPE; unused when rope.n_dims is 0 or a table is given). rope_table: lq2_rope_table(rope, pos, n, G) computed once per step
// and shared by every layer and head; NULL computes it per group here (slower).
// score_correction: 1 subtracts from every score of a group the expected inflation its key codes
// cause in exp(score) (see lq2_score_correction in lq2-format.h); 0 off.
struct lq2_tier_q2 {
    int64_t                n;
    int32_t                G;
    int32_t                k_bits;
    int32_t                v_bits;
    const void           * k;
    size_t                 nb_kg;
    const void           * v;
    size_t                 nb_v;
    const int32_t        * pos;
    struct lq2_rope_params rope;
    const lq2_half       * rope_table;
    const float          * mask;
    int32_t                score_correction;
    // Mixed key widths (lq2-format.h): n_head_kv * D channel widths of 0, b or 2b bits with a mean
    // of k_bits (kv head h's at k_widths + h * D); NULL: every channel k_bits.
    const int8_t         * k_widths;
    int32_t                v_per_channel;
    // 8-bit headers (lq2-format.h): (mu, sigma) per channel, the n_head_kv * D key channels, then
    // (values grouped per channel) the value channels; NULL: f16 headers. Values grouped per token
    // keep f16 headers.
    const float          * refs;
};

// One kv head's keys of one 2-bit group as the attention reads them: dequantized and re-rotated
// with the group's rows of the cos/sin table (rope n_dims 0: stored after RoPE, cs unused),
// channel-major k[c * G + t]. kg: the head's first channel block in the group.
// widths: the head's D channel widths (mixed key widths), or NULL for `bits` on every channel.
// refs: the head's D channel references for 8-bit headers, or NULL.
void lq2_keys_group_cm    (const void * kg, int D, int G, int bits, const int8_t * widths, const float * refs,
                           const struct lq2_rope_params * rp, const lq2_half * cs, float * k);
void lq2_keys_group_cm_ref(const void * kg, int D, int G, int bits, const int8_t * widths, const float * refs,
                           const struct lq2_rope_params * rp, const lq2_half * cs, float * k);

// Scratch bytes one thread needs.
size_t lq2_attn_work_size(const struct lq2_attn_params * p, int G, int n_dims);

// Query heads [ith * n_head / nth, (ith + 1) * n_head / nth): q and out are [n_head][D] f32.
// Either tier may be NULL or empty. work: lq2_attn_work_size() bytes, private to the thread.
// Returns 0, or -1 for unsupported parameters.
int lq2_attn_heads(const struct lq2_attn_params * p, const float * q,
                   const struct lq2_tier_f16 * a, const struct lq2_tier_q2 * b,
                   float * out, int ith, int nth, void * work);

// Same with the scalar code only (for tests; the dispatching version above uses AVX2 when built).
int lq2_attn_heads_ref(const struct lq2_attn_params * p, const float * q,
                       const struct lq2_tier_f16 * a, const struct lq2_tier_q2 * b,
                       float * out, int ith, int nth, void * work);

// A part of the attention, for splitting one query's tokens over threads (decode, where one query
// row is too little work to share by heads): heads [h0, h1) over the tokens of the tiers given
// (ranges of the whole tiers: pointers and masks offset, n shortened). acc: [n_head][D] rows h0..h1
// left unnormalized; M, S: [n_head] running max and sum of the online softmax. Returns 0 or -1.
int lq2_attn_partial(const struct lq2_attn_params * p, const float * q,
                     const struct lq2_tier_f16 * a, const struct lq2_tier_q2 * b,
                     int h0, int h1, float * acc, float * M, float * S, void * work);
int lq2_attn_partial_ref(const struct lq2_attn_params * p, const float * q,
                         const struct lq2_tier_f16 * a, const struct lq2_tier_q2 * b,
                         int h0, int h1, float * acc, float * M, float * S, void * work); // scalar code only

// One head's result from n_part parts over disjoint tokens: part i at parts + i * part_stride
// floats holds acc[D], then M, then S. out[D]: normalized (zeros when every token was masked).
// A lone part gives exactly the unsplit result.
void lq2_attn_merge(int D, int n_part, const float * parts, size_t part_stride, float * out);

#ifdef __cplusplus
}
#endif
