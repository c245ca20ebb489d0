"""What the fast path keeps of a handshake-era session while it serves a call on it (gateway.handshake), against
the SDK's own session transport: the call holds the session open, and the agent's notifications/cancelled
cancels it. (tests/test_fastpath.py compares whole calls on both paths through real gateways.)"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import pytest
from mcp.server.streamable_http import StreamableHTTPServerTransport

from gateway.handshake import SessionCalls

pytestmark = pytest.mark.anyio

IDLE_SECONDS = 600.0


@pytest.fixture
async def transport() -> AsyncIterator[StreamableHTTPServerTransport]:
    transport = StreamableHTTPServerTransport(mcp_session_id="s1", idle_timeout=IDLE_SECONDS)
    async with transport.connect():
        yield transport
        await transport.terminate()


async def test_a_call_holds_the_session_open_and_the_idle_countdown_restarts_after_it(
    transport: StreamableHTTPServerTransport,
) -> None:
    calls = SessionCalls({"s1": transport})
    assert calls.transport("s1") is transport
    assert transport.idle_scope is not None
    seen: list[float] = []

    async def call() -> str:
        seen.append(transport.idle_scope.deadline)  # type: ignore[union-attr]
        return "done"

    before = asyncio.get_running_loop().time()
    transport.idle_scope.deadline = before + 5  # counting down, as after an earlier request
    assert await calls.run(transport, 1, call()) == "done"
    assert seen == [math.inf]
    assert before + IDLE_SECONDS <= transport.idle_scope.deadline < math.inf
    assert not calls.in_flight("s1", 1)


async def test_notifications_cancelled_cancels_the_call_it_names_and_no_other(
    transport: StreamableHTTPServerTransport,
) -> None:
    calls = SessionCalls({"s1": transport})
    started = asyncio.Event()

    async def forever() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    running = asyncio.ensure_future(calls.run(transport, 7, forever()))
    await started.wait()
    calls.cancel("s1", {"requestId": 8})  # another request
    calls.cancel("other", {"requestId": 7})  # another session
    calls.cancel("s1", {"requestId": True})  # not an id (True would alias 1)
    assert calls.in_flight("s1", 7) and not running.done()
    calls.cancel("s1", {"requestId": "7"})  # correlated as the SDK's dispatcher does: "7" is 7
    assert await running is None
    assert not calls.in_flight("s1", 7)


async def test_an_ended_session_is_not_served(transport: StreamableHTTPServerTransport) -> None:
    calls = SessionCalls({"s1": transport})
    await transport.terminate()
    assert calls.transport("s1") is None
    assert calls.transport("unknown") is None


async def test_an_answer_is_taken_only_on_the_session_that_was_asked(transport: StreamableHTTPServerTransport) -> None:
    """What a call asked the agent is answered by a POST on the same session with the same id; the SDK's own
    requests (integer ids) and other sessions' answers are never taken."""
    calls = SessionCalls({"s1": transport})
    request_id, answer = calls.expect_answer("s1")
    reply = {"jsonrpc": "2.0", "id": request_id, "result": {"action": "decline"}}
    assert not calls.answered("s2", reply)
    assert not calls.answered("s1", {**reply, "id": 1})
    assert not answer.done()
    assert calls.answered("s1", reply)
    assert answer.result() == reply
    calls.forget_answer("s1", request_id)
    assert not calls.answered("s1", reply)
