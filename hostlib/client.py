"""The VM's client of the secure allocation API: :class:`AsyncClient` and its sync twin
:class:`Device`.

One request, end to end (DESIGN.md "The data flow")::

    cci   = abi.commands.encode_request(opcode, payload, tag=seq & 0xFF)
    frame = abi.envelope.seal(key, REQUEST_DOMAIN, vm, seq, cci)     ──► mailbox ──► firmware
    reply = abi.envelope.open_sealed(key, RESPONSE_DOMAIN, vm, ...)  ◄── mailbox ◄──
            echoed seq == seq, then abi.commands.decode_response(...) -> payload or error

**Session.** :meth:`AsyncClient.open` sends HELLO with sequence number 0 (the one request
the firmware does not require to increase) and a fresh 16-byte nonce; the sealed answer
must echo the nonce and gives ``last_seq``, the last number the firmware accepted from
this VM. Every later request uses the next number, so numbers strictly increase across
processes and firmware restarts (the firmware keeps the counter durable). A request
refused as a *replay* (another process with the same credential moved the counter on)
is answered by one re-HELLO and one retry under the new counter.

**One request at a time.** A mailbox carries one outstanding request; the client holds an
``asyncio.Lock`` across each round trip, so sequence numbers are sent in order.

**Idempotent retries.** Every mutating call (allocate, resize, free) carries a request id:
the caller's, or a random one the client draws. When the transport times out, the client
sends the request once more under a new sequence number but with the *same* request id;
the firmware executes a request id at most once and answers a repeat with the first
result, so a retry never allocates twice. Read-only calls are retried the same way.

**Errors** are one tree (:mod:`hostlib.errors`): the device's return codes become the
exception of the same code; a response that does not verify is :class:`AuthError`;
transport failures are :class:`hostlib.errors.TransportError` and its subclasses.

hostlib never imports ``firmware``: sizes such as ``"4 GiB"`` are parsed here with the
same units as ``firmware.units``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import threading
import types
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Concatenate, Final, ParamSpec, TypeVar, cast, overload

from abi import convert
from abi.cci import MAX_PAYLOAD
from abi.commands import (
    Command,
    Response,
    Role,
    allowed_opcodes,
    decode_response,
    encode_request,
    lookup,
)
from abi.envelope import (
    MAX_SEQ,
    REQUEST_DOMAIN,
    RESPONSE_DOMAIN,
    EnvelopeError,
    open_sealed,
    seal,
    split,
)
from abi.errors import DecodeError, EncodeError, UnknownOpcode
from abi.layout import Payload
from abi.units import (
    BANDWIDTH_UNITS_MBPS,
    BANDWIDTH_WHAT,
    SIZE_UNITS,
    SIZE_WHAT,
    QuantityError,
    parse_quantity,
)
from abi.vendor import ABI_VERSION, NONCE_BYTES
from hostlib import transport as _t
from hostlib.credentials import Credential, load_credential
from hostlib.discovery import find_mailboxes
from hostlib.errors import (
    AuthError,
    NotFound,
    PeerClosed,
    ProtocolError,
    RequestError,
    SlicefabError,
    TransportError,
    TransportTimeout,
    error_from_dict,
    wrap_transport_error,
)
from hostlib.mailbox import MailboxClient

#: seconds one round trip may take (an allocation waits for the ledger and the fabric)
DEFAULT_TIMEOUT: Final = 10.0

#: slice states in which a slice holds units (firmware.slices.LIVE_STATES)
LIVE_STATES: Final = frozenset({"reserved", "programmed", "active"})

_HELLO_SEQ: Final = 0

# ------------------------------------------------------------------ quantities


def _quantity(value: object, fld: str, units: Mapping[str, int], what: str) -> int:
    try:
        return parse_quantity(value, units, what)
    except QuantityError as e:
        raise RequestError(e.message, details={"field": fld, **e.details}) from None


def parse_size(value: int | str, fld: str = "memory") -> int:
    """Bytes from ``4294967296`` or ``"4 GiB"`` (units as in slice files).

    Raises:
        RequestError: not a size; ``field`` is ``fld``.
    """
    return _quantity(value, fld, SIZE_UNITS, SIZE_WHAT)


def parse_bandwidth(value: int | str, fld: str = "qos") -> int:
    """Mbit/s from ``10000`` or ``"10 Gbit/s"`` (units as in slice files).

    Raises:
        RequestError: not a bandwidth; ``field`` is ``fld``.
    """
    return _quantity(value, fld, BANDWIDTH_UNITS_MBPS, BANDWIDTH_WHAT)


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class QoS:
    """A slice's quality of service, per crossbar port it holds."""

    priority: int  # 0 (lowest) .. 7
    guaranteed_mbps: int  # admitted guaranteed bandwidth
    maximum_mbps: int  # token-bucket limit; 0: the port's capacity


@dataclass(frozen=True)
class Extent:
    """One memory extent of a slice, in bytes of device physical address space (DPA =
    granule index × granule size, as in the CXL Dynamic Capacity commands)."""

    dpa: int
    size: int


@dataclass(frozen=True)
class LaneGroup:
    """The PCIe lanes a slice holds: ``width`` lanes from global lane ``first`` on ``port``."""

    port: int
    first: int
    width: int


