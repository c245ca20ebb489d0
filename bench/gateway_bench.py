"""Gateway cost against direct calls, measured in one run and interleaved.

    .venv/bin/python bench/gateway_bench.py [--calls 400] [--era 2026-07-28|2025-11-25]
        [--durability full|normal] [--no-tracing] [--json out.json]

The same upstream (tests/servers/evil.py, tool `echo`) is called directly over streamable HTTP, directly
over stdio (the official client), and through `enclave serve` (stdio upstream behind it; authentication,
policy, argument validation, a brokered credential and the redaction of every result, the audit commit and
tracing all on: spans go over OTLP/HTTP to a receiver on loopback, in a process of its own, bench/otlp_sink.py).
The upstream called directly is configured as the gateway configures it (it exports its spans to the same
receiver), so that both routes end at the same upstream. Rounds alternate between the direct and the gateway
route so that machine noise hits both alike; ratios are what to read, since absolute times on a shared 2-core
machine are noise. `--no-tracing` shows what tracing costs (the targets are for tracing on).
`python -m bench.floor` measures what the serving stack costs on its own.

The HTTP load generator is a lean raw JSON-RPC client (httpx2 with prepared bodies), the same for the
direct and the gateway route, so that client cost does not hide the gateway's.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client, StdioServerParameters

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.telemetry import forwarded_environment  # noqa: E402
from tests.harness import EVIL, ConfigDir, GatewayProcess, free_port, python_server  # noqa: E402

MODERN = "2026-07-28"
LEGACY = "2025-11-25"
# One agent plays every client here: its per-agent rate and concurrency limits would measure themselves.
UNLIMITED = {
    "agent_rate_per_second": 1e9,
    "agent_burst": 1_000_000_000,
    "agent_concurrency": 1_000_000,
    "agent_sessions": 1_000_000,
}


# --------------------------------------------------------------------------- a lean JSON-RPC client


class RawClient:
    """Prepared tools/call requests over one HTTP connection pool, in either era."""

    def __init__(self, http: httpx2.AsyncClient, url: str, era: str, token: str | None):
        self.http, self.url, self.era = http, url, era
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.headers["MCP-Protocol-Version"] = era

    async def open(self) -> RawClient:
        if self.era == LEGACY:
            hello = {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}
            response = await self._post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello})
            if "mcp-session-id" not in response.headers:
                raise RuntimeError(f"initialize failed: {response.status_code} {response.text[:300]}")
            self.headers["Mcp-Session-Id"] = response.headers["mcp-session-id"]
            await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        await self.call("tools/list", {})
        return self

    async def close(self) -> None:
        if "Mcp-Session-Id" in self.headers:
            await self.http.delete(self.url, headers=self.headers)

    async def _post(self, body: dict[str, Any]) -> httpx2.Response:
        return await self.http.post(self.url, content=json.dumps(body), headers=self.headers)

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        headers = self.headers
        if self.era == MODERN:
            params = {
                **params,
                "_meta": {
                    "io.modelcontextprotocol/protocolVersion": MODERN,
                    "io.modelcontextprotocol/clientCapabilities": {},
                    "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
                },
            }
            headers = {**headers, "Mcp-Method": method}
            if "name" in params:
                headers["Mcp-Name"] = params["name"]
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        response = await self.http.post(self.url, content=json.dumps(body), headers=headers)
        text = response.text
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            text = next(line[5:] for line in text.splitlines() if line.startswith("data:"))
        message = json.loads(text)
        if "error" in message:
            raise RuntimeError(f"{method}: {message['error']}")
        return message["result"]


# --------------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, Callable[[], int]]]:
    """A receiver in its own process (bench/otlp_sink.py): its URL, and a function that stops it and returns
    the number of spans it received."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.otlp_sink"], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdin is not None and process.stdout is not None

    def spans_received() -> int:
        output, _ = process.communicate()
        return int(output)

    url = process.stdout.readline().strip()
    if not url:
        raise SystemExit(f"bench/otlp_sink.py did not start (exit code {process.wait()}); its error is above")
    try:
        yield url, spans_received
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@contextmanager
def direct_http_upstream(env: dict[str, str]) -> Iterator[tuple[str, int]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(EVIL), "--http", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx2.get(url, timeout=1)
            break
        except httpx2.TransportError:
            time.sleep(0.05)
    try:
        yield url, process.pid
    finally:
        process.terminate()
        process.wait()


@contextmanager
def gateway(
    root: Path, env: dict[str, str], durability: str, tracing: dict[str, str]
) -> Iterator[tuple[GatewayProcess, str]]:
    config = (
        ConfigDir(root)
        .gateway(audit_durability=durability, limits=UNLIMITED)
        .secret("evil-key", secrets.token_urlsafe(24))  # brokered, so every result is scrubbed of it
        .connector("evil", python_server(EVIL, EVIL_API_KEY="${secret:evil-key}", **env))
        .enclave("bench", ["bench"], {"evil": {"tools": ["echo", "giant"]}})
    )
    token = config.mint("bench", "bench")
    process = GatewayProcess(config, tracing)
    try:
        yield process, token
    finally:
        process.stop()


# --------------------------------------------------------------------------- measurements


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "mean": statistics.fmean(ordered)}


