"""The content trace through icgate's admission on a virtual clock: seconds, not the load benchmark's hour.

`bench/load.py --traces content` takes 75 minutes and gives one 60 s window per cell on a noisy machine.
This replays the same requests (the measured half of bench/content_trace.py's conversations at the conv
trace's arrival times, scaled to a load) through the real `Admission` against two continuous-batching
engines costed like the simulator's `small` and `large` presets, on the virtual clock of
tests/gateway/backends/replay.py. Nothing sleeps; the same numbers come out on every run. It shows
mechanisms and directions, not the benchmark's numbers: it has no HTTP, no CPU contention, no /metrics
polling, and its engine answers on a clean schedule.

Sizes, as in the benchmark's systems: `constant` (every request 150 tokens, p90 300: (a0)), `oracle` (the
true length: (a*)) and `learned` (each tier's own predictor, fitted like the gateway's refit,
`lengths.training.fit_logged`, on the first answers of the learning half the rule sends that tier, from
the prompts' embeddings by the gateway's own embedder: (a+)). Each runs with and without
`admission.shed_long_quantile`.

    .venv/bin/python bench/admission_replay.py   # -> bench/results/admission_replay.md (about 1 min)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import content_trace  # noqa: E402
from bench import load as bench_load  # noqa: E402
from bench.simulator.lengths import prompt_key  # noqa: E402
from icgate.gateway.backends.admission import Admission, AdmissionRefused, Ask  # noqa: E402
from icgate.gateway.config import AdmissionConfig, BackendConfig  # noqa: E402
from tests.gateway.backends.replay import Engine, EngineCost, late_share, on_virtual_clock  # noqa: E402

# The setup bench/results/load.md measured for `content` (capacity, the rule's threshold, the plans).
KV_TOKENS = 49_152
CAPACITY_RPS = 11.69
THRESHOLD = 71
MAX_CONCURRENT = 32
COSTS = {"small": EngineCost(8.0, 0.5, 2.0, 0.02, 32), "large": EngineCost(20.0, 1.5, 5.0, 0.08, 32)}
PRIORS_MS = {"small": (27, 25), "large": (86, 71)}  # expected_ttft_ms, expected_tpot_ms
CONSTANT = (150, 300)  # (a0): the mix's mean answer; p90 at lengths.constant_p90_factor 2
TTFT_SLO_S, TPOT_SLO_S, TTFT_MARGIN = 1.5, 0.1, 0.1
WINDOW_S = 60.0
WARM = 500  # requests of the learning half before the window, at 0.9x capacity, as the benchmark's
LEARN_ROWS = 360  # answers per tier each own predictor is fitted on (the benchmark's (a+): ~300-370)
TIERS = ("small", "large")


@dataclass(frozen=True)
class Request:
    at_s: float
    prompt_tokens: int
    output_tokens: int
    tier: str  # what the rule sends it to
    sizes: Mapping[str, tuple[int, int]]  # backend -> (p50, p90) admission is told


def tier_of(row: bench_load.TraceRow) -> str:
    return bench_load.rule_tier(row.routing_tokens, THRESHOLD)


def learned_sizes(
    learn: Sequence[bench_load.TraceRow], rows: Sequence[bench_load.TraceRow]
) -> dict[str, Any]:
    """Each tier's own predictor, fitted on its first LEARN_ROWS learning answers, sizing every row."""
    from icgate.cache.calibrate import default_encoder
    from icgate.lengths.predict import feature_window
    from icgate.lengths.training import LoggedAnswer, fit_logged
    from icgate.text import estimate_prompt_tokens, last_user_text

    encode = default_encoder(None, REPO / "data" / "models", "onnx-int8")
    views: dict[str, tuple[str, int]] = {}
    for row in [*learn, *rows]:
        messages = row.messages()
        views.setdefault(
            prompt_key(messages),
            (last_user_text(messages), estimate_prompt_tokens({"messages": messages}, "chat")),
        )
    keys = list(views)
    vectors = dict(zip(keys, np.asarray(encode([views[k][0] for k in keys]), dtype=np.float32), strict=True))
    out: dict[str, Any] = {}
    for tier in TIERS:
        mine = [r for r in learn if tier_of(r) == tier][:LEARN_ROWS]
        answers = []
        for r in mine:
            text, tokens = views[prompt_key(r.messages())]
            answers.append(
                LoggedAnswer(
                    feature_window(text), tokens, r.output_tokens, False, vectors[prompt_key(r.messages())]
                )
            )
        out[tier] = fit_logged(answers)
    sizes = {}
    for key, (text, tokens) in views.items():
        estimates = {t: out[t].predict(vectors[key], tokens, feature_window(text)) for t in TIERS}
        sizes[key] = {t: (e.p50, e.p90) for t, e in estimates.items()}
    return {"sizes": sizes, "predictors": out}


