import CryptoKit
import EdgeLLMCore
import Foundation

/// The packaged model over edgellm's C engine and llama.cpp: load it once, stream answers with
/// `generate`, start over with `reset`. A conversation stays in llama.cpp's KV cache between turns;
/// the system prompt's cache comes from the shipped state (checked by sha256, re-evaluated when
/// llama.cpp refuses it).
public actor EdgeLLM {
    public let manifest: Manifest
    /// What runs: llama.cpp build, flash attention, KV type, how the system prompt got into the cache.
    public nonisolated let info: String
    public private(set) var lastStats = Stats()
    private let engine: OpaquePointer

    /// Open the model shipped in this package's resources.
    public init(threads: Int? = nil, gpuLayers: Int = 99) throws {
        let bundle = Bundle.module
        let manifest = try Manifest.load(from: bundle)
        guard let model = bundle.url(forResource: manifest.files[0], withExtension: nil) else {
            throw EdgeLLMError.load("\(manifest.files[0]) is missing from the package resources")
        }
        var statePath: String? = nil
        var stateTokens: [Int32] = []
        if let state = manifest.system_state,
           let url = bundle.url(forResource: state.file, withExtension: nil),
           let data = try? Data(contentsOf: url, options: .mappedIfSafe),
           SHA256.hash(data: data).map({ String(format: "%02x", $0) }).joined() == state.sha256 {
            statePath = url.path  // a corrupt copy would restore wrong KV values unnoticed: checked first
            stateTokens = state.tokens
        }
        let strings = [model.path, manifest.runtime.provider, manifest.chat.system_text, manifest.chat.turn_prefix,
                       manifest.chat.turn_suffix, statePath ?? ""].map { strdup($0) }
        defer { strings.forEach { free($0) } }
        var options = el_options()
        options.model_path = UnsafePointer(strings[0])
        options.provider = UnsafePointer(strings[1])
        options.threads = Int32(threads ?? manifest.runtime.threads)
        options.n_ctx = Int32(manifest.runtime.n_ctx)
        options.system_text = UnsafePointer(strings[2])
        options.turn_prefix = UnsafePointer(strings[3])
        options.turn_suffix = UnsafePointer(strings[4])
        options.state_path = UnsafePointer(strings[5])
        options.gpu_layers = Int32(gpuLayers)  // Metal; the state is plain KV bytes, valid on GPU or CPU
        var err = [CChar](repeating: 0, count: 512)
        let opened: OpaquePointer? = stateTokens.withUnsafeBufferPointer { tokens in
            options.state_tokens = tokens.baseAddress
            options.n_state_tokens = tokens.count
            return el_open(&options, &err, err.count)
        }
        guard let opened else { throw EdgeLLMError.load(String(cString: err)) }
        self.engine = opened
        self.manifest = manifest
        self.info = String(cString: el_info(opened))
    }

    deinit { el_close(engine) }

    /// Stream the answer to one user turn. Cancelling the consuming task stops at the next token.
    public nonisolated func generate(_ prompt: String, maxTokens: Int? = nil) -> AsyncThrowingStream<String, Error> {
        AsyncThrowingStream { continuation in
            let task = Task { await self.run(prompt, maxTokens: maxTokens, into: continuation) }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    /// Forget the conversation; the system prompt's KV cache stays.
    public func reset() { el_reset(engine) }

    private func run(_ prompt: String, maxTokens: Int?,
                     into continuation: AsyncThrowingStream<String, Error>.Continuation) {
        let start = DispatchTime.now().uptimeNanoseconds
        var first: UInt64 = 0
        var count = 0
        defer {
            let end = DispatchTime.now().uptimeNanoseconds
            lastStats = Stats(ttftMs: Double(first > 0 ? first - start : 0) / 1e6,
                              tokensPerSecond: count > 1 ? Double(count - 1) * 1e9 / Double(end - first) : 0,
                              tokens: count)
        }
        guard el_begin(engine, prompt, Int32(maxTokens ?? manifest.runtime.max_tokens)) == 0 else {
            continuation.finish(throwing: EdgeLLMError.generate(String(cString: el_error(engine))))
            return
        }
        var piece: UnsafePointer<CChar>? = nil
        var length = 0
        while !Task.isCancelled {
            let rc = el_next(engine, &piece, &length)
            if rc < 0 {
                continuation.finish(throwing: EdgeLLMError.generate(String(cString: el_error(engine))))
                return
            }
            if rc == 0 { break }
            if count == 0 { first = DispatchTime.now().uptimeNanoseconds }
            count += 1
            if let piece, length > 0 {
                let bytes = UnsafeRawBufferPointer(start: piece, count: length)
                continuation.yield(String(decoding: bytes, as: UTF8.self))  // whole UTF-8 characters (the engine's contract)
            }
        }
        continuation.finish()
    }
}
