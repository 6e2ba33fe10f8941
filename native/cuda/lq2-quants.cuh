// lq2-quants.cuh: CUDA quantize / dequantize of the LogQuant 2-bit formats (lq2-format.h).
// Same bytes and floats as the CPU code: the arithmetic is the shared header's.
#pragma once

#include "../common/lq2-format.h"

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Values: n_rows rows of n floats (n % 64 == 0), row stride in floats / in bytes.
void lq2_cuda_quantize_v(const float * x, int64_t ldx, void * y, size_t nb_y, int64_t n, int64_t n_rows,
                         cudaStream_t stream);
void lq2_cuda_dequantize_v(const void * x, size_t nb_x, float * y, int64_t ldy, int64_t n, int64_t n_rows,
                           cudaStream_t stream);

// Keys: one group of n_tok <= G token rows (stride ldx floats), n_ch channels -> n_ch blocks.
void lq2_cuda_quantize_k_group(const float * x, int64_t ldx, int n_tok, int n_ch, int G, void * y,
                               cudaStream_t stream);
// Token-major dequantization of the first n_tok tokens of a group (row stride ldy floats).
void lq2_cuda_dequantize_k_group(const void * x, int n_ch, int G, int n_tok, float * y, int64_t ldy,
                                 cudaStream_t stream);

#ifdef __cplusplus
}
#endif
