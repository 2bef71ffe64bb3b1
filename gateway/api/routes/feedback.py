"""Feedback on an answer: the signal that moves cache-entry utility and labels router training data.

A caller can only score its own requests: the cache entries are looked up in its tenant's namespace and
the route sample under its tenant.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from icgate.gateway.api.deps import CurrentTenant, GatewayDep
from icgate.gateway.api.schemas import FeedbackRequest
from icgate.gateway.errors import GatewayError
from icgate.gateway.records import namespace_for

router = APIRouter()


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, tenant: CurrentTenant, gw: GatewayDep) -> dict[str, Any]:
    """Moves the utility of the cache entries that served, helped or came from a request, and labels
    the request's route sample (router training data)."""
    labelled = await gw.label_route_sample(body.request_id, tenant, body.score)
    touched = None
    if gw.cache_entries is not None:
        touched = await gw.cache_entries.feedback(
            body.request_id, body.score, namespace_for(tenant), gw.past_usage
        )
    if touched is None and not labelled:
        raise GatewayError(404, f"No request '{body.request_id}' is known.", param="request_id")
    return {
        "object": "feedback",
        "request_id": body.request_id,
        "entries_updated": touched or 0,
        "route_sample_labelled": labelled,
    }
