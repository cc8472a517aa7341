"""Differential tests of the C fabric fast path against the Python reference (image.py).

For random crossbars (1..64 ports, 1..16 keys, random clock, flit width and capacity) and
random slice tables, the C path (cffi_ext/src/xbar_image.c through firmware.fastpath) and
the Python reference give the same per-port register image and the same minimal write list,
and the write list applied to the behavioural crossbar (CrossbarModel) yields the target
image. Bad input makes C return an error that Python raises as FabricError, never a crash.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abi import regmap as rm
from firmware import fastpath
from firmware.allocator import Allocator
from firmware.errors import ConfigError, FabricError
from firmware.fabric import image as img
from firmware.fabric.driver import FabricDriver
from firmware.fabric.model import CrossbarModel
from firmware.inventory import Crossbar, Device, load_device
from firmware.slices import Allocation, QoS, Slice, SliceSpec

REPO = Path(__file__).resolve().parents[1]
BASE = load_device()

SliceRow = tuple[str, int, int, int, int, tuple[int, ...]]


@st.composite
def devices(draw: st.DrawFn) -> Device:
    ports = draw(st.integers(1, 64))
    width = draw(st.sampled_from([8, 16, 64, 128, 256, 512, 1024]))
    clock = draw(st.integers(1, 5000))
    raw = width * clock
    mbps = draw(st.integers(1, raw) | st.just(raw))
    keys = draw(st.integers(1, 16))
    return replace(BASE, keys=keys, crossbar=Crossbar(ports, mbps, width, clock))


@st.composite
def slice_tables(draw: st.DrawFn, device: Device) -> list[SliceRow]:
    """Slices of a few VMs; each crossbar port belongs to at most one VM (as the allocator
    guarantees), each slice uses some of its VM's ports (possibly none)."""
    n = device.crossbar.ports
    cap = device.crossbar.port_mbps
    vms = [f"vm-{i}" for i in range(draw(st.integers(1, 8)))]
    holder = draw(st.lists(st.sampled_from([None, *vms]), min_size=n, max_size=n))
    rows: list[SliceRow] = []
    for _ in range(draw(st.integers(0, 40))):
        vm = draw(st.sampled_from(vms))
        mine = [p for p in range(n) if holder[p] == vm]
        ports: tuple[int, ...] = ()
        if mine:
            ports = tuple(sorted(draw(st.sets(st.sampled_from(mine), max_size=len(mine)))))
        maximum = draw(st.integers(0, cap))
        guaranteed = draw(st.integers(0, maximum or cap))
        rows.append(
            (
                vm,
                draw(st.integers(0, 7)),
                guaranteed,
                maximum,
                draw(st.integers(0, device.keys - 1)),
                ports,
            )
        )
    return rows


def as_slices(rows: Sequence[SliceRow]) -> list[Slice]:
    return [
        Slice(
            i,
            SliceSpec(owner, ports=len(ports), qos=QoS(prio, g, m)),
            Allocation(key=key, ports=ports),
        )
        for i, (owner, prio, g, m, key, ports) in enumerate(rows)
    ]


def python_path(
    device: Device, rows: Sequence[SliceRow], current: dict[int, int]
) -> tuple[dict[int, int], list[tuple[int, int]]]:
    demand = img.demand_from_slices(device, as_slices(rows))
    target = img.register_image(img.port_configs(device, demand))
    return target, img.diff(current, target)


def model_for(device: Device) -> CrossbarModel:
    xb = device.crossbar
    return CrossbarModel(xb.ports, device.keys, xb.data_bytes)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_c_and_python_give_the_same_image_and_writes(data: st.DataObject) -> None:
    device = data.draw(devices())
    before = data.draw(slice_tables(device))
    after = data.draw(slice_tables(device))
    model = model_for(device)
    # the crossbar holds the image of `before` (reached from reset by the C write list)
    current, writes = fastpath.image_from_slices(device, before, model.image())
    for addr, value in writes:
        model.write(addr, value)
    assert model.image() == current
    # and perhaps the firmware knows only part of it (after a failed read-back)
    known = data.draw(st.sets(st.sampled_from(sorted(current))))
    believed = {a: v for a, v in current.items() if a in known}

    c_target, c_writes = fastpath.image_from_slices(device, after, believed)
    py_target, py_writes = python_path(device, after, believed)
    assert c_target == py_target
    assert c_writes == py_writes
    assert [a for a, _ in c_writes] == sorted(a for a, _ in c_writes)  # address order
    for addr, value in c_writes:
        model.write(addr, value)
    model.write(rm.CTRL_OFFSET, rm.CTRL_COMMIT_MASK)
    assert model.image() == c_target
    # minimal: every write changes a register the firmware did not know to hold that value
    assert all(believed.get(a) != v for a, v in c_writes)