@dataclass(frozen=True)
class SliceInfo:
    """One slice as the device reports it: what it holds, and what was asked for."""

    id: int
    owner: str
    name: str
    state: str  # requested, reserved, programmed, active, releasing, freed, error
    cores: tuple[int, ...]  # core ids held
    memory_bytes: int
    extents: tuple[Extent, ...]
    lanes: LaneGroup | None
    key: int  # protection key (the VM's LD id in the CXL FM API commands)
    ports: tuple[int, ...]  # crossbar ports held
    qos: QoS
    granule_bytes: int
    #: the request as the firmware recorded it (the shape of a slice file, sizes in bytes)
    spec: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def live(self) -> bool:
        """Whether the slice holds units (reserved, programmed or active)."""
        return self.state in LIVE_STATES

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> SliceInfo:
        """From a SLICE payload (ALLOCATE, RESIZE, FREE, GET, LIST)."""
        view = convert.slice_view_from_payload(payload)
        alloc, granule = view["alloc"], view["granule_bytes"]
        lanes = alloc["lanes"]
        qos = view["spec"]["qos"]
        return cls(
            id=view["id"],
            owner=view["owner"],
            name=view["name"],
            state=view["state"],
            cores=tuple(alloc["cores"]),
            memory_bytes=view["memory_bytes"],
            extents=tuple(Extent(s * granule, n * granule) for s, n in alloc["extents"]),
            lanes=None
            if lanes is None
            else LaneGroup(lanes["port"], lanes["first"], lanes["width"]),
            key=alloc["key"],
            ports=tuple(alloc["ports"]),
            qos=QoS(qos["priority"], qos["guaranteed"], qos["maximum"]),
            granule_bytes=granule,
            spec=view["spec"],
        )


@dataclass(frozen=True)
class PortCounters:
    """The counters of one crossbar port (the crossbar's CNT_* registers)."""

    port: int
    packets: int
    flits: int
    drops: int  # packets the permission table dropped
    stalls: int  # token-bucket stall cycles


@dataclass(frozen=True)
class SliceTelemetry:
    """A slice's sizes and the counters of its crossbar ports. The ports belong to the
    VM, so their counters include the VM's other slices on them."""

    slice_id: int
    state: str
    cores: int
    memory_bytes: int
    lane_width: int  # 0: no lanes
    ports: tuple[PortCounters, ...]

    @classmethod
    def from_payload(cls, p: Mapping[str, Any]) -> SliceTelemetry:
        """From a SLICE_TELEMETRY response payload."""
        return cls(
            p["slice"],
            p["state"],
            p["cores"],
            p["memory_bytes"],
            p["lane_width"],
            tuple(PortCounters(**c) for c in p["ports"]),
        )


@dataclass(frozen=True)
class Endpoint:
    """A device behind fixed PCIe lanes (e.g. an NVMe SSD) that a slice can pin."""

    name: str
    kind: str
    port: int
    first_lane: int
    width: int


@dataclass(frozen=True)
class DeviceInfo:
    """The device's inventory (DEVICE_INFO): what there is, not what is free."""

    name: str
    model: str
    abi_version: int  # major << 8 | minor
    clusters: tuple[int, ...]  # cores per cluster
    memory_bytes: int
    granule_bytes: int
    max_extents_per_slice: int
    port_lanes: tuple[int, ...]  # lanes per PCIe port
    endpoints: tuple[Endpoint, ...]
    keys: int
    crossbar_ports: int
    port_mbps: int
    data_width_bits: int
    clock_mhz: int

    @property
    def cores(self) -> int:
        """Total cores."""
        return sum(self.clusters)

    @classmethod
    def from_payload(cls, p: Mapping[str, Any]) -> DeviceInfo:
        """From a DEVICE_INFO response payload."""
        return cls(
            name=p["name"],
            model=p["model"],
            abi_version=p["abi_version"],
            clusters=tuple(p["clusters"]),
            memory_bytes=p["memory_bytes"],
            granule_bytes=p["granule_bytes"],
            max_extents_per_slice=p["max_extents_per_slice"],
            port_lanes=tuple(p["port_lanes"]),
            endpoints=tuple(Endpoint(**e) for e in p["endpoints"]),
            keys=p["keys"],
            crossbar_ports=p["crossbar_ports"],
            port_mbps=p["port_mbps"],
            data_width_bits=p["data_width_bits"],
            clock_mhz=p["clock_mhz"],
        )


@dataclass(frozen=True)
class LdShare:
    """This VM's logical device as the CXL FM API sees it (LD id = its protection key):
    its memory, and its guaranteed and maximum bandwidth in 1/256ths of a crossbar port."""

    ld_id: int
    memory_bytes: int  # range 1 × memory granularity (rounded up to the FM API's unit)
    guaranteed_fraction: int  # /256 of a port
    limit_fraction: int  # /256 of a port (255: the whole port)


@dataclass(frozen=True)
class Session:
    """What HELLO told: the identity the mailbox is bound to and the firmware's state."""

    vm: str
    boot_nonce: bytes  # changes when the firmware restarts
    last_seq: int  # the last sequence number the firmware had accepted at HELLO
    abi_version: int
    max_payload: int  # the firmware's request payload cap, bytes


# ------------------------------------------------------------------ the client


