// logquant-plan.cpp: the tier decisions of a LogQuant cache on the host: which tokens leave the
// f16 tier (the policy's plan per ubatch) into which slots of the book (logquant-book.h), the
// cos/sin rows of the groups that change, and the sequence operations (seq_rm / seq_add /
// seq_div / seq_cp / seq_keep) on both tiers.
#include "logquant-cache.h"

#include "logquant-policy.h"
#include "lq2-rope.h"

#include "llama-batch.h"
#include "llama-impl.h"
#include "llama-kv-cells.h"

#include "ggml-backend.h"

#include <algorithm>
#include <set>

// ---------------------------------------------------------------------------------------------
// policy bookkeeping (host)

// Ascending positions of the f16 tier's tokens of a sequence, and their cells.
std::vector<std::pair<int32_t, uint32_t>> logquant_cache::f16_tokens(const llama_kv_cells & cells, int32_t seq_id) {
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
    int64_t need = 0, rows = 0;
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
        need += bk.groups_needed(s, n_old_leaving + n_new_leaving);
        rows += n_old_leaving + n_new_leaving > 0 && bk.stage_row[s] < 0;
    }
    return bk.free_groups() >= need && bk.free_stage_rows() >= rows;
}

void logquant_cache::refresh_rope_group(int64_t g) {
    if (rope.n_dims == 0) {
        return;
    }
    dirty_g0 = dirty_g1 > dirty_g0 ? std::min(dirty_g0, g) : g;
    dirty_g1 = std::max(dirty_g1, g + 1);
}

void logquant_cache::upload_rope_tables() {
    if (dirty_g1 <= dirty_g0) {
        return;
    }
    // The rows are computed here, from the slots' positions, a chunk of groups at a time: no
    // host copy of the whole table (on the CPU it would double the table's 0.17 bits per value).
    // A clean group inside the dirty range gets the rows it already has: a row depends only on
    // its slot's position, and every change of a position marks its group.
    const size_t  per_group = lq2_rope_table_size(&rope, G, G);
    const int64_t chunk     = std::max<int64_t>(1, (int64_t) (1u << 20) / (int64_t) per_group);
    std::vector<lq2_half> rows((size_t) std::min(chunk, dirty_g1 - dirty_g0) * per_group);
    for (int64_t g0 = dirty_g0; g0 < dirty_g1; g0 += chunk) {
        const int64_t n = std::min(chunk, dirty_g1 - g0);
        lq2_rope_table(&rope, bk.slot_pos.data() + g0 * G, n * G, G, rows.data());
        for (const auto & [ctx, t] : rope_tables) {
            if (t->buffer) {
                ggml_backend_tensor_set(t, rows.data(), g0 * t->nb[1], n * t->nb[1]);
            }
        }
    }
    dirty_g0 = dirty_g1 = 0;
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
    int64_t need = 0, rows = 0;
    for (uint32_t i = 0; i < ubatch.n_seqs_unq; i++) {
        const int32_t s = ubatch.seq_id_unq[i];
        int64_t none = 0;
        leave[i] = leaving(s, {}, none);
        need += bk.groups_needed(s, (int64_t) leave[i].size());
        rows += !leave[i].empty() && bk.stage_row[s] < 0;
    }
    if (need > bk.free_groups() || rows > bk.free_stage_rows()) {
        LLAMA_LOG_ERROR("%s: the 2-bit tier is full (%u tokens, %d partial groups): nothing demoted\n", __func__,
                        capacity, bk.n_stage);
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
            int32_t stage = -1;
            const int64_t slot = bk.alloc(s, stage);
            GGML_ASSERT(slot >= 0); // counted above
            pending.push_back({row0 + idx, p, slot, stage});
            bk.take(slot, p, s);
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
    // pending stays in the order the slots were handed out: a group's rows adjacent, and a staging
    // row freed by a full group reused only by rows that come after it
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
                bk.drop(slot, s);
            }
        }
        auto & q2 = bk.sorted[s];
        q2.erase(std::lower_bound(q2.begin(), q2.end(), first), std::lower_bound(q2.begin(), q2.end(), e));
        if (q2.empty()) {
            bk.close_group_of(s); // a sequence that starts over gets fresh groups
        }
    }
    bk.settle();
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
    bk.settle();
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
        bk.forget(seq_dst);
        bk.settle();
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
        bk.forget(s);
    }
    bk.settle();
}

void logquant_cache::clear() {
    bk.clear();
    pending.clear();
    constants_uploaded = false; // llama_kv_cache may have zeroed its buffers, widths and refs included
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
