"""Would an int8 cross-encoder, used only to screen out pairs that cannot be hits, make the verifier cheaper?

The shipped verifier reads every candidate pair with the float32 cross-encoder (about 7 ms of CPU a pair
here, at the hardware's float rate), because the int8 graph's logits move too far for the float
calibration (docs/performance.md). The idea measured here keeps the float verdicts: read each pair with
the int8 graph first (about 0.4x the CPU); the classifier's trees split on the logit at fixed values, so
for a pair whose int8 logit is `l8` the float logit lies within `l8 +- delta` (delta from the measured
error) and the trees' probability over that band is a finite set of values. A pair that cannot reach the
threshold anywhere in the band is no hit, and only the others are read again in float32. Verdicts stay
the float ones as long as the error stays within delta; the script checks them.

It reports, on held-out Quora pairs above the prefilter, how far the int8 logits are from the float ones;
then it replays the full-path benchmark's verifier traffic (`bench/verify_order.py`'s jobs: 600 new
questions against N cached, top 3 above the prefilter, int8 embedder) and compares the shipped verifier
with the screened one: float passes, verdicts, and the verifier's CPU per verified request (process time,
the two ways in alternating repetitions on one thread). Also what one call of each part costs.

    .venv/bin/python bench/verify_screen.py     # -> bench/results/verify_screen.md (~4 minutes)
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import code_label  # noqa: E402
from bench.verify_order import GRAPHS, QQP, Job, jobs_for  # noqa: E402
from icgate.cache.calibrate import EMBEDDING_MODEL, held_out_pairs, load_pairs  # noqa: E402
from icgate.cache.embed import resolve_model_dir  # noqa: E402
from icgate.cache.runtime import load_embedder, pair_scorer_loader  # noqa: E402
from icgate.cache.verify import (  # noqa: E402
    DEFAULT_ARTIFACT,
    SCALAR_FEATURES,
    CrossEncoderRuntime,
    HitVerifier,
    PairScorer,
    one_openmp_thread,
    pair_features_batch,
    rule_verdict,
)

RESULT = ROOT / "bench" / "results" / "verify_screen.md"
K = len(SCALAR_FEATURES)  # the cross-encoder's logit is the feature right after the scalar ones
Vectors = npt.NDArray[np.float32]


def logit_splits(verifier: HitVerifier) -> npt.NDArray[np.float64]:
    """The values at which the classifier's trees split on the cross-encoder's logit (sorted).
    `_predictors` is scikit-learn's private list of fitted trees: fine for a measurement, not for the
    product."""
    trees: Any = verifier.model.trees_  # type: ignore[attr-defined]
    values = {
        float(node["num_threshold"])
        for per_iteration in trees._predictors
        for predictor in per_iteration
        for node in predictor.nodes
        if not node["is_leaf"] and node["feature_idx"] == K
    }
    return np.array(sorted(values))


def band_points(low: float, high: float, splits: npt.NDArray[np.float64]) -> list[np.float32]:
    """One float32 logit in each interval between splits that meets [low, high]: the trees predict the
    same for every logit of an interval (`x <= split` goes left)."""
    points = [np.float32(low)]
    for split in splits[(splits >= low) & (splits < high)]:
        above = np.float32(split)
        if float(above) <= split:
            above = np.nextafter(above, np.float32(np.inf))
        points.append(above)
    return points


class Screened:
    """The verifier with the int8 screen in front of its float cross-encoder (see the module docstring)."""

    def __init__(self, verifier: HitVerifier, int8: PairScorer, delta: float) -> None:
        self.verifier = verifier
        self.int8 = int8
        self.delta = delta
        self.splits = logit_splits(verifier)
        self.float_passes = 0

    def score_batch(
        self, texts_a: list[str], texts_b: list[str], vecs_a: Vectors, vecs_b: Vectors
    ) -> npt.NDArray[np.float64]:
        v = self.verifier
        model: Any = v.model
        scores, undecided = v.rules_first(texts_a, texts_b, vecs_a, vecs_b)  # as the shipped verifier does
        if not undecided:
            return scores
        a = [texts_a[i] for i in undecided]
        b = [texts_b[i] for i in undecided]
        rows = pair_features_batch(a, b, vecs_a[undecided], vecs_b[undecided], v.idf)
        embedding_logit = model.embedding_model_.decision_function(rows[:, K:])
        tree_rows = np.c_[rows[:, :K], np.zeros(len(a)), embedding_logit]  # the logit goes in column K
        l8 = self.int8.logits(a, b)
        expanded, owner = [], []
        for j in range(len(a)):
            band = band_points(l8[j] - self.delta, l8[j] + self.delta, self.splits)
            for point in [np.float32(l8[j]), *band]:
                row = tree_rows[j].copy()
                row[K] = point
                expanded.append(row)
                owner.append(j)
        p = model.trees_.predict_proba(np.array(expanded))[:, 1]
        owners = np.array(owner)
        best = np.full(len(a), -1.0)
        np.maximum.at(best, owners, p)
        probability = p[np.searchsorted(owners, np.arange(len(a)))]  # each pair's first row: at l8
        again = np.flatnonzero(best >= v.probability_threshold)
        if len(again):
            self.float_passes += len(again)
            assert v.cross_encoder is not None
            tree_rows[again, K] = v.cross_encoder.logits([a[j] for j in again], [b[j] for j in again])
            probability[again] = model.trees_.predict_proba(tree_rows[again])[:, 1]
        scores[undecided] = probability
        return scores


def cpu_ms(f: Callable[[], object], n: int) -> float:
    f()
    started = time.process_time()
    for _ in range(n):
        f()
    return 1000 * (time.process_time() - started) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cached", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--new", type=int, default=600)
    parser.add_argument("--held-out", type=int, default=3000, help="held-out pairs for the logit error")
    parser.add_argument("--delta", type=float, nargs="+", default=[0.75, 1.0, 1.5])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    one_openmp_thread()
    embedder = load_embedder(resolve_model_dir(EMBEDDING_MODEL), "onnx-int8", GRAPHS, threads=1)
    verifier = HitVerifier.load(DEFAULT_ARTIFACT, pair_scorer_loader("onnx", GRAPHS, 1))
    assert verifier.cross_encoder is not None and verifier.cross_encoder_state is not None
    floats = verifier.cross_encoder
    int8 = pair_scorer_loader("onnx", GRAPHS, 1)(
        verifier.cross_encoder_state, CrossEncoderRuntime("onnx-int8", both_orders=False)
    )
    threshold = verifier.probability_threshold

    def encode(texts: list[str]) -> Vectors:
        return np.asarray(embedder.encode(texts), dtype=np.float32)

    # 1. How far int8 logits are from the float ones, on held-out pairs the model would read.
    pairs = load_pairs(QQP, skip_blank_text=True)
    held = held_out_pairs(pairs)
    random.Random(1).shuffle(held)
    held = held[: args.held_out]
    cos = np.einsum("ij,ij->i", encode([p.text_a for p in held]), encode([p.text_b for p in held]))
    read = [
        p
        for p, c in zip(held, cos, strict=True)
        if c >= verifier.cosine_threshold and rule_verdict(p.text_a, p.text_b) is None
    ]
    a, b = [p.text_a for p in read], [p.text_b for p in read]
    batches = range(0, len(read), 3)  # a request's candidates: up to three pairs a call
    error = np.abs(
        np.concatenate([floats.logits(a[s : s + 3], b[s : s + 3]) for s in batches])
        - np.concatenate([int8.logits(a[s : s + 3], b[s : s + 3]) for s in batches])
    )
    quantiles = np.quantile(error, [0.5, 0.9, 0.99, 0.999, 1.0])

    # 2. The full path's verifier traffic, shipped against screened.
    random.Random(0).shuffle(pairs)
    rows: list[str] = []
    for n in args.cached:
        cached = [p.text_a for p in pairs[:n]]
        new = [p.text_a for p in pairs[max(args.cached) : max(args.cached) + args.new]]
        jobs: list[Job] = jobs_for(cached, new, encode, verifier.cosine_threshold)
        read_pairs = sum(len(j.texts_a) for j in jobs)
        for delta in args.delta:
            screened = Screened(verifier, int8, delta)
            cpu = {"float": 0.0, "screen": 0.0}
            for _ in range(args.repeats):
                started = time.process_time()
                shipped = [verifier.score_batch(j.texts_a, j.texts_b, j.vecs_a, j.vecs_b) for j in jobs]
                cpu["float"] += time.process_time() - started
                screened.float_passes = 0
                started = time.process_time()
                screen = [screened.score_batch(j.texts_a, j.texts_b, j.vecs_a, j.vecs_b) for j in jobs]
                cpu["screen"] += time.process_time() - started
            same = sum(
                int(((s >= threshold) == (t >= threshold)).all())
                for s, t in zip(shipped, screen, strict=True)
            )
            hits = sum(bool((s >= threshold).any()) for s in shipped)
            rows.append(
                f"| {n:,} | {delta} | {len(jobs)} | {hits} | {same} of {len(jobs)} | {read_pairs} "
                f"| {screened.float_passes} ({screened.float_passes / read_pairs:.2f}x) "
                f"| {1000 * cpu['float'] / args.repeats / len(jobs):.1f} "
                f"| {1000 * cpu['screen'] / args.repeats / len(jobs):.1f} "
                f"({cpu['screen'] / cpu['float']:.2f}x) |"
            )

    # 3. What one call of each part costs.
    one_a, one_b = a[:1], b[:1]
    three_a, three_b = a[:3], b[:3]
    features = verifier.features(three_a, three_b, encode(three_a), encode(three_b))
    parts = [
        ("float32 cross-encoder, 1 pair", cpu_ms(lambda: floats.logits(one_a, one_b), 50)),
        ("float32 cross-encoder, 3 pairs", cpu_ms(lambda: floats.logits(three_a, three_b), 30)),
        ("int8 cross-encoder, 1 pair", cpu_ms(lambda: int8.logits(one_a, one_b), 50)),
        ("int8 cross-encoder, 3 pairs", cpu_ms(lambda: int8.logits(three_a, three_b), 30)),
        ("the classifier, 3 rows", cpu_ms(lambda: verifier.model.predict_proba(features), 100)),
    ]
    command = " ".join(["python bench/verify_screen.py", *(sys.argv[1:] if argv is None else argv)])
    q = ", ".join(f"{v:.2f}" for v in quantiles)
    lines = [
        "# An int8 screen in front of the float32 cross-encoder",
        "",
        f"Generated by `bench/verify_screen.py` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC in "
        f"{time.monotonic() - t0:.0f} s; {code_label(ROOT)}; {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}.",
        "",
        f"- Command: `{command}`",
        f"- Verifier: the shipped artifact (prefilter {verifier.cosine_threshold}, threshold "
        f"{threshold:.3f}, float32 cross-encoder, one order, onnxruntime, one thread); the trees split on "
        f"its logit at {len(logit_splits(verifier))} values. Screen: the same weights as a dynamic int8 "
        "graph (per-channel weights), as the int8 cross-encoder is built. Embedder: int8, as served.",
        "",
        "## How far the int8 logits are from the float ones",
        "",
        f"{len(read)} held-out Quora pairs (of {len(held)} balanced ones) above the prefilter and not "
        "settled by the rules, read three to a call: |float - int8| at the 50th, 90th, 99th and 99.9th "
        f"percentile and the largest: {q}.",
        "",
        "## The full path's verifier traffic",
        "",
        f"{args.new} new Quora questions against N cached (`bench/verify_order.py`'s replay); delta: the "
        "band around the int8 logit in which the float one is taken to lie.",
        "",
        "| cached N | delta | verified requests | with a hit (shipped) | same verdicts on every candidate "
        "| pairs read | pairs read again in float32 | shipped: verifier CPU ms per verified request "
        "| screened |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "## One call of each part (CPU ms)",
        "",
        "| part | CPU ms |",
        "| --- | ---: |",
        *(f"| {name} | {ms:.2f} |" for name, ms in parts),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
