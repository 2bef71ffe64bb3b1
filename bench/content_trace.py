"""The content-bearing trace: real prompts with known answer lengths, at the Azure conv trace's arrival times.

The Azure traces carry only token counts, so a replay of them sends `tok tok tok ...`, and a gateway's
length predictor never sees a real prompt. This module pairs the conv trace's arrival times with real
prompts whose true answer lengths are known, from three third-party sets in `../shared/data/`:

- `arena-hard`: Arena-Hard prompts (`length/arena_hard_lengths.jsonl`) with the answers of
  gpt-3.5-turbo-0125, gpt-4-0314 and gpt-4-0613. Only the held-out buckets 8-9 of sha1(question_id) are
  used: the shipped length predictor was trained on buckets 0-7 (`lengths/training.py` `split_rows`), and
  every replayed user turn is checked against the artifact's own list of trained prompts (`check_held_out`).
- `gsm8k`: GSM8K prompts with Mixtral-8x7B's and GPT-4-1106's full responses
  (`routing/gsm8k_mixtral_gpt4.csv`); the length predictor never saw them.
- `meancache`: MeanCache's contextual queries (`cache/contextual_queries.json`): a factual question and its
  answer, and a follow-up asked after it (three messages: question, answer, follow-up) with its answer.
  `Synthetic_Dataset_Diverse.json` is left out: its answers are templated filler, not answers.

Each distinct conversation gets one true length: a prompt with several models' answers takes one of them,
chosen by a hash of its id, so every model is represented and a replayed prompt always means one length
(the simulator looks lengths up by the conversation, `bench/simulator/lengths.py`).

Token counts are cl100k_base (tiktoken) for every source: Arena-Hard's file gives its answers' cl100k
counts, and the rest (GSM8K and MeanCache answers, every prompt) is counted here with tiktoken reading the
cl100k_base file that litellm bundles (`litellm/litellm_core_utils/tokenizers/`), checked against its
published sha256 first, so nothing is ever downloaded.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tiktoken

from icgate.text import HELD_OUT_BUCKETS, bucket_of, normalise

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
ARENA_HARD = DATA / "length" / "arena_hard_lengths.jsonl"
GSM8K = DATA / "routing" / "gsm8k_mixtral_gpt4.csv"
MEANCACHE = DATA / "cache" / "contextual_queries.json"
GSM8K_MODELS = ("mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview")

# tiktoken caches encodings under the sha1 of their URL; litellm ships cl100k_base under that name.
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
TOKENIZER = "cl100k_base (tiktoken, from the file litellm bundles)"

# Share of replayed requests per source. GSM8K (about 170 tokens an answer) carries half; Arena-Hard's long
# answers (about 500) and MeanCache's short ones (about 25) a quarter each: a mean answer near the conv
# trace's own (211 tokens) and a spread wide enough that knowing a request's length matters.
DEFAULT_WEIGHTS: Mapping[str, float] = {"gsm8k": 0.5, "arena-hard": 0.25, "meancache": 0.25}

Conversation = tuple[tuple[str, str], ...]  # (role, content) pairs, as sent


@dataclass(frozen=True)
class Item:
    """One real conversation and the true length of its answer."""

    source: str
    item_id: str  # the question id / row index in the source file
    answered_by: str  # whose answer gives the length
    conversation: Conversation
    prompt_tokens: int  # cl100k over every message's text
    output_tokens: int  # cl100k of the answer

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.conversation]


# --------------------------------------------------------------------------- the tokenizer


def bundled_cl100k() -> Path:
    """litellm's copy of cl100k_base, found without importing litellm (which is slow to import)."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("litellm is not installed: it carries the cl100k_base file this trace counts with")
    name = hashlib.sha1(CL100K_URL.encode()).hexdigest()
    return Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers" / name


@contextmanager
def _tiktoken_cache(directory: Path) -> Iterator[None]:
    before = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = before


def cl100k() -> tiktoken.Encoding:
    """cl100k_base from the bundled file only: its hash is checked first, so tiktoken finds it in the cache
    it is pointed at and never reaches for the network (it downloads only on a missing or bad file)."""
    path = bundled_cl100k()
    if not path.is_file():
        raise RuntimeError(
            f"{path} missing: cl100k_base would have to be downloaded, which this bench never does"
        )
    if hashlib.sha256(path.read_bytes()).hexdigest() != CL100K_SHA256:
        raise RuntimeError(f"{path} is not cl100k_base (sha256 mismatch)")
    with _tiktoken_cache(path.parent):
        return tiktoken.get_encoding("cl100k_base")


