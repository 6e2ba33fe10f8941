// lq2-attn.cuh: the CUDA decode attention over LogQuant's two tiers (GGML_OP_LQ2_ATTN), on the
// per-thread functions of lq2-attn-block.h. Plain pointers and strides, so this file compiles
// without ggml; the ggml-cuda glue (lq2-ops-cuda.cu) fills the arguments from the op's tensors.
#pragma once

#include "../common/lq2-attn-block.h"

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The tensors of GGML_OP_LQ2_ATTN (lq2-op-params.h) as pointers and byte strides.
struct lq2_cuda_attn_args {
    const float * q;      int64_t q_nb1, q_nb2;         // F32 [D, n_head, n_tokens]
    const void  * k;      int64_t k_nb2, k_nb3;         // F16 [D, n_head_kv, n_kv, n_stream]
    const void  * v;      int64_t v_nb2, v_nb3;
    int64_t       n_kv;
    const void  * mask;   int64_t mask_nb1; int32_t mask_f16; // [n_kv, n_tokens / n_stream, 1, n_stream]
    const void  * k2;     int64_t kg_bytes;             // the 2-bit stores: key groups, value rows
    const void  * v2;     int64_t vrow_bytes;
    const void  * mask2;  int64_t mask2_nb1;            // F16 [n_slots, >= n_tokens]
    const void  * rope;   int64_t rope_nb1;             // F16 table rows per group; NULL: post-RoPE keys
    int64_t       n_slots;                              // a multiple of G
    int64_t       n_tokens, n_tps;                      // query tokens, tokens per stream
    int32_t       n_head_kv;
    int32_t       n_part;                               // parts each (token, kv head) is split into
    float       * parts;                                // [n_part][n_tokens][n_head][D + 2]
    float       * dst;    int64_t dst_nb1, dst_nb2;     // F32 [D, n_head, n_tokens]
    struct lq2_ab_shape shape;                          // hk is set per block
};

// Parts per (token, kv head): enough blocks for two waves on n_sm multiprocessors, but no part with
// fewer than two chunks of tokens.
int32_t lq2_cuda_attn_n_part(int64_t n_tokens, int32_t n_head_kv, int64_t n_kv, int64_t n_slots, int32_t n_sm);

// Floats of the parts buffer.
int64_t lq2_cuda_attn_parts_size(const struct lq2_cuda_attn_args * a);

// Runs the attention on `stream`: 0, or -1 for a shape the kernel does not take
// (lq2_ab_supported).
int lq2_cuda_attn(const struct lq2_cuda_attn_args * a, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
