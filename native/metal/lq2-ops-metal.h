// lq2-ops-metal.h: the LogQuant ops in ggml-metal (patch 0014 calls these when the build has
// -DLOGQUANT_METAL=ON). C linkage: ggml-metal-device.m (Objective-C) asks supports_op.
#pragma once

#include "ggml-metal-device.h"

#ifdef __cplusplus
extern "C" {
#endif

// Whether the Metal kernels take this LQ2 op. False unless LOGQUANT_METAL=1 is in the
// environment: the kernels have never run on a Mac (scripts/metal_check.sh sets it).
bool ggml_metal_lq2_supports_op(const struct ggml_tensor * op);

// Bytes an op needs beside its result (LQ2_ATTN: the parts before they are combined).
size_t ggml_metal_lq2_extra(const struct ggml_tensor * op);

// Encodes the op's kernels with a memory barrier between them; returns the number of nodes done (1).
int ggml_metal_op_lq2(ggml_metal_library_t lib, ggml_metal_encoder_t enc, const struct ggml_tensor * op);

#ifdef __cplusplus
}
#endif
