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

from icgate.gateway.cli.main import open_database
from icgate.gateway.config import Policy, models_dir

PolicyArgs = Callable[[argparse.ArgumentParser], None]


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def add_parsers(sub: Any, policy_args: PolicyArgs) -> None:
    router = sub.add_parser("router", help="learned router: train, calibrate, evaluate")
    rsub = router.add_subparsers(dest="router_command", required=True)
    train = rsub.add_parser("train", help="train on RouteLLM-style CSVs and/or the gateway's labelled log")
    policy_args(train)
    train.add_argument("--data", type=Path, nargs="*", default=[], help="CSV: prompt, weak, strong columns")
    train.add_argument("--from-log", action="store_true", help="add route samples labelled by feedback")
    train.add_argument("--kind", choices=["classifier", "knn"], default="classifier")
    knob = train.add_mutually_exclusive_group()
    knob.add_argument("--strong-share", type=float, default=None)
    knob.add_argument("--min-quality", type=float, default=None, help="default 0.95 of the strong model")
    train.add_argument("--all-rows", action="store_true", help="train on every row (no held-out report)")
    train.add_argument("--out", type=Path, default=None, help="also save the artifact to this file")
    cal = rsub.add_parser("calibrate", help="set the current router's threshold; publishes a new version")
    policy_args(cal)
    cal.add_argument(
        "--data", type=Path, nargs="+", required=True, help="labelled rows it was not trained on"
    )
    knob = cal.add_mutually_exclusive_group(required=True)
    knob.add_argument("--strong-share", type=float, default=None)
    knob.add_argument("--min-quality", type=float, default=None)
    ev = rsub.add_parser("eval", help="APGR and CPT of the current router, as one JSON object")
    policy_args(ev)
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--artifact", type=Path, default=None, help="default: the one the gateway loads")

    length = sub.add_parser("length", help="output-length predictor: train, evaluate")
    lsub = length.add_subparsers(dest="length_command", required=True)
    train = lsub.add_parser("train", help="fit on an Arena-Hard-style file and/or the gateway's own log")
    policy_args(train)
    train.add_argument("--data", type=Path, default=None, help="JSONL of prompts with answers per model")
    train.add_argument("--model", default="gpt-4-0314", help="whose answer lengths to learn")
    train.add_argument("--from-log", action="store_true", help="add the gateway's answers (length samples)")
    train.add_argument("--out", type=Path, default=None, help="also save the artifact to this file")
    ev = lsub.add_parser("eval", help="Kendall's tau and MAE on a labelled file, as one JSON object")
    policy_args(ev)
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--model", default="gpt-4-0314")
    ev.add_argument("--artifact", type=Path, default=None, help="default: the one the gateway loads")


def run_router(args: argparse.Namespace, policy: Policy, data_dir: Path) -> int:
    from icgate.routers import data, learned, training

    encode = default_encode(policy, data_dir)
    if args.router_command == "eval":
        trained = (
            learned.LearnedRouter.load(args.artifact)
            if args.artifact is not None
            else current_router(policy, data_dir)
        )
        rows = data.load_routing_csv(args.data)
        unseen = training.unseen_rows(trained, rows)
        if not unseen:
            raise ValueError(
                f"{args.data}: every row was used to train this router; nothing left to evaluate"
            )
        metrics = training.evaluate_router(trained, unseen, encode).as_dict()
        metrics.pop("curve")
        print(json.dumps({**metrics, "router": trained.version, "skipped_trained": len(rows) - len(unseen)}))
        return 0
    if args.router_command == "calibrate":
        trained = current_router(policy, data_dir)
        rows = training.unseen_rows(trained, [r for path in args.data for r in data.load_routing_csv(path)])
        if not rows:
            raise ValueError("every row was used to train this router: calibrate on rows it has not seen")
        threshold = training.recalibrate(
            trained, rows, encode, strong_share=args.strong_share, min_quality=args.min_quality
        )
        trained.metadata["version"] = f"{trained.version.split('+')[0]}+t{threshold:.4f}"
        row = publish(
            policy, data_dir, "router", trained.version, trained.to_bytes(), trained.metadata["training"]
        )
        print(json.dumps({"version": trained.version, "row": row, "threshold": threshold, "rows": len(rows)}))
        return 0
    rows = [r for path in args.data for r in data.load_routing_csv(path)]
    if args.from_log:
        logged = log_rows(policy, data_dir)
        say(f"{len(logged)} labelled route samples in the log")
        rows += logged
    if not rows:
        raise ValueError("no training rows: give --data FILE ... and/or --from-log")
    min_quality = args.min_quality if args.min_quality is not None or args.strong_share is not None else 0.95
    trained = training.train_router(
        rows,
        encode,
        args.kind,
        hold_out=not args.all_rows,
        min_quality=min_quality,
        strong_share=args.strong_share,
        sources=[p.name for p in args.data] + (["request log"] if args.from_log else []),
    )
    training.remember_training(trained, rows if args.all_rows else data.split_rows(rows)[0], encode)
    if args.out is not None:
        trained.save(args.out)
    row = publish(
        policy, data_dir, "router", trained.version, trained.to_bytes(), trained.metadata["training"]
    )
    held = trained.metadata.get("held_out", {})
    print(
        json.dumps({"version": trained.version, "row": row, "threshold": trained.threshold, "held_out": held})
    )
    return 0


