// logquant-weights.h: a layer's weights read back as f32, and per-channel energies predicted from
// them, for an input of unit RMS before attn_norm with independent channels.
#pragma once

#include "ggml.h"

#include <cstdint>
#include <vector>

// A weight as f32, or empty when it cannot be read back: not loaded (llama.cpp's tools size a
// context first on a model whose weights are not allocated), or a type without a conversion.
std::vector<float> logquant_weight_f32(const ggml_tensor * t);

// Per output row of w (ne[1] rows of n_in inputs): sum_i (w[r, i] gamma_i)^2 (+ b_r^2).
std::vector<double> logquant_row_energy(const std::vector<float> & w, int64_t n_in, const std::vector<float> & gamma,
                                        const std::vector<float> & bias);

// A per-head RMSNorm (weight nw of D channels) on rows of D channels: channel c's energy becomes
// nw_c^2 e_c / mean(e over the head). Nothing without a norm (nw empty).
void logquant_head_norm(std::vector<double> & e, int64_t D, const std::vector<float> & nw);
