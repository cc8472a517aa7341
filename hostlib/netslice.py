"""Network slices: a VM's network endpoint, shaped to its slice's maximum bandwidth.

A slice whose QoS sets a maximum bandwidth (``qos.maximum``) gets, on the host, a veth
pair made with pyroute2 (netlink, no ``ip``/``tc`` commands)::

    host namespace (host_netns, or this process's)       VM namespace (vm_netns)
    ┌───────────────────────────────────┐                ┌───────────────────────────────────┐
    │ sf42h   10.213.0.165/30           │◄── veth pair ─►│ sf42v   10.213.0.166/30           │
    │ root qdisc tbf rate R: host → VM  │                │ root qdisc tbf rate R: VM → host  │
    └───────────────────────────────────┘                └───────────────────────────────────┘

**Names** are derived from the slice id alone — ``<prefix><id>h`` (host end) and
``<prefix><id>v`` (VM end), ``sf`` by default — so :meth:`NetSlice.remove` finds what an
earlier process made, even one that crashed half-way, without any state file. A prefix is
at most 4 characters: with a 32-bit slice id (10 digits) and the suffix, a name stays within
Linux's 15-character ``IFNAMSIZ`` limit.

**Addresses.** Each slice takes a /30 of a configurable pool (default ``10.213.0.0/16``):
the host end gets its first address, the VM end its second. The first /30 tried is the
slice id's (``(id - 1) mod`` the number of /30s in the pool); one that overlaps an address
already on an interface of either namespace is skipped.

**Shaping** is one ``tbf`` root qdisc on each end, each shaping that end's egress: the host
end's limits host → VM, the VM end's limits VM → host. tbf, not htb: a veth pair carries one
slice, so there is nothing to arbitrate between classes, and tbf is the classless shaper
whose one parameter set is exactly "this rate, this burst, this queue". Its parameters
(:class:`Shaper`, measured figures in docs/network.md):

- ``rate``: the slice's maximum, in bits of Ethernet frames (what Linux tc counts). TCP
  payload over a 1500-byte MTU is 1448/1514 of that, so iperf3 reports ~95.6 % of it.
- ``burst`` = max(64 KiB, 20 ms at the rate). 64 KiB is the largest GSO packet veth hands
  tbf: a smaller bucket makes tbf re-segment every such packet in software. The 20 ms let
  the shaper catch up after the kernel runs its dequeue late — on a busy host the timer's
  softirq waits behind other work for milliseconds, and tokens beyond the bucket are lost
  for good. Measured on the shared 2-core machine at 83-98 % CPU pressure (docs/network.md):
  a 4 ms bucket (tc-tbf(8)'s "rate / HZ" at HZ = 250) lost up to 18 % at 1 Gbit/s, 10 ms up
  to 9 %, 20 ms none beyond the protocol overhead. The cost is bounded: in any window T a
  slice sends at most rate × T + burst, +2 % over one second.
- ``limit`` (queue) = 20 ms at the rate + the burst: enough that TCP keeps the queue busy
  after halving its window on a drop (the veth's own RTT is tens of µs, so the queue is
  the whole bandwidth-delay product), short enough not to add bufferbloat.

pyroute2 sends tbf's rate in the 32-bit bytes/s field (no ``TCA_TBF_RATE64``), so a rate
tops out at :data:`MAX_RATE_MBPS` (34,359 Mbit/s); a larger one is refused, not wrapped.

**Live resize** (:meth:`NetSlice.resize`) is a netlink "change" of both qdiscs: the link,
its addresses and the queued packets stay. :meth:`NetSlice.remove` deletes the link (the
peer, addresses and qdiscs go with it), a VM end left alone, and — when the slice owns its
namespace (``create_netns``) — the namespace once nothing but ``lo`` is left in it. It is
idempotent and returns what it removed.

**The VM's trust.** The VM-side qdisc lives in the VM's namespace: a process with
CAP_NET_ADMIN there can delete it. Where the VM is not trusted with its own namespace,
shape VM → host on the host end's ingress instead (an ifb device); this module does not
do that yet (docs/network.md).

Everything here is blocking netlink I/O, and needs CAP_NET_ADMIN (root) in both namespaces.
It imports pyroute2, so :mod:`hostlib` does not import it: ``import hostlib.netslice``.

Command line (the host administrator's; ``--json`` for machine-readable output)::

    python -m hostlib.netslice up 42 --rate 200 --netns vm-a [--create-netns]
    python -m hostlib.netslice resize 42 --rate 100 --netns vm-a
    python -m hostlib.netslice show 42 --netns vm-a
    python -m hostlib.netslice down 42 --netns vm-a [--create-netns]
    python -m hostlib.netslice sync 42 --credential vm-a.credential.toml --netns vm-a
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

from pyroute2 import IPRoute, NetlinkError, netns  # type: ignore[import-untyped]

from hostlib.client import Device, SliceInfo
from hostlib.errors import NetSliceError, NotFound, RequestError, SlicefabError

MAX_SLICE_ID: Final = 2**32 - 1  # abi: the slice id is a u32
MIN_RATE_MBPS: Final = 1
#: tbf's rate travels as a u32 of bytes/s: (2**32 - 1) * 8 bit/s, rounded down to Mbit/s
MAX_RATE_MBPS: Final = (2**32 - 1) * 8 // 1_000_000
IFNAMSIZ: Final = 15  # Linux interface names: 15 characters and the NUL
GSO_MAX_BYTES: Final = 65536  # the largest packet veth hands a qdisc (GSO/TSO)
BURST_SECONDS: Final = 0.020
LATENCY_SECONDS: Final = 0.020
DEFAULT_POOL: Final = "10.213.0.0/16"
DEFAULT_PREFIX: Final = "sf"
SUBNET_PREFIXLEN: Final = 30

PREFIX_RE: Final = re.compile(r"[a-z][a-z0-9]{0,3}")
#: a namespace name is a file name under /run/netns; the same shape as a VM id, so a VM's
#: id can name its namespace
NETNS_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

TC_H_ROOT: Final = 0xFFFFFFFF
TBF_HANDLE: Final = 0x10000  # "1:"


def _invalid(fld: str, message: str, **details: Any) -> RequestError:
    return RequestError(f"{fld}: {message}", code="invalid", details={"field": fld, **details})


@dataclass(frozen=True)
class Shaper:
    """The tbf parameters for one rate (the module docstring says why these)."""

    rate_mbps: int

    @property
    def rate_bytes(self) -> int:
        """Bytes per second."""
        return self.rate_mbps * 125_000

    @property
    def burst_bytes(self) -> int:
        return max(GSO_MAX_BYTES, round(self.rate_bytes * BURST_SECONDS))

    @property
    def limit_bytes(self) -> int:
        return round(self.rate_bytes * LATENCY_SECONDS) + self.burst_bytes

    def tbf(self) -> dict[str, int]:
        """Keyword arguments of pyroute2's ``tc(..., "tbf", ...)`` (an int rate is bytes/s)."""
        return {"rate": self.rate_bytes, "burst": self.burst_bytes, "limit": self.limit_bytes}


