"""The Resource Allocation Manager end to end, in-process: ownership, idempotency,
durability and recovery, bad input leaving everything unchanged, fabric rollback."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import pytest

from firmware.errors import (
    FabricError,
    IdempotencyConflict,
    InsufficientResources,
    LedgerError,
    NotFound,
    PermissionDenied,
    RequestError,
    ResourceConflict,
    SlicefabError,
)
from firmware.fabric.driver import FabricDriver
from firmware.fabric.model import CrossbarModel
from firmware.manager import ResourceManager, StateDir, open_manager
from firmware.slices import ResizeSpec, SliceSpec
from tests.conftest import reopen

GiB = 1 << 30


def spec(owner: str = "vm-a", **kw: Any) -> SliceSpec:
    d: dict[str, Any] = {"owner": owner, "memory": {"size": "1 GiB"}}
    d.update(kw)
    return SliceSpec.from_dict(d)


def ledger_rows(state: StateDir) -> tuple[list[Any], list[Any]]:
    """The ledger's content, read by a second connection (what a restart would see)."""
    db = sqlite3.connect(state.ledger)
    try:
        slices = db.execute("SELECT * FROM slices ORDER BY id").fetchall()
        reqs = db.execute("SELECT owner, request_id, digest FROM requests ORDER BY seq").fetchall()
        return slices, reqs
    finally:
        db.close()


def snapshot(m: ResourceManager, state: StateDir) -> Any:
    a = m.allocator
    return (
        ledger_rows(state),
        m.list_slices(),
        a.cores.free_count(),
        a.memory.free_extents(),
        a.lanes.free_lanes(),
        list(a.key_owner),
        a.port_demand(),
        m.fabric.read_image(),
        m.fabric.generation,
    )


def test_allocate_is_durable_programmed_and_active(rm: ResourceManager, state: StateDir) -> None:
    s = rm.allocate(spec(cores={"count": 2}, qos={"priority": 3, "guaranteed": "5G"}))
    assert s["state"] == "active"
    assert rm.get(s["id"])["state"] == "active"
    (rows, _) = ledger_rows(state)
    assert [r[0] for r in rows] == [s["id"]]
    port = s["alloc"]["ports"][0]
    assert rm.fabric.permission_table()[port] == 1 << port
    assert rm.check_invariants() == []


def test_vm_sees_and_changes_only_its_own_slices(rm: ResourceManager, state: StateDir) -> None:
    a = rm.allocate(spec("vm-a"), caller="vm-a")
    b = rm.allocate(spec("vm-b"), caller="vm-b")
    assert [s["id"] for s in rm.list_slices(caller="vm-b")] == [b["id"]]
    before = snapshot(rm, state)
    with pytest.raises(PermissionDenied):
        rm.get(a["id"], caller="vm-b")
    with pytest.raises(PermissionDenied):
        rm.resize(a["id"], ResizeSpec(memory=2 * GiB), caller="vm-b")
    with pytest.raises(PermissionDenied):
        rm.free(a["id"], caller="vm-b")
    with pytest.raises(PermissionDenied):
        rm.allocate(spec("vm-a"), caller="vm-b")  # allocating in another VM's name
    assert snapshot(rm, state) == before
    # the admin sees both; the two VMs hold disjoint ports that cannot reach each other
    perm = rm.fabric.permission_table()
    pa, pb = a["alloc"]["ports"][0], b["alloc"]["ports"][0]
    assert pa != pb and not perm[pa] >> pb & 1 and not perm[pb] >> pa & 1


