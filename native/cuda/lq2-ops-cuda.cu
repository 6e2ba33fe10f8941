// lq2-ops-cuda.cu: ggml-cuda's side of GGML_OP_LQ2_DEMOTE, _ATTN and _DEQUANT: reads the op's
// tensors and params (lq2-op-params.h, the layout the CPU forwards read) into the kernels'
// argument structs (lq2-attn.cuh, lq2-demote.cuh) and launches them on the context's stream.
// Never run on a GPU yet: it compiles against the patched ggml-cuda (scripts/gpu_check.sh builds
// and runs it where a GPU is).
#include "lq2-ops-cuda.cuh"

#include "lq2-attn.cuh"
#include "lq2-demote.cuh"
#include "../common/lq2-op-params.h"

#include <cstring>

template <typename P> static P op_params_of(const ggml_tensor * t) {
    P p;
    memcpy(&p, t->op_params, sizeof(p));
    return p;
}

bool ggml_cuda_lq2_supports_op(const ggml_tensor * op) {
    switch (op->op) {
        case GGML_OP_LQ2_DEMOTE: {
            const auto p = op_params_of<lq2_demote_op_params>(op);
            const ggml_tensor * k = op->src[3];
            return lq2_key_type_b(p.G, p.k_bits) >= 0 && lq2_value_type(p.v_bits) >= 0 && p.rope.n_dims % 2 == 0 &&
                   op->src[4]->ne[0] % LQ2_QK_V == 0 && p.rope.n_dims <= k->ne[0] / p.n_head_kv &&
                   ggml_is_contiguous_rows(op->src[3]) && ggml_is_contiguous_rows(op->src[4]);
        }
        case GGML_OP_LQ2_ATTN: {
            const auto p = op_params_of<lq2_attn_op_params>(op);
            const ggml_tensor * q = op->src[0], * k = op->src[1];
            return lq2_ab_supported((int) q->ne[0], (int) (q->ne[1] / k->ne[1]), p.G, p.k_bits, p.v_bits, p.rope.mode,
                                    p.rope.n_dims) &&
                   q->ne[2] <= 65535 && k->nb[0] == sizeof(lq2_half) && op->src[2]->nb[0] == sizeof(lq2_half);
        }
        case GGML_OP_LQ2_DEQUANT: {
            const auto p = op_params_of<lq2_dequant_op_params>(op);
            return lq2_key_type_b(p.G, p.k_bits) >= 0 && lq2_value_type(p.v_bits) >= 0 && op->ne[0] % LQ2_QK_V == 0;
        }
        default:
            return false;
    }
}

void ggml_cuda_op_lq2_demote(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const auto p = op_params_of<lq2_demote_op_params>(dst);
    const ggml_tensor * k2 = dst->src[0], * v2 = dst->src[1], * staging = dst->src[2];
    const ggml_tensor * k = dst->src[3], * v = dst->src[4], * rows = dst->src[5];
    lq2_cuda_demote_args a = {};
    a.nk            = k->ne[0];
    a.nv            = v->ne[0];
    a.k2            = (uint8_t *) k2->data;
    a.k_group_bytes = a.nk * LQ2_BLOCK_BYTES_B(p.G, p.k_bits);
    a.v2            = (uint8_t *) v2->data;
    a.v_row_bytes   = (a.nv / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, p.v_bits);
    a.staging       = (float *) staging->data;
    a.staging_nb1   = staging->nb[1];
    a.k             = k->data;
    a.k_nb1         = k->nb[1];
    a.v             = v->data;
    a.v_nb1         = v->nb[1];
    a.rows          = (const int32_t *) rows->data;
    a.n_rows        = rows->ne[1];
    a.n_head_kv     = p.n_head_kv;
    a.G             = p.G;
    a.k_bits        = p.k_bits;
    a.v_bits        = p.v_bits;
    a.fit           = p.fit;
    a.rope_mode     = p.rope.mode;
    a.rope_n_dims   = p.rope.n_dims;
    a.freq_base     = p.rope.freq_base;
    a.freq_scale    = p.rope.freq_scale;
    a.attn_factor   = p.rope.attn_factor;
    GGML_ASSERT(lq2_cuda_demote(&a, ctx.stream()) == 0 && "LQ2_DEMOTE: parameters the CUDA kernel does not take");
}

