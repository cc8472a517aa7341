"""Counting LUTs and flip-flops in yosys ``stat -json`` output (firmware.fabric.rtlsynth).

The synthesis itself runs in ``slicefab bench synth`` (minutes, not CI-sized); these check
the counting that turns its statistics into the figures of docs/rtl.md.
"""

from __future__ import annotations

import pytest

from firmware.errors import FabricError
from firmware.fabric.rtlsynth import Resources, resources_from_stat


def _stat(cells: dict[str, int]) -> dict[str, object]:
    return {"design": {"num_cells": sum(cells.values()), "num_cells_by_type": cells}}


def test_luts_and_every_flip_flop_kind_counted() -> None:
    r = resources_from_stat(
        _stat(
            {
                "$lut": 1585,
                "$_DFF_P_": 5,
                "$_SDFFCE_PN0P_": 634,
                "$_SDFFE_PP1P_": 4,
                "$_DFFE_PP_": 3,
                "$_ALDFF_PP_": 1,
                "$_DFFSR_PPP_": 2,
                "slicefab_xbar_regs$slicefab_xbar.regs": 1,
            }
        ),
        blackboxes=["slicefab_xbar_regs"],
    )
    assert (r.luts, r.ffs) == (1585, 5 + 634 + 4 + 3 + 1 + 2)


def test_unmapped_cell_refused() -> None:
    with pytest.raises(FabricError, match=r"\$_MUX_"):
        resources_from_stat(_stat({"$lut": 10, "$_MUX_": 2}))


def test_blackbox_only_when_named() -> None:
    with pytest.raises(FabricError, match="slicefab_xbar_regs"):
        resources_from_stat(_stat({"$lut": 1, "slicefab_xbar_regs$slicefab_xbar.regs": 1}))


def test_latch_refused() -> None:
    with pytest.raises(FabricError, match="latch"):
        resources_from_stat(_stat({"$lut": 1, "$_DLATCH_P_": 1}))


def test_not_a_stat_document() -> None:
    with pytest.raises(FabricError, match="num_cells_by_type"):
        resources_from_stat({"modules": {}})


def test_sum_of_designs() -> None:
    a = Resources(10, 4, {"$lut": 10, "$_DFF_P_": 4})
    b = Resources(5, 1, {"$lut": 5, "$_SDFF_PP0_": 1})
    s = a + b
    assert (s.luts, s.ffs) == (15, 5)
    assert s.cells == {"$lut": 15, "$_DFF_P_": 4, "$_SDFF_PP0_": 1}
