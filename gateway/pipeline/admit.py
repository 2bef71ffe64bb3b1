"""Stage 6, admit: what admission is asked (the sizes, the class's objectives) and where a request may
go. Placing it on a backend, queueing and circuit state live in `gateway.backends.admission`; the
call stage asks it for a slot for each attempt."""

from __future__ import annotations

from icgate.gateway.backends.admission import AdmissionRefused, Ask, BackendUnavailable
from icgate.gateway.config import BackendConfig, Policy, PriorityClass
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline.route import RouteOutcome
from icgate.gateway.pipeline.target import Target
from icgate.gateway.records import RequestContext

REFUSED_HEADER = "x-icgate-refused"


def priority_of(ctx: RequestContext, policy: Policy) -> tuple[str | None, PriorityClass]:
    return policy.admission.priority_of(ctx.tenant.name)


def ask_for(ctx: RequestContext, routed: RouteOutcome, cls: PriorityClass) -> Ask:
    """Sizes (the prompt estimate, the predicted output: the shared prediction, and each backend's own
    where it has one, which admission uses for that backend: `Ask.on`) and the class's objectives."""
    return Ask(
        prompt_tokens=routed.prompt_tokens,
        output_tokens=routed.predicted.p50,
        output_tokens_p90=routed.predicted.p90,
        rank=cls.rank,
        ttft_slo_s=cls.ttft_slo_ms / 1000 if cls.ttft_slo_ms else None,
        tpot_slo_s=cls.tpot_slo_ms / 1000 if cls.tpot_slo_ms else None,
        arrived=ctx.arrived,
        outputs_by_backend={name: (e.p50, e.p90) for name, e in routed.per_backend.items()},
    )


def candidates_for(target: Target, tier: str, policy: Policy) -> list[BackendConfig]:
    """The backends that may serve the request: the one it names, else its tier's."""
    if target.backend is not None:
        return [target.backend]
    backends = policy.tier(tier)
    if not backends:
        raise GatewayError(503, f"no backend serves tier '{tier}'", type="server_error")
    return backends


def spill_candidates(target: Target, tier: str, policy: Policy) -> list[BackendConfig]:
    """Where a routed request may go when its tier cannot meet the objective: the other tiers."""
    if target.backend is not None or not policy.admission.spill:
        return []
    return [b for b in policy.backends if b.tier != tier]


def refusal(refused: AdmissionRefused) -> GatewayError:
    """OpenAI's 429 (`rate_limit_error`, `code: backend_at_capacity`), whenever it came; the header
    `x-icgate-refused` says when: `arrival` (it waited for nothing) or `queued` (after waiting in the
    queue: the prediction that it could wait was wrong)."""
    return GatewayError(
        429,
        f"{refused.reason}; retry later.",
        type="rate_limit_error",
        code="backend_at_capacity",
        headers={"retry-after": str(int(refused.retry_after_s)), REFUSED_HEADER: refused.stage},
    )


def unavailable(down: BackendUnavailable) -> GatewayError:
    return GatewayError(
        503,
        f"The {down}; retry later.",
        type="server_error",
        code="backend_unavailable",
        headers={"retry-after": str(int(down.retry_after_s))},
    )
