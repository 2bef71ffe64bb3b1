"""What is embedded for a chat request: the last user turn plus a digest of its context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from icgate.cache.embed import (
    SentenceTransformerEmbedder,
    context_fingerprint,
    conversation_text,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "cache"
CONTEXTUAL = DATA / "contextual_queries.json"
SYNTHETIC = DATA / "Synthetic_Dataset_Diverse.json"


def conversation(row: dict[str, str], follow_up: str | None = None) -> list[dict[str, Any]]:
    """A dataset row as a chat request: main query, its answer, then the follow-up."""
    return [
        {"role": "user", "content": row["Main Query"]},
        {"role": "assistant", "content": row["Main Query Response"]},
        {"role": "user", "content": follow_up if follow_up is not None else row["Follow-Up Query"]},
    ]


def load_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        pytest.skip(f"evaluation data not found: {path} (the shared data folder is absent)")
    rows: list[dict[str, str]] = json.loads(path.read_text())
    return rows


# -- the text, without the model -------------------------------------------------------------------


def test_no_context_is_just_the_user_text() -> None:
    messages = [{"role": "user", "content": "  What are its types?\n"}]
    assert conversation_text(messages) == "What are its types?"
    assert context_fingerprint(messages) == ""


def test_list_of_parts_content() -> None:
    as_parts: list[dict[str, Any]] = [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "this picture?"},
            ],
        },
    ]
    as_strings: list[dict[str, Any]] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is in\nthis picture?"},
    ]
    assert conversation_text(as_parts) == conversation_text(as_strings)
    assert conversation_text(as_parts) == "What is in this picture?\n\ncontext: You are terse."
    assert conversation_text([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) == "hi"
    # an image in the context is part of the context: the fingerprint sees it
    with_image = [
        as_parts[1],
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Why?"},
    ]
    text_only = [
        as_strings[1],
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Why?"},
    ]
    assert conversation_text(with_image) == conversation_text(text_only)
    assert context_fingerprint(with_image) != context_fingerprint(text_only)


def test_context_changes_the_text_and_the_fingerprint() -> None:
    follow_up = {"role": "user", "content": "What are its types?"}
    rocks = [
        {"role": "user", "content": "What is a rock?"},
        {"role": "assistant", "content": "A solid."},
        follow_up,
    ]
    clouds = [
        {"role": "user", "content": "What is a cloud?"},
        {"role": "assistant", "content": "Vapour."},
        follow_up,
    ]
    assert conversation_text(rocks) != conversation_text(clouds)
    assert conversation_text(rocks).startswith("What are its types?\n\ncontext: What is a rock?")
    assert context_fingerprint(rocks) != context_fingerprint(clouds)
    assert len(context_fingerprint(rocks)) == 16
    # the system prompt is context too
    with_system = [{"role": "system", "content": "Answer in French."}, *rocks]
    assert context_fingerprint(with_system) != context_fingerprint(rocks)
    assert "Answer in French." in conversation_text(with_system)


def test_identical_conversations_give_identical_text_and_fingerprint() -> None:
    def build() -> list[dict[str, Any]]:
        return [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me about volcanoes."},
            {"role": "assistant", "content": "Volcanoes are openings in the crust. Magma escapes."},
            {"role": "user", "content": "Which is the tallest?"},
        ]

    assert conversation_text(build()) == conversation_text(build())
    assert context_fingerprint(build()) == context_fingerprint(build())
    # the last user turn is not part of the fingerprint, whitespace is not significant
    other_turn = build()
    other_turn[-1]["content"] = "Which one erupted last?"
    assert context_fingerprint(other_turn) == context_fingerprint(build())
    spaced = build()
    spaced[1]["content"] = "Tell me   about volcanoes.\n"
    assert context_fingerprint(spaced) == context_fingerprint(build())


def test_last_turn_dominates_and_context_is_digested() -> None:
    long_answer = "First sentence of the answer. " + "Padding that should not be embedded. " * 50
    messages = [
        {"role": "system", "content": "S" * 5000},
        {"role": "user", "content": "An earlier question about tides?"},
        {"role": "assistant", "content": long_answer},
        {"role": "user", "content": "And the moon?"},
    ]
    text = conversation_text(messages)
    turn, context = text.split("\n\ncontext: ")
    assert turn == "And the moon?"
    assert "First sentence of the answer." in context and "Padding" not in context
    assert len(context) < 400  # bounded, whatever the size of the conversation
    # most recent earlier user turn first
    more = [
        {"role": "user", "content": "Oldest question?"},
        {"role": "assistant", "content": "Yes."},
        *messages[1:],
    ]
    assert (
        conversation_text(more).split("context: ")[1].startswith("An earlier question about tides? / Oldest")
    )
    # a very long last turn keeps its head and tail, so the context still fits the encoder's window
    huge = [*messages[:3], {"role": "user", "content": "word " * 1000 + "the very end"}]
    huge_turn, huge_context = conversation_text(huge).split("\n\ncontext: ")
    assert len(huge_turn) <= 610 and huge_turn.endswith("the very end") and huge_context


def test_empty_request_is_rejected() -> None:
    with pytest.raises(ValueError):
        conversation_text([])


# -- with the model and the contextual follow-ups of MeanCache ---------------------------------


def test_dataset_case_same_follow_up_in_another_context(embedder: SentenceTransformerEmbedder) -> None:
    """The synthetic set's follow-ups refer back ("this"); asked after another question they must differ."""
    rows = load_rows(SYNTHETIC)
    derivatives = next(r for r in rows if r["Main Query"] == "What are derivatives in finance?")
    bacteria = next(r for r in rows if r["Main Query"] == "What is the role of bacteria in the ecosystem?")
    follow_up = derivatives["Follow-Up Query"]  # "What practical applications does this have in finance?"
    here, there = conversation(derivatives), conversation(bacteria, follow_up)
    assert conversation_text(here) != conversation_text(there)
    assert context_fingerprint(here) != context_fingerprint(there)
    plain = embedder.encode([follow_up, follow_up])
    vectors = embedder.encode([conversation_text(here), conversation_text(there), conversation_text(here)])
    assert float(plain[0] @ plain[1]) > 0.999  # the words alone would be a perfect hit
    assert float(vectors[0] @ vectors[1]) < 0.85  # with their context they are far apart
    assert float(vectors[0] @ vectors[2]) > 0.999  # the same conversation still is a perfect hit


def test_cross_context_follow_ups_stay_below_hit_thresholds(embedder: SentenceTransformerEmbedder) -> None:
    """Each follow-up of contextual_queries.json, asked after a random other main query of the file."""
    rows = load_rows(CONTEXTUAL)
    rng = np.random.default_rng(0)
    main_vectors = embedder.encode([r["Main Query"] for r in rows])
    pairs = []
    for i in range(len(rows)):
        j = int(rng.integers(len(rows)))
        if float(main_vectors[i] @ main_vectors[j]) < 0.8:  # a different question, not a rewording
            pairs.append((i, j))
    assert len(pairs) > 100
    own = embedder.encode([conversation_text(conversation(rows[i])) for i, _ in pairs])
    other = embedder.encode(
        [conversation_text(conversation(rows[j], rows[i]["Follow-Up Query"])) for i, j in pairs]
    )
    cosines = np.sum(own * other, axis=1)
    # plain follow-up text: every one of these pairs is cosine 1.0 (identical words)
    assert float(cosines.max()) < 0.95
    assert float(np.median(cosines)) < 0.8
    assert float(np.mean(cosines > 0.9)) < 0.05
