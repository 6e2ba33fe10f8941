// lq2-attn.cu: the CUDA decode attention over LogQuant's two tiers (lq2-attn.cuh). One block of
// LQ2_AB_THREADS threads per (part, kv head, query token) runs lq2-attn-block.h's phases with a
// barrier after each; a second kernel combines the parts. The per-thread work is tested on the
// host (tests/native/test_lq2_attn_block.py); this file only walks the chunks and places the
// barriers, in the same order as that test's emulation.
// Never run on a GPU yet: compile-checked only (tests/native/test_cuda_compile.py).
#include "lq2-attn.cuh"

static __device__ __forceinline__ float lq2_cuda_mask_value(const char * row, int f16, int64_t j) {
    return f16 ? lq2_fp16_to_fp32(((const lq2_half *) row)[j]) : ((const float *) row)[j];
}

// D_T, GQ_T > 0: the head size and query heads per kv head as constants, so that the shared
// functions' loops unroll and a thread's running output stays in registers; 0: taken from the
// arguments (every other shape).
template <int D_T, int GQ_T>
static __global__ void __launch_bounds__(LQ2_AB_THREADS) lq2_attn_block_kernel(const struct lq2_cuda_attn_args a) {
    const int     ith  = threadIdx.x;
    const int     part = blockIdx.x, hk = blockIdx.y;
    const int64_t tok  = blockIdx.z;
    struct lq2_ab_shape sh = a.shape;
    sh.hk = hk;
    if (D_T > 0) {
        sh.D  = D_T;
        sh.gq = GQ_T;
    }
    const int D = sh.D, gq = sh.gq, G = sh.G;

    __shared__ struct lq2_ab_shared sm;
    float acc[LQ2_AB_ACC];
    const float * q = (const float *) ((const char *) a.q + tok * a.q_nb2 + (int64_t) hk * gq * a.q_nb1);
    lq2_ab_begin(ith, &sh, q, a.q_nb1 / (int64_t) sizeof(float), &sm, acc);
    __syncthreads();

    // this part's share of the f16 tier (the same shares as the CPU op's parts)
    const int64_t a0 = a.n_kv * part / a.n_part, a1 = a.n_kv * (part + 1) / a.n_part;
    const int64_t stream = tok / a.n_tps;
    const char * kbase = (const char *) a.k + stream * a.k_nb3 + (int64_t) hk * D * sizeof(lq2_half);
    const char * vbase = (const char *) a.v + stream * a.v_nb3 + (int64_t) hk * D * sizeof(lq2_half);
    const char * mrow  = (const char *) a.mask + tok * a.mask_nb1;
    for (int64_t t0 = a0; t0 < a1; t0 += LQ2_AB_CHUNK) {
        const int n = (int) (a1 - t0 < LQ2_AB_CHUNK ? a1 - t0 : LQ2_AB_CHUNK);
        if (ith < n) {
            lq2_ab_score_f16(ith, &sh, (const lq2_half *) (kbase + (t0 + ith) * a.k_nb2),
                             lq2_cuda_mask_value(mrow, a.mask_f16, t0 + ith), &sm);
        }
        __syncthreads();
        if (ith < gq) {
            lq2_ab_max(ith, n, &sm);
        }
        __syncthreads();
        if (ith < n) {
            lq2_ab_weight(ith, &sh, &sm);
        }
        __syncthreads();
        lq2_ab_fold_f16(ith, &sh, (const uint8_t *) (vbase + t0 * a.v_nb2), a.v_nb2, n, &sm, acc);
        __syncthreads();
    }

    // and of the 2-bit groups (whole groups: unused slots are -inf in mask2)
    const int64_t ng = a.n_slots / G, g0 = ng * part / a.n_part, g1 = ng * (part + 1) / a.n_part;
    const int     kbs = LQ2_BLOCK_BYTES_B(G, sh.k_bits);
    const int64_t vhead = (int64_t) (D / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, sh.v_bits);
    const lq2_half * m2 = (const lq2_half *) ((const char *) a.mask2 + tok * a.mask2_nb1);
    for (int64_t g = g0; g < g1; ++g) {
        const uint8_t  * kg = (const uint8_t *) a.k2 + g * a.kg_bytes + (int64_t) hk * D * kbs;
        const lq2_half * cs = a.rope ? (const lq2_half *) ((const char *) a.rope + g * a.rope_nb1) : NULL;
        if (sh.score_correction) {
            if (ith < gq) {
                lq2_ab_correction(ith, &sh, kg, &sm);
            }
            __syncthreads();
        }
        if (ith < G) {
            lq2_ab_score_q2(ith, &sh, kg, cs, lq2_fp16_to_fp32(m2[g * G + ith]), &sm);
        }
        __syncthreads();
        if (ith < gq) {
            lq2_ab_max(ith, G, &sm);
        }
        __syncthreads();
        if (ith < G) {
            lq2_ab_weight(ith, &sh, &sm);
        }
        __syncthreads();
        lq2_ab_fold_q2(ith, &sh, (const uint8_t *) a.v2 + g * G * a.vrow_bytes + hk * vhead, a.vrow_bytes, G, &sm, acc);
        __syncthreads();
    }

    const int n_head = gq * a.n_head_kv;
    lq2_ab_store(ith, &sh, &sm, acc, a.parts + (((int64_t) part * a.n_tokens + tok) * n_head + (int64_t) hk * gq) * (D + 2));
}

