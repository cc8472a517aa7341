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

import contextlib
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
from typing import Any, Protocol, TypeVar

from firmware.adaptive.usage import UsageStore
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
from firmware.ledger import (
    DeleteRequest,
    DeleteSlice,
    Durability,
    Durable,
    Ledger,
    PutRequest,
    PutSlice,
    Record,
)
from firmware.slices import Allocation, ResizeSpec, Slice, SliceSpec, SliceState
from firmware.vms import VmCredential, VmRegistry
from hostlib.mailbox import create_mailbox
from hostlib.transport import TransportError

ADMIN: str | None = None  # the caller identity of the admin socket / CLI: sees every slice
#: how many finished requests' results stay in memory for retries; older ones (up to the
#: ledger's REQUEST_RETENTION) are looked up in the ledger, so memory stays flat under load
REQUEST_MEMORY = 1024
_ADMIN_SCOPE = "@admin"  # request-id scope of the admin (no VM id starts with "@")
REQUEST_ID_MAX = 128
T = TypeVar("T")


@dataclass
class _Pending:
    """A request id and the outcome of its first execution: ``done`` completes with the
    response, or with the exception, when that execution has finished — durable *and*
    programmed. A retry waits on it, so it is never acknowledged earlier than the first."""

    digest: str
    done: Future[dict[str, Any]]


@dataclass
class _Request:
    """One call: who made it (its request-id scope), its id and the digest of its
    parameters, and its pending entry once registered."""

    who: str
    request_id: str | None
    digest: str
    pending: _Pending | None = None


class VmHook(Protocol):
    """Live VM hardware for slices, beside the crossbar (``slicefab_qemu.backend.QemuVmm``:
    memory → virtio-mem, NVMe-pinned lanes → a hot-plugged NVMe controller, cores →
    vCPUs). ``admit`` runs under the lock before the allocator and may refuse (any
    SlicefabError); ``plan`` runs under the lock at every fabric sync with the slices in
    the image; ``apply`` runs right after the crossbar took that image, and its
    FabricError is handled exactly like the crossbar's (docs/qemu.md)."""

    def admit(self, owner: str, slice_id: int | None, request: SliceSpec | ResizeSpec) -> None:
        ...

    def plan(self, slices: list[Slice]) -> Any: ...

    def apply(self, plan: Any) -> None: ...


def slices_in_image(a: Allocator) -> list[Slice]:
    """The slices the fabric image carries: live and not withdrawn (what the crossbar and
    the VM hook are given at a sync, and what ``check`` compares them with)."""
    gone = a.withdrawn
    return [s for s in a.slices.values() if s.live and s.id not in gone]


