"""In-context examples (IC-Cache): which past request/response pairs to show the small model, and how.

A request that misses the cache and goes to the small tier is augmented with a few similar past pairs whose
answers (mostly from the large tier) show the small model what a good answer looks like. Two decisions live
here, both pure functions over plain records:

- `choose_examples`: which pairs, within a token budget (`example_budget` derives it from the backend's
  context window).
- `augment_messages`: where they go in the chat, as earlier user/assistant turns or inside the system prompt.
  `bench/examples_format.py` measures which of the two helps the small local model more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

SYSTEM_BLOCK_HEADER = "Examples of good answers to similar questions:"
DEFAULT_ANSWER_SHARE = 0.25  # of the context window, reserved for the answer when max_tokens is not given
_LEADING_ROLES = ("system", "developer")  # instructions that stay before the examples


@dataclass(frozen=True)
class Example:
    """One cached pair offered as an in-context example, with the facts the choice is made on."""

    entry_id: int
    prompt: str  # the past request's user text
    response: str  # its answer
    similarity: float  # cosine to the current request
    utility: (
        float  # 0..1, higher = more useful (large-tier answers, feedback, past outcomes); set by the caller
    )
    tier: str  # the tier that produced the answer
    tokens: int  # prompt + response tokens, estimated
    vector: npt.NDArray[np.floating[Any]] | None = None  # the past request's embedding, for diversity


def example_budget(
    context_window: int, prompt_tokens: int, max_tokens: int | None, share: float = 0.5
) -> int:
    """Tokens the examples may take: `share` of the room the backend's window leaves after prompt and answer.

    Without `max_tokens` the answer may run to the end of the window, so a quarter of the window is kept
    for it. The rest of the free room (1 - share) is slack for the chat template and the estimate's error.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be within [0, 1], got {share}")
    answer = max_tokens if max_tokens is not None else int(context_window * DEFAULT_ANSWER_SHARE)
    free = context_window - prompt_tokens - answer
    return max(0, int(free * share))


def choose_examples(
    candidates: list[Example],
    k: int,
    token_budget: int,
    min_similarity: float = 0.5,
    mmr_lambda: float = 0.7,
    utility_weight: float = 0.3,
    duplicate_similarity: float = 0.95,
) -> list[Example]:
    """Up to `k` examples, best first, whose tokens together fit in `token_budget`.

    Why these steps (IC-Cache): an example helps only when it is about the same thing as the request, so
    relevance comes first and anything below `min_similarity` is dropped. Among relevant pairs, the useful
    ones teach more: a large-tier answer, or one that earned good feedback, is a better model to imitate,
    so each candidate scores `(1 - utility_weight) * similarity + utility_weight * utility`. Finally, k
    copies of one question teach what one copy does, so the choice is greedy maximal marginal relevance:
    `mmr_lambda * score - (1 - mmr_lambda) * (highest cosine to an example already chosen)`, and a
    candidate closer than `duplicate_similarity` to a chosen one (or with the same prompt text, when
    vectors are missing) is skipped outright. A candidate that does not fit in the tokens still left is
    skipped and smaller ones are still considered. Deterministic: equal values are ordered by entry_id.
    """
    if k <= 0 or token_budget <= 0:
        return []
    pool = [c for c in candidates if c.similarity >= min_similarity and 0 <= c.tokens <= token_budget]
    pool.sort(key=lambda c: c.entry_id)  # the order of the input never matters
    scores = [(1.0 - utility_weight) * c.similarity + utility_weight * c.utility for c in pool]
    units = [_unit(c.vector) for c in pool]
    texts = [_normalise_text(c.prompt) for c in pool]
    redundancy = [0.0] * len(pool)  # highest cosine to any chosen example
    chosen: list[int] = []
    left = set(range(len(pool)))
    remaining = token_budget
    while left and len(chosen) < k:
        best = min(left, key=lambda i: (-(mmr_lambda * scores[i] - (1.0 - mmr_lambda) * redundancy[i]), i))
        left.discard(best)
        if pool[best].tokens > remaining:
            continue
        chosen.append(best)
        remaining -= pool[best].tokens
        for i in list(left):
            if pool[i].tokens > remaining or texts[i] == texts[best]:
                left.discard(i)
                continue
            a, b = units[i], units[best]
            if a is None or b is None:
                continue
            cosine = float(a @ b)
            if cosine > duplicate_similarity:
                left.discard(i)
            else:
                redundancy[i] = max(redundancy[i], cosine)
    return [pool[i] for i in chosen]


def augment_messages(
    messages: list[dict[str, Any]], examples: list[Example], style: Literal["turns", "system"] = "turns"
) -> list[dict[str, Any]]:
    """A new message list with `examples` (best first, as `choose_examples` returns them) shown to the model.

    "turns": each example becomes an earlier user/assistant exchange, placed after the leading system
    messages and before the conversation, the best one last so that it sits next to the question.
    "system": a block "Examples of good answers to similar questions:" with Q:/A: lines, best first, is
    appended to the leading system message (one is created when there is none). The input is never changed.
    """
    result = [dict(m) for m in messages]
    if not examples:
        return result
    start = 0
    while start < len(result) and result[start].get("role") in _LEADING_ROLES:
        start += 1
    if style == "turns":
        turns: list[dict[str, Any]] = []
        for example in reversed(examples):
            turns.append({"role": "user", "content": example.prompt})
            turns.append({"role": "assistant", "content": example.response})
        return result[:start] + turns + result[start:]
    if style == "system":
        block = format_examples_block(examples)
        for message in result[:start]:
            if message.get("role") == "system":
                message["content"] = _append_text(message.get("content"), block)
                return result
        return [{"role": "system", "content": block}, *result]
    raise ValueError(f"unknown example style {style!r}")


def format_examples_block(examples: list[Example]) -> str:
    """The examples as the text block that the "system" style adds to the system prompt."""
    pairs = "\n\n".join(f"Q: {e.prompt.strip()}\nA: {e.response.strip()}" for e in examples)
    return f"{SYSTEM_BLOCK_HEADER}\n{pairs}"


def _append_text(content: Any, block: str) -> Any:
    """System content with `block` after it: a string, or a list of content parts (a new list)."""
    if isinstance(content, list):
        return [*content, {"type": "text", "text": block}]
    text = str(content or "").rstrip()
    return f"{text}\n\n{block}" if text else block


def _unit(vector: npt.ArrayLike | None) -> npt.NDArray[np.float64] | None:
    if vector is None:
        return None
    v = np.asarray(vector, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0.0 else None


def _normalise_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()
