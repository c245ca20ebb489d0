"""Transparency: the gateway changes no result of the server it fronts.

`@modelcontextprotocol/server-everything` sits behind a gateway whose enclave exposes all of it (tools,
resources and prompts "*"), as a stdio connector (the product's main use) and as a streamable HTTP one.
The official conformance suite runs against it directly and through header_proxy -> gateway, and every
scenario must end the same, except the differences listed in KNOWN_DIFFERENCES with their reasons.

The suite calls fixture tools and prompts that server-everything does not have (test_sampling,
test_tool_with_logging, ...), so its scenarios cannot reach progress, log messages, resource updates,
sampling or elicitation. The second half of this module drives those through server-everything's own
tools with the official MCP client, directly and through the gateway, and compares what the client sees.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client

from tests import nodetools
from tests.conftest import Topology
from tests.harness import ConfigDir, GatewayProcess, connect, legacy_session, raw_post, running

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.node,
    # logging/setLevel and resources/subscribe are deprecated in 2026-07-28; handshake-era clients still use them.
    pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning"),
]

EVERYTHING = "everything"
SUITE = "all"  # the active scenarios and the pending ones
ALL_OF_IT = {"tools": ["*"], "resources": ["*"], "prompts": ["*"]}

# scenario -> (result directly, result through the gateway), wherever they differ; nowhere else may they.
KNOWN_DIFFERENCES = {
    # An improvement: the gateway checks Host and Origin against DNS rebinding (a security requirement);
    # server-everything answers a request for Host: evil.example.com.
    "dns-rebinding-protection": ("fail", "pass"),
    # Not achievable without breaking the enclave boundary. These scenarios call fixture tools that
    # server-everything lacks (test_simple_text, test_error_handling). server-everything answers an unknown
    # tool with an isError *result* carrying its error text, which these two scenarios happen to accept.
    # The gateway answers every name outside the enclave's view with the JSON-RPC error -32602 "Unknown tool"
    # (the spec's protocol error for unknown tools), the same for hidden and non-existent names, and never
    # asks the upstream: asking would let agents reach it with names the enclave does not list and make the
    # upstream's answer an oracle for what exists behind the gateway.
    "tools-call-simple-text": ("pass", "fail"),
    "tools-call-error": ("pass", "fail"),
    # The same cause (a pending scenario): it calls the fixture tool test_reconnection. server-everything's
    # isError result counts as a failed tool call on the POST stream; the gateway's JSON-RPC error is no
    # tool response at all, which leaves only the scenario's warnings (no priming event, no retry field;
    # server-everything has the same two warnings).
    "server-sse-polling": ("fail", "warning"),
}
# What server-everything passes directly and must pass through the gateway too (the comparison is not vacuous).
PASSING = {
    "server-initialize",
    "ping",
    "logging-set-level",
    "tools-list",
    "resources-list",
    "resources-subscribe",
    "resources-unsubscribe",
    "prompts-list",
    "server-sse-multiple-streams",
}


@pytest.fixture(scope="module", autouse=True)
def node_tools() -> None:
    nodetools.require_tools()


def everything_gateway(root: Path, connector: dict[str, Any]) -> tuple[ConfigDir, dict[str, str]]:
    """A gateway config: enclave `all` (agent `agent`) exposes all of server-everything; enclave `other`
    (agent `outsider`) uses only a different server, mcp-server-time."""
    time_server = {"stdio": {"command": "${python}", "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]}}
    config = (
        ConfigDir(root)
        .connector(EVERYTHING, connector)
        .connector("time", time_server)
        .enclave("all", ["agent"], {EVERYTHING: ALL_OF_IT})
        .enclave("other", ["outsider"], {"time": {"tools": ["*"]}})
    )
    return config, {"agent": config.mint("agent", "all"), "outsider": config.mint("outsider", "other")}


def stdio_connector() -> dict[str, Any]:
    command, *args = nodetools.server_everything_stdio()
    return {"stdio": {"command": command, "args": args}}


def statuses(checks: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    return {scenario: nodetools.scenario_status(scenario_checks) for scenario, scenario_checks in checks.items()}


def check_statuses(checks: dict[str, list[dict[str, Any]]]) -> dict[str, list[tuple[str, str]]]:
    """Each scenario's checks as (id, status), in order: finer than the scenario's result."""
    return {scenario: [(c["id"], c["status"]) for c in scenario_checks] for scenario, scenario_checks in checks.items()}


# -- the conformance suite ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def direct() -> dict[str, list[dict[str, Any]]]:
    with nodetools.everything_http() as url:
        return nodetools.conformance_checks(url, suite=SUITE)


@pytest.fixture(scope="module", params=["stdio", "http"])
def through_gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, list[dict[str, Any]]]]:
    # An HTTP connector needs server-everything running on its own; a stdio one is spawned by the gateway.
    with nodetools.everything_http() if request.param == "http" else nullcontext() as upstream_url:
        connector = {"http": {"url": upstream_url}} if request.param == "http" else stdio_connector()
        config, tokens = everything_gateway(tmp_path_factory.mktemp(f"conformance-{request.param}"), connector)
        with (
            running(config) as gateway,
            nodetools.header_proxy(gateway.port, f"Authorization: Bearer {tokens['agent']}") as port,
        ):
            yield nodetools.conformance_checks(f"http://127.0.0.1:{port}/mcp", suite=SUITE)


def test_the_gateway_changes_no_conformance_result(
    direct: dict[str, list[dict[str, Any]]], through_gateway: dict[str, list[dict[str, Any]]]
) -> None:
    direct_results, gateway_results = statuses(direct), statuses(through_gateway)
    assert len(direct_results) >= 32 and direct_results.keys() == gateway_results.keys()
    assert {s for s, result in direct_results.items() if result == "pass"} >= PASSING
    differing = {
        s: (direct_results[s], gateway_results[s]) for s in direct_results if direct_results[s] != gateway_results[s]
    }
    assert differing == KNOWN_DIFFERENCES
    # Where the results agree, so does every check inside them.
    same = [s for s in direct_results if s not in KNOWN_DIFFERENCES]
    assert {s: check_statuses(direct)[s] for s in same} == {s: check_statuses(through_gateway)[s] for s in same}


# -- what the suite cannot reach: progress, logs, resource updates, sampling, elicitation -------


@dataclass
class Observed:
    """What a client saw while exercising one server-everything session."""

    progress: list[tuple[float, float | None]] = field(default_factory=list)
    logs: list[types.LoggingMessageNotificationParams] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    sampled: list[types.CreateMessageRequestParams] = field(default_factory=list)
    elicited: list[Any] = field(default_factory=list)
    got_log: anyio.Event = field(default_factory=anyio.Event)
    got_update: anyio.Event = field(default_factory=anyio.Event)

    def callbacks(self) -> dict[str, Any]:
        async def on_log(params: types.LoggingMessageNotificationParams) -> None:
            self.logs.append(params)
            self.got_log.set()

        async def on_message(message: Any) -> None:
            if isinstance(message, types.ResourceUpdatedNotification):
                self.updated.append(str(message.params.uri))
                self.got_update.set()

        async def on_sampling(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
            self.sampled.append(params)
            content = types.TextContent(type="text", text="canned answer from the agent's model")
            return types.CreateMessageResult(role="assistant", content=content, model="test-model")

        async def on_elicitation(context: Any, params: Any) -> types.ElicitResult:
            self.elicited.append(params)
            return types.ElicitResult(action="decline")

        return {
            "logging_callback": on_log,
            "message_handler": on_message,
            "sampling_callback": on_sampling,
            "elicitation_callback": on_elicitation,
        }


async def exercise(client: Client, seen: Observed) -> dict[str, Any]:
    """Use each forwarding path once, through server-everything's own tools; returns what the client saw."""

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.progress.append((progress, total))

    outcome: dict[str, Any] = {}
    operation = await client.call_tool(
        "trigger-long-running-operation", {"duration": 0.3, "steps": 3}, progress_callback=on_progress
    )
    outcome["progress"] = (operation.is_error, seen.progress)
    sampling = await client.call_tool("trigger-sampling-request", {"prompt": "hello", "maxTokens": 10})
    outcome["sampling"] = (sampling.is_error, "canned answer" in _text(sampling), len(seen.sampled))
    elicitation = await client.call_tool("trigger-elicitation-request", {})
    outcome["elicitation"] = (elicitation.is_error, "declined" in _text(elicitation), len(seen.elicited))

    await client.session.set_logging_level("debug")
    await client.call_tool("toggle-simulated-logging", {})
    with anyio.fail_after(15):
        await seen.got_log.wait()
    outcome["logs"] = bool(seen.logs)

    uri = (await client.list_resources()).resources[0].uri
    await client.session.subscribe_resource(uri)
    await client.call_tool("toggle-subscriber-updates", {})
    with anyio.fail_after(15):
        await seen.got_update.wait()
    outcome["updated"] = uri in seen.updated
    await client.session.unsubscribe_resource(uri)
    return outcome


