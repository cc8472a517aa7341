"""The pool API: compose a VM from slices of several devices, release it, and see what
became of it (``slicefab pool``, tests, benchmarks).

**Compose** (docs/pool.md, "Reservation"): read every device record (one range), place the
request (firmware.pool.placement), then **one etcd transaction**:

* compare: every chosen device's record is still at the ``mod_revision`` read, and the
  composition id is unused;
* success: rewrite each chosen device's record with the part taken from its free capacity
  (keeping the record on the device's lease), write one reservation key per part and the
  composition record.

Nothing else ever changes a device's free capacity except such transactions (and the
device's own registration, which is a new incarnation), so two composers that read the
same record cannot both commit: the second one's compare fails, it re-reads and places
again. That is why concurrent composers never oversubscribe a device. A transaction whose
outcome is unknown (the member died mid-request, the client failed over and re-sent it)
is settled by reading the composition key back: it carries a random nonce.

Then the devices program their parts (firmware.pool.member); ``compose`` waits until every
part is active. If a device refuses its part (its real allocator is stricter than the
pool's counts, e.g. memory too fragmented for its extent limit), the whole composition is
released and the error returned: all or nothing.

**Lost parts**: the state of each part is derived when read. A part whose device record
is gone (lease expired) or belongs to another incarnation is ``lost``, and so is the
composition; the owner sees it in ``get``/``list`` (and ``slicefab pool status``).
"""

from __future__ import annotations

import random
import secrets
import time
from typing import Any

from firmware import failpoints
from firmware.errors import (
    AllocationError,
    NotFound,
    PermissionDenied,
    RequestError,
    SlicefabError,
)
from firmware.pool.etcd import (
    KV,
    Etcd,
    PoolUnavailable,
    absent,
    delete,
    mod_revision_is,
    put,
)
from firmware.pool.model import (
    COMPOSITIONS,
    DEVICES,
    PARTS,
    PREFIX,
    CompositionRequest,
    DeviceRecord,
    Part,
    check_device_id,
    composition_key,
    device_key,
    reservation_key,
)
from firmware.pool.placement import DEFAULT_WEIGHTS, Placement, Weights, place

#: transaction attempts before a composer gives up under contention
MAX_ATTEMPTS = 200
PROGRAM_TIMEOUT_S = 20.0


class PoolBusy(AllocationError):
    """Every attempt lost its transaction to a concurrent composer."""

    code = "conflict"


class PartFailed(AllocationError):
    """A device refused to program its part; the composition was released."""

    code = "allocation"


def _id(cid: str) -> str:
    return check_device_id(cid, "composition")


def backoff(attempt: int) -> None:
    """Sleep a random while, longer with each lost transaction (composer, migrator)."""
    time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))


def give_back(device: DeviceRecord | None, part: Part, owner: str) -> list[dict[str, Any]]:
    """The etcd op that returns ``part``'s capacity to ``device``'s record, or none when
    the device is gone or restarted since the part was reserved (a lost part has nothing
    to give back)."""
    if device is None or device.incarnation != part.incarnation:
        return []
    return [put(device_key(device.device), device.give_back(part, owner).to_dict(), device.lease)]


