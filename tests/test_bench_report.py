"""bench/report.py: the tables the README quotes, and PGN's speed-target check."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

_spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).parents[1] / "bench" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _rows(vpfast_ms: float) -> list[dict]:
    rows = []
    for op in ("forward", "backward", "forward+backward"):
        for impl, ms in (("eager", 1.5), ("compile", 1.2), ("vpfast", vpfast_ms)):
            rows.append({"op": op, "impl": impl, "n": 256, "dtype": "bf16", "median_ms": ms, "tflop_per_s": 1.0,
                         "peak_extra_mib": 8.0})
    return rows


@pytest.mark.parametrize(("vpfast_ms", "met"), [(1.0, "yes"), (1.001, "no")])
def test_token_mix_target_needs_both_speedups(vpfast_ms, met):
    first_row = report.token_mix_report(_rows(vpfast_ms)).splitlines()[2]
    assert first_row.startswith("| 256, bf16 |") and first_row.split(" | ")[5] == met


def test_report_reads_the_committed_results():
    results = Path(__file__).parents[1] / "bench" / "results"
    text = report.report(results)
    for path in results.glob("token_mix-*.json"):
        rows = json.loads(path.read_text())["rows"]
        assert f"### {path.name}" in text
        table = report.token_mix_report(rows)
        for n, dtype in {(r["n"], r["dtype"]) for r in rows if r["op"] == "forward+backward"}:
            assert table.count(f"| {n}, {dtype} | ") == 3  # forward+backward, forward, backward
