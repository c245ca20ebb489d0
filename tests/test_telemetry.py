"""OpenTelemetry end to end: a real OTLP/HTTP receiver on loopback, a gateway exporting to it, an agent with its
own tracer and an upstream (design_db) exporting to the same receiver.

One trace spans agent -> gateway SERVER span -> gateway CLIENT span -> upstream SERVER span; denied calls (not
in the enclave, or into a chamber without a grant) have spans and reach no upstream; metrics count calls,
denials and latency; buffered telemetry is exported when the gateway stops; nothing secret and no argument is
ever exported by the gateway (the upstreams' own telemetry is theirs, like their inbound logs).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Tracer, format_span_id, format_trace_id

from gateway.peers import agents_socket
from gateway.redact import variants
from gateway.telemetry import exporters
from tests.conftest import Topology, serve_topology
from tests.harness import ERAS, EXAMPLES, ConfigDir, UpstreamLog, canary, connect, python_server, running
from tests.otlp_receiver import OTLPReceiver, ReceivedSpan

pytestmark = pytest.mark.anyio

GATEWAY = "enclave-gateway"
UPSTREAM = "design-db"
# The OpenTelemetry MCP semantic conventions' buckets for mcp.server.operation.duration.
SEMCONV_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
AUTHORIZATION_REQUIRED = -32003  # a chamber's answer to a call without a grant or approval
EXPORT_ARGUMENTS = {"part_id": "P-100", "format": "step"}
COLLECTOR_HEADER, COLLECTOR_KEY = "x-collector-key", "collector-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver().running() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, receiver: OTLPReceiver) -> Iterator[Topology]:
    """The standard topology, its gateway exporting traces and metrics to the receiver every few milliseconds."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_HEADERS": f"{COLLECTOR_HEADER}={COLLECTOR_KEY}",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
    }
    with serve_topology(tmp_path_factory.mktemp("traced"), env) as topology:
        yield topology


@pytest.fixture(scope="module")
def agent_tracer() -> Tracer:
    """The agent's own tracer provider. Not the process-global one: that can be set only once per process, and
    would make every later test's MCP client send trace context."""
    return TracerProvider(resource=Resource.create({"service.name": "test-agent"})).get_tracer("test-agent")


@dataclass
class AgentCall:
    trace_id: str
    span_id: str
    protocol_version: str | None
    outcome: Any  # the result, or the MCPError


async def traced_call(
    tracer: Tracer, url: str, token: str, mode: str, request: Callable[[Client], Awaitable[Any]]
) -> AgentCall:
    """Make one request inside a span of the agent's; the MCP client carries its context in `_meta`."""
    async with connect(url, token, mode) as client:
        await client.list_tools()  # the enclave view is listed, so a 2026-era call can take the fast path
        protocol_version = client.protocol_version
        with tracer.start_as_current_span("agent", kind=SpanKind.CLIENT) as span:
            try:
                outcome = await request(client)
            except MCPError as exc:
                outcome = exc
    context = span.get_span_context()
    return AgentCall(format_trace_id(context.trace_id), format_span_id(context.span_id), protocol_version, outcome)


def one(spans: list[ReceivedSpan], service: str, kind: str, name: str | None = None) -> ReceivedSpan:
    matching = [s for s in spans if s.service == service and s.kind == kind and name in (None, s.name)]
    assert len(matching) == 1, matching
    return matching[0]


async def server_span(receiver: OTLPReceiver, trace_id: str) -> ReceivedSpan:
    """The gateway's SERVER span in the agent's trace (it ends last, so the gateway's CLIENT spans are in)."""
    spans = await receiver.wait_for(
        lambda: [s for s in receiver.trace(trace_id) if s.service == GATEWAY and s.kind == "server"],
        f"the gateway's SERVER span in trace {trace_id}",
    )
    return one(spans, GATEWAY, "server")


