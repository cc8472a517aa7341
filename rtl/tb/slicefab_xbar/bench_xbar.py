"""Benchmarks of the crossbar (issue 4), run by ``slicefab bench rtl`` (firmware/bench_rtl.py).

Each cocotb test measures one family of figures and appends them, as JSON lines, to the
file named by ``XBAR_BENCH_OUT``; every packet still goes through the scoreboard, so a
figure is only reported for traffic that arrived intact. ``XBAR_BENCH_QUICK=1`` shortens
the runs; ``XBAR_BENCH_COMMITS`` sets the number of random commits under load.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import cocotb
from cocotb.triggers import ClockCycles, ReadOnly, RisingEdge
from xbar_tb import ALL_KEYS, DATA_BYTES, N_PORTS, XbarTB

from abi import regmap as rm
from firmware.fabric.model import CrossbarModel

QUICK = os.environ.get("XBAR_BENCH_QUICK", "0") == "1"
WINDOW = 600 if QUICK else 3000
#: saturation throughput of N x N input-queued switches with FIFO inputs under uniform
#: single-cell traffic (Karol, Hluchyj, Morgan 1987, table I): the head-of-line bound
HOL_BOUND = {1: 1.0, 2: 0.75, 3: 0.6825, 4: 0.6553, 5: 0.6399, 6: 0.6302, 7: 0.6234, 8: 0.6184}


def report(**figures: Any) -> None:
    path = os.environ.get("XBAR_BENCH_OUT")
    line = json.dumps(figures)
    cocotb.log.info("bench: %s", line)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class FlitCounter:
    """Counts, per cycle, the flits each output and each input moves (one signal read each)."""

    def __init__(self, tb: XbarTB) -> None:
        self.tb = tb
        self.x = tb.dut.xbar
        self.out = [0] * N_PORTS
        self.inp = [0] * N_PORTS
        self.cycles = 0
        self.counting = False

    async def run(self) -> None:
        while True:
            await RisingEdge(self.tb.dut.clk)
            await ReadOnly()
            mv = int(self.x.m_axis_tvalid.value) & int(self.x.m_axis_tready.value)
            sv = int(self.x.s_axis_tvalid.value) & int(self.x.s_axis_tready.value)
            if self.counting:
                self.cycles += 1
                for i in range(N_PORTS):
                    self.out[i] += mv >> i & 1
                    self.inp[i] += sv >> i & 1

    def start(self) -> None:
        self.out = [0] * N_PORTS
        self.inp = [0] * N_PORTS
        self.cycles = 0
        self.counting = True

    def stop(self) -> None:
        self.counting = False


async def keep_full(tb: XbarTB, dest_of: Any, flits: int, depth: int = 3) -> None:
    """Keep every input's source queue ``depth`` packets deep (100 % offered load)."""
    while True:
        for src in range(N_PORTS):
            while tb.sources[src].count() < depth:
                tb.send(src, dest_of(src), flits)
        await RisingEdge(tb.dut.clk)


async def _setup(dut: Any, seed: int) -> tuple[XbarTB, FlitCounter]:
    tb = XbarTB(dut, seed=seed)
    await tb.start()
    await tb.open_all()
    fc = FlitCounter(tb)
    cocotb.start_soon(fc.run())
    return tb, fc


async def _measure(tb: XbarTB, fc: FlitCounter, cycles: int) -> None:
    await ClockCycles(tb.dut.clk, 60)
    fc.start()
    await ClockCycles(tb.dut.clk, cycles)
    fc.stop()


@cocotb.test()
async def bench_permutation(dut: Any) -> None:
    """Permutation traffic (input i -> output i+1) at 100 % load, packet lengths 1..32."""
    tb, fc = await _setup(dut, 31)
    results = {}
    for length in (1, 2, 4, 8, 32):
        task = cocotb.start_soon(keep_full(tb, lambda s: (s + 1) % N_PORTS, length))
        await _measure(tb, fc, WINDOW)
        task.cancel()
        results[length] = min(fc.out) / fc.cycles
        await tb.drain()
    await tb.check()
    report(family="permutation", throughput=results)


@cocotb.test()
async def bench_uniform(dut: Any) -> None:
    """Uniform random single-flit traffic, saturated inputs; the model in the same run."""
    tb, fc = await _setup(dut, 32)
    rng = random.Random(9)
    task = cocotb.start_soon(keep_full(tb, lambda s: rng.randrange(N_PORTS), 1, depth=2))
    wall = time.perf_counter()
    await _measure(tb, fc, 2 * WINDOW)
    wall = time.perf_counter() - wall
    task.cancel()
    rtl = sum(fc.out) / (N_PORTS * fc.cycles)
    await tb.drain()
    await tb.check()
    report(
        family="uniform",
        rtl=rtl,
        model=_model_uniform(2 * WINDOW),
        hol_bound=HOL_BOUND.get(N_PORTS),
        sim_cycles_per_s=fc.cycles / wall,
    )


