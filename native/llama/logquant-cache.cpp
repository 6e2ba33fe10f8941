#include "logquant-cache.h"

#include "logquant-policy.h"
#include "lq2-attn.h"
#include "lq2-format.h"
#include "lq2-quants.h"

#include "llama-hparams.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cells.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <tuple>

// ---------------------------------------------------------------------------------------------
// settings

static std::mutex        g_settings_mutex;
static logquant_settings g_settings = [] {
    logquant_settings s;
    // llama.cpp's own tools (llama-perplexity, llama-bench) select the cache with -ctk lq2 and
    // have no other channel for these two numbers.
    if (const char * w = std::getenv("LOGQUANT_WINDOW")) {
        s.window = std::atoi(w);
    }
    if (const char * p = std::getenv("LOGQUANT_POLICY")) {
        s.policy = std::strcmp(p, "window") == 0 ? LOGQUANT_POLICY_WINDOW : LOGQUANT_POLICY_LOG;
    }
    if (const char * b = std::getenv("LOGQUANT_KEY_BITS")) {
        s.key_bits = std::atoi(b);
    }
    if (const char * b = std::getenv("LOGQUANT_VALUE_BITS")) {
        s.value_bits = std::atoi(b);
    }
    if (const char * g = std::getenv("LOGQUANT_KEY_GROUP")) {
        s.key_group = std::atoi(g);
    }
    if (const char * r = std::getenv("LOGQUANT_KEYS_POST_ROPE")) {
        s.keys_post_rope = std::atoi(r);
    }
    // "il:key_bits:value_bits,..." e.g. "0:8:8" keeps layer 0 near full precision
    if (const char * l = std::getenv("LOGQUANT_LAYER_BITS")) {
        for (const char * p = l; *p;) {
            logquant_layer_bits lb{};
            int used = 0;
            if (std::sscanf(p, "%d:%d:%d%n", &lb.il, &lb.key_bits, &lb.value_bits, &used) != 3) {
                s.key_bits = -1; // reported as invalid when a cache is created
                break;
            }
            s.layer_bits.push_back(lb);
            p += used;
            p += *p == ',' ? 1 : 0;
        }
    }
    return s;
}();

std::pair<int32_t, int32_t> logquant_settings::bits_of(int32_t il) const {
    for (const auto & lb : layer_bits) {
        if (lb.il == il) {
            return {lb.key_bits, lb.value_bits};
        }
    }
    return {key_bits, value_bits};
}

logquant_settings logquant_settings_current() {
    std::lock_guard<std::mutex> lock(g_settings_mutex);
    return g_settings;
}

void logquant_settings_set(const logquant_settings & s) {
    std::lock_guard<std::mutex> lock(g_settings_mutex);
    g_settings = s;
}

// ---------------------------------------------------------------------------------------------
// construction