static __global__ void lq2_attn_combine_kernel(const struct lq2_cuda_attn_args a) {
    const int     h = blockIdx.x, D = a.shape.D, n_head = a.shape.gq * a.n_head_kv;
    const int64_t tok = blockIdx.y;
    const int64_t stride = a.n_tokens * n_head * (D + 2);
    const float * row = a.parts + (tok * n_head + h) * (D + 2);
    float * out = (float *) ((char *) a.dst + tok * a.dst_nb2 + h * a.dst_nb1);
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        out[c] = lq2_ab_combine(c, D, a.n_part, row, stride);
    }
}

// The specialised kernel for the common shapes (head sizes 64, 128, 256; 1 to 8 query heads per kv
// head), the generic one otherwise.
template <int D_T> static bool lq2_attn_launch_d(const struct lq2_cuda_attn_args & a, dim3 blocks, cudaStream_t stream) {
    switch (a.shape.gq) {
        case 1: lq2_attn_block_kernel<D_T, 1><<<blocks, LQ2_AB_THREADS, 0, stream>>>(a); return true;
        case 2: lq2_attn_block_kernel<D_T, 2><<<blocks, LQ2_AB_THREADS, 0, stream>>>(a); return true;
        case 4: lq2_attn_block_kernel<D_T, 4><<<blocks, LQ2_AB_THREADS, 0, stream>>>(a); return true;
        case 6: lq2_attn_block_kernel<D_T, 6><<<blocks, LQ2_AB_THREADS, 0, stream>>>(a); return true;
        case 7: lq2_attn_block_kernel<D_T, 7><<<blocks, LQ2_AB_THREADS, 0, stream>>>(a); return true;
        case 8: lq2_attn_block_kernel<D_T, 8><<<blocks, LQ2_AB_THREADS, 0, stream>>>(a); return true;
        default: return false;
    }
}

static void lq2_attn_block_launch(const struct lq2_cuda_attn_args & a, dim3 blocks, cudaStream_t stream) {
    const bool done = a.shape.D == 64  ? lq2_attn_launch_d<64>(a, blocks, stream)
                    : a.shape.D == 128 ? lq2_attn_launch_d<128>(a, blocks, stream)
                    : a.shape.D == 256 ? lq2_attn_launch_d<256>(a, blocks, stream)
                    : false;
    if (!done) {
        lq2_attn_block_kernel<0, 0><<<blocks, LQ2_AB_THREADS, 0, stream>>>(a);
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

extern "C" int64_t lq2_cuda_attn_parts_size(const struct lq2_cuda_attn_args * a) {
    return (int64_t) a->n_part * a->n_tokens * a->shape.gq * a->n_head_kv * (a->shape.D + 2);
}

extern "C" int lq2_cuda_attn(const struct lq2_cuda_attn_args * a, cudaStream_t stream) {
    const struct lq2_ab_shape * sh = &a->shape;
    if (!lq2_ab_supported(sh->D, sh->gq, sh->G, sh->k_bits, sh->v_bits, sh->rope_mode, sh->rope_n_dims) ||
        (sh->rope_n_dims > 0 && !a->rope) || a->n_part < 1 || a->n_slots % sh->G != 0 || a->n_tokens > 65535) {
        return -1;
    }
    if (a->n_tokens == 0) {
        return 0;
    }
    const dim3 blocks((unsigned) a->n_part, (unsigned) a->n_head_kv, (unsigned) a->n_tokens);
    lq2_attn_block_launch(*a, blocks, stream);
    const dim3 heads((unsigned) (sh->gq * a->n_head_kv), (unsigned) a->n_tokens);
    lq2_attn_combine_kernel<<<heads, sh->D < 256 ? sh->D : 256, 0, stream>>>(*a);
    return 0;
}
