// lq2-ops.c: the graph constructors of GGML_OP_LQ2_DEMOTE, _ATTN and _DEQUANT (declared in
// ggml.h by patch 0011), compiled into ggml-base. They only check shapes and record sources and
// op_params (lq2-op-params.h); each backend's forward does the work (native/cpu/lq2-ops-cpu.c).
// All state the ops read is in their source tensors, so any backend, and RPC, can run them.
#include "ggml.h"
#include "ggml-impl.h"

#include "lq2-op-params.h"

#include <string.h>

struct ggml_tensor * ggml_lq2_demote(struct ggml_context * ctx, struct ggml_tensor * k2, struct ggml_tensor * v2,
                                     struct ggml_tensor * staging, struct ggml_tensor * k, struct ggml_tensor * v,
                                     struct ggml_tensor * rows, const void * params, size_t params_size) {
    GGML_ASSERT(params_size == sizeof(struct lq2_demote_op_params));
    GGML_ASSERT(k2->type == GGML_TYPE_I8 && v2->type == GGML_TYPE_I8 && staging->type == GGML_TYPE_F16);
    GGML_ASSERT(k->type == GGML_TYPE_F16 && v->type == GGML_TYPE_F16);
    GGML_ASSERT(rows->type == GGML_TYPE_I32 && rows->ne[0] == LQ2_DEMOTE_COLS && ggml_is_contiguous(rows));
    struct lq2_demote_op_params p;
    memcpy(&p, params, sizeof(p));
    GGML_ASSERT(p.n_head_kv > 0 && k->ne[0] % p.n_head_kv == 0);
    // (a layer the cache moved to per-token values for a GPU keeps its wider staging rows)
    GGML_ASSERT(staging->ne[0] >= (int64_t) p.G * (k->ne[0] + (p.v_per_channel ? v->ne[0] : 0)));

    // in place on k2 (v2 and staging are written beside it): readers of the result run after it
    struct ggml_tensor * result = ggml_view_tensor(ctx, k2);
    ggml_set_op_params(result, &p, sizeof(p));
    result->op     = GGML_OP_LQ2_DEMOTE;
    result->src[0] = k2;
    result->src[1] = v2;
    result->src[2] = staging;
    result->src[3] = k;
    result->src[4] = v;
    result->src[5] = rows;
    return result;
}

struct ggml_tensor * ggml_lq2_attn(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                   struct ggml_tensor * v, struct ggml_tensor * mask, struct ggml_tensor * k2,
                                   struct ggml_tensor * v2, struct ggml_tensor * mask2, struct ggml_tensor * rope,
                                   const void * params, size_t params_size) {
    GGML_ASSERT(params_size == sizeof(struct lq2_attn_op_params));
    struct lq2_attn_op_params p;
    memcpy(&p, params, sizeof(p));
    GGML_ASSERT(q->type == GGML_TYPE_F32 && k->type == GGML_TYPE_F16 && v->type == GGML_TYPE_F16);
    GGML_ASSERT(k->ne[0] == q->ne[0] && v->ne[0] == q->ne[0] && q->ne[1] % k->ne[1] == 0);
    GGML_ASSERT(q->ne[2] % k->ne[3] == 0 && mask->ne[3] == k->ne[3] && mask->ne[0] == k->ne[2]);
    GGML_ASSERT(ggml_is_contiguous(mask) && (mask->type == GGML_TYPE_F16 || mask->type == GGML_TYPE_F32));
    GGML_ASSERT(k2->type == GGML_TYPE_I8 && v2->type == GGML_TYPE_I8);
    GGML_ASSERT(mask2->type == GGML_TYPE_F16 && mask2->ne[1] >= q->ne[2] && ggml_is_contiguous(mask2));
    GGML_ASSERT(mask2->ne[0] % p.G == 0);
    GGML_ASSERT((rope != NULL) == (p.rope.n_dims > 0));
    GGML_ASSERT(!rope || (rope->type == GGML_TYPE_F16 && rope->ne[0] == (int64_t) p.rope.n_dims * p.G &&
                          rope->ne[1] * p.G >= mask2->ne[0]));

    struct ggml_tensor * result = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, q->ne[0], q->ne[1], q->ne[2]);
    ggml_set_op_params(result, &p, sizeof(p));
    result->op     = GGML_OP_LQ2_ATTN;
    result->src[0] = q;
    result->src[1] = k;
    result->src[2] = v;
    result->src[3] = mask;
    result->src[4] = k2;
    result->src[5] = v2;
    result->src[6] = mask2;
    result->src[7] = rope;
    return result;
}

