"""The HTTP protocol's coalesced writes (gateway.http_protocol.CoalescedWrites): a response's head and body, written
in one pass of the event loop, leave in one write; nothing held is lost or reordered when the connection closes.

Run against a transport that records what reaches it: the socket's own transport would merge the bytes of two
writes in the peer's receive buffer, so only the transport can tell one write from two. Every other test of the
gateway runs through the real protocol and its real transport."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.http_protocol import CoalescedWrites

pytestmark = pytest.mark.anyio  # on asyncio (tests/conftest.py), the gateway's loop


class Recorded(asyncio.Transport):
    """What the connection's transport was asked to do, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def write_eof(self) -> None:
        self.calls.append(("write_eof", None))

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", None))

    def abort(self) -> None:
        self.closing = True
        self.calls.append(("abort", None))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0


class Protocol:
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport


def connect() -> tuple[Any, Recorded]:
    transport = Recorded()
    protocol = type("Coalesced", (CoalescedWrites, Protocol), {})()
    protocol.connection_made(transport)
    return protocol.transport, transport


async def next_pass() -> None:
    await asyncio.sleep(0)  # a yield, not a wait: the flush was scheduled before this task's resumption


async def test_a_head_and_body_written_in_one_pass_leave_in_one_write() -> None:
    coalesced, transport = connect()
    coalesced.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    coalesced.write(bytearray(b"{}"))
    assert transport.calls == [] and coalesced.get_write_buffer_size() == 40
    await next_pass()
    assert transport.calls == [("write", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")]
    coalesced.write(b"next")  # a later pass: a write of its own
    await next_pass()
    assert transport.calls[1:] == [("write", b"next")]


async def test_what_is_held_is_written_before_the_connection_closes() -> None:
    coalesced, transport = connect()
    coalesced.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    coalesced.close()
    coalesced.write(b"late")  # after close: straight to the transport, which answers as it would have
    await next_pass()
    assert transport.calls == [("write", b"HTTP/1.1 400 Bad Request\r\n\r\n"), ("close", None), ("write", b"late")]

    coalesced, transport = connect()
    coalesced.write(b"body")
    coalesced.write_eof()
    assert transport.calls == [("write", b"body"), ("write_eof", None)]


async def test_an_aborted_or_lost_connection_writes_nothing_held() -> None:
    coalesced, transport = connect()
    coalesced.write(b"held")
    coalesced.abort()
    await next_pass()
    assert transport.calls == [("abort", None)]

    coalesced, transport = connect()
    coalesced.write(b"held")
    transport.closing = True  # the peer went away before the next pass
    await next_pass()
    assert transport.calls == []
