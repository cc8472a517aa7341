"""The Prometheus endpoint (firmware.metrics): the metrics of a real ``slicefab serve``
scraped over HTTP and checked against ``slicefab status --json`` and the slice table; the
per-command request counters and the per-VM refusal counters moved by real frames
(including a forged MAC and a replay on a VM's mailbox); the crossbar's port counters read
from its registers after traffic; several daemons' registries in one process; the
address checks of ``--metrics``."""

from __future__ import annotations

import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from abi.commands import Role, encode_request
from abi.retcodes import ERRORS, ReturnCode
from firmware import metrics
from firmware.api import Api, Channel
from firmware.errors import ConfigError
from firmware.fabric.model import CrossbarModel
from firmware.manager import ResourceManager, StateDir, open_manager
from firmware.slices import SliceSpec
from hostlib.mailbox import MailboxClient
from tests.test_api import RawVm
from tests.test_cli import CLI, Daemon, run, run_json

MBPS = 125_000  # bytes/s in 1 Mbit/s: the metrics are in bytes/s, the firmware in Mbit/s
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Exposition text → {(sample name, labels): value}."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    key = (metric, frozenset(labels.items()))
    assert key in samples, f"no sample {metric}{labels}; have {sorted(k for k, _ in samples)}"
    return samples[key]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(r.read().decode())


def code_label(error_code: str) -> str:
    """The ``code`` label a request refused with firmware error ``error_code`` gets."""
    return ReturnCode(ERRORS[error_code][0]).name.lower()


# ---------------------------------------------------------------------- --metrics ADDR:PORT


@pytest.mark.parametrize(
    ("text", "public", "expected"),
    [
        ("127.0.0.1:9464", False, ("127.0.0.1", 9464)),
        ("localhost:0", False, ("127.0.0.1", 0)),
        ("[::1]:9464", False, ("::1", 9464)),
        ("127.1.2.3:65535", False, ("127.1.2.3", 65535)),
        ("0.0.0.0:9464", True, ("0.0.0.0", 9464)),
        ("[::]:9464", True, ("::", 9464)),
    ],
)
def test_metrics_address_accepted(text: str, public: bool, expected: tuple[str, int]) -> None:
    assert metrics.parse_address(text, public=public) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("9464", "'9464' is not ADDR:PORT"),
        (":9464", "':9464' is not ADDR:PORT"),
        ("127.0.0.1:", "port '' is out of range"),
        ("127.0.0.1:65536", "port '65536' is out of range"),
        ("127.0.0.1:-1", "port '-1' is out of range"),
        ("127.0.0.1:http", "port 'http' is out of range"),
        ("metrics.example:9464", "'metrics.example' is not an IP address"),
        ("::1:9464", "IPv6 address '::1' must be in brackets"),
        ("0.0.0.0:9464", "0.0.0.0 is not a loopback address"),
        ("10.1.2.3:9464", "10.1.2.3 is not a loopback address"),
        ("[::]:9464", ":: is not a loopback address"),
    ],
)
def test_metrics_address_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        metrics.parse_address(text)
    assert e.value.message.startswith("--metrics: ")
    assert message in e.value.message
    assert e.value.details["field"] == "--metrics"


def test_endpoint_serves_stops_and_reports_a_busy_port() -> None:
    registry = CollectorRegistry()
    endpoint = metrics.MetricsEndpoint(registry, "127.0.0.1", 0)
    try:
        assert endpoint.port > 0 and endpoint.url.endswith(f":{endpoint.port}/metrics")
        scrape(endpoint.url)  # an empty registry still answers
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{endpoint.port}"):
            metrics.MetricsEndpoint(registry, "127.0.0.1", endpoint.port)
    finally:
        endpoint.stop()
    endpoint.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(endpoint.url, timeout=5)


# ---------------------------------------------------------------------- in one process


