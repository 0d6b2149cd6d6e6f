"""Ahead-of-time tier: every GPU kernel compiles for sm_80 and sm_90 without spills, within its
register budget, with vectorized global accesses on contiguous paths (no GPU needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vpfast import _extension, aot

pytestmark = pytest.mark.aot


@pytest.fixture(scope="module")
def kernel_report(tmp_path_factory) -> dict:
    """The report of ``vpfast info --kernels``, run without TRITON_INTERPRET (real Triton kernels)."""
    path = tmp_path_factory.mktemp("aot") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "vpfast", "info", "--kernels", "--kernels-json", str(path)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(path.read_text())


def test_every_triton_kernel_compiles_for_every_target(kernel_report):
    compiled = {(k["case"], k["arch"]) for k in kernel_report["kernels"] if k["case"] != "vpfast._C"}
    from vpfast.kernels import compose

    expected = {(case.name, arch) for arch in aot.ARCHS for case in compose.aot_cases(arch)}
    assert compiled == expected
    assert {k["kernel"] for k in kernel_report["kernels"]} >= {
        "_compose_fwd_kernel", "_compose_bwd_norm_kernel", "_compose_bwd_accum_kernel"}


def test_no_spills_registers_within_budget_and_vectorized(kernel_report):
    bad = [f"{k['case']} / {k['kernel']} / sm_{k['arch']}: {'; '.join(k['problems'])}"
           for k in kernel_report["kernels"] if k["problems"]]
    assert not bad, "\n".join(bad)


def test_extension_kernels_are_reported(kernel_report):
    if not _extension.status().has_cuda:
        pytest.skip("vpfast._C was built without CUDA kernels")
    ext = [k for k in kernel_report["kernels"] if k["case"] == "vpfast._C"]
    assert {k["arch"] for k in ext} >= {80, 90}
    assert all(k["stack"] == 0 and k["local"] == 0 for k in ext)


def test_access_widths_reads_sass_opcodes():
    sass = """
        /*0090*/  LDG.E.U8 R4, [R2.64] ;
        /*00a0*/  LDG.E.128 R8, [R6.64] ;
        /*00b0*/  LDG.E.EL.128 R12, [R6.64+0x10] ;
        /*00c0*/  LDG.E R5, [R2.64] ;
        /*00d0*/  STG.E.U16 [R2.64], R4 ;
        /*00e0*/  STG.E.64 [R2.64], R4 ;
    """
    loads, stores = aot.access_widths(sass)
    assert loads == {8: 1, 128: 2, 32: 1}
    assert stores == {16: 1, 64: 1}


def test_problems_flag_spills_registers_and_narrow_accesses():
    report = aot.KernelReport(case="c", kernel="k", arch=90, num_warps=4, registers=130, stack=8, shared=0, local=0,
                              loads={32: 4}, stores={16: 2, 128: 1}, register_budget=128, min_store_bits=128,
                              min_load_bits=128)
    problems = report.problems()
    assert len(problems) == 4
    clean = aot.KernelReport(case="c", kernel="k", arch=90, num_warps=4, registers=64, stack=0, shared=0, local=0,
                             loads={8: 4, 128: 1}, stores={128: 2}, register_budget=128, min_store_bits=128,
                             min_load_bits=128)
    assert clean.problems() == []
