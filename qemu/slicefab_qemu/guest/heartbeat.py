"""A process that ticks every ``period`` seconds and records the gaps between its ticks.

The issue's "no interruption" check: while the firmware adds, resizes and frees a VM's
slices (virtio-mem plug/unplug, NVMe and vCPU hot-plug), a process in that VM must keep
running. A stall of the guest (a vCPU held in QEMU's big lock, a guest kernel path that
does not schedule) shows up as one long gap. Runs in its own process so that the runner's
work cannot hold it up through the GIL.

Protocol: prints ``ready`` once ticking; on SIGTERM prints one JSON line
``{"ticks", "period_ms", "max_gap_ms", "p99_gap_ms", "max_gap_at_s", "seconds"}`` and
exits 0. Gaps are measured on CLOCK_MONOTONIC between consecutive wake-ups.
"""

from __future__ import annotations

import json
import signal
import time
from types import FrameType


def run(period: float) -> int:
    stop = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    gaps: list[float] = []
    start = prev = time.monotonic()
    max_gap, max_at = 0.0, 0.0
    print("ready", flush=True)
    while not stop:
        time.sleep(period)
        now = time.monotonic()
        gap = now - prev
        gaps.append(gap)
        if gap > max_gap:
            max_gap, max_at = gap, now - start
        prev = now
    gaps.sort()
    p99 = gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] if gaps else 0.0
    print(
        json.dumps(
            {
                "ticks": len(gaps),
                "period_ms": period * 1e3,
                "max_gap_ms": round(max_gap * 1e3, 2),
                "p99_gap_ms": round(p99 * 1e3, 2),
                "max_gap_at_s": round(max_at, 3),
                "seconds": round(prev - start, 3),
            }
        ),
        flush=True,
    )
    return 0
