"""A real OTLP/HTTP receiver on loopback: what an OpenTelemetry collector would receive, decoded.

Accepts `POST /v1/traces` and `POST /v1/metrics` (protobuf, optionally gzip), keeps every request body as it
arrived (for leak scans over the raw bytes) and the decoded spans and metric points (for assertions). Tests
wait on it with `wait_for`, polling with a deadline.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import anyio
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status as StatusProto

T = TypeVar("T")

SPAN_KINDS = {
    SpanProto.SPAN_KIND_INTERNAL: "internal",
    SpanProto.SPAN_KIND_SERVER: "server",
    SpanProto.SPAN_KIND_CLIENT: "client",
    SpanProto.SPAN_KIND_PRODUCER: "producer",
    SpanProto.SPAN_KIND_CONSUMER: "consumer",
}


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(value_of(item) for item in value.array_value.values)
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def attributes_of(pairs: Any) -> dict[str, Any]:
    return {pair.key: value_of(pair.value) for pair in pairs}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    scope: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: str
    status_message: str


@dataclass(frozen=True)
class MetricPoint:
    service: str
    name: str
    unit: str
    attributes: dict[str, Any]
    value: float  # a sum's value, or a histogram's count
    bounds: tuple[float, ...] = ()


@dataclass(frozen=True)
class Export:
    """One export request as received: its signal, raw body, the services it speaks for and its headers."""

    signal: str
    body: bytes
    services: set[str]
    headers: dict[str, str]


def _service(resource_attributes: Any) -> str:
    return str(attributes_of(resource_attributes).get("service.name", ""))


class OTLPReceiver:
    def __init__(self) -> None:
        self.exports: list[Export] = []
        self.spans: list[ReceivedSpan] = []
        self.points: list[MetricPoint] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                headers = {name.lower(): value for name, value in self.headers.items()}
                if self.path == "/v1/traces":
                    reply = receiver._traces(body, headers)
                elif self.path == "/v1/metrics":
                    reply = receiver._metrics(body, headers)
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                with suppress(ConnectionError):  # an exporting process that exits does not wait for the reply
                    self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def _traces(self, body: bytes, headers: dict[str, str]) -> bytes:
        request = ExportTraceServiceRequest.FromString(body)
        spans = [
            self._span(_service(resources.resource.attributes), scope.scope.name, span)
            for resources in request.resource_spans
            for scope in resources.scope_spans
            for span in scope.spans
        ]
        self._keep(Export("traces", body, {span.service for span in spans}, headers), spans, self.spans)
        return ExportTraceServiceResponse().SerializeToString()

    def _keep(self, export: Export, items: list[Any], into: list[Any]) -> None:
        with self._lock:
            self.exports.append(export)
            into.extend(items)

    @staticmethod
    def _span(service: str, scope: str, span: SpanProto) -> ReceivedSpan:
        return ReceivedSpan(
            service=service,
            scope=scope,
            name=span.name,
            kind=SPAN_KINDS.get(span.kind, "unspecified"),
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_span_id=span.parent_span_id.hex(),
            attributes=attributes_of(span.attributes),
            status_code=StatusProto.StatusCode.Name(span.status.code),
            status_message=span.status.message,
        )

    def _metrics(self, body: bytes, headers: dict[str, str]) -> bytes:
        request = ExportMetricsServiceRequest.FromString(body)
        points = [
            point
            for resources in request.resource_metrics
            for scope in resources.scope_metrics
            for metric in scope.metrics
            for point in self._points(_service(resources.resource.attributes), metric)
        ]
        self._keep(Export("metrics", body, {point.service for point in points}, headers), points, self.points)
        return ExportMetricsServiceResponse().SerializeToString()

    @staticmethod
    def _points(service: str, metric: Any) -> list[MetricPoint]:
        kind = metric.WhichOneof("data")
        if kind == "sum":
            return [
                MetricPoint(service, metric.name, metric.unit, attributes_of(p.attributes), p.as_int or p.as_double)
                for p in metric.sum.data_points
            ]
        if kind == "histogram":
            return [
                MetricPoint(
                    service, metric.name, metric.unit, attributes_of(p.attributes), p.count, tuple(p.explicit_bounds)
                )
                for p in metric.histogram.data_points
            ]
        return []

    async def wait_for(self, find: Callable[[], T | None], what: str, timeout: float = 15) -> T:
        """Poll `find` until it returns something truthy, or fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = find()
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; received spans: {self.span_names()}")
            await anyio.sleep(0.05)

    def span_names(self) -> list[tuple[str, str]]:
        return [(span.service, span.name) for span in self.spans]

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.trace_id == trace_id]

    @contextmanager
    def running(self) -> Iterator[OTLPReceiver]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join()
