// lq2-attn.cu: the CUDA decode attention over LogQuant's two tiers (lq2-attn.cuh). One block of
// LQ2_AB_THREADS threads per (part, kv head, query token) runs lq2_ab_step with a barrier after
// each step; a second kernel combines the parts. All the per-thread work and its order are in
// lq2-attn-block.h, which the host tests run for every thread index, step by step
// (tests/native/test_lq2_attn_block.py, and on the op's tensors lq2_ops_check.cpp).
// Never run on a GPU yet: compile-checked only (tests/native/test_cuda_compile.py).
#include "lq2-attn.cuh"

// D_T, GQ_T > 0: the head size and query heads per kv head as constants, so that the shared
// functions' loops unroll and a thread's running output stays in registers; 0: from the arguments.
template <int D_T, int GQ_T>
static __global__ void __launch_bounds__(LQ2_AB_THREADS) lq2_attn_block_kernel(const struct lq2_attn_args a) {
    __shared__ struct lq2_ab_shared sm;
    float acc[LQ2_AB_ACC];
    const struct lq2_ab_shape sh = lq2_ab_block_shape(&a, blockIdx.y, D_T, GQ_T);
    for (int s = 0; lq2_ab_step(&a, &sh, blockIdx.x, blockIdx.z, s, threadIdx.x, &sm, acc); ++s) {
        __syncthreads();
    }
}

static __global__ void lq2_attn_combine_kernel(const struct lq2_attn_args a) {
    for (int c = threadIdx.x; c < a.g.shape.D; c += blockDim.x) {
        lq2_ab_combine_at(&a, blockIdx.x, blockIdx.y, c);
    }
}

// The specialised kernels for the common shapes (head sizes 64, 128, 256; 1, 2, 4, 6, 7, 8 query
// heads per kv head), the generic one otherwise.
template <int D_T> static bool lq2_attn_launch_d(const struct lq2_attn_args & a, dim3 blocks, cudaStream_t stream) {
    switch (a.g.shape.gq) {
        case 1: lq2_attn_block_kernel<D_T, 1><<<blocks, LQ2_AB_THREADS, 0, stream>>>(a); return true;
        case 2: lq2_attn_block_kernel<D_T, 2><<<blocks, LQ2_AB_THREADS, 0, stream>>>(a); return true;
        case 4: lq2_attn_block_kernel<D_T, 4><<<blocks, LQ2_AB_THREADS, 0, stream>>>(a); return true;
        case 6: lq2_attn_block_kernel<D_T, 6><<<blocks, LQ2_AB_THREADS, 0, stream>>>(a); return true;
        case 7: lq2_attn_block_kernel<D_T, 7><<<blocks, LQ2_AB_THREADS, 0, stream>>>(a); return true;
        case 8: lq2_attn_block_kernel<D_T, 8><<<blocks, LQ2_AB_THREADS, 0, stream>>>(a); return true;
        default: return false;
    }
}

extern "C" int32_t lq2_cuda_attn_n_part(int64_t n_tokens, int32_t n_head_kv, int64_t n_kv, int64_t n_slots,
                                        int32_t n_sm) {
    const int64_t pairs = n_tokens * n_head_kv;
    int64_t n_part = (2 * (int64_t) n_sm + pairs - 1) / (pairs > 0 ? pairs : 1);
    const int64_t most = (n_kv + n_slots) / (2 * LQ2_AB_CHUNK);
    n_part = n_part < most ? n_part : most;
    return (int32_t) (n_part < 1 ? 1 : n_part > 1024 ? 1024 : n_part);
}

extern "C" int lq2_cuda_attn(const struct lq2_attn_args * a, cudaStream_t stream) {
    const struct lq2_ab_shape * sh = &a->g.shape;
    if (!lq2_ab_supported(sh->D, sh->gq, sh->G, sh->k_bits, sh->k_widths, sh->v_bits, sh->v_per_channel,
                          sh->rope_mode, sh->rope_n_dims) ||
        (sh->rope_n_dims > 0 && !a->rope) || (sh->k_widths && !a->k_widths) || (sh->s8 && !a->refs) || a->g.n_part < 1 || a->g.n_slots % sh->G != 0 || a->g.n_tokens > 65535) {
        return -1;
    }
    if (a->g.n_tokens == 0) {
        return 0;
    }
    const dim3 blocks((unsigned) a->g.n_part, (unsigned) a->g.n_head_kv, (unsigned) a->g.n_tokens);
    const bool special = sh->D == 64  ? lq2_attn_launch_d<64>(*a, blocks, stream)
                       : sh->D == 128 ? lq2_attn_launch_d<128>(*a, blocks, stream)
                       : sh->D == 256 ? lq2_attn_launch_d<256>(*a, blocks, stream)
                       : false;
    if (!special) {
        lq2_attn_block_kernel<0, 0><<<blocks, LQ2_AB_THREADS, 0, stream>>>(*a);
    }
    const dim3 heads((unsigned) (sh->gq * a->g.n_head_kv), (unsigned) a->g.n_tokens);
    lq2_attn_combine_kernel<<<heads, sh->D < 256 ? sh->D : 256, 0, stream>>>(*a);
    return 0;
}
