"""Out-of-band answer lengths: the true length of each known conversation, read only by the simulator.

A benchmark that replays real prompts must not tell the gateway how long each answer will be (no
`max_tokens` equal to the true length), yet the simulated backend has to answer with that length. So
the benchmark writes a lookup file keyed by `prompt_key(messages)`, a hash of the whole conversation as
the backend receives it, and only the simulator reads it (`--lengths FILE`). The key covers every
message, not just the last user turn: a gateway that rewrote the prompt on the way (in-context examples,
a system prompt) makes the lookup miss, and the simulator counts the misses, so the benchmark can tell.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icgate.text import message_text

FORMAT = "icgate-sim-lengths"
VERSION = 1


def prompt_key(messages: Sequence[Any]) -> str:
    """sha256 of the conversation's roles and texts, in order: what identifies one replayed request."""
    canonical = [
        [str(m.get("role", "")), message_text(m.get("content"))] if isinstance(m, dict) else ["", ""]
        for m in messages
    ]
    blob = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class KnownLength:
    """What the simulator charges for a known conversation: its prompt and its whole answer, in tokens."""

    prompt_tokens: int
    output_tokens: int


class LengthBook:
    """The lookup: conversation key -> `KnownLength`. Read-only once built."""

    def __init__(self, entries: Mapping[str, KnownLength]) -> None:
        self._entries = dict(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> KnownLength | None:
        return self._entries.get(key)

    def lookup(self, messages: Sequence[Any]) -> KnownLength | None:
        return self._entries.get(prompt_key(messages))

    def items(self) -> Iterable[tuple[str, KnownLength]]:
        return self._entries.items()

    @classmethod
    def load(cls, path: str | Path) -> LengthBook:
        """Read a file written by `save`; ValueError names the file when it is not one."""
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{VERSION} file")
        entries = {}
        for key, pair in raw["entries"].items():
            prompt, output = int(pair[0]), int(pair[1])
            if prompt < 0 or output < 1:
                raise ValueError(f"{path}: entry {key} has prompt {prompt}, output {output} tokens")
            entries[key] = KnownLength(prompt, output)
        return cls(entries)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        body = {
            "format": FORMAT,
            "version": VERSION,
            "entries": {k: [v.prompt_tokens, v.output_tokens] for k, v in self._entries.items()},
        }
        path.write_text(json.dumps(body, separators=(",", ":")))
        return path
