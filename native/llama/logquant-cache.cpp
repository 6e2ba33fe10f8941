// logquant-cache.cpp: a LogQuant cache's construction (settings checked, RoPE handling chosen, the
// 2-bit tier sized), what it refuses (models, devices), its tensors per layer, and its figures.
// The slot bookkeeping is in logquant-slots.cpp, the state in logquant-state.cpp, the graph in
// logquant-graph.cpp.
#include "logquant-cache.h"

#include "lq2-attn.h"
#include "lq2-format.h"
#include "lq2-op-params.h"

#include "llama-cparams.h"
#include "llama-hparams.h"
#include "llama-impl.h"
#include "llama-kv-cells.h"
#include "llama-model.h"

#include <algorithm>
#include <cstring>
#include <string>

// ---------------------------------------------------------------------------------------------
// construction

logquant_cache::logquant_cache(const llama_model & model, const llama_hparams & hparams, uint32_t kv_size,
                               uint32_t n_seq_max, bool unified, const std::function<bool(int32_t)> & holds_layer)
    : logquant_cache(logquant_settings_current(), model, hparams, kv_size, n_seq_max, unified, holds_layer) {}

// One read of the settings (they may change between two reads by another thread's C API call).
logquant_cache::logquant_cache(const logquant_settings & s, const llama_model & model, const llama_hparams & hparams,
                               uint32_t kv_size, uint32_t n_seq_max, bool unified,
                               const std::function<bool(int32_t)> & holds_layer)
    : G(s.key_group), n_stream(unified ? 1 : std::max(1u, n_seq_max)), settings(s), kv_size(kv_size),
      // without a context (none of llama.cpp's callers), llama.cpp's default ubatch
      n_ubatch(logquant_context_cparams() ? logquant_context_cparams()->n_ubatch : 512u), capacity(kv_size * n_stream + n_ubatch),
      n_seq_max(std::max(1u, n_seq_max)) {
    const llama_cparams * cp = logquant_context_cparams();
    if (!settings.layer_bits_error.empty()) {
        refuse("cannot read LOGQUANT_LAYER_BITS=\"" + settings.layer_bits_error +
               "\": write il:key_bits:value_bits,... e.g. 0:8:8,1:4:4");
    }
    if (settings.window < 1) {
        refuse("window must be >= 1, got " + std::to_string(settings.window));
    }
    bool bits_ok = LQ2_KEY_BITS_VALID(settings.key_bits) && LQ2_BITS_VALID(settings.value_bits);
    bool any_k3  = settings.key_bits == 3;
    for (const auto & lb : settings.layer_bits) {
        bits_ok = bits_ok && lb.il >= 0 && LQ2_KEY_BITS_VALID(lb.key_bits) && LQ2_BITS_VALID(lb.value_bits);
        any_k3  = any_k3 || lb.key_bits == 3;
    }
    if (!bits_ok) {
        refuse("code bits must be 2, 4 or 8, and key bits may also be 3 (LOGQUANT_KEY_BITS, LOGQUANT_VALUE_BITS, "
               "LOGQUANT_LAYER_BITS=il:k:v,...)");
    }
    if (any_k3 && !settings.key_widths) {
        refuse("3-bit keys are mixed key widths (0, 2 or 4 bits per channel, a mean of 3): they need "
               "key widths \"auto\", not \"uniform\"");
    }
    bool group_ok = lq2_key_bits_ok(G, settings.key_bits, 1);
    for (const auto & lb : settings.layer_bits) {
        group_ok = group_ok && lq2_key_bits_ok(G, lb.key_bits, 1);
    }
    if (!group_ok) {
        refuse("key group " + std::to_string(G) + " is not available: keys come in groups of 32, 64 or 128 tokens");
    }

    // Keys are stored before RoPE when we can undo and redo the graph's RoPE exactly: plain
    // NORM/NEOX rotation with the context's base and scale (its overrides, not the trained values),
    // without YaRN or per-frequency factors. Otherwise they are stored as the cache holds them,
    // after RoPE: the explicit fallback. A model without RoPE (ALiBi) has nothing to undo.
    rope = {};
    no_rope = hparams.rope_type == LLAMA_ROPE_TYPE_NONE;
    const float freq_base   = cp ? cp->rope_freq_base  : hparams.rope_freq_base_train;
    const float freq_scale  = cp ? cp->rope_freq_scale : hparams.rope_freq_scale_train;
    const bool  yarn        = cp ? cp->yarn_ext_factor != 0.0f
                                        : hparams.rope_scaling_type_train == LLAMA_ROPE_SCALING_TYPE_YARN;
    const float attn_factor = cp ? cp->yarn_attn_factor : 1.0f;
    const bool plain_rope = (hparams.rope_type == LLAMA_ROPE_TYPE_NORM || hparams.rope_type == LLAMA_ROPE_TYPE_NEOX) &&
                            !yarn && model.layers.size() > 0 && model.layers[0].rope_freqs == nullptr;
    if (no_rope) {
        // keys are position-free: grouped per channel as they are, and shifts only move positions
    } else if (plain_rope && !settings.keys_post_rope) {
        rope.mode        = hparams.rope_type == LLAMA_ROPE_TYPE_NEOX ? LQ2_ROPE_NEOX : LQ2_ROPE_NORMAL;
        rope.n_dims      = (int32_t) hparams.n_rot();
        rope.freq_base   = freq_base;
        rope.freq_scale  = freq_scale;
        rope.attn_factor = attn_factor;
    } else if (settings.keys_post_rope) {
        LLAMA_LOG_INFO("%s: keys grouped per channel AFTER RoPE, as asked (LOGQUANT_KEYS_POST_ROPE)\n", __func__);
    } else {
        LLAMA_LOG_WARN("%s: this context's RoPE is not plain NORM/NEOX (%s): 2-bit keys are grouped per channel "
                       "AFTER RoPE (lower quality than pre-RoPE; no context shift)\n", __func__,
                       yarn ? "YaRN" : "rope type or frequency factors");
    }
    std::map<int32_t, logquant_unit_weights> unit_weights_of; // read by layer bits "auto", kept for the widths
    if (settings.layer_bits_auto) {
        std::string note, ranking;
        const std::vector<int32_t> picked = logquant_auto_key_layers(model, hparams, settings, rope, no_rope,
                                                                     holds_layer, note, ranking, unit_weights_of);
        std::string names;
        for (int32_t il : picked) {
            settings.layer_bits.push_back({il, 3, settings.value_bits});
            names += " " + std::to_string(il);
        }
        if (!note.empty() && picked.empty()) { // asked for and not applied
            LLAMA_LOG_WARN("%s: %s\n", __func__, note.c_str());
        } else if (!note.empty()) { // a size estimate: the bytes are right, the layers may not be
            LLAMA_LOG_INFO("%s: %s\n", __func__, note.c_str());
        }
        LLAMA_LOG_INFO("%s: layer bits auto: 3-bit keys for layer(s)%s\n", __func__, names.empty() ? " (none)" : names.c_str());
        LLAMA_LOG_INFO("%s: layer bits auto: predicted gain of 3-bit keys by layer: %s\n", __func__, ranking.c_str());
    }
    if (any_k3 && rope.n_dims == 0 && !no_rope) {
        refuse("3-bit keys are mixed key widths, which need keys stored before RoPE (this context's RoPE is not "
               "plain NORM/NEOX); use 2- or 4-bit keys");
    }
    if (settings.key_widths && rope.n_dims == 0 && !no_rope) {
        LLAMA_LOG_WARN("%s: keys grouped after RoPE keep uniform widths (mixed key widths need pre-RoPE keys)\n",
                       __func__);
    } else if (settings.key_widths) {
        std::string why; // why some layers could not have them (one message for all)
        int32_t n_without = 0, n_by_frequency = 0;
        for (int32_t il = 0; il < (int32_t) model.layers.size(); il++) {
            if (!holds_layer(il)) {
                continue; // another cache's layer (Gemma 3's sliding-window ones stay f16, patch 0006)
            }
            const int32_t kb = settings.bits_of(il).first;
            if (kb != 2 && kb != 3 && kb != 4) {
                continue; // 8-bit keys stay uniform
            }
            std::string why_il;
            const auto known = unit_weights_of.find(il);
            std::vector<int8_t> w = logquant_key_widths(model, hparams, il, kb, rope, why_il,
                                                        known != unit_weights_of.end() ? &known->second : nullptr);
            why = why_il.empty() ? why : why_il;
            if (w.empty() && kb == 3) {
                refuse("layer " + std::to_string(il) + " cannot have 3-bit keys: " + why_il);
            }
            n_by_frequency += kb == 3 && !why_il.empty(); // widths by a fixed rule, not the weights
            if (w.empty()) {
                n_without++;
                continue;
            }
            if (std::all_of(w.begin(), w.end(), [kb](int8_t b) { return b == kb; })) {
                continue; // channels that matter alike: uniform widths are the allocation
            }
            key_widths_of[il] = std::move(w);
        }
        if (n_without > 0) {
            LLAMA_LOG_WARN("%s: %d layers keep uniform key widths: no mixed ones (%s)\n", __func__, n_without,
                           why.c_str());
        }
        if (n_by_frequency > 0) {
            LLAMA_LOG_WARN("%s: %d layers of 3-bit keys take their widths by RoPE frequency (%s)\n", __func__,
                           n_by_frequency, why.c_str());
        }
    }
    if (settings.scale_bits != 8 && settings.scale_bits != 16) {
        refuse("scale bits must be 16 (f16 scales and minimums) or 8, got " + std::to_string(settings.scale_bits));
    }
    if (settings.scale_bits == 8 && rope.n_dims == 0 && !no_rope) {
        refuse("8-bit scales are relative to each key channel's reference, which needs keys stored before RoPE "
               "(this context's RoPE is not plain NORM/NEOX, or keys_post_rope was asked); use scale bits 16");
    }
    if (settings.scale_bits == 8) {
        std::string why;
        int32_t n_without = 0;
        for (int32_t il = 0; il < (int32_t) model.layers.size(); il++) {
            if (!holds_layer(il)) {
                continue;
            }
            std::vector<float> r = logquant_header_refs(model, hparams, il, settings.value_per_channel != 0, why);
            if (r.empty()) {
                n_without++;
                continue;
            }
            header_refs_of[il] = std::move(r);
        }
        if (n_without > 0) { // a size estimate on unloaded weights, or a fused QKV projection
            LLAMA_LOG_WARN("%s: %d layers keep f16 scales: no 8-bit ones (%s)\n", __func__, n_without, why.c_str());
        }
    }
    // Each sequence may hold a partial group open; a sequence reaches the 2-bit tier only past 2W
    // tokens, which bounds how many can at once.
    const int64_t n_open_max = std::min<int64_t>(this->n_seq_max, capacity / (2 * (int64_t) settings.window + 1) + 1);
    n_groups = (capacity + G - 1) / G + n_open_max;
    bk.init(n_groups, G, this->n_seq_max, (int32_t) n_open_max);
    std::string overrides;
    for (const auto & lb : settings.layer_bits) {
        overrides += " " + std::to_string(lb.il) + ":" + std::to_string(lb.key_bits) + ":" + std::to_string(lb.value_bits);
    }
    LLAMA_LOG_INFO("%s: LogQuant cache: window %d, policy %s, low-bit tier %u tokens, keys %s RoPE in groups "
                   "of %d, bits K %d V %d%s%s%s, values grouped per %s%s\n", __func__, settings.window,
                   settings.policy == LOGQUANT_POLICY_LOG ? "log" : "window", capacity,
                   rope.n_dims > 0 ? "before" : no_rope ? "without" : "after", G, settings.key_bits, settings.value_bits,
                   overrides.empty() ? "" : ", layers il:K:V", overrides.c_str(),
                   key_widths_of.empty() ? "" : ", mixed key widths (0/b/2b bits per channel, 0/2/4 for 3-bit keys)",
                   settings.value_per_channel ? "channel" : "token",
                   header_refs_of.empty() ? "" : ", 8-bit scales and minimums");
}

