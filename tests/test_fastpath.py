"""The fast path answers exactly as the SDK path does, in both protocol eras.

Two gateways serve the same configuration, one with `fast_path: false`, so every request below takes the
SDK's full server on one and the fast path on the other; status, headers that matter and JSON-RPC bodies
must be equal. Upstreams of both eras sit behind them: design_db (mcp 2.3 MCPServer, negotiates
2026-07-28) and server-everything (TypeScript SDK, handshake era). Which path served a call shows at the
upstream: the fast path's requests carry the stdio lane's string ids (`enclave-<n>`), the SDK's integers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx2
import mcp_types as types
import pytest

from tests.harness import (
    EVIL,
    EXAMPLES,
    ConfigDir,
    UpstreamLog,
    canary,
    connect,
    http,
    legacy_session,
    python_server,
    raw_post,
    running,
    wait_for,
)
from tests.nodetools import NODE, ensure_tools, server_everything_stdio

pytestmark = pytest.mark.node

ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientInfo": {"name": "differential", "version": "1"},
}


@dataclass
class Pair:
    fast: str
    slow: str
    token: str
    other_token: str  # another agent's, in the same enclave
    secret: str
    design_log: UpstreamLog
    slow_design_log: UpstreamLog
    old_log: UpstreamLog  # a handshake-era upstream's
    fast_config: ConfigDir
    slow_config: ConfigDir


def config_for(root: Any, fast: bool, secret: str) -> tuple[ConfigDir, UpstreamLog, UpstreamLog]:
    log, old_log = UpstreamLog(root / "design.jsonl"), UpstreamLog(root / "old.jsonl")
    config = (
        ConfigDir(root)
        .gateway(fast_path=fast)
        .secret("evil-key", secret)
        .connector("design", python_server(EXAMPLES / "design_db.py", UPSTREAM_LOG=str(log.path)))
        .connector(
            "evil",
            python_server(EVIL, EVIL_ECHO_VAR="EVIL_API_KEY", EVIL_API_KEY="${secret:evil-key}", EVIL_ECHO_ENV="1"),
        )
        .connector("everything", {"stdio": {"command": str(NODE), "args": server_everything_stdio()[1:]}})
        .connector(  # a handshake-era upstream
            "old",
            python_server(
                EVIL,
                EVIL_LEGACY="1",
                EVIL_LEAK="1",
                EVIL_ECHO_VAR="EVIL_API_KEY",
                EVIL_API_KEY="${secret:evil-key}",
                UPSTREAM_LOG=str(old_log.path),
            ),
        )
        .enclave(
            "e",
            ["agent", "other"],
            {
                "design": {"tools": ["search_parts", "get_part", "confirm_delete", "slow_count"]},
                "evil": {"tools": ["echo", "echo_secret_encodings", "echo_env"]},
                "everything": {"tools": ["echo", "get-sum"], "prefix": "ev_"},
                "old": {"tools": ["echo", "leak_elicit"], "prefix": "old_"},
            },
        )
    )
    return config, log, old_log


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    ensure_tools()
    secret = canary()
    fast_config, log, old_log = config_for(tmp_path_factory.mktemp("fast"), True, secret)
    slow_config, slow_log, _ = config_for(tmp_path_factory.mktemp("slow"), False, secret)
    # Tokens valid on both: the second state directory gets the same agent rows.
    token, other_token = fast_config.mint("agent", "e"), fast_config.mint("other", "e")
    slow_config.state_dir.mkdir(mode=0o700, exist_ok=True)
    (slow_config.state_dir / "state.db").write_bytes((fast_config.state_dir / "state.db").read_bytes())
    (slow_config.state_dir / "state.db").chmod(0o600)
    with running(fast_config) as fast, running(slow_config) as slow:
        for url in (fast.url, slow.url):  # list once: the fast path serves only tools already in the view
            assert call(url, token, "tools/list", {}).status_code == 200
        yield Pair(fast.url, slow.url, token, other_token, secret, log, slow_log, old_log, fast_config, slow_config)


def call(
    url: str,
    token: str,
    method: str,
    params: dict[str, Any],
    capabilities: dict[str, Any] | None = None,
    **headers: str,
) -> httpx2.Response:
    meta = {**ENVELOPE, "io.modelcontextprotocol/clientCapabilities": capabilities or {}}
    body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": {**params, "_meta": meta}}
    routing = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": method}
    if "name" in params:
        routing["Mcp-Name"] = params["name"]
    return raw_post(url, body, token, **{**routing, **headers})


def reply(response: httpx2.Response) -> tuple[int, Any]:
    """Status and JSON-RPC body (an SSE body is reduced to its one message)."""
    text = response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        text = next(line[5:] for line in text.splitlines() if line.startswith("data:"))
    return response.status_code, json.loads(text)


def both(pair: Pair, name: str, arguments: Any, **options: Any) -> tuple[tuple[int, Any], tuple[int, Any]]:
    params = {"name": name, "arguments": arguments}
    fast = reply(call(pair.fast, pair.token, "tools/call", params, **options))
    slow = reply(call(pair.slow, pair.token, "tools/call", params, **options))
    return fast, slow


CASES = {
    "result from a 2026-era upstream": ("search_parts", {"query": "bolt"}),
    "structured result": ("get_part", {"part_id": "P-100"}),
    "tool error result": ("get_part", {"part_id": "P-999"}),
    "result from a handshake-era upstream": ("ev_get-sum", {"a": 2, "b": 3}),
    "text from a handshake-era upstream": ("ev_echo", {"message": "hi"}),
    "invalid arguments": ("search_parts", {"query": 3}),
    "missing argument": ("search_parts", {}),
    "hidden tool": ("export_design", {"part_id": "P-100", "format": "step"}),
    "tool that exists nowhere": ("no_such_tool", {}),
    "redacted echo": ("echo_secret_encodings", {}),
    "input required, not declared": ("confirm_delete", {"part_id": "P-100"}),
}


@pytest.mark.parametrize("case", CASES)
def test_fast_path_replies_as_the_sdk_does(pair: Pair, case: str) -> None:
    name, arguments = CASES[case]
    fast, slow = both(pair, name, arguments)
    assert fast == slow


def test_input_required_passes_through_for_a_client_that_declared_it(pair: Pair) -> None:
    fast, slow = both(pair, "confirm_delete", {"part_id": "P-100"}, capabilities={"elicitation": {"form": {}}})
    # requestState is sealed by the upstream afresh for every call; everything else must match.
    fast_state = fast[1]["result"].pop("requestState")
    slow_state = slow[1]["result"].pop("requestState")
    assert fast == slow
    assert fast[1]["result"]["resultType"] == "input_required"
    assert fast_state and slow_state


def test_secrets_never_leave_either_path(pair: Pair) -> None:
    for name in ("echo_env", "echo_secret_encodings"):
        fast, slow = both(pair, name, {})
        assert fast == slow
        assert pair.secret not in json.dumps(fast)
        assert "[REDACTED]" in json.dumps(fast)


def test_fast_path_reaches_the_upstream_once_per_call(pair: Pair) -> None:
    before = len(pair.design_log.calls())
    fast, _ = both(pair, "search_parts", {"query": "nut"})
    assert fast[0] == 200
    assert len(pair.design_log.calls()) == before + 1  # the fast gateway's own upstream


def test_denied_calls_never_reach_the_upstream(pair: Pair) -> None:
    before = pair.design_log.count()
    both(pair, "search_parts", {"query": 3})
    both(pair, "export_design", {"part_id": "P-100", "format": "step"})
    assert pair.design_log.count() == before


@pytest.mark.parametrize(
    "headers",
    [
        {"Mcp-Name": "get_part"},  # routing header disagrees with the body
        {"Origin": "http://evil.example"},  # DNS rebinding
        {"Accept": "application/json"},  # no SSE accepted
        {"MCP-Protocol-Version": "2025-11-25"},  # another era: not the fast path's
    ],
)
def test_requests_the_sdk_refuses_are_refused_identically(pair: Pair, headers: dict[str, str]) -> None:
    params = {"name": "search_parts", "arguments": {"query": "bolt"}}
    fast = call(pair.fast, pair.token, "tools/call", params, **headers)
    slow = call(pair.slow, pair.token, "tools/call", params, **headers)
    assert (fast.status_code, fast.text) == (slow.status_code, slow.text)
    assert fast.status_code != 200 or "error" in fast.json()


# -- the handshake era (2025-11-25): calls on an open session ------------------------------------------


@dataclass
class Sessions:
    fast: dict[str, str]
    slow: dict[str, str]


def served_session(url: str, token: str, capabilities: dict[str, Any] | None = None) -> dict[str, str]:
    """A handshake-era session that the SDK path has served once (tools/list), as a client's would be."""
    session = legacy_session(url, token, capabilities)
    assert raw_post(url, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, token, **session).status_code == 200
    return session


