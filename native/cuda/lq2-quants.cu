// lq2-quants.cu: CUDA kernels for the LogQuant 2-bit formats.
//
// Value blocks: one warp per block of 64 (lane i holds values i and i + 32; min/max by shuffles;
// lane l < 16 then owns byte l = codes l, l+16, l+32, l+48, the packing of lq2-format.h).
// Key groups: one thread per channel walking the group's tokens; neighbouring threads read
// neighbouring channels of a token row, so loads coalesce. Dequantization: one thread per value.
// Division and f16 rounding are IEEE (no fast-math), so the bytes equal the CPU reference.
// Only the 2-bit codes for now: the 4- and 8-bit precision levers run on the CPU path.
#include "lq2-quants.cuh"

#define LQ2_WARP 32
#define LQ2_CUDA_LEVELS LQ2_LEVELS_B(2)

static __device__ __forceinline__ uint32_t lq2_warp_params(float a, float b) {
    const bool fa = lq2_isfinite(a), fb = lq2_isfinite(b);
    float lo = fa ? a : INFINITY, hi = fa ? a : -INFINITY;
    if (fb) {
        lo = b < lo ? b : lo;
        hi = b > hi ? b : hi;
    }
#pragma unroll
    for (int o = LQ2_WARP / 2; o > 0; o >>= 1) {
        const float l2 = __shfl_xor_sync(0xffffffffu, lo, o);
        const float h2 = __shfl_xor_sync(0xffffffffu, hi, o);
        lo = l2 < lo ? l2 : lo;
        hi = h2 > hi ? h2 : hi;
    }
    return lq2_group_params(lo, hi, LQ2_CUDA_LEVELS);
}

static __global__ void lq2_quantize_v_kernel(const float * x, int64_t ldx, uint8_t * y, size_t nb_y,
                                             int64_t nb_per_row, int64_t n_blocks) {
    const int64_t ib = (int64_t) blockIdx.x * (blockDim.x / LQ2_WARP) + threadIdx.x / LQ2_WARP;
    if (ib >= n_blocks) {
        return; // whole warps exit together: the shuffles below stay full-warp
    }
    const int lane = threadIdx.x % LQ2_WARP;
    const int64_t row = ib / nb_per_row, col = ib % nb_per_row;
    const float * xb = x + row * ldx + col * LQ2_QK_V;
    block_lq2_v64 * b = (block_lq2_v64 *) (y + row * nb_y) + col;

    const float a = xb[lane], c = xb[lane + 32];
    const uint32_t p = lq2_warp_params(a, c);
    const float d = lq2_fp16_to_fp32(LQ2_PARAMS_D(p)), m = lq2_fp16_to_fp32(LQ2_PARAMS_M(p));
    const uint32_t qa = lq2_code(a, d, m, LQ2_CUDA_LEVELS), qc = lq2_code(c, d, m, LQ2_CUDA_LEVELS);
    // lane l < 16 needs the codes of values l + 16 and l + 48, held by lane l + 16
    const uint32_t qa_hi = __shfl_down_sync(0xffffffffu, qa, 16);
    const uint32_t qc_hi = __shfl_down_sync(0xffffffffu, qc, 16);
    if (lane < 16) {
        b->qs[lane] = (uint8_t) (qa | (qa_hi << 2) | (qc << 4) | (qc_hi << 6));
    }
    if (lane == 0) {
        b->d = LQ2_PARAMS_D(p);
        b->m = LQ2_PARAMS_M(p);
    }
}

static __global__ void lq2_dequantize_v_kernel(const uint8_t * x, size_t nb_x, float * y, int64_t ldy,
                                               int64_t n, int64_t n_total) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_total) {
        return;
    }
    const int64_t row = i / n, k = i % n;
    const block_lq2_v64 * b = (const block_lq2_v64 *) (x + row * nb_x) + k / LQ2_QK_V;
    const int j = (int) (k % LQ2_QK_V);
    const int q = (b->qs[LQ2_CODE_BYTE_B(j, LQ2_QK_V, 2)] >> LQ2_CODE_SHIFT_B(j, LQ2_QK_V, 2)) & 3;
    y[row * ldy + k] = lq2_fp16_to_fp32(b->d) * (float) q + lq2_fp16_to_fp32(b->m);
}

