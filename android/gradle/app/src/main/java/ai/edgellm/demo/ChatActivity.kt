package ai.edgellm.demo

import ai.edgellm.EdgeLLM
import android.os.Bundle
import android.view.View
import android.widget.Button
import android.widget.EditText
import android.widget.ScrollView
import android.widget.TextView
import androidx.activity.ComponentActivity
import androidx.lifecycle.lifecycleScope
import kotlinx.coroutines.Job
import kotlinx.coroutines.launch

/** The demo chat screen: a streamed answer, Stop while it streams, TTFT and tok/s of each answer. */
class ChatActivity : ComponentActivity() {
    private var model: EdgeLLM? = null
    private var answering: Job? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_chat)
        val status = findViewById<TextView>(R.id.status)
        val transcript = findViewById<TextView>(R.id.transcript)
        val scroll = findViewById<ScrollView>(R.id.scroll)
        val input = findViewById<EditText>(R.id.input)
        val send = findViewById<Button>(R.id.send)

        lifecycleScope.launch {
            try {
                val loaded = EdgeLLM.load(applicationContext)
                model = loaded
                status.text = "Ready · ${loaded.info}"
                send.isEnabled = true
            } catch (e: Exception) {
                status.text = "Error: ${e.message}"
            }
        }

        send.setOnClickListener {
            val running = answering
            if (running != null && running.isActive) {
                running.cancel()  // Stop: the flow's collector goes away, the engine stops at the next token
                return@setOnClickListener
            }
            val question = input.text.toString().trim()
            val llm = model ?: return@setOnClickListener
            if (question.isEmpty()) return@setOnClickListener
            input.setText("")
            transcript.append("\n\nYou: $question\n\nAssistant: ")
            send.setText(R.string.stop)
            status.text = "Thinking…"
            answering = lifecycleScope.launch {
                val stats = try {
                    llm.generate(question).collect { piece ->
                        transcript.append(piece)
                        scroll.post { scroll.fullScroll(View.FOCUS_DOWN) }
                    }
                    llm.lastStats.toString()
                } catch (e: Exception) {
                    if (e is kotlinx.coroutines.CancellationException) "Stopped · ${llm.lastStats}" else "Error: ${e.message}"
                }
                status.text = stats
                send.setText(R.string.send)
            }
        }
    }

    override fun onDestroy() {
        answering?.cancel()
        model?.close()
        super.onDestroy()
    }
}