def current_router(policy: Policy, data_dir: Path) -> Any:
    """What the gateway would load: the policy's artifact file, else the newest published, else shipped."""
    from icgate.routers.learned import DEFAULT_ARTIFACT, LearnedRouter

    if policy.router.artifact is not None:
        return LearnedRouter.load(policy.router.artifact)
    stored = stored_model(policy, data_dir, "router")
    if stored is not None:
        return LearnedRouter.from_bytes(stored.artifact)
    return LearnedRouter.load(DEFAULT_ARTIFACT)


def log_rows(policy: Policy, data_dir: Path) -> list[Any]:
    """Labelled route samples as training rows: a small-tier answer's label says whether the weak model
    was good enough; the strong model's verdict is not observed (so such rows train P(small ok))."""
    from icgate.gateway.store.route_samples import GOOD_ENOUGH
    from icgate.routers.data import rows_from_records

    records = [
        {"prompt": s.prompt_text, "weak_ok": s.label >= GOOD_ENOUGH, "group": "request log"}
        for s in route_samples(policy, data_dir)
        if s.label is not None and s.tier == policy.router.default_tier
    ]
    return rows_from_records(records)


def run_length(args: argparse.Namespace, policy: Policy, data_dir: Path) -> int:
    from icgate.lengths import training as length

    encode = default_encode(policy, data_dir)
    if args.length_command == "eval":
        predictor = args.artifact if args.artifact is not None else current_length_model(policy, data_dir)
        print(json.dumps(length.evaluate_file(args.data, args.model, predictor, encode)))
        return 0
    if args.data is None and not args.from_log:
        raise ValueError("give --data FILE, --from-log, or both")
    extra: list[length.LengthRow] = []
    held: list[length.LengthRow] = []
    if args.data is not None:
        rows = length.embed_rows(length.load_length_rows(args.data, args.model), encode)
        extra, held = length.split_rows(rows)
    if args.from_log:
        answers = logged_answers(policy, data_dir)
        finished = [a for a in answers if not a.truncated]
        say(f"{len(answers)} answers in the length samples, {len(answers) - len(finished)} of them truncated")
        if extra:  # with a file: its rows and the finished answers, as one fit
            records = [
                length.LengthRecord(text=a.text, completion_tokens=a.completion_tokens, embedding=a.embedding)
                for a in finished
            ]
            predictor = length.refit_from_records(records, encode, extra_rows=extra)
        else:  # the gateway's own refit, over every backend's answers (truncated ones as lower bounds)
            predictor = length.fit_logged(answers, summary={"data": "length samples, every backend"})
    else:
        predictor = length.fit_rows(
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


def default_encode(policy: Policy, data_dir: Path) -> Any:
    """The embedder as the gateway runs it (the policy's runtime, graphs in `<data dir>/models`): a model
    trained here sees at training the vectors it will see at every request."""
    from icgate.cache.calibrate import default_encoder

    return default_encoder(None, models_dir(data_dir), policy.embedding.runtime)


def publish(
    policy: Policy,
    data_dir: Path,
    kind: str,
    version: str,
    blob: bytes,
    training: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> int:
    from icgate.gateway.store import artifacts

    engine = open_database(policy, data_dir)
    try:
        return artifacts.publish(engine, kind, version, blob, training, metrics or {})
    finally:
        engine.dispose()


def stored_model(policy: Policy, data_dir: Path, kind: str) -> Any:
    from icgate.gateway.store import artifacts

    engine = open_database(policy, data_dir)
    try:
        return artifacts.newest(engine, kind)
    finally:
        engine.dispose()


def current_length_model(policy: Policy, data_dir: Path) -> Any:
    """What the gateway would load: the newest published predictor, else the shipped one."""
    from icgate.lengths import predict as length

    stored = stored_model(policy, data_dir, "length")
    if stored is not None:
        return length.LengthPredictor.from_bytes(stored.artifact, source=f"model_artifacts row {stored.id}")
    return length.load_length_model()


def logged_answers(policy: Policy, data_dir: Path) -> list[Any]:
    """Every backend's kept length samples (`length_samples`), usable ones, oldest first per backend."""
    from icgate.gateway.store import length_samples

    engine = open_database(policy, data_dir)
    try:
        backends = [c.backend for c in length_samples.counts(engine)]
        return [
            a for b in backends for a in length_samples.newest_answers(engine, b, policy.lengths.max_rows)[0]
        ]
    finally:
        engine.dispose()


def route_samples(policy: Policy, data_dir: Path) -> list[Any]:
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from icgate.gateway.store import tables

    engine = open_database(policy, data_dir)
    try:
        with Session(engine) as session:
            return list(session.scalars(sa.select(tables.RouteSampleRow).order_by(tables.RouteSampleRow.id)))
    finally:
        engine.dispose()
