// lq2-ops-cpu.c: the CPU forwards of GGML_OP_LQ2_DEMOTE and GGML_OP_LQ2_ATTN (dispatched from
// ggml-cpu.c by patch 0011), compiled into ggml-cpu. Everything they read is in their source
// tensors (lq2-op-params.h); the kernels are lq2-quants.c, lq2-rope.c and lq2-attn.c, with their
// scalar versions when the graph asks for the reference path (use_ref).
#include "ggml-cpu-impl.h"
#include "simd-mappings.h"
#include "ggml-cpu.h"

#include "lq2-attn.h"
#include "lq2-op-params.h"
#include "lq2-quants.h"
#include "lq2-rope.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---- demote

// Quantizes the listed f16 rows into the 2-bit stores. One thread: it handles W tokens every W
// decode steps, or one prompt's worth once.
void ggml_compute_forward_lq2_demote(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    if (params->ith != 0) {
        return;
    }
    struct lq2_demote_op_params p;
    memcpy(&p, dst->op_params, sizeof(p));
    const struct ggml_tensor * k2      = dst->src[0];
    const struct ggml_tensor * v2      = dst->src[1];
    const struct ggml_tensor * staging = dst->src[2];
    const struct ggml_tensor * kc      = dst->src[3];
    const struct ggml_tensor * vc      = dst->src[4];
    const struct ggml_tensor * rows    = dst->src[5];
    const int8_t * widths = dst->src[LQ2_DEMOTE_SRC_WIDTHS] ? (const int8_t *) dst->src[LQ2_DEMOTE_SRC_WIDTHS]->data : NULL;
    const float  * refs   = dst->src[LQ2_DEMOTE_SRC_REFS] ? (const float *) dst->src[LQ2_DEMOTE_SRC_REFS]->data : NULL;

    const int64_t nk = kc->ne[0];
    const int64_t nv = vc->ne[0];
    const int64_t D  = nk / p.n_head_kv;
    const int64_t G  = p.G;
    const int     s8 = refs != NULL;
    const float * vrefs = refs ? refs + 2 * nk : NULL; // per-channel values' references, after the keys'
    const size_t  group_bytes  = (size_t) nk * LQ2_BLOCK_BYTES_H(p.G, p.k_bits, s8);
    const size_t  vrow_bytes   = (size_t) (nv / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, p.v_bits);
    const size_t  vgroup_bytes = (size_t) nv * LQ2_BLOCK_BYTES_H(p.G, p.v_bits, s8); // per-channel values
    const int     ref = params->use_ref;

    const int32_t * list = (const int32_t *) rows->data;
    const int64_t   n    = rows->ne[1];
    int64_t n_listed = 0; // most decode steps demote nothing: no buffers then
    for (int64_t i = 0; i < n; i++) {
        n_listed += list[i * LQ2_DEMOTE_COLS + LQ2_DEMOTE_SLOT] >= 0;
    }
    if (n_listed == 0) {
        return;
    }
    float * vrow = (float *) malloc((size_t) nv * sizeof(float));
    float * krow = (float *) malloc((size_t) nk * sizeof(float));
    // a group's staged rows as f32, keys [G][nk] then values [G][nv], for the quantizers
    float * kgrp = (float *) malloc((size_t) G * (nk + nv) * sizeof(float));
    float * vgrp = kgrp + G * nk;
    for (int64_t i = 0; i < n; i++) {
        const int32_t * d = list + i * LQ2_DEMOTE_COLS;
        const int64_t slot = d[LQ2_DEMOTE_SLOT];
        if (slot < 0) {
            continue; // padding
        }
        const int64_t grp = slot / G;
        // keys (and per-channel values): into the group's staging rows in f16 (lq2-demote-block.h
        // says why), the keys un-rotated; the group is requantized from them when it fills or the
        // list's run of rows into it ends (a group's rows are adjacent in the list)
        lq2_half * stage = (lq2_half *) ((char *) staging->data + d[LQ2_DEMOTE_STAGE] * staging->nb[1]);
        lq2_half * staged = stage + (slot % G) * nk;
        const ggml_fp16_t * ksrc = (const ggml_fp16_t *) ((const char *) kc->data + d[LQ2_DEMOTE_ROW] * kc->nb[1]);
        ggml_fp16_to_fp32_row(ksrc, krow, nk);
        if (p.rope.n_dims > 0) {
            lq2_rope_rows(&p.rope, krow, (int) D, p.n_head_kv, d[LQ2_DEMOTE_POS], /*inverse =*/ 1);
        }
        for (int64_t c = 0; c < nk; c++) {
            staged[c] = lq2_fp32_to_fp16(krow[c]); // the GPU blocks' rounding
        }
        const ggml_fp16_t * vsrc = (const ggml_fp16_t *) ((const char *) vc->data + d[LQ2_DEMOTE_ROW] * vc->nb[1]);
        lq2_half * vstage = stage + G * nk; // per-channel values: after the group's keys
        if (p.v_per_channel) {
            memcpy(vstage + (slot % G) * nv, vsrc, (size_t) nv * sizeof(lq2_half));
        } else { // per token: coded now
            ggml_fp16_to_fp32_row(vsrc, vrow, nv);
            char * vdst = (char *) v2->data + slot * vrow_bytes;
            if (ref) {
                lq2_quantize_v_row_ref(vrow, vdst, nv, p.v_bits, p.fit);
            } else {
                lq2_quantize_v_row(vrow, vdst, nv, p.v_bits, p.fit);
            }
        }
        const int32_t * next = i + 1 < n ? d + LQ2_DEMOTE_COLS : NULL;
        const int last_of_group = slot % G == G - 1;
        const int last_of_run   = !next || next[LQ2_DEMOTE_SLOT] < 0 || next[LQ2_DEMOTE_SLOT] / G != grp;
        if (last_of_group || last_of_run) {
            const int n_tok = (int) (slot % G) + 1;
            for (int64_t e = 0; e < n_tok * nk; e++) {
                kgrp[e] = lq2_fp16_to_fp32(stage[e]);
            }
            for (int64_t e = 0; p.v_per_channel && e < n_tok * nv; e++) {
                vgrp[e] = lq2_fp16_to_fp32(vstage[e]);
            }
            char * kdst = (char *) k2->data + grp * group_bytes;
            if (widths) {
                lq2_quantize_k_group_w(kgrp, nk, n_tok, (int) nk, (int) G, widths, p.fit, refs, kdst);
            } else if (ref) {
                lq2_quantize_k_group_ref(kgrp, nk, n_tok, (int) nk, (int) G, p.k_bits, p.fit, refs, kdst);
            } else {
                lq2_quantize_k_group(kgrp, nk, n_tok, (int) nk, (int) G, p.k_bits, p.fit, refs, kdst);
            }
            if (p.v_per_channel) {
                char * vdst = (char *) v2->data + grp * vgroup_bytes;
                if (ref) {
                    lq2_quantize_k_group_ref(vgrp, nv, n_tok, (int) nv, (int) G, p.v_bits, p.fit, vrefs, vdst);
                } else {
                    lq2_quantize_k_group(vgrp, nv, n_tok, (int) nv, (int) G, p.v_bits, p.fit, vrefs, vdst);
                }
            }
        }
    }
    free(vrow);
    free(krow);
    free(kgrp);
}

