// logquant-cache.h: the LogQuant mode of llama_kv_cache (selected by type_k == GGML_TYPE_LQ2).
//
// llama_kv_cache keeps doing what it does for the full-precision tier: its cells and its f16 K/V
// tensors hold the tokens LogQuant keeps in f16 (at most 3W) plus room for one ubatch. This class
// owns the 2-bit tier beside it: per layer a key store (pre-RoPE, per channel, groups of G tokens)
// and a value store (per token, groups of 64 channels), the slot -> position map, and the host-side
// plan of which tokens leave the f16 tier in the current ubatch.
//
// Each ubatch: apply_ubatch places the new tokens in cells, then plan() applies the policy (a pure
// function of the positions held, see logquant-policy.h) and frees the cells of the tokens that
// leave the f16 tier, recording (cell, position, slot) for them. In the graph, per layer, the
// demote op (GGML_OP_LQ2_DEMOTE) quantizes those rows into the 2-bit stores right after the new
// K/V rows are written, and the attention op (GGML_OP_LQ2_ATTN) reads both tiers in one
// online-softmax pass. Everything they read is a tensor: the stores, the staging of partial key
// groups and the cos/sin table live beside the layer's K/V (same buffer type: on the device when
// the layer is offloaded), and the plan reaches the graph as inputs (logquant-graph.h).
//
// Sequences: any number, in one unified stream (kv_unified, as llama-cpp-python's embedding mode
// sets it) or one stream per sequence (llama.cpp's default for n_seq_max > 1). Streams are an f16
// tier matter: each stream has its own cells, sized as the f16 tier of the sequences it holds.
// The 2-bit tier is one shared store for all streams, in groups of G slots; a group is filled by
// one sequence at a time (its "open" group), so each sequence's tokens are grouped exactly as in
// a single-sequence run, and every slot carries the set of sequences that hold it (seq_cp shares
// slots, like llama.cpp's cells). A layer's tier may sit on any device whose backend runs the two
// ops (check_device); the rest are refused clearly.
#pragma once

#include "logquant-book.h"
#include "lq2-rope.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

class  llama_kv_cells;
struct llama_cparams;
struct llama_hparams;
struct llama_model;
struct llama_ubatch;
class  llama_io_write_i;
class  llama_io_read_i;

enum logquant_policy_kind {
    LOGQUANT_POLICY_LOG    = 0, // LogQuant: newest W..2W plus W log-spaced older tokens
    LOGQUANT_POLICY_WINDOW = 1, // baseline: only the newest 3W tokens
};

// Code bits of one layer's low-bit tier: the precision levers. 2 is LogQuant's format; 4 and 8
// buy quality for bits per value (keys b + 0.5, values b + 0.5 with G = 64).
struct logquant_layer_bits {
    int32_t il;
    int32_t key_bits;
    int32_t value_bits;
};

// Where a saved context's f16 cells were in one stream: its search head and, in order, the index
// of each cell of llama.cpp's cell list. A whole-context state starts with the layouts of its
// streams (LOGQUANT_CELL_LAYOUT_TAG, then logquant_cache::write_cell_layout), and llama_kv_cache's
// read places the cells there instead of packing them from cell 0 (patch 0015): the fused
// attention folds the f16 tier in cell order and a new token takes the first free cell after the
// head, so only then does the restored context continue bit for bit as the saved one.
struct logquant_cell_layout {
    uint32_t              head = 0;
    std::vector<uint32_t> idxs;
};
#define LOGQUANT_CELL_LAYOUT_TAG 0x4c51324cu // "LQ2L"; a state without it starts with its stream count

// Settings read when a cache is created (C API logquant_set_params / logquant_set_bits, or env
// for llama.cpp's tools).
// Automatic prefill threshold when the 2-bit tier lives on a GPU (logquant_settings::prefill_fa_min).
#define LQ2_PREFILL_FA_MIN_GPU 32

