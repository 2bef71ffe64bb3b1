"""Stage 7 for a caller that calls the backend itself (LiteLLM's router, in-process): instead of a slot
and a call, advice. A cache hit is the answer; otherwise the backend of the routed tier that admission
would place the request on, and the request as that backend should get it (examples prepended for the
small tier). The caller reports the outcome (`Pipeline.settle`), which the record stage records as it
records the pipeline's own calls.

What advice cannot give: admission holds no slot for a call it does not make (it only chooses where the
load is lowest by its own measure), there is no fallback (the caller retries as it likes), and streams
are the caller's to relay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from icgate.gateway.backends.admission import Admission, AdmissionRefused, BackendUnavailable
from icgate.gateway.config import BackendConfig
from icgate.gateway.pipeline.call import CallPlan
from icgate.gateway.pipeline.record import Trail
from icgate.gateway.records import RequestContext


@dataclass(frozen=True)
class Advice:
    ctx: RequestContext
    trail: Trail
    # A cache hit: the answer, already recorded. Otherwise None, and `backend` and `body` say where and what.
    response: dict[str, Any] | None = None
    backend: BackendConfig | None = None
    body: dict[str, Any] | None = None


def advised_backend(admission: Admission, plan: CallPlan) -> BackendConfig:
    """Where admission would place the request (without holding a slot), else the tier's first backend."""
    try:
        backend, _ = admission.place(plan.ask, plan.candidates, [])
    except (AdmissionRefused, BackendUnavailable):
        return plan.candidates[0]
    return backend
