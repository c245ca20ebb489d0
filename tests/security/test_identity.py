"""Identity: a principal is who its own token says, and nothing else (threat-principles 1.1: the Claw Chain's
owner header, Kuadrant's re-injected trust headers, ContextForge's X-Forwarded-For; 1.5: session hijacking).

Proven elsewhere, not repeated: the one identical 401 for every cause in both eras, a cookie among them
(tests/test_auth.py::test_every_authentication_failure_gets_the_same_401); its audit row by token fingerprint
(tests/test_audit.py::test_authentication_failures_are_audited_by_fingerprint); revocation inside open sessions
(tests/test_auth.py::test_revoked_token_is_refused_on_its_next_request); an internal error while
authenticating (test_fail_closed.py).
"""

from __future__ import annotations

import httpx2
import pytest

from tests.harness import ERAS, http, legacy_session, modern_post, raw_post
from tests.security.invariants import Deployment, assert_e401, assert_invariants, rpc, tool_names

E1_TOOLS = {
    "search_parts",
    "get_part",
    "export_design",
    "slow_count",
    "confirm_delete",
    "echo",
    "echo_env",
    "echo_secret_encodings",
    *(f"{prefix}{tool}" for prefix in ("old_", "new_") for tool in ("leak_progress", "leak_elicit", "leak_described")),
}
LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
CALL = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "search_parts", "arguments": {}}}


MODERN_LIST = {
    **LIST,
    "params": {
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
        }
    },
}


def request(world: Deployment, mode: str, token: str | None, **headers: str) -> httpx2.Response:
    if mode == "legacy":
        return raw_post(world.url, LIST, token, **headers)
    return modern_post(world.url, "tools/list", {}, token, **headers)


@pytest.mark.parametrize("mode", ERAS)
def test_a_token_counts_only_in_the_authorization_header(world: Deployment, mode: str) -> None:
    """A valid token anywhere else (query string, cookie, other headers) is no token: the same 401."""
    token = world.tokens["a1"]
    before = {name: log.count() for name, log in world.logs.items()}
    reference = request(world, mode, None)
    elsewhere = {
        "cookie": {"Cookie": f"token={token}; access_token={token}; mcp_token={token}"},
        "X-Api-Key": {"X-Api-Key": token},
        "Proxy-Authorization": {"Proxy-Authorization": f"Bearer {token}"},
        "X-Forwarded-Authorization": {"X-Forwarded-Authorization": f"Bearer {token}"},
        "X-Auth-Token": {"X-Auth-Token": token},
    }
    replies = [request(world, mode, None, **headers) for headers in elsewhere.values()]
    version = "2025-11-25" if mode == "legacy" else "2026-07-28"
    for query in (f"access_token={token}", f"token={token}", f"authorization=Bearer%20{token}"):
        body = LIST if mode == "legacy" else MODERN_LIST
        replies.append(
            http().post(
                f"{world.url}?{query}",
                json=body,
                headers={
                    "Accept": "application/json, text/event-stream",
                    "MCP-Protocol-Version": version,
                    **({} if mode == "legacy" else {"Mcp-Method": "tools/list"}),
                },
            )
        )
    for reply in replies:
        assert_e401(reply, reference)
    assert {name: log.count() for name, log in world.logs.items()} == before
    assert_invariants(world, reference, *replies)


@pytest.mark.parametrize("mode", ERAS)
def test_claimed_identity_changes_nothing(world: Deployment, mode: str) -> None:
    """Headers that name another agent, enclave or a trusted proxy do not change who a1 is."""
    claims = {
        "X-Enclave-Agent": "b1",
        "X-Enclave": "e2",
        "X-Forwarded-For": "127.0.0.1",
        "X-Forwarded-User": "b1",
        "X-Real-Ip": "127.0.0.1",
        "X-Mcp-Virtual-Server": "e2",
        "X-Mcp-Authorized": "true",
        "X-Enclave-Process": '{"agent": "b1", "owner": true}',
    }
    session = legacy_session(world.url, world.tokens["a1"]) if mode == "legacy" else {}
    reply = request(world, mode, world.tokens["a1"], **session, **claims)
    assert reply.status_code == 200, reply.text
    assert tool_names(reply) == E1_TOOLS
    assert_invariants(world, reply)


def test_a_session_is_bound_to_its_agent(world: Deployment) -> None:
    """Another agent's Mcp-Session-Id is useless to it, in the same enclave or another: 404, nothing reached;
    without a token it is the one 401 (a session is never a credential)."""
    owner = legacy_session(world.url, world.tokens["a1"])
    before = {name: log.count() for name, log in world.logs.items()}
    replies = []
    for agent in ("a2", "b1", "h1"):
        for body in (LIST, CALL):
            reply = raw_post(world.url, body, world.tokens[agent], **owner)
            assert reply.status_code == 404, (agent, reply.text)
            assert "result" not in reply.text
            replies.append(reply)
        bearer = {"Authorization": f"Bearer {world.tokens[agent]}", **owner}
        stream = http().get(world.url, headers={"Accept": "text/event-stream", **bearer})
        assert stream.status_code == 404
        deleted = http().delete(world.url, headers=bearer)
        assert deleted.status_code == 404
        replies += [stream, deleted]
    assert_e401(raw_post(world.url, LIST, None, **owner), raw_post(world.url, LIST, None))
    assert {name: log.count() for name, log in world.logs.items()} == before

    still = raw_post(world.url, LIST, world.tokens["a1"], **owner)  # none of that ended the owner's session
    assert still.status_code == 200 and tool_names(still) == E1_TOOLS
    assert rpc(still)["id"] == 1
    assert_invariants(world, *replies, still)
