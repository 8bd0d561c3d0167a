"""Logging an operator can read: a refusal or error that repeats is logged once per client and interval, with a
count of the ones it stood for, instead of once per connection (a client that reconnects and retries would flood
the log); a long task an operator waits on (a large log recovered at start, a replica catching up) says how far it
is, at most every few seconds."""

from __future__ import annotations

import logging
import time
from typing import Any

#: Seconds during which further lines of one kind, for one client, are counted instead of logged.
INTERVAL = 60.0
#: Seconds between two progress lines of one long task (none for a task done sooner).
PROGRESS_INTERVAL = 3.0
#: Kinds remembered at most (the oldest are forgotten past it: memory stays bounded whatever clients do).
MAX_KEYS = 4096


class RepeatLimiter:
    """``log(key, message, *args)`` logs the first line of a key at once; more lines of that key within
    ``interval`` seconds are counted, and the first one after it says how many there were."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, interval: float = INTERVAL) -> None:
        self.logger = logger
        self.level = level
        self.interval = interval
        self._seen: dict[Any, list[float | int]] = {}  # key -> [when last logged, lines counted since]

    def log(self, key: Any, message: str, *args: Any) -> bool:
        """Log now (True) or count it (False)."""
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            message += f" (and {int(seen[1])} more like it in the last {now - seen[0]:.0f} s)"
        if seen is None and len(self._seen) >= MAX_KEYS:
            del self._seen[next(iter(self._seen))]
        self._seen[key] = [now, 0]
        self.logger.log(self.level, message, *args)
        return True


class Progress:
    """``step(done)`` logs "<what>: <done> of <total> <unit> (<percent>) after <seconds>" at INFO, at most every
    ``interval`` seconds from the start: a task done within the first interval logs nothing here."""

    def __init__(self, logger: logging.Logger, what: str, total: int, unit: str,
                 interval: float = PROGRESS_INTERVAL) -> None:
        self.logger, self.what, self.total, self.unit, self.interval = logger, what, total, unit, interval
        self.started = time.monotonic()
        self._next = self.started + interval
        #: Whether a progress line was logged (the caller may then log the end too).
        self.logged = False

    def step(self, done: int, detail: str = "") -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        self.logged = True
        share = f" ({done * 100 // self.total}%)" if self.total else ""
        self.logger.info("%s: %s of %s %s%s after %.1f s%s", self.what, f"{done:,}", f"{self.total:,}", self.unit,
                         share, now - self.started, detail)
