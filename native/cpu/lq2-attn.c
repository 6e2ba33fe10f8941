// lq2-attn.c: one-pass two-tier attention (see lq2-attn.h).
//
// Loop order: chunks of tokens (64 f16 tokens, or one 2-bit key group) outermost, then kv heads,
// then the query heads that share the kv head (a group's cos/sin rows are read once for all kv
// heads). AVX2 path: fused dequantize + re-rotate of the keys, scores for two query heads per pass,
// vectorised finish (no softcap) and exp, running output kept in registers over a chunk. A chunk's keys and values are converted to f32 once
// (f16 -> f32; or dequantized, and re-rotated for the 2-bit keys) and then read by every query
// head of the GQA group, so dequantization and RoPE are paid once per kv head, not per query head.
// 2-bit keys are dequantized channel-major ([D][G]): re-rotation and the dot products then run
// along tokens, 8 lanes at a time, with no transposition.
//
// The per-query-head softmax state (running max M, sum S) lives in the work buffer and the
// running weighted sum of values directly in the output row, so a thread's scratch does not grow
// with the number of tokens.
#include "lq2-attn.h"
#include "lq2-quants.h"

#include <math.h>
#include <string.h>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__) && !defined(LQ2_FORCE_SCALAR)
#    define LQ2_AVX2 1
#    include <immintrin.h>
#else
#    define LQ2_AVX2 0
#endif

#define LQ2_ATTN_CHUNK 64 // f16 tokens per chunk

static inline int imax(int a, int b) { return a > b ? a : b; }

size_t lq2_attn_work_size(const struct lq2_attn_params * p, int G, int n_dims) {
    const int D  = p->head_dim;
    const int nt = imax(G, LQ2_ATTN_CHUNK);
    const size_t floats = (size_t) nt * D    // keys: [T][D] f16 tier, [D][G] 2-bit tier
                        + (size_t) nt * D    // values [T][D]
                        + (size_t) G * D     // per-channel values of a group, channel-major [D][G]
                        + (size_t) nt * p->n_head // scores (one row per query head)
                        + (size_t) n_dims * G // rope cos/sin of one group when no table is given
                        + 2 * (size_t) p->n_head; // M, S
    return floats * sizeof(float);
}

// ---- vector primitives: `simd` selects AVX2 (when compiled) or plain loops

#if LQ2_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_f16x8(const lq2_half * x) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) x));
}
#endif

static void f16_to_f32(const lq2_half * x, float * y, int n, int simd) {
#if LQ2_AVX2
    if (simd) {
        for (int i = 0; i < n; i += 8) {
            _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + i))));
        }
        return;
    }
#endif
    (void) simd;
    for (int i = 0; i < n; ++i) {
        y[i] = lq2_fp16_to_fp32(x[i]);
    }
}

static float dot(const float * a, const float * b, int n, int simd) {
#if LQ2_AVX2
    if (simd) {
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        for (int i = 0; i < n; i += 16) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i),     _mm256_loadu_ps(b + i),     s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        }
        return hsum8(_mm256_add_ps(s0, s1));
    }
#endif
    (void) simd;
    float s = 0.0f;
    for (int i = 0; i < n; ++i) {
        s += a[i] * b[i];
    }
    return s;
}

static void axpy(float * y, float a, const float * x, int n, int simd) {
#if LQ2_AVX2
    if (simd) {
        const __m256 va = _mm256_set1_ps(a);
        for (int i = 0; i < n; i += 8) {
            _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
        }
        return;
    }
#endif
    (void) simd;
    for (int i = 0; i < n; ++i) {
        y[i] += a * x[i];
    }
}

static void scal(float * y, float a, int n) {
    for (int i = 0; i < n; ++i) {
        y[i] *= a;
    }
}

// Re-rotate channel-major keys k[D][G] with one group's table (pair i: G cos, then G sin).
static void rope_cm(const struct lq2_rope_params * rp, float * k, const lq2_half * cs, int G, int simd) {
    const int half = rp->n_dims / 2;
    for (int i = 0; i < half; ++i) {
        const int a = rp->mode == LQ2_ROPE_NEOX ? i : 2 * i;
        const int b = rp->mode == LQ2_ROPE_NEOX ? i + half : 2 * i + 1;
        float * ka = k + (int64_t) a * G;
        float * kb = k + (int64_t) b * G;
        const lq2_half * c = cs + (int64_t) 2 * i * G;
        const lq2_half * s = c + G;
#if LQ2_AVX2
        if (simd) {
            for (int t = 0; t < G; t += 8) {
                const __m256 x0 = _mm256_loadu_ps(ka + t), x1 = _mm256_loadu_ps(kb + t);
                const __m256 vc = load_f16x8(c + t), vs = load_f16x8(s + t);
                _mm256_storeu_ps(ka + t, _mm256_fmsub_ps(x0, vc, _mm256_mul_ps(x1, vs)));
                _mm256_storeu_ps(kb + t, _mm256_fmadd_ps(x0, vs, _mm256_mul_ps(x1, vc)));
            }
            continue;
        }
#endif
        (void) simd;
        for (int t = 0; t < G; ++t) {
            const float x0 = ka[t], x1 = kb[t];
            const float ct = lq2_fp16_to_fp32(c[t]), st = lq2_fp16_to_fp32(s[t]);
            ka[t] = x0 * ct - x1 * st;
            kb[t] = x0 * st + x1 * ct;
        }
    }
}

