"""`enclave reach AGENT`: everything an agent can reach, through which connector, and behind which chamber.

By default the connectors of the agent's enclave are started, as the gateway starts them (same secrets,
same enclave view), and their live tool and prompt lists are filtered exactly as the agent would see them:
a glob such as `search_*` only becomes a list of names by asking the upstream (a tool whose definition
changed since it was pinned is left out, as the gateway withholds it: gateway.pins). `--offline` contacts no
upstream and lists the enclave's patterns instead (what the file allows, not what exists). Resources are
always listed by URI pattern: that is what the enclave allows and what chambers cover.
"""

from __future__ import annotations

import argparse
import sys
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from gateway.cli.common import CommandError, Commands, emit, load
from gateway.config import GLOB_CHARS, Chamber, Config, Enclave, Exposure, resolve_secrets

if TYPE_CHECKING:
    from gateway.view import EnclaveView

COLUMNS = ["kind", "name", "connector", "chamber"]


class Reach:
    """Rows for one enclave: kind, agent-facing name, connector, chamber, and the rule that allows it."""

    def __init__(self, enclave: Enclave):
        self.enclave = enclave
        self.rows: list[dict[str, Any]] = []

    def add(self, kind: str, name: str, connector: str, rule: str, chambers: list[tuple[Chamber, str]]) -> None:
        where = f"{self.enclave.source}: connectors.{connector}.{rule}"
        self.rows.append(
            {
                "kind": kind,
                "name": name,
                "connector": connector,
                "chamber": ", ".join(chamber.name for chamber, _ in chambers) or "-",
                "rule": "; ".join([where, *(f"{self.enclave.source}: chambers.{c.name}.{why}" for c, why in chambers)]),
            }
        )

    def tool_chambers(self, name: str) -> list[tuple[Chamber, str]]:
        return [
            (chamber, f"tools {_first_match(chamber.tools.items, name)!r}")
            for chamber in self.enclave.chambers_holding("tool", name)
        ]

    def pattern_chambers(self, kind: str, pattern: str) -> list[tuple[Chamber, str]]:
        """Chambers that cover a pattern wholly or in part (`partly`)."""
        found = []
        for chamber in self.enclave.chambers.values():
            for item in getattr(chamber, kind).items:
                if fnmatchcase(pattern, item):
                    found.append((chamber, f"{kind} {item!r}"))
                    break
                if fnmatchcase(item, pattern):
                    found.append((chamber, f"{kind} {item!r} (partly)"))
                    break
        return found

    def resources(self) -> None:
        for connector, exposure in self.enclave.connectors.items():
            for pattern in exposure.resources.items:
                self.add(
                    "resource",
                    pattern,
                    connector,
                    f"resources {pattern!r}",
                    self.pattern_chambers("resources", pattern),
                )

    def offline(self) -> None:
        """From the enclave file alone."""
        for connector, exposure in self.enclave.connectors.items():
            for pattern in exposure.tools.items:
                if GLOB_CHARS.search(pattern):
                    name = exposure.prefix + pattern
                    self.add("tool", name, connector, f"tools {pattern!r}", self.pattern_chambers("tools", name))
                else:
                    name = exposure.exposed_name(pattern)
                    self.add("tool", name, connector, _tool_rule(exposure, pattern, pattern), self.tool_chambers(name))
            for pattern in exposure.prompts.items:
                self.add("prompt", exposure.prefix + pattern, connector, f"prompts {pattern!r}", [])
        self.resources()

    async def live(self, view: EnclaveView) -> None:
        """From the connectors' live lists, through the enclave view the gateway uses."""
        for tool in (await view.tools()).values():
            exposure = self.enclave.connectors[tool.connector]
            pattern = _first_match(exposure.tools.items, tool.upstream_name)
            self.add(
                "tool",
                tool.name,
                tool.connector,
                _tool_rule(exposure, pattern, tool.upstream_name),
                self.tool_chambers(tool.name),
            )
        for prompt in (await view.prompts()).values():
            pattern = _first_match(self.enclave.connectors[prompt.connector].prompts.items, prompt.upstream_name)
            self.add("prompt", prompt.name, prompt.connector, f"prompts {pattern!r}", [])
        self.resources()


def _first_match(patterns: tuple[str, ...], name: str) -> str:
    return next(p for p in patterns if fnmatchcase(name, p))


def _tool_rule(exposure: Exposure, pattern: str, upstream_name: str) -> str:
    rule = f"tools {pattern!r}"
    if upstream_name in exposure.rename:
        return f"{rule}, rename {upstream_name!r}: {exposure.rename[upstream_name]!r}"
    return f"{rule}, prefix {exposure.prefix!r}" if exposure.prefix else rule


def live_view(config: Config, enclave: Enclave, reach: Reach) -> None:
    """Start the enclave's connectors, list through the enclave view, stop them."""
    import anyio  # the MCP machinery is imported only by the command that needs it

    from gateway.pins import ToolPins
    from gateway.redact import Redactor
    from gateway.upstream import ListKind, Upstream, UpstreamPool
    from gateway.view import EnclaveView

    sources = {config.connectors[name].source for name in enclave.connectors if name in config.connectors}
    resolver, secrets, problems = resolve_secrets(config)
    problems = [p for p in problems if p.file in sources]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        raise CommandError("cannot start the enclave's connectors (see above); use --offline to list patterns only")
    redactor = Redactor(secrets)

    async def ignore(connector: str, kind: ListKind) -> None:
        """List changes do not matter for a one-off listing."""

    async def run() -> None:
        pool = UpstreamPool(
            {name: Upstream(config.connectors[name], resolver, redactor, ignore) for name in enclave.connectors}
        )
        pins = ToolPins(None)  # inspect only: a tool whose definition changed since it was pinned is left out
        async with pins.running(config.settings.state_dir), pool.running():
            for name in enclave.connectors:
                try:
                    await pool[name].tools()
                except Exception as exc:
                    print(
                        f"connector {name!r} could not be listed ({exc}); its tools are missing below", file=sys.stderr
                    )
            await reach.live(EnclaveView(enclave, pool, pins))

    anyio.run(run)


def cmd_reach(args: argparse.Namespace) -> int:
    config = load(args)
    enclave = config.enclave_of(args.agent)
    if enclave is None:
        raise CommandError(f"agent {args.agent!r} is not listed in any enclave (field 'agents' of enclaves/*.yaml)")
    reach = Reach(enclave)
    if args.offline:
        reach.offline()
    else:
        live_view(config, enclave, reach)
    rows = reach.rows if args.explain else [{k: v for k, v in row.items() if k != "rule"} for row in reach.rows]
    emit(rows, [*COLUMNS, "rule"] if args.explain else COLUMNS, args.json)
    return 0


def register(commands: Commands) -> None:
    reach = commands.add_parser(
        "reach", help="what an agent can reach: tools, resource patterns, prompts, their connector and chamber"
    )
    reach.add_argument("agent")
    reach.add_argument(
        "--explain", action="store_true", help="also show the enclave rule (file and pattern) behind each"
    )
    reach.add_argument("--offline", action="store_true", help="list the enclave's patterns without starting connectors")
    reach.add_argument("--json", action="store_true")
    reach.set_defaults(func=cmd_reach)
