"""Bandwidth as an adaptive resource (issue 9, part 2): policies in Mbit/s per crossbar
port, the controller raising and lowering a slice's QoS rate through the manager's resize
(so a port's bandwidth is never oversubscribed), the token bucket pinning measured use at
the limit on the real crossbar model, synthetic demand traces, priority yields among the
slices sharing a port, and the VM's API."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from firmware.adaptive.controller import AdaptiveController
from firmware.adaptive.policy import set_policy
from firmware.adaptive.traces import (
    EPOCH,
    SimVm,
    change_points,
    direction_flips,
    diurnal,
    noisy,
    simulate,
    step,
)
from firmware.adaptive.usage import FABRIC, Action, Resource, UsageSample
from firmware.errors import RequestError
from firmware.manager import ResourceManager
from firmware.slices import SliceSpec
from tests.test_hostlib_e2e import Firmware, firmware  # noqa: F401  (fixture)

G = 1000  # Mbit/s in a Gbit/s
STEP_S = 300
POLICY: dict[str, Any] = {
    "resource": "bandwidth",
    "minimum": "2 Gbit/s",
    "maximum": "60 Gbit/s",
    "step": "5 Gbit/s",
    "cooldown": 600,
}


def _slice(rm: ResourceManager, owner: str, rate_mbps: int, priority: int = 0) -> int:
    spec = {
        "owner": owner,
        "name": "net",
        "memory": {"size": "2 MiB"},
        "ports": 1,
        "qos": {"priority": priority, "guaranteed": rate_mbps, "maximum": rate_mbps},
    }
    return int(rm.allocate(SliceSpec.from_dict(spec))["id"])


def _qos(rm: ResourceManager, sid: int) -> tuple[int, int]:
    q = rm.get(sid)["spec"]["qos"]
    return int(q["guaranteed"]), int(q["maximum"])


def _port_guaranteed(rm: ResourceManager, port: int) -> int:
    return rm.read(lambda a: a.ports[port].guaranteed_mbps)


# ---------------------------------------------------------------------- policies


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"maximum": "200 Gbit/s"}, "maximum", "a crossbar port's capacity 100 Gbit/s"),
        ({"minimum": 0}, "minimum", "at least 1 Mbit/s"),
        ({"step": "fast"}, "step", "bandwidth"),
        ({"minimum": "70 Gbit/s"}, "minimum", "exceeds maximum"),
    ],
)
def test_bad_bandwidth_policies_name_the_field(
    rm: ResourceManager, change: dict[str, Any], field: str, words: str
) -> None:
    sid = _slice(rm, "vm-a", 10 * G)
    with pytest.raises(RequestError) as e:
        set_policy(rm, rm.usage, sid, {**POLICY, **change}, caller=None)
    assert e.value.details["field"] == field and words in e.value.message
    assert rm.usage.policies() == []


def test_a_slice_without_a_port_cannot_adapt_bandwidth(rm: ResourceManager) -> None:
    spec = {"owner": "vm-a", "memory": {"size": "2 MiB"}, "ports": 0}
    sid = int(rm.allocate(SliceSpec.from_dict(spec))["id"])
    with pytest.raises(RequestError, match="no crossbar port") as e:
        set_policy(rm, rm.usage, sid, POLICY, caller=None)
    assert e.value.details["field"] == "resource"


def test_rates_are_stored_in_mbit_per_s(rm: ResourceManager) -> None:
    sid = _slice(rm, "vm-a", 10 * G)
    p = set_policy(rm, rm.usage, sid, POLICY, caller="vm-a")
    assert (p.resource, p.minimum, p.maximum, p.step) == (Resource.BANDWIDTH, 2 * G, 60 * G, 5 * G)


# ---------------------------------------------------------------------- on the crossbar


def test_the_token_bucket_pins_use_at_the_limit_and_the_controller_raises_it(
    rm: ResourceManager,
) -> None:
    """Real traffic through the behavioural crossbar: a backlog on the slice's port is let
    through at the slice's QoS rate, the fabric counters measure exactly that (use at
    100%), and the controller raises the rate step by step to the policy's maximum; when
    the traffic stops, it lowers it again."""
    sid = _slice(rm, "vm-a", 10 * G)
    (port,) = rm.get(sid)["alloc"]["ports"]
    key = rm.get(sid)["alloc"]["key"]
    set_policy(rm, rm.usage, sid, {**POLICY, "maximum": "40 Gbit/s", "cooldown": 60}, caller=None)
    c = AdaptiveController(rm, rm.usage)
    model = rm.fabric.bus
    clock_hz = rm.device.crossbar.clock_mhz * 1e6
    cycles = 20_000
    limits, measured = [], []
    for r in range(8):
        t = EPOCH + 61 * r
        c.sample_fabric(t)  # baseline (nothing moved since the last round)
        limit = _qos(rm, sid)[1]
        if r < 5:  # a backlog a little above what the limit lets through
            packets = int(limit * 1e6 * cycles / clock_hz / 8 / 256 * 1.2) + 4
            for _ in range(packets):
                model.send(port, port, bytes(256), key=key)
        model.step(cycles)
        (sample,) = c.sample_fabric(t + cycles / clock_hz)
        assert sample.source == FABRIC
        limits.append(limit)
        measured.append(sample.port_mbps or 0.0)
        c.tick(t + cycles / clock_hz)
        model.run_until_idle(10 * cycles)  # what is left drains before the next round
        assert rm.check_invariants() == []
    for lim, got in zip(limits[:5], measured[:5], strict=True):
        assert got == pytest.approx(lim, rel=0.03)  # the bucket's rate, not the backlog's
    assert limits[:5] == [10 * G, 15 * G, 25 * G, 40 * G, 40 * G]  # grown to use/0.7, capped
    assert measured[5:] == [0.0, 0.0, 0.0]
    decisions = rm.usage.decisions(slice_id=sid)
    assert [d.action for d in decisions] == [Action.UP, Action.UP, Action.UP, Action.DOWN]
    assert "grow at 85%" in decisions[0].reason and "Gbit/s" in decisions[0].reason
    assert decisions[-1].after == 5 * G  # whole steps down, never below the minimum
    assert _qos(rm, sid) == (5 * G, 5 * G)  # guaranteed = maximum
    assert rm.fabric.port_counters(port)["drops"] == 0


# ---------------------------------------------------------------------- traces


def _run(
    rm: ResourceManager,
    demand: list[float],
    initial: int,
    policy: dict[str, Any] | None = None,
    check_every: int = 1,
) -> tuple[Any, list[int]]:
    vm = SimVm("vm-a", demand, initial, 3, dict(policy or POLICY), resource=Resource.BANDWIDTH)
    res = simulate(rm, [vm], step_s=STEP_S, check_every=check_every)
    assert res.invariant_violations == []
    return res, res.held["vm-a"]


def test_a_bandwidth_step_is_tracked_within_bounds(rm: ResourceManager) -> None:
    demand = step(48, 4 * G, 30 * G, 8) + step(48, 30 * G, 4 * G, 0)
    _res, held = _run(rm, demand, initial=8 * G)
    assert all(2 * G <= h <= 60 * G for h in held)
    assert 30 * G / 0.85 <= held[40] <= 30 * G / 0.7 + 5 * G  # settled above the high level
    assert demand[-1] <= held[-1] <= 4 * G / 0.5  # and back down once demand fell
    assert direction_flips(held) == 1
    changes = change_points(held)
    assert all(b - a >= POLICY["cooldown"] // STEP_S for a, b in itertools.pairwise(changes))
    assert len(changes) <= 8


def test_a_noisy_diurnal_bandwidth_demand_bounded_resizes(rm: ResourceManager) -> None:
    rng = random.Random(19)
    days = 3
    demand = noisy(diurnal(days, STEP_S, base=3 * G, peak=35 * G, jitter=0.1, rng=rng), 0.05, rng)
    res, held = _run(rm, demand, initial=10 * G, check_every=12)
    assert all(2 * G <= h <= 60 * G for h in held)
    # one shrink to the night level at the start, then each day at most 5 steps up the
    # 30-minute ramp (use pinned at the limit: one step per cooldown) and 3 down
    assert len(change_points(held)) <= 8 * days + 1
    assert direction_flips(held) <= 2 * days + 1
    assert res.violation_rate < 0.05
    # every change went through the manager: the port carries exactly the slice's rate
    sid = rm.read(lambda a: next(iter(a.slices)))
    (port,) = rm.get(sid)["alloc"]["ports"]
    assert _port_guaranteed(rm, port) == held[-1] == _qos(rm, sid)[0]


# ---------------------------------------------------------------------- a port's capacity


def _saturate(rm: ResourceManager, now: float, *sids: int) -> None:
    rm.usage.record(
        [
            UsageSample(s, rm.get(s)["owner"], "net", now, port_mbps=_qos(rm, s)[1], source=FABRIC)
            for s in sids
        ]
    )


def test_a_port_is_never_oversubscribed(rm: ResourceManager) -> None:
    static = _slice(rm, "vm-a", 80 * G)  # not adaptive: it keeps its 80 Gbit/s
    sid = _slice(rm, "vm-a", 10 * G)
    (port,) = rm.get(sid)["alloc"]["ports"]
    assert rm.get(static)["alloc"]["ports"] == [port]  # the VM's slices share its port
    set_policy(rm, rm.usage, sid, POLICY, caller=None)
    c = AdaptiveController(rm, rm.usage)
    _saturate(rm, EPOCH, sid)
    (d,) = c.tick(EPOCH)  # 10 / 0.7 → 15 Gbit/s; the port has 10 left
    assert (d.action, d.before, d.after) == (Action.UP, 10 * G, 15 * G)
    _saturate(rm, EPOCH + 700, sid)
    (d,) = c.tick(EPOCH + 700)  # wants 25; the port has 5 left: the whole steps that fit
    assert (d.action, d.before, d.after) == (Action.UP, 15 * G, 20 * G)
    assert "short: 25 Gbit/s wanted" in d.reason
    _saturate(rm, EPOCH + 1400, sid)
    (d,) = c.tick(EPOCH + 1400)
    assert (d.action, d.before, d.after) == (Action.REFUSED, 20 * G, 20 * G)
    assert "guaranteed bandwidth on crossbar port" in d.reason
    assert _port_guaranteed(rm, port) == 100 * G
    assert _qos(rm, static) == (80 * G, 80 * G)
    assert rm.check_invariants() == []


def test_a_lower_priority_slice_on_the_port_yields(rm: ResourceManager) -> None:
    low = _slice(rm, "vm-a", 60 * G, priority=1)
    high = _slice(rm, "vm-a", 30 * G, priority=6)
    other = _slice(rm, "vm-b", 50 * G, priority=0)  # another VM: another port
    (port,) = rm.get(high)["alloc"]["ports"]
    assert rm.get(low)["alloc"]["ports"] == [port] != rm.get(other)["alloc"]["ports"]
    for s in (low, high, other):
        set_policy(rm, rm.usage, s, {**POLICY, "minimum": "20 Gbit/s"}, caller=None)
    c = AdaptiveController(rm, rm.usage)
    rm.usage.record(
        [
            UsageSample(
                s, rm.get(s)["owner"], "net", EPOCH, port_mbps=0.6 * _qos(rm, s)[1], source=FABRIC
            )
            for s in (low, other)
        ]
    )
    _saturate(rm, EPOCH, high)  # wants 30 / 0.7 → 45 Gbit/s; the port has 10 left
    decisions = c.tick(EPOCH)
    actions = {(d.slice_id, d.action) for d in decisions}
    assert actions == {(low, Action.YIELD), (high, Action.UP)}
    (y,) = [d for d in decisions if d.action is Action.YIELD]
    assert (y.before, y.after) == (60 * G, 55 * G)
    assert f"to slice {high} (priority 6 > 1)" in y.reason
    assert _qos(rm, high) == (45 * G, 45 * G)
    assert _qos(rm, other) == (50 * G, 50 * G)  # never a donor: not on the port
    assert _port_guaranteed(rm, port) == 100 * G
    assert rm.check_invariants() == []


# ---------------------------------------------------------------------- the VM's API


def test_a_vm_opts_bandwidth_in_through_hostlib(firmware: Firmware) -> None:  # noqa: F811
    from hostlib import Device
    from hostlib.errors import RequestError as HostRequestError

    cred = firmware.provision("vm-a")
    rm = firmware.rm
    with Device.open(cred, mailbox=cred.mailbox) as dev:
        s = dev.allocate(memory="1 GiB", guaranteed="10 Gbit/s", maximum="10 Gbit/s", name="net")
        policy = dev.set_adaptive(
            s.id,
            resource="bandwidth",
            minimum="1 Gbit/s",
            maximum="50 Gbit/s",
            step="5 Gbit/s",
            cooldown_s=60,
        )
        assert (policy["resource"], policy["maximum"]) == ("bandwidth", 50 * G)
        with pytest.raises(HostRequestError, match="maximum"):
            dev.set_adaptive(
                s.id,
                resource="bandwidth",
                minimum="1 Gbit/s",
                maximum="400 Gbit/s",
                step="5 Gbit/s",
                cooldown_s=60,
            )
        _saturate(rm, EPOCH, s.id)
        (d,) = AdaptiveController(rm, rm.usage).tick(EPOCH)
        (seen,) = dev.adaptive_decisions(s.id)
        assert (seen["resource"], seen["action"], seen["before"], seen["after"]) == (
            "bandwidth",
            "up",
            10 * G,
            15 * G,
        )
        assert seen["id"] == d.id
        assert dev.get(s.id).qos.maximum_mbps == 15 * G  # the VM sees its new rate
        dev.clear_adaptive(s.id, resource="bandwidth")
        assert rm.usage.policies() == []
    assert rm.check_invariants() == []


def test_top_shows_bandwidth_decisions_as_rates() -> None:
    from rich.console import Console

    from firmware import top

    t = top._decisions_table(
        [
            {
                "at_ms": 0,
                "slice": 3,
                "action": "up",
                "resource": "bandwidth",
                "before": 10 * G,
                "after": 15 * G,
                "reason": "r",
            }
        ]
    )
    console = Console(width=200, record=True)
    console.print(t)
    assert "bandwidth 10 Gbit/s → 15 Gbit/s" in console.export_text()