class ResourceManager:
    """The firmware's Resource Allocation Manager for one device."""

    def __init__(self, device: Device, ledger: Ledger, fabric: FabricDriver) -> None:
        self.device = device
        self.ledger = ledger
        self.fabric = fabric
        self.allocator = Allocator(device)
        #: the provisioned VMs: credentials, mailboxes, request counters (same ledger)
        self.vms = VmRegistry(ledger)
        #: usage samples, adaptive policies and decisions (the ledger's file, own tables)
        self.usage = UsageStore(ledger.path)
        #: called after a VM is provisioned or removed (the daemon serves its mailbox)
        self.on_vms_changed: Callable[[], None] | None = None
        #: VM hardware that follows the slices (the daemon sets it; None: crossbar only)
        self.vm_hook: VmHook | None = None
        self._lock = threading.Lock()
        self._fabric_lock = threading.Lock()
        self._fail_lock = threading.Lock()
        self._version = 0  # bumped on every change of the live slice table
        self._synced_version = -1
        self._requests: OrderedDict[tuple[str, str], _Pending] = OrderedDict()
        # withdrawn slices whose deletion is durable, released once a fabric sync succeeds
        self._pending_release: set[int] = set()
        #: set on a ledger failure: every later request is refused (fail-stop)
        self.failed: BaseException | None = None
        #: called once when the manager fails (the daemon stops serving and exits)
        self.on_fatal: Callable[[], None] | None = None
        self._recover()

    # ------------------------------------------------------------------ start-up

    def _recover(self) -> None:
        """Re-take every unit recorded in the ledger, then program the fabric from it."""
        for row in self.ledger.slices():
            try:
                s = Slice(row.id, SliceSpec.from_dict(row.spec), Allocation.from_dict(row.alloc))
                self.allocator.restore(s)
            except SlicefabError as e:
                raise LedgerError(f"ledger slice {row.id} cannot be restored: {e.message}") from e
            except (KeyError, TypeError, ValueError) as e:  # a row no firmware could have written
                raise LedgerError(f"ledger slice {row.id} is malformed: {e!r}") from e
            s.transition(SliceState.RESERVED)
        next_id = self.ledger.meta("next_slice_id")
        if next_id is not None:
            self.allocator.next_id = max(self.allocator.next_id, int(next_id))
        for r in self.ledger.requests(last=REQUEST_MEMORY):
            done: Future[dict[str, Any]] = Future()
            done.set_result(r.response)
            self._remember(r.owner, r.request_id, _Pending(r.digest, done))
        self._version += 1
        self._sync_fabric()
        with self._lock:
            for s in self.allocator.slices.values():
                self._activate(s)

    # ------------------------------------------------------------------ operations

    def allocate(
        self, spec: SliceSpec, *, caller: str | None = ADMIN, request_id: str | None = None
    ) -> dict[str, Any]:
        """Allocate a slice for ``spec.owner``; returns the slice as a dict once it is durable
        and programmed. A VM caller may only allocate for itself.

        Raises RequestError, InsufficientResources, ResourceConflict, PermissionDenied,
        IdempotencyConflict, LedgerError (fatal: the manager stops), FabricError (the slice
        is rolled back; its units come back once the crossbar confirms).
        """
        if caller is not ADMIN and spec.owner != caller:
            raise PermissionDenied(
                f"{caller} may not allocate a slice for {spec.owner}",
                caller=caller,
                owner=spec.owner,
            )
        req = self._request(caller, request_id, "allocate", spec.to_dict)
        if (earlier := self._start(req)) is not None:
            return earlier.done.result()  # the first execution's outcome, once finished
        try:
            with self._lock:
                if self.vm_hook is not None:
                    self.vm_hook.admit(spec.owner, None, spec)
                s = self.allocator.allocate(spec)
                response = self._view(s, SliceState.ACTIVE)
                durable = self._submit(req, [_put_slice(s, response)], response)
            self._await_durable(durable)
            try:
                self._sync_fabric()
            except FabricError:
                self._roll_back_new(s, req)
                raise
            with self._lock:
                self._activate(s)
        except BaseException as e:
            self._fail_request(req, e)
            raise
        return self._succeed(req, response)

    def resize(
        self,
        slice_id: int,
        rs: ResizeSpec,
        *,
        caller: str | None = ADMIN,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Resize a live slice in place; it stays active throughout. All-or-nothing.

        If the crossbar or the VM's hardware (the QEMU backend) refuses the new size, the
        slice is resized back to what it was, durably, and FabricError says so. Should
        the old size no longer fit (units a shrink gave back were taken meanwhile), the
        resize stays recorded instead (ports never change hands in a resize, so isolation
        is not at stake): the error says that too, the crossbar and the VM get it at the
        next successful reconfiguration, and a retry with the same request id executes
        again."""
        req = self._request(
            caller, request_id, "resize", lambda: {"slice": slice_id, **rs.to_dict()}
        )
        if (earlier := self._start(req)) is not None:
            return earlier.done.result()
        try:
            with self._lock:
                s = self._owned(slice_id, caller)
                if s.state is not SliceState.ACTIVE:
                    raise RequestError(
                        "slice",
                        f"slice {slice_id} is {s.state.value}, not active",
                        state=s.state.value,
                    )
                if self.vm_hook is not None:
                    self.vm_hook.admit(s.owner, slice_id, rs)
                undo = _resize_back(s.spec, rs)
                self.allocator.resize(slice_id, rs)
                response = self._view(s, SliceState.ACTIVE)
                durable = self._submit(req, [_put_slice(s, response)], response)
            self._await_durable(durable)
            try:
                self._sync_fabric()
            except FabricError as e:
                self._forget_stored(req)
                raise self._roll_back_resize(s, undo, e) from e
        except BaseException as e:
            self._fail_request(req, e)
            raise
        return self._succeed(req, response)

    def free(
        self, slice_id: int, *, caller: str | None = ADMIN, request_id: str | None = None
    ) -> dict[str, Any]:
        """Take a slice out of the fabric, then give back all its units.

        The slice leaves the crossbar's image first; its ports stay quarantined (held, given
        to nobody) until the crossbar has confirmed; then every unit is released and the
        release queued to the ledger in the same step, so no unit is ever reachable by two
        VMs and the ledger never holds one unit twice. If the crossbar refuses, the slice is
        left in ``error`` with its units quarantined; freeing it again retries."""
        req = self._request(caller, request_id, "free", lambda: {"slice": slice_id})
        if (earlier := self._start(req)) is not None:
            return earlier.done.result()
        try:
            with self._lock:
                s = self._owned(slice_id, caller)
                if s.state not in (SliceState.ACTIVE, SliceState.ERROR):
                    raise RequestError(
                        "slice",
                        f"slice {slice_id} is {s.state.value}; only an active slice (or one "
                        "left in error) can be freed",
                        state=s.state.value,
                    )
                self.allocator.begin_release(slice_id)
                self._version += 1
            try:
                self._sync_fabric()
            except FabricError:
                with self._lock:
                    s.transition(SliceState.ERROR)
                raise
            with self._lock:
                response = self._view(s, SliceState.FREED)
                self.allocator.release(slice_id)
                durable = self._submit(req, [DeleteSlice(slice_id)], response)
            self._await_durable(durable)
        except BaseException as e:
            self._fail_request(req, e)
            raise
        return self._succeed(req, response)

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

    def provision_vm(self, vm: str, mailbox: str) -> VmCredential:
        """Provision a VM: a fresh key (durable), its mailbox file, served at once by a
        running daemon (``on_vms_changed``). Raises RequestError for a bad id or a mailbox
        that cannot be created (the VM is then not provisioned)."""
        if not isinstance(mailbox, str) or not mailbox:
            raise RequestError("mailbox", "expected the mailbox file's path")
        cred = self.vms.add(vm, mailbox)
        try:
            Path(mailbox).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            create_mailbox(mailbox)
        except (OSError, TransportError) as e:
            self.vms.remove(cred.vm)
            raise RequestError("mailbox", f"cannot create {mailbox}: {e}") from None
        if self.on_vms_changed is not None:
            self.on_vms_changed()
        return cred

    def remove_vm(self, vm: str) -> None:
        """Revoke a VM's credential and stop serving its mailbox (its slices stay)."""
        if not isinstance(vm, str):
            raise RequestError("vm", "expected a VM id")
        self.vms.remove(vm)
        if self.on_vms_changed is not None:
            self.on_vms_changed()

    def read(self, view: Callable[[Allocator], T]) -> T:
        """``view(allocator)`` computed under the lock: a consistent read of the pools."""
        with self._lock:
            return view(self.allocator)

    def check_invariants(self, attempts: int = 100) -> list[str]:
        """Allocator invariants, plus: the crossbar, read back, holds what the slice table
        implies. The crossbar is brought up to date first and the comparison made under the
        lock at a moment when the table is exactly what was last programmed, so a busy but
        healthy device reports nothing (after ``attempts`` tries under constant change, it
        compares anyway and may report changes still in flight)."""
        for attempt in range(attempts):
            with self._fabric_lock:
                failure: list[str] = []
                try:
                    self._sync_locked()
                except FabricError as e:
                    failure = [f"the crossbar refused the latest configuration: {e.message}"]
                with self._lock:
                    if self._version != self._synced_version and attempt < attempts - 1:
                        continue  # changed since the sync: sync again
                    return [
                        *failure,
                        *self.allocator.check_invariants(),
                        *self.fabric.check(slices_in_image(self.allocator)),
                    ]
        return []  # not reached: the last attempt always compares

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

    def _request(
        self,
        caller: str | None,
        request_id: str | None,
        op: str,
        params: Callable[[], dict[str, Any]],
    ) -> _Request:
        """The call's request-id scope, id and parameter digest (``params()`` is called
        only when there is an id to match a retry against)."""
        if request_id is not None and (
            not isinstance(request_id, str) or not 0 < len(request_id) <= REQUEST_ID_MAX
        ):
            raise RequestError("request_id", f"expected a string of 1..{REQUEST_ID_MAX} characters")
        # the digest only matters to match a retry against the first execution of an id
        digest = (
            ""
            if request_id is None
            else hashlib.sha256(json.dumps([op, params()], sort_keys=True).encode()).hexdigest()
        )
        who = _ADMIN_SCOPE if caller is None else caller  # request ids are scoped by caller
        return _Request(who, request_id, digest)

    def _start(self, req: _Request) -> _Pending | None:
        """Refuse if the manager failed; return the earlier execution of this request id if
        there is one; otherwise register this execution as pending. Raises
        IdempotencyConflict when the id was used with different parameters."""
        stored = None
        if req.request_id is not None and (req.who, req.request_id) not in self._requests:
            # an id older than the results kept in memory: the ledger has it (a read on its
            # own connection, outside the lock; what it finds is committed, so final)
            stored = self.ledger.request(req.who, req.request_id)
        with self._lock:
            self._check_alive()
            if req.request_id is None:
                return None
            seen = self._requests.get((req.who, req.request_id))
            if seen is None and stored is not None:
                done: Future[dict[str, Any]] = Future()
                done.set_result(stored.response)
                seen = _Pending(stored.digest, done)
            if seen is not None:
                if seen.digest != req.digest:
                    raise IdempotencyConflict(
                        f"request id {req.request_id!r} was already used for a different request",
                        request_id=req.request_id,
                    )
                return seen
            req.pending = _Pending(req.digest, Future())
            self._remember(req.who, req.request_id, req.pending)
            return None

    def _fail_request(self, req: _Request, e: BaseException) -> None:
        """The first execution failed: retries waiting on it get the same error, and the
        request id is forgotten so that a later retry executes afresh. Lock not held."""
        if req.pending is not None and req.request_id is not None:
            with self._lock:
                if self._requests.get((req.who, req.request_id)) is req.pending:
                    del self._requests[(req.who, req.request_id)]
            if not req.pending.done.done():
                req.pending.done.set_exception(e)
                req.pending.done.exception()  # retrieved: no "never retrieved" warning

    def _succeed(self, req: _Request, response: dict[str, Any]) -> dict[str, Any]:
        if req.pending is not None:
            req.pending.done.set_result(response)
        return response

    def _submit(
        self, req: _Request, records: list[Record], response: dict[str, Any]
    ) -> Durable:
        """Queue the change (and the request's result) for the ledger. Lock held. A ledger
        that refuses is fatal (fail-stop): memory is now ahead of the disk."""
        if req.request_id is not None:
            records = [*records, PutRequest(req.who, req.request_id, req.digest, response)]
        self._version += 1
        try:
            return self.ledger.submit(records)
        except LedgerError as e:
            self._fail(e)
            raise

    def _await_durable(self, durable: Durable) -> None:
        try:
            self.ledger.wait(durable)
        except Exception as e:
            self._fail(e)
            raise LedgerError(
                f"ledger write failed; the firmware stops and must restart: {e}"
            ) from e

    def _fail(self, e: BaseException) -> None:
        """Fail-stop: refuse everything from now on and tell the daemon to exit."""
        with self._fail_lock:
            first = self.failed is None
            if first:
                self.failed = e
        if first and self.on_fatal is not None:
            self.on_fatal()

    def _check_alive(self) -> None:
        if self.failed is not None:
            raise LedgerError(
                f"the firmware stopped after a ledger failure ({self.failed}); restart it to "
                "recover from the ledger"
            )

    def _forget_stored(self, req: _Request) -> None:
        """Delete a request's stored result from the ledger (its outcome changed)."""
        if req.request_id is not None:
            with self._lock:
                try:
                    durable = self.ledger.submit([DeleteRequest(req.who, req.request_id)])
                except LedgerError as e:
                    self._fail(e)
                    raise
            self._await_durable(durable)

    def _roll_back_resize(self, s: Slice, undo: ResizeSpec, cause: FabricError) -> FabricError:
        """The crossbar or the VM refused a durable resize: resize the slice back to
        ``undo`` (its old targets), durably, and reprogram. Returns the error to raise,
        which says which of the two happened."""
        why = cause.message
        with self._lock:
            try:
                self.allocator.resize(s.id, undo)
            except SlicefabError as e:  # the old size no longer fits: keep the new one
                return FabricError(
                    f"slice {s.id} could not be resized ({why}) and its old size no longer "
                    f"fits ({e.message}); the new size stays recorded and is applied at the "
                    "next successful reconfiguration, or retry the request",
                    slice=s.id,
                )
            self._version += 1
            record = PutSlice(s.id, s.owner, s.spec.to_dict(), s.alloc.to_dict())
            try:
                durable = self.ledger.submit([record])
            except LedgerError as e:
                self._fail(e)
                raise
        self._await_durable(durable)
        with contextlib.suppress(FabricError):  # the old configuration was accepted before
            self._sync_fabric()
        return FabricError(
            f"slice {s.id} could not be resized ({why}); it is back at its previous size",
            slice=s.id,
        )

    def _roll_back_new(self, s: Slice, req: _Request) -> None:
        """The crossbar refused a new slice after it became durable: take it out of the
        image (ports quarantined), delete it and its stored result durably, and release
        its units once a sync succeeds."""
        with self._lock:
            self.allocator.withdraw(s.id, SliceState.ERROR)
            records: list[Record] = [DeleteSlice(s.id)]
            if req.request_id is not None:
                records.append(DeleteRequest(req.who, req.request_id))
            self._version += 1
            try:
                durable = self.ledger.submit(records)
            except LedgerError as e:
                self._fail(e)
                raise
        self._await_durable(durable)
        with self._lock:
            self._pending_release.add(s.id)
            self._version += 1
        with contextlib.suppress(FabricError):  # units stay quarantined until a sync works
            self._sync_fabric()

    def _activate(self, s: Slice) -> None:
        if s.state is SliceState.RESERVED:
            s.transition(SliceState.PROGRAMMED)
        if s.state is SliceState.PROGRAMMED:
            s.transition(SliceState.ACTIVE)

    def _sync_fabric(self) -> None:
        with self._fabric_lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        """Program the crossbar from the current table (fabric lock held); then release
        the units of rolled-back slices, which the crossbar no longer carries."""
        with self._lock:
            version = self._version
            if version == self._synced_version:
                return
            demand = self.allocator.port_demand()
            releasable = set(self._pending_release)
            hook = self.vm_hook
            vm_plan: Any = None
            if hook is not None:
                vm_plan = hook.plan(slices_in_image(self.allocator))
        self.fabric.sync(demand)
        if hook is not None:
            hook.apply(vm_plan)
        with self._lock:
            self._synced_version = version
            for sid in releasable:
                self.allocator.release(sid)
                self._pending_release.discard(sid)

    def _remember(self, owner: str, request_id: str, p: _Pending) -> None:
        """Keep ``p`` in memory; forget the oldest finished results beyond REQUEST_MEMORY
        (the ledger keeps them). One still running stays: a retry must wait on it."""
        self._requests[(owner, request_id)] = p
        self._requests.move_to_end((owner, request_id))
        for _ in range(len(self._requests) - REQUEST_MEMORY):
            key, oldest = next(iter(self._requests.items()))
            if not oldest.done.done():
                self._requests.move_to_end(key)
                continue
            del self._requests[key]

    def _view(self, s: Slice, state: SliceState | None = None) -> dict[str, Any]:
        d = s.to_dict(self.device.granule_bytes)
        if state is not None:
            d["state"] = state.value
        return d

    def close(self) -> None:
        self.vms.close()
        self.usage.close()
        self.ledger.close()


