"""The runtime on the real default model: determinism, streaming, KV-cache reuse at all three levels."""
from __future__ import annotations

import pytest

import edgellm
from edgellm.errors import CacheError, ContextOverflowError, TemplateError, UsageError

Q = [{"role": "user", "content": "List three fruits."}]


def test_greedy_is_deterministic(llm):
    a = llm.chat(Q, max_tokens=24)
    llm.reset()
    b = llm.chat(Q, max_tokens=24)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.stats.generated_tokens == len(a.tokens) > 0


def test_streaming_equals_non_streaming(llm):
    whole = llm.chat(Q, max_tokens=32)
    stream = llm.chat_stream(Q, max_tokens=32)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == whole.text == stream.completion.text


def test_seeded_sampling_is_reproducible_and_seed_matters(llm):
    kw = dict(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = llm.chat(Q, seed=1, **kw)
    b = llm.chat(Q, seed=1, **kw)
    others = {tuple(llm.chat(Q, seed=s, **kw).tokens) for s in (2, 3, 4)}
    assert a.tokens == b.tokens
    assert len(others | {tuple(a.tokens)}) > 1


def test_turns_reuse_the_context_and_match_a_cold_evaluation(default_model_path, tmp_path):
    """Each turn evaluates only its new tokens; a conversation resumed in another process from the
    disk cache continues with exactly the same tokens; and the reused state matches a cold
    evaluation of the same history.

    llama.cpp's CPU kernels are batch-size dependent (matrix products and attention take other code
    paths for one token than for a batch), so a history whose answers were decoded one token at a time is
    not bit-identical to the same history evaluated in one batch: that comparison uses the
    next-token distribution (KL divergence), while restore-vs-uninterrupted is exact.
    """
    import numpy as np

    kw = dict(n_ctx=2048, sampler=edgellm.GREEDY)
    with edgellm.load(default_model_path, disk_cache=tmp_path, **kw) as warm:
        conv = warm.conversation(system="You are a helpful assistant.", max_tokens=24)
        conv.say("Tell me about cats.")
        second = conv.say("And dogs?")
        assert second.stats.cache_source == "context"
        assert second.stats.reused_tokens >= second.stats.prompt_tokens - 20  # only the new turn is evaluated
        history = conv.messages + [{"role": "user", "content": "Which is better for a small flat?"}]
        prompt = warm.tokenize(warm.render(history))
        warm_logits = warm.logits(prompt)
        uninterrupted = warm.chat(history, max_tokens=24)
    with edgellm.load(default_model_path, disk_cache=tmp_path, **kw) as resumed:
        again = resumed.chat(history, max_tokens=24)
        assert again.stats.cache_source == "disk"
        assert again.stats.reused_tokens == again.stats.prompt_tokens - 1
        assert again.tokens == uninterrupted.tokens
    with edgellm.load(default_model_path, disk_cache=False, **kw) as cold:
        cold_logits = cold.logits(prompt)

    def logp(x):
        x = x.astype(np.float64) - x.max()
        return x - np.log(np.exp(x).sum())

    p, q = logp(cold_logits), logp(warm_logits)
    kld = float((np.exp(p) * (p - q)).sum())
    assert kld < 0.01
    assert int(np.argmax(q)) in np.argsort(p)[-3:]  # near-ties may swap, nothing more


def test_restored_state_is_exact(llm):
    """Save/restore of a sequence state is lossless: continuing from it equals never leaving."""
    from edgellm.runtimes.kv_cache import PrefixCache

    msgs = [{"role": "user", "content": "Describe a sunrise in two sentences."}]
    llm.reset()
    a1 = llm.chat(msgs, max_tokens=24)
    msgs2 = msgs + [{"role": "assistant", "content": a1.text}, {"role": "user", "content": "Now a sunset."}]
    a2 = llm.chat(msgs2, max_tokens=24)
    llm.reset()
    llm.memory_cache = PrefixCache()
    b1 = llm.chat(msgs, max_tokens=24)
    state, tokens = llm.backend.save_state(), list(llm.tokens)
    llm.reset()
    llm.memory_cache = PrefixCache()
    llm.chat([{"role": "user", "content": "Something else entirely."}], max_tokens=8)
    llm.backend.load_state(state, len(tokens))
    llm.tokens = tokens
    b2 = llm.chat(msgs2, max_tokens=24)
    assert b1.tokens == a1.tokens
    assert b2.stats.reused_tokens == a2.stats.reused_tokens > 0
    assert b2.tokens == a2.tokens


def test_memory_lru_serves_interleaved_conversations(llm):
    long_system = "You are a meticulous assistant. " * 20
    a = llm.conversation(system=long_system + "Topic A: gardening, soil, seeds and the seasons. " * 3, max_tokens=8)
    b = llm.conversation(system=long_system + "Topic B: astronomy, planets, stars and comets. " * 3, max_tokens=8)
    a.say("Hello")
    b.say("Hello")  # shares the system prefix with A, so only the tail is recomputed
    first = a.say("Again")  # A's state comes back from the in-memory LRU
    assert first.stats.cache_source == "memory"
    assert first.stats.reused_tokens >= first.stats.prompt_tokens - 16  # only the new turn
    assert len(llm.memory_cache) >= 1


def test_memory_lru_is_bounded_by_bytes():
    from edgellm.runtimes.kv_cache import PrefixCache

    cache = PrefixCache(max_bytes=100)
    for i in range(5):
        cache.put([i, 1, 2], b"x" * 40)
    assert cache.bytes <= 100 and len(cache) == 2
    found = cache.best([4, 1, 2, 9], better_than=0)
    assert found is not None and found[1] == 3
    assert cache.best([0, 1, 2], better_than=0) is None  # evicted


def test_disk_cache_survives_restart_and_rejects_corruption(default_model_path, tmp_path):
    msgs = [{"role": "system", "content": "You are a helpful assistant. " * 10}, {"role": "user", "content": "Hi"}]
    with edgellm.load(default_model_path, n_ctx=2048, disk_cache=tmp_path, sampler=edgellm.GREEDY) as first:
        cold = first.chat(msgs, max_tokens=8)
    files = list(tmp_path.glob("*.kv"))
    assert len(files) == 1
    with edgellm.load(default_model_path, n_ctx=2048, disk_cache=tmp_path, sampler=edgellm.GREEDY) as second:
        warm = second.chat(msgs, max_tokens=8)
        assert warm.stats.cache_source == "disk"
        assert warm.stats.reused_tokens == warm.stats.prompt_tokens - 1
        assert warm.tokens == cold.tokens
    # corrupt the payload: the entry must be detected, removed and rebuilt, never trusted
    data = bytearray(files[0].read_bytes())
    data[-100] ^= 0xFF
    files[0].write_bytes(bytes(data))
    with edgellm.load(default_model_path, n_ctx=2048, disk_cache=tmp_path, sampler=edgellm.GREEDY) as third:
        again = third.chat(msgs, max_tokens=8)
        assert again.stats.cache_source is None and third.disk_cache.rejected == 1
        assert again.tokens == cold.tokens
    assert len(list(tmp_path.glob("*.kv"))) == 1  # rebuilt
    # a truncated file is rejected too
    f = next(tmp_path.glob("*.kv"))
    f.write_bytes(f.read_bytes()[:5000])
    with edgellm.load(default_model_path, n_ctx=2048, disk_cache=tmp_path, sampler=edgellm.GREEDY) as fourth:
        assert fourth.chat(msgs, max_tokens=8).stats.cache_source is None


def test_shipped_prompt_state_is_reused_and_foreign_state_refused(llm, tmp_path):
    system = "You are the help desk of a public library. Answer briefly. " * 3
    path = tmp_path / "sys.kv"
    n = llm.cache_prompt(system, path)
    assert n > 30
    llm.reset()
    llm.memory_cache = type(llm.memory_cache)(llm.memory_cache.max_bytes)
    assert llm.import_state(path) == n
    done = llm.chat([{"role": "system", "content": system}, {"role": "user", "content": "Opening hours?"}],
                    max_tokens=4)
    assert done.stats.cache_source == "memory" and done.stats.reused_tokens >= n - 1
    foreign = tmp_path / "foreign.kv"
    from edgellm.runtimes.kv_cache import write_state_file
    write_state_file(foreign, "another-model", [1, 2, 3], b"state")
    with pytest.raises(CacheError):
        llm.import_state(foreign)


def test_stop_strings_cut_the_text(llm):
    base = llm.generate("1, 2, 3, 4, 5, 6,", max_tokens=16)
    assert " 8" in base.text
    stopped = llm.generate("1, 2, 3, 4, 5, 6,", max_tokens=16, stop=[" 8"])
    assert stopped.stats.stop_reason == "stop"
    assert " 8" not in stopped.text and base.text.startswith(stopped.text)


def test_context_overflow_is_reported_not_crashed(default_model_path):
    with edgellm.load(default_model_path, n_ctx=64, disk_cache=False, sampler=edgellm.GREEDY) as small:
        with pytest.raises(ContextOverflowError):
            small.generate("word " * 2000)
        conv = small.conversation(max_tokens=8)
        with pytest.raises(ContextOverflowError):
            conv.say("word " * 2000)
        conv.overflow = "truncate"
        for _ in range(4):
            conv.say("Say hi.")
        assert small.tokens and len(small.tokens) <= small.n_ctx


def test_interrupted_stream_keeps_kv_consistent(llm):
    stream = llm.chat_stream(Q, max_tokens=64)
    next(stream)
    next(stream)
    stream.close()  # what Ctrl-C in the chat does
    assert llm.backend.n_past == len(llm.tokens)
    fresh = llm.chat(Q, max_tokens=16)
    llm.reset()
    assert fresh.tokens == llm.chat(Q, max_tokens=16).tokens


def test_bad_options_and_templates(llm):
    with pytest.raises(UsageError):
        llm.chat(Q, temperature=-1)
    with pytest.raises(UsageError):
        llm.chat(Q, max_tokens=0)
    with pytest.raises(UsageError):
        llm.chat(Q, bogus=1)
    with pytest.raises(TemplateError):
        llm.chat([{"role": "user"}])
    from edgellm import chat_template
    with pytest.raises(TemplateError):
        chat_template.render("{{ ''.__class__.__mro__[1].__subclasses__() }}", Q)
    with pytest.raises(TemplateError):
        chat_template.render("{% if %}", Q)


def test_logits_on_demand(llm):
    import numpy as np

    logits = llm.logits("The capital of France is")
    assert logits.shape == (49152,) and np.isfinite(logits).all()
    assert llm.detokenize([int(np.argmax(logits))]).strip() != ""


def test_too_little_memory_is_refused_before_loading(default_model_path, monkeypatch):
    import dataclasses

    from edgellm import device
    from edgellm.errors import InsufficientMemoryError

    tiny = dataclasses.replace(device.probe(), ram_bytes=64 << 20, ram_available_bytes=48 << 20)
    monkeypatch.setattr(device, "probe", lambda: tiny)
    with pytest.raises(InsufficientMemoryError, match="MiB"):
        edgellm.load(default_model_path, disk_cache=False)
