"""The console's router page: the router in force, its training and held-out metrics, the quality vs
strong-share curve, the knob with its projection (apply it, roll it back), and the published versions (swap
to one).

JSON under `/admin/api/router` (in the schema) and the page at `/admin/router` (not): both read the same
`RouterView`. The projection is plain logic in `knob.py`; apply and roll back go through the gateway's live
policy (`gateway/live_policy.py`), and a swap publishes an older row again, which every replica loads.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

import yaml
from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response
from markupsafe import Markup
from pydantic import BaseModel, Field, model_validator

from icgate.gateway.admin import knob
from icgate.gateway.admin.api import engine_of
from icgate.gateway.admin.deps import Admin, AdminChange, CurrentAdmin, DbInt, GatewayDep, form_of
from icgate.gateway.admin.knob import Comparison, CurvePoint, Replayed, Setting
from icgate.gateway.admin.pages import base, render
from icgate.gateway.config import Policy
from icgate.gateway.errors import GatewayError
from icgate.gateway.live_policy import Applied, PolicyRejected
from icgate.gateway.pipeline.route import knob_of, threshold_for
from icgate.gateway.route_models import RouteModels, load_router
from icgate.gateway.store import artifacts
from icgate.gateway.store.artifacts import ModelInfo, ModelWatcher
from icgate.gateway.store.policy_versions import PolicyVersion
from icgate.gateway.store.request_log import scored_routes
from icgate.gateway.wiring import Gateway
from icgate.routers.learned import LearnedRouter

api = APIRouter(prefix="/admin/api/router", tags=["admin"])
page = APIRouter(prefix="/admin/router", include_in_schema=False)

KNOB_PATHS = ("router.threshold", "router.strong_share", "router.quality_value_usd")  # at most one set
HISTORY_SCAN = 30  # policy versions read for the knob's history
REQUESTS = Query(knob.DEFAULT_REQUESTS, ge=1, le=knob.MAX_REQUESTS, description="logged requests to replay")


# --- what the page shows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InForce:
    """The router in force on this replica, and the knob that turns its score into a tier."""

    kind: str  # learned | rule
    version: str
    row: int | None  # the model_artifacts row, None: a file
    source: str
    artifact_threshold: float | None  # the threshold calibrated into the artifact
    knob: str  # which decides: router.threshold | .strong_share | .quality_value_usd | calibrated
    knob_value: float | None
    threshold: float | None  # the threshold decisions use now (None: quality_value_usd decides)
    swap_blocked: str | None  # why versions cannot be swapped here, if they cannot


@dataclass(frozen=True)
class Training:
    """What the router in force was trained on and how it scored on held-out rows."""

    created_at: str | None
    calibration: str | None
    options: dict[str, Any]
    data: dict[str, Any]
    held_out: dict[str, Any]


@dataclass(frozen=True)
class Version:
    info: ModelInfo
    in_force: bool


@dataclass(frozen=True)
class KnobVersion:
    """A policy version, and the knob it set."""

    version: PolicyVersion
    setting: Setting | None  # None: its text did not read
    in_force: bool


@dataclass(frozen=True)
class RouterView:
    in_force: InForce
    training: Training | None
    versions: list[Version]
    history: list[KnobVersion]


def policy_of(gw: Gateway) -> Policy:
    """The policy requests are routed by now (the live policy swaps it)."""
    if not gw.ready:
        raise GatewayError(503, "The gateway is starting.", type="server_error")
    return gw.pipeline.policy


def models_of(gw: Gateway) -> RouteModels:
    return gw.pipeline.models


def swap_blocked(policy: Policy) -> str | None:
    config = policy.router
    if config.kind == "rule":
        return "The router is a rule (router.kind: rule): there is no trained model to swap."
    if config.artifact is not None:
        return (
            f"The policy names an artifact file (router.artifact: {config.artifact}): the gateway loads that "
            "file, never a published version. Remove router.artifact to use published versions."
        )
    return None


def in_force(policy: Policy, models: RouteModels) -> InForce:
    config = policy.router
    if config.kind == "rule":
        source = f"a rule: prompts over {config.large_if_prompt_tokens_over} tokens go to {config.large_tier}"
        return InForce("rule", "rule", None, source, None, "rule", None, None, swap_blocked(policy))
    if models.router_row is not None:
        source = f"published version, model_artifacts row {models.router_row}"
    elif config.artifact is not None:
        source = f"the policy's file {config.artifact}"
    else:
        source = "the artifact shipped with icgate"
    name, value = knob_of(config, models)
    return InForce(
        "learned",
        models.router_version,
        models.router_row,
        source,
        models.threshold,
        name,
        value,
        threshold_for(config, models),
        swap_blocked(policy),
    )


def training_of(models: RouteModels, row: ModelInfo | None) -> Training | None:
    """From the artifact's metadata (a file's or a row's), with the row's own training and metrics."""
    router = models.router
    if not isinstance(router, LearnedRouter):
        return None
    meta = router.metadata
    data = dict(meta.get("training") or {})
    held_out = dict(meta.get("held_out") or {})
    if row is not None:
        data = {**row.training, **data}
        held_out = (
            {**row.metrics.get("held_out", {}), **held_out} if isinstance(row.metrics, dict) else held_out
        )
    return Training(
        created_at=meta.get("created_at"),
        calibration=meta.get("calibration"),
        options=dict(meta.get("options") or {}),
        data=data,
        held_out=held_out,
    )


def knob_in(text: str) -> Setting | None:
    """The knob a policy text sets, read as the gateway reads a policy file (PyYAML's C loader: a
    fraction of a millisecond a text); None when the text does not read."""
    try:
        document = yaml.load(text, Loader=yaml.CSafeLoader)
    except yaml.YAMLError:
        return None
    section = document.get("router") if isinstance(document, dict) else None
    router: dict[str, Any] = section if isinstance(section, dict) else {}

    def num(key: str) -> float | None:
        value = router.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    return Setting(num("threshold"), num("strong_share"), num("quality_value_usd"))


def knob_history(versions: list[PolicyVersion], in_force_id: int | None) -> list[KnobVersion]:
    """The versions (newest first) that changed the knob, and the oldest one read (where the knob stood
    before them), from each text's `router` keys: whatever changed it (the knob, the editor, a rollback)."""
    settings = [knob_in(v.text) for v in versions]
    changes = [
        (version, setting)
        for i, (version, setting) in enumerate(zip(versions, settings, strict=True))
        if i + 1 == len(settings) or setting != settings[i + 1]
    ]
    # In force: the newest change at or before the version in force (later versions left the knob alone).
    current = next((v.id for v, _ in changes if in_force_id is not None and v.id <= in_force_id), None)
    return [KnobVersion(version, setting, version.id == current) for version, setting in changes]


