"""A traced demo agent: calls one tool through the gateway and exports its own spans, so that the trace in Jaeger
starts at the agent (the MCP client carries the trace context to the gateway in `params._meta`).

    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 ENCLAVE_TOKEN=encl_... \\
        .venv/bin/python examples/jaeger/agent.py search_parts query=bolt

Prints the tool's result and the trace id (Jaeger UI: search by trace id).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from opentelemetry import trace
from opentelemetry.trace import format_trace_id

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "servers"))
from _common import install_tracing

GATEWAY_URL = os.environ.get("ENCLAVE_URL", "http://127.0.0.1:8765/mcp")


async def call(tool: str, arguments: dict[str, str]) -> None:
    headers = {"Authorization": f"Bearer {os.environ['ENCLAVE_TOKEN']}"}
    tracer = trace.get_tracer("demo-agent")
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(GATEWAY_URL, http_client=http)) as client,
    ):
        with tracer.start_as_current_span(f"demo-agent uses {tool}") as span:
            result = await client.call_tool(tool, arguments)
    for block in result.content:
        print(getattr(block, "text", block))
    print(f"trace id: {format_trace_id(span.get_span_context().trace_id)}")


def main() -> None:
    if len(sys.argv) < 2 or "ENCLAVE_TOKEN" not in os.environ:
        sys.exit("usage: ENCLAVE_TOKEN=encl_... agent.py TOOL [NAME=VALUE ...]  (see the module docstring)")
    tool, arguments = sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:])
    provider = install_tracing("demo-agent")
    try:
        anyio.run(call, tool, arguments)
    finally:
        if provider is not None:
            provider.shutdown()


if __name__ == "__main__":
    main()
