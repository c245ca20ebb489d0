"""The admin control channel: a Unix socket in the (0700) state directory.

Admin commands (`enclave agent revoke`, later grants and approvals) change the state database and then
tell a running gateway to reload what changed, so the change applies to the very next request without
the gateway polling the database on its hot path. Only the owner of the state directory can connect;
agent tokens play no part here.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from anyio.abc import SocketStream

logger = logging.getLogger(__name__)

SOCKET_FILE = "control.sock"
MAX_MESSAGE = 64 * 1024

Handler = Callable[[dict[str, object]], Awaitable[dict[str, object]]]


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_FILE


async def serve(state_dir: Path, handle: Handler) -> None:
    """Answer one JSON request per connection until cancelled."""
    path = socket_path(state_dir)
    path.unlink(missing_ok=True)
    listener = await anyio.create_unix_listener(path)
    path.chmod(0o600)

    async def one(stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(5):
                    request = json.loads(await _read_all(stream))
                    reply = await handle(request)
            except Exception as exc:
                logger.warning("control request failed: %s", exc)
                reply = {"ok": False, "error": "request failed"}
            await stream.send(json.dumps(reply).encode())

    try:
        async with listener:
            await listener.serve(one)
    finally:
        path.unlink(missing_ok=True)


async def _read_all(stream: SocketStream) -> bytes:
    data = b""
    while len(data) <= MAX_MESSAGE:
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            return data
    raise ValueError("control message too large")


def request(state_dir: Path, message: dict[str, object], timeout: float = 5.0) -> dict[str, object] | None:
    """Send one request to a running gateway; None when no gateway is listening."""
    path = socket_path(state_dir)
    if not path.exists():
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode())
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(MAX_MESSAGE):
                reply += chunk
            return json.loads(reply)
    except (OSError, ValueError):
        return None
