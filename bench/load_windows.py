"""Several windows of the load benchmark's cells side by side: is a difference bigger than the noise?

One `bench/load.py` run replays each (trace, load, client, system) cell once, in one 60 s window. On these
shared machines a cell's goodput moves by several tenths of a request per second from run to run. That is
about the size of the gap issue 18's target is about: (a0), one constant length, against (a*), the oracle.
This script puts the runs' windows together. For each cell it shows each window's goodput, their mean and
spread. It then shows the target's "gap closed", from each run's own three windows and from the means.

    .venv/bin/python bench/load_windows.py --keep /tmp/icgate-load-XXXX --note "..."  # keep a run's results
    .venv/bin/python bench/load_windows.py  # bench/results/load_windows/*.json -> load_windows.md

`--keep` copies the part of a finished run's `results.json` that the tables read, with its `meta.json`,
into bench/results/load_windows/, so the report can be rebuilt from the repository alone.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.load import LEARNED_SYSTEMS, SYSTEMS, gap_closed, oracle_for  # noqa: E402

WINDOWS = REPO / "bench" / "results" / "load_windows"
KEPT = (
    "trace",
    "load",
    "client",
    "system",
    "sent",
    "good",
    "goodput_rps",
    "refused",
    "refused_late",
    "ttft_p99_s",
)
CONSTANT = "icgate-constant"


@dataclass(frozen=True)
class Cell:
    trace: str
    load: float
    client: str
    system: str


@dataclass(frozen=True)
class Window:
    """One run's result for one cell."""

    run: str  # the file it came from
    goodput_rps: float
    late_share: float | None  # of its 429s, those after queueing


@dataclass(frozen=True)
class Run:
    name: str
    meta: Mapping[str, Any]
    results: Sequence[Mapping[str, Any]]


def keep(work: Path, note: str, dest: Path = WINDOWS) -> Path:
    """A finished run's results (the fields the tables read) and meta, as one file under `dest`."""
    meta = json.loads((work / "meta.json").read_text())
    results = [{k: r.get(k) for k in KEPT} for r in json.loads((work / "results.json").read_text())]
    dest.mkdir(parents=True, exist_ok=True)
    stamp = str(meta["date"])[:19].replace(":", "").replace("-", "")
    path = dest / f"{stamp}.json"
    keys = ("date", "took_s", "commit", "command", "load_start", "load_end")
    path.write_text(
        json.dumps({"note": note, "meta": {k: meta.get(k) for k in keys}, "results": results}, indent=1)
    )
    return path


def read_runs(paths: Sequence[Path]) -> list[Run]:
    runs = []
    for path in sorted(paths):
        data = json.loads(path.read_text())
        runs.append(Run(path.name, {**data["meta"], "note": data.get("note", "")}, data["results"]))
    return runs


def _late_share(result: Mapping[str, Any]) -> float | None:
    refused = int(result.get("refused") or 0)
    return int(result.get("refused_late") or 0) / refused if refused else None


def windows_by_cell(runs: Sequence[Run]) -> dict[Cell, list[Window]]:
    """Every cell's windows, in the order of the runs. (a*)'s client always sends the true length, so its
    cell has the client of the run it sits in."""
    cells: dict[Cell, list[Window]] = {}
    for run in runs:
        for r in run.results:
            cell = Cell(str(r["trace"]), float(r["load"]), str(r["client"]), str(r["system"]))
            cells.setdefault(cell, []).append(Window(run.name, float(r["goodput_rps"]), _late_share(r)))
    return cells


def spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _oracle_windows(
    cells: Mapping[Cell, Sequence[Window]], trace: str, load: float, oracle: str
) -> list[Window]:
    """The oracle's windows at (trace, load), whichever client its run had (it sends the true length)."""
    return [w for c, ws in cells.items() if (c.trace, c.load, c.system) == (trace, load, oracle) for w in ws]


def gap_per_run(cells: Mapping[Cell, Sequence[Window]], cell: Cell) -> list[tuple[str, float | None]]:
    """Gap closed by a learned system (`cell.system`: (a), (a+) or (a+s)) in each run that has it, (a0) and
    its oracle ((a*), or (a*s) for (a+s)) at the cell: each run's own windows."""
    trace, load, client = cell.trace, cell.load, cell.client
    learned = {w.run: w.goodput_rps for w in cells.get(cell, ())}
    constant = {w.run: w.goodput_rps for w in cells.get(Cell(trace, load, client, CONSTANT), ())}
    oracle = {w.run: w.goodput_rps for w in _oracle_windows(cells, trace, load, oracle_for(cell.system))}
    runs = [run for run in learned if run in constant and run in oracle]
    return [(run, gap_closed(learned[run], constant[run], oracle[run])) for run in runs]


def gap_of_means(cells: Mapping[Cell, Sequence[Window]], cell: Cell) -> float | None:
    learned = cells.get(cell)
    constant = cells.get(Cell(cell.trace, cell.load, cell.client, CONSTANT))
    oracle = _oracle_windows(cells, cell.trace, cell.load, oracle_for(cell.system))
    if not learned or not constant or not oracle:
        return None
    return gap_closed(*(spread([w.goodput_rps for w in ws])[0] for ws in (learned, constant, oracle)))


def _litellm_cells(cells: Mapping[Cell, Sequence[Window]], cell: Cell) -> list[Cell]:
    """LiteLLM's configurations at the cell's trace, load and client."""
    return [
        c
        for c in cells
        if (c.trace, c.load, c.client) == (cell.trace, cell.load, cell.client)
        and SYSTEMS[c.system].kind == "litellm"
    ]