async def published(gw: Gateway) -> tuple[list[ModelInfo], ModelInfo | None]:
    """The published routers, newest first, and the row in force among them (None: a file is)."""
    listed = await asyncio.to_thread(artifacts.list_models, engine_of(gw), "router")
    return listed, next((m for m in listed if m.id == models_of(gw).router_row), None)


async def view_of(gw: Gateway) -> RouterView:
    policy, models = policy_of(gw), models_of(gw)
    listed, row = await published(gw)
    versions = [Version(m, m.id == models.router_row) for m in listed]
    live = gw.live_policy
    history = await asyncio.to_thread(knob_history, await live.history(HISTORY_SCAN), live.in_force_id)
    return RouterView(in_force(policy, models), training_of(models, row), versions, history)


# --- the projection -----------------------------------------------------------------------------------------


def setting_of(threshold: float | None, strong_share: float | None) -> Setting | None:
    """The candidate a request names (None: the knob in force)."""
    if threshold is not None and strong_share is not None:
        raise GatewayError(400, "Give a threshold or a strong share, not both.", param="threshold")
    if threshold is None and strong_share is None:
        return None
    return Setting(threshold=threshold, strong_share=strong_share)


async def replayed_of(gw: Gateway, n: int) -> list[Replayed]:
    policy = policy_of(gw)
    if policy.router.kind == "rule":
        raise GatewayError(
            409,
            "The router is a rule (router.kind: rule): it gives no score to replay under another knob.",
            code="router_is_a_rule",
        )
    tiers = sorted({b.tier for b in policy.backends})
    rows = await asyncio.to_thread(scored_routes, engine_of(gw), tiers, n)
    return knob.replayable(rows)


