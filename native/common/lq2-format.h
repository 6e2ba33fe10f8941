// lq2-format.h: LogQuant's low-bit KV formats, shared by the CPU, CUDA and Metal code.
//
// Every backend reads the same bytes and computes the same codes: the structs, the code packing
// and the quantization arithmetic live here once. Plain C, compiled as C, C++, CUDA and Metal
// (the macros below pick qualifiers and the few math functions per language).
//
// Formats (asymmetric min/max, b-bit codes with b = 2 (the default), 4 or 8, f16 scale d and f16
// minimum m per group). The 4- and 8-bit codes are the precision levers: a layer, or all keys, can
// be given more bits at a cost counted in bits per value (see logquant-cache.h).
//   keys   (LQ2_TYPE_K32/K64/K128, and their 4- and 8-bit forms): one group = ONE CHANNEL across
//           G tokens, stored BEFORE RoPE. Key channels carry large per-channel offsets; grouping
//           across tokens removes them, and only before RoPE do the offsets stay put (RoPE would
//           rotate them with the position). A key group of n_ch channels is n_ch blocks in channel order: block c
//           holds channel c of the group's G tokens. b + 32/G bits per value.
//   values (LQ2_TYPE_V64, V64_B4, V64_B8): one group = 64 consecutive channels of ONE token.
//           b + 0.5 bits per value.
//
// Code packing inside a block of n b-bit codes: s = n * b / 8 bytes, byte l (0 <= l < s) holds
// codes l, l + s, l + 2s, ... (8 / b of them) at bit offsets 0, b, 2b, ... For b = 2: codes l,
// l + n/4, l + n/2, l + 3n/4 at bits 0, 2, 4, 6. One shift and mask of the s bytes then yields s
// CONSECUTIVE codes, which is what SIMD dequantization wants.
//
// Quantization of a group, all in f32 (so a numpy reference is bit exact), with L = 2^b - 1:
//   lo, hi = min, max over the FINITE values of the group (NaN and +-Inf are left out so they can
//            not spoil the other values; a group without finite values gets lo = hi = 0)
//   d = f16(sat((hi - lo) / L)), m = f16(sat(lo))   (sat: clamp to +-65504, f16 rounds to nearest even)
//   code = clamp(floor((x - m) / d + 0.5), 0, L) with the f16-ROUNDED d and m; NaN -> 0,
//          +Inf -> L, -Inf -> 0; d == 0 (constant group) -> 0.
//   dequantized value = d * code + m. d has 11 significant bits and code <= 255, so d * code is
//   exact in f32 and the result has one rounding whether or not the compiler fuses it into an FMA.
#pragma once

#if defined(__METAL_VERSION__)
#    include <metal_stdlib>
#    define LQ2_INLINE static inline
#    define LQ2_FLOOR(x) metal::floor(x)
#    define LQ2_F32_BITS(x) metal::as_type<uint32_t>(x)
#    define LQ2_BITS_F32(u) metal::as_type<float>(u)
#    define LQ2_FMA(a, b, c) metal::fma(a, b, c)
#    define LQ2_DIV(a, b) metal::precise::divide(a, b)
#    define LQ2_COSF(x) metal::precise::cos(x)
#    define LQ2_SINF(x) metal::precise::sin(x)
#    define LQ2_DEV device
#    define LQ2_TH thread
#    define LQ2_TG threadgroup
#    define LQ2_CONST constant
#elif defined(__CUDACC__)
#    include <stdint.h>
#    include <string.h>
#    define LQ2_INLINE static __host__ __device__ __forceinline__
#    define LQ2_FLOOR(x) floorf(x)
#    define LQ2_F32_BITS(x) lq2_f32_bits_(x)
#    define LQ2_BITS_F32(u) lq2_bits_f32_(u)
#    define LQ2_FMA(a, b, c) fmaf(a, b, c)
#    define LQ2_COSF(x) cosf(x)
#    define LQ2_SINF(x) sinf(x)
#    if defined(__CUDA_ARCH__)
#        define LQ2_DIV(a, b) __fdiv_rn(a, b) // ggml-cuda builds with -use_fast_math: keep / exact
#    else
#        define LQ2_DIV(a, b) ((a) / (b))
#    endif
#    define LQ2_DEV
#    define LQ2_TH
#    define LQ2_TG
#    define LQ2_CONST
#else
#    include <stdint.h>
#    include <string.h>
#    include <math.h>
#    define LQ2_INLINE static inline
#    define LQ2_FLOOR(x) floorf(x)
#    define LQ2_F32_BITS(x) lq2_f32_bits_(x)
#    define LQ2_BITS_F32(u) lq2_bits_f32_(u)
#    define LQ2_FMA(a, b, c) fmaf(a, b, c)
#    define LQ2_DIV(a, b) ((a) / (b))
#    define LQ2_COSF(x) cosf(x)
#    define LQ2_SINF(x) sinf(x)
#    define LQ2_DEV
#    define LQ2_TH
#    define LQ2_TG
#    define LQ2_CONST
#endif
// LQ2_DIV: IEEE division whatever the backend's math flags (CUDA's -use_fast_math turns a plain /
// into an approximation, and the codes must be the CPU's bytes). LQ2_DEV: the address space of
// global memory (Metal's `device`); LQ2_TH: of a thread's own variables (`thread`); LQ2_TG: of
// memory shared by a thread block (`threadgroup`); LQ2_CONST: Metal's `constant`; all empty
// elsewhere.

