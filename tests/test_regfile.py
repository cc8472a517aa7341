"""The crossbar's register file outlives the firmware: a persistent crossbar powers up with
the registers it had, a commit is atomic against a crash, and the driver's first sync after
a restart puts a shadow that was written but never committed into service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from abi import regmap as rm
from firmware import failpoints
from firmware.errors import FabricError
from firmware.fabric import image as img
from firmware.fabric.driver import FabricDriver
from firmware.fabric.model import PortConfig
from firmware.fabric.regfile import PersistentCrossbar, RegisterFile
from firmware.inventory import load_device
from firmware.manager import StateDir, open_manager
from firmware.slices import SliceSpec


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    failpoints.disarm()
    yield
    failpoints.disarm()


def _running(xb: PersistentCrossbar, port: int) -> PortConfig:
    return xb.active_config(port)


def _decoded(image: dict[int, int], port: int) -> PortConfig:
    return PortConfig.from_registers({off: image[rm.port_reg(port, off)]
                                      for off in img.SHADOW_OFFSETS})


def test_registers_survive_a_restart_of_the_process(tmp_path: Path) -> None:
    path = tmp_path / "crossbar.regs"
    xb = PersistentCrossbar(path, 4, 4, 8)
    xb.write(rm.port_reg(1, rm.PORT_PERM_LO_OFFSET), 0b0110)
    xb.write(rm.port_reg(1, rm.PORT_KEYS_OFFSET), 0b1)
    xb.write(rm.CTRL_OFFSET, rm.CTRL_COMMIT_MASK)
    xb.write(rm.port_reg(2, rm.PORT_WEIGHT_OFFSET), 9)  # shadow only, never committed
    committed_perm = _running(xb, 1).permitted_outputs
    xb.close()
    again = PersistentCrossbar(path, 4, 4, 8)  # what the next firmware process finds
    assert again.read(rm.GEN_OFFSET) & rm.GEN_COMMITTED_MASK == 1
    assert again.read(rm.port_reg(2, rm.PORT_WEIGHT_OFFSET)) == 9  # the shadow was kept
    assert _running(again, 2).weight == 1  # ... but port 2 runs what was committed
    assert _running(again, 1).permitted_outputs == committed_perm == 0b0110
    # the datapath works on the restored configuration
    again.send(1, 2, b"x" * 8, key=0)
    again.run_until_idle(100)
    assert [p.payload for p in again.delivered(2)] == [b"x" * 8]
    again.close()


def test_a_crash_inside_a_commit_leaves_the_previous_generation(tmp_path: Path) -> None:
    """The bank of the next generation is filled before the generation word is stored:
    a crash in between (simulated by filling the bank alone) changes nothing in force."""
    path = tmp_path / "crossbar.regs"
    xb = PersistentCrossbar(path, 2, 2, 8)
    xb.write(rm.port_reg(0, rm.PORT_PERM_LO_OFFSET), 0b11)
    xb.write(rm.CTRL_OFFSET, rm.CTRL_COMMIT_MASK)  # generation 1
    xb.write(rm.port_reg(0, rm.PORT_PERM_LO_OFFSET), 0b10)
    before = xb.regfile.committed_image()
    new = xb.image()
    regs = RegisterFile(path, 2, 2, 8)
    for addr, value in new.items():  # the first half of store_commit(2) ...
        where = regs.decode(addr)
        assert where is not None
        regs._w[regs._bank_index(0, *where)] = value
    regs.close()  # ... and the process dies before the generation word
    again = PersistentCrossbar(path, 2, 2, 8)
    assert again.regfile.generation == 1 and again.regfile.committed_image() == before
    assert _running(again, 0).permitted_outputs == 0b11
    again.close()


@pytest.mark.parametrize(
    ("field", "args"), [("n_ports", (8, 2, 8)), ("n_keys", (4, 2, 8)), ("size", (4, 4, 8))]
)
def test_a_register_file_of_another_crossbar_is_refused(
    tmp_path: Path, field: str, args: tuple[int, int, int]
) -> None:
    path = tmp_path / "crossbar.regs"
    PersistentCrossbar(path, 4, 4, 8).close()
    if field == "size":
        with open(path, "ab") as f:
            f.write(b"\0" * 4)
    with pytest.raises(FabricError) as e:
        RegisterFile(path, *args)
    assert e.value.details["field"] == field and str(path) in e.value.message


def test_first_sync_after_a_restart_commits_a_shadow_never_put_in_service(
    tmp_path: Path,
) -> None:
    """Killed between the shadow writes and CTRL.commit: the restarted driver finds the
    shadow equal to its target, writes nothing, and must still commit."""
    device = load_device(None)
    path = tmp_path / "crossbar.regs"
    drv = FabricDriver.with_model(device, path)
    a = SliceSpec.from_dict({"owner": "vm-a", "memory": {"size": "64MiB"}})
    from firmware.allocator import Allocator

    alloc = Allocator(device)
    alloc.allocate(a)
    demand = alloc.port_demand()
    target = drv.target(demand)
    for addr, value in sorted(target.items()):  # the shadow writes, then the "crash"
        if drv.image.get(addr) != value:
            drv.bus.write(addr, value)
    assert isinstance(drv.bus, PersistentCrossbar)
    drv.bus.close()
    drv2 = FabricDriver.with_model(device, path)
    assert drv2.read_image() == target  # the shadow already holds the image
    bus = drv2.bus
    assert isinstance(bus, PersistentCrossbar)
    port = next(p for p in range(device.crossbar.ports) if target[rm.port_reg(p, 0)])
    assert _running(bus, port) != _decoded(target, port)  # but the ports do not run it
    assert drv2.sync(demand) == 1  # no register differs: the commit alone
    assert _running(bus, port) == _decoded(target, port)
    assert bus.regfile.committed_image() == target
    assert drv2.sync(demand) == 0  # from then on, nothing to do is nothing done


def test_a_failed_sync_commits_at_the_next_one_even_if_the_shadow_is_right(
    tmp_path: Path,
) -> None:
    state = StateDir(tmp_path / "state")
    m = open_manager(state)
    try:
        failpoints.arm("fabric.after_writes=error")
        spec = SliceSpec.from_dict({"owner": "vm-a", "memory": {"size": "64MiB"}})
        with pytest.raises(FabricError):
            m.allocate(spec)
        m.allocate(spec)
        bus = m.fabric.bus
        assert isinstance(bus, PersistentCrossbar)
        image = m.fabric.read_image()
        for p in range(m.device.crossbar.ports):
            assert _running(bus, p) == _decoded(image, p), p
        assert bus.regfile.committed_image() == image
        assert m.check_invariants() == []
    finally:
        m.close()
        state.unlock()
