"""Predictive pre-allocation's forecaster: a seasonal quantile per (VM, application class,
resource, time of day).

Method (docs/adaptive.md, "Forecaster"): the day is cut into slots of ``slot_s`` seconds
(15 minutes by default). For every key and every past day the forecaster keeps the peak
use seen in each slot. The forecast for a window ``[start, end)`` is, for each slot the
window touches, the ``quantile`` (0.9 by default, linear interpolation between order
statistics) of that slot's peaks over the last ``days`` days before the slot's own day;
the largest of those is the answer. A slot with fewer than ``min_days`` days of history
gives no forecast, and neither does a window none of whose slots has one.

Why this and not exponential smoothing (statsmodels' Holt-Winters): the quantity that
matters is an upper bound on the coming peak, not its mean; a per-slot quantile is exactly
that, costs O(days) per slot, updates one sample at a time, needs no fitting step, and
cannot diverge on a short or gappy history. It is ~60 lines, so no dependency earns its
place (statsmodels would bring scipy and pandas into the firmware).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from firmware.adaptive.usage import Resource

DAY_S = 86400


@dataclass(frozen=True)
class ForecastKey:
    owner: str
    app_class: str
    resource: Resource


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear between order statistics, as numpy's
    default). Raises ValueError for an empty list or q outside [0, 1]."""
    if not values or not 0.0 <= q <= 1.0:
        raise ValueError("quantile: need values and 0 <= q <= 1")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class SeasonalQuantile:
    """Per key: day → slot → peak. Feed it with :meth:`observe`; ask :meth:`forecast`."""

    def __init__(
        self, *, slot_s: int = 900, days: int = 7, q: float = 0.9, min_days: int = 2
    ) -> None:
        if not (0 < slot_s <= DAY_S and DAY_S % slot_s == 0):
            raise ValueError(f"slot_s: {slot_s} must divide a day ({DAY_S} s)")
        if not 1 <= min_days <= days:
            raise ValueError(f"min_days: {min_days} must be in [1, days={days}]")
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q: {q} must be in [0, 1]")
        self.slot_s, self.days, self.q, self.min_days = slot_s, days, q, min_days
        self._peaks: dict[ForecastKey, dict[int, dict[int, float]]] = {}

    def _at(self, t: float) -> tuple[int, int]:
        day = math.floor(t / DAY_S)
        return day, int((t - day * DAY_S) // self.slot_s)

    def observe(self, key: ForecastKey, at: float, value: float) -> None:
        day, slot = self._at(at)
        by_day = self._peaks.setdefault(key, {})
        slots = by_day.setdefault(day, {})
        if value > slots.get(slot, -math.inf):
            slots[slot] = value
        if len(by_day) > self.days + 2:  # keep what forecasts can still use
            for old in sorted(by_day)[: len(by_day) - self.days - 2]:
                del by_day[old]

    def observe_many(self, key: ForecastKey, rows: Iterable[tuple[float, float]]) -> None:
        for at, value in rows:
            self.observe(key, at, value)

    def known(self, key: ForecastKey) -> bool:
        return key in self._peaks

    def slot_forecast(self, key: ForecastKey, t: float) -> float | None:
        """The quantile of the peaks of ``t``'s slot over the previous days, or None."""
        by_day = self._peaks.get(key)
        if not by_day:
            return None
        day, slot = self._at(t)
        seen = [
            v for d in range(day - self.days, day) if (v := by_day.get(d, {}).get(slot)) is not None
        ]
        if len(seen) < self.min_days:
            return None
        return quantile(seen, self.q)

    def forecast(self, key: ForecastKey, start: float, end: float) -> float | None:
        """The predicted peak over ``[start, end)``: the largest slot forecast of the slots
        the window touches, or None when none of them has enough history."""
        if end < start:
            raise ValueError("forecast: end before start")
        best: float | None = None
        t = start
        while True:
            f = self.slot_forecast(key, t)
            if f is not None and (best is None or f > best):
                best = f
            nxt = (math.floor(t / self.slot_s) + 1) * self.slot_s
            if nxt >= end:
                return best
            t = nxt
