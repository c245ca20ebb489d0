"""Policy decision time against the size of the catalogue: 1,000 agents, 10 to 10,000 tools.

    .venv/bin/python -m bench.policy_bench

Times the decision steps of a tools/call as the pipeline runs them, on the gateway's own objects: the bearer
token looked up in an `AgentDirectory` of 1,000 agents (loaded from a real configuration directory), the tool
looked up in the enclave's catalogue (the dict `EnclaveView` builds), and its arguments checked by the tool's
compiled `ArgumentValidator`. The decision should not depend on how many tools the enclave has.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import yaml

from gateway.auth import Agent, AgentDirectory
from gateway.config import load_config
from gateway.state import AgentRecord
from gateway.tokens import mint, token_hash
from gateway.validation import ArgumentValidator

AGENTS = 1000
SCHEMA = {
    "type": "object",
    "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
    "required": ["query"],
}


def directory_with_agents(root: Path) -> tuple[AgentDirectory, list[str]]:
    (root / "connectors").mkdir()
    (root / "enclaves").mkdir()
    connector = {"name": "upstream", "stdio": {"command": "true"}}
    (root / "connectors" / "upstream.yaml").write_text(yaml.safe_dump(connector))
    agents = [f"agent-{i}" for i in range(AGENTS)]
    enclave = {"name": "big", "agents": agents, "connectors": {"upstream": {"tools": ["*"]}}}
    (root / "enclaves" / "big.yaml").write_text(yaml.safe_dump(enclave))
    config = load_config(root)
    tokens = [mint() for _ in agents]
    records = [
        AgentRecord(a, "big", token_hash(t), time.time(), None, None) for a, t in zip(agents, tokens, strict=True)
    ]
    directory = AgentDirectory(b"k" * 32)
    directory.replace(records, config)
    return directory, tokens


def one_round(directory: AgentDirectory, token: str, tools: dict[str, ArgumentValidator]) -> float:
    """Microseconds per decision, over 2,000 decisions on a tool in the middle of the catalogue."""
    name = f"tool_{len(tools) // 2}"
    arguments = {"query": "bolt", "limit": 3}
    start = time.perf_counter()
    for _ in range(2000):
        agent = directory.authenticate(token)
        assert isinstance(agent, Agent)
        tools[name].validate(arguments)
    return (time.perf_counter() - start) / 2000 * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory, tokens = directory_with_agents(Path(tmp))
    print(f"{AGENTS} agents; decision = authenticate + catalogue lookup + argument validation")
    sizes = (10, 100, 1000, 10_000)
    catalogues = {count: {f"tool_{i}": ArgumentValidator(f"tool_{i}", SCHEMA) for i in range(count)} for count in sizes}
    rounds: dict[int, list[float]] = {count: [] for count in sizes}
    for _ in range(30):  # the sizes take turns, so that the machine's noise drifts over all of them alike
        for count in sizes:
            rounds[count].append(one_round(directory, tokens[AGENTS // 2], catalogues[count]))
    baseline = statistics.median(rounds[sizes[0]])
    for count in sizes:
        micros = statistics.median(rounds[count])
        print(f"  {count:>6} tools: {micros:6.1f} µs per decision ({micros / baseline:4.2f}x the 10-tool time)")


if __name__ == "__main__":
    main()
