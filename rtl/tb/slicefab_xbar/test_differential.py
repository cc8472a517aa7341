"""Differential test: the RTL against the behavioural model, cycle for cycle.

The model (:class:`firmware.fabric.model.CrossbarModel`) runs in lock step with the
simulation: one ``model.step()`` per clock cycle. What enters the RTL enters the model in
the same cycle —

* a packet is ``model.send()``-ed in the cycle its first flit appears at the RTL input
  (sources never pause inside a packet and sinks never stall: the model has neither);
* a shadow register write goes to the model when the test issues it (it acts only at a
  commit, which the AXI4-Lite master orders after it);
* CTRL.commit / CTRL.clear_counters go to the model after the cycle in which the RTL's
  strobe is high (the model's "between cycles" is the RTL's clock edge).

At the end the two must agree on every packet — delivered to which output or dropped, and
the cycles that moved its first and last flit — and on every counter, ACTIVE_GEN, GEN and
STATUS. ``XBAR_DIFF_CYCLES`` sets the length of the random run (default 4000 cycles).
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import cocotb
from cocotb.triggers import ClockCycles, ReadOnly, RisingEdge
from xbar_tb import ALL_KEYS, DATA_BYTES, N_PORTS, Sent, XbarTB, decode_header

from abi import regmap as rm
from firmware.fabric.model import CrossbarModel

Event = tuple[int, int, int, int]  # (src, seq, first cycle, last cycle)


class Lockstep:
    """Steps the model with the RTL clock and records each input's packets' cycles."""

    def __init__(self, tb: XbarTB, model: CrossbarModel) -> None:
        self.tb = tb
        self.model = model
        self.xbar = tb.dut.xbar
        self.queued: list[deque[Sent]] = [deque() for _ in range(N_PORTS)]
        self.current: list[Sent | None] = [None] * N_PORTS  # presented to the model
        self.first: list[int] = [0] * N_PORTS
        self.in_packet = [False] * N_PORTS
        self.events: list[Event] = []
        self.running = True
        self.cycles = 0

    def send(self, src: int, dest: int, flits: int, key: int) -> None:
        self.queued[src].append(self.tb.send(src, dest, flits, key=key))

    async def run(self) -> None:
        model = self.model
        while self.running:
            await RisingEdge(self.tb.dut.clk)
            await ReadOnly()
            valid = int(self.xbar.s_axis_tvalid.value)
            ready = int(self.xbar.s_axis_tready.value)
            last = int(self.xbar.s_axis_tlast.value)
            cycle = model.cycle
            for i in range(N_PORTS):
                if valid >> i & 1 and self.current[i] is None:
                    s = self.queued[i].popleft()
                    self.current[i] = s
                    model.send(i, s.dest, s.data, s.key)
            model.step(1)
            if int(self.xbar.ctrl_clear_counters.value):
                model.write(rm.CTRL_OFFSET, rm.CTRL_CLEAR_COUNTERS_MASK)
            if int(self.xbar.ctrl_commit.value):
                model.write(rm.CTRL_OFFSET, rm.CTRL_COMMIT_MASK)
            for i in range(N_PORTS):
                if not (valid >> i & 1 and ready >> i & 1):
                    continue
                if not self.in_packet[i]:
                    self.first[i] = cycle
                    self.in_packet[i] = True
                if last >> i & 1:
                    done = self.current[i]
                    assert done is not None
                    self.events.append((i, done.seq, self.first[i], cycle))
                    self.current[i] = None
                    self.in_packet[i] = False
            self.cycles += 1


@cocotb.test()
async def test_rtl_matches_model(dut: Any) -> None:
    tb = XbarTB(dut, seed=21)
    await tb.start()
    model = CrossbarModel(N_PORTS, data_bytes=DATA_BYTES)
    ls = Lockstep(tb, model)
    cocotb.start_soon(ls.run())
    rng = tb.rng
    length = int(os.environ.get("XBAR_DIFF_CYCLES", "4000"))

    async def write(addr: int, value: int) -> None:
        model.write(addr, value)  # shadow: acts at the commit only
        await tb.write(addr, value)

    async def commit_or_clear(mask: int) -> None:
        await tb.write(rm.CTRL_OFFSET, mask)  # the lock step hands it to the model

    async def random_port_config(p: int) -> None:
        full = (1 << N_PORTS) - 1
        await write(
            rm.port_reg(p, rm.PORT_PERM_LO_OFFSET),
            rng.choice([full, full, rng.getrandbits(N_PORTS)]),
        )
        await write(rm.port_reg(p, rm.PORT_KEYS_OFFSET), rng.choice([ALL_KEYS, 0x00FF, 0x0001]))
        await write(rm.port_reg(p, rm.PORT_WEIGHT_OFFSET), rng.randint(0, 6))
        await write(rm.port_reg(p, rm.PORT_TB_RATE_OFFSET), rng.randint(1 << 15, 10 << 16))
        burst = rng.randint(DATA_BYTES, 6 * DATA_BYTES)
        enable = rm.PORT_TB_BURST_ENABLE_MASK if rng.random() < 0.5 else 0
        await write(rm.port_reg(p, rm.PORT_TB_BURST_OFFSET), burst | enable)

    async def traffic() -> None:
        while ls.cycles < length:
            for src in range(N_PORTS):
                if tb.sources[src].count() < 2 and rng.random() < 0.6:
                    dest = rng.randrange(N_PORTS) if rng.random() < 0.9 else rng.randrange(64)
                    key = 0 if rng.random() < 0.8 else rng.randrange(16)
                    ls.send(src, dest, rng.choice([1, 1, 2, 3, 5]), key)
            await ClockCycles(dut.clk, rng.randint(1, 4))

    gen = cocotb.start_soon(traffic())
    commits = 0
    while ls.cycles < length:
        for p in rng.sample(range(N_PORTS), rng.randint(1, N_PORTS)):
            await random_port_config(p)
        if rng.random() < 0.1:
            await commit_or_clear(rm.CTRL_CLEAR_COUNTERS_MASK)
        await commit_or_clear(rm.CTRL_COMMIT_MASK)
        commits += 1
        await ClockCycles(dut.clk, rng.randint(0, 40))
    await gen
    # let everything out under an open, unlimited configuration
    for p in range(N_PORTS):
        await write(rm.port_reg(p, rm.PORT_PERM_LO_OFFSET), (1 << N_PORTS) - 1)
        await write(rm.port_reg(p, rm.PORT_KEYS_OFFSET), ALL_KEYS)
        await write(rm.port_reg(p, rm.PORT_TB_BURST_OFFSET), 0)
    await commit_or_clear(rm.CTRL_COMMIT_MASK)
    await tb.drain()
    ls.running = False
    await ClockCycles(dut.clk, 2)
    assert model.idle, "the model still holds packets the RTL has sent"

    # every packet: delivered where and when, or dropped when
    rtl_by_key = {(src, seq): (first, last) for src, seq, first, last in ls.events}
    mismatches: list[str] = []
    for out in range(N_PORTS):
        want = [
            (p.src, decode_header(p.payload)[1], p.first_cycle, p.last_cycle)
            for p in model.delivered(out)
        ]
        got = sorted(
            (
                (r.src, r.seq, *rtl_by_key[(r.src, r.seq)])
                for r in tb.sb.received.values()
                if r.out == out
            ),
            key=lambda e: e[2],
        )
        if got != want:
            diff = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
            mismatches.append(
                f"output {out}: #{diff} rtl {got[diff : diff + 3]} model {want[diff : diff + 3]}"
            )
    for src in range(N_PORTS):
        want = [
            (src, decode_header(p.payload)[1], p.first_cycle, p.last_cycle)
            for p in model.dropped(src)
        ]
        got = sorted(
            (e for e in ls.events if e[0] == src and (e[0], e[1]) not in tb.sb.received),
            key=lambda e: e[2],
        )
        if got != want:
            mismatches.append(f"input {src} drops: rtl {got[:4]} model {want[:4]}")
    assert not mismatches, "\n".join(mismatches)

    # every register but CTRL reads the same
    for addr in [rm.GEN_OFFSET, rm.STATUS_OFFSET, rm.CAPS_OFFSET]:
        assert await tb.read(addr) == model.read(addr), hex(addr)
    for p in range(N_PORTS):
        for off in rm.PORT_REGISTERS:
            addr = rm.port_reg(p, off)
            assert await tb.read(addr) == model.read(addr), f"port[{p}].{rm.PORT_REGISTERS[off]}"
    assert not tb.sb.errors, tb.sb.errors[:10]
    delivered = len(tb.sb.received)
    cocotb.log.info(
        "differential: %d cycles, %d commits, %d packets (%d delivered, %d dropped) identical",
        ls.cycles,
        commits,
        len(ls.events),
        delivered,
        len(ls.events) - delivered,
    )
    assert commits >= 20 and len(ls.events) > 200
