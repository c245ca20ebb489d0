"""Who holds which credential: agent tokens (one identical 401 for every failure) and the real upstream
credentials, which reach their upstream and nothing else (no response, log line, database row or file)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
import pytest
from mcp import MCPError

from tests.conftest import Topology
from tests.harness import (
    ERAS,
    EXAMPLES,
    ConfigDir,
    GatewayProcess,
    UpstreamLog,
    connect,
    http,
    legacy_session,
    modern_post,
    python_server,
    raw_post,
    running,
)

pytestmark = pytest.mark.anyio

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}
LIST_TOOLS = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}


def post(url: str, headers: list[tuple[str, str]], mode: str = "legacy") -> httpx2.Response:
    """A first request of either era with exactly these extra headers (repeats allowed)."""
    if mode == "legacy":
        body, version = INITIALIZE, "2025-11-25"
    else:
        envelope = {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        }
        body, version = {**LIST_TOOLS, "params": {"_meta": envelope}}, "2026-07-28"
        headers = [("Mcp-Method", "tools/list"), *headers]
    base = [("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")]
    return http().post(url, content=json.dumps(body), headers=[*base, ("MCP-Protocol-Version", version), *headers])


def shape(response: httpx2.Response) -> tuple[int, dict[str, str], bytes]:
    return response.status_code, {k: v for k, v in response.headers.items() if k != "date"}, response.content


def encodings(secret: str) -> set[str]:
    """The forms a leak could take: raw, base64 (both alphabets), hex (both cases), URL-encoded."""
    raw = secret.encode()
    return {
        secret,
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw.hex(),
        raw.hex().upper(),
        quote(secret, safe=""),
    }


def leaks(text: str, *secrets: str) -> list[str]:
    return [form for secret in secrets for form in encodings(secret) if form in text]


# -- agent tokens ----------------------------------------------------------------------------------


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[tuple[ConfigDir, GatewayProcess, UpstreamLog]]:
    """A gateway of our own, for tests that mint, revoke and expire tokens."""
    log = UpstreamLog(tmp_path / "upstream-design.jsonl")
    config = (
        ConfigDir(tmp_path)
        .connector("design", python_server(EXAMPLES / "design_db.py", UPSTREAM_LOG=str(log.path)))
        .enclave("e1", ["alice", "bob", "carol"], {"design": {"tools": ["search_parts"]}})
    )
    with running(config) as gateway:
        yield config, gateway, log


def wait_until_refused(url: str, token: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while post(url, [("Authorization", f"Bearer {token}")]).status_code != 401:
        assert time.monotonic() < deadline, "the expiring token was still accepted"
        time.sleep(0.1)


def test_every_authentication_failure_gets_the_same_401(fresh: tuple[ConfigDir, GatewayProcess, UpstreamLog]) -> None:
    """In both eras, byte for byte (bar the Date header): one 401 whatever the cause."""
    config, gateway, log = fresh
    expiring = config.mint("bob", "e1", "--expires", "1s")
    valid = config.mint("alice", "e1")
    revoked = config.mint("carol", "e1")
    config.cli("agent", "revoke", "carol")
    for mode in ERAS:
        assert post(gateway.url, [("Authorization", f"Bearer {valid}")], mode).status_code == 200
    wait_until_refused(gateway.url, expiring)
    contacts = log.count()
    unknown = "encl_" + "A" * 43

    causes: dict[str, list[tuple[str, str]]] = {
        "missing": [],
        "empty": [("Authorization", "")],
        "scheme only": [("Authorization", "Bearer")],
        "token only": [("Authorization", valid)],
        "basic scheme": [("Authorization", f"Basic {valid}")],
        "token scheme": [("Authorization", f"Token {valid}")],
        "two spaces": [("Authorization", f"Bearer  {valid}")],
        "tab": [("Authorization", f"Bearer\t{valid}")],
        "two tokens": [("Authorization", f"Bearer {valid} {valid}")],
        "duplicated header": [("Authorization", f"Bearer {valid}"), ("Authorization", f"Bearer {valid}")],
        "duplicated, one bad": [("Authorization", f"Bearer {valid}"), ("Authorization", "Bearer nope")],
        "unknown": [("Authorization", f"Bearer {unknown}")],
        "unknown, lowercase scheme": [("Authorization", f"bearer {unknown}")],
        "unknown, uppercase scheme": [("Authorization", f"BEARER {unknown}")],
        "not a gateway token": [("Authorization", "Bearer ghp_0123456789abcdef0123456789abcdef0123")],
        "expired": [("Authorization", f"Bearer {expiring}")],
        "revoked": [("Authorization", f"Bearer {revoked}")],
        "cookie": [("Cookie", f"token={valid}; access_token={valid}; Authorization=Bearer%20{valid}")],
    }
    replies = {(cause, mode): post(gateway.url, headers, mode) for cause, headers in causes.items() for mode in ERAS}
    replies["query string", "legacy"] = http().post(
        f"{gateway.url}?access_token={valid}&token={valid}",
        content=json.dumps(INITIALIZE),
        headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream"},
    )

    reference = replies["missing", "legacy"]
    assert reference.status_code == 401
    metadata = gateway.url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")
    challenge = reference.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and f'resource_metadata="{metadata}"' in challenge
    assert "mcp-session-id" not in reference.headers
    assert "result" not in reference.json()
    for cause, reply in replies.items():
        assert shape(reply) == shape(reference), cause
    assert log.count() == contacts


def test_protected_resource_metadata(topology: Topology) -> None:
    challenge = post(topology.url, []).headers["www-authenticate"]
    metadata_url = challenge.split('resource_metadata="', 1)[1].split('"', 1)[0]
    metadata = http().get(metadata_url).json()
    assert metadata["resource"] == topology.url
    assert metadata["bearer_methods_supported"] == ["header"]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_scheme_is_case_insensitive(topology: Topology, scheme: str) -> None:
    """RFC 7235 2.1: the auth-scheme is a case-insensitive token; the token itself is not."""
    token = topology.tokens["a1"]
    assert post(topology.url, [("Authorization", f"{scheme} {token}")]).status_code == 200
    assert post(topology.url, [("Authorization", f"{scheme} {token.swapcase()}")]).status_code == 401


@pytest.mark.parametrize("mode", ERAS)
async def test_revoked_token_is_refused_on_its_next_request(
    fresh: tuple[ConfigDir, GatewayProcess, UpstreamLog], mode: str
) -> None:
    """Inside sessions that are already open: the client's, and a raw handshake-era session."""
    config, gateway, log = fresh
    token = config.mint("alice", "e1")
    async with connect(gateway.url, token, mode) as client:
        assert [tool.name for tool in (await client.list_tools()).tools] == ["search_parts"]
        session = legacy_session(gateway.url, token)
        assert raw_post(gateway.url, LIST_TOOLS, token, **session).status_code == 200
        calls = len(log.calls())

        assert "the running gateway applied it" in config.cli("agent", "revoke", "alice").stderr

        with pytest.raises(MCPError):
            await client.call_tool("search_parts", {"query": "bolt"})
    refused = raw_post(gateway.url, LIST_TOOLS, token, **session)
    assert shape(refused) == shape(post(gateway.url, []))
    refused = modern_post(gateway.url, "tools/list", {}, token)
    assert shape(refused) == shape(post(gateway.url, [], "2026-07-28"))
    assert len(log.calls()) == calls