@pytest.mark.parametrize("mode", ERAS)
async def test_allowed_call_is_one_trace_from_agent_through_gateway_to_upstream(
    traced: Topology, receiver: OTLPReceiver, agent_tracer: Tracer, mode: str
) -> None:
    call = await traced_call(
        agent_tracer,
        traced.url,
        traced.tokens["a1"],
        mode,
        lambda client: client.call_tool("get_part", {"part_id": "P-100"}),
    )
    assert not call.outcome.is_error

    await server_span(receiver, call.trace_id)
    await receiver.wait_for(
        lambda: [s for s in receiver.trace(call.trace_id) if s.service == UPSTREAM], "the upstream's span"
    )
    spans = receiver.trace(call.trace_id)
    server, client = one(spans, GATEWAY, "server"), one(spans, GATEWAY, "client")
    upstream = one(spans, UPSTREAM, "server")
    assert (server.parent_span_id, client.parent_span_id, upstream.parent_span_id) == (
        call.span_id,
        server.span_id,
        client.span_id,
    )
    assert server.name == client.name == upstream.name == "tools/call get_part"
    # The fast path serves this call in both eras (the SDK's client declares nothing it could be asked mid-call),
    # and opens the SERVER span itself; the SDK's middleware opens it for the requests the SDK's server serves.
    assert server.scope == "enclave-gateway"
    assert (
        server.attributes.items()
        >= {
            "mcp.method.name": "tools/call",
            "gen_ai.tool.name": "get_part",
            "gen_ai.operation.name": "execute_tool",
            "mcp.protocol.version": call.protocol_version,
            "network.transport": "tcp",
            "enclave.name": "e1",
            "enclave.agent": "a1",
            "enclave.connector": "design",
            "enclave.decision": "allow",
            "enclave.outcome": "ok",
        }.items()
    )
    assert server.attributes["jsonrpc.request.id"]
    assert ("mcp.session.id" in server.attributes) == (mode == "legacy")  # 2026-era requests have no session
    assert "error.type" not in server.attributes and server.status_code == "STATUS_CODE_UNSET"
    assert (
        client.attributes.items()
        >= {
            "mcp.method.name": "tools/call",
            "gen_ai.tool.name": "get_part",
            "enclave.connector": "design",
            "network.transport": "pipe",
        }.items()
    )
    assert client.attributes["jsonrpc.request.id"]
    assert not [s for s in receiver.spans if s.service == GATEWAY and s.name.startswith("MCP send")]


@pytest.mark.parametrize("mode", ERAS)
async def test_denied_call_has_a_span_and_no_upstream_hop(
    traced: Topology, receiver: OTLPReceiver, agent_tracer: Tracer, mode: str
) -> None:
    before = traced.logs["weather"].count()
    call = await traced_call(
        agent_tracer,
        traced.url,
        traced.tokens["a1"],
        mode,
        lambda client: client.call_tool("wx_forecast", {"city": "Oslo"}),
    )
    assert isinstance(call.outcome, MCPError) and call.outcome.error.code == -32602

    server = await server_span(receiver, call.trace_id)
    assert server.parent_span_id == call.span_id
    assert server.name == "tools/call wx_forecast"
    assert (
        server.attributes.items()
        >= {
            "mcp.method.name": "tools/call",
            "gen_ai.tool.name": "wx_forecast",
            "enclave.name": "e1",
            "enclave.agent": "a1",
            "enclave.decision": "deny",
            "enclave.reason": "not_in_enclave",
            "error.type": "-32602",
            "rpc.response.status_code": "-32602",
        }.items()
    )
    assert "enclave.connector" not in server.attributes
    assert server.status_code == "STATUS_CODE_ERROR"
    assert receiver.trace(call.trace_id) == [server]  # no CLIENT span: no upstream was asked
    assert traced.logs["weather"].count() == before


async def test_a_call_on_the_agents_unix_socket_says_so(
    traced: Topology, receiver: OTLPReceiver, agent_tracer: Tracer
) -> None:
    socket = agents_socket(traced.config.state_dir)
    headers = {"Authorization": f"Bearer {traced.tokens['a1']}"}
    async with (
        httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=str(socket)), headers=headers, timeout=30) as http,
        Client(streamable_http_client(traced.url, http_client=http), mode="2026-07-28", cache=None) as client,
    ):
        await client.list_tools()  # else the client lists inside the traced call, to learn Mcp-Param headers
        with agent_tracer.start_as_current_span("agent", kind=SpanKind.CLIENT) as span:
            assert not (await client.call_tool("search_parts", {"query": "bolt"})).is_error
    server = await server_span(receiver, format_trace_id(span.get_span_context().trace_id))
    assert server.attributes["network.transport"] == "unix"
    values = [str(value) for value in server.attributes.values()]  # the peer (this process) is not described
    assert str(os.getpid()) not in values and not [value for value in values if sys.executable in value]


