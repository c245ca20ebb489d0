"""Hostile agents with valid tokens: malformed and oversized input, parser differentials, floods, slow bodies
(threat-principles 1.2: the Go SDK's case-folding differential, the Python SDK's crashes on malformed input;
the MCP hardening checklist: body size, rate and concurrency limits, timeouts).

One gateway with tight limits (below); every refusal is checked to be the same on both request paths (a
handshake-era request goes to the SDK's server, a 2026-07-28 tools/call to the fast path), audited, and never to
reach an upstream. Per-agent limits are shown not to touch other agents by the ALIVE invariant (agent b1) and by
a2, served while a1 is refused.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import pytest
from mcp import MCPError

from tests.harness import ERAS, connect, http, legacy_session, raw_post
from tests.security.conftest import audit, deploy
from tests.security.invariants import Deployment, assert_invariants, rpc

pytestmark = pytest.mark.anyio

LIMITS = {
    "max_request_bytes": 65536,
    "max_json_depth": 32,
    "request_read_seconds": 1,
    "agent_rate_per_second": 10,
    "agent_burst": 20,
    "agent_concurrency": 2,
    "agent_sessions": 3,
}
MODERN = "2026-07-28"
ENVELOPE = (
    '"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",'
    '"io.modelcontextprotocol/clientCapabilities":{},"io.modelcontextprotocol/clientInfo":{"name":"raw","version":"0"}}'
)
HEADERS = {
    "legacy": {"MCP-Protocol-Version": "2025-11-25"},
    "modern": {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "echo"},
}


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    def agents(config: Any) -> dict[str, str]:
        config.enclave(
            "e4", ["flood", "slow"], {"design": {"tools": ["slow_count", "search_parts"]}, "evil": {"tools": ["echo"]}}
        )
        return {"flood": "e4", "slow": "e4"}

    with deploy(tmp_path_factory.mktemp("strict"), settings={"limits": LIMITS}, extend=agents) as deployment:
        for agent in ("a1", "flood", "slow"):  # list once: 2026-era calls of listed tools take the fast path
            assert (
                raw_post(
                    deployment.url,
                    {"jsonrpc": "2.0", "id": 0, "method": "tools/list"},
                    deployment.tokens[agent],
                    **legacy_session(deployment.url, deployment.tokens[agent]),
                ).status_code
                == 200
            )
        yield deployment


def call_body(arguments: str, *, modern: bool, extra: str = "") -> str:
    """A tools/call of `echo` with `arguments` (raw JSON text), as either era sends it."""
    meta = "," + ENVELOPE if modern else ""
    params = f'{{"name":"echo","arguments":{arguments}{meta}}}'
    return f'{{"jsonrpc":"2.0","id":5,"method":"tools/call"{extra},"params":{params}}}'


def nested(depth: int) -> str:
    return '{"a":' * (depth - 1) + "1" + "}" * (depth - 1)


@dataclass(frozen=True)
class Malformed:
    """A body built from the era's tools/call of echo, and the start of the error it must get."""

    code: int
    message: str
    arguments: str = '{"text":"x"}'
    extra: str = ""  # more members of the message, after "method"
    shape: str = "MESSAGE"  # what the message is put in

    def body(self, modern: bool) -> str:
        return self.shape.replace("MESSAGE", call_body(self.arguments, modern=modern, extra=self.extra))


MALFORMED = {
    "duplicate method": Malformed(-32700, "Parse error: duplicate key 'method'", extra=',"method":"tools/list"'),
    "duplicate argument": Malformed(-32700, "Parse error: duplicate key 'text'", '{"text":"x","text":"y"}'),
    "too deep": Malformed(-32700, "Parse error: nested deeper than 32 levels", '{"deep":' + nested(40) + "}"),
    "NaN": Malformed(-32700, "Parse error: NaN is not JSON", '{"text":NaN}'),
    "huge number": Malformed(-32700, "Parse error: number 1e999 is out of range", '{"text":1e999}'),
    "lone surrogate": Malformed(-32700, "Parse error: a string holds an unpaired UTF-16", '{"text":"\\ud800"}'),
    "batch": Malformed(-32600, "JSON-RPC batches are not supported", shape="[MESSAGE]"),
    "not an object": Malformed(-32600, "Invalid request: the body must be one JSON-RPC message", shape='"tools/call"'),
    "not JSON": Malformed(-32700, "Parse error: Expecting", '{"text":"x"'),
}


