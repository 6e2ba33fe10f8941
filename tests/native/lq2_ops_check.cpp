// lq2_ops_check.cpp: the LogQuant ggml ops as the CPU backend runs them, on random data.
//
// Built by test_ggml_ops.py against the patched ggml headers and the package's libraries. For
// each case it prints one line: name, then the measured differences (max abs over the outputs,
// and the largest output, for relative bounds) between
//   simd_vs_ref    the ops' AVX2 forwards and their scalar reference path (use_ref)
//   threads        1 thread and 4 threads (parts split and merged differently)
//   fa_vs_fused    LQ2_DEQUANT + ggml_flash_attn_ext (prefill) and the fused LQ2_ATTN (decode)
//   demote_bytes   key/value bytes of LQ2_DEMOTE that differ between the two paths (must be 0)
// and the GPU kernels' per-thread code (lq2-attn-block.h, lq2-demote-block.h) run here for every
// thread index, on the op's own tensors through lq2-op-args.h as the CUDA glue passes them:
//   gpu_vs_ref          LQ2_ATTN's GPU program (3 parts) against the CPU op's scalar path
//   gpu_dequant_vs_ref  LQ2_DEQUANT's GPU code against the CPU op (f16 outputs)
//   gpu_demote_bytes    stored bytes of LQ2_DEMOTE's GPU code that differ from the CPU op's
// Every case says whether its keys have mixed widths (kw=1, ggml_lq2_set_key_widths) and whether
// its values are grouped per channel (vpc=1).
#include "ggml.h"
#include "ggml-cpu.h"
#include "lq2-op-args.h"
#include "lq2-op-params.h"
#include "lq2-rope.h"

extern "C" int lq2_ab_emulate(const struct lq2_attn_args * a, int order); // lq2_attn_block_host.c

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

// A block's header: an f16 scale and minimum, or (s8) the exponent byte e of a scale within 2^+-4
// of its channel's reference and any minimum byte k.
static int valid_header(uint8_t * b, bool zero_scale, bool s8, std::mt19937 & gen) {
    std::uniform_int_distribution<int> byte(0, 255), e(64, 191);
    std::uniform_real_distribution<float> d(0.01f, 0.1f), mn(-1.0f, 0.0f);
    if (s8) {
        b[0] = (uint8_t) e(gen);
        b[1] = (uint8_t) byte(gen);
        return LQ2_HDR_S8;
    }
    const ggml_fp16_t hd = ggml_fp32_to_fp16(zero_scale ? 0.0f : d(gen)), hm = ggml_fp32_to_fp16(mn(gen));
    memcpy(b, &hd, 2);
    memcpy(b + 2, &hm, 2);
    return LQ2_HDR_F16;
}

static void valid_blocks(ggml_tensor * t, int n, int bits, bool s8, std::mt19937 & gen) {
    const int bytes = LQ2_BLOCK_BYTES_H(n, bits, s8);
    uint8_t * b = (uint8_t *) t->data;
    std::uniform_int_distribution<int> byte(0, 255);
    for (size_t i = 0; i + bytes <= ggml_nbytes(t); i += bytes) {
        for (int j = valid_header(b + i, false, s8, gen); j < bytes; j++) {
            b[i + j] = (uint8_t) byte(gen);
        }
    }
}

// References of 8-bit headers for n channels: (mu, sigma) with sigma rounded as the cache stores it.
static ggml_tensor * random_refs(ggml_context * ctx, int64_t n, std::mt19937 & gen) {
    std::uniform_real_distribution<float> mu(-1.0f, 1.0f), sigma(0.05f, 2.0f);
    ggml_tensor * r = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 2, n);
    for (int64_t c = 0; c < n; c++) {
        ((float *) r->data)[2 * c]     = mu(gen);
        ((float *) r->data)[2 * c + 1] = lq2_ref_round(sigma(gen));
    }
    return r;
}

