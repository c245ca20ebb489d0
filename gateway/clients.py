"""MCP clients on this machine: where each keeps its servers, the entry that routes it through the gateway, safe
edits of those files (merged, backed up, idempotent), and where a local client's agent token comes from.

Formats, as each client documents them (checked November 2026):

- Claude Desktop: `claude_desktop_config.json`, `mcpServers` -> {command, args, env}; local servers are stdio only
  and values are not expanded, so the token is read from a token file by `enclave connect --token-file`.
  (modelcontextprotocol.io "Connect to local MCP servers"; support.claude.com)
- Claude Code: `~/.claude.json` (user scope), `mcpServers` -> {"type": "http", url, headers}; `${VAR}` is expanded in
  command, args, env, url and headers. (code.claude.com/docs/en/mcp)
- Cursor: `~/.cursor/mcp.json`, `mcpServers` -> {url, headers} or {command, args, env}; `${env:NAME}` is expanded.
  (cursor.com/docs/mcp, "Config interpolation")
- VS Code: the user profile's `mcp.json`, `servers` -> {"type": "http", url, headers} or {"type": "stdio", ...};
  `${env:NAME}` is expanded. (code.visualstudio.com/docs/copilot/reference/mcp-configuration)
- Windsurf: `~/.codeium/windsurf/mcp_config.json`, `mcpServers` -> {serverUrl, headers} or stdio;
  `${env:NAME}` is expanded. (docs.windsurf.com/windsurf/cascade/mcp)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import sysconfig
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.tokens import TOKEN_PREFIX

GATEWAY_ENTRY = "enclave"
TOKEN_ENV = "ENCLAVE_TOKEN"
TOKEN_DIR = ".config/enclave"  # under the home: token files written by `install --mint`


class TokenError(Exception):
    """No usable agent token; the message says how to provide one."""


def read_token(token_file: Path | None, environ: Mapping[str, str] = os.environ) -> str:
    """The agent token, from a file only its owner can read, or from $ENCLAVE_TOKEN; never from the command line."""
    if token_file is not None and token_file.name.startswith(TOKEN_PREFIX):
        raise TokenError(
            "--token-file takes the path of a file holding the token, not the token: the command line is visible to "
            "every local user, so revoke that token (enclave agent revoke NAME) and mint a new one"
        )
    if token_file is not None:
        try:
            info = token_file.stat()
            if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise TokenError(
                    f"token file {token_file} is accessible by other users (mode {stat.filemode(info.st_mode)}); "
                    f"run: chmod 600 {token_file}"
                )
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise TokenError(f"cannot read token file {token_file}: {exc.strerror}") from None
    else:
        token = environ.get(TOKEN_ENV, "").strip()
    if not token or any(c.isspace() for c in token):
        where = f"token file {token_file}" if token_file else f"${TOKEN_ENV}"
        raise TokenError(
            f"no agent token in {where}: set {TOKEN_ENV} or pass --token-file PATH (a file of mode 600); "
            "tokens are never taken from the command line, which every local user can read"
        )
    return token


@dataclass(frozen=True)
class Client:
    name: str
    title: str
    files: dict[str, str]  # platform ("darwin", "linux", "win32") -> configuration file, relative to the home
    servers_key: str = "mcpServers"
    env_ref: str | None = "${env:%s}"  # how the file names an environment variable; None: it cannot
    http_type: str | None = None  # the "type" an HTTP entry carries, if the client wants one
    stdio_type: str | None = None
    url_key: str = "url"

    @property
    def speaks_http(self) -> bool:
        return self.env_ref is not None

    def candidates(self, home: Path) -> list[Path]:
        """Its configuration files under `home`, this platform's first."""
        ordered = sorted(self.files.items(), key=lambda item: item[0] != sys.platform)
        return list(dict.fromkeys(home / relative for _, relative in ordered))

    def file(self, home: Path) -> Path:
        """The file to read and write: an existing one, else this platform's."""
        return next((path for path in self.candidates(home) if path.exists()), self.candidates(home)[0])

    def env(self, variable: str) -> str:
        assert self.env_ref is not None
        return self.env_ref % variable


def _everywhere(relative: str) -> dict[str, str]:
    return {"darwin": relative, "linux": relative, "win32": relative}


CLIENTS: dict[str, Client] = {
    client.name: client
    for client in (
        Client(
            "claude-desktop",
            "Claude Desktop",
            {
                "darwin": "Library/Application Support/Claude/claude_desktop_config.json",
                "linux": ".config/Claude/claude_desktop_config.json",
                "win32": "AppData/Roaming/Claude/claude_desktop_config.json",
            },
            env_ref=None,
        ),
        Client("claude-code", "Claude Code", _everywhere(".claude.json"), env_ref="${%s}", http_type="http"),
        Client("cursor", "Cursor", _everywhere(".cursor/mcp.json")),
        Client(
            "vscode",
            "VS Code",
            {
                "darwin": "Library/Application Support/Code/User/mcp.json",
                "linux": ".config/Code/User/mcp.json",
                "win32": "AppData/Roaming/Code/User/mcp.json",
            },
            servers_key="servers",
            http_type="http",
            stdio_type="stdio",
        ),
        Client("windsurf", "Windsurf", _everywhere(".codeium/windsurf/mcp_config.json"), url_key="serverUrl"),
    )
}


class ClientConfigError(Exception):
    """A client's configuration cannot be read or changed as asked; the message says why."""