struct ggml_tensor * ggml_lq2_dequant(struct ggml_context * ctx, struct ggml_tensor * k2, struct ggml_tensor * v2,
                                      struct ggml_tensor * rope, struct ggml_tensor * k, struct ggml_tensor * v,
                                      const void * params, size_t params_size) {
    GGML_ASSERT(params_size == sizeof(struct lq2_dequant_op_params));
    struct lq2_dequant_op_params p;
    memcpy(&p, params, sizeof(p));
    GGML_ASSERT(k2->type == GGML_TYPE_I8 && v2->type == GGML_TYPE_I8);
    GGML_ASSERT(k->type == GGML_TYPE_F16 && v->type == GGML_TYPE_F16 && k->ne[3] == 1 && v->ne[3] == 1);
    GGML_ASSERT(ggml_are_same_shape(k, v) && k->nb[0] == 2 && k->nb[1] == 2 * k->ne[0] && v->nb[1] == 2 * v->ne[0]);
    GGML_ASSERT(p.n_slots > 0 && p.n_slots % p.G == 0);
    GGML_ASSERT((rope != NULL) == (p.rope.n_dims > 0));
    GGML_ASSERT(!rope || (rope->type == GGML_TYPE_F16 && rope->ne[0] == (int64_t) p.rope.n_dims * p.G &&
                          rope->ne[1] * p.G >= p.n_slots));

    struct ggml_tensor * result = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, k->ne[0], k->ne[1], p.n_slots + k->ne[2], 2);
    ggml_set_op_params(result, &p, sizeof(p));
    result->op     = GGML_OP_LQ2_DEQUANT;
    result->src[0] = k2;
    result->src[1] = v2;
    result->src[2] = rope;
    result->src[3] = k;
    result->src[4] = v;
    return result;
}

struct ggml_tensor * ggml_lq2_set_key_widths(struct ggml_tensor * op, struct ggml_tensor * widths) {
    GGML_ASSERT(widths->type == GGML_TYPE_I8 && ggml_is_contiguous(widths));
    int64_t n_embd_k = 0; // the layer's key channels, all kv heads
    int     src      = 0;
    switch (op->op) {
        case GGML_OP_LQ2_DEMOTE:  n_embd_k = op->src[3]->ne[0];                  src = LQ2_DEMOTE_SRC_WIDTHS;  break;
        case GGML_OP_LQ2_ATTN:    n_embd_k = op->src[1]->ne[0] * op->src[1]->ne[1]; src = LQ2_ATTN_SRC_WIDTHS;    break;
        case GGML_OP_LQ2_DEQUANT: n_embd_k = op->ne[0] * op->ne[1];                 src = LQ2_DEQUANT_SRC_WIDTHS; break;
        default: GGML_ABORT("ggml_lq2_set_key_widths: not a LogQuant op");
    }
    GGML_ASSERT(ggml_nelements(widths) == n_embd_k);
    op->src[src] = widths;
    return op;
}

struct ggml_tensor * ggml_lq2_set_header_refs(struct ggml_tensor * op, struct ggml_tensor * refs) {
    GGML_ASSERT(refs->type == GGML_TYPE_F32 && ggml_is_contiguous(refs) && refs->ne[0] == 2);
    struct lq2_demote_op_params dp;
    int64_t n_embd_k = 0, n_embd_v = 0; // the layer's key and value channels, all kv heads
    int     src = 0, v_per_channel = 0;
    switch (op->op) {
        case GGML_OP_LQ2_DEMOTE:
            memcpy(&dp, op->op_params, sizeof(dp));
            n_embd_k = op->src[3]->ne[0], n_embd_v = op->src[4]->ne[0], v_per_channel = dp.v_per_channel;
            src = LQ2_DEMOTE_SRC_REFS;
            break;
        case GGML_OP_LQ2_ATTN: {
            struct lq2_attn_op_params ap;
            memcpy(&ap, op->op_params, sizeof(ap));
            n_embd_k = n_embd_v = op->src[1]->ne[0] * op->src[1]->ne[1], v_per_channel = ap.v_per_channel;
            src = LQ2_ATTN_SRC_REFS;
            break;
        }
        case GGML_OP_LQ2_DEQUANT: {
            struct lq2_dequant_op_params qp;
            memcpy(&qp, op->op_params, sizeof(qp));
            n_embd_k = n_embd_v = op->ne[0] * op->ne[1], v_per_channel = qp.v_per_channel;
            src = LQ2_DEQUANT_SRC_REFS;
            break;
        }
        default: GGML_ABORT("ggml_lq2_set_header_refs: not a LogQuant op");
    }
    GGML_ASSERT(refs->ne[1] == n_embd_k + (v_per_channel ? n_embd_v : 0));
    op->src[src] = refs;
    return op;
}
