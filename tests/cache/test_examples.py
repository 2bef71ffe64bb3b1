"""Choosing in-context examples and placing them in the chat (plain data, no model)."""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import pytest

from icgate.cache.examples import (
    SYSTEM_BLOCK_HEADER,
    Example,
    augment_messages,
    choose_examples,
    example_budget,
)
from icgate.text import estimate_tokens


def _vec(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def _ex(
    entry_id: int,
    similarity: float,
    utility: float = 0.5,
    tokens: int = 10,
    vector: np.ndarray | None = None,
    prompt: str | None = None,
) -> Example:
    return Example(
        entry_id=entry_id,
        prompt=prompt if prompt is not None else f"question {entry_id}",
        response=f"answer {entry_id}",
        similarity=similarity,
        utility=utility,
        tier="large",
        tokens=tokens,
        vector=vector,
    )


def _ids(examples: list[Example]) -> list[int]:
    return [e.entry_id for e in examples]


def test_below_threshold_dropped() -> None:
    chosen = choose_examples([_ex(1, 0.49, utility=1.0), _ex(2, 0.8), _ex(3, 0.5)], k=5, token_budget=100)
    assert _ids(chosen) == [2, 3]
    assert choose_examples([_ex(1, 0.3)], k=3, token_budget=100) == []


def test_relevance_ranks_first_and_utility_breaks_ties() -> None:
    chosen = choose_examples([_ex(1, 0.9, utility=0.2), _ex(2, 0.7, utility=0.2)], k=2, token_budget=100)
    assert _ids(chosen) == [1, 2]
    same_relevance = [_ex(1, 0.8, utility=0.1), _ex(2, 0.8, utility=0.9), _ex(3, 0.8, utility=0.5)]
    assert _ids(choose_examples(same_relevance, k=3, token_budget=100)) == [2, 3, 1]
    # a small relevance edge is outweighed by much higher utility: a large-tier answer is worth more
    close = [_ex(1, 0.82, utility=0.0), _ex(2, 0.80, utility=1.0)]
    assert _ids(choose_examples(close, k=1, token_budget=100)) == [2]
    assert _ids(choose_examples(close, k=1, token_budget=100, utility_weight=0.0)) == [1]


def test_mmr_skips_near_duplicates() -> None:
    a = _vec(1.0, 0.0, 0.0)
    near_a = _vec(1.0, 0.05, 0.0)  # cosine ~0.999 to a
    b = _vec(0.6, 0.8, 0.0)  # cosine 0.6 to a
    candidates = [_ex(1, 0.9, vector=a), _ex(2, 0.89, vector=near_a), _ex(3, 0.7, vector=b)]
    assert _ids(choose_examples(candidates, k=3, token_budget=100)) == [1, 3]
    # without vectors, the same prompt text counts as a duplicate
    same_text = [_ex(1, 0.9, prompt="What is X?"), _ex(2, 0.85, prompt="  what is  x? "), _ex(3, 0.6)]
    assert _ids(choose_examples(same_text, k=3, token_budget=100)) == [1, 3]


def test_mmr_prefers_diverse_over_redundant() -> None:
    a = _vec(1.0, 0.0, 0.0)
    similar_to_a = _vec(1.0, 0.6, 0.0)  # cosine ~0.86: redundant but not a duplicate
    other = _vec(0.0, 0.0, 1.0)  # orthogonal to both
    candidates = [_ex(1, 0.9, vector=a), _ex(2, 0.85, vector=similar_to_a), _ex(3, 0.8, vector=other)]
    assert _ids(choose_examples(candidates, k=2, token_budget=100)) == [1, 3]
    assert _ids(choose_examples(candidates, k=2, token_budget=100, mmr_lambda=1.0)) == [1, 2]


def test_token_budget_respected_and_smaller_ones_still_taken() -> None:
    candidates = [
        _ex(1, 0.9, tokens=60),
        _ex(2, 0.85, tokens=50),
        _ex(3, 0.8, tokens=30),
        _ex(4, 0.7, tokens=10),
    ]
    chosen = choose_examples(candidates, k=4, token_budget=100)
    assert _ids(chosen) == [1, 3, 4]  # 2 would exceed the budget after 1; smaller 3 and 4 still fit
    assert sum(e.tokens for e in chosen) <= 100
    assert _ids(
        choose_examples([_ex(1, 0.9, tokens=500), _ex(2, 0.6, tokens=20)], k=2, token_budget=100)
    ) == [2]
    assert choose_examples(candidates, k=4, token_budget=0) == []


def test_k_respected() -> None:
    candidates = [_ex(i, 0.6 + i / 100) for i in range(10)]
    assert len(choose_examples(candidates, k=3, token_budget=1000)) == 3
    assert choose_examples(candidates, k=0, token_budget=1000) == []


def test_deterministic_and_ties_by_entry_id() -> None:
    rng = np.random.default_rng(7)
    candidates = [
        _ex(
            i,
            float(rng.uniform(0.4, 1.0)),
            float(rng.uniform()),
            int(rng.integers(5, 80)),
            _vec(*rng.normal(size=8)),
        )
        for i in range(40)
    ]
    first = choose_examples(candidates, k=6, token_budget=200)
    shuffled = candidates[:]
    random.Random(3).shuffle(shuffled)
    assert _ids(choose_examples(shuffled, k=6, token_budget=200)) == _ids(first)
    assert _ids(choose_examples(candidates, k=6, token_budget=200)) == _ids(first)
    tied = [_ex(9, 0.8), _ex(4, 0.8), _ex(6, 0.8)]
    assert _ids(choose_examples(tied, k=3, token_budget=100)) == [4, 6, 9]


MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of Spain?"},
]


