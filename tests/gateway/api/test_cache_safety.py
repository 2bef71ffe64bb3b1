"""The cache answers only when the cached answer is right for this request (issue 11, item 5).

Over real HTTP, with the real embedder and verifier: content the gateway cannot read (images, audio,
no text at all) is never matched, and a cached answer never serves a request whose output constraints
(max_tokens, response_format, stop, seed, logit_bias, pass-through fields) it does not satisfy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from icgate.gateway.config import Policy
from tests.gateway.api.test_cache_api import ask, cache_policy, settle
from tests.gateway.conftest import RunningGateway, Standins

StartGateway = Callable[[Policy], RunningGateway]
QUESTION = "What is the boiling point of water at sea level?"


def image(url: str, text: str | None = None) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        parts.insert(0, {"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (image("data:image/png;base64,AAAA"), image("data:image/png;base64,BBBB")),
        (
            image("https://example.test/cat.png", "What is in this picture?"),
            image("https://example.test/dog.png", "What is in this picture?"),
        ),
        ([{"role": "user", "content": None}], [{"role": "user", "content": []}]),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
                }
            ],
            [
                {
                    "role": "user",
                    "content": [{"type": "input_audio", "input_audio": {"data": "BBBB", "format": "wav"}}],
                }
            ],
        ),
    ],
    ids=["two-images", "same-question-other-image", "no-text", "two-sounds"],
)
def test_content_the_gateway_cannot_read_is_never_served_from_the_cache(
    standins: Standins, start_gateway: StartGateway, first: list[dict[str, Any]], second: list[dict[str, Any]]
) -> None:
    gw = start_gateway(cache_policy(standins))
    ask(gw, first)
    settle(gw)
    again = ask(gw, second)
    assert again.headers["x-icgate-route"] == "small"
    assert "x-icgate-similarity" not in again.headers
    assert len(standins.small.received) == 2
    assert gw.gateway.cache_entries is not None and gw.gateway.cache_entries.store.size("anonymous") == 0


def test_max_tokens_is_never_exceeded_by_a_cached_answer(
    standins: Standins, start_gateway: StartGateway
) -> None:
    gw = start_gateway(cache_policy(standins))
    first = ask(gw, QUESTION)  # "small-model says: ..." is 12 words
    assert first.json()["usage"]["completion_tokens"] == 12
    settle(gw)
    short = ask(gw, QUESTION, max_tokens=2)
    assert short.headers["x-icgate-route"] == "small"
    assert short.json()["usage"]["completion_tokens"] <= 2
    # A limit the cached answer fits in is served from the cache: the check is about the limit.
    roomy = ask(gw, QUESTION, max_tokens=50)
    assert roomy.headers["x-icgate-route"] == "cache"


@pytest.mark.parametrize(
    "constraint",
    [
        {"response_format": {"type": "json_object"}},
        {"stop": ["boiling"]},
        {"seed": 3},
        {"logit_bias": {"1234": -100}},
        {"guided_json": {"type": "object"}},
        {"presence_penalty": 1.0},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_cached_answer_serves_only_the_output_constraints_it_was_made_under(
    standins: Standins, start_gateway: StartGateway, constraint: dict[str, Any]
) -> None:
    gw = start_gateway(cache_policy(standins))
    ask(gw, QUESTION)
    settle(gw)
    constrained = ask(gw, QUESTION, **constraint)
    assert constrained.headers["x-icgate-route"] == "small"
    settle(gw)
    # Asked again under the same constraint (in other words): its own answer serves it.
    same = ask(gw, QUESTION.replace("What is", "What's"), **constraint)
    assert same.headers["x-icgate-route"] == "cache"
    assert (
        same.json()["choices"][0]["message"]["content"]
        == constrained.json()["choices"][0]["message"]["content"]
    )
    assert len(standins.small.received) == 2


def test_exchanges_longer_than_the_entry_bound_are_answered_but_not_stored(
    standins: Standins, start_gateway: StartGateway
) -> None:
    """Every replica holds every entry in memory: one tenant's huge prompts must not fill it."""
    gw = start_gateway(cache_policy(standins, max_entry_chars=300))
    ask(gw, QUESTION)
    long = ask(gw, "Summarise this report: " + "quarterly figures rose " * 10)  # 253 chars + its echo
    assert long.headers["x-icgate-route"] == "small"
    settle(gw)
    cache = gw.gateway.cache_entries
    assert cache is not None
    assert [e.prompt_text for e in cache.store.entries.values()] == [QUESTION]
