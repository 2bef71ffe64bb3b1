"""Routed requests become training samples; feedback labels them; every answer says its predicted length."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import sqlalchemy as sa

from icgate.gateway.config import Policy
from icgate.gateway.store import tables
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

StartGateway = Callable[[Policy], RunningGateway]


def chat(gw: RunningGateway, content: str, model: str = "auto", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    resp = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp


def samples(gw: RunningGateway) -> list[tables.RouteSampleRow]:
    assert gw.gateway.engine is not None and gw.gateway.sample_writer is not None
    deadline = time.monotonic() + 10
    while gw.gateway.sample_writer.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    with gw.gateway.engine.connect() as conn:
        return list(conn.execute(sa.select(tables.RouteSampleRow).order_by(tables.RouteSampleRow.id)))


def test_routed_answers_are_kept_as_scrubbed_samples_and_feedback_labels_them(
    standins: Standins, start_gateway: StartGateway
) -> None:
    gw = start_gateway(standin_policy(standins, "http"))
    routed = chat(gw, "Mail me at jane.doe@example.com: how do I bake bread?")
    chat(gw, "Addressed by name, not routed", model="large")
    [sample] = samples(gw)
    assert sample.request_id == routed.headers["x-icgate-request-id"]
    assert (sample.tier, sample.backend) == ("small", "small")
    assert "jane.doe@example.com" not in sample.prompt_text and "bake bread" in sample.prompt_text
    assert sample.completion_tokens > 0 and sample.label is None

    resp = httpx.post(gw.url + "/v1/feedback", json={"request_id": sample.request_id, "score": -1})
    assert resp.status_code == 200 and resp.json()["route_sample_labelled"] is True
    [labelled] = samples(gw)
    assert (labelled.label, labelled.label_source) == (0.0, "feedback")

    unknown = httpx.post(gw.url + "/v1/feedback", json={"request_id": "req-nope", "score": 1})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "request_id"


def test_predicted_output_length_shows_in_the_header_and_respects_max_tokens(
    standins: Standins, start_gateway: StartGateway
) -> None:
    gw = start_gateway(standin_policy(standins, "http"))
    essay = chat(gw, "Write a detailed essay on the history of the printing press, with examples.")
    short = chat(gw, "Yes or no: is water wet?")
    assert int(essay.headers["x-icgate-predicted-tokens"]) > int(short.headers["x-icgate-predicted-tokens"])
    capped = chat(gw, "Write a detailed essay on the history of the printing press.", max_tokens=7)
    assert int(capped.headers["x-icgate-predicted-tokens"]) <= 7


def test_sample_share_zero_keeps_no_samples(standins: Standins, start_gateway: StartGateway) -> None:
    policy = standin_policy(standins, "http", router={"kind": "rule", "sample_share": 0.0})
    gw = start_gateway(policy)
    chat(gw, "How do I bake bread?")
    assert samples(gw) == []
