"""Live migration of a part (one device's share of a composition) between devices of a
pool; ``slicefab pool migrate``, ``drain`` and ``rebalance`` (docs/pool.md, "Live
migration").

A move of composition C's part from device A to device B, driven from the pool's side
(any process with access to etcd):

1. **prepare** — one etcd transaction, comparing C's and B's ``mod_revision``: B's record
   takes the part, ``reservations/B/C`` is written like any reservation, and C gets a
   ``migration`` field (from, to, the target part, a nonce). C's parts still list A.
2. **program B** — B's member sees the reservation and programs the part through its own
   manager: allocation, ledger, and the crossbar's shadow registers committed. The
   migrator waits for ``parts/C/B``: ``active``, or ``failed``, which aborts.
3. **copy** (firmware.pool.memory) — pre-copy rounds from A's page store to B's while the
   VM keeps writing to A, re-copying dirty pages, until few are left.
4. **switch** — the VM's requests are held (they wait, they do not fail); the last dirty
   pages are copied; then one etcd transaction, comparing C's and A's ``mod_revision``
   and B's ``create_revision`` (B has not left or restarted since it programmed the
   part), replaces A's part by B's in C, gives A's capacity back and deletes
   ``reservations/A/C``; the VM's map is re-routed to B and its requests resume there.
   If the transaction's answer is lost, the outcome is settled (read back, or made
   final by the abort) before the requests resume (:meth:`Migrator._resolve`).
5. **release A** — A's member sees its reservation deleted and frees its slices (its
   crossbar ports leave the image first, then the units are released); the migrator waits
   until ``parts/C/A`` is gone.

**Failure**: if B fails to program, the copy fails, or the switch transaction cannot be
made, one abort transaction deletes B's reservation, gives B's capacity back and removes
the ``migration`` field; B frees whatever it programmed; the part stays on A, where the
VM's requests resume. :class:`MigrationFailed` says which step failed. The pool's
invariants (:func:`firmware.pool.composer.check_pool`) hold before, during and after.

**Page content** is modelled in one process (firmware.pool.memory.MemoryDirectory): with
a directory that holds both devices' stores (in-process devices: tests and benchmarks),
the migrator copies it; without (daemons in other processes, ``slicefab pool drain``
against ``pool up``), steps 3-4 carry no pages and the result says so (``copy: null``).

**Target choice** uses the placement cost function (firmware.pool.placement.cost) on the
part as a one-device request, plus the latency term to the composition's other devices;
candidates must fit the part, must not be draining, must not already hold a part of the
composition, and must keep every pair of its devices within ``max_latency_us``.
**Rebalance** moves the part whose best target lowers that cost most, while the gain is
above a threshold, at most ``max_moves`` times, and never moves a part twice in one run.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from firmware.errors import AllocationError, NotFound, RequestError, SlicefabError
from firmware.pool.composer import MAX_ATTEMPTS, PROGRAM_TIMEOUT_S, Pool, backoff, give_back
from firmware.pool.etcd import KV, PoolUnavailable, created_at, delete, mod_revision_is, put
from firmware.pool.memory import (
    CopyFailed,
    CopyLink,
    CopyStats,
    MemoryDirectory,
    live_copy,
    stop_and_copy,
)
from firmware.pool.model import (
    CompositionRequest,
    DeviceRecord,
    Part,
    check_device_id,
    composition_key,
    device_key,
    latency_us,
    part_key,
    reservation_key,
)
from firmware.pool.placement import DEFAULT_WEIGHTS, NoPlacement, Weights, cost

#: rebalance moves a part only when the cost falls by more than this (cost units: one
#: device more in a composition costs 1.0; docs/pool.md)
REBALANCE_THRESHOLD = 0.25
REBALANCE_MAX_MOVES = 4
MODES = ("live", "stop-and-copy")
#: how long the switch waits (VM paused) for etcd to say whether a switch transaction
#: whose answer was lost committed (firmware.pool.migrate.Migrator._resolve)
RESOLVE_TIMEOUT_S = 60.0


class MigrationFailed(AllocationError):
    """A move did not happen; the part is still on its source (``step`` says where it
    failed: prepare, program, copy, switch)."""

    code = "allocation"  # a wire code (abi.errors); ``step`` in the details says more


@dataclass
class Move:
    """One finished move and what it cost."""

    cid: str
    owner: str
    source: str
    target: str
    part: Part
    copy: CopyStats | None
    prepare_s: float
    program_s: float
    copy_switch_s: float
    release_s: float
    total_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "composition": self.cid,
            "owner": self.owner,
            "from": self.source,
            "to": self.target,
            "part": self.part.to_dict(),
            "copy": self.copy.to_dict() if self.copy is not None else None,
            "prepare_ms": round(self.prepare_s * 1000, 2),
            "program_ms": round(self.program_s * 1000, 2),
            "copy_switch_ms": round(self.copy_switch_s * 1000, 2),
            "release_ms": round(self.release_s * 1000, 2),
            "total_ms": round(self.total_s * 1000, 2),
        }


# ---------------------------------------------------------------------- target choice


def _nvme_on(target: DeviceRecord, part: Part, source: DeviceRecord | None) -> list[str]:
    """Free NVMe groups of ``target`` at least as wide as each of the part's, or []
    when it has too few (an SSD's content is not migrated: docs/pool.md)."""
    widths = sorted(
        ((source.total.nvme.get(e, 4) if source else 4) for e in part.nvme), reverse=True
    )
    free = sorted(target.free.nvme.items(), key=lambda kv: (kv[1], kv[0]))
    chosen: list[str] = []
    for w in widths:
        ep = next((e for e, fw in free if fw >= w and e not in chosen), None)
        if ep is None:
            return []
        chosen.append(ep)
    return chosen


def part_cost(
    req: CompositionRequest,
    part: Part,
    device: DeviceRecord,
    others: list[DeviceRecord],
    weights: Weights = DEFAULT_WEIGHTS,
) -> float:
    """The placement cost of ``part`` on ``device`` (whose record does not hold it),
    with the composition's ``others``. Raises ValueError if it does not fit."""
    sub = CompositionRequest(
        req.owner,
        cores=part.cores,
        memory=part.memory,
        nvme=len(part.nvme),
        max_devices=1,
        affinity=req.affinity,
        nvme_with_cores=False,
    )
    device.take(part, req.owner)  # ValueError when it does not fit
    c, _ = cost(sub, [part], [device], weights)
    lat = max((latency_us(device, o) for o in others), default=0.0)
    return c + weights.latency * lat / 10.0


def choose_target(
    comp: dict[str, Any],
    part: Part,
    devs: list[DeviceRecord],
    *,
    target: str | None = None,
    weights: Weights = DEFAULT_WEIGHTS,
) -> tuple[DeviceRecord, Part, float]:
    """The best device for ``part`` of ``comp`` (or check ``target``): (record, the
    part as it would be there, its cost). Raises NoPlacement naming the reason."""
    req = CompositionRequest.from_dict(comp["request"])
    by_id = {d.device: d for d in devs}
    held = {p["device"] for p in comp["parts"]}
    others = [by_id[p] for p in held if p != part.device and p in by_id]
    source = by_id.get(part.device)
    best: tuple[DeviceRecord, Part, float] | None = None
    why: dict[str, str] = {}
    for d in devs:
        if target is not None and d.device != target:
            continue
        if d.device == part.device:
            why[d.device] = "is where the part is now"
            continue
        if d.device in held:
            why[d.device] = "already holds a part of the composition"
            continue
        if d.draining:
            why[d.device] = "is draining"
            continue
        lat = max((latency_us(d, o) for o in others), default=0.0)
        if req.max_latency_us is not None and lat > req.max_latency_us:
            why[d.device] = f"is {lat} µs from the composition (max {req.max_latency_us})"
            continue
        nvme = _nvme_on(d, part, source)
        if part.nvme and not nvme:
            why[d.device] = f"has no free NVMe group for {len(part.nvme)}"
            continue
        moved = Part(d.device, part.cores, part.memory, tuple(nvme), d.incarnation)
        try:
            c = part_cost(req, moved, d, others, weights)
        except ValueError:
            why[d.device] = f"has too little free ({d.free.cores} cores, {d.free.memory} B)"
            continue
        if best is None or c < best[2]:
            best = (d, moved, c)
    if best is None:
        if target is not None and target not in by_id:
            why[target] = "is not a live device of the pool"
        raise NoPlacement(
            f"no device can take {comp['id']}'s part on {part.device}: "
            + ("; ".join(f"{k} {v}" for k, v in sorted(why.items())) or "no other device"),
            resource="placement",
            composition=comp["id"],
            reasons=why,
        )
    return best


class Migrator:
    """Moves parts between the devices of one pool. One per thread (it owns a Pool)."""

    def __init__(
        self,
        endpoints: str | list[str],
        *,
        memory: MemoryDirectory | None = None,
        link: CopyLink | None = None,
        mode: str = "live",
        weights: Weights = DEFAULT_WEIGHTS,
        timeout: float = PROGRAM_TIMEOUT_S,
    ) -> None:
        if mode not in MODES:
            raise RequestError("mode", f"{mode!r} is not a migration mode", expected=MODES)
        self.pool = Pool(endpoints, weights=weights)
        self.etcd = self.pool.etcd
        self.memory = memory
        self.link = link or CopyLink()
        self.mode = mode
        self.weights = weights
        self.timeout = timeout

    # ------------------------------------------------------------------ one move

    def migrate(self, cid: str, source: str, target: str | None = None) -> Move:
        """Move composition ``cid``'s part on ``source`` to ``target`` (default: the best
        device by cost). Raises NotFound, NoPlacement, MigrationFailed (the part stayed on
        ``source``), PoolUnavailable."""
        cid = check_device_id(cid, "composition")
        source = check_device_id(source, "source")
        t0 = time.perf_counter()
        prepared = self._prepare(cid, source, target)
        comp, part, moved, nonce = prepared
        t1 = time.perf_counter()
        try:
            self._wait_programmed(cid, moved)
        except MigrationFailed:
            self._abort(cid, nonce, moved)
            raise
        except BaseException:
            # etcd gone, or interrupted: roll back if etcd lets us; if not, the move
            # stays prepared and `slicefab pool migrate ID --abort` rolls it back
            with contextlib.suppress(SlicefabError):
                self._abort(cid, nonce, moved)
            raise
        t2 = time.perf_counter()
        stats = self._copy_and_switch(cid, comp["owner"], part, moved, nonce)
        t3 = time.perf_counter()
        self._wait_released(cid, source)
        t4 = time.perf_counter()
        return Move(
            cid,
            comp["owner"],
            source,
            moved.device,
            moved,
            stats,
            t1 - t0,
            t2 - t1,
            t3 - t2,
            t4 - t3,
            t4 - t0,
        )

    def _prepare(
        self, cid: str, source: str, target: str | None
    ) -> tuple[dict[str, Any], Part, Part, str]:
        nonce = secrets.token_hex(8)
        for attempt in range(MAX_ATTEMPTS):
            kv = self.etcd.get(composition_key(cid))
            if kv is None:
                raise NotFound(f"no composition {cid}", composition=cid)
            comp = kv.json()
            if comp.get("migration"):
                m = comp["migration"]
                raise MigrationFailed(
                    f"composition {cid} is already moving from {m['from']} to {m['to']} "
                    f"(`slicefab pool migrate {cid} --abort` if its migrator died)",
                    step="prepare",
                    composition=cid,
                )
            raw = next((p for p in comp["parts"] if p["device"] == source), None)
            if raw is None:
                held = sorted(p["device"] for p in comp["parts"])
                raise NotFound(
                    f"composition {cid} has no part on {source} (its parts are on "
                    f"{', '.join(held) or 'no device'})",
                    composition=cid,
                    field="source",
                    expected=held,
                )
            part = Part.from_dict(raw)
            devs = self.pool.devices()
            src = next((d for d in devs if d.device == source), None)
            if src is None or src.incarnation != part.incarnation:
                raise MigrationFailed(
                    f"composition {cid}'s part on {source} is lost (the device left or "
                    "restarted): there is nothing to move; release the composition",
                    step="prepare",
                    composition=cid,
                )
            dst, moved, _ = choose_target(comp, part, devs, target=target, weights=self.weights)
            migration = {
                "from": source,
                "to": dst.device,
                "part": moved.to_dict(),
                "nonce": nonce,
                "mode": self.mode,
                "started": time.time(),
            }
            ok, _ = self.etcd.txn(
                [
                    mod_revision_is(composition_key(cid), kv.mod_revision),
                    mod_revision_is(device_key(dst.device), dst.mod_revision),
                ],
                [
                    put(
                        device_key(dst.device), dst.take(moved, comp["owner"]).to_dict(), dst.lease
                    ),
                    put(
                        reservation_key(dst.device, cid),
                        {
                            "id": cid,
                            "owner": comp["owner"],
                            "part": moved.to_dict(),
                            "migrated_from": source,
                            "nonce": nonce,
                        },
                    ),
                    put(composition_key(cid), {**comp, "migration": migration}),
                ],
            )
            if ok:
                return comp, part, moved, nonce
            self.pool.conflicts += 1
            backoff(attempt)
        raise MigrationFailed(
            f"migration of {cid}: {MAX_ATTEMPTS} transactions lost to concurrent writers",
            step="prepare",
            composition=cid,
        )

    def _wait_programmed(self, cid: str, moved: Part) -> None:
        deadline = time.monotonic() + self.timeout
        delay = 0.002
        while True:
            st = self.etcd.get(part_key(cid, moved.device))
            if st is not None and st.json().get("incarnation") == moved.incarnation:
                s = st.json()
                if s["state"] == "active":
                    return
                raise MigrationFailed(
                    f"migration of {cid}: {moved.device} could not program the part "
                    f"({s.get('error', {}).get('message', s['state'])}); it stays where it was",
                    step="program",
                    composition=cid,
                    target=moved.device,
                )
            rec = self.etcd.get(device_key(moved.device))
            if rec is None or rec.json()["incarnation"] != moved.incarnation:
                raise MigrationFailed(
                    f"migration of {cid}: {moved.device} left the pool before programming "
                    "the part; it stays where it was",
                    step="program",
                    composition=cid,
                    target=moved.device,
                )
            if time.monotonic() > deadline:
                raise MigrationFailed(
                    f"migration of {cid}: {moved.device} did not program the part within "
                    f"{self.timeout} s; it stays where it was",
                    step="program",
                    composition=cid,
                    target=moved.device,
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.01)

    def _copy_and_switch(
        self, cid: str, owner: str, part: Part, moved: Part, nonce: str
    ) -> CopyStats | None:
        # read the switch's records now, while the VM still runs: with no writer to A's
        # record or the composition meanwhile, the switch is then one round trip
        reads = [self._switch_reads(cid, part, moved)]

        def commit() -> None:
            self._switch(cid, owner, part, moved, nonce, reads.pop() if reads else None)

        mem = self.memory
        src = mem.store(part.device, cid) if mem is not None and part.memory else None
        dst = mem.store(moved.device, cid) if mem is not None and part.memory else None
        try:
            if mem is None or src is None or dst is None:
                commit()  # no page content in this process: the switch alone
                return None
            vm = mem.open_map(cid, part.device)
            move = live_copy if self.mode == "live" else stop_and_copy
            stats = move(vm, dst, moved.device, commit, link=self.link)
            mem.moved(cid, part.device, moved.device)
            return stats
        except BaseException as e:
            if not self._switched(cid, moved):
                self._abort(cid, nonce, moved)
                if isinstance(e, SlicefabError) and not isinstance(e, MigrationFailed):
                    raise MigrationFailed(
                        f"migration of {cid} from {part.device} to {moved.device} failed "
                        f"({e}); it stays on {part.device}",
                        step="copy" if isinstance(e, CopyFailed) else "switch",
                        composition=cid,
                        target=moved.device,
                    ) from e
            raise

    def _switched(self, cid: str, moved: Part) -> bool:
        kv = self.etcd.get(composition_key(cid))
        if kv is None:
            return False
        comp = kv.json()
        return not comp.get("migration") and any(
            p["device"] == moved.device and p["incarnation"] == moved.incarnation
            for p in comp["parts"]
        )

    def _switch_reads(self, cid: str, part: Part, moved: Part) -> tuple[KV | None, ...]:
        return (
            self.etcd.get(composition_key(cid)),
            self.etcd.get(device_key(part.device)),
            self.etcd.get(device_key(moved.device)),
        )

    def _switch(
        self,
        cid: str,
        owner: str,
        part: Part,
        moved: Part,
        nonce: str,
        reads: tuple[KV | None, ...] | None = None,
    ) -> None:
        """The switch transaction (writes are paused by the caller). ``reads``: the
        composition's and both devices' records read earlier (a compare that fails on
        them costs one retry)."""
        for attempt in range(MAX_ATTEMPTS):
            kv, src, dst = reads if reads is not None else self._switch_reads(cid, part, moved)
            reads = None
            if kv is None or (kv.json().get("migration") or {}).get("nonce") != nonce:
                raise MigrationFailed(
                    f"migration of {cid}: the composition was released or changed meanwhile",
                    step="switch",
                    composition=cid,
                )
            comp = kv.json()
            if dst is None or dst.json()["incarnation"] != moved.incarnation:
                raise MigrationFailed(
                    f"migration of {cid}: {moved.device} left the pool before the switch",
                    step="switch",
                    composition=cid,
                )
            parts = [moved.to_dict() if p["device"] == part.device else p for p in comp["parts"]]
            new = {k: v for k, v in comp.items() if k != "migration"}
            new["parts"] = parts
            compare = [
                mod_revision_is(composition_key(cid), kv.mod_revision),
                mod_revision_is(device_key(part.device), src.mod_revision if src else 0),
                # B's record as read (maybe before the copy): still the same key, not
                # gone or re-created by a restart meanwhile (its reservations from this
                # move would then be lost). Its free capacity may change: not compared.
                created_at(device_key(moved.device), dst.create_revision),
            ]
            ops = [put(composition_key(cid), new), delete(reservation_key(part.device, cid))]
            if src is not None:
                ops += give_back(
                    DeviceRecord.from_dict(src.json(), src.mod_revision, src.lease), part, owner
                )
            try:
                ok, _ = self.etcd.txn(compare, ops)
            except PoolUnavailable as e:
                if self._resolve(cid, nonce, moved):
                    return  # committed before the member went away
                raise MigrationFailed(
                    f"migration of {cid}: etcd did not answer the switch ({e}); it was "
                    "rolled back",
                    step="switch",
                    composition=cid,
                ) from e
            if ok:
                return
            self.pool.conflicts += 1
            backoff(attempt)
        raise MigrationFailed(
            f"migration of {cid}: {MAX_ATTEMPTS} switch transactions lost",
            step="switch",
            composition=cid,
        )

    def _resolve(self, cid: str, nonce: str, moved: Part) -> bool:
        """The switch transaction's answer was lost: it may have committed, or may still
        (a proposal in etcd's log). Decide it while the VM's requests still wait: True if
        it committed; False once the abort transaction, a write to the composition that
        the switch compares, made sure it never will. Asks until etcd answers, up to
        :data:`RESOLVE_TIMEOUT_S` (a VM that waits loses nothing; resuming it on A while
        the pool says B would lose its writes). Raises PoolUnavailable after that."""
        deadline = time.monotonic() + RESOLVE_TIMEOUT_S
        while True:
            try:
                if self._switched(cid, moved):
                    return True
                if self._abort(cid, nonce, moved):
                    return False
            except PoolUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _abort(self, cid: str, nonce: str, moved: Part) -> bool:
        """Undo a prepared move: B's reservation and capacity back, no ``migration``.
        False when there was nothing to undo: the composition was released meanwhile
        (the release gave B's capacity back) or the move was switched."""
        for attempt in range(MAX_ATTEMPTS):
            kv = self.etcd.get(composition_key(cid))
            comp = kv.json() if kv is not None else None
            mine = comp is not None and (comp.get("migration") or {}).get("nonce") == nonce
            if not mine:
                return False
            assert kv is not None and comp is not None
            compare = [mod_revision_is(composition_key(cid), kv.mod_revision)]
            ops = [
                put(composition_key(cid), {k: v for k, v in comp.items() if k != "migration"}),
                delete(reservation_key(moved.device, cid)),
            ]
            dst = self.etcd.get(device_key(moved.device))
            compare.append(
                mod_revision_is(device_key(moved.device), dst.mod_revision if dst else 0)
            )
            if dst is not None:
                ops += give_back(
                    DeviceRecord.from_dict(dst.json(), dst.mod_revision, dst.lease),
                    moved,
                    comp["owner"],
                )
            ok, _ = self.etcd.txn(compare, ops)
            if ok:
                break
            backoff(attempt)
        else:
            raise MigrationFailed(
                f"abort of {cid}'s move: {MAX_ATTEMPTS} transactions lost", step="abort"
            )
        self._wait_released(cid, moved.device)
        return True

    def abort(self, cid: str) -> dict[str, Any]:
        """Roll back a migration whose migrator died (the ``migration`` field is still
        there): the part stays on its source. Raises NotFound if none is in progress."""
        kv = self.etcd.get(composition_key(check_device_id(cid, "composition")))
        m = (kv.json().get("migration") if kv is not None else None) or None
        if m is None:
            raise NotFound(f"composition {cid} has no migration in progress", composition=cid)
        if not self._abort(cid, m["nonce"], Part.from_dict(m["part"])):
            raise NotFound(
                f"composition {cid}'s move from {m['from']} to {m['to']} finished or the "
                "composition was released while it was being aborted: nothing to roll back",
                composition=cid,
            )
        return {"composition": cid, "aborted": True, "from": m["from"], "to": m["to"]}

    def _wait_released(self, cid: str, device: str) -> None:
        """Until ``device`` has freed its slices of ``cid`` (its status key is gone), or
        the device is gone."""
        deadline = time.monotonic() + self.timeout
        while self.etcd.get(part_key(cid, device)) is not None:
            if self.etcd.get(device_key(device)) is None or time.monotonic() > deadline:
                return
            time.sleep(0.005)

    # ------------------------------------------------------------------ drain, rebalance

    def set_draining(self, device: str, draining: bool = True) -> DeviceRecord:
        """Mark ``device`` draining (no new reservation lands there) or not. One
        transaction on its record's revision, so a composer that read it before retries.
        Raises NotFound."""
        device = check_device_id(device, "device")
        for attempt in range(MAX_ATTEMPTS):
            kv = self.etcd.get(device_key(device))
            if kv is None:
                live = sorted(d.device for d in self.pool.devices())
                raise NotFound(
                    f"no live device {device} in the pool (live: {', '.join(live) or 'none'})",
                    device=device,
                    field="device",
                    expected=live,
                )
            rec = DeviceRecord.from_dict(kv.json(), kv.mod_revision, kv.lease)
            new = replace(rec, draining=draining)
            ok, _ = self.etcd.txn(
                [mod_revision_is(device_key(device), kv.mod_revision)],
                [put(device_key(device), new.to_dict(), rec.lease)],
            )
            if ok:
                return new
            backoff(attempt)
        raise MigrationFailed(f"drain of {device}: {MAX_ATTEMPTS} transactions lost", step="drain")

    def _parts_on(self, device: str) -> list[str]:
        """Compositions with a live (not lost) part on ``device``."""
        return [
            c["id"]
            for c in self.pool.compositions()
            for p in c["parts"]
            if p["device"] == device and p["state"] != "lost"
        ]

    def drain(self, device: str) -> dict[str, Any]:
        """Mark ``device`` draining, then move every part off it. Returns what moved where,
        what could not move and why, and whether the device is now empty."""
        self.set_draining(device, True)
        moved: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for cid in self._parts_on(device):
            try:
                moved.append(self.migrate(cid, device).to_dict())
            except (MigrationFailed, NoPlacement, NotFound) as e:
                failed.append({"composition": cid, "error": e.to_dict()})
        left = self._parts_on(device)
        return {
            "device": device,
            "draining": True,
            "moved": moved,
            "failed": failed,
            "parts_left": left,
            "empty": not left,
        }

    def plan_rebalance(self, threshold: float = REBALANCE_THRESHOLD) -> list[dict[str, Any]]:
        """Every part whose best other device lowers its cost by more than ``threshold``,
        best gain first (parts of compositions that are not active are left alone)."""
        devs = self.pool.devices()
        by_id = {d.device: d for d in devs}
        out = []
        for c in self.pool.compositions():
            if c["state"] != "active" or c.get("migration"):
                continue
            req = CompositionRequest.from_dict(c["request"])
            for raw in c["parts"]:
                part = Part.from_dict(raw)
                here = by_id.get(part.device)
                if here is None or here.draining:
                    continue  # lost, or drain's business
                others = [
                    by_id[p["device"]]
                    for p in c["parts"]
                    if p["device"] != part.device and p["device"] in by_id
                ]
                now = part_cost(req, part, here.give_back(part, c["owner"]), others, self.weights)
                try:
                    dst, _, best = choose_target(c, part, devs, weights=self.weights)
                except NoPlacement:
                    continue
                if now - best > threshold:
                    out.append(
                        {
                            "composition": c["id"],
                            "from": part.device,
                            "to": dst.device,
                            "cost_now": round(now, 4),
                            "cost_after": round(best, 4),
                            "gain": round(now - best, 4),
                        }
                    )
        return sorted(out, key=lambda m: -float(m["gain"]))

    def rebalance(
        self,
        threshold: float = REBALANCE_THRESHOLD,
        max_moves: int = REBALANCE_MAX_MOVES,
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Move the best-gaining part, re-plan, repeat while a gain is above ``threshold``
        (at most ``max_moves`` moves; a part moves at most once per run)."""
        if threshold < 0:
            raise RequestError("threshold", f"{threshold} is negative", expected=">= 0")
        if not 0 <= max_moves <= 1000:
            raise RequestError("max_moves", f"{max_moves} is out of range", limit="0..1000")
        if dry_run:
            return {"planned": self.plan_rebalance(threshold), "moved": [], "failed": []}
        moved: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        done: set[str] = set()
        while len(moved) < max_moves:
            plan = [m for m in self.plan_rebalance(threshold) if m["composition"] not in done]
            if not plan:
                break
            m = plan[0]
            done.add(m["composition"])
            try:
                r = self.migrate(m["composition"], m["from"], m["to"]).to_dict()
                moved.append({**r, "gain": m["gain"]})
            except (MigrationFailed, NoPlacement, NotFound) as e:
                failed.append({"composition": m["composition"], "error": e.to_dict()})
        return {"planned": [], "moved": moved, "failed": failed}
