// logquant-book.h: the 2-bit tier's slot book: which slot holds which position for which
// sequences, how slots are handed out in groups of G, and which staging row each partial group
// uses. Plain data with no llama.cpp or ggml types, so that a test drives it alone
// (tests/native/logquant_book_check.cpp); the cache (logquant-cache.h) decides what to demote and
// keeps one book, which llama.cpp's prepare() copies and restores.
//
// Rules: a sequence fills one open group at a time, the lowest free group (so a lone sequence's
// groups are 0, 1, 2, ... as they were before any other sequence came and went); each open group
// has a staging row (n_stage of them); a slot may be held by several sequences (seq_cp), and
// frees when the last lets go; a closed group frees when its last valid slot does.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

// The sequences of each slot: n_words 64-bit words per slot (one word for up to 64 sequences:
// 8 bytes per slot, not llama.cpp's 32-byte bitset per cell).
struct logquant_seq_sets {
    int32_t               n_words = 1;
    std::vector<uint64_t> bits;

    void assign(int64_t n_slots, uint32_t n_seq) {
        n_words = (int32_t) ((n_seq + 63) / 64);
        bits.assign((size_t) (n_slots * n_words), 0);
    }
    bool test (int64_t i, int32_t s) const { return (bits[i * n_words + s / 64] >> (s % 64)) & 1; }
    void set  (int64_t i, int32_t s) { bits[i * n_words + s / 64] |=  (1ull << (s % 64)); }
    void reset(int64_t i, int32_t s) { bits[i * n_words + s / 64] &= ~(1ull << (s % 64)); }
    void clear(int64_t i, int64_t n = 1) { std::fill_n(bits.begin() + i * n_words, n * n_words, 0); }
    bool none (int64_t i) const {
        for (int32_t w = 0; w < n_words; w++) {
            if (bits[i * n_words + w]) {
                return false;
            }
        }
        return true;
    }
};

struct logquant_book {
    int32_t G       = 64; // slots per group
    int32_t n_stage = 1;  // staging rows: groups that may be open at once

    std::vector<int32_t> slot_pos;             // slot -> position; -1: free or never filled
    logquant_seq_sets    slot_seq;             // slot -> the sequences that hold it
    std::vector<std::vector<int32_t>> sorted;  // per sequence: its 2-bit positions, ascending
    std::vector<int64_t> open_group;           // per sequence: group of its next demotion, -1: none
    std::vector<int32_t> stage_row;            // per sequence: staging row of its open group, -1: none
    std::vector<int32_t> group_fill;           // per group: slots handed out; 0: the group is free
    std::vector<int32_t> group_live;           // per group: valid slots
    int64_t n_slots = 0;                       // slots [0, n_slots) are what attention scans

    void    init(int64_t n_groups, int32_t G, uint32_t n_seq, int32_t n_stage);
    void    clear();
    int64_t n_groups() const { return (int64_t) group_fill.size(); }

    // The next slot of seq's open group, opening the lowest free group (and a staging row) when it
    // has none; -1 when no group or no row is free. stage: the staging row of the slot's group.
    // The caller sets the slot's position and sequences (take()).
    int64_t alloc(int32_t seq, int32_t & stage);
    void    take(int64_t slot, int32_t pos, int32_t seq); // slot now holds pos for seq alone
    void    close_group_of(int32_t seq);                  // no open group: its staging row is free
    int32_t free_stage_row() const;                       // -1: none
    int32_t free_stage_rows() const;
    int64_t free_groups() const;
    // Groups that demoting n_leave more tokens of seq takes beyond its open group's free slots.
    int64_t groups_needed(int32_t seq, int64_t n_leave) const;

    void drop(int64_t slot, int32_t seq); // seq lets go of slot (freed when nobody holds it)
    void forget(int32_t seq);             // seq lets go of all its slots and its open group
    void settle();                        // frees emptied closed groups, recomputes n_slots
};
