"""Writing a trained artifact, defined once for every library that saves one (hit verifier, router,
length predictor): they must not import each other, and each must never leave half a file where a
gateway loads it. Imports nothing of icgate's."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomically(path: str | Path, data: bytes) -> Path:
    """A temporary file beside `path`, then a rename: a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
