// lq2_attn_block_host.c: runs the GPU decode attention's per-thread functions (lq2-attn-block.h)
// on the host, every thread index of a block, phase by phase as the CUDA kernel calls them with a
// barrier between phases. The threads of a phase run in a chosen order (first to last, last to
// first, odd then even): a thread that read what another wrote in the same phase, or two threads
// writing one place, would make the orders disagree. The tests compare the rows with the CPU
// reference (lq2_attn_partial_ref) and the combine with lq2_attn_merge.
#include "../../native/common/lq2-attn-block.h"
#include "../../native/cpu/lq2-attn.h"

#include <stdint.h>
#include <string.h>

enum { ORDER_FORWARD = 0, ORDER_REVERSE = 1, ORDER_ODD_EVEN = 2 };

static int thread_at(int i, int order) {
    if (order == ORDER_REVERSE) {
        return LQ2_AB_THREADS - 1 - i;
    }
    if (order == ORDER_ODD_EVEN) {
        return i < LQ2_AB_THREADS / 2 ? 2 * i + 1 : 2 * (i - LQ2_AB_THREADS / 2);
    }
    return i;
}

// Every thread of the block runs the body once, in the given order: one phase between barriers.
#define FOR_THREADS(ith, order) \
    for (int i_ = 0, ith = 0; i_ < LQ2_AB_THREADS && ((ith = thread_at(i_, order)), 1); ++i_)

// One block: the query heads of kv head hk over tiers a and b (as lq2_attn_partial takes them; the
// 2-bit tier needs its cos/sin table when rope.n_dims > 0). out: gq rows of D + 2 floats.
// Returns -1 for a shape the kernels do not take.
int lq2_ab_emulate_block(const struct lq2_attn_params * p, const float * q, const struct lq2_tier_f16 * a,
                         const struct lq2_tier_q2 * b, int hk, int order, float * out) {
    const int D = p->head_dim, gq = p->n_head / p->n_head_kv;
    struct lq2_ab_shape sh;
    memset(&sh, 0, sizeof(sh));
    sh.D = D;
    sh.gq = gq;
    sh.n_head = p->n_head;
    sh.hk = hk;
    sh.scale = p->scale;
    sh.softcap = p->softcap;
    sh.max_bias = p->max_bias;
    sh.G = b ? b->G : 64;
    sh.k_bits = b ? b->k_bits : 2;
    sh.v_bits = b ? b->v_bits : 2;
    sh.rope_mode = b ? b->rope.mode : 0;
    sh.rope_n_dims = b ? b->rope.n_dims : 0;
    sh.rope_attn_factor = b ? b->rope.attn_factor : 1.0f;
    sh.score_correction = b ? b->score_correction : 0;
    if (!lq2_ab_supported(D, gq, sh.G, sh.k_bits, sh.v_bits, sh.rope_mode, sh.rope_n_dims) ||
        (b && b->n > 0 && sh.rope_n_dims > 0 && !b->rope_table)) {
        return -1;
    }

    static struct lq2_ab_shared sm;                 // the block's shared memory
    static float acc[LQ2_AB_THREADS][LQ2_AB_ACC];   // each thread's registers
    memset(&sm, 0xff, sizeof(sm));                  // NaN garbage: a read before a write shows

    FOR_THREADS(ith, order) {
        lq2_ab_begin(ith, &sh, q + (int64_t) hk * gq * D, D, &sm, acc[ith]);
    }

    // f16 tier, LQ2_AB_CHUNK tokens at a time
    for (int64_t t0 = 0; a && t0 < a->n; t0 += LQ2_AB_CHUNK) {
        const int n = (int) (a->n - t0 < LQ2_AB_CHUNK ? a->n - t0 : LQ2_AB_CHUNK);
        FOR_THREADS(ith, order) {
            if (ith < n) {
                const lq2_half * k = (const lq2_half *) ((const char *) a->k + (t0 + ith) * a->nb_k) + (int64_t) hk * D;
                lq2_ab_score_f16(ith, &sh, k, a->mask ? a->mask[t0 + ith] : 0.0f, &sm);
            }
        }
        FOR_THREADS(ith, order) {
            if (ith < gq) {
                lq2_ab_max(ith, n, &sm);
            }
        }
        FOR_THREADS(ith, order) {
            if (ith < n) {
                lq2_ab_weight(ith, &sh, &sm);
            }
        }
        const uint8_t * v = (const uint8_t *) a->v + t0 * a->nb_v + (int64_t) hk * D * 2;
        FOR_THREADS(ith, order) {
            lq2_ab_fold_f16(ith, &sh, v, (int64_t) a->nb_v, n, &sm, acc[ith]);
        }
    }

    // 2-bit tier, one key group at a time
    const int G = sh.G, kbs = LQ2_BLOCK_BYTES_B(G, sh.k_bits);
    const int64_t vhead = (int64_t) (D / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, sh.v_bits);
    const int64_t ng = b ? (b->n + G - 1) / G : 0;
    for (int64_t g = 0; g < ng; ++g) {
        const int n = (int) (b->n - g * G < G ? b->n - g * G : G);
        const uint8_t * kg = (const uint8_t *) b->k + g * b->nb_kg + (int64_t) hk * D * kbs;
        const lq2_half * cs = b->rope_table ? b->rope_table + g * (int64_t) sh.rope_n_dims * G : NULL;
        if (sh.score_correction) {
            FOR_THREADS(ith, order) {
                if (ith < gq) {
                    lq2_ab_correction(ith, &sh, kg, &sm);
                }
            }
        }
        FOR_THREADS(ith, order) {
            if (ith < n) {
                lq2_ab_score_q2(ith, &sh, kg, cs, b->mask ? b->mask[g * G + ith] : 0.0f, &sm);
            }
        }
        FOR_THREADS(ith, order) {
            if (ith < gq) {
                lq2_ab_max(ith, n, &sm);
            }
        }
        FOR_THREADS(ith, order) {
            if (ith < n) {
                lq2_ab_weight(ith, &sh, &sm);
            }
        }
        const uint8_t * v = (const uint8_t *) b->v + g * G * (int64_t) b->nb_v + hk * vhead;
        FOR_THREADS(ith, order) {
            lq2_ab_fold_q2(ith, &sh, v, (int64_t) b->nb_v, n, &sm, acc[ith]);
        }
    }

    FOR_THREADS(ith, order) {
        lq2_ab_store(ith, &sh, &sm, acc[ith], out);
    }
    return 0;
}

// The combine step for one head, channel by channel (the kernel's threads), in the given order.
void lq2_ab_emulate_combine(int D, int n_part, const float * parts, int64_t part_stride, int order, float * out) {
    for (int i = 0; i < D; ++i) {
        const int c = order == ORDER_REVERSE ? D - 1 - i : i;
        out[c] = lq2_ab_combine(c, D, n_part, parts, part_stride);
    }
}
