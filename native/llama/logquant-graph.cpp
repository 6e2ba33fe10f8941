#include "logquant-graph.h"

#include "logquant-cache.h"
#include "lq2-op-params.h"

#include "llama-batch.h"
#include "llama-hparams.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"

#include <cmath>
#include <cstdlib>
#include <vector>

static constexpr int64_t LQ_PAD = 256; // rows and slots: one graph shape for many decode steps

static int64_t pad_up(int64_t n, int64_t to) { return (std::max<int64_t>(n, 1) + to - 1) / to * to; }

static int64_t padded_rows(const logquant_cache * lq) { return pad_up((int64_t) lq->pending.size(), LQ_PAD); }

// Slots the attention scans: those in use, rounded up within the tier (a multiple of G).
static int64_t padded_slots(const logquant_cache * lq) {
    return std::min(pad_up(lq->bk.n_slots, LQ_PAD), lq->n_slot_capacity());
}

static logquant_cache * logquant_of(const llama_memory_context_i * mctx) {
    if (const auto * kv = dynamic_cast<const llama_kv_cache_context *>(mctx)) {
        return kv->get_logquant();
    }
    if (const auto * iswa = dynamic_cast<const llama_kv_cache_iswa_context *>(mctx)) {
        return iswa->get_base()->get_logquant();
    }
    return nullptr;
}

void llm_graph_input_logquant::set_input(const llama_ubatch * ubatch) {
    // the demotion list, padding rows last (slot -1)
    std::vector<int32_t> rows((size_t) ggml_nelements(demotions), -1);
    for (size_t i = 0; i < lq->pending.size(); i++) {
        const auto & d = lq->pending[i];
        int32_t * r = rows.data() + i * LQ2_DEMOTE_COLS;
        r[LQ2_DEMOTE_ROW]   = (int32_t) d.row;
        r[LQ2_DEMOTE_POS]   = d.pos;
        r[LQ2_DEMOTE_SLOT]  = (int32_t) d.slot;
        r[LQ2_DEMOTE_STAGE] = d.stage;
    }
    ggml_backend_tensor_set(demotions, rows.data(), 0, ggml_nbytes(demotions));

    // the 2-bit tier's mask: a query token sees the slots of its sequence at positions up to its
    // own (the first of its sequences, as llama.cpp's mask); freed, unfilled and padding slots
    // are hidden
    const int64_t n_slots = mask2->ne[0];
    const auto & bk = lq->bk;
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), hidden = ggml_fp32_to_fp16(-INFINITY);
    std::vector<ggml_fp16_t> m((size_t) ggml_nelements(mask2), hidden);
    for (uint32_t t = 0; t < ubatch->n_tokens; t++) {
        const int32_t qpos = ubatch->pos[t];
        const int32_t qseq = ubatch->seq_id[t][0];
        ggml_fp16_t * row = m.data() + (size_t) t * n_slots;
        for (int64_t s = 0; s < std::min<int64_t>(n_slots, bk.n_slots); s++) {
            const int32_t kp = bk.slot_pos[s];
            if (kp >= 0 && kp <= qpos && bk.slot_seq.test(s, qseq)) {
                row[s] = max_bias > 0.0f ? ggml_fp32_to_fp16(-(float) std::abs(qpos - kp)) : zero;
            }
        }
    }
    ggml_backend_tensor_set(mask2, m.data(), 0, ggml_nbytes(mask2));

    lq->upload_rope_tables();
    lq->upload_layer_constants();
}

bool llm_graph_input_logquant::can_reuse(const llm_graph_params & params) {
    return logquant_of(params.mctx) == lq && demotions->ne[1] == padded_rows(lq) &&
           mask2->ne[0] == padded_slots(lq) && mask2->ne[1] == (int64_t) params.ubatch.n_tokens;
}

