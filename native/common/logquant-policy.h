// logquant-policy.h: which tokens of a sequence LogQuant keeps in full precision.
//
// The rule is a PURE function of (n, W), n = number of positions the sequence holds, applied to its
// positions in ascending order: the full-precision set is the one the LogQuant decode rule reaches
// when the n tokens are fed one at a time (LOGQUANT.md):
//     local.append(t); if len(local) > 2W: sparse = (sparse + local[:W])[::2] or local[:W];
//                                          local = local[W:]
// So prompt batching, truncation (seq_rm of a tail) and state restore cannot change the result:
// the set after dropping a tail equals the set of a sequence fed with the remaining tokens.
// At most 3W tokens are full precision: local (the newest W+1..2W) and sparse (W older tokens,
// density halving with every step back; index 0, the attention sink, always stays).
//
// Cost: O(W log W) for the set, independent of n (see logquant-policy.cpp), O(n) for a transition.
// Everything works on indices into the sorted position list; positions only matter in transitions.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Number of full-precision tokens among n (min(n, ...) <= 3W). w >= 1.
int64_t logquant_policy_n_full(int64_t n, int32_t w);

// Ascending indices (0..n-1) of the full-precision tokens; out must hold logquant_policy_n_full().
// Returns the count, or -1 when w < 1 or n < 0.
int64_t logquant_policy_full_indices(int64_t n, int32_t w, int64_t * out);

// Moving from the sorted positions `prev` (what the cache held) to the sorted positions `cur`
// (after appending a batch, or dropping a tail, or both), for the tokens of `cur`:
//   demote:  stored in f16 and now 2-bit: full in prev's set, or new (absent from prev) and not
//            full in cur's set (a long prompt sends its old part straight to the 2-bit tier);
//            room for n_cur entries.
//   promote: 2-bit in prev but full in cur's set. Only a truncation can cause this; the exact f16
//            values are gone, so the cache must dequantize them or ask for re-evaluation;
//            room for min(n_cur, 3W) entries.
// Outputs are ascending positions. Returns 0, or -1 on bad arguments (w < 1, unsorted input).
int logquant_policy_transition(const int32_t * prev, int64_t n_prev,
                               const int32_t * cur,  int64_t n_cur, int32_t w,
                               int32_t * demote,  int64_t * n_demote,
                               int32_t * promote, int64_t * n_promote);

#ifdef __cplusplus
}
#endif
