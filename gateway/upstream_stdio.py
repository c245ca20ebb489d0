"""The stdio transport to upstream servers: the SDK's, with a bound on each message.

The SDK's stdio client (`mcp.client.stdio`) reads a server's stdout into one string until a newline, rebuilding
it on every chunk: a server that sends a giant line makes the gateway buffer all of it, in quadratic time (50 MB
took 26 s of CPU on these machines, stalling every other connector). This transport reads the same
newline-delimited JSON-RPC and runs the server process with the SDK's own helpers (spawn in a new process
group, the spec's shutdown sequence), but holds at most `max_bytes` of a line: a longer one is never buffered,
`on_oversized` is told and the transport ends, so the requests waiting on the server fail at once (the
connector's `Upstream` reports them and restarts the server with backoff). A line that is not JSON-RPC is
logged (without its content) and skipped, as the SDK does.

Beside the SDK's session, a `RawLane` carries the fast path's requests (see its docstring).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TextIO

import anyio
import mcp_types as types
from anyio.abc import ByteReceiveStream, ByteSendStream
from mcp.client import stdio as sdk_stdio
from mcp.client._transport import TransportStreams
from mcp.shared.message import SessionMessage

logger = logging.getLogger(__name__)

WRITER_FLUSH_SECONDS = 0.5  # as the SDK's stdio client
LANE_ID_PREFIX = "enclave-"
_LANE_MARK = f'"{LANE_ID_PREFIX}'.encode()


class LaneClosed(ConnectionError):
    """The server's pipes closed (it exited, or sent a message over the bound) with the request unanswered."""


