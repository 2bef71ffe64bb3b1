"""The time-per-output-token objective in admission: the decode model, and who may join a batch."""

from __future__ import annotations

import time
from typing import Any

import pytest

from icgate.gateway.backends.admission import (
    Admission,
    AdmissionRefused,
    Ask,
    BackendSignals,
    DecodeModel,
    Job,
    Relayed,
)
from icgate.gateway.config import AdmissionConfig, BackendConfig

SLO = 0.1  # 100 ms per output token


def backend(name: str = "a", tier: str = "small", **kw: Any) -> BackendConfig:
    return BackendConfig.model_validate(
        {
            "name": name,
            "tier": tier,
            "model": f"openai/{name}",
            "max_concurrent": 32,
            "expected_ttft_ms": 10,
            "expected_tpot_ms": 60,
            **kw,
        }
    )


def admission(*backends: BackendConfig, **config: Any) -> Admission:
    return Admission(list(backends), AdmissionConfig.model_validate(config))


def decoding(output: int, produced: int, tpot_so_far: float, now: float, slo: float | None = SLO) -> Job:
    """A stream that has produced `produced` tokens at `tpot_so_far` each, predicted to give `output`."""
    job = Job(Ask(100, output, tpot_slo_s=slo, output_tokens_p90=output), started=now - 1.0)
    job.first_token_at = now - tpot_so_far * (produced - 1)
    job.produced = lambda: Relayed(produced, 4 * produced)
    return job


def at_the_edge(adm: Admission, now: float) -> None:
    """15 streams half-way through 200-token answers, which ran slower than they will from now on (a
    bigger batch earlier): each is predicted at 99 ms a token to its end, 1 ms under the objective."""
    state = adm.states["a"]
    state.decode.a, state.decode.b = 0.020, 0.0049  # a step: 20 ms + 4.9 ms a sequence (93.5 ms at 15)
    # 99 ms over 199 tokens in all, of which the 100 left at 93.5 ms: the 99 so far took 10.35 s.
    for _ in range(15):
        state.jobs.add(
            decoding(output=200, produced=100, tpot_so_far=(0.099 * 199 - 100 * 0.0935) / 99, now=now)
        )


def test_the_decode_model_starts_from_the_policy_and_learns_the_batch_slope() -> None:
    model = DecodeModel(full_batch_s=0.060, full_batch=30)
    # The prior: 60 ms at a full batch, 30% of it for a lone sequence.
    assert model.step_s(30) == pytest.approx(0.060)
    assert model.step_s(1) == pytest.approx(0.018)
    # A backend whose steps cost 20 ms + 1.5 ms a sequence, seen at batches from 2 to 30.
    for batch in range(2, 31, 2):
        for _ in range(4):
            model.add(batch, 0.020 + 0.0015 * batch)
    assert model.step_s(10) == pytest.approx(0.035, abs=0.002)
    assert model.step_s(40) == pytest.approx(0.080, abs=0.004)


def test_a_backend_always_full_keeps_the_priors_slope_and_learns_its_level() -> None:
    model = DecodeModel(full_batch_s=0.060, full_batch=30)
    for _ in range(100):
        model.add(30, 0.090)  # slower than the policy said, always at the same batch
    assert model.step_s(30) == pytest.approx(0.090, abs=0.002)
    assert 0 < model.b < 0.090 / 30 * 1.5  # a slope from the prior's n = 1, not a flat line or a cliff
    noisy = DecodeModel(full_batch_s=0.060, full_batch=30)
    for batch, tpot in ((5, 0.09), (25, 0.03)) * 20:
        noisy.add(batch, tpot)  # slopes down: never a step that gets cheaper with more sequences
    assert noisy.b == 0.0


def test_finished_streams_teach_the_decode_model_the_batch_they_ran_in() -> None:
    a = backend(max_concurrent=8)
    now = [0.0]
    adm = Admission([a], AdmissionConfig(), clock=lambda: now[0])
    state = adm.states["a"]
    jobs = []
    for _ in range(4):  # four streams from t=0 to t=10, 101 tokens each: 0.1 s a token at a batch of 4
        jobs.append(adm._start(state, Ask(10, 100), now[0]))
    for job in jobs:
        job.first_token_at = 0.0
        job.completion_tokens = 101
    now[0] = 10.0
    for job in jobs:
        adm._finish(state, job)
    assert state.decode.samples == 4
    prior = DecodeModel(0.060, 8).step_s(4)  # 36 ms
    assert prior + 0.03 < state.decode.step_s(4) <= 0.1  # fitted towards the 100 ms it saw at 4
    # Each ran alongside the other three all its life, the last to finish too: a batch of 4, not 1.
    assert [batch for batch, _ in state.decode._samples] == [pytest.approx(4.0)] * 4
    assert [tpot for _, tpot in state.decode._samples] == [pytest.approx(0.1)] * 4


