"""Stage 3, target: what the client asked for, a routed name (`auto`) or one backend by its name."""

from __future__ import annotations

from dataclasses import dataclass

from icgate.gateway.config import BackendConfig, Policy
from icgate.gateway.errors import GatewayError


@dataclass(frozen=True)
class Target:
    routed: bool
    backend: BackendConfig | None = None  # the backend a named request addresses

    @property
    def min_tier(self) -> str | None:
        """A request addressed to a backend is answered only at its tier or a better one."""
        return self.backend.tier if self.backend is not None else None


def resolve_target(model: str, policy: Policy) -> Target:
    if model in policy.routed_models:
        return Target(routed=True)
    backend = policy.backend(model)
    if backend is None:
        known = ", ".join([*policy.routed_models, *(b.name for b in policy.backends)])
        raise GatewayError(
            404,
            f"The model '{model}' does not exist. Available models: {known}.",
            param="model",
            code="model_not_found",
        )
    return Target(routed=False, backend=backend)
