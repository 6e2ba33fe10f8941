// lq2_attn_block_host.c: runs the GPU decode attention's program (lq2-attn-block.h) on the host,
// exactly as the CUDA kernel runs it: every block (part, kv head, token), step by step, and in
// each step every thread index, with the kernel's barrier between steps; then the combine for
// every (head, token, channel). The threads of a step run in a chosen order (first to last, last
// to first, odd then even): a thread that read what another wrote in the same step, or two threads
// writing one place, would make the orders disagree. The tests compare with the CPU
// (test_lq2_attn_block.py).
#include "../../native/common/lq2-attn-block.h"

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

// Returns -1 for a shape the kernel does not take (as lq2_cuda_attn refuses it), -2 when the
// threads of a block disagree on the number of steps, else 0 with the parts in a->parts and the
// result in a->dst.
int lq2_ab_emulate(const struct lq2_attn_args * a, int order) {
    const struct lq2_ab_shape * s = &a->g.shape;
    if (!lq2_ab_supported(s->D, s->gq, s->G, s->k_bits, s->k_widths, s->v_bits, s->v_per_channel, s->rope_mode,
                          s->rope_n_dims) ||
        (s->rope_n_dims > 0 && !a->rope) || (s->k_widths && !a->k_widths) || a->g.n_part < 1 || a->g.n_slots % s->G != 0) {
        return -1;
    }
    static struct lq2_ab_shared sm;               // the block's shared memory
    static float acc[LQ2_AB_THREADS][LQ2_AB_ACC]; // each thread's registers
    for (int64_t tok = 0; tok < a->g.n_tokens; ++tok) {
        for (int hk = 0; hk < a->g.n_head_kv; ++hk) {
            for (int part = 0; part < a->g.n_part; ++part) {
                memset(&sm, 0xff, sizeof(sm)); // NaN garbage: a read before a write shows
                memset(acc, 0xff, sizeof(acc));
                const struct lq2_ab_shape sh = lq2_ab_block_shape(a, hk, 0, 0);
                for (int step = 0;; ++step) { // ... barrier between steps ...
                    int more = -1;
                    for (int i = 0; i < LQ2_AB_THREADS; ++i) {
                        const int ith = thread_at(i, order);
                        const int r = lq2_ab_step(a, &sh, part, tok, step, ith, &sm, acc[ith]);
                        if (more >= 0 && r != more) {
                            return -2; // threads disagree on the steps: the kernel's barriers would hang
                        }
                        more = r;
                    }
                    if (!more) {
                        break;
                    }
                }
            }
        }
    }
    const int n_head = s->gq * a->g.n_head_kv;
    for (int64_t tok = 0; tok < a->g.n_tokens; ++tok) {
        for (int h = 0; h < n_head; ++h) {
            for (int i = 0; i < s->D; ++i) {
                lq2_ab_combine_at(a, h, tok, order == ORDER_REVERSE ? s->D - 1 - i : i);
            }
        }
    }
    return 0;
}

// For the tests' ctypes mirror of the struct.
size_t lq2_ab_args_size(void) {
    return sizeof(struct lq2_attn_args);
}

// Metal's RoPE angle without double (lq2-format.h), for the tests' error bound.
void lq2_test_rope_cos_sin_f32(int32_t pos, float f_hi, float f_lo, float * out) {
    const struct lq2_pair cs = lq2_rope_cos_sin_f32(pos, f_hi, f_lo);
    out[0] = cs.a;
    out[1] = cs.b;
}
