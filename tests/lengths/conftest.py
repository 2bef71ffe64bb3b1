"""Synthetic prompts whose answer length an embedding can tell, and a predictor fitted on them."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from icgate.lengths.predict import EMBEDDING_DIM, LengthPredictor
from icgate.lengths.training import fit_predictor


def unit(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    x = rng.normal(size=(n, EMBEDDING_DIM)).astype(np.float32)
    rows: npt.NDArray[np.float32] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return rows


def synthetic(n: int, seed: int) -> tuple[np.ndarray, list[int], list[str], list[int]]:
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
    emb, pt, texts, tokens = synthetic(300, seed=1)
    return fit_predictor(emb, pt, texts, tokens)
