"""Fail closed: an exception in authentication, policy (the enclave view), the grant lookup or the audit write
means deny, never allow (threat-principles FAILCLOSED; Envoy's ext_authz default, Vault's blocked audit device;
Kuadrant's fail-open unknown scope).

Faults are injected into the real gateway process at the real decision points (gateway/faults.py,
ENCLAVE_FAULT_INJECT), each scoped to one agent or enclave so that one process serves every case and the ALIVE
agent stays healthy; the last case breaks the state database itself (the grants table is dropped under the
running gateway). Each case shows the denial, that no upstream was contacted, and the trace in the audit log or
the gateway's log.

Proven elsewhere, not repeated: an audit write that cannot commit (the database locked by another writer) refuses
the call (tests/test_audit.py::test_a_failed_audit_write_fails_the_call_closed).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing

import pytest
import yaml
from mcp import MCPError

from tests.harness import ERAS, ConfigDir, connect, modern_post, raw_post
from tests.security.conftest import audit, deploy
from tests.security.invariants import Deployment, assert_e401, assert_invariants

pytestmark = pytest.mark.anyio

FAULTS = "auth@a2,policy@e5,grant_lookup@e1,audit_write@a3"
EXPORT = {"part_id": "P-100", "format": "step"}
VAULT = {"vault": {"tools": ["export_design"]}}
INTERNAL = re.compile(r"Internal gateway error \(correlation id ([0-9a-f]{12})\); the call was denied")


def faulty_configuration(config: ConfigDir) -> dict[str, str]:
    """e1 gets a chamber; e5 (c1) and e6 (a3, a4, with a chamber of its own) are added."""
    e1 = config.root / "enclaves" / "e1.yaml"
    e1.write_text(yaml.safe_dump({**yaml.safe_load(e1.read_text()), "chambers": VAULT}))
    config.enclave("e5", ["c1"], {"design": {"tools": ["search_parts"], "resources": ["design://catalogue"]}})
    config.enclave("e6", ["a3", "a4"], {"design": {"tools": ["search_parts", "export_design"]}}, chambers=VAULT)
    return {"c1": "e5", "a3": "e6", "a4": "e6"}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("faulty")
    with deploy(root, env={"ENCLAVE_FAULT_INJECT": FAULTS}, extend=faulty_configuration) as deployment:
        for agent in ("a1", "a3", "a4"):
            deployment.config.cli("grant", agent, "vault", "--tool", "export_design")
        yield deployment


def exports(deployment: Deployment) -> int:
    return len(deployment.logs["design"].calls())


def internal_error(error: MCPError) -> str:
    """The correlation id of the one internal error reply (no detail of what failed)."""
    assert error.error.code == -32603
    match = INTERNAL.fullmatch(error.error.message)
    assert match, error.error.message
    return match.group(1)


@pytest.mark.parametrize("mode", ERAS)
def test_an_error_while_authenticating_is_the_one_401(faulty: Deployment, mode: str) -> None:
    token = faulty.tokens["a2"]
    before = {name: log.count() for name, log in faulty.logs.items()}
    mark = max([row["id"] for row in audit(faulty)], default=0)
    if mode == "legacy":
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        replies = [raw_post(faulty.url, body, token), raw_post(faulty.url, body, None)]
    else:
        params = {"name": "search_parts", "arguments": {"query": "bolt"}}
        replies = [modern_post(faulty.url, "tools/call", params, t) for t in (token, None)]
    assert_e401(replies[0], replies[1])
    assert {name: log.count() for name, log in faulty.logs.items()} == before
    (row,) = audit(faulty, "id > ? AND reason = 'internal_error'", (mark,))
    assert (row["method"], row["decision"], row["agent"]) == ("auth", "deny", None)
    assert re.fullmatch(r"[0-9a-f]{12}", row["token_fingerprint"])
    assert "authentication failed with an internal error; the request is refused" in faulty.gateway.stderr()
    assert_invariants(faulty, *replies)


@pytest.mark.parametrize("mode", ERAS)
async def test_an_error_in_the_enclave_view_denies(faulty: Deployment, mode: str) -> None:
    """Listing, calling (the 2026-era call would take the fast path) and reading all refuse with the one internal
    error; nothing reaches the upstream."""
    before = exports(faulty)
    mark = max([row["id"] for row in audit(faulty)], default=0)
    errors: list[MCPError] = []
    async with connect(faulty.url, faulty.tokens["c1"], mode) as client:
        for request in (
            client.list_tools(),
            client.call_tool("search_parts", {"query": "bolt"}),
            client.read_resource("design://catalogue"),
        ):
            with pytest.raises(MCPError) as refused:
                await request
            errors.append(refused.value)
    ids = [internal_error(error) for error in errors]
    assert exports(faulty) == before
    rows = audit(faulty, "id > ? AND agent = 'c1'", (mark,))
    assert [(r["method"], r["decision"], r["reason"], r["correlation_id"]) for r in rows] == [
        (method, "error", "internal", correlation)
        for method, correlation in zip(("tools/list", "tools/call", "resources/read"), ids, strict=True)
    ]
    assert "InjectedFault: injected fault at policy" in faulty.gateway.stderr()
    assert_invariants(faulty, *errors)


@pytest.mark.parametrize("mode", ERAS)
async def test_an_error_in_the_grant_lookup_denies(faulty: Deployment, mode: str) -> None:
    """a1 holds a valid grant, but the lookup fails: the chamber's one denial, audited as grant_lookup_failed."""
    before = exports(faulty)
    async with connect(faulty.url, faulty.tokens["a1"], mode) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("export_design", EXPORT)
        assert not (await client.call_tool("search_parts", {"query": "bolt"})).is_error  # outside the chamber
    assert refused.value.error.code == -32003
    assert "gr_" not in refused.value.error.message
    assert exports(faulty) == before + 1  # the search only
    request_id = re.search(r"\(request id ([0-9a-f]{12})\)$", refused.value.error.message)
    assert request_id
    (row,) = audit(faulty, "correlation_id = ?", (request_id.group(1),))
    assert (row["decision"], row["reason"], row["chamber"], row["grant_id"]) == (
        "deny",
        "grant_lookup_failed",
        "vault",
        None,
    )
    assert_invariants(faulty, refused.value)


