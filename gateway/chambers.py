"""Chambers: explicit per-call authorization for an enclave's high-value tools and resources.

A call whose target sits in a chamber proceeds only with an authorization valid at that moment, spent
atomically: a grant (`enclave grant`), or an approval of that one call by an operator (`enclave approve`)
or by the agent's own user through MCP elicitation. Otherwise the agent gets AUTHORIZATION_REQUIRED
(-32003) with a message that names the chamber and how to ask, plus an opaque request id; grant details
never reach it, the upstream is not contacted, and the reason is audited (`Denied.reason`): no_grant,
wrong_agent, wrong_tool, wrong_scope (arguments differ), revoked, expired, used, tampered (a retry state
the gateway did not issue for this call), approval_pending (the wait ended before an operator decided),
approval_denied, approval_timeout, approval_unavailable (the client cannot ask its user),
chamber_conflict (overlapping globs), chamber_check_unavailable (a path that cannot run the check) and
grant_lookup_failed (anything failing inside the check). A 2026-era round that asks the user is recorded
as a denial too, with reason approval_requested: nothing reached the upstream.

Grants and approvals are read from the state database at call time, for chamber calls only (they are
rare and high-value), so `enclave grant` and `revoke-grant` apply to the very next call without telling
the gateway; only `enclave approve|deny` notify it, to wake a call that is waiting. Anything that fails
inside the check denies.

A 2026-era agent answers questions by retrying its call, so the gateway's own questions and its
continuations of an authorized call (when the upstream asks for input) travel in `request_state` as
`enclave-chamber:<approval id>[:<upstream state>]`; the approval row binds them to the agent, target and
arguments, and each is spent once.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from mcp import MCPError
from mcp.server import ServerRequestContext
from mcp.shared.message import ServerMessageMetadata
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from gateway import errors
from gateway.config import Chamber, Config, TargetKind
from gateway.grants import (
    GRANT_REFUSALS,
    Approval,
    ApprovalKind,
    GrantStore,
    argument_digest,
    canonical_arguments,
)
from gateway.invocation import Denied, Invocation
from gateway.state import StateStore

logger = logging.getLogger(__name__)

STATE_PREFIX = "enclave-chamber:"
APPROVAL_INPUT = "enclave_chamber_approval"
CONTINUATION_SECONDS = 600.0  # how long a 2026-era agent has to answer an upstream's question
RECHECK_SECONDS = 5.0  # a waiting call re-reads its request even if no notification arrives
MAX_SHOWN_ARGUMENTS = 1000
APPROVAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"approve": {"type": "boolean", "title": "Approve this one call"}},
    "required": ["approve"],
}

CallParams = types.CallToolRequestParams | types.ReadResourceRequestParams


@dataclass
class Clearance:
    """How an allowed call proceeds: what it forwards upstream, or (2026 era) a question for the agent's user."""

    input_responses: Any = None
    request_state: str | None = None
    question: types.InputRequiredResult | None = None
    continuation: Callable[[str | None], Awaitable[str]] | None = None

    async def carry(self, result: Any) -> Any:
        """The upstream asked a 2026-era agent for input during an authorized chamber call: the agent's
        retry continues this authorization (once) rather than needing a new one."""
        if self.continuation is None or not isinstance(result, types.InputRequiredResult):
            return result
        return result.model_copy(update={"request_state": await self.continuation(result.request_state)})


@dataclass(frozen=True)
class ChamberCall:
    """One call into a chamber: who, what, with which arguments."""

    agent: str
    enclave: str
    chamber: Chamber
    kind: TargetKind
    target: str
    arguments: dict[str, Any] | None

    @property
    def digest(self) -> str:
        return argument_digest(self.arguments)

    def matches(self, approval: Approval) -> bool:
        return (approval.agent, approval.enclave, approval.chamber, approval.target, approval.args_digest) == (
            self.agent,
            self.enclave,
            self.chamber.name,
            self.target,
            self.digest,
        )

    def describe(self) -> str:
        return f"{'Tool' if self.kind == 'tool' else 'Resource'} '{self.target}' is in chamber '{self.chamber.name}'"

    def grant_command(self) -> str:
        flag = "--tool" if self.kind == "tool" else "--resource"
        return shlex.join(["enclave", "grant", self.agent, self.chamber.name, flag, self.target])


