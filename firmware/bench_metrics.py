"""``slicefab bench metrics`` (issue 8, telemetry): what the Prometheus endpoint costs.

* the request hook: an authenticated NOP through :meth:`Api.handle_vm_frame` (the
  cheapest request, so the largest relative cost), with :attr:`Api.observe` unset (the
  daemon without ``--metrics``) against set to :meth:`DaemonMetrics.observe`, in
  alternating blocks of the same run;
* a scrape: the whole exposition of the default device holding ~500 live slices of 16
  VMs, against the DEVICE_TELEMETRY admin command (what ``slicefab top`` asks for at each
  refresh) on the same state.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from abi.commands import Role, encode_request
from abi.envelope import REQUEST_DOMAIN, seal
from firmware.api import Api, Channel
from firmware.bench import TARGET_LIVE, VMS, random_spec
from firmware.errors import AllocationError
from firmware.manager import StateDir, open_manager
from firmware.metrics import DaemonMetrics

#: a typical Prometheus scrape interval, to express a scrape's cost as a share of a core
SCRAPE_INTERVAL_S = 15.0


def _p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def bench_metrics(quick: bool) -> dict[str, Any]:
    n = 2_000 if quick else 20_000
    scrapes = 5 if quick else 30
    with tempfile.TemporaryDirectory(prefix="slicefab-bench-metrics-") as tmp:
        state = StateDir(Path(tmp) / "state")
        m = open_manager(state)
        try:
            cred = m.vms.add("vm-bench", str(Path(tmp) / "vm-bench.mbox"))
            api = Api(m, m.vms)
            channel = Channel(Role.VM, cred.vm)
            metrics = DaemonMetrics(m, lambda: {cred.vm: channel})
            nop = encode_request("NOP", {"data": b""})
            seq = 0

            def one() -> float:
                nonlocal seq
                seq += 1
                frame = seal(cred.key, REQUEST_DOMAIN, cred.vm, seq, nop)
                t0 = time.perf_counter()
                api.handle_vm_frame(channel, frame)
                return time.perf_counter() - t0

            plain: list[float] = []
            observed: list[float] = []
            for _ in range(20):  # alternate blocks so machine noise hits both alike
                for hook, lat in ((None, plain), (metrics.observe, observed)):
                    api.observe = hook
                    lat.extend(one() for _ in range(n // 20))
            api.observe = None
            counted = metrics.registry.get_sample_value(
                "slicefab_request_duration_seconds_count",
                {"role": "vm", "command": "NOP", "code": "success"},
            )
            if counted != len(observed):  # the hook must have seen every observed request
                raise AssertionError(f"histogram counts {counted} NOPs, {len(observed)} sent")

            rng = random.Random(8)
            granule = m.device.granule_bytes
            live = 0
            while live < TARGET_LIVE:
                try:
                    m.allocate(random_spec(rng, f"vm-{rng.randrange(VMS)}", granule))
                    live += 1
                except AllocationError:
                    break
            telemetry = encode_request("DEVICE_TELEMETRY", {})
            admin = Channel(Role.ADMIN, None)

            def timed(f: Callable[[], object]) -> float:
                t0 = time.perf_counter()
                f()
                return time.perf_counter() - t0

            scrape_s: list[float] = []
            telemetry_s: list[float] = []
            for _ in range(scrapes):
                scrape_s.append(timed(lambda: generate_latest(metrics.registry)))
                telemetry_s.append(timed(lambda: api.handle_admin_frame(admin, telemetry)))
            size = len(generate_latest(metrics.registry))
        finally:
            m.close()
            state.unlock()
    plain_p50, observed_p50 = _p50_us(plain), _p50_us(observed)
    scrape_ms = statistics.median(scrape_s) * 1e3
    return {
        "noop_requests_each": len(plain),
        "noop_p50_us_without_hook": round(plain_p50, 1),
        "noop_p50_us_with_metrics_hook": round(observed_p50, 1),
        "hook_cost_p50_us": round(observed_p50 - plain_p50, 1),
        "ratio_with_vs_without_hook_p50": round(observed_p50 / plain_p50, 3),
        "live_slices": live,
        "scrape_p50_ms": round(scrape_ms, 2),
        "scrape_bytes": size,
        "device_telemetry_p50_ms": round(statistics.median(telemetry_s) * 1e3, 2),
        "ratio_scrape_vs_device_telemetry_p50": round(
            statistics.median(scrape_s) / statistics.median(telemetry_s), 2
        ),
        "scrape_cpu_percent_at_15s_interval": round(scrape_ms / 10 / SCRAPE_INTERVAL_S, 3),
    }
