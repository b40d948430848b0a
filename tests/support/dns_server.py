"""A DNS server on 127.0.0.1 (UDP, ephemeral port) whose A records a test sets and changes,
built on dnspython's message tools; the gateway's discovery queries it like any nameserver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


@dataclass
class FakeDns:
    records: dict[str, list[str]] = field(default_factory=dict)  # name -> A addresses
    servfail: bool = False  # answer every query with SERVFAIL (a resolver outage)
    queries: int = 0
    nameserver: str = ""  # "127.0.0.1:PORT", set once serving

    def answer(self, wire: bytes) -> bytes:
        self.queries += 1
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        if self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A and self.records[name]:
            rrset = dns.rrset.from_text_list(question.name, 1, "IN", "A", self.records[name])
            response.answer.append(rrset)
        return response.to_wire()  # AAAA (or an empty A list): NOERROR with no answer


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: FakeDns) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(self.server.answer(data), addr)


@asynccontextmanager
async def dns_server(records: dict[str, list[str]]) -> AsyncIterator[FakeDns]:
    server = FakeDns(records)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Protocol(server), local_addr=("127.0.0.1", 0)
    )
    server.nameserver = "127.0.0.1:{}".format(transport.get_extra_info("sockname")[1])
    try:
        yield server
    finally:
        transport.close()
