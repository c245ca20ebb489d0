"""The request path: one pipeline, one enforcement point, for every MCP method an agent can send.

    authenticate -> enclave view -> authorize -> validate -> forward (credentials live in the upstream
    session) -> redact -> result

Authentication happens per HTTP request in `gateway.auth`; every handler here starts from the agent it
produced and resolves its enclave view, so no method, transport or retry reaches an upstream without
passing the same authorize step.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import mcp_types as types
from mcp import MCPError
from mcp.server import ServerRequestContext
from mcp.server.session import ServerSession
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

from gateway import errors
from gateway.auth import AuthenticatedAgent, current_agent
from gateway.config import Config
from gateway.invocation import Denied, Invocation, Recorder
from gateway.redact import Redactor
from gateway.secrets import SecretResolver
from gateway.upstream import ListKind, Upstream, UpstreamPool
from gateway.view import EnclaveView, ExposedTool

logger = logging.getLogger(__name__)

ResultT = TypeVar("ResultT", bound=BaseModel)
IDENTITY_META_PREFIX = "io.modelcontextprotocol/"
MAX_INPUT_ROUNDS = 10

_INPUT_RESULT_TYPES: dict[str, type[BaseModel]] = {
    "elicitation/create": types.ElicitResult,
    "sampling/createMessage": types.CreateMessageResult,
    "roots/list": types.ListRootsResult,
}
_INPUT_CAPABILITY = {"elicitation/create": "elicitation", "sampling/createMessage": "sampling", "roots/list": "roots"}
_UPSTREAM_REASONS = {errors.UPSTREAM_UNAVAILABLE: "upstream_unavailable", errors.UPSTREAM_TIMEOUT: "upstream_timeout"}
_CHANGE_EVENTS: dict[ListKind, ServerEvent] = {
    "tools": ToolsListChanged(),
    "prompts": PromptsListChanged(),
    "resources": ResourcesListChanged(),
}


def forwardable_meta(meta: Any) -> dict[str, Any] | None:
    """The agent's `_meta` minus protocol identity keys (the upstream session stamps its own) and the
    progress token (the SDK assigns the upstream one and progress is relayed by closure)."""
    if not meta:
        return None
    data = meta if isinstance(meta, dict) else meta.model_dump(by_alias=True, exclude_none=True)
    kept = {k: v for k, v in data.items() if not k.startswith(IDENTITY_META_PREFIX) and k != "progressToken"}
    return kept or None


class Gateway:
    """Holds the live configuration and serves every agent-facing MCP method."""

    def __init__(self, config: Config, resolver: SecretResolver, redactor: Redactor, recorder: Recorder):
        self.config = config
        self.redactor = redactor
        self.recorder = recorder
        self.pool = UpstreamPool(
            {
                name: Upstream(connector, resolver, redactor, self.upstream_list_changed)
                for name, connector in config.connectors.items()
            }
        )
        self.views = {name: EnclaveView(enclave, self.pool) for name, enclave in config.enclaves.items()}
        self._buses = {name: InMemorySubscriptionBus() for name in config.enclaves}
        self._listeners = {name: ListenHandler(bus) for name, bus in self._buses.items()}
        self._legacy_sessions: dict[str, tuple[str, ServerSession]] = {}

    # -- authenticate -> enclave view -> (handler) -> record ------------------------------------

    @asynccontextmanager
    async def invocation(
        self, ctx: ServerRequestContext[Any, Any], target: str | None = None
    ) -> AsyncIterator[Invocation]:
        """Run one request: resolve who asks and their view, map every way it can end to a decision,
        and record it before the reply leaves. Anything unexpected denies (fail closed)."""
        call = Invocation(method=ctx.method, target=target, protocol_version=ctx.protocol_version)
        call.request_id = ctx.request_id
        try:
            self._resolve_caller(ctx, call)
            yield call
        except Denied as exc:
            call.deny(exc.reason, exc.error.code)
            raise
        except MCPError as exc:
            call.fail(_UPSTREAM_REASONS.get(exc.error.code, "upstream_error"), exc.error.code)
            raise
        except Exception:
            correlation_id = uuid.uuid4().hex[:12]
            logger.exception("internal error in %s (correlation id %s)", ctx.method, correlation_id)
            call.broke(correlation_id, INTERNAL_ERROR)
            raise errors.internal(correlation_id) from None
        finally:
            await self.recorder.record(call)

    def _resolve_caller(self, ctx: ServerRequestContext[Any, Any], call: Invocation) -> None:
        user = ctx.request.scope.get("user") if ctx.request is not None else None
        if not isinstance(user, AuthenticatedAgent):
            raise Denied(INVALID_REQUEST, "Authentication required", "unauthenticated")
        call.agent = user.agent
        if user.agent.enclave not in self.views:
            raise Denied(INVALID_REQUEST, "Authentication required", "agent_not_in_enclave")
        client = ctx.session.client_params.client_info if ctx.session.client_params else None
        if client is not None:
            call.client_name, call.client_version = client.name, client.version
        if ctx.request is not None and (session_id := ctx.request.headers.get("mcp-session-id")):
            call.session_id = session_id
            if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
                self._legacy_sessions[session_id] = (user.agent.enclave, ctx.session)

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

    async def authorize_tool(self, call: Invocation, name: str, arguments: dict[str, Any] | None) -> ExposedTool:
        """In the caller's view (or it does not exist), arguments valid for its schema."""
        call.arguments = arguments
        tool = await self.view_of(call).tool(name)
        if tool is None:
            raise errors.unknown_tool(name)
        call.route(tool.connector, tool.upstream_name)
        tool.validator.validate(arguments)
        return tool

    async def list_tools(self, ctx: ServerRequestContext[Any, Any], params: Any) -> types.ListToolsResult:
        async with self.invocation(ctx) as call:
            tools = [tool.definition for tool in (await self.view_of(call).tools()).values()]
            return self._finish(call, types.ListToolsResult(tools=tools))

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult | types.InputRequiredResult:
        async with self.invocation(ctx, params.name) as call:
            tool = await self.authorize_tool(call, params.name, params.arguments)
            upstream = self.pool[tool.connector]
            progress = self._progress_relay(ctx)

            async def send(responses: Any, state: str | None) -> Any:
                async with upstream.request() as session:
                    return await session.call_tool(
                        tool.upstream_name,
                        params.arguments,
                        progress_callback=progress,
                        input_responses=responses,
                        request_state=state,
                        meta=forwardable_meta(params.meta),
                        allow_input_required=True,
                    )

            result = await self._with_input(ctx, send, params.input_responses, params.request_state)
            return self._finish(call, result)

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
            upstream = self.pool[prompt.connector]

            async def send(responses: Any, state: str | None) -> Any:
                async with upstream.request() as session:
                    return await session.get_prompt(
                        prompt.upstream_name,
                        params.arguments,
                        input_responses=responses,
                        request_state=state,
                        meta=forwardable_meta(params.meta),
                        allow_input_required=True,
                    )

            result = await self._with_input(ctx, send, params.input_responses, params.request_state)
            return self._finish(call, result)

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
            upstream = self.pool[connector]

            async def send(responses: Any, state: str | None) -> Any:
                async with upstream.request() as session:
                    return await session.read_resource(
                        params.uri,
                        input_responses=responses,
                        request_state=state,
                        meta=forwardable_meta(params.meta),
                        allow_input_required=True,
                    )

            result = await self._with_input(ctx, send, params.input_responses, params.request_state)
            return self._finish(call, result)

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
            if not view.uses(connector):
                continue
            view.invalidate(kind)
            await self._buses[name].publish(_CHANGE_EVENTS[kind])
            for session_id, (enclave, session) in list(self._legacy_sessions.items()):
                if enclave == name:
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
            self._legacy_sessions.pop(session_id, None)

    # -- shared steps --------------------------------------------------------------------------

    def _progress_relay(self, ctx: ServerRequestContext[Any, Any]) -> Any:
        """Relay upstream progress to the agent, under the agent's own progress token."""
        if ctx.meta is None or ctx.meta.get("progressToken") is None:
            return None

        async def relay(progress: float, total: float | None, message: str | None) -> None:
            await ctx.session.report_progress(progress, total, self.redactor.text(message) if message else message)

        return relay

    async def _with_input(
        self,
        ctx: ServerRequestContext[Any, Any],
        send: Callable[[Any, str | None], Awaitable[Any]],
        responses: Any,
        state: str | None,
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
            self._check_input_capabilities(ctx, requests)
            if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
                return result
            answers = {
                key: await ctx.session.send_request(
                    request,
                    _INPUT_RESULT_TYPES[request.method],
                    metadata=ServerMessageMetadata(related_request_id=ctx.request_id),
                )
                for key, request in requests.items()
            }
            result = await send(answers, result.request_state)
        if isinstance(result, types.InputRequiredResult):
            raise MCPError(INVALID_REQUEST, f"Upstream asked for input more than {MAX_INPUT_ROUNDS} times; gave up")
        return result

    def _check_input_capabilities(self, ctx: ServerRequestContext[Any, Any], requests: dict[str, Any]) -> None:
        declared = ctx.session.client_capabilities
        for request in requests.values():
            capability = _INPUT_CAPABILITY.get(request.method)
            if capability is None or declared is None or getattr(declared, capability, None) is None:
                raise MCPError(
                    INVALID_REQUEST,
                    f"This call needs {capability or request.method} from your client, which it did not declare; "
                    "use a client that supports it",
                )

    def _finish(self, call: Invocation, result: ResultT) -> ResultT:
        """Redact brokered secrets and strip upstream identity keys from a result about to leave."""
        call.finish(is_error=bool(getattr(result, "is_error", False)))
        data = result.model_dump(by_alias=True, exclude_none=True, mode="json")
        cleaned = _strip_identity(self.redactor.value(data))
        return type(result).model_validate(cleaned, by_name=False)


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