def requests(
    rows: Sequence[tuple[float, bench_load.TraceRow]], sizing: str, learned: Mapping[str, Any]
) -> list[Request]:
    out = []
    for at, row in rows:
        true = row.output_tokens
        if sizing == "oracle":
            sizes = dict.fromkeys(TIERS, (true, true))
        elif sizing == "constant":
            sizes = dict.fromkeys(TIERS, CONSTANT)
        else:
            sizes = learned[prompt_key(row.messages())]
        out.append(Request(at, row.prompt_tokens, true, tier_of(row), sizes))
    return out


@dataclass(frozen=True)
class Outcome:
    status: str  # served | arrival | queued
    ttft_s: float | None = None
    tpot_s: float | None = None
    output_tokens: int = 0


def replay(window: Sequence[Request], warm: Sequence[Request], admission: Mapping[str, Any]) -> list[Outcome]:
    """The warm requests, 30 s of quiet, then the window: each through `decide` (its tier, the other one
    as spill) and `hold`, then the engine, which streams a token a step."""

    async def main() -> list[Outcome]:
        loop = asyncio.get_running_loop()
        config = AdmissionConfig.model_validate(
            {
                "ttft_slo_ms": TTFT_SLO_S * 1000,
                "tpot_slo_ms": TPOT_SLO_S * 1000,
                "ttft_margin": TTFT_MARGIN,
                **admission,
            }
        )
        backends = {
            t: BackendConfig.model_validate(
                {
                    "name": t,
                    "tier": t,
                    "model": f"openai/{t}",
                    "max_concurrent": MAX_CONCURRENT,
                    "expected_ttft_ms": PRIORS_MS[t][0],
                    "expected_tpot_ms": PRIORS_MS[t][1],
                }
            )
            for t in TIERS
        }
        adm = Admission(list(backends.values()), config, clock=loop.time, signals_clock=loop.time)
        engines = {t: Engine(COSTS[t]) for t in TIERS}
        running = [loop.create_task(e.run()) for e in engines.values()]

        async def one(r: Request, start: float) -> Outcome:
            await asyncio.sleep(max(0.0, start + r.at_s - loop.time()))
            sent = loop.time()
            ask = Ask(
                r.prompt_tokens,
                r.sizes[r.tier][0],
                ttft_slo_s=TTFT_SLO_S,
                tpot_slo_s=TPOT_SLO_S,
                arrived=sent,
                output_tokens_p90=r.sizes[r.tier][1],
                outputs_by_backend=dict(r.sizes),
            )
            other = next(t for t in TIERS if t != r.tier)
            try:
                placed = adm.decide(ask, [backends[r.tier]], [backends[other]])
                async with adm.hold(placed.backend, ask) as job:
                    first = await engines[placed.backend.name].serve(job, r.prompt_tokens, r.output_tokens)
            except AdmissionRefused as refused:
                return Outcome(refused.stage)
            tpot = (loop.time() - first) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
            return Outcome("served", first - sent, tpot, r.output_tokens)

        try:
            await asyncio.gather(*(one(r, loop.time()) for r in warm))
            await asyncio.sleep(30.0)
            return list(await asyncio.gather(*(one(r, loop.time()) for r in window)))
        finally:
            for task in running:
                task.cancel()

    return on_virtual_clock(main)


@dataclass(frozen=True)
class Summary:
    goodput_rps: float
    refused_arrival: int
    refused_queued: int
    good_mean_output: float  # the mean answer length of the good requests

    @property
    def late_share(self) -> float | None:
        return late_share(self.refused_arrival, self.refused_queued)


