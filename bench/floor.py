"""What the serving stack costs before the gateway does anything: the floor under bench/gateway_bench.py.

    .venv/bin/python -m bench.floor [--calls 2000]

Serves a bare ASGI app (reads the body, answers one fixed JSON-RPC result) with the gateway's own uvicorn
settings (`gateway.serve.http_and_loop`), calls it with the benchmark's client and prints the server's CPU
per request; then the time and memory that importing the gateway's modules takes (`enclave serve` cannot
start, nor idle, below them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gateway_bench import MODERN, RawClient, cpu_seconds, latencies  # noqa: E402
from tests.harness import free_port  # noqa: E402

BARE_SERVER = """
import sys, uvicorn
from gateway.http_protocol import http_and_loop

REPLY = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hi"}],"isError":false}}'

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(REPLY)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": REPLY})

http, loop = http_and_loop()
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http=http, loop=loop, log_level="warning")
"""

IMPORTS = "import resource, time; t = time.perf_counter(); import gateway.cli, gateway.serve; " + (
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
)


async def bare_cpu(calls: int) -> float:
    """Server CPU (ms) per tools/call answered by the bare app."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(port)], cwd=REPO)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        async with httpx2.AsyncClient(timeout=60) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    await http.get(url)
                    break
                except httpx2.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    await anyio.sleep(0.05)
            client = RawClient(http, url, MODERN, "token")
            call = lambda: client.call("tools/call", {"name": "echo", "arguments": {"text": "hi"}})  # noqa: E731
            await latencies(call, 200)
            before = cpu_seconds(server.pid)
            await latencies(call, calls)
            return (cpu_seconds(server.pid) - before) / calls * 1000
    finally:
        server.terminate()
        server.wait()


def imports() -> tuple[float, float]:
    """Seconds and MB of RSS that importing the gateway's modules takes, in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", IMPORTS], cwd=REPO, capture_output=True, text=True, check=True)
    seconds, megabytes = out.stdout.split()
    return float(seconds), float(megabytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    cpu = anyio.run(bare_cpu, args.calls)
    seconds, megabytes = min(imports() for _ in range(3))
    report = {"bare_server_cpu_ms_per_call": cpu, "import_seconds": seconds, "import_rss_mb": megabytes}
    print(f"bare ASGI app on the gateway's uvicorn settings: {cpu:.3f} ms server CPU per call")
    print(f"importing the gateway's modules: {seconds:.2f} s, {megabytes:.0f} MB RSS")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
