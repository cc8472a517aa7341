"""POOL_COMPOSITIONS (C008h) on a VM's mailbox, without etcd: the firmware's handler and
hostlib's ``pool_compositions`` against a stand-in for the device's pool membership.

The same command against real pool members (etcd, a SIGKILLed daemon) is tested in
tests/test_pool_etcd.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from firmware.api import Api
from firmware.mailboxes import MailboxService, default_mailbox
from firmware.manager import ResourceManager, StateDir
from firmware.units import GiB
from firmware.vms import write_credential_file
from hostlib import Device, SlicefabError

LONG = "the device left the pool (its lease expired) " * 5  # longer than REASON_BYTES


def composition(cid: str, owner: str, lost: bool = False, parts: int = 2) -> dict[str, Any]:
    """A composition as firmware.pool.composer.Pool.compositions returns it."""
    views = []
    for i in range(parts):
        part: dict[str, Any] = {
            "device": f"dev{i}",
            "cores": 4 + i,
            "memory": (i + 1) * GiB,
            "nvme": ["nvme0"] if i == 0 else [],
            "incarnation": "x",
        }
        if lost and i == parts - 1:
            part.update(state="lost", reason=LONG)
        else:
            part.update(state="active", slices=[10 + i])
        views.append(part)
    return {"id": cid, "owner": owner, "state": "lost" if lost else "active",
            "lost_devices": [f"dev{parts - 1}"] if lost else [], "request": {},
            "parts": views, "cost": 1.0, "created": 0}  # fmt: skip


class FakePool:
    """The device's pool membership as the API sees it (firmware.api.PoolView)."""

    def __init__(self, comps: list[dict[str, Any]], *, filter_owner: bool = True) -> None:
        self.comps = comps
        self.filter_owner = filter_owner
        self.calls = 0

    def compositions(self, owner: str) -> list[dict[str, Any]]:
        self.calls += 1
        return [c for c in self.comps if not self.filter_owner or c["owner"] == owner]


class Firmware:
    def __init__(self, rm: ResourceManager, state: StateDir) -> None:
        self.rm, self.state = rm, state
        self.api = Api(rm, rm.vms)
        self.service = MailboxService(self.api, state.path)

    def open(self, vm: str) -> Device:
        cred = self.rm.vms.add(vm, str(default_mailbox(self.state.path, vm)))
        self.service.refresh()
        path = self.state.path / f"{vm}.credential.toml"
        write_credential_file(path, cred)
        return Device.open(path, mailbox=cred.mailbox)


@pytest.fixture
def firmware(rm: ResourceManager, state: StateDir) -> Iterator[Firmware]:
    fw = Firmware(rm, state)
    try:
        yield fw
    finally:
        fw.service.close()


def test_a_device_without_pool_says_which_option_is_missing(firmware: Firmware) -> None:
    with firmware.open("vm-a") as dev, pytest.raises(SlicefabError) as e:
        dev.pool_compositions()
    assert e.value.code == "unsupported"
    assert "not a pool member" in str(e.value) and "--pool" in str(e.value)


def test_a_vm_sees_its_own_compositions_with_part_states(firmware: Firmware) -> None:
    firmware.api.pool = FakePool(
        [composition("c1", "vm-a", lost=True), composition("c2", "vm-b"), composition("c3", "vm-a")]
    )
    with firmware.open("vm-a") as a, firmware.open("vm-b") as b:
        mine = a.pool_compositions()
        assert [(c["id"], c["state"]) for c in mine] == [("c1", "lost"), ("c3", "active")]
        parts = mine[0]["parts"]
        assert [(p["device"], p["state"]) for p in parts] == [("dev0", "active"), ("dev1", "lost")]
        assert parts[0] == {"device": "dev0", "state": "active", "cores": 4, "memory": GiB,
                            "nvme": 1, "slices": [10], "reason": ""}  # fmt: skip
        assert parts[1]["slices"] == [] and parts[1]["reason"].startswith("the device left")
        assert len(parts[1]["reason"].encode()) <= 160  # cut to the field, not refused
        assert [c["id"] for c in b.pool_compositions()] == ["c2"]  # not vm-a's


def test_another_vms_composition_is_never_answered(firmware: Firmware) -> None:
    """Authorisation does not rest on the pool's owner filter alone: a reader that returns
    another VM's composition makes the request fail, it is not passed on."""
    firmware.api.pool = FakePool(
        [composition("c1", "vm-a", lost=True), composition("c2", "vm-b")], filter_owner=False
    )
    with firmware.open("vm-b") as b, pytest.raises(SlicefabError) as e:
        b.pool_compositions()
    assert "c1" in str(e.value) and "not vm-b's" in str(e.value)


def test_many_compositions_come_in_pages(firmware: Firmware) -> None:
    comps = [composition(f"c{i:03}", "vm-a", lost=i % 3 == 0, parts=8) for i in range(40)]
    pool = FakePool(comps)
    firmware.api.pool = pool
    with firmware.open("vm-a") as a:
        got = a.pool_compositions()
    assert [c["id"] for c in got] == [c["id"] for c in comps]
    assert [c["state"] for c in got] == [c["state"] for c in comps]
    assert all(len(c["parts"]) == 8 for c in got)
    assert pool.calls > 1  # 40 compositions of 8 parts do not fit one 4 KiB payload
