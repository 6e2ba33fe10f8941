// lq2-demote.cuh: the CUDA demotion (GGML_OP_LQ2_DEMOTE) and the prefill path's dequantization
// (GGML_OP_LQ2_DEQUANT), on the per-thread code of lq2-demote-block.h and lq2-dequant-block.h. Takes the ops as argument
// structs (no ggml types; the glue fills them with lq2_demote_args_of / lq2_dequant_args_of).
#pragma once

#include "../common/lq2-demote-block.h"
#include "../common/lq2-dequant-block.h"

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

// Both return 0, or -1 for parameters the kernels do not take. Demotion: a->scratch holds
// a->n_rows * a->nk floats.
int lq2_cuda_demote(const struct lq2_demote_args * a, cudaStream_t stream);
int lq2_cuda_dequant(const struct lq2_dequant_args * a, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
