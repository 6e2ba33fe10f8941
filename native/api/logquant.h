// logquant-gguf's own C API, exported from libllama next to llama.h.
// Bound from Python with cffi in ABI mode (logquant_gguf/_capi.py); keep declarations plain C.
#pragma once

#include "llama.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// JSON object describing this build: the llama.cpp pin, the patch series, the backends compiled in.
// The string is static; do not free it.
LLAMA_API const char * logquant_build_info(void);

// What a context's KV cache holds right now.
struct logquant_kv_stats {
    int64_t bytes_total;   // every KV buffer of the context, all layers, all backends
    int32_t n_seq;         // sequences holding at least one token
    int32_t n_tokens;      // positions spanned (max - min + 1), summed over sequences
};

// Returns 0 on success, -1 when the context has no KV cache.
LLAMA_API int32_t logquant_kv_stats_get(const struct llama_context * ctx, struct logquant_kv_stats * out);

#ifdef __cplusplus
}
#endif
