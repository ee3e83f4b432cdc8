"""`serve --exact`: a greedy answer is the cold single-client answer bit for bit, whatever the prefix cache
holds and however many clients are served (engine.ALIGN). The second turn of a conversation is the hard
case: its prompt holds the first answer, whose KV cells the warm path computed one token at a time while
generating, and a cold run computes inside a prompt batch — llama.cpp rounds the two differently, and
before the aligned chunks a warm server changed these answers."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
from serving import MODEL, running  # noqa: E402 - after the imports it needs

PASSAGE = ("The lighthouse keeper's log for the winter of 1893 records forty-one storms, three shipwrecks "
           "and a single visitor: a botanist who came to study the lichens on the northern cliffs. ") * 3
SYSTEM = "You are a careful assistant. Answer from the passage. " + PASSAGE
QUESTIONS = ["Who visited the lighthouse?", "Write a short poem about the log."]
FOLLOW_UP = "Say it again in other words."
N = 40


def _ask(url: str, messages: list[dict]) -> tuple[str, int]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=N, temperature=0)
    return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens


def _cold(path, messages: list[dict]) -> str:
    """The answer of a fresh server that has seen nothing else."""
    with running(path, n_ctx=1024, parallel=1, batch=False) as url:
        text, cached = _ask(url, messages)
    assert cached == 0
    return text


def test_exact_answers_are_the_cold_answers_with_a_warm_cache_and_many_clients(default_model_path):
    system = {"role": "system", "content": SYSTEM}
    first = [[system, {"role": "user", "content": q}] for q in QUESTIONS]
    cold_first = [_cold(default_model_path, m) for m in first]
    second = [[*m, {"role": "assistant", "content": a}, {"role": "user", "content": FOLLOW_UP}]
              for m, a in zip(first, cold_first)]
    cold_second = [_cold(default_model_path, m) for m in second]
    assert len(set(cold_first)) == len(QUESTIONS) and all(cold_second)

    # --system pins the system prompt's state: exact mode re-evaluates its aligned part at start-up
    with running(default_model_path, n_ctx=1024, parallel=4, batch=False, max_queue=32, system=SYSTEM) as url:
        warm_cached = []
        for m, want in zip(first, cold_first):  # one after another: each reuses the previous ones' cells
            text, cached = _ask(url, m[1:])  # the system message comes from --system
            assert text == want
            warm_cached.append(cached)
        for m, want in zip(second, cold_second):
            text, cached = _ask(url, m)
            assert text == want
            warm_cached.append(cached)
        assert min(warm_cached) >= 64, warm_cached  # every warm request did reuse cached cells

        jobs = [*zip(first, cold_first), *zip(second, cold_second)] * 2  # 8 requests on 4 slots at once
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: _ask(url, job[0])[0], jobs))
    assert together == [want for _, want in jobs]
