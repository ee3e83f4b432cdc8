"""onnxruntime backend (CPU, XNNPACK, NNAPI execution providers) behind the same protocol as llama.cpp.

Runs the directories `edgellm convert --format onnx` writes (and graphs with the same inputs and
outputs, e.g. onnxruntime-genai's builder output). The KV cache is the graph's present.* outputs,
kept as OrtValues and bound straight back as the next step's past.* inputs (IOBinding: no numpy
round trip per token); a saved state is those tensors' bytes, so the session layer's prefix cache,
disk cache and shipped prompt states work unchanged. The tokenizer is the `tokenizers` library on the
directory's tokenizer.json (no transformers at run time).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgellm.errors import BackendError, ContextOverflowError, InvalidModelError, UsageError

from .base import Capabilities, SamplerConfig
from .sampling import NumpySampler

PROVIDERS = {"cpu": "CPUExecutionProvider", "xnnpack": "XnnpackExecutionProvider",
             "nnapi": "NnapiExecutionProvider"}
LABELS = {"cpu": "CPU", "xnnpack": "XNNPACK", "nnapi": "NNAPI"}
CONFIG_FILE = "edgellm_onnx.json"


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on the install
        raise BackendError(f"onnxruntime is not installed (pip install 'edgellm[onnx]'): {e}") from None
    return onnxruntime


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


@dataclass(frozen=True)
class ProviderChoice:
    providers: tuple[str, ...]    # what onnxruntime is asked for, best first (CPU takes unsupported nodes)
    device: str                   # what really runs: 'cpu' | 'xnnpack' | 'nnapi'
    warning: str | None = None    # the fallback, said out loud


def choose_provider(device: str, available: Sequence[str], *, explicit: bool) -> ProviderChoice:
    """Map the plan's device to execution providers this onnxruntime build has.

    onnxruntime itself silently drops a provider it lacks; here a missing one is an error when the
    user asked for it by name, and a reported fallback to CPU when the plan chose it.
    """
    want = PROVIDERS.get(device)
    if want is None:
        raise UsageError(f"device {device!r} has no onnxruntime execution provider")
    if want in available:
        extra = () if device == "cpu" else ("CPUExecutionProvider",)
        return ProviderChoice((want, *extra), device)
    have = ", ".join(p.removesuffix("ExecutionProvider") for p in available) or "none"
    msg = f"{LABELS[device]} execution provider is not in this onnxruntime build (it has: {have})"
    if explicit:
        raise BackendError(f"{msg}; install an onnxruntime build with it or use --device cpu")
    return ProviderChoice(("CPUExecutionProvider",), "cpu", f"{msg}: running on CPU instead")


def read_facts(model_dir: Path) -> dict:
    """edgellm_onnx.json, or the equivalent facts from an onnxruntime-genai genai_config.json."""
    own, genai = model_dir / CONFIG_FILE, model_dir / "genai_config.json"
    try:
        if own.is_file():
            return json.loads(own.read_text(encoding="utf-8"))
        if genai.is_file():
            m = json.loads(genai.read_text(encoding="utf-8"))["model"]
            d = m["decoder"]
            eos = m["eos_token_id"] if isinstance(m["eos_token_id"], list) else [m["eos_token_id"]]
            return {"format": "onnxruntime-genai", "flavour": "fused", "quant": "unknown",
                    "num_hidden_layers": d["num_hidden_layers"], "num_key_value_heads": d["num_key_value_heads"],
                    "head_dim": d["head_size"], "hidden_size": d["hidden_size"], "vocab_size": m["vocab_size"],
                    "context_length": m["context_length"], "special_ids": {"bos": m.get("bos_token_id"),
                                                                          "eos": eos[0]},
                    "eog_ids": eos, "add_bos": False, "chat_template": _genai_template(model_dir)}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidModelError(f"{model_dir}: unreadable ONNX model description: {e}") from None
    raise InvalidModelError(f"{model_dir} has no {CONFIG_FILE}: export it with edgellm convert --format onnx")


def _genai_template(model_dir: Path) -> str | None:
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
    tpl = model_dir / "chat_template.jinja"
    return tpl.read_text(encoding="utf-8") if tpl.is_file() else None


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode stand-ins for bytes, inverted (byte-level BPE token text -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class OnnxTokenizer:
    """tokenizer.json through the `tokenizers` library, with llama.cpp's token-to-bytes rules."""

    def __init__(self, model_dir: Path, facts: dict) -> None:
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise InvalidModelError(f"{model_dir} has no tokenizer.json: the ONNX directory is incomplete "
                                    "(re-export it with edgellm convert --format onnx)")
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the install
            raise BackendError(f"the tokenizers library is not installed (pip install 'edgellm[onnx]'): {e}") from None
        try:
            self.tk = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise InvalidModelError(f"{path}: not a valid tokenizer.json ({e})") from None
        self.added = {i: t.content for i, t in self.tk.get_added_tokens_decoder().items()}
        self.control = set(facts.get("control_ids") or
                           [i for i, t in self.tk.get_added_tokens_decoder().items() if t.special])
        try:
            decoder = json.loads(path.read_text(encoding="utf-8")).get("decoder")
        except (OSError, ValueError) as e:
            raise InvalidModelError(f"{path}: not a valid tokenizer.json ({e})") from None
        self.byte_level = "ByteLevel" in json.dumps(decoder)
        self._cache: dict[int, bytes] = {}

    def encode(self, text: str, parse_special: bool) -> list[int]:
        self.tk.encode_special_tokens = not parse_special
        return self.tk.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token: int, special: bool) -> bytes:
        if token in self.control and not special:
            return b""
        piece = self._cache.get(token)
        if piece is None:
            piece = self._cache[token] = self._piece(token)
        return piece

    def _piece(self, token: int) -> bytes:
        if token in self.added:
            return self.added[token].encode("utf-8")
        text = self.tk.id_to_token(token)
        if text is None:
            return b""
        if self.byte_level:
            dec = _byte_decoder()
            return bytes(dec[ch] for ch in text if ch in dec)
        if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])
        return text.replace("▁", " ").encode("utf-8")


