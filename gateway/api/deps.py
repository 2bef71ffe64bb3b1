"""What a handler may ask FastAPI for: the gateway, the caller's key, the authenticated tenant.

Declared once here so that no handler repeats how a key is read or checked. None of them adds a
parameter to the OpenAPI schema: they read the request itself, not declared headers.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from icgate.gateway.pipeline.authenticate import presented_key
from icgate.gateway.records import Tenant
from icgate.gateway.wiring import Gateway

# Dependencies are `async def`, though they never await: FastAPI runs a plain `def` dependency in its
# thread pool, a thread hop per dependency on every request.


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def bearer_token(request: Request) -> str | None:
    return presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))


BearerToken = Annotated[str | None, Depends(bearer_token)]


async def current_tenant(gw: GatewayDep, token: BearerToken) -> Tenant:
    """The pipeline's own authentication stage, for endpoints that do not run the whole pipeline: the
    same keys, the same 401s."""
    return await gw.pipeline.check_caller(token)


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