def drive(device: Device, enabled: str, monkeypatch: pytest.MonkeyPatch) -> FabricDriver:
    monkeypatch.setenv(fastpath.ENV, enabled)
    return FabricDriver.with_model(device)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_driver_programs_the_same_writes_on_both_paths(data: st.DataObject) -> None:
    """Allocator demand (the driver's real input) through both planners, step by step,
    each on its own behavioural crossbar."""
    ports = data.draw(st.integers(1, 64))
    device = replace(BASE, crossbar=replace(BASE.crossbar, ports=ports))
    with pytest.MonkeyPatch.context() as mp:
        c_drv, py_drv = drive(device, "1", mp), drive(device, "0", mp)
        mp.setenv(fastpath.ENV, "0")
        alloc = Allocator(device)
    assert isinstance(c_drv._planner, fastpath.CImagePlanner)
    assert isinstance(py_drv._planner, img.ImagePlanner)
    live: list[int] = []
    for _ in range(data.draw(st.integers(1, 30))):
        free_one: bool = data.draw(st.booleans())
        if live and free_one:
            alloc.release(live.pop(data.draw(st.integers(0, len(live) - 1))))
        else:
            spec = SliceSpec.from_dict(
                {
                    "owner": f"vm-{data.draw(st.integers(0, 5))}",
                    "memory": {"size": "2 MiB"},
                    "ports": data.draw(st.integers(1, min(3, ports))),
                    "qos": {
                        "priority": data.draw(st.integers(0, 7)),
                        "guaranteed": data.draw(st.sampled_from([0, 1000, 25000])),
                    },
                }
            )
            try:
                live.append(alloc.allocate(spec).id)
            except Exception:
                continue
        demand = alloc.port_demand()
        assert c_drv._planner.plan(demand) == py_drv._planner.plan(demand)
        assert c_drv.sync(demand) == py_drv.sync(demand)
        assert c_drv.read_image() == py_drv.read_image() == c_drv.target(demand)
        assert c_drv.check(alloc.slices.values()) == []


def test_a_reloaded_planner_rewrites_what_it_cannot_vouch_for(device: Device) -> None:
    planner = fastpath.CImagePlanner(device)
    reference = img.ImagePlanner(device)
    a = Allocator(device)
    a.allocate(SliceSpec.from_dict({"owner": "vm-a", "memory": {"size": "2 MiB"}, "ports": 2}))
    demand = a.port_demand()
    image = reference.target(demand)
    partial = {addr: v for i, (addr, v) in enumerate(sorted(image.items())) if i % 3}
    for p in (planner, reference):
        p.load(partial)
    assert planner.plan(demand) == reference.plan(demand) != []
    assert len(planner.plan(demand)) == len(image) - len(partial)
    planner.applied()
    assert planner.plan(demand) == []  # the crossbar now holds it all


@pytest.mark.parametrize(
    ("field", "value", "names"),
    [
        ("priority", 8, "priority"),
        ("keys", 1 << 16, "keys"),
        ("guaranteed_mbps", 1 << 41, "guaranteed_mbps"),
        ("limit_mbps", 1 << 41, "limit_mbps"),
    ],
)
def test_out_of_range_demand_is_a_fabric_error_naming_the_field(
    device: Device, field: str, value: int, names: str
) -> None:
    planner = fastpath.CImagePlanner(device)
    demand = [img.PortDemand()] * device.crossbar.ports
    planner.load(img.ImagePlanner(device).target(demand))  # the crossbar is at reset
    changes: dict[str, Any] = {field: value}
    demand[3] = replace(img.PortDemand("vm-a", 1, 10, 10, 1), **changes)
    with pytest.raises(FabricError) as info:
        planner.plan(demand)
    assert names in info.value.message and info.value.details["index"] == 3
    assert info.value.details["value"] == value
    # the planner is still usable after the refusal
    demand[3] = img.PortDemand("vm-a", 1, 10, 10, 1)
    assert len(planner.plan(demand)) == 5


def test_demand_that_does_not_fit_a_c_integer_is_refused(device: Device) -> None:
    planner = fastpath.CImagePlanner(device)
    demand = [img.PortDemand()] * device.crossbar.ports
    demand[0] = img.PortDemand("vm-a", -1, 0, 0, 0)
    with pytest.raises(FabricError, match="port 0"):
        planner.plan(demand)
    with pytest.raises(FabricError, match="demand for 3 ports"):
        planner.plan(demand[:3])
    with pytest.raises(FabricError, match="demand for 3 ports"):
        img.ImagePlanner(device).plan(demand[:3])