#if LQ2_AVX2
// s[t] = sum_c q[c] * k[c][t] for tokens [t, t + 32) of channel-major keys k[D][G].
static void scores_cm_block_avx2(const float * q, const float * k, int D, int G, int t, float * s) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int c = 0; c < D; ++c) {
        const __m256 qc = _mm256_set1_ps(q[c]);
        const float * kc = k + (int64_t) c * G + t;
        a0 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kc),      a0);
        a1 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kc + 8),  a1);
        a2 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kc + 16), a2);
        a3 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kc + 24), a3);
    }
    _mm256_storeu_ps(s + t, a0);
    _mm256_storeu_ps(s + t + 8, a1);
    _mm256_storeu_ps(s + t + 16, a2);
    _mm256_storeu_ps(s + t + 24, a3);
}
#endif

// s[t] = sum_c q[c] * k[c][t] for channel-major keys k[D][G] (G is a multiple of 32).
static void scores_cm(const float * q, const float * k, int D, int G, float * s, int simd) {
#if LQ2_AVX2
    if (simd) {
        for (int t = 0; t < G; t += 32) {
            scores_cm_block_avx2(q, k, D, G, t, s);
        }
        return;
    }
#endif
    (void) simd;
    for (int t = 0; t < G; ++t) {
        s[t] = 0.0f;
    }
    for (int c = 0; c < D; ++c) {
        const float * kc = k + (int64_t) c * G;
        for (int t = 0; t < G; ++t) {
            s[t] += q[c] * kc[t];
        }
    }
}


#if LQ2_AVX2
// Fused 2-bit key dequantization + re-rotation of one kv head's key group, channel-major k[D][G]
// (one pass instead of dequantize, then rotate), for b-bit codes. Same arithmetic as dequant + rope_cm: d * code + m
// (exact), then x0 * c - x1 * s and x0 * s + x1 * c.
// Mixed key widths (w non-NULL, lq2-format.h): both channels of a pair have w[a] bits; 0 bits
// read the block's m for every token (d = 0 and no codes). refs: the head's D channel references
// for 8-bit headers, NULL for f16 ones.
static void dequant_rope_cm_avx2(const char * kg, int D, int G, int bits, const int8_t * w, const float * refs,
                                 const struct lq2_rope_params * rp, const lq2_half * cs, float * k) {
    const int s8 = refs != NULL, hdr = LQ2_HDR_BYTES(s8);
    const int kbs = LQ2_BLOCK_BYTES_H(G, bits, s8), half = rp->n_dims / 2;
    int64_t off[LQ2_ATTN_MAX_D + 1];
    for (int c = 0; c <= D; ++c) {
        off[c] = w ? (c ? off[c - 1] + LQ2_BLOCK_BYTES_H(G, (int) w[c - 1], s8) : 0) : (int64_t) c * kbs;
    }
    for (int i = 0; i < half; ++i) {
        const int a = rp->mode == LQ2_ROPE_NEOX ? i : 2 * i;
        const int b = rp->mode == LQ2_ROPE_NEOX ? i + half : 2 * i + 1;
        const int pb = w ? w[a] : bits;
        const int nb = G * pb / 8, per_byte = pb ? 8 / pb : 0;
        const __m256i cmask = _mm256_set1_epi32(LQ2_LEVELS_B(pb));
        const uint8_t * ba = (const uint8_t *) kg + off[a];
        const uint8_t * bb = (const uint8_t *) kg + off[b];
        if (pb == 0) { // the pair's means, rotated
            const float xa = lq2_block_dm(ba, lq2_ref_at(refs, a)).b;
            const float xb = lq2_block_dm(bb, lq2_ref_at(refs, b)).b;
            const __m256 x0 = _mm256_set1_ps(xa), x1 = _mm256_set1_ps(xb);
            const lq2_half * c = cs + (int64_t) 2 * i * G;
            const lq2_half * s = c + G;
            for (int t = 0; t < G; t += 8) {
                const __m256 vc = load_f16x8(c + t), vs = load_f16x8(s + t);
                _mm256_storeu_ps(k + (int64_t) a * G + t, _mm256_fmsub_ps(x0, vc, _mm256_mul_ps(x1, vs)));
                _mm256_storeu_ps(k + (int64_t) b * G + t, _mm256_fmadd_ps(x0, vs, _mm256_mul_ps(x1, vc)));
            }
            continue;
        }
        const struct lq2_pair dma = lq2_block_dm(ba, lq2_ref_at(refs, a)), dmb = lq2_block_dm(bb, lq2_ref_at(refs, b));
        const __m256 da = _mm256_set1_ps(dma.a), ma = _mm256_set1_ps(dma.b);
        const __m256 db = _mm256_set1_ps(dmb.a), mb = _mm256_set1_ps(dmb.b);
        const lq2_half * c = cs + (int64_t) 2 * i * G;
        const lq2_half * s = c + G;
        float * ka = k + (int64_t) a * G;
        float * kb = k + (int64_t) b * G;
        for (int l = 0; l < nb; l += 8) {
            const __m256i qa = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (ba + hdr + l)));
            const __m256i qb = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (bb + hdr + l)));
            for (int kk = 0; kk < per_byte; ++kk) {
                const int t = kk * nb + l;
                const __m256 x0 = _mm256_fmadd_ps(da, _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(qa, pb * kk), cmask)), ma);
                const __m256 x1 = _mm256_fmadd_ps(db, _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(qb, pb * kk), cmask)), mb);
                const __m256 vc = load_f16x8(c + t), vs = load_f16x8(s + t);
                _mm256_storeu_ps(ka + t, _mm256_fmsub_ps(x0, vc, _mm256_mul_ps(x1, vs)));
                _mm256_storeu_ps(kb + t, _mm256_fmadd_ps(x0, vs, _mm256_mul_ps(x1, vc)));
            }
        }
    }
    if (rp->n_dims < D) { // channels past n_dims pass through
        const float * r = refs ? refs + 2 * rp->n_dims : NULL;
        if (w) {
            lq2_dequantize_k_group_cm_w(kg + off[rp->n_dims], D - rp->n_dims, G, w + rp->n_dims, r, k + (int64_t) rp->n_dims * G);
        } else {
            lq2_dequantize_k_group_cm(kg + (int64_t) rp->n_dims * kbs, D - rp->n_dims, G, bits, r, k + (int64_t) rp->n_dims * G);
        }
    }
}

