"""The shared-memory BAR mailbox: one request/response channel per VM in a mapped region.

The firmware creates the region as a regular file (:func:`create_mailbox`, e.g.
``/dev/shm/slicefab-<vm>.mbox``) and serves it (:class:`MailboxServer`). A VM maps the same
bytes either from that file on the host or, inside a QEMU guest, from BAR2 of an
``ivshmem-plain`` device (``/sys/bus/pci/devices/<bdf>/resource2``) whose
``memory-backend-file,share=on`` is that file; both go through the same code path
(:class:`MailboxClient`: open O_RDWR, ``mmap`` MAP_SHARED the whole file).

The register layout is in ``docs/mailbox.md`` (and in the ``REG_*`` constants below): a
4 KiB header page, then the request buffer, then the response buffer, each 4 KiB aligned.

Each direction is a seqlock (:class:`SeqlockChannel`): the writer stores an odd
"being written" value in the sequence register, then the length, status and payload, then
the even sequence number last; the reader loads the sequence, the data, and the sequence
again, and keeps the data only if both loads saw the same even value. That is enough on a
TSO host (x86-64), where stores become visible in program order and loads are not
reordered with loads; ``docs/mailbox.md`` explains why, and what a weaker host would need.
On any other architecture the constructors refuse to run unless told otherwise.

One request is outstanding per mailbox: a client serialises its callers with a thread lock
and, across processes that share the mailbox, with ``flock`` on the mapped file.
"""

from __future__ import annotations

import enum
import fcntl
import mmap
import os
import platform
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hostlib.transport import (
    DEFAULT_POLL,
    Backoff,
    FrameTooLarge,
    Handler,
    MailboxLayoutError,
    PeerClosed,
    PollPolicy,
    TransportError,
    TransportTimeout,
    deadline_after,
)

SIGNATURE = b"SFMB"
VERSION_MAJOR = 1  # a reader refuses any other major version
VERSION_MINOR = 0  # compatible additions (fields in reserved space)
PAGE = 0x1000
HEADER_SIZE = PAGE
DEFAULT_CAPACITY = 64 * 1024
MIN_CAPACITY = 256  # the smallest CXL mailbox payload size (Mailbox Capabilities Register)
MAX_CAPACITY = 16 * 1024 * 1024

# Header page: firmware-owned identification (read-only for the VM) ...
REG_SIGNATURE = 0x000  # 4 bytes, "SFMB"
REG_VERSION = 0x004  # u16 major, u16 minor
REG_REGION_SIZE = 0x008  # u64, bytes, equals the file / BAR size
REG_CAPACITY = 0x010  # u32, bytes in each of the two buffers
REG_REQ_BUF_OFFSET = 0x014  # u32
REG_RSP_BUF_OFFSET = 0x018  # u32
REG_FW_STATE = 0x01C  # u32, FwState
# ... the request channel, written by the VM (own cache line) ...
REG_REQ_SEQ = 0x040  # u64 doorbell: odd while being written, then the new even number
REG_REQ_LEN = 0x048  # u32
REG_REQ_FLAGS = 0x04C  # u32, reserved, 0
# ... and the response channel, written by the firmware (own cache line).
REG_RSP_SEQ = 0x080  # u64: the REQ_SEQ it answers; odd while being written
REG_RSP_LEN = 0x088  # u32
REG_RSP_STATUS = 0x08C  # u32, MailboxStatus

SEQ_MASK = (1 << 64) - 1

_IDENT = struct.Struct("<4sHHQIIII")  # REG_SIGNATURE .. REG_FW_STATE

_TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"})


class FwState(enum.IntEnum):
    """``REG_FW_STATE``: whether a firmware server is answering this mailbox."""

    OFFLINE = 0  # created, no server yet (a client waits)
    ONLINE = 1  # a server is polling the doorbell
    CLOSED = 2  # the server shut down (a client fails fast with PeerClosed)


class MailboxStatus(enum.IntEnum):
    """``REG_RSP_STATUS``: the transport's verdict. Errors of the request itself travel
    inside the response frame (a CCI return code), not here."""

    OK = 0
    REQUEST_TOO_LARGE = 1  # REQ_LEN > CAPACITY; the request was not read
    RESPONSE_TOO_LARGE = 2  # the firmware's answer did not fit; nothing was sent
    HANDLER_FAILED = 3  # the firmware failed while handling the request


