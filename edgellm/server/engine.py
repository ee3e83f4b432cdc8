"""The server's one inference thread: requests advance together, token by token, on llama.cpp sequences.

Every step, each active request gets its next token evaluated (or its next prompt chunk), so a new
request starts at the next step instead of waiting for whole answers ahead of it (fair time to first
token), and a client's stream never waits for another's to end. Two ways to run a step:
- batched (default, `batch=True`; llama-server's continuous batching): one llama_decode over all
  sequences' tokens. The weights are read once per step, so the aggregate speed grows with the number
  of clients, but llama.cpp's CPU kernels round differently at other batch sizes, so a greedy answer
  can differ from the single-client one where two tokens are nearly tied (llama-server behaves alike).
  Isolation does not depend on it: each sequence attends only to its own KV stream.
- exact (`batch=False`): one llama_decode per sequence (QUANTUM tokens in a row). Each sequence has its
  own KV stream, so its numbers are exactly those of a single-client run: greedy answers are identical
  whatever else runs. Aggregate decode speed is at most one client's (each token costs one decode).
  Exact mode also makes answers independent of what the prefix cache holds: see ALIGN.
`parallel=1` serves one request at a time.

KV reuse per conversation: each slot is a sequence that keeps the tokens of its last request. A new
request takes the idle slot whose tokens share the longest prefix with its prompt or — when a snapshot
shares more — restores that snapshot into the least recently used idle slot. Snapshots are the session's
in-memory PrefixCache (stashed slots; a slot's contents are stashed before being overwritten) and the
pinned states (the default system prompt's, shipped with `cache-prompt` or computed at start-up), which
the LRU never evicts.

All llama.cpp calls happen on the engine thread; the HTTP side talks to it through `submit` and the
`emit` callback of each request.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BackendError, ContextOverflowError, EdgeLLMError
from ..runtimes.base import BatchBackend, SamplerConfig
from ..runtimes.kv_cache import PrefixCache, SavedState, common_prefix
from ..session import STASH_MIN_TOKENS, Session
from ..textstream import TextAssembler

# Exact mode decodes this many tokens of one sequence before moving to the next. llama.cpp reuses
# its compute graph between decodes only while the same sequences take part (llama-graph.h,
# allow_reuse), so switching sequence on every token would rebuild the graph every token; a quantum of
# 4 keeps 3 in 4 decodes on the reused graph and delays others by at most 4 tokens per active request.
QUANTUM = 4

# Exact mode evaluates prompts in chunks that start at multiples of ALIGN positions, each chunk its own
# llama_decode, and keeps (in slots and snapshots) only cells computed in such full chunks. llama.cpp's CPU
# kernels round a token differently in a batch of another size (a prompt's last token evaluated alone
# does not give the logits it gets inside the prompt's batch; a generated token is evaluated alone, the
# same token inside a later prompt is not), so without this a prefix-cache hit moves where batches split
# and a greedy answer can change. With it, every cell a request reads was computed by the same chunk of
# the same tokens as in a cold run: the answer is the cold single-client answer bit for bit, warm or cold.
# The price is reuse: up to ALIGN - 1 prompt tokens and a previous answer are evaluated again. 64 keeps
# that small; prefill in 64-token batches runs near llama.cpp's full-batch speed on a CPU.
ALIGN = 64


class QueueFullError(EdgeLLMError):
    """The request queue is full (HTTP 503)."""

    exit_code = 13


class ShuttingDownError(QueueFullError):
    """The server is stopping and takes no new requests (HTTP 503)."""


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    config: SamplerConfig
    emit: Callable[[str, Any], None]  # ('piece', text) ... then ('done', Request) or ('error', EdgeLLMError)
    stops: tuple[str, ...] = ()
    deadline: float | None = None  # time.monotonic() after which the request is cut off
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False  # set by the HTTP side when the client goes away
    asked: bool = False  # the client asked to stop it (POST /v1/edgellm/cancel/ID): an answer, not an error
    # filled in by the engine
    out: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # 'stop' | 'length' | 'cancelled' | 'timeout' | 'error'
    reused_tokens: int = 0
    cache_source: str | None = None
    t_submit: float = field(default_factory=time.monotonic)
    t_first: float = 0.0
    t_done: float = 0.0

    @property
    def need(self) -> int:
        return len(self.prompt) + self.max_tokens


@dataclass
class Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)  # exactly what this sequence's KV cells hold
    req: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet evaluated
    next_token: int | None = None  # sampled, to be evaluated in the next step
    sampler: Any = None
    text: TextAssembler | None = None
    last_used: float = 0.0
    canon: int = 0  # exact mode: leading cells computed in full ALIGN-aligned prompt chunks (reusable)


class Engine:
    """Schedules requests onto `parallel` llama.cpp sequences of `session`'s backend.

    The engine owns the backend from `start()` on: don't use the session to generate meanwhile.
    """

    def __init__(self, session: Session, *, parallel: int = 4, max_queue: int = 16, step_tokens: int = 512,
                 batch: bool = True, pinned: tuple[SavedState, ...] = ()) -> None:
        be = session.backend
        if not isinstance(be, BatchBackend):
            raise BackendError(f"edgellm serve needs the llama.cpp backend (a GGUF model); "
                               f"this model runs on {be.name}")
        n_seq = be.n_seq
        if parallel > n_seq:
            raise BackendError(f"the backend holds {n_seq} sequences; load with parallel={parallel}")
        self.session, self.backend = session, be
        self.pool = be.n_ctx  # per slot: each sequence has its own KV stream
        self.max_queue = max_queue
        self.batch = batch
        self.pinned = pinned
        self.step_tokens = max(parallel, step_tokens)
        self.slots = [Slot(seq) for seq in range(parallel)]
        self.queue: deque[Request] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.stats = {"requests": 0, "steps": 0, "batched_tokens": 0, "rejected": 0}
        self.align = 1 if batch else ALIGN

    # -- the HTTP side -------------------------------------------------------------------------
    def start(self) -> Engine:
        self.session.reset()  # from here on every sequence is the engine's
        if not self.batch:
            self._canonical_start()
        self._thread = threading.Thread(target=self._loop, name="edgellm-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, req: Request) -> None:
        if req.need > self.pool:
            raise ContextOverflowError(
                f"the prompt is {len(req.prompt)} tokens and max_tokens is {req.max_tokens}: "
                f"{req.need} tokens do not fit the {self.pool}-token context")
        with self._cv:
            if self._closing:
                raise ShuttingDownError("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            self.queue.append(req)
            self.stats["requests"] += 1
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    @property
    def busy(self) -> int:
        return sum(s.req is not None for s in self.slots)

    def close(self, drain_s: float = 0.0) -> None:
        """Stop taking requests; let admitted and queued ones finish for up to drain_s, cancel the rest."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        end = time.monotonic() + drain_s
        while time.monotonic() < end and (self.queue or self.busy):
            time.sleep(0.02)
        with self._cv:
            for r in [*self.queue, *(s.req for s in self.slots if s.req)]:
                r.cancelled = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _canonical_start(self) -> None:
        """Exact mode: what the session cached was evaluated in batches of other sizes, so forget it, and
        evaluate the pinned states' aligned part again as a cold request would (a shipped state's rounding
        depends on how it was made); the rest of a system prompt is evaluated by each request."""
        self.session.memory_cache = PrefixCache(self.session.memory_cache.max_bytes)
        pinned = []
        slot = self.slots[0]
        for saved in self.pinned:
            n = len(saved.tokens) // ALIGN * ALIGN
            if n == 0:
                continue
            self._prefill(slot, saved.tokens[:n], logits=False)
            pinned.append(SavedState(saved.tokens[:n], self.backend.seq_state(slot.seq), saved.source))
            self.backend.seq_remove(slot.seq)
            slot.tokens, slot.canon = [], 0
        self.pinned = tuple(pinned)

    # -- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self.queue or self.busy):
                    if self._closing:
                        return
                    self._cv.wait()
            now = time.monotonic()
            self._expire_queued(now)
            for slot in self.slots:
                if slot.req is not None and (slot.req.cancelled or _late(slot.req, now)):
                    self._finish(slot, "cancelled" if slot.req.cancelled else "timeout")
            self._admit()
            if self.busy:
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
                    self._fail_active(e)

    def _expire_queued(self, now: float) -> None:
        with self._cv:
            gone = [r for r in self.queue if r.cancelled or _late(r, now)]
            for r in gone:
                self.queue.remove(r)
        for r in gone:
            r.finish_reason = "cancelled" if r.cancelled else "timeout"
            r.t_done = now
            r.emit("done", r)

    def _admit(self) -> None:
        while True:
            with self._cv:
                if not self.queue:
                    return
                req = self.queue[0]
            idle = [s for s in self.slots if s.req is None]
            if not idle:
                return
            with self._cv:
                self.queue.popleft()
            try:
                self._assign(req, idle)
            except Exception as e:  # noqa: BLE001 - fail this request, keep serving
                for slot in idle:  # whichever slot it touched may hold a partial state: forget them all
                    slot.req, slot.sampler, slot.text, slot.pending, slot.next_token = None, None, None, [], None
                    with contextlib.suppress(EdgeLLMError):
                        self.backend.seq_remove(slot.seq)
                    slot.tokens = []
                req.finish_reason, req.t_done = "error", time.monotonic()
                req.emit("error", e if isinstance(e, EdgeLLMError) else BackendError(f"inference failed: {e}"))

    def _evict(self, slot: Slot) -> None:
        if len(slot.tokens) >= STASH_MIN_TOKENS:
            self.session.memory_cache.put(slot.tokens, self.backend.seq_state(slot.seq))
        self.backend.seq_remove(slot.seq)
        slot.tokens = []

    def _assign(self, req: Request, idle: list[Slot]) -> None:
        limit = len(req.prompt) - 1  # evaluate at least one token so there are fresh logits
        slot = _best_slot(idle, req.prompt)
        reuse, source = common_prefix(slot.tokens, req.prompt), "slot"
        found = self._snapshot(req.prompt, reuse)
        restored = False
        if found is not None and min(found[1], limit) > min(reuse, limit):
            saved, shared = found
            slot = min(idle, key=lambda s: (len(s.tokens) > 0, s.last_used))
            self._evict(slot)
            try:
                self.backend.seq_restore(slot.seq, saved.state, len(saved.tokens))
                slot.tokens, reuse, source, restored = list(saved.tokens), shared, saved.source, True
            except EdgeLLMError:  # no room for the whole snapshot: evaluate the prompt instead
                reuse = 0
        reuse = min(reuse, limit) // self.align * self.align
        slot.canon = reuse
        if reuse < len(slot.tokens):
            # keep it for the conversation that comes back to it (a restored snapshot is kept already)
            if len(slot.tokens) >= STASH_MIN_TOKENS and not restored:
                self.session.memory_cache.put(slot.tokens, self.backend.seq_state(slot.seq))
            self.backend.seq_remove(slot.seq, reuse)
            del slot.tokens[reuse:]
        req.reused_tokens, req.cache_source = reuse, source if reuse else None
        slot.req, slot.pending, slot.next_token = req, req.prompt[reuse:], None
        slot.text = TextAssembler(req.stops)
        # the repetition penalty's window starts with the prompt, as in Session.generate and llama-server
        # (a sampler without it would penalise only the tokens generated since)
        plain_greedy = req.config.greedy and req.config.repeat_penalty == 1.0
        slot.sampler = None if plain_greedy else self.backend.make_sampler(req.config, req.prompt)

    def _snapshot(self, prompt: list[int], better_than: int) -> tuple[SavedState, int] | None:
        """The stashed or pinned state sharing the longest prefix with `prompt` (if > better_than)."""
        found = self.session.memory_cache.best(prompt, better_than)
        for saved in self.pinned:
            shared = common_prefix(saved.tokens, prompt)
            if shared > (found[1] if found else better_than):
                found = (saved, shared)
        return found

    def _step(self) -> None:
        """Decoding slots' next tokens, then prompt chunks as far as the step's token budget goes."""
        work: list[tuple[Slot, list[int], bool]] = []  # slot, tokens to evaluate, wants logits
        for slot in self.slots:
            if slot.req is not None and slot.next_token is not None:
                work.append((slot, [slot.next_token], True))
        budget = self.step_tokens - len(work)
        for slot in self.slots:
            if slot.req is None or not slot.pending or budget <= 0:
                continue
            chunk = slot.pending[:self._chunk_len(slot, budget)]
            work.append((slot, chunk, len(chunk) == len(slot.pending)))
            budget -= len(chunk)
        if self.batch:
            self._decode(work)
            return
        for item in work:  # each sequence gets a quantum of tokens in a row: see QUANTUM
            slot, chunk, logits = item
            if slot.next_token is None:  # a prompt chunk: evaluated in aligned pieces, see ALIGN
                self._prefill(slot, chunk, logits)
                continue
            self._decode([item])
            for _ in range(QUANTUM - 1):
                if slot.req is None or slot.next_token is None or slot.req.cancelled:
                    break
                self._decode([(slot, [slot.next_token], True)])

    def _chunk_len(self, slot: Slot, budget: int) -> int:
        """How much of slot's pending prompt this step evaluates: the budget, and in exact mode cut at a
        multiple of ALIGN (at least to the next one), so the budget never moves where pieces split."""
        if self.batch or budget >= len(slot.pending):
            return budget
        base = len(slot.tokens)
        end = (base + budget) // ALIGN * ALIGN
        return max(end, (base // ALIGN + 1) * ALIGN) - base

    def _prefill(self, slot: Slot, chunk: list[int], logits: bool) -> None:
        """Exact mode: evaluate `chunk` (continuing slot's tokens) in pieces that end at multiples of ALIGN,
        one llama_decode each; a full piece that continues the canonical cells extends them."""
        done = 0
        while done < len(chunk):
            base = len(slot.tokens)
            piece = chunk[done:done + ALIGN - base % ALIGN]
            done += len(piece)
            if len(piece) == ALIGN and slot.canon == base:
                slot.canon = base + ALIGN  # before the decode: a request ending on this token truncates to it
            self._decode([(slot, piece, logits and done == len(chunk))])

    def _decode(self, group: list[tuple[Slot, list[int], bool]]) -> None:
        toks: list[int] = []
        pos: list[int] = []
        seqs: list[int] = []
        outs: list[bool] = []
        rows = []
        for slot, chunk, logits in group:
            base = len(slot.tokens)
            toks += chunk
            pos += range(base, base + len(chunk))
            seqs += [slot.seq] * len(chunk)
            outs += [False] * (len(chunk) - 1) + [logits]
            rows.append(len(toks) - 1 if logits else -1)
        self.backend.decode_batch(toks, pos, seqs, outs)
        self.stats["steps"] += 1
        self.stats["batched_tokens"] += len(toks)
        for (slot, chunk, _), row in zip(group, rows):
            slot.tokens.extend(chunk)
            del slot.pending[:len(chunk) if slot.pending else 0]
            slot.next_token = None
            if row >= 0:
                self._take(slot, row)

    def _take(self, slot: Slot, row: int) -> None:
        req, be = slot.req, self.backend
        assert req is not None and slot.text is not None
        tok = be.argmax_at(row) if slot.sampler is None else be.sample_at(slot.sampler, row)
        if not req.out and not req.t_first:
            req.t_first = time.monotonic()
        if be.is_eog(tok):
            return self._finish(slot, "stop")
        req.out.append(tok)
        piece = slot.text.push(be.token_bytes(tok))
        if piece:
            req.emit("piece", piece)
        if slot.text.stopped:
            self._finish(slot, "stop")
        elif len(req.out) >= req.max_tokens:
            self._finish(slot, "length")
        else:
            slot.next_token = tok

    def _finish(self, slot: Slot, reason: str, error: EdgeLLMError | None = None) -> None:
        req = slot.req
        assert req is not None
        if slot.text is not None and reason in ("stop", "length"):
            rest = slot.text.flush()
            if rest:
                req.emit("piece", rest)
        req.text = slot.text.text if slot.text is not None else ""
        if not self.batch and len(slot.tokens) > slot.canon:
            # exact mode keeps only what a cold request would compute alike (see ALIGN)
            with contextlib.suppress(EdgeLLMError):
                self.backend.seq_remove(slot.seq, slot.canon)
            del slot.tokens[slot.canon:]
        req.finish_reason, req.t_done = reason, time.monotonic()
        if slot.sampler is not None:
            self.backend.free_sampler(slot.sampler)
        slot.req, slot.sampler, slot.text, slot.pending, slot.next_token = None, None, None, [], None
        slot.last_used = req.t_done
        req.emit(*(("error", error) if error is not None else ("done", req)))

    def _fail_active(self, error: Exception) -> None:
        """A failed step leaves the batch's sequences in an unknown state: clear them, fail their requests."""
        err = error if isinstance(error, EdgeLLMError) else BackendError(f"inference failed: {error}")
        for slot in self.slots:
            if slot.req is None:
                continue
            self._finish(slot, "error", err)
            with contextlib.suppress(EdgeLLMError):
                self.backend.seq_remove(slot.seq)
            slot.tokens = []


def _best_slot(idle: list[Slot], prompt: list[int]) -> Slot:
    """The idle slot sharing the longest prefix with `prompt`; among equals the least recently used."""
    return max(idle, key=lambda s: (common_prefix(s.tokens, prompt), -s.last_used))


def _late(req: Request, now: float) -> bool:
    return req.deadline is not None and now > req.deadline
