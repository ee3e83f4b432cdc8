"""The GGUF validator on the real model and on targeted corruptions of it (edited in memory)."""
from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import pytest

from edgellm.errors import InvalidModelError, UnsupportedModelError
from edgellm.gguf_check import ArraySummary, validate_gguf, validate_gguf_stream


@pytest.fixture(scope="module")
def real(default_model_path: Path):
    """(info, header bytes before the data section, data section length) of the real model."""
    info = validate_gguf(default_model_path)
    with open(default_model_path, "rb") as f:
        header = f.read(info.data_offset)
    return info, header, info.file_size - info.data_offset


def check(real, head: bytes, size: int | None = None):
    _, _, data_len = real
    return validate_gguf_stream(io.BytesIO(head), len(head) + data_len if size is None else size, "m.gguf")


def kv_value_at(h: bytes, key: str) -> int:
    """Offset of the value-type field of a KV pair (the value follows it)."""
    k = key.encode()
    return h.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)


def tensor_at(h: bytes, name: str) -> tuple[int, int]:
    """Offsets of a tensor's n_dims field and of its type field."""
    n = name.encode()
    pos = h.rindex(struct.pack("<Q", len(n)) + n) + 8 + len(n)
    n_dims = struct.unpack_from("<I", h, pos)[0]
    return pos, pos + 4 + 8 * n_dims


def put(h: bytes, offset: int, fmt: str, *values) -> bytes:
    b = bytearray(h)
    struct.pack_into(fmt, b, offset, *values)
    return bytes(b)


def expect(real, head: bytes, fragment: str, exc: type = InvalidModelError, size: int | None = None) -> str:
    with pytest.raises(exc) as e:
        check(real, head, size)
    msg = str(e.value)
    assert fragment in msg, msg
    assert "\n" not in msg and msg.startswith("m.gguf: ")
    return msg


# --- the real model -------------------------------------------------------------------------------------------

def test_real_model_facts(real):
    info, _, data_len = real
    assert info.architecture == "llama" and info.version == 3 and info.alignment == 32
    assert len(info.tensors) == 272 and len(info.metadata) == 33
    assert info.data_offset == 1_785_664 and info.file_size == 98_362_432
    assert info.hparams() == {"block_count": 30, "embedding_length": 576, "feed_forward_length": 1536,
                              "head_count": 9, "head_count_kv": 3, "context_length": 8192, "vocab_size": 49152}
    by_type = info.bytes_by_type()
    assert {k: n for k, (n, _) in by_type.items()} == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert sum(b for _, b in by_type.values()) == data_len
    assert abs(info.n_params - 134.5e6) < 0.1e6
    assert info.file_type_name == "Q4_1" and info.quant_summary() == "Q4_1"
    assert info.metadata["tokenizer.ggml.tokens"] == ArraySummary("STRING", 49152)
    assert info.metadata["general.languages"] == ["en"]
    emb = info.tensors[0]
    assert (emb.name, emb.shape, emb.type_name, emb.offset) == ("token_embd.weight", (576, 49152), "Q8_0", 1_785_664)
    assert emb.n_bytes == 576 * 49152 // 32 * 34


def test_real_model_validates_fast(default_model_path):
    validate_gguf(default_model_path)  # warm the page cache
    start = time.perf_counter()
    validate_gguf(default_model_path)
    assert time.perf_counter() - start < 0.5


def test_header_only_stream_with_real_size(real):
    info, header, _ = real
    assert len(check(real, header).tensors) == 272


# --- header, counts, strings, arrays --------------------------------------------------------------------------

def test_bad_magic(real):
    expect(real, b"GGUX" + real[1][4:], "not a GGUF file")


def test_versions(real):
    h = real[1]
    expect(real, put(h, 4, "<I", 99), "unknown GGUF version 99")
    expect(real, put(h, 4, "<I", 1), "version 1 is too old", UnsupportedModelError)
    check(real, put(h, 4, "<I", 2))


@pytest.mark.parametrize("cut", [0, 10, 23, 24, 100, 5_000, 1_000_000, 1_785_000])
def test_truncated_header(real, tmp_path, cut):
    path = tmp_path / "cut.gguf"
    path.write_bytes(real[1][:cut])
    with pytest.raises(InvalidModelError,
                       match="shorter than a GGUF header|truncated|past the end|impossible|bytes remain"):
        validate_gguf(path)


@pytest.mark.parametrize("cut", [1_785_664, 1_785_664 + 1_000, 98_362_431])
def test_truncated_data(real, cut):
    expect(real, real[1], "runs past the end of the file", size=cut)


def test_counts_bounded(real):
    h = real[1]
    expect(real, put(h, 8, "<Q", 1 << 40), "tensor count")
    expect(real, put(h, 16, "<Q", 10_000_000), "KV count")


