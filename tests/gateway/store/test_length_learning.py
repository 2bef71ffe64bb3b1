"""Length samples and the per-backend refit against a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

import numpy as np
import sqlalchemy as sa

from icgate.gateway.config import LengthsConfig, RequestLogConfig
from icgate.gateway.store import artifacts, leases
from icgate.gateway.store.length_learning import (
    LEASE,
    LengthLearning,
    RefitReport,
    length_kind,
    refit_backend,
)
from icgate.gateway.store.length_samples import (
    LengthSample,
    LengthSampleWriter,
    counts,
    insert_samples,
    newest_answers,
    prune,
)
from icgate.lengths.predict import EMBEDDING_DIM, ConstantLength, LengthPredictor
from icgate.lengths.training import fit_logged

MIXING = np.random.default_rng(99).normal(size=(8, EMBEDDING_DIM))


def samples(backend: str, n: int, scale: float, seed: int = 0, cap: int | None = None) -> list[LengthSample]:
    """`n` answers of one backend: length grows with one latent direction of the embedding, times `scale`
    (a chattier backend answers the same prompts at a larger scale); above `cap`, cut at the cap."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        latent = rng.normal(size=8)
        vector = latent @ MIXING
        vector = (vector / np.linalg.norm(vector)).astype(np.float32)
        tokens = int(scale * np.exp(5.0 + 0.6 * latent[0] + 0.2 * rng.normal()))
        finish = "stop"
        if cap is not None and tokens >= cap:
            tokens, finish = cap, "length"
        out.append(
            LengthSample(
                backend=backend,
                prompt_text=f"prompt {seed}-{i}",
                prompt_tokens=20,
                embedding=vector.tobytes() if i % 5 else None,
                completion_tokens=tokens,
                finish_reason=finish,
                max_tokens=cap,
            )
        )
    return out


def config(**overrides: object) -> LengthsConfig:
    return LengthsConfig.model_validate({"min_rows": 100, "min_new_rows": 50, "max_rows": 400, **overrides})


def test_the_writer_stores_samples_and_the_refit_reads_them_back(engine: sa.Engine) -> None:
    async def write() -> None:
        writer = LengthSampleWriter(engine, RequestLogConfig(flush_interval_s=0.05))
        await writer.start()
        for sample in samples("a", 30, 1.0, cap=200):
            assert writer.submit(sample)
        writer.submit(
            LengthSample("a", "tool call", 5, None, 12, "tool_calls", None)  # stored, but not a training row
        )
        await writer.close(10.0)

    asyncio.run(write())
    assert [(c.backend, c.rows) for c in counts(engine)] == [("a", 31)]
    answers, newest = newest_answers(engine, "a", 100)
    assert len(answers) == 30 and newest == counts(engine)[0].newest_id
    original = samples("a", 30, 1.0, cap=200)
    assert [a.completion_tokens for a in answers] == [s.completion_tokens for s in original]
    assert [a.truncated for a in answers] == [s.finish_reason == "length" for s in original]
    assert sum(a.embedding is None for a in answers) == 6
    first = np.frombuffer(original[1].embedding or b"", dtype=np.float32)
    assert answers[1].embedding is not None and np.array_equal(answers[1].embedding, first)


def test_prune_keeps_each_backends_newest_rows(engine: sa.Engine) -> None:
    insert_samples(engine, samples("a", 50, 1.0) + samples("b", 10, 1.0))
    assert prune(engine, "a", 20) == 30
    assert prune(engine, "a", 20) == 0
    assert {c.backend: c.rows for c in counts(engine)} == {"a": 20, "b": 10}
    answers, _ = newest_answers(engine, "a", 100)
    assert [a.text for a in answers] == [f"prompt 0-{i}" for i in range(30, 50)]


def test_a_backend_is_refitted_once_it_has_min_rows_and_then_only_with_new_rows(engine: sa.Engine) -> None:
    settings = config()
    insert_samples(engine, samples("a", 80, 1.0))
    assert refit_backend(engine, settings, "a").outcome == "too few answers"
    insert_samples(engine, samples("a", 40, 1.0, seed=1))
    first = refit_backend(engine, settings, "a")
    assert (first.outcome, first.answers) == ("published", 120)
    stored = artifacts.newest(engine, length_kind("a"))
    assert stored is not None and stored.id == first.row
    assert stored.training["backend"] == "a" and stored.training["rows"] == 120
    assert LengthPredictor.from_bytes(stored.artifact).version == first.version
    insert_samples(engine, samples("a", 30, 1.0, seed=2))
    assert refit_backend(engine, settings, "a").outcome == "no new answers"
    insert_samples(engine, samples("a", 400, 1.0, seed=3))
    again = refit_backend(engine, settings, "a")
    assert (again.outcome, again.answers) == ("published", 400)  # the newest max_rows
    assert [(c.backend, c.rows) for c in counts(engine)] == [("a", 400)]  # older ones deleted


