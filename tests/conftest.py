"""Shared fixtures: the standard two-enclave topology, served by a real `enclave serve`.

    enclave e1 (agents a1, a2): design  - examples/servers/design_db.py  (credential: canary)
                                evil    - tests/servers/evil.py          (credential: canary, echoes it)
    enclave e2 (agent b1):      weather - examples/servers/weather_api.py (credential: weather canary)
                                time    - mcp-server-time from PyPI (a published server, filtered)

Every upstream that we wrote logs what it receives (UPSTREAM_LOG), so tests can show "never contacted".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import EVIL, EXAMPLES, ConfigDir, GatewayProcess, UpstreamLog, canary, python_server, running

E1_DESIGN_TOOLS = ["search_parts", "get_part", "export_design", "slow_count", "confirm_delete"]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Topology:
    config: ConfigDir
    gateway: GatewayProcess
    tokens: dict[str, str]
    canary: str
    weather_canary: str
    logs: dict[str, UpstreamLog]

    @property
    def url(self) -> str:
        return self.gateway.url


def build_topology(root: Path) -> tuple[ConfigDir, str, str, dict[str, UpstreamLog]]:
    secret, weather_secret = canary(), canary()
    logs = {name: UpstreamLog(root / f"upstream-{name}.jsonl") for name in ("design", "evil", "weather")}
    config = (
        ConfigDir(root)
        .secret("design-token", secret)
        .secret("evil-key", secret)
        .secret("weather-key", weather_secret)
        .connector(
            "design",
            python_server(
                EXAMPLES / "design_db.py", UPSTREAM_LOG=str(logs["design"].path), DESIGN_TOKEN="${secret:design-token}"
            ),
        )
        .connector(
            "evil",
            python_server(
                EVIL,
                UPSTREAM_LOG=str(logs["evil"].path),
                EVIL_ECHO_ENV="1",
                EVIL_ECHO_VAR="EVIL_API_KEY",
                EVIL_API_KEY="${secret:evil-key}",
            ),
        )
        .connector(
            "weather",
            python_server(
                EXAMPLES / "weather_api.py",
                UPSTREAM_LOG=str(logs["weather"].path),
                WEATHER_API_KEY="${secret:weather-key}",
            ),
        )
        .connector(
            "time", {"stdio": {"command": "${python}", "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]}}
        )
        .enclave(
            "e1",
            ["a1", "a2"],
            {
                "design": {
                    "tools": E1_DESIGN_TOOLS,
                    "resources": ["design://catalogue", "design://parts/*"],
                    "prompts": ["review_part"],
                },
                "evil": {"tools": ["echo", "echo_env", "echo_secret_encodings"]},
            },
        )
        .enclave(
            "e2",
            ["b1"],
            {"weather": {"tools": ["forecast", "whoami"], "prefix": "wx_"}, "time": {"tools": ["get_current_time"]}},
        )
    )
    return config, secret, weather_secret, logs


@contextmanager
def serve_topology(root: Path, extra_env: dict[str, str] | None = None) -> Iterator[Topology]:
    """The standard topology served by a gateway started with `extra_env` added to its environment."""
    config, secret, weather_secret, logs = build_topology(root)
    tokens = {agent: config.mint(agent, enclave) for agent, enclave in (("a1", "e1"), ("a2", "e1"), ("b1", "e2"))}
    with running(config, extra_env) as gateway:
        yield Topology(config, gateway, tokens, secret, weather_secret, logs)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """The standard topology with one gateway for the whole module (tests must not change its state)."""
    with serve_topology(tmp_path_factory.mktemp("topology")) as topology:
        yield topology
