"""The two standing invariants every security case ends with (threat-principles.md, section 3.0).

NOLEAK: no secret (the canaries, i.e. the real upstream credentials, and every agent token) appears, raw or
encoded, in anything the case captured (replies with their headers), the gateway's stderr, a dump of the state
database, what the gateway exported over OTLP, any file under the deployment's directory except the upstreams'
own inbound logs (an upstream legitimately receives its credential), or any process's command line.
Encodings are found by decoding, independently of the gateway's redactor: every URL-encoded, hex and base64
(either alphabet, any offset) run in the text is decoded and searched as well.

ALIVE: an agent of another enclave still lists exactly its tools, promptly, from the same gateway process.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import httpx2
from mcp import MCPError
from pydantic import BaseModel

from tests.harness import ConfigDir, GatewayProcess, UpstreamLog, modern_post
from tests.otlp_receiver import OTLPReceiver

GATEWAY_SERVICE = "enclave-gateway"
ALIVE_AGENT = "b1"
ALIVE_TOOLS = {"wx_forecast", "wx_whoami", "get_current_time"}
ALIVE_SECONDS = 2.0  # generous: these machines are shared; the point is "served", not a benchmark

_HEX_RUN = re.compile(r"[0-9a-fA-F]{16,}")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{12,}")


@dataclass
class Deployment:
    """A running gateway with what the invariants need to know about it."""

    config: ConfigDir
    gateway: GatewayProcess
    tokens: dict[str, str]
    canaries: list[str]
    logs: dict[str, UpstreamLog]
    receiver: OTLPReceiver | None = None
    pid: int = field(init=False)

    def __post_init__(self) -> None:
        self.pid = self.gateway.process.pid

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def secrets(self) -> list[str]:
        return [*self.canaries, *self.tokens.values()]


def readings(text: str) -> Iterator[str]:
    """`text`, URL-decoded, and what each of its hex and base64 runs decodes to (at every offset)."""
    yield text
    yield unquote_plus(text)
    for run in _HEX_RUN.findall(text):
        for start in (0, 1):
            digits = run[start:]
            yield bytes.fromhex(digits[: len(digits) // 2 * 2]).decode("latin-1")
    for run in _BASE64_RUN.findall(text):
        standard = run.replace("-", "+").replace("_", "/")
        for start in range(4):
            chars = standard[start:]
            try:
                yield base64.b64decode(chars[: len(chars) // 4 * 4]).decode("latin-1")
            except binascii.Error:
                continue


def leaks(text: str, secrets: Iterable[str]) -> list[str]:
    """The secrets found in `text`, in any encoding `readings` undoes (shown by a prefix only)."""
    wanted = [secret for secret in secrets if secret]
    found: set[str] = set()
    for reading in readings(text):
        found |= {secret for secret in wanted if secret in reading}
        if len(found) == len(wanted):
            break
    return sorted(secret[:12] + "..." for secret in found)


def as_text(item: Any) -> str:
    """What a case captured, as text: a reply with its headers, an MCP result or error, or anything else."""
    if isinstance(item, httpx2.Response):
        return "\n".join([*(f"{k}: {v}" for k, v in item.headers.items()), item.text])
    if isinstance(item, BaseModel):
        return item.model_dump_json(by_alias=True)
    if isinstance(item, MCPError):
        return json.dumps({"code": item.error.code, "message": item.error.message, "data": item.error.data})
    return item if isinstance(item, str) else json.dumps(item, default=str)


def sources(deployment: Deployment, captured: Iterable[Any]) -> Iterator[tuple[str, str]]:
    """(where, text) for every place NOLEAK sweeps."""
    for index, item in enumerate(captured):
        yield f"captured item {index}", as_text(item)
    yield "gateway stderr", deployment.gateway.stderr()
    with closing(sqlite3.connect(deployment.config.state_dir / "state.db")) as db:
        yield "state database dump", "\n".join(db.iterdump())
    if deployment.receiver is not None:
        for export in list(deployment.receiver.exports):
            if GATEWAY_SERVICE in export.services:
                yield f"OTLP {export.signal} export", export.body.decode("latin-1")
    inbound_logs = {log.path for log in deployment.logs.values()}
    for path in sorted(deployment.config.root.rglob("*")):
        if path.is_file() and path not in inbound_logs and not path.is_socket():
            yield str(path), path.read_bytes().decode("latin-1")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            yield f"argv of process {pid}", Path(f"/proc/{pid}/cmdline").read_bytes().decode("latin-1")
        except OSError:
            continue


def assert_noleak(deployment: Deployment, *captured: Any) -> None:
    found = {where: hits for where, text in sources(deployment, captured) if (hits := leaks(text, deployment.secrets))}
    assert not found, f"secrets leaked: {found}"


def tool_names(response: httpx2.Response) -> set[str]:
    return {tool["name"] for tool in rpc(response)["result"]["tools"]}


def rpc(response: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC message of a reply (a JSON body, or the one message of an SSE body)."""
    text = response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        text = next(line[5:] for line in text.splitlines() if line.startswith("data:"))
    return json.loads(text)


def shape(response: httpx2.Response) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (but the date) and body: what must be identical between replies that reveal nothing."""
    return response.status_code, {k: v for k, v in response.headers.items() if k != "date"}, response.content


def assert_e401(response: httpx2.Response, reference: httpx2.Response) -> None:
    """E401: the one 401, byte for byte the reply to a request without any token; no session, no result."""
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert "mcp-session-id" not in response.headers
    assert shape(response) == shape(reference)


def assert_alive(deployment: Deployment) -> None:
    assert deployment.gateway.process.poll() is None, "the gateway exited"
    assert deployment.gateway.process.pid == deployment.pid
    started = time.perf_counter()
    reply = modern_post(deployment.url, "tools/list", {}, deployment.tokens[ALIVE_AGENT])
    elapsed = time.perf_counter() - started
    assert reply.status_code == 200, reply.text
    assert tool_names(reply) == ALIVE_TOOLS
    assert elapsed < ALIVE_SECONDS, f"{ALIVE_AGENT} waited {elapsed:.2f} s"


def assert_invariants(deployment: Deployment, *captured: Any) -> None:
    """ALIVE, then NOLEAK over what the case captured (ALIVE's own reply included)."""
    assert_alive(deployment)
    assert_noleak(deployment, *captured)
