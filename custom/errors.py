"""Errors raised on bad input. Every message names the offending file (or item) and the problem."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


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


def option_int(name: str, value: Any, low: int, high: int) -> int:
    """An integer option (CLI strings like ``"3"`` accepted) within ``[low, high]``; else one clear
    :class:`MammoInputError` naming the option."""
    shown = repr(value)[:40]
    if isinstance(value, bool) or value is None:
        raise MammoInputError(name, f"must be an integer {low}..{high}, got {shown}")
    try:
        if isinstance(value, str):
            text = value.strip()
            if len(text) > 30:
                raise ValueError
            number = int(text) if text.lstrip("+-").isdigit() else float(text)
        else:
            number = value
        if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
            raise ValueError
        number = int(number)
    except (TypeError, ValueError, OverflowError):
        raise MammoInputError(name, f"must be an integer {low}..{high}, got {shown}") from None
    if not low <= number <= high:
        raise MammoInputError(name, f"must be an integer {low}..{high}, got {shown}")
    return number


def option_float(name: str, value: Any, low: float, high: float) -> float:
    """A finite float option (CLI strings accepted) within ``[low, high]``; else one clear :class:`MammoInputError`."""
    shown = repr(value)[:40]
    try:
        if isinstance(value, bool) or value is None:
            raise ValueError
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise MammoInputError(name, f"must be a number {low:g}..{high:g}, got {shown}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise MammoInputError(name, f"must be a finite number {low:g}..{high:g}, got {shown}")
    return number


def check_path_option(name: str, value: Any) -> None:
    """A file/folder option: text without NUL, every path component at most 255 bytes (the file-system limit)."""
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)):
        raise MammoInputError(name, f"expected a path, got {type(value).__name__}")
    text = os.fspath(value)
    if "\x00" in text or not text.strip():
        raise MammoInputError(name, "not a usable path (empty, or holds a NUL character)")
    long = [part for part in Path(text).parts if len(part.encode("utf-8", "surrogateescape")) > 255]
    if long:
        raise MammoInputError(text[:120] + ("..." if len(text) > 120 else ""),
                              f"{name}: a path component is longer than 255 bytes ({len(long[0])} characters)")
    if len(text.encode("utf-8", "surrogateescape")) > 4096:
        raise MammoInputError(name, "path longer than 4096 bytes")
