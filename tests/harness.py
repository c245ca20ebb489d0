"""Test harness: real configuration directories, real `enclave` processes, real MCP clients.

Nothing of the gateway is mocked: a test writes YAML, mints tokens with the CLI, starts `enclave serve`
as a subprocess on a loopback port and talks to it with the official MCP client (either protocol era).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import httpx2
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.inbound import encode_header_value

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "servers"
EVIL = REPO / "tests" / "servers" / "evil.py"
READY_PREFIX = "enclave gateway listening on "
ERAS = ("legacy", "2026-07-28")


def canary() -> str:
    """A fresh real-credential stand-in that must never leave the gateway."""
    return "gwcanary_" + secrets.token_hex(16)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def python_server(script: Path, **env: str) -> dict[str, Any]:
    """A stdio connector spec running one of our Python MCP servers."""
    spec: dict[str, Any] = {"command": "${python}", "args": [str(script)]}
    if env:
        spec["env"] = env
    return {"stdio": spec}


@dataclass
class ConfigDir:
    """A configuration directory written from Python dicts."""

    root: Path
    secrets: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        (self.root / "connectors").mkdir(parents=True, exist_ok=True)
        (self.root / "enclaves").mkdir(exist_ok=True)

    def gateway(self, **settings: Any) -> ConfigDir:
        (self.root / "gateway.yaml").write_text(yaml.safe_dump(settings))
        return self

    def connector(self, name: str, spec: dict[str, Any]) -> ConfigDir:
        (self.root / "connectors" / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **spec}))
        return self

    def enclave(self, name: str, agents: list[str], connectors: dict[str, Any], **settings: Any) -> ConfigDir:
        """enclaves/NAME.yaml; `settings` are further top-level fields (e.g. audit={"raw_arguments": True})."""
        data = {"name": name, "agents": agents, "connectors": connectors, **settings}
        (self.root / "enclaves" / f"{name}.yaml").write_text(yaml.safe_dump(data))
        return self

    def secret(self, name: str, value: str) -> ConfigDir:
        self.secrets[name] = value
        return self

    @property
    def state_dir(self) -> Path:
        return self.root / ".enclave"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_")}
        for name, value in self.secrets.items():
            env["ENCLAVE_SECRET_" + "".join(c if c.isalnum() else "_" for c in name).upper()] = value
        return env

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `enclave --config ROOT ARGS...`."""
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "--config", str(self.root), *args],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"enclave {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def mint(self, agent: str, enclave: str, *extra: str) -> str:
        return self.cli("agent", "add", agent, "--enclave", enclave, *extra).stdout.strip()


class GatewayProcess:
    """`enclave serve` as a subprocess; its stderr is kept for leak sweeps."""

    def __init__(self, config: ConfigDir, extra_env: dict[str, str] | None = None):
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.stderr_path = config.root / f"gateway-{self.port}.stderr"
        self._stderr = self.stderr_path.open("w")
        listen = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(config.root), "serve", "--listen", listen],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**config.env(), **(extra_env or {})},
        )
        self.stdout_lines: list[str] = []
        self._wait_ready()

    def _wait_ready(self, timeout: float = 90) -> None:
        ready = threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.stdout_lines.append(line)
                if line.startswith(READY_PREFIX):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or self.process.poll() is not None:
            output = self.stderr()
            self.stop()
            raise AssertionError(f"gateway did not start:\n{output}")

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()
        return self.process.returncode


@contextmanager
def running(config: ConfigDir, extra_env: dict[str, str] | None = None) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(config, extra_env)
    try:
        yield gateway
    finally:
        gateway.stop()


@asynccontextmanager
async def connect(url: str, token: str | None, mode: str = "legacy", **client_args: Any) -> AsyncIterator[Client]:
    """The official MCP client, speaking `mode` ("legacy" = 2025-11-25 handshake, or "2026-07-28")."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, cache=None, **client_args) as client,
    ):
        yield client


class UpstreamLog:
    """The JSON lines an example upstream writes for every message it receives (UPSTREAM_LOG)."""

    def __init__(self, path: Path):
        self.path = path

    def messages(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def count(self) -> int:
        return len(self.messages())

    def calls(self, method: str = "tools/call") -> list[dict[str, Any]]:
        return [m for m in self.messages() if m["method"] == method]


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@cache
def http() -> httpx2.Client:
    """One shared client for raw requests: building one costs ~0.2 s (its TLS context), even for plain HTTP."""
    return httpx2.Client(timeout=30)


def raw_post(url: str, body: dict[str, Any] | str, token: str | None = None, **headers: str) -> httpx2.Response:
    """One JSON-RPC POST with full control over headers (for protocol-level and adversarial tests)."""
    all_headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2025-11-25",
        **headers,
    }
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    content = body if isinstance(body, str) else json.dumps(body)
    return http().post(url, content=content, headers=all_headers)


def legacy_session(url: str, token: str, capabilities: dict[str, Any] | None = None) -> dict[str, str]:
    """Open a 2025-11-25 (handshake era) session by hand; returns the headers that address it."""
    hello = {
        "protocolVersion": "2025-11-25",
        "capabilities": capabilities or {},
        "clientInfo": {"name": "raw", "version": "0"},
    }
    response = raw_post(url, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello}, token)
    assert response.status_code == 200, response.text
    session = {"Mcp-Session-Id": response.headers["mcp-session-id"]}
    raw_post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, token, **session)
    return session


def modern_post(
    url: str, method: str, params: dict[str, Any], token: str | None, request_id: int = 1, **headers: str
) -> httpx2.Response:
    """One 2026-07-28 (stateless era) request: the `_meta` envelope (added to any in `params`) plus the routing
    headers it must match."""
    envelope = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
    }
    body = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": method,
        "params": {**params, "_meta": {**params.get("_meta", {}), **envelope}},
    }
    routing = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": method}
    if (name := params.get("uri" if method == "resources/read" else "name")) is not None:
        routing["Mcp-Name"] = encode_header_value(name)
    return raw_post(url, body, token, **routing, **headers)
