"""Client onboarding, discovery and adoption against fixture home directories holding each client's real file format.

`install` writes the format each client documents (see gateway/clients.py for the sources), merged into what is
there, with a backup, and a second run changes nothing; tokens never land in a client's file. `discover` finds the
servers that bypass the gateway (files and running processes), flags inline secrets and never prints them; `adopt`
turns them into connectors, after which the client's own configuration reaches the tools through the gateway.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp import Client, StdioServerParameters

from gateway.clients import launcher
from tests.conftest import Topology
from tests.harness import EXAMPLES, ConfigDir, canary, connect, running

pytestmark = pytest.mark.anyio

CLIENT_FILES = {
    "claude-desktop": ".config/Claude/claude_desktop_config.json",
    "claude-code": ".claude.json",
    "cursor": ".cursor/mcp.json",
    "vscode": ".config/Code/User/mcp.json",
    "windsurf": ".codeium/windsurf/mcp_config.json",
}


def fixture_home(home: Path, secret: str) -> dict[str, Path]:
    """Each client's file as the client itself writes it: other settings, other servers, inline secrets."""
    files = {client: home / relative for client, relative in CLIENT_FILES.items()}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    weather = {
        "command": sys.executable,
        "args": [str(EXAMPLES / "weather_api.py")],
        "env": {"WEATHER_API_KEY": secret, "WEATHER_UNITS": "metric"},
    }
    _write(files["claude-desktop"], {"globalShortcut": "Alt+Space", "mcpServers": {"weather": weather}})
    _write(
        files["claude-code"],
        {
            "numStartups": 12,
            "mcpServers": {
                "github": {
                    "type": "stdio",
                    "command": "npx",
                    "args": ["-y", "@modelcontextprotocol/server-github"],
                    "env": {"GITHUB_PERSONAL_ACCESS_TOKEN": secret},
                }
            },
            "projects": {
                "/src/app": {
                    "allowedTools": [],
                    "mcpServers": {
                        "db": {
                            "type": "http",
                            "url": "https://db.example.com/mcp",
                            "headers": {"Authorization": f"Bearer {secret}"},
                        }
                    },
                }
            },
        },
    )
    _write(
        files["cursor"],
        {
            "mcpServers": {
                "search": {"url": f"https://search.example.com/mcp?api_key={secret}"},
                "docs": {
                    "url": "https://docs.example.com/mcp",
                    "headers": {"Authorization": "Bearer ${env:DOCS_TOKEN}"},
                },
            }
        },
    )
    files["vscode"].write_text(
        "// VS Code's mcp.json allows comments\n"
        + json.dumps(
            {
                "inputs": [{"type": "promptString", "id": "jira-key", "description": "Jira key", "password": True}],
                "servers": {
                    "jira": {"type": "stdio", "command": "uvx", "args": ["mcp-server-jira", "--api-key", secret]},
                    "memory": {
                        "type": "stdio",
                        "command": "npx",
                        "args": ["-y", "@modelcontextprotocol/server-memory"],
                    },
                },
            },
            indent=4,
        )
    )
    _write(files["windsurf"], {"mcpServers": {"time": {"command": "uvx", "args": ["mcp-server-time"]}}})
    return files


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2))


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".bak-*"))


@pytest.fixture
def desk(tmp_path: Path) -> ConfigDir:
    """A configuration with an enclave `desk` for agent `alice` and, so far, no connectors."""
    config = ConfigDir(tmp_path / "config")
    (config.root / "enclaves" / "desk.yaml").write_text(
        "name: desk\nagents: [alice]  # the laptop's agent\nconnectors: {}\n"
    )
    return config


# -- client-config / install ---------------------------------------------------------------------


