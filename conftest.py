"""Shared by pytest tests/ and pytest bench/: what every test and benchmark needs."""

import sys

import pytest


@pytest.fixture(autouse=True)
def _vpfast_environment():
    """vpfast reads VPFAST_BACKEND and TRITON_INTERPRET at import: after a test (and monkeypatch's undo, which runs
    first), the values in force are read again, so that a test that set them leaves nothing behind."""
    yield
    dispatch = sys.modules.get("vpfast.ops._dispatch")
    if dispatch is not None:
        dispatch.read_environment()
