"""The daemon's VM mailboxes: one shared-memory mailbox per provisioned VM, all watched by
one poller thread, so no VM can see another's traffic and a slow VM holds up only itself.

A mailbox is a file (``<state>/mailboxes/<vm>.mbox`` unless ``slicefab vm add --mailbox``
named another, e.g. one under /dev/shm). The VM maps the same file on the host, or
through the ``ivshmem-plain`` device QEMU backs with it, in a guest (hostlib.mailbox).

Threads: the poller watches every mailbox's doorbell, answers the requests that are
served from memory (NOP, GET, LIST, inventory views, ...) itself, and hands those that may
wait for the ledger or the fabric (:func:`firmware.api.may_block`: ALLOCATE, FREE, ...) to
a pool of workers, so one VM's allocation waiting for an fsync never delays another VM's
request, and concurrent allocations share one group commit. A mailbox with a request in a
worker is not polled again until that request is answered (one outstanding request per
mailbox, as the transport requires). When nothing arrives the poller spins briefly, then
sleeps with back-off (``hostlib.transport.PollPolicy``). One spinning thread, rather than
one per VM, is what lets a device serve many VMs on few cores.

The spin is in C (``sf_doorbell_wait``, cffi_ext/src/doorbell.c): it reads the doorbells
without the GIL, so the workers run while the poller waits, and with the x86 PAUSE hint,
so the core favours its hyperthread sibling, often the VM's side of the round trip. The
pure-Python scan (``SLICEFAB_FASTPATH=0``) does the same job with ``os.sched_yield()``
between scans. Because the C wait holds views of the mapped files, a stopped mailbox is
closed by the poller thread itself, between two waits (:meth:`MailboxService._close_stopped`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from abi.commands import Role
from firmware import failpoints, fastpath
from firmware.api import Api, Channel, may_block
from hostlib.mailbox import MailboxServer, create_mailbox
from hostlib.socket_transport import SocketServer
from hostlib.transport import DEFAULT_POLL, Backoff, FrameTooLarge, PeerClosed, TransportError

log = logging.getLogger("slicefab.mailboxes")

#: worker threads for requests that may block (each VM has at most one outstanding)
MAX_WORKERS = 32


def default_mailbox(state_path: Path, vm: str) -> Path:
    return state_path / "mailboxes" / f"{vm}.mbox"


def socket_path(mailbox: Path) -> Path:
    """Where ``serve --vm-sockets`` serves a VM's pipeline beside its mailbox."""
    return mailbox.with_name(mailbox.name + ".sock")


class _Served:
    """One VM's mailbox (and optional socket) and whether a worker holds its request."""

    def __init__(self, vm: str, server: MailboxServer, channel: Channel) -> None:
        self.vm = vm
        self.server = server
        self.channel = channel
        self.socket: SocketServer | None = None
        self.in_worker = False  # set by the poller, cleared by the worker when answered
        self.closed = False
        self.unmapped = threading.Event()  # set once the mailbox itself is closed


