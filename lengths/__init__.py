"""Output-length prediction: how long a request's answer will be, before any token is generated.

A plain library: `predict` at request time, `training` offline (it imports `predict`, never the reverse).
"""