def _model_uniform(window: int) -> float:
    """Saturation throughput of the behavioural model, inputs kept 2 packets deep."""
    model = CrossbarModel(N_PORTS, data_bytes=DATA_BYTES)
    for p in range(N_PORTS):
        model.write(rm.port_reg(p, rm.PORT_PERM_LO_OFFSET), (1 << N_PORTS) - 1)
        model.write(rm.port_reg(p, rm.PORT_KEYS_OFFSET), ALL_KEYS)
    model.write(rm.CTRL_OFFSET, rm.CTRL_COMMIT_MASK)
    rng = random.Random(9)
    queued = [0] * N_PORTS
    sent_total = 0
    warm = 60
    delivered_at_warm = 0
    for cycle in range(warm + window):
        for p in range(N_PORTS):
            while queued[p] - _done_at(model, p) < 2:
                model.send(p, rng.randrange(N_PORTS), bytes(DATA_BYTES))
                queued[p] += 1
                sent_total += 1
        if cycle == warm:
            delivered_at_warm = sum(len(model.delivered(o)) for o in range(N_PORTS))
        model.step(1)
    delivered = sum(len(model.delivered(o)) for o in range(N_PORTS)) - delivered_at_warm
    return delivered / (N_PORTS * window)


def _done_at(model: CrossbarModel, src: int) -> int:
    return int(model.read(rm.port_reg(src, rm.PORT_CNT_PKTS_OFFSET)))


@cocotb.test()
async def bench_hotspot(dut: Any) -> None:
    """Every input sends 4-flit packets to output 0: output busy, shares of the inputs."""
    tb, fc = await _setup(dut, 33)
    task = cocotb.start_soon(keep_full(tb, lambda s: 0, 4))
    await _measure(tb, fc, WINDOW)
    task.cancel()
    total = sum(fc.inp)
    await tb.drain()
    await tb.check()
    report(
        family="hotspot",
        output_busy=fc.out[0] / fc.cycles,
        shares=[c / total for c in fc.inp],
    )


@cocotb.test()
async def bench_latency(dut: Any) -> None:
    """Zero load: one packet at a time, head-in (input handshake) to head-out (tvalid)."""
    tb = XbarTB(dut, seed=34)
    await tb.start()
    await tb.open_all()
    x = dut.xbar
    latencies = []
    for k in range(20):
        src, dest = k % N_PORTS, (3 * k + 1) % N_PORTS
        tb.send(src, dest, 1 + k % 3)
        head_in = None
        cycle = 0
        while True:
            await RisingEdge(dut.clk)
            await ReadOnly()
            cycle += 1
            if (
                head_in is None
                and int(x.s_axis_tvalid.value) >> src & 1
                and int(x.s_axis_tready.value) >> src & 1
            ):
                head_in = cycle
            if head_in is not None and int(x.m_axis_tvalid.value) >> dest & 1:
                latencies.append(cycle - head_in)
                break
        await tb.drain()
    await tb.check()
    report(family="latency", max_cycles=max(latencies), min_cycles=min(latencies))


@cocotb.test()
async def bench_reconfiguration(dut: Any) -> None:
    """Permutation traffic of 8- and 32-flit packets on every port; commits that change only
    port 0's configuration: cycles from CTRL.commit to STATUS.pending = 0, and throughput of
    the ports whose configuration did not change."""
    tb, fc = await _setup(dut, 35)
    x = dut.xbar
    results = {}
    for length in (8, 32):
        task = cocotb.start_soon(keep_full(tb, lambda s: (s + 1) % N_PORTS, length))
        await ClockCycles(dut.clk, 60)
        fc.start()
        worst = 0
        commits = 0
        start = fc.cycles
        while fc.cycles - start < WINDOW:
            await tb.configure_port(
                0,
                weight=1 + commits % 7,
                rate=(8 + commits % 3) << 16,
                burst=1 << 12,
                enable=commits % 2 == 1,
            )
            await tb.write(rm.CTRL_OFFSET, rm.CTRL_COMMIT_MASK)
            # from the strobe to the first cycle with nothing pending
            while not int(x.ctrl_commit.value):
                await RisingEdge(dut.clk)
            t0 = fc.cycles
            await RisingEdge(dut.clk)
            await ReadOnly()
            while int(x.status_pending.value):
                await RisingEdge(dut.clk)
                await ReadOnly()
            worst = max(worst, fc.cycles - t0)
            commits += 1
        fc.stop()
        task.cancel()
        unchanged = min(fc.out[o] for o in range(N_PORTS) if o != 1) / fc.cycles
        results[length] = {
            "commits": commits,
            "worst_cycles": worst,
            "unchanged_throughput": unchanged,
        }
        await tb.drain()
    await tb.check()
    report(family="reconfiguration", per_length=results)