// Mixed key widths for nk = Hkv * D channels with a mean of b bits per kv head: NEOX RoPE pairs
// (c, c + D / 2) alike, consecutive pairs 0 / 2b, b / b or 2b / 0 (lq2-format.h); 3-bit keys
// 2 / 4 or 4 / 2.
static std::vector<int8_t> random_widths(int D, int Hkv, int b, std::mt19937 & gen) {
    std::vector<int8_t> w((size_t) D * Hkv);
    std::uniform_int_distribution<int> pick(0, 2);
    for (int h = 0; h < Hkv; h++) {
        for (int i = 0; i < D / 2; i += 2) {
            const int w0 = b == 3 ? 2 + 2 * (pick(gen) % 2) : pick(gen) * b;
            for (int c : { i, i + D / 2 }) {
                w[(size_t) h * D + c]     = (int8_t) w0;
                w[(size_t) h * D + c + 1] = (int8_t) (2 * b - w0);
            }
        }
    }
    return w;
}

// Key groups of G tokens with valid scales: channel c's block of widths[c] bits (or b for all).
static void valid_key_groups(ggml_tensor * t, int G, int b, const std::vector<int8_t> & widths, int nk, bool s8,
                             std::mt19937 & gen) {
    std::uniform_int_distribution<int> byte(0, 255);
    const size_t group = (size_t) nk * LQ2_BLOCK_BYTES_H(G, b, s8);
    uint8_t * p = (uint8_t *) t->data;
    for (size_t g0 = 0; g0 + group <= ggml_nbytes(t); g0 += group) {
        size_t off = g0;
        for (int c = 0; c < nk; c++) {
            const int w = widths.empty() ? b : widths[c];
            for (int j = valid_header(p + off, w == 0, s8, gen); j < LQ2_BLOCK_BYTES_H(G, w, s8); j++) {
                p[off + j] = (uint8_t) byte(gen);
            }
            off += LQ2_BLOCK_BYTES_H(G, w, s8);
        }
    }
}

static void uniform(ggml_tensor * t, std::mt19937 & gen, float lo, float hi) {
    std::uniform_real_distribution<float> u(lo, hi);
    for (int64_t i = 0; i < ggml_nelements(t); i++) {
        if (t->type == GGML_TYPE_F32) {
            ((float *) t->data)[i] = u(gen);
        } else {
            ((ggml_fp16_t *) t->data)[i] = ggml_fp32_to_fp16(u(gen));
        }
    }
}

// A case's value bits: its bits, but 2 with 3-bit keys (which exist only for keys).
static int value_bits_of(int bits) {
    return bits == 3 ? 2 : bits;
}

static void compute(ggml_context * ctx, ggml_tensor * out, int n_threads, bool use_ref) {
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_cplan plan = ggml_graph_plan(gf, n_threads, nullptr);
    std::vector<uint8_t> work(plan.work_size + 1);
    plan.work_data = work.data();
    plan.use_ref   = use_ref;
    if (ggml_graph_compute(gf, &plan) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "compute failed\n");
        exit(1);
    }
}

static std::vector<float> as_f32(const ggml_tensor * t) {
    std::vector<float> v(ggml_nelements(t));
    for (size_t i = 0; i < v.size(); i++) {
        v[i] = t->type == GGML_TYPE_F32 ? ((const float *) t->data)[i] : ggml_fp16_to_fp32(((const ggml_fp16_t *) t->data)[i]);
    }
    return v;
}

static void diff(const std::vector<float> & a, const std::vector<float> & b, double & mx, double & ref) {
    mx = 0.0;
    ref = 0.0;
    for (size_t i = 0; i < a.size(); i++) {
        mx  = std::fmax(mx, std::fabs((double) a[i] - b[i]));
        ref = std::fmax(ref, std::fabs((double) a[i]));
    }
}

