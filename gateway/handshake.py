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
  error for a cancelled call (`EventStream`);
* carry what the upstream asks of the agent meanwhile (elicitation, sampling, roots) as the SDK's session does:
  as requests on the call's own stream, each answered by a POST of the client's response (`EventStream.ask`,
  `SessionCalls.answered`). Their ids are strings (`enclave-ask-<n>`), the SDK's are integers, so an answer
  meant for the SDK's session is never taken here.

The SDK members the fast path reads and keeps (the manager's `_server_instances`, the transport's
`_requests_in_flight`, `_idle_timeout` and `_check_content_type`, the session's `_connection`) are private to
mcp 2.3, pinned by `mcp==2.3.*` and covered by tests/test_fastpath.py, which compares both paths reply for reply,
and tests/test_handshake.py, which runs this module against the SDK's own transport.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections.abc import Awaitable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from mcp import MCPError
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.shared.dispatcher import coerce_request_id
from mcp.shared.jsonrpc_dispatcher import cancelled_request_id_from_params
from mcp_types import CONNECTION_CLOSED, ErrorData, RequestId, methods
from pydantic import BaseModel
from starlette.types import Send

from gateway.pipeline import wire_form

T = TypeVar("T")
ResultT = TypeVar("ResultT", bound=BaseModel)

ASK_ID_PREFIX = "enclave-ask-"
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
        self._asked: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}  # (session, id) -> its answer
        self._ask_ids = itertools.count(1)

    def stream(self, send: Send, session_id: str, protocol_version: str) -> EventStream:
        """The reply stream of a call on the session."""
        return EventStream(send, session_id, protocol_version, self)

    def expect_answer(self, session_id: str) -> tuple[str, asyncio.Future[dict[str, Any]]]:
        """A new id for a request to the agent on the session, and where its answer will be put."""
        request_id = f"{ASK_ID_PREFIX}{next(self._ask_ids)}"
        answer = self._asked[(session_id, request_id)] = asyncio.get_running_loop().create_future()
        return request_id, answer

    def forget_answer(self, session_id: str, request_id: str) -> None:
        del self._asked[(session_id, request_id)]

    def answered(self, session_id: str, message: dict[str, Any]) -> bool:
        """Whether `message` (a JSON-RPC response) answers a request a call on the session asked (then it is
        handed to the call)."""
        request_id = message.get("id")
        if "method" in message or not isinstance(request_id, str):
            return False
        answer = self._asked.get((session_id, request_id))
        if answer is None:
            return False
        if not answer.done():
            answer.set_result(message)
        return True

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
    one event is the JSON-RPC response, after any requests the call asks of the agent (`ask`).

    A call that ends within OPEN_STREAM_AFTER_SECONDS is sent whole (one write). A longer one gets the stream's
    head then, and a comment every PING_SECONDS, as the SDK's streams get sse-starlette's pings: what a client's
    read timeout or a proxy's idle timeout measures is then silence, not how long the tool runs.
    """

    def __init__(self, send: Send, session_id: str, protocol_version: str, calls: SessionCalls):
        self._send = send
        self._session_id = session_id
        self._protocol_version = protocol_version
        self._calls = calls
        headers = [*_SSE_HEADERS, (b"mcp-session-id", session_id.encode()), (b"x-accel-buffering", b"no")]
        self._head = {"type": "http.response.start", "status": 200, "headers": headers}
        self._opened = False
        self._keepalive: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(OPEN_STREAM_AFTER_SECONDS, self._open)
        self._asking: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def _open(self) -> None:
        self._timer.cancel()
        if self._keepalive is None:
            self._keepalive = asyncio.ensure_future(self._keep_alive())

    async def _send_head(self) -> None:
        if not self._opened:
            self._opened = True
            await self._send(self._head)

    async def _keep_alive(self) -> None:
        await self._send_head()
        while True:
            await asyncio.sleep(PING_SECONDS)
            await self._send({"type": "http.response.body", "body": b": ping\r\n\r\n", "more_body": True})

    async def ask(self, request: BaseModel, result_type: type[ResultT]) -> ResultT:
        """Ask the agent `request` on this stream and return its answer, as the SDK's `ServerSession.send_request`
        does for a request related to the call: an error answer raises MCPError, a result is validated."""
        data = wire_form(request)
        request_id, answer = self._calls.expect_answer(self._session_id)
        self._asking[request_id] = answer
        try:
            self._open()
            await self._send_head()
            await self._send(_event({"jsonrpc": "2.0", "id": request_id, **data}, more_body=True))
            response = await answer
        finally:
            del self._asking[request_id]
            self._calls.forget_answer(self._session_id, request_id)
        if "error" in response:
            raise MCPError.from_error_data(ErrorData.model_validate(response["error"]))
        with suppress(KeyError):  # a method the version does not define is not checked, as the SDK does not
            methods.validate_client_result(data["method"], self._protocol_version, response.get("result"))
        return result_type.model_validate(response.get("result"), by_name=False)

    def close(self) -> None:
        """Stop opening or pinging the stream (the reply was sent, or will not be); what the call still waits
        for from the agent fails, as the SDK's pending requests fail when their connection closes."""
        self._timer.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
        for answer in self._asking.values():
            if not answer.done():
                answer.set_exception(MCPError(CONNECTION_CLOSED, "Connection closed"))

    async def answer(self, message: bytes) -> None:
        """Send the JSON-RPC response `message` (encoded) and end the stream."""
        self.close()
        if self._keepalive is not None:
            await asyncio.wait([self._keepalive])
            if not self._keepalive.cancelled() and self._keepalive.exception() is not None:
                return  # the connection failed under a ping: there is nobody to answer
        await self._send_head()
        await self._send(_event(message))


def _event(message: bytes | dict[str, Any], more_body: bool = False) -> dict[str, Any]:
    """An ASGI body message carrying one SSE `message` event."""
    data = message if isinstance(message, bytes) else json.dumps(message, separators=(",", ":")).encode()
    return {"type": "http.response.body", "body": b"event: message\r\ndata: %b\r\n\r\n" % data, "more_body": more_body}
