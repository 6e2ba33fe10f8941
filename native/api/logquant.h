// logquant-gguf's own C API, exported from libllama next to llama.h.
// Bound from Python with cffi in ABI mode (logquant_gguf/_capi.py); keep declarations plain C.
#pragma once

#include "llama.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// JSON object describing this build: the llama.cpp pin, the patch series, the backends compiled in.
// The string is static; do not free it.
LLAMA_API const char * logquant_build_info(void);

// LogQuant settings for contexts created after this call (kv_type lq2): window W (>= 1), policy
// (0: LogQuant, 1: recent window only, the paper's baseline). (The f16 tier's room for a ubatch
// comes from the context's n_ubatch.) Returns 0, or -1 for a bad value (nothing changed).
LLAMA_API int32_t logquant_set_params(int32_t window, int32_t policy);

// Why the last LogQuant cache this thread tried to create was refused, e.g. a model shape it does
// not handle ("" if none was). llama_init_from_model only returns NULL then; clear before creating.
LLAMA_API const char * logquant_last_error(void);
LLAMA_API void         logquant_clear_last_error(void);

// Code bits of the low-bit tier (2, 4 or 8; LogQuant's format is 2) for contexts created after this
// call: keys and values of every layer, then n_layers overrides (layer layers[i] gets
// layer_key_bits[i] / layer_value_bits[i]; e.g. a sensitive first layer at 8 bits). These are the
// precision levers: each costs bits per value (b + 0.5 per key or value). Returns 0, or -1 for a
// bad value (nothing changed). logquant_set_params leaves them as they are.
LLAMA_API int32_t logquant_set_bits(int32_t key_bits, int32_t value_bits, int32_t n_layers,
                                    const int32_t * layers, const int32_t * layer_key_bits,
                                    const int32_t * layer_value_bits);

// Key format of the low-bit tier: tokens per key group (32, 64 or 128) and keys_post_rope (1: group
// keys per channel AFTER RoPE, KIVI's layout, instead of before). Defaults 128 and 0: the default
// format, groups of 128 with layer bits "auto" (logquant_set_layer_bits_auto). Returns 0, or -1
// for a bad value (nothing changed).
LLAMA_API int32_t logquant_set_key_format(int32_t key_group, int32_t keys_post_rope);

// How the low-bit tier's codes are made and read, for contexts created after this call (no memory
// cost, docs/levers.md): fit 1 (the default) fits each group's scale and minimum by least squares
// instead of min/max (keys and values; the stored format is the same); score_correction 1 (off by
// default: measured to hurt end to end) lowers each 2-bit key group's scores by the noise
// inflation its codes cause in exp(score) (the fused attention op; the flash-attention prefill
// path does not apply it). Returns 0, or -1 for a value other than 0 and 1 (nothing changed).
LLAMA_API int32_t logquant_set_codes(int32_t fit, int32_t score_correction);

// Key widths, for contexts created after this call (docs/levers.md): 1 (the default) mixed, in a
// layer of b-bit keys (b = 2 or 4) each channel gets 0, b or 2b bits with a mean of b (the same
// bytes), chosen from the model's Q/K weights; 0 every channel b bits (LOGQUANT_KEY_WIDTHS=uniform
// for llama.cpp's tools). Host memory only so far: a layer whose tier is on a GPU keeps uniform
// widths (its kernels do not read mixed ones). Returns 0, or -1 for another value.
LLAMA_API int32_t logquant_set_key_widths(int32_t mode);

// Layer bits "auto", for contexts created after this call (docs/levers.md): 1 gives 3-bit keys
// to the half of the layers of 2-bit keys whose Q/K weights predict the most gain from them (the
// overrides of logquant_set_bits first; LOGQUANT_LAYER_BITS=auto for llama.cpp's tools); nothing
// where keys are stored after RoPE or with uniform widths. 1 is the default; 0: only the overrides.
// Returns 0, or -1 for another value. logquant_set_bits leaves it as it is.
LLAMA_API int32_t logquant_set_layer_bits_auto(int32_t on);

