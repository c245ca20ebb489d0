"""Shared plumbing for the example upstream servers.

* argv: serve stdio by default, or Streamable HTTP on `127.0.0.1:PORT/mcp` with `--http PORT`.
* `UPSTREAM_LOG=<path>`: append `{"method": ..., "params": ..., "id": ...}` as one JSON line per inbound
  request or notification (`id` null), flushed at once, so tests can count what reached the upstream.
* `OTEL_EXPORTER_OTLP_ENDPOINT`: export the SDK's SERVER spans over OTLP/HTTP, with the service name
  from `OTEL_SERVICE_NAME` or else the server name.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mcp.server import MCPServer
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


class MessageLog:
    """Server middleware that appends every inbound message to a JSON-lines file before handling it."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the life of the process

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        self._file.write(json.dumps({"method": ctx.method, "params": ctx.params, "id": ctx.request_id}) + "\n")
        self._file.flush()
        return await call_next(ctx)


def install_tracing(service_name: str) -> TracerProvider | None:
    """Install a global OTLP/HTTP tracer provider if `OTEL_EXPORTER_OTLP_ENDPOINT` is set."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    # Imported lazily: the SDK and exporter only cost start-up time when tracing is on.
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def parse_port(argv: Sequence[str] | None = None) -> int | None:
    """Return the `--http PORT` value, or `None` for stdio."""
    parser = argparse.ArgumentParser(description="Serve over stdio, or over Streamable HTTP with --http PORT.")
    parser.add_argument("--http", type=int, metavar="PORT", help="serve http://127.0.0.1:PORT/mcp instead of stdio")
    return parser.parse_args(argv).http


def serve(server: MCPServer, port: int | None) -> None:
    """Run `server` on stdio (`port is None`) or Streamable HTTP, with the message log and tracing."""
    if path := os.environ.get("UPSTREAM_LOG"):
        server.middleware.insert(0, MessageLog(path))
    provider = install_tracing(server.name)
    try:
        if port is None:
            server.run()
        else:
            server.run("streamable-http", host="127.0.0.1", port=port, streamable_http_path="/mcp")
    finally:
        if provider is not None:
            provider.shutdown()


def main(server: MCPServer, argv: Sequence[str] | None = None) -> None:
    """Command-line entry point shared by the example servers."""
    serve(server, parse_port(argv))