async def comparison_of(gw: Gateway, candidate: Setting | None, n: int) -> Comparison:
    rows = await replayed_of(gw, n)
    policy, models = policy_of(gw), models_of(gw)
    try:
        return await asyncio.to_thread(knob.compare, rows, candidate, policy, models)
    except ValueError as exc:
        raise GatewayError(409, f"{exc}: send routed requests first.", param="strong_share") from exc


def plain(value: Any) -> Any:
    """JSON-ready: dataclasses as dicts, times as ISO text, no NaN, no numpy."""
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    tolist = getattr(value, "tolist", None)
    return plain(tolist()) if callable(tolist) else str(value)


def comparison_json(c: Comparison) -> dict[str, Any]:
    def projection(p: knob.Projection) -> dict[str, Any]:
        return {"setting": plain(p.setting), "threshold": p.threshold, **plain(p.outcome)}

    return {
        "requests": c.requests,
        "routers": c.routers,
        "logged": plain(c.logged),
        "current": projection(c.current),
        "candidate": projection(c.candidate),
    }


@dataclass(frozen=True)
class Curves:
    projected: list[CurvePoint]
    held_out_group: str
    held_out: list[CurvePoint]
    held_out_curve_stored: bool


def curves_of(rows: list[Replayed], policy: Policy, training: Training | None) -> Curves:
    projected = knob.curve(rows, policy.router, knob.Tiers.of(policy))
    held = training.held_out if training is not None else {}
    group, measured = knob.held_out_points(held)
    stored = isinstance((held.get(group) or {}).get("curve"), list)
    return Curves(projected, group, measured, stored)


# --- the JSON API -------------------------------------------------------------------------------------------


def version_json(v: PolicyVersion) -> dict[str, Any]:
    out = plain(v)
    out.pop("text", None)
    return dict(out)


@api.get("")
async def router_view(gw: GatewayDep, _admin: CurrentAdmin) -> dict[str, Any]:
    """The router in force (version, row, the knob that sets its threshold), its training and held-out
    metrics, the published versions (newest first, the one in force marked) and the knob's history."""
    view = await view_of(gw)
    return {
        "router": plain(view.in_force),
        "training": plain(view.training),
        "versions": [{**plain(v.info), "in_force": v.in_force} for v in view.versions],
        "knob_history": [
            {**version_json(h.version), "setting": plain(h.setting), "in_force": h.in_force}
            for h in view.history
        ],
    }


@api.get("/projection")
async def projection(
    gw: GatewayDep,
    _admin: CurrentAdmin,
    threshold: Annotated[float | None, Query(ge=0, le=1, description="candidate threshold")] = None,
    strong_share: Annotated[float | None, Query(ge=0, le=1, description="candidate share for large")] = None,
    n: int = REQUESTS,
) -> dict[str, Any]:
    """The last `n` logged routed requests with a router score, decided again under a candidate threshold or
    strong share, beside the knob in force and what was logged: large share, cost, expected quality."""
    return comparison_json(await comparison_of(gw, setting_of(threshold, strong_share), n))


@api.get("/curve")
async def curve(gw: GatewayDep, _admin: CurrentAdmin, n: int = REQUESTS) -> dict[str, Any]:
    """Expected quality and cost against the share sent to the large tier, on the last `n` routed requests;
    and the held-out points the training kept (a full held-out curve only when one is stored)."""
    rows = await replayed_of(gw, n)
    training = training_of(models_of(gw), (await published(gw))[1])
    curves = await asyncio.to_thread(curves_of, rows, policy_of(gw), training)
    return {**plain(curves), "requests": len(rows)}


