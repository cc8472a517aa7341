"""Register-bus backend over the AXI4-Lite port of a running cocotb simulation.

The fabric driver is blocking code; a cocotb simulation runs coroutines. A cocotb test runs
the firmware (a :class:`~firmware.manager.ResourceManager` with a
:class:`~firmware.fabric.driver.FabricDriver` on this bus) inside ``cocotb.task.bridge``, which
gives it a thread; every :meth:`CocotbRegisterBus.read`/:meth:`~CocotbRegisterBus.write`
then blocks that thread on ``cocotb.task.resume`` while the AXI4-Lite transaction runs in
simulated time, traffic flowing meanwhile. So the same driver that programs the behavioural
model programs the Verilog crossbar (docs/DESIGN "The data flow", backend ``cocotb``).

Only usable inside a cocotb simulation, from a thread started by ``cocotb.task.bridge``.
"""

from __future__ import annotations

from typing import Any, Final

from cocotb.task import resume

from abi import regmap as rm
from firmware.errors import FabricError

_WORD: Final = rm.REGISTER_WIDTH // 8
_MASK: Final = (1 << rm.REGISTER_WIDTH) - 1
_OKAY: Final = 0


class CocotbRegisterBus:
    """A :class:`~firmware.fabric.bus.RegisterBus` whose accesses are transactions of a
    cocotbext-axi ``AxiLiteMaster`` (``master``). Counts its accesses in ``reads``/``writes``."""

    def __init__(self, master: Any) -> None:
        self._master = master
        self.reads = 0
        self.writes = 0
        self._read = resume(self._read_async)
        self._write = resume(self._write_async)

    def read(self, addr: int) -> int:
        """Raises FabricError for a misaligned or out-of-map address, or an SLVERR/DECERR."""
        self._check_addr(addr, "read")
        self.reads += 1
        return self._read(addr)

    def write(self, addr: int, value: int) -> None:
        """Raises FabricError for a misaligned or out-of-map address, a value beyond 32 bits,
        or an SLVERR/DECERR (read-only register, missing port, bit the instance lacks)."""
        self._check_addr(addr, "write")
        if not 0 <= value <= _MASK:
            raise FabricError(
                f"write of {value:#x} to {addr:#06x}: not a {rm.REGISTER_WIDTH}-bit value",
                address=addr,
                value=value,
                limit=_MASK,
            )
        self.writes += 1
        self._write(addr, value)

    @staticmethod
    def _check_addr(addr: int, access: str) -> None:
        if addr % _WORD or not 0 <= addr < rm.ADDRMAP_SIZE:
            raise FabricError(
                f"{access} of {addr:#06x}: not an aligned address of the register map "
                f"(0x0..{rm.ADDRMAP_SIZE - _WORD:#x}, multiples of {_WORD})",
                address=addr,
                limit=rm.ADDRMAP_SIZE,
            )

    async def _read_async(self, addr: int) -> int:
        resp = await self._master.read(addr, _WORD)
        if int(resp.resp) != _OKAY:
            raise FabricError(
                f"read of {addr:#06x}: the crossbar answered {resp.resp.name}",
                address=addr,
            )
        return int.from_bytes(resp.data, "little")

    async def _write_async(self, addr: int, value: int) -> None:
        resp = await self._master.write(addr, value.to_bytes(_WORD, "little"))
        if int(resp.resp) != _OKAY:
            raise FabricError(
                f"write of {value:#010x} to {addr:#06x}: the crossbar answered {resp.resp.name}",
                address=addr,
                value=value,
            )
