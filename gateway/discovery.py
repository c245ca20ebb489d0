"""Shadow MCP servers: the ones this machine's clients use without going through the gateway.

Two sources: the known clients' configuration files (gateway.clients) and the running processes (/proc command
lines that look like MCP servers: `npx @modelcontextprotocol/server-*`, `mcp-server-*`, `uvx mcp-*`,
`python -m mcp_server_*`). A server goes through the gateway when it is `enclave connect`, when its URL is the
gateway's, or when it presents an agent token; a process does when the gateway started it.

Inline secrets (credential-like environment variables, headers, arguments or URL parts written into a client's file
or a command line) are reported by where they are, never by value: printed targets have them masked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from gateway.clients import CLIENTS, TOKEN_ENV, Client, ClientConfigError, read_json
from gateway.config import CREDENTIAL_NAME
from gateway.peers import describe, runs_enclave
from gateway.tokens import TOKEN_PREFIX

MASK = "[inline secret]"
# A reference the client expands from its environment or asks the user for: ${VAR}, ${env:VAR}, ${input:id}, ...
CLIENT_REFERENCE = re.compile(r"\$\{[^}]*\}")
# Well-known credential shapes (OpenAI/Anthropic, GitHub, Slack, AWS, GitLab, Google, Stripe, enclave tokens).
CREDENTIAL_VALUE = re.compile(
    r"^(?:Bearer\s+|Basic\s+|token\s+)?(sk-|sk_|ghp_|gho_|ghs_|github_pat_|xox[abprs]-|AKIA|ASIA|glpat-|AIza|ya29\.|"
    r"rk_live_|sk_live_|" + re.escape(TOKEN_PREFIX) + r")",
    re.IGNORECASE,
)
AUTH_SCHEMES = {"", "bearer", "basic", "token"}
MCP_PACKAGE = re.compile(r"^(?:@modelcontextprotocol/server-[\w.-]+|mcp[-_]server[-_][\w.-]+)(?:@[\w.^~-]+)?$")
RUNNERS = {"npx", "uvx", "bunx", "pnpx", "-m"}  # what precedes a package or module name that starts with mcp


def is_inline_secret(name: str, value: str) -> bool:
    """A value written out in the file that is (or holds) a credential; references the client expands are not."""
    literal = CLIENT_REFERENCE.sub("", value).strip()
    if not literal:
        return False
    if CREDENTIAL_VALUE.match(literal):
        return True
    return bool(CREDENTIAL_NAME.search(name)) and literal.lower() not in AUTH_SCHEMES


@dataclass
class Found:
    """One MCP server found on this machine; `spec` (the client's raw entry) is never printed."""

    client: str  # the client's name, or "process"
    name: str
    transport: str  # stdio | http
    target: str  # the command line or URL, inline secrets masked
    secrets: list[str]  # where inline secrets are: env.NAME, headers.NAME, args[i], url
    file: str  # the configuration file, or /proc/PID
    via_gateway: bool = False
    location: tuple[str, ...] = ()  # where the servers map is in the file
    pid: int | None = None
    launched_by: str | None = None
    spec: dict[str, Any] = field(default_factory=dict, repr=False)

    def row(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "server": self.name,
            "via_gateway": self.via_gateway,
            "transport": self.transport,
            "target": self.target,
            "inline_secrets": [f"{where} (inline secret)" for where in self.secrets],
            "file": self.file,
            **({"pid": self.pid, "launched_by": self.launched_by} if self.pid is not None else {}),
        }


# -- command lines and URLs ------------------------------------------------------------------


def secret_args(args: list[str]) -> set[int]:
    """Indexes of arguments that hold credentials: `--api-key=X`, `--token X`, or a credential-shaped value."""
    found = set()
    for index, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if CREDENTIAL_VALUE.match(arg) or (equals and flag.startswith("-") and is_inline_secret(flag, value)):
            found.add(index)
        elif arg.startswith("-") and CREDENTIAL_NAME.search(arg) and index + 1 < len(args):
            following = args[index + 1]
            if not following.startswith("-") and is_inline_secret(arg, following):
                found.add(index + 1)
    return found


def masked_command(command: list[str], hidden: set[int]) -> str:
    return " ".join(MASK if index in hidden else arg for index, arg in enumerate(command))


def url_secrets(url: str) -> tuple[str, bool]:
    """The URL with credentials in its user info or query masked, and whether it had any."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    hidden = [(key, MASK if is_inline_secret(key, value) else value) for key, value in query]
    has_secret = parts.password is not None or any(value == MASK for _, value in hidden)
    if not has_secret:
        return url, False
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username:
        netloc = f"{MASK}@{netloc}"
    shown = parts._replace(netloc=netloc, query="&".join(f"{key}={value}" for key, value in hidden))
    return shown.geturl(), True


# -- client configuration files --------------------------------------------------------------


def server_maps(client: Client, data: dict[str, Any]) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every servers map in a client's file: the top-level one and, for Claude Code, each project's."""
    top = data.get(client.servers_key)
    if isinstance(top, dict):
        yield (client.servers_key,), top
    if client.name == "claude-code" and isinstance(projects := data.get("projects"), dict):
        for project, settings in projects.items():
            if isinstance(settings, dict) and isinstance(servers := settings.get("mcpServers"), dict):
                yield ("projects", project, "mcpServers"), servers


def examine(client: str, name: str, spec: dict[str, Any], gateway_urls: set[str]) -> Found | None:
    """What a client's entry is, where its inline secrets are, and whether it goes through the gateway."""
    url = spec.get("url") or spec.get("serverUrl")
    if isinstance(url, str):
        headers = spec.get("headers") if isinstance(spec.get("headers"), dict) else {}
        target, in_url = url_secrets(url)
        secrets = [f"headers.{key}" for key, value in headers.items() if is_inline_secret(key, str(value))]
        secrets += ["url"] if in_url else []
        via = url.rstrip("/") in gateway_urls or _presents_agent_token(headers)
        return Found(client, name, "http", target, secrets, "", via_gateway=via, spec=spec)
    command = spec.get("command")
    if not isinstance(command, str):
        return None
    args = [str(arg) for arg in spec.get("args") or []]
    env = spec.get("env") if isinstance(spec.get("env"), dict) else {}
    hidden = {index + 1 for index in secret_args(args)}
    secrets = [f"env.{key}" for key, value in env.items() if is_inline_secret(key, str(value))]
    secrets += [f"args[{index - 1}]" for index in sorted(hidden)]
    via = runs_enclave([command, *args], "connect")
    return Found(client, name, "stdio", masked_command([command, *args], hidden), secrets, "", via, spec=spec)


def _presents_agent_token(headers: dict[str, Any]) -> bool:
    value = str(headers.get("Authorization") or headers.get("authorization") or "")
    return TOKEN_ENV in value or TOKEN_PREFIX in value


def scan_client(client: Client, home: Path, gateway_urls: set[str]) -> list[Found]:
    found = []
    for path in client.candidates(home):
        if not path.exists():
            continue
        try:
            data = read_json(path)
        except ClientConfigError:
            continue
        for location, servers in server_maps(client, data):
            for name, spec in servers.items():
                entry = examine(client.name, name, spec, gateway_urls) if isinstance(spec, dict) else None
                if entry is not None:
                    entry.file, entry.location = str(path), location
                    found.append(entry)
    return found


# -- running processes -----------------------------------------------------------------------


def mcp_package(cmdline: list[str]) -> str | None:
    """The MCP server a command line runs, by the names such servers are published under; None otherwise."""
    for index, arg in enumerate(cmdline):
        name = arg if arg.startswith("@") else Path(arg).name
        if MCP_PACKAGE.match(name):
            return name
        if index > 0 and Path(cmdline[index - 1]).name in RUNNERS and re.match(r"^mcp[-_][\w.-]+$", name):
            return name
    return None


def scan_processes() -> list[Found]:
    """Running MCP servers that the gateway did not start; one row per server (of `npx` and the server it runs,
    the launcher)."""
    found: dict[int, tuple[Found, set[int]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        process = describe(int(entry.name), str)
        if process is None or (package := mcp_package(process["cmdline"])) is None:
            continue
        ancestors = list(_ancestors(process["ppid"]))
        if any(runs_enclave(parent["cmdline"], "serve") for parent in ancestors):
            continue
        args = process["cmdline"]
        hidden = secret_args(args)
        server = Found(
            "process",
            package,
            "stdio",
            masked_command(args, hidden),
            [f"args[{index}]" for index in sorted(hidden)],
            f"/proc/{process['pid']}",
            pid=process["pid"],
            launched_by=_application(ancestors),
        )
        found[process["pid"]] = (server, {parent["pid"] for parent in ancestors})
    return [server for server, ancestors in found.values() if not ancestors & found.keys()]


def _ancestors(pid: int) -> Iterator[dict[str, Any]]:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        process = describe(pid, str)
        if process is None:
            return
        yield process
        pid = process["ppid"]


LAUNCHERS = {"npx", "npm", "node", "uvx", "uv", "python", "sh", "bash", "zsh", "dash", "env"}


def _application(ancestors: list[dict[str, Any]]) -> str | None:
    """The first ancestor that is not a launcher or a shell: the application (a client) that started the server."""
    for parent in ancestors:
        name = Path(parent["exe"] or (parent["cmdline"] or ["?"])[0]).name
        if re.sub(r"[\d.]+$", "", name) not in LAUNCHERS:
            return f"{name} (pid {parent['pid']})"
    return None


def discover(home: Path, gateway_urls: set[str], processes: bool = True) -> list[Found]:
    """Every MCP server found in the clients' files under `home` and among the running processes."""
    found = [entry for client in CLIENTS.values() for entry in scan_client(client, home, gateway_urls)]
    return found + (scan_processes() if processes else [])