struct logquant_settings {
    int32_t window     = 32;
    int32_t policy     = LOGQUANT_POLICY_LOG;
    int32_t key_bits   = 2;   // every layer's, unless overridden below
    int32_t value_bits = 2;
    std::vector<logquant_layer_bits> layer_bits; // per-layer overrides (e.g. a sensitive layer 0)
    // Key format knobs for the format study (docs/levers.md): tokens per key group (32, 64, 128)
    // and grouping after RoPE instead of before (KIVI's layout). The default format has groups of
    // 128 and layer bits "auto" (below): 2.5 bits per value. Env settings that ask for code bits,
    // layer bits, a group or a layout of before (uniform widths, keys after RoPE, values per
    // token) start from groups of 64 without "auto" instead, as the Python package does
    // (kv_types.check_bits).
    int32_t key_group      = 128;
    int32_t keys_post_rope = 0;
    // Ubatches of at least this many tokens (one stream) attend through ggml's flash attention
    // over both tiers dequantized to f16 (LQ2_DEQUANT), smaller ones (decode) through the fused
    // LQ2_ATTN; 0: always fused (LOGQUANT_PREFILL_FA_MIN). -1 (the default): automatic, always
    // fused when the tier lives in host memory (the faster on the CPU at every ubatch size
    // measured, docs/bench.md), LQ2_PREFILL_FA_MIN_GPU when it lives on a GPU, whose flash
    // attention runs on tensor cores (a first choice: never measured on a GPU).
    int32_t prefill_fa_min = -1;
    // Code quality levers at no memory cost (docs/levers.md): fit each group's scale and minimum
    // by least squares instead of min/max (keys and values; LOGQUANT_FIT=0 turns it off; the
    // default since it cut Qwen's decode KL at 4k 0.261 -> 0.160), and lower the scores of 2-bit
    // keys by their expected noise inflation (LOGQUANT_SCORE_CORRECTION; off: it made the KL
    // worse end to end).
    int32_t fit              = 1;
    int32_t score_correction = 0;
    // Mixed key widths (lq2-format.h; the default, LOGQUANT_KEY_WIDTHS=uniform turns them off):
    // each b-bit-key layer's channels (b = 2 or 4) get 0, b or 2b bits, a mean of b, chosen from the model's
    // weights (logquant-key-widths.cpp; Qwen's decode KL at 4k 0.159 -> 0.078, docs/levers.md).
    // 0: every channel the layer's key bits. Keys grouped after RoPE keep uniform widths.
    int32_t key_widths       = 1;
    // Values grouped per channel over a key group's G tokens, as the keys are, instead of per token
    // over 64 channels (lq2-op-params.h; the default, LOGQUANT_VALUE_GROUPS=token turns it off):
    // the same bytes, half the values' share of the attention error on Qwen (docs/levers.md). A
    // layer whose value bits have no key type at G (4- or 8-bit values with G 32 or 128) keeps
    // per-token values.
    int32_t value_per_channel = 1;
    // Bits of each block's scale and minimum (lq2-format.h's 8-bit headers; LOGQUANT_SCALE_BITS):
    // 16, the f16 pair, or 8, a byte each relative to per-channel references from the model's
    // weights (logquant-header-refs.cpp): a quarter of a bit per value less at G = 64. Needs keys
    // stored before RoPE; values grouped per token keep f16 headers.
    int32_t scale_bits = 16;
    // Layer bits "auto" (LOGQUANT_LAYER_BITS=auto, logquant_set_layer_bits_auto): 3-bit keys for the
    // half of the layers of 2-bit keys whose weights predict the most gain from them
    // (logquant_auto_key_layers), explicit layer_bits first. Needs mixed key widths (pre-RoPE keys);
    // without them every layer keeps its bits. With key groups of 128 it costs what groups of 64
    // do: 2.5 bits per value (docs/levers.md).
    int32_t layer_bits_auto = 1;
    std::string layer_bits_error; // LOGQUANT_LAYER_BITS as given, when it could not be read

    // The code bits of layer il: {key, value}.
    std::pair<int32_t, int32_t> bits_of(int32_t il) const;
};

// What the key widths are predicted from, per kv head of a layer: each RoPE pair's (or channel's)
// query energy x key variance, from the layer's Q/K weights (logquant-key-widths.cpp).
using logquant_unit_weights = std::vector<std::vector<double>>;