def test_each_backend_learns_its_own_lengths(engine: sa.Engine) -> None:
    """Two backends answer the same prompts, one four times as long; each predictor learns its own."""
    insert_samples(engine, samples("terse", 300, 1.0, cap=400) + samples("chatty", 300, 4.0, cap=400))
    for backend in ("terse", "chatty"):
        assert refit_backend(engine, config(), backend).outcome == "published"
    loaded = {}
    for backend in ("terse", "chatty"):
        stored = artifacts.newest(engine, length_kind(backend))
        assert stored is not None
        loaded[backend] = LengthPredictor.from_bytes(stored.artifact)
    probe = np.frombuffer(samples("x", 2, 1.0, seed=9)[1].embedding or b"", dtype=np.float32)
    terse, chatty = (loaded[b].predict(probe, 20, "a new prompt") for b in ("terse", "chatty"))
    assert chatty.p50 > 2.5 * terse.p50


def test_only_the_lease_holder_refits(engine: sa.Engine) -> None:
    insert_samples(engine, samples("a", 150, 1.0))
    swapped: list[str] = []

    async def on_published(backend: str) -> None:
        swapped.append(backend)

    async def both() -> list[bool]:
        one = LengthLearning(engine, config(refit_interval_s=300), ["a"], on_published, holder="one")
        two = LengthLearning(engine, config(refit_interval_s=300), ["a"], on_published, holder="two")
        reports = await asyncio.gather(one.refit(), two.refit())
        return [r.ran for r in reports]

    ran = asyncio.run(both())
    assert sorted(ran) == [False, True]
    assert swapped == ["a"]
    assert len(artifacts.list_models(engine, length_kind("a"))) == 1
    assert leases.holder(engine, LEASE) in {"one", "two"}


def test_long_backend_names_get_a_kind_that_fits_the_column() -> None:
    assert length_kind("small") == "length:small"
    long = "a-very-long-backend-name/with-a-provider-prefix"
    kind = length_kind(long)
    assert len(kind) <= 32 and kind.startswith("length:#") and kind != length_kind(long + "2")


def test_refits_asked_for_at_once_run_one_after_the_other(engine: sa.Engine) -> None:
    insert_samples(engine, samples("a", 150, 1.0))

    async def twice() -> list[RefitReport]:
        learning = LengthLearning(engine, config(refit_interval_s=300), ["a"], holder="one")
        return list(await asyncio.gather(learning.refit_now(), learning.refit_now()))

    first, second = asyncio.run(twice())
    assert first.asked and second.asked and first.ran and second.ran
    # One ran after the other, not beside it: it found the other's predictor and nothing new.
    assert sorted(b.outcome for b in first.backends + second.backends) == ["no new answers", "published"]
    assert len(artifacts.list_models(engine, length_kind("a"))) == 1


def test_a_backends_own_predictor_is_published_only_if_it_beats_the_shared_one(engine: sa.Engine) -> None:
    """The shared predictor here was fitted on 2,000 answers like the backend's: a predictor fitted on the
    backend's 150 misses them by more out of fold, so it is not published and the shared one keeps
    sizing the backend. Against a shared predictor that says 1,000 tokens for everything, it is."""
    insert_samples(engine, samples("plenty", 2000, 1.0, seed=7))
    shared = fit_logged(newest_answers(engine, "plenty", 2000)[0])
    insert_samples(engine, samples("a", 150, 1.0))
    kept = refit_backend(engine, config(), "a", shared)
    assert kept.outcome == "not better than shared"
    assert kept.own_mae is not None and kept.shared_mae is not None and kept.own_mae >= kept.shared_mae
    assert artifacts.newest(engine, length_kind("a")) is None
    insert_samples(engine, samples("a", 300, 1.0, seed=4))
    assert refit_backend(engine, config(), "a", shared).outcome == "not better than shared"
    assert {c.backend: c.rows for c in counts(engine)}["a"] == 400  # pruned to max_rows all the same
    beaten = refit_backend(engine, config(), "a", ConstantLength(1000, 2000))
    assert beaten.outcome == "published"
    assert beaten.own_mae is not None and beaten.shared_mae is not None
    assert beaten.own_mae < 100 < 800 < beaten.shared_mae  # answers of about 150 tokens
    stored = artifacts.newest(engine, length_kind("a"))
    assert stored is not None
    assert stored.training["oof_mae_tokens"] == beaten.own_mae
    assert stored.training["shared_mae_tokens"] == beaten.shared_mae
