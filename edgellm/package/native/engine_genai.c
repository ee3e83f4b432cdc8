/*
 * The chat engine over onnxruntime-genai's C API (ort_genai_c.h): genai's tokenizer (tokenizer.json)
 * and its generation loop over edgellm's ONNX graph (genai_config.json beside it). Greedy decoding,
 * as the config says. The conversation stays in one OgaGenerator between turns.
 *
 * Two facts about genai's generator shape the turn handling (measured with genai 0.15-0.18 on
 * edgellm's graph): a sequence that ended on an end-of-generation token does not contain that
 * token, and the last sampled token of an answer cut short has no KV entry yet. So each new turn
 * rewinds the generator by two tokens and appends them again in front of the turn's text, whose
 * turn_prefix starts by closing the answer (e.g. "<|im_end|>"): the cache then holds exactly what a
 * fresh run over the whole conversation would.
 */
#include "edgellm_engine.h"
#include "ort_genai_c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct el_engine {
    OgaModel *model;
    OgaTokenizer *tok;
    OgaTokenizerStream *stream;
    OgaGeneratorParams *params;
    OgaGenerator *gen;
    char *system_text, *turn_prefix, *turn_suffix;
    int n_ctx, n_system, n_prompt, max_tokens, produced, started, done;
    int32_t *answer;
    size_t answer_cap;
    double system_seconds;
    char err[512];
    char info[512];
};

static char *dup_or_empty(const char *s) {
    const char *v = s ? s : "";
    size_t n = strlen(v) + 1;
    char *d = (char *)malloc(n);
    if (d) memcpy(d, v, n);
    return d;
}

/* OgaResult -> e->err; returns -1 when r is an error (and frees it), 0 otherwise. */
static int failed(el_engine *e, OgaResult *r, const char *what) {
    if (!r) return 0;
    snprintf(e->err, sizeof e->err, "%s: %s", what, OgaResultGetError(r));
    OgaDestroyResult(r);
    return -1;
}

static size_t seq_len(el_engine *e) {
    return e->gen ? OgaGenerator_GetSequenceCount(e->gen, 0) : 0;
}

static int encode(el_engine *e, const char *text, int32_t **out, size_t *count) {
    OgaSequences *seqs = NULL;
    if (failed(e, OgaCreateSequences(&seqs), "sequences")) return -1;
    if (failed(e, OgaTokenizerEncode(e->tok, text, seqs), "tokenize")) {
        OgaDestroySequences(seqs);
        return -1;
    }
    *count = OgaSequencesGetSequenceCount(seqs, 0);
    *out = (int32_t *)malloc((*count + 2) * sizeof(int32_t) + 1);
    if (!*out) {
        OgaDestroySequences(seqs);
        snprintf(e->err, sizeof e->err, "out of memory");
        return -1;
    }
    memcpy(*out, OgaSequencesGetSequenceData(seqs, 0), *count * sizeof(int32_t));
    OgaDestroySequences(seqs);
    return 0;
}

static int new_generator(el_engine *e) {
    if (e->gen) OgaDestroyGenerator(e->gen);
    e->gen = NULL;
    if (failed(e, OgaCreateGenerator(e->model, e->params, &e->gen), "generator")) return -1;
    e->n_system = 0;
    double t0 = now_seconds();
    if (e->system_text[0]) {
        int32_t *ids = NULL;
        size_t n = 0;
        if (encode(e, e->system_text, &ids, &n)) return -1;
        OgaResult *r = OgaGenerator_AppendTokens(e->gen, ids, n);
        free(ids);
        if (failed(e, r, "system prompt")) return -1;
        e->n_system = (int)seq_len(e);
    }
    e->system_seconds = now_seconds() - t0;
    return 0;
}

