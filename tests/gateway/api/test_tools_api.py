"""Function calling through the gateway, with the official client, over both backend transports."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
from openai.types.chat import ChatCompletionChunk

from icgate.gateway.config import Policy
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

StartGateway = Callable[[Policy], RunningGateway]

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}


def client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-anything", max_retries=0)


def calls_of(message: Any) -> list[Any]:
    """A message's tool calls (typed loosely: the SDK's union includes custom tool calls)."""
    return list(message.tool_calls or [])


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def assembled(chunks: list[ChatCompletionChunk]) -> dict[int, dict[str, str]]:
    """Streamed tool calls put back together, by index: id, name and the concatenated arguments."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or ():
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += piece.id or ""
                if piece.function is not None:
                    call["name"] += piece.function.name or ""
                    call["arguments"] += piece.function.arguments or ""
    return calls


def test_tool_choice_auto_calls_the_first_tool(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    completion = client(gw).chat.completions.create(
        model="auto", messages=ask("Paris"), tools=[WEATHER, TIME], tool_choice="auto"
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = calls_of(choice.message)
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 1}
    sent = standins.small.received[0]["body"]
    assert sent["tools"] == [WEATHER, TIME] and sent["tool_choice"] == "auto"


def test_named_tool_choice_and_parallel_calls(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    named = client(gw).chat.completions.create(
        model="small",
        messages=ask("UTC"),
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    [call] = calls_of(named.choices[0].message)
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"zone": "UTC"}
    parallel = client(gw).chat.completions.create(
        model="small", messages=ask("Oslo"), tools=[WEATHER, TIME], parallel_tool_calls=True
    )
    names = [c.function.name for c in calls_of(parallel.choices[0].message)]
    assert names == ["get_weather", "get_time"]
    assert standins.small.received[1]["body"]["parallel_tool_calls"] is True


def test_round_trip_with_the_tools_result(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    messages: list[Any] = ask("Rome")
    first = client(gw).chat.completions.create(model="auto", messages=messages, tools=[WEATHER])
    [call] = calls_of(first.choices[0].message)
    messages.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        }
    )
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 24C"})
    second = client(gw).chat.completions.create(model="auto", messages=messages, tools=[WEATHER])
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == f"small-model says: tool {call.id} said sunny, 24C"
    sent = standins.small.received[1]["body"]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.id and sent[1].get("content") is None
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24C"}


def test_streamed_tool_calls(standins: Standins, start_gateway: StartGateway, transport: str) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    chunks = list(
        client(gw).chat.completions.create(
            model="auto",
            messages=ask("Lisbon"),
            tools=[WEATHER, TIME],
            parallel_tool_calls=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    calls = assembled(chunks)
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Lisbon", "days": 1}
    assert json.loads(calls[1]["arguments"]) == {"zone": "Lisbon"}
    assert calls[0]["id"] == "call_0_get_weather"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "tool_calls" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_tools_with_tool_choice_none_get_text(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    completion = client(gw).chat.completions.create(
        model="auto", messages=ask("hello"), tools=[WEATHER], tool_choice="none"
    )
    assert completion.choices[0].message.content == "small-model says: hello"
    assert not completion.choices[0].message.tool_calls
