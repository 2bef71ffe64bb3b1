"""The policy in force, changed while the gateway runs: from the console's editor, its router knob and its
tenant limits, or by a rollback; on one replica, and on every replica started from the same file.

Every applied policy is a row of `policy_versions` (who, when, how, its full text). A change to a setting
the gateway reads per request (`policy_edit.LIVE_PATHS`) applies at once; the others are read only at
start, so they are written to the policy file and wait for a restart. A read-only file (a Kubernetes
ConfigMap) takes no such change: change it where it comes from.

Which policy a process starts with, given the file it was started with and the newest row:
- the newest row's text is the file's: the file, as it is (its changes were written to it);
- the newest row was made from this same file (its `base_sha256`) but is not it: the file, then the row's
  live changes on top (a read-only file, changed from the console);
- otherwise the file is new: it is recorded as a version, and it is the policy.
Replicas poll for a newer row every `admin.policy_poll_s` and take its live changes when it was made
from the same file as theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from icgate.gateway import policy_edit
from icgate.gateway.config import Policy
from icgate.gateway.policy_edit import PolicyCheck, PolicyIssue, PolicyTextError
from icgate.gateway.store import policy_versions
from icgate.gateway.store.policy_versions import PolicyVersion, sha256

log = logging.getLogger("icgate.policy")


class PolicyRejected(Exception):
    """A policy change that was not applied, and every reason why."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        super().__init__("; ".join(f"{i.key or '(policy)'}: {i.message}" for i in issues))
        self.issues = issues


@dataclass(frozen=True)
class Applied:
    """A version recorded by this process, and whether it is in force here yet."""

    version: PolicyVersion
    in_force: bool  # False: it changed settings read at start, written to the file for the next start


