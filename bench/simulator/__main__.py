"""`python -m bench.simulator --preset small --port 8201`: serve one simulated backend until interrupted."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from bench.simulator.engine import EngineConfig
from bench.simulator.lengths import LengthBook
from bench.simulator.server import Simulator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.simulator", description=__doc__)
    parser.add_argument("--preset", choices=EngineConfig.PRESETS, default="small")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8201)
    parser.add_argument("--model-name", help="the served model id (default: sim-PRESET)")
    parser.add_argument("--stream-interval-ms", type=float, default=50.0)
    parser.add_argument(
        "--lengths",
        type=Path,
        help="out-of-band answer lengths (bench/simulator/lengths.py): known conversations get theirs",
    )
    # Every EngineConfig field can override the preset, e.g. --max-num-seqs 8.
    for f in dataclasses.fields(EngineConfig):
        kind = int if f.type in (int, "int") else float
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None)
    return parser


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(EngineConfig)
        if getattr(args, f.name) is not None
    }
    return EngineConfig.preset(args.preset, **overrides)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = build_parser().parse_args(argv)
    sim = Simulator(
        config_from_args(args),
        model_name=args.model_name or f"sim-{args.preset}",
        stream_interval_ms=args.stream_interval_ms,
        lengths=LengthBook.load(args.lengths) if args.lengths else None,
    )
    uvicorn.run(sim.app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