@pytest.fixture(scope="module")
def sessions(pair: Pair) -> Sessions:
    return Sessions(served_session(pair.fast, pair.token), served_session(pair.slow, pair.token))


def call_in(
    url: str, token: str, session: dict[str, str], name: str, arguments: Any, **headers: str
) -> httpx2.Response:
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": name, "arguments": arguments}}
    return raw_post(url, body, token, **{**session, **headers})


def both_in_session(
    pair: Pair, sessions: Sessions, name: str, arguments: Any, **headers: str
) -> tuple[httpx2.Response, httpx2.Response]:
    return (
        call_in(pair.fast, pair.token, sessions.fast, name, arguments, **headers),
        call_in(pair.slow, pair.token, sessions.slow, name, arguments, **headers),
    )


def upstream_id(log: UpstreamLog, start: int) -> Any:
    """The id of the one tools/call that reached the upstream since message `start`."""
    (forwarded,) = [m for m in log.messages()[start:] if m["method"] == "tools/call"]
    return forwarded["id"]


@pytest.mark.parametrize("case", CASES)
def test_handshake_era_replies_as_the_sdk_does(pair: Pair, sessions: Sessions, case: str) -> None:
    fast, slow = both_in_session(pair, sessions, *CASES[case])
    assert reply(fast) == reply(slow)
    assert fast.headers["content-type"] == slow.headers["content-type"] == "text/event-stream"
    assert fast.headers["mcp-session-id"] == sessions.fast["Mcp-Session-Id"]


