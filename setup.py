"""Build vpfast: the Python package, ``kernels/`` as ``vpfast.kernels``, and the ``vpfast._C`` extension.

The extension is built from ``csrc/`` against the PyTorch *stable ABI* (only ``torch/csrc/stable`` and
``torch/headeronly`` headers, ``Py_LIMITED_API``): it compiles in seconds instead of minutes and one
``abi3`` binary loads on every torch >= ``TORCH_TARGET`` and every Python >= 3.10.
Install with ``pip install --no-build-isolation -e .`` (the build needs the installed torch).

Knobs (environment variables):
    VPFAST_SKIP_EXT=1     pure-Python install, no extension: ops use their Triton and reference backends
    VPFAST_FORCE_CUDA=1   compile the CUDA kernels or fail (default: when nvcc and a CUDA torch are found)
    VPFAST_SKIP_CUDA=1    compile the extension's CPU kernels only (a machine without a GPU: seconds, not a minute)
    CUDA_HOME             the CUDA toolkit (default /usr/local/cuda)
    TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default "8.0;9.0")
    MAX_JOBS              parallel compile jobs (read by torch's ninja build)
    NVCC_THREADS          nvcc --threads, architectures compiled in parallel per file (default 2)
    VPFAST_LOCAL_VERSION  a PEP 440 local version label for the wheel, e.g. "cu130" -> 0.1.0+cu130

Every build writes ``vpfast/_build_info.json`` (versions, architectures, commit), which
``vpfast._extension`` checks against the running torch before loading the extension.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import runpy
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
VERSION = runpy.run_path(str(ROOT / "vpfast" / "version.py"))["__version__"]
TORCH_TARGET = (2, 10)  # oldest torch whose stable ABI has everything csrc/ uses (2.9's lacks TORCH_BOX, ...)
REQUIREMENTS = ["triton; platform_system == 'Linux'", "numpy", "safetensors", "tqdm", "matplotlib"]
PURE_TORCH = "torch>=2.6"  # torch.library custom ops with autograd and fake registrations
DEFAULT_ARCH_LIST = "8.0;9.0"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_nvcc() -> Path | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = Path(home) / "bin" / "nvcc"
    return nvcc if nvcc.is_file() else None


def nvcc_version(nvcc: Path) -> str | None:
    """The full nvcc version ("13.0.88") from ``nvcc --version``."""
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    return match.group(1) if match else None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.strip() or None


def cuda_problem(torch_cuda: str | None, nvcc: Path | None) -> str:
    """Why the CUDA kernels are not compiled ("" when they are); fails loudly when VPFAST_FORCE_CUDA=1 cannot be
    honoured."""
    problem = ""
    if env_flag("VPFAST_SKIP_CUDA"):
        if env_flag("VPFAST_FORCE_CUDA"):
            raise SystemExit("vpfast: VPFAST_SKIP_CUDA=1 and VPFAST_FORCE_CUDA=1 contradict each other; set one")
        problem = "VPFAST_SKIP_CUDA=1"
    elif torch_cuda is None:
        problem = "the installed torch is a CPU-only build"
    elif nvcc is None:
        problem = "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    if problem and env_flag("VPFAST_FORCE_CUDA"):
        raise SystemExit(f"vpfast: VPFAST_FORCE_CUDA=1 but the CUDA kernels cannot be built: {problem}")
    if problem:
        print(f"vpfast: building the extension without CUDA kernels ({problem})")
    return problem


def extension_build(info: dict) -> dict:
    """setup() arguments that build vpfast._C; fills the build fields of ``info``."""
    nvcc = find_nvcc()
    if nvcc is not None:
        os.environ.setdefault("CUDA_HOME", str(nvcc.parent.parent))  # before cpp_extension reads it
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    problem = cuda_problem(torch.version.cuda, nvcc)
    cuda = not problem
    target = "0x{:02x}{:02x}000000000000".format(*TORCH_TARGET)
    defines = [f"-DTORCH_TARGET_VERSION={target}"] + (["-DVPFAST_WITH_CUDA"] if cuda else [])
    args = {"cxx": ["-O3", *defines]}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        threads = os.environ.get("NVCC_THREADS", "2")
        args["nvcc"] = ["-O3", "-DUSE_CUDA", f"--threads={threads}", *defines]
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    make_extension = CUDAExtension if cuda else CppExtension
    ext = make_extension("vpfast._C", sources, extra_compile_args=args, py_limited_api=True)
    info.update(
        extension=True,
        abi="stable",
        torch_target=".".join(map(str, TORCH_TARGET)),
        cuda_kernels=cuda,
        cuda_kernels_skipped=problem or None,
        nvcc=nvcc_version(nvcc) if cuda else None,
        cuda_arch_list=os.environ["TORCH_CUDA_ARCH_LIST"] if cuda else None,
    )
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": BuildExtension},
        "options": {"bdist_wheel": {"py_limited_api": "cp310"}},
    }


def write_build_info(info: dict) -> None:
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    except ImportError:  # a pure-Python build does not need torch
        info.update(torch=None, torch_cuda=None)
    info.update(
        commit=git_commit(),
        build_time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    (ROOT / "vpfast" / "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")


label = os.environ.get("VPFAST_LOCAL_VERSION", "").strip()
version = f"{VERSION}+{label}" if label else VERSION
build_info: dict = {"version": version, "extension": False, "cuda_kernels": False}
build_args = {} if env_flag("VPFAST_SKIP_EXT") else extension_build(build_info)
write_build_info(build_info)
# A stable-ABI extension loads into every torch from TORCH_TARGET on: that is the wheel's torch range.
torch_requirement = "torch>={}.{}".format(*TORCH_TARGET) if build_info["extension"] else PURE_TORCH

kernel_packages = ["vpfast.kernels"] + [f"vpfast.kernels.{p}" for p in find_packages("kernels")]
setup(
    version=version,
    install_requires=[torch_requirement, *REQUIREMENTS],
    packages=find_packages(include=["vpfast", "vpfast.*"]) + kernel_packages,
    package_dir={"vpfast.kernels": "kernels"},
    package_data={"vpfast": ["_build_info.json"]},
    zip_safe=False,
    **build_args,
)
