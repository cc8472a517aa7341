"""Testbench pieces shared by the crossbar's cocotb tests.

:class:`XbarTB` wires one cocotbext-axi ``AxiStreamSource``/``AxiStreamSink`` per port and
an ``AxiLiteMaster`` on the register port of ``tb_slicefab_xbar`` (the wrapper that
``firmware.fabric.rtlsim`` generates), with idle and back-pressure generators.
:class:`Scoreboard` checks every delivered packet: content, destination, sideband, no
duplicate, order per flow; and at the end that every packet sent was delivered or dropped
exactly once, in agreement with the crossbar's counters.

A packet's first 4 bytes identify it: sequence number (24 bits, per input) and input.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import (  # type: ignore[import-untyped]
    AxiLiteBus,
    AxiLiteMaster,
    AxiResp,
    AxiStreamBus,
    AxiStreamFrame,
    AxiStreamSink,
    AxiStreamSource,
)

from abi import regmap as rm

HEADER_BYTES = 4
N_PORTS = int(os.environ.get("XBAR_N_PORTS", "4"))
DATA_WIDTH = int(os.environ.get("XBAR_DATA_WIDTH", "64"))
DATA_BYTES = DATA_WIDTH // 8
ALL_KEYS = (1 << rm.PORT_KEYS_MASK_WIDTH) - 1


class RegisterError(Exception):
    """An AXI4-Lite access answered SLVERR/DECERR."""

    def __init__(self, access: str, addr: int, resp: object) -> None:
        super().__init__(f"{access} of {addr:#06x}: {resp}")
        self.addr = addr


def header(src: int, seq: int) -> bytes:
    return (seq & 0xFFFFFF).to_bytes(3, "little") + bytes([src])


def decode_header(data: bytes) -> tuple[int, int]:
    """(src, seq) of a packet's payload."""
    return data[3], int.from_bytes(data[:3], "little")


def payload(rng: random.Random, src: int, seq: int, flits: int) -> bytes:
    """A packet of ``flits`` flits; its last flit is partly filled half of the time."""
    lo = max(HEADER_BYTES, (flits - 1) * DATA_BYTES + 1)
    hi = flits * DATA_BYTES
    n = hi if rng.random() < 0.5 else rng.randint(lo, hi)
    return header(src, seq) + rng.randbytes(n - HEADER_BYTES)


def pause_generator(rng: random.Random, busy_fraction: float) -> Iterator[bool]:
    """True (pause) in about ``busy_fraction`` of the cycles, in short random runs."""
    while True:
        yield rng.random() < busy_fraction


@dataclass
class Sent:
    src: int
    seq: int
    dest: int
    key: int
    data: bytes
    cycle: int


@dataclass
class Received:
    src: int
    seq: int
    out: int
    cycle: int


