"""A device's membership of a pool: ``slicefab serve --pool URL --device-id ID``.

The device's firmware (its :class:`~firmware.manager.ResourceManager`, unchanged) joins the
pool by writing its **device record** (inventory, free capacity, a fresh *incarnation* id)
under a lease it keeps alive. If the daemon dies, the lease expires after its TTL, etcd
deletes the record and the part statuses attached to the lease, and every composition
with a part on this device reports that part **lost** (firmware.pool.composer).

Reservations are written by composers (firmware.pool.composer), one etcd transaction per
composition. The device **watches** its reservation keys (``reservations/<id>/``) and, in
revision order, programs each new part into its own fabric through its manager (one slice
per part, plus one per extra NVMe group; each with an idempotent request id), then writes
the part's status (``parts/<cid>/<id>``: active with its slice ids, or failed with the
error) under its lease. A deleted reservation (a release) frees the part's slices, then
deletes the status, which is how a composer waiting for a release knows it is done.

A restart is a new incarnation: the old lease is revoked (its parts are lost, and stay
reported so until their owners release them) and the slices the previous incarnation
programmed are freed before the device offers its capacity again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from firmware.errors import SlicefabError
from firmware.inventory import Device
from firmware.ledger import Durability
from firmware.manager import ResourceManager, StateDir, open_manager
from firmware.pool.etcd import Compacted, Etcd, PoolUnavailable, absent, put
from firmware.pool.memory import MemoryDirectory
from firmware.pool.model import (
    MEMORY_UNIT,
    RESERVATIONS,
    Capacity,
    DeviceRecord,
    Part,
    check_device_id,
    composition_of,
    device_key,
    part_key,
)
from firmware.slices import SliceSpec

log = logging.getLogger("slicefab.pool")

DEFAULT_TTL_S = 5


class PoolMember:
    """One device in a pool. ``start()`` registers and starts the keep-alive and watch
    threads; ``stop()`` stops them and leaves the pool (revokes the lease)."""

    def __init__(
        self,
        manager: ResourceManager,
        endpoints: str | list[str],
        device_id: str,
        *,
        zone: str = "zone0",
        ttl: int = DEFAULT_TTL_S,
        admin_socket: str = "",
        memory: MemoryDirectory | None = None,
    ) -> None:
        self.manager = manager
        self.endpoints = endpoints
        self.device_id = check_device_id(device_id)
        self.zone = check_device_id(zone, "zone")
        if not 1 <= ttl <= 3600:
            raise SlicefabError(f"pool TTL {ttl} s is out of range", limit="1..3600 s")
        self.ttl = ttl
        self.admin_socket = admin_socket
        #: the page model of this device's parts' memory (live migration), when given
        self.memory = memory
        self.incarnation = ""
        self.lease = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._etcd = Etcd(endpoints, cancel=self._stop)  # the registration / watch client
        self._lock = threading.Lock()  # registration vs the watch thread
        self._watch_from = 0
        self._reregistered = threading.Event()
        #: parts programmed here: composition id → slice ids (tests, status)
        self.programmed: dict[str, list[int]] = {}
        #: pool readers for the mailbox API's workers (a Pool is not shared between threads)
        self._readers = threading.local()

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        """Register (raises PoolUnavailable or SlicefabError), then start the threads."""
        self._register(self._etcd)
        for target, name in ((self._keepalive, "pool-keepalive"), (self._watch, "pool-watch")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, *, leave: bool = True) -> None:
        """Stop the threads; ``leave`` revokes the lease (the device leaves the pool now
        rather than at the TTL)."""
        self._stop.set()
        for t in self._threads:
            t.join(10)
        if leave and self.lease:
            with contextlib.suppress(SlicefabError):
                Etcd(self.endpoints, timeout=1.0, deadline=2.0).revoke(self.lease)

    # ------------------------------------------------------------------ the VMs' view

    def compositions(self, owner: str) -> list[dict[str, Any]]:
        """``owner``'s compositions in this device's pool, with each part's state (lost
        when its device left the pool): what POOL_COMPOSITIONS answers a VM
        (firmware.api). Reads etcd through the member's endpoints, with one client per
        calling thread. Raises PoolUnavailable when no etcd member answers."""
        pool = getattr(self._readers, "pool", None)
        if pool is None:
            from firmware.pool.composer import Pool  # the composer imports nothing of ours

            pool = self._readers.pool = Pool(self.endpoints)
        views: list[dict[str, Any]] = pool.compositions(owner=check_device_id(owner, "owner"))
        return views

    # ------------------------------------------------------------------ registration

    def _register(self, etcd: Etcd) -> None:
        """A new incarnation: end the old one, free its parts, offer the free capacity."""
        with self._lock:
            old = etcd.get(device_key(self.device_id))
            if old is not None and old.lease:
                etcd.revoke(old.lease)  # its keys go: its parts are reported lost
            for cid in list(self._local_parts()):
                self._free_local(cid)
            self.programmed.clear()
            record = self._record()
            if old is not None and old.json().get("draining"):
                record = replace(record, draining=True)  # a restart does not end a drain
            lease = etcd.grant(self.ttl)
            ok, rev = etcd.txn(
                [absent(device_key(self.device_id))],
                [put(device_key(self.device_id), record.to_dict(), lease)],
            )
            if not ok:
                etcd.revoke(lease)
                raise SlicefabError(
                    f"device id {self.device_id} was registered by another device meanwhile",
                    device_id=self.device_id,
                )
            self.lease = lease
            self.incarnation = record.incarnation
            self._watch_from = rev + 1
            log.info("joined the pool as %s (incarnation %s)", self.device_id, self.incarnation)

    def _record(self) -> DeviceRecord:
        """This device's record: total and currently free capacity, from the allocator."""
        dev = self.manager.device
        total = Capacity.of_device(dev)

        def free(a: Any) -> Capacity:
            held = {
                lane for s in a.slices.values() if s.alloc.lanes for lane in s.alloc.lanes.lanes
            }
            u = a.utilisation()  # the allocator's public figures (Python or C allocator)

            def left(kind: str) -> int:
                return int(u[kind]["total"]) - int(u[kind]["used"])

            return Capacity(
                cores=left("cores"),
                memory=(left("memory_granules") * dev.granule_bytes // MEMORY_UNIT) * MEMORY_UNIT,
                nvme={
                    e.name: e.width
                    for e in dev.endpoints
                    if e.kind == "nvme" and not (set(e.lanes) & held)
                },
                vm_slots=min(left("keys"), left("ports")),
            )

        return DeviceRecord(
            device=self.device_id,
            incarnation=uuid.uuid4().hex,
            zone=self.zone,
            total=total,
            free=self.manager.read(free),
            name=dev.name,
            admin_socket=self.admin_socket,
        )

    def _local_parts(self) -> dict[str, list[int]]:
        """Local slices that belong to compositions: composition id → slice ids."""
        out: dict[str, list[int]] = {}
        for s in self.manager.list_slices():
            cid = composition_of(s.get("name", ""))
            if cid is not None:
                out.setdefault(cid, []).append(int(s["id"]))
        return out

    # ------------------------------------------------------------------ threads

    def _keepalive(self) -> None:
        etcd = Etcd(self.endpoints, cancel=self._stop)
        period = max(0.2, self.ttl / 3)
        while not self._stop.wait(period):
            try:
                if etcd.keepalive(self.lease) < 0:
                    # the lease expired (etcd unreachable for longer than the TTL): the
                    # pool already reports our parts lost; come back as a new incarnation
                    log.warning("pool lease expired; re-registering %s", self.device_id)
                    self._register(etcd)
                    self._reregistered.set()
            except SlicefabError as e:
                log.warning("pool keep-alive failed: %s", e)

    def _watch(self) -> None:
        prefix = f"{RESERVATIONS}{self.device_id}/"
        while not self._stop.is_set():
            self._reregistered.clear()
            start = self._watch_from
            try:
                for ev in self._etcd.watch(prefix, start, self._stop):
                    if self._reregistered.is_set():
                        break  # a new incarnation: watch again from its revision
                    cid = ev.kv.key[len(prefix) :]
                    if ev.kind == "DELETE":
                        self._release(cid)
                    else:
                        self._program(cid, ev.kv.json())
            except Compacted:
                self._resync()
            except PoolUnavailable as e:
                log.warning("pool watch: %s", e)
                self._stop.wait(0.5)

    def _resync(self) -> None:
        """Bring the local parts in line with the reservation keys (after a compaction)."""
        prefix = f"{RESERVATIONS}{self.device_id}/"
        kvs, rev = self._etcd.range(prefix, prefix=True)
        wanted = {kv.key[len(prefix) :]: kv.json() for kv in kvs}
        for cid in set(self.programmed) - set(wanted):
            self._release(cid)
        for cid, value in wanted.items():
            if cid not in self.programmed:
                self._program(cid, value)
        self._watch_from = rev + 1

    # ------------------------------------------------------------------ parts

    def _program(self, cid: str, reservation: dict[str, Any]) -> None:
        part = Part.from_dict(reservation["part"])
        owner = str(reservation["owner"])
        if part.incarnation != self.incarnation or cid in self.programmed:
            return  # reserved with an earlier incarnation (lost), or already done
        specs = part.slice_specs(owner, cid, self.manager_device_nvme())
        # the reservation's nonce makes the request ids unique per reservation: a part
        # that comes back (a composition id re-used, a migration back) is a new request
        once = f":{reservation['nonce']}" if reservation.get("nonce") else ""
        ids: list[int] = []
        status: dict[str, Any]
        try:
            for i, spec in enumerate(specs):
                s = self.manager.allocate(
                    SliceSpec.from_dict(spec), request_id=f"pool:{cid}:{self.incarnation}:{i}{once}"
                )
                ids.append(int(s["id"]))
        except SlicefabError as e:
            for sid in ids:
                with contextlib.suppress(SlicefabError):
                    self.manager.free(sid)
            status = {"state": "failed", "error": e.to_dict(), "slices": []}
            log.warning("composition %s: part on %s failed: %s", cid, self.device_id, e)
        else:
            self.programmed[cid] = ids
            if self.memory is not None and part.memory:
                self.memory.add(self.device_id, cid, part.memory)
            status = {"state": "active", "slices": ids}
        status["incarnation"] = self.incarnation
        Etcd.put(self._etcd, part_key(cid, self.device_id), status, self.lease)

    def _release(self, cid: str) -> None:
        self.programmed.pop(cid, None)
        self._free_local(cid)
        self._etcd.delete(part_key(cid, self.device_id))

    def _free_local(self, cid: str) -> None:
        if self.memory is not None:
            self.memory.drop(self.device_id, cid)
        for sid in self._local_parts().get(cid, []):
            try:
                self.manager.free(sid)
            except SlicefabError as e:
                log.warning("composition %s: freeing slice %d failed: %s", cid, sid, e)

    def manager_device_nvme(self) -> dict[str, int]:
        dev: Device = self.manager.device
        return {e.name: e.width for e in dev.endpoints}


def wait_until(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` s have passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


@contextlib.contextmanager
def local_devices(
    root: Path,
    endpoints: str | list[str],
    n: int,
    *,
    ttl: int = DEFAULT_TTL_S,
    zones: int = 1,
    durability: Durability = Durability.POWER,
    memory: MemoryDirectory | None = None,
) -> Iterator[dict[str, tuple[ResourceManager, PoolMember]]]:
    """``n`` in-process devices ``dev0``, ``dev1``, ... for tests and benchmarks: each a
    manager on ``root/dev<i>`` and its pool member in zone ``zone<i % zones>``. Every one
    is stopped on the way out, also when a later one fails to start."""
    opened: list[tuple[ResourceManager, PoolMember | None, StateDir]] = []
    try:
        out: dict[str, tuple[ResourceManager, PoolMember]] = {}
        for i in range(n):
            state = StateDir(root / f"dev{i}")
            m = open_manager(state, durability=durability)
            opened.append((m, None, state))
            member = PoolMember(
                m, endpoints, f"dev{i}", zone=f"zone{i % zones}", ttl=ttl, memory=memory
            )
            member.start()
            opened[-1] = (m, member, state)
            out[f"dev{i}"] = (m, member)
        yield out
    finally:
        for m, started, state in opened:
            if started is not None:
                started.stop()
            m.close()
            state.unlock()