logquant_cache::logquant_cache(const llama_model & model, const llama_hparams & hparams, uint32_t kv_size,
                               uint32_t n_seq_max, bool unified)
    : G(logquant_settings_current().key_group), settings(logquant_settings_current()),
      capacity(kv_size + (uint32_t) std::max(0, settings.n_ubatch)) {
    GGML_UNUSED(n_seq_max);
    GGML_UNUSED(unified);
    if (settings.window < 1) {
        throw std::runtime_error("logquant: window must be >= 1, got " + std::to_string(settings.window));
    }
    bool bits_ok = LQ2_BITS_VALID(settings.key_bits) && LQ2_BITS_VALID(settings.value_bits);
    for (const auto & lb : settings.layer_bits) {
        bits_ok = bits_ok && lb.il >= 0 && LQ2_BITS_VALID(lb.key_bits) && LQ2_BITS_VALID(lb.value_bits);
    }
    if (!bits_ok) {
        throw std::runtime_error("logquant: code bits must be 2, 4 or 8 (LOGQUANT_KEY_BITS, LOGQUANT_VALUE_BITS, "
                                 "LOGQUANT_LAYER_BITS=il:k:v,...)");
    }
    bool group_ok = lq2_key_type_b(G, settings.key_bits) >= 0;
    for (const auto & lb : settings.layer_bits) {
        group_ok = group_ok && lq2_key_type_b(G, lb.key_bits) >= 0;
    }
    if (!group_ok) {
        throw std::runtime_error("logquant: key group " + std::to_string(G) + " is not available with these key "
                                 "bits (2-bit keys: 32, 64, 128; 4- and 8-bit keys: 64)");
    }

    // Keys are stored before RoPE when we can undo and redo the model's RoPE exactly: plain
    // NORM/NEOX rotation without YaRN or per-frequency factors. Otherwise (no RoPE, or a layout we
    // do not handle) they are stored as the cache holds them, after RoPE: the explicit fallback.
    rope = {};
    const bool plain_rope = (hparams.rope_type == LLAMA_ROPE_TYPE_NORM || hparams.rope_type == LLAMA_ROPE_TYPE_NEOX) &&
                            hparams.rope_scaling_type_train != LLAMA_ROPE_SCALING_TYPE_YARN &&
                            model.layers.size() > 0 && model.layers[0].rope_freqs == nullptr;
    if (plain_rope && !settings.keys_post_rope) {
        rope.mode        = hparams.rope_type == LLAMA_ROPE_TYPE_NEOX ? LQ2_ROPE_NEOX : LQ2_ROPE_NORMAL;
        rope.n_dims      = (int32_t) hparams.n_rot();
        rope.freq_base   = hparams.rope_freq_base_train;
        rope.freq_scale  = hparams.rope_freq_scale_train;
        rope.attn_factor = 1.0f;
    } else if (settings.keys_post_rope) {
        LLAMA_LOG_INFO("%s: keys grouped per channel AFTER RoPE, as asked (LOGQUANT_KEYS_POST_ROPE)\n", __func__);
    } else {
        LLAMA_LOG_WARN("%s: this model's RoPE is not plain NORM/NEOX: 2-bit keys are grouped per channel "
                       "AFTER RoPE (lower quality than pre-RoPE)\n", __func__);
    }
    slot_pos.assign(capacity, -1);
    rope_table.assign(lq2_rope_table_size(&rope, capacity, G), 0.0f);
    std::string overrides;
    for (const auto & lb : settings.layer_bits) {
        overrides += " " + std::to_string(lb.il) + ":" + std::to_string(lb.key_bits) + ":" + std::to_string(lb.value_bits);
    }
    LLAMA_LOG_INFO("%s: LogQuant cache: window %d, policy %s, low-bit tier %u tokens, keys %s RoPE in groups "
                   "of %d, bits K %d V %d%s%s\n", __func__, settings.window,
                   settings.policy == LOGQUANT_POLICY_LOG ? "log" : "window", capacity,
                   rope.n_dims > 0 ? "before" : "after", G, settings.key_bits, settings.value_bits,
                   overrides.empty() ? "" : ", layers il:K:V", overrides.c_str());
}

std::string logquant_cache::check_supported(const llama_hparams & hparams, uint32_t n_seq_max, bool v_trans) const {
    if (n_seq_max != 1) {
        return "the LogQuant cache holds one sequence per context for now (n_seq_max = " + std::to_string(n_seq_max) + ")";
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

uint32_t logquant_cache::f16_cells(uint32_t kv_size_requested, uint32_t n_pad) const {
    const uint32_t need = 3u * (uint32_t) settings.window + (uint32_t) settings.n_ubatch;
    const uint32_t padded = (need + n_pad - 1) / n_pad * n_pad;
    return std::min(kv_size_requested, padded);
}

void logquant_cache::add_layer(ggml_context * ctx, int32_t il, uint32_t n_embd_k_gqa, uint32_t n_embd_v_gqa,
                               uint32_t n_head_kv) {
    const int64_t n_groups = (capacity + G - 1) / G;
    layer l;
    l.il           = il;
    l.n_embd_k_gqa = n_embd_k_gqa;
    l.n_embd_v_gqa = n_embd_v_gqa;
    l.n_head_kv    = n_head_kv;
    l.owner        = this;
    l.kq_scale = l.max_bias = l.softcap = 0.0f;
    std::tie(l.k_bits, l.v_bits) = settings.bits_of(il);
    l.k_group_bytes = (size_t) n_embd_k_gqa * LQ2_BLOCK_BYTES_B(G, l.k_bits);
    l.v_row_bytes   = (size_t) (n_embd_v_gqa / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, l.v_bits);
    l.k2 = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, n_groups * (int64_t) l.k_group_bytes);
    l.v2 = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, (int64_t) capacity * (int64_t) l.v_row_bytes);
    ggml_format_name(l.k2, "cache_k2_l%d", il);
    ggml_format_name(l.v2, "cache_v2_l%d", il);
    l.staging.assign((size_t) G * n_embd_k_gqa, 0.0f);
    layer_of[il] = layers.size();
    layers.push_back(std::move(l));
}

