"""Configuration lifecycle: hot reload on file change, SIGHUP and `enclave reload`, gated by policy tests
(threat-principles 4.1.7: "policy tests gate every reload, and a bad reload keeps the old policy"; 4: Pomerium,
"removing a user denies their next request").

A good configuration applies to the next request of every open session (both protocol eras); a bad one
(YAML syntax, schema, failing policy test) is reported and audited, and the old one stays in force, untouched.
Removing an agent, a tool or a connector takes effect at once. Every gateway case ends with NOLEAK and ALIVE.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import MCPError

from tests.conftest import build_topology
from tests.harness import ConfigDir, UpstreamLog, canary, connect, legacy_session, modern_post, raw_post, running
from tests.security.conftest import audit
from tests.security.invariants import ALIVE_AGENT, Deployment, assert_e401, assert_invariants

pytestmark = pytest.mark.anyio

DEADLINE = 15.0
E1_TOOLS = ["search_parts", "get_part"]
E1_TESTS = [
    {"agent": "a1", "allow": ["tool:search_parts", "tool:get_part"]},
    {"agent": "b1", "deny": ["tool:get_part"]},
]
LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}


def write_e1(
    config: ConfigDir,
    tools: list[str],
    agents: tuple[str, ...] = ("a1", "a2"),
    connectors: tuple[str, ...] = ("design", "evil"),
    tests: list[dict[str, Any]] = E1_TESTS,
) -> None:
    exposed = {"design": {"tools": tools}, "evil": {"tools": ["echo"]}}
    config.enclave("e1", list(agents), {c: exposed[c] for c in connectors}, tests=tests)


def rotate_weather_key(deployment: Deployment) -> str:
    """A new weather key in the secrets directory (0600), as an operator rotating it writes it; NOLEAK learns it."""
    key = canary()
    path = deployment.config.root.parent / "vault" / "weather-key"
    path.write_text(key)
    path.chmod(0o600)
    deployment.canaries.append(key)
    return key


@contextmanager
def served(root: Path) -> Iterator[Deployment]:
    """The standard topology with a small e1 (design, evil.echo; policy tests), the weather key read from a secrets
    directory outside the configuration directory (so that it can be rotated, and NOLEAK does not sweep it)."""
    config, secret, weather_secret, logs = build_topology(root / "config")
    vault = root / "vault"
    vault.mkdir(mode=0o700)
    (vault / "weather-key").write_text(weather_secret)
    (vault / "weather-key").chmod(0o600)
    del config.secrets["weather-key"]
    config.gateway(secrets={"dir": str(vault)})
    write_e1(config, E1_TOOLS)
    tokens = {agent: config.mint(agent, enclave) for agent, enclave in (("a1", "e1"), ("a2", "e1"), ("b1", "e2"))}
    with running(config) as gateway:
        assert modern_post(gateway.url, "tools/list", {}, tokens[ALIVE_AGENT]).status_code == 200  # warm for ALIVE
        deployment = Deployment(config, gateway, tokens, [secret, weather_secret], logs)
        yield deployment
        assert_invariants(deployment)


@pytest.fixture
def reloadable(tmp_path: Path) -> Iterator[Deployment]:
    """A gateway of its own, for a test that changes its configuration for good."""
    with served(tmp_path) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def steady(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One gateway for the tests that leave its configuration as they found it."""
    with served(tmp_path_factory.mktemp("steady")) as deployment:
        yield deployment


def reloads(deployment: Deployment) -> list[dict[str, Any]]:
    return audit(deployment, "method = 'config.reload'")


async def reloaded(deployment: Deployment, after: int, trigger: str, decision: str, says: str) -> dict[str, Any]:
    """A reload audited after the first `after`, by `trigger`, whose reason holds `says` (the row is committed
    before the configuration applies, which is before the next request is read)."""

    def found() -> dict[str, Any] | None:
        rows = reloads(deployment)[after:]
        return next((r for r in rows if r["reason"].startswith(trigger + ":") and says in r["reason"]), None)

    row = await wait_for(found, f"a config.reload row by {trigger} with {says!r}")
    assert row["decision"] == decision, row
    return row


