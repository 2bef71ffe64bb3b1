"""The output-length predictor: loader, fitting, quantiles, persistence and the heuristic fallback."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import kendalltau

from routers.length import (
    DEFAULT_ARTIFACT,
    EMBEDDING_DIM,
    FEATURE_NAMES,
    LengthEstimate,
    LengthPredictor,
    LengthRecord,
    LengthRow,
    PromptLengthHeuristic,
    evaluate_length,
    length_bucket,
    load_length_model,
    load_length_rows,
    prompt_features,
    refit_from_records,
    requested_tokens,
    split_rows,
    train_arena,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "length" / "arena_hard_lengths.jsonl"


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, EMBEDDING_DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, list[int], list[str], list[int]]:
    """Length grows with one latent coordinate of embeddings that live, like sentence embeddings, near a
    low-dimensional subspace (16 latent dimensions mapped into 384), plus noise."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(16, EMBEDDING_DIM))
    latent = rng.normal(size=(n, 16))
    emb = latent @ mixing + 0.3 * rng.normal(size=(n, EMBEDDING_DIM))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    tokens = np.exp(5.5 + 0.8 * latent[:, 0] + 0.15 * rng.normal(size=n)).round().astype(int)
    texts = [f"question number {i}" for i in range(n)]
    return emb, [20] * n, texts, tokens.tolist()


@pytest.fixture(scope="module")
def fitted() -> LengthPredictor:
    emb, pt, texts, tokens = _synthetic(300, seed=1)
    return LengthPredictor.fit(emb, pt, texts, tokens)


def _write(tmp_path: Path, lines: list[Any], name: str = "lengths.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8"
    )
    return path


def _arena_line(qid: str, prompt: str, **tokens: int) -> dict[str, Any]:
    return {
        "question_id": qid,
        "category": "arena-hard-v0.1",
        "cluster": "c",
        "prompt": prompt,
        "answers": {m.replace("_", "-"): {"text": "x", "tokens": t} for m, t in tokens.items()},
    }


# --- loader -------------------------------------------------------------------------------------------


def test_loader_reads_the_arena_layout(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            _arena_line("q1", "Write a poem", gpt_4_0314=120, gpt_4_0613=90),
            "",
            _arena_line("q2", "What is 2+2?", gpt_4_0314=5, gpt_4_0613=7),
        ],
    )
    rows = load_length_rows(path, "gpt-4-0314")
    assert [(r.question_id, r.prompt, r.tokens) for r in rows] == [
        ("q1", "Write a poem", 120),
        ("q2", "What is 2+2?", 5),
    ]
    assert [r.tokens for r in load_length_rows(path, "gpt-4-0613")] == [90, 7]
    assert rows[0].embedding is None
    assert rows[0].estimated_prompt_tokens == max(1, len("Write a poem") // 4)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"question_id": "q", "answers": {}}, "'prompt' must be a non-empty string"),
        ({"question_id": "q", "prompt": "p", "answers": []}, "'answers' must be an object"),
        (_arena_line("q", "p", gpt_4_0314=-3), "tokens must be a non-negative integer"),
        ({"question_id": "q", "prompt": "p", "answers": {"gpt-4-0314": {"text": "t"}}}, "tokens must be"),
    ],
)
def test_loader_names_file_and_line_of_bad_input(tmp_path: Path, line: Any, message: str) -> None:
    path = _write(tmp_path, [_arena_line("ok", "fine", gpt_4_0314=10), line])
    with pytest.raises(ValueError, match=message) as caught:
        load_length_rows(path, "gpt-4-0314")
    assert f"{path}:2" in str(caught.value)


def test_loader_lists_models_when_the_model_is_absent(tmp_path: Path) -> None:
    path = _write(tmp_path, [_arena_line("q1", "p", gpt_4_0613=10, gpt_3_5=3)])
    with pytest.raises(ValueError, match="no answers of model 'gpt-4-0314'") as caught:
        load_length_rows(path, "gpt-4-0314")
    assert "gpt-3-5" in str(caught.value) and "gpt-4-0613" in str(caught.value)


