"""``slicefab top``: a live terminal view of the device.

Every refresh takes one *sample* over the admin channel, like every other CLI command
(``DEVICE_TELEMETRY`` for utilisation and the held ports' traffic counters, ``LIST`` for
the slices, ``VM_LIST`` for the provisioned VMs), and shows it next to the previous one:
utilisation bars, what each VM holds, and per-port traffic and drop *rates* (the counter
deltas over the measured time between the two samples).

Per-VM request and refusal counts (authentication failures, replays, ...) are not in any
admin command; they are on the daemon's Prometheus endpoint (``serve --metrics``), which
``--metrics-url`` makes ``top`` read at each refresh as well.

``--once`` takes two samples ``--interval`` apart and prints one frame (``--json``: the
frame's data, the shape :func:`build_frame` documents), for tests and scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from firmware.errors import ConfigError
from firmware.units import format_bandwidth, format_size
from firmware.views import owner_style, utilisation_table

#: the crossbar's counters are 32-bit registers that wrap (docs/abi/registers.md)
COUNTER_MODULUS = 1 << 32
PORT_COUNTERS = ("packets", "flits", "drops", "stalls")
#: the shortest refresh interval accepted (each sample is three admin round trips)
MIN_INTERVAL_S = 0.05
METRICS_TIMEOUT_S = 5.0
#: adaptive decisions shown (the latest)
DECISIONS_SHOWN = 8

#: one admin operation (firmware.admin.OPS) → its result; raises on a refusal
Call = Callable[[str], Any]


@dataclass(frozen=True)
class Sample:
    """What one refresh read from the daemon, and when (``time.monotonic()``)."""

    at: float
    telemetry: dict[str, Any]
    slices: list[dict[str, Any]]
    vms: list[dict[str, Any]]
    #: per-VM counters from the metrics endpoint (None without ``--metrics-url``)
    vm_counters: dict[str, dict[str, int]] | None
    #: the adaptive controller's latest decisions (``ADAPTIVE_DECISIONS``), oldest first
    decisions: list[dict[str, Any]] = field(default_factory=list)


def take_sample(call: Call, metrics_url: str | None) -> Sample:
    return Sample(
        at=time.monotonic(),
        telemetry=call("telemetry"),
        slices=call("list"),
        vms=call("vm_list"),
        vm_counters=None if metrics_url is None else read_vm_counters(metrics_url),
        decisions=call("decisions"),
    )


def read_vm_counters(url: str) -> dict[str, dict[str, int]]:
    """``{vm: {"requests": n, "auth_failed": n, "replayed": n, ...}}`` from the daemon's
    Prometheus endpoint. Raises ConfigError naming ``--metrics-url`` if it cannot be read."""
    import urllib.request  # here: the CLI's start-up does not pay for it

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as r:
            text = r.read().decode()
    except (OSError, ValueError) as e:  # URLError is an OSError; ValueError: a bad URL
        raise ConfigError(
            f"--metrics-url: cannot read {url}: {e}",
            field="--metrics-url",
            expected="the URL `slicefab serve --metrics` printed, e.g. "
            "http://127.0.0.1:9464/metrics",
        ) from None
    out: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "slicefab_vm_requests_total":
                out.setdefault(s.labels["vm"], {})["requests"] = int(s.value)
            elif s.name == "slicefab_vm_refused_total":
                out.setdefault(s.labels["vm"], {})[s.labels["reason"]] = int(s.value)
    return out


def _wrapped_delta(now: int, before: int) -> int:
    """The increase of a wrapping 32-bit counter (one wrap at most between samples)."""
    return (now - before) % COUNTER_MODULUS


def _rate(delta: int, seconds: float | None) -> float | None:
    return None if not seconds else delta / seconds


def build_frame(device: dict[str, Any], prev: Sample | None, cur: Sample) -> dict[str, Any]:
    """One frame's data (what ``top --once --json`` prints)::

        device, slices, generation, interval_s (None on the first frame),
        utilisation  {resource: {used, total}}  (as ``slicefab status --json``)
        vms   [{vm, provisioned, slices, cores, memory_bytes, lanes, ports, guaranteed_mbps,
                last_seq, counters ({requests, auth_failed, ...} or None),
                requests_per_s}]
        ports [{port, owner, packets, flits, drops, stalls,
                rates ({packets, flits, drops, stalls} per second, or None)}]
        decisions [{id, at_ms, slice, resource, action, before, after, reason}]
                (the adaptive controller's latest, newest last; docs/adaptive.md)

    Rates are deltas over ``interval_s``; a port newly held since ``prev`` has none yet.
    """
    granule = int(device["granule_bytes"])
    interval = None if prev is None else cur.at - prev.at
    tel = cur.telemetry

    vms: dict[str, dict[str, Any]] = {}

    def vm_row(vm: str) -> dict[str, Any]:
        return vms.setdefault(
            vm,
            {
                "vm": vm, "provisioned": False, "slices": 0, "cores": 0, "memory_bytes": 0,
                "lanes": 0, "ports": [], "guaranteed_mbps": 0, "last_seq": None,
                "counters": None, "requests_per_s": None,
            },
        )  # fmt: skip

    for v in cur.vms:
        row = vm_row(v["vm"])
        row["provisioned"], row["last_seq"] = True, v["last_seq"]
    port_owner: dict[int, str] = {}
    for s in cur.slices:
        a = s["alloc"]
        row = vm_row(s["owner"])
        row["slices"] += 1
        row["cores"] += len(a["cores"])
        row["memory_bytes"] += sum(n for _, n in a["extents"]) * granule
        row["lanes"] += a["lanes"]["width"] if a["lanes"] else 0
        row["ports"] = sorted(set(row["ports"]) | set(a["ports"]))
        row["guaranteed_mbps"] += s["spec"]["qos"]["guaranteed"] * len(a["ports"])
        for p in a["ports"]:
            port_owner[p] = s["owner"]
    if cur.vm_counters is not None:
        before = prev.vm_counters if prev is not None and prev.vm_counters else {}
        for vm, counters in cur.vm_counters.items():
            row = vm_row(vm)
            row["counters"] = dict(counters)
            if vm in before:
                # a VM removed and re-added starts again from 0: count from there
                n, m = counters.get("requests", 0), before[vm].get("requests", 0)
                row["requests_per_s"] = _rate(n - m if n >= m else n, interval)

    prev_ports = {} if prev is None else {q["port"]: q for q in prev.telemetry["ports"]}
    ports = []
    for q in tel["ports"]:
        old = prev_ports.get(q["port"])
        rates = None
        if old is not None:
            rates = {k: _rate(_wrapped_delta(q[k], old[k]), interval) for k in PORT_COUNTERS}
        ports.append(
            {
                "port": q["port"],
                "owner": port_owner.get(q["port"]),
                **{k: q[k] for k in PORT_COUNTERS},
                "rates": rates,
            }
        )
    return {
        "device": device["name"],
        "slices": tel["slices"],
        "generation": tel["generation"],
        "interval_s": interval,
        "utilisation": tel["utilisation"],
        "vms": sorted(vms.values(), key=lambda r: r["vm"]),
        "ports": ports,
        "decisions": cur.decisions[-DECISIONS_SHOWN:],
    }


# ---------------------------------------------------------------------- rendering


def _per_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 10 else f"{value:,.1f}"


def render(frame: dict[str, Any], granule_bytes: int, metrics_url: str | None) -> Group:
    interval = frame["interval_s"]
    head = Text.from_markup(
        f"[bold]{frame['device']}[/]: {frame['slices']} live slices, "
        f"{sum(v['provisioned'] for v in frame['vms'])} VMs provisioned, fabric generation "
        f"{frame['generation']}"
        + (f", rates over {interval:.1f} s" if interval else "")
        + f"  [dim]{time.strftime('%H:%M:%S')}[/]"
    )
    owners = sorted(v["vm"] for v in frame["vms"])

    vms = Table(title="VMs", title_justify="left")
    right = ("slices", "cores", "memory", "lanes", "guaranteed", "last seq", "req/s",
             "requests", "auth fail", "other refused")  # fmt: skip
    for col in ("vm", "slices", "cores", "memory", "lanes", "ports", "guaranteed",
                "last seq", "req/s", "requests", "auth fail", "other refused"):  # fmt: skip
        vms.add_column(col, justify="right" if col in right else "left")
    for v in frame["vms"]:
        c = v["counters"]
        refused = (
            "-"
            if c is None
            else str(sum(n for k, n in c.items() if k not in ("requests", "auth_failed")))
        )
        auth = "-" if c is None else str(c.get("auth_failed", 0))
        vms.add_row(
            Text(v["vm"], style=owner_style(v["vm"], owners)),
            str(v["slices"]),
            str(v["cores"]),
            format_size(v["memory_bytes"]) if v["memory_bytes"] else "-",
            str(v["lanes"]),
            ",".join(map(str, v["ports"])) or "-",
            format_bandwidth(v["guaranteed_mbps"]) if v["guaranteed_mbps"] else "-",
            "-" if v["last_seq"] is None else str(v["last_seq"]),
            _per_s(v["requests_per_s"]),
            "-" if c is None else str(c.get("requests", 0)),
            Text(auth, style="bold red" if auth not in ("-", "0") else ""),
            refused,
        )

    ports = Table(title="Crossbar ports (held)", title_justify="left")
    for col in ("port", "owner", "pkt/s", "flit/s", "drop/s", "stall/s", "packets", "drops"):
        ports.add_column(col, justify="left" if col == "owner" else "right")
    for q in frame["ports"]:
        r = q["rates"] or {}
        owner = q["owner"] or "-"
        ports.add_row(
            str(q["port"]),
            Text(owner, style=owner_style(owner, owners)),
            _per_s(r.get("packets")),
            _per_s(r.get("flits")),
            Text(_per_s(r.get("drops")), style="bold red" if r.get("drops") else ""),
            _per_s(r.get("stalls")),
            f"{q['packets']:,}",
            f"{q['drops']:,}",
        )
    parts: list[RenderableType] = [
        head,
        utilisation_table(frame["utilisation"], granule_bytes),
        vms,
        ports,
    ]
    if frame["decisions"]:
        parts.append(_decisions_table(frame["decisions"]))
    if metrics_url is None:
        parts.append(
            Text(
                "per-VM request and refusal counts: run the daemon with --metrics and pass "
                "its URL to --metrics-url",
                style="dim",
            )
        )
    return Group(*parts)


def _decisions_table(decisions: list[dict[str, Any]]) -> Table:
    t = Table(title="Adaptive decisions (latest)", title_justify="left")
    for col in ("time", "slice", "action", "change", "reason"):
        t.add_column(col, justify="right" if col == "slice" else "left")
    for d in decisions:
        amount: Callable[[int], str] = {"memory": format_size, "bandwidth": format_bandwidth}.get(
            d["resource"], str
        )
        change = amount(d["before"])
        if d["after"] != d["before"]:
            change += f" → {amount(d['after'])}"
        t.add_row(
            time.strftime("%H:%M:%S", time.localtime(d["at_ms"] / 1000)),
            str(d["slice"]),
            Text(d["action"], style="bold red" if d["action"] == "refused" else ""),
            f"{d['resource']} {change}",
            d["reason"],
        )
    return t


# ---------------------------------------------------------------------- the command


def run_top(args: argparse.Namespace, call: Call, console: Console) -> int:
    """``slicefab top``: until Ctrl-C, or one frame with ``--once``. Returns the exit code."""
    from rich.live import Live

    device = call("device")
    granule = int(device["granule_bytes"])
    prev = take_sample(call, args.metrics_url)
    if args.once:
        time.sleep(args.interval)
        frame = build_frame(device, prev, take_sample(call, args.metrics_url))
        if args.json:
            sys.stdout.write(json.dumps(frame, indent=2, sort_keys=True) + "\n")
        else:
            console.print(render(frame, granule, args.metrics_url))
        return 0
    first = render(build_frame(device, None, prev), granule, args.metrics_url)
    with Live(first, console=console, auto_refresh=False, screen=args.screen) as live:
        try:
            while True:
                time.sleep(args.interval)
                cur = take_sample(call, args.metrics_url)
                live.update(render(build_frame(device, prev, cur), granule, args.metrics_url))
                live.refresh()
                prev = cur
        except KeyboardInterrupt:
            return 0


def interval(text: str) -> float:
    """``--interval``: seconds between refreshes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not MIN_INTERVAL_S <= value <= 3600:
        raise argparse.ArgumentTypeError(
            f"{value} s is out of range: expected {MIN_INTERVAL_S}-3600 seconds"
        )
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--interval", type=interval, default=1.0, help="seconds between refreshes (default 1)"
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="print one frame (rates over --interval) and exit; with --json, its data",
    )
    p.add_argument(
        "--metrics-url",
        help="the daemon's Prometheus endpoint (serve --metrics), for per-VM request and "
        "authentication-failure counts",
    )
    p.add_argument("--screen", action="store_true", help="use the terminal's alternate screen")