class OnnxBackend:
    """One onnxruntime InferenceSession holding a single sequence."""

    name = "onnxruntime"

    def __init__(self, model_dir: Path, *, n_ctx: int = 4096, threads: int = 4, providers: ProviderChoice | None = None,
                 fingerprint: str = "", n_batch: int = 512) -> None:
        ort = _ort()
        self.model_dir = Path(model_dir)
        self.facts = facts = read_facts(self.model_dir)
        self.tokenizer = OnnxTokenizer(self.model_dir, facts)
        providers = providers or ProviderChoice(("CPUExecutionProvider",), "cpu")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 0 if os.environ.get("EDGELLM_LOG", "").lower() in ("debug", "verbose", "1") else 3
        path = self.model_dir / "model.onnx"
        if not path.is_file():
            raise InvalidModelError(f"{self.model_dir} has no model.onnx")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=list(providers.providers))
        except Exception as e:  # onnxruntime raises its own exception types for bad graphs
            raise InvalidModelError(f"{path}: onnxruntime could not load the graph: {str(e).splitlines()[0]}") from None
        self.providers = tuple(self.session.get_providers())
        wanted = providers.providers[0]
        self.device = providers.device if wanted in self.providers else "cpu"
        self.provider_warning = providers.warning or (
            None if wanted in self.providers else
            f"onnxruntime did not enable {wanted} (it runs {', '.join(self.providers)}): running on CPU instead")
        self._inputs = {i.name for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._n_layer = int(facts["num_hidden_layers"])
        self._kv_shape = (1, int(facts["num_key_value_heads"]), 0, int(facts["head_dim"]))
        self._past = [f"past_key_values.{i}.{k}" for i in range(self._n_layer) for k in ("key", "value")]
        self._present = [f"present.{i}.{k}" for i in range(self._n_layer) for k in ("key", "value")]
        missing = [n for n in ["input_ids", *self._past] if n not in self._inputs]
        if missing or "logits" not in self._outputs:
            raise InvalidModelError(f"{path}: not a decoder graph with a KV cache (missing {missing or 'logits'})")
        self._n_vocab = int(facts["vocab_size"])
        self._n_ctx = min(n_ctx, int(facts.get("context_length") or n_ctx))
        self._n_batch = n_batch
        self._ov = ort.OrtValue
        # GroupQueryAttention can write present.* into the past.* buffer in place (one buffer per tensor,
        # valid length from the attention mask): no per-token copy of the whole cache, as Concat needs.
        self._shared = facts.get("flavour") == "fused"
        self._arrays: list[np.ndarray] = []
        self._kv = [] if self._shared else self._empty_kv()
        # Per-step inputs and the logits live in buffers allocated once and bound by address (as
        # onnxruntime-genai's C++ loop does): a decode step writes one token id into place and rebinds
        # the mask's length; nothing is allocated, and no output is wrapped back into Python.
        self._ids = np.zeros(n_batch, np.int64)
        self._mask = np.ones(self._n_ctx, np.int64)
        self._keep = np.ones(1, np.int64)
        logits_type = next(o.type for o in self.session.get_outputs() if o.name == "logits")
        self._logits_dtype = np.float16 if logits_type == "tensor(float16)" else np.float32
        self._row = np.empty((1, self._n_vocab), self._logits_dtype)  # a decode step's logits
        self._ptr = [a.ctypes.data for a in (self._ids, self._mask, self._keep)]
        self._eog = frozenset(facts.get("eog_ids", ()))
        self._n_past = 0
        self._last: np.ndarray | None = None
        self._sampler: NumpySampler | None = None
        self.fingerprint = fingerprint
        self.capabilities = Capabilities(kv_state=True, logits=True, gpu=False, extra={
            "providers": ",".join(self.providers), "flavour": str(facts.get("flavour")),
            "quant": str(facts.get("quant")), "kv_type": "f32"})

    # -- facts -------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def n_past(self) -> int:
        return self._n_past

    def metadata(self, key: str) -> str | None:
        value = {"tokenizer.chat_template": self.facts.get("chat_template"), "general.name": self.facts.get("name"),
                 "general.architecture": self.facts.get("architecture")}.get(key)
        return None if value is None else str(value)

    def model_size(self) -> int:
        return sum(p.stat().st_size for p in self.model_dir.glob("model.onnx*"))

    def n_params(self) -> int:
        return int(self.facts.get("n_params") or 0)

    # -- tokens ------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, parse_special)
        bos = self.special_token("bos")
        if add_special and self.add_bos() and bos is not None:
            ids = [bos, *ids]
        return ids

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        return self.tokenizer.token_bytes(token, special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def special_token(self, which: str) -> int | None:
        tok = (self.facts.get("special_ids") or {}).get(which)
        return None if tok is None or tok < 0 else int(tok)

    def add_bos(self) -> bool:
        return bool(self.facts.get("add_bos"))

    # -- evaluation --------------------------------------------------------------------------
    def _empty_kv(self) -> list:
        empty = np.zeros(self._kv_shape, np.float32)
        return [self._ov.ortvalue_from_numpy(empty) for _ in self._past]

    def _reserve(self, n: int) -> None:
        """Shared-buffer mode: make the KV buffers hold at least n positions (doubling, up to n_ctx)."""
        have = self._arrays[0].shape[2] if self._arrays else 0
        if n <= have:
            return
        cap = min(self._n_ctx, max(n, 2 * have, 256))
        shape = (*self._kv_shape[:2], cap, self._kv_shape[3])
        grown = [np.zeros(shape, np.float32) for _ in self._past]
        for new, old in zip(grown, self._arrays):
            new[:, :, :self._n_past] = old[:, :, :self._n_past]
        self._arrays = grown
        self._kv = [self._ov.ortvalue_from_numpy(a) for a in grown]  # views: onnxruntime writes into the arrays
        self._io = self.session.io_binding()  # the KV bindings stay; each step rebinds only the small inputs
        for past, present, value in zip(self._past, self._present, self._kv):
            self._io.bind_ortvalue_input(past, value)
            self._io.bind_ortvalue_output(present, value)

    def _run(self, tokens: Sequence[int], keep: int) -> np.ndarray:
        """Evaluate one chunk on top of the KV cache; returns the last `keep` logits rows."""
        n, total = len(tokens), self._n_past + len(tokens)
        if self._shared:
            self._reserve(total)
            io = self._io
        else:
            io = self.session.io_binding()
            for name, value in zip(self._past, self._kv):
                io.bind_ortvalue_input(name, value)
            for name in self._present:
                io.bind_output(name, "cpu")
        self._ids[:n] = tokens
        io.bind_input("input_ids", "cpu", 0, np.int64, [1, n], self._ptr[0])
        if "attention_mask" in self._inputs:
            io.bind_input("attention_mask", "cpu", 0, np.int64, [1, total], self._ptr[1])
        rows = n
        if "num_logits_to_keep" in self._inputs:
            self._keep[0] = rows = keep
            io.bind_input("num_logits_to_keep", "cpu", 0, np.int64, [1], self._ptr[2])
        out = self._row if rows == 1 else np.empty((rows, self._n_vocab), self._logits_dtype)
        io.bind_output("logits", "cpu", 0, self._logits_dtype, [1, rows, self._n_vocab], out.ctypes.data)
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:  # onnxruntime's own exception types
            raise BackendError(f"onnxruntime failed to evaluate: {str(e).splitlines()[0]}") from None
        if not self._shared:
            self._kv = io.get_outputs()[:len(self._present)]
        self._n_past = total
        return out[-keep:]

    def eval(self, tokens: Sequence[int]) -> None:
        if self._n_past + len(tokens) > self._n_ctx:
            raise ContextOverflowError(f"{self._n_past + len(tokens)} tokens do not fit the "
                                       f"{self._n_ctx}-token context")
        for start in range(0, len(tokens), self._n_batch):
            self._last = self._run(list(tokens[start:start + self._n_batch]), 1)[-1]

    def eval_all_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Append tokens and return the logits of every one of them (n, n_vocab), for evaluation."""
        if self._n_past + len(tokens) > self._n_ctx:
            raise ContextOverflowError(f"{self._n_past + len(tokens)} tokens do not fit the "
                                       f"{self._n_ctx}-token context")
        parts = []
        for start in range(0, len(tokens), self._n_batch):
            chunk = list(tokens[start:start + self._n_batch])
            parts.append(self._run(chunk, len(chunk)))
        self._last = parts[-1][-1]
        return np.concatenate(parts)

    def eval_rows(self, tokens: Sequence[int]) -> np.ndarray:
        """Append a few tokens in one run with logits for every one of them (num_logits_to_keep = n):
        the (n, n_vocab) rows, for speculative verification."""
        n = len(tokens)
        if self._n_past + n > self._n_ctx or n > self._n_batch:
            raise ContextOverflowError(f"{self._n_past + n} tokens do not fit the {self._n_ctx}-token context")
        rows = self._run(list(tokens), n)
        self._last = rows[-1]
        return rows

    def accept_tokens(self, tokens: Sequence[int]) -> None:
        """Tokens chosen outside the sampler (speculative verification) join its penalty window."""
        if self._sampler is not None:
            for tok in tokens:
                self._sampler.accept(tok)

    def reset_sampler(self, config: SamplerConfig, history: Sequence[int] = ()) -> None:
        self._sampler = NumpySampler(config, history)

    def sample(self, config: SamplerConfig) -> int:
        if self._last is None:
            raise UsageError("nothing has been evaluated yet: there are no logits to sample from")
        if config.greedy and config.repeat_penalty == 1.0:
            return int(self._last.argmax())
        if self._sampler is None or self._sampler.config != config:
            self._sampler = NumpySampler(config)
        return self._sampler.sample(self._last)

    def logits(self) -> np.ndarray:
        if self._last is None:
            raise UsageError("nothing has been evaluated yet: there are no logits")
        return self._last.copy()

    # -- KV state ----------------------------------------------------------------------------
    def truncate(self, n: int) -> None:
        if n < 0 or n > self._n_past:
            raise UsageError(f"cannot truncate the KV cache to {n} tokens (it holds {self._n_past})")
        if n == self._n_past:
            return
        if self._shared:
            pass  # positions ≥ n are outside the attention mask from now on, and get overwritten
        elif n == 0:
            self._kv = self._empty_kv()
        else:
            self._kv = [self._ov.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :n])) for v in self._kv]
        self._n_past = n
        self._last = None

    def _state_bytes(self, n_tokens: int) -> int:
        _, heads, _, dim = self._kv_shape
        return len(self._past) * heads * n_tokens * dim * 4

    def save_state(self) -> bytes:
        if self._shared:
            return b"".join(a[:, :, :self._n_past].tobytes() for a in self._arrays)
        return b"".join(v.numpy().tobytes() for v in self._kv)

    def load_state(self, data: bytes, n_tokens: int) -> None:
        if n_tokens > self._n_ctx:
            raise ContextOverflowError(f"a saved state of {n_tokens} tokens does not fit the "
                                       f"{self._n_ctx}-token context")
        if len(data) != self._state_bytes(n_tokens):
            raise BackendError(f"the saved KV state has {len(data)} bytes, expected {self._state_bytes(n_tokens)} "
                               f"for {n_tokens} tokens of this model")
        _, heads, _, dim = self._kv_shape
        arrays = np.frombuffer(data, np.float32).reshape(len(self._past), 1, heads, n_tokens, dim)
        if self._shared:
            self._n_past = 0
            self._reserve(n_tokens)
            for dst, src in zip(self._arrays, arrays):
                dst[:, :, :n_tokens] = src
        else:
            self._kv = [self._ov.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in arrays]
        self._n_past = n_tokens
        self._last = None

    # -- the server's engine protocol (runtimes/base.py BatchBackend) with one sequence ----------------
    # onnxruntime's graph holds one KV cache, so `edgellm serve` on this backend takes requests one at a time
    # (parallel 1); per-conversation KV reuse still works through saved states (seq_state / seq_restore).
    @property
    def n_seq(self) -> int:
        return 1

    def decode_batch(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
                     outputs: Sequence[bool]) -> None:
        if any(s != 0 for s in seqs) or list(positions) != list(range(self._n_past, self._n_past + len(tokens))):
            raise BackendError("the onnxruntime backend holds one sequence: tokens must continue it in order")
        rows = [i for i, keep in enumerate(outputs) if keep]
        if not rows:
            self.eval(tokens)
            self._rows = {}
        elif rows == [len(tokens) - 1]:
            self.eval(tokens)
            self._rows = {rows[0]: self._last}
        else:
            logits = self.eval_all_logits(tokens)
            self._rows = {r: logits[r] for r in rows}

    def _kept_row(self, index: int) -> np.ndarray:
        rows = getattr(self, "_rows", {})
        if index not in rows:
            raise UsageError(f"no logits were kept for batch row {index}")
        return rows[index]

    def argmax_at(self, index: int) -> int:
        return int(self._kept_row(index).argmax())

    def make_sampler(self, config: SamplerConfig, history: Sequence[int] = ()) -> NumpySampler:
        return NumpySampler(config, history)

    def free_sampler(self, chain: object) -> None:
        pass

    def sample_at(self, chain: NumpySampler, index: int) -> int:
        return chain.sample(self._kept_row(index))

    def _only(self, seq: int) -> None:
        if seq != 0:
            raise BackendError(f"the onnxruntime backend holds one sequence, not sequence {seq}")

    def seq_state(self, seq: int) -> bytes:
        self._only(seq)
        return self.save_state()

    def seq_remove(self, seq: int, start: int = 0) -> None:
        self._only(seq)
        self.truncate(min(start, self._n_past))

    def seq_restore(self, seq: int, data: bytes, n_tokens: int | None = None) -> None:
        self._only(seq)
        if n_tokens is None:
            _, heads, _, dim = self._kv_shape
            n_tokens = len(data) // (len(self._past) * heads * dim * 4)
        self.load_state(data, n_tokens)

    def close(self) -> None:
        self._kv, self._arrays = [], []
        self.session = None
