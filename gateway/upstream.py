"""Upstream MCP servers: one warm, supervised session per connector, with real credentials injected.

Each connector's session is owned by a task in the gateway's task group (anyio cancel scopes must be
entered and left by the same task). It is opened on first use, shared by every agent session whose enclave
uses the connector, and dropped when a call finds it broken: the caller gets a clear error, and the next
use starts it again. A server that keeps failing (it will not start, crashes, or sends a message over its
`max_result_bytes`) is restarted with backoff: the first restart at once, then after 0.5 s, 1 s, 2 s, ... up
to RESTART_BACKOFF_MAX; until then its calls fail at once with UPSTREAM_UNAVAILABLE. A call that completes
resets the count. Other connectors never wait on it. Closing the pool terminates every spawned process.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal, get_args

import anyio
import httpx2
import mcp_types as types
from anyio.abc import TaskGroup, TaskStatus
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.subscriptions import PromptsListChanged, ResourcesListChanged, ToolsListChanged
from mcp_types import CONNECTION_CLOSED
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from gateway import errors, telemetry
from gateway.config import Connector, StdioTarget
from gateway.redact import Redactor
from gateway.secrets import SecretResolver
from gateway.upstream_http import IDENTITY, BoundedJsonTransport
from gateway.upstream_stdio import LaneClosed, RawLane, bounded_stdio_client

logger = logging.getLogger(__name__)

ListKind = Literal["tools", "prompts", "resources"]
ListChanged = Callable[[str, ListKind], Awaitable[None]]
# (connector, notification): a log message or a resource update for the agents that asked for it.
Relay = Callable[[str, types.LoggingMessageNotification | types.ResourceUpdatedNotification], Awaitable[None]]
# Answers what an upstream asks (method, params) during one agent request: the agent's result, or an ErrorData.
PushTarget = Callable[[str, Any], Awaitable[Any]]
LOG_LEVELS: tuple[types.LoggingLevel, ...] = get_args(types.LoggingLevel)  # least to most severe
MAX_LIST_PAGES = 100
MAX_STDERR_LINE = 4096
RESTART_BACKOFF_FIRST = 0.5  # seconds before the second restart in a row; doubled for each one after
RESTART_BACKOFF_MAX = 30.0

_NOTIFICATION_KIND: dict[type, ListKind] = {
    types.ToolListChangedNotification: "tools",
    types.PromptListChangedNotification: "prompts",
    types.ResourceListChangedNotification: "resources",
}
_EVENT_KIND: dict[type, ListKind] = {
    ToolsListChanged: "tools",
    PromptsListChanged: "prompts",
    ResourcesListChanged: "resources",
}


class Upstream:
    """The live session to one connector's server, (re)opened on demand."""

    def __init__(
        self,
        connector: Connector,
        resolver: SecretResolver,
        redactor: Redactor,
        on_list_changed: ListChanged,
        relay: Relay | None = None,
    ):
        self.connector = connector
        self._resolver = resolver
        self._redactor = redactor
        self._on_list_changed = on_list_changed
        self._relay = relay
        self._in_flight: dict[object, PushTarget | None] = {}
        self._log_level: types.LoggingLevel | None = None
        self._subscriptions: Counter[str] = Counter()
        self._task_group: TaskGroup | None = None
        self._client: Client | None = None
        self._lane: RawLane | None = None  # beside a stdio server's session: the fast path's hop
        self._stop: anyio.Event | None = None
        self._lock = anyio.Lock()
        self._tools: list[types.Tool] | None = None
        self._prompts: list[types.Prompt] | None = None
        self._failures = 0  # in a row: failed starts, crashes, oversized messages
        self._retry_at = 0.0  # anyio time before which the server is not started again
        self._oversized = False  # the open session ended on a message over max_result_bytes

    @property
    def name(self) -> str:
        return self.connector.name

    @property
    def protocol_version(self) -> str | None:
        return self._client.protocol_version if self._client is not None else None

    # -- connection lifecycle ------------------------------------------------------------------

    async def session(self) -> ClientSession:
        """The connector's session, opening it if needed (raises MCPError if it cannot be reached)."""
        if self._client is None:
            if self._task_group is None:
                raise MCPError(errors.UPSTREAM_UNAVAILABLE, errors.upstream_unavailable(self.name))
            async with self._lock:
                if self._client is None:
                    if (wait := self._retry_at - anyio.current_time()) > 0:
                        message = errors.upstream_backing_off(self.name, self._failures, wait)
                        raise MCPError(errors.UPSTREAM_UNAVAILABLE, message)
                    try:
                        await self._task_group.start(self._hold)
                    except Exception as exc:
                        logger.warning("connector %s failed to start: %s", self.name, self._redactor.text(str(exc)))
                        self._failed()
                        raise MCPError(errors.UPSTREAM_UNAVAILABLE, errors.upstream_unavailable(self.name)) from None
        assert self._client is not None
        return self._client.session

    def attach(self, task_group: TaskGroup | None) -> None:
        """Sessions run as tasks of `task_group`; detaching (None) closes the current one."""
        self._task_group = task_group
        if task_group is None:
            self.reset()

    def reset(self) -> None:
        """Drop the session (it is broken or being replaced); the next use opens a new one."""
        self._client = self._lane = None
        self._tools = self._prompts = None
        if self._stop is not None:
            self._stop.set()

    def _broken(self, session: ClientSession) -> None:
        """`session` failed under a request: drop it, counting the failure once however many requests saw it."""
        if self._client is not None and self._client.session is session:
            self.reset()
            self._failed()

    def _failed(self) -> None:
        self._failures += 1
        backoff = RESTART_BACKOFF_FIRST * 2 ** (self._failures - 2) if self._failures > 1 else 0.0
        self._retry_at = anyio.current_time() + min(backoff, RESTART_BACKOFF_MAX)

    def _too_large(self) -> None:
        self._oversized = True

    async def _hold(self, *, task_status: TaskStatus[None]) -> None:
        telemetry.hold_upstream_session(self)
        stop = anyio.Event()
        started = False
        self._oversized = False
        try:
            async with self._open() as (client, lane), anyio.create_task_group() as watchers:
                if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
                    watchers.start_soon(self._listen, client)
                self._client, self._lane, self._stop, started = client, lane, stop, True
                if self._log_level is not None or self._subscriptions:
                    watchers.start_soon(self._restore, client.session)
                task_status.started()
                await stop.wait()
                watchers.cancel_scope.cancel()
        except Exception as exc:
            if not started:
                raise
            logger.warning("connector %s closed: %s", self.name, self._redactor.text(repr(exc)))
            if self._stop is stop:  # it ended by itself, not because it was reset
                self._failed()
        finally:
            if self._stop is stop:
                self._client = self._lane = None
                self._tools = self._prompts = None

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[tuple[Client, RawLane | None]]:
        target = self.connector.target
        if isinstance(target, StdioTarget):
            # The gateway's non-secret OTel settings, so the upstream's spans join the trace; the connector's wins.
            env = telemetry.forwarded_environment() | {
                name: self._resolver.expand(value) for name, value in target.env.items()
            }
            params = StdioServerParameters(command=target.command, args=list(target.args), env=env, cwd=target.cwd)
            limit, lane = self.connector.max_result_bytes, RawLane()
            async with _stderr_relay(self.name, self._redactor) as errlog:
                transport = bounded_stdio_client(self.name, params, errlog, limit, self._too_large, lane)
                async with self._client_for(transport) as client:
                    yield client, lane
        else:
            headers = {name: self._resolver.expand(value) for name, value in target.headers.items()}
            limit = self.connector.max_result_bytes
            # A plain JSON reply is bounded by the transport, each event of a streamed (SSE) one by the SDK.
            http = httpx2.AsyncClient(headers=IDENTITY | headers, transport=BoundedJsonTransport(self.name, limit))
            transport = streamable_http_client(target.url, http_client=http, max_sse_event_size=limit)
            async with http, self._client_for(transport) as client:
                yield client, None

    def _client_for(self, transport: Any) -> Client:
        return Client(
            transport,
            mode="auto",
            cache=None,  # lists are filtered per enclave: never serve one from a shared cache
            message_handler=self._on_message,
            elicitation_callback=self._pushed_elicitation,
            sampling_callback=self._pushed_sampling,
            read_timeout_seconds=self.connector.timeout_seconds,
        )

    async def _on_message(self, message: Any) -> None:
        """The upstream's notifications. A 2026-era upstream's list changes are teed here from its listen stream
        too, and `_listen` already handles those: taking them twice would notify agents twice."""
        kind = _NOTIFICATION_KIND.get(type(message))
        if kind is not None and self.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            await self._list_changed(kind)
        elif isinstance(message, types.LoggingMessageNotification | types.ResourceUpdatedNotification) and self._relay:
            await self._relay(self.name, message)

    async def _listen(self, client: Client) -> None:
        try:
            async with client.listen(
                tools_list_changed=True, prompts_list_changed=True, resources_list_changed=True
            ) as subscription:
                async for event in subscription:
                    kind = _EVENT_KIND.get(type(event))
                    if kind is not None:
                        await self._list_changed(kind)
        except Exception as exc:  # an upstream without listen support simply sends no changes
            logger.info("connector %s: no change notifications (%s)", self.name, self._redactor.text(str(exc)))

    async def _list_changed(self, kind: ListKind) -> None:
        if kind == "tools":
            self._tools = None
        elif kind == "prompts":
            self._prompts = None
        await self._on_list_changed(self.name, kind)

    # -- requests ------------------------------------------------------------------------------

    @asynccontextmanager
    async def request(self, push: PushTarget | None = None) -> AsyncIterator[ClientSession]:
        """Send one request on the session, under the connector's timeout; a broken session is reset.
        `push` answers what the upstream asks of the agent while this request is in flight (see `_pushed`)."""
        session = await self.session()
        hop = telemetry.current_upstream.set(self)
        flight = object()
        self._in_flight[flight] = push
        try:
            with anyio.fail_after(self.connector.timeout_seconds):
                yield session
        except TimeoutError:
            raise self._timed_out() from None
        except MCPError as exc:
            if exc.error.code == CONNECTION_CLOSED:
                raise self._lost(session) from None
            raise self._scrubbed(exc.error) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, OSError):
            raise self._lost(session) from None
        else:
            self._failures = 0
        finally:
            del self._in_flight[flight]
            telemetry.current_upstream.reset(hop)

    async def send_raw(self, method: str, params: dict[str, Any], push: PushTarget | None = None) -> dict[str, Any]:
        """Send one request as plain JSON and return the raw result dict (the fast path's upstream hop); `push`
        as for `request`.

        `ClientSession.send_request` builds and validates pydantic models on both sides of the call; the fast
        path does without them. It still stamps the request exactly as the SDK does for the negotiated era
        (`session._stamp`: the `_meta` envelope and routing headers of 2026-07-28). A stdio server's request
        takes the session's `RawLane` (plain asyncio, no anyio primitive: measured on the hot path), an HTTP
        server's the SDK's dispatcher. Both are private SDK members, pinned by `mcp==2.3.*` and covered by the
        tests that compare the fast path with the SDK path in both eras. The outcomes are those of `request`.
        """
        session = await self.session()
        lane = self._lane
        if lane is None:
            async with self.request(push) as session:
                stamped, options = _stamped(session, method, params)
                return await session._dispatcher.send_raw_request(method, stamped, options)  # type: ignore[arg-type]
        stamped, _ = _stamped(session, method, params)
        request_id = lane.new_id()
        flight = object()
        self._in_flight[flight] = push
        try:
            with telemetry.upstream_span(self, method, request_id, stamped):
                try:
                    async with asyncio.timeout(self.connector.timeout_seconds):
                        response = await lane.request(request_id, method, stamped)
                except TimeoutError:
                    raise self._timed_out() from None
                except LaneClosed:
                    raise self._lost(session) from None
                if "error" in response:
                    raise self._scrubbed(types.ErrorData.model_validate(response["error"]))
        finally:
            del self._in_flight[flight]
        self._failures = 0
        return response["result"]

    def _timed_out(self) -> MCPError:
        return MCPError(errors.UPSTREAM_TIMEOUT, errors.upstream_timeout(self.name))

    def _lost(self, session: ClientSession) -> MCPError:
        """`session` broke under a request: drop it; the error for the agent."""
        self._broken(session)
        if self._oversized:
            return errors.result_too_large(self.name, self.connector.max_result_bytes)
        return MCPError(errors.UPSTREAM_UNAVAILABLE, errors.upstream_unavailable(self.name))

    def _scrubbed(self, error: types.ErrorData) -> MCPError:
        """The upstream's own error, for the agent: scrubbed like a result (it may quote its credential)."""
        return MCPError(error.code, self._redactor.text(error.message), self._redactor.value(error.data))

    async def tools(self) -> list[types.Tool]:
        if self._tools is None:
            self._tools = await self._all_pages("tools", lambda s, p: s.list_tools(params=p))
        return self._tools

    async def prompts(self) -> list[types.Prompt]:
        if self._prompts is None:
            self._prompts = await self._all_pages("prompts", lambda s, p: s.list_prompts(params=p))
        return self._prompts

    async def resources(self) -> list[types.Resource]:
        return await self._all_pages("resources", lambda s, p: s.list_resources(params=p))

    async def resource_templates(self) -> list[types.ResourceTemplate]:
        return await self._all_pages("resourceTemplates", lambda s, p: s.list_resource_templates(params=p))

    async def _all_pages(self, field: str, fetch: Callable[[ClientSession, Any], Awaitable[Any]]) -> list[Any]:
        """Every page of a list: the enclave view filters the whole list, so it cannot page through."""
        capability = {"tools": "tools", "prompts": "prompts"}.get(field, "resources")
        session = await self.session()
        capabilities = session.server_capabilities
        if capabilities is not None and getattr(capabilities, capability, None) is None:
            return []
        items: list[Any] = []
        cursor: str | None = None
        for _ in range(MAX_LIST_PAGES):
            async with self.request() as session:
                page = await fetch(session, types.PaginatedRequestParams(cursor=cursor) if cursor else None)
            items += getattr(page, _attribute(field))
            cursor = page.next_cursor
            if not cursor:
                return items
        logger.warning("connector %s: %s list exceeds %d pages; truncated", self.name, field, MAX_LIST_PAGES)
        return items

    # -- what a handshake-era upstream pushes, and per-session state agents asked for -----------

    async def _pushed_elicitation(self, context: Any, params: types.ElicitRequestParams) -> Any:
        return await self._pushed("elicitation/create", params)

    async def _pushed_sampling(self, context: Any, params: types.CreateMessageRequestParams) -> Any:
        return await self._pushed("sampling/createMessage", params)

    async def _pushed(self, method: str, params: Any) -> Any:
        """A 2025-era upstream asks for input (elicitation, sampling) over the shared session.

        MCP requires such a request to belong to a request the upstream is serving (SEP-2260), but the wire does
        not say which one. It goes to the agent whose request is the only one in flight on this session, and is
        refused when there are several or none, so it can never reach an agent it does not belong to. (2026-era
        upstreams return input_required results instead, which the pipeline bridges per call.)
        """
        targets = list(self._in_flight.values())
        if len(targets) == 1 and targets[0] is not None:
            return await targets[0](method, params)
        if len(targets) > 1:
            why = "several requests share this upstream session now; retry when fewer are in flight"
        elif targets:
            why = "the request it belongs to cannot take questions from the upstream"
        else:
            why = "it belongs to no request in flight"
        logger.warning("connector %s: %s refused: %s", self.name, method, why)
        return types.ErrorData(code=types.INVALID_REQUEST, message=f"{method} refused by the gateway: {why}")

    async def want_log_level(self, level: types.LoggingLevel) -> None:
        """Have the upstream send log messages at `level` and above. Its session is shared, so it is asked for the
        most verbose level any agent session wanted (the gateway filters per session); reopened sessions too."""
        if self._log_level is not None and LOG_LEVELS.index(level) >= LOG_LEVELS.index(self._log_level):
            return
        self._log_level = level
        if self._client is not None:
            async with self.request() as session:
                await self._send_log_level(session)

    async def subscribe(self, uri: str) -> None:
        """One more agent session wants updates of `uri`; the upstream is asked once, however many do."""
        await self.session()  # opened, so its protocol version is known
        if self.protocol_version in MODERN_PROTOCOL_VERSIONS:
            message = f"Upstream server '{self.name}' offers resource updates only to 2026-07-28 listen streams"
            raise MCPError(types.METHOD_NOT_FOUND, message)
        self._subscriptions[uri] += 1
        if self._subscriptions[uri] > 1:
            return
        try:
            async with self.request() as session:
                await session.send_request(
                    types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri)), types.EmptyResult
                )
        except BaseException:
            self._subscriptions.pop(uri, None)
            raise

    async def unsubscribe(self, uri: str) -> None:
        """An agent session no longer wants updates of `uri`; the upstream is told when none does."""
        self._subscriptions[uri] -= 1
        if self._subscriptions[uri] > 0:
            return
        del self._subscriptions[uri]
        if self._client is not None:
            async with self.request() as session:
                request = types.UnsubscribeRequest(params=types.UnsubscribeRequestParams(uri=uri))
                await session.send_request(request, types.EmptyResult)

    async def _send_log_level(self, session: ClientSession) -> None:
        capabilities = session.server_capabilities
        if self._log_level is None or self.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return  # 2026-07-28 has no logging/setLevel: logs are a per-request opt-in there
        if capabilities is None or capabilities.logging is None:
            return
        await session.send_request(
            types.SetLevelRequest(params=types.SetLevelRequestParams(level=self._log_level)), types.EmptyResult
        )

    async def _restore(self, session: ClientSession) -> None:
        """A reopened session gets what agents asked of the one before: the log level and the subscriptions."""
        try:
            with anyio.fail_after(self.connector.timeout_seconds):
                await self._send_log_level(session)
                for uri in list(self._subscriptions):
                    await session.send_request(
                        types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri)), types.EmptyResult
                    )
        except Exception as exc:
            error = self._redactor.text(str(exc))
            logger.warning("connector %s: could not restore log level or subscriptions: %s", self.name, error)


