// logquant-state.cpp: the 2-bit tier in llama.cpp's context state: a tagged section after
// llama_kv_cache's own data, every count and index validated when read back.
#include "logquant-cache.h"

#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cells.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

// ---------------------------------------------------------------------------------------------
// state: a tagged section after llama_kv_cache's own data

static constexpr uint32_t STATE_MAGIC    = 0x4c513207; // "LQ2", version 7 (f16 staging)
static constexpr uint32_t STATE_MAGIC_V6 = 0x4c513206; // version 6 (header references per layer): f32 staging
static constexpr uint32_t STATE_MAGIC_V5 = 0x4c513205; // version 5 (value grouping per layer): and f16 headers
static constexpr uint32_t STATE_MAGIC_V4 = 0x4c513204; // version 4 (mixed key widths): read as per-token values
static constexpr uint32_t STATE_MAGIC_V3 = 0x4c513203; // version 3 (sequences per slot): and uniform widths

// Bytes of a layer's values for n slots in n_grp groups: per-token values by slot, per-channel
// ones by group.
static size_t value_bytes(const logquant_cache::layer & l, int64_t n, int64_t n_grp, int32_t G) {
    return l.v_per_channel ? (size_t) n_grp * l.v_group_bytes : (size_t) n * (l.v_group_bytes / G);
}

// An FNV-1a hash of n bytes that is never 0 (0 is what a state records for "none").
static uint32_t tag_of(const void * data, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h = (h ^ static_cast<const uint8_t *>(data)[i]) * 16777619u;
    }
    return h ? h : 1;
}

// What a state records of a layer's mixed key widths: 0 for uniform ones, else their hash, so
// that a state from a cache that read its keys otherwise is refused.
static uint32_t widths_tag(const std::vector<int8_t> & w) {
    return w.empty() ? 0 : tag_of(w.data(), w.size());
}

// What a state records of a layer's block headers: 0 for f16 ones, else the hash of the
// references' bytes: their blocks decode with those references only.
static uint32_t refs_tag(const std::vector<float> & r) {
    return r.empty() ? 0 : tag_of(r.data(), r.size() * sizeof(float));
}

