/*
 * The chat engine over llama.cpp's C API (llama.h): the GGUF's own tokenizer, greedy sampling, and
 * the shipped KV state of the system prompt.
 *
 * The state is computed on the packaging host by this same file built against the same llama.cpp
 * version the app ships (edgellm/package/llama_host.py), with flash attention on and an f16 KV cache
 * pinned here, because llama.cpp refuses a state saved with another flash-attention setting, KV type
 * or layer count. It is an EDGEKV01 file (edgellm's state format: magic, JSON header, token ids,
 * llama_state_seq_get_data bytes); its token ids must equal the ones the app passes (from the
 * manifest), and when llama.cpp refuses the bytes anyway the engine evaluates those tokens instead:
 * a refused state costs time, never correctness.
 */
#include "edgellm_engine.h"
#if __has_include(<llama/llama.h>)
#include <llama/llama.h> /* the llama.xcframework module (iOS) */
#else
#include "llama.h"
#endif

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef EL_LLAMA_BUILD
#define EL_LLAMA_BUILD "unknown build"
#endif

#define EL_BATCH 512
#define EL_STATE_MAGIC "EDGEKV01"

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct el_engine {
    struct llama_model *model;
    struct llama_context *ctx;
    const struct llama_vocab *vocab;
    struct llama_sampler *smpl;
    char *system_text, *turn_prefix, *turn_suffix;
    int n_ctx, n_system, n_prompt, n_past, max_tokens, produced, started, done, state;
    int32_t *todo;            /* tokens appended but not yet evaluated (the turn, or the last sampled token) */
    size_t n_todo, todo_cap;
    int32_t *answer;
    size_t answer_cap;
    char utf8[64];            /* the incomplete UTF-8 tail of the pieces so far */
    size_t n_utf8;
    char piece[320];
    double system_seconds;
    char err[512];
    char info[512];
};

static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    (void)level; (void)text; (void)user;
}

static char *dup_or_empty(const char *s) {
    const char *v = s ? s : "";
    size_t n = strlen(v) + 1;
    char *d = (char *)malloc(n);
    if (d) memcpy(d, v, n);
    return d;
}

static int push_todo(el_engine *e, const int32_t *ids, size_t n) {
    if (e->n_todo + n > e->todo_cap) {
        size_t cap = e->todo_cap ? e->todo_cap : 256;
        while (cap < e->n_todo + n) cap *= 2;
        int32_t *grown = (int32_t *)realloc(e->todo, cap * sizeof(int32_t));
        if (!grown) {
            snprintf(e->err, sizeof e->err, "out of memory");
            return -1;
        }
        e->todo = grown;
        e->todo_cap = cap;
    }
    memcpy(e->todo + e->n_todo, ids, n * sizeof(int32_t));
    e->n_todo += n;
    return 0;
}

/* Tokenize text (special tokens parsed: the text is edgellm's rendered template plus the user's words). */
static int tokenize_into_todo(el_engine *e, const char *text, int add_special) {
    int len = (int)strlen(text);
    int n = -llama_tokenize(e->vocab, text, len, NULL, 0, add_special, 1);
    if (n <= 0) return n == 0 ? 0 : -1;
    int32_t *ids = (int32_t *)malloc((size_t)n * sizeof(int32_t));
    if (!ids || llama_tokenize(e->vocab, text, len, ids, n, add_special, 1) != n) {
        free(ids);
        snprintf(e->err, sizeof e->err, "tokenize failed");
        return -1;
    }
    /* the template may write the BOS text itself: keep one */
    int skip = add_special && n >= 2 && ids[0] == ids[1] && ids[0] == llama_vocab_bos(e->vocab);
    int rc = push_todo(e, ids + skip, (size_t)(n - skip));
    free(ids);
    return rc;
}