def _put_slice(s: Slice, view: dict[str, Any]) -> PutSlice:
    """The ledger record of ``s``, sharing the spec and allocation dicts of its ``view``
    (``Slice.to_dict``: the same canonical forms) instead of building them again. Nothing
    changes them: the ledger serialises the record before the view is returned."""
    return PutSlice(s.id, s.owner, view["spec"], view["alloc"])


def _resize_back(spec: SliceSpec, rs: ResizeSpec) -> ResizeSpec:
    """The resize that undoes ``rs`` on a slice of ``spec``: the old value of each target
    ``rs`` changes (a target ``rs`` leaves alone stays None)."""
    return ResizeSpec(
        memory=spec.memory.size if rs.memory is not None and spec.memory is not None else None,
        cores=spec.cores.count if rs.cores is not None and spec.cores is not None else None,
        qos=spec.qos if rs.qos is not None else None,
    )


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
        #: the behavioural crossbar's registers, which outlive the firmware (fabric/regfile.py)
        self.crossbar = self.path / "crossbar.regs"
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
    state: StateDir,
    device_path: Path | str | None = None,
    fabric: FabricDriver | None = None,
    *,
    durability: Durability = Durability.POWER,
) -> ResourceManager:
    """Lock ``state``, open its ledger, recover and program the fabric (the default
    backend is the behavioural crossbar model, its registers in ``state.crossbar``)."""
    device = load_device(device_path)
    state.lock()
    try:
        ledger = Ledger(state.ledger, device.fingerprint(), durability=durability)
        try:
            fabric = fabric or FabricDriver.with_model(device, state.crossbar)
            return ResourceManager(device, ledger, fabric)
        except BaseException:
            ledger.close()
            raise
    except BaseException:
        state.unlock()
        raise
