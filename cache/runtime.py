"""Which inference runtime serves the embedder and the verifier's cross-encoder.

- `onnx-int8` (the gateway's default embedder): the exported graphs with int8 weights, 0.15-0.25x torch's
  CPU per text. Outputs move (vectors at cosine 0.995 of the float ones), so everything built on them was
  measured again on them (docs/performance.md). The verifier records which logits it was calibrated on
  (`CrossEncoderRuntime`), and its cross-encoder is always served that way (float32 for the shipped one),
  whatever the embedder's runtime.
- `onnx`: the models exported to ONNX graphs and run by onnxruntime, float32. Vectors and logits equal
  torch's to float rounding (cosine 1.00000), so thresholds calibrated on torch outputs hold unchanged;
  0.4-0.6x torch's CPU per text (bench/results/embed_runtime.md).
- `torch`: sentence-transformers / transformers, as icgate served before; no export step.

Graphs are exported once into `graphs` (the gateway passes `<data dir>/models`) and reused by every
later start; see `cache.onnx_models`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from icgate.cache.embed import Embedder, SentenceTransformerEmbedder
from icgate.cache.verify import CrossEncoderRuntime, PairScorer, ScorerLoader, torch_scorer

Runtime = Literal["onnx", "onnx-int8", "torch"]
RUNTIMES: tuple[Runtime, ...] = ("onnx", "onnx-int8", "torch")


def load_embedder(
    model_dir: Path, runtime: Runtime, graphs: Path, threads: int, max_batch: int = 64
) -> Embedder:
    """The sentence embedder of `model_dir` on `runtime` (exporting its graph into `graphs` if needed)."""
    if runtime == "torch":
        return SentenceTransformerEmbedder(model_dir, max_batch=max_batch)  # torch sizes its own threads
    from icgate.cache.onnx_models import RUN, OnnxEmbedder, embedder_graph

    quantized = runtime == "onnx-int8"
    graph = embedder_graph(model_dir, graphs, quantize=quantized)
    # int8 graphs quantise activations with a scale taken per call over the whole padded batch, so a
    # text's vector would depend on the texts beside it: one text per call keeps it the same in every
    # batch, for about the same CPU per text (bench/results/embed_runtime.md: 2.0 ms alone, 2.1 in runs).
    return OnnxEmbedder(graph, model_dir, threads=threads, run=1 if quantized else RUN)


def pair_scorer_loader(runtime: Runtime, graphs: Path, threads: int) -> ScorerLoader:
    """What `HitVerifier.load` builds the cross-encoder with: its weights and how calibration computed
    its logits in, a scorer out. The verifier's own record decides int8 or float and one order or both
    (its thresholds hold only for those logits); `runtime` decides the engine for float logits."""

    def load(state: dict[str, Any], calibrated: CrossEncoderRuntime) -> PairScorer:
        if calibrated.runtime != "onnx-int8" and runtime == "torch":
            return torch_scorer(state, calibrated)
        from icgate.cache.embed import resolve_model_dir
        from icgate.cache.onnx_models import OnnxPairScorer, cross_encoder_graph

        model_dir = resolve_model_dir(str(state["base"]))
        graph = cross_encoder_graph(state, model_dir, graphs, quantize=calibrated.runtime == "onnx-int8")
        return OnnxPairScorer(graph, model_dir, threads=threads, both_orders=calibrated.both_orders)

    return load