#if defined(__cplusplus) && !defined(__METAL_VERSION__)
extern "C" {
#endif

typedef uint16_t lq2_half; // raw IEEE binary16 bits; every backend converts with the functions below

#define LQ2_QK_V        64  // values per value group (along head_dim)
#define LQ2_G_DEFAULT   64  // tokens per key group
#define LQ2_HALF_MAX    65504.0f

// A block: scale, minimum, n b-bit codes. One macro so the sizes cannot drift apart.
#define LQ2_DECL_BLOCK(name, n, b)  \
    typedef struct {                \
        lq2_half d;                 \
        lq2_half m;                 \
        uint8_t  qs[(n) * (b) / 8]; \
    } name

LQ2_DECL_BLOCK(block_lq2_k32,  32,       2);
LQ2_DECL_BLOCK(block_lq2_k64,  64,       2);
LQ2_DECL_BLOCK(block_lq2_k128, 128,      2);
LQ2_DECL_BLOCK(block_lq2_v64,  LQ2_QK_V, 2);
LQ2_DECL_BLOCK(block_lq4_k64,  64,       4);
LQ2_DECL_BLOCK(block_lq8_k64,  64,       8);
LQ2_DECL_BLOCK(block_lq4_v64,  LQ2_QK_V, 4);
LQ2_DECL_BLOCK(block_lq8_v64,  LQ2_QK_V, 8);
LQ2_DECL_BLOCK(block_lq4_k32,  32,       4);
LQ2_DECL_BLOCK(block_lq8_k32,  32,       8);
LQ2_DECL_BLOCK(block_lq4_k128, 128,      4);
LQ2_DECL_BLOCK(block_lq8_k128, 128,      8);

#define LQ2_BLOCK_BYTES_B(n, b) (2 * (int) sizeof(lq2_half) + (n) * (b) / 8)
#define LQ2_BLOCK_BYTES(n)      LQ2_BLOCK_BYTES_B(n, 2)
#define LQ2_BITS_VALID(b)       ((b) == 2 || (b) == 4 || (b) == 8)

// Where code j of a block of n b-bit codes lives (see the packing note at the top).
#define LQ2_CODE_BYTE_B(j, n, b)  ((j) % ((n) * (b) / 8))
#define LQ2_CODE_SHIFT_B(j, n, b) ((b) * ((j) / ((n) * (b) / 8)))

#if defined(__cplusplus) && !defined(__METAL_VERSION__)
static_assert(sizeof(block_lq2_k32)  == LQ2_BLOCK_BYTES(32),  "block_lq2_k32 must be packed");
static_assert(sizeof(block_lq2_k64)  == LQ2_BLOCK_BYTES(64),  "block_lq2_k64 must be packed");
static_assert(sizeof(block_lq2_k128) == LQ2_BLOCK_BYTES(128), "block_lq2_k128 must be packed");
static_assert(sizeof(block_lq2_v64)  == LQ2_BLOCK_BYTES(64),  "block_lq2_v64 must be packed");
static_assert(sizeof(block_lq4_k64)  == LQ2_BLOCK_BYTES_B(64, 4), "block_lq4_k64 must be packed");
static_assert(sizeof(block_lq8_k64)  == LQ2_BLOCK_BYTES_B(64, 8), "block_lq8_k64 must be packed");
static_assert(sizeof(block_lq4_v64)  == LQ2_BLOCK_BYTES_B(64, 4), "block_lq4_v64 must be packed");
static_assert(sizeof(block_lq8_v64)  == LQ2_BLOCK_BYTES_B(64, 8), "block_lq8_v64 must be packed");
static_assert(sizeof(block_lq4_k32)  == LQ2_BLOCK_BYTES_B(32, 4), "block_lq4_k32 must be packed");
static_assert(sizeof(block_lq8_k32)  == LQ2_BLOCK_BYTES_B(32, 8), "block_lq8_k32 must be packed");
static_assert(sizeof(block_lq4_k128) == LQ2_BLOCK_BYTES_B(128, 4), "block_lq4_k128 must be packed");
static_assert(sizeof(block_lq8_k128) == LQ2_BLOCK_BYTES_B(128, 8), "block_lq8_k128 must be packed");
#endif

// ---- type traits: one row of facts per format; code that needs a size or a name reads it here.

enum lq2_type {
    LQ2_TYPE_K32  = 0,
    LQ2_TYPE_K64  = 1,
    LQ2_TYPE_K128 = 2,
    LQ2_TYPE_V64  = 3,
    LQ2_TYPE_K64_B4 = 4,
    LQ2_TYPE_K64_B8 = 5,
    LQ2_TYPE_V64_B4 = 6,
    LQ2_TYPE_V64_B8 = 7,
    LQ2_TYPE_K32_B4 = 8,
    LQ2_TYPE_K32_B8 = 9,
    LQ2_TYPE_K128_B4 = 10,
    LQ2_TYPE_K128_B8 = 11,
    LQ2_TYPE_COUNT,
};

enum lq2_axis {
    LQ2_AXIS_TOKENS   = 0, // a group is one channel across `group` tokens (keys)
    LQ2_AXIS_CHANNELS = 1, // a group is `group` channels of one token (values)
};

struct lq2_type_traits {
    int32_t group;       // values per group (= per block)
    int32_t code_bits;   // bits per code: 2, 4 or 8
    int32_t block_bytes; // bytes per block
    int32_t axis;        // enum lq2_axis
    int32_t pre_rope;    // 1: keys stored before RoPE, re-rotated at their position on read
    float   bits;        // bits per value, 8 * block_bytes / group
#if !defined(__METAL_VERSION__)
    const char * name;
#endif
};

#if !defined(__METAL_VERSION__)
// In enum order (C++ has no array designators); lq2_type_traits_check() in lq2-quants.c verifies it.
static const struct lq2_type_traits lq2_traits[LQ2_TYPE_COUNT] = {
    { 32,  2, LQ2_BLOCK_BYTES(32),      LQ2_AXIS_TOKENS,   1, 8.0f * LQ2_BLOCK_BYTES(32)      / 32,  "lq2_k32"  },
    { 64,  2, LQ2_BLOCK_BYTES(64),      LQ2_AXIS_TOKENS,   1, 8.0f * LQ2_BLOCK_BYTES(64)      / 64,  "lq2_k64"  },
    { 128, 2, LQ2_BLOCK_BYTES(128),     LQ2_AXIS_TOKENS,   1, 8.0f * LQ2_BLOCK_BYTES(128)     / 128, "lq2_k128" },
    { 64,  2, LQ2_BLOCK_BYTES(64),      LQ2_AXIS_CHANNELS, 0, 8.0f * LQ2_BLOCK_BYTES(64)      / 64,  "lq2_v64"  },
    { 64,  4, LQ2_BLOCK_BYTES_B(64, 4), LQ2_AXIS_TOKENS,   1, 8.0f * LQ2_BLOCK_BYTES_B(64, 4) / 64,  "lq4_k64"  },
    { 64,  8, LQ2_BLOCK_BYTES_B(64, 8), LQ2_AXIS_TOKENS,   1, 8.0f * LQ2_BLOCK_BYTES_B(64, 8) / 64,  "lq8_k64"  },
    { 64,  4, LQ2_BLOCK_BYTES_B(64, 4), LQ2_AXIS_CHANNELS, 0, 8.0f * LQ2_BLOCK_BYTES_B(64, 4) / 64,  "lq4_v64"  },
    { 64,  8, LQ2_BLOCK_BYTES_B(64, 8), LQ2_AXIS_CHANNELS, 0, 8.0f * LQ2_BLOCK_BYTES_B(64, 8) / 64,  "lq8_v64"  },
    { 32,  4, LQ2_BLOCK_BYTES_B(32, 4), LQ2_AXIS_TOKENS,   1, 8.0f * LQ2_BLOCK_BYTES_B(32, 4) / 32,  "lq4_k32"  },
    { 32,  8, LQ2_BLOCK_BYTES_B(32, 8), LQ2_AXIS_TOKENS,   1, 8.0f * LQ2_BLOCK_BYTES_B(32, 8) / 32,  "lq8_k32"  },
    { 128, 4, LQ2_BLOCK_BYTES_B(128, 4), LQ2_AXIS_TOKENS,  1, 8.0f * LQ2_BLOCK_BYTES_B(128, 4) / 128, "lq4_k128" },
    { 128, 8, LQ2_BLOCK_BYTES_B(128, 8), LQ2_AXIS_TOKENS,  1, 8.0f * LQ2_BLOCK_BYTES_B(128, 8) / 128, "lq8_k128" },
};
#endif

// Key type for a group size and code bits: 2-, 4- and 8-bit keys in G = 32, 64, 128 tokens (64
// the cache's default group). -1 for anything else.
LQ2_INLINE int lq2_key_type_b(int g, int b) {
    const int gi = g == 32 ? 0 : g == 64 ? 1 : g == 128 ? 2 : -1;
    if (gi < 0) {
        return -1;
    }
    if (b == 2) {
        return gi == 0 ? LQ2_TYPE_K32 : gi == 1 ? LQ2_TYPE_K64 : LQ2_TYPE_K128;
    }
    if (b == 4) {
        return gi == 0 ? LQ2_TYPE_K32_B4 : gi == 1 ? LQ2_TYPE_K64_B4 : LQ2_TYPE_K128_B4;
    }
    return b != 8 ? -1 : gi == 0 ? LQ2_TYPE_K32_B8 : gi == 1 ? LQ2_TYPE_K64_B8 : LQ2_TYPE_K128_B8;
}
LQ2_INLINE int lq2_key_type(int g) { return lq2_key_type_b(g, 2); }

// Value type for code bits (2, 4, 8); -1 for anything else.
LQ2_INLINE int lq2_value_type(int b) {
    return b == 2 ? LQ2_TYPE_V64 : b == 4 ? LQ2_TYPE_V64_B4 : b == 8 ? LQ2_TYPE_V64_B8 : -1;
}

// ---- f16 <-> f32 by integer arithmetic: exact, round to nearest even, no FPU mode dependence,
// and the same code on every backend.

#if !defined(__METAL_VERSION__)
LQ2_INLINE uint32_t lq2_f32_bits_(float f) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u; memcpy(&u, &f, sizeof(u)); return u;
#endif
}
LQ2_INLINE float lq2_bits_f32_(uint32_t u) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f; memcpy(&f, &u, sizeof(f)); return f;
#endif
}
#endif

