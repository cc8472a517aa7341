"""Slice table → crossbar register image → minimal write list (the Python reference).

The crossbar enforces the slices (register semantics: docs/abi/registers.md):

* **Permission table** — an input port held by VM *v* may send to every port *v* holds,
  and nowhere else; a port nobody holds may send nowhere (reset value 0).
* **WRR weight** — ``1 + 4 × (highest priority on the port) + ⌈64 × guaranteed / capacity⌉``,
  capped at 255: priority buys precedence, guaranteed bandwidth buys a share under
  contention proportional to what was admitted.
* **Token bucket** — a held port is limited to ``min(capacity, Σ max)`` where a slice with
  no maximum counts as the port's capacity; rate in bytes/cycle as unsigned 16.16,
  ``rate = round(Mbit/s × 2^16 / (8 × clock MHz))``; burst = the bytes of 1,024 cycles at
  that rate, at least two flits, at most the 24-bit field.
* **Key table** — the protection keys of the slices on the port.

All arithmetic is on integers so that the C fast path (``cffi_ext/src/xbar_image.c``,
reached through :mod:`firmware.fastpath`) gives bit-identical images; the differential
tests (``tests/test_fastpath_image.py``) hold the two to that. The write list is the
registers whose value differs, in address order; the driver ends it with ``CTRL.commit``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from abi import regmap as rm
from firmware.errors import FabricError
from firmware.inventory import Crossbar, Device
from firmware.slices import Slice

BURST_CYCLES = 1024
MAX_WEIGHT = (1 << rm.PORT_WEIGHT_WEIGHT_WIDTH) - 1
MAX_BURST = rm.PORT_TB_BURST_BURST_MASK >> rm.PORT_TB_BURST_BURST_LSB


@dataclass(frozen=True)
class PortConfig:
    """The shadow configuration of one input port (reset values by default)."""

    perm: int = rm.PORT_PERM_LO_RESET | rm.PORT_PERM_HI_RESET << 32
    weight: int = rm.PORT_WEIGHT_WEIGHT_RESET
    tb_rate: int = rm.PORT_TB_RATE_RATE_RESET
    tb_burst: int = rm.PORT_TB_BURST_BURST_RESET
    tb_enable: bool = False
    keys: int = rm.PORT_KEYS_RESET


def weight_for(priority: int, guaranteed_mbps: int, capacity_mbps: int) -> int:
    share = (guaranteed_mbps * 64 + capacity_mbps - 1) // capacity_mbps
    return min(MAX_WEIGHT, 1 + 4 * priority + share)


def rate_for(mbps: int, clock_mhz: int) -> int:
    """Mbit/s → bytes per cycle, unsigned 16.16, rounded to nearest, never 0: an enabled
    bucket with rate 0 would freeze its port in the middle of a packet (registers.md)."""
    den = 8 * clock_mhz
    return max(1, min(rm.PORT_TB_RATE_RATE_MASK, (mbps * (1 << 16) + den // 2) // den))


def burst_for(rate: int, data_bytes: int) -> int:
    return max(2 * data_bytes, min(MAX_BURST, (rate * BURST_CYCLES) >> 16))


@dataclass(frozen=True)
class PortDemand:
    """What the slices on one crossbar port ask of it: the whole input of the image.

    The allocator keeps these up to date incrementally (O(ports) per reconfiguration);
    :func:`demand_from_slices` recomputes them from the slice table (O(slices)) for checks.
    """

    owner: str | None = None
    priority: int = 0  # highest QoS priority among the port's slices
    guaranteed_mbps: int = 0  # sum of guaranteed bandwidth
    limit_mbps: int = 0  # sum of maximum bandwidth (a slice with none counts as capacity)
    keys: int = 0  # protection keys of the port's slices, as a bit mask


def demand_from_slices(device: Device, slices: Iterable[Slice]) -> list[PortDemand]:
    """Per-port demand recomputed from scratch from the live slices."""
    xb = device.crossbar
    n = xb.ports
    owner: list[str | None] = [None] * n
    prio = [0] * n
    guaranteed = [0] * n
    limit = [0] * n
    keys = [0] * n
    for s in slices:
        q = s.spec.qos
        for p in s.alloc.ports:
            owner[p] = s.owner
            prio[p] = max(prio[p], q.priority)
            guaranteed[p] += q.guaranteed_mbps
            limit[p] += q.limit_mbps(xb.port_mbps)
            keys[p] |= 1 << s.alloc.key
    return [PortDemand(owner[p], prio[p], guaranteed[p], limit[p], keys[p]) for p in range(n)]


def vm_port_masks(demand: Sequence[PortDemand]) -> dict[str, int]:
    """Each VM's ports as a bit mask: the permission mask of each of those ports."""
    masks: dict[str, int] = {}
    for p, d in enumerate(demand):
        if d.owner is not None:
            masks[d.owner] = masks.get(d.owner, 0) | 1 << p
    return masks


@functools.lru_cache(maxsize=4096)
def port_config(xb: Crossbar, d: PortDemand, perm: int) -> PortConfig:
    """The configuration of one input port (cached: few distinct ones exist at a time)."""
    if d.owner is None:
        return PortConfig()
    rate = rate_for(min(d.limit_mbps, xb.port_mbps), xb.clock_mhz)
    return PortConfig(
        perm=perm,
        weight=weight_for(d.priority, d.guaranteed_mbps, xb.port_mbps),
        tb_rate=rate,
        tb_burst=burst_for(rate, xb.data_bytes),
        tb_enable=True,
        keys=d.keys,
    )


