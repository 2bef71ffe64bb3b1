"""The semantic cache and in-context examples through the HTTP API.

Real parts: the packaged MiniLM embedder, the shipped hit verifier, faiss, the
database (SQLite, and PostgreSQL for the replica test); stand-in backends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import sqlalchemy as sa

from icgate.gateway.config import Policy
from icgate.gateway.store import keys, tables
from tests.gateway.conftest import RunningGateway, Standins, settle_cache, standin_policy

StartGateway = Callable[[Policy], RunningGateway]


def cache_policy(standins: Standins, **cache: Any) -> Policy:
    settings: dict[str, Any] = {
        "enabled": True,
        "sync_interval_s": 0.2,
        **cache,
    }
    return standin_policy(standins, "http", cache=settings)


def ask(gw: RunningGateway, content: str | list[dict[str, Any]], model: str = "auto", key: str = "sk-x",
        **extra: Any) -> httpx.Response:  # fmt: skip
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    body = {"model": model, "messages": messages, "temperature": 0, **extra}
    resp = httpx.post(
        gw.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30
    )
    assert resp.status_code == 200, resp.text
    return resp


def settle(gw: RunningGateway) -> None:
    settle_cache(gw.gateway)


def test_exact_hit_skips_the_backend_and_says_so(standins: Standins, start_gateway: StartGateway) -> None:
    gw = start_gateway(cache_policy(standins))
    first = ask(gw, "What is the boiling point of water at sea level?")
    assert first.headers["x-icgate-route"] == "small"
    settle(gw)
    second = ask(gw, "What is the  boiling point of water at sea level? ")  # whitespace differs
    assert second.headers["x-icgate-route"] == "cache"
    assert second.headers["x-icgate-similarity"] == "1.0000"
    assert (
        second.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    )
    assert second.json()["id"] != first.json()["id"]
    assert len(standins.small.received) == 1


def test_semantic_hit_on_a_paraphrase_not_on_a_different_question(
    standins: Standins, start_gateway: StartGateway
) -> None:
    gw = start_gateway(cache_policy(standins))
    ask(gw, "How do I reset my password?")
    settle(gw)
    para = ask(gw, "How can I reset my password?")
    assert para.headers["x-icgate-route"] == "cache"
    assert 0.8 < float(para.headers["x-icgate-similarity"]) < 1.0
    other = ask(gw, "How do I reset my router?")
    assert other.headers["x-icgate-route"] == "small"


def test_sampled_requests_are_not_served_from_cache(standins: Standins, start_gateway: StartGateway) -> None:
    gw = start_gateway(cache_policy(standins))
    ask(gw, "Write a haiku about autumn.")
    settle(gw)
    again = ask(gw, "Write a haiku about autumn.", temperature=0.9)
    assert again.headers["x-icgate-route"] == "small"
    allowed = start_gateway(cache_policy(standins, allow_sampled=True))
    ask(allowed, "Write a haiku about spring.", temperature=0.9)
    settle(allowed)
    assert ask(allowed, "Write a haiku about spring.", temperature=0.9).headers["x-icgate-route"] == "cache"


def test_tenants_never_see_each_others_entries(standins: Standins, start_gateway: StartGateway) -> None:
    policy = cache_policy(standins)
    policy.auth.required = True
    gw = start_gateway(policy)
    assert gw.gateway.engine is not None
    alice, bob, carol = (keys.create_key(gw.gateway.engine, name).key for name in ("alice", "bob", "carol"))
    question = "What is the tallest mountain in Europe?"
    paraphrase = "Which mountain in Europe is the tallest?"
    ask(gw, question, key=alice)
    settle(gw)
    assert ask(gw, question, key=alice).headers["x-icgate-route"] == "cache"
    # within alice's namespace the paraphrase is a semantic hit ...
    assert ask(gw, paraphrase, key=alice).headers["x-icgate-route"] == "cache"
    # ... but neither the same words nor the paraphrase reach her entry from another tenant, and their
    # retrieval never scores against it: no similarity from her namespace
    for key, text in ((bob, question), (carol, paraphrase)):
        other = ask(gw, text, key=key)
        assert other.headers["x-icgate-route"] == "small"
        assert "x-icgate-similarity" not in other.headers


def test_named_backend_is_served_only_by_its_tier_or_better(
    standins: Standins, start_gateway: StartGateway
) -> None:
    gw = start_gateway(cache_policy(standins))
    ask(gw, "Name the largest planet.", model="small")
    settle(gw)
    assert ask(gw, "Name the largest planet.", model="large").headers["x-icgate-route"] == "large"
    settle(gw)
    auto = ask(gw, "Name the largest planet.", model="auto")
    assert auto.headers["x-icgate-route"] == "cache"
    # the large tier's answer replaced the small one under the same key
    assert auto.json()["choices"][0]["message"]["content"].startswith("large-model says")
    ask(gw, "Name the smallest planet.", model="large")
    settle(gw)
    assert ask(gw, "Name the smallest planet.", model="small").headers["x-icgate-route"] == "cache"


def test_a_follow_up_never_hits_an_answer_given_in_another_context(
    standins: Standins, start_gateway: StartGateway
) -> None:
    gw = start_gateway(cache_policy(standins))

    def conversation(topic: str) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": f"What is {topic}?"},
            {"role": "assistant", "content": f"{topic} is a broad subject."},
            {"role": "user", "content": "What are its types?"},
        ]

    ask(gw, conversation("machine learning"))
    settle(gw)
    assert ask(gw, conversation("machine learning")).headers["x-icgate-route"] == "cache"
    other = ask(gw, conversation("a volcano"))
    assert other.headers["x-icgate-route"] == "small"


def test_streamed_hit_is_replayed_as_sse(standins: Standins, start_gateway: StartGateway) -> None:
    gw = start_gateway(cache_policy(standins))
    first = ask(gw, "Spell the word cat backwards.")
    settle(gw)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "Spell the word cat backwards."}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-icgate-route"] == "cache"
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.json()["choices"][0]["message"]["content"]
    assert any(c.usage is not None for c in chunks)


def test_streamed_answers_are_stored_too(standins: Standins, start_gateway: StartGateway) -> None:
    gw = start_gateway(cache_policy(standins))
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        json={
            "model": "auto",
            "stream": True,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Hi!"}],
        },
    ) as resp:
        streamed = [line for line in resp.iter_lines() if line]
    assert streamed[-1] == "data: [DONE]"
    settle(gw)
    again = ask(gw, "Hi!")
    assert again.headers["x-icgate-route"] == "cache"
    assert again.json()["choices"][0]["message"]["content"] == "small-model says: Hi!"


def test_truncated_answers_are_not_stored(standins: Standins, start_gateway: StartGateway) -> None:
    gw = start_gateway(cache_policy(standins))
    ask(gw, "Tell me a long story about a dragon", max_tokens=3)  # finish_reason "length"
    settle(gw)
    assert ask(gw, "Tell me a long story about a dragon", max_tokens=3).headers["x-icgate-route"] == "small"


def test_examples_are_prepended_for_the_small_tier(standins: Standins, start_gateway: StartGateway) -> None:
    gw = start_gateway(cache_policy(standins, semantic=False, named_backends="full"))
    ask(gw, "What is the capital of France?", model="large")
    settle(gw)
    resp = ask(gw, "What is the capital city of France?", model="small")
    assert resp.headers["x-icgate-route"] == "small"
    assert resp.headers["x-icgate-examples"] == "1"
    sent = standins.small.received[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[0]["content"] == "What is the capital of France?"
    assert sent[1]["content"] == "large-model says: What is the capital of France?"
    assert sent[2]["content"] == "What is the capital city of France?"
    # the large tier never gets examples
    large = ask(gw, "What is the capital town of France?", model="large")
    assert large.headers["x-icgate-examples"] == "0"
    assert len(standins.large.received[-1]["body"]["messages"]) == 1


def test_feedback_moves_utility_of_the_entries_used(standins: Standins, start_gateway: StartGateway) -> None:
    gw = start_gateway(cache_policy(standins, semantic=False, named_backends="full"))
    ask(gw, "What is the capital of Spain?", model="large")
    settle(gw)
    helped = ask(gw, "What is the capital city of Spain?", model="small")
    assert helped.headers["x-icgate-examples"] == "1"
    cache = gw.gateway.cache_entries
    assert cache is not None
    entry = next(e for e in cache.store.entries.values() if e.prompt_text == "What is the capital of Spain?")
    before = entry.utility
    resp = httpx.post(
        gw.url + "/v1/feedback", json={"request_id": helped.headers["x-icgate-request-id"], "score": -1}
    )
    assert resp.status_code == 200 and resp.json()["entries_updated"] >= 1
    assert entry.utility < before
    unknown = httpx.post(gw.url + "/v1/feedback", json={"request_id": "req-nope", "score": 1})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "request_id"
    bad = httpx.post(gw.url + "/v1/feedback", json={"request_id": "x", "score": 7})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "score"


def test_pii_is_scrubbed_before_storing(standins: Standins, start_gateway: StartGateway) -> None:
    gw = start_gateway(cache_policy(standins))
    ask(gw, "My email is jane.doe@example.com, please confirm")
    settle(gw)
    cache = gw.gateway.cache_entries
    assert cache is not None
    stored = json.dumps([(e.prompt_text, e.response_text, e.response) for e in cache.store.entries.values()])
    assert "jane.doe@example.com" not in stored
    assert "[email]" in stored


def test_replicas_sharing_a_database_converge(
    standins: Standins, start_gateway: StartGateway, empty_db_url: str
) -> None:
    """On SQLite and PostgreSQL: one replica's answer serves the other; feedback and a deletion reach
    both."""
    policy_a = cache_policy(standins)
    policy_a.database.url = empty_db_url
    a = start_gateway(policy_a)
    policy_b = cache_policy(standins)
    policy_b.database.url = empty_db_url
    b = start_gateway(policy_b)
    ask(a, "Who wrote the novel Moby-Dick?")
    settle(a)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        resp = ask(b, "Who wrote the novel Moby-Dick?")
        if resp.headers["x-icgate-route"] == "cache":
            break
        time.sleep(0.2)
    assert resp.headers["x-icgate-route"] == "cache"
    assert b.gateway.cache_entries is not None and a.gateway.cache_entries is not None
    entry_id = next(iter(a.gateway.cache_entries.store.entries))
    served_by_a = ask(a, "Who wrote the novel Moby-Dick?")
    assert served_by_a.headers["x-icgate-route"] == "cache"
    rated = httpx.post(
        a.url + "/v1/feedback", json={"request_id": served_by_a.headers["x-icgate-request-id"], "score": -1}
    )
    assert rated.status_code == 200 and rated.json()["entries_updated"] == 1
    # b may have stored an answer of its own before it saw a's: rate whichever a served
    rated_id, on_a = next(
        (i, e) for i, e in a.gateway.cache_entries.store.entries.items() if e.feedback_count
    )
    on_b = b.gateway.cache_entries.store.get(rated_id)
    assert on_b is not None and on_a.feedback_count == 1
    deadline = time.monotonic() + 10
    while on_b.utility != on_a.utility and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (on_b.utility, on_b.feedback_count) == (on_a.utility, 1)  # a's feedback reached b's copy
    tombstone(a, entry_id)
    deadline = time.monotonic() + 10
    while b.gateway.cache_entries.store.get(entry_id) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b.gateway.cache_entries.store.get(entry_id) is None


def tombstone(gw: RunningGateway, entry_id: int) -> None:
    """Mark an entry deleted in the database directly, as another replica's eviction would."""
    assert gw.gateway.engine is not None
    table = tables.CacheEntryRow
    with gw.gateway.engine.begin() as conn:
        conn.execute(sa.update(table).where(table.id == entry_id).values(deleted_at=datetime.now(UTC)))


