import Foundation

/// Resources/manifest.json, written by `edgellm package ios`: the model, the runtime settings edgellm's
/// planner chose for the phone class, the chat template rendered into three pieces, and (llama.cpp)
/// the shipped system-prompt state.
public struct Manifest: Codable, Sendable {
    public struct Model: Codable, Sendable {
        public let name: String
        public let format: String
        public let sha256: String
        public let bytes: Int
    }

    public struct Runtime: Codable, Sendable {
        public let name: String
        public let version: String
        public let provider: String
        public let threads: Int
        public let n_ctx: Int
        public let max_tokens: Int
    }

    public struct Chat: Codable, Sendable {
        public let system: String
        public let system_text: String
        public let turn_prefix: String
        public let turn_suffix: String
    }

    public struct SystemState: Codable, Sendable {
        public let file: String
        public let sha256: String
        public let n_tokens: Int
        public let tokens: [Int32]
        public let llama_cpp: String
    }

    public let format: String
    public let model: Model
    public let files: [String]
    public let runtime: Runtime
    public let chat: Chat
    public let system_state: SystemState?
    /// Core ML: the tokens that end an answer (the model's end-of-generation ids).
    public let stop_ids: [Int]?

    static func load(from bundle: Bundle) throws -> Manifest {
        guard let url = bundle.url(forResource: "manifest", withExtension: "json") else {
            throw EdgeLLMError.load("manifest.json is missing from the package resources")
        }
        return try JSONDecoder().decode(Manifest.self, from: Data(contentsOf: url))
    }
}

public enum EdgeLLMError: Error, CustomStringConvertible {
    case load(String)
    case generate(String)

    public var description: String {
        switch self {
        case .load(let why): return "cannot load the model: \(why)"
        case .generate(let why): return "generation failed: \(why)"
        }
    }
}

/// Timing of the last answer.
public struct Stats: Sendable, CustomStringConvertible {
    public var ttftMs: Double = 0
    public var tokensPerSecond: Double = 0
    public var tokens: Int = 0

    public var description: String {
        String(format: "TTFT %.0f ms · %.1f tok/s · %d tokens", ttftMs, tokensPerSecond, tokens)
    }
}