@pytest.mark.parametrize(
    ("make", "error", "field"),
    [
        (lambda: spec(memory={"size": -GiB}), RequestError, "memory.size"),
        (lambda: spec(memory={"size": 0}), RequestError, "memory.size"),
        (lambda: spec(memory={"size": "3 MiB"}), RequestError, "memory.size"),
        (lambda: spec(memory={"size": "1 TiB"}), RequestError, "memory.size"),
        (lambda: spec(cores={"count": 0}), RequestError, "cores.count"),
        (lambda: spec(cores={"count": 10**9}), RequestError, "cores.count"),
        (lambda: spec(cores={"ids": [64]}), RequestError, "cores.ids"),
        (lambda: spec(lanes={"width": 3}), RequestError, "lanes.width"),
        (lambda: spec(lanes={"width": 16}), RequestError, "lanes.width"),
        (lambda: spec(lanes={"width": 2, "endpoint": "nvme0"}), RequestError, "lanes.width"),
        (lambda: spec(lanes={"width": 4, "endpoint": "nvme9"}), RequestError, "lanes.endpoint"),
        (lambda: spec(lanes={"width": 4, "first": 10}), RequestError, "lanes.first"),  # misaligned
        (lambda: spec(lanes={"width": 2, "first": 40}), RequestError, "lanes.first"),
        (
            lambda: spec(lanes={"width": 4, "first": 8, "endpoint": "nvme1"}),
            RequestError,
            "lanes.first",
        ),
        (lambda: spec(gpus=1), RequestError, "gpus"),
        (lambda: spec(key=16), RequestError, "key"),
        (lambda: spec(ports=65), RequestError, "ports"),
        (lambda: spec(qos={"priority": 8}), RequestError, "qos.priority"),
        (lambda: spec(qos={"guaranteed": "200 Gbit/s"}), RequestError, "qos.guaranteed"),
    ],
)
def test_bad_requests_get_clear_errors_and_change_nothing(
    rm: ResourceManager, state: StateDir, make: Callable[[], SliceSpec], error: type, field: str
) -> None:
    rm.allocate(spec("vm-a", key=3), request_id="first")
    before = snapshot(rm, state)
    with pytest.raises(error) as exc:
        rm.allocate(make(), request_id="bad")
    assert exc.value.details.get("field") == field, exc.value.message
    assert field in exc.value.message
    assert snapshot(rm, state) == before


def test_taken_units_are_refused_and_change_nothing(rm: ResourceManager, state: StateDir) -> None:
    a = rm.allocate(
        spec("vm-a", key=3, lanes={"width": 4, "endpoint": "nvme0"}, cores={"ids": [0, 1]})
    )
    before = snapshot(rm, state)
    for bad, err in (
        (spec("vm-b", key=3), ResourceConflict),  # a key another VM holds
        (spec("vm-b", lanes={"width": 4, "endpoint": "nvme0"}), ResourceConflict),
        (spec("vm-b", cores={"ids": [1, 2]}), ResourceConflict),
        (spec("vm-b", ports=16), InsufficientResources),
        (spec("vm-b", memory={"size": "64 GiB"}), InsufficientResources),
    ):
        with pytest.raises(err):
            rm.allocate(bad)
        assert snapshot(rm, state) == before, bad
    with pytest.raises(NotFound):
        rm.free(a["id"] + 100)
    with pytest.raises(RequestError):
        rm.resize(a["id"], ResizeSpec(memory=3 << 20))  # not a multiple of the granule
    assert snapshot(rm, state) == before


def test_retry_with_same_request_id_allocates_once(rm: ResourceManager, state: StateDir) -> None:
    first = rm.allocate(spec(cores={"count": 4}), caller="vm-a", request_id="req-1")
    free_cores = rm.allocator.cores.free_count()
    again = rm.allocate(spec(cores={"count": 4}), caller="vm-a", request_id="req-1")
    assert again == first
    assert rm.allocator.cores.free_count() == free_cores
    assert len(rm.list_slices()) == 1
    with pytest.raises(IdempotencyConflict):
        rm.allocate(spec(cores={"count": 5}), caller="vm-a", request_id="req-1")
    # ids are scoped per caller: another VM's "req-1" is its own request
    other = rm.allocate(spec("vm-b"), caller="vm-b", request_id="req-1")
    assert other["id"] != first["id"]


def test_request_ids_survive_restart(
    rm: ResourceManager, state: StateDir, open_rm: Callable[[], ResourceManager]
) -> None:
    a = rm.allocate(spec(), caller="vm-a", request_id="alloc-1")
    freed = rm.free(a["id"], caller="vm-a", request_id="free-1")
    m2 = reopen(rm, state, open_rm)
    # the reply was lost; the client retries both: nothing is allocated or freed again
    assert m2.allocate(spec(), caller="vm-a", request_id="alloc-1") == a
    assert m2.free(a["id"], caller="vm-a", request_id="free-1") == freed
    assert m2.list_slices() == []


