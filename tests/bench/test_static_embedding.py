"""The plain part of `bench/static_embedding.py`: recall@k of a query's twin."""

from __future__ import annotations

import numpy as np

from bench.static_embedding import recall_at, unit


def test_recall_counts_a_twin_only_when_it_ranks_within_k() -> None:
    # Row i's twin is column i. Row 0: twin first; row 1: one item beats it; row 2: three items beat it.
    scores = np.array(
        [
            [0.9, 0.1, 0.2, 0.3],
            [0.8, 0.7, 0.1, 0.2],
            [0.9, 0.8, 0.5, 0.7],
        ],
        dtype=np.float32,
    )
    assert recall_at(scores, (1, 2, 3, 4)) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3, 4: 1.0}


def test_a_tie_with_the_twin_does_not_push_it_down() -> None:
    scores = np.array([[0.5, 0.5], [0.2, 0.2]], dtype=np.float32)
    assert recall_at(scores, (1,)) == {1: 1.0}


def test_unit_rows_have_length_one_and_zero_rows_stay_finite() -> None:
    v = unit(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert v.dtype == np.float32
    np.testing.assert_allclose(v[0], [0.6, 0.8], rtol=1e-6)
    assert np.all(np.isfinite(v[1]))
