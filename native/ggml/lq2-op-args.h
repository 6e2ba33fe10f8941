// lq2-op-args.h: the LogQuant ops' tensors and params (lq2-op-params.h) as the GPU kernels'
// argument structs (lq2-attn-block.h, lq2-demote-block.h, lq2-dequant-block.h), mixed key widths
// per-channel values and 8-bit headers included. One place for the mapping: the CUDA
// glue (native/cuda/lq2-ops-cuda.cu) and the host check that runs the kernels' per-thread code on
// the CPU op's tensors (tests/native/lq2_ops_check.cpp) both call these.
#pragma once

#include "ggml.h"

#include "lq2-attn-block.h"
#include "lq2-demote-block.h"
#include "lq2-dequant-block.h"
#include "lq2-op-params.h"

#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

// A LogQuant op's mixed key widths (ggml_lq2_set_key_widths, lq2-format.h): I8 [n_embd_k_gqa],
// or NULL when every channel has the op's k_bits. (Its data may still be NULL when supports_op
// asks, before the graph is allocated.)
static inline const struct ggml_tensor * lq2_op_key_widths(const struct ggml_tensor * op) {
    const int src = op->op == GGML_OP_LQ2_DEMOTE ? LQ2_DEMOTE_SRC_WIDTHS
                  : op->op == GGML_OP_LQ2_ATTN   ? LQ2_ATTN_SRC_WIDTHS
                                                 : LQ2_DEQUANT_SRC_WIDTHS;
    return op->src[src];
}

// A LogQuant op's channel references for 8-bit block headers (ggml_lq2_set_header_refs,
// lq2-op-params.h), or NULL: f16 headers.
static inline const struct ggml_tensor * lq2_op_header_refs(const struct ggml_tensor * op) {
    const int src = op->op == GGML_OP_LQ2_DEMOTE ? LQ2_DEMOTE_SRC_REFS
                  : op->op == GGML_OP_LQ2_ATTN   ? LQ2_ATTN_SRC_REFS
                                                 : LQ2_DEQUANT_SRC_REFS;
    return op->src[src];
}

// Bytes per value row (values grouped per token: one row per slot, f16 headers) or per value
// group (grouped per channel: one block of G codes per channel, 8-bit headers when s8), for nv
// channels.
static inline int64_t lq2_v2_stride(int64_t nv, int G, int v_bits, int v_per_channel, int s8) {
    return v_per_channel ? nv * LQ2_BLOCK_BYTES_H(G, v_bits, s8)
                         : (nv / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, v_bits);
}

// parts: lq2_attn_parts_floats() floats of scratch for n_part parts.
static inline struct lq2_attn_args lq2_attn_args_of(const struct ggml_tensor * dst, int32_t n_part, float * parts) {
    struct lq2_attn_op_params op;
    memcpy(&op, dst->op_params, sizeof(op));
    const struct ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2], * mask = dst->src[3];
    const struct ggml_tensor * k2 = dst->src[4], * v2 = dst->src[5], * mask2 = dst->src[6], * rope = dst->src[7];
    const int64_t D = q->ne[0], n_head = q->ne[1], n_head_kv = k->ne[1];
    struct lq2_attn_args a;
    memset(&a, 0, sizeof(a));
    a.q                        = (const char *) q->data;
    a.g.q_nb1                  = (int64_t) q->nb[1];
    a.g.q_nb2                  = (int64_t) q->nb[2];
    a.k                        = (const char *) k->data;
    a.g.k_nb2                  = (int64_t) k->nb[2];
    a.g.k_nb3                  = (int64_t) k->nb[3];
    a.v                        = (const char *) v->data;
    a.g.v_nb2                  = (int64_t) v->nb[2];
    a.g.v_nb3                  = (int64_t) v->nb[3];
    a.g.n_kv                   = k->ne[2];
    a.mask                     = (const char *) mask->data;
    a.g.mask_nb1               = (int64_t) mask->nb[1]; // the streams' rows are contiguous, as the CPU forward reads them
    a.g.mask_f16               = mask->type == GGML_TYPE_F16;
    a.k2                       = (const char *) k2->data;
    const struct ggml_tensor * refs = lq2_op_header_refs(dst);
    a.g.kg_bytes               = n_head_kv * D * LQ2_BLOCK_BYTES_H(op.G, op.k_bits, refs != NULL);
    a.v2                       = (const char *) v2->data;
    a.g.v2_stride              = lq2_v2_stride(n_head_kv * D, op.G, op.v_bits, op.v_per_channel, refs != NULL);
    a.mask2                    = (const char *) mask2->data;
    a.g.mask2_nb1              = (int64_t) mask2->nb[1];
    a.rope                     = rope ? (const char *) rope->data : NULL;
    a.g.rope_nb1               = rope ? (int64_t) rope->nb[1] : 0;
    a.g.n_slots                = mask2->ne[0];
    a.g.n_tokens               = q->ne[2];
    a.g.n_tps                  = q->ne[2] / k->ne[3];
    a.g.n_head_kv              = (int32_t) n_head_kv;
    a.g.n_part                 = n_part;
    a.parts                    = parts;
    a.dst                      = (char *) dst->data;
    a.g.dst_nb1                = (int64_t) dst->nb[1];
    a.g.dst_nb2                = (int64_t) dst->nb[2];
    a.g.shape.D                = (int32_t) D;
    a.g.shape.gq               = (int32_t) (n_head / n_head_kv);
    a.g.shape.n_head           = (int32_t) n_head;
    a.g.shape.scale            = op.scale;
    a.g.shape.softcap          = op.softcap;
    a.g.shape.max_bias         = op.max_bias;
    a.g.shape.G                = op.G;
    a.g.shape.k_bits           = op.k_bits;
    a.g.shape.v_bits           = op.v_bits;
    a.g.shape.rope_mode        = op.rope.mode;
    a.g.shape.rope_n_dims      = op.rope.n_dims;
    a.g.shape.rope_attn_factor = op.rope.attn_factor;
    a.g.shape.score_correction = op.score_correction;
    a.g.shape.v_per_channel    = op.v_per_channel;
    a.g.shape.k_widths         = lq2_op_key_widths(dst) != NULL;
    a.k_widths                 = lq2_op_key_widths(dst) ? (const int8_t *) lq2_op_key_widths(dst)->data : NULL;
    a.g.shape.s8               = refs != NULL;
    a.refs                     = refs ? (const float *) refs->data : NULL;
    return a;
}

