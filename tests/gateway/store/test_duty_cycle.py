"""The background share: work runs one piece at a time, rests in proportion, and refuses past the backlog."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from icgate.gateway.store.duty_cycle import BacklogFullError, DutyCycle


class FakeClock:
    """A clock that only the work and the rests move."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def clocked(share: float, backlog: int = 10) -> tuple[FakeClock, DutyCycle, list[float]]:
    """A duty cycle on a fake clock, and the list its pieces note their starts in."""
    clock = FakeClock()
    return clock, DutyCycle(share, backlog=backlog, clock=clock, sleep=clock.sleep), []


def piece(clock: FakeClock, took_s: float, starts: list[float]) -> Callable[[], Awaitable[str]]:
    """Work that notes when it started and takes `took_s` of the fake clock."""

    async def work() -> str:
        starts.append(clock.now)
        clock.now += took_s
        await asyncio.sleep(0)
        return f"done at {clock.now:.3f}"

    return work


async def test_each_piece_rests_three_times_what_it_took_at_a_quarter_share() -> None:
    clock, cycle, starts = clocked(0.25, backlog=10)
    works = [piece(clock, 0.010, starts) for _ in range(3)]
    results = await asyncio.gather(*(cycle.run(w) for w in works))
    assert starts == pytest.approx([0.0, 0.040, 0.080])
    assert results == ["done at 0.010", "done at 0.050", "done at 0.090"]
    assert cycle.waiting == 0


async def test_a_piece_after_a_quiet_spell_starts_at_once() -> None:
    clock, cycle, starts = clocked(0.25, backlog=0)
    await cycle.run(piece(clock, 0.010, starts))
    clock.now += 1.0  # long after its rest
    await cycle.run(piece(clock, 0.010, starts))
    assert starts == pytest.approx([0.0, 1.010])


async def test_a_full_share_never_rests() -> None:
    clock, cycle, starts = clocked(1.0, backlog=10)
    await asyncio.gather(*(cycle.run(piece(clock, 0.010, starts)) for _ in range(3)))
    assert starts == pytest.approx([0.0, 0.010, 0.020])


async def test_past_the_backlog_a_piece_is_refused_and_never_runs() -> None:
    cycle = DutyCycle(0.5, backlog=1)
    release = asyncio.Event()
    ran: list[str] = []

    async def held(name: str) -> str:
        ran.append(name)
        await release.wait()
        return name

    first = asyncio.create_task(cycle.run(lambda: held("first")))
    await asyncio.sleep(0)
    second = asyncio.create_task(cycle.run(lambda: held("second")))
    await asyncio.sleep(0)
    assert cycle.waiting == 1
    with pytest.raises(BacklogFullError):
        await cycle.run(lambda: held("third"))
    release.set()
    assert await asyncio.gather(first, second) == ["first", "second"]
    assert ran == ["first", "second"]
    assert cycle.waiting == 0


async def test_a_failing_or_cancelled_piece_frees_its_turn() -> None:
    clock, cycle, starts = clocked(0.5, backlog=1)

    async def fails() -> None:
        clock.now += 0.010
        raise ValueError("embedder said no")

    with pytest.raises(ValueError):
        await cycle.run(fails)
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    stuck = asyncio.create_task(cycle.run(forever))
    await started.wait()
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    await cycle.run(piece(clock, 0.010, starts))
    assert starts == pytest.approx([0.020])  # after the failed piece's 10 ms rest, nothing else
    assert cycle.waiting == 0


async def test_after_drain_what_waits_runs_back_to_back() -> None:
    """Shutdown: the rest already begun is kept, the pieces behind it no longer rest."""
    clock, cycle, starts = clocked(0.25, backlog=10)
    await cycle.run(piece(clock, 0.010, starts))
    cycle.drain()
    await asyncio.gather(*(cycle.run(piece(clock, 0.010, starts)) for _ in range(3)))
    assert starts == pytest.approx([0.0, 0.040, 0.050, 0.060])


def test_the_share_and_the_backlog_are_checked() -> None:
    with pytest.raises(ValueError):
        DutyCycle(0.0, backlog=1)
    with pytest.raises(ValueError):
        DutyCycle(1.5, backlog=1)
    with pytest.raises(ValueError):
        DutyCycle(0.5, backlog=-1)
