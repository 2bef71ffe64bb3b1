"""Output-length prediction quality: icgate's LengthPredictor against simple baselines on Arena-Hard.

Protocol:

- Data: `../shared/data/length/arena_hard_lengths.jsonl` (250 real Chatbot Arena prompts from
  lm-sys/arena-hard-auto, with the true cl100k token length of the answers of gpt-3.5-turbo-0125,
  gpt-4-0314 and gpt-4-0613). The target is one model's lengths (`--model`, default gpt-4-0314).
- Held-out split: sha1 of question_id mod 10, buckets 8-9 held out (`lengths.training.question_bucket`). The
  shipped artifact is fitted on buckets 0-7 only. Because a tau on ~40 prompts is noisy (its standard
  error is about 0.1), the report also gives k-fold cross-validated tau over all prompts: out-of-fold
  predictions pooled over the folds (a prompt is never in its own training fold), repeated with several
  shuffles, mean and standard deviation over the repeats.
- Predictors, each refitted per fold on the same embeddings (packaged all-MiniLM-L6-v2, memoised on disk):
  - icgate `LengthPredictor` (ridge on embedding + prompt features, rank target, calibrated p50/p90).
  - the same, trained on the geometric mean of all three models' lengths (the other models' answers as
    extra signal; evaluation is still against `--model`'s lengths).
  - ridge on the embedding alone (scikit-learn `Ridge(alpha=1)` on log tokens): the plain baseline.
  - prompt length alone (log completion tokens linear in log prompt tokens).
  - `OutputLengthHeuristic` (untrained, the fallback).
  - reference, not a predictor: the other models' *actual* answer lengths, a ceiling for what the prompt
    alone can tell about this model's length.
- Metrics: Kendall's tau (tau-b, scipy) between predicted p50 and true tokens; MAE of p50 in tokens; p90
  coverage = share of true lengths <= p90. Latency: single `predict()` calls of the shipped artifact over
  every prompt (embedding precomputed), p50/p99 in microseconds.

Run:  .venv/bin/python bench/length_quality.py --write-artifact   (about a minute once the embeddings are
      cached; the first run embeds 250 prompts)
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from icgate.cache.runtime import RUNTIMES  # noqa: E402
from icgate.lengths.predict import (  # noqa: E402
    DEFAULT_ARTIFACT,
    LengthEstimate,
    LengthPredictor,
    OutputLengthHeuristic,
)
from icgate.lengths.training import (  # noqa: E402
    DEFAULT_MODEL,
    LengthRow,
    embed_rows,
    evaluate_length,
    fit_rows,
    load_length_rows,
    split_rows,
    train_arena,
)

DATA = ROOT.parent / "shared" / "data" / "length" / "arena_hard_lengths.jsonl"
OUT = ROOT / "bench" / "results" / "length.md"
TARGET_TAU = 0.5
OTHER_MODELS = ("gpt-3.5-turbo-0125", "gpt-4-0314", "gpt-4-0613")

# A fitted predictor: rows -> (p50, p90 or None) per row.
Predict = Callable[[Sequence[LengthRow]], tuple[np.ndarray, np.ndarray | None]]
Fit = Callable[[Sequence[LengthRow]], Predict]


def _kendall(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import kendalltau

    tau = kendalltau(a, b).statistic
    return float(tau) if tau == tau else 0.0


def _estimates(estimates: Sequence[LengthEstimate]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([e.p50 for e in estimates], float), np.array([e.p90 for e in estimates], float)


def fit_icgate(rows: Sequence[LengthRow]) -> Predict:
    model = fit_rows(rows)
    return lambda test: _estimates(
        [model.predict(r.embedding, r.estimated_prompt_tokens, r.prompt) for r in test]
    )


def fit_icgate_all_models(mean_tokens: dict[str, float]) -> Fit:
    def fit(rows: Sequence[LengthRow]) -> Predict:
        model = fit_rows(
            [LengthRow(r.question_id, r.prompt, round(mean_tokens[r.question_id]), r.embedding) for r in rows]
        )
        return lambda test: _estimates(
            [model.predict(r.embedding, r.estimated_prompt_tokens, r.prompt) for r in test]
        )

    return fit


def fit_ridge_embedding(rows: Sequence[LengthRow]) -> Predict:
    from sklearn.linear_model import Ridge

    x = np.stack([np.asarray(r.embedding) for r in rows])
    model = Ridge(alpha=1.0).fit(x, np.log([max(1, r.tokens) for r in rows]))
    return lambda test: (np.exp(model.predict(np.stack([np.asarray(r.embedding) for r in test]))), None)


def fit_prompt_length(rows: Sequence[LengthRow]) -> Predict:
    x = np.log([r.estimated_prompt_tokens for r in rows])
    slope, intercept = np.polyfit(x, np.log([max(1, r.tokens) for r in rows]), 1)
    return lambda test: (np.exp(intercept + slope * np.log([r.estimated_prompt_tokens for r in test])), None)


def fit_heuristic(rows: Sequence[LengthRow]) -> Predict:
    heuristic = OutputLengthHeuristic()
    return lambda test: _estimates(
        [heuristic.predict(None, r.estimated_prompt_tokens, r.prompt) for r in test]
    )


def _metrics(p50: np.ndarray, p90: np.ndarray | None, truth: np.ndarray) -> dict[str, float]:
    return {
        "tau": _kendall(p50, truth),
        "mae": float(np.abs(p50 - truth).mean()),
        "coverage": float((truth <= p90).mean()) if p90 is not None else math.nan,
    }


def held_out(fit: Fit, train: Sequence[LengthRow], test: Sequence[LengthRow]) -> dict[str, float]:
    p50, p90 = fit(train)(test)
    return _metrics(p50, p90, np.array([r.tokens for r in test], float))


def cross_validated(fit: Fit, rows: Sequence[LengthRow], folds: int, repeats: int) -> dict[str, Any]:
    """Pooled out-of-fold predictions per repeat; mean and sd of each metric over the repeats."""
    from sklearn.model_selection import KFold

    truth = np.array([r.tokens for r in rows], float)
    per_repeat = []
    for seed in range(repeats):
        p50 = np.zeros(len(rows))
        p90: np.ndarray | None = np.zeros(len(rows))
        for train_idx, test_idx in KFold(folds, shuffle=True, random_state=seed).split(rows):
            fold50, fold90 = fit([rows[i] for i in train_idx])([rows[i] for i in test_idx])
            p50[test_idx] = fold50
            if fold90 is None:
                p90 = None
            elif p90 is not None:
                p90[test_idx] = fold90
        per_repeat.append(_metrics(p50, p90, truth))
    return {
        key: (float(np.mean([m[key] for m in per_repeat])), float(np.std([m[key] for m in per_repeat])))
        for key in per_repeat[0]
    }


def latency_us(predictor: Any, rows: Sequence[LengthRow], passes: int = 20) -> dict[str, float]:
    """Single `predict` calls in microseconds (embeddings precomputed): p50 and p99 over all calls, the
    slowest prompt's median (the cost of the text itself) and the single slowest call (includes the OS
    preempting the process on a loaded machine)."""
    for r in rows[:20]:  # warm-up
        predictor.predict(r.embedding, r.estimated_prompt_tokens, r.prompt)
    samples = np.zeros((passes, len(rows)))
    for p in range(passes):
        for i, r in enumerate(rows):
            start = time.perf_counter_ns()
            predictor.predict(r.embedding, r.estimated_prompt_tokens, r.prompt)
            samples[p, i] = (time.perf_counter_ns() - start) / 1000
    return {
        "p50": float(np.percentile(samples, 50)),
        "p99": float(np.percentile(samples, 99)),
        "worst_prompt_median": float(np.median(samples, axis=0).max()),
        "max": float(samples.max()),
    }


def _fmt(value: float, digits: int = 3) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT)
    parser.add_argument(
        "--write-artifact", action="store_true", help="retrain the artifact on buckets 0-7 first"
    )
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnx-int8", help="the embedder's")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"data not found: {args.data} (the shared data folder is absent)", file=sys.stderr)
        return 2

    from icgate.cache.calibrate import default_encoder

    encode = default_encoder(None, ROOT / "bench" / "data" / "onnx", args.runtime)
    rows = embed_rows(load_length_rows(args.data, args.model), encode)
    train, test = split_rows(rows)
    if args.write_artifact:
        train_arena(args.data, encode, args.model, args.artifact)
    shipped = LengthPredictor.load(args.artifact)

    by_model = {m: {r.question_id: r.tokens for r in load_length_rows(args.data, m)} for m in OTHER_MODELS}
    mean_tokens = {
        qid: math.exp(np.mean([math.log(max(1, by_model[m][qid])) for m in OTHER_MODELS]))
        for qid in by_model[args.model]
    }
    predictors: list[tuple[str, Fit]] = [
        ("**icgate LengthPredictor**", fit_icgate),
        ("icgate LengthPredictor trained on all 3 models' mean length", fit_icgate_all_models(mean_tokens)),
        ("ridge on embedding (log tokens, alpha 1)", fit_ridge_embedding),
        ("prompt length only", fit_prompt_length),
        ("OutputLengthHeuristic (untrained fallback)", fit_heuristic),
    ]
    results = []
    for name, fit in predictors:
        started = time.perf_counter()
        results.append(
            (name, held_out(fit, train, test), cross_validated(fit, rows, args.folds, args.repeats))
        )
        print(f"{name}: {results[-1][1]} cv {results[-1][2]} ({time.perf_counter() - started:.1f} s)")

    shipped_eval = evaluate_length(shipped, test)
    lat = latency_us(shipped, rows)
    heur = latency_us(OutputLengthHeuristic(), rows)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    truth_all = np.array([r.tokens for r in rows], float)
    truth_test = np.array([r.tokens for r in test], float)
    references = []
    for other in OTHER_MODELS:
        if other == args.model:
            continue
        references.append(
            (
                other,
                _kendall(np.array([by_model[other][r.question_id] for r in test], float), truth_test),
                _kendall(np.array([by_model[other][r.question_id] for r in rows], float), truth_all),
            )
        )

    ours_held, ours_cv = results[0][1], results[0][2]
    met = ours_held["tau"] >= TARGET_TAU and ours_cv["tau"][0] >= TARGET_TAU
    command = f"    .venv/bin/python bench/length_quality.py --runtime {args.runtime}" + (
        " --write-artifact" if args.write_artifact else ""
    )
    if args.model != DEFAULT_MODEL:
        command += f" --model {args.model}"
    size_kb = args.artifact.stat().st_size / 1024
    lines = [
        "# Output-length prediction",
        "",
        f"Generated by `bench/length_quality.py` on {dt.date.today():%Y-%m-%d} ({platform.machine()}, Python "
        f"{platform.python_version()}). Data: `{args.data.name}` ({len(rows)} Arena-Hard prompts), target: "
        f"**{args.model}**'s answer lengths (cl100k tokens; median {np.median(truth_all):.0f}, p90 "
        f"{np.quantile(truth_all, 0.9):.0f}). Embeddings: packaged all-MiniLM-L6-v2 on "
        f"{args.runtime}.",
        "",
        f"Held-out split: buckets 8-9 of sha1(question_id) mod 10 = **{len(test)} prompts** "
        f"(train: {len(train)}). "
        f"Cross-validation: {args.folds}-fold over all {len(rows)} prompts, pooled out-of-fold predictions, "
        f"{args.repeats} shuffles (mean ± sd over shuffles; the sd shows fold-assignment noise only, the "
        f"sampling error of a tau on 250 prompts is about ±0.04, on {len(test)} about ±0.1).",
        "",
        f"Shipped artifact: `routers/artifacts/{args.artifact.name}` version `{shipped.version}` "
        f"({size_kb:.1f} KB), "
        f"trained on buckets 0-7 only ({shipped.summary.get('rows')} prompts). Its held-out result: tau "
        f"{shipped_eval['kendall_tau']:.3f}, MAE {shipped_eval['mae']:.0f} tokens, p90 coverage "
        f"{shipped_eval['p90_coverage']:.2f}, n {shipped_eval['n']} (same as `icgate length eval --data FILE "
        f"--model {args.model}`).",
        "",
        "| predictor | held-out tau | held-out MAE | held-out p90 coverage "
        "| CV tau | CV MAE | CV p90 coverage |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, held, cv in results:
        lines.append(
            f"| {name} | {_fmt(held['tau'])} | {_fmt(held['mae'], 0)} | {_fmt(held['coverage'], 2)} | "
            f"{_fmt(cv['tau'][0])} ± {_fmt(cv['tau'][1])} | {_fmt(cv['mae'][0], 0)} | "
            f"{_fmt(cv['coverage'][0], 2)} |"
        )
    lines += [
        "",
        "Reference, not a predictor (needs the answer): Kendall's tau between another model's *actual* "
        f"answer length and {args.model}'s:",
        "",
        "| other model's true length | held-out tau | tau on all prompts |",
        "| --- | --- | --- |",
        *[f"| {name} | {held:.3f} | {full:.3f} |" for name, held, full in references],
        "",
        f"Target (issue 4): Kendall's tau >= {TARGET_TAU} on held-out prompts: **"
        + ("met" if met else "NOT met")
        + f"** (held-out {ours_held['tau']:.3f}, cross-validated {ours_cv['tau'][0]:.3f}). "
        + "Even another GPT-4 snapshot's actual answer length reaches only the tau in the reference table, "
        "so 0.5 from the prompt alone would mean predicting this model nearly as well as a sibling model's "
        "real answer does; with ~200 training prompts and a 384-d sentence embedding, the best learners "
        "tried land at 0.30-0.33 cross-validated (list below).",
        "",
        "## Latency",
        "",
        f"Single `predict()` call of the shipped artifact, embedding precomputed, over all {len(rows)} "
        "prompts x 20: "
        f"p50 **{lat['p50']:.0f} µs**, p99 **{lat['p99']:.0f} µs** (budget: 1,000 µs); the slowest "
        f"prompt's median {lat['worst_prompt_median']:.0f} µs; the single slowest call {lat['max']:.0f} µs "
        f"(most likely the OS preempting the process: load average {load:.1f} on {os.cpu_count()} cores "
        "during the run). "
        f"`OutputLengthHeuristic`: p50 {heur['p50']:.0f} µs, p99 {heur['p99']:.0f} µs. The cost is the text "
        "features (word-set, substring and two regex passes over at most the first 1,200 and last 600 "
        "characters); the model is one "
        "384+15 dot product in numpy, no scikit-learn call per request.",
        "",
        "## What was tried (exploration, 10-fold CV tau over 250 prompts, 3 shuffles)",
        "",
        "- Ridge on the embedding, log-token target: 0.25-0.30 over alpha 0.3-30; raw-token and sqrt targets "
        "0.28-0.31; a rank target 0.30-0.32 (kept: ranks are what tau measures, and a few 1,500-4,000-token "
        "answers stop pulling the fit). The issue's 0.36 for a ridge on MiniLM embeddings is not reproduced "
        "on this file: 0.27 at alpha 1 (row 3 above), at most 0.31 with a tuned alpha, on any target.",
        "- The other models' answers as extra signal: the mean log length of all three models as target "
        "(0.23-0.29) or the three models stacked as extra rows (0.25-0.29): no gain (row 2 above; its p90 is "
        "calibrated on the mean length, which varies less than one model's, hence its low coverage).",
        "- Honesty note: these choices were explored with CV over all 250 prompts, held-out buckets "
        "included; a grid over alpha (1-10) and the feature weight (0-0.6) with CV on the training buckets "
        "alone moved tau by at most 0.03 (0.27-0.31), so the held-out number is not a product of tuning "
        "on it.",
        "- Kernel ridge (RBF) 0.28-0.30, SVR 0.30-0.32, k-nearest-neighbour mean 0.20-0.25, PCA-20 whitened "
        "ridge 0.28-0.31, standardised-dimension ridge 0.31, pairwise RankSVM (logistic on pair differences) "
        "0.25-0.32, a rank-average of ridge and SVR 0.33.",
        "- Hand-made prompt features (verbs, code asks, questions, requested length, code in the prompt, "
        "short/long cues): each alone |tau| <= 0.14; ridge on them alone 0.09, gradient boosting 0.06, extra "
        "trees 0.09; TF-IDF ridge 0.10-0.16; stacking them with the embedding ridge (linear or boosted) "
        "0.10-0.23. Added to the embedding with a small weight they are neutral (kept: they carry explicit "
        "length requests and keep a prediction possible without an embedding).",
        "- Where the error is: prompts over 1,000 characters (pasted code or data) rank at tau ~0.0, because "
        "the embedding describes the pasted content, not the request; short arithmetic or rewrite requests "
        "are the largest over-predictions, large open-ended build tasks the largest under-predictions.",
        "",
        "p90 is the calibrated median plus the 90th percentile of out-of-fold log residuals, so its coverage "
        'on unseen prompts should be near 0.90. An explicit length request in the prompt ("in 100 words") '
        "overrides the model (p50 = the request in tokens, p90 = 1.5x).",
        "",
        "## Command",
        "",
        command,
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
