"""Render the reconfiguration waveform of docs/rtl.md from a real simulation (``make waves``).

1. runs the cocotb test ``test_waves`` (a commit while a packet is in flight) on Verilator
   with tracing on, for a 2-port, 8-bit crossbar: Verilator writes every signal to
   ``dump.vcd``, and the test writes the time of the commit strobe to a mark file;
2. reads the dump (``vcdvcd``), samples the signals drawn once per clock cycle (at the
   falling edge: the value each register holds during the cycle) in a window around the
   strobe, and checks in the dump what docs/rtl.md says: the strobe comes while input 0 is
   inside packet A, ``ACTIVE_GEN[0]`` changes in the cycle after A's last flit left input
   0, ``STATUS.pending`` is high from the strobe until then;
3. writes WaveDrom's WaveJSON (``docs/rtl-reconfiguration.json``) and renders it to SVG
   (``docs/rtl-reconfiguration.svg``) with ``yowasp-wavedrom`` (WaveDrom's own renderer,
   run in an embedded JavaScript engine).

Verilator, not Icarus: cocotb's runner makes Icarus write FST only, Verilator writes VCD.

    .venv/bin/python rtl/tb/slicefab_xbar/waves.py [--out docs/rtl-reconfiguration.svg]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from firmware.fabric import rtlsim  # noqa: E402

N_PORTS, DATA_WIDTH = 2, 8
SCOPE = "tb_slicefab_xbar"
CYCLES_BEFORE = 1
CYCLES_AFTER_LAST = 2


@dataclass(frozen=True)
class Trace:
    label: str
    signal: str  # VCD name under SCOPE
    kind: str  # "bit", "data" (decimal), "flit" (hex, only while `valid` is high)
    valid: str = ""


GROUPS: list[tuple[str, list[Trace]]] = [
    (
        "input 0",
        [
            Trace("tvalid", "s00_axis_tvalid", "bit"),
            Trace("tready", "s00_axis_tready", "bit"),
            Trace("tdest", "s00_axis_tdest", "flit", "s00_axis_tvalid"),
            Trace("tdata", "s00_axis_tdata", "flit", "s00_axis_tvalid"),
            Trace("tlast", "s00_axis_tlast", "bit"),
        ],
    ),
    (
        "registers",
        [
            Trace("CTRL.commit", "xbar.ctrl_commit", "bit"),
            Trace("GEN.committed", "xbar.gen_committed", "data"),
            Trace("staged[0]", "xbar.stg_valid[0]", "bit"),
            Trace("STATUS.pending", "xbar.status_pending", "bit"),
            Trace("ACTIVE_GEN[0]", "xbar.act_gen[0]", "data"),
            Trace("GEN.adopted", "xbar.gen_adopted", "data"),
        ],
    ),
    (
        "output 1",
        [
            Trace("tvalid", "m01_axis_tvalid", "bit"),
            Trace("tdata", "m01_axis_tdata", "flit", "m01_axis_tvalid"),
        ],
    ),
    (
        "output 0",
        [
            Trace("tvalid", "m00_axis_tvalid", "bit"),
            Trace("tdata", "m00_axis_tdata", "flit", "m00_axis_tvalid"),
        ],
    ),
]


def simulate(workdir: Path) -> tuple[Path, dict[str, float]]:
    """Run test_waves on Verilator with tracing; returns the dump and the mark."""
    mark = workdir / "mark.json"
    results = rtlsim.run(
        "test_waves",
        N_PORTS,
        DATA_WIDTH,
        sim="verilator",
        waves=True,
        extra_env={"XBAR_WAVES_MARK": str(mark)},
        log_file=workdir / "sim.log",
    )
    total, failed = rtlsim.failures(results)
    if failed or total != 1:
        raise SystemExit(f"test_waves failed on Verilator (log: {workdir / 'sim.log'})")
    return results.parent / "dump.vcd", json.loads(mark.read_text(encoding="utf-8"))


class Samples:
    """Every traced signal's value in each clock cycle (sampled at the falling edge)."""

    def __init__(self, vcd_path: Path) -> None:
        from vcdvcd import VCDVCD  # type: ignore[import-untyped]

        self.vcd = VCDVCD(str(vcd_path), store_tvs=True)
        # vcdvcd names a vector `name[hi:lo]`; look signals up by their plain names
        self.names = {re.sub(r"\[\d+:\d+\]$", "", n): n for n in self.vcd.signals}
        clk = self.vcd[self.names[f"{SCOPE}.clk"]]
        self.rising = [t for t, v in clk.tv if v == "1"]
        if len(self.rising) < 2:
            raise SystemExit(f"{vcd_path}: no clock in the dump")
        self.half = (self.rising[1] - self.rising[0]) // 2

    def value(self, signal: str, cycle: int) -> str:
        """The binary string of ``signal`` during cycle ``cycle`` (index into rising)."""
        return str(self.vcd[self.names[f"{SCOPE}.{signal}"]][self.rising[cycle] + self.half])

    def number(self, signal: str, cycle: int) -> int:
        v = self.value(signal, cycle)
        if any(c not in "01" for c in v):
            raise SystemExit(f"{signal} is {v!r} in cycle {cycle}")
        return int(v, 2)

    def cycle_of(self, time: float) -> int:
        """The cycle whose rising edge is at ``time`` (or the last one before it)."""
        return max(i for i, t in enumerate(self.rising) if t <= time)