@pytest.mark.parametrize(
    "capabilities",
    [{}, {"roots": {"listChanged": True}}, {"elicitation": {"form": {}}}, {"sampling": {}}],
    ids=["nothing declared", "roots", "elicitation", "sampling"],
)
def test_handshake_era_calls_take_the_fast_path(pair: Pair, capabilities: dict[str, Any]) -> None:
    session = served_session(pair.fast, pair.token, capabilities)
    for log, name, arguments in (
        (pair.design_log, "get_part", {"part_id": "P-100"}),  # a 2026-era upstream
        (pair.old_log, "old_echo", {"text": "hi"}),  # a handshake-era one
    ):
        start = log.count()
        assert call_in(pair.fast, pair.token, session, name, arguments).status_code == 200
        assert str(upstream_id(log, start)).startswith("enclave-")


@pytest.mark.anyio
async def test_the_agent_is_asked_on_the_calls_stream_as_on_the_sdk_path(pair: Pair) -> None:
    """What an upstream asks of the agent mid-call reaches it, redacted, and its answer the upstream: a 2026-era
    upstream's input_required result (the gateway asks, then retries) and a handshake-era upstream's pushed
    elicitation (quoting its credential)."""
    seen: dict[str, tuple[str, str, list[str]]] = {}
    for route, url in (("fast", pair.fast), ("slow", pair.slow)):
        asked: list[str] = []

        async def answer(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
            asked.append(params.message)  # noqa: B023 - called before the loop moves on
            return types.ElicitResult(action="accept", content={"confirm": True, "ok": True})

        async with connect(url, pair.token, "legacy", elicitation_callback=answer) as client:
            await client.list_tools()  # as a client does: the SDK path serves the session first
            starts = pair.design_log.count(), pair.old_log.count()
            deleted = await client.call_tool("confirm_delete", {"part_id": "P-100"})
            used = await client.call_tool("old_leak_elicit", {})
        seen[route] = (text(deleted), text(used), asked)
        if route == "fast":  # both calls took the fast path; the first was retried with the agent's answer
            retried = [m for m in pair.design_log.messages()[starts[0] :] if m["method"] == "tools/call"]
            assert [str(m["id"]).startswith("enclave-") for m in retried] == [True, True]
            assert "inputResponses" in retried[1]["params"]
            assert str(upstream_id(pair.old_log, starts[1])).startswith("enclave-")
    assert seen["fast"] == seen["slow"]
    assert seen["fast"] == (
        "P-100: confirmed",
        "accept",
        ["Really delete part P-100 (Hex bolt M8x40)?", "May I use the key [REDACTED]?"],
    )
    assert pair.secret not in json.dumps(seen)


def text(result: types.CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, types.TextContent))


