"""`enclave check` names every configuration error by file, field and line; `enclave serve` refuses to start
on any of them; `agent add` says how to fix a request it cannot honour."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from textwrap import dedent

import pytest

from tests.harness import EXAMPLES, ConfigDir, canary, free_port, python_server

DESIGN = f"""\
stdio:
  command: ${{python}}
  args: [{EXAMPLES / "design_db.py"}]
"""

# file -> content; each file holds one kind of error (except good.yaml and twin.yaml).
BROKEN = {
    "gateway.yaml": "listen:\n  port: eighty\n",
    "connectors/good.yaml": "name: good\n" + DESIGN,
    "connectors/twin.yaml": "name: twin\n" + DESIGN,
    "connectors/syntax.yaml": "name: syntax\nstdio: [unclosed\n",
    "connectors/dup.yaml": "name: dup\nstdio:\n  command: a\nstdio:\n  command: b\n",
    "connectors/unknown.yaml": "name: unknown\nstdio:\n  command: python\n  comand: typo\n",
    "connectors/typed.yaml": "name: typed\ntimeout_seconds: fast\n" + DESIGN,
    "connectors/inline.yaml": "name: inline\n" + DESIGN + "  env:\n    API_KEY: sk-live-0123456789abcdef\n",
    "connectors/misnamed.yaml": "name: other-name\n" + DESIGN,
    "enclaves/alpha.yaml": dedent(
        """\
        name: alpha
        agents: [a1, shared]
        connectors:
          good: {tools: [search_parts]}
          ghost: {tools: [anything]}
        """
    ),
    "enclaves/beta.yaml": dedent(
        """\
        name: beta
        agents: [shared]
        connectors:
          good: {tools: [search_parts]}
          twin: {tools: [search_parts]}
        """
    ),
}

# (file, line or None, field, what the message says)
EXPECTED = [
    ("gateway.yaml", 2, "listen.port", "'eighty' is not of type 'integer'"),
    ("connectors/syntax.yaml", 3, "(document)", "invalid YAML"),
    ("connectors/dup.yaml", 4, "stdio", "duplicate key"),
    ("connectors/unknown.yaml", 3, "stdio", "unknown field(s) ('comand' was unexpected)"),
    ("connectors/typed.yaml", 2, "timeout_seconds", "'fast' is not of type 'number'"),
    ("connectors/inline.yaml", 6, "stdio.env.API_KEY", "looks like a credential: give it as ${secret:NAME}"),
    ("connectors/misnamed.yaml", 1, "name", "name 'other-name' must match the file name 'misnamed.yaml'"),
    ("enclaves/alpha.yaml", 5, "connectors.ghost", "unknown connector 'ghost' (no connectors/ghost.yaml)"),
    ("enclaves/beta.yaml", 2, "agents[0]", "agent 'shared' already belongs to enclave 'alpha'"),
    ("enclaves/beta.yaml", 5, "connectors.twin.tools", "tool name collision: 'search_parts' is exposed by both"),
]


def write(root: Path, files: dict[str, str]) -> ConfigDir:
    config = ConfigDir(root)
    for name, content in files.items():
        (root / name).write_text(content)
    return config


def problem_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("enclave:")]


def test_check_names_every_error(tmp_path: Path) -> None:
    result = write(tmp_path, BROKEN).cli("check", check=False)
    assert result.returncode != 0
    lines = problem_lines(result.stderr)
    for file, line, field, message in EXPECTED:
        where = f"{file}:{line}" if line else file
        assert any(entry.startswith(f"{where}: {field}: ") and message in entry for entry in lines), (
            f"no '{where}: {field}: ...{message}...' in:\n{result.stderr}"
        )
    assert len(lines) == len(EXPECTED), result.stderr
    assert f"has {len(EXPECTED)} error(s)" in result.stderr


def test_check_reports_missing_secrets(tmp_path: Path) -> None:
    files = {
        "connectors/weather.yaml": "name: weather\n" + DESIGN + "  env:\n    API_KEY: ${secret:weather-key}\n",
        "enclaves/e1.yaml": "name: e1\nagents: [a1]\nconnectors:\n  weather: {tools: [forecast]}\n",
    }
    config = write(tmp_path, files)
    result = config.cli("check", check=False)
    assert result.returncode != 0
    assert re.search(
        r"^connectors/weather\.yaml: stdio\.env\.API_KEY: secret 'weather-key' not found "
        r"\(looked in environment variable ENCLAVE_SECRET_WEATHER_KEY; file .*/weather-key\)$",
        result.stderr.replace(str(tmp_path) + "/", ""),
        re.MULTILINE,
    ), result.stderr

    config.secret("weather-key", canary())
    fixed = config.cli("check", check=False)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.startswith("ok: 1 connector(s), 1 enclave(s), 1 agent(s)")


@pytest.mark.parametrize("problem", ["broken config", "missing secret"])
def test_serve_refuses_to_start(tmp_path: Path, problem: str) -> None:
    if problem == "broken config":
        config = write(tmp_path, BROKEN)
    else:
        config = (
            ConfigDir(tmp_path)
            .connector("api", python_server(EXAMPLES / "weather_api.py", WEATHER_API_KEY="${secret:absent}"))
            .enclave("e1", ["a1"], {"api": {"tools": ["forecast"]}})
        )
    port = free_port()
    result = config.cli("serve", "--listen", f"127.0.0.1:{port}", check=False)
    assert result.returncode != 0
    assert "listening" not in result.stdout
    assert (f"has {len(EXPECTED)} error(s)" if problem == "broken config" else "refusing to start") in result.stderr
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_agent_add_needs_the_agent_listed_in_its_enclave(tmp_path: Path) -> None:
    config = (
        ConfigDir(tmp_path)
        .connector("design", python_server(EXAMPLES / "design_db.py"))
        .enclave("e1", ["a1"], {"design": {"tools": ["search_parts"]}})
    )
    unlisted = config.cli("agent", "add", "intruder", "--enclave", "e1", check=False)
    assert unlisted.returncode != 0 and unlisted.stdout == ""
    assert "agent 'intruder' is not listed in enclaves/e1.yaml (field 'agents'); add it there first" in unlisted.stderr
    nowhere = config.cli("agent", "add", "a1", "--enclave", "e9", check=False)
    assert nowhere.returncode != 0 and nowhere.stdout == ""
    assert "no enclave 'e9'; known: e1" in nowhere.stderr
    assert "encl_" not in unlisted.stdout + unlisted.stderr + nowhere.stdout + nowhere.stderr
