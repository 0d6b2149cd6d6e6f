"""The package and its build: import, the compiled extension and its checks, ``vpfast info``."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import warnings

import pytest
import torch

import vpfast
from vpfast import _extension, _warn, cli

pytestmark = pytest.mark.cpu

BUILD_INFO = _extension.read_build_info()
needs_extension = pytest.mark.skipif(
    not BUILD_INFO.get("extension"), reason="installed without the extension (VPFAST_SKIP_EXT=1)"
)


def run_vpfast(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vpfast", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_import_and_version():
    import vpfast.kernels

    assert vpfast.__version__ == importlib.metadata.version("vpfast")
    assert vpfast.kernels.__name__ == "vpfast.kernels"


def test_build_info_describes_this_install():
    assert BUILD_INFO, (
        "vpfast/_build_info.json is missing: install with pip install --no-build-isolation -e ."
    )
    assert BUILD_INFO["version"] == vpfast.__version__
    assert BUILD_INFO["torch"] == torch.__version__
    assert BUILD_INFO["torch_cuda"] == torch.version.cuda


@needs_extension
def test_extension_loaded():
    status = _extension.status()
    assert status.loaded, status.reason
    assert status.reason == ""
    assert _extension.check_build_info(BUILD_INFO) == ""
    assert status.has_cuda == BUILD_INFO["cuda_kernels"]
    assert status.has_cuda == (BUILD_INFO["nvcc"] is not None)


@needs_extension
def test_extension_info_op():
    flags = torch.ops.vpfast._extension_info()
    assert isinstance(flags, int)
    assert bool(flags & _extension.HAS_CUDA_KERNELS) == BUILD_INFO["cuda_kernels"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not BUILD_INFO.get("cuda_kernels"), reason="built without CUDA kernels")
def test_cuda_probe_runs_a_kernel():
    x = torch.randn(3, 1000, 7, device="cuda").transpose(0, 2)  # non-contiguous
    y = torch.ops.vpfast._cuda_probe(x)
    torch.cuda.synchronize()
    assert torch.equal(y, x)


STABLE = {"extension": True, "abi": "stable", "torch_target": "2.10", "torch": "2.14.1", "torch_cuda": "13.0"}


@pytest.mark.parametrize(
    ("info", "torch_version", "torch_cuda", "expected"),
    [
        (STABLE, "2.14.1+cu130", "13.0", ""),
        (STABLE, "2.11.0", "12.8", ""),  # no CUDA kernels: the CUDA version does not matter
        ({**STABLE, "cuda_kernels": True}, "2.11.0+cu130", "13.2", ""),
        ({**STABLE, "cuda_kernels": True}, "2.14.1", "12.8", "built for CUDA 13.0"),
        ({**STABLE, "cuda_kernels": True}, "2.14.1+cpu", None, "CPU-only build"),
        (STABLE, "2.9.1", "13.0", "needs torch >= 2.10"),
        ({**STABLE, "abi": "classic"}, "2.13.0", "13.0", "built for torch 2.14.1"),
        ({"extension": False}, "2.14.1", "13.0", "VPFAST_SKIP_EXT=1"),
    ],
)
def test_check_build_info(info, torch_version, torch_cuda, expected):
    reason = _extension.check_build_info(info, torch_version, torch_cuda)
    assert (reason == "") if not expected else (expected in reason)


@pytest.fixture
def fresh_status(monkeypatch):
    """A status() recomputed in this test, with its own warn-once memory; the real one afterwards."""
    monkeypatch.setattr(_warn, "_warned", set())
    _extension.status.cache_clear()
    yield
    _extension.status.cache_clear()


def test_mismatch_warns_once_and_does_not_load(monkeypatch, fresh_status):
    mismatched = {**STABLE, "torch_target": "99.0"}
    monkeypatch.setattr(_extension, "read_build_info", lambda: mismatched)
    with pytest.warns(RuntimeWarning, match=r"needs torch >= 99\.0"):
        status = _extension.status()
    assert not status.loaded and not status.has_cuda
    assert "needs torch >= 99.0" in status.reason
    assert status.build_info == mismatched
    _extension.status.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _extension.status().loaded  # the second check does not warn again


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_info_text():
    result = run_vpfast("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"vpfast {vpfast.__version__}\n")
    for heading in ("torch", "triton", "devices", "environment", "extension vpfast._C", "backends"):
        assert heading in out
    loaded = _extension.status().loaded
    assert f"loaded            {'yes' if loaded else 'no'}" in out


def test_info_json():
    result = run_vpfast("info", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["vpfast"] == vpfast.__version__
    assert report["torch"] == torch.__version__
    assert report["cuda_available"] == torch.cuda.is_available()
    status = _extension.status()
    assert report["extension"]["loaded"] == status.loaded
    assert report["extension"]["has_cuda"] == status.has_cuda
    assert report["extension"]["build_info"] == BUILD_INFO
    assert report["backends_error"] == ""
    for row in report["backends"].values():
        assert set(row) == {"cpu", "cuda"}


def test_selftest_passes_and_can_fail(capsys, monkeypatch):
    from vpfast import selftest
    from vpfast.cli import main

    assert main(["selftest"]) == 0
    out = capsys.readouterr().out
    assert "ok   compose on CPU" in out and "ok   token_mix on CPU" in out and "FAIL" not in out
    monkeypatch.setattr(selftest, "check_compose", lambda generator: 1.0)  # a wrong result must be reported
    assert main(["selftest"]) == 1
    assert "FAIL compose on CPU" in capsys.readouterr().out


def _setup_functions() -> dict:
    """``env_flag`` and ``cuda_problem`` from setup.py, without running ``setup()``."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).parents[1] / "setup.py").read_text())
    names = ("env_flag", "cuda_problem")
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    namespace: dict = {"os": __import__("os"), "Path": __import__("pathlib").Path}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "setup.py", "exec"), namespace)  # noqa: S102
    return namespace