static int eval_todo(el_engine *e) {
    if (e->n_past + (int)e->n_todo > e->n_ctx) {
        snprintf(e->err, sizeof e->err, "the conversation is full (%d of %d tokens): reset it",
                 e->n_past + (int)e->n_todo, e->n_ctx);
        return -1;
    }
    for (size_t i = 0; i < e->n_todo; i += EL_BATCH) {
        int n = (int)(e->n_todo - i < EL_BATCH ? e->n_todo - i : EL_BATCH);
        int rc = llama_decode(e->ctx, llama_batch_get_one(e->todo + i, n));
        if (rc != 0) {
            snprintf(e->err, sizeof e->err, "llama_decode failed (%d)", rc);
            return -1;
        }
        e->n_past += n;
    }
    e->n_todo = 0;
    return 0;
}

/* Restore the shipped state; EL_STATE_RESTORED, or EL_STATE_REFUSED with the reason in e->err. */
static int restore_state(el_engine *e, const el_options *o) {
    FILE *f = fopen(o->state_path, "rb");
    if (!f) {
        snprintf(e->err, sizeof e->err, "cannot open %s", o->state_path);
        return EL_STATE_REFUSED;
    }
    unsigned char head[12];
    uint8_t *buf = NULL;
    int status = EL_STATE_REFUSED;
    long size = 0;
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 12 || fseek(f, 0, SEEK_SET) != 0
        || fread(head, 1, 12, f) != 12 || memcmp(head, EL_STATE_MAGIC, 8) != 0) {
        snprintf(e->err, sizeof e->err, "not an edgellm state file");
        goto out;
    }
    size_t hlen = (size_t)head[8] | (size_t)head[9] << 8 | (size_t)head[10] << 16 | (size_t)head[11] << 24;
    size_t tok_bytes = o->n_state_tokens * sizeof(int32_t);
    if (12 + hlen + tok_bytes >= (size_t)size || (int)o->n_state_tokens > e->n_ctx) {
        snprintf(e->err, sizeof e->err, "state file and manifest disagree on its size");
        goto out;
    }
    size_t rest = (size_t)size - 12 - hlen;
    buf = (uint8_t *)malloc(rest);
    if (!buf || fseek(f, (long)(12 + hlen), SEEK_SET) != 0 || fread(buf, 1, rest, f) != rest) {
        snprintf(e->err, sizeof e->err, "state file unreadable");
        goto out;
    }
    for (size_t i = 0; i < o->n_state_tokens; i++) {  /* little-endian int32 ids, as the manifest's */
        const uint8_t *p = buf + 4 * i;
        int32_t id = (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        if (id != o->state_tokens[i]) {
            snprintf(e->err, sizeof e->err, "state tokens differ from the manifest's at %zu", i);
            goto out;
        }
    }
    if (llama_state_seq_set_data(e->ctx, buf + tok_bytes, rest - tok_bytes, 0) == 0) {
        snprintf(e->err, sizeof e->err, "llama.cpp refused the state (another build, flash-attention or KV setting)");
        llama_memory_seq_rm(llama_get_memory(e->ctx), 0, -1, -1);
        goto out;
    }
    e->n_past = (int)o->n_state_tokens;
    status = EL_STATE_RESTORED;
out:
    free(buf);
    fclose(f);
    return status;
}