// ---- attention

// Work items are (token, kv head, part): the query heads sharing a kv head go together (its keys
// are dequantized and re-rotated once for them), and when there are fewer (token, kv head) pairs
// than threads (decode, more so with few kv heads) each pair's tokens are split into parts so
// that no thread repeats another's dequantization. The parts' unnormalized rows and softmax
// state (M, S) go to the work buffer; after a barrier the threads merge them into dst.

static int64_t attn_n_part(const struct ggml_tensor * dst, int nth) {
    struct lq2_attn_op_params p;
    memcpy(&p, dst->op_params, sizeof(p));
    const int64_t n_head_kv = dst->src[1]->ne[1];
    const int64_t pairs     = dst->src[0]->ne[2] * n_head_kv;
    int64_t n_part = (nth + pairs - 1) / pairs;
    n_part = n_part < 1 ? 1 : n_part;
    return n_part < p.n_part_max ? n_part : (p.n_part_max > 0 ? p.n_part_max : 1);
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t) 63; }

// Bytes of one thread's scratch.
static size_t attn_thread_bytes(const struct ggml_tensor * dst) {
    struct lq2_attn_op_params p;
    memcpy(&p, dst->op_params, sizeof(p));
    const struct ggml_tensor * q = dst->src[0];
    struct lq2_attn_params ap = { (int32_t) q->ne[0], (int32_t) q->ne[1], (int32_t) dst->src[1]->ne[1], 0, 0, 0 };
    const int64_t D = q->ne[0], n_head = q->ne[1];
    return align64(lq2_attn_work_size(&ap, p.G, p.rope.n_dims)) +
           align64(sizeof(float) * (size_t) (2 * D * n_head + 2 * n_head)) +
           align64(sizeof(float) * (size_t) (dst->src[1]->ne[2] + dst->src[6]->ne[0]));
}

