"""The daemon's Prometheus endpoint: ``slicefab serve --metrics ADDR:PORT``.

Everything but the request latencies is read **at scrape time** by one custom collector
(:class:`DeviceCollector`): utilisation and the slice table under the manager's lock (one
consistent snapshot), the crossbar's per-port counters straight from its registers
(:meth:`FabricDriver.port_counters`), the refusal counters of every VM mailbox
(:class:`firmware.api.Counters`), the ledger's and the fabric driver's own counts. Nothing
polls, and a daemon nobody scrapes pays nothing but the latency histogram.

Request latencies come from the one hook the request pipeline has,
:attr:`firmware.api.Api.observe`: every answered request, VM or admin, is observed with
its command's name and the CXL return code it was answered with.

Each daemon has its own :class:`~prometheus_client.CollectorRegistry` (never the global
default one), so several daemons, or a test's managers, can live in one process.
The metric list, with types, labels and meaning, is in docs/reliability.md ("Telemetry").
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from abi.commands import Role
from abi.retcodes import ReturnCode
from firmware.allocator import Allocator
from firmware.errors import ConfigError, FabricError
from firmware.slices import SliceState

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from firmware.api import Api, Channel
    from firmware.manager import ResourceManager

log = logging.getLogger("slicefab.metrics")

#: request latency buckets (seconds): an authenticated no-op takes ~100 µs, a durable
#: allocation ~1 ms (an fsync), a simulated fabric's reconfiguration up to seconds
LATENCY_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: Mbit/s (the firmware's bandwidth unit) → bytes/s (Prometheus's base unit)
BYTES_PER_S_PER_MBPS = 125_000

#: the refusal counters of a VM channel (firmware.api.Counters) → ``reason`` label values
REFUSAL_REASONS = ("auth_failed", "replayed", "rate_limited", "malformed", "not_allowed")

#: the port counter registers (FabricDriver.port_counters keys) → metric name and help
PORT_COUNTERS = {
    "packets": ("slicefab_port_packets", "packets forwarded by the input port (CNT_PKTS)"),
    "flits": ("slicefab_port_flits", "flits forwarded by the input port (CNT_FLITS)"),
    "drops": (
        "slicefab_port_drops",
        "packets of the input port dropped whole: output or key not permitted (CNT_DROPS)",
    ),
    "stalls": (
        "slicefab_port_stall_cycles",
        "cycles the input port waited for its token bucket (CNT_STALLS)",
    ),
}


# ---------------------------------------------------------------------- the address


def parse_address(text: str, *, public: bool = False) -> tuple[str, int]:
    """``ADDR:PORT`` (``[ADDR]:PORT`` for IPv6; ``localhost`` means 127.0.0.1) → (host,
    port). Port 0 lets the kernel pick a free port (the daemon prints the one it got).

    Raises ConfigError naming ``--metrics`` for a malformed address, a port out of range,
    or an address that is not loopback when ``public`` is not set: the endpoint shows
    every VM's allocations and its counters, so exposing it is the administrator's call
    (``--metrics-public``)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(
            f"--metrics: {text!r} is not ADDR:PORT",
            field="--metrics",
            expected="e.g. 127.0.0.1:9464 or [::1]:9464",
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(
            f"--metrics: IPv6 address {host!r} must be in brackets",
            field="--metrics",
            expected=f"[{host}]:{port_text}",
        )
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"--metrics: {host!r} is not an IP address",
            field="--metrics",
            expected="an IPv4 or IPv6 address, or localhost",
        ) from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(
            f"--metrics: port {port_text!r} is out of range",
            field="--metrics",
            limit=65535,
            expected="a TCP port 0-65535 (0: any free port)",
        )
    if not ip.is_loopback and not public:
        raise ConfigError(
            f"--metrics: {host} is not a loopback address; the endpoint shows every VM's "
            "slices and counters, add --metrics-public to serve it beyond this host",
            field="--metrics",
            expected="127.0.0.0/8 or ::1, or --metrics-public",
        )
    return str(ip), int(port_text)