def test_a_long_answer_that_would_push_running_streams_over_their_tpot_is_not_admitted_now() -> None:
    a = backend()
    adm = admission(a)
    now = time.perf_counter()
    at_the_edge(adm, now)
    state = adm.states["a"]
    long = Ask(100, 300, tpot_slo_s=SLO, output_tokens_p90=300)
    breach = adm.tpot_breach(state, long, now)
    # 100 more steps at 16 sequences (+4.9 ms each) and its prefill: over 100 ms for every one of them.
    assert breach is not None and breach.whose == "running"
    assert breach.slo_s == SLO and 0.100 < breach.predicted_s < 0.103
    assert not adm.has_room(state, long, now)  # 15 of 32 slots taken, but no room for it now


def test_a_short_answer_that_fits_is_admitted_next_to_them() -> None:
    a = backend()
    adm = admission(a)
    now = time.perf_counter()
    at_the_edge(adm, now)
    state = adm.states["a"]
    short = Ask(100, 10, tpot_slo_s=SLO, output_tokens_p90=10)  # 10 of their 100 steps
    assert adm.tpot_breach(state, short, now) is None
    assert adm.has_room(state, short, now)
    placed = adm.decide(short, [a])
    assert (placed.backend, placed.spilled, placed.in_flight) == (a, False, 15)


def test_the_long_one_is_refused_at_arrival_or_spilled_when_another_tier_can_take_it() -> None:
    a, other = backend(), backend("b", tier="large")
    adm = admission(a, other)
    now = time.perf_counter()
    at_the_edge(adm, now)
    long = Ask(100, 300, ttft_slo_s=1.5, tpot_slo_s=SLO, output_tokens_p90=300, arrived=now)
    # Its slot would come when the batch shrinks, ~100 tokens from now: past its first-token objective.
    with pytest.raises(AdmissionRefused) as info:
        adm.decide(long, [a])
    assert info.value.stage == "arrival"
    assert "time-per-output-token objective (100 ms; predicted 10" in info.value.reason
    placed = adm.decide(long, [a], spill=[other])
    assert (placed.backend, placed.spilled) == (other, True)


def test_without_a_tpot_objective_the_batch_is_bounded_by_max_concurrent_alone() -> None:
    a = backend()
    adm = admission(a)
    now = time.perf_counter()
    at_the_edge(adm, now)
    for job in adm.states["a"].jobs:
        job.ask = Ask(100, 200, output_tokens_p90=200)  # none of them has an objective, nor the newcomer
    assert adm.tpot_breach(adm.states["a"], Ask(100, 300), now) is None


def test_a_newcomer_whose_own_tpot_would_be_too_slow_waits_for_a_smaller_batch() -> None:
    a = backend()
    adm = admission(a)
    now = time.perf_counter()
    state = adm.states["a"]
    state.decode.a, state.decode.b = 0.020, 0.006  # 110 ms at a batch of 15
    for _ in range(14):  # no objective of their own, and long
        state.jobs.add(decoding(output=400, produced=10, tpot_so_far=0.1, now=now, slo=None))
    own = adm.tpot_breach(state, Ask(100, 50, tpot_slo_s=SLO), now)
    assert own is not None and own.whose == "own" and own.predicted_s == pytest.approx(0.110)
    # A relaxed class fits (and without an objective, anything does, as before).
    assert adm.tpot_breach(state, Ask(100, 50, tpot_slo_s=0.2), now) is None
    # An idle backend always takes a request, whatever its objective.
    state.jobs.clear()
    assert adm.has_room(state, Ask(100, 50, tpot_slo_s=0.001), now)


def test_sequences_the_backend_runs_for_others_count_in_the_batch() -> None:
    a = backend(metrics_url="http://vllm/metrics")
    adm = admission(a)
    now = time.perf_counter()
    state = adm.states["a"]
    state.decode.a, state.decode.b = 0.020, 0.005
    state.jobs.add(decoding(output=400, produced=10, tpot_so_far=0.03, now=now))
    ask = Ask(100, 50, tpot_slo_s=SLO)
    assert adm.tpot_breach(state, ask, now) is None  # a batch of 2: 30 ms
    adm.note_signals("a", BackendSignals(waiting=0, running=20, kv_usage=0.5, read_at=time.monotonic()))
    assert adm.batch(state) == 20
    breach = adm.tpot_breach(state, ask, now)  # 19 others' sequences, ours, and the newcomer: 125 ms
    assert breach is not None and breach.predicted_s == pytest.approx(0.125)