def test_restart_reloads_the_cache(standins: Standins, start_gateway: StartGateway, tmp_path: Any) -> None:
    data_dir = tmp_path / "persist"
    first = start_gateway(cache_policy(standins), data_dir)
    ask(first, "What colour is the sky on a clear day?")
    settle(first)
    first.stop()
    second = start_gateway(cache_policy(standins), data_dir)
    assert ask(second, "What colour is the sky on a clear day?").headers["x-icgate-route"] == "cache"
    assert len(standins.small.received) == 1


def test_policy_turns_the_cache_off_per_tenant(standins: Standins, start_gateway: StartGateway) -> None:
    gw = start_gateway(cache_policy(standins, tenants={"anonymous": {"enabled": False}}))
    ask(gw, "What is two plus two?")
    time.sleep(0.3)
    assert ask(gw, "What is two plus two?").headers["x-icgate-route"] == "small"
    assert gw.gateway.cache_entries is not None and not gw.gateway.cache_entries.store.entries


def test_policy_turns_semantic_hits_off_per_routed_model(
    standins: Standins, start_gateway: StartGateway
) -> None:
    policy = cache_policy(standins, models={"auto": {"semantic": False}, "small": {"semantic": True}})
    gw = start_gateway(policy)
    ask(gw, "How do I reset my password?")
    settle(gw)
    assert ask(gw, "How do I reset my password?").headers["x-icgate-route"] == "cache"
    assert ask(gw, "How can I reset my password?").headers["x-icgate-route"] == "small"
    # addressed by name to a backend whose own switch is on, the same tenant still gets semantic hits
    named = ask(gw, "How can I reset my password??", model="small")
    assert named.headers["x-icgate-route"] == "cache"
    assert float(named.headers["x-icgate-similarity"]) < 1.0


