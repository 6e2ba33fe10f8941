// logquant-key-widths.cpp: a layer's mixed key widths (the key_widths lever, lq2-format.h), chosen
// once per cache from the model's weights.
//
// Channel c's share of the 2-bit keys' score error is E[q_c^2] E[e_c^2]: the query's energy in the
// channel times the key's coding error, and both vary by orders of magnitude across the channels
// of a head. Both are predicted from the weights, for an input of unit RMS before attn_norm with
// independent channels:
//   query energy  E[q_c^2] = sum_i (W_q[c, i] gamma_i)^2 + b_c^2, averaged over the query heads
//                 that share the kv head;
//   key variance  about its mean (a group's minimum absorbs the mean): sum_i (W_k[c, i] gamma_i)^2;
// a per-head RMSNorm of q or k (Gemma 3, Qwen 3) scales channel c by its weight squared over the
// head's mean. The coding error of a channel of variance s at b bits is s times a unit Gaussian's
// (1, 0.119, 0.0115, 9.0e-5 at 0, 2, 4, 8 bits). Reverse water-filling per kv head, for a layer of
// b-bit keys (b = 2 or 4): every RoPE pair (or channel, without RoPE) starts at 0 bits and steps
// of b bits (to b, then 2b) go where they remove the most predicted error until the mean is b, so
// a key group keeps its bytes; channels past a partial RoPE's n_dims keep b bits.
// 3-bit keys (there are no 3-bit codes) are this allocation with a mean of 3: widths 0, 2 or 4,
// steps of 2 bits (channels past n_dims alternate 2 and 4). In the study below a mean of 3 bits
// so spent gives an attention KL 2.5x below uniform 3-bit codes' (bench/results/cpu/
// qwen2.5-coder-0.5b/channel-bits); a layer whose weights cannot be read gets a fixed rule then:
// the slower half of the RoPE pairs 4 bits, the faster half 2.
//
// bench/studies/channel_bits_study.py measured it (Qwen2.5-Coder-0.5B, attention KL averaged over
// layers, values exact): uniform 2-bit keys 0.141, these predicted widths 0.048, the same
// allocation with measured queries and key errors 0.036; uniform 3-bit keys 0.037.
#include "logquant-cache.h"

#include "lq2-format.h"

#include "logquant-weights.h"

#include "llama-hparams.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <vector>

// Channels of a kv head: RoPE pairs (both channels get one width) or single channels; a, b: unit
// u's channels (a == b for a single one).
static void unit_channels(const lq2_rope_params & rope, int u, int & a, int & b) {
    const int n_dims = rope.n_dims;
    if (n_dims == 0) {
        a = b = u;
    } else if (rope.mode == LQ2_ROPE_NEOX) {
        a = u, b = u + n_dims / 2;
    } else {
        a = 2 * u, b = 2 * u + 1;
    }
}

// 3-bit keys without the weights: per kv head the slower half of the units 4 bits (RoPE's low
// frequencies carry the large key channels), the faster half 2; channels past n_dims alternate.
static std::vector<int8_t> widths_by_frequency(int64_t n_head_kv, int64_t D, const lq2_rope_params & rope) {
    const int n_unit = rope.n_dims > 0 ? rope.n_dims / 2 : (int) D;
    std::vector<int8_t> w((size_t) (n_head_kv * D), 2);
    for (int64_t hk = 0; hk < n_head_kv; hk++) {
        for (int u = 0; u < n_unit; u++) {
            int a, b;
            unit_channels(rope, u, a, b);
            w[(size_t) (hk * D + a)] = w[(size_t) (hk * D + b)] = (int8_t) (u >= n_unit / 2 ? 4 : 2);
        }
        for (int64_t c = rope.n_dims > 0 ? rope.n_dims : D; c < D; c++) {
            w[(size_t) (hk * D + c)] = (int8_t) ((c - rope.n_dims) % 2 ? 4 : 2);
        }
    }
    return w;
}