def test_turns_layout_best_example_last() -> None:
    best, second = _ex(1, 0.9), _ex(2, 0.8)
    original = copy.deepcopy(MESSAGES)
    out = augment_messages(MESSAGES, [best, second], style="turns")
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert out[1]["content"] == "question 2" and out[2]["content"] == "answer 2"
    assert out[3]["content"] == "question 1" and out[4]["content"] == "answer 1"  # next to the question
    assert out[0] == MESSAGES[0] and out[-1] == MESSAGES[-1]
    assert original == MESSAGES


def test_turns_without_system_message_go_first() -> None:
    conversation = [
        {"role": "user", "content": "Tell me about Paris."},
        {"role": "assistant", "content": "It is the capital of France."},
        {"role": "user", "content": "What are its landmarks?"},
    ]
    out = augment_messages(conversation, [_ex(1, 0.9)], style="turns")
    assert [m["content"] for m in out] == ["question 1", "answer 1", *(m["content"] for m in conversation)]


def test_system_style_creates_system_message() -> None:
    messages = [{"role": "user", "content": "What is the capital of Spain?"}]
    original = copy.deepcopy(messages)
    out = augment_messages(messages, [_ex(1, 0.9), _ex(2, 0.8)], style="system")
    assert [m["role"] for m in out] == ["system", "user"]
    assert out[0]["content"] == (
        f"{SYSTEM_BLOCK_HEADER}\nQ: question 1\nA: answer 1\n\nQ: question 2\nA: answer 2"
    )
    assert messages == original


def test_system_style_merges_into_existing_system_message() -> None:
    original = copy.deepcopy(MESSAGES)
    out = augment_messages(MESSAGES, [_ex(1, 0.9)], style="system")
    assert [m["role"] for m in out] == ["system", "user"]
    assert out[0]["content"] == f"You are terse.\n\n{SYSTEM_BLOCK_HEADER}\nQ: question 1\nA: answer 1"
    assert out[1] == MESSAGES[1]
    assert original == MESSAGES
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be kind."}]}, MESSAGES[1]]
    parts_copy = copy.deepcopy(parts)
    out = augment_messages(parts, [_ex(1, 0.9)], style="system")
    assert out[0]["content"][0] == {"type": "text", "text": "Be kind."}
    assert out[0]["content"][1]["text"].startswith(SYSTEM_BLOCK_HEADER)
    assert parts == parts_copy


def test_no_examples_returns_an_equal_copy() -> None:
    out = augment_messages(MESSAGES, [], style="system")
    assert out == MESSAGES and out is not MESSAGES and out[0] is not MESSAGES[0]
    with pytest.raises(ValueError):
        augment_messages(MESSAGES, [_ex(1, 0.9)], style="prose")  # type: ignore[arg-type]


def test_estimate_tokens_and_budget() -> None:
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("x" * 400) == 100
    assert example_budget(2048, prompt_tokens=48, max_tokens=96, share=0.5) == (2048 - 48 - 96) // 2
    assert example_budget(2048, prompt_tokens=48, max_tokens=None) == (2048 - 48 - 512) // 2
    assert example_budget(512, prompt_tokens=500, max_tokens=96) == 0
    with pytest.raises(ValueError):
        example_budget(2048, 10, 10, share=1.5)
