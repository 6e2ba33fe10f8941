// logquant_book_check.cpp: the 2-bit tier's slot book (native/llama/logquant-book.h) driven alone,
// no model: scripted cases for its rules, then random operations with every invariant checked
// after each. Built and run by test_logquant_book.py; prints "ok <n>" or the first failure.
#include "logquant-book.h"

#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <string>

static int fails = 0;
#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
    fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); if (++fails > 5) exit(1); } } while (0)

// Every invariant the cache and the demote op rely on.
static void check_invariants(const logquant_book & b, const char * when) {
    std::set<int64_t> open_groups;
    std::set<int32_t> rows;
    for (size_t s = 0; s < b.open_group.size(); s++) {
        const int64_t g = b.open_group[s];
        CHECK((g >= 0) == (b.stage_row[s] >= 0), "%s: seq %zu open group %lld, row %d", when, s, (long long) g, b.stage_row[s]);
        if (g >= 0) {
            CHECK(open_groups.insert(g).second, "%s: group %lld open for two sequences", when, (long long) g);
            CHECK(rows.insert(b.stage_row[s]).second, "%s: staging row %d used twice", when, b.stage_row[s]);
            CHECK(b.stage_row[s] < b.n_stage, "%s: row %d >= n_stage", when, b.stage_row[s]);
            CHECK(b.group_fill[g] >= 1 && b.group_fill[g] < b.G, "%s: open group %lld fill %d", when, (long long) g, b.group_fill[g]);
        }
    }
    for (int64_t g = 0; g < b.n_groups(); g++) {
        int live = 0;
        for (int64_t i = g * b.G; i < (g + 1) * b.G; i++) {
            const bool valid = b.slot_pos[i] >= 0;
            live += valid;
            CHECK(!valid || i - g * b.G < b.group_fill[g], "%s: valid slot %lld past group fill %d", when, (long long) i, b.group_fill[g]);
            CHECK(valid != b.slot_seq.none(i), "%s: slot %lld valid=%d but sequences none=%d", when, (long long) i, valid, b.slot_seq.none(i));
        }
        CHECK(live == b.group_live[g], "%s: group %lld live %d counted %d", when, (long long) g, b.group_live[g], live);
        CHECK(b.group_fill[g] == 0 || g * b.G < b.n_slots || open_groups.count(g), "%s: group %lld in use past n_slots %lld",
              when, (long long) g, (long long) b.n_slots);
    }
    CHECK(b.free_stage_rows() == b.n_stage - (int32_t) rows.size(), "%s: free rows", when);
}

static void scripted() {
    logquant_book b;
    b.init(/*groups*/ 6, /*G*/ 4, /*n_seq*/ 3, /*n_stage*/ 2);
    // a lone sequence fills groups 0, 1, 2 in order, one staging row for all of them
    for (int i = 0; i < 10; i++) {
        int32_t row = -7;
        const int64_t slot = b.alloc(0, row);
        CHECK(slot == i && row == 0, "lone sequence: slot %lld row %d at %d", (long long) slot, row, i);
        b.take(slot, 100 + i, 0);
    }
    CHECK(b.open_group[0] == 2 && b.group_fill[2] == 2 && b.n_slots == 10, "open group %lld", (long long) b.open_group[0]);
    // a second sequence opens the lowest free group with the other row
    int32_t row = -1;
    CHECK(b.alloc(1, row) == 12 && row == 1, "second sequence: row %d", row);
    b.take(12, 5, 1);
    // a third cannot open a group: no staging row; nothing changes
    const logquant_book before = b;
    CHECK(b.alloc(2, row) == -1, "third sequence got a slot with no row free");
    CHECK(b.open_group == before.open_group && b.group_fill == before.group_fill, "a refused alloc changed the book");
    CHECK(b.groups_needed(0, 2) == 0 && b.groups_needed(0, 3) == 1 && b.groups_needed(2, 9) == 3, "groups_needed");
    // sequence 0 lets go of everything: its closed groups free, group 0 is the lowest free again
    b.forget(0);
    b.settle();
    CHECK(b.group_fill[0] == 0 && b.group_fill[1] == 0 && b.group_fill[2] == 0 && b.group_fill[3] == 1, "forget + settle");
    CHECK(b.n_slots == 13, "n_slots after settle %lld", (long long) b.n_slots);
    CHECK(b.alloc(2, row) == 0 && row == 0, "the freed group 0 and row 0 are reused (row %d)", row);
    b.take(0, 7, 2);
    // a slot shared by two sequences frees when the last one lets go
    b.slot_seq.set(0, 1);
    b.drop(0, 2);
    CHECK(b.slot_pos[0] == 7, "a shared slot freed while another sequence held it");
    b.drop(0, 1);
    CHECK(b.slot_pos[0] == -1 && b.group_live[0] == 0, "the last holder let go: the slot is free");
    check_invariants(b, "scripted");
    b.clear();
    CHECK(b.n_slots == 0 && b.free_groups() == 6 && b.free_stage_rows() == 2, "clear");
}

static int random_ops(int seed) {
    std::mt19937 gen(seed);
    const int G = 4 << (seed % 3), n_seq = 1 + seed % 5, n_stage = 1 + seed % n_seq;
    logquant_book b;
    b.init(8, G, n_seq, n_stage);
    int32_t next_pos = 0;
    int n_ops = 0;
    for (int step = 0; step < 3000; step++, n_ops++) {
        const int op = gen() % 10, s = (int) (gen() % n_seq);
        if (op < 6) {
            int32_t row = -1;
            const logquant_book before = b;
            const int64_t slot = b.alloc(s, row);
            if (slot < 0) {
                CHECK(b.slot_pos == before.slot_pos && b.open_group == before.open_group, "refused alloc changed the book");
                CHECK(before.open_group[s] < 0 && (before.free_groups() == 0 || before.free_stage_rows() == 0),
                      "alloc refused with room (seq %d)", s);
            } else {
                CHECK(b.slot_pos[slot] == -1, "alloc handed out valid slot %lld", (long long) slot);
                b.take(slot, next_pos++, s);
                b.sorted[s].push_back(b.slot_pos[slot]);
            }
        } else if (op < 8 && b.n_slots > 0) {
            b.drop((int64_t) (gen() % b.n_slots), s);
            b.settle();
        } else if (op == 8) {
            b.forget(s);
            b.settle();
        } else if (b.n_slots > 0) { // share a slot (seq_cp)
            const int64_t slot = (int64_t) (gen() % b.n_slots);
            if (b.slot_pos[slot] >= 0) {
                b.slot_seq.set(slot, s);
            }
        }
        check_invariants(b, ("random seed " + std::to_string(seed) + " step " + std::to_string(step)).c_str());
        if (fails) {
            break;
        }
    }
    return n_ops;
}

int main() {
    scripted();
    int n = 0;
    for (int seed = 0; seed < 30 && !fails; seed++) {
        n += random_ops(seed);
    }
    if (fails) {
        return 1;
    }
    printf("ok %d\n", n);
    return 0;
}
