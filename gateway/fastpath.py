"""The fast path: `tools/call` served without the SDK's server machinery, in both protocol eras.

Why: a gateway sits on every tool call. Through the SDK's full server (middleware chain, per-request
dispatch context, pydantic params and result models) and its full client session on the upstream hop, a
call costs several milliseconds of gateway CPU on these machines; the product's budget is 0.5 ms.

What it is: an ASGI front of the /mcp endpoint that serves a request only when it can prove the SDK would
accept it, and hands everything else (every other method, any request the SDK's validation ladder would
reject, progress, Mcp-Param headers, chambered tools, a view not listed yet) to the SDK application
unchanged, body included. It serves:

* a stateless 2026-07-28 request, after the SDK's own checks (transport security, Accept, routing-header
  duplicates, the modern envelope ladder), answered with JSON;
* a request on an open handshake-era session that the SDK path has already served for the same agent, after
  the SDK transport's checks (transport security, Accept, Content-Type, the JSON-RPC envelope, the method's
  params for the negotiated version), answered over SSE as the transport answers, with what the upstream asks
  of the agent meanwhile (elicitation, sampling, roots) on the same stream; gateway.handshake keeps what the
  session needs while the call runs.

The decision steps are the gateway's one pipeline (`authorize_tool`, `recording`, redaction), and the result
is serialised by the SDK's function for the agent's protocol version. tests/test_fastpath.py compares its
replies with the SDK path's, in both eras. It sits behind the agent guard (gateway.guard), which reads and
strictly decodes the body for both paths: the fast path serves only a message the guard decoded, so both
paths act on the same one.

It is written on plain asyncio where it waits (the disconnect watch here, the stdio lane, the audit commit),
not anyio: the server runs on asyncio only, and every anyio primitive (cancel scope, task group, event)
looks its backend up on each use, which measured as a large share of the gateway's CPU per call.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

from mcp.server.runner import modern_error_data
from mcp.server.streamable_http import REQUEST_CANCELLED, check_accept_headers
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    MCP_PARAM_HEADER_PREFIX,
    InboundModernRoute,
    classify_inbound_request,
    find_duplicated_routing_header,
)
from mcp_types import (
    InputRequiredResult,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    jsonrpc_message_adapter,
    methods,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import telemetry
from gateway.auth import Agent
from gateway.guard import AGENT_KEY, MESSAGE_KEY
from gateway.handshake import SessionCalls
from gateway.invocation import Invocation
from gateway.peers import process_of
from gateway.pipeline import AgentChannel, Gateway, forwardable_meta, wire_form
from gateway.view import ExposedTool

SERVER_INFO_META_KEY = "io.modelcontextprotocol/serverInfo"
_PARAM_PREFIX = MCP_PARAM_HEADER_PREFIX.lower().encode()
_JSON_HEADERS = [(b"content-type", b"application/json")]
T = TypeVar("T")


class FastPath:
    """ASGI app in front of the SDK app (`slow`); see the module docstring for what it serves."""

    def __init__(
        self,
        slow: ASGIApp,
        gateway: Gateway,
        security: TransportSecuritySettings,
        path: str,
        server_info: dict[str, Any],
        sessions: SessionCalls,
    ):
        self.slow = slow
        self.gateway = gateway
        self.security = TransportSecurityMiddleware(security)
        self.path = path
        self.server_info = server_info
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The body, as the agent guard in front decoded it (strictly) for an authenticated agent's POST.
        message = scope.get(MESSAGE_KEY)
        if message is None or not await self._served(scope, receive, send, message):
            await self.slow(scope, receive, send)

    async def _served(self, scope: Scope, receive: Receive, send: Send, message: dict[str, Any]) -> bool:
        """Serve the request and return True, or return False (having sent nothing) to hand it on."""
        if scope["method"] != "POST" or scope["path"] != self.path:
            return False
        if any(k.startswith(_PARAM_PREFIX) for k, _ in scope["headers"]):
            return False
        version = _header(scope, b"mcp-protocol-version")
        if version in MODERN_PROTOCOL_VERSIONS:
            return await self._serve_stateless(scope, receive, send, message)
        session_id = _header(scope, b"mcp-session-id")
        if version in HANDSHAKE_PROTOCOL_VERSIONS and session_id:
            return await self._serve_in_session(scope, receive, send, message, session_id)
        return False

    async def _serve_stateless(self, scope: Scope, receive: Receive, send: Send, message: dict[str, Any]) -> bool:
        """A 2026-07-28 request."""
        if (parsed := _tool_call(message)) is None:
            return False
        name, arguments, meta = parsed
        request = Request(scope, receive)
        if not await self._transport_accepts(request) or find_duplicated_routing_header(request.headers.items()):
            return False
        verdict = classify_inbound_request(message, headers=dict(request.headers))
        if not isinstance(verdict, InboundModernRoute):
            return False
        if self._fast_tool(scope[AGENT_KEY], name) is None:
            return False
        call = self._invocation(scope, message, verdict.protocol_version)
        if isinstance(verdict.client_info, dict):
            call.client_name, call.client_version = verdict.client_info.get("name"), verdict.client_info.get("version")
        with telemetry.server_span(call, meta):  # the SDK's OpenTelemetryMiddleware is not on this path
            channel = AgentChannel(verdict.client_capabilities, None)
            outcome = await _unless_disconnected(receive, self._call(call, arguments, meta, channel))
        if outcome is not None:
            await self._respond(send, message["id"], outcome)
        return True

    async def _serve_in_session(
        self, scope: Scope, receive: Receive, send: Send, message: dict[str, Any], session_id: str
    ) -> bool:
        """A request on a handshake-era session."""
        agent = scope[AGENT_KEY]
        session = self.gateway.handshake_session(session_id, agent)
        transport = self.sessions.transport(session_id)
        if session is None or transport is None:
            return False
        method = message.get("method")
        cancel = method == "notifications/cancelled"  # it may name a call this path is serving
        answer = method is None  # the agent's answer to what a call asked it, if it is one here
        parsed = None if cancel or answer else _tool_call(message)
        if parsed is None and not (cancel or answer):
            return False
        request = Request(scope, receive)  # whatever it is, it acts only if the transport would accept it
        if not await self._transport_accepts(request) or not transport._check_content_type(request):
            return False
        try:
            envelope = jsonrpc_message_adapter.validate_python(message, by_name=False)
        except ValidationError:
            return False
        if cancel and isinstance(envelope, JSONRPCNotification):
            self.sessions.cancel(session_id, message.get("params"))
            return False  # the SDK path acknowledges it (202), as for any notification
        if isinstance(envelope, JSONRPCResponse | JSONRPCError) and self.sessions.answered(session_id, message):
            await _accepted(send, session_id)  # as the transport acknowledges a response
            return True
        if parsed is None or not isinstance(envelope, JSONRPCRequest):
            return False
        name, arguments, meta = parsed
        connection = session._connection  # private to mcp 2.3 (pinned): the session's negotiated state
        version = connection.protocol_version
        try:
            methods.validate_client_request("tools/call", version, message["params"])
        except (ValidationError, KeyError):
            return False
        if self.sessions.in_flight(session_id, message["id"]) or self._fast_tool(agent, name) is None:
            return False
        call = self._invocation(scope, message, version)
        call.session_id = session_id
        if (client := connection.client_params) is not None:
            call.client_name, call.client_version = client.client_info.name, client.client_info.version
        stream = self.sessions.stream(send, session_id, version)
        try:
            with telemetry.server_span(call, meta):
                served = self._call(call, arguments, meta, AgentChannel(connection.client_capabilities, stream.ask))
                outcome = await self.sessions.run(transport, message["id"], served)
            await stream.answer(_in_session_reply(message["id"], outcome))
        finally:
            stream.close()
        return True

    async def _transport_accepts(self, request: Request) -> bool:
        """The transport checks both eras' SDK paths run first: DNS-rebinding protection, then Accept."""
        if await self.security.validate_request(request, is_post=True) is not None:
            return False
        return check_accept_headers(request) == (True, True)

    def _fast_tool(self, agent: Agent, name: str) -> ExposedTool | None:
        """The tool `name`, if the agent's view has listed it already and this path may call it: no Mcp-Param
        arguments, not in a chamber (whose check may ask the agent's user: the SDK path's business)."""
        view = self.gateway.views.get(agent.enclave)
        tool = view.cached_tool(name) if view is not None else None
        if tool is None or not tool.fast or self.gateway.chambers.chambers_of(agent.enclave, "tool", tool.name):
            return None
        return tool

    def _invocation(self, scope: Scope, message: dict[str, Any], protocol_version: str) -> Invocation:
        call = Invocation(
            method="tools/call",
            target=message["params"]["name"],
            protocol_version=protocol_version,
            request_id=message["id"],
            agent=scope[AGENT_KEY],
            process=process_of(scope),
        )
        if (length := _header(scope, b"content-length")).isdigit():
            call.bytes_in = int(length)
        return call

    async def _call(
        self, call: Invocation, arguments: dict[str, Any], meta: Any, channel: AgentChannel
    ) -> str | Exception:
        """The pipeline for one call; returns the result encoded as JSON (encoded once, and measured as encoded,
        inside the audited scope), or the exception that becomes the error reply. `channel`: how the agent can be
        asked for what the upstream asks meanwhile."""
        try:
            async with self.gateway.recording(call):
                tool = await self.gateway.authorize_tool(call, call.target or "", arguments)
                upstream, push = self.gateway.pool[tool.connector], self.gateway.pushed_to(channel)

                async def send(responses: dict[str, BaseModel] | None, state: str | None) -> Any:
                    params: dict[str, Any] = {"name": tool.upstream_name, "arguments": arguments}
                    if forwarded := forwardable_meta(meta):
                        params["_meta"] = forwarded
                    if responses is not None:  # a retry with the agent's answers, as the SDK's client sends it
                        params["inputResponses"] = {key: wire_form(answer) for key, answer in responses.items()}
                        if state is not None:
                            params["requestState"] = state
                    raw = await upstream.send_raw("tools/call", params, push)
                    return (
                        InputRequiredResult.model_validate(raw, by_name=False)
                        if methods.is_input_required(raw)
                        else raw
                    )

                result = await self.gateway.with_input(channel, send)
                if isinstance(result, BaseModel):
                    result = wire_form(result)
                encoded = json.dumps(self._for_agent(call, self.gateway.scrubbed(call, result)), separators=(",", ":"))
                self.gateway.count_out(call, len(encoded))
                return encoded
        except Exception as exc:
            return exc

    def _for_agent(self, call: Invocation, result: dict[str, Any]) -> dict[str, Any]:
        """The result as the SDK would serialise it for the agent's protocol version."""
        if not methods.is_input_required(result):
            # What the SDK path's typed CallToolResult adds for a handshake-era upstream's result.
            result.setdefault("resultType", "complete")
            result.setdefault("isError", False)
        dumped = methods.serialize_server_result("tools/call", call.protocol_version, result)
        if call.protocol_version in MODERN_PROTOCOL_VERSIONS:
            dumped["_meta"] = {**dumped.get("_meta", {}), SERVER_INFO_META_KEY: self.server_info}
        return dumped

    async def _respond(self, send: Send, request_id: Any, outcome: str | Exception) -> None:
        if isinstance(outcome, Exception):
            error = _error_data(outcome)
            status = ERROR_CODE_HTTP_STATUS.get(error["code"], 200)
            payload = _error_message(request_id, error)
        else:
            status = 200
            payload = _result_message(request_id, outcome)
        headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _header(scope: Scope, name: bytes) -> str:
    return next((v for k, v in scope["headers"] if k == name), b"").decode("latin-1")


