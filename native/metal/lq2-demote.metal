// lq2-demote.metal: the Metal demotion (GGML_OP_LQ2_DEMOTE) on the per-thread code the CUDA kernels
// and the host check share (lq2-demote-block.h): the values, a threadgroup per list row, then the
// keys in one threadgroup that walks the list's runs in order through staging (the CPU's order,
// so no scratch buffer is needed; CUDA instead uses a scratch and three parallel launches). The
// RoPE angles are computed without double (lq2_rope_cos_sin_f32, from each pair's frequency split
// in two floats by the host), within 1e-6 of the CPU's, so the stored codes can differ from the
// CPU's where a value sits on a rounding boundary.
//
// Status: never compiled by Apple's Metal compiler, never run on a Mac; checked on Linux with clang
// against a metal_stdlib stand-in (tests/native/test_metal_sources.py). Patch 0014 registers it
// in ggml-metal with -DLOGQUANT_METAL=ON, off unless LOGQUANT_METAL=1 is set.
#include <metal_stdlib>

#include "lq2-demote-block.h"

using namespace metal;

static struct lq2_demote_args lq2_demote_args_from(constant struct lq2_demote_geom & g, device char * k2,
                                                   device char * v2, device char * staging, device const char * k,
                                                   device const char * v, device const char * rows,
                                                   device char * scratch, constant float * rope_freq,
                                                   device const char * kw, device const char * refs) {
    struct lq2_demote_args a;
    a.k2        = (device uint8_t *) k2;
    a.v2        = (device uint8_t *) v2;
    a.staging   = staging;
    a.k         = k;
    a.v         = v;
    a.rows      = (device const int32_t *) rows;
    a.scratch   = (device float *) scratch;
    a.rope_freq = rope_freq;
    a.k_widths  = g.k_widths ? (device const int8_t *) kw : nullptr;
    a.refs      = g.s8 ? (device const float *) refs : nullptr;
    a.g         = g;
    return a;
}

// Buffers: 0 the scalars, 1 k2, 2 v2, 3 staging, 4 f16 K rows, 5 f16 V rows, 6 the list, 7 the
// frequencies (2 floats per RoPE pair), 8 the key widths, 9 the 8-bit headers' references (each
// ignored without them). No scratch: the
// keys (and per-channel values) go through staging run by run (lq2_demote_seq_step), in one
// threadgroup.
#define LQ2_DEMOTE_KERNEL_ARGS                                                  \
    constant struct lq2_demote_geom & g         [[buffer(0)]],                 \
    device char                     * k2        [[buffer(1)]],                 \
    device char                     * v2        [[buffer(2)]],                 \
    device char                     * staging   [[buffer(3)]],                 \
    device const char               * k         [[buffer(4)]],                 \
    device const char               * v         [[buffer(5)]],                 \
    device const char               * rows      [[buffer(6)]],                 \
    constant float                  * rope_freq [[buffer(7)]],                 \
    device const char               * kw        [[buffer(8)]],                 \
    device const char               * refs      [[buffer(9)]],                 \
    uint3  tgpig [[threadgroup_position_in_grid]],                              \
    ushort tiitg [[thread_index_in_threadgroup]],                               \
    ushort ntg   [[threads_per_threadgroup]]

// Grid: n_rows threadgroups; list row tgpig.x's values.
kernel void kernel_lq2_demote_values(LQ2_DEMOTE_KERNEL_ARGS) {
    const struct lq2_demote_args a = lq2_demote_args_from(g, k2, v2, staging, k, v, rows, nullptr, rope_freq, kw, refs);
    lq2_demote_values(&a, (int64_t) tgpig.x, (int) tiitg, (int) ntg);
}

// Grid: one threadgroup; the keys, run after run, after the values kernel.
kernel void kernel_lq2_demote_keys(LQ2_DEMOTE_KERNEL_ARGS) {
    const struct lq2_demote_args a = lq2_demote_args_from(g, k2, v2, staging, k, v, rows, nullptr, rope_freq, kw, refs);
    (void) tgpig;
    for (int s = 0; lq2_demote_seq_step(&a, s, (int) tiitg, (int) ntg); ++s) {
        threadgroup_barrier(mem_flags::mem_device);
    }
}