async def test_audit_rows_carry_the_trace_and_span_of_their_request(
    traced: Topology, receiver: OTLPReceiver, agent_tracer: Tracer
) -> None:
    allowed = await traced_call(
        agent_tracer, traced.url, traced.tokens["a2"], "legacy", lambda c: c.call_tool("get_part", {"part_id": "P-101"})
    )
    denied = await traced_call(
        agent_tracer, traced.url, traced.tokens["a2"], "legacy", lambda c: c.call_tool("wx_whoami", {})
    )
    spans = {call.trace_id: await server_span(receiver, call.trace_id) for call in (allowed, denied)}
    rows = json.loads(traced.config.cli("audit", "--agent", "a2", "--json").stdout)
    linked = {row["trace_id"]: (row["span_id"], row["decision"]) for row in rows if row["trace_id"] in spans}
    assert linked == {
        allowed.trace_id: (spans[allowed.trace_id].span_id, "allow"),
        denied.trace_id: (spans[denied.trace_id].span_id, "deny"),
    }


async def test_metrics_count_calls_denials_and_latency(
    traced: Topology, receiver: OTLPReceiver, agent_tracer: Tracer
) -> None:
    allowed = {"mcp.method.name": "tools/call", "enclave.name": "e1", "enclave.connector": "design"}
    allowed |= {"gen_ai.tool.name": "search_parts", "enclave.decision": "allow"}
    await traced_call(
        agent_tracer, traced.url, traced.tokens["a2"], "legacy", lambda c: c.call_tool("search_parts", {"query": "nut"})
    )
    await traced_call(
        agent_tracer, traced.url, traced.tokens["a2"], "legacy", lambda c: c.call_tool("no_such_tool", {})
    )

    def point(name: str, **attributes: str) -> Any:
        points = [p for p in receiver.points if p.service == GATEWAY and p.name == name]
        return next((p for p in points if p.attributes.items() >= attributes.items()), None)

    calls = await receiver.wait_for(lambda: point("enclave.gateway.calls", **allowed), "the calls counter")
    assert calls.unit == "{call}" and calls.value >= 1
    duration = await receiver.wait_for(
        lambda: point("mcp.server.operation.duration", **allowed), "the latency histogram"
    )
    assert duration.unit == "s" and duration.bounds == SEMCONV_BUCKETS and duration.value >= 1
    denied = {"enclave.name": "e1", "enclave.decision": "deny", "enclave.reason": "not_in_enclave"}
    denials = await receiver.wait_for(lambda: point("enclave.gateway.denials", **denied), "the denials counter")
    assert denials.value >= 1
    # A name the enclave does not have is the agent's free text: it never becomes a metric attribute.
    assert not [p for p in receiver.points if p.attributes.get("gen_ai.tool.name") == "no_such_tool"]


async def test_no_secret_token_or_argument_is_ever_exported(
    traced: Topology, receiver: OTLPReceiver, agent_tracer: Tracer
) -> None:
    marker = "argmarker" + secrets.token_hex(8)
    requests: list[Callable[[Client], Awaitable[Any]]] = [
        lambda c: c.call_tool("echo_secret_encodings", {}),  # the upstream returns the credential, encoded 4 ways
        lambda c: c.call_tool("echo_env", {}),
        # The upstream's JSON-RPC error quotes the argument: the SDK copies it into span status descriptions.
        lambda c: c.get_prompt("review_part", {"part_id": traced.canary}),
        lambda c: c.call_tool("search_parts", {"query": marker}),
        lambda c: c.call_tool("search_parts", {"query": "x", "limit": marker}),  # denied, the error quotes it
    ]
    calls = [
        await traced_call(agent_tracer, traced.url, traced.tokens["a1"], "legacy", request) for request in requests
    ]
    servers = [await server_span(receiver, call.trace_id) for call in calls]
    assert [s.attributes["enclave.decision"] for s in servers] == ["allow"] * 4 + ["deny"]
    prompt_hop = one(receiver.trace(calls[2].trace_id), GATEWAY, "client", "prompts/get review_part")
    assert prompt_hop.attributes["error.type"] == "-32602" and prompt_hop.status_message == ""

    forbidden = {*variants(traced.canary), marker, *traced.tokens.values()}
    exports = [export for export in receiver.exports if GATEWAY in export.services]
    assert {export.signal for export in exports} == {"traces", "metrics"}
    for export in exports:
        assert not [form for form in forbidden if form.encode() in export.body], export.signal
    texts = [
        str(value)
        for span in receiver.spans
        if span.service == GATEWAY
        for value in (span.name, span.status_message, *span.attributes.values())
    ]
    texts += [str(value) for p in receiver.points if p.service == GATEWAY for value in p.attributes.values()]
    assert not [text for text in texts if any(form in text for form in forbidden)]


