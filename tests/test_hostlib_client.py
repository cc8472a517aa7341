"""hostlib's client against a stand-in firmware on a real shared-memory mailbox.

The stand-in speaks the wire contract the way the firmware does (envelope, HELLO exempt
from the sequence rule, every other request's number strictly above the last, request
ids executed at most once, errors as CXL return codes) with in-memory slices, and has
knobs to misbehave: answer an error code, stall, tamper with a sealed response. It logs
every authenticated request, so tests assert exactly what went over the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import hostlib.client
import hostlib.discovery
import hostlib.transport
from abi.cci import Category, Message
from abi.commands import (
    BY_NAME,
    decode_request,
    encode_error,
    encode_response,
)
from abi.envelope import (
    REQUEST_DOMAIN,
    RESPONSE_DOMAIN,
    EnvelopeError,
    open_sealed,
    seal,
    split,
)
from abi.examples import EXAMPLES
from abi.layout import Payload
from abi.retcodes import ERRORS
from abi.vendor import ABI_VERSION
from hostlib import (
    AllocationError,
    AsyncClient,
    AuthError,
    Credential,
    Device,
    DeviceError,
    DeviceInfo,
    IdempotencyConflict,
    InsufficientResources,
    LifecycleError,
    NotFound,
    PeerClosed,
    PermissionDenied,
    ProtocolError,
    RateLimited,
    RequestError,
    ResourceConflict,
    SlicefabError,
    SliceInfo,
    SliceTelemetry,
    TransportTimeout,
)
from hostlib.client import Extent, LaneGroup, QoS
from hostlib.mailbox import MailboxClient, MailboxServer, create_mailbox

VM = "vm-a"
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
GiB = 1 << 30
GRANULE = 2 << 20
FIRST_SEQ = 41  # the counter the stand-in starts with: not 0, so a client that ignores it fails


class StandInFirmware:
    """The firmware's side of one VM mailbox, in a thread. Knobs (set between calls):

    - ``fail``: an error dict answered to every request but HELLO;
    - ``fail_unread``: the same, but as the firmware answers frames it did not read
      (opcode 0, tag 0), e.g. rate_limited;
    - ``stall``: seconds to sleep before answering, one entry consumed per non-HELLO request;
    - ``tamper``: applied to the next sealed response frame;
    - ``hello``: overrides merged into HELLO responses;
    - ``page_size`` / ``list_loop``: LIST pagination (and a broken one).
    """

    def __init__(self, path: Path, *, vm: str = VM, key: bytes = KEY) -> None:
        self.path, self.vm, self.key = path, vm, key
        self.last_seq = FIRST_SEQ
        self.boot_nonce = os.urandom(16)
        self.slices: dict[int, Payload] = {}
        self.next_id = 1
        self.done: dict[str, tuple[str, Payload, Payload]] = {}  # request id -> first result
        self.log: list[tuple[str, int, Payload]] = []
        self.fail: dict[str, Any] | None = None
        self.fail_unread: dict[str, Any] | None = None
        self.stall: list[float] = []
        self.tamper: Callable[[bytes, int], bytes] | None = None
        self.hello: dict[str, Any] = {}
        self.page_size = 100
        self.list_loop = False
        self.errors: list[BaseException] = []
        self._server = MailboxServer(path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ plumbing

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._server.serve_once(self.handle, 0.05)
            except hostlib.transport.PeerClosed:
                return
            except BaseException as e:  # a bug in the stand-in: fail the test at teardown
                self.errors.append(e)

    def close(self) -> None:
        """Stop serving and mark the mailbox CLOSED."""
        self._stop.set()
        self._thread.join(5)
        self._server.close()

    def requests(self, name: str | None = None) -> list[tuple[str, int, Payload]]:
        return [r for r in self.log if name is None or r[0] == name]

    def _seal(self, seq: int, message: bytes) -> bytes:
        frame = seal(self.key, RESPONSE_DOMAIN, self.vm, seq, message)
        if self.tamper is not None:
            frame, self.tamper = self.tamper(frame, seq), None
        return frame

    def handle(self, frame: bytes) -> bytes:
        try:
            message, seq = open_sealed(self.key, REQUEST_DOMAIN, self.vm, frame)
        except EnvelopeError:
            _, seq, _ = split(frame)
            error = {"code": "auth_failed", "message": "request does not authenticate"}
            return self._seal(seq, encode_error(Message(Category.REQUEST, 0, 0), error))
        req = decode_request(message)
        name, payload = req.command.name, req.payload
        self.log.append((name, seq, payload))
        if name != "HELLO":
            if seq <= self.last_seq:
                error = {"code": "replay", "message": f"{seq} is not above {self.last_seq}"}
                return self._seal(seq, encode_error(req.message, error))
            self.last_seq = seq
            if self.stall:
                time.sleep(self.stall.pop(0))
            if self.fail_unread is not None:
                unread = Message(Category.REQUEST, 0, 0)
                return self._seal(seq, encode_error(unread, self.fail_unread))
            if self.fail is not None:
                return self._seal(seq, encode_error(req.message, self.fail))
        try:
            result = self.execute(name, payload)
        except Refused as e:
            return self._seal(seq, encode_error(req.message, e.error))
        return self._seal(seq, encode_response(req.message, result))

    # ------------------------------------------------------------ the commands

    def execute(self, name: str, p: Payload) -> Payload:
        rid = p.get("request_id")
        if rid is not None:
            params = {k: v for k, v in p.items() if k != "request_id"}
            if rid in self.done:
                first_name, first_params, result = self.done[rid]
                if (first_name, first_params) != (name, params):
                    raise Refused("request_id_reused", f"request id {rid} was used for another")
                return result
        result = getattr(self, f"do_{name.lower()}", self.do_unsupported)(p)
        if rid is not None:
            self.done[rid] = (name, {k: v for k, v in p.items() if k != "request_id"}, result)
        return result

    def do_unsupported(self, p: Payload) -> Payload:
        raise Refused("unsupported", "not implemented by the stand-in")

    def do_hello(self, p: Payload) -> Payload:
        return {
            "client_nonce": p["client_nonce"],
            "boot_nonce": self.boot_nonce,
            "last_seq": self.last_seq,
            "abi_version": ABI_VERSION,
            "max_payload": 4096,
            "vm": self.vm,
            **self.hello,
        }

    def do_nop(self, p: Payload) -> Payload:
        return {"data": p["data"]}

    def do_allocate(self, p: Payload) -> Payload:
        sid, self.next_id = self.next_id, self.next_id + 1
        spec = {k: v for k, v in p.items() if k != "request_id"}
        cores = spec["cores"]
        memory = spec["memory"]
        lanes = spec["lanes"]
        self.slices[sid] = {
            "id": sid,
            "owner": self.vm,
            "state": "active",
            "spec": spec,
            "alloc": {
                "cores": [] if cores is None else list(cores["ids"] or range(cores["count"])),
                "extents": []
                if memory is None
                else [{"start": 100 * sid, "length": memory["size"] // GRANULE}],
                "lanes": None
                if lanes is None
                else {"port": 0, "first": lanes["first"] or 0, "width": lanes["width"]},
                "key": 3,
                "ports": [2] * spec["ports"],
            },
            "granule_bytes": GRANULE,
        }
        return self.slices[sid]

    def _slice(self, sid: int) -> Payload:
        if sid not in self.slices or self.slices[sid]["state"] == "freed":
            raise Refused("not_found", f"no slice {sid}", field="slice")
        return self.slices[sid]

    def do_resize(self, p: Payload) -> Payload:
        s = self._slice(p["slice"])
        if p["memory"] is not None:
            s["alloc"]["extents"] = [{"start": 100 * s["id"], "length": p["memory"] // GRANULE}]
        if p["cores"] is not None:
            s["alloc"]["cores"] = list(range(p["cores"]))
        if p["qos"] is not None:
            for k, v in p["qos"].items():
                if v is not None:
                    s["spec"]["qos"][k] = v
        return s

    def do_free(self, p: Payload) -> Payload:
        s = self._slice(p["slice"])
        s["state"] = "freed"
        return s

    def do_get(self, p: Payload) -> Payload:
        return self._slice(p["slice"])

    def do_list(self, p: Payload) -> Payload:
        live = [s for sid, s in sorted(self.slices.items()) if s["state"] != "freed"]
        after = [s for s in live if s["id"] >= p["start_id"]]
        page, rest = after[: self.page_size], after[self.page_size :]
        next_id = rest[0]["id"] if rest else 0
        if self.list_loop:
            next_id = p["start_id"] or 1  # never advances past the first page
        return {"total": len(live), "next_id": next_id, "slices": page}

    def do_slice_telemetry(self, p: Payload) -> Payload:
        s = self._slice(p["slice"])
        return {
            "slice": s["id"],
            "state": s["state"],
            "cores": len(s["alloc"]["cores"]),
            "memory_bytes": sum(e["length"] for e in s["alloc"]["extents"]) * GRANULE,
            "lane_width": 0 if s["alloc"]["lanes"] is None else s["alloc"]["lanes"]["width"],
            "ports": [
                {"port": 2, "packets": 10, "flits": 80, "drops": 1, "stalls": 4},
            ],
        }

    def do_device_info(self, p: Payload) -> Payload:
        return EXAMPLES[BY_NAME["DEVICE_INFO"].opcode][1]

    def do_keys(self, p: Payload) -> Payload:
        return EXAMPLES[BY_NAME["KEYS"].opcode][1]

    def do_get_ld_allocations(self, p: Payload) -> Payload:
        return EXAMPLES[BY_NAME["GET_LD_ALLOCATIONS"].opcode][1]

    def do_get_qos_allocated_bw(self, p: Payload) -> Payload:
        return EXAMPLES[BY_NAME["GET_QOS_ALLOCATED_BW"].opcode][1]

    def do_get_qos_bw_limit(self, p: Payload) -> Payload:
        return EXAMPLES[BY_NAME["GET_QOS_BW_LIMIT"].opcode][1]


class Refused(Exception):
    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.error = {"code": code, "message": message, "details": details}


@pytest.fixture
def fw(tmp_path: Path) -> Iterator[StandInFirmware]:
    path = tmp_path / "vm-a.mbox"
    create_mailbox(path)
    firmware = StandInFirmware(path)
    try:
        yield firmware
    finally:
        firmware.close()
    assert not firmware.errors, firmware.errors


@pytest.fixture
def cred(fw: StandInFirmware) -> Credential:
    return Credential(VM, KEY, str(fw.path))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def opened(cred: Credential, **kw: Any) -> AsyncIterator[AsyncClient]:
    client = await AsyncClient.open(cred, mailbox=cred.mailbox, **kw)
    try:
        yield client
    finally:
        await client.close()


# ---------------------------------------------------------------- session


def test_open_says_hello_with_seq_zero_then_counts_on_from_last_seq(
    fw: StandInFirmware, cred: Credential
) -> None:
    async def go() -> None:
        async with opened(cred) as c:
            assert c.session is not None
            assert c.session.last_seq == FIRST_SEQ
            assert c.session.boot_nonce == fw.boot_nonce
            assert c.session.vm == VM
            await c.nop(b"a")
            await c.nop(b"b")
            assert c.last_seq == FIRST_SEQ + 2

    run(go())
    (hello_name, hello_seq, hello), *rest = fw.log
    assert (hello_name, hello_seq) == ("HELLO", 0)
    assert len(hello["client_nonce"]) == 16
    assert [(n, s) for n, s, _ in rest] == [("NOP", FIRST_SEQ + 1), ("NOP", FIRST_SEQ + 2)]


def test_each_hello_carries_a_fresh_nonce(fw: StandInFirmware, cred: Credential) -> None:
    async def go() -> None:
        async with opened(cred) as c:
            await c.hello()

    run(go())
    nonces = [p["client_nonce"] for _, _, p in fw.requests("HELLO")]
    assert len(nonces) == 2 and nonces[0] != nonces[1]


def test_a_hello_answer_without_our_nonce_is_an_auth_error(
    fw: StandInFirmware, cred: Credential
) -> None:
    fw.hello = {"client_nonce": bytes(16)}
    with pytest.raises(AuthError, match="nonce"):
        run(AsyncClient.open(cred, mailbox=cred.mailbox))


def test_another_abi_major_version_is_refused(fw: StandInFirmware, cred: Credential) -> None:
    fw.hello = {"abi_version": ABI_VERSION + 0x100}
    with pytest.raises(ProtocolError) as e:
        run(AsyncClient.open(cred, mailbox=cred.mailbox))
    assert e.value.code == "unsupported"


def test_a_wrong_key_fails_at_open(fw: StandInFirmware, cred: Credential) -> None:
    wrong = Credential(VM, OTHER_KEY, cred.mailbox)
    with pytest.raises(AuthError) as e:
        run(AsyncClient.open(wrong, mailbox=cred.mailbox))
    # the stand-in said auth_failed, sealed with the real key: reported, never trusted
    assert e.value.details.get("unverified_code") == "auth_failed"
    assert fw.requests() == []  # the forged HELLO was refused before it was logged


# ---------------------------------------------------------------- the calls


def test_allocate_sends_the_spec_and_returns_a_slice_info(
    fw: StandInFirmware, cred: Credential
) -> None:
    async def go() -> SliceInfo:
        async with opened(cred) as c:
            return await c.allocate(
                cores=4,
                same_cluster=True,
                memory="4 GiB",
                lanes=4,
                endpoint="nvme0",
                priority=5,
                guaranteed="10 Gbit/s",
                maximum=25_000,
                name="web",
            )

    s = run(go())
    ((_, _, p),) = fw.requests("ALLOCATE")
    assert p["cores"] == {"count": 4, "same_cluster": True, "ids": None}
    assert p["memory"] == {"size": 4 * GiB, "contiguous": False}
    assert p["lanes"] == {"width": 4, "first": None, "endpoint": "nvme0"}
    assert p["qos"] == {"priority": 5, "guaranteed_mbps": 10_000, "maximum_mbps": 25_000}
    assert (p["key"], p["ports"], p["name"]) == (None, 1, "web")
    assert isinstance(p["request_id"], str) and len(p["request_id"]) == 32
    assert s == SliceInfo(
        id=1,
        owner=VM,
        name="web",
        state="active",
        cores=(0, 1, 2, 3),
        memory_bytes=4 * GiB,
        extents=(Extent(100 * GRANULE, 4 * GiB),),
        lanes=LaneGroup(0, 0, 4),
        key=3,
        ports=(2,),
        qos=QoS(5, 10_000, 25_000),
        granule_bytes=GRANULE,
    )
    assert s.live and s.spec["memory"] == {"size": 4 * GiB, "contiguous": False}


def test_allocate_with_explicit_cores_lanes_and_key(fw: StandInFirmware, cred: Credential) -> None:
    async def go() -> SliceInfo:
        async with opened(cred) as c:
            return await c.allocate(
                core_ids=[8, 9], lanes=8, first_lane=8, key=5, ports=2, request_id="r-1"
            )

    s = run(go())
    ((_, _, p),) = fw.requests("ALLOCATE")
    assert p["cores"] == {"count": 2, "same_cluster": False, "ids": [8, 9]}
    assert p["memory"] is None
    assert p["lanes"] == {"width": 8, "first": 8, "endpoint": None}
    assert (p["key"], p["ports"], p["request_id"]) == (5, 2, "r-1")
    assert s.cores == (8, 9) and s.lanes == LaneGroup(0, 8, 8) and s.memory_bytes == 0


def test_resize_free_get_round_trip(fw: StandInFirmware, cred: Credential) -> None:
    async def go() -> tuple[SliceInfo, SliceInfo, SliceInfo]:
        async with opened(cred) as c:
            s = await c.allocate(cores=2, memory="2 GiB")
            grown = await c.resize(s.id, memory="6 GiB", cores=4, guaranteed="20 Gbit/s")
            got = await c.get(s.id)
            freed = await c.free(s.id)
            with pytest.raises(NotFound) as e:
                await c.get(s.id)
            assert e.value.field == "slice"
            return grown, got, freed

    grown, got, freed = run(go())
    ((_, _, p),) = fw.requests("RESIZE")
    assert p["slice"] == 1 and p["memory"] == 6 * GiB and p["cores"] == 4
    assert p["qos"] == {"priority": None, "guaranteed_mbps": 20_000, "maximum_mbps": None}
    assert isinstance(p["request_id"], str)
    assert grown.memory_bytes == 6 * GiB and len(grown.cores) == 4
    assert grown.qos.guaranteed_mbps == 20_000
    assert got == grown
    assert freed.state == "freed" and not freed.live
    ((_, _, fp),) = fw.requests("FREE")
    assert fp["slice"] == 1 and isinstance(fp["request_id"], str)


def test_a_resize_with_nothing_to_change_is_refused_before_sending(
    fw: StandInFirmware, cred: Credential
) -> None:
    async def go() -> None:
        async with opened(cred) as c:
            with pytest.raises(RequestError) as e:
                await c.resize(1)
            assert e.value.field == "resize"

    run(go())
    assert fw.requests("RESIZE") == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"memory": "4 furlongs"}, "memory.size"),
        ({"memory": "1.5 B"}, "memory.size"),
        ({"cores": 1, "guaranteed": "fast"}, "qos.guaranteed"),
        ({"contiguous": True, "cores": 1}, "memory"),
        ({"endpoint": "nvme0", "cores": 1}, "lanes"),
        ({"same_cluster": True, "memory": 1}, "cores"),
    ],
)
def test_bad_arguments_are_request_errors_and_send_nothing(
    fw: StandInFirmware, cred: Credential, kwargs: dict[str, Any], field: str
) -> None:
    async def go() -> None:
        async with opened(cred) as c:
            with pytest.raises(RequestError) as e:
                await c.allocate(**kwargs)
            assert e.value.field == field

    run(go())
    assert fw.requests("ALLOCATE") == []


def test_a_value_that_does_not_fit_the_wire_is_a_request_error(
    fw: StandInFirmware, cred: Credential
) -> None:
    async def go() -> None:
        async with opened(cred) as c:
            with pytest.raises(RequestError) as e:
                await c.allocate(cores=70_000)  # a u16 on the wire
            assert "cores.count" in e.value.field
            with pytest.raises(ProtocolError) as big:
                await c.nop(bytes(5000))  # over the firmware's 4096-byte payload cap
            assert big.value.code == "payload_too_large"

    run(go())
    assert fw.requests("ALLOCATE") == [] and fw.requests("NOP") == []


def test_slices_fetches_every_page(fw: StandInFirmware, cred: Credential) -> None:
    fw.page_size = 2

    async def go() -> list[SliceInfo]:
        async with opened(cred) as c:
            for _ in range(5):
                await c.allocate(cores=1)
            await c.free(2)
            return await c.slices()

    got = run(go())
    assert [s.id for s in got] == [1, 3, 4, 5]
    assert [p["start_id"] for _, _, p in fw.requests("LIST")] == [0, 4]


def test_slices_refuses_pages_that_do_not_advance(fw: StandInFirmware, cred: Credential) -> None:
    fw.page_size, fw.list_loop = 1, True

    async def go() -> None:
        async with opened(cred) as c:
            await c.allocate(cores=1)
            await c.allocate(cores=1)
            with pytest.raises(ProtocolError, match="advance"):
                await c.slices()

    run(go())


def test_telemetry_device_info_and_nop(fw: StandInFirmware, cred: Credential) -> None:
    async def go() -> None:
        async with opened(cred) as c:
            s = await c.allocate(cores=2, memory=GRANULE * 3, lanes=2)
            t = await c.telemetry(s.id)
            assert isinstance(t, SliceTelemetry)
            assert (t.slice_id, t.state, t.cores, t.memory_bytes, t.lane_width) == (
                s.id,
                "active",
                2,
                3 * GRANULE,
                2,
            )
            assert [(p.port, p.packets, p.drops) for p in t.ports] == [(2, 10, 1)]
            info = await c.telemetry()
            assert isinstance(info, DeviceInfo)
            assert info == await c.device_info()
            assert (info.name, info.cores, info.keys) == ("sf-dpu0", 64, 16)
            assert [e.name for e in info.endpoints] == ["nvme0", "nvme1"]
            assert await c.nop(b"\x00ping") == b"\x00ping"

    run(go())


def test_raw_requests_and_the_fm_api_share(fw: StandInFirmware, cred: Credential) -> None:
    async def go() -> None:
        async with opened(cred) as c:
            assert (await c.request("KEYS", {}))["held"] == [3]
            await c.allocate(cores=1)
            share = await c.ld_share()
            assert share.ld_id == 3
            assert share.memory_bytes == 16 * 256 * (1 << 20)
            assert (share.guaranteed_fraction, share.limit_fraction) == (25, 64)
            with pytest.raises(ProtocolError) as e:
                await c.request("VM_ADD", {"vm": "x", "mailbox": "/x"})
            assert e.value.code == "opcode_not_allowed"
            with pytest.raises(ProtocolError) as u:
                await c.request("NO_SUCH", {})
            assert u.value.code == "unsupported"

    run(go())
    ld_requests = fw.requests("GET_LD_ALLOCATIONS")
    assert [p for _, _, p in ld_requests] == [{"start_ld_id": 3, "ld_allocation_list_limit": 1}]
    assert fw.requests("VM_ADD") == []


def test_ld_share_without_a_slice_is_not_found(fw: StandInFirmware, cred: Credential) -> None:
    async def go() -> None:
        async with opened(cred) as c:
            with pytest.raises(NotFound):
                await c.ld_share()

    run(go())


# ---------------------------------------------------------------- errors

#: the exception each device error code must raise (restated, not imported from hostlib)
EXPECTED: dict[str, type[SlicefabError]] = {
    "invalid": RequestError,
    "config": RequestError,
    "insufficient": InsufficientResources,
    "conflict": ResourceConflict,
    "allocation": AllocationError,
    "not_found": NotFound,
    "denied": PermissionDenied,
    "lifecycle": LifecycleError,
    "request_id_reused": IdempotencyConflict,
    "ledger": DeviceError,
    "fabric": DeviceError,
    "error": DeviceError,
    "auth_failed": AuthError,
    "replay": AuthError,
    "rate_limited": RateLimited,
    "opcode_not_allowed": ProtocolError,
    "payload_too_large": ProtocolError,
    "malformed": ProtocolError,
    "unsupported": ProtocolError,
}


def test_the_table_covers_every_code_on_the_wire() -> None:
    assert set(EXPECTED) == set(ERRORS)


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_every_error_code_raises_its_exception(
    fw: StandInFirmware, cred: Credential, code: str
) -> None:
    fw.fail = {"code": code, "message": f"it is {code}", "details": {"field": "cores.count"}}

    async def go() -> SlicefabError:
        async with opened(cred) as c:
            with pytest.raises(SlicefabError) as e:
                await c.allocate(cores=1)
            return e.value

    err = run(go())
    assert type(err) is EXPECTED[code]
    assert (err.code, err.message, err.field) == (code, f"it is {code}", "cores.count")


def test_an_error_answering_an_unread_frame_keeps_its_code(
    fw: StandInFirmware, cred: Credential
) -> None:
    # the firmware answers rate_limited without reading the request: opcode 0, tag 0
    fw.fail_unread = {"code": "rate_limited", "message": "too many bad requests"}

    async def go() -> None:
        async with opened(cred) as c:
            with pytest.raises(RateLimited):
                await c.nop()

    run(go())


def flip_last_byte(frame: bytes, seq: int) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 1])


def reseal(key: bytes, seq_delta: int = 0) -> Callable[[bytes, int], bytes]:
    def tamper(frame: bytes, seq: int) -> bytes:
        message, _, _ = split(frame)
        return seal(key, RESPONSE_DOMAIN, VM, seq + seq_delta, message)

    return tamper


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (flip_last_byte, "does not verify"),
        (reseal(OTHER_KEY), "does not verify"),
        (reseal(KEY, seq_delta=-1), "stale or replayed"),
        (lambda frame, seq: frame[:10], "does not verify"),  # truncated: shorter than a trailer
        (lambda frame, seq: b"", "does not verify"),  # the firmware's answer once revoked
    ],
    ids=["bad-tag", "other-key", "other-seq", "truncated", "empty"],
)
def test_a_response_that_does_not_verify_is_an_auth_error(
    fw: StandInFirmware, cred: Credential, tamper: Callable[[bytes, int], bytes], match: str
) -> None:
    async def go() -> None:
        async with opened(cred) as c:
            fw.tamper = tamper
            with pytest.raises(AuthError, match=match):
                await c.nop(b"x")
            assert await c.nop(b"y") == b"y"  # the session goes on: the number was used up

    run(go())


def test_a_success_response_for_another_command_is_a_protocol_error(
    fw: StandInFirmware, cred: Credential
) -> None:
    def answer_device_info(frame: bytes, seq: int) -> bytes:
        request = Message(Category.REQUEST, seq & 0xFF, BY_NAME["DEVICE_INFO"].opcode)
        body = encode_response(request, fw.do_device_info({}))
        return seal(KEY, RESPONSE_DOMAIN, VM, seq, body)

    async def go() -> None:
        async with opened(cred) as c:
            fw.tamper = answer_device_info
            with pytest.raises(ProtocolError, match="answers a NOP"):
                await c.nop()

    run(go())


# ---------------------------------------------------------------- recoveries


def test_a_replay_refusal_resyncs_once_and_retries(fw: StandInFirmware, cred: Credential) -> None:
    async def go() -> None:
        async with opened(cred) as c:
            await c.nop()
            fw.last_seq += 100  # another process with this credential moved the counter on
            assert await c.nop(b"again") == b"again"
            assert c.last_seq == FIRST_SEQ + 102

    run(go())
    assert [(n, s) for n, s, _ in fw.log] == [
        ("HELLO", 0),
        ("NOP", FIRST_SEQ + 1),
        ("NOP", FIRST_SEQ + 2),  # refused: not above FIRST_SEQ + 101
        ("HELLO", 0),
        ("NOP", FIRST_SEQ + 102),
    ]


def test_a_persistent_replay_refusal_gives_up_after_one_resync(
    fw: StandInFirmware, cred: Credential
) -> None:
    async def go() -> None:
        async with opened(cred) as c:
            fw.fail = {"code": "replay", "message": "no"}
            with pytest.raises(AuthError) as e:
                await c.nop()
            assert e.value.code == "replay"

    run(go())
    assert [n for n, _, _ in fw.log] == ["HELLO", "NOP", "HELLO", "NOP"]


def test_a_timeout_is_retried_once_with_the_same_request_id(
    fw: StandInFirmware, cred: Credential
) -> None:
    fw.stall = [0.7]  # the first attempt is answered after the client gave up on it

    async def go() -> SliceInfo:
        async with opened(cred, timeout=0.5) as c:
            return await c.allocate(cores=2)

    s = run(go())
    first, second = fw.requests("ALLOCATE")
    assert second[1] == first[1] + 1  # a new sequence number ...
    assert second[2] == first[2]  # ... for the very same request, request id included
    assert list(fw.slices) == [s.id]  # executed once


def test_a_second_timeout_is_raised_as_a_transport_timeout(
    fw: StandInFirmware, cred: Credential
) -> None:
    fw.stall = [0.7, 0.7]

    async def go() -> None:
        async with opened(cred, timeout=0.5) as c:
            with pytest.raises(TransportTimeout) as e:
                await c.free(1, request_id="free-1")
            # both trees: hostlib's root and the transport's own class
            assert isinstance(e.value, SlicefabError)
            assert isinstance(e.value, hostlib.transport.TransportTimeout)
            assert isinstance(e.value.__cause__, hostlib.transport.TransportTimeout)

    run(go())
    assert [p["request_id"] for _, _, p in fw.requests("FREE")] == ["free-1", "free-1"]


def test_concurrent_tasks_are_serialised_in_sequence_order(
    fw: StandInFirmware, cred: Credential
) -> None:
    async def go() -> list[bytes]:
        async with opened(cred) as c:
            return await asyncio.gather(*(c.nop(bytes([i])) for i in range(20)))

    assert run(go()) == [bytes([i]) for i in range(20)]
    seqs = [s for n, s, _ in fw.log if n == "NOP"]
    assert seqs == list(range(FIRST_SEQ + 1, FIRST_SEQ + 21))


def test_calls_after_close_and_after_the_firmware_closed_raise_peer_closed(
    fw: StandInFirmware, cred: Credential
) -> None:
    async def go() -> None:
        c = await AsyncClient.open(cred, mailbox=cred.mailbox)
        await c.close()
        await c.close()  # idempotent
        with pytest.raises(PeerClosed):
            await c.nop()
        c2 = await AsyncClient.open(cred, mailbox=cred.mailbox)
        fw.close()
        with pytest.raises(PeerClosed) as e:
            await c2.nop()
        assert isinstance(e.value, hostlib.transport.PeerClosed)
        await c2.close()

    run(go())


# ---------------------------------------------------------------- the sync wrapper


def test_device_runs_the_same_calls_synchronously(fw: StandInFirmware, cred: Credential) -> None:
    with Device.open(cred, mailbox=cred.mailbox) as dev:
        assert dev.session is not None and dev.session.last_seq == FIRST_SEQ
        s = dev.allocate(cores=2, memory="2 GiB", request_id="sync-1")
        assert dev.allocate(cores=2, memory="2 GiB", request_id="sync-1") == s  # idempotent
        with pytest.raises(IdempotencyConflict):
            dev.allocate(cores=3, request_id="sync-1")
        assert dev.resize(s.id, memory="4 GiB").memory_bytes == 4 * GiB
        assert [x.id for x in dev.slices()] == [s.id]
        assert dev.get(s.id).memory_bytes == 4 * GiB
        assert dev.telemetry(s.id).memory_bytes == 4 * GiB
        assert dev.telemetry().name == "sf-dpu0"
        assert dev.device_info().keys == 16
        assert dev.nop(b"z") == b"z"
        assert dev.free(s.id).state == "freed"
    assert dev.closed
    dev.close()  # idempotent
    with pytest.raises(PeerClosed):
        dev.nop()
    assert fw.requests("HELLO")[0][1] == 0


def test_device_is_usable_from_several_threads(fw: StandInFirmware, cred: Credential) -> None:
    with Device.open(cred, mailbox=cred.mailbox) as dev:
        results: list[bytes] = []

        def worker(i: int) -> None:
            for j in range(5):
                results.append(dev.nop(bytes([i, j])))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert sorted(results) == sorted(bytes([i, j]) for i in range(4) for j in range(5))
    seqs = [s for n, s, _ in fw.log if n == "NOP"]
    assert seqs == sorted(seqs) and len(set(seqs)) == 20


def test_device_calls_over_a_mailbox_never_run_the_event_loop(
    fw: StandInFirmware, cred: Credential, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mailbox can block: a call is stepped by hand, its round trip is the blocking
    request, and the event loop (a pass per call and per poll) stays out of it."""
    with Device.open(cred, mailbox=cred.mailbox) as dev:

        def no_loop(*args: Any) -> Any:
            raise AssertionError("the event loop ran")

        monkeypatch.setattr(dev._loop, "run_until_complete", no_loop)
        assert dev.nop(b"direct") == b"direct"
        s = dev.allocate(cores=1, request_id="direct-1")
        with pytest.raises(NotFound):  # a device error comes out of the stepped call too
            dev.free(s.id + 1000)
        assert dev.free(s.id).state == "freed"
        monkeypatch.undo()


