"""The core request path end to end, in both protocol eras."""

from __future__ import annotations

import pytest
from mcp import MCPError

from tests.conftest import E1_DESIGN_TOOLS, Topology
from tests.harness import ERAS, connect

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("mode", ERAS)
async def test_agent_sees_only_its_enclave(topology: Topology, mode: str) -> None:
    async with connect(topology.url, topology.tokens["a1"], mode) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert names == {*E1_DESIGN_TOOLS, "echo", "echo_env", "echo_secret_encodings"}
        result = await client.call_tool("search_parts", {"query": "bolt"})
        assert not result.is_error
    async with connect(topology.url, topology.tokens["b1"], mode) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert names == {"wx_forecast", "wx_whoami", "get_current_time"}


@pytest.mark.parametrize("mode", ERAS)
async def test_hidden_and_nonexistent_tools_get_the_same_reply(topology: Topology, mode: str) -> None:
    before = topology.logs["design"].count()
    async with connect(topology.url, topology.tokens["b1"], mode) as client:
        with pytest.raises(MCPError) as hidden:
            await client.call_tool("search_parts", {"query": "bolt"})
        with pytest.raises(MCPError) as missing:
            await client.call_tool("no_such_tool_anywhere", {"query": "bolt"})
    assert hidden.value.error.code == missing.value.error.code == -32602
    assert hidden.value.error.message.replace("search_parts", "X") == missing.value.error.message.replace(
        "no_such_tool_anywhere", "X"
    )
    assert topology.logs["design"].count() == before