std::string logquant_cache::check_supported(const llama_model & model, const llama_hparams & hparams, bool v_trans,
                                            bool reuses_kv) const {
    if (!hparams.causal_attn) {
        return "the model's attention is not causal (the 2-bit tier is read causally)";
    }
    for (const auto & layer : model.layers) {
        if (layer.attn_sinks) {
            return "the model's attention has sinks (gpt-oss and similar), which the 2-bit attention does not "
                   "handle yet; use kv_type f16, q8_0 or q4_0";
        }
    }
    if (reuses_kv) {
        return "some layers of this model reuse another layer's KV cache (Gemma 3n / Gemma 4), which the 2-bit "
               "tier does not handle yet; use kv_type f16, q8_0 or q4_0";
    }
    if (v_trans) {
        return "the LogQuant cache needs flash attention (flash_attn=True)";
    }
    if (hparams.n_embd_head_k() % LQ2_QK_V != 0 || hparams.n_embd_head_v() % LQ2_QK_V != 0) {
        return "head size " + std::to_string(hparams.n_embd_head_k()) + " is not a multiple of 64";
    }
    if (hparams.n_embd_head_k() > LQ2_ATTN_MAX_D || hparams.n_embd_head_k() != hparams.n_embd_head_v()) {
        return "head sizes K " + std::to_string(hparams.n_embd_head_k()) + " / V " +
               std::to_string(hparams.n_embd_head_v()) + " are not supported (equal, <= 512)";
    }
    return {};
}

