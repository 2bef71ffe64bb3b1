"""bench/load_windows.py: several runs' windows per cell, and the gap closed per run and of the means."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.load_windows import (
    Cell,
    Run,
    gap_of_means,
    gap_per_run,
    keep,
    ratio_of_means,
    ratio_per_run,
    read_runs,
    report,
    windows_by_cell,
)

LEARN = Cell("content", 1.5, "none", "icgate-learn")


def result(system: str, goodput: float, client: str = "none", refused: int = 10, late: int = 1) -> dict:
    return {
        "trace": "content",
        "load": 1.5,
        "client": client,
        "system": system,
        "goodput_rps": goodput,
        "refused": refused,
        "refused_late": late,
    }


def run(name: str, learned: float, constant: float, oracle: float, oracle_client: str = "none") -> Run:
    rows = [
        result("icgate-learn", learned),
        result("icgate-constant", constant),
        result("icgate-oracle", oracle, oracle_client),
    ]
    return Run(name, {}, rows)


def test_each_run_closes_its_own_gap_and_the_means_close_theirs() -> None:
    runs = [run("a", 11.5, 11.0, 12.0), run("b", 11.0, 11.2, 12.2), run("c", 12.0, 11.0, 11.0)]
    cells = windows_by_cell(runs)
    learned = cells[Cell("content", 1.5, "none", "icgate-learn")]
    assert [w.goodput_rps for w in learned] == [11.5, 11.0, 12.0]
    assert learned[0].late_share == pytest.approx(0.1)
    per_run = dict(gap_per_run(cells, LEARN))
    assert per_run["a"] == pytest.approx(0.5)
    assert per_run["b"] == pytest.approx(-0.2)
    assert per_run["c"] is None  # the oracle did no better than the constant: no gap to close
    # Means: learned 11.5, constant 33.2 / 3, oracle 35.2 / 3.
    assert gap_of_means(cells, LEARN) == pytest.approx((11.5 - 33.2 / 3) / (2 / 3))


def test_the_oracle_counts_for_every_client_of_its_run() -> None:
    """(a*)'s client sends the true length whatever the run's client is; `bench/load.py` runs it once per
    load, and its window is the ceiling for the capped client too."""
    capped = Run(
        "d",
        {},
        [
            result("icgate-learn", 11.6, "cap1024"),
            result("icgate-constant", 11.2, "cap1024"),
            result("icgate-oracle", 12.0, "none"),
        ],
    )
    cells = windows_by_cell([capped])
    assert gap_per_run(cells, Cell("content", 1.5, "cap1024", "icgate-learn")) == [("d", pytest.approx(0.5))]
    assert gap_of_means(cells, LEARN) is None  # no (a+) with that client


def test_kept_runs_rebuild_the_report(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    meta = {
        "date": "2026-11-28T19:18:11+00:00",
        "took_s": 600,
        "commit": "commit abc",
        "command": "x",
        "args": {},
    }
    (work / "meta.json").write_text(json.dumps(meta))
    rows = [{**r, "per_backend": {"big": 1}} for r in run("-", 11.5, 11.0, 12.0).results]
    (work / "results.json").write_text(json.dumps(rows))
    kept = keep(work, "a smoke run", tmp_path / "windows")
    assert kept.name == "20261128T191811.json"
    assert "per_backend" not in kept.read_text()  # only what the tables read
    runs = read_runs([kept])
    text = report(runs)
    assert "| content | 1.5x | none | (a+) | 50% (20261128T191811.json) | 50% |" in text
    assert "a smoke run" in text
    assert "| 11.50 | **11.50** | - | 10% |" in text


def test_the_shedding_learned_system_is_measured_against_the_shedding_oracle() -> None:
    """(a+s) closes its gap between (a0) and (a*s), the oracle under the same policy, not (a*)."""
    rows = [
        result("icgate-constant", 11.0),
        result("icgate-oracle", 11.5),
        result("icgate-learn-shed", 13.0),
        result("icgate-oracle-shed", 15.0),
    ]
    cells = windows_by_cell([Run("e", {}, rows)])
    assert gap_per_run(cells, Cell("content", 1.5, "none", "icgate-learn-shed")) == [
        ("e", pytest.approx(0.5))
    ]


def test_the_ratio_to_litellm_is_per_run_against_that_runs_best_and_of_the_means_against_the_best_mean() -> (
    None
):
    """Per run: against the better LiteLLM window of the same run. Of the means: against the configuration
    whose mean is higher, even where it lost a run."""
    runs = [
        Run(
            "a",
            {},
            [result("icgate-learn", 12.0), result("litellm-mpr", 6.0), result("litellm-shuffle-mpr", 8.0)],
        ),
        Run(
            "b",
            {},
            [result("icgate-learn", 14.0), result("litellm-mpr", 10.0), result("litellm-shuffle-mpr", 7.0)],
        ),
        Run("c", {}, [result("icgate-learn", 13.0)]),  # no LiteLLM window: no ratio for this run
    ]
    cells = windows_by_cell(runs)
    assert ratio_per_run(cells, LEARN) == [("a", pytest.approx(1.5)), ("b", pytest.approx(1.4))]
    ratio = ratio_of_means(cells, LEARN)
    assert ratio is not None
    assert ratio[0] == pytest.approx(13.0 / 8.0) and ratio[1] == "litellm-mpr"  # 8.0 against 7.5
    assert "1.50x (a), 1.40x (b)" in report(runs)
    assert ratio_of_means(cells, Cell("content", 2.0, "none", "icgate-learn")) is None
