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
    if (body.get("n") or 1) > 1:
        return Cacheability(False, False, "n > 1")
    temperature = body.get("temperature")
    if temperature is not None and temperature > 0 and not allow_sampled:
        return Cacheability(False, False, f"temperature {temperature} > 0")
    return Cacheability(True, True, "cacheable")