// expf for x <= 0 (cephes polynomial, ~1 ulp); x below -87.3 (and -inf) gives 0.
static inline __m256 exp256_neg(__m256 x) {
    const __m256 lo   = _mm256_set1_ps(-87.33654f);
    const __m256 zero = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(lo, x); // NaN stays NaN
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    const __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(zero, p);
}
#endif

#if LQ2_AVX2
// scores_cm_block_avx2 for two query heads at once: every key vector loaded feeds two FMAs.
static void scores_cm2_block_avx2(const float * q0, const float * q1, const float * k, int D, int G, int t,
                                  float * s0, float * s1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int c = 0; c < D; ++c) {
        const __m256 qa = _mm256_set1_ps(q0[c]), qb = _mm256_set1_ps(q1[c]);
        const float * kc = k + (int64_t) c * G + t;
        const __m256 k0 = _mm256_loadu_ps(kc), k1 = _mm256_loadu_ps(kc + 8);
        const __m256 k2 = _mm256_loadu_ps(kc + 16), k3 = _mm256_loadu_ps(kc + 24);
        a0 = _mm256_fmadd_ps(qa, k0, a0); b0 = _mm256_fmadd_ps(qb, k0, b0);
        a1 = _mm256_fmadd_ps(qa, k1, a1); b1 = _mm256_fmadd_ps(qb, k1, b1);
        a2 = _mm256_fmadd_ps(qa, k2, a2); b2 = _mm256_fmadd_ps(qb, k2, b2);
        a3 = _mm256_fmadd_ps(qa, k3, a3); b3 = _mm256_fmadd_ps(qb, k3, b3);
    }
    _mm256_storeu_ps(s0 + t, a0); _mm256_storeu_ps(s0 + t + 8, a1);
    _mm256_storeu_ps(s0 + t + 16, a2); _mm256_storeu_ps(s0 + t + 24, a3);
    _mm256_storeu_ps(s1 + t, b0); _mm256_storeu_ps(s1 + t + 8, b1);
    _mm256_storeu_ps(s1 + t + 16, b2); _mm256_storeu_ps(s1 + t + 24, b3);
}

// Scores of query heads [j0, j1) (rows of sbuf nt apart) against one kv head's channel-major key
// group: 32 tokens at a time for every head, two heads per pass, so that the block of keys in use
// (32 x D floats) can stay in L1 while all the heads read it (a whole group of 128 tokens, 32 KB at
// D = 64, does not). Against heads outermost it measured within the noise (attn_bench, both group
// sizes); the values' fold below is where groups of 128 lost. Each score sums over the channels
// in the same order as scores_cm.
static void scores_heads_avx2(const float * q, int j0, int j1, const float * k, int D, int G, float * sbuf,
                              int64_t nt) {
    for (int t = 0; t < G; t += 32) {
        int j = j0;
        for (; j + 1 < j1; j += 2) {
            scores_cm2_block_avx2(q + (int64_t) j * D, q + (int64_t) (j + 1) * D, k, D, G, t, sbuf + j * nt,
                                  sbuf + (j + 1) * nt);
        }
        if (j < j1) {
            scores_cm_block_avx2(q + (int64_t) j * D, k, D, G, t, sbuf + j * nt);
        }
    }
}
#endif

// ---- softmax pieces shared by both tiers

struct head_ctx {
    float scale;   // already divided by softcap when softcap is on (as ggml does)
    float softcap;
    float slope;
};

static struct head_ctx make_head_ctx(const struct lq2_attn_params * p, int h) {
    // ALiBi slopes as ggml defines them: heads past the largest power of two get odd powers of m1
    float slope = 1.0f;
    if (p->max_bias > 0.0f) {
        const int   n2 = 1 << (int) floorf(log2f((float) p->n_head));
        const float m0 = powf(2.0f, -p->max_bias / (float) n2);
        const float m1 = powf(2.0f, -(p->max_bias / 2.0f) / (float) n2);
        slope = h < n2 ? powf(m0, (float) (h + 1)) : powf(m1, (float) (2 * (h - n2) + 1));
    }
    const struct head_ctx c = { p->softcap != 0.0f ? p->scale / p->softcap : p->scale, p->softcap, slope };
    return c;
}