def _encode_error(e: EncodeError) -> SlicefabError:
    """A request that cannot be put on the wire: too large for the firmware, or a value
    out of its field's range (what the device would refuse as *invalid*)."""
    if e.field == "header.payload_length":
        return ProtocolError(str(e), code="payload_too_large", details=e.details())
    return RequestError(str(e), code="invalid", details=e.details())


def _unverified_claim(frame: bytes) -> str | None:
    """The error code an unverifiable response *claims*, for the message only (it is not
    trusted): the firmware may answer a request it could not authenticate without a
    valid seal."""
    candidates = [frame]
    with contextlib.suppress(EnvelopeError):
        candidates.append(split(frame)[0])
    for candidate in candidates:
        try:
            rsp = decode_response(candidate)
        except DecodeError:
            continue
        return None if rsp.error is None else str(rsp.error.get("code"))
    return None


#: the opcodes a VM may send (request() refuses the others before sending anything)
_VM_OPCODES: Final = allowed_opcodes(Role.VM)


class AsyncClient:
    """A VM's session with the device over its mailbox (asyncio).

    Open one with :meth:`open`; use it as an async context manager or call :meth:`close`.
    Calls from several tasks are serialised (one request is outstanding per mailbox).

    Every call may raise, besides what it lists:

    - :class:`~hostlib.errors.AuthError`: the response does not verify with this VM's key,
      answers another request or session, or the device refused the request's MAC or its
      sequence number even after one re-HELLO;
    - :class:`~hostlib.errors.RateLimited`: the device is ignoring this mailbox for a while
      after too many bad requests;
    - :class:`~hostlib.errors.ProtocolError`: a response this library cannot decode, or a
      request the device refused as malformed, too large or not allowed;
    - :class:`~hostlib.errors.DeviceError`: the device failed (ledger, fabric, internal);
    - :class:`~hostlib.errors.TransportError`: the round trip failed even after one retry
      (:class:`~hostlib.errors.TransportTimeout`), the firmware or this client closed the
      mailbox (:class:`~hostlib.errors.PeerClosed`), a frame too large for the mailbox.
    """

    def __init__(
        self,
        credential: Credential,
        transport: _t.AsyncClientTransport,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        owns_transport: bool = True,
    ) -> None:
        """Wrap an open channel; no request is sent. Prefer :meth:`open`, which also
        starts the session (:meth:`hello`)."""
        self.credential = credential
        self.timeout = timeout
        self._transport = transport
        self._owns_transport = owns_transport
        self._lock = asyncio.Lock()
        self._seq = 0  # the last sequence number used
        self._session: Session | None = None
        self._max_payload = MAX_PAYLOAD
        self._closed = False
        #: the transport's blocking ``request`` when :class:`Device` drives this client
        #: outside any event loop (see Device._run); None: ``await arequest``
        self._blocking: Callable[[bytes, float], bytes] | None = None

    # -------------------------------------------------------------- life cycle

    @classmethod
    async def open(
        cls,
        credential: Credential | str | os.PathLike[str] | None = None,
        *,
        mailbox: str | os.PathLike[str] | None = None,
        transport: _t.AsyncClientTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> AsyncClient:
        """Connect and start a session (HELLO).

        ``credential``: a :class:`Credential`, or the path of a credential file (default:
        ``$SLICEFAB_CREDENTIALS``, else ``/etc/slicefab/credential.toml``).
        ``mailbox``: the mailbox to map (a host file, or a guest's ``resource2``) instead
        of discovering it. ``transport``: an already open channel to use instead (the
        client does not close it). Without either, :func:`hostlib.discovery.find_mailboxes`
        decides; when it finds several mailboxes, the first whose HELLO answer verifies
        with this credential is used.

        Raises:
            CredentialError: the credential file is missing or malformed.
            DeviceNotFound: discovery found no mailbox.
            AuthError: the HELLO answer does not verify (wrong or revoked credential, a
                mailbox that is not this VM's) or does not echo the nonce.
            ProtocolError: the firmware speaks another ABI major version.
            TransportError: the mailbox cannot be mapped, or the firmware does not
                answer in ``timeout`` seconds (TransportTimeout) or is closed (PeerClosed).
        """
        cred = credential if isinstance(credential, Credential) else load_credential(credential)
        if transport is not None:
            client = cls(cred, transport, timeout=timeout, owns_transport=False)
            await client.hello()
            return client
        paths = [os.fspath(mailbox)] if mailbox is not None else find_mailboxes(cred)
        failure: SlicefabError | None = None
        for path in paths:
            try:
                channel = MailboxClient(path)
            except _t.TransportError as e:
                failure = wrap_transport_error(e)
                failure.__cause__ = e
                continue
            client = cls(cred, channel, timeout=timeout)
            try:
                await client.hello()
            except (AuthError, TransportError) as e:
                await client.close()
                failure = e
                continue
            except BaseException:
                await client.close()
                raise
            return client
        assert failure is not None  # find_mailboxes never returns an empty list
        raise failure

    async def close(self) -> None:
        """End the session and release the mailbox (unless the transport was given to
        :meth:`open`). Idempotent; a call waiting in another task fails with PeerClosed."""
        if self._closed:
            return
        self._closed = True
        if self._owns_transport:
            self._transport.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def session(self) -> Session | None:
        """What the last HELLO told (None before the first)."""
        return self._session

    @property
    def last_seq(self) -> int:
        """The last sequence number this client used."""
        return self._seq

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -------------------------------------------------------------- the wire

    def _check_open(self) -> None:
        if self._closed:
            raise PeerClosed("the client is closed")

    async def _exchange(self, cmd: Command, payload: Mapping[str, Any], seq: int) -> Response:
        """One round trip of request ``seq``: seal, send, verify, decode. The caller holds
        the lock. Raises what the class docstring lists, except device error codes, which
        come back in the Response."""
        try:
            message = encode_request(
                cmd.opcode, payload, tag=seq & 0xFF, max_payload=self._max_payload
            )
        except EncodeError as e:
            raise _encode_error(e) from e
        key, vm = self.credential.key, self.credential.vm
        frame = seal(key, REQUEST_DOMAIN, vm, seq, message)
        try:
            if self._blocking is not None:
                raw = self._blocking(frame, self.timeout)
            else:
                raw = await self._transport.arequest(frame, self.timeout)
        except _t.TransportError as e:
            raise wrap_transport_error(e) from e
        try:
            body, echoed = open_sealed(key, RESPONSE_DOMAIN, vm, raw)
        except EnvelopeError:
            claim = _unverified_claim(raw)
            raise AuthError(
                f"the response to {cmd.name} does not verify with the key of {vm}: a wrong "
                "or revoked credential, or not the firmware answering"
                + (f" (it claims {claim!r}, unauthenticated)" if claim else ""),
                details={"unverified_code": claim} if claim else None,
            ) from None
        if echoed != seq:
            raise AuthError(
                f"the response answers request {echoed}, not {seq}: stale or replayed",
                details={"seq": seq, "echoed": echoed},
            )
        try:
            rsp = decode_response(body, max_payload=max(MAX_PAYLOAD, self._max_payload))
        except DecodeError as e:
            raise ProtocolError(
                f"undecodable response to {cmd.name}: {e}", details=e.details()
            ) from e
        if rsp.error is not None:
            # An error may answer a request the firmware could not read (opcode and tag
            # 0, e.g. rate_limited); the sealed, echoed seq already ties it to this one.
            return rsp
        if rsp.command is None or rsp.command.opcode != cmd.opcode or rsp.message.tag != seq & 0xFF:
            raise ProtocolError(
                f"a response to opcode {rsp.message.opcode:04X}h (tag {rsp.message.tag}) "
                f"answers a {cmd.name} request (tag {seq & 0xFF})"
            )
        if rsp.payload is None:
            raise ProtocolError(f"{cmd.name} started a background operation; none is expected")
        return rsp

    async def _hello_locked(self) -> Session:
        nonce = secrets.token_bytes(NONCE_BYTES)
        rsp = await self._exchange(lookup("HELLO"), {"client_nonce": nonce}, _HELLO_SEQ)
        if rsp.error is not None:
            raise error_from_dict(rsp.error)
        p = rsp.payload
        assert p is not None
        if p["client_nonce"] != nonce:
            raise AuthError("the HELLO response does not echo this session's nonce: replayed")
        if p["abi_version"] >> 8 != ABI_VERSION >> 8:
            raise ProtocolError(
                f"the device speaks ABI {p['abi_version'] >> 8}.{p['abi_version'] & 0xFF}, "
                f"this library {ABI_VERSION >> 8}.x",
                code="unsupported",
            )
        if p["vm"] and p["vm"] != self.credential.vm:
            raise AuthError(f"the mailbox is bound to {p['vm']!r}, not {self.credential.vm!r}")
        if p["last_seq"] >= MAX_SEQ:
            raise AuthError("the sequence numbers of this credential are exhausted: renew it")
        self._seq = p["last_seq"]
        if p["max_payload"] > 0:
            self._max_payload = p["max_payload"]
        self._session = Session(
            vm=p["vm"] or self.credential.vm,
            boot_nonce=p["boot_nonce"],
            last_seq=p["last_seq"],
            abi_version=p["abi_version"],
            max_payload=p["max_payload"],
        )
        return self._session

    async def hello(self) -> Session:
        """(Re)start the session: learn the firmware's counter for this VM, its ABI
        version and payload cap. :meth:`open` does this; call it again only to
        resynchronise by hand.

        Raises:
            AuthError: the answer does not verify or does not echo this HELLO's nonce, or
                names another VM.
            ProtocolError: another ABI major version.
        """
        self._check_open()
        async with self._lock:
            return await self._hello_locked()

    async def _call(self, name: str, payload: Mapping[str, Any]) -> Payload:
        """One request under the next sequence number, with the session's two recoveries:
        one re-HELLO on a *replay* refusal, one resend after a transport time-out (same
        payload, so the same request id). Raises the exception of the device's error."""
        return await self._call_command(lookup(name), payload)

    async def _call_command(self, cmd: Command, payload: Mapping[str, Any]) -> Payload:
        self._check_open()
        async with self._lock:
            resynced = resent = False
            while True:
                if self._seq >= MAX_SEQ:
                    raise AuthError("the sequence numbers of this credential are exhausted")
                self._seq += 1  # used up even if the round trip fails: it may have arrived
                try:
                    rsp = await self._exchange(cmd, payload, self._seq)
                except TransportTimeout:
                    if resent:
                        raise
                    resent = True
                    continue
                if rsp.error is None:
                    assert rsp.payload is not None
                    return rsp.payload
                err = error_from_dict(rsp.error)
                if err.code == "replay" and not resynced:
                    resynced = True
                    await self._hello_locked()
                    continue
                raise err

    @staticmethod
    def _request_id(given: str | None) -> str:
        return given if given is not None else secrets.token_hex(16)

    # -------------------------------------------------------------- the API

    async def request(self, command: str, payload: Mapping[str, Any]) -> Payload:
        """Send any command a VM may use (``abi.commands.BY_NAME``) with a raw payload
        dict and return the raw response payload: the way to the commands that have no
        method here (CORES, MEMORY, LANES, KEYS, PORTS, ...).

        Raises:
            ProtocolError: ``command`` is not in the table (``unsupported``) or is an admin
                command (``opcode_not_allowed``), refused before anything is sent.
            RequestError: ``payload`` does not fit the command's layout.
            SlicefabError: the device's error, as for every call.
        """
        try:
            cmd = lookup(command)
        except UnknownOpcode:
            raise ProtocolError(f"unknown command {command!r}", code="unsupported") from None
        if cmd.opcode not in _VM_OPCODES:
            raise ProtocolError(
                f"{cmd.name} is an administrator's command; a VM mailbox refuses it",
                code="opcode_not_allowed",
            )
        return await self._call_command(cmd, payload)

    async def allocate(
        self,
        *,
        cores: int | None = None,
        core_ids: Sequence[int] | None = None,
        same_cluster: bool = False,
        memory: int | str | None = None,
        contiguous: bool = False,
        lanes: int | None = None,
        first_lane: int | None = None,
        endpoint: str | None = None,
        key: int | None = None,
        ports: int = 1,
        priority: int = 0,
        guaranteed: int | str = 0,
        maximum: int | str = 0,
        name: str = "",
        request_id: str | None = None,
    ) -> SliceInfo:
        """Allocate a slice for this VM; answered once it is durable and programmed.

        ``cores`` (a count) and/or ``core_ids`` (explicit ids), ``same_cluster``;
        ``memory`` in bytes or as ``"4 GiB"`` (a multiple of the device's granule),
        ``contiguous`` for one extent; ``lanes`` (link width 1/2/4/8/16), pinned to an
        ``endpoint`` (e.g. ``"nvme0"``) or starting at ``first_lane``; protection ``key``
        (None: the VM's key, else a free one); ``ports`` (crossbar ports); QoS
        ``priority`` 0-7, ``guaranteed`` and ``maximum`` bandwidth per port in Mbit/s or
        as ``"10 Gbit/s"``. At least one of cores, memory, lanes. ``request_id`` makes
        the call idempotent (one is drawn if not given): repeating it returns the first
        result.

        Raises:
            RequestError: a value the device (or this library) refuses; ``field`` names it.
            InsufficientResources: not enough free cores, memory, lanes, keys or bandwidth.
            ResourceConflict: a named core, lane group or key is held by another slice.
            AllocationError: any other reason the device cannot satisfy it now.
            IdempotencyConflict: ``request_id`` was used before with other parameters.
        """
        for flag, ok, what in (
            (same_cluster, cores is not None or core_ids is not None, "cores"),
            (contiguous, memory is not None, "memory"),
            (first_lane is not None or endpoint is not None, lanes is not None, "lanes"),
        ):
            if flag and not ok:
                raise RequestError(
                    f"{what}: a detail of {what} was given without {what} itself",
                    details={"field": what},
                )
        spec: dict[str, Any] = {
            "name": name,
            "ports": ports,
            "key": "auto" if key is None else key,
            "qos": {
                "priority": priority,
                "guaranteed": parse_bandwidth(guaranteed, "qos.guaranteed"),
                "maximum": parse_bandwidth(maximum, "qos.maximum"),
            },
        }
        if cores is not None or core_ids is not None:
            ids = None if core_ids is None else list(core_ids)
            count = cores if cores is not None else len(ids or ())
            spec["cores"] = {"count": count, "same_cluster": same_cluster, "ids": ids}
        if memory is not None:
            spec["memory"] = {"size": parse_size(memory, "memory.size"), "contiguous": contiguous}
        if lanes is not None:
            spec["lanes"] = {"width": lanes, "first": first_lane, "endpoint": endpoint}
        try:
            payload = convert.spec_to_payload(spec, request_id=self._request_id(request_id))
        except EncodeError as e:
            raise _encode_error(e) from e
        return SliceInfo.from_payload(await self._call("ALLOCATE", payload))

    async def resize(
        self,
        slice_id: int,
        *,
        memory: int | str | None = None,
        cores: int | None = None,
        priority: int | None = None,
        guaranteed: int | str | None = None,
        maximum: int | str | None = None,
        request_id: str | None = None,
    ) -> SliceInfo:
        """Resize a live slice to absolute targets while it stays active: ``memory``
        (bytes or ``"6 GiB"``; extents are added or released from the tail), ``cores``
        (a count), QoS ``priority``, ``guaranteed``, ``maximum`` (Mbit/s or
        ``"20 Gbit/s"``). What is None keeps its value. Idempotent under ``request_id``.

        Raises:
            RequestError: nothing to change, or a target the device refuses.
            NotFound: no such slice of this VM.
            PermissionDenied: the slice is another VM's.
            LifecycleError: the slice is not live.
            InsufficientResources, ResourceConflict, AllocationError: the growth does not fit.
            IdempotencyConflict: ``request_id`` was used before with other parameters.
        """
        change: dict[str, Any] = {}
        if memory is not None:
            change["memory"] = parse_size(memory, "memory")
        if cores is not None:
            change["cores"] = cores
        qos: dict[str, int] = {}
        if priority is not None:
            qos["priority"] = priority
        if guaranteed is not None:
            qos["guaranteed"] = parse_bandwidth(guaranteed, "qos.guaranteed")
        if maximum is not None:
            qos["maximum"] = parse_bandwidth(maximum, "qos.maximum")
        if qos:
            change["qos"] = qos
        if not change:
            raise RequestError(
                "nothing to change: give memory, cores, priority, guaranteed or maximum",
                details={"field": "resize"},
            )
        try:
            payload = convert.resize_to_payload(
                slice_id, change, request_id=self._request_id(request_id)
            )
        except EncodeError as e:
            raise _encode_error(e) from e
        return SliceInfo.from_payload(await self._call("RESIZE", payload))

    async def free(self, slice_id: int, *, request_id: str | None = None) -> SliceInfo:
        """Free a slice: it leaves the fabric and its units go back to the pool. Returns
        its last view (state ``freed``). Idempotent under ``request_id``.

        Raises:
            NotFound: no such slice of this VM.
            PermissionDenied: the slice is another VM's.
            LifecycleError: the slice is already freed.
            IdempotencyConflict: ``request_id`` was used before with other parameters.
        """
        payload = {"slice": slice_id, "request_id": self._request_id(request_id)}
        return SliceInfo.from_payload(await self._call("FREE", payload))

    async def get(self, slice_id: int) -> SliceInfo:
        """One slice of this VM.

        Raises:
            NotFound: no such slice, or another VM's (PermissionDenied on some devices).
        """
        return SliceInfo.from_payload(await self._call("GET", {"slice": slice_id}))

    async def slices(self) -> list[SliceInfo]:
        """Every slice of this VM, by id (all pages of LIST).

        Raises:
            ProtocolError: the device's pages do not advance.
        """
        out: list[SliceInfo] = []
        start = 0
        while True:
            page = await self._call("LIST", {"start_id": start})
            out.extend(SliceInfo.from_payload(s) for s in page["slices"])
            nxt = page["next_id"]
            if nxt == 0:
                return out
            if nxt <= start:
                raise ProtocolError(f"LIST next_id {nxt} does not advance past {start}")
            start = nxt

    @overload
    async def telemetry(self, slice_id: int) -> SliceTelemetry: ...
    @overload
    async def telemetry(self, slice_id: None = None) -> DeviceInfo: ...
    async def telemetry(self, slice_id: int | None = None) -> SliceTelemetry | DeviceInfo:
        """A slice's telemetry (sizes and port counters), or, without ``slice_id``, the
        device's information (device-wide load is the administrator's to see).

        Raises:
            NotFound: no such slice of this VM.
            PermissionDenied: the slice is another VM's.
        """
        if slice_id is None:
            return await self.device_info()
        return SliceTelemetry.from_payload(await self._call("SLICE_TELEMETRY", {"slice": slice_id}))

    async def report_usage(
        self, slice_id: int, *, memory_used: int | str = 0, cores_busy: float = 0.0
    ) -> dict[str, int]:
        """Report what this VM uses of a slice (memory, busy cores) to the device's usage
        model, which the adaptive controller and its forecaster read (docs/adaptive.md).
        Returns ``{"slice", "memory_bytes", "cores"}``: what the slice holds now.

        Raises:
            RequestError: ``memory_used``/``cores_busy`` above what the slice holds, or
                not a size / a non-negative number.
            NotFound, PermissionDenied: not a slice of this VM.
        """
        used = parse_size(memory_used, "memory_used")
        if (
            isinstance(cores_busy, bool)
            or not isinstance(cores_busy, int | float)
            or not (0 <= cores_busy <= 0xFFFFFFFF / 1000)
        ):
            raise RequestError(
                f"cores_busy: expected a number of cores >= 0, got {cores_busy!r}",
                details={"field": "cores_busy"},
            )
        payload = {"slice": slice_id, "memory_used_bytes": used,
                   "cores_busy_milli": round(cores_busy * 1000)}  # fmt: skip
        return dict(await self._call("REPORT_USAGE", payload))

    async def set_adaptive(
        self,
        slice_id: int,
        *,
        resource: str = "memory",
        minimum: int | str,
        maximum: int | str,
        step: int | str,
        cooldown_s: int,
        predictive: bool = False,
        app_class: str = "",
    ) -> dict[str, Any]:
        """Opt a slice's ``memory``, ``cores`` or ``bandwidth`` in to adaptive allocation
        within these bounds (memory as sizes, cores as counts, bandwidth as rates per
        crossbar port, e.g. ``"10 Gbit/s"``; needs a device with ABI 1.3); returns the
        policy as the device stored it. See docs/adaptive.md for what the controller does
        with it.

        Raises:
            RequestError: a bound the device refuses (the message names the field).
            NotFound, PermissionDenied: not a slice of this VM.
        """

        def amount(value: int | str, fld: str) -> int:
            if resource == "memory":
                return parse_size(value, fld)
            return parse_bandwidth(value, fld) if resource == "bandwidth" else int(value)

        payload = {
            "slice": slice_id, "resource": resource, "enabled": True, "predictive": predictive,
            "minimum": amount(minimum, "minimum"), "maximum": amount(maximum, "maximum"),
            "step": amount(step, "step"), "cooldown_s": cooldown_s, "app_class": app_class,
        }  # fmt: skip
        return dict(await self._call("SET_ADAPTIVE", payload))

    async def clear_adaptive(self, slice_id: int, *, resource: str = "memory") -> None:
        """Opt a slice's resource out of adaptive allocation (its size stays)."""
        await self._call("SET_ADAPTIVE", {
            "slice": slice_id, "resource": resource, "enabled": False, "predictive": False,
            "minimum": 0, "maximum": 0, "step": 0, "cooldown_s": 0, "app_class": "",
        })  # fmt: skip

    async def adaptive_decisions(
        self, slice_id: int | None = None, *, after: int = 0
    ) -> list[dict[str, Any]]:
        """The adaptive controller's decisions on this VM's slices (or one of them), with
        their reasons: those after decision id ``after``, else the most recent, oldest
        first, at most one page (16)."""
        page = await self._call("ADAPTIVE_DECISIONS", {"slice": slice_id or 0, "after": after})
        return [dict(d) for d in page["decisions"]]

    async def pool_compositions(self) -> list[dict[str, Any]]:
        """This VM's compositions in the device's pool (docs/pool.md), every page: dicts
        ``{"id", "state", "parts"}``, each part ``{"device", "state", "cores", "memory",
        "nvme", "slices", "reason"}``. A part's state is ``reserved``, ``active``,
        ``failed`` or ``lost`` (its device left the pool: its lease expired, or it
        restarted); a composition with a lost part is ``lost``.

        Raises:
            SlicefabError: code ``unsupported`` when the device is not a pool member
                (its daemon runs without ``--pool``); code ``error`` when the pool's etcd
                does not answer.
            ProtocolError: the device's pages do not advance.
        """
        out: list[dict[str, Any]] = []
        start = 0
        while True:
            page = await self._call("POOL_COMPOSITIONS", {"start": start})
            out.extend({**c, "parts": [dict(p) for p in c["parts"]]} for c in page["compositions"])
            nxt = page["next"]
            if nxt == 0:
                return out
            if nxt <= start:
                raise ProtocolError(f"POOL_COMPOSITIONS next {nxt} does not advance past {start}")
            start = nxt

    async def device_info(self) -> DeviceInfo:
        """The device's inventory: cores per cluster, memory and granule, PCIe ports and
        endpoints, keys, crossbar ports and their bandwidth, ABI version."""
        return DeviceInfo.from_payload(await self._call("DEVICE_INFO", {}))

    async def nop(self, data: bytes = b"") -> bytes:
        """The authenticated no-op: returns ``data`` as the device echoed it.

        Raises:
            ProtocolError: ``data`` does not fit one payload (``payload_too_large``).
        """
        echoed: bytes = (await self._call("NOP", {"data": data}))["data"]
        return echoed

    async def ld_share(self, ld_id: int | None = None) -> LdShare:
        """This VM's logical device through the CXL FM API getters a VM may use (Get LD
        Allocations, Get QoS Allocated BW, Get QoS BW Limit). ``ld_id`` defaults to the
        protection key of this VM's live slices.

        Raises:
            NotFound: ``ld_id`` not given and this VM holds no live slice (so no key).
            PermissionDenied: ``ld_id`` is not this VM's.
            ProtocolError: an answer without the requested LD.
        """
        if ld_id is None:
            keys = sorted({s.key for s in await self.slices() if s.live})
            if not keys:
                raise NotFound("this VM holds no live slice, hence no protection key / LD")
            ld_id = keys[0]
        alloc = await self._call(
            "GET_LD_ALLOCATIONS", {"start_ld_id": ld_id, "ld_allocation_list_limit": 1}
        )
        rng = {"number_ld": 1, "start_ld_id": ld_id}
        bw = await self._call("GET_QOS_ALLOCATED_BW", rng)
        limit = await self._call("GET_QOS_BW_LIMIT", rng)
        entries = alloc["ld_allocation_list"]
        shares = bw["qos_allocation_fraction"]
        limits = limit["qos_limit_fraction"]
        starts = {alloc["start_ld_id"], bw["start_ld_id"], limit["start_ld_id"]}
        if not (entries and shares and limits) or starts != {ld_id}:
            raise ProtocolError(f"the FM API answers do not describe LD {ld_id}")
        memory = entries[0]["range_1_allocation_multiplier"] * alloc["memory_granularity"]
        return LdShare(ld_id, memory, shares[0], limits[0])


# ------------------------------------------------------------------ the sync wrapper

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _sync(
    method: Callable[Concatenate[AsyncClient, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[Device, _P], _T]:
    """``Device.<name>``: runs ``AsyncClient.<name>`` to completion on the device's loop."""

    @functools.wraps(method)
    def call(self: Device, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._run(lambda: method(self._client, *args, **kwargs))

    return call


@types.coroutine
def _resume(coro: Coroutine[Any, Any, _T], pending: Any) -> Generator[Any, Any, _T]:
    """Go on with ``coro``, which suspended on ``pending`` while run outside an event loop,
    as an awaitable the loop can finish: it hands the loop what ``coro`` waits for and
    passes back what the loop sends or throws."""
    while True:
        try:
            value = yield pending
        except BaseException as e:  # cancelled, or the awaited future failed
            try:
                pending = coro.throw(e)
            except StopIteration as done:
                return cast(_T, done.value)
        else:
            try:
                pending = coro.send(value)
            except StopIteration as done:
                return cast(_T, done.value)


async def _finish(coro: Coroutine[Any, Any, _T], pending: Any) -> _T:
    return await _resume(coro, pending)


class Device:
    """The blocking client: :class:`AsyncClient` run in whichever thread calls (one call at
    a time; calls from several threads queue on a lock).

    Over a transport that can block (the mailbox, the Unix socket) a call runs without any
    event loop: the coroutine is stepped by hand, and its round trip is the transport's
    blocking :meth:`~hostlib.transport.ClientTransport.request`. So a call costs what the
    round trip costs, not a pass through an event loop per call and per poll (a no-op
    took 1.7x as long that way). Should a call wait for anything else, a private event
    loop finishes it.

    Same methods, arguments, results and exceptions as :class:`AsyncClient`. Do not use it
    inside a running event loop (``async def`` code): use :class:`AsyncClient` there; a
    call from a running loop raises RuntimeError.
    """

    def __init__(self, client: AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        """Wrap an open client and the loop it belongs to; prefer :meth:`open`."""
        self._client = client
        self._loop = loop
        self._lock = threading.Lock()
        transport = client._transport
        if isinstance(transport, _t.ClientTransport):
            client._blocking = transport.request

    @classmethod
    def open(
        cls,
        credential: Credential | str | os.PathLike[str] | None = None,
        *,
        mailbox: str | os.PathLike[str] | None = None,
        transport: _t.AsyncClientTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Device:
        """Open the device: as :meth:`AsyncClient.open`, raising the same errors."""
        loop = asyncio.new_event_loop()
        try:
            client = loop.run_until_complete(
                AsyncClient.open(credential, mailbox=mailbox, transport=transport, timeout=timeout)
            )
        except BaseException:
            loop.close()
            raise
        return cls(client, loop)

    def _run(self, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        with self._lock:
            if self._loop.is_closed():
                raise PeerClosed("the device is closed")
            if self._client._blocking is None:
                return self._loop.run_until_complete(make())
            if asyncio.events._get_running_loop() is not None:  # (no exception to catch)
                raise RuntimeError(
                    "a Device was called from a running event loop: use AsyncClient there"
                )
            coro = make()
            try:
                pending = coro.send(None)  # runs to the end unless something suspends it
            except StopIteration as done:
                return cast(_T, done.value)
            return self._loop.run_until_complete(_finish(coro, pending))

    @property
    def client(self) -> AsyncClient:
        """The asynchronous client underneath."""
        return self._client

    @property
    def session(self) -> Session | None:
        """What the last HELLO told."""
        return self._client.session

    @property
    def closed(self) -> bool:
        return self._loop.is_closed()

    def close(self) -> None:
        """Close the client and its loop. Idempotent."""
        with self._lock:
            if self._loop.is_closed():
                return
            try:
                self._loop.run_until_complete(self._client.close())
            finally:
                self._loop.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    hello = _sync(AsyncClient.hello)
    request = _sync(AsyncClient.request)
    allocate = _sync(AsyncClient.allocate)
    resize = _sync(AsyncClient.resize)
    free = _sync(AsyncClient.free)
    get = _sync(AsyncClient.get)
    slices = _sync(AsyncClient.slices)
    device_info = _sync(AsyncClient.device_info)
    nop = _sync(AsyncClient.nop)
    ld_share = _sync(AsyncClient.ld_share)
    report_usage = _sync(AsyncClient.report_usage)
    set_adaptive = _sync(AsyncClient.set_adaptive)
    clear_adaptive = _sync(AsyncClient.clear_adaptive)
    adaptive_decisions = _sync(AsyncClient.adaptive_decisions)
    pool_compositions = _sync(AsyncClient.pool_compositions)

    @overload
    def telemetry(self, slice_id: int) -> SliceTelemetry: ...
    @overload
    def telemetry(self, slice_id: None = None) -> DeviceInfo: ...
    def telemetry(self, slice_id: int | None = None) -> SliceTelemetry | DeviceInfo:
        """As :meth:`AsyncClient.telemetry`."""
        if slice_id is None:
            return self._run(self._client.device_info)
        return self._run(lambda: self._client.telemetry(slice_id))


__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "Device",
    "DeviceInfo",
    "Endpoint",
    "Extent",
    "LaneGroup",
    "LdShare",
    "PortCounters",
    "QoS",
    "Session",
    "SliceInfo",
    "SliceTelemetry",
    "parse_bandwidth",
    "parse_size",
]
