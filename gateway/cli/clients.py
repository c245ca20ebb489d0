"""`enclave client-config|install CLIENT` and `enclave discover|adopt`: local MCP clients and the servers they use.

How the token reaches the client (never written into a client's file):
- a client that expands environment variables in its file (Claude Code, Cursor, VS Code, Windsurf) gets the
  gateway's HTTP URL with `Authorization: Bearer <reference to $ENCLAVE_TOKEN>` (or, with --stdio, `enclave connect`
  with ENCLAVE_TOKEN passed on the same way);
- Claude Desktop cannot, so it runs `enclave connect --token-file FILE`: a file of mode 600, given with --token-file
  or written by --mint, which mints a new token for the agent (like `enclave agent add`; it shows nowhere else).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

from gateway.cli.agents import mint_token
from gateway.cli.common import CommandError, Commands, emit, load
from gateway.clients import (
    CLIENTS,
    GATEWAY_ENTRY,
    TOKEN_ENV,
    Change,
    Client,
    ClientConfigError,
    Removal,
    TokenError,
    default_token_file,
    http_entry,
    read_json,
    read_token,
    route_through_gateway,
    servers_at,
    stdio_entry,
    write_token_file,
)
from gateway.config import MCP_PATH, Config, ConfigError, base_url, load_config

DISCOVER_COLUMNS = ["client", "server", "transport", "target", "inline_secrets"]


def gateway_url(config: Config, args: argparse.Namespace | None = None) -> str:
    """The gateway's MCP URL: --url, else what gateway.yaml says (listen, public_url)."""
    if args is not None and args.url:
        return str(args.url)
    return base_url(config.settings.listen) + MCP_PATH


def home_of(args: argparse.Namespace) -> Path:
    return (args.home or Path.home()).expanduser().resolve()


def agent_enclave(config: Config, agent: str) -> str:
    enclave = config.enclave_of(agent)
    if enclave is None:
        raise CommandError(f"agent {agent!r} is in no enclave; list it under 'agents' in an enclaves/*.yaml file")
    return enclave.name


def gateway_entry(
    args: argparse.Namespace, config: Config, client: Client, agent: str, mint: bool = True
) -> tuple[dict[str, Any], str]:
    """The client's entry for the gateway and a sentence on how the token reaches it. With --mint, a new token is
    minted into the agent's token file unless that exists (`mint=False`: only check that the entry can be made)."""
    from gateway.peers import agents_socket

    home = home_of(args)
    token_file = args.token_file.expanduser().resolve() if args.token_file else None
    if getattr(args, "mint", False):
        token_file = default_token_file(home, agent)
        if token_file.exists():
            note = f"token file {token_file} already exists; no new token was minted"
        elif not mint:
            return stdio_entry(client, agents_socket(config.settings.state_dir), token_file), ""
        else:
            write_token_file(token_file, mint_token(config, agent, agent_enclave(config, agent)))
            note = f"minted a new token for agent {agent!r} into {token_file} (mode 600); it is shown nowhere else"
    elif token_file is None and client.env_ref is None and default_token_file(home, agent).exists():
        token_file = default_token_file(home, agent)  # written by an earlier `install --mint`
        note = f"the token is read from {token_file}"
    else:
        note = f"the token is read from {token_file}" if token_file else ""
    socket_path = agents_socket(config.settings.state_dir)
    try:
        if token_file is not None:
            read_token(token_file)  # exists, holds a token, and only its owner can read it
            return stdio_entry(client, socket_path, token_file), note
        if args.stdio or not client.speaks_http:
            entry = stdio_entry(client, socket_path, None)
        else:
            entry = http_entry(client, gateway_url(config, args))
    except (TokenError, ClientConfigError) as exc:
        raise CommandError(str(exc)) from None
    enclave = agent_enclave(config, agent)
    return entry, (
        f"{client.title} reads the token from ${TOKEN_ENV}: start it where {TOKEN_ENV} holds the token of agent "
        f"{agent} (a new one: enclave agent add {agent} --enclave {enclave}; or use --mint for a token file)"
    )


