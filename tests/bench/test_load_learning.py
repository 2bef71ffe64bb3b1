"""bench/load.py's (a+): the readiness check on the gateway's own model table and log, the window's answers
sized by each backend's predictor in force, the policies, and the learning replay stopping once ready."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import pytest
import sqlalchemy as sa

from bench import content_trace as ct
from bench import load
from bench.simulator import EngineConfig, Simulator, running_simulator
from icgate.gateway.store import artifacts
from icgate.gateway.store.artifacts import ModelWatcher
from icgate.gateway.store.length_learning import length_kind
from icgate.gateway.store.length_samples import LengthSample, insert_samples
from icgate.lengths.predict import ConstantLength
from tests.bench.test_load import setup as sized_setup

FAST = EngineConfig(
    max_num_seqs=16,
    kv_cache_tokens=20_000,
    prefill_ms_per_token=0.001,
    prefill_ms_base=0.5,
    decode_ms_base=1.0,
    decode_ms_per_seq=0.1,
    default_max_tokens=3,
)


def args(*argv: str) -> argparse.Namespace:
    return load.build_parser().parse_args(list(argv))


def publish(engine: sa.Engine, backend: str, version: str, rows: int) -> int:
    training = {"rows": rows, "answers": rows, "with_embedding": rows - 1, "backend": backend}
    return artifacts.publish(engine, length_kind(backend), version, b"not loaded here", training, {})


def watcher_log(version: str) -> str:
    return (
        f"2026-11-28 06:00:00 INFO icgate.models: {length_kind('small')} model {version} in force (row 1)\n"
    )


# --------------------------------------------------------------------------- readiness


async def test_the_check_reads_the_line_the_gateways_own_watcher_logs(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    publish(engine, "small", "v-small-1", 320)
    swapped: list[Any] = []
    watcher = ModelWatcher(
        engine, length_kind("small"), lambda blob: blob, lambda m, s: swapped.append(s), 60
    )
    with caplog.at_level(logging.INFO, logger="icgate.models"):
        assert await watcher.check()
    assert swapped and load.swapped_in(caplog.text, "small", "v-small-1")
    assert not load.swapped_in(caplog.text, "small", "v-small-2")
    assert not load.swapped_in(caplog.text, "large", "v-small-1")


def test_backends_are_ready_only_once_each_is_published_on_enough_answers_and_swapped_in(
    engine: sa.Engine, tmp_path: Any
) -> None:
    log = tmp_path / "icgate.log"
    log.write_text("")
    backends = ["small", "large"]
    assert load.lengths_in_force(engine, log, backends, 300) is None  # nothing published
    publish(engine, "small", "s1", 310)
    log.write_text(watcher_log("s1"))
    assert load.lengths_in_force(engine, log, backends, 300) is None  # large has none yet
    publish(engine, "large", "l1", 120)
    log.write_text(watcher_log("s1") + watcher_log("l1").replace("length:small", "length:large"))
    assert load.lengths_in_force(engine, log, backends, 300) is None  # large's is below min_rows
    publish(engine, "large", "l2", 305)
    assert load.lengths_in_force(engine, log, backends, 300) is None  # published, not yet swapped in
    with log.open("a") as f:
        f.write(watcher_log("l2").replace("length:small", "length:large"))
    ready = load.lengths_in_force(engine, log, backends, 300)
    assert ready is not None
    assert {b: (p.version, p.rows, p.with_embedding) for b, p in ready.items()} == {
        "small": ("s1", 310, 309),
        "large": ("l2", 305, 304),
    }
    assert load.length_artifacts(engine) == {"length:small": 1, "length:large": 2}
    assert load.cache_entries(engine) == 0


# --------------------------------------------------------------------------- the window's answers


def sample(backend: str, text: str, tokens: int, finish: str | None = "stop", cap: int | None = None) -> Any:
    return LengthSample(backend, text, 12, None, tokens, finish, cap)


def test_the_window_is_the_samples_after_the_mark_each_sized_by_its_backends_predictor(
    engine: sa.Engine,
) -> None:
    insert_samples(engine, [sample("small", "learning prompt", 999)])
    mark = load.settle_samples(engine, 0, 1)
    assert mark == load.samples_after(engine, 0)[1]
    insert_samples(
        engine,
        [
            sample("small", "how many apples", 40),
            sample("small", "how many pears", 60),
            sample("large", "write an essay", 100, "length", cap=100),  # cut at max_tokens 100
            sample("large", "a tool call", 7, "tool_calls"),  # says nothing about length
        ],
    )
    assert load.settle_samples(engine, mark, 4) == load.samples_after(engine, 0)[1]
    own = {"small": ConstantLength(50, 100)}
    shipped = ConstantLength(300, 600)
    sized = load.sized_answers(engine, mark, own, shipped)
    assert [(a.backend, a.answered, a.in_force, a.shipped) for a in sized] == [
        ("small", 40, 50, 300),
        ("small", 60, 50, 300),
        ("large", 100, 100, 100),  # no predictor of its own: the shipped one, capped at max_tokens
    ]
    scores = load.score_sizes(sized)
    assert scores["small"]["mae"] == 10 and scores["small"]["shipped_mae"] == 250
    assert scores["small"]["under"] == 0.5 and scores["small"]["answers"] == 2
    assert scores["large"]["mae"] == 0
    assert scores["all"]["answers"] == 3 and scores["all"]["mae"] == pytest.approx(20 / 3)


def test_headers_and_recomputed_predictions_pair_up_one_for_one() -> None:
    assert load.multiset_agreement([1, 2, 2, 3], [2, 3, 2, 1]) == 1.0
    assert load.multiset_agreement([1, 2, 2, 3], [2, 3, 9, 1]) == 0.75
    assert load.multiset_agreement([], []) is None


# --------------------------------------------------------------------------- policies


def tiny_setup() -> tuple[load.TraceSetup, dict[load.Tier, load.Sim]]:
    item = ct.Item("gsm8k", "1", "m", (("user", "How many apples?"),), 9, 17)
    return sized_setup([load.TraceRow(0.0, 9, 17, item=item), load.TraceRow(0.1, 30, 5, rid="x01")])


def test_only_a_plus_refits_and_it_fits_each_backend_once() -> None:
    s, sims = tiny_setup()
    a = args("--learn-refit-s", "7")
    policies = {
        key: load.icgate_policy(
            s, sims, system.admission, a, system.lengths, load.refit_of(system), system.shed
        )
        for key, system in load.SYSTEMS.items()
        if system.kind == "icgate"
    }
    for key, policy in policies.items():
        assert load.policy_problem(policy) is None, key
    learner = policies["icgate-learn"]
    assert learner["lengths"] == {"refit_interval_s": 7.0, "min_new_rows": load.FIT_ONCE}
    assert "min_rows" not in learner["lengths"]  # the gateway's own threshold (300) stands
    assert learner["cache"] == policies["icgate"]["cache"]
    assert learner["cache"]["store"] is False and learner["cache"]["exact"] is False
    for key in ("icgate", "icgate-constant", "icgate-oracle", "icgate-off"):
        assert policies[key]["lengths"]["refit_interval_s"] == load.NO_REFIT_S, key
    assert policies["icgate-constant"]["lengths"]["predictor"] == "constant"
    assert load.SYSTEMS["icgate-learn"].learn and not load.SYSTEMS["icgate"].learn
    # The learning half goes through every admission before its window: (a+) learns, the others warm up.
    before = {key for key, system in load.SYSTEMS.items() if load.has_phase(system, a)}
    assert before == {
        "icgate",
        "icgate-learn",
        "icgate-constant",
        "icgate-oracle",
        "icgate-learn-shed",
        "icgate-oracle-shed",
    }
    cold = args("--warm-requests", "0")
    learning = {key for key, system in load.SYSTEMS.items() if load.has_phase(system, cold)}
    assert learning == {"icgate-learn", "icgate-learn-shed"}
    # (a+s) and (a*s) are (a+) and (a*) with the longest shed first under load, and only they shed: the
    # others turn off what is the gateway's default.
    shedding = {key for key, p in policies.items() if p["admission"]["shed_long_quantile"] is not None}
    assert shedding == {"icgate-learn-shed", "icgate-oracle-shed"}
    for key, twin in (("icgate-learn-shed", "icgate-learn"), ("icgate-oracle-shed", "icgate-oracle")):
        shed = dict(policies[key]["admission"])
        assert shed.pop("shed_long_quantile") == load.SHED_QUANTILE
        assert {**policies[key], "admission": {**shed, "shed_long_quantile": None}} == policies[twin]


# --------------------------------------------------------------------------- the learning replay


def test_the_learning_replay_stops_sending_once_ready_and_lets_answers_finish() -> None:
    rows = [load.TraceRow(0.0, 9, 3 + i, item=ct.Item("gsm8k", str(i), "m", (("user", f"q{i}"),), 9, 3 + i))
            for i in range(4)]  # fmt: skip
    book = load.length_book([load.Trace("t", rows, 0)])

    def ready(sent: Sequence[load.Outcome]) -> bool:
        return sum(1 for o in sent if o.completed) >= 6

    with running_simulator(Simulator(FAST, model_name="sim", lengths=book)) as url:
        endpoint = load.Endpoint(url + "/v1/chat/completions", "sim")
        replay = load.learning_replay(endpoint, rows, 50.0, load.NO_MAX_TOKENS, ready, 60.0, poll_s=0.05)
        outcomes, ready_s, _ = asyncio.run(replay)
        # The others' warm phase: a number of requests, never "ready".
        warm = load.learning_replay(endpoint, rows, 50.0, load.NO_MAX_TOKENS, lambda _: False, 60.0,
                                    grace_s=0.0, limit=5)  # fmt: skip
        warmed, never, _ = asyncio.run(warm)
    assert never is None and len(warmed) == 5 and all(o.completed for o in warmed)
    assert ready_s is not None
    assert all(o.completed for o in outcomes)  # nothing cut off: every answer in flight finished
    assert 6 <= len(outcomes) < 50 * 60  # it stopped because it was ready, not at max_s
    assert [o.completion_tokens for o in outcomes[:4]] == [3, 4, 5, 6]  # the rows in order, true lengths
    assert outcomes[4].messages == rows[0].messages()  # then round again


def test_a_window_that_replays_learning_traffic_is_refused() -> None:
    item = ct.Item("gsm8k", "1", "m", (("user", "How many apples?"),), 9, 17)
    learning = load.Trace("t", [load.TraceRow(0.0, 9, 17, item=item)], 0, "learn")
    other = load.TraceRow(0.0, 9, 5, rid="x01")
    load.check_learning_apart(learning, [load.Arrival(0, 0.0, 9, 5, other)])
    with pytest.raises(ValueError, match="learning traffic"):
        load.check_learning_apart(learning, [load.Arrival(3, 0.0, 9, 17, learning.rows[0])])


# --------------------------------------------------------------------------- the report


def result(system: str, good: int, **extra: Any) -> load.RunResult:
    def done(i: int) -> load.Outcome:
        return load.Outcome(i, 9, None, sent=0.0, first_token=0.1, ended=0.2, status=200, completion_tokens=5,
                            done=True, output_tokens=5)  # fmt: skip

    summary = load.summarize([done(i) for i in range(good)], load.CONTENT, 1.5, system, 10.0, 20, args())
    return load.RunResult(**summary, cpu={}, admission={}, startup_s=1.0, drain_s=0.0, wall_s=1.0,
                          client="none", **extra)  # fmt: skip


def test_the_report_shows_both_learned_systems_their_gap_closed_and_what_a_plus_learned(
    tmp_path: Any,
) -> None:
    s, _ = tiny_setup()
    rows = [load.TraceRow(i, 9, 17, item=ct.Item("gsm8k", str(i), "m", (("user", f"q{i}"),), 9, 17 + i))
            for i in range(3)]  # fmt: skip
    s.trace = load.Trace(load.CONTENT, rows[:2], 0)
    s.learning = load.Trace(load.CONTENT, rows[2:], 0, "learn")
    sizes = {"answers": 9, "mean_answered": 100.0, "mean_predicted": 110.0, "mae": 31.0, "tau": 0.41,
             "under": 0.4, "shipped_mae": 180.0, "shipped_tau": -0.1}  # fmt: skip
    phase = load.LearningPhase(rate_rps=9.5, sent=900, completed=880, refused=20, conversations=512,
                               answers={"small": 580, "large": 300}, sending_s=95.0, ready_s=97.0,
                               drain_s=4.0, cache_entries=0,
                               published={"small": {"rows": 402, "with_embedding": 402, "truncated": 3,
                                                    "version": "v-s"},
                                          "large": {"rows": 301, "with_embedding": 300, "truncated": 3,
                                                    "version": "v-l"}})  # fmt: skip
    results = [
        result("icgate", 120, per_backend={"small": sizes}, length_models={"small": "shipped v1"}),
        result(
            "icgate-learn",
            130,
            per_backend={"small": sizes},
            length_models={"small": "own v-s"},
            learning=asdict(phase),
            refits_in_window=0,
            cache_entries=0,
        ),
        result("icgate-constant", 100),
        result("icgate-oracle", 140),
        result("litellm-shuffle", 50),
    ]
    meta = {"date": "d", "took_s": 60.0, "load_start": "0", "load_end": "0", "commit": "c", "command": "x",
            "work": "/tmp/w"}  # fmt: skip
    out = tmp_path / "load.md"
    load.write_report(out, results, {load.CONTENT: s}, meta, args("--duration-s", "0.1"))
    text = out.read_text()
    section = text.split("## Target")[1].split("\n## ")[0]
    target = [line for line in section.splitlines() if line.startswith(f"| {load.CONTENT} | none | 1.5x |")]
    assert len(target) == 2
    assert "| 50% |" in target[0] and "| 75% |" in target[1]  # (12-10)/(14-10) and (13-10)/(14-10)
    assert "**2.40x**" in target[0] and "**2.60x**" in target[1]  # against LiteLLM's 5 req/s
    assert "900 / 880 / 20" in text and "small 402 (402, 3) v-s" in text
    assert "| own v-s | 9 |" in text and "| shipped v1 | 9 |" in text and "180 / -0.10" in text
    assert "1 in the learning half, 2 in the measured half" in text
