"""Placement: which devices a composition is split across, and how much goes where.

The algorithm (docs/pool.md, "Placement") enumerates the sets of live devices a request
may use (at most ``max_devices`` of them, within ``max_latency_us`` of each other, each
with a free VM slot or already hosting the VM), splits the request over each set, and
keeps the split of least **cost**::

    cost = w_devices · affinity · (|S| − 1)                      pack: +1, spread: −1
         + w_latency · max latency between devices of S / 10 µs
         + Σ_{d∈S} share_d · (w_load · hot(load_d)² + w_contention · hot(tenants_d / slots_d))
         + w_frag · Σ_{d∈S} frag_d

where, *after* the placement, ``load_d`` is the largest used fraction of any of d's
resources, ``tenants_d`` the VMs on d, ``hot(u) = max(0, u − knee) / (1 − knee)`` with
``knee`` 0.9 (only a hot spot costs), ``share_d`` d's share of the request, and
``frag_d`` the capacity d strands: the imbalance between its free cores and free memory
fractions (free cores without memory, or memory without cores, is hard to sell), plus a
penalty for a small leftover that no typical request fits, plus one for NVMe groups left
on a device with no free core to drive them, plus a small best-fit pressure (0.02 × the
free fraction left, a tie-breaker: a tighter fit keeps other devices whole).

The split over a set: each NVMe group goes to the device of S with the fewest free groups
(keeps SSD-rich devices whole), a device that gets NVMe gets one core first when
``nvme_with_cores``; then cores and memory are filled best-fit (``pack``: the device with
least free first, so leftovers concentrate) or evenly (``spread``). A set where some
device would get nothing is skipped (the smaller set is enumerated on its own).

:func:`first_fit` is the baseline of ``slicefab bench placement``: devices in a fixed
order, each filled as far as it goes, under the same constraints.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from firmware.errors import AllocationError
from firmware.pool.model import (
    MEMORY_UNIT,
    CompositionRequest,
    DeviceRecord,
    Part,
    latency_us,
)

#: a leftover below these is stranded (no request of the bench mix's smallest size fits)
SMALL_CORES = 2
SMALL_MEMORY_UNITS = 4
#: weight of the best-fit pressure inside the fragmentation term
FIT = 0.02


@dataclass(frozen=True)
class Weights:
    devices: float = 1.0
    latency: float = 0.5
    load: float = 0.3
    contention: float = 0.2
    frag: float = 1.0
    #: load and tenancy below this fraction cost nothing: only hot spots are penalised
    #: (spreading by load from the first VM on strands capacity: docs/pool.md)
    load_knee: float = 0.9


DEFAULT_WEIGHTS = Weights()


class NoPlacement(AllocationError):
    """No set of live devices can hold the composition under its constraints."""

    code = "insufficient"


@dataclass(frozen=True)
class Placement:
    parts: tuple[Part, ...]
    cost: float
    terms: dict[str, float] = field(default_factory=dict)

    @property
    def devices(self) -> list[str]:
        return [p.device for p in self.parts]


def _fits_owner(d: DeviceRecord, owner: str) -> bool:
    return owner in d.owners or d.free.vm_slots > 0


def _nvme_ok(d: DeviceRecord, width: int) -> list[str]:
    return sorted(e for e, w in d.free.nvme.items() if w >= width)


def _max_latency(devs: Sequence[DeviceRecord]) -> float:
    return max((latency_us(a, b) for a, b in itertools.combinations(devs, 2)), default=0.0)


def _split(req: CompositionRequest, devs: Sequence[DeviceRecord]) -> list[Part] | None:
    """Split ``req`` over exactly ``devs`` (every one non-empty), or None."""
    n = len(devs)
    cores = [0] * n
    mem = [0] * n
    nvme: list[list[str]] = [[] for _ in range(n)]
    free_c = [d.free.cores for d in devs]
    free_m = [d.free.memory_units for d in devs]
    # NVMe groups: to the devices with the fewest qualifying free groups first
    avail = [_nvme_ok(d, req.nvme_width) for d in devs]
    need = req.nvme
    for i in sorted(range(n), key=lambda i: (len(avail[i]), i)):
        while need and avail[i] and (not req.nvme_with_cores or free_c[i] - cores[i] > 0):
            nvme[i].append(avail[i].pop(0))
            need -= 1
            if req.nvme_with_cores and cores[i] == 0:
                cores[i] = 1
    if need:
        return None
    if sum(cores) > req.cores:
        return None
    order = (
        sorted(range(n), key=lambda i: (free_c[i], i)) if req.affinity == "pack" else list(range(n))
    )

    def fill(amount: int, got: list[int], free: list[int]) -> bool:
        left = amount - sum(got)
        if req.affinity == "spread":
            while left > 0:
                room = [i for i in order if free[i] - got[i] > 0]
                if not room:
                    return False
                for i in room:
                    if left == 0:
                        break
                    got[i] += 1
                    left -= 1
            return True
        for i in order:
            take = min(left, free[i] - got[i])
            got[i] += take
            left -= take
        return left == 0

    if not fill(req.cores, cores, free_c):
        return None
    # memory goes first where the cores went (a VM's memory near its cores), then best-fit
    if req.affinity == "pack":
        order = sorted(range(n), key=lambda i: (cores[i] == 0, free_m[i], i))
    if not fill(req.memory_units, mem, free_m):
        return None
    parts = [
        Part(d.device, cores[i], mem[i] * MEMORY_UNIT, tuple(nvme[i]), d.incarnation)
        for i, d in enumerate(devs)
    ]
    if any(p.empty for p in parts):
        return None
    return parts


def cost(
    req: CompositionRequest,
    parts: Sequence[Part],
    devs: Sequence[DeviceRecord],
    w: Weights = DEFAULT_WEIGHTS,
) -> tuple[float, dict[str, float]]:
    """The cost of placing ``parts`` on ``devs`` (same order), and its terms."""
    affinity = 1.0 if req.affinity == "pack" else -1.0
    t_devices = w.devices * affinity * (len(parts) - 1)
    t_latency = w.latency * _max_latency(devs) / 10.0
    size = max(1, req.cores) + max(1, req.memory_units) + req.nvme
    t_load = t_cont = t_frag = 0.0
    for p, d in zip(parts, devs, strict=True):
        after = d.take(p, req.owner)
        tot, fr = d.total, after.free
        fc = fr.cores / tot.cores if tot.cores else 0.0
        fm = fr.memory_units / tot.memory_units if tot.memory_units else 0.0
        load = max(1.0 - fc, 1.0 - fm)
        share = (p.cores + p.memory // MEMORY_UNIT + len(p.nvme)) / size
        hot = max(0.0, load - w.load_knee) / (1.0 - w.load_knee) if w.load_knee < 1 else 0.0
        t_load += w.load * share * hot * hot
        tenants = len(after.owners)
        busy = tenants / max(1, tot.vm_slots)
        t_cont += w.contention * share * max(0.0, busy - w.load_knee) / (1.0 - w.load_knee)
        frag = abs(fc - fm)
        if 0 < fr.cores < SMALL_CORES:
            frag += 0.25
        if 0 < fr.memory_units < SMALL_MEMORY_UNITS:
            frag += 0.25
        if fr.nvme and fr.cores == 0:
            frag += 0.5
        frag += FIT * (fc + fm) / 2  # best fit: a tighter fit keeps other devices whole
        t_frag += w.frag * frag
    terms = {
        "devices": t_devices,
        "latency": t_latency,
        "load": t_load,
        "contention": t_cont,
        "fragmentation": t_frag,
    }
    return sum(terms.values()), terms


def _candidates(req: CompositionRequest, devices: Sequence[DeviceRecord]) -> list[DeviceRecord]:
    return [d for d in devices if _fits_owner(d, req.owner)]


def _shortage(req: CompositionRequest, devices: Sequence[DeviceRecord]) -> NoPlacement:
    """The clearest reason none fits: a resource the whole pool lacks, else the constraints."""
    live = _candidates(req, devices)
    have = {
        "cores": sum(d.free.cores for d in live),
        "memory": sum(d.free.memory for d in live),
        "nvme": sum(len(_nvme_ok(d, req.nvme_width)) for d in live),
    }
    want = {"cores": req.cores, "memory": req.memory, "nvme": req.nvme}
    for k in ("cores", "memory", "nvme"):
        if want[k] > have[k]:
            return NoPlacement(
                f"{k}: requested {want[k]}, only {have[k]} free on the {len(live)} live "
                f"device(s) with a free VM slot",
                resource=k,
                requested=want[k],
                available=have[k],
            )
    return NoPlacement(
        f"no set of at most {req.max_devices} device(s)"
        + (f" within {req.max_latency_us} µs" if req.max_latency_us is not None else "")
        + " holds the composition (the pool has the capacity, split too finely)",
        resource="placement",
        max_devices=req.max_devices,
        max_latency_us=req.max_latency_us,
    )


def place(
    req: CompositionRequest,
    devices: Sequence[DeviceRecord],
    weights: Weights = DEFAULT_WEIGHTS,
) -> Placement:
    """The least-cost placement of ``req`` on ``devices``. Raises NoPlacement."""
    cands = _candidates(req, devices)
    best: Placement | None = None
    for k in range(1, min(req.max_devices, len(cands)) + 1):
        for devs in itertools.combinations(cands, k):
            if req.max_latency_us is not None and _max_latency(devs) > req.max_latency_us:
                continue
            parts = _split(req, devs)
            if parts is None:
                continue
            c, terms = cost(req, parts, devs, weights)
            if best is None or c < best.cost:
                best = Placement(tuple(parts), c, terms)
    if best is None:
        raise _shortage(req, devices)
    return best


def first_fit(req: CompositionRequest, devices: Sequence[DeviceRecord]) -> Placement:
    """The baseline: devices in the given order, each filled as far as it goes, under the
    same constraints (max_devices, max_latency_us to the first device, NVMe with cores).
    Raises NoPlacement."""
    chosen: list[Part] = []
    used: list[DeviceRecord] = []
    cores, mem, nvme = req.cores, req.memory_units, req.nvme
    for d in _candidates(req, devices):
        if not (cores or mem or nvme) or len(chosen) == req.max_devices:
            break
        if req.max_latency_us is not None and any(
            latency_us(d, u) > req.max_latency_us for u in used
        ):
            continue
        fc, fm = d.free.cores, d.free.memory_units
        eps = _nvme_ok(d, req.nvme_width)
        give_n: list[str] = []
        c = min(cores, fc)
        if nvme and eps and (not req.nvme_with_cores or c > 0):
            give_n = eps[:nvme]
        m = min(mem, fm)
        part = Part(d.device, c, m * MEMORY_UNIT, tuple(give_n), d.incarnation)
        if part.empty:
            continue
        chosen.append(part)
        used.append(d)
        cores, mem, nvme = cores - c, mem - m, nvme - len(give_n)
    if cores or mem or nvme:
        raise _shortage(req, devices)
    total, terms = cost(req, chosen, used)
    return Placement(tuple(chosen), total, terms)