// Raw dot products -> final scores; returns their max (-inf when every token is masked).
static float finish_scores(const struct head_ctx * h, float * s, int n, const float * mask) {
    float mx = -INFINITY;
    for (int t = 0; t < n; ++t) {
        float v = s[t] * h->scale;
        if (h->softcap != 0.0f) {
            v = h->softcap * tanhf(v);
        }
        if (mask) {
            v += h->slope * mask[t];
        }
        s[t] = v;
        mx = v > mx ? v : mx;
    }
    return mx;
}

#if LQ2_AVX2
// finish_scores without softcap, 8 at a time (same roundings: s * scale, then + slope * mask).
static float finish_scores_avx2(const struct head_ctx * h, float * s, int n, const float * mask) {
    const __m256 vscale = _mm256_set1_ps(h->scale), vslope = _mm256_set1_ps(h->slope);
    __m256 vmx = _mm256_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + t), vscale);
        if (mask) {
            v = _mm256_add_ps(v, _mm256_mul_ps(vslope, _mm256_loadu_ps(mask + t)));
        }
        _mm256_storeu_ps(s + t, v);
        vmx = _mm256_max_ps(v, vmx); // a NaN score is ignored, as in the scalar loop
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float mx = _mm_cvtss_f32(m4);
    for (; t < n; ++t) {
        float v = s[t] * h->scale;
        if (mask) {
            v += h->slope * mask[t];
        }
        s[t] = v;
        mx = v > mx ? v : mx;
    }
    return mx;
}
#endif

// Online softmax, first step: raise the running max M to mx, rescaling S and acc to it.
// Returns 0 when the chunk has nothing to fold (every score -inf).
static int online_rescale(float * acc, float * M, float * S, float mx, int D) {
    if (mx == -INFINITY) {
        return 0;
    }
    if (mx > *M) {
        if (*M != -INFINITY) {
            const float ms = expf(*M - mx);
            *S *= ms;
            scal(acc, ms, D);
        }
        *M = mx;
    }
    return 1;
}

// Online softmax: fold n scored tokens with values v[t * D] into (M, S, acc).
static void online_update(float * acc, float * M, float * S, const float * s, float mx, int n,
                          const float * v, int D, int simd) {
    if (!online_rescale(acc, M, S, mx, D)) {
        return;
    }
    for (int t = 0; t < n; ++t) {
        if (s[t] == -INFINITY) {
            continue;
        }
        const float pr = expf(s[t] - *M);
        *S += pr;
        axpy(acc, pr, v + (int64_t) t * D, D, simd);
    }
}


#if LQ2_AVX2
// The softmax weights exp(s[t] - M) of n scores, in place, 8 at a time (-inf: 0); returns their sum.
static float exp_weights_avx2(float * s, int n, float M) {
    const __m256 vM = _mm256_set1_ps(M);
    __m256 vsum = _mm256_setzero_ps();
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 pr = exp256_neg(_mm256_sub_ps(_mm256_loadu_ps(s + t), vM));
        vsum = _mm256_add_ps(vsum, pr);
        _mm256_storeu_ps(s + t, pr);
    }
    float sum = hsum8(vsum);
    for (; t < n; ++t) {
        const float pr = s[t] == -INFINITY ? 0.0f : expf(s[t] - M);
        sum += pr;
        s[t] = pr;
    }
    return sum;
}

// online_update with the exponentials 8 at a time and the running output in registers (64 channels
// at a time) while the chunk's value rows stream from L1. Masked tokens (-inf) are skipped.
static void online_update_avx2(float * acc, float * M, float * S, float * s, float mx, int n,
                               const float * v, int D) {
    if (!online_rescale(acc, M, S, mx, D)) {
        return;
    }
    *S += exp_weights_avx2(s, n, *M);
    for (int d0 = 0; d0 < D; d0 += 64) {
        float * ad = acc + d0;
        __m256 a0 = _mm256_loadu_ps(ad),      a1 = _mm256_loadu_ps(ad + 8);
        __m256 a2 = _mm256_loadu_ps(ad + 16), a3 = _mm256_loadu_ps(ad + 24);
        __m256 a4 = _mm256_loadu_ps(ad + 32), a5 = _mm256_loadu_ps(ad + 40);
        __m256 a6 = _mm256_loadu_ps(ad + 48), a7 = _mm256_loadu_ps(ad + 56);
        for (int u = 0; u < n; ++u) {
            if (s[u] == 0.0f) {
                continue; // masked (or underflowed: adds nothing)
            }
            const __m256 p = _mm256_set1_ps(s[u]);
            const float * vr = v + (int64_t) u * D + d0;
            a0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr),      a0);
            a1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8),  a1);
            a2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 16), a2);
            a3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 24), a3);
            a4 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 32), a4);
            a5 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 40), a5);
            a6 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 48), a6);
            a7 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 56), a7);
        }
        _mm256_storeu_ps(ad, a0);      _mm256_storeu_ps(ad + 8, a1);
        _mm256_storeu_ps(ad + 16, a2); _mm256_storeu_ps(ad + 24, a3);
        _mm256_storeu_ps(ad + 32, a4); _mm256_storeu_ps(ad + 40, a5);
        _mm256_storeu_ps(ad + 48, a6); _mm256_storeu_ps(ad + 56, a7);
    }
}
#endif

