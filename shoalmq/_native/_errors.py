"""Exceptions shared by a compiled module and its pure-Python twin, so callers catch one class whichever is loaded."""


class RingFull(Exception):
    """A push onto a ``RingBuffer`` that has no room left; the buffer is unchanged."""
