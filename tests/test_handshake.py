"""What the fast path keeps of a handshake-era session while it serves a call on it (gateway.handshake), against
the SDK's own session transport: the call holds the session open, the agent's notifications/cancelled cancels
it, and the call's stream carries its head, pings, questions to the agent and answer in order. (The stream's
ASGI `send` is a recorder here; tests/test_fastpath.py compares whole calls on both paths through real
gateways.)"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import mcp_types as types
import pytest
from mcp import MCPError
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp_types import CONNECTION_CLOSED

from gateway import handshake
from gateway.handshake import SessionCalls

pytestmark = pytest.mark.anyio

IDLE_SECONDS = 600.0
WAIT_SECONDS = 5.0  # what a broken stream would leave a test waiting for, at most


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


class Sent:
    """The ASGI messages an EventStream sends, in order, and a way to wait until `count` have been sent."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._more = asyncio.Condition()

    async def __call__(self, message: dict[str, Any]) -> None:
        async with self._more:
            self.messages.append(message)
            self._more.notify_all()

    async def reach(self, count: int) -> None:
        async with asyncio.timeout(WAIT_SECONDS), self._more:
            await self._more.wait_for(lambda: len(self.messages) >= count)

    def bodies(self) -> list[bytes]:
        return [m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"]


ANSWER = b'{"jsonrpc":"2.0","id":1,"result":{}}'
QUESTION = types.ElicitRequest.model_validate(
    {"method": "elicitation/create", "params": {"message": "ok?", "requestedSchema": {"type": "object"}}}
)


async def test_a_quick_call_is_answered_whole(transport: StreamableHTTPServerTransport) -> None:
    sent = Sent()
    stream = SessionCalls({"s1": transport}).stream(sent, "s1", "2025-11-25")
    await stream.answer(ANSWER)
    assert [m["type"] for m in sent.messages] == ["http.response.start", "http.response.body"]
    assert sent.bodies() == [b"event: message\r\ndata: " + ANSWER + b"\r\n\r\n"]


async def test_a_long_call_gets_its_head_then_pings_then_its_answer(
    transport: StreamableHTTPServerTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handshake, "OPEN_STREAM_AFTER_SECONDS", 0.01)
    monkeypatch.setattr(handshake, "PING_SECONDS", 0.01)
    sent = Sent()
    stream = SessionCalls({"s1": transport}).stream(sent, "s1", "2025-11-25")
    await sent.reach(3)  # the head and two pings, while the call runs
    await stream.answer(ANSWER)
    assert sent.messages[0]["type"] == "http.response.start"
    *pings, last = sent.bodies()
    assert len(pings) >= 2 and set(pings) == {b": ping\r\n\r\n"}
    assert last == b"event: message\r\ndata: " + ANSWER + b"\r\n\r\n"
    assert not sent.messages[-1].get("more_body")


async def test_a_question_the_agent_answers_with_an_error_raises_it(transport: StreamableHTTPServerTransport) -> None:
    calls, sent = SessionCalls({"s1": transport}), Sent()
    stream = calls.stream(sent, "s1", "2025-11-25")
    asking = asyncio.ensure_future(stream.ask(QUESTION, types.ElicitResult))
    await sent.reach(2)  # the head, then the question
    question = json.loads(sent.bodies()[0].split(b"data: ", 1)[1])
    assert question["method"] == "elicitation/create" and question["id"].startswith("enclave-ask-")
    assert calls.answered("s1", {"jsonrpc": "2.0", "id": question["id"], "error": {"code": -1, "message": "no"}})
    with pytest.raises(MCPError) as refused:
        await asyncio.wait_for(asking, WAIT_SECONDS)
    assert (refused.value.error.code, refused.value.error.message) == (-1, "no")
    stream.close()


async def test_a_question_still_open_when_the_call_ends_fails_as_on_a_closed_connection(
    transport: StreamableHTTPServerTransport,
) -> None:
    calls, sent = SessionCalls({"s1": transport}), Sent()
    stream = calls.stream(sent, "s1", "2025-11-25")
    asking = asyncio.ensure_future(stream.ask(QUESTION, types.ElicitResult))
    await sent.reach(2)
    question = json.loads(sent.bodies()[0].split(b"data: ", 1)[1])
    stream.close()
    with pytest.raises(MCPError) as closed:
        await asyncio.wait_for(asking, WAIT_SECONDS)
    assert closed.value.error.code == CONNECTION_CLOSED
    assert not calls.answered("s1", {"jsonrpc": "2.0", "id": question["id"], "result": {"action": "decline"}})