@pytest.fixture
def managers(tmp_path: Path) -> Iterator[Callable[[str], ResourceManager]]:
    """Open managers on fresh state directories (closed and unlocked at the end)."""
    opened: list[tuple[ResourceManager, StateDir]] = []

    def _open(name: str) -> ResourceManager:
        state = StateDir(tmp_path / name)
        m = open_manager(state)
        opened.append((m, state))
        return m

    yield _open
    for m, state in opened:
        m.close()
        state.unlock()


def spec(owner: str, **kw: Any) -> SliceSpec:
    return SliceSpec.from_dict({"owner": owner, **kw})


def test_port_counters_are_read_from_the_crossbar_at_scrape_time(
    managers: Callable[[str], ResourceManager],
) -> None:
    """Traffic through the behavioural crossbar shows up in the next scrape, equal to its
    CNT_* registers and to what the model delivered and dropped; no polling in between."""
    m = managers("a")
    s = m.allocate(spec("vm-a", cores={"count": 1}, ports=2, qos={"guaranteed": "1Gbit/s"}))
    src, dst = s["alloc"]["ports"]
    key = s["alloc"]["key"]
    collected = metrics.DaemonMetrics(m, dict)
    before = parse(generate_latest(collected.registry).decode())
    assert value(before, "slicefab_port_packets_total", port=str(src)) == 0

    model = m.fabric.bus
    assert isinstance(model, CrossbarModel)
    flit = m.device.crossbar.data_bytes
    for n in range(5):
        model.send(src, dst, bytes(flit * (n + 1)), key=key)  # 1..5 flits
    free_port = next(p for p in range(m.device.crossbar.ports) if p not in (src, dst))
    for _ in range(3):
        model.send(src, free_port, b"x", key=key)  # not this VM's port: dropped whole
    model.run_until_idle(10_000)

    after = parse(generate_latest(collected.registry).decode())
    regs = m.fabric.port_counters(src)
    assert regs["packets"] == 5 and regs["flits"] == 15 and regs["drops"] == 3
    assert len(model.delivered(dst)) == 5 and len(model.dropped(src)) == 3
    for key_, (name, _) in metrics.PORT_COUNTERS.items():
        assert value(after, f"{name}_total", port=str(src)) == regs[key_]
    assert value(after, "slicefab_port_packets_total", port=str(dst)) == 0
    assert value(after, "slicefab_port_owner_info", port=str(src), owner="vm-a") == 1
    assert value(after, "slicefab_fabric_counter_read_errors_total") == 0


def test_each_daemon_has_its_own_registry(managers: Callable[[str], ResourceManager]) -> None:
    """Two managers in one process: their metrics never mix (the global registry would
    refuse the second set of names)."""
    a, b = managers("a"), managers("b")
    a.allocate(spec("vm-a", cores={"count": 3}, memory={"size": "2GiB"}))
    b.allocate(spec("vm-b", cores={"count": 5}))
    b.allocate(spec("vm-c", cores={"count": 1}, lanes={"width": 2}))
    ma, mb = metrics.DaemonMetrics(a, dict), metrics.DaemonMetrics(b, dict)
    sa = parse(generate_latest(ma.registry).decode())
    sb = parse(generate_latest(mb.registry).decode())
    assert value(sa, "slicefab_resource_used", resource="cores") == 3
    assert value(sb, "slicefab_resource_used", resource="cores") == 6
    assert {dict(k)["owner"] for k in series(sa, "slicefab_slice_cores")} == {"vm-a"}
    assert {dict(k)["owner"] for k in series(sb, "slicefab_slice_cores")} == {"vm-b", "vm-c"}
    assert value(sb, "slicefab_slices", state="active") == 2
    assert value(sa, "slicefab_slice_memory_bytes", slice="1", owner="vm-a") == 2 << 30
    assert value(sb, "slicefab_slice_lane_width", slice="2", owner="vm-c") == 2


