#include "logquant-cache.h"

#include "logquant-policy.h"
#include "lq2-attn.h"
#include "lq2-format.h"
#include "lq2-quants.h"

#include "llama-cparams.h"
#include "llama-hparams.h"
#include "llama-impl.h"
#include "llama-batch.h"
#include "llama-io.h"
#include "llama-kv-cells.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <set>
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
                s.layer_bits_error = l; // reported when a cache is created
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
// context parameters and refusals

// Set by create_memory around the cache constructors it calls, on its own thread (see the header).
static thread_local const llama_cparams * t_cparams = nullptr;
static thread_local std::string           t_last_error;

logquant_context_scope::logquant_context_scope(const llama_cparams & cparams) { t_cparams = &cparams; }
logquant_context_scope::~logquant_context_scope() { t_cparams = nullptr; }

const std::string & logquant_refusal() { return t_last_error; }
void                logquant_clear_refusal() { t_last_error.clear(); }

void logquant_cache::refuse(const std::string & why) {
    t_last_error = why;
    throw std::runtime_error("LogQuant cache: " + why);
}

// ---------------------------------------------------------------------------------------------
// construction

logquant_cache::logquant_cache(const llama_model & model, const llama_hparams & hparams, uint32_t kv_size,
                               uint32_t n_seq_max, bool unified)
    : logquant_cache(logquant_settings_current(), model, hparams, kv_size, n_seq_max, unified) {}

// One read of the settings (they may change between two reads by another thread's C API call).
logquant_cache::logquant_cache(const logquant_settings & s, const llama_model & model, const llama_hparams & hparams,
                               uint32_t kv_size, uint32_t n_seq_max, bool unified)
    : G(s.key_group), n_stream(unified ? 1 : std::max(1u, n_seq_max)), settings(s), kv_size(kv_size),
      // without a context (none of llama.cpp's callers), llama.cpp's default ubatch
      n_ubatch(t_cparams ? t_cparams->n_ubatch : 512u), capacity(kv_size * n_stream + n_ubatch),
      n_seq_max(std::max(1u, n_seq_max)) {
    if (!settings.layer_bits_error.empty()) {
        refuse("cannot read LOGQUANT_LAYER_BITS=\"" + settings.layer_bits_error +
               "\": write il:key_bits:value_bits,... e.g. 0:8:8,1:4:4");
    }
    if (settings.window < 1) {
        refuse("window must be >= 1, got " + std::to_string(settings.window));
    }
    bool bits_ok = LQ2_BITS_VALID(settings.key_bits) && LQ2_BITS_VALID(settings.value_bits);
    for (const auto & lb : settings.layer_bits) {
        bits_ok = bits_ok && lb.il >= 0 && LQ2_BITS_VALID(lb.key_bits) && LQ2_BITS_VALID(lb.value_bits);
    }
    if (!bits_ok) {
        refuse("code bits must be 2, 4 or 8 (LOGQUANT_KEY_BITS, LOGQUANT_VALUE_BITS, LOGQUANT_LAYER_BITS=il:k:v,...)");
    }
    bool group_ok = lq2_key_type_b(G, settings.key_bits) >= 0;
    for (const auto & lb : settings.layer_bits) {
        group_ok = group_ok && lq2_key_type_b(G, lb.key_bits) >= 0;
    }
    if (!group_ok) {
        refuse("key group " + std::to_string(G) + " is not available with these key bits (2-bit keys: 32, 64, "
               "128; 4- and 8-bit keys: 64)");
    }

    // Keys are stored before RoPE when we can undo and redo the graph's RoPE exactly: plain
    // NORM/NEOX rotation with the context's base and scale (its overrides, not the trained values),
    // without YaRN or per-frequency factors. Otherwise they are stored as the cache holds them,
    // after RoPE: the explicit fallback. A model without RoPE (ALiBi) has nothing to undo.
    rope = {};
    no_rope = hparams.rope_type == LLAMA_ROPE_TYPE_NONE;
    const float freq_base   = t_cparams ? t_cparams->rope_freq_base  : hparams.rope_freq_base_train;
    const float freq_scale  = t_cparams ? t_cparams->rope_freq_scale : hparams.rope_freq_scale_train;
    const bool  yarn        = t_cparams ? t_cparams->yarn_ext_factor != 0.0f
                                        : hparams.rope_scaling_type_train == LLAMA_ROPE_SCALING_TYPE_YARN;
    const float attn_factor = t_cparams ? t_cparams->yarn_attn_factor : 1.0f;
    const bool plain_rope = (hparams.rope_type == LLAMA_ROPE_TYPE_NORM || hparams.rope_type == LLAMA_ROPE_TYPE_NEOX) &&
                            !yarn && model.layers.size() > 0 && model.layers[0].rope_freqs == nullptr;
    if (no_rope) {
        // keys are position-free: grouped per channel as they are, and shifts only move positions
    } else if (plain_rope && !settings.keys_post_rope) {
        rope.mode        = hparams.rope_type == LLAMA_ROPE_TYPE_NEOX ? LQ2_ROPE_NEOX : LQ2_ROPE_NORMAL;
        rope.n_dims      = (int32_t) hparams.n_rot();
        rope.freq_base   = freq_base;
        rope.freq_scale  = freq_scale;
        rope.attn_factor = attn_factor;
    } else if (settings.keys_post_rope) {
        LLAMA_LOG_INFO("%s: keys grouped per channel AFTER RoPE, as asked (LOGQUANT_KEYS_POST_ROPE)\n", __func__);
    } else {
        LLAMA_LOG_WARN("%s: this context's RoPE is not plain NORM/NEOX (%s): 2-bit keys are grouped per channel "
                       "AFTER RoPE (lower quality than pre-RoPE; no context shift)\n", __func__,
                       yarn ? "YaRN" : "rope type or frequency factors");
    }
    // Each sequence may hold a partial group open; a sequence reaches the 2-bit tier only past 2W
    // tokens, which bounds how many can at once.
    const int64_t n_open_max = std::min<int64_t>(this->n_seq_max, capacity / (2 * (int64_t) settings.window + 1) + 1);
    n_groups = (capacity + G - 1) / G + n_open_max;
    bk.slot_pos.assign(n_groups * G, -1);
    bk.slot_seq.assign(n_groups * G, this->n_seq_max);
    bk.sorted.assign(this->n_seq_max, {});
    bk.open_group.assign(this->n_seq_max, -1);
    bk.group_fill.assign(n_groups, 0);
    bk.group_live.assign(n_groups, 0);
    rope_table.assign(lq2_rope_table_size(&rope, n_groups * G, G), 0);
    std::string overrides;
    for (const auto & lb : settings.layer_bits) {
        overrides += " " + std::to_string(lb.il) + ":" + std::to_string(lb.key_bits) + ":" + std::to_string(lb.value_bits);
    }
    LLAMA_LOG_INFO("%s: LogQuant cache: window %d, policy %s, low-bit tier %u tokens, keys %s RoPE in groups "
                   "of %d, bits K %d V %d%s%s\n", __func__, settings.window,
                   settings.policy == LOGQUANT_POLICY_LOG ? "log" : "window", capacity,
                   rope.n_dims > 0 ? "before" : no_rope ? "without" : "after", G, settings.key_bits, settings.value_bits,
                   overrides.empty() ? "" : ", layers il:K:V", overrides.c_str());
}