// ---------------------------------------------------------------------------------------------
// policy bookkeeping (host)

// Ascending positions of the f16 tier's tokens of sequence 0.
static std::vector<int32_t> f16_positions(const llama_kv_cells & cells) {
    std::vector<int32_t> out;
    for (const auto & [pos, idx] : cells.seq_pos_get(0)) {
        GGML_UNUSED(idx);
        out.push_back(pos);
    }
    return out;
}

// The positions (ascending) that the policy keeps in f16 among the ascending list `all`.
static std::vector<int32_t> full_positions(const std::vector<int32_t> & all, int32_t w, int32_t policy) {
    const int64_t n = (int64_t) all.size();
    std::vector<int32_t> out;
    if (policy == LOGQUANT_POLICY_WINDOW) {
        for (int64_t i = std::max<int64_t>(0, n - 3 * (int64_t) w); i < n; i++) {
            out.push_back(all[i]);
        }
        return out;
    }
    std::vector<int64_t> idx((size_t) logquant_policy_n_full(n, w));
    logquant_policy_full_indices(n, w, idx.data());
    for (int64_t i : idx) {
        out.push_back(all[i]);
    }
    return out;
}

bool logquant_cache::plan(llama_kv_cells & cells, const int32_t * pos, uint32_t n) {
    if (!overrides_checked) { // every add_layer has run by now
        overrides_checked = true;
        for (const auto & lb : settings.layer_bits) {
            if (!has_layer(lb.il)) {
                LLAMA_LOG_WARN("%s: layer %d has no LogQuant tier (no such layer, or a sliding-window layer kept "
                               "in f16): its code bits are ignored\n", __func__, lb.il);
            }
        }
    }
    ubatch_pos.assign(pos, pos + n);
    pending.clear();
    if (!planning) {
        return true;
    }

    const std::vector<int32_t> f16 = f16_positions(cells);
    std::vector<int32_t> all(sorted.size() + f16.size());
    std::merge(sorted.begin(), sorted.end(), f16.begin(), f16.end(), all.begin());
    const std::vector<int32_t> keep = full_positions(all, settings.window, settings.policy);

    std::vector<int32_t> leaving;
    for (const auto & [p, idx] : cells.seq_pos_get(0)) {
        if (!std::binary_search(keep.begin(), keep.end(), p)) {
            if (n_slots >= (int64_t) capacity) {
                LLAMA_LOG_ERROR("%s: the 2-bit tier is full (%u tokens)\n", __func__, capacity);
                pending.clear();
                return false;
            }
            pending.push_back({idx, p, n_slots});
            slot_pos[n_slots++] = p;
            leaving.push_back(p);
        }
    }
    for (const auto & d : pending) {
        cells.rm(d.cell); // the row stays in the buffer until the demote node has read it
    }
    std::vector<int32_t> merged(sorted.size() + leaving.size());
    std::merge(sorted.begin(), sorted.end(), leaving.begin(), leaving.end(), merged.begin());
    sorted.swap(merged);
    refresh_rope_table();
    return true;
}

void logquant_cache::refresh_rope_table() {
    if (rope.n_dims == 0 || n_slots_table >= n_slots) {
        n_slots_table = std::max(n_slots_table, n_slots);
        return;
    }
    // Groups are recomputed whole: G positions, a few hundred sincos.
    const int64_t g0 = n_slots_table / G;
    const int64_t g1 = (n_slots + G - 1) / G;
    const size_t  per_group = lq2_rope_table_size(&rope, G, G);
    for (int64_t g = g0; g < g1; g++) {
        const int64_t n_in = std::min<int64_t>(G, n_slots - g * G);
        lq2_rope_table(&rope, slot_pos.data() + g * G, n_in, G, rope_table.data() + g * per_group);
    }
    n_slots_table = n_slots;
}

