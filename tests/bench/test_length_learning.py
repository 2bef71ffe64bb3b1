"""bench/length_learning.py: its stand-in's answers, the held-out split, and that its section of the report
is appended once and replaced on a rerun, leaving the rest of the report alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from bench import length_learning as bench


def test_the_standin_answers_with_the_known_length_cut_at_max_tokens() -> None:
    client = TestClient(bench.LengthStandin("weak-model", {"Count to ten.": 40}).app)
    asked = {"model": "weak-model", "messages": [{"role": "user", "content": "Count to ten."}]}
    whole = client.post("/v1/chat/completions", json=asked).json()
    assert (whole["usage"]["completion_tokens"], whole["choices"][0]["finish_reason"]) == (40, "stop")
    cut = client.post("/v1/chat/completions", json={**asked, "max_tokens": 25}).json()
    assert (cut["usage"]["completion_tokens"], cut["choices"][0]["finish_reason"]) == (25, "length")


def test_held_out_prompts_follow_the_buckets_and_a_follow_up_stays_with_its_question() -> None:
    if not bench.ARENA.exists() or not bench.GSM8K.exists() or not bench.MEANCACHE.exists():
        pytest.skip("../shared/data is not here")
    prompts = bench.load_prompts()
    assert len({p.text for p in prompts}) == len(prompts)
    by_text = {p.text: p for p in prompts}
    for follow in (p for p in prompts if p.context):
        question = by_text.get(follow.context[0][1])
        assert question is None or question.held == follow.held
    held = [p for p in prompts if p.held]
    assert 0.1 < len(held) / len(prompts) < 0.3
    assert {p.source for p in held} == {"gsm8k", "arena", "meancache"}


def test_the_section_is_appended_once_and_replaced_on_a_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = tmp_path / "length.md"
    report.write_text("# Output-length prediction\n\nEarlier sections.\n")
    monkeypatch.setattr(bench, "REPORT", report)
    bench.write_section(f"{bench.HEADING}\n\nfirst run\n\n{bench.END}\n")
    bench.write_section(f"{bench.HEADING}\n\nsecond run\n\n{bench.END}\n")
    text = report.read_text()
    assert text.startswith("# Output-length prediction\n\nEarlier sections.\n")
    assert text.count(bench.HEADING) == 1 and "second run" in text and "first run" not in text
