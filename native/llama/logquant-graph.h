// logquant-graph.h: the LogQuant part of llama.cpp's attention graph (called from build_attn by
// patch 0005).
//
// Per layer two ggml ops: GGML_OP_LQ2_DEMOTE quantizes the tokens leaving the f16 tier into the
// 2-bit stores right after the ubatch's K/V rows are written, and GGML_OP_LQ2_ATTN reads both
// tiers in one online softmax. What changes per ubatch reaches them as graph inputs, set like
// llama.cpp's own (set_input) and shared by every layer of the graph: the demotion list and the
// 2-bit tier's mask. Both are padded (rows to 256, slots to 256, within the tier's capacity) so
// that decode steps keep one graph shape and llama.cpp can reuse the graph.
#pragma once

#include "llama-graph.h"

class logquant_cache;
struct llama_hparams;

class llm_graph_input_logquant : public llm_graph_input_i {
public:
    llm_graph_input_logquant(logquant_cache * lq, float max_bias) : lq(lq), max_bias(max_bias) {}

    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;

    logquant_cache * lq;
    const float      max_bias;             // ALiBi: the 2-bit mask holds minus the distance
    ggml_tensor *    demotions = nullptr;  // I32 [LQ2_DEMOTE_COLS, n_rows] (lq2-op-params.h)
    ggml_tensor *    mask2     = nullptr;  // F16 [n_slots, n_tokens]: 0, -inf, or -|q pos - k pos|
};

// What logquant_build_attn made: the attention's result, or (prefill) both tiers in f16 and their
// mask, for the caller to run its own attention over (build_attn_mha: ggml_flash_attn_ext).
struct logquant_attn_nodes {
    ggml_tensor * out     = nullptr; // [D * n_head, n_tokens], like build_attn_mha's
    ggml_tensor * k       = nullptr; // F16 [D, n_head_kv, n_slots + n_kv, 1]: the 2-bit tier, then the f16 tier
    ggml_tensor * v       = nullptr;
    ggml_tensor * kq_mask = nullptr; // F16 [n_slots + n_kv, n_tokens, 1, 1]
};

// One layer's attention through a LogQuant cache: the demote node (after k_written / v_written,
// the results of cpy_k / cpy_v), then either the fused two-tier attention over q, the f16 tier's
// views k / v with their kq_mask and the layer's 2-bit tier (decode, small ubatches), or both
// tiers dequantized to f16 beside each other (ubatches of prefill_fa_min tokens or more: ggml's
// flash attention then runs with tensor cores / tiles where a backend has them). inp: the
// graph's LogQuant inputs, created by the first layer that asks (llm_graph_context keeps the
// pointer for the rest).
logquant_attn_nodes logquant_build_attn(ggml_context * ctx, ggml_cgraph * gf, llm_graph_result * res,
                                  llm_graph_input_logquant *& inp, logquant_cache * lq, int32_t il,
                                  const llama_ubatch & ubatch, const llama_hparams & hparams,
                                  ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, ggml_tensor * kq_mask,
                                  ggml_tensor * k_written, ggml_tensor * v_written, float kq_scale);
