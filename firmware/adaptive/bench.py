"""``slicefab bench adaptive``: static vs reactive vs reactive + predictive allocation.

A seeded multi-VM diurnal trace on the default device (64 GiB of memory): eight VMs whose
working days start at different hours of the (UTC) day, each ramping from its night-time
level to its peak in 30 minutes, with ±10% day-to-day jitter of the peak and 5% noise.
The same trace is run three times, each on a fresh device, on a simulated clock of
5-minute ticks (:func:`firmware.adaptive.traces.simulate`: real manager, ledger and
crossbar model):

* **static** — every slice keeps its initial size (halfway between night and peak);
* **reactive** — the controller with each VM's policy (1-16 GiB, 1 GiB steps, 10 min
  cooldown);
* **reactive + predictive** — the same policies with ``predictive = true``.

The first days train the forecaster (they run for every mode, so all three start the
measured days from the state their own policy led to); the figures count only the
measured days: SLO violations (VM-ticks whose demand is above the allocation), the
shortfall (GiB·h of demand above it), average over-provisioning (GiB·h held beyond demand
over GiB·h of demand) and the number of resizes. The check: predictive must cut violations
vs reactive without raising over-provisioning by more than 10% (relative).
``--quick`` (CI) runs 4 VMs over 4 days instead of 8 over 6.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from firmware.adaptive.forecast import DAY_S, SeasonalQuantile
from firmware.adaptive.traces import SimResult, SimVm, diurnal, gib, noisy, simulate
from firmware.adaptive.usage import Resource
from firmware.errors import ConfigError
from firmware.ledger import Durability
from firmware.manager import StateDir, open_manager

SEED = 9
STEP_S = 300
#: (night GiB, peak GiB, start of the working day in hours UTC, QoS priority)
VMS = (
    (2.0, 8.0, 8.0, 5),
    (1.5, 6.5, 9.0, 3),
    (3.0, 9.0, 13.0, 6),
    (1.0, 7.0, 16.0, 2),
    (2.5, 7.5, 1.0, 4),
    (2.0, 8.5, 5.0, 1),
    (1.5, 6.0, 20.0, 3),
    (3.0, 9.5, 10.5, 7),
)
#: scales every peak: at 0.9 the busiest afternoon hours just fit the device's memory with
#: the controller's headroom (a few yields and refusals); at 1.0 it is short for hours
#: every afternoon (docs/adaptive.md has the figures of both)
PEAK_SCALE = 0.9
PEAK_SCALE_ENV = "SLICEFAB_BENCH_ADAPTIVE_PEAK_SCALE"
POLICY: dict[str, Any] = {
    "resource": "memory",
    "minimum": gib(1),
    "maximum": gib(16),
    "step": gib(1),
    "cooldown": 600,
}
#: predictive may raise over-provisioning by at most this fraction of reactive's
OVER_PROVISIONING_SLACK = 0.10


def make_vms(
    mode: str, *, quick: bool, peak_scale: float = PEAK_SCALE
) -> tuple[list[SimVm], int, int]:
    """The VMs of ``mode`` (static, reactive, predictive): (vms, days, training days)."""
    rng = random.Random(SEED)
    days, train = (4, 2) if quick else (6, 3)
    shapes = VMS[:4] if quick else VMS
    vms = []
    for i, (night, peak, rise, priority) in enumerate(shapes):
        demand = diurnal(
            days, STEP_S, base=night * (1 << 30), peak=peak * peak_scale * (1 << 30), rise_h=rise,
            fall_h=min(rise + 9.0, 23.5), jitter=0.1, rng=rng,
        )  # fmt: skip
        demand = noisy(demand, 0.05, rng)
        policy = None if mode == "static" else {**POLICY, "predictive": mode == "predictive"}
        initial = gib((night + peak * peak_scale) / 2)
        vms.append(SimVm(f"vm-{i}", demand, initial, priority, policy))
    return vms, days, train


def run_mode(
    mode: str, *, quick: bool, peak_scale: float = PEAK_SCALE
) -> tuple[SimResult, float]:
    vms, _, train = make_vms(mode, quick=quick, peak_scale=peak_scale)
    with tempfile.TemporaryDirectory(prefix="slicefab-bench-adaptive-") as d:
        manager = open_manager(StateDir(d), durability=Durability.CRASH)
        try:
            start = time.perf_counter()
            result = simulate(
                manager,
                vms,
                step_s=STEP_S,
                measure_from=train * DAY_S // STEP_S,
                forecaster=SeasonalQuantile(),
                check_every=DAY_S // STEP_S,
            )
            return result, time.perf_counter() - start
        finally:
            manager.close()


def peak_scale_from_env() -> float:
    """``SLICEFAB_BENCH_ADAPTIVE_PEAK_SCALE`` (default :data:`PEAK_SCALE`): how crowded
    the device is. Raises ConfigError for a value that is not a number in (0, 2]."""
    text = os.environ.get(PEAK_SCALE_ENV)
    if text is None:
        return PEAK_SCALE
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 2:
        raise ConfigError(
            f"{PEAK_SCALE_ENV}: {text!r} is not a number in (0, 2]",
            field=PEAK_SCALE_ENV,
            expected="e.g. 0.9 (the default) or 1.0",
        )
    return value


def bench_adaptive(quick: bool, *, migration: bool = True) -> dict[str, Any]:
    """The figures, per mode, and the check against reactive (docs/adaptive.md); then
    the bandwidth trace (reactive vs reactive + predictive) and, with ``migration``, the
    migration figures (:func:`migration_figures`: starts a loopback etcd, ~3 s with
    ``quick``; "skipped" when etcd-server is not installed)."""
    scale = peak_scale_from_env()
    out: dict[str, Any] = {"seed": SEED, "tick_s": STEP_S, "peak_scale": scale}
    results: dict[str, SimResult] = {}
    for mode in ("static", "reactive", "predictive"):
        r, seconds = run_mode(mode, quick=quick, peak_scale=scale)
        results[mode] = r
        figures = {
            "slo_violations": r.violations,
            "violation_rate": round(r.violation_rate, 4),
            "shortfall_gib_h": round(r.shortfall_gib_h, 2),
            "over_provisioning": round(r.over_provisioning, 4),
            "resizes": r.resizes,
            "yields": sum(d.action.value == "yield" for d in r.decisions),
            "refused": sum(d.action.value == "refused" for d in r.decisions),
            "invariant_violations": len(r.invariant_violations),
            "run_s": round(seconds, 2),
        }
        out.update({f"{mode}_{k}": v for k, v in figures.items()})
    reactive, predictive = results["reactive"], results["predictive"]
    out["vms"] = 4 if quick else len(VMS)
    out["measured_vm_ticks"] = reactive.vm_ticks
    out["predictive_vs_reactive_violations"] = round(
        predictive.violations / reactive.violations if reactive.violations else 0.0, 3
    )
    out["predictive_vs_reactive_over_provisioning"] = round(
        predictive.over_provisioning / reactive.over_provisioning
        if reactive.over_provisioning
        else 0.0,
        3,
    )
    out["target_met"] = (
        predictive.violations < reactive.violations
        and predictive.over_provisioning
        <= reactive.over_provisioning * (1 + OVER_PROVISIONING_SLACK)
    )
    out.update(bench_bandwidth(quick))
    if migration:
        out.update(_adaptive_migration(quick))
    return out


# ---------------------------------------------------------------------- bandwidth

#: (night Gbit/s, peak Gbit/s, start of the working day in hours UTC, QoS priority): one
#: crossbar port each (100 Gbit/s), so the port never limits; what is measured is how
#: the controller follows the demand
BANDWIDTH_VMS = (
    (3.0, 35.0, 8.0, 4),
    (5.0, 45.0, 13.0, 2),
    (2.0, 25.0, 18.0, 5),
    (4.0, 40.0, 3.0, 3),
)
BANDWIDTH_POLICY: dict[str, Any] = {
    "resource": "bandwidth",
    "minimum": "2 Gbit/s",
    "maximum": "60 Gbit/s",
    "step": "5 Gbit/s",
    "cooldown": 600,
}


def bench_bandwidth(quick: bool) -> dict[str, Any]:
    """Reactive vs reactive + predictive on a seeded diurnal *bandwidth* trace
    (:data:`BANDWIDTH_VMS`, Mbit/s on each slice's crossbar port; use is pinned at the
    slice's rate limit, as the token bucket does): SLO violations, shortfall and
    over-provisioning in Gbit/s·h, resizes. Same days and training as the memory trace."""
    out: dict[str, Any] = {}
    days, train = (4, 2) if quick else (6, 3)
    for mode in ("reactive", "predictive"):
        rng = random.Random(SEED + 1)
        vms = []
        for i, (night, peak, rise, priority) in enumerate(BANDWIDTH_VMS):
            demand = diurnal(
                days, STEP_S, base=night * 1000, peak=peak * 1000, rise_h=rise,
                fall_h=min(rise + 9.0, 23.5), jitter=0.1, rng=rng,
            )  # fmt: skip
            policy = {**BANDWIDTH_POLICY, "predictive": mode == "predictive"}
            initial = int((night + peak) / 2) * 1000
            vms.append(
                SimVm(f"vm-bw{i}", noisy(demand, 0.05, rng), initial, priority, policy,
                      resource=Resource.BANDWIDTH)
            )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="slicefab-bench-adaptive-bw-") as d:
            manager = open_manager(StateDir(d), durability=Durability.CRASH)
            try:
                r = simulate(
                    manager, vms, step_s=STEP_S, measure_from=train * DAY_S // STEP_S,
                    forecaster=SeasonalQuantile(), check_every=DAY_S // STEP_S,
                )  # fmt: skip
            finally:
                manager.close()
        out[f"bandwidth_{mode}_slo_violations"] = r.violations
        out[f"bandwidth_{mode}_shortfall_gbit_h"] = round(r.shortfall_gib_h, 2)
        out[f"bandwidth_{mode}_over_provisioning"] = round(r.over_provisioning, 4)
        out[f"bandwidth_{mode}_resizes"] = r.resizes
        out[f"bandwidth_{mode}_invariant_violations"] = len(r.invariant_violations)
    for figure in ("slo_violations", "over_provisioning"):
        reactive = out[f"bandwidth_reactive_{figure}"]
        out[f"bandwidth_predictive_vs_reactive_{figure}"] = round(
            out[f"bandwidth_predictive_{figure}"] / reactive if reactive else 0.0, 3
        )
    return out


# ---------------------------------------------------------------------- migration (part 4)

#: model copy link between two devices (bytes/s): a PCIe Gen4 x16 / CXL link's order
MIGRATION_LINK = 16 * (1 << 30)
#: the VM's writes (pages/s; 90 % into a working set of 10 % of its pages)
MIGRATION_WRITE_RATE = 5000.0


def _one_move(endpoints: list[str], mem: Any, size_gib: int, mode: str, k: int) -> dict[str, Any]:
    """Compose a slice of ``size_gib`` on one device, start its VM writing, move it with
    ``mode``, keep writing a little, check every page, release."""
    from firmware.pool.composer import Pool
    from firmware.pool.memory import CopyLink, SequenceWriter
    from firmware.pool.migrate import Migrator

    pool = Pool(endpoints)
    cid = f"mig-{mode[:4]}-{size_gib}-{k}"
    c = pool.compose(
        {"owner": "vm-m", "cores": 4, "memory": f"{size_gib} GiB", "max_devices": 1}, cid=cid
    )
    source = c["parts"][0]["device"]
    vm = mem.open_map(cid, source)
    mig = Migrator(endpoints, memory=mem, link=CopyLink(MIGRATION_LINK), mode=mode)
    try:
        with SequenceWriter(vm, rate=MIGRATION_WRITE_RATE, seed=SEED + k) as w:
            time.sleep(0.1)
            calm = w.longest_s  # the anchor: the writer's worst write with no move running
            w.longest_s = 0.0
            move = mig.migrate(cid, source)
            time.sleep(0.05)
        bad = w.check(vm.store)
        if w.errors or bad:
            raise AssertionError(f"migration lost data or failed a request: {w.errors} {bad[:3]}")
        assert move.copy is not None
        return {
            "total_ms": round(move.total_s * 1000, 1),
            "program_ms": round(move.program_s * 1000, 1),
            "copy_switch_ms": round(move.copy_switch_s * 1000, 1),
            "release_ms": round(move.release_s * 1000, 1),
            "pages": move.copy.pages,
            "pages_copied": move.copy.pages_copied,
            "rounds": move.copy.rounds,
            "switch_pages": move.copy.switch_pages,
            "stall_ms": round(w.longest_s * 1000, 2),
            "calm_ms": round(calm * 1000, 3),
            "writes": w.writes,
        }
    finally:
        pool.release(cid)


def migration_figures(sizes: tuple[int, ...]) -> dict[str, Any]:
    """Move a slice of each of ``sizes`` GiB between two devices of a pool (1 etcd
    member on loopback, 2 in-process devices) while its VM writes, live (pre-copy) and
    by stop-and-copy (the baseline, same run). Raises SlicefabError when etcd-server is
    not installed."""
    from firmware.pool.cluster import LocalEtcd
    from firmware.pool.member import local_devices
    from firmware.pool.memory import MemoryDirectory

    out: dict[str, Any] = {
        "link (GiB/s)": MIGRATION_LINK / (1 << 30),
        "VM writes/s (90% in 10% of pages)": MIGRATION_WRITE_RATE,
        "page (MiB)": 2,
    }
    with tempfile.TemporaryDirectory(prefix="slicefab-bench-migration-") as tmp:
        mem = MemoryDirectory()
        with (
            LocalEtcd(Path(tmp) / "etcd", 1) as cluster,
            local_devices(
                Path(tmp), cluster.endpoints, 2, ttl=5, durability=Durability.CRASH, memory=mem
            ),
        ):
            for k, size in enumerate(sizes):
                live = _one_move(cluster.endpoints, mem, size, "live", k)
                stop = _one_move(cluster.endpoints, mem, size, "stop-and-copy", k)
                p = f"{size} GiB"
                out[f"{p}: live move, total (ms)"] = live["total_ms"]
                out[f"{p}: stop-and-copy move, total (ms)"] = stop["total_ms"]
                out[f"{p}: live move: program B / copy+switch / release A (ms)"] = (
                    f"{live['program_ms']} / {live['copy_switch_ms']} / {live['release_ms']}"
                )
                out[f"{p}: pages copied / pages (live)"] = (
                    f"{live['pages_copied']} / {live['pages']} = "
                    f"{live['pages_copied'] / live['pages']:.3f}"
                )
                out[f"{p}: pre-copy rounds (live)"] = live["rounds"]
                out[f"{p}: pages copied in the switch (live / stop-and-copy)"] = (
                    f"{live['switch_pages']} / {stop['switch_pages']}"
                )
                out[f"{p}: longest VM stall, live (ms)"] = live["stall_ms"]
                out[f"{p}: longest VM stall, stop-and-copy (ms)"] = stop["stall_ms"]
                out[f"{p}: stall live / stop-and-copy"] = round(
                    live["stall_ms"] / max(stop["stall_ms"], 1e-6), 4
                )
                out[f"{p}: longest write with no move (ms)"] = max(
                    live["calm_ms"], stop["calm_ms"]
                )
                out[f"{p}: VM writes during the moves, failed"] = (
                    f"{live['writes'] + stop['writes']}, 0"
                )
    return out


def bench_migration(quick: bool) -> dict[str, Any]:
    """``slicefab bench migration`` (docs/pool.md, "Live migration"): ``--quick``: 1 and
    4 GiB, else 2, 8 and 32 GiB."""
    return migration_figures((1, 4) if quick else (2, 8, 32))


def _adaptive_migration(quick: bool) -> dict[str, Any]:
    """The migration part of ``bench adaptive``: one slice (1 GiB with ``quick``, else
    8 GiB) moved live and by stop-and-copy, its figures under ``migration: ``."""
    from firmware.errors import SlicefabError
    from firmware.pool.cluster import etcd_binary

    try:
        etcd_binary()
    except SlicefabError as e:
        return {"migration": f"skipped: {e}"}
    size = 1 if quick else 8
    return {f"migration: {k}": v for k, v in migration_figures((size,)).items()}