def test_old_request_ids_are_answered_from_the_ledger_not_memory(
    rm: ResourceManager, state: StateDir, open_rm: Callable[[], ResourceManager],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import firmware.manager as manager_module

    monkeypatch.setattr(manager_module, "REQUEST_MEMORY", 4)
    made = [rm.allocate(spec(cores={"count": 1}), caller="vm-a", request_id=f"r{i}")
            for i in range(10)]
    assert len(rm._requests) == 4  # memory is bounded: only the newest results
    free_cores = rm.allocator.cores.free_count()
    # r0 left memory long ago; its retry is still the first execution's result
    assert rm.allocate(spec(cores={"count": 1}), caller="vm-a", request_id="r0") == made[0]
    assert rm.allocator.cores.free_count() == free_cores and len(rm.list_slices()) == 10
    with pytest.raises(IdempotencyConflict):
        rm.allocate(spec(cores={"count": 2}), caller="vm-a", request_id="r1")
    m2 = reopen(rm, state, open_rm)
    assert len(m2._requests) == 4  # a restart reloads only the newest
    assert m2.allocate(spec(cores={"count": 1}), caller="vm-a", request_id="r2") == made[2]
    assert len(m2.list_slices()) == 10


def test_restart_recovers_slices_and_reprograms_a_fresh_fabric(
    rm: ResourceManager, state: StateDir, open_rm: Callable[[], ResourceManager]
) -> None:
    a = rm.allocate(spec("vm-a", cores={"count": 3}, ports=2, qos={"guaranteed": "10G"}))
    b = rm.allocate(spec("vm-b", lanes={"width": 4, "endpoint": "nvme1"}))
    rm.resize(a["id"], ResizeSpec(memory=3 * GiB))
    rm.free(b["id"])
    c = rm.allocate(spec("vm-c", memory={"size": "2 GiB", "contiguous": True}))
    slices, image = rm.list_slices(), rm.fabric.image
    m2 = reopen(rm, state, open_rm)
    assert m2.list_slices() == slices
    assert m2.fabric.image == image  # a new behavioural crossbar, programmed from the ledger
    assert m2.fabric.read_image() == image
    assert m2.check_invariants() == []
    d = m2.allocate(spec("vm-d"))
    assert d["id"] > c["id"]  # slice ids are never reused


def test_concurrent_clients_never_oversubscribe(rm: ResourceManager) -> None:
    """16 VMs race for 48 GiB of memory in 1 GiB slices and for one port each."""
    errors: list[BaseException] = []

    def client(i: int) -> None:
        for n in range(6):
            try:
                rm.allocate(
                    spec(f"vm-{i}", memory={"size": "1 GiB"}), caller=f"vm-{i}", request_id=f"r{n}"
                )
            except InsufficientResources:
                pass
            except BaseException as e:  # anything else is a bug
                errors.append(e)

    rm.allocate(spec("hog", memory={"size": "16 GiB"}))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert rm.check_invariants() == []
    # 15 VMs got a port (the hog holds the 16th) and asked for 90 GiB in all: exactly the
    # 48 GiB left were handed out, once each
    assert len(rm.list_slices()) == 1 + 48
    assert rm.allocator.memory.free_granules == 0


class FlakyBus:
    """A crossbar whose register writes fail once armed (a QMP or bus error)."""

    def __init__(self, model: CrossbarModel) -> None:
        self.model = model
        self.armed = False

    def read(self, addr: int) -> int:
        return self.model.read(addr)

    def write(self, addr: int, value: int) -> None:
        if self.armed:
            raise FabricError("injected bus error")
        self.model.write(addr, value)


def test_fabric_failure_rolls_the_slice_back(state: StateDir) -> None:
    from firmware.inventory import load_device

    dev = load_device()
    model = CrossbarModel(dev.crossbar.ports, dev.keys, dev.crossbar.data_bytes)
    bus = FlakyBus(model)
    m = open_manager(state, None, FabricDriver(dev, bus, advance=lambda: model.step(1)))
    try:
        a = m.allocate(spec("vm-a"))
        bus.armed = True
        with pytest.raises(FabricError):
            m.allocate(spec("vm-b", cores={"count": 2}))
        bus.armed = False
        assert ledger_rows(state)[0][0][0] == a["id"] and len(ledger_rows(state)[0]) == 1
        # its units come back at the next successful sync (the check makes one)
        assert m.check_invariants() == []
        assert [s["id"] for s in m.list_slices()] == [a["id"]]
        assert m.allocator.cores.free_count() == dev.cores
    finally:
        m.close()
        state.unlock()


def test_state_dir_is_exclusive(rm: ResourceManager, state: StateDir) -> None:
    with pytest.raises(LedgerError, match="in use"):
        open_manager(StateDir(state.path))


def test_ledger_of_another_device_is_refused(tmp_path: Any) -> None:
    from pathlib import Path

    state = StateDir(Path(tmp_path) / "s")
    m = open_manager(state)
    m.close()
    state.unlock()
    other = Path(tmp_path) / "other.toml"
    text = (Path(__file__).parent.parent / "firmware/data/default_device.toml").read_text()
    other.write_text(text.replace("count = 16", "count = 8"))
    with pytest.raises(LedgerError, match="another device"):
        open_manager(state, other)
    state.unlock()


def test_every_error_is_a_slicefab_error_with_a_code(rm: ResourceManager) -> None:
    with pytest.raises(SlicefabError) as exc:
        rm.allocate(spec(memory={"size": "3 MiB"}))
    d = exc.value.to_dict()
    assert d["code"] == "invalid" and d["details"]["field"] == "memory.size"


def test_free_takes_the_vm_out_of_the_fabric_before_returning(rm: ResourceManager) -> None:
    a = rm.allocate(spec("vm-a", ports=3))
    assert any(rm.fabric.read_image().values())
    rm.free(a["id"])
    assert rm.fabric.permission_table() == [0] * rm.device.crossbar.ports
    assert all(v == 0 for a_, v in rm.fabric.read_image().items() if a_ % 0x40 != 0x08)


def test_bandwidth_admission_on_a_shared_port(rm: ResourceManager, state: StateDir) -> None:
    a = rm.allocate(spec("vm-a", qos={"guaranteed": "20G"}))
    b = rm.allocate(spec("vm-a", qos={"guaranteed": "70G"}))
    assert a["alloc"]["ports"] == b["alloc"]["ports"]  # the VM's port had the headroom
    before = snapshot(rm, state)
    with pytest.raises(InsufficientResources, match="guaranteed bandwidth on crossbar port"):
        rm.resize(a["id"], ResizeSpec.from_dict({"qos": {"guaranteed": "40G"}}))
    assert snapshot(rm, state) == before
    c = rm.allocate(spec("vm-a", qos={"guaranteed": "20G"}))
    assert c["alloc"]["ports"] != a["alloc"]["ports"]  # no headroom left: a new port


def test_a_self_contradicting_ledger_is_refused_at_start(
    rm: ResourceManager, state: StateDir, open_rm: Callable[[], ResourceManager]
) -> None:
    a = rm.allocate(spec("vm-a", qos={"guaranteed": "60G"}))
    b = rm.allocate(spec("vm-a", qos={"guaranteed": "30G"}))
    assert a["alloc"]["ports"] == b["alloc"]["ports"]
    rm.close()
    state.unlock()
    # tamper: raise b's guaranteed bandwidth so the shared port would carry 110 Gbit/s
    db = sqlite3.connect(state.ledger)
    (raw,) = db.execute("SELECT spec FROM slices WHERE id = ?", (b["id"],)).fetchone()
    tampered = raw.replace('"guaranteed": 30000', '"guaranteed": 50000')
    assert tampered != raw
    db.execute("UPDATE slices SET spec = ? WHERE id = ?", (tampered, b["id"]))
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match=f"slice {b['id']} cannot be restored"):
        open_rm()