# -- the gateway's entry ---------------------------------------------------------------------


def launcher() -> tuple[list[str], dict[str, str]]:
    """How a client starts `enclave`: the console script beside this interpreter, else `python -m gateway` (with
    the package's directory on PYTHONPATH when it is not installed, e.g. in a checkout)."""
    script = Path(sys.executable).with_name("enclave")
    if script.exists():
        return [str(script)], {}
    package_root = Path(__file__).resolve().parent.parent
    installed = package_root == Path(sysconfig.get_paths()["purelib"]).resolve()
    return [sys.executable, "-m", "gateway"], {} if installed else {"PYTHONPATH": str(package_root)}


def http_entry(client: Client, url: str) -> dict[str, Any]:
    """The gateway over HTTP, the token read from $ENCLAVE_TOKEN when the client starts."""
    entry: dict[str, Any] = {"type": client.http_type} if client.http_type else {}
    entry[client.url_key] = url
    entry["headers"] = {"Authorization": "Bearer " + client.env(TOKEN_ENV)}
    return entry


def stdio_entry(client: Client, socket_path: Path, token_file: Path | None) -> dict[str, Any]:
    """`enclave connect` on the gateway's agents socket (the gateway records the client's process), the token read
    from `token_file`, or else from $ENCLAVE_TOKEN passed on by the client."""
    command, env = launcher()
    args = [*command[1:], "connect", "--socket", str(socket_path)]
    if token_file is not None:
        args += ["--token-file", str(token_file)]
    elif client.env_ref is not None:
        env = {**env, TOKEN_ENV: client.env(TOKEN_ENV)}
    else:
        raise ClientConfigError(
            f"{client.title} cannot read environment variables in its configuration, so the token must be in a "
            "token file: pass --token-file PATH, or let `enclave install` or `enclave adopt` mint one with --mint"
        )
    entry: dict[str, Any] = {"type": client.stdio_type} if client.stdio_type else {}
    entry.update(command=command[0], args=args)
    if env:
        entry["env"] = env
    return entry


def default_token_file(home: Path, agent: str) -> Path:
    return home / TOKEN_DIR / f"{agent}.token"


def write_token_file(path: Path, token: str) -> None:
    """A new file only its owner can read, in a directory only its owner can enter."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(token + "\n")


# -- reading and changing a client's file ----------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    """A client's configuration; {} when the file does not exist. VS Code's files may hold comments (JSONC)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ClientConfigError(f"cannot read {path}: {exc.strerror}") from None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = json.loads(_strip_jsonc(text))
        except ValueError as exc:
            raise ClientConfigError(f"{path} is not valid JSON ({exc}); fix it or move it away first") from None
    if not isinstance(data, dict):
        raise ClientConfigError(f"{path} does not hold a JSON object; fix it or move it away first")
    return data


_JSONC = re.compile(r'("(?:\\.|[^"\\])*")|//[^\n]*|/\*.*?\*/|,(\s*[}\]])', re.DOTALL)


def _strip_jsonc(text: str) -> str:
    """Comments and trailing commas out, strings untouched."""
    return _JSONC.sub(lambda m: m.group(1) or m.group(2) or "", text)


@dataclass(frozen=True)
class Change:
    path: Path
    backup: Path | None  # None: the file did not exist before
    changed: bool


def update(path: Path, edit: Any) -> Change:
    """Apply `edit(data) -> data` to a client's JSON file: nothing is written when nothing changes; otherwise the
    old file is kept as FILE.bak-TIMESTAMP and the new one replaces it atomically, with the old file's mode."""
    before = read_json(path)
    after = edit(json.loads(json.dumps(before)))
    if after == before and path.exists():
        return Change(path, None, changed=False)
    backup = None
    mode = 0o600
    if path.exists():
        mode = path.stat().st_mode & 0o777
        backup = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        suffix = 1
        while backup.exists():
            backup = backup.with_name(f"{path.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
            suffix += 1
        shutil.copy2(path, backup)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(after, out, indent=2, ensure_ascii=False)
        out.write("\n")
    os.chmod(temporary, mode)
    os.replace(temporary, path)
    return Change(path, backup, changed=True)


def servers_at(data: dict[str, Any], location: tuple[str, ...]) -> dict[str, Any]:
    """The servers map at `location` in a client's configuration, created if missing."""
    node = data
    for key in location:
        child = node.get(key)
        if not isinstance(child, dict):
            if child is not None:
                raise ClientConfigError(f"'{'.'.join(location)}' is not a JSON object")
            child = node[key] = {}
        node = child
    return node


Removal = tuple[Path, tuple[str, ...], str]  # (file, where its servers map is, server name)


def route_through_gateway(
    client: Client, home: Path, name: str, entry: dict[str, Any], removals: Sequence[Removal] = ()
) -> list[Change]:
    """Put the gateway's `entry` under `name` in the client's servers map, and drop the servers in `removals` (the
    ones now reached through the gateway), one backed-up update per file."""
    main = client.file(home)
    changes = []
    for path in dict.fromkeys([main, *(path for path, _, _ in removals)]):

        def edit(data: dict[str, Any], path: Path = path) -> dict[str, Any]:
            for file, location, server in removals:
                if file == path:
                    servers_at(data, location).pop(server, None)
            if path == main:
                servers_at(data, (client.servers_key,))[name] = entry
            return data

        changes.append(update(path, edit))
    return changes