def ratio_per_run(cells: Mapping[Cell, Sequence[Window]], cell: Cell) -> list[tuple[str, float]]:
    """The cell's goodput over the best LiteLLM window of the same run, in each run that has both: the
    target's ratio as that one run saw it."""
    best: dict[str, float] = {}
    for rival in _litellm_cells(cells, cell):
        for w in cells[rival]:
            best[w.run] = max(best.get(w.run, 0.0), w.goodput_rps)
    return [(w.run, w.goodput_rps / best[w.run]) for w in cells.get(cell, ()) if best.get(w.run)]


def ratio_of_means(cells: Mapping[Cell, Sequence[Window]], cell: Cell) -> tuple[float, str] | None:
    """The cell's mean goodput over the mean of the LiteLLM configuration with the higher mean, and which
    one that is. A single window of LiteLLM moves by several requests per second from run to run, so the
    means of interleaved windows are the fairer comparison."""
    rivals = [(spread([w.goodput_rps for w in cells[c]])[0], c.system) for c in _litellm_cells(cells, cell)]
    if not rivals or not cells.get(cell):
        return None
    mean, system = max(rivals)
    return (spread([w.goodput_rps for w in cells[cell]])[0] / mean, system) if mean > 0 else None


def _short(system: str) -> str:
    """A system's tag, "(a+)" for "(a+) icgate, admission, ..."."""
    return SYSTEMS[system].label.split(")")[0] + ")"


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def report(runs: Sequence[Run]) -> str:
    cells = windows_by_cell(runs)
    lines = [
        "# Load benchmark: several windows per cell",
        "",
        "Written by `bench/load_windows.py` from the runs kept in `bench/results/load_windows/` (one file",
        "per `bench/load.py` run). Each run replays each cell once, a 60 s window; here each cell's windows",
        "from every run are put side by side. Everything else about the runs (setup, what the client sent,",
        "what the gateway could know) is in `bench/results/load.md` and `docs/load-benchmark.md`.",
        "",
        "## Runs",
        "",
        "| file | date | took | code | command | note |",
        "| --- | --- | ---: | --- | --- | --- |",
    ]
    for run in runs:
        m = run.meta
        lines.append(
            f"| {run.name} | {m.get('date')} | {float(m.get('took_s') or 0) / 60:.0f} min | "
            f"{m.get('commit')} | `{m.get('command')}` | {m.get('note')} |"
        )
    lines += [
        "",
        "## Goodput per cell (req/s)",
        "",
        "| trace | load | client | system | windows | goodput per window | mean | sd | "
        "late share per window |",
        "| --- | ---: | --- | --- | ---: | --- | ---: | ---: | --- |",
    ]
    order = list(SYSTEMS)
    for cell in sorted(cells, key=lambda c: (c.trace, c.load, c.client, order.index(c.system))):
        ws = cells[cell]
        mean, sd = spread([w.goodput_rps for w in ws])
        lines.append(
            f"| {cell.trace} | {cell.load:g}x | {cell.client} | {SYSTEMS[cell.system].label} | {len(ws)} | "
            f"{', '.join(f'{w.goodput_rps:.2f}' for w in ws)} | **{mean:.2f}** | {_f(sd)} | "
            f"{', '.join(_f(w.late_share, '{:.0%}') for w in ws)} |"
        )
    lines += [
        "",
        "## Gap closed between (a0) and the oracle (target: at least 50% on `content` at 1.5x)",
        "",
        "For (a) and (a+) the oracle is (a*); for (a+s), which sheds the longest under load, it is (a*s),",
        "the oracle under the same policy. Per run: the three from that run's own windows. Of the means:",
        "from each cell's mean over all its windows.",
        "",
        "| trace | load | client | system | per run | of the means |",
        "| --- | ---: | --- | --- | --- | ---: |",
    ]
    targets = sorted(
        (c for c in cells if c.system in LEARNED_SYSTEMS),
        key=lambda c: (c.trace, c.load, c.client, order.index(c.system)),
    )
    for cell in targets:
        per_run = ", ".join(f"{_f(g, '{:.0%}')} ({run})" for run, g in gap_per_run(cells, cell))
        means = _f(gap_of_means(cells, cell), "{:.0%}")
        lines.append(
            f"| {cell.trace} | {cell.load:g}x | {cell.client} | {_short(cell.system)} | {per_run or '-'} | "
            f"{means} |"
        )
    lines += [
        "",
        "## Against the best LiteLLM configuration (target: at least 1.5x on `content` at 1.5x)",
        "",
        "Per run: the system's window over the best LiteLLM window of the same run. Of the means: the",
        "system's mean over the mean of the LiteLLM configuration with the higher mean, all windows counted.",
        "",
        "| trace | load | client | system | per run | of the means | against |",
        "| --- | ---: | --- | --- | --- | ---: | --- |",
    ]
    for cell in targets:
        per_run = ", ".join(f"{r:.2f}x ({run})" for run, r in ratio_per_run(cells, cell))
        of_means = ratio_of_means(cells, cell)
        ratio, against = (f"{of_means[0]:.2f}x", _short(of_means[1])) if of_means else ("-", "-")
        lines.append(
            f"| {cell.trace} | {cell.load:g}x | {cell.client} | {_short(cell.system)} | {per_run or '-'} | "
            f"{ratio} | {against} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", type=Path, metavar="WORK_DIR", help="copy a finished run's results in first")
    p.add_argument("--note", default="", help="with --keep: what the run was (shown in the table of runs)")
    p.add_argument("--windows", type=Path, default=WINDOWS)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load_windows.md")
    args = p.parse_args(argv)
    if args.keep is not None:
        print(f"kept {keep(args.keep, args.note, args.windows)}")
    runs = read_runs(list(args.windows.glob("*.json")))
    if not runs:
        p.error(f"no runs in {args.windows}")
    args.out.write_text(report(runs))
    print(f"wrote {args.out} from {len(runs)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