def test_loader_rejects_a_row_missing_the_model_with_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, [_arena_line("q1", "p", gpt_4_0314=10), _arena_line("q2", "p", gpt_4_0613=3)])
    with pytest.raises(ValueError, match=r":2: no answer of model 'gpt-4-0314'"):
        load_length_rows(path, "gpt-4-0314")


def test_loader_rejects_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no rows"):
        load_length_rows(path)


def test_split_is_by_question_id_not_order() -> None:
    rows = [LengthRow(f"q{i}", f"prompt {i}", i) for i in range(200)]
    train, held = split_rows(rows)
    assert len(train) + len(held) == 200 and 20 <= len(held) <= 60
    _, again_held = split_rows(list(reversed(rows)))
    assert {r.question_id for r in held} == {r.question_id for r in again_held}
    assert all(length_bucket(r) >= 8 for r in held)
    # Without an id the prompt decides.
    assert length_bucket(LengthRow("", "same text", 1)) == length_bucket(LengthRow("", "same text", 99))


@pytest.mark.skipif(
    not DATA.is_file(), reason=f"evaluation data not found: {DATA} (shared data folder absent)"
)
def test_real_arena_file_loads_and_splits() -> None:
    rows = load_length_rows(DATA, "gpt-4-0314")
    assert len(rows) == 250
    assert all(r.tokens > 0 and r.prompt for r in rows)
    train, held = split_rows(rows)
    assert (len(train), len(held)) == (209, 41)
    with pytest.raises(ValueError, match=r"gpt-3\.5-turbo-0125"):
        load_length_rows(DATA, "no-such-model")


# --- features and the explicit-length rule -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Summarise this in 100 words.", 135.0),
        ("Write a 300-word essay on tides", 405.0),
        ("Keep your responses in range of 30 to 50 tokens", 50.0),
        ("Answer in 3 sentences", 75.0),
        ("The vocabulary is made up of 20,000 words", None),
        ("Explain monads", None),
        ("", None),
        (None, None),
    ],
)
def test_requested_tokens(text: str | None, tokens: float | None) -> None:
    assert (
        requested_tokens(text) == pytest.approx(tokens)
        if tokens is not None
        else requested_tokens(text) is None
    )


def test_prompt_features_shape_and_cues() -> None:
    code_ask = dict(
        zip(FEATURE_NAMES, prompt_features(12, "Write a Python function that parses dates."), strict=True)
    )
    assert code_ask["write"] == 1.0 and code_ask["asks_code"] == 1.0 and code_ask["questions"] == 0.0
    question = dict(zip(FEATURE_NAMES, prompt_features(5, "How many coins? And why?"), strict=True))
    assert question["questions"] == 2.0 and question["math"] == 1.0 and question["write"] == 0.0
    bare = prompt_features(7, None)
    assert (
        bare.shape == (len(FEATURE_NAMES),) and bare[0] == pytest.approx(np.log1p(7)) and not bare[1:].any()
    )


# --- the learned predictor -----------------------------------------------------------------------------


def test_fitted_predictor_recovers_the_ordering(fitted: LengthPredictor) -> None:
    emb, pt, texts, tokens = _synthetic(200, seed=2)
    estimates = fitted.predict_batch(emb, pt, texts)
    tau = kendalltau([e.p50 for e in estimates], tokens).statistic
    assert tau > 0.6
    # Calibrated: roughly 90% of fresh true lengths under p90, the median near the truth's.
    coverage = np.mean([t <= e.p90 for t, e in zip(tokens, estimates, strict=True)])
    assert 0.75 <= coverage <= 0.99
    assert 0.5 < np.median([e.p50 for e in estimates]) / np.median(tokens) < 2.0


def test_single_and_batch_predictions_agree(fitted: LengthPredictor) -> None:
    emb, pt, texts, _ = _synthetic(20, seed=3)
    batch = fitted.predict_batch(emb, pt, texts)
    assert batch == [fitted.predict(e, p, t) for e, p, t in zip(emb, pt, texts, strict=True)]
    assert fitted.predict_batch(np.zeros((0, EMBEDDING_DIM)), [], []) == []


