"""`enclave serve`, `enclave check` and `enclave reload`."""

from __future__ import annotations

import argparse
import sys

from gateway import control
from gateway.cli.common import CommandError, Commands, load
from gateway.config import Config, resolve_secrets
from gateway.secrets import SecretResolver


def resolved_secrets(config: Config, refusal: str) -> tuple[SecretResolver, list[str]]:
    """Every secret the configuration references, or the problems on stderr and `refusal` as the error."""
    resolver, secrets, problems = resolve_secrets(config)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        raise CommandError(refusal.format(count=len(problems)))
    return resolver, secrets


def cmd_check(args: argparse.Namespace) -> int:
    config = load(args)
    resolved_secrets(config, "{count} secret reference(s) cannot be resolved")
    agents = sum(len(e.agents) for e in config.enclaves.values())
    tests = sum(len(e.tests) for e in config.enclaves.values())
    print(
        f"ok: {len(config.connectors)} connector(s), {len(config.enclaves)} enclave(s), {agents} agent(s), "
        f"{tests} policy test(s) passed"
    )
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Have the running gateway reload its configuration directory now, and report what it did."""
    try:
        config = load(args)
    except CommandError:
        raise CommandError(
            "configuration has errors (above): not reloaded; a running gateway keeps its current configuration"
        ) from None
    reply = control.request(config.settings.state_dir, {"op": "reload"}, timeout=30)
    if reply is None:
        raise CommandError(f"no gateway is running with state directory {config.settings.state_dir}; nothing to reload")
    for problem in reply.get("problems") or ():
        print(problem, file=sys.stderr)
    if not reply.get("ok"):
        raise CommandError(f"reload {reply.get('summary') or reply.get('error') or 'failed'}")
    print(reply.get("summary"))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.serve import serve  # heavy imports only for this command

    config = load(args)
    resolver, secrets = resolved_secrets(config, "refusing to start: fix the secret references above")
    return serve(config, resolver, secrets, listen=args.listen)


def register(commands: Commands) -> None:
    serve = commands.add_parser("serve", help="run the gateway (MCP streamable HTTP, 127.0.0.1:8765 by default)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="override listen.host/listen.port from gateway.yaml")
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser(
        "check", help="validate the configuration, its secret references and the enclaves' policy tests"
    )
    check.set_defaults(func=cmd_check)

    reload = commands.add_parser(
        "reload",
        help="have the running gateway reload its configuration now (it also does on file change and SIGHUP); "
        "a configuration with errors is refused and the old one kept",
    )
    reload.set_defaults(func=cmd_reload)