def check_rate(rate_mbps: object, fld: str = "rate_mbps") -> int:
    """``rate_mbps`` as a valid tbf rate in Mbit/s. Raises :class:`RequestError` naming
    ``fld`` and the limits."""
    if not isinstance(rate_mbps, int) or isinstance(rate_mbps, bool):
        raise _invalid(fld, f"expected an integer number of Mbit/s, got {rate_mbps!r}")
    if not MIN_RATE_MBPS <= rate_mbps <= MAX_RATE_MBPS:
        raise _invalid(
            fld,
            f"{rate_mbps} Mbit/s is outside {MIN_RATE_MBPS}..{MAX_RATE_MBPS} Mbit/s "
            "(tbf's rate is a 32-bit count of bytes/s)",
            got=rate_mbps,
            limit=[MIN_RATE_MBPS, MAX_RATE_MBPS],
        )
    return rate_mbps


def link_names(slice_id: int, prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """The (host end, VM end) interface names of slice ``slice_id``: ``sf42h``, ``sf42v``."""
    return f"{prefix}{slice_id}h", f"{prefix}{slice_id}v"


@dataclass(frozen=True)
class NetSliceSpec:
    """What a network slice is: validated on construction (:class:`RequestError`, whose
    ``field`` is the attribute's name).

    ``create_netns``: the slice owns ``vm_netns`` — :meth:`NetSlice.create` makes it when
    missing, :meth:`NetSlice.remove` deletes it once only ``lo`` is left in it. Without it,
    the namespace must exist and is never deleted. ``host_netns`` None: the namespace of
    the calling process."""

    slice_id: int
    rate_mbps: int
    vm_netns: str
    create_netns: bool = False
    host_netns: str | None = None
    pool: str = DEFAULT_POOL
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        sid = self.slice_id
        if not isinstance(sid, int) or isinstance(sid, bool) or not 1 <= sid <= MAX_SLICE_ID:
            raise _invalid(
                "slice_id",
                f"expected a slice id in 1..{MAX_SLICE_ID}, got {sid!r}",
                limit=[1, MAX_SLICE_ID],
            )
        check_rate(self.rate_mbps)
        for fld in ("vm_netns", "host_netns"):
            name = getattr(self, fld)
            if fld == "host_netns" and name is None:
                continue
            if not isinstance(name, str) or not NETNS_RE.fullmatch(name):
                raise _invalid(
                    fld,
                    f"{name!r} is not a namespace name (1-64 of A-Z a-z 0-9 _ . -, "
                    "starting with a letter or digit)",
                )
        if self.host_netns is not None and self.host_netns == self.vm_netns:
            raise _invalid("vm_netns", f"must differ from host_netns ({self.host_netns!r})")
        if not isinstance(self.prefix, str) or not PREFIX_RE.fullmatch(self.prefix):
            raise _invalid(
                "prefix",
                f"{self.prefix!r} is not an interface name prefix: 1-4 of a-z 0-9, starting "
                f"with a letter (a name is prefix + slice id + h/v, ≤ {IFNAMSIZ} characters)",
            )
        try:
            pool = ipaddress.IPv4Network(self.pool)
        except (ValueError, TypeError) as e:
            raise _invalid("pool", f"{self.pool!r} is not an IPv4 network ({e})") from None
        if pool.prefixlen > SUBNET_PREFIXLEN:
            raise _invalid(
                "pool",
                f"{pool} is smaller than one /{SUBNET_PREFIXLEN}: expected a prefix length "
                f"≤ {SUBNET_PREFIXLEN}",
                limit=SUBNET_PREFIXLEN,
            )

    @property
    def host_ifname(self) -> str:
        return link_names(self.slice_id, self.prefix)[0]

    @property
    def vm_ifname(self) -> str:
        return link_names(self.slice_id, self.prefix)[1]

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.pool)

    def candidate_subnets(self) -> Iterator[ipaddress.IPv4Network]:
        """The pool's /30s in the order they are tried: the slice id's first."""
        pool = self.network
        count = 1 << (SUBNET_PREFIXLEN - pool.prefixlen)
        base = int(pool.network_address)
        start = (self.slice_id - 1) % count
        for k in range(count):
            index = (start + k) % count
            yield ipaddress.IPv4Network((base + 4 * index, SUBNET_PREFIXLEN))


