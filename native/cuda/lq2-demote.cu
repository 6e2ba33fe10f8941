// lq2-demote.cu: the CUDA demotion and dequantization of the LogQuant tiers (lq2-demote.cuh).
//
// Demotion, in two launches so that every staging row a group needs is written before the group
// is requantized (a group's rows are adjacent in the list, as on the CPU):
//   1. one block per list row: its value row quantized (a thread per value block) and its key row
//      un-rotated into the group's staging row (a thread per RoPE pair or plain channel);
//   2. one block per list row that ends its group's run: the group requantized from staging (a
//      thread per channel).
// The block quantizer and the un-rotation are lq2-format.h's, the code the CPU runs, with IEEE
// division and explicit fmas, so the stored bytes are the CPU's (angles are computed in double
// on both; CUDA's cos/sin may differ from the C library's in the last double bit, which can flip
// a float rounding about once in 2^28 values).
// Never run on a GPU yet: compile-checked only (tests/native/test_cuda_compile.py).
#include "lq2-demote.cuh"
#include "../common/lq2-op-params.h"

#define LQ2_DEMOTE_THREADS 128

static __global__ void lq2_demote_rows_kernel(const struct lq2_cuda_demote_args a) {
    const int32_t * d = a.rows + (int64_t) blockIdx.x * LQ2_DEMOTE_COLS;
    const int64_t slot = d[LQ2_DEMOTE_SLOT];
    if (slot < 0) {
        return; // padding
    }
    // values: a thread per block of 64
    const lq2_half * vsrc = (const lq2_half *) ((const char *) a.v + d[LQ2_DEMOTE_ROW] * a.v_nb1);
    const int vbs = LQ2_BLOCK_BYTES_B(LQ2_QK_V, a.v_bits);
    for (int64_t b = threadIdx.x; b < a.nv / LQ2_QK_V; b += blockDim.x) {
        float x[LQ2_QK_V];
        for (int j = 0; j < LQ2_QK_V; ++j) {
            x[j] = lq2_fp16_to_fp32(vsrc[b * LQ2_QK_V + j]);
        }
        lq2_quantize_block(x, 1, LQ2_QK_V, LQ2_QK_V, a.v_bits, a.fit, a.v2 + slot * a.v_row_bytes + b * vbs);
    }
    // keys: un-rotated into the slot's row of the group's staging
    const lq2_half * ksrc = (const lq2_half *) ((const char *) a.k + d[LQ2_DEMOTE_ROW] * a.k_nb1);
    float * staged = (float *) ((char *) a.staging + d[LQ2_DEMOTE_STAGE] * a.staging_nb1) + (slot % a.G) * a.nk;
    const int64_t D = a.nk / a.n_head_kv;
    const int half = a.rope_n_dims / 2;
    for (int64_t w = threadIdx.x; w < a.n_head_kv * D; w += blockDim.x) {
        const int64_t h = w / D, e = w % D; // e < half: pair e; e >= n_dims: a channel RoPE leaves alone
        if (e >= half && e < a.rope_n_dims) {
            continue;
        }
        if (e >= a.rope_n_dims) {
            staged[h * D + e] = lq2_fp16_to_fp32(ksrc[h * D + e]);
            continue;
        }
        const int i = (int) e;
        const int ca = a.rope_mode == 2 ? i : 2 * i, cb = a.rope_mode == 2 ? i + half : 2 * i + 1;
        const double th = (double) d[LQ2_DEMOTE_POS] * lq2_rope_freq(i, a.rope_n_dims, a.freq_base, a.freq_scale);
        const struct lq2_pair u = lq2_unrotate_pair(lq2_fp16_to_fp32(ksrc[h * D + ca]), lq2_fp16_to_fp32(ksrc[h * D + cb]),
                                                    (float) cos(th), (float) sin(th), a.attn_factor);
        staged[h * D + ca] = u.a;
        staged[h * D + cb] = u.b;
    }
}