class KnobChange(BaseModel):
    """A new knob position: a threshold, or a share for the large tier (applied as the threshold that sends
    that share of the last `n` routed requests large)."""

    threshold: float | None = Field(None, ge=0, le=1)
    strong_share: float | None = Field(None, ge=0, le=1)
    n: int = Field(knob.DEFAULT_REQUESTS, ge=1, le=knob.MAX_REQUESTS)
    note: str = Field("", max_length=500)

    @model_validator(mode="after")
    def _one(self) -> KnobChange:
        if (self.threshold is None) == (self.strong_share is None):
            raise ValueError("give exactly one of threshold and strong_share")
        return self


class Rollback(BaseModel):
    version_id: DbInt = Field(ge=1)


async def apply_knob(gw: Gateway, admin: Admin, change: KnobChange) -> tuple[Applied, Comparison]:
    """Project the change, then apply it as a threshold through the live policy."""
    comparison = await comparison_of(gw, setting_of(change.threshold, change.strong_share), change.n)
    candidate = comparison.candidate
    assert candidate.threshold is not None  # a threshold or a strong share always maps to one
    threshold = candidate.threshold  # unrounded: a share's threshold sits between two neighbouring scores
    got = candidate.outcome
    note = (
        f"{candidate.setting.describe()} on the last {comparison.requests} routed requests"
        + (f" = threshold {threshold:.4f}" if change.strong_share is not None else "")
        + f": projected large share {got.large_share:.1%}, cost ${got.cost_usd:.4f}, "
        f"expected quality {got.expected_quality:.3f}" + (f". {change.note}" if change.note else "")
    )
    changes: dict[str, Any] = {**dict.fromkeys(KNOB_PATHS), "router.threshold": threshold}  # one knob
    try:
        applied = await gw.live_policy.apply_changes(changes, admin.who, "router-knob", note)
    except PolicyRejected as exc:
        raise GatewayError(400, f"The policy refused the change: {exc}", param="threshold") from exc
    return applied, comparison


async def roll_back(gw: Gateway, admin: Admin, version_id: int) -> Applied:
    policy_of(gw)  # started (the live policy too)
    try:
        return await gw.live_policy.rollback(version_id, admin.who)
    except PolicyRejected as exc:
        raise GatewayError(400, f"The policy refused the rollback: {exc}", param="version_id") from exc


@api.post("/apply")
async def apply(body: KnobChange, gw: GatewayDep, admin: AdminChange) -> dict[str, Any]:
    """Apply a knob position: the policy's `router.threshold` is set (its other knobs cleared) as a new
    policy version, in force from the next request on every replica."""
    applied, comparison = await apply_knob(gw, admin, body)
    return {
        "version": version_json(applied.version),
        "in_force": applied.in_force,
        "projection": comparison_json(comparison),
    }


@api.post("/rollback")
async def rollback(body: Rollback, gw: GatewayDep, admin: AdminChange) -> dict[str, Any]:
    """Apply an earlier policy version again (its knob among the rest), as a new version."""
    applied = await roll_back(gw, admin, body.version_id)
    return {"version": version_json(applied.version), "in_force": applied.in_force}


def router_watcher(gw: Gateway) -> ModelWatcher[Any] | None:
    return next((w for w in gw.watchers if w.kind == "router"), None)


@dataclass(frozen=True)
class Swapped:
    row: int  # the new row, a copy of `from_row`
    from_row: int
    version: str
    in_force: bool  # on this replica, now
    router_version: str  # the router in force on this replica


