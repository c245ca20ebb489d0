"""Hostile or broken upstreams: hangs, crash loops, giant messages, garbage on stdout, stderr floods
(threat-principles: OWASP ASI08 cascading failures; section 3.0's evil switches hang, crash_after, giant,
bad_stdout, stderr_flood).

Enclave e3 (agent h1) holds the hostile connectors; ALIVE checks, after each case, that the other enclave's agent
is still served by the same process.

Proven elsewhere, not repeated: a hang times out and the upstream receives notifications/cancelled, in both eras,
while the same and other connectors keep answering (tests/test_upstreams.py::test_a_hanging_upstream_times_out_
and_others_keep_working); a single crash is a clear error and the next call restarts the server (tests/test_
upstreams.py::test_a_crashed_upstream_is_a_clear_error_then_restarted); shutdown leaves no process behind.
"""

from __future__ import annotations

import re
import time

import anyio
import pytest
from mcp import MCPError
from mcp.types import CallToolResult, TextContent

from tests.harness import ERAS, UpstreamLog, connect
from tests.security.conftest import HOSTILE_LIMIT, audit
from tests.security.invariants import Deployment, assert_alive, assert_invariants

pytestmark = pytest.mark.anyio


def starts(log: UpstreamLog) -> int:
    """How many times the upstream process was started (each start opens with server/discover or initialize)."""
    return sum(m["method"] in ("server/discover", "initialize") for m in log.messages())


def text(result: CallToolResult) -> str:
    assert isinstance(result.content[0], TextContent)
    return result.content[0].text


async def test_a_hang_is_cut_by_the_timeout_while_other_enclaves_are_served(world: Deployment) -> None:
    """The hang occupies its connector, not the gateway: the other enclave's agent is served meanwhile."""
    log = world.logs["hang"]
    async with connect(world.url, world.tokens["h1"], "2026-07-28") as client, anyio.create_task_group() as tg:
        await client.list_tools()
        outcome: list[MCPError] = []

        async def hang() -> None:
            with pytest.raises(MCPError) as timed_out:
                await client.call_tool("hang_hang", {})
            outcome.append(timed_out.value)

        tg.start_soon(hang)
        with anyio.fail_after(5):
            while not log.calls():
                await anyio.sleep(0.02)
        assert_alive(world)
    assert (outcome[0].error.code, outcome[0].error.message) == (
        -32004,
        "Upstream server 'hang' did not answer in time; the request was cancelled",
    )
    with anyio.fail_after(10):
        while not any(m["method"] == "notifications/cancelled" for m in log.messages()):
            await anyio.sleep(0.05)
    assert_invariants(world, outcome[0])


@pytest.mark.parametrize("mode", ERAS)
async def test_a_response_that_is_not_json_rpc_is_skipped(world: Deployment, mode: str) -> None:
    """Before its answer, `mangle` sends a line with its request's id whose result is not an object. Both request
    paths (the SDK's session, and the fast path's lane for a 2026-era agent) skip it, as the SDK skips any line
    that is not JSON-RPC, and take the answer that follows."""
    async with connect(world.url, world.tokens["h1"], mode) as client:
        await client.list_tools()  # listed: a 2026-era call takes the fast path
        result = await client.call_tool("noisy_mangle", {})
    assert (result.is_error, text(result)) == (False, "proper")
    assert_invariants(world, result)


