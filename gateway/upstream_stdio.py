"""The stdio transport to upstream servers: the SDK's, with a bound on each message.

The SDK's stdio client (`mcp.client.stdio`) reads a server's stdout into one string until a newline, rebuilding
it on every chunk: a server that sends a giant line makes the gateway buffer all of it, in quadratic time (50 MB
took 26 s of CPU on these machines, stalling every other connector). This transport reads the same
newline-delimited JSON-RPC and runs the server process with the SDK's own helpers (spawn in a new process
group, the spec's shutdown sequence), but holds at most `max_bytes` of a line: a longer one is never buffered,
`on_oversized` is told and the transport ends, so the requests waiting on the server fail at once (the
connector's `Upstream` reports them and restarts the server with backoff). A line that is not JSON-RPC is
logged (without its content) and skipped, as the SDK does.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TextIO

import anyio
import mcp_types as types
from anyio.abc import ByteReceiveStream
from mcp.client import stdio as sdk_stdio
from mcp.client._transport import TransportStreams
from mcp.shared.message import SessionMessage

logger = logging.getLogger(__name__)

WRITER_FLUSH_SECONDS = 0.5  # as the SDK's stdio client


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
) -> AsyncIterator[TransportStreams]:
    """Run connector `name`'s server and exchange messages of at most `max_bytes` with it."""
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

    async def read() -> None:
        try:
            async with read_writer:
                async for line in _lines(stdout, max_bytes):
                    if line is None:
                        logger.warning("connector %s sent a message over %d bytes; disconnected", name, max_bytes)
                        on_oversized()
                        return
                    if line.strip():
                        await read_writer.send(_parse(name, line))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, ConnectionError):
            pass  # the session or our own shutdown closed a stream under the read
        finally:
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
