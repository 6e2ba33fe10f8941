// lq2-rope.h: RoPE for LogQuant's pre-RoPE 2-bit keys.
//
// The cache receives keys after RoPE (llama.cpp ropes them in the graph), un-rotates them with
// their position before quantizing (lq2_rope_rows(..., inverse = 1)), and attention re-rotates the
// dequantized keys at their position (lq2_rope_table + the attention kernel).
//
// Cost choice: re-rotate KEYS with a precomputed cos/sin table rather than rotate the query per
// token. Rotating the query for every key would cost the same multiply-adds per (key, query head),
// while a rotated key is shared by all n_head / n_head_kv query heads of its group. The sin/cos
// values depend only on (position, frequency), not on layer or head, so one table per step serves
// every layer and head: n_tok * n_dims / 2 sincos per step instead of per layer and head. The
// 2-bit positions only change when tokens are demoted, so a cache may also keep the table and
// append rows. The angle is computed in double precision (ggml accumulates it in f32; the
// difference is < 1e-4 relative at position 1e5, far below the 2-bit quantization error).
#pragma once

#include "../common/lq2-format.h"
#include "../common/lq2-rope-params.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// In place, n_head heads of head_dim floats each (one token's row), at position pos.
// inverse = 0 applies RoPE, inverse = 1 undoes it.
void lq2_rope_rows(const struct lq2_rope_params * p, float * x, int head_dim, int n_head,
                   int32_t pos, int inverse);

// Table for re-rotating 2-bit keys in attention: n tokens (positions pos[0..n)) in groups of G.
// Group g occupies n_dims * G halves: for pair i, G cosines then G sines (times attn_factor),
// token t of the group at index t; tokens of a partial last group past n get cos 1, sin 0.
// Stored in f16: a cache keeps one row per 2-bit slot, n_dims values per token (as many as a
// head's keys have channels), so f32 would cost 4 * n_dims bytes per token, more than the 2-bit
// keys of a model with few full-attention layers (Gemma 3: 1 KiB against 216 bytes). f16 rounds
// cos/sin by at most 2.4e-4, the same relative error as f16 keys, far below 2-bit quantization.
size_t lq2_rope_table_size(const struct lq2_rope_params * p, int64_t n, int G); // in halves
void   lq2_rope_table(const struct lq2_rope_params * p, const int32_t * pos, int64_t n, int G,
                      lq2_half * table);

#ifdef __cplusplus
}
#endif