class _RefusingVm:
    """A VM hook (the QEMU backend's place) that refuses every change while ``refuse``
    is set, as a failed QMP command does after undoing its own steps."""

    def __init__(self) -> None:
        self.refuse = False
        self.memory: dict[int, int] = {}  # what the VM has: slice id → bytes

    def admit(self, owner: str, slice_id: int | None, request: Any) -> None:
        pass

    def plan(self, slices: Any) -> dict[int, int]:
        return {s.id: s.alloc.granules for s in slices}

    def apply(self, plan: dict[int, int]) -> None:
        if self.refuse and plan != self.memory:
            raise FabricError("VM vm-a: qom-set: GenericError: boom; it is back as it was")
        self.memory = dict(plan)


def test_a_vm_refusing_a_resize_puts_the_slice_back(rm: ResourceManager, state: StateDir) -> None:
    vm = _RefusingVm()
    rm.vm_hook = vm
    x = rm.allocate(spec("vm-a", memory={"size": "1 GiB"}))
    before = snapshot(rm, state)
    vm.refuse = True
    for target in ("2 GiB", "512 MiB"):  # a growth and a shrink
        with pytest.raises(FabricError, match=r"boom.*back at its previous size"):
            rm.resize(x["id"], ResizeSpec.from_dict({"memory": target}))
        after = snapshot(rm, state)
        # same ledger rows, slices, free units and crossbar image; the generation moved on
        assert after[:-1] == before[:-1]
        assert vm.memory == {x["id"]: 512}  # 1 GiB in 2 MiB granules
    assert rm.check_invariants() == []
    vm.refuse = False
    grown = rm.resize(x["id"], ResizeSpec.from_dict({"memory": "2 GiB"}))
    assert grown["spec"]["memory"]["size"] == 2 * GiB and vm.memory == {x["id"]: 1024}
