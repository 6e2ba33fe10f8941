// attn_bench.c: lq2_attn_heads (one query token, Qwen2.5-0.5B shapes: 14 q heads, 2 kv heads,
// D 64, G 64 or BENCH_G) over tier A = 96 f16 tokens + tier B = nB 2-bit tokens, against a plain f16
// attention loop (f16 K/V, f32 accumulation, AVX2, per query head like ggml's CPU flash
// attention) over the same nA + nB tokens, in the same run. L layers of distinct buffers are
// cycled so that, as in a real decode, the caches of a layer are cold when it is read; the rope
// table is one for all layers (as logquant-cache.cpp keeps it). The 2-bit values both ways, in the
// same run: grouped per token (KIVI's layout) and per channel (as the keys; the default). Prints
// per-layer medians.
//
// README: build and run (1 thread, a few seconds):
//   cc -O3 -mavx2 -mfma -mf16c -c native/cpu/lq2-quants.c -o /tmp/q.o   (same for lq2-rope.c, lq2-attn.c;
//   -O3 as the package builds them: at -O2 the per-channel values fold measured up to 1.4x slower)
//   cc -O3 -mavx2 -mfma -mf16c bench/kernels/attn_bench.c /tmp/q.o /tmp/r.o /tmp/a.o -lm -o /tmp/attn_bench
//   /tmp/attn_bench [reps=15] [layers=24] [nB ...=1024 4096 16384]
//   (add -DBENCH_G=128 to the last cc line for groups of 128 tokens, the default format's)
#define _POSIX_C_SOURCE 199309L
#include "../../native/cpu/lq2-attn.h"
#include "../../native/cpu/lq2-quants.h"

#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef BENCH_G
#define BENCH_G 64 // tokens per 2-bit group; -DBENCH_G=128 for the default format's groups
#endif
enum { D = 64, H = 14, HKV = 2, G = BENCH_G, NA = 96 };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static uint64_t rs = 88172645463325252ull;
static float frand(void) { // uniform [-1, 1)
    rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17;
    return (float) ((rs >> 40) * (1.0 / 8388608.0)) - 1.0f;
}

static int cmpd(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return x < y ? -1 : x > y;
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// The f16 stand-in: per query head, per token: dot(q, k) (f16 -> f32, FMA), online softmax with
// one expf per token (as ggml), v accumulated in f32 (D = 64: 8 registers).
static void f16_attn(const float * q, const lq2_half * k, const lq2_half * v, int64_t n, float scale,
                     float * out) {
    const size_t row = (size_t) HKV * D;
    for (int h = 0; h < H; ++h) {
        const int hk = h / (H / HKV);
        const float * qh = q + h * D;
        __m256 qv[8], acc[8];
        for (int i = 0; i < 8; ++i) {
            qv[i]  = _mm256_loadu_ps(qh + 8 * i);
            acc[i] = _mm256_setzero_ps();
        }
        float M = -INFINITY, S = 0.0f;
        for (int64_t t = 0; t < n; ++t) {
            const lq2_half * kr = k + t * row + hk * D;
            const lq2_half * vr = v + t * row + hk * D;
            __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
            for (int i = 0; i < 8; i += 2) {
                s0 = _mm256_fmadd_ps(qv[i],     _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (kr + 8 * i))), s0);
                s1 = _mm256_fmadd_ps(qv[i + 1], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (kr + 8 * i + 8))), s1);
            }
            const float s = hsum8(_mm256_add_ps(s0, s1)) * scale;
            float ms = 1.0f, vs = 1.0f;
            if (s > M) {
                ms = expf(M - s);
                M  = s;
            } else {
                vs = expf(s - M);
            }
            S = S * ms + vs;
            const __m256 vms = _mm256_set1_ps(ms), vvs = _mm256_set1_ps(vs);
            for (int i = 0; i < 8; ++i) {
                acc[i] = _mm256_fmadd_ps(vvs, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (vr + 8 * i))),
                                         _mm256_mul_ps(acc[i], vms));
            }
        }
        const __m256 inv = _mm256_set1_ps(1.0f / S);
        for (int i = 0; i < 8; ++i) {
            _mm256_storeu_ps(out + h * D + 8 * i, _mm256_mul_ps(acc[i], inv));
        }
    }
}

