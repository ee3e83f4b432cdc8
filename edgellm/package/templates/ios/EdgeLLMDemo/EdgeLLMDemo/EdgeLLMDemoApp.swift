import SwiftUI

@main
struct EdgeLLMDemoApp: App {
    var body: some Scene {
        WindowGroup { ChatView() }
    }
}