def host_is_tso() -> bool:
    """Whether this machine orders memory as x86 TSO does (see docs/mailbox.md)."""
    return platform.machine().lower() in _TSO_MACHINES


def _align(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class MailboxLayout:
    """Where things are in one mailbox region (all offsets from the region's start)."""

    region_size: int
    capacity: int
    req_offset: int
    rsp_offset: int

    @classmethod
    def for_capacity(cls, capacity: int = DEFAULT_CAPACITY) -> MailboxLayout:
        """The canonical layout: header page, request buffer, response buffer, each
        4 KiB aligned, the region rounded up to a power of two (a PCI BAR's size must be
        one, so QEMU's ivshmem-plain accepts the file as its BAR2).

        Raises ValueError if ``capacity`` is outside [MIN_CAPACITY, MAX_CAPACITY]."""
        if not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
            raise ValueError(
                f"mailbox capacity {capacity} outside [{MIN_CAPACITY}, {MAX_CAPACITY}]"
            )
        req = HEADER_SIZE
        rsp = req + _align(capacity)
        return cls(_pow2_at_least(rsp + _align(capacity)), capacity, req, rsp)

    @classmethod
    def parse(cls, header: bytes, file_size: int) -> MailboxLayout:
        """Validate the identification registers of a region of ``file_size`` bytes.

        Raises MailboxLayoutError on a bad signature, another major version, a region
        size that differs from the file's, or offsets that are not the canonical ones."""
        if file_size < HEADER_SIZE or len(header) < _IDENT.size:
            raise MailboxLayoutError(f"region of {file_size} bytes is smaller than a header")
        sig, major, minor, size, cap, req, rsp, _state = _IDENT.unpack_from(header, 0)
        if sig != SIGNATURE:
            raise MailboxLayoutError(f"bad signature {sig!r}, expected {SIGNATURE!r}")
        if major != VERSION_MAJOR:
            raise MailboxLayoutError(
                f"mailbox layout version {major}.{minor}, this code speaks {VERSION_MAJOR}.x"
            )
        if size != file_size:
            raise MailboxLayoutError(
                f"REGION_SIZE says {size} bytes but the region is {file_size} bytes"
            )
        try:
            want = cls.for_capacity(cap)
        except ValueError as e:
            raise MailboxLayoutError(str(e)) from None
        if (req, rsp) != (want.req_offset, want.rsp_offset) or rsp + _align(cap) > size:
            raise MailboxLayoutError(
                f"buffer offsets {req:#x}/{rsp:#x} for capacity {cap} do not fit "
                f"the layout ({want.req_offset:#x}/{want.rsp_offset:#x} in {size} bytes)"
            )
        return cls(size, cap, req, rsp)


class SeqlockChannel:
    """One direction of the mailbox: a u64 sequence register followed by u32 length and
    u32 status registers, and a buffer of ``capacity`` bytes.

    A single writer per channel (the VM for requests, the firmware for responses); any
    number of readers. See docs/mailbox.md for why the order of the accesses below is
    the whole correctness argument; do not reorder them.

    The sequence register is accessed through a ``memoryview`` cast to native u64, which
    CPython reads and writes with one aligned 8-byte ``memcpy`` (a single ``mov``). Never
    through ``struct.pack_into``: it zero-fills the target before storing the value, so a
    reader could catch the register at 0, an even "published" number (docs/mailbox.md).
    Call :meth:`release` before closing the mmap."""

    __slots__ = ("_buf", "_len_index", "_mm", "_seq", "_seq_index", "_u32", "capacity")

    def __init__(self, mm: mmap.mmap, regs: int, buf: int, capacity: int) -> None:
        if regs % 8:
            raise ValueError(f"a sequence register is 8-byte aligned, got offset {regs:#x}")
        self._mm = mm
        self._seq = memoryview(mm).cast("Q")  # native: little-endian on every TSO host
        self._seq_index = regs // 8
        # length and status: two u32 stores through a view (cheaper than pack_into, which
        # has to export the mmap's buffer on every call)
        self._u32 = memoryview(mm).cast("I")
        self._len_index = (regs + 8) // 4
        self._buf = buf
        self.capacity = capacity

    def release(self) -> None:
        """Drop this channel's view of the mapping (the mmap cannot close while it lives)."""
        self._seq.release()
        self._u32.release()

    def seq(self) -> int:
        """The sequence register (one aligned 8-byte load)."""
        return int(self._seq[self._seq_index])

    def publish(self, seq: int, payload: bytes, status: int = 0) -> None:
        """Write ``payload`` and ``status`` under the even sequence number ``seq``.

        Raises FrameTooLarge (before writing anything) if the payload exceeds the
        capacity, ValueError if ``seq`` is odd."""
        n = len(payload)
        if n > self.capacity:
            raise FrameTooLarge(
                f"frame of {n} bytes exceeds the mailbox capacity of {self.capacity}",
                length=n,
                capacity=self.capacity,
            )
        if seq & 1:
            raise ValueError(f"a published sequence number is even, got {seq}")
        q, i, u, j = self._seq, self._seq_index, self._u32, self._len_index
        q[i] = (seq - 1) & SEQ_MASK  # 1. odd: being written
        u[j] = n  # 2. length, status
        u[j + 1] = status
        self._mm[self._buf : self._buf + n] = payload  # 3. payload
        q[i] = seq  # 4. even: published (last)

    def read(self) -> tuple[int, int, bytes] | None:
        """A consistent snapshot ``(seq, status, payload)``, or None if a write was in
        progress or happened during the read (the caller polls again).

        Raises FrameTooLarge, without copying the payload, if a stable length register
        exceeds the capacity."""
        q, i, u, j = self._seq, self._seq_index, self._u32, self._len_index
        s1 = int(q[i])  # 1. sequence
        if s1 & 1:
            return None
        n, status = u[j], u[j + 1]  # 2. length, status
        if n > self.capacity:
            if q[i] != s1:
                return None  # a torn length, not a real one
            raise FrameTooLarge(
                f"length register says {n} bytes, the mailbox capacity is {self.capacity}",
                length=n,
                capacity=self.capacity,
            )
        data = self._mm[self._buf : self._buf + n]  # 3. payload
        if q[i] != s1:  # 4. sequence again
            return None
        return s1, int(status), data


def _check_ordering(unsafe_weak_ordering: bool) -> None:
    if not unsafe_weak_ordering and not host_is_tso():
        raise TransportError(
            f"the shm mailbox relies on x86 TSO ordering; {platform.machine()} needs "
            "memory barriers this Python code cannot issue (see docs/mailbox.md)"
        )


class _Region:
    """A mapped mailbox file, and the rule that it is unmapped only when no operation is
    using it: ``close()`` from another thread while an operation waits marks the region
    closing; the operation sees that, gives up with PeerClosed, and unmaps on its way out."""

    def __init__(self, path: str | os.PathLike[str], *, firmware: bool) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_NOFOLLOW if firmware else 0)
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise PeerClosed(f"no mailbox at {os.fspath(path)}") from None
        except OSError as e:
            raise TransportError(f"cannot open mailbox {os.fspath(path)}: {e}") from e
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise MailboxLayoutError(f"{os.fspath(path)} is not a regular file")
            if st.st_size < HEADER_SIZE:
                raise MailboxLayoutError(
                    f"{os.fspath(path)}: {st.st_size} bytes is smaller than a header"
                )
            self.mm = mmap.mmap(self.fd, st.st_size, mmap.MAP_SHARED)
            try:
                self.layout = MailboxLayout.parse(self.mm[:HEADER_SIZE], st.st_size)
            except BaseException:
                self.mm.close()
                raise
        except BaseException:
            os.close(self.fd)
            raise
        self.path = os.fspath(path)
        self.firmware = firmware
        self.busy = threading.Lock()
        self.closing = False
        self.closed = False
        self.req = SeqlockChannel(self.mm, REG_REQ_SEQ, self.layout.req_offset, self.capacity)
        self.rsp = SeqlockChannel(self.mm, REG_RSP_SEQ, self.layout.rsp_offset, self.capacity)
        self._u32 = memoryview(self.mm).cast("I")

    @property
    def capacity(self) -> int:
        return self.layout.capacity

    def fw_state(self) -> int:
        return int(self._u32[REG_FW_STATE // 4])

    def set_fw_state(self, state: FwState) -> None:
        self._u32[REG_FW_STATE // 4] = state  # one 4-byte store (pack_into zero-fills first)

    def enter(self, deadline: float) -> None:
        """Begin an operation (blocking up to ``deadline``).

        Raises TransportTimeout if another operation holds the region until then,
        PeerClosed if the region is closed."""
        busy = self.busy
        if not busy.acquire(blocking=False) and not busy.acquire(
            timeout=max(0.0, deadline - time.perf_counter())
        ):
            raise TransportTimeout("another caller still holds this mailbox")
        self._check_open()

    def try_enter(self) -> bool:
        """Begin an operation if none is running. Raises PeerClosed if closed."""
        if not self.busy.acquire(blocking=False):
            return False
        self._check_open()
        return True

    def _check_open(self) -> None:
        if self.closing or self.closed:
            self.leave()
            raise PeerClosed(f"mailbox {self.path} is closed")

    def leave(self) -> None:
        """End an operation; finish a close() requested meanwhile."""
        try:
            if self.closing and not self.closed:
                self._unmap()
        finally:
            self.busy.release()

    def close(self) -> None:
        self.closing = True
        if self.busy.acquire(blocking=False):
            try:
                if not self.closed:
                    self._unmap()
            finally:
                self.busy.release()

    def _unmap(self) -> None:
        self.closed = True
        try:
            if self.firmware:  # tell a waiting client now rather than at its deadline
                self.set_fw_state(FwState.CLOSED)
        finally:
            self.req.release()
            self.rsp.release()
            self._u32.release()
            self.mm.close()
            os.close(self.fd)


def create_mailbox(
    path: str | os.PathLike[str],
    capacity: int = DEFAULT_CAPACITY,
    *,
    owner_uid: int | None = None,
    owner_gid: int | None = None,
) -> MailboxLayout:
    """Create (or re-stamp) the mailbox file of one VM; the firmware calls this at start.

    The file gets mode 0600 and, if given (needs privilege), the VM's uid/gid. A new file
    is zero-filled to the region size. An existing file of the right size keeps its
    sequence registers if its header is valid (a firmware restart does not confuse a client
    that is waiting), and is reset otherwise; in both cases the identification registers
    are rewritten, since a VM could have scribbled on them, and the state is OFFLINE until
    a :class:`MailboxServer` opens it.

    Raises ValueError for a capacity out of range, MailboxLayoutError if the path is not
    a regular file or exists with another size (it may be mapped by a running QEMU:
    shrinking it would crash the guest's accesses), OSError from the file system."""
    layout = MailboxLayout.for_capacity(capacity)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MailboxLayoutError(f"{os.fspath(path)} is not a regular file")
        os.fchmod(fd, 0o600)
        if owner_uid is not None or owner_gid is not None:
            os.fchown(
                fd, -1 if owner_uid is None else owner_uid, -1 if owner_gid is None else owner_gid
            )
        if st.st_size == 0:
            os.ftruncate(fd, layout.region_size)
        elif st.st_size != layout.region_size:
            raise MailboxLayoutError(
                f"{os.fspath(path)} exists with {st.st_size} bytes, a mailbox of capacity "
                f"{capacity} needs {layout.region_size}; remove it (and stop its VM) first"
            )
        with mmap.mmap(fd, layout.region_size, mmap.MAP_SHARED) as mm:
            try:
                old = MailboxLayout.parse(mm[:HEADER_SIZE], layout.region_size)
                keep = old == layout
            except MailboxLayoutError:
                keep = False
            if not keep:
                mm[:HEADER_SIZE] = bytes(HEADER_SIZE)
            _IDENT.pack_into(
                mm,
                0,
                SIGNATURE,
                VERSION_MAJOR,
                VERSION_MINOR,
                layout.region_size,
                layout.capacity,
                layout.req_offset,
                layout.rsp_offset,
                FwState.OFFLINE,
            )
    finally:
        os.close(fd)
    return layout


class MailboxServer:
    """The firmware end of one VM's mailbox (a :class:`~hostlib.transport.ServerEndpoint`).

    It validates the header once, at open, and then trusts only its own copy of the
    layout: everything in the region is writable by the VM, so lengths and sequence numbers
    read from it are checked every time and the header is never read again.

    Either one thread per mailbox calls :meth:`serve_once`, or one poller thread watches
    many mailboxes with :meth:`poll` and has each request answered with :meth:`respond`
    (from any thread) before it polls that mailbox again."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll: PollPolicy = DEFAULT_POLL,
        unsafe_weak_ordering: bool = False,
    ) -> None:
        """Open a mailbox made by :func:`create_mailbox` and mark it ONLINE.

        Raises MailboxLayoutError for a region that is not a valid mailbox, PeerClosed if
        the file does not exist, TransportError if it cannot be opened or the host is not
        TSO (unless ``unsafe_weak_ordering``)."""
        _check_ordering(unsafe_weak_ordering)
        self._r = _Region(path, firmware=True)
        self._poll = poll
        self.capacity = self._r.capacity
        # Last answered request. Requests are even, so an odd value (a response whose write
        # was interrupted by a crash) leaves the pending request to be answered again.
        self._answered = self._r.rsp.seq()
        self._r.set_fw_state(FwState.ONLINE)

    @property
    def path(self) -> str:
        return self._r.path

    @property
    def answered(self) -> int:
        """The sequence number of the last request taken (by :meth:`poll`) or answered:
        the request sequence register holds it until the VM posts its next request."""
        return self._answered

    def doorbell(self) -> tuple[mmap.mmap, int]:
        """The mapped region and the byte offset of its request sequence register (the
        doorbell), for a server that waits on many mailboxes outside Python (the firmware:
        ``sf_doorbell_wait``). The mapping cannot be closed while anything holds an export
        of it (``close()`` then raises BufferError): release exports before closing."""
        return self._r.mm, REG_REQ_SEQ

    def serve_once(self, handler: Handler, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a new request, answer it with ``handler``; True if
        one was answered, False on timeout.

        Raises FrameTooLarge when the request's length register exceeds the capacity (it
        is answered REQUEST_TOO_LARGE without being read) or the handler's response does
        (answered RESPONSE_TOO_LARGE); re-raises what ``handler`` raised after answering
        HANDLER_FAILED; PeerClosed if the server was closed; TransportTimeout if another
        thread is already serving this mailbox."""
        deadline = deadline_after(timeout)
        r = self._r
        r.enter(deadline)
        try:
            got = self._wait_request(Backoff(self._poll, deadline))
            if got is None:
                return False
            seq, frame = got
            self._answer(seq, handler, frame)
            return True
        finally:
            r.leave()

    def poll(self) -> tuple[int, bytes] | None:
        """The new request ``(seq, frame)`` if one is waiting, else None; never blocks.
        For a server that watches many mailboxes from one thread and answers each
        request later with :meth:`respond` (possibly from another thread). Until then the
        request stays pending and :meth:`poll` does not return it again.

        Raises FrameTooLarge when the length register exceeds the capacity (answered
        REQUEST_TOO_LARGE without being read); PeerClosed if the server was closed."""
        r = self._r
        if not r.try_enter():
            return None  # another thread is answering here right now
        try:
            seq = r.req.seq()
            if seq & 1 or seq == self._answered:
                return None
            try:
                got = r.req.read()
            except FrameTooLarge:
                self._answered = seq
                r.rsp.publish(seq, b"", MailboxStatus.REQUEST_TOO_LARGE)
                raise
            if got is None:
                return None  # being written: poll again
            self._answered = got[0]
            return got[0], got[2]
        finally:
            r.leave()

    def respond(self, seq: int, handler: Handler, frame: bytes) -> None:
        """Answer request ``seq`` (from :meth:`poll`) with ``handler(frame)``. Raises as
        :meth:`serve_once` does for the response, and PeerClosed if the server was closed
        meanwhile (the answer is dropped: the client gets PeerClosed too)."""
        r = self._r
        r.enter(deadline_after(5.0))
        try:
            self._answer(seq, handler, frame)
        finally:
            r.leave()

    def _answer(self, seq: int, handler: Handler, frame: bytes) -> None:
        r = self._r
        self._answered = seq
        try:
            response = handler(frame)
        except BaseException:
            r.rsp.publish(seq, b"", MailboxStatus.HANDLER_FAILED)
            raise
        if len(response) > self.capacity:
            r.rsp.publish(seq, b"", MailboxStatus.RESPONSE_TOO_LARGE)
            raise FrameTooLarge(
                f"response of {len(response)} bytes exceeds the mailbox capacity "
                f"{self.capacity}",
                length=len(response),
                capacity=self.capacity,
            )
        r.rsp.publish(seq, response, MailboxStatus.OK)

    def _wait_request(self, backoff: Backoff) -> tuple[int, bytes] | None:
        r = self._r
        while True:
            seq = r.req.seq()
            if not seq & 1 and seq != self._answered:
                try:
                    got = r.req.read()
                except FrameTooLarge:
                    self._answered = seq
                    r.rsp.publish(seq, b"", MailboxStatus.REQUEST_TOO_LARGE)
                    raise
                if got is not None:
                    return got[0], got[2]
            if r.closing:
                raise PeerClosed(f"mailbox {r.path} was closed while serving")
            if not backoff.pause():
                return None

    def close(self) -> None:
        """Mark the mailbox CLOSED (waiting clients fail with PeerClosed) and unmap it.
        Idempotent; a serve_once() waiting in another thread returns with PeerClosed."""
        self._r.close()

    def __enter__(self) -> MailboxServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MailboxClient:
    """The VM end of a mailbox (a :class:`~hostlib.transport.ClientTransport` and
    :class:`~hostlib.transport.AsyncClientTransport`).

    ``path`` is the firmware's file on the host, or ``resource2`` of the ivshmem-plain
    device in a guest. One request is outstanding at a time: callers in this process queue
    on a lock and, with ``process_lock`` (the default), other processes mapping the same
    mailbox queue on ``flock`` of the file (released by the kernel if a process dies).
    Do not mix :meth:`request` and :meth:`arequest` on one event loop's thread while an
    ``arequest`` is pending: the blocking call would wait for it without letting it run."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll: PollPolicy = DEFAULT_POLL,
        process_lock: bool = True,
        unsafe_weak_ordering: bool = False,
    ) -> None:
        """Map the mailbox and check its header.

        Raises MailboxLayoutError for a region that is not a valid mailbox, PeerClosed if
        the path does not exist, TransportError if it cannot be opened (permissions) or the
        host is not TSO (unless ``unsafe_weak_ordering``)."""
        _check_ordering(unsafe_weak_ordering)
        self._r = _Region(path, firmware=False)
        self._poll = poll
        self._process_lock = process_lock
        self.capacity = self._r.capacity

    @property
    def path(self) -> str:
        return self._r.path

    def _check_size(self, frame: bytes) -> None:
        if len(frame) > self.capacity:
            raise FrameTooLarge(
                f"request of {len(frame)} bytes exceeds the mailbox capacity {self.capacity}",
                length=len(frame),
                capacity=self.capacity,
            )

    def _try_flock(self) -> bool:
        if not self._process_lock:
            return True
        try:
            fcntl.flock(self._r.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unflock(self) -> None:
        if self._process_lock:
            fcntl.flock(self._r.fd, fcntl.LOCK_UN)

    def _post(self, frame: bytes) -> int:
        """Write the request and ring the doorbell; returns its sequence number."""
        r = self._r
        seq = ((r.req.seq() | 1) + 1) & SEQ_MASK  # next even; odd is a writer that died
        if seq == r.rsp.seq():  # stale content that would pass for our answer
            seq = (seq + 2) & SEQ_MASK
        r.req.publish(seq, frame, 0)
        return seq

    def _poll_response(self, seq: int, sent: int) -> bytes | None:
        """The response to request ``seq`` (of ``sent`` bytes) if it is there; None to
        poll again.

        Raises the error a non-OK status stands for, PeerClosed if the firmware closed
        the mailbox or this client was closed, FrameTooLarge for a response length
        register beyond the capacity."""
        r = self._r
        if r.rsp.seq() == seq:
            got = r.rsp.read()
            if got is not None and got[0] == seq:  # a response to an older request is stale
                status, data = got[1], got[2]
                if status == MailboxStatus.OK:
                    return data
                if status == MailboxStatus.REQUEST_TOO_LARGE:
                    raise FrameTooLarge(
                        f"the firmware refused the {sent}-byte request as too large",
                        length=sent,
                        capacity=self.capacity,
                    )
                if status == MailboxStatus.RESPONSE_TOO_LARGE:
                    raise FrameTooLarge(
                        "the firmware's response did not fit the mailbox",
                        length=-1,
                        capacity=self.capacity,
                    )
                if status == MailboxStatus.HANDLER_FAILED:
                    raise TransportError("the firmware failed while handling the request")
                raise TransportError(f"unknown mailbox status {status}")
        if r.closing:
            raise PeerClosed(f"mailbox {r.path} was closed while waiting")
        if r.fw_state() == FwState.CLOSED:
            raise PeerClosed(f"the firmware closed mailbox {r.path}")
        return None

    def request(self, frame: bytes, timeout: float) -> bytes:
        """Send ``frame`` and wait up to ``timeout`` s for its response.

        Raises FrameTooLarge (before anything is written) if the frame exceeds the
        capacity, or if the firmware refused it; TransportTimeout if no response (or no
        turn at the mailbox) came in time; PeerClosed if the firmware closed the mailbox
        or this client was closed; TransportError if the firmware failed the request."""
        self._check_size(frame)
        deadline = deadline_after(timeout)
        r = self._r
        r.enter(deadline)
        try:
            if r.fw_state() == FwState.CLOSED:
                raise PeerClosed(f"the firmware closed mailbox {r.path}")
            if not self._try_flock():  # the wait costs only a process that has to wait
                backoff = Backoff(self._poll, deadline)
                while not self._try_flock():
                    if not backoff.pause():
                        raise TransportTimeout("another process holds this mailbox")
            try:
                seq = self._post(frame)
                backoff = Backoff(self._poll, deadline)
                while True:
                    data = self._poll_response(seq, len(frame))
                    if data is not None:
                        return data
                    if not backoff.pause():
                        raise TransportTimeout(f"no response to request {seq} within {timeout} s")
            finally:
                self._unflock()
        finally:
            r.leave()

    async def arequest(self, frame: bytes, timeout: float) -> bytes:
        """As :meth:`request`, for asyncio: every wait, including the spin, yields to the
        event loop. Raises the same errors."""
        self._check_size(frame)
        deadline = deadline_after(timeout)
        r = self._r
        backoff = Backoff(self._poll, deadline)
        while not r.try_enter():
            if not await backoff.apause():
                raise TransportTimeout("another caller still holds this mailbox")
        try:
            if r.fw_state() == FwState.CLOSED:
                raise PeerClosed(f"the firmware closed mailbox {r.path}")
            while not self._try_flock():
                if not await backoff.apause():
                    raise TransportTimeout("another process holds this mailbox")
            try:
                seq = self._post(frame)
                backoff = Backoff(self._poll, deadline)
                while True:
                    data = self._poll_response(seq, len(frame))
                    if data is not None:
                        return data
                    if not await backoff.apause():
                        raise TransportTimeout(f"no response to request {seq} within {timeout} s")
            finally:
                self._unflock()
        finally:
            r.leave()

    def close(self) -> None:
        """Unmap the mailbox. Idempotent; a request waiting in another thread (or task)
        fails with PeerClosed."""
        self._r.close()

    def __enter__(self) -> MailboxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_mailbox_path(vm: str, directory: str | os.PathLike[str] = "/dev/shm") -> Path:
    """Where the firmware puts VM ``vm``'s mailbox by default: ``<dir>/slicefab-<vm>.mbox``.

    Raises ValueError for a VM name that is not a plain file name component."""
    if not vm or "/" in vm or vm in (".", "..") or "\0" in vm:
        raise ValueError(f"bad VM name {vm!r}")
    return Path(directory) / f"slicefab-{vm}.mbox"
