// lq2-attn.cuh: the CUDA decode attention over LogQuant's two tiers (GGML_OP_LQ2_ATTN), on the
// per-thread code of lq2-attn-block.h. Takes the op as struct lq2_attn_args (no ggml types, so
// this file compiles alone; the glue fills it with lq2_attn_args_of).
#pragma once

#include "../common/lq2-attn-block.h"

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Parts per (token, kv head): enough blocks for two waves on n_sm multiprocessors, but no part
// with fewer than two chunks of tokens.
int32_t lq2_cuda_attn_n_part(int64_t n_tokens, int32_t n_head_kv, int64_t n_kv, int64_t n_slots, int32_t n_sm);

// Runs the attention on `stream` (a->parts: scratch for a->g.n_part parts): 0, or -1 for a shape
// the kernel does not take (lq2_ab_supported).
int lq2_cuda_attn(const struct lq2_attn_args * a, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
