// lq2-attn.metal: the Metal decode attention over LogQuant's two tiers (GGML_OP_LQ2_ATTN) and the
// prefill path's dequantization (GGML_OP_LQ2_DEQUANT), on the per-thread code the CUDA kernels
// and the host tests share (lq2-attn-block.h, lq2-dequant-block.h): one threadgroup of
// LQ2_AB_THREADS threads per (part, kv head, query token) runs lq2_ab_step with a threadgroup
// barrier after each step (a chunk's max and sum per query head are simd_max / simd_sum over a
// 32-wide simdgroup, lq2_ab_simd_reduce), then a combine kernel merges the parts.
//
// Status: never compiled by Apple's Metal compiler, never run on a Mac. It is checked on Linux
// with clang against a small metal_stdlib stand-in (tests/native/test_metal_sources.py: syntax,
// types, address spaces), and its per-thread code runs on the host in the tests. Patch 0014
// registers it in ggml-metal with -DLOGQUANT_METAL=ON, off unless LOGQUANT_METAL=1 is set.
//
// Buffers: the op's tensors by index, as ggml-metal binds them; the scalars in one constant
// struct (lq2_attn_geom / lq2_dequant_geom below), as ggml-metal's kargs. The block's shared
// memory is the threadgroup buffer 0 (sizeof(struct lq2_ab_shared) bytes).
#include <metal_stdlib>

#include "lq2-attn-block.h"
#include "lq2-dequant-block.h"

using namespace metal;

kernel void kernel_lq2_attn_block(
        constant struct lq2_attn_geom & g     [[buffer(0)]],
        device const char             * q     [[buffer(1)]],
        device const char             * k     [[buffer(2)]],
        device const char             * v     [[buffer(3)]],
        device const char             * mask  [[buffer(4)]],
        device const char             * k2    [[buffer(5)]],
        device const char             * v2    [[buffer(6)]],
        device const char             * mask2 [[buffer(7)]],
        device const char             * rope  [[buffer(8)]],  // ignored when rope_n_dims is 0
        device       float            * parts [[buffer(9)]],
        device const char             * kw    [[buffer(10)]], // key widths, ignored without them
        device const char             * refs  [[buffer(11)]], // 8-bit headers' references, ignored without them
        threadgroup  char             * shmem [[threadgroup(0)]],
        uint3  tgpig [[threadgroup_position_in_grid]],
        ushort tiitg [[thread_index_in_threadgroup]]) {
    struct lq2_attn_args a;
    a.q     = q;
    a.k     = k;
    a.v     = v;
    a.mask  = mask;
    a.k2    = k2;
    a.v2    = v2;
    a.mask2 = mask2;
    a.rope  = g.shape.rope_n_dims > 0 ? rope : nullptr;
    a.parts = parts;
    a.dst   = nullptr; // the combine kernel writes it
    a.k_widths = g.shape.k_widths ? (device const int8_t *) kw : nullptr;
    a.refs  = g.shape.s8 ? (device const float *) refs : nullptr;
    a.g     = g;
    threadgroup struct lq2_ab_shared * sm = (threadgroup struct lq2_ab_shared *) shmem;
    float acc[LQ2_AB_ACC];
    const struct lq2_ab_shape sh = lq2_ab_block_shape(&a, (int) tgpig.y, 0, 0);
    for (int s = 0; lq2_ab_step(&a, &sh, (int) tgpig.x, (int64_t) tgpig.z, s, (int) tiitg, sm, acc); ++s) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
}

// Grid (n_head, n_tokens); a thread per channel, strided.
kernel void kernel_lq2_attn_combine(
        constant struct lq2_attn_geom & g     [[buffer(0)]],
        device       float            * parts [[buffer(1)]],
        device       char             * dst   [[buffer(2)]],
        uint3  tgpig [[threadgroup_position_in_grid]],
        ushort tiitg [[thread_index_in_threadgroup]],
        ushort ntg   [[threads_per_threadgroup]]) {
    struct lq2_attn_args a;
    a.parts = parts;
    a.dst   = dst;
    a.g     = g;
    for (int c = tiitg; c < g.shape.D; c += ntg) {
        lq2_ab_combine_at(&a, (int) tgpig.x, (int64_t) tgpig.y, c);
    }
}

static struct lq2_dequant_args lq2_dequant_args_from(constant struct lq2_dequant_geom & g, device const char * k2,
                                                     device const char * v2, device const char * rope,
                                                     device const char * k, device const char * v, device char * dst,
                                                     device const char * kw, device const char * refs) {
    struct lq2_dequant_args a;
    a.k2         = (device const uint8_t *) k2;
    a.v2         = (device const uint8_t *) v2;
    a.rope_table = g.rope_n_dims > 0 ? rope : nullptr;
    a.k          = k;
    a.v          = v;
    a.dst        = (device lq2_half *) dst;
    a.k_widths   = g.k_widths ? (device const int8_t *) kw : nullptr;
    a.refs       = g.s8 ? (device const float *) refs : nullptr;
    a.g          = g;
    return a;
}

// Grid (n_groups, n_head_kv), G threads: token t of the group.
kernel void kernel_lq2_dequant_keys(
        constant struct lq2_dequant_geom & g    [[buffer(0)]],
        device const char                * k2   [[buffer(1)]],
        device const char                * v2   [[buffer(2)]],
        device const char                * rope [[buffer(3)]],
        device const char                * k    [[buffer(4)]],
        device const char                * v    [[buffer(5)]],
        device       char                * dst  [[buffer(6)]],
        device const char                * kw   [[buffer(7)]], // key widths, ignored without them
        device const char                * refs [[buffer(8)]], // 8-bit headers' references, ignored without them
        uint3  tgpig [[threadgroup_position_in_grid]],
        ushort tiitg [[thread_index_in_threadgroup]]) {
    const struct lq2_dequant_args a = lq2_dequant_args_from(g, k2, v2, rope, k, v, dst, kw, refs);
    lq2_dequant_key(&a, (int64_t) tgpig.x, (int) tgpig.y, (int) tiitg);
}

// One thread per 2-bit value, then one per f16 cell element of the keys and of the values.
kernel void kernel_lq2_dequant_rest(
        constant struct lq2_dequant_geom & g    [[buffer(0)]],
        device const char                * k2   [[buffer(1)]],
        device const char                * v2   [[buffer(2)]],
        device const char                * rope [[buffer(3)]],
        device const char                * k    [[buffer(4)]],
        device const char                * v    [[buffer(5)]],
        device       char                * dst  [[buffer(6)]],
        device const char                * kw   [[buffer(7)]], // key widths, ignored without them
        device const char                * refs [[buffer(8)]], // 8-bit headers' references, ignored without them
        uint tpig [[thread_position_in_grid]]) {
    const struct lq2_dequant_args a = lq2_dequant_args_from(g, k2, v2, rope, k, v, dst, kw, refs);
    const int64_t nv = (int64_t) g.D * g.n_head_kv, n_values = g.n_slots * nv;
    int64_t e = tpig;
    if (e < n_values) {
        lq2_dequant_value(&a, e);
        return;
    }
    e -= n_values;
    if (e < 2 * g.n_kv * nv) {
        lq2_dequant_copy(&a, (int) (e / (g.n_kv * nv)), (e / nv) % g.n_kv, e % nv);
    }
}