def _text(result: types.CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, types.TextContent))


@pytest.fixture(scope="module")
def everything_stdio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, dict[str, str]]]:
    config, tokens = everything_gateway(tmp_path_factory.mktemp("forwarding"), stdio_connector())
    with running(config) as gateway:
        yield gateway, tokens


async def test_forwarding_matches_the_server_directly(everything_stdio: tuple[GatewayProcess, dict[str, str]]) -> None:
    gateway, tokens = everything_stdio
    with nodetools.everything_http() as url:
        direct_seen = Observed()
        async with connect(url, None, "legacy", **direct_seen.callbacks()) as client:
            direct_outcome = await exercise(client, direct_seen)

    seen, outsider_seen = Observed(), Observed()
    async with (
        connect(gateway.url, tokens["agent"], "legacy", **seen.callbacks()) as client,
        connect(gateway.url, tokens["outsider"], "legacy", **outsider_seen.callbacks()) as outsider,
    ):
        await outsider.session.set_logging_level("debug")  # it wants every log message, of its own enclave
        outcome = await exercise(client, seen)
        await outsider.list_tools()  # a round trip after the relays: anything sent to it has arrived by now

    assert direct_outcome == {
        "progress": (False, [(1, 3), (2, 3), (3, 3)]),
        "sampling": (False, True, 1),
        "elicitation": (False, True, 1),
        "logs": True,
        "updated": True,
    }
    assert outcome == direct_outcome
    # An enclave that does not use the connector gets none of its log messages or updates.
    assert outsider_seen.logs == [] and outsider_seen.updated == []


