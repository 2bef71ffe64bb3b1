"""Can a tenant tell, by how fast it is answered, whether another tenant asked the same question?

    .venv/bin/python bench/tenant_timing.py                 # 200 questions per set
    .venv/bin/python bench/tenant_timing.py --questions 100

A real `icgate serve` (the shipped cache settings: exact and semantic hits, examples, storage; keys
required; the shipped router) over two stand-in backends, each in a process of its own; this process is
only the client, one request at a time. Two sets of distinct questions, S1 and S2, of the same templates.

- Round 1: tenant A1 asks S1. Then tenant B1 asks S1 and S2, interleaved in a random order.
- Round 2: tenant A2 asks S2. Then tenant B2 asks S1 and S2, in another random order.

Each question is thus asked once by a B after another tenant asked it, and once by a B when no one had:
a paired comparison (Wilcoxon signed-rank on each question's two latencies) that no difference between
the questions themselves can bias, beside the two pooled distributions (p50, p90, Mann-Whitney U,
Kolmogorov-Smirnov). Two positive controls show what a leak would look like: B1 asking its own
questions again (exact hits), and B1 asking its own questions again with `temperature: 0.7`, which
is never served from the cache but embeds the text again (the embedding memo's saving: what a memo
shared between tenants would leak). Latency is the client's: what a prober sees.
Writes bench/results/tenant_timing.md.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `bench` and `icgate` importable
    sys.path.insert(0, str(REPO))

from bench.harness import free_port  # noqa: E402

RESULTS = REPO / "bench" / "results" / "tenant_timing.md"
PREPARED_MODELS = REPO / "data" / "models"

CITIES = [
    "Paris",
    "Lyon",
    "Berlin",
    "Munich",
    "Madrid",
    "Seville",
    "Rome",
    "Milan",
    "Vienna",
    "Prague",
    "Warsaw",
    "Krakow",
    "Lisbon",
    "Porto",
    "Dublin",
    "Oslo",
    "Bergen",
    "Stockholm",
    "Helsinki",
    "Copenhagen",
    "Athens",
    "Budapest",
    "Zagreb",
    "Sofia",
    "Bucharest",
    "Tallinn",
    "Riga",
    "Vilnius",
    "Brussels",
    "Antwerp",
    "Amsterdam",
    "Utrecht",
    "Zurich",
    "Geneva",
    "Edinburgh",
    "Glasgow",
    "Cardiff",
    "Belfast",
    "Kyoto",
    "Osaka",
    "Seoul",
    "Busan",
    "Hanoi",
    "Manila",
    "Jakarta",
    "Lima",
    "Quito",
    "Bogota",
    "Santiago",
    "Montreal",
    "Toronto",
    "Denver",
    "Seattle",
    "Boston",
    "Austin",
    "Chicago",
    "Phoenix",
    "Atlanta",
    "Nairobi",
    "Lagos",
    "Accra",
    "Cairo",
    "Tunis",
    "Casablanca",
    "Perth",
    "Adelaide",
    "Brisbane",
    "Auckland",
]
THINGS = [
    "a bicycle gear",
    "a jet engine",
    "a heat pump",
    "a solar panel",
    "a refrigerator",
    "a microwave oven",
    "a vaccine",
    "a compass",
    "a barometer",
    "a lighthouse",
    "a suspension bridge",
    "a steam locomotive",
    "a hydroelectric dam",
    "a telescope",
    "a quartz watch",
    "a smoke detector",
    "a hearing aid",
    "a credit card chip",
    "a wind turbine",
    "a nuclear reactor",
    "an elevator brake",
    "a car airbag",
    "a water filter",
    "a 3D printer",
    "a touch screen",
]
FOODS = [
    "lentils",
    "quinoa",
    "spinach",
    "salmon",
    "blueberries",
    "almonds",
    "oats",
    "broccoli",
    "kimchi",
    "green tea",
    "dark chocolate",
    "chickpeas",
    "avocado",
    "sardines",
    "sweet potatoes",
    "walnuts",
    "yogurt",
    "garlic",
    "ginger",
    "beets",
    "mushrooms",
    "tofu",
    "barley",
    "kale",
    "mackerel",
]
TEMPLATES = [
    ("What is the population of {c}?", CITIES),
    ("What is the best time of year to visit {c}?", CITIES),
    ("Which museums should I see in {c}?", CITIES),
    ("How do I get from the airport to the center of {c}?", CITIES),
    ("What is {c} famous for?", CITIES),
    ("Where can I eat well and cheaply in {c}?", CITIES),
    ("What is the weather like in {c} in winter?", CITIES),
    ("Is {c} a good place for a weekend with children?", CITIES),
    ("How much does {t} cost to repair?", THINGS),
    ("Is it safe to eat {f} every day?", FOODS),
    ("How does {t} work?", THINGS),
    ("Who invented {t}?", THINGS),
    ("What are the health benefits of {f}?", FOODS),
    ("How should I store {f} so they keep longer?", FOODS),
]


def question_pool(n: int, rng: random.Random) -> list[str]:
    """`n` distinct questions drawn across the templates."""
    every = [template.format(c=x, t=x, f=x) for template, fillers in TEMPLATES for x in fillers]
    every = [" ".join(q.split()) for q in every]
    if n > len(every):
        raise SystemExit(f"at most {len(every)} questions available, {n} asked for")
    return rng.sample(every, n)


# --- the gateway -----------------------------------------------------------------------------------------


@contextmanager
def process(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@dataclass
class Running:
    url: str
    keys: dict[str, str]


@contextmanager
def running_gateway(folder: Path, tenants: list[str]) -> Iterator[Running]:
    python = sys.executable
    standin = str(REPO / "bench" / "standin_backend.py")
    ports = {"small": free_port(), "large": free_port()}
    with (
        process(
            [python, standin, "--port", str(ports["small"]), "--name", "small-model"], folder / "s.log"
        ) as small,
        process(
            [python, standin, "--port", str(ports["large"]), "--name", "large-model"], folder / "l.log"
        ) as large,
    ):
        for name, proc in (("small", small), ("large", large)):
            wait_ready(f"http://127.0.0.1:{ports[name]}/healthz", proc, folder / f"{name[0]}.log")
        policy = {
            "backends": [
                {"name": name, "tier": name, "model": f"openai/{name}-model", "client": "http",
                 "api_base": f"http://127.0.0.1:{ports[name]}/v1"}
                for name in ("small", "large")
            ],
            "auth": {"required": True},
        }  # fmt: skip
        path = folder / "policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        data_dir = folder / "data"
        data_dir.mkdir()
        if PREPARED_MODELS.is_dir():
            (data_dir / "models").symlink_to(PREPARED_MODELS)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("ICGATE_DATABASE_URL", "ICGATE_REDIS_URL")}
        cmd = [python, "-m", "icgate.gateway.cli.main", "serve", "--policy", str(path), "--data-dir"]
        cmd += [str(data_dir), "--port", str(port), "--no-launch"]
        with process(cmd, folder / "serve.log", env) as gateway:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url + "/readyz", gateway, folder / "serve.log")
            from icgate.gateway.store import keys
            from icgate.gateway.store.db import make_engine

            engine = make_engine(f"sqlite:///{data_dir / 'icgate.db'}")
            try:
                made = {t: keys.create_key(engine, t).key for t in tenants}
            finally:
                engine.dispose()
            yield Running(url, made)


# --- measuring -------------------------------------------------------------------------------------------


@dataclass
class Sample:
    tenant: str
    question: str
    ms: float
    route: str
    status: int


@dataclass
class Client:
    running: Running
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60))

    def ask(self, tenant: str, question: str, **extra: Any) -> Sample:
        body = {"model": "auto", "messages": [{"role": "user", "content": question}], **extra}
        headers = {"authorization": f"Bearer {self.running.keys[tenant]}"}
        started = time.perf_counter()
        response = self.http.post(self.running.url + "/v1/chat/completions", json=body, headers=headers)
        ms = (time.perf_counter() - started) * 1000
        response.read()
        return Sample(
            tenant, question, ms, response.headers.get("x-icgate-route", "none"), response.status_code
        )


def measure(running: Running, n: int, controls: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    pool = question_pool(40 + 2 * n + 2 * controls, rng)
    warm, s1, s2 = pool[:40], pool[40 : 40 + n], pool[40 + n : 40 + 2 * n]
    fresh, fresh2 = pool[40 + 2 * n : 40 + 2 * n + controls], pool[40 + 2 * n + controls :]
    client = Client(running)
    for q in warm:  # connections, the embedder's and verifier's first calls, the router
        client.ask("W", q)
    asked: dict[str, list[float]] = {"by_other": [], "never": []}
    paired: dict[str, dict[str, float]] = {}
    routes: dict[str, Counter[str]] = {"by_other": Counter(), "never": Counter()}
    b_samples: list[Sample] = []
    for a, b, mine in (("A1", "B1", s1), ("A2", "B2", s2)):
        for q in mine:
            client.ask(a, q)
        time.sleep(1.0)  # A's answers stored, as a prober would wait
        order = s1 + s2
        rng.shuffle(order)
        mine_set = set(mine)
        for q in order:
            sample = client.ask(b, q)
            b_samples.append(sample)
            kind = "by_other" if q in mine_set else "never"
            asked[kind].append(sample.ms)
            routes[kind][sample.route] += 1
            paired.setdefault(q, {})[kind] = sample.ms
    # positive controls, by B1 on its own questions
    time.sleep(1.0)
    own = rng.sample(s1 + s2, 2 * controls)
    exact: dict[str, list[float]] = {"again": [], "new": []}
    for q_own, q_new in zip(own[:controls], fresh, strict=True):  # interleaved
        exact["again"].append(client.ask("B1", q_own).ms)
        exact["new"].append(client.ask("B1", q_new).ms)
    own2 = own[controls:]
    memo: dict[str, list[float]] = {"again": [], "new": []}
    for q_own, q_new in zip(own2, fresh2, strict=True):  # interleaved, sampled: never from the cache
        memo["again"].append(client.ask("B1", q_own, temperature=0.7).ms)
        memo["new"].append(client.ask("B1", q_new, temperature=0.7).ms)
    errors = [s for s in b_samples if s.status != 200]
    return {
        "n": n,
        "asked": asked,
        "paired": paired,
        "routes": routes,
        "exact": exact,
        "memo": memo,
        "errors": len(errors),
    }


# --- report ----------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def compare(x: list[float], y: list[float]) -> dict[str, float]:
    from scipy import stats

    return {
        "mwu_p": float(stats.mannwhitneyu(x, y, alternative="two-sided").pvalue),
        "ks_p": float(stats.ks_2samp(x, y).pvalue),
    }


def row(label: str, values: list[float]) -> str:
    return (
        f"| {label} | {len(values)} | {statistics.mean(values):.2f} | {pct(values, 0.5):.2f} | "
        f"{pct(values, 0.9):.2f} | {pct(values, 0.99):.2f} |"
    )


def report(result: dict[str, Any], argv: list[str], seconds: float) -> str:
    from scipy import stats

    from bench.overhead import machine

    info = machine()
    asked, paired = result["asked"], result["paired"]
    both = [v for v in paired.values() if len(v) == 2]
    diffs = [v["by_other"] - v["never"] for v in both]
    wilcoxon = float(stats.wilcoxon(diffs).pvalue)
    main = compare(asked["by_other"], asked["never"])
    exact = compare(result["exact"]["again"], result["exact"]["new"])
    memo = compare(result["memo"]["again"], result["memo"]["new"])
    memo_saving = pct(result["memo"]["new"], 0.5) - pct(result["memo"]["again"], 0.5)
    main_gap = pct(asked["by_other"], 0.5) - pct(asked["never"], 0.5)
    routes = {k: ", ".join(f"{r} {n}" for r, n in sorted(c.items())) for k, c in result["routes"].items()}
    signal = main["mwu_p"] < 0.01 or wilcoxon < 0.01
    verdict = (
        "**A signal**: B's latency depends on whether another tenant asked the question first; see below."
        if signal
        else "**No signal**: B cannot tell the questions another tenant asked from those no one asked. "
        f"The medians differ by {main_gap:+.2f} ms (paired median difference "
        f"{statistics.median(diffs):+.2f} ms), inside the noise (p >= 0.01 on every test), while the "
        f"controls show that differences of {memo_saving:.1f} ms (a memo hit) and more are found at once."
    )
    lines = [
        "# Cross-tenant timing: does a tenant learn what another asked?",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: "
        f"`.venv/bin/python bench/tenant_timing.py {' '.join(argv)}` ({seconds / 60:.1f} min)",
        "",
        f"Machine: {info['cpu']}, nproc {info['nproc']}, python {info['python']}, {info['code']}, load "
        f"average before {info['loadavg_before']} (a shared machine: other work ran meanwhile, as noise "
        "that both conditions share, interleaved).",
        "",
        f"Setup: `icgate serve` with the shipped cache and router settings, keys required, two stand-in "
        f"backends (instant answers, so the gateway's own time is all there is to see), each in its own "
        f"process; one client, one request at a time. {result['n']} questions per set, each asked by a B "
        "once after another tenant had asked it and once when no one had (the design is in the script's "
        f"docstring). Non-200 answers: {result['errors']}.",
        "",
        verdict,
        "",
        "## B's latency, client side (ms)",
        "",
        "| B's question | requests | mean | p50 | p90 | p99 |",
        "|---|---|---|---|---|---|",
        row("asked by another tenant first", asked["by_other"]),
        row("never asked by anyone", asked["never"]),
        "",
        "| test | p-value |",
        "|---|---|",
        f"| Mann-Whitney U, two-sided (pooled) | {main['mwu_p']:.3f} |",
        f"| Kolmogorov-Smirnov (pooled) | {main['ks_p']:.3f} |",
        f"| Wilcoxon signed-rank, per question (paired, {len(diffs)} pairs) | {wilcoxon:.3f} |",
        "",
        f"Routes: asked by another tenant: {routes['by_other']}; never asked: {routes['never']}.",
        "",
        "## Positive controls: what a leak would look like",
        "",
        "| B1's request | requests | mean | p50 | p90 | p99 |",
        "|---|---|---|---|---|---|",
        row("its own question again (exact hit)", result["exact"]["again"]),
        row("a new question", result["exact"]["new"]),
        row("its own question again, temperature 0.7 (memo hit, no cache)", result["memo"]["again"]),
        row("a new question, temperature 0.7", result["memo"]["new"]),
        "",
        f"Exact hit vs new: Mann-Whitney p = {exact['mwu_p']:.2g}. Memo hit vs new: Mann-Whitney p = "
        f"{memo['mwu_p']:.2g}, p50 {memo_saving:+.2f} ms. A shared exact cache or a shared embedding memo "
        "would show up like these in the first table; the cache and the memo are per tenant "
        "(`namespace_for`, the batcher's `scope`).",
        "",
        "## Not measured here",
        "",
        "- A backend's own prefix cache (vLLM's automatic prefix caching, llama.cpp's prompt cache) answers "
        "a prompt it has seen faster whoever sent it; the gateway passes prompts on unchanged, so that "
        "signal reaches tenants through the time to first token. It belongs to the backend's "
        "configuration (one backend per tenant, or prefix caching off) and is not the gateway's to hide.",
        "- Load: a tenant sees that others are busy (queueing, admission) but not what they ask.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=200, help="per set (two sets)")
    parser.add_argument("--controls", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="icgate-timing-") as tmp,
        running_gateway(Path(tmp), ["W", "A1", "B1", "A2", "B2"]) as running,
    ):
        result = measure(running, args.questions, args.controls, args.seed)
    text = report(result, sys.argv[1:] if argv is None else argv, time.monotonic() - started)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