std::string logquant_cache::check_supported(const llama_model & model, const llama_hparams & hparams, bool v_trans,
                                            bool reuses_kv) const {
    if (!hparams.causal_attn) {
        return "the model's attention is not causal (the 2-bit tier is read causally)";
    }
    for (const auto & layer : model.layers) {
        if (layer.attn_sinks) {
            return "the model's attention has sinks (gpt-oss and similar), which the 2-bit attention does not "
                   "handle yet; use kv_type f16, q8_0 or q4_0";
        }
    }
    if (reuses_kv) {
        return "some layers of this model reuse another layer's KV cache (Gemma 3n / Gemma 4), which the 2-bit "
               "tier does not handle yet; use kv_type f16, q8_0 or q4_0";
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
    const uint64_t seqs_per_stream = n_stream == 1 ? n_seq_max : 1;
    const uint64_t need = 3ull * (uint64_t) settings.window * seqs_per_stream + (uint64_t) n_ubatch;
    const uint64_t padded = (need + n_pad - 1) / n_pad * n_pad;
    return (uint32_t) std::min<uint64_t>(kv_size_requested, padded);
}

void logquant_cache::bind(std::vector<llama_kv_cells> & cells, const std::vector<uint32_t> & seq_stream,
                          uint32_t size) {
    GGML_ASSERT(cells.size() == n_stream);
    v_cells       = &cells;
    seq_to_stream = &seq_stream;
    stream_size   = size;
}

llama_kv_cells & logquant_cache::cells_of(int32_t seq_id) const {
    return (*v_cells)[(*seq_to_stream)[seq_id]];
}

void logquant_cache::add_layer(ggml_context * ctx, int32_t il, uint32_t n_embd_k_gqa, uint32_t n_embd_v_gqa,
                               uint32_t n_head_kv) {
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
    l.v2 = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, n_groups * G * (int64_t) l.v_row_bytes);
    ggml_format_name(l.k2, "cache_k2_l%d", il);
    ggml_format_name(l.v2, "cache_v2_l%d", il);
    layer_of[il] = layers.size();
    layers.push_back(std::move(l));
}

// ---------------------------------------------------------------------------------------------
// policy bookkeeping (host)

