"""What the fast path needs of a handshake-era session to serve a call on it without the SDK's server.

A 2025-era `tools/call` on an open session (`Mcp-Session-Id`) normally travels the SDK's transport (its POST
ladder, memory streams, a task that writes the SSE response), the session's dispatcher and the low-level server:
measured, about twice the gateway CPU per call of the 2026 era's fast path. When the fast path serves such a
call itself (gateway.fastpath), it must keep doing what the SDK does for the session around it:

* serve only a session whose transport would serve a request now (`SessionCalls.transport`);
* hold the session open while the call runs, as the transport does for each request it serves (a request in
  flight suspends the session's idle countdown, which restarts when the last one ends);
* let the agent cancel the call: in this era a client cancels with `notifications/cancelled` naming the request
  (a dropped POST is not a cancellation), and the SDK's dispatcher knows nothing of the fast path's calls;
* answer as the transport does: an SSE stream whose one event is the JSON-RPC response, or a REQUEST_CANCELLED
  error for a cancelled call (`EventStream`).

The transport members read and kept here (`_requests_in_flight`, `_idle_timeout`, the manager's
`_server_instances`) are private to mcp 2.3, pinned by `mcp==2.3.*` and covered by tests/test_fastpath.py, which
compares both paths reply for reply.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.shared.dispatcher import coerce_request_id
from mcp.shared.jsonrpc_dispatcher import cancelled_request_id_from_params
from mcp_types import RequestId
from starlette.types import Send

T = TypeVar("T")

OPEN_STREAM_AFTER_SECONDS = 1.0
PING_SECONDS = 15.0  # as sse-starlette pings the SDK's SSE responses
_SSE_HEADERS = [  # the SDK transport's, in its order
    (b"cache-control", b"no-cache, no-transform"),
    (b"connection", b"keep-alive"),
    (b"content-type", b"text/event-stream"),
]


class SessionCalls:
    """The fast path's calls in flight on handshake-era sessions, by session and request id (as the SDK's
    dispatcher correlates them: `coerce_request_id`)."""

    def __init__(self, transports: Mapping[str, StreamableHTTPServerTransport]):
        self.transports = transports  # the SDK's registry of open sessions
        self._flights: dict[tuple[str, RequestId], asyncio.Task[Any]] = {}
        self._cancelled: set[asyncio.Task[Any]] = set()

    def transport(self, session_id: str) -> StreamableHTTPServerTransport | None:
        """The session's transport, if it would serve a request now (the checks of the manager and of the
        transport's `handle_request`)."""
        transport = self.transports.get(session_id)
        if transport is None or transport.is_terminated:
            return None
        idle = transport.idle_scope
        return transport if idle is not None and not idle.cancel_called else None

    def in_flight(self, session_id: str, request_id: RequestId) -> bool:
        return (session_id, coerce_request_id(request_id)) in self._flights

    def cancel(self, session_id: str, params: Any) -> None:
        """A `notifications/cancelled` on the session: cancel the call it names, if the fast path is serving it."""
        request_id = cancelled_request_id_from_params(params if isinstance(params, dict) else None)
        task = self._flights.pop((session_id, coerce_request_id(request_id)), None) if request_id is not None else None
        if task is not None:
            self._cancelled.add(task)
            task.cancel()

    async def run(
        self, transport: StreamableHTTPServerTransport, request_id: RequestId, call: Awaitable[T]
    ) -> T | None:
        """Await `call` in this task as the transport serves a request: holding the session open, and
        cancellable by the agent's `notifications/cancelled` (then None)."""
        assert transport.mcp_session_id is not None
        key = (transport.mcp_session_id, coerce_request_id(request_id))
        task = asyncio.current_task()
        assert task is not None
        self._flights[key] = task
        try:
            with _holding(transport):
                return await call
        except asyncio.CancelledError:
            if task not in self._cancelled:
                raise
            return None
        finally:
            if task in self._cancelled:
                self._cancelled.discard(task)
                task.uncancel()
            if self._flights.get(key) is task:
                del self._flights[key]


@contextmanager
def _holding(transport: StreamableHTTPServerTransport) -> Iterator[None]:
    """What `StreamableHTTPServerTransport.handle_request` does around each request it serves."""
    idle = transport.idle_scope
    assert idle is not None
    transport._requests_in_flight += 1
    idle.deadline = math.inf
    try:
        yield
    finally:
        transport._requests_in_flight -= 1
        if not transport._requests_in_flight:
            idle.deadline = asyncio.get_running_loop().time() + transport._idle_timeout  # type: ignore[operator]


class EventStream:
    """The reply to a request on a handshake-era session, as the SDK's transport sends it: an SSE stream whose
    one event is the JSON-RPC response.

    A call that ends within OPEN_STREAM_AFTER_SECONDS is sent whole (one write). A longer one gets the stream's
    head then, and a comment every PING_SECONDS, as the SDK's streams get sse-starlette's pings: what a client's
    read timeout or a proxy's idle timeout measures is then silence, not how long the tool runs.
    """

    def __init__(self, send: Send, session_id: str):
        self._send = send
        headers = [*_SSE_HEADERS, (b"mcp-session-id", session_id.encode()), (b"x-accel-buffering", b"no")]
        self._head = {"type": "http.response.start", "status": 200, "headers": headers}
        self._opened = False
        self._keepalive: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(OPEN_STREAM_AFTER_SECONDS, self._open)

    def _open(self) -> None:
        self._keepalive = asyncio.ensure_future(self._keep_alive())

    async def _keep_alive(self) -> None:
        await self._send(self._head)
        self._opened = True
        while True:
            await asyncio.sleep(PING_SECONDS)
            await self._send({"type": "http.response.body", "body": b": ping\r\n\r\n", "more_body": True})

    def close(self) -> None:
        """Stop opening or pinging the stream (the reply was sent, or will not be)."""
        self._timer.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()

    async def answer(self, message: bytes) -> None:
        """Send the JSON-RPC response `message` (encoded) and end the stream."""
        self.close()
        if self._keepalive is not None:
            await asyncio.wait([self._keepalive])
            if not self._keepalive.cancelled() and self._keepalive.exception() is not None:
                return  # the connection failed under a ping: there is nobody to answer
        if not self._opened:
            await self._send(self._head)
        await self._send({"type": "http.response.body", "body": b"event: message\r\ndata: %b\r\n\r\n" % message})
