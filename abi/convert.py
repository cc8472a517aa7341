"""Converters between ABI payload dicts and the firmware's JSON-able forms.

The firmware speaks dicts of a fixed shape (``SliceSpec.to_dict()`` / ``from_dict()``,
``ResizeSpec.to_dict()``, ``Slice.to_dict()``, ``Device.summary()``,
``Allocator.utilisation()``, ``ResourceManager.status()``); the wire speaks the payloads
of :mod:`abi.vendor`. These pure functions map one onto the other so that neither side
needs to know the other's shape. ``abi`` does not import the firmware: the shapes are
restated here as dict keys, and ``tests/test_abi_convert.py`` checks them against the
real firmware classes.

Differences the mapping has to bridge:

- a spec's ``key`` is ``"auto"`` in the firmware, ``None`` on the wire; optional parts
  (``cores``, ``memory``, ``lanes``, ``lanes.endpoint``/``first``, ``cores.ids``) are absent
  keys in the firmware and ``None`` on the wire; QoS is ``guaranteed``/``maximum`` there and
  ``guaranteed_mbps``/``maximum_mbps`` here (both Mbit/s);
- a VM's spec has no owner on the wire (the mailbox is the identity): the firmware side
  gets it from the caller (:func:`spec_from_payload` ``owner=``);
- a slice view carries ``granule_bytes`` on the wire instead of the firmware's human
  ``memory`` string; :func:`slice_view_from_payload` gives ``memory_bytes`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abi.errors import EncodeError
from abi.layout import Payload

_QOS_WIRE = (
    ("priority", "priority"),
    ("guaranteed", "guaranteed_mbps"),
    ("maximum", "maximum_mbps"),
)


def _need(d: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(d, Mapping) or key not in d:
        raise EncodeError(f"{where}.{key}" if where else key, "missing")
    return d[key]


# ------------------------------------------------------------------ slice specs


def spec_to_payload(
    spec: Mapping[str, Any], *, request_id: str | None = None, owner: bool = False
) -> Payload:
    """The ALLOCATE payload (``owner=True``: ALLOCATE_FOR, with the spec's owner) for a
    spec in the firmware's canonical form (``SliceSpec.to_dict()``).

    Missing optional keys take the firmware's defaults (no name, key auto, one port,
    QoS zero). Raises :class:`EncodeError` for a spec that is not in canonical form (e.g.
    sizes as strings): read such input with ``SliceSpec.from_dict`` first.
    """
    if not isinstance(spec, Mapping):
        raise EncodeError("spec", "expected a mapping")
    cores = spec.get("cores")
    memory = spec.get("memory")
    lanes = spec.get("lanes")
    key = spec.get("key", "auto")
    qos = spec.get("qos") or {}
    payload: Payload = {}
    if owner:
        payload["owner"] = _need(spec, "owner", "spec")
    payload.update(
        {
            "name": spec.get("name", ""),
            "cores": None
            if cores is None
            else {
                "count": _need(cores, "count", "cores"),
                "same_cluster": cores.get("same_cluster", False),
                "ids": None if cores.get("ids") is None else list(cores["ids"]),
            },
            "memory": None
            if memory is None
            else {
                "size": _need(memory, "size", "memory"),
                "contiguous": memory.get("contiguous", False),
            },
            "lanes": None
            if lanes is None
            else {
                "width": _need(lanes, "width", "lanes"),
                "first": lanes.get("first"),
                "endpoint": lanes.get("endpoint") or None,
            },
            "key": None if key in ("auto", None) else key,
            "ports": spec.get("ports", 1),
            "qos": {wire: qos.get(fw, 0) for fw, wire in _QOS_WIRE},
            "request_id": request_id,
        }
    )
    return payload


def _spec_body_to_dict(p: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """A spec in ``SliceSpec.to_dict()``'s exact shape (key order included)."""
    d: dict[str, Any] = {"owner": owner, "ports": p["ports"]}
    if p["name"]:
        d["name"] = p["name"]
    if p["cores"] is not None:
        c = p["cores"]
        d["cores"] = {"count": c["count"], "same_cluster": c["same_cluster"]}
        if c["ids"] is not None:
            d["cores"]["ids"] = list(c["ids"])
    if p["memory"] is not None:
        d["memory"] = {"size": p["memory"]["size"], "contiguous": p["memory"]["contiguous"]}
    if p["lanes"] is not None:
        ln = p["lanes"]
        d["lanes"] = {"width": ln["width"]}
        if ln["endpoint"] is not None:
            d["lanes"]["endpoint"] = ln["endpoint"]
        if ln["first"] is not None:
            d["lanes"]["first"] = ln["first"]
    d["key"] = "auto" if p["key"] is None else p["key"]
    d["qos"] = {fw: p["qos"][wire] for fw, wire in _QOS_WIRE}
    return d


