"""Synthetic demand traces (steps, ramps, diurnal cycles, noise) and a simulated-clock
driver that runs VMs with such demand against a real manager and the controller.

The driver is what the controller tests and ``slicefab bench adaptive`` share: at each
tick of the simulated clock it compares every VM's demand with what its slice holds (an
SLO violation when demand is above it), records the use that would be measured
(``min(demand, held)``: a guest cannot use memory it does not have, and a port's token
bucket lets no more than the slice's limit through) as a usage sample, then lets the
controller decide. A VM's demand is memory (bytes, reported as the guest would) or
bandwidth (Mbit/s on its crossbar port, recorded as the fabric counters would measure
it). Every change goes through the manager, ledger and crossbar included.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from firmware.adaptive.controller import AdaptiveController
from firmware.adaptive.forecast import DAY_S, SeasonalQuantile
from firmware.adaptive.policy import set_policy
from firmware.adaptive.usage import FABRIC, Decision, Resource, UsageSample
from firmware.manager import ResourceManager
from firmware.slices import SliceSpec

GiB = 1 << 30
#: the simulated clock starts at 2026-01-01 00:00 UTC (a midnight: day slots line up)
EPOCH = 1_767_225_600.0


def constant(n: int, level: float) -> list[float]:
    return [level] * n


def step(n: int, low: float, high: float, at: int) -> list[float]:
    """``low`` until index ``at``, ``high`` from there."""
    return [low if i < at else high for i in range(n)]


def ramp(n: int, start: float, end: float, begin: int, finish: int) -> list[float]:
    """``start`` until ``begin``, linear to ``end`` at ``finish``, then ``end``."""
    out = []
    for i in range(n):
        f = min(1.0, max(0.0, (i - begin) / max(1, finish - begin)))
        out.append(start + (end - start) * f)
    return out


def diurnal(
    days: int,
    step_s: int,
    *,
    base: float,
    peak: float,
    rise_h: float = 9.0,
    fall_h: float = 18.0,
    ramp_h: float = 0.5,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> list[float]:
    """A working-day cycle: ``base`` at night, a ramp of ``ramp_h`` hours up to ``peak``
    at ``rise_h``, down again at ``fall_h`` (hours of the day, UTC). ``jitter`` moves each
    day's peak by a uniform ±fraction (``rng`` required then)."""
    per_day = DAY_S // step_s
    out = []
    for _ in range(days):
        top = peak * (1 + (rng.uniform(-jitter, jitter) if jitter and rng else 0.0))
        for i in range(per_day):
            h = i * step_s / 3600
            up = min(1.0, max(0.0, (h - rise_h) / ramp_h))
            down = min(1.0, max(0.0, (h - fall_h) / ramp_h))
            out.append(base + (top - base) * (up - down))
    return out


def noisy(values: list[float], sigma: float, rng: random.Random) -> list[float]:
    """Multiplicative Gaussian noise (``sigma`` a fraction), never below 0."""
    return [max(0.0, v * (1 + rng.gauss(0.0, sigma))) for v in values]


# ---------------------------------------------------------------------- the driver


@dataclass
class SimVm:
    """One VM of a simulation: its demand per tick and its slice. ``resource`` says what
    the demand is: memory (``demand`` and ``initial`` in bytes) or bandwidth (Mbit/s; the
    slice gets one crossbar port with that QoS rate guaranteed and as its maximum, and
    one memory granule, since a slice must hold memory, cores or lanes)."""

    owner: str
    demand: list[float]
    initial: int  # bytes, or Mbit/s
    priority: int = 0
    policy: dict[str, Any] | None = None  # SET_ADAPTIVE's dict form; None: static
    slice_id: int = 0
    resource: Resource = Resource.MEMORY


@dataclass
class SimResult:
    """What a run measured. The ``*_gib_h`` integrals are in GiB·h for memory VMs and in
    Gbit/s·h (1,000 Mbit/s·h) for bandwidth VMs."""

    ticks: int = 0
    vm_ticks: int = 0  # measured (vm, tick) pairs
    violations: int = 0  # demand above the allocation
    shortfall_gib_h: float = 0.0  # ∫ (demand - held)+ dt
    over_gib_h: float = 0.0  # ∫ (held - demand)+ dt
    demand_gib_h: float = 0.0
    resizes: int = 0
    decisions: list[Decision] = field(default_factory=list)
    invariant_violations: list[str] = field(default_factory=list)
    held: dict[str, list[int]] = field(default_factory=dict)

    @property
    def violation_rate(self) -> float:
        return self.violations / self.vm_ticks if self.vm_ticks else 0.0

    @property
    def over_provisioning(self) -> float:
        """Average over-provisioning: held beyond demand, as a fraction of demand."""
        return self.over_gib_h / self.demand_gib_h if self.demand_gib_h else 0.0


