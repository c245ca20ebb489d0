"""The request path: one pipeline, one enforcement point, for every MCP method an agent can send.

    authenticate -> enclave view -> authorize -> validate -> forward (credentials live in the upstream
    session) -> redact -> result

Authentication happens per HTTP request in `gateway.auth`; every handler here starts from the agent it
produced and resolves its enclave view, so no method, transport or retry reaches an upstream without
passing the same authorize step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import anyio
import mcp_types as types
from mcp import MCPError
from mcp.client.session import ClientSession
from mcp.server import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.streamable_http_manager import DEFAULT_SESSION_IDLE_TIMEOUT
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    PromptsListChanged,
    ResourcesListChanged,
    ServerEvent,
    ToolsListChanged,
)
from mcp.shared.message import ServerMessageMetadata
from mcp_types import INTERNAL_ERROR, INVALID_REQUEST
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel

from gateway import errors, telemetry
from gateway.auth import Agent, AuthenticatedAgent, current_agent
from gateway.chambers import Chambers, Clearance
from gateway.config import Config, Connector
from gateway.invocation import CHAMBER_AUTHORIZATION, Denied, Invocation, Recorder
from gateway.peers import process_of
from gateway.pins import ToolPins
from gateway.redact import Redactor
from gateway.secrets import SecretResolver
from gateway.upstream import LOG_LEVELS, ListKind, PushTarget, Upstream, UpstreamPool
from gateway.view import EnclaveView, ExposedTool

logger = logging.getLogger(__name__)

ResultT = TypeVar("ResultT", bound=BaseModel)
IDENTITY_META_PREFIX = "io.modelcontextprotocol/"
MAX_INPUT_ROUNDS = 10
# A parsed `_meta` (mcp_types.RequestParamsMeta) names the progress token `progress_token`; the wire, `progressToken`.
PROGRESS_TOKEN_KEYS = ("progress_token", "progressToken")

_INPUT_RESULT_TYPES: dict[str, type[BaseModel]] = {
    "elicitation/create": types.ElicitResult,
    "sampling/createMessage": types.CreateMessageResult,
    "roots/list": types.ListRootsResult,
}
_PUSHED_REQUESTS: dict[str, type[BaseModel]] = {
    "elicitation/create": types.ElicitRequest,
    "sampling/createMessage": types.CreateMessageRequest,
}
_INPUT_CAPABILITY = {"elicitation/create": "elicitation", "sampling/createMessage": "sampling", "roots/list": "roots"}
_UPSTREAM_REASONS = {
    errors.UPSTREAM_UNAVAILABLE: "upstream_unavailable",
    errors.UPSTREAM_TIMEOUT: "upstream_timeout",
    errors.RESULT_TOO_LARGE: "result_too_large",
}
_CHANGE_EVENTS: dict[ListKind, ServerEvent] = {
    "tools": ToolsListChanged(),
    "prompts": PromptsListChanged(),
    "resources": ResourcesListChanged(),
}


@dataclasses.dataclass(frozen=True)
class AgentChannel:
    """How the agent behind one request can be asked for input: what its client declared it can answer, and the
    request to it over its session's back-channel (None for a 2026-07-28 client: it is asked in an
    input_required result instead)."""

    declared: Any
    send_request: Callable[[Any, type[BaseModel]], Awaitable[Any]] | None


def wire_form(model: BaseModel) -> dict[str, Any]:
    """A model as its JSON goes on the wire (aliases, no unset optionals)."""
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


def forwardable_meta(meta: Any) -> dict[str, Any] | None:
    """The agent's `_meta` minus protocol identity keys (the upstream session stamps its own) and the
    progress token (the SDK assigns the upstream one and progress is relayed by closure)."""
    if not meta:
        return None
    data = meta if isinstance(meta, dict) else meta.model_dump(by_alias=True, exclude_none=True)
    kept = {k: v for k, v in data.items() if not k.startswith(IDENTITY_META_PREFIX) and k not in PROGRESS_TOKEN_KEYS}
    return kept or None


class Gateway:
    """Holds the live configuration and serves every agent-facing MCP method."""

    def __init__(
        self, config: Config, resolver: SecretResolver, redactor: Redactor, recorder: Recorder, pins: ToolPins
    ):
        self.config = config
        self.redactor = redactor
        self.recorder = recorder
        self.pins = pins
        self.pool = UpstreamPool({name: self._upstream(c, resolver) for name, c in config.connectors.items()})
        self.views = {name: EnclaveView(enclave, self.pool, pins) for name, enclave in config.enclaves.items()}
        self.chambers = Chambers(config)
        self._buses = {name: InMemorySubscriptionBus() for name in config.enclaves}
        self._listeners = {name: ListenHandler(bus) for name, bus in self._buses.items()}
        self._legacy_sessions: dict[str, tuple[Agent, ServerSession]] = {}
        self._session_seen: dict[str, float] = {}  # session id -> when it last made a request (monotonic)
        self._log_levels: dict[str, types.LoggingLevel] = {}  # session id -> the level it asked for
        self._subscriptions: dict[str, set[tuple[str, str]]] = {}  # session id -> {(connector, resource URI)}

    # -- authenticate -> enclave view -> (handler) -> record ------------------------------------

    @asynccontextmanager
    async def invocation(
        self, ctx: ServerRequestContext[Any, Any], target: str | None = None
    ) -> AsyncIterator[Invocation]:
        """Run one request from the SDK: resolve who asks, then record how it ends."""
        call = Invocation(
            method=ctx.method, target=target, protocol_version=ctx.protocol_version, request_id=ctx.request_id
        )
        async with self.recording(call):
            self._resolve_caller(ctx, call)
            yield call

    @asynccontextmanager
    async def recording(self, call: Invocation) -> AsyncIterator[None]:
        """Map every way a request can end to a decision, and record it before the reply leaves.
        Anything unexpected denies (fail closed)."""
        call.trace_id, call.span_id = telemetry.current_span_ids()
        try:
            yield
        except Denied as exc:
            call.deny(exc.reason, exc.error.code)
            raise
        except MCPError as exc:
            call.fail(_UPSTREAM_REASONS.get(exc.error.code, "upstream_error"), exc.error.code)
            raise MCPError(
                exc.error.code, self.redactor.text(exc.error.message), self.redactor.value(exc.error.data)
            ) from None
        except Exception:
            raise self._internal_error(call, "internal error") from None
        finally:
            try:
                await self.recorder.record(call)
            except Exception:
                raise self._internal_error(call, "could not record the request") from None

    async def _audit_authorization(self, call: Invocation) -> None:
        """A call into a chamber is audited before it is forwarded (method `chamber.authorize`), as well as when it
        ends: if that row cannot be written the call is refused without reaching the upstream (fail closed)."""
        if call.chamber is not None:
            await self.recorder.record(dataclasses.replace(call, method=CHAMBER_AUTHORIZATION))

    def _internal_error(self, call: Invocation, what: str) -> MCPError:
        """Log what went wrong (with its traceback); the agent gets a correlation id and no detail."""
        correlation_id = uuid.uuid4().hex[:12]
        logger.exception("%s in %s (correlation id %s)", what, call.method, correlation_id)
        call.broke(correlation_id, INTERNAL_ERROR)
        return errors.internal(correlation_id)

    def _resolve_caller(self, ctx: ServerRequestContext[Any, Any], call: Invocation) -> None:
        user = ctx.request.scope.get("user") if ctx.request is not None else None
        if not isinstance(user, AuthenticatedAgent):
            raise Denied(INVALID_REQUEST, "Authentication required", "unauthenticated")
        call.agent = user.agent
        if ctx.request is not None and (length := ctx.request.headers.get("content-length", "")).isdigit():
            call.bytes_in = int(length)
        if ctx.request is not None:
            call.process = process_of(ctx.request.scope)
        if user.agent.enclave not in self.views:
            raise Denied(INVALID_REQUEST, "Authentication required", "agent_not_in_enclave")
        client = ctx.session.client_params.client_info if ctx.session.client_params else None
        if client is not None:
            call.client_name, call.client_version = client.name, client.version
        if ctx.request is not None and (session_id := ctx.request.headers.get("mcp-session-id")):
            call.session_id = session_id
            if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
                self._legacy_sessions[session_id] = (user.agent, ctx.session)
                self._session_seen[session_id] = time.monotonic()

    def handshake_session(self, session_id: str, agent: Agent) -> ServerSession | None:
        """The open handshake-era session `session_id` as the SDK path last served `agent` on it (marked as seen
        now), for the fast path; None if the SDK path has served no request of `agent` on it (which it would have
        refused to any other agent than the session's creator)."""
        entry = self._legacy_sessions.get(session_id)
        if entry is None or entry[0].name != agent.name:
            return None
        self._session_seen[session_id] = time.monotonic()
        return entry[1]

    def view_of(self, call: Invocation) -> EnclaveView:
        assert call.agent is not None
        return self.views[call.agent.enclave]

    def cached_input_schema(self, name: str) -> dict[str, Any] | None:
        """The SDK's hook for checking 2026-era `Mcp-Param-*` headers; None (skip) until the view is listed."""
        agent = current_agent.get()
        view = self.views.get(agent.enclave) if agent is not None else None
        tool = view.cached_tool(name) if view is not None else None
        return tool.definition.input_schema if tool is not None else None

    # -- tools ---------------------------------------------------------------------------------

    async def tool_in_view(self, call: Invocation, name: str, arguments: dict[str, Any] | None) -> ExposedTool:
        """In the caller's view (or it does not exist), arguments valid for its schema."""
        call.arguments = arguments
        view = self.view_of(call)
        tool = await view.tool(name)
        if tool is None:
            raise errors.unknown_tool(name, "definition_changed" if view.withheld(name) else "not_in_enclave")
        call.route(tool.connector, tool.upstream_name)
        tool.validator.validate(arguments)
        return tool

    async def authorize_tool(self, call: Invocation, name: str, arguments: dict[str, Any] | None) -> ExposedTool:
        """`tool_in_view`, for a path that cannot run the chamber check: a tool in a chamber is refused there
        (fail closed) and must take `call_tool`, whose check may ask the agent's user."""
        tool = await self.tool_in_view(call, name, arguments)
        self.chambers.refuse_here(call, tool.name)
        return tool

    async def list_tools(self, ctx: ServerRequestContext[Any, Any], params: Any) -> types.ListToolsResult:
        async with self.invocation(ctx) as call:
            tools = [tool.definition for tool in (await self.view_of(call).tools()).values()]
            return self._finish(call, types.ListToolsResult(tools=tools))

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult | types.InputRequiredResult:
        async with self.invocation(ctx, params.name) as call:
            tool = await self.tool_in_view(call, params.name, params.arguments)
            clearance = await self.chambers.check(ctx, call, params)
            if clearance.question is not None:
                return clearance.question
            await self._audit_authorization(call)
            progress, meta = self._progress_relay(ctx), forwardable_meta(params.meta)
            return await self._forward(
                ctx,
                call,
                tool.connector,
                clearance,
                lambda session, responses, state: session.call_tool(
                    tool.upstream_name,
                    params.arguments,
                    progress_callback=progress,
                    input_responses=responses,
                    request_state=state,
                    meta=meta,
                    allow_input_required=True,
                ),
            )

    # -- prompts -------------------------------------------------------------------------------

    async def list_prompts(self, ctx: ServerRequestContext[Any, Any], params: Any) -> types.ListPromptsResult:
        async with self.invocation(ctx) as call:
            prompts = [prompt.definition for prompt in (await self.view_of(call).prompts()).values()]
            return self._finish(call, types.ListPromptsResult(prompts=prompts))

    async def get_prompt(
        self, ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult | types.InputRequiredResult:
        async with self.invocation(ctx, params.name) as call:
            call.arguments = params.arguments
            prompt = await self.view_of(call).prompt(params.name)
            if prompt is None:
                raise errors.unknown_prompt(params.name)
            call.route(prompt.connector, prompt.upstream_name)
            meta = forwardable_meta(params.meta)
            return await self._forward(
                ctx,
                call,
                prompt.connector,
                Clearance(input_responses=params.input_responses, request_state=params.request_state),
                lambda session, responses, state: session.get_prompt(
                    prompt.upstream_name,
                    params.arguments,
                    input_responses=responses,
                    request_state=state,
                    meta=meta,
                    allow_input_required=True,
                ),
            )

    # -- resources -----------------------------------------------------------------------------

    async def list_resources(self, ctx: ServerRequestContext[Any, Any], params: Any) -> types.ListResourcesResult:
        async with self.invocation(ctx) as call:
            resources = await self.view_of(call).resources()
            return self._finish(call, types.ListResourcesResult(resources=resources))

    async def list_resource_templates(
        self, ctx: ServerRequestContext[Any, Any], params: Any
    ) -> types.ListResourceTemplatesResult:
        async with self.invocation(ctx) as call:
            templates = await self.view_of(call).resource_templates()
            return self._finish(call, types.ListResourceTemplatesResult(resource_templates=templates))

    async def read_resource(
        self, ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult | types.InputRequiredResult:
        async with self.invocation(ctx, params.uri) as call:
            connector = self.view_of(call).resource_connector(params.uri)
            if connector is None:
                raise errors.unknown_resource(params.uri)
            call.route(connector, params.uri)
            clearance = await self.chambers.check(ctx, call, params)
            if clearance.question is not None:
                return clearance.question
            await self._audit_authorization(call)
            meta = forwardable_meta(params.meta)
            return await self._forward(
                ctx,
                call,
                connector,
                clearance,
                lambda session, responses, state: session.read_resource(
                    params.uri, input_responses=responses, request_state=state, meta=meta, allow_input_required=True
                ),
            )

    # -- completion ----------------------------------------------------------------------------

    async def complete(
        self, ctx: ServerRequestContext[Any, Any], params: types.CompleteRequestParams
    ) -> types.CompleteResult:
        ref = params.ref
        async with self.invocation(ctx, ref.name if isinstance(ref, types.PromptReference) else ref.uri) as call:
            view = self.view_of(call)
            if isinstance(ref, types.PromptReference):
                prompt = await view.prompt(ref.name)
                if prompt is None:
                    raise errors.unknown_prompt(ref.name)
                connector, upstream_ref = prompt.connector, ref.model_copy(update={"name": prompt.upstream_name})
            else:
                connector = view.resource_connector(ref.uri)
                if connector is None:
                    raise errors.unknown_resource(ref.uri)
                upstream_ref = ref
            call.route(connector, upstream_ref.name if isinstance(upstream_ref, types.PromptReference) else ref.uri)
            context = params.context.arguments if params.context is not None else None
            async with self.pool[connector].request() as session:
                result = await session.complete(upstream_ref, params.argument.model_dump(), context_arguments=context)
            return self._finish(call, result)

    # -- change notifications ------------------------------------------------------------------

    async def listen(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        """2026-era agents receive list changes on a listen stream of their own enclave's bus."""
        async with self.invocation(ctx) as call:
            listener = self._listeners[self.view_of(call).enclave.name]
        return await listener(ctx, params)

    async def upstream_list_changed(self, connector: str, kind: ListKind) -> None:
        """An upstream's list changed: every enclave that uses it re-filters and tells its agents."""
        for name, view in self.views.items():
            if view.uses(connector):
                view.invalidate(kind)
                await self._announce(name, kind)

    async def _announce(self, enclave: str, kind: ListKind) -> None:
        """Tell the enclave's agents that a list changed: its listen streams and its handshake-era sessions."""
        await self._buses[enclave].publish(_CHANGE_EVENTS[kind])
        for session_id, (agent, session) in list(self._legacy_sessions.items()):
            if agent.enclave == enclave:
                await self._notify_legacy(session_id, session, kind)

    async def _notify_legacy(self, session_id: str, session: ServerSession, kind: ListKind) -> None:
        send: Callable[[], Awaitable[None]] = {
            "tools": session.send_tool_list_changed,
            "prompts": session.send_prompt_list_changed,
            "resources": session.send_resource_list_changed,
        }[kind]
        try:
            with anyio.fail_after(5):
                await send()
        except Exception:
            await self._forget_session(session_id)

    # -- configuration lifecycle (gateway.lifecycle) --------------------------------------------

    def _upstream(self, connector: Connector, resolver: SecretResolver) -> Upstream:
        return Upstream(connector, resolver, self.redactor, self.upstream_list_changed, self.upstream_notification)

    def reconfigure(self, config: Config, resolver: SecretResolver, restart: set[str]) -> list[str]:
        """Serve a checked configuration from the next request on; synchronous (no await), so no request sees
        half of it. A connector that is new or in `restart` gets a new upstream (started on first use), one no
        longer configured is closed, the others keep their warm sessions. An enclave keeps its view (and the
        catalogue listed in it) unless its rules or its connectors changed. Returns the enclaves whose lists
        may have changed, for `announce`."""
        kept = {name: self.pool.get(name) for name in config.connectors if name not in restart}
        self.pool.replace(
            {
                name: kept.get(name) or self._upstream(connector, resolver)
                for name, connector in config.connectors.items()
            }
        )
        changed = [
            name
            for name, enclave in config.enclaves.items()
            if name not in self.views
            or self.views[name].enclave != enclave
            or not restart.isdisjoint(enclave.connectors)
        ]
        self.views = {
            name: EnclaveView(enclave, self.pool, self.pins) if name in changed else self.views[name]
            for name, enclave in config.enclaves.items()
        }
        for name in changed:
            if name not in self._buses:
                self._buses[name] = InMemorySubscriptionBus()
                self._listeners[name] = ListenHandler(self._buses[name])
        self.chambers.configure(config)
        self.config = config
        return changed

    async def announce(self, enclaves: list[str]) -> None:
        """After `reconfigure`: relay nothing more to the sessions of agents it removed (their requests get the
        401 already), and tell the agents of `enclaves` that their lists changed."""
        for session_id, (agent, _) in list(self._legacy_sessions.items()):
            home = self.config.enclave_of(agent.name)
            if home is None or home.name != agent.enclave:
                await self._forget_session(session_id)
        for name in enclaves:
            for kind in _CHANGE_EVENTS:
                await self._announce(name, kind)

    # -- logging and resource subscriptions (handshake-era agents) -----------------------------

    async def set_logging_level(
        self, ctx: ServerRequestContext[Any, Any], params: types.SetLevelRequestParams
    ) -> types.EmptyResult:
        """This agent session's log level. Upstream sessions are shared, so it never changes what other sessions
        receive: each session gets what reaches its own level, and each upstream of the enclave is asked for the
        most verbose level any session wants."""
        async with self.invocation(ctx) as call:
            view = self.view_of(call)
            if call.session_id is not None:
                self._log_levels[call.session_id] = params.level
            for connector in view.enclave.connectors:
                await self.pool[connector].want_log_level(params.level)
            return self._finish(call, types.EmptyResult())

    async def subscribe_resource(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        """Updates of a resource in the caller's view, for this session only; the upstream is subscribed once."""
        async with self.invocation(ctx, params.uri) as call:
            key = (self._resource_route(call, params.uri), params.uri)
            if call.session_id is None:
                raise MCPError(INVALID_REQUEST, "Resource subscriptions belong to a session: send Mcp-Session-Id")
            subscribed = self._subscriptions.setdefault(call.session_id, set())
            if key not in subscribed:
                await self.pool[key[0]].subscribe(params.uri)
                subscribed.add(key)
            return self._finish(call, types.EmptyResult())

    async def unsubscribe_resource(
        self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        async with self.invocation(ctx, params.uri) as call:
            key = (self._resource_route(call, params.uri), params.uri)
            subscribed = self._subscriptions.get(call.session_id or "", set())
            if key in subscribed:
                subscribed.discard(key)
                await self.pool[key[0]].unsubscribe(params.uri)
            return self._finish(call, types.EmptyResult())

    def _resource_route(self, call: Invocation, uri: str) -> str:
        """The connector serving `uri` in the caller's view (or it does not exist)."""
        connector = self.view_of(call).resource_connector(uri)
        if connector is None:
            raise errors.unknown_resource(uri)
        call.route(connector, uri)
        return connector

    async def upstream_notification(
        self, connector: str, notification: types.LoggingMessageNotification | types.ResourceUpdatedNotification
    ) -> None:
        """Relay what an upstream sent to the handshake-era sessions that asked for it, only in enclaves using the
        connector: a resource update to the sessions subscribed to it; a log message, redacted, to each session
        whose level it reaches."""
        if isinstance(notification, types.ResourceUpdatedNotification):
            key = (connector, str(notification.params.uri))
            targets = [session_id for session_id, keys in self._subscriptions.items() if key in keys]
        else:
            severity = LOG_LEVELS.index(notification.params.level)
            targets = [
                session_id
                for session_id, (agent, _) in self._legacy_sessions.items()
                if (view := self.views.get(agent.enclave)) is not None
                and view.uses(connector)
                and session_id in self._log_levels
                and severity >= LOG_LEVELS.index(self._log_levels[session_id])
            ]
            redacted = self.redactor.value(wire_form(notification))
            notification = types.LoggingMessageNotification.model_validate(redacted)
        for session_id in targets:
            if (entry := self._legacy_sessions.get(session_id)) is not None:
                try:
                    with anyio.fail_after(5):
                        await entry[1].send_notification(notification)
                except Exception:
                    await self._forget_session(session_id)

    async def forget_idle_sessions(self, idle_seconds: float = DEFAULT_SESSION_IDLE_TIMEOUT) -> None:
        """Forget sessions idle for longer than the SDK keeps them (it ends them silently, with no hook)."""
        deadline = time.monotonic() - idle_seconds
        for session_id, seen in list(self._session_seen.items()):
            if seen < deadline:
                await self._forget_session(session_id)

    async def _forget_session(self, session_id: str) -> None:
        """A session that cannot be reached any more: relay nothing to it, release its upstream subscriptions."""
        self._session_seen.pop(session_id, None)
        self._legacy_sessions.pop(session_id, None)
        self._log_levels.pop(session_id, None)
        for connector, uri in self._subscriptions.pop(session_id, set()):
            with contextlib.suppress(Exception):
                await self.pool[connector].unsubscribe(uri)

    def pushed_to(self, channel: AgentChannel) -> PushTarget:
        """Where a handshake-era upstream's request for input (elicitation, sampling) goes when it belongs to the
        agent request of `channel` (see `Upstream._pushed`): to this agent, redacted like a result, if it declared
        it can answer. Whatever fails is answered to the upstream as an error; the agent's request goes on."""

        async def ask(method: str, params: BaseModel) -> Any:
            data = self.redactor.value(wire_form(params))
            request = _PUSHED_REQUESTS[method].model_validate({"method": method, "params": data})
            try:
                self.check_input_capabilities(channel.declared, {method: request})
                if channel.send_request is None:
                    raise MCPError(
                        INVALID_REQUEST,
                        f"This upstream asks its client directly ({method}), which a 2026-07-28 client cannot be "
                        "asked; connect in the 2025-11-25 era to use it",
                    )
                return await channel.send_request(request, _INPUT_RESULT_TYPES[method])
            except MCPError as exc:
                return exc.error

        return ask

    # -- shared steps --------------------------------------------------------------------------

    def _channel(self, ctx: ServerRequestContext[Any, Any]) -> AgentChannel:
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return AgentChannel(ctx.session.client_capabilities, None)
        metadata = ServerMessageMetadata(related_request_id=ctx.request_id)
        return AgentChannel(ctx.session.client_capabilities, partial(ctx.session.send_request, metadata=metadata))

    def _progress_relay(self, ctx: ServerRequestContext[Any, Any]) -> Any:
        """Relay upstream progress to the agent, under the agent's own progress token."""
        if ctx.meta is None or all(ctx.meta.get(key) is None for key in PROGRESS_TOKEN_KEYS):
            return None

        async def relay(progress: float, total: float | None, message: str | None) -> None:
            await ctx.session.report_progress(progress, total, self.redactor.text(message) if message else message)

        return relay

    async def _forward(
        self,
        ctx: ServerRequestContext[Any, Any],
        call: Invocation,
        connector: str,
        clearance: Clearance,
        request: Callable[[ClientSession, Any, str | None], Awaitable[Any]],
    ) -> Any:
        """Forward one request that the upstream may answer with input_required, and finish its result."""
        upstream = self.pool[connector]
        channel = self._channel(ctx)

        async def send(responses: Any, state: str | None) -> Any:
            async with upstream.request(self.pushed_to(channel)) as session:
                return await request(session, responses, state)

        result = await self.with_input(channel, send, clearance.input_responses, clearance.request_state)
        return self._finish(call, await clearance.carry(result))

    async def with_input(
        self,
        channel: AgentChannel,
        send: Callable[[Any, str | None], Awaitable[Any]],
        responses: Any = None,
        state: str | None = None,
    ) -> Any:
        """Forward a request whose upstream may answer input_required (elicitation, sampling, roots).

        A 2026-era agent gets the input_required result and retries itself; for a handshake-era agent the
        gateway asks over the agent's back-channel and retries upstream. Either way only what the agent
        declared it can answer is asked of it.
        """
        result = await send(responses, state)
        for _ in range(MAX_INPUT_ROUNDS):
            if not isinstance(result, types.InputRequiredResult):
                return result
            requests = result.input_requests or {}
            self.check_input_capabilities(channel.declared, requests)
            if channel.send_request is None:
                return result
            answers = {
                # what the upstream asks may quote its credential, as a result may
                key: await channel.send_request(self._redacted(request), _INPUT_RESULT_TYPES[request.method])
                for key, request in requests.items()
            }
            result = await send(answers, result.request_state)
        if isinstance(result, types.InputRequiredResult):
            raise errors.too_many_input_rounds(MAX_INPUT_ROUNDS)
        return result

    def _redacted(self, model: ResultT) -> ResultT:
        data = self.redactor.value(wire_form(model))
        return type(model).model_validate(data, by_name=False)

    def check_input_capabilities(self, declared: Any, requests: dict[str, Any]) -> None:
        """Only ask an agent for what it declared it can answer (`declared`: a model or the raw envelope)."""
        if isinstance(declared, BaseModel):
            declared = declared.model_dump(exclude_none=True)
        for request in requests.values():
            method = request["method"] if isinstance(request, dict) else request.method
            capability = _INPUT_CAPABILITY.get(method)
            if capability is None or not isinstance(declared, dict) or declared.get(capability) is None:
                raise MCPError(
                    INVALID_REQUEST,
                    f"This call needs {capability or method} from your client, which it did not declare; "
                    "use a client that supports it",
                )

    def _finish(self, call: Invocation, result: ResultT) -> ResultT:
        """The SDK path's result, scrubbed and measured (the fast path measures the reply it encodes instead)."""
        cleaned = self.scrubbed(call, wire_form(result))
        self.count_out(call, len(json.dumps(cleaned, separators=(",", ":"))))
        return type(result).model_validate(cleaned, by_name=False)

    def scrubbed(self, call: Invocation, result: dict[str, Any]) -> dict[str, Any]:
        """Redact brokered secrets and strip upstream identity keys from a result about to leave. A result that
        held one is audited so (reason `credential_redacted`) and logged: its upstream echoed its credential."""
        call.finish(is_error=bool(result.get("isError")))
        cleaned, hits = self.redactor.scrub(result)
        if hits:
            call.redacted()
            logger.warning(
                "%s from connector %s: %d secret form(s) or agent token(s) cut out of the result",
                call.method,
                call.connector or "-",
                hits,
            )
        return _strip_identity(cleaned)

    def count_out(self, call: Invocation, size: int) -> None:
        """Record the size of the result as JSON, and refuse one over the connector's max_result_bytes (its
        transport bounds what it buffers; this also covers plain JSON replies of HTTP upstreams and lists merged
        from several connectors)."""
        call.bytes_out = size
        if call.connector is not None:
            limit = self.pool[call.connector].connector.max_result_bytes
        else:
            limit = self.config.settings.limits.max_result_bytes
        if size > limit:
            raise errors.result_too_large(call.connector, limit)


def _strip_identity(value: Any) -> Any:
    """Drop `io.modelcontextprotocol/*` keys from every `_meta` (they would reveal the upstream)."""
    if isinstance(value, dict):
        return {
            key: (
                {k: _strip_identity(v) for k, v in item.items() if not k.startswith(IDENTITY_META_PREFIX)}
                if key == "_meta" and isinstance(item, dict)
                else _strip_identity(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_strip_identity(item) for item in value]
    return value
