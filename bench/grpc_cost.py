"""What one gRPC stream message costs on this machine: ``python -m bench.grpc_cost``.

A client streams N messages of a given size on one bidirectional grpc.aio stream (uvloop, as the broker runs),
keeping W of them unanswered; a server in another process answers each with one byte. Printed per message: the
client's and the server's CPU (user + system, from ``/proc``) and their thread switches (voluntary and involuntary,
summed over their threads). Every hop between ShoalMQ nodes pays this per gRPC message, whatever it carries: the
figure behind batching everything between two nodes into one frame per loop turn (``shoalmq.cluster.transport``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import uvloop

METHOD = "/bench.Echo/Stream"
TICKS = os.sysconf("SC_CLK_TCK")


def identity(data: bytes) -> bytes:
    return data


def usage(pid: int) -> tuple[float, int]:
    """CPU seconds and thread switches of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
        except OSError:
            pass  # a thread that ended meanwhile
    return cpu, switches


async def serve(port: int) -> None:
    async def stream(requests, context):  # type: ignore[no-untyped-def]
        async for _ in requests:
            yield b"a"
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(stream, identity, identity)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def measure(port: int, server_pid: int, messages: int, window: int, size: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(METHOD, identity, identity)()
        payload = b"x" * size
        await call.write(payload)  # connected and warm
        await call.read()
        credit = asyncio.Semaphore(window)

        async def read() -> None:
            for _ in range(messages):
                await call.read()
                credit.release()
        before = usage(os.getpid()), usage(server_pid)
        started = time.perf_counter()
        reader = asyncio.ensure_future(read())
        for _ in range(messages):
            await credit.acquire()
            await call.write(payload)
        await reader
        elapsed = time.perf_counter() - started
        after = usage(os.getpid()), usage(server_pid)
        await call.done_writing()
    (c0, s0), (c1, s1) = before, after
    return {"msgs_per_s": messages / elapsed,
            "client_us": (c1[0] - c0[0]) / messages * 1e6, "server_us": (s1[0] - s0[0]) / messages * 1e6,
            "client_switches": (c1[1] - c0[1]) / messages, "server_switches": (s1[1] - s0[1]) / messages}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--windows", default="1,64", help="comma-separated windows (default: 1,64)")
    parser.add_argument("--sizes", default="100,6400,65536", help="comma-separated payload sizes in bytes")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        uvloop.run(serve(args.serve))
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.grpc_cost", "--serve", str(port)],
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        if not _wait(port):
            raise SystemExit("the echo server did not start")
        print(f"{args.messages:,} messages per row; CPU and thread switches per gRPC message")
        print("| window | size | msgs/s | client CPU | server CPU | client switches | server switches |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for window in (int(w) for w in args.windows.split(",")):
            for size in (int(s) for s in args.sizes.split(",")):
                row = uvloop.run(measure(port, server.pid, args.messages, window, size))
                print(f"| {window} | {size:,} B | {row['msgs_per_s']:,.0f} | {row['client_us']:.0f} µs | "
                      f"{row['server_us']:.0f} µs | {row['client_switches']:.1f} | {row['server_switches']:.1f} |")
    finally:
        server.kill()
        server.wait()


def _wait(port: int, timeout: float = 10.0) -> bool:
    """Whether the server accepts connections within ``timeout`` seconds (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


if __name__ == "__main__":
    main()
