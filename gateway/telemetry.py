"""OpenTelemetry traces and metrics, configured by the standard `OTEL_*` environment variables.

Off unless the environment names an exporter (`OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` = `otlp` or
`console`, or an `OTEL_EXPORTER_OTLP_*ENDPOINT`): then nothing is installed, the MCP SDK's spans go to the
API's no-op tracer and no recorder runs.

Where the spans come from. The MCP SDK already opens a SERVER span for every inbound message, continuing the
agent's trace from `params._meta`, and a CLIENT span for every upstream request, injecting its own context into
the upstream's `params._meta`. The gateway builds on those rather than adding spans, so each agent request is
one SERVER span with one CLIENT child per upstream hop:

* `Telemetry.record` enriches the SERVER span (still current while the pipeline records the invocation) with
  the session, the transport, the gateway's decision (`enclave.*`) and the error. The SDK has set
  `mcp.method.name`, `gen_ai.tool.name`/`gen_ai.prompt.name`, `jsonrpc.request.id` and `mcp.protocol.version`.
* The fast path (stateless-era `tools/call` served without the SDK's server) opens the same SERVER span itself
  with `server_span`, and the same CLIENT span for its upstream hop (the raw stdio lane) with `upstream_span`.
* `UpstreamSpans` renames the SDK's CLIENT span from `MCP send tools/call x` to the semantic-convention name
  `tools/call x` as it starts, and says which connector it goes to. A CLIENT span of our own around the
  upstream call would not replace the SDK's: that one would still start inside ours and its context is what
  the SDK injects into `_meta`, so every hop would show two CLIENT spans.

Nothing in a span comes from a tool's arguments or results. Span status descriptions are dropped on export
(the SDK copies the JSON-RPC error message there, which can quote an argument or whatever an upstream wrote;
`error.type` and `enclave.reason` say what went wrong), and every exported string passes the redactor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mcp import MCPError
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode, format_span_id, format_trace_id

from gateway import __version__
from gateway.config import StdioTarget
from gateway.invocation import Invocation
from gateway.redact import Redactor

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider

    from gateway.upstream import Upstream

logger = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = INSTRUMENTATION_SCOPE = "enclave-gateway"
SUPPORTED_EXPORTERS = {"otlp", "console"}
SDK_SCOPE = "mcp-python-sdk"
SDK_CLIENT_SPAN_PREFIX = "MCP send "
# The semantic conventions' buckets for mcp.*.operation.duration (seconds).
DURATION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
# Passed on to stdio upstreams so that they export to the same collector. Not passed on: headers (they may hold
# the collector's credentials), client keys and certificates, the service name and resource attributes (they
# name the gateway, not the upstream), and the exporter choice (`console` writes to a stdio server's stdout,
# which is its MCP channel).
FORWARDED_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_PROPAGATORS",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_METRIC_EXPORT_INTERVAL",
)

_tracer = trace.get_tracer(INSTRUMENTATION_SCOPE, __version__)
_installed = False  # whether `Telemetry.from_environment` installed a tracer provider (checked per request)

current_upstream: ContextVar[Upstream | None] = ContextVar("current_upstream", default=None)
"""The upstream that requests sent from this task go to (set by `Upstream.request`), for the CLIENT span."""


def hold_upstream_session(upstream: Upstream) -> None:
    """Called first in the task that holds an upstream's session. The session outlives the request that opened
    it and serves every enclave: its own spans (handshake, listen stream) start traces of their own rather
    than joining that request's, and name the connector. (The task runs in its own copy of the context.)"""
    otel_context.attach(otel_context.Context())
    current_upstream.set(upstream)


