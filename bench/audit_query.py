"""Benchmark: the queries behind `enclave audit` over a million audit rows.

    .venv/bin/python -m bench.audit_query                # from the repository root: 1,000,000 rows, temp dir
    .venv/bin/python -m bench.audit_query --rows 200000 --keep /tmp/audit-bench

Fills a fresh state database (the gateway's own schema and indexes) with synthetic rows in one bulk
transaction: 60 agents in 12 enclaves, 40 tools, 90% allow / 8% deny / 2% error, spread over 30 days. Then
it times the query `enclave audit` runs for typical filters (AuditStore.query, newest 100 rows): the first
run and the median of five, with SQLite's query plan. The rows are not hash-chained (verify is not timed).
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import time
from contextlib import closing
from pathlib import Path

from gateway.audit_store import COLUMNS, SCHEMA, AuditFilter, AuditStore
from gateway.state import DB_FILE

DAY = 86400.0
AGENTS = [(f"agent-{i}", f"enclave-{i % 12}") for i in range(60)]
TOOLS = [f"tool_{i}" for i in range(40)]


def fill(path: Path, rows: int, now: float) -> None:
    rng = random.Random(7)
    columns = ["id", *COLUMNS, "prev_hash", "row_hash"]
    insert = f"INSERT INTO audit ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    start = now - 30 * DAY
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.executescript(SCHEMA)
        indexes = [
            name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit'")
        ]
        for name in indexes:  # built once at the end: much faster than row by row
            db.execute(f"DROP INDEX {name}")

        def row(index: int) -> tuple[object, ...]:
            agent, enclave = rng.choice(AGENTS)
            decision = rng.choices(("allow", "deny", "error"), (90, 8, 2))[0]
            values = dict.fromkeys(COLUMNS)
            values.update(
                at=start + index * (30 * DAY / rows),
                agent=agent,
                enclave=enclave,
                session_id=f"s{index // 50}",
                protocol_version="2025-11-25",
                method="tools/call",
                target=rng.choice(TOOLS),
                connector="conn",
                decision=decision,
                reason=None if decision == "allow" else "not_in_enclave",
                outcome="ok" if decision == "allow" else None,
                latency_ms=rng.random() * 50,
                args_digest=f"{rng.getrandbits(256):064x}",
            )
            return (index + 1, *values.values(), "0" * 64, "0" * 64)

        db.executemany(insert, (row(i) for i in range(rows)))
        db.execute("INSERT INTO audit_head (one, id, hash) VALUES (1, ?, ?)", (rows, "0" * 64))
        db.commit()
        db.executescript(SCHEMA)
        db.execute("PRAGMA journal_mode=WAL")


def time_queries(path: Path, now: float) -> None:
    queries = {
        "--agent agent-17": AuditFilter(agent="agent-17"),
        "--tool tool_3 --decision deny": AuditFilter(tool="tool_3", decision="deny"),
        "--since 7d": AuditFilter(since=now - 7 * DAY),
        "--agent agent-17 --since 7d": AuditFilter(agent="agent-17", since=now - 7 * DAY),
        "--enclave enclave-5 --decision error --since 7d": AuditFilter(
            enclave="enclave-5", decision="error", since=now - 7 * DAY
        ),
        "--agent agent-17 --tool tool_3 --decision error --until 20d": AuditFilter(
            agent="agent-17", tool="tool_3", decision="error", until=now - 20 * DAY
        ),
        "--decision error": AuditFilter(decision="error"),
        "--tool no_such_tool --decision allow (no match)": AuditFilter(tool="no_such_tool", decision="allow"),
        "--agent agent-17 --tool no_such_tool (no match)": AuditFilter(agent="agent-17", tool="no_such_tool"),
    }
    with closing(AuditStore.open(path.parent)) as store:
        for label, where in queries.items():
            runs = []
            for _ in range(6):
                began = time.perf_counter()
                found = store.query(where)
                runs.append((time.perf_counter() - began) * 1000)
            print(
                f"{label:58} {len(found):4} rows  first {runs[0]:7.2f} ms  median {statistics.median(runs[1:]):7.2f} ms"
            )
            print(f"{'':58} plan: {_plan(store, where)}")


def _plan(store: AuditStore, where: AuditFilter) -> str:
    """The plan of the statement AuditStore.query runs, captured through the connection's trace hook."""
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    store.query(where)
    store.db.set_trace_callback(None)
    return "; ".join(row[-1] for row in store.db.execute(f"EXPLAIN QUERY PLAN {statements[-1]}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="build the database in this directory and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.keep or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / DB_FILE
        path.unlink(missing_ok=True)
        now = time.time()
        began = time.perf_counter()
        fill(path, args.rows, now)
        size = path.stat().st_size / 2**20
        print(f"filled {args.rows:,} rows in {time.perf_counter() - began:.1f} s ({size:.0f} MiB): {path}")
        time_queries(path, now)


if __name__ == "__main__":
    main()