static __global__ void lq2_demote_groups_kernel(const struct lq2_cuda_demote_args a) {
    const int64_t i = blockIdx.x;
    const int32_t * d = a.rows + i * LQ2_DEMOTE_COLS;
    const int64_t slot = d[LQ2_DEMOTE_SLOT];
    if (slot < 0) {
        return;
    }
    const int32_t * next = i + 1 < a.n_rows ? d + LQ2_DEMOTE_COLS : NULL;
    const bool last_of_group = slot % a.G == a.G - 1;
    const bool last_of_run   = !next || next[LQ2_DEMOTE_SLOT] < 0 || next[LQ2_DEMOTE_SLOT] / a.G != slot / a.G;
    if (!last_of_group && !last_of_run) {
        return;
    }
    const float * stage = (const float *) ((const char *) a.staging + d[LQ2_DEMOTE_STAGE] * a.staging_nb1);
    const int kbs = LQ2_BLOCK_BYTES_B(a.G, a.k_bits);
    uint8_t * kdst = a.k2 + (slot / a.G) * a.k_group_bytes;
    for (int64_t c = threadIdx.x; c < a.nk; c += blockDim.x) {
        lq2_quantize_block(stage + c, a.nk, (int) (slot % a.G) + 1, a.G, a.k_bits, a.fit, kdst + c * kbs);
    }
}

// Keys of one (group, kv head): thread t dequantizes and re-rotates token t (as the attention's
// score phase does) and writes its f16 row.
static __global__ void lq2_dequant_keys_kernel(const struct lq2_cuda_dequant_args a) {
    const int64_t g = blockIdx.x;
    const int hk = blockIdx.y, t = threadIdx.x, D = a.D, G = a.G, nd = a.rope_n_dims, half = nd / 2;
    const int kbs = LQ2_BLOCK_BYTES_B(G, a.k_bits);
    const uint8_t * kg = a.k2 + g * a.k_group_bytes + (int64_t) hk * D * kbs;
    const lq2_half * cs = a.rope ? (const lq2_half *) ((const char *) a.rope + g * a.rope_nb1) : NULL;
    lq2_half * row = a.dst + ((g * G + t) * a.n_head_kv + hk) * D;
    for (int i = 0; i < half; ++i) {
        const int ca = a.rope_mode == 2 ? i : 2 * i, cb = a.rope_mode == 2 ? i + half : 2 * i + 1;
        const uint8_t * ba = kg + ca * kbs, * bb = kg + cb * kbs;
        const int qa = (ba[4 + LQ2_CODE_BYTE_B(t, G, a.k_bits)] >> LQ2_CODE_SHIFT_B(t, G, a.k_bits)) & LQ2_LEVELS_B(a.k_bits);
        const int qb = (bb[4 + LQ2_CODE_BYTE_B(t, G, a.k_bits)] >> LQ2_CODE_SHIFT_B(t, G, a.k_bits)) & LQ2_LEVELS_B(a.k_bits);
        const float x0 = lq2_fp16_to_fp32(((const lq2_half *) ba)[0]) * (float) qa + lq2_fp16_to_fp32(((const lq2_half *) ba)[1]);
        const float x1 = lq2_fp16_to_fp32(((const lq2_half *) bb)[0]) * (float) qb + lq2_fp16_to_fp32(((const lq2_half *) bb)[1]);
        const float ct = lq2_fp16_to_fp32(cs[2 * i * G + t]), st = lq2_fp16_to_fp32(cs[2 * i * G + G + t]);
        row[ca] = lq2_fp32_to_fp16(LQ2_FMA(x0, ct, -(x1 * st)));
        row[cb] = lq2_fp32_to_fp16(LQ2_FMA(x0, st, x1 * ct));
    }
    for (int c = nd; c < D; ++c) {
        const uint8_t * b = kg + c * kbs;
        const int q = (b[4 + LQ2_CODE_BYTE_B(t, G, a.k_bits)] >> LQ2_CODE_SHIFT_B(t, G, a.k_bits)) & LQ2_LEVELS_B(a.k_bits);
        row[c] = lq2_fp32_to_fp16(lq2_fp16_to_fp32(((const lq2_half *) b)[0]) * (float) q + lq2_fp16_to_fp32(((const lq2_half *) b)[1]));
    }
}