bool logquant_cache::seq_rm(llama_kv_cells & cells, int32_t p0, int32_t p1) {
    if (p0 < 0) {
        p0 = 0;
    }
    const int32_t max_pos = seq_pos_max(cells.seq_pos_max(0));
    if (p1 < 0 || p1 > max_pos) {
        p1 = max_pos + 1;
    }
    if (p0 >= p1) {
        return true;
    }
    if (p0 == 0) {
        clear();
        return true;
    }
    if (p1 != max_pos + 1) {
        return false; // a hole in the middle: the policy is defined on a prefix-closed sequence
    }
    // Dropping the tail [p0, end): the tokens that stay must not need to come back to f16.
    std::vector<int32_t> f16;
    for (int32_t p : f16_positions(cells)) {
        if (p < p0) {
            f16.push_back(p);
        }
    }
    const auto q2_end = std::lower_bound(sorted.begin(), sorted.end(), p0);
    std::vector<int32_t> all((q2_end - sorted.begin()) + f16.size());
    std::merge(sorted.begin(), q2_end, f16.begin(), f16.end(), all.begin());
    for (int32_t p : full_positions(all, settings.window, settings.policy)) {
        if (std::binary_search(sorted.begin(), q2_end, p)) {
            LLAMA_LOG_DEBUG("%s: truncating at %d would bring 2-bit token %d back to f16: refused\n",
                            __func__, p0, p);
            return false;
        }
    }
    for (int64_t s = 0; s < n_slots; s++) {
        if (slot_pos[s] >= p0) {
            slot_pos[s] = -1;
        }
    }
    sorted.erase(q2_end, sorted.end());
    return true;
}

void logquant_cache::clear() {
    std::fill(slot_pos.begin(), slot_pos.end(), -1);
    sorted.clear();
    pending.clear();
    n_slots = 0;
    n_slots_table = 0;
}

int32_t logquant_cache::seq_pos_min(int32_t cells_min) const {
    if (sorted.empty()) {
        return cells_min;
    }
    return cells_min < 0 ? sorted.front() : std::min(cells_min, sorted.front());
}

int32_t logquant_cache::seq_pos_max(int32_t cells_max) const {
    if (sorted.empty()) {
        return cells_max;
    }
    return std::max(cells_max, sorted.back());
}

logquant_cache::snapshot logquant_cache::save() const {
    return {n_slots, sorted};
}

void logquant_cache::restore(const snapshot & s) {
    for (int64_t i = s.n_slots; i < n_slots; i++) {
        slot_pos[i] = -1;
    }
    n_slots       = s.n_slots;
    n_slots_table = std::min(n_slots_table, n_slots);
    sorted        = s.sorted;
    pending.clear();
}

// ---------------------------------------------------------------------------------------------
// state: a tagged section after llama_kv_cache's own data

static constexpr uint32_t STATE_MAGIC   = 0x4c513202; // "LQ2", version 2 (per-layer code bits)
static constexpr uint32_t STATE_NO_LQ   = 0x4c513200; // written by a cache without LogQuant

void logquant_cache::state_write(llama_io_write_i & io) const {
    io.write(&STATE_MAGIC, sizeof(STATE_MAGIC));
    const int32_t w = settings.window, pol = settings.policy, g = G, rd = rope.n_dims;
    io.write(&w, sizeof(w));
    io.write(&pol, sizeof(pol));
    io.write(&g, sizeof(g));
    io.write(&rd, sizeof(rd)); // 0: keys stored after RoPE
    io.write(&n_slots, sizeof(n_slots));
    io.write(slot_pos.data(), n_slots * sizeof(int32_t));
    const uint32_t n_layers = layers.size();
    io.write(&n_layers, sizeof(n_layers));
    for (const auto & l : layers) {
        const int64_t n_groups = (n_slots + G - 1) / G;
        const size_t  k_bytes  = n_groups * l.k_group_bytes;
        const size_t  v_bytes  = n_slots * l.v_row_bytes;
        io.write(&l.il, sizeof(l.il));
        io.write(&l.k_bits, sizeof(l.k_bits));
        io.write(&l.v_bits, sizeof(l.v_bits));
        if (k_bytes > 0) {
            io.write_tensor(l.k2, 0, k_bytes);
            io.write_tensor(l.v2, 0, v_bytes);
        }
        // the open group's pre-RoPE f16-precision rows: needed to requantize it as it grows
        const size_t n_open = n_slots % G;
        io.write(l.staging.data(), n_open * l.n_embd_k_gqa * sizeof(float));
    }
}

