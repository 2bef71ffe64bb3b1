"""One request asked of several length models (`prompt_view`, `estimate_for`) and the constant baseline."""

from __future__ import annotations

import numpy as np

from icgate.lengths.predict import (
    ConstantLength,
    LengthEstimate,
    LengthPredictor,
    OutputLengthHeuristic,
    estimate_for,
    prompt_view,
)
from tests.lengths.conftest import synthetic

PROMPTS = [
    "Write a detailed essay on tides.",
    "What is 2+2? Answer in one word.",
    "Summarise this in 100 words: the cat sat on the mat.",
    "x" * 5000,
    "",
]


def test_a_view_gives_each_model_the_estimate_it_gives_the_request(fitted: LengthPredictor) -> None:
    emb = synthetic(len(PROMPTS), seed=11)[0]
    heuristic = OutputLengthHeuristic()
    for vector, text in zip([*emb[:-1], None], PROMPTS, strict=True):
        seen = prompt_view(vector, 40, text)
        assert estimate_for(fitted, seen) == fitted.predict(vector, 40, text)
        assert estimate_for(heuristic, seen) == heuristic.predict(vector, 40, text)


def test_the_constant_baseline_sizes_every_request_alike() -> None:
    constant = ConstantLength(300, 600)
    sizes = {constant.predict(np.ones(384), n, text) for n, text in enumerate(PROMPTS)}
    assert sizes == {LengthEstimate(300, 600)}
