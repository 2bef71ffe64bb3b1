"""The learned parts in force, the router and the length predictors, as one `RouteModels` record: which
ones the gateway starts with, and the records that replace them when `icgate router train` / `icgate
length train` publish newer ones, or the length refit publishes a backend's own predictor (the watchers in
`gateway.store.artifacts` call `with_router` / `with_length` / `with_backend_length`, through
`Pipeline.swap_models`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from icgate.gateway.config import Policy
from icgate.gateway.store import artifacts
from icgate.gateway.store.artifacts import StoredModel
from icgate.gateway.store.length_learning import length_kind
from icgate.lengths.predict import LengthModel, LengthPredictor, OutputLengthHeuristic, load_length_model
from icgate.routers.base import Router
from icgate.routers.learned import DEFAULT_ARTIFACT, LearnedRouter
from icgate.routers.rules import LongPromptRule

SHIPPED_ROUTER = DEFAULT_ARTIFACT
log = logging.getLogger("icgate.route_models")


@dataclass(frozen=True)
class BackendLength:
    """A backend's own length predictor in force: fitted on `answers` of that backend's answers."""

    model: LengthModel
    version: str
    answers: int
    row: int | None = None


@dataclass(frozen=True)
class RouteModels:
    """The router and length predictors in force, with what identifies and calibrates them."""

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
    # Backends' own length predictors (`lengths.min_rows` answers or more); the others get `length`.
    backend_lengths: Mapping[str, BackendLength] = field(default_factory=lambda: MappingProxyType({}))


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


def with_backend_length(
    models: RouteModels, backend: str, loaded: LengthModel, stored: StoredModel | None, policy: Policy
) -> RouteModels:
    """`backend`'s own predictor in force, if it was fitted on at least `lengths.min_rows` answers (a
    predictor published under a lower setting waits for the next, larger refit)."""
    summary = getattr(loaded, "summary", {}) or {}
    answers = int(summary.get("rows") or 0)
    if answers < policy.lengths.min_rows:
        log.info(
            "length predictor for backend %s fitted on %d answers (< lengths.min_rows %d): not used",
            backend,
            answers,
            policy.lengths.min_rows,
        )
        return models
    own = BackendLength(
        loaded, getattr(loaded, "version", "?"), answers, None if stored is None else stored.id
    )
    return replace(models, backend_lengths=MappingProxyType({**models.backend_lengths, backend: own}))


def load_backend_length(engine: sa.Engine, backend: str) -> tuple[LengthModel, StoredModel] | None:
    """The newest published predictor of `backend`, loaded; None when there is none or it does not load."""
    row = artifacts.newest(engine, length_kind(backend))
    if row is None:
        return None
    try:
        return load_length(row.artifact), row
    except ValueError:
        log.exception(
            "length predictor of backend %s (row %d) did not load; using the shared one", backend, row.id
        )
        return None


def initial_models(policy: Policy, engine: sa.Engine) -> RouteModels:
    """What the gateway starts with: published rows win over the policy's file and the shipped artifacts;
    each backend's own length predictor, where one is published and fitted on enough answers."""
    models = _shared_models(policy, engine)
    for backend in policy.backends:
        published = load_backend_length(engine, backend.name)
        if published is not None:
            models = with_backend_length(models, backend.name, published[0], published[1], policy)
    return models


def _shared_models(policy: Policy, engine: sa.Engine) -> RouteModels:
    """The router and the shared length predictor."""
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