struct shape {
    int D, Hkv, gq, n_kv, n_slots, nb, G, bits;
    bool rope;
    float max_bias, softcap;
    bool bc = false, vpc = false, kw = false; // score correction, per-channel values, mixed key widths
    bool s8 = false;                          // 8-bit block headers (lq2-format.h)
};

// The LogQuant op with the case's optional sources: mixed key widths, header references.
static ggml_tensor * with_sources(ggml_tensor * op, ggml_tensor * kw, ggml_tensor * refs) {
    if (kw) {
        ggml_lq2_set_key_widths(op, kw);
    }
    if (refs) {
        ggml_lq2_set_header_refs(op, refs);
    }
    return op;
}

static void run_attn(const shape & s, int seed) {
    ggml_init_params ip = { (size_t) 512 << 20, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    std::mt19937 gen(seed);
    const int nk = s.D * s.Hkv;
    ggml_tensor * q  = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, s.D, s.Hkv * s.gq, s.nb);
    ggml_tensor * k  = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, s.D, s.Hkv, s.n_kv, 1);
    ggml_tensor * v  = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, s.D, s.Hkv, s.n_kv, 1);
    ggml_tensor * m  = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, s.n_kv, s.nb, 1, 1);
    ggml_tensor * k2 = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, (int64_t) s.n_slots / s.G * nk * LQ2_BLOCK_BYTES_H(s.G, s.bits, s.s8));
    const int vb = value_bits_of(s.bits);
    ggml_tensor * v2 = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, s.vpc ? (int64_t) s.n_slots / s.G * nk * LQ2_BLOCK_BYTES_H(s.G, vb, s.s8)
                                                            : (int64_t) s.n_slots * (nk / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, vb));
    ggml_tensor * m2 = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, s.n_slots, s.nb);
    ggml_tensor * rt = s.rope ? ggml_new_tensor_2d(ctx, GGML_TYPE_F16, (int64_t) s.D * s.G, s.n_slots / s.G) : nullptr;
    uniform(q, gen, -1.0f, 1.0f);
    uniform(k, gen, -1.0f, 1.0f);
    uniform(v, gen, -1.0f, 1.0f);
    const std::vector<int8_t> widths = s.kw ? random_widths(s.D, s.Hkv, s.bits, gen) : std::vector<int8_t>();
    ggml_tensor * kw = nullptr;
    if (s.kw) {
        kw = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, nk);
        memcpy(kw->data, widths.data(), widths.size());
    }
    valid_key_groups(k2, s.G, s.bits, widths, nk, s.s8, gen);
    valid_blocks(v2, s.vpc ? s.G : LQ2_QK_V, vb, s.s8 && s.vpc, gen);
    ggml_tensor * refs = s.s8 ? random_refs(ctx, nk * (s.vpc ? 2 : 1), gen) : nullptr;
    if (rt) {
        // a real table: cos/sin of angles (positions 0..n_slots, NEOX frequencies)
        lq2_rope_params rp = { LQ2_ROPE_NEOX, s.D, 10000.0f, 1.0f, 1.0f };
        std::vector<int32_t> pos(s.n_slots);
        for (int i = 0; i < s.n_slots; i++) {
            pos[i] = 3 * i + 1;
        }
        lq2_rope_table(&rp, pos.data(), s.n_slots, s.G, (lq2_half *) rt->data);
    }
    // masks: a causal cut per token, hidden cells, a hidden group, and (ALiBi) distances
    for (int t = 0; t < s.nb; t++) {
        for (int j = 0; j < s.n_kv; j++) {
            const bool hidden = j % 5 == 1 || j > s.n_kv - s.nb + t;
            ((ggml_fp16_t *) m->data)[t * s.n_kv + j] = ggml_fp32_to_fp16(hidden ? -INFINITY : -(float) ((s.n_kv - j) % 13));
        }
        for (int j = 0; j < s.n_slots; j++) {
            const bool hidden = j % 3 == 0 || j > s.n_slots - 40 + t || (j / s.G == 1 && s.n_slots > 2 * s.G);
            ((ggml_fp16_t *) m2->data)[t * s.n_slots + j] = ggml_fp32_to_fp16(hidden ? -INFINITY : -(float) ((s.n_slots - j) % 29));
        }
    }
    const float scale = 1.0f / std::sqrt((float) s.D);
    lq2_attn_op_params ap = {};
    ap.scale = scale; ap.max_bias = s.max_bias; ap.softcap = s.softcap;
    ap.G = s.G; ap.k_bits = s.bits; ap.v_bits = vb; ap.n_part_max = 8; ap.score_correction = s.bc;
    ap.v_per_channel = s.vpc;
    lq2_dequant_op_params dp = {};
    dp.G = s.G; dp.k_bits = s.bits; dp.v_bits = vb; dp.n_slots = s.n_slots; dp.v_per_channel = s.vpc;
    if (s.rope) {
        ap.rope = { LQ2_ROPE_NEOX, s.D, 10000.0f, 1.0f, 1.0f };
        dp.rope = ap.rope;
    }
    ggml_tensor * fused = with_sources(ggml_lq2_attn(ctx, q, k, v, m, k2, v2, m2, rt, &ap, sizeof(ap)), kw, refs);
    compute(ctx, fused, 1, true);
    const std::vector<float> ref = as_f32(fused);
    compute(ctx, fused, 1, false);
    const std::vector<float> simd1 = as_f32(fused);
    compute(ctx, fused, 4, false);
    const std::vector<float> simd4 = as_f32(fused);
    // the same op without the score correction: how far the correction moved the result
    lq2_attn_op_params ap0 = ap;
    ap0.score_correction = 0;
    ggml_tensor * plain = with_sources(ggml_lq2_attn(ctx, q, k, v, m, k2, v2, m2, rt, &ap0, sizeof(ap0)), kw, refs);
    compute(ctx, plain, 1, false);
    const std::vector<float> plain1 = as_f32(plain);

    ggml_tensor * both = with_sources(ggml_lq2_dequant(ctx, k2, v2, rt, k, v, &dp, sizeof(dp)), kw, refs);
    compute(ctx, both, 1, true);
    const std::vector<float> deq_ref = as_f32(both);
    compute(ctx, both, 3, false);
    const std::vector<float> deq = as_f32(both);
    ggml_tensor * K = ggml_view_4d(ctx, both, s.D, s.Hkv, both->ne[2], 1, both->nb[1], both->nb[2], both->nb[3], 0);
    ggml_tensor * V = ggml_view_4d(ctx, both, s.D, s.Hkv, both->ne[2], 1, both->nb[1], both->nb[2], both->nb[3], both->nb[3]);
    ggml_tensor * M = ggml_concat(ctx, ggml_reshape_4d(ctx, m2, s.n_slots, s.nb, 1, 1), m, 0);
    ggml_tensor * fa = ggml_flash_attn_ext(ctx, ggml_permute(ctx, q, 0, 2, 1, 3), ggml_permute(ctx, K, 0, 2, 1, 3),
                                           ggml_permute(ctx, V, 0, 2, 1, 3), M, scale, s.max_bias, s.softcap);
    ggml_prec_set_acc(fa, GGML_PREC_F32);
    compute(ctx, fa, 2, false);
    const std::vector<float> fav = as_f32(fa);

    double a, ra, b, rb, c, rc, d, rd, e, re, g1, rg1, g2, rg2;
    diff(ref, simd1, a, ra);
    diff(simd1, simd4, b, rb);
    diff(ref, fav, c, rc);
    diff(deq_ref, deq, d, rd);
    diff(simd1, plain1, e, re);

    // the GPU program on the same tensors: 3 parts, every block, step and thread
    std::vector<float> gpu_parts((size_t) lq2_attn_parts_floats(fused, 3));
    ggml_tensor * gpu_out = ggml_dup_tensor(ctx, fused);
    struct lq2_attn_args ga = lq2_attn_args_of(fused, 3, gpu_parts.data());
    ga.dst = (char *) gpu_out->data;
    if (lq2_ab_emulate(&ga, 0) != 0) {
        fprintf(stderr, "the GPU program refused the case\n");
        exit(1);
    }
    const std::vector<float> gpu = as_f32(gpu_out);
    // LQ2_DEQUANT's GPU code into a tensor of its own
    ggml_tensor * gpu_both = ggml_dup_tensor(ctx, both);
    struct lq2_dequant_args gd = lq2_dequant_args_of(both);
    gd.dst = (lq2_half *) gpu_both->data;
    for (int64_t g = 0; g < gd.g.n_slots / gd.g.G; g++) {
        for (int hk = 0; hk < gd.g.n_head_kv; hk++) {
            for (int t = 0; t < gd.g.G; t++) {
                lq2_dequant_key(&gd, g, hk, t);
            }
        }
    }
    for (int64_t e = gd.g.n_slots * gd.g.D * gd.g.n_head_kv - 1; e >= 0; e--) {
        lq2_dequant_value(&gd, e);
    }
    for (int which = 0; which < 2; which++) {
        for (int64_t j = 0; j < gd.g.n_kv; j++) {
            for (int64_t w = 0; w < (int64_t) gd.g.D * gd.g.n_head_kv; w++) {
                lq2_dequant_copy(&gd, which, j, w);
            }
        }
    }
    const std::vector<float> gpu_deq = as_f32(gpu_both);

    diff(ref, gpu, g1, rg1);
    diff(deq_ref, gpu_deq, g2, rg2);
    printf("attn D=%d Hkv=%d gq=%d n_kv=%d slots=%d nb=%d G=%d bits=%d rope=%d alibi=%g softcap=%g bc=%d vpc=%d "
           "kw=%d s8=%d simd_vs_ref %.3g threads %.3g fa_vs_fused %.3g dequant_simd_vs_ref %.3g max_out %.3g bc_effect %.3g "
           "gpu_vs_ref %.3g gpu_dequant_vs_ref %.3g\n",
           s.D, s.Hkv, s.gq, s.n_kv, s.n_slots, s.nb, s.G, s.bits, (int) s.rope, s.max_bias, s.softcap, (int) s.bc,
           (int) s.vpc, (int) s.kw, (int) s.s8, a, b, c, d, ra, e, g1, g2);
    ggml_free(ctx);
}

