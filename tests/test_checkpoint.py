"""Checkpoint I/O: HF <-> checkpoint <-> GGUF, checked against transformers and llama.cpp themselves.

Random-weight models are tiny (hidden 64, 2 layers, 4 heads / 2 KV heads) with small BPE tokenizers
trained here in the families' own layouts; the real default model is used for the GGUF -> HF path.
"""
from __future__ import annotations

import json
import shutil
import tracemalloc
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

import edgellm
from edgellm.converters.checkpoint import Checkpoint, TensorSource, build_pre_tokenizer, hf_tensor_shapes
from edgellm.converters.gguf_source import read_gguf
from edgellm.converters.gguf_writer import write_gguf
from edgellm.converters.hf_source import read_hf
from edgellm.converters.hf_writer import write_hf
from edgellm.errors import EdgeLLMError, InvalidModelError, UnsupportedModelError

CORPUS = ["The quick brown fox jumps over the lazy dog 12345 times. ", "Bonjour, ça va? Übermäßig schön! ",
          "你好世界。こんにちは。 ", "def f(x):\n    return x * 42  # answer\n",
          "I've been told they'll say 'RE'. "] * 8
TEXT = "Bonjour, ça va?  The quick fox 1234 times.\n<|im_start|>user\nschön 你好<|im_end|>"
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-5)


def bpe_tokenizer(pre: str) -> Tokenizer:
    """A small byte-level BPE in the layout of the family's real tokenizer.json (SmolLM2, Llama 3, Qwen2)."""
    tk = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tk.pre_tokenizer = build_pre_tokenizer(pre)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def spm_tokenizer() -> Tokenizer:
    """A small SentencePiece-style BPE laid out like Llama 2 / Mistral's tokenizer.json (byte fallback)."""
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")   # train within words only
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                                       show_progress=False))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    data = json.loads(tk.to_str())
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] not in bytes_]  # bytes are plain vocab
    data["pre_tokenizer"] = None   # Llama 2's layout: the normalizer handles spaces
    return Tokenizer.from_str(json.dumps(data))


