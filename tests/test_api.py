"""The secure allocation API end to end: VM processes' frames through real shared-memory
mailboxes into the firmware and back — authentication, replay protection, the opcode
allowlist, ownership — with the firmware surviving all of it and its state unchanged."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from abi.commands import decode_response, encode_request
from abi.envelope import REQUEST_DOMAIN, RESPONSE_DOMAIN, open_sealed, seal
from firmware.api import Api
from firmware.mailboxes import MailboxService, default_mailbox
from firmware.manager import ResourceManager
from hostlib.mailbox import REG_FW_STATE, FwState, MailboxClient
from tests.conftest import StateDir


class RawVm:
    """A minimal VM-side client speaking the wire contract directly (no hostlib client),
    so each check of the pipeline can be poked at one frame at a time."""

    def __init__(self, vm: str, key: bytes, mailbox: Path) -> None:
        self.vm, self.key = vm, key
        self.transport = MailboxClient(mailbox)
        self.seq = 0

    def frame(self, name: str, payload: dict[str, Any], seq: int | None = None) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        msg = encode_request(name, payload, tag=seq & 0xFF)
        return seal(self.key, REQUEST_DOMAIN, self.vm, seq, msg)

    def send(self, frame: bytes) -> Any:
        answer = self.transport.request(frame, timeout=10)
        message, seq = open_sealed(self.key, RESPONSE_DOMAIN, self.vm, answer)
        assert len(frame) < 40 or seq == int.from_bytes(frame[-40:-32], "little")  # echoed
        return decode_response(message)

    def call(self, name: str, payload: dict[str, Any]) -> Any:
        return self.send(self.frame(name, payload))

    def hello(self) -> int:
        r = self.send(self.frame("HELLO", {"client_nonce": os.urandom(16)}, seq=0))
        self.seq = r.payload["last_seq"]
        return int(self.seq)


@pytest.fixture
def device_api(
    rm: ResourceManager, state: StateDir
) -> Iterator[tuple[ResourceManager, MailboxService]]:
    api = Api(rm, rm.vms)
    service = MailboxService(api, state.path)
    try:
        yield rm, service
    finally:
        service.close()


def provision(rm: ResourceManager, service: MailboxService, state: StateDir, vm: str) -> RawVm:
    cred = rm.vms.add(vm, str(default_mailbox(state.path, vm)))
    service.refresh()
    client = RawVm(vm, cred.key, Path(cred.mailbox))
    client.hello()
    return client


ALLOC = {"name": "web", "cores": {"count": 2, "same_cluster": False, "ids": None},
         "memory": {"size": 1 << 30, "contiguous": False}, "lanes": None, "key": None,
         "ports": 1, "qos": {"priority": 1, "guaranteed_mbps": 1000, "maximum_mbps": 0},
         "request_id": None}  # fmt: skip


def state_of(rm: ResourceManager) -> Any:
    return rm.list_slices(), rm.fabric.read_image(), rm.allocator.cores.free_count()


def test_two_vms_isolated_and_every_bad_request_refused(device_api: Any, state: StateDir) -> None:
    rm, service = device_api
    a = provision(rm, service, state, "vm-a")
    b = provision(rm, service, state, "vm-b")
    ra = a.call("ALLOCATE", ALLOC)
    assert ra.ok, ra.error
    sa = ra.payload["id"]
    assert ra.payload["owner"] == "vm-a"  # the owner is the mailbox's identity, not a field
    assert b.call("ALLOCATE", ALLOC).ok
    before = state_of(rm)

    # B cannot read, resize or free A's slice, nor see it in its list
    for name, payload in (("GET", {"slice": sa}), ("FREE", {"slice": sa, "request_id": None}),
                          ("RESIZE", {"slice": sa, "memory": 2 << 30, "cores": None, "qos": None,
                                      "request_id": None})):  # fmt: skip
        r = b.call(name, payload)
        assert r.error["code"] == "denied", (name, r.error)
    assert [s["id"] for s in b.call("LIST", {"start_id": 0}).payload["slices"]] != [sa]

    # a replayed request (same frame, same sequence number) is rejected
    frame = a.frame("GET", {"slice": sa})
    assert a.send(frame).ok
    assert a.send(frame).error["code"] == "replay"
    assert a.send(a.frame("GET", {"slice": sa}, seq=1)).error["code"] == "replay"  # reordered

    # a bad MAC is rejected and counted
    bad = bytearray(a.frame("GET", {"slice": sa}))
    bad[-1] ^= 1
    assert a.send(bytes(bad)).error["code"] == "auth_failed"
    assert service.channels()["vm-a"].counters.auth_failed == 1

    # an admin opcode on a VM mailbox is refused before anything else
    r = a.call("VM_ADD", {"vm": "evil", "mailbox": "/tmp/x"})
    assert r.error["code"] == "opcode_not_allowed"
    r = a.call("ALLOCATE_FOR", {**ALLOC, "owner": "vm-b"})
    assert r.error["code"] == "opcode_not_allowed"

    # B's frames sealed with B's key are worthless on A's mailbox
    stolen = b.frame("GET", {"slice": sa})
    assert a.transport.request(stolen, timeout=10)  # answered...
    assert state_of(rm) == before  # ...and nothing changed through any of it
    assert rm.check_invariants() == []
    assert a.call("NOP", {"data": b"still here"}).payload == {"data": b"still here"}


def test_garbage_frames_are_answered_and_rate_limited(device_api: Any, state: StateDir) -> None:
    rm, service = device_api
    a = provision(rm, service, state, "vm-a")
    for junk in (b"", b"x", b"\x00" * 52, os.urandom(200), b"\xff" * 4000):
        answer = a.transport.request(junk, timeout=10)
        msg, _ = open_sealed(a.key, RESPONSE_DOMAIN, "vm-a", answer)
        assert decode_response(msg).error["code"] in {
            "malformed",
            "auth_failed",
            "rate_limited",
            "payload_too_large",
            "unsupported",
        }
    codes = set()
    for _ in range(60):  # a flood of forgeries: the limiter answers Busy without verifying
        answer = a.transport.request(os.urandom(100), timeout=10)
        msg, _ = open_sealed(a.key, RESPONSE_DOMAIN, "vm-a", answer)
        codes.add(decode_response(msg).error["code"])
    assert "rate_limited" in codes
    assert service.channels()["vm-a"].limiter.rejected > 0


def test_sequence_counter_survives_restart(device_api: Any, state: StateDir, open_rm: Any) -> None:
    rm, service = device_api
    a = provision(rm, service, state, "vm-a")
    frame = a.frame("ALLOCATE", ALLOC)
    assert a.send(frame).ok
    service.close()
    from tests.conftest import reopen

    rm2 = reopen(rm, state, open_rm)
    service2 = MailboxService(Api(rm2, rm2.vms), state.path)
    service2.refresh()
    try:
        a2 = RawVm("vm-a", a.key, default_mailbox(state.path, "vm-a"))
        assert a2.send(frame).error["code"] == "replay"  # captured before the restart
        assert a2.hello() == a.seq  # the counter came back from the ledger
        assert a2.call("LIST", {"start_id": 0}).payload["total"] == 1
    finally:
        service2.close()


def test_revoked_vm_cannot_authenticate(device_api: Any, state: StateDir) -> None:
    rm, service = device_api
    a = provision(rm, service, state, "vm-a")
    rm.vms.remove("vm-a")
    service.refresh()
    rm.vms.add("vm-a", str(default_mailbox(state.path, "vm-a")))  # re-provisioned: new key
    service.refresh()
    a.transport.close()
    a.transport = MailboxClient(default_mailbox(state.path, "vm-a"))
    with pytest.raises(Exception, match="does not verify"):
        a.call("NOP", {"data": b""})  # the answer is sealed with the new key


def test_inventory_views_show_a_vm_only_what_it_holds(device_api: Any, state: StateDir) -> None:
    rm, service = device_api
    a = provision(rm, service, state, "vm-a")
    b = provision(rm, service, state, "vm-b")
    assert a.call("ALLOCATE", ALLOC).ok and b.call("ALLOCATE", ALLOC).ok
    cores_a = a.call("CORES", {}).payload
    assert len(cores_a["held"]) == 2  # its own two cores, not vm-b's
    assert sum(c["free"] for c in cores_a["clusters"]) == rm.device.cores - 4  # device-wide
    assert a.call("KEYS", {}).payload["held"] == [rm.list_slices(owner="vm-a")[0]["alloc"]["key"]]
    ports_a = a.call("PORTS", {}).payload
    assert [p["port"] for p in ports_a["held"]] == rm.list_slices(owner="vm-a")[0]["alloc"]["ports"]
    assert a.call("MEMORY", {}).payload["held_granules"] == 512
    assert {e["name"] for e in a.call("LANES", {}).payload["endpoints"]} == {"nvme0", "nvme1"}


def test_every_command_has_a_handler(device_api: Any, state: StateDir) -> None:
    """Every command in the table, vendor and CXL FM API, has a handler: none is answered
    *Unsupported*."""
    from abi.commands import COMMANDS, Role
    from abi.examples import EXAMPLES
    from firmware.api import HANDLERS

    missing = [c.name for c in COMMANDS.values() if c.name not in HANDLERS]
    assert missing == []
    rm, service = device_api
    a = provision(rm, service, state, "vm-a")
    for op, cmd in COMMANDS.items():
        if not cmd.allowed(Role.VM):
            continue
        r = a.call(cmd.name, EXAMPLES[op][0])
        if cmd.name == "POOL_COMPOSITIONS":  # a pool member's only (tests/test_pool_api.py)
            assert r.error["code"] == "unsupported" and "--pool" in r.error["message"]
            continue
        assert r.ok or r.error["code"] != "unsupported", (cmd.name, r.error)


def test_a_vm_waiting_on_the_fabric_does_not_hold_up_the_others(
    device_api: Any, state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One poller serves every mailbox: while vm-a's allocation is stuck in a fabric
    reconfiguration (in a worker), vm-b's requests, and vm-b's own allocation, go through."""
    import threading

    rm, service = device_api
    a = provision(rm, service, state, "vm-a")
    b = provision(rm, service, state, "vm-b")
    release, entered = threading.Event(), threading.Event()
    real_sync = rm.fabric.sync

    def slow_sync(demand: Any) -> int:
        if any(d.owner == "vm-a" for d in demand) and not release.is_set():
            entered.set()
            assert release.wait(timeout=30)
        return real_sync(demand)

    monkeypatch.setattr(rm.fabric, "sync", slow_sync)
    answers: list[Any] = []
    t = threading.Thread(target=lambda: answers.append(a.call("ALLOCATE", ALLOC)))
    t.start()
    try:
        assert entered.wait(timeout=30)
        assert b.call("NOP", {"data": b"x"}).payload == {"data": b"x"}
        assert b.call("LIST", {"start_id": 0}).payload["total"] == 0
    finally:
        release.set()
        t.join(timeout=30)
    assert answers and answers[0].ok
    assert b.call("ALLOCATE", ALLOC).ok
    assert rm.check_invariants() == []


