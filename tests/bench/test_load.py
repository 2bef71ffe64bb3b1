"""bench/load.py: what the client sends, how a 429 is classified, the policies and configs of the systems,
the run plan, and a replay against a simulator that alone knows each answer's length."""

from __future__ import annotations

import argparse
import asyncio
import json
from contextlib import AsyncExitStack
from typing import Any

import pytest

from bench import content_trace as ct
from bench import load
from bench.simulator import EngineConfig, Simulator, running_simulator
from icgate.gateway.backends.admission import Admission, AdmissionRefused, Ask
from icgate.gateway.config import AdmissionConfig, BackendConfig
from icgate.gateway.pipeline.admit import refusal

FAST = EngineConfig(
    max_num_seqs=16,
    kv_cache_tokens=20_000,
    prefill_ms_per_token=0.001,
    prefill_ms_base=0.5,
    decode_ms_base=1.0,
    decode_ms_per_seq=0.1,
    default_max_tokens=3,
)


def args(**overrides: Any) -> argparse.Namespace:
    return load.build_parser().parse_args([f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()])


def item(i: int, output: int) -> ct.Item:
    return ct.Item("gsm8k", str(i), "m", (("user", f"Question number {i}: how many apples?"),), 9, output)


def rows() -> list[load.TraceRow]:
    return [
        load.TraceRow(0.00, 9, 17, item=item(1, 17)),
        load.TraceRow(0.05, 9, 40, item=item(2, 40)),
        load.TraceRow(0.10, 30, 5, rid="x01"),
        load.TraceRow(0.15, 30, 25, rid="x02"),
        load.TraceRow(0.20, 9, 2, item=item(3, 2)),
    ]


# --------------------------------------------------------------------------- what the client sends


def test_client_modes_decide_max_tokens() -> None:
    arrival = load.Arrival(0, 0.0, 9, 17, rows()[0])
    assert load.outcome_for(arrival, load.NO_MAX_TOKENS).max_tokens is None
    assert load.outcome_for(arrival, load.client_mode("cap1024")).max_tokens == 1024
    assert load.outcome_for(arrival, load.client_mode("4096")).max_tokens == 4096
    assert load.outcome_for(arrival, load.ORACLE).max_tokens == 17
    with pytest.raises(ValueError):
        load.client_mode("cap0")


def test_the_body_carries_the_real_conversation_and_no_max_tokens_unless_asked() -> None:
    out = load.outcome_for(load.Arrival(0, 0.0, 9, 17, rows()[0]), load.NO_MAX_TOKENS)
    body = json.loads(load.chat_body("auto", out.prompt_tokens, out.max_tokens, out.messages))
    assert "max_tokens" not in body and "max_completion_tokens" not in body
    assert body["messages"] == [{"role": "user", "content": "Question number 1: how many apples?"}]
    capped = json.loads(load.chat_body("auto", 9, 1024, out.messages))
    assert capped["max_tokens"] == 1024
    azure = load.outcome_for(load.Arrival(2, 0.0, 30, 5, rows()[2]), load.NO_MAX_TOKENS)
    assert azure.messages is not None and azure.messages[0]["content"].startswith("x01 tok tok")


def test_the_per_request_log_leaves_the_prompts_out(tmp_path: Any) -> None:
    out = load.outcome_for(load.Arrival(0, 0.0, 9, 17, rows()[0]), load.NO_MAX_TOKENS)
    load.dump_outcomes(tmp_path / "r.jsonl", [out])
    record = json.loads((tmp_path / "r.jsonl").read_text())
    assert "messages" not in record and record["output_tokens"] == 17 and record["max_tokens"] is None


# --------------------------------------------------------------------------- refusals