def _tool_call(message: dict[str, Any]) -> tuple[str, dict[str, Any], Any] | None:
    """A `tools/call` request's tool name, arguments and `_meta`, if this path may serve it."""
    if message.get("method") != "tools/call" or "id" not in message:
        return None
    params = message.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("name"), str):
        return None
    arguments = params.get("arguments", {})
    meta = params.get("_meta")
    if not isinstance(arguments, dict) or (isinstance(meta, dict) and "progressToken" in meta):
        return None
    if "inputResponses" in params or "requestState" in params:  # an input_required retry: left to the SDK path
        return None
    return params["name"], arguments, meta


async def _accepted(send: Send, session_id: str) -> None:
    headers = [*_JSON_HEADERS, (b"mcp-session-id", session_id.encode()), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _result_message(request_id: Any, result: str) -> bytes:
    """Both parts are JSON already: the result is not encoded a second time."""
    return b'{"jsonrpc":"2.0","id":%b,"result":%b}' % (json.dumps(request_id).encode(), result.encode())


def _error_message(request_id: Any, error: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}, separators=(",", ":")).encode()


def _error_data(exc: Exception) -> dict[str, Any]:
    """The wire error for what the pipeline raised: an MCPError, which the SDK maps alike in both eras."""
    return wire_form(modern_error_data(exc))


def _in_session_reply(request_id: Any, outcome: str | Exception | None) -> bytes:
    """The response message on a handshake-era session, as the SDK's dispatcher would write it (None: the call
    was cancelled, which the SDK's transport answers with REQUEST_CANCELLED)."""
    if isinstance(outcome, str):
        return _result_message(request_id, outcome)
    if outcome is None:
        return _error_message(request_id, {"code": REQUEST_CANCELLED, "message": "Request cancelled"})
    return _error_message(request_id, _error_data(outcome))


async def _unless_disconnected(receive: Receive, call: Awaitable[T]) -> T | None:
    """Await `call` in this task, or cancel it (and return None) when the agent closes its POST: that is how a
    2026-era agent cancels a request, and the cancellation must travel on to the upstream as it does on the SDK
    path. (One plain task watches for the disconnect; an anyio task group per call cost several times more.)"""
    task = asyncio.current_task()
    assert task is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        outcome = await call
    except asyncio.CancelledError:
        if not disconnected:
            raise
    finally:
        watcher.cancel()
    if disconnected:
        task.uncancel()
        return None
    return outcome
