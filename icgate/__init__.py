"""icgate, the OpenAI-compatible gateway, under one import name.

The repository keeps its parts as top-level folders (`gateway/`, `cache/`,
`routers/`, `lengths/`, `policies/`, `migrations/`); this package gathers them
under `icgate` (the folders here are links to them), so that an installed
icgate never puts generic names such as `gateway` or `cache` on a user's path.
`docs/architecture.md` draws the tree and its import rule.
"""

__version__ = "0.1.0"
