"""The content-bearing trace: held-out prompts only, lengths in cl100k, one length per conversation, and the
simulators' length file round-tripping every replayed request."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import tiktoken

from bench import content_trace as ct
from bench import load
from bench.simulator.lengths import KnownLength, LengthBook, prompt_key

needs_data = pytest.mark.skipif(
    not (ct.ARENA_HARD.exists() and ct.GSM8K.exists() and ct.MEANCACHE.exists()),
    reason=f"the shared evaluation data is not at {ct.DATA}",
)


Pool = dict[str, list[ct.Item]]


@pytest.fixture(scope="module")
def encoding() -> tiktoken.Encoding:
    return ct.cl100k()


@pytest.fixture(scope="module")
def pool(encoding: tiktoken.Encoding) -> Pool:
    return ct.load_pool(encoding)


def item(source: str, item_id: str, text: str, prompt: int, output: int) -> ct.Item:
    return ct.Item(source, item_id, "m", (("user", text),), prompt, output)


def test_cl100k_comes_from_litellms_bundled_file_and_leaves_the_environment_alone(
    encoding: tiktoken.Encoding,
) -> None:
    before = os.environ.get("TIKTOKEN_CACHE_DIR")
    assert ct.bundled_cl100k().is_file()
    assert encoding.name == "cl100k_base"
    assert encoding.encode("hello world") == [15339, 1917]  # cl100k's ids, not another vocabulary's
    ct.cl100k()
    assert os.environ.get("TIKTOKEN_CACHE_DIR") == before


@needs_data
def test_arena_hard_items_are_exactly_the_held_out_split_with_the_files_lengths(pool: Pool) -> None:
    from icgate.lengths.training import load_length_rows, split_rows

    _, held_out = split_rows(load_length_rows(ct.ARENA_HARD))
    assert sorted(i.item_id for i in pool["arena-hard"]) == sorted(r.question_id for r in held_out)
    records = {
        json.loads(line)["question_id"]: json.loads(line)
        for line in ct.ARENA_HARD.read_text().splitlines()
        if line
    }
    for it in pool["arena-hard"]:
        assert it.output_tokens == records[it.item_id]["answers"][it.answered_by]["tokens"]
    assert len({i.answered_by for i in pool["arena-hard"]}) == 3  # every model answers some


@needs_data
def test_no_replayed_prompt_trained_the_shipped_length_predictor(pool: Pool) -> None:
    from icgate.lengths.training import load_length_rows, split_rows

    trained = ct.trained_prompt_digests()
    ct.check_held_out(pool, trained)  # the real pool passes
    training_row = split_rows(load_length_rows(ct.ARENA_HARD))[0][0]
    leaked = {**pool, "arena-hard": [*pool["arena-hard"], item("arena-hard", "x", training_row.prompt, 5, 5)]}
    with pytest.raises(ValueError, match="training prompts"):
        ct.check_held_out(leaked, trained)


@needs_data
def test_gsm8k_and_meancache_lengths_are_cl100k_counts_of_the_answers(
    pool: Pool, encoding: tiktoken.Encoding
) -> None:
    with ct.GSM8K.open(newline="", encoding="utf-8") as f:
        rows = {r["idx"]: r for r in csv.DictReader(f)}
    for it in pool["gsm8k"][:50]:
        column = next(m for m in ct.GSM8K_MODELS if m.endswith(it.answered_by)) + "_response"
        assert it.output_tokens == len(encoding.encode(rows[it.item_id][column].strip()))
        assert it.prompt_tokens == len(encoding.encode(rows[it.item_id]["prompt"]))
    assert Counter(i.answered_by for i in pool["gsm8k"]).keys() == {
        "Mixtral-8x7B-Instruct-v0.1",
        "gpt-4-1106-preview",
    }
    follow_ups = [i for i in pool["meancache"] if len(i.conversation) == 3]
    assert follow_ups and all(
        [r for r, _ in i.conversation] == ["user", "assistant", "user"] for i in follow_ups
    )


def test_assignment_is_seeded_weighted_and_cycles_each_source_before_repeating() -> None:
    pool = {
        "gsm8k": [item("gsm8k", str(i), f"g{i}", 5, 10 + i) for i in range(10)],
        "arena-hard": [item("arena-hard", str(i), f"a{i}", 5, 500) for i in range(3)],
    }
    weights = {"gsm8k": 0.75, "arena-hard": 0.25}
    first = ct.assign(2000, pool, weights, seed=1)
    assert [a.item for a in first] == [a.item for a in ct.assign(2000, pool, weights, seed=1)]
    shares = Counter(a.item.source for a in first)
    assert 0.7 < shares["gsm8k"] / 2000 < 0.8
    gsm = [a.item.item_id for a in first if a.item.source == "gsm8k"]
    assert sorted(gsm[:10]) == sorted(str(i) for i in range(10))  # all ten before any repeats
    with pytest.raises(ValueError):
        ct.parse_weights("wikipedia=1")


def test_the_length_file_round_trips_every_row_and_tells_a_changed_prompt(tmp_path: Path) -> None:
    rows = [
        load.TraceRow(0.0, 7, 42, item=item("gsm8k", "1", "How many apples?", 7, 42)),
        load.TraceRow(0.5, 3, 9, rid="a0z"),
        load.TraceRow(1.0, 3, 11, rid="b00"),  # same prompt length, another id: another answer length
    ]
    trace = load.Trace("t", rows, 0)
    path = load.length_book([trace]).save(tmp_path / "lengths.json")
    book = LengthBook.load(path)
    assert len(book) == 3
    for row in rows:
        assert book.lookup(row.messages()) == KnownLength(row.prompt_tokens, row.output_tokens)
    with_example = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
        *rows[0].messages(),
    ]
    assert book.lookup(with_example) is None  # a prompt rewritten on the way misses
    assert prompt_key(rows[0].messages()) == prompt_key(
        [{"role": "user", "content": [{"type": "text", "text": "How many apples?"}]}]
    )


def test_one_conversation_with_two_lengths_is_refused() -> None:
    twin = item("gsm8k", "1", "same words", 3, 10)
    other = item("meancache", "2", "same words", 3, 99)
    trace = load.Trace("t", [load.TraceRow(0, 3, 10, item=twin), load.TraceRow(1, 3, 99, item=other)], 0)
    with pytest.raises(ValueError, match="two lengths"):
        load.length_book([trace])


def test_a_damaged_length_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": "something else", "version": 1, "entries": {}}))
    with pytest.raises(ValueError, match="not a"):
        LengthBook.load(path)


@needs_data
def test_azure_rows_carry_distinct_ids_and_keep_the_gateways_estimate_equal_to_the_words() -> None:
    conv = load.load_trace("conv", load.kv_limit())
    code = load.load_trace("code", load.kv_limit())
    for row in conv.rows[:200]:
        text = row.messages()[0]["content"]
        assert len(text.split()) == row.prompt_tokens
        assert len(text) // 4 == row.prompt_tokens == row.routing_tokens
    assert len({r.rid for r in conv.rows}) == len(conv.rows)
    book = load.length_book([conv, code])  # conv and code never share a prompt
    assert len(book) == len(conv.rows) + len(code.rows)


@needs_data
def test_the_content_trace_takes_the_conv_trace_times_and_real_prompts(pool: Pool) -> None:
    conv = load.load_trace("conv", load.kv_limit())
    content = load.load_trace(load.CONTENT, load.kv_limit(), pool=pool)
    assert [r.at_s for r in content.rows] == [r.at_s for r in conv.rows]
    assert {r.source for r in content.rows[:500]} == {"gsm8k", "arena-hard", "meancache"}
    for row in content.rows[:50]:
        assert row.item is not None
        assert row.routing_tokens == max(1, sum(len(t) for _, t in row.item.conversation) // 4)


# --------------------------------------------------------------------------- learning half, measured half


def test_the_split_is_a_deterministic_partition_that_keeps_a_follow_up_with_its_question() -> None:
    questions = [
        ct.Item("meancache", f"{i}q", "d", (("user", f"Who wrote book {i}?"),), 5, 9) for i in range(40)
    ]
    follow_ups = [
        ct.Item("meancache", f"{i}f", "d", (("user", f"Who wrote book {i}?"), ("assistant", f"Author {i}."),
                                            ("user", f"When was author {i} born?")), 12, 7)
        for i in range(40)
    ]  # fmt: skip
    gsm = [item("gsm8k", str(i), f"Problem {i}: add {i} and {i + 1}.", 9, 30) for i in range(60)]
    pool = {"meancache": [*questions, *follow_ups], "gsm8k": gsm}
    halves = ct.split_pool(pool)
    again = ct.split_pool({name: list(reversed(items)) for name, items in pool.items()})  # file order
    for half in ("learn", "measure"):
        assert {i.item_id for items in halves[half].values() for i in items} == {
            i.item_id for items in again[half].values() for i in items
        }
    for name, items in pool.items():
        learn, measure = halves["learn"][name], halves["measure"][name]
        assert learn and measure  # both halves get some of every source
        assert sorted(i.item_id for i in [*learn, *measure]) == sorted(i.item_id for i in items)
    for q, f in zip(questions, follow_ups, strict=True):
        assert ct.half_of(q) == ct.half_of(f)
    # The same question with other case and spacing is the same question.
    twin = item("gsm8k", "t", "  who WROTE book 3? ", 5, 9)
    assert ct.half_of(twin) == ct.half_of(questions[3])


def test_a_text_in_both_halves_is_refused() -> None:
    asked = item("gsm8k", "1", "What is two plus two?", 5, 9)
    quoting = ct.Item("meancache", "2", "d", (("user", "Say hi."), ("assistant", "Hi."),
                                              ("user", "what is two plus  two?")), 9, 3)  # fmt: skip
    ct.check_apart({"gsm8k": [asked]}, {"gsm8k": [item("gsm8k", "3", "Something else", 3, 3)]})
    with pytest.raises(ValueError, match="both halves"):
        ct.check_apart({"gsm8k": [asked]}, {"meancache": [quoting]})


@needs_data
def test_the_real_pool_splits_into_two_halves_that_share_no_text_and_the_windows_replay_one(
    pool: Pool,
) -> None:
    halves = ct.split_pool(pool)
    assert not ct.texts_of(halves["learn"]) & ct.texts_of(halves["measure"])
    for name, items in pool.items():
        sizes = len(halves["learn"][name]), len(halves["measure"][name])
        assert sum(sizes) == len(items) and min(sizes) >= len(items) // 3, name
    measured = load.load_trace(load.CONTENT, load.kv_limit(), pool=pool)
    learning = load.learning_trace(measured, load.kv_limit(), pool=pool)
    assert (measured.half, learning.half) == ("measure", "learn")
    assert {ct.half_of(r.item) for r in measured.rows if r.item is not None} == {"measure"}
    assert {ct.half_of(r.item) for r in learning.rows if r.item is not None} == {"learn"}
    assert {r.source for r in learning.rows[:500]} == {"gsm8k", "arena-hard", "meancache"}
    load.check_learning_apart(learning, load.schedule(measured, 30.0, 60.0))
    book = load.length_book([measured, learning])  # the simulators know both halves' lengths
    assert book.lookup(learning.rows[0].messages()) is not None
