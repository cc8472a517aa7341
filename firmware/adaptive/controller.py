"""The adaptive controller: grows and shrinks opted-in slices from their measured use.

One :meth:`AdaptiveController.tick` looks at every policy (:mod:`.policy`) and decides, per
slice and resource, in this order (docs/adaptive.md, "Controller"):

1. **bounds** — an allocation outside the policy's ``[minimum, maximum]`` is brought in;
2. **cooldown** — nothing else changes within ``cooldown`` seconds of the last change;
3. **up** — the last sample is at least ``UP_AT`` (85%) of the allocation: grow by enough
   ``step``\\s that it would be about ``TARGET`` (70%), at least one;
4. **release** — a pre-allocation whose time has passed without the demand it was made
   for (the peak use since never reached ``UP_AT`` of what was held before) is given back;
5. **reserve** (predictive policies) — the forecaster expects a peak within ``lead_s``
   that the allocation cannot hold at ``UP_AT``: grow to it now;
6. **down** — every sample of the last ``cooldown`` seconds is at most ``DOWN_AT`` (50%):
   shrink by whole steps while the peak stays at most ``TARGET`` of the new size (and
   not below the forecast, for predictive policies).

The band between 50% and 85%, a shrink that lands the peak at 70% (below the 85% that
would grow it back), and the cooldown are the hysteresis: a steady load never oscillates,
and one slice's resource changes at most once per cooldown (plus bounds corrections).

Changes go through :meth:`ResourceManager.resize`, the API's own live-resize path, so the
ledger and the crossbar stay consistent. Shrinks are applied before growths, growths in
priority order (QoS priority, highest first). When the device is short, a growth takes
capacity from adaptive slices of *lower* priority (each gives one step, never below its
minimum, lowest priority first): a **yield**. For bandwidth, "the device" is the slice's
crossbar ports: the headroom is the least any of them has left, and only slices on one of
the same ports can yield. Every decision is stored with its reason
(:meth:`UsageStore.decisions`) and shown by ``slicefab top``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from firmware.adaptive.forecast import DAY_S, ForecastKey, SeasonalQuantile
from firmware.adaptive.policy import DOWN_AT, TARGET, UP_AT, AdaptivePolicy
from firmware.adaptive.usage import (
    FABRIC,
    Action,
    Decision,
    Resource,
    SliceMemory,
    UsageSample,
    UsageSource,
    UsageStore,
)
from firmware.allocator import Allocator
from firmware.errors import InsufficientResources, SlicefabError
from firmware.slices import QoS, ResizeSpec, SliceState
from firmware.units import format_bandwidth, format_size

if TYPE_CHECKING:
    from firmware.manager import ResourceManager

log = logging.getLogger("slicefab.adaptive")

#: how far ahead a predictive policy reserves (seconds)
LEAD_S = 1800
#: a reservation not used within lead + this is released
RESERVATION_GRACE_S = 1800


@dataclass(frozen=True)
class SliceInfo:
    """What the controller needs of a slice, read under the manager's lock."""

    owner: str
    priority: int
    active: bool
    memory: int  # bytes held
    cores: int
    bandwidth: int = 0  # Mbit/s: the QoS maximum per port (the port's capacity if none)
    ports: tuple[int, ...] = ()

    def amount(self, r: Resource) -> int:
        if r is Resource.MEMORY:
            return self.memory
        return self.bandwidth if r is Resource.BANDWIDTH else self.cores


@dataclass
class Reservation:
    """Capacity grown ahead of a forecast peak: what was held before (``base``), when it
    was made, until when the demand may come, and the peak use seen since."""

    base: int
    start: float
    until: float
    predicted: float
    peak: float = 0.0


@dataclass
class _Plan:
    policy: AdaptivePolicy
    info: SliceInfo
    current: int
    target: int
    action: Action
    reason: str
    reservation: Reservation | None = None

    @property
    def grows(self) -> bool:
        return self.target > self.current


@dataclass
class ControllerStats:
    ticks: int = 0
    resizes: int = 0
    refused: int = 0
    by_action: dict[str, int] = field(default_factory=dict)


def _fmt(r: Resource, amount: float) -> str:
    """An amount in words: allocations exactly (``"6 GiB"``), measured use to 0.01 GiB."""
    if r is Resource.CORES:
        return f"{amount:.3g} cores"
    if r is Resource.BANDWIDTH:
        if amount == int(amount):
            return format_bandwidth(int(amount))
        return f"{amount / 1000:.2f} Gbit/s"
    if amount == int(amount) and int(amount) % (1 << 20) == 0:
        return format_size(int(amount))
    return f"{amount / (1 << 30):.2f} GiB"


