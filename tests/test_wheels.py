"""scripts/build_wheels.py without building: the targets, the per-target source copy, bad targets.

The builds themselves (and a smoke test of every wheel in a fresh venv) run in CI's wheel step.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def build_wheels():
    spec = importlib.util.spec_from_file_location("build_wheels", ROOT / "scripts" / "build_wheels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_wheels"] = module  # dataclasses resolve annotations through the module
    spec.loader.exec_module(module)
    return module


def test_targets_carry_their_labels_and_toolchains(build_wheels):
    targets = build_wheels.TARGETS
    assert set(targets) == {"cu130", "cu128", "pure"}
    assert targets["cu130"].env["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;10.0;12.0+PTX"
    assert targets["cu128"].torch.startswith("2.10.")  # the oldest torch whose stable ABI builds csrc/
    assert targets["pure"].env == {"VPFAST_SKIP_EXT": "1"} and targets["pure"].cuda_home_var is None
    assert all(t.env.get("VPFAST_FORCE_CUDA") == "1" for t in targets.values() if t.cuda_home_var)


def test_source_copy_is_the_working_tree_without_ignored_files(build_wheels, tmp_path):
    copy = build_wheels.source_copy(tmp_path / "src")
    assert (copy / "setup.py").is_file() and (copy / "csrc" / "token_mix.cpp").is_file()
    assert (copy / "kernels" / "compose.py").is_file()
    assert not (copy / ".venv").exists() and not (copy / "vpfast" / "_build_info.json").exists()
    assert not list(copy.rglob("*.so"))


def test_a_missing_toolkit_is_reported_not_crashed(build_wheels, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA12_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"no nvcc under \$CUDA12_HOME"):
        build_wheels.build(build_wheels.TARGETS["cu128"], tmp_path, tmp_path / "dist", tmp_path / "wheelhouse")


def test_unknown_targets_are_named(build_wheels, capsys):
    with pytest.raises(SystemExit):
        build_wheels.main(["cu999"])
    assert "unknown target(s) ['cu999']" in capsys.readouterr().err
