"""Faithful forwarding through the gateway, in both protocol eras: progress, cancellation, elicitation,
trace context, list-changed notifications (re-filtered per enclave), upstream identity stripped, and
arguments validated before anything is forwarded."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import mcp.types as types
import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.context import ClientRequestContext
from mcp.client.subscriptions import ToolsListChanged

from tests.conftest import Topology
from tests.harness import (
    ERAS,
    EVIL,
    EXAMPLES,
    ConfigDir,
    GatewayProcess,
    connect,
    legacy_session,
    modern_post,
    python_server,
    raw_post,
    running,
)

pytestmark = pytest.mark.anyio

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
IDENTITY_KEY = "io.modelcontextprotocol/serverInfo"


async def eventually(predicate: Any, timeout: float = 15, what: str = "condition") -> None:
    """Poll `predicate` until it holds (a deadline, not a sleep: the upstream log is written by another process)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await anyio.sleep(0.05)


def text(result: types.CallToolResult) -> str:
    assert isinstance(result.content[0], types.TextContent)
    return result.content[0].text


@pytest.mark.parametrize("mode", ERAS)
async def test_progress_reaches_the_agent(topology: Topology, mode: str) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with connect(topology.url, topology.tokens["a1"], mode) as client:
        result = await client.call_tool("slow_count", {"n": 4}, progress_callback=on_progress)
    assert text(result) == "counted 4"
    assert seen == [(step, 4, f"step {step}/4") for step in range(1, 5)]

    # On the wire: the agent's own token comes back; the upstream got the gateway's (the agent's means nothing
    # on the gateway's shared upstream session).
    token = topology.tokens["a1"]
    params = {"name": "slow_count", "arguments": {"n": 2}, "_meta": {"progressToken": "agent-token"}}
    if mode == "legacy":
        body = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": params}
        reply = raw_post(topology.url, body, token, **legacy_session(topology.url, token))
    else:
        reply = modern_post(topology.url, "tools/call", params, token)
    assert reply.text.count('"progressToken":"agent-token"') == 2
    forwarded = topology.logs["design"].calls()[-1]["params"]["_meta"]["progressToken"]
    assert forwarded != "agent-token"


@pytest.mark.parametrize("mode", ERAS)
async def test_cancellation_reaches_the_upstream(topology: Topology, mode: str) -> None:
    log = topology.logs["design"]
    start = log.count()

    def started() -> bool:
        return any(m["method"] == "tools/call" for m in log.messages()[start:])

    async with connect(topology.url, topology.tokens["a1"], mode) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.call_tool, "slow_count", {"n": 400})
        await eventually(started, what="the call to reach the upstream")
        tg.cancel_scope.cancel()
    await eventually(
        lambda: any(m["method"] == "notifications/cancelled" for m in log.messages()[start:]),
        what="notifications/cancelled at the upstream",
    )
    async with connect(topology.url, topology.tokens["a1"], mode) as client:
        assert text(await client.call_tool("slow_count", {"n": 1})) == "counted 1"  # the session is still usable


@pytest.mark.parametrize("mode", ERAS)
async def test_elicitation_when_the_agent_declares_it(topology: Topology, mode: str) -> None:
    asked: list[str] = []

    async def answer(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"confirm": True})

    async with connect(topology.url, topology.tokens["a1"], mode, elicitation_callback=answer) as client:
        result = await client.call_tool("confirm_delete", {"part_id": "P-100"})
    assert text(result) == "P-100: confirmed"
    assert asked == ["Really delete part P-100 (Hex bolt M8x40)?"]

    async with connect(topology.url, topology.tokens["a1"], mode) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("confirm_delete", {"part_id": "P-100"})
    assert "needs elicitation from your client, which it did not declare" in refused.value.error.message


