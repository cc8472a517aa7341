"""The guest's memory use as QEMU sees it: a usage source for the adaptive controller.

Every VM the launcher composes has a virtio-balloon device (``sf-balloon``, never inflated)
whose guest driver reports statistics every :data:`~slicefab_qemu.config.BALLOON_POLL_S`
seconds, and the virtio-mem device its memory slices are plugged into (``sf-vmem``).
:func:`read_memory_stats` reads both over QMP (``qom-get``):

=============================  ================================================================
``sf-balloon`` ``guest-stats``  ``stat-total-memory`` (the guest's MemTotal),
                                ``stat-available-memory`` (MemAvailable; ``stat-free-memory``
                                when the guest gives none), ``last-update`` (host seconds;
                                0 before the first report). QEMU answers 2^64-1 for a
                                statistic the guest has not reported.
``sf-vmem`` ``size``            bytes of the region the guest has plugged
``sf-vmem`` ``requested-size``  what the firmware asked for: the sum of the VM's memory slices
=============================  ================================================================

:func:`slice_use` turns that into the memory each slice uses. The slices' memory is the
plugged part of the guest's RAM; the rest (boot RAM) is the guest's own. What the guest
uses beyond its own RAM is in its slices::

    used        = total - available
    slice use   = used - (total - plugged) = plugged - available,  within [0, plugged]

shared out over the VM's memory slices in proportion to what each holds (the guest does
not tell QEMU which of its pages came from which slice), and never above what a slice
holds. :class:`QemuUsage` is the :class:`firmware.adaptive.usage.UsageSource` the daemon's
controller asks every tick (``slicefab serve``); its samples have the source
``qemu-balloon``. Where the guest also reports its use (``REPORT_USAGE``), the guest's
report wins for that minute (docs/adaptive.md, "Usage sources").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from firmware.adaptive.usage import QEMU_BALLOON, SliceMemory, UsageSample
from slicefab_qemu.config import BALLOON_DEV, BALLOON_POLL_S, VMEM_DEV, peripheral_path
from slicefab_qemu.errors import VmError

log = logging.getLogger("slicefab.qemu")

#: QEMU's answer for a statistic the guest has not reported (virtio-balloon: -1 as u64)
UNSET = (1 << 64) - 1
#: statistics older than this (seconds) are stale: the guest's driver stopped reporting
STALE_S = 10 * BALLOON_POLL_S


class Qmp(Protocol):
    """What :func:`read_memory_stats` needs of a QMP connection (``QmpChannel``)."""

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any: ...


@dataclass(frozen=True)
class MemoryStats:
    """One VM's memory as QEMU reports it (bytes; None: not reported by the guest)."""

    total: int | None
    available: int | None
    last_update: float  # host time of the guest's last report; 0: none yet
    plugged: int  # virtio-mem size
    requested: int  # virtio-mem requested-size

    def fresh(self, now: float) -> bool:
        """Whether the guest has reported, within :data:`STALE_S` of ``now``."""
        return self.last_update > 0 and now - self.last_update <= STALE_S

    def slices_in_use(self) -> int | None:
        """Bytes of the plugged memory the guest uses (None: no usable statistics)."""
        if self.total is None or self.available is None:
            return None
        return max(0, min(self.plugged, self.plugged - self.available))


def _stat(stats: Mapping[str, Any], name: str) -> int | None:
    value = stats.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value in (UNSET, -1):
        return None
    return value


def parse_guest_stats(guest_stats: Mapping[str, Any], plugged: int, requested: int) -> MemoryStats:
    """The answers of the three ``qom-get``\\s as :class:`MemoryStats`.

    Raises VmError if ``guest-stats`` is not shaped as QEMU's ``guest-stats`` property
    (``{"stats": {...}, "last-update": seconds}``)."""
    stats = guest_stats.get("stats")
    last = guest_stats.get("last-update")
    if not isinstance(stats, Mapping) or not isinstance(last, int):
        raise VmError(f"{BALLOON_DEV} guest-stats: unexpected answer {dict(guest_stats)!r}")
    available = _stat(stats, "stat-available-memory")
    if available is None:
        available = _stat(stats, "stat-free-memory")
    return MemoryStats(_stat(stats, "stat-total-memory"), available, float(last), plugged,
                       requested)  # fmt: skip


def has_balloon(qmp: Qmp) -> bool:
    """Whether the VM has the launcher's balloon device (VMs booted by an older launcher
    have none: their guests report their use themselves)."""
    return any(c.get("name") == BALLOON_DEV for c in qmp.execute(
        "qom-list", {"path": "/machine/peripheral"}))  # fmt: skip


def read_memory_stats(qmp: Qmp) -> MemoryStats:
    """Read the balloon's guest statistics and virtio-mem's sizes over ``qmp``.

    Raises VmError (QmpFailure) if QEMU refuses or does not answer."""

    def get(dev: str, prop: str) -> Any:
        return qmp.execute("qom-get", {"path": peripheral_path(dev), "property": prop})

    guest_stats = get(BALLOON_DEV, "guest-stats")
    if not isinstance(guest_stats, Mapping):
        raise VmError(f"{BALLOON_DEV} guest-stats: unexpected answer {guest_stats!r}")
    return parse_guest_stats(
        guest_stats, int(get(VMEM_DEV, "size")), int(get(VMEM_DEV, "requested-size"))
    )


def slice_use(stats: MemoryStats, slices: Mapping[int, int]) -> dict[int, int]:
    """The memory each of a VM's slices uses (``slices``: slice id → bytes it holds),
    from the VM's statistics: :meth:`MemoryStats.slices_in_use` shared out in proportion
    to what each holds, at most what it holds. Empty when the statistics do not tell."""
    in_use = stats.slices_in_use()
    total = sum(slices.values())
    if in_use is None or total <= 0:
        return {}
    return {sid: min(held, in_use * held // total) for sid, held in slices.items()}


class StatsReader(Protocol):
    """What :class:`QemuUsage` reads the VMs through (``QemuVmm.memory_stats``)."""

    def memory_stats(self, vms: set[str]) -> dict[str, MemoryStats]: ...


class QemuUsage:
    """The QEMU backend's guests as a usage source (:class:`firmware.adaptive.usage.
    UsageSource`): one sample per memory slice of each running VM whose guest reported
    fresh balloon statistics."""

    name = QEMU_BALLOON

    def __init__(self, vmm: StatsReader) -> None:
        self.vmm = vmm

    def sample(self, now: float, slices: Mapping[int, SliceMemory]) -> list[UsageSample]:
        by_vm: dict[str, dict[int, int]] = {}
        for sid, s in slices.items():
            by_vm.setdefault(s.owner, {})[sid] = s.memory
        out: list[UsageSample] = []
        for vm, stats in self.vmm.memory_stats(set(by_vm)).items():
            if not stats.fresh(now):
                log.debug("VM %s: no fresh balloon statistics (last %s)", vm, stats.last_update)
                continue
            for sid, used in sorted(slice_use(stats, by_vm[vm]).items()):
                out.append(UsageSample(sid, vm, "", now, memory_used=used, source=QEMU_BALLOON))
        return out
