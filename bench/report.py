"""Markdown tables from bench/results/*.json, so the README quotes exactly what a run measured.

    python bench/report.py [RESULTS_DIR]

token_mix: forward+backward per (N, dtype) with the speedups over eager and torch.compile and whether
they reach PGN's target (>= 1.5x eager and >= 1.2x compile, issue 4), plus forward and backward alone.
host_overhead: microseconds per call. Other suites are listed by file; their README tables are curated.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

TARGET_OVER_EAGER, TARGET_OVER_COMPILE = 1.5, 1.2


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(value: float) -> str:
    return f"{value:.3f} ms"


def token_mix_report(rows: list[dict]) -> str:
    """Forward+backward table with the speedups and the target check, then forward and backward alone."""
    by_key = {(r["op"], r["n"], r["dtype"], r["impl"]): r for r in rows}
    shapes = sorted({(r["n"], r["dtype"]) for r in rows})
    fwd_bwd = []
    for n, dtype in shapes:
        eager, compiled, ours = (by_key.get(("forward+backward", n, dtype, impl)) for impl in ("eager", "compile",
                                                                                               "vpfast"))
        if not (eager and compiled and ours):
            continue
        over_eager, over_compile = eager["median_ms"] / ours["median_ms"], compiled["median_ms"] / ours["median_ms"]
        met = over_eager >= TARGET_OVER_EAGER and over_compile >= TARGET_OVER_COMPILE
        fwd_bwd.append([f"{n}, {dtype}", _ms(eager["median_ms"]), _ms(compiled["median_ms"]),
                        _ms(ours["median_ms"]), f"{over_eager:.2f}x / {over_compile:.2f}x", "yes" if met else "no",
                        f"{eager['peak_extra_mib']:.0f} / {ours['peak_extra_mib']:.0f} MiB"])
    parts = [_table(["N, dtype", "eager", "torch.compile", "vpfast", "speedup vs eager / compile",
                     f"target ({TARGET_OVER_EAGER}x / {TARGET_OVER_COMPILE}x)", "peak extra eager / vpfast"], fwd_bwd)]
    for op in ("forward", "backward"):
        parts.append(_table([f"{op}: N, dtype", "eager", "torch.compile", "vpfast", "vpfast TFLOP/s"], (
            [f"{n}, {dtype}", *(_ms(by_key[(op, n, dtype, impl)]["median_ms"]) for impl in ("eager", "compile",
                                                                                            "vpfast")),
             f"{by_key[(op, n, dtype, 'vpfast')]['tflop_per_s']:.1f}"]
            for n, dtype in shapes if all((op, n, dtype, impl) in by_key for impl in ("eager", "compile", "vpfast")))))
    return "\n\n".join(parts)


def host_overhead_report(rows: list[dict]) -> str:
    return _table(["op", "impl", "forward, no grad", "forward+backward"], (
        [r["op"], r["impl"], f"{r['forward_no_grad_us']:.0f} us", f"{r['forward_backward_us']:.0f} us"] for r in rows))


REPORTS = {"token_mix": token_mix_report, "host_overhead": host_overhead_report}


def report(results: Path) -> str:
    sections = []
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        if "meta" not in data:
            continue
        meta, suite = data["meta"], path.stem.split("-", 1)[0]
        title = (f"### {path.name}\n\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
                 f"commit {str(meta['commit'])[:7]}")
        body = REPORTS[suite](data["rows"]) if suite in REPORTS else f"{len(data['rows'])} rows (no table for {suite})"
        sections.append(f"{title}\n\n{body}")
    return "\n\n".join(sections)


def main(argv: list[str]) -> None:
    print(report(Path(argv[0]) if argv else Path(__file__).parent / "results"))


if __name__ == "__main__":
    main(sys.argv[1:])
