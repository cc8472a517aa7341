"""The register bus: how the fabric driver reaches the crossbar's AXI4-Lite register port.

Every backend (the behavioural model in :mod:`firmware.fabric.model`, a cocotb simulation
of the Verilog crossbar, a QEMU device over QMP) implements this one interface, so the
driver above it always runs the same code (docs/DESIGN "The data flow").

Addresses and values are those of ``abi.regmap`` (generated from
``rtl/regmap/slicefab_xbar.rdl``): byte addresses of 32-bit registers.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class RegisterBus(Protocol):
    """A 32-bit register port (AXI4-Lite semantics: one aligned 32-bit word per access)."""

    def read(self, addr: int) -> int:
        """Read the 32-bit register at byte address ``addr``.

        Raises:
            firmware.errors.FabricError: ``addr`` is unaligned, unmapped or belongs to a port
                the instance does not have (AXI4-Lite SLVERR/DECERR).
        """
        ...

    def write(self, addr: int, value: int) -> None:
        """Write the 32-bit ``value`` to the register at byte address ``addr``.

        Raises:
            firmware.errors.FabricError: ``addr`` is unaligned, unmapped, read-only or belongs
                to a missing port, or ``value`` does not fit in 32 bits or sets a bit the
                instance does not have.
        """
        ...