async def swap_to(gw: Gateway, row_id: int) -> Swapped:
    """Publish row `row_id`'s artifact again (the newest row is the one every replica loads), and have this
    replica's watcher take it at once; the others follow at their next poll."""
    blocked = swap_blocked(policy_of(gw))
    if blocked is not None:
        raise GatewayError(409, blocked, code="swap_unavailable")
    engine = engine_of(gw)
    old = await asyncio.to_thread(artifacts.stored, engine, row_id)
    if old is None or old.kind != "router":
        raise GatewayError(404, f"No published router in row {row_id}.", type="not_found_error")
    try:
        await asyncio.to_thread(load_router, old.artifact)
    except ValueError as exc:
        raise GatewayError(400, f"Row {row_id} does not load as a router: {exc}", param="row_id") from exc
    watcher = router_watcher(gw)
    if watcher is None:
        raise GatewayError(409, "This gateway does not watch for published routers.", code="swap_unavailable")
    new_row = await asyncio.to_thread(artifacts.republish, engine, row_id)
    await watcher.check()
    models = models_of(gw)
    return Swapped(new_row, row_id, old.version, models.router_row == new_row, models.router_version)


@api.post("/versions/{row_id}/swap")
async def swap(row_id: DbInt, gw: GatewayDep, _admin: AdminChange) -> dict[str, Any]:
    """Make a published router version the one in force again (as a new row: every replica loads it)."""
    return dict(plain(await swap_to(gw, row_id)))


# --- the page -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnobForm:
    """The knob as the page's form holds it: which setting, its value (None: where the knob stands now),
    how many requests."""

    mode: str  # threshold | strong_share
    value: float | None
    n: int

    def setting(self) -> Setting | None:
        if self.value is None:
            return None
        return Setting(threshold=self.value) if self.mode == "threshold" else Setting(strong_share=self.value)

    def shown(self, comparison: Comparison | None) -> float:
        """The value the range input shows: the one asked for, else the knob in force as this mode reads."""
        if self.value is not None:
            return self.value
        if comparison is None:
            return 0.5
        if self.mode == "strong_share":
            return comparison.current.outcome.large_share
        return comparison.current.threshold if comparison.current.threshold is not None else 0.5


def form_from(params: dict[str, str], policy: Policy) -> KnobForm:
    """The page's knob from its query (`mode` and `value`, or `threshold=` / `strong_share=`) or its form.
    Raises ValueError with a sentence for a person."""
    raw_n = params.get("n") or str(knob.DEFAULT_REQUESTS)
    try:
        n = int(raw_n)
    except ValueError:
        raise ValueError(f"The number of requests must be a whole number, not {raw_n!r}.") from None
    if not 1 <= n <= knob.MAX_REQUESTS:
        raise ValueError(f"The number of requests must be between 1 and {knob.MAX_REQUESTS}.")
    mode, raw = params.get("mode") or "", params.get("value") or ""
    for name in ("threshold", "strong_share"):
        if params.get(name):
            mode, raw = name, params[name]
    if mode not in ("threshold", "strong_share", ""):
        raise ValueError("The knob is a threshold or a strong share.")
    mode = mode or ("strong_share" if policy.router.strong_share is not None else "threshold")
    if not raw:
        return KnobForm(mode, None, n)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"The knob's value must be a number between 0 and 1, not {raw!r}.") from None
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise ValueError(f"The knob's value must be between 0 and 1, not {raw}.")
    return KnobForm(mode, value, n)