async def test_a_crash_loop_is_restarted_with_backoff(world: Deployment) -> None:
    """evil exits on every tools/call. The first crash is restarted at the next call; after that the gateway
    waits 0.5 s, then 1 s, ... and answers at once, without starting it, while it waits."""
    log = world.logs["crashy"]
    replies: list[MCPError] = []
    async with connect(world.url, world.tokens["h1"], "legacy") as client:

        async def crash() -> MCPError:
            with pytest.raises(MCPError) as failed:
                await client.call_tool("crashy_echo", {"text": "hi"})
            replies.append(failed.value)
            return failed.value

        first = await crash()
        assert (first.error.code, first.error.message) == (
            -32001,
            "Upstream server 'crashy' is unavailable; the gateway will restart it on the next call",
        )
        started = starts(log)
        await crash()  # restarted at once, and crashed again: the second failure in a row
        assert starts(log) == started + 1
        for failures, backoff in ((2, 0.5), (3, 1.0)):
            calls = len(log.calls())
            waiting = await crash()
            assert waiting.error.code == -32001
            match = re.fullmatch(
                rf"Upstream server 'crashy' is unavailable: it failed {failures} times in a row; "
                r"the gateway restarts it in ([0-9.]+) s",
                waiting.error.message,
            )
            assert match and 0 < float(match.group(1)) <= backoff, waiting.error.message
            assert len(log.calls()) == calls  # answered without starting it
            assert not (await client.call_tool("noisy_echo", {"text": "others"})).is_error
            await anyio.sleep(backoff)
            await crash()  # started again, crashed again
    rows = audit(world, "agent = 'h1' AND connector = 'crashy'")
    assert {row["reason"] for row in rows} == {"upstream_unavailable"}
    assert_invariants(world, *replies)


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize("connector", ["giant", "giant_http"])
async def test_a_giant_message_is_cut_at_the_limit(world: Deployment, mode: str, connector: str) -> None:
    """evil answers with 2 MiB, over stdio (one line) or streamable HTTP; its connector allows 64 KiB. The gateway
    stops reading at the limit (it never holds the whole message), answers a clear error, and the connector serves
    the next call (over stdio, from a fresh process)."""
    async with connect(world.url, world.tokens["h1"], mode) as client:
        await client.list_tools()
        started = time.monotonic()
        with pytest.raises(MCPError) as cut:
            await client.call_tool(f"{connector}_giant", {})
        elapsed = time.monotonic() - started
        assert text(await client.call_tool(f"{connector}_echo", {"text": "small"})) == "small"
    assert (cut.value.error.code, cut.value.error.message) == (
        -32006,
        f"Upstream server '{connector}' sent a message larger than {HOSTILE_LIMIT} bytes (max_result_bytes); "
        "the gateway dropped it",
    )
    assert elapsed < 5
    era = "2025-11-25" if mode == "legacy" else mode
    (row,) = audit(world, "agent = 'h1' AND target = ? AND protocol_version = ?", (f"{connector}_giant", era))
    assert (row["decision"], row["reason"], row["error_code"]) == ("allow", "result_too_large", -32006)
    assert_invariants(world, cut.value)


@pytest.mark.parametrize("mode", ERAS)
async def test_a_result_over_the_limit_once_encoded_for_the_agent_is_refused(world: Deployment, mode: str) -> None:
    """The transport bounds the upstream's message; the gateway also measures the result as the agent would
    receive it. evil echoes 12,000 non-ASCII characters (as text and as structured content): a 48 KB line of
    UTF-8, under the 64 KiB limit, that is 144 KB once encoded for the agent (as `\\u00e9` escapes). It is
    refused, and audited so, on both paths."""
    async with connect(world.url, world.tokens["h1"], mode) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("giant_echo", {"text": "\u00e9" * 12_000})
        assert text(await client.call_tool("giant_echo", {"text": "small"})) == "small"
    assert refused.value.error.code == -32006
    era = "2025-11-25" if mode == "legacy" else mode
    where = "agent = 'h1' AND target = 'giant_echo' AND protocol_version = ? AND error_code IS NOT NULL"
    (row,) = audit(world, where, (era,))
    assert (row["decision"], row["reason"], row["error_code"]) == ("allow", "result_too_large", -32006)
    assert_invariants(world, refused.value)


@pytest.mark.parametrize("mode", ERAS)
async def test_garbage_on_stdout_and_a_stderr_flood_do_not_wedge_the_gateway(world: Deployment, mode: str) -> None:
    """evil writes non-JSON lines to stdout and 3 MiB to stderr before serving: it still serves, and the
    gateway's log holds a bounded sample of the flood rather than all of it."""
    async with connect(world.url, world.tokens["h1"], mode) as client:
        result = await client.call_tool("noisy_echo", {"text": "still here"})
    assert text(result) == "still here"
    log = world.gateway.stderr()
    flood = [line for line in log.splitlines() if "gateway.upstream.noisy:" in line]
    assert 0 < len(flood) < 400, len(flood)
    assert len(log) < 1024 * 1024
    assert "gateway.upstream_stdio: connector noisy: a line of" in log  # the garbage was skipped, and said so
    assert_invariants(world, result)