async def test_a_pushed_request_is_refused_when_it_cannot_be_attributed(
    everything_stdio: tuple[GatewayProcess, dict[str, str]],
) -> None:
    """While two agent requests are in flight on the shared upstream session, a sampling request it pushes
    could belong to either: it reaches neither agent, and the upstream's tool reports the refusal."""
    gateway, tokens = everything_stdio
    started = anyio.Event()
    first, second = Observed(), Observed()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        started.set()

    async with (
        connect(gateway.url, tokens["agent"], "legacy", **first.callbacks()) as busy,
        connect(gateway.url, tokens["agent"], "legacy", **second.callbacks()) as client,
        anyio.create_task_group() as tg,
    ):
        arguments = {"duration": 30, "steps": 30}
        tg.start_soon(
            lambda: busy.call_tool("trigger-long-running-operation", arguments, progress_callback=on_progress)
        )
        with anyio.fail_after(15):
            await started.wait()  # the long operation is in flight upstream
        result = await client.call_tool("trigger-sampling-request", {"prompt": "hello", "maxTokens": 10})
        tg.cancel_scope.cancel()  # cancels the long operation (and, through the gateway, upstream)
    assert result.is_error
    assert "sampling/createMessage refused by the gateway: several requests" in _text(result)
    assert first.sampled == second.sampled == []


async def test_a_2026_client_cannot_be_pushed_to(everything_stdio: tuple[GatewayProcess, dict[str, str]]) -> None:
    """A 2026-07-28 client has no back-channel for a request pushed by a 2025-era upstream: it gets the
    upstream's tool error, with the reason, and is never asked."""
    gateway, tokens = everything_stdio
    seen = Observed()
    async with connect(gateway.url, tokens["agent"], "2026-07-28", **seen.callbacks()) as client:
        result = await client.call_tool("trigger-sampling-request", {"prompt": "hello", "maxTokens": 10})
    assert result.is_error
    assert "sampling/createMessage" in _text(result)
    assert seen.sampled == []


@pytest.mark.parametrize("uri", ["design://catalogue", "design://parts/P-100"])
def test_subscribing_outside_the_view_is_like_subscribing_to_nothing(topology: Topology, uri: str) -> None:
    """resources/subscribe takes the enclave view like resources/read: b1's enclave does not expose e1's design
    resources, so it gets the reply of a URI that exists nowhere, and the upstream never hears of it."""
    token = topology.tokens["b1"]
    session = legacy_session(topology.url, token)
    before = topology.logs["design"].count()

    def subscribe(target: str) -> dict[str, Any]:
        body = {"jsonrpc": "2.0", "id": 7, "method": "resources/subscribe", "params": {"uri": target}}
        return _json_rpc(raw_post(topology.url, body, token, **session))

    hidden, nowhere = subscribe(uri), subscribe("nowhere://x")
    assert hidden["error"]["code"] == -32002
    assert json.dumps(hidden).replace(uri, "URI") == json.dumps(nowhere).replace("nowhere://x", "URI")
    assert topology.logs["design"].count() == before


def _json_rpc(response: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC message of a reply sent as JSON or as an SSE stream."""
    assert response.status_code == 200, response.text
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.json()
    events = [line[len("data:") :].strip() for line in response.text.splitlines() if line.startswith("data:")]
    return next(json.loads(data) for data in events if data)