# ---------------------------------------------------------------------- scrape-time reads


@dataclass(frozen=True)
class _SliceRow:
    id: int
    owner: str
    name: str
    state: str
    key: int
    cores: int
    memory_bytes: int
    extents: int
    lane_width: int
    ports: int
    priority: int
    guaranteed_mbps: int
    max_mbps: int  # the effective limit: the port's capacity when the slice sets none


@dataclass(frozen=True)
class _Snapshot:
    """What one scrape reads under the manager's lock: one consistent view."""

    utilisation: dict[str, dict[str, int]]
    slices: list[_SliceRow]
    port_owner: list[str | None]
    port_guaranteed_mbps: list[int]


def _snapshot(a: Allocator) -> _Snapshot:
    dev = a.device
    cap = dev.crossbar.port_mbps
    rows = [
        _SliceRow(
            id=s.id,
            owner=s.owner,
            name=s.spec.name,
            state=s.state.value,
            key=s.alloc.key,
            cores=len(s.alloc.cores),
            memory_bytes=s.alloc.granules * dev.granule_bytes,
            extents=len(s.alloc.extents),
            lane_width=0 if s.alloc.lanes is None else s.alloc.lanes.width,
            ports=len(s.alloc.ports),
            priority=s.spec.qos.priority,
            guaranteed_mbps=s.spec.qos.guaranteed_mbps,
            max_mbps=min(cap, s.spec.qos.limit_mbps(cap)),
        )
        for s in sorted(a.slices.values(), key=lambda s: s.id)
    ]
    return _Snapshot(
        utilisation=a.utilisation(),
        slices=rows,
        port_owner=[p.owner for p in a.ports],
        port_guaranteed_mbps=[p.guaranteed_mbps for p in a.ports],
    )


