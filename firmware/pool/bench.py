"""``slicefab bench placement`` and ``slicefab bench pool`` (docs/pool.md, "Figures").

**placement** — quality of :func:`firmware.pool.placement.place` on seeded synthetic
traces of composition requests (the mix is :data:`MIX`), on a pool of 4 default devices
in 2 zones:

* *static batches* small enough for an exact ILP (HiGHS, via ``highspy``): the requests
  arrive in order and each online algorithm (ours, first-fit) accepts what it can; the
  ILP sees the whole batch and picks the best subset and split. Packing efficiency is the
  mean of the used fractions of the pool's cores and memory; the figure of merit is ours
  divided by the ILP's optimum (target ≥ 97 %);
* a *dynamic trace* (arrivals and departures, exponential lifetimes) at ~95 % offered
  load: accepted requests and mean efficiency, ours against first-fit.

**pool** — cross-device compose latency and throughput with 3 in-process devices and a
3-member etcd cluster on loopback: sequential compose (split over 2 devices) + release,
then 1 and 4 concurrent composers; the anchor is a bare etcd transaction (one key, one
compare) measured in the same run.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from firmware.bench import percentile
from firmware.errors import AllocationError
from firmware.inventory import load_device
from firmware.pool.model import MEMORY_UNIT, Capacity, CompositionRequest, DeviceRecord
from firmware.pool.placement import Placement, first_fit, place

#: the synthetic VM mix: (name, weight, cores, memory GiB, NVMe groups, max devices,
#: max latency µs or None). Latency 2 µs keeps a composition inside one zone.
MIX: tuple[tuple[str, float, int, int, int, int, float | None], ...] = (
    ("small", 0.30, 2, 2, 0, 1, None),
    ("medium", 0.25, 4, 8, 0, 1, None),
    ("large", 0.15, 8, 32, 1, 2, 2.0),  # the example: 8 cores + 32 GiB + x4 NVMe
    ("compute", 0.15, 16, 8, 0, 2, None),
    ("memory", 0.10, 4, 32, 0, 2, None),
    ("xl", 0.05, 32, 32, 1, 3, 2.0),
)

Algorithm = Callable[[CompositionRequest, Sequence[DeviceRecord]], Placement]


def pool_devices(n: int = 4, zones: int = 2) -> list[DeviceRecord]:
    cap = Capacity.of_device(load_device())
    return [DeviceRecord(f"dev{i}", f"inc{i}", f"zone{i % zones}", cap, cap, {}) for i in range(n)]


def trace(seed: int, n: int) -> list[CompositionRequest]:
    rng = random.Random(seed)
    weights = [m[1] for m in MIX]
    out = []
    for i in range(n):
        _, _, cores, mem, nvme, maxdev, lat = rng.choices(MIX, weights)[0]
        out.append(
            CompositionRequest(
                owner=f"vm-{i}",
                cores=cores,
                memory=mem * MEMORY_UNIT,
                nvme=nvme,
                max_devices=maxdev,
                max_latency_us=lat,
            )
        )
    return out


def apply(devs: list[DeviceRecord], p: Placement, owner: str) -> None:
    by = {d.device: i for i, d in enumerate(devs)}
    for part in p.parts:
        i = by[part.device]
        devs[i] = devs[i].take(part, owner)


def unapply(devs: list[DeviceRecord], p: Placement, owner: str) -> None:
    by = {d.device: i for i, d in enumerate(devs)}
    for part in p.parts:
        i = by[part.device]
        devs[i] = devs[i].give_back(part, owner)


def efficiency(devs: Sequence[DeviceRecord]) -> float:
    """Mean of the used fractions of the pool's cores and memory."""
    tc = sum(d.total.cores for d in devs)
    tm = sum(d.total.memory for d in devs)
    uc = tc - sum(d.free.cores for d in devs)
    um = tm - sum(d.free.memory for d in devs)
    return (uc / tc + um / tm) / 2


def online(
    reqs: Sequence[CompositionRequest], algo: Algorithm, n_dev: int = 4
) -> tuple[int, float]:
    devs = pool_devices(n_dev)
    accepted = 0
    for r in reqs:
        try:
            p = algo(r, devs)
        except AllocationError:
            continue
        apply(devs, p, r.owner)
        accepted += 1
    return accepted, efficiency(devs)