def test_observer_counts_requests_by_role_command_and_code(
    managers: Callable[[str], ResourceManager], tmp_path: Path
) -> None:
    """The Api hook: every answered request lands in the histogram under its command and
    return code, refused and unknown ones included; without the hook nothing is kept."""
    m = managers("a")
    api = Api(m, m.vms)
    collected = metrics.DaemonMetrics(m, dict)
    admin = Channel(Role.ADMIN, None)
    assert api.observe is None
    api.handle_admin_frame(admin, encode_request("STATUS", {}))  # not observed
    api.observe = collected.observe
    for _ in range(3):
        api.handle_admin_frame(admin, encode_request("STATUS", {}))
    api.handle_admin_frame(admin, encode_request("GET", {"slice": 99}))  # no such slice
    api.handle_admin_frame(admin, b"\x00" * 5)  # shorter than a header: malformed
    odd = bytearray(encode_request("NOP", {"data": b""}))
    odd[4], odd[5] = 0x77, 0xEE  # opcode EE77h: not a command
    api.handle_admin_frame(admin, bytes(odd))

    s = parse(generate_latest(collected.registry).decode())
    count = "slicefab_request_duration_seconds_count"
    assert value(s, count, role="admin", command="STATUS", code="success") == 3
    assert value(s, count, role="admin", command="GET", code=code_label("not_found")) == 1
    assert value(s, count, role="admin", command="unknown", code=code_label("unsupported")) == 1
    assert value(s, count, role="admin", command="unknown", code=code_label("malformed")) == 1
    assert sum(series(s, count).values()) == 6
    # every observation is in a bucket: the +Inf bucket equals the count
    inf = value(
        s, "slicefab_request_duration_seconds_bucket",
        role="admin", command="STATUS", code="success", le="+Inf",
    )  # fmt: skip
    assert inf == 3
    assert value(s, "slicefab_request_duration_seconds_sum", role="admin", command="STATUS",
                 code="success") > 0  # fmt: skip


def test_return_code_labels() -> None:
    assert metrics.return_code_label(0) == "success"
    assert metrics.return_code_label(0x13) == "invalid_security_state"
    assert metrics.return_code_label(0xBEEF) == "0xbeef"


# ---------------------------------------------------------------------- a real daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "state")
    try:
        yield d
    finally:
        d.stop()  # always: no daemon outlives its test


def start_with_metrics(d: Daemon) -> str:
    banner = d.start("--metrics", "127.0.0.1:0")
    found = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", banner)
    assert found, banner
    return found.group(1)


