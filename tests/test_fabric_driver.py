"""The fabric driver on the behavioural crossbar: minimal writes, commit, read-back checks."""

from __future__ import annotations

from abi import regmap as rm
from firmware.allocator import Allocator
from firmware.fabric import image as img
from firmware.fabric.driver import FabricDriver
from firmware.fabric.model import CrossbarModel
from firmware.inventory import Device
from firmware.slices import SliceSpec


class CountingBus:
    def __init__(self, model: CrossbarModel) -> None:
        self.model = model
        self.writes: list[tuple[int, int]] = []

    def read(self, addr: int) -> int:
        return self.model.read(addr)

    def write(self, addr: int, value: int) -> None:
        self.writes.append((addr, value))
        self.model.write(addr, value)


def make(device: Device) -> tuple[FabricDriver, CountingBus, CrossbarModel]:
    xb = device.crossbar
    model = CrossbarModel(xb.ports, device.keys, xb.data_bytes)
    bus = CountingBus(model)
    return FabricDriver(device, bus, advance=lambda: model.step(1)), bus, model


def alloc(a: Allocator, owner: str, **kw: object) -> None:
    a.allocate(SliceSpec.from_dict({"owner": owner, "memory": {"size": "2 MiB"}, **kw}))


def test_writes_only_changed_registers_then_commits(device: Device) -> None:
    drv, bus, model = make(device)
    a = Allocator(device)
    # reset image: nothing to write, but the first sync commits (the shadow may hold a
    # configuration a crashed firmware wrote and never committed); then nothing to do
    assert drv.sync(a.port_demand()) == 1 and bus.writes == [(rm.CTRL_OFFSET, rm.CTRL_COMMIT_MASK)]
    assert drv.sync(a.port_demand()) == 0
    bus.writes.clear()
    alloc(a, "vm-a", qos={"priority": 2, "guaranteed": "10G", "maximum": "50G"})
    n = drv.sync(a.port_demand())
    # port 0 only: PERM_LO, WEIGHT, TB_RATE, TB_BURST, KEYS (PERM_HI stays 0), then commit
    assert [addr for addr, _ in bus.writes[:-1]] == sorted(
        rm.port_reg(0, off)
        for off in (
            rm.PORT_PERM_LO_OFFSET,
            rm.PORT_WEIGHT_OFFSET,
            rm.PORT_TB_RATE_OFFSET,
            rm.PORT_TB_BURST_OFFSET,
            rm.PORT_KEYS_OFFSET,
        )
    )
    assert bus.writes[-1] == (rm.CTRL_OFFSET, rm.CTRL_COMMIT_MASK)
    assert n == len(bus.writes) == 6
    assert model.read(rm.GEN_OFFSET) & rm.GEN_COMMITTED_MASK == drv.generation == 2
    bus.writes.clear()
    alloc(a, "vm-a", qos={"priority": 2})  # same port, same priority: only the TB sum changes
    drv.sync(a.port_demand())
    assert {addr for addr, _ in bus.writes[:-1]} <= {
        rm.port_reg(0, rm.PORT_TB_RATE_OFFSET),
        rm.port_reg(0, rm.PORT_TB_BURST_OFFSET),
    }


def test_image_values_follow_the_documented_formulas(device: Device) -> None:
    a = Allocator(device)
    alloc(a, "vm-a", ports=2, key=5, qos={"priority": 7, "guaranteed": "25G", "maximum": "40G"})
    alloc(a, "vm-b", qos={"priority": 0})
    cfg = img.port_configs(device, a.port_demand())
    assert cfg[0].perm == cfg[1].perm == 0b11 and cfg[2].perm == 0b100
    assert cfg[0].weight == 1 + 4 * 7 + 16  # 25/100 of 64
    assert cfg[0].keys == 1 << 5
    # 40 Gbit/s at 250 MHz = 20 bytes/cycle -> 20.0 in 16.16
    assert cfg[0].tb_rate == 20 << 16 and cfg[0].tb_enable
    assert cfg[2].tb_rate == 50 << 16  # no maximum: the port's 100 Gbit/s
    assert cfg[3] == img.PortConfig()  # a port nobody holds keeps its reset values
    assert img.demand_from_slices(device, a.slices.values()) == a.port_demand()


def test_applying_the_write_list_reaches_the_target_image(device: Device) -> None:
    drv, _, model = make(device)
    a = Allocator(device)
    for i in range(6):
        alloc(a, f"vm-{i % 3}", ports=1 + i % 2, qos={"priority": i, "guaranteed": f"{i}G"})
        drv.sync(a.port_demand())
        assert model.image() == {**model.image(), **drv.target(a.port_demand())}
        assert drv.read_image() == drv.target(a.port_demand())
    assert drv.check(a.slices.values()) == []


def test_check_catches_a_tampered_crossbar(device: Device) -> None:
    drv, _, model = make(device)
    a = Allocator(device)
    alloc(a, "vm-a")
    alloc(a, "vm-b")
    drv.sync(a.port_demand())
    # someone lets vm-a's port reach vm-b's port behind the firmware's back
    model.write(rm.port_reg(0, rm.PORT_PERM_LO_OFFSET), 0b11)
    bad = drv.check(a.slices.values())
    assert any("isolation: port 0 (vm-a) may reach port 1 (vm-b)" in v for v in bad)
    assert any("0x0100" in v for v in bad)


def test_restart_reprograms_only_what_differs(device: Device) -> None:
    xb = device.crossbar
    model = CrossbarModel(xb.ports, device.keys, xb.data_bytes)
    a = Allocator(device)
    alloc(a, "vm-a", ports=3)
    FabricDriver(device, model, advance=lambda: model.step(1)).sync(a.port_demand())
    # a firmware restart on a crossbar that kept its configuration writes no register,
    # only the commit that puts the shadow into service
    bus = CountingBus(model)
    again = FabricDriver(device, bus, advance=lambda: model.step(1))
    assert again.sync(a.port_demand()) == 1
    assert bus.writes == [(rm.CTRL_OFFSET, rm.CTRL_COMMIT_MASK)]
    assert again.sync(a.port_demand()) == 0


def test_an_enabled_token_bucket_never_gets_rate_zero() -> None:
    # 1 Mbit/s on a 5 GHz crossbar is 2.5e-5 bytes/cycle: rounds to 0 in 16.16, clamped to 1
    assert img.rate_for(1, 5000) == 2
    assert img.rate_for(0, 5000) == 1
    assert img.burst_for(1, 64) == 128  # and the bucket always holds at least two flits
