"""The emulated crossbar's configuration registers, kept in a memory-mapped file so that
they outlive the firmware process, as a real device's MMIO registers outlive a crash of its
firmware.

The behavioural crossbar (:mod:`firmware.fabric.model`) runs inside the firmware process.
Kept only in memory, its registers would die with the firmware, and every restart would
find a crossbar at reset: recovery would then never meet a half-programmed crossbar, which
is exactly what a real device shows after a crash between two register writes.
:class:`PersistentCrossbar` therefore mirrors every configuration register into
``<state>/crossbar.regs`` (``MAP_SHARED``: a store is in the page cache the moment it is
made, so a SIGKILL loses nothing) and powers up from it.

File layout (little-endian 32-bit words)::

    word 0        magic "SFXR" (0x52584653)
    word 1        layout version (1)
    word 2..4     n_ports, n_keys, data_bytes (the instance the file belongs to)
    word 5        GEN.committed: the committed generation g
    shadow        n_ports x 6 words: every port's shadow registers, in SHADOW_OFFSETS order
    bank 0, 1     n_ports x 6 words each: the configuration committed at generation g is
                  in bank g & 1

``CTRL.commit`` is atomic, as in the hardware: the new configuration is copied into the
bank the current generation does not use, and only then is word 5 stored (one aligned
32-bit store). A crash in between leaves the previous generation in force. Shadow writes
are single stores too, so a crash between two of them leaves a mix of old and new shadow
values, the state the driver's recovery has to put right.

What is not kept: the traffic counters, token buckets and packets in flight. Those belong
to the datapath, which the emulator runs in the firmware's process, so a firmware crash
stops it; on power-up every port runs the committed configuration (a real port adopts it
at its next packet boundary, which the lost packets would have reached).
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Final

from abi import regmap as rm
from firmware.errors import FabricError
from firmware.fabric.image import SHADOW_OFFSETS
from firmware.fabric.model import CrossbarModel

MAGIC: Final = 0x52584653  # b"SFXR" little-endian
LAYOUT_VERSION: Final = 1
_HEADER_WORDS: Final = 6
_GEN_WORD: Final = 5
_N_SHADOW: Final = len(SHADOW_OFFSETS)
_SLOT: Final = {off: i for i, off in enumerate(SHADOW_OFFSETS)}


def _reset_values() -> list[int]:
    """The RDL reset value of each shadow register, in SHADOW_OFFSETS order."""
    return [CrossbarModel(1).read(rm.port_reg(0, off)) for off in SHADOW_OFFSETS]


class RegisterFile:
    """The memory-mapped register file of one crossbar instance.

    Raises FabricError (naming the file and the field) when the file belongs to another
    instance (ports, keys, flit size), has another layout, or cannot be mapped.
    """

    def __init__(self, path: Path | str, n_ports: int, n_keys: int, data_bytes: int) -> None:
        self.path = Path(path)
        self.n_ports = n_ports
        self._words = _HEADER_WORDS + 3 * n_ports * _N_SHADOW
        header = [MAGIC, LAYOUT_VERSION, n_ports, n_keys, data_bytes]
        if not self.path.exists():
            self._create(header)
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            raise FabricError(f"crossbar register file {self.path}: {e.strerror}") from None
        try:
            have = struct.unpack("<5I", os.pread(fd, 20, 0).ljust(20, b"\0"))
            for name, got, want in zip(
                ("magic", "layout version", "n_ports", "n_keys", "data_bytes"),
                have, header, strict=True,
            ):
                if got != want:
                    raise FabricError(
                        f"crossbar register file {self.path}: {name} is {got}, this "
                        f"crossbar has {want} (remove the file to power the crossbar up at "
                        "reset)",
                        field=name, value=got, expected=want,
                    )
            size = os.fstat(fd).st_size
            if size != self._words * 4:
                raise FabricError(
                    f"crossbar register file {self.path} is {size} bytes, a crossbar of "
                    f"{n_ports} ports needs {self._words * 4} (remove the file to power "
                    "the crossbar up at reset)",
                    field="size", value=size, expected=self._words * 4,
                )
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._w = memoryview(self._map).cast("I")

    def _create(self, header: list[int]) -> None:
        """A crossbar at reset (generation 0, every register at its reset value), written
        to a temporary file and renamed, so a crash never leaves half a file."""
        reset = _reset_values() * self.n_ports
        words = [*header, 0, *reset, *reset, *reset]
        tmp = self.path.with_name(self.path.name + ".new")
        with open(tmp, "wb") as f:
            f.write(struct.pack(f"<{len(words)}I", *words))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # ---------------------------------------------------------------- layout

    def _shadow_index(self, port: int, offset: int) -> int:
        return _HEADER_WORDS + port * _N_SHADOW + _SLOT[offset]

    def _bank_start(self, bank: int) -> int:
        """Where bank 0 or 1 begins; a bank has the shadow area's layout."""
        return _HEADER_WORDS + (1 + bank) * self.n_ports * _N_SHADOW

    def _bank_index(self, bank: int, port: int, offset: int) -> int:
        return self._bank_start(bank) + port * _N_SHADOW + _SLOT[offset]

    @staticmethod
    def decode(addr: int) -> tuple[int, int] | None:
        """(port, offset) of a shadow register address, None for any other register."""
        if addr < rm.PORT_BASE:
            return None
        port, offset = divmod(addr - rm.PORT_BASE, rm.PORT_STRIDE)
        return (port, offset) if offset in _SLOT else None

    # ---------------------------------------------------------------- reading

    @property
    def generation(self) -> int:
        """GEN.committed as kept."""
        return int(self._w[_GEN_WORD])

    def shadow_image(self) -> dict[int, int]:
        """Every port's shadow registers: address → value."""
        return {
            rm.port_reg(p, off): int(self._w[self._shadow_index(p, off)])
            for p in range(self.n_ports)
            for off in SHADOW_OFFSETS
        }

    def committed_image(self) -> dict[int, int]:
        """The configuration of the committed generation (what the ports run): address →
        value, in the shadow registers' addresses."""
        bank = self.generation & 1
        return {
            rm.port_reg(p, off): int(self._w[self._bank_index(bank, p, off)])
            for p in range(self.n_ports)
            for off in SHADOW_OFFSETS
        }

    # ---------------------------------------------------------------- writing

    def store_shadow(self, addr: int, value: int) -> None:
        where = self.decode(addr)
        assert where is not None, f"{addr:#x} is not a shadow register"
        self.store_port_shadow(*where, value)

    def store_port_shadow(self, port: int, offset: int, value: int) -> None:
        """Store shadow register ``offset`` of ``port`` (already decoded)."""
        self._w[_HEADER_WORDS + port * _N_SHADOW + _SLOT[offset]] = value

    def store_commit(self, generation: int) -> None:
        """Commit the shadow registers as ``generation``: the shadow area is copied into
        the bank ``generation`` uses (the same layout, so one slice copy), then the
        generation word is stored."""
        n = self.n_ports * _N_SHADOW
        bank = self._bank_start(generation & 1)
        self._w[bank : bank + n] = self._w[_HEADER_WORDS : _HEADER_WORDS + n]
        self._w[_GEN_WORD] = generation

    def close(self) -> None:
        self._w.release()
        self._map.close()


class PersistentCrossbar(CrossbarModel):
    """The behavioural crossbar whose configuration registers live in a
    :class:`RegisterFile`: powered up from the file, and every shadow write and commit
    stored there as it happens (see the module docstring)."""

    def __init__(self, path: Path | str, n_ports: int, n_keys: int = 16, data_bytes: int = 64):
        super().__init__(n_ports, n_keys, data_bytes)
        self.regfile = RegisterFile(path, n_ports, n_keys, data_bytes)
        self.restore(
            self.regfile.shadow_image(), self.regfile.committed_image(), self.regfile.generation
        )

    def write(self, addr: int, value: int) -> None:
        stored = self._write(addr, value)  # raises before anything is stored for a bad access
        if stored is not None:  # a shadow register: (port, offset, the value as masked)
            self.regfile.store_port_shadow(*stored)
        elif addr == rm.CTRL_OFFSET and value & rm.CTRL_COMMIT_MASK:
            self.regfile.store_commit(self._committed)  # the file's shadow is the model's

    def close(self) -> None:
        self.regfile.close()
