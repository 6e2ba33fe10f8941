// lq2-quants.c: scalar reference and AVX2 quantize / dequantize of the LogQuant formats.
//
// A block is a header (f16 d and m, or 8-bit ones: lq2-format.h), n * b / 8 bytes of codes, whatever its n (32, 64, 128) and code bits
// b (2, 4, 8): the helpers below take the block as bytes plus n and b, so one implementation serves
// every key group size, values, and the wider codes.
//
// AVX2 where it pays: value quantization (once per token and layer), and dequantization (used by
// the attention kernel on every step). Key quantization transposes one 8-channel slab of the group
// and reuses the block quantizer, so it gets the AVX2 block code too.
#include "lq2-quants.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#if defined(__AVX2__) && defined(__F16C__) && !defined(LQ2_FORCE_SCALAR)
#    define LQ2_AVX2 1
#    include <immintrin.h>
#else
#    define LQ2_AVX2 0
#endif

int lq2_cpu_has_avx2(void) {
    return LQ2_AVX2;
}

int lq2_type_traits_check(void) {
    static const int sizes[LQ2_TYPE_COUNT] = {
        (int) sizeof(block_lq2_k32), (int) sizeof(block_lq2_k64),
        (int) sizeof(block_lq2_k128), (int) sizeof(block_lq2_v64),
        (int) sizeof(block_lq4_k64), (int) sizeof(block_lq8_k64),
        (int) sizeof(block_lq4_v64), (int) sizeof(block_lq8_v64),
        (int) sizeof(block_lq4_k32), (int) sizeof(block_lq8_k32),
        (int) sizeof(block_lq4_k128), (int) sizeof(block_lq8_k128),
    };
    for (int t = 0; t < LQ2_TYPE_COUNT; ++t) {
        const struct lq2_type_traits * tr = &lq2_traits[t];
        if (tr->block_bytes != sizes[t] || tr->block_bytes != LQ2_BLOCK_BYTES_B(tr->group, tr->code_bits) ||
            tr->bits != 8.0f * (float) tr->block_bytes / (float) tr->group) {
            return t + 1;
        }
        if (tr->axis == LQ2_AXIS_TOKENS && lq2_key_type_b(tr->group, tr->code_bits) != t) {
            return t + 1;
        }
        if (tr->axis == LQ2_AXIS_CHANNELS && (tr->group != LQ2_QK_V || lq2_value_type(tr->code_bits) != t)) {
            return t + 1;
        }
    }
    return 0;
}

// ---- one block, scalar

// Channel c's references (lq2-format.h's 8-bit headers), (0, 0) for f16 headers (refs NULL).
static inline struct lq2_pair ref_of(const float * refs, int c) { return lq2_ref_at(refs, c); }

// The scalar block quantizer is lq2-format.h's lq2_quantize_block (the GPU demotions run it too);
// the AVX2 one below stores the same bytes (its params come from the same lq2_fit_block).

static void dequant_block_ref(const uint8_t * blk, int n, int b, struct lq2_pair ref, float * y) {
    const struct lq2_pair dm = lq2_block_dm(blk, ref);
    const float d = dm.a, m = dm.b;
    const uint8_t * qs = blk + LQ2_HDR_BYTES(ref.b > 0.0f);
    const int L = LQ2_LEVELS_B(b);
    for (int j = 0; j < n; ++j) {
        const int q = (qs[LQ2_CODE_BYTE_B(j, n, b)] >> LQ2_CODE_SHIFT_B(j, n, b)) & L;
        y[j] = d * (float) q + m;
    }
}

// ---- one block, AVX2

