"""The load test (issue 8, firmware/loadtest.py): 64 VMs over their mailboxes against one
daemon for a bounded time, with the invariant checker running throughout, a deadlock
watchdog and the daemon's memory sampled. CI runs 25 s (``SLICEFAB_LOAD_SECONDS``);
``slicefab bench load`` runs 30 s and prints the figures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.loadtest import VMS, LoadReport, LoadTest

SECONDS = float(os.environ.get("SLICEFAB_LOAD_SECONDS", "25"))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadReport]:
    tmp: Path = tmp_path_factory.mktemp("load")
    r = LoadTest(tmp, seed=int(os.environ.get("SLICEFAB_LOAD_SEED", "1"))).run(
        SECONDS, baseline_s=2.0)
    print(r.figures())
    yield r


@pytest.mark.slow
def test_64_vms_break_no_invariant_and_every_client_progresses(report: LoadReport) -> None:
    figures = report.figures()
    assert not report.stalled, f"clients stuck: {report.stalled}\n{report.dump}"
    assert report.violations == [], report.violations[:20]
    assert report.errors == [], report.errors[:20]
    assert report.checks >= SECONDS / 2, figures  # the checker ran throughout
    assert len(report.progress) == VMS and min(report.progress.values()) > 0, figures
    # the contention was real: scarce keys, ports and SSDs refused some, all were served
    assert report.outcomes["acked"] > 0 and report.outcomes["insufficient"] > 0, figures


@pytest.mark.slow
def test_the_daemons_memory_stays_flat(report: LoadReport) -> None:
    first, last = report.rss_quarters()
    assert len(report.rss) >= 16
    assert not report.memory_grew, (
        f"RssAnon {first / 2**20:.1f} MiB in the second quarter (after the warm-up), "
        f"{last / 2**20:.1f} MiB in "
        f"the last ({report.rss_growth:+.0%})"
    )
