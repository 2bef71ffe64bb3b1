"""The gateway in-process: `Gateway` opens it in a Python process and wraps the user's openai clients."""

from icgate.gateway.inprocess.gateway import Gateway

__all__ = ["Gateway"]