def post_raw(deployment: Deployment, body: bytes | str, agent: str, era: str) -> httpx2.Response:
    headers = {
        "Authorization": f"Bearer {deployment.tokens[agent]}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        **HEADERS[era],
    }
    return http().post(deployment.url, content=body, headers=headers)


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_bodies_get_one_answer_on_both_paths(strict: Deployment, case: str) -> None:
    """What two JSON readers could read differently is refused before either reads it: 400, a JSON-RPC error,
    byte-identical for the SDK path and the fast path, audited as malformed_request; no upstream contact."""
    malformed = MALFORMED[case]
    before = {name: log.count() for name, log in strict.logs.items()}
    mark = max([row["id"] for row in audit(strict)], default=0)
    replies = [post_raw(strict, malformed.body(era == "modern"), "a1", era) for era in ("legacy", "modern")]
    for reply in replies:
        assert reply.status_code == 400, reply.text
        error = rpc(reply)["error"]
        assert error["code"] == malformed.code and error["message"].startswith(malformed.message), error
    if case != "not JSON":  # its message names the column of the error, and the two bodies differ in length
        assert replies[0].content == replies[1].content
    rows = audit(strict, "id > ? AND agent = 'a1'", (mark,))
    assert [(row["decision"], row["reason"]) for row in rows] == [("deny", "malformed_request")] * 2
    assert {name: log.count() for name, log in strict.logs.items()} == before
    assert_invariants(strict, *replies)


