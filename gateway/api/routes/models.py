"""The model list: what a client may name in `model` (routed names, backends, the embedding model).

Listing needs a known caller (when the policy requires keys), as OpenAI's does.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends

from icgate.gateway.api.deps import GatewayDep, current_tenant

router = APIRouter(dependencies=[Depends(current_tenant)])


@router.get("/v1/models")
async def models(gw: GatewayDep) -> dict[str, Any]:
    created = int(time.time())
    names = [
        *gw.policy.routed_models,
        *(b.name for b in gw.policy.backends),
        gw.policy.embedding.served_name,
    ]
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": created, "owned_by": "icgate"} for n in names],
    }