def test_handshake_era_fast_calls_are_audited_as_on_the_sdk_path(pair: Pair) -> None:
    plain = served_session(pair.fast, pair.token)
    call_in(pair.fast, pair.token, plain, "get_part", {"part_id": "P-100"})
    slow = served_session(pair.slow, pair.token)
    call_in(pair.slow, pair.token, slow, "get_part", {"part_id": "P-100"})
    # bytes_out differs by design: the fast path measures the reply it encodes, the SDK path the result before
    # the SDK serialises it for the agent's version.
    same = ("decision", "outcome", "reason", "protocol_version", "client_name", "client_version", "bytes_in")
    fast_row = audited_call(pair.fast_config, plain["Mcp-Session-Id"])
    slow_row = audited_call(pair.slow_config, slow["Mcp-Session-Id"])
    assert {key: fast_row[key] for key in same} == {key: slow_row[key] for key in same}
    assert fast_row["bytes_in"] and fast_row["bytes_out"]


def audited_call(config: ConfigDir, session_id: str) -> dict[str, Any]:
    return audited(config, "get_part", session_id)[0]


def audited(config: ConfigDir, tool: str, session_id: str) -> list[dict[str, Any]]:
    rows = json.loads(config.cli("audit", "--agent", "agent", "--tool", tool, "--json").stdout)
    return [row for row in rows if row["session_id"] == session_id]


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},  # DNS rebinding
        {"Accept": "application/json"},  # no SSE accepted
        {"Content-Type": "text/plain"},
        {"Mcp-Session-Id": "0" * 32},  # a session that does not exist
    ],
)
def test_handshake_era_requests_the_sdk_refuses_are_refused_identically(
    pair: Pair, sessions: Sessions, headers: dict[str, str]
) -> None:
    fast, slow = both_in_session(pair, sessions, "get_part", {"part_id": "P-100"}, **headers)
    assert (fast.status_code, fast.text) == (slow.status_code, slow.text)
    assert fast.status_code >= 400


@pytest.mark.parametrize(
    "change",
    [{"id": [7]}, {"id": None}, {"jsonrpc": "1.0"}, {"params": {"name": "get_part", "arguments": {}, "task": 3}}],
    ids=["id a list", "id null", "not JSON-RPC 2.0", "params invalid for the version"],
)
def test_handshake_era_malformed_requests_are_refused_identically(
    pair: Pair, sessions: Sessions, change: dict[str, Any]
) -> None:
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "get_part", "arguments": {}}}
    fast = raw_post(pair.fast, {**body, **change}, pair.token, **sessions.fast)
    slow = raw_post(pair.slow, {**body, **change}, pair.token, **sessions.slow)
    assert (fast.status_code, fast.text) == (slow.status_code, slow.text)