def ilp_optimum(
    reqs: Sequence[CompositionRequest], n_dev: int = 4, time_limit: float = 30.0
) -> tuple[float, int, bool]:
    """The best packing efficiency any subset and split of ``reqs`` achieves (HiGHS).
    Returns (efficiency, accepted, proven optimal); when the time limit stops the solver,
    the efficiency is its proven upper bound (so ratios against it are conservative)."""
    import highspy

    from firmware.pool.model import latency_us

    devs = pool_devices(n_dev)
    tc = sum(d.total.cores for d in devs)
    tm = sum(d.total.memory_units for d in devs)
    h: Any = highspy.Highs()  # type: ignore[no-untyped-call]
    h.silent()
    h.setOptionValue("time_limit", time_limit)
    h.setOptionValue("mip_rel_gap", 1e-6)
    x = [h.addBinary() for _ in reqs]
    obj: Any = 0
    use: dict[int, list[Any]] = {j: [] for j in range(len(devs))}
    cores: dict[int, list[Any]] = {j: [] for j in range(len(devs))}
    mem: dict[int, list[Any]] = {j: [] for j in range(len(devs))}
    nvme: dict[int, list[Any]] = {j: [] for j in range(len(devs))}
    for i, r in enumerate(reqs):
        mu = r.memory_units
        y = [h.addBinary() for _ in devs]
        c = [h.addIntegral(lb=0, ub=r.cores) for _ in devs]
        m = [h.addIntegral(lb=0, ub=mu) for _ in devs]
        n = [h.addIntegral(lb=0, ub=min(r.nvme, len(d.total.nvme))) for d in devs]
        h.addConstr(sum(c) == r.cores * x[i])
        h.addConstr(sum(m) == mu * x[i])
        h.addConstr(sum(n) == r.nvme * x[i])
        h.addConstr(sum(y) <= r.max_devices)
        for j, d in enumerate(devs):
            h.addConstr(c[j] <= r.cores * y[j])
            h.addConstr(m[j] <= mu * y[j])
            h.addConstr(n[j] <= r.nvme * y[j])
            h.addConstr(y[j] <= x[i])
            if r.nvme and r.nvme_with_cores:
                h.addConstr(n[j] <= r.nvme * c[j])
            for k in range(j + 1, len(devs)):
                lat = latency_us(d, devs[k])
                if r.max_latency_us is not None and lat > r.max_latency_us:
                    h.addConstr(y[j] + y[k] <= 1)
            use[j].append(y[j])
            cores[j].append(c[j])
            mem[j].append(m[j])
            nvme[j].append(n[j])
        obj = obj + x[i] * ((r.cores / tc + mu / tm) / 2)
    for j, d in enumerate(devs):
        h.addConstr(sum(cores[j]) <= d.total.cores)
        h.addConstr(sum(mem[j]) <= d.total.memory_units)
        h.addConstr(sum(nvme[j]) <= len(d.total.nvme))
        h.addConstr(sum(use[j]) <= d.total.vm_slots)
    h.maximize(obj)
    status = h.getModelStatus()
    optimal = status == highspy.HighsModelStatus.kOptimal
    info = h.getInfo()
    value = float(info.objective_function_value if optimal else info.mip_dual_bound)
    accepted = sum(round(h.val(v)) for v in x)
    return value, accepted, optimal


def dynamic(seed: int, steps: int, algo: Algorithm, n_dev: int = 4) -> tuple[int, int, float]:
    """Arrivals with exponential lifetimes: (offered, accepted, mean efficiency)."""
    rng = random.Random(seed)
    reqs = trace(seed, steps)
    devs = pool_devices(n_dev)
    live: list[tuple[int, CompositionRequest, Placement]] = []
    accepted = 0
    effs = []
    for t, r in enumerate(reqs):
        for item in [x for x in live if x[0] <= t]:
            unapply(devs, item[2], item[1].owner)
            live.remove(item)
        try:
            p = algo(r, devs)
        except AllocationError:
            p = None
        if p is not None:
            apply(devs, p, r.owner)
            accepted += 1
            live.append((t + 1 + int(rng.expovariate(1 / 30)), r, p))
        effs.append(efficiency(devs))
    return steps, accepted, statistics.fmean(effs)