class LivePolicy:
    """The policy texts in force on this process, and the way new ones are applied."""

    def __init__(
        self, running: Policy, path: Path | None, swap: Callable[[Policy], None], poll_s: float
    ) -> None:
        self.path = path
        self.swap = swap
        self.poll_s = poll_s
        self.running = running  # with command-line overrides (a root path), as the gateway runs it
        self.file_text = path.read_text() if path is not None else policy_edit.text_of(running)
        # The policy as written that is in force here (no command-line overrides): changes are found
        # against it.
        self.applied = running
        if path is not None:
            try:
                self.applied = policy_edit.parse(self.file_text)
            except PolicyTextError:  # read by PyYAML at start; YAML 1.2 may read a file differently
                log.warning(
                    "%s: the console reads this file differently; edits start from the policy as run", path
                )
        self.text = self.file_text  # the newest text of this file's line of versions (the editor's start)
        self.base_sha256 = sha256(self.file_text)
        self.in_force_id: int | None = None
        self.engine: sa.Engine | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._seen: int | None = None

    @property
    def writable(self) -> bool:
        """Whether the file can be replaced (a new file in its folder, renamed over it). A file without
        write permission bits counts as read-only even for root, who could write it anyway."""
        return (
            self.path is not None
            and bool(self.path.stat().st_mode & stat.S_IWUSR)
            and os.access(self.path, os.W_OK)
            and os.access(self.path.parent, os.W_OK | os.X_OK)
        )

    async def start(self, engine: sa.Engine) -> None:
        """Reconcile the file with the newest version (the module's docstring), then watch for newer."""
        self.engine = engine
        newest = await asyncio.to_thread(policy_versions.newest, engine)
        if newest is not None and newest.sha256 == self.base_sha256:
            self.base_sha256 = newest.base_sha256
            self.in_force_id = newest.id
        elif newest is not None and newest.base_sha256 == self.base_sha256:
            self._take(newest)
        else:
            source = "file" if self.path is not None else "in-process"
            first = await asyncio.to_thread(
                policy_versions.record,
                engine,
                self.file_text,
                str(self.path) if self.path is not None else "icgate.Gateway",
                source,
                "started with this policy",
                self.base_sha256,
                [],
                [],
            )
            self.in_force_id = first.id
            newest = first
        self._seen = newest.id if newest is not None else None
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="icgate-policy-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def check(self, text: str) -> PolicyCheck:
        """`text` checked, with its changes against the policy in force here."""
        return policy_edit.check(text, self.applied)

    async def apply_text(self, text: str, author: str, source: str, note: str = "") -> Applied:
        """Apply a whole policy text: live changes at once, the rest written to the file for a restart."""
        async with self._lock:
            return await self._apply(text, author, source, note)

    async def apply_changes(
        self, changes: dict[str, Any], author: str, source: str, note: str = ""
    ) -> Applied:
        """Set dotted paths (`{"router.threshold": 0.4}`; None removes a key) in the newest text."""
        async with self._lock:
            try:
                text = policy_edit.with_changes(self.text, changes)
            except PolicyTextError as exc:
                raise PolicyRejected(exc.issues) from exc
            return await self._apply(text, author, source, note)

    async def rollback(self, version_id: int, author: str) -> Applied:
        """Apply an earlier version's text again, as a new version."""
        engine = self._engine()
        old = await asyncio.to_thread(policy_versions.get, engine, version_id)
        if old is None:
            raise PolicyRejected([PolicyIssue(None, "version", f"there is no policy version {version_id}")])
        async with self._lock:
            return await self._apply(old.text, author, "rollback", f"back to version {version_id}")

    async def history(self, limit: int = 50, source: str | None = None) -> list[PolicyVersion]:
        return await asyncio.to_thread(policy_versions.history, self._engine(), limit, source)

    def _engine(self) -> sa.Engine:
        if self.engine is None:
            raise RuntimeError("the live policy has not started")
        return self.engine

    async def _apply(self, text: str, author: str, source: str, note: str) -> Applied:
        checked = self.check(text)
        if checked.policy is None:
            raise PolicyRejected(checked.issues)
        if not checked.changed and text == self.text:
            raise PolicyRejected([PolicyIssue(None, "", "this is the policy in force: nothing to apply")])
        if checked.restart and not self.writable:
            where = f"the policy file {self.path} is read-only" if self.path else "there is no policy file"
            document = policy_edit.load_text(text)
            raise PolicyRejected(
                [
                    PolicyIssue(
                        policy_edit.line_of(document, tuple(path.split("."))),
                        path,
                        f"read only at start, and {where}: change the policy where it comes from and "
                        "restart (settings read per request can be changed here)",
                    )
                    for path in checked.restart
                ]
            )
        if self.writable and self.path is not None:
            await asyncio.to_thread(_write_atomically, self.path, text)
        version = await asyncio.to_thread(
            policy_versions.record,
            self._engine(),
            text,
            author,
            source,
            note,
            self.base_sha256,
            checked.live,
            checked.restart,
        )
        self._seen = version.id
        self.text = text
        self._swap_live(checked.policy, checked.live)
        if not checked.restart:
            self.in_force_id = version.id
        log.info(
            "policy version %d applied by %s (%s): %d live change(s), %d waiting for a restart",
            version.id,
            author,
            source,
            len(checked.live),
            len(checked.restart),
        )
        return Applied(version, in_force=not checked.restart)

    def _swap_live(self, policy: Policy, live: list[str]) -> None:
        if not live:
            return
        self.applied = policy_edit.merged(self.applied, policy, live)
        self.running = policy_edit.merged(self.running, policy, live)
        self.swap(self.running)

    def _take(self, version: PolicyVersion) -> None:
        """Another process's version of our file: its live changes (its others wait for our restart)."""
        checked = self.check(version.text)
        if checked.policy is None:
            log.error("policy version %d does not validate here; keeping the policy in force", version.id)
            return
        self._swap_live(checked.policy, checked.live)
        self.text = version.text
        if not checked.restart:
            self.in_force_id = version.id
        log.info("policy version %d in force (%d live change(s))", version.id, len(checked.live))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except Exception as exc:  # the database may be briefly away: try again next time
                log.warning("could not look for a newer policy: %s", type(exc).__name__)

    async def poll(self) -> bool:
        """Take a newer version made from our file, if there is one; True when one was taken."""
        engine = self._engine()
        latest = await asyncio.to_thread(policy_versions.newest_id, engine)
        if latest is None or latest == self._seen:
            return False
        async with self._lock:
            version = await asyncio.to_thread(policy_versions.newest, engine)
            if version is None or version.id == self._seen:
                return False
            self._seen = version.id
            if version.base_sha256 != self.base_sha256:
                log.warning("policy version %d was made from another policy file; not taking it", version.id)
                return False
            self._take(version)
            return True


def _write_atomically(path: Path, text: str) -> None:
    """The new file replaces the old in one step: a crash leaves one or the other, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
