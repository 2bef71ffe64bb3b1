"""all-MiniLM-L6-v2 and the verifier's cross-encoder as int8 ONNX graphs under onnxruntime.

Why: sentence-transformers on torch spends ~21 ms of CPU on one short sentence here, most of it framework
overhead around a 22M-parameter model (bench/results/embed_runtime.md); the same network as an
int8-quantised ONNX graph runs in a fraction of that, and serving it needs neither torch nor
sentence-transformers in the process (start-up and memory shrink too).

Nothing is downloaded: a graph is exported here, once, from the packaged weights (torch's ONNX exporter),
quantised with onnxruntime's dynamic int8 quantiser, and kept in a folder the caller names (the gateway's
data directory), under a name that carries a hash of everything it was made from, so a changed model or
recipe makes a new file and an old file is never read for a new model. Export needs torch; serving reads
only the .onnx file and the tokenizer's `tokenizer.json`.

The graphs compute what the torch models compute: the embedder mean-pools the last hidden states over the
attention mask and normalises (sentence-transformers' Transformer -> Pooling(mean) -> Normalize for this
model); the cross-encoder returns the classification logit. Tokenisation is the model's own fast
tokenizer (the `tokenizers` library that transformers wraps), with the same truncation.

A plain library: no web framework, no module-level state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from icgate.cache.cross_encoder import MAX_LENGTH as PAIR_MAX_LENGTH
from icgate.cache.cross_encoder import pair_logits

if TYPE_CHECKING:
    import onnxruntime
    from tokenizers import Tokenizer

    from icgate.cache.cross_encoder import PairCrossEncoder

# Bump when the export or quantisation recipe changes: the file name changes with it.
RECIPE_VERSION = "2"
OPSET = 17


def default_threads(processes: int = 1) -> int:
    """Inference threads for one model: half the cores the process may use (shared by `processes`
    gateway processes), at least one.

    The event loop needs a core of its own: a model that takes every core stalls the loop (measured: two
    torch threads on two cores took 33.7 ms of CPU per sentence against 21.6 ms on one, and doubled the
    loop's lag). Onnxruntime spins its worker threads while waiting, so more threads than cores is worse.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // (2 * processes))


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:12]


def _weights_digest(model_dir: Path) -> str:
    """A hash of the model's weight and config files (their bytes, not their paths)."""
    h = hashlib.sha256()
    for path in sorted(model_dir.glob("*")):
        if path.suffix in (".safetensors", ".bin", ".json") and path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads == 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Every request has its own (batch, length) shape. The arena keeps each new high-water block for
    # good and the memory planner caches a pattern per shape, so with both on the heap crept up by
    # ~2.5 MB per model over a few thousand calls and never came back (bench/results/soak.md); off,
    # +0.2 MB, at the same CPU per call (10.0 ms on and off, Quora questions, one thread).
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _tokenizer(model_dir: Path, max_length: int | None) -> Tokenizer:
    """The model's fast tokenizer, cutting at `max_length` pieces and padding a batch to its longest text;
    `max_length` None: neither (for counting)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    if max_length is not None:
        tokenizer.enable_truncation(max_length=max_length)  # longest_first for pairs, as transformers does
        tokenizer.enable_padding()  # to the longest text of the batch
    return tokenizer


def _export(build: Callable[[], Any], names: Sequence[str], output: str, out: Path, quantize: bool) -> Path:
    """Export the torch module `build()` with inputs `names` (int64 [batch, seq]) to `out`, quantised to
    int8 (dynamic, weights only) when `quantize`. Written to a temporary file first: an interrupted
    export leaves nothing that looks finished."""
    import torch

    module = build().eval()
    sample = {name: torch.ones((2, 8), dtype=torch.int64) for name in names}
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        fp32 = Path(tmp) / "model.onnx"
        # the exporter warns about tracing details of this model's code that do not apply to it
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(sample[name] for name in names),
                str(fp32),
                input_names=list(names),
                output_names=[output],
                dynamic_axes={**axes, output: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        final = fp32
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            final = Path(tmp) / "model.int8.onnx"
            # Per-channel int8 weights of the matrix products only: per-tensor scales moved MiniLM's
            # vectors to cosine 0.968 of the float ones on Quora questions, per-channel to 0.994, at
            # the same speed; quantising the embedding tables too saves memory, not time.
            logging.disable(logging.WARNING)  # the quantiser logs a line per tensor, and advice, on root
            try:
                quantize_dynamic(
                    str(fp32),
                    str(final),
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    op_types_to_quantize=["MatMul"],
                )
            finally:
                logging.disable(logging.NOTSET)
        os.replace(final, out)
    return out


def _feeds(batch: list[Any]) -> dict[str, npt.NDArray[np.int64]]:
    """The graph's inputs for a batch of the tokenizer's encodings (padded to one length)."""
    return {
        "input_ids": np.array([e.ids for e in batch], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in batch], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in batch], dtype=np.int64),
    }


# --------------------------------------------------------------------------------------------------------
# The embedder
# --------------------------------------------------------------------------------------------------------

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
RUN = 4  # texts per onnxruntime call (see `OnnxEmbedder.encode`)


def _mean_pooled(model_dir: Path) -> Any:
    """The torch module exported for the embedder: BERT, mean pooling over the mask, unit length."""
    import torch
    from transformers import AutoModel

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(model_dir), local_files_only=True)

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return MeanPooled()


def _max_seq_length(model_dir: Path) -> int:
    config = model_dir / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length", 256))
    return 256


def embedder_graph(model_dir: Path, directory: Path, quantize: bool = True) -> Path:
    """The embedder's ONNX file in `directory`, exported from `model_dir` first if it is not there yet."""
    kind = "int8" if quantize else "fp32"
    name = f"embedder-{_digest(_weights_digest(model_dir), RECIPE_VERSION, kind)}-{kind}.onnx"
    path = directory / name
    if not path.is_file():
        _export(lambda: _mean_pooled(model_dir), INPUTS, "embedding", path, quantize)
    return path


