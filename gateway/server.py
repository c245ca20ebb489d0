"""The agent-facing HTTP application: MCP streamable HTTP at /mcp, bearer-authenticated.

Built from the SDK's pieces (low-level `Server`, `StreamableHTTPSessionManager`, `RequireAuthMiddleware`,
RFC 9728 metadata routes, DNS-rebinding checks) with the gateway's own authentication backend and
lifespan, which owns the state store, the upstream sessions and the admin control socket.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from mcp.server import NotificationOptions, Server
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.auth.middleware.bearer_auth import RequireAuthMiddleware
from mcp.server.auth.routes import build_resource_metadata_url, create_protected_resource_routes
from mcp.server.models import InitializationOptions
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPDeprecationWarning
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp

from gateway import __version__, control
from gateway.audit import AuditedEndpoint, AuditLog
from gateway.auth import AgentDirectory, BearerBackend
from gateway.config import MCP_PATH, Config, ListenSettings, base_url
from gateway.fastpath import FastPath
from gateway.guard import AgentGuard
from gateway.handshake import SessionCalls
from gateway.http_protocol import PARSER_REFUSALS_KEY, ParserRefusals
from gateway.lifecycle import ConfigReloader
from gateway.pipeline import Gateway
from gateway.state import StateStore

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SESSION_SWEEP_SECONDS = 60
INSTRUCTIONS = (
    "This is an enclave gateway. You see only the tools, resources and prompts of your enclave; "
    "credentials for upstream servers are held by the gateway."
)


class GatewayServer(Server[Any]):
    """Advertises list-changed notifications: the gateway relays (re-filtered) upstream list changes."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        everything = NotificationOptions(prompts_changed=True, resources_changed=True, tools_changed=True)
        return super().create_initialization_options(
            notification_options or everything, experimental_capabilities, extensions
        )


def mcp_server(gateway: Gateway) -> GatewayServer:
    with warnings.catch_warnings():  # logging is deprecated in 2026-07-28; handshake-era agents still use it
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        return _mcp_server(gateway)


def _mcp_server(gateway: Gateway) -> GatewayServer:
    return GatewayServer(
        "enclave-gateway",
        version=__version__,
        instructions=INSTRUCTIONS,
        get_tool_input_schema=gateway.cached_input_schema,
        on_list_tools=gateway.list_tools,
        on_call_tool=gateway.call_tool,
        on_list_resources=gateway.list_resources,
        on_list_resource_templates=gateway.list_resource_templates,
        on_read_resource=gateway.read_resource,
        on_list_prompts=gateway.list_prompts,
        on_get_prompt=gateway.get_prompt,
        on_completion=gateway.complete,
        on_subscriptions_listen=gateway.listen,
        on_subscribe_resource=gateway.subscribe_resource,
        on_unsubscribe_resource=gateway.unsubscribe_resource,
        on_set_logging_level=gateway.set_logging_level,
    )


def transport_security(listen: ListenSettings) -> TransportSecuritySettings:
    """Host and Origin allowlists against DNS rebinding, whatever the bind address."""
    hosts = list(listen.allowed_hosts)
    origins = list(listen.allowed_origins)
    if listen.host in LOOPBACK or not hosts:
        hosts += ["127.0.0.1:*", "localhost:*", "[::1]:*"]
        origins += ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
    if listen.public_url:
        authority = listen.public_url.split("://", 1)[1]
        hosts.append(authority)
        origins.append(listen.public_url)
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


async def _every(seconds: float, task: Callable[[], Awaitable[None]]) -> None:
    while True:
        await anyio.sleep(seconds)
        await task()


def build_app(
    config: Config, gateway: Gateway, directory: AgentDirectory, audit: AuditLog, reloader: ConfigReloader
) -> ASGIApp:
    settings = config.settings
    server = mcp_server(gateway)
    security = transport_security(settings.listen)
    backend = BearerBackend(directory)
    sessions = StreamableHTTPSessionManager(
        app=server,
        security_settings=security,
        max_request_body_size=settings.limits.max_request_bytes,
    )
    resource_url = AnyHttpUrl(base_url(settings.listen) + MCP_PATH)
    endpoint = AuditedEndpoint(
        RequireAuthMiddleware(StreamableHTTPASGIApp(sessions), [], build_resource_metadata_url(resource_url)), audit
    )
    routes = [
        Route(MCP_PATH, endpoint=endpoint),
        *create_protected_resource_routes(
            resource_url=resource_url,
            authorization_servers=[AnyHttpUrl(base_url(settings.listen))],
            scopes_supported=[],
            resource_name="enclave gateway",
        ),
    ]

    async def reload_agents() -> None:
        async with StateStore.open(settings.state_dir) as store:
            directory.replace(await store.agents(), gateway.config)

    async def tool_approved(message: Mapping[str, object]) -> None:
        """`enclave approve-tool` trusted a new definition: re-read its pin, re-list the connector's tools."""
        connector = str(message.get("connector"))
        await gateway.pins.refresh(connector, str(message.get("tool")))
        await gateway.upstream_list_changed(connector, "tools")

    # control operation -> its handler (each takes the request message; it may return its own reply)
    operations: dict[str, Callable[[Mapping[str, object]], Awaitable[dict[str, object] | None]]] = {
        "reload-agents": lambda message: reload_agents(),
        "approval-decided": gateway.chambers.decided,
        "reload": reloader.control,
        "tool-approved": tool_approved,
    }

    async def on_control(message: Mapping[str, object]) -> dict[str, object]:
        operation = operations.get(str(message.get("op")))
        if operation is None:
            return {"ok": False, "error": f"unknown operation {message.get('op')!r}"}
        reply = await operation(message)
        return reply if reply is not None else {"ok": True}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, ParserRefusals]]:
        await reload_agents()
        async with (
            audit.running(),
            gateway.chambers.running(settings.state_dir),
            gateway.pins.running(settings.state_dir),
            gateway.pool.running(),
            sessions.run(),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(control.serve, settings.state_dir, on_control)
            tg.start_soon(_every, SESSION_SWEEP_SECONDS, gateway.forget_idle_sessions)
            tg.start_soon(reloader.watch)
            tg.start_soon(reloader.on_sighup)
            yield {PARSER_REFUSALS_KEY: audit.record_parser_refusal}  # lifespan state, read by the HTTP protocol
            tg.cancel_scope.cancel()

    app = Starlette(
        routes=routes,
        middleware=[Middleware(AuthenticationMiddleware, backend=backend), Middleware(AuthContextMiddleware)],
        lifespan=lifespan,
    )
    # The SDK's registry of open handshake-era sessions (a private member, pinned by mcp==2.3.*).
    open_sessions = sessions._server_instances
    if settings.fast_path:
        calls = SessionCalls(open_sessions)
        paths: ASGIApp = FastPath(app, gateway, security, MCP_PATH, server.server_info_stamp, calls)
    else:
        paths = app
    return AgentGuard(paths, gateway, backend, settings.limits, MCP_PATH, open_sessions)
