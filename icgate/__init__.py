"""icgate, the OpenAI-compatible gateway, under one import name.

The repository keeps its parts as top-level folders (`gateway/`, `cache/`,
`routers/`, `lengths/`, `policies/`, `migrations/`); this package gathers them
under `icgate` (the folders here are links to them), so that an installed
icgate never puts generic names such as `gateway` or `cache` on a user's path.
`docs/architecture.md` draws the tree and its import rule.

`icgate.Gateway` is the gateway in-process (docs/middleware.md). It is imported
on first use, so that `import icgate` stays cheap for code that needs only a part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from icgate.gateway.inprocess import Gateway

__version__ = "0.1.0"
__all__ = ["Gateway", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Gateway":
        from icgate.gateway.inprocess import Gateway

        return Gateway
    raise AttributeError(f"module 'icgate' has no attribute {name!r}")
