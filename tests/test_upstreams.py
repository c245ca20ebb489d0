"""Upstream supervision: crashes and hangs become clear errors and nothing else breaks; streamable HTTP
upstreams get their header credentials; shutdown leaves no process behind."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp import MCPError
from mcp.types import CallToolResult, TextContent

from tests.harness import (
    ERAS,
    EVIL,
    EXAMPLES,
    ConfigDir,
    GatewayProcess,
    UpstreamLog,
    canary,
    connect,
    free_port,
    python_server,
    running,
    wait_for,
)

pytestmark = pytest.mark.anyio


def text(result: CallToolResult) -> str:
    assert isinstance(result.content[0], TextContent)
    return result.content[0].text


# -- crash and hang ----------------------------------------------------------------------------------


class Fragile:
    """A gateway whose enclave uses a crashing evil per era, a hanging evil (1 s timeout) and design-db."""

    def __init__(self, root: Path):
        self.logs = {
            name: UpstreamLog(root / f"upstream-{name}.jsonl") for name in ("crash-legacy", "crash-modern", "hang")
        }
        config = ConfigDir(root)
        for era in ("legacy", "modern"):
            log = str(self.logs[f"crash-{era}"].path)
            config.connector(f"crash-{era}", python_server(EVIL, UPSTREAM_LOG=log, EVIL_CRASH_AFTER="2"))
        hang = python_server(EVIL, UPSTREAM_LOG=str(self.logs["hang"].path), EVIL_HANG="1")
        config.connector("hang", {**hang, "timeout_seconds": 1})
        config.connector("design", python_server(EXAMPLES / "design_db.py"))
        config.enclave(
            "e1",
            ["a1"],
            {
                "crash-legacy": {"tools": ["echo"], "prefix": "legacy_"},
                "crash-modern": {"tools": ["echo"], "prefix": "modern_"},
                "hang": {"tools": ["hang", "echo"], "prefix": "slow_"},
                "design": {"tools": ["search_parts"]},
            },
        )
        self.config = config
        self.token = config.mint("a1", "e1")


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fragile, GatewayProcess]]:
    setup = Fragile(tmp_path_factory.mktemp("fragile"))
    with running(setup.config) as gateway:
        yield setup, gateway


def starts(log: UpstreamLog) -> int:
    """How many times the upstream process was started (each start opens with server/discover or initialize)."""
    return sum(m["method"] in ("server/discover", "initialize") for m in log.messages())


@pytest.mark.parametrize("mode", ERAS)
async def test_a_crashed_upstream_is_a_clear_error_then_restarted(
    fragile: tuple[Fragile, GatewayProcess], mode: str
) -> None:
    setup, gateway = fragile
    connector = "crash-legacy" if mode == "legacy" else "crash-modern"
    tool = "legacy_echo" if mode == "legacy" else "modern_echo"
    async with connect(gateway.url, setup.token, mode) as client:
        assert text(await client.call_tool(tool, {"text": "first"})) == "first"
        started = starts(setup.logs[connector])

        with pytest.raises(MCPError) as crashed:  # evil exits on its 2nd tools/call
            await client.call_tool(tool, {"text": "second"})
        assert crashed.value.error.code == -32001
        assert crashed.value.error.message == (
            f"Upstream server '{connector}' is unavailable; the gateway will restart it on the next call"
        )
        assert not (await client.call_tool("search_parts", {"query": "bolt"})).is_error  # others unaffected

        assert text(await client.call_tool(tool, {"text": "third"})) == "third"
    assert starts(setup.logs[connector]) == started + 1
    assert gateway.process.poll() is None


@pytest.mark.parametrize("mode", ERAS)
async def test_a_hanging_upstream_times_out_and_others_keep_working(
    fragile: tuple[Fragile, GatewayProcess], mode: str
) -> None:
    setup, gateway = fragile
    log = setup.logs["hang"]
    async with connect(gateway.url, setup.token, mode) as client, anyio.create_task_group() as tg:
        await client.list_tools()
        outcome: list[MCPError] = []

        async def hang() -> None:
            with pytest.raises(MCPError) as timed_out:
                await client.call_tool("slow_hang", {})
            outcome.append(timed_out.value)

        tg.start_soon(hang)
        # While the call hangs, other connectors (and the same one) answer.
        assert not (await client.call_tool("search_parts", {"query": "nut"})).is_error
        assert text(await client.call_tool("slow_echo", {"text": "still here"})) == "still here"
    assert outcome[0].error.code == -32004
    assert outcome[0].error.message == "Upstream server 'hang' did not answer in time; the request was cancelled"
    wait_for(lambda: any(m["method"] == "notifications/cancelled" for m in log.messages()), "the upstream to be told")
    async with connect(gateway.url, setup.token, mode) as client:
        assert text(await client.call_tool("slow_echo", {"text": "after"})) == "after"


# -- streamable HTTP upstreams -----------------------------------------------------------------------


def serve_http(script: Path, log: UpstreamLog, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(script), "--http", str(port)],
        env={"PATH": "/usr/bin:/bin", "UPSTREAM_LOG": str(log.path), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        assert process.poll() is None, f"{script.name} exited"
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, f"{script.name} to listen", timeout=30)
    return process, f"http://127.0.0.1:{port}/mcp"


@pytest.fixture(scope="module")
def over_http(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, str, str, dict[str, UpstreamLog]]]:
    """design-db and evil as streamable HTTP servers, reached with an injected Authorization header."""
    root = tmp_path_factory.mktemp("http")
    logs = {name: UpstreamLog(root / f"upstream-{name}.jsonl") for name in ("design", "evil")}
    design, design_url = serve_http(EXAMPLES / "design_db.py", logs["design"])
    evil, evil_url = serve_http(EVIL, logs["evil"])
    secret = canary()
    headers = {"Authorization": "Bearer ${secret:http-token}", "X-Deployment": "enclave-test"}
    config = (
        ConfigDir(root)
        .secret("http-token", secret)
        .connector("design", {"http": {"url": design_url, "headers": headers}})
        .connector("evil", {"http": {"url": evil_url, "headers": headers}})
        .enclave("e1", ["a1"], {"design": {"tools": ["search_parts"]}, "evil": {"tools": ["echo_headers"]}})
    )
    token = config.mint("a1", "e1")
    try:
        with running(config) as gateway:
            yield gateway, token, secret, logs
    finally:
        for process in (design, evil):
            process.terminate()
            process.wait(10)


@pytest.mark.parametrize("mode", ERAS)
async def test_http_upstream_with_an_injected_header_credential(
    over_http: tuple[GatewayProcess, str, str, dict[str, UpstreamLog]], mode: str
) -> None:
    gateway, token, secret, logs = over_http
    async with connect(gateway.url, token, mode) as client:
        assert {tool.name for tool in (await client.list_tools()).tools} == {"search_parts", "echo_headers"}
        result = await client.call_tool("search_parts", {"query": "bearing"})
        assert result.structured_content == {
            "result": [{"id": "P-200", "name": "Ball bearing 6204", "material": "chrome steel"}]
        }
        received = (await client.call_tool("echo_headers", {})).structured_content
    assert received is not None
    # What evil received: the connector's headers, the credential (redacted on its way back), no agent token.
    assert received["x-deployment"] == "enclave-test"
    assert received["authorization"] == "Bearer [REDACTED]"
    assert "encl_" not in str(received) and token not in str(received) and secret not in str(received)
    assert logs["design"].calls()[-1]["params"]["arguments"] == {"query": "bearing"}


# -- shutdown ----------------------------------------------------------------------------------------


def descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process below `pid` (the start time tells a reused pid apart)."""
    found: set[tuple[int, str]] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            found |= {(child, start_time(child))} | descendants(child)
    return found


def start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return ""


def running_process(pid: int, started: str) -> bool:
    """Alive and the same process (a zombie has exited already)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and start_time(pid) == started


async def test_shutdown_leaves_no_upstream_process(tmp_path: Path) -> None:
    config = (
        ConfigDir(tmp_path)
        .connector("design", python_server(EXAMPLES / "design_db.py"))
        .connector("time", {"stdio": {"command": "${python}", "args": ["-m", "mcp_server_time"]}})
        .enclave("e1", ["a1"], {"design": {"tools": ["search_parts"]}, "time": {"tools": ["*"]}})
    )
    token = config.mint("a1", "e1")
    gateway = GatewayProcess(config)
    try:
        async with connect(gateway.url, token) as client:
            await client.call_tool("search_parts", {"query": "bolt"})
            await client.call_tool("get_current_time", {"timezone": "UTC"})
        upstreams = descendants(gateway.process.pid)
        assert len(upstreams) >= 2
    finally:
        gateway.stop()  # SIGTERM, as a service manager would
    assert "Application shutdown complete" in gateway.stderr_path.read_text()
    wait_for(lambda: not any(running_process(*p) for p in upstreams), "the upstream processes to exit", timeout=10)