async def wait_for(probe: Callable[[], Any], what: str) -> Any:
    """Poll `probe` until it returns something truthy; fail after DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while not (value := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await anyio.sleep(0.05)
    return value


def upstream_processes(log: UpstreamLog) -> set[int]:
    """The live processes started with this upstream log in their environment (one per connector here)."""
    marker = f"UPSTREAM_LOG={log.path}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and marker in (entry / "environ").read_bytes().split(b"\0")
                and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # not exited (a zombie)
            ):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


async def tool_names(client: Any) -> set[str]:
    return {tool.name for tool in (await client.list_tools()).tools}


async def refusal(client: Any, name: str, arguments: dict[str, Any]) -> tuple[int, str]:
    with pytest.raises(MCPError) as refused:
        await client.call_tool(name, arguments)
    return refused.value.error.code, refused.value.error.message


# -- good reloads ------------------------------------------------------------------------------------


async def test_a_tool_added_to_an_enclave_file_reaches_open_sessions_of_both_eras(reloadable: Deployment) -> None:
    export = {"part_id": "P-100", "format": "stl"}
    async with (
        connect(reloadable.url, reloadable.tokens["a1"], "legacy") as legacy,
        connect(reloadable.url, reloadable.tokens["a1"], "2026-07-28") as modern,
    ):
        for client in (legacy, modern):
            assert "export_design" not in await tool_names(client)
            assert await refusal(client, "export_design", export) == (-32602, "Unknown tool: export_design")
        design = upstream_processes(reloadable.logs["design"])
        before = len(reloads(reloadable))

        write_e1(reloadable.config, [*E1_TOOLS, "export_design"])
        row = await reloaded(reloadable, before, "file change", "allow", "enclaves changed e1")

        for client in (legacy, modern):  # the very next request of each open session sees it
            assert "export_design" in await tool_names(client)
            for _ in range(2):  # in the 2026 era the second call takes the fast path (the view is listed)
                result = await client.call_tool("export_design", export)
                assert not result.is_error and "STL EXPORT P-100" in result.content[0].text  # type: ignore[union-attr]
    assert "connectors" not in row["reason"]  # an enclave edit restarts no connector
    assert upstream_processes(reloadable.logs["design"]) == design  # its warm session was kept


async def test_sighup_and_enclave_reload_apply_a_rotated_secret(reloadable: Deployment) -> None:
    """Secret files are not watched (they may live anywhere): an operator rotates one, then tells the gateway.
    The connector restarts with the new key, and the redactor keeps scrubbing the old ones (NOLEAK knows all)."""

    async def fingerprint() -> str:
        async with connect(reloadable.url, reloadable.tokens["b1"]) as client:
            result = await client.call_tool("wx_whoami", {})
        assert result.structured_content is not None
        return result.structured_content["key_fingerprint"]

    first_key = reloadable.canaries[-1]
    assert await fingerprint() == hashlib.sha256(first_key.encode()).hexdigest()[:12]
    for trigger in ("SIGHUP", "enclave reload"):
        key = rotate_weather_key(reloadable)
        before = len(reloads(reloadable))
        if trigger == "SIGHUP":
            os.kill(reloadable.gateway.process.pid, signal.SIGHUP)
        else:
            assert reloadable.config.cli("reload").stdout.strip() == "applied: connectors restarted weather"
        await reloaded(reloadable, before, trigger, "allow", "connectors restarted weather")
        assert await fingerprint() == hashlib.sha256(key.encode()).hexdigest()[:12]
    assert reloadable.config.cli("reload").stdout.strip() == "no change"
    assert "configuration reload (enclave reload): no change" in reloadable.gateway.stderr()
    async with connect(reloadable.url, reloadable.tokens["a1"]) as client:  # the first key, referenced no more
        echoed = await client.call_tool("echo", {"text": f"old key: {first_key}"})
    assert echoed.content[0].text == "old key: [REDACTED]"  # type: ignore[union-attr]


async def test_a_listen_address_change_waits_for_a_restart(steady: Deployment) -> None:
    vault = str(steady.config.root.parent / "vault")
    for port in (1, None):  # moved, then back as it was
        before = len(reloads(steady))
        steady.config.gateway(secrets={"dir": vault}, **({"listen": {"port": port}} if port else {}))
        await reloaded(steady, before, "file change", "allow", "no change; listen changed in gateway.yaml")
        assert "gateway.yaml: listen changed; it applies when the gateway restarts" in steady.gateway.stderr()
        assert modern_post(steady.url, "tools/list", {}, steady.tokens["a1"]).status_code == 200  # same address


# -- bad reloads -------------------------------------------------------------------------------------

BROKEN = {
    "syntax": ("name: e1\nagents: [a1, a2\nconnectors: {}\n", "enclaves/e1.yaml:3: (document): invalid YAML"),
    "schema": (
        "name: e1\nagents: [a1, a2]\nconnectors:\n  design:\n    tools: [search_parts]\n    tols: [get_part]\n",
        "enclaves/e1.yaml:5: connectors.design: unknown field(s) ('tols' was unexpected)",
    ),
    "policy-test": (
        "name: e1\nagents: [a1, a2]\nconnectors:\n  design: {tools: [search_parts]}\n"
        "tests:\n  - {agent: a1, allow: ['tool:search_parts', 'tool:get_part']}\n",
        "enclaves/e1.yaml:6: tests[0].allow[1]: policy test failed: expected allow for a1 -> tool:get_part, got deny",
    ),
}


@pytest.mark.parametrize("kind", BROKEN)
async def test_a_bad_configuration_is_reported_and_the_old_one_stays(steady: Deployment, kind: str) -> None:
    """Each broken file also drops get_part: were any of it applied, get_part would be gone."""
    content, problem = BROKEN[kind]
    async with connect(steady.url, steady.tokens["a1"]) as client:
        assert await tool_names(client) == {"search_parts", "get_part", "echo"}
        before = len(reloads(steady))
        (steady.config.root / "enclaves" / "e1.yaml").write_text(content)

        row = await reloaded(steady, before, "file change", "deny", problem)
        assert "the running configuration stays in force" in row["reason"]
        await wait_for(lambda: problem in steady.gateway.stderr(), "the problem in the gateway's log")

        assert await tool_names(client) == {"search_parts", "get_part", "echo"}  # untouched
        result = await client.call_tool("get_part", {"part_id": "P-101"})
        assert not result.is_error and result.structured_content["name"] == "Hex nut M8"  # type: ignore[index]
    checked = steady.config.cli("check", check=False)
    assert checked.returncode == 1 and problem in checked.stderr
    refused = steady.config.cli("reload", check=False)
    assert refused.returncode == 1 and problem in refused.stderr and "not reloaded" in refused.stderr

    before = len(reloads(steady))
    write_e1(steady.config, E1_TOOLS)  # fixed: the same policy as the one in force
    await reloaded(steady, before, "file change", "allow", "no change")


# -- removal -----------------------------------------------------------------------------------------


async def test_removed_agent_tool_and_connector_stop_at_once(reloadable: Deployment) -> None:
    session = legacy_session(reloadable.url, reloadable.tokens["a2"])  # a2's open handshake-era session
    assert raw_post(reloadable.url, LIST, reloadable.tokens["a2"], **session).status_code == 200
    async with connect(reloadable.url, reloadable.tokens["a1"]) as a1:
        await a1.call_tool("echo", {"text": "hello"})  # the evil connector is running
        evil = await wait_for(lambda: upstream_processes(reloadable.logs["evil"]), "the evil process")
        calls = len(reloadable.logs["design"].calls())
        before = len(reloads(reloadable))

        write_e1(
            reloadable.config,
            ["search_parts"],
            agents=("a1",),
            connectors=("design",),
            tests=[{"agent": "a1", "allow": ["tool:search_parts"], "deny": ["tool:get_part", "tool:echo"]}],
        )
        (reloadable.config.root / "connectors" / "evil.yaml").unlink()
        await reloaded(reloadable, before, "file change", "allow", "connectors removed evil")

        # a2, removed from the enclave: its next request, in its open session or not, gets the one 401 (both eras)
        assert_e401(
            raw_post(reloadable.url, LIST, reloadable.tokens["a2"], **session),
            raw_post(reloadable.url, LIST, None, **session),
        )
        assert_e401(
            modern_post(reloadable.url, "tools/list", {}, reloadable.tokens["a2"]),
            modern_post(reloadable.url, "tools/list", {}, None),
        )
        refused = audit(reloadable, "method = 'auth'")
        assert [row["reason"] for row in refused[-4:]] == ["agent_not_in_enclave", "missing_token"] * 2

        # a1 stays; the removed tools are unknown at once, and no upstream hears of the calls
        assert await tool_names(a1) == {"search_parts"}
        assert await refusal(a1, "get_part", {"part_id": "P-101"}) == (-32602, "Unknown tool: get_part")
        assert await refusal(a1, "echo", {"text": "hi"}) == (-32602, "Unknown tool: echo")
        assert len(reloadable.logs["design"].calls()) == calls
        assert not (await a1.call_tool("search_parts", {"query": "bolt"})).is_error

    # the removed connector's process is gone
    await wait_for(lambda: not upstream_processes(reloadable.logs["evil"]) & evil, "the evil process to exit")


# -- policy tests in `enclave check` -----------------------------------------------------------------


def test_enclave_check_runs_the_policy_tests(tmp_path: Path) -> None:
    """allow / chamber / deny, decided from the static rules: names, globs, prefix, rename, chambers."""
    config = (
        ConfigDir(tmp_path)
        .connector("design", {"stdio": {"command": "design-db"}})
        .connector("weather", {"stdio": {"command": "weather-api"}})
        .enclave("e2", ["b1"], {"weather": {"tools": ["*"], "prefix": "wx_"}})
    )
    passing = [
        {
            "agent": "a1",
            "allow": ["tool:d_search_parts", "tool:fetch", "resource:design://catalogue", "prompt:d_review_part"],
            "chamber": ["tool:d_export_design", "resource:design://parts/P-100"],
            "deny": ["tool:search_parts", "tool:d_get_part", "resource:design://parts/../secrets", "tool:wx_forecast"],
        },
        {"agent": "b1", "allow": ["tool:wx_forecast"], "deny": ["tool:d_search_parts", "prompt:d_review_part"]},
    ]
    design = {
        "tools": ["search_*", "get_part", "export_design"],
        "rename": {"get_part": "fetch"},
        "prefix": "d_",
        "resources": ["design://catalogue", "design://parts/*"],
        "prompts": ["review_part"],
    }
    chambers = {"exports": {"tools": ["d_export_design"], "resources": ["design://parts/*"]}}
    config.enclave("e1", ["a1"], {"design": design}, chambers=chambers, tests=passing)
    assert (
        config.cli("check").stdout.strip() == "ok: 2 connector(s), 2 enclave(s), 2 agent(s), 13 policy test(s) passed"
    )

    failing = [
        {"agent": "a1", "allow": ["tool:d_export_design"], "chamber": ["tool:d_search_parts"]},
        {"agent": "b9", "deny": ["tool:anything", "tool:else"]},
    ]
    config.enclave("e1", ["a1"], {"design": design}, chambers=chambers, tests=failing)
    result = config.cli("check", check=False)
    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if not line.startswith("enclave:")]
    assert [line.split(": ", 2)[1:] for line in problems] == [
        [
            "tests[0].allow[0]",
            "policy test failed: expected allow for a1 -> tool:d_export_design, got chamber: enclave 'e1' "
            "(enclaves/e1.yaml) has it in chamber 'exports'",
        ],
        [
            "tests[0].chamber[0]",
            "policy test failed: expected chamber for a1 -> tool:d_search_parts, got allow: enclave 'e1' "
            "(enclaves/e1.yaml) exposes it (connectors.design.tools) outside any chamber",
        ],
        ["tests[1].agent", "agent 'b9' is listed in no enclave (field 'agents')"],
    ]
