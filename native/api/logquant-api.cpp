#include "logquant.h"
#include "logquant-build-info.h"

#include "logquant-cache.h"
#include "lq2-format.h"
#include "lq2-quants.h"

#include "llama-context.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-memory.h"

#include "ggml-backend.h"

#include <string>
#include <vector>

extern "C" const char * logquant_build_info(void) {
    // Built once: the set of registered backends does not change after load.
    static const std::string info = [] {
        std::string backends;
        for (size_t i = 0; i < ggml_backend_reg_count(); i++) {
            backends += std::string(backends.empty() ? "" : ", ") + "\"" +
                        ggml_backend_reg_name(ggml_backend_reg_get(i)) + "\"";
        }
        // which code path our CPU kernels were compiled with: "avx2" or "scalar"
        const char * kernels = lq2_cpu_has_avx2() ? "avx2" : "scalar";
        // -DLOGQUANT_CUDA=ON / -DLOGQUANT_METAL=ON: never run on a GPU by us yet
        std::string gpu_kernels = "[";
#ifdef LOGQUANT_CUDA_KERNELS
        gpu_kernels += "\"cuda\"";
#endif
#ifdef LOGQUANT_METAL_KERNELS
        gpu_kernels += gpu_kernels.size() > 1 ? ", \"metal\"" : "\"metal\"";
#endif
        gpu_kernels += "]";
        return std::string("{\"llama_cpp_pin\": \"") + LOGQUANT_PIN + "\", \"patches\": [" +
               LOGQUANT_PATCHES + "], \"backends\": [" + backends + "], \"logquant_cpu_kernels\": \"" +
               kernels + "\", \"logquant_gpu_kernels\": " + gpu_kernels + ", \"system_info\": \"" + llama_print_system_info() + "\"}";
    }();
    return info.c_str();
}

// The cache that a LogQuant context compresses: the full-attention one under iSWA.
static const llama_kv_cache * main_kv_cache(const llama_memory_t mem) {
    if (const auto * iswa = dynamic_cast<const llama_kv_cache_iswa *>(mem)) {
        return iswa->get_base();
    }
    return dynamic_cast<const llama_kv_cache *>(mem);
}

extern "C" int64_t logquant_kv_f16_positions(const llama_context * ctx, int32_t seq_id, int32_t * out,
                                             int64_t cap) {
    const llama_kv_cache * kv = main_kv_cache(ctx->get_memory());
    if (kv == nullptr || kv->get_logquant() == nullptr || seq_id < 0 || seq_id >= (int32_t) ctx->n_seq_max()) {
        return -1;
    }
    int64_t n = 0;
    for (const auto & [pos, idx] : kv->get_cells(seq_id).seq_pos_get(seq_id)) {
        (void) idx;
        if (n < cap) {
            out[n] = pos;
        }
        n++;
    }
    return n;
}

extern "C" int64_t logquant_kv_key_widths(const llama_context * ctx, int32_t il, int8_t * out, int64_t cap) {
    const llama_kv_cache * kv = main_kv_cache(ctx->get_memory());
    if (kv == nullptr || kv->get_logquant() == nullptr || !kv->get_logquant()->has_layer(il)) {
        return -1;
    }
    const auto & w = kv->get_logquant()->layer_at(il).widths_host;
    for (size_t i = 0; i < w.size() && (int64_t) i < cap; i++) {
        out[i] = w[i];
    }
    return (int64_t) w.size();
}

extern "C" int32_t logquant_kv_layer_bits(const llama_context * ctx, int32_t il, int32_t * key_bits,
                                          int32_t * value_bits) {
    const llama_kv_cache * kv = main_kv_cache(ctx->get_memory());
    if (kv == nullptr || kv->get_logquant() == nullptr || !kv->get_logquant()->has_layer(il)) {
        return -1;
    }
    *key_bits   = kv->get_logquant()->layer_at(il).k_bits;
    *value_bits = kv->get_logquant()->layer_at(il).v_bits;
    return 0;
}

extern "C" int32_t logquant_kv_stats_get(const llama_context * ctx, logquant_kv_stats * out) {
    const llama_memory_t mem = ctx->get_memory();
    if (mem == nullptr) {
        return -1;
    }
    *out = {};
    for (const auto & [buft, size] : mem->memory_breakdown()) {
        out->bytes_total += (int64_t) size;
    }
    for (llama_seq_id s = 0; s < (llama_seq_id) ctx->n_seq_max(); s++) {
        const llama_pos p0 = mem->seq_pos_min(s);
        if (p0 >= 0) {
            out->n_seq    += 1;
            out->n_tokens += mem->seq_pos_max(s) - p0 + 1;
        }
    }
    const llama_kv_cache * kv = main_kv_cache(mem);
    if (kv != nullptr && kv->get_logquant() != nullptr) {
        const logquant_cache & lq = *kv->get_logquant();
        const logquant_tier_stats st = lq.stats(0);
        out->is_logquant = 1;
        out->window      = lq.window();
        out->policy      = lq.policy();
        out->n_f16       = st.n_f16;
        out->n_q2        = st.n_q2;
        out->bytes_total += st.bytes_host; // host memory outside llama.cpp's buffers
        out->bytes_q2    = st.bytes_q2 + st.bytes_host;
        out->bytes_host  = st.bytes_host;
        out->bytes_aux   = st.bytes_aux;
        out->q2_bits_per_value = st.q2_bits_per_value;
        out->bytes_f16   = out->bytes_total - out->bytes_q2;
    }
    return 0;
}