@pytest.mark.parametrize(
    "body",
    ['{"jsonrpc":"2.0","id":1,"method":"tools/list"}'.encode("utf-16"), b'{"jsonrpc":"2.0","id":1,"x":"\xff"}'],
    ids=["utf-16", "invalid utf-8"],
)
def test_a_body_that_is_not_utf8_is_refused(strict: Deployment, body: bytes) -> None:
    """The standard library's JSON reader would take UTF-16 and UTF-32; pydantic-core would not."""
    replies = [post_raw(strict, body, "a1", era) for era in ("legacy", "modern")]
    assert {(r.status_code, r.content) for r in replies} == {
        (400, b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error: the body is not UTF-8"}}')
    }
    assert_invariants(strict, *replies)


def test_nesting_at_the_limit_is_served(strict: Deployment) -> None:
    reply = post_raw(strict, call_body('{"text":"x","deep":' + nested(29) + "}", modern=True), "a1", "modern")
    assert "Parse error" not in reply.text and reply.status_code in (200, 400)  # the tool's own schema decides
    assert_invariants(strict, reply)


async def test_the_rate_limit_answers_429_with_a_retry_hint(strict: Deployment) -> None:
    """Over agent_rate_per_second and agent_burst: 429, Retry-After, JSON-RPC -32005 with retryAfterSeconds,
    audited as rate_limited, in both eras (the official client surfaces it as an MCPError); a2 is still served."""
    mark = max([row["id"] for row in audit(strict)], default=0)
    body = call_body('{"text":"hi"}', modern=True)
    replies = [post_raw(strict, body, "flood", "modern") for _ in range(40)]
    statuses = [reply.status_code for reply in replies]
    assert statuses[:20] == [200] * 20 and 429 in statuses, statuses
    refused = next(reply for reply in replies if reply.status_code == 429)
    error = rpc(refused)["error"]
    assert error["code"] == -32005 and error["message"].startswith("Too many requests: the limit is 10 per second")
    assert 0 < error["data"]["retryAfterSeconds"] <= 1 and refused.headers["retry-after"] == "1"
    served = post_raw(strict, body, "a2", "modern")
    assert served.status_code == 200

    for mode in ERAS:
        await anyio.sleep(0.5)  # enough for the client's handshake, not for its calls
        async with connect(strict.url, strict.tokens["flood"], mode) as client:
            with pytest.raises(MCPError) as limited:
                while True:
                    await client.call_tool("echo", {"text": "again"})
        assert limited.value.error.code == -32005
    rows = audit(strict, "id > ? AND agent = 'flood' AND decision = 'deny'", (mark,))
    assert rows and {row["reason"] for row in rows} == {"rate_limited"}
    assert {row["target"] for row in rows if row["method"] == "tools/call"} == {"echo"}

    await anyio.sleep(2.2)  # a full burst again
    assert post_raw(strict, body, "flood", "modern").status_code == 200
    assert_invariants(strict, *replies, served)


async def test_the_concurrency_limit_answers_429(strict: Deployment) -> None:
    """A third request while two are in flight (agent_concurrency 2): 429 concurrency_limited, nothing forwarded;
    once they are answered the agent is served again."""
    mark = max([row["id"] for row in audit(strict)], default=0)
    design = strict.logs["design"]
    slow = call_body('{"n":30}', modern=True).replace('"echo"', '"slow_count"')
    headers = {
        "Authorization": f"Bearer {strict.tokens['slow']}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        **HEADERS["modern"],
        "Mcp-Name": "slow_count",
    }
    answered: list[httpx2.Response] = []
    async with httpx2.AsyncClient(timeout=30) as client, anyio.create_task_group() as tg:
        started = len(design.calls())

        async def one() -> None:
            answered.append(await client.post(strict.url, content=slow, headers=headers))

        tg.start_soon(one)
        tg.start_soon(one)
        with anyio.fail_after(10):
            while len(design.calls()) < started + 2:
                await anyio.sleep(0.02)
        third = post_raw(strict, call_body('{"text":"x"}', modern=True), "slow", "modern")
    assert third.status_code == 429
    assert rpc(third)["error"]["message"].startswith("Too many requests in flight: the limit is 2 at once")
    assert [reply.status_code for reply in answered] == [200, 200]
    assert len(design.calls()) == started + 2
    rows = audit(strict, "id > ? AND agent = 'slow' AND decision = 'deny'", (mark,))
    assert [(row["reason"], row["target"]) for row in rows] == [("concurrency_limited", "echo")]
    assert post_raw(strict, call_body('{"text":"x"}', modern=True), "slow", "modern").status_code == 200
    assert_invariants(strict, third, *answered)


def read_reply(sock: socket.socket) -> str:
    """One HTTP reply from `sock`: its head, and as much body as its Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = re.search(rb"content-length: ([0-9]+)", head, re.IGNORECASE)
    while length and len(body) < int(length.group(1)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the body"
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_a_body_that_never_arrives_times_out(strict: Deployment) -> None:
    """A slow-loris body: 408 after request_read_seconds, audited; the connection is not held."""
    port = int(strict.url.split(":")[2].split("/")[0])
    head = (
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {strict.tokens['a2']}\r\n"
        "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        "MCP-Protocol-Version: 2025-11-25\r\nContent-Length: 100\r\n\r\n"
    )
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"jsonrpc":')
        reply = read_reply(sock)
    assert reply.startswith("HTTP/1.1 408 "), reply
    assert 0.9 < time.monotonic() - started < 5
    assert "Request body not received within 1 s (limits.request_read_seconds)" in reply
    assert audit(strict, "agent = 'a2' AND reason = 'request_timeout'")
    assert_invariants(strict, reply)


def test_unknown_methods_and_notification_floods_harm_no_one(strict: Deployment) -> None:
    """Unknown methods get method-not-found; a flood of notifications is accepted until the agent's rate is
    spent, then refused; never a 5xx, and the other enclave's agent is served throughout (ALIVE)."""
    replies = []
    session = legacy_session(strict.url, strict.tokens["h1"])
    for index in range(5):
        body = {"jsonrpc": "2.0", "id": index, "method": f"evil/unknown_{index}", "params": {}}
        replies.append(raw_post(strict.url, body, strict.tokens["h1"], **session))
    assert {rpc(reply)["error"]["code"] for reply in replies} == {-32601}
    notifications = [
        raw_post(strict.url, {"jsonrpc": "2.0", "method": "notifications/whatever"}, strict.tokens["h1"], **session)
        for _ in range(60)
    ]
    statuses = {reply.status_code for reply in notifications}
    assert statuses <= {202, 429} and 429 in statuses, statuses
    assert_invariants(strict, *replies, *notifications)


def test_oversized_body_in_a_session_is_413(strict: Deployment) -> None:
    """The configured limit (64 KiB here) on both paths."""
    big = json.dumps({"text": "x" * 70_000})
    replies = [post_raw(strict, call_body(big, modern=era == "modern"), "a2", era) for era in ("legacy", "modern")]
    assert [reply.status_code for reply in replies] == [413, 413]
    assert replies[0].content == replies[1].content
    assert_invariants(strict, *replies)


def test_one_agent_cannot_take_every_session(strict: Deployment) -> None:
    """Over agent_sessions (3 here) another handshake-era session is refused (429, audited as session_limit) until
    the agent ends one; other agents open theirs meanwhile."""
    token = strict.tokens["a2"]
    opened = [legacy_session(strict.url, token) for _ in range(3)]
    hello = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}
    initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello}
    refused = raw_post(strict.url, initialize, token)
    assert refused.status_code == 429 and "mcp-session-id" not in refused.headers
    assert rpc(refused)["error"]["message"].startswith("Too many open sessions: the limit is 3 per agent")
    assert audit(strict, "agent = 'a2' AND reason = 'session_limit'")
    assert legacy_session(strict.url, strict.tokens["h1"])  # another agent's are its own
    ended = http().delete(strict.url, headers={"Authorization": f"Bearer {token}", **opened[0]})
    assert ended.status_code == 200
    assert legacy_session(strict.url, token)
    assert_invariants(strict, refused, ended)
