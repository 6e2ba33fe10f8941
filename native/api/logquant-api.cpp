#include "logquant.h"
#include "logquant-build-info.h"

#include "llama-context.h"
#include "llama-memory.h"

#include "ggml-backend.h"

#include <string>

extern "C" const char * logquant_build_info(void) {
    // Built once: the set of registered backends does not change after load.
    static const std::string info = [] {
        std::string backends;
        for (size_t i = 0; i < ggml_backend_reg_count(); i++) {
            backends += std::string(backends.empty() ? "" : ", ") + "\"" +
                        ggml_backend_reg_name(ggml_backend_reg_get(i)) + "\"";
        }
        return std::string("{\"llama_cpp_pin\": \"") + LOGQUANT_PIN + "\", \"patches\": [" +
               LOGQUANT_PATCHES + "], \"backends\": [" + backends + "], \"system_info\": \"" +
               llama_print_system_info() + "\"}";
    }();
    return info.c_str();
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
    return 0;
}