class OnnxEmbedder:
    """Unit sentence vectors from an ONNX graph of a sentence-transformers model (see `embedder_graph`)."""

    def __init__(self, graph: Path, model_dir: Path, threads: int = 1, run: int = RUN) -> None:
        self.run = run
        max_length = _max_seq_length(model_dir)
        self.max_chars = max_length * 8  # see cache.embed.CHARS_PER_PIECE
        self._tokenizer = _tokenizer(model_dir, max_length)
        self._counter = _tokenizer(model_dir, None)
        self._session = _session(graph, threads)
        self.dim = int(self.encode(["dimension probe"]).shape[1])

    def encode(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """Vectors in the order given, computed in runs of `run` texts of similar length.

        A batch is padded to its longest text, and on a CPU a padded token costs as much as a real one
        (Quora questions have 15 word pieces on average, up to 55). Sorted by length and run four at a
        time, 16 texts cost per text what one alone costs, or a little less
        (bench/results/embed_runtime.md); the batch's gain is one hand-off to the worker thread for all.
        """
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        # One tokenizer call for the whole batch: each call lets go of the GIL and must win it back, and
        # under load, with the event loop holding it, that wait was a millisecond a text. Each run is
        # then cut back to its own longest text (padding is at the end), so it is fed exactly what
        # tokenizing it alone would give and its vectors do not depend on the rest of the batch.
        feeds = _feeds(self._tokenizer.encode_batch([texts[i][: self.max_chars] for i in order]))
        lengths = feeds["attention_mask"].sum(axis=1)
        vectors: list[npt.NDArray[np.float32]] = [np.empty(0, np.float32)] * len(texts)
        for start in range(0, len(order), self.run):
            stop = start + self.run
            width = int(lengths[start:stop].max())
            part = {name: np.ascontiguousarray(ids[start:stop, :width]) for name, ids in feeds.items()}
            (run_vectors,) = self._session.run(None, part)
            for i, vector in zip(order[start:stop], np.asarray(run_vectors, dtype=np.float32), strict=True):
                vectors[i] = vector
        return np.stack(vectors)

    def decode_tokens(self, token_ids: list[int]) -> str:
        """Token ids of this model's tokenizer back to text; ids outside its vocabulary are refused."""
        size = self._tokenizer.get_vocab_size()
        bad = next((t for t in token_ids if not 0 <= t < size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{size - 1})")
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Word pieces of each whole text (special tokens included), as the model's tokenizer counts them."""
        return [len(e.ids) for e in self._counter.encode_batch(texts)]


# --------------------------------------------------------------------------------------------------------
# The cross-encoder
# --------------------------------------------------------------------------------------------------------


def cross_encoder_graph(
    state: dict[str, Any], model_dir: Path, directory: Path, quantize: bool = True
) -> Path:
    """The ONNX file of a verifier's cross-encoder (`PairCrossEncoder.state()`) in `directory`, exported
    first if it is not there yet (which builds the torch model once)."""
    kind = "int8" if quantize else "fp32"
    tuned = hashlib.sha256()
    for name in sorted(state["weights"]):
        tuned.update(name.encode())
        tuned.update(np.ascontiguousarray(state["weights"][name]).tobytes())
    key = _digest(
        _weights_digest(model_dir), tuned.hexdigest(), str(state["tuned_layers"]), RECIPE_VERSION, kind
    )
    path = directory / f"cross-encoder-{key}-{kind}.onnx"
    if not path.is_file():
        _export(lambda: _logit_module(state), INPUTS, "logit", path, quantize)
    return path


def _logit_module(state: dict[str, Any]) -> Any:
    import torch

    from icgate.cache.cross_encoder import PairCrossEncoder

    encoder: PairCrossEncoder = PairCrossEncoder.from_state(state)

    class Logit(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = encoder.model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.logits[:, 0]

    return Logit()


class OnnxPairScorer:
    """The cross-encoder's logit for text pairs, from its ONNX graph (see `cross_encoder_graph`).

    `both_orders` averages the logits of (a, b) and (b, a), as `PairCrossEncoder.logits` does; with it off
    a pair is read once, in the order given (half the compute; see bench/results/verifier_cost.md for what
    that does to precision).
    """

    def __init__(self, graph: Path, model_dir: Path, threads: int = 1, both_orders: bool = True) -> None:
        self.both_orders = both_orders
        self._tokenizer = _tokenizer(model_dir, PAIR_MAX_LENGTH)
        self._session = _session(graph, threads)

    def logits(
        self, texts_a: Sequence[str], texts_b: Sequence[str], batch_size: int = 64
    ) -> npt.NDArray[np.float64]:
        return pair_logits(self._run, texts_a, texts_b, self.both_orders, batch_size)

    def _run(self, first: list[str], second: list[str]) -> npt.NDArray[np.float64]:
        batch = self._tokenizer.encode_batch(list(zip(first, second, strict=True)))
        (logits,) = self._session.run(None, _feeds(batch))
        return np.asarray(logits, dtype=np.float64)