async def page_context(gw: Gateway, params: dict[str, str]) -> tuple[dict[str, Any], int]:
    """Everything the page shows, and its status (400 when the knob's input was refused)."""
    policy, models = policy_of(gw), models_of(gw)
    view = await view_of(gw)
    error: str | None = None
    status = 200
    try:
        form = form_from(params, policy)
    except ValueError as exc:
        error, status = str(exc), 400
        form = form_from({}, policy)
    rows: list[Replayed] = []
    comparison: Comparison | None = None
    curves = Curves([], "", [], False)
    if policy.router.kind != "rule":
        rows = await replayed_of(gw, form.n)
        try:
            comparison = await asyncio.to_thread(knob.compare, rows, form.setting(), policy, models)
        except ValueError as exc:
            error, status = f"{exc}: send routed requests first.", 400
            form = KnobForm(form.mode, None, form.n)
            comparison = await asyncio.to_thread(knob.compare, rows, None, policy, models)
        curves = await asyncio.to_thread(curves_of, rows, policy, view.training)
    marks: dict[str, CurvePoint] = {}
    if comparison is not None and comparison.requests:
        for name, p in (("current", comparison.current), ("candidate", comparison.candidate)):
            marks[name] = CurvePoint(p.outcome.large_share, p.outcome.expected_quality)
    frame = knob.frame_for(curves.projected, curves.held_out)
    chart = knob.curve_chart(curves.projected, curves.held_out, marks, frame) if curves.projected else ""
    context = {
        "view": view,
        "policy": policy,
        "comparison": comparison,
        "form": form,
        "knob_value": form.shown(comparison),
        # Where the candidate stands, for the page's script (it converts between the two settings).
        "initial": {
            "candidate": {
                "threshold": comparison.candidate.threshold,
                "large_share": comparison.candidate.outcome.large_share,
            }
        }
        if comparison is not None
        else None,
        "curves": curves,
        "chart": Markup(chart),
        "error": error,
        "max_requests": knob.MAX_REQUESTS,
    }
    return context, status


NOTICES = {
    "applied": "Applied as policy version {}: in force from the next request.",
    "rolled_back": "Rolled back: policy version {} is in force.",
    "swapped": "Swapped: router row {} is in force.",
}


@page.get("")
async def router_page(request: Request, gw: GatewayDep, admin: CurrentAdmin) -> Response:
    params = dict(request.query_params)
    context, status = await page_context(gw, params)
    notice = next(
        (text.format(params[k]) for k, text in NOTICES.items() if params.get(k, "").isdigit()), None
    )
    return render(request, "router.html", status, admin=admin, notice=notice, **context)


async def page_error(request: Request, gw: Gateway, admin: Admin, exc: GatewayError) -> Response:
    context, _ = await page_context(gw, {})
    return render(
        request, "router.html", exc.status_code, admin=admin, notice=None, **{**context, "error": exc.message}
    )


@page.post("/apply")
async def apply_page(request: Request, gw: GatewayDep, admin: AdminChange) -> Response:
    form = await form_of(request)
    try:
        chosen = form_from(form, policy_of(gw))
        if chosen.value is None:
            raise ValueError("Choose a threshold or a strong share to apply.")
        change = KnobChange(
            threshold=chosen.value if chosen.mode == "threshold" else None,
            strong_share=chosen.value if chosen.mode == "strong_share" else None,
            n=chosen.n,
            note=form.get("note", "")[:500],
        )
        applied, _ = await apply_knob(gw, admin, change)
    except ValueError as exc:
        return await page_error(request, gw, admin, GatewayError(400, str(exc)))
    except GatewayError as exc:
        return await page_error(request, gw, admin, exc)
    query = urlencode(
        {"applied": applied.version.id, "mode": chosen.mode, "value": chosen.value, "n": chosen.n}
    )
    return RedirectResponse(f"{base(request)}/router?{query}", status_code=303)


@page.post("/rollback/{version_id}")
async def rollback_page(version_id: DbInt, request: Request, gw: GatewayDep, admin: AdminChange) -> Response:
    try:
        applied = await roll_back(gw, admin, version_id)
    except GatewayError as exc:
        return await page_error(request, gw, admin, exc)
    return RedirectResponse(f"{base(request)}/router?rolled_back={applied.version.id}", status_code=303)


@page.post("/versions/{row_id}/swap")
async def swap_page(row_id: DbInt, request: Request, gw: GatewayDep, admin: AdminChange) -> Response:
    try:
        swapped = await swap_to(gw, row_id)
    except GatewayError as exc:
        return await page_error(request, gw, admin, exc)
    return RedirectResponse(f"{base(request)}/router?swapped={swapped.row}", status_code=303)
