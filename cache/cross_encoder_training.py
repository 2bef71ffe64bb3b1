"""Fine-tuning the verifier's cross-encoder (`cache.cross_encoder.PairCrossEncoder`) on labelled pairs.

Runs only at calibration (`cache.calibrate`, `bench/cross_encoder_probe.py`), never on a request: the
request path loads the tuned weights from the artifact and scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from icgate.cache.cross_encoder import PairCrossEncoder, clip_for_tokenizer


@dataclass(frozen=True)
class TrainingConfig:
    """Defaults are what the shipped verifier used: ~3 epochs over 33,000 Quora pairs, ~20 min on 2 cores."""

    tuned_layers: int = 6
    layers: int | None = None  # the depth of the reader (None: the packaged model's 6)
    # With a teacher's logits (`fine_tune(teacher_logits=...)`): the share of each pair's target that is
    # the teacher's probability rather than its label (knowledge distillation; 0: labels alone).
    distill_weight: float = 0.7
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_share: float = 0.1
    seed: int = 0


def length_bucketed_batches(
    lengths: npt.NDArray[np.integer[Any]], batch_size: int, rng: np.random.Generator, pool_batches: int = 50
) -> Iterator[npt.NDArray[np.intp]]:
    """Row indices, batch by batch, epoch after epoch, every row once per epoch.

    Why: padding to the longest pair in a random batch roughly doubles the work on short Quora questions.
    Each pool of `pool_batches` batches is sorted by length, cut into batches, and those are shuffled, so
    batches hold pairs of similar length while their order stays random.
    """
    pool = batch_size * pool_batches
    while True:
        order = rng.permutation(len(lengths))
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            for j in rng.permutation(len(batches)):
                yield batches[j]


def fine_tune(
    encoder: PairCrossEncoder,
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    labels: Sequence[bool],
    config: TrainingConfig | None = None,
    progress: Callable[[str], None] | None = None,
    teacher_logits: npt.NDArray[np.float64] | None = None,
) -> PairCrossEncoder:
    """`encoder`, its head and top layers fine-tuned in place with binary cross-entropy (AdamW, linear
    warm-up/decay), in length-bucketed batches that go through every pair once per epoch.

    With `teacher_logits` (a deeper cross-encoder's symmetric logit per pair), each pair's target blends
    its label with the teacher's probability (`config.distill_weight`): a shallow reader learns the
    teacher's graded judgement, not only the labels' 0 and 1, which recovers part of what depth gave."""
    import torch

    config = config or TrainingConfig()
    if not (len(texts_a) == len(texts_b) == len(labels)) or not len(labels):
        raise ValueError("fine_tune needs equally many texts_a, texts_b and labels, at least one")
    if config.tuned_layers != encoder.tuned_layers:
        raise ValueError("config.tuned_layers differs from the encoder's tuned_layers")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    tuned = set(encoder.tuned_names)
    params = []
    for name, param in encoder.model.named_parameters():
        param.requires_grad = name in tuned
        if param.requires_grad:
            params.append(param)
    optimiser = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = config.steps
    warmup = max(1, round(config.warmup_share * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / steps)
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    y_all = np.asarray(labels, dtype=np.float32)
    if teacher_logits is not None:
        if len(teacher_logits) != len(y_all):
            raise ValueError("fine_tune needs one teacher logit per pair")
        taught = 1.0 / (1.0 + np.exp(-np.asarray(teacher_logits, dtype=np.float64)))
        share = config.distill_weight
        y_all = ((1.0 - share) * y_all + share * taught).astype(np.float32)
    pieces = encoder.tokenizer(clip_for_tokenizer(texts_a), clip_for_tokenizer(texts_b))["input_ids"]
    lengths = np.array([len(ids) for ids in pieces])
    batches = length_bucketed_batches(lengths, min(config.batch_size, len(y_all)), rng)
    started = time.perf_counter()
    encoder.model.train()
    try:
        for step in range(steps):
            rows = next(batches)
            flip = rng.random(len(rows)) < 0.5  # both orders, so the model learns a symmetric relation
            first = [texts_b[i] if f else texts_a[i] for i, f in zip(rows, flip, strict=True)]
            second = [texts_a[i] if f else texts_b[i] for i, f in zip(rows, flip, strict=True)]
            logits = encoder.model(**encoder.encode_pairs(first, second)).logits[:, 0]
            loss = loss_fn(logits, torch.from_numpy(y_all[rows]))
            loss.backward()
            optimiser.step()
            schedule.step()
            optimiser.zero_grad()
            if progress is not None and (step % 50 == 0 or step == steps - 1):
                progress(
                    f"cross-encoder step {step + 1}/{steps} loss {loss.item():.3f} "
                    f"({time.perf_counter() - started:.0f} s)"
                )
    finally:
        encoder.model.eval()
        for param in encoder.model.parameters():
            param.requires_grad = False
    return encoder
