"""The exact key and what may be served from or stored in a cache."""

from __future__ import annotations

from icgate.cache.exact import cacheability, exact_key


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": "auto", "messages": [{"role": "user", "content": content}], **extra}


def test_whitespace_and_irrelevant_fields_do_not_change_the_key() -> None:
    base = exact_key("chat", chat("What is  2+2?"))
    assert exact_key("chat", chat(" What is 2+2? ")) == base
    assert exact_key("chat", chat("What is 2+2?", model="small", stream=True, user="u1")) == base


def test_output_changing_fields_change_the_key() -> None:
    base = exact_key("chat", chat("What is 2+2?"))
    assert exact_key("chat", chat("what is 2+2?")) != base  # case may change the answer
    assert exact_key("chat", chat("What is 2+2?", max_tokens=5)) != base
    assert exact_key("chat", chat("What is 2+2?", top_k=3)) != base  # unknown fields count too
    assert exact_key("completions", {"prompt": "What is 2+2?"}) != base
    with_system = {"model": "auto", "messages": [{"role": "system", "content": "Be terse."},
                                                 {"role": "user", "content": "What is 2+2?"}]}  # fmt: skip
    assert exact_key("chat", with_system) != base


def test_cacheability() -> None:
    assert cacheability(chat("x")).servable
    assert cacheability(chat("x", temperature=0)).servable
    sampled = cacheability(chat("x", temperature=0.7))
    assert not sampled.servable and not sampled.storable and "temperature" in sampled.reason
    assert cacheability(chat("x", temperature=0.7), allow_sampled=True).servable
    assert not cacheability(chat("x", n=2)).servable
    assert not cacheability(chat("x", tools=[{"type": "function"}])).storable
    assert not cacheability(chat("x", logprobs=True)).servable