class DeviceCollector(Collector):
    """Reads the device's state when Prometheus scrapes (see the module docstring)."""

    def __init__(
        self, manager: ResourceManager, channels: Callable[[], Mapping[str, Channel]]
    ) -> None:
        self.manager = manager
        self.channels = channels
        self._fabric_errors = 0
        self._errors_lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        m = self.manager
        dev, fabric, ledger = m.device, m.fabric, m.ledger
        snap = m.read(_snapshot)

        info = GaugeMetricFamily(
            "slicefab_device_info",
            "the device this firmware serves (value 1)",
            labels=["device", "model", "fingerprint", "backend"],
        )
        info.add_metric([dev.name, dev.model, dev.fingerprint(), fabric.backend], 1)
        yield info

        used = GaugeMetricFamily(
            "slicefab_resource_used",
            "units held by live slices (guaranteed_mbps: Mbit/s admitted over all ports)",
            labels=["resource"],
        )
        capacity = GaugeMetricFamily(
            "slicefab_resource_capacity", "units the device has", labels=["resource"]
        )
        for resource, u in snap.utilisation.items():
            used.add_metric([resource], u["used"])
            capacity.add_metric([resource], u["total"])
        yield used
        yield capacity

        by_state = GaugeMetricFamily(
            "slicefab_slices", "slices in the slice table, by lifecycle state", labels=["state"]
        )
        for state in SliceState:
            by_state.add_metric([state.value], sum(r.state == state.value for r in snap.slices))
        yield by_state
        yield from self._slices(snap.slices)
        yield from self._ports(snap)

        yield CounterMetricFamily(
            "slicefab_fabric_syncs", "crossbar reconfigurations committed", value=fabric.syncs
        )
        yield CounterMetricFamily(
            "slicefab_fabric_register_writes",
            "crossbar register writes, commits included",
            value=fabric.writes,
        )
        yield GaugeMetricFamily(
            "slicefab_fabric_generation",
            "the crossbar's committed configuration generation",
            value=fabric.generation,
        )
        yield CounterMetricFamily(
            "slicefab_ledger_commits",
            "ledger transactions committed (group commits: one fsync each)",
            value=ledger.batches,
        )
        yield CounterMetricFamily(
            "slicefab_ledger_records",
            "record groups made durable (one per submit: a request's records)",
            value=ledger.records,
        )
        yield from self._vms()

    def _slices(self, rows: list[_SliceRow]) -> Iterator[Metric]:
        labels = ["slice", "owner"]
        info = GaugeMetricFamily(
            "slicefab_slice_info",
            "one per slice (value 1): its name, lifecycle state and protection key",
            labels=[*labels, "name", "state", "key"],
        )
        families = {
            "cores": GaugeMetricFamily("slicefab_slice_cores", "cores held", labels=labels),
            "memory_bytes": GaugeMetricFamily(
                "slicefab_slice_memory_bytes", "memory held", labels=labels
            ),
            "extents": GaugeMetricFamily(
                "slicefab_slice_memory_extents", "memory extents held", labels=labels
            ),
            "lane_width": GaugeMetricFamily(
                "slicefab_slice_lane_width", "PCIe link width held (0: none)", labels=labels
            ),
            "ports": GaugeMetricFamily(
                "slicefab_slice_ports", "crossbar ports the slice uses", labels=labels
            ),
            "priority": GaugeMetricFamily(
                "slicefab_slice_priority", "QoS priority 0-7", labels=labels
            ),
        }
        guaranteed = GaugeMetricFamily(
            "slicefab_slice_guaranteed_bytes_per_second",
            "guaranteed bandwidth on each of the slice's ports",
            labels=labels,
        )
        maximum = GaugeMetricFamily(
            "slicefab_slice_max_bytes_per_second",
            "maximum bandwidth on each of the slice's ports (the port's capacity if unset)",
            labels=labels,
        )
        for r in rows:
            ids = [str(r.id), r.owner]
            info.add_metric([*ids, r.name, r.state, str(r.key)], 1)
            for attr, family in families.items():
                family.add_metric(ids, getattr(r, attr))
            guaranteed.add_metric(ids, r.guaranteed_mbps * BYTES_PER_S_PER_MBPS)
            maximum.add_metric(ids, r.max_mbps * BYTES_PER_S_PER_MBPS)
        yield info
        yield from families.values()
        yield guaranteed
        yield maximum

    def _ports(self, snap: _Snapshot) -> Iterator[Metric]:
        dev, fabric = self.manager.device, self.manager.fabric
        n = dev.crossbar.ports
        owner = GaugeMetricFamily(
            "slicefab_port_owner_info",
            "one per held crossbar port (value 1): the VM holding it",
            labels=["port", "owner"],
        )
        guaranteed = GaugeMetricFamily(
            "slicefab_port_guaranteed_bytes_per_second",
            "guaranteed bandwidth admitted on the port (sum over its slices)",
            labels=["port"],
        )
        for p in range(n):
            if snap.port_owner[p] is not None:
                owner.add_metric([str(p), str(snap.port_owner[p])], 1)
            guaranteed.add_metric([str(p)], snap.port_guaranteed_mbps[p] * BYTES_PER_S_PER_MBPS)
        yield owner
        yield guaranteed
        yield GaugeMetricFamily(
            "slicefab_port_capacity_bytes_per_second",
            "the capacity of every crossbar port",
            value=dev.crossbar.port_mbps * BYTES_PER_S_PER_MBPS,
        )

        counters = {
            key: CounterMetricFamily(
                name, help_ + "; a 32-bit register that wraps", labels=["port"]
            )
            for key, (name, help_) in PORT_COUNTERS.items()
        }
        try:
            values = [fabric.port_counters(p) for p in range(n)]
        except FabricError as e:  # the other metrics are still worth a scrape
            log.warning("metrics: cannot read the crossbar's port counters: %s", e)
            with self._errors_lock:
                self._fabric_errors += 1
            values = []
        for p, regs in enumerate(values):
            for key, family in counters.items():
                family.add_metric([str(p)], regs[key])
        yield from counters.values()
        yield CounterMetricFamily(
            "slicefab_fabric_counter_read_errors",
            "scrapes that could not read the crossbar's port counters",
            value=self._fabric_errors,
        )

    def _vms(self) -> Iterator[Metric]:
        channels = self.channels()
        yield GaugeMetricFamily(
            "slicefab_vms", "provisioned VMs (mailboxes served)", value=len(channels)
        )
        requests = CounterMetricFamily(
            "slicefab_vm_requests",
            "frames the VM's mailbox delivered to the request pipeline",
            labels=["vm"],
        )
        refused = CounterMetricFamily(
            "slicefab_vm_refused",
            "requests refused by the mailbox's checks before execution, by reason",
            labels=["vm", "reason"],
        )
        for vm, ch in sorted(channels.items()):
            c = ch.counters
            requests.add_metric([vm], c.requests)
            for reason in REFUSAL_REASONS:
                refused.add_metric([vm, reason], getattr(c, reason))
        yield requests
        yield refused


