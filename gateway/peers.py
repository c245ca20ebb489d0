"""Which local process is on the other end of the agents' Unix socket.

The gateway also listens on `state_dir/agents.sock` (see `gateway.serve`). When it accepts a connection there it
asks the kernel who connected (SO_PEERCRED: pid, uid, gid; the peer cannot forge these) and reads /proc for that
process. When the peer is the stdio wrapper (`enclave connect`), the agent application is the process that
launched it, its parent, so that is the process recorded, with the wrapper under `via`. The result is computed
once per connection and travels with every request on it (ASGI `scope["state"]`), so the hot path does no I/O.

What a client says about itself (the `X-Enclave-Client-Process` header the wrapper sends) is kept apart, under
`claim`: it is recorded for the record, never used to decide anything. Requests over TCP carry no verified process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pwd
import re
import socket
import struct
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from starlette.types import Scope

from gateway.tokens import TOKEN_PREFIX

PROCESS_STATE_KEY = "enclave.process"
CLAIM_HEADER = "x-enclave-client-process"
MAX_CLAIM_BYTES = 1024
MAX_ARGS = 32
MAX_ARG_CHARS = 256
_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{8,}")

Scrub = Callable[[str], str]


def peer_pid_uid_gid(sock: socket.socket) -> tuple[int, int, int] | None:
    """The kernel's record of who connected to a Unix socket (Linux SO_PEERCRED), or None."""
    if sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return None
    fmt = "3i"
    pid, uid, gid = struct.unpack(fmt, sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt)))
    return (pid, uid, gid) if pid > 0 else None


def describe(pid: int, scrub: Scrub) -> dict[str, Any] | None:
    """pid, parent pid, executable, command line (bounded, secrets scrubbed), real uid and user; None if it is gone.

    The executable is None when /proc will not show it (another user's process, unless the gateway is root)."""
    proc = Path(f"/proc/{pid}")
    try:
        status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
        raw_args = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    try:
        exe: str | None = os.readlink(proc / "exe")
    except OSError:
        exe = None
    uid = int(status["Uid"].split()[0])
    args = [arg.decode("utf-8", "replace") for arg in raw_args if arg][:MAX_ARGS]
    return {
        "pid": pid,
        "ppid": int(status["PPid"]),
        "exe": exe,
        "cmdline": [_TOKEN.sub(TOKEN_PREFIX + "[hidden]", scrub(arg))[:MAX_ARG_CHARS] for arg in args],
        "uid": uid,
        "user": _user(uid),
    }


def _user(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def runs_enclave(cmdline: list[str], command: str) -> bool:
    """Whether a command line runs `enclave COMMAND` (`enclave ... COMMAND` or `python -m gateway ... COMMAND`)."""
    if command not in cmdline:
        return False
    launcher = [Path(arg).name for arg in cmdline[: cmdline.index(command)]]
    return "enclave" in launcher or ("-m", "gateway") in itertools.pairwise(launcher)


def attribute(sock: socket.socket, scrub: Scrub) -> dict[str, Any] | None:
    """The agent process behind a Unix socket connection: the peer itself, or, when the peer is the stdio wrapper,
    the process that launched it (with the wrapper under `via`). A process that merely looks like the wrapper can
    only move the attribution to its own real parent. None on TCP."""
    peer = peer_pid_uid_gid(sock)
    if peer is None:
        return None
    pid, uid, gid = peer
    process = describe(pid, scrub) or {"pid": pid}
    process.update(uid=uid, gid=gid, user=_user(uid))  # the kernel's word, not /proc's
    if runs_enclave(process.get("cmdline", []), "connect") and process["ppid"] > 1:
        parent = describe(process["ppid"], scrub)
        if parent is not None:
            return {**parent, "via": process}
    return process


class PeerCredentials:
    """Added to uvicorn's HTTP/1.1 protocol for the agents' socket (whichever parser it selected, h11 or
    httptools; see `with_peer_credentials`): attributes each connection once, when it is accepted.

    Both protocols copy `app_state` into every request's `scope["state"]`; giving each connection its own copy
    with the attributed process carries it to the application without any per-request lookup."""

    app_state: dict[str, Any]  # set by the protocol's __init__

    def __init__(self, *args: Any, scrub: Scrub, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.scrub = scrub

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        sock = transport.get_extra_info("socket")  # uvloop gives a PseudoSocket: getsockopt works on it too
        process = attribute(sock, self.scrub) if sock is not None else None
        if process is not None:
            self.app_state = {**self.app_state, PROCESS_STATE_KEY: process}


def process_of(scope: Scope) -> dict[str, Any] | None:
    """What the audit records about the caller's process: the verified process of a Unix socket connection, and
    what the client claims about itself (under `claim`, never trusted)."""
    verified = scope.get("state", {}).get(PROCESS_STATE_KEY)
    raw = next((value for key, value in scope["headers"] if key == CLAIM_HEADER.encode()), None)
    if raw is None:
        return verified
    return {**(verified or {}), "claim": _claim(raw)}


@lru_cache(maxsize=256)
def _claim(raw: bytes) -> dict[str, Any] | str:
    """A client's claim about its process: a small flat JSON object, or a note that it was not one."""
    if len(raw) <= MAX_CLAIM_BYTES:
        try:
            claim = json.loads(raw)
        except ValueError:
            claim = None
        if isinstance(claim, dict) and all(isinstance(v, str | int | None) for v in claim.values()):
            return claim
    return "unreadable"


AGENTS_SOCKET_FILE = "agents.sock"


def agents_socket(state_dir: Path) -> Path:
    """Where the gateway listens for local agents (the stdio wrapper): beside its state."""
    return state_dir / AGENTS_SOCKET_FILE


def summary(process: dict[str, Any] | None) -> str | None:
    """The recorded process in a few words: `PID NAME (USER)`, `via connect PID` when it came through the wrapper;
    a claim alone (no peer credentials, e.g. over TCP) reads `claims pid PID`."""
    if not process:
        return None
    if "pid" not in process:
        claim = process.get("claim")
        return f"claims pid {claim.get('pid')}" if isinstance(claim, dict) else "unverified"
    name = Path(process.get("exe") or (process.get("cmdline") or ["?"])[0]).name
    text = f"{process['pid']} {name} ({process.get('user') or process.get('uid')})"
    return text + (f" via connect {process['via']['pid']}" if isinstance(process.get("via"), dict) else "")