def test_a_named_request_gets_exact_hits_only_and_its_answer_is_stored(
    standins: Standins, start_gateway: StartGateway
) -> None:
    """The default `cache.named_backends: exact`: a near-duplicate named request reaches its backend as
    sent (no semantic hit, no examples); its answer is embedded after the response and stored, so an
    identical request is an exact hit and a routed near-duplicate finds it."""
    gw = start_gateway(cache_policy(standins))
    ask(gw, "How do I reset my password?")
    settle(gw)
    named = ask(gw, "How can I reset my password?", model="small")
    assert (named.headers["x-icgate-route"], named.headers["x-icgate-examples"]) == ("small", "0")
    assert standins.small.received[-1]["body"]["messages"] == [
        {"role": "user", "content": "How can I reset my password?"}
    ]
    settle(gw)
    again = ask(gw, "How can I reset my password?", model="small")
    assert again.headers["x-icgate-route"] == "cache" and again.headers["x-icgate-similarity"] == "1.0000"
    cache = gw.gateway.cache_entries
    assert cache is not None
    stored = next(e for e in cache.store.entries.values() if e.prompt_text == "How can I reset my password?")
    assert float(np.linalg.norm(stored.vector)) == pytest.approx(1.0, abs=1e-3)  # embedded, not a placeholder


