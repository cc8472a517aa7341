"""Quantities as people write them: ``"4 GiB"`` → bytes, ``"25 Gbit/s"`` → Mbit/s.

Shared by the firmware (slice files, admin requests) and hostlib (a VM's arguments), so
both read a quantity the same way. A bare integer is already in the base unit. Arithmetic
is exact (``"2.01 Gbit/s"`` is 2010 Mbit/s). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Final

SIZE_UNITS: Final[Mapping[str, int]] = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6,
    "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}  # fmt: skip

BANDWIDTH_UNITS_MBPS: Final[Mapping[str, int]] = {
    "": 1, "mbit/s": 1, "mbps": 1, "mb/s": 1, "m": 1,
    "gbit/s": 1000, "gbps": 1000, "gb/s": 1000, "g": 1000,
    "tbit/s": 1_000_000, "tbps": 1_000_000, "t": 1_000_000,
}  # fmt: skip

SIZE_WHAT: Final = "size (e.g. '4 GiB')"
BANDWIDTH_WHAT: Final = "bandwidth (e.g. '25 Gbit/s')"

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z/]*)\s*$")


class QuantityError(ValueError):
    """Not a quantity of the expected kind; ``message`` says why, ``details`` what."""

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


def parse_quantity(value: object, units: Mapping[str, int], what: str) -> int:
    """``value`` (an int in the base unit, or a number and a unit) in the base unit.

    Raises:
        QuantityError: a boolean, another type, an unknown unit, or a fraction of the
            base unit.
    """
    if isinstance(value, bool):
        raise QuantityError(f"expected a {what}, got a boolean", got=value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, str):
        raise QuantityError(f"expected a {what}, got {type(value).__name__}", got=repr(value))
    m = _QUANTITY.match(value)
    if m is None or m.group(2).lower() not in units:
        raise QuantityError(
            f"cannot read {value!r} as a {what}",
            got=value,
            expected=f"a number and one of: {', '.join(sorted(u for u in units if u))}",
        )
    scaled = Fraction(m.group(1)) * units[m.group(2).lower()]
    if scaled.denominator != 1:
        raise QuantityError(f"{value!r} is not a whole number of base units", got=value)
    return int(scaled)
