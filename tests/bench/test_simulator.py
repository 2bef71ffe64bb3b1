"""The vLLM-like simulator: OpenAI API shape, continuous-batching timing, capacity limits, /metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.simulator import Engine, EngineConfig, Simulator, count_prompt_tokens, running_simulator
from bench.simulator.__main__ import build_parser, config_from_args

# Fast enough for tests; cheap prefill so only decode shapes the timing unless a test says otherwise.
FAST = EngineConfig(
    max_num_seqs=8,
    kv_cache_tokens=10_000,
    prefill_ms_per_token=0.001,
    prefill_ms_base=0.5,
    decode_ms_base=2.0,
    decode_ms_per_seq=0.1,
    default_max_tokens=7,
)


def words(n: int) -> str:
    return " ".join(["w"] * n)


def chat_body(prompt_words: int = 5, **extra: Any) -> dict[str, Any]:
    return {"model": "sim", "messages": [{"role": "user", "content": words(prompt_words)}], **extra}


@pytest.fixture
def serve() -> Iterator[Any]:
    """Start simulators on loopback for one test; all are stopped at its end."""
    stack: list[Any] = []

    def start(config: EngineConfig, **kwargs: Any) -> tuple[Simulator, str]:
        sim = Simulator(config, model_name="sim-test", **kwargs)
        ctx = running_simulator(sim)
        url = ctx.__enter__()
        stack.append(ctx)
        return sim, url

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


async def read_sse(response: httpx.Response) -> list[Any]:
    events: list[Any] = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def metrics(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    text = (await client.get(url + "/metrics")).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("model_name") == "sim-test"
    }


async def wait_until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_prompt_tokens_are_words_across_all_messages() -> None:
    messages = [
        {"role": "system", "content": "be  brief\nplease"},
        {"role": "user", "content": [{"type": "text", "text": "one two"}, {"type": "image_url"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "three"},
    ]
    assert count_prompt_tokens(messages) == 6


async def test_plain_answer_has_max_tokens_words_and_usage(serve: Any) -> None:
    sim, url = serve(FAST)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        body = chat_body(prompt_words=5, max_tokens=12)
        body["messages"].append({"role": "user", "content": [{"type": "text", "text": "x y z"}]})
        data = (await client.post("/v1/chat/completions", json=body)).json()
        choice = data["choices"][0]
        assert data["object"] == "chat.completion"
        assert choice["message"] == {"role": "assistant", "content": words(12).replace("w", "tok")}
        assert choice["finish_reason"] == "length"
        assert data["usage"] == {"prompt_tokens": 8, "completion_tokens": 12, "total_tokens": 20}

        alt = (await client.post("/v1/chat/completions", json=chat_body(max_completion_tokens=3))).json()
        assert alt["usage"]["completion_tokens"] == 3
        default = (await client.post("/v1/chat/completions", json=chat_body())).json()
        assert len(default["choices"][0]["message"]["content"].split()) == FAST.default_max_tokens
    assert sim.engine.requests_served == 3


async def test_stream_has_max_tokens_words_in_few_chunks_and_usage(serve: Any) -> None:
    _, url = serve(FAST, stream_interval_ms=50)
    body = chat_body(prompt_words=9, max_tokens=100, stream=True, stream_options={"include_usage": True})
    async with (
        httpx.AsyncClient(base_url=url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        events = await read_sse(response)
    assert events[-1] == "[DONE]"
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 9, "completion_tokens": 100, "total_tokens": 109}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.split() == ["tok"] * 100
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    # ~100 decode steps take >= 200 ms; at one chunk per 50 ms that is far fewer chunks than tokens.
    assert len(chunks) < 50


async def test_stream_without_include_usage_has_no_usage_chunk(serve: Any) -> None:
    _, url = serve(FAST)
    async with (
        httpx.AsyncClient(base_url=url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=chat_body(max_tokens=4, stream=True)) as response,
    ):
        events = await read_sse(response)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])


async def test_batch_never_exceeds_max_num_seqs(serve: Any) -> None:
    config = replace(FAST, max_num_seqs=4)
    sim, url = serve(config)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        replies = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=chat_body(max_tokens=40)) for _ in range(12))
        )
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in replies)
    assert sim.engine.max_running_seen == 4
    assert sim.engine.requests_served == 12
    # Twelve requests through four slots: some had to wait for a slot to free.
    admitted_late = [s for s in sim.engine.finished if s.admitted_at and s.admitted_at - s.arrived_at > 0.03]
    assert admitted_late


async def test_kv_limit_makes_a_request_wait_until_capacity_frees(serve: Any) -> None:
    # Each request reserves 100 + 100 KV tokens; 300 hold only one, though there are 8 slots.
    config = replace(FAST, kv_cache_tokens=300, decode_ms_base=4.0)
    sim, url = serve(config)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        first = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(100, max_tokens=100)))
        await wait_until(lambda: sim.engine.num_running == 1)
        second = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(100, max_tokens=100)))
        await wait_until(lambda: sim.engine.num_waiting == 1)
        seen = await metrics(client, url)
        assert seen["vllm:num_requests_waiting"] == 1
        assert seen["vllm:num_requests_running"] == 1
        assert seen["vllm:gpu_cache_usage_perc"] == pytest.approx(200 / 300)
        replies = await asyncio.gather(first, second)
    assert [r.json()["usage"]["completion_tokens"] for r in replies] == [100, 100]
    a, b = sorted(sim.engine.finished, key=lambda s: s.id)
    assert a.finished_at is not None and b.admitted_at is not None
    assert b.admitted_at >= a.finished_at
    assert sim.engine.max_running_seen == 1


async def test_admission_is_fcfs_and_stops_at_the_first_that_does_not_fit() -> None:
    engine = Engine(replace(FAST, kv_cache_tokens=1000))
    engine.start()
    try:
        a, b, c = engine.submit(400, 100), engine.submit(500, 100), engine.submit(10, 10)
        assert engine._admit() == [a]  # b does not fit next to a, and c may not overtake b
        assert engine.num_waiting == 2
        assert engine.kv_usage == pytest.approx(0.5)
        engine.abort(a)
        assert engine._admit() == [b, c]
    finally:
        await engine.stop()


async def test_prefill_budget_spreads_a_burst_over_iterations() -> None:
    engine = Engine(replace(FAST, max_prefill_tokens=250))
    engine.start()
    try:
        seqs = [engine.submit(100, 10) for _ in range(4)]
        assert engine._admit() == seqs[:2]
        assert engine._admit() == seqs[2:]
        big = engine.submit(1000, 10)  # larger than the budget alone: still admitted, or it would starve
        assert engine._admit() == [big]
    finally:
        await engine.stop()


async def run_alone_and_batched(engine: Engine, prompt: int, tokens: int, batch: int) -> tuple[float, float]:
    """Mean time per output token of one sequence alone, then of `batch` sequences together."""

    def tpot(seqs: list[Any]) -> float:
        return sum((s.finished_at - s.first_token_at) / (s.generated - 1) for s in seqs) / len(seqs)

    alone = engine.submit(prompt, tokens)
    await alone.wait_done()
    together = [engine.submit(prompt, tokens) for _ in range(batch)]
    for seq in together:
        await seq.wait_done()
    return tpot([alone]), tpot(together)


async def test_decode_is_slower_per_token_in_a_bigger_batch() -> None:
    config = replace(FAST, decode_ms_base=2.0, decode_ms_per_seq=1.0)
    assert config.decode_step_ms(16) == pytest.approx(6 * config.decode_step_ms(1), rel=0.01)
    engine = Engine(config)
    engine.start()
    try:
        alone, batched = await run_alone_and_batched(engine, prompt=10, tokens=30, batch=8)
    finally:
        await engine.stop()
    # Computed: 3 ms vs 10 ms per token. Sleep overshoot only narrows the gap a little.
    assert batched > 2 * alone
    assert engine.max_running_seen == 8


async def test_prefill_takes_longer_for_longer_prompts() -> None:
    config = replace(FAST, prefill_ms_per_token=0.1, prefill_ms_base=1.0)
    assert config.prefill_ms(3000) == pytest.approx(301.0)
    engine = Engine(config)
    engine.start()
    try:
        short = engine.submit(20, 1)
        await short.wait_done()
        long = engine.submit(3000, 1)
        await long.wait_done()
    finally:
        await engine.stop()
    assert short.first_token_at is not None and long.first_token_at is not None
    ttft_short, ttft_long = short.first_token_at - short.arrived_at, long.first_token_at - long.arrived_at
    assert ttft_long > 0.25  # 301 ms computed; sleeps never end early
    assert ttft_long > 5 * ttft_short  # 3 ms computed
    assert engine.prompt_tokens_total == 3020


async def test_metrics_use_vllm_names_and_count_tokens(serve: Any) -> None:
    _, url = serve(FAST)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        await client.post("/v1/chat/completions", json=chat_body(prompt_words=11, max_tokens=6))
        await client.post("/v1/chat/completions", json=chat_body(prompt_words=4, max_tokens=3, stream=True))
        response = await client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
        seen = await metrics(client, url)
    assert families["vllm:num_requests_running"] == "gauge"
    assert families["vllm:num_requests_waiting"] == "gauge"
    assert families["vllm:gpu_cache_usage_perc"] == "gauge"
    assert families["vllm:prompt_tokens"] == "counter"
    assert families["vllm:generation_tokens"] == "counter"
    assert seen["vllm:prompt_tokens_total"] == 15
    assert seen["vllm:generation_tokens_total"] == 9
    assert seen["vllm:num_requests_running"] == 0
    assert seen["vllm:gpu_cache_usage_perc"] == 0


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_frees_the_slot(serve: Any, stream: bool) -> None:
    # One slot and a 10 s answer: only an abort lets the next request run.
    config = replace(FAST, max_num_seqs=1, decode_ms_base=10.0)
    sim, url = serve(config)
    body = chat_body(max_tokens=1000, stream=stream)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        if stream:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break
        else:
            pending = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            await wait_until(lambda: sim.engine.num_running == 1)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
        await wait_until(lambda: sim.engine.num_running == 0, timeout_s=3)
        assert sim.engine.requests_aborted == 1
        assert sim.engine.kv_used == 0
        reply = await client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    assert reply.json()["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b"{not json", None),
        (json.dumps({"model": "sim"}).encode(), "messages"),
        (json.dumps({"messages": "hi"}).encode(), "messages"),
        (json.dumps(chat_body(max_tokens=0)).encode(), "max_tokens"),
        (json.dumps(chat_body(max_tokens="10")).encode(), "max_tokens"),
        (json.dumps(chat_body(prompt_words=9000, max_tokens=2000)).encode(), "max_tokens"),
    ],
)
async def test_bad_input_is_a_400_with_an_openai_error(serve: Any, content: bytes, param: str | None) -> None:
    sim, url = serve(FAST)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert sim.engine.num_waiting == sim.engine.num_running == 0


async def test_models_and_health(serve: Any) -> None:
    _, url = serve(FAST)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["sim-test"]
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/healthz")).status_code == 200


def test_cli_overrides_a_preset() -> None:
    args = build_parser().parse_args(["--preset", "large", "--max-num-seqs", "8", "--decode-ms-base", "5"])
    config = config_from_args(args)
    assert config == EngineConfig.large(max_num_seqs=8, decode_ms_base=5.0)
    assert (
        config.kv_cache_tokens == EngineConfig.large().kv_cache_tokens != EngineConfig.small().kv_cache_tokens
    )