def _snapshot(a: Allocator) -> dict[int, SliceInfo]:
    g = a.device.granule_bytes
    cap = a.device.crossbar.port_mbps
    return {
        sid: SliceInfo(
            s.owner,
            s.spec.qos.priority,
            s.state is SliceState.ACTIVE,
            s.alloc.granules * g,
            len(s.alloc.cores),
            s.spec.qos.limit_mbps(cap),
            tuple(s.alloc.ports),
        )
        for sid, s in a.slices.items()
    }


class AdaptiveController:
    """Reactive (and, for predictive policies, predictive) control of slice sizes.

    ``tick(now)`` takes the time from its caller, so tests and the benchmark run it on a
    simulated clock. Not thread-safe: one thread ticks it (the daemon's
    :class:`AdaptiveService`, or a test)."""

    def __init__(
        self,
        manager: ResourceManager,
        store: UsageStore,
        *,
        forecaster: SeasonalQuantile | None = None,
        lead_s: float = LEAD_S,
        grace_s: float = RESERVATION_GRACE_S,
        sources: Sequence[UsageSource] = (),
    ) -> None:
        self.manager = manager
        self.store = store
        #: measures of memory use besides the guests' reports (the QEMU backend's)
        self.sources = tuple(sources)
        self.forecaster = forecaster if forecaster is not None else SeasonalQuantile()
        self.lead_s = lead_s
        self.grace_s = grace_s
        self.stats = ControllerStats()
        self._last_change: dict[tuple[int, Resource], float] = {}
        self._reservations: dict[tuple[int, Resource], Reservation] = {}
        self._no_reserve_until: dict[tuple[int, Resource], float] = {}
        self._fed: dict[ForecastKey, float] = {}  # newest sample time fed per key
        self._port_prev: dict[int, tuple[float, int]] = {}

    # ---------------------------------------------------------------- measurement

    def _opted_in(self) -> dict[int, str]:
        """The slices with an adaptive policy, and their application class."""
        return {
            p.slice_id: p.app_class
            for p in (AdaptivePolicy.from_stored(d) for d in self.store.policies())
        }

    def sample_fabric(self, now: float) -> list[UsageSample]:
        """Store the traffic of each opted-in slice's crossbar ports since the previous
        call (flit counters, 32-bit, wrapping), as the Mbit/s of its busiest port: QoS
        limits apply per port, so that is what a bandwidth policy compares with the
        limit. The ports belong to the VM, so this is the VM's traffic on them (all of
        its slices on a port share that port's traffic)."""
        wanted = self._opted_in()
        ports = self.manager.read(
            lambda a: {
                sid: (s.owner, s.alloc.ports) for sid, s in a.slices.items() if sid in wanted
            }
        )
        flit_bits = self.manager.device.crossbar.data_bytes * 8
        samples = []
        for sid, (owner, held) in ports.items():
            rates = []
            for port in held:
                flits = self.manager.fabric.port_counters(port)["flits"]
                prev = self._port_prev.get(port)
                self._port_prev[port] = (now, flits)
                if prev is not None and now > prev[0]:
                    delta = (flits - prev[1]) % (1 << 32)
                    rates.append(delta * flit_bits / (now - prev[0]) / 1e6)
            if rates:
                samples.append(
                    UsageSample(sid, owner, wanted[sid], now, port_mbps=max(rates),
                                source=FABRIC)
                )  # fmt: skip
        self.store.record(samples)
        return samples

    def sample_sources(self, now: float) -> list[UsageSample]:
        """Ask every :attr:`sources` for the memory use of the opted-in slices, and store
        what they measured. A source that fails is logged and skipped for this tick:
        the guests' own reports still count."""
        if not self.sources:
            return []
        wanted = self._opted_in()
        if not wanted:
            return []
        g = self.manager.device.granule_bytes
        held = self.manager.read(
            lambda a: {
                sid: SliceMemory(s.owner, s.alloc.granules * g)
                for sid, s in a.slices.items()
                if s.alloc.granules and s.state is SliceState.ACTIVE
            }
        )
        samples: list[UsageSample] = []
        for source in self.sources:
            try:
                measured = source.sample(now, held)
            except Exception:  # one source's trouble must not stop control
                log.exception("usage source %s failed", source.name)
                continue
            samples += [
                replace(s, app_class=wanted[s.slice_id]) for s in measured if s.slice_id in wanted
            ]
        self.store.record(samples)
        return samples

    # ---------------------------------------------------------------- control

    def tick(self, now: float) -> list[Decision]:
        """Decide and apply, for every policy; returns the decisions (also stored)."""
        self.stats.ticks += 1
        infos = self.manager.read(_snapshot)
        plans: list[_Plan] = []
        policies: list[AdaptivePolicy] = []
        for d in self.store.policies():
            p = AdaptivePolicy.from_stored(d)
            info = infos.get(p.slice_id)
            if info is None:  # the slice was freed: its policy goes with it
                self.store.delete_policy(p.slice_id)
                self._forget(p.slice_id)
                continue
            policies.append(p)
            if info.active:
                plan = self._plan(p, info, now)
                if plan is not None:
                    plans.append(plan)
        decisions: list[Decision] = []
        shrinks = [pl for pl in plans if not pl.grows]
        grows = sorted(
            (pl for pl in plans if pl.grows), key=lambda pl: (-pl.info.priority, pl.policy.slice_id)
        )
        for pl in shrinks:
            decisions += self._apply(pl, now)
        for pl in grows:
            decisions += self._apply(pl, now, policies=policies)
        return decisions

    def reservations(self) -> dict[tuple[int, Resource], Reservation]:
        """The outstanding pre-allocations (a copy)."""
        return dict(self._reservations)

    def _forget(self, slice_id: int) -> None:
        for d in (self._last_change, self._reservations, self._no_reserve_until):
            for k in [k for k in d if k[0] == slice_id]:
                del d[k]

    def _forecast(self, p: AdaptivePolicy, owner: str, now: float) -> float | None:
        key = ForecastKey(owner, p.app_class, p.resource)
        fed = self._fed.get(key)
        since = now - (self.forecaster.days + 1) * DAY_S if fed is None else fed
        rows = self.store.history(owner, p.app_class, p.resource, since)
        self.forecaster.observe_many(key, rows)
        self._fed[key] = rows[-1][0] if rows else (now if fed is None else fed)
        return self.forecaster.forecast(key, now, now + self.lead_s)

    def _plan(self, p: AdaptivePolicy, info: SliceInfo, now: float) -> _Plan | None:
        key = (p.slice_id, p.resource)
        r = p.resource
        cur = info.amount(r)
        if cur < p.minimum:
            return _Plan(
                p,
                info,
                cur,
                p.minimum,
                Action.BOUNDS,
                f"{_fmt(r, cur)} is below the policy minimum {_fmt(r, p.minimum)}",
            )
        if cur > p.maximum:
            return _Plan(
                p,
                info,
                cur,
                p.maximum,
                Action.BOUNDS,
                f"{_fmt(r, cur)} is above the policy maximum {_fmt(r, p.maximum)}",
            )
        forecast = self._forecast(p, info.owner, now) if p.predictive else None
        window = self.store.window(p.slice_id, now - p.cooldown_s)
        values = [v for s in window if (v := s.value(r)) is not None]
        res = self._reservations.get(key)
        if res is not None:
            res.peak = max(
                [
                    res.peak,
                    *(v for s in window if s.at >= res.start if (v := s.value(r)) is not None),
                ]
            )
            if res.peak >= UP_AT * res.base:  # the demand came: ordinary allocation now
                del self._reservations[key]
                res = None
        if now - self._last_change.get(key, -math.inf) < p.cooldown_s:
            return None
        if values and values[-1] >= UP_AT * cur and cur < p.maximum:
            need = values[-1] / TARGET
            target = min(p.maximum, cur + p.step * max(1, math.ceil((need - cur) / p.step)))
            return _Plan(
                p,
                info,
                cur,
                target,
                Action.UP,
                f"use {_fmt(r, values[-1])} is {values[-1] / cur:.0%} of "
                f"{_fmt(r, cur)} (grow at {UP_AT:.0%})",
            )
        if res is not None and now >= res.until:
            del self._reservations[key]
            self._no_reserve_until[key] = now + self.lead_s
            target = max(p.minimum, min(res.base, cur))
            if target < cur:
                return _Plan(
                    p,
                    info,
                    cur,
                    target,
                    Action.RELEASE,
                    f"reserved for a forecast peak of {_fmt(r, res.predicted)}; use "
                    f"peaked at {_fmt(r, res.peak)}, within the "
                    f"{_fmt(r, res.base)} held before",
                )
            res = None
        floor = 0
        if forecast is not None:
            floor = self._on_grid(p, cur, forecast / UP_AT)
            if floor > cur and res is None and now >= self._no_reserve_until.get(key, -math.inf):
                reservation = Reservation(cur, now, now + self.lead_s + self.grace_s, forecast)
                return _Plan(
                    p,
                    info,
                    cur,
                    floor,
                    Action.RESERVE,
                    f"forecast peak {_fmt(r, forecast)} within {self.lead_s / 60:g} min "
                    f"(q{self.forecaster.q * 100:g} of the same time on past days)",
                    reservation,
                )
        covered = bool(window) and window[0].at <= now - p.cooldown_s + self.store.resolution_s
        if res is None and covered and values and max(values) <= DOWN_AT * cur:
            need = max(max(values) / TARGET, floor, p.minimum)
            steps = math.floor((cur - need) / p.step)
            target = max(p.minimum, cur - steps * p.step)
            if steps > 0 and target < cur:
                return _Plan(
                    p,
                    info,
                    cur,
                    target,
                    Action.DOWN,
                    f"use peaked at {_fmt(r, max(values))}, {max(values) / cur:.0%} "
                    f"of {_fmt(r, cur)}, over the last {p.cooldown_s} s "
                    f"(shrink at {DOWN_AT:.0%})",
                )
        return None

    @staticmethod
    def _on_grid(p: AdaptivePolicy, cur: int, amount: float) -> int:
        """The smallest ``cur ± k × step`` at or above ``amount``, within the bounds."""
        k = math.ceil((amount - cur) / p.step)
        return max(p.minimum, min(p.maximum, cur + k * p.step))

    def _resize(self, slice_id: int, r: Resource, target: int) -> None:
        if r is Resource.MEMORY:
            rs = ResizeSpec(memory=target)
        elif r is Resource.CORES:
            rs = ResizeSpec(cores=target)
        else:  # guaranteed = maximum: admitted against the ports' capacity (docs/adaptive.md)
            rs = ResizeSpec(qos=QoS(-1, target, target))
        self.manager.resize(slice_id, rs)

    def _record(self, pl: _Plan, now: float, action: Action, after: int, reason: str) -> Decision:
        self.stats.by_action[action.value] = self.stats.by_action.get(action.value, 0) + 1
        d = Decision(
            now,
            pl.policy.slice_id,
            pl.info.owner,
            pl.policy.resource,
            action,
            pl.current,
            after,
            reason,
        )
        return self.store.record_decision(d)

    def _apply(
        self, pl: _Plan, now: float, *, policies: list[AdaptivePolicy] | None = None
    ) -> list[Decision]:
        key = (pl.policy.slice_id, pl.policy.resource)
        out: list[Decision] = []
        try:
            try:
                self._resize(pl.policy.slice_id, pl.policy.resource, pl.target)
            except InsufficientResources as short:
                if not pl.grows or not policies:
                    raise
                out += self._make_room(pl, now, policies)
                try:
                    self._resize(pl.policy.slice_id, pl.policy.resource, pl.target)
                except InsufficientResources:
                    partial = self._partial(pl)
                    if partial is None:
                        raise short from None
                    pl = partial
                    self._resize(pl.policy.slice_id, pl.policy.resource, pl.target)
        except SlicefabError as e:
            self._last_change[key] = now  # retried after a cooldown, not at every tick
            self.stats.refused += 1
            out.append(
                self._record(
                    pl,
                    now,
                    Action.REFUSED,
                    pl.current,
                    f"{pl.action.value} to {_fmt(pl.policy.resource, pl.target)} "
                    f"refused: {e.message}",
                )
            )
            return out
        self._last_change[key] = now
        self.stats.resizes += 1
        if pl.reservation is not None:
            self._reservations[key] = pl.reservation
        out.append(self._record(pl, now, pl.action, pl.target, pl.reason))
        log.info("slice %d %s: %s", pl.policy.slice_id, pl.action.value, pl.reason)
        return out

    def _partial(self, pl: _Plan) -> _Plan | None:
        """``pl`` cut down to the whole steps still free on the device (None: not one):
        a growth the device cannot give in full is given in part."""
        r = pl.policy.resource
        free = self.manager.read(lambda a: _free(a, r, pl.policy.slice_id))
        target = min(pl.target, pl.current + pl.policy.step * (free // pl.policy.step))
        if target <= pl.current:
            return None
        reason = f"{pl.reason}; the device is short: {_fmt(r, pl.target)} wanted"
        return _Plan(pl.policy, pl.info, pl.current, target, pl.action, reason, pl.reservation)

    def _make_room(self, pl: _Plan, now: float, policies: list[AdaptivePolicy]) -> list[Decision]:
        """The device is short for ``pl``'s growth: adaptive slices of the same resource
        and *lower* priority give back whole steps, down to their minimum at most, lowest
        priority first (outstanding reservations first among equals), until what is free
        covers the growth or no donor is left."""
        r = pl.policy.resource
        infos = self.manager.read(_snapshot)
        short = (
            pl.target - pl.current - self.manager.read(lambda a: _free(a, r, pl.policy.slice_id))
        )
        donors = []
        for p in policies:
            info = infos.get(p.slice_id)
            if p.resource is not r or p.slice_id == pl.policy.slice_id or info is None:
                continue
            if r is Resource.BANDWIDTH and not set(info.ports) & set(pl.info.ports):
                continue  # bandwidth is short on the grower's ports only
            if info.active and info.priority < pl.info.priority and info.amount(r) > p.minimum:
                reserved = (p.slice_id, r) in self._reservations
                donors.append((info.priority, not reserved, p.slice_id, p, info))
        out: list[Decision] = []
        for _, _, sid, p, info in sorted(donors, key=lambda d: d[:3]):
            if short <= 0:
                break
            cur = info.amount(r)
            target = max(p.minimum, cur - p.step * math.ceil(short / p.step))
            try:
                self._resize(sid, r, target)
            except SlicefabError:
                continue
            short -= cur - target
            self._last_change[(sid, r)] = now
            self._reservations.pop((sid, r), None)
            self.stats.resizes += 1
            donor = _Plan(p, info, cur, target, Action.YIELD, "")
            reason = (
                f"yields {_fmt(r, cur - target)} to slice {pl.policy.slice_id} (priority "
                f"{pl.info.priority} > {info.priority}): the device is short"
            )
            out.append(self._record(donor, now, Action.YIELD, target, reason))
        return out


def _free(a: Allocator, r: Resource, slice_id: int) -> int:
    """What ``slice_id`` could grow by: free memory (bytes) or cores on the device, or,
    for bandwidth, how far its QoS limit can rise with its guaranteed rate admitted on
    every one of its ports (the least headroom among them, Mbit/s)."""
    if r is Resource.MEMORY:
        return a.memory.free_granules * a.device.granule_bytes
    if r is Resource.CORES:
        return sum(a.cores.free_count(c) for c in range(len(a.device.cluster_sizes)))
    s = a.slices[slice_id]
    cap = a.device.crossbar.port_mbps
    headroom = min((cap - a.ports[p].guaranteed_mbps for p in s.alloc.ports), default=0)
    # the slice's own guaranteed rate is already counted: growth to limit L needs
    # L - guaranteed more on each port, and L cannot exceed the port's capacity
    own = s.spec.qos.guaranteed_mbps
    return max(0, min(cap, own + headroom) - s.spec.qos.limit_mbps(cap))


class AdaptiveService:
    """The daemon's controller thread: every ``interval_s``, sample the fabric and tick.
    ``stop`` joins it. A failing tick is logged and the next one runs; a manager that
    failed (fail-stop) ends the loop."""

    def __init__(
        self,
        controller: AdaptiveController,
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.controller, self.interval_s, self.clock = controller, interval_s, clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adaptive", daemon=True)

    def start(self) -> AdaptiveService:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.controller.manager.failed is not None:
                return
            now = self.clock()
            try:
                self.controller.sample_fabric(now)
                self.controller.sample_sources(now)
                self.controller.tick(now)
            except Exception:  # keep controlling; the next tick starts from the table
                log.exception("adaptive controller tick failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


#: the longest ``serve --adaptive-interval`` (one hour)
MAX_INTERVAL_S = 3600.0


def interval_arg(text: str) -> float:
    """``serve --adaptive-interval``: seconds between controller ticks, 0 for off."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value == 0 or 0.1 <= value <= MAX_INTERVAL_S):
        raise argparse.ArgumentTypeError(
            f"{value} s is out of range: expected 0 (off) or 0.1-{MAX_INTERVAL_S:g} seconds"
        )
    return value