def test_daemon_metrics_match_status_and_the_slice_table(daemon: Daemon) -> None:
    url = start_with_metrics(daemon)
    st = daemon.state
    run("alloc", "--owner", "vm-a", "--cores", "4", "--same-cluster", "--memory", "4GiB",
        "--lanes", "4", "--endpoint", "nvme0", "--priority", "5", "--guaranteed", "20Gbit/s",
        "--maximum", "40Gbit/s", "--name", "db", state=st)  # fmt: skip
    run("alloc", "--owner", "vm-b", "--cores", "2", "--memory", "2GiB", "--ports", "2",
        "--guaranteed", "1Gbit/s", state=st)  # fmt: skip
    freed = run_json("alloc", "--owner", "vm-b", "--cores", "1", state=st)
    run("free", str(freed["id"]), state=st)

    before = run_json("status", state=st)
    s = scrape(url)
    after = run_json("status", state=st)
    slices = run_json("slices", "list", state=st)

    for resource, u in after["utilisation"].items():
        assert value(s, "slicefab_resource_used", resource=resource) == u["used"]
        assert value(s, "slicefab_resource_capacity", resource=resource) == u["total"]
    assert value(s, "slicefab_slices", state="active") == after["slices"] == 2
    fab = after["fabric"]
    assert value(s, "slicefab_fabric_generation") == fab["generation"]
    assert value(s, "slicefab_fabric_syncs_total") == fab["syncs"]
    assert value(s, "slicefab_fabric_register_writes_total") == fab["register_writes"]
    # the ledger's counts may move in the background (VM counters): sandwich them
    for name, field in (("commits", "batches"), ("records", "records")):
        got = value(s, f"slicefab_ledger_{name}_total")
        assert before["ledger"][field] <= got <= after["ledger"][field]
    assert before["ledger"]["batches"] >= 4  # 3 allocations and a free were durable

    cap = 100_000 * MBPS  # the default device: 100 Gbit/s ports
    assert value(s, "slicefab_port_capacity_bytes_per_second") == cap
    assert len(series(s, "slicefab_slice_info")) == len(slices) == 2
    for sl in slices:
        ids = {"slice": str(sl["id"]), "owner": sl["owner"]}
        a, q = sl["alloc"], sl["spec"]["qos"]
        assert value(s, "slicefab_slice_info", **ids, name=sl["name"], state="active",
                     key=str(a["key"])) == 1  # fmt: skip
        assert value(s, "slicefab_slice_cores", **ids) == len(a["cores"])
        assert value(s, "slicefab_slice_memory_bytes", **ids) == sum(n for _, n in a["extents"]) * (
            2 << 20
        )
        assert value(s, "slicefab_slice_memory_extents", **ids) == len(a["extents"])
        assert value(s, "slicefab_slice_lane_width", **ids) == (
            a["lanes"]["width"] if a["lanes"] else 0
        )
        assert value(s, "slicefab_slice_ports", **ids) == len(a["ports"])
        assert value(s, "slicefab_slice_priority", **ids) == q["priority"]
        assert value(s, "slicefab_slice_guaranteed_bytes_per_second", **ids) == (
            q["guaranteed"] * MBPS
        )
        assert value(s, "slicefab_slice_max_bytes_per_second", **ids) == (
            (q["maximum"] or 100_000) * MBPS
        )
        for p in a["ports"]:
            assert value(s, "slicefab_port_owner_info", port=str(p), owner=sl["owner"]) == 1
    owners = {dict(k)["port"]: dict(k)["owner"] for k in series(s, "slicefab_port_owner_info")}
    assert len(owners) == after["utilisation"]["ports"]["used"] == 3
    guaranteed = series(s, "slicefab_port_guaranteed_bytes_per_second")
    assert sum(guaranteed.values()) == (after["utilisation"]["guaranteed_mbps"]["used"] * MBPS)
    info = series(s, "slicefab_device_info")
    assert [dict(k)["device"] for k in info] == [after["device"]]
    assert value(s, "process_resident_memory_bytes") > 0


def test_request_counters_move_with_cli_requests(daemon: Daemon) -> None:
    url = start_with_metrics(daemon)
    count = "slicefab_request_duration_seconds_count"
    s0 = scrape(url)
    run("status", state=daemon.state)  # STATUS + DEVICE_INFO
    run("status", state=daemon.state)
    bad = run("alloc", "--owner", "vm-a", "--cores", "999", state=daemon.state, check=False)
    assert bad.returncode == 1
    s1 = scrape(url)

    def moved(**labels: str) -> float:
        return s1.get((count, frozenset(labels.items())), 0) - s0.get(
            (count, frozenset(labels.items())), 0
        )

    assert moved(role="admin", command="STATUS", code="success") == 2
    assert moved(role="admin", command="DEVICE_INFO", code="success") == 2
    refused = {dict(k)["code"] for k in series(s1, count) if dict(k)["command"] == "ALLOCATE_FOR"}
    assert refused and "success" not in refused  # 999 cores: refused, labelled as such
    assert sum(series(s1, count).values()) - sum(series(s0, count).values()) == 5


