"""Labelled pairs of real sentences that the cache tests calibrate on, and random unit vectors."""

from __future__ import annotations

import numpy as np

from icgate.cache.calibrate import LabelledPair
from icgate.cache.cross_encoder_training import TrainingConfig

# A cross-encoder that trains in seconds: enough to see it learn, not to be good.
TINY = TrainingConfig(tuned_layers=1, steps=30, batch_size=16, learning_rate=1e-3, seed=0)


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=384).astype(np.float32)
    return v / np.linalg.norm(v)


ACTIONS = [
    ("reset my password", "reset my router"),
    ("learn Python quickly", "learn Java quickly"),
    ("lose weight fast", "gain weight fast"),
    ("improve my English speaking", "improve my English writing"),
    ("make money online", "make friends online"),
    ("prepare for the GRE", "prepare for the GMAT"),
    ("get a job at Google", "get a job at Amazon"),
    ("cook brown rice", "cook fried rice"),
    ("change the oil in my car", "change the tires on my car"),
    ("stop snoring at night", "stop sweating at night"),
    ("delete my Facebook account", "delete my Instagram account"),
    ("become a data scientist", "become a data engineer"),
    ("increase my height after 18", "increase my weight after 18"),
    ("get rid of acne scars", "get rid of stretch marks"),
    ("invest in the stock market in India", "invest in real estate in India"),
    ("fall asleep quickly", "wake up early"),
    ("write a good resume", "write a good cover letter"),
    ("train my puppy to sit", "train my cat to sit"),
    ("speed up my laptop", "charge my laptop"),
    ("save money on groceries", "save money on rent"),
    ("learn to play guitar", "learn to play piano"),
    ("get a US visa from India", "get a UK visa from India"),
    ("start a small business", "close a small business"),
    ("recover a hacked Gmail account", "recover a deleted Gmail account"),
    ("memorize things faster", "read books faster"),
    ("become more confident", "become more creative"),
    ("remove a virus from my phone", "remove a virus from my PC"),
    ("calculate compound interest", "calculate simple interest"),
    ("grow tomatoes indoors", "grow potatoes indoors"),
    ("quit smoking", "quit drinking"),
]
TEMPLATES = [
    ("How do I {}?", "How can I {}?"),
    ("What is the best way to {}?", "What's the easiest way to {}?"),
    ("How should I {}?", "What can I do to {}?"),
]


def synthetic_pairs() -> list[LabelledPair]:
    """Paraphrases (same action, another wording) and hard negatives (same wording, a sibling action)."""
    pairs = []
    for i, (action, sibling) in enumerate(ACTIONS):
        for j, (t1, t2) in enumerate(TEMPLATES):
            pairs.append(LabelledPair(t1.format(action), t2.format(action), True))
            pairs.append(LabelledPair(t1.format(action), t1.format(sibling), False))
            pairs.append(
                LabelledPair(t2.format(action), t1.format(ACTIONS[(i + j + 1) % len(ACTIONS)][0]), False)
            )
    pairs += [
        LabelledPair(f"How can I lose {n} kg in a month?", f"How can I lose {n * 3} kg in a month?", False)
        for n in range(2, 9)
    ]
    pairs += [
        LabelledPair(f"Is it safe to run {n} km a day?", f"Is it not safe to run {n} km a day?", False)
        for n in range(2, 9)
    ]
    return pairs
