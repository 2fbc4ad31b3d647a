#!/usr/bin/env python3
# A delaying TCP proxy for tests and benchmarks: a wide-area link on loopback, since this kernel has
# no netem qdisc. Each direction is one shared link (all connections together): bytes read from one
# side are serialised at `--rate` (a token bucket, i.e. the link is busy len/rate seconds per chunk)
# and delivered `--delay` later (propagation), in order. So a request/response pays 2 x delay, and
# a big transfer is bounded by the rate, like a real link; many connections share the bandwidth.
#
#   python3 scripts/delayproxy.py --listen 127.0.0.1:0 --target 127.0.0.1:9000 --delay-ms 25 --rate-mbit 200
#
# Prints `listening HOST:PORT` on stdout once ready; at SIGTERM or SIGUSR1, the bytes, connections
# and HTTP request lines carried so far as JSON to --stats FILE. Loopback only: it refuses any other
# listen or target address.
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import sys
import time

CHUNK = 64 << 10
QUEUE = 64  # chunks in flight per direction of a connection: back-pressure beyond it


class Link:
    """One direction of the wide-area link: serialisation at `rate` bytes/s, then `delay` s."""

    def __init__(self, delay: float, rate: float) -> None:
        self.delay = delay
        self.rate = rate
        self.busy_until = 0.0
        self.bytes = 0
        self.http_requests = 0  # request lines seen (client -> server direction, HTTP only)

    def deliver_at(self, n: int) -> float:
        now = time.monotonic()
        start = max(now, self.busy_until)
        self.busy_until = start + (n / self.rate if self.rate else 0.0)
        self.bytes += n
        return self.busy_until + self.delay


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE)

    async def send() -> None:
        while True:
            when, data = await queue.get()
            if not data:
                break
            wait = when - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):  # the peer may be gone already
            if writer.can_write_eof():
                writer.write_eof()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            link.http_requests += data.count(b" HTTP/1.1\r\n")
            await queue.put((link.deliver_at(len(data)), data))
    except ConnectionError:
        pass
    finally:
        await queue.put((time.monotonic() + link.delay, b""))
        with contextlib.suppress(ConnectionError):
            await sender


class Proxy:
    def __init__(self, target: tuple[str, int], delay: float, rate: float) -> None:
        self.target = target
        self.up = Link(delay, rate)  # client -> server
        self.down = Link(delay, rate)  # server -> client
        self.connections = 0

    async def handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            sreader, swriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.close()
            return
        # The TCP handshake crossed the link too: one round trip before the first byte.
        await asyncio.sleep(2 * self.up.delay)
        try:
            await asyncio.gather(pump(creader, swriter, self.up), pump(sreader, cwriter, self.down))
        finally:
            for w in (swriter, cwriter):
                w.close()

    def stats(self) -> dict[str, int]:
        return {
            "bytes_up": self.up.bytes,
            "bytes_down": self.down.bytes,
            "connections": self.connections,
            "http_requests": self.up.http_requests,
        }


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"delayproxy: {host} is not a loopback address")
    return host, int(port)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", required=True, type=_hostport, metavar="HOST:PORT")
    p.add_argument("--target", required=True, type=_hostport, metavar="HOST:PORT")
    p.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay (default 25)")
    p.add_argument("--rate-mbit", type=float, default=200.0, help="per-direction rate, 0 = unlimited")
    p.add_argument("--stats", metavar="FILE", help="write the bytes carried as JSON here at exit")
    args = p.parse_args()
    proxy = Proxy(args.target, args.delay_ms / 1000, args.rate_mbit * 1e6 / 8)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def dump() -> None:
        if args.stats:
            with open(args.stats + ".tmp", "w") as f:
                json.dump(proxy.stats(), f)
            os.replace(args.stats + ".tmp", args.stats)

    # The handlers before the socket: a client may signal as soon as it can connect.
    loop.add_signal_handler(signal.SIGUSR1, dump)
    server = await asyncio.start_server(proxy.handle, *args.listen)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening {host}:{port}", flush=True)
    await stop.wait()
    server.close()
    dump()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