def test_p90_never_below_p50(fitted: LengthPredictor) -> None:
    rng = np.random.default_rng(4)
    texts = [
        None,
        "",
        "hi",
        "Write a 2000-word essay",
        "Answer in 1 word",
        "x" * 10_000,
        "Translate: bonjour",
    ]
    for model in (fitted, PromptLengthHeuristic()):
        for text in texts:
            for tokens in (0, 1, 50, 100_000):
                for emb in (None, _unit(rng, 1)[0]):
                    estimate = model.predict(emb, tokens, text)
                    assert isinstance(estimate, LengthEstimate)
                    assert 1 <= estimate.p50 <= estimate.p90


def test_missing_embedding_still_predicts(fitted: LengthPredictor) -> None:
    estimate = fitted.predict(None, 40, "Explain quantum computing")
    assert estimate.p50 >= 1
    with pytest.raises(ValueError, match="dimension 384"):
        fitted.predict(np.zeros(10), 40, "x")


def test_explicit_length_request_overrides_the_model(fitted: LengthPredictor) -> None:
    emb = _synthetic(1, seed=5)[0][0]
    assert fitted.predict(emb, 10, "Describe Paris in 200 words") == LengthEstimate(270, 405)


def test_fit_rejects_too_little_or_mismatched_data() -> None:
    emb, pt, texts, tokens = _synthetic(10, seed=6)
    with pytest.raises(ValueError, match="at least"):
        LengthPredictor.fit(emb, pt, texts, tokens)
    emb, pt, texts, tokens = _synthetic(40, seed=6)
    with pytest.raises(ValueError, match="shape"):
        LengthPredictor.fit(emb[:, :100], pt, texts, tokens)


def test_round_trip_gives_identical_predictions(fitted: LengthPredictor, tmp_path: Path) -> None:
    fitted.metrics = {"held_out": {"kendall_tau": 0.5}}
    emb, pt, texts, _ = _synthetic(30, seed=7)
    expected = fitted.predict_batch(emb, pt, texts)
    from_bytes = LengthPredictor.from_bytes(fitted.to_bytes())
    saved = LengthPredictor.load(fitted.save(tmp_path / "sub" / "length.joblib"))
    for loaded in (from_bytes, saved):
        assert loaded.predict_batch(emb, pt, texts) == expected
        assert loaded.version == fitted.version
        assert loaded.summary == fitted.summary and loaded.metrics == fitted.metrics
    assert (tmp_path / "sub" / "length.joblib").stat().st_size < 2 * 1024 * 1024


def test_loading_rejects_foreign_or_missing_artifacts(tmp_path: Path) -> None:
    import joblib

    with pytest.raises(ValueError, match="not a joblib artifact"):
        LengthPredictor.from_bytes(b"garbage")
    other = tmp_path / "other.joblib"
    joblib.dump({"kind": "something-else"}, other)
    with pytest.raises(ValueError, match="not an icgate length-predictor artifact"):
        LengthPredictor.load(other)
    joblib.dump({"kind": "icgate-length-predictor", "format": 99}, other)
    with pytest.raises(ValueError, match="format 99 is not supported"):
        LengthPredictor.load(other)
    with pytest.raises(FileNotFoundError):
        LengthPredictor.load(tmp_path / "absent.joblib")
    assert isinstance(load_length_model(tmp_path / "absent.joblib"), PromptLengthHeuristic)


def test_single_prediction_is_fast(fitted: LengthPredictor) -> None:
    emb = _synthetic(1, seed=8)[0][0]
    text = "Write a Flask app that stores notes.\n" + "def f(x):\n    return x\n" * 200
    fitted.predict(emb, 900, text)
    runs = []
    for _ in range(50):
        start = time.perf_counter()
        fitted.predict(emb, 900, text)
        runs.append(time.perf_counter() - start)
    assert float(np.median(runs)) < 0.005  # budget 1 ms on an idle core; loose for a shared CI machine


# --- refit from the request log, evaluation, the heuristic ----------------------------------------------