class _AsyncOnly:
    """A transport that cannot block: only ``arequest``."""

    def __init__(self, inner: MailboxClient) -> None:
        self.inner = inner

    async def arequest(self, frame: bytes, timeout: float) -> bytes:
        return await self.inner.arequest(frame, timeout)

    def close(self) -> None:
        self.inner.close()


def test_device_over_a_transport_that_cannot_block_runs_on_its_loop(
    fw: StandInFirmware, cred: Credential
) -> None:
    transport = _AsyncOnly(MailboxClient(fw.path))
    try:
        with Device.open(cred, transport=transport) as dev:
            assert dev.client._blocking is None
            assert dev.nop(b"loop") == b"loop"
    finally:
        transport.close()


def test_a_device_call_that_suspends_after_all_is_finished_by_the_loop(
    fw: StandInFirmware, cred: Credential
) -> None:
    with Device.open(cred, mailbox=cred.mailbox) as dev:
        assert dev.client._blocking is not None

        async def suspends(fail: bool) -> str:
            before = await dev.client.nop(b"a")  # stepped by hand, like every call
            await asyncio.sleep(0)  # a real suspension: only a loop can go on from here
            after = await dev.client.nop(b"b")
            if fail:
                raise ValueError("after the suspension")
            return (before + after).decode()

        async def catches() -> str:
            fut = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(fut.set_exception, KeyError("k"))
            try:
                await fut  # the loop throws the failure into the coroutine
            except KeyError:
                return "caught"
            return "missed"

        async def first_suspends() -> str:
            await asyncio.sleep(0)
            return await catches()

        assert dev._run(lambda: suspends(False)) == "ab"
        with pytest.raises(ValueError, match="after the suspension"):
            dev._run(lambda: suspends(True))
        assert dev._run(first_suspends) == "caught"
        assert dev.nop(b"c") == b"c"  # and the next call is stepped again


