"""Embeddings from the model the gateway runs itself (the policy's `embedding:`), not from a backend.

So no pipeline: no routing, cache or quotas apply. It still needs a known caller, and token-id inputs
are read with the served model's own tokenizer.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Depends, Request

from icgate.gateway.api.deps import GatewayDep, current_tenant
from icgate.gateway.api.schemas import EmbeddingRequest, reject_invalid_text
from icgate.gateway.errors import GatewayError
from icgate.gateway.wiring import Gateway

router = APIRouter(dependencies=[Depends(current_tenant)])


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, gw: GatewayDep) -> dict[str, Any]:
    if body.model != gw.policy.embedding.served_name:
        raise GatewayError(
            404,
            f"The model '{body.model}' does not exist. Embeddings are served by "
            f"'{gw.policy.embedding.served_name}'.",
            param="model",
            code="model_not_found",
        )
    await reject_invalid_text(request, body)
    texts = await embedding_texts(gw, body.input)
    vectors, tokens = await gw.embeddings.embed(texts)
    if body.dimensions is not None:
        if body.dimensions > vectors.shape[1]:
            raise GatewayError(400, f"dimensions must be at most {vectors.shape[1]}", param="dimensions")
        vectors = vectors[:, : body.dimensions]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return {
        "object": "list",
        "model": body.model,
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": encode_vector(v, body.encoding_format or "float"),
            }
            for i, v in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def embedding_texts(gw: Gateway, value: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    """The texts to embed: strings as given; token ids are read with the served model's own tokenizer."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif value and isinstance(value[0], int):
        items = [value]
    else:
        items = list(value)
    texts: list[str] = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            continue
        try:
            texts.append(await gw.embeddings.decode(item))
        except ValueError as exc:
            raise GatewayError(400, f"Invalid 'input': {exc}", param="input") from None
    if any(not t for t in texts):
        raise GatewayError(400, "input must not contain empty strings", param="input")
    return texts


def encode_vector(vector: npt.NDArray[np.floating[Any]], encoding_format: str) -> list[float] | str:
    """OpenAI's `base64` format is the little-endian float32 bytes; `float` a plain JSON list."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return [float(x) for x in vector]
