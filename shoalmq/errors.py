"""All of ShoalMQ's errors, rooted in one exception, and the exit codes of the ``broker`` command."""

import enum
import os


class ExitCode(enum.IntEnum):
    """Exit codes of the ``broker`` command (the README lists them; a test checks the list is complete)."""

    OK = 0
    """Stopped normally (including by SIGTERM or SIGINT)."""
    RUNTIME_ERROR = 1
    """Could not start or keep serving: the listen address is taken, the data directory is unusable or locked."""
    USAGE_ERROR = 2
    """Bad command-line flags or a bad configuration file; nothing was started."""


class ShoalError(Exception):
    """Root of every error ShoalMQ raises on purpose; ``exit_code`` is what ``broker`` exits with on it.

    ``retriable``: the same request may succeed later or elsewhere unchanged (the caller refreshes its view of the
    cluster and tries again); false: retrying as is would fail the same way. Callers decide by this attribute,
    never by the error's text."""

    exit_code = ExitCode.RUNTIME_ERROR
    retriable = False


class ConfigError(ShoalError):
    """A flag or configuration value is missing, malformed or out of range."""

    exit_code = ExitCode.USAGE_ERROR


class StartupError(ShoalError):
    """The broker could not start: a resource it needs (address, data directory) is unavailable."""


def os_error_text(exc: OSError) -> str:
    """The short system message for an OSError ("Address already in use"), however it was raised.

    uvloop puts a long sentence in ``strerror``; the errno's own text is shorter and the same everywhere.
    """
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


class QueueError(ShoalError):
    """A queue refused a message (the publisher must not be acknowledged)."""


class QueueFull(QueueError):
    """The queue holds ``max_depth`` messages already."""


class PayloadTooLarge(QueueError):
    """The payload is larger than the queue's ``max_payload``."""


class StorageError(ShoalError):
    """The partition log could not make a write durable; the writes of that commit are not acknowledged."""


class StorageFull(StorageError):
    """The disk (or the configured ``max_map_size``) is full."""


class NotOwner(ShoalError):
    """This node does not own the partition (the caller refreshes its view of the cluster and retries)."""

    retriable = True


class StaleEpoch(ShoalError):
    """The partition's current epoch differs from the one the caller named."""

    retriable = True


class PeerUnavailable(ShoalError):
    """Another node could not be reached, or its stream broke before it answered (what was sent may have been
    stored there: a retry may duplicate, never lose)."""

    retriable = True
