"""`enclave connect`, the stdio wrapper: both protocol eras through it (calls, the gateway asking the client,
cancellation), the agent process it stands for recorded by the gateway from kernel peer credentials (audit rows and
`enclave agents`), claims kept apart, gateway restarts, and the MCP Inspector CLI (a client nobody here wrote)
through it unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp.types as types
import pytest
import uvicorn
from mcp import Client, MCPError, StdioServerParameters
from uvicorn.server import ServerState

from gateway.http_protocol import StrictHttpTools, http_and_loop, with_peer_credentials
from gateway.peers import PROCESS_STATE_KEY
from tests import nodetools
from tests.harness import (
    ERAS,
    EXAMPLES,
    REPO,
    ConfigDir,
    GatewayProcess,
    UpstreamLog,
    canary,
    modern_post,
    python_server,
    running,
)

pytestmark = pytest.mark.anyio

WEATHER_TOOLS = ["forecast", "whoami"]
DESIGN_TOOLS = ["slow_count", "confirm_delete"]

# The "agent application": a separate process that launches the wrapper the way a client does (its MCP server
# command, token in the environment) and calls a tool with the official client. It reports who it is.
AGENT_APP = """
import json, os, sys, anyio
from mcp import Client, StdioServerParameters

async def main(root, mode):
    wrapper = StdioServerParameters(
        command=sys.executable, args=["-m", "gateway", "--config", root, "connect"],
        env={"ENCLAVE_TOKEN": os.environ["ENCLAVE_TOKEN"], "PYTHONPATH": os.environ["PYTHONPATH"]},
    )
    async with Client(wrapper, mode=mode, cache=None) as client:
        result = await client.call_tool("forecast", {"city": "Lyon"})
    print(json.dumps({"pid": os.getpid(), "exe": os.readlink("/proc/self/exe"), "result": result.structured_content}))

