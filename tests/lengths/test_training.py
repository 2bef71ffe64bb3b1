"""Training the output-length predictor: the loader, the split, fitting, refitting from the request
log and evaluation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import kendalltau

from icgate.lengths.predict import LengthPredictor, OutputLengthHeuristic
from icgate.lengths.training import (
    LengthRecord,
    LengthRow,
    evaluate_length,
    fit_predictor,
    load_length_rows,
    question_bucket,
    refit_from_records,
    split_rows,
    train_arena,
)
from tests.lengths.conftest import synthetic

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "length" / "arena_hard_lengths.jsonl"


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
    assert all(question_bucket(r) >= 8 for r in held)
    # Without an id the prompt decides.
    assert question_bucket(LengthRow("", "same text", 1)) == question_bucket(LengthRow("", "same text", 99))


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


def test_fitted_predictor_recovers_the_ordering(fitted: LengthPredictor) -> None:
    emb, pt, texts, tokens = synthetic(200, seed=2)
    estimates = fitted.predict_batch(emb, pt, texts)
    tau = kendalltau([e.p50 for e in estimates], tokens).statistic
    assert tau > 0.6
    # Calibrated: roughly 90% of fresh true lengths under p90, the median near the truth's.
    coverage = np.mean([t <= e.p90 for t, e in zip(tokens, estimates, strict=True)])
    assert 0.75 <= coverage <= 0.99
    assert 0.5 < np.median([e.p50 for e in estimates]) / np.median(tokens) < 2.0


def test_fit_rejects_too_little_or_mismatched_data() -> None:
    emb, pt, texts, tokens = synthetic(10, seed=6)
    with pytest.raises(ValueError, match="at least"):
        fit_predictor(emb, pt, texts, tokens)
    emb, pt, texts, tokens = synthetic(40, seed=6)
    with pytest.raises(ValueError, match="shape"):
        fit_predictor(emb[:, :100], pt, texts, tokens)


def test_refit_from_records_uses_embeddings_and_encoder() -> None:
    emb, _, texts, tokens = synthetic(60, seed=9)
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


def test_evaluate_length_of_the_heuristic_needs_no_encoder() -> None:
    rows = [
        LengthRow("a", "Write an essay about rivers with examples", 900),
        LengthRow("b", "What is 2+3?", 8),
    ]
    assert evaluate_length(OutputLengthHeuristic(), rows)["kendall_tau"] == 1.0


def test_evaluate_length_reports_tau_mae_n(fitted: LengthPredictor) -> None:
    emb, _, texts, tokens = synthetic(50, seed=10)
    rows = [LengthRow(f"q{i}", texts[i], tokens[i], emb[i]) for i in range(50)]
    result = evaluate_length(fitted, rows)
    assert result["n"] == 50 and result["kendall_tau"] > 0.5 and result["mae"] >= 0
    assert 0.0 <= result["p90_coverage"] <= 1.0
    with pytest.raises(ValueError, match="no rows"):
        evaluate_length(fitted, [])


def test_train_arena_fits_training_buckets_and_records_held_out(tmp_path: Path) -> None:
    emb, _, texts, tokens = synthetic(120, seed=11)
    lines = [_arena_line(f"q{i}", texts[i], gpt_4_0314=tokens[i]) for i in range(120)]
    path = _write(tmp_path, lines)
    by_text = dict(zip(texts, emb, strict=True))
    out = tmp_path / "length.joblib"
    predictor = train_arena(path, lambda batch: np.stack([by_text[t] for t in batch]), "gpt-4-0314", out)
    train, held = split_rows(load_length_rows(path))
    assert predictor.summary["rows"] == len(train)
    assert predictor.metrics["held_out"]["n"] == len(held)
    assert LengthPredictor.load(out).version == predictor.version


def test_a_learned_predictor_is_evaluated_on_embedded_rows_only(fitted: LengthPredictor) -> None:
    emb, _, texts, tokens = synthetic(30, seed=12)
    rows = [LengthRow(f"q{i}", texts[i], tokens[i]) for i in range(30)]
    with pytest.raises(ValueError, match="needs an encoder"):
        evaluate_length(fitted, rows)
    by_text = dict(zip(texts, emb, strict=True))
    result = evaluate_length(fitted, rows, lambda batch: np.stack([by_text[t] for t in batch]))
    assert result["n"] == 30


# Computed by the code before `question_bucket` hashed with `icgate.text.bucket_of`: the key is the
# question id as written (the prompt, not normalised, without one), and no row's split may move.
@pytest.mark.parametrize(
    ("question_id", "prompt", "bucket"),
    [
        ("q1", "Write a poem", 6),
        ("", "Write a poem", 4),
        ("", "  Write a poem", 8),
        ("0122ab2b1a8e4d1ab0a4d3f08c5b6e41", "ignored", 4),
        ("q0", "", 5),
        ("q7", "x", 1),
    ],
)
def test_question_buckets_are_pinned(question_id: str, prompt: str, bucket: int) -> None:
    assert question_bucket(LengthRow(question_id, prompt, 1)) == bucket


@pytest.mark.skipif(
    not DATA.is_file(), reason=f"evaluation data not found: {DATA} (shared data folder absent)"
)
def test_real_arena_file_splits_as_before() -> None:
    buckets = "".join(str(question_bucket(r)) for r in load_length_rows(DATA, "gpt-4-0314"))
    assert hashlib.sha1(buckets.encode()).hexdigest()[:16] == "792f1fb823ac06e0"  # every row, in file order