// A group's per-channel values, dequantized channel-major (cm[c * G + t], as the keys), into the
// token-major rows the scalar fold reads (tm[t * D + c]).
static void values_to_rows(const float * cm, int D, int G, int n, float * tm) {
    for (int c = 0; c < D; ++c) {
        for (int t = 0; t < n; ++t) {
            tm[(int64_t) t * D + c] = cm[(int64_t) c * G + t];
        }
    }
}

#if LQ2_AVX2
// The per-channel values' fold (one 2-bit group, values channel-major vcm[c * G + t]; G and D
// multiples of 8) in two steps, so that the group's values, 32 KB at G = 128 and D = 64, are
// read once for all the query heads of a kv head instead of once per head.
// Step 1, per head: the scores become softmax weights exp(s[t] - M) (tokens past n and a head
// with nothing to add weigh 0) and (M, S, acc) are rescaled as online_update does.
static void fold_weights_cm_avx2(const struct head_ctx * h, float * s, int n, const float * mask, float * acc,
                                 float * M, float * S, int D, int G) {
    const float mx = h->softcap != 0.0f ? finish_scores(h, s, n, mask) : finish_scores_avx2(h, s, n, mask);
    if (!online_rescale(acc, M, S, mx, D)) {
        memset(s, 0, (size_t) G * sizeof(float));
        return;
    }
    *S += exp_weights_avx2(s, n, *M);
    for (int t = n; t < G; ++t) {
        s[t] = 0.0f;
    }
}

// Step 2 for 64 tokens of one head (vcm: channel c's 64 values at vcm + c * G): the 64 weights stay
// in 8 registers, 4 channels at a time.
static void fold_values_cm64_avx2(float * acc, const float * s, const float * vcm, int D, int G) {
    __m256 w[8];
    for (int k = 0; k < 8; ++k) {
        w[k] = _mm256_loadu_ps(s + 8 * k);
    }
    for (int c0 = 0; c0 < D; c0 += 4) {
        __m256 r[4];
        for (int i = 0; i < 4; ++i) {
            const float * row = vcm + (int64_t) (c0 + i) * G;
            __m256 a = _mm256_mul_ps(w[0], _mm256_loadu_ps(row));
            for (int k = 1; k < 8; ++k) {
                a = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(row + 8 * k), a);
            }
            r[i] = a;
        }
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
        const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(acc + c0, _mm_add_ps(_mm_loadu_ps(acc + c0), sums));
    }
}

// Step 2, heads [j0, j1): acc_j[c] += sum_t w_j[t] vcm[c][t]. A group of 64 or 128 tokens goes 64
// tokens at a time, every head folding them while their values (16 KB at D = 64) are in L1, each
// head's weights in registers: a group of 128 read whole per head, 32 KB, measured 3x slower in
// this step. Other groups (32 tokens): 4 channels at a time for every head, the weights loaded.
// Each channel's dot product runs along the tokens 8 at a time (no transposition).
static void fold_values_cm_avx2(float * out, const float * sbuf, int64_t nt, int j0, int j1, const float * vcm,
                                int D, int G) {
    if (G % 64 == 0) {
        for (int t0 = 0; t0 < G; t0 += 64) {
            for (int j = j0; j < j1; ++j) {
                fold_values_cm64_avx2(out + (int64_t) j * D, sbuf + j * nt + t0, vcm + t0, D, G);
            }
        }
        return;
    }
    for (int c0 = 0; c0 < D; c0 += 4) {
        const float * rows = vcm + (int64_t) c0 * G;
        for (int j = j0; j < j1; ++j) {
            const float * w = sbuf + j * nt;
            __m256 r[4];
            for (int i = 0; i < 4; ++i) {
                const float * row = rows + (int64_t) i * G;
                __m256 a = _mm256_mul_ps(_mm256_loadu_ps(w), _mm256_loadu_ps(row));
                for (int u = 8; u < G; u += 8) {
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(w + u), _mm256_loadu_ps(row + u), a);
                }
                r[i] = a;
            }
            const __m256 hs = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
            const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(hs), _mm256_extractf128_ps(hs, 1));
            float * acc = out + (int64_t) j * D + c0;
            _mm_storeu_ps(acc, _mm_add_ps(_mm_loadu_ps(acc), sums));
        }
    }
}
#endif

// Scores of one chunk -> folded into the head's (M, S, acc), values token-major (v[t * D]).
// (Per-channel values read channel-major: fold_weights_cm_avx2 and fold_values_cm_avx2.)
static void fold_chunk(const struct head_ctx * h, float * s, int n, const float * mask, float * acc,
                       float * M, float * S, const float * v, int D, int simd) {
#if LQ2_AVX2
    if (simd) {
        const float mx = h->softcap != 0.0f ? finish_scores(h, s, n, mask) : finish_scores_avx2(h, s, n, mask);
        online_update_avx2(acc, M, S, s, mx, n, v, D);
        return;
    }
#endif
    const float mx = finish_scores(h, s, n, mask);
    online_update(acc, M, S, s, mx, n, v, D, simd);
}

