"""The audit log and the governance commands (`enclave agents`, `enclave audit`, `enclave audit verify`).

One gateway serves the standard topology plus enclave e3 (agent c1), which opts in to raw arguments.
Rows are read straight from the state database: a reply only leaves once its row is committed, so no
test needs to wait for one.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import json
import secrets
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import MCPError

from gateway.audit import CHECKPOINT_EVERY, AuditLog
from gateway.audit_store import AuditStore, typed_row
from gateway.auth import Agent
from gateway.config import load_config
from gateway.invocation import Invocation
from gateway.redact import Redactor, variants
from gateway.state import DB_FILE
from gateway.tokens import load_or_create_key
from tests.conftest import build_topology
from tests.harness import ERAS, EXAMPLES, ConfigDir, GatewayProcess, UpstreamLog, connect, python_server, raw_post

pytestmark = pytest.mark.anyio

LIST_TOOLS = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}


@dataclass
class Audited:
    config: ConfigDir
    gateway: GatewayProcess
    tokens: dict[str, str]
    canary: str
    logs: dict[str, UpstreamLog]

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def db_path(self) -> Path:
        return self.config.state_dir / "state.db"

    def key(self) -> bytes:
        return (self.config.state_dir / "gateway.key").read_bytes()

    def rows(self, after: int = 0) -> list[dict[str, Any]]:
        return query(self.db_path, "SELECT * FROM audit WHERE id > ? ORDER BY id", (after,))

    def last_id(self) -> int:
        return query(self.db_path, "SELECT coalesce(max(id), 0) AS id FROM audit")[0]["id"]

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.config.cli(*args, "--json").stdout)


def query(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(db_path)) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(sql, params)]


def digest(key: bytes, arguments: dict[str, Any]) -> str:
    """HMAC-SHA256 of the canonical JSON of the arguments, as the audit log promises."""
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    config, secret, _, logs = build_topology(tmp_path_factory.mktemp("audit"))
    config.enclave("e3", ["c1"], {"evil": {"tools": ["echo"]}}, audit={"raw_arguments": True})
    agents = {"a1": "e1", "a2": "e1", "b1": "e2", "c1": "e3"}
    tokens = {agent: config.mint(agent, enclave) for agent, enclave in agents.items()}
    gateway = GatewayProcess(config)
    try:
        yield Audited(config, gateway, tokens, secret, logs)
    finally:
        gateway.stop()


# -- every decision -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ERAS)
async def test_every_decision_is_audited(audited: Audited, mode: str) -> None:
    key, mark = audited.key(), audited.last_id()
    arguments = {"query": f"bolt-{mode}"}
    async with connect(audited.url, audited.tokens["a1"], mode) as client:
        await client.list_tools()
        assert not (await client.call_tool("search_parts", arguments)).is_error
        before = audited.logs["design"].count()
        with pytest.raises(MCPError):
            await client.call_tool("search_parts", {"query": 5})
        assert audited.logs["design"].count() == before
    async with connect(audited.url, audited.tokens["b1"], mode) as client:
        with pytest.raises(MCPError):
            await client.call_tool("search_parts", arguments)
    assert audited.logs["design"].count() == before

    rows = audited.rows(mark)
    listed = next(r for r in rows if r["method"] == "tools/list" and r["agent"] == "a1")
    assert (listed["decision"], listed["outcome"], listed["enclave"]) == ("allow", "ok", "e1")
    calls = [r for r in rows if r["method"] == "tools/call"]
    allowed, invalid, hidden = (
        next(r for r in calls if r["agent"] == "a1" and r["decision"] == "allow"),
        next(r for r in calls if r["agent"] == "a1" and r["decision"] == "deny"),
        next(r for r in calls if r["agent"] == "b1"),
    )
    assert allowed["target"] == allowed["upstream_target"] == "search_parts"
    assert (allowed["connector"], allowed["outcome"], allowed["enclave"]) == ("design", "ok", "e1")
    assert allowed["args_digest"] == digest(key, arguments)
    assert allowed["args_raw"] is None
    assert allowed["bytes_out"] > 0 and allowed["latency_ms"] > 0
    assert allowed["client_name"] == "mcp" and allowed["protocol_version"]
    assert (invalid["reason"], invalid["error_code"], invalid["connector"]) == ("invalid_arguments", -32602, "design")
    assert invalid["args_digest"] == digest(key, {"query": 5})
    assert (hidden["decision"], hidden["reason"], hidden["enclave"]) == ("deny", "not_in_enclave", "e2")
    assert hidden["connector"] is None and hidden["target"] == "search_parts"
    if mode == "legacy":
        assert allowed["session_id"] and allowed["bytes_in"] > 0


async def test_authentication_failures_are_audited_by_fingerprint(audited: Audited) -> None:
    mark, stranger = audited.last_id(), "encl_" + secrets.token_urlsafe(32)
    assert raw_post(audited.url, LIST_TOOLS, stranger).status_code == 401
    assert raw_post(audited.url, LIST_TOOLS).status_code == 401
    unknown, missing = audited.rows(mark)
    expected = hmac.new(audited.key(), stranger.encode(), hashlib.sha256).hexdigest()[:12]
    assert (unknown["method"], unknown["decision"], unknown["reason"]) == ("auth", "deny", "unknown_token")
    assert unknown["token_fingerprint"] == expected
    assert (missing["reason"], missing["token_fingerprint"]) == ("missing_token", None)
    assert stranger not in "\n".join(sqlite3.connect(audited.db_path).iterdump())


async def test_raw_arguments_only_for_an_enclave_that_opts_in_and_redacted(audited: Audited) -> None:
    mark, arguments = audited.last_id(), {"text": f"token is {audited.canary}"}
    async with connect(audited.url, audited.tokens["c1"]) as client:
        result = await client.call_tool("echo", arguments)
    assert audited.canary not in str(result.content)
    (row,) = [r for r in audited.rows(mark) if r["method"] == "tools/call"]
    assert json.loads(row["args_raw"]) == {"text": "token is [REDACTED]"}
    assert row["args_digest"] == digest(audited.key(), arguments)
    async with connect(audited.url, audited.tokens["a1"]) as client:
        await client.call_tool("echo", arguments)
    (row,) = [r for r in audited.rows(mark) if r["method"] == "tools/call" and r["agent"] == "a1"]
    assert row["args_raw"] is None


@pytest.mark.parametrize("mode", ERAS)
async def test_a_failed_audit_write_fails_the_call_closed(audited: Audited, mode: str) -> None:
    with closing(sqlite3.connect(audited.db_path, isolation_level=None)) as lock:
        lock.execute("BEGIN IMMEDIATE")  # the gateway's writer cannot commit until this ends
        async with connect(audited.url, audited.tokens["a1"], mode) as client:
            with pytest.raises(MCPError) as refused:
                await client.call_tool("search_parts", {"query": "locked"})
            lock.execute("ROLLBACK")
            assert not (await client.call_tool("search_parts", {"query": "unlocked"})).is_error
    assert refused.value.error.code == -32603
    assert "locked" not in refused.value.error.message


# -- governance commands --------------------------------------------------------------------


async def test_agents_and_audit_commands_tell_the_story(audited: Audited) -> None:
    """a2 opens a handshake-era session and b1 calls statelessly; the commands show both."""
    async with connect(audited.url, audited.tokens["a2"], "legacy") as client:
        await client.list_tools()
        await client.call_tool("search_parts", {"query": "bolt"})
        await client.call_tool("search_parts", {"query": "nut"})
        with pytest.raises(MCPError):
            await client.call_tool("launch_rockets", {})
        async with connect(audited.url, audited.tokens["b1"], "2026-07-28") as modern:
            await modern.call_tool("wx_forecast", {"city": "Oslo"})
            live = {s["agent"]: s for s in audited.cli_json("agents")}
    assert live["a2"]["era"] == "2025-11-25" and live["a2"]["calls"] == 4
    assert live["a2"]["enclave"] == "e1" and live["a2"]["client"].startswith("mcp/")
    assert live["a2"]["status"] == "live" and live["a2"]["since"] <= live["a2"]["last_call"]
    assert live["b1"]["era"] == "2026-07-28" and live["b1"]["session"].startswith("stateless:")

    wait_until(lambda: "a2" not in {s["agent"] for s in audited.cli_json("agents")})  # the client sent DELETE
    (ended,) = [s for s in audited.cli_json("agents", "--all") if s["agent"] == "a2"]
    assert ended["status"] == "closed" and ended["calls"] == 4

    story = [(r["method"], r["target"], r["decision"]) for r in audited.cli_json("audit", "--agent", "a2")]
    assert story == [
        ("tools/list", None, "allow"),
        ("tools/call", "search_parts", "allow"),
        ("tools/call", "search_parts", "allow"),
        ("tools/call", "launch_rockets", "deny"),
    ]
    found = audited.cli_json("audit", "--agent", "a2", "--tool", "search_parts", "--decision", "allow", "--since", "1h")
    assert [r["args_digest"] for r in found] == [digest(audited.key(), {"query": q}) for q in ("bolt", "nut")]
    (denied,) = audited.cli_json("audit", "--agent", "a2", "--decision", "deny", "--until", "2999-01-01")
    assert denied["reason"] == "not_in_enclave" and denied["time"].endswith("+00:00")
    assert audited.cli_json("audit", "--agent", "a2", "--until", "1h") == []
    assert audited.cli_json("audit", "--agent", "a2", "--limit", "1") == [denied]
    recent = audited.cli_json("audit", "--enclave", "e2", "--since", "1h")
    assert {r["enclave"] for r in recent} == {"e2"}
    assert ("b1", "wx_forecast", "2026-07-28") in {(r["agent"], r["target"], r["protocol_version"]) for r in recent}

    table = csv.DictReader(io.StringIO(audited.config.cli("audit", "--agent", "a2", "--csv").stdout))
    assert [row["target"] for row in table] == ["", "search_parts", "search_parts", "launch_rockets"]
    listing = audited.config.cli("audit", "--agent", "a2").stdout.splitlines()
    assert listing[0].split()[:4] == ["TIME", "AGENT", "ENCLAVE", "METHOD"] and len(listing) == 5
    bad = audited.config.cli("audit", "--since", "last tuesday", check=False)
    assert bad.returncode == 1 and "ISO" in bad.stderr


def wait_until(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"


# -- the hash chain -------------------------------------------------------------------------

REORDER = [
    "UPDATE audit SET id = -1 WHERE id = 3",
    "UPDATE audit SET id = 3 WHERE id = 4",
    "UPDATE audit SET id = 4 WHERE id = -1",
]
TAMPERING = {
    "edit": (["UPDATE audit SET reason = 'nothing to see' WHERE id = 3"], "row 3: edited"),
    "delete-middle": (["DELETE FROM audit WHERE id = 3"], "row 4: row 3 is missing before it (deleted)"),
    "delete-last": (["DELETE FROM audit WHERE id = (SELECT max(id) FROM audit)"], "row {last}: missing (deleted)"),
    "reorder": (REORDER, "row 3: out of order: it follows row 4, not row 2"),
}


def test_verify_accepts_the_log_as_written(audited: Audited) -> None:
    last = audited.last_id()
    assert last >= 5
    assert audited.config.cli("audit", "verify").stdout.strip() == f"ok: {last} rows"


@pytest.mark.parametrize("tampering", TAMPERING)
def test_verify_names_the_first_tampered_row(audited: Audited, tmp_path: Path, tampering: str) -> None:
    statements, expected = TAMPERING[tampering]
    copy = ConfigDir(tmp_path)
    copy.state_dir.mkdir()
    with closing(sqlite3.connect(audited.db_path)) as live, closing(sqlite3.connect(copy.state_dir / "state.db")) as db:
        live.backup(db)
        last = db.execute("SELECT max(id) FROM audit").fetchone()[0]
        assert last >= 5
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM audit WHERE id = 1")
        db.executescript("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")  # a deliberate attacker
        for statement in statements:
            db.execute(statement)
        db.commit()
    result = copy.cli("audit", "verify", check=False)
    assert result.returncode == 1
    assert expected.format(last=last) in result.stderr


def test_hostile_text_is_stored_verifiably_and_printed_harmlessly(tmp_path: Path) -> None:
    """Agents choose client names and tool names: NUL, a lone surrogate (valid JSON, invalid UTF-8), a terminal
    escape. Each is stored (the chain still verifies) and the table escapes what a terminal would obey."""
    config = ConfigDir(tmp_path)
    nasty = "evil\x00\ud800\x1b[2J\u202e🦀"
    with closing(AuditStore.open(config.state_dir)) as store:
        row = {"at": time.time(), "agent": "a1", "method": "tools/call", "decision": "deny", "target": nasty}
        store.append([typed_row(row), typed_row({**row, "client_name": nasty})], [], [])
        assert store.verify().ok
    listing = config.cli("audit").stdout
    assert "\x1b" not in listing and "\\x1b[2J" in listing and "\\u202e" in listing and "🦀" in listing
    assert config.cli("audit", "verify").stdout.strip() == "ok: 2 rows"


# -- crash safety ---------------------------------------------------------------------------


async def test_no_answered_call_is_lost_to_kill_9_under_load(tmp_path: Path) -> None:
    config = (
        ConfigDir(tmp_path)
        .connector("design", python_server(EXAMPLES / "design_db.py"))
        .enclave("e1", ["a1"], {"design": {"tools": ["search_parts"]}})
    )
    token = config.mint("a1", "e1")
    gateway = GatewayProcess(config)
    answered: list[dict[str, Any]] = []
    sent = 0
    enough = anyio.Event()

    async def worker(index: int) -> None:
        nonlocal sent
        try:
            async with connect(gateway.url, token, ERAS[index % 2]) as client:
                for n in range(10_000):
                    arguments = {"query": f"w{index}-{n}"}
                    sent += 1
                    await client.call_tool("search_parts", arguments)
                    answered.append(arguments)
                    if len(answered) >= 150:
                        enough.set()
        except Exception:
            return  # the gateway is gone

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for index in range(8):
                    tg.start_soon(worker, index)
                await enough.wait()
                in_flight = sent - len(answered)
                gateway.process.send_signal(signal.SIGKILL)
    finally:
        gateway.stop()
    key = (config.state_dir / "gateway.key").read_bytes()
    stored = {row["args_digest"] for row in query(config.state_dir / "state.db", "SELECT args_digest FROM audit")}
    lost = [arguments for arguments in answered if digest(key, arguments) not in stored]
    assert in_flight > 0
    assert not lost, f"{len(lost)} of {len(answered)} answered calls have no audit row"
    assert config.cli("audit", "verify").stdout.startswith("ok: ")


# -- the log in the test's own process -------------------------------------------------------


def in_process_log(root: ConfigDir) -> AuditLog:
    """The gateway's audit log on `root`'s state directory, for what a gateway process cannot be made to show."""
    config = load_config(root.root)
    return AuditLog(config, load_or_create_key(root.state_dir), Redactor([]))


async def test_the_write_ahead_log_starts_over_once_checkpointed_beside_the_writer(tmp_path: Path) -> None:
    """The writer's connection leaves checkpoints to the log's own thread (so no call waits for one); that
    thread must keep the log from growing without end."""
    root = ConfigDir(tmp_path).gateway(audit_durability="normal").enclave("e1", ["a1"], {})
    log = in_process_log(root)
    wal = root.state_dir / f"{DB_FILE}-wal"

    async def record(count: int) -> None:
        for n in range(count):
            agent = Agent("a1", "e1", None)
            await log.record(Invocation("tools/call", "t", "2025-11-25", request_id=n, agent=agent, outcome="ok"))

    async with log.running():
        await record(CHECKPOINT_EVERY)  # the last commit starts a checkpoint
        await log.checkpoints.settled()
        size = wal.stat().st_size
        await record(CHECKPOINT_EVERY // 2)  # fewer pages than before: they fit in the log started over
        assert wal.stat().st_size == size
    assert query(root.state_dir / DB_FILE, "SELECT count(*) AS n FROM audit")[0]["n"] == CHECKPOINT_EVERY * 3 // 2


async def test_a_parser_refusal_outside_the_logs_lifetime_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The HTTP parser reports its 400s from inside the protocol, which can run in the moment before the log
    starts or after it stops: the refusal stands, and what could not be audited is said in the log."""
    log = in_process_log(ConfigDir(tmp_path).enclave("e1", ["a1"], {}))
    log.record_parser_refusal("malformed_http")
    assert "could not audit a request the HTTP parser refused (malformed_http)" in caplog.text


# -- no leaks -------------------------------------------------------------------------------


async def test_no_credential_or_token_in_any_audit_row(audited: Audited) -> None:
    """Runs last: the whole database after every scenario above, plus echoes of the credential."""
    async with connect(audited.url, audited.tokens["a1"]) as client:
        await client.call_tool("echo_env", {})
        await client.call_tool("echo_secret_encodings", {})
        await client.call_tool("echo", {"text": audited.canary})
    with closing(sqlite3.connect(audited.db_path)) as db:
        dump = "\n".join(db.iterdump())
    assert 'INSERT INTO "audit"' in dump
    raw = audited.canary.encode()
    forms = {audited.canary, base64.b64encode(raw).decode(), raw.hex(), *variants(audited.canary)}
    assert [form for form in forms if form in dump] == []
    assert [agent for agent, token in audited.tokens.items() if token in dump] == []
