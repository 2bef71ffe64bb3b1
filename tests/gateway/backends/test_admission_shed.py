"""`admission.shed_long_quantile` (0.75 by default): under load, a request that would have to wait is refused
at arrival when its predicted answer is one of the longest the backend is asked for (fake clock, exact
numbers)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from icgate.gateway.backends.admission import Admission, AdmissionRefused, Ask
from icgate.gateway.config import AdmissionConfig, BackendConfig, PriorityClass
from tests.gateway.backends.test_admission_clock import FakeClock, admission, backend

# Before any measurement: 100 ms to the first token, 10 ms per output token (test_admission_clock).


def seen(adm: Admission, a: BackendConfig, clock: FakeClock, sizes: list[int]) -> None:
    """The backend is asked for requests of these predicted sizes while it has room: each is placed at once
    (nothing is held), and each counts among its recent sizes."""
    for size in sizes:
        placed = adm.decide(Ask(10, size, ttft_slo_s=5.0, arrived=clock()), [a])
        assert placed.wait_s is None  # room: no wait, nothing shed


def saturate(adm: Admission, clock: FakeClock) -> None:
    adm.states["a"].start_job(Ask(10, 20, arrived=clock()), clock())  # its one slot, free at 0.3 s


def test_under_load_the_longest_quarter_is_refused_at_arrival_and_the_rest_queue() -> None:
    clock = FakeClock()
    a = backend()
    adm = admission(a, clock=clock, shed_long_quantile=0.75)
    seen(adm, a, clock, list(range(10, 410, 10)))  # 10, 20, ..., 400: the 75th percentile is 310
    saturate(adm, clock)
    with pytest.raises(AdmissionRefused) as info:
        adm.decide(Ask(10, 350, ttft_slo_s=5.0, arrived=clock()), [a])
    refused = info.value
    assert refused.stage == "arrival" and refused.predicted_wait_s == pytest.approx(0.3)
    assert "predicted answer (350 tokens) is longer than 75% of its recent requests' (310)" in refused.reason
    assert "shed_long_quantile" in refused.reason
    # A shorter one waits for the slot; so does one at the cut itself.
    for size in (50, 310):
        placed = adm.decide(Ask(10, size, ttft_slo_s=5.0, arrived=clock()), [a])
        assert placed.backend == a and placed.wait_s == pytest.approx(0.3)


def test_a_long_request_is_admitted_while_the_backend_has_room_and_queues_with_the_setting_off() -> None:
    clock = FakeClock()
    a = backend()
    shedding, off = admission(a, clock=clock), admission(a, clock=clock, shed_long_quantile=None)
    for adm in (shedding, off):
        seen(adm, a, clock, list(range(10, 410, 10)))
    assert shedding.decide(Ask(10, 400, ttft_slo_s=5.0, arrived=clock()), [a]).backend == a  # room: taken
    saturate(off, clock)
    assert off.decide(Ask(10, 400, ttft_slo_s=5.0, arrived=clock()), [a]).wait_s == pytest.approx(0.3)


def test_nothing_is_shed_before_enough_requests_were_seen_or_when_every_size_is_the_same() -> None:
    """A constant length predictor sizes every request alike: none is longer than most, none is shed."""
    clock = FakeClock()
    a = backend()
    fresh = admission(a, clock=clock, shed_long_quantile=0.5)
    seen(fresh, a, clock, [10] * 30)  # 31 with the next one: under the 32 it needs
    saturate(fresh, clock)
    assert fresh.decide(Ask(10, 400, ttft_slo_s=5.0, arrived=clock()), [a]).backend == a
    constant = admission(a, clock=clock, shed_long_quantile=0.5)
    seen(constant, a, clock, [150] * 100)
    saturate(constant, clock)
    assert constant.decide(Ask(10, 150, ttft_slo_s=5.0, arrived=clock()), [a]).wait_s == pytest.approx(0.3)


def test_a_long_request_its_own_backend_would_shed_spills_to_one_with_room() -> None:
    clock = FakeClock()
    small, large = backend("a"), backend("b")
    adm = admission(small, large, clock=clock, shed_long_quantile=0.75)
    seen(adm, small, clock, list(range(10, 410, 10)))
    saturate(adm, clock)
    placed = adm.decide(Ask(10, 400, ttft_slo_s=5.0, arrived=clock()), [small], [large])
    assert (placed.backend, placed.spilled, placed.wait_s) == (large, True, 0.0)
    # With the other backend saturated too (and no sizes seen there yet): it waits there.
    adm.states["b"].start_job(Ask(10, 20, arrived=clock()), clock())
    placed = adm.decide(Ask(10, 400, ttft_slo_s=5.0, arrived=clock()), [small], [large])
    assert (placed.backend, placed.spilled) == (large, True) and placed.wait_s == pytest.approx(0.3)


def test_shedding_is_on_by_default_and_spares_requests_without_an_objective_or_of_a_higher_class() -> None:
    """Shedding serves objectives: with none a long request queues as it did; a class ranked ahead of the
    default one queues too; the default class and those ranked behind it are shed."""
    assert AdmissionConfig().shed_long_quantile == 0.75
    clock = FakeClock()
    a = backend()
    adm = admission(
        a,
        clock=clock,
        classes={
            "gold": PriorityClass(rank=-1),
            "standard": PriorityClass(rank=0),
            "batch": PriorityClass(rank=5),
        },
        default_class="standard",
    )
    seen(adm, a, clock, list(range(10, 410, 10)))
    saturate(adm, clock)
    assert adm.decide(Ask(10, 400, arrived=clock()), [a]).backend == a  # no objective: it may wait
    assert adm.decide(Ask(10, 400, rank=-1, ttft_slo_s=5.0, arrived=clock()), [a]).wait_s == pytest.approx(
        0.3
    )
    for rank in (0, 5):
        with pytest.raises(AdmissionRefused):
            adm.decide(Ask(10, 400, rank=rank, ttft_slo_s=5.0, arrived=clock()), [a])


@pytest.mark.parametrize("value", [0, 1, 1.5])
def test_the_quantile_is_a_share_strictly_between_0_and_1(value: float) -> None:
    with pytest.raises(ValidationError):
        AdmissionConfig.model_validate({"shed_long_quantile": value})