LQ2_INLINE float lq2_fp16_to_fp32(lq2_half h) {
    const uint32_t sign = (uint32_t) (h & 0x8000u) << 16;
    const uint32_t e    = (h >> 10) & 0x1fu;
    const uint32_t m    = h & 0x3ffu;
    if (e == 0x1fu) {
        return LQ2_BITS_F32(sign | 0x7f800000u | (m << 13));
    }
    if (e == 0) { // zero or subnormal: m * 2^-24 is exact in f32
        const float v = (float) m * 5.9604644775390625e-8f;
        return LQ2_BITS_F32(sign | LQ2_F32_BITS(v));
    }
    return LQ2_BITS_F32(sign | ((e + 112u) << 23) | (m << 13));
}

LQ2_INLINE lq2_half lq2_fp32_to_fp16(float f) {
    const uint32_t x    = LQ2_F32_BITS(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax   = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) { // Inf, NaN (quiet)
        return (lq2_half) (sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
    }
    if (ax >= 0x477ff000u) { // >= 65520 rounds to Inf
        return (lq2_half) (sign | 0x7c00u);
    }
    if (ax >= 0x38800000u) { // normal f16: rebias the exponent, round the 13 dropped bits
        uint32_t r = ax - 0x38000000u;
        r += 0x0fffu + ((r >> 13) & 1u);
        return (lq2_half) (sign | (r >> 13));
    }
    if (ax < 0x33000000u) { // below 2^-25: rounds to zero (2^-25 itself ties to even zero)
        return (lq2_half) sign;
    }
    // f16 subnormal: value in units of 2^-24 is mant >> (126 - exp), rounded to nearest even
    const uint32_t e    = ax >> 23;
    const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t s    = 126u - e; // 14..24
    uint32_t       q    = mant >> s;
    const uint32_t rem  = mant & ((1u << s) - 1u);
    const uint32_t half = 1u << (s - 1u);
    q += (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
    return (lq2_half) (sign | q);
}

// x as an f16 would hold it (staged values: lq2-demote-block.h).
LQ2_INLINE float lq2_f16_round(float x) {
    return lq2_fp16_to_fp32(lq2_fp32_to_fp16(x));
}

LQ2_INLINE int lq2_isfinite(float x) {
    return (LQ2_F32_BITS(x) & 0x7f800000u) != 0x7f800000u;
}

// f16 rounding after clamping to the f16 range: scales and minima must stay finite.
LQ2_INLINE lq2_half lq2_fp32_to_fp16_sat(float x) {
    x = x > LQ2_HALF_MAX ? LQ2_HALF_MAX : x < -LQ2_HALF_MAX ? -LQ2_HALF_MAX : x;
    return lq2_fp32_to_fp16(x);
}

// Two floats: (cos, sin), a rotated pair, a block's (d, m), a channel's references (mu, sigma).
struct lq2_pair {
    float a, b;
};

// ---- quantization arithmetic (the part every backend must agree on bit for bit)

// Largest code of b-bit codes.
#define LQ2_LEVELS_B(b) ((1 << (b)) - 1)

// ---- 8-bit headers (the scale_bits lever, LOGQUANT_SCALE_BITS=8, docs/levers.md)
//
// A block's header is the f16 pair (d, m), 4 bytes, or, in a layer given per-channel references
// (mu, sigma) (the op's refs source, F32 [2, n_embd_k_gqa (+ n_embd_v_gqa)]: key channels, then
// the channels of values grouped per channel), two bytes (e, k):
//   d = sigma * S[e & 15] * 2^((e >> 4) - 15), S[i] = round(128 * 2^(i / 16)): steps of about
//       4.4 % over sigma * [2^-8, 2^8);
//   m = fma(sigma, k / 8, mu), k an int8: mu +- 16 sigma in steps of sigma / 8.
// A quarter of a bit per value less at G = 64 (Qwen: no measurable cost, no block outside its
// range; docs/levers.md). sigma has at most 8 significant bits (lq2_ref_round), so d has at most
// 16 and d * code stays exact, as with f16 scales; the decoding is products and an fma, no exp2
// whose last bits differ between libm, CUDA and Metal, so every backend reads the same (d, m).
// Only blocks of one channel have one reference: keys before RoPE, values grouped per channel.
// In code, `ref` is the block's channel's (mu, sigma), sigma 0 for a layer of f16 headers; params
// are packed in a uint32, f16 d | m << 16 or e | k << 8.
#define LQ2_HDR_F16 4
#define LQ2_HDR_S8  2
#define LQ2_HDR_BYTES(s8) ((s8) ? LQ2_HDR_S8 : LQ2_HDR_F16)
#define LQ2_BLOCK_BYTES_H(n, b, s8) (LQ2_HDR_BYTES(s8) + (n) * (b) / 8)
#define LQ2_REF_SIGMA_MIN 1.0e-20f // references are clamped here: d stays far from f32's subnormals

// Channel ch's references, or (0, 0) (f16 headers) without refs.
LQ2_INLINE struct lq2_pair lq2_ref_at(const LQ2_DEV float * refs, int64_t ch) {
    struct lq2_pair r;
    r.a = refs ? refs[2 * ch] : 0.0f;
    r.b = refs ? refs[2 * ch + 1] : 0.0f;
    return r;
}

// A reference scale as stored: clamped to [LQ2_REF_SIGMA_MIN, 2^100] and rounded to 8
// significant bits (the host does this once when it makes the refs).
LQ2_INLINE float lq2_ref_round(float sigma) {
    sigma = sigma > LQ2_REF_SIGMA_MIN ? sigma : LQ2_REF_SIGMA_MIN; // NaN too
    sigma = sigma < 1.0e30f ? sigma : 1.0e30f;
    uint32_t u = LQ2_F32_BITS(sigma);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u; // 7 mantissa bits, nearest even
    return LQ2_BITS_F32(u);
}

// The scale of header byte e: sigma * S[e % 16] * 2^(e / 16 - 15), S[i] = round(128 * 2^(i / 16)).
LQ2_INLINE float lq2_s8_scale(uint32_t e, float sigma) {
    const float S[16] = { 128.0f, 134.0f, 140.0f, 146.0f, 152.0f, 159.0f, 166.0f, 173.0f,
                          181.0f, 189.0f, 197.0f, 206.0f, 215.0f, 225.0f, 235.0f, 245.0f };
    return (sigma * S[e & 15u]) * LQ2_BITS_F32((uint32_t) (127 + (int) (e >> 4) - 15) << 23); // both products exact
}

LQ2_INLINE float lq2_s8_min(int k, struct lq2_pair ref) {
    return LQ2_FMA(ref.b, (float) k * 0.125f, ref.a);
}

// The (d, m) of packed params.
LQ2_INLINE struct lq2_pair lq2_params_dm(uint32_t p, struct lq2_pair ref) {
    struct lq2_pair dm;
    if (ref.b > 0.0f) {
        dm.a = lq2_s8_scale(p & 0xffu, ref.b);
        dm.b = lq2_s8_min((int) (int8_t) (uint8_t) ((p >> 8) & 0xffu), ref);
    } else {
        dm.a = lq2_fp16_to_fp32((lq2_half) (p & 0xffffu));
        dm.b = lq2_fp16_to_fp32((lq2_half) (p >> 16));
    }
    return dm;
}

// The params nearest to a wanted (d, m): f16 rounding, or e the closest decoded scale (binary
// search, the smaller on a tie) and k rounded to nearest.
LQ2_INLINE uint32_t lq2_params_of(float d, float m, struct lq2_pair ref) {
    if (!(ref.b > 0.0f)) {
        return (uint32_t) lq2_fp32_to_fp16_sat(d) | ((uint32_t) lq2_fp32_to_fp16_sat(m) << 16);
    }
    uint32_t lo = 0, hi = 255; // the smallest e whose scale is >= d (255 when none is)
    while (lo < hi) {
        const uint32_t mid = (lo + hi) >> 1;
        if (lq2_s8_scale(mid, ref.b) >= d) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    if (lo > 0 && d - lq2_s8_scale(lo - 1, ref.b) <= lq2_s8_scale(lo, ref.b) - d) {
        lo -= 1;
    }
    const float t = LQ2_FLOOR(LQ2_DIV(m - ref.a, ref.b) * 8.0f + 0.5f);
    const int   k = t >= 127.0f ? 127 : t >= -128.0f ? (int) t : -128; // NaN -> -128
    return lo | ((uint32_t) (uint8_t) (int8_t) k << 8);
}

// From the finite min/max of a group (lo > hi means "no finite value seen") to the stored params
// for codes 0..levels (no pointers: Metal would need address-space qualifiers).
LQ2_INLINE uint32_t lq2_group_params(float lo, float hi, int levels, struct lq2_pair ref) {
    if (!(lo <= hi)) {
        lo = 0.0f;
        hi = 0.0f;
    }
    return lq2_params_of(LQ2_DIV(hi - lo, (float) levels), lo, ref);
}

// Fitted ranges (the `fit` lever, LOGQUANT_FIT, on by default): min/max codes spend their two
// outer levels on a group's extremes; a least-squares refit of (d, m) to the codes, re-rounded,
// trades a little error on the extremes for less on the bulk (Qwen, 2 bits, decode KL at 4k: 0.261
// -> 0.160, docs/levers.md).
// A round: with the current params, code every finite value of the group and add it to the sums
// (lq2_fit_add, in the group's value order), then lq2_fit_params gives the next params; the
// backend keeps the params of the round with the smallest squared error (the first, min/max, on
// ties), over up to LQ2_FIT_ROUNDS refits. Every product-and-sum is an explicit fma, so no
// compiler's contraction choice can change the bytes a backend stores.
#define LQ2_FIT_ROUNDS 4

struct lq2_fit_sums {
    float n, sc, sx, scc, scx; // count, sum of codes c, values x, c^2, c x
    float err;                 // sum of (d c + m - x)^2
};

LQ2_INLINE struct lq2_fit_sums lq2_fit_start(void) {
    struct lq2_fit_sums s = { 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f };
    return s;
}

// The (d, m) minimizing sum (x - d c - m)^2 for the codes summed in s, rounded to the header's
// grid (lq2_params_of); `keep` when the codes do not determine a positive scale.
LQ2_INLINE uint32_t lq2_fit_params(struct lq2_fit_sums s, uint32_t keep, struct lq2_pair ref) {
    const float den = LQ2_FMA(s.n, s.scc, -(s.sc * s.sc));
    if (!(den > 0.0f)) {
        return keep;
    }
    const float d = LQ2_DIV(LQ2_FMA(s.n, s.scx, -(s.sc * s.sx)), den);
    if (!(d > 0.0f) || !lq2_isfinite(d)) {
        return keep;
    }
    const float m = LQ2_DIV(LQ2_FMA(-d, s.sc, s.sx), s.n);
    return lq2_params_of(d, m, ref);
}

// Code of x given the block's stored scale and minimum as f32.
LQ2_INLINE uint32_t lq2_code(float x, float d, float m, int levels) {
    if (d == 0.0f) {
        return 0;
    }
    const float v = LQ2_FLOOR(LQ2_DIV(x - m, d) + 0.5f);
    return v >= (float) levels ? (uint32_t) levels : v > 0.0f ? (uint32_t) v : 0u; // NaN fails both tests -> 0
}

// Adds one finite value x of a group to a fit round's sums (the fit note above), coded with the
// round's stored d and m (as f32).
LQ2_INLINE struct lq2_fit_sums lq2_fit_add(struct lq2_fit_sums s, float x, float d, float m, int levels) {
    const float c = (float) lq2_code(x, d, m, levels);
    const float e = LQ2_FMA(d, c, m) - x; // d * c is exact: the same as the dequantized value - x
    s.n   += 1.0f;
    s.sc  += c;
    s.sx  += x;
    s.scc  = LQ2_FMA(c, c, s.scc);
    s.scx  = LQ2_FMA(c, x, s.scx);
    s.err  = LQ2_FMA(e, e, s.err);
    return s;
}

// Code j of a block of n b-bit codes (b > 0) after a header of hdr bytes (LQ2_HDR_BYTES).
LQ2_INLINE int lq2_block_code(const LQ2_DEV uint8_t * blk, int hdr, int n, int b, int j) {
    return (blk[hdr + LQ2_CODE_BYTE_B(j, n, b)] >> LQ2_CODE_SHIFT_B(j, n, b)) & LQ2_LEVELS_B(b);
}

// The value code j of a block stands for, from the block's d and m as f32: d * code + m (an
// exact product: one rounding, fused or not); a 0-bit block (b = 0) stands for m alone. Kernels
// that read many codes of one block decode its header once (lq2_block_dm) and call this.
LQ2_INLINE float lq2_code_value(const LQ2_DEV uint8_t * blk, int hdr, int n, int b, int j, float d, float m) {
    return b == 0 ? m : d * (float) lq2_block_code(blk, hdr, n, b, j) + m;
}

// A block's (d, m) from its header, f16 or 8-bit (ref.b > 0).
LQ2_INLINE struct lq2_pair lq2_block_dm(const LQ2_DEV uint8_t * blk, struct lq2_pair ref) {
    const uint32_t p = ref.b > 0.0f ? (uint32_t) blk[0] | ((uint32_t) blk[1] << 8)
                                    : (uint32_t) blk[0] | ((uint32_t) blk[1] << 8) | ((uint32_t) blk[2] << 16) |
                                          ((uint32_t) blk[3] << 24);
    return lq2_params_dm(p, ref);
}

LQ2_INLINE void lq2_block_set_params(LQ2_DEV uint8_t * blk, uint32_t p, struct lq2_pair ref) {
    blk[0] = (uint8_t) (p & 0xffu);
    blk[1] = (uint8_t) ((p >> 8) & 0xffu);
    if (!(ref.b > 0.0f)) {
        blk[2] = (uint8_t) ((p >> 16) & 0xffu);
        blk[3] = (uint8_t) (p >> 24);
    }
}

// Code j of a block of n b-bit codes, and the value it stands for.
LQ2_INLINE float lq2_block_value(const LQ2_DEV uint8_t * blk, int n, int b, int j, struct lq2_pair ref) {
    const struct lq2_pair dm = lq2_block_dm(blk, ref);
    return lq2_code_value(blk, LQ2_HDR_BYTES(ref.b > 0.0f), n, b, j, dm.a, dm.b);
}

// ---- one block, as every backend quantizes it

// The values may be in global memory or in a thread's own array: for Metal, whose pointers carry
// their address space, the two functions below are templates over the pointer type (C and CUDA
// pointers need no such thing).
#if defined(__METAL_VERSION__)
#    define LQ2_VALUES_TEMPLATE template <typename LQ2_VALUES_PTR>
#else
#    define LQ2_VALUES_TEMPLATE
#    define LQ2_VALUES_PTR const float *
#endif

// A fit round (above) over n values at x with stride sx, coded with params p; non-finite values
// (NaN marks an absent token) are left out.
LQ2_VALUES_TEMPLATE LQ2_INLINE struct lq2_fit_sums lq2_fit_round(LQ2_VALUES_PTR x, int64_t sx, int n, int L, uint32_t p,
                                                                 struct lq2_pair ref) {
    const struct lq2_pair dm = lq2_params_dm(p, ref);
    struct lq2_fit_sums s = lq2_fit_start();
    for (int j = 0; j < n; ++j) {
        const float v = x[j * sx];
        if (lq2_isfinite(v)) {
            s = lq2_fit_add(s, v, dm.a, dm.b, L);
        }
    }
    return s;
}

// The fitted params (the rounds above) of n values at x with stride sx, from the min/max params p.
// With 8-bit headers the best round's grid neighbours (e +- 1, k +- 1) are tried as well: the
// rounding to a coarse grid can miss the best point near the least-squares one.
LQ2_VALUES_TEMPLATE LQ2_INLINE uint32_t lq2_fit_block(LQ2_VALUES_PTR x, int64_t sx, int n, int L, uint32_t p,
                                                      struct lq2_pair ref) {
    uint32_t best = p;
    float best_err = INFINITY;
    for (int r = 0; r <= LQ2_FIT_ROUNDS; ++r) {
        const struct lq2_fit_sums s = lq2_fit_round(x, sx, n, L, p, ref);
        if (s.err < best_err) {
            best_err = s.err;
            best = p;
        }
        const uint32_t next = lq2_fit_params(s, p, ref);
        if (next == p) {
            break;
        }
        p = next;
    }
    if (ref.b > 0.0f) {
        const int e0 = (int) (best & 0xffu), k0 = (int) (int8_t) (uint8_t) ((best >> 8) & 0xffu);
        for (int de = -1; de <= 1; ++de) {
            for (int dk = -1; dk <= 1; ++dk) {
                const int e = e0 + de, k = k0 + dk;
                if ((de == 0 && dk == 0) || e < 0 || e > 255 || k < -128 || k > 127) {
                    continue;
                }
                const uint32_t q = (uint32_t) e | ((uint32_t) (uint8_t) (int8_t) k << 8);
                const float err = lq2_fit_round(x, sx, n, L, q, ref).err;
                if (err < best_err) {
                    best_err = err;
                    best = q;
                }
            }
        }
    }
    return best;
}

// One block of n b-bit codes from n values at x with stride sx, of which the first n_valid are
// present (the rest get code 0); fit: fitted params instead of min/max; ref: the channel's
// references for an 8-bit header, sigma 0 for f16. The CPU's reference and the GPU demotions
// all run this, so they store the same bytes.
LQ2_VALUES_TEMPLATE LQ2_INLINE void lq2_quantize_block(LQ2_VALUES_PTR x, int64_t sx, int n_valid, int n, int b, int fit,
                                                       struct lq2_pair ref, LQ2_DEV uint8_t * blk) {
    if (b == 0) { // a 0-bit channel of mixed key widths (below): the header alone, m the mean
        float sum = 0.0f, cnt = 0.0f;
        for (int j = 0; j < n_valid; ++j) {
            const float v = x[j * sx];
            if (lq2_isfinite(v)) {
                sum += v;
                cnt += 1.0f;
            }
        }
        lq2_block_set_params(blk, lq2_params_of(0.0f, cnt > 0.0f ? LQ2_DIV(sum, cnt) : 0.0f, ref), ref);
        return;
    }
    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < n_valid; ++j) {
        const float v = x[j * sx];
        if (lq2_isfinite(v)) {
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
    }
    const int L = LQ2_LEVELS_B(b);
    uint32_t p = lq2_group_params(lo, hi, L, ref);
    p = fit ? lq2_fit_block(x, sx, n_valid, L, p, ref) : p;
    lq2_block_set_params(blk, p, ref);
    const struct lq2_pair dm = lq2_params_dm(p, ref);
    const int hdr = LQ2_HDR_BYTES(ref.b > 0.0f);
    LQ2_DEV uint8_t * qs = blk + hdr;
    const int nb = n * b / 8;
    for (int l = 0; l < nb; ++l) { // byte l: codes l, l + nb, l + 2 nb, ...
        uint32_t byte = 0;
        for (int k = 0; k < 8 / b; ++k) {
            const int j = l + k * nb;
            byte |= (j < n_valid ? lq2_code(x[j * sx], dm.a, dm.b, L) : 0u) << (b * k);
        }
        qs[l] = (uint8_t) byte;
    }
}

// ---- mixed key widths (the key_widths lever, LOGQUANT_KEY_WIDTHS, docs/levers.md)
//
// A channel's share of the score error is its query energy times its key error, and both vary
// by orders of magnitude across the channels of a head. With mixed widths, channel c of a kv head
// has codes of w[c] bits, 0, b or 2b for a layer of b-bit keys (b = 2 or 4; both channels of a
// RoPE pair alike), chosen per layer from the model's weights
// (native/llama/logquant-key-widths.cpp) with a mean of b bits, so that a key group keeps its
// bytes: block c starts at lq2_widths_offset(w, c, G) and the blocks of a kv head take as many
// bytes as with uniform b-bit codes. A 0-bit block is its header alone: d = 0 and m the
// f16-rounded mean of the group's finite values, read for every token.
#define LQ2_WIDTH_VALID(b) ((b) == 0 || (b) == 2 || (b) == 4 || (b) == 8)

// A layer's key bits: 2, 4 or 8 (uniform codes, or mixed widths 0/b/2b), or 3: mixed widths only
// (0, 2 or 4 bits per channel at a mean of 3, for a 3.0-bits/value point; there are no 3-bit
// codes), in the groups 4-bit keys come in. `mixed`: the layer has mixed widths.
#define LQ2_KEY_BITS_VALID(b) (LQ2_BITS_VALID(b) || (b) == 3)
LQ2_INLINE int lq2_key_bits_ok(int G, int b, int mixed) {
    return b == 3 ? mixed && lq2_key_type_b(G, 4) >= 0 : lq2_key_type_b(G, b) >= 0;
}

// Byte offset of channel c's block in a group whose channels have widths w (c <= channels) and
// headers of 8 bits (s8) or f16.
LQ2_INLINE int64_t lq2_widths_offset(const LQ2_DEV int8_t * w, int c, int G, int s8) {
    int64_t off = 0;
    for (int i = 0; i < c; ++i) {
        off += LQ2_BLOCK_BYTES_H(G, (int) w[i], s8);
    }
    return off;
}

// ---- RoPE at demotion: keys leave the f16 tier post-RoPE and are un-rotated at their position
// before they are quantized; the CPU and CUDA demotions share this arithmetic so that they store
// the same codes.

#if !defined(__METAL_VERSION__)
// Angle per unit of position of rotation pair i, in double (Metal, without double, will need its
// own rule and an error bound).
LQ2_INLINE double lq2_rope_freq(int i, int n_dims, float freq_base, float freq_scale) {
    return (double) freq_scale * pow((double) freq_base, -2.0 * (double) i / (double) n_dims);
}
#endif

// (cos, sin) of pos * f without double (Metal), f given as f_hi + f_lo (the host splits the double
// frequency): the product in two floats (an fma recovers the rounding error of p * f_hi), then
// reduced by 2 pi in two parts. |error| <= 1e-6 against the double computation for positions below
// 2^20 (tests/native/test_lq2_attn_block.py), where the un-rotated key is then quantized to 2 bits.
#define LQ2_TWO_PI_HI 6.28318548202514648438f   // float(2 pi)
#define LQ2_TWO_PI_LO -1.7484555314695172e-07f  // 2 pi - LQ2_TWO_PI_HI
LQ2_INLINE struct lq2_pair lq2_rope_cos_sin_f32(int32_t pos, float f_hi, float f_lo) {
    const float p  = (float) pos; // exact below 2^24
    const float t  = p * f_hi;
    const float tl = LQ2_FMA(p, f_lo, LQ2_FMA(p, f_hi, -t)); // p * f = t + tl
    const float k  = LQ2_FLOOR(t * 0.15915494309189535f + 0.5f);
    const float r  = LQ2_FMA(-k, LQ2_TWO_PI_LO, LQ2_FMA(-k, LQ2_TWO_PI_HI, t)) + tl;
    struct lq2_pair cs;
    cs.a = LQ2_COSF(r);
    cs.b = LQ2_SINF(r);
    return cs;
}

// R^T (x0, x1) / mscale for a pair rotated by (c, s) = (cos, sin) of its angle: explicit fmas and
// IEEE division, so no compiler's contraction or fast-math flag changes the result.
LQ2_INLINE struct lq2_pair lq2_unrotate_pair(float x0, float x1, float c, float s, float mscale) {
    struct lq2_pair r;
    r.a = LQ2_DIV(LQ2_FMA(x0, c, x1 * s), mscale);
    r.b = LQ2_DIV(LQ2_FMA(x1, c, -(x0 * s)), mscale);
    return r;
}

// ---- bias correction of low-bit scores (lq2_tier_q2.score_correction)
//
// Zero-mean noise e on a score s inflates its expected weight: E[exp(s + e)] = exp(s) exp(sig2 / 2)
// for Gaussian e of variance sig2 (Jensen), so thousands of low-bit tokens take attention mass from
// the f16 tier. A b-bit code's rounding error is about uniform on one step d: variance d^2 / 12.
// The score q . R k has noise q . R e; RoPE's rotation R differs per token and moves a pair's
// share of |q|^2 between its two channels, so averaged over tokens channel c weighs
// qbar_c = (q_a^2 + q_b^2) / 2 for its pair (a, b) (q_c^2 for a channel RoPE leaves alone). Then
// sig2 = scale^2 * sum_c qbar_c * var_c, and every score of the group is lowered by sig2 / 2. One
// number per (group, query head), nothing stored: the steps are the blocks' scales.
LQ2_INLINE float lq2_code_noise_var(float d) {
    return d * d * (1.0f / 12.0f);
}

// The correction in units of the raw dot product (the kernel scales scores afterwards): given
// v = sum_c qbar_c * var_c, subtract scale * v / 2 from q . k.
LQ2_INLINE float lq2_score_correction(float v, float scale) {
    return 0.5f * scale * v;
}

#if defined(__cplusplus) && !defined(__METAL_VERSION__)
}
#endif
