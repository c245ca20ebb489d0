"""The fast path answers exactly as the SDK path does.

Two gateways serve the same configuration, one with `fast_path: false`, so every request below takes the
SDK's full server on one and the fast path on the other; status, headers that matter and JSON-RPC bodies
must be equal. Upstreams of both eras sit behind them: design_db (mcp 2.3 MCPServer, negotiates
2026-07-28) and server-everything (TypeScript SDK, handshake era).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest

from tests.harness import EVIL, EXAMPLES, ConfigDir, UpstreamLog, canary, python_server, raw_post, running
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
    secret: str
    design_log: UpstreamLog


def config_for(root: Any, fast: bool, secret: str) -> tuple[ConfigDir, UpstreamLog]:
    log = UpstreamLog(root / "design.jsonl")
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
        .enclave(
            "e",
            ["agent"],
            {
                "design": {"tools": ["search_parts", "get_part", "confirm_delete"]},
                "evil": {"tools": ["echo", "echo_secret_encodings", "echo_env"]},
                "everything": {"tools": ["echo", "get-sum"], "prefix": "ev_"},
            },
        )
    )
    return config, log


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    ensure_tools()
    secret = canary()
    fast_config, log = config_for(tmp_path_factory.mktemp("fast"), True, secret)
    slow_config, _ = config_for(tmp_path_factory.mktemp("slow"), False, secret)
    # One token, valid on both: the second state directory gets the same agent row.
    token = fast_config.mint("agent", "e")
    slow_config.state_dir.mkdir(mode=0o700, exist_ok=True)
    (slow_config.state_dir / "state.db").write_bytes((fast_config.state_dir / "state.db").read_bytes())
    (slow_config.state_dir / "state.db").chmod(0o600)
    with running(fast_config) as fast, running(slow_config) as slow:
        for url in (fast.url, slow.url):  # list once: the fast path serves only tools already in the view
            assert call(url, token, "tools/list", {}).status_code == 200
        yield Pair(fast.url, slow.url, token, secret, log)


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