def test_install_writes_each_clients_format_merged_backed_up_idempotent(desk: ConfigDir, tmp_path: Path) -> None:
    secret = canary()
    home = tmp_path / "home"
    files = fixture_home(home, secret)
    token_file = tmp_path / "alice.token"
    token_file.write_text("encl_" + "t" * 43)
    token_file.chmod(0o600)
    url = "http://127.0.0.1:8765/mcp"
    for client, path in files.items():
        original = path.read_bytes()
        extra = ["--token-file", str(token_file)] if client == "claude-desktop" else []
        printed = desk.cli("client-config", client, "--agent", "alice", "--home", str(home), *extra).stdout
        first = desk.cli("install", client, "--agent", "alice", "--home", str(home), *extra)
        assert "updated (previous version kept as" in first.stdout
        [backup] = _backups(path)
        assert backup.read_bytes() == original
        installed = path.read_bytes()
        second = desk.cli("install", client, "--agent", "alice", "--home", str(home), *extra)
        assert "already up to date" in second.stdout
        assert path.read_bytes() == installed and _backups(path) == [backup]

        data = json.loads(installed)
        servers_key = "servers" if client == "vscode" else "mcpServers"
        entry = data[servers_key]["enclave"]
        assert json.loads(printed) == {servers_key: {"enclave": entry}}  # client-config prints what install writes
        assert "encl_" not in installed.decode()  # the token never lands in a client's file
        expected_http = {
            "claude-code": {"type": "http", "url": url, "headers": {"Authorization": "Bearer ${ENCLAVE_TOKEN}"}},
            "cursor": {"url": url, "headers": {"Authorization": "Bearer ${env:ENCLAVE_TOKEN}"}},
            "vscode": {"type": "http", "url": url, "headers": {"Authorization": "Bearer ${env:ENCLAVE_TOKEN}"}},
            "windsurf": {"serverUrl": url, "headers": {"Authorization": "Bearer ${env:ENCLAVE_TOKEN}"}},
        }
        if client == "claude-desktop":  # stdio only: the wrapper, reading the token from the token file
            assert [entry["command"], *entry["args"][:-5]] == launcher()[0]  # the console script, or python -m
            assert entry["args"][-5:] == [
                "connect", "--socket", str(desk.state_dir / "agents.sock"), "--token-file", str(token_file)
            ]  # fmt: skip
            assert data["globalShortcut"] == "Alt+Space"
        else:
            assert entry == expected_http[client]
        before = json.loads(backup.read_text().split("\n", 1)[1] if client == "vscode" else backup.read_text())
        for name in before[servers_key]:  # everything the user had is still there
            assert data[servers_key][name] == before[servers_key][name]
        assert {k: v for k, v in data.items() if k != servers_key} == {
            k: v for k, v in before.items() if k != servers_key
        }


def test_install_refuses_what_would_leak_or_clobber(desk: ConfigDir, tmp_path: Path) -> None:
    home = tmp_path / "home"
    fixture_home(home, canary())
    no_token = desk.cli("install", "claude-desktop", "--agent", "alice", "--home", str(home), check=False)
    assert no_token.returncode == 1 and "token file" in no_token.stderr and "--mint" in no_token.stderr
    loose = tmp_path / "loose.token"
    loose.write_text("encl_" + "t" * 43)
    loose.chmod(0o644)
    refused = desk.cli(
        "install", "claude-desktop", "--agent", "alice", "--home", str(home), "--token-file", str(loose), check=False
    )
    assert refused.returncode == 1 and "chmod 600" in refused.stderr
    clash = desk.cli("install", "windsurf", "--agent", "alice", "--home", str(home), "--name", "time", check=False)
    assert clash.returncode == 1 and "not the gateway" in clash.stderr
    assert not _backups(home / CLIENT_FILES["windsurf"])


async def test_an_installed_http_entry_reaches_the_gateway(topology: Topology, tmp_path: Path) -> None:
    """The entry install writes works as the client will use it: its URL, its header with $ENCLAVE_TOKEN filled in."""
    home = tmp_path / "home"
    topology.config.cli("install", "claude-code", "--agent", "b1", "--home", str(home), "--url", topology.url)
    entry = json.loads((home / ".claude.json").read_text())["mcpServers"]["enclave"]
    assert entry["url"] == topology.url
    header = entry["headers"]["Authorization"].replace("${ENCLAVE_TOKEN}", topology.tokens["b1"])
    async with connect(entry["url"], header.removeprefix("Bearer ")) as client:
        assert {tool.name for tool in (await client.list_tools()).tools} >= {"wx_forecast", "get_current_time"}


