"""The agent guard: what every request to the MCP endpoint passes before either request path (the fast path or
the SDK's server) reads it, so that both apply the same limits and see the same message.

First, for every request: a Host header that is not a host name or IP literal with an optional port (one with
`/`, `?`, `#`, `@`, ...) is refused with 400 (the SDK's allowlist admits any suffix after `host:`, and a
Host that does not parse the same everywhere is how Starlette's BadHost flaw moved paths), audited as
`invalid_host` (with the agent, if the request carries a valid token). Then, for a request
with a valid agent token (any other goes straight on, to get the one 401):

1. the agent's rate (`limits.agent_rate_per_second`, `agent_burst`): over it, 429 with `Retry-After`;
2. the body (POST): at most `max_request_bytes` (413), received within `request_read_seconds` (408), and
   decoded strictly (gateway.decoding: 400 for a parse error, a batch or anything that is not one message);
3. the agent's open handshake-era sessions (`agent_sessions`), when it asks for one more: over it, 429 (the
   SDK's own cap, 10 000 sessions in all, would otherwise let one agent take every session there is);
4. the agent's requests in flight (`agent_concurrency`, JSON-RPC requests only: notifications are answered
   at once): over it, 429.

Every refusal is a JSON-RPC error (codes in gateway.errors), audited as a denial with reason `rate_limited`,
`session_limit`, `concurrency_limited`, `request_too_large`, `request_timeout` or `malformed_request`; the
upstream is never contacted. The decoded message and the agent ride on the ASGI scope (`MESSAGE_KEY`,
`AGENT_KEY`) for the fast path, and the body is replayed, unchanged, to whichever path serves it. The rate is
checked first but refused only once the body is read, so that the audit row names the method and target.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Container
from typing import Any

from mcp import MCPError
from mcp_types import INVALID_REQUEST
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import errors, telemetry
from gateway.auth import Agent, BearerBackend
from gateway.config import Limits
from gateway.decoding import MalformedRequest, decode_message
from gateway.invocation import Denied, Invocation
from gateway.limits import AgentLimiter
from gateway.peers import process_of
from gateway.pipeline import Gateway

MESSAGE_KEY = "enclave.message"
AGENT_KEY = "enclave.agent"  # the agent whose token the request carries, for the fast path
VALID_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
LONG_LIVED = frozenset({"subscriptions/listen"})  # a stream held open, not a request in flight


class _Refused(Exception):
    def __init__(self, status: int, code: int, message: str, reason: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.reason, self.retry_after = status, code, message, reason, retry_after


class _Gone(Exception):
    """The agent closed the connection before its body arrived: nothing to answer."""


class AgentGuard:
    """ASGI app in front of the MCP endpoint's request paths (`app`); see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        gateway: Gateway,
        backend: BearerBackend,
        limits: Limits,
        path: str,
        open_sessions: Container[str],
    ):
        self.app = app
        self.gateway = gateway
        self.backend = backend
        self.limits = limits
        self.limiter = AgentLimiter(limits)
        self.path = path
        self.open_sessions = open_sessions  # ids of every handshake-era session open now
        self._sessions: dict[str, set[str]] = {}  # agent -> the sessions it opened (some may have ended since)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host")
        if host is not None and not VALID_HOST.fullmatch(host):
            refusal = _Refused(400, INVALID_REQUEST, "Invalid Host header", "invalid_host")
            await self._audit(scope, self.backend.agent_for(HTTPConnection(scope)), {}, refusal)
            await _respond(send, None, refusal)
            return
        if scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        agent = self.backend.agent_for(HTTPConnection(scope))
        if agent is None:
            await self.app(scope, receive, send)
            return
        wait = self.limiter.admit(agent.name)
        message: dict[str, Any] = {}
        try:
            if scope["method"] == "POST":
                body = await self._body(scope, receive)
                try:
                    message = decode_message(body, self.limits.max_json_depth)
                except MalformedRequest as exc:
                    raise _Refused(400, exc.code, exc.message, "malformed_request") from None
                scope[MESSAGE_KEY], scope[AGENT_KEY] = message, agent
                receive = _replaying(body, receive)
            if wait:
                raise _Refused(
                    429,
                    errors.TOO_MANY_REQUESTS,
                    f"Too many requests: the limit is {self.limits.agent_rate_per_second:g} per second "
                    f"(bursts of {self.limits.agent_burst}); retry in {wait:.2f} s",
                    "rate_limited",
                    wait,
                )
            if message.get("method") == "initialize" and "mcp-session-id" not in Headers(scope=scope):
                send = self._opening_session(agent.name, send)
            if "id" not in message or message.get("method") in LONG_LIVED:
                await self.app(scope, receive, send)
                return
            if not self.limiter.enter(agent.name):
                raise _Refused(
                    429,
                    errors.TOO_MANY_REQUESTS,
                    f"Too many requests in flight: the limit is {self.limits.agent_concurrency} at once; "
                    "retry when one has been answered",
                    "concurrency_limited",
                    1.0,
                )
            try:
                await self.app(scope, receive, send)
            finally:
                self.limiter.leave(agent.name)
        except _Refused as refusal:
            await self._audit(scope, agent, message, refusal)
            await _respond(send, message.get("id"), refusal)
        except _Gone:
            return

    def _opening_session(self, agent: str, send: Send) -> Send:
        """Refuse a session over the agent's limit, or note the one its reply opens."""
        sessions = self._sessions.setdefault(agent, set())
        sessions -= {session for session in sessions if session not in self.open_sessions}  # ended or expired
        if len(sessions) >= self.limits.agent_sessions:
            raise _Refused(
                429,
                errors.TOO_MANY_REQUESTS,
                f"Too many open sessions: the limit is {self.limits.agent_sessions} per agent; end one you no longer "
                "use (HTTP DELETE with its Mcp-Session-Id) or let it expire",
                "session_limit",
            )

        async def noting(message: Message) -> None:
            if message["type"] == "http.response.start":
                session = Headers(raw=message["headers"]).get("mcp-session-id")
                if session is not None:
                    sessions.add(session)
            await send(message)

        return noting

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.limits.max_request_bytes
        too_large = _Refused(
            413,
            INVALID_REQUEST,
            f"Request body too large: the limit is {limit} bytes (limits.max_request_bytes)",
            "request_too_large",
        )
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.request_read_seconds):  # not anyio's: see gateway.fastpath
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        raise _Gone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            pass
        raise _Refused(
            408,
            INVALID_REQUEST,
            f"Request body not received within {self.limits.request_read_seconds:g} s (limits.request_read_seconds)",
            "request_timeout",
        )

    async def _audit(self, scope: Scope, agent: Agent | None, message: dict[str, Any], refusal: _Refused) -> None:
        """Record the refusal like any other denial (an audit failure changes nothing: it is refused anyway)."""
        headers = Headers(scope=scope)
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        target = params.get("name", params.get("uri"))
        request_id = message.get("id")
        call = Invocation(
            method=message["method"] if isinstance(message.get("method"), str) else "-",
            target=target if isinstance(target, str) else None,
            protocol_version=headers.get("mcp-protocol-version", ""),
            request_id=request_id if isinstance(request_id, str | int) else None,
            session_id=headers.get("mcp-session-id"),
            agent=agent,
            process=process_of(scope),
        )
        if (length := headers.get("content-length", "")).isdigit():
            call.bytes_in = int(length)
        try:
            with telemetry.server_span(call, params.get("_meta")):
                async with self.gateway.recording(call):
                    raise Denied(refusal.code, refusal.message, refusal.reason)
        except MCPError:
            pass


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that first yields the body already read, then defers to the real one."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _respond(send: Send, request_id: Any, refusal: _Refused) -> None:
    error = {"code": refusal.code, "message": refusal.message}
    headers = [(b"content-type", b"application/json")]
    if refusal.retry_after is not None:
        error["data"] = {"retryAfterSeconds": round(refusal.retry_after, 3)}
        headers.append((b"retry-after", str(max(1, math.ceil(refusal.retry_after))).encode()))
    reply = {"jsonrpc": "2.0", "id": request_id if isinstance(request_id, str | int) else None, "error": error}
    payload = json.dumps(reply, separators=(",", ":")).encode()
    headers.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
