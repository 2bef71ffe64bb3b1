"""Synthetic labelled prompts for the router tests, and one router trained on them (shared: it is slow)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from icgate.routers.data import LabelledPrompt
from icgate.routers.learned import EMBEDDING_DIM, LearnedRouter
from icgate.routers.training import train_router

# (weak_ok, strong_ok) per kind of synthetic prompt: only the strong model right, both right, only weak,
# and a second kind of "only strong right" so the strong model is the better one overall.
KINDS = [(False, True), (True, True), (True, False), (False, True)]

SyntheticData = tuple["Synthetic", list[LabelledPrompt], list[LabelledPrompt]]


class Synthetic:
    """Prompts whose embedding sits near one centre per (group, kind); `encode` looks them up."""

    def __init__(self, seed: int = 0, groups: tuple[str, ...] = ("g",)) -> None:
        self.rng = np.random.default_rng(seed)
        self.centres = {
            (g, k): self._unit(self.rng.normal(size=EMBEDDING_DIM)) for g in groups for k in range(len(KINDS))
        }
        self.vectors: dict[str, np.ndarray] = {}
        self.groups = groups

    @staticmethod
    def _unit(v: np.ndarray) -> npt.NDArray[np.float32]:
        unit: npt.NDArray[np.float32] = (v / np.linalg.norm(v)).astype(np.float32)
        return unit

    def rows(self, n: int, start: int = 0, flip: float = 0.1) -> list[LabelledPrompt]:
        out = []
        for i in range(start, start + n):
            group = self.groups[i % len(self.groups)]
            kind = (i // len(self.groups)) % len(KINDS)
            prompt = f"{group} question {i}: how many apples are left?"
            noise = self.rng.normal(size=EMBEDDING_DIM) * 0.05
            self.vectors[prompt] = self._unit(self.centres[(group, kind)] + noise)
            weak, strong = KINDS[kind]
            if self.rng.random() < flip:  # label noise: the signal is strong, not perfect
                weak = not weak
            out.append(LabelledPrompt(prompt, weak, strong, group))
        return out

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts])


@pytest.fixture(scope="session")
def synthetic() -> SyntheticData:
    data = Synthetic(seed=0)
    return data, data.rows(600), data.rows(300, start=10_000)


@pytest.fixture(scope="session")
def trained(synthetic: SyntheticData) -> LearnedRouter:
    data, train, _ = synthetic
    return train_router(train, data.encode, sources=["synthetic"])