static size_t attn_parts_bytes(const struct ggml_tensor * dst, int nth) {
    const struct ggml_tensor * q = dst->src[0];
    return align64(sizeof(float) * (size_t) ((q->ne[0] + 2) * q->ne[1] * q->ne[2] * attn_n_part(dst, nth)));
}

size_t ggml_lq2_attn_work_size(const struct ggml_tensor * dst, int n_tasks) {
    return attn_parts_bytes(dst, n_tasks) + (size_t) n_tasks * attn_thread_bytes(dst) + 64;
}

static inline float mask_value(const struct ggml_tensor * m, const char * row, int64_t j) {
    return m->type == GGML_TYPE_F16 ? GGML_CPU_FP16_TO_FP32(((const ggml_fp16_t *) row)[j]) : ((const float *) row)[j];
}

void ggml_compute_forward_lq2_attn(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    struct lq2_attn_op_params op;
    memcpy(&op, dst->op_params, sizeof(op));
    const struct ggml_tensor * q     = dst->src[0]; // f32 [D, n_head, n_tokens]
    const struct ggml_tensor * k     = dst->src[1]; // f16 [D, n_head_kv, n_kv, n_stream]
    const struct ggml_tensor * v     = dst->src[2];
    const struct ggml_tensor * mask  = dst->src[3]; // [n_kv, n_tokens / n_stream, 1, n_stream]
    const struct ggml_tensor * k2    = dst->src[4];
    const struct ggml_tensor * v2    = dst->src[5];
    const struct ggml_tensor * mask2 = dst->src[6]; // f16 [n_slots, >= n_tokens]
    const struct ggml_tensor * rope  = dst->src[7];

    const int ith = params->ith, nth = params->nth;
    const int64_t D         = q->ne[0];
    const int64_t n_head    = q->ne[1];
    const int64_t n_tokens  = q->ne[2];
    const int64_t n_head_kv = k->ne[1];
    const int64_t n_kv      = k->ne[2];
    const int64_t gq        = n_head / n_head_kv;
    // one stream per sequence: the ubatch holds n_tps tokens of each stream in turn (llama.cpp's
    // split_equal), and each reads its stream's f16 tier
    const int64_t n_tps     = n_tokens / k->ne[3];
    const int64_t n_slots   = mask2->ne[0];
    const int64_t G         = op.G;
    const int64_t n_groups  = n_slots / G;
    const float * refs      = dst->src[LQ2_ATTN_SRC_REFS] ? (const float *) dst->src[LQ2_ATTN_SRC_REFS]->data : NULL;
    const int     s8        = refs != NULL;
    const size_t  kg_bytes  = (size_t) (n_head_kv * D) * LQ2_BLOCK_BYTES_H(op.G, op.k_bits, s8);
    const size_t  vrow_bytes = (size_t) (n_head_kv * D / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, op.v_bits);
    const size_t  vg_bytes  = (size_t) (n_head_kv * D) * LQ2_BLOCK_BYTES_H(op.G, op.v_bits, s8);

    const int64_t pairs  = n_tokens * n_head_kv;
    const int64_t n_part = attn_n_part(dst, nth);

    struct lq2_attn_params p;
    p.head_dim  = (int32_t) D;
    p.n_head    = (int32_t) n_head;
    p.n_head_kv = (int32_t) n_head_kv;
    p.scale     = op.scale;
    p.softcap   = op.softcap;
    p.max_bias  = op.max_bias;

    // the work buffer: the parts, then each thread's scratch
    char * wbase = (char *) (((uintptr_t) params->wdata + 63) & ~(uintptr_t) 63);
    float * parts = (float *) wbase;
    const size_t part_stride = (size_t) ((D + 2) * n_head * n_tokens); // floats
    char * mine = wbase + attn_parts_bytes(dst, nth) + (size_t) ith * attn_thread_bytes(dst);
    struct lq2_attn_params ap0 = p;
    void  * work   = mine;
    float * qrow   = (float *) (mine + align64(lq2_attn_work_size(&ap0, op.G, op.rope.n_dims)));
    float * acc    = qrow + D * n_head;
    float * M      = acc + D * n_head;
    float * S      = M + n_head;
    float * mask_a = (float *) ((char *) qrow + align64(sizeof(float) * (size_t) (2 * D * n_head + 2 * n_head)));
    float * mask_b = mask_a + n_kv;

    for (int64_t item = ith; item < pairs * n_part; item += nth) {
        const int64_t t    = item / (n_head_kv * n_part);
        const int64_t hk   = item / n_part % n_head_kv;
        const int64_t part = item % n_part;
        const int     h0   = (int) (hk * gq), h1 = (int) ((hk + 1) * gq);
        // this part's tokens: a share of the f16 cells and of the 2-bit groups
        const int64_t a0 = n_kv * part / n_part, a1 = n_kv * (part + 1) / n_part;
        const int64_t g0 = n_groups * part / n_part, g1 = n_groups * (part + 1) / n_part;
        const int64_t b0 = g0 * G, b1 = g1 * G;

        for (int h = h0; h < h1; h++) {
            const float * src = (const float *) ((const char *) q->data + t * q->nb[2] + h * q->nb[1]);
            memcpy(qrow + h * D, src, D * sizeof(float));
        }
        const char * mrow = (const char *) mask->data + t * mask->nb[1]; // streams' rows are contiguous
        for (int64_t j = a0; j < a1; j++) {
            mask_a[j] = mask_value(mask, mrow, j);
        }
        const ggml_fp16_t * m2 = (const ggml_fp16_t *) ((const char *) mask2->data + t * mask2->nb[1]);
        for (int64_t s = b0; s < b1; s++) {
            mask_b[s] = GGML_CPU_FP16_TO_FP32(m2[s]);
        }

        struct lq2_tier_f16 ta;
        ta.n    = a1 - a0;
        ta.nb_k = k->nb[2];
        ta.nb_v = v->nb[2];
        ta.k    = (const lq2_half *) ((const char *) k->data + (t / n_tps) * k->nb[3] + a0 * k->nb[2]);
        ta.v    = (const lq2_half *) ((const char *) v->data + (t / n_tps) * v->nb[3] + a0 * v->nb[2]);
        ta.mask = mask_a + a0;

        struct lq2_tier_q2 tb;
        tb.n          = b1 - b0;
        tb.G          = op.G;
        tb.k_bits     = op.k_bits;
        tb.v_bits     = op.v_bits;
        tb.k          = (const char *) k2->data + g0 * kg_bytes;
        tb.nb_kg      = kg_bytes;
        tb.v_per_channel = op.v_per_channel;
        tb.v          = (const char *) v2->data + (op.v_per_channel ? g0 * vg_bytes : b0 * vrow_bytes);
        tb.nb_v       = op.v_per_channel ? vg_bytes : vrow_bytes;
        tb.pos        = NULL;
        tb.rope       = op.rope;
        tb.rope_table = rope ? (const lq2_half *) ((const char *) rope->data + g0 * rope->nb[1]) : NULL;
        tb.mask       = mask_b + b0;
        tb.score_correction = op.score_correction;
        tb.k_widths   = dst->src[LQ2_ATTN_SRC_WIDTHS] ? (const int8_t *) dst->src[LQ2_ATTN_SRC_WIDTHS]->data : NULL;
        tb.refs       = refs;

        const int rc = params->use_ref
            ? lq2_attn_partial_ref(&p, qrow, &ta, &tb, h0, h1, acc, M, S, work)
            : lq2_attn_partial(&p, qrow, &ta, &tb, h0, h1, acc, M, S, work);
        GGML_ASSERT(rc == 0 && "LQ2_ATTN: parameters the kernel does not support");
        for (int h = h0; h < h1; h++) {
            float * row = parts + part * part_stride + (t * n_head + h) * (D + 2);
            memcpy(row, acc + h * D, D * sizeof(float));
            row[D]     = M[h];
            row[D + 1] = S[h];
        }
    }

    ggml_barrier(params->threadpool);

    for (int64_t r = ith; r < n_head * n_tokens; r += nth) {
        const int64_t t = r / n_head, h = r % n_head;
        float * out = (float *) ((char *) dst->data + t * dst->nb[2] + h * dst->nb[1]);
        lq2_attn_merge((int) D, (int) n_part, parts + r * (D + 2), part_stride, out);
    }
}