def count(encoding: tiktoken.Encoding, text: str) -> int:
    return len(encoding.encode(text, disallowed_special=()))


def conversation_tokens(encoding: tiktoken.Encoding, conversation: Conversation) -> int:
    """Prompt tokens as the simulator charges them: every message's text, no chat-template overhead."""
    return max(1, sum(count(encoding, content) for _, content in conversation))


# --------------------------------------------------------------------------- the sources


def _pick(item_id: str, choices: Sequence[str]) -> str:
    """One of `choices` by a hash of the item: deterministic, independent of file order."""
    return choices[bucket_of("answer\x1f" + item_id, len(choices))]


def arena_hard_items(encoding: tiktoken.Encoding, path: Path = ARENA_HARD) -> list[Item]:
    """The held-out Arena-Hard prompts (buckets 8-9 of sha1(question_id)), each with one model's answer."""
    items = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            qid = str(record["question_id"])
            if bucket_of(qid) not in HELD_OUT_BUCKETS:
                continue
            answers = record["answers"]
            model = _pick(qid, sorted(answers))
            conversation: Conversation = (("user", record["prompt"]),)
            items.append(
                Item(
                    "arena-hard",
                    qid,
                    model,
                    conversation,
                    conversation_tokens(encoding, conversation),
                    max(1, int(answers[model]["tokens"])),
                )
            )
    return items


def gsm8k_items(encoding: tiktoken.Encoding, path: Path = GSM8K) -> list[Item]:
    """Every GSM8K prompt, with Mixtral's or GPT-4's full response (half each, by hash of the row index)."""
    items = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            model = _pick(row["idx"], GSM8K_MODELS)
            answer = row[f"{model}_response"].strip()
            if not answer:
                continue
            conversation: Conversation = (("user", row["prompt"]),)
            items.append(
                Item(
                    "gsm8k",
                    row["idx"],
                    model.split("/")[-1],
                    conversation,
                    conversation_tokens(encoding, conversation),
                    max(1, count(encoding, answer)),
                )
            )
    return items


def meancache_items(encoding: tiktoken.Encoding, path: Path = MEANCACHE) -> list[Item]:
    """Each contextual query twice: the question alone, and its follow-up asked after question and answer."""
    items = []
    for i, record in enumerate(json.loads(path.read_text(encoding="utf-8"))):
        main, answer = record["Main Query"], record["Main Query Response"]
        follow, follow_answer = record["Follow-Up Query"], record["Follow Up Query Response"]
        first: Conversation = (("user", main),)
        second: Conversation = (("user", main), ("assistant", answer), ("user", follow))
        for suffix, conversation, reply in (("q", first, answer), ("f", second, follow_answer)):
            items.append(
                Item(
                    "meancache",
                    f"{i}{suffix}",
                    "dataset",
                    conversation,
                    conversation_tokens(encoding, conversation),
                    max(1, count(encoding, reply)),
                )
            )
    return items


def load_pool(encoding: tiktoken.Encoding | None = None) -> dict[str, list[Item]]:
    """Every source's items, one per distinct conversation (the first wins a duplicate)."""
    encoding = encoding or cl100k()
    pool: dict[str, list[Item]] = {}
    seen: set[Conversation] = set()
    for name, loader in (
        ("arena-hard", arena_hard_items),
        ("gsm8k", gsm8k_items),
        ("meancache", meancache_items),
    ):
        kept = []
        for item in loader(encoding):
            if item.conversation not in seen:
                seen.add(item.conversation)
                kept.append(item)
        pool[name] = kept
    return pool


def trained_prompt_digests() -> frozenset[str]:
    """The fingerprints (`lengths.training.prompt_digest`) of the shipped length predictor's training prompts,
    as its artifact lists them."""
    from icgate.lengths.predict import load_length_model

    summary: dict[str, Any] = getattr(load_length_model(), "summary", {}) or {}
    return frozenset(str(p) for p in summary.get("trained_prompts", ()))


def check_held_out(pool: Mapping[str, Sequence[Item]], trained: frozenset[str]) -> None:
    """ValueError if any replayed conversation's user turn is one the length predictor was trained on."""
    from icgate.lengths.training import prompt_digest

    clash = sorted(
        f"{item.source}:{item.item_id}"
        for items in pool.values()
        for item in items
        if any(role == "user" and prompt_digest(text) in trained for role, text in item.conversation)
    )
    if clash:
        raise ValueError(f"{clash[:5]} are among the length predictor's training prompts")