// Whether the device's backend runs the three ops with one layer's shapes (supports_op only looks
// at the nodes: the probe's tensors are never allocated).
bool logquant_cache::device_takes_layer(ggml_backend_dev_t dev, const layer & l) const {
    const int64_t D = l.n_embd_k_gqa / l.n_head_kv, n_kv = 256, n_slots = std::min<int64_t>(256, n_groups * G);
    ggml_init_params ip = { 18 * ggml_tensor_overhead(), nullptr, /*no_alloc =*/ true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * k2  = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, ggml_nelements(l.k2));
    ggml_tensor * v2  = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, ggml_nelements(l.v2));
    ggml_tensor * st  = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, l.staging->ne[0], l.staging->ne[1]);
    ggml_tensor * k   = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, D, l.n_head_kv, n_kv, 1);
    ggml_tensor * v   = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, D, l.n_head_kv, n_kv, 1);
    ggml_tensor * kr  = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, l.n_embd_k_gqa, n_kv);
    ggml_tensor * vr  = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, l.n_embd_v_gqa, n_kv);
    ggml_tensor * rws = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, LQ2_DEMOTE_COLS, 256);
    ggml_tensor * q   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, l.n_head, 1); // the layer's query heads
    ggml_tensor * m   = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, n_kv, 1, 1, 1);
    ggml_tensor * m2  = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_slots, 1);
    ggml_tensor * tab = rope.n_dims > 0 ? ggml_new_tensor_2d(ctx, GGML_TYPE_F16, (int64_t) rope.n_dims * G, n_groups)
                                        : nullptr;
    lq2_demote_op_params dp = { G, l.k_bits, l.v_bits, (int32_t) l.n_head_kv, rope, settings.fit, l.v_per_channel };
    lq2_attn_op_params   ap = { 1.0f, 0.0f, 0.0f, G, l.k_bits, l.v_bits, 1, rope, settings.score_correction,
                                l.v_per_channel };
    ggml_tensor * dem  = ggml_lq2_demote(ctx, k2, v2, st, kr, vr, rws, &dp, sizeof(dp));
    ggml_tensor * attn = ggml_lq2_attn(ctx, q, k, v, m, dem, v2, m2, tab, &ap, sizeof(ap));
    lq2_dequant_op_params qp = { G, l.k_bits, l.v_bits, (int32_t) n_slots, rope, l.v_per_channel };
    ggml_tensor * deq  = ggml_lq2_dequant(ctx, dem, v2, tab, k, v, &qp, sizeof(qp));
    if (l.widths) {
        ggml_tensor * w = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, l.n_embd_k_gqa);
        ggml_lq2_set_key_widths(dem, w);
        ggml_lq2_set_key_widths(attn, w);
        ggml_lq2_set_key_widths(deq, w);
    }
    if (l.refs) {
        ggml_tensor * r = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 2, l.refs->ne[1]);
        ggml_lq2_set_header_refs(dem, r);
        ggml_lq2_set_header_refs(attn, r);
        ggml_lq2_set_header_refs(deq, r);
    }
    const bool ok = ggml_backend_dev_supports_op(dev, dem) && ggml_backend_dev_supports_op(dev, attn) &&
                    ggml_backend_dev_supports_op(dev, deq);
    ggml_free(ctx);
    return ok;
}

