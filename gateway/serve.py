"""`enclave serve`: logging that cannot leak a secret, then uvicorn on the gateway app."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import anyio
import uvicorn

from gateway.audit import AuditLog
from gateway.auth import AgentDirectory
from gateway.config import MCP_PATH, Config, base_url
from gateway.http_protocol import http_and_loop, with_peer_credentials
from gateway.invocation import DecisionLog, Recorders
from gateway.lifecycle import ConfigReloader
from gateway.limits import TokenBucket
from gateway.peers import agents_socket
from gateway.pins import ToolPins
from gateway.pipeline import Gateway
from gateway.redact import Redactor
from gateway.secrets import SecretResolver
from gateway.server import build_app
from gateway.telemetry import Telemetry
from gateway.tokens import load_or_create_key

logger = logging.getLogger("gateway")


class RedactingFilter(logging.Filter):
    """Last line of defence: whatever is logged, by us or a library, passes through the redactor."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redactor.text(record.getMessage())
        record.args = None
        if record.exc_info:  # a traceback quotes values (e.g. a validation error quotes what an upstream sent)
            record.exc_text = self.redactor.text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = self.redactor.text(record.stack_info)
        return True


class FloodFilter(logging.Filter):
    """Keeps a flood of one kind of record (one logger, one format: an upstream's stderr, the same denial over
    and over) from filling the log: each kind logs `burst` records, then `rate` a second; how many were held
    back is said with the next one let through. The audit log, not this one, is the record of every request."""

    def __init__(self, rate: float = 5.0, burst: int = 50, kinds: int = 1024):
        super().__init__()
        self.rate, self.burst, self.kinds = rate, burst, kinds
        self._buckets: dict[tuple[str, str, int], TokenBucket] = {}
        self._held: dict[tuple[str, str, int], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200], record.levelno)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.kinds:  # formats built at run time would otherwise grow this forever
                self._buckets.clear()
                self._held.clear()
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        if bucket.take():
            self._held[key] = self._held.get(key, 0) + 1
            return False
        if (held := self._held.pop(key, 0)) and isinstance(record.msg, str):
            record.msg += f" [{held} more like this were not logged]"
        return True


def configure_logging(redactor: Redactor) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(FloodFilter())  # first: it tells kinds apart by their format, before redaction formats them
    handler.addFilter(RedactingFilter(redactor))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


class _Server(uvicorn.Server):
    """Prints one readiness line once the socket is bound (tests and scripts wait for it), and exports the
    telemetry still buffered once it has shut down (before uvicorn re-raises the SIGTERM that stopped it)."""

    url = ""
    telemetry: Telemetry | None = None
    agents_socket: Path | None = None
    scrub: Callable[[str], str] = str  # applied to the command lines of attributed processes

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.agents_socket is not None:
            await self._listen_for_agents(self.agents_socket)
        if self.started:
            print(f"enclave gateway listening on {self.url}", flush=True)

    async def _listen_for_agents(self, path: Path) -> None:
        """The same application on a Unix socket, for local agents: each connection is attributed to the local
        process behind it (gateway.peers). Mode 0666: like the loopback TCP port, which every local user can
        reach, the socket is open and every request must carry a valid agent token; it adds attribution, not
        access. (It sits in the 0700 state directory, so only the gateway's own user reaches it unless an
        operator opens that directory.) Without it the gateway still serves HTTP."""
        path.unlink(missing_ok=True)
        protocol = partial(
            with_peer_credentials(self.config.http_protocol_class),  # the parser the TCP listener uses
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
            scrub=self.scrub,
        )
        try:
            loop = asyncio.get_running_loop()
            server = await loop.create_unix_server(protocol, str(path), backlog=self.config.backlog)
        except (OSError, NotImplementedError) as exc:  # e.g. a path longer than a Unix socket allows, or Windows
            logger.warning("not listening for local agents on unix:%s (%s); `enclave connect` needs --url", path, exc)
            return
        path.chmod(0o666)
        self.servers.append(server)  # closed by uvicorn's shutdown with the TCP listener
        logger.info("local agents connect on unix:%s", path)

    async def shutdown(self, sockets: list | None = None) -> None:
        await super().shutdown(sockets)
        if self.agents_socket is not None:
            self.agents_socket.unlink(missing_ok=True)
        if self.telemetry is not None:
            await anyio.to_thread.run_sync(self.telemetry.shutdown)


def serve(config: Config, resolver: SecretResolver, secrets: list[str], listen: str | None = None) -> int:
    loaded = config  # as its files say: what a reload compares its settings with
    if listen:
        host, _, port = listen.rpartition(":")
        config = _with_listen(config, host.strip("[]") or "127.0.0.1", int(port))
    redactor = Redactor(secrets)
    configure_logging(redactor)
    key = load_or_create_key(config.settings.state_dir)
    directory = AgentDirectory(key)
    audit = AuditLog(config, key, redactor)
    telemetry = Telemetry.from_environment(redactor)  # None unless OTEL_* configures an exporter
    recorder = Recorders(
        DecisionLog(logging.getLogger("gateway.decisions")), audit, *([telemetry] if telemetry is not None else [])
    )
    gateway = Gateway(config, resolver, redactor, recorder, ToolPins(audit, redactor.text))
    app = build_app(config, gateway, directory, audit, ConfigReloader(gateway, directory, audit, loaded, resolver))
    settings = config.settings.listen
    http, loop = http_and_loop()
    logger.info("HTTP protocol %s, event loop %s", getattr(http, "__name__", http), loop)
    server = _Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            http=http,
            loop=loop,
            access_log=False,  # a mistaken ?token= in a URL must not reach a log
            proxy_headers=False,  # nothing in front of the gateway is trusted to rewrite who connected
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
    )
    server.url = base_url(config.settings.listen) + MCP_PATH
    server.telemetry = telemetry
    server.agents_socket = agents_socket(config.settings.state_dir)
    server.scrub = redactor.text
    server.run()
    return 0 if server.started else 1


def _with_listen(config: Config, host: str, port: int) -> Config:
    listen = replace(config.settings.listen, host=host, port=port)
    return replace(config, settings=replace(config.settings, listen=listen))