# --------------------------------------------------------------------------- learning half, measured half

Half = Literal["learn", "measure"]
# Salt of the split's hash, so it is independent of the other splits by sha1 of a prompt (`bucket_of`).
SPLIT_SALT = "load-split\x1f"


def split_key(item: Item) -> str:
    """What decides an item's half: its first user turn, case and whitespace folded. A MeanCache follow-up
    starts with its question, so the two go to the same half, as do copies of one question."""
    return normalise(next(text for role, text in item.conversation if role == "user"))


def half_of(item: Item) -> Half:
    """The half an item belongs to, by a hash of `split_key`: deterministic, independent of file order."""
    return "learn" if bucket_of(SPLIT_SALT + split_key(item), 2) == 0 else "measure"


def texts_of(pool: Mapping[str, Sequence[Item]]) -> set[str]:
    """Every message's text in the pool, folded like `split_key`."""
    return {normalise(text) for items in pool.values() for item in items for _, text in item.conversation}


def check_apart(learn: Mapping[str, Sequence[Item]], measure: Mapping[str, Sequence[Item]]) -> None:
    """ValueError if any message text (a user turn or a quoted answer) is in both halves: a gateway that
    learns from one half must never have seen any part of a conversation of the other."""
    shared = texts_of(learn) & texts_of(measure)
    if shared:
        raise ValueError(f"{len(shared)} message texts are in both halves, e.g. {sorted(shared)[0][:80]!r}")


def split_pool(pool: Mapping[str, Sequence[Item]]) -> dict[Half, dict[str, list[Item]]]:
    """The pool cut in two by `half_of`, each source in both halves, checked apart (`check_apart`).

    Why: a gateway that learns each backend's lengths from its own traffic (issue 18, item 3) is shown the
    learning half before a measured window that replays only the measured half, so the prompts it is
    measured on never trained it."""
    halves: dict[Half, dict[str, list[Item]]] = {"learn": {}, "measure": {}}
    for name, items in pool.items():
        for half in halves.values():
            half[name] = []
        for item in items:
            halves[half_of(item)][name].append(item)
    check_apart(halves["learn"], halves["measure"])
    return halves


# --------------------------------------------------------------------------- the trace


@dataclass(frozen=True)
class Assignment:
    """Which item the trace's row `index` replays."""

    index: int
    item: Item


def assign(
    rows: int,
    pool: Mapping[str, Sequence[Item]],
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    seed: int = 0,
) -> list[Assignment]:
    """An item for each of the trace's first `rows` rows: a source drawn by weight, then that source's next
    item in a shuffled cycle (each source's prompts all come up before any repeats). Seeded: one trace."""
    rng = random.Random(seed)
    names = [n for n in weights if weights[n] > 0 and pool.get(n)]
    if not names:
        raise ValueError("no source with items and a positive weight")
    cycles = {}
    for name in names:
        order = list(pool[name])
        rng.shuffle(order)
        cycles[name] = (order, [0])
    out = []
    chosen = rng.choices(names, weights=[weights[n] for n in names], k=rows)
    for index, name in enumerate(chosen):
        order, position = cycles[name]
        out.append(Assignment(index, order[position[0] % len(order)]))
        position[0] += 1
    return out


def parse_weights(text: str) -> dict[str, float]:
    """'gsm8k=0.5,arena-hard=0.25,meancache=0.25' as a dict (unknown sources are an error)."""
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in DEFAULT_WEIGHTS:
            raise ValueError(f"unknown source {name!r}; known: {', '.join(DEFAULT_WEIGHTS)}")
        out[name] = float(value)
    return out


def describe(pool: Mapping[str, Sequence[Item]]) -> list[str]:
    """One line per source: how many prompts, whose answers, the answer length's quartiles."""
    lines = []
    for name, items in pool.items():
        lengths = sorted(i.output_tokens for i in items)
        prompts = sorted(i.prompt_tokens for i in items)
        if not lengths:
            continue
        models = sorted({i.answered_by for i in items})

        def q(values: list[int], share: float) -> int:
            return values[min(len(values) - 1, int(share * len(values)))]

        lines.append(
            f"`{name}`: {len(items)} conversations; answers by {', '.join(models)}; answer tokens "
            f"p10/p50/p90/max {q(lengths, 0.1)}/{q(lengths, 0.5)}/{q(lengths, 0.9)}/{lengths[-1]} "
            f"(mean {sum(lengths) / len(lengths):.0f}); prompt tokens p50 {q(prompts, 0.5)}, max "
            f"{prompts[-1]}"
        )
    return lines
