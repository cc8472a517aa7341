"""Adaptive and predictive allocation (issue 9, parts 1-3): the usage store and its
retention, policies, the controller on synthetic traces (steps, ramps, diurnal cycles,
noise) on a simulated clock, priority yields, the forecaster on seeded traces of known
structure, reservations, the API opcodes, and the benchmark's CI-sized run."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from abi.commands import Role, encode_request
from abi.commands import decode_response as decode
from firmware.adaptive.bench import bench_adaptive
from firmware.adaptive.controller import AdaptiveController, AdaptiveService
from firmware.adaptive.forecast import DAY_S, ForecastKey, SeasonalQuantile, quantile
from firmware.adaptive.policy import DOWN_AT, UP_AT, AdaptivePolicy, set_policy
from firmware.adaptive.traces import (
    EPOCH,
    SimVm,
    change_points,
    constant,
    direction_flips,
    diurnal,
    gib,
    noisy,
    ramp,
    simulate,
    step,
)
from firmware.adaptive.usage import (
    PRUNE_EVERY_S,
    Action,
    Decision,
    Resource,
    UsageSample,
    UsageStore,
)
from firmware.api import Api, Channel
from firmware.errors import PermissionDenied, RequestError
from firmware.manager import ResourceManager, StateDir
from firmware.slices import SliceSpec
from tests.test_api import ALLOC, device_api, provision  # noqa: F401  (fixture)
from tests.test_hostlib_e2e import Firmware, firmware  # noqa: F401  (fixture)

STEP_S = 300
PER_DAY = DAY_S // STEP_S
POLICY: dict[str, Any] = {
    "resource": "memory",
    "minimum": gib(1),
    "maximum": gib(16),
    "step": gib(1),
    "cooldown": 600,
}


# ---------------------------------------------------------------------- usage store


def test_samples_in_one_bucket_keep_each_measures_peak(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "u.sqlite", resolution_s=60)
    store.record([UsageSample(1, "vm-a", "web", 120.0, memory_used=5, cores_busy=2.0)])
    store.record([UsageSample(1, "vm-a", "web", 130.0, memory_used=3, port_mbps=40.0)])
    store.record([UsageSample(1, "vm-a", "web", 150.0, memory_used=9, cores_busy=1.0)])
    (s,) = store.window(1, 0.0)
    assert (s.memory_used, s.cores_busy, s.port_mbps, s.at) == (9, 2.0, 40.0, 150.0)
    store.record([UsageSample(1, "vm-a", "web", 180.0, memory_used=1)])  # next bucket
    assert [x.memory_used for x in store.window(1, 0.0)] == [9, 1]
    assert store.history("vm-a", "web", Resource.MEMORY, 0.0) == [(150.0, 9.0), (180.0, 1.0)]
    assert store.history("vm-a", "db", Resource.MEMORY, 0.0) == []
    store.close()


def test_a_guest_report_wins_over_qemus_measure_in_its_bucket(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "u.sqlite", resolution_s=60)
    qemu = "qemu-balloon"
    # QEMU's measure, then the guest's lower report: the guest's stands
    store.record([UsageSample(1, "vm-a", "web", 60.0, memory_used=9, source=qemu)])
    store.record([UsageSample(1, "vm-a", "web", 70.0, memory_used=4, cores_busy=1.0)])
    # the other order, with the port traffic of the fabric in the same bucket
    store.record([UsageSample(2, "vm-a", "web", 60.0, memory_used=4)])
    store.record([UsageSample(2, "vm-a", "web", 65.0, port_mbps=7.0, source="fabric")])
    store.record([UsageSample(2, "vm-a", "web", 70.0, memory_used=9, source=qemu)])
    # one source alone keeps its peak; a bucket QEMU alone measured is QEMU's
    store.record([UsageSample(3, "vm-a", "web", 60.0, memory_used=5, source=qemu)])
    store.record([UsageSample(3, "vm-a", "web", 70.0, memory_used=8, source=qemu)])
    store.record([UsageSample(3, "vm-a", "web", 130.0, port_mbps=1.0, source="fabric")])
    got = {sid: [(s.memory_used, s.source) for s in store.window(sid, 0.0)] for sid in (1, 2, 3)}
    assert got == {1: [(4, "guest")], 2: [(4, "guest")], 3: [(8, qemu), (None, "fabric")]}
    assert store.window(2, 0.0)[0].port_mbps == 7.0
    store.close()


def test_a_usage_file_from_before_sources_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "u.sqlite")
    db.execute(
        "CREATE TABLE usage_samples (slice INTEGER NOT NULL, bucket INTEGER NOT NULL, owner "
        "TEXT NOT NULL, app_class TEXT NOT NULL, at REAL NOT NULL, memory_used INTEGER, "
        "cores_busy REAL, port_mbps REAL, PRIMARY KEY (slice, bucket))"
    )
    db.execute("INSERT INTO usage_samples VALUES (1, 1, 'vm-a', 'web', 60.0, 5, NULL, NULL)")
    db.commit()
    db.close()
    store = UsageStore(tmp_path / "u.sqlite", resolution_s=60)
    store.record([UsageSample(1, "vm-a", "web", 70.0, memory_used=9, source="qemu-balloon")])
    [s] = store.window(1, 0.0)
    assert (s.memory_used, s.source) == (5, "guest")  # an old row was a guest's report
    store.close()


def test_retention_is_bounded(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "u.sqlite", resolution_s=60, retention_s=3600)
    bound = (3600 + PRUNE_EVERY_S) // 60 + 1
    for i in range(24 * 60):  # a day of one sample a minute, for two slices
        at = float(i * 60)
        store.record([UsageSample(sid, "vm-a", "web", at, memory_used=i) for sid in (1, 2)])
        assert store.sample_count(1) <= bound
    assert store.sample_count() <= 2 * bound
    oldest = store.window(1, 0.0)[0].at
    assert oldest >= 24 * 3600 - 3600 - PRUNE_EVERY_S - 60
    assert store.prune(24 * 3600.0) > 0  # an explicit prune drops the slack
    assert store.window(1, 0.0)[0].at >= 23 * 3600 - 60
    store.close()


def test_decisions_are_stored_queryable_and_bounded(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "u.sqlite", decision_retention=300)
    for i in range(1000):
        store.record_decision(
            Decision(float(i), 1 + i % 2, f"vm-{i % 2}", Resource.MEMORY, Action.UP, i, i + 1,
                     f"reason {i}")
        )  # fmt: skip
    recent = store.decisions(limit=5)
    assert [d.reason for d in recent] == [f"reason {i}" for i in range(995, 1000)]
    after = store.decisions(after=recent[0].id, limit=2)
    assert [d.id for d in after] == [recent[1].id, recent[2].id]
    assert {d.slice_id for d in store.decisions(slice_id=2, limit=50)} == {2}
    assert {d.owner for d in store.decisions(owner="vm-0", limit=50)} == {"vm-0"}
    assert len(store.decisions(limit=10_000)) <= 300 + 256
    store.close()


# ---------------------------------------------------------------------- policies


def _slice(rm: ResourceManager, owner: str = "vm-a", memory: int = gib(4), **kw: Any) -> int:
    spec: dict[str, Any] = {"owner": owner, "name": "web", "memory": {"size": memory}, **kw}
    return int(rm.allocate(SliceSpec.from_dict(spec))["id"])


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"minimum": gib(1) + 1}, "minimum", "granule"),
        ({"maximum": gib(128)}, "maximum", "exceeds the device's memory"),
        ({"minimum": gib(8), "maximum": gib(4)}, "minimum", "exceeds maximum"),
        ({"step": gib(32)}, "step", "exceeds maximum"),
        ({"cooldown": 0}, "cooldown", "out of range"),
        ({"resource": "lanes"}, "resource", "not adaptive"),
        ({"app_class": "-bad"}, "app_class", "not a class label"),
        ({"colour": "red"}, "colour", "unknown key"),
    ],
)
def test_bad_policies_are_refused_naming_the_field(
    rm: ResourceManager, change: dict[str, Any], field: str, words: str
) -> None:
    sid = _slice(rm)
    with pytest.raises(RequestError) as e:
        set_policy(rm, rm.usage, sid, {**POLICY, **change}, caller=None)
    assert e.value.details["field"] == field and words in e.value.message
    assert rm.usage.policies() == []


def test_only_the_owner_sets_a_policy_and_only_for_what_the_slice_has(
    rm: ResourceManager,
) -> None:
    sid = _slice(rm)
    with pytest.raises(PermissionDenied):
        set_policy(rm, rm.usage, sid, POLICY, caller="vm-b")
    with pytest.raises(RequestError, match="no cores"):
        set_policy(rm, rm.usage, sid, {**POLICY, "resource": "cores", "minimum": 1,
                                       "maximum": 4, "step": 1}, caller="vm-a")  # fmt: skip
    p = set_policy(rm, rm.usage, sid, POLICY, caller="vm-a")
    assert p.app_class == "web"  # the slice's name by default
    assert [AdaptivePolicy.from_stored(d) for d in rm.usage.policies()] == [p]


# ---------------------------------------------------------------------- the controller


def _run(rm: ResourceManager, demand: list[float], *, initial: int = gib(4),
         policy: dict[str, Any] | None = None, check_every: int = 1) -> Any:  # fmt: skip
    vm = SimVm("vm-a", demand, initial, 3, dict(policy or POLICY))
    res = simulate(rm, [vm], step_s=STEP_S, check_every=check_every)
    assert res.invariant_violations == []
    return res, res.held["vm-a"]


def test_step_up_and_down_is_tracked_within_bounds(rm: ResourceManager) -> None:
    demand = step(48, gib(2), gib(9), 8) + step(48, gib(9), gib(2), 0)
    _res, held = _run(rm, demand, initial=gib(3))  # 2 GiB is 67% of 3: steady at first
    assert all(gib(1) <= h <= gib(16) for h in held)
    assert held[40] >= demand[40] / UP_AT * 0.99  # settled above the high level
    assert held[-1] <= gib(2) / DOWN_AT  # came back down once demand fell
    assert held[-1] >= demand[-1]
    # no oscillation: up to the high level, down to the low one
    assert direction_flips(held) == 1
    changes = change_points(held)
    cooldown_ticks = POLICY["cooldown"] // STEP_S
    assert all(b - a >= cooldown_ticks for a, b in itertools.pairwise(changes))
    assert len(changes) <= 8


def test_ramp_is_followed_without_oscillation(rm: ResourceManager) -> None:
    n = 96
    demand = ramp(n, gib(2), gib(12), 10, 40)
    _res, held = _run(rm, demand)
    assert direction_flips(held) <= 1
    assert held[-1] >= gib(12)
    assert held[-1] <= gib(12) / 0.7 + gib(1)
    late = sum(d > h for d, h in zip(demand[45:], held[45:], strict=False))
    assert late == 0  # once the ramp is over, demand is covered


def test_noisy_steady_load_settles(rm: ResourceManager) -> None:
    rng = random.Random(7)
    demand = noisy(constant(PER_DAY, gib(6)), 0.08, rng)
    _res, held = _run(rm, demand, check_every=24)
    settled = held[24:]  # after two hours
    assert len(change_points(settled)) <= 1
    assert all(h >= gib(6) for h in settled)


def test_diurnal_cycles_bounded_resizes_and_few_violations(rm: ResourceManager) -> None:
    rng = random.Random(11)
    days = 3
    demand = noisy(diurnal(days, STEP_S, base=gib(2), peak=gib(8), jitter=0.1, rng=rng), 0.05,
                   rng)  # fmt: skip
    res, held = _run(rm, demand, check_every=12)
    assert all(gib(1) <= h <= gib(16) for h in held)
    # each day: a few steps up in the morning ramp, a few down in the evening
    assert len(change_points(held)) <= 8 * days
    assert res.violation_rate < 0.05
    assert direction_flips(held) <= 4 * days


def test_bounds_hold_and_are_enforced(rm: ResourceManager) -> None:
    policy = {**POLICY, "minimum": gib(3), "maximum": gib(6)}
    demand = step(36, gib(1), gib(20), 12)  # below the minimum, then above the maximum
    res, held = _run(rm, demand, initial=gib(8), policy=policy)
    assert res.decisions[0].action is Action.BOUNDS and res.decisions[0].after == gib(6)
    assert all(gib(3) <= h <= gib(6) for h in held[1:])
    assert held[-1] == gib(6)
    assert not [d for d in res.decisions if d.action is Action.REFUSED]


def test_every_decision_has_a_reason_and_is_stored(rm: ResourceManager) -> None:
    res, _ = _run(rm, step(24, gib(2), gib(9), 4))
    stored = rm.usage.decisions(limit=100)
    assert [d.id for d in stored] == [d.id for d in res.decisions]
    assert all(d.reason for d in stored)
    up = next(d for d in stored if d.action is Action.UP)
    assert "grow at 85%" in up.reason and up.after > up.before


def test_cores_follow_busy_time(rm: ResourceManager) -> None:
    sid = int(rm.allocate(SliceSpec.from_dict({"owner": "vm-a", "cores": {"count": 2}}))["id"])
    set_policy(rm, rm.usage, sid, {"resource": "cores", "minimum": 1, "maximum": 8, "step": 1,
                                   "cooldown": 60}, caller="vm-a")  # fmt: skip
    c = AdaptiveController(rm, rm.usage)
    for i in range(20):
        now = EPOCH + 60 * i
        held = len(rm.get(sid)["alloc"]["cores"])
        rm.usage.record([UsageSample(sid, "vm-a", "default", now, cores_busy=min(5.0, held))])
        c.tick(now)
    assert len(rm.get(sid)["alloc"]["cores"]) >= 6  # 5 busy cores at <= 85%
    assert rm.check_invariants() == []


def test_a_freed_slice_takes_its_policy_with_it(rm: ResourceManager) -> None:
    sid = _slice(rm)
    set_policy(rm, rm.usage, sid, POLICY, caller=None)
    rm.free(sid)
    AdaptiveController(rm, rm.usage).tick(EPOCH)
    assert rm.usage.policies() == []


def test_the_lower_priority_slice_yields_when_the_device_is_short(rm: ResourceManager) -> None:
    free = rm.device.memory_bytes
    filler = _slice(rm, "vm-static", free - gib(12))  # leaves 12 GiB
    low = _slice(rm, "vm-low", gib(8), qos={"priority": 1})
    high = _slice(rm, "vm-high", gib(4), qos={"priority": 6})
    for sid in (low, high):
        set_policy(rm, rm.usage, sid, {**POLICY, "minimum": gib(2)}, caller=None)
    c = AdaptiveController(rm, rm.usage)
    rm.usage.record([UsageSample(low, "vm-low", "web", EPOCH, memory_used=gib(3)),
                     UsageSample(high, "vm-high", "web", EPOCH, memory_used=gib(4))])
    decisions = c.tick(EPOCH)  # fmt: skip
    actions = {(d.slice_id, d.action) for d in decisions}
    assert (low, Action.YIELD) in actions and (high, Action.UP) in actions
    assert rm.get(high)["alloc"]["extents"] and _held(rm, high) > gib(4)
    assert _held(rm, low) < gib(8)
    assert rm.check_invariants() == []
    # the other way round: a low-priority growth never takes from a higher priority
    rm.usage.record([UsageSample(low, "vm-low", "web", EPOCH + 700, memory_used=_held(rm, low)),
                     UsageSample(high, "vm-high", "web", EPOCH + 700,
                                 memory_used=int(_held(rm, high) * 0.6))])  # fmt: skip
    before = _held(rm, high)
    later = c.tick(EPOCH + 700)
    assert not [d for d in later if d.action is Action.YIELD]
    assert _held(rm, high) == before
    assert any(d.slice_id == low and d.action is Action.REFUSED for d in later)
    del filler


def _held(rm: ResourceManager, sid: int) -> int:
    return int(sum(n for _, n in rm.get(sid)["alloc"]["extents"]) * rm.device.granule_bytes)


# ---------------------------------------------------------------------- forecaster


def test_quantile_matches_linear_interpolation() -> None:
    assert quantile([float(x) for x in range(1, 11)], 0.9) == pytest.approx(9.1)
    assert quantile([5.0], 0.3) == 5.0
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_forecaster_learns_a_seeded_daily_peak() -> None:
    rng = random.Random(3)
    f = SeasonalQuantile(slot_s=900, days=7, q=0.9, min_days=2)
    key = ForecastKey("vm-a", "web", Resource.MEMORY)
    peaks = []
    for day in range(5):  # peak at 09:00-10:00 of 8 GiB ± 5%, 2 GiB otherwise
        peak = 8.0 * (1 + rng.uniform(-0.05, 0.05))
        peaks.append(peak)
        for minute in range(0, 1440, 5):
            at = EPOCH + day * DAY_S + minute * 60
            value = peak if 9 * 60 <= minute < 10 * 60 else 2.0
            f.observe(key, at, value * (1 + rng.gauss(0, 0.01)) if value == 2.0 else value)
    day5 = EPOCH + 5 * DAY_S
    at9 = f.forecast(key, day5 + 9 * 3600, day5 + 9 * 3600 + 60)
    assert at9 == pytest.approx(quantile(peaks, 0.9))
    assert f.forecast(key, day5 + 3 * 3600, day5 + 3 * 3600 + 60) == pytest.approx(2.0, rel=0.05)
    # a window that reaches into the peak slot forecasts the peak
    ahead = f.forecast(key, day5 + 8 * 3600 + 40 * 60, day5 + 9 * 3600 + 10 * 60)
    assert ahead == at9
    assert f.forecast(ForecastKey("vm-a", "db", Resource.MEMORY), day5, day5 + 60) is None
    young = SeasonalQuantile(min_days=2)
    young.observe(key, EPOCH + 9 * 3600, 8.0)  # one day only
    assert young.forecast(key, EPOCH + DAY_S + 9 * 3600, EPOCH + DAY_S + 9 * 3600 + 1) is None


def test_predictive_reserves_before_the_ramp_and_cuts_violations(rm: ResourceManager) -> None:
    rng = random.Random(5)
    demand = noisy(diurnal(4, STEP_S, base=gib(2), peak=gib(9), ramp_h=0.25, rng=rng), 0.03,
                   rng)  # fmt: skip
    res, held = _run(rm, demand, policy={**POLICY, "predictive": True}, check_every=48)
    reserves = [d for d in res.decisions if d.action is Action.RESERVE]
    assert reserves  # from the third day on, ahead of 09:00
    day3_ramp = EPOCH + 2 * DAY_S + 9 * 3600
    assert any(day3_ramp - 1800 <= d.at < day3_ramp for d in reserves)
    day3 = slice(2 * PER_DAY, 4 * PER_DAY)
    late = sum(d > h for d, h in zip(demand[day3], held[day3], strict=False))
    assert late <= 2


def test_unused_reservations_are_released(rm: ResourceManager) -> None:
    days = 3
    demand = diurnal(days, STEP_S, base=gib(2), peak=gib(9))
    demand += constant(PER_DAY, gib(2))  # on the last day the demand does not come
    res, held = _run(rm, demand, policy={**POLICY, "predictive": True}, check_every=48)
    last = EPOCH + days * DAY_S
    reserve = [d for d in res.decisions if d.action is Action.RESERVE and d.at >= last]
    release = [d for d in res.decisions if d.action is Action.RELEASE and d.at >= last]
    assert reserve and release
    assert release[-1].after == reserve[0].before  # back to what was held before
    assert "did not" not in release[-1].reason and "within" in release[-1].reason
    assert held[-1] <= gib(4)  # nothing reserved stays


# ---------------------------------------------------------------------- the API


def test_usage_policy_and_decisions_over_the_vm_mailbox(device_api: Any, state: StateDir) -> None:  # noqa: F811
    rm, service = device_api
    a = provision(rm, service, state, "vm-a")
    b = provision(rm, service, state, "vm-b")
    sid = a.call("ALLOCATE", ALLOC).payload["id"]
    r = a.call("REPORT_USAGE", {"slice": sid, "memory_used_bytes": 1 << 29,
                                "cores_busy_milli": 1500})  # fmt: skip
    assert r.ok, r.error
    assert r.payload == {"slice": sid, "memory_bytes": 1 << 30, "cores": 2}
    (sample,) = rm.usage.window(sid, 0.0)
    assert (sample.memory_used, sample.cores_busy, sample.app_class) == (1 << 29, 1.5, "web")
    r = a.call("REPORT_USAGE", {"slice": sid, "memory_used_bytes": 2 << 30,
                                "cores_busy_milli": 0})  # fmt: skip
    assert r.error["code"] == "invalid" and "memory_used_bytes" in r.error["message"]
    assert b.call("REPORT_USAGE", {"slice": sid, "memory_used_bytes": 0,
                                   "cores_busy_milli": 0}).error["code"] == "denied"  # fmt: skip

    policy = {"slice": sid, "resource": "memory", "enabled": True, "predictive": False,
              "minimum": 1 << 30, "maximum": 4 << 30, "step": 1 << 30, "cooldown_s": 60,
              "app_class": ""}  # fmt: skip
    r = a.call("SET_ADAPTIVE", policy)
    assert r.ok, r.error
    assert r.payload["app_class"] == "web"
    assert b.call("SET_ADAPTIVE", policy).error["code"] == "denied"
    r = a.call("SET_ADAPTIVE", {**policy, "step": 3})
    assert r.error["code"] == "invalid" and "step" in r.error["message"]

    rm.usage.record([UsageSample(sid, "vm-a", "web", 2e9, memory_used=1 << 30)])
    AdaptiveController(rm, rm.usage).tick(2e9)
    r = a.call("ADAPTIVE_DECISIONS", {"slice": 0, "after": 0})
    assert r.ok, r.error
    (d,) = r.payload["decisions"]
    assert (d["slice"], d["action"], d["after"]) == (sid, "up", 2 << 30)
    assert b.call("ADAPTIVE_DECISIONS", {"slice": 0, "after": 0}).payload == {"decisions": []}
    r = a.call("SET_ADAPTIVE", {**policy, "enabled": False})
    assert r.ok and rm.usage.policies() == []


def test_a_vm_uses_it_through_hostlib(firmware: Firmware) -> None:  # noqa: F811
    from hostlib import Device
    from hostlib.errors import RequestError as HostRequestError

    cred = firmware.provision("vm-a")
    rm = firmware.rm
    with Device.open(cred, mailbox=cred.mailbox) as dev:
        s = dev.allocate(memory="2 GiB", cores=2, name="web")
        policy = dev.set_adaptive(s.id, minimum="1 GiB", maximum="8 GiB", step="1 GiB",
                                  cooldown_s=60, predictive=True)  # fmt: skip
        assert (policy["app_class"], policy["maximum"]) == ("web", gib(8))
        with pytest.raises(HostRequestError, match="maximum"):
            dev.set_adaptive(s.id, minimum="1 GiB", maximum="1 TiB", step="1 GiB", cooldown_s=60)
        held = dev.report_usage(s.id, memory_used="1900 MiB", cores_busy=1.25)
        assert held == {"slice": s.id, "memory_bytes": gib(2), "cores": 2}
        with pytest.raises(HostRequestError, match="memory_used_bytes"):
            dev.report_usage(s.id, memory_used="3 GiB")
        (d,) = AdaptiveController(rm, rm.usage).tick(rm.usage.window(s.id, 0.0)[0].at)
        (seen,) = dev.adaptive_decisions(s.id)
        assert (seen["id"], seen["action"], seen["after"]) == (d.id, "up", d.after)
        assert dev.report_usage(s.id)["memory_bytes"] == d.after  # the guest sees the resize
        dev.clear_adaptive(s.id)
        assert rm.usage.policies() == []
    assert rm.check_invariants() == []


def test_admin_reads_every_decision(rm: ResourceManager) -> None:
    api = Api(rm, rm.vms)
    sid = _slice(rm)
    rm.usage.record_decision(Decision(EPOCH, sid, "vm-a", Resource.MEMORY, Action.DOWN,
                                      gib(4), gib(3), "x" * 500))  # fmt: skip
    frame = encode_request("ADAPTIVE_DECISIONS", {"slice": sid, "after": 0})
    r = decode(api.handle_admin_frame(Channel(Role.ADMIN), frame))
    assert r.ok and r.payload is not None, r.error
    (d,) = r.payload["decisions"]
    assert d["reason"] == "x" * 160 and d["at_ms"] == int(EPOCH * 1000)


# ---------------------------------------------------------------------- daemon loop


def test_the_service_ticks_on_its_clock_and_stops(rm: ResourceManager) -> None:
    sid = _slice(rm, ports=1)
    set_policy(rm, rm.usage, sid, POLICY, caller=None)
    ticks: list[float] = []

    def clock() -> float:
        ticks.append(EPOCH + 60 * len(ticks))
        if len(ticks) == 2:
            rm.usage.record([UsageSample(sid, "vm-a", "web", ticks[-1], memory_used=gib(4))])
        return ticks[-1]

    service = AdaptiveService(AdaptiveController(rm, rm.usage), 0.01, clock).start()
    try:
        for _ in range(500):
            if rm.usage.decisions(limit=1):
                break
            service._stop.wait(0.01)
    finally:
        service.stop()
    assert rm.usage.decisions(limit=1)[0].action is Action.UP
    n = len(ticks)
    service._stop.wait(0.05)
    assert len(ticks) == n  # stopped
    assert rm.usage.window(sid, 0.0)  # fabric samples of its port were stored too


# ---------------------------------------------------------------------- benchmark


def test_bench_adaptive_quick_meets_its_target() -> None:
    # without its migration part (it starts etcd: tests/test_pool_migrate.py runs it)
    figures = bench_adaptive(quick=True, migration=False)
    assert figures["target_met"] is True
    for mode in ("static", "reactive", "predictive"):
        assert figures[f"{mode}_invariant_violations"] == 0
    assert figures["static_resizes"] == 0
    assert figures["static_slo_violations"] > figures["reactive_slo_violations"]
    assert figures["predictive_slo_violations"] < figures["reactive_slo_violations"]
    # the bandwidth trace: the controller moves rates, predictive cuts violations
    for mode in ("reactive", "predictive"):
        assert figures[f"bandwidth_{mode}_invariant_violations"] == 0
        assert figures[f"bandwidth_{mode}_resizes"] > 0
    assert (
        figures["bandwidth_predictive_slo_violations"]
        < figures["bandwidth_reactive_slo_violations"]
    )
    assert not any(k.startswith("migration") for k in figures)


# ---------------------------------------------------------------------- slicefab top


def test_top_shows_the_decisions_with_their_reasons(tmp_path: Path) -> None:
    from rich.console import Console

    from firmware import top
    from firmware.manager import open_manager
    from tests.test_cli import run_json

    st = tmp_path / "state"
    state = StateDir(st)
    rm = open_manager(state)
    try:
        sid = _slice(rm)
        set_policy(rm, rm.usage, sid, POLICY, caller=None)
        rm.usage.record([UsageSample(sid, "vm-a", "web", EPOCH, memory_used=gib(4))])
        (decision,) = AdaptiveController(rm, rm.usage).tick(EPOCH)
    finally:
        rm.close()
        state.unlock()
    frame = run_json("top", "--once", "--interval", "0.05", state=st)
    (shown,) = frame["decisions"]
    assert (shown["slice"], shown["action"], shown["after"]) == (sid, "up", decision.after)
    assert shown["reason"] == decision.reason
    console = Console(width=200, record=True)
    console.print(top.render(frame, rm.device.granule_bytes, None))
    text = console.export_text()
    assert "Adaptive decisions" in text and "memory 4 GiB → 6 GiB" in text


def test_bad_knobs_are_refused_naming_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from firmware.adaptive.bench import PEAK_SCALE_ENV, peak_scale_from_env
    from firmware.adaptive.controller import interval_arg
    from firmware.errors import ConfigError

    assert interval_arg("0") == 0 and interval_arg("2.5") == 2.5
    for bad in ("-1", "0.01", "7200", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            interval_arg(bad)
    monkeypatch.setenv(PEAK_SCALE_ENV, "1.0")
    assert peak_scale_from_env() == 1.0
    monkeypatch.setenv(PEAK_SCALE_ENV, "lots")
    with pytest.raises(ConfigError, match=PEAK_SCALE_ENV):
        peak_scale_from_env()