el_engine *el_open(const el_options *o, char *err, size_t err_len) {
    el_engine *e = (el_engine *)calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    e->system_text = dup_or_empty(o->system_text);
    e->turn_prefix = dup_or_empty(o->turn_prefix);
    e->turn_suffix = dup_or_empty(o->turn_suffix);
    e->n_ctx = o->n_ctx > 0 ? o->n_ctx : 2048;
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = o->gpu_layers;
    e->model = llama_model_load_from_file(o->model_path, mp);
    if (!e->model) {
        snprintf(err, err_len, "llama.cpp could not load %s", o->model_path);
        el_close(e);
        return NULL;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)e->n_ctx;
    cp.n_batch = EL_BATCH;
    cp.n_ubatch = EL_BATCH;
    cp.n_seq_max = 1;
    if (o->threads > 0) {
        cp.n_threads = o->threads;
        cp.n_threads_batch = o->threads;
    }
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;  /* pinned: a state only loads with the same setting */
    cp.type_k = GGML_TYPE_F16;
    cp.type_v = GGML_TYPE_F16;
    cp.no_perf = 1;
    e->ctx = llama_init_from_model(e->model, cp);
    if (!e->ctx) {
        snprintf(err, err_len, "llama.cpp could not create a context of %d tokens", e->n_ctx);
        el_close(e);
        return NULL;
    }
    e->vocab = llama_model_get_vocab(e->model);
    e->smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(e->smpl, llama_sampler_init_greedy());
    char why[512] = "";
    double t0 = now_seconds();
    if (o->state_path && o->state_path[0] && o->n_state_tokens > 0) {
        e->state = restore_state(e, o);
        if (e->state == EL_STATE_REFUSED) {
            snprintf(why, sizeof why, "%s", e->err);
            e->err[0] = 0;
            if (push_todo(e, o->state_tokens, o->n_state_tokens) || eval_todo(e)) goto fail;
        }
    } else if (e->system_text[0]) {
        if (tokenize_into_todo(e, e->system_text, 1) || eval_todo(e)) goto fail;
    }
    e->n_system = e->n_past;
    e->system_seconds = now_seconds() - t0;
    if (e->state == EL_STATE_RESTORED) {
        snprintf(e->info, sizeof e->info, "llama.cpp %s, flash attention on, KV f16; system prompt: %d tokens "
                 "restored from the shipped state", EL_LLAMA_BUILD, e->n_system);
    } else if (e->state == EL_STATE_REFUSED) {
        snprintf(e->info, sizeof e->info, "llama.cpp %s, flash attention on, KV f16; system prompt: shipped state "
                 "refused (%s), %d tokens evaluated", EL_LLAMA_BUILD, why, e->n_system);
    } else {
        snprintf(e->info, sizeof e->info, "llama.cpp %s, flash attention on, KV f16; system prompt: %d tokens "
                 "evaluated at load", EL_LLAMA_BUILD, e->n_system);
    }
    return e;
fail:
    snprintf(err, err_len, "%s", e->err);
    el_close(e);
    return NULL;
}

int el_begin(el_engine *e, const char *user_text, int max_tokens) {
    size_t n_text = strlen(e->turn_prefix) + strlen(user_text) + strlen(e->turn_suffix) + 1;
    char *text = (char *)malloc(n_text);
    if (!text) {
        snprintf(e->err, sizeof e->err, "out of memory");
        return -1;
    }
    snprintf(text, n_text, "%s%s%s", e->started ? e->turn_prefix : "", user_text, e->turn_suffix);
    /* n_todo may hold the last sampled token of a previous answer (not yet evaluated): it stays first */
    int rc = tokenize_into_todo(e, text, e->n_past == 0 && e->n_todo == 0);
    free(text);
    if (rc) return -1;
    if (e->n_past + (int)e->n_todo + 1 > e->n_ctx) {
        snprintf(e->err, sizeof e->err, "the conversation is full (%d of %d tokens): reset it",
                 e->n_past + (int)e->n_todo, e->n_ctx);
        e->n_todo = 0;
        return -1;
    }
    e->n_prompt = (int)e->n_todo;
    e->max_tokens = max_tokens > 0 ? max_tokens : e->n_ctx;
    e->produced = 0;
    e->started = 1;
    e->done = 0;
    e->n_utf8 = 0;
    return 0;
}

/* Length of the longest prefix of s made of complete UTF-8 sequences. */
static size_t complete_utf8(const char *s, size_t n) {
    size_t i = n, back = 0;
    while (i > 0 && back < 4 && ((unsigned char)s[i - 1] & 0xC0) == 0x80) {
        i--;
        back++;
    }
    if (i == 0) return back == n ? 0 : n;
    unsigned char lead = (unsigned char)s[i - 1];
    size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    return need > back + 1 ? i - 1 : n;
}

