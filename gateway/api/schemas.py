"""Request bodies of the OpenAI API, validated loosely enough for drop-in use.

Known fields are checked (types and ranges); unknown fields are kept and pass
through to the backend, as OpenAI-compatible servers grow new parameters faster
than any gateway.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Passthrough(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(Passthrough):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(Passthrough):
    include_usage: bool = False


class SamplingParams(Passthrough):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingParams):
    prompt: str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(Passthrough):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class FeedbackRequest(BaseModel):
    """Feedback on one answer: -1 (bad) to 1 (good)."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=64)
    score: float = Field(ge=-1, le=1)