// Ascending positions of the f16 tier's tokens of a sequence, and their cells.
static std::vector<std::pair<int32_t, uint32_t>> f16_tokens(const llama_kv_cells & cells, int32_t seq_id) {
    std::vector<std::pair<int32_t, uint32_t>> out;
    for (const auto & [pos, idx] : cells.seq_pos_get(seq_id)) {
        out.emplace_back(pos, idx);
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

// Groups that demoting n_leave more tokens of seq_id takes beyond its open group's free slots.
static int64_t groups_needed(const logquant_cache::book & bk, int32_t seq_id, int64_t n_leave, int G) {
    const int64_t g    = bk.open_group[seq_id];
    const int64_t room = g < 0 ? 0 : G - bk.group_fill[g];
    return (std::max<int64_t>(0, n_leave - room) + G - 1) / G;
}

static int64_t free_groups(const logquant_cache::book & bk) {
    return std::count(bk.group_fill.begin(), bk.group_fill.end(), 0);
}

std::vector<std::pair<int32_t, uint32_t>> logquant_cache::leaving(int32_t seq_id, const std::vector<int32_t> & incoming,
                                                                  int64_t & n_incoming_leaving) const {
    const auto f16 = f16_tokens(cells_of(seq_id), seq_id);
    const auto & q2 = bk.sorted[seq_id];
    std::vector<int32_t> all(q2);
    all.reserve(q2.size() + f16.size() + incoming.size());
    for (const auto & [p, idx] : f16) {
        all.push_back(p);
    }
    std::inplace_merge(all.begin(), all.begin() + q2.size(), all.end());
    const size_t n_held = all.size();
    all.insert(all.end(), incoming.begin(), incoming.end());
    std::sort(all.begin() + n_held, all.end());
    std::inplace_merge(all.begin(), all.begin() + n_held, all.end());
    const std::vector<int32_t> keep = full_positions(all, settings.window, settings.policy);
    std::vector<std::pair<int32_t, uint32_t>> out;
    for (const auto & [p, idx] : f16) {
        if (!std::binary_search(keep.begin(), keep.end(), p)) {
            out.emplace_back(p, idx);
        }
    }
    n_incoming_leaving = 0;
    for (int32_t p : incoming) {
        n_incoming_leaving += !std::binary_search(keep.begin(), keep.end(), p);
    }
    return out;
}

bool logquant_cache::has_room(const llama_ubatch & ubatch) const {
    if (!planning) {
        return true;
    }
    // the same count as plan() makes once the ubatch is placed, with its positions added here
    int64_t need = 0;
    for (uint32_t i = 0; i < ubatch.n_seqs_unq; i++) {
        const int32_t s = ubatch.seq_id_unq[i];
        std::vector<int32_t> incoming;
        for (uint32_t t = 0; t < ubatch.n_tokens; t++) {
            for (int32_t j = 0; j < ubatch.n_seq_id[t]; j++) {
                if (ubatch.seq_id[t][j] == s) {
                    incoming.push_back(ubatch.pos[t]);
                }
            }
        }
        int64_t n_new_leaving = 0;
        const int64_t n_old_leaving = (int64_t) leaving(s, incoming, n_new_leaving).size();
        need += groups_needed(bk, s, n_old_leaving + n_new_leaving, G);
    }
    return free_groups(bk) >= need;
}

int64_t logquant_cache::alloc_slot(int32_t seq_id) {
    int64_t g = bk.open_group[seq_id];
    if (g < 0) {
        // the lowest free group: slots stay dense, and a lone sequence's groups are 0, 1, 2, ...
        // as they were before any other sequence came and went
        const auto it = std::find(bk.group_fill.begin(), bk.group_fill.end(), 0);
        if (it == bk.group_fill.end()) {
            return -1;
        }
        g = it - bk.group_fill.begin();
        bk.open_group[seq_id] = g;
    }
    const int64_t slot = g * G + bk.group_fill[g]++;
    if (bk.group_fill[g] == G) {
        bk.open_group[seq_id] = -1;
    }
    bk.n_slots = std::max(bk.n_slots, slot + 1);
    return slot;
}

void logquant_cache::drop_seq_from_slot(int64_t slot, int32_t seq_id) {
    if (bk.slot_pos[slot] < 0 || !bk.slot_seq.test(slot, seq_id)) {
        return;
    }
    bk.slot_seq.reset(slot, seq_id);
    if (bk.slot_seq.none(slot)) {
        bk.slot_pos[slot] = -1;
        bk.group_live[slot / G]--;
    }
}

void logquant_cache::forget_seq(int32_t seq_id) {
    for (int64_t slot = 0; slot < bk.n_slots; slot++) {
        drop_seq_from_slot(slot, seq_id);
    }
    bk.sorted[seq_id].clear();
    bk.open_group[seq_id] = -1;
}

void logquant_cache::settle_groups() {
    std::set<int64_t> open;
    for (int64_t g : bk.open_group) {
        if (g >= 0) {
            open.insert(g);
        }
    }
    bk.n_slots = 0;
    for (int64_t g = 0; g < n_groups; g++) {
        if (bk.group_fill[g] == 0 || open.count(g)) {
            bk.n_slots = bk.group_fill[g] > 0 ? g * G + bk.group_fill[g] : bk.n_slots;
            continue;
        }
        // closed: nobody adds to it again, so its f16-precision staging can go
        for (auto & l : layers) {
            l.staging.erase(g);
        }
        if (bk.group_live[g] == 0) {
            bk.group_fill[g] = 0;
            std::fill_n(bk.slot_pos.begin() + g * G, G, -1);
            bk.slot_seq.clear(g * G, G);
        } else {
            bk.n_slots = g * G + bk.group_fill[g];
        }
    }
}

void logquant_cache::refresh_rope_group(int64_t g) {
    if (rope.n_dims == 0) {
        return;
    }
    const size_t per_group = lq2_rope_table_size(&rope, G, G);
    lq2_rope_table(&rope, bk.slot_pos.data() + g * G, G, G, rope_table.data() + g * per_group);
}

bool logquant_cache::plan(const llama_ubatch & ubatch) {
    if (!overrides_checked) { // every add_layer has run by now
        overrides_checked = true;
        for (const auto & lb : settings.layer_bits) {
            if (!has_layer(lb.il)) {
                LLAMA_LOG_WARN("%s: layer %d has no LogQuant tier (no such layer, or a sliding-window layer kept "
                               "in f16): its code bits are ignored\n", __func__, lb.il);
            }
        }
    }
    ubatch_pos.assign(ubatch.pos, ubatch.pos + ubatch.n_tokens);
    ubatch_seq.resize(ubatch.n_tokens);
    for (uint32_t t = 0; t < ubatch.n_tokens; t++) {
        ubatch_seq[t] = ubatch.seq_id[t][0];
    }
    pending.clear();
    plan_ok = true;
    if (!planning) {
        return true;
    }

    // Only the ubatch's sequences gained tokens; the others' tiers are as the policy left them.
    // First every sequence's leaving tokens, then (if the 2-bit tier takes them all) the moves: a
    // plan cut short would leave slots marked valid with no codes written.
    std::vector<std::vector<std::pair<int32_t, uint32_t>>> leave(ubatch.n_seqs_unq);
    int64_t need = 0;
    for (uint32_t i = 0; i < ubatch.n_seqs_unq; i++) {
        const int32_t s = ubatch.seq_id_unq[i];
        int64_t none = 0;
        leave[i] = leaving(s, {}, none);
        need += groups_needed(bk, s, (int64_t) leave[i].size(), G);
    }
    if (need > free_groups(bk)) {
        LLAMA_LOG_ERROR("%s: the 2-bit tier is full (%u tokens): nothing demoted\n", __func__, capacity);
        plan_ok = false;
        return false;
    }

    std::set<int64_t> touched;
    for (uint32_t i = 0; i < ubatch.n_seqs_unq; i++) {
        const int32_t s = ubatch.seq_id_unq[i];
        auto & cells = cells_of(s);
        const int64_t row0 = (int64_t) (*seq_to_stream)[s] * stream_size;
        auto & q2 = bk.sorted[s];

        std::vector<int32_t> leaving;
        for (const auto & [p, idx] : leave[i]) {
            const int64_t slot = alloc_slot(s);
            GGML_ASSERT(slot >= 0); // counted above
            pending.push_back({row0 + idx, p, slot});
            bk.slot_pos[slot] = p;
            bk.slot_seq.clear(slot);
            bk.slot_seq.set(slot, s);
            bk.group_live[slot / G]++;
            touched.insert(slot / G);
            leaving.push_back(p);
            // the row stays in the buffer until the demote node has read it; a cell other
            // sequences still keep in f16 stays theirs
            cells.seq_rm(idx, s);
        }
        const size_t n_old = q2.size();
        q2.insert(q2.end(), leaving.begin(), leaving.end());
        std::inplace_merge(q2.begin(), q2.begin() + n_old, q2.end());
    }
    std::sort(pending.begin(), pending.end(),
              [](const demotion & a, const demotion & b) { return a.slot < b.slot; });
    for (int64_t g : touched) {
        refresh_rope_group(g);
    }
    return true;
}

bool logquant_cache::seq_rm(int32_t seq_id, int32_t p0, int32_t p1) {
    p0 = std::max(p0, 0);
    std::vector<int32_t> seqs;
    for (int32_t s = 0; s < (int32_t) n_seq_max; s++) {
        if ((seq_id < 0 || s == seq_id) && !bk.sorted[s].empty()) {
            seqs.push_back(s);
        }
    }
    // All or nothing: first check every sequence, then change them.
    std::vector<std::pair<int32_t, int32_t>> todo; // (sequence, first position removed)
    for (int32_t s : seqs) {
        const auto & cells = cells_of(s);
        const int32_t max_pos = seq_pos_max(s, cells.seq_pos_max(s));
        const int32_t e = (p1 < 0 || p1 > max_pos) ? max_pos + 1 : p1;
        if (p0 >= e) {
            continue;
        }
        if (e != max_pos + 1) {
            todo.emplace_back(s, p0); // inside: the slots of [p0, e) go (below), nothing comes back
            continue;
        }
        if (p0 > 0) {
            // Dropping the tail [p0, end): the tokens that stay must not need to come back to f16.
            const auto & q2 = bk.sorted[s];
            std::vector<int32_t> all;
            for (const auto & [p, idx] : f16_tokens(cells, s)) {
                if (p < p0) {
                    all.push_back(p);
                }
            }
            const auto q2_end = std::lower_bound(q2.begin(), q2.end(), p0);
            const size_t n_f16 = all.size();
            all.insert(all.end(), q2.begin(), q2_end);
            std::inplace_merge(all.begin(), all.begin() + n_f16, all.end());
            for (int32_t p : full_positions(all, settings.window, settings.policy)) {
                if (std::binary_search(q2.begin(), q2_end, p)) {
                    LLAMA_LOG_DEBUG("%s: truncating sequence %d at %d would bring 2-bit token %d back to f16: "
                                    "refused\n", __func__, s, p0, p);
                    return false;
                }
            }
        }
        todo.emplace_back(s, p0);
    }
    for (const auto & [s, first] : todo) {
        const int32_t max_pos = seq_pos_max(s, cells_of(s).seq_pos_max(s));
        const int32_t e = (p1 < 0 || p1 > max_pos) ? max_pos + 1 : p1;
        for (int64_t slot = 0; slot < bk.n_slots; slot++) {
            if (bk.slot_pos[slot] >= first && bk.slot_pos[slot] < e) {
                drop_seq_from_slot(slot, s);
            }
        }
        auto & q2 = bk.sorted[s];
        q2.erase(std::lower_bound(q2.begin(), q2.end(), first), std::lower_bound(q2.begin(), q2.end(), e));
        if (q2.empty()) {
            bk.open_group[s] = -1; // a sequence that starts over gets fresh groups
        }
    }
    settle_groups();
    return true;
}

template <typename F>
bool logquant_cache::move_positions(int32_t seq_id, int32_t p0, int32_t p1, F new_pos) {
    if (!can_shift()) {
        return false; // post-RoPE keys: a new position would need the key requantized
    }
    p0 = std::max(p0, 0);
    p1 = p1 < 0 ? std::numeric_limits<int32_t>::max() : p1;
    std::vector<bool> moved(n_seq_max, false); // sequences whose sorted positions change
    std::set<int64_t> touched;
    for (int64_t slot = 0; slot < bk.n_slots; slot++) {
        const int32_t p = bk.slot_pos[slot];
        if (p < p0 || p >= p1 || !bk.slot_seq.test(slot, seq_id)) {
            continue;
        }
        for (int32_t s = 0; s < (int32_t) n_seq_max; s++) {
            moved[s] = moved[s] || bk.slot_seq.test(slot, s);
        }
        touched.insert(slot / G);
        const int32_t np = new_pos(p);
        if (np < 0) { // llama.cpp drops such a cell from every sequence
            bk.slot_pos[slot] = -1;
            bk.slot_seq.clear(slot);
            bk.group_live[slot / G]--;
        } else {
            bk.slot_pos[slot] = np;
        }
    }
    for (int32_t s = 0; s < (int32_t) n_seq_max; s++) {
        if (!moved[s]) {
            continue;
        }
        auto & q2 = bk.sorted[s];
        q2.clear();
        for (int64_t slot = 0; slot < bk.n_slots; slot++) {
            if (bk.slot_pos[slot] >= 0 && bk.slot_seq.test(slot, s)) {
                q2.push_back(bk.slot_pos[slot]);
            }
        }
        std::sort(q2.begin(), q2.end());
    }
    settle_groups();
    for (int64_t g : touched) {
        refresh_rope_group(g);
    }
    return true;
}

bool logquant_cache::seq_add(int32_t seq_id, int32_t p0, int32_t p1, int32_t shift) {
    return move_positions(seq_id, p0, p1, [shift](int32_t p) { return p + shift; });
}

bool logquant_cache::seq_div(int32_t seq_id, int32_t p0, int32_t p1, int32_t d) {
    return move_positions(seq_id, p0, p1, [d](int32_t p) { return p / d; });
}

void logquant_cache::seq_cp(int32_t seq_src, int32_t seq_dst, int32_t p0, int32_t p1, bool replace) {
    if (seq_src == seq_dst) {
        return;
    }
    if (replace) {
        forget_seq(seq_dst);
        settle_groups();
    }
    p0 = std::max(p0, 0);
    p1 = p1 < 0 ? std::numeric_limits<int32_t>::max() : p1;
    auto & dst = bk.sorted[seq_dst];
    const size_t n_old = dst.size();
    for (int64_t slot = 0; slot < bk.n_slots; slot++) {
        const int32_t p = bk.slot_pos[slot];
        if (p >= p0 && p < p1 && bk.slot_seq.test(slot, seq_src) && !bk.slot_seq.test(slot, seq_dst)) {
            bk.slot_seq.set(slot, seq_dst);
            dst.push_back(p);
        }
    }
    std::sort(dst.begin() + n_old, dst.end());
    std::inplace_merge(dst.begin(), dst.begin() + n_old, dst.end());
}

void logquant_cache::seq_keep(int32_t seq_id) {
    for (int32_t s = 0; s < (int32_t) n_seq_max; s++) {
        // as llama.cpp's seq_keep, which clears the other sequences of seq_id's stream only
        if (s == seq_id || bk.sorted[s].empty() || (*seq_to_stream)[s] != (*seq_to_stream)[seq_id]) {
            continue;
        }
        forget_seq(s);
    }
    settle_groups();
}

void logquant_cache::clear() {
    std::fill(bk.slot_pos.begin(), bk.slot_pos.end(), -1);
    std::fill(bk.slot_seq.bits.begin(), bk.slot_seq.bits.end(), 0);
    for (auto & q2 : bk.sorted) {
        q2.clear();
    }
    std::fill(bk.open_group.begin(), bk.open_group.end(), -1);
    std::fill(bk.group_fill.begin(), bk.group_fill.end(), 0);
    std::fill(bk.group_live.begin(), bk.group_live.end(), 0);
    bk.n_slots = 0;
    for (auto & l : layers) {
        l.staging.clear();
    }
    pending.clear();
}

int32_t logquant_cache::seq_pos_min(int32_t seq_id, int32_t cells_min) const {
    const auto & q2 = bk.sorted[seq_id];
    if (q2.empty()) {
        return cells_min;
    }
    return cells_min < 0 ? q2.front() : std::min(cells_min, q2.front());
}

int32_t logquant_cache::seq_pos_max(int32_t seq_id, int32_t cells_max) const {
    const auto & q2 = bk.sorted[seq_id];
    if (q2.empty()) {
        return cells_max;
    }
    return std::max(cells_max, q2.back());
}

void logquant_cache::restore(const snapshot & s) {
    bk = s;
    pending.clear();
}

// ---------------------------------------------------------------------------------------------
// state: a tagged section after llama_kv_cache's own data

static constexpr uint32_t STATE_MAGIC   = 0x4c513203; // "LQ2", version 3 (sequences per slot)

void logquant_cache::state_write(llama_io_write_i & io, int32_t seq_id) const {
    if (seq_id != -1) {
        // a sequence's 2-bit slots are interleaved with the others' in shared groups
        throw std::runtime_error("the LogQuant cache saves the whole context's state only, not one sequence's");
    }
    io.write(&STATE_MAGIC, sizeof(STATE_MAGIC));
    const int32_t w = settings.window, pol = settings.policy, g = G, rd = rope.n_dims;
    io.write(&w, sizeof(w));
    io.write(&pol, sizeof(pol));
    io.write(&g, sizeof(g));
    io.write(&rd, sizeof(rd)); // 0: keys stored after RoPE
    const int64_t n = bk.n_slots;
    const int64_t n_grp = (n + G - 1) / G;
    io.write(&n, sizeof(n));
    io.write(bk.slot_pos.data(), n * sizeof(int32_t));
    // the sequences of each valid slot, as (count, ids)
    for (int64_t slot = 0; slot < n; slot++) {
        std::vector<int32_t> ids;
        for (int32_t s = 0; s < (int32_t) n_seq_max && bk.slot_pos[slot] >= 0; s++) {
            if (bk.slot_seq.test(slot, s)) {
                ids.push_back(s);
            }
        }
        const int32_t n_ids = (int32_t) ids.size();
        io.write(&n_ids, sizeof(n_ids));
        if (n_ids > 0) { // (data() of an empty vector may be null: no memcpy from it)
            io.write(ids.data(), ids.size() * sizeof(int32_t));
        }
    }
    io.write(bk.group_fill.data(), n_grp * sizeof(int32_t));
    // open groups: (sequence, group) pairs
    std::vector<int64_t> open;
    for (int32_t s = 0; s < (int32_t) n_seq_max; s++) {
        if (bk.open_group[s] >= 0) {
            open.push_back(s);
            open.push_back(bk.open_group[s]);
        }
    }
    const int32_t n_open = (int32_t) open.size() / 2;
    io.write(&n_open, sizeof(n_open));
    if (n_open > 0) {
        io.write(open.data(), open.size() * sizeof(int64_t));
    }
    const uint32_t n_layers = layers.size();
    io.write(&n_layers, sizeof(n_layers));
    for (const auto & l : layers) {
        const size_t k_bytes = n_grp * l.k_group_bytes;
        const size_t v_bytes = n * l.v_row_bytes;
        io.write(&l.il, sizeof(l.il));
        io.write(&l.k_bits, sizeof(l.k_bits));
        io.write(&l.v_bits, sizeof(l.v_bits));
        if (k_bytes > 0) {
            io.write_tensor(l.k2, 0, k_bytes);
            io.write_tensor(l.v2, 0, v_bytes);
        }
        // the open groups' pre-RoPE f16-precision rows: needed to requantize them as they grow
        for (int32_t i = 0; i < n_open; i++) {
            const int64_t grp = open[2 * i + 1];
            const auto it = l.staging.find(grp);
            GGML_ASSERT(it != l.staging.end());
            io.write(it->second.data(), (size_t) bk.group_fill[grp] * l.n_embd_k_gqa * sizeof(float));
        }
    }
}

bool logquant_cache::state_read(llama_io_read_i & io, int32_t seq_id) {
    if (seq_id != -1) {
        LLAMA_LOG_ERROR("%s: the LogQuant cache restores the whole context's state only, not one sequence's\n",
                        __func__);
        return false;
    }
    uint32_t magic = 0;
    io.read(&magic, sizeof(magic));
    if (magic != STATE_MAGIC) {
        LLAMA_LOG_ERROR("%s: this state was not saved by a LogQuant cache of this version\n", __func__);
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
    if (n < 0 || n > (int64_t) bk.slot_pos.size()) {
        LLAMA_LOG_ERROR("%s: state holds %lld 2-bit slots, more than this context's %zu\n", __func__,
                        (long long) n, bk.slot_pos.size());
        return false;
    }
    clear();
    const int64_t n_grp = (n + G - 1) / G;
    std::vector<int64_t> open;
    std::string why;
    if (!read_book(io, n, n_grp, open, why)) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, why.c_str());
        clear();
        return false;
    }
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
        const size_t k_bytes = n_grp * l.k_group_bytes;
        const size_t v_bytes = n * l.v_row_bytes;
        if (k_bytes > 0) {
            io.read_tensor(l.k2, 0, k_bytes);
            io.read_tensor(l.v2, 0, v_bytes);
        }
        for (size_t i = 0; i < open.size(); i += 2) {
            const int64_t grp = open[i + 1];
            auto & st = l.staging[grp];
            st.assign((size_t) G * l.n_embd_k_gqa, 0.0f);
            io.read(st.data(), (size_t) bk.group_fill[grp] * l.n_embd_k_gqa * sizeof(float)); // fill < G: checked
        }
    }
    for (int64_t grp = 0; grp < n_grp; grp++) {
        refresh_rope_group(grp);
    }
    return true;
}