void ggml_cuda_op_lq2_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const auto op = op_params_of<lq2_attn_op_params>(dst);
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2], * mask = dst->src[3];
    const ggml_tensor * k2 = dst->src[4], * v2 = dst->src[5], * mask2 = dst->src[6], * rope = dst->src[7];
    const int64_t D = q->ne[0], n_head = q->ne[1], n_head_kv = k->ne[1];

    lq2_cuda_attn_args a = {};
    a.q          = (const float *) q->data;
    a.q_nb1      = q->nb[1];
    a.q_nb2      = q->nb[2];
    a.k          = k->data;
    a.k_nb2      = k->nb[2];
    a.k_nb3      = k->nb[3];
    a.v          = v->data;
    a.v_nb2      = v->nb[2];
    a.v_nb3      = v->nb[3];
    a.n_kv       = k->ne[2];
    a.mask       = mask->data;
    a.mask_nb1   = mask->nb[1]; // the streams' rows are contiguous, as the CPU forward reads them
    a.mask_f16   = mask->type == GGML_TYPE_F16;
    a.k2         = k2->data;
    a.kg_bytes   = n_head_kv * D * LQ2_BLOCK_BYTES_B(op.G, op.k_bits);
    a.v2         = v2->data;
    a.vrow_bytes = n_head_kv * (D / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, op.v_bits);
    a.mask2      = mask2->data;
    a.mask2_nb1  = mask2->nb[1];
    a.rope       = rope ? rope->data : nullptr;
    a.rope_nb1   = rope ? rope->nb[1] : 0;
    a.n_slots    = mask2->ne[0];
    a.n_tokens   = q->ne[2];
    a.n_tps      = q->ne[2] / k->ne[3];
    a.n_head_kv  = (int32_t) n_head_kv;
    a.dst        = (float *) dst->data;
    a.dst_nb1    = dst->nb[1];
    a.dst_nb2    = dst->nb[2];
    a.shape      = { (int32_t) D, (int32_t) (n_head / n_head_kv), (int32_t) n_head, 0, op.scale, op.softcap, op.max_bias,
                     op.G, op.k_bits, op.v_bits, op.rope.mode, op.rope.n_dims, op.rope.attn_factor, op.score_correction };
    a.n_part     = lq2_cuda_attn_n_part(a.n_tokens, a.n_head_kv, a.n_kv, a.n_slots, ggml_cuda_info().devices[ctx.device].nsm);

    ggml_cuda_pool_alloc<float> parts(ctx.pool(), (size_t) lq2_cuda_attn_parts_size(&a));
    a.parts = parts.get();
    GGML_ASSERT(lq2_cuda_attn(&a, ctx.stream()) == 0 && "LQ2_ATTN: parameters the CUDA kernel does not take");
}

void ggml_cuda_op_lq2_dequant(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const auto p = op_params_of<lq2_dequant_op_params>(dst);
    const ggml_tensor * k2 = dst->src[0], * v2 = dst->src[1], * rope = dst->src[2], * k = dst->src[3], * v = dst->src[4];
    lq2_cuda_dequant_args a = {};
    a.D             = (int32_t) dst->ne[0];
    a.n_head_kv     = (int32_t) dst->ne[1];
    a.k2            = (const uint8_t *) k2->data;
    a.k_group_bytes = (int64_t) a.D * a.n_head_kv * LQ2_BLOCK_BYTES_B(p.G, p.k_bits);
    a.v2            = (const uint8_t *) v2->data;
    a.v_row_bytes   = (int64_t) a.n_head_kv * (a.D / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, p.v_bits);
    a.rope          = rope ? rope->data : nullptr;
    a.rope_nb1      = rope ? rope->nb[1] : 0;
    a.k             = k->data;
    a.k_nb2         = k->nb[2];
    a.v             = v->data;
    a.v_nb2         = v->nb[2];
    a.n_kv          = k->ne[2];
    a.n_slots       = p.n_slots;
    a.G             = p.G;
    a.k_bits        = p.k_bits;
    a.v_bits        = p.v_bits;
    a.rope_mode     = p.rope.mode;
    a.rope_n_dims   = p.rope.n_dims;
    a.dst           = (lq2_half *) dst->data;
    a.dst_nb3       = dst->nb[3];
    GGML_ASSERT(lq2_cuda_dequant(&a, ctx.stream()) == 0 && "LQ2_DEQUANT: parameters the CUDA kernel does not take");
}
