"""Fixtures of the security catalogue: tests/security/ has one file per family of threat-principles.md, and every
case ends with the standing invariants NOLEAK and ALIVE (tests/security/invariants.py).

`world` is one gateway, shared by the cases that do not change its state, exporting its spans to a real OTLP
receiver (so that NOLEAK sweeps them too):

    e1 (a1, a2, fuzz)  design, evil (echoes its credential), leaky (a handshake-era evil) and leaky26 (a
                       2026-07-28 one), both putting their credential on every way out (EVIL_LEAK)
    e2 (b1)            weather, time: the ALIVE agent's enclave
    e3 (h1)            hostile upstreams: hang (1 s timeout), giant (64 KiB limit), crashy, noisy (garbage on
                       stdout, a stderr flood at start-up, a malformed response before the real one)

`deploy` starts variants of it (other settings, other environment, more configuration) for the families that
need their own gateway.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import build_topology
from tests.harness import EVIL, ConfigDir, UpstreamLog, canary, modern_post, python_server, running
from tests.otlp_receiver import OTLPReceiver
from tests.security.invariants import ALIVE_AGENT, Deployment
from tests.test_upstreams import serve_http

LEAK_TOOLS = ["leak_progress", "leak_elicit", "leak_described"]
HOSTILE_LIMIT = 64 * 1024  # max_result_bytes of the `giant` connector
AGENTS = {"a1": "e1", "a2": "e1", "fuzz": "e1", "b1": "e2", "h1": "e3"}


def evil(log: UpstreamLog, **env: str) -> dict[str, Any]:
    return python_server(EVIL, UPSTREAM_LOG=str(log.path), **env)


def hostile_world(root: Path, settings: dict[str, Any] | None = None) -> tuple[ConfigDir, list[str], dict]:
    """The standard topology plus the leaky connectors (e1) and the hostile upstreams (e3)."""
    config, secret, weather_secret, logs = build_topology(root)
    leaky_secret = canary()
    for name in ("leaky", "leaky26", "hang", "giant", "crashy", "noisy"):
        logs[name] = UpstreamLog(root / f"upstream-{name}.jsonl")
    leak = {"EVIL_LEAK": "1", "EVIL_ECHO_VAR": "LEAKY_KEY", "LEAKY_KEY": "${secret:leaky-key}"}
    config.secret("leaky-key", leaky_secret)
    config.connector("leaky", evil(logs["leaky"], EVIL_LEGACY="1", **leak))
    config.connector("leaky26", evil(logs["leaky26"], **leak))
    config.connector("hang", {**evil(logs["hang"], EVIL_HANG="1"), "timeout_seconds": 1})
    config.connector(
        "giant", {**evil(logs["giant"], EVIL_GIANT=str(2 * 1024 * 1024)), "max_result_bytes": HOSTILE_LIMIT}
    )
    config.connector("crashy", evil(logs["crashy"], EVIL_CRASH_AFTER="1"))
    noise = {"EVIL_BAD_STDOUT": "1", "EVIL_STDERR_FLOOD": str(3 * 1024 * 1024), "EVIL_MANGLE": "1"}
    config.connector("noisy", evil(logs["noisy"], **noise))
    e1 = {
        "design": {
            "tools": ["search_parts", "get_part", "export_design", "slow_count", "confirm_delete"],
            "resources": ["design://catalogue", "design://parts/*"],
            "prompts": ["review_part"],
        },
        "evil": {"tools": ["echo", "echo_env", "echo_secret_encodings"]},
        "leaky": {"tools": LEAK_TOOLS, "prefix": "old_", "resources": ["evil://*"], "prompts": ["leak_prompt"]},
        "leaky26": {"tools": LEAK_TOOLS, "prefix": "new_", "prompts": ["leak_prompt"]},
    }
    config.enclave("e1", ["a1", "a2", "fuzz"], e1)
    e3 = {
        "hang": {"tools": ["hang", "echo"], "prefix": "hang_"},
        "giant": {"tools": ["giant", "echo"], "prefix": "giant_"},
        "crashy": {"tools": ["echo"], "prefix": "crashy_"},
        "noisy": {"tools": ["echo", "mangle"], "prefix": "noisy_"},
    }
    config.enclave("e3", ["h1"], e3)
    if settings:
        config.gateway(**settings)
    return config, [secret, weather_secret, leaky_secret], logs


@contextmanager
def deploy(
    root: Path,
    receiver: OTLPReceiver | None = None,
    settings: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    extend: Callable[[ConfigDir], dict[str, str]] | None = None,
) -> Iterator[Deployment]:
    """The hostile world with `settings` in gateway.yaml, `env` added to the gateway's environment, spans
    exported to `receiver`, and whatever `extend` adds to the configuration (it returns agent -> enclave)."""
    config, canaries, logs = hostile_world(root, settings)
    agents = {**AGENTS, **(extend(config) if extend else {})}
    tokens = {agent: config.mint(agent, enclave) for agent, enclave in agents.items()}
    if receiver is not None:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            **(env or {}),
        }
    with running(config, env) as gateway:
        # The ALIVE agent's upstreams are started now: ALIVE measures serving, not a cold start.
        assert modern_post(gateway.url, "tools/list", {}, tokens[ALIVE_AGENT]).status_code == 200
        yield Deployment(config, gateway, tokens, canaries, logs, receiver)


@pytest.fixture(scope="session")
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver().running() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, receiver: OTLPReceiver) -> Iterator[Deployment]:
    """The hostile world, plus (e3) `giant_http`: a giant evil over streamable HTTP, 64 KiB allowed."""
    root = tmp_path_factory.mktemp("world")
    log = UpstreamLog(root / "upstream-giant_http.jsonl")
    server, url = serve_http(EVIL, log, EVIL_GIANT=str(2 * 1024 * 1024))

    def giant_over_http(config: ConfigDir) -> dict[str, str]:
        config.connector("giant_http", {"http": {"url": url}, "max_result_bytes": HOSTILE_LIMIT})
        e3 = config.root / "enclaves" / "e3.yaml"
        exposed = yaml.safe_load(e3.read_text())
        exposed["connectors"]["giant_http"] = {"tools": ["giant", "echo"], "prefix": "giant_http_"}
        e3.write_text(yaml.safe_dump(exposed))
        return {}

    try:
        with deploy(root, receiver, extend=giant_over_http) as deployment:
            deployment.logs["giant_http"] = log
            yield deployment
    finally:
        server.terminate()
        server.wait(10)


def audit(deployment: Deployment, where: str = "1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Audit rows matching an SQL condition, oldest first (a reply leaves only once its row is committed)."""
    with closing(sqlite3.connect(deployment.config.state_dir / "state.db")) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(f"SELECT * FROM audit WHERE {where} ORDER BY id", params)]