// The slots, their sequences, the groups and the open groups of a state, each count and index
// checked against this cache before it is used (a corrupt file must not make alloc_slot or the
// attention read or write past a group), and the tokens checked against the f16 tier read just
// before: no position twice in a sequence, no stream holding more tokens than the context has.
bool logquant_cache::read_book(llama_io_read_i & io, int64_t n, int64_t n_grp, std::vector<int64_t> & open,
                               std::string & why) {
    io.read(bk.slot_pos.data(), n * sizeof(int32_t));
    for (int64_t slot = 0; slot < n; slot++) {
        const int32_t pos = bk.slot_pos[slot];
        int32_t n_ids = 0;
        io.read(&n_ids, sizeof(n_ids));
        // (a position must leave room for the next one: llama.cpp adds 1 to the largest)
        if (pos < -1 || pos == std::numeric_limits<int32_t>::max() || n_ids < 0 || n_ids > (int32_t) n_seq_max ||
            (pos < 0) != (n_ids == 0)) {
            why = "corrupt slot " + std::to_string(slot) + " (position " + std::to_string(pos) + ", " +
                  std::to_string(n_ids) + " sequences)";
            return false;
        }
        for (int32_t i = 0; i < n_ids; i++) {
            int32_t s = -1;
            io.read(&s, sizeof(s));
            if (s < 0 || s >= (int32_t) n_seq_max) {
                why = "the state holds sequence id " + std::to_string(s) + ", which this context does not have";
                return false;
            }
            if (bk.slot_seq.test(slot, s)) {
                why = "corrupt slot sequences (a sequence twice)";
                return false;
            }
            bk.slot_seq.set(slot, s);
            bk.sorted[s].push_back(pos);
        }
        if (pos >= 0) {
            bk.group_live[slot / G]++;
        }
    }
    io.read(bk.group_fill.data(), n_grp * sizeof(int32_t));
    for (int64_t grp = 0; grp < n_grp; grp++) {
        const int32_t fill = bk.group_fill[grp];
        // the scanned slots end where the last group's handed-out slots end (settle_groups)
        if (fill < 0 || fill > G || grp * G + fill > n || (grp == n_grp - 1 && grp * G + fill != n)) {
            why = "corrupt group fill or slot count";
            return false;
        }
        for (int64_t slot = grp * G + fill; slot < std::min<int64_t>(n, (grp + 1) * G); slot++) {
            if (bk.slot_pos[slot] >= 0) {
                why = "corrupt group fill (a valid slot past it)";
                return false;
            }
        }
    }
    int32_t n_open = 0;
    io.read(&n_open, sizeof(n_open));
    if (n_open < 0 || n_open > (int32_t) n_seq_max) {
        why = "corrupt open groups";
        return false;
    }
    open.assign(2 * (size_t) n_open, 0);
    if (n_open > 0) {
        io.read(open.data(), open.size() * sizeof(int64_t));
    }
    for (int32_t i = 0; i < n_open; i++) {
        const int64_t s = open[2 * i], grp = open[2 * i + 1];
        // an open group has had a slot handed out and has room for more; one sequence fills it
        if (s < 0 || s >= (int64_t) n_seq_max || grp < 0 || grp >= n_grp || bk.open_group[s] >= 0 ||
            bk.group_fill[grp] < 1 || bk.group_fill[grp] >= G ||
            std::find(bk.open_group.begin(), bk.open_group.end(), grp) != bk.open_group.end()) {
            why = "corrupt open groups";
            return false;
        }
        bk.open_group[s] = grp;
    }
    bk.n_slots = n;
    std::vector<int64_t> stream_tokens(n_stream, 0);
    for (uint32_t st = 0; st < n_stream; st++) {
        stream_tokens[st] = (int64_t) (*v_cells)[st].get_used();
    }
    std::vector<int64_t> counted(n_stream, -1); // a slot shared across streams counts in each once
    for (int64_t slot = 0; slot < n; slot++) {
        for (int32_t s = 0; s < (int32_t) n_seq_max && bk.slot_pos[slot] >= 0; s++) {
            const uint32_t st = (*seq_to_stream)[s];
            if (bk.slot_seq.test(slot, s) && counted[st] != slot) {
                counted[st] = slot;
                stream_tokens[st]++;
            }
        }
    }
    for (uint32_t st = 0; st < n_stream; st++) {
        if (stream_tokens[st] > (int64_t) kv_size) {
            why = "the state holds " + std::to_string(stream_tokens[st]) + " tokens" +
                  (n_stream > 1 ? " in stream " + std::to_string(st) : std::string()) + ", more than this context's " +
                  std::to_string(kv_size) + " (n_ctx" + (n_stream > 1 ? " per sequence" : "") + "): load it into a "
                  "context at least that large";
            return false;
        }
    }
    for (int32_t s = 0; s < (int32_t) n_seq_max; s++) {
        auto & q2 = bk.sorted[s];
        std::sort(q2.begin(), q2.end());
        if (std::adjacent_find(q2.begin(), q2.end()) != q2.end()) {
            why = "corrupt slot positions (a position twice in sequence " + std::to_string(s) + ")";
            return false;
        }
        for (const auto & [p, idx] : f16_tokens(cells_of(s), s)) {
            if (p < 0 || p == std::numeric_limits<int32_t>::max()) { // llama.cpp's own cell data does not check this
                why = "corrupt f16 cell position " + std::to_string(p) + " of sequence " + std::to_string(s);
                return false;
            }
            if (std::binary_search(q2.begin(), q2.end(), p)) {
                why = "corrupt slot positions (position " + std::to_string(p) + " of sequence " + std::to_string(s) +
                      " in both tiers)";
                return false;
            }
        }
    }
    return true;
}

