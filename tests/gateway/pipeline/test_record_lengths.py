"""Length samples on plain data: which answers become a backend's training rows, and that a row holds the
features the request was served with."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from icgate.gateway.config import TelemetryConfig
from icgate.gateway.pipeline.cache_lookup import CacheLookup
from icgate.gateway.pipeline.record import Recorder, Trail, length_sample_of
from icgate.gateway.pipeline.route import route_features
from icgate.gateway.records import RequestContext
from icgate.gateway.store.length_samples import LengthSample, is_truncated
from icgate.gateway.telemetry import Telemetry
from icgate.lengths.predict import prompt_features
from icgate.text import prompt_text
from tests.gateway.pipeline.fakes import chat_ctx, make_policy

POLICY = make_policy()
SMALL = POLICY.backend("small")
LONG = "Explain, step by step, how tides work. " + "Background: " + "the moon pulls the sea. " * 200


def answered(
    ctx: RequestContext, finish: str | None = "stop", tokens: int = 42, choices: int = 1
) -> dict[str, Any]:
    ctx.route, ctx.backend, ctx.status_code = "small", SMALL, 200
    ctx.prompt_tokens, ctx.completion_tokens = 8, tokens
    choice = {"index": 0, "message": {"role": "assistant", "content": "..."}, "finish_reason": finish}
    return {"object": "chat.completion", "choices": [choice] * choices, "usage": {}}


def lookup_with(ctx: RequestContext, vector: np.ndarray | None) -> CacheLookup:
    text = ctx.body["messages"][-1]["content"]
    return CacheLookup(
        namespace="anonymous",
        exact_key="k",
        servable=True,
        storable=True,
        embed_text=text,
        prompt_text=text,
        fingerprint="",
        exact=True,
        semantic=True,
        examples=True,
        store=True,
        vector=vector,
    )


def test_an_answer_is_a_sample_of_what_the_route_stage_read() -> None:
    ctx = chat_ctx(LONG, max_tokens=500)
    vector = np.linspace(-1, 1, 384, dtype=np.float32)
    sample = length_sample_of(ctx, Trail(lookup=lookup_with(ctx, vector)), answered(ctx))
    assert sample is not None
    assert (sample.backend, sample.completion_tokens, sample.finish_reason, sample.max_tokens) == (
        "small",
        42,
        "stop",
        500,
    )
    assert np.array_equal(np.frombuffer(sample.embedding or b"", dtype=np.float32), vector)
    # Training = serving: the stored window gives the features the request was predicted with.
    served = route_features(ctx)
    assert sample.prompt_tokens == served.prompt_tokens
    np.testing.assert_array_equal(
        prompt_features(sample.prompt_tokens, sample.prompt_text),
        prompt_features(served.prompt_tokens, prompt_text(ctx.body, ctx.endpoint)),
    )
    assert len(sample.prompt_text) < len(LONG)  # only the window the features read is kept


def test_a_sample_scrubs_pii_and_keeps_no_embedding_it_did_not_have() -> None:
    ctx = chat_ctx("Write to bob@example.com about the invoice.")
    sample = length_sample_of(ctx, Trail(), answered(ctx))
    assert sample is not None and sample.embedding is None and sample.max_tokens is None
    assert "bob@example.com" not in sample.prompt_text


@pytest.mark.parametrize(
    ("finish", "choices", "kept"),
    [("stop", 1, True), ("length", 1, True), ("tool_calls", 1, False), (None, 1, False), ("stop", 2, False)],
)
def test_which_answers_say_something_about_length(finish: str | None, choices: int, kept: bool) -> None:
    ctx = chat_ctx("Name three colours.")
    sample = length_sample_of(ctx, Trail(), answered(ctx, finish, choices=choices))
    assert (sample is not None) is kept


def test_a_streamed_answer_is_read_from_the_stream() -> None:
    ctx = chat_ctx("Name three colours.", stream=True)
    answered(ctx)
    ctx.finish_reason = "length"
    sample = length_sample_of(ctx, Trail(), None)
    assert sample is not None and sample.finish_reason == "length"


def test_cache_hits_errors_and_empty_answers_are_not_samples() -> None:
    hit = chat_ctx("Name three colours.")
    response = answered(hit)
    hit.route = "cache"
    failed = chat_ctx("Name three colours.")
    answered(failed)
    failed.status_code = 502
    empty = chat_ctx("Name three colours.")
    answered(empty, tokens=0)
    for ctx in (hit, failed, empty):
        assert length_sample_of(ctx, Trail(), response) is None


@pytest.mark.parametrize(
    ("tokens", "finish", "cap", "truncated"),
    [
        (100, "stop", None, False),
        (100, "length", None, True),
        (500, "stop", 500, True),
        (499, "stop", 500, False),
    ],
)
def test_truncated_is_said_by_the_backend_or_by_reaching_max_tokens(
    tokens: int, finish: str, cap: int | None, truncated: bool
) -> None:
    assert is_truncated(tokens, finish, cap) is truncated


class Samples:
    def __init__(self) -> None:
        self.got: list[LengthSample] = []

    def submit(self, sample: LengthSample) -> bool:
        self.got.append(sample)
        return True


@pytest.mark.parametrize("learn", [True, False])
async def test_the_recorder_keeps_samples_while_lengths_are_learnt(learn: bool) -> None:
    policy = make_policy(lengths={"learn": learn})
    samples = Samples()
    recorder = Recorder(policy, Telemetry.from_config(TelemetryConfig()), lengths=samples)
    ctx = chat_ctx("Name three colours.")
    recorder.record(ctx, Trail(), answered(ctx))
    assert len(samples.got) == (1 if learn else 0)
