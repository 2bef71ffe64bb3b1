"""Per-backend length learning, replayed through a real gateway: how good each backend's own predictor is
after 100 ... 10,000 logged answers, against the shipped predictor, and what reading truncated answers as
lower bounds is worth.

Protocol:

- Data: the sources of the content-bearing set (`bench/content_trace.py`):
  `../shared/data/length/arena_hard_lengths.jsonl` (250 Arena-Hard prompts, answer lengths in cl100k
  tokens), `../shared/data/routing/gsm8k_mixtral_gpt4.csv` (879 GSM8K prompts with Mixtral-8x7B's and
  GPT-4-1106's full answers) and `../shared/data/cache/contextual_queries.json` (128 MeanCache questions,
  each also followed up after its answer: 256 conversations, one answer each). Lengths the files do not
  give are measured here in cl100k tokens with tiktoken, whose cl100k file litellm bundles (no download).
- Two stand-in backends answer every prompt with one real model's answer length (a word per token):
  `weak` gives Mixtral's length on GSM8K and gpt-3.5-turbo-0125's on Arena-Hard, `strong` GPT-4-1106's and
  gpt-4-0314's; on MeanCache both give its one known answer's length. A repeated prompt gets the same
  length again (one answer per prompt and model is known).
- Held out: Arena-Hard buckets 8-9 of sha1(question_id) (the shipped predictor's own held-out prompts),
  GSM8K and MeanCache buckets 8-9 of sha1(the question; a follow-up goes with its question). Held-out
  prompts are never sent to the gateway.
- The replay: `icgate serve` (a subprocess, its own SQLite database) in front of the two stand-ins; every
  training prompt is asked of both backends by name, in shuffled rounds (each round sends every training
  prompt once, so 10,000 answers per backend repeat each of the ~900 training prompts about 11 times).
  30% of requests carry `max_tokens: 128`, so long answers come back truncated (`finish_reason: length`).
- At each checkpoint (answers per backend), once the gateway's length samples are written, the bench runs
  the gateway's own refit (`gateway.store.length_learning.refit_backend`, the function its schedule runs)
  against the gateway's database, then scores the published `length:<backend>` predictor on the held-out
  prompts, embedded as the gateway embeds them (`conversation_text`, the policy's runtime).
- At 10,000: the same rows fitted with truncated answers as labels, and with them dropped.
- Metrics: Kendall's tau (tau-b) of predicted p50 against true tokens, MAE of p50, share of true lengths
  above p50 (0.5 for an unbiased median), p90 coverage.

Run:  .venv/bin/python bench/length_learning.py   (about 4-5 minutes on 2 cores; appends or replaces its
      section of bench/results/length.md)
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import sqlalchemy as sa
import yaml
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import ServerThread, free_port  # noqa: E402
from bench.overhead import spawn, stop, wait_ready  # noqa: E402
from bench.standin_backend import StandinBackend  # noqa: E402
from icgate.cache.embed import conversation_text  # noqa: E402
from icgate.gateway.config import LengthsConfig  # noqa: E402
from icgate.gateway.store import artifacts  # noqa: E402
from icgate.gateway.store.db import make_engine  # noqa: E402
from icgate.gateway.store.length_learning import length_kind, refit_backend  # noqa: E402
from icgate.gateway.store.length_samples import counts, newest_answers  # noqa: E402
from icgate.lengths.predict import (  # noqa: E402
    LengthEstimate,
    LengthModel,
    LengthPredictor,
    feature_window,
    load_length_model,
)
from icgate.lengths.training import LoggedAnswer, fit_logged  # noqa: E402
from icgate.text import HELD_OUT_BUCKETS, bucket_of, estimate_prompt_tokens, scrub_pii  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
ARENA = DATA / "length" / "arena_hard_lengths.jsonl"
GSM8K = DATA / "routing" / "gsm8k_mixtral_gpt4.csv"
MEANCACHE = DATA / "cache" / "contextual_queries.json"
SOURCES = ("gsm8k", "arena", "meancache")
REPORT = ROOT / "bench" / "results" / "length.md"
BACKENDS = ("weak", "strong")
MODELS = {
    "weak": {"arena": "gpt-3.5-turbo-0125", "gsm8k": "mistralai/Mixtral-8x7B-Instruct-v0.1"},
    "strong": {"arena": "gpt-4-0314", "gsm8k": "gpt-4-1106-preview"},
}
HEADING = "## Per-backend learning from the gateway's own answers"
END = "<!-- end of bench/length_learning.py's section -->"


@dataclass(frozen=True)
class Prompt:
    text: str  # the last user turn
    source: str  # gsm8k | arena | meancache
    tokens: dict[str, int]  # backend -> true answer length
    held: bool
    context: tuple[tuple[str, str], ...] = ()  # (role, text) before the last user turn
    embedding: np.ndarray | None = None

    @property
    def messages(self) -> list[dict[str, str]]:
        return [*({"role": r, "content": t} for r, t in self.context), {"role": "user", "content": self.text}]

    @property
    def prompt_tokens(self) -> int:
        return estimate_prompt_tokens({"messages": self.messages}, "chat")


def cl100k() -> Any:
    """tiktoken's cl100k_base from the file litellm bundles (never downloaded; litellm itself is not
    imported: its import would try to fetch a price list)."""
    import importlib.util

    import tiktoken

    spec = importlib.util.find_spec("litellm")
    assert spec is not None and spec.submodule_search_locations, "litellm is not installed"
    bundled = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
    os.environ["TIKTOKEN_CACHE_DIR"] = str(bundled)
    return tiktoken.get_encoding("cl100k_base")


def load_prompts() -> list[Prompt]:
    prompts = []
    with ARENA.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            tokens = {b: int(row["answers"][MODELS[b]["arena"]]["tokens"]) for b in BACKENDS}
            held = bucket_of(row["question_id"]) in HELD_OUT_BUCKETS
            prompts.append(Prompt(row["prompt"], "arena", tokens, held))
    encoding = cl100k()
    with GSM8K.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            tokens = {b: len(encoding.encode(row[MODELS[b]["gsm8k"] + "_response"])) for b in BACKENDS}
            prompts.append(
                Prompt(row["prompt"], "gsm8k", tokens, bucket_of(row["prompt"]) in HELD_OUT_BUCKETS)
            )
    for record in json.loads(MEANCACHE.read_text(encoding="utf-8")):
        main, answer = record["Main Query"], record["Main Query Response"]
        held = bucket_of(main) in HELD_OUT_BUCKETS
        first = max(1, len(encoding.encode(answer)))
        follow = max(1, len(encoding.encode(record["Follow Up Query Response"])))
        prompts.append(Prompt(main, "meancache", dict.fromkeys(BACKENDS, first), held))
        context = (("user", main), ("assistant", answer))
        prompts.append(
            Prompt(record["Follow-Up Query"], "meancache", dict.fromkeys(BACKENDS, follow), held, context)
        )
    seen: set[str] = set()
    unique = []
    for p in prompts:  # a text asked twice (a follow-up that recurs) keeps its first length only
        if p.text not in seen:
            seen.add(p.text)
            unique.append(p)
    return unique


class LengthStandin(StandinBackend):
    """Answers a known prompt with its model's answer length in words (one word, one token), cut at the
    request's max_tokens as a server would."""

    def __init__(self, name: str, lengths: dict[str, int]) -> None:
        super().__init__(name, keep=0)
        self.lengths = lengths

    def _answer(self, prompt: str, body: dict[str, Any]) -> str:
        words = max(1, self.lengths.get(prompt, 50))
        limit = body.get("max_tokens")
        return " ".join(["tok"] * (min(words, int(limit)) if limit else words))


