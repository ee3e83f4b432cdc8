"""llama.cpp backend (CPU SIMD, Metal) through llama-cpp-python's low-level bindings.

We drive llama.cpp directly rather than through `llama_cpp.Llama`: its high-level loop copies
every logits row into numpy and samples in Python, which costs small models ~15% of decode speed.
Here the sampler chain is llama.cpp's own and logits are copied only when asked for.
"""
from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm.errors import BackendError, ContextOverflowError, InsufficientMemoryError, InvalidModelError, UsageError

from .base import Capabilities, SamplerConfig
from .llama_context import KV_TYPES, create_context
from .llama_lib import init_native_logging
from .llama_lib import llama as _llama
from .llama_state import for_streams, one_stream
from .llama_tokenize import tokenize_vocab

CELL_PAD = 256  # llama.cpp rounds a sequence's context up to a multiple of this
FIRST_CELLS = 256  # a growing context's first size (see LlamaCppBackend._fit)


@dataclass(frozen=True)
class LlamaOptions:
    n_ctx: int = 4096
    threads: int = 4
    threads_batch: int | None = None
    gpu_layers: int = 0
    flash_attn: bool | None = None  # None = llama.cpp decides
    kv_type: str = "f16"
    n_batch: int = 2048
    n_ubatch: int = 512
    use_mmap: bool = True
    n_seq: int = 1  # sequences, each with its own n_ctx-cell KV stream (the server's parallel slots)
    rpc: tuple[str, ...] = ()  # llama.cpp RPC workers ("host:port") that hold the model's layers
    kv_grow: bool = True  # one CPU sequence: allocate KV cells as the conversation grows (LlamaCppBackend._fit)

    def __post_init__(self) -> None:
        if self.kv_type not in KV_TYPES:
            raise UsageError(f"unknown KV-cache type {self.kv_type!r}; choose from {', '.join(KV_TYPES)}")
        if self.n_ctx < 16:
            raise UsageError("context size must be at least 16 tokens")
        if self.threads < 1:
            raise UsageError("threads must be ≥ 1")
        if self.n_seq < 1:
            raise UsageError("the number of parallel sequences must be ≥ 1")