bool logquant_cache::state_read(llama_io_read_i & io) {
    uint32_t magic = 0;
    io.read(&magic, sizeof(magic));
    if (magic != STATE_MAGIC) {
        LLAMA_LOG_ERROR("%s: this state was not saved by a LogQuant cache\n", __func__);
        return false;
    }
    int32_t w = 0, pol = 0, g = 0, rd = 0;
    io.read(&w, sizeof(w));
    io.read(&pol, sizeof(pol));
    io.read(&g, sizeof(g));
    io.read(&rd, sizeof(rd));
    if (w != settings.window || pol != settings.policy || g != G || rd != rope.n_dims) {
        LLAMA_LOG_ERROR("%s: state saved with window %d policy %d key group %d rope dims %d; this cache has "
                        "%d %d %d %d\n", __func__, w, pol, g, rd, settings.window, settings.policy, G, rope.n_dims);
        return false;
    }
    int64_t n = 0;
    io.read(&n, sizeof(n));
    if (n < 0 || n > (int64_t) capacity) {
        LLAMA_LOG_ERROR("%s: state holds %lld 2-bit tokens, more than this context's %u\n", __func__,
                        (long long) n, capacity);
        return false;
    }
    clear();
    n_slots = n;
    io.read(slot_pos.data(), n * sizeof(int32_t));
    uint32_t n_layers = 0;
    io.read(&n_layers, sizeof(n_layers));
    if (n_layers != layers.size()) {
        LLAMA_LOG_ERROR("%s: state has %u LogQuant layers, this cache %zu\n", __func__, n_layers, layers.size());
        clear();
        return false;
    }
    for (auto & l : layers) {
        int32_t il = -1, kb = 0, vb = 0;
        io.read(&il, sizeof(il));
        io.read(&kb, sizeof(kb));
        io.read(&vb, sizeof(vb));
        if (il != l.il || kb != l.k_bits || vb != l.v_bits) {
            LLAMA_LOG_ERROR("%s: layer %d was saved with %d-bit keys and %d-bit values; this cache's layer %d "
                            "has %d and %d\n", __func__, il, kb, vb, l.il, l.k_bits, l.v_bits);
            clear();
            return false;
        }
        const int64_t n_groups = (n_slots + G - 1) / G;
        const size_t  k_bytes  = n_groups * l.k_group_bytes;
        const size_t  v_bytes  = n_slots * l.v_row_bytes;
        if (k_bytes > 0) {
            io.read_tensor(l.k2, 0, k_bytes);
            io.read_tensor(l.v2, 0, v_bytes);
        }
        io.read(l.staging.data(), (n_slots % G) * l.n_embd_k_gqa * sizeof(float));
    }
    for (int64_t s = 0; s < n_slots; s++) {
        if (slot_pos[s] >= 0) {
            sorted.push_back(slot_pos[s]);
        }
    }
    std::sort(sorted.begin(), sorted.end());
    n_slots_table = 0;
    refresh_rope_table();
    return true;
}

logquant_tier_stats logquant_cache::stats(const llama_kv_cells & cells, int64_t bytes_f16) const {
    logquant_tier_stats s{};
    s.n_f16     = (int64_t) cells.seq_pos_get(0).size();
    s.n_q2      = (int64_t) sorted.size();
    s.n_slots   = n_slots;
    s.bytes_f16 = bytes_f16;
    double bits = 0.0, values = 0.0;
    for (const auto & l : layers) {
        s.bytes_q2 += (int64_t) (ggml_nbytes(l.k2) + ggml_nbytes(l.v2));
        bits   += 8.0 * ((double) l.k_group_bytes / G + (double) l.v_row_bytes);
        values += (double) (l.n_embd_k_gqa + l.n_embd_v_gqa);
    }
    s.q2_bits_per_value = values > 0.0 ? bits / values : 0.0;
    return s;
}

// ---------------------------------------------------------------------------------------------
// graph ops (CPU; the ops read the plan through userdata, so no host copy of K/V data)

// Quantizes this ubatch's leaving tokens into the 2-bit stores of one layer. Single-threaded:
// it touches W tokens every W decode steps, or one prompt's worth once.
static void logquant_demote_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    GGML_UNUSED(nth);
    if (ith != 0) {
        return;
    }
    auto & l  = *(logquant_cache::layer *) userdata;
    auto & lq = *l.owner;
    const ggml_tensor * kc = dst->src[1]; // f16 K cache rows (after this ubatch's writes)
    const ggml_tensor * vc = dst->src[2];
    const int64_t nk = l.n_embd_k_gqa;
    const int64_t nv = l.n_embd_v_gqa;
    const int64_t D  = nk / l.n_head_kv;
    const int64_t G  = lq.G;
    const size_t  group_bytes = l.k_group_bytes;
    const size_t  vrow_bytes  = l.v_row_bytes;

    std::vector<float> row(std::max(nk, nv));
    for (size_t i = 0; i < lq.pending.size(); i++) {
        const auto & d = lq.pending[i];
        // values: per token
        const ggml_fp16_t * vsrc = (const ggml_fp16_t *) ((const char *) vc->data + d.cell * vc->nb[1]);
        ggml_fp16_to_fp32_row(vsrc, row.data(), nv);
        lq2_quantize_v_row(row.data(), (char *) l.v2->data + d.slot * vrow_bytes, nv, l.v_bits);
        // keys: un-rotate, stage in the open group, requantize the group when it fills or the
        // ubatch's demotions end inside it
        const ggml_fp16_t * ksrc = (const ggml_fp16_t *) ((const char *) kc->data + d.cell * kc->nb[1]);
        float * staged = l.staging.data() + (d.slot % G) * nk;
        ggml_fp16_to_fp32_row(ksrc, staged, nk);
        if (lq.rope.n_dims > 0) {
            lq2_rope_rows(&lq.rope, staged, (int) D, (int) l.n_head_kv, d.pos, /*inverse =*/ 1);
        }
        const bool last_of_group = d.slot % G == G - 1;
        const bool last_of_batch = i + 1 == lq.pending.size();
        if (last_of_group || last_of_batch) {
            const int n_tok = (int) (d.slot % G) + 1;
            lq2_quantize_k_group(l.staging.data(), nk, n_tok, (int) nk, (int) G, l.k_bits,
                                 (char *) l.k2->data + (d.slot / G) * group_bytes);
        }
    }
}

ggml_tensor * logquant_cache::build_demote(ggml_context * ctx, int32_t il, ggml_tensor * k_written,
                                           ggml_tensor * v_written) {
    layer & l = layers[layer_of.at(il)];
    ggml_tensor * args[] = {k_written, v_written};
    // in place on k2: the attention node takes this result, which orders it after the demotion
    ggml_tensor * out = ggml_custom_inplace(ctx, l.k2, args, 2, logquant_demote_op, 1, &l);
    ggml_format_name(out, "lq_demote_l%d", il);
    return out;
}

