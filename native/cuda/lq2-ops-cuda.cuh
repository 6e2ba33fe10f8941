// lq2-ops-cuda.cuh: the LogQuant ops in ggml-cuda (dispatched from ggml-cuda.cu by patch 0013 when
// the build has -DLOGQUANT_CUDA=ON). Compiled into ggml-cuda: it uses ggml-cuda's context and pool.
#pragma once

#include "common.cuh"

// Whether the CUDA kernels take this LQ2 op's shapes (else the scheduler runs it on the CPU).
bool ggml_cuda_lq2_supports_op(const ggml_tensor * op);

void ggml_cuda_op_lq2_demote(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
void ggml_cuda_op_lq2_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
void ggml_cuda_op_lq2_dequant(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
