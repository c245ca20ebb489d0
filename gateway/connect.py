"""`enclave connect`: the stdio MCP server a local client launches, relaying to the gateway.

Design: a JSON-RPC message pump, not an MCP client plus an MCP server. Each line the client writes on stdin is
POSTed unchanged to the gateway's streamable HTTP endpoint (over its Unix socket by default, so the gateway can
attribute the connection to the local process that launched this wrapper), and whatever comes back, a JSON body
or the events of an SSE stream, is written to stdout unchanged. Nothing is parsed into SDK models, so every
method, field and extension of either protocol era passes as the client sent it. What streamable HTTP adds over
stdio is the wrapper's job, using the SDK's own constants and header encoders:

- handshake era (2025-11-25 and older): the `Mcp-Session-Id` from the initialize response and the negotiated
  `MCP-Protocol-Version` go on every later request; after `notifications/initialized` a GET stream carries what
  the server sends on its own (list changes, log messages); the client's answers to server requests are POSTed.
- 2026-07-28 era (stateless, recognised by the `_meta` protocol version of each request): the routing headers
  (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`, `Mcp-Param-*` from the `x-mcp-header` annotations of the
  tools the client has listed); a client's `notifications/cancelled` aborts that request's POST, which is how
  this era cancels over HTTP.

Gateway restarts: a request in flight when the connection drops gets a JSON-RPC error saying so (it may or may
not have run). New requests wait up to `RECONNECT_WINDOW` for the gateway to come back. A handshake-era session
does not survive a restart (the gateway answers 404), so the wrapper replays the client's own initialize,
resends the request, and tells the client that lists may have changed; the client keeps its session.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import anyio
import httpx2
from anyio.abc import TaskGroup
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_PROTOCOL_VERSION_HEADER,
    NAME_BEARING_METHODS,
    encode_header_value,
    mcp_param_headers,
    x_mcp_header_map,
)
from mcp_types import CONNECTION_CLOSED, INVALID_REQUEST, PARSE_ERROR, PROTOCOL_VERSION_META_KEY

from gateway.peers import CLAIM_HEADER

logger = logging.getLogger("enclave.connect")

SESSION_HEADER = "mcp-session-id"
# A Unix socket has no host or port, but HTTP needs a Host header: a loopback name passes the gateway's Host
# allowlist (DNS rebinding, which that allowlist stops, cannot reach a Unix socket anyway).
SOCKET_URL = "http://localhost:0/mcp"
RECONNECT_WINDOW = 10.0  # seconds a new request waits for an unreachable gateway
LIST_KINDS = ("tools", "prompts", "resources")

Message = dict[str, Any]


class Unreachable(Exception):
    """The gateway could not be reached, or the connection dropped before the reply."""


def process_claim() -> str:
    """What this wrapper says about itself and its launcher: recorded by the gateway as a claim, nothing more."""
    parent = os.getppid()
    try:
        parent_exe: str | None = os.readlink(f"/proc/{parent}/exe")
    except OSError:
        parent_exe = None
    return json.dumps({"pid": os.getpid(), "ppid": parent, "parent_exe": parent_exe}, separators=(",", ":"))


def http_client(token: str, socket_path: Path | None) -> httpx2.AsyncClient:
    """The client for the gateway: over its Unix socket when given, else plain HTTP(S) to the URL."""
    transport = httpx2.AsyncHTTPTransport(uds=str(socket_path)) if socket_path is not None else None
    headers = {"Authorization": f"Bearer {token}", CLAIM_HEADER: process_claim()}
    # No read timeout: a tool call, or an SSE stream waiting for server messages, may legitimately take long.
    timeout = httpx2.Timeout(30.0, connect=5.0, read=None)
    return httpx2.AsyncClient(transport=transport, headers=headers, timeout=timeout)


def error(request_id: Any, code: int, message: str) -> Message:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def modern_version(message: Message) -> str | None:
    """The protocol version a 2026-era request carries in its `_meta` envelope; None for the handshake era, whose
    requests carry none (an unsupported version is passed on, for the gateway to answer)."""
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    version = meta.get(PROTOCOL_VERSION_META_KEY) if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None


class Output:
    """stdout, one JSON-RPC message per line, written by one task at a time."""

    def __init__(self) -> None:
        self._out = anyio.wrap_file(sys.stdout.buffer)
        self._lock = anyio.Lock()

    async def send(self, data: bytes | Message) -> None:
        line = data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode()
        if b"\n" in line:  # a pretty-printed body: one line per message on stdio
            line = json.dumps(json.loads(line), separators=(",", ":")).encode()
        async with self._lock:
            await self._out.write(line + b"\n")
            await self._out.flush()


@dataclass
class _Session:
    """What the handshake era keeps: the client's initialize (to replay after a gateway restart) and its outcome."""

    hello: Message | None = None
    session_id: str | None = None
    version: str | None = None
    list_changes: tuple[str, ...] = ()  # the kinds whose list-changed notifications the server advertised
    generation: int = 0  # bumped by each (re-)initialisation
    lock: anyio.Lock = field(default_factory=anyio.Lock)


