"""/v1/embeddings, served by the gateway's own packaged MiniLM model."""

from __future__ import annotations

import base64
from collections.abc import Callable

import httpx
import numpy as np
import openai

from icgate.gateway.config import Policy
from tests.gateway.conftest import RunningGateway, Standins, standin_policy


def test_embeddings_with_the_openai_client(
    standins: Standins, start_gateway: Callable[[Policy], RunningGateway]
) -> None:
    gw = start_gateway(standin_policy(standins, embedding={"preload": True}))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-x", max_retries=0)
    resp = client.embeddings.create(
        model="all-MiniLM-L6-v2",
        input=[
            "How do I reset my password?",
            "I forgot my password, how can I change it?",
            "Best pizza in Rome",
        ],
    )
    vectors = np.array([d.embedding for d in resp.data], dtype=np.float32)
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
    assert resp.usage.prompt_tokens > 10

    # base64 (the openai client's default wire format) decodes to the same vector
    raw = httpx.post(
        gw.url + "/v1/embeddings",
        json={"model": "all-MiniLM-L6-v2", "input": "Best pizza in Rome", "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[2], atol=1e-5)

    short = client.embeddings.create(model="all-MiniLM-L6-v2", input="hello", dimensions=64)
    assert len(short.data[0].embedding) == 64
    assert abs(np.linalg.norm(short.data[0].embedding) - 1.0) < 1e-4

    bad = httpx.post(gw.url + "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"
    empty = httpx.post(gw.url + "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": [""]})
    assert empty.status_code == 400
    too_wide = httpx.post(
        gw.url + "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x", "dimensions": 999}
    )
    assert too_wide.status_code == 400 and too_wide.json()["error"]["param"] == "dimensions"