@cocotb.test()
async def bench_commits_under_load(dut: Any) -> None:
    """Random commits (every port's permission, keys, weight, bucket) under full random
    load: zero lost, duplicated or misrouted flits (the scoreboard's verdict)."""
    tb, _ = await _setup(dut, 36)
    rng = tb.rng
    commits = int(os.environ.get("XBAR_BENCH_COMMITS", "1000" if QUICK else "10000"))
    full = (1 << N_PORTS) - 1
    stable = [1 << p | 1 << ((p + 1) % N_PORTS) for p in range(N_PORTS)]
    task = cocotb.start_soon(keep_full(tb, lambda s: rng.randrange(N_PORTS), 3, depth=2))
    wall = time.perf_counter()
    start = tb.cycle
    for i in range(commits):
        p = rng.randrange(N_PORTS)
        await tb.write(rm.port_reg(p, rm.PORT_PERM_LO_OFFSET), stable[p] | rng.getrandbits(N_PORTS))
        await tb.write(rm.port_reg(p, rm.PORT_WEIGHT_OFFSET), rng.randint(0, 5))
        if i % 4 == 0:
            await tb.configure_port(
                p,
                rate=rng.randint(2 << 16, 12 << 16),
                burst=8 * DATA_BYTES,
                enable=rng.random() < 0.5,
            )
        await tb.write(rm.CTRL_OFFSET, rm.CTRL_COMMIT_MASK)
    cycles = tb.cycle - start
    wall = time.perf_counter() - wall
    task.cancel()
    for p in range(N_PORTS):
        await tb.configure_port(p, perm=full, keys=ALL_KEYS, enable=False)
    await tb.commit()
    await tb.drain()
    await tb.check(lambda s: bool(stable[s.src] >> s.dest & 1))
    report(
        family="commits",
        commits=commits,
        cycles=cycles,
        packets=len(tb.sb.sent),
        delivered=len(tb.sb.received),
        lost_duplicated_misrouted=len(tb.sb.errors),
        sim_cycles_per_s=cycles / wall,
    )


@cocotb.test()
async def bench_wrr_and_bucket(dut: Any) -> None:
    """WRR shares at saturation against the weights; token-bucket rate and burst."""
    tb, fc = await _setup(dut, 37)
    weights = [1 + (p % 4) for p in range(N_PORTS)]
    for p in range(N_PORTS):
        await tb.configure_port(p, weight=weights[p])
    await tb.commit()
    task = cocotb.start_soon(keep_full(tb, lambda s: 0, 2))
    await _measure(tb, fc, 2 * WINDOW)
    task.cancel()
    total = sum(fc.inp)
    shares = [c / total for c in fc.inp]
    want = [w / sum(weights) for w in weights]
    await tb.drain()
    # token bucket: input 0 at 2.75 bytes/cycle, 5 flits of bucket, to an idle output
    for p in range(N_PORTS):
        await tb.configure_port(p, weight=1)
    rate, burst = 2.75, 5 * DATA_BYTES
    await tb.configure_port(0, rate=int(rate * (1 << 16)), burst=burst, enable=True)
    await tb.commit()
    x = dut.xbar
    task = cocotb.start_soon(keep_full(tb, lambda s: (s + 1) % N_PORTS, 1))
    await ClockCycles(dut.clk, 5)
    moved: list[int] = []  # bytes through input 0 per cycle
    for _ in range(2 * WINDOW):
        await RisingEdge(dut.clk)
        await ReadOnly()
        go = int(x.s_axis_tvalid.value) & int(x.s_axis_tready.value) & 1
        moved.append(
            bin(int(x.s_axis_tkeep.value) & ((1 << (DATA_BYTES)) - 1)).count("1") if go else 0
        )
    task.cancel()
    # long-run rate after the initial bucket, and the worst excess over burst + rate * t
    measured = sum(moved[len(moved) // 4 :]) / (len(moved) - len(moved) // 4)
    excess = 0.0
    low = 0.0  # min over t0 of (bytes before t0 - rate * t0)
    acc = 0.0
    for t, b in enumerate(moved):
        acc += b
        excess = max(excess, acc - rate * (t + 1) - low)
        low = min(low, acc - rate * (t + 1))
    await tb.drain()
    await tb.check()
    report(
        family="qos",
        wrr_shares=shares,
        wrr_weights_share=want,
        wrr_max_error=max(abs(a - b) for a, b in zip(shares, want, strict=True)),
        bucket_rate=measured,
        bucket_rate_set=rate,
        bucket_excess_over_rate_bytes=excess,
        bucket_burst=burst,
    )