static int all_masked(const float * mask, int64_t n) {
    if (!mask) {
        return 0;
    }
    for (int64_t t = 0; t < n; ++t) {
        if (mask[t] != -INFINITY) {
            return 0;
        }
    }
    return 1;
}

// ---- one key group, as the kernel reads it

static void keys_group_cm(const void * kg, int D, int G, int bits, const int8_t * w, const float * refs,
                          const struct lq2_rope_params * rp, const lq2_half * cs, float * k, int simd) {
#if LQ2_AVX2
    if (simd) {
        dequant_rope_cm_avx2((const char *) kg, D, G, bits, w, refs, rp, cs, k);
        return;
    }
#endif
    if (w) {
        lq2_dequantize_k_group_cm_w_ref(kg, D, G, w, refs, k);
    } else {
        lq2_dequantize_k_group_cm_ref(kg, D, G, bits, refs, k);
    }
    rope_cm(rp, k, cs, G, simd);
}

void lq2_keys_group_cm(const void * kg, int D, int G, int bits, const int8_t * widths, const float * refs,
                       const struct lq2_rope_params * rp, const lq2_half * cs, float * k) {
    keys_group_cm(kg, D, G, bits, widths, refs, rp, cs, k, LQ2_AVX2);
}

void lq2_keys_group_cm_ref(const void * kg, int D, int G, int bits, const int8_t * widths, const float * refs,
                           const struct lq2_rope_params * rp, const lq2_half * cs, float * k) {
    keys_group_cm(kg, D, G, bits, widths, refs, rp, cs, k, 0);
}

// ---- bias correction (lq2-format.h): one group's scores lowered by their expected inflation

static void correct_scores(const struct lq2_attn_params * p, const struct lq2_rope_params * rp, const char * kg,
                           int D, int G, int bits, const int8_t * w, const float * refs, const float * q, int j0,
                           int j1, float * sbuf, int nt, int n) {
    const int   s8   = refs != NULL;
    const int   kbs  = LQ2_BLOCK_BYTES_H(G, bits, s8), half = rp->n_dims / 2;
    const float af2  = rp->attn_factor * rp->attn_factor; // the table's rows carry it
    float var[LQ2_ATTN_MAX_D];
    int64_t off = 0;
    for (int c = 0; c < D; ++c) { // a 0-bit channel's d is 0: its error is not a code's, left out
        const float d = !w || w[c] ? lq2_block_dm((const uint8_t *) kg + off, lq2_ref_at(refs, c)).a : 0.0f;
        var[c] = lq2_code_noise_var(d) * (c < rp->n_dims ? af2 : 1.0f);
        off += w ? LQ2_BLOCK_BYTES_H(G, (int) w[c], s8) : kbs;
    }
    for (int j = j0; j < j1; ++j) {
        const float * qj = q + (int64_t) j * D;
        float v = 0.0f;
        for (int i = 0; i < half; ++i) {
            const int a = rp->mode == LQ2_ROPE_NEOX ? i : 2 * i;
            const int b = rp->mode == LQ2_ROPE_NEOX ? i + half : 2 * i + 1;
            v += 0.5f * (qj[a] * qj[a] + qj[b] * qj[b]) * (var[a] + var[b]);
        }
        for (int c = rp->n_dims; c < D; ++c) {
            v += qj[c] * qj[c] * var[c];
        }
        const float corr = lq2_score_correction(v, p->scale);
        float * s = sbuf + (int64_t) j * nt;
        for (int t = 0; t < n; ++t) {
            s[t] -= corr;
        }
    }
}

// ---- the kernel

