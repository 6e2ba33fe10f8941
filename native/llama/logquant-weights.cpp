// logquant-weights.cpp: a layer's weights read back as f32, and the per-channel energies the
// cache's per-layer choices are predicted from (mixed key widths, logquant-key-widths.cpp; the
// references of 8-bit headers, logquant-header-refs.cpp).
#include "logquant-weights.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cstring>

// A weight the CPU repacked for its kernels (Q4_0 and others on AVX2 and ARM: buffer type
// CPU_REPACK), whose buffer cannot be read back: multiplied on the CPU backend by 127 times the
// identity, a slice of its inputs at a time, then divided by 127. The repacked kernels quantize
// the identity's columns to 8 bits exactly (127 has scale 1), and each output is one weight times
// 127, so this is the dequantized weight to within a rounding of the division.
static std::vector<float> repacked_weight_f32(const ggml_tensor * w) {
    const int64_t n_in = w->ne[0], n_out = w->ne[1], slice = 256;
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(w->buffer));
    ggml_backend_t be = dev ? ggml_backend_dev_init(dev, nullptr) : nullptr;
    if (!be || w->ne[2] != 1 || w->ne[3] != 1) {
        if (be) {
            ggml_backend_free(be);
        }
        return {};
    }
    std::vector<float> out((size_t) (n_in * n_out)), eye, y;
    bool ok = true;
    for (int64_t i0 = 0; ok && i0 < n_in; i0 += slice) {
        const int64_t n = std::min(slice, n_in - i0);
        ggml_init_params ip = { 4 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, /*no_alloc =*/ true };
        ggml_context * ctx = ggml_init(ip);
        ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_in, n);
        ggml_tensor * r = ggml_mul_mat(ctx, const_cast<ggml_tensor *>(w), x); // [n_out, n]
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, r);
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, be);
        ok = buf != nullptr;
        if (ok) {
            eye.assign((size_t) (n_in * n), 0.0f);
            for (int64_t c = 0; c < n; c++) {
                eye[(size_t) (c * n_in + i0 + c)] = 127.0f;
            }
            ggml_backend_tensor_set(x, eye.data(), 0, ggml_nbytes(x));
            ok = ggml_backend_graph_compute(be, gf) == GGML_STATUS_SUCCESS;
        }
        if (ok) {
            y.resize((size_t) (n_out * n));
            ggml_backend_tensor_get(r, y.data(), 0, ggml_nbytes(r));
            for (int64_t c = 0; c < n; c++) {
                for (int64_t o = 0; o < n_out; o++) {
                    out[(size_t) (o * n_in + i0 + c)] = y[(size_t) (c * n_out + o)] / 127.0f;
                }
            }
        }
        if (buf) {
            ggml_backend_buffer_free(buf);
        }
        ggml_free(ctx);
    }
    ggml_backend_free(be);
    return ok ? out : std::vector<float>();
}

std::vector<float> logquant_weight_f32(const ggml_tensor * t) {
    if (!t || !t->buffer || !t->data || !ggml_is_contiguous(t)) {
        return {};
    }
    if (std::strcmp(ggml_backend_buft_name(ggml_backend_buffer_get_type(t->buffer)), "CPU_REPACK") == 0) {
        return repacked_weight_f32(t);
    }
    std::vector<uint8_t> raw(ggml_nbytes(t));
    ggml_backend_tensor_get(t, raw.data(), 0, raw.size());
    std::vector<float> out((size_t) ggml_nelements(t));
    if (t->type == GGML_TYPE_F32) {
        std::memcpy(out.data(), raw.data(), raw.size());
        return out;
    }
    const auto * tr = ggml_get_type_traits(t->type);
    if (!tr->to_float) {
        return {};
    }
    tr->to_float(raw.data(), out.data(), ggml_nelements(t));
    return out;
}

std::vector<double> logquant_row_energy(const std::vector<float> & w, int64_t n_in, const std::vector<float> & gamma,
                                        const std::vector<float> & bias) {
    const int64_t n_out = (int64_t) w.size() / n_in;
    std::vector<double> e((size_t) n_out, 0.0);
    for (int64_t r = 0; r < n_out; r++) {
        double s = 0.0;
        for (int64_t i = 0; i < n_in; i++) {
            const double x = (double) w[(size_t) (r * n_in + i)] * (gamma.empty() ? 1.0 : (double) gamma[(size_t) i]);
            s += x * x;
        }
        e[(size_t) r] = s + (bias.empty() ? 0.0 : (double) bias[(size_t) r] * bias[(size_t) r]);
    }
    return e;
}

void logquant_head_norm(std::vector<double> & e, int64_t D, const std::vector<float> & nw) {
    if (nw.empty()) {
        return;
    }
    for (size_t h0 = 0; h0 + (size_t) D <= e.size(); h0 += (size_t) D) {
        double mean = 0.0;
        for (int64_t c = 0; c < D; c++) {
            mean += e[h0 + (size_t) c] / (double) D;
        }
        for (int64_t c = 0; c < D; c++) {
            e[h0 + (size_t) c] = (double) nw[(size_t) c] * nw[(size_t) c] * (mean > 0.0 ? e[h0 + (size_t) c] / mean : 1.0);
        }
    }
}
