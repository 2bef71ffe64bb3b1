"""How well does a MiniLM cross-encoder (cache/cross_encoder_training.py) rank Quora pairs on its own?

Fine-tunes the packaged all-MiniLM-L6-v2 as a cross-encoder on calibration pairs (buckets 0-7) and scores
a balanced sample of the held-out pairs (buckets 8-9) with it alone, beside the shipped verifier's score
(classifier over the pair features and its own cross-encoder) on the same pairs: AUC and precision at
fixed recall levels. For trying training settings without a whole calibration. Slow on 2 cores: about
0.35 s per step of 32 pairs on a quiet machine, several times that when other jobs run.

    .venv/bin/python bench/cross_encoder_probe.py [--pairs 33000] [--steps 3000] [--tuned-layers 6]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cache_precision import EMBEDDINGS  # noqa: E402
from icgate.cache.calibrate import (  # noqa: E402
    calibration_pairs,
    default_encoder,
    held_out_pairs,
    load_pairs,
    train_cross_encoder,
)
from icgate.cache.cross_encoder_training import TrainingConfig  # noqa: E402
from icgate.cache.verify import DEFAULT_ARTIFACT, HitVerifier  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cache" / "qqp_pairs.jsonl.gz"


def precision_at_recall(scores: np.ndarray, labels: np.ndarray, recall: float) -> float:
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(labels[order])
    k = int(np.searchsorted(tp, recall * labels.sum()))
    return float(tp[k] / (k + 1))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = TrainingConfig()
    parser.add_argument("--pairs", type=int, default=33_000, help="calibration pairs to fine-tune on")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--tuned-layers", type=int, default=defaults.tuned_layers)
    parser.add_argument("--held-out", type=int, default=3_000)
    args = parser.parse_args()
    from sklearn.metrics import roc_auc_score

    pairs = load_pairs(DATA, skip_blank_text=True)
    train = calibration_pairs(pairs, args.pairs, seed=1)
    held = held_out_pairs(pairs, args.held_out)
    config = TrainingConfig(tuned_layers=args.tuned_layers, steps=args.steps)
    started = time.perf_counter()
    encoder = train_cross_encoder(train, config, print).encoder
    print(f"fine-tuned in {time.perf_counter() - started:.0f} s")
    texts_a, texts_b = [p.text_a for p in held], [p.text_b for p in held]
    labels = np.array([p.duplicate for p in held])
    encode = default_encoder(EMBEDDINGS)
    verifier = HitVerifier.load(DEFAULT_ARTIFACT)
    va, vb = encode(texts_a), encode(texts_b)
    verifier_scores = verifier.model.predict_proba(verifier.features(texts_a, texts_b, va, vb))[:, 1]
    scores = {"cross-encoder alone": encoder.logits(texts_a, texts_b), "shipped verifier": verifier_scores}
    print("| score | AUC | " + " | ".join(f"P@R{r}" for r in (0.2, 0.3, 0.4, 0.5)) + " |")
    for name, s in scores.items():
        cells = " | ".join(f"{precision_at_recall(s, labels, r):.3f}" for r in (0.2, 0.3, 0.4, 0.5))
        print(f"| {name} | {roc_auc_score(labels, s):.3f} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
