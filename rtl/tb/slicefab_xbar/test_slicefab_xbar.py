"""cocotb tests of the crossbar's datapath and register port (run from tests/test_rtl.py).

Every test checks with the scoreboard of :mod:`xbar_tb` (content, destination, sideband,
duplicates, order per flow, every packet delivered or dropped as the counters say).
``XBAR_COMMITS`` sets the number of random commits of the commit-under-load test.
"""

from __future__ import annotations

import os
import random
from typing import Any

import cocotb
from cocotb.triggers import ClockCycles
from xbar_tb import ALL_KEYS, DATA_BYTES, N_PORTS, RegisterError, XbarTB

from abi import regmap as rm
from firmware.errors import FabricError
from firmware.fabric.model import CrossbarModel


@cocotb.test()
async def test_registers_match_model(dut: Any) -> None:
    """Random register accesses: the RTL answers (value or SLVERR) exactly as the model."""
    tb = XbarTB(dut, seed=11)
    await tb.start()
    model = CrossbarModel(N_PORTS, data_bytes=DATA_BYTES)
    rng = random.Random(5)
    assert await tb.read(rm.ID_OFFSET) == rm.ID_VALUE
    assert await tb.read(rm.VERSION_OFFSET) == rm.VERSION_VALUE
    caps = await tb.read(rm.CAPS_OFFSET)
    assert caps == model.read(rm.CAPS_OFFSET), hex(caps)
    offsets = [*rm.PORT_REGISTERS, 0x1C, 0x30]
    mismatches: list[str] = []
    for i in range(400):
        kind = rng.random()
        if kind < 0.15:
            addr = rng.choice([*rm.GLOBAL_REGISTERS, 0x18, 0x40, 0xFC])
        else:
            port = rng.randrange(min(rm.MAX_PORTS, N_PORTS + 2))
            addr = rm.PORT_BASE + port * rm.PORT_STRIDE + rng.choice(offsets)
        write = rng.random() < 0.5
        if write:
            if addr == rm.CTRL_OFFSET:
                value = rng.choice([rm.CTRL_COMMIT_MASK, rm.CTRL_CLEAR_COUNTERS_MASK, 0])
            else:
                value = rng.choice(
                    [rng.getrandbits(32), rng.getrandbits(N_PORTS), 1 << rng.randrange(32), 0]
                )
            try:
                model.write(addr, value)
                want = "ok"
            except FabricError:
                want = "error"
            try:
                await tb.write(addr, value)
                got = "ok"
            except RegisterError:
                got = "error"
        else:
            try:
                want = f"{model.read(addr):#x}"
            except FabricError:
                want = "error"
            try:
                got = f"{await tb.read(addr):#x}"
            except RegisterError:
                got = "error"
        if got != want:
            mismatches.append(
                f"#{i} {'write' if write else 'read'} {addr:#06x}: rtl {got}, model {want}"
            )
    assert not mismatches, "\n".join(mismatches[:20])
    # and the whole shadow image agrees
    for addr, value in model.image().items():
        assert await tb.read(addr) == value, hex(addr)


@cocotb.test()
async def test_routing_with_idle_and_backpressure(dut: Any) -> None:
    """All-to-all random traffic, random lengths and keys, idle sources, stalling sinks."""
    tb = XbarTB(dut, seed=2)
    await tb.start()
    await tb.open_all()
    tb.set_idle(0.2)
    tb.set_backpressure(0.3)
    for _ in range(60 * N_PORTS):
        src = tb.rng.randrange(N_PORTS)
        tb.send(
            src, tb.rng.randrange(N_PORTS), tb.rng.choice([1, 1, 2, 3, 8]), key=tb.rng.randrange(16)
        )
    await tb.drain()
    await tb.check()
    assert len(tb.sb.received) == 60 * N_PORTS


@cocotb.test()
async def test_forbidden_packets_dropped_whole(dut: Any) -> None:
    """Forbidden outputs, forbidden keys, outputs and keys beyond the instance: dropped
    whole and counted; everything permitted arrives intact around them."""
    tb = XbarTB(dut, seed=3)
    await tb.start()
    allowed = [tb.rng.getrandbits(N_PORTS) | 1 << p for p in range(N_PORTS)]
    keys = [0b1010_0101_0000_0011 for _ in range(N_PORTS)]
    for p in range(N_PORTS):
        await tb.configure_port(p, perm=allowed[p], keys=keys[p])
    await tb.commit()
    tb.set_backpressure(0.2)

    def permitted(src: int, dest: int, key: int) -> bool:
        return dest < N_PORTS and bool(allowed[src] >> dest & 1) and bool(keys[src] >> key & 1)

    for _ in range(80 * N_PORTS):
        src = tb.rng.randrange(N_PORTS)
        dest = tb.rng.randrange(N_PORTS + 2) if tb.rng.random() < 0.9 else 63
        tb.send(src, dest, tb.rng.choice([1, 2, 5]), key=tb.rng.randrange(16))
    await tb.drain()
    # exactly the permitted packets arrive
    for s in tb.sb.sent.values():
        got = (s.src, s.seq) in tb.sb.received
        assert got == permitted(s.src, s.dest, s.key), (s.src, s.seq, s.dest, s.key, got)
    await tb.check(lambda s: permitted(s.src, s.dest, s.key))
    assert sum(c["drops"] for c in await tb.counters()) > 0


async def _backlog(tb: XbarTB, src: int, dest: int, flits: int, count: int) -> None:
    for _ in range(count):
        tb.send(src, dest, flits)


