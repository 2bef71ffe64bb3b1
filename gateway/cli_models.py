"""`icgate router ...` and `icgate length ...`: train, calibrate and evaluate the learned parts.

Trained artifacts are published to the `model_artifacts` table, where every running gateway picks the
newest up without a restart; `eval` prints one JSON object on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import Policy

PolicyArgs = Callable[[argparse.ArgumentParser], None]


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def add_parsers(sub: Any, policy_args: PolicyArgs) -> None:
    length = sub.add_parser("length", help="output-length predictor: train, evaluate")
    lsub = length.add_subparsers(dest="length_command", required=True)
    train = lsub.add_parser("train", help="fit on an Arena-Hard-style file and/or the gateway's own log")
    policy_args(train)
    train.add_argument("--data", type=Path, default=None, help="JSONL of prompts with answers per model")
    train.add_argument("--model", default="gpt-4-0314", help="whose answer lengths to learn")
    train.add_argument("--from-log", action="store_true", help="add the gateway's routed requests")
    train.add_argument("--out", type=Path, default=None, help="also save the artifact to this file")
    ev = lsub.add_parser("eval", help="Kendall's tau and MAE on a labelled file, as one JSON object")
    policy_args(ev)
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--model", default="gpt-4-0314")
    ev.add_argument("--artifact", type=Path, default=None, help="default: the one the gateway loads")


def run_length(args: argparse.Namespace, policy: Policy, data_dir: Path) -> int:
    from routers import length

    if args.length_command == "eval":
        predictor = args.artifact if args.artifact is not None else current_length_model(policy, data_dir)
        print(json.dumps(length.evaluate_file(args.data, args.model, predictor)))
        return 0
    if args.data is None and not args.from_log:
        raise ValueError("give --data FILE, --from-log, or both")
    extra: list[length.LengthRow] = []
    held: list[length.LengthRow] = []
    if args.data is not None:
        rows = length.embed_rows(length.load_length_rows(args.data, args.model))
        extra, held = length.split_rows(rows)
    if args.from_log:
        records = [
            length.LengthRecord(text=s.prompt_text, completion_tokens=s.completion_tokens)
            for s in route_samples(policy, data_dir)
            if s.finish_reason == "stop"
        ]
        say(f"{len(records)} finished answers in the request log")
        predictor = length.refit_from_records(records, default_encode(), extra_rows=extra)
    else:
        predictor = length.LengthPredictor.fit_rows(
            extra, summary={"data": args.data.name, "model": args.model, "buckets": "0-7 of 10"}
        )
    if held:
        predictor.metrics = {"held_out": length.evaluate_length(predictor, held), "held_out_buckets": "8-9"}
    if args.out is not None:
        predictor.save(args.out)
    row = publish(policy, data_dir, "length", predictor.version, predictor.to_bytes(), predictor.summary)
    summary = {k: v for k, v in predictor.summary.items() if k != "trained_prompts"}
    print(json.dumps({"version": predictor.version, "row": row, **summary, **predictor.metrics}, default=str))
    return 0


# -- shared helpers --------------------------------------------------------------------------------------


def default_encode() -> Any:
    from cache.verify import default_encoder

    return default_encoder()


def _engine(policy: Policy, data_dir: Path) -> Any:
    from gateway import db

    data_dir.mkdir(parents=True, exist_ok=True)
    url = policy.database_url(data_dir)
    db.upgrade(url)
    return db.make_engine(url)


def publish(
    policy: Policy,
    data_dir: Path,
    kind: str,
    version: str,
    blob: bytes,
    training: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> int:
    from gateway import model_store

    engine = _engine(policy, data_dir)
    try:
        return model_store.publish(engine, kind, version, blob, training, metrics or {})
    finally:
        engine.dispose()


def stored_model(policy: Policy, data_dir: Path, kind: str) -> Any:
    from gateway import model_store

    engine = _engine(policy, data_dir)
    try:
        return model_store.newest(engine, kind)
    finally:
        engine.dispose()


def current_length_model(policy: Policy, data_dir: Path) -> Any:
    """What the gateway would load: the newest published predictor, else the shipped one."""
    from routers import length

    stored = stored_model(policy, data_dir, "length")
    if stored is not None:
        return length.LengthPredictor.from_bytes(stored.artifact, source=f"model_artifacts row {stored.id}")
    return length.load_length_model()


def route_samples(policy: Policy, data_dir: Path) -> list[Any]:
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from gateway import models

    engine = _engine(policy, data_dir)
    try:
        with Session(engine) as session:
            return list(session.scalars(sa.select(models.RouteSampleRow).order_by(models.RouteSampleRow.id)))
    finally:
        engine.dispose()