class Pool:
    """A client of one pool (any of its etcd members). One per thread."""

    def __init__(self, endpoints: str | list[str], *, weights: Weights = DEFAULT_WEIGHTS) -> None:
        self.etcd = Etcd(endpoints)
        self.weights = weights
        #: transactions lost to concurrent composers (benches, tests)
        self.conflicts = 0

    # ------------------------------------------------------------------ reading

    def devices(self) -> list[DeviceRecord]:
        """Every live device, by id."""
        kvs, _ = self.etcd.range(DEVICES, prefix=True)
        return [DeviceRecord.from_dict(kv.json(), kv.mod_revision, kv.lease) for kv in kvs]

    def get(self, cid: str, *, caller: str | None = None) -> dict[str, Any]:
        """A composition with the state of each part. ``caller``: a VM may only see its
        own (PermissionDenied). Raises NotFound."""
        kv = self.etcd.get(composition_key(_id(cid)))
        if kv is None:
            raise NotFound(f"no composition {cid}", composition=cid)
        comp = kv.json()
        if caller is not None and comp["owner"] != caller:
            raise PermissionDenied(
                f"composition {cid} does not belong to {caller}", composition=cid, caller=caller
            )
        parts, _ = self.etcd.range(f"{PARTS}{cid}/", prefix=True)
        return _view(comp, {d.device: d for d in self.devices()}, parts)

    def compositions(self, *, owner: str | None = None) -> list[dict[str, Any]]:
        """Every composition (of ``owner``), with part states, from one consistent read
        of each prefix."""
        comps, _ = self.etcd.range(COMPOSITIONS, prefix=True)
        statuses, _ = self.etcd.range(PARTS, prefix=True)
        devs = {d.device: d for d in self.devices()}
        by_cid: dict[str, list[KV]] = {}
        for s in statuses:
            by_cid.setdefault(s.key[len(PARTS) :].split("/")[0], []).append(s)
        out = []
        for kv in comps:
            c = kv.json()
            if owner is None or c["owner"] == owner:
                out.append(_view(c, devs, by_cid.get(c["id"], [])))
        return out

    def status(self) -> dict[str, Any]:
        devs = self.devices()
        comps = self.compositions()
        states: dict[str, int] = {}
        for c in comps:
            states[c["state"]] = states.get(c["state"], 0) + 1
        return {
            "devices": [
                {**d.to_dict(), "lease": d.lease, "mod_revision": d.mod_revision} for d in devs
            ],
            "compositions": states,
            "lost": [
                {"id": c["id"], "owner": c["owner"], "lost_devices": c["lost_devices"]}
                for c in comps
                if c["state"] == "lost"
            ],
        }

    def check(self, local_slices: dict[str, list[dict[str, Any]]] | None = None) -> list[str]:
        """:func:`check_pool` on what etcd holds now (and the devices' own slice lists).
        Devices, compositions and part statuses are read in one range, at one revision,
        so the check holds at any moment (also while a migration runs), not only once
        the pool is quiet."""
        kvs, _ = self.etcd.range(PREFIX, prefix=True)
        devs = {
            d.device: d
            for d in (
                DeviceRecord.from_dict(kv.json(), kv.mod_revision, kv.lease)
                for kv in kvs
                if kv.key.startswith(DEVICES)
            )
        }
        by_cid: dict[str, list[KV]] = {}
        for kv in kvs:
            if kv.key.startswith(PARTS):
                by_cid.setdefault(kv.key[len(PARTS) :].split("/")[0], []).append(kv)
        comps = [
            _view(c, devs, by_cid.get(c["id"], []))
            for c in (kv.json() for kv in kvs if kv.key.startswith(COMPOSITIONS))
        ]
        return check_pool(list(devs.values()), comps, local_slices)

    # ------------------------------------------------------------------ compose

    def compose(
        self,
        request: CompositionRequest | dict[str, Any],
        *,
        cid: str | None = None,
        wait: bool = True,
        timeout: float = PROGRAM_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Reserve and program a composition; returns it (``get``) once every part is
        active. Raises RequestError, NoPlacement (InsufficientResources), PoolBusy,
        PartFailed (nothing kept), PoolUnavailable."""
        req = (
            request
            if isinstance(request, CompositionRequest)
            else CompositionRequest.from_dict(request)
        )
        cid = _id(cid) if cid is not None else secrets.token_hex(6)
        nonce = secrets.token_hex(8)
        placement = self._reserve(req, cid, nonce)
        if not wait:
            return {"id": cid, "placement": [p.to_dict() for p in placement.parts]}
        try:
            view = self.wait_programmed(cid, timeout)
        except BaseException:
            self.release(cid, wait=False)
            raise
        failed = [p for p in view["parts"] if p["state"] in ("failed", "lost")]
        if failed:
            self.release(cid, wait=True, timeout=timeout)
            why = "; ".join(
                f"{p['device']}: {p.get('error', {}).get('message', p['state'])}" for p in failed
            )
            raise PartFailed(
                f"composition {cid} released: a device could not program its part ({why})",
                composition=cid,
                parts=failed,
            )
        return view

    def _reserve(self, req: CompositionRequest, cid: str, nonce: str) -> Placement:
        for attempt in range(MAX_ATTEMPTS):
            devs = self.devices()
            # a draining device takes no new reservation (slicefab pool drain)
            placement = place(req, [d for d in devs if not d.draining], self.weights)
            by_id = {d.device: d for d in devs}
            compare = [absent(composition_key(cid))]
            ops = []
            for p in placement.parts:
                d = by_id[p.device]
                compare.append(mod_revision_is(device_key(d.device), d.mod_revision))
                ops.append(put(device_key(d.device), d.take(p, req.owner).to_dict(), d.lease))
                ops.append(
                    put(
                        reservation_key(d.device, cid),
                        {"id": cid, "owner": req.owner, "part": p.to_dict(), "nonce": nonce},
                    )
                )
            ops.append(
                put(
                    composition_key(cid),
                    {
                        "id": cid,
                        "owner": req.owner,
                        "nonce": nonce,
                        "request": req.to_dict(),
                        "parts": [p.to_dict() for p in placement.parts],
                        "cost": round(placement.cost, 4),
                        "created": time.time(),
                    },
                )
            )
            if failpoints.armed:
                failpoints.hit("etcd.before_txn")
            try:
                ok, _ = self.etcd.txn(compare, ops)
            except PoolUnavailable as e:
                if self._ours(cid, nonce):  # committed before the member went away
                    return placement
                if "lease not found" not in str(e):
                    raise
                ok = False  # a chosen device's lease expired meanwhile: place again
            if failpoints.armed:
                failpoints.hit("etcd.after_txn")
            if ok or self._ours(cid, nonce):
                return placement
            if self.etcd.get(composition_key(cid)) is not None:
                raise RequestError("composition", f"composition id {cid} is already in use")
            self.conflicts += 1
            backoff(attempt)
        raise PoolBusy(
            f"composition {cid}: {MAX_ATTEMPTS} transactions lost to concurrent composers",
            attempts=MAX_ATTEMPTS,
        )

    def _ours(self, cid: str, nonce: str) -> bool:
        kv = self.etcd.get(composition_key(cid))
        return kv is not None and kv.json().get("nonce") == nonce

    def wait_programmed(self, cid: str, timeout: float = PROGRAM_TIMEOUT_S) -> dict[str, Any]:
        """Wait until no part of ``cid`` is still ``reserved``; returns the composition."""
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            view = self.get(cid)
            if all(p["state"] != "reserved" for p in view["parts"]):
                return view
            if time.monotonic() > deadline:
                raise PartFailed(
                    f"composition {cid}: devices did not program their parts within {timeout} s",
                    composition=cid,
                    pending=[p["device"] for p in view["parts"] if p["state"] == "reserved"],
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.01)

    # ------------------------------------------------------------------ release

    def release(
        self,
        cid: str,
        *,
        caller: str | None = None,
        wait: bool = True,
        timeout: float = PROGRAM_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Release a composition: one transaction gives its parts back to the devices that
        still run the incarnation they were reserved on (a lost part has nothing to give
        back) and deletes its keys; with ``wait``, until every live device has freed its
        slices. Raises NotFound, PermissionDenied, PoolBusy, PoolUnavailable."""
        cid = _id(cid)
        for attempt in range(MAX_ATTEMPTS):
            kv = self.etcd.get(composition_key(cid))
            if kv is None:
                raise NotFound(f"no composition {cid}", composition=cid)
            comp = kv.json()
            if caller is not None and comp["owner"] != caller:
                raise PermissionDenied(
                    f"composition {cid} does not belong to {caller}",
                    composition=cid,
                    caller=caller,
                )
            devs = {d.device: d for d in self.devices()}
            compare = [mod_revision_is(composition_key(cid), kv.mod_revision)]
            ops = [delete(composition_key(cid))]
            given_back = []
            # a part being migrated holds its target's capacity too (firmware.pool.migrate)
            moving = [comp["migration"]["part"]] if comp.get("migration") else []
            for raw in comp["parts"] + moving:
                p = Part.from_dict(raw)
                ops.append(delete(reservation_key(p.device, cid)))
                d = devs.get(p.device)
                compare.append(mod_revision_is(device_key(p.device), d.mod_revision if d else 0))
                back = give_back(d, p, comp["owner"])
                ops += back
                if back:
                    given_back.append(p.device)
            ok, _ = self.etcd.txn(compare, ops)
            if ok:
                break
            if self.etcd.get(composition_key(cid)) is None:
                raise NotFound(f"no composition {cid} (released concurrently)", composition=cid)
            self.conflicts += 1
            backoff(attempt)
        else:
            raise PoolBusy(
                f"release of {cid}: {MAX_ATTEMPTS} transactions lost", attempts=MAX_ATTEMPTS
            )
        if wait:
            deadline = time.monotonic() + timeout
            while self.etcd.range(f"{PARTS}{cid}/", prefix=True)[0]:
                if time.monotonic() > deadline:
                    raise SlicefabError(
                        f"composition {cid} is released in the pool but devices did not free "
                        f"their slices within {timeout} s",
                        composition=cid,
                    )
                time.sleep(0.01)
        return {"id": cid, "owner": comp["owner"], "given_back": given_back}


def _view(
    comp: dict[str, Any], devs: dict[str, DeviceRecord], statuses: list[KV]
) -> dict[str, Any]:
    """A composition as its owner sees it: each part's state and the overall state."""
    by_dev = {kv.key.rsplit("/", 1)[1]: kv.json() for kv in statuses}
    parts = []
    lost = []
    for raw in comp["parts"]:
        p = Part.from_dict(raw)
        d = devs.get(p.device)
        view: dict[str, Any] = {**p.to_dict()}
        st = by_dev.get(p.device)
        if d is None or d.incarnation != p.incarnation:
            view["state"] = "lost"
            view["reason"] = (
                "the device left the pool (its lease expired)"
                if d is None
                else "the device restarted (a new incarnation)"
            )
            lost.append(p.device)
        elif st is None or st.get("incarnation") != p.incarnation:
            view["state"] = "reserved"
        else:
            view["state"] = st["state"]
            view["slices"] = st.get("slices", [])
            if "error" in st:
                view["error"] = st["error"]
        parts.append(view)
    states = {p["state"] for p in parts}
    state = (
        "lost"
        if "lost" in states
        else "failed"
        if "failed" in states
        else "active"
        if states == {"active"}
        else "reserved"
    )
    return {
        "id": comp["id"],
        "owner": comp["owner"],
        "state": state,
        "lost_devices": lost,
        "request": comp["request"],
        "parts": parts,
        "cost": comp.get("cost"),
        "created": comp.get("created"),
        "migration": comp.get("migration"),
    }


def check_pool(
    devices: list[DeviceRecord],
    compositions: list[dict[str, Any]],
    local_slices: dict[str, list[dict[str, Any]]] | None = None,
) -> list[str]:
    """The pool's invariants; returns the violations (empty when all hold).

    * no device is oversubscribed: on each live device, the parts reserved with its
      incarnation plus its free capacity fit in its total, for cores, memory and VM slots,
      and no free count is negative;
    * no NVMe group is in two parts, nor both in a part and free;
    * every VM with a part on a device is counted among its owners;
    * with ``local_slices`` (device id → the device's own slice list, ``slicefab slices
      list``): each active part's slices exist on its device with exactly the part's cores,
      memory and NVMe groups, and no pool slice exists there without a live part.

    The target part of a migration in progress (``migration`` in the composition,
    firmware.pool.migrate) counts as a part of its device.
    """
    bad: list[str] = []
    for d in devices:
        mine = [
            (c, Part.from_dict(p))
            for c in compositions
            for p in c["parts"] + ([c["migration"]["part"]] if c.get("migration") else [])
            if p["device"] == d.device and p["incarnation"] == d.incarnation
        ]
        cores = sum(p.cores for _, p in mine)
        memory = sum(p.memory for _, p in mine)
        owners = {c["owner"] for c, _ in mine}
        f, t = d.free, d.total
        for what, used, free, total in (
            ("cores", cores, f.cores, t.cores),
            ("memory", memory, f.memory, t.memory),
            ("vm slots", len(owners), f.vm_slots, t.vm_slots),
        ):
            if free < 0:
                bad.append(f"{d.device}: free {what} is negative ({free})")
            if used + free > total:
                bad.append(
                    f"{d.device}: oversubscribed {what}: {used} reserved + {free} free > "
                    f"{total} total"
                )
        seen: dict[str, str] = {}
        for c, p in mine:
            for e in p.nvme:
                if e in seen:
                    bad.append(f"{d.device}: NVMe {e} in compositions {seen[e]} and {c['id']}")
                seen[e] = c["id"]
                if e in f.nvme:
                    bad.append(f"{d.device}: NVMe {e} is reserved by {c['id']} and also free")
                if e not in t.nvme:
                    bad.append(f"{d.device}: composition {c['id']} holds unknown NVMe {e}")
        for o in owners - set(d.owners):
            bad.append(f"{d.device}: VM {o} has parts here but is not among its owners")
        if local_slices is None or d.device not in local_slices:
            continue
        from firmware.pool.model import composition_of

        by_cid: dict[str, list[dict[str, Any]]] = {}
        for s in local_slices[d.device]:
            cid = composition_of(s.get("name", ""))
            if cid is not None:
                by_cid.setdefault(cid, []).append(s)
        live = {c["id"]: (c, p) for c, p in mine}
        for cid in set(by_cid) - set(live):
            bad.append(f"{d.device}: slices {[s['id'] for s in by_cid[cid]]} of {cid} have no part")
        for cid, (c, p) in live.items():
            view: dict[str, Any] = next((v for v in c["parts"] if v["device"] == d.device), {})
            if view.get("state") != "active":
                continue
            got = by_cid.get(cid, [])
            g_cores = sum(len(s["alloc"]["cores"]) for s in got)
            g_nvme = sorted(s["spec"]["lanes"]["endpoint"] for s in got if s["spec"].get("lanes"))
            g_mem = sum(int(s["spec"].get("memory", {}).get("size", 0)) for s in got)
            if (g_cores, g_mem, g_nvme) != (p.cores, p.memory, sorted(p.nvme)):
                bad.append(
                    f"{d.device}: composition {cid} holds {g_cores} cores, {g_mem} B, NVMe "
                    f"{g_nvme} but its part is {p.cores} cores, {p.memory} B, NVMe "
                    f"{sorted(p.nvme)}"
                )
            if any(s["owner"] != c["owner"] for s in got):
                bad.append(f"{d.device}: a slice of {cid} is not owned by {c['owner']}")
    return bad