# ---------------------------------------------------------------------- the daemon's metrics


class DaemonMetrics:
    """The metrics of one daemon, in their own registry: the scrape-time collector, the
    process's CPU and memory, and the request latency histogram fed by :meth:`observe`
    (install it as :attr:`firmware.api.Api.observe`)."""

    def __init__(
        self, manager: ResourceManager, channels: Callable[[], Mapping[str, Channel]]
    ) -> None:
        self.registry = CollectorRegistry()
        self.collector = DeviceCollector(manager, channels)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)  # process_*: the usual names
        self._latency = Histogram(
            "slicefab_request_duration_seconds",
            "requests answered, by channel role, command and CXL return code, and the "
            "time from the frame's arrival in the firmware to its sealed answer",
            ["role", "command", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # labelled children by (role, command, return code): labels() takes a lock and
        # validates its arguments, a dict lookup does not
        self._children: dict[tuple[Role, str, int], Histogram] = {}

    def observe(self, role: Role, command: str, return_code: int, seconds: float) -> None:
        key = (role, command, return_code)
        child = self._children.get(key)
        if child is None:
            child = self._latency.labels(
                str(role.name).lower(), command, return_code_label(return_code)
            )
            self._children[key] = child
        child.observe(seconds)


def return_code_label(return_code: int) -> str:
    """``0`` → ``"success"``, ``0x13`` → ``"invalid_security_state"`` (CXL r3.1 Table 8-34)."""
    try:
        return ReturnCode(return_code).name.lower()
    except ValueError:
        return f"0x{return_code:04x}"


class MetricsEndpoint:
    """The HTTP endpoint (``/metrics``) of a registry, on its own thread until :meth:`stop`."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        """Raises ConfigError naming ``--metrics`` if the address cannot be listened on."""
        try:
            server, thread = start_http_server(port, host, registry=registry)
        except OSError as e:
            raise ConfigError(
                f"--metrics: cannot listen on {_host_port(host, port)}: {e.strerror or e}",
                field="--metrics",
            ) from None
        self._server: WSGIServer = server
        self._thread = thread
        self.host = host
        self.port: int = server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{_host_port(self.host, self.port)}/metrics"

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


def serve(
    api: Api, channels: Callable[[], Mapping[str, Channel]], host: str, port: int
) -> MetricsEndpoint:
    """The daemon's metrics on ``host:port``: a fresh registry, the request hook installed
    on ``api``. Raises ConfigError if the address cannot be listened on (``api`` is then
    left as it was)."""
    metrics = DaemonMetrics(api.manager, channels)
    endpoint = MetricsEndpoint(metrics.registry, host, port)
    api.observe = metrics.observe
    return endpoint


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = [
    "LATENCY_BUCKETS",
    "DaemonMetrics",
    "DeviceCollector",
    "MetricsEndpoint",
    "parse_address",
    "return_code_label",
    "serve",
]
