"""The pool's records: what a VM asks the pool for, what a device offers, what it got.

A **composition request** (a file, ``slicefab pool compose`` flags, or a dict)::

    owner = "vm-a"            # the VM the composition is for
    cores = 8                 # may be split across devices
    memory = "32 GiB"         # a multiple of 1 GiB (the pool's memory unit); may be split
    nvme = 1                  # NVMe lane groups: each is one whole SSD endpoint of a device
    nvme_width = 4            # ... at least this wide (x1/x2/x4/x8/x16)
    max_devices = 3           # at most this many devices (1 = all on one device)
    max_latency_us = 5        # any two devices of the composition at most this far apart
    affinity = "pack"         # "pack": as few devices as possible; "spread": as many
    nvme_with_cores = true    # a device that gets an NVMe group also gets some of the cores

A **device record** (``/slicefab/pool/devices/<id>`` in etcd, under the device's lease) is
the device's inventory and its free capacity as the pool accounts it; a reservation
rewrites it in the same transaction as the composition, so the record is the capacity
ledger of the pool and its ``mod_revision`` the revision the composer compares on.

A **part** is what one device holds of a composition; the device programs it as one slice
(cores + memory + its first NVMe group) plus one slice for each further NVMe group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from firmware.errors import RequestError
from firmware.inventory import Device
from firmware.schema import Table
from firmware.slices import OWNER_RE
from firmware.units import GiB, format_size, parse_size

#: the pool splits memory in these units (a multiple of every device's granule)
MEMORY_UNIT = GiB
MAX_DEVICES_PER_COMPOSITION = 8
AFFINITIES = ("pack", "spread")
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ZONE_RE = DEVICE_ID_RE

#: the latency model between two devices of a pool (docs/pool.md, "Latency"): devices in
#: one zone (behind one CXL switch) and devices in different zones (across the host)
SAME_DEVICE_US = 0.0
SAME_ZONE_US = 2.0
CROSS_ZONE_US = 8.0

# etcd key layout, under one prefix
PREFIX = "/slicefab/pool/"
DEVICES = PREFIX + "devices/"
COMPOSITIONS = PREFIX + "compositions/"
RESERVATIONS = PREFIX + "reservations/"
PARTS = PREFIX + "parts/"


def device_key(device: str) -> str:
    return DEVICES + device


def composition_key(cid: str) -> str:
    return COMPOSITIONS + cid


def reservation_key(device: str, cid: str) -> str:
    return f"{RESERVATIONS}{device}/{cid}"


def part_key(cid: str, device: str) -> str:
    return f"{PARTS}{cid}/{device}"


def check_device_id(device: str, field_name: str = "device_id") -> str:
    if not isinstance(device, str) or not DEVICE_ID_RE.fullmatch(device):
        raise RequestError(
            field_name,
            f"{device!r} is not a device id",
            expected="1-64 of A-Z a-z 0-9 _ . -, not starting with a symbol",
        )
    return device


@dataclass(frozen=True)
class CompositionRequest:
    owner: str
    cores: int = 0
    memory: int = 0  # bytes, a multiple of MEMORY_UNIT
    nvme: int = 0
    nvme_width: int = 4
    max_devices: int = 3
    max_latency_us: float | None = None
    affinity: str = "pack"
    nvme_with_cores: bool = True

    @property
    def memory_units(self) -> int:
        return self.memory // MEMORY_UNIT

    @classmethod
    def from_dict(cls, data: object) -> CompositionRequest:
        """Validate a request; RequestError names the field, the limit and what was expected."""
        t = Table(data, "", request=True)
        owner = t.text("owner")
        if not OWNER_RE.fullmatch(owner):
            raise t.error("owner", f"{owner!r} is not a VM id (1-64 of A-Z a-z 0-9 _ . -)")
        cores = t.integer("cores", lo=0, hi=4096, default=0)
        memory = t.quantity("memory", parse_size, default=0)
        if memory < 0 or memory % MEMORY_UNIT:
            raise t.error(
                "memory",
                f"{memory} bytes is not a non-negative multiple of the pool's "
                f"{format_size(MEMORY_UNIT)} unit",
                limit=MEMORY_UNIT,
            )
        nvme = t.integer("nvme", lo=0, hi=64, default=0)
        nvme_width = t.integer("nvme_width", lo=1, hi=16, default=4)
        if nvme_width not in (1, 2, 4, 8, 16):
            raise t.error(
                "nvme_width", f"x{nvme_width} is not a PCIe link width", expected=[1, 2, 4, 8, 16]
            )
        max_devices = t.integer("max_devices", lo=1, hi=MAX_DEVICES_PER_COMPOSITION, default=3)
        max_latency: float | None = None
        if t.has("max_latency_us") and t.raw("max_latency_us") is not None:
            raw = t.raw("max_latency_us")
            if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
                raise t.error("max_latency_us", f"expected a number >= 0 (µs), got {raw!r}")
            max_latency = float(raw)
        affinity = t.text("affinity", "pack")
        if affinity not in AFFINITIES:
            raise t.error("affinity", f"{affinity!r} is not an affinity", expected=AFFINITIES)
        nvme_with_cores = t.flag("nvme_with_cores", True)
        t.done()
        if cores == 0 and memory == 0 and nvme == 0:
            raise RequestError("", "a composition must ask for at least one of cores, memory, nvme")
        if nvme and nvme_with_cores and cores < 1:
            raise t.error(
                "nvme_with_cores",
                "an NVMe group placed with cores needs cores >= 1 (or nvme_with_cores = false)",
            )
        return cls(
            owner, cores, memory, nvme, nvme_width, max_devices, max_latency, affinity,
            nvme_with_cores,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "cores": self.cores,
            "memory": self.memory,
            "nvme": self.nvme,
            "nvme_width": self.nvme_width,
            "max_devices": self.max_devices,
            "max_latency_us": self.max_latency_us,
            "affinity": self.affinity,
            "nvme_with_cores": self.nvme_with_cores,
        }


@dataclass(frozen=True)
class Capacity:
    """Pooled resources of one device: cores, memory (bytes), NVMe endpoints (name → width),
    and VM slots (protection keys: one per VM on the device, docs/architecture.md)."""

    cores: int
    memory: int
    nvme: dict[str, int] = field(default_factory=dict)
    vm_slots: int = 0

    @property
    def memory_units(self) -> int:
        return self.memory // MEMORY_UNIT

    @classmethod
    def of_device(cls, dev: Device) -> Capacity:
        return cls(
            cores=dev.cores,
            memory=(dev.memory_bytes // MEMORY_UNIT) * MEMORY_UNIT,
            nvme={e.name: e.width for e in dev.endpoints if e.kind == "nvme"},
            vm_slots=min(dev.keys, dev.crossbar.ports),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "cores": self.cores,
            "memory": self.memory,
            "nvme": dict(sorted(self.nvme.items())),
            "vm_slots": self.vm_slots,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Capacity:
        return cls(int(d["cores"]), int(d["memory"]), dict(d["nvme"]), int(d["vm_slots"]))


@dataclass(frozen=True)
class Part:
    """What one device holds of a composition."""

    device: str
    cores: int = 0
    memory: int = 0
    nvme: tuple[str, ...] = ()
    incarnation: str = ""  # the device incarnation the reservation was made with

    @property
    def empty(self) -> bool:
        return self.cores == 0 and self.memory == 0 and not self.nvme

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "cores": self.cores,
            "memory": self.memory,
            "nvme": list(self.nvme),
            "incarnation": self.incarnation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Part:
        return cls(
            d["device"], int(d["cores"]), int(d["memory"]), tuple(d["nvme"]), d["incarnation"]
        )

    def slice_specs(
        self, owner: str, cid: str, nvme_widths: dict[str, int]
    ) -> list[dict[str, Any]]:
        """The slices the device programs for this part (SliceSpec dicts)."""
        specs: list[dict[str, Any]] = []
        first: dict[str, Any] = {"owner": owner, "name": slice_name(cid, 0)}
        if self.cores:
            first["cores"] = {"count": self.cores}
        if self.memory:
            first["memory"] = {"size": self.memory}
        nvme = list(self.nvme)
        if nvme and (self.cores or self.memory):
            ep = nvme.pop(0)
            first["lanes"] = {"width": nvme_widths[ep], "endpoint": ep}
        if len(first) > 2:
            specs.append(first)
        for ep in nvme:
            specs.append(
                {
                    "owner": owner,
                    "name": slice_name(cid, len(specs)),
                    "lanes": {"width": nvme_widths[ep], "endpoint": ep},
                }
            )
        return specs


def slice_name(cid: str, index: int) -> str:
    """The local slice name of a part's ``index``-th slice: how a device finds them again."""
    return f"pool:{cid}:{index}"


