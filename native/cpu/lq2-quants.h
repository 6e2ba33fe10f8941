// lq2-quants.h: CPU quantize / dequantize of the LogQuant formats (see lq2-format.h).
//
// `bits` is the code width: 2 (the default formats), 4 or 8 (the precision levers). `fit` 1 fits
// each group's (d, m) by least squares instead of min/max (lq2_fit_params in lq2-format.h).
//
// Every entry point has a scalar reference (`_ref`, always compiled: the tests compare against it)
// and a dispatching version that takes the AVX2 path when this file was compiled with AVX2 + F16C
// and without LQ2_FORCE_SCALAR. Both produce identical bytes and identical floats.
#pragma once

#include "../common/lq2-format.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// 1 when the dispatching functions use AVX2 in this build.
int lq2_cpu_has_avx2(void);

// Checks lq2_traits[] against the block structs; 0 when consistent.
int lq2_type_traits_check(void);

// Values: one token's row of n channels (n % 64 == 0) <-> n / 64 value blocks of `bits`-bit codes.
void lq2_quantize_v_row    (const float * x, void * y, int64_t n, int bits, int fit);
void lq2_quantize_v_row_ref(const float * x, void * y, int64_t n, int bits, int fit);
void lq2_dequantize_v_row    (const void * x, float * y, int64_t n, int bits);
void lq2_dequantize_v_row_ref(const void * x, float * y, int64_t n, int bits);

// Keys: one group of G tokens (G = 32, 64, 128 for 2 bits; 64 for 4 and 8) and n_ch channels, PRE-RoPE.
// x: n_tok <= G token rows, row t at x + t * ldx (floats). Tokens n_tok..G-1 of a partial group are
// absent: they do not take part in min/max and get code 0.
// y: n_ch blocks of G codes (block_lq2_k32/64/128, block_lq4_k64, block_lq8_k64, or their
// 8-bit-header forms), block c = channel c.
// refs: channel c's references (mu, sigma) at refs[2 c] for 8-bit headers (lq2-format.h), blocks of
// LQ2_BLOCK_BYTES_H(G, bits, 1) bytes; NULL: f16 headers. Every key function below takes them.
void lq2_quantize_k_group    (const float * x, int64_t ldx, int n_tok, int n_ch, int G, int bits, int fit,
                              const float * refs, void * y);
void lq2_quantize_k_group_ref(const float * x, int64_t ldx, int n_tok, int n_ch, int G, int bits, int fit,
                              const float * refs, void * y);

// Token-major dequantization of the first n_tok tokens: row t written to y + t * ldy.
void lq2_dequantize_k_group(const void * x, int n_ch, int G, int bits, int n_tok, const float * refs, float * y,
                            int64_t ldy);

// Channel-major dequantization of all G tokens: y[c * G + t]. This is what attention uses: the
// re-rotation and the dot products then run along tokens, 8 at a time.
void lq2_dequantize_k_group_cm    (const void * x, int n_ch, int G, int bits, const float * refs, float * y);
void lq2_dequantize_k_group_cm_ref(const void * x, int n_ch, int G, int bits, const float * refs, float * y);

// Keys with mixed widths (lq2-format.h): channel c has codes of widths[c] bits (0, 2, 4 or 8), its
// block at lq2_widths_offset(widths, c, G). G = 32, 64 or 128.
void lq2_quantize_k_group_w(const float * x, int64_t ldx, int n_tok, int n_ch, int G, const int8_t * widths, int fit,
                            const float * refs, void * y);
void lq2_dequantize_k_group_cm_w    (const void * x, int n_ch, int G, const int8_t * widths, const float * refs,
                                     float * y);
void lq2_dequantize_k_group_cm_w_ref(const void * x, int n_ch, int G, const int8_t * widths, const float * refs,
                                     float * y);

#ifdef __cplusplus
}
#endif
