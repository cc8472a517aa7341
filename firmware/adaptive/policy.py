"""Adaptive policies: a slice's owner opts in, per resource, with bounds of its own.

A policy, in the shape of ``SET_ADAPTIVE`` (C007h) and of the Python API::

    resource = "memory"      # or "cores", or "bandwidth"
    minimum = "2 GiB"        # never below (cores: a count; bandwidth: "10 Gbit/s")
    maximum = "16 GiB"       # never above
    step = "1 GiB"           # the unit of every change
    cooldown = 300           # seconds between two changes of this slice's resource;
                             # also how long usage must stay low before a shrink
    predictive = true        # also pre-allocate from the forecaster (default false)
    app_class = "web"        # the forecaster's key with the VM (default: the slice's name)

The thresholds are the device's, the same for every slice (docs/adaptive.md): grow when
the last sample is at least :data:`UP_AT` of the allocation, shrink when every sample of
the last ``cooldown`` seconds is at most :data:`DOWN_AT` of it, and size a change so that
use is about :data:`TARGET` of the new allocation.

Bandwidth is the rate a slice holds on each of its crossbar ports: the controller sets the
slice's QoS guaranteed *and* maximum bandwidth to the same value, so what it holds is
admitted against the port's capacity (like any ``RESIZE``) and enforced by the port's
token bucket (docs/adaptive.md, "Bandwidth").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from firmware.adaptive.usage import Resource, UsageStore
from firmware.errors import RequestError
from firmware.inventory import Device
from firmware.schema import Table
from firmware.units import format_bandwidth, format_size, parse_bandwidth, parse_size

if TYPE_CHECKING:
    from firmware.manager import ResourceManager

#: grow when the last sample reaches this fraction of the allocation
UP_AT = 0.85
#: shrink when every sample over the cooldown stays at or below this fraction
DOWN_AT = 0.5
#: a change aims for use at about this fraction of the new allocation
TARGET = 0.7
#: the longest cooldown an owner may set (one day)
MAX_COOLDOWN_S = 86400
#: application class labels (the forecaster's key with the VM)
APP_CLASS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
DEFAULT_APP_CLASS = "default"


@dataclass(frozen=True)
class AdaptivePolicy:
    """One slice's policy for one resource (amounts in bytes for memory, cores for cores,
    Mbit/s for bandwidth)."""

    slice_id: int
    resource: Resource
    minimum: int
    maximum: int
    step: int
    cooldown_s: int
    predictive: bool = False
    app_class: str = DEFAULT_APP_CLASS

    @classmethod
    def from_dict(
        cls, data: object, device: Device, slice_id: int, *, name: str = ""
    ) -> AdaptivePolicy:
        """Validate a policy request against the device. Raises :class:`RequestError`
        naming the field, the limit and what was expected."""
        t = Table(data, "", request=True)
        raw = t.raw("resource")
        try:
            resource = Resource(raw)
        except ValueError:
            raise t.error(
                "resource", f"{raw!r} is not adaptive", expected=[r.value for r in Resource]
            ) from None
        if resource is Resource.MEMORY:
            g = device.granule_bytes
            amounts = {k: t.quantity(k, parse_size) for k in ("minimum", "maximum", "step")}
            for k, v in amounts.items():
                if v < g or v % g:
                    raise t.error(
                        k,
                        f"{v} bytes is not a positive multiple of the {format_size(g)} granule",
                        limit=g,
                    )
            top, what = device.memory_bytes, "the device's memory"
        elif resource is Resource.BANDWIDTH:
            # at least 1 Mbit/s: a QoS maximum of 0 means "no limit" to the allocator
            amounts = {k: t.quantity(k, parse_bandwidth) for k in ("minimum", "maximum", "step")}
            for k, v in amounts.items():
                if v < 1:
                    raise t.error(k, f"{v} Mbit/s: expected at least 1 Mbit/s", limit=1)
            top = device.crossbar.port_mbps
            what = f"a crossbar port's capacity {format_bandwidth(top)}, in Mbit/s"
        else:
            top, what = device.cores, "the device's cores"
            amounts = {k: t.integer(k, lo=1, hi=top) for k in ("minimum", "maximum", "step")}
        lo, hi, step = amounts["minimum"], amounts["maximum"], amounts["step"]
        if hi > top:
            raise t.error("maximum", f"{hi} exceeds {what} ({top})", limit=top)
        if lo > hi:
            raise t.error("minimum", f"{lo} exceeds maximum {hi}", limit=hi)
        if step > hi:
            raise t.error("step", f"{step} exceeds maximum {hi}", limit=hi)
        cooldown = t.integer("cooldown", lo=1, hi=MAX_COOLDOWN_S)
        predictive = t.flag("predictive", False)
        app_class = t.raw("app_class", "") or name or DEFAULT_APP_CLASS
        if not isinstance(app_class, str) or not APP_CLASS_RE.fullmatch(app_class):
            raise t.error(
                "app_class",
                f"{app_class!r} is not a class label",
                expected="1-32 of A-Z a-z 0-9 _ . - (not starting with a symbol)",
            )
        t.done()
        return cls(slice_id, resource, lo, hi, step, cooldown, predictive, app_class)

    def to_dict(self) -> dict[str, Any]:
        """The stored form (``from_stored`` reads it back)."""
        return {
            "slice": self.slice_id, "resource": self.resource.value, "minimum": self.minimum,
            "maximum": self.maximum, "step": self.step, "cooldown": self.cooldown_s,
            "predictive": self.predictive, "app_class": self.app_class,
        }  # fmt: skip

    @classmethod
    def from_stored(cls, d: dict[str, Any]) -> AdaptivePolicy:
        return cls(
            int(d["slice"]), Resource(d["resource"]), int(d["minimum"]), int(d["maximum"]),
            int(d["step"]), int(d["cooldown"]), bool(d["predictive"]), str(d["app_class"]),
        )  # fmt: skip


def set_policy(
    manager: ResourceManager,
    store: UsageStore,
    slice_id: int,
    data: dict[str, Any],
    *,
    caller: str | None,
) -> AdaptivePolicy:
    """Opt ``slice_id`` in (or change its policy). Only its owner (or the administrator)
    may. Raises NotFound, PermissionDenied, RequestError."""
    view = manager.get(slice_id, caller=caller)
    policy = AdaptivePolicy.from_dict(data, manager.device, slice_id, name=view["name"])
    spec = view["spec"]
    if policy.resource is Resource.MEMORY and "memory" not in spec:
        raise RequestError("resource", f"slice {slice_id} has no memory to adapt")
    if policy.resource is Resource.BANDWIDTH and not view["alloc"]["ports"]:
        raise RequestError("resource", f"slice {slice_id} has no crossbar port to carry bandwidth")
    if policy.resource is Resource.CORES:
        if "cores" not in spec:
            raise RequestError("resource", f"slice {slice_id} has no cores to adapt")
        cluster = max(manager.device.cluster_sizes)
        if spec["cores"]["same_cluster"] and policy.maximum > cluster:
            raise RequestError(
                "maximum",
                f"{policy.maximum} cores cannot share one cluster of {cluster} "
                "(the slice has same_cluster affinity)",
                limit=cluster,
            )
    store.put_policy(slice_id, policy.resource, policy.to_dict())
    return policy


def clear_policy(
    manager: ResourceManager,
    store: UsageStore,
    slice_id: int,
    resource: Resource,
    *,
    caller: str | None,
) -> None:
    """Opt a slice's resource out; its allocation stays as it is."""
    manager.get(slice_id, caller=caller)  # ownership
    store.delete_policy(slice_id, resource)


def policy_of(store: UsageStore, slice_id: int, resource: Resource) -> AdaptivePolicy | None:
    for d in store.policies():
        if d["slice"] == slice_id and d["resource"] == resource.value:
            return AdaptivePolicy.from_stored(d)
    return None
