import EdgeLLM
import SwiftUI

/// One chat screen: the streamed answer, Stop while it streams, TTFT and tok/s of each answer.
struct ChatView: View {
    struct Turn: Identifiable {
        let id = UUID()
        let question: String
        var answer: String
    }

    @State private var model: EdgeLLM?
    @State private var status = "Loading the model…"
    @State private var turns: [Turn] = []
    @State private var input = ""
    @State private var answering: Task<Void, Never>?

    var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            Text(status).font(.footnote).foregroundStyle(.secondary)
            ScrollViewReader { proxy in
                ScrollView {
                    LazyVStack(alignment: .leading, spacing: 12) {
                        ForEach(turns) { turn in
                            Text("You: \(turn.question)").bold()
                            Text(turn.answer).textSelection(.enabled).id(turn.id)
                        }
                    }
                }
                .onChange(of: turns.last?.answer) { _ in
                    if let last = turns.last { proxy.scrollTo(last.id, anchor: .bottom) }
                }
            }
            HStack {
                TextField("Ask something", text: $input, axis: .vertical).textFieldStyle(.roundedBorder)
                Button(answering == nil ? "Send" : "Stop", action: sendOrStop)
                    .disabled(model == nil)
            }
        }
        .padding()
        .task { await load() }
    }

    private func load() async {
        do {
            let loaded = try await Task.detached { try await EdgeLLM() }.value  // off the main thread
            model = loaded
            status = "Ready · \(loaded.info)"
        } catch {
            status = "Error: \(error)"
        }
    }

    private func sendOrStop() {
        if let running = answering {
            running.cancel()  // the engine stops at its next token
            return
        }
        let question = input.trimmingCharacters(in: .whitespacesAndNewlines)
        guard let model, !question.isEmpty else { return }
        input = ""
        turns.append(Turn(question: question, answer: ""))
        status = "Thinking…"
        answering = Task {
            do {
                for try await piece in model.generate(question) {
                    turns[turns.count - 1].answer += piece
                }
                status = await model.lastStats.description
            } catch {
                let stats = await model.lastStats
                status = Task.isCancelled ? "Stopped · \(stats)" : "Error: \(error)"
            }
            answering = nil
        }
    }
}