logquant_attn_nodes logquant_build_attn(ggml_context * ctx, ggml_cgraph * gf, llm_graph_result * res,
                                  llm_graph_input_logquant *& inp, logquant_cache * lq, int32_t il,
                                  const llama_ubatch & ubatch, const llama_hparams & hparams,
                                  ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, ggml_tensor * kq_mask,
                                  ggml_tensor * k_written, ggml_tensor * v_written, float kq_scale) {
    GGML_ASSERT(k_written && v_written && "the LogQuant cache needs this layer's own K and V");
    GGML_ASSERT(q->type == GGML_TYPE_F32 && k->type == GGML_TYPE_F16 && v->type == GGML_TYPE_F16);
    if (!inp) {
        auto made = std::make_unique<llm_graph_input_logquant>(lq, hparams.f_max_alibi_bias);
        made->demotions = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, LQ2_DEMOTE_COLS, padded_rows(lq));
        made->mask2     = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, padded_slots(lq), ubatch.n_tokens);
        ggml_set_input(made->demotions);
        ggml_set_input(made->mask2);
        ggml_set_name(made->demotions, "lq_inp_demotions");
        ggml_set_name(made->mask2, "lq_inp_mask2");
        inp = (llm_graph_input_logquant *) res->add_input(std::move(made));
    }
    const auto & l = lq->layer_at(il);

    lq2_demote_op_params dp = {};
    dp.G         = lq->G;
    dp.k_bits    = l.k_bits;
    dp.v_bits    = l.v_bits;
    dp.n_head_kv = (int32_t) l.n_head_kv;
    dp.fit       = lq->fit();
    dp.rope      = lq->rope;
    dp.v_per_channel = l.v_per_channel;
    ggml_tensor * demoted = ggml_lq2_demote(ctx, l.k2, l.v2, l.staging, k_written, v_written, inp->demotions,
                                            &dp, sizeof(dp));
    if (l.widths) {
        ggml_lq2_set_key_widths(demoted, l.widths);
    }
    if (l.refs) {
        ggml_lq2_set_header_refs(demoted, l.refs);
    }
    ggml_format_name(demoted, "lq_demote_l%d", il);
    ggml_build_forward_expand(gf, demoted);

    logquant_attn_nodes nodes;
    const int32_t fa_min = lq->prefill_fa_min();
    if (fa_min > 0 && q->ne[2] >= fa_min && k->ne[3] == 1) {
        lq2_dequant_op_params qp = {};
        qp.G       = lq->G;
        qp.k_bits  = l.k_bits;
        qp.v_bits  = l.v_bits;
        qp.n_slots = (int32_t) inp->mask2->ne[0];
        qp.rope    = lq->rope;
        qp.v_per_channel = l.v_per_channel;
        ggml_tensor * both = ggml_lq2_dequant(ctx, demoted, l.v2, l.rope, k, v, &qp, sizeof(qp));
        if (l.widths) {
            ggml_lq2_set_key_widths(both, l.widths);
        }
        if (l.refs) {
            ggml_lq2_set_header_refs(both, l.refs);
        }
        ggml_format_name(both, "lq_dequant_l%d", il);
        nodes.k = ggml_view_4d(ctx, both, both->ne[0], both->ne[1], both->ne[2], 1, both->nb[1], both->nb[2],
                               both->nb[3], 0);
        nodes.v = ggml_view_4d(ctx, both, both->ne[0], both->ne[1], both->ne[2], 1, both->nb[1], both->nb[2],
                               both->nb[3], both->nb[3]);
        ggml_tensor * m2 = ggml_reshape_4d(ctx, inp->mask2, inp->mask2->ne[0], inp->mask2->ne[1], 1, 1);
        nodes.kq_mask = ggml_concat(ctx, m2, kq_mask, 0);
        return nodes;
    }

    // parts per (token, kv head): enough for 16 threads to share a decode step
    const int64_t pairs = q->ne[2] * l.n_head_kv;
    lq2_attn_op_params ap = {};
    ap.scale      = kq_scale;
    ap.max_bias   = hparams.f_max_alibi_bias;
    ap.softcap    = hparams.attn_soft_cap ? hparams.f_attn_logit_softcapping : 0.0f;
    ap.G          = lq->G;
    ap.k_bits     = l.k_bits;
    ap.v_bits     = l.v_bits;
    ap.n_part_max = (int32_t) std::min<int64_t>(8, (16 + pairs - 1) / pairs);
    ap.rope       = lq->rope;
    ap.score_correction = lq->score_correction();
    ap.v_per_channel    = l.v_per_channel;
    // k2 through the demote node: the attention runs after it
    ggml_tensor * out = ggml_lq2_attn(ctx, q, k, v, kq_mask, demoted, l.v2, inp->mask2, l.rope, &ap, sizeof(ap));
    if (l.widths) {
        ggml_lq2_set_key_widths(out, l.widths);
    }
    if (l.refs) {
        ggml_lq2_set_header_refs(out, l.refs);
    }
    ggml_format_name(out, "lq_attn_l%d", il);
    nodes.out = ggml_reshape_2d(ctx, out, q->ne[0] * q->ne[1], q->ne[2]);
    return nodes;
}
