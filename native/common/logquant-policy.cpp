// logquant-policy.cpp: closed form of the LogQuant full-precision set (see logquant-policy.h).
//
// Feeding tokens one at a time, merge number j (j = 1, 2, ...) happens when token (j+1)W arrives
// (index (j+1)W, 0-based) and moves block B_j = indices [(j-1)W, jW) out of `local`. So after n > 2W
// tokens there have been k = (n - W - 1) / W merges and local = [kW, n).
// sparse_1 = B_1 and sparse_j = (sparse_{j-1} + B_j)[::2] both hold W entries, so entry s of sparse_j
// is entry 2s of the concatenation: sparse_{j-1}[2s] when 2s < W, else B_j[2s - W]. Following one
// entry back doubles s each step, so it resolves in O(log W) steps (entry 0 is always index 0):
// the whole set costs O(W log W), whatever n is.
#include "logquant-policy.h"

#include <cstddef>
#include <vector>

static int64_t sparse_entry(int64_t k, int64_t s, int64_t w) {
    if (s == 0) {
        return 0;
    }
    for (;;) {
        if (k == 1) {
            return s; // sparse_1 = B_1 = [0, W)
        }
        if (2 * s < w) {
            s *= 2;
            k -= 1;
        } else {
            return (k - 1) * w + 2 * s - w;
        }
    }
}

static int64_t n_merges(int64_t n, int64_t w) {
    return n > 2 * w ? (n - w - 1) / w : 0;
}

extern "C" int64_t logquant_policy_n_full(int64_t n, int32_t w) {
    if (w < 1 || n < 0) {
        return -1;
    }
    const int64_t k = n_merges(n, w);
    return k == 0 ? n : w + (n - k * w);
}

extern "C" int64_t logquant_policy_full_indices(int64_t n, int32_t w, int64_t * out) {
    if (w < 1 || n < 0) {
        return -1;
    }
    const int64_t k = n_merges(n, w);
    int64_t m = 0;
    if (k > 0) {
        for (int64_t s = 0; s < w; ++s) {
            out[m++] = sparse_entry(k, s, w); // ascending: sparse keeps arrival order
        }
    }
    for (int64_t i = k * w; i < n; ++i) {
        out[m++] = i;
    }
    return m;
}

static bool sorted_strict(const int32_t * p, int64_t n) {
    for (int64_t i = 1; i < n; ++i) {
        if (p[i] <= p[i - 1]) {
            return false;
        }
    }
    return true;
}

extern "C" int logquant_policy_transition(const int32_t * prev, int64_t n_prev,
                                          const int32_t * cur,  int64_t n_cur, int32_t w,
                                          int32_t * demote,  int64_t * n_demote,
                                          int32_t * promote, int64_t * n_promote) {
    if (w < 1 || n_prev < 0 || n_cur < 0 || !sorted_strict(prev, n_prev) || !sorted_strict(cur, n_cur)) {
        return -1;
    }
    std::vector<int64_t> fp((size_t) logquant_policy_n_full(n_prev, w));
    std::vector<int64_t> fc((size_t) logquant_policy_n_full(n_cur, w));
    logquant_policy_full_indices(n_prev, w, fp.data());
    logquant_policy_full_indices(n_cur, w, fc.data());

    // One walk over cur, with cursors into prev and both (ascending) full-index lists.
    int64_t nd = 0, np = 0;
    size_t  ip = 0, ic = 0;
    int64_t j = 0;
    for (int64_t i = 0; i < n_cur; ++i) {
        const int32_t p = cur[i];
        while (ic < fc.size() && fc[ic] < i) {
            ++ic;
        }
        const bool full_now = ic < fc.size() && fc[ic] == i;
        while (j < n_prev && prev[j] < p) {
            ++j;
        }
        const bool in_prev = j < n_prev && prev[j] == p;
        bool was_full = false;
        if (in_prev) {
            while (ip < fp.size() && fp[ip] < j) {
                ++ip;
            }
            was_full = ip < fp.size() && fp[ip] == j;
        }
        const bool was_q2 = in_prev && !was_full;
        if (!full_now && !was_q2) {
            demote[nd++] = p;
        } else if (full_now && was_q2) {
            promote[np++] = p;
        }
    }
    *n_demote  = nd;
    *n_promote = np;
    return 0;
}