static inline int64_t lq2_attn_parts_floats(const struct ggml_tensor * dst, int32_t n_part) {
    const struct ggml_tensor * q = dst->src[0];
    return (int64_t) n_part * q->ne[2] * q->ne[1] * (q->ne[0] + 2);
}

// scratch (n_rows * lq2_demote_channels floats) is the caller's to set.
static inline struct lq2_demote_args lq2_demote_args_of(const struct ggml_tensor * dst) {
    struct lq2_demote_op_params p;
    memcpy(&p, dst->op_params, sizeof(p));
    const struct ggml_tensor * k2 = dst->src[0], * v2 = dst->src[1], * staging = dst->src[2];
    const struct ggml_tensor * k = dst->src[3], * v = dst->src[4], * rows = dst->src[5];
    struct lq2_demote_args a;
    memset(&a, 0, sizeof(a));
    a.g.nk            = k->ne[0];
    a.g.nv            = v->ne[0];
    a.k2            = (uint8_t *) k2->data;
    const struct ggml_tensor * refs = lq2_op_header_refs(dst);
    a.g.k_group_bytes = a.g.nk * LQ2_BLOCK_BYTES_H(p.G, p.k_bits, refs != NULL);
    a.v2            = (uint8_t *) v2->data;
    a.g.v2_stride     = lq2_v2_stride(a.g.nv, p.G, p.v_bits, p.v_per_channel, refs != NULL);
    a.staging       = (char *) staging->data;
    a.g.staging_nb1   = (int64_t) staging->nb[1];
    a.k             = (const char *) k->data;
    a.g.k_nb1         = (int64_t) k->nb[1];
    a.v             = (const char *) v->data;
    a.g.v_nb1         = (int64_t) v->nb[1];
    a.rows          = (const int32_t *) rows->data;
    a.g.n_rows        = rows->ne[1];
    a.g.n_head_kv     = p.n_head_kv;
    a.g.G             = p.G;
    a.g.k_bits        = p.k_bits;
    a.g.v_bits        = p.v_bits;
    a.g.fit           = p.fit;
    a.g.rope          = p.rope;
    a.g.v_per_channel = p.v_per_channel;
    a.g.k_widths      = lq2_op_key_widths(dst) != NULL;
    a.k_widths        = lq2_op_key_widths(dst) ? (const int8_t *) lq2_op_key_widths(dst)->data : NULL;
    a.g.s8            = refs != NULL;
    a.refs            = refs ? (const float *) refs->data : NULL;
    return a;
}

static inline struct lq2_dequant_args lq2_dequant_args_of(const struct ggml_tensor * dst) {
    struct lq2_dequant_op_params p;
    memcpy(&p, dst->op_params, sizeof(p));
    const struct ggml_tensor * k2 = dst->src[0], * v2 = dst->src[1], * rope = dst->src[2];
    const struct ggml_tensor * k = dst->src[3], * v = dst->src[4];
    struct lq2_dequant_args a;
    memset(&a, 0, sizeof(a));
    a.g.D              = (int32_t) dst->ne[0];
    a.g.n_head_kv      = (int32_t) dst->ne[1];
    a.k2             = (const uint8_t *) k2->data;
    const struct ggml_tensor * refs = lq2_op_header_refs(dst);
    a.g.k_group_bytes  = (int64_t) a.g.D * a.g.n_head_kv * LQ2_BLOCK_BYTES_H(p.G, p.k_bits, refs != NULL);
    a.v2             = (const uint8_t *) v2->data;
    a.g.v2_stride      = lq2_v2_stride((int64_t) a.g.n_head_kv * a.g.D, p.G, p.v_bits, p.v_per_channel, refs != NULL);
    a.rope_table     = rope ? (const char *) rope->data : NULL;
    a.g.rope_table_nb1 = rope ? (int64_t) rope->nb[1] : 0;
    a.k              = (const char *) k->data;
    a.g.k_nb2          = (int64_t) k->nb[2];
    a.v              = (const char *) v->data;
    a.g.v_nb2          = (int64_t) v->nb[2];
    a.g.n_kv           = k->ne[2];
    a.g.n_slots        = p.n_slots;
    a.g.G              = p.G;
    a.g.k_bits         = p.k_bits;
    a.g.v_bits         = p.v_bits;
    a.g.rope_mode      = p.rope.mode;
    a.g.rope_n_dims    = p.rope.n_dims;
    a.dst            = (lq2_half *) dst->data;
    a.g.dst_nb3        = (int64_t) dst->nb[3];
    a.g.v_per_channel  = p.v_per_channel;
    a.g.k_widths       = lq2_op_key_widths(dst) != NULL;
    a.k_widths         = lq2_op_key_widths(dst) ? (const int8_t *) lq2_op_key_widths(dst)->data : NULL;
    a.g.s8             = refs != NULL;
    a.refs             = refs ? (const float *) refs->data : NULL;
    return a;
}

#ifdef __cplusplus
}
#endif