def composition_of(slice_name_: str) -> str | None:
    """The composition id a local slice belongs to, or None for a device-local slice."""
    if not slice_name_.startswith("pool:"):
        return None
    return slice_name_.split(":")[1]


@dataclass(frozen=True)
class DeviceRecord:
    """A device as the pool sees it (the value of its key under ``devices/``)."""

    device: str
    incarnation: str
    zone: str
    total: Capacity
    free: Capacity
    owners: dict[str, int] = field(default_factory=dict)  # VM → parts it has here
    name: str = ""
    admin_socket: str = ""
    #: ``slicefab pool drain``: no new reservation lands here; its parts are moving off
    draining: bool = False
    # etcd's bookkeeping for the key (not part of the value)
    mod_revision: int = 0
    lease: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "incarnation": self.incarnation,
            "zone": self.zone,
            "total": self.total.to_dict(),
            "free": self.free.to_dict(),
            "owners": dict(sorted(self.owners.items())),
            "name": self.name,
            "admin_socket": self.admin_socket,
            "draining": self.draining,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], mod_revision: int = 0, lease: int = 0) -> DeviceRecord:
        return cls(
            d["device"],
            d["incarnation"],
            d["zone"],
            Capacity.from_dict(d["total"]),
            Capacity.from_dict(d["free"]),
            {k: int(v) for k, v in d["owners"].items()},
            d.get("name", ""),
            d.get("admin_socket", ""),
            bool(d.get("draining", False)),
            mod_revision,
            lease,
        )

    def take(self, part: Part, owner: str) -> DeviceRecord:
        """The record after reserving ``part`` for ``owner``. Raises ValueError if it does
        not fit (the placement already checked; this is the last line of defence)."""
        f = self.free
        new_owner = owner not in self.owners
        missing = [e for e in part.nvme if e not in f.nvme]
        if (
            part.cores > f.cores
            or part.memory > f.memory
            or missing
            or (new_owner and f.vm_slots < 1)
        ):
            raise ValueError(f"part {part} does not fit in {self.device}'s free {f}")
        free = Capacity(
            f.cores - part.cores,
            f.memory - part.memory,
            {k: w for k, w in f.nvme.items() if k not in part.nvme},
            f.vm_slots - (1 if new_owner else 0),
        )
        owners = dict(self.owners)
        owners[owner] = owners.get(owner, 0) + 1
        return replace(self, free=free, owners=owners)

    def give_back(self, part: Part, owner: str) -> DeviceRecord:
        """The record after releasing ``part`` of ``owner`` (the inverse of :meth:`take`)."""
        f = self.free
        owners = dict(self.owners)
        left = owners.get(owner, 0) - 1
        gone = left <= 0 and owner in owners
        if left > 0:
            owners[owner] = left
        else:
            owners.pop(owner, None)
        nvme = dict(f.nvme)
        nvme.update({e: self.total.nvme[e] for e in part.nvme if e in self.total.nvme})
        free = Capacity(
            min(self.total.cores, f.cores + part.cores),
            min(self.total.memory, f.memory + part.memory),
            nvme,
            min(self.total.vm_slots, f.vm_slots + (1 if gone else 0)),
        )
        return replace(self, free=free, owners=owners)


def latency_us(a: DeviceRecord, b: DeviceRecord) -> float:
    """The latency model between two devices (docs/pool.md)."""
    if a.device == b.device:
        return SAME_DEVICE_US
    return SAME_ZONE_US if a.zone == b.zone else CROSS_ZONE_US
