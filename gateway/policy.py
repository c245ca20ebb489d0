"""Policy tests: what an enclave file asserts its agents (or other enclaves' agents) may and may not reach.

Checked whenever a configuration is loaded (`enclave check`, `enclave serve`, every reload), like the `tests`
of a Tailscale policy file: a configuration whose tests fail is refused, and a running gateway keeps the one
it has.

    tests:
      - agent: a1
        allow: [tool:search_parts, resource:design://catalogue, prompt:review_part]
        chamber: [tool:export_design]
        deny: [tool:drop_table, resource:file:///etc/passwd]

A target is `tool:NAME` or `prompt:NAME` (the name agents see, after rename and prefix) or `resource:URI`.
The decision is one of

    allow    the agent's enclave exposes it, outside any chamber;
    chamber  the enclave exposes it inside a chamber: each call needs a grant or an approval at call time;
    deny     the agent cannot reach it: its enclave does not expose it (the agent gets "Unknown tool").

It is made from the configuration alone (names, globs, prefix, rename, chambers), by the same rules the
gateway applies: a glob exposes every name it matches, whether or not an upstream lists such a tool today,
and a definition withheld by a changed pin (gateway.pins) is runtime state, not policy. The agent may belong
to any enclave, so that one file can also assert what other enclaves' agents must not reach; an agent listed
in no enclave fails the test (a misspelt name would make every `deny` pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.yamldoc import FieldPath

Decision = Literal["allow", "chamber", "deny"]
DECISIONS: tuple[Decision, ...] = get_args(Decision)


@dataclass(frozen=True)
class PolicyTest:
    """One expectation: `agent` gets `expect` for `target` (`tool:NAME`, `prompt:NAME`, `resource:URI`)."""

    agent: str
    expect: Decision
    target: str
    field: tuple[str | int, ...]  # where the target is written: tests[i].allow[j]


def decide(config: Config, agent: str, target: str) -> tuple[Decision, str]:
    """What the configuration decides for `agent` reaching `target`, and the rule that decides it."""
    enclave = config.enclave_of(agent)
    if enclave is None:
        return "deny", f"agent {agent!r} is listed in no enclave"
    kind, _, name = target.partition(":")
    exposures = enclave.connectors.items()
    if kind == "tool":
        rules = [f"connectors.{c}.tools" for c, exposure in exposures if exposure.upstream_tools(name)]
    elif kind == "prompt":
        rules = [f"connectors.{c}.prompts" for c, exposure in exposures if exposure.exposes_prompt(name)]
    else:
        connector = enclave.resource_connector(name)
        rules = [f"connectors.{connector}.resources"] if connector is not None else []
    where = f"enclave {enclave.name!r} ({enclave.source})"
    if not rules:
        return "deny", f"{where} does not expose it"
    chambers = enclave.chambers_holding(kind, name) if kind in ("tool", "resource") else []
    if chambers:
        return "chamber", f"{where} has it in chamber {chambers[0].name!r}"
    return "allow", f"{where} exposes it ({rules[0]}) outside any chamber"


def failure(config: Config, test: PolicyTest) -> tuple[FieldPath, str] | None:
    """Where and why `test` fails, or None if it passes."""
    if config.enclave_of(test.agent) is None:
        return [*test.field[:2], "agent"], f"agent {test.agent!r} is listed in no enclave (field 'agents')"
    decision, why = decide(config, test.agent, test.target)
    if decision == test.expect:
        return None
    expected = f"expected {test.expect} for {test.agent} -> {test.target}"
    return list(test.field), f"policy test failed: {expected}, got {decision}: {why}"
