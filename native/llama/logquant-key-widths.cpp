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
// The same model ranks layers for layer bits "auto" (logquant_settings::layer_bits_auto): what 3-bit
// keys buy in a layer is its predicted error at a mean of 2 bits minus that at a mean of 3, summed
// over its kv heads (key_bits_gain). On Gemma 3 270M it names layer 11 of the three global
// layers (226 against 91.6 and 87.6), the one measured to matter (docs/levers.md).
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
#include <cstdio>
#include <functional>
#include <map>
#include <string>
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

// Per kv head, the weight of each unit (its query energy x key variance) from layer il's weights;
// empty (and why) when they cannot be read.
static logquant_unit_weights unit_weights(const llama_model & model, const llama_hparams & hparams,
                                                     int32_t il, const lq2_rope_params & rope, std::string & why) {
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

    const int     n_unit = rope.n_dims > 0 ? rope.n_dims / 2 : (int) D;
    const int64_t gq     = n_head / n_head_kv;
    logquant_unit_weights weights((size_t) n_head_kv, std::vector<double>((size_t) n_unit, 0.0));
    for (int64_t hk = 0; hk < n_head_kv; hk++) {
        for (int u = 0; u < n_unit; u++) {
            int a, b;
            unit_channels(rope, u, a, b);
            double qe = 0.0;
            for (int64_t h = hk * gq; h < (hk + 1) * gq; h++) {
                qe += (eq[(size_t) (h * D + a)] + (a != b ? eq[(size_t) (h * D + b)] : 0.0)) / (double) gq;
            }
            const double kv = ek[(size_t) (hk * D + a)] + (a != b ? ek[(size_t) (hk * D + b)] : 0.0);
            weights[(size_t) hk][(size_t) u] = qe * kv;
        }
    }
    return weights;
}

// A unit Gaussian's error at levels 0, step and 2 step bits (best uniform quantizers).
static void gauss_mse_levels(int step, double mse[3]) {
    mse[0] = 1.0;
    mse[1] = step == 2 ? 0.1188 : 0.01154;
    mse[2] = step == 2 ? 0.01154 : 9.0e-5;
}

// Reverse water-filling of one kv head: each unit's level (0, 1, 2: 0, step, 2 step bits), steps
// going where they remove the most predicted error until the mean is `bits`; *error: what is left.
static std::vector<int> water_fill(const std::vector<double> & weight, int bits, int step, double * error) {
    double mse[3];
    gauss_mse_levels(step, mse);
    const int n_unit = (int) weight.size();
    std::vector<int> level((size_t) n_unit, 0);
    for (int k = 0; k < n_unit * bits / step; k++) {
        int best = -1;
        double best_gain = -1.0;
        for (int u = 0; u < n_unit; u++) {
            const int lv = level[(size_t) u];
            if (lv == 2) {
                continue;
            }
            const double gain = weight[(size_t) u] * (mse[lv] - mse[lv + 1]);
            if (gain > best_gain) {
                best_gain = gain;
                best = u;
            }
        }
        level[(size_t) best]++;
    }
    if (error) {
        *error = 0.0;
        for (int u = 0; u < n_unit; u++) {
            *error += weight[(size_t) u] * mse[level[(size_t) u]];
        }
    }
    return level;
}

// The water-filling above from the layer's unit weights.
static std::vector<int8_t> widths_from_weights(const logquant_unit_weights & weights, const llama_hparams & hparams,
                                               int32_t il, int32_t bits, const lq2_rope_params & rope) {
    // units past a partial RoPE's n_dims keep `bits` (3-bit keys: alternately 2 and 4)
    const int64_t n_head_kv = hparams.n_head_kv(il), D = hparams.n_embd_head_k();
    const int     step = bits == 4 ? 4 : 2;
    std::vector<int8_t> widths = bits == 3 ? widths_by_frequency(n_head_kv, D, rope)
                                           : std::vector<int8_t>((size_t) (n_head_kv * D), (int8_t) bits);
    for (int64_t hk = 0; hk < n_head_kv; hk++) {
        const std::vector<int> level = water_fill(weights[(size_t) hk], bits, step, nullptr);
        for (int u = 0; u < (int) level.size(); u++) {
            int a, b;
            unit_channels(rope, u, a, b);
            widths[(size_t) (hk * D + a)] = widths[(size_t) (hk * D + b)] = (int8_t) (step * level[(size_t) u]);
        }
    }
    return widths;
}

