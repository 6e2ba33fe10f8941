// lq2-demote.cu: the CUDA demotion and dequantization of the LogQuant tiers (lq2-demote.cuh):
// one call of lq2-demote-block.h per thread, which the host check runs for every thread index on
// the CPU op's tensors (tests/native/lq2_ops_check.cpp: the demotion's bytes equal the CPU's).
// Demotion is three launches (rows, groups, staging), each needing what the one before wrote
// (lq2-demote-block.h says why the keys go through a scratch buffer). Division is IEEE (LQ2_DIV) under -use_fast_math and every multiply-add an
// explicit fma, so the bytes are the CPU's; RoPE angles are computed in double on both sides, but
// CUDA's cos/sin may differ from the C library's in the last double bit, which can flip a float
// rounding about once in 2^28 values.
// Never run on a GPU yet: compile-checked only (tests/native/test_cuda_compile.py).
#include "lq2-demote.cuh"

#define LQ2_DEMOTE_THREADS 128

static __global__ void lq2_demote_rows_kernel(const struct lq2_demote_args a) {
    lq2_demote_row(&a, blockIdx.x, threadIdx.x, blockDim.x);
}

static __global__ void lq2_demote_groups_kernel(const struct lq2_demote_args a) {
    lq2_demote_group(&a, blockIdx.x, threadIdx.x, blockDim.x);
}

static __global__ void lq2_demote_stage_kernel(const struct lq2_demote_args a) {
    lq2_demote_stage(&a, blockIdx.x, threadIdx.x, blockDim.x);
}

static __global__ void lq2_dequant_keys_kernel(const struct lq2_dequant_args a) {
    lq2_dequant_key(&a, blockIdx.x, blockIdx.y, threadIdx.x);
}

static __global__ void lq2_dequant_values_kernel(const struct lq2_dequant_args a, int64_t n) {
    const int64_t e = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) {
        lq2_dequant_value(&a, e);
    }
}

static __global__ void lq2_dequant_copy_kernel(const struct lq2_dequant_args a) {
    const int64_t nv = (int64_t) a.g.D * a.g.n_head_kv;
    for (int64_t w = threadIdx.x; w < nv; w += blockDim.x) {
        lq2_dequant_copy(&a, blockIdx.y, blockIdx.x, w);
    }
}

extern "C" int lq2_cuda_demote(const struct lq2_demote_args * a, cudaStream_t stream) {
    if (!lq2_demote_supported(a) || (a->g.n_rows > 0 && !a->scratch) || (a->g.k_widths && !a->k_widths) ||
        (a->g.s8 && !a->refs)) {
        return -1;
    }
    if (a->g.n_rows > 0) {
        lq2_demote_rows_kernel<<<(unsigned) a->g.n_rows, LQ2_DEMOTE_THREADS, 0, stream>>>(*a);
        lq2_demote_groups_kernel<<<(unsigned) a->g.n_rows, LQ2_DEMOTE_THREADS, 0, stream>>>(*a);
        lq2_demote_stage_kernel<<<(unsigned) a->g.n_rows, LQ2_DEMOTE_THREADS, 0, stream>>>(*a);
    }
    return 0;
}

extern "C" int lq2_cuda_dequant(const struct lq2_dequant_args * a, cudaStream_t stream) {
    if (!lq2_dequant_shape_ok(a->g.D, a->g.G, a->g.k_bits, a->g.k_widths, a->g.v_bits, a->g.v_per_channel,
                              a->g.rope_mode, a->g.rope_n_dims, a->g.n_slots) ||
        (a->g.rope_n_dims > 0 && !a->rope_table) || (a->g.k_widths && !a->k_widths) || (a->g.s8 && !a->refs)) {
        return -1;
    }
    const int64_t n_groups = a->g.n_slots / a->g.G;
    if (n_groups > 0) {
        lq2_dequant_keys_kernel<<<dim3((unsigned) n_groups, (unsigned) a->g.n_head_kv), a->g.G, 0, stream>>>(*a);
        const int64_t n = a->g.n_slots * a->g.D * a->g.n_head_kv;
        lq2_dequant_values_kernel<<<(unsigned) ((n + 255) / 256), 256, 0, stream>>>(*a, n);
    }
    if (a->g.n_kv > 0) { // the f16 tier's cells follow the slots
        lq2_dequant_copy_kernel<<<dim3((unsigned) a->g.n_kv, 2), 256, 0, stream>>>(*a);
    }
    return 0;
}
