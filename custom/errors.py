"""Errors raised on bad input. Every message names the offending file (or item) and the problem."""

from __future__ import annotations

import os


class MammoInputError(ValueError):
    """Bad input data: ``str(err)`` reads ``"<source>: <reason>"``.

    Args:
        source: the file path (or item id) the problem was found in.
        reason: what is wrong, in words a user can act on.
    """

    def __init__(self, source: str | os.PathLike | None, reason: str):
        self.source = None if source is None else str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}" if self.source else reason)

    def __reduce__(self):  # keep the two fields through multiprocessing pickling
        return (type(self), (self.source, self.reason))
