"""Where one replica's in-memory cache stops: memory and start-up time (load from the database and build
the index) for N cache entries in one tenant.

    .venv/bin/python bench/cache_scale.py                          # 100k, 300k, 1M entries, SQLite
    .venv/bin/python bench/cache_scale.py --sizes 100000 --database-url postgresql+psycopg://...

Each size gets a fresh database filled through the gateway's own row mapping (`row_values`): entries
with a 384-dimension unit vector (clustered by topic, as `bench/cache_lookup.py` makes them: real
sentence embeddings cluster, and isotropic random vectors are the worst case for an HNSW build), a
question of ~60 characters and an answer of ~600 (a typical chat answer), and a response body holding
that answer. Then a fresh process starts `CacheEntries` on it, as a replica
does at start, and we read the wall time of `start()` (every row read, every entry kept in memory, the
index built: flat up to `cache.hnsw_threshold`, HNSW above) and the resident memory it added.
Writes bench/results/cache_scale.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DIM = 384
ANSWER = ("The answer depends on the details, but in most cases the short version is this: " * 8)[:600]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fill(url: str, n: int) -> float:
    """N entries in one namespace, in blocks; returns the seconds it took."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from bench.cache_lookup import BLOCK, MixtureData
    from icgate.cache.store import CacheEntry
    from icgate.gateway.store import db, tables
    from icgate.gateway.store.cache_entries import row_values

    db.upgrade(url)
    engine = db.make_engine(url)
    data = MixtureData(DIM)  # clustered like sentence embeddings (isotropic noise is HNSW's worst case)
    started = time.perf_counter()
    now = time.time()
    block = BLOCK
    for first in range(0, n, block):
        size = min(block, n - first)
        vectors = data.block(first // block)[:size]
        rows = []
        for i in range(size):
            question = f"Question number {first + i}: how do I do the thing I want to do?"
            entry = CacheEntry(
                id=0, namespace="tenant:1", exact_key=f"{first + i:064x}", context_fingerprint="",
                embed_text=question, prompt_text=question, response_text=ANSWER,
                response={"choices": [{"message": {"role": "assistant", "content": ANSWER}}]},
                backend="large", tier="large", prompt_tokens=15, completion_tokens=150,
                vector=vectors[i], utility=0.6, created_at=now, last_used_at=now,
            )  # fmt: skip
            rows.append(row_values(entry))
        with Session(engine) as session, session.begin():
            session.execute(sa.insert(tables.CacheEntryRow), rows)
    engine.dispose()
    return time.perf_counter() - started


def load_once(url: str) -> dict[str, float]:
    """In this (fresh) process: start `CacheEntries` as a replica does; time and memory."""
    from icgate.gateway.config import CacheConfig
    from icgate.gateway.store import db
    from icgate.gateway.store.cache_entries import CacheEntries

    engine = db.make_engine(url)
    before = rss_mb()

    class NoVerifier:  # loading never verifies
        probability_threshold = 1.0

    entries = CacheEntries(
        CacheConfig(max_entries_per_tenant=10_000_000),
        lambda tier: 0,
        "large",
        engine,
        NoVerifier(),  # type: ignore[arg-type]
        dim=DIM,
    )

    async def start() -> float:
        t0 = time.perf_counter()
        await entries.start()
        took = time.perf_counter() - t0
        await entries.stop()
        return took

    took = asyncio.run(start())
    return {
        "start_s": took,
        "rss_added_mb": rss_mb() - before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "entries": float(entries.store.size("tenant:1")),
    }


def database_size_mb(url: str, folder: Path) -> float | None:
    if url.startswith("sqlite"):
        return (folder / "cache.db").stat().st_size / 1e6
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,300000,1000000")
    p.add_argument("--database-url", default=None, help="default: a SQLite file per size")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cache_scale.md")
    p.add_argument("--load-only", default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.load_only:
        print(json.dumps(load_once(args.load_only)))
        return 0
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for n in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="icgate-scale-") as tmp:
            url = args.database_url or f"sqlite:///{tmp}/cache.db"
            fill_s = fill(url, n)
            out = subprocess.run(
                [sys.executable, __file__, "--load-only", url], capture_output=True, text=True, check=True
            )
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            row = {"n": n, "fill_s": fill_s, "db_mb": database_size_mb(url, Path(tmp)), **measured}
            rows.append(row)
            print(json.dumps(row), flush=True)
    took_min = (time.monotonic() - started) / 60
    lines = [
        "# One replica's cache in memory: start-up time and memory per size",
        "",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')} (run took {took_min:.1f} min)",
        f"- machine: {os.cpu_count()} CPUs; {platform.platform()}; load average at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (shared machine)",
        f"- command: `.venv/bin/python bench/cache_scale.py {' '.join(sys.argv[1:])}`".rstrip(),
        "- entries: one tenant, 384-d float32 vectors clustered by topic (`bench/cache_lookup.py`'s "
        "mixture), a ~60-character question, a ~600-character answer (stored twice: as text and inside "
        "the response body); `cache.hnsw_threshold` 50,000 (HNSW above, M=32, efConstruction 80)",
        "",
        "| entries | database MB | start-up s (read + keep + index) | memory added MB | MB per 1k entries "
        "| peak MB during start |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        db_mb = "-" if r["db_mb"] is None else f"{r['db_mb']:,.0f}"
        lines.append(
            f"| {r['n']:,} | {db_mb} | {r['start_s']:.1f} | {r['rss_added_mb']:,.0f} "
            f"| {r['rss_added_mb'] / r['n'] * 1000:.2f} | {r['peak_rss_mb']:,.0f} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
