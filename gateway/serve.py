"""`enclave serve`: logging that cannot leak a secret, then uvicorn on the gateway app."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

import uvicorn

from gateway.auth import AgentDirectory
from gateway.config import Config
from gateway.invocation import DecisionLog, Recorders
from gateway.pipeline import Gateway
from gateway.redact import Redactor
from gateway.secrets import SecretResolver
from gateway.server import MCP_PATH, base_url, build_app
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
        return True


def configure_logging(redactor: Redactor) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(redactor))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


class _Server(uvicorn.Server):
    """Prints one readiness line once the socket is bound (tests and scripts wait for it)."""

    url = ""

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"enclave gateway listening on {self.url}", flush=True)


def serve(config: Config, resolver: SecretResolver, secrets: list[str], listen: str | None = None) -> int:
    if listen:
        host, _, port = listen.rpartition(":")
        config = _with_listen(config, host.strip("[]") or "127.0.0.1", int(port))
    redactor = Redactor(secrets)
    configure_logging(redactor)
    directory = AgentDirectory(load_or_create_key(config.settings.state_dir))
    recorder = Recorders(DecisionLog(logging.getLogger("gateway.decisions")))
    gateway = Gateway(config, resolver, redactor, recorder)
    app = build_app(config, gateway, directory)
    settings = config.settings.listen
    server = _Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            access_log=False,  # a mistaken ?token= in a URL must not reach a log
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
    )
    server.url = base_url(config.settings.listen) + MCP_PATH
    server.run()
    return 0 if server.started else 1


def _with_listen(config: Config, host: str, port: int) -> Config:
    listen = replace(config.settings.listen, host=host, port=port)
    return replace(config, settings=replace(config.settings, listen=listen))
