"""Routing decisions: which tier should answer a request.

A plain library: features in, a decision with its reasons out. The contract follows RouteLLM's: a router
scores a request; thresholds and the tiers it chooses between are configuration, so routers stay
comparable. Import from the modules: `base` (the contract), `rules`, `learned` and `decide` (request
time), `data`, `evaluation` and `training` (offline only).
"""
