// lq2-ops-cuda.cu: ggml-cuda's side of GGML_OP_LQ2_DEMOTE, _ATTN and _DEQUANT: reads the op's
// tensors and params (lq2-op-params.h, the layout the CPU forwards read) into the kernels'
// argument structs (lq2-attn.cuh, lq2-demote.cuh) and launches them on the context's stream.
// Never run on a GPU yet: it compiles against the patched ggml-cuda (scripts/gpu_check.sh builds
// and runs it where a GPU is).
#include "lq2-ops-cuda.cuh"

#include "lq2-attn.cuh"
#include "lq2-demote.cuh"
#include "../ggml/lq2-op-args.h"

#include <algorithm>
#include <cstring>

template <typename P> static P op_params_of(const ggml_tensor * t) {
    P p;
    memcpy(&p, t->op_params, sizeof(p));
    return p;
}

bool ggml_cuda_lq2_supports_op(const ggml_tensor * op) {
    switch (op->op) {
        case GGML_OP_LQ2_DEMOTE: {
            const lq2_demote_args a = lq2_demote_args_of(op);
            return lq2_demote_supported(&a) && op->src[3]->nb[0] == sizeof(lq2_half) && op->src[4]->nb[0] == sizeof(lq2_half);
        }
        case GGML_OP_LQ2_ATTN: {
            const auto p = op_params_of<lq2_attn_op_params>(op);
            const ggml_tensor * q = op->src[0], * k = op->src[1];
            return lq2_ab_supported((int) q->ne[0], (int) (q->ne[1] / k->ne[1]), p.G, p.k_bits,
                                    lq2_op_key_widths(op) != nullptr, p.v_bits, p.v_per_channel, p.rope.mode,
                                    p.rope.n_dims) &&
                   q->ne[2] <= 65535 && k->nb[0] == sizeof(lq2_half) && op->src[2]->nb[0] == sizeof(lq2_half);
        }
        case GGML_OP_LQ2_DEQUANT: {
            const lq2_dequant_args a = lq2_dequant_args_of(op);
            // (asked before the graph is allocated: the data pointers may still be NULL)
            return lq2_dequant_shape_ok(a.g.D, a.g.G, a.g.k_bits, a.g.k_widths, a.g.v_bits, a.g.v_per_channel,
                                        a.g.rope_mode, a.g.rope_n_dims, a.g.n_slots) &&
                   (a.g.rope_n_dims == 0 || op->src[2] != nullptr);
        }
        default:
            return false;
    }
}

void ggml_cuda_op_lq2_demote(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    lq2_demote_args a = lq2_demote_args_of(dst);
    ggml_cuda_pool_alloc<float> scratch(ctx.pool(), (size_t) std::max<int64_t>(1, a.g.n_rows * lq2_demote_channels(&a)));
    a.scratch = scratch.get();
    GGML_ASSERT(lq2_cuda_demote(&a, ctx.stream()) == 0 && "LQ2_DEMOTE: parameters the CUDA kernel does not take");
}

void ggml_cuda_op_lq2_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * mask2 = dst->src[6];
    const int32_t n_part = lq2_cuda_attn_n_part(q->ne[2], (int32_t) k->ne[1], k->ne[2], mask2->ne[0],
                                                ggml_cuda_info().devices[ctx.device].nsm);
    ggml_cuda_pool_alloc<float> parts(ctx.pool(), (size_t) lq2_attn_parts_floats(dst, n_part));
    const lq2_attn_args a = lq2_attn_args_of(dst, n_part, parts.get());
    GGML_ASSERT(lq2_cuda_attn(&a, ctx.stream()) == 0 && "LQ2_ATTN: parameters the CUDA kernel does not take");
}

void ggml_cuda_op_lq2_dequant(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const lq2_dequant_args a = lq2_dequant_args_of(dst);
    GGML_ASSERT(lq2_cuda_dequant(&a, ctx.stream()) == 0 && "LQ2_DEQUANT: parameters the CUDA kernel does not take");
}
