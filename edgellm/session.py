"""The session layer, written once above every backend: prompts, chat templates, sampling settings,
KV-cache reuse (live context, in-memory LRU, disk), stop strings and streaming.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import chat_template
from . import speculative_loop as speculative
from .errors import BackendError, CacheError, ContextOverflowError, EdgeLLMError, UsageError
from .runtimes.base import GREEDY, Backend, SamplerConfig
from .runtimes.kv_cache import DiskCache, PrefixCache, SavedState, common_prefix, read_state_file, write_state_file
from .speculate import AUTO, EXACT_BATCHES, SpeculationConfig, speculation_from
from .textstream import TextAssembler

STASH_MIN_TOKENS = 32  # states shorter than this are cheaper to recompute than to keep


@dataclass
class Stats:
    prompt_tokens: int = 0
    reused_tokens: int = 0
    cache_source: str | None = None  # 'context' | 'memory' | 'disk' | None (cold)
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""  # 'eos' | 'stop' | 'length' | 'interrupted'
    drafted: int = 0  # prompt-lookup draft tokens verified (edgellm.speculate)
    accepted: int = 0  # of which the model agreed with

    @property
    def decode_tps(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s > 0 and self.generated_tokens > 1 else 0.0

    @property
    def prefill_tps(self) -> float:
        evaluated = self.prompt_tokens - self.reused_tokens
        return evaluated / self.prefill_s if self.prefill_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "decode_tps": round(self.decode_tps, 2), "prefill_tps": round(self.prefill_tps, 2)}


@dataclass
class Completion:
    text: str
    tokens: list[int]
    stats: Stats


class Stream(Iterator[str]):
    """Text pieces as they are generated; `completion` is available once the stream is exhausted."""

    def __init__(self, gen: Generator[str, None, Completion]) -> None:
        self._gen = gen
        self._completion: Completion | None = None

    def __next__(self) -> str:
        if self._completion is not None:
            raise StopIteration
        try:
            return next(self._gen)
        except StopIteration as stop:
            self._completion = stop.value
            raise

    @property
    def completion(self) -> Completion:
        for _ in self:
            pass
        assert self._completion is not None
        return self._completion

    def close(self) -> None:
        self._gen.close()


def sampler_from(sampler: SamplerConfig | None, overrides: dict[str, Any]) -> SamplerConfig:
    base = sampler or SamplerConfig()
    known = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(known) - set(SamplerConfig.__dataclass_fields__)
    if unknown:
        raise UsageError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    return replace(base, **known) if known else base


@dataclass
class Session:
    """A loaded model with its backend, ready to generate and chat (see `edgellm.load`)."""

    backend: Backend
    model_path: Path
    plan: Any = None
    template: str | None = None
    memory_cache: PrefixCache = field(default_factory=PrefixCache)
    disk_cache: DiskCache | None = None
    default_sampler: SamplerConfig = field(default_factory=SamplerConfig)
    tokens: list[int] = field(default_factory=list)  # exactly what the backend's KV cache holds
    last_stats: Stats | None = None
    optimized: Any = None  # the edgellm.optimize Decision that chose this backend, when one did
    speculation: SpeculationConfig = field(default_factory=lambda: AUTO)  # prompt-lookup decoding

    # -- text and tokens -----------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UsageError(f"the text is not valid Unicode (a lone surrogate at character {e.start})") from None
        add = self.backend.add_bos() and not self._starts_with_bos(text)
        return self.backend.tokenize(text, add_special=add, parse_special=special)

    def _starts_with_bos(self, text: str) -> bool:
        bos = self.backend.special_token("bos")
        if bos is None:
            return False
        bos_text = self.backend.token_bytes(bos, special=True).decode("utf-8", "replace")
        return bool(bos_text) and text.startswith(bos_text)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.backend.detokenize(tokens)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        return chat_template.render(self.template, messages, add_generation_prompt=add_generation_prompt,
                                    **self._special_texts())

    def chat_tokens(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """The prompt tokens of a chat: special tokens come only from the template's own text.

        Message content is the user's: a message containing `<|im_end|>` must not become a real turn
        boundary. Messages whose text tokenizes the same with and without special-token parsing (the
        usual case) are safe to tokenize inside the whole rendering, which keeps the token ids exactly
        those of a plain render. Only the other messages are marked, rendered, cut out and tokenized
        as plain text (see chat_template.split_marked).
        """
        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        risky = [i for i, m in enumerate(messages) if self._has_special_text(m["content"])]
        if not risky:
            return self.tokenize(text)
        marked = chat_template.render_marked(self.template, messages, risky,
                                             add_generation_prompt=add_generation_prompt, expected=text,
                                             **self._special_texts())
        bos = self.backend.special_token("bos")
        tokens = [bos] if bos is not None and self.backend.add_bos() and not self._starts_with_bos(text) else []
        for piece, is_content in marked:
            if piece:
                tokens += self.backend.tokenize(piece, add_special=False, parse_special=not is_content)
        return tokens

    def _has_special_text(self, text: str) -> bool:
        """Whether the tokenizer would read special tokens out of `text` (memoised per text)."""
        memo = self.__dict__.setdefault("_special_memo", {})
        hit = memo.get(text)
        if hit is None:
            be = self.backend
            hit = be.tokenize(text, parse_special=True) != be.tokenize(text, parse_special=False)
            if len(memo) > 1024:
                memo.clear()
            memo[text] = hit
        return hit

    def _special_texts(self) -> dict[str, str]:
        out = {}
        for which in ("bos", "eos"):
            tok = self.backend.special_token(which)
            out[f"{which}_token"] = "" if tok is None else self.backend.token_bytes(tok, special=True).decode(
                "utf-8", "replace")
        return out

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompt: str, **kwargs: Any) -> Completion:
        """Complete raw text (no chat template)."""
        return self.stream(prompt, **kwargs).completion

    def stream(self, prompt: str, *, max_tokens: int = 256, stop: Sequence[str] = (),
               sampler: SamplerConfig | None = None, speculate: Any = None, **sampling: Any) -> Stream:
        return self._start(self.tokenize(prompt), max_tokens, stop, sampler, sampling, speculate)

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> Completion:
        """Answer the last message of a conversation given as [{'role', 'content'}, ...]."""
        return self.chat_stream(messages, **kwargs).completion

    def chat_stream(self, messages: list[dict[str, Any]], *, max_tokens: int = 256, stop: Sequence[str] = (),
                    sampler: SamplerConfig | None = None, speculate: Any = None, **sampling: Any) -> Stream:
        return self._start(self.chat_tokens(messages), max_tokens, stop, sampler, sampling, speculate)

    def _start(self, tokens: list[int], max_tokens: int, stop: Sequence[str], sampler: SamplerConfig | None,
               sampling: dict[str, Any], speculate: Any = None) -> Stream:
        """speculate: None (the session's `speculation`), True, False or a SpeculationConfig, for this call."""
        spec = self.speculation if speculate is None else speculation_from(speculate)
        config = sampler_from(sampler or self.default_sampler, sampling)
        return Stream(self._run(tokens, max_tokens, config, stop, spec))

    def conversation(self, system: str | None = None, **defaults: Any) -> Conversation:
        return Conversation(self, system=system, defaults=defaults)

    def _run(self, prompt: list[int], max_tokens: int, config: SamplerConfig, stops: Sequence[str],
             spec: SpeculationConfig | None = None) -> Generator[str, None, Completion]:
        if max_tokens < 1:
            raise UsageError("max_tokens must be ≥ 1")
        stats = Stats(prompt_tokens=len(prompt))
        self.last_stats = stats
        t0 = time.perf_counter()
        self.prefill(prompt, stats)
        if len(prompt) + max_tokens > self.n_ctx:
            max_tokens = self.n_ctx - len(prompt)
        be = self.backend
        be.reset_sampler(config, prompt if config.repeat_penalty != 1.0 else ())
        text = TextAssembler(stops)
        out: list[int] = []
        t_first = 0.0
        if spec is not None and spec.auto and be.name not in EXACT_BATCHES:  # AUTO: see edgellm.speculate
            spec = None
        if spec is not None and spec.enabled and speculative.supported(be):
            tokens = speculative.tokens(self, config, spec, max_tokens, stats)
        else:
            tokens = self._plain_tokens(config)
        try:
            for tok in tokens:
                if not out:
                    t_first = time.perf_counter()
                    stats.ttft_s = t_first - t0
                    stats.prefill_s = stats.ttft_s
                if be.is_eog(tok):
                    stats.stop_reason = "eos"
                    break
                out.append(tok)
                piece = text.push(be.token_bytes(tok))
                if piece:
                    yield piece
                if text.stopped:
                    stats.stop_reason = "stop"
                    break
                if len(out) >= max_tokens:
                    stats.stop_reason = "length"
                    break
            tokens.close()  # the KV cache keeps what plain decoding leaves: each emitted token but the last
            keep = len(prompt) + len(out) - (stats.stop_reason != "eos")  # (all of them before an EOG token)
            if be.n_past > keep >= len(prompt):  # drafts accepted past a stop or EOG
                be.truncate(keep)
                del self.tokens[keep:]
            rest = text.flush()
            if rest:
                yield rest
        except (KeyboardInterrupt, GeneratorExit):
            stats.stop_reason = "interrupted"
            raise
        finally:
            tokens.close()
            stats.generated_tokens = len(out)
            stats.decode_s = time.perf_counter() - t_first if out else 0.0
            self._sync()
        self._save_to_disk()
        return Completion(text.text, out, stats)

    def _plain_tokens(self, config: SamplerConfig) -> Iterator[int]:
        """One token per evaluation; the consumer stops before the last one is evaluated."""
        be = self.backend
        while True:
            tok = be.sample(config)
            yield tok
            self._eval([tok])

    # -- KV-cache management -------------------------------------------------------------------
    def _sync(self) -> None:
        """Make `tokens` and the backend agree after an interruption at any point."""
        n = min(self.backend.n_past, len(self.tokens))
        if n != self.backend.n_past:
            self.backend.truncate(n)
        del self.tokens[n:]

    def _eval(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)
        try:
            self.backend.eval(tokens)
        except BaseException:
            self._sync()
            raise

    def _stash(self) -> None:
        """Keep the live context in the in-memory LRU before it is overwritten."""
        if len(self.tokens) >= STASH_MIN_TOKENS:
            self.memory_cache.put(self.tokens, self.backend.save_state())

    def prefill(self, prompt: list[int], stats: Stats | None = None) -> None:
        """Bring the KV cache to hold `prompt`, reusing the longest cached prefix available."""
        stats = stats or Stats(prompt_tokens=len(prompt))
        if not prompt:
            raise UsageError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(prompt)} tokens but the context holds {self.n_ctx}; "
                "use a larger context (--ctx) or shorten the history (Conversation(overflow='truncate'))")
        self._sync()
        limit = len(prompt) - 1  # always evaluate at least one token so logits are fresh
        reuse = min(common_prefix(self.tokens, prompt), limit)
        source = "context" if reuse else None
        found: tuple[SavedState, int] | None = self.memory_cache.best(prompt, reuse)
        if self.disk_cache is not None:
            found = self.disk_cache.best(prompt, max(reuse, found[1] if found else 0)) or found
        if found is not None and min(found[1], limit) > reuse:
            saved, shared = found
            self._stash()
            if self._restore(saved):
                reuse, source = min(shared, limit), saved.source
            else:  # the backend refused it: the live context is gone, evaluate from scratch
                reuse, source = 0, None
        elif len(self.tokens) - reuse >= STASH_MIN_TOKENS:
            self._stash()
        self.backend.truncate(reuse)
        del self.tokens[reuse:]
        stats.reused_tokens, stats.cache_source = reuse, source
        self._eval(prompt[reuse:])

    def _restore(self, saved: SavedState) -> bool:
        """Load a cached state into the backend. A state whose checksums held but whose payload the
        backend refuses (another build wrote it, say) is dropped from its cache, never fatal."""
        try:
            self.backend.load_state(saved.state, len(saved.tokens))
        except ContextOverflowError:  # made by a session with a larger context: fine for others, not here
            self.backend.truncate(0)
            self.tokens = []
            return False
        except (BackendError, CacheError):
            if saved.source == "disk" and self.disk_cache is not None:
                self.disk_cache.discard(saved.tokens)
            self.memory_cache.discard(saved.tokens)
            self.backend.truncate(0)
            self.tokens = []
            return False
        self.tokens = list(saved.tokens)
        return True

    def _save_to_disk(self) -> None:
        if self.disk_cache is not None and len(self.tokens) >= self.disk_cache.min_tokens:
            self.disk_cache.put(self.tokens, self.backend.save_state())

    def import_state(self, path: str | Path) -> int:
        """Make a state file (e.g. a shipped system prompt from `cache_prompt`) available for reuse."""
        saved = read_state_file(Path(path), self.backend.fingerprint)
        self.memory_cache.put(saved.tokens, saved.state)
        return len(saved.tokens)

    def cache_prompt(self, system: str, path: str | Path) -> int:
        """Precompute the KV state of a system prompt and write it to `path`; returns its token count."""
        tokens = self.system_tokens(system)
        self.prefill(tokens)
        write_state_file(Path(path), self.backend.fingerprint, tokens, self.backend.save_state())
        return len(tokens)

    def system_tokens(self, system: str) -> list[int]:
        """The tokens every chat with this system prompt starts with: the common token prefix of two
        chats that differ only in the user message (works for any template without knowing its markup)."""
        a, b = (self.chat_tokens([{"role": "system", "content": system}, {"role": "user", "content": q}])
                for q in ("A", "B"))
        return a[:common_prefix(a, b)]

    def reset(self) -> None:
        """Forget the live context (cached states stay available)."""
        self._stash()
        self.backend.truncate(0)
        self.tokens.clear()

    def logits(self, prompt: str | list[int]) -> Any:
        """Logits (numpy float32, n_vocab) for the next token after `prompt`."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.prefill(tokens)
        return self.backend.logits()

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Conversation:
    """A chat that keeps its history; each turn reuses the KV cache of the previous ones."""

    session: Session
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    overflow: str = "error"  # 'error' | 'truncate' (drop the oldest turns)

    def __post_init__(self) -> None:
        if self.system and not (self.messages and self.messages[0]["role"] == "system"):
            self.messages.insert(0, {"role": "system", "content": self.system})

    def say(self, text: str, **kwargs: Any) -> Completion:
        return self.stream(text, **kwargs).completion

    def stream(self, text: str, **kwargs: Any) -> Stream:
        """Stream the answer to `text`; history is extended only when the answer completes."""
        params = {**self.defaults, **kwargs}
        pending = self.messages + [{"role": "user", "content": text}]
        pending = self._fit(pending, params.get("max_tokens", 256))
        inner = self.session.chat_stream(pending, **params)

        def run() -> Generator[str, None, Completion]:
            yield from inner
            done = inner.completion
            self.messages[:] = pending + [{"role": "assistant", "content": done.text}]
            return done

        return Stream(run())

    def _fit(self, messages: list[dict[str, str]], max_tokens: int) -> list[dict[str, str]]:
        n = len(self.session.chat_tokens(messages))
        budget = self.session.n_ctx - min(max_tokens, self.session.n_ctx // 4)
        if n <= budget:
            return messages
        if self.overflow != "truncate":
            raise ContextOverflowError(
                f"the conversation is {n} tokens and the context holds {self.session.n_ctx}; "
                "reset it, or allow truncation (overflow='truncate' / chat --truncate) to drop the oldest turns")
        head = [m for m in messages[:1] if m["role"] == "system"]
        body = messages[len(head):]
        while len(body) > 1 and len(self.session.chat_tokens(head + body)) > budget:
            body = body[2:] if len(body) > 2 else body[1:]
        if len(self.session.chat_tokens(head + body)) > budget:
            raise ContextOverflowError(f"the last message alone does not fit the {self.session.n_ctx}-token context")
        return head + body

    def reset(self) -> None:
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]

    def save(self, path: str | Path) -> None:
        """Write the history as JSON (atomically; a regular file or a new one, else UsageError)."""
        import json

        from .atomic import write_atomic
        from .userfiles import writable_file

        dest = writable_file(path, "conversation file")
        data = json.dumps({"messages": self.messages}, ensure_ascii=False, indent=1).encode("utf-8", "surrogatepass")
        try:
            write_atomic(dest, data)
        except OSError as e:
            raise UsageError(f"cannot write the conversation file {dest}: {e.strerror or e}") from None

    def load(self, path: str | Path) -> None:
        """Replace the history with one saved by `save` (a regular file of at most 64 MiB)."""
        import json

        from .userfiles import decode_text, read_bytes

        text = decode_text(read_bytes(path, "conversation file"), f"conversation file {path}")
        try:
            data = json.loads(text)
            chat_template.validate_messages(data["messages"])
        except (ValueError, KeyError, TypeError, RecursionError, EdgeLLMError) as e:
            raise UsageError(f"cannot load a conversation from {path}: {e}") from None
        self.messages = [{"role": m["role"], "content": m["content"]} for m in data["messages"]]


def open_session(backend: Backend, path: Path, plan: Any, *, disk_cache: bool | str | os.PathLike[str] = True,
                 memory_cache_mb: int = 512, prompt_state: str | os.PathLike[str] | None = None,
                 sampler: SamplerConfig | None = None, speculate: bool | SpeculationConfig | None = None) -> Session:
    """A Session over any backend, with the in-memory and disk KV caches and an optional shipped state.

    The chat-template render process starts here, so it is ready by the time the first prompt comes.
    """
    from . import store

    disk = None
    if disk_cache:
        root = store.home() / "kv" if disk_cache is True else Path(disk_cache)
        disk = DiskCache(root, backend.fingerprint)
    template = backend.metadata("tokenizer.chat_template")
    if template:
        from .template_worker import worker

        with contextlib.suppress(OSError):
            worker().start()
    session = Session(backend, path, plan=plan, template=template, memory_cache=PrefixCache(memory_cache_mb << 20),
                      disk_cache=disk, default_sampler=sampler or SamplerConfig(),
                      speculation=speculation_from(speculate))
    if prompt_state is not None:
        session.import_state(prompt_state)
    return session


__all__ = ["Completion", "Conversation", "GREEDY", "SamplerConfig", "Session", "Stats", "Stream", "open_session"]
