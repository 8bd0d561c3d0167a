"""Child process for the crash tests: enqueues forever and reports every message whose enqueue resolved.

Usage: python tests/crash_writer.py LOG_DIR PARTITIONS
Writes one line per resolved message to stdout, ``<partition> <offset>``, flushed as each commit resolves. The
payload of each message is ``<partition>:<offset>`` so the test can tell a stored message from anything else.
"""

import asyncio
import os
import sys

from shoalmq.queue.storage import LmdbBackend, Store


async def main(path: str, partitions: int) -> None:
    store = Store(LmdbBackend(path, map_size=1 << 26))
    parts = [store.partition("crash", p) for p in range(partitions)]
    i = 0
    while True:
        batch: list[tuple[int, int]] = []
        for _ in range(1 + i % 37):  # uneven batches, several partitions per commit
            part = parts[i % partitions]
            part.enqueue(f"{part.index}:{part.next_offset}".encode())
            batch.append((part.index, part.last_offset))
            i += 1
        flush = part.enqueue(f"{part.index}:{part.next_offset}".encode())
        batch.append((part.index, part.last_offset))
        lines = "".join(f"{p} {o}\n" for p, o in batch).encode()
        flush.add_done_callback(lambda f, lines=lines: f.exception() is None and os.write(1, lines))
        await asyncio.sleep(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
