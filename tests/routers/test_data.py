"""Loading labelled routing rows and the held-out split."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

from icgate.routers.data import (
    LabelledPrompt,
    label_summary,
    load_routing_csv,
    prompt_bucket,
    rows_from_records,
    split_rows,
)
from icgate.text import HELD_OUT_BUCKETS

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "routing"
WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_gsm8k_layout_with_response_columns(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "gsm.csv",
        ["idx", "prompt", WEAK, STRONG, f"{WEAK}_response", f"{STRONG}_response"],
        [
            ["0", "A robe takes 2 bolts.\nHow many?", "True", "True", "3", "The answer is 3"],
            ["1", "Janet has 16 eggs.", "False", "True", "True", "False"],  # responses that look boolean
            ["2", "x", "false", "TRUE", "long text", "more"],
        ],
    )
    # The response columns are not all True/False, so only the two model columns are labels.
    rows = load_routing_csv(path)
    assert rows == [
        LabelledPrompt("A robe takes 2 bolts.\nHow many?", True, True, "gsm"),
        LabelledPrompt("Janet has 16 eggs.", False, True, "gsm"),
        LabelledPrompt("x", False, True, "gsm"),
    ]


def test_mmlu_layout_with_subject_and_multiline_prompts(tmp_path: Path) -> None:
    prompt = "Find the index.\nA. 8\nB. 2\nC. 24\nD. 120\nAnswer:"
    path = write_csv(
        tmp_path / "mmlu_x.csv",
        ["idx", "subject", "prompt", WEAK, STRONG],
        [["1", "abstract_algebra", prompt, "False", "True"], ["2", "anatomy", "Q?", "True", "False"]],
    )
    rows = load_routing_csv(path, group="mmlu")
    assert [(r.prompt, r.weak_ok, r.strong_ok, r.group) for r in rows] == [
        (prompt, False, True, "mmlu"),
        ("Q?", True, False, "mmlu"),
    ]


def test_column_overrides(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "c.csv", ["prompt", "a", "b", "c"], [["p", "1", "0", "yes"], ["q", "0", "1", "no"]]
    )
    with pytest.raises(ValueError, match=r"c\.csv: expected exactly two True/False columns.*a, b, c"):
        load_routing_csv(path)
    rows = load_routing_csv(path, weak_column="c", strong_column="a")
    assert [(r.weak_ok, r.strong_ok) for r in rows] == [(True, True), (False, False)]
    with pytest.raises(ValueError, match="no column 'zzz'"):
        load_routing_csv(path, weak_column="zzz", strong_column="a")


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (["prompt", "w", "s"], [["p", "True", "maybe"]], "exactly two True/False columns"),
        (["text", "w", "s"], [["p", "True", "False"]], "no 'prompt' column"),
        (["prompt", "w", "s"], [["p", "True", "False"], ["  ", "True", "False"]], "line 3: empty prompt"),
        (["prompt", "w", "s"], [["p", "True", "False"], ["q", "True"]], "line 3: 2 fields, the header has 3"),
        (["prompt", "w", "s"], [], "no rows"),
    ],
)
def test_bad_input_names_file_and_line(
    tmp_path: Path, header: list[str], rows: list[list[str]], message: str
) -> None:
    path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(ValueError, match=r"bad\.csv") as info:
        load_routing_csv(path)
    assert message in str(info.value)


def test_bad_label_with_named_columns_names_the_line(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "b.csv", ["prompt", "w", "s"], [["p", "True", "False"], ["q", "True", "maybe"]]
    )
    with pytest.raises(ValueError, match=r"b\.csv: line 3: column 's': expected True/False, got 'maybe'"):
        load_routing_csv(path, weak_column="w", strong_column="s")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_routing_csv(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty file"):
        load_routing_csv(tmp_path / "empty.csv")


def test_rows_from_records_allow_unknown_strong_label() -> None:
    rows = rows_from_records(
        [
            {"prompt": "hi", "weak_ok": 1, "strong_ok": None, "group": "t1"},
            {"prompt": "yo", "weak_ok": "false"},
        ]
    )
    assert rows == [LabelledPrompt("hi", True, None, "t1"), LabelledPrompt("yo", False, None, "")]
    summary = label_summary(rows)
    assert summary["n"] == 2 and summary["strong_known"] == 0 and summary["strong_ok_rate"] is None
    with pytest.raises(ValueError, match="record 0: missing 'weak_ok'"):
        rows_from_records([{"prompt": "hi"}])
    with pytest.raises(ValueError, match="record 1: 'prompt' must be a non-empty string"):
        rows_from_records([{"prompt": "a", "weak_ok": True}, {"prompt": "", "weak_ok": True}])


def test_split_is_by_normalised_text_and_about_80_20() -> None:
    assert prompt_bucket("How many  eggs?") == prompt_bucket("how many eggs?")
    rows = [LabelledPrompt(f"question number {i}", i % 2 == 0, True) for i in range(2000)]
    train, held = split_rows(rows)
    assert len(train) + len(held) == 2000
    assert 0.17 < len(held) / 2000 < 0.23
    assert not {r.prompt for r in train} & {r.prompt for r in held}
    assert all(prompt_bucket(r.prompt) in HELD_OUT_BUCKETS for r in held)
    assert split_rows(list(reversed(rows)))[1] == list(reversed(held))  # order-free


@pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"routing data not found at {SHARED} (../shared/data/routing)"
)
def test_real_files_match_the_documented_rates() -> None:
    gsm = load_routing_csv(SHARED / "gsm8k_mixtral_gpt4.csv")
    mmlu = load_routing_csv(SHARED / "mmlu_mixtral_gpt4.csv")
    assert len(gsm) == 879 and len(mmlu) == 11233
    g, m = label_summary(gsm), label_summary(mmlu)
    # The data README's rates (63.8/85.7%, 68.1/80.6%) are the upstream files'; some rows are held back.
    assert g["weak_ok_rate"] == pytest.approx(0.638, abs=0.01)
    assert g["strong_ok_rate"] == pytest.approx(0.857, abs=0.01)
    assert m["weak_ok_rate"] == pytest.approx(0.681, abs=0.01)
    assert m["strong_ok_rate"] == pytest.approx(0.806, abs=0.01)
    assert {r.group for r in gsm} == {"gsm8k_mixtral_gpt4"}


# Buckets computed by the code before `prompt_bucket` hashed with `icgate.text.bucket_of`: the split of
# every row must never move (a router's held-out report is only honest if it did not).
PINNED_BUCKETS = [
    ("How many  eggs?", 5),
    ("how many eggs?", 5),
    ("Janet has 16 eggs.", 0),
    ("  Ünïcode prompt\twith TABS\n", 9),
    ("x", 0),
    ("A robe takes 2 bolts.\nHow many?", 3),
    ("Find the index.\nA. 8\nB. 2\nC. 24\nD. 120\nAnswer:", 9),
]


@pytest.mark.parametrize(("prompt", "bucket"), PINNED_BUCKETS)
def test_prompt_buckets_are_pinned(prompt: str, bucket: int) -> None:
    assert prompt_bucket(prompt) == bucket


@pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"routing data not found at {SHARED} (../shared/data/routing)"
)
@pytest.mark.parametrize(
    ("name", "held", "digest"),
    [("gsm8k_mixtral_gpt4", 184, "555777bb77918f12"), ("mmlu_mixtral_gpt4", 2241, "345709c43722ab9d")],
)
def test_real_files_split_as_before(name: str, held: int, digest: str) -> None:
    rows = load_routing_csv(SHARED / f"{name}.csv")
    buckets = "".join(str(prompt_bucket(r.prompt)) for r in rows)
    assert len(split_rows(rows)[1]) == held
    assert hashlib.sha1(buckets.encode()).hexdigest()[:16] == digest  # every row's bucket, in file order
