"""Request bodies of the OpenAI API, validated as OpenAI validates them.

Known fields are checked strictly where OpenAI is strict (`stream: "yes"` and
`seed: false` are refused, not coerced); `null` is accepted wherever OpenAI
accepts it. Unknown fields are kept and pass through to the backend, as
OpenAI-compatible servers grow new parameters (`guided_json`, ...) faster than
any gateway. Strings pydantic accepts but that are not Unicode (unpaired
surrogates) are refused by `reject_invalid_text`, which handlers call.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from icgate.gateway.api.bounds import check_request_bounds
from icgate.gateway.config import ServerConfig
from icgate.gateway.errors import GatewayError
from icgate.gateway.records import Endpoint


def _integral(value: object) -> object:
    """JSON has one number type: `2.0` is the integer 2 (JSON Schema says so, and the schema we publish
    says `integer`). A fraction, a boolean or a string is still refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer as JSON spells it: 2 or 2.0, never true or "2".
Integer = Annotated[StrictInt, BeforeValidator(_integral)]
# Bounds go before the validator: so the published schema says `minimum` (after it, pydantic writes
# `ge`, which JSON Schema does not know: clients and schemathesis never saw the bound).
PositiveInteger = Annotated[StrictInt, Field(ge=1), BeforeValidator(_integral)]

# OpenAI's own limit on `n` (its error: "Expected a value <= 128").
MAX_N = 128
# Any UTF-16 surrogate left in a decoded str is unpaired: JSON's "\ud83d\ude00" decodes to one code point.
_SURROGATE = re.compile("[\ud800-\udfff]")
# How a surrogate can reach a decoded body: a JSON escape (`\ud800`), or raw UTF-8 bytes of one, which
# `json.loads` of bytes lets through ("surrogatepass"). Absent both, no string in the body holds one.
_SURROGATE_IN_JSON = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def may_hold_surrogates(raw: bytes) -> bool:
    """A scan of the raw body (in C) that spares the walk of `unpaired_surrogate_at` nearly always."""
    return _SURROGATE_IN_JSON.search(raw) is not None


class Passthrough(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(Passthrough):
    """One part of a message's content. A `text` part must carry a string; other kinds
    (image_url, input_audio, file, refusal, ...) pass through as they are."""

    type: StrictStr

    @model_validator(mode="after")
    def _text_is_a_string(self) -> ContentPart:
        if self.type == "text" and not isinstance((self.model_extra or {}).get("text"), str):
            raise ValueError("a 'text' content part needs a string 'text'")
        return self


class ChatMessage(Passthrough):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None


class StreamOptions(Passthrough):
    include_usage: StrictBool | None = None


class SamplingParams(Passthrough):
    model: StrictStr = Field(min_length=1)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, ge=0, le=1)
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N), BeforeValidator(_integral)] | None = None
    max_tokens: PositiveInteger | None = None
    presence_penalty: StrictFloat | None = Field(None, ge=-2, le=2)
    frequency_penalty: StrictFloat | None = Field(None, ge=-2, le=2)
    stop: StrictStr | list[StrictStr] | None = None
    seed: Integer | None = None
    user: StrictStr | None = None


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInteger | None = None


TokenIds = Annotated[list[Integer], Field(min_length=1)]


class CompletionRequest(SamplingParams):
    # OpenAI documents `null` (its default prompt is the document separator); arrays must not be empty.
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
        | None
    )


class EmbeddingRequest(Passthrough):
    model: StrictStr = Field(min_length=1)
    # Text, texts, token ids of the served model's tokenizer, or lists of those (as OpenAI accepts).
    input: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: PositiveInteger | None = None
    user: StrictStr | None = None


class FeedbackRequest(BaseModel):
    """Feedback on one answer: -1 (bad) to 1 (good)."""

    model_config = ConfigDict(extra="forbid")
    request_id: StrictStr = Field(min_length=1, max_length=64)
    score: StrictFloat = Field(ge=-1, le=1)


def unpaired_surrogate_at(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string holding an unpaired UTF-16 surrogate, else None.

    JSON may spell one (`"\\ud800"`) and Python decodes it, but it is not Unicode: the embedder,
    the database and most backends fail on it. Keys are checked as well as values.
    """
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _SURROGATE.search(key):
                return where
            found = unpaired_surrogate_at(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = unpaired_surrogate_at(item, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


async def reject_invalid_text(request: Request, body: dict[str, Any] | BaseModel) -> None:
    """`check_text` on a request's raw body (cached by Starlette: nothing is read again)."""
    check_text(await request.body(), body)


def accept_completion(
    endpoint: Endpoint, fields: dict[str, Any], raw: bytes, server: ServerConfig
) -> dict[str, Any]:
    """What a validated chat or text completion body gets before the pipeline, over HTTP and in-process
    alike: OpenAI's default prompt, the request bounds, the Unicode check on the raw body."""
    if endpoint == "completions" and fields.get("prompt") is None:
        fields["prompt"] = ""  # OpenAI's documented default: generate from the start of a document
    check_request_bounds(fields, server)
    check_text(raw, fields)
    return fields


def check_text(raw: bytes, body: dict[str, Any] | BaseModel) -> None:
    """A string that is not valid Unicode is the sender's mistake (400), found before any work. The
    walk of the parsed body runs only when a scan of the raw one finds a surrogate could be in it."""
    if not may_hold_surrogates(raw):
        return
    fields = body if isinstance(body, dict) else body.model_dump(exclude_unset=True)
    where = unpaired_surrogate_at(fields)
    if where is not None:
        raise GatewayError(
            400,
            f"Invalid '{where}': the string holds an unpaired UTF-16 surrogate, which is not valid Unicode.",
            param=where,
            code="invalid_unicode",
        )
