"""The Resource Allocation Manager: one request, end to end.

``validate → check availability → reserve → write ledger (durable) → program fabric → ack``
(DESIGN.md, "The data flow"). The allocator decides, the ledger makes it durable, the
fabric driver makes it real; this module sequences them, enforces ownership, and makes
requests idempotent.

Concurrency: allocator state changes under one lock (they take microseconds); ledger
writes are queued in that same critical section, so their on-disk order is the order of
the decisions, and then waited for outside it so that concurrent requests share an fsync
(group commit). The fabric is re-synced from the live slice table after each durable
change; a sync that finds nothing new is skipped.

Idempotency: a request may carry a client-chosen ``request_id``. The result of the first
execution is stored with it (in the same ledger transaction as the change itself); a retry
with the same id and the same parameters gets that stored result and changes nothing, a
retry with different parameters is refused (:class:`IdempotencyConflict`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.allocator import Allocator
from firmware.errors import (
    FabricError,
    IdempotencyConflict,
    LedgerError,
    PermissionDenied,
    RequestError,
    SlicefabError,
)
from firmware.fabric.driver import FabricDriver
from firmware.inventory import Device, load_device
from firmware.ledger import REQUEST_RETENTION, DeleteSlice, Ledger, PutRequest, PutSlice, Record
from firmware.slices import Allocation, ResizeSpec, Slice, SliceSpec, SliceState

ADMIN: str | None = None  # the caller identity of the admin socket / CLI: sees every slice
_ADMIN_SCOPE = "@admin"  # request-id scope of the admin (no VM id starts with "@")
REQUEST_ID_MAX = 128


@dataclass
class _Pending:
    """A request id whose first execution is still in flight (not yet durable)."""

    digest: str
    response: dict[str, Any]
    durable: Future[None]


class ResourceManager:
    """The firmware's Resource Allocation Manager for one device."""

    def __init__(self, device: Device, ledger: Ledger, fabric: FabricDriver) -> None:
        self.device = device
        self.ledger = ledger
        self.fabric = fabric
        self.allocator = Allocator(device)
        self._lock = threading.Lock()
        self._fabric_lock = threading.Lock()
        self._version = 0  # bumped on every change of the live slice table
        self._synced_version = -1
        self._requests: OrderedDict[tuple[str, str], _Pending] = OrderedDict()
        self._recover()

    # ------------------------------------------------------------------ start-up

    def _recover(self) -> None:
        """Re-take every unit recorded in the ledger, then program the fabric from it."""
        for row in self.ledger.slices():
            spec = SliceSpec.from_dict(row.spec)
            s = Slice(row.id, spec, Allocation.from_dict(row.alloc))
            try:
                self.allocator.restore(s)
            except SlicefabError as e:
                raise LedgerError(f"ledger slice {row.id} cannot be restored: {e.message}") from e
            s.transition(SliceState.RESERVED)
        next_id = self.ledger.meta("next_slice_id")
        if next_id is not None:
            self.allocator.next_id = max(self.allocator.next_id, int(next_id))
        done: Future[None] = Future()
        done.set_result(None)
        for r in self.ledger.requests():
            self._remember(r.owner, r.request_id, _Pending(r.digest, r.response, done))
        self._version += 1
        self._sync_fabric()
        with self._lock:
            for s in self.allocator.slices.values():
                self._activate(s)

    # ------------------------------------------------------------------ operations

    def allocate(
        self, spec: SliceSpec, *, caller: str | None = ADMIN, request_id: str | None = None
    ) -> dict[str, Any]:
        """Allocate a slice for ``spec.owner``; returns the slice as a dict once durable
        and programmed. A VM caller may only allocate for itself.

        Raises RequestError, InsufficientResources, ResourceConflict, PermissionDenied,
        IdempotencyConflict, LedgerError (fatal), FabricError (the slice is rolled back).
        """
        if caller is not ADMIN and spec.owner != caller:
            raise PermissionDenied(
                f"{caller} may not allocate a slice for {spec.owner}",
                caller=caller,
                owner=spec.owner,
            )

        def change() -> tuple[list[Record], dict[str, Any], Slice]:
            s = self.allocator.allocate(spec)
            resp = self._view(s, SliceState.ACTIVE)
            return [PutSlice(s.id, s.owner, spec.to_dict(), s.alloc.to_dict())], resp, s

        return self._run(caller, request_id, "allocate", spec.to_dict(), change)

    def resize(
        self,
        slice_id: int,
        rs: ResizeSpec,
        *,
        caller: str | None = ADMIN,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Resize a live slice in place; it stays active throughout. All-or-nothing."""

        def change() -> tuple[list[Record], dict[str, Any], Slice]:
            s = self._owned(slice_id, caller)
            if s.state is not SliceState.ACTIVE:
                raise RequestError(
                    "slice", f"slice {slice_id} is {s.state.value}, not active", state=s.state.value
                )
            self.allocator.resize(slice_id, rs)
            return (
                [PutSlice(s.id, s.owner, s.spec.to_dict(), s.alloc.to_dict())],
                self._view(s, SliceState.ACTIVE),
                s,
            )

        return self._run(caller, request_id, "resize", {"slice": slice_id, **rs.to_dict()}, change)

    def free(
        self, slice_id: int, *, caller: str | None = ADMIN, request_id: str | None = None
    ) -> dict[str, Any]:
        """Take a slice out of the fabric, then give back all its units."""

        def change() -> tuple[list[Record], dict[str, Any], Slice]:
            s = self._owned(slice_id, caller)
            if s.state is not SliceState.ACTIVE and s.state is not SliceState.ERROR:
                raise RequestError(
                    "slice",
                    f"slice {slice_id} is {s.state.value}; only an active slice can be freed",
                    state=s.state.value,
                )
            self.allocator.begin_release(slice_id)
            return [DeleteSlice(slice_id)], self._view(s, SliceState.FREED), s

        return self._run(caller, request_id, "free", {"slice": slice_id}, change, release=True)

    def get(self, slice_id: int, *, caller: str | None = ADMIN) -> dict[str, Any]:
        with self._lock:
            return self._view(self._owned(slice_id, caller))

    def list_slices(
        self, *, caller: str | None = ADMIN, owner: str | None = None
    ) -> list[dict[str, Any]]:
        """The slices visible to ``caller`` (a VM sees only its own), optionally of ``owner``."""
        want = caller if caller is not ADMIN else owner
        with self._lock:
            return [
                self._view(s)
                for s in sorted(self.allocator.slices.values(), key=lambda s: s.id)
                if want is None or s.owner == want
            ]

    def status(self) -> dict[str, Any]:
        """Utilisation, fabric state and ledger figures (``slicefab status``, the demo)."""
        with self._lock:
            util = self.allocator.utilisation()
            live = len(self.allocator.slices)
        return {
            "device": self.device.name,
            "slices": live,
            "utilisation": util,
            "fabric": self.fabric.describe(),
            "ledger": {
                "path": str(self.ledger.path),
                "batches": self.ledger.batches,
                "records": self.ledger.records,
            },
        }

    def check_invariants(self) -> list[str]:
        """Allocator invariants plus: the fabric's image is what the slice table implies."""
        with self._lock:
            bad = self.allocator.check_invariants()
            live = [s for s in self.allocator.slices.values() if s.live]
        with self._fabric_lock:
            bad += self.fabric.check(live)
        return bad

    # ------------------------------------------------------------------ machinery

    def _owned(self, slice_id: int, caller: str | None) -> Slice:
        """The slice, if ``caller`` may act on it. Call with the lock held."""
        if isinstance(slice_id, bool) or not isinstance(slice_id, int):
            raise RequestError("slice", f"expected an integer slice id, got {slice_id!r}")
        s = self.allocator.get(slice_id)
        if caller is not ADMIN and s.owner != caller:
            raise PermissionDenied(
                f"slice {slice_id} does not belong to {caller}", slice=slice_id, caller=caller
            )
        return s

    def _run(
        self,
        caller: str | None,
        request_id: str | None,
        op: str,
        params: dict[str, Any],
        change: Callable[[], tuple[list[Record], dict[str, Any], Slice]],
        release: bool = False,
    ) -> dict[str, Any]:
        """Run one state change with idempotency, durability and fabric programming.

        A change that takes units is made durable, then programmed into the fabric, then
        acknowledged. A ``release`` is taken out of the fabric first, then its units are
        given back and the release made durable, so no unit is ever reachable by two VMs.
        Request ids are scoped by caller (a VM, or the admin).
        """
        if request_id is not None and (
            not isinstance(request_id, str) or not 0 < len(request_id) <= REQUEST_ID_MAX
        ):
            raise RequestError("request_id", f"expected a string of 1..{REQUEST_ID_MAX} characters")
        who = _ADMIN_SCOPE if caller is None else caller
        digest = hashlib.sha256(json.dumps([op, params], sort_keys=True).encode()).hexdigest()
        with self._lock:
            seen = None if request_id is None else self._requests.get((who, request_id))
            if seen is None:
                records, response, s = change()
                self._version += 1
                if not release:
                    durable = self._submit(who, request_id, digest, records, response)
            elif seen.digest != digest:
                raise IdempotencyConflict(
                    f"request id {request_id!r} was already used for a different request",
                    request_id=request_id,
                )
        if seen is not None:
            seen.durable.result()  # a retry racing the first execution waits for it
            return seen.response

        if release:
            self._sync_fabric()  # the slice is RELEASING: not in the image any more
            with self._lock:
                self.allocator.release(s.id)
                self._version += 1
                durable = self._submit(who, request_id, digest, records, response)
            durable.result()
            return response

        try:
            durable.result()
        except Exception as e:
            raise LedgerError(f"ledger write failed; the firmware must restart: {e}") from e
        try:
            self._sync_fabric()
        except FabricError:
            self._undo_unprogrammed(s)
            raise
        with self._lock:
            self._activate(s)
        return response

    def _submit(
        self,
        who: str,
        request_id: str | None,
        digest: str,
        records: list[Record],
        response: dict[str, Any],
    ) -> Future[None]:
        """Queue the change (and the request's result) for the ledger. Lock held."""
        if request_id is not None:
            records = [*records, PutRequest(who, request_id, digest, response)]
        durable = self.ledger.submit(records)
        if request_id is not None:
            self._remember(who, request_id, _Pending(digest, response, durable))
        return durable

    def _activate(self, s: Slice) -> None:
        if s.state is SliceState.RESERVED:
            s.transition(SliceState.PROGRAMMED)
        if s.state is SliceState.PROGRAMMED:
            s.transition(SliceState.ACTIVE)

    def _undo_unprogrammed(self, s: Slice) -> None:
        """The fabric refused a new slice: mark it error, take it out, give units back."""
        with self._lock:
            if s.state in (SliceState.RESERVED, SliceState.PROGRAMMED):
                s.transition(SliceState.ERROR)
                self.allocator.release(s.id)
                self._version += 1
                durable = self.ledger.submit([DeleteSlice(s.id)])
        durable.result()
        self._sync_fabric()

    def _sync_fabric(self) -> None:
        with self._fabric_lock:
            with self._lock:
                version = self._version
                if version == self._synced_version:
                    return
                demand = self.allocator.port_demand()
            self.fabric.sync(demand)
            self._synced_version = version

    def _remember(self, owner: str, request_id: str, p: _Pending) -> None:
        self._requests[(owner, request_id)] = p
        self._requests.move_to_end((owner, request_id))
        while len(self._requests) > REQUEST_RETENTION:
            self._requests.popitem(last=False)

    def _view(self, s: Slice, state: SliceState | None = None) -> dict[str, Any]:
        d = s.to_dict(self.device.granule_bytes)
        if state is not None:
            d["state"] = state.value
        return d

    def close(self) -> None:
        self.ledger.close()


class StateDir:
    """The firmware's state directory: the ledger, the admin socket and a lock file.

    Only one process may own a state directory at a time (the daemon, or the CLI working
    in-process when no daemon runs): an exclusive ``flock`` on ``lock`` enforces it.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ledger = self.path / "ledger.sqlite"
        self.socket = self.path / "admin.sock"
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take the state directory; raises :class:`LedgerError` if another process has it."""
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerError(
                f"state directory {self.path} is in use by another slicefab process "
                f"(a running `slicefab serve`?); talk to it through {self.socket}",
                path=str(self.path),
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def default_state_dir() -> Path:
    """The default state directory: ``$SLICEFAB_STATE_DIR``, else
    ``$XDG_STATE_HOME/slicefab``, else ``~/.local/state/slicefab``."""
    if env := os.environ.get("SLICEFAB_STATE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "slicefab"


def open_manager(
    state: StateDir, device_path: Path | str | None = None, fabric: FabricDriver | None = None
) -> ResourceManager:
    """Lock ``state``, open its ledger, recover and program the fabric (the default
    backend is the behavioural crossbar model)."""
    device = load_device(device_path)
    state.lock()
    try:
        ledger = Ledger(state.ledger, device.fingerprint())
        try:
            return ResourceManager(device, ledger, fabric or FabricDriver.with_model(device))
        except BaseException:
            ledger.close()
            raise
    except BaseException:
        state.unlock()
        raise