// Value groups, for contexts created after this call (docs/levers.md): 1 (the default) per
// channel, each channel of a key group's G tokens sharing a scale as the keys do; 0 per token,
// each token's 64 channels sharing one (KIVI's layout, the format before). The same bytes at
// G = 64 (LOGQUANT_VALUE_GROUPS=channel|token for llama.cpp's tools). Host memory only so far: a
// layer whose tier is on a GPU keeps per-token values. Returns 0, or -1 for another value.
LLAMA_API int32_t logquant_set_value_groups(int32_t per_channel);

// Bits of each block's scale and minimum, for contexts created after this call (docs/levers.md):
// 16 (the default) an f16 pair; 8 a byte each, relative to per-channel references computed from
// the model's weights, a quarter of a bit per value less at key groups of 64. Needs keys stored
// before RoPE; values grouped per token keep f16 ones (LOGQUANT_SCALE_BITS=8|16 for llama.cpp's
// tools). Host memory and CUDA (never run on a GPU); a Metal device does not take such a layer
// yet. Returns 0, or -1 for another value.
LLAMA_API int32_t logquant_set_scale_bits(int32_t bits);

// Ubatches of at least fa_min_tokens tokens attend through ggml's flash attention over both
// tiers dequantized to f16 (the prefill path); smaller ones (decode) through the fused two-tier
// op. 0: always the fused op, the faster on the CPU (LOGQUANT_PREFILL_FA_MIN for llama.cpp's
// tools). -1 (the default): automatic, 0 when the 2-bit tier is in host memory, 32 when it is on
// a GPU (untuned: never measured on one). Returns 0, or -1 for a value below -1.
LLAMA_API int32_t logquant_set_prefill(int32_t fa_min_tokens);

// What a context's KV cache holds right now.
struct logquant_kv_stats {
    int64_t bytes_total;   // every KV buffer of the context, all layers, all backends, plus the
                           // LogQuant cache's host memory (bytes_host)
    int32_t n_seq;         // sequences holding at least one token
    int32_t n_tokens;      // positions spanned (max - min + 1), summed over sequences
    int32_t is_logquant;   // 1 when the cache is in LogQuant mode; the fields below are then set
    int32_t window;
    int32_t policy;
    int64_t n_f16;         // tokens in the f16 tier
    int64_t n_q2;          // tokens in the 2-bit tier
    int64_t bytes_f16;     // bytes of f16 K/V (and of a sliding-window cache, if any)
    int64_t bytes_q2;      // bytes of the 2-bit stores, and bytes_host
    double  q2_bits_per_value; // their storage per K or V value, scales included (2.5 by default;
                               // more with the precision levers), over the LogQuant layers
    int64_t bytes_host;    // of bytes_q2: host memory beside the stores, per 2-bit slot: the cos/sin
                           // table that re-rotates pre-RoPE keys (n_dims f16 values) and the
                           // slot bookkeeping (position, sequences, sorted position)
    int64_t bytes_aux;     // of bytes_q2: tensors beside the stores that the code bits do not size
                           // (in the KV buffers, on the layer's device): the f16 staging of partial
                           // key groups and the cos/sin table the attention op reads
};

// Returns 0 on success, -1 when the context has no KV cache.
LLAMA_API int32_t logquant_kv_stats_get(const struct llama_context * ctx, struct logquant_kv_stats * out);

// Layer il's code bits (logquant_set_bits, with the layers "auto" gave 3-bit keys): 0, or -1 when
// the layer has no LogQuant tier.
LLAMA_API int32_t logquant_kv_layer_bits(const struct llama_context * ctx, int32_t il, int32_t * key_bits,
                                         int32_t * value_bits);

// Layer il's mixed key widths (logquant_set_key_widths): n_head_kv * head size bits of 0, b or 2b
// per key channel, kv head by kv head. Writes up to cap of them to out and returns how many there
// are: 0 for a layer with uniform widths, -1 when the layer has no LogQuant tier.
LLAMA_API int64_t logquant_kv_key_widths(const struct llama_context * ctx, int32_t il, int8_t * out, int64_t cap);

// The positions of sequence seq_id held in the LogQuant f16 tier, ascending: writes up to cap of
// them to out and returns how many there are, or -1 when the cache is not in LogQuant mode or
// seq_id is not one of the context's. (What the tests compare with a plain-Python model of the
// policy.)
LLAMA_API int64_t logquant_kv_f16_positions(const struct llama_context * ctx, int32_t seq_id, int32_t * out,
                                            int64_t cap);

#ifdef __cplusplus
}
#endif