int el_next(el_engine *e, const char **piece, size_t *piece_len) {
    *piece = "";
    *piece_len = 0;
    if (!e->started || e->done || e->produced >= e->max_tokens) {
        e->done = 1;
        return 0;
    }
    if (e->n_todo && eval_todo(e)) return -1;  /* the prompt, or the previous token */
    int32_t tok = llama_sampler_sample(e->smpl, e->ctx, -1);
    if (llama_vocab_is_eog(e->vocab, tok)) {
        e->done = 1;  /* not evaluated: the next turn_prefix closes the answer in the template's own words */
        return 0;
    }
    if (push_todo(e, &tok, 1)) return -1;
    if ((size_t)e->produced + 1 > e->answer_cap) {
        size_t cap = e->answer_cap ? 2 * e->answer_cap : 256;
        int32_t *grown = (int32_t *)realloc(e->answer, cap * sizeof(int32_t));
        if (!grown) {
            snprintf(e->err, sizeof e->err, "out of memory");
            return -1;
        }
        e->answer = grown;
        e->answer_cap = cap;
    }
    e->answer[e->produced++] = tok;
    memcpy(e->piece, e->utf8, e->n_utf8);
    int n = llama_token_to_piece(e->vocab, tok, e->piece + e->n_utf8, (int)(sizeof e->piece - e->n_utf8 - 1), 0, 0);
    size_t total = e->n_utf8 + (size_t)(n > 0 ? n : 0);
    size_t ok = complete_utf8(e->piece, total);
    e->n_utf8 = total - ok < sizeof e->utf8 ? total - ok : 0;
    memcpy(e->utf8, e->piece + ok, e->n_utf8);
    e->piece[ok] = 0;
    *piece = e->piece;
    *piece_len = ok;
    return 1;
}

void el_reset(el_engine *e) {
    llama_memory_seq_rm(llama_get_memory(e->ctx), 0, e->n_system, -1);
    e->n_past = e->n_system;
    e->n_todo = 0;
    e->started = 0;
    e->done = 1;
    e->produced = 0;
}

void el_close(el_engine *e) {
    if (!e) return;
    if (e->smpl) llama_sampler_free(e->smpl);
    if (e->ctx) llama_free(e->ctx);
    if (e->model) llama_model_free(e->model);
    free(e->system_text);
    free(e->turn_prefix);
    free(e->turn_suffix);
    free(e->todo);
    free(e->answer);
    free(e);
}

const char *el_error(const el_engine *e) { return e->err; }
const char *el_info(const el_engine *e) { return e->info; }
int el_state_status(const el_engine *e) { return e->state; }
int el_system_tokens(const el_engine *e) { return e->n_system; }
double el_system_seconds(const el_engine *e) { return e->system_seconds; }
int el_prompt_tokens(const el_engine *e) { return e->n_prompt; }
int el_n_tokens(const el_engine *e) { return e->n_past + (int)e->n_todo; }

const int32_t *el_answer_tokens(const el_engine *e, size_t *count) {
    *count = (size_t)e->produced;
    return e->answer;
}

int el_tokenize(el_engine *e, const char *text, int add_special, int32_t *out, int max) {
    int n = llama_tokenize(e->vocab, text, (int)strlen(text), out, max, add_special != 0, 1);
    if (n < 0) return -1;
    if (add_special && n >= 2 && out[0] == out[1] && out[0] == llama_vocab_bos(e->vocab)) {  /* as tokenize_into_todo */
        memmove(out, out + 1, (size_t)(n - 1) * sizeof(int32_t));
        n--;
    }
    return n;
}

size_t el_state_data(el_engine *e, uint8_t *buf, size_t size) {
    if (e->n_todo && eval_todo(e)) return 0;
    if (!buf) return llama_state_seq_get_size(e->ctx, 0);
    return llama_state_seq_get_data(e->ctx, buf, size, 0);
}