#if LQ2_AVX2
// n contiguous values; absent values are NaN (left out of min/max, code 0: same as the reference).
static void quant_block_avx2(const float * x, int n, int b, int fit, struct lq2_pair ref, uint8_t * blk) {
    const __m256 inf  = _mm256_set1_ps(INFINITY);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 lo = inf, hi = _mm256_set1_ps(-INFINITY);
    for (int j = 0; j < n; j += 8) {
        const __m256 v    = _mm256_loadu_ps(x + j);
        const __m256 fin  = _mm256_cmp_ps(_mm256_andnot_ps(sign, v), inf, _CMP_LT_OQ); // false for NaN, Inf
        lo = _mm256_blendv_ps(lo, _mm256_min_ps(lo, v), fin);
        hi = _mm256_blendv_ps(hi, _mm256_max_ps(hi, v), fin);
    }
    __m128 l4 = _mm_min_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1));
    __m128 h4 = _mm_max_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps(hi, 1));
    l4 = _mm_min_ps(l4, _mm_movehl_ps(l4, l4));
    h4 = _mm_max_ps(h4, _mm_movehl_ps(h4, h4));
    l4 = _mm_min_ss(l4, _mm_shuffle_ps(l4, l4, 1));
    h4 = _mm_max_ss(h4, _mm_shuffle_ps(h4, h4, 1));
    const int L = LQ2_LEVELS_B(b);
    uint32_t p = lq2_group_params(_mm_cvtss_f32(l4), _mm_cvtss_f32(h4), L, ref);
    p = fit ? lq2_fit_block(x, 1, n, L, p, ref) : p;
    lq2_block_set_params(blk, p, ref);

    uint8_t * qs = blk + LQ2_HDR_BYTES(ref.b > 0.0f);
    const int nb = n * b / 8, per_byte = 8 / b; // code j -> byte j % nb, bits b * (j / nb)
    const struct lq2_pair dm = lq2_params_dm(p, ref);
    const float d = dm.a, m = dm.b;
    if (d == 0.0f) {
        memset(qs, 0, (size_t) nb);
        return;
    }
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    const __m256 half = _mm256_set1_ps(0.5f), zero = _mm256_setzero_ps(), top = _mm256_set1_ps((float) L);
    for (int l = 0; l < nb; l += 8) {
        __m256i acc = _mm256_setzero_si256();
        for (int k = 0; k < per_byte; ++k) {
            const __m256 v = _mm256_loadu_ps(x + k * nb + l);
            __m256 q = _mm256_floor_ps(_mm256_add_ps(_mm256_div_ps(_mm256_sub_ps(v, vm), vd), half));
            q = _mm256_min_ps(_mm256_max_ps(q, zero), top); // max_ps(NaN, 0) returns 0
            acc = _mm256_or_si256(acc, _mm256_slli_epi32(_mm256_cvttps_epi32(q), b * k));
        }
        // 8 int32 lanes < 256 -> 8 bytes
        const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        _mm_storel_epi64((__m128i *) (qs + l), _mm_packus_epi16(w, w));
    }
}

static void dequant_block_avx2(const uint8_t * blk, int n, int b, struct lq2_pair ref, float * y) {
    const struct lq2_pair dm = lq2_block_dm(blk, ref);
    const __m256 vd = _mm256_set1_ps(dm.a), vm = _mm256_set1_ps(dm.b);
    const uint8_t * qs = blk + LQ2_HDR_BYTES(ref.b > 0.0f);
    const int nb = n * b / 8, per_byte = 8 / b;
    const __m256i mask = _mm256_set1_epi32(LQ2_LEVELS_B(b));
    for (int l = 0; l < nb; l += 8) {
        const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (qs + l)));
        for (int k = 0; k < per_byte; ++k) {
            const __m256i q = _mm256_and_si256(_mm256_srli_epi32(bytes, b * k), mask);
            _mm256_storeu_ps(y + k * nb + l, _mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(q), vm));
        }
    }
}
#endif

// ---- values

#define V_BLOCK_BYTES(b) LQ2_BLOCK_BYTES_B(LQ2_QK_V, b)