// Values: a thread per (slot, channel of all kv heads).
static __global__ void lq2_dequant_values_kernel(const struct lq2_cuda_dequant_args a) {
    const int64_t nv = (int64_t) a.D * a.n_head_kv;
    const int64_t e = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= a.n_slots * nv) {
        return;
    }
    const int64_t s = e / nv, c = e % nv;
    const uint8_t * b = a.v2 + s * a.v_row_bytes + (c / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, a.v_bits);
    const int j = (int) (c % LQ2_QK_V);
    const int q = (b[4 + LQ2_CODE_BYTE_B(j, LQ2_QK_V, a.v_bits)] >> LQ2_CODE_SHIFT_B(j, LQ2_QK_V, a.v_bits)) & LQ2_LEVELS_B(a.v_bits);
    lq2_half * vout = (lq2_half *) ((char *) a.dst + a.dst_nb3);
    vout[s * nv + c] = lq2_fp32_to_fp16(lq2_fp16_to_fp32(((const lq2_half *) b)[0]) * (float) q +
                                        lq2_fp16_to_fp32(((const lq2_half *) b)[1]));
}

extern "C" int lq2_cuda_demote(const struct lq2_cuda_demote_args * a, cudaStream_t stream) {
    if (lq2_key_type_b(a->G, a->k_bits) < 0 || lq2_value_type(a->v_bits) < 0 || a->nv % LQ2_QK_V != 0 ||
        a->n_head_kv <= 0 || a->nk % a->n_head_kv != 0 || a->rope_n_dims % 2 != 0 ||
        a->rope_n_dims > a->nk / a->n_head_kv) {
        return -1;
    }
    if (a->n_rows > 0) {
        lq2_demote_rows_kernel<<<(unsigned) a->n_rows, LQ2_DEMOTE_THREADS, 0, stream>>>(*a);
        lq2_demote_groups_kernel<<<(unsigned) a->n_rows, LQ2_DEMOTE_THREADS, 0, stream>>>(*a);
    }
    return 0;
}

extern "C" int lq2_cuda_dequant(const struct lq2_cuda_dequant_args * a, cudaStream_t stream) {
    if (lq2_key_type_b(a->G, a->k_bits) < 0 || lq2_value_type(a->v_bits) < 0 || a->D % LQ2_QK_V != 0 ||
        a->n_slots % a->G != 0 || (a->rope_n_dims > 0 && !a->rope)) {
        return -1;
    }
    const int64_t n_groups = a->n_slots / a->G, row_bytes = (int64_t) a->D * a->n_head_kv * (int64_t) sizeof(lq2_half);
    if (n_groups > 0) {
        lq2_dequant_keys_kernel<<<dim3((unsigned) n_groups, (unsigned) a->n_head_kv), a->G, 0, stream>>>(*a);
        const int64_t n = a->n_slots * a->D * a->n_head_kv;
        lq2_dequant_values_kernel<<<(unsigned) ((n + 255) / 256), 256, 0, stream>>>(*a);
    }
    if (a->n_kv > 0) { // the f16 tier's cells follow the slots
        char * kout = (char *) a->dst + a->n_slots * row_bytes;
        if (cudaMemcpy2DAsync(kout, row_bytes, a->k, a->k_nb2, row_bytes, a->n_kv, cudaMemcpyDeviceToDevice, stream) != cudaSuccess ||
            cudaMemcpy2DAsync(kout + a->dst_nb3, row_bytes, a->v, a->v_nb2, row_bytes, a->n_kv, cudaMemcpyDeviceToDevice, stream) != cudaSuccess) {
            return -1;
        }
    }
    return 0;
}