@pytest.mark.parametrize("mode", ERAS)
def test_dns_rebinding_checks(topology: Topology, mode: str) -> None:
    """The SDK's transport security: a foreign Origin gets 403 and a foreign Host 421, even with a valid token."""
    auth = ("Authorization", f"Bearer {topology.tokens['a1']}")
    port = topology.url.split(":")[2].split("/")[0]
    assert post(topology.url, [auth, ("Origin", f"http://localhost:{port}")], mode).status_code == 200
    assert post(topology.url, [auth, ("Origin", "http://evil.example")], mode).status_code == 403
    assert post(topology.url, [auth, ("Origin", "null")], mode).status_code == 403
    assert post(topology.url, [auth, ("Host", "evil.example")], mode).status_code == 421
    assert post(topology.url, [auth, ("Host", f"attacker.example:{port}")], mode).status_code == 421


# -- real credentials ------------------------------------------------------------------------------


def call(topology: Topology, agent: str, mode: str, name: str, arguments: dict[str, Any]) -> httpx2.Response:
    token = topology.tokens[agent]
    if mode == "legacy":
        body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": name, "arguments": arguments}}
        return raw_post(topology.url, body, token, **legacy_session(topology.url, token))
    return modern_post(topology.url, "tools/call", {"name": name, "arguments": arguments}, token)