def test_refit_from_records_uses_embeddings_and_encoder() -> None:
    emb, _, texts, tokens = _synthetic(60, seed=9)
    records: list[Any] = [
        LengthRecord(t, n, e) for t, n, e in zip(texts[:40], tokens[:40], emb[:40], strict=True)
    ]
    records += [(t, None, n) for t, n in zip(texts[40:], tokens[40:], strict=True)]  # tuple form, no vector
    records += [("failed request", None, 0)]
    without = refit_from_records(records)
    assert without.summary["log_rows"] == 40 and without.summary["dropped"] == 21

    by_text = dict(zip(texts, emb, strict=True))
    calls: list[int] = []

    def encode(batch: list[str]) -> np.ndarray:
        calls.append(len(batch))
        return np.stack([by_text[t] for t in batch])

    with_encoder = refit_from_records(records, encode)
    assert with_encoder.summary["log_rows"] == 60 and with_encoder.summary["dropped"] == 1 and calls == [20]
    with pytest.raises(ValueError, match="at least"):
        refit_from_records(records[:5])


def test_evaluate_length_reports_tau_mae_n(fitted: LengthPredictor) -> None:
    emb, pt, texts, tokens = _synthetic(50, seed=10)
    rows = [LengthRow(f"q{i}", texts[i], tokens[i], emb[i], pt[i]) for i in range(50)]
    result = evaluate_length(fitted, rows)
    assert result["n"] == 50 and result["kendall_tau"] > 0.5 and result["mae"] >= 0
    assert 0.0 <= result["p90_coverage"] <= 1.0
    with pytest.raises(ValueError, match="no rows"):
        evaluate_length(fitted, [])


def test_heuristic_ranks_obvious_cases_without_embeddings() -> None:
    heuristic = PromptLengthHeuristic()
    app = heuristic.predict(None, 20, "Write a Python web app with user login and a REST API, with examples.")
    sum_ = heuristic.predict(None, 10, "Briefly, how much is 17 times 3?")
    plain = heuristic.predict(None, 10, "Tell me about Lisbon")
    assert app.p50 > plain.p50 > sum_.p50
    assert heuristic.predict(None, 400, "Translate to French: ...").p50 == 440  # a rewrite ~ its input
    assert heuristic.predict(None, 10, "Describe Paris in 200 words") == LengthEstimate(270, 405)
    rows = [
        LengthRow("a", "Write an essay about rivers with examples", 900),
        LengthRow("b", "What is 2+3?", 8),
    ]
    assert evaluate_length(heuristic, rows)["kendall_tau"] == 1.0  # no encoder needed
    assert heuristic.predict_batch(None, [10, 20], ["a", "b"]) == [
        heuristic.predict(None, 10, "a"),
        heuristic.predict(None, 20, "b"),
    ]


@pytest.mark.skipif(not DEFAULT_ARTIFACT.is_file(), reason="no shipped length artifact")
def test_shipped_artifact_is_small_and_records_held_out_metrics() -> None:
    assert DEFAULT_ARTIFACT.stat().st_size < 2 * 1024 * 1024
    shipped = LengthPredictor.load(DEFAULT_ARTIFACT)
    assert shipped.summary["buckets"].startswith("0-7")
    assert shipped.metrics["held_out"]["n"] > 0
    assert isinstance(load_length_model(), LengthPredictor)


def test_train_arena_fits_training_buckets_and_records_held_out(tmp_path: Path) -> None:
    emb, _, texts, tokens = _synthetic(120, seed=11)
    lines = [_arena_line(f"q{i}", texts[i], gpt_4_0314=tokens[i]) for i in range(120)]
    path = _write(tmp_path, lines)
    by_text = dict(zip(texts, emb, strict=True))
    out = tmp_path / "length.joblib"
    predictor = train_arena(path, "gpt-4-0314", out, lambda batch: np.stack([by_text[t] for t in batch]))
    train, held = split_rows(load_length_rows(path))
    assert predictor.summary["rows"] == len(train)
    assert predictor.metrics["held_out"]["n"] == len(held)
    assert LengthPredictor.load(out).version == predictor.version