class Chambers:
    """The chamber check, for every enclave of the configuration."""

    def __init__(self, config: Config):
        self._enclaves = config.enclaves
        self._tool_chambers: dict[tuple[str, str], list[Chamber]] = {}
        self._store: GrantStore | None = None
        self._waiters: dict[str, set[anyio.Event]] = {}

    @asynccontextmanager
    async def running(self, state_dir: Path) -> AsyncIterator[None]:
        """Hold the state-database connection the checks use (until then every chamber call is denied)."""
        async with StateStore.open(state_dir) as state:
            store = GrantStore(state.db)
            await store.create_tables()
            self._store = store
            try:
                yield
            finally:
                self._store = None

    def configure(self, config: Config) -> None:
        """A reloaded configuration: chambers as it defines them, from the next call on."""
        self._enclaves = config.enclaves
        self._tool_chambers = {}

    async def decided(self, message: Mapping[str, object]) -> None:
        """Control operation `approval-decided`: wake the calls waiting on that approval request."""
        for event in self._waiters.pop(str(message.get("id")), ()):
            event.set()

    def chambers_of(self, enclave: str, kind: TargetKind, target: str) -> list[Chamber]:
        """`Enclave.chambers_holding`; tool names are few (they passed the view lookup) and cached, resource
        URIs (any string an agent sends) are matched each time."""
        if kind == "tool" and (enclave, target) in self._tool_chambers:
            return self._tool_chambers[enclave, target]
        chambers = self._enclaves[enclave].chambers_holding(kind, target)
        if kind == "tool":
            self._tool_chambers[enclave, target] = chambers
        return chambers

    # -- the check -----------------------------------------------------------------------------

    def refuse_here(self, call: Invocation, tool: str) -> None:
        """For a request path that cannot run the check (it may need to ask the agent's user): deny a
        chambered tool there, whatever grants exist (fail closed). Such a path hands these calls on."""
        assert call.agent is not None
        if chambers := self.chambers_of(call.agent.enclave, "tool", tool):
            request = ChamberCall(call.agent.name, call.agent.enclave, chambers[0], "tool", tool, call.arguments)
            call.chamber = request.chamber.name
            raise self._needs_grant(call, request, "chamber_check_unavailable")

    async def check(self, ctx: ServerRequestContext[Any, Any], call: Invocation, params: CallParams) -> Clearance:
        """Decide a tools/call or resources/read already in the caller's view (arguments validated)."""
        assert call.agent is not None
        if isinstance(params, types.CallToolRequestParams):
            kind: TargetKind = "tool"
            target, arguments = params.name, params.arguments
        else:
            kind, target, arguments = "resource", str(params.uri), None
        chambers = self.chambers_of(call.agent.enclave, kind, target)
        if not chambers:
            return Clearance(params.input_responses, params.request_state)
        request = ChamberCall(call.agent.name, call.agent.enclave, chambers[0], kind, target, arguments)
        call.chamber = request.chamber.name
        if len(chambers) > 1:
            logger.warning("%s is in more than one chamber (%s); denied", target, ", ".join(c.name for c in chambers))
            raise self._needs_grant(call, request, "chamber_conflict")
        try:
            return await self._authorize(ctx, call, request, params)
        except Denied:
            raise
        except Exception:
            logger.exception("chamber check failed for %s %s", kind, target)
            raise self._needs_grant(call, request, "grant_lookup_failed") from None

    async def _authorize(
        self, ctx: ServerRequestContext[Any, Any], call: Invocation, request: ChamberCall, params: CallParams
    ) -> Clearance:
        store = self._require_store()
        if params.request_state is not None and params.request_state.startswith(STATE_PREFIX):
            return await self._resume(store, call, request, params)
        reason = await self._spend_grant(store, call, request)
        if reason is None:
            return self._cleared(store, call, request, params.input_responses, params.request_state)
        if request.chamber.approval == "operator":
            return await self._operator_approval(store, call, request, params)
        if request.chamber.approval == "user":
            return await self._user_approval(ctx, store, call, request, params)
        raise self._needs_grant(call, request, reason)

    def _require_store(self) -> GrantStore:
        if self._store is None:
            raise RuntimeError("the state database is not open")
        return self._store

    def _cleared(
        self, store: GrantStore, call: Invocation, request: ChamberCall, responses: Any, state: str | None
    ) -> Clearance:
        authorization = call.grant_id

        async def continuation(upstream_state: str | None) -> str:
            approval = await self._open(
                store,
                request,
                "continuation",
                CONTINUATION_SECONDS,
                state_digest=_state_digest(upstream_state),
                continues=authorization,
            )
            return STATE_PREFIX + approval.id + ("" if upstream_state is None else ":" + upstream_state)

        return Clearance(responses, state, continuation=continuation)

    async def _spend_grant(self, store: GrantStore, call: Invocation, request: ChamberCall) -> str | None:
        """Spend a use of the most specific grant that allows the call; else why none does."""
        now = time.time()
        grants = await store.chamber_grants(request.enclave, request.chamber.name)
        grants.sort(key=lambda g: (g.args_digest is None, g.target is None, g.expires_at))
        reason, rank = "no_grant", -1
        for grant in grants:
            refusal = grant.refusal(request.agent, request.target, request.digest, now)
            if refusal is None:
                if await store.use_grant(grant.id, now):
                    call.grant_id = grant.id
                    return None
                refusal = "used"  # another call spent its last use a moment ago
            if GRANT_REFUSALS.index(refusal) > rank:
                reason, rank = refusal, GRANT_REFUSALS.index(refusal)
        return reason

    # -- approvals -----------------------------------------------------------------------------

    async def _operator_approval(
        self, store: GrantStore, call: Invocation, request: ChamberCall, params: CallParams
    ) -> Clearance:
        """Open (or join) the request for this exact call and wait, bounded, for an operator's decision."""
        now = time.time()
        approval = await store.open_operator_approval(
            request.agent, request.enclave, request.chamber.name, request.target, request.digest, now
        ) or await self._open(store, request, "operator", request.chamber.max_grant_ttl)
        deadline = anyio.current_time() + request.chamber.approval_wait
        while True:
            event = self._listen(approval.id)
            try:
                current = await store.approval(approval.id)
                assert current is not None
                status = current.current_status(time.time())
                if status == "approved":
                    if not await store.use_approval(current.id, time.time()):
                        raise self._needs_grant(call, request, "used")
                    call.grant_id = current.id
                    return self._cleared(store, call, request, params.input_responses, params.request_state)
                if status == "denied":
                    raise self._deny(call, "approval_denied", f"{request.describe()}: an operator refused this call")
                if status != "pending":
                    raise self._needs_grant(call, request, status)
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    raise self._deny(
                        call,
                        "approval_pending",
                        f"{request.describe()} and this call is waiting for an operator's approval: ask an operator "
                        f"to run `enclave approve {current.id}`, then retry the same call",
                    )
                with anyio.move_on_after(min(remaining, RECHECK_SECONDS)):
                    await event.wait()
            finally:
                self._unlisten(approval.id, event)

    async def _user_approval(
        self,
        ctx: ServerRequestContext[Any, Any],
        store: GrantStore,
        call: Invocation,
        request: ChamberCall,
        params: CallParams,
    ) -> Clearance:
        """Ask the agent's own user through MCP elicitation, where its client declared that it can."""
        capabilities = ctx.session.client_capabilities
        elicitation = capabilities.elicitation if capabilities is not None else None
        if elicitation is None or (elicitation.form is None and elicitation.url is not None):
            raise self._deny(
                call,
                "approval_unavailable",
                f"{request.describe()} and every call needs your user's approval, but your client did not declare "
                f"form elicitation support: use a client that supports elicitation, or ask an operator to run "
                f"`{request.grant_command()}`",
            )
        approval = await self._open(store, request, "user", request.chamber.max_grant_ttl)
        question = types.ElicitRequest(
            params=types.ElicitRequestFormParams(message=_approval_message(request), requested_schema=APPROVAL_SCHEMA)
        )
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            call.decision, call.reason = "deny", "approval_requested"  # not let through yet: the retry may be
            return Clearance(
                question=types.InputRequiredResult(
                    input_requests={APPROVAL_INPUT: question}, request_state=STATE_PREFIX + approval.id
                )
            )
        answer: Any = None
        with anyio.move_on_after(request.chamber.approval_wait):
            try:
                answer = await ctx.session.send_request(
                    question, types.ElicitResult, metadata=ServerMessageMetadata(related_request_id=ctx.request_id)
                )
            except MCPError:
                await store.decide(approval.id, approve=False, by="client error", now=time.time())
                raise self._deny(
                    call, "approval_unavailable", f"{request.describe()}: your client could not ask your user"
                ) from None
        if answer is None:
            await store.decide(approval.id, approve=False, by="timeout", now=time.time())
            raise self._deny(
                call,
                "approval_timeout",
                f"{request.describe()}: your user did not answer the approval request in time; retry the call",
            )
        return await self._answered(store, call, request, approval, answer, params)

    async def _answered(
        self,
        store: GrantStore,
        call: Invocation,
        request: ChamberCall,
        approval: Approval,
        answer: Any,
        params: CallParams,
    ) -> Clearance:
        content = (answer.content or {}) if isinstance(answer, types.ElicitResult) else {}
        now = time.time()
        if isinstance(answer, types.ElicitResult) and answer.action == "accept" and content.get("approve") is True:
            if not await store.use_approval(approval.id, now, answered_by="user"):
                raise self._needs_grant(call, request, approval.current_status(now))
            call.grant_id = approval.id
            # a 2026-era retry carried only the gateway's own question and state: the upstream call starts afresh
            resumed = params.request_state is not None
            return self._cleared(
                store,
                call,
                request,
                None if resumed else params.input_responses,
                None if resumed else params.request_state,
            )
        await store.decide(approval.id, approve=False, by="user", now=now)
        raise self._deny(call, "approval_denied", f"{request.describe()}: your user declined this call")

    async def _resume(self, store: GrantStore, call: Invocation, request: ChamberCall, params: CallParams) -> Clearance:
        """A 2026-era retry carrying the gateway's state: the user's answer, or a continuation."""
        assert params.request_state is not None
        approval_id, has_upstream_state, upstream_state = params.request_state[len(STATE_PREFIX) :].partition(":")
        approval = await store.approval(approval_id)
        if approval is None or not request.matches(approval):
            raise self._needs_grant(call, request, "tampered")
        now = time.time()
        status = approval.current_status(now)
        if approval.kind == "user" and not has_upstream_state:
            if status != "pending":
                raise self._needs_grant(call, request, status)
            answer = (params.input_responses or {}).get(APPROVAL_INPUT)
            return await self._answered(store, call, request, approval, answer, params)
        state = upstream_state if has_upstream_state else None
        if approval.kind != "continuation" or approval.state_digest != _state_digest(state):
            raise self._needs_grant(call, request, "tampered")
        if not await store.use_approval(approval.id, now):
            raise self._needs_grant(call, request, "used" if status in ("used", "approved") else status)
        call.grant_id = approval.decided_by
        return self._cleared(store, call, request, params.input_responses, state)

    async def _open(
        self, store: GrantStore, request: ChamberCall, kind: ApprovalKind, lifetime: float, **continuation: Any
    ) -> Approval:
        """A request for this call (an operator's or user's is pending; a continuation is approved)."""
        now = time.time()
        return await store.open_approval(
            kind=kind,
            agent=request.agent,
            enclave=request.enclave,
            chamber=request.chamber.name,
            target=request.target,
            arguments=request.arguments,
            now=now,
            expires_at=now + lifetime,
            **continuation,
        )

    def _listen(self, approval_id: str) -> anyio.Event:
        event = anyio.Event()
        self._waiters.setdefault(approval_id, set()).add(event)
        return event

    def _unlisten(self, approval_id: str, event: anyio.Event) -> None:
        waiters = self._waiters.get(approval_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[approval_id]

    # -- denials -------------------------------------------------------------------------------

    def _deny(self, call: Invocation, reason: str, message: str) -> Denied:
        """One code for every chamber denial; the request id lets an operator find the audited reason."""
        call.correlation_id = uuid.uuid4().hex[:12]
        return Denied(errors.AUTHORIZATION_REQUIRED, f"{message} (request id {call.correlation_id})", reason)

    def _needs_grant(self, call: Invocation, request: ChamberCall, reason: str) -> Denied:
        """The same reply whatever is wrong with the grants: nothing about them reaches the agent."""
        return self._deny(
            call,
            reason,
            f"{request.describe()} and every call needs an authorization: ask an operator to run "
            f"`{request.grant_command()}`",
        )


def _approval_message(request: ChamberCall) -> str:
    arguments = canonical_arguments(request.arguments)
    if len(arguments) > MAX_SHOWN_ARGUMENTS:
        arguments = arguments[:MAX_SHOWN_ARGUMENTS] + "…"
    what = (
        f"call tool '{request.target}' with arguments {arguments}"
        if request.kind == "tool"
        else (f"read resource '{request.target}'")
    )
    return f"Agent '{request.agent}' wants to {what}. It is in chamber '{request.chamber.name}': approve this one call?"


def _state_digest(state: str | None) -> str:
    return hashlib.sha256(("-" if state is None else "+" + state).encode()).hexdigest()
