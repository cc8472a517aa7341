"""The daemon's VM mailboxes: one shared-memory mailbox per provisioned VM, all watched by
one poller thread, so no VM can see another's traffic and a slow VM holds up only itself.

A mailbox is a file (``<state>/mailboxes/<vm>.mbox`` unless ``slicefab vm add --mailbox``
named another, e.g. one under /dev/shm). The VM maps the same file on the host, or
through the ``ivshmem-plain`` device QEMU backs with it, in a guest (hostlib.mailbox).

Threads: the poller scans every mailbox's doorbell (a few µs each), answers the requests
that are served from memory (NOP, GET, LIST, inventory views, ...) itself, and hands those
that may wait for the ledger or the fabric (:func:`firmware.api.may_block`: ALLOCATE,
FREE, ...) to a pool of workers, so one VM's allocation waiting for an fsync never delays
another VM's request, and concurrent allocations share one group commit. A mailbox with a
request in a worker is not polled again until that request is answered (one outstanding
request per mailbox, as the transport requires). When nothing arrives the poller spins
briefly, then sleeps with back-off (``hostlib.transport.PollPolicy``). One spinning
thread, rather than one per VM, is what lets a device serve many VMs on few cores.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from abi.commands import Role
from firmware import failpoints
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
        self._snapshot: tuple[_Served, ...] = ()  # what the poller scans
        self._stop = threading.Event()
        self._workers = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="mailbox-worker")
        self._poller = threading.Thread(target=self._poll_loop, name="mailbox-poller", daemon=True)
        self._poller.start()

    def refresh(self) -> None:
        """Start serving newly provisioned VMs, stop serving removed ones."""
        with self._lock:
            wanted = {c.vm: c for c in self.api.vms.credentials()}
            for vm in list(self._served):
                if vm not in wanted:
                    self._stop_one(self._served.pop(vm))
            for vm, cred in wanted.items():
                if vm not in self._served:
                    self._served[vm] = self._start(vm, Path(cred.mailbox))
            self._snapshot = tuple(self._served.values())

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

    @staticmethod
    def _stop_one(served: _Served) -> None:
        """Lock held. A request in a worker is dropped (its client gets PeerClosed)."""
        if served.socket is not None:
            served.socket.stop()
        served.closed = True
        with contextlib.suppress(TransportError):
            served.server.close()

    # ------------------------------------------------------------------ the poller

    def _poll_loop(self) -> None:
        backoff = Backoff(DEFAULT_POLL, float("inf"))
        while not self._stop.is_set():
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
        self._workers.shutdown(wait=True)
        with self._lock:
            for served in self._served.values():
                self._stop_one(served)
            self._served.clear()
            self._snapshot = ()
