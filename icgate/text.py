"""Text helpers every part of icgate shares, defined once: the libraries, the gateway and the training
commands must agree on them (a router trained on one prompt-token count and served another is wrong
without failing). Imports nothing of icgate's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

CHARS_PER_TOKEN = 4  # about four characters a token: no tokenizer on the request path
TEXT_PART_TYPES = frozenset({"text", "input_text"})
BUCKETS = 10
TRAIN_BUCKETS = tuple(range(8))  # buckets 0-7 train, 8-9 are held out, everywhere
HELD_OUT_BUCKETS = (8, 9)

Message = Mapping[str, Any]


def message_text(content: object) -> str:
    """The text of a message's `content`: a string, or the text parts of a list of parts joined by
    newlines; anything else (images, audio, a malformed part) contributes nothing."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def last_user_text(messages: Sequence[Message]) -> str:
    """The last user turn's text: what a chat request asks (its question, for the cache and the router)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def prompt_text(body: Mapping[str, Any], endpoint: str) -> str:
    """What a request asks: a chat request's last user turn, a completion's prompt."""
    if endpoint == "chat":
        return last_user_text(body.get("messages") or [])
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else ""


def estimate_tokens(text: str) -> int:
    """Tokens in `text` at `CHARS_PER_TOKEN`, at least one: the estimate behind every token budget."""
    return max(1, len(text) // CHARS_PER_TOKEN)


def estimate_prompt_tokens(body: Mapping[str, Any], endpoint: str) -> int:
    """A request's prompt tokens, estimated over every message's text (a completion: its prompt).

    The router's `prompt_tokens` feature is this number both when it is trained and when it is served.
    """
    if endpoint == "chat":
        messages = body.get("messages") or []
        return estimate_tokens("".join(message_text(m.get("content")) for m in messages))
    return estimate_tokens(str(body.get("prompt", "")))


def conversation_depth(messages: Sequence[Message]) -> int:
    """User turns so far: the router's `conversation_depth` feature."""
    return sum(1 for m in messages if m.get("role") == "user")


_TRUE = frozenset({"true", "t", "yes", "y", "1", "1.0"})
_FALSE = frozenset({"false", "f", "no", "n", "0", "0.0"})


def is_flag(text: str) -> bool:
    """Whether a data file's cell reads as a True/False label (see `parse_flag`)."""
    return text.strip().lower() in _TRUE | _FALSE


def parse_flag(value: object, where: str, expected: str = "expected True/False") -> bool:
    """A True/False-like label in a data file (bool, 0/1, true/false, yes/no) as a bool; anything else is
    a ValueError saying `where` and what was `expected`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and is_flag(value):
        return value.strip().lower() in _TRUE
    raise ValueError(f"{where}: {expected}, got {value!r}")


def normalise(text: str) -> str:
    """Case and whitespace folded: texts that differ only there are the same text."""
    return " ".join(text.lower().split())


def bucket_of(key: str, buckets: int = BUCKETS) -> int:
    """A deterministic bucket for a key (a normalised prompt, a question id): sha1 mod `buckets`.

    It depends only on the key, never on file order, so a prompt lands in the same bucket in every file;
    the router, the length predictor and the hit verifier all split by it (buckets 0-7 train, 8-9 are
    held out), so held-out reports stay honest.
    """
    digest = hashlib.sha1(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def is_held_out(key: str) -> bool:
    return bucket_of(key) in HELD_OUT_BUCKETS


# Every pattern runs in time linear in the text (prompts may be megabytes): an e-mail's local part starts
# only where a run of its characters starts (or at a "+" right after an earlier address), because a bare
# `[\w.+-]+@` tried at every position of a long run of letters is quadratic (20 KB took 2.7 s).
_PII = (
    (re.compile(r"(?:(?<![\w.+-])[\w.+-]+|(?<=[\w.-])\+[\w.-]*)@[\w-]+\.[\w.-]+"), "[email]"),
    (re.compile(r"\b(?:\d[ -]?){13,19}\b"), "[card]"),
    (re.compile(r"(?<!\w)\+?\d[\d ().-]{7,}\d(?!\w)"), "[phone]"),
)


def scrub_pii(text: str) -> str:
    """E-mail addresses, card-like and phone-like numbers masked: what is stored for later reuse
    (cache entries, route samples) keeps the question and drops the person."""
    for pattern, mask in _PII:
        text = pattern.sub(mask, text)
    return text