def _stamped(session: ClientSession, method: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`params` and call options as the SDK's session sends them in the era it negotiated (a private member)."""
    data: dict[str, Any] = {"method": method, "params": params}
    options: dict[str, Any] = {}
    session._stamp(data, options)  # type: ignore[arg-type]
    return data["params"], options


def _attribute(field: str) -> str:
    return "resource_templates" if field == "resourceTemplates" else field


@asynccontextmanager
async def _stderr_relay(name: str, redactor: Redactor) -> AsyncIterator[Any]:
    """A file the upstream writes its stderr to; each line is redacted before it reaches the gateway's log.

    Read without blocking a thread, so that a grandchild holding the pipe open cannot stall shutdown.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    upstream_log = logging.getLogger(f"gateway.upstream.{name}")

    async def relay() -> None:
        pending = b""
        while True:
            await anyio.wait_readable(read_fd)
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            pending = pending[-MAX_STDERR_LINE:]
            for line in lines:
                upstream_log.info("%s", redactor.text(line[:MAX_STDERR_LINE].decode("utf-8", "replace")))

    try:
        with os.fdopen(write_fd, "w") as errlog:
            async with anyio.create_task_group() as tg:
                tg.start_soon(relay)
                try:
                    yield errlog
                finally:
                    tg.cancel_scope.cancel()
    finally:
        os.close(read_fd)


class UpstreamPool:
    """Every connector's `Upstream`; sessions live while `running()` is entered."""

    def __init__(self, upstreams: dict[str, Upstream]):
        self._upstreams = upstreams
        self._task_group: TaskGroup | None = None

    def __getitem__(self, name: str) -> Upstream:
        return self._upstreams[name]

    def get(self, name: str) -> Upstream | None:
        return self._upstreams.get(name)

    def replace(self, upstreams: dict[str, Upstream]) -> None:
        """Serve `upstreams` from now on (a reloaded configuration): the ones not kept are closed (their
        processes end), new ones start on first use."""
        for name, upstream in self._upstreams.items():
            if upstreams.get(name) is not upstream:
                upstream.attach(None)
        for upstream in upstreams.values():
            upstream.attach(self._task_group)
        self._upstreams = upstreams

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            for upstream in self._upstreams.values():
                upstream.attach(tg)
            try:
                yield
            finally:
                self._task_group = None
                for upstream in self._upstreams.values():
                    upstream.attach(None)