def make_hf(root: Path, arch: str, tok: Tokenizer, *, seed: int = 0, dtype=torch.float32, **overrides):
    """Save a random-weight model (all weights, biases and norms randomised) with its tokenizer."""
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    cfg = cls(vocab_size=tok.get_vocab_size(), **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.to(dtype).save_pretrained(root)
    tok.save(str(root / "tokenizer.json"))
    spm = tok.get_vocab().get("<s>") is not None
    specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True) if spm else \
        dict(bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>", add_bos_token=False)
    (root / "tokenizer_config.json").write_text(json.dumps({**specials, "chat_template": CHATML}))
    return model


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def assert_logits_match(model, gguf_path: Path, ids: list[int], min_cos: float) -> None:
    """llama.cpp's next-token logits equal transformers' at several positions of `ids`."""
    with torch.no_grad():
        ref = model.float()(torch.tensor([ids])).logits[0].numpy()
    with edgellm.load(gguf_path, disk_cache=False, n_ctx=128, threads=2) as s:
        for n in (1, len(ids) // 2, len(ids)):
            assert cosine(s.logits(ids[:n]), ref[n - 1]) >= min_cos, f"position {n}"


CASES = {  # id: (architecture, tokenizer, config overrides, GGUF tokenizer model, pre-tokenizer)
    "llama-smollm-tied": ("llama", "smollm", dict(tie_word_embeddings=True), "gpt2", "smollm"),
    "llama3-bias-headdim": ("llama", "llama-bpe", dict(attention_bias=True, head_dim=32), "gpt2", "llama-bpe"),
    "qwen2-bias": ("qwen2", "qwen2", dict(tie_word_embeddings=False), "gpt2", "qwen2"),
    "mistral-spm": ("mistral", "spm", dict(sliding_window=None), "llama", "default"),
}


@pytest.mark.parametrize("case", CASES)
def test_hf_to_gguf_matches_transformers(case, tmp_path):
    arch, tok_kind, overrides, tok_model, pre = CASES[case]
    tok = spm_tokenizer() if tok_kind == "spm" else bpe_tokenizer(tok_kind)
    model = make_hf(tmp_path / "hf", arch, tok, **overrides)
    ckpt = read_hf(tmp_path / "hf")
    assert (ckpt.tokenizer.model, ckpt.tokenizer.pre) == (tok_model, pre)
    info = write_gguf(ckpt, tmp_path / "m.gguf")
    assert info.architecture == ("qwen2" if arch == "qwen2" else "llama")
    assert info.metadata["tokenizer.chat_template"] == CHATML
    assert ("output.weight" in {t.name for t in info.tensors}) != overrides.get("tie_word_embeddings", False)
    with edgellm.load(tmp_path / "m.gguf", disk_cache=False, n_ctx=128, threads=2) as s:
        ids = s.backend.tokenize(TEXT, add_special=False, parse_special=True)
        assert ids == tok.encode(TEXT, add_special_tokens=False).ids   # llama.cpp splits text like the HF tokenizer
        assert s.backend.add_bos() == (tok_kind == "spm")
    assert_logits_match(model, tmp_path / "m.gguf", ids, 0.9999)
    if tok_kind == "spm":  # and back: the tokenizer.json rebuilt from the GGUF's scores tokenizes the same
        back = read_gguf(tmp_path / "m.gguf")
        write_hf(back, tmp_path / "hf2")
        rebuilt = Tokenizer.from_file(str(tmp_path / "hf2" / "tokenizer.json"))
        assert rebuilt.encode(TEXT, add_special_tokens=False).ids == ids


@pytest.mark.parametrize("out_type", ["F16", "BF16"])
def test_half_precision_outputs_load_and_agree(out_type, tmp_path):
    model = make_hf(tmp_path / "hf", "llama", bpe_tokenizer("smollm"))
    info = write_gguf(read_hf(tmp_path / "hf"), tmp_path / "m.gguf", out_type)
    types = {t.name: t.type_name for t in info.tensors}
    assert types["blk.0.attn_q.weight"] == out_type and types["blk.0.attn_norm.weight"] == "F32"
    assert info.file_type_name == out_type
    assert_logits_match(model, tmp_path / "m.gguf", list(range(3, 40)), 0.999)


def _tensor_bytes(path: Path) -> tuple[dict[str, bytes], dict[str, object]]:
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.") and k != "general.name"}
    return {t.name: bytes(t.data.tobytes()) for t in r.tensors}, meta


def test_gguf_hf_gguf_round_trip_is_lossless(tmp_path):
    make_hf(tmp_path / "hf", "llama", bpe_tokenizer("smollm"), tie_word_embeddings=True)
    write_gguf(read_hf(tmp_path / "hf"), tmp_path / "a.gguf")
    write_hf(read_gguf(tmp_path / "a.gguf"), tmp_path / "hf2")
    assert not (tmp_path / "hf2" / "model.safetensors.index.json").exists()
    write_gguf(read_hf(tmp_path / "hf2"), tmp_path / "b.gguf")
    (ta, ma), (tb, mb) = _tensor_bytes(tmp_path / "a.gguf"), _tensor_bytes(tmp_path / "b.gguf")
    assert list(ta) == list(tb) and all(ta[n] == tb[n] for n in ta)
    assert ma == mb


def test_sharded_and_bf16_safetensors_are_read(tmp_path):
    model = make_hf(tmp_path / "hf", "qwen2", bpe_tokenizer("qwen2"), dtype=torch.bfloat16)
    ckpt = read_hf(tmp_path / "hf")
    assert set(ckpt.tensors.dtypes.values()) == {"BF16"}
    ref = {n: p.detach().float().numpy() for n, p in model.state_dict().items()}
    got = dict(ckpt.tensors)
    assert got.keys() == ref.keys() and all(np.array_equal(got[n], ref[n]) for n in ref)
    write_hf(ckpt, tmp_path / "sharded", "F16", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = read_hf(tmp_path / "sharded")
    assert all(np.array_equal(again.tensors.load(n), ref[n].astype(np.float16)) for n in ref)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float16)  # transformers agrees
    assert torch.equal(loaded.state_dict()["lm_head.weight"], torch.from_numpy(ref["lm_head.weight"]).half())


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    file.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def tiny_hf(module_tmp) -> Path:
    root = module_tmp / "hf"
    make_hf(root, "llama", bpe_tokenizer("smollm"))
    return root


def _broken(tiny_hf: Path, tmp_path: Path, how: str) -> tuple[Path, list[str]]:
    root, words = tmp_path / "bad", []
    shutil.copytree(tiny_hf, root)
    cfg = root / "config.json"
    if how == "architecture":
        _edit_json(cfg, architectures=["GPT2LMHeadModel"])
    elif how == "config key":
        _edit_json(cfg, hidden_size=None)
    elif how == "shape":
        _edit_json(cfg, intermediate_size=96)
    elif how == "shard":
        write_hf(read_hf(tiny_hf), root, max_shard_bytes=40_000)
        shard = sorted(set(json.loads((root / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
        (root / shard).unlink()
        words.append(shard)
    elif how == "tokenizer":
        (root / "tokenizer.json").unlink()
    return root, words


@pytest.mark.parametrize("how, error, words", [
    ("architecture", UnsupportedModelError, ["GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM",
                                             "MistralForCausalLM"]),
    ("config key", InvalidModelError, ["hidden_size"]),
    ("shape", InvalidModelError, ["model.layers.0.mlp.gate_proj.weight", "[128, 64]", "[96, 64]"]),
    ("shard", InvalidModelError, ["missing"]),
    ("tokenizer", InvalidModelError, ["tokenizer.json"]),
])
def test_bad_hf_inputs_raise_one_line_errors(tiny_hf, tmp_path, how, error, words):
    root, more = _broken(tiny_hf, tmp_path, how)
    with pytest.raises(error) as e:
        read_hf(root)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words + more), msg


def test_bad_gguf_inputs(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "x.gguf", "gpt2")
    w.add_block_count(1)
    w.add_context_length(8)
    w.add_embedding_length(8)
    w.add_head_count(1)
    w.add_tokenizer_model("none")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(EdgeLLMError) as e:
        read_gguf(tmp_path / "x.gguf")
    assert "gpt2" in str(e.value) and "\n" not in str(e.value)


def test_interrupted_conversion_leaves_nothing(tiny_hf, tmp_path):
    ckpt = read_hf(tiny_hf)
    load = ckpt.tensors.load

    def interrupted(name: str) -> np.ndarray:
        if name == "model.layers.1.mlp.up_proj.weight":
            raise KeyboardInterrupt
        return load(name)

    ckpt.tensors.load = interrupted
    out = tmp_path / "out"
    out.mkdir()
    for write in (lambda: write_gguf(ckpt, out / "m.gguf"), lambda: write_hf(ckpt, out / "hf")):
        with pytest.raises(KeyboardInterrupt):
            write()
        assert list(out.iterdir()) == []


def test_memory_stays_bounded_by_the_largest_tensor(tiny_hf, tmp_path):
    """A 16-layer synthetic checkpoint (~17 MB of F32) is written holding about one tensor at a time."""
    base = read_hf(tiny_hf)
    cfg = replace(base.config, hidden_size=128, intermediate_size=512, num_hidden_layers=16, head_dim=32)
    shapes = hf_tensor_shapes(cfg)
    rng = np.random.default_rng(0)
    src = TensorSource(shapes, lambda n: rng.standard_normal(shapes[n], dtype=np.float32))
    ckpt = Checkpoint(cfg, src, base.tokenizer)
    largest = max(int(np.prod(s)) * 4 for s in shapes.values())
    total = src.n_params() * 4
    for write in (lambda: write_gguf(ckpt, tmp_path / "big.gguf", "BF16"), lambda: write_hf(ckpt, tmp_path / "big")):
        tracemalloc.start()
        write()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4 * largest + (3 << 20) < total / 3, (peak, largest, total)


@pytest.mark.slow
def test_default_model_gguf_to_hf_and_back(default_model_path, tmp_path):
    """Q4_1 SmolLM2 -> HF (dequantized F32) -> GGUF F32: transformers on the HF export and llama.cpp on
    the F32 GGUF agree (same weights on both sides); it generates, and keeps tokenizer and weights exactly.

    (Against the Q4_1 file itself llama.cpp quantizes activations to Q8_1, so only ~0.998 is expected.)"""
    src = read_gguf(default_model_path)
    write_hf(src, tmp_path / "hf")
    info = write_gguf(read_hf(tmp_path / "hf"), tmp_path / "f32.gguf")
    assert info.quant_summary() == "F32"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with edgellm.load(tmp_path / "f32.gguf", disk_cache=False, n_ctx=256, threads=2, sampler=edgellm.GREEDY) as s:
        ids = s.tokenize(s.render([{"role": "user", "content": "What is the capital of France?"}]))
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].numpy()
        assert cosine(s.logits(ids), ref) >= 0.9999
        out = s.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=12)
        assert "Paris" in out.text
    del model
    with edgellm.load(default_model_path, disk_cache=False, n_ctx=256, threads=2) as q:
        assert cosine(q.logits(ids), ref) >= 0.99  # the shipped Q4_1 file: same model, activation-quantized
    orig, back = gguf.GGUFReader(default_model_path), gguf.GGUFReader(tmp_path / "f32.gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.pre",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template",
                "tokenizer.ggml.add_bos_token", "llama.rope.freq_base", "llama.context_length"):
        assert orig.fields[key].contents() == back.fields[key].contents(), key
    theirs = {t.name: t for t in back.tensors}
    for t in orig.tensors[:12]:  # every tensor type of the file (Q8_0 embeddings, Q4_1 weights, F32 norms)
        expect = gguf.quants.dequantize(t.data, t.tensor_type).reshape(theirs[t.name].data.shape)
        assert np.array_equal(expect, theirs[t.name].data), t.name
