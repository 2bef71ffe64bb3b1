"""The exact cache key, and whether a request may be answered from a cache at all."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

# Fields that do not change what the model answers.
_IRRELEVANT = frozenset({"model", "stream", "stream_options", "user", "metadata", "store", "service_tier"})
# Fields whose answers are not reusable: tool calls act on the world, log-probs are per sample.
_UNCACHEABLE = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs")
_SPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Whitespace differences never change the answer; case and punctuation may."""
    return _SPACE.sub(" ", text).strip()


def _normalise_content(content: Any) -> Any:
    if isinstance(content, str):
        return normalise_text(content)
    if isinstance(content, list):
        return [
            {**part, "text": normalise_text(part["text"])}
            if isinstance(part, dict) and "text" in part
            else part
            for part in content
        ]
    return content


def exact_key(endpoint: str, body: dict[str, Any]) -> str:
    """A hash of the normalised request: messages (or prompt) and every output-changing field."""
    canonical: dict[str, Any] = {"endpoint": endpoint}
    for key, value in body.items():
        if key in _IRRELEVANT:
            continue
        if key == "messages":
            value = [{**m, "content": _normalise_content(m.get("content"))} for m in value]
        elif key == "prompt" and isinstance(value, str):
            value = normalise_text(value)
        canonical[key] = value
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# What a semantic hit does NOT key on: fields that never change the answer, the input itself (matched by
# meaning), the output limits (checked against the cached answer instead: `fits_output_limit`), and the
# sampling knobs (`cacheability` and `cache.allow_sampled` decide about sampled requests).
_NOT_SHAPING = _IRRELEVANT | {
    "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
}  # fmt: skip
# Content parts the gateway can read as text; anything else (images, audio, files) it cannot embed.
_TEXT_PARTS = frozenset({"text"})


def output_constraints_key(body: dict[str, Any]) -> str:
    """A hash of every field that shapes the answer besides the input: response_format, stop, seed,
    logit_bias, penalties, tools and any pass-through field (guided_json, ...); "" when there are none.

    A semantic hit must have been answered under the same constraints: a plain-text answer cannot serve
    `response_format: json_object`, an answer that ran past a stop sequence cannot serve `stop`.
    """
    shaping = {k: v for k, v in body.items() if k not in _NOT_SHAPING and v is not None}
    if not shaping:
        return ""
    blob = json.dumps(shaping, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def output_token_limit(body: dict[str, Any]) -> int | None:
    """The most completion tokens the request accepts (`max_tokens`, `max_completion_tokens`), if set."""
    limits = [body[k] for k in ("max_tokens", "max_completion_tokens") if isinstance(body.get(k), int)]
    return min(limits) if limits else None


def fits_output_limit(completion_tokens: int, body: dict[str, Any]) -> bool:
    """A cached answer may serve only a request that would have let it finish."""
    limit = output_token_limit(body)
    return limit is None or completion_tokens <= limit


def has_unreadable_content(messages: list[dict[str, Any]]) -> bool:
    """Whether any message carries content the gateway cannot read as text (images, audio, files)."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(
            not (isinstance(part, dict) and part.get("type") in _TEXT_PARTS) for part in content
        ):
            return True
    return False


@dataclass(frozen=True)
class Cacheability:
    servable: bool  # may be answered from a cache
    storable: bool  # its answer may be stored for later hits
    reason: str


def cacheability(body: dict[str, Any], allow_sampled: bool = False) -> Cacheability:
    """Sampled requests (temperature > 0) get fresh answers unless the policy allows reuse.

    A request without `temperature` counts as deterministic enough: most
    clients never set it, and refusing them would switch the cache off.
    """
    for key in _UNCACHEABLE:
        if body.get(key):
            return Cacheability(False, False, f"{key} set")
    messages = body.get("messages")
    if isinstance(messages, list) and has_unreadable_content(messages):
        # Its meaning is partly in an image or a sound the embedding never sees: two different pictures
        # with the same question would look identical.
        return Cacheability(False, False, "non-text content")
    if (body.get("n") or 1) > 1:
        return Cacheability(False, False, "n > 1")
    temperature = body.get("temperature")
    if temperature is not None and temperature > 0 and not allow_sampled:
        return Cacheability(False, False, f"temperature {temperature} > 0")
    return Cacheability(True, True, "cacheable")