// Heads [h0, h1). M_out / S_out NULL: rows of out normalized; else out holds the unnormalized
// sums and M_out / S_out the softmax state (for lq2_attn_merge).
static int attn_core(const struct lq2_attn_params * p, const float * q,
                     const struct lq2_tier_f16 * a, const struct lq2_tier_q2 * b,
                     float * out, float * M_out, float * S_out, int h0, int h1, void * work, int simd) {
    const int D = p->head_dim;
    if (D <= 0 || D % LQ2_QK_V != 0 || D > LQ2_ATTN_MAX_D || p->n_head_kv <= 0 ||
        p->n_head % p->n_head_kv != 0 || h0 < 0 || h1 < h0 || h1 > p->n_head) {
        return -1;
    }
    const int has_a = a && a->n > 0;
    const int has_b = b && b->n > 0;
    const int G      = has_b ? b->G : LQ2_ATTN_CHUNK;
    const int kb     = has_b ? b->k_bits : 2;
    const int vb     = has_b ? b->v_bits : 2;
    const int n_dims = has_b ? b->rope.n_dims : 0;
    const int vpc    = has_b && b->v_per_channel;
    if (has_b && (!lq2_key_bits_ok(G, kb, b->k_widths != NULL) || (vpc ? lq2_key_type_b(G, vb) : lq2_value_type(vb)) < 0 ||
                  n_dims < 0 || n_dims > D || n_dims % 2 != 0 ||
                  (b->rope.mode != LQ2_ROPE_NORMAL && b->rope.mode != LQ2_ROPE_NEOX) ||
                  (n_dims > 0 && !b->rope_table && !b->pos))) {
        return -1;
    }
    const int gq = p->n_head / p->n_head_kv;

    const int nt = imax(G, LQ2_ATTN_CHUNK);
    float * kbuf = (float *) work;
    float * vbuf = kbuf + (size_t) nt * D;
    float * vcm  = vbuf + (size_t) nt * D;
    // without a 2-bit tier G is LQ2_ATTN_CHUNK, not the G the caller sized the work for: no group buffer
    float * sbuf = vcm + (size_t) (has_b ? G : 0) * D;
    lq2_half * csbuf = (lq2_half *) (sbuf + (size_t) nt * p->n_head);
    float * Mv = M_out ? M_out : sbuf + (size_t) nt * p->n_head + (size_t) n_dims * G; // after csbuf
    float * Sv = S_out ? S_out : Mv + p->n_head;

    const int s8  = has_b && b->refs != NULL;
    const int kbs = LQ2_BLOCK_BYTES_H(G, kb, s8);
    const size_t vhead_bytes = vpc ? (size_t) D * LQ2_BLOCK_BYTES_H(G, vb, s8)
                                   : (size_t) (D / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, vb);
    const int hk0 = h0 / gq, hk1 = h1 > h0 ? (h1 - 1) / gq + 1 : hk0; // kv heads [hk0, hk1)
    for (int j = h0; j < h1; ++j) {
        Mv[j] = -INFINITY;
        Sv[j] = 0.0f;
        memset(out + (int64_t) j * D, 0, (size_t) D * sizeof(float));
    }

    // tier A: f16, post-RoPE
    for (int64_t t0 = 0; has_a && t0 < a->n; t0 += LQ2_ATTN_CHUNK) {
        const int n = (int) (a->n - t0 < LQ2_ATTN_CHUNK ? a->n - t0 : LQ2_ATTN_CHUNK);
        const float * mask = a->mask ? a->mask + t0 : NULL;
        if (all_masked(mask, n)) {
            continue;
        }
        for (int hk = hk0; hk < hk1; ++hk) {
            const int j0 = imax(h0, hk * gq);
            const int j1 = h1 < (hk + 1) * gq ? h1 : (hk + 1) * gq;
            for (int t = 0; t < n; ++t) {
                const char * kr = (const char *) a->k + (t0 + t) * a->nb_k + (size_t) hk * D * sizeof(lq2_half);
                const char * vr = (const char *) a->v + (t0 + t) * a->nb_v + (size_t) hk * D * sizeof(lq2_half);
                f16_to_f32((const lq2_half *) kr, kbuf + (int64_t) t * D, D, simd);
                f16_to_f32((const lq2_half *) vr, vbuf + (int64_t) t * D, D, simd);
            }
            for (int j = j0; j < j1; ++j) {
                const struct head_ctx h = make_head_ctx(p, j);
                for (int t = 0; t < n; ++t) {
                    sbuf[t] = dot(q + (int64_t) j * D, kbuf + (int64_t) t * D, D, simd);
                }
                fold_chunk(&h, sbuf, n, mask, out + (int64_t) j * D, &Mv[j], &Sv[j], vbuf, D, simd);
            }
        }
    }

    // tier B: 2-bit, keys re-rotated at their positions; groups outermost so that one group's
    // cos/sin (table rows or computed) serve every kv head while they are in L1
    const int64_t ng = has_b ? (b->n + G - 1) / G : 0;
    for (int64_t g = 0; g < ng; ++g) {
        const int n = (int) (b->n - g * G < G ? b->n - g * G : G);
        const float * mask = b->mask ? b->mask + g * G : NULL;
        if (all_masked(mask, n)) {
            continue;
        }
        const lq2_half * cs = b->rope_table ? b->rope_table + g * (int64_t) n_dims * G : csbuf;
        if (!b->rope_table && n_dims > 0) {
            lq2_rope_table(&b->rope, b->pos + g * G, n, G, csbuf);
        }
        for (int hk = hk0; hk < hk1; ++hk) {
            const int j0 = imax(h0, hk * gq);
            const int j1 = h1 < (hk + 1) * gq ? h1 : (hk + 1) * gq;
            const char * kg = (const char *) b->k + g * b->nb_kg + (size_t) hk * D * kbs;
            const int8_t * kw = b->k_widths ? b->k_widths + (int64_t) hk * D : NULL;
            const float * kr = s8 ? b->refs + (int64_t) 2 * hk * D : NULL;
            const float * vref = s8 ? b->refs + (int64_t) 2 * (p->n_head_kv + hk) * D : NULL; // after the keys'
            keys_group_cm(kg, D, G, kb, kw, kr, &b->rope, cs, kbuf, simd);
            // per-channel values: the head's D value blocks of the group, channel-major; the AVX2
            // fold reads them so, the scalar one token-major
            const int v_cm = vpc && LQ2_AVX2 && simd && G % 8 == 0 && D % 8 == 0 ? G : 0;
            if (vpc) {
                const char * vg = (const char *) b->v + g * b->nb_v + (size_t) hk * vhead_bytes;
                if (simd) {
                    lq2_dequantize_k_group_cm(vg, D, G, vb, vref, vcm);
                } else {
                    lq2_dequantize_k_group_cm_ref(vg, D, G, vb, vref, vcm);
                }
                if (!v_cm) {
                    values_to_rows(vcm, D, G, n, vbuf);
                }
            } else {
                for (int t = 0; t < n; ++t) {
                    const char * vr = (const char *) b->v + (g * G + t) * b->nb_v + (size_t) hk * vhead_bytes;
                    if (simd) {
                        lq2_dequantize_v_row(vr, vbuf + (int64_t) t * D, D, vb);
                    } else {
                        lq2_dequantize_v_row_ref(vr, vbuf + (int64_t) t * D, D, vb);
                    }
                }
            }
            int j = j0;
#if LQ2_AVX2
            if (simd) {
                scores_heads_avx2(q, j0, j1, kbuf, D, G, sbuf, nt);
                j = j1;
            }
#endif
            for (; j < j1; ++j) {
                scores_cm(q + (int64_t) j * D, kbuf, D, G, sbuf + (int64_t) j * nt, simd);
            }
            if (b->score_correction) {
                correct_scores(p, &b->rope, kg, D, G, kb, kw, kr, q, j0, j1, sbuf, nt, n);
            }
#if LQ2_AVX2
            if (v_cm) {
                for (j = j0; j < j1; ++j) {
                    const struct head_ctx h = make_head_ctx(p, j);
                    fold_weights_cm_avx2(&h, sbuf + (int64_t) j * nt, n, mask, out + (int64_t) j * D, &Mv[j], &Sv[j],
                                         D, G);
                }
                fold_values_cm_avx2(out, sbuf, nt, j0, j1, vcm, D, G);
                continue;
            }
#endif
            for (j = j0; j < j1; ++j) {
                const struct head_ctx h = make_head_ctx(p, j);
                fold_chunk(&h, sbuf + (int64_t) j * nt, n, mask, out + (int64_t) j * D, &Mv[j], &Sv[j], vbuf, D,
                           simd);
            }
        }
    }

    for (int j = h0; j < h1 && !M_out; ++j) {
        scal(out + (int64_t) j * D, Sv[j] > 0.0f ? 1.0f / Sv[j] : 0.0f, D);
    }
    return 0;
}