// Attention of every query token over the f16 tier (the cache's K/V views and KQ mask) and the
// 2-bit tier (all slots; freed slots and causally later tokens masked) in one online softmax.
static void logquant_attn_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto & l  = *(const logquant_cache::layer *) userdata;
    const auto & lq = *l.owner;
    const ggml_tensor * q    = dst->src[0]; // f32 [D, n_head, n_tokens]
    const ggml_tensor * k    = dst->src[1]; // f16 [D, n_head_kv, n_kv]
    const ggml_tensor * v    = dst->src[2];
    const ggml_tensor * mask = dst->src[3]; // [n_kv, n_tokens(padded)], f16 or f32

    const int64_t D        = q->ne[0];
    const int64_t n_head   = q->ne[1];
    const int64_t n_tokens = q->ne[2];
    const int64_t n_kv     = k->ne[2];

    lq2_attn_params p;
    p.head_dim  = (int32_t) D;
    p.n_head    = (int32_t) n_head;
    p.n_head_kv = (int32_t) l.n_head_kv;
    p.scale     = l.kq_scale;
    p.softcap   = l.softcap;
    p.max_bias  = l.max_bias;

    thread_local std::vector<char>  work;
    thread_local std::vector<float> qrow, mask_a, mask_b, out;
    work.resize(lq2_attn_work_size(&p, lq.G, lq.rope.n_dims));
    qrow.resize(D * n_head);
    out.resize(D * n_head);
    mask_a.resize(n_kv);
    mask_b.resize(lq.n_slots);

    lq2_tier_f16 ta;
    ta.n    = n_kv;
    ta.k    = (const lq2_half *) k->data;
    ta.nb_k = k->nb[2];
    ta.v    = (const lq2_half *) v->data;
    ta.nb_v = v->nb[2];
    ta.mask = mask_a.data();

    lq2_tier_q2 tb;
    tb.n          = lq.n_slots;
    tb.G          = lq.G;
    tb.k_bits     = l.k_bits;
    tb.v_bits     = l.v_bits;
    tb.k          = l.k2->data;
    tb.nb_kg      = l.k_group_bytes;
    tb.v          = l.v2->data;
    tb.nb_v       = l.v_row_bytes;
    tb.pos        = lq.slot_pos.data();
    tb.rope       = lq.rope;
    tb.rope_table = lq.rope.n_dims > 0 ? lq.rope_table.data() : nullptr;
    tb.mask       = mask_b.data();

    // many query tokens: split them over threads; one (decode): split its heads
    const bool by_token = n_tokens >= nth;
    for (int64_t t = by_token ? ith : 0; t < n_tokens; t += by_token ? nth : 1) {
        for (int64_t h = 0; h < n_head; h++) {
            const float * src = (const float *) ((const char *) q->data + t * q->nb[2] + h * q->nb[1]);
            std::memcpy(qrow.data() + h * D, src, D * sizeof(float));
        }
        const char * mrow = (const char *) mask->data + t * mask->nb[1];
        for (int64_t j = 0; j < n_kv; j++) {
            mask_a[j] = mask->type == GGML_TYPE_F16 ? ggml_fp16_to_fp32(((const ggml_fp16_t *) mrow)[j])
                                                    : ((const float *) mrow)[j];
        }
        const int32_t qpos = lq.ubatch_pos[t];
        for (int64_t s = 0; s < lq.n_slots; s++) {
            const int32_t kp = lq.slot_pos[s];
            mask_b[s] = (kp < 0 || kp > qpos) ? -INFINITY : (l.max_bias > 0.0f ? -(float) std::abs(qpos - kp) : 0.0f);
        }
        float * dst_t = (float *) ((char *) dst->data + t * dst->nb[2]);
        if (by_token) {
            lq2_attn_heads(&p, qrow.data(), &ta, &tb, dst_t, 0, 1, work.data());
        } else {
            // each thread writes its own heads' rows of dst
            lq2_attn_heads(&p, qrow.data(), &ta, &tb, out.data(), ith, nth, work.data());
            const int64_t h0 = ith * n_head / nth, h1 = (ith + 1) * n_head / nth;
            std::memcpy(dst_t + h0 * D, out.data() + h0 * D, (h1 - h0) * D * sizeof(float));
        }
    }
}

ggml_tensor * logquant_cache::build_attn(ggml_context * ctx, int32_t il, ggml_tensor * q, ggml_tensor * k,
                                         ggml_tensor * v, ggml_tensor * kq_mask, ggml_tensor * demoted,
                                         float kq_scale, float max_bias, float softcap) {
    layer & l = layers[layer_of.at(il)];
    l.kq_scale = kq_scale;
    l.max_bias = max_bias;
    l.softcap  = softcap;
    GGML_ASSERT(q->type == GGML_TYPE_F32 && k->type == GGML_TYPE_F16 && v->type == GGML_TYPE_F16);
    GGML_ASSERT(k->ne[3] == 1 && "LogQuant: one stream");
    ggml_tensor * args[] = {q, k, v, kq_mask, demoted};
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, q->ne[0], q->ne[1], q->ne[2], 1, args, 5,
                                       logquant_attn_op, GGML_N_TASKS_MAX, &l);
    ggml_format_name(out, "lq_attn_l%d", il);
    return ggml_reshape_2d(ctx, out, q->ne[0] * q->ne[1], q->ne[2]);
}