// Bytes of the values of one group's G slots, all channels: per channel, G-code blocks of the key
// types (8-bit headers when s8); per token, 64-channel value blocks.
static size_t value_group_bytes(bool per_channel, int32_t G, uint32_t n_embd_v_gqa, int32_t v_bits, bool s8) {
    return per_channel ? (size_t) n_embd_v_gqa * LQ2_BLOCK_BYTES_H(G, v_bits, s8)
                       : (size_t) G * (n_embd_v_gqa / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, v_bits);
}

std::string logquant_cache::check_device(ggml_backend_dev_t dev) {
    if (!dev) {
        return {};
    }
    for (auto & l : layers) { // every layer: head counts, code widths and value grouping may differ
        if (!device_takes_layer(dev, l)) {
            return std::string("the ") + ggml_backend_dev_name(dev) + " backend does not run the LogQuant ops "
                   "(GGML_OP_LQ2_*) for layer " + std::to_string(l.il) + " in this build: keep the KV cache in host "
                   "memory (offload_kqv=False, or n_gpu_layers=0), or build with CMAKE_ARGS=\"-DGGML_CUDA=ON "
                   "-DLOGQUANT_CUDA=ON\" (CUDA) / \"-DGGML_METAL=ON -DLOGQUANT_METAL=ON\" and LOGQUANT_METAL=1 "
                   "(Metal); those kernels have not run on a GPU yet";
        }
    }
    // the automatic prefill path: flash attention on the GPUs our kernels are for (an RPC device
    // also says GPU, but its server may well run the ops on a CPU)
    const char * reg = ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev));
    on_gpu = on_gpu || std::strcmp(reg, "CUDA") == 0 || std::strcmp(reg, "MTL") == 0;
    return {};
}