def batch(seed: int, load: float, n_dev: int = 4) -> list[CompositionRequest]:
    """The first requests of trace ``seed`` whose memory (the mix's bottleneck resource)
    adds up to at most ``load`` × the pool's memory."""
    cap = sum(d.total.memory_units for d in pool_devices(n_dev))
    out: list[CompositionRequest] = []
    mem = 0
    for r in trace(seed, 1000):
        if mem + r.memory_units > load * cap:
            break
        out.append(r)
        mem += r.memory_units
    return out


def fluid(reqs: Sequence[CompositionRequest], n_dev: int = 4) -> float:
    """The efficiency of an ideal *online* placer (the pool as one big device: accept in
    arrival order whatever fits in the pool's totals): what no placement can beat without
    refusing requests that fit to make room for later ones."""
    devs = pool_devices(n_dev)
    tc, tm = sum(d.total.cores for d in devs), sum(d.total.memory_units for d in devs)
    tn, ts = sum(len(d.total.nvme) for d in devs), sum(d.total.vm_slots for d in devs)
    uc = um = un = us = 0
    for r in reqs:
        if uc + r.cores <= tc and um + r.memory_units <= tm and un + r.nvme <= tn and us < ts:
            uc, um, un, us = uc + r.cores, um + r.memory_units, un + r.nvme, us + 1
    return (uc / tc + um / tm) / 2