def test_feedback_after_a_restart_finds_the_request_in_the_log(
    standins: Standins, start_gateway: StartGateway, tmp_path: Any
) -> None:
    data_dir = tmp_path / "feedback"
    first = start_gateway(cache_policy(standins, semantic=False, named_backends="full"), data_dir)
    ask(first, "What is the capital of Italy?", model="large")
    settle(first)
    helped = ask(first, "What is the capital city of Italy?", model="small")
    assert helped.headers["x-icgate-examples"] == "1"
    first.stop()
    second = start_gateway(cache_policy(standins, semantic=False, named_backends="full"), data_dir)
    resp = httpx.post(
        second.url + "/v1/feedback", json={"request_id": helped.headers["x-icgate-request-id"], "score": 1}
    )
    assert resp.status_code == 200 and resp.json()["entries_updated"] == 1
    assert second.gateway.cache_entries is not None
    entry = next(
        e
        for e in second.gateway.cache_entries.store.entries.values()
        if e.prompt_text == "What is the capital of Italy?"
    )
    assert entry.utility == 1.0 and entry.feedback_count == 1


def test_identical_requests_sent_together_reach_the_backend_once(
    standins: Standins, start_gateway: StartGateway
) -> None:
    gw = start_gateway(cache_policy(standins))
    standins.small.delay_s = 0.5  # every request arrives while the first is at the backend
    question = "Which planet has the most moons?"
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: ask(gw, question), range(4)))

    assert len(standins.small.received) == 1
    shared = [a for a in answers if a.headers.get("x-icgate-cache-shared") == "true"]
    assert len(shared) == 3 and all(a.headers["x-icgate-route"] == "cache" for a in shared)
    [lead] = [a for a in answers if "x-icgate-cache-shared" not in a.headers]
    assert lead.headers["x-icgate-route"] == "small"
    content = {a.json()["choices"][0]["message"]["content"] for a in answers}
    assert len(content) == 1 and len({a.json()["id"] for a in answers}) == 4
