"""Human-friendly quantities: memory sizes and bandwidths.

Device and slice files say ``"64 GiB"`` and ``"25 Gbit/s"``; the firmware works in bytes
and Mbit/s (integers, so that sums are exact). A bare integer is taken as already in the
base unit (bytes, Mbit/s).
"""

from __future__ import annotations

from collections.abc import Mapping

from abi.units import (
    BANDWIDTH_UNITS_MBPS,
    BANDWIDTH_WHAT,
    SIZE_UNITS,
    SIZE_WHAT,
    QuantityError,
    parse_quantity,
)
from firmware.errors import RequestError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


def _parse(field: str, value: object, units: Mapping[str, int], what: str) -> int:
    try:
        return parse_quantity(value, units, what)
    except QuantityError as e:
        raise RequestError(field, e.message, **e.details) from None


def parse_size(field: str, value: object) -> int:
    """``"4 GiB"`` → bytes. Raises :class:`RequestError` naming ``field``."""
    return _parse(field, value, SIZE_UNITS, SIZE_WHAT)


def parse_bandwidth(field: str, value: object) -> int:
    """``"25 Gbit/s"`` → Mbit/s. Raises :class:`RequestError` naming ``field``."""
    return _parse(field, value, BANDWIDTH_UNITS_MBPS, BANDWIDTH_WHAT)


def format_size(nbytes: int) -> str:
    """Bytes as the largest binary unit that keeps it whole: ``4294967296`` → ``"4 GiB"``."""
    for name, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes and nbytes % factor == 0:
            return f"{nbytes // factor} {name}"
    return f"{nbytes} B"


def format_bandwidth(mbps: int) -> str:
    """Mbit/s as text: ``25000`` → ``"25 Gbit/s"``."""
    if mbps and mbps % 1000 == 0:
        return f"{mbps // 1000} Gbit/s"
    return f"{mbps} Mbit/s"
