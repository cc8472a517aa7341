"""The daemon's VM mailboxes: one shared-memory mailbox per provisioned VM, each served by
its own thread, so no VM can see another's traffic and a slow VM holds up only itself.

A mailbox is a file (``<state>/mailboxes/<vm>.mbox`` unless ``slicefab vm add --mailbox``
named another, e.g. one under /dev/shm). The VM maps the same file on the host, or
through the ``ivshmem-plain`` device QEMU backs with it, in a guest (hostlib.mailbox).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from abi.commands import Role
from firmware.api import Api, Channel
from hostlib.mailbox import MailboxServer, create_mailbox
from hostlib.socket_transport import SocketServer
from hostlib.transport import FrameTooLarge, PeerClosed, TransportError

log = logging.getLogger("slicefab.mailboxes")

#: how long a serving thread waits for a request before checking whether to stop
POLL_TIMEOUT_S = 0.2


def default_mailbox(state_path: Path, vm: str) -> Path:
    return state_path / "mailboxes" / f"{vm}.mbox"


def socket_path(mailbox: Path) -> Path:
    """Where ``serve --vm-sockets`` serves a VM's pipeline beside its mailbox."""
    return mailbox.with_name(mailbox.name + ".sock")


class _Served:
    def __init__(self, api: Api, vm: str, server: MailboxServer, channel: Channel) -> None:
        self.api = api
        self.vm = vm
        self.server = server
        self.channel = channel
        self.socket: SocketServer | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"mailbox-{vm}", daemon=True)

    def _run(self) -> None:
        api = self.api
        while not self.stop.is_set():
            try:
                self.server.serve_once(
                    lambda frame: api.handle_vm_frame(self.channel, frame), POLL_TIMEOUT_S
                )
            except FrameTooLarge:
                self.channel.counters.malformed += 1  # answered by the transport already
                self.channel.limiter.charge()
            except PeerClosed:
                return
            except TransportError as e:
                log.warning("mailbox of %s: %s", self.vm, e)


class MailboxService:
    """Serves the mailbox of every provisioned VM; :meth:`refresh` follows the registry."""

    def __init__(self, api: Api, state_path: Path, *, sockets: bool = False) -> None:
        self.api = api
        self.state_path = state_path
        #: also serve each VM's pipeline on a Unix socket at ``<mailbox>.sock`` (mode 0600;
        #: for host processes standing in for VMs, and to compare transports)
        self.sockets = sockets
        self._served: dict[str, _Served] = {}
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Start serving newly provisioned VMs, stop serving removed ones."""
        with self._lock:
            wanted = {c.vm: c for c in self.api.vms.credentials()}
            for vm in list(self._served):
                if vm not in wanted:
                    self._stop(self._served.pop(vm))
            for vm, cred in wanted.items():
                if vm not in self._served:
                    self._served[vm] = self._start(vm, Path(cred.mailbox))

    def _start(self, vm: str, path: Path) -> _Served:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        create_mailbox(path)  # keeps a valid mailbox's sequence numbers, resets garbage
        served = _Served(self.api, vm, MailboxServer(path), Channel(Role.VM, vm))
        served.thread.start()
        if self.sockets:
            api, channel = self.api, served.channel
            served.socket = SocketServer(
                socket_path(path), lambda frame, peer: api.handle_vm_frame(channel, frame)
            )
            served.socket.start()
        return served

    @staticmethod
    def _stop(served: _Served) -> None:
        if served.socket is not None:
            served.socket.stop()
        served.stop.set()
        served.thread.join(timeout=5)
        with contextlib.suppress(TransportError):
            served.server.close()

    def channels(self) -> dict[str, Channel]:
        with self._lock:
            return {vm: s.channel for vm, s in self._served.items()}

    def close(self) -> None:
        with self._lock:
            for served in self._served.values():
                self._stop(served)
            self._served.clear()