class MailboxService:
    """Serves the mailbox of every provisioned VM; :meth:`refresh` follows the registry."""

    def __init__(self, api: Api, state_path: Path, *, sockets: bool = False) -> None:
        self.api = api
        self.state_path = state_path
        #: also serve each VM's pipeline on a Unix socket at ``<mailbox>.sock`` (mode 0600;
        #: for host processes standing in for VMs, and to compare transports)
        self.sockets = sockets
        self._served: dict[str, _Served] = {}
        self._lock = threading.Lock()  # guards _served and every _Served's closed flag
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._snapshot: tuple[_Served, ...] = ()  # what the poller scans
        self._stopped: list[_Served] = []  # stopped, for the poller to close (_close_stopped)
        self._stop = threading.Event()
        #: the C doorbell wait, None for the pure-Python scan
        self._c = fastpath.extension() if fastpath.enabled() else None
        self._workers = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="mailbox-worker")
        self._poller = threading.Thread(target=self._poll_loop, name="mailbox-poller", daemon=True)
        self._poller.start()

    def refresh(self) -> None:
        """Start serving newly provisioned VMs, stop serving removed ones. A removed VM's
        mailbox is closed before this returns, and before any new one is opened (a VM
        re-provisioned on the same file must not find it marked CLOSED by the old one)."""
        with self._refresh_lock:
            with self._lock:
                wanted = {c.vm: c for c in self.api.vms.credentials()}
                gone = [self._served.pop(vm) for vm in list(self._served) if vm not in wanted]
                for served in gone:
                    self._stop_one(served)
                self._snapshot = tuple(self._served.values())
            self._await_closed(gone)
            with self._lock:
                for vm, cred in wanted.items():
                    if vm not in self._served:
                        self._served[vm] = self._start(vm, Path(cred.mailbox))
                self._snapshot = tuple(self._served.values())

    def _await_closed(self, gone: list[_Served]) -> None:
        """Wait for the poller to close ``gone`` (it owns the doorbell views of their
        mappings); close them here if the poller is not running."""
        for served in gone:
            while not served.unmapped.wait(0.05):
                if not self._poller.is_alive():
                    self._close_stopped(None)

    def _start(self, vm: str, path: Path) -> _Served:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        create_mailbox(path)  # keeps a valid mailbox's sequence numbers, resets garbage
        served = _Served(vm, MailboxServer(path), Channel(Role.VM, vm))
        if self.sockets:
            api, channel = self.api, served.channel
            served.socket = SocketServer(
                socket_path(path), lambda frame, peer: api.handle_vm_frame(channel, frame)
            )
            served.socket.start()
        return served

    def _stop_one(self, served: _Served) -> None:
        """Lock held. A request in a worker is dropped (its client gets PeerClosed). The
        mailbox itself is closed by the poller (:meth:`_close_stopped`), or by
        :meth:`close` once the poller has stopped."""
        if served.socket is not None:
            served.socket.stop()
        served.closed = True
        self._stopped.append(served)

    def _close_stopped(self, doorbells: _Doorbells | None) -> _Doorbells | None:
        """Poller thread (or :meth:`close` after it): close the mailboxes stopped since
        the last call. The doorbell views of the mapped files go first (a mapping with a
        view cannot be closed); the next wait builds them afresh."""
        with self._lock:
            stopped, self._stopped = self._stopped, []
        if not stopped:
            return doorbells
        if doorbells is not None:
            doorbells.release()
        for served in stopped:
            with contextlib.suppress(TransportError):
                served.server.close()
            served.unmapped.set()
        return None

    # ------------------------------------------------------------------ the poller

    def _poll_loop(self) -> None:
        if self._c is None:
            self._python_poll_loop()
            return
        policy = DEFAULT_POLL
        doorbells: _Doorbells | None = None
        last_busy = time.perf_counter()
        sleep = policy.min_sleep
        try:
            while not self._stop.is_set():
                doorbells = self._close_stopped(doorbells)
                snapshot = self._snapshot
                if doorbells is None or doorbells.served is not snapshot:
                    if doorbells is not None:
                        doorbells.release()
                    doorbells = _Doorbells(self._c, snapshot)
                spin_left = policy.spin - (time.perf_counter() - last_busy)
                if doorbells.wait(spin_left) and self._scan(doorbells):
                    last_busy = time.perf_counter()
                    sleep = policy.min_sleep
                elif time.perf_counter() - last_busy >= policy.spin:
                    # idle (or only a doorbell with nothing to take, e.g. a write still in
                    # progress): sleep with back-off, one scan between sleeps
                    time.sleep(sleep)
                    sleep = min(sleep * 2, policy.max_sleep)
        finally:
            if doorbells is not None:
                doorbells.release()

    def _scan(self, doorbells: _Doorbells) -> bool:
        """Take the request of every mailbox whose doorbell rang; True if any was taken."""
        busy = False
        for i, served in enumerate(doorbells.served):
            if served.in_worker or served.closed or not doorbells.rang(i):
                continue
            if self._poll_one(served):
                busy = True
        return busy

    def _python_poll_loop(self) -> None:
        """The pure-Python poller (``SLICEFAB_FASTPATH=0``): scan, yield, back off."""
        backoff = Backoff(DEFAULT_POLL, float("inf"))
        while not self._stop.is_set():
            self._close_stopped(None)
            busy = False
            for served in self._snapshot:
                if served.in_worker or served.closed:
                    continue
                if self._poll_one(served):
                    busy = True
            if busy:
                backoff = Backoff(DEFAULT_POLL, float("inf"))
            else:
                backoff.pause()  # spin, then sleep up to PollPolicy.max_sleep

    def _poll_one(self, served: _Served) -> bool:
        """Take one request from ``served`` and answer it (or hand it to a worker)."""
        try:
            got = served.server.poll()
        except FrameTooLarge:
            served.channel.counters.malformed += 1  # answered by the transport already
            served.channel.limiter.charge()
            return True
        except PeerClosed:
            return False  # removed meanwhile
        except TransportError as e:
            log.warning("mailbox of %s: %s", served.vm, e)
            return False
        if got is None:
            return False
        seq, frame = got
        if may_block(frame):
            served.in_worker = True
            self._workers.submit(self._answer, served, seq, frame)
        else:
            self._answer(served, seq, frame)
        return True

    def _answer(self, served: _Served, seq: int, frame: bytes) -> None:
        api, channel = self.api, served.channel

        def handle(f: bytes) -> bytes:
            response = api.handle_vm_frame(channel, f)
            if failpoints.armed:
                failpoints.hit("reply.before_send")
            return response

        try:
            served.server.respond(seq, handle, frame)
            if failpoints.armed:
                failpoints.hit("reply.after_send")
        except FrameTooLarge:
            log.warning("mailbox of %s: response too large for the mailbox", served.vm)
        except PeerClosed:
            pass  # the VM was removed while its request ran
        except TransportError as e:
            log.warning("mailbox of %s: %s", served.vm, e)
        except Exception:  # a bug in a handler: answered HANDLER_FAILED, keep serving
            log.exception("mailbox of %s: request failed", served.vm)
        finally:
            served.in_worker = False

    # ------------------------------------------------------------------ lifecycle

    def channels(self) -> dict[str, Channel]:
        with self._lock:
            return {vm: s.channel for vm, s in self._served.items()}

    def close(self) -> None:
        self._stop.set()
        self._poller.join(timeout=5)
        if self._poller.is_alive():  # its doorbell views would keep the mappings open
            raise RuntimeError("the mailbox poller did not stop within 5 s")
        self._workers.shutdown(wait=True)
        with self._lock:
            for served in self._served.values():
                self._stop_one(served)
            self._served.clear()
            self._snapshot = ()
        self._close_stopped(None)


