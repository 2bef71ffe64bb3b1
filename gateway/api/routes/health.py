"""Probes and metrics for the operator, not for OpenAI clients: no key is needed for any of them.

`/healthz` says the process answers; `/readyz` whether a load balancer should send it traffic;
`/metrics` is Prometheus's text format, left out of the OpenAPI schema.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from icgate.gateway.api.deps import GatewayDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(gw: GatewayDep) -> Response:
    """Ready once started and while at least one backend's circuit lets calls through: with every
    backend failing, a load balancer should send traffic to another replica (docs/backends.md)."""
    if not gw.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    backends = gw.admission.circuits()
    if not gw.admission.serving():
        return JSONResponse({"status": "unavailable", "backends": backends}, status_code=503)
    return JSONResponse({"status": "ready", "backends": backends})


@router.get("/metrics", include_in_schema=False)
async def metrics(gw: GatewayDep) -> Response:
    body, content_type = gw.telemetry.metrics.render()
    return Response(content=body, media_type=content_type)
