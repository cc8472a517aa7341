"""``slicefab bench fastpath`` runs and prints its named figures (speed is judged by the
figures it prints, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_fastpath_prints_named_figures() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "firmware.cli", "bench", "fastpath", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    figures = json.loads(p.stdout)
    for key in (
        "image_c_us",
        "image_python_us",
        "image_ratio_c_vs_python",
        "image_python_planner_us",
        "alloc_free_ops_per_s_c",
        "alloc_free_ops_per_s_python",
        "alloc_free_ratio_c_vs_python",
        "alloc_free_cpu_ratio_c_vs_python",
        "mix_ratio_c_vs_python",
    ):
        assert isinstance(figures[key], (int, float)) and figures[key] > 0, key
    # the table the image is measured on is the one the issue names
    assert figures["image_ports"] == 64 and figures["image_live_slices"] == 1_000
    # the paths agreed (the bench raises otherwise) and are compared against their anchors
    assert figures["image_target_ratio_min"] == 20
    assert figures["alloc_free_target_ops_per_s"] == 100_000
