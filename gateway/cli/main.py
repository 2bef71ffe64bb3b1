"""`icgate`: serve, check a policy, migrate the database, manage API keys and admin keys, the cache and the
learned parts."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from icgate.gateway.config import DEFAULT_POLICY, Policy, PolicyError, ServerConfig, load_policy, models_dir

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def default_data_dir() -> Path:
    return Path(os.environ.get("ICGATE_DATA_DIR", "data"))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icgate", description="OpenAI-compatible LLM gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    def policy_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy file (YAML)")
        p.add_argument("--data-dir", type=Path, default=None, help="data directory (default: ./data)")

    serve = sub.add_parser("serve", help="run the gateway")
    policy_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--no-launch", action="store_true", help="do not start local backends")
    serve.add_argument(
        "--workers", type=positive_int, default=1, help="gateway processes on the port (docs/performance.md)"
    )
    serve.add_argument(
        "--root-path",
        type=root_path_arg,
        default=None,
        help="the path prefix a reverse proxy serves the gateway under (`/llm`)",
    )

    prepare = sub.add_parser(
        "prepare",
        help="export the policy's inference graphs into the data directory (serve does it if needed)",
    )
    policy_args(prepare)

    check = sub.add_parser("check-policy", help="validate a policy file")
    check.add_argument("file", type=Path)

    dbp = sub.add_parser("db", help="database schema")
    dbsub = dbp.add_subparsers(dest="db_command", required=True)
    policy_args(dbsub.add_parser("upgrade", help="apply all migrations"))

    keys = sub.add_parser("keys", help="API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="create a key; it is shown once, as the last line")
    policy_args(create)
    create.add_argument("--tenant", required=True)
    revoke = ksub.add_parser("revoke", help="revoke a key by its id")
    policy_args(revoke)
    revoke.add_argument("key_id", type=int)
    policy_args(ksub.add_parser("list", help="list keys (never their secrets)"))

    admin = sub.add_parser("admin", help="admin keys for the console (docs/admin.md)")
    asub = admin.add_subparsers(dest="admin_command", required=True)
    make = asub.add_parser("create-key", help="create an admin key; it is shown once, as the last line")
    policy_args(make)
    make.add_argument("--name", default="admin", help="who the key is for, recorded with what it changes")
    drop = asub.add_parser("revoke-key", help="revoke an admin key by its id (its sessions end too)")
    policy_args(drop)
    drop.add_argument("key_id", type=int)
    policy_args(asub.add_parser("list-keys", help="list admin keys (never their secrets)"))

    cache = sub.add_parser("cache", help="semantic cache: calibrate, evaluate, replay")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    cal = csub.add_parser("calibrate", help="fit the hit threshold and verifier for a target precision")
    policy_args(cal)
    cal.add_argument("--pairs", type=Path, required=True, help="labelled pairs (JSONL or CSV)")
    cal.add_argument("--precision", type=float, default=0.95)
    cal.add_argument(
        "--max-pairs", type=int, default=None, help="pairs for the classifier and thresholds (default: all)"
    )
    cal.add_argument(
        "--cross-encoder-steps",
        type=int,
        default=0,
        help="fine-tune a MiniLM cross-encoder for this many steps (32 pairs each) on the pairs --max-pairs "
        "leaves over, as one more feature; 0 (default): none. The shipped verifier used 3000 (~20 min on 2 "
        "cores): see cache/artifacts/README.md",
    )
    cal.add_argument("--tuned-layers", type=int, default=6, help="top MiniLM layers the cross-encoder tunes")
    cal.add_argument(
        "--layers",
        type=int,
        default=None,
        help="keep only the bottom N of MiniLM's 6 layers in the cross-encoder (cost per pair grows with N; "
        "default: all 6)",
    )
    cal.add_argument(
        "--distill-from",
        type=Path,
        default=None,
        help="with --cross-encoder-steps: distil the new cross-encoder from this artifact's (made from the "
        "same file and --max-pairs), blending its probabilities into the labels",
    )
    cal.add_argument(
        "--cross-encoder-from",
        type=Path,
        default=None,
        help="reuse the cross-encoder of this artifact (made from the same file and --max-pairs) "
        "instead of training one (not with --cross-encoder-steps): a new operating point in minutes",
    )
    cal.add_argument(
        "--cross-encoder-runtime",
        choices=["torch", "onnx", "onnx-int8"],
        default="torch",
        help="with --cross-encoder-from: compute its logits on this runtime (onnx-int8: int8 weights, "
        "cheaper; the artifact records it and the gateway serves it the same way)",
    )
    cal.add_argument(
        "--one-order",
        action="store_true",
        help="with --cross-encoder-from: read each pair once, not both orders averaged (half the cost)",
    )
    cal.add_argument(
        "--out", type=Path, default=None, help="artifact path (default: <data-dir>/hit_verifier.joblib)"
    )
    ev = csub.add_parser("eval", help="precision, recall and F1 of the hit decision on labelled pairs")
    policy_args(ev)
    ev.add_argument("--pairs", type=Path, required=True)
    ev.add_argument(
        "--verifier", type=Path, default=None, help="artifact (default: the one the gateway loads)"
    )
    ev.add_argument("--max-pairs", type=int, default=None)
    rep = csub.add_parser("replay", help="regenerate valuable answers with the large model while it is idle")
    policy_args(rep)
    rep.add_argument("--budget", type=float, required=True, help="USD to spend at most")
    rep.add_argument("--max-entries", type=int, default=100)
    rep.add_argument("--gateway", default=None, help="a running gateway's URL, to replay only while idle")
    rep.add_argument("--idle-wait-s", type=float, default=30.0)
    rep.add_argument("--prune-after-days", type=float, default=7.0)
    rep.add_argument("--dry-run", action="store_true")

    from icgate.gateway.cli import training

    training.add_parsers(sub, policy_args)
    return parser


def root_path_arg(text: str) -> str:
    try:
        ServerConfig(root_path=text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a path prefix such as /llm") from None
    return text


def with_root_path(policy: Policy, root_path: str | None) -> Policy:
    """The policy with `--root-path` in its server section (the flag wins over the file)."""
    if root_path is None:
        return policy
    return policy.model_copy(update={"server": policy.server.model_copy(update={"root_path": root_path})})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # litellm logs every call at INFO; the gateway's own request log says more, once.
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx", "sentence_transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if args.command == "check-policy":
            policy = load_policy(args.file)
            routed = ", ".join(policy.routed_models)
            print(f"{args.file}: ok ({len(policy.backends)} backends, routed: {routed})")
            return 0
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    data_dir = args.data_dir or default_data_dir()
    if args.command == "serve":
        return serve_command(args, policy, data_dir)
    if args.command == "db":
        return migrate(policy, data_dir)
    if args.command == "prepare":
        return prepare_models(policy, data_dir)
    if args.command == "cache":
        try:
            return manage_cache(args, policy, data_dir)
        except (OSError, ValueError) as exc:
            print(f"icgate cache {args.cache_command}: {exc}", file=sys.stderr)
            return 2
    if args.command in ("router", "length"):
        from icgate.gateway.cli import training

        run = training.run_router if args.command == "router" else training.run_length
        try:
            return run(args, policy, data_dir)
        except (OSError, ValueError) as exc:
            sub = getattr(args, f"{args.command}_command")
            print(f"icgate {args.command} {sub}: {exc}", file=sys.stderr)
            return 2
    manage = {"admin": manage_admin_keys}.get(args.command, manage_keys)
    return manage(args, policy, data_dir)


def serve_command(args: argparse.Namespace, policy: Policy, data_dir: Path) -> int:
    """`icgate serve`: refused in one line if the database cannot be written, else one or more workers."""
    from icgate.gateway.store.db import DatabaseUnusableError, check_writable

    try:  # one clear line now, not a traceback from the server's start-up
        check_writable(policy.database_url(data_dir))
    except DatabaseUnusableError as exc:
        print(f"icgate serve: {exc}", file=sys.stderr)
        return 2
    policy = with_root_path(policy, args.root_path)
    # The shipped default policy is never rewritten: the console's changes to it live in the database.
    path = None if args.policy == DEFAULT_POLICY else args.policy
    if args.workers > 1:
        return serve_workers(
            policy, data_dir, args.host, args.port, args.workers, not args.no_launch, policy_path=path
        )
    return serve(policy, data_dir, args.host, args.port, launch_local=not args.no_launch, policy_path=path)


def serve(
    policy: Policy,
    data_dir: Path,
    host: str,
    port: int,
    launch_local: bool,
    sock: socket.socket | None = None,
    policy_path: Path | None = None,
) -> int:
    """One gateway process; on `sock` (a worker's shared listening socket) instead of host:port if given."""
    from icgate.gateway.api.app import create_app
    from icgate.gateway.api.server import build_server, raise_fd_limit
    from icgate.gateway.wiring import Gateway

    # Idle sockets must not run the process out of descriptors before the connection cap refuses them.
    soft, hard = raise_fd_limit()
    logging.getLogger("icgate").info("file-descriptor limit %d (hard %d)", soft, hard)
    gateway = Gateway(policy, data_dir, launch_local=launch_local, policy_path=policy_path)
    app = create_app(gateway, freeze_heap=True)
    server = build_server(app, host, port, log_level="info")
    server.run(sockets=None if sock is None else [sock])
    return 0 if server.started else 3  # uvicorn's exit status for a failed start


def serve_workers(
    policy: Policy,
    data_dir: Path,
    host: str,
    port: int,
    workers: int,
    launch_local: bool,
    policy_path: Path | None = None,
) -> int:
    """`serve` in several processes on one port (gateway/api/workers.py says what they share)."""
    from icgate.cache.onnx_models import default_threads
    from icgate.gateway.api import workers as worker_processes

    if launch_local and any(b.launch is not None for b in policy.backends):
        print(
            "icgate serve --workers: the policy launches local llama.cpp servers, which one gateway must "
            "own; start them on their own (or use one worker) and pass --no-launch",
            file=sys.stderr,
        )
        return 2
    if policy.embedding.threads is None:  # share the cores: the workers' loops need them too
        threads = default_threads(workers)
        policy = policy.model_copy(
            update={"embedding": policy.embedding.model_copy(update={"threads": threads})}
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    migrate(policy, data_dir)  # once, before the workers race to do it
    try:
        sock = worker_processes.listening_socket(host, port)
    except OSError as exc:
        print(f"icgate serve: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 3
    return worker_processes.serve_workers(
        workers,
        sock,
        lambda s: serve(policy, data_dir, host, port, launch_local=False, sock=s, policy_path=policy_path),
    )


def prepare_models(policy: Policy, data_dir: Path) -> int:
    """Export what the policy's runtime needs (the embedder's and the verifier's graphs), so that the
    first `serve` starts as fast as every later one. Already exported graphs are reused."""
    import time

    from icgate.gateway.store.cache_entries import load_verifier
    from icgate.gateway.wiring import EmbeddingService

    started = time.perf_counter()
    service = EmbeddingService(policy.embedding, models_dir(data_dir))
    try:
        embedder = service.load()
        if policy.cache.enabled and policy.cache.semantic:
            load_verifier(policy.cache.verifier, data_dir, service.cross_encoder_loader())
    except (OSError, ValueError) as exc:  # a missing or foreign model or verifier file
        print(f"icgate prepare: {exc}", file=sys.stderr)
        return 2
    took = time.perf_counter() - started
    print(f"{policy.embedding.runtime} models ready in {service.graphs} (dim {embedder.dim}, {took:.1f} s)")
    return 0


def migrate(policy: Policy, data_dir: Path) -> int:
    from icgate.gateway.store import db

    data_dir.mkdir(parents=True, exist_ok=True)
    url = policy.database_url(data_dir)
    db.upgrade(url)
    print(f"database at revision {db.current_revision(url)}")
    return 0


def open_database(policy: Policy, data_dir: Path) -> Any:
    """The policy's database, migrated to head (the data directory is created if needed)."""
    from icgate.gateway.store import db

    data_dir.mkdir(parents=True, exist_ok=True)
    url = policy.database_url(data_dir)
    db.upgrade(url)
    return db.make_engine(url)


def announce_revocation(policy: Policy) -> str:
    """Tell the running replicas that share Redis (they forget their cached keys at once); else they
    follow within their key cache's 5 s. Returns what to add to the command's line."""
    url = policy.shared_state.url()
    if url is None:
        return ""
    from redis import Redis
    from redis.exceptions import RedisError

    try:
        with Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0) as client:
            client.publish(f"{policy.shared_state.key_prefix}:keys-revoked", "1")
    except (RedisError, OSError) as exc:
        return f" (Redis did not answer ({type(exc).__name__}): running gateways follow within 5 s)"
    return " (running gateways told through Redis)"


def manage_keys(args: argparse.Namespace, policy: Policy, data_dir: Path) -> int:
    from icgate.gateway.store import keys

    engine = open_database(policy, data_dir)
    try:
        if args.keys_command == "create":
            created = keys.create_key(engine, args.tenant)
            print(f"key id {created.key_id} for tenant {created.tenant_name}; it is shown only once:")
            print(created.key)
            return 0
        if args.keys_command == "revoke":
            if keys.revoke_key(engine, args.key_id):
                print(f"key {args.key_id} revoked{announce_revocation(policy)}")
                return 0
            print(f"no key with id {args.key_id}", file=sys.stderr)
            return 1
        for info in keys.list_keys(engine):
            state = "active" if info.active else "revoked"
            print(f"{info.key_id}\t{info.tenant_name}\t{info.key_prefix}\t{state}")
        return 0
    finally:
        engine.dispose()


def manage_admin_keys(args: argparse.Namespace, policy: Policy, data_dir: Path) -> int:
    """Admin keys in the policy's database: a running gateway accepts a new one, and refuses a revoked
    one, within a few seconds (docs/admin.md)."""
    from icgate.gateway.store import admin_keys

    engine = open_database(policy, data_dir)
    try:
        if args.admin_command == "create-key":
            try:
                created = admin_keys.create_admin_key(engine, args.name)
            except ValueError as exc:
                print(f"icgate admin create-key: {exc}", file=sys.stderr)
                return 2
            print(f"admin key id {created.key_id} ({created.name}); it is shown only once:")
            print(created.key)
            return 0
        if args.admin_command == "revoke-key":
            if admin_keys.revoke_admin_key(engine, args.key_id):
                print(f"admin key {args.key_id} revoked")
                return 0
            print(f"no admin key with id {args.key_id}", file=sys.stderr)
            return 1
        print("id\tname\tstarts with\tcreated\tlast used\tstate")
        for info in admin_keys.list_admin_keys(engine):
            used = info.last_used_at.isoformat(timespec="seconds") if info.last_used_at else "never"
            state = "active" if info.active else "revoked"
            created_at = info.created_at.isoformat(timespec="seconds")
            print(f"{info.key_id}\t{info.name}\t{info.key_prefix}\t{created_at}\t{used}\t{state}")
        return 0
    finally:
        engine.dispose()


def manage_cache(args: argparse.Namespace, policy: Policy, data_dir: Path) -> int:
    import asyncio
    import json

    from icgate.cache import calibrate
    from icgate.gateway.store.cache_entries import CALIBRATED_NAME, verifier_path

    embeddings = data_dir / "embeddings" / calibrate.EMBEDDING_MODEL_NAME
    if args.cache_command == "calibrate":
        out = args.out or data_dir / CALIBRATED_NAME
        out.parent.mkdir(parents=True, exist_ok=True)
        from icgate.cache.cross_encoder_training import TrainingConfig
        from icgate.cache.verify import CrossEncoderRuntime

        training = None
        if args.cross_encoder_steps > 0:
            depth = args.layers
            training = TrainingConfig(
                tuned_layers=args.tuned_layers if depth is None else min(args.tuned_layers, depth),
                steps=args.cross_encoder_steps,
                layers=depth,
            )
        verifier = calibrate.calibrate_file(
            args.pairs,
            out,
            embeddings,
            args.precision,
            max_pairs=args.max_pairs,
            cross_encoder=calibrate.CrossEncoderSource(
                train=training,
                reuse=args.cross_encoder_from,
                teacher=args.distill_from,
                runtime=CrossEncoderRuntime(args.cross_encoder_runtime, both_orders=not args.one_order),
                graphs=models_dir(data_dir),
            ),
            progress=lambda line: print(line, file=sys.stderr, flush=True),
            embedding_runtime=policy.embedding.runtime,
        )
        print(
            json.dumps({"artifact": str(out), "version": verifier.version, **verifier.metrics}, default=str)
        )
        return 0
    if args.cache_command == "eval":
        path = args.verifier or verifier_path(policy.cache.verifier, data_dir)
        result = calibrate.evaluate_file(
            args.pairs,
            path,
            embeddings,
            max_pairs=args.max_pairs,
            graphs=models_dir(data_dir),
            embedding_runtime=policy.embedding.runtime,
        )
        print(json.dumps(result, default=str))
        return 0
    from icgate.gateway.cli.replay import run_replay

    summary = asyncio.run(
        run_replay(
            policy,
            data_dir,
            args.budget,
            max_entries=args.max_entries,
            gateway_url=args.gateway,
            idle_wait_s=args.idle_wait_s,
            prune_after_days=args.prune_after_days,
            dry_run=args.dry_run,
        )
    )
    print(json.dumps(summary.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