# -- discover ------------------------------------------------------------------------------------


async def test_discover_finds_bypassing_servers_and_never_prints_secrets(topology: Topology, tmp_path: Path) -> None:
    secret = canary()
    home = tmp_path / "home"
    fixture_home(home, secret)
    topology.config.cli("install", "cursor", "--agent", "a1", "--home", str(home))  # one that goes through it
    async with connect(topology.url, topology.tokens["b1"]) as client:  # the gateway starts its own time server
        await client.call_tool("get_current_time", {"timezone": "UTC"})
    shadow = subprocess.Popen(  # a published MCP server nobody routed through the gateway
        [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"], stdin=subprocess.PIPE
    )
    try:
        table = topology.config.cli("discover", "--home", str(home))
        listing = topology.config.cli("discover", "--home", str(home), "--json")
    finally:
        shadow.kill()
        shadow.wait()
    for output in (table, listing):
        assert secret not in output.stdout + output.stderr
    rows = json.loads(listing.stdout)
    found = {(row["client"], row["server"]): row for row in rows}
    assert found[("claude-desktop", "weather")]["inline_secrets"] == ["env.WEATHER_API_KEY (inline secret)"]
    assert found[("claude-code", "github")]["inline_secrets"] == ["env.GITHUB_PERSONAL_ACCESS_TOKEN (inline secret)"]
    assert found[("claude-code", "db")]["inline_secrets"] == ["headers.Authorization (inline secret)"]
    assert found[("cursor", "search")]["inline_secrets"] == ["url (inline secret)"]
    assert found[("cursor", "docs")]["inline_secrets"] == []  # ${env:DOCS_TOKEN} is not inline
    assert found[("vscode", "jira")]["inline_secrets"] == ["args[2] (inline secret)"]
    assert "[inline secret]" in found[("vscode", "jira")]["target"]
    assert found[("windsurf", "time")]["target"] == "uvx mcp-server-time"
    assert ("cursor", "enclave") not in found  # installed above: it goes through the gateway
    processes = [row for row in rows if row["client"] == "process"]
    assert [row["pid"] for row in processes if row["pid"] == shadow.pid] == [shadow.pid]
    gateway_children = _children(topology.gateway.process.pid)
    assert gateway_children and not {row["pid"] for row in processes} & gateway_children
    assert "env.WEATHER_API_KEY (inline secret)" in table.stdout and "weather" in table.stdout


def _children(pid: int) -> set[int]:
    """The gateway's upstream processes."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(child) for child in children}


# -- adopt ---------------------------------------------------------------------------------------


async def test_adopt_moves_secrets_and_routes_the_client_through_the_gateway(desk: ConfigDir, tmp_path: Path) -> None:
    secret = canary()
    home = tmp_path / "home"
    files = fixture_home(home, secret)
    desktop = files["claude-desktop"]
    original = desktop.read_bytes()
    args = ["adopt", "claude-desktop", "--home", str(home)]

    unexposed = desk.cli(*args, "--mint", check=False)
    assert unexposed.returncode == 1 and "--expose" in unexposed.stderr and desktop.read_bytes() == original

    adopted = desk.cli(*args, "--expose", "*", "--mint")
    printed = adopted.stdout + adopted.stderr
    assert secret not in printed
    assert "connectors/weather.yaml" in printed and "moved to the secret store" in printed
    assert "WARNING" in adopted.stderr and "every tool" in adopted.stderr  # '*' is said out loud

    connector = yaml.safe_load((desk.root / "connectors" / "weather.yaml").read_text())
    assert connector["stdio"]["env"] == {
        "WEATHER_API_KEY": "${secret:weather-weather-api-key}",
        "WEATHER_UNITS": "metric",
    }
    secret_file = desk.state_dir / "secrets" / "weather-weather-api-key"
    assert secret_file.read_text() == secret and secret_file.stat().st_mode & 0o777 == 0o600
    assert (desk.state_dir.stat().st_mode & 0o777) == 0o700
    enclave = yaml.safe_load((desk.root / "enclaves" / "desk.yaml").read_text())
    assert enclave["connectors"] == {"weather": {"tools": ["*"]}}
    assert "ok: 1 connector(s)" in desk.cli("check").stdout
    for path in (desk.root / "connectors" / "weather.yaml", desk.root / "enclaves" / "desk.yaml", desktop):
        assert secret not in path.read_text()

    [backup] = _backups(desktop)
    assert backup.read_bytes() == original
    client_config = json.loads(desktop.read_text())
    assert set(client_config["mcpServers"]) == {"enclave"} and client_config["globalShortcut"] == "Alt+Space"
    again = desk.cli(*args, "--expose", "*", "--mint")
    assert "nothing to adopt" in again.stderr and _backups(desktop) == [backup]

    entry = client_config["mcpServers"]["enclave"]  # run exactly what Claude Desktop will run
    server = StdioServerParameters(command=entry["command"], args=entry["args"], env=entry.get("env"))
    with running(desk) as gateway:
        async with Client(server, mode="legacy", cache=None) as client:
            result = await client.call_tool("forecast", {"city": "Porto"})
        assert secret not in json.dumps(result.structured_content) + gateway.stderr()
    assert result.structured_content["key_fingerprint"] == hashlib.sha256(secret.encode()).hexdigest()[:12]
    rows = json.loads(desk.cli("audit", "--json", "--tool", "forecast").stdout)
    row = [row for row in rows if row["method"] == "tools/call"][-1]
    assert row["agent"] == "alice" and json.loads(row["process"])["pid"] == os.getpid()


def test_adopt_keeps_comments_and_skips_what_it_cannot_move(desk: ConfigDir, tmp_path: Path) -> None:
    """A secret on a command line cannot become a connector (credentials travel only in the environment): that
    server is named and left alone; the rest is adopted, and the enclave file keeps its comments."""
    secret = canary()
    home = tmp_path / "home"
    files = fixture_home(home, secret)
    (desk.root / "enclaves" / "desk.yaml").write_text(
        "name: desk\nagents: [alice]\n# what the laptop may use\nconnectors:\n  # nothing yet but memory\n"
        "  memory-old:\n    tools: [read_graph]\n"
    )
    desk.connector("memory-old", {"stdio": {"command": "true"}})
    enclave_text, vscode_text = (desk.root / "enclaves" / "desk.yaml").read_text(), files["vscode"].read_text()

    # memory-old already exposes read_graph: the result would not pass `enclave check`, so nothing changes.
    clash = desk.cli("adopt", "vscode", "--home", str(home), "--expose", "read_graph", check=False)
    assert clash.returncode == 1 and "nothing was changed" in clash.stderr and "collision" in clash.stderr
    assert (desk.root / "enclaves" / "desk.yaml").read_text() == enclave_text
    assert files["vscode"].read_text() == vscode_text and not (desk.root / "connectors" / "memory.yaml").exists()

    adopted = desk.cli(
        "adopt", "vscode", "--home", str(home), "--expose", "create_entities", "--expose", "search_nodes"
    )
    assert "jira: not adopted" in adopted.stderr and "command line carries a credential" in adopted.stderr
    assert secret not in adopted.stdout + adopted.stderr
    text = (desk.root / "enclaves" / "desk.yaml").read_text()
    assert "# what the laptop may use" in text and "# nothing yet but memory" in text
    assert yaml.safe_load(text)["connectors"]["memory"] == {"tools": ["create_entities", "search_nodes"]}
    servers = json.loads(files["vscode"].read_text())["servers"]
    assert set(servers) == {"jira", "enclave"}  # jira stays where it was; memory now comes through the gateway
    assert servers["enclave"]["type"] == "http"