def check_entry_name(client: Client, home: Path, name: str, url: str) -> None:
    """Refuse to overwrite a server of the user's that merely has the gateway entry's name."""
    from gateway.discovery import examine

    try:
        existing = servers_at(read_json(client.file(home)), (client.servers_key,)).get(name)
    except ClientConfigError as exc:
        raise CommandError(str(exc)) from None
    found = examine(client.name, name, existing, {url}) if isinstance(existing, dict) else None
    if found is not None and not found.via_gateway:
        raise CommandError(
            f"{client.file(home)} already has a server named {name!r} that is not the gateway; pass --name"
        )


def report(changes: list[Change]) -> None:
    for change in changes:
        if not change.changed:
            print(f"{change.path}: already up to date")
        elif change.backup is None:
            print(f"{change.path}: created")
        else:
            print(f"{change.path}: updated (previous version kept as {change.backup})")


# -- client-config / install -----------------------------------------------------------------


def cmd_client_config(args: argparse.Namespace) -> int:
    config = load(args)
    client = CLIENTS[args.client]
    agent_enclave(config, args.agent)
    entry, note = gateway_entry(args, config, client, args.agent)
    print(json.dumps({client.servers_key: {args.name: entry}}, indent=2))
    print(f"# add this to {client.file(home_of(args))} (or run: enclave install {client.name} ...)", file=sys.stderr)
    if note:
        print(f"# {note}", file=sys.stderr)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    config = load(args)
    client = CLIENTS[args.client]
    home = home_of(args)
    agent_enclave(config, args.agent)
    check_entry_name(client, home, args.name, gateway_url(config, args))
    entry, note = gateway_entry(args, config, client, args.agent)
    report(_route(client, home, args.name, entry, []))
    if note:
        print(note, file=sys.stderr)
    return 0


def _route(client: Client, home: Path, name: str, entry: dict[str, Any], removals: list[Removal]) -> list[Change]:
    try:
        return route_through_gateway(client, home, name, entry, removals)
    except (ClientConfigError, OSError) as exc:
        raise CommandError(str(exc)) from None


# -- discover / adopt ------------------------------------------------------------------------


def cmd_discover(args: argparse.Namespace) -> int:
    from gateway.discovery import discover

    urls = set()
    with suppress(ConfigError):  # no gateway configured here: every server found bypasses one
        urls.add(gateway_url(load_config(args.config)))
    found = discover(home_of(args), urls, processes=not args.no_processes)
    # What bypasses the gateway, and gateway entries that hold an inline secret (a token written into a file).
    shown = [entry.row() for entry in found if not entry.via_gateway or entry.secrets]
    if args.json:
        emit(shown, DISCOVER_COLUMNS, as_json=True)
    else:
        table = [{**row, "inline_secrets": ", ".join(row["inline_secrets"]) or "-"} for row in shown]
        emit(table, DISCOVER_COLUMNS, as_json=False)
    routed = sum(entry.via_gateway for entry in found)
    print(
        f"{len(found) - routed} MCP server(s) bypass the gateway"
        + (f"; {routed} go through it" if routed else "")
        + ". Inline secrets are named, never shown. `enclave adopt CLIENT` routes a client's servers through it.",
        file=sys.stderr,
    )
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    from gateway.adopt import AdoptError, apply, plan
    from gateway.discovery import scan_client

    config = load(args)
    client = CLIENTS[args.client]
    home = home_of(args)
    enclave = _enclave(config, args.enclave)
    agent = _agent(config, enclave, args.agent)
    if not args.expose:
        raise CommandError(
            "say which tools of the adopted servers the enclave exposes (deny by default): --expose '*' keeps every "
            "tool the client could call before, --expose NAME (repeatable) only those"
        )
    url = gateway_url(config, args)
    check_entry_name(client, home, args.name, url)
    candidates = [
        found
        for found in scan_client(client, home, {url})
        if not found.via_gateway and (not args.server or found.name in args.server)
    ]
    if not candidates:
        print(f"{client.title} uses no MCP server that bypasses the gateway: nothing to adopt", file=sys.stderr)
        return 0
    plans, skipped = [], []
    taken = set(config.connectors)
    for found in candidates:
        try:
            plans.append(plan(found, taken))
            taken.add(plans[-1].connector)
        except AdoptError as exc:
            skipped.append(f"  {found.name}: not adopted: {exc}")
    if not plans:
        raise CommandError("no server could be adopted:\n" + "\n".join(skipped))
    gateway_entry(args, config, client, agent, mint=False)  # fails here, before anything is written
    try:
        apply(config, enclave, plans, args.expose)
    except AdoptError as exc:
        raise CommandError(str(exc)) from None
    entry, note = gateway_entry(args, config, client, agent)
    for each in plans:
        secrets = ", ".join(f"{name} (moved to the secret store)" for name in each.secrets) or "no inline secrets"
        print(f"connector {each.connector}: connectors/{each.connector}.yaml ({each.found.name!r}); {secrets}")
    print(f"enclave {enclave}: exposes {', '.join(args.expose)} of {', '.join(p.connector for p in plans)}")
    if "*" in args.expose:
        print(
            f"WARNING: enclave {enclave!r} now exposes every tool of the adopted servers, including tools they add "
            f"later. Narrow 'tools' in {config.enclaves[enclave].source} to what agent {agent!r} needs.",
            file=sys.stderr,
        )
    removals = [(Path(each.found.file), each.found.location, each.found.name) for each in plans]
    report(_route(client, home, args.name, entry, removals))
    for line in [*skipped, note, "Restart `enclave serve` to load the new connectors."]:
        print(line, file=sys.stderr)
    return 0