def forwarded_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The gateway's own non-secret OTel settings, for a stdio upstream's environment."""
    return {name: environ[name] for name in FORWARDED_VARIABLES if name in environ}


def current_span_ids() -> tuple[str | None, str | None]:
    """Trace and span id of the span this request runs in, if the gateway records it (for the audit log)."""
    span = trace.get_current_span() if _installed else None
    if span is None or not span.is_recording():
        return None, None
    context = span.get_span_context()
    return format_trace_id(context.trace_id), format_span_id(context.span_id)


def server_span(invocation: Invocation, meta: Any) -> AbstractContextManager[object]:
    """For a request served without the SDK's server (the fast path): the SERVER span that the SDK's
    OpenTelemetryMiddleware would have opened, continuing the agent's trace from `_meta`. Nothing when off."""
    if not _installed:
        return nullcontext()
    method, target = invocation.method, invocation.target
    attributes = {"mcp.method.name": method, "mcp.protocol.version": invocation.protocol_version}
    if invocation.request_id is not None:
        attributes["jsonrpc.request.id"] = str(invocation.request_id)
    if method == "tools/call" and target:
        attributes.update({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": target})
    return _tracer.start_as_current_span(
        f"{method} {target}" if target else method,
        kind=SpanKind.SERVER,
        attributes=attributes,
        context=propagate.extract(meta) if isinstance(meta, dict) else None,
        record_exception=False,
        set_status_on_exception=False,
    )


def upstream_span(upstream: Upstream, method: str, request_id: str, params: dict[str, Any]) -> AbstractContextManager:
    """For a request sent without the SDK's session (the fast path's lane): the CLIENT span the SDK would have
    opened (named as `UpstreamSpans` names it), its context injected into `params["_meta"]` for the upstream.
    Nothing when off."""
    return _upstream_span(upstream, method, request_id, params) if _installed else nullcontext()


@contextmanager
def _upstream_span(upstream: Upstream, method: str, request_id: str, params: dict[str, Any]) -> Iterator[None]:
    target = params.get("name")
    name = f"{method} {target}" if isinstance(target, str) else method
    attributes = {"mcp.method.name": method, "jsonrpc.request.id": request_id}
    attributes |= client_span_attributes(method, target if isinstance(target, str) else "", upstream)
    with _tracer.start_as_current_span(
        name, kind=SpanKind.CLIENT, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        propagate.inject(params.setdefault("_meta", {}))
        try:
            yield
        except MCPError as exc:  # as the SDK's dispatcher marks an error response
            code = str(exc.error.code)
            span.set_attributes({"error.type": code, "rpc.response.status_code": code})
            span.set_status(StatusCode.ERROR)
            raise
        except Exception as exc:
            span.set_attribute("error.type", type(exc).__qualname__)
            span.set_status(StatusCode.ERROR)
            raise


def exporters(signal: str, environ: Mapping[str, str] = os.environ) -> set[str]:
    """The exporters the environment asks for, for `signal` TRACES or METRICS: those named in
    `OTEL_{signal}_EXPORTER`, or else `otlp` when an OTLP endpoint is set; none when the SDK is disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return set()
    named = environ.get(f"OTEL_{signal}_EXPORTER", "").strip().lower()
    if not named:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
        return {"otlp"} if endpoint else set()
    names = {name.strip() for name in named.split(",") if name.strip()} - {"none"}
    if unsupported := names - SUPPORTED_EXPORTERS:
        logger.warning(
            "OTEL_%s_EXPORTER names %s, which the gateway does not support (use otlp or console); ignored",
            signal,
            ", ".join(sorted(unsupported)),
        )
    return names & SUPPORTED_EXPORTERS


def _check_protocol() -> None:
    for variable in (
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    ):
        protocol = os.environ.get(variable, "http/protobuf").strip().lower()
        if protocol != "http/protobuf":
            logger.warning(
                "%s=%s: the gateway exports OTLP over http/protobuf only (usually port 4318); using that",
                variable,
                protocol,
            )


class Telemetry:
    """The installed providers, and the recorder that puts each finished invocation on its span and metrics."""

    def __init__(self, tracer_provider: TracerProvider | None, meter_provider: MeterProvider | None):
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        meter = meter_provider.get_meter(INSTRUMENTATION_SCOPE, __version__) if meter_provider is not None else None
        self._instruments = _Instruments(meter) if meter is not None else None

    @classmethod
    def from_environment(cls, redactor: Redactor) -> Telemetry | None:
        """Install the exporters the `OTEL_*` environment asks for; None (and nothing installed) if none."""
        span_exporters, metric_exporters = exporters("TRACES"), exporters("METRICS")
        if not span_exporters and not metric_exporters:
            return None
        _check_protocol()
        # Imported here: the exporters and the metrics SDK cost start-up time only when telemetry is on.
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the defaults.
        resource = Resource.create({SERVICE_NAME: DEFAULT_SERVICE_NAME, SERVICE_VERSION: __version__}).merge(
            OTELResourceDetector().detect()
        )
        tracer_provider = None
        if span_exporters:
            tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
            tracer_provider.add_span_processor(UpstreamSpans())
            for name in sorted(span_exporters):
                exporter = _SanitizingSpanExporter(_span_exporter(name), redactor)
                tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
            trace.set_tracer_provider(tracer_provider)
            global _installed
            _installed = True
        meter_provider = None
        if metric_exporters:
            readers = [PeriodicExportingMetricReader(_metric_exporter(name)) for name in sorted(metric_exporters)]
            meter_provider = MeterProvider(readers, resource=resource, shutdown_on_exit=False)
        logger.info(
            "telemetry on: traces %s, metrics %s",
            ", ".join(sorted(span_exporters)) or "off",
            ", ".join(sorted(metric_exporters)) or "off",
        )
        return cls(tracer_provider, meter_provider)

    async def record(self, invocation: Invocation) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            attributes = server_span_attributes(invocation)
            span.set_attributes(attributes)
            if "error.type" in attributes:
                span.set_status(StatusCode.ERROR)
        if self._instruments is not None:
            self._instruments.record(invocation)

    def shutdown(self) -> None:
        """Export what is still buffered, then stop (on gateway exit)."""
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()


def server_span_attributes(invocation: Invocation) -> dict[str, str]:
    """What the gateway adds to the SERVER span: session, transport, `enclave.*` decision attributes and the
    error (the SDK's middleware sets the same error attributes from the JSON-RPC error; the fast path has none)."""
    optional = {
        "mcp.session.id": invocation.session_id,
        "mcp.resource.uri": invocation.target if invocation.method == "resources/read" else None,
        "enclave.name": invocation.enclave,
        "enclave.agent": invocation.agent.name if invocation.agent is not None else None,
        "enclave.connector": invocation.connector,
        "enclave.reason": invocation.reason,
        "enclave.outcome": invocation.outcome,
        "enclave.chamber": invocation.chamber,
        "enclave.grant_id": invocation.grant_id,
        "enclave.correlation_id": invocation.correlation_id,
        **_error_attributes(invocation),
    }
    return {
        "network.transport": "unix" if _on_agents_socket(invocation) else "tcp",
        "network.protocol.name": "http",
        "enclave.decision": invocation.decision,
        **{name: value for name, value in optional.items() if value is not None},
    }


def _on_agents_socket(invocation: Invocation) -> bool:
    """Whether the request came over the agents' Unix socket: only there does the kernel name the peer process
    (`gateway.peers`). Nothing else of the process goes into a span: its command line is not for telemetry."""
    return invocation.process is not None and "pid" in invocation.process


def _error_attributes(invocation: Invocation) -> dict[str, str]:
    if invocation.error_code is not None:
        return {"error.type": str(invocation.error_code), "rpc.response.status_code": str(invocation.error_code)}
    if invocation.outcome == "tool_error":
        return {"error.type": "tool_error"}
    return {}


class _Instruments:
    """Calls, denials and latency, per enclave, connector, tool and decision."""

    def __init__(self, meter: Any):
        self.calls = meter.create_counter("enclave.gateway.calls", unit="{call}", description="MCP requests handled")
        self.denials = meter.create_counter(
            "enclave.gateway.denials", unit="{call}", description="MCP requests denied by policy"
        )
        self.duration = meter.create_histogram(
            "mcp.server.operation.duration",
            unit="s",
            description="Duration of MCP requests, as the agent sees them",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )

    def record(self, invocation: Invocation) -> None:
        attributes = metric_attributes(invocation)
        self.calls.add(1, attributes)
        if invocation.decision == "deny":
            self.denials.add(1, {**attributes, "enclave.reason": invocation.reason or "unknown"})
        self.duration.record(invocation.latency_seconds, attributes)


def metric_attributes(invocation: Invocation) -> dict[str, str]:
    """Low-cardinality attributes only: the tool or prompt is named once the enclave view has resolved it (a
    denied unknown name is the agent's free text, which would give every typo a time series of its own)."""
    attributes = {
        "mcp.method.name": invocation.method,
        "mcp.protocol.version": invocation.protocol_version,
        "enclave.decision": invocation.decision,
    }
    if invocation.enclave is not None:
        attributes["enclave.name"] = invocation.enclave
    if invocation.connector is not None:
        attributes["enclave.connector"] = invocation.connector
        if invocation.method == "tools/call" and invocation.target:
            attributes["gen_ai.tool.name"] = invocation.target
        elif invocation.method == "prompts/get" and invocation.target:
            attributes["gen_ai.prompt.name"] = invocation.target
    if error := _error_attributes(invocation):
        attributes["error.type"] = error["error.type"]
    return attributes


def upstream_span_attributes(upstream: Upstream) -> dict[str, str | int]:
    attributes: dict[str, str | int] = {"enclave.connector": upstream.name}
    if upstream.protocol_version is not None:
        attributes["mcp.protocol.version"] = upstream.protocol_version
    target = upstream.connector.target
    if isinstance(target, StdioTarget):
        attributes["network.transport"] = "pipe"
    else:
        url = urlsplit(target.url)
        attributes.update({"network.transport": "tcp", "network.protocol.name": "http"})
        if url.hostname:
            attributes["server.address"] = url.hostname
            attributes["server.port"] = url.port or (443 if url.scheme == "https" else 80)
    return attributes


class UpstreamSpans(SpanProcessor):
    """Names the SDK's upstream CLIENT spans per the semantic conventions (`tools/call get_part`, not
    `MCP send tools/call get_part`) and adds the connector, its transport and the tool or prompt name."""

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        scope = span.instrumentation_scope
        if span.kind is not SpanKind.CLIENT or scope is None or scope.name != SDK_SCOPE:
            return
        if not span.name.startswith(SDK_CLIENT_SPAN_PREFIX):
            return
        name = span.name.removeprefix(SDK_CLIENT_SPAN_PREFIX)
        span.update_name(name)
        method, _, target = name.partition(" ")
        span.set_attributes(client_span_attributes(method, target, current_upstream.get()))


def client_span_attributes(method: str, target: str, upstream: Upstream | None) -> dict[str, str | int]:
    """What a CLIENT span to an upstream says beyond the method: the tool or prompt, the connector, its transport."""
    attributes: dict[str, str | int] = {}
    if method == "tools/call" and target:
        attributes.update({"gen_ai.tool.name": target, "gen_ai.operation.name": "execute_tool"})
    elif method == "prompts/get" and target:
        attributes["gen_ai.prompt.name"] = target
    if upstream is not None:
        attributes.update(upstream_span_attributes(upstream))
    return attributes


class _SanitizingSpanExporter(SpanExporter):
    """Exports copies of the spans with every string redacted and status descriptions dropped."""

    def __init__(self, exporter: SpanExporter, redactor: Redactor):
        self._exporter = exporter
        self._redactor = redactor

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._exporter.export([self._sanitized(span) for span in spans])

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)

    def _sanitized(self, span: ReadableSpan) -> ReadableSpan:
        return ReadableSpan(
            name=self._redactor.text(span.name),
            context=span.context,
            parent=span.parent,
            resource=span.resource,
            attributes=self._attributes(span.attributes),
            events=[
                Event(self._redactor.text(event.name), self._attributes(event.attributes), event.timestamp)
                for event in span.events
            ],
            links=span.links,
            kind=span.kind,
            status=Status(span.status.status_code),
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )

    def _attributes(self, attributes: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            name: tuple(self._redactor.value(list(value))) if isinstance(value, tuple) else self._redactor.value(value)
            for name, value in (attributes or {}).items()
        }


def _span_exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _metric_exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()