@dataclass
class Scoreboard:
    """Checks packets as they come out; :meth:`final_check` accounts for every one sent."""

    n_ports: int
    sent: dict[tuple[int, int], Sent] = field(default_factory=dict)
    received: dict[tuple[int, int], Received] = field(default_factory=dict)
    last_seq: dict[tuple[int, int], int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    next_seq: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.next_seq = [0] * self.n_ports

    def new(self, src: int, seq: int, dest: int, key: int, data: bytes, cycle: int) -> Sent:
        s = Sent(src, seq, dest, key, data, cycle)
        self.sent[(src, seq)] = s
        return s

    def error(self, text: str) -> None:
        self.errors.append(text)

    def on_frame(self, out: int, frame: AxiStreamFrame, cycle: int) -> None:
        data = bytes(frame.tdata)
        if len(data) < HEADER_BYTES:
            self.error(f"output {out}: runt frame {data.hex()}")
            return
        src, seq = decode_header(data)
        sent = self.sent.get((src, seq))
        if sent is None:
            self.error(f"output {out}: frame from input {src} seq {seq} was never sent")
            return
        if (src, seq) in self.received:
            self.error(f"output {out}: duplicate of input {src} seq {seq}")
            return
        if sent.dest != out:
            self.error(f"misrouted: input {src} seq {seq} for output {sent.dest} came out of {out}")
        if data != sent.data:
            self.error(f"output {out}: input {src} seq {seq} corrupted")
        for name, got, want in (
            ("tid", frame.tid, src),
            ("tdest", frame.tdest, sent.dest),
            ("tuser", frame.tuser, sent.key),
        ):
            values = set(got) if isinstance(got, list) else {got}
            if values != {want}:
                self.error(f"output {out}: input {src} seq {seq} {name} {values} != {want}")
        flow = (src, out)
        if self.last_seq.get(flow, -1) >= seq:
            self.error(f"flow {src}->{out}: seq {seq} after {self.last_seq[flow]} (reordered)")
        self.last_seq[flow] = seq
        self.received[(src, seq)] = Received(src, seq, out, cycle)

    def not_received(self) -> list[Sent]:
        return [s for k, s in self.sent.items() if k not in self.received]

    def final_check(
        self,
        counters: list[dict[str, int]],
        must_deliver: Callable[[Sent], bool] = lambda s: True,
    ) -> None:
        """Every packet delivered or dropped once, as the counters say; raise on any error."""
        missing = self.not_received()
        for p in range(self.n_ports):
            sent = [s for s in self.sent.values() if s.src == p]
            got = [s for s in sent if (s.src, s.seq) in self.received]
            c = counters[p]
            if c["packets"] != len(got):
                self.error(f"input {p}: CNT_PKTS {c['packets']}, delivered {len(got)}")
            if c["drops"] != len(sent) - len(got):
                self.error(
                    f"input {p}: CNT_DROPS {c['drops']}, but {len(sent) - len(got)} of "
                    f"{len(sent)} packets were not delivered"
                )
            flits = sum(-(-len(s.data) // DATA_BYTES) for s in got)
            if c["flits"] != flits:
                self.error(f"input {p}: CNT_FLITS {c['flits']}, delivered {flits} flits")
        lost = [s for s in missing if must_deliver(s)]
        for s in lost[:10]:
            self.error(f"lost: input {s.src} seq {s.seq} -> {s.dest} (sent at cycle {s.cycle})")
        if self.errors:
            raise AssertionError(
                f"{len(self.errors)} scoreboard errors:\n" + "\n".join(self.errors[:40])
            )


class XbarTB:
    """The crossbar under test with its drivers (``dut`` is ``tb_slicefab_xbar``)."""

    def __init__(self, dut: Any, seed: int = 1, period_ns: int = 10) -> None:
        self.dut = dut
        self.n = N_PORTS
        self.rng = random.Random(seed)
        self.period_ns = period_ns
        self.cycle = 0
        d = dut
        self.sources = [
            AxiStreamSource(AxiStreamBus.from_prefix(d, f"s{k:02d}_axis"), d.clk, d.rst)
            for k in range(self.n)
        ]
        self.sinks = [
            AxiStreamSink(AxiStreamBus.from_prefix(d, f"m{k:02d}_axis"), d.clk, d.rst)
            for k in range(self.n)
        ]
        self.axil = AxiLiteMaster(AxiLiteBus.from_prefix(d, "s_axil"), d.clk, d.rst)
        for log in (
            *(s.log for s in self.sources),
            *(s.log for s in self.sinks),
            self.axil.write_if.log,
            self.axil.read_if.log,
        ):
            log.setLevel("WARNING")
        self.sb = Scoreboard(self.n)
        self._receivers: list[cocotb.task.Task[None]] = []

    # -- set-up ---------------------------------------------------------------------------

    async def start(self) -> None:
        Clock(self.dut.clk, self.period_ns, unit="ns").start()
        cocotb.start_soon(self._count_cycles())
        self.dut.rst.value = 1
        await ClockCycles(self.dut.clk, 4)
        self.dut.rst.value = 0
        await RisingEdge(self.dut.clk)
        self._receivers = [cocotb.start_soon(self._receive(o)) for o in range(self.n)]

    async def _count_cycles(self) -> None:
        while True:
            await RisingEdge(self.dut.clk)
            self.cycle += 1

    async def _receive(self, out: int) -> None:
        sink = self.sinks[out]
        while True:
            frame = await sink.recv()
            self.sb.on_frame(out, frame, self.cycle)

    def set_idle(self, busy_fraction: float) -> None:
        """Sources pause in about ``busy_fraction`` of the cycles (mid-packet too)."""
        for s in self.sources:
            s.set_pause_generator(
                pause_generator(self.rng, busy_fraction) if busy_fraction else None
            )

    def set_backpressure(self, busy_fraction: float) -> None:
        """Sinks drop tready in about ``busy_fraction`` of the cycles."""
        for s in self.sinks:
            s.set_pause_generator(
                pause_generator(self.rng, busy_fraction) if busy_fraction else None
            )

    # -- registers ------------------------------------------------------------------------

    async def read(self, addr: int) -> int:
        resp = await self.axil.read(addr, 4)
        if resp.resp != AxiResp.OKAY:
            raise RegisterError("read", addr, resp.resp)
        return int.from_bytes(resp.data, "little")

    async def write(self, addr: int, value: int) -> None:
        resp = await self.axil.write(addr, value.to_bytes(4, "little"))
        if resp.resp != AxiResp.OKAY:
            raise RegisterError("write", addr, resp.resp)

    async def configure_port(
        self,
        port: int,
        *,
        perm: int | None = None,
        keys: int | None = None,
        weight: int | None = None,
        rate: int | None = None,
        burst: int | None = None,
        enable: bool | None = None,
    ) -> None:
        """Write the given shadow fields of ``port`` (not committed)."""
        if perm is not None:
            await self.write(rm.port_reg(port, rm.PORT_PERM_LO_OFFSET), perm & 0xFFFFFFFF)
            await self.write(rm.port_reg(port, rm.PORT_PERM_HI_OFFSET), perm >> 32)
        if keys is not None:
            await self.write(rm.port_reg(port, rm.PORT_KEYS_OFFSET), keys)
        if weight is not None:
            await self.write(rm.port_reg(port, rm.PORT_WEIGHT_OFFSET), weight)
        if rate is not None:
            await self.write(rm.port_reg(port, rm.PORT_TB_RATE_OFFSET), rate)
        if burst is not None or enable is not None:
            value = (burst or 0) << rm.PORT_TB_BURST_BURST_LSB
            value |= rm.PORT_TB_BURST_ENABLE_MASK if enable else 0
            await self.write(rm.port_reg(port, rm.PORT_TB_BURST_OFFSET), value)

    async def commit(self, wait: bool = True) -> int:
        """CTRL.commit; with ``wait``, poll GEN until every port adopted. Returns the generation."""
        await self.write(rm.CTRL_OFFSET, rm.CTRL_COMMIT_MASK)
        while True:
            gen = await self.read(rm.GEN_OFFSET)
            committed = gen & rm.GEN_COMMITTED_MASK
            if not wait or (gen & rm.GEN_ADOPTED_MASK) >> rm.GEN_ADOPTED_LSB == committed:
                return committed

    async def open_all(self, keys: int = ALL_KEYS) -> None:
        """Every input may reach every output with every key; commit."""
        for p in range(self.n):
            await self.configure_port(p, perm=(1 << self.n) - 1, keys=keys)
        await self.commit()

    async def counters(self) -> list[dict[str, int]]:
        out = []
        for p in range(self.n):
            out.append(
                {
                    name: await self.read(rm.port_reg(p, off))
                    for name, off in (
                        ("packets", rm.PORT_CNT_PKTS_OFFSET),
                        ("flits", rm.PORT_CNT_FLITS_OFFSET),
                        ("drops", rm.PORT_CNT_DROPS_OFFSET),
                        ("stalls", rm.PORT_CNT_STALLS_OFFSET),
                    )
                }
            )
        return out

    # -- traffic --------------------------------------------------------------------------

    def send(self, src: int, dest: int, flits: int, key: int = 0) -> Sent:
        """Queue a packet at input ``src`` (returns at once; the source sends it in order)."""
        seq = self.sb.next_seq[src]
        self.sb.next_seq[src] += 1
        data = payload(self.rng, src, seq, flits)
        sent = self.sb.new(src, seq, dest, key, data, self.cycle)
        frame = AxiStreamFrame(tdata=data, tid=src, tdest=dest, tuser=key)
        self.sources[src].send_nowait(frame)
        return sent

    def sources_idle(self) -> bool:
        return all(s.empty() and s.idle() for s in self.sources)

    async def drain(self, max_cycles: int = 100_000) -> None:
        """Wait until every source has sent everything and the outputs have gone quiet."""
        start = self.cycle
        while not self.sources_idle():
            await ClockCycles(self.dut.clk, 16)
            if self.cycle - start > max_cycles:
                raise AssertionError(f"sources still busy after {max_cycles} cycles")
        quiet = 0
        seen = len(self.sb.received)
        while quiet < 4:
            await ClockCycles(self.dut.clk, 16)
            quiet = quiet + 1 if len(self.sb.received) == seen else 0
            seen = len(self.sb.received)
            if self.cycle - start > max_cycles:
                raise AssertionError(f"outputs still busy after {max_cycles} cycles")

    async def check(self, must_deliver: Callable[[Sent], bool] = lambda s: True) -> None:
        self.sb.final_check(await self.counters(), must_deliver)
