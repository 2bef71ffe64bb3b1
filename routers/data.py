"""Labelled routing rows: which prompts the weak (small) and the strong (large) model answered well.

The offline source is RouteLLM's layout: a CSV with a `prompt` column and one True/False correctness column
per model, weak model first (extra columns such as `idx`, `subject` or full responses are ignored). The
online source is the gateway's own history (`rows_from_records`), where the strong model's verdict is
often unknown.

Splits are by the prompt's text (sha1), never by file position, so a prompt lands in the same split in
every file and a report on the held-out buckets stays honest.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icgate.text import HELD_OUT_BUCKETS, TRAIN_BUCKETS, bucket_of, is_flag, normalise, parse_flag

# Columns that are never labels even when their values happen to look boolean (e.g. a two-row file's idx).
_NOT_LABELS = frozenset({"", "idx", "id", "index", "row", "unnamed: 0", "prompt", "subject"})


@dataclass(frozen=True)
class LabelledPrompt:
    """One prompt and whether each model's answer was good enough; `strong_ok` None = not observed."""

    prompt: str
    weak_ok: bool
    strong_ok: bool | None
    group: str = ""


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (starting line number, fields) of every record; multi-line prompts are one record."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: empty file")
    header = [name.strip() for name in header]
    records: list[tuple[int, list[str]]] = []
    start = reader.line_num + 1
    try:
        for fields in reader:
            if fields:  # blank lines between records are harmless
                if len(fields) != len(header):
                    raise ValueError(
                        f"{path}: line {start}: {len(fields)} fields, the header has {len(header)}"
                    )
                records.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ValueError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from exc
    return header, records


def detect_label_columns(header: Sequence[str], records: Sequence[Sequence[str]]) -> tuple[str, str]:
    """The (weak, strong) label columns: the two columns whose values are all True/False, in file order."""
    candidates = [
        name
        for i, name in enumerate(header)
        if name.lower() not in _NOT_LABELS and records and all(is_flag(r[i]) for r in records)
    ]
    if len(candidates) != 2:
        found = ", ".join(candidates) or "none"
        raise ValueError(
            f"expected exactly two True/False columns (weak model, then strong model), found {found}; "
            "name them with weak_column/strong_column"
        )
    return candidates[0], candidates[1]


def _label_columns(
    header: Sequence[str], records: Sequence[Sequence[str]], weak: str | None, strong: str | None
) -> tuple[str, str]:
    """The (weak, strong) label columns: as named, the unnamed one (or both) detected."""
    if weak is not None and strong is not None:
        return weak, strong
    try:
        weak_guess, strong_guess = detect_label_columns(header, records)
    except ValueError as exc:
        if weak is None and strong is None:
            raise
        raise ValueError(f"name both weak_column and strong_column ({exc})") from exc
    if strong is not None:  # only the weak column to pick
        return (weak_guess if weak_guess != strong else strong_guess), strong
    if weak is not None:  # only the strong column to pick
        return weak, (strong_guess if strong_guess != weak else weak_guess)
    return weak_guess, strong_guess


def load_routing_csv(
    path: str | Path,
    *,
    weak_column: str | None = None,
    strong_column: str | None = None,
    prompt_column: str = "prompt",
    group: str | None = None,
) -> list[LabelledPrompt]:
    """Labelled prompts from a RouteLLM-style CSV.

    Label columns are detected (see `detect_label_columns`) unless named; naming only one picks the other
    among the detected ones. `group` defaults to the file's stem (e.g. `gsm8k_mixtral_gpt4`), so rows from
    several files stay distinguishable. Bad input raises ValueError naming the file and line.
    """
    path = Path(path)
    header, records = _read_csv(path)
    if not records:
        raise ValueError(f"{path}: no rows")
    if prompt_column not in header:
        raise ValueError(f"{path}: no {prompt_column!r} column (columns: {', '.join(header)})")
    for name in (weak_column, strong_column):
        if name is not None and name not in header:
            raise ValueError(f"{path}: no column {name!r} (columns: {', '.join(header)})")
    try:
        weak_column, strong_column = _label_columns(
            header, [fields for _, fields in records], weak_column, strong_column
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if weak_column == strong_column:
        raise ValueError(f"{path}: weak and strong label columns are both {weak_column!r}")
    p_i, w_i, s_i = (header.index(c) for c in (prompt_column, weak_column, strong_column))
    name = group if group is not None else path.stem
    rows = []
    for line, fields in records:
        where = f"{path}: line {line}"
        prompt = fields[p_i]
        if not prompt.strip():
            raise ValueError(f"{where}: empty prompt")
        weak = parse_flag(fields[w_i], f"{where}: column {weak_column!r}")
        strong = parse_flag(fields[s_i], f"{where}: column {strong_column!r}")
        rows.append(LabelledPrompt(prompt, weak, strong, name))
    return rows


def rows_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    prompt_key: str = "prompt",
    weak_key: str = "weak_ok",
    strong_key: str = "strong_ok",
    group_key: str = "group",
) -> list[LabelledPrompt]:
    """Labelled prompts from mappings (e.g. request-log rows joined with feedback).

    `weak_ok` is required (True/False-like); `strong_ok` may be missing or None (not observed). Rows with an
    empty prompt raise, as in `load_routing_csv`.
    """
    rows = []
    for i, record in enumerate(records):
        where = f"record {i}"
        prompt = record.get(prompt_key)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: {prompt_key!r} must be a non-empty string, got {prompt!r}")
        if record.get(weak_key) is None:
            raise ValueError(f"{where}: missing {weak_key!r}")
        weak = parse_flag(record[weak_key], f"{where}: {weak_key!r}")
        raw_strong = record.get(strong_key)
        strong = None if raw_strong is None else parse_flag(raw_strong, f"{where}: {strong_key!r}")
        rows.append(LabelledPrompt(prompt, weak, strong, str(record.get(group_key) or "")))
    return rows


def prompt_bucket(prompt: str) -> int:
    """The bucket of the case- and whitespace-normalised prompt: a prompt and its re-spaced copies land
    together, in every file."""
    return bucket_of(normalise(prompt))


def select_buckets(rows: Iterable[LabelledPrompt], buckets: Iterable[int]) -> list[LabelledPrompt]:
    wanted = frozenset(buckets)
    return [r for r in rows if prompt_bucket(r.prompt) in wanted]


def split_rows(rows: Sequence[LabelledPrompt]) -> tuple[list[LabelledPrompt], list[LabelledPrompt]]:
    """(training rows: buckets 0-7, held-out rows: buckets 8-9)."""
    return select_buckets(rows, TRAIN_BUCKETS), select_buckets(rows, HELD_OUT_BUCKETS)


def label_summary(rows: Sequence[LabelledPrompt]) -> dict[str, Any]:
    """Counts and label rates, stored in a trained artifact so its provenance is visible."""
    known = [r for r in rows if r.strong_ok is not None]
    n = len(rows)
    return {
        "n": n,
        "groups": sorted({r.group for r in rows}),
        "weak_ok_rate": sum(r.weak_ok for r in rows) / n if n else None,
        "strong_known": len(known),
        "strong_ok_rate": sum(bool(r.strong_ok) for r in known) / len(known) if known else None,
        "only_strong_ok_rate": (
            sum(bool(r.strong_ok) and not r.weak_ok for r in known) / len(known) if known else None
        ),
        "only_weak_ok_rate": (
            sum(r.weak_ok and not r.strong_ok for r in known) / len(known) if known else None
        ),
    }
