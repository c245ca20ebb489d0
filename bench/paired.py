"""This tree's gateway against another revision's, paired: what a change does to CPU per call and latency.

    .venv/bin/python -m bench.paired REV [--blocks 20] [--calls 300] [--era 2026-07-28|2025-11-25]

On these shared machines the load moves bench/gateway_bench.py's absolute figures by more than a change of a
few percent, run to run. Here both gateways (this tree's and REV's, checked out in a temporary git worktree)
are up at once and get alternating blocks of sequential `tools/call` (the order swapped each round), so that
the machine's load hits both alike. Tracing is off. Prints each one's CPU per call and p50/p90 latency.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, chdir, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gateway_bench import LEGACY, MODERN, RawClient, cpu_seconds, gateway, latencies  # noqa: E402


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)


async def compare(trees: dict[str, Path], blocks: int, calls: int, era: str) -> None:
    # `python -m gateway` looks in its working directory first: run the gateways where there is none.
    with tempfile.TemporaryDirectory() as tmp, chdir(tmp), ExitStack() as stack:
        processes = {
            name: stack.enter_context(gateway(Path(tmp) / name, {}, "full", {"PYTHONPATH": str(tree)}))
            for name, tree in trees.items()
        }
        cpu: dict[str, float] = dict.fromkeys(trees, 0.0)
        samples: dict[str, list[float]] = {name: [] for name in trees}
        async with httpx2.AsyncClient(timeout=60) as http:
            clients = {name: await RawClient(http, p.url, era, token).open() for name, (p, token) in processes.items()}

            def call(name: str) -> Any:
                return lambda: clients[name].call("tools/call", {"name": "echo", "arguments": {"text": "hi"}})

            for name in trees:
                await latencies(call(name), calls)  # warm-up
            order = list(trees)
            for _ in range(blocks):
                for name in order:
                    pid = processes[name][0].process.pid
                    before = cpu_seconds(pid)
                    samples[name] += await latencies(call(name), calls)
                    cpu[name] += cpu_seconds(pid) - before
                order.reverse()
    for name in trees:
        p50, p90 = statistics.median(samples[name]), statistics.quantiles(samples[name], n=10)[-1]
        print(
            f"{name:>12}: CPU per call {cpu[name] / (blocks * calls) * 1000:.3f} ms, p50 {p50:.2f} ms, p90 {p90:.2f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the git revision to compare this tree with")
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--calls", type=int, default=300, help="calls per block")
    parser.add_argument("--era", choices=[MODERN, LEGACY], default=MODERN)
    args = parser.parse_args()
    with worktree(args.rev) as tree:
        anyio.run(compare, {"this tree": REPO, args.rev[:12]: tree}, args.blocks, args.calls, args.era)


if __name__ == "__main__":
    main()