uint32_t logquant_cache::f16_cells(uint32_t kv_size_requested, uint32_t n_pad) const {
    const uint64_t seqs_per_stream = n_stream == 1 ? n_seq_max : 1;
    const uint64_t need = 3ull * (uint64_t) settings.window * seqs_per_stream + (uint64_t) n_ubatch;
    const uint64_t padded = (need + n_pad - 1) / n_pad * n_pad;
    return (uint32_t) std::min<uint64_t>(kv_size_requested, padded);
}

void logquant_cache::bind(std::vector<llama_kv_cells> & cells, const std::vector<uint32_t> & seq_stream,
                          uint32_t size) {
    GGML_ASSERT(cells.size() == n_stream);
    v_cells       = &cells;
    seq_to_stream = &seq_stream;
    stream_size   = size;
}

llama_kv_cells & logquant_cache::cells_of(int32_t seq_id) const {
    return (*v_cells)[(*seq_to_stream)[seq_id]];
}

void logquant_cache::add_layer(ggml_context * ctx, int32_t il, uint32_t n_embd_k_gqa, uint32_t n_embd_v_gqa,
                               uint32_t n_head_kv, uint32_t n_head) {
    layer l;
    l.il           = il;
    l.n_embd_k_gqa = n_embd_k_gqa;
    l.n_embd_v_gqa = n_embd_v_gqa;
    l.n_head_kv    = n_head_kv;
    l.n_head       = n_head;
    std::tie(l.k_bits, l.v_bits) = settings.bits_of(il);
    l.v_per_channel = settings.value_per_channel && lq2_key_type_b(G, l.v_bits) >= 0;
    // 8-bit headers: the references of the key channels, and of the value channels when those are
    // grouped per channel (this layer's value bits may have left them per token)
    l.refs = nullptr;
    if (auto it = header_refs_of.find(il); it != header_refs_of.end() && it->second.size() >= 2 * (size_t) n_embd_k_gqa) {
        l.refs_host = it->second;
        l.refs_host.resize(2 * (size_t) (n_embd_k_gqa + (l.v_per_channel ? n_embd_v_gqa : 0)));
        l.refs = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 2, (int64_t) l.refs_host.size() / 2);
        ggml_format_name(l.refs, "cache_k2_refs_l%d", il);
    }
    l.k_group_bytes = (size_t) n_embd_k_gqa * LQ2_BLOCK_BYTES_H(G, l.k_bits, l.refs != nullptr);
    l.v_group_bytes = value_group_bytes(l.v_per_channel, G, n_embd_v_gqa, l.v_bits, l.refs != nullptr);
    l.k2 = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, n_groups * (int64_t) l.k_group_bytes);
    l.v2 = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, n_groups * (int64_t) l.v_group_bytes);
    l.staging = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, // f16: lq2-demote-block.h says why
                                   (int64_t) G * (n_embd_k_gqa + (l.v_per_channel ? n_embd_v_gqa : 0)), bk.n_stage);
    ggml_format_name(l.k2, "cache_k2_l%d", il);
    ggml_format_name(l.v2, "cache_v2_l%d", il);
    ggml_format_name(l.staging, "cache_k2_staging_l%d", il);
    // one cos/sin table per buffer the layers live in, shared by its layers
    l.widths = nullptr;
    if (auto it = key_widths_of.find(il); it != key_widths_of.end() && it->second.size() == n_embd_k_gqa) {
        l.widths_host = it->second;
        l.widths = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, n_embd_k_gqa);
        ggml_format_name(l.widths, "cache_k2_widths_l%d", il);
    }
    l.rope = nullptr;
    if (rope.n_dims > 0) {
        auto it = rope_tables.find(ctx);
        if (it == rope_tables.end()) {
            ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, (int64_t) rope.n_dims * G, n_groups);
            ggml_format_name(t, "cache_k2_rope_%zu", rope_tables.size());
            it = rope_tables.emplace(ctx, t).first;
        }
        l.rope = it->second;
    }
    layer_of[il] = layers.size();
    layers.push_back(std::move(l));
}

