"""One reconfiguration, staged for the waveform of docs/rtl.md (``waves.py`` renders it).

Input 0 may reach output 1 only (generation 1). Firmware stages "output 0 only" and
commits while packet A (input 0 → output 1) is in flight; packet B (input 0 → output 0)
follows A back to back. The commit must reach the crossbar while A is in flight, A must
arrive whole at output 1 (it started under generation 1; under generation 2 it would be
dropped) and B at output 0 (under generation 1 it would be dropped), with no drop counted.

``XBAR_WAVES_MARK``: a file to write the simulation time of the commit strobe to, so that
``waves.py`` knows which window of the dump to draw.
"""

from __future__ import annotations

import json
import os
from typing import Any

import cocotb
from cocotb.triggers import ReadOnly, RisingEdge
from cocotb.utils import get_sim_time
from xbar_tb import ALL_KEYS, XbarTB

from abi import regmap as rm

A_FLITS = 10  # long enough for the commit's AXI4-Lite write to land inside it
B_FLITS = 4


@cocotb.test()
async def test_commit_while_packet_in_flight(dut: Any) -> None:
    tb = XbarTB(dut, seed=4)
    await tb.start()
    await tb.configure_port(0, perm=1 << 1, keys=ALL_KEYS)
    await tb.configure_port(1, perm=0b11, keys=ALL_KEYS)
    assert await tb.commit() == 1
    await tb.configure_port(0, perm=1 << 0)  # staged, not committed

    strobes: list[tuple[float, bool]] = []  # (time of the commit strobe, input 0 busy)

    async def watch_commit() -> None:
        while True:
            await RisingEdge(dut.clk)
            await ReadOnly()
            if int(dut.xbar.ctrl_commit.value):
                strobes.append((get_sim_time("ns"), bool(int(dut.xbar.busy.value) & 1)))

    cocotb.start_soon(watch_commit())
    a = tb.send(0, 1, A_FLITS)
    b = tb.send(0, 0, B_FLITS)
    # the first flit of A leaves input 0: commit now (the AXI4-Lite write takes a few cycles)
    while True:
        await RisingEdge(dut.clk)
        if int(dut.s00_axis_tvalid.value) and int(dut.s00_axis_tready.value):
            break
    assert await tb.commit(wait=False) == 2
    while (gen := await tb.read(rm.GEN_OFFSET)) >> rm.GEN_ADOPTED_LSB != 2:
        pass
    assert gen & rm.GEN_COMMITTED_MASK == 2
    await tb.drain()

    assert len(strobes) == 1, f"expected one commit strobe, saw {strobes}"
    strobe_ns, a_in_flight = strobes[0]
    assert a_in_flight, "the commit reached the crossbar after packet A had left input 0"
    delivered = {key: r.out for key, r in tb.sb.received.items()}
    assert delivered == {(0, a.seq): 1, (0, b.seq): 0}, delivered
    await tb.check()
    counters = await tb.counters()
    assert counters[0]["drops"] == 0, counters[0]
    assert await tb.read(rm.port_reg(0, rm.PORT_ACTIVE_GEN_OFFSET)) == 2

    mark = os.environ.get("XBAR_WAVES_MARK")
    if mark:
        with open(mark, "w", encoding="utf-8") as f:
            json.dump({"commit_strobe_ns": strobe_ns, "period_ns": tb.period_ns}, f)
