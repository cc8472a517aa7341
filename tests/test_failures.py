"""The manager under failures: a crossbar that refuses or stalls mid-operation, a ledger that
dies, retries racing their first execution. Each test reproduces a defect found in review
(a freed port handed to another VM before the crossbar confirmed, stale shadow registers
activated by a later commit, retries acknowledged before the first execution finished,
no fail-stop after a ledger failure) and checks it stays fixed."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from abi import regmap as rm
from firmware.errors import FabricError, LedgerError
from firmware.fabric import image as img
from firmware.fabric.driver import FabricDriver
from firmware.fabric.model import CrossbarModel
from firmware.inventory import load_device
from firmware.manager import ResourceManager, StateDir, open_manager
from firmware.slices import ResizeSpec, SliceSpec

DEV = load_device()


class FailpointBus:
    """The behavioural crossbar behind failpoints: ``fail_next_write()`` makes the next
    register write raise; ``stall_next_write()`` blocks it until ``resume()``."""

    def __init__(self) -> None:
        self.model = CrossbarModel(DEV.crossbar.ports, DEV.keys, DEV.crossbar.data_bytes)
        self._fail = False
        self._stall = False
        self.stalled = threading.Event()
        self._resume = threading.Event()

    def fail_next_write(self) -> None:
        self._fail = True

    def stall_next_write(self) -> None:
        self._stall, self._resume = True, threading.Event()
        self.stalled.clear()

    def resume(self) -> None:
        self._resume.set()

    def read(self, addr: int) -> int:
        return self.model.read(addr)

    def write(self, addr: int, value: int) -> None:
        if self._stall:
            self._stall = False
            self.stalled.set()
            assert self._resume.wait(30), "test never resumed a stalled write"
        if self._fail:
            self._fail = False
            raise FabricError(f"injected bus error at 0x{addr:04X}")
        self.model.write(addr, value)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Callable[[], tuple[ResourceManager, FailpointBus]]]:
    """Open managers on one state directory, each on a fresh failpoint crossbar; all are
    closed at the end, even when the test fails."""
    state = StateDir(tmp_path / "state")
    opened: list[ResourceManager] = []

    def _open() -> tuple[ResourceManager, FailpointBus]:
        if opened:
            opened[-1].close()
            state.unlock()
        bus = FailpointBus()
        drv = FabricDriver(DEV, bus, advance=lambda: bus.model.step(1))
        m = open_manager(state, None, drv)
        opened.append(m)
        return m, bus

    yield _open
    for m in opened:
        m.close()
    state.unlock()


def spec(owner: str, **kw: Any) -> SliceSpec:
    return SliceSpec.from_dict({"owner": owner, "memory": {"size": "1 GiB"}, **kw})


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except Exception as e:
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_a_port_being_freed_is_not_given_to_another_vm(env: Any) -> None:
    m, bus = env()
    x = m.allocate(spec("vm-a"))
    bus.stall_next_write()  # the free is now withdrawing vm-a from the crossbar
    t, out = in_thread(lambda: m.free(x["id"]))
    assert bus.stalled.wait(10)
    t2, out2 = in_thread(lambda: m.allocate(spec("vm-b")))  # meanwhile another VM allocates
    for _ in range(1000):  # vm-b is reserved (durable) before it waits for the crossbar
        if any(s.owner == "vm-b" for s in m.allocator.slices.values()):
            break
        threading.Event().wait(0.01)
    vm_b = next(s for s in m.allocator.slices.values() if s.owner == "vm-b")
    assert set(vm_b.alloc.ports).isdisjoint(x["alloc"]["ports"])
    bus.resume()
    t.join(10)
    t2.join(10)
    assert out.get("result", {}).get("state") == "freed"
    assert out2["result"]["alloc"]["ports"] == list(vm_b.alloc.ports)
    assert m.check_invariants() == []
    m2, _ = env()  # the ledger never held one port for two VMs: restart works
    assert [s["owner"] for s in m2.list_slices()] == ["vm-b"]


def test_a_fabric_error_during_free_leaves_the_slice_in_error_and_retryable(env: Any) -> None:
    m, bus = env()
    x = m.allocate(spec("vm-a"))
    bus.fail_next_write()
    with pytest.raises(FabricError):
        m.free(x["id"], request_id="f1")
    assert m.get(x["id"])["state"] == "error"
    y = m.allocate(spec("vm-b"))  # the error slice's port stays quarantined
    assert set(y["alloc"]["ports"]).isdisjoint(x["alloc"]["ports"])
    assert m.check_invariants() == []
    assert m.free(x["id"], request_id="f1")["state"] == "freed"  # a retry executes afresh
    assert m.check_invariants() == []
    m2, _ = env()
    assert [s["owner"] for s in m2.list_slices()] == ["vm-b"]


def test_a_rolled_back_allocation_leaves_no_phantom_success(env: Any, tmp_path: Path) -> None:
    m, bus = env()
    bus.fail_next_write()
    with pytest.raises(FabricError):
        m.allocate(spec("vm-a"), request_id="r1")
    assert m.list_slices() == []
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
    assert db.execute("SELECT count(*) FROM requests").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM slices").fetchone() == (0,)
    db.close()
    assert m.allocator.memory.free_granules == DEV.granules  # units released once synced
    again = m.allocate(spec("vm-a"), request_id="r1")  # the retry really allocates
    assert again["state"] == "active" and m.get(again["id"])["state"] == "active"
    assert m.check_invariants() == []


def test_a_retry_waits_for_its_first_execution_and_gets_its_outcome(env: Any) -> None:
    m, bus = env()
    bus.stall_next_write()
    first_t, first = in_thread(lambda: m.allocate(spec("vm-a"), request_id="r1"))
    assert bus.stalled.wait(10)  # first execution: durable, now programming the crossbar
    retry_t, retry = in_thread(lambda: m.allocate(spec("vm-a"), request_id="r1"))
    retry_t.join(0.3)
    assert retry_t.is_alive(), "the retry was answered before the first execution finished"
    bus.fail_next_write()
    bus.resume()
    first_t.join(10)
    retry_t.join(10)
    assert isinstance(first["error"], FabricError)
    assert retry["error"] is first["error"]  # the same outcome, never an early "active"
    assert m.list_slices() == []


def test_a_free_retry_racing_the_first_waits_for_it(env: Any) -> None:
    m, bus = env()
    x = m.allocate(spec("vm-a"))
    bus.stall_next_write()
    first_t, first = in_thread(lambda: m.free(x["id"], request_id="f1"))
    assert bus.stalled.wait(10)
    retry_t, retry = in_thread(lambda: m.free(x["id"], request_id="f1"))
    bus.resume()
    first_t.join(10)
    retry_t.join(10)
    assert first["result"] == retry["result"] and first["result"]["state"] == "freed"


def test_a_fabric_error_during_resize_puts_the_slice_back(env: Any) -> None:
    m, bus = env()
    x = m.allocate(spec("vm-a", qos={"guaranteed": "10G"}))
    bus.fail_next_write()
    with pytest.raises(FabricError, match="back at its previous size"):
        m.resize(x["id"], ResizeSpec.from_dict({"qos": {"guaranteed": "50G"}}), request_id="z")
    got = m.get(x["id"])
    assert got["state"] == "active" and got["spec"]["qos"] == x["spec"]["qos"]
    assert m.ledger.slices()[0].spec["qos"] == x["spec"]["qos"]  # durable too
    assert m.check_invariants() == []
    port = x["alloc"]["ports"][0]
    weight = m.fabric.read_image()[rm.port_reg(port, rm.PORT_WEIGHT_OFFSET)]
    assert weight == img.weight_for(0, 10_000, DEV.crossbar.port_mbps)
    # the retry with the same request id executes again, and now succeeds
    done = m.resize(x["id"], ResizeSpec.from_dict({"qos": {"guaranteed": "50G"}}), request_id="z")
    assert done["spec"]["qos"] != x["spec"]["qos"]
    assert m.fabric.read_image()[rm.port_reg(port, rm.PORT_WEIGHT_OFFSET)] == img.weight_for(
        0, 50_000, DEV.crossbar.port_mbps
    )


def test_stale_shadow_registers_are_never_activated(env: Any) -> None:
    m, bus = env()
    bus.model.step(1)
    # vm-a's allocation writes its port's registers, then the commit write fails
    x_ports = (0, 1)
    real_write = bus.write

    def fail_at_commit(addr: int, value: int) -> None:
        if addr == rm.CTRL_OFFSET:
            raise FabricError("injected: commit write SLVERR")
        real_write(addr, value)

    bus.write = fail_at_commit  # type: ignore[method-assign]
    with pytest.raises(FabricError):
        m.allocate(spec("vm-a", ports=2))
    bus.write = real_write  # type: ignore[method-assign]
    # vm-a's ports stay quarantined until a sync confirms they are out of the crossbar
    y = m.allocate(spec("vm-b"))
    assert set(y["alloc"]["ports"]).isdisjoint(x_ports)
    assert m.check_invariants() == []
    # vm-b's commit put nothing of vm-a's half-written configuration into service
    for p in x_ports:
        active = bus.model.active_config(p)  # the configuration the port forwards with
        assert active.permitted_outputs == 0 and active.keys == 0, (p, active)
    bus.model.send(1, 0, b"x" * 64)
    bus.model.run_until_idle(1000)
    assert bus.model.delivered(0) == []
    assert m.allocator.memory.free_granules == DEV.granules - 512  # vm-a's units came back


def test_ledger_failure_is_fail_stop(env: Any, tmp_path: Path) -> None:
    m, _ = env()
    m.allocate(spec("vm-a"))
    fatal = threading.Event()
    m.on_fatal = fatal.set
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
    db.execute("CREATE TRIGGER boom BEFORE INSERT ON slices BEGIN SELECT RAISE(ABORT, 'io'); END")
    db.commit()
    with pytest.raises(LedgerError, match="stops and must restart"):
        m.allocate(spec("vm-b"))
    assert fatal.is_set()
    before = m.fabric.read_image()
    for op in (lambda: m.allocate(spec("vm-c")), lambda: m.free(1)):
        with pytest.raises(LedgerError, match="stopped after a ledger failure"):
            op()
    assert m.fabric.read_image() == before  # nothing reached the crossbar after the failure
    db.execute("DROP TRIGGER boom")
    db.commit()
    db.close()
    m2, _ = env()  # a restart recovers what was durable
    assert [s["owner"] for s in m2.list_slices()] == ["vm-a"]
    assert m2.check_invariants() == []


def test_check_reports_nothing_on_a_busy_healthy_device(env: Any) -> None:
    m, _ = env()
    stop = threading.Event()

    def churn(vm: str) -> None:
        while not stop.is_set():
            s = m.allocate(spec(vm, memory={"size": "2 MiB"}))
            m.resize(s["id"], ResizeSpec.from_dict({"qos": {"priority": 3}}))
            m.free(s["id"])

    threads = [threading.Thread(target=churn, args=(f"vm-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(20):
            assert m.check_invariants() == []
    finally:
        stop.set()
        for t in threads:
            t.join(10)
