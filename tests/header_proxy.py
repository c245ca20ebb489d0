"""Loopback HTTP/1.1 proxy that adds one header to every request, for clients that cannot send it.

    python tests/header_proxy.py LISTEN_PORT UPSTREAM_PORT 'Authorization: Bearer TOKEN'

It rewrites only the heads: the request gets the header (replacing one of the same name), and both request
and response get `Connection: close`, so each request has its own connections. Bodies are copied both ways
as they come: SSE streams pass through unbuffered, and Host/Origin reach the upstream unchanged.
Standard library only; loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes from reader to writer until EOF or a broken connection."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def rewrite_head(reader: asyncio.StreamReader, drop: set[str], add: list[str]) -> bytes:
    """Read an HTTP head, drop the headers named in `drop` (lower case) and append the lines in `add`."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[:-2]
    kept = [h for h in lines[1:] if h.split(":", 1)[0].strip().lower() not in drop]
    return "\r\n".join([lines[0], *kept, *add, "", ""]).encode("latin-1")


async def handle(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter, upstream: int, header: str) -> None:
    """Serve one client connection: one request to a new upstream connection, both heads fixed up."""
    uwriter = None
    hop = {"connection", "keep-alive"}
    name = header.split(":", 1)[0].strip().lower()
    try:
        request = await rewrite_head(creader, hop | {name}, [header, "Connection: close"])
        ureader, uwriter = await asyncio.open_connection("127.0.0.1", upstream)
        uwriter.write(request)
        tasks = [asyncio.create_task(pipe(creader, uwriter))]
        cwriter.write(await rewrite_head(ureader, hop, ["Connection: close"]))  # so the client won't reuse it
        tasks.append(asyncio.create_task(pipe(ureader, cwriter)))
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        for w in (cwriter, uwriter):
            if w is not None:
                w.close()


async def main(port: int, upstream: int, header: str) -> None:
    """Listen on 127.0.0.1:PORT and proxy to 127.0.0.1:UPSTREAM until killed."""
    server = await asyncio.start_server(lambda r, w: handle(r, w, upstream, header), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