class Relay:
    """Relays one client's JSON-RPC messages to the gateway and the replies back."""

    def __init__(self, http: httpx2.AsyncClient, url: str, out: Output, where: str, wait: float = RECONNECT_WINDOW):
        self.http = http
        self.url = url
        self.out = out
        self.where = where  # for messages: unix:PATH or the URL
        self.wait = wait  # how long a request waits for an unreachable gateway
        self.session = _Session()
        self.header_maps: dict[str, dict[tuple[str, ...], str]] = {}  # tool -> x-mcp-header map (2026 era)
        self.modern_posts: dict[Any, anyio.CancelScope] = {}
        self._ids = count(1)
        self._listening: anyio.CancelScope | None = None
        self._tasks: TaskGroup | None = None

    async def run(self, lines: AsyncIterator[bytes]) -> None:
        async with anyio.create_task_group() as self._tasks:
            async for line in lines:
                if line.strip():
                    await self.dispatch(line)
            self._tasks.cancel_scope.cancel()  # stdin closed: the client is gone
        await self.close()

    async def dispatch(self, line: bytes) -> None:
        assert self._tasks is not None
        try:
            message = json.loads(line)
        except ValueError:
            await self.out.send(error(None, PARSE_ERROR, "Parse error: not a JSON-RPC message"))
            return
        if not isinstance(message, dict):
            await self.out.send(error(None, INVALID_REQUEST, "JSON-RPC batches are not supported; send one message"))
            return
        method = message.get("method")
        if method is not None and "id" in message:
            self._tasks.start_soon(self.request, message)
        elif method == "notifications/cancelled" and (self._abort(message) or self.session.session_id is None):
            return  # the 2026 era cancels by closing the request's POST and has no notifications over HTTP
        else:  # a notification, or the client's answer to a server request
            await self.notify(message)
            if method == "notifications/initialized":
                self._listen()

    # -- requests ------------------------------------------------------------------------------

    async def request(self, message: Message) -> None:
        version = modern_version(message)
        scope = anyio.CancelScope()
        if version is not None:
            self.modern_posts[message["id"]] = scope
        try:
            with scope:
                await self._request(message, version)
        except Unreachable as exc:
            await self.out.send(error(message["id"], CONNECTION_CLOSED, str(exc)))
        finally:
            if self.modern_posts.get(message["id"]) is scope:
                del self.modern_posts[message["id"]]

    async def _request(self, message: Message, version: str | None) -> None:
        if message["method"] == "initialize":
            self.session = _Session(hello=message)
        generation = self.session.generation
        for retry in (False, True):
            async with self._post(message, self._headers(message, version)) as response:
                lost = response.status_code == 404 and version is None and self.session.session_id is not None
                if lost and not retry:  # the gateway restarted and forgot the session
                    await response.aclose()
                else:
                    await self._relay_reply(message, response)
                    return
            await self._reinitialize(generation)

    async def _relay_reply(self, message: Message, response: httpx2.Response) -> None:
        """Write the reply to `message` (and whatever precedes it on an SSE stream) to the client."""
        if message["method"] == "initialize" and response.status_code == 200:
            self.session.session_id = response.headers.get(SESSION_HEADER)
        kind = response.headers.get("content-type", "").partition(";")[0].strip()
        try:
            if kind == "text/event-stream":
                async for event in httpx2.EventSource(response):
                    if event.data:
                        reply = await self._deliver(message, event.data.encode())
                        if reply:
                            return
            else:
                body = await response.aread()
                if await self._deliver(message, body, response.status_code):
                    return
        except (httpx2.TransportError, httpx2.SSEError):
            pass
        raise self._lost()

    async def _deliver(self, request: Message, data: bytes, status: int = 200) -> bool:
        """Pass one message from the gateway to the client; True if it was the reply to `request`."""
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":  # e.g. the body of a 401
            text = data.decode("utf-8", "replace").strip()[:200]
            await self.out.send(error(request["id"], CONNECTION_CLOSED, self._http_problem(status, text)))
            return True
        is_reply = "method" not in message and message.get("id") == request["id"]
        if is_reply and "result" in message:
            self._learn(request, message["result"])
        await self.out.send(data)
        return is_reply

    def _http_problem(self, status: int, text: str) -> str:
        if status == 401:
            return (
                "The enclave gateway refused the agent token (HTTP 401): check $ENCLAVE_TOKEN or the --token-file; "
                "the token may have been revoked or have expired"
            )
        return f"The enclave gateway answered HTTP {status}: {text or 'no details'}"

    def _learn(self, request: Message, result: Any) -> None:
        """What later requests need: the negotiated handshake-era version, and the tools' x-mcp-header maps."""
        if not isinstance(result, dict):
            return
        if request["method"] == "initialize":
            capabilities = result.get("capabilities") or {}
            self.session.version = result.get("protocolVersion")
            self.session.list_changes = tuple(
                kind for kind in LIST_KINDS if (capabilities.get(kind) or {}).get("listChanged")
            )
        elif request["method"] == "tools/list":
            for tool in result.get("tools") or []:
                if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                    header_map = x_mcp_header_map(tool.get("inputSchema"))
                    if header_map:
                        self.header_maps[tool["name"]] = header_map

    def _headers(self, message: Message, version: str | None) -> dict[str, str]:
        if version is None:
            headers = {}
            if self.session.session_id is not None and message.get("method") != "initialize":
                headers[SESSION_HEADER] = self.session.session_id
            if self.session.version is not None and message.get("method") != "initialize":
                headers[MCP_PROTOCOL_VERSION_HEADER] = self.session.version
            return headers
        method = message["method"]
        params = message.get("params") or {}
        headers = {MCP_PROTOCOL_VERSION_HEADER: version, MCP_METHOD_HEADER: method}
        name_key = NAME_BEARING_METHODS.get(method)
        if name_key is not None and isinstance(name := params.get(name_key), str):
            headers[MCP_NAME_HEADER] = encode_header_value(name)
        if method == "tools/call" and (header_map := self.header_maps.get(params.get("name"))):
            headers.update(mcp_param_headers(header_map, params.get("arguments") or {}))
        return headers

    # -- notifications, cancellation and the GET stream (handshake era) --------------------------

    async def notify(self, message: Message) -> None:
        """POST a notification or an answer to a server request; there is nobody to tell if it fails."""
        try:
            async with self._post(message, self._headers(message, None)) as response:
                if response.status_code >= 400:
                    logger.warning(
                        "the gateway refused a %s (HTTP %d)", message.get("method", "reply"), response.status_code
                    )
        except Unreachable as exc:
            logger.warning("%s", exc)

    def _abort(self, message: Message) -> bool:
        """A 2026-era request is cancelled by closing its POST; True if `message` cancelled one."""
        params = message.get("params")
        request_id = params.get("requestId") if isinstance(params, dict) else None
        scope = self.modern_posts.get(request_id)
        if scope is None:
            return False
        scope.cancel()
        return True

    def _listen(self) -> None:
        """(Re)open the GET stream on which the gateway sends what no request asked for."""
        if self._listening is not None:
            self._listening.cancel()
        self._listening = anyio.CancelScope()
        assert self._tasks is not None
        self._tasks.start_soon(self._stream, self._listening, self.session.generation)

    async def _stream(self, scope: anyio.CancelScope, generation: int) -> None:
        delay = 0.25
        with scope:
            while self.session.session_id is not None:
                headers = {**self._headers({}, None), "accept": "text/event-stream"}
                try:
                    async with self.http.stream("GET", self.url, headers=headers) as response:
                        if response.status_code == 404:
                            await self._reinitialize(generation)  # the gateway restarted and forgot the session
                            return
                        if response.status_code != 200:
                            return  # the gateway offers no stream (405) or refuses it: nothing to relay
                        delay = 0.25
                        async for event in httpx2.EventSource(response):
                            if event.data:
                                await self.out.send(event.data.encode())
                except (httpx2.TransportError, httpx2.SSEError):
                    pass
                except Unreachable as exc:
                    logger.warning("%s", exc)
                    return
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _reinitialize(self, generation: int) -> None:
        """After a gateway restart: open a new session with the client's own initialize, unless another task has
        already done so since `generation`, and tell the client its lists may have changed."""
        session = self.session
        async with session.lock:
            if session.generation != generation or session.hello is None:
                return
            logger.warning("the gateway no longer knows this session (it restarted?); opening a new one")
            hello = {**session.hello, "id": f"enclave-connect-{next(self._ids)}"}
            old_version = session.version
            session.session_id = session.version = None
            try:
                async with self._post(hello, {}) as response:
                    first = await _first_message(response) if response.status_code == 200 else b"{}"
                    session.session_id = response.headers.get(SESSION_HEADER)
                reply = json.loads(first)
            except (httpx2.TransportError, httpx2.SSEError, ValueError):
                reply = None
            result = reply.get("result") if isinstance(reply, dict) else None
            if not isinstance(result, dict) or result.get("protocolVersion") != old_version:
                raise Unreachable(
                    "The enclave gateway restarted and this client's session could not be reopened (in the protocol "
                    "version the client negotiated); restart the client"
                )
            self._learn(session.hello, result)
            session.generation += 1
            await self.notify({"jsonrpc": "2.0", "method": "notifications/initialized"})
            for kind in session.list_changes:
                await self.out.send({"jsonrpc": "2.0", "method": f"notifications/{kind}/list_changed"})
            self._listen()  # last: it ends the stream task that may be running this

    # -- transport -----------------------------------------------------------------------------

    @asynccontextmanager
    async def _post(self, message: Message, headers: dict[str, str]) -> AsyncIterator[httpx2.Response]:
        """POST one message; while the gateway cannot be reached (refused, no socket), retry for `self.wait` seconds.
        Only connecting is retried: once the request may have reached the gateway, a failure is reported."""
        body = json.dumps(message, separators=(",", ":")).encode()
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream", **headers}
        request = self.http.build_request("POST", self.url, content=body, headers=headers)
        deadline = anyio.current_time() + self.wait
        delay = 0.1
        while True:
            try:
                response = await self.http.send(request, stream=True)
                break
            except (httpx2.ConnectError, httpx2.ConnectTimeout):
                if anyio.current_time() >= deadline:
                    raise Unreachable(
                        f"The enclave gateway is not reachable at {self.where} (is `enclave serve` running?); "
                        "the request was not sent"
                    ) from None
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except httpx2.TransportError:
                raise self._lost() from None
        try:
            yield response
        finally:
            await response.aclose()

    def _lost(self) -> Unreachable:
        return Unreachable(
            f"The connection to the enclave gateway ({self.where}) was lost before the reply; the gateway may be "
            "restarting. The request may or may not have run: check before retrying it."
        )

    async def close(self) -> None:
        """End the handshake-era session, so the gateway's list of running agents is right."""
        if self.session.session_id is None:
            return
        with anyio.move_on_after(2), suppress(httpx2.TransportError):
            await self.http.delete(self.url, headers=self._headers({}, None))


async def _first_message(response: httpx2.Response) -> bytes:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        async for event in httpx2.EventSource(response):
            if event.data:
                return event.data.encode()
        return b"{}"
    return await response.aread()


async def stdin_lines() -> AsyncIterator[bytes]:
    stdin = anyio.wrap_file(sys.stdin.buffer)
    while line := await stdin.readline():
        yield line


def run(token: str, *, socket_path: Path | None, url: str | None, wait: float | None = None) -> int:
    """Relay stdio until the client closes stdin."""
    wait = RECONNECT_WINDOW if wait is None else wait
    where = f"unix:{socket_path}" if socket_path is not None else str(url)

    async def main() -> None:
        async with http_client(token, socket_path) as http:
            await Relay(http, url or SOCKET_URL, Output(), where, wait).run(stdin_lines())

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="enclave connect: %(message)s")
    anyio.run(main)
    return 0
