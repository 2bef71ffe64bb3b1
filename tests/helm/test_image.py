"""The Dockerfile the chart's pods run, read with BuildKit's own parser (the `dockerfile` package wraps it):
no Docker engine runs here, so it is checked for what the chart relies on, not built (docs/kubernetes.md says
what a build on a machine with Docker showed, and how to repeat it)."""

from __future__ import annotations

import shlex
from pathlib import Path

import dockerfile  # type: ignore[import-not-found]

from icgate.gateway.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
# What the chart mounts and passes (helm/icgate/templates/_helpers.tpl).
CHART_POLICY = Path("/etc/icgate/policy.yaml")
CHART_DATA_DIR = Path("/var/lib/icgate")
CHART_USER = "10001"


def commands() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(REPO / "Dockerfile")))


def final_stage() -> list[dockerfile.Command]:
    parsed = commands()
    last_from = max(i for i, c in enumerate(parsed) if c.cmd == "FROM")
    return parsed[last_from:]


def args_of(commands_: list[dockerfile.Command]) -> dict[str, str]:
    return dict(c.value[0].split("=", 1) for c in commands_ if c.cmd == "ARG" and "=" in c.value[0])


def test_two_stages_on_python_311_slim_with_cpu_torch_pinned() -> None:
    parsed = commands()
    defaults = args_of(parsed)
    assert defaults["PYTHON_IMAGE"] == "python:3.11-slim"
    assert defaults["TORCH_VERSION"] == "2.13.0"  # the Makefile's pin
    assert defaults["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    froms = [c.value for c in parsed if c.cmd == "FROM"]
    assert froms == [("${PYTHON_IMAGE}", "AS", "build"), ("${PYTHON_IMAGE}",)]
    runs = [c.value[0] for c in parsed if c.cmd == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch==" in r)
    package = next(i for i, r in enumerate(runs) if "pip install /tmp/dist/icgate-" in r)
    assert torch < package  # CPU torch before anything can pull in the CUDA build
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs[torch]
    assert "torch==2.13.0" in (REPO / "Makefile").read_text()


def test_the_image_runs_as_the_charts_user_offline_with_graphs_prepared() -> None:
    stage = final_stage()
    users = [c.value[0] for c in stage if c.cmd == "USER"]
    assert users == [f"{CHART_USER}:{CHART_USER}"]
    env = {}
    for c in stage:
        if c.cmd == "ENV":
            env.update(dict(zip(c.value[::2], c.value[1::2], strict=True)))
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["ICGATE_DATA_DIR"] == str(CHART_DATA_DIR)
    # `icgate prepare` runs as that user, after USER, into the data directory the chart's init container
    # copies from.
    user_at = next(i for i, c in enumerate(stage) if c.cmd == "USER")
    prepare = [
        (i, c.value[0]) for i, c in enumerate(stage) if c.cmd == "RUN" and "icgate prepare" in c.value[0]
    ]
    assert len(prepare) == 1 and prepare[0][0] > user_at
    prepare_args = build_parser().parse_args(shlex.split(prepare[0][1].split("&&")[0])[1:])
    assert prepare_args.command == "prepare" and prepare_args.data_dir == CHART_DATA_DIR
    assert [c.value for c in stage if c.cmd == "EXPOSE"] == [("8080",)]


def test_the_default_command_is_what_the_chart_runs() -> None:
    stage = final_stage()
    (entrypoint,) = [c for c in stage if c.cmd == "ENTRYPOINT"]
    (cmd,) = [c for c in stage if c.cmd == "CMD"]
    assert entrypoint.json and list(entrypoint.value) == ["icgate"]
    args = build_parser().parse_args(list(cmd.value))
    assert (args.command, args.policy, args.data_dir) == ("serve", CHART_POLICY, CHART_DATA_DIR)
    assert (args.host, args.port) == ("0.0.0.0", 8080)


def test_the_build_context_holds_what_the_wheel_needs_and_nothing_else() -> None:
    """.dockerignore is an allow-list: everything is left out but the package's sources."""
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    # The package's folders, as icgate/ links to them (docs/architecture.md), and what pyproject reads.
    links = {p.name for p in (REPO / "icgate").iterdir() if p.is_symlink()}
    assert links == {"gateway", "cache", "routers", "lengths", "policies", "migrations"}
    assert allowed == links | {"icgate", "pyproject.toml", "README.md"}