static OgaResult *make_model(el_engine *e, const el_options *o, int xnnpack) {
    OgaConfig *cfg = NULL;
    OgaResult *r = OgaCreateConfig(o->model_path, &cfg);
    if (r) return r;
    char overlay[160];
    if (o->threads > 0) {
        snprintf(overlay, sizeof overlay, "{\"model\":{\"decoder\":{\"session_options\":"
                 "{\"intra_op_num_threads\":%d,\"inter_op_num_threads\":1}}}}", o->threads);
        if ((r = OgaConfigOverlay(cfg, overlay))) goto out;
    }
    if ((r = OgaConfigClearProviders(cfg))) goto out;
    if (xnnpack) {
        if ((r = OgaConfigAppendProvider(cfg, "XNNPACK"))) goto out;
        if (o->threads > 0) {
            snprintf(overlay, sizeof overlay, "%d", o->threads);
            if ((r = OgaConfigSetProviderOption(cfg, "XNNPACK", "intra_op_num_threads", overlay))) goto out;
        }
    }
    r = OgaCreateModelFromConfig(cfg, &e->model);
out:
    OgaDestroyConfig(cfg);
    return r;
}

el_engine *el_open(const el_options *o, char *err, size_t err_len) {
    el_engine *e = (el_engine *)calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    e->system_text = dup_or_empty(o->system_text);
    e->turn_prefix = dup_or_empty(o->turn_prefix);
    e->turn_suffix = dup_or_empty(o->turn_suffix);
    e->n_ctx = o->n_ctx > 0 ? o->n_ctx : 2048;
    const char *used = "CPU";
    char fallback[300] = "";
    int xnn = o->provider && (strcmp(o->provider, "xnnpack") == 0 || strcmp(o->provider, "XNNPACK") == 0);
    OgaResult *r = make_model(e, o, xnn);
    if (r && xnn) {  /* this onnxruntime build or genai has no XNNPACK: run on the CPU provider, and say so */
        snprintf(fallback, sizeof fallback, "; XNNPACK unavailable (%.200s)", OgaResultGetError(r));
        OgaDestroyResult(r);
        r = make_model(e, o, 0);
    } else if (!r && xnn) {
        used = "XNNPACK";
    }
    if (failed(e, r, "load model")
        || failed(e, OgaCreateTokenizer(e->model, &e->tok), "tokenizer")
        || failed(e, OgaCreateGeneratorParams(e->model, &e->params), "generator params")
        || failed(e, OgaGeneratorParamsSetSearchNumber(e->params, "max_length", (double)e->n_ctx), "max_length")
        || new_generator(e)) {
        snprintf(err, err_len, "%s", e->err);
        el_close(e);
        return NULL;
    }
    snprintf(e->info, sizeof e->info, "onnxruntime-genai, provider %s%s, system prompt %d tokens evaluated at load",
             used, fallback, e->n_system);
    return e;
}

int el_begin(el_engine *e, const char *user_text, int max_tokens) {
    size_t n_text = strlen(e->turn_prefix) + strlen(user_text) + strlen(e->turn_suffix) + 1;
    char *text = (char *)malloc(n_text);
    if (!text) {
        snprintf(e->err, sizeof e->err, "out of memory");
        return -1;
    }
    snprintf(text, n_text, "%s%s%s", e->started ? e->turn_prefix : "", user_text, e->turn_suffix);
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = encode(e, text, &ids, &n);
    free(text);
    if (rc) return -1;
    size_t keep = seq_len(e);
    int32_t carry[2];
    size_t n_carry = 0;
    if (e->started && keep >= 2 + (size_t)e->n_system) {  /* see the file comment */
        const int32_t *s = OgaGenerator_GetSequenceData(e->gen, 0);
        carry[0] = s[keep - 2];
        carry[1] = s[keep - 1];
        n_carry = 2;
        keep -= 2;
    }
    if (keep + n_carry + n + 1 > (size_t)e->n_ctx) {
        free(ids);
        snprintf(e->err, sizeof e->err, "the conversation is full (%zu of %d tokens): reset it",
                 keep + n_carry + n, e->n_ctx);
        return -1;
    }
    if (n_carry) {
        memmove(ids + n_carry, ids, n * sizeof(int32_t));
        memcpy(ids, carry, sizeof carry);
        if (failed(e, OgaGenerator_RewindTo(e->gen, keep), "rewind")) {
            free(ids);
            return -1;
        }
    }
    OgaResult *r = OgaGenerator_AppendTokens(e->gen, ids, n + n_carry);
    free(ids);
    if (failed(e, r, "prompt")) return -1;
    if (e->stream) OgaDestroyTokenizerStream(e->stream);
    e->stream = NULL;
    if (failed(e, OgaCreateTokenizerStream(e->tok, &e->stream), "tokenizer stream")) return -1;
    e->n_prompt = (int)n;
    e->max_tokens = max_tokens > 0 ? max_tokens : e->n_ctx;
    e->produced = 0;
    e->started = 1;
    e->done = 0;
    return 0;
}

