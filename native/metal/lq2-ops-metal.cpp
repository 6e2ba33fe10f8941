// lq2-ops-metal.cpp: ggml-metal's side of GGML_OP_LQ2_DEMOTE, _ATTN and _DEQUANT: the op's tensors
// into the kernels' buffers and constant structs (lq2-op-args.h fills them as for CUDA), the
// pipelines by name from the embedded `lq2` library (native/metal/*.metal), the dispatches.
// Never compiled for or run on a Mac: its syntax is checked on Linux against ggml-metal's headers
// (tests/native/test_metal_sources.py); scripts/metal_check.sh runs it where a Mac is.
#include "lq2-ops-metal.h"

#include "ggml-backend-impl.h"
#include "ggml-impl.h"
#include "lq2-op-args.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

static ggml_metal_buffer_id lq2_buffer_id(const ggml_tensor * t) {
    if (!t) {
        return { nullptr, 0 };
    }
    ggml_backend_buffer_t buffer = t->view_src ? t->view_src->buffer : t->buffer;
    return ggml_metal_buffer_get_id((ggml_metal_buffer_t) buffer->context, t);
}

static ggml_metal_pipeline_with_params lq2_pipeline(ggml_metal_library_t lib, const char * name) {
    ggml_metal_pipeline_with_params res = ggml_metal_library_get_pipeline(lib, name);
    if (!res.pipeline) {
        res = ggml_metal_library_compile_pipeline(lib, name, name, nullptr);
    }
    GGML_ASSERT(res.pipeline && "the LogQuant Metal library lacks this kernel");
    return res;
}

// Parts per (token, kv head) of LQ2_ATTN: from the shapes alone (the extra bytes are sized before
// the device is known), about 512 tokens each, at most 32.
static int32_t lq2_attn_n_part(const ggml_tensor * op) {
    const int64_t n = op->src[1]->ne[2] + op->src[6]->ne[0];
    return (int32_t) std::max<int64_t>(1, std::min<int64_t>(32, n / 512));
}

extern "C" bool ggml_metal_lq2_supports_op(const ggml_tensor * op) {
    const char * env = getenv("LOGQUANT_METAL");
    if (!env || strcmp(env, "1") != 0) {
        return false;
    }
    switch (op->op) {
        case GGML_OP_LQ2_DEMOTE: {
            const lq2_demote_args a = lq2_demote_args_of(op);
            return lq2_demote_supported(&a) && a.g.rope.n_dims / 2 <= 512;
        }
        case GGML_OP_LQ2_ATTN: {
            lq2_attn_op_params p;
            memcpy(&p, op->op_params, sizeof(p));
            const ggml_tensor * q = op->src[0], * k = op->src[1];
            return lq2_ab_supported((int) q->ne[0], (int) (q->ne[1] / k->ne[1]), p.G, p.k_bits,
                                    lq2_op_key_widths(op) != nullptr, p.v_bits, p.v_per_channel, p.rope.mode,
                                    p.rope.n_dims);
        }
        case GGML_OP_LQ2_DEQUANT: {
            const lq2_dequant_args a = lq2_dequant_args_of(op);
            return lq2_dequant_shape_ok(a.g.D, a.g.G, a.g.k_bits, a.g.k_widths, a.g.v_bits, a.g.v_per_channel,
                                        a.g.rope_mode, a.g.rope_n_dims, a.g.n_slots);
        }
        default:
            return false;
    }
}

extern "C" size_t ggml_metal_lq2_extra(const ggml_tensor * op) {
    return op->op == GGML_OP_LQ2_ATTN ? (size_t) lq2_attn_parts_floats(op, lq2_attn_n_part(op)) * sizeof(float) : 0;
}

static void lq2_encode_attn(ggml_metal_library_t lib, ggml_metal_encoder_t enc, const ggml_tensor * op) {
    const int32_t n_part = lq2_attn_n_part(op);
    lq2_attn_args a = lq2_attn_args_of(op, n_part, nullptr);
    ggml_metal_buffer_id parts = lq2_buffer_id(op);
    parts.offs += ggml_nbytes(op); // the extra bytes after the result (ggml_metal_lq2_extra)

    auto block = lq2_pipeline(lib, "kernel_lq2_attn_block");
    ggml_metal_encoder_set_pipeline(enc, block);
    ggml_metal_encoder_set_bytes(enc, &a.g, sizeof(a.g), 0);
    for (int i = 0; i < 7; ++i) { // q, k, v, kq_mask, k2, v2, mask2
        ggml_metal_encoder_set_buffer(enc, lq2_buffer_id(op->src[i]), 1 + i);
    }
    ggml_metal_encoder_set_buffer(enc, lq2_buffer_id(op->src[7] ? op->src[7] : op->src[0]), 8); // any buffer when no table
    ggml_metal_encoder_set_buffer(enc, parts, 9);
    const ggml_tensor * widths = lq2_op_key_widths(op);
    ggml_metal_encoder_set_buffer(enc, lq2_buffer_id(widths ? widths : op->src[0]), 10); // any buffer without widths
    const ggml_tensor * refs = lq2_op_header_refs(op);
    ggml_metal_encoder_set_buffer(enc, lq2_buffer_id(refs ? refs : op->src[0]), 11); // any buffer without refs
    ggml_metal_encoder_set_threadgroup_memory_size(enc, sizeof(lq2_ab_shared), 0);
    ggml_metal_encoder_dispatch_threadgroups(enc, n_part, a.g.n_head_kv, (int) a.g.n_tokens, LQ2_AB_THREADS, 1, 1);
    ggml_metal_encoder_memory_barrier(enc);

    auto combine = lq2_pipeline(lib, "kernel_lq2_attn_combine");
    ggml_metal_encoder_set_pipeline(enc, combine);
    ggml_metal_encoder_set_bytes(enc, &a.g, sizeof(a.g), 0);
    ggml_metal_encoder_set_buffer(enc, parts, 1);
    ggml_metal_encoder_set_buffer(enc, lq2_buffer_id(op), 2);
    ggml_metal_encoder_dispatch_threadgroups(enc, a.g.shape.gq * a.g.n_head_kv, (int) a.g.n_tokens, 1,
                                             std::min(a.g.shape.D, 256), 1, 1);
}

