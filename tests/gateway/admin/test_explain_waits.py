"""The explainer's words for admission's waits: predicted against actual, and a 429 after queueing."""

from __future__ import annotations

from tests.gateway.admin.test_explain import facts, row


def test_an_admitted_request_shows_its_predicted_wait_beside_the_actual_one() -> None:
    decision = facts(row({"admit": {"backend": "small", "queue_ms": 310.0, "predicted_wait_ms": 800.0}}))
    assert decision["admit.decision"].value == "queued 310 ms (predicted 800 ms) on small"


def test_a_refusal_says_whether_it_came_after_waiting() -> None:
    late = {
        "refused": "could not start in time",
        "at": "queued",
        "waited_ms": 1402.5,
        "predicted_wait_ms": 200,
    }
    found = facts(row({"admit": late}, status_code=429, queue_ms=1402.5))
    assert found["admit.decision"].value == "refused after waiting 1402 ms: could not start in time"
    early = {"refused": "cannot start in time", "at": "arrival", "waited_ms": 0.0, "predicted_wait_ms": 4000}
    assert facts(row({"admit": early}, status_code=429))["admit.decision"].value == (
        "refused: cannot start in time"
    )