@cocotb.test()
async def test_wrr_shares_follow_weights(dut: Any) -> None:
    """Every input backlogged towards output 0: packets delivered in the ratio of the weights
    (exactly, once the first round has passed), one flit per cycle on the output."""
    tb = XbarTB(dut, seed=4)
    await tb.start()
    weights = [1 + 2 * p for p in range(N_PORTS)]
    for p in range(N_PORTS):
        await tb.configure_port(p, perm=1, keys=ALL_KEYS, weight=weights[p])
    await tb.commit()
    rounds = 12
    per_round = sum(weights)
    for p in range(N_PORTS):
        await _backlog(tb, p, 0, 2, weights[p] * (rounds + 2))
    # wait for the backlog to build everywhere, then count a window of whole rounds
    await ClockCycles(dut.clk, 50)
    start = len(tb.sb.received)
    while len(tb.sb.received) < start + rounds * per_round + 1:
        await ClockCycles(dut.clk, 20)
    order = sorted(tb.sb.received.values(), key=lambda r: (r.cycle, r.src))
    window = order[start : start + rounds * per_round]
    counts = [sum(1 for r in window if r.src == p) for p in range(N_PORTS)]
    for p in range(N_PORTS):
        share = counts[p] / len(window)
        want = weights[p] / per_round
        assert abs(share - want) <= 0.02, (counts, weights)
    # no dead cycle between packets: 2-flit packets back to back on the output
    span = window[-1].cycle - window[0].cycle
    assert span <= 2 * (len(window) - 1) + 2, (span, len(window))
    await tb.drain()
    await tb.check()


@cocotb.test()
async def test_token_bucket_rate_and_burst(dut: Any) -> None:
    """Input 0 limited to 2.75 bytes/cycle with a 40-byte bucket: long-run rate within 1 %,
    never more than the bucket in any window; input 1 unlimited alongside."""
    tb = XbarTB(dut, seed=5)
    await tb.start()
    rate = int(2.75 * (1 << 16))
    burst = 40
    await tb.open_all()
    await tb.configure_port(0, rate=rate, burst=burst, enable=True)
    await tb.commit()
    n = 240
    for _ in range(n):
        tb.send(0, 1, 1)
    if N_PORTS > 2:
        for _ in range(n):
            tb.send(1, 2, 1)
    await tb.drain()
    await tb.check()
    arrivals = sorted(
        (r.cycle, len(tb.sb.sent[(r.src, r.seq)].data))
        for r in tb.sb.received.values()
        if r.src == 0
    )
    # sustained rate over the last two thirds (the initial bucket long spent), to within
    # one flit's worth of bytes over the window
    h = len(arrivals) // 3
    total = sum(b for _, b in arrivals[h + 1 :])
    span = arrivals[-1][0] - arrivals[h][0]
    measured = total / span
    assert abs(measured - 2.75) / 2.75 <= 0.01 + DATA_BYTES / total, measured
    # bytes in any window [i, j] <= burst + rate * (cycles in the window)
    worst = 0.0
    for i in range(len(arrivals)):
        acc = 0
        for j in range(i, len(arrivals)):
            acc += arrivals[j][1]
            allowed = burst + 2.75 * (arrivals[j][0] - arrivals[i][0])
            worst = max(worst, acc - allowed)
    assert worst <= 0, worst
    stalls = (await tb.counters())[0]["stalls"]
    assert stalls > 0


@cocotb.test()
async def test_commit_under_load(dut: Any) -> None:
    """Random commits while every input sends, with idle sources and stalling sinks.

    Stable flows (permitted in every configuration) must lose nothing; the others are
    delivered or dropped, each exactly once, as CNT_DROPS says. Weights, token buckets and
    keys change at random too. ``XBAR_COMMITS`` commits (default 60)."""
    tb = XbarTB(dut, seed=6)
    await tb.start()
    rng = tb.rng
    commits = int(os.environ.get("XBAR_COMMITS", "60"))
    full = (1 << N_PORTS) - 1
    stable = [1 << p | 1 << ((p + 1) % N_PORTS) for p in range(N_PORTS)]
    for p in range(N_PORTS):
        await tb.configure_port(p, perm=full, keys=ALL_KEYS)
    await tb.commit()
    tb.set_idle(0.1)
    tb.set_backpressure(0.1)
    done = False

    async def traffic() -> None:
        while not done:
            for src in range(N_PORTS):
                if tb.sources[src].count() < 4:
                    dest = rng.randrange(N_PORTS)
                    tb.send(src, dest, rng.choice([1, 2, 4, 7]), key=rng.choice([0, 1]))
            await ClockCycles(dut.clk, 2)

    task = cocotb.start_soon(traffic())
    generations = set()
    for _ in range(commits):
        for p in rng.sample(range(N_PORTS), rng.randint(1, N_PORTS)):
            await tb.configure_port(
                p,
                perm=stable[p] | rng.getrandbits(N_PORTS),
                keys=1 | rng.getrandbits(2) << 1,
                weight=rng.randint(0, 5),
                rate=rng.randint(2 << 16, 12 << 16),
                burst=rng.randint(2 * DATA_BYTES, 8 * DATA_BYTES),
                enable=rng.random() < 0.5,
            )
        generations.add(await tb.commit(wait=rng.random() < 0.5))
        await ClockCycles(dut.clk, rng.randint(0, 30))
    done = True
    await task
    # a last configuration lets everything through, so nothing waits forever
    for p in range(N_PORTS):
        await tb.configure_port(p, perm=full, keys=ALL_KEYS, enable=False)
    await tb.commit()
    await tb.drain()
    assert len(generations) == commits
    await tb.check(lambda s: bool(stable[s.src] >> s.dest & 1) and s.key == 0)
    status = await tb.read(rm.STATUS_OFFSET)
    assert status == 0
    for p in range(N_PORTS):
        gen = await tb.read(rm.port_reg(p, rm.PORT_ACTIVE_GEN_OFFSET))
        assert gen == commits + 2, (p, gen)
