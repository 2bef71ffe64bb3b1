"""The output-length predictor at request time: features, estimates, persistence, the heuristic."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from icgate.lengths.predict import (
    DEFAULT_ARTIFACT,
    EMBEDDING_DIM,
    FEATURE_NAMES,
    LengthEstimate,
    LengthPredictor,
    OutputLengthHeuristic,
    load_length_model,
    prompt_features,
    requested_tokens,
)
from tests.lengths.conftest import synthetic, unit


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


def test_single_and_batch_predictions_agree(fitted: LengthPredictor) -> None:
    emb, pt, texts, _ = synthetic(20, seed=3)
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
    for model in (fitted, OutputLengthHeuristic()):
        for text in texts:
            for tokens in (0, 1, 50, 100_000):
                for emb in (None, unit(rng, 1)[0]):
                    estimate = model.predict(emb, tokens, text)
                    assert isinstance(estimate, LengthEstimate)
                    assert 1 <= estimate.p50 <= estimate.p90


def test_missing_embedding_still_predicts(fitted: LengthPredictor) -> None:
    estimate = fitted.predict(None, 40, "Explain quantum computing")
    assert estimate.p50 >= 1
    with pytest.raises(ValueError, match="dimension 384"):
        fitted.predict(np.zeros(10), 40, "x")


def test_explicit_length_request_overrides_the_model(fitted: LengthPredictor) -> None:
    emb = synthetic(1, seed=5)[0][0]
    assert fitted.predict(emb, 10, "Describe Paris in 200 words") == LengthEstimate(270, 405)


def test_round_trip_gives_identical_predictions(fitted: LengthPredictor, tmp_path: Path) -> None:
    fitted.metrics = {"held_out": {"kendall_tau": 0.5}}
    emb, pt, texts, _ = synthetic(30, seed=7)
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
    assert isinstance(load_length_model(tmp_path / "absent.joblib"), OutputLengthHeuristic)


def test_single_prediction_is_fast(fitted: LengthPredictor) -> None:
    emb = synthetic(1, seed=8)[0][0]
    text = "Write a Flask app that stores notes.\n" + "def f(x):\n    return x\n" * 200
    fitted.predict(emb, 900, text)
    runs = []
    for _ in range(50):
        start = time.perf_counter()
        fitted.predict(emb, 900, text)
        runs.append(time.perf_counter() - start)
    assert float(np.median(runs)) < 0.005  # budget 1 ms on an idle core; loose for a shared CI machine


def test_heuristic_ranks_obvious_cases_without_embeddings() -> None:
    heuristic = OutputLengthHeuristic()
    app = heuristic.predict(None, 20, "Write a Python web app with user login and a REST API, with examples.")
    sum_ = heuristic.predict(None, 10, "Briefly, how much is 17 times 3?")
    plain = heuristic.predict(None, 10, "Tell me about Lisbon")
    assert app.p50 > plain.p50 > sum_.p50
    assert heuristic.predict(None, 400, "Translate to French: ...").p50 == 440  # a rewrite ~ its input
    assert heuristic.predict(None, 10, "Describe Paris in 200 words") == LengthEstimate(270, 405)
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


def test_request_time_code_loads_without_the_training_code() -> None:
    """The gateway imports `lengths.predict`: it must not drag in training, scikit-learn or scipy."""
    loaded = "import sys, icgate.lengths.predict; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", loaded], capture_output=True, text=True, check=True)
    forbidden = ("icgate.lengths.training", "sklearn", "scipy")
    assert not [m for m in out.stdout.split() if m.startswith(forbidden)]
