import CoreML
import Foundation
import Tokenizers

/// The packaged Core ML model: a generation loop over its stateful KV cache (MLState, iOS 18) with
/// swift-transformers' tokenizer. The package follows swift-transformers' stateful contract: inputs
/// `inputIds` (1, q) int32 and `causalMask` (1, 1, q, past + q) fp16 (0 = attend, -inf = not), states
/// `keyCache` / `valueCache`, output `logits` (1, q, vocab). Greedy decoding; a conversation stays in
/// the state between `generate` calls, and `reset` keeps the system prompt's part of it.
public actor EdgeLLM {
    public let manifest: Manifest
    /// What runs: Core ML compute units, context, how many system-prompt tokens are cached.
    public nonisolated let info: String
    public private(set) var lastStats = Stats()
    private let model: MLModel
    private let tokenizer: Tokenizer
    private let state: MLState
    private let stopIds: Set<Int>
    private var tokens: [Int] = []   // the conversation, including a sampled token not yet evaluated
    private var cached = 0           // positions already in the KV state
    private var systemTokens = 0

    public init(computeUnits: MLComputeUnits = .all) async throws {
        let bundle = Bundle.module
        let manifest = try Manifest.load(from: bundle)
        let config = MLModelConfiguration()
        config.computeUnits = computeUnits
        let compiled: URL
        if let url = bundle.url(forResource: "model", withExtension: "mlmodelc") {
            compiled = url  // compiled by Xcode from the package's .mlpackage resource
        } else if let url = bundle.url(forResource: "model", withExtension: "mlpackage") {
            compiled = try await MLModel.compileModel(at: url)
        } else {
            throw EdgeLLMError.load("model.mlpackage is missing from the package resources")
        }
        let model = try MLModel(contentsOf: compiled, configuration: config)
        guard let folder = bundle.resourceURL else { throw EdgeLLMError.load("no resource folder") }
        self.tokenizer = try await AutoTokenizer.from(modelFolder: folder)  // tokenizer.json + tokenizer_config.json
        self.model = model
        self.state = model.makeState()
        self.manifest = manifest
        self.stopIds = Set(manifest.stop_ids ?? [])
        self.info = "Core ML (compute units \(computeUnits.rawValue)), context \(manifest.runtime.n_ctx)"
        let system = tokenizer.encode(text: manifest.chat.system_text, addSpecialTokens: false)
        if !system.isEmpty {
            tokens = system
            _ = try forward()
        }
        systemTokens = cached
    }

    /// Stream the answer to one user turn. Cancelling the consuming task stops at the next token.
    public nonisolated func generate(_ prompt: String, maxTokens: Int? = nil) -> AsyncThrowingStream<String, Error> {
        AsyncThrowingStream { continuation in
            let task = Task { await self.run(prompt, maxTokens: maxTokens, into: continuation) }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    /// Forget the conversation; the system prompt's part of the KV state stays.
    public func reset() {
        tokens = Array(tokens.prefix(systemTokens))
        cached = systemTokens
    }

    private func run(_ prompt: String, maxTokens: Int?,
                     into continuation: AsyncThrowingStream<String, Error>.Continuation) {
        let first = tokens.count == systemTokens && cached == systemTokens
        let text = (first ? "" : manifest.chat.turn_prefix) + prompt + manifest.chat.turn_suffix
        tokens += tokenizer.encode(text: text, addSpecialTokens: false)
        let limit = maxTokens ?? manifest.runtime.max_tokens
        let start = DispatchTime.now().uptimeNanoseconds
        var firstAt: UInt64 = 0
        var answer: [Int] = []
        var shown = ""
        defer {
            let end = DispatchTime.now().uptimeNanoseconds
            lastStats = Stats(ttftMs: Double(firstAt > 0 ? firstAt - start : 0) / 1e6,
                              tokensPerSecond: answer.count > 1 ? Double(answer.count - 1) * 1e9 / Double(end - firstAt) : 0,
                              tokens: answer.count)
        }
        do {
            while answer.count < limit && !Task.isCancelled {
                guard tokens.count < manifest.runtime.n_ctx else {
                    throw EdgeLLMError.generate("the conversation is full: reset it")
                }
                let next = try forward()
                if stopIds.contains(next) { break }
                tokens.append(next)  // evaluated by the next forward()
                answer.append(next)
                if firstAt == 0 { firstAt = DispatchTime.now().uptimeNanoseconds }
                let decoded = tokenizer.decode(tokens: answer)
                if decoded.hasPrefix(shown), !decoded.hasSuffix("\u{FFFD}") {  // whole characters only
                    continuation.yield(String(decoded.dropFirst(shown.count)))
                    shown = decoded
                }
            }
            continuation.finish()
        } catch {
            continuation.finish(throwing: error)
        }
    }

    /// Evaluate tokens[cached...] into the KV state; the greedy next token.
    private func forward() throws -> Int {
        let q = tokens.count - cached
        let end = tokens.count
        let ids = try MLMultiArray(shape: [1, NSNumber(value: q)], dataType: .int32)
        for i in 0..<q { ids[i] = NSNumber(value: tokens[cached + i]) }
        let mask = try MLMultiArray(shape: [1, 1, NSNumber(value: q), NSNumber(value: end)], dataType: .float16)
        for i in 0..<q {
            for j in 0..<end { mask[i * end + j] = NSNumber(value: j <= cached + i ? 0 : -Float.infinity) }
        }
        let input = try MLDictionaryFeatureProvider(dictionary: ["inputIds": ids, "causalMask": mask])
        let output = try model.prediction(from: input, using: state)
        guard let logits = output.featureValue(for: "logits")?.multiArrayValue else {
            throw EdgeLLMError.generate("the model has no logits output")
        }
        cached = end
        let vocab = logits.shape[2].intValue
        let row = (logits.shape[1].intValue - 1) * vocab
        var best = 0
        var bestValue = -Float.infinity
        for v in 0..<vocab {
            let x = logits[row + v].floatValue
            if x > bestValue { bestValue = x; best = v }
        }
        return best
    }
}
