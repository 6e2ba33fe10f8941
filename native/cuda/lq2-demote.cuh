// lq2-demote.cuh: the CUDA demotion (GGML_OP_LQ2_DEMOTE) and the prefill path's dequantization
// (GGML_OP_LQ2_DEQUANT) of the LogQuant tiers. Plain pointers and strides, so this file compiles
// without ggml; the ggml-cuda glue (lq2-ops-cuda.cu) fills the arguments from the op's tensors.
#pragma once

#include "../common/lq2-format.h"

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// GGML_OP_LQ2_DEMOTE's tensors (lq2-op-params.h) as pointers and byte strides.
struct lq2_cuda_demote_args {
    uint8_t       * k2;       int64_t k_group_bytes; // key groups: n_head_kv * D blocks each
    uint8_t       * v2;       int64_t v_row_bytes;   // value rows, one per slot
    float         * staging;  int64_t staging_nb1;   // f32 keys of the open groups, [G * nk] per row
    const void    * k;        int64_t k_nb1;         // f16 rows of the f16 tier
    const void    * v;        int64_t v_nb1;
    const int32_t * rows;     int64_t n_rows;        // the demotion list [LQ2_DEMOTE_COLS, n_rows]
    int64_t nk, nv;                                   // key / value row lengths (all kv heads)
    int32_t n_head_kv, G, k_bits, v_bits, fit;
    int32_t rope_mode, rope_n_dims;                  // rope_n_dims 0: keys are stored as they come
    float   freq_base, freq_scale, attn_factor;
};

// GGML_OP_LQ2_DEQUANT's tensors: both tiers into one f16 tensor [D, n_head_kv, n_slots + n_kv, 2].
struct lq2_cuda_dequant_args {
    const uint8_t * k2;   int64_t k_group_bytes;
    const uint8_t * v2;   int64_t v_row_bytes;
    const void    * rope; int64_t rope_nb1;          // NULL when rope_n_dims is 0
    const void    * k;    int64_t k_nb2;             // f16 tier views [D, n_head_kv, n_kv, 1]
    const void    * v;    int64_t v_nb2;
    int64_t n_kv, n_slots;
    int32_t D, n_head_kv, G, k_bits, v_bits;
    int32_t rope_mode, rope_n_dims;
    lq2_half * dst;       int64_t dst_nb3;           // keys at dst, values at dst + dst_nb3 bytes
};

// Both return 0, or -1 for parameters the kernels do not take.
int lq2_cuda_demote(const struct lq2_cuda_demote_args * a, cudaStream_t stream);
int lq2_cuda_dequant(const struct lq2_cuda_dequant_args * a, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
