"""``slicefab top``: one frame (``--once``, ``--json``) of a real daemon with slices checked
against ``status`` and the slice table, per-VM counters read from the daemon's metrics
endpoint, rates computed from counter deltas (32-bit wrap included), the rendered view."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from firmware import top
from hostlib.mailbox import MailboxClient
from tests.test_api import RawVm
from tests.test_cli import Daemon, run, run_json

DEVICE = {"name": "sf-test", "granule_bytes": 2 << 20}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "state")
    try:
        yield d
    finally:
        d.stop()  # always: no daemon outlives its test


def test_top_once_json_matches_the_device(daemon: Daemon) -> None:
    banner = daemon.start("--metrics", "127.0.0.1:0")
    url = re.search(r"metrics on (\S+)\)", banner)
    assert url, banner
    st = daemon.state
    vm_a = run_json("vm", "add", "vm-a", state=st)
    run("alloc", "--owner", "vm-a", "--cores", "4", "--memory", "4GiB", "--lanes", "4",
        "--guaranteed", "10Gbit/s", state=st)  # fmt: skip
    run("alloc", "--owner", "vm-a", "--cores", "2", "--memory", "2GiB",
        "--guaranteed", "5Gbit/s", state=st)  # fmt: skip
    run("alloc", "--owner", "vm-b", "--cores", "1", "--ports", "2", state=st)  # not provisioned
    # one forged frame on vm-a's mailbox: an authentication failure top must show
    forger = RawVm("vm-a", bytes(32), Path(vm_a["mailbox"]))
    MailboxClient(Path(vm_a["mailbox"])).request(forger.frame("NOP", {"data": b""}), timeout=30)

    frame = run_json("top", "--once", "--interval", "0.1", "--metrics-url", url.group(1), state=st)
    status = run_json("status", state=st)
    slices = run_json("slices", "list", state=st)

    assert frame["device"] == status["device"]
    assert frame["utilisation"] == status["utilisation"]
    assert frame["slices"] == status["slices"] == 3
    assert frame["generation"] == status["fabric"]["generation"]
    assert frame["interval_s"] >= 0.1

    vms = {v["vm"]: v for v in frame["vms"]}
    assert set(vms) == {"vm-a", "vm-b"}
    assert vms["vm-a"]["provisioned"] and not vms["vm-b"]["provisioned"]
    for vm, row in vms.items():
        mine = [s for s in slices if s["owner"] == vm]
        assert row["slices"] == len(mine)
        assert row["cores"] == sum(len(s["alloc"]["cores"]) for s in mine)
        assert row["memory_bytes"] == sum(n for s in mine for _, n in s["alloc"]["extents"]) * (
            2 << 20
        )
        lanes = [s["alloc"]["lanes"] for s in mine if s["alloc"]["lanes"]]
        assert row["lanes"] == sum(g["width"] for g in lanes)
        assert row["ports"] == sorted({p for s in mine for p in s["alloc"]["ports"]})
    assert vms["vm-a"]["guaranteed_mbps"] == 15_000
    assert vms["vm-a"]["counters"]["auth_failed"] == 1
    assert vms["vm-a"]["counters"]["requests"] == 1
    assert vms["vm-a"]["requests_per_s"] == 0  # nothing arrived between the two samples
    assert vms["vm-b"]["counters"] is None  # no mailbox: nothing counted

    held = {p: s["owner"] for s in slices for p in s["alloc"]["ports"]}
    assert {q["port"]: q["owner"] for q in frame["ports"]} == held
    for q in frame["ports"]:
        assert q["packets"] == q["drops"] == 0  # nothing drives the daemon's crossbar
        assert q["rates"] == dict.fromkeys(top.PORT_COUNTERS, 0.0)

    human = run("top", "--once", "--interval", "0.1", state=st).stdout
    assert "Crossbar ports" in human and "vm-a" in human and "vm-b" in human
    assert "--metrics-url" in human  # says where per-VM counts would come from


def test_top_usage_errors(tmp_path: Path) -> None:
    st = tmp_path / "state"
    p = run("top", "--json", state=st, check=False)
    assert p.returncode == 2 and "top --json needs --once" in p.stderr
    p = run("top", "--once", "--interval", "0", state=st, check=False)
    assert p.returncode == 2 and "expected 0.05-3600 seconds" in p.stderr
    p = run("top", "--once", "--metrics-url", "http://127.0.0.1:1/metrics", state=st, check=False)
    assert p.returncode == 1 and "--metrics-url: cannot read http://127.0.0.1:1/metrics" in p.stderr


def test_top_works_without_a_daemon(tmp_path: Path) -> None:
    """Like every command: no daemon, the state directory is opened in-process."""
    st = tmp_path / "state"
    run("alloc", "--owner", "vm-a", "--cores", "3", state=st)
    frame = run_json("top", "--once", "--interval", "0.05", state=st)
    assert frame["utilisation"]["cores"]["used"] == 3
    assert [v["vm"] for v in frame["vms"]] == ["vm-a"]


# ---------------------------------------------------------------------- frames from samples


def sample(at: float, ports: dict[int, dict[str, int]], requests: int | None = None) -> top.Sample:
    return top.Sample(
        at=at,
        telemetry={
            "slices": 1,
            "generation": 7,
            "utilisation": {"cores": {"used": 1, "total": 8}},
            "ports": [{"port": p, **c} for p, c in ports.items()],
        },
        slices=[
            {
                "owner": "vm-a",
                "spec": {"qos": {"guaranteed": 100}},
                "alloc": {"cores": [0], "extents": [[0, 3]], "lanes": None, "ports": [1]},
            }
        ],
        vms=[{"vm": "vm-a", "last_seq": 5, "slices": 1}],
        vm_counters=None if requests is None else {"vm-a": {"requests": requests}},
    )


def counters(packets: int, drops: int = 0) -> dict[str, int]:
    """Register values: two flits a packet, in a 32-bit register that wraps."""
    flits = 2 * packets % top.COUNTER_MODULUS
    return {"packets": packets, "flits": flits, "drops": drops, "stalls": 0}


def test_rates_are_deltas_over_the_interval_across_a_32_bit_wrap() -> None:
    wrap = top.COUNTER_MODULUS
    prev = sample(10.0, {1: counters(wrap - 10, drops=4)}, requests=100)
    cur = sample(12.0, {1: counters(30, drops=10), 2: counters(9)}, requests=140)
    frame = top.build_frame(DEVICE, prev, cur)
    assert frame["interval_s"] == 2.0
    one, two = frame["ports"]
    # packets: 2^32-10 → 30 is 40 packets in 2 s; flits: 2^32-20 → 60 is 80 flits
    assert one["rates"] == {"packets": 20.0, "flits": 40.0, "drops": 3.0, "stalls": 0.0}
    assert one["owner"] == "vm-a" and two["owner"] is None
    assert two["rates"] is None  # not held at the previous sample: no rate yet
    (vm,) = frame["vms"]
    assert vm["requests_per_s"] == 20.0
    assert vm["memory_bytes"] == 3 * (2 << 20) and vm["guaranteed_mbps"] == 100
    # a VM removed and re-added counts from 0 again: the rate counts from there
    again = top.build_frame(DEVICE, cur, sample(14.0, {1: counters(30)}, requests=8))
    assert again["vms"][0]["requests_per_s"] == 4.0
    first = top.build_frame(DEVICE, None, cur)
    assert first["interval_s"] is None and all(q["rates"] is None for q in first["ports"])


def test_render_shows_rates_and_auth_failures() -> None:
    prev = sample(0.0, {1: counters(0)}, requests=0)
    cur = dataclasses.replace(
        sample(1.0, {1: counters(50, drops=5)}),
        vm_counters={"vm-a": {"requests": 9, "auth_failed": 3, "replayed": 1}},
    )
    frame = top.build_frame(DEVICE, prev, cur)
    console = Console(record=True, width=200, color_system=None)
    console.print(top.render(frame, 2 << 20, "http://127.0.0.1:9/metrics"))
    text = console.export_text()
    row = next(line for line in text.splitlines() if "vm-a" in line and "MiB" in line)
    assert re.search(r"6 MiB .* 9 .* 3 .* 1\s*│$", row), row  # requests, auth fail, other
    port_row = next(line for line in text.splitlines() if re.match(r"│\s+1 │ vm-a", line))
    assert re.search(r"│\s+50 │\s+100 │\s+5\.0 │", port_row), port_row
    assert "--metrics-url" not in text


def test_interval_flag() -> None:
    assert top.interval("0.5") == 0.5
    for bad in ("0", "-1", "4000", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            top.interval(bad)