// ---- dequantize (the prefill path)

// Both tiers in f16, for ggml_flash_attn_ext: work items are the 2-bit key groups per kv head,
// then the 2-bit value rows (per-channel values: groups per kv head), then the f16 tier's cells,
// spread over the threads.
// One kv head's G tokens of a dequantized group, channel-major (cm[c * G + t]), into their f16
// rows of the result (keys or values: token t of group g at out + (g * G + t) * row_bytes).
static void group_to_f16_rows(const float * cm, int64_t D, int64_t G, int64_t g, int64_t hk, char * out,
                              size_t row_bytes) {
    for (int64_t t = 0; t < G; t++) {
        ggml_fp16_t * row = (ggml_fp16_t *) (out + (g * G + t) * row_bytes) + hk * D;
        for (int64_t c = 0; c < D; c++) {
            row[c] = GGML_CPU_FP32_TO_FP16(cm[c * G + t]);
        }
    }
}

size_t ggml_lq2_dequant_work_size(const struct ggml_tensor * dst, int n_tasks) {
    struct lq2_dequant_op_params p;
    memcpy(&p, dst->op_params, sizeof(p));
    const int64_t D = dst->ne[0], nv = dst->ne[0] * dst->ne[1];
    return (size_t) n_tasks * sizeof(float) * (size_t) (D * p.G + nv) + 64;
}