// What 3-bit keys instead of 2-bit buy in a layer: the predicted score error left at a mean of 2
// bits minus that at 3, summed over the kv heads.
static double key_bits_gain(const logquant_unit_weights & weights) {
    double gain = 0.0;
    for (const auto & w : weights) {
        double e2 = 0.0, e3 = 0.0;
        water_fill(w, 2, 2, &e2);
        water_fill(w, 3, 2, &e3);
        gain += e2 - e3;
    }
    return gain;
}

std::vector<int8_t> logquant_key_widths(const llama_model & model, const llama_hparams & hparams, int32_t il,
                                        int32_t bits, const lq2_rope_params & rope, std::string & why,
                                        const logquant_unit_weights * known) {
    if (bits != 2 && bits != 3 && bits != 4) {
        why = "mixed widths are for 2-, 3- and 4-bit keys";
        return {};
    }
    const int64_t D = hparams.n_embd_head_k(), n_unit = rope.n_dims > 0 ? rope.n_dims / 2 : D;
    if (bits == 3 && (n_unit % 2 != 0 || (D - rope.n_dims) % 2 != 0)) {
        why = "3-bit keys need an even number of RoPE pairs and of channels past them";
        return {};
    }
    const logquant_unit_weights weights = known ? *known : unit_weights(model, hparams, il, rope, why);
    std::vector<int8_t> w = weights.empty() ? std::vector<int8_t>() : widths_from_weights(weights, hparams, il, bits, rope);
    if (w.empty() && bits == 3) { // 3-bit keys exist only as mixed widths: the fixed rule then
        why += "; 3-bit keys by RoPE frequency instead";
        return widths_by_frequency(hparams.n_head_kv(il), D, rope);
    }
    return w;
}

std::vector<int32_t> logquant_auto_key_layers(const llama_model & model, const llama_hparams & hparams,
                                              const logquant_settings & s, const lq2_rope_params & rope, bool no_rope,
                                              const std::function<bool(int32_t)> & holds_layer, std::string & note,
                                              std::string & ranking,
                                              std::map<int32_t, logquant_unit_weights> & weights_of) {
    if (!s.key_widths || (rope.n_dims == 0 && !no_rope)) {
        note = "3-bit keys need mixed key widths and keys stored before RoPE: every layer keeps its bits";
        return {};
    }
    if (s.key_bits != 2) {
        note = "layer bits auto gives 3-bit keys to layers of 2-bit keys; these keys have " +
               std::to_string(s.key_bits) + " bits";
        return {};
    }
    const int64_t D = hparams.n_embd_head_k(), n_unit = rope.n_dims > 0 ? rope.n_dims / 2 : D;
    if (n_unit % 2 != 0 || (D - rope.n_dims) % 2 != 0) {
        note = "3-bit keys need an even number of RoPE pairs and of channels past them: every layer keeps its bits";
        return {};
    }
    // candidates: this cache's layers of 2-bit keys that no explicit override names
    std::vector<std::pair<double, int32_t>> ranked; // (-gain, layer): the largest gain first
    std::string why;
    bool weights_read = true;
    for (int32_t il = 0; il < (int32_t) model.layers.size(); il++) {
        const bool named = std::any_of(s.layer_bits.begin(), s.layer_bits.end(),
                                       [il](const logquant_layer_bits & lb) { return lb.il == il; });
        if (!holds_layer(il) || named) {
            continue;
        }
        logquant_unit_weights w = weights_read ? unit_weights(model, hparams, il, rope, why) : logquant_unit_weights();
        weights_read = weights_read && !w.empty();
        ranked.push_back({weights_read ? -key_bits_gain(w) : 0.0, il});
        if (weights_read) {
            weights_of[il] = std::move(w);
        }
    }
    if (!weights_read) { // a size estimate: the later half of the layers, the same bytes when they are alike
        note = "layer bits auto: " + why + "; the later half of the layers instead";
        for (size_t i = 0; i < ranked.size(); i++) {
            ranked[i].first = -(double) i;
        }
    }
    std::stable_sort(ranked.begin(), ranked.end());
    for (const auto & [neg_gain, il] : ranked) {
        char buf[48];
        std::snprintf(buf, sizeof(buf), "%s%d %.3g", ranking.empty() ? "" : ", ", il, -neg_gain);
        ranking += weights_read ? buf : "";
    }
    ranking = ranking.empty() ? "(none: the weights were not read)" : ranking;
    std::vector<int32_t> layers;
    for (size_t i = 0; i < ranked.size() / 2; i++) {
        layers.push_back(ranked[i].second);
    }
    std::sort(layers.begin(), layers.end());
    return layers;
}