void lq2_quantize_v_row_ref(const float * x, void * y, int64_t n, int bits, int fit) {
    assert(n % LQ2_QK_V == 0 && LQ2_BITS_VALID(bits));
    for (int64_t i = 0; i < n / LQ2_QK_V; ++i) {
        lq2_quantize_block(x + i * LQ2_QK_V, 1, LQ2_QK_V, LQ2_QK_V, bits, fit, ref_of(NULL, 0),
                           (uint8_t *) y + i * V_BLOCK_BYTES(bits));
    }
}

void lq2_dequantize_v_row_ref(const void * x, float * y, int64_t n, int bits) {
    assert(n % LQ2_QK_V == 0 && LQ2_BITS_VALID(bits));
    for (int64_t i = 0; i < n / LQ2_QK_V; ++i) {
        dequant_block_ref((const uint8_t *) x + i * V_BLOCK_BYTES(bits), LQ2_QK_V, bits, ref_of(NULL, 0), y + i * LQ2_QK_V);
    }
}

void lq2_quantize_v_row(const float * x, void * y, int64_t n, int bits, int fit) {
#if LQ2_AVX2
    assert(n % LQ2_QK_V == 0 && LQ2_BITS_VALID(bits));
    for (int64_t i = 0; i < n / LQ2_QK_V; ++i) {
        quant_block_avx2(x + i * LQ2_QK_V, LQ2_QK_V, bits, fit, ref_of(NULL, 0), (uint8_t *) y + i * V_BLOCK_BYTES(bits));
    }
#else
    lq2_quantize_v_row_ref(x, y, n, bits, fit);
#endif
}

void lq2_dequantize_v_row(const void * x, float * y, int64_t n, int bits) {
#if LQ2_AVX2
    assert(n % LQ2_QK_V == 0 && LQ2_BITS_VALID(bits));
    for (int64_t i = 0; i < n / LQ2_QK_V; ++i) {
        dequant_block_avx2((const uint8_t *) x + i * V_BLOCK_BYTES(bits), LQ2_QK_V, bits, ref_of(NULL, 0), y + i * LQ2_QK_V);
    }
#else
    lq2_dequantize_v_row_ref(x, y, n, bits);
#endif
}

// ---- keys (refs: channel c's references at refs[2 c], for 8-bit headers; NULL: f16 headers)

void lq2_quantize_k_group_ref(const float * x, int64_t ldx, int n_tok, int n_ch, int G, int bits, int fit,
                              const float * refs, void * y) {
    assert(lq2_key_type_b(G, bits) >= 0 && n_tok >= 0 && n_tok <= G);
    const int bs = LQ2_BLOCK_BYTES_H(G, bits, refs != NULL);
    for (int c = 0; c < n_ch; ++c) {
        lq2_quantize_block(x + c, ldx, n_tok, G, bits, fit, ref_of(refs, c), (uint8_t *) y + (int64_t) c * bs);
    }
}

void lq2_quantize_k_group(const float * x, int64_t ldx, int n_tok, int n_ch, int G, int bits, int fit,
                          const float * refs, void * y) {
#if LQ2_AVX2
    assert(lq2_key_type_b(G, bits) >= 0 && n_tok >= 0 && n_tok <= G);
    const int bs = LQ2_BLOCK_BYTES_H(G, bits, refs != NULL);
    float slab[8 * 128]; // 8 channels x G tokens, channel-major; absent tokens are NaN
    for (int c0 = 0; c0 < n_ch; c0 += 8) {
        const int nc = n_ch - c0 < 8 ? n_ch - c0 : 8;
        for (int t = 0; t < G; ++t) {
            for (int c = 0; c < nc; ++c) {
                slab[c * G + t] = t < n_tok ? x[(int64_t) t * ldx + c0 + c] : NAN;
            }
        }
        for (int c = 0; c < nc; ++c) {
            quant_block_avx2(slab + c * G, G, bits, fit, ref_of(refs, c0 + c), (uint8_t *) y + (int64_t) (c0 + c) * bs);
        }
    }
#else
    lq2_quantize_k_group_ref(x, ldx, n_tok, n_ch, G, bits, fit, refs, y);
#endif
}

