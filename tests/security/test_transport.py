"""Transport: DNS rebinding, Host values that could move the path (BadHost), path variants of the endpoint, the
request body limit, the same on both request paths (threat-principles 1.1: Docker MCP Gateway, Starlette
CVE-2026-48710, ContextForge PR #3812; 1.2: the SDKs' DNS-rebinding CVEs), and the HTTP/1.1 framing the parser
lets through, the same on httptools (where installed) as on h11: a bounded header section, exactly one Host,
trailer fields never taken for headers.

Proven elsewhere, not repeated: a foreign Origin gets 403 and a foreign Host 421, with a valid token, in both eras
(tests/test_auth.py::test_dns_rebinding_checks).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from typing import Any

import pytest
import starlette
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.http_protocol import AuditedRefusals, StrictHttpTools, http_and_loop
from tests.harness import http, raw_post
from tests.security.conftest import audit
from tests.security.invariants import Deployment, assert_e401, assert_invariants, rpc

MODERN = "2026-07-28"
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
}


def modern_call(arguments: dict[str, Any]) -> dict[str, Any]:
    """A 2026-era tools/call the fast path would serve (echo is in a1's listed view)."""
    return {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": arguments, "_meta": ENVELOPE},
    }


MODERN_HEADERS = {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "echo"}


def test_starlette_is_past_badhost() -> None:
    """CVE-2026-48710 is fixed in Starlette 1.0.1 (pyproject.toml requires it)."""
    version = tuple(int(part) for part in starlette.__version__.split(".")[:3])
    assert version >= (1, 0, 1)


def raw_http(world: Deployment, request: bytes) -> bytes:
    """Bytes on the wire, for requests an HTTP client would refuse to build."""
    port = int(world.url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:{port}/other", "127.0.0.1:{port}?x=1", "127.0.0.1:{port}#frag", "evil.example@127.0.0.1:{port}"],
)
def test_a_host_that_could_move_the_path_is_refused(world: Deployment, host: str) -> None:
    """BadHost: `/`, `?`, `#` or `@` in Host never reach the endpoint, with or without a token (the SDK's own
    allowlist would admit them: `127.0.0.1:*` matches any suffix)."""
    port = world.url.split(":")[2].split("/")[0]
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}).encode()
    replies = []
    since = last_audit_id(world)
    for token in (None, world.tokens["a1"]):
        request = (
            f"POST /mcp HTTP/1.1\r\nHost: {host.format(port=port)}\r\nContent-Type: application/json\r\n"
            "Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-11-25\r\n"
            + (f"Authorization: Bearer {token}\r\n" if token else "")
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        reply = raw_http(world, request)
        status = int(reply.split(b" ", 2)[1])
        assert status == 400, reply[:200]
        assert reply.endswith(b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Invalid Host header"}}')
        replies.append(reply.decode("latin-1"))
    rows = audit(world, "id > ? AND reason = 'invalid_host'", (since,))
    assert [(row["decision"], row["agent"]) for row in rows] == [("deny", None), ("deny", "a1")]
    assert_invariants(world, *replies)


def last_audit_id(world: Deployment) -> int:
    return max((row["id"] for row in audit(world)), default=0)


def parser_refusals(world: Deployment, since: int) -> list[str]:
    """The reasons of the requests the HTTP parser refused, audited after row `since`. They are queued as the 400
    leaves, not waited for; a request answered after them (a 401, committed before its reply) commits them too."""
    assert raw_post(world.url, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).status_code == 401
    return [row["reason"] for row in audit(world, "id > ? AND method = 'http'", (since,))]


def test_the_gateway_runs_on_httptools_made_strict_and_uvloop_else_h11_and_asyncio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httptools and uvloop are dependencies (uvloop but on Windows); without them the gateway still starts, on
    h11; the parser's refusals are audited on either."""
    http, loop = http_and_loop()
    assert issubclass(http, StrictHttpTools) and issubclass(http, HttpToolsProtocol)
    assert issubclass(http, AuditedRefusals)
    assert loop == ("asyncio" if sys.platform == "win32" else "uvloop")
    monkeypatch.setitem(sys.modules, "uvicorn.protocols.http.httptools_impl", None)  # importing it fails
    monkeypatch.setitem(sys.modules, "uvloop", None)
    http, loop = http_and_loop()
    assert issubclass(http, H11Protocol) and issubclass(http, AuditedRefusals) and loop == "asyncio"


def test_an_endless_header_section_is_cut_off(world: Deployment) -> None:
    """No token can be looked at before the header section ends, so the parser bounds it: past MAX_HEAD_BYTES
    the gateway answers 400 and closes the connection, long before a client has sent 16 MiB of one header."""
    sent = 0
    reply = b""
    since = last_audit_id(world)
    with socket.create_connection(("127.0.0.1", _port(world)), timeout=10) as sock:
        sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: ")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):  # a timeout would mean it stopped reading
            for _ in range(256):
                sock.sendall(b"x" * 65536)
                sent += 65536
        with contextlib.suppress(ConnectionResetError):  # the reset can overtake the 400
            reply = sock.recv(65536)
    assert sent < 16 * 1024 * 1024
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert parser_refusals(world, since) == ["header_section_too_large"]
    assert_invariants(world, reply.decode("latin-1"))


FRAMING = ["no Host", "two Hosts", "Host only in a trailer", "token only in a trailer"]


@pytest.mark.parametrize("case", FRAMING)
def test_framing_is_refused_before_anything_is_forwarded(world: Deployment, case: str) -> None:
    """An HTTP/1.1 request has exactly one Host (RFC 9112, 3.2): 400 from the parser. Trailer fields (after a
    chunked body) are dropped, never appended to the headers the guard has already checked: a Host there leaves
    the request without one, a token there leaves it unauthenticated (401). Nothing reaches the upstream."""
    port = _port(world)
    body = json.dumps(modern_call({"text": "framing"})).encode()
    host = f"Host: 127.0.0.1:{port}\r\n"
    token = f"Authorization: Bearer {world.tokens['a1']}\r\n"
    headers, trailer = {
        "no Host": (token, ""),
        "two Hosts": (host + f"Host: localhost:{port}\r\n" + token, ""),
        "Host only in a trailer": (token, host),
        "token only in a trailer": (host, token),
    }[case]
    fixed = "".join(f"{name}: {value}\r\n" for name, value in MODERN_HEADERS.items())
    head = (
        f"POST /mcp HTTP/1.1\r\n{headers}{fixed}Content-Type: application/json\r\n"
        "Accept: application/json, text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    chunked = f"{len(body):x}\r\n".encode() + body + f"\r\n0\r\n{trailer}\r\n".encode()
    before, since = world.logs["evil"].count(), last_audit_id(world)
    reply = raw_http(world, head.encode() + chunked)
    status = int(reply.split(b" ", 2)[1])
    assert status == (401 if case == "token only in a trailer" else 400), reply[:300]
    assert b'"result"' not in reply
    assert world.logs["evil"].count() == before
    assert parser_refusals(world, since) == ([] if case == "token only in a trailer" else ["malformed_http"])
    assert_invariants(world, reply.decode("latin-1"))


def _port(world: Deployment) -> int:
    return int(world.url.split(":")[2].split("/")[0])


@pytest.mark.parametrize("path", ["/mcp/", "/MCP", "//mcp", "/mcp/../mcp", "/mcp;x=1", "/mcp%2F", "/x/../mcp"])
def test_no_path_variant_serves_without_a_token(world: Deployment, path: str) -> None:
    """ContextForge's bypass: the auth gate and the router disagreeing about a path. Here a variant is either the
    endpoint itself (the one 401) or nothing at all."""
    port = world.url.split(":")[2].split("/")[0]
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        "Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-11-25\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    reply = raw_http(world, request)
    status = int(reply.split(b" ", 2)[1])
    assert status in (307, 400, 401, 404, 405), reply[:300]
    assert b'"result"' not in reply and b"mcp-session-id" not in reply.lower()
    assert_invariants(world, reply.decode("latin-1"))


def test_forwarded_host_headers_are_not_trusted(world: Deployment) -> None:
    """X-Forwarded-Host/Proto never stand in for Host in the rebinding check (no proxy is configured)."""
    token = world.tokens["a1"]
    reply = raw_post(
        world.url,
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
        token,
        Host="evil.example",
        **{"X-Forwarded-Host": world.url.split("/")[2], "X-Forwarded-Proto": "http"},
    )
    assert reply.status_code == 421
    assert_invariants(world, reply)


def oversized(world: Deployment, size: int, mode: str, token: str | None) -> Any:
    filler = "x" * size
    if mode == "legacy":
        body = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
        body["params"]["arguments"] = {"text": filler}
        return raw_post(world.url, body, token)
    return raw_post(world.url, modern_call({"text": filler}), token, **MODERN_HEADERS)


def test_a_body_over_the_limit_is_413_on_both_paths(world: Deployment) -> None:
    """Over limits.max_request_bytes (4 MiB by default): the same clear 413 for the handshake era (SDK path) and a
    2026-07-28 tools/call (the fast path's request), audited, and nothing reaches the upstream."""
    mark = max([row["id"] for row in audit(world)], default=0)
    before = world.logs["evil"].count()
    replies = [oversized(world, 5 * 1024 * 1024, mode, world.tokens["a1"]) for mode in ("legacy", "modern")]
    for reply in replies:
        assert reply.status_code == 413
        error = rpc(reply)["error"]
        assert error["code"] == -32600
        assert error["message"] == "Request body too large: the limit is 4194304 bytes (limits.max_request_bytes)"
    assert replies[0].content == replies[1].content
    rows = audit(world, "id > ? AND reason = 'request_too_large'", (mark,))
    assert [(row["agent"], row["decision"]) for row in rows] == [("a1", "deny"), ("a1", "deny")]
    assert world.logs["evil"].count() == before
    assert_invariants(world, *replies)


def test_a_chunked_body_over_the_limit_is_413(world: Deployment) -> None:
    """Without a Content-Length the guard counts what arrives and stops reading at the limit."""
    chunk = b"x" * (1024 * 1024)

    def body() -> Any:
        yield b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"'
        for _ in range(6):
            yield chunk
        yield b'"}}}'

    headers = {
        "Authorization": f"Bearer {world.tokens['a1']}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2025-11-25",
    }
    reply = http().post(world.url, content=body(), headers=headers)
    assert reply.status_code == 413
    assert_invariants(world, reply)


def test_a_stranger_with_a_large_body_gets_the_one_401(world: Deployment) -> None:
    """Nothing about the body is looked at before the token: the one 401, as for an empty request."""
    replies = [oversized(world, 5 * 1024 * 1024, mode, token) for mode in ("legacy", "modern") for token in (None,)]
    reference = raw_post(world.url, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, None)
    for reply in replies:
        assert_e401(reply, reference)
    assert_invariants(world, *replies)