def spec_from_payload(
    payload: Mapping[str, Any], *, owner: str | None = None
) -> tuple[dict[str, Any], str | None]:
    """``(spec, request_id)`` of an ALLOCATE or ALLOCATE_FOR payload: the spec in
    ``SliceSpec.to_dict()``'s shape, ready for ``SliceSpec.from_dict`` (which validates).

    ``owner`` is the authenticated VM for ALLOCATE; ALLOCATE_FOR's payload names its own.
    Raises :class:`ValueError` if neither or both give an owner.
    """
    named = payload.get("owner")
    if (named is None) == (owner is None):
        raise ValueError("give the owner exactly once: in the payload (admin) or owner= (VM)")
    who = named if named is not None else owner
    return _spec_body_to_dict(payload, str(who)), payload["request_id"]


# ------------------------------------------------------------------ resize


def resize_to_payload(
    slice_id: int, resize: Mapping[str, Any], *, request_id: str | None = None
) -> Payload:
    """The RESIZE payload for a resize in ``ResizeSpec.to_dict()``'s shape."""
    if not isinstance(resize, Mapping):
        raise EncodeError("resize", "expected a mapping")
    qos = resize.get("qos")
    return {
        "slice": slice_id,
        "memory": resize.get("memory"),
        "cores": resize.get("cores"),
        "qos": None if qos is None else {wire: qos.get(fw) for fw, wire in _QOS_WIRE},
        "request_id": request_id,
    }


def resize_from_payload(payload: Mapping[str, Any]) -> tuple[int, dict[str, Any], str | None]:
    """``(slice id, resize, request_id)`` of a RESIZE payload; the resize in
    ``ResizeSpec.to_dict()``'s shape, ready for ``ResizeSpec.from_dict``."""
    d: dict[str, Any] = {}
    if payload["memory"] is not None:
        d["memory"] = payload["memory"]
    if payload["cores"] is not None:
        d["cores"] = payload["cores"]
    if payload["qos"] is not None:
        q = payload["qos"]
        d["qos"] = {fw: q[wire] for fw, wire in _QOS_WIRE if q[wire] is not None}
    return payload["slice"], d, payload["request_id"]


# ------------------------------------------------------------------ slice views


def slice_view_to_payload(view: Mapping[str, Any], granule_bytes: int) -> Payload:
    """The SLICE payload for a slice view in ``Slice.to_dict()``'s shape (its human
    ``memory`` string is dropped: ``granule_bytes`` lets the reader compute it)."""
    spec = spec_to_payload(_need(view, "spec", "slice"))
    del spec["request_id"]
    alloc = _need(view, "alloc", "slice")
    lanes = alloc.get("lanes")
    return {
        "id": _need(view, "id", "slice"),
        "owner": _need(view, "owner", "slice"),
        "state": _need(view, "state", "slice"),
        "spec": spec,
        "alloc": {
            "cores": list(alloc.get("cores", [])),
            "extents": [{"start": s, "length": n} for s, n in alloc.get("extents", [])],
            "lanes": None
            if lanes is None
            else {"port": lanes["port"], "first": lanes["first"], "width": lanes["width"]},
            "key": alloc.get("key", 0),
            "ports": list(alloc.get("ports", [])),
        },
        "granule_bytes": granule_bytes,
    }


