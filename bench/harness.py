"""Timing, bandwidth and result files shared by the benchmark suites.

GPU: CUDA-event medians (triton.testing.do_bench), logical bytes, GB/s and the
percentage of the device bandwidth measured here (a large device-to-device
copy, bytes read plus written). Whole training steps: several pipelines timed
in turn (warm-up, interleaved repeats, medians), with peak memory and FLOPs.
CPU: each case runs once as a smoke test.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def on_gpu() -> bool:
    return torch.cuda.is_available()


def median_ms(fn) -> float:
    """Median milliseconds per call: CUDA events on a GPU, one timed call on the CPU (smoke)."""
    if on_gpu():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def interleaved_step_times(pipelines: dict[str, Callable[[], None]], steps: int, warmup: int = 3,
                           repeats: int = 5) -> dict[str, dict]:
    """Per pipeline: median seconds per step and peak memory (GiB, GPU only: the allocator's peak during its
    rounds, which counts every tensor alive then, the other pipelines' models and data too).

    Each pipeline first runs ``warmup`` steps (compiles, allocates, captures); then ``repeats`` rounds
    each time ``steps`` steps of every pipeline in turn, so drifts of clock or temperature hit all alike.
    Without a GPU: one warm-up step and one round of one step (a smoke test).
    """
    if not on_gpu():
        steps, warmup, repeats = 1, 1, 1
    for run in pipelines.values():
        for _ in range(warmup):
            run()
    sync()
    seconds: dict[str, list[float]] = {name: [] for name in pipelines}
    peak: dict[str, float | None] = dict.fromkeys(pipelines)
    for _ in range(repeats):
        for name, run in pipelines.items():
            if on_gpu():
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                run()
            sync()
            seconds[name].append((time.perf_counter() - start) / steps)
            if on_gpu():
                peak[name] = max(peak[name] or 0.0, torch.cuda.max_memory_allocated() / 2**30)
    return {name: {"seconds": statistics.median(seconds[name]), "peak_memory_gib": peak[name],
                   "repeats_ms": [1e3 * s for s in seconds[name]]} for name in pipelines}


def flops(fn: Callable[[], None]) -> int:
    """Floating-point operations of one call (``torch.utils.flop_counter``: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@functools.cache
def device_bandwidth_gbs() -> float | None:
    """Measured device memory bandwidth: a 1 GiB device-to-device copy (read + write bytes)."""
    if not on_gpu():
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def throughput(ms: float, nbytes: int) -> dict:
    """Logical bytes, GB/s and percent of measured bandwidth for one timing."""
    gbs = nbytes / ms / 1e6
    peak = device_bandwidth_gbs()
    return {"median_ms": ms, "bytes": nbytes, "gb_per_s": gbs,
            "pct_of_measured_bw": 100 * gbs / peak if peak else None}


def cpu_name() -> str:
    """The CPU's model name and core count, e.g. "AMD EPYC, 2 cores" (Linux; else the platform's word)."""
    model = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores"


def metadata() -> dict:
    import triton

    import vpfast

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "device": torch.cuda.get_device_name() if on_gpu() else cpu_name(),
        "measured_bandwidth_gb_per_s": device_bandwidth_gbs(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "vpfast": vpfast.__version__, "commit": commit, "python": platform.python_version(),
    }


def save(suite: str, rows: list[dict]) -> Path:
    """Write ``bench/results/<suite>-<device>.json`` with the metadata and one row per case."""
    meta = metadata()
    slug = re.sub("-+", "-", "".join(c if c.isalnum() else "-" for c in meta["device"].lower())).strip("-")
    path = RESULTS / f"{suite}-{slug}.json"
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return path