def write_policy(path: Path, urls: dict[str, str], database: Path) -> None:
    backends = [
        {
            "name": name,
            "tier": tier,
            "model": f"openai/{name}-model",
            "api_base": urls[name] + "/v1",
            "client": "http",
            "max_concurrent": 64,
            "timeout_s": 60,
        }
        for name, tier in (("weak", "small"), ("strong", "large"))
    ]
    policy = {
        "backends": backends,
        "auth": {"required": False},
        "database": {"url": f"sqlite:///{database}"},
        "router": {"kind": "rule"},
        # Named requests embedded as routed ones are (their samples carry the embedding); nothing stored or
        # served from the cache, so every request reaches its backend.
        "cache": {"named_backends": "full", "store": False, "exact": False},
        "embedding": {"max_queue_ms": None},  # every request gets its embedding, however long the queue
        # The bench runs the refit at its checkpoints; the gateway's own schedule stays out of the way.
        "lengths": {"min_rows": 100, "min_new_rows": 1, "max_rows": 10_000, "refit_interval_s": 1e7},
    }
    path.write_text(yaml.safe_dump(policy, sort_keys=False))


Step = tuple[str, Prompt, int | None]  # backend, prompt, max_tokens


async def replay(url: str, plan: Sequence[Step], concurrency: int) -> tuple[int, float]:
    """Send `plan` with `concurrency` clients; (errors, seconds)."""
    queue = list(reversed(plan))
    errors = 0
    started = time.perf_counter()

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while queue:
            backend, prompt, cap = queue.pop()
            body: dict[str, Any] = {"model": backend, "messages": prompt.messages}
            if cap:
                body["max_tokens"] = cap
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                errors += resp.status != 200

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return errors, time.perf_counter() - started


