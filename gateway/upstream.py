"""Upstream MCP servers: one warm, supervised session per connector, with real credentials injected.

Each connector's session is owned by a task in the gateway's task group (anyio cancel scopes must be
entered and left by the same task). It is opened on first use, shared by every agent session whose enclave
uses the connector, and dropped when a call finds it broken: the caller gets a clear error, and the next
use starts it again. Closing the pool terminates every spawned process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
import httpx2
import mcp_types as types
from anyio.abc import TaskGroup, TaskStatus
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.session import ClientSession
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.subscriptions import PromptsListChanged, ResourcesListChanged, ToolsListChanged
from mcp_types import CONNECTION_CLOSED
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from gateway import errors
from gateway.config import Connector, StdioTarget
from gateway.redact import Redactor
from gateway.secrets import SecretResolver

logger = logging.getLogger(__name__)

ListKind = Literal["tools", "prompts", "resources"]
ListChanged = Callable[[str, ListKind], Awaitable[None]]
MAX_LIST_PAGES = 100
MAX_STDERR_LINE = 4096

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
    ):
        self.connector = connector
        self._resolver = resolver
        self._redactor = redactor
        self._on_list_changed = on_list_changed
        self._task_group: TaskGroup | None = None
        self._client: Client | None = None
        self._stop: anyio.Event | None = None
        self._lock = anyio.Lock()
        self._tools: list[types.Tool] | None = None
        self._prompts: list[types.Prompt] | None = None

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
                    try:
                        await self._task_group.start(self._hold)
                    except Exception as exc:
                        logger.warning("connector %s failed to start: %s", self.name, self._redactor.text(str(exc)))
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
        self._client = None
        self._tools = self._prompts = None
        if self._stop is not None:
            self._stop.set()

    async def _hold(self, *, task_status: TaskStatus[None]) -> None:
        stop = anyio.Event()
        started = False
        try:
            async with self._open() as client, anyio.create_task_group() as watchers:
                if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
                    watchers.start_soon(self._listen, client)
                self._client, self._stop, started = client, stop, True
                task_status.started()
                await stop.wait()
                watchers.cancel_scope.cancel()
        except Exception as exc:
            if not started:
                raise
            logger.warning("connector %s closed: %s", self.name, self._redactor.text(repr(exc)))
        finally:
            if self._stop is stop:
                self._client = None
                self._tools = self._prompts = None

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[Client]:
        target = self.connector.target
        if isinstance(target, StdioTarget):
            env = {name: self._resolver.expand(value) for name, value in target.env.items()}
            params = StdioServerParameters(command=target.command, args=list(target.args), env=env, cwd=target.cwd)
            async with (
                _stderr_relay(self.name, self._redactor) as errlog,
                self._client_for(stdio_client(params, errlog=errlog)) as client,
            ):
                yield client
        else:
            headers = {name: self._resolver.expand(value) for name, value in target.headers.items()}
            async with (
                httpx2.AsyncClient(headers=headers) as http,
                self._client_for(streamable_http_client(target.url, http_client=http)) as client,
            ):
                yield client

    def _client_for(self, transport: Any) -> Client:
        return Client(
            transport,
            mode="auto",
            cache=None,  # lists are filtered per enclave: never serve one from a shared cache
            message_handler=self._on_message,
            elicitation_callback=_no_pushed_requests,
            read_timeout_seconds=self.connector.timeout_seconds,
        )

    async def _on_message(self, message: Any) -> None:
        kind = _NOTIFICATION_KIND.get(type(message))
        if kind is not None:
            await self._list_changed(kind)

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
    async def request(self) -> AsyncIterator[ClientSession]:
        """Send one request on the session, under the connector's timeout; a broken session is reset."""
        session = await self.session()
        try:
            with anyio.fail_after(self.connector.timeout_seconds):
                yield session
        except TimeoutError:
            raise MCPError(errors.UPSTREAM_TIMEOUT, errors.upstream_timeout(self.name)) from None
        except MCPError as exc:
            if exc.error.code == CONNECTION_CLOSED:
                self.reset()
                raise MCPError(errors.UPSTREAM_UNAVAILABLE, errors.upstream_unavailable(self.name)) from None
            raise
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, OSError):
            self.reset()
            raise MCPError(errors.UPSTREAM_UNAVAILABLE, errors.upstream_unavailable(self.name)) from None

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


def _attribute(field: str) -> str:
    return "resource_templates" if field == "resourceTemplates" else field


async def _no_pushed_requests(context: Any, params: Any) -> types.ErrorData:
    """A 2025-era upstream's pushed elicitation cannot be tied to the agent request that caused it on a shared
    session; refuse it rather than guess (2026-era upstreams return input_required results, which are bridged)."""
    return types.ErrorData(code=types.INVALID_REQUEST, message="elicitation is not available through this gateway")


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

    def __getitem__(self, name: str) -> Upstream:
        return self._upstreams[name]

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            for upstream in self._upstreams.values():
                upstream.attach(tg)
            try:
                yield
            finally:
                for upstream in self._upstreams.values():
                    upstream.attach(None)