@dataclass(frozen=True)
class EndStatus:
    """One end of the pair as the kernel reports it."""

    ifname: str
    ifindex: int
    address: str | None  # "10.213.0.1/30"; None: no IPv4 address
    up: bool
    rate_mbps: int | None  # the root tbf's rate; None: no root tbf


@dataclass(frozen=True)
class NetSliceStatus:
    """What exists of a network slice. ``vm`` is None when the VM end cannot be seen (its
    namespace is gone)."""

    slice_id: int
    host: EndStatus
    vm: EndStatus | None

    @property
    def complete(self) -> bool:
        """Both ends up, addressed and shaped at the same rate."""
        ends = (self.host, self.vm)
        return all(
            e is not None and e.up and e.address is not None and e.rate_mbps is not None
            for e in ends
        ) and self.host.rate_mbps == (self.vm.rate_mbps if self.vm else None)

    @property
    def rate_mbps(self) -> int | None:
        """The rate both ends are shaped to; None when they disagree or one has none."""
        return self.host.rate_mbps if self.complete else None


# ------------------------------------------------------------------ netlink plumbing


def namespace_exists(name: str) -> bool:
    return name in netns.listnetns()


@contextlib.contextmanager
def _rtnl(ns: str | None, fld: str) -> Iterator[Any]:
    """An rtnetlink socket in namespace ``ns`` (None: this process's). Never creates the
    namespace (pyroute2's default would)."""
    if ns is not None and not namespace_exists(ns):
        raise NetSliceError(
            f"{fld}: network namespace {ns!r} does not exist", details={"field": fld, "netns": ns}
        )
    try:
        ipr = IPRoute() if ns is None else IPRoute(netns=ns, flags=0)
    except (NetlinkError, OSError) as e:
        raise NetSliceError(
            f"{fld}: cannot open netlink in namespace {ns or '(this process)'}: {e}",
            details={"field": fld, "netns": ns},
        ) from e
    try:
        yield ipr
    finally:
        ipr.close()