def bench_placement(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for load in (1.0,) if quick else (1.0, 1.3):
        out.update(_static(quick, load))
    out.update(_dynamic(quick))
    return out


def _static(quick: bool, load: float) -> dict[str, Any]:
    seeds = range(1, 4 if quick else 9)
    ours_eff, ff_eff, opt_eff, fl_eff = [], [], [], []
    ours_acc = ff_acc = opt_acc = 0
    optimal = 0
    t_ours = t_ilp = 0.0
    n = 0
    for seed in seeds:
        reqs = batch(seed, load)
        n += len(reqs)
        fl_eff.append(fluid(reqs))
        t0 = time.perf_counter()
        a, e = online(reqs, place)
        t_ours += time.perf_counter() - t0
        fa, fe = online(reqs, first_fit)
        t0 = time.perf_counter()
        oe, oa, proven = ilp_optimum(reqs, time_limit=10.0 if quick else 30.0)
        t_ilp += time.perf_counter() - t0
        ours_eff.append(e)
        ff_eff.append(fe)
        opt_eff.append(oe)
        ours_acc += a
        ff_acc += fa
        opt_acc += oa
        optimal += proven
    ratio = [o / b for o, b in zip(ours_eff, opt_eff, strict=True)]
    k = f"load {load:.1f}: "
    return {
        k + "batches (seeds) / requests": f"{len(seeds)} / {n}",
        k + "ILP solved to optimality": f"{optimal}/{len(seeds)}",
        k + "efficiency ours / first-fit / ILP": f"{statistics.fmean(ours_eff):.4f} / "
        f"{statistics.fmean(ff_eff):.4f} / {statistics.fmean(opt_eff):.4f}",
        k + "ours / optimum (mean)": round(statistics.fmean(ratio), 4),
        k + "ours / optimum (worst batch)": round(min(ratio), 4),
        k + "first-fit / optimum (mean)": round(
            statistics.fmean(f / b for f, b in zip(ff_eff, opt_eff, strict=True)), 4
        ),
        k + "ideal online (fluid) / optimum": round(
            statistics.fmean(f / b for f, b in zip(fl_eff, opt_eff, strict=True)), 4
        ),
        k + "accepted ours / first-fit / ILP": f"{ours_acc} / {ff_acc} / {opt_acc}",
        k + "placement ms per request, ours": round(1000 * t_ours / max(1, n), 3),
        k + "ILP s per batch": round(t_ilp / len(seeds), 2),
    }


def _dynamic(quick: bool) -> dict[str, Any]:
    steps = 300 if quick else 2000
    _, dyn_ours, dyn_ours_eff = dynamic(7, steps, place)
    _, dyn_ff, dyn_ff_eff = dynamic(7, steps, first_fit)
    return {
        "dynamic trace: requests offered": steps,
        "dynamic: accepted, ours / first-fit": f"{dyn_ours} / {dyn_ff}",
        "dynamic: accepted ratio ours / first-fit": round(dyn_ours / max(1, dyn_ff), 4),
        "dynamic: mean efficiency, ours / first-fit": f"{dyn_ours_eff:.4f} / {dyn_ff_eff:.4f}",
    }


# ---------------------------------------------------------------------- pool


@dataclass
class _Latencies:
    samples: list[float]

    def p(self, q: float) -> float:
        return percentile(sorted(self.samples), q)


def bench_pool(quick: bool) -> dict[str, Any]:
    from firmware.pool.cluster import LocalEtcd
    from firmware.pool.composer import Pool
    from firmware.pool.etcd import Etcd, mod_revision_is, put
    from firmware.pool.member import local_devices

    n_seq = 30 if quick else 200
    run_s = 2.0 if quick else 10.0
    with tempfile.TemporaryDirectory(prefix="slicefab-bench-pool-") as tmp:
        root = Path(tmp)
        with (
            LocalEtcd(root / "etcd", 3) as cluster,
            local_devices(root, cluster.endpoints, 3, ttl=5),
        ):
            # anchor: a bare etcd transaction (compare one key, put it)
            e = Etcd(cluster.endpoints)
            rev = e.put("/bench/anchor", 0)
            txn = []
            for k in range(n_seq):
                t0 = time.perf_counter()
                ok, rev = e.txn(
                    [mod_revision_is("/bench/anchor", rev)], [put("/bench/anchor", k)]
                )
                txn.append(time.perf_counter() - t0)
                assert ok
            pool = Pool(cluster.endpoints)
            # sequential compose across 2 devices (80 cores do not fit one) + release
            comp, rel = [], []
            for k in range(n_seq):
                t0 = time.perf_counter()
                c = pool.compose(
                    {"owner": "vm-seq", "cores": 80, "memory": "16 GiB", "nvme": 1},
                    cid=f"seq{k}",
                )
                comp.append(time.perf_counter() - t0)
                assert len(c["parts"]) >= 2
                t0 = time.perf_counter()
                pool.release(c["id"])
                rel.append(time.perf_counter() - t0)
            thr = {w: _throughput(cluster.endpoints, w, run_s) for w in (1, 4)}
    c_l, t_l = _Latencies(comp), _Latencies(txn)
    return {
        "etcd members / devices": "3 / 3",
        "bare etcd txn p50 (ms)": round(1000 * t_l.p(0.5), 2),
        "compose across 2 devices p50 (ms)": round(1000 * c_l.p(0.5), 2),
        "compose p99 (ms)": round(1000 * c_l.p(0.99), 2),
        "compose p50 / etcd txn p50": round(c_l.p(0.5) / t_l.p(0.5), 2),
        "release p50 (ms, until devices freed)": round(1000 * _Latencies(rel).p(0.5), 2),
        "compose+release/s, 1 composer": round(thr[1][0], 1),
        "compose+release/s, 4 composers": round(thr[4][0], 1),
        "4 composers / 1 composer": round(thr[4][0] / max(thr[1][0], 1e-9), 2),
        "txn conflicts retried, 4 composers": thr[4][1],
    }


def _throughput(endpoints: list[str], workers: int, seconds: float) -> tuple[float, int]:
    from firmware.pool.composer import Pool

    done = [0] * workers
    conflicts = [0] * workers
    stop = time.monotonic() + seconds

    def loop(w: int) -> None:
        pool = Pool(endpoints)
        k = 0
        while time.monotonic() < stop:
            c = pool.compose({"owner": f"vm-t{w}", "cores": 8, "memory": "8 GiB"}, cid=f"t{w}-{k}")
            pool.release(c["id"])
            k += 1
            done[w] += 1
        conflicts[w] = pool.conflicts

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0), sum(conflicts)


__all__ = ["MIX", "bench_placement", "bench_pool", "replace"]
