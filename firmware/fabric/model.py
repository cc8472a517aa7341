"""Behavioural, cycle-level model of the Slicefab crossbar: the golden reference.

It implements the register map of ``rtl/regmap/slicefab_xbar.rdl`` (through the generated
constants of :mod:`abi.regmap` only) and the datapath that map describes: an N x N
AXI4-Stream crossbar with a permission table, protection keys, weighted round-robin
arbitration per output, a token bucket per input, per-port counters and a shadow
configuration committed atomically at packet boundaries (docs/DESIGN "The crossbar").
The Verilog crossbar must match it cycle for cycle; the register descriptions in
``docs/abi/registers.md`` are the specification, this module is its executable form.

One cycle (:meth:`CrossbarModel.step`) runs these phases, in order:

1. **Refill.** Every input adds TB_RATE.rate to its token bucket, capped at TB_BURST.burst
   (tokens are counted in units of 2^-fracwidth byte, so 16.16 rates are exact).
2. **Head inspection.** Every input with no packet in flight looks at its head packet under
   its ACTIVE configuration: a packet whose output is at or above ``n_ports`` or not in the
   permission mask, or whose key is at or above ``n_keys`` or not in the KEYS mask, is
   dropped (CNT_DROPS + 1) and starts draining; a permitted one requests its output if the
   bucket holds the tokens for its first flit (or the limit is disabled), otherwise the input
   stalls (CNT_STALLS + 1).
3. **Arbitration.** Every free output grants one requester by weighted round-robin (see
   :class:`_OutputArbiter`); the packet's generation is fixed here.
4. **Transfer.** Every input with a packet in flight moves one flit: to its output if the
   bucket allows (tokens removed, CNT_FLITS + 1), else it stalls (CNT_STALLS + 1); a
   draining input discards one flit. After the last flit the packet is delivered
   (CNT_PKTS + 1) or its drop completes, and the output is free from the next cycle.
5. **Adoption.** Every input with a staged commit and no packet in flight adopts it.

Register accesses happen between cycles. CTRL.commit snapshots every shadow register into
a per-port staged configuration; inputs with no packet in flight adopt it at once.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from abi.regmap import (
    ADDRMAP_SIZE,
    CAPS_DATA_BYTES_LSB,
    CAPS_DATA_BYTES_MASK,
    CAPS_N_KEYS_LSB,
    CAPS_N_KEYS_MASK,
    CAPS_N_PORTS_LSB,
    CAPS_N_PORTS_MASK,
    CAPS_OFFSET,
    CTRL_CLEAR_COUNTERS_MASK,
    CTRL_COMMIT_MASK,
    CTRL_OFFSET,
    CTRL_RESET,
    GEN_ADOPTED_LSB,
    GEN_ADOPTED_MASK,
    GEN_COMMITTED_LSB,
    GEN_COMMITTED_MASK,
    GEN_OFFSET,
    GLOBAL_REGISTERS,
    ID_OFFSET,
    ID_VALUE,
    MAX_PORTS,
    PORT_ACTIVE_GEN_GEN_LSB,
    PORT_ACTIVE_GEN_GEN_MASK,
    PORT_ACTIVE_GEN_OFFSET,
    PORT_BASE,
    PORT_CNT_DROPS_COUNT_MASK,
    PORT_CNT_DROPS_OFFSET,
    PORT_CNT_FLITS_COUNT_MASK,
    PORT_CNT_FLITS_OFFSET,
    PORT_CNT_PKTS_COUNT_MASK,
    PORT_CNT_PKTS_OFFSET,
    PORT_CNT_STALLS_COUNT_MASK,
    PORT_CNT_STALLS_OFFSET,
    PORT_KEYS_MASK_LSB,
    PORT_KEYS_MASK_MASK,
    PORT_KEYS_MASK_WIDTH,
    PORT_KEYS_OFFSET,
    PORT_KEYS_RESET,
    PORT_PERM_HI_ALLOWED_LSB,
    PORT_PERM_HI_ALLOWED_MASK,
    PORT_PERM_HI_OFFSET,
    PORT_PERM_HI_RESET,
    PORT_PERM_LO_ALLOWED_LSB,
    PORT_PERM_LO_ALLOWED_MASK,
    PORT_PERM_LO_ALLOWED_WIDTH,
    PORT_PERM_LO_OFFSET,
    PORT_PERM_LO_RESET,
    PORT_REGISTERS,
    PORT_STRIDE,
    PORT_TB_BURST_BURST_LSB,
    PORT_TB_BURST_BURST_MASK,
    PORT_TB_BURST_ENABLE_MASK,
    PORT_TB_BURST_OFFSET,
    PORT_TB_BURST_RESET,
    PORT_TB_RATE_OFFSET,
    PORT_TB_RATE_RATE_FRACWIDTH,
    PORT_TB_RATE_RATE_LSB,
    PORT_TB_RATE_RATE_MASK,
    PORT_TB_RATE_RESET,
    PORT_WEIGHT_OFFSET,
    PORT_WEIGHT_RESET,
    PORT_WEIGHT_WEIGHT_LSB,
    PORT_WEIGHT_WEIGHT_MASK,
    REGISTER_WIDTH,
    STATUS_OFFSET,
    STATUS_PENDING_LSB,
    VERSION_OFFSET,
    VERSION_VALUE,
    port_reg,
)
from firmware.errors import FabricError

_WORD_BYTES: Final = REGISTER_WIDTH // 8
_WORD_MASK: Final = (1 << REGISTER_WIDTH) - 1
#: Generations are 16-bit: GEN.committed, GEN.adopted and ACTIVE_GEN have the same width.
_GEN_MODULUS: Final = (GEN_COMMITTED_MASK >> GEN_COMMITTED_LSB) + 1
#: One token is one byte; the bucket counts 2^-fracwidth bytes so that 16.16 rates are exact.
_TOKEN_SHIFT: Final = PORT_TB_RATE_RATE_FRACWIDTH

#: The per-port shadow registers (the only per-port registers software may write):
#: offset -> (reset value, mask of the writable fields).
_SHADOW: Final[Mapping[int, tuple[int, int]]] = {
    PORT_PERM_LO_OFFSET: (PORT_PERM_LO_RESET, PORT_PERM_LO_ALLOWED_MASK),
    PORT_PERM_HI_OFFSET: (PORT_PERM_HI_RESET, PORT_PERM_HI_ALLOWED_MASK),
    PORT_WEIGHT_OFFSET: (PORT_WEIGHT_RESET, PORT_WEIGHT_WEIGHT_MASK),
    PORT_TB_RATE_OFFSET: (PORT_TB_RATE_RESET, PORT_TB_RATE_RATE_MASK),
    PORT_TB_BURST_OFFSET: (
        PORT_TB_BURST_RESET,
        PORT_TB_BURST_BURST_MASK | PORT_TB_BURST_ENABLE_MASK,
    ),
    PORT_KEYS_OFFSET: (PORT_KEYS_RESET, PORT_KEYS_MASK_MASK),
}

#: The per-port counters: offset -> mask (their width; they wrap).
_COUNTERS: Final[Mapping[int, int]] = {
    PORT_CNT_PKTS_OFFSET: PORT_CNT_PKTS_COUNT_MASK,
    PORT_CNT_FLITS_OFFSET: PORT_CNT_FLITS_COUNT_MASK,
    PORT_CNT_DROPS_OFFSET: PORT_CNT_DROPS_COUNT_MASK,
    PORT_CNT_STALLS_OFFSET: PORT_CNT_STALLS_COUNT_MASK,
}


def _get(value: int, mask: int, lsb: int) -> int:
    """Field value: ``(value & mask) >> lsb`` (masks in abi.regmap are in place)."""
    return (value & mask) >> lsb


@dataclass(frozen=True)
class Packet:
    """A packet as the crossbar handled it: delivered to ``dest`` or dropped at ``src``.

    ``generation`` is the ACTIVE_GEN of input ``src`` under which the packet was routed (or
    dropped); ``first_cycle``/``last_cycle`` are the cycles that moved (or drained) its
    first and last flit. ``seq`` is the number :meth:`CrossbarModel.send` returned.
    """

    seq: int
    src: int
    dest: int
    key: int
    payload: bytes
    generation: int
    first_cycle: int
    last_cycle: int


@dataclass(frozen=True)
class PortConfig:
    """The decoded configuration of one input port (one generation of its shadow registers)."""

    permitted_outputs: int
    """Bit o set: this input may send to output o (PERM_HI:PERM_LO)."""
    weight: int
    """WEIGHT.weight, 0 already counted as 1."""
    rate: int
    """TB_RATE.rate, in 2^-fracwidth bytes per cycle."""
    burst: int
    """TB_BURST.burst, in bytes."""
    rate_limited: bool
    """TB_BURST.enable."""
    keys: int
    """KEYS.mask."""

    @classmethod
    def from_registers(cls, regs: Mapping[int, int]) -> PortConfig:
        """Decode shadow register values (offset -> value) into a configuration."""
        lo = _get(regs[PORT_PERM_LO_OFFSET], PORT_PERM_LO_ALLOWED_MASK, PORT_PERM_LO_ALLOWED_LSB)
        hi = _get(regs[PORT_PERM_HI_OFFSET], PORT_PERM_HI_ALLOWED_MASK, PORT_PERM_HI_ALLOWED_LSB)
        burst_reg = regs[PORT_TB_BURST_OFFSET]
        return cls(
            permitted_outputs=lo | (hi << PORT_PERM_LO_ALLOWED_WIDTH),
            weight=max(
                1, _get(regs[PORT_WEIGHT_OFFSET], PORT_WEIGHT_WEIGHT_MASK, PORT_WEIGHT_WEIGHT_LSB)
            ),
            rate=_get(regs[PORT_TB_RATE_OFFSET], PORT_TB_RATE_RATE_MASK, PORT_TB_RATE_RATE_LSB),
            burst=_get(burst_reg, PORT_TB_BURST_BURST_MASK, PORT_TB_BURST_BURST_LSB),
            rate_limited=bool(burst_reg & PORT_TB_BURST_ENABLE_MASK),
            keys=_get(regs[PORT_KEYS_OFFSET], PORT_KEYS_MASK_MASK, PORT_KEYS_MASK_LSB),
        )

    @property
    def token_cap(self) -> int:
        """Bucket capacity in token units (2^-fracwidth byte)."""
        return self.burst << _TOKEN_SHIFT


@functools.lru_cache(maxsize=1024)
def _decode_shadow(values: tuple[int, ...]) -> PortConfig:
    """:meth:`PortConfig.from_registers` of shadow values in ``_SHADOW`` order, cached: a
    commit re-adopts every port, and a device has few distinct configurations at a time."""
    return PortConfig.from_registers(dict(zip(_SHADOW, values, strict=True)))


@dataclass(frozen=True)
class _Frame:
    """A packet queued at an input (what the upstream AXI4-Stream master presents)."""

    seq: int
    src: int
    dest: int
    key: int
    payload: bytes


@dataclass
class _Transfer:
    """The packet in flight at an input: forwarded to ``output``, or drained if None."""

    frame: _Frame
    output: int | None
    generation: int
    first_cycle: int
    flits_done: int = 0


@dataclass
class _InputPort:
    """One input: registers, staged commit, queue, packet in flight, bucket, counters."""

    shadow: dict[int, int]
    active: PortConfig
    staged: dict[int, int] | None = None
    staged_gen: int = 0
    active_gen: int = 0
    queue: deque[_Frame] = field(default_factory=deque)
    transfer: _Transfer | None = None
    tokens: int = 0
    counters: dict[int, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))
    #: ``active`` was decoded from ``shadow`` as it is now (no shadow write since): a
    #: commit then has nothing to decode for this port, only its generation to take
    current: bool = False

    def count(self, offset: int) -> None:
        """Increment the counter at ``offset``, wrapping at its width."""
        self.counters[offset] = (self.counters[offset] + 1) & _COUNTERS[offset]

    def adopt(self) -> None:
        """Take the staged configuration into service (only at a packet boundary)."""
        assert self.staged is not None and self.transfer is None
        self.run(self.staged, self.staged_gen)

    def run(self, regs: Mapping[int, int], generation: int) -> None:
        """Forward with shadow values ``regs`` as ``generation`` from now on (at a packet
        boundary); nothing stays staged."""
        self.active = _decode_shadow(tuple([regs[o] for o in _SHADOW]))
        self.active_gen = generation
        self.staged = None
        self.current = regs is self.shadow
        # The bucket keeps its tokens; the next refill caps them at the new burst.


@dataclass
class _OutputArbiter:
    """Weighted round-robin arbiter of one output (WEIGHT register semantics).

    ``last`` is the input granted last and ``run`` the number of consecutive grants of its
    current turn (0: no turn in progress, as after reset with ``last`` = N-1, so that the
    lowest requesting input is served first). ``owner`` holds the output for a packet.
    """

    last: int
    run: int = 0
    owner: int | None = None

    def grant(self, requesters: set[int], weight: Callable[[int], int], n_ports: int) -> int:
        """Pick the input to serve among ``requesters`` (not empty) and update the turn.

        The input granted last keeps the grant while it requests and its turn has had
        fewer than ``weight(last)`` grants; otherwise the grant moves to the next requester
        after it in increasing port order, wrapping (possibly back to ``last``: new turn).
        """
        if self.last in requesters and 0 < self.run < weight(self.last):
            self.run += 1
            return self.last
        for step in range(1, n_ports + 1):
            candidate = (self.last + step) % n_ports
            if candidate in requesters:
                self.last = candidate
                self.run = 1
                return candidate
        raise AssertionError("grant() called without requesters")


class CrossbarModel:
    """The crossbar, cycle by cycle, behind a :class:`firmware.fabric.bus.RegisterBus`.

    ``n_ports`` inputs and outputs (1..MAX_PORTS), ``n_keys`` protection keys (1..16),
    ``data_bytes`` bytes per flit (the tdata width / 8). Reset state: every shadow and
    active register at its RDL reset value (no output or key permitted, weight 1, no rate
    limit), generation 0, empty buckets, counters 0, cycle 0.

    Register semantics: ``docs/abi/registers.md``; datapath: this module's docstring.

    * register port: :meth:`read`, :meth:`write` (a :class:`~firmware.fabric.bus.RegisterBus`),
      :meth:`image` (every RW shadow register, for the driver's read-back);
    * traffic: :meth:`send` queues a packet at an input, :meth:`step` advances the clock,
      :meth:`run_until_idle` drains, :attr:`idle`, :attr:`cycle`;
    * outcome: :meth:`delivered` per output, :meth:`dropped` per input (:class:`Packet`).
    """

    def __init__(self, n_ports: int, n_keys: int = 16, data_bytes: int = 64) -> None:
        """Raises FabricError naming the parameter and its limit if one is out of range."""
        limits = {
            "n_ports": (n_ports, MAX_PORTS),
            "n_keys": (n_keys, PORT_KEYS_MASK_WIDTH),
            "data_bytes": (data_bytes, CAPS_DATA_BYTES_MASK >> CAPS_DATA_BYTES_LSB),
        }
        for name, (value, limit) in limits.items():
            if not 1 <= value <= limit:
                raise FabricError(
                    f"{name}={value} out of range: the crossbar supports 1..{limit}",
                    field=name,
                    value=value,
                    limit=limit,
                )
        self._n_ports = n_ports
        self._n_keys = n_keys
        self._data_bytes = data_bytes
        reset = {offset: value for offset, (value, _mask) in _SHADOW.items()}
        self._inputs = [
            _InputPort(shadow=dict(reset), active=PortConfig.from_registers(reset))
            for _ in range(n_ports)
        ]
        self._outputs = [_OutputArbiter(last=n_ports - 1) for _ in range(n_ports)]
        #: each shadow register's address -> (port, offset, mask of its writable fields):
        #: what _decode and _SHADOW say of it, found once (a reconfiguration writes several)
        self._shadow_at = {
            port_reg(p, offset): (p, offset, mask)
            for p in range(n_ports)
            for offset, (_reset, mask) in _SHADOW.items()
        }
        self._committed = 0
        self._cycle = 0
        self._next_seq = 0
        self._delivered: list[list[Packet]] = [[] for _ in range(n_ports)]
        self._dropped: list[list[Packet]] = [[] for _ in range(n_ports)]

    # ----------------------------------------------------------------------------------
    # parameters and observation
    # ----------------------------------------------------------------------------------

    @property
    def n_ports(self) -> int:
        return self._n_ports

    @property
    def n_keys(self) -> int:
        return self._n_keys

    @property
    def data_bytes(self) -> int:
        return self._data_bytes

    @property
    def cycle(self) -> int:
        """Number of cycles simulated since reset (the index of the next cycle)."""
        return self._cycle

    @property
    def idle(self) -> bool:
        """True when no input has a queued packet or a packet in flight."""
        return all(not port.queue and port.transfer is None for port in self._inputs)

    def delivered(self, dest: int) -> list[Packet]:
        """Packets delivered whole to output ``dest``, in delivery order."""
        self._check_port("dest", dest)
        return list(self._delivered[dest])

    def dropped(self, src: int) -> list[Packet]:
        """Packets of input ``src`` dropped whole (each counted once in CNT_DROPS), in order."""
        self._check_port("src", src)
        return list(self._dropped[src])

    def active_config(self, port: int) -> PortConfig:
        """The configuration input ``port`` forwards with now (its adopted generation), as
        opposed to the shadow registers that :meth:`read` returns."""
        if not 0 <= port < self._n_ports:
            raise FabricError(f"port {port} out of range 0..{self._n_ports - 1}")
        return self._inputs[port].active

    def image(self) -> dict[int, int]:
        """Every RW shadow register of every port: byte address -> current value."""
        return {
            port_reg(p, offset): value
            for p, port in enumerate(self._inputs)
            for offset, value in port.shadow.items()
        }

    # ----------------------------------------------------------------------------------
    # RegisterBus
    # ----------------------------------------------------------------------------------

    def read(self, addr: int) -> int:
        """AXI4-Lite read. Raises FabricError for unaligned, unmapped or missing-port addresses.

        Shadow registers read back their shadow (not active) value; CTRL reads as 0.
        """
        port, offset = self._decode(addr, "read")
        if port is None:
            return self._read_global(offset)
        state = self._inputs[port]
        if offset in _SHADOW:
            return state.shadow[offset]
        if offset in _COUNTERS:
            return state.counters[offset]
        assert offset == PORT_ACTIVE_GEN_OFFSET
        return (state.active_gen << PORT_ACTIVE_GEN_GEN_LSB) & PORT_ACTIVE_GEN_GEN_MASK

    def write(self, addr: int, value: int) -> None:
        """AXI4-Lite write (32 bits; bits outside the register's fields are ignored).

        Raises FabricError for unaligned, unmapped or missing-port addresses, read-only
        registers, values beyond 32 bits, and PERM/KEYS bits of outputs/keys the instance
        does not have.
        """
        self._write(addr, value)

    def _write(self, addr: int, value: int) -> tuple[int, int, int] | None:
        """:meth:`write`; returns ``(port, offset, value as stored)`` when it wrote a
        shadow register, None for a global one (for a subclass that mirrors the shadow)."""
        if not 0 <= value <= _WORD_MASK:
            raise FabricError(
                f"write of {value:#x} to {addr:#06x}: not a {REGISTER_WIDTH}-bit value",
                address=addr,
                value=value,
                limit=_WORD_MASK,
            )
        shadow = self._shadow_at.get(addr)
        if shadow is None:  # not a shadow register of an existing port
            decoded, offset = self._decode(addr, "write")  # raises for a bad address
            if decoded is not None:
                raise self._read_only(addr, PORT_REGISTERS[offset], decoded)
            if offset != CTRL_OFFSET:
                raise self._read_only(addr, GLOBAL_REGISTERS[offset], None)
            if value & CTRL_CLEAR_COUNTERS_MASK:
                self._clear_counters()
            if value & CTRL_COMMIT_MASK:
                self._commit()
            return None
        port, offset, mask = shadow
        value &= mask
        self._check_existing_bits(port, offset, value)
        state = self._inputs[port]
        state.shadow[offset] = value
        state.current = False
        return port, offset, value

    def _decode(self, addr: int, access: str) -> tuple[int | None, int]:
        """(port or None for a global register, offset) of a mapped, existing register."""
        if addr % _WORD_BYTES or not 0 <= addr < ADDRMAP_SIZE:
            raise FabricError(
                f"{access} of {addr:#06x}: not an aligned address of the register map "
                f"(0x0..{ADDRMAP_SIZE - _WORD_BYTES:#x}, multiples of {_WORD_BYTES})",
                address=addr,
                limit=ADDRMAP_SIZE,
            )
        if addr < PORT_BASE:
            if addr not in GLOBAL_REGISTERS:
                raise FabricError(
                    f"{access} of {addr:#06x}: unmapped (global registers: "
                    f"{', '.join(GLOBAL_REGISTERS.values())})",
                    address=addr,
                )
            return None, addr
        port, offset = divmod(addr - PORT_BASE, PORT_STRIDE)
        if offset not in PORT_REGISTERS:
            raise FabricError(
                f"{access} of {addr:#06x}: offset {offset:#04x} of port[{port}] is unmapped",
                address=addr,
                port=port,
            )
        if port >= self._n_ports:
            raise FabricError(
                f"{access} of {addr:#06x} (port[{port}].{PORT_REGISTERS[offset]}): "
                f"this crossbar has ports 0..{self._n_ports - 1}",
                address=addr,
                register=PORT_REGISTERS[offset],
                port=port,
                limit=self._n_ports,
            )
        return port, offset

    @staticmethod
    def _read_only(addr: int, register: str, port: int | None) -> FabricError:
        where = register if port is None else f"port[{port}].{register}"
        return FabricError(
            f"write to {addr:#06x} ({where}): register is read-only",
            address=addr,
            register=register,
            port=port,
        )

    def _check_existing_bits(self, port: int, offset: int, value: int) -> None:
        """Refuse PERM bits of outputs >= n_ports and KEYS bits of keys >= n_keys."""
        if offset == PORT_PERM_LO_OFFSET:
            first, limit, what = 0, self._n_ports, "outputs"
            bits = _get(value, PORT_PERM_LO_ALLOWED_MASK, PORT_PERM_LO_ALLOWED_LSB)
        elif offset == PORT_PERM_HI_OFFSET:
            first, limit, what = PORT_PERM_LO_ALLOWED_WIDTH, self._n_ports, "outputs"
            bits = _get(value, PORT_PERM_HI_ALLOWED_MASK, PORT_PERM_HI_ALLOWED_LSB)
        elif offset == PORT_KEYS_OFFSET:
            first, limit, what = 0, self._n_keys, "keys"
            bits = _get(value, PORT_KEYS_MASK_MASK, PORT_KEYS_MASK_LSB)
        else:
            return
        if first + bits.bit_length() <= limit:  # no bit at or above the limit (hot path)
            return
        missing = [first + b for b in range(bits.bit_length()) if bits >> b & 1]
        missing = [unit for unit in missing if unit >= limit]
        if missing:
            register = PORT_REGISTERS[offset]
            raise FabricError(
                f"port[{port}].{register} = {value:#010x}: {what} {missing} do not exist, "
                f"this crossbar has {what} 0..{limit - 1}",
                register=register,
                port=port,
                value=value,
                limit=limit,
            )

    def _read_global(self, offset: int) -> int:
        if offset == ID_OFFSET:
            return ID_VALUE
        if offset == VERSION_OFFSET:
            return VERSION_VALUE
        if offset == CAPS_OFFSET:
            return (
                (self._n_ports << CAPS_N_PORTS_LSB) & CAPS_N_PORTS_MASK
                | (self._n_keys << CAPS_N_KEYS_LSB) & CAPS_N_KEYS_MASK
                | (self._data_bytes << CAPS_DATA_BYTES_LSB) & CAPS_DATA_BYTES_MASK
            )
        if offset == CTRL_OFFSET:
            return CTRL_RESET
        if offset == GEN_OFFSET:
            return (self._committed << GEN_COMMITTED_LSB) & GEN_COMMITTED_MASK | (
                self._adopted() << GEN_ADOPTED_LSB
            ) & GEN_ADOPTED_MASK
        assert offset == STATUS_OFFSET
        return int(self._pending()) << STATUS_PENDING_LSB

    # ----------------------------------------------------------------------------------
    # commit and generations
    # ----------------------------------------------------------------------------------

    def _commit(self) -> None:
        """CTRL.commit: stage every port's shadow, adopt it at once where no packet is in flight."""
        self._committed = gen = (self._committed + 1) % _GEN_MODULUS
        for port in self._inputs:
            if port.transfer is None:  # adopt at once, with no staged copy in between
                if port.current:  # what it runs is its shadow already: no decode (hot path)
                    port.active_gen = gen
                    port.staged = None
                else:
                    port.run(port.shadow, gen)
            else:
                port.staged = dict(port.shadow)
                port.staged_gen = gen

    def restore(
        self, shadow: Mapping[int, int], committed: Mapping[int, int], generation: int
    ) -> None:
        """Power up in the state a device kept while its firmware was away (used by
        :class:`firmware.fabric.regfile.PersistentCrossbar`): the ``shadow`` registers, and
        every port running the ``committed`` configuration (same addresses) of
        ``generation``. Nothing may be in flight. Raises FabricError for a missing
        register, a value with bits the register does not have, or a generation beyond
        GEN.committed's width."""
        if not self.idle or not 0 <= generation < _GEN_MODULUS:
            raise FabricError(
                f"restore: generation {generation} (0..{_GEN_MODULUS - 1}) on an idle "
                "crossbar expected", field="generation", value=generation,
            )
        for p, port in enumerate(self._inputs):
            values: dict[str, dict[int, int]] = {"shadow": {}, "committed": {}}
            for name, regs in (("shadow", shadow), ("committed", committed)):
                for offset, (_reset, mask) in _SHADOW.items():
                    addr = port_reg(p, offset)
                    if addr not in regs or regs[addr] & ~mask:
                        raise FabricError(
                            f"restore: {name} register {addr:#06x} (port[{p}]."
                            f"{PORT_REGISTERS[offset]}) is {regs.get(addr)!r}, expected a "
                            f"value within mask {mask:#010x}",
                            field=name, address=addr,
                        )
                    self._check_existing_bits(p, offset, regs[addr])
                    values[name][offset] = regs[addr]
            port.shadow = values["shadow"]
            port.active = _decode_shadow(tuple(values["committed"][o] for o in _SHADOW))
            port.active_gen = generation
            port.staged = None
            port.current = False
        self._committed = generation

    def _pending(self) -> bool:
        return any(port.staged is not None for port in self._inputs)

    def _adopted(self) -> int:
        """GEN.adopted: the oldest ACTIVE_GEN, age counted back from GEN.committed."""
        lags = [
            (self._committed - port.active_gen) % _GEN_MODULUS
            for port in self._inputs
            if port.staged is not None
        ]
        return (self._committed - max(lags, default=0)) % _GEN_MODULUS

    def _clear_counters(self) -> None:
        for port in self._inputs:
            port.counters = dict.fromkeys(_COUNTERS, 0)

    # ----------------------------------------------------------------------------------
    # traffic
    # ----------------------------------------------------------------------------------

    def send(self, src: int, dest: int, payload: bytes, key: int = 0) -> int:
        """Queue a packet at input ``src`` with ``tdest = dest`` and ``tuser = key``.

        ``dest`` may name an output the instance does not have (below MAX_PORTS) and ``key``
        a key it does not have (below the KEYS width): such packets are dropped, as in
        hardware. Returns the packet's sequence number (``Packet.seq``). Raises FabricError
        if ``src`` is not an input, ``dest``/``key`` do not fit tdest/tuser, or ``payload``
        is empty (an AXI4-Stream packet has at least one beat).
        """
        self._check_port("src", src)
        for name, value, limit in (("dest", dest, MAX_PORTS), ("key", key, PORT_KEYS_MASK_WIDTH)):
            if not 0 <= value < limit:
                raise FabricError(
                    f"{name}={value} does not fit: tdest/tuser carry 0..{limit - 1}",
                    field=name,
                    value=value,
                    limit=limit,
                )
        if not payload:
            raise FabricError("empty payload: a packet carries at least one byte", field="payload")
        seq = self._next_seq
        self._next_seq += 1
        self._inputs[src].queue.append(_Frame(seq, src, dest, key, bytes(payload)))
        return seq

    def step(self, cycles: int = 1) -> None:
        """Advance ``cycles`` clock cycles (phases in the module docstring)."""
        if cycles < 0:
            raise FabricError(f"cycles={cycles}: cannot step backwards", field="cycles")
        remaining = cycles
        while remaining > 0:
            if self.idle:
                self._idle_cycles(remaining)
                return
            self._one_cycle()
            remaining -= 1

    def run_until_idle(self, max_cycles: int) -> int:
        """Step until :attr:`idle`; return the cycles it took.

        Raises FabricError naming the busy inputs if not idle after ``max_cycles`` cycles.
        """
        start = self._cycle
        while not self.idle:
            if self._cycle - start >= max_cycles:
                busy = [p for p, port in enumerate(self._inputs) if port.queue or port.transfer]
                raise FabricError(
                    f"crossbar not idle after {max_cycles} cycles: inputs {busy} still busy",
                    limit=max_cycles,
                    ports=busy,
                )
            self._one_cycle()
        return self._cycle - start

    def _idle_cycles(self, cycles: int) -> None:
        """``cycles`` cycles with no traffic: only the buckets refill (same result as stepping)."""
        for port in self._inputs:
            port.tokens = min(port.tokens + cycles * port.active.rate, port.active.token_cap)
        self._cycle += cycles

    def _flit_bytes(self, frame: _Frame, index: int) -> int:
        """Valid bytes (tkeep) of flit ``index`` of ``frame``."""
        return min(self._data_bytes, len(frame.payload) - index * self._data_bytes)

    def _flits(self, frame: _Frame) -> int:
        return -(-len(frame.payload) // self._data_bytes)

    def _permitted(self, config: PortConfig, frame: _Frame) -> bool:
        """The drop rules (PERM_LO/PERM_HI, KEYS) under the configuration ``config``."""
        return (
            frame.dest < self._n_ports
            and bool(config.permitted_outputs >> frame.dest & 1)
            and frame.key < self._n_keys
            and bool(config.keys >> frame.key & 1)
        )

    @staticmethod
    def _has_tokens(port: _InputPort, nbytes: int) -> bool:
        return not port.active.rate_limited or port.tokens >= nbytes << _TOKEN_SHIFT

    def _one_cycle(self) -> None:
        cycle = self._cycle
        inputs = self._inputs

        # 1. refill
        for port in inputs:
            port.tokens = min(port.tokens + port.active.rate, port.active.token_cap)

        # 2. head inspection: drops, requests, stalls of inputs at a packet boundary
        requests: dict[int, set[int]] = {}
        for p, port in enumerate(inputs):
            if port.transfer is not None or not port.queue:
                continue
            frame = port.queue[0]
            if not self._permitted(port.active, frame):
                port.queue.popleft()
                port.transfer = _Transfer(frame, None, port.active_gen, cycle)
                port.count(PORT_CNT_DROPS_OFFSET)
            elif self._has_tokens(port, self._flit_bytes(frame, 0)):
                requests.setdefault(frame.dest, set()).add(p)
            else:
                port.count(PORT_CNT_STALLS_OFFSET)

        # 3. arbitration of free outputs
        for out, requesters in requests.items():
            arbiter = self._outputs[out]
            if arbiter.owner is not None:
                continue
            p = arbiter.grant(requesters, lambda q: inputs[q].active.weight, self._n_ports)
            port = inputs[p]
            port.transfer = _Transfer(port.queue.popleft(), out, port.active_gen, cycle)
            arbiter.owner = p

        # 4. transfer one flit per input with a packet in flight
        for port in inputs:
            transfer = port.transfer
            if transfer is None:
                continue
            frame = transfer.frame
            if transfer.output is not None:
                nbytes = self._flit_bytes(frame, transfer.flits_done)
                if not self._has_tokens(port, nbytes):
                    port.count(PORT_CNT_STALLS_OFFSET)
                    continue
                if port.active.rate_limited:
                    port.tokens -= nbytes << _TOKEN_SHIFT
                port.count(PORT_CNT_FLITS_OFFSET)
            transfer.flits_done += 1
            if transfer.flits_done == self._flits(frame):
                self._finish(port, transfer, cycle)

        # 5. adoption at packet boundaries
        for port in inputs:
            if port.staged is not None and port.transfer is None:
                port.adopt()

        self._cycle = cycle + 1

    def _finish(self, port: _InputPort, transfer: _Transfer, cycle: int) -> None:
        frame = transfer.frame
        packet = Packet(
            seq=frame.seq,
            src=frame.src,
            dest=frame.dest,
            key=frame.key,
            payload=frame.payload,
            generation=transfer.generation,
            first_cycle=transfer.first_cycle,
            last_cycle=cycle,
        )
        if transfer.output is None:
            self._dropped[frame.src].append(packet)
        else:
            self._delivered[transfer.output].append(packet)
            self._outputs[transfer.output].owner = None
            port.count(PORT_CNT_PKTS_OFFSET)
        port.transfer = None

    def _check_port(self, name: str, value: int) -> None:
        if not 0 <= value < self._n_ports:
            raise FabricError(
                f"{name}={value}: this crossbar has ports 0..{self._n_ports - 1}",
                field=name,
                port=value,
                limit=self._n_ports,
            )
