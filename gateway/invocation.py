"""One MCP request as the gateway handled it: who, what, which rule decided, and how it ended.

Handlers fill an `Invocation` along the pipeline; it is recorded exactly once when the request ends
(audit row, span attributes, metrics), whatever the path: allowed, denied, failed upstream or broken
inside the gateway. A denial is raised as `Denied`, which carries the audit reason next to the JSON-RPC
error the agent sees (the reason never reaches the agent).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from mcp import MCPError

from gateway.auth import Agent

Decision = Literal["allow", "deny", "error"]
Outcome = Literal["ok", "tool_error", "protocol_error"]
# The method of the audit row written before a chamber call is forwarded (not a request of its own).
CHAMBER_AUTHORIZATION = "chamber.authorize"
CREDENTIAL_REDACTED = "credential_redacted"  # the reason of an allowed call whose result held a secret form


class Denied(MCPError):
    """A policy denial: `reason` is for the audit log only."""

    def __init__(self, code: int, message: str, reason: str):
        super().__init__(code, message)
        self.reason = reason


@dataclass
class Invocation:
    method: str
    target: str | None
    protocol_version: str
    request_id: str | int | None = None
    session_id: str | None = None
    client_name: str | None = None
    client_version: str | None = None
    agent: Agent | None = None
    connector: str | None = None
    upstream_target: str | None = None
    arguments: dict[str, Any] | None = None
    chamber: str | None = None
    grant_id: str | None = None
    decision: Decision = "allow"
    reason: str | None = None
    outcome: Outcome | None = None
    error_code: int | None = None
    correlation_id: str | None = None
    process: dict[str, Any] | None = None  # the agent's local process, where a wrapper reports it
    trace_id: str | None = None
    span_id: str | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    started: float = field(default_factory=time.perf_counter)
    at: float = field(default_factory=time.time)

    @property
    def enclave(self) -> str | None:
        return self.agent.enclave if self.agent is not None else None

    @property
    def latency_seconds(self) -> float:
        return time.perf_counter() - self.started

    def route(self, connector: str, upstream_target: str) -> None:
        self.connector, self.upstream_target = connector, upstream_target

    def deny(self, reason: str, code: int) -> None:
        self.decision, self.reason, self.error_code = "deny", reason, code

    def fail(self, reason: str, code: int) -> None:
        """Allowed, but the request did not complete (an upstream error or timeout)."""
        self.reason, self.error_code, self.outcome = reason, code, "protocol_error"

    def broke(self, correlation_id: str, code: int) -> None:
        """The gateway itself failed; the request is refused (fail closed)."""
        self.decision, self.reason, self.correlation_id = "error", "internal", correlation_id
        self.error_code, self.outcome = code, "protocol_error"

    def finish(self, is_error: bool = False) -> None:
        self.outcome = "tool_error" if is_error else "ok"

    def redacted(self) -> None:
        """A brokered credential (or an agent token) was cut out of what the upstream answered."""
        self.reason = CREDENTIAL_REDACTED


class Recorder(Protocol):
    """Where finished invocations go (the audit log and telemetry)."""

    async def record(self, invocation: Invocation) -> None: ...


class Recorders:
    """Several recorders, in order; the invocation counts as recorded when all have returned."""

    def __init__(self, *recorders: Recorder):
        self.recorders = recorders

    async def record(self, invocation: Invocation) -> None:
        for recorder in self.recorders:
            await recorder.record(invocation)


class DecisionLog:
    """Logs every denial and internal error (allowed calls are the audit log's business)."""

    def __init__(self, logger: logging.Logger):
        self._logger = logger

    async def record(self, invocation: Invocation) -> None:
        if invocation.decision != "allow":
            self._logger.warning(
                "%s %s by agent %s: %s (%s)%s",
                invocation.decision,
                invocation.method,
                invocation.agent.name if invocation.agent else "-",
                invocation.target or "-",
                invocation.reason,
                f" correlation id {invocation.correlation_id}" if invocation.correlation_id else "",
            )
