"""pytest bench/: collects every case's figures and saves them per suite (on a GPU, or with --save-results)."""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

import harness  # noqa: E402

_rows: dict[str, list[dict]] = defaultdict(list)


def pytest_addoption(parser):
    parser.addoption("--save-results", action="store_true",
                     help="write bench/results/*.json even without a GPU (smoke figures)")


@pytest.fixture
def record(request, benchmark):
    """record(suite, row): keep a row for the suite's JSON and show it in pytest-benchmark's extra_info."""

    def _record(suite: str, row: dict) -> None:
        benchmark.extra_info.update(row)
        _rows[suite].append({"case": request.node.name, **row})

    return _record


def pytest_sessionfinish(session, exitstatus):
    if _rows and (harness.on_gpu() or session.config.getoption("--save-results")):
        for suite, rows in _rows.items():
            path = harness.save(suite, rows)
            print(f"\nbench results: {path}")