// A layer's mixed key widths (n_head_kv * D: 0, b or 2b bits, a mean of b, for b-bit keys, b = 2
// or 4) predicted from the model's Q/K weights (logquant-key-widths.cpp); empty, with the reason
// in why, when they cannot be. known: the layer's unit weights when already computed (layer bits
// "auto" reads them first), else null.
std::vector<int8_t> logquant_key_widths(const llama_model & model, const llama_hparams & hparams, int32_t il,
                                        int32_t bits, const lq2_rope_params & rope, std::string & why,
                                        const logquant_unit_weights * known = nullptr);

// Layer bits "auto": the layers that get 3-bit keys, sorted; of the layers this cache holds with
// 2-bit keys and no explicit override, the half where 3-bit keys are predicted to remove the most
// score error (the error left at a mean of 2 bits minus that at 3, over the kv heads). Empty,
// with the reason in note, where 3-bit keys are not available (keys after RoPE, uniform widths);
// when the weights cannot be read (a size estimate) the later half, with a note. ranking: the
// candidates and their gains, the largest first ("11 226, 17 91.6, 5 87.6" on Gemma 3 270M), for the log.
// weights_of: the unit weights read on the way, by layer, for logquant_key_widths.
std::vector<int32_t> logquant_auto_key_layers(const llama_model & model, const llama_hparams & hparams,
                                              const logquant_settings & s, const lq2_rope_params & rope, bool no_rope,
                                              const std::function<bool(int32_t)> & holds_layer, std::string & note,
                                              std::string & ranking,
                                              std::map<int32_t, logquant_unit_weights> & weights_of);

// A layer's channel references for 8-bit headers (lq2-format.h), (mu, sigma) per key channel, then
// (values: per-channel values) per value channel, from the model's weights
// (logquant-header-refs.cpp); empty, with the reason in why, when they cannot be read.
std::vector<float> logquant_header_refs(const llama_model & model, const llama_hparams & hparams, int32_t il,
                                        bool values, std::string & why);

logquant_settings logquant_settings_current();
void              logquant_settings_set(const logquant_settings & s);

// The context parameters a cache must follow: the largest ubatch (n_ubatch: the f16 tier takes one
// at once) and the RoPE the graph applies (the context's rope_freq_base / rope_freq_scale overrides
// and YaRN choice, not the model's trained values). llama_kv_cache's constructor does not receive
// them, so llama_model::create_memory (patch 0007) opens this scope around the caches it creates.
struct logquant_context_scope {
    explicit logquant_context_scope(const llama_cparams & cparams);
    ~logquant_context_scope();
};

// The parameters of the context whose caches are being created on this thread (null outside
// such a scope).
const llama_cparams * logquant_context_cparams();

// Why the last LogQuant cache creation on this thread was refused (empty if it was not): llama.cpp
// only logs the exception, so the C API hands the reason to Python for its error message.
const std::string & logquant_refusal();
void                logquant_clear_refusal();

// Per-tier figures for the C API's statistics.
struct logquant_tier_stats {
    int64_t n_f16;     // tokens in the f16 tier
    int64_t n_q2;      // tokens in the 2-bit tier (valid slots; a slot shared by seq_cp counts once)
    int64_t n_slots;   // 2-bit slots the attention scans: valid, freed, or not yet filled
    int64_t bytes_f16; // f16 K/V bytes allocated
    int64_t bytes_q2;  // 2-bit K/V bytes allocated
    int64_t bytes_host; // host memory beside the 2-bit tensors: the slots' cos/sin table (pre-RoPE
                        // keys only) and bookkeeping (position, sequences, sorted positions)
    int64_t bytes_aux; // of bytes_q2: the staging and cos/sin table tensors (not sized by the bits)
    double  q2_bits_per_value; // storage of the low-bit tier per K or V value, scales included,
                               // over the layers this cache holds (the code bits decide it)
};

class logquant_cache {
public:
    using seq_sets = logquant_seq_sets;

    const int G; // tokens per key group (settings.key_group): 2 + 32/G bits per 2-bit key value

