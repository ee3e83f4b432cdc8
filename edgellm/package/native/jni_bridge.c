/*
 * JNI bridge: the static native methods of ai.edgellm.EdgeLLMNative over edgellm_engine.h.
 * The same file serves the Gradle project (Kotlin declares the methods), the offline APK (smali
 * declares them) and the host JVM test (x86-64, against the host onnxruntime-genai or llama.cpp).
 *
 * Strings cross as UTF-16 (Java) -> UTF-8 (C) with surrogate pairs joined here: JNI's
 * GetStringUTFChars would hand out "modified UTF-8", which splits an emoji into two 3-byte halves
 * that no tokenizer knows. Answer pieces come back as UTF-8 byte arrays the Java side decodes.
 */
#include <jni.h>
#include <stdlib.h>
#include <string.h>

#include "edgellm_engine.h"

#define EL_CLASS(name) Java_ai_edgellm_EdgeLLMNative_##name

static void throw_runtime(JNIEnv *env, const char *msg) {
    jclass c = (*env)->FindClass(env, "java/lang/RuntimeException");
    if (c) (*env)->ThrowNew(env, c, msg);
}

/* A malloc'd UTF-8 copy of a Java string ("" for null); NULL only when out of memory. */
static char *utf8_of(JNIEnv *env, jstring s) {
    jsize n = s ? (*env)->GetStringLength(env, s) : 0;
    jchar *u = (jchar *)malloc(((size_t)n + 1) * sizeof(jchar));
    char *out = (char *)malloc((size_t)n * 3 + 1);
    if (!u || !out) {
        free(u);
        free(out);
        return NULL;
    }
    if (n) (*env)->GetStringRegion(env, s, 0, n, u);
    size_t o = 0;
    for (jsize i = 0; i < n; i++) {
        unsigned long c = u[i];
        if (c >= 0xD800 && c < 0xDC00 && i + 1 < n && u[i + 1] >= 0xDC00 && u[i + 1] < 0xE000) {
            c = 0x10000 + ((c - 0xD800) << 10) + (u[++i] - 0xDC00);
        } else if (c >= 0xD800 && c < 0xE000) {
            c = 0xFFFD;  /* a lone surrogate */
        }
        if (c < 0x80) {
            out[o++] = (char)c;
        } else if (c < 0x800) {
            out[o++] = (char)(0xC0 | c >> 6);
            out[o++] = (char)(0x80 | (c & 0x3F));
        } else if (c < 0x10000) {
            out[o++] = (char)(0xE0 | c >> 12);
            out[o++] = (char)(0x80 | ((c >> 6) & 0x3F));
            out[o++] = (char)(0x80 | (c & 0x3F));
        } else {
            out[o++] = (char)(0xF0 | c >> 18);
            out[o++] = (char)(0x80 | ((c >> 12) & 0x3F));
            out[o++] = (char)(0x80 | ((c >> 6) & 0x3F));
            out[o++] = (char)(0x80 | (c & 0x3F));
        }
    }
    out[o] = 0;
    free(u);
    return out;
}

static el_engine *engine(JNIEnv *env, jlong handle) {
    if (handle == 0) throw_runtime(env, "the model is closed");
    return (el_engine *)(intptr_t)handle;
}

JNIEXPORT jlong JNICALL EL_CLASS(open)(JNIEnv *env, jclass cls, jstring model_path, jstring provider, jint threads,
                                       jint n_ctx, jstring system_text, jstring turn_prefix, jstring turn_suffix,
                                       jstring state_path, jintArray state_tokens, jint gpu_layers) {
    (void)cls;
    jstring texts[] = {model_path, provider, system_text, turn_prefix, turn_suffix, state_path};
    char *c[6] = {0};
    int ok = 1;
    for (int i = 0; i < 6; i++) ok = ok && (c[i] = utf8_of(env, texts[i])) != NULL;
    jsize n_tokens = state_tokens ? (*env)->GetArrayLength(env, state_tokens) : 0;
    jint *tokens = n_tokens ? (*env)->GetIntArrayElements(env, state_tokens, NULL) : NULL;
    el_engine *e = NULL;
    char err[512] = "out of memory";
    if (ok) {
        el_options o;
        memset(&o, 0, sizeof o);
        o.model_path = c[0];
        o.provider = c[1];
        o.threads = threads;
        o.n_ctx = n_ctx;
        o.system_text = c[2];
        o.turn_prefix = c[3];
        o.turn_suffix = c[4];
        o.state_path = c[5];
        o.state_tokens = (const int32_t *)tokens;
        o.n_state_tokens = (size_t)n_tokens;
        o.gpu_layers = gpu_layers;
        e = el_open(&o, err, sizeof err);
    }
    if (tokens) (*env)->ReleaseIntArrayElements(env, state_tokens, tokens, JNI_ABORT);
    for (int i = 0; i < 6; i++) free(c[i]);
    if (!e) throw_runtime(env, err);
    return (jlong)(intptr_t)e;
}