int main(int argc, char ** argv) {
    const int reps   = argc > 1 ? atoi(argv[1]) : 15;
    const int layers = argc > 2 ? atoi(argv[2]) : 24;
    int64_t nbs[8] = { 1024, 4096, 16384 };
    int n_nb = 3;
    if (argc > 3) {
        n_nb = 0;
        for (int i = 3; i < argc && n_nb < 8; ++i) nbs[n_nb++] = atoll(argv[i]);
    }
    const struct lq2_attn_params p = { D, H, HKV, 1.0f / sqrtf((float) D), 0.0f, 0.0f };
    const struct lq2_rope_params rope = { LQ2_ROPE_NEOX, D, 1000000.0f, 1.0f, 1.0f }; // Qwen2.5
    const int kbs = LQ2_BLOCK_BYTES(G), vbs = (int) sizeof(block_lq2_v64);
    void * work = malloc(lq2_attn_work_size(&p, G, D));
    float q[H * D], out[H * D], out16[H * D];
    for (int i = 0; i < H * D; ++i) q[i] = 2.0f * frand();

    printf("lq2_attn_heads vs f16 loop, 1 query token, H %d Hkv %d D %d G %d, tier A %d f16, %d layers, median of %d (us per layer)\n",
           H, HKV, D, G, NA, layers, reps);
    printf("| tier B (2-bit) | total tokens | lq2 us, values per token | lq2 us, per channel | f16 us | f16/lq2 per token | "
           "f16/lq2 per channel | max|lq2-f16| |\n|---|---|---|---|---|---|---|---|\n");
    for (int ib = 0; ib < n_nb; ++ib) {
        const int64_t nB = nbs[ib], nT = NA + nB, ng = (nB + G - 1) / G;
        // one layer's data, generated once and copied into every layer's buffers
        const size_t szA = (size_t) NA * HKV * D, szKB = (size_t) ng * HKV * D * kbs, szVB = (size_t) nB * HKV * vbs;
        const size_t sz16 = (size_t) nT * HKV * D;
        lq2_half * ka = malloc(szA * 2 * layers), * va = malloc(szA * 2 * layers);
        uint8_t * kb = malloc(szKB * layers), * vb = malloc(szVB * layers), * vc = malloc(szKB * layers);
        lq2_half * k16 = malloc(sz16 * 2 * layers), * v16 = malloc(sz16 * 2 * layers);
        int32_t * pos = malloc(nB * sizeof(int32_t));
        lq2_half * tab = malloc(lq2_rope_table_size(&rope, nB, G) * sizeof(lq2_half));
        float * kpre = malloc((size_t) G * HKV * D * 4), * vrow = malloc((size_t) nB * HKV * D * 4 + 4);
        float offs[HKV * D];
        for (int c = 0; c < HKV * D; ++c) offs[c] = 3.0f * frand();
        for (int64_t t = 0; t < nB; ++t) pos[t] = (int32_t) t;
        lq2_rope_table(&rope, pos, nB, G, tab);
        for (int64_t g = 0; g < ng; ++g) {
            const int n = (int) (nB - g * G < G ? nB - g * G : G);
            for (int t = 0; t < n; ++t)
                for (int c = 0; c < HKV * D; ++c) kpre[t * HKV * D + c] = offs[c] + frand();
            lq2_quantize_k_group(kpre, HKV * D, n, HKV * D, G, 2, 0, NULL, kb + g * HKV * D * kbs);
            // the f16 loop gets the same keys, roped, at tokens NA + g * G + t
            for (int t = 0; t < n; ++t) {
                lq2_rope_rows(&rope, kpre + t * HKV * D, D, HKV, pos[g * G + t], 0);
                for (int c = 0; c < HKV * D; ++c) k16[(NA + g * G + t) * HKV * D + c] = lq2_fp32_to_fp16(kpre[t * HKV * D + c]);
            }
        }
        for (int64_t t = 0; t < nB; ++t) {
            float * vr = vrow + t * HKV * D;
            for (int c = 0; c < HKV * D; ++c) vr[c] = frand();
            lq2_quantize_v_row(vr, vb + t * HKV * vbs, HKV * D, 2, 0);
            for (int c = 0; c < HKV * D; ++c) v16[(NA + t) * HKV * D + c] = lq2_fp32_to_fp16(vr[c]);
        }
        for (int64_t g = 0; g < ng; ++g) { // per channel: laid out as the keys, G = 64 (same bytes)
            const int n = (int) (nB - g * G < G ? nB - g * G : G);
            lq2_quantize_k_group(vrow + g * G * HKV * D, HKV * D, n, HKV * D, G, 2, 0, NULL, vc + g * HKV * D * kbs);
        }
        for (size_t i = 0; i < szA; ++i) {
            ka[i] = k16[i] = lq2_fp32_to_fp16(frand() * 3.0f);
            va[i] = v16[i] = lq2_fp32_to_fp16(frand());
        }
        for (int l = 1; l < layers; ++l) {
            memcpy(ka + l * szA, ka, szA * 2);
            memcpy(va + l * szA, va, szA * 2);
            memcpy(kb + l * szKB, kb, szKB);
            memcpy(vb + l * szVB, vb, szVB);
            memcpy(vc + l * szKB, vc, szKB);
            memcpy(k16 + l * sz16, k16, sz16 * 2);
            memcpy(v16 + l * sz16, v16, sz16 * 2);
        }
        double tl[64], tc[64], tf[64];
        float err = 0.0f;
        for (int r = 0; r < reps && r < 64; ++r) {
            double t0 = now();
            for (int l = 0; l < layers; ++l) {
                const struct lq2_tier_f16 a = { NA, ka + l * szA, HKV * D * 2, va + l * szA, HKV * D * 2, NULL };
                const struct lq2_tier_q2 b = { .n = nB, .G = G, .k_bits = 2, .v_bits = 2,
                                               .k = kb + l * szKB, .nb_kg = (size_t) HKV * D * kbs,
                                               .v = vb + l * szVB, .nb_v = (size_t) HKV * vbs, .pos = pos,
                                               .rope = rope, .rope_table = tab, .mask = NULL };
                lq2_attn_heads(&p, q, &a, &b, out, 0, 1, work);
            }
            double t1 = now();
            for (int l = 0; l < layers; ++l) {
                const struct lq2_tier_f16 a = { NA, ka + l * szA, HKV * D * 2, va + l * szA, HKV * D * 2, NULL };
                const struct lq2_tier_q2 b = { .n = nB, .G = G, .k_bits = 2, .v_bits = 2,
                                               .k = kb + l * szKB, .nb_kg = (size_t) HKV * D * kbs,
                                               .v = vc + l * szKB, .nb_v = (size_t) HKV * D * kbs, .pos = pos,
                                               .rope = rope, .rope_table = tab, .mask = NULL, .v_per_channel = 1 };
                lq2_attn_heads(&p, q, &a, &b, out, 0, 1, work);
            }
            double t2 = now();
            for (int l = 0; l < layers; ++l) {
                f16_attn(q, k16 + l * sz16, v16 + l * sz16, nT, p.scale, out16);
            }
            double t3 = now();
            tl[r] = (t1 - t0) / layers * 1e6;
            tc[r] = (t2 - t1) / layers * 1e6;
            tf[r] = (t3 - t2) / layers * 1e6;
        }
        for (int i = 0; i < H * D; ++i) err = fmaxf(err, fabsf(out[i] - out16[i]));
        const int n = reps < 64 ? reps : 64;
        double ratio[64], ratio_c[64];
        for (int r = 0; r < n; ++r) ratio[r] = tf[r] / tl[r], ratio_c[r] = tf[r] / tc[r];
        qsort(tl, n, sizeof(double), cmpd);
        qsort(tc, n, sizeof(double), cmpd);
        qsort(tf, n, sizeof(double), cmpd);
        qsort(ratio, n, sizeof(double), cmpd);
        qsort(ratio_c, n, sizeof(double), cmpd);
        printf("| %lld | %lld | %.1f | %.1f | %.1f | %.2f | %.2f | %.1e |\n", (long long) nB, (long long) nT, tl[n / 2],
               tc[n / 2], tf[n / 2], ratio[n / 2], ratio_c[n / 2], err);
        fflush(stdout);
        free(ka); free(va); free(kb); free(vb); free(vc); free(k16); free(v16); free(pos); free(tab); free(kpre); free(vrow);
    }
    free(work);
    return 0;
}