void logquant_cache::upload_layer_constants() {
    if (constants_uploaded) {
        return;
    }
    for (const auto & l : layers) {
        if (l.widths && l.widths->buffer) {
            ggml_backend_tensor_set(l.widths, l.widths_host.data(), 0, l.widths_host.size());
        }
        if (l.refs && l.refs->buffer) {
            ggml_backend_tensor_set(l.refs, l.refs_host.data(), 0, l.refs_host.size() * sizeof(float));
        }
    }
    constants_uploaded = true;
}

int32_t logquant_cache::n_mixed_layers() const {
    return (int32_t) std::count_if(layers.begin(), layers.end(), [](const layer & l) { return l.widths != nullptr; });
}

logquant_tier_stats logquant_cache::stats(int64_t bytes_f16) const {
    logquant_tier_stats s{};
    for (const auto & cells : *v_cells) {
        s.n_f16 += (int64_t) cells.get_used();
    }
    s.n_q2      = (int64_t) std::count_if(bk.slot_pos.begin(), bk.slot_pos.begin() + bk.n_slots,
                                          [](int32_t p) { return p >= 0; });
    s.n_slots   = bk.n_slots;
    s.bytes_f16 = bytes_f16;
    double bits = 0.0, values = 0.0;
    for (const auto & l : layers) {
        s.bytes_q2  += (int64_t) (ggml_nbytes(l.k2) + ggml_nbytes(l.v2) + ggml_nbytes(l.staging));
        s.bytes_aux += (int64_t) ggml_nbytes(l.staging);
        for (const ggml_tensor * t : { l.widths, l.refs }) { // per-layer constants
            if (t) {
                s.bytes_q2  += (int64_t) ggml_nbytes(t);
                s.bytes_aux += (int64_t) ggml_nbytes(t);
            }
        }
        bits   += 8.0 * (double) (l.k_group_bytes + l.v_group_bytes) / G;
        values += (double) (l.n_embd_k_gqa + l.n_embd_v_gqa);
    }
    s.q2_bits_per_value = values > 0.0 ? bits / values : 0.0;
    size_t book = bk.slot_pos.size() * sizeof(int32_t) + bk.slot_seq.bits.size() * sizeof(uint64_t) +
                  (bk.group_fill.size() + bk.group_live.size()) * sizeof(int32_t);
    for (const auto & q2 : bk.sorted) {
        book += q2.capacity() * sizeof(int32_t);
    }
    for (const auto & [ctx, t] : rope_tables) {
        s.bytes_q2  += (int64_t) ggml_nbytes(t);
        s.bytes_aux += (int64_t) ggml_nbytes(t);
    }
    s.bytes_host = (int64_t) book;
    return s;
}