// The water-filling above from the layer's weights; empty (and why) when they cannot be read.
static std::vector<int8_t> widths_from_weights(const llama_model & model, const llama_hparams & hparams, int32_t il,
                                               int32_t bits, const lq2_rope_params & rope, std::string & why) {
    const auto & L = model.layers[(size_t) il];
    if (!L.wq || !L.wk) {
        why = "the model has no separate Q and K weights (fused QKV)";
        return {};
    }
    const std::vector<float> wq = logquant_weight_f32(L.wq), wk = logquant_weight_f32(L.wk);
    const std::vector<float> gamma = logquant_weight_f32(L.attn_norm), bq = logquant_weight_f32(L.wq_b);
    const std::vector<float> qn = logquant_weight_f32(L.attn_q_norm), kn = logquant_weight_f32(L.attn_k_norm);
    if (wq.empty() || wk.empty() || (L.attn_norm && gamma.empty()) || (L.wq_b && bq.empty()) ||
        (L.attn_q_norm && qn.empty()) || (L.attn_k_norm && kn.empty())) {
        why = "the Q/K weights cannot be read back here: not loaded (a size estimate)";
        return {};
    }
    const int64_t n_in = L.wq->ne[0], D = hparams.n_embd_head_k();
    const int64_t n_head = hparams.n_head(il), n_head_kv = hparams.n_head_kv(il);
    if (L.wk->ne[0] != n_in || (int64_t) wq.size() != n_in * D * n_head || (int64_t) wk.size() != n_in * D * n_head_kv ||
        (!gamma.empty() && (int64_t) gamma.size() != n_in) || (!bq.empty() && (int64_t) bq.size() != D * n_head) ||
        (!qn.empty() && (int64_t) qn.size() != D) || (!kn.empty() && (int64_t) kn.size() != D)) {
        why = "unexpected Q/K weight shapes";
        return {};
    }
    std::vector<double> eq = logquant_row_energy(wq, n_in, gamma, bq);
    std::vector<double> ek = logquant_row_energy(wk, n_in, gamma, {});
    logquant_head_norm(eq, D, qn);
    logquant_head_norm(ek, D, kn);

    // units: RoPE pairs (both channels get one width) or single channels; those past a partial
    // RoPE keep `bits` (3-bit keys: alternately 2 and 4)
    const int n_unit = rope.n_dims > 0 ? rope.n_dims / 2 : (int) D;
    // widths of the levels, steps of `step` bits, and a unit Gaussian's error at each level (best
    // uniform quantizers)
    const int    step = bits == 4 ? 4 : 2;
    const double gauss_mse[3] = { 1.0, step == 2 ? 0.1188 : 0.01154, step == 2 ? 0.01154 : 9.0e-5 };
    std::vector<int8_t> widths = bits == 3 ? widths_by_frequency(n_head_kv, D, rope)
                                           : std::vector<int8_t>((size_t) (n_head_kv * D), (int8_t) bits);
    const int64_t gq = n_head / n_head_kv;
    for (int64_t hk = 0; hk < n_head_kv; hk++) {
        std::vector<double> weight((size_t) n_unit, 0.0); // query energy x key variance of the unit
        for (int u = 0; u < n_unit; u++) {
            int a, b;
            unit_channels(rope, u, a, b);
            double qe = 0.0;
            for (int64_t h = hk * gq; h < (hk + 1) * gq; h++) {
                qe += (eq[(size_t) (h * D + a)] + (a != b ? eq[(size_t) (h * D + b)] : 0.0)) / (double) gq;
            }
            const double kv = ek[(size_t) (hk * D + a)] + (a != b ? ek[(size_t) (hk * D + b)] : 0.0);
            weight[(size_t) u] = qe * kv;
        }
        std::vector<int> level((size_t) n_unit, 0); // index into 0, step, 2 step bits
        for (int k = 0; k < n_unit * bits / step; k++) { // steps of `step` bits to a mean of `bits`
            int best = -1;
            double best_gain = -1.0;
            for (int u = 0; u < n_unit; u++) {
                const int lv = level[(size_t) u];
                if (lv == 2) {
                    continue;
                }
                const double gain = weight[(size_t) u] * (gauss_mse[lv] - gauss_mse[lv + 1]);
                if (gain > best_gain) {
                    best_gain = gain;
                    best = u;
                }
            }
            level[(size_t) best]++;
        }
        for (int u = 0; u < n_unit; u++) {
            int a, b;
            unit_channels(rope, u, a, b);
            widths[(size_t) (hk * D + a)] = widths[(size_t) (hk * D + b)] = (int8_t) (step * level[(size_t) u]);
        }
    }
    return widths;
}

std::vector<int8_t> logquant_key_widths(const llama_model & model, const llama_hparams & hparams, int32_t il,
                                        int32_t bits, const lq2_rope_params & rope, std::string & why) {
    if (bits != 2 && bits != 3 && bits != 4) {
        why = "mixed widths are for 2-, 3- and 4-bit keys";
        return {};
    }
    const int64_t D = hparams.n_embd_head_k(), n_unit = rope.n_dims > 0 ? rope.n_dims / 2 : D;
    if (bits == 3 && (n_unit % 2 != 0 || (D - rope.n_dims) % 2 != 0)) {
        why = "3-bit keys need an even number of RoPE pairs and of channels past them";
        return {};
    }
    std::vector<int8_t> w = widths_from_weights(model, hparams, il, bits, rope, why);
    if (w.empty() && bits == 3) { // 3-bit keys exist only as mixed widths: the fixed rule then
        why += "; 3-bit keys by RoPE frequency instead";
        return widths_by_frequency(hparams.n_head_kv(il), D, rope);
    }
    return w;
}