@pytest.mark.parametrize("mode", ERAS)
async def test_an_error_in_the_audit_write_denies(faulty: Deployment, mode: str) -> None:
    """A chamber call is audited before it is forwarded: if that row cannot be written, the upstream is never
    contacted. An ordinary call is audited when it ends: its reply is withheld (the upstream did answer)."""
    before = exports(faulty)
    errors: list[MCPError] = []
    async with connect(faulty.url, faulty.tokens["a3"], mode) as client:
        for name, arguments in (("export_design", EXPORT), ("search_parts", {"query": "bolt"})):
            with pytest.raises(MCPError) as refused:
                await client.call_tool(name, arguments)
            errors.append(refused.value)
    for error in errors:
        internal_error(error)
    calls = [call["params"]["name"] for call in faulty.logs["design"].calls()[before:]]
    assert "export_design" not in calls
    assert "could not record the request" in faulty.gateway.stderr()
    assert not audit(faulty, "agent = 'a3'")  # nothing of a3's could be written, which is the point
    assert_invariants(faulty, *errors)


async def test_a_grants_table_gone_under_the_running_gateway_denies(faulty: Deployment) -> None:
    """No injection: the state database itself breaks. Runs last (it breaks every chamber of this gateway)."""
    async with connect(faulty.url, faulty.tokens["a4"], "legacy") as client:
        allowed = await client.call_tool("export_design", EXPORT)
        assert not allowed.is_error
        before = exports(faulty)
        with closing(sqlite3.connect(faulty.config.state_dir / "state.db")) as db:
            db.execute("DROP TABLE chamber_grants")
            db.commit()
        with pytest.raises(MCPError) as refused:
            await client.call_tool("export_design", EXPORT)
    assert refused.value.error.code == -32003
    assert exports(faulty) == before
    rows = audit(faulty, "agent = 'a4' AND target = 'export_design' AND method = 'tools/call'")
    assert [(r["decision"], r["reason"]) for r in rows] == [("allow", None), ("deny", "grant_lookup_failed")]
    assert "no such table: chamber_grants" in faulty.gateway.stderr()
    assert_invariants(faulty, allowed, refused.value)
