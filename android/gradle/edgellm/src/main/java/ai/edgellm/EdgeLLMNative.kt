package ai.edgellm

/**
 * The JNI surface of edgellm's C engine (src/main/cpp/jni_bridge.c): one static native method per
 * C function, the same names and signatures the offline APK's smali declares. Call it through
 * [EdgeLLM], which keeps every call on one thread (the engine is not thread-safe).
 */
object EdgeLLMNative {
    init {
        // onnxruntime-genai finds libonnxruntime.so with dlopen: loading it first makes that trivial.
        // The llama.cpp build has no such library.
        try {
            System.loadLibrary("onnxruntime")
        } catch (e: UnsatisfiedLinkError) {
            // llama.cpp backend
        }
        System.loadLibrary("edgellm_jni")
    }

    @JvmStatic external fun open(
        modelPath: String, provider: String, threads: Int, nCtx: Int,
        systemText: String, turnPrefix: String, turnSuffix: String,
        statePath: String?, stateTokens: IntArray?, gpuLayers: Int,
    ): Long

    @JvmStatic external fun begin(handle: Long, userText: String, maxTokens: Int)

    /** The next piece of the answer as UTF-8 bytes, or null when the answer is complete. */
    @JvmStatic external fun next(handle: Long): ByteArray?

    @JvmStatic external fun reset(handle: Long)

    @JvmStatic external fun close(handle: Long)

    @JvmStatic external fun info(handle: Long): String

    /** 0: no shipped state, 1: restored, 2: refused (the system prompt was evaluated instead). */
    @JvmStatic external fun stateStatus(handle: Long): Int

    @JvmStatic external fun promptTokens(handle: Long): Int

    @JvmStatic external fun answerTokens(handle: Long): IntArray
}
