"""The simulator's out-of-band lengths: a known conversation is answered with its recorded length and charged
its recorded prompt tokens; anything else is served as before; the lookups are counted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import free_port
from bench.simulator import EngineConfig, KnownLength, LengthBook, Simulator, prompt_key, running_simulator

FAST = EngineConfig(
    max_num_seqs=8,
    kv_cache_tokens=10_000,
    prefill_ms_per_token=0.001,
    prefill_ms_base=0.5,
    decode_ms_base=1.0,
    decode_ms_per_seq=0.1,
    default_max_tokens=7,
)
KNOWN = [{"role": "user", "content": "Natalia sold clips to 48 of her friends. How many clips did she sell?"}]
FOLLOW_UP = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "What is it famous for?"},
]
BOOK = LengthBook({prompt_key(KNOWN): KnownLength(23, 57), prompt_key(FOLLOW_UP): KnownLength(40, 12)})


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, str]]:
    simulator = Simulator(FAST, model_name="sim-test", lengths=BOOK)
    with running_simulator(simulator) as url:
        yield simulator, url


def chat(url: str, messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    body = {"model": "sim-test", "messages": messages, **extra}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def streamed(
    url: str, messages: list[dict[str, str]], **extra: Any
) -> tuple[str, str | None, dict[str, int]]:
    body = {
        "model": "sim-test",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, finish = "", None
    usage: dict[str, int] = {}
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, **extra}, timeout=10) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    return text, finish, usage


def lookups(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=5).text
    return {
        s.labels["result"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "sim_length_lookups_total"
    }


def test_a_known_conversation_gets_its_recorded_length_and_prompt_tokens(sim: tuple[Simulator, str]) -> None:
    _, url = sim
    data = chat(url, KNOWN)
    assert len(data["choices"][0]["message"]["content"].split()) == 57
    assert data["choices"][0]["finish_reason"] == "stop"  # it ended by itself, not at a cap
    assert data["usage"] == {"prompt_tokens": 23, "completion_tokens": 57, "total_tokens": 80}
    text, finish, usage = streamed(url, FOLLOW_UP)  # the whole conversation is the key, not the last turn
    assert (len(text.split()), finish, usage["prompt_tokens"]) == (12, "stop", 40)


def test_a_smaller_max_tokens_cuts_the_answer_and_a_larger_one_changes_nothing(
    sim: tuple[Simulator, str],
) -> None:
    _, url = sim
    cut = chat(url, KNOWN, max_tokens=20)
    assert (cut["usage"]["completion_tokens"], cut["choices"][0]["finish_reason"]) == (20, "length")
    capped = chat(url, KNOWN, max_tokens=4096)
    assert (capped["usage"]["completion_tokens"], capped["choices"][0]["finish_reason"]) == (57, "stop")


def test_an_unknown_or_changed_conversation_falls_back_and_is_counted(sim: tuple[Simulator, str]) -> None:
    _, url = sim
    assert lookups(url) == {"hit": 0.0, "miss": 0.0}
    plain = chat(url, [{"role": "user", "content": "one two three"}])
    assert plain["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": FAST.default_max_tokens,
        "total_tokens": 10,
    }
    asked = chat(url, [{"role": "user", "content": "one two three"}], max_tokens=5)
    assert asked["usage"]["completion_tokens"] == 5
    rewritten = [
        {"role": "system", "content": "be brief"},
        *KNOWN,
    ]  # what a gateway adding a prompt would send
    assert chat(url, rewritten)["usage"]["completion_tokens"] == FAST.default_max_tokens
    chat(url, KNOWN)
    assert lookups(url) == {"hit": 1.0, "miss": 3.0}


def test_without_a_length_file_nothing_is_looked_up() -> None:
    with running_simulator(Simulator(FAST, model_name="sim-test")) as url:
        assert chat(url, KNOWN)["usage"]["completion_tokens"] == FAST.default_max_tokens
        assert lookups(url) == {"hit": 0.0, "miss": 0.0}


def test_the_simulator_process_reads_its_length_file(tmp_path: Path) -> None:
    path = BOOK.save(tmp_path / "lengths.json")
    port = free_port()
    cmd = [sys.executable, "-m", "bench.simulator", "--port", str(port), "--lengths", str(path)]
    cmd += ["--model-name", "sim-test", "--decode-ms-base", "1", "--decode-ms-per-seq", "0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "the simulator exited"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the simulator did not start"
            time.sleep(0.1)
        text, finish, usage = streamed(url, KNOWN)
        assert (len(text.split()), finish, usage["prompt_tokens"]) == (57, "stop", 23)
        unknown, _, _ = streamed(url, [{"role": "user", "content": "hello"}], max_tokens=3)
        assert len(unknown.split()) == 3
    finally:
        proc.terminate()
        proc.wait(10)
