"""hostlib against the real firmware: ``firmware.api.Api`` serving per-VM shared-memory
mailboxes (``firmware.mailboxes.MailboxService``), the client on the VM side.

The stand-in firmware of test_hostlib_client.py pins the wire contract down call by call;
these tests check that the client and the firmware agree on it end to end: a whole slice
life cycle, isolation between two VMs, idempotent retries, resync after another process
used the same credential, and revocation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

import hostlib.discovery
from firmware.api import Api
from firmware.mailboxes import MailboxService, default_mailbox
from firmware.manager import ResourceManager, StateDir
from firmware.vms import write_credential_file
from hostlib import (
    AsyncClient,
    AuthError,
    Credential,
    Device,
    InsufficientResources,
    NotFound,
    PermissionDenied,
    RequestError,
    load_credential,
)

GiB = 1 << 30


class Firmware:
    def __init__(self, rm: ResourceManager, state: StateDir) -> None:
        self.rm, self.state = rm, state
        self.service = MailboxService(Api(rm, rm.vms), state.path)

    def provision(self, vm: str) -> Credential:
        """``slicefab vm add``: the key, the mailbox, and the credential file it hands out."""
        cred = self.rm.vms.add(vm, str(default_mailbox(self.state.path, vm)))
        self.service.refresh()
        path = self.state.path / f"{vm}.credential.toml"
        write_credential_file(path, cred)
        return load_credential(path)


@pytest.fixture
def firmware(
    rm: ResourceManager, state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Firmware]:
    monkeypatch.setattr(hostlib.discovery, "pci_devices", list)  # a VM process on the host
    fw = Firmware(rm, state)
    try:
        yield fw
    finally:
        fw.service.close()


def test_a_slice_life_cycle(firmware: Firmware) -> None:
    cred = firmware.provision("vm-a")
    with Device.open(cred, mailbox=cred.mailbox) as dev:
        info = dev.device_info()
        s = dev.allocate(cores=2, memory="1 GiB", guaranteed="1 Gbit/s", name="web")
        assert (s.owner, s.state, s.name, len(s.cores), s.memory_bytes) == (
            "vm-a",
            "active",
            "web",
            2,
            GiB,
        )
        assert s.granule_bytes == info.granule_bytes
        assert sum(e.size for e in s.extents) == GiB
        assert dev.get(s.id) == s
        grown = dev.resize(s.id, memory="2 GiB", cores=3)
        assert (grown.memory_bytes, len(grown.cores), grown.state) == (2 * GiB, 3, "active")
        t = dev.telemetry(s.id)
        assert (t.slice_id, t.cores, t.memory_bytes) == (s.id, 3, 2 * GiB)
        assert [x.id for x in dev.slices()] == [s.id]
        assert dev.free(s.id).state == "freed"
        assert dev.slices() == []
    assert firmware.rm.check_invariants() == []


def test_many_slices_come_back_over_several_pages(firmware: Firmware) -> None:
    cred = firmware.provision("vm-a")

    async def go() -> None:
        async with await AsyncClient.open(cred, mailbox=cred.mailbox) as c:
            made = [await c.allocate(cores=1, name=f"s{i:02}" * 8) for i in range(20)]
            listed = await c.slices()
            assert [s.id for s in listed] == [s.id for s in made]

    asyncio.run(go())


def test_another_vm_cannot_touch_a_slice(firmware: Firmware) -> None:
    a, b = firmware.provision("vm-a"), firmware.provision("vm-b")
    with Device.open(a, mailbox=a.mailbox) as da, Device.open(b, mailbox=b.mailbox) as db:
        s = da.allocate(cores=1)
        for call in (
            lambda: db.get(s.id),
            lambda: db.resize(s.id, cores=2),
            lambda: db.free(s.id),
            lambda: db.telemetry(s.id),
        ):
            with pytest.raises((PermissionDenied, NotFound)):
                call()
        assert db.slices() == []
        assert da.get(s.id) == s


def test_errors_come_back_as_their_exceptions(firmware: Firmware) -> None:
    cred = firmware.provision("vm-a")
    with Device.open(cred, mailbox=cred.mailbox) as dev:
        dev.allocate(memory="40 GiB")
        with pytest.raises(InsufficientResources):
            dev.allocate(memory="40 GiB")
        with pytest.raises(RequestError) as big:
            dev.allocate(memory="64 TiB")
        assert big.value.field == "memory.size"
        with pytest.raises(RequestError) as e:
            dev.allocate(lanes=3)
        assert "width" in e.value.field
        with pytest.raises(NotFound):
            dev.get(999)


def test_repeating_a_request_id_executes_once(firmware: Firmware) -> None:
    cred = firmware.provision("vm-a")
    with Device.open(cred, mailbox=cred.mailbox) as dev:
        first = dev.allocate(cores=1, request_id="retry-me")
        again = dev.allocate(cores=1, request_id="retry-me")
        assert again.id == first.id
        assert [s.id for s in dev.slices()] == [first.id]


def test_a_second_process_with_the_same_credential_forces_a_resync(firmware: Firmware) -> None:
    cred = firmware.provision("vm-a")
    with Device.open(cred, mailbox=cred.mailbox) as one, Device.open(cred) as two:
        assert one.nop(b"1") == b"1"  # takes the number `two` also thinks is next
        assert two.nop(b"2") == b"2"  # refused as a replay, resynced, retried
        assert two.client.last_seq > one.client.last_seq
        assert one.nop(b"3") == b"3"  # and now `one` is behind: resyncs in turn


def test_a_revoked_or_wrong_credential_is_an_auth_error(firmware: Firmware) -> None:
    cred = firmware.provision("vm-a")
    with pytest.raises(AuthError):
        Device.open(Credential("vm-a", bytes(32), cred.mailbox), mailbox=cred.mailbox)
    with Device.open(cred, mailbox=cred.mailbox) as dev:
        firmware.rm.vms.remove("vm-a")
        with pytest.raises(AuthError):
            dev.nop()


def test_the_credential_file_points_at_the_mailbox(firmware: Firmware) -> None:
    cred = firmware.provision("vm-a")
    assert Path(cred.mailbox).exists()
    with Device.open(cred.path) as dev:  # discovery: no ivshmem device, so the host file
        assert dev.nop(b"ok") == b"ok"
