"""The fast path: `tools/call` of the stateless 2026-07-28 era, served without the SDK's server machinery.

Why: a gateway sits on every tool call. Through the SDK's full server (middleware chain, per-request
dispatch context, pydantic params and result models) and its full client session on the upstream hop, a
call costs several milliseconds of gateway CPU on these machines; the product's budget is 0.5 ms.

What it is: an ASGI front of the /mcp endpoint that serves a request only when it can prove the SDK would
accept it, and hands everything else (every other method, the handshake era, any request the SDK's
validation ladder would reject, progress, Mcp-Param headers, chambered tools, a view not listed yet)
to the SDK application unchanged, body included. The checks it runs are the SDK's own functions (transport
security, Accept, routing-header duplicates, the modern envelope ladder, result serialisation for the
agent's protocol version), and the decision steps are the gateway's one pipeline (`authorize_tool`,
`recording`, redaction). tests/test_fastpath.py compares its replies with the SDK path's. It sits behind the
agent guard (gateway.guard), which reads and strictly decodes the body for both paths: the fast path serves
only a message the guard decoded, so both paths act on the same one.

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
from mcp.server.streamable_http import check_accept_headers
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    MCP_PARAM_HEADER_PREFIX,
    InboundModernRoute,
    classify_inbound_request,
    find_duplicated_routing_header,
)
from mcp_types import methods
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import telemetry
from gateway.guard import AGENT_KEY, MESSAGE_KEY
from gateway.invocation import Invocation
from gateway.peers import process_of
from gateway.pipeline import Gateway, forwardable_meta

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
    ):
        self.slow = slow
        self.gateway = gateway
        self.security = TransportSecurityMiddleware(security)
        self.path = path
        self.server_info = server_info

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The body, as the agent guard in front decoded it (strictly) for an authenticated agent's POST.
        message = scope.get(MESSAGE_KEY)
        if message is None or not self._candidate(scope) or not await self._serve(scope, receive, send, message):
            await self.slow(scope, receive, send)

    def _candidate(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            return False
        version = next((v for k, v in scope["headers"] if k == b"mcp-protocol-version"), b"").decode("latin-1")
        return version in MODERN_PROTOCOL_VERSIONS and not any(k.startswith(_PARAM_PREFIX) for k, _ in scope["headers"])

    async def _serve(self, scope: Scope, receive: Receive, send: Send, message: dict[str, Any]) -> bool:
        """Serve the request and return True, or return False (having sent nothing) to hand it on."""
        if message.get("method") != "tools/call" or "id" not in message:
            return False
        params = message.get("params")
        if not isinstance(params, dict) or not isinstance(params.get("name"), str):
            return False
        arguments = params.get("arguments", {})
        meta = params.get("_meta")
        if not isinstance(arguments, dict) or (isinstance(meta, dict) and "progressToken" in meta):
            return False
        if "inputResponses" in params or "requestState" in params:  # an input_required retry: left to the SDK path
            return False

        request = Request(scope, receive)
        if await self.security.validate_request(request, is_post=True) is not None:
            return False
        if check_accept_headers(request) != (True, True) or find_duplicated_routing_header(request.headers.items()):
            return False
        verdict = classify_inbound_request(message, headers=dict(request.headers))
        if not isinstance(verdict, InboundModernRoute):
            return False
        agent = scope[AGENT_KEY]
        view = self.gateway.views.get(agent.enclave)
        tool = view.cached_tool(params["name"]) if view is not None else None
        if tool is None or not tool.fast or self.gateway.chambers.chambers_of(agent.enclave, "tool", tool.name):
            return False

        call = Invocation(
            method="tools/call",
            target=tool.name,
            protocol_version=verdict.protocol_version,
            request_id=message["id"],
            agent=agent,
            process=process_of(scope),
        )
        if isinstance(verdict.client_info, dict):
            call.client_name, call.client_version = verdict.client_info.get("name"), verdict.client_info.get("version")
        with telemetry.server_span(call, meta):  # the SDK's OpenTelemetryMiddleware is not on this path
            outcome = await _unless_disconnected(receive, self._call(call, arguments, meta, verdict))
        if outcome is not None:
            await self._respond(send, message["id"], outcome)
        return True

    async def _call(
        self, call: Invocation, arguments: dict[str, Any], meta: Any, verdict: InboundModernRoute
    ) -> str | Exception:
        """The pipeline for one call; returns the result encoded as JSON (encoded once, and measured as encoded,
        inside the audited scope), or the exception that becomes the error reply."""
        try:
            async with self.gateway.recording(call):
                tool = await self.gateway.authorize_tool(call, call.target or "", arguments)
                upstream_params: dict[str, Any] = {"name": tool.upstream_name, "arguments": arguments}
                if forwarded := forwardable_meta(meta):
                    upstream_params["_meta"] = forwarded
                raw = await self.gateway.pool[tool.connector].send_raw("tools/call", upstream_params)
                if methods.is_input_required(raw):
                    requests = raw.get("inputRequests") or {}
                    self.gateway.check_input_capabilities(verdict.client_capabilities, requests)
                encoded = json.dumps(self._for_agent(call, self.gateway.scrubbed(call, raw)), separators=(",", ":"))
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
        dumped["_meta"] = {**dumped.get("_meta", {}), SERVER_INFO_META_KEY: self.server_info}
        return dumped

    async def _respond(self, send: Send, request_id: Any, outcome: str | Exception) -> None:
        if isinstance(outcome, Exception):
            error = modern_error_data(outcome).model_dump(mode="json", by_alias=True, exclude_none=True)
            status = ERROR_CODE_HTTP_STATUS.get(error["code"], 200)
            payload = json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}, separators=(",", ":")).encode()
        else:  # both parts are JSON already: the result is not encoded a second time
            status = 200
            payload = b'{"jsonrpc":"2.0","id":%b,"result":%b}' % (json.dumps(request_id).encode(), outcome.encode())
        headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


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