def wait_written(engine: sa.Engine, expected: dict[str, int], timeout_s: float = 60.0) -> None:
    """Until the gateway's write-behind queue has written every answer sent so far."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = {c.backend: c.rows for c in counts(engine)}
        if all(rows.get(b, 0) >= n for b, n in expected.items()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"length samples not written: {rows} of {expected}")
        time.sleep(0.2)


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import kendalltau

    tau = kendalltau(a, b).statistic
    return float(tau) if tau == tau else 0.0


def score(model: LengthModel, held: Sequence[Prompt], backend: str) -> dict[str, float]:
    estimates: list[LengthEstimate] = [model.predict(p.embedding, p.prompt_tokens, p.text) for p in held]
    p50 = np.array([e.p50 for e in estimates], dtype=np.float64)
    p90 = np.array([e.p90 for e in estimates], dtype=np.float64)
    truth = np.array([p.tokens[backend] for p in held], dtype=np.float64)
    out = {
        "tau": kendall(p50, truth),
        "mae": float(np.abs(p50 - truth).mean()),
        "above_p50": float((truth > p50).mean()),
        "p90_coverage": float((truth <= p90).mean()),
    }
    for source in SOURCES:
        mask = np.array([p.source == source for p in held])
        out[f"tau_{source}"] = kendall(p50[mask], truth[mask])
    return out


def published(engine: sa.Engine, backend: str) -> LengthPredictor:
    stored = artifacts.newest(engine, length_kind(backend))
    assert stored is not None, f"no predictor published for {backend}"
    return LengthPredictor.from_bytes(stored.artifact)


def ablation(
    engine: sa.Engine, held: Sequence[Prompt], prompts: Sequence[Prompt]
) -> dict[str, dict[str, dict[str, float]]]:
    """The 10,000 logged answers of each backend fitted three ways: truncated ones as lower bounds (the
    gateway's way), as labels, dropped; and, for reference, with every answer at its true length (what a
    fit on truncated answers should reproduce)."""
    true_length = {scrub_pii(feature_window(p.text)): p.tokens for p in prompts}  # as the samples keep it
    out: dict[str, dict[str, dict[str, float]]] = {}
    for backend in BACKENDS:
        ways: dict[str, Callable[[list[LoggedAnswer]], list[LoggedAnswer]]] = {
            "as lower bounds (the gateway)": lambda rows: rows,
            "as labels": lambda rows: [replace(a, truncated=False) for a in rows],
            "dropped": lambda rows: [a for a in rows if not a.truncated],
            "none truncated (reference)": lambda rows, b=backend: [  # type: ignore[misc]
                replace(a, completion_tokens=true_length[a.text][b], truncated=False) for a in rows
            ],
        }
        rows, _ = newest_answers(engine, backend, 10_000)
        out[backend] = {}
        for way, change in ways.items():
            chosen = change(rows)
            with threadpool_limits(1, user_api="blas"):  # as the gateway's refit
                fitted = fit_logged(chosen)
            out[backend][way] = {
                **score(fitted, held, backend),
                "rows": len(chosen),
                "truncated": sum(a.truncated for a in rows),
            }
    return out


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


Curve = dict[int, dict[str, dict[str, float]]]


def min_rows_choice(curve: Curve, shipped: dict[str, dict[str, float]], taus: Sequence[str]) -> int | None:
    """The first checkpoint at which every backend's own predictor is at least as good as the shipped one
    on MAE and on each tau in `taus`."""
    for answers in sorted(curve):
        if all(
            curve[answers][b]["mae"] <= shipped[b]["mae"]
            and all(curve[answers][b][t] >= shipped[b][t] for t in taus)
            for b in BACKENDS
        ):
            return answers
    return None


def report(result: dict[str, Any]) -> str:
    curve: Curve = result["curve"]
    shipped: dict[str, dict[str, float]] = result["shipped"]
    lines = [
        HEADING,
        "",
        f"Generated by `bench/length_learning.py` on {result['date']} ({platform.machine()}, Python "
        f"{platform.python_version()}, 2 cores shared with other work). Each backend's own predictor "
        "(`lengths.learn`), refitted from the length samples a real gateway logged while replaying prompts "
        "through two stand-in backends that answer with real models' answer lengths:",
        "",
        "- The prompts of the content-bearing set's sources (`bench/content_trace.py`): GSM8K, Arena-Hard "
        "and MeanCache (its questions, and their follow-ups asked after the answer). `weak` answers with "
        "Mixtral-8x7B's lengths on GSM8K and gpt-3.5-turbo-0125's on Arena-Hard; `strong` with GPT-4-1106's "
        "and gpt-4-0314's; on MeanCache both with its one known answer's (cl100k tokens; what the files do "
        "not count, measured here with tiktoken's cl100k, the file litellm bundles).",
        f"- Training prompts: {result['train_prompts']} ({result['train_gsm8k']} GSM8K, "
        f"{result['train_arena']} Arena-Hard, {result['train_meancache']} MeanCache). Held out, never sent: "
        f"{result['held_prompts']} ({result['held_gsm8k']} GSM8K, {result['held_arena']} Arena-Hard, "
        f"{result['held_meancache']} MeanCache: buckets 8-9; for Arena-Hard the shipped predictor's own "
        "held-out prompts).",
        f"- **Repeats, honestly:** {result['train_prompts']} prompts cannot make 10,000 distinct answers; "
        "the replay sends every training prompt once per round, in a new order each round, so 10,000 answers "
        f"per backend hold each prompt about {10_000 / result['train_prompts']:.0f} times, with the same "
        "length each time (one real answer per prompt and model is known). Past the first "
        f"{result['train_prompts']} answers, the curve measures what more of the same prompts adds: real "
        "traffic, with new prompts and varying lengths, would keep improving longer.",
        f"- {int(result['capped_share'] * 100)}% of requests carried `max_tokens: {result['cap']}`; "
        f"{result['truncated_share'] * 100:.1f}% of the logged answers came back truncated and are read as "
        "lower bounds.",
        f"- The replay: {result['requests']:,} requests through `icgate serve` in {result['replay_s']:.0f} s "
        f"({result['requests'] / result['replay_s']:.0f} requests/s at {result['concurrency']} clients, "
        f"{result['errors']} errors). At each checkpoint the bench ran the gateway's own refit "
        "(`gateway.store.length_learning.refit_backend`, what its schedule runs) on the gateway's database "
        "and scored the published `length:<backend>` predictor on the held-out prompts, embedded as the "
        "gateway embeds them.",
        "",
        "Held-out Kendall's tau (predicted p50 against the true length), MAE of p50 in tokens, p90 coverage "
        "(share of true lengths at or under p90); tau per data set beside the pooled one:",
        "",
        "| predictor | backend | answers logged | tau | tau GSM8K | tau Arena-Hard | tau MeanCache | MAE "
        "| p90 coverage |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backend in BACKENDS:
        s = shipped[backend]
        lines.append(
            f"| shipped (Arena-Hard gpt-4-0314) | {backend} | 0 | {fmt(s['tau'])} | {fmt(s['tau_gsm8k'])} | "
            f"{fmt(s['tau_arena'])} | {fmt(s['tau_meancache'])} | {s['mae']:.0f} | "
            f"{fmt(s['p90_coverage'], 2)} |"
        )
        for answers in sorted(curve):
            c = curve[answers][backend]
            lines.append(
                f"| own | {backend} | {answers:,} | {fmt(c['tau'])} | {fmt(c['tau_gsm8k'])} | "
                f"{fmt(c['tau_arena'])} | {fmt(c['tau_meancache'])} | {c['mae']:.0f} | "
                f"{fmt(c['p90_coverage'], 2)} |"
            )
    pooled = min_rows_choice(curve, shipped, ["tau"])
    home = min_rows_choice(curve, shipped, ["tau", "tau_arena"])
    lines += [
        "",
        "A tau on the held-out prompts has a standard error of about "
        f"{0.8 / np.sqrt(result['held_prompts']):.2f} pooled and "
        f"{0.8 / np.sqrt(result['held_arena']):.2f} on Arena-Hard alone (roughly 0.8/sqrt(n)); smaller "
        "differences are noise.",
        "",
        "When a backend's own predictor is as good as the shipped one (for `lengths.min_rows`): on MAE and "
        f"the pooled tau from **{pooled if pooled is not None else 'never, in this run'}** answers per "
        "backend; on MAE, the pooled tau and the Arena-Hard tau (the shipped predictor's home ground: it was "
        "fitted on the other Arena-Hard prompts, and `strong`'s Arena-Hard lengths are its own target) from "
        f"**{home if home is not None else 'never, in this run'}**. The default `lengths.min_rows` is "
        f"{result['default_min_rows']:,}.",
        "",
        "Truncated answers at 10,000 logged answers: the same rows fitted three ways, and, for reference, "
        "with every answer at its true length: a fit that reads truncated answers right lands near the "
        "reference (share above p50: of the held-out true lengths, how many exceed the predicted median). "
        "Here a prompt is asked about 9 times and capped at random, so most truncated answers have finished "
        "answers to the same prompt beside them, which the gateway's fit imputes from first; dropping them "
        "also loses little in this replay. Where long answers are only ever seen truncated, labels and "
        "dropping bias the median short (`tests/lengths/test_censored.py`, synthetic).",
        "",
        "| backend | truncated | read as | rows fitted | tau | MAE | share above p50 | p90 coverage |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backend, ways in result["ablation"].items():
        for way, m in ways.items():
            lines.append(
                f"| {backend} | {m['truncated']:,} | {way} | {m['rows']:,} | {fmt(m['tau'])} | "
                f"{m['mae']:.0f} | {fmt(m['above_p50'], 2)} | {fmt(m['p90_coverage'], 2)} |"
            )
    lines += [
        "",
        f"A refit of one backend at 10,000 answers (read, fit with one BLAS thread, publish, prune) took "
        f"{result['refit_s']:.1f} s of one core here; the artifact is {result['artifact_kb']:.1f} KB.",
        "",
        "Command:",
        "",
        "    .venv/bin/python bench/length_learning.py",
        "",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    """Append this bench's section to the report, or replace it where an earlier run left it."""
    old = REPORT.read_text(encoding="utf-8") if REPORT.exists() else ""
    pattern = re.compile(re.escape(HEADING) + r".*?" + re.escape(END) + r"\n?", re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    REPORT.write_text(new, encoding="utf-8")


def embed_held(held: list[Prompt], runtime: str) -> list[Prompt]:
    from icgate.cache.calibrate import default_encoder

    encode = default_encoder(None, ROOT / "data" / "models", runtime)  # type: ignore[arg-type]
    texts = [conversation_text(p.messages) for p in held]
    vectors = np.asarray(encode(texts), dtype=np.float32)
    return [replace(p, embedding=v) for p, v in zip(held, vectors, strict=True)]


def plan_round(train: list[Prompt], rng: random.Random, cap: int, capped_share: float) -> list[Step]:
    order = list(train)
    rng.shuffle(order)
    return [(b, p, cap if rng.random() < capped_share else None) for p in order for b in BACKENDS]


def run(args: argparse.Namespace) -> dict[str, Any]:
    prompts = load_prompts()
    train = [p for p in prompts if not p.held]
    held = embed_held([p for p in prompts if p.held], args.runtime)
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="icgate-length-learning-"))
    data_dir = workdir / "data"
    data_dir.mkdir()
    if (ROOT / "data" / "models").is_dir():  # the exported embedder graph: no export at start
        os.symlink(ROOT / "data" / "models", data_dir / "models")
    lengths = {b: {p.text: p.tokens[b] for p in prompts} for b in BACKENDS}
    standins = {b: ServerThread(LengthStandin(f"{b}-model", lengths[b]).app).start() for b in BACKENDS}
    database = data_dir / "icgate.db"
    policy = workdir / "policy.yaml"
    write_policy(policy, {b: s.url for b, s in standins.items()}, database)
    port = free_port()
    cli = ["serve", "--policy", str(policy), "--port", str(port), "--data-dir", str(data_dir), "--no-launch"]
    gateway = spawn("gateway", ["-m", "icgate.gateway.cli.main", *cli], port, workdir)
    engine = None
    try:
        asyncio.run(wait_ready(gateway, "/readyz", 180))
        engine = make_engine(f"sqlite:///{database}")
        config = LengthsConfig(min_rows=100, min_new_rows=1, max_rows=10_000)
        shipped_model = load_length_model()
        shipped = {b: score(shipped_model, held, b) for b in BACKENDS}
        plan: list[Step] = []
        sent = 0
        curve: Curve = {}
        replay_s = 0.0
        errors = 0
        refit_s = 0.0
        for checkpoint in args.answers:
            while len(plan) < checkpoint * len(BACKENDS):
                plan += plan_round(train, rng, args.cap, args.capped_share)
            batch = plan[sent : checkpoint * len(BACKENDS)]
            failed, took = asyncio.run(replay(gateway.url, batch, args.concurrency))
            errors, replay_s, sent = errors + failed, replay_s + took, checkpoint * len(BACKENDS)
            wait_written(engine, dict.fromkeys(BACKENDS, checkpoint))
            curve[checkpoint] = {}
            for backend in BACKENDS:
                started = time.perf_counter()
                done = refit_backend(engine, config, backend)
                refit_s = time.perf_counter() - started
                assert done.outcome == "published", done
                curve[checkpoint][backend] = score(published(engine, backend), held, backend)
            seen = ", ".join(
                f"{b} tau {m['tau']:.3f} mae {m['mae']:.0f}" for b, m in curve[checkpoint].items()
            )
            print(f"{checkpoint:>6} answers per backend: {seen} ({replay_s:.0f} s replayed)", flush=True)
        rows = newest_answers(engine, "strong", 10_000)[0] + newest_answers(engine, "weak", 10_000)[0]
        artifact = artifacts.newest(engine, length_kind("strong"))
        return {
            "date": dt.date.today().isoformat(),
            "curve": curve,
            "shipped": shipped,
            "ablation": ablation(engine, held, prompts),
            "train_prompts": len(train),
            "train_gsm8k": sum(p.source == "gsm8k" for p in train),
            "train_arena": sum(p.source == "arena" for p in train),
            "train_meancache": sum(p.source == "meancache" for p in train),
            "held_prompts": len(held),
            "held_gsm8k": sum(p.source == "gsm8k" for p in held),
            "held_arena": sum(p.source == "arena" for p in held),
            "held_meancache": sum(p.source == "meancache" for p in held),
            "requests": sent,
            "replay_s": replay_s,
            "errors": errors,
            "concurrency": args.concurrency,
            "cap": args.cap,
            "capped_share": args.capped_share,
            "truncated_share": sum(a.truncated for a in rows) / max(1, len(rows)),
            "refit_s": refit_s,
            "default_min_rows": LengthsConfig().min_rows,
            "artifact_kb": len(artifact.artifact) / 1024 if artifact else 0.0,
        }
    finally:
        if engine is not None:
            engine.dispose()
        stop(gateway)
        for server in standins.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--answers", type=int, nargs="+", default=[100, 300, 1000, 3000, 10_000])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cap", type=int, default=128, help="max_tokens of the capped requests")
    parser.add_argument("--capped-share", type=float, default=0.3)
    parser.add_argument("--runtime", default="onnx-int8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write the report")
    args = parser.parse_args()
    args.answers = sorted(args.answers)
    result = run(args)
    text = report(result)
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