def port_configs(device: Device, demand: Sequence[PortDemand]) -> list[PortConfig]:
    """The configuration of every input port implied by the per-port demand."""
    masks = vm_port_masks(demand)
    xb = device.crossbar
    return [port_config(xb, d, 0 if d.owner is None else masks[d.owner]) for d in demand]


@functools.lru_cache(maxsize=4096)
def port_register_values(cfg: PortConfig) -> tuple[tuple[int, int], ...]:
    """A port's shadow registers as ``(offset inside the port block, value)`` pairs.
    Cached: a device has few distinct port configurations at a time."""
    return (
        (rm.PORT_PERM_LO_OFFSET, cfg.perm & 0xFFFF_FFFF),
        (rm.PORT_PERM_HI_OFFSET, cfg.perm >> 32),
        (rm.PORT_WEIGHT_OFFSET, cfg.weight << rm.PORT_WEIGHT_WEIGHT_LSB),
        (rm.PORT_TB_RATE_OFFSET, cfg.tb_rate << rm.PORT_TB_RATE_RATE_LSB),
        (
            rm.PORT_TB_BURST_OFFSET,
            cfg.tb_burst << rm.PORT_TB_BURST_BURST_LSB
            | (rm.PORT_TB_BURST_ENABLE_MASK if cfg.tb_enable else 0),
        ),
        (rm.PORT_KEYS_OFFSET, cfg.keys << rm.PORT_KEYS_MASK_LSB),
    )


SHADOW_OFFSETS = tuple(off for off, _ in port_register_values(PortConfig()))


def register_image(configs: Iterable[PortConfig]) -> dict[int, int]:
    """Absolute address → value of every shadow register of every port."""
    image: dict[int, int] = {}
    for p, cfg in enumerate(configs):
        base = rm.port_reg(p, 0)
        for off, value in port_register_values(cfg):
            image[base + off] = value
    return image


def diff(current: Mapping[int, int], target: Mapping[int, int]) -> list[tuple[int, int]]:
    """The minimal write list from ``current`` to ``target``, in address order (no commit)."""
    return [(a, v) for a, v in sorted(target.items()) if current.get(a) != v]


def permission_of(image: Mapping[int, int], port: int) -> int:
    lo = image.get(rm.port_reg(port, rm.PORT_PERM_LO_OFFSET), 0)
    hi = image.get(rm.port_reg(port, rm.PORT_PERM_HI_OFFSET), 0)
    return lo | hi << 32


def check_demand(demand: Sequence[PortDemand], n_ports: int) -> None:
    """Raises :class:`FabricError` unless ``demand`` has one entry per crossbar port."""
    if len(demand) != n_ports:
        raise FabricError(
            f"demand for {len(demand)} ports, the crossbar has {n_ports}",
            field="demand",
            value=len(demand),
            expected=n_ports,
        )


class ImagePlanner:
    """Plans reconfigurations: the minimal write list from what the crossbar holds to what
    the demand implies (the Python reference; :class:`firmware.fastpath.CImagePlanner` is
    its C twin, which the driver uses unless ``SLICEFAB_FASTPATH=0``).

    It remembers each port's last applied configuration and re-encodes only the ports whose
    configuration changed, so a plan costs O(changed ports) register comparisons.

    Protocol (the driver's): :meth:`load` what the crossbar holds; :meth:`plan`; write the
    list and commit; :meth:`applied` once the crossbar has it (or :meth:`load` again after a
    failure).
    """

    def __init__(self, device: Device) -> None:
        self.device = device
        self._image: dict[int, int] = {}
        self._configs: Sequence[PortConfig | None] = [None] * device.crossbar.ports
        self._planned: tuple[list[PortConfig], list[tuple[int, int]]] | None = None

    def load(self, image: Mapping[int, int]) -> None:
        """What the crossbar holds now (registers missing from ``image`` are unknown, so
        the next plan writes them)."""
        self._image = dict(image)
        self._configs = [None] * self.device.crossbar.ports
        self._planned = None

    def plan(self, demand: Sequence[PortDemand]) -> list[tuple[int, int]]:
        """The registers whose value differs, in address order (no commit).

        Raises :class:`FabricError` if ``demand`` does not have one entry per port."""
        check_demand(demand, self.device.crossbar.ports)
        configs = port_configs(self.device, demand)
        writes: list[tuple[int, int]] = []
        for p, cfg in enumerate(configs):
            if cfg == self._configs[p]:
                continue
            base = rm.port_reg(p, 0)
            for off, value in port_register_values(cfg):
                if self._image.get(base + off) != value:
                    writes.append((base + off, value))
        writes.sort()
        self._planned = (configs, writes)
        return writes

    def applied(self) -> None:
        """The last plan's writes are on the crossbar: it now holds the planned image."""
        if self._planned is None:
            return
        configs, writes = self._planned
        self._image.update(writes)
        self._configs = configs
        self._planned = None

    def target(self, demand: Sequence[PortDemand]) -> dict[int, int]:
        """The full register image ``demand`` implies (address -> value)."""
        return register_image(port_configs(self.device, demand))
