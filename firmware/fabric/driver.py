"""The fabric driver: keeps the crossbar's registers equal to what the slice table implies.

``sync(slices)`` computes the target register image (:mod:`firmware.fabric.image`), writes
only the registers that differ from what the crossbar holds, then ``CTRL.commit`` and waits
until every port has adopted the new generation (ports adopt at packet boundaries, so
traffic in flight is never cut). The backend is anything with the register-bus interface:
the behavioural model (default), a cocotb simulation, or a QEMU-side backend.

At start the driver probes the crossbar (ID, version, capabilities) and reads back the
shadow registers, so that a restart after a crash re-programs exactly what differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from abi import regmap as rm
from firmware import failpoints, fastpath
from firmware.errors import FabricError
from firmware.fabric import image as img
from firmware.fabric.bus import RegisterBus
from firmware.inventory import Device
from firmware.slices import Slice

#: how many GEN polls (each advancing a simulated backend) before a commit is declared stuck
ADOPT_POLLS = 100_000


class FabricDriver:
    """Programs one crossbar through a :class:`RegisterBus`.

    Raises :class:`FabricError` when the crossbar does not identify itself, is smaller than
    the device inventory says, or does not adopt a commit.
    """

    def __init__(
        self,
        device: Device,
        bus: RegisterBus,
        *,
        backend: str = "custom",
        advance: Callable[[], None] | None = None,
    ) -> None:
        self.device = device
        self.bus = bus
        self.backend = backend
        self._advance = advance
        self.syncs = 0
        self.writes = 0
        self.last_writes = 0
        self._probe()
        self.generation = self._read_field(
            rm.GEN_OFFSET, rm.GEN_COMMITTED_MASK, rm.GEN_COMMITTED_LSB
        )
        self.image = self.read_image()
        # The first sync commits even when the shadow registers already hold its image: a
        # firmware killed between its shadow writes and CTRL.commit left them written but
        # not in service, and no register tells the shadow from the running configuration.
        self._recommit = True
        # plans the minimal write list: C fast path unless SLICEFAB_FASTPATH=0
        self._planner = fastpath.image_planner(device)
        self._planner.load(self.image)

    @classmethod
    def with_model(cls, device: Device, registers: Path | None = None) -> FabricDriver:
        """A driver on the behavioural crossbar model (the default backend): a fresh one at
        reset, or with ``registers``, one whose configuration registers live in that file
        and outlive the process (:mod:`firmware.fabric.regfile`, what ``slicefab serve``
        uses: the state directory's ``crossbar.regs``)."""
        from firmware.fabric.model import CrossbarModel
        from firmware.fabric.regfile import PersistentCrossbar

        xb = device.crossbar
        model = (
            CrossbarModel(n_ports=xb.ports, n_keys=device.keys, data_bytes=xb.data_bytes)
            if registers is None
            else PersistentCrossbar(registers, xb.ports, device.keys, xb.data_bytes)
        )
        return cls(device, model, backend="model", advance=lambda: model.step(1))

    def _read_field(self, offset: int, mask: int, lsb: int) -> int:
        return (self.bus.read(offset) & mask) >> lsb

    def _probe(self) -> None:
        ident = self.bus.read(rm.ID_OFFSET)
        if ident != rm.ID_VALUE:
            raise FabricError(
                f"crossbar ID register reads 0x{ident:08X}, expected 0x{rm.ID_VALUE:08X}"
            )
        major = self._read_field(rm.VERSION_OFFSET, rm.VERSION_MAJOR_MASK, rm.VERSION_MAJOR_LSB)
        if major != rm.VERSION_MAJOR_VALUE:
            raise FabricError(
                f"crossbar register map version {major}.x, this driver speaks "
                f"{rm.VERSION_MAJOR_VALUE}.x"
            )
        caps = self.bus.read(rm.CAPS_OFFSET)
        n_ports = (caps & rm.CAPS_N_PORTS_MASK) >> rm.CAPS_N_PORTS_LSB
        n_keys = (caps & rm.CAPS_N_KEYS_MASK) >> rm.CAPS_N_KEYS_LSB
        data_bytes = (caps & rm.CAPS_DATA_BYTES_MASK) >> rm.CAPS_DATA_BYTES_LSB
        xb = self.device.crossbar
        for what, have, need in (("ports", n_ports, xb.ports), ("keys", n_keys, self.device.keys)):
            if have < need:
                raise FabricError(
                    f"crossbar has {have} {what}, the device inventory needs {need}",
                    have=have,
                    need=need,
                )
        if data_bytes != xb.data_bytes:
            raise FabricError(
                f"crossbar flit is {data_bytes} bytes, the inventory says "
                f"{xb.data_bytes} (data_width_bits {xb.data_width_bits})"
            )

    def read_image(self) -> dict[int, int]:
        """Read back every shadow register of every port the device uses."""
        return {
            rm.port_reg(p, off): self.bus.read(rm.port_reg(p, off))
            for p in range(self.device.crossbar.ports)
            for off in img.SHADOW_OFFSETS
        }

    def target(self, demand: Sequence[img.PortDemand]) -> dict[int, int]:
        return img.register_image(img.port_configs(self.device, demand))

    def sync(self, demand: Sequence[img.PortDemand]) -> int:
        """Program the image implied by the per-port ``demand``; returns the number of
        register writes (0 when nothing changed: no commit is issued then, except at the
        first sync, which always commits: see ``__init__``).

        The planner (:mod:`firmware.fastpath`) compares the new image with the one the
        crossbar holds and returns only the registers that differ, in address order."""
        writes = self._planner.plan(demand)
        if writes or self._recommit:
            # A commit alone (nothing differs) puts into service what the shadow holds:
            # a crash before or after it leaves what a crash before the sync would, so it
            # is not bracketed by the failpoints.
            bracket = failpoints.armed and bool(writes)
            try:
                if bracket:
                    failpoints.hit("fabric.before_writes", FabricError)
                for addr, value in writes:
                    self.bus.write(addr, value)
                if bracket:
                    failpoints.hit("fabric.after_writes", FabricError)
                self.bus.write(rm.CTRL_OFFSET, rm.CTRL_COMMIT_MASK)
                self.generation = (self.generation + 1) & rm.GEN_COMMITTED_MASK
                if bracket:
                    failpoints.hit("fabric.after_commit", FabricError)
                self._wait_adopted()
            except BaseException:
                self._forget_programmed()
                raise
            self.image.update(writes)
            self.syncs += 1
            self.writes += len(writes) + 1
            self.last_writes = len(writes) + 1
            self._recommit = False
        else:
            self.last_writes = 0
        self._planner.applied()
        return self.last_writes

    def _forget_programmed(self) -> None:
        """After a failed sync the crossbar's shadow registers hold an unknown mix of old
        and new values, which the next commit would put into service: forget what we
        believe was programmed and read the registers back, so the next sync compares
        against what the crossbar really holds and overwrites every stale value. The next
        sync also commits when nothing differs: the shadow may already hold the image
        that was never put into service."""
        self._recommit = True
        try:
            self.image = self.read_image()
            gen = self.bus.read(rm.GEN_OFFSET)
            self.generation = (gen & rm.GEN_COMMITTED_MASK) >> rm.GEN_COMMITTED_LSB
        except Exception:
            self.image = {}  # unreadable: the next sync writes every register
        self._planner.load(self.image)

    def _wait_adopted(self) -> None:
        for _ in range(ADOPT_POLLS):
            gen = self.bus.read(rm.GEN_OFFSET)
            committed = (gen & rm.GEN_COMMITTED_MASK) >> rm.GEN_COMMITTED_LSB
            adopted = (gen & rm.GEN_ADOPTED_MASK) >> rm.GEN_ADOPTED_LSB
            if committed != self.generation:
                raise FabricError(
                    f"crossbar reports generation {committed} after commit, "
                    f"expected {self.generation}"
                )
            if adopted == committed:
                return
            if self._advance is not None:
                self._advance()
        raise FabricError(
            f"crossbar ports did not adopt generation {self.generation} within {ADOPT_POLLS} polls"
        )

    def port_counters(self, port: int) -> dict[str, int]:
        """The traffic counters of input ``port``, read from the crossbar (32-bit, wrapping)."""
        return {
            name: self.bus.read(rm.port_reg(port, offset))
            for name, offset in (
                ("packets", rm.PORT_CNT_PKTS_OFFSET),
                ("flits", rm.PORT_CNT_FLITS_OFFSET),
                ("drops", rm.PORT_CNT_DROPS_OFFSET),
                ("stalls", rm.PORT_CNT_STALLS_OFFSET),
            )
        }

    def permission_table(self) -> list[int]:
        return [img.permission_of(self.image, p) for p in range(self.device.crossbar.ports)]

    def describe(self) -> dict[str, Any]:
        """The programmed configuration, for ``slicefab fabric show`` and the demo."""
        cfg = [
            {off: self.image[rm.port_reg(p, off)] for off in img.SHADOW_OFFSETS}
            for p in range(self.device.crossbar.ports)
        ]
        return {
            "backend": self.backend,
            "ports": self.device.crossbar.ports,
            "generation": self.generation,
            "syncs": self.syncs,
            "register_writes": self.writes,
            "last_writes": self.last_writes,
            "permission": self.permission_table(),
            "weight": [c[rm.PORT_WEIGHT_OFFSET] for c in cfg],
            "keys": [c[rm.PORT_KEYS_OFFSET] for c in cfg],
            "tb_rate": [c[rm.PORT_TB_RATE_OFFSET] for c in cfg],
        }

    def check(self, slices: Iterable[Slice]) -> list[str]:
        """Read the crossbar back and check it against the slice table: the registers
        equal the image the slices imply, and (derived independently of the image code)
        every input port reaches only ports held by the same VM."""
        live = list(slices)
        bad: list[str] = []
        hw = self.read_image()
        want = self.target(img.demand_from_slices(self.device, live))
        for addr in sorted(a for a in want if hw.get(a) != want[a]):
            bad.append(
                f"register 0x{addr:04X} holds 0x{hw.get(addr, 0):08X}, the slices imply "
                f"0x{want[addr]:08X}"
            )
        holder: dict[int, str] = {}
        for s in live:
            for p in s.alloc.ports:
                holder[p] = s.owner
        for p in range(self.device.crossbar.ports):
            mask = img.permission_of(hw, p)
            for o in range(self.device.crossbar.ports):
                if mask >> o & 1 and (p not in holder or holder.get(o) != holder[p]):
                    bad.append(
                        f"isolation: port {p} ({holder.get(p, 'free')}) may reach port {o} "
                        f"({holder.get(o, 'free')})"
                    )
        return bad
