"""Configuration lifecycle: a running gateway reloads its configuration directory when one of its files
changes, on SIGHUP, and when `enclave reload` asks (control operation `reload`).

A reload loads and checks the whole new configuration first: schemas, cross-file checks, the enclaves'
policy tests (gateway.policy) and the resolution of every secret reference. A configuration with any problem
is reported (log, control reply, audit row) and changes nothing: the old one stays in force, untouched. A good
one is swapped in at once (`Gateway.reconfigure`, no await in between), so the next request of every open
session sees it: a removed agent gets the 401, a removed tool is unknown. Connectors whose definition or
resolved credentials changed are restarted, removed ones are closed, new ones start on first use, the others
keep their warm sessions. New secrets join the redactor, which keeps the old ones (an upstream started
before may still echo them). Of gateway.yaml's settings only the secret sources apply live (LIVE_SETTINGS);
the others (listen address, state directory, limits, fast path...) are bound when the process starts: a change
to them is logged and reported as needing a restart, and the running values are kept.

Every reload is audited before it takes effect: method `config.reload`, decision allow (applied, or nothing
changed) or deny (rejected), and a reason naming the trigger and the outcome.

The watcher polls the files' size, mtime and inode every POLL_SECONDS (no dependency: a configuration
directory holds a handful of files) and reloads once a change has stayed the same for one poll, so that an
editor's half-written file is not reported as an error.
"""

from __future__ import annotations

import hashlib
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import anyio

from gateway.audit import AuditLog
from gateway.auth import AgentDirectory
from gateway.config import Config, ConfigError, load_config, resolve_secrets
from gateway.pipeline import Gateway
from gateway.secrets import SecretResolver

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
LIVE_SETTINGS = ("secrets",)
MAX_AUDITED_REASON = 500

Snapshot = tuple[tuple[str, int, int, int], ...]


def snapshot(root: Path) -> Snapshot:
    """(file, size, mtime, inode) of every file a configuration is loaded from."""
    files = [root / "gateway.yaml", *(root / "connectors").glob("*.yaml"), *(root / "enclaves").glob("*.yaml")]
    found = []
    for path in sorted(files):
        try:
            info = path.stat()
        except OSError:
            continue
        found.append((str(path.relative_to(root)), info.st_size, info.st_mtime_ns, info.st_ino))
    return tuple(found)


def credential_digests(config: Config, resolver: SecretResolver) -> dict[str, str]:
    """Connector -> digest of the secret values it is started with (a rotated secret restarts it)."""
    return {
        name: hashlib.sha256(repr(sorted(resolver.resolve_all(connector.secret_names()).items())).encode()).hexdigest()
        for name, connector in config.connectors.items()
    }


@dataclass(frozen=True)
class ReloadOutcome:
    status: Literal["applied", "unchanged", "rejected"]
    summary: str
    problems: tuple[str, ...] = ()

    def reply(self) -> dict[str, object]:
        """The control reply `enclave reload` prints."""
        ok = self.status != "rejected"
        return {"ok": ok, "status": self.status, "summary": self.summary, "problems": list(self.problems)}


@dataclass(frozen=True)
class _Plan:
    """A checked configuration and what applying it changes."""

    config: Config
    resolver: SecretResolver
    secrets: list[str]
    credentials: dict[str, str]
    restart: set[str]
    summary: str


