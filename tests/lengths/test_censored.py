"""Truncated answers in the fit: lower bounds, not labels (lengths/training.py: `impute_truncated`)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from icgate.lengths.predict import EMBEDDING_DIM, LengthPredictor
from icgate.lengths.training import (
    LoggedAnswer,
    _fold_sets,
    fit_logged,
    fit_predictor,
    km_conditional_median,
    km_quantiles,
)

Data = tuple[npt.NDArray[np.float32], list[int], list[str], npt.NDArray[np.int64]]


def noisy(n: int, seed: int) -> Data:
    """Length grows with one latent direction of the embedding, with the spread real answers have (a log
    residual of 0.6: two answers to one prompt often differ by half)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(16, EMBEDDING_DIM))
    latent = rng.normal(size=(n, 16))
    emb = latent @ mixing + 0.3 * rng.normal(size=(n, EMBEDDING_DIM))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    tokens = np.exp(5.5 + 0.5 * latent[:, 0] + 0.6 * rng.normal(size=n)).round().astype(np.int64)
    return emb, [20] * n, [f"question {seed}-{i}" for i in range(n)], tokens


def scored(predictor: LengthPredictor, held: Data) -> dict[str, float]:
    emb, prompt_tokens, texts, truth = held
    estimates = predictor.predict_batch(emb, prompt_tokens, texts)
    p50 = np.array([e.p50 for e in estimates])
    p90 = np.array([e.p90 for e in estimates])
    return {
        "above_p50": float((truth > p50).mean()),  # 0.5 for an unbiased median
        "mae": float(np.abs(p50 - truth).mean()),
        "p90_coverage": float((truth <= p90).mean()),
    }


def test_km_conditional_median_without_censoring_is_the_median_above_the_bound() -> None:
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    every = np.ones(5, dtype=bool)
    assert km_conditional_median(values, every, np.array([2.5, 0.0])).tolist() == [4.0, 3.0]


def test_km_hands_a_censored_points_mass_to_those_above_it() -> None:
    # 1 (seen), 2 (at least 2), 3 (seen), 4 (seen): KM masses 1/4, 0, 3/8, 3/8.
    values = np.array([1.0, 2.0, 3.0, 4.0])
    seen = np.array([True, False, True, True])
    assert km_quantiles(values, seen, [0.25, 0.5, 0.7]) == [1.0, 3.0, 4.0]
    # Above the bound 2: 3 and 4, half each: the median above 2 is 3.
    assert km_conditional_median(values, seen, np.array([2.0])).tolist() == [3.0]
    # A bound above every value imputes the bound itself: nothing is known beyond it.
    assert km_conditional_median(values, seen, np.array([9.0])).tolist() == [9.0]