async def latencies(call: Callable[[], Awaitable[Any]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def throughput(url: str, token: str | None, era: str, clients: int, seconds: float) -> float:
    """Calls per second with `clients` concurrent clients, each with its own connection."""
    async with AsyncExitStack() as stack:
        opened = []
        for _ in range(clients):
            http = await stack.enter_async_context(httpx2.AsyncClient(timeout=60))
            opened.append(await RawClient(http, url, era, token).open())
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker(client: RawClient) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await client.call("tools/call", {"name": "echo", "arguments": {"text": "hi"}})
                done += 1

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for client in opened:
                tg.start_soon(worker, client)
        elapsed = time.perf_counter() - start
        for client in opened:
            await client.close()
    return done / elapsed


def children(pid: int) -> list[int]:
    return [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]


async def cpu_per_call(client: RawClient, params: dict[str, Any], calls: int) -> dict[int, float]:
    """CPU milliseconds per sequential call of every process of ours (this one's children and theirs)."""
    processes = [pid for child in children(os.getpid()) for pid in (child, *children(child))]
    before = {pid: cpu_seconds(pid) for pid in processes}
    await latencies(lambda: client.call("tools/call", params), calls)
    return {pid: (cpu_seconds(pid) - before[pid]) / calls * 1000 for pid in processes}


async def interleaved_latency(routes: dict[str, RawClient], calls: int, name: str, args: dict[str, Any]) -> dict:
    samples: dict[str, list[float]] = {route: [] for route in routes}
    rounds = 10
    for _ in range(rounds):
        for route, client in routes.items():
            samples[route] += await latencies(
                lambda c=client: c.call("tools/call", {"name": name, "arguments": args}), calls // rounds
            )
    return {route: percentiles(values) for route, values in samples.items()}


async def stdio_latency(env: dict[str, str], calls: int) -> dict[str, float]:
    params = StdioServerParameters(command=sys.executable, args=[str(EVIL)], env=env)
    async with Client(params, mode=MODERN, cache=None) as client:
        await client.list_tools()
        samples = await latencies(lambda: client.call_tool("echo", {"text": "hi"}), calls)
    return percentiles(samples)


async def cold_start(root: Path, env: dict[str, str], tracing: dict[str, str]) -> float:
    """Seconds from `enclave serve` being started to its first answered tools/list."""
    config = (
        ConfigDir(root)
        .connector("evil", python_server(EVIL, **env))
        .enclave("bench", ["bench"], {"evil": {"tools": ["echo"]}})
    )
    token = config.mint("bench", "bench")
    start = time.perf_counter()
    process = GatewayProcess(config, tracing)
    try:
        async with httpx2.AsyncClient(timeout=60) as http:
            await RawClient(http, process.url, MODERN, token).open()
        return time.perf_counter() - start
    finally:
        process.stop()


async def sessions_rss(url: str, token: str, pid: int, count: int) -> float:
    """Gateway RSS (MB) with `count` open handshake-era sessions."""
    async with httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=16)) as http:
        clients = [RawClient(http, url, LEGACY, token) for _ in range(count)]
        limiter = anyio.CapacityLimiter(16)

        async def open_one(client: RawClient) -> None:
            async with limiter:
                await client.open()

        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(open_one, client)
        return rss_mb(pid)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "era": args.era,
        "calls": args.calls,
        "audit_durability": args.durability,
        "tracing": not args.no_tracing,
    }
    with (
        tempfile.TemporaryDirectory() as tmp,
        otlp_receiver() as (receiver_url, spans_received),
    ):
        tracing = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver_url, "OTEL_TRACES_EXPORTER": "otlp"}
        if args.no_tracing:
            tracing = {}
        # The upstream called directly gets what the gateway passes on to its stdio upstream: the same upstream.
        env = {"EVIL_GIANT": str(100 * 1024), **forwarded_environment(tracing)}
        with direct_http_upstream(env) as (direct_url, direct_pid):
            report["cold_start_s"] = await cold_start(Path(tmp) / "cold", env, tracing)
            with gateway(Path(tmp) / "gw", env, args.durability, tracing) as (process, token):
                pid = process.process.pid
                report["rss_idle_mb"] = rss_mb(pid)
                async with httpx2.AsyncClient(timeout=60) as http:
                    routes = {
                        "direct": await RawClient(http, direct_url, args.era, None).open(),
                        "gateway": await RawClient(http, process.url, args.era, token).open(),
                    }
                    await interleaved_latency(routes, 100, "echo", {"text": "warm up"})
                    report["latency_ms"] = await interleaved_latency(routes, args.calls, "echo", {"text": "hi"})
                    report["latency_100kb_ms"] = await interleaved_latency(routes, args.calls // 4, "giant", {})
                    echo = {"name": "echo", "arguments": {"text": "hi"}}
                    (upstream_pid,) = children(pid)  # the gateway's stdio upstream
                    cpu = {route: await cpu_per_call(routes[route], echo, args.calls) for route in routes}
                    report["gateway_cpu_ms_per_call"] = cpu["gateway"][pid]
                    report["upstream_cpu_ms_per_call"] = {
                        "stdio": cpu["gateway"][upstream_pid],
                        "http": cpu["direct"][direct_pid],
                    }
                report["stdio_direct_latency_ms"] = await stdio_latency(env, args.calls)
                report["throughput_calls_per_s"] = {}
                for clients in (1, 8, 32):
                    report["throughput_calls_per_s"][clients] = {
                        "direct": await throughput(direct_url, None, args.era, clients, args.seconds),
                        "gateway": await throughput(process.url, token, args.era, clients, args.seconds),
                    }
                report["rss_1000_sessions_mb"] = await sessions_rss(process.url, token, pid, 1000)
        report["spans_received"] = spans_received()
    return report


def ratios(report: dict[str, Any]) -> list[str]:
    lat, big = report["latency_ms"], report["latency_100kb_ms"]
    tracing = f"tracing on ({report['spans_received']} spans received)" if report["tracing"] else "tracing off"
    lines = [
        f"era {report['era']}, audit_durability {report['audit_durability']}, {report['calls']} calls per route, "
        f"{tracing}",
        "sequential tools/call latency (ms)      direct   gateway   gateway-direct   ratio",
    ]
    for q in ("p50", "p95", "p99"):
        d, g = lat["direct"][q], lat["gateway"][q]
        lines.append(f"  {q:<37} {d:8.2f} {g:9.2f} {g - d:+16.2f} {g / d:7.2f}x")
    d, g = big["direct"]["p50"], big["gateway"]["p50"]
    lines.append(f"  100 KB result p50                     {d:8.2f} {g:9.2f} {g - d:+16.2f} {g / d:7.2f}x")
    lines.append(f"  direct over stdio p50 (official client): {report['stdio_direct_latency_ms']['p50']:.2f}")
    lines.append("throughput (calls/s)                     direct   gateway   ratio")
    for clients, values in report["throughput_calls_per_s"].items():
        d, g = values["direct"], values["gateway"]
        lines.append(f"  {clients:>2} client(s)                          {d:8.0f} {g:9.0f} {g / d:7.2f}x")
    lines.append(f"gateway CPU per call: {report['gateway_cpu_ms_per_call']:.3f} ms")
    upstream = report["upstream_cpu_ms_per_call"]
    lines.append(
        f"upstream CPU per call: {upstream['stdio']:.3f} ms over stdio (behind the gateway), "
        f"{upstream['http']:.3f} ms over HTTP (called directly)"
    )
    lines.append(f"cold start to first tools/list: {report['cold_start_s']:.2f} s")
    lines.append(
        f"gateway RSS: {report['rss_idle_mb']:.0f} MB idle, {report['rss_1000_sessions_mb']:.0f} MB with 1,000 sessions"
    )
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each throughput run")
    parser.add_argument("--era", choices=(MODERN, LEGACY), default=MODERN)
    parser.add_argument("--durability", choices=("full", "normal"), default="full", help="gateway audit_durability")
    parser.add_argument("--no-tracing", action="store_true", help="what tracing costs: run without it (not the target)")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    arguments = parser.parse_args()
    result = anyio.run(main, arguments)
    print("\n".join(ratios(result)))
    if arguments.json:
        arguments.json.write_text(json.dumps(result, indent=2))
