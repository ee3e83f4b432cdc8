"""A desktop chat in a dozen lines of the Python API, with a precomputed system prompt.

The system prompt's KV state is computed once and saved; later runs load it, so the first answer
skips re-reading the system prompt (what an app shipping edgellm would do).
"""
from __future__ import annotations

from pathlib import Path

import edgellm

SYSTEM = "You are a friendly assistant running entirely on this computer. Keep answers short."
STATE = Path("build/system-prompt.kv")

llm = edgellm.load()  # the embedded SmolLM2-135M; backend and threads chosen for this device
if not STATE.exists():
    STATE.parent.mkdir(parents=True, exist_ok=True)
    llm.cache_prompt(SYSTEM, STATE)
llm.import_state(STATE)
chat = llm.conversation(system=SYSTEM, temperature=0.7, max_tokens=200)
while True:
    try:
        text = input("you> ")
    except EOFError:
        break
    for piece in chat.stream(text):
        print(piece, end="", flush=True)
    print()