// n f32 values of an older state into tensor t at byte offset off, as f16.
static void read_f32_as_f16(llama_io_read_i & io, ggml_tensor * t, size_t off, size_t n) {
    if (n == 0) {
        return;
    }
    std::vector<float>    f(n);
    std::vector<lq2_half> h(n);
    io.read(f.data(), n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        h[i] = lq2_fp32_to_fp16(f[i]);
    }
    ggml_backend_tensor_set(t, h.data(), off, n * sizeof(lq2_half));
}

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
        const size_t v_bytes = value_bytes(l, n, n_grp, G);
        io.write(&l.il, sizeof(l.il));
        io.write(&l.k_bits, sizeof(l.k_bits));
        io.write(&l.v_bits, sizeof(l.v_bits));
        const uint32_t wt = widths_tag(l.widths_host);
        io.write(&wt, sizeof(wt));
        io.write(&l.v_per_channel, sizeof(l.v_per_channel));
        const uint32_t rt = refs_tag(l.refs_host);
        io.write(&rt, sizeof(rt));
        if (k_bytes > 0) {
            io.write_tensor(l.k2, 0, k_bytes);
            io.write_tensor(l.v2, 0, v_bytes);
        }
        // the open groups' pre-RoPE f16 rows (and values, when per channel): needed to
        // requantize them as they grow
        for (int32_t i = 0; i < n_open; i++) {
            const int64_t s = open[2 * i], grp = open[2 * i + 1];
            const size_t row = (size_t) bk.stage_row[s] * l.staging->nb[1];
            io.write_tensor(l.staging, row, (size_t) bk.group_fill[grp] * l.n_embd_k_gqa * sizeof(lq2_half));
            if (l.v_per_channel) {
                io.write_tensor(l.staging, row + (size_t) G * l.n_embd_k_gqa * sizeof(lq2_half),
                                (size_t) bk.group_fill[grp] * l.n_embd_v_gqa * sizeof(lq2_half));
            }
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
    if (magic != STATE_MAGIC && magic != STATE_MAGIC_V6 && magic != STATE_MAGIC_V5 && magic != STATE_MAGIC_V4 &&
        magic != STATE_MAGIC_V3) {
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
        uint32_t wt = 0, rt = 0;
        int32_t vpc = 0;
        if (magic != STATE_MAGIC_V3) {
            io.read(&wt, sizeof(wt));
        }
        if (magic == STATE_MAGIC || magic == STATE_MAGIC_V6 || magic == STATE_MAGIC_V5) {
            io.read(&vpc, sizeof(vpc));
        }
        if (magic == STATE_MAGIC || magic == STATE_MAGIC_V6) {
            io.read(&rt, sizeof(rt));
        }
        if (il != l.il || kb != l.k_bits || vb != l.v_bits) {
            LLAMA_LOG_ERROR("%s: layer %d was saved with %d-bit keys and %d-bit values; this cache's layer %d "
                            "has %d and %d\n", __func__, il, kb, vb, l.il, l.k_bits, l.v_bits);
            clear();
            return false;
        }
        if (wt != widths_tag(l.widths_host)) {
            LLAMA_LOG_ERROR("%s: layer %d was saved with %s key widths; this cache has %s ones (logquant_key_widths)\n",
                            __func__, il, wt ? "mixed" : "uniform", l.widths_host.empty() ? "uniform" : "other mixed");
            clear();
            return false;
        }
        if (rt != refs_tag(l.refs_host)) {
            LLAMA_LOG_ERROR("%s: layer %d was saved with %s scales and minimums; this cache has %s ones "
                            "(logquant_scale_bits)\n", __func__, il, rt ? "8-bit" : "f16",
                            l.refs_host.empty() ? "f16" : rt ? "other 8-bit" : "8-bit");
            clear();
            return false;
        }
        if (vpc != l.v_per_channel) {
            LLAMA_LOG_ERROR("%s: layer %d was saved with values grouped per %s; this cache groups them per %s "
                            "(logquant_value_groups)\n", __func__, il, vpc ? "channel" : "token",
                            l.v_per_channel ? "channel" : "token");
            clear();
            return false;
        }
        const size_t k_bytes = n_grp * l.k_group_bytes;
        const size_t v_bytes = value_bytes(l, n, n_grp, G);
        if (k_bytes > 0) {
            io.read_tensor(l.k2, 0, k_bytes);
            io.read_tensor(l.v2, 0, v_bytes);
        }
        for (size_t i = 0; i < open.size(); i += 2) {
            const int64_t s = open[i], grp = open[i + 1];
            const size_t row = (size_t) bk.stage_row[s] * l.staging->nb[1];
            const size_t nk = (size_t) bk.group_fill[grp] * l.n_embd_k_gqa; // fill < G: checked
            const size_t nv = l.v_per_channel ? (size_t) bk.group_fill[grp] * l.n_embd_v_gqa : 0;
            const size_t voff = row + (size_t) G * l.n_embd_k_gqa * sizeof(lq2_half);
            if (magic == STATE_MAGIC) {
                io.read_tensor(l.staging, row, nk * sizeof(lq2_half));
                if (nv > 0) {
                    io.read_tensor(l.staging, voff, nv * sizeof(lq2_half));
                }
            } else { // f32 staging before version 7: rounded to f16 as it is staged now
                read_f32_as_f16(io, l.staging, row, nk);
                read_f32_as_f16(io, l.staging, voff, nv);
            }
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
    if (n_open > bk.n_stage) {
        why = "the state has " + std::to_string(n_open) + " partial 2-bit groups; this context stages " +
              std::to_string(bk.n_stage) + ": load it into a context at least as large";
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
        bk.stage_row[s]  = i;
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

// ---------------------------------------------------------------------------------------------
// where the f16 cells are (logquant_cell_layout): written ahead of llama.cpp's cell list

void logquant_cache::write_cell_layout(llama_io_write_i & io, const std::vector<uint32_t> & heads) const {
    const uint32_t tag = LOGQUANT_CELL_LAYOUT_TAG;
    io.write(&tag, sizeof(tag));
    io.write(&n_stream, sizeof(n_stream));
    for (uint32_t st = 0; st < n_stream; st++) {
        const llama_kv_cells & cells = (*v_cells)[st];
        std::vector<uint32_t> idxs; // the cells llama.cpp lists: every used one, in order
        for (uint32_t i = 0; i < cells.size(); i++) {
            if (!cells.is_empty(i)) {
                idxs.push_back(i);
            }
        }
        const uint32_t head = st < heads.size() ? heads[st] : 0, n_idx = (uint32_t) idxs.size();
        io.write(&head, sizeof(head));
        io.write(&n_idx, sizeof(n_idx));
        if (n_idx > 0) {
            io.write(idxs.data(), idxs.size() * sizeof(uint32_t));
        }
    }
}

bool logquant_cache::read_cell_layout(llama_io_read_i & io, std::vector<logquant_cell_layout> & layout,
                                      std::string & why) const {
    uint32_t n_st = 0;
    io.read(&n_st, sizeof(n_st));
    if (n_st != n_stream) {
        why = "the state has " + std::to_string(n_st) + " cell streams, this context " + std::to_string(n_stream);
        return false;
    }
    layout.assign(n_stream, logquant_cell_layout{});
    for (uint32_t st = 0; st < n_stream; st++) {
        const uint32_t n_cells = (*v_cells)[st].size();
        uint32_t n_idx = 0;
        io.read(&layout[st].head, sizeof(uint32_t));
        io.read(&n_idx, sizeof(n_idx));
        if (layout[st].head >= n_cells || n_idx > n_cells) {
            why = "corrupt f16 cell layout of stream " + std::to_string(st) + " (head " +
                  std::to_string(layout[st].head) + ", " + std::to_string(n_idx) + " cells of " +
                  std::to_string(n_cells) + ")";
            return false;
        }
        layout[st].idxs.resize(n_idx);
        if (n_idx > 0) {
            io.read(layout[st].idxs.data(), n_idx * sizeof(uint32_t));
        }
        for (uint32_t i = 0; i < n_idx; i++) {
            if (layout[st].idxs[i] >= n_cells || (i > 0 && layout[st].idxs[i] <= layout[st].idxs[i - 1])) {
                why = "corrupt f16 cell layout of stream " + std::to_string(st) + " (cell index " +
                      std::to_string(layout[st].idxs[i]) + ")";
                return false;
            }
        }
    }
    return true;
}