anyio.run(main, sys.argv[1], sys.argv[2])
"""


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ConfigDir, GatewayProcess, str, str]]:
    """A gateway with the weather and design servers for agent `app`; yields (config, gateway, token, weather key).
    The design server logs what it receives to ROOT/upstream-design.jsonl."""
    key = canary()
    root = tmp_path_factory.mktemp("connect")
    design = python_server(EXAMPLES / "design_db.py", UPSTREAM_LOG=str(root / "upstream-design.jsonl"))
    config = (
        ConfigDir(root)
        .secret("weather-key", key)
        .connector("weather", python_server(EXAMPLES / "weather_api.py", WEATHER_API_KEY="${secret:weather-key}"))
        .connector("design", design)
        .enclave("local", ["app"], {"weather": {"tools": WEATHER_TOOLS}, "design": {"tools": DESIGN_TOOLS}})
    )
    token = config.mint("app", "local")
    with running(config) as gateway:
        yield config, gateway, token, key


def wrapper(config: ConfigDir, token: str, *extra: str) -> StdioServerParameters:
    """The wrapper as a client launches it: its command line never holds the token."""
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "gateway", "--config", str(config.root), "connect", *extra],
        env={"ENCLAVE_TOKEN": token, "PYTHONPATH": str(REPO)},
    )


def audit_rows(config: ConfigDir, *args: str) -> list[dict[str, Any]]:
    return json.loads(config.cli("audit", "--json", "--limit", "1000", *args).stdout)


@pytest.mark.parametrize("mode", ERAS)
async def test_audit_and_agents_name_the_agent_process(local: tuple[Any, ...], mode: str) -> None:
    config, gateway, token, key = local
    app = subprocess.run(
        [sys.executable, "-c", AGENT_APP, str(config.root), mode],
        capture_output=True,
        text=True,
        timeout=60,
        env={**config.env(), "ENCLAVE_TOKEN": token, "PYTHONPATH": str(REPO)},
    )
    assert app.returncode == 0, app.stderr
    reported = json.loads(app.stdout)
    assert reported["result"]["key_fingerprint"] == hashlib.sha256(key.encode()).hexdigest()[:12]

    rows = audit_rows(config, "--tool", "forecast")
    calls = [row for row in rows if row["process"] and json.loads(row["process"]).get("pid") == reported["pid"]]
    assert len(calls) == 1 and calls[0]["decision"] == "allow"
    assert calls[0]["protocol_version"] == ("2025-11-25" if mode == "legacy" else mode)
    process = json.loads(calls[0]["process"])
    assert process["exe"] == reported["exe"]
    assert process["user"] and process["uid"] == os.getuid()
    assert process["via"]["ppid"] == reported["pid"] and "connect" in process["via"]["cmdline"]
    assert process["claim"]["ppid"] == reported["pid"]  # what the wrapper says, kept apart

    sessions = json.loads(config.cli("agents", "--json", "--all").stdout)
    mine = [s for s in sessions if s["process"] and s["process"].get("pid") == reported["pid"]]
    assert mine and mine[0]["agent"] == "app" and mine[0]["process"]["exe"] == reported["exe"]
    table = config.cli("agents", "--all").stdout
    assert f"{reported['pid']} {Path(reported['exe']).name} (" in table and "via connect" in table
    assert token not in json.dumps(sessions) + json.dumps(calls) + gateway.stderr()


@pytest.mark.parametrize("mode", ERAS)
async def test_the_gateway_can_ask_the_client(local: tuple[Any, ...], mode: str) -> None:
    """Elicitation through the wrapper: pushed on the call's SSE stream and answered by a POST (handshake era), or an
    input_required result the client retries with its answer (2026-07-28)."""
    config, _, token, _ = local
    asked: list[str] = []

    async def answer(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"confirm": True})

    async with Client(wrapper(config, token), mode=mode, cache=None, elicitation_callback=answer) as client:
        result = await client.call_tool("confirm_delete", {"part_id": "P-100"})
    assert result.content[0].text == "P-100: confirmed"
    assert asked == ["Really delete part P-100 (Hex bolt M8x40)?"]


@pytest.mark.parametrize("mode", ERAS)
async def test_cancellation_reaches_the_upstream(local: tuple[Any, ...], mode: str) -> None:
    """The client gives up on a call: in the handshake era the wrapper posts its notifications/cancelled, in the
    2026-07-28 era it closes the call's POST (that era's cancellation over HTTP); either way the upstream hears it."""
    config, _, token, _ = local
    log = UpstreamLog(config.root / "upstream-design.jsonl")
    async with Client(wrapper(config, token), mode=mode, cache=None) as client:
        started = anyio.Event()

        async def progress(done: float, total: float | None, message: str | None) -> None:
            started.set()

        cancelled_before = len(log.calls("notifications/cancelled"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.call_tool("slow_count", {"n": 400}, progress_callback=progress))
            await started.wait()
            tg.cancel_scope.cancel()
        with anyio.fail_after(10):
            while len(log.calls("notifications/cancelled")) == cancelled_before:
                await anyio.sleep(0.05)
        assert not (await client.call_tool("forecast", {"city": "Nice"})).is_error  # and the session goes on


async def test_a_claim_is_recorded_never_trusted(local: tuple[Any, ...]) -> None:
    """The kernel's peer credentials name the process; a forged claim is only stored as a claim, and it buys a
    request without a valid token nothing."""
    config, gateway, token, _ = local
    forged = json.dumps({"pid": 1, "ppid": 0, "parent_exe": "/usr/bin/trusted-agent"})
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {"_meta": _envelope()}}
    headers = {"X-Enclave-Client-Process": forged, "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"}
    socket_path = str(config.state_dir / "agents.sock")
    async with httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=socket_path)) as http:
        ok = await http.post(
            "http://localhost:0/mcp", json=body, headers={**headers, "Authorization": f"Bearer {token}"}
        )
        refused = await http.post(
            "http://localhost:0/mcp", json=body, headers={**headers, "Authorization": "Bearer encl_forged"}
        )
    assert ok.status_code == 200 and "forecast" in ok.text and "slow_count" in ok.text
    assert refused.status_code == 401
    row = next(r for r in reversed(audit_rows(config)) if r["method"] == "tools/list" and r["request_id"] == "7")
    process = json.loads(row["process"])
    assert process["pid"] == os.getpid() and process["exe"] == os.readlink("/proc/self/exe")
    assert process["claim"] == json.loads(forged)

    # Over TCP there are no peer credentials: the claim is all there is, and it stays a claim.
    response = modern_post(gateway.url, "tools/list", {}, token, 8, **{"X-Enclave-Client-Process": forged})
    assert response.status_code == 200
    row = next(r for r in reversed(audit_rows(config)) if r["method"] == "tools/list")
    assert json.loads(row["process"]) == {"claim": json.loads(forged)}


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_each_connection_is_attributed_on_either_parser(tmp_path: Path, parser: str) -> None:
    """The agents' socket speaks whichever HTTP/1.1 protocol uvicorn runs (httptools where installed, h11
    otherwise): each connection carries its own process, in its requests' state only."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = json.dumps(scope["state"].get(PROCESS_STATE_KEY)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    http = http_and_loop()[0] if parser == "httptools" else "h11"
    config = uvicorn.Config(app, http=http, lifespan="off", log_config=None)
    config.load()
    app_state: dict[str, Any] = {"shared": True}
    protocol = partial(
        with_peer_credentials(config.http_protocol_class),
        config=config,
        server_state=ServerState(),
        app_state=app_state,
        scrub=str,
    )
    socket_path = tmp_path / "agents.sock"
    server = await asyncio.get_running_loop().create_unix_server(protocol, str(socket_path))
    try:
        async with httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=str(socket_path))) as client:
            replies = [(await client.get("http://localhost/")).json() for _ in range(2)]
    finally:
        server.close()
    assert issubclass(config.http_protocol_class, StrictHttpTools) == (parser == "httptools")
    for process in replies:
        assert process["pid"] == os.getpid() and process["uid"] == os.getuid()
        assert process["exe"] == os.readlink("/proc/self/exe")
    assert app_state == {"shared": True}


def _envelope() -> dict[str, Any]:
    return {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
    }