@contextlib.contextmanager
def _step(what: str, ifname: str) -> Iterator[None]:
    """Turn the kernel's refusal of one netlink request into a :class:`NetSliceError`."""
    try:
        yield
    except NetlinkError as e:
        raise NetSliceError(
            f"{what} ({ifname}): the kernel refused: {e.args[-1]} (errno {e.code})",
            details={"step": what, "interface": ifname, "errno": e.code},
        ) from e
    except OSError as e:
        raise NetSliceError(
            f"{what} ({ifname}): {e}",
            details={"step": what, "interface": ifname, "errno": e.errno},
        ) from e


def _lookup(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _root_tbf_rate(ipr: Any, index: int) -> int | None:
    for msg in ipr.tc("dump", index=index):
        if msg["parent"] == TC_H_ROOT and msg.get_attr("TCA_KIND") == "tbf":
            parms = msg.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")
            return round(int(parms["rate"]) * 8 / 1_000_000)
    return None


def _end_status(ipr: Any, ifname: str) -> EndStatus | None:
    index = _lookup(ipr, ifname)
    if index is None:
        return None
    (link,) = ipr.link("get", index=index)
    address = None
    for a in ipr.addr("dump", index=index, family=2):  # AF_INET
        address = f"{a.get('address')}/{a.get('prefixlen')}"
        break
    up = bool(link["flags"] & 1)  # IFF_UP
    return EndStatus(ifname, index, address, up, _root_tbf_rate(ipr, index))


def _networks_in_use(ipr: Any) -> list[ipaddress.IPv4Network]:
    return [
        ipaddress.IPv4Network(f"{a.get('address')}/{a.get('prefixlen')}", strict=False)
        for a in ipr.addr("dump", family=2)
    ]


def _ifnames(ipr: Any) -> list[str]:
    return [str(link.get("ifname")) for link in ipr.link("dump")]


# ------------------------------------------------------------------ the network slice


class NetSlice:
    """One slice's network endpoint on this host (see the module docstring).

    Every method raises :class:`NetSliceError` when the host refuses (with ``details``:
    the ``step``, the ``interface`` and the kernel's ``errno``), and :class:`RequestError`
    for a bad argument."""

    def __init__(self, spec: NetSliceSpec) -> None:
        self._spec = spec

    @classmethod
    def for_slice(
        cls,
        info: SliceInfo,
        *,
        vm_netns: str | None = None,
        create_netns: bool = False,
        host_netns: str | None = None,
        pool: str = DEFAULT_POOL,
        prefix: str = DEFAULT_PREFIX,
    ) -> NetSlice:
        """The network slice of a device slice: shaped to its QoS maximum bandwidth, in
        namespace ``vm_netns`` (default: the owner VM's id). Raises :class:`RequestError`
        (field ``qos.maximum``) for a slice with no maximum or one tbf cannot express."""
        if info.qos.maximum_mbps == 0:
            raise _invalid(
                "qos.maximum",
                f"slice {info.id} sets no maximum bandwidth (0: the crossbar port's "
                "capacity); a network slice needs one to shape to",
                got=0,
            )
        rate = check_rate(info.qos.maximum_mbps, "qos.maximum")
        return cls(
            NetSliceSpec(
                slice_id=info.id,
                rate_mbps=rate,
                vm_netns=vm_netns if vm_netns is not None else info.owner,
                create_netns=create_netns,
                host_netns=host_netns,
                pool=pool,
                prefix=prefix,
            )
        )

    @property
    def spec(self) -> NetSliceSpec:
        """The spec, with the rate of the last :meth:`resize`."""
        return self._spec

    def status(self) -> NetSliceStatus | None:
        """What exists, read back from the kernel; None when the host end does not exist
        (or its namespace does not)."""
        s = self._spec
        if s.host_netns is not None and not namespace_exists(s.host_netns):
            return None
        with _rtnl(s.host_netns, "host_netns") as ipr, _step("read", s.host_ifname):
            host = _end_status(ipr, s.host_ifname)
        if host is None:
            return None
        vm = None
        if namespace_exists(s.vm_netns):
            with _rtnl(s.vm_netns, "vm_netns") as ipr, _step("read", s.vm_ifname):
                vm = _end_status(ipr, s.vm_ifname)
        return NetSliceStatus(s.slice_id, host, vm)

    def create(self) -> NetSliceStatus:
        """Make the pair, address it, bring it up and shape both ends. All or nothing: on
        a failure everything made so far is removed before the error propagates. Raises
        :class:`NetSliceError` when anything already exists under the slice's names (call
        :meth:`remove`, or :meth:`apply` which repairs), when ``vm_netns`` is missing and
        not ``create_netns``, or when the pool has no free /30."""
        s = self._spec
        leftovers = self._leftovers()
        if leftovers:
            raise NetSliceError(
                f"slice {s.slice_id}: {', '.join(leftovers)} already exist(s); remove() "
                "them first, or apply() to repair",
                details={"field": "slice_id", "leftovers": leftovers},
            )
        if not namespace_exists(s.vm_netns) and not s.create_netns:
            raise NetSliceError(
                f"vm_netns: network namespace {s.vm_netns!r} does not exist (create it, or "
                "set create_netns to let the slice own one)",
                details={"field": "vm_netns", "netns": s.vm_netns},
            )
        try:
            self._create()
            status = self.status()
            if status is None or not status.complete:
                raise NetSliceError(
                    f"slice {s.slice_id}: created, but the kernel reports {status}",
                    details={"field": "slice_id"},
                )
        except BaseException:
            with contextlib.suppress(SlicefabError):
                self.remove()
            raise
        return status

    def _create(self) -> None:
        s = self._spec
        made_netns = False
        if not namespace_exists(s.vm_netns):
            with _step("create namespace", s.vm_netns):
                netns.create(s.vm_netns)
            made_netns = True
        subnet = self._free_subnet()
        host_addr, vm_addr = (str(a) for a in list(subnet.hosts())[:2])
        tbf = Shaper(s.rate_mbps).tbf()
        with _rtnl(s.host_netns, "host_netns") as ipr:
            # The link first: everything after hangs on it, so remove() finds it by name.
            with _step("add veth pair", s.host_ifname):
                ipr.link(
                    "add",
                    ifname=s.host_ifname,
                    kind="veth",
                    peer={"ifname": s.vm_ifname, "net_ns_fd": s.vm_netns},
                )
            index = _lookup(ipr, s.host_ifname)
            if index is None:  # pragma: no cover - the kernel just acknowledged it
                raise NetSliceError(f"{s.host_ifname} vanished right after it was made")
            with _step("address", s.host_ifname):
                ipr.addr("add", index=index, address=host_addr, prefixlen=SUBNET_PREFIXLEN)
            with _step("shape", s.host_ifname):
                ipr.tc("add", "tbf", index=index, handle=TBF_HANDLE, **tbf)
            with _step("up", s.host_ifname):
                ipr.link("set", index=index, state="up")
        with _rtnl(s.vm_netns, "vm_netns") as ipr:
            index = _lookup(ipr, s.vm_ifname)
            if index is None:
                raise NetSliceError(
                    f"{s.vm_ifname} is not in namespace {s.vm_netns!r} after the pair was made",
                    details={"field": "vm_netns", "interface": s.vm_ifname},
                )
            with _step("address", s.vm_ifname):
                ipr.addr("add", index=index, address=vm_addr, prefixlen=SUBNET_PREFIXLEN)
            with _step("shape", s.vm_ifname):
                ipr.tc("add", "tbf", index=index, handle=TBF_HANDLE, **tbf)
            with _step("up", s.vm_ifname):
                ipr.link("set", index=index, state="up")
            lo = _lookup(ipr, "lo")
            if made_netns and lo is not None:
                with _step("up", "lo"):
                    ipr.link("set", index=lo, state="up")

    def _free_subnet(self) -> ipaddress.IPv4Network:
        s = self._spec
        used: list[ipaddress.IPv4Network] = []
        for ns, fld in ((s.host_netns, "host_netns"), (s.vm_netns, "vm_netns")):
            with _rtnl(ns, fld) as ipr, _step("read addresses", fld):
                used += _networks_in_use(ipr)
        for subnet in s.candidate_subnets():
            if not any(subnet.overlaps(u) for u in used):
                return subnet
        raise NetSliceError(
            f"pool: every /{SUBNET_PREFIXLEN} of {s.pool} overlaps an address already in use",
            details={"field": "pool", "pool": s.pool},
        )

    def _leftovers(self) -> list[str]:
        s = self._spec
        found = []
        for ns, fld, ifname in (
            (s.host_netns, "host_netns", s.host_ifname),
            (s.vm_netns, "vm_netns", s.vm_ifname),
        ):
            if ns is not None and not namespace_exists(ns):
                continue
            with _rtnl(ns, fld) as ipr, _step("look up", ifname):
                if _lookup(ipr, ifname) is not None:
                    found.append(f"{ifname} (in {ns or 'this namespace'})")
        return found

    def resize(self, rate_mbps: int) -> NetSliceStatus:
        """Change both ends' rate live: the link, its addresses and its queue stay. Raises
        :class:`RequestError` (field ``rate_mbps``) for a bad rate, :class:`NetSliceError`
        when the slice does not exist."""
        new = replace(self._spec, rate_mbps=check_rate(rate_mbps))
        tbf = Shaper(new.rate_mbps).tbf()
        for ns, fld, ifname in (
            (new.host_netns, "host_netns", new.host_ifname),
            (new.vm_netns, "vm_netns", new.vm_ifname),
        ):
            with _rtnl(ns, fld) as ipr:
                index = _lookup(ipr, ifname)
                if index is None:
                    raise NetSliceError(
                        f"slice {new.slice_id}: {ifname} does not exist in "
                        f"{ns or 'this namespace'}; create() it first",
                        details={"field": "slice_id", "interface": ifname},
                    )
                with _step("change rate", ifname):
                    ipr.tc("change", "tbf", index=index, handle=TBF_HANDLE, **tbf)
        self._spec = new
        status = self.status()
        if status is None or status.rate_mbps != new.rate_mbps:
            raise NetSliceError(
                f"slice {new.slice_id}: resized to {new.rate_mbps} Mbit/s, but the kernel "
                f"reports {status}",
                details={"field": "rate_mbps"},
            )
        return status

    def remove(self) -> list[str]:
        """Delete everything the slice made, found by name: the pair, a VM end left alone,
        and the VM namespace when the slice owns it (``create_netns``) and only ``lo`` is
        left in it. Idempotent; returns what it deleted (``[]`` when nothing was left)."""
        s = self._spec
        removed: list[str] = []
        for ns, fld, ifname in (
            (s.host_netns, "host_netns", s.host_ifname),
            (s.vm_netns, "vm_netns", s.vm_ifname),
        ):
            if ns is not None and not namespace_exists(ns):
                continue
            with _rtnl(ns, fld) as ipr:
                index = _lookup(ipr, ifname)
                if index is None:
                    continue
                with _step("delete", ifname):
                    try:
                        ipr.link("del", index=index)
                    except NetlinkError as e:
                        if e.code != 19:  # ENODEV: its peer's deletion took it first
                            raise
                removed.append(ifname)
        if s.create_netns and namespace_exists(s.vm_netns):
            with _rtnl(s.vm_netns, "vm_netns") as ipr, _step("look up", s.vm_netns):
                others = [n for n in _ifnames(ipr) if n != "lo"]
            if not others:
                with _step("delete namespace", s.vm_netns):
                    netns.remove(s.vm_netns)
                removed.append(f"netns {s.vm_netns}")
        return removed

    def apply(self) -> NetSliceStatus:
        """Make the network slice match the spec whatever is there: nothing → create; a
        complete slice at another rate → resize live; anything half-made (a crash,
        someone's hand) → remove, then create."""
        status = self.status()
        if status is not None and status.complete:
            if status.rate_mbps == self._spec.rate_mbps:
                return status
            return self.resize(self._spec.rate_mbps)
        self.remove()
        return self.create()


def sync_slice(
    info: SliceInfo,
    *,
    vm_netns: str | None = None,
    create_netns: bool = False,
    host_netns: str | None = None,
    pool: str = DEFAULT_POOL,
    prefix: str = DEFAULT_PREFIX,
) -> NetSliceStatus | None:
    """Bring a slice's network endpoint in line with what the device reports for it —
    call it with what ``allocate``, ``resize``, ``get`` or ``free`` returned:

    - a live slice with a maximum bandwidth: created, resized live or repaired
      (:meth:`NetSlice.apply`); returns its status;
    - a slice that is not live (freed, releasing, error) or sets no maximum: whatever
      exists under its names is removed; returns None.
    """
    if info.live and info.qos.maximum_mbps:
        ns = NetSlice.for_slice(
            info,
            vm_netns=vm_netns,
            create_netns=create_netns,
            host_netns=host_netns,
            pool=pool,
            prefix=prefix,
        )
        return ns.apply()
    NetSlice(
        NetSliceSpec(
            slice_id=info.id,
            rate_mbps=MIN_RATE_MBPS,  # removal goes by name; the rate plays no part
            vm_netns=vm_netns if vm_netns is not None else info.owner,
            create_netns=create_netns,
            host_netns=host_netns,
            pool=pool,
            prefix=prefix,
        )
    ).remove()
    return None


# ------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hostlib.netslice",
        description="A slice's network endpoint: veth pair + tbf shaping (needs root).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("slice_id", type=int)
        q.add_argument("--netns", required=True, help="the VM's network namespace")
        q.add_argument("--json", action="store_true", help="machine-readable output")
        q.add_argument("--create-netns", action="store_true", help="the slice owns --netns")
        q.add_argument("--host-netns", default=None, help="default: this process's namespace")
        q.add_argument("--pool", default=DEFAULT_POOL, help=f"default {DEFAULT_POOL}")
        q.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"default {DEFAULT_PREFIX!r}")

    up = sub.add_parser("up", help="create (or repair, or resize) a network slice")
    common(up)
    up.add_argument("--rate", type=int, required=True, help="Mbit/s")
    rs = sub.add_parser("resize", help="change the rate live")
    common(rs)
    rs.add_argument("--rate", type=int, required=True, help="Mbit/s")
    common(sub.add_parser("show", help="what exists"))
    common(sub.add_parser("down", help="remove everything the slice made"))
    sy = sub.add_parser("sync", help="match the device's view of the slice (hostlib.Device)")
    common(sy)
    sy.add_argument("--credential", default=None, help="default: $SLICEFAB_CREDENTIALS")
    sy.add_argument("--mailbox", default=None, help="default: discovered")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hostlib.netslice``; exit status 1 with the error on stderr."""
    args = _parser().parse_args(argv)
    try:
        result = _run(args)
    except SlicefabError as e:
        print(f"netslice: error: {e.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    elif isinstance(result, list):
        print("removed: " + (", ".join(result) or "nothing"))
    elif result is None:
        print("no network slice")
    else:
        for end in ("host", "vm"):
            st = result[end]
            if st is None:
                print(f"{end:4}  (not visible)")
            else:
                rate = "-" if st["rate_mbps"] is None else f"{st['rate_mbps']} Mbit/s"
                state = "up" if st["up"] else "down"
                print(f"{end:4}  {st['ifname']:<15} {st['address'] or '-':<18} {state:<4} {rate}")
    return 0


def _run(args: argparse.Namespace) -> Any:
    def spec(rate: int) -> NetSliceSpec:
        return NetSliceSpec(
            slice_id=args.slice_id,
            rate_mbps=rate,
            vm_netns=args.netns,
            create_netns=args.create_netns,
            host_netns=args.host_netns,
            pool=args.pool,
            prefix=args.prefix,
        )

    if args.command == "sync":
        with Device.open(args.credential, mailbox=args.mailbox) as dev:
            try:
                info = dev.get(args.slice_id)
            except NotFound:
                info = None
        if info is None or not (info.live and info.qos.maximum_mbps):
            # freed, or no network QoS: only the names are needed to clean up
            return NetSlice(spec(MIN_RATE_MBPS)).remove()
        status = sync_slice(
            info,
            vm_netns=args.netns,
            create_netns=args.create_netns,
            host_netns=args.host_netns,
            pool=args.pool,
            prefix=args.prefix,
        )
        return None if status is None else asdict(status)
    if args.command == "up":
        return asdict(NetSlice(spec(args.rate)).apply())
    if args.command == "resize":
        return asdict(NetSlice(spec(MIN_RATE_MBPS)).resize(args.rate))
    if args.command == "down":
        return NetSlice(spec(MIN_RATE_MBPS)).remove()
    status = NetSlice(spec(MIN_RATE_MBPS)).status()
    return None if status is None else asdict(status)


if __name__ == "__main__":
    sys.exit(main())
