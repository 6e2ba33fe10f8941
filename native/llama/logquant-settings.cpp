// logquant-settings.cpp: what a LogQuant cache is created with: its settings (C API or env), the
// context parameters handed over by llama_model::create_memory, and the reason of a refusal.
#include "logquant-cache.h"

#include "llama-cparams.h"
#include "llama-impl.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

// ---------------------------------------------------------------------------------------------
// settings

static std::mutex        g_settings_mutex;
static logquant_settings g_settings = [] {
    logquant_settings s;
    // llama.cpp's own tools (llama-perplexity, llama-bench) select the cache with -ctk lq2 and
    // have no other channel for these two numbers.
    if (const char * w = std::getenv("LOGQUANT_WINDOW")) {
        s.window = std::atoi(w);
    }
    if (const char * p = std::getenv("LOGQUANT_POLICY")) {
        s.policy = std::strcmp(p, "window") == 0 ? LOGQUANT_POLICY_WINDOW : LOGQUANT_POLICY_LOG;
    }
    // asking for any of these leaves the default format: groups of 64, only the layer bits asked for
    for (const char * name : { "LOGQUANT_KEY_BITS", "LOGQUANT_VALUE_BITS", "LOGQUANT_LAYER_BITS", "LOGQUANT_KEY_GROUP" }) {
        if (std::getenv(name)) {
            s.key_group       = 64;
            s.layer_bits_auto = 0;
        }
    }
    if (const char * b = std::getenv("LOGQUANT_KEY_BITS")) {
        s.key_bits = std::atoi(b);
    }
    if (const char * b = std::getenv("LOGQUANT_VALUE_BITS")) {
        s.value_bits = std::atoi(b);
    }
    if (const char * g = std::getenv("LOGQUANT_KEY_GROUP")) {
        s.key_group = std::atoi(g);
    }
    if (const char * r = std::getenv("LOGQUANT_KEYS_POST_ROPE")) {
        s.keys_post_rope = std::atoi(r);
    }
    if (const char * f = std::getenv("LOGQUANT_PREFILL_FA_MIN")) {
        s.prefill_fa_min = std::atoi(f);
    }
    if (const char * f = std::getenv("LOGQUANT_FIT")) {
        s.fit = std::atoi(f) != 0;
    }
    if (const char * w = std::getenv("LOGQUANT_KEY_WIDTHS")) { // "auto" (or 1): mixed; "uniform" (or 0)
        s.key_widths = std::strcmp(w, "uniform") != 0 && std::strcmp(w, "0") != 0;
    }
    if (const char * v = std::getenv("LOGQUANT_VALUE_GROUPS")) { // "channel" (or 1); "token" (or 0)
        s.value_per_channel = std::strcmp(v, "token") != 0 && std::strcmp(v, "0") != 0;
    }
    if (const char * b = std::getenv("LOGQUANT_SCALE_BITS")) {
        s.scale_bits = std::atoi(b);
    }
    if (const char * c = std::getenv("LOGQUANT_SCORE_CORRECTION")) {
        s.score_correction = std::atoi(c) != 0;
    }
    if (!s.key_widths || s.keys_post_rope || !s.value_per_channel) { // a layout of before
        s.key_group       = std::getenv("LOGQUANT_KEY_GROUP") ? s.key_group : 64;
        s.layer_bits_auto = 0;
    }
    // "il:key_bits:value_bits,..." e.g. "0:8:8" keeps layer 0 near full precision; "auto" (alone or
    // first: "auto,0:8:8") picks the layers of 3-bit keys from the weights
    if (const char * l = std::getenv("LOGQUANT_LAYER_BITS")) {
        if (std::strncmp(l, "auto", 4) == 0 && (l[4] == '\0' || l[4] == ',')) {
            s.layer_bits_auto = 1;
            l += l[4] == ',' ? 5 : 4;
        }
        for (const char * p = l; *p;) {
            logquant_layer_bits lb{};
            int used = 0;
            if (std::sscanf(p, "%d:%d:%d%n", &lb.il, &lb.key_bits, &lb.value_bits, &used) != 3) {
                s.layer_bits_error = l; // reported when a cache is created
                break;
            }
            s.layer_bits.push_back(lb);
            p += used;
            p += *p == ',' ? 1 : 0;
        }
    }
    return s;
}();

std::pair<int32_t, int32_t> logquant_settings::bits_of(int32_t il) const {
    for (const auto & lb : layer_bits) {
        if (lb.il == il) {
            return {lb.key_bits, lb.value_bits};
        }
    }
    return {key_bits, value_bits};
}

logquant_settings logquant_settings_current() {
    std::lock_guard<std::mutex> lock(g_settings_mutex);
    return g_settings;
}

void logquant_settings_set(const logquant_settings & s) {
    std::lock_guard<std::mutex> lock(g_settings_mutex);
    g_settings = s;
}

// ---------------------------------------------------------------------------------------------
// context parameters and refusals

// Set by create_memory around the cache constructors it calls, on its own thread (see the header).
static thread_local const llama_cparams * t_cparams = nullptr;

const llama_cparams * logquant_context_cparams() { return t_cparams; }
static thread_local std::string           t_last_error;

logquant_context_scope::logquant_context_scope(const llama_cparams & cparams) { t_cparams = &cparams; }
logquant_context_scope::~logquant_context_scope() { t_cparams = nullptr; }

const std::string & logquant_refusal() { return t_last_error; }
void                logquant_clear_refusal() { t_last_error.clear(); }

void logquant_cache::refuse(const std::string & why) {
    t_last_error = why;
    throw std::runtime_error("LogQuant cache: " + why);
}