def test_device_refuses_a_call_from_a_running_event_loop(
    fw: StandInFirmware, cred: Credential
) -> None:
    with Device.open(cred, mailbox=cred.mailbox) as dev:

        async def inside() -> bytes:
            return dev.nop(b"x")

        with pytest.raises(RuntimeError, match="running event loop"):
            asyncio.run(inside())
        assert dev.nop(b"y") == b"y"


def test_device_open_finds_the_host_file_from_a_credential_file(
    fw: StandInFirmware, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "credential.toml"
    path.write_text(f'vm = "{VM}"\nkey = "{KEY.hex()}"\nmailbox = "{fw.path}"\n')
    monkeypatch.setenv("SLICEFAB_CREDENTIALS", str(path))
    monkeypatch.setattr(hostlib.discovery, "pci_devices", list)  # no PCI device: a host VM
    with Device.open() as dev:
        assert dev.client.credential.path == path
        assert dev.nop(b"found") == b"found"


def test_open_tries_each_discovered_mailbox_until_one_verifies(
    fw: StandInFirmware, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other.mbox"
    create_mailbox(other)
    stranger = StandInFirmware(other, vm="vm-b", key=OTHER_KEY)  # another VM's mailbox
    try:
        paths = [str(other), str(fw.path)]
        monkeypatch.setattr(hostlib.client, "find_mailboxes", lambda cred: paths)
        with Device.open(Credential(VM, KEY, "/nonexistent")) as dev:
            assert dev.client.session is not None and dev.client.session.vm == VM
            assert dev.nop(b"mine") == b"mine"
    finally:
        stranger.close()
    assert stranger.log == []  # nothing of ours ever authenticated there