def test_huge_string_length(real):
    h = real[1]
    pos = kv_value_at(h, "general.name") + 4
    expect(real, put(h, pos, "<Q", 1 << 40), "exceeds the limit")
    expect(real, put(h, pos, "<Q", 5 << 20), "runs past the end", size=len(h))


def test_huge_array_count(real):
    h = real[1]
    pos = kv_value_at(h, "tokenizer.ggml.tokens") + 8
    expect(real, put(h, pos, "<Q", 1 << 40), "claims 1,099,511,627,776 elements")


def test_duplicate_key(real):
    expect(real, real[1].replace(b"general.name", b"general.type"), "duplicate key 'general.type'")


def test_bad_keys_and_values(real):
    h = real[1]
    expect(real, h.replace(b"general.name", b"general.n\x01me"), "not printable ASCII")
    pos = kv_value_at(h, "general.name")
    expect(real, put(h, pos, "<I", 77), "unknown value type 77")
    expect(real, put(h, pos + 12, "<B", 0xFF), "is not valid UTF-8")
    expect(real, put(h, kv_value_at(h, "tokenizer.ggml.add_bos_token") + 4, "<B", 2), "must be 0 or 1")
    pos = kv_value_at(h, "general.languages")
    expect(real, put(h, pos + 4, "<I", 9), "nested array", UnsupportedModelError)
    expect(real, put(h, pos + 4, "<I", 13), "unknown array element type 13")


def test_wrong_value_types_llama_cpp_reads(real):
    h = real[1]
    for key, new_type in [("llama.block_count", 5), ("llama.embedding_length", 6), ("general.file_type", 5),
                          ("llama.attention.layer_norm_rms_epsilon", 4), ("tokenizer.ggml.eos_token_id", 5)]:
        expect(real, put(h, kv_value_at(h, key), "<I", new_type), f"'{key}' has type")


def test_alignment(real):
    h = real[1].replace(b"general.file_type", b"general.alignment")  # a u32 with value 3
    expect(real, h, "general.alignment must be a UINT32 power of two")


# --- tensor table and layout ----------------------------------------------------------------------------------

def test_tensor_offset_past_eof(real):
    info, h, _ = real
    last = info.tensors[-1]
    _, tpos = tensor_at(h, last.name)
    msg = expect(real, put(h, tpos + 4, "<Q", 1 << 30), "runs past the end of the file (98,362,432 bytes)")
    assert f"tensor '{last.name}' data [offset" in msg


def test_overlapping_tensors(real):
    info, h, _ = real
    _, tpos = tensor_at(h, info.tensors[2].name)
    expect(real, put(h, tpos + 4, "<Q", info.tensors[1].offset - info.data_offset), "overlap")