static int attn_heads(const struct lq2_attn_params * p, const float * q, const struct lq2_tier_f16 * a,
                      const struct lq2_tier_q2 * b, float * out, int ith, int nth, void * work, int simd) {
    if (nth <= 0 || ith < 0 || ith >= nth) {
        return -1;
    }
    const int h0 = (int) ((int64_t) p->n_head * ith / nth);
    const int h1 = (int) ((int64_t) p->n_head * (ith + 1) / nth);
    return attn_core(p, q, a, b, out, NULL, NULL, h0, h1, work, simd);
}

int lq2_attn_heads(const struct lq2_attn_params * p, const float * q,
                   const struct lq2_tier_f16 * a, const struct lq2_tier_q2 * b,
                   float * out, int ith, int nth, void * work) {
    return attn_heads(p, q, a, b, out, ith, nth, work, LQ2_AVX2);
}

int lq2_attn_heads_ref(const struct lq2_attn_params * p, const float * q,
                       const struct lq2_tier_f16 * a, const struct lq2_tier_q2 * b,
                       float * out, int ith, int nth, void * work) {
    return attn_heads(p, q, a, b, out, ith, nth, work, 0);
}

int lq2_attn_partial(const struct lq2_attn_params * p, const float * q,
                     const struct lq2_tier_f16 * a, const struct lq2_tier_q2 * b,
                     int h0, int h1, float * acc, float * M, float * S, void * work) {
    if (!M || !S) {
        return -1;
    }
    return attn_core(p, q, a, b, acc, M, S, h0, h1, work, LQ2_AVX2);
}

int lq2_attn_partial_ref(const struct lq2_attn_params * p, const float * q,
                         const struct lq2_tier_f16 * a, const struct lq2_tier_q2 * b,
                         int h0, int h1, float * acc, float * M, float * S, void * work) {
    if (!M || !S) {
        return -1;
    }
    return attn_core(p, q, a, b, acc, M, S, h0, h1, work, 0);
}

void lq2_attn_merge(int D, int n_part, const float * parts, size_t part_stride, float * out) {
    float M = -INFINITY;
    for (int i = 0; i < n_part; ++i) {
        const float * pi = parts + (size_t) i * part_stride;
        if (pi[D + 1] > 0.0f && pi[D] > M) {
            M = pi[D];
        }
    }
    memset(out, 0, (size_t) D * sizeof(float));
    float S = 0.0f;
    for (int i = 0; i < n_part; ++i) {
        const float * pi = parts + (size_t) i * part_stride;
        if (!(pi[D + 1] > 0.0f)) {
            continue; // every token of this part masked, or no tokens
        }
        const float w = expf(pi[D] - M); // 1 exactly for a lone part: out is then its rows, scaled as unsplit
        S += pi[D + 1] * w;
        for (int d = 0; d < D; ++d) {
            out[d] += w * pi[d];
        }
    }
    scal(out, S > 0.0f ? 1.0f / S : 0.0f, D);
}