class _Doorbells:
    """The request sequence registers of the mailboxes in one poller snapshot, as the C
    wait reads them: a pointer into each mapped file, and the value each one held when its
    last request was taken. Holds a view of every mapping until :meth:`release`."""

    def __init__(self, c: Any, served: tuple[_Served, ...]) -> None:
        self.served = served
        self._ffi, self._lib = c.ffi, c.lib
        n = max(1, len(served))
        self._views: list[Any] = []
        self._words = self._ffi.new("uint64_t *[]", n)
        self._expected = self._ffi.new("uint64_t[]", n)
        for i, s in enumerate(served):
            mm, offset = s.server.doorbell()
            view = self._ffi.from_buffer(mm)
            self._views.append(view)
            self._words[i] = self._ffi.cast("uint64_t *", view + offset)

    def wait(self, spin_s: float) -> bool:
        """Spin (GIL released) up to ``spin_s`` seconds, at least one scan, until a
        doorbell differs from the sequence number last taken there; True if one does."""
        expected, served = self._expected, self.served
        for i in range(len(served)):
            expected[i] = served[i].server.answered
        spin_ns = int(spin_s * 1e9) if spin_s > 0 else 0
        return bool(self._lib.sf_doorbell_wait(self._words, expected, len(served), spin_ns) >= 0)

    def rang(self, i: int) -> bool:
        """Whether mailbox ``i``'s doorbell differs from its last taken request."""
        return bool(self._words[i][0] != self.served[i].server.answered)

    def release(self) -> None:
        for view in self._views:
            self._ffi.release(view)
        self._views.clear()