    // kv_size: cells per stream the caller asked for (the context size, or a sequence's share of
    // it with one stream per sequence); the 2-bit tier holds that many for every stream.
    // holds_layer: whether layer il will be one of this cache's (add_layer), as llama_kv_cache's
    // layer filter says; per-layer work (the key widths) is done for those only.
    logquant_cache(const llama_model & model, const llama_hparams & hparams, uint32_t kv_size,
                   uint32_t n_seq_max, bool unified, const std::function<bool(int32_t)> & holds_layer);

    // Empty when this model and setup can use LogQuant; else the reason, for the error message.
    // reuses_kv: some layers read another layer's K/V (Gemma 3n / Gemma 4).
    std::string check_supported(const llama_model & model, const llama_hparams & hparams, bool v_trans,
                                bool reuses_kv) const;
    // Throws the refusal (and records it for logquant_last_error).
    [[noreturn]] static void refuse(const std::string & why);

    // How many f16 cells a stream's full-precision tier needs (<= kv_size_requested): 3W per
    // sequence it holds plus one ubatch.
    uint32_t f16_cells(uint32_t kv_size_requested, uint32_t n_pad) const;

    // The f16 tier's cells of llama_kv_cache (one llama_kv_cells per stream, stream_size cells
    // each, rows s * stream_size + cell of its K/V tensors) and its sequence -> stream map. Both
    // live in the same llama_kv_cache as this object.
    void bind(std::vector<llama_kv_cells> & v_cells, const std::vector<uint32_t> & seq_to_stream,
              uint32_t stream_size);

    // Creates layer il's 2-bit tensors in ctx (allocated with the cache's other tensors).
    void add_layer(ggml_context * ctx, int32_t il, uint32_t n_embd_k_gqa, uint32_t n_embd_v_gqa,
                   uint32_t n_head_kv, uint32_t n_head);

    // find_slot asks first: can the 2-bit tier take what placing this ubatch will demote (one merge
    // of the window moves about W tokens for a one-token ubatch)? The count plan() will make.
    bool has_room(const llama_ubatch & ubatch) const;

    // After apply_ubatch placed a ubatch: decide the demotions of its sequences, free their cells
    // (or drop the leaving sequence from a cell other sequences still keep in f16). All or
    // nothing: false (and nothing changed, planned() false) when the 2-bit tier cannot take them.
    bool plan(const llama_ubatch & ubatch);
    bool planned() const { return plan_ok; }

    // While a state is read back, its cells are placed as saved: no tier decisions then.
    struct plan_pause {
        logquant_cache * lq;
        explicit plan_pause(logquant_cache * lq) : lq(lq) { if (lq) lq->planning = false; }
        ~plan_pause() { if (lq) lq->planning = true; }
    };
    bool planning = true;
    bool overrides_checked = false;

    // seq_rm of positions [p0, p1) of sequence seq_id (-1: every sequence). A tail [p0, end) is
    // refused (false, nothing changed) when the policy would bring 2-bit tokens back to f16: their
    // f16 values are gone, so the caller must re-evaluate (llama-cpp-python then re-evaluates the
    // prompt; results equal a fresh run). A range inside the sequence (a context shift's discard)
    // is removed; the 2-bit tokens after it stay 2-bit even where the policy, counting from the
    // new positions, would keep them in f16.
    bool seq_rm(int32_t seq_id, int32_t p0, int32_t p1);
    // The 2-bit part of seq_add / seq_div (llama.cpp shifts the f16 cells and their keys): the
    // slots take their new positions and their keys are re-rotated there when read. Slots shared
    // with other sequences move with them, as llama.cpp's shared cells do; a position that turns
    // negative frees the slot. False (nothing changed) when keys are stored after RoPE.
    bool seq_add(int32_t seq_id, int32_t p0, int32_t p1, int32_t shift);
    bool seq_div(int32_t seq_id, int32_t p0, int32_t p1, int32_t d);
    // Pre-RoPE keys move by re-rotating them when read; a model without RoPE has nothing to move.
    bool can_shift() const { return rope.n_dims > 0 || no_rope; }
    // The 2-bit part of llama.cpp's seq_cp / seq_keep (which handle the f16 cells): slots are
    // shared, not copied. replace: the destination's own slots go first (a copy across streams
    // replaces the destination stream whole). seq_keep, like llama.cpp's, leaves other streams'
    // sequences alone.
    void seq_cp(int32_t seq_src, int32_t seq_dst, int32_t p0, int32_t p1, bool replace = false);
    void seq_keep(int32_t seq_id);
    void clear();