def test_vm_auth_failures_and_replays_are_counted(daemon: Daemon, tmp_path: Path) -> None:
    """A VM mailbox: a frame with a bad MAC counts as an authentication failure of that
    VM (and only that VM), a replayed frame as a replay; good frames as requests."""
    url = start_with_metrics(daemon)
    cred = run_json("vm", "add", "vm-a", state=daemon.state)
    run("vm", "add", "vm-b", state=daemon.state)
    key = _credential_key(Path(cred["credential"]))
    vm = RawVm("vm-a", key, Path(cred["mailbox"]))
    vm.hello()
    assert vm.call("NOP", {"data": b"hi"}).error is None
    replayed = vm.frame("NOP", {"data": b"again"})
    assert vm.send(replayed).error is None
    assert vm.send(replayed).error["code"] == "replay"

    forger = RawVm("vm-a", bytes(32), Path(cred["mailbox"]))  # the wrong key
    forger.seq = vm.seq
    for _ in range(2):
        answer = MailboxClient(Path(cred["mailbox"])).request(
            forger.frame("NOP", {"data": b"x"}), timeout=30
        )
        assert answer  # answered (sealed with vm-a's real key), not dropped

    s = scrape(url)
    assert value(s, "slicefab_vms") == 2
    assert value(s, "slicefab_vm_refused_total", vm="vm-a", reason="auth_failed") == 2
    assert value(s, "slicefab_vm_refused_total", vm="vm-a", reason="replayed") == 1
    assert value(s, "slicefab_vm_refused_total", vm="vm-b", reason="auth_failed") == 0
    for reason in ("rate_limited", "malformed", "not_allowed"):
        assert value(s, "slicefab_vm_refused_total", vm="vm-a", reason=reason) == 0
    assert value(s, "slicefab_vm_requests_total", vm="vm-a") == 6  # HELLO + 2 NOP + 1 + 2
    count = "slicefab_request_duration_seconds_count"
    assert value(s, count, role="vm", command="NOP", code="success") == 2
    assert value(s, count, role="vm", command="HELLO", code="success") == 1
    sec = code_label("auth_failed")
    assert code_label("replay") == sec  # both INVALID_SECURITY_STATE on the wire
    assert value(s, count, role="vm", command="NOP", code=sec) == 3


def _credential_key(path: Path) -> bytes:
    from hostlib.credentials import load_credential

    return load_credential(path).key


def test_bad_metrics_address_is_refused_before_anything_is_opened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    p = subprocess.run(
        [*CLI, "serve", "--state-dir", str(state), "--metrics", "10.1.2.3:9464"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 1
    assert "--metrics: 10.1.2.3 is not a loopback address" in p.stderr
    assert "--metrics-public" in p.stderr
    assert not state.exists()  # nothing was created, nothing left locked


def test_busy_metrics_port_stops_the_daemon_cleanly(tmp_path: Path) -> None:
    """The endpoint cannot listen: the daemon says so, exits 1 and releases everything."""
    state = tmp_path / "state"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = subprocess.run(
            [*CLI, "serve", "--state-dir", str(state), "--metrics", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert p.returncode == 1, p.stderr
    assert f"--metrics: cannot listen on 127.0.0.1:{port}" in p.stderr
    assert not (state / "admin.sock").exists()
    # the state directory was released: the CLI can open it in-process
    assert run_json("status", state=state)["slices"] == 0


@pytest.mark.slow
def test_bench_metrics_prints_named_figures() -> None:
    figures = run_json("bench", "metrics", "--quick")
    for key in (
        "noop_p50_us_without_hook",
        "noop_p50_us_with_metrics_hook",
        "ratio_with_vs_without_hook_p50",
        "scrape_p50_ms",
        "scrape_bytes",
        "device_telemetry_p50_ms",
        "ratio_scrape_vs_device_telemetry_p50",
    ):
        assert isinstance(figures[key], (int, float)) and figures[key] > 0, key
    assert figures["noop_requests_each"] == 2000
    assert figures["live_slices"] >= 400  # the default device holds ~500 such slices