class RawLane:
    """Requests written to the server's stdin as plain JSON, their responses taken off its stdout before the
    SDK's session sees them: the fast path's upstream hop.

    Why: for each request the SDK's session builds and validates pydantic models on both sides and passes the
    message through anyio memory streams, a dispatcher task and cancel scopes; measured on these machines
    that was about a fifth of the gateway's CPU per call. The lane does one `json.dumps` and one `json.loads`
    on plain asyncio futures. Its ids are strings (`enclave-<n>`) and the SDK numbers its requests with
    integers, so the two never collide; everything that is not a response to the lane (notifications, the
    server's own requests, responses to the SDK) goes on to the session unchanged. What the request carries
    (the era's `_meta` stamp, trace context) and what its result means are the caller's business
    (`Upstream.send_raw`), tested against the SDK path in tests/test_fastpath.py.
    """

    def __init__(self) -> None:
        self._stdin: ByteSendStream | None = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)

    def open(self, stdin: ByteSendStream) -> None:
        self._stdin = stdin

    def new_id(self) -> str:
        return f"{LANE_ID_PREFIX}{next(self._ids)}"

    async def request(self, request_id: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send one request (its id from `new_id`); return its response message, with a `result` or an `error`.
        Raises LaneClosed if the server is gone. A caller that gives up (cancelled, timed out) tells the server
        with notifications/cancelled, as the SDK does."""
        if self._stdin is None:
            raise LaneClosed
        answered = self._waiting[request_id] = asyncio.get_running_loop().create_future()
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        try:
            await self._stdin.send(json.dumps(message, separators=(",", ":")).encode() + b"\n")
            return await answered
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            raise LaneClosed from None
        except BaseException:
            await self._cancel(request_id)
            raise
        finally:
            del self._waiting[request_id]

    async def _cancel(self, request_id: str) -> None:
        notice = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": request_id}}
        with anyio.CancelScope(shield=True), anyio.move_on_after(WRITER_FLUSH_SECONDS):
            try:
                if self._stdin is not None:
                    await self._stdin.send(json.dumps(notice).encode() + b"\n")
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                pass

    def took(self, line: bytes) -> bool:
        """Whether `line` is a response to the lane (then it has been handed to its waiting caller)."""
        if _LANE_MARK not in line:
            return False
        try:
            message = json.loads(line)
        except ValueError:
            return False
        request_id = message.get("id") if isinstance(message, dict) and "method" not in message else None
        if not isinstance(request_id, str) or not request_id.startswith(LANE_ID_PREFIX):
            return False
        answered = self._waiting.get(request_id)
        if not _is_response(message):  # skipped as the SDK skips a line that is not JSON-RPC
            logger.warning("a response of %d bytes on stdout is not JSON-RPC; skipped", len(line))
        elif answered is not None and not answered.done():
            answered.set_result(message)
        return True  # a late answer to a request given up on is dropped, as the SDK drops one

    def close(self) -> None:
        """The server is gone: every waiting request fails now, and any later one at once."""
        self._stdin = None
        for answered in self._waiting.values():
            if not answered.done():
                answered.set_exception(LaneClosed())


def _is_response(message: dict[str, Any]) -> bool:
    """A JSON-RPC response as the SDK's model accepts one: a result object, or an error with a code and message."""
    if message.get("jsonrpc") != "2.0":
        return False
    if "result" in message:
        return isinstance(message["result"], dict) and "error" not in message
    error = message.get("error")
    return isinstance(error, dict) and isinstance(error.get("code"), int) and isinstance(error.get("message"), str)


async def _lines(stdout: ByteReceiveStream, max_bytes: int) -> AsyncIterator[bytes | None]:
    """Each line of `stdout`; None (and then nothing more) for one longer than `max_bytes`."""
    held: list[bytes] = []
    size = 0
    async for chunk in stdout:
        *complete, rest = chunk.split(b"\n")
        for piece in complete:
            if size + len(piece) > max_bytes:
                yield None
                return
            yield b"".join([*held, piece])
            held, size = [], 0
        size += len(rest)
        if size > max_bytes:
            yield None
            return
        if rest:
            held.append(rest)


def _parse(name: str, line: bytes) -> SessionMessage | Exception:
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as exc:
        logger.warning("connector %s: a line of %d bytes on stdout is not JSON-RPC; skipped", name, len(line))
        return exc


@asynccontextmanager
async def bounded_stdio_client(
    name: str,
    server: sdk_stdio.StdioServerParameters,
    errlog: TextIO,
    max_bytes: int,
    on_oversized: Callable[[], None],
    lane: RawLane,
) -> AsyncIterator[TransportStreams]:
    """Run connector `name`'s server and exchange messages of at most `max_bytes` with it, through the SDK's
    session (the streams yielded) and through `lane`."""
    process = await sdk_stdio._create_platform_compatible_process(
        command=await sdk_stdio._get_executable_command(server.command),
        args=server.args,
        env=sdk_stdio.get_default_environment() | (server.env or {}),
        errlog=errlog,
        cwd=server.cwd,
    )
    assert process.stdin is not None and process.stdout is not None, "the server is spawned with pipes"
    stdin, stdout = process.stdin, process.stdout
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)
    writer_done = anyio.Event()
    lane.open(stdin)

    async def read() -> None:
        try:
            async with read_writer:
                async for line in _lines(stdout, max_bytes):
                    if line is None:
                        logger.warning("connector %s sent a message over %d bytes; disconnected", name, max_bytes)
                        on_oversized()
                        return
                    if line.strip() and not lane.took(line):
                        await read_writer.send(_parse(name, line))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, ConnectionError):
            pass  # the session or our own shutdown closed a stream under the read
        finally:
            lane.close()
            await sdk_stdio._drain_stdout(process)  # a server blocked on a full pipe could not exit

    async def write() -> None:
        try:
            async with write_reader:
                async for message in write_reader:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n"
                    await stdin.send(data.encode())
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            await read_writer.aclose()
        finally:
            writer_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        tg.start_soon(write)
        try:
            yield read_stream, write_stream
        finally:
            with anyio.CancelScope(shield=True):  # the process must not outlive a cancelled caller
                read_stream.close()
                write_stream.close()
                with anyio.move_on_after(WRITER_FLUSH_SECONDS):
                    await writer_done.wait()
                await sdk_stdio._stop_server_process(process)
                await sdk_stdio._aclose_all(read_stream, write_stream, read_writer, write_reader)
            tg.cancel_scope.cancel()