def _enclave(config: Config, name: str | None) -> str:
    if name is not None:
        if name not in config.enclaves:
            raise CommandError(f"no enclave {name!r}; known: {', '.join(sorted(config.enclaves)) or 'none'}")
        return name
    if len(config.enclaves) != 1:
        raise CommandError(f"say which enclave: --enclave one of {', '.join(sorted(config.enclaves)) or '(none)'}")
    return next(iter(config.enclaves))


def _agent(config: Config, enclave: str, name: str | None) -> str:
    agents = config.enclaves[enclave].agents
    if name is None and len(agents) == 1:
        return agents[0]
    if name is None or name not in agents:
        raise CommandError(f"say which agent of enclave {enclave!r} the client runs as: --agent {' | '.join(agents)}")
    return name


def register(commands: Commands) -> None:
    clients = sorted(CLIENTS)
    for command, function, text in (
        ("client-config", cmd_client_config, "print the configuration that routes a client through the gateway"),
        ("install", cmd_install, "write that into the client's configuration file (merged, backed up, idempotent)"),
    ):
        parser = commands.add_parser(command, help=text)
        parser.add_argument("client", choices=clients)
        parser.add_argument("--agent", required=True, help="the agent the client runs as")
        _entry_options(parser, mint=command == "install")
        parser.set_defaults(func=function)

    discover = commands.add_parser(
        "discover", help="MCP servers on this machine that bypass the gateway (client configs, running processes)"
    )
    discover.add_argument("--json", action="store_true")
    discover.add_argument("--home", type=Path, metavar="DIR", help="whose client configurations (default: yours)")
    discover.add_argument("--no-processes", action="store_true", help="only the client configuration files")
    discover.set_defaults(func=cmd_discover)

    adopt = commands.add_parser(
        "adopt", help="turn a client's own MCP servers into connectors and route the client through the gateway"
    )
    adopt.add_argument("client", choices=clients)
    adopt.add_argument("--enclave", help="the enclave that gets the connectors (default: the only one)")
    adopt.add_argument("--agent", help="the agent the client runs as (default: the enclave's only agent)")
    adopt.add_argument(
        "--expose", action="append", metavar="PATTERN", help="tools to expose (repeatable; '*' for all); required"
    )
    adopt.add_argument("--server", action="append", metavar="NAME", help="adopt only this server (repeatable)")
    _entry_options(adopt, mint=True)
    adopt.set_defaults(func=cmd_adopt)


def _entry_options(parser: argparse.ArgumentParser, mint: bool) -> None:
    parser.add_argument("--home", type=Path, metavar="DIR", help="whose configuration (default: your home)")
    parser.add_argument("--url", help="the gateway's MCP URL for HTTP entries (default: from gateway.yaml)")
    parser.add_argument("--name", default=GATEWAY_ENTRY, help=f"the entry's name (default: {GATEWAY_ENTRY})")
    parser.add_argument("--stdio", action="store_true", help="use `enclave connect` even where the client has HTTP")
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--token-file", type=Path, metavar="PATH", help="token file (mode 600) for `enclave connect`")
    if mint:
        tokens.add_argument("--mint", action="store_true", help="mint a new token for the agent into a token file")