    int32_t seq_pos_min(int32_t seq_id, int32_t cells_min) const;
    int32_t seq_pos_max(int32_t seq_id, int32_t cells_max) const;

    // The host-side bookkeeping of the 2-bit tier (logquant-book.h). prepare() in llama_kv_cache
    // simulates all ubatches, then restores it: save / restore copy it whole.
    using book = logquant_book;
    using snapshot = book;
    snapshot save() const { return bk; }
    void     restore(const snapshot & s);

    // The whole context's state only: a sequence's own state (llama_state_seq_*) is refused.
    void state_write(llama_io_write_i & io, int32_t seq_id) const;
    bool state_read (llama_io_read_i  & io, int32_t seq_id);
    // The tag and every stream's logquant_cell_layout (heads: llama_kv_cache's search heads); read
    // back after the tag, each index checked against the stream's cells.
    void write_cell_layout(llama_io_write_i & io, const std::vector<uint32_t> & heads) const;
    bool read_cell_layout(llama_io_read_i & io, std::vector<logquant_cell_layout> & layout, std::string & why) const;

    logquant_tier_stats stats(int64_t bytes_f16) const;


    // Empty when the backend of dev runs the LogQuant ops (so the layer's tier may live there);
    // else the reason. A backend without them cannot fall back to the CPU: the stores are written
    // in place. A layer whose mixed key widths the backend does not read gets uniform ones.
    std::string check_device(ggml_backend_dev_t dev);

    bool has_layer(int32_t il) const { return layer_of.count(il) > 0; }

    int32_t window() const { return settings.window; }
    // The prefill threshold in effect (the setting, or the automatic choice for where the tier is).
    int32_t prefill_fa_min() const {
        return settings.prefill_fa_min >= 0 ? settings.prefill_fa_min : on_gpu ? LQ2_PREFILL_FA_MIN_GPU : 0;
    }
    int32_t fit() const { return settings.fit; }
    int32_t score_correction() const { return settings.score_correction; }
    int32_t policy() const { return settings.policy; }

    // A layer's 2-bit tier (what the graph's ops read; see logquant-graph.h).
    struct layer {
        int32_t       il;
        ggml_tensor * k2;      // I8: groups of G tokens x n_embd_k_gqa key blocks of k_bits codes
        ggml_tensor * v2;      // I8: slots x n_embd_v_gqa / 64 value blocks of v_bits codes, or
                               // per-channel values: groups x n_embd_v_gqa blocks of G codes
        // F16 [G * n_embd_k_gqa (+ G * n_embd_v_gqa), n_stage]: pre-RoPE keys (then the values, when
        // per channel) of the open (partial) groups, one row per open group (book::stage_row): a
        // group is requantized whole as it grows (f16: lq2-demote-block.h says why)
        ggml_tensor * staging;
        ggml_tensor * rope;    // the cos/sin table of this layer's buffer (rope_tables), or null
        ggml_tensor * widths;  // I8 [n_embd_k_gqa]: mixed key widths (settings.key_widths), or null
        std::vector<int8_t> widths_host; // their values (empty: uniform k_bits)
        ggml_tensor * refs;    // F32 [2, channels]: references of 8-bit headers (settings.scale_bits), or null
        std::vector<float> refs_host;    // their values (empty: f16 headers)
        uint32_t n_embd_k_gqa;
        uint32_t n_embd_v_gqa;
        uint32_t n_head_kv;
        uint32_t n_head;        // query heads (a GPU kernel may take only so many per kv head)
        int32_t  k_bits;
        int32_t  v_bits;
        size_t   k_group_bytes; // one group of G tokens, all channels
        int32_t  v_per_channel; // values grouped per channel (settings.value_per_channel)
        size_t   v_group_bytes; // the values of one group's G slots, all channels (either grouping)
    };
    mutable bool on_gpu = false; // check_device found a CUDA or Metal device taking the tier (prefill_fa_min's default)
    bool device_takes_layer(ggml_backend_dev_t dev, const layer & l) const; // check_device's probe
    struct demotion {
        int64_t  row;  // of the f16 K/V tensors: stream * stream_size + cell
        int32_t  pos;
        int64_t  slot;
        int32_t  stage; // staging row of the slot's group
    };
    const std::vector<layer> & all_layers() const { return layers; }
    const layer & layer_at(int32_t il) const { return layers[layer_of.at(il)]; }
    int64_t n_slot_capacity() const { return n_groups * G; }