def slice_view_from_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A slice view in ``Slice.to_dict()``'s shape from a SLICE payload, with
    ``memory_bytes`` and ``granule_bytes`` in place of the human ``memory`` string."""
    alloc = payload["alloc"]
    granules = sum(e["length"] for e in alloc["extents"])
    return {
        "id": payload["id"],
        "owner": payload["owner"],
        "name": payload["spec"]["name"],
        "state": payload["state"],
        "spec": _spec_body_to_dict(payload["spec"], payload["owner"]),
        "alloc": {
            "cores": list(alloc["cores"]),
            "extents": [[e["start"], e["length"]] for e in alloc["extents"]],
            "lanes": None if alloc["lanes"] is None else dict(alloc["lanes"]),
            "key": alloc["key"],
            "ports": list(alloc["ports"]),
        },
        "memory_bytes": granules * payload["granule_bytes"],
        "granule_bytes": payload["granule_bytes"],
    }


# ------------------------------------------------------------------ device and status


def device_info_to_payload(summary: Mapping[str, Any], abi_version: int) -> Payload:
    """The DEVICE_INFO payload for ``Device.summary()`` (numbers only; the human
    strings of the summary are derived from them)."""
    memory, pcie, xbar = summary["memory"], summary["pcie"], summary["crossbar"]
    port_lanes = list(pcie["port_lanes"])
    return {
        "name": summary["name"],
        "model": summary["model"],
        "abi_version": abi_version,
        "clusters": list(summary["cores"]["clusters"]),
        "memory_bytes": memory["bytes"],
        "granule_bytes": memory["bytes"] // memory["granules"],
        "max_extents_per_slice": memory["max_extents_per_slice"],
        "port_lanes": port_lanes,
        "endpoints": [
            {
                "name": e["name"],
                "kind": e["kind"],
                "port": e["port"],
                "first_lane": e["first_lane"],
                "width": e["width"],
            }
            for e in pcie["endpoints"]
        ],
        "keys": summary["keys"],
        "crossbar_ports": xbar["ports"],
        "port_mbps": xbar["port_mbps"],
        "data_width_bits": xbar["data_width_bits"],
        "clock_mhz": xbar["clock_mhz"],
    }


_UTILISATION_KEYS = ("cores", "memory_granules", "lanes", "keys", "ports", "guaranteed_mbps")


def utilisation_to_payload(util: Mapping[str, Any]) -> Payload:
    """The UTILISATION struct for ``Allocator.utilisation()`` (the same shape, checked)."""
    return {
        k: {"used": _need(util, k, "utilisation")["used"], "total": util[k]["total"]}
        for k in _UTILISATION_KEYS
    }


def utilisation_from_payload(payload: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """``Allocator.utilisation()``'s shape from the UTILISATION struct."""
    return {k: dict(payload[k]) for k in _UTILISATION_KEYS}


def status_to_payload(status: Mapping[str, Any]) -> Payload:
    """The STATUS payload for ``ResourceManager.status()`` (host paths and the fabric's
    register tables are left out: FABRIC carries the tables)."""
    fabric, ledger = status["fabric"], status["ledger"]
    return {
        "device": status["device"],
        "slices": status["slices"],
        "utilisation": utilisation_to_payload(status["utilisation"]),
        "fabric": {
            "backend": fabric["backend"],
            "ports": fabric["ports"],
            "generation": fabric["generation"],
            "syncs": fabric["syncs"],
            "register_writes": fabric["register_writes"],
        },
        "ledger": {"batches": ledger["batches"], "records": ledger["records"]},
    }


__all__ = [
    "device_info_to_payload",
    "resize_from_payload",
    "resize_to_payload",
    "slice_view_from_payload",
    "slice_view_to_payload",
    "spec_from_payload",
    "spec_to_payload",
    "status_to_payload",
    "utilisation_from_payload",
    "utilisation_to_payload",
]
