"""Firmware in the loop: the real Resource Allocation Manager programs the Verilog crossbar.

The manager (allocator, SQLite ledger, :class:`~firmware.fabric.driver.FabricDriver`) runs
in a thread given by ``cocotb.task.bridge``; its register bus is
:class:`~firmware.fabric.cocotb_bus.CocotbRegisterBus` on the simulation's AXI4-Lite
master. Meanwhile every input sends packets to random outputs, most of them to ports of
another VM. The scoreboard proves:

* isolation — every delivered packet went between two ports that one VM held together in
  a configuration that was (or may have been) in service while the packet was in the
  crossbar;
* zero loss — VM ``vm-a`` keeps its slice (resized live, bandwidth limited) for the whole
  run: every packet between its ports arrives, intact and in order;
* accounting — every packet is delivered or dropped exactly once, as CNT_PKTS/CNT_DROPS say.

``XBAR_FW_OPS`` sets the number of manager operations (default 14).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cocotb
from cocotb.task import bridge
from cocotb.triggers import ClockCycles
from xbar_tb import DATA_WIDTH, N_PORTS, Sent, XbarTB

from firmware.fabric.cocotb_bus import CocotbRegisterBus
from firmware.fabric.driver import FabricDriver
from firmware.inventory import default_device_path, load_device
from firmware.manager import StateDir, open_manager
from firmware.slices import QoS, ResizeSpec, SliceSpec


def device_file(directory: Path) -> Path:
    """The default device, cut down to this crossbar (ports, flit width, line rate)."""
    line_gbps = DATA_WIDTH * 250 // 1000
    text = default_device_path().read_text(encoding="utf-8")
    for old, new in (
        ("ports = 16", f"ports = {N_PORTS}"),
        ("data_width_bits = 512", f"data_width_bits = {DATA_WIDTH}"),
        ('port_bandwidth = "100 Gbit/s"', f'port_bandwidth = "{line_gbps} Gbit/s"'),
    ):
        assert old in text, old
        text = text.replace(old, new)
    path = directory / "device.toml"
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class Epoch:
    """Port ownership from ``start`` (the cycle its operation began) to ``end`` (the cycle
    the next operation's commit was adopted by every port; None: until the end)."""

    start: int
    owners: tuple[str | None, ...]
    end: int | None = None


@cocotb.test()
async def test_allocator_programs_rtl_under_traffic(dut: Any) -> None:
    assert N_PORTS >= 4, "the scenario needs 4 ports"
    tb = XbarTB(dut, seed=7)
    await tb.start()
    tb.set_idle(0.1)
    tb.set_backpressure(0.1)
    rng = tb.rng
    bus = CocotbRegisterBus(tb.axil)
    tmp = Path(tempfile.mkdtemp(prefix="slicefab-fw-"))
    dev_path = device_file(tmp)
    ops_wanted = int(os.environ.get("XBAR_FW_OPS", "14"))
    owners: list[str | None] = [None] * N_PORTS
    keys = [0] * N_PORTS
    epochs = [Epoch(0, tuple(owners))]
    done = False
    log: list[str] = []

    def firmware() -> None:
        device = load_device(dev_path)
        driver = FabricDriver(device, bus, backend="cocotb")
        manager = open_manager(StateDir(tmp / "state"), dev_path, fabric=driver)
        live: dict[str, int] = {}

        def publish(start: int) -> None:
            """After an operation (its commit adopted): the new ownership epoch."""
            new = [None] * N_PORTS
            for s in manager.list_slices():
                for p in s["alloc"]["ports"]:
                    new[p] = s["owner"]
                    keys[p] = s["alloc"]["key"]
            owners[:] = new
            epochs[-1].end = tb.cycle
            epochs.append(Epoch(start, tuple(new)))
            problems = manager.check_invariants()
            assert not problems, problems

        try:
            start = tb.cycle
            a = manager.allocate(
                SliceSpec(owner="vm-a", ports=2, qos=QoS(priority=2, max_mbps=6000))
            )
            publish(start)
            for i in range(ops_wanted):
                start = tb.cycle
                others = [vm for vm in live if vm != "vm-a"]
                choice = rng.random()
                if choice < 0.3:
                    qos = QoS(rng.randint(0, 7), rng.randint(0, 2000), rng.randint(3000, 12000))
                    manager.resize(a["id"], ResizeSpec(qos=qos))
                    log.append(f"resize vm-a {qos}")
                elif others and (choice < 0.6 or len(live) >= N_PORTS - 2):
                    vm = rng.choice(others)
                    manager.free(live.pop(vm))
                    log.append(f"free {vm}")
                else:
                    vm = f"vm-{'bcdefgh'[i % 7]}{i}"
                    s = manager.allocate(SliceSpec(owner=vm, ports=1))
                    live[vm] = s["id"]
                    log.append(f"allocate {vm} port {s['alloc']['ports']}")
                publish(start)
        finally:
            manager.close()

    async def traffic() -> None:
        while not done:
            for src in range(N_PORTS):
                if tb.sources[src].count() < 3:
                    dest = rng.randrange(N_PORTS)
                    tb.send(src, dest, rng.choice([1, 2, 3, 4]), key=keys[src])
            await ClockCycles(dut.clk, 3)

    task = cocotb.start_soon(traffic())
    await ClockCycles(dut.clk, 50)
    await bridge(firmware)()
    await ClockCycles(dut.clk, 200)
    done = True
    await task
    await tb.drain()
    assert bus.writes > 0 and len(epochs) == ops_wanted + 2, (bus.writes, len(epochs))

    def epochs_during(first: int, last: int | None) -> list[Epoch]:
        return [
            e
            for e in epochs
            if (e.end is None or e.end >= first) and (last is None or e.start <= last)
        ]

    # isolation: a delivered packet's two ports shared a VM in an epoch it overlapped
    breaches = []
    for (src, seq), r in tb.sb.received.items():
        sent = tb.sb.sent[(src, seq)]
        if not any(
            e.owners[src] is not None and e.owners[src] == e.owners[r.out]
            for e in epochs_during(sent.cycle, r.cycle)
        ):
            breaches.append(
                f"input {src} seq {seq} -> output {r.out} (cycles {sent.cycle}..{r.cycle})"
            )
    assert not breaches, "isolation breached:\n" + "\n".join(breaches[:20]) + "\n" + "\n".join(log)

    # zero loss for vm-a, which held its ports from its allocation to the end
    vm_a_ports = {p for p, o in enumerate(epochs[-1].owners) if o == "vm-a"}
    since = epochs[1].start

    def must_deliver(s: Sent) -> bool:
        return (
            s.cycle > epochs[1].start
            and s.src in vm_a_ports
            and s.dest in vm_a_ports
            and s.key == keys[s.src]
            and all(e.owners[s.src] == "vm-a" for e in epochs_during(s.cycle, None))
        )

    stable = [s for s in tb.sb.sent.values() if must_deliver(s)]
    assert len(stable) > 50, (len(stable), since)
    await tb.check(must_deliver)
    dropped = len(tb.sb.sent) - len(tb.sb.received)
    assert dropped > 0, "no cross-VM packet was sent: the isolation check proved nothing"
    cocotb.log.info(
        "firmware in the loop: %d operations, %d register writes, %d reads; %d packets "
        "delivered (%d between vm-a's ports), %d dropped",
        ops_wanted + 1,
        bus.writes,
        bus.reads,
        len(tb.sb.received),
        len(stable),
        dropped,
    )