class LlamaCppBackend:
    """One llama.cpp model + context; the Session drives sequence 0, the server's engine drives
    sequences 0..n_seq-1 through `decode_batch` and the `seq_*` methods."""

    name = "llama.cpp"

    def __init__(self, path: Path, options: LlamaOptions, *, device: str = "cpu", fingerprint: str = "") -> None:
        init_native_logging()
        ll = self._ll = _llama()
        self.options = options
        self.device = device
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = options.gpu_layers
        mparams.use_mmap = options.use_mmap
        self._rpc_devices = None
        if options.rpc:
            from .rpc import rpc_devices

            self._rpc_devices = rpc_devices(options.rpc)  # NULL-terminated; must outlive the model
            mparams.devices = ctypes.cast(self._rpc_devices, ctypes.c_void_p)
            mparams.n_gpu_layers = -1  # every layer on the workers; the host keeps the input embeddings
        self._model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise InvalidModelError(f"{path}: llama.cpp could not load the model (run with --verbose for its log)")
        n_ctx_train = ll.llama_model_n_ctx_train(self._model)
        n_ctx = min(options.n_ctx, n_ctx_train) if n_ctx_train > 0 else options.n_ctx
        self._n_ctx = -(-n_ctx // CELL_PAD) * CELL_PAD  # llama.cpp pads a sequence's context to 256 cells
        # One CPU sequence: the KV cache starts small and grows with the conversation (see _fit).
        self._kv_grow = options.n_seq == 1 and not options.rpc and device == "cpu" and options.kv_grow
        arch = self.metadata("general.architecture") or ""
        orig = self.metadata(f"{arch}.rope.scaling.original_context_length") or ""
        if orig.isdigit() and int(orig) < self._n_ctx:
            # llama.cpp picks LongRoPE's long or short factors by the context size (Phi-3.5, Phi-4-mini): a
            # context that grew past the original length would rope new keys unlike the carried ones
            self._kv_grow = False
        self._n_stream = options.n_seq
        try:
            self._use_context(*create_context(ll, self._model, options,
                                              min(self._n_ctx, FIRST_CELLS) if self._kv_grow else self._n_ctx))
        except BackendError:
            ll.llama_model_free(self._model)
            self._model = None
            raise
        self._vocab = ll.llama_model_get_vocab(self._model)
        self._n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        self._n_past = 0
        self._one = (ll.llama_token * 1)()
        self._piece_buf = ctypes.create_string_buffer(256)
        self._piece_cache: dict[int, bytes] = {}
        self._sampler = None
        self._rows_batch, self._rows_cap = None, 0  # eval_rows' batch, kept
        self.fingerprint = fingerprint
        self.capabilities = Capabilities(kv_state=True, logits=True, gpu=options.gpu_layers != 0,
                                         extra={"kv_type": options.kv_type})

    def _use_context(self, ctx, n_batch: int) -> None:
        self._ctx, self._n_batch = ctx, n_batch
        self._mem = self._ll.llama_get_memory(ctx)
        self._cells = self._ll.llama_n_ctx_seq(ctx)

    def _fit(self, n_tokens: int) -> None:
        """Make room for n_tokens (≤ n_ctx) positions of sequence 0, growing the context if needed.

        Why: without flash attention llama.cpp keeps V transposed, one row per channel with as many
        cells as the context has, so each decode step reads rows `cells` apart; at 4096 cells a short
        chat decodes ~5 % slower than in a context sized to it (benchmarks/decode_context.py), and the
        whole cache is allocated and zeroed up front. So a CPU session starts at FIRST_CELLS and
        doubles (a power of two ≥ the need, capped at n_ctx), carrying the sequence's cells over.
        Powers of two ≥ 256 keep llama.cpp's attention width (n_kv: the used cells padded to 256)
        what it is in the full context, and a batch never runs in a context smaller than itself, so
        batches split into the same ubatches: outputs are the same as in the full-size context.
        """
        if not self._kv_grow or n_tokens <= self._cells:
            return
        old, ll = self._cells, self._ll
        state = self.seq_state(0) if ll.llama_memory_seq_pos_max(self._mem, 0) >= 0 else None
        # the new context is made and filled before the old one goes: a failure keeps the conversation as it was
        try:
            ctx, n_batch = create_context(ll, self._model, self.options,
                                          min(max(old * 2, 1 << (n_tokens - 1).bit_length()), self._n_ctx))
        except BackendError as e:
            raise InsufficientMemoryError(f"{e}: the KV cache stays at {old} cells") from None
        if state is not None:
            buf = for_streams(state, self._n_stream)
            if ll.llama_state_seq_set_data(ctx, buf, len(buf), 0) == 0:
                ll.llama_free(ctx)
                raise BackendError("llama.cpp could not carry the KV cache into a larger context; it stays at "
                                   f"{old} cells")
        ll.llama_free(self._ctx)
        self._use_context(ctx, n_batch)

    def _make_room(self, n_new: int) -> None:
        """Refuse n_new more tokens past n_ctx (ContextOverflowError), else make the cells for them."""
        if self._n_past + n_new > self._n_ctx:
            raise ContextOverflowError(f"{self._n_past + n_new} tokens do not fit the {self._n_ctx}-token context")
        self._fit(self._n_past + n_new)

    @property
    def kv_cells(self) -> int:
        """KV cells allocated now (≤ n_ctx; grows with the conversation on the CPU)."""
        return self._cells

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

    @property
    def n_seq(self) -> int:
        return self.options.n_seq

    def metadata(self, key: str) -> str | None:
        ll = self._ll
        size = ll.llama_model_meta_val_str(self._model, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        ll.llama_model_meta_val_str(self._model, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8", errors="replace")

    def model_size(self) -> int:
        return int(self._ll.llama_model_size(self._model))

    def n_params(self) -> int:
        return int(self._ll.llama_model_n_params(self._model))

    # -- tokens ------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        return tokenize_vocab(self._ll, self._vocab, text, add_special, parse_special)

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token stands for; control tokens render empty unless `special`."""
        piece = None if special else self._piece_cache.get(token)
        if piece is None:
            # special pieces get their own buffer: the server renders templates on its HTTP thread
            # while the engine thread decodes pieces into the shared one
            buf = ctypes.create_string_buffer(256) if special else self._piece_buf
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, 256, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._ll.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
            piece = buf.raw[:n]
            if not special:
                self._piece_cache[token] = piece
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._ll.llama_vocab_is_eog(self._vocab, token))

    def special_token(self, which: str) -> int | None:
        fn = {"bos": "llama_vocab_bos", "eos": "llama_vocab_eos", "eot": "llama_vocab_eot"}[which]
        tok = getattr(self._ll, fn)(self._vocab)
        return None if tok < 0 else int(tok)

    def add_bos(self) -> bool:
        return bool(self._ll.llama_vocab_get_add_bos(self._vocab))

    # -- evaluation --------------------------------------------------------------------------
    def eval(self, tokens: Sequence[int]) -> None:
        ll = self._ll
        self._make_room(len(tokens))
        for start in range(0, len(tokens), self._n_batch):
            chunk = tokens[start:start + self._n_batch]
            if len(chunk) == 1:
                self._one[0] = chunk[0]
                arr = self._one
            else:
                arr = (ll.llama_token * len(chunk))(*chunk)
            rc = ll.llama_decode(self._ctx, ll.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                self.truncate(self._n_past)  # drop whatever the failed batch left behind
                if rc == 1:
                    raise ContextOverflowError("no room left in the KV cache for this batch")
                raise BackendError(f"llama_decode failed with code {rc}")
            self._n_past += len(chunk)

    def eval_all_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Append tokens and return the logits of every one of them (n, n_vocab), for evaluation."""
        ll = self._ll
        self._make_room(len(tokens))
        out = np.empty((len(tokens), self._n_vocab), dtype=np.float32)
        batch = ll.llama_batch_init(self._n_batch, 0, 1)
        try:
            for start in range(0, len(tokens), self._n_batch):
                chunk = tokens[start:start + self._n_batch]
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = self._n_past + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1
                batch.n_tokens = len(chunk)
                rc = ll.llama_decode(self._ctx, batch)
                if rc != 0:
                    self.truncate(self._n_past)
                    raise BackendError(f"llama_decode failed with code {rc}")
                ptr = ll.llama_get_logits(self._ctx)
                out[start:start + len(chunk)] = np.ctypeslib.as_array(ptr, shape=(len(chunk), self._n_vocab))
                self._n_past += len(chunk)
        finally:
            ll.llama_batch_free(batch)
        return out

    def eval_rows(self, tokens: Sequence[int]) -> np.ndarray:
        """Append a few tokens in one batch with logits for every one of them: a read-only (n, n_vocab)
        view of llama.cpp's logits buffer, valid until the next evaluation (speculative verification)."""
        ll = self._ll
        n = len(tokens)
        self._make_room(n)
        if n > self._rows_cap:
            if self._rows_batch is not None:
                ll.llama_batch_free(self._rows_batch)
            self._rows_batch, self._rows_cap = ll.llama_batch_init(max(n, 16), 0, 1), max(n, 16)
        batch = self._rows_batch
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, self._n_past + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, 1
        batch.n_tokens = n
        rc = ll.llama_decode(self._ctx, batch)
        if rc != 0:
            self.truncate(self._n_past)
            if rc == 1:
                raise ContextOverflowError("no room left in the KV cache for this batch")
            raise BackendError(f"llama_decode failed with code {rc}")
        self._n_past += n
        rows = np.ctypeslib.as_array(ll.llama_get_logits(self._ctx), shape=(n, self._n_vocab))
        rows.flags.writeable = False
        return rows

    def accept_tokens(self, tokens: Sequence[int]) -> None:
        """Tokens chosen outside the native sampler (speculative verification): they join its
        repetition-penalty window, as a token it had sampled itself would."""
        if self._sampler is not None:
            for tok in tokens:
                self._ll.llama_sampler_accept(self._sampler, tok)

    def reset_sampler(self, config: SamplerConfig, history: Sequence[int] = ()) -> None:
        if self._sampler is not None:
            self._ll.llama_sampler_free(self._sampler)
        self._sampler = self.make_sampler(config, history)

    def make_sampler(self, config: SamplerConfig, history: Sequence[int] = ()):
        """A native sampler chain for `config` (free it with `free_sampler`)."""
        ll = self._ll
        sparams = ll.llama_sampler_chain_default_params()
        sparams.no_perf = True
        chain = ll.llama_sampler_chain_init(sparams)
        if config.repeat_penalty != 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(
                self._n_vocab, config.repeat_last_n, config.repeat_penalty, 0.0, 0.0))
        if config.greedy:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            if config.top_k > 0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(config.top_k))
            if config.top_p < 1.0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(config.top_p, 1))
            if config.min_p > 0.0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(config.min_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(config.temperature))
            seed = config.seed if config.seed is not None else 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: random
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        if config.repeat_penalty != 1.0:
            for tok in history[-config.repeat_last_n:] if config.repeat_last_n else ():
                ll.llama_sampler_accept(chain, tok)
        return chain

    def free_sampler(self, chain) -> None:
        self._ll.llama_sampler_free(chain)

    def sample(self, config: SamplerConfig) -> int:
        if config.greedy and config.repeat_penalty == 1.0:
            # Greedy without penalties is an argmax over the logits row, read in place (~7 µs);
            # llama.cpp's greedy sampler first fills a 49k-entry candidate array (~110 µs per token).
            # Ties go to the lowest id, as in llama.cpp's greedy sampler.
            ptr = self._ll.llama_get_logits_ith(self._ctx, -1)
            return int(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).argmax())
        if self._sampler is None:
            self.reset_sampler(config)
        return int(self._ll.llama_sampler_sample(self._sampler, self._ctx, -1))

    def logits(self) -> np.ndarray:
        ptr = self._ll.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    # -- KV state ----------------------------------------------------------------------------
    def truncate(self, n: int) -> None:
        if n < 0 or n > self._n_past:
            raise UsageError(f"cannot truncate the KV cache to {n} tokens (it holds {self._n_past})")
        if n == 0:
            self._ll.llama_memory_clear(self._mem, True)
        elif not self._ll.llama_memory_seq_rm(self._mem, 0, n, -1):
            raise BackendError("llama.cpp could not truncate the KV cache")
        self._n_past = n

    def save_state(self) -> bytes:
        return self.seq_state(0)

    def seq_state(self, seq: int) -> bytes:
        """Sequence `seq`'s KV state, copied once (a full-context state is as large as its KV cache)."""
        ll = self._ll
        size = ll.llama_state_seq_get_size(self._ctx, seq)
        buf = bytearray(size)
        written = ll.llama_state_seq_get_data(self._ctx, (ctypes.c_uint8 * size).from_buffer(buf), size, seq)
        del buf[written:]
        # a bytearray: bytes-like for every consumer, without a second full copy; one-stream form (see
        # _SEQ_HEAD) so it restores into any slot of any context of this model
        return one_stream(buf)

    def load_state(self, data: bytes, n_tokens: int) -> None:
        ll = self._ll
        if n_tokens > self._n_ctx:
            raise ContextOverflowError(f"a saved state of {n_tokens} tokens does not fit the "
                                       f"{self._n_ctx}-token context")
        ll.llama_memory_clear(self._mem, True)
        self._n_past = 0
        self._fit(n_tokens)
        buf = for_streams(data, self._n_stream)
        if ll.llama_state_seq_set_data(self._ctx, buf, len(buf), 0) == 0:
            ll.llama_memory_clear(self._mem, True)
            raise BackendError("llama.cpp rejected the saved KV state")
        self._check_restored(0, n_tokens)
        self._n_past = n_tokens

    def _check_restored(self, seq: int, n_tokens: int | None) -> None:
        """llama.cpp accepts a well-framed state with no cells (or other cells) without complaint: the
        restored positions must be exactly 0..n_tokens-1, or the KV cache and the tokens disagree."""
        if n_tokens is None:
            return
        top = self._ll.llama_memory_seq_pos_max(self._mem, seq)
        if top != n_tokens - 1:
            self.seq_remove(seq)
            raise BackendError(f"the saved KV state holds positions up to {top}, not the {n_tokens} tokens it "
                               "was saved with")

    # -- several sequences in one batch (the server's continuous batching) -------------------
    def decode_batch(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
                     outputs: Sequence[bool]) -> None:
        """Evaluate tokens of several sequences in one llama_decode (logits kept where `outputs`)."""
        ll = self._ll
        n = len(tokens)
        if n:
            self._fit(max(positions) + 1)
        batch = ll.llama_batch_init(n, 0, 1)
        try:
            for i in range(n):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tokens[i], positions[i], 1
                batch.seq_id[i][0], batch.logits[i] = seqs[i], bool(outputs[i])
            batch.n_tokens = n
            rc = ll.llama_decode(self._ctx, batch)
        finally:
            ll.llama_batch_free(batch)
        if rc == 1:
            raise ContextOverflowError("no room left in the KV cache for this batch")
        if rc != 0:
            raise BackendError(f"llama_decode failed with code {rc}")

    def argmax_at(self, index: int) -> int:
        """Greedy pick from the logits of batch row `index` (read in place, as in `sample`)."""
        ptr = self._ll.llama_get_logits_ith(self._ctx, index)
        return int(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).argmax())

    def sample_at(self, chain, index: int) -> int:
        return int(self._ll.llama_sampler_sample(chain, self._ctx, index))

    def seq_remove(self, seq: int, start: int = 0) -> None:
        """Drop positions ≥ start of sequence `seq` (all of it with start=0)."""
        if not self._ll.llama_memory_seq_rm(self._mem, seq, start, -1):
            raise BackendError(f"llama.cpp could not truncate sequence {seq}")

    def seq_restore(self, seq: int, data: bytes, n_tokens: int | None = None) -> None:
        """Replace sequence `seq` with a state from `seq_state` (of any sequence) holding n_tokens."""
        ll = self._ll
        if n_tokens is not None and n_tokens > self._n_ctx:
            raise ContextOverflowError(f"a saved state of {n_tokens} tokens does not fit the "
                                       f"{self._n_ctx}-token context")
        self.seq_remove(seq)
        self._fit(self._n_ctx if n_tokens is None else n_tokens)
        buf = for_streams(data, self._n_stream)
        if ll.llama_state_seq_set_data(self._ctx, buf, len(buf), seq) == 0:
            self.seq_remove(seq)
            raise BackendError("llama.cpp rejected the saved KV state")
        self._check_restored(seq, n_tokens)

    def close(self) -> None:
        ll = self._ll
        if self._sampler is not None:
            ll.llama_sampler_free(self._sampler)
            self._sampler = None
        if getattr(self, "_rows_batch", None) is not None:
            ll.llama_batch_free(self._rows_batch)
            self._rows_batch = None
        if getattr(self, "_ctx", None):
            ll.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            ll.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass
