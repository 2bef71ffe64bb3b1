"""The one interface every router implements: what the gateway builds for a request, what a router says."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

# An embedding (or a batch of them) as the embedder returns it: float32 in the gateway, any float offline.
Vectors = npt.NDArray[np.floating[Any]]


@dataclass(frozen=True)
class RouteFeatures:
    """What a router may look at. The embedding is computed once per request upstream.

    `text` is the text that was embedded (the last user message, or the prompt), for routers that read
    surface features such as numbers or answer choices; `extra` carries signals from earlier stages (e.g.
    the retrieved examples' `example_similarity` and `example_utility`).
    """

    prompt_tokens: int
    conversation_depth: int
    embedding: Vectors | None = None
    extra: dict[str, float] = field(default_factory=dict)
    text: str | None = None


@dataclass(frozen=True)
class RouteDecision:
    tier: str
    # P(the small tier's answer is good enough); None when the router does not score.
    score: float | None
    reasons: tuple[str, ...]


class Router(Protocol):
    def route(self, features: RouteFeatures) -> RouteDecision: ...