logquant_tier_stats logquant_cache::stats(int64_t bytes_f16) const {
    logquant_tier_stats s{};
    for (const auto & cells : *v_cells) {
        s.n_f16 += (int64_t) cells.get_used();
    }
    s.n_q2      = (int64_t) std::count_if(bk.slot_pos.begin(), bk.slot_pos.begin() + bk.n_slots,
                                          [](int32_t p) { return p >= 0; });
    s.n_slots   = bk.n_slots;
    s.bytes_f16 = bytes_f16;
    double bits = 0.0, values = 0.0;
    for (const auto & l : layers) {
        s.bytes_q2 += (int64_t) (ggml_nbytes(l.k2) + ggml_nbytes(l.v2));
        bits   += 8.0 * ((double) l.k_group_bytes / G + (double) l.v_row_bytes);
        values += (double) (l.n_embd_k_gqa + l.n_embd_v_gqa);
    }
    s.q2_bits_per_value = values > 0.0 ? bits / values : 0.0;
    size_t book = bk.slot_pos.size() * sizeof(int32_t) + bk.slot_seq.bits.size() * sizeof(uint64_t) +
                  (bk.group_fill.size() + bk.group_live.size()) * sizeof(int32_t);
    for (const auto & q2 : bk.sorted) {
        book += q2.capacity() * sizeof(int32_t);
    }
    s.bytes_host = (int64_t) (rope_table.size() * sizeof(lq2_half) + book);
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
        const int64_t grp = d.slot / G;
        // values: per token
        const ggml_fp16_t * vsrc = (const ggml_fp16_t *) ((const char *) vc->data + d.row * vc->nb[1]);
        ggml_fp16_to_fp32_row(vsrc, row.data(), nv);
        lq2_quantize_v_row(row.data(), (char *) l.v2->data + d.slot * vrow_bytes, nv, l.v_bits);
        // keys: un-rotate, stage in the group's open rows, requantize the group when it fills or
        // this ubatch's demotions into it end (pending is in slot order: a group's are adjacent)
        auto & staging = l.staging[grp];
        staging.resize((size_t) G * nk);
        const ggml_fp16_t * ksrc = (const ggml_fp16_t *) ((const char *) kc->data + d.row * kc->nb[1]);
        float * staged = staging.data() + (d.slot % G) * nk;
        ggml_fp16_to_fp32_row(ksrc, staged, nk);
        if (lq.rope.n_dims > 0) {
            lq2_rope_rows(&lq.rope, staged, (int) D, (int) l.n_head_kv, d.pos, /*inverse =*/ 1);
        }
        const bool last_of_group = d.slot % G == G - 1;
        const bool last_of_batch = i + 1 == lq.pending.size() || lq.pending[i + 1].slot / G != grp;
        if (last_of_group || last_of_batch) {
            const int n_tok = (int) (d.slot % G) + 1;
            lq2_quantize_k_group(staging.data(), nk, n_tok, (int) nk, (int) G, l.k_bits,
                                 (char *) l.k2->data + grp * group_bytes);
        }
        if (last_of_group) {
            l.staging.erase(grp); // full: never requantized again
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
// Work items are (token, kv head, part): the query heads sharing a kv head go together (its keys
// are dequantized and re-rotated once for them), and when there are fewer (token, kv head) pairs
// than threads (decode, more so with few kv heads) each pair's tokens are split into parts so
// that no thread repeats another's dequantization. dst: [D + 2, n_head, n_tokens, P] per part the
// unnormalized rows and the softmax state (M, S); logquant_merge_op combines the parts.
static void logquant_attn_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto & l  = *(const logquant_cache::layer *) userdata;
    const auto & lq = *l.owner;
    const ggml_tensor * q    = dst->src[0]; // f32 [D, n_head, n_tokens]
    const ggml_tensor * k    = dst->src[1]; // f16 [D, n_head_kv, n_kv, n_stream]
    const ggml_tensor * v    = dst->src[2];
    const ggml_tensor * mask = dst->src[3]; // [n_kv, n_tokens / n_stream, 1, n_stream], f16 or f32

    const int64_t D         = q->ne[0];
    const int64_t n_head    = q->ne[1];
    const int64_t n_tokens  = q->ne[2];
    const int64_t n_kv      = k->ne[2];
    const int64_t n_head_kv = l.n_head_kv;
    const int64_t gq        = n_head / n_head_kv;
    // one stream per sequence: the ubatch holds n_tps tokens of each stream in turn (llama.cpp's
    // split_equal), and each reads its stream's f16 tier
    const int64_t n_tps     = n_tokens / k->ne[3];
    const int64_t n_groups  = (lq.bk.n_slots + lq.G - 1) / lq.G;

    const int64_t pairs  = n_tokens * n_head_kv;
    const int64_t n_part = std::min<int64_t>(dst->ne[3], std::max<int64_t>(1, (nth + pairs - 1) / pairs));

    lq2_attn_params p;
    p.head_dim  = (int32_t) D;
    p.n_head    = (int32_t) n_head;
    p.n_head_kv = (int32_t) n_head_kv;
    p.scale     = l.kq_scale;
    p.softcap   = l.softcap;
    p.max_bias  = l.max_bias;

    thread_local std::vector<char>  work;
    thread_local std::vector<float> qrow, mask_a, mask_b, acc, M, S;
    work.resize(lq2_attn_work_size(&p, lq.G, lq.rope.n_dims));
    qrow.resize(D * n_head);
    acc.resize(D * n_head);
    M.resize(n_head);
    S.resize(n_head);
    mask_a.resize(n_kv);
    mask_b.resize(lq.bk.n_slots);

    for (int64_t item = ith; item < pairs * n_part; item += nth) {
        const int64_t t    = item / (n_head_kv * n_part);
        const int64_t hk   = item / n_part % n_head_kv;
        const int64_t part = item % n_part;
        const int     h0   = (int) (hk * gq), h1 = (int) ((hk + 1) * gq);
        // this part's tokens: a share of the f16 cells and of the 2-bit groups
        const int64_t a0 = n_kv * part / n_part, a1 = n_kv * (part + 1) / n_part;
        const int64_t g0 = n_groups * part / n_part, g1 = n_groups * (part + 1) / n_part;
        const int64_t b0 = g0 * lq.G, b1 = std::min<int64_t>(lq.bk.n_slots, g1 * lq.G);

        for (int h = h0; h < h1; h++) {
            const float * src = (const float *) ((const char *) q->data + t * q->nb[2] + h * q->nb[1]);
            std::memcpy(qrow.data() + h * D, src, D * sizeof(float));
        }
        const char * mrow = (const char *) mask->data + t * mask->nb[1]; // streams' rows are contiguous
        for (int64_t j = a0; j < a1; j++) {
            mask_a[j] = mask->type == GGML_TYPE_F16 ? ggml_fp16_to_fp32(((const ggml_fp16_t *) mrow)[j])
                                                    : ((const float *) mrow)[j];
        }
        const int32_t qpos = lq.ubatch_pos[t];
        const int32_t qseq = lq.ubatch_seq[t];
        for (int64_t s = b0; s < b1; s++) {
            const int32_t kp = lq.bk.slot_pos[s];
            mask_b[s] = (kp < 0 || kp > qpos || !lq.bk.slot_seq.test(s, qseq))
                ? -INFINITY : (l.max_bias > 0.0f ? -(float) std::abs(qpos - kp) : 0.0f);
        }

        lq2_tier_f16 ta;
        ta.n    = a1 - a0;
        ta.nb_k = k->nb[2];
        ta.nb_v = v->nb[2];
        ta.k    = (const lq2_half *) ((const char *) k->data + (t / n_tps) * k->nb[3] + a0 * k->nb[2]);
        ta.v    = (const lq2_half *) ((const char *) v->data + (t / n_tps) * v->nb[3] + a0 * v->nb[2]);
        ta.mask = mask_a.data() + a0;

        lq2_tier_q2 tb;
        tb.n          = b1 - b0;
        tb.G          = lq.G;
        tb.k_bits     = l.k_bits;
        tb.v_bits     = l.v_bits;
        tb.k          = (const char *) l.k2->data + g0 * l.k_group_bytes;
        tb.nb_kg      = l.k_group_bytes;
        tb.v          = (const char *) l.v2->data + b0 * l.v_row_bytes;
        tb.nb_v       = l.v_row_bytes;
        tb.pos        = lq.bk.slot_pos.data() + b0;
        tb.rope       = lq.rope;
        tb.rope_table = lq.rope.n_dims > 0 ? lq.rope_table.data() + g0 * lq.rope.n_dims * lq.G : nullptr;
        tb.mask       = mask_b.data() + b0;

        lq2_attn_partial(&p, qrow.data(), &ta, &tb, h0, h1, acc.data(), M.data(), S.data(), work.data());
        for (int64_t p_out = part; p_out < dst->ne[3]; p_out += n_part) {
            for (int h = h0; h < h1; h++) {
                float * row = (float *) ((char *) dst->data + p_out * dst->nb[3] + t * dst->nb[2] + h * dst->nb[1]);
                if (p_out == part) {
                    std::memcpy(row, acc.data() + h * D, D * sizeof(float));
                    row[D]     = M[h];
                    row[D + 1] = S[h];
                } else {
                    row[D + 1] = 0.0f; // a part this thread count left unused: empty
                }
            }
        }
    }
}

// Combines the parts of logquant_attn_op into normalized rows [D, n_head, n_tokens].
static void logquant_merge_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    GGML_UNUSED(userdata);
    const ggml_tensor * parts = dst->src[0];
    const int64_t D = dst->ne[0], n_head = dst->ne[1], n_rows = dst->ne[1] * dst->ne[2];
    for (int64_t r = ith; r < n_rows; r += nth) {
        const int64_t t = r / n_head, h = r % n_head;
        const float * src = (const float *) ((const char *) parts->data + t * parts->nb[2] + h * parts->nb[1]);
        float * out = (float *) ((char *) dst->data + t * dst->nb[2] + h * dst->nb[1]);
        lq2_attn_merge((int) D, (int) parts->ne[3], src, parts->nb[3] / sizeof(float), out);
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
    GGML_ASSERT(q->ne[2] % k->ne[3] == 0 && kq_mask->ne[3] == k->ne[3] && ggml_is_contiguous(kq_mask));
    // parts per (token, kv head): enough for 16 threads to share a decode step
    const int64_t pairs  = q->ne[2] * l.n_head_kv;
    const int64_t n_part = std::min<int64_t>(8, (16 + pairs - 1) / pairs);
    ggml_tensor * args[] = {q, k, v, kq_mask, demoted};
    ggml_tensor * parts = ggml_custom_4d(ctx, GGML_TYPE_F32, q->ne[0] + 2, q->ne[1], q->ne[2], n_part, args, 5,
                                         logquant_attn_op, GGML_N_TASKS_MAX, &l);
    ggml_format_name(parts, "lq_attn_l%d", il);
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, q->ne[0], q->ne[1], q->ne[2], 1, &parts, 1,
                                       logquant_merge_op, GGML_N_TASKS_MAX, nullptr);
    ggml_format_name(out, "lq_attn_merge_l%d", il);
    return ggml_reshape_2d(ctx, out, q->ne[0] * q->ne[1], q->ne[2]);
}
