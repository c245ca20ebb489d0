"""Chambers: every call into a chamber needs an authorization valid at that moment, spent atomically.

One real gateway for the module; an autouse fixture empties the grant and approval tables before each test,
so every test starts with no authorization at all. Every denial is shown three ways: the agent's error
(-32003, the chamber and how to ask, nothing about grants), the audited reason (found in `enclave audit
--json` by the request id in the message), and the upstream's own log, which did not change.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import mcp_types as types
import pytest
from mcp import MCPError
from mcp.client.session import ClientRequestContext

from tests.harness import (
    ERAS,
    EVIL,
    EXAMPLES,
    ConfigDir,
    GatewayProcess,
    UpstreamLog,
    canary,
    connect,
    python_server,
)

pytestmark = pytest.mark.anyio

AUTHORIZATION_REQUIRED = -32003
DESIGN_TOOLS = ["search_parts", "get_part", "export_design", "slow_count", "confirm_delete"]
CHAMBERS = {
    "vault": {"tools": ["export_design", "get_part"], "resources": ["design://parts/P-3*"], "max_grant_ttl": "1h"},
    "desk": {"tools": ["slow_count"], "approval": "operator", "approval_wait": "30s"},
    "hatch": {"tools": ["echo"], "approval": "operator", "approval_wait": "1s"},
    "porch": {"tools": ["confirm_delete"], "approval": "user", "approval_wait": "20s"},
}
EXPORT = {"part_id": "P-100", "format": "step"}


@dataclass
class World:
    config: ConfigDir
    gateway: GatewayProcess
    tokens: dict[str, str]
    logs: dict[str, UpstreamLog]

    @property
    def url(self) -> str:
        return self.gateway.url

    def grant(self, *args: str) -> str:
        return self.config.cli("grant", *args).stdout.strip()

    def restart(self) -> None:
        self.gateway.stop()
        self.gateway = GatewayProcess(self.config)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("chambers")
    logs = {name: UpstreamLog(root / f"upstream-{name}.jsonl") for name in ("design", "evil")}
    config = (
        ConfigDir(root)
        .secret("design-token", canary())
        .connector(
            "design",
            python_server(
                EXAMPLES / "design_db.py", UPSTREAM_LOG=str(logs["design"].path), DESIGN_TOKEN="${secret:design-token}"
            ),
        )
        .connector("evil", python_server(EVIL, UPSTREAM_LOG=str(logs["evil"].path)))
        .enclave(
            "e1",
            ["a1", "a2"],
            {
                "design": {"tools": DESIGN_TOOLS, "resources": ["design://catalogue", "design://parts/*"]},
                "evil": {"tools": ["echo"]},
            },
            chambers=CHAMBERS,
        )
    )
    tokens = {agent: config.mint(agent, "e1") for agent in ("a1", "a2")}
    world = World(config, GatewayProcess(config), tokens, logs)
    try:
        yield world
    finally:
        world.gateway.stop()


@pytest.fixture(autouse=True)
def no_authorizations(world: World) -> None:
    """Each test starts with no grant and no approval request (test setup, done on the database itself)."""
    with sqlite3.connect(world.config.state_dir / "state.db") as db:
        db.execute("DELETE FROM chamber_grants")
        db.execute("DELETE FROM chamber_approvals")


# -- helpers ---------------------------------------------------------------------------------


def upstream_calls(world: World, connector: str, tool: str) -> int:
    return sum(1 for message in world.logs[connector].calls() if message["params"]["name"] == tool)


def audit_rows(world: World, agent: str) -> list[dict[str, Any]]:
    return json.loads(world.config.cli("audit", "--json", "--agent", agent).stdout)


def audit_row(world: World, agent: str, rows: list[dict[str, Any]] | None = None, **match: Any) -> dict[str, Any]:
    rows = audit_rows(world, agent) if rows is None else rows
    found = [row for row in rows if all(row.get(key) == value for key, value in match.items())]
    assert found, f"no audit row with {match} among {rows[-3:]}"
    return found[-1]


def check_denial(world: World, error: MCPError, agent: str, chamber: str, reason: str, rows: Any = None) -> str:
    """The agent-facing error names the chamber and how to ask, without grant internals; the audit holds the
    reason. Returns the message."""
    message = error.error.message
    assert error.error.code == AUTHORIZATION_REQUIRED, message
    assert f"chamber '{chamber}'" in message
    assert "gr_" not in message and reason not in message
    request_id = re.search(r"\(request id ([0-9a-f]{12})\)$", message)
    assert request_id, message
    row = audit_row(world, agent, rows, correlation_id=request_id.group(1))
    assert (row["decision"], row["reason"], row["chamber"]) == ("deny", reason, chamber)
    return message


async def call(world: World, agent: str, tool: str, arguments: dict[str, Any], mode: str = "legacy") -> Any:
    async with connect(world.url, world.tokens[agent], mode) as client:
        return await client.call_tool(tool, arguments)


async def refused(world: World, agent: str, tool: str, arguments: dict[str, Any], mode: str = "legacy") -> MCPError:
    async with connect(world.url, world.tokens[agent], mode) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool(tool, arguments)
    return caught.value


def text_of(result: types.CallToolResult) -> str:
    assert not result.is_error, result
    return "".join(block.text for block in result.content if isinstance(block, types.TextContent))


async def pending_approval(world: World, agent: str, target: str, deadline: float = 20.0) -> dict[str, Any]:
    """Wait (bounded) until `enclave approvals --json` lists a pending request for this call."""
    with anyio.fail_after(deadline):
        while True:
            listing = await anyio.to_thread.run_sync(world.config.cli, "approvals", "--json")
            rows = [r for r in json.loads(listing.stdout) if (r["agent"], r["target"]) == (agent, target)]
            if rows:
                return rows[0]
            await anyio.sleep(0.1)


# -- grants ----------------------------------------------------------------------------------


async def test_calls_outside_chambers_need_nothing(world: World) -> None:
    assert "P-100" in text_of(await call(world, "a1", "search_parts", {"query": "bolt"}))
    assert audit_row(world, "a1", target="search_parts")["chamber"] is None


@pytest.mark.parametrize("mode", ERAS)
async def test_no_grant(world: World, mode: str) -> None:
    before = upstream_calls(world, "design", "export_design")
    error = await refused(world, "a1", "export_design", EXPORT, mode)
    message = check_denial(world, error, "a1", "vault", "no_grant")
    assert "enclave grant a1 vault --tool export_design" in message
    assert upstream_calls(world, "design", "export_design") == before


@pytest.mark.parametrize("mode", ERAS)
async def test_valid_grant(world: World, mode: str) -> None:
    grant_id = world.grant("a1", "vault", "--tool", "export_design", "--reason", "release review")
    assert re.fullmatch(r"gr_[0-9a-f]{16}", grant_id)
    before = upstream_calls(world, "design", "export_design")
    assert "STEP EXPORT P-100" in text_of(await call(world, "a1", "export_design", EXPORT, mode))
    assert upstream_calls(world, "design", "export_design") == before + 1
    row = audit_row(world, "a1", target="export_design", decision="allow")
    assert (row["chamber"], row["grant_id"]) == ("vault", grant_id)
    listed = json.loads(world.config.cli("grants", "--json", "--agent", "a1").stdout)
    assert [(g["id"], g["used"], g["status"], g["reason"]) for g in listed] == [
        (grant_id, 1, "active", "release review")
    ]


async def test_expired_grant(world: World) -> None:
    world.grant("a1", "vault", "--tool", "export_design", "--ttl", "1s")
    expired_by = time.time() + 1  # the grant was issued before now, on the clock the gateway also uses
    with anyio.fail_after(5):
        while time.time() <= expired_by:
            await anyio.sleep(0.05)
    assert json.loads(world.config.cli("grants", "--json").stdout) == []  # active ones only
    before = upstream_calls(world, "design", "export_design")
    check_denial(world, await refused(world, "a1", "export_design", EXPORT), "a1", "vault", "expired")
    assert upstream_calls(world, "design", "export_design") == before


async def test_grant_revoked_mid_lifetime(world: World) -> None:
    grant_id = world.grant("a1", "vault", "--tool", "export_design", "--uses", "5", "--ttl", "10m")
    before = upstream_calls(world, "design", "export_design")
    async with connect(world.url, world.tokens["a1"]) as client:
        assert "EXPORT" in text_of(await client.call_tool("export_design", EXPORT))
        world.config.cli("revoke-grant", grant_id)
        with pytest.raises(MCPError) as caught:
            await client.call_tool("export_design", EXPORT)
    check_denial(world, caught.value, "a1", "vault", "revoked")
    assert upstream_calls(world, "design", "export_design") == before + 1
    assert world.config.cli("revoke-grant", grant_id, check=False).returncode == 1


async def test_another_agents_grant(world: World) -> None:
    world.grant("a2", "vault", "--tool", "export_design")
    before = upstream_calls(world, "design", "export_design")
    check_denial(world, await refused(world, "a1", "export_design", EXPORT), "a1", "vault", "wrong_agent")
    assert upstream_calls(world, "design", "export_design") == before


async def test_grant_for_another_tool(world: World) -> None:
    world.grant("a1", "vault", "--tool", "get_part")
    before = upstream_calls(world, "design", "export_design")
    check_denial(world, await refused(world, "a1", "export_design", EXPORT), "a1", "vault", "wrong_tool")
    assert upstream_calls(world, "design", "export_design") == before
    assert "P-100" in text_of(await call(world, "a1", "get_part", {"part_id": "P-100"}))


async def test_grant_bound_to_other_arguments(world: World) -> None:
    world.grant("a1", "vault", "--tool", "export_design", "--args", json.dumps(EXPORT), "--uses", "2")
    before = upstream_calls(world, "design", "export_design")
    error = await refused(world, "a1", "export_design", {**EXPORT, "format": "stl"})
    check_denial(world, error, "a1", "vault", "wrong_scope")
    assert upstream_calls(world, "design", "export_design") == before
    # the same arguments in another key order: the digest is canonical
    assert "EXPORT" in text_of(await call(world, "a1", "export_design", {"format": "step", "part_id": "P-100"}))


@pytest.mark.parametrize("mode", ERAS)
async def test_single_use_grant_under_concurrent_calls(world: World, mode: str) -> None:
    grant_id = world.grant("a1", "vault", "--tool", "export_design", "--uses", "1")
    before = upstream_calls(world, "design", "export_design")
    outcomes: list[Any] = []

    async def one(client: Any) -> None:
        try:
            outcomes.append(await client.call_tool("export_design", EXPORT))
        except MCPError as exc:
            outcomes.append(exc)

    async with connect(world.url, world.tokens["a1"], mode) as client:
        await client.list_tools()
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one, client)
    allowed = [o for o in outcomes if isinstance(o, types.CallToolResult)]
    denied = [o for o in outcomes if isinstance(o, MCPError)]
    assert (len(allowed), len(denied)) == (1, 7)
    rows = audit_rows(world, "a1")
    for error in denied:
        check_denial(world, error, "a1", "vault", "used", rows)
    assert upstream_calls(world, "design", "export_design") == before + 1
    assert audit_row(world, "a1", rows, target="export_design", decision="allow")["grant_id"] == grant_id


async def test_grant_survives_a_restart(world: World) -> None:
    world.grant("a1", "vault", "--tool", "export_design", "--uses", "2")
    assert "EXPORT" in text_of(await call(world, "a1", "export_design", EXPORT))
    world.restart()
    assert "EXPORT" in text_of(await call(world, "a1", "export_design", EXPORT))
    before = upstream_calls(world, "design", "export_design")
    check_denial(world, await refused(world, "a1", "export_design", EXPORT), "a1", "vault", "used")
    assert upstream_calls(world, "design", "export_design") == before


async def test_chambered_resource(world: World) -> None:
    async with connect(world.url, world.tokens["a1"]) as client:
        assert (await client.read_resource("design://parts/P-100")).contents  # not in the chamber
        before = world.logs["design"].count()
        with pytest.raises(MCPError) as caught:
            await client.read_resource("design://parts/P-300")
        message = check_denial(world, caught.value, "a1", "vault", "no_grant")
        assert "Resource 'design://parts/P-300'" in message and "--resource design://parts/P-300" in message
        assert world.logs["design"].count() == before
        world.grant("a1", "vault", "--resource", "design://parts/P-300", "--uses", "1")
        assert "Mounting bracket" in (await client.read_resource("design://parts/P-300")).contents[0].text


async def test_a_continued_call_is_spent_once(world: World) -> None:
    """2026 era: the upstream asks for input inside an authorized chamber call, and the agent's retry continues
    that one authorization; a replay, other arguments, or a state the gateway did not issue are refused."""
    world.grant("a1", "porch", "--tool", "confirm_delete", "--uses", "1")
    arguments = {"part_id": "P-200"}
    before = upstream_calls(world, "design", "confirm_delete")
    errors: dict[str, MCPError] = {}
    async with connect(world.url, world.tokens["a1"], "2026-07-28", elicitation_callback=User(True)) as client:

        async def retry(state: str, with_arguments: dict[str, Any], answers: Any) -> Any:
            return await client.session.call_tool(
                "confirm_delete",
                with_arguments,
                input_responses=answers,
                request_state=state,
                allow_input_required=True,
            )

        asked = await client.session.call_tool("confirm_delete", arguments, allow_input_required=True)
        assert isinstance(asked, types.InputRequiredResult) and asked.input_requests
        assert asked.request_state is not None and asked.request_state.startswith("enclave-chamber:ap_")
        answers = {key: types.ElicitResult(action="accept", content={"confirm": True}) for key in asked.input_requests}
        for case, state, with_arguments in (
            ("forged", asked.request_state + "x", arguments),
            ("other arguments", asked.request_state, {"part_id": "P-201"}),
        ):
            with pytest.raises(MCPError) as caught:
                await retry(state, with_arguments, answers)
            errors[case] = caught.value
        assert text_of(await retry(asked.request_state, arguments, answers)) == "P-200: confirmed"
        with pytest.raises(MCPError) as replayed:
            await retry(asked.request_state, arguments, answers)
    rows = audit_rows(world, "a1")
    for error in errors.values():
        check_denial(world, error, "a1", "porch", "tampered", rows)
    check_denial(world, replayed.value, "a1", "porch", "used", rows)
    assert upstream_calls(world, "design", "confirm_delete") == before + 2  # the question, then the answer


def test_grant_command_checks_the_chamber(world: World) -> None:
    cases = {
        ("a1", "vault", "--ttl", "2h"): "longer than chamber 'vault' allows: its max_grant_ttl is 1h",
        ("a1", "nowhere"): "enclave 'e1' has no chamber 'nowhere'",
        ("a1", "vault", "--tool", "search_parts"): "tool 'search_parts' is not in chamber 'vault'",
        ("a1", "vault", "--args", "{}"): "--args binds the arguments of one tool call: give --tool too",
        ("a1", "vault", "--tool", "get_part", "--args", "[1]"): "--args must be a JSON object",
        ("stranger", "vault"): "agent 'stranger' is not listed in any enclave",
    }
    for args, expected in cases.items():
        result = world.config.cli("grant", *args, check=False)
        assert result.returncode == 1 and expected in result.stderr, (args, result.stderr)
        assert result.stdout == ""
    assert json.loads(world.config.cli("grants", "--json", "--all").stdout) == []


def test_chamber_configuration_errors(tmp_path: Any) -> None:
    """Each problem names the file, its line and the field."""
    design = {"tools": ["export_design", "get_part"], "resources": ["design://parts/*"]}
    config = ConfigDir(tmp_path).connector("design", python_server(EXAMPLES / "design_db.py"))
    config.enclave("e1", ["a1"], {"design": design}, chambers={"vault": {"tools": ["get_part"], "max_grant_ttl": "1x"}})
    problems = config.cli("check", check=False).stderr
    assert re.search(
        r"enclaves/e1.yaml:\d+: chambers.vault.max_grant_ttl: invalid duration '1x': use a number", problems
    )

    chambers = {
        "vault": {"tools": ["export_design", "nope"], "resources": ["file:///etc/*"]},
        "desk": {"tools": ["export*"], "approvers": ["alice"]},
    }
    config.enclave("e1", ["a1"], {"design": design}, chambers=chambers)
    # a glob exposure: names are known only once listed, but a literal must still fit prefix + glob
    config.enclave("e2", ["b1"], {"design": {"tools": ["*"], "prefix": "d_"}}, chambers={"c": {"tools": ["get_part"]}})
    result = config.cli("check", check=False)
    assert result.returncode == 1 and "has 5 error(s)" in result.stderr
    for expected in (
        r"e1.yaml:\d+: chambers.vault.tools\[1\]: 'nope' matches no tool this enclave exposes",
        r"e1.yaml:\d+: chambers.vault.resources\[0\]: 'file:///etc/\*' matches no resource this enclave exposes",
        r"e1.yaml:\d+: chambers.desk.approvers: approvers apply only to 'approval: operator'",
        r"e1.yaml:\d+: chambers.vault.tools: 'export_design' is also in chamber 'desk'; it may belong to one chamber",
        r"e2.yaml:\d+: chambers.c.tools\[0\]: 'get_part' matches no tool this enclave exposes \(use the names agents",
    ):
        assert re.search(expected, result.stderr), (expected, result.stderr)


# -- approvals -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ERAS)
async def test_operator_approves_while_the_call_waits(world: World, mode: str) -> None:
    before = upstream_calls(world, "design", "slow_count")
    async with anyio.create_task_group() as tg:
        results: list[Any] = []

        async def waiting_call() -> None:
            results.append(await call(world, "a1", "slow_count", {"n": 1}, mode))

        tg.start_soon(waiting_call)
        request = await pending_approval(world, "a1", "slow_count")
        assert (request["chamber"], request["mode"], request["arguments"]) == ("desk", "operator", {"n": 1})
        assert upstream_calls(world, "design", "slow_count") == before
        await anyio.to_thread.run_sync(world.config.cli, "approve", request["id"])
    assert text_of(results[0]) == "counted 1"
    assert upstream_calls(world, "design", "slow_count") == before + 1
    assert audit_row(world, "a1", target="slow_count", decision="allow")["grant_id"] == request["id"]
    (used,) = json.loads(world.config.cli("approvals", "--json", "--all").stdout)
    assert used["status"] == "used" and used["decided_by"]  # the operator's OS user name


async def test_operator_refuses(world: World) -> None:
    before = upstream_calls(world, "design", "slow_count")
    async with anyio.create_task_group() as tg:
        errors: list[MCPError] = []

        async def waiting_call() -> None:
            errors.append(await refused(world, "a1", "slow_count", {"n": 2}))

        tg.start_soon(waiting_call)
        request = await pending_approval(world, "a1", "slow_count")
        await anyio.to_thread.run_sync(world.config.cli, "deny", request["id"])
    message = check_denial(world, errors[0], "a1", "desk", "approval_denied")
    assert "an operator refused this call" in message
    assert upstream_calls(world, "design", "slow_count") == before
    assert world.config.cli("approve", request["id"], check=False).returncode == 1  # decided once


async def test_retry_uses_an_approval_given_after_the_wait(world: World) -> None:
    before = upstream_calls(world, "evil", "echo")
    error = await refused(world, "a1", "echo", {"text": "hello"})  # chamber 'hatch' waits 1s
    message = check_denial(world, error, "a1", "hatch", "approval_pending")
    approval_id = re.search(r"enclave approve (ap_[0-9a-f]{16})", message).group(1)  # type: ignore[union-attr]
    world.config.cli("approve", approval_id)
    async with connect(world.url, world.tokens["a1"]) as client:
        with pytest.raises(MCPError) as other:  # another call (other arguments) is not covered
            await client.call_tool("echo", {"text": "something else"})
        check_denial(world, other.value, "a1", "hatch", "approval_pending")
        assert text_of(await client.call_tool("echo", {"text": "hello"})) == "hello"
        with pytest.raises(MCPError) as again:  # an approval is single-use
            await client.call_tool("echo", {"text": "hello"})
        check_denial(world, again.value, "a1", "hatch", "approval_pending")
    assert upstream_calls(world, "evil", "echo") == before + 1


class User:
    """The agent's human, reached through the client's elicitation callback."""

    def __init__(self, approve: bool):
        self.approve = approve
        self.questions: list[str] = []

    async def __call__(self, context: ClientRequestContext, params: Any) -> types.ElicitResult:
        self.questions.append(params.message)
        if "approve" in params.requested_schema["properties"]:
            return types.ElicitResult(action="accept", content={"approve": self.approve})
        return types.ElicitResult(action="accept", content={"confirm": True})  # the upstream's own question


@pytest.mark.parametrize("mode", ERAS)
async def test_user_approves_through_elicitation(world: World, mode: str) -> None:
    user = User(approve=True)
    async with connect(world.url, world.tokens["a1"], mode, elicitation_callback=user) as client:
        result = await client.call_tool("confirm_delete", {"part_id": "P-101"})
    assert text_of(result) == "P-101: confirmed"
    assert user.questions[0] == (
        "Agent 'a1' wants to call tool 'confirm_delete' with arguments {\"part_id\":\"P-101\"}. "
        "It is in chamber 'porch': approve this one call?"
    )
    assert user.questions[1] == "Really delete part P-101 (Hex nut M8)?"  # then the upstream asked its own
    (approval,) = json.loads(world.config.cli("approvals", "--json", "--all").stdout)
    assert (approval["mode"], approval["status"], approval["decided_by"]) == ("user", "used", "user")
    assert audit_row(world, "a1", target="confirm_delete", decision="allow")["grant_id"] == approval["id"]


@pytest.mark.parametrize("mode", ERAS)
async def test_user_declines(world: World, mode: str) -> None:
    before = upstream_calls(world, "design", "confirm_delete")
    user = User(approve=False)
    async with connect(world.url, world.tokens["a1"], mode, elicitation_callback=user) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("confirm_delete", {"part_id": "P-102"})
    assert "your user declined this call" in check_denial(world, caught.value, "a1", "porch", "approval_denied")
    assert len(user.questions) == 1
    assert upstream_calls(world, "design", "confirm_delete") == before


@pytest.mark.parametrize("mode", ERAS)
async def test_user_approval_needs_a_client_that_can_ask(world: World, mode: str) -> None:
    before = upstream_calls(world, "design", "confirm_delete")
    error = await refused(world, "a1", "confirm_delete", {"part_id": "P-100"}, mode)
    message = check_denial(world, error, "a1", "porch", "approval_unavailable")
    assert "needs your user's approval, but your client did not declare form elicitation support" in message
    assert "enclave grant a1 porch --tool confirm_delete" in message
    assert upstream_calls(world, "design", "confirm_delete") == before


# -- reach -----------------------------------------------------------------------------------


@pytest.mark.parametrize("offline", [False, True])
def test_reach_marks_chambers(world: World, offline: bool) -> None:
    args = ["reach", "a1", "--json", "--explain", *(["--offline"] if offline else [])]
    rows = {(row["kind"], row["name"]): row for row in json.loads(world.config.cli(*args).stdout)}
    assert {name for kind, name in rows if kind == "tool"} == {*DESIGN_TOOLS, "echo"}
    export = rows["tool", "export_design"]
    assert (export["connector"], export["chamber"]) == ("design", "vault")
    assert export["rule"].split("; ") == [
        "enclaves/e1.yaml: connectors.design.tools 'export_design'",
        "enclaves/e1.yaml: chambers.vault.tools 'export_design'",
    ]
    assert rows["tool", "search_parts"]["chamber"] == "-"
    assert rows["tool", "echo"]["chamber"] == "hatch"
    assert rows["resource", "design://parts/*"]["chamber"] == "vault"
    assert "(partly)" in rows["resource", "design://parts/*"]["rule"]