class ConfigReloader:
    """Reloads the configuration of one running gateway; `watch` and `on_sighup` are tasks of its lifespan."""

    def __init__(
        self, gateway: Gateway, directory: AgentDirectory, audit: AuditLog, loaded: Config, resolver: SecretResolver
    ):
        """`loaded` is the configuration as its files say (`enclave serve --listen` may override the address)."""
        self._gateway = gateway
        self._directory = directory
        self._audit = audit
        self._root = loaded.root
        self._file_settings = loaded.settings
        self._credentials = credential_digests(loaded, resolver)
        self._seen = snapshot(loaded.root)
        self._lock = anyio.Lock()

    async def reload(self, trigger: str) -> ReloadOutcome:
        """Load, check and (if good) apply the configuration directory; the old one stays on any problem."""
        async with self._lock:
            self._seen = snapshot(self._root)
            try:
                plan = await self._check()
            except Exception:
                logger.exception("configuration reload (%s) failed while checking the configuration", trigger)
                plan = _rejected("the gateway failed while checking it (see its log)", [])
            if isinstance(plan, ReloadOutcome):
                outcome = plan
                await self._record(trigger, outcome)
            else:
                outcome = await self._apply(trigger, plan)
        log = logger.warning if outcome.status == "rejected" else logger.info
        log("configuration reload (%s): %s", trigger, outcome.summary)
        for problem in outcome.problems:
            logger.warning("  %s", problem)
        return outcome

    async def control(self, message: Mapping[str, object]) -> dict[str, object]:
        """Control operation `reload` (`enclave reload`): reload now and reply with the outcome."""
        return (await self.reload("enclave reload")).reply()

    async def watch(self) -> None:
        """Reload when a configuration file changed and then stayed the same for one poll."""
        pending: Snapshot | None = None
        while True:
            await anyio.sleep(POLL_SECONDS)
            current = snapshot(self._root)
            if current == self._seen:
                pending = None
            elif current == pending:
                await self.reload("file change")
            else:
                pending = current

    async def on_sighup(self) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                await self.reload("SIGHUP")

    # -- steps ---------------------------------------------------------------------------------

    async def _check(self) -> _Plan | ReloadOutcome:
        try:
            config = await anyio.to_thread.run_sync(load_config, self._root)
        except ConfigError as exc:
            return _rejected("the configuration has errors", [str(problem) for problem in exc.problems])
        resolver, secrets, problems = await anyio.to_thread.run_sync(resolve_secrets, config)
        if problems:
            return _rejected("secret references cannot be resolved", [str(problem) for problem in problems])
        running = self._gateway.config
        config, deferred = self._live_settings_only(config, running)
        credentials = await anyio.to_thread.run_sync(credential_digests, config, resolver)
        restart = {
            name
            for name, connector in config.connectors.items()
            if name in running.connectors
            and (running.connectors[name] != connector or self._credentials.get(name) != credentials[name])
        }
        changes = _changes(running, config, restart)
        notes = "".join(f"; {name} changed in gateway.yaml, applies at the next restart" for name in deferred)
        if not changes:
            return ReloadOutcome("unchanged", "no change" + notes)
        return _Plan(config, resolver, secrets, credentials, restart, "applied: " + changes + notes)

    def _live_settings_only(self, config: Config, running: Config) -> tuple[Config, list[str]]:
        """`config` with the running values of the settings bound at start-up, and those its files changed."""
        deferred = [
            setting.name
            for setting in fields(config.settings)
            if setting.name not in LIVE_SETTINGS
            and getattr(config.settings, setting.name) != getattr(self._file_settings, setting.name)
        ]
        for name in deferred:
            logger.warning(
                "gateway.yaml: %s changed; it applies when the gateway restarts (running with %s)",
                name,
                getattr(running.settings, name),
            )
        live = {name: getattr(config.settings, name) for name in LIVE_SETTINGS}
        self._file_settings = config.settings
        return replace(config, settings=replace(running.settings, **live)), deferred

    async def _apply(self, trigger: str, plan: _Plan) -> ReloadOutcome:
        outcome = ReloadOutcome("applied", plan.summary)
        with anyio.CancelScope(shield=True):  # audited and applied, or neither
            if not await self._record(trigger, outcome):
                return _rejected("the reload could not be audited", [])
            self._gateway.redactor.update(plan.secrets)
            changed = self._gateway.reconfigure(plan.config, plan.resolver, plan.restart)
            self._directory.reconfigure(plan.config)
            self._audit.config = plan.config
            self._credentials = plan.credentials
        try:
            await self._gateway.announce(changed)
        except Exception:  # applied all the same: agents see the change on their next listing
            logger.exception("could not tell the agents of %s that their lists changed", ", ".join(changed))
        return outcome

    async def _record(self, trigger: str, outcome: ReloadOutcome) -> bool:
        """Audit the reload; False (logged) if the row could not be written."""
        reason = f"{trigger}: {outcome.summary}" + (f": {outcome.problems[0]}" if outcome.problems else "")
        if len(outcome.problems) > 1:
            reason += f" (and {len(outcome.problems) - 1} more)"
        decision = "deny" if outcome.status == "rejected" else "allow"
        try:
            await self._audit.record_event("config.reload", decision, reason[:MAX_AUDITED_REASON])
        except Exception as exc:
            logger.error("could not audit the configuration reload (%s): %s", trigger, exc)
            return False
        return True


def _rejected(summary: str, problems: list[str]) -> ReloadOutcome:
    return ReloadOutcome("rejected", f"rejected, the running configuration stays in force: {summary}", tuple(problems))


def _changes(old: Config, new: Config, restart: set[str]) -> str:
    """What applying `new` changes, e.g. `enclaves changed e1; connectors added crm, restarted design`."""
    edited = {name for name in old.enclaves.keys() & new.enclaves.keys() if old.enclaves[name] != new.enclaves[name]}
    parts = [
        _listed("enclaves", old.enclaves, new.enclaves, "changed", edited),
        _listed("connectors", old.connectors, new.connectors, "restarted", restart),
        "secret settings changed" if new.settings != old.settings else "",
    ]
    return "; ".join(part for part in parts if part)


def _listed(kind: str, before: Mapping[str, Any], after: Mapping[str, Any], verb: str, names: set[str]) -> str:
    groups = {"added": after.keys() - before.keys(), "removed": before.keys() - after.keys(), verb: names}
    listed = ", ".join(f"{what} {' '.join(sorted(found))}" for what, found in groups.items() if found)
    return f"{kind} {listed}" if listed else ""