extern "C" int32_t logquant_set_params(int32_t window, int32_t policy) {
    if (window < 1 || (policy != LOGQUANT_POLICY_LOG && policy != LOGQUANT_POLICY_WINDOW)) {
        return -1;
    }
    logquant_settings s = logquant_settings_current(); // the code bits stay as set
    s.window = window;
    s.policy = policy;
    logquant_settings_set(s);
    return 0;
}

extern "C" const char * logquant_last_error(void) {
    return logquant_refusal().c_str();
}

extern "C" void logquant_clear_last_error(void) {
    logquant_clear_refusal();
}

extern "C" int32_t logquant_set_bits(int32_t key_bits, int32_t value_bits, int32_t n_layers,
                                     const int32_t * layers, const int32_t * layer_key_bits,
                                     const int32_t * layer_value_bits) {
    if (!LQ2_KEY_BITS_VALID(key_bits) || !LQ2_BITS_VALID(value_bits) || n_layers < 0 ||
        (n_layers > 0 && (!layers || !layer_key_bits || !layer_value_bits))) {
        return -1;
    }
    std::vector<logquant_layer_bits> overrides;
    for (int32_t i = 0; i < n_layers; i++) {
        if (layers[i] < 0 || !LQ2_KEY_BITS_VALID(layer_key_bits[i]) || !LQ2_BITS_VALID(layer_value_bits[i])) {
            return -1;
        }
        overrides.push_back({layers[i], layer_key_bits[i], layer_value_bits[i]});
    }
    logquant_settings s = logquant_settings_current();
    s.key_bits   = key_bits;
    s.value_bits = value_bits;
    s.layer_bits = std::move(overrides);
    s.layer_bits_error.clear(); // set explicitly: an unreadable LOGQUANT_LAYER_BITS no longer applies
    logquant_settings_set(s);
    return 0;
}

extern "C" int32_t logquant_set_prefill(int32_t fa_min_tokens) {
    if (fa_min_tokens < -1) {
        return -1;
    }
    logquant_settings s = logquant_settings_current();
    s.prefill_fa_min = fa_min_tokens;
    logquant_settings_set(s);
    return 0;
}

extern "C" int32_t logquant_set_codes(int32_t fit, int32_t score_correction) {
    if ((fit != 0 && fit != 1) || (score_correction != 0 && score_correction != 1)) {
        return -1;
    }
    logquant_settings s = logquant_settings_current();
    s.fit              = fit;
    s.score_correction = score_correction;
    logquant_settings_set(s);
    return 0;
}

// A 0/1 setting: 0, or -1 for anything else (nothing changed).
static int32_t set_switch(int32_t logquant_settings::* field, int32_t on) {
    if (on != 0 && on != 1) {
        return -1;
    }
    logquant_settings s = logquant_settings_current();
    s.*field = on;
    logquant_settings_set(s);
    return 0;
}

extern "C" int32_t logquant_set_key_widths(int32_t mode) {
    return set_switch(&logquant_settings::key_widths, mode);
}

extern "C" int32_t logquant_set_layer_bits_auto(int32_t on) {
    return set_switch(&logquant_settings::layer_bits_auto, on);
}

extern "C" int32_t logquant_set_value_groups(int32_t per_channel) {
    return set_switch(&logquant_settings::value_per_channel, per_channel);
}

extern "C" int32_t logquant_set_scale_bits(int32_t bits) {
    if (bits != 8 && bits != 16) {
        return -1;
    }
    logquant_settings s = logquant_settings_current();
    s.scale_bits = bits;
    logquant_settings_set(s);
    return 0;
}

extern "C" int32_t logquant_set_key_format(int32_t key_group, int32_t keys_post_rope) {
    if (lq2_key_type_b(key_group, 2) < 0 || (keys_post_rope != 0 && keys_post_rope != 1)) {
        return -1;
    }
    logquant_settings s = logquant_settings_current();
    s.key_group      = key_group;
    s.keys_post_rope = keys_post_rope;
    logquant_settings_set(s);
    return 0;
}