def test_may_block_is_judged_from_the_opcode() -> None:
    from firmware.api import may_block

    msg = encode_request("ALLOCATE", ALLOC)
    assert may_block(msg) and may_block(msg + bytes(40))
    assert not may_block(encode_request("NOP", {"data": b""}))
    assert not may_block(encode_request("GET", {"slice": 1}))
    assert not may_block(b"\x00\x01")  # too short to have an opcode: answered inline


def test_a_vm_re_provisioned_on_its_mailbox_file_is_served_at_once(
    device_api: Any, state: StateDir
) -> None:
    """refresh() closes a removed VM's mailbox before it opens the new one: the poller owns
    the doorbell views of the mappings, and a late close of the old mapping would mark the
    shared file CLOSED under the new server."""
    rm, service = device_api
    a = provision(rm, service, state, "vm-a")
    for _ in range(10):
        rm.vms.remove("vm-a")
        service.refresh()
        with open(default_mailbox(state.path, "vm-a"), "rb") as f:  # closed on return
            assert int.from_bytes(f.read(0x20)[REG_FW_STATE:][:4], "little") == FwState.CLOSED
        cred = rm.vms.add("vm-a", str(default_mailbox(state.path, "vm-a")))
        service.refresh()
        a.transport.close()
        a = RawVm("vm-a", cred.key, Path(cred.mailbox))
        a.hello()
        assert a.call("NOP", {"data": b"still here"}).payload == {"data": b"still here"}