def _backend() -> BackendConfig:
    return BackendConfig.model_validate(
        {
            "name": "a",
            "model": "openai/a",
            "max_concurrent": 1,
            "expected_ttft_ms": 100,
            "expected_tpot_ms": 10,
        }
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_icgates_own_429_bodies_tell_a_refusal_at_arrival_from_one_after_queueing() -> None:
    clock, a = Clock(), _backend()
    adm = Admission(
        [a], AdmissionConfig.model_validate({"max_queue_wait_s": 30}), clock=clock, signals_clock=clock
    )

    async def wait_in_line() -> None:
        async with adm.hold(a, Ask(10, 10, ttft_slo_s=1.0, arrived=clock())):
            pytest.fail("granted a slot it could not use in time")

    async with AsyncExitStack() as holding:
        await holding.enter_async_context(adm.hold(a, Ask(10, 10, arrived=clock())))
        late = Ask(10, 10, ttft_slo_s=1.0, arrived=clock())
        clock.now = 0.9
        with pytest.raises(AdmissionRefused) as at_once:
            adm.place(late, [a])
        clock.now = 0.0
        waiter = asyncio.create_task(wait_in_line())
        await asyncio.sleep(0)
        clock.now = 5.0
    with pytest.raises(AdmissionRefused) as queued:
        await waiter

    def body(refused: AdmissionRefused) -> str:
        return json.dumps(refusal(refused).body())

    # The kind comes from what icgate says, not from how long the refusal took.
    assert load.refusal_kind(body(at_once.value), waited_s=3.0) == "arrival"
    assert load.refusal_kind(body(queued.value), waited_s=0.01) == "queue"
    litellm = (
        '{"error": {"message": "Deployment has all max_parallel_requests slots in use.", "code": "429"}}'
    )
    assert load.refusal_kind(litellm, waited_s=2.0) == "arrival"  # LiteLLM never waits for a slot
    cooled = '{"error": {"message": "litellm.RateLimitError: No deployments available for selected model"}}'
    assert load.refusal_kind(cooled, waited_s=2.0) == "arrival"
    assert load.refusal_kind("rate limited", waited_s=2.0) == "queue"  # unknown gateway: by time


def test_summary_counts_late_refusals_and_prediction_error() -> None:
    def done(predicted: int, tokens: int) -> load.Outcome:
        return load.Outcome(
            0, 10, None, sent=0.0, first_token=0.1, ended=0.1 + 0.01 * tokens, status=200,
            completion_tokens=tokens, done=True, predicted_tokens=predicted, output_tokens=tokens,
        )  # fmt: skip

    refused = [
        load.Outcome(0, 10, None, sent=0.0, ended=0.01, status=429, refusal="arrival"),
        load.Outcome(0, 10, None, sent=0.0, ended=1.2, status=429, refusal="queue"),
    ]
    outcomes = [done(100, 100), done(50, 200), done(300, 150), *refused]
    summary = load.summarize(outcomes, "t", 1.0, "icgate", 10.0, 100, args())
    assert (summary["refused"], summary["refused_late"], summary["refused_late_wait_s"]) == (2, 1, 1.2)
    assert summary["predicted_mae"] == pytest.approx((0 + 150 + 150) / 3)
    assert summary["predicted_under"] == pytest.approx(1 / 3)
    assert summary["good"] == 3


def test_gap_closed_is_the_share_of_the_constant_to_oracle_gap() -> None:
    assert load.gap_closed(3.0, 2.0, 4.0) == 0.5
    assert load.gap_closed(2.0, 2.0, 2.0) is None


# --------------------------------------------------------------------------- systems


def setup(trace_rows: list[load.TraceRow] | None = None) -> tuple[load.TraceSetup, dict[load.Tier, load.Sim]]:
    """A sized trace (default: `rows()`) and two simulators that are never started."""
    trace = load.Trace("t", rows() if trace_rows is None else trace_rows, 0)
    capacity = {t: load.Capacity(2.0, 2.0, 100.0, 100.0) for t in load.TIERS}
    plans = {t: load.plan_backend(EngineConfig.preset(t), t, trace.rows, 100.0) for t in load.TIERS}
    sims = {
        t: load.Sim(t, EngineConfig.preset(t), 9000 + i, load.Managed(t, [], "", load.REPO / "unused"))
        for i, t in enumerate(load.TIERS)
    }
    return load.TraceSetup(trace, capacity, 20, plans), sims


def test_every_icgate_system_gets_a_policy_icgate_accepts() -> None:
    s, sims = setup()
    a = args()
    policies = {
        key: load.icgate_policy(s, sims, system.admission, a, system.lengths)
        for key, system in load.SYSTEMS.items()
        if system.kind == "icgate"
    }
    for key, policy in policies.items():
        assert load.policy_problem(policy) is None, key
    learned = policies["icgate"]
    assert learned["cache"] == {
        "enabled": True,
        "exact": False,
        "semantic": True,
        "examples": False,
        "store": False,
    }
    assert learned["embedding"]["preload"] is True
    assert policies["icgate-constant"]["lengths"] == {
        "predictor": "constant",
        "constant_tokens": round(s.mean_output),
    }
    assert policies["icgate-oracle"]["lengths"]["constant_tokens"] == load.ORACLE_CONSTANT
    assert load.SYSTEMS["icgate-oracle"].client == load.ORACLE
    assert policies["icgate-off"]["admission"]["enabled"] is False
    assert policies["icgate-off"]["cache"] == {"enabled": False}
    assert load.policy_problem({**learned, "lengths": {"predictor": "psychic"}}) is not None


def test_litellm_with_max_parallel_requests_gets_icgates_concurrency_caps() -> None:
    s, sims = setup()
    config = load.litellm_config(s, sims, "least-busy", max_parallel=True)
    caps = [m["litellm_params"]["max_parallel_requests"] for m in config["model_list"]]
    assert caps == [s.plans[t].max_concurrent for t in load.TIERS]
    plain = load.litellm_config(s, sims, "simple-shuffle")
    assert all("max_parallel_requests" not in m["litellm_params"] for m in plain["model_list"])
    assert [m["litellm_params"]["weight"] for m in plain["model_list"]] == [2.0, 2.0]


def test_the_default_plan_runs_content_capped_at_one_point_five_only() -> None:
    plan = [(t, x, c.key) for t, x, c in load.run_plan(args())]
    assert plan[:4] == [("content", 1.0, "none"), ("content", 1.5, "none"), ("content", 1.5, "cap1024"),
                        ("content", 2.0, "none")]  # fmt: skip
    assert ("code", 1.5, "none") in plan and ("conv", 2.0, "none") in plan
    assert all(c == "none" for t, _, c in plan if t != "content")
    assert all(c.key == "none" for _, _, c in load.run_plan(args(capped="none")))


# --------------------------------------------------------------------------- a replay


def test_without_max_tokens_every_answer_still_has_its_true_length(tmp_path: Any) -> None:
    trace = load.Trace("t", [*rows(), load.TraceRow(0.3, 9, 1, rid="zzz")], 0)
    book = load.length_book([trace])
    with running_simulator(Simulator(FAST, model_name="sim", lengths=book)) as url:
        endpoint = load.Endpoint(url + "/v1/chat/completions", "sim")
        arrivals = load.schedule(trace, 20.0, 0.25)
        outcomes = asyncio.run(load.replay(endpoint, arrivals, 0.25, 10.0, load.NO_MAX_TOKENS))
        capped = asyncio.run(load.replay(endpoint, arrivals, 0.25, 10.0, load.client_mode("20")))
    assert [o.completion_tokens for o in outcomes] == [17, 40, 5, 25, 2]
    assert all(o.max_tokens is None and o.completed for o in outcomes)
    assert [o.completion_tokens for o in capped] == [17, 20, 5, 20, 2]


def test_a_straggler_counts_only_while_it_can_still_be_good() -> None:
    goals = load.Objectives(ttft_s=1.0, tpot_s=0.1)
    waiting = load.Outcome(0, 9, None, sent=0.0, output_tokens=50)
    assert goals.can_still_be_good(waiting, 0.9) and not goals.can_still_be_good(waiting, 1.1)
    streaming = load.Outcome(0, 9, None, sent=0.0, first_token=0.5, output_tokens=50)
    assert goals.can_still_be_good(streaming, 0.5 + 49 * 0.1 - 0.01)
    assert not goals.can_still_be_good(streaming, 0.5 + 49 * 0.1 + 0.01)
    capped = load.Outcome(0, 9, 10, sent=0.0, first_token=0.5, output_tokens=50)  # cut at max_tokens 10
    assert not goals.can_still_be_good(capped, 0.5 + 9 * 0.1 + 0.01)
    late_start = load.Outcome(0, 9, None, sent=0.0, first_token=1.2, output_tokens=50)
    assert not goals.can_still_be_good(late_start, 1.3)
    arrivals = [load.Arrival(0, 0.0, 9, 700), load.Arrival(1, 0.1, 9, 20)]
    assert goals.straggle_s(arrivals, 30.0) == pytest.approx(1.0 + 70.0 + 1.0)
    assert goals.straggle_s(arrivals[1:], 30.0) == 30.0