@pytest.mark.parametrize("mode", ERAS)
async def test_the_real_credential_reaches_its_upstream(topology: Topology, mode: str) -> None:
    expected = hashlib.sha256(topology.weather_canary.encode()).hexdigest()[:12]
    async with connect(topology.url, topology.tokens["b1"], mode) as client:
        result = await client.call_tool("wx_forecast", {"city": "Lyon"})
    assert result.structured_content is not None
    assert result.structured_content["key_fingerprint"] == expected
    reply = call(topology, "b1", mode, "wx_whoami", {})
    assert expected in reply.text
    assert not leaks(reply.text, topology.weather_canary)


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize(
    ("tool", "arguments"),
    [("echo_env", {}), ("echo_secret_encodings", {}), ("echo_secret_encodings", {"as_error": True})],
    ids=["env", "encodings", "encodings-in-error"],
)
def test_an_upstream_echoing_its_credential_is_redacted(
    topology: Topology, mode: str, tool: str, arguments: dict[str, Any]
) -> None:
    """evil returns its credential raw, base64, hex and URL-encoded, in a result or in a JSON-RPC error
    (message and data): every form arrives redacted."""
    reply = call(topology, "a1", mode, tool, arguments)
    assert ('"error"' in reply.text) == bool(arguments)
    assert "[REDACTED]" in reply.text
    assert not leaks(reply.text + str(reply.headers), topology.canary, topology.weather_canary)


def test_no_credential_or_token_leaves_anywhere(topology: Topology) -> None:
    """After traffic to every upstream in both eras: the secret sweep over logs, state, files and argv."""
    for mode in ERAS:
        for agent, name, arguments in [
            ("a1", "search_parts", {"query": "bolt"}),
            ("a1", "echo_env", {}),
            ("a1", "echo_secret_encodings", {}),
            ("b1", "wx_forecast", {"city": "Oslo"}),
            ("b1", "get_current_time", {"timezone": "UTC"}),
        ]:
            assert call(topology, agent, mode, name, arguments).status_code == 200
    secrets = [topology.canary, topology.weather_canary, *topology.tokens.values()]

    assert not leaks(topology.gateway.stderr(), *secrets)

    database = sqlite3.connect(topology.config.state_dir / "state.db")
    try:
        assert not leaks("\n".join(database.iterdump()), *secrets)
    finally:
        database.close()

    upstream_logs = {log.path for log in topology.logs.values()}
    for path in topology.config.root.rglob("*"):
        if path.is_file() and path not in upstream_logs:
            assert not leaks(path.read_bytes().decode("utf-8", "replace"), *secrets), path

    for log in topology.logs.values():
        text = log.path.read_text()
        assert "encl_" not in text, f"an agent token reached {log.path.name}"
        assert not leaks(text, *topology.tokens.values())

    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
        except OSError:
            continue
        assert not leaks(argv, *secrets), f"process {pid} has a secret in its arguments"
