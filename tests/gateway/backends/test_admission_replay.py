"""Admission in front of a vLLM-like backend at 1.5x its capacity, replayed on a virtual clock
(tests/gateway/backends/replay.py): the same numbers on every run, a few seconds of CPU."""

from __future__ import annotations

from tests.gateway.backends.replay import Setup, replay, summarise, workload

LOAD = 1.5
REQUESTS = 800


def test_the_engine_stand_in_costs_what_it_says() -> None:
    """One request alone: its prefill, then a step per token at a batch of one."""
    setup = Setup()
    (result,) = replay(setup, workload(1, rate=1.0, seed=3))
    request = result.request
    cost = setup.cost
    first = cost.prefill_s(request.prompt)
    assert result.outcome == "served" and result.waited_s == 0.0
    assert result.ttft_s is not None and abs(result.ttft_s - first) < 1e-9
    assert result.tpot_s is not None and abs(result.tpot_s - cost.step_s(1)) < 1e-9


def test_few_429s_come_after_queueing_once_tokens_are_counted_and_misses_measured() -> None:
    requests = workload(REQUESTS, LOAD * Setup().capacity_rps(), seed=0, noise=0.6)
    # The wait as predicted from elapsed time alone, with nothing added for the queue's misses...
    before = summarise(replay(Setup(counted=False, admission={"wait_quantile": None}), requests), Setup())
    # ...and with streams' tokens counted and the misses' 95th percentile (the default) added.
    after = summarise(replay(Setup(), requests), Setup())
    assert before.late_share is not None and after.late_share is not None
    assert before.late_share > 0.1
    assert after.late_share < 0.1
    assert after.good > 0.95 * before.good  # refusing earlier serves (nearly) as many in time


def test_the_tpot_objective_keeps_an_oversized_batch_from_slowing_every_stream() -> None:
    requests = workload(REQUESTS, LOAD * Setup().capacity_rps(), seed=0, noise=0.6)
    # 64 slots where 30 keep TPOT within 100 ms: an operator who did not size max_concurrent for it.
    blind = summarise(replay(Setup(max_concurrent=64, tpot_objective=False), requests), Setup())
    aware = summarise(replay(Setup(max_concurrent=64), requests), Setup())
    assert blind.tpot_miss > 0.5 * blind.served
    assert aware.tpot_miss < 0.05 * aware.served
    assert aware.good > 2 * blind.good
