"""``slicefab bench qemu``: a real guest under TCG, timed from inside the guest.

Figures (each printed beside the anchor it is judged against):

* ``boot_to_agent_s``: launch (``vng``) to the guest agent answering;
  ``boot_to_device_found_s``: launch to hostlib in the guest having found the ivshmem
  mailbox with pyudev and authenticated (HELLO). This includes the guest runner's
  Python start and ``import hostlib``, measured separately as ``guest_hostlib_ready_s``.
* ``memory_visible_s`` / ``nvme_visible_s``: a slice allocated by hostlib in the guest
  until the guest kernel shows it (MemTotal grown by the slice, a new NVMe controller
  with the slice's serial): median and max over the repetitions, against the issue's
  targets (2 s, 3 s) and against ``call_s``, the same allocation's round trip alone
  (measured in the same run: the part the guest kernel does not own).
* ``heartbeat_max_gap_ms``: the largest gap of a 10 ms heartbeat in the guest while the
  slices are added, resized and freed, against the same heartbeat's largest gap over an
  idle stretch of the same length (measured first, in the same guest) and the 200 ms target.

``--quick`` does one repetition of each (for tests); the default is 5.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from slicefab_qemu.config import VmConfig, nvme_serial
from slicefab_qemu.lab import Firmware


def bench_qemu(quick: bool) -> dict[str, Any]:
    reps = 1 if quick else 5
    with tempfile.TemporaryDirectory(prefix="sf-bench-", dir="/tmp") as tmp:
        fw = Firmware(Path(tmp) / "state")
        try:
            vm = fw.vm(VmConfig("bench", root_ports=2))
            t0 = time.monotonic()
            with vm:
                agent_s = time.monotonic() - t0
                r = vm.runner
                r.request("open", timeout=300)
                found_s = time.monotonic() - t0
                base = r.request("state")["result"]
                # the idle anchor: the same heartbeat with nothing happening
                r.request("heartbeat_start", period=0.01, timeout=120)
                idle_t0 = time.monotonic()
                time.sleep(5.0 if quick else 15.0)
                idle = r.request("heartbeat_stop")["result"]
                idle_len = time.monotonic() - idle_t0

                mem, nvme, calls = [], [], []
                r.request("heartbeat_start", period=0.01, timeout=120)
                busy_t0 = time.monotonic()
                for _ in range(reps):
                    a = r.call("allocate", memory="128MiB",
                               expect=[{"memtotal_kib_delta": 128 * 1024}])
                    mem.append(a["visible_s"])
                    calls.append(a["call_s"])
                    n = r.call("allocate", lanes=4, endpoint="nvme0")
                    sid = n["result"]["id"]
                    seen = r.call("get", sid, expect=[{"nvme_serial": nvme_serial(sid),
                                                       "present": True}])
                    nvme.append(n["call_s"] + seen["visible_s"])
                    calls.append(n["call_s"])
                    r.call("resize", a["result"]["id"], memory="256MiB",
                           expect=[{"memtotal_kib_delta": 128 * 1024}])
                    r.call("free", a["result"]["id"],
                           expect=[{"memtotal_kib": base["memtotal_kib"]}], timeout=120)
                    r.call("free", sid, expect=[{"nvme_serial": nvme_serial(sid),
                                                 "present": False}])
                busy = r.request("heartbeat_stop")["result"]
                busy_len = time.monotonic() - busy_t0
        finally:
            fw.close()
    return {
        "boot_to_agent_s": round(agent_s, 2),
        "boot_to_device_found_s": round(found_s, 2),
        "guest_hostlib_ready_s": round(found_s - agent_s, 2),
        "repetitions": reps,
        "memory_visible_s_median": round(statistics.median(mem), 3),
        "memory_visible_s_max": round(max(mem), 3),
        "memory_visible_target_s": 2.0,
        "nvme_visible_s_median": round(statistics.median(nvme), 3),
        "nvme_visible_s_max": round(max(nvme), 3),
        "nvme_visible_target_s": 3.0,
        "call_s_median (anchor: the API round trip alone)": round(statistics.median(calls), 3),
        "heartbeat_max_gap_ms (reconfiguring)": busy["max_gap_ms"],
        "heartbeat_p99_gap_ms (reconfiguring)": busy["p99_gap_ms"],
        "heartbeat_window_s (reconfiguring)": round(busy_len, 1),
        "heartbeat_max_gap_ms (anchor: idle)": idle["max_gap_ms"],
        "heartbeat_window_s (idle)": round(idle_len, 1),
        "heartbeat_gap_ratio (reconfiguring / idle)": round(
            busy["max_gap_ms"] / max(idle["max_gap_ms"], 1e-3), 2
        ),
        "heartbeat_max_gap_target_ms": 200,
    }