async def test_stdio_upstreams_get_the_otel_endpoint_but_not_the_collector_headers(
    traced: Topology, receiver: OTLPReceiver, agent_tracer: Tracer
) -> None:
    call = await traced_call(
        agent_tracer, traced.url, traced.tokens["a1"], "legacy", lambda c: c.call_tool("echo_env", {})
    )
    environment = dict(line.split("=", 1) for line in call.outcome.content[0].text.splitlines() if "=" in line)
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == receiver.url
    assert environment["OTEL_BSP_SCHEDULE_DELAY"] == "50"
    assert not {"OTEL_EXPORTER_OTLP_HEADERS", "OTEL_SERVICE_NAME", "OTEL_TRACES_EXPORTER"} & environment.keys()
    await server_span(receiver, call.trace_id)
    gateway_exports = [export for export in receiver.exports if GATEWAY in export.services]
    assert all(export.headers.get(COLLECTOR_HEADER) == COLLECTOR_KEY for export in gateway_exports)
    upstream_exports = [export for export in receiver.exports if UPSTREAM in export.services]
    assert upstream_exports and not [export for export in upstream_exports if COLLECTOR_HEADER in export.headers]


def design_enclave(root: Path) -> tuple[ConfigDir, UpstreamLog]:
    """A gateway of its own: enclave e1 (agent a1) with the design database, `export_design` in chamber vault."""
    log = UpstreamLog(root / "upstream-design.jsonl")
    config = (
        ConfigDir(root)
        .secret("design-token", canary())
        .connector(
            "design",
            python_server(EXAMPLES / "design_db.py", UPSTREAM_LOG=str(log.path), DESIGN_TOKEN="${secret:design-token}"),
        )
        .enclave(
            "e1",
            ["a1"],
            {"design": {"tools": ["get_part", "export_design"]}},
            chambers={"vault": {"tools": ["export_design"]}},
        )
    )
    return config, log


async def test_chamber_denial_has_a_span_and_no_upstream_hop(
    tmp_path: Path, receiver: OTLPReceiver, agent_tracer: Tracer
) -> None:
    config, log = design_enclave(tmp_path)
    token = config.mint("a1", "e1")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    with running(config, env) as gateway:
        call = await traced_call(
            agent_tracer, gateway.url, token, "legacy", lambda c: c.call_tool("export_design", EXPORT_ARGUMENTS)
        )
        server = await server_span(receiver, call.trace_id)
    assert isinstance(call.outcome, MCPError) and call.outcome.error.code == AUTHORIZATION_REQUIRED

    assert server.parent_span_id == call.span_id
    assert server.name == "tools/call export_design"
    expected = {"enclave.name": "e1", "enclave.agent": "a1", "enclave.connector": "design"}
    expected |= {"enclave.chamber": "vault", "enclave.decision": "deny", "enclave.reason": "no_grant"}
    assert server.attributes.items() >= {**expected, "error.type": str(AUTHORIZATION_REQUIRED)}.items()
    assert server.status_code == "STATUS_CODE_ERROR"
    assert receiver.trace(call.trace_id) == [server]  # no CLIENT span: the upstream was not asked
    assert log.calls() == []


async def test_buffered_telemetry_is_exported_when_the_gateway_stops(tmp_path: Path, receiver: OTLPReceiver) -> None:
    config, _ = design_enclave(tmp_path)
    token = config.mint("a1", "e1")
    service = "gateway-" + secrets.token_hex(4)
    never = "600000"  # ms: nothing is exported on a timer during the test
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": never,
        "OTEL_METRIC_EXPORT_INTERVAL": never,
    }
    with running(config, env) as gateway:
        async with connect(gateway.url, token) as client:
            await client.call_tool("get_part", {"part_id": "P-100"})
        assert not [export for export in receiver.exports if service in export.services]
        gateway.stop()  # SIGTERM, as a service manager would
    spans = await receiver.wait_for(
        lambda: [s for s in receiver.spans if s.service == service and s.name == "tools/call get_part"],
        "spans flushed at exit",
        timeout=5,
    )
    assert {span.kind for span in spans} == {"server", "client"}
    await receiver.wait_for(
        lambda: [p for p in receiver.points if p.service == service and p.name == "enclave.gateway.calls"],
        "metrics flushed at exit",
        timeout=5,
    )


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, set()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, {"otlp"}),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, {"otlp"}),
        ({"OTEL_TRACES_EXPORTER": "console"}, {"console"}),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, {"otlp", "console"}),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, set()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, set()),
    ],
)
def test_traces_are_exported_only_when_the_environment_asks(environ: dict[str, str], expected: set[str]) -> None:
    assert exporters("TRACES", environ) == expected