def summarise(outcomes: Sequence[Outcome]) -> Summary:
    good = [
        o
        for o in outcomes
        if o.status == "served" and (o.ttft_s or 0) <= TTFT_SLO_S and (o.tpot_s or 0) <= TPOT_SLO_S
    ]
    return Summary(
        len(good) / WINDOW_S,
        sum(o.status == "arrival" for o in outcomes),
        sum(o.status == "queued" for o in outcomes),
        statistics.fmean(o.output_tokens for o in good) if good else 0.0,
    )


def gap_closed(learned: float, constant: float, oracle: float) -> float | None:
    return bench_load.gap_closed(learned, constant, oracle)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", default="1,1.5,2")
    p.add_argument("--shed", type=float, default=0.75, help="the shed_long_quantile of the shedding rows")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "admission_replay.md")
    args = p.parse_args(argv)
    pool = content_trace.load_pool()
    measured = bench_load.load_trace(bench_load.CONTENT, KV_TOKENS, pool=pool)
    learn = bench_load.load_trace(bench_load.CONTENT, KV_TOKENS, pool=pool, half="learn")
    loads = [float(x) for x in args.loads.split(",")]
    widest = bench_load.schedule(measured, max(loads) * CAPACITY_RPS, WINDOW_S)
    warm_rows = [(i / (0.9 * CAPACITY_RPS), r) for i, r in enumerate(learn.rows[:WARM])]
    fitted = learned_sizes(
        learn.rows, [a.row for a in widest if a.row is not None] + [r for _, r in warm_rows]
    )
    lines = [
        "# Admission on the content trace, on a virtual clock",
        "",
        f"- command: `.venv/bin/python bench/admission_replay.py --loads {args.loads} --shed {args.shed:g}`",
        "- what it is: bench/admission_replay.py's docstring; the setup (capacity "
        f"{CAPACITY_RPS} req/s, rule threshold {THRESHOLD}, max_concurrent {MAX_CONCURRENT}, priors) is the "
        "one bench/results/load.md measured for `content`",
        "- learned: each tier's own predictor on "
        + ", ".join(
            f"{t} ({p.summary.get('answers')} answers, out-of-fold MAE "
            f"{p.summary.get('oof_mae_tokens', 0):.0f} tokens, tau {p.summary.get('oof_kendall_tau', 0):.2f})"
            for t, p in fitted["predictors"].items()
        ),
        f"- objectives: TTFT {TTFT_SLO_S * 1000:.0f} ms (margin {TTFT_MARGIN:.0%}), TPOT "
        f"{TPOT_SLO_S * 1000:.0f} ms; window {WINDOW_S:.0f} s after {WARM} warm requests",
        "",
        "| load | shed_long_quantile | sizes | goodput req/s | 429 at arrival | 429 after queueing "
        "| late share | mean answer of the good | gap closed by learned |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for load in loads:
        window_rows = [
            (a.due_s, a.row)
            for a in bench_load.schedule(measured, load * CAPACITY_RPS, WINDOW_S)
            if a.row is not None
        ]
        for shed in (None, args.shed):
            policy = {"shed_long_quantile": shed}
            got = {}
            for sizing in ("constant", "oracle", "learned"):
                window = requests(window_rows, sizing, fitted["sizes"])
                warm = requests(warm_rows, sizing, fitted["sizes"])
                got[sizing] = summarise(replay(window, warm, policy))
            closed = gap_closed(
                got["learned"].goodput_rps, got["constant"].goodput_rps, got["oracle"].goodput_rps
            )
            for sizing, s in got.items():
                late = "-" if s.late_share is None else f"{s.late_share:.1%}"
                gap = ("-" if closed is None else f"{closed:.0%}") if sizing == "learned" else ""
                lines.append(
                    f"| {load:g}x | {'off' if shed is None else f'{shed:g}'} | {sizing} | "
                    f"**{s.goodput_rps:.2f}** | {s.refused_arrival} | {s.refused_queued} | {late} | "
                    f"{s.good_mean_output:.0f} | {gap} |"
                )
            print(lines[-3:], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
