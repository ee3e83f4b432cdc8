/*
 * edgellm's on-device chat engine: the C that a packaged app runs, over onnxruntime-genai's C API
 * (engine_genai.c) or llama.cpp (engine_llama.c). One interface for both, so the JNI bridge
 * (Android), the Swift package (iOS), Python's ctypes (edgellm's own checks on the host) and a JVM
 * test all drive the same code.
 *
 * A conversation is kept in the runtime's KV cache between turns: el_begin appends one user turn
 * (rendered with the chat-template pieces edgellm wrote into the app manifest), el_next returns the
 * answer piece by piece, el_reset drops everything after system_text (whose KV stays).
 */
#ifndef EDGELLM_ENGINE_H
#define EDGELLM_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct el_engine el_engine;

typedef struct el_options {
    const char *model_path;   /* genai: the model folder; llama.cpp: the .gguf file */
    const char *provider;     /* genai: "cpu" or "xnnpack" (falls back to cpu, see el_info); llama.cpp: unused */
    int threads;              /* 0 = the runtime's default */
    int n_ctx;                /* the most tokens a conversation may hold */
    /* chat-template pieces, rendered by edgellm from the model's own template:
       system_text + user + turn_suffix is the first turn, and every later turn appends
       turn_prefix + user + turn_suffix after the previous answer */
    const char *system_text;  /* the conversation's fixed start: system prompt and the first turn's opening */
    const char *turn_prefix;  /* closes an answer and opens the next user turn, e.g. "<|im_end|>\n<|im_start|>user\n" */
    const char *turn_suffix;  /* after the user's text, e.g. "<|im_end|>\n<|im_start|>assistant\n" */
    /* llama.cpp only: the shipped KV state of system_text (an EDGEKV01 file edgellm wrote) */
    const char *state_path;         /* NULL or "": evaluate the system prompt at open */
    const int32_t *state_tokens;    /* the token ids the state encodes (re-evaluated when it is refused) */
    size_t n_state_tokens;
    int gpu_layers;                 /* llama.cpp only: layers offloaded to the GPU (Metal on iOS; 0 on Android) */
} el_options;

/* State of the shipped system prompt after el_open (llama.cpp engine). */
enum { EL_STATE_NONE = 0, EL_STATE_RESTORED = 1, EL_STATE_REFUSED = 2 };

/* NULL on failure, with a one-line reason in err. */
el_engine *el_open(const el_options *opt, char *err, size_t err_len);
/* Append one user turn (the prompt is evaluated by the first el_next). 0 = ok, -1 = error (el_error). */
int el_begin(el_engine *e, const char *user_text, int max_tokens);
/* 1: *piece holds the next complete UTF-8 text (possibly "", valid until the next call); 0: the answer
   is finished; -1: error (el_error). */
int el_next(el_engine *e, const char **piece, size_t *piece_len);
/* Forget the conversation after the system prompt. */
void el_reset(el_engine *e);
void el_close(el_engine *e);

const char *el_error(const el_engine *e);
/* One line: runtime and version, provider, system-prompt state. */
const char *el_info(const el_engine *e);
int el_state_status(const el_engine *e);
int el_system_tokens(const el_engine *e);   /* tokens of system_text in the cache */
double el_system_seconds(const el_engine *e);  /* what putting them there took: state restore or evaluation */
int el_prompt_tokens(const el_engine *e);   /* tokens the last el_begin appended */
int el_n_tokens(const el_engine *e);        /* tokens in the conversation so far */
/* The token ids of the answer so far (for exact comparisons in tests). */
const int32_t *el_answer_tokens(const el_engine *e, size_t *count);

/* Tokenize text (special tokens parsed; add_special: the model's BOS as at a conversation's start)
   without changing the conversation; returns the count, or -1 when more than max. */
int el_tokenize(el_engine *e, const char *text, int add_special, int32_t *out, int max);
/* llama.cpp engine only: the sequence state of the conversation so far (llama_state_seq_get_data);
   returns the bytes written, or the size needed when buf is NULL. */
size_t el_state_data(el_engine *e, uint8_t *buf, size_t size);

#ifdef __cplusplus
}
#endif
#endif
