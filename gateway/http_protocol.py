"""The HTTP/1.1 protocol agents talk to: uvicorn's, on its compiled parser (httptools) and event loop (uvloop)
where they are installed, held to what h11 refuses, with every request its parser refuses audited, a response's
head and body sent in one write, and, on the agents' Unix socket, with each connection attributed to its process
(gateway.peers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

from gateway.peers import PeerCredentials

MAX_HEAD_BYTES = 64 * 1024  # a request's line and header fields; h11 stopped at 16 KiB (unless read at once)
HEAD_TOO_LARGE = "Request header fields too large."
PARSER_REFUSALS_KEY = "enclave.parser_refusals"
"""In the application's lifespan state: called with the reason of each request the HTTP parser refuses."""
ParserRefusals = Callable[[str], None]


class CoalescedWrites:
    """In front of uvicorn's HTTP protocol (either parser): what is written to the connection in one pass of the
    event loop goes out in one `write`.

    uvicorn writes a response's status line and headers when the application starts the response, and its body
    when that is sent: two system calls, and on loopback two TCP segments, each carried through the kernel's TCP
    stack to the agent's socket (and waking its reader) inside the call. Those writes were 11% of the event loop
    thread's CPU samples (perf, sequential tool calls). Measured with one gateway, blocks of 300 calls on fresh
    connections alternating with and without: the loop thread's CPU per call 1.85 -> 1.73 and 1.72 -> 1.62 ms,
    p50 6.93 -> 6.70 and 6.49 -> 6.37 ms (16 and 20 blocks each). An application that sends the head and then
    waits (a stream) still has the head on the wire in the next pass of the loop."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(_CoalescingTransport(transport))  # type: ignore[misc]


class _CoalescingTransport:
    """A transport whose writes are held until the event loop's next pass, then written at once (see
    `CoalescedWrites`); closing writes what is held first. Everything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if self._transport.is_closing():  # as before: the transport's own answer to a late write
            self._transport.write(data)
            return
        if not self._held:
            asyncio.get_running_loop().call_soon(self._flush)
        self._held.append(data if type(data) is bytes else bytes(data))  # a caller may reuse a mutable buffer

    def writelines(self, list_of_data: Iterable[bytes]) -> None:
        for data in list_of_data:
            self.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(data) for data in self._held)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held.clear()
        self._transport.abort()

    def _flush(self) -> None:
        if self._held:
            data, self._held = b"".join(self._held), []
            if not self._transport.is_closing():  # else the connection was lost meanwhile: as if sent before
                self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class AuditedRefusals:
    """In front of uvicorn's HTTP protocol (either parser): a request its parser refuses with 400 (not HTTP, an
    endless header section, not exactly one Host) is answered before the application sees it, so it is reported
    here, to be audited like every other refusal: reason `header_section_too_large` or `malformed_http`."""

    app_state: dict[str, Any]  # uvicorn's: the application's lifespan state

    def send_400_response(self, msg: str) -> None:
        refused: ParserRefusals | None = self.app_state.get(PARSER_REFUSALS_KEY)
        if refused is not None:
            refused("header_section_too_large" if msg == HEAD_TOO_LARGE else "malformed_http")
        super().send_400_response(msg)  # type: ignore[misc]


class StrictHttpTools:
    """In front of uvicorn's httptools protocol (llhttp), for both listeners: refuses again what h11 refused and
    llhttp lets through, where it matters to the gateway.

    - A header section without end: llhttp buffers a header field for as long as the client keeps sending it, so
      any local process could grow the gateway without bound before a token is even looked at. Past
      MAX_HEAD_BYTES the request is refused (400) and the connection closed.
    - Trailer fields, after a chunked body: uvicorn appends them to the request's headers, so a header could
      appear after the agent guard has checked them. They are dropped, as h11 drops them.
    - An HTTP/1.1 request without Host, or with two (RFC 9112, 3.2): 400, as h11 answers.

    It overrides uvicorn's parser callbacks; tests/security/test_transport.py holds the result to h11's answers."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._in_head = True  # from the end of a message to the end of the next one's header section
        self._head_bytes = 0  # that section's, counted by whole reads: a read a message begins in is not counted
        self._began = False
        self._hosts = 0

    def data_received(self, data: bytes) -> None:
        in_head, self._began = self._in_head, False
        super().data_received(data)  # type: ignore[misc]
        if in_head and self._in_head and not self._began:  # all of `data` belongs to one header section
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self.send_400_response(HEAD_TOO_LARGE)

    def on_message_begin(self) -> None:
        self._in_head, self._began, self._head_bytes, self._hosts = True, True, 0, 0
        super().on_message_begin()  # type: ignore[misc]

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field
        if name.lower() == b"host":
            self._hosts += 1
        super().on_header(name, value)  # type: ignore[misc]

    def on_headers_complete(self) -> None:
        if self._hosts != 1 and self.parser.get_http_version() == "1.1":
            raise ValueError("not exactly one Host")  # raised through the parser: uvicorn answers 400
        self._in_head = False
        super().on_headers_complete()  # type: ignore[misc]

    def on_message_complete(self) -> None:
        self._in_head = True
        super().on_message_complete()  # type: ignore[misc]


def http_and_loop() -> tuple[type[asyncio.Protocol], str]:
    """uvicorn's HTTP protocol and event loop: httptools (made strict) and uvloop, compiled, where they are
    installed (declared dependencies: together they take about 15% off the gateway's CPU per tool call),
    else h11 and asyncio, e.g. on Windows, where uvloop does not exist; either protocol with its refusals
    audited and its writes coalesced. Named rather than left to uvicorn's "auto", so that the parser facing
    agents is one the transport tests ran against."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is not installed
        from uvicorn.protocols.http.h11_impl import H11Protocol

        http = type("AuditedH11Protocol", (CoalescedWrites, AuditedRefusals, H11Protocol), {})
    else:
        http = type(
            "StrictHttpToolsProtocol", (CoalescedWrites, AuditedRefusals, StrictHttpTools, HttpToolsProtocol), {}
        )
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return http, "asyncio"
    return http, "uvloop"


@lru_cache(maxsize=8)
def with_peer_credentials(protocol: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (`uvicorn.Config.http_protocol_class`, once loaded) with `PeerCredentials`
    in front of it; built once per class."""
    return type(f"PeerCredentials{protocol.__name__}", (PeerCredentials, protocol), {})