@pytest.mark.parametrize("env, torch_cuda, nvcc, expected", [
    ({}, "13.0", "nvcc", True),
    ({}, None, "nvcc", False),
    ({}, "13.0", None, False),
    ({"VPFAST_SKIP_CUDA": "1"}, "13.0", "nvcc", False),
    ({"VPFAST_FORCE_CUDA": "1"}, None, "nvcc", SystemExit),
    ({"VPFAST_SKIP_CUDA": "1", "VPFAST_FORCE_CUDA": "1"}, "13.0", "nvcc", SystemExit),
])
def test_setup_cuda_knobs(monkeypatch, env, torch_cuda, nvcc, expected):
    """VPFAST_SKIP_CUDA=1 (the quick start without a GPU) builds the CPU kernels only, even with nvcc and a CUDA
    torch; VPFAST_FORCE_CUDA=1 fails when it cannot be honoured or contradicts VPFAST_SKIP_CUDA."""
    for name in ("VPFAST_SKIP_CUDA", "VPFAST_FORCE_CUDA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cuda_problem = _setup_functions()["cuda_problem"]
    if expected is SystemExit:
        with pytest.raises(SystemExit):
            cuda_problem(torch_cuda, nvcc)
    else:
        assert (cuda_problem(torch_cuda, nvcc) == "") is expected


def test_info_says_why_a_build_has_no_cuda_kernels():
    from vpfast.info import _build_line

    base = {"extension": True, "torch": "2.14.1", "abi": "stable", "torch_target": "2.10", "cuda_kernels": False}
    assert _build_line({**base, "cuda_kernels_skipped": "VPFAST_SKIP_CUDA=1"}).endswith("CPU only (VPFAST_SKIP_CUDA=1)")
    assert _build_line(base).endswith("CPU only")


def test_import_does_not_load_dynamo():
    """``import vpfast`` leaves torch._dynamo unloaded (it took 6 of 11 s on the 2-core machine); the ops still
    run eagerly and compile (tests/test_op_registration.py)."""
    code = "import sys, vpfast; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
