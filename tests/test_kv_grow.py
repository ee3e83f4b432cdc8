"""The CPU KV cache grows with the conversation (runtimes.llamacpp.LlamaCppBackend._fit): same outputs as a
context allocated whole, states move between the two, and a failed growth keeps the conversation."""
from __future__ import annotations

import numpy as np
import pytest

import edgellm
from edgellm.errors import ContextOverflowError
from edgellm.runtime_gguf import load_gguf

STORY = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and a storm."}]


def _load(path, grow: bool, **kw):
    return load_gguf(path, n_ctx=2048, threads=2, kv_grow=grow,
                     session_kw=dict(disk_cache=False, sampler=edgellm.GREEDY, speculate=False, **kw))


@pytest.fixture(scope="module")
def pair(default_model_path):
    grown, whole = _load(default_model_path, True), _load(default_model_path, False)
    yield grown, whole
    grown.close()
    whole.close()


def test_starts_small_and_grows_by_doubling(pair):
    grown, whole = pair
    grown.reset()
    assert grown.backend.kv_cells == 256 and whole.backend.kv_cells == 2048
    assert grown.backend.n_ctx == whole.backend.n_ctx == 2048
    seen = []
    for _piece in grown.chat_stream(STORY, max_tokens=600):
        if not seen or seen[-1] != grown.backend.kv_cells:
            seen.append(grown.backend.kv_cells)
    assert seen[0] == 256 and seen[-1] >= 512 and seen == sorted(seen)
    assert all(b == 2 * a for a, b in zip(seen, seen[1:]))


def test_greedy_answer_is_identical_to_a_whole_context(pair):
    """A ~620-token answer crosses two growths (256 → 512 → 1024): token for token what the fully
    allocated context gives (same attention width, same batch splits)."""
    grown, whole = pair
    grown.reset()
    whole.reset()
    a = grown.chat(STORY, max_tokens=600)
    b = whole.chat(STORY, max_tokens=600)
    assert a.stats.generated_tokens > 300
    assert a.tokens == b.tokens
    assert grown.backend.kv_cells == 1024


def test_long_prompt_logits_equal_a_whole_context(pair):
    """A 700-token prompt into a 256-cell context: it grows first, then evaluates the batch as the
    whole context would (every row's logits equal)."""
    grown, whole = pair
    tokens = grown.tokenize("The quick brown fox jumps over the lazy dog. " * 70)[:700]
    grown.reset()
    whole.reset()
    grown.backend.truncate(0)
    whole.backend.truncate(0)
    a = grown.backend.eval_all_logits(tokens)
    b = whole.backend.eval_all_logits(tokens)
    assert grown.backend.kv_cells == 1024
    np.testing.assert_array_equal(a, b)


def test_state_from_a_whole_context_restores_into_a_small_one(pair, default_model_path):
    _, whole = pair
    tokens = whole.tokenize("Once upon a time, " * 120)[:400]
    whole.reset()
    whole.backend.truncate(0)
    whole.backend.eval(tokens)
    state = whole.backend.save_state()
    whole.backend.eval([tokens[-1]])
    want = whole.backend.logits()
    with _load(default_model_path, True) as grown:
        assert grown.backend.kv_cells == 256
        grown.backend.load_state(state, len(tokens))
        assert grown.backend.kv_cells == 512 and grown.backend.n_past == 400
        grown.backend.eval([tokens[-1]])
        np.testing.assert_array_equal(grown.backend.logits(), want)


def test_failed_growth_keeps_the_conversation(default_model_path, monkeypatch):
    """Out of memory while growing (simulated: llama.cpp refuses every new context) is a one-line
    InsufficientMemoryError; the old context is kept until a new one holds the conversation, so the tokens
    already in the cache are still there and usable."""
    import edgellm.runtimes.llamacpp as llamacpp
    from edgellm.errors import BackendError, InsufficientMemoryError

    with _load(default_model_path, True) as s:
        b = s.backend
        tokens = s.tokenize("A short history of sailing ships. " * 40)[:200]
        b.eval(tokens)
        before = b.logits()

        def refuse(ll, model, options, cells):
            raise BackendError(f"llama.cpp could not create a context of {cells} tokens")

        monkeypatch.setattr(llamacpp, "create_context", refuse)
        with pytest.raises(InsufficientMemoryError, match="stays at 256 cells") as err:
            b.eval(s.tokenize(" and then" * 60))
        assert "\n" not in str(err.value)
        assert b.kv_cells == 256 and b.n_past == 200
        b.truncate(199)
        b.eval([tokens[-1]])
        np.testing.assert_array_equal(b.logits(), before)
        s.reset()  # usable throughout, even while no larger context can be made
        b.eval(tokens[:10])


def test_several_slots_never_grow_and_an_oversized_restore_touches_no_other_slot(default_model_path):
    """With server slots the cache is allocated whole; restoring a state larger than a slot is refused before
    anything is removed, and the other slot keeps its tokens."""
    with load_gguf(default_model_path, n_ctx=256, threads=2, parallel=2,
                   session_kw=dict(disk_cache=False, sampler=edgellm.GREEDY, speculate=False)) as s:
        b = s.backend
        ids = s.tokenize("Ships and the sea. " * 30)
        b.decode_batch(ids[:10], list(range(10)), [1] * 10, [False] * 9 + [True])
        with _load(default_model_path, False) as big:
            big.backend.eval(ids[:300])
            state = big.backend.save_state()
        with pytest.raises(ContextOverflowError, match="does not fit"):
            b.seq_restore(0, state, 300)
        assert b._ll.llama_memory_seq_pos_max(b._mem, 1) == 9 and b.kv_cells == 256