@pytest.mark.parametrize("mode", ERAS)
async def test_gateway_restart_errors_in_flight_then_reconnects(tmp_path: Path, mode: str) -> None:
    config = (
        ConfigDir(tmp_path)
        .secret("design-token", canary())
        .connector("design", python_server(EXAMPLES / "design_db.py", DESIGN_TOKEN="${secret:design-token}"))
        .enclave("local", ["app"], {"design": {"tools": ["search_parts", "slow_count"]}})
    )
    token = config.mint("app", "local")
    gateway = GatewayProcess(config)
    try:
        async with Client(wrapper(config, token), mode=mode, cache=None) as client:
            assert not (await client.call_tool("search_parts", {"query": "bolt"})).is_error
            running_call = anyio.Event()

            async def progress(done: float, total: float | None, message: str | None) -> None:
                running_call.set()

            async def slow_call() -> MCPError | None:
                try:
                    await client.call_tool("slow_count", {"n": 400}, progress_callback=progress)
                except MCPError as exc:
                    return exc
                return None

            outcome: list[MCPError | None] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _collect(slow_call, outcome))
                await running_call.wait()  # progress arrived through the wrapper: the call is in flight
                gateway.process.kill()  # a crash, not a graceful stop
                gateway.stop()
            assert outcome[0] is not None, "the in-flight call must fail, not hang or succeed"
            assert outcome[0].error.code == -32000
            assert "lost before the reply" in outcome[0].error.message
            assert "may or may not have run" in outcome[0].error.message

            gateway = GatewayProcess(config)  # same state directory, same socket
            # The same client session goes on: the wrapper reopened the gateway session (handshake era) itself.
            result = await client.call_tool("search_parts", {"query": "bolt"})
            assert not result.is_error and "Hex bolt" in result.content[0].text
    finally:
        gateway.stop()


async def _collect(call: Any, into: list[Any]) -> None:
    into.append(await call())


async def test_unreachable_gateway_and_refused_token_are_clear_errors(local: tuple[Any, ...], tmp_path: Path) -> None:
    config, _, token, _ = local
    nowhere = tmp_path / "no-gateway.sock"
    down = await _first_error(wrapper(config, token, "--socket", str(nowhere), "--wait", "0.3"), "legacy")
    assert "not reachable" in down.error.message and "enclave serve" in down.error.message
    refused = await _first_error(wrapper(config, "encl_" + "x" * 43), "2026-07-28")
    assert "refused the agent token (HTTP 401)" in refused.error.message


async def _first_error(server: StdioServerParameters, mode: str) -> MCPError:
    """The JSON-RPC error a client gets on connecting and listing tools (the SDK may wrap it in a group)."""
    try:
        async with Client(server, mode=mode, cache=None) as client:
            await client.list_tools()
    except BaseException as exc:  # the MCPError may come inside an exception group
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        assert isinstance(exc, MCPError), exc
        return exc
    raise AssertionError("no error")


def test_the_token_never_comes_from_argv(local: tuple[Any, ...], tmp_path: Path) -> None:
    config, _, token, _ = local
    assert "--token " not in config.cli("connect", "--help").stdout
    typed = config.cli("connect", "--token", token, check=False)
    assert typed.returncode == 2 and "never taken from the command line" in typed.stderr and token not in typed.stderr
    missing = config.cli("connect", check=False)
    assert missing.returncode == 1 and "ENCLAVE_TOKEN" in missing.stderr and "--token-file" in missing.stderr
    shared = tmp_path / "token"
    shared.write_text(token)
    shared.chmod(0o644)
    loose = config.cli("connect", "--token-file", str(shared), check=False)
    assert loose.returncode == 1 and "chmod 600" in loose.stderr and token not in loose.stderr


@pytest.mark.node
@pytest.mark.parametrize("era", ("legacy", "modern"))
def test_inspector_cli_through_the_wrapper(
    local: tuple[Any, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, era: str
) -> None:
    """The inspector starts the wrapper as its stdio server, unchanged. It passes the server only the environment
    it is told to on its own command line (-e), so the token goes in a token file instead."""
    nodetools.require_tools()
    monkeypatch.setenv("HOME", str(tmp_path))  # the inspector keeps a catalogue under $HOME
    config, _, token, key = local
    token_file = tmp_path / "app.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    command = [
        sys.executable, "-m", "gateway", "connect",
        "--socket", str(config.state_dir / "agents.sock"), "--token-file", str(token_file),
        "--cwd", str(REPO), "--protocol-era", era,
    ]  # fmt: skip
    code, listed = nodetools.inspector_json([*command, "--method", "tools/list"])
    assert code == 0, listed
    assert {tool["name"] for tool in listed["result"]["tools"]} == {
        "forecast",
        "whoami",
        "slow_count",
        "confirm_delete",
    }
    code, called = nodetools.inspector_json(
        [*command, "--method", "tools/call", "--tool-name", "forecast", "--tool-arg", "city=Oslo"]
    )
    assert code == 0, called
    assert called["result"]["structuredContent"]["key_fingerprint"] == hashlib.sha256(key.encode()).hexdigest()[:12]
    assert key not in json.dumps(called)
