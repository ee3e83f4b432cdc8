"""Core ML backend: edgellm's stateful packages behind the same protocol as llama.cpp and onnxruntime.

Two engines run the same package:
- `CoreMLToolsEngine` (macOS 15+ / iOS 18 runtime): coremltools' MLModel with the compute units the plan chose
  (Neural Engine first on Apple silicon), `make_state`, `predict(..., state=...)`; the KV cache lives in the
  model's `keyCache`/`valueCache` states, read and written through MLState.read_state / write_state.
- `MilEngine` (any OS): edgellm.runtimes.mil_interp executing the package's own MIL program in numpy — slow,
  but it runs the saved artifact, so `edgellm eval` and the tests check the real package off macOS.

The backend keeps the token bookkeeping: the number of cached positions is implied by the causal mask it
passes (end = past + q, the swift-transformers contract), so truncating the cache is free (later writes
overwrite the dropped positions, and the mask hides them until then). A saved state is the fp16 K/V rows
[0, n_past) of both states, so the session's prefix cache, disk cache and shipped prompt states work as
with the other backends.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import BackendError, ContextOverflowError, UsageError

from .base import Capabilities, SamplerConfig
from .coreml_package import check_package, load_spec, package_bytes, read_manifest
from .onnx_backend import OnnxTokenizer
from .sampling import NumpySampler

STATES = ("keyCache", "valueCache")
MASK_MIN = float(np.finfo(np.float16).min)   # what swift-transformers puts in masked positions (finite: no NaN rows)
COMPUTE_UNITS = {"ane": "ALL", "gpu": "CPU_AND_GPU", "cpu": "CPU_ONLY"}


class MilEngine:
    """The package's program run by edgellm's numpy MIL interpreter (a check of the artifact, not a fast path)."""

    name = "coreml-mil"
    SMALL = 16    # queries up to this many tokens run with one BLAS thread

    def __init__(self, package: Path, threads: int | None = None) -> None:
        from threadpoolctl import ThreadpoolController

        from .mil_interp import MilProgram

        self.program = MilProgram(package)
        self.threads = threads
        self._blas = ThreadpoolController()

    def new_state(self) -> dict[str, np.ndarray]:
        return self.program.new_state()

    def predict(self, ids: np.ndarray, mask: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        # A decode step is a chain of small matrix-vector products: one BLAS thread streams the weights as fast
        # as two here, and two spin-waiting threads collapse when the cores are shared (measured: 0.23 s vs
        # 0.75-1.5 s per SmolLM2 token on a busy 2-core machine). Prefill batches use the plan's threads.
        limit = 1 if ids.shape[-1] <= self.SMALL else self.threads
        with self._blas.limit(limits=limit, user_api="blas"):
            return self.program.run({"inputIds": ids, "causalMask": mask}, state)["logits"]

    def read_state(self, state: dict[str, np.ndarray], name: str) -> np.ndarray:
        return state[name]

    def write_state(self, state: dict[str, np.ndarray], name: str, value: np.ndarray) -> None:
        state[name] = np.ascontiguousarray(value, dtype=state[name].dtype)


class CoreMLToolsEngine:
    """Core ML itself through coremltools (macOS only): compiled once per load with the given compute units."""

    name = "coreml"

    def __init__(self, package: Path, compute_units: str = "ALL") -> None:
        from .coreml_package import coremltools

        ct = coremltools()
        try:
            self.model = ct.models.MLModel(str(package), compute_units=getattr(ct.ComputeUnit, compute_units))
        except Exception as e:  # noqa: BLE001 - Core ML reports compile/load failures as assorted exception types
            raise BackendError(f"Core ML could not load {package}: {str(e).splitlines()[0] if str(e) else e}") from None
        self.compute_units = compute_units

    def new_state(self):
        return self.model.make_state()

    def predict(self, ids: np.ndarray, mask: np.ndarray, state) -> np.ndarray:
        try:
            return self.model.predict({"inputIds": ids, "causalMask": mask}, state=state)["logits"]
        except Exception as e:  # noqa: BLE001 - Core ML prediction errors come as RuntimeError or its own types
            raise BackendError(f"Core ML failed to evaluate: {str(e).splitlines()[0] if str(e) else e}") from None

    def read_state(self, state, name: str) -> np.ndarray:
        return np.asarray(state.read_state(name))

    def write_state(self, state, name: str, value: np.ndarray) -> None:
        state.write_state(name, np.ascontiguousarray(value, dtype=np.float16))


def package_fingerprint(package: Path, engine: str, device: str) -> str:
    """The spec in full, the weights sampled, plus the engine and device (they change the numerics of a state)."""
    h = hashlib.sha256(f"{engine}|{device}".encode())
    for path in sorted(p for p in package.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(package)}|{size}".encode())
        with open(path, "rb") as f:
            for off in range(0, size, max(1, size // 16)):
                f.seek(off)
                h.update(f.read(65536))
    return h.hexdigest()


class CoreMLBackend:
    """One stateful Core ML model holding a single sequence."""

    def __init__(self, package: str | Path, engine: Any, *, n_ctx: int = 4096, fingerprint: str = "",
                 device: str = "ane", n_batch: int = 256) -> None:
        self.package = Path(package)
        check_package(self.package)
        self.spec = load_spec(self.package)
        self.facts = facts = read_manifest(self.spec, self.package)
        self.tokenizer = OnnxTokenizer(self.package.parent, facts)
        self.engine = engine
        self.name = engine.name
        self.device = device
        self._ctx_state = int(facts["context_length"])
        self._n_ctx = min(n_ctx, self._ctx_state)
        self._n_vocab = int(facts["vocab_size"])
        self._n_batch = max(1, n_batch)
        self._state = engine.new_state()
        self._n_past = 0
        self._last: np.ndarray | None = None
        self._sampler: NumpySampler | None = None
        self._eog = frozenset(facts.get("eog_ids", ()))
        self.fingerprint = fingerprint
        self.capabilities = Capabilities(kv_state=True, logits=True, gpu=device in ("ane", "gpu"), extra={
            "engine": engine.name, "quant": str(facts.get("quant")), "kv_type": "f16",
            "state_context": str(self._ctx_state)})

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
        return package_bytes(self.package)

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
    def _run(self, tokens: Sequence[int]) -> np.ndarray:
        """One chunk on top of the cache: logits (q, vocab) float32."""
        q, past = len(tokens), self._n_past
        if any(t < 0 or t >= self._n_vocab for t in tokens):
            raise UsageError(f"token ids must be in [0, {self._n_vocab})")
        mask = np.triu(np.full((q, past + q), MASK_MIN, np.float16), past + 1)[None, None]
        logits = self.engine.predict(np.asarray([tokens], np.int32), mask, self._state)
        self._n_past = past + q
        return np.asarray(logits, np.float32).reshape(q, -1)

    def _check_room(self, n: int) -> None:
        if self._n_past + n > self._n_ctx:
            raise ContextOverflowError(f"{self._n_past + n} tokens do not fit the {self._n_ctx}-token context")

    def eval(self, tokens: Sequence[int]) -> None:
        self._check_room(len(tokens))
        for start in range(0, len(tokens), self._n_batch):
            self._last = self._run(list(tokens[start:start + self._n_batch]))[-1]

    def eval_all_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Append tokens and return the logits of every one of them (n, n_vocab), for evaluation."""
        self._check_room(len(tokens))
        parts = [self._run(list(tokens[s:s + self._n_batch])) for s in range(0, len(tokens), self._n_batch)]
        self._last = parts[-1][-1]
        return np.concatenate(parts)

    def eval_rows(self, tokens: Sequence[int]) -> np.ndarray:
        """Append a few tokens with logits for every one of them (speculative verification)."""
        return self.eval_all_logits(tokens)

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
        if n != self._n_past:
            self._n_past = n      # the mask of the next call ends at n + q: positions ≥ n are hidden, then overwritten
            self._last = None

    def _state_bytes(self, n_tokens: int) -> int:
        c = self.facts
        return 2 * int(c["num_hidden_layers"]) * int(c["num_key_value_heads"]) * int(c["head_dim"]) * n_tokens * 2

    def save_state(self) -> bytes:
        return b"".join(np.ascontiguousarray(self.engine.read_state(self._state, s)[:, :, :, :self._n_past],
                                             np.float16).tobytes() for s in STATES)

    def load_state(self, data: bytes, n_tokens: int) -> None:
        if n_tokens > self._n_ctx:
            raise ContextOverflowError(f"a saved state of {n_tokens} tokens does not fit the {self._n_ctx}-token "
                                       "context")
        if len(data) != self._state_bytes(n_tokens):
            raise BackendError(f"the saved KV state has {len(data)} bytes, expected {self._state_bytes(n_tokens)} "
                               f"for {n_tokens} tokens of this model")
        c = self.facts
        shape = (int(c["num_hidden_layers"]), 1, int(c["num_key_value_heads"]), n_tokens, int(c["head_dim"]))
        half = len(data) // 2
        for i, name in enumerate(STATES):
            rows = np.frombuffer(data[i * half:(i + 1) * half], np.float16).reshape(shape)
            full = np.array(self.engine.read_state(self._state, name), np.float16)
            full[:, :, :, :n_tokens] = rows
            self.engine.write_state(self._state, name, full)
        self._n_past = n_tokens
        self._last = None

    def close(self) -> None:
        self._state = None
        self.engine = None


def open_engine(package: Path, device: str, threads: int | None = None) -> Any:
    """The engine for a plan device: 'interpreter' -> MilEngine, else Core ML with the matching compute units."""
    if device == "interpreter":
        return MilEngine(package, threads)
    if device not in COMPUTE_UNITS:
        raise UsageError(f"no Core ML compute units for device {device!r}")
    return CoreMLToolsEngine(package, COMPUTE_UNITS[device])