@pytest.fixture(scope="module")
def truncated_log() -> tuple[Data, npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """1,500 answers of which the longest 40% were cut at a max_tokens (their tokens: the cap)."""
    data = noisy(1500, seed=3)
    cap = int(np.quantile(data[3], 0.6))
    cut = data[3] >= cap
    return data, np.minimum(data[3], cap), cut


def test_truncated_answers_as_bounds_keep_the_median_unbiased(
    truncated_log: tuple[Data, npt.NDArray[np.int64], npt.NDArray[np.bool_]],
) -> None:
    (emb, prompt_tokens, texts, _), observed, cut = truncated_log
    held = noisy(600, seed=4)
    lengths, flags = observed.tolist(), cut.tolist()
    as_bounds = scored(fit_predictor(emb, prompt_tokens, texts, lengths, truncated=flags), held)
    as_labels = scored(fit_predictor(emb, prompt_tokens, texts, lengths), held)
    keep = np.flatnonzero(~cut)
    dropped = scored(
        fit_predictor(
            emb[keep], [prompt_tokens[i] for i in keep], [texts[i] for i in keep], observed[keep].tolist()
        ),
        held,
    )
    assert 0.42 <= as_bounds["above_p50"] <= 0.58
    # Both shortcuts predict short: more than half the true answers run past their p50.
    for biased in (as_labels, dropped):
        assert biased["above_p50"] > as_bounds["above_p50"] + 0.05
        assert biased["mae"] > as_bounds["mae"]
        assert biased["p90_coverage"] < 0.8
    assert as_bounds["p90_coverage"] >= 0.85


def test_a_fit_without_truncated_answers_is_unchanged_by_the_flag() -> None:
    emb, prompt_tokens, texts, tokens = noisy(200, seed=5)
    plain = fit_predictor(emb, prompt_tokens, texts, tokens.tolist())
    flagged = fit_predictor(emb, prompt_tokens, texts, tokens.tolist(), truncated=[False] * len(tokens))
    np.testing.assert_allclose(plain.coef, flagged.coef)
    assert (plain.q50, plain.q90) == pytest.approx((flagged.q50, flagged.q90))


def test_groups_keep_every_repeat_of_a_prompt_in_one_fold() -> None:
    groups = [f"prompt {i % 37}" for i in range(500)]
    folds = _fold_sets(len(groups), 5, 0, groups)
    assert sorted(np.concatenate(folds).tolist()) == list(range(500))
    for fold in folds:
        inside = {groups[i] for i in fold}
        outside = {groups[i] for other in folds if other is not fold for i in other}
        assert not inside & outside


def test_fit_logged_fits_answers_without_an_embedding_at_the_mean_embedding() -> None:
    """A request served without an embedding is predicted at the predictor's mean embedding; an answer
    logged without one must be fitted there too, not at zero."""
    emb, prompt_tokens, texts, tokens = noisy(300, seed=6)
    answers = [
        LoggedAnswer(t, p, int(n), truncated=False, embedding=None if i % 3 == 0 else e)
        for i, (e, p, t, n) in enumerate(zip(emb, prompt_tokens, texts, tokens, strict=True))
    ]
    predictor = fit_logged(answers, summary={"backend": "b"})
    with_vector = np.stack([e for i, e in enumerate(emb) if i % 3 != 0]).astype(np.float64)
    np.testing.assert_allclose(predictor.embedding_mean, with_vector.mean(axis=0), atol=1e-6)
    assert predictor.summary["answers"] == 300 and predictor.summary["with_embedding"] == 200
    assert predictor.summary["backend"] == "b"


def test_fit_logged_reads_truncation_from_the_answers() -> None:
    emb, prompt_tokens, texts, tokens = noisy(400, seed=7)
    cap = int(np.quantile(tokens, 0.7))
    answers = [
        LoggedAnswer(t, p, int(min(n, cap)), truncated=bool(n >= cap), embedding=e)
        for e, p, t, n in zip(emb, prompt_tokens, texts, tokens, strict=True)
    ]
    predictor = fit_logged(answers)
    assert predictor.summary["truncated"] == int((tokens >= cap).sum())
    # Imputed above the cap, so the median prediction of the longest prompts may exceed it.
    assert max(e.p90 for e in predictor.predict_batch(emb, prompt_tokens, texts)) > cap


def test_a_truncated_answer_to_a_prompt_answered_in_full_elsewhere_takes_that_length() -> None:
    """The log repeats prompts: a truncated answer whose prompt was also answered in full (at or above its
    bound) is fitted at that answer's length, so the fit is the one the untruncated log would give."""
    emb, prompt_tokens, texts, tokens = noisy(150, seed=8)
    cap = int(np.quantile(tokens, 0.5))
    full, cut_short = [], []
    for e, p, t, n in zip(emb, prompt_tokens, texts, tokens, strict=True):
        for repeat in range(4):
            truncated = repeat % 2 == 1 and n > cap  # every other request capped: long answers cut
            full.append(LoggedAnswer(t, p, int(n), truncated=False, embedding=e))
            cut_short.append(LoggedAnswer(t, p, int(min(n, cap) if truncated else n), truncated, e))
    reference = fit_logged(full)
    as_bounds = fit_logged(cut_short)
    as_labels = fit_logged(
        [LoggedAnswer(a.text, a.prompt_tokens, a.completion_tokens, False, a.embedding) for a in cut_short]
    )
    held = noisy(300, seed=9)

    def p50s(predictor: LengthPredictor) -> npt.NDArray[np.float64]:
        return np.array([e.p50 for e in predictor.predict_batch(held[0], held[1], held[2])], dtype=np.float64)

    np.testing.assert_allclose(p50s(as_bounds), p50s(reference), rtol=0.02)
    assert np.median(p50s(as_labels) / p50s(reference)) < 0.95