void lq2_dequantize_k_group_cm_ref(const void * x, int n_ch, int G, int bits, const float * refs, float * y) {
    const int bs = LQ2_BLOCK_BYTES_H(G, bits, refs != NULL);
    for (int c = 0; c < n_ch; ++c) {
        dequant_block_ref((const uint8_t *) x + (int64_t) c * bs, G, bits, ref_of(refs, c), y + (int64_t) c * G);
    }
}

void lq2_dequantize_k_group_cm(const void * x, int n_ch, int G, int bits, const float * refs, float * y) {
#if LQ2_AVX2
    const int bs = LQ2_BLOCK_BYTES_H(G, bits, refs != NULL);
    for (int c = 0; c < n_ch; ++c) {
        dequant_block_avx2((const uint8_t *) x + (int64_t) c * bs, G, bits, ref_of(refs, c), y + (int64_t) c * G);
    }
#else
    lq2_dequantize_k_group_cm_ref(x, n_ch, G, bits, refs, y);
#endif
}

// ---- keys with mixed widths (lq2-format.h): the demotion is not the hot path, so one quantizer
// (the shared scalar one, whose bytes the AVX2 one equals); the attention's reads take AVX2

void lq2_quantize_k_group_w(const float * x, int64_t ldx, int n_tok, int n_ch, int G, const int8_t * widths, int fit,
                            const float * refs, void * y) {
    assert(n_tok >= 0 && n_tok <= G);
    uint8_t * blk = (uint8_t *) y;
    for (int c = 0; c < n_ch; ++c) {
        assert(LQ2_WIDTH_VALID(widths[c]));
        lq2_quantize_block(x + c, ldx, n_tok, G, widths[c], fit, ref_of(refs, c), blk);
        blk += LQ2_BLOCK_BYTES_H(G, widths[c], refs != NULL);
    }
}

static void dequant_k_group_cm_w(const void * x, int n_ch, int G, const int8_t * widths, const float * refs, float * y,
                                 int simd) {
    const uint8_t * blk = (const uint8_t *) x;
    for (int c = 0; c < n_ch; ++c) {
        float * yc = y + (int64_t) c * G;
        if (widths[c] == 0) {
            const float m = lq2_block_dm(blk, ref_of(refs, c)).b;
            for (int t = 0; t < G; ++t) {
                yc[t] = m;
            }
        } else {
#if LQ2_AVX2
            if (simd) {
                dequant_block_avx2(blk, G, widths[c], ref_of(refs, c), yc);
            } else
#endif
            {
                dequant_block_ref(blk, G, widths[c], ref_of(refs, c), yc);
            }
        }
        blk += LQ2_BLOCK_BYTES_H(G, widths[c], refs != NULL);
    }
    (void) simd;
}

void lq2_dequantize_k_group_cm_w(const void * x, int n_ch, int G, const int8_t * widths, const float * refs, float * y) {
    dequant_k_group_cm_w(x, n_ch, G, widths, refs, y, LQ2_AVX2);
}

void lq2_dequantize_k_group_cm_w_ref(const void * x, int n_ch, int G, const int8_t * widths, const float * refs,
                                     float * y) {
    dequant_k_group_cm_w(x, n_ch, G, widths, refs, y, 0);
}

void lq2_dequantize_k_group(const void * x, int n_ch, int G, int bits, int n_tok, const float * refs, float * y,
                            int64_t ldy) {
    const int bs = LQ2_BLOCK_BYTES_H(G, bits, refs != NULL);
    float col[128];
    for (int c = 0; c < n_ch; ++c) {
        dequant_block_ref((const uint8_t *) x + (int64_t) c * bs, G, bits, ref_of(refs, c), col);
        for (int t = 0; t < n_tok; ++t) {
            y[(int64_t) t * ldy + c] = col[t];
        }
    }
}
