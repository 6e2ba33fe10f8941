// lq2-op-params.h: the op_params of GGML_OP_LQ2_DEMOTE and GGML_OP_LQ2_ATTN, and the layout of
// their tensors, read the same way by the constructors (native/ggml), the CPU forwards
// (native/cpu/lq2-ops-cpu.c) and the GPU kernels. Plain C (Metal too); fits ggml's 64-byte
// op_params.
#pragma once

#include "lq2-rope-params.h"

#if defined(__cplusplus) && !defined(__METAL_VERSION__)
extern "C" {
#endif

// Columns of one row of the demotion list (I32 [LQ2_DEMOTE_COLS, n_rows]).
enum lq2_demote_col {
    LQ2_DEMOTE_ROW   = 0, // row of the f16 K/V tensors: stream * stream_size + cell
    LQ2_DEMOTE_POS   = 1, // the token's position (its key is un-rotated there)
    LQ2_DEMOTE_SLOT  = 2, // 2-bit slot; -1: padding row (the list is padded so graphs can be reused)
    LQ2_DEMOTE_STAGE = 3, // row of the staging tensor holding the f32 keys of the slot's open group
    LQ2_DEMOTE_COLS  = 4,
};

// Optional sources: a layer's mixed key widths (lq2-format.h), I8 [n_embd_k_gqa] (kv head h's
// D channels at h * D), set by ggml_lq2_set_key_widths; absent: every channel k_bits. Every
// backend's kernels read them (the GPU ones through lq2-op-args.h).
enum lq2_op_src_widths {
    LQ2_DEMOTE_SRC_WIDTHS  = 6,
    LQ2_ATTN_SRC_WIDTHS    = 8,
    LQ2_DEQUANT_SRC_WIDTHS = 5,
};

// Optional sources: a layer's channel references for 8-bit block headers (lq2-format.h), F32
// [2, n_embd_k_gqa (+ n_embd_v_gqa for values grouped per channel)]: (mu, sigma) of every key
// channel, then of every value channel; set by ggml_lq2_set_header_refs. Present: key blocks (and
// per-channel value blocks) have 2-byte headers; values grouped per token keep f16 ones.
enum lq2_op_src_refs {
    LQ2_DEMOTE_SRC_REFS  = 7,
    LQ2_ATTN_SRC_REFS    = 9,
    LQ2_DEQUANT_SRC_REFS = 6,
};

// How a layer's 2-bit values are grouped (v_per_channel in the params below):
//   0: per token, as KIVI does: a group is 64 channels of one token (LQ2_TYPE_V64...), the v2
//      store one row per slot;
//   1: per channel, as the keys are: a group is one channel of the G tokens of a key group (the
//      key types, no RoPE), the v2 store one group of n_embd_v_gqa blocks per key group. On Qwen
//      this halves the values' share of the attention output's error (bench/studies/
//      value_noise_study.py): a token's channels differ in offset and spread far more than a
//      channel's tokens do. Every backend's kernels take both groupings.

// GGML_OP_LQ2_DEMOTE. srcs: 0 k2 store (I8, groups of G tokens), 1 v2 store (I8, per slot or per
// group), 2 staging (F32 [G * n_embd_k_gqa, n_stage]; per-channel values: [G * (n_embd_k_gqa +
// n_embd_v_gqa), n_stage], a group's values after its keys), 3 f16 K rows, 4 f16 V rows, 5 the
// demotion list. Rows are processed in list order: a group's rows are adjacent, and when it fills
// or its run in the list ends the group is requantized whole from staging.
struct lq2_demote_op_params {
    int32_t G;         // tokens per key group
    int32_t k_bits;    // 2, 4, 8
    int32_t v_bits;
    int32_t n_head_kv; // of the layer: head size = n_embd_k_gqa / n_head_kv
    struct lq2_rope_params rope; // n_dims 0: keys are stored as the cache holds them
    int32_t fit;       // 1: each group's (d, m) fitted by least squares (lq2_fit_params), 0: min/max
    int32_t v_per_channel; // values grouped per channel (1) or per token (0), as above
};

// GGML_OP_LQ2_ATTN. srcs: 0 q (F32 [D, n_head, n_tokens]), 1 k, 2 v (F16 [D, n_head_kv, n_kv,
// n_stream] views of the f16 tier), 3 kq_mask (F16/F32 [n_kv, n_tokens / n_stream, 1, n_stream]),
// 4 k2, 5 v2 (the stores, k2 through the demote node), 6 mask2 (F16 [n_slots, n_tokens]: 0,
// -inf, or minus the ALiBi distance), 7 rope table (F16 [n_dims * G, n_groups] as lq2_rope_table
// lays it out; absent when rope.n_dims == 0). Slots [0, mask2->ne[0]) are scanned; groups whose
// mask is -inf throughout are skipped.
struct lq2_attn_op_params {
    float   scale;
    float   max_bias;
    float   softcap;
    int32_t G;
    int32_t k_bits;
    int32_t v_bits;
    int32_t n_part_max; // parts a (token, kv head) pair may be split into across threads
    struct lq2_rope_params rope;
    int32_t score_correction; // 1: 2-bit scores lowered by their expected inflation (lq2-format.h)
    int32_t v_per_channel;
};

// GGML_OP_LQ2_DEQUANT. srcs: 0 k2, 1 v2, 2 rope table (absent when rope.n_dims == 0), 3 k,
// 4 v (F16 [D, n_head_kv, n_kv, 1] views of the f16 tier). Result F16 [D, n_head_kv,
// n_slots + n_kv, 2]: index 0 of the last dimension the keys (post-RoPE, as the f16 tier's),
// 1 the values; tokens [0, n_slots) the 2-bit slots, then the f16 cells. For the prefill path:
// ggml_flash_attn_ext over that with the 2-bit mask and kq_mask side by side.
struct lq2_dequant_op_params {
    int32_t G;
    int32_t k_bits;
    int32_t v_bits;
    int32_t n_slots; // a multiple of G
    struct lq2_rope_params rope;
    int32_t v_per_channel;
};

#if defined(__cplusplus) && !defined(__METAL_VERSION__)
}
#endif