@pytest.mark.parametrize(
    ("row", "field"),
    [
        (("vm", 9, 0, 0, 0, (0,)), "priority"),
        (("vm", 0, 0, 0, 16, (0,)), "key"),
        (("vm", 0, 1 << 40, 0, 0, (0,)), "guaranteed_mbps"),
        (("vm", 0, 0, 1 << 40, 0, (0,)), "max_mbps"),
        (("vm", 0, 0, 0, 0, (16,)), "ports"),
        (("vm", 0, -5, 0, 0, (0,)), "a field does not fit"),
    ],
)
def test_a_bad_slice_table_is_refused_naming_slice_and_field(
    device: Device, row: SliceRow, field: str
) -> None:
    with pytest.raises(FabricError, match=field) as info:
        fastpath.image_from_slices(device, [("ok", 0, 0, 0, 0, (1,)), row], {})
    assert info.value.details.get("index") == 1


def test_every_documented_formula_matches_the_reference_at_the_extremes() -> None:
    """Corner values (tiny and huge bandwidth, slow and fast clocks) on both paths."""
    for clock in (1, 250, 5000):
        for width in (8, 1024):
            raw = width * clock
            dev = replace(BASE, crossbar=Crossbar(64, raw, width, clock))
            rows: list[SliceRow] = [
                ("a", 7, raw, 0, 15, (0, 63)),  # guaranteed = capacity: weight capped at 255
                ("b", 0, 0, 1, 0, (1,)),  # 1 Mbit/s: rate clamps to >= 1
                ("c", 3, 1, raw, 3, (32,)),  # a port above 31: PERM_HI
            ]
            assert fastpath.image_from_slices(dev, rows, {}) == python_path(dev, rows, {})


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
        timeout=60,
    )


BLOCK_EXTENSION = (  # as if neither the release nor the sanitizer build were there
    "import sys\n"
    "for m in ('cffi_ext._slicefab', 'cffi_ext._slicefab_asan'):\n"
    "    sys.modules[m] = None\n"
)


def test_a_missing_extension_fails_the_import_with_how_to_build_it() -> None:
    r = run_python(BLOCK_EXTENSION + "import firmware.allocator", SLICEFAB_FASTPATH="1")
    assert r.returncode != 0
    assert "FastPathUnavailable" in r.stderr and "make setup" in r.stderr
    assert "SLICEFAB_FASTPATH=0" in r.stderr


def test_the_reference_needs_no_extension() -> None:
    code = BLOCK_EXTENSION + (
        "from firmware.allocator import Allocator\n"
        "from firmware.fabric.driver import FabricDriver\n"
        "from firmware.inventory import load_device\n"
        "d = load_device(); a = Allocator(d); f = FabricDriver.with_model(d)\n"
        "print(type(a.memory).__name__, type(f._planner).__name__)\n"
    )
    r = run_python(code, SLICEFAB_FASTPATH="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ExtentAllocator", "ImagePlanner"]


def test_the_extension_loaded_is_the_one_asked_for() -> None:
    """``make sanitize`` runs these tests on the ASan+UBSan build: make sure it is that one."""
    wanted = os.environ.get(fastpath.MODULE_ENV) or fastpath.MODULES[0]
    assert fastpath.extension().__name__ == wanted
    r = run_python("import firmware.fastpath", SLICEFAB_FASTPATH="1", SLICEFAB_FASTPATH_MODULE="os")
    assert r.returncode != 0 and "expected one of" in r.stderr


def test_the_switch_accepts_only_0_or_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fastpath.ENV, "yes")
    with pytest.raises(ConfigError, match="SLICEFAB_FASTPATH='yes'"):
        fastpath.enabled()
    monkeypatch.setenv(fastpath.ENV, "0")
    assert not fastpath.enabled()
    monkeypatch.delenv(fastpath.ENV)
    assert fastpath.enabled()


def test_the_c_sources_take_the_register_layout_from_the_generated_header() -> None:
    """One source for the register map: xbar_image.c includes the generated header and
    uses its names; no register address or field position is typed in by hand."""
    src = (REPO / "cffi_ext/src/xbar_image.c").read_text()
    assert '#include "slicefab_xbar.h"' in src
    for name in ("PERM_LO", "WEIGHT", "TB_RATE", "TB_BURST", "KEYS"):
        assert f"SLICEFAB_XBAR__PORTX__{name}" in src or f"({name}," in src
    ext = fastpath.extension()
    for p in (0, 17, 63):
        for r, off in enumerate(img.SHADOW_OFFSETS):
            assert ext.lib.sf_xbar_shadow_addr(p, r) == rm.port_reg(p, off)