def test_the_pure_python_poller_serves_the_same_pipeline(
    rm: ResourceManager, state: StateDir
) -> None:
    """SLICEFAB_FASTPATH=0: the poller scans in Python instead of waiting in C."""
    from firmware import fastpath

    with fastpath.selected(False):
        service = MailboxService(Api(rm, rm.vms), state.path)
    try:
        assert service._c is None
        a = provision(rm, service, state, "vm-a")
        b = provision(rm, service, state, "vm-b")
        sa = a.call("ALLOCATE", ALLOC).payload["id"]
        assert b.call("FREE", {"slice": sa, "request_id": None}).error["code"] == "denied"
        assert a.call("FREE", {"slice": sa, "request_id": None}).ok
        rm.vms.remove("vm-b")
        service.refresh()
        assert a.call("NOP", {"data": b""}).ok
    finally:
        service.close()


@pytest.mark.parametrize(
    ("offset", "value", "code", "field"),
    [
        (5, 1, "malformed", "header.payload_length"),  # one byte more than follows
        (2, 1, "malformed", "header.reserved"),
        (7, 0x20, "malformed", "header.payload_length"),  # a reserved bit of the length
        (8, 1, "malformed", "header.return_code"),
        (10, 1, "malformed", "header.ext_status"),
        (0, 1, "malformed", "header.category"),  # a response where a request belongs
    ],
)
def test_a_sealed_request_with_a_lying_header_is_refused(
    device_api: Any, state: StateDir, offset: int, value: int, code: str, field: str
) -> None:
    """The MAC is valid: only the header's own checks can refuse these frames, on the
    fast path as on the checked one."""
    rm, service = device_api
    a = provision(rm, service, state, "vm-a")
    before = state_of(rm)
    a.seq += 1
    message = bytearray(encode_request("ALLOCATE", ALLOC, tag=a.seq & 0xFF))
    message[offset] ^= value
    r = a.send(seal(a.key, REQUEST_DOMAIN, "vm-a", a.seq, bytes(message)))
    assert r.error["code"] == code, r.error
    assert r.error["details"]["field"] == field
    assert state_of(rm) == before
    assert service.channels()["vm-a"].counters.malformed == (code == "malformed")