static __global__ void lq2_quantize_k_kernel(const float * x, int64_t ldx, int n_tok, int n_ch, int G,
                                             uint8_t * y) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n_ch) {
        return;
    }
    float lo = INFINITY, hi = -INFINITY;
    for (int t = 0; t < n_tok; ++t) {
        const float v = x[(int64_t) t * ldx + c];
        if (lq2_isfinite(v)) {
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
    }
    const uint32_t p = lq2_group_params(lo, hi, LQ2_CUDA_LEVELS);
    const float d = lq2_fp16_to_fp32(LQ2_PARAMS_D(p)), m = lq2_fp16_to_fp32(LQ2_PARAMS_M(p));
    uint8_t * blk = y + (int64_t) c * LQ2_BLOCK_BYTES(G);
    ((lq2_half *) blk)[0] = LQ2_PARAMS_D(p);
    ((lq2_half *) blk)[1] = LQ2_PARAMS_M(p);
    const int nb = G / 4;
    for (int l = 0; l < nb; ++l) { // byte l: codes of tokens l, l + nb, l + 2nb, l + 3nb
        uint32_t byte = 0;
        for (int k = 0; k < 4; ++k) {
            const int t = l + k * nb;
            byte |= (t < n_tok ? lq2_code(x[(int64_t) t * ldx + c], d, m, LQ2_CUDA_LEVELS) : 0u) << (2 * k);
        }
        blk[4 + l] = (uint8_t) byte;
    }
}

static __global__ void lq2_dequantize_k_kernel(const uint8_t * x, int n_ch, int G, int n_tok, float * y,
                                               int64_t ldy) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t) n_tok * n_ch) {
        return;
    }
    const int t = (int) (i / n_ch), c = (int) (i % n_ch); // consecutive threads: consecutive channels
    const uint8_t * blk = x + (int64_t) c * LQ2_BLOCK_BYTES(G);
    const int q = (blk[4 + LQ2_CODE_BYTE_B(t, G, 2)] >> LQ2_CODE_SHIFT_B(t, G, 2)) & 3;
    const lq2_half * h = (const lq2_half *) blk;
    y[(int64_t) t * ldy + c] = lq2_fp16_to_fp32(h[0]) * (float) q + lq2_fp16_to_fp32(h[1]);
}

static inline unsigned lq2_cuda_blocks(int64_t n, int per_block) {
    return (unsigned) ((n + per_block - 1) / per_block);
}

extern "C" void lq2_cuda_quantize_v(const float * x, int64_t ldx, void * y, size_t nb_y, int64_t n,
                                    int64_t n_rows, cudaStream_t stream) {
    const int64_t nbr = n / LQ2_QK_V, n_blocks = nbr * n_rows;
    const int warps = 8;
    if (n_blocks > 0) {
        lq2_quantize_v_kernel<<<lq2_cuda_blocks(n_blocks, warps), warps * LQ2_WARP, 0, stream>>>(
            x, ldx, (uint8_t *) y, nb_y, nbr, n_blocks);
    }
}

extern "C" void lq2_cuda_dequantize_v(const void * x, size_t nb_x, float * y, int64_t ldy, int64_t n,
                                      int64_t n_rows, cudaStream_t stream) {
    const int64_t total = n * n_rows;
    if (total > 0) {
        lq2_dequantize_v_kernel<<<lq2_cuda_blocks(total, 256), 256, 0, stream>>>(
            (const uint8_t *) x, nb_x, y, ldy, n, total);
    }
}

extern "C" void lq2_cuda_quantize_k_group(const float * x, int64_t ldx, int n_tok, int n_ch, int G, void * y,
                                          cudaStream_t stream) {
    if (n_ch > 0 && lq2_key_type(G) >= 0) {
        lq2_quantize_k_kernel<<<lq2_cuda_blocks(n_ch, 128), 128, 0, stream>>>(x, ldx, n_tok, n_ch, G, (uint8_t *) y);
    }
}

extern "C" void lq2_cuda_dequantize_k_group(const void * x, int n_ch, int G, int n_tok, float * y, int64_t ldy,
                                            cudaStream_t stream) {
    const int64_t total = (int64_t) n_tok * n_ch;
    if (total > 0 && lq2_key_type(G) >= 0) {
        lq2_dequantize_k_kernel<<<lq2_cuda_blocks(total, 256), 256, 0, stream>>>(
            (const uint8_t *) x, n_ch, G, n_tok, y, ldy);
    }
}