def _moves_last(s: Samples, c: int) -> bool:
    return bool(
        s.number("s00_axis_tvalid", c)
        and s.number("s00_axis_tready", c)
        and s.number("s00_axis_tlast", c)
    )


def check_protocol(s: Samples, strobe: int) -> tuple[int, int, int]:
    """The dump against docs/rtl.md; returns the cycles of A's first and last flit at input
    0 and of B's last flit at output 0."""
    if not s.number("xbar.ctrl_commit", strobe):
        raise SystemExit(f"no commit strobe in cycle {strobe}")
    if not s.number("xbar.busy", strobe) & 1:
        raise SystemExit("input 0 was not inside a packet when the commit came")
    a_first = strobe  # back to the cycle A's first flit moved
    while (
        a_first > 0 and s.number("s00_axis_tvalid", a_first - 1) and not _moves_last(s, a_first - 1)
    ):
        a_first -= 1
    a_last = next(c for c in range(strobe, len(s.rising)) if _moves_last(s, c))
    if a_last == strobe:
        raise SystemExit("the commit came with A's last flit: nothing to draw in between")
    gen_before = s.number("xbar.act_gen[0]", strobe)
    for c in range(strobe + 1, a_last + 1):
        if s.number("xbar.act_gen[0]", c) != gen_before:
            raise SystemExit(f"ACTIVE_GEN[0] changed in cycle {c}, inside packet A")
        if not s.number("xbar.status_pending", c):
            raise SystemExit(f"STATUS.pending low in cycle {c}, before input 0 adopted")
    if s.number("xbar.act_gen[0]", a_last + 1) != gen_before + 1:
        raise SystemExit("ACTIVE_GEN[0] did not change in the cycle after A's last flit")
    if s.number("xbar.status_pending", a_last + 1):
        raise SystemExit("STATUS.pending still high after every port adopted")
    b_last = next(
        c
        for c in range(a_last + 1, len(s.rising))
        if s.number("m00_axis_tvalid", c) and s.number("m00_axis_tlast", c)
    )
    return a_first, a_last, b_last


def wavejson(s: Samples, first: int, last: int, strobe: int, a_last: int) -> dict[str, Any]:
    """WaveDrom's WaveJSON for cycles first..last."""
    signal: list[Any] = [{"name": "clk", "wave": "p" + "." * (last - first)}]
    for group, traces in GROUPS:
        lanes: list[Any] = [group]
        for t in traces:
            wave, data, prev = "", [], None
            for c in range(first, last + 1):
                if t.kind == "bit":
                    v = s.value(t.signal, c)
                    ch = v if v in ("0", "1") else "x"
                elif t.valid and not s.number(t.valid, c):
                    ch, v = "x", "x"
                else:
                    n = s.number(t.signal, c)
                    v = f"{n:02x}" if t.kind == "flit" and t.signal.endswith("tdata") else str(n)
                    ch = "="
                # a flit value repeats in consecutive cycles only as a new flit when valid
                repeat = v == prev and not (t.kind == "flit" and ch == "=")
                wave += "." if repeat else ch
                if ch == "=" and not repeat:
                    data.append(v)
                prev = v
            lane: dict[str, Any] = {"name": t.label, "wave": wave}
            if data:
                lane["data"] = data
            lanes.append(lane)
        signal.append({})
        signal.append(lanes)
    return {
        "signal": signal,
        "head": {
            "text": "commit while A (input 0 → output 1) is in flight; B (→ output 0) new gen.",
            "tick": first,
        },
        "foot": {
            "text": f"Verilator dump of test_waves, N={N_PORTS}, W={DATA_WIDTH}; "
            "clock cycles since the start",
        },
        "config": {"hscale": 1},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "rtl-reconfiguration.svg")
    args = ap.parse_args(argv)
    import yowasp_wavedrom  # type: ignore[import-untyped]

    with tempfile.TemporaryDirectory(prefix="slicefab-waves-") as tmp:
        vcd, mark = simulate(Path(tmp))
        s = Samples(vcd)
        strobe = s.cycle_of(mark["commit_strobe_ns"] * 1000 / _timescale_ps(s))
        a_first, a_last, b_last = check_protocol(s, strobe)
        doc = wavejson(s, a_first - CYCLES_BEFORE, b_last + CYCLES_AFTER_LAST, strobe, a_last)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    args.out.write_text(yowasp_wavedrom.render(doc), encoding="utf-8")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


def _timescale_ps(s: Samples) -> float:
    """Picoseconds per VCD time unit."""
    magnitude, unit = s.vcd.timescale["magnitude"], s.vcd.timescale["unit"]
    return (
        float(magnitude) * {"s": 1e12, "ms": 1e9, "us": 1e6, "ns": 1e3, "ps": 1.0, "fs": 1e-3}[unit]
    )


if __name__ == "__main__":
    sys.exit(main())
