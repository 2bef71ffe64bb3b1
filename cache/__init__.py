"""Embedding, retrieval and the cache store: a plain library (no web framework, no globals)."""
