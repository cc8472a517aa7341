"""The device inventory: what hardware the offload device has to carve into slices.

A device file is TOML (see ``firmware/data/default_device.toml``, the embedded default).
:func:`load_device` validates every field against the limits of the hardware model and of
the crossbar register map (``abi.regmap``) and raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from firmware.errors import ConfigError
from firmware.schema import Table, load_toml
from firmware.units import KiB, format_bandwidth, format_size, parse_bandwidth, parse_size

#: Limits of the hardware model. Crossbar and key limits come from the register map: the
#: permission mask is 64 bits wide and the key mask 16 bits (rtl/regmap/slicefab_xbar.rdl).
MAX_CLUSTERS = 64
MAX_CORES_PER_CLUSTER = 64
MAX_GRANULES = 1 << 24
MAX_PCIE_PORTS = 16
LINK_WIDTHS = (1, 2, 4, 8, 16)
MAX_XBAR_PORTS = 64
MAX_KEYS = 16


@dataclass(frozen=True)
class Endpoint:
    """A device wired behind a fixed lane group (e.g. an NVMe SSD on lanes 0-3 of port 0)."""

    name: str
    kind: str
    port: int
    first_lane: int  # global lane index
    width: int

    @property
    def lanes(self) -> range:
        return range(self.first_lane, self.first_lane + self.width)


@dataclass(frozen=True)
class Crossbar:
    ports: int
    port_mbps: int  # capacity of one port, Mbit/s
    data_width_bits: int
    clock_mhz: int

    @property
    def data_bytes(self) -> int:
        return self.data_width_bits // 8

    @property
    def raw_port_mbps(self) -> int:
        """Raw throughput of one port: one flit per cycle."""
        return self.data_width_bits * self.clock_mhz


@dataclass(frozen=True)
class Device:
    """A validated device inventory. Immutable: the firmware never changes its hardware."""

    name: str
    model: str
    cluster_sizes: tuple[int, ...]
    memory_bytes: int
    granule_bytes: int
    max_extents_per_slice: int
    port_lanes: tuple[int, ...]
    endpoints: tuple[Endpoint, ...]
    keys: int
    crossbar: Crossbar

    @property
    def cores(self) -> int:
        return sum(self.cluster_sizes)

    @property
    def granules(self) -> int:
        return self.memory_bytes // self.granule_bytes

    @property
    def lanes(self) -> int:
        return sum(self.port_lanes)

    def port_first_lane(self, port: int) -> int:
        return sum(self.port_lanes[:port])

    def endpoint(self, name: str) -> Endpoint | None:
        return next((e for e in self.endpoints if e.name == name), None)

    @property
    def endpoint_lanes(self) -> frozenset[int]:
        """Lanes wired to endpoints: only a request pinned to that endpoint may take them."""
        return frozenset(lane for e in self.endpoints for lane in e.lanes)

    def fingerprint(self) -> str:
        """A digest of the inventory, stored in the ledger: a ledger written for another
        device is refused at start instead of being replayed onto the wrong hardware."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """The inventory as a JSON-able dict with human units (``device show --json``)."""
        return {
            "name": self.name,
            "model": self.model,
            "cores": {"total": self.cores, "clusters": list(self.cluster_sizes)},
            "memory": {
                "size": format_size(self.memory_bytes),
                "bytes": self.memory_bytes,
                "granule": format_size(self.granule_bytes),
                "granules": self.granules,
                "max_extents_per_slice": self.max_extents_per_slice,
            },
            "pcie": {
                "lanes": self.lanes,
                "port_lanes": list(self.port_lanes),
                "endpoints": [asdict(e) for e in self.endpoints],
            },
            "keys": self.keys,
            "crossbar": {
                "ports": self.crossbar.ports,
                "port_bandwidth": format_bandwidth(self.crossbar.port_mbps),
                "port_mbps": self.crossbar.port_mbps,
                "data_width_bits": self.crossbar.data_width_bits,
                "clock_mhz": self.crossbar.clock_mhz,
            },
        }


def default_device_path() -> Path:
    """Path of the device file shipped inside the package."""
    return Path(str(resources.files("firmware") / "data" / "default_device.toml"))


def load_device(path: Path | str | None = None) -> Device:
    """Load and validate a device file (the shipped default when ``path`` is None).

    Raises:
        ConfigError: missing file, bad TOML, unknown key, or a field out of its limits;
            the message names the field, its value and the limit.
    """
    p = Path(path) if path is not None else default_device_path()
    try:
        return parse_device(load_toml(p, "device"))
    except ConfigError as e:
        if "file" in e.details:  # missing file / bad TOML: the message already names it
            raise
        raise ConfigError(f"{p}: {e.message}", **{**e.details, "file": str(p)}) from None


def parse_device(data: dict[str, Any]) -> Device:
    """Validate an already-parsed device document. Raises :class:`ConfigError`."""
    root = Table(data, "")

    dev = root.table("device")
    name, model = dev.text("name"), dev.text("model", "unspecified")
    dev.done()

    cores = root.table("cores")
    clusters = cores.integer("clusters", lo=1, hi=MAX_CLUSTERS)
    per_cluster = cores.integer("cores_per_cluster", lo=1, hi=MAX_CORES_PER_CLUSTER)
    cores.done()

    mem = root.table("memory")
    size = mem.quantity("size", parse_size)
    granule = mem.quantity("granule", parse_size)
    if granule < 4 * KiB or granule & (granule - 1):
        raise mem.error("granule", f"{granule} bytes is not a power of two >= 4 KiB", got=granule)
    if size <= 0 or size % granule:
        raise mem.error(
            "size", f"{size} bytes is not a positive multiple of the granule ({granule} bytes)"
        )
    if size // granule > MAX_GRANULES:
        raise mem.error(
            "size",
            f"{size // granule} granules exceeds the limit of {MAX_GRANULES}",
            limit=MAX_GRANULES,
        )
    max_extents = mem.integer("max_extents_per_slice", lo=1, hi=4096, default=64)
    mem.done()

    pcie = root.table("pcie")
    raw_ports = pcie.raw("port_lanes")
    if not isinstance(raw_ports, list) or not 1 <= len(raw_ports) <= MAX_PCIE_PORTS:
        raise pcie.error("port_lanes", f"expected a list of 1..{MAX_PCIE_PORTS} lane counts")
    for i, n in enumerate(raw_ports):
        if isinstance(n, bool) or not isinstance(n, int) or n not in LINK_WIDTHS:
            raise pcie.error(
                "port_lanes",
                f"port {i} has {n!r} lanes; a port has one of {LINK_WIDTHS} lanes",
                got=n,
                expected=list(LINK_WIDTHS),
            )
    port_lanes = tuple(int(n) for n in raw_ports)
    endpoints: list[Endpoint] = []
    taken: dict[int, str] = {}
    for ep in pcie.tables("endpoint"):
        ep_name = ep.text("name")
        kind = ep.text("kind", "nvme")
        port = ep.integer("port", lo=0, hi=len(port_lanes) - 1)
        width = ep.integer("width", lo=1, hi=port_lanes[port])
        if width not in LINK_WIDTHS:
            raise ep.error("width", f"x{width} is not a PCIe link width {LINK_WIDTHS}")
        offset = ep.integer("first_lane", lo=0, hi=port_lanes[port] - width)
        if offset % width:
            raise ep.error(
                "first_lane",
                f"an x{width} link must start at a multiple of {width} in its port",
                got=offset,
            )
        ep.done()
        if any(e.name == ep_name for e in endpoints):
            raise ep.error("name", f"duplicate endpoint name {ep_name!r}")
        first = sum(port_lanes[:port]) + offset
        for lane in range(first, first + width):
            if lane in taken:
                raise ep.error("first_lane", f"lane {lane} is already wired to {taken[lane]}")
            taken[lane] = ep_name
        endpoints.append(Endpoint(ep_name, kind, port, first, width))
    pcie.done()

    keys_t = root.table("keys")
    keys = keys_t.integer("count", lo=1, hi=MAX_KEYS)
    keys_t.done()

    xb = root.table("crossbar")
    ports = xb.integer("ports", lo=1, hi=MAX_XBAR_PORTS)
    port_mbps = xb.quantity("port_bandwidth", parse_bandwidth)
    width_bits = xb.integer("data_width_bits", lo=8, hi=1024)
    if width_bits & (width_bits - 1):
        raise xb.error("data_width_bits", f"{width_bits} is not a power of two")
    clock = xb.integer("clock_mhz", lo=1, hi=5000)
    xb.done()
    crossbar = Crossbar(ports, port_mbps, width_bits, clock)
    if not 0 < port_mbps <= crossbar.raw_port_mbps:
        raise ConfigError(
            f"crossbar.port_bandwidth: {format_bandwidth(port_mbps)} must be > 0 and at most "
            f"the raw port rate data_width_bits x clock_mhz = "
            f"{format_bandwidth(crossbar.raw_port_mbps)}",
            field="crossbar.port_bandwidth",
            limit=crossbar.raw_port_mbps,
        )
    root.done()
    return Device(
        name=name,
        model=model,
        cluster_sizes=(per_cluster,) * clusters,
        memory_bytes=size,
        granule_bytes=granule,
        max_extents_per_slice=max_extents,
        port_lanes=port_lanes,
        endpoints=tuple(endpoints),
        keys=keys,
        crossbar=crossbar,
    )
