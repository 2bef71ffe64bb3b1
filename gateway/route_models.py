"""The learned parts in force, the router and the length predictor, as one `RouteModels` record: which
ones the gateway starts with, and the records that replace them when `icgate router train` / `icgate
length train` publish newer ones (the watchers in `gateway.store.artifacts` call `with_router` /
`with_length`, through `Pipeline.swap_models`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from icgate.gateway.config import Policy
from icgate.gateway.store import artifacts
from icgate.gateway.store.artifacts import StoredModel
from icgate.lengths.predict import LengthModel, LengthPredictor, OutputLengthHeuristic, load_length_model
from icgate.routers.base import Router
from icgate.routers.learned import DEFAULT_ARTIFACT, LearnedRouter
from icgate.routers.rules import LongPromptRule

SHIPPED_ROUTER = DEFAULT_ARTIFACT
log = logging.getLogger("icgate.route_models")


@dataclass(frozen=True)
class RouteModels:
    """The router and length predictor in force, with what identifies and calibrates them."""

    router: Router
    length: LengthModel
    # The router's calibrated threshold and its calibration scores (for `strong_share`), when learned.
    threshold: float | None = None
    calibration_scores: npt.NDArray[np.float64] | None = None
    router_version: str = "rule"
    length_version: str = "heuristic"
    # model_artifacts rows in force (None: a file, not a published row)
    router_row: int | None = None
    length_row: int | None = None
    router_needs_embedding: bool = False


@dataclass(frozen=True)
class LoadedRouter:
    router: Router
    threshold: float | None
    calibration_scores: npt.NDArray[np.float64] | None
    version: str


def rule_models(policy: Policy) -> RouteModels:
    """The untrained start: the prompt-length rule and the length heuristic."""
    config = policy.router
    rule = LongPromptRule(config.default_tier, config.large_tier, config.large_if_prompt_tokens_over)
    return RouteModels(router=rule, length=OutputLengthHeuristic())


def load_router(blob: bytes) -> LoadedRouter:
    """A trained router artifact; its score quantiles (kept at training) map `strong_share` to a threshold."""
    trained = LearnedRouter.from_bytes(blob)
    quantiles = trained.metadata.get("score_quantiles")
    scores = None if quantiles is None else np.asarray(quantiles, dtype=np.float64)
    return LoadedRouter(trained, trained.threshold, scores, trained.version)


def load_router_file(path: str | Path) -> LoadedRouter:
    return load_router(Path(path).read_bytes())


def load_length(blob: bytes) -> LengthModel:
    return LengthPredictor.from_bytes(blob, source="model_artifacts")


def with_router(
    models: RouteModels, loaded: LoadedRouter, stored: StoredModel | None, policy: Policy
) -> RouteModels:
    router = loaded.router
    if isinstance(router, LearnedRouter):  # the tiers it chooses between are the policy's
        router.small_tier, router.large_tier = policy.router.default_tier, policy.router.large_tier
    return replace(
        models,
        router=router,
        router_needs_embedding=True,
        threshold=loaded.threshold,
        calibration_scores=loaded.calibration_scores,
        router_version=loaded.version,
        router_row=None if stored is None else stored.id,
    )


def with_length(models: RouteModels, loaded: LengthModel, stored: StoredModel | None) -> RouteModels:
    return replace(
        models,
        length=loaded,
        length_version=getattr(loaded, "version", "heuristic"),
        length_row=None if stored is None else stored.id,
    )


def initial_models(policy: Policy, engine: sa.Engine) -> RouteModels:
    """What the gateway starts with: published rows win over the policy's file and the shipped artifacts."""
    models = rule_models(policy)
    length_row = artifacts.newest(engine, "length")
    try:
        models = with_length(models, load_length(length_row.artifact), length_row) if length_row else models
    except ValueError:
        log.exception("published length predictor (row %s) did not load; using the shipped one", length_row)
    if models.length_row is None:
        models = with_length(models, load_length_model(), None)
    if policy.router.kind == "rule":
        return models
    if policy.router.artifact is not None:  # a file the operator named: failing to load it is fatal
        return with_router(models, load_router_file(policy.router.artifact), None, policy)
    router_row = artifacts.newest(engine, "router")
    if router_row is not None:
        try:
            return with_router(models, load_router(router_row.artifact), router_row, policy)
        except ValueError:
            log.exception("published router (row %d) did not load; using the shipped one", router_row.id)
    return with_router(models, load_router_file(SHIPPED_ROUTER), None, policy)