JNIEXPORT void JNICALL EL_CLASS(begin)(JNIEnv *env, jclass cls, jlong handle, jstring user_text, jint max_tokens) {
    (void)cls;
    el_engine *e = engine(env, handle);
    char *text = e ? utf8_of(env, user_text) : NULL;
    if (!e) return;
    if (!text) {
        throw_runtime(env, "out of memory");
        return;
    }
    int rc = el_begin(e, text, max_tokens);
    free(text);
    if (rc) throw_runtime(env, el_error(e));
}

/* The next piece of the answer as UTF-8 bytes (possibly empty), or null when the answer is done. */
JNIEXPORT jbyteArray JNICALL EL_CLASS(next)(JNIEnv *env, jclass cls, jlong handle) {
    (void)cls;
    el_engine *e = engine(env, handle);
    if (!e) return NULL;
    const char *piece = NULL;
    size_t len = 0;
    int rc = el_next(e, &piece, &len);
    if (rc < 0) {
        throw_runtime(env, el_error(e));
        return NULL;
    }
    if (rc == 0) return NULL;
    jbyteArray out = (*env)->NewByteArray(env, (jsize)len);
    if (out && len) (*env)->SetByteArrayRegion(env, out, 0, (jsize)len, (const jbyte *)piece);
    return out;
}

JNIEXPORT void JNICALL EL_CLASS(reset)(JNIEnv *env, jclass cls, jlong handle) {
    (void)cls;
    el_engine *e = engine(env, handle);
    if (e) el_reset(e);
}

JNIEXPORT void JNICALL EL_CLASS(close)(JNIEnv *env, jclass cls, jlong handle) {
    (void)env;
    (void)cls;
    if (handle) el_close((el_engine *)(intptr_t)handle);
}

JNIEXPORT jstring JNICALL EL_CLASS(info)(JNIEnv *env, jclass cls, jlong handle) {
    (void)cls;
    el_engine *e = engine(env, handle);
    if (!e) return NULL;
    char ascii[512];  /* NewStringUTF takes modified UTF-8: keep the runtime's message to ASCII */
    size_t i = 0;
    for (const char *p = el_info(e); *p && i + 1 < sizeof ascii; p++) ascii[i++] = (*p & 0x80) ? '?' : *p;
    ascii[i] = 0;
    return (*env)->NewStringUTF(env, ascii);
}

JNIEXPORT jint JNICALL EL_CLASS(stateStatus)(JNIEnv *env, jclass cls, jlong handle) {
    (void)cls;
    el_engine *e = engine(env, handle);
    return e ? el_state_status(e) : -1;
}

JNIEXPORT jint JNICALL EL_CLASS(promptTokens)(JNIEnv *env, jclass cls, jlong handle) {
    (void)cls;
    el_engine *e = engine(env, handle);
    return e ? el_prompt_tokens(e) : -1;
}

JNIEXPORT jintArray JNICALL EL_CLASS(answerTokens)(JNIEnv *env, jclass cls, jlong handle) {
    (void)cls;
    el_engine *e = engine(env, handle);
    if (!e) return NULL;
    size_t n = 0;
    const int32_t *ids = el_answer_tokens(e, &n);
    jintArray out = (*env)->NewIntArray(env, (jsize)n);
    if (out && n) (*env)->SetIntArrayRegion(env, out, 0, (jsize)n, (const jint *)ids);
    return out;
}