def test_tensors_out_of_table_order(real):
    info, h, _ = real
    a, b = (next(t for t in info.tensors if t.name == n) for n in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"))
    (_, ta), (_, tb) = tensor_at(h, a.name), tensor_at(h, b.name)
    swapped = put(put(h, ta + 4, "<Q", b.offset - info.data_offset), tb + 4, "<Q", a.offset - info.data_offset)
    expect(real, swapped, "llama.cpp expects")  # same sizes, no overlap, but llama.cpp wants table order


def test_misaligned_offset(real):
    info, h, _ = real
    _, tpos = tensor_at(h, info.tensors[5].name)
    expect(real, put(h, tpos + 4, "<Q", info.tensors[5].offset - info.data_offset + 1),
           "not a multiple of the alignment")


def test_unknown_tensor_types(real):
    info, h, _ = real
    _, tpos = tensor_at(h, "blk.0.attn_norm.weight")
    expect(real, put(h, tpos, "<I", 0xDEAD), "not a ggml type")
    with pytest.raises(UnsupportedModelError, match="removed or unknown"):
        check(real, put(h, tpos, "<I", 4))


def test_bad_dims(real):
    h = real[1]
    npos, _ = tensor_at(h, "blk.0.attn_q.weight")
    expect(real, put(h, npos, "<I", 5), "has 5 dimensions")
    expect(real, put(h, npos, "<I", 0), "has 0 dimensions")
    expect(real, put(h, npos + 4, "<Q", 0), "bad dimension 0")
    expect(real, put(h, npos + 4, "<Q", 1 << 41), "bad dimension")
    expect(real, put(h, npos + 4, "<Q", 570), "not a multiple of the Q4_1 block size 32")


def test_tensor_names(real):
    h = real[1]
    expect(real, h.replace(b"blk.0.attn_q.weight", b"blk.0.attn_x.weight"), "not a tensor of architecture 'llama'")
    expect(real, h.replace(b"blk.0.attn_q.weight", b"blk.0.attn_k.weight"), "duplicate tensor name")


def test_shape_against_hparams(real):
    h = real[1]
    npos, _ = tensor_at(h, "blk.3.attn_k.weight")
    swapped = put(h, npos + 4, "<QQ", 192, 576)  # same byte size, wrong orientation
    expect(real, swapped, "has shape [192, 576] but the hyper-parameters imply [576, 192]")


def test_norm_weight_type(real):
    _, h, _ = real
    _, tpos = tensor_at(h, "blk.0.attn_norm.weight")
    # I32 has F32's size: llama.cpp loads it, then aborts in the first decode (binary_op: unsupported types).
    expect(real, put(h, tpos, "<I", 26), "has type I32")


# --- hyper-parameters, architecture, tokenizer ----------------------------------------------------------------

def test_block_count_mismatch(real):
    h = real[1]
    pos = kv_value_at(h, "llama.block_count") + 4
    expect(real, put(h, pos, "<I", 29), "is in block 29 but llama.block_count is 29")
    expect(real, put(h, pos, "<I", 31), "block 30 has no tensors")
    expect(real, put(h, pos, "<I", 0), "out of range")
    with pytest.raises(UnsupportedModelError, match="limit of 512"):  # llama.cpp would abort
        check(real, put(h, pos, "<I", 600))


def test_head_counts(real):
    h = real[1]
    pos = kv_value_at(h, "llama.attention.head_count_kv") + 4
    expect(real, put(h, pos, "<I", 2), "does not divide head_count 9")
    expect(real, put(h, pos, "<I", 0), "out of range")
    expect(real, put(h, kv_value_at(h, "llama.rope.dimension_count") + 4, "<I", 32), "must equal the head size 64")


def test_unknown_architecture(real):
    h = real[1]
    pos = kv_value_at(h, "general.architecture") + 12
    with pytest.raises(UnsupportedModelError, match="unknown architecture 'llamb'"):
        check(real, put(h, pos, "5s", b"llamb"))
    info = validate_gguf_stream(io.BytesIO(put(h, pos, "5s", b"llamb")), len(h) + real[2], require_arch=False)
    assert info.architecture == "llamb"


def test_special_token_out_of_vocab(real):
    h = real[1]
    expect(real, put(h, kv_value_at(h, "tokenizer.ggml.eos_token_id") + 4, "<I", 49152),
           "'tokenizer.ggml.eos_token_id' = 49,152 is not below the vocabulary size 49,152")


def test_tokenizer_arrays(real):
    h = real[1]
    expect(real, h.replace(b"\x01\x00\x00\x00\x00\x00\x00\x00!\x01", b"\x01\x00\x00\x00\x00\x00\x00\x00\"\x01", 1),
           "duplicates token")  # llama.cpp aborts on this
    pos = kv_value_at(h, "tokenizer.ggml.token_type") + 16
    expect(real, put(h, pos + 4 * 17, "<i", 6), "has type BYTE but is not of the form <0xHH>")
    expect(real, put(h, pos + 4 * 17, "<i", 99), "is not a token type")
    pos = kv_value_at(h, "tokenizer.ggml.merges") + 16
    n = struct.unpack_from("<Q", h, pos)[0]
    expect(real, put(h, pos + 8, f"{n}s", h[pos + 8:pos + 8 + n].replace(b" ", b"x")), "separated by one space")
    pre = kv_value_at(h, "tokenizer.ggml.pre") + 12
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer 'smollx'"):
        check(real, put(h, pre, "6s", b"smollx"))
    model = kv_value_at(h, "tokenizer.ggml.model") + 12
    with pytest.raises(UnsupportedModelError, match="tokenizer model 'gpt3'"):
        check(real, put(h, model, "4s", b"gpt3"))


def test_rope_scaling_type_value(real):
    # llama.cpp aborts on an unknown rope.scaling.type; the chat template is a 23-byte-key string to rename.
    h = real[1].replace(b"tokenizer.chat_template", b"llama.rope.scaling.type")
    expect(real, h, "'llama.rope.scaling.type' is")


# --- through real files ---------------------------------------------------------------------------------------

def _write(path: Path, head: bytes, model: Path, data_offset: int) -> Path:
    with open(path, "wb") as out, open(model, "rb") as src:
        out.write(head)
        src.seek(data_offset)
        while chunk := src.read(1 << 22):
            out.write(chunk)
    return path


def test_files_on_disk(real, default_model_path, tmp_path):
    info, h, _ = real
    good = _write(tmp_path / "ok.gguf", h, default_model_path, info.data_offset)
    assert validate_gguf(good).path == str(good)
    bad = _write(tmp_path / "bad.gguf", put(h, 4, "<I", 99), default_model_path, info.data_offset)
    with pytest.raises(InvalidModelError, match=r"^bad\.gguf: unknown GGUF version 99"):
        validate_gguf(bad)
    with pytest.raises(InvalidModelError, match="cannot read"):
        validate_gguf(tmp_path / "missing.gguf")
