"""Human-friendly quantities: memory sizes and bandwidths.

Device and slice files say ``"64 GiB"`` and ``"25 Gbit/s"``; the firmware works in bytes
and Mbit/s (integers, so that sums are exact). A bare integer is taken as already in the
base unit (bytes, Mbit/s).
"""

from __future__ import annotations

import re
from fractions import Fraction

from firmware.errors import RequestError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6,
    "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
}  # fmt: skip

_BW_UNITS_MBPS = {
    "": 1, "mbit/s": 1, "mbps": 1, "mb/s": 1, "m": 1,
    "gbit/s": 1000, "gbps": 1000, "gb/s": 1000, "g": 1000,
    "tbit/s": 1_000_000, "tbps": 1_000_000, "t": 1_000_000,
}  # fmt: skip

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z/]*)\s*$")


def _parse(field: str, value: object, units: dict[str, int], what: str) -> int:
    if isinstance(value, bool):
        raise RequestError(field, f"expected a {what}, got a boolean", got=value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, str):
        raise RequestError(field, f"expected a {what}, got {type(value).__name__}", got=repr(value))
    m = _QUANTITY.match(value)
    if m is None or m.group(2).lower() not in units:
        raise RequestError(
            field,
            f"cannot read {value!r} as a {what}",
            got=value,
            expected=f"a number and one of: {', '.join(sorted(u for u in units if u))}",
        )
    number, unit = m.group(1), m.group(2).lower()
    scaled = Fraction(number) * units[unit]  # exact: "2.01 Gbit/s" is 2010 Mbit/s
    if scaled.denominator != 1:
        raise RequestError(field, f"{value!r} is not a whole number of base units", got=value)
    return int(scaled)


def parse_size(field: str, value: object) -> int:
    """``"4 GiB"`` → bytes. Raises :class:`RequestError` naming ``field``."""
    return _parse(field, value, _SIZE_UNITS, "size (e.g. '4 GiB')")


def parse_bandwidth(field: str, value: object) -> int:
    """``"25 Gbit/s"`` → Mbit/s. Raises :class:`RequestError` naming ``field``."""
    return _parse(field, value, _BW_UNITS_MBPS, "bandwidth (e.g. '25 Gbit/s')")


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