def test_another_agents_session_and_an_ended_one_do_not_exist_on_either_path(pair: Pair, sessions: Sessions) -> None:
    replies = [
        call_in(url, pair.other_token, session, "get_part", {"part_id": "P-100"})
        for url, session in ((pair.fast, sessions.fast), (pair.slow, sessions.slow))
    ]
    for url in (pair.fast, pair.slow):
        ended = served_session(url, pair.token)
        assert http().delete(url, headers={**ended, "Authorization": f"Bearer {pair.token}"}).status_code == 200
        replies.append(call_in(url, pair.token, ended, "get_part", {"part_id": "P-100"}))
    assert len({(r.status_code, r.text) for r in replies}) == 1
    assert replies[0].status_code == 404


def cancelled_call(
    url: str, token: str, session: dict[str, str], log: UpstreamLog, steps: int = 400, **cancel_headers: str
) -> tuple[int, int, Any]:
    """Start a call of `steps` steps of 50 ms, wait until it reaches the upstream, send notifications/cancelled for it
    (with `cancel_headers`); the cancellation's HTTP status, then the call's reply."""
    start = log.count()
    body = {
        "jsonrpc": "2.0",
        "id": 9,
        "method": "tools/call",
        "params": {"name": "slow_count", "arguments": {"n": steps}},
    }
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2025-11-25",
        "Authorization": f"Bearer {token}",
        **session,
    }
    with http().stream("POST", url, content=json.dumps(body), headers=headers) as response:
        wait_for(lambda: upstream_got(log, start, "tools/call"), "the call at the upstream")
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 9}}
        status = raw_post(url, cancel, token, **{**session, **cancel_headers}).status_code
        response.read()
    return (status, *reply(response))


def upstream_got(log: UpstreamLog, start: int, method: str) -> bool:
    return any(m["method"] == method for m in log.messages()[start:])


def test_a_cancelled_call_ends_as_on_the_sdk_path(pair: Pair, sessions: Sessions) -> None:
    """`notifications/cancelled` names the call: the upstream is told, the call's stream (its head sent while
    the call runs) ends with REQUEST_CANCELLED, and the audit rows of both paths agree."""
    outcomes = []
    for url, session, log in (
        (pair.fast, sessions.fast, pair.design_log),
        (pair.slow, sessions.slow, pair.slow_design_log),
    ):
        start = log.count()
        outcomes.append(cancelled_call(url, pair.token, session, log))
        wait_for(partial(upstream_got, log, start, "notifications/cancelled"), "the cancellation at the upstream")
    cancelled = {"jsonrpc": "2.0", "id": 9, "error": {"code": -32800, "message": "Request cancelled"}}
    assert outcomes[0] == outcomes[1] == (202, 200, cancelled)
    fast_row, slow_row = (  # the newest row of each session's calls, which is the cancelled one
        audited(config, "slow_count", session["Mcp-Session-Id"])[0]
        for config, session in ((pair.fast_config, sessions.fast), (pair.slow_config, sessions.slow))
    )
    same = ("decision", "outcome", "reason", "error_code", "request_id")
    assert {key: fast_row[key] for key in same} == {key: slow_row[key] for key in same}


def test_a_cancellation_the_transport_refuses_cancels_nothing(pair: Pair, sessions: Sessions) -> None:
    """A notifications/cancelled that the SDK's transport refuses (here a foreign Origin: DNS rebinding) is
    refused alike on both paths, and the call it names runs to its end."""
    outcomes = [
        cancelled_call(url, pair.token, session, log, steps=60, Origin="http://evil.example")
        for url, session, log in (
            (pair.fast, sessions.fast, pair.design_log),
            (pair.slow, sessions.slow, pair.slow_design_log),
        )
    ]
    assert outcomes[0][:2] == outcomes[1][:2] == (403, 200)
    assert outcomes[0][2] == outcomes[1][2]
    assert outcomes[0][2]["result"]["content"][0]["text"] == "counted 60"
