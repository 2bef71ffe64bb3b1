"""Editing a policy while the gateway runs: check a policy text (errors at their line and key, in the
schema's own words), find what changed against the policy in force, and say which changes can apply at
once and which wait for a restart.

Plain logic, no web framework and no database: the console (`gateway.admin.policy_page`) and the live
policy (`gateway.live_policy`) call it. YAML is read with ruamel.yaml's round-trip loader, which keeps
every key's line and keeps comments when a setting is changed in place (`with_changes`).
"""

from __future__ import annotations

import difflib
import io
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.util import load_yaml_guess_indent

from icgate.gateway.config import Policy

# What the gateway reads from the policy in force on every request (`Gateway.swap_policy` hands a new
# policy to the pipeline, the tenants' limiter and the cache). Everything else is read once at start:
# backends, the embedder, the database, the server, the admin console, the router's kind and artifact.
LIVE_PATHS: tuple[str, ...] = (
    "router.threshold",
    "router.strong_share",
    "router.quality_value_usd",
    "router.example_lift",
    "router.example_min_similarity",
    "router.sample_share",
    "auth.required",
    "routed_models",
    "fallback_backend",
    "allow_downgrade",
    "request_timeout_s",
    "admission.tenants",
    "admission.classes",
    "admission.default_class",
    "admission.spill",
    "cache.tenants",
    "cache.models",
    "cache.allow_sampled",
    "cache.top_k",
    "cache.examples_k",
    "cache.examples_min_similarity",
    "request_log.store_bodies",
)


def is_live(path: str) -> bool:
    return any(path == live or path.startswith(live + ".") for live in LIVE_PATHS)


@dataclass(frozen=True)
class PolicyIssue:
    """One reason a policy text is refused: where (1-based line, when known), which key, and why."""

    line: int | None
    key: str
    message: str


@dataclass(frozen=True)
class PolicyCheck:
    """A policy text checked against the policy in force."""

    issues: list[PolicyIssue]
    policy: Policy | None  # None when there are issues
    live: list[str] = field(default_factory=list)  # changed paths that apply at once
    restart: list[str] = field(default_factory=list)  # changed paths that wait for a restart

    @property
    def ok(self) -> bool:
        return not self.issues

    @property
    def changed(self) -> bool:
        return bool(self.live or self.restart)

    @property
    def restart_sections(self) -> list[str]:
        return sorted({path.split(".")[0] for path in self.restart})


def _yaml() -> YAML:
    loader = YAML(typ="rt")
    loader.preserve_quotes = True
    loader.width = 4096
    return loader


def load_text(text: str) -> Any:
    """The YAML document, with line numbers (raises `PolicyTextError`)."""
    try:
        return _yaml().load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise PolicyTextError([PolicyIssue(line, "", f"not valid YAML: {exc.problem or exc}")]) from exc
    except YAMLError as exc:
        raise PolicyTextError([PolicyIssue(None, "", f"not valid YAML: {exc}")]) from exc


class PolicyTextError(Exception):
    def __init__(self, issues: list[PolicyIssue]) -> None:
        super().__init__("; ".join(f"line {i.line} {i.key}: {i.message}" for i in issues))
        self.issues = issues


def line_of(document: Any, loc: tuple[int | str, ...]) -> int | None:
    """The line of the deepest node of `loc` the document has (a missing key: its parent's line)."""
    node = document
    line: int | None = None
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            line = node.lc.key(part)[0] + 1
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            line = node.lc.item(part)[0] + 1
            node = node[part]
        elif isinstance(node, CommentedMap | CommentedSeq) and line is None:
            line = node.lc.line + 1
    return line


def parse(text: str) -> Policy:
    """The policy a text describes (raises `PolicyTextError` with every issue at its line)."""
    document = load_text(text)
    if not isinstance(document, dict):
        raise PolicyTextError([PolicyIssue(1, "", "a policy must be a YAML mapping")])
    try:
        return Policy.model_validate(_plain(document))
    except ValidationError as exc:
        issues = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if isinstance(p, int | str))
            key = ".".join(str(p) for p in loc) or "(top level)"
            message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            issues.append(PolicyIssue(line_of(document, loc), key, message))
        raise PolicyTextError(issues) from exc


def _plain(node: Any) -> Any:
    """ruamel's commented containers as plain dicts and lists (pydantic wants plain ones)."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def changed_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ; mappings are compared key by key, anything else as a whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(path)
            else:
                out.extend(changed_paths(old[key], new[key], path))
        return out
    return [] if old == new else [prefix]


def check(text: str, base: Policy) -> PolicyCheck:
    """`text` checked, with its changes against `base` (the policy in force, as written)."""
    try:
        policy = parse(text)
    except PolicyTextError as exc:
        return PolicyCheck(exc.issues, None)
    paths = changed_paths(base.model_dump(mode="json"), policy.model_dump(mode="json"))
    return PolicyCheck([], policy, [p for p in paths if is_live(p)], [p for p in paths if not is_live(p)])


def merged(running: Policy, new: Policy, paths: list[str]) -> Policy:
    """`running` with the values of `paths` taken from `new` (the rest, such as a `--root-path` given on
    the command line, stays as it runs)."""
    target = running.model_dump(mode="json")
    source = new.model_dump(mode="json")
    for path in paths:
        keys = path.split(".")
        here, there = target, source
        for key in keys[:-1]:
            here = here.setdefault(key, {})
            there = there.get(key, {})
        if keys[-1] in there:
            here[keys[-1]] = there[keys[-1]]
        else:
            here.pop(keys[-1], None)
    return Policy.model_validate(target)


def with_changes(text: str, changes: dict[str, Any]) -> str:
    """`text` with each dotted path set to its value (None removes the key), comments and order kept."""
    document = load_text(text)
    if not isinstance(document, dict):
        raise PolicyTextError([PolicyIssue(1, "", "a policy must be a YAML mapping")])
    for path, value in changes.items():
        keys = path.split(".")
        node = document
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is not None and not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise PolicyTextError(
                    [PolicyIssue(None, where, "not a section: change it in the policy editor")]
                )
            if child is None:
                if value is None:
                    break
                child = node[key] = CommentedMap()
            node = child
        else:
            if value is None:
                node.pop(keys[-1], None)
            else:
                node[keys[-1]] = value
    out = io.StringIO()
    dumper = _yaml()
    mapping, sequence, offset = indentation(text)
    dumper.indent(mapping=mapping, sequence=sequence, offset=offset)
    dumper.dump(document, out)
    return out.getvalue()


def indentation(text: str) -> tuple[int, int, int]:
    """The text's own indentation (mapping, sequence, dash offset), so a change rewrites only its lines."""
    _, sequence, offset = load_yaml_guess_indent(text)
    nested = [
        len(line) - len(line.lstrip(" "))
        for line in text.splitlines()
        if line.startswith(" ") and not line.lstrip(" ").startswith(("-", "#"))
    ]
    mapping = min((n for n in nested if n > 0), default=2)
    return mapping, sequence or 2, offset or 0


def diff(old_text: str, new_text: str) -> str:
    """A unified diff of two policy texts, as `git diff` shows one."""
    lines = difflib.unified_diff(
        old_text.splitlines(keepends=True), new_text.splitlines(keepends=True), "running", "edited"
    )
    return "".join(lines)


def text_of(policy: Policy) -> str:
    """A policy given as an object (in-process) written out: only what differs from the defaults."""
    out = io.StringIO()
    _yaml().dump(policy.model_dump(mode="json", exclude_defaults=True), out)
    return out.getvalue()
