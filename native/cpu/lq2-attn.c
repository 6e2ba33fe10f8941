// lq2-attn.c: one-pass two-tier attention (see lq2-attn.h).
//
// Loop order: kv head outermost, then chunks of tokens (64 f16 tokens, or one 2-bit key group),
// then the query heads that share the kv head. A chunk's keys and values are converted to f32 once
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
                        + (size_t) nt        // scores
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
static void rope_cm(const struct lq2_rope_params * rp, float * k, const float * cs, int G, int simd) {
    const int half = rp->n_dims / 2;
    for (int i = 0; i < half; ++i) {
        const int a = rp->mode == LQ2_ROPE_NEOX ? i : 2 * i;
        const int b = rp->mode == LQ2_ROPE_NEOX ? i + half : 2 * i + 1;
        float * ka = k + (int64_t) a * G;
        float * kb = k + (int64_t) b * G;
        const float * c = cs + (int64_t) 2 * i * G;
        const float * s = c + G;
#if LQ2_AVX2
        if (simd) {
            for (int t = 0; t < G; t += 8) {
                const __m256 x0 = _mm256_loadu_ps(ka + t), x1 = _mm256_loadu_ps(kb + t);
                const __m256 vc = _mm256_loadu_ps(c + t),  vs = _mm256_loadu_ps(s + t);
                _mm256_storeu_ps(ka + t, _mm256_fmsub_ps(x0, vc, _mm256_mul_ps(x1, vs)));
                _mm256_storeu_ps(kb + t, _mm256_fmadd_ps(x0, vs, _mm256_mul_ps(x1, vc)));
            }
            continue;
        }
#endif
        (void) simd;
        for (int t = 0; t < G; ++t) {
            const float x0 = ka[t], x1 = kb[t];
            ka[t] = x0 * c[t] - x1 * s[t];
            kb[t] = x0 * s[t] + x1 * c[t];
        }
    }
}

// s[t] = sum_c q[c] * k[c][t] for channel-major keys k[D][G] (G is a multiple of 32).
static void scores_cm(const float * q, const float * k, int D, int G, float * s, int simd) {
#if LQ2_AVX2
    if (simd) {
        for (int t = 0; t < G; t += 32) {
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

// Online softmax: fold n scored tokens with values v[t * D] into (M, S, acc).
static void online_update(float * acc, float * M, float * S, const float * s, float mx, int n,
                          const float * v, int D, int simd) {
    if (mx == -INFINITY) {
        return;
    }
    if (mx > *M) {
        if (*M != -INFINITY) {
            const float ms = expf(*M - mx);
            *S *= ms;
            scal(acc, ms, D);
        }
        *M = mx;
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

// ---- the kernel

static int attn_core(const struct lq2_attn_params * p, const float * q,
                     const struct lq2_tier_f16 * a, const struct lq2_tier_q2 * b,
                     float * out, int ith, int nth, void * work, int simd) {
    const int D = p->head_dim;
    if (D <= 0 || D % LQ2_QK_V != 0 || D > LQ2_ATTN_MAX_D || p->n_head_kv <= 0 ||
        p->n_head % p->n_head_kv != 0 || nth <= 0 || ith < 0 || ith >= nth) {
        return -1;
    }
    const int has_a = a && a->n > 0;
    const int has_b = b && b->n > 0;
    const int G      = has_b ? b->G : LQ2_ATTN_CHUNK;
    const int n_dims = has_b ? b->rope.n_dims : 0;
    if (has_b && (lq2_key_type(G) < 0 || n_dims < 0 || n_dims > D || n_dims % 2 != 0 ||
                  (b->rope.mode != LQ2_ROPE_NORMAL && b->rope.mode != LQ2_ROPE_NEOX) ||
                  (!b->rope_table && !b->pos))) {
        return -1;
    }
    const int gq = p->n_head / p->n_head_kv;
    const int h0 = (int) ((int64_t) p->n_head * ith / nth);
    const int h1 = (int) ((int64_t) p->n_head * (ith + 1) / nth);

    const int nt = imax(G, LQ2_ATTN_CHUNK);
    float * kbuf = (float *) work;
    float * vbuf = kbuf + (size_t) nt * D;
    float * sbuf = vbuf + (size_t) nt * D;
    float * csbuf = sbuf + nt;
    float * Mv = csbuf + (size_t) n_dims * G;
    float * Sv = Mv + p->n_head;

    const int kbs = LQ2_BLOCK_BYTES(G);
    for (int hk = h0 / gq; hk * gq < h1; ++hk) {
        const int j0 = imax(h0, hk * gq);
        const int j1 = h1 < (hk + 1) * gq ? h1 : (hk + 1) * gq;
        for (int j = j0; j < j1; ++j) {
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
                const float mx = finish_scores(&h, sbuf, n, mask);
                online_update(out + (int64_t) j * D, &Mv[j], &Sv[j], sbuf, mx, n, vbuf, D, simd);
            }
        }

        // tier B: 2-bit, keys re-rotated at their positions
        const int64_t ng = has_b ? (b->n + G - 1) / G : 0;
        for (int64_t g = 0; g < ng; ++g) {
            const int n = (int) (b->n - g * G < G ? b->n - g * G : G);
            const float * mask = b->mask ? b->mask + g * G : NULL;
            if (all_masked(mask, n)) {
                continue;
            }
            const char * kg = (const char *) b->k + g * b->nb_kg + (size_t) hk * D * kbs;
            if (simd) {
                lq2_dequantize_k_group_cm(kg, D, G, kbuf);
            } else {
                lq2_dequantize_k_group_cm_ref(kg, D, G, kbuf);
            }
            const float * cs = b->rope_table ? b->rope_table + g * (int64_t) n_dims * G : csbuf;
            if (!b->rope_table) {
                lq2_rope_table(&b->rope, b->pos + g * G, n, G, csbuf);
            }
            rope_cm(&b->rope, kbuf, cs, G, simd);
            for (int t = 0; t < n; ++t) {
                const char * vr = (const char *) b->v + (g * G + t) * b->nb_v +
                                  (size_t) hk * (D / LQ2_QK_V) * sizeof(block_lq2_v64);
                if (simd) {
                    lq2_dequantize_v_row(vr, vbuf + (int64_t) t * D, D);
                } else {
                    lq2_dequantize_v_row_ref(vr, vbuf + (int64_t) t * D, D);
                }
            }
            for (int j = j0; j < j1; ++j) {
                const struct head_ctx h = make_head_ctx(p, j);
                scores_cm(q + (int64_t) j * D, kbuf, D, G, sbuf, simd);
                const float mx = finish_scores(&h, sbuf, n, mask);
                online_update(out + (int64_t) j * D, &Mv[j], &Sv[j], sbuf, mx, n, vbuf, D, simd);
            }
        }

        for (int j = j0; j < j1; ++j) {
            scal(out + (int64_t) j * D, Sv[j] > 0.0f ? 1.0f / Sv[j] : 0.0f, D);
        }
    }
    return 0;
}

int lq2_attn_heads(const struct lq2_attn_params * p, const float * q,
                   const struct lq2_tier_f16 * a, const struct lq2_tier_q2 * b,
                   float * out, int ith, int nth, void * work) {
    return attn_core(p, q, a, b, out, ith, nth, work, LQ2_AVX2);
}

int lq2_attn_heads_ref(const struct lq2_attn_params * p, const float * q,
                       const struct lq2_tier_f16 * a, const struct lq2_tier_q2 * b,
                       float * out, int ith, int nth, void * work) {
    return attn_core(p, q, a, b, out, ith, nth, work, 0);
}
