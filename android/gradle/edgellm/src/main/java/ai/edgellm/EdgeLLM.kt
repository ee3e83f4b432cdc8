package ai.edgellm

import android.content.Context
import java.io.Closeable
import java.io.File
import java.security.MessageDigest
import java.util.concurrent.Executors
import kotlinx.coroutines.asCoroutineDispatcher
import kotlinx.coroutines.currentCoroutineContext
import kotlinx.coroutines.ensureActive
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.flow
import kotlinx.coroutines.flow.flowOn
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withContext
import org.json.JSONObject

/** Timing of the last answer: time to first token, decode rate, tokens. */
data class Stats(val ttftMs: Long, val tokensPerSecond: Double, val tokens: Int, val promptTokens: Int) {
    override fun toString() = "TTFT $ttftMs ms · ${"%.1f".format(tokensPerSecond)} tok/s · $tokens tokens"
}

/**
 * The packaged model: load it once, stream answers with [generate], start over with [reset].
 *
 * The model, the runtime settings edgellm's planner chose for the phone class and the chat
 * template pieces come from assets/edgellm/manifest.json, written by `edgellm package android`.
 * A conversation stays in the engine's KV cache between [generate] calls.
 */
class EdgeLLM private constructor(
    private val handle: Long,
    val manifest: JSONObject,
    /** What runs (runtime, provider, system-prompt state). */
    val info: String,
    private val thread: kotlinx.coroutines.ExecutorCoroutineDispatcher,
) : Closeable {
    private var closed = false

    @Volatile var lastStats = Stats(0, 0.0, 0, 0)
        private set

    companion object {
        private const val ASSETS = "edgellm"

        /** Copy the model out of the APK on first launch (runtimes open files by path), then open it. */
        suspend fun load(context: Context, threads: Int? = null): EdgeLLM {
            val thread = Executors.newSingleThreadExecutor { r -> Thread(r, "edgellm") }.asCoroutineDispatcher()
            return withContext(thread) {
                val manifest = JSONObject(context.assets.open("$ASSETS/manifest.json").bufferedReader().readText())
                val dir = File(context.filesDir, manifest.getString("model_dir"))
                copyModel(context, manifest, dir)
                val runtime = manifest.getJSONObject("runtime")
                val chat = manifest.getJSONObject("chat")
                val state = manifest.optJSONObject("system_state")
                val modelPath = if (manifest.getJSONObject("model").getString("format") == "gguf")
                    File(dir, manifest.getJSONArray("files").getString(0)).path else dir.path
                var statePath: String? = null
                var stateTokens: IntArray? = null
                if (state != null) {
                    val file = File(dir, state.getString("file"))
                    // a corrupt copy would restore wrong KV values without llama.cpp noticing
                    if (sha256(file) == state.getString("sha256")) {
                        statePath = file.path
                        val ids = state.getJSONArray("tokens")
                        stateTokens = IntArray(ids.length()) { ids.getInt(it) }
                    }
                }
                val handle = EdgeLLMNative.open(
                    modelPath, runtime.getString("provider"), threads ?: runtime.getInt("threads"),
                    runtime.getInt("n_ctx"), chat.getString("system_text"), chat.getString("turn_prefix"),
                    chat.getString("turn_suffix"), statePath, stateTokens, 0,
                )
                EdgeLLM(handle, manifest, EdgeLLMNative.info(handle), thread)
            }
        }

        private fun copyModel(context: Context, manifest: JSONObject, dir: File) {
            val done = File(dir, ".complete")
            if (done.exists()) return
            dir.mkdirs()
            val files = manifest.getJSONArray("files")
            val extra = manifest.optJSONObject("system_state")?.getString("file")
            val names = (0 until files.length()).map { files.getString(it) } + listOfNotNull(extra)
            for (name in names) {
                context.assets.open("$ASSETS/model/$name").use { input ->
                    File(dir, name).outputStream().use { input.copyTo(it, 1 shl 16) }
                }
            }
            done.writeText(manifest.getJSONObject("model").getString("sha256"))
        }

        private fun sha256(file: File): String {
            val digest = MessageDigest.getInstance("SHA-256")
            file.inputStream().use { input ->
                val buf = ByteArray(1 shl 16)
                while (true) {
                    val n = input.read(buf)
                    if (n <= 0) break
                    digest.update(buf, 0, n)
                }
            }
            return digest.digest().joinToString("") { "%02x".format(it) }
        }
    }

    /** Stream the answer to one user turn. Cancelling the collector stops generation at the next token. */
    fun generate(prompt: String, maxTokens: Int = manifest.getJSONObject("runtime").getInt("max_tokens")): Flow<String> =
        flow {
            check(!closed) { "the model is closed" }
            val start = System.nanoTime()
            var first = 0L
            var count = 0
            try {
                EdgeLLMNative.begin(handle, prompt, maxTokens)
                while (true) {
                    currentCoroutineContext().ensureActive()
                    val piece = EdgeLLMNative.next(handle) ?: break
                    if (count++ == 0) first = System.nanoTime()
                    emit(String(piece, Charsets.UTF_8))
                }
            } finally {
                val end = System.nanoTime()
                val rate = if (count > 1) (count - 1) * 1e9 / (end - first) else 0.0
                lastStats = Stats((first - start).coerceAtLeast(0) / 1_000_000, rate, count,
                                  EdgeLLMNative.promptTokens(handle))
            }
        }.flowOn(thread)

    /** Forget the conversation; the system prompt's KV cache stays. */
    suspend fun reset() = withContext(thread) { EdgeLLMNative.reset(handle) }

    override fun close() {
        if (closed) return
        closed = true
        runBlocking(thread) { EdgeLLMNative.close(handle) }  // after any running step: one thread
        thread.close()
    }
}