    // The cos/sin table rows changed since the last upload: groups [dirty_g0, dirty_g1). The
    // graph input computes them from the positions and uploads them to every table (one per
    // buffer the layers live in) before compute.
    void upload_rope_tables();
    // The layers' key widths and header references, after the buffers were allocated or cleared
    // (set_input calls it).
    void upload_layer_constants();
    int32_t n_mixed_layers() const; // layers with mixed key widths

    lq2_rope_params         rope;       // n_dims 0: keys stay post-RoPE (explicit fallback), or no RoPE
    bool                    no_rope = false; // the model rotates nothing (ALiBi, ...): keys are as stored
    book                    bk;
    std::vector<demotion>   pending;    // this ubatch's demotions, in the order their slots were
                                        // handed out (a group's are adjacent, in slot order)
    std::vector<int32_t>    ubatch_pos; // this ubatch's positions (the queries' causal limit)
    std::vector<int32_t>    ubatch_seq; // and sequences (the first of each token's, as llama.cpp's mask)

private:
    uint32_t            n_stream;   // f16 tier streams: 1 (unified) or n_seq_max
    logquant_settings   settings;
    uint32_t            kv_size;    // cells per stream the context asked for: a stream holds no more tokens
    uint32_t            n_ubatch;   // the context's largest ubatch
    bool                plan_ok = true;
    uint32_t            capacity;   // tokens the 2-bit tier must take: the context plus one ubatch
    uint32_t            n_seq_max;
    int64_t             n_groups;   // groups allocated: capacity / G plus one open group per sequence
    std::map<int32_t, size_t> layer_of;
    std::vector<layer>  layers;
    std::map<ggml_context *, ggml_tensor *> rope_tables; // one per buffer the layers live in
    int64_t             dirty_g0 = 0, dirty_g1 = 0;
    std::map<int32_t, std::vector<int8_t>> key_widths_of; // by layer, when settings.key_widths
    std::map<int32_t, std::vector<float>> header_refs_of; // by layer, keys' then values', when scale_bits is 8
    bool                constants_uploaded = false;
    std::vector<llama_kv_cells> *  v_cells       = nullptr; // see bind()
    const std::vector<uint32_t> *  seq_to_stream = nullptr;
    uint32_t                       stream_size   = 0;

    llama_kv_cells & cells_of(int32_t seq_id) const; // the f16 cells of the sequence's stream
    // The f16 tokens of seq_id in cells: (position, cell), by position.
    static std::vector<std::pair<int32_t, uint32_t>> f16_tokens(const llama_kv_cells & cells, int32_t seq_id);

    logquant_cache(const logquant_settings & s, const llama_model & model, const llama_hparams & hparams,
                   uint32_t kv_size, uint32_t n_seq_max, bool unified,
                   const std::function<bool(int32_t)> & holds_layer);

    bool read_book(llama_io_read_i & io, int64_t n, int64_t n_grp, std::vector<int64_t> & open,
                   std::string & why); // state_read's bookkeeping part, validated

    // The f16 tokens (position, cell) of seq_id that leave the f16 tier once the positions
    // `incoming` join it; n_incoming_leaving: how many of those leave at once.
    std::vector<std::pair<int32_t, uint32_t>> leaving(int32_t seq_id, const std::vector<int32_t> & incoming,
                                                      int64_t & n_incoming_leaving) const;
    void    refresh_rope_group(int64_t g); // group g's positions changed: its table rows are due
    template <typename F> bool move_positions(int32_t seq_id, int32_t p0, int32_t p1, F new_pos);
};