void ggml_compute_forward_lq2_dequant(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    struct lq2_dequant_op_params p;
    memcpy(&p, dst->op_params, sizeof(p));
    const struct ggml_tensor * k2   = dst->src[0];
    const struct ggml_tensor * v2   = dst->src[1];
    const struct ggml_tensor * rope = dst->src[2];
    const struct ggml_tensor * k    = dst->src[3];
    const struct ggml_tensor * v    = dst->src[4];
    const int8_t * widths = dst->src[LQ2_DEQUANT_SRC_WIDTHS] ? (const int8_t *) dst->src[LQ2_DEQUANT_SRC_WIDTHS]->data : NULL;
    const float  * refs   = dst->src[LQ2_DEQUANT_SRC_REFS] ? (const float *) dst->src[LQ2_DEQUANT_SRC_REFS]->data : NULL;

    const int ith = params->ith, nth = params->nth;
    const int64_t D = dst->ne[0], n_head_kv = dst->ne[1], nk = D * n_head_kv;
    const int64_t G = p.G, n_groups = p.n_slots / G, n_kv = k->ne[2];
    const int     s8  = refs != NULL;
    const size_t  kbs = (size_t) LQ2_BLOCK_BYTES_H(p.G, p.k_bits, s8);
    const size_t  kg_bytes = (size_t) nk * kbs;
    const size_t  vrow_bytes = (size_t) (nk / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, p.v_bits);
    const size_t  vbs = (size_t) LQ2_BLOCK_BYTES_H(p.G, p.v_bits, s8); // per-channel values
    const size_t  row_bytes = (size_t) nk * sizeof(ggml_fp16_t); // one token, all kv heads

    char * kout = (char *) dst->data;                // keys: token t at kout + t * row_bytes
    char * vout = (char *) dst->data + dst->nb[3];   // values likewise
    float * kbuf = (float *) ((char *) params->wdata + (size_t) ith * sizeof(float) * (size_t) (D * G + nk));
    float * vbuf = kbuf + D * G;
    const int ref = params->use_ref;

    const int64_t n_kitems = n_groups * n_head_kv;
    const int64_t n_vitems = p.v_per_channel ? n_groups * n_head_kv : p.n_slots;
    const int64_t n_items  = n_kitems + n_vitems + n_kv;
    for (int64_t item = ith; item < n_items; item += nth) {
        if (item < n_kitems) {
            const int64_t g = item / n_head_kv, hk = item % n_head_kv;
            const char * kg = (const char *) k2->data + g * kg_bytes + (size_t) hk * D * kbs;
            const lq2_half * cs = rope ? (const lq2_half *) ((const char *) rope->data + g * rope->nb[1]) : NULL;
            const int8_t * kw = widths ? widths + hk * D : NULL;
            const float  * kr = refs ? refs + 2 * hk * D : NULL;
            if (ref) {
                lq2_keys_group_cm_ref(kg, (int) D, (int) G, p.k_bits, kw, kr, &p.rope, cs, kbuf);
            } else {
                lq2_keys_group_cm(kg, (int) D, (int) G, p.k_bits, kw, kr, &p.rope, cs, kbuf);
            }
            group_to_f16_rows(kbuf, D, G, g, hk, kout, row_bytes);
        } else if (item < n_kitems + n_vitems && p.v_per_channel) {
            const int64_t g = (item - n_kitems) / n_head_kv, hk = (item - n_kitems) % n_head_kv;
            const char * vg = (const char *) v2->data + (g * nk + hk * D) * vbs;
            const float * vr = refs ? refs + 2 * (nk + hk * D) : NULL; // after the keys'
            if (ref) {
                lq2_dequantize_k_group_cm_ref(vg, (int) D, (int) G, p.v_bits, vr, kbuf);
            } else {
                lq2_dequantize_k_group_cm(vg, (int) D, (int) G, p.v_bits, vr, kbuf);
            }
            group_to_f16_rows(kbuf, D, G, g, hk, vout, row_bytes);
        } else if (item < n_kitems + n_vitems) {
            const int64_t s = item - n_kitems;
            const char * vr = (const char *) v2->data + s * vrow_bytes;
            if (ref) {
                lq2_dequantize_v_row_ref(vr, vbuf, nk, p.v_bits);
            } else {
                lq2_dequantize_v_row(vr, vbuf, nk, p.v_bits);
            }
            ggml_cpu_fp32_to_fp16(vbuf, (ggml_fp16_t *) (vout + s * row_bytes), nk);
        } else {
            const int64_t j = item - n_kitems - n_vitems;
            memcpy(kout + (p.n_slots + j) * row_bytes, (const char *) k->data + j * k->nb[2], row_bytes);
            memcpy(vout + (p.n_slots + j) * row_bytes, (const char *) v->data + j * v->nb[2], row_bytes);
        }
    }
}
