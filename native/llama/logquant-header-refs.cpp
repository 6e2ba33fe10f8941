// logquant-header-refs.cpp: a layer's channel references (mu_c, sigma_c) for 8-bit block headers
// (the scale_bits lever, lq2-format.h), fixed once per cache from the model's weights, as the key
// widths are: no per-sequence state, nothing measured at run time.
//
// A block of channel c stores its scale as sigma_c times 2^(e/16) and its minimum as mu_c plus
// k sigma_c / 8: a channel's blocks then fit in two bytes if mu_c is near the channel's offset and
// sigma_c within 2^+-8 of its spread. For an input of unit RMS before attn_norm with independent
// channels (logquant-weights.h): mu_c the projection's bias (0 without one), sigma_c^2 =
// sum_i (W[c, i] gamma_i)^2, through the per-head norm when the model has one (Gemma 3, Qwen 3).
// bench/studies/metadata_study.py measured these against each channel's measured mean and spread
// on Qwen2.5-Coder-0.5B: the same attention error, and no block of any layer outside the range.
#include "logquant-cache.h"
#include "logquant-weights.h"

#include "lq2-format.h"

#include "llama-hparams.h"
#include "llama-model.h"

#include <cmath>

// (mu, sigma) of the rows of one projection w (bias b, per-head norm nw), appended to refs.
static void append_refs(std::vector<float> & refs, const std::vector<float> & w, int64_t n_in,
                        const std::vector<float> & gamma, const std::vector<float> & b, const std::vector<float> & nw,
                        int64_t D) {
    std::vector<double> e = logquant_row_energy(w, n_in, gamma, {});
    logquant_head_norm(e, D, nw);
    for (size_t c = 0; c < e.size(); c++) {
        const float mu = !nw.empty() || b.empty() ? 0.0f : b[c]; // a norm after the bias moves it: 0 then
        refs.push_back(std::isfinite(mu) ? mu : 0.0f);
        refs.push_back(lq2_ref_round((float) std::sqrt(e[c])));
    }
}

std::vector<float> logquant_header_refs(const llama_model & model, const llama_hparams & hparams, int32_t il,
                                        bool values, std::string & why) {
    const auto & L = model.layers[(size_t) il];
    if (!L.wk || (values && !L.wv)) {
        why = "the model has no separate K and V weights (fused QKV)";
        return {};
    }
    const std::vector<float> wk = logquant_weight_f32(L.wk), gamma = logquant_weight_f32(L.attn_norm);
    const std::vector<float> bk = logquant_weight_f32(L.wk_b), kn = logquant_weight_f32(L.attn_k_norm);
    const std::vector<float> wv = values ? logquant_weight_f32(L.wv) : std::vector<float>();
    const std::vector<float> bv = values ? logquant_weight_f32(L.wv_b) : std::vector<float>();
    if (wk.empty() || (L.attn_norm && gamma.empty()) || (L.wk_b && bk.empty()) || (L.attn_k_norm && kn.empty()) ||
        (values && (wv.empty() || (L.wv_b && bv.empty())))) {
        why = "the K/V weights cannot be read back here: not loaded (a size estimate)";
        return {};
    }
    const int64_t n_in = L.wk->ne[0], D = hparams.n_embd_head_k(), nk = hparams.n_embd_k_gqa(il);
    const int64_t nv = hparams.n_embd_v_gqa(il);
    if ((int64_t) wk.size() != n_in * nk || (!gamma.empty() && (int64_t) gamma.size() != n_in) ||
        (!bk.empty() && (int64_t) bk.size() != nk) || (!kn.empty() && (int64_t) kn.size() != D) ||
        (values && ((int64_t) wv.size() != n_in * nv || (!bv.empty() && (int64_t) bv.size() != nv)))) {
        why = "unexpected K/V weight shapes";
        return {};
    }
    std::vector<float> refs;
    refs.reserve((size_t) (2 * (nk + (values ? nv : 0))));
    append_refs(refs, wk, n_in, gamma, bk, kn, D);
    if (values) {
        append_refs(refs, wv, n_in, gamma, bv, {}, D);
    }
    return refs;
}