static void run_demote(int D, int Hkv, int G, int bits, int n_rows, int first, bool rope, int seed, bool fit = false,
                       bool vpc = false, bool mixed_widths = false, bool s8 = false) {
    ggml_init_params ip = { (size_t) 64 << 20, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    std::mt19937 gen(seed);
    const int nk = D * Hkv, n_cells = n_rows + 16;
    const int64_t n_groups = (first + n_rows + G - 1) / G + 1;
    ggml_tensor * k2 = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, n_groups * nk * LQ2_BLOCK_BYTES_H(G, bits, s8));
    const int vb = value_bits_of(bits);
    ggml_tensor * v2 = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, vpc ? n_groups * nk * LQ2_BLOCK_BYTES_H(G, vb, s8)
                                                          : n_groups * G * (nk / LQ2_QK_V) * LQ2_BLOCK_BYTES_B(LQ2_QK_V, vb));
    ggml_tensor * st = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, (int64_t) G * nk * (vpc ? 2 : 1), 2);
    ggml_tensor * kc = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, nk, n_cells);
    ggml_tensor * vc = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, nk, n_cells);
    ggml_tensor * rows = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, LQ2_DEMOTE_COLS, n_rows + 4);
    uniform(kc, gen, -3.0f, 3.0f);
    uniform(vc, gen, -3.0f, 3.0f);
    int32_t * r = (int32_t *) rows->data;
    for (int i = 0; i < n_rows + 4; i++) {
        const bool pad = i >= n_rows;
        r[i * LQ2_DEMOTE_COLS + LQ2_DEMOTE_ROW]   = pad ? -1 : (i * 7) % n_cells;
        r[i * LQ2_DEMOTE_COLS + LQ2_DEMOTE_POS]   = pad ? -1 : 50 + 2 * i;
        r[i * LQ2_DEMOTE_COLS + LQ2_DEMOTE_SLOT]  = pad ? -1 : first + i;
        r[i * LQ2_DEMOTE_COLS + LQ2_DEMOTE_STAGE] = pad ? -1 : ((first + i) / G) % 2;
    }
    lq2_demote_op_params p = {};
    p.G = G; p.k_bits = bits; p.v_bits = vb; p.n_head_kv = Hkv; p.fit = fit; p.v_per_channel = vpc;
    if (rope) {
        p.rope = { LQ2_ROPE_NEOX, D, 10000.0f, 1.0f, 1.0f };
    }
    std::vector<uint8_t> st0(ggml_nbytes(st));
    uniform(st, gen, -3.0f, 3.0f); // an open group's earlier rows
    memcpy(st0.data(), st->data, st0.size());
    ggml_tensor * kw = nullptr;
    if (mixed_widths) {
        const std::vector<int8_t> widths = random_widths(D, Hkv, bits, gen);
        kw = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, nk);
        memcpy(kw->data, widths.data(), widths.size());
    }
    ggml_tensor * out = with_sources(ggml_lq2_demote(ctx, k2, v2, st, kc, vc, rows, &p, sizeof(p)), kw,
                                     s8 ? random_refs(ctx, nk * (vpc ? 2 : 1), gen) : nullptr);
    std::vector<std::vector<uint8_t>> got;
    std::vector<uint8_t> staged_cpu, staged_gpu;
    for (bool use_ref : {true, false}) {
        memset(k2->data, 0, ggml_nbytes(k2));
        memset(v2->data, 0, ggml_nbytes(v2));
        memcpy(st->data, st0.data(), st0.size());
        compute(ctx, out, 2, use_ref);
        staged_cpu.assign((uint8_t *) st->data, (uint8_t *) st->data + ggml_nbytes(st));
        std::vector<uint8_t> all((uint8_t *) k2->data, (uint8_t *) k2->data + ggml_nbytes(k2));
        all.insert(all.end(), (uint8_t *) v2->data, (uint8_t *) v2->data + ggml_nbytes(v2));
        got.push_back(all);
    }
    { // the GPU code: launch 1 (rows), then launch 2 (groups), 128 threads a block
        memset(k2->data, 0, ggml_nbytes(k2));
        memset(v2->data, 0, ggml_nbytes(v2));
        memcpy(st->data, st0.data(), st0.size());
        struct lq2_demote_args da = lq2_demote_args_of(out);
        std::vector<float> scratch((size_t) (da.g.n_rows * lq2_demote_channels(&da)));
        da.scratch = scratch.data();
        if (!lq2_demote_supported(&da)) {
            fprintf(stderr, "the GPU demotion refused the case\n");
            exit(1);
        }
        for (int64_t i = 0; i < da.g.n_rows; i++) {
            for (int ith = 0; ith < 128; ith++) {
                lq2_demote_row(&da, i, ith, 128);
            }
        }
        for (int64_t i = 0; i < da.g.n_rows; i++) {
            for (int ith = 127; ith >= 0; ith--) {
                lq2_demote_group(&da, i, ith, 128);
            }
        }
        for (int64_t i = da.g.n_rows - 1; i >= 0; i--) { // blocks run in any order
            for (int ith = 0; ith < 128; ith++) {
                lq2_demote_stage(&da, i, ith, 128);
            }
        }
        staged_gpu.assign((uint8_t *) st->data, (uint8_t *) st->data + ggml_nbytes(st));
        std::vector<uint8_t> all((uint8_t *) k2->data, (uint8_t *) k2->data + ggml_nbytes(k2));
        all.insert(all.end(), (uint8_t *) v2->data, (uint8_t *) v2->data + ggml_nbytes(v2));
        got.push_back(all);
    }
    std::vector<uint8_t> staged_seq;
    { // the one-threadgroup form (Metal's): values per row, then the runs in order through staging
        memset(k2->data, 0, ggml_nbytes(k2));
        memset(v2->data, 0, ggml_nbytes(v2));
        memcpy(st->data, st0.data(), st0.size());
        struct lq2_demote_args da = lq2_demote_args_of(out);
        for (int64_t i = da.g.n_rows - 1; i >= 0; i--) {
            for (int ith = 0; ith < 128; ith++) {
                lq2_demote_values(&da, i, ith, 128);
            }
        }
        for (int step = 0;; step++) { // ... barrier ...
            int more = 0;
            for (int ith = 255; ith >= 0; ith--) {
                more |= lq2_demote_seq_step(&da, step, ith, 256);
            }
            if (!more) {
                break;
            }
        }
        std::vector<uint8_t> all((uint8_t *) k2->data, (uint8_t *) k2->data + ggml_nbytes(k2));
        all.insert(all.end(), (uint8_t *) v2->data, (uint8_t *) v2->data + ggml_nbytes(v2));
        got.push_back(all);
        staged_seq.assign((uint8_t *) st->data, (uint8_t *) st->data + ggml_nbytes(st));
    }
    // the group the list leaves open: its staging (read by the next demotion) must be the CPU's
    size_t n_stage = 0;
    const int32_t * last = r + (n_rows - 1) * LQ2_DEMOTE_COLS;
    if (last[LQ2_DEMOTE_SLOT] % G != G - 1) {
        const size_t off = (size_t) last[LQ2_DEMOTE_STAGE] * st->nb[1];
        const size_t len = (size_t) (last[LQ2_DEMOTE_SLOT] % G + 1) * nk * sizeof(lq2_half);
        n_stage = (size_t) (memcmp(staged_cpu.data() + off, staged_gpu.data() + off, len) != 0) +
                  (size_t) (memcmp(staged_cpu.data() + off, staged_seq.data() + off, len) != 0);
        if (vpc) { // the open group's values, after its G rows of keys
            const size_t voff = off + (size_t) G * nk * sizeof(lq2_half);
            n_stage += (size_t) (memcmp(staged_cpu.data() + voff, staged_gpu.data() + voff, len) != 0) +
                       (size_t) (memcmp(staged_cpu.data() + voff, staged_seq.data() + voff, len) != 0);
        }
    }
    size_t n_diff = 0, n_set = 0, n_gpu = 0, n_seq = 0;
    for (size_t i = 0; i < got[0].size(); i++) {
        n_diff += got[0][i] != got[1][i];
        n_gpu  += got[0][i] != got[2][i];
        n_seq  += got[0][i] != got[3][i];
        n_set  += got[0][i] != 0;
    }
    printf("demote D=%d Hkv=%d G=%d bits=%d rows=%d first=%d rope=%d fit=%d vpc=%d kw=%d s8=%d demote_bytes %zu nonzero %zu "
           "gpu_demote_bytes %zu gpu_seq_demote_bytes %zu gpu_staging_differs %zu\n", D, Hkv, G, bits, n_rows, first,
           (int) rope, (int) fit, (int) vpc, (int) mixed_widths, (int) s8, n_diff, n_set, n_gpu, n_seq, n_stage);
    ggml_free(ctx);
}

