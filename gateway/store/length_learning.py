"""Each backend's own length predictor, learnt from the gateway's own answers.

Every answer a backend gives is a length sample (`length_samples`: what the route stage read, the backend,
the answer's tokens and how it ended). On a schedule (`lengths.refit_interval_s`) one replica refits, per
backend, a `LengthPredictor` on that backend's newest answers (truncated ones as lower bounds: see
`lengths.training.impute_truncated`) and publishes it to `model_artifacts` as kind `length:<backend>`,
if its p50 misses the backend's finished answers by less than the shared predictor's does (its
out-of-fold error against the shared one's on the same answers). Every replica's watcher for that kind
swaps it in (`gateway.route_models.with_backend_length`); until a backend has `lengths.min_rows` answers
and a predictor that beats the shared one, the shared predictor sizes its requests.

One replica at a time: the refit takes the `length-refit` lease (`gateway.store.leases`) for one interval,
so across replicas it runs once per interval. The fit runs in a worker thread, with one BLAS thread, so
the event loop keeps a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import sqlalchemy as sa
from threadpoolctl import threadpool_limits

from icgate.gateway.config import LengthsConfig
from icgate.gateway.store import artifacts, leases, length_samples
from icgate.gateway.store.tables import utcnow
from icgate.lengths.predict import LengthModel
from icgate.lengths.training import LoggedAnswer, fit_logged

log = logging.getLogger("icgate.lengths")

LEASE = "length-refit"
KIND_PREFIX = "length:"
_KIND_CHARS = 32  # model_artifacts.kind
# The first refit after start: soon (a restarted replica should not wait a whole interval), but not
# during start-up itself.
FIRST_REFIT_SHARE = 0.1


def length_kind(backend: str) -> str:
    """The `model_artifacts` kind of a backend's own predictor: `length:<backend>`, or, for a name too long
    for the column, `length:#` and a digest of it (the name itself is in the row's `training`)."""
    kind = KIND_PREFIX + backend
    if len(kind) <= _KIND_CHARS:
        return kind
    room = _KIND_CHARS - len(KIND_PREFIX) - 1
    return f"{KIND_PREFIX}#{hashlib.sha1(backend.encode()).hexdigest()[:room]}"


Outcome = Literal["published", "too few answers", "no new answers", "not better than shared", "failed"]


@dataclass(frozen=True)
class BackendRefit:
    backend: str
    outcome: Outcome
    answers: int = 0  # usable answers read (finished or truncated)
    row: int | None = None  # the published model_artifacts row
    version: str | None = None
    # Mean absolute error of the p50 on the backend's finished answers, in tokens: the new predictor's
    # out of fold, and the shared predictor's (None: no shared predictor to compare with).
    own_mae: float | None = None
    shared_mae: float | None = None


@dataclass(frozen=True)
class RefitReport:
    """What one refit did: nothing when another replica held the lease. `asked`: an operator's refit
    (`refit_now`), not the schedule's."""

    ran: bool
    backends: list[BackendRefit] = field(default_factory=list)
    at: datetime | None = None
    asked: bool = False

    def published(self) -> list[BackendRefit]:
        return [b for b in self.backends if b.outcome == "published"]


def replica_name() -> str:
    """This replica's name in the lease table (host, process, and a random part for several gateways in
    one process)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def shared_mae(shared: LengthModel, answers: Sequence[LoggedAnswer]) -> float | None:
    """Mean absolute error of `shared`'s p50 on the finished answers (the rows `fit_logged` fits)."""
    finished = [a for a in answers if a.completion_tokens > 0 and a.text.strip() and not a.truncated]
    if not finished:
        return None
    misses = [
        abs(shared.predict(a.embedding, a.prompt_tokens, a.text).p50 - a.completion_tokens) for a in finished
    ]
    return sum(misses) / len(misses)


def refit_backend(
    engine: sa.Engine, config: LengthsConfig, backend: str, shared: LengthModel | None = None
) -> BackendRefit:
    """Fit one backend's predictor, if it has enough answers and new ones since the one in force, and
    publish it if it beats `shared` on them; then delete its answers past the window. Blocking: run it
    in a worker thread.

    Why the gate: a backend's own predictor is fitted on a few hundred of its answers; where the shared
    one already sizes them better (a backend that answers as the shared predictor's training data did),
    swapping it in would make admission's sizes worse. An own predictor already in force stays."""
    kind = length_kind(backend)
    in_force = artifacts.newest(engine, kind, with_artifact=False)
    if in_force is not None:
        fitted_up_to = int(in_force.training.get("newest_sample") or 0)
        if length_samples.rows_since(engine, backend, fitted_up_to) < config.min_new_rows:
            return BackendRefit(backend, "no new answers")
    answers, newest = length_samples.newest_answers(engine, backend, config.max_rows)
    if len(answers) < config.min_rows:
        return BackendRefit(backend, "too few answers", len(answers))
    with threadpool_limits(1, user_api="blas"):
        predictor = fit_logged(answers, summary={"backend": backend, "newest_sample": newest, "kind": kind})
    own = predictor.summary.get("oof_mae_tokens")
    baseline = shared_mae(shared, answers) if shared is not None else None
    if own is not None and baseline is not None:
        predictor.summary["shared_mae_tokens"] = baseline
        if own >= baseline:
            length_samples.prune(engine, backend, config.max_rows)  # the window stays bounded either way
            return BackendRefit(
                backend, "not better than shared", len(answers), own_mae=own, shared_mae=baseline
            )
    row = artifacts.publish(
        engine, kind, predictor.version, predictor.to_bytes(), predictor.summary, predictor.metrics
    )
    length_samples.prune(engine, backend, config.max_rows)
    return BackendRefit(backend, "published", len(answers), row, predictor.version, own, baseline)


class LengthLearning:
    """The scheduled refit of every backend's own predictor, on this replica when it holds the lease.

    `on_published(backend)` runs after a backend's new predictor is in the table, so this replica swaps it
    in at once (the others within `router.reload_interval_s`). `shared()` is the shared predictor in force,
    which a backend's new one has to beat (`refit_backend`).
    """

    def __init__(
        self,
        engine: sa.Engine,
        config: LengthsConfig,
        backends: Sequence[str],
        on_published: Callable[[str], Awaitable[object]] | None = None,
        holder: str | None = None,
        shared: Callable[[], LengthModel] | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.backends = list(backends)
        self.on_published = on_published
        self.holder = holder or replica_name()
        self.shared = shared
        self.last: RefitReport | None = None
        self._task: asyncio.Task[None] | None = None
        # One refit at a time on this replica: an operator's that arrives during the schedule's (or
        # another operator's) runs after it, and so fits on what that one left.
        self._running = asyncio.Lock()

    async def refit(self) -> RefitReport:
        """One refit of every backend, if this replica takes the lease (else nothing: another has it)."""
        took = await asyncio.to_thread(
            leases.take, self.engine, LEASE, self.holder, self.config.refit_interval_s
        )
        if not took:
            self.last = RefitReport(ran=False, at=utcnow())
            return self.last
        return await self._refit_all(asked=False)

    async def refit_now(self) -> RefitReport:
        """A refit an operator asked for (`POST /admin/api/lengths/refit`): on this replica, now, whoever
        held the lease. It takes the lease for a new interval, so the schedule on every replica waits a
        whole interval after it. A scheduled refit that another replica had already begun may still
        finish; both then publish, and every replica uses the newest (docs/lengths.md)."""
        await asyncio.to_thread(leases.seize, self.engine, LEASE, self.holder, self.config.refit_interval_s)
        return await self._refit_all(asked=True)

    async def _refit_all(self, asked: bool) -> RefitReport:
        done: list[BackendRefit] = []
        async with self._running:
            for backend in self.backends:
                try:
                    baseline = self.shared() if self.shared is not None else None
                    result = await asyncio.to_thread(
                        refit_backend, self.engine, self.config, backend, baseline
                    )
                except Exception:  # one backend's failure must not stop the others, nor the schedule
                    log.exception("length refit of backend %s failed", backend)
                    result = BackendRefit(backend, "failed")
                done.append(result)
                if result.outcome == "published":
                    log.info(
                        "length predictor %s for backend %s published (row %s, %d answers)",
                        result.version,
                        backend,
                        result.row,
                        result.answers,
                    )
                    if self.on_published is not None:
                        await self.on_published(backend)
                elif result.outcome == "not better than shared":
                    log.info(
                        "length predictor for backend %s not published: its p50 misses by %.0f tokens, the "
                        "shared predictor's by %.0f (%d answers)",
                        backend,
                        result.own_mae,
                        result.shared_mae,
                        result.answers,
                    )
        self.last = RefitReport(ran=True, backends=done, at=utcnow(), asked=asked)
        return self.last

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="icgate-length-refit")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        wait = self.config.refit_interval_s * FIRST_REFIT_SHARE
        while True:
            await asyncio.sleep(wait)
            wait = self.config.refit_interval_s
            try:
                await self.refit()
            except Exception:  # the database may be away: try again next interval
                log.exception("length refit failed; retrying next interval")