def simulate(
    manager: ResourceManager,
    vms: list[SimVm],
    *,
    step_s: int,
    measure_from: int = 0,
    forecaster: SeasonalQuantile | None = None,
    lead_s: float | None = None,
    check_every: int = 0,
    on_tick: Callable[[int, float], None] | None = None,
) -> SimResult:
    """Allocate a slice per VM (``initial`` memory), set its policy, and run the ticks of
    the demand traces on the simulated clock. ``measure_from``: the first tick counted
    (the forecaster's training days before it run too). ``check_every``: run the
    manager's invariant checker every that many ticks (0: never) and collect what it
    reports."""
    kwargs: dict[str, Any] = {}
    if lead_s is not None:
        kwargs["lead_s"] = lead_s
    controller = AdaptiveController(manager, manager.usage, forecaster=forecaster, **kwargs)
    for vm in vms:
        if vm.resource is Resource.BANDWIDTH:
            spec = SliceSpec.from_dict(
                {"owner": vm.owner, "name": "sim", "ports": 1,
                 "memory": {"size": manager.device.granule_bytes},  # a slice needs one
                 "qos": {"priority": vm.priority, "guaranteed": vm.initial,
                         "maximum": vm.initial}}
            )  # fmt: skip
        else:
            spec = SliceSpec.from_dict(
                {"owner": vm.owner, "name": "sim", "memory": {"size": vm.initial}, "ports": 0,
                 "qos": {"priority": vm.priority}}
            )  # fmt: skip
        vm.slice_id = manager.allocate(spec)["id"]
        if vm.policy is not None:
            set_policy(manager, manager.usage, vm.slice_id, dict(vm.policy), caller=None)
    adaptive = any(vm.policy is not None for vm in vms)
    n = min(len(vm.demand) for vm in vms)
    g = manager.device.granule_bytes
    cap = manager.device.crossbar.port_mbps
    res = SimResult(held={vm.owner: [] for vm in vms})
    hours = step_s / 3600
    for i in range(n):
        now = EPOCH + i * step_s
        held = manager.read(
            lambda a: {
                sid: (s.alloc.granules * g, s.spec.qos.limit_mbps(cap))
                for sid, s in a.slices.items()
            }
        )
        samples = []
        for vm in vms:
            bandwidth = vm.resource is Resource.BANDWIDTH
            have, want = held[vm.slice_id][1 if bandwidth else 0], vm.demand[i]
            unit = 1000 if bandwidth else GiB
            res.held[vm.owner].append(have)
            if i >= measure_from:
                res.vm_ticks += 1
                res.violations += want > have
                res.shortfall_gib_h += max(0.0, want - have) / unit * hours
                res.over_gib_h += max(0.0, have - want) / unit * hours
                res.demand_gib_h += want / unit * hours
            if bandwidth:
                sample = UsageSample(vm.slice_id, vm.owner, "sim", now,
                                     port_mbps=min(want, have), source=FABRIC)  # fmt: skip
            else:
                used = int(min(want, have))
                sample = UsageSample(vm.slice_id, vm.owner, "sim", now, memory_used=used)
            samples.append(sample)
        manager.usage.record(samples)
        if adaptive:
            for d in controller.tick(now):
                if i >= measure_from:
                    res.decisions.append(d)
        if check_every and i % check_every == 0:
            res.invariant_violations += manager.check_invariants()
        if on_tick is not None:
            on_tick(i, now)
        res.ticks += 1
    res.resizes = sum(d.before != d.after for d in res.decisions)
    return res


def change_points(held: list[int]) -> list[int]:
    """The ticks at which a held allocation changed (how many resizes, and how far apart)."""
    return [i for i in range(1, len(held)) if held[i] != held[i - 1]]


def direction_flips(held: list[int]) -> int:
    """How often a held allocation turned from growing to shrinking or back: the measure
    of oscillation the controller tests bound."""
    deltas = [b - a for a, b in itertools.pairwise(held) if b != a]
    return sum((x > 0) != (y > 0) for x, y in itertools.pairwise(deltas))


def gib(x: float) -> int:
    """``x`` GiB in bytes, rounded down to a 2 MiB granule."""
    return int(x * GiB) // (2 << 20) * (2 << 20)