static void lq2_encode_demote(ggml_metal_library_t lib, ggml_metal_encoder_t enc, const ggml_tensor * op) {
    const lq2_demote_args a = lq2_demote_args_of(op);
    if (a.g.n_rows == 0) {
        return;
    }
    // each RoPE pair's frequency split in two floats: Metal has no double (lq2_rope_cos_sin_f32)
    float freq[2 * 512 + 2] = { 0.0f, 0.0f };
    for (int i = 0; i < a.g.rope.n_dims / 2; ++i) {
        const double f = lq2_rope_freq(i, a.g.rope.n_dims, a.g.rope.freq_base, a.g.rope.freq_scale);
        freq[2 * i]     = (float) f;
        freq[2 * i + 1] = (float) (f - (double) freq[2 * i]);
    }
    const size_t freq_bytes = sizeof(float) * (size_t) std::max(2, a.g.rope.n_dims);

    const char * names[2] = { "kernel_lq2_demote_values", "kernel_lq2_demote_keys" };
    for (int k = 0; k < 2; ++k) {
        auto pipeline = lq2_pipeline(lib, names[k]);
        ggml_metal_encoder_set_pipeline(enc, pipeline);
        ggml_metal_encoder_set_bytes(enc, (void *) &a.g, sizeof(a.g), 0);
        for (int i = 0; i < 6; ++i) { // k2, v2, staging, K rows, V rows, the list
            ggml_metal_encoder_set_buffer(enc, lq2_buffer_id(op->src[i]), 1 + i);
        }
        ggml_metal_encoder_set_bytes(enc, freq, freq_bytes, 7);
        const ggml_tensor * widths = lq2_op_key_widths(op);
        ggml_metal_encoder_set_buffer(enc, lq2_buffer_id(widths ? widths : op->src[0]), 8); // any buffer without widths
        const ggml_tensor * refs = lq2_op_header_refs(op);
        ggml_metal_encoder_set_buffer(enc, lq2_buffer_id(refs ? refs : op->src[0]), 9); // any buffer without refs
        const int nth = std::min(ggml_metal_pipeline_max_theads_per_threadgroup(pipeline), k == 0 ? 256 : 1024);
        ggml_metal_encoder_dispatch_threadgroups(enc, k == 0 ? (int) a.g.n_rows : 1, 1, 1, nth, 1, 1);
        ggml_metal_encoder_memory_barrier(enc); // the keys kernel runs after every value row
    }
}

static void lq2_encode_dequant(ggml_metal_library_t lib, ggml_metal_encoder_t enc, const ggml_tensor * op) {
    const lq2_dequant_args a = lq2_dequant_args_of(op);
    // buffers: k2, v2, the table, K, V, the result, the key widths, the 8-bit headers' references
    // (any buffer for the table, widths or references a layer lacks)
    const ggml_tensor * widths = lq2_op_key_widths(op), * refs = lq2_op_header_refs(op);
    const ggml_tensor * bufs[8] = { op->src[0], op->src[1], op->src[2] ? op->src[2] : op->src[0], op->src[3], op->src[4], op,
                                    widths ? widths : op->src[0], refs ? refs : op->src[0] };
    const lq2_dequant_geom & g = a.g;
    const int64_t nv = (int64_t) g.D * g.n_head_kv, n_rest = g.n_slots * nv + 2 * g.n_kv * nv;
    const char * names[2] = { "kernel_lq2_dequant_keys", "kernel_lq2_dequant_rest" };
    for (int k = 0; k < 2; ++k) {
        auto pipeline = lq2_pipeline(lib, names[k]);
        ggml_metal_encoder_set_pipeline(enc, pipeline);
        ggml_metal_encoder_set_bytes(enc, (void *) &g, sizeof(g), 0);
        for (int i = 0; i < 8; ++i) {
            ggml_metal_encoder_set_buffer(enc, lq2_buffer_id(bufs[i]), 1 + i);
        }
        if (k == 0) {
            ggml_metal_encoder_dispatch_threadgroups(enc, (int) (g.n_slots / g.G), g.n_head_kv, 1, g.G, 1, 1);
        } else {
            ggml_metal_encoder_dispatch_threadgroups(enc, (int) ((n_rest + 255) / 256), 1, 1, 256, 1, 1);
        }
    }
}

extern "C" int ggml_metal_op_lq2(ggml_metal_library_t lib, ggml_metal_encoder_t enc, const ggml_tensor * op) {
    switch (op->op) {
        case GGML_OP_LQ2_ATTN:    lq2_encode_attn(lib, enc, op);    break;
        case GGML_OP_LQ2_DEMOTE:  lq2_encode_demote(lib, enc, op);  break;
        case GGML_OP_LQ2_DEQUANT: lq2_encode_dequant(lib, enc, op); break;
        default: GGML_ABORT("not a LogQuant op");
    }
    return 1;
}
