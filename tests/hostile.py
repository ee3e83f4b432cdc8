"""Helpers for the hostile-input tests: model files with a template of our choosing."""
from __future__ import annotations

import struct
from pathlib import Path

KEY = b"tokenizer.chat_template"

# Each would hang, exhaust memory or run code if templates were rendered without bounds.
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
SILENT_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
DOUBLING = ("{% set ns = namespace(s='0123456789abcdef') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
            "{% endfor %}{{ ns.s|length }}")
WIDE_FILTER = "{{ 'x'|center(1000000000) }}"
ESCAPE = "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}"


def gguf_with_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of the GGUF `src` whose chat template is `template`, padded with a Jinja comment to the
    original's length so every offset in the file stays where it was."""
    data = bytearray(src.read_bytes())
    at = data.index(struct.pack("<Q", len(KEY)) + KEY) + 8 + len(KEY)
    assert struct.unpack_from("<I", data, at)[0] == 8  # GGUF string
    n = struct.unpack_from("<Q", data, at + 4)[0]
    new = template.encode()
    pad = n - len(new)
    assert pad == 0 or pad >= 4, f"template must be at most {n - 4} bytes"
    new += (b"{#" + b" " * (pad - 4) + b"#}") if pad else b""
    data[at + 12:at + 12 + n] = new
    dst.write_bytes(bytes(data))
    return dst
