"""bench/admission_replay.py: the replay's bookkeeping, and shedding seen end to end on the virtual clock."""

from __future__ import annotations

from bench.admission_replay import Outcome, Request, replay, summarise


def arrivals(n: int, every_s: float) -> list[Request]:
    """`n` requests to `small`, one every `every_s`, alternately 400 and 20 tokens, sized exactly."""
    out = []
    for i in range(n):
        tokens = 20 if i % 2 else 400
        sizes = {"small": (tokens, tokens), "large": (tokens, tokens)}
        out.append(Request(i * every_s, 30, tokens, "small", sizes))
    return out


def test_under_overload_shedding_refuses_the_long_ones_and_serves_more() -> None:
    # `small` runs 32 at 24 ms a step: a 400-token answer holds a slot ~10 s, a 20-token one ~0.5 s, so
    # it takes about 6 of this mix a second; 15 a second are offered.
    warm = arrivals(40, 0.5)
    window = arrivals(300, 1 / 15)
    plain = replay(window, warm, {"spill": False})
    shed = replay(window, warm, {"spill": False, "shed_long_quantile": 0.4})  # 400 is above it, 20 not
    refused_plain = [r for r, o in zip(window, plain, strict=True) if o.status != "served"]
    refused_shed = [r for r, o in zip(window, shed, strict=True) if o.status != "served"]

    def short(refused: list[Request]) -> int:
        return sum(r.output_tokens == 20 for r in refused)

    assert short(refused_plain) > 20  # without it, short ones are refused too (42 of 87)
    assert {r.output_tokens for r in refused_shed} == {400}  # with it, only long ones
    assert len(refused_shed) - short(refused_shed) > len(refused_plain) - short(refused_plain)  # long, more
    assert summarise(shed).goodput_rps > summarise(plain).goodput_rps


def test_summarise_counts_good_refused_and_late() -> None:
    outcomes = [
        Outcome("served", 0.2, 0.02, 100),
        Outcome("served", 1.6, 0.02, 50),  # late first token: served, not good
        Outcome("served", 0.2, 0.2, 50),  # slow tokens: not good
        Outcome("arrival"),
        Outcome("queued"),
    ]
    s = summarise(outcomes)
    assert s.goodput_rps == 1 / 60
    assert (s.refused_arrival, s.refused_queued, s.late_share, s.good_mean_output) == (1, 1, 0.5, 100)