@pytest.mark.parametrize("mode", ERAS)
async def test_trace_context_reaches_the_upstream(topology: Topology, mode: str) -> None:
    async with connect(topology.url, topology.tokens["a1"], mode) as client:
        await client.call_tool("search_parts", {"query": "nut"}, meta={"traceparent": TRACEPARENT})
    meta = topology.logs["design"].calls()[-1]["params"]["_meta"]
    # Same trace; the span id is the gateway's own if it records spans, else the agent's.
    assert meta["traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]


async def test_upstream_identity_is_stripped(topology: Topology) -> None:
    """design-db stamps its serverInfo on 2026-era results; through the gateway only the gateway's remains."""
    direct = StdioServerParameters(command=sys.executable, args=[str(EXAMPLES / "design_db.py")])
    async with Client(direct, mode="2026-07-28") as client:
        result = await client.call_tool("get_part", {"part_id": "P-100"})
    assert result.meta is not None and result.meta[IDENTITY_KEY]["name"] == "design-db"

    token = topology.tokens["a1"]
    session = legacy_session(topology.url, token)
    probes = [
        ("tools/call", {"name": "get_part", "arguments": {"part_id": "P-100"}}),
        ("resources/read", {"uri": "design://parts/P-100"}),
        ("prompts/get", {"name": "review_part", "arguments": {"part_id": "P-100"}}),
        (
            "completion/complete",
            {"ref": {"type": "ref/prompt", "name": "review_part"}, "argument": {"name": "part_id", "value": "P-1"}},
        ),
        ("tools/list", {}),
    ]
    for method, params in probes:
        body = {"jsonrpc": "2.0", "id": 5, "method": method, "params": params}
        for reply in (raw_post(topology.url, body, token, **session), modern_post(topology.url, method, params, token)):
            assert reply.status_code == 200 and '"result"' in reply.text, reply.text
            assert "design-db" not in reply.text
            found = reply.text.count(IDENTITY_KEY)
            assert reply.text.count('"io.modelcontextprotocol/serverInfo":{"name":"enclave-gateway"') == found


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize(
    ("tool", "arguments", "field"),
    [
        ("search_parts", {"query": 5}, "query"),
        ("search_parts", {}, "query"),
        ("search_parts", {"query": "bolt", "limit": "ten"}, "limit"),
        ("export_design", {"part_id": "P-100", "format": "dwg"}, "format"),
    ],
)
async def test_invalid_arguments_are_refused_before_forwarding(
    topology: Topology, mode: str, tool: str, arguments: dict[str, Any], field: str
) -> None:
    log = topology.logs["design"]
    async with connect(topology.url, topology.tokens["a1"], mode) as client:
        await client.list_tools()
        calls = len(log.calls())
        with pytest.raises(MCPError) as invalid:
            await client.call_tool(tool, arguments)
    assert invalid.value.error.code == -32602
    assert f"Invalid argument '{field}' for tool {tool}" in invalid.value.error.message
    assert len(log.calls()) == calls


# -- list-changed notifications ----------------------------------------------------------------------

Growing = tuple[GatewayProcess, dict[str, str]]


@pytest.fixture(scope="module")
def growing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Growing]:
    """e1 uses evil (which can add tools and announce it) and exposes extra_*; e2 does not use evil."""
    root = tmp_path_factory.mktemp("growing")
    config = (
        ConfigDir(root)
        .connector("evil", python_server(EVIL, UPSTREAM_LOG=str(root / "upstream-evil.jsonl")))
        .connector("design", python_server(EXAMPLES / "design_db.py"))
        .enclave("e1", ["a1"], {"evil": {"tools": ["echo", "grow", "extra_*"]}})
        .enclave("e2", ["b1"], {"design": {"tools": ["search_parts"]}})
    )
    tokens = {"a1": config.mint("a1", "e1"), "b1": config.mint("b1", "e2")}
    with running(config) as gateway:
        yield gateway, tokens


class Notifications:
    """A message_handler that keeps the tools/list_changed notifications it receives."""

    def __init__(self) -> None:
        self.count = 0
        self.arrived = anyio.Event()

    async def __call__(self, message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self.count += 1
            self.arrived.set()


async def tool_names(client: Client) -> set[str]:
    return {tool.name for tool in (await client.list_tools()).tools}


async def test_list_changed_reaches_handshake_era_agents_refiltered(growing: Growing) -> None:
    gateway, tokens = growing
    in_e1, in_e2 = Notifications(), Notifications()
    async with (
        connect(gateway.url, tokens["a1"], "legacy", message_handler=in_e1) as a1,
        connect(gateway.url, tokens["b1"], "legacy", message_handler=in_e2) as b1,
    ):
        assert await tool_names(a1) == {"echo", "grow"}
        await tool_names(b1)  # b1's session is live (it has a stream the gateway could wrongly notify)

        await a1.call_tool("grow", {"name": "extra_legacy"})
        with anyio.fail_after(15):
            await in_e1.arrived.wait()
        assert await tool_names(a1) == {"echo", "grow", "extra_legacy"}

        in_e1.arrived = anyio.Event()
        await a1.call_tool("grow", {"name": "unlisted_legacy"})  # e1 does not expose it
        with anyio.fail_after(15):
            await in_e1.arrived.wait()
        assert await tool_names(a1) == {"echo", "grow", "extra_legacy"}

        with anyio.move_on_after(1):  # bounded wait for what must not arrive
            await in_e2.arrived.wait()
    assert in_e2.count == 0, "an agent of an enclave that does not use evil was notified"
    assert in_e1.count == 2, "one upstream change, one notification"


async def test_list_changed_reaches_stateless_era_agents_on_listen(growing: Growing) -> None:
    gateway, tokens = growing
    async with connect(gateway.url, tokens["a1"], "2026-07-28") as a1:
        before = await tool_names(a1)
        async with a1.listen(tools_list_changed=True) as subscription:
            await a1.call_tool("grow", {"name": "extra_modern"})
            with anyio.fail_after(15):
                event = await anext(aiter(subscription))
        assert event == ToolsListChanged()
        assert await tool_names(a1) == before | {"extra_modern"}
