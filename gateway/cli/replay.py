"""`icgate cache replay`: regenerate valuable answers with the large model while it is idle
(`gateway.cache_replay` does the work; the console can start the same run inside the gateway).

From the command line, "idle" is read from a running gateway's `/metrics` when `--gateway` names one.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx

from icgate.gateway.backends.local import LocalBackends
from icgate.gateway.cache_replay import ReplayOptions, ReplaySummary, replay
from icgate.gateway.config import Policy
from icgate.gateway.store import db


async def backend_idle(gateway_url: str | None, backend: str) -> bool:
    """Idle = the gateway has no request in flight to `backend` (no gateway given: assume idle)."""
    if gateway_url is None:
        return True
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(gateway_url.rstrip("/") + "/metrics")).text
    match = re.search(rf'^icgate_backend_inflight\{{backend="{re.escape(backend)}"\}} (\S+)$', text, re.M)
    return match is None or float(match.group(1)) == 0.0


async def run_replay(  # noqa: PLR0913 - the command's options, one argument each
    policy: Policy,
    data_dir: Path,
    budget_usd: float,
    *,
    max_entries: int = 100,
    gateway_url: str | None = None,
    idle_wait_s: float = 30.0,
    prune_after_days: float = 7.0,
    dry_run: bool = False,
    launch_local: bool = True,
) -> ReplaySummary:
    url = policy.database_url(data_dir)
    await asyncio.to_thread(db.upgrade, url)
    engine = db.make_engine(url)
    options = ReplayOptions(budget_usd, max_entries, idle_wait_s, prune_after_days, dry_run)
    large = policy.tier(policy.best_tier)
    try:
        async with LocalBackends() as local:
            if launch_local and not dry_run and large and large[0].launch is not None and gateway_url is None:
                await local.start_all([large[0]], data_dir)
            return await replay(engine, policy, options, lambda name: backend_idle(gateway_url, name))
    finally:
        engine.dispose()
