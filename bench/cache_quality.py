"""The semantic cache's report: hit quality, lookup latency, embedding throughput.

Runs the three measurements (each also runnable alone) and writes them into
one report, `bench/results/cache.md`:

- `bench/cache_precision.py`: precision/recall/F1 of the hit decision on held-out
  Quora pairs, icgate's verifier vs GPTCache's cosine rule; false hits on
  contextual follow-ups;
- `bench/cache_lookup.py`: lookup latency at 10k, 100k and 1M entries;
- `bench/embed_throughput.py`: single vs micro-batched embedding on this machine;
- `bench/verifier_cost.py`: what the hit verifier costs per request, next to an embedding.

    .venv/bin/python bench/cache_quality.py [--skip-lookup] [--sizes 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cache_lookup import lookup_report  # noqa: E402
from bench.cache_precision import precision_report  # noqa: E402
from bench.embed_throughput import throughput_report  # noqa: E402
from bench.verifier_cost import report as verifier_cost_report  # noqa: E402
from icgate.cache.verify import DEFAULT_ARTIFACT  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cache" / "qqp_pairs.jsonl.gz"
ONE_MILLION_NOTE = (
    "The 1,000,000-entry run (HNSW build ~3 min, 1.5 GB of vectors) is kept apart: "
    "`bench/results/cache_lookup_1m.md` (`.venv/bin/python bench/cache_lookup.py --sizes 1000000`)."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--verifier", type=Path, default=DEFAULT_ARTIFACT)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--skip-lookup", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cache.md")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"data file {args.data} not found (../shared/data is needed for this report)", file=sys.stderr)
        return 2
    started = time.time()
    lines = [
        "# Semantic cache: hit quality, lookup latency, embedding throughput",
        "",
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} CPUs, {platform.platform()}, python {platform.python_version()}",
        f"- command: `.venv/bin/python bench/cache_quality.py {' '.join(argv or sys.argv[1:])}`".rstrip(),
        f"- data: `{args.data.name}` (../shared/data/cache/), verifier: `{args.verifier.name}`",
        "",
        "## Hit quality",
        "",
        *precision_report(args.data, args.verifier),
        "",
    ]
    if not args.skip_lookup:
        lines += ["## Lookup latency", "", *lookup_report(tuple(args.sizes)), ""]
        if 1_000_000 not in args.sizes:
            lines += [ONE_MILLION_NOTE, ""]
    if not args.skip_throughput:
        lines += ["## Embedding throughput", "", *throughput_report(), ""]
    if not args.skip_cost:
        lines += ["## Verifier cost", "", *verifier_cost_report(args.verifier, rounds=400), ""]
    lines.append(f"Whole run: {time.time() - started:.0f} s.")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
