"""Enclave isolation: an agent reaches only what its enclave lists, and cannot tell hidden from non-existent.

Replies are compared as raw HTTP responses, byte for byte once the JSON-RPC id and the probed name are
masked, in both protocol eras; the upstream logs prove that a refused request never reached an upstream.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest
from mcp import MCPError
from mcp.types import TextContent

from tests.conftest import E1_DESIGN_TOOLS, Topology
from tests.harness import ERAS, connect, legacy_session, modern_post, raw_post

pytestmark = pytest.mark.anyio

E1_TOOLS = {*E1_DESIGN_TOOLS, "echo", "echo_env", "echo_secret_encodings"}
E2_TOOLS = {"wx_forecast", "wx_whoami", "get_current_time"}
NOWHERE = {
    "tools/call": "nothing_by_this_name",
    "prompts/get": "nothing_by_this_name",
    "resources/read": "nowhere://x",
    "resources/subscribe": "nowhere://x",
}
NOWHERE_COMPLETION = {"ref/prompt": "nothing_by_this_name", "ref/resource": "nowhere://{x}"}

# (agent, method, name or URI it must not reach); the name is hidden from that agent, or a traversal.
HIDDEN = [
    ("b1", "tools/call", "search_parts"),  # e1's design tools
    ("b1", "tools/call", "export_design"),
    ("b1", "tools/call", "echo_env"),  # e1's evil tools
    ("b1", "tools/call", "forecast"),  # its own connector's tool under the upstream name (e2 prefixes wx_)
    ("b1", "tools/call", "convert_time"),  # its own published server's tool that e2 does not expose
    ("a1", "tools/call", "wx_forecast"),  # e2's tools
    ("a1", "tools/call", "get_current_time"),
    ("a1", "tools/call", "grow"),  # its own evil connector's tool that e1 does not expose
    ("b1", "resources/read", "design://catalogue"),
    ("b1", "resources/read", "design://parts/P-100"),
    ("a1", "resources/read", "design://parts/../secret"),  # matches design://parts/* only as a string
    ("a1", "resources/read", "design://parts/%2e%2e/x"),
    ("a1", "resources/read", "design://parts/%2E%2E/P-100"),
    ("a1", "resources/read", "design://parts/..%2fcatalogue"),
    ("b1", "prompts/get", "review_part"),
    ("b1", "ref/prompt", "review_part"),  # completion/complete on e1's prompt
    ("b1", "ref/resource", "design://parts/{part_id}"),  # completion/complete on e1's resource template
    ("b1", "resources/subscribe", "design://catalogue"),  # (the handshake era only: 2026-07-28 removed it)
]
PROBES = [(mode, *probe) for mode in ERAS for probe in HIDDEN if mode == "legacy" or probe[1] != "resources/subscribe"]
EXPECTED_CODE = {"tools/call": -32602, "prompts/get": -32602, "ref/prompt": -32602}  # resources: -32002


def request(method: str, name: str) -> tuple[str, dict[str, Any]]:
    """The JSON-RPC method and params that probe `name` (`ref/*` stand for completion/complete)."""
    if method == "tools/call":
        return method, {"name": name, "arguments": {"text": "hello", "query": "bolt"}}
    if method == "prompts/get":
        return method, {"name": name, "arguments": {"part_id": "P-100"}}
    if method.startswith("resources/"):
        return method, {"uri": name}
    ref = {"type": method, "name": name} if method == "ref/prompt" else {"type": method, "uri": name}
    return "completion/complete", {"ref": ref, "argument": {"name": "part_id", "value": "P"}}


def send_both(url: str, token: str, mode: str, *probes: tuple[str, dict[str, Any]]) -> list[httpx2.Response]:
    """Send each (method, params) as request id 1, 2, ...: in one initialized session, or as 2026-era requests."""
    if mode == "legacy":
        session = legacy_session(url, token)
        return [
            raw_post(url, {"jsonrpc": "2.0", "id": index, "method": method, "params": params}, token, **session)
            for index, (method, params) in enumerate(probes, 1)
        ]
    return [modern_post(url, method, params, token, index) for index, (method, params) in enumerate(probes, 1)]


def masked(response: httpx2.Response, request_id: int, name: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body with the request id, the probed name and the per-response headers masked."""
    body = response.content.replace(json.dumps(name)[1:-1].encode(), b"<NAME>")
    body = body.replace(f'"id":{request_id},'.encode(), b'"id":<ID>,')
    headers = {k: v for k, v in response.headers.items() if k not in ("date", "content-length", "mcp-session-id")}
    return response.status_code, headers, body


def error_of(response: httpx2.Response) -> dict[str, Any]:
    text = response.text
    data = text.split("data: ", 1)[1].split("\r\n", 1)[0] if text.startswith("event:") else text
    return json.loads(data)["error"]


@pytest.fixture(scope="module")
def warm_views(topology: Topology) -> None:
    """List once as each agent, so that later requests need no upstream listing at all."""
    for agent in ("a1", "b1"):
        for reply in send_both(
            topology.url, topology.tokens[agent], "legacy", ("tools/list", {}), ("prompts/list", {})
        ):
            assert reply.status_code == 200


@pytest.mark.parametrize("mode", ERAS)
async def test_each_agent_lists_only_its_enclave(topology: Topology, mode: str) -> None:
    async with connect(topology.url, topology.tokens["a1"], mode) as client:
        assert {tool.name for tool in (await client.list_tools()).tools} == E1_TOOLS
        assert [r.uri for r in (await client.list_resources()).resources] == ["design://catalogue"]
        templates = (await client.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["design://parts/{part_id}"]
        assert [p.name for p in (await client.list_prompts()).prompts] == ["review_part"]
    async with connect(topology.url, topology.tokens["b1"], mode) as client:
        assert {tool.name for tool in (await client.list_tools()).tools} == E2_TOOLS
        assert (await client.list_resources()).resources == []
        assert (await client.list_resource_templates()).resource_templates == []
        assert (await client.list_prompts()).prompts == []


@pytest.mark.parametrize("mode", ERAS)
async def test_published_server_is_filtered(topology: Topology, mode: str) -> None:
    """mcp-server-time (from PyPI) offers get_current_time and convert_time; e2 exposes only the first."""
    async with connect(topology.url, topology.tokens["b1"], mode) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert "get_current_time" in tools
        assert "convert_time" not in tools
        result = await client.call_tool("get_current_time", {"timezone": "UTC"})
        assert not result.is_error
        assert isinstance(result.content[0], TextContent) and "UTC" in result.content[0].text
        with pytest.raises(MCPError) as hidden:
            await client.call_tool(
                "convert_time", {"source_timezone": "UTC", "time": "12:00", "target_timezone": "UTC"}
            )
    assert (hidden.value.error.code, hidden.value.error.message) == (-32602, "Unknown tool: convert_time")


@pytest.mark.usefixtures("warm_views")
@pytest.mark.parametrize(("mode", "agent", "method", "name"), PROBES)
def test_hidden_and_nonexistent_replies_are_identical(
    topology: Topology, mode: str, agent: str, method: str, name: str
) -> None:
    before = {connector: log.count() for connector, log in topology.logs.items()}
    nowhere = NOWHERE_COMPLETION[method] if method.startswith("ref/") else NOWHERE[method]

    hidden, missing = send_both(
        topology.url, topology.tokens[agent], mode, request(method, name), request(method, nowhere)
    )

    assert error_of(hidden)["code"] == EXPECTED_CODE.get(method, -32002)
    assert masked(hidden, 1, name) == masked(missing, 2, nowhere)
    assert {connector: log.count() for connector, log in topology.logs.items()} == before