int main() {
    const shape cases[] = {
        // D  Hkv gq n_kv slots nb  G  bits rope alibi softcap
        { 64,  2, 2,  40, 256,   1, 64, 2, true,  0.0f,  0.0f },
        { 64,  2, 2,  40, 256,  40, 64, 2, true,  0.0f,  0.0f },
        { 128, 2, 7,  33, 384,   5, 64, 4, true,  0.0f,  0.0f },
        { 128, 1, 8,  96, 256,  64, 64, 8, true,  0.0f, 30.0f },
        { 64,  4, 1,  17, 128,   3, 32, 2, false, 8.0f,  0.0f },
        { 256, 2, 4,  50, 256,   2, 128, 2, true, 0.0f,  0.0f },
        // the score correction (2-bit keys, NEOX table; 4-bit without RoPE, ALiBi)
        { 64,  2, 7,  40, 256,   3, 64, 2, true,  0.0f,  0.0f, true },
        { 128, 1, 4,  33, 128,   2, 64, 4, false, 8.0f,  0.0f, true },
        // values grouped per channel
        { 64,  2, 7,  40, 256,   3, 64, 2, true,  0.0f,  0.0f, false, true },
        { 128, 2, 2,  33, 384,  40, 64, 4, true,  0.0f, 30.0f, false, true },
        { 64,  4, 1,  17, 128,   3, 32, 2, false, 8.0f,  0.0f, false, true },
        // mixed key widths: alone, with per-channel values (the default format), with the correction
        { 64,  2, 7,  40, 256,   3, 64, 2, true,  0.0f,  0.0f, false, false, true },
        { 128, 2, 4,  33, 384,  40, 64, 4, true,  0.0f, 30.0f, false, true,  true },
        { 64,  2, 7,  40, 256,   2, 64, 2, true,  0.0f,  0.0f, true,  true,  true },
        { 128, 1, 4,  50, 256,   3, 128, 2, false, 8.0f, 0.0f, false, true,  true },
        // 3-bit keys (widths of 2 and 4 bits, 2-bit values), with the correction
        { 64,  2, 7,  40, 256,   3, 64, 3, true,  0.0f,  0.0f, true,  true,  true },
        // 8-bit headers: the default format, per-token values (f16 headers there), the correction
        { 64,  2, 7,  40, 256,   3, 64, 2, true,  0.0f,  0.0f, false, true,  true,  true },
        { 128, 2, 2,  33, 384,  40, 64, 4, true,  0.0f, 30.0f, false, false, false, true },
        { 64,  2, 7,  40, 256,   2, 64, 3, true,  0.0f,  0.0f, true,  true,  true,  true },
    };
    int seed = 1;
    for (const auto & s : cases) {
        run_attn(s, seed++);
    }
    run_demote(64, 2, 64, 2, 150, 10, true, seed++);
    run_demote(128, 2, 64, 4, 70, 0, true, seed++);
    run_demote(64, 4, 32, 8, 33, 31, false, seed++);
    run_demote(256, 1, 128, 2, 200, 127, true, seed++);
    run_demote(64, 2, 64, 2, 150, 10, true, seed++, true);    // fitted scales
    run_demote(128, 2, 64, 4, 70, 0, true, seed++, true);
    run_demote(64, 2, 64, 2, 150, 10, true, seed++, true, true); // values grouped per channel
    run_demote(64, 4, 32, 8, 33, 31, false, seed++, false, true);
    run_demote(64, 2, 64, 2, 150, 10, true, seed++, true, false, true); // mixed key widths
    run_demote(128, 2, 64, 4, 70, 0, true, seed++, false, true, true);  // both (the default format)
    run_demote(64, 4, 32, 2, 90, 20, false, seed++, true, true, true);
    run_demote(64, 2, 64, 3, 150, 10, true, seed++, true, true, true); // 3-bit keys
    run_demote(64, 2, 64, 2, 150, 10, true, seed++, true, true, true, true); // 8-bit headers
    run_demote(128, 2, 64, 4, 70, 0, true, seed++, true, false, false, true);
    run_demote(64, 4, 32, 2, 90, 20, false, seed++, true, true, false, true);
    return 0;
}
