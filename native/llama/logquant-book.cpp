// logquant-book.cpp: see logquant-book.h.
#include "logquant-book.h"

#include <set>

void logquant_book::init(int64_t n_groups_, int32_t G_, uint32_t n_seq, int32_t n_stage_) {
    G       = G_;
    n_stage = n_stage_;
    slot_pos.assign(n_groups_ * G, -1);
    slot_seq.assign(n_groups_ * G, n_seq);
    sorted.assign(n_seq, {});
    open_group.assign(n_seq, -1);
    stage_row.assign(n_seq, -1);
    group_fill.assign(n_groups_, 0);
    group_live.assign(n_groups_, 0);
    n_slots = 0;
}

void logquant_book::clear() {
    std::fill(slot_pos.begin(), slot_pos.end(), -1);
    std::fill(slot_seq.bits.begin(), slot_seq.bits.end(), 0);
    for (auto & q2 : sorted) {
        q2.clear();
    }
    std::fill(open_group.begin(), open_group.end(), -1);
    std::fill(stage_row.begin(), stage_row.end(), -1);
    std::fill(group_fill.begin(), group_fill.end(), 0);
    std::fill(group_live.begin(), group_live.end(), 0);
    n_slots = 0;
}

int32_t logquant_book::free_stage_row() const {
    std::vector<char> used(n_stage, 0);
    for (int32_t r : stage_row) {
        if (r >= 0) {
            used[r] = 1;
        }
    }
    const auto it = std::find(used.begin(), used.end(), 0);
    return it == used.end() ? -1 : (int32_t) (it - used.begin());
}

int32_t logquant_book::free_stage_rows() const {
    return n_stage - (int32_t) std::count_if(stage_row.begin(), stage_row.end(), [](int32_t r) { return r >= 0; });
}

int64_t logquant_book::free_groups() const {
    return std::count(group_fill.begin(), group_fill.end(), 0);
}

int64_t logquant_book::groups_needed(int32_t seq, int64_t n_leave) const {
    const int64_t g    = open_group[seq];
    const int64_t room = g < 0 ? 0 : G - group_fill[g];
    return (std::max<int64_t>(0, n_leave - room) + G - 1) / G;
}

void logquant_book::close_group_of(int32_t seq) {
    open_group[seq] = -1;
    stage_row[seq]  = -1;
}

int64_t logquant_book::alloc(int32_t seq, int32_t & stage) {
    int64_t g = open_group[seq];
    if (g < 0) {
        const auto it = std::find(group_fill.begin(), group_fill.end(), 0);
        const int32_t row = free_stage_row();
        if (it == group_fill.end() || row < 0) {
            return -1;
        }
        g = it - group_fill.begin();
        open_group[seq] = g;
        stage_row[seq]  = row;
    }
    stage = stage_row[seq];
    const int64_t slot = g * G + group_fill[g]++;
    if (group_fill[g] == G) {
        // full: its row is free for the next group opened (which the demote op fills after this
        // one's rows, as they come later in the pending list)
        close_group_of(seq);
    }
    n_slots = std::max(n_slots, slot + 1);
    return slot;
}

void logquant_book::take(int64_t slot, int32_t pos, int32_t seq) {
    slot_pos[slot] = pos;
    slot_seq.clear(slot);
    slot_seq.set(slot, seq);
    group_live[slot / G]++;
}

void logquant_book::drop(int64_t slot, int32_t seq) {
    if (slot_pos[slot] < 0 || !slot_seq.test(slot, seq)) {
        return;
    }
    slot_seq.reset(slot, seq);
    if (slot_seq.none(slot)) {
        slot_pos[slot] = -1;
        group_live[slot / G]--;
    }
}

void logquant_book::forget(int32_t seq) {
    for (int64_t slot = 0; slot < n_slots; slot++) {
        drop(slot, seq);
    }
    sorted[seq].clear();
    close_group_of(seq);
}

void logquant_book::settle() {
    std::set<int64_t> open;
    for (int64_t g : open_group) {
        if (g >= 0) {
            open.insert(g);
        }
    }
    n_slots = 0;
    for (int64_t g = 0; g < n_groups(); g++) {
        if (group_fill[g] == 0 || open.count(g)) {
            n_slots = group_fill[g] > 0 ? g * G + group_fill[g] : n_slots;
            continue;
        }
        if (group_live[g] == 0) {
            group_fill[g] = 0;
            std::fill_n(slot_pos.begin() + g * G, G, -1);
            slot_seq.clear(g * G, G);
        } else {
            n_slots = g * G + group_fill[g];
        }
    }
}