int el_next(el_engine *e, const char **piece, size_t *piece_len) {
    *piece = "";
    *piece_len = 0;
    if (!e->started || e->done || e->produced >= e->max_tokens || OgaGenerator_IsDone(e->gen)) {
        e->done = 1;
        return 0;
    }
    size_t before = seq_len(e);
    if (failed(e, OgaGenerator_GenerateNextToken(e->gen), "generate")) return -1;
    if (seq_len(e) == before) {  /* an end-of-generation token: genai keeps it out of the sequence */
        e->done = 1;
        return 0;
    }
    const int32_t *next = NULL;
    size_t count = 0;
    if (failed(e, OgaGenerator_GetNextTokens(e->gen, &next, &count), "next token") || count < 1) return -1;
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
    e->answer[e->produced++] = next[0];
    const char *chunk = NULL;
    if (failed(e, OgaTokenizerStreamDecode(e->stream, next[0], &chunk), "decode")) return -1;
    *piece = chunk ? chunk : "";
    *piece_len = strlen(*piece);
    return 1;
}

void el_reset(el_engine *e) {
    e->started = 0;
    e->done = 1;
    e->produced = 0;
    if (e->n_system > 0 && seq_len(e) > (size_t)e->n_system
        && !failed(e, OgaGenerator_RewindTo(e->gen, (size_t)e->n_system), "rewind")) {
        return;  /* the system prompt's KV is kept */
    }
    if (seq_len(e) != (size_t)e->n_system) new_generator(e);
}

void el_close(el_engine *e) {
    if (!e) return;
    if (e->stream) OgaDestroyTokenizerStream(e->stream);
    if (e->gen) OgaDestroyGenerator(e->gen);
    if (e->params) OgaDestroyGeneratorParams(e->params);
    if (e->tok) OgaDestroyTokenizer(e->tok);
    if (e->model) OgaDestroyModel(e->model);
    free(e->system_text);
    free(e->turn_prefix);
    free(e->turn_suffix);
    free(e->answer);
    free(e);
}

const char *el_error(const el_engine *e) { return e->err; }
const char *el_info(const el_engine *e) { return e->info; }
int el_state_status(const el_engine *e) { (void)e; return EL_STATE_NONE; }
int el_system_tokens(const el_engine *e) { return e->n_system; }
double el_system_seconds(const el_engine *e) { return e->system_seconds; }
int el_prompt_tokens(const el_engine *e) { return e->n_prompt; }
int el_n_tokens(const el_engine *e) { return (int)seq_len((el_engine *)e); }

const int32_t *el_answer_tokens(const el_engine *e, size_t *count) {
    *count = (size_t)e->produced;
    return e->answer;
}

int el_tokenize(el_engine *e, const char *text, int add_special, int32_t *out, int max) {
    (void)add_special;  /* genai's tokenizer adds what tokenizer_config.json says */
    int32_t *ids = NULL;
    size_t n = 0;
    if (encode(e, text, &ids, &n)) return -1;
    if ((int)n > max) {
        free(ids);
        return -1;
    }
    memcpy(out, ids, n * sizeof(int32_t));
    free(ids);
    return (int)n;
}

size_t el_state_data(el_engine *e, uint8_t *buf, size_t size) {
    (void)e; (void)buf; (void)size;
    return 0;  /* genai has no sequence-state export */
}
