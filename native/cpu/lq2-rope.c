// lq2-rope.c: see lq2-rope.h for the rule and the cost choice.
#include "lq2-rope.h"

#include <math.h>

// Angle per unit of position for pair i (the position multiplies it).
static double rope_freq(const struct lq2_rope_params * p, int i) {
    return lq2_rope_freq(i, p->n_dims, p->freq_base, p->freq_scale);
}

// Channels of pair i.
static inline void rope_pair(const struct lq2_rope_params * p, int i, int * a, int * b) {
    if (p->mode == LQ2_ROPE_NEOX) {
        *a = i;
        *b = i + p->n_dims / 2;
    } else {
        *a = 2 * i;
        *b = 2 * i + 1;
    }
}

void lq2_rope_rows(const struct lq2_rope_params * p, float * x, int head_dim, int n_head,
                   int32_t pos, int inverse) {
    const int   half = p->n_dims / 2;
    const float ms   = p->attn_factor;
    for (int i = 0; i < half; ++i) {
        const double th = (double) pos * rope_freq(p, i);
        const float  c = (float) cos(th), s = (float) sin(th);
        int a, b;
        rope_pair(p, i, &a, &b);
        for (int h = 0; h < n_head; ++h) {
            float * r = x + (int64_t) h * head_dim;
            const float x0 = r[a], x1 = r[b];
            if (inverse) { // R^T x / mscale, as the CUDA demotion computes it
                const struct lq2_pair u = lq2_unrotate_pair(x0, x1, c, s, ms);
                r[a] = u.a;
                r[b] = u.b;
            } else {
                r[a] = (x0 * c - x1 * s) * ms;
                r[b] = (x0 * s + x1 * c) * ms;
            }
        }
    }
}

size_t lq2_rope_table_size(const struct lq2_rope_params * p, int64_t n, int G) {
    return (size_t) ((n + G - 1) / G) * (size_t) p->n_dims * (size_t) G;
}

void lq2_rope_table(const struct lq2_rope_params * p, const int32_t * pos, int64_t n, int G,
                    lq2_half * table) {
    const int half = p->n_dims / 2;
    const int64_t ng = (n + G - 1) / G;
    for (int64_t g = 0; g < ng; ++g) {
        lq2_half * tg = table + g * p->n_dims * G;
        for (int i = 0; i < half; ++i) {
            lq2_half * cs = tg + (int64_t) 2 * i * G;
            const double f = rope_freq(p, i); // pow once per pair and group, not per token
            for (int t = 0; t < G; ++t) {
                const int64_t k = g * G + t;
                if (k < n) {
                    const double th = (double) pos[k] * f;
                    cs[t]     = lq2_fp32_to_fp16((float) cos(th) * p->attn_factor);
                    cs[G + t] = lq2_fp32_to_fp16((float) sin(th) * p->attn_factor);
                } else {
                    cs[t]     = lq2_fp32_to_fp16(1.0f);
                    cs[G + t] = lq2_fp32_to_fp16(0.0f);
                }
            }
        }
    }
}
