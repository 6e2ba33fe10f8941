// lq2-rope-params.h: how a model rotates its keys (RoPE), as every backend's LogQuant code reads
// it: the CPU's un-rotation and cos/sin table (native/cpu/lq2-rope.h), the ops' params
// (lq2-op-params.h), the GPU kernels. Plain C, valid for Metal too.
#pragma once

#include "lq2-format.h"

#if defined(__cplusplus) && !defined(__METAL_VERSION__)
extern "C" {
#endif

// Same values as GGML_ROPE_TYPE_NORMAL / GGML_ROPE_TYPE_NEOX.
enum lq2_rope_mode {
    LQ2_ROPE_NORMAL = 0, // rotates pairs (2i, 2i + 1)
    LQ2_ROPE_NEOX   = 2, // rotates pairs (i, i + n_dims / 2)
};

// Rotation of pair i at position p: angle p * freq_scale * freq_base^(-2i / n_dims), result times
// attn_factor (ggml's mscale). Dimensions n_dims..head_dim-1 pass through unchanged.
// YaRN (ext_factor, beta_fast, beta_slow, n_ctx_orig) would extend this struct; it is not needed
// by the models targeted now, so the angle above is the whole rule.
struct lq2_rope_params {
    int32_t mode;     // enum lq2_rope_mode
    int32_t n_dims;   // even, <= head_dim
    float freq_base;
    float freq_scale;
    float attn_factor;
};

#if defined(__cplusplus) && !defined(__METAL_VERSION__)
}
#endif
